//! `herald-history`: the delivery history at scale. `fill` writes millions of attempts (and
//! their events) into a data directory's history index the way Herald indexes them, spread
//! over the last days; `query` then times `GET /v1/attempts?event=` and
//! `?subscription=&limit=100` against a Herald serving that directory, and reports bytes on
//! disk per attempt.

use clap::{Parser, Subcommand};
use herald::history::{AttemptRecord, EventRecord, HistoryRecord, Index, State};
use herald::log::LogRecord;
use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(about = "Fill a history index with millions of attempts, then time queries against it")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// What `fill` writes and `query` must be told again: how many attempts, over how many
/// subscriptions and tenants.
#[derive(clap::Args, Clone, Copy)]
struct Shape {
    /// Attempts in all; every event has two (a failure, then the delivery).
    #[arg(long, default_value_t = 10_000_000)]
    attempts: u64,
    /// Subscriptions they are spread over.
    #[arg(long, default_value_t = 1000)]
    subscriptions: u64,
    /// Tenants the subscriptions belong to.
    #[arg(long, default_value_t = 10)]
    tenants: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Writes attempts into `<data-dir>/history` (Herald must not be running on it).
    Fill {
        #[arg(long)]
        data_dir: PathBuf,
        #[command(flatten)]
        shape: Shape,
        /// Days the attempts are spread over, ending now.
        #[arg(long, default_value_t = 7)]
        days: i64,
    },
    /// Times queries against a Herald serving a filled directory.
    Query {
        #[arg(long)]
        server: String,
        #[arg(long)]
        token: String,
        #[arg(long)]
        data_dir: PathBuf,
        /// What `fill` was given.
        #[command(flatten)]
        shape: Shape,
        /// Requests of each kind.
        #[arg(long, default_value_t = 1000)]
        requests: usize,
    },
}

/// The subscription, tenant and time of event `n`, fixed by `n`, so `query` knows what
/// `fill` wrote.
fn layout(n: u64, shape: Shape) -> (String, String) {
    let sub = n % shape.subscriptions;
    (format!("sub_bench_{sub:05}"), format!("ten_bench_{:03}", sub % shape.tenants))
}

