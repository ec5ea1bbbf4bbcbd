//! `herald-sink`: a webhook receiver that verifies every signature, counts each event id's
//! arrivals (for loss and duplicates) and reports throughput; it can answer slowly, fail a
//! share of requests, and go down on a schedule.

use clap::Parser;
use herald_load_tests::sink::{Behaviour, Sink};
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Parser, Clone)]
#[command(about = "Webhook receiver that verifies, counts and reports")]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// Standard Webhooks secret (`whsec_…`) to verify signatures with.
    #[arg(long)]
    secret: Option<String>,
    /// Stop after this many distinct (path, event id) pairs and print a summary.
    #[arg(long)]
    expect: Option<u64>,
    /// Answer latency range in milliseconds, e.g. `20-100`.
    #[arg(long, value_parser = parse_range)]
    latency_ms: Option<(u64, u64)>,
    /// Fraction of requests to fail, 0..1.
    #[arg(long, default_value_t = 0.0)]
    failure_ratio: f64,
    /// Statuses failures are answered with.
    #[arg(long, value_delimiter = ',', default_value = "500,503")]
    failure_status: Vec<u16>,
    /// Outages, seconds after start, e.g. `10-20,40-45`: every request gets 503.
    #[arg(long, value_delimiter = ',', value_parser = parse_range)]
    outage: Vec<(u64, u64)>,
    /// Print every request (request line, headers, body) to stdout as it arrives.
    #[arg(long)]
    print: bool,
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (a, b) = s.split_once('-').ok_or("expected FROM-TO")?;
    Ok((a.trim().parse().map_err(|_| "not a number")?, b.trim().parse().map_err(|_| "not a number")?))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let behaviour = Behaviour {
        latency_ms: args.latency_ms.unwrap_or((0, 0)),
        failure_ratio: args.failure_ratio,
        failure_statuses: args.failure_status.clone(),
        outages: args.outage.iter().map(|&(a, b)| (Duration::from_secs(a), Duration::from_secs(b))).collect(),
        only_prefix: None,
        print: args.print,
    };
    let sink = Sink::start(args.listen, args.secret.as_deref(), behaviour).await?;
    eprintln!("herald-sink listening on http://{}", sink.addr);
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(5)).await;
        let distinct = sink.distinct();
        let now = sink.requests();
        if now / 10_000 != last / 10_000 {
            eprintln!("{now:>10} requests, {distinct:>10} distinct");
        }
        last = now;
        if args.expect.is_some_and(|n| distinct >= n) {
            break;
        }
    }
    let report = sink.report();
    let summary = serde_json::json!({
        "requests": report.requests,
        "distinct": report.distinct,
        "duplicates": report.duplicates,
        "bad_signatures": report.bad_signatures,
        "failures_sent": report.failures_sent,
        "seconds": report.seconds,
        "deliveries_per_second": report.deliveries_per_second,
    });
    println!("{summary}");
    Ok(())
}
