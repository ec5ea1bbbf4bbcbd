//! `herald-load`: publishes events through the batch API at a target rate or as fast as the
//! server takes them, for a count or a duration, and reports accepted events per second.

use clap::Parser;
use herald_load_tests::direct;
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
    /// Pad each event with random letters and digits of its own (incompressible) instead of
    /// a run of `x` shared by all.
    #[arg(long)]
    random_pad: bool,
    /// Event type.
    #[arg(long, default_value = "LoadTest")]
    event_type: String,
    /// Spread events over this many tenants (t0, t1, ...); 0 = the default tenant.
    #[arg(long, default_value_t = 0)]
    tenants: u32,
    /// Give events an `ordering_key` out of this many (k0, k1, ...); 0 = none.
    #[arg(long, default_value_t = 0)]
    keys: u32,
    /// Append delivery records straight to Kafka at these brokers, bypassing the API.
    #[arg(long, conflicts_with = "direct_embedded")]
    direct_kafka: Option<String>,
    /// Append delivery records into a *stopped* Herald's data directory (builds a backlog).
    #[arg(long)]
    direct_embedded: Option<std::path::PathBuf>,
    /// Direct mode: subscription ids to fan out to (tenant `default`); by default every
    /// subscription the server at --server lists.
    #[arg(long, value_delimiter = ',')]
    subscription: Vec<String>,
    /// Direct mode: topic prefix and partitions of Herald's log.
    #[arg(long, default_value = "herald.")]
    topic_prefix: String,
    /// See `--topic-prefix`.
    #[arg(long, default_value_t = 8)]
    partitions: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let target = match (&args.direct_kafka, &args.direct_embedded) {
        (Some(b), _) => Some(direct::Target::Kafka(b.clone())),
        (_, Some(d)) => Some(direct::Target::Embedded(d.clone())),
        _ => None,
    };
    if let Some(target) = target {
        let subs = if args.subscription.is_empty() {
            list_subscriptions(&args.server, &args.token).await?
        } else {
            args.subscription.iter().map(|id| (id.clone(), "default".to_string())).collect()
        };
        let (log, topics) = direct::open(&target, &args.topic_prefix, args.partitions).await?;
        let events = args.events.unwrap_or(10_000);
        let rate =
            direct::publish(log, &topics.deliveries, &subs, events, args.size, 1000, args.concurrency as usize).await?;
        println!(
            "{}",
            serde_json::json!({ "events": events, "records": events * subs.len() as u64, "records_per_second": rate })
        );
        return Ok(());
    }
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
        random_pad: args.random_pad,
        tenants: args.tenants,
        keys: args.keys,
        id_prefix: format!("load-{}", std::process::id()),
        event_type: args.event_type,
        progress: true,
    };
    let report = run(load, Arc::new(AtomicBool::new(false))).await?;
    println!(
        "{}",
        serde_json::json!({ "accepted": report.accepted, "seconds": report.seconds, "events_per_second": report.events_per_second, "retried_batches": report.retried_batches })
    );
    Ok(())
}

/// Every subscription the server lists, with its tenant.
async fn list_subscriptions(server: &str, token: &str) -> anyhow::Result<Vec<(String, String)>> {
    let client = herald_client::Client::new(server, token);
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let page = client.subscriptions(None, cursor.as_deref()).await?;
        for s in &page.items {
            out.push((
                s["id"].as_str().unwrap_or_default().to_string(),
                s["tenant"].as_str().unwrap_or("default").to_string(),
            ));
        }
        match page.next {
            Some(c) => cursor = Some(c),
            None => return Ok(out),
        }
    }
}