fn fill(dir: &Path, shape: Shape, days: i64) -> anyhow::Result<()> {
    let attempts = shape.attempts;
    let index = Index::open(&dir.join("history"), Duration::from_secs(14 * 86_400))?;
    let events = attempts / 2;
    let now = herald::model::now_ms();
    let span = days * 86_400_000;
    let started = Instant::now();
    const BATCH: u64 = 20_000;
    let body = herald::model::Response {
        status: 200,
        headers: vec![("content-type".into(), "text/plain".into())],
        body: bytes::Bytes::from_static(b"ok"),
    };
    let mut n = 0;
    let mut topic_bytes = 0u64;
    while n < events {
        let mut records = Vec::with_capacity(BATCH as usize * 3);
        for e in n..(n + BATCH / 2).min(events) {
            let (sub, tenant) = layout(e, shape);
            // Oldest first, as they would arrive.
            let accepted = now - span + (span * e as i64) / events as i64;
            let id = format!("evt_bench_{e:09}");
            let data = bytes::Bytes::from(format!(
                r#"{{"order":{e},"total":129.5,"currency":"EUR","lines":[{{"sku":"A-1","qty":2}}]}}"#
            ));
            let event = HistoryRecord::Event(EventRecord {
                id: id.clone(),
                tenant: tenant.clone(),
                event_type: "order.created".into(),
                accepted_ms: accepted,
                subscriptions: vec![sub.clone()],
                data,
                changes: None,
                ordering_key: None,
                seq: e,
            });
            records.push(event.encode());
            for (attempt, (status, state)) in
                [(503u16, State::Retrying), (200, State::Delivered)].into_iter().enumerate()
            {
                let at = accepted + 5 + attempt as i64 * 5000;
                let failed = status != 200;
                let rec = HistoryRecord::Attempt(AttemptRecord {
                    id: herald::model::new_id("att"),
                    event_id: id.clone(),
                    subscription: sub.clone(),
                    tenant: tenant.clone(),
                    event_type: "order.created".into(),
                    attempt: attempt as u32 + 1,
                    accepted_ms: accepted,
                    at_ms: at,
                    duration_ms: 12,
                    outcome: if failed { "failed".into() } else { "delivered".into() },
                    status: Some(status),
                    error: failed.then(|| "receiver answered 503 Service Unavailable".into()),
                    response: Some(herald::model::Response { status, ..body.clone() }),
                    state,
                    next_ms: failed.then_some(at + 5000),
                    ordering_key: None,
                });
                records.push(rec.encode());
            }
        }
        topic_bytes += records.iter().map(|r| r.len() as u64 + 20).sum::<u64>();
        let records: Vec<LogRecord> = records
            .into_iter()
            .map(|value| LogRecord { partition: 0, offset: 0, timestamp_ms: now, key: bytes::Bytes::new(), value })
            .collect();
        // A partition number Herald never reads, so its own offsets stay untouched.
        index.apply(u32::MAX - 1, &records, 0, now)?;
        n += BATCH / 2;
        if n % 500_000 < BATCH / 2 {
            eprintln!("{} attempts, {:.0}/s", n * 2, (n * 2) as f64 / started.elapsed().as_secs_f64());
        }
    }
    index.flush()?;
    drop(index);
    println!(
        "{{\"attempts\": {}, \"events\": {events}, \"seconds\": {:.1}, \"topic_bytes_per_attempt\": {:.0}}}",
        events * 2,
        started.elapsed().as_secs_f64(),
        topic_bytes as f64 / (events * 2) as f64
    );
    Ok(())
}

fn du(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = e.metadata() else { continue };
            total += if meta.is_dir() { du(&e.path()) } else { meta.len() };
        }
    }
    total
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

async fn query(server: &str, token: &str, dir: &Path, shape: Shape, requests: usize) -> anyhow::Result<()> {
    let attempts = shape.attempts;
    use http_body_util::{BodyExt, Empty};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let events = attempts / 2;
    let mut report = serde_json::Map::new();
    for kind in ["event", "subscription"] {
        let mut times = Vec::with_capacity(requests);
        let mut found = 0usize;
        for _ in 0..requests {
            let e = rng.gen_range(0..events);
            let (sub, tenant) = layout(e, shape);
            let path = match kind {
                "event" => format!("/v1/attempts?event=evt_bench_{e:09}&tenant={tenant}"),
                _ => format!("/v1/attempts?subscription={sub}&tenant={tenant}&limit=100"),
            };
            let req = http::Request::get(format!("{server}{path}"))
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::new())?;
            let start = Instant::now();
            let resp = client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            times.push(start.elapsed());
            anyhow::ensure!(status == 200, "{path}: {status}");
            let page: serde_json::Value = serde_json::from_slice(&body)?;
            found += page["items"].as_array().map_or(0, Vec::len);
        }
        times.sort();
        let expected = if kind == "event" { 2 * requests } else { 100 * requests };
        report.insert(
            kind.into(),
            serde_json::json!({
                "requests": requests,
                "items_per_request": found as f64 / requests as f64,
                "complete": found == expected,
                "p50_ms": percentile(&times, 0.50),
                "p99_ms": percentile(&times, 0.99),
                "max_ms": percentile(&times, 1.0),
            }),
        );
    }
    let bytes = du(&dir.join("history"));
    report.insert("bytes_on_disk".into(), bytes.into());
    report.insert("bytes_per_attempt".into(), (bytes as f64 / attempts as f64).round().into());
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Fill { data_dir, shape, days } => fill(&data_dir, shape, days),
        Command::Query { server, token, data_dir, shape, requests } => {
            query(&server, &token, &data_dir, shape, requests).await
        }
    }
}
