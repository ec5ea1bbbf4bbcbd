//! `herald-load`: publishes events through the batch API as fast as the server takes them
//! and reports accepted events per second.

use bytes::Bytes;
use clap::Parser;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Publish events to Herald through the batch API")]
struct Args {
    /// Herald's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Admin token.
    #[arg(long, env = "HERALD_ADMIN_TOKEN")]
    token: String,
    /// Events in all.
    #[arg(long, default_value_t = 10_000)]
    events: u64,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Batch requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u64,
    /// Size of each event's `data` in bytes (approximately).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Event type.
    #[arg(long, default_value = "LoadTest")]
    event_type: String,
    /// Tenant.
    #[arg(long, default_value = "default")]
    tenant: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let run = std::process::id();
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let filler = "x".repeat(args.size.saturating_sub(40));
    let started = Instant::now();
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| {
            let (args, client, next, accepted, filler) =
                (args.clone(), client.clone(), next.clone(), accepted.clone(), filler.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(args.batch, Ordering::Relaxed);
                    if first >= args.events {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let last = (first + args.batch).min(args.events);
                    let events: Vec<_> = (first..last)
                        .map(|i| {
                            serde_json::json!({
                                "id": format!("load-{run}-{i}"), "type": args.event_type, "tenant": args.tenant,
                                "data": { "n": i, "sentMs": chrono_ms(), "pad": filler },
                            })
                        })
                        .collect();
                    let req = Request::post(format!("{}/v1/events/batch", args.server))
                        .header("authorization", format!("Bearer {}", args.token))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(serde_json::to_vec(&events)?)))?;
                    let resp = client.request(req).await?;
                    let status = resp.status();
                    let body = resp.into_body().collect().await?.to_bytes();
                    anyhow::ensure!(status == 202, "batch refused: {status} {}", String::from_utf8_lossy(&body));
                    accepted.fetch_add(last - first, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    let n = accepted.load(Ordering::Relaxed);
    println!("{}", serde_json::json!({ "accepted": n, "seconds": secs, "events_per_second": n as f64 / secs }));
    Ok(())
}

fn chrono_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}
