//! `herald-ideal`: the ceiling an engine with a durable log can approach on this machine — a
//! hyper client that signs each 1 KB body with Standard Webhooks (as Herald does) and POSTs it
//! to a sink over a pool of keep-alive connections. No log, no queue, no retries: the rate of
//! signing and sending alone, measured beside Herald in `scenarios/e2e.sh`.

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Sign and POST webhooks straight to a sink: the ideal loop Herald is measured against")]
struct Args {
    /// Where to POST (a `herald-sink`).
    #[arg(long)]
    url: String,
    /// Standard Webhooks secret (`whsec_…`).
    #[arg(long)]
    secret: String,
    /// Requests in all.
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Connections (and requests in flight).
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Bytes of padding in each event's data (about the body's size).
    #[arg(long, default_value_t = 1024)]
    size: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let signer = Arc::new(
        herald_load_tests::verify::verifier(&args.secret)
            .ok_or_else(|| anyhow::anyhow!("the secret must be whsec_ + base64"))?,
    );
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(args.connections)
        .build_http::<Full<Bytes>>();
    let next = Arc::new(AtomicU64::new(0));
    let pad = "x".repeat(args.size);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.connections {
        let (client, next, signer, url, pad) =
            (client.clone(), next.clone(), signer.clone(), args.url.clone(), pad.clone());
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    return Ok::<(), anyhow::Error>(());
                }
                let id = format!("evt_ideal_{i}");
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
                let body = format!(
                    r#"{{"id":"{id}","event":"LoadTest","tenant":"default","data":{{"n":{i},"pad":"{pad}"}},"deliveryAttempt":1,"pendingRetries":184,"sentMs":{}}}"#,
                    now.as_millis()
                );
                let timestamp = now.as_secs().to_string();
                let signature = format!("v1,{}", signer.sign(&id, &timestamp, body.as_bytes()));
                let req = http::Request::post(&url)
                    .header("content-type", "application/json")
                    .header("webhook-id", &id)
                    .header("webhook-timestamp", &timestamp)
                    .header("webhook-signature", signature)
                    .body(Full::new(Bytes::from(body)))?;
                let resp = client.request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                anyhow::ensure!(status.is_success(), "the sink answered {status}");
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "requests": args.requests, "seconds": seconds, "requests_per_second": args.requests as f64 / seconds })
    );
    Ok(())
}
