//! The scenario runner: starts a `herald serve` child process and a verifying sink, creates
//! subscriptions, drives load through the generator while the sink misbehaves as the
//! scenario says (or Herald is killed), waits until every delivery arrived or progress stops,
//! and reports.

use crate::generate::{self, Load};
use crate::report::{Percentiles, Report, Second};
use crate::sink::{Behaviour, Sink};
use anyhow::Context;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The scenarios.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// A fixed rate to healthy endpoints.
    Steady,
    /// As fast as Herald accepts, then drain.
    Burst,
    /// Every endpoint answers after 20–100 ms.
    Slow,
    /// 20 % of requests fail with 500 or 503 and are retried.
    Failing,
    /// Half the endpoints are down for a while, then back.
    Outage,
    /// Herald is SIGKILLed mid-run and restarted on the same data.
    Sigkill,
}

impl Scenario {
    /// Every scenario, in the order they run.
    pub const ALL: [Scenario; 6] =
        [Scenario::Steady, Scenario::Burst, Scenario::Slow, Scenario::Failing, Scenario::Outage, Scenario::Sigkill];

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Steady => "steady",
            Scenario::Burst => "burst",
            Scenario::Slow => "slow",
            Scenario::Failing => "failing",
            Scenario::Outage => "outage",
            Scenario::Sigkill => "sigkill",
        }
    }

    /// A scenario by name.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name() == name)
    }

    fn description(self, p: &Plan) -> String {
        let pace = if p.rate == 0 { "as fast as accepted".to_string() } else { format!("{} events/s", p.rate) };
        let what = match self {
            Scenario::Steady => "healthy endpoints",
            Scenario::Burst => "healthy endpoints, then drain",
            Scenario::Slow => "every endpoint answers after 20–100 ms",
            Scenario::Failing => "20 % of requests answered 500 or 503, retried",
            Scenario::Outage => "half the endpoints answer 503 for a third of the run, then recover",
            Scenario::Sigkill => "Herald SIGKILLed halfway and restarted on the same data",
        };
        let amount = match (p.events, p.duration) {
            (Some(n), _) => format!("{n} events"),
            (None, Some(d)) => format!("{} s", d.as_secs_f64()),
            _ => String::new(),
        };
        format!("{amount} at {pace} to {SUBSCRIPTIONS} subscriptions, {} B events: {what}", p.size)
    }
}

/// Subscriptions every event fans out to.
pub const SUBSCRIPTIONS: u64 = 8;

/// How much load a scenario puts on.
struct Plan {
    rate: u64,
    events: Option<u64>,
    duration: Option<Duration>,
    size: usize,
}

fn plan(s: Scenario, short: bool, rate_override: Option<u64>) -> Plan {
    let secs = |full: u64, brief: u64| Some(Duration::from_secs(if short { brief } else { full }));
    let mut p = match s {
        Scenario::Steady => {
            Plan { rate: if short { 500 } else { 2000 }, events: None, duration: secs(60, 3), size: 1024 }
        }
        Scenario::Burst => {
            Plan { rate: 0, events: Some(if short { 4000 } else { 100_000 }), duration: None, size: 1024 }
        }
        Scenario::Slow => Plan { rate: if short { 200 } else { 500 }, events: None, duration: secs(30, 3), size: 1024 },
        Scenario::Failing => {
            Plan { rate: if short { 300 } else { 1000 }, events: None, duration: secs(30, 3), size: 1024 }
        }
        Scenario::Outage => {
            Plan { rate: if short { 300 } else { 1000 }, events: None, duration: secs(45, 3), size: 1024 }
        }
        Scenario::Sigkill => {
            Plan { rate: if short { 300 } else { 1000 }, events: None, duration: secs(30, 4), size: 1024 }
        }
    };
    if let Some(r) = rate_override {
        p.rate = r;
    }
    p
}

/// How to run scenarios.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The `herald` binary.
    pub herald: PathBuf,
    /// Seconds-long forms for CI.
    pub short: bool,
    /// Kafka bootstrap brokers; the embedded log when `None`.
    pub kafka: Option<String>,
    /// Events per second instead of the scenario's own.
    pub rate: Option<u64>,
    /// Events per publish request instead of the scenario's own (1 = single events).
    pub batch: Option<u64>,
    /// Publish requests in flight at once.
    pub concurrency: Option<u64>,
    /// Show the generator's progress bar.
    pub progress: bool,
}

/// Where a scenario's Herald writes its log (warnings and errors).
pub(crate) fn log_path(data_dir: &std::path::Path) -> std::path::PathBuf {
    data_dir.with_extension("herald.log")
}

/// One Herald child process.
pub(crate) struct Herald {
    child: std::process::Child,
    pub(crate) url: String,
}

