//! The fault-injection suite: a steady stream of events while Herald is SIGKILLed at random
//! moments and restarted, receivers go down and come back, and segments roll constantly (on
//! Kafka: one of two processes is killed). At the end every acknowledged event must have
//! reached every subscription: the verifying sink counts each (path, event id), and any loss
//! fails the run.

use crate::generate::{self, Load};
use crate::scenario::{free_port, ready, Herald, Options, TOKEN};
use crate::sink::{Behaviour, Sink};
use anyhow::Context;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Subscriptions the events fan out to.
const SUBSCRIPTIONS: u64 = 4;

/// How a chaos run goes.
#[derive(Debug, Clone)]
pub struct Chaos {
    /// How long faults are injected.
    pub duration: Duration,
    /// Events per second published meanwhile.
    pub rate: u64,
    /// A fault every this many milliseconds, at random within the range.
    pub every_ms: (u64, u64),
    /// Segment size of the embedded log (small, so segments roll all the time).
    pub segment_bytes: u64,
    /// Random seed (the faults' timing and choice).
    pub seed: u64,
}

/// What survived.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ChaosReport {
    /// `embedded` or `kafka`.
    pub backend: String,
    /// Seconds of faults.
    pub seconds: f64,
    /// Processes SIGKILLed (and restarted).
    pub kills: u32,
    /// Receiver outages.
    pub outages: u32,
    /// Events acknowledged (202).
    pub events: u64,
    /// (subscription, event) pairs that must arrive.
    pub expected: u64,
    /// Pairs that arrived.
    pub delivered: u64,
    /// Pairs that never arrived: must be 0.
    pub lost: u64,
    /// Arrivals beyond the first.
    pub duplicates: u64,
    /// Signatures that did not verify: must be 0.
    pub bad_signatures: u64,
    /// Seconds the drain after the faults took.
    pub drain_seconds: f64,
}

/// Runs the suite against `opts.herald` (on `opts.kafka` with two processes, else embedded).
pub async fn run(opts: &Options, chaos: &Chaos) -> anyhow::Result<ChaosReport> {
    let secret = "whsec_Y2hhb3Mtc2VjcmV0LWZvci1oZXJhbGQtZmF1bHRz";
    let sink = Arc::new(Sink::start("127.0.0.1:0".parse()?, Some(secret), Behaviour::default()).await?);
    let mut rng = StdRng::seed_from_u64(chaos.seed);
    let prefix = format!("herald.chaos.{}.{}.", std::process::id(), chaos.seed);
    let segment = chaos.segment_bytes.to_string();
    let env = [("HERALD_LOG_SEGMENT_BYTES", segment.as_str()), ("HERALD_LOG_FLUSH_INTERVAL", "50ms")];
    let processes = if opts.kafka.is_some() { 2 } else { 1 };
    let mut nodes = Vec::new();
    for _ in 0..processes {
        let (dir, port) = (tempfile::tempdir()?, free_port()?);
        let herald = Herald::spawn_with(opts, dir.path(), port, &prefix, &env)?;
        ready(&herald.url).await?;
        nodes.push((dir, port, herald));
    }
    let url = nodes[0].2.url.clone();
    let paths: Vec<String> = (0..SUBSCRIPTIONS).map(|i| format!("/chaos/s{i}")).collect();
    for path in &paths {
        let sub = serde_json::json!({
            "url": format!("http://{}{path}", sink.addr), "secret": secret,
            // Patient enough that nothing is dead-lettered during the run.
            "retry": { "policy": "fixed", "interval": "250ms", "max_attempts": 1000 },
        });
        herald_client::Client::new(&url, TOKEN).create_subscription(&sub).await?;
    }
    let load = Load {
        server: url.clone(),
        token: TOKEN.into(),
        rate: chaos.rate,
        events: None,
        duration: Some(chaos.duration),
        batch: (chaos.rate / 20).clamp(1, 50),
        concurrency: 4,
        size: 256,
        random_pad: false,
        tenants: 0,
        keys: 0,
        id_prefix: format!("chaos-{}", chaos.seed),
        event_type: "Chaos".into(),
        progress: false,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(generate::run(load.clone(), stop.clone()));
    let started = Instant::now();
    let (mut kills, mut outages) = (0u32, 0u32);
    while started.elapsed() < chaos.duration {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(chaos.every_ms.0..=chaos.every_ms.1))).await;
        if rng.gen_bool(0.7) {
            // SIGKILL a process at a random moment, and start it again on the same data.
            let i = rng.gen_range(0..nodes.len());
            let (dir, port, herald) = &mut nodes[i];
            herald.kill();
            *herald = Herald::spawn_with(opts, dir.path(), *port, &prefix, &env)?;
            ready(&herald.url).await.context("restarting after a kill")?;
            kills += 1;
        } else {
            // Every receiver answers 503 for a while, then comes back.
            let down = Duration::from_millis(rng.gen_range(300..2000));
            let now = sink.age();
            sink.behave(Behaviour { outages: vec![(now, now + down)], ..Behaviour::default() });
            outages += 1;
        }
    }
    let load_report = generator.await??;
    stop.store(true, Ordering::Relaxed);
    // Drain: wait until every acknowledged event arrived everywhere, or nothing moves for a while.
    let drain_started = Instant::now();
    let expected = load_report.accepted * SUBSCRIPTIONS;
    let (mut last, mut since) = (sink.distinct(), Instant::now());
    while sink.distinct() < expected && since.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sink.distinct() != last {
            (last, since) = (sink.distinct(), Instant::now());
        }
    }
    let ids: Vec<String> = (0..load_report.accepted).map(|n| format!("{}-{n}", load.id_prefix)).collect();
    let lost =
        paths.iter().flat_map(|p| ids.iter().map(move |id| (p, id))).filter(|(p, id)| !sink.arrived(p, id)).count();
    let got = sink.report();
    for (dir, _, _) in &nodes {
        let _ = std::fs::remove_file(crate::scenario::log_path(dir.path()));
    }
    drop(nodes);
    Ok(ChaosReport {
        backend: if opts.kafka.is_some() { "kafka" } else { "embedded" }.into(),
        seconds: chaos.duration.as_secs_f64(),
        kills,
        outages,
        events: load_report.accepted,
        expected,
        delivered: expected - lost as u64,
        lost: lost as u64,
        duplicates: got.duplicates,
        bad_signatures: got.bad_signatures,
        drain_seconds: drain_started.elapsed().as_secs_f64(),
    })
}

/// The report as lines for people.
pub fn summary(r: &ChaosReport) -> String {
    format!(
        "chaos ({}): {:.0} s of faults, {} kills, {} receiver outages; {} events acknowledged, {} deliveries \
         expected, {} delivered, {} lost, {} duplicates, {} bad signatures; drained in {:.1} s",
        r.backend,
        r.seconds,
        r.kills,
        r.outages,
        r.events,
        r.expected,
        r.delivered,
        r.lost,
        r.duplicates,
        r.bad_signatures,
        r.drain_seconds
    )
}
