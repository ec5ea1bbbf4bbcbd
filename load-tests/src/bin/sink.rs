//! `herald-sink`: a webhook receiver that verifies every signature, counts each event id's
//! arrivals (for loss and duplicates) and reports throughput.

use bytes::Bytes;
use clap::Parser;
use herald_load_tests::verify::Verifier;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
#[command(about = "Webhook receiver that verifies, counts and reports")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Standard Webhooks secret (`whsec_…`) to verify signatures with.
    #[arg(long)]
    secret: Option<String>,
    /// Print every request's headers and body.
    #[arg(long)]
    print: bool,
    /// Stop after this many distinct (path, event id) pairs and print a summary.
    #[arg(long)]
    expect: Option<u64>,
    /// Status code to answer with.
    #[arg(long, default_value_t = 200)]
    status: u16,
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    bad_signatures: AtomicU64,
    ids: Mutex<HashMap<String, u32>>,
    first: Mutex<Option<Instant>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let verifier = match &args.secret {
        Some(s) => Some(Verifier::new(s).ok_or_else(|| anyhow::anyhow!("--secret must be whsec_ followed by base64"))?),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!("herald-sink listening on http://{}", listener.local_addr()?);
    let stats = Arc::new(Stats::default());
    let done = Arc::new(tokio::sync::Notify::new());
    {
        let stats = stats.clone();
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = stats.requests.load(Ordering::Relaxed);
                if now != last {
                    eprintln!("{:>10} requests  {:>8}/s", now, now - last);
                }
                last = now;
            }
        });
    }
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, _) = accepted?;
                let (stats, args, verifier, done) = (stats.clone(), args.clone(), verifier.clone(), done.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (stats, args, verifier, done) = (stats.clone(), args.clone(), verifier.clone(), done.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                            let id = header("webhook-id");
                            if let Some(v) = &verifier {
                                if !v.verify(&id, &header("webhook-timestamp"), &body, &header("webhook-signature")) {
                                    stats.bad_signatures.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            if args.print {
                                println!("POST {}", parts.uri);
                                for (k, v) in &parts.headers {
                                    println!("{k}: {}", v.to_str().unwrap_or("<binary>"));
                                }
                                println!("\n{}\n", String::from_utf8_lossy(&body));
                            }
                            stats.first.lock().unwrap().get_or_insert_with(Instant::now);
                            stats.requests.fetch_add(1, Ordering::Relaxed);
                            let distinct = {
                                let mut ids = stats.ids.lock().unwrap();
                                // One subscription per path: an event id counts once per path.
                                *ids.entry(format!("{}|{id}", parts.uri.path())).or_insert(0) += 1;
                                ids.len() as u64
                            };
                            if args.expect.is_some_and(|n| distinct >= n) {
                                done.notify_one();
                            }
                            let status = StatusCode::from_u16(args.status).unwrap_or(StatusCode::OK);
                            Ok::<_, std::convert::Infallible>(Response::builder().status(status).body(Full::new(Bytes::new())).unwrap())
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(stream), svc).await;
                });
            }
            _ = done.notified() => break,
        }
    }
    let elapsed = stats.first.lock().unwrap().map_or(Duration::ZERO, |f| f.elapsed());
    let ids = stats.ids.lock().unwrap();
    let requests = stats.requests.load(Ordering::Relaxed);
    let summary = serde_json::json!({
        "requests": requests,
        "distinct": ids.len(),
        "duplicates": requests - ids.len() as u64,
        "bad_signatures": stats.bad_signatures.load(Ordering::Relaxed),
        "seconds": elapsed.as_secs_f64(),
        "deliveries_per_second": ids.len() as f64 / elapsed.as_secs_f64().max(1e-9),
    });
    println!("{summary}");
    Ok(())
}