pub(crate) const TOKEN: &str = "scenario-admin-token-0123456789";

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Herald {
    fn spawn(opts: &Options, dir: &std::path::Path, port: u16, prefix: &str) -> anyhow::Result<Herald> {
        Self::spawn_with(opts, dir, port, prefix, &[])
    }

    /// Starts `herald serve` with `env` on top of the scenario settings.
    pub(crate) fn spawn_with(
        opts: &Options,
        dir: &std::path::Path,
        port: u16,
        prefix: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Herald> {
        let mut cmd = std::process::Command::new(&opts.herald);
        cmd.args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
            .arg(dir)
            .env("HERALD_ADMIN_TOKEN", TOKEN)
            .env("HERALD_NETWORK_ALLOW", "127.0.0.0/8")
            .env("HERALD_HEALTH_BREAKER_PAUSE", "500ms")
            .env("HERALD_HEALTH_BREAKER_MAX_PAUSE", "2s")
            .env("HERALD_LOG_TOPIC_PREFIX", prefix)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            // Kept beside the data (appended across restarts), for a run that falls short.
            .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log_path(dir))?);
        if let Some(brokers) = &opts.kafka {
            cmd.env("HERALD_LOG_BACKEND", "kafka")
                .env("HERALD_LOG_BROKERS", brokers)
                .env("HERALD_LOG_REPLICATION", "1");
        }
        cmd.envs(env.iter().copied());
        let child = cmd.spawn().with_context(|| format!("starting {}", opts.herald.display()))?;
        Ok(Herald { child, url: format!("http://127.0.0.1:{port}") })
    }

    /// Herald's `/metrics` text.
    async fn metrics(&self) -> Option<String> {
        match herald_client::Client::new(&self.url, TOKEN).send(http::Method::GET, "/metrics", None).await {
            Ok(serde_json::Value::String(text)) => Some(text),
            _ => None,
        }
    }

    /// What Herald reports when deliveries are missing: its lag, breakers, dead letters and
    /// deliveries by outcome, and the last warnings it logged.
    async fn diagnose(&self, dir: &std::path::Path) -> String {
        let mut out = String::new();
        if let Some(metrics) = self.metrics().await {
            let wanted = [
                "herald_consumer_lag",
                "herald_circuit_breakers_open",
                "herald_deliveries_total",
                "herald_dead_letters_total",
                "herald_in_flight",
            ];
            for line in metrics.lines().filter(|l| wanted.iter().any(|w| l.starts_with(w)) && !l.ends_with(" 0")) {
                out.push_str(line);
                out.push('\n');
            }
        }
        let log = std::fs::read_to_string(log_path(dir)).unwrap_or_default();
        let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN") || l.contains("ERROR")).collect();
        for line in &warnings[warnings.len().saturating_sub(20)..] {
            out.push_str(line);
            out.push('\n');
        }
        out
    }

    /// Peak resident memory so far, MiB (Linux).
    fn peak_rss_mib(&self) -> Option<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb / 1024.0)
    }

    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until Herald answers `/readyz` and owns every partition (on Kafka the group takes a
/// few seconds to assign them).
pub(crate) async fn ready(url: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let client = herald_client::Client::new(url, TOKEN);
        if client.send(http::Method::GET, "/readyz", None).await.is_ok() {
            if let Ok(serde_json::Value::String(metrics)) = client.send(http::Method::GET, "/metrics", None).await {
                let owned = metrics
                    .lines()
                    .find_map(|l| l.strip_prefix("herald_partitions_owned "))
                    .and_then(|v| v.trim().parse::<f64>().ok())
                    .unwrap_or(0.0);
                if owned > 0.0 {
                    return Ok(());
                }
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "herald at {url} did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What the machine pushes over loopback HTTP at all: 1 KB POSTs straight into a sink, 64
/// in flight, for `secs` seconds. Requests per second.
pub async fn baseline(secs: f64) -> anyhow::Result<f64> {
    let sink = Sink::start("127.0.0.1:0".parse()?, None, Behaviour::default()).await?;
    let url = format!("http://{}/baseline", sink.addr);
    let body = bytes::Bytes::from(format!("{{\"id\":\"x\",\"data\":{{\"pad\":\"{}\"}}}}", "x".repeat(1000)));
    let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(128)
            .build_http();
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (client, url, body) = (client.clone(), url.clone(), body.clone());
            tokio::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < until {
                    let req = http::Request::post(&url).body(http_body_util::Full::new(body.clone())).expect("request");
                    if let Ok(resp) = client.request(req).await {
                        let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Runs one scenario and reports; `baseline` is the machine's HTTP baseline of this run.
pub async fn run(s: Scenario, opts: &Options, baseline: Option<f64>) -> anyhow::Result<Report> {
    let p = plan(s, opts.short, opts.rate);
    let secret = "whsec_c2NlbmFyaW8tc2VjcmV0LWZvci1oZXJhbGQtbG9hZA==";
    let behaviour = match s {
        Scenario::Slow => Behaviour { latency_ms: (20, 100), ..Behaviour::default() },
        Scenario::Failing => Behaviour { failure_ratio: 0.2, failure_statuses: vec![500, 503], ..Behaviour::default() },
        _ => Behaviour::default(),
    };
    let sink = Sink::start("127.0.0.1:0".parse()?, Some(secret), behaviour).await?;
    let dir = tempfile::tempdir()?;
    let port = free_port()?;
    // A fresh topic prefix per run, so runs sharing a Kafka cluster never see each other.
    let prefix = format!("herald.{}.{}.{}.", s.name(), std::process::id(), port);
    let mut herald = Herald::spawn(opts, dir.path(), port, &prefix)?;
    ready(&herald.url).await?;
    for i in 0..SUBSCRIPTIONS {
        let sub = serde_json::json!({
            "url": format!("http://{}{}/s{i}", sink.addr, if s == Scenario::Outage && i < SUBSCRIPTIONS / 2 { "/down" } else { "" }),
            "secret": secret,
            "retry": { "policy": "exponential", "initial": "200ms", "multiplier": 2.0, "max_interval": "2s", "max_attempts": 100 },
        });
        herald_client::Client::new(&herald.url, TOKEN).create_subscription(&sub).await?;
    }
    let run_time = p.duration.unwrap_or(Duration::from_secs(10));
    if let Some(events) = p.events.or(p.duration.map(|d| p.rate * d.as_secs())) {
        sink.expect(events * SUBSCRIPTIONS);
    }
    if s == Scenario::Outage {
        let third = run_time / 3;
        // The endpoints of the first half of the subscriptions (under /down/) go away.
        sink.behave(Behaviour {
            outages: vec![(third, third * 2)],
            only_prefix: Some("/down/".into()),
            ..Behaviour::default()
        });
    }
    let load = Load {
        server: herald.url.clone(),
        token: TOKEN.into(),
        rate: p.rate,
        events: p.events,
        duration: p.duration,
        batch: opts.batch.unwrap_or(if p.rate == 0 { 100 } else { (p.rate / 20).clamp(1, 100) }).max(1),
        concurrency: opts.concurrency.unwrap_or(8).max(1),
        size: p.size,
        random_pad: false,
        tenants: 0,
        keys: 0,
        id_prefix: format!("{}-{}", s.name(), std::process::id()),
        event_type: "LoadTest".into(),
        progress: opts.progress,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let generator = tokio::spawn(generate::run(load, stop.clone()));
    if s == Scenario::Sigkill {
        tokio::time::sleep(run_time / 2).await;
        herald.kill();
        herald = Herald::spawn(opts, dir.path(), port, &prefix)?;
        ready(&herald.url).await?;
    }
    let load = generator.await??;
    // Wait for every delivery, or until nothing has arrived for a while.
    let expected = load.accepted * SUBSCRIPTIONS;
    let patience = Duration::from_secs(if opts.short { 30 } else { 60 });
    let (mut last, mut since) = (sink.distinct(), Instant::now());
    while sink.distinct() < expected && since.elapsed() < patience {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = sink.distinct();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let rss = herald.peak_rss_mib();
    let diagnosis = if sink.distinct() < expected { Some(herald.diagnose(dir.path()).await) } else { None };
    let mut stages: Vec<_> =
        crate::stages::of_samples("publish round trip: request sent → 202 (generator)", &load.publish_us)
            .into_iter()
            .collect();
    stages.extend(herald.metrics().await.map(|m| crate::stages::of_herald(&m)).unwrap_or_default());
    drop(herald);
    let _ = std::fs::remove_file(log_path(dir.path()));
    let got = sink.report();
    let first = got.timeline.iter().position(|s| s.1 > 0).unwrap_or(0);
    // The generator started after Herald was ready; shift its timeline onto the sink's clock.
    let shift = got.timeline.len().saturating_sub(load.timeline.len()).min(first);
    let timeline = (0..got.timeline.len().max(load.timeline.len() + shift))
        .map(|t| {
            let d = got.timeline.get(t).copied().unwrap_or((t as u64, 0, 0, 0));
            Second {
                t: t as u64,
                accepted: t.checked_sub(shift).and_then(|i| load.timeline.get(i)).copied().unwrap_or(0),
                delivered: d.1,
                p50_ms: d.2,
                p99_ms: d.3,
            }
        })
        .collect();
    // Over the span deliveries took, first to last (whole seconds counted one too many).
    let deliveries_per_second = got.deliveries_per_second;
    Ok(Report {
        scenario: s.name().into(),
        description: s.description(&p),
        backend: if opts.kafka.is_some() { "kafka" } else { "embedded" }.into(),
        subscriptions: SUBSCRIPTIONS,
        events_accepted: load.accepted,
        events_per_second: load.events_per_second,
        deliveries_expected: expected,
        deliveries: got.distinct,
        deliveries_per_second,
        latency_ms: Percentiles::of(&got.latencies_ms),
        lost: expected.saturating_sub(got.distinct),
        duplicates: got.duplicates,
        bad_signatures: got.bad_signatures,
        failures_sent: got.failures_sent,
        retried_batches: load.retried_batches,
        baseline_requests_per_second: baseline,
        ratio_to_baseline: baseline.map(|b| deliveries_per_second / b),
        herald_peak_rss_mib: rss,
        diagnosis,
        stages,
        timeline,
    })
}
