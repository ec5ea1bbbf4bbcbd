//! Delay tiers end to end: events whose first attempt fails are retried 1 s later through the
//! durable tier topics. Measures retries per second (time from the first retry's due time to
//! the last retry's arrival) and how late retries land against their schedule.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald::config::Config;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789";
const EVENTS: usize = 2000;
const INTERVAL: Duration = Duration::from_secs(1);

type Arrivals = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

/// A receiver that answers 503 to each event's first attempt and 200 afterwards.
async fn sink() -> (String, Arrivals) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let arrivals: Arrivals = Default::default();
    let seen = arrivals.clone();
    tokio::spawn(async move {
        loop {
            // A failed accept (a connection reset before it was taken, a full fd table) loses
            // that connection, not the receiver: Herald retries what it could not send.
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    async move {
                        let id = req.headers()["webhook-id"].to_str().unwrap().to_string();
                        let _ = req.into_body().collect().await;
                        let first = {
                            let mut seen = seen.lock().unwrap();
                            let times = seen.entry(id).or_default();
                            times.push(Instant::now());
                            times.len() == 1
                        };
                        let status = if first { 503 } else { 200 };
                        Ok::<_, std::convert::Infallible>(
                            Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    (url, arrivals)
}

async fn post(
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    url: String,
    body: serde_json::Value,
) {
    let req = Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
}

/// What a round that timed out is missing, and what Herald says it did, for the panic message.
async fn missing(
    arrivals: &Arrivals,
    prefix: &str,
    client: &Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
    api: &str,
) -> String {
    let mut by_count = [0usize; 3];
    for (_, times) in arrivals.lock().unwrap().iter().filter(|(id, _)| id.starts_with(prefix)) {
        by_count[times.len().min(2)] += 1;
    }
    let never = EVENTS - by_count[1] - by_count[2];
    let req = Request::get(format!("{api}/metrics"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let metrics = match client.request(req).await {
        Ok(resp) => match resp.into_body().collect().await {
            Ok(body) => String::from_utf8_lossy(&body.to_bytes())
                .lines()
                .filter(|l| !l.starts_with('#') && !l.ends_with(" 0"))
                .filter(|l| l.contains("deliver") || l.contains("retr") || l.contains("lag"))
                .collect::<Vec<_>>()
                .join("\n"),
            Err(e) => format!("metrics body: {e}"),
        },
        Err(e) => format!("metrics: {e}"),
    };
    format!(
        "of {EVENTS} events, {never} never arrived, {} arrived once, {} twice or more; Herald's metrics:\n{metrics}",
        by_count[1], by_count[2]
    )
}

fn tiers(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env: Vec<(String, String)> =
        [("HERALD_ADMIN_TOKEN", TOKEN), ("HERALD_NETWORK_ALLOW", "127.0.0.0/8"), ("HERALD_LISTEN", "127.0.0.1:0")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    let mut config = Config::load(None, &env).unwrap();
    config.data_dir = dir.path().to_path_buf();
    // Every first attempt fails on purpose; this measures the tiers, not the circuit breaker.
    config.health.breaker_failures = u32::MAX;
    let (herald, url, arrivals) = rt.block_on(async {
        let herald = herald::server::start(config).await.unwrap();
        let (url, arrivals) = sink().await;
        (herald, url, arrivals)
    });
    let api = format!("http://{}", herald.addr);
    let client = Client::builder(TokioExecutor::new()).build_http();
    rt.block_on(post(
        &client,
        format!("{api}/v1/subscriptions"),
        serde_json::json!({ "url": url, "max_in_flight": 256, "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 3 } }),
    ));
    let lateness: Arc<Mutex<Vec<Duration>>> = Default::default();
    let mut round = 0;
    let mut group = c.benchmark_group("retry_tiers");
    group.sample_size(10);
    group.throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("retries_1s_after_a_503", |b| {
        b.to_async(&rt).iter_custom(|iters| {
            let (client, api, arrivals, lateness) = (client.clone(), api.clone(), arrivals.clone(), lateness.clone());
            round += 1;
            let this_round = round;
            async move {
                let mut total = Duration::ZERO;
                for i in 0..iters {
                    let prefix = format!("r{this_round}-{i}-");
                    for chunk in (0..EVENTS).collect::<Vec<_>>().chunks(500) {
                        let events: Vec<_> = chunk
                            .iter()
                            .map(|n| serde_json::json!({ "id": format!("{prefix}{n}"), "type": "T", "data": n }))
                            .collect();
                        post(&client, format!("{api}/v1/events/batch"), serde_json::Value::Array(events)).await;
                    }
                    let deadline = Instant::now() + Duration::from_secs(60);
                    let pairs = loop {
                        let pairs: Vec<(Instant, Instant)> = arrivals
                            .lock()
                            .unwrap()
                            .iter()
                            .filter(|(id, t)| id.starts_with(&prefix) && t.len() >= 2)
                            .map(|(_, t)| (t[0], t[1]))
                            .collect();
                        if pairs.len() == EVENTS {
                            break pairs;
                        }
                        if Instant::now() >= deadline {
                            panic!("retries did not all arrive: {}", missing(&arrivals, &prefix, &client, &api).await);
                        }
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    };
                    let first_due = pairs.iter().map(|(a, _)| *a + INTERVAL).min().unwrap();
                    let last = pairs.iter().map(|(_, b)| *b).max().unwrap();
                    total += last.saturating_duration_since(first_due);
                    lateness
                        .lock()
                        .unwrap()
                        .extend(pairs.iter().map(|(a, b)| b.saturating_duration_since(*a + INTERVAL)));
                }
                total
            }
        })
    });
    group.finish();
    let mut late = lateness.lock().unwrap().clone();
    late.sort();
    if !late.is_empty() {
        let q = |p: f64| late[((late.len() - 1) as f64 * p) as usize];
        println!(
            "retry lateness against schedule over {} retries: p50 {:?}, p99 {:?}, max {:?} (allowed: max(1 s, 10 %))",
            late.len(),
            q(0.5),
            q(0.99),
            late[late.len() - 1]
        );
    }
    rt.block_on(herald.stop());
}

criterion_group!(benches, tiers);
criterion_main!(benches);
