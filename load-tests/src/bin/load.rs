//! `herald-load`: publishes events through the batch API at a target rate or as fast as the
//! server takes them, for a count or a duration, and reports accepted events per second.

use clap::Parser;
use herald_load_tests::generate::{run, Load};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "Publish events to Herald through the batch API")]
struct Args {
    /// Herald's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Admin token.
    #[arg(long, env = "HERALD_ADMIN_TOKEN")]
    token: String,
    /// Events in all (unless --duration is given).
    #[arg(long)]
    events: Option<u64>,
    /// Publish for this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Events per second (0: as fast as accepted).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Events per batch request.
    #[arg(long, default_value_t = 100)]
    batch: u64,
    /// Batch requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: u64,
    /// Size of each event's `data` in bytes (approximately).
    #[arg(long, default_value_t = 1024)]
    size: usize,
    /// Spread events over this many tenants (t0, t1, ...); 0 = the default tenant.
    #[arg(long, default_value_t = 0)]
    tenants: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let events = match (args.events, args.duration) {
        (None, None) => Some(10_000),
        (e, _) => e,
    };
    let load = Load {
        server: args.server,
        token: args.token,
        rate: args.rate,
        events,
        duration: args.duration.map(Duration::from_secs_f64),
        batch: args.batch,
        concurrency: args.concurrency,
        size: args.size,
        tenants: args.tenants,
        id_prefix: format!("load-{}", std::process::id()),
        progress: true,
    };
    let report = run(load, Arc::new(AtomicBool::new(false))).await?;
    println!(
        "{}",
        serde_json::json!({ "accepted": report.accepted, "seconds": report.seconds, "events_per_second": report.events_per_second, "retried_batches": report.retried_batches })
    );
    Ok(())
}
