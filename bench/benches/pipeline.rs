//! The in-process pipeline without the HTTP API in front: delivery records appended to the
//! embedded log → dispatch → Standard Webhooks signing → HTTP POST to a loopback sink that
//! verifies every signature. Measures deliveries per second, with the delivery history kept
//! and without it, in the same run (the history may cost at most a tenth).

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use herald::config::Config;
use herald::log::Record;
use herald::model::Delivery;
use herald_load_tests::sink::{Behaviour, Sink};
use std::time::{Duration, Instant};

const TOKEN: &str = "bench-admin-token-0123456789";
const SECRET: &str = "whsec_YmVuY2gtc2VjcmV0LWZvci1oZXJhbGQtcGlwZWxpbmU=";
const BATCH: usize = 5000;
const SUBS: usize = 8;

fn pipeline(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut group = c.benchmark_group("pipeline");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, retention) in [("log_dispatch_sign_post_1kb", "P14D"), ("log_dispatch_sign_post_1kb_no_history", "0s")] {
        let dir = tempfile::tempdir().unwrap();
        let (herald, sink, subs) = rt.block_on(async {
            let env = vec![
                ("HERALD_ADMIN_TOKEN".to_string(), TOKEN.to_string()),
                ("HERALD_NETWORK_ALLOW".to_string(), "127.0.0.0/8".to_string()),
                ("HERALD_LISTEN".to_string(), "127.0.0.1:0".to_string()),
                ("HERALD_HISTORY_RETENTION".to_string(), retention.to_string()),
            ];
            let mut config = Config::load(None, &env).unwrap();
            config.data_dir = dir.path().to_path_buf();
            let herald = herald::server::start(config).await.unwrap();
            let sink = Sink::start("127.0.0.1:0".parse().unwrap(), Some(SECRET), Behaviour::default()).await.unwrap();
            let mut subs = Vec::new();
            for i in 0..SUBS {
                let body = serde_json::json!({ "url": format!("http://{}/s{i}", sink.addr), "secret": SECRET });
                subs.push(create(herald.addr, body).await);
            }
            (herald, sink, subs)
        });
        let log = herald.log();
        let data = Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(1000)));
        let mut next = 0u64;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let target = sink.distinct() + BATCH as u64;
                        let now = herald::model::now_ms();
                        let records: Vec<Record> = (0..BATCH)
                            .map(|i| {
                                next += 1;
                                let sub = &subs[i % SUBS];
                                let d = Delivery::first_attempt(
                                    format!("evt_bench_{next}"),
                                    sub.clone(),
                                    "default".into(),
                                    "Bench".into(),
                                    data.clone(),
                                    now,
                                );
                                Record { key: Bytes::from(sub.clone()), value: d.encode() }
                            })
                            .collect();
                        let started = Instant::now();
                        for chunk in records.chunks(500) {
                            log.append("herald.deliveries", chunk.to_vec()).await.unwrap();
                        }
                        while sink.distinct() < target {
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                        total += started.elapsed();
                    }
                    total
                })
            })
        });
        let report = sink.report();
        assert_eq!(report.bad_signatures, 0);
        rt.block_on(herald.stop());
    }
    group.finish();
}

async fn create(addr: std::net::SocketAddr, body: serde_json::Value) -> String {
    use http_body_util::BodyExt;
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http();
    let req = http::Request::post(format!("http://{addr}/v1/subscriptions"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let body: serde_json::Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    body["id"].as_str().unwrap().to_string()
}

criterion_group!(benches, pipeline);
criterion_main!(benches);
