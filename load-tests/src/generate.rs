//! The load generator: publishes events through Herald's batch API at a target rate or as
//! fast as it takes them, for a duration or a count. A refused or failed batch is sent again
//! with the same event ids until accepted, so a server restart mid-run loses nothing.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What to publish.
#[derive(Debug, Clone)]
pub struct Load {
    /// Herald's base URL.
    pub server: String,
    /// Bearer token.
    pub token: String,
    /// Events per second in all; 0 = as fast as accepted.
    pub rate: u64,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// Events per batch request.
    pub batch: u64,
    /// Batch requests in flight.
    pub concurrency: u64,
    /// Approximate size of each event's `data`, bytes.
    pub size: usize,
    /// Fill each event's `data` with random letters and digits of its own, which nothing
    /// compresses, instead of one run of `x` shared by all (a compressor's worst and best case).
    pub random_pad: bool,
    /// Tenants the events are spread over (`t0`, `t1`, …), or `default` when 0.
    pub tenants: u32,
    /// Ordering keys the events are spread over (`k0`, `k1`, …, as `ordering_key`), or none when 0.
    pub keys: u32,
    /// Event ids are `<prefix>-<n>`.
    pub id_prefix: String,
    /// Event type.
    pub event_type: String,
    /// Show a progress bar (only on a terminal).
    pub progress: bool,
}

/// What the generator achieved.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoadReport {
    /// Events accepted (202).
    pub accepted: u64,
    /// Batches sent again after an error.
    pub retried_batches: u64,
    /// Seconds from first to last request.
    pub seconds: f64,
    /// Accepted events per second.
    pub events_per_second: f64,
    /// Accepted per second since start.
    pub timeline: Vec<u64>,
    /// Round trip of every accepted publish request (sent → `202`), µs, sorted.
    #[serde(skip)]
    pub publish_us: Vec<u32>,
}

/// How long one batch is retried before the run ends in an error.
const GIVE_UP: Duration = Duration::from_secs(60);

/// Publishes `load`; `stop` ends it early.
pub async fn run(load: Load, stop: Arc<AtomicBool>) -> anyhow::Result<LoadReport> {
    let load = Arc::new(load);
    let client = herald_client::Client::new(&load.server, &load.token);
    let next = Arc::new(AtomicU64::new(0));
    let accepted = Arc::new(AtomicU64::new(0));
    let retried = Arc::new(AtomicU64::new(0));
    let timeline = Arc::new(Mutex::new(Vec::<u64>::new()));
    let round_trips = Arc::new(Mutex::new(Vec::<u32>::new()));
    let filler = Arc::new("x".repeat(load.size.saturating_sub(60)));
    let started = Instant::now();
    let started_ms = crate::sink::now_ms();
    let bar = progress_bar(&load);
    let workers: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (load, client, next, accepted, retried, timeline, round_trips, filler, stop, bar) = (
                load.clone(),
                client.clone(),
                next.clone(),
                accepted.clone(),
                retried.clone(),
                timeline.clone(),
                round_trips.clone(),
                filler.clone(),
                stop.clone(),
                bar.clone(),
            );
            tokio::spawn(async move {
                loop {
                    if stop.load(Ordering::Relaxed) || load.duration.is_some_and(|d| started.elapsed() >= d) {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let first = next.fetch_add(load.batch, Ordering::Relaxed);
                    let Some(last) = batch_end(&load, first) else { return Ok(()) };
                    // An event's `sentMs` is when it was due: paced, its schedule, so that a
                    // publish stalled (every producer waiting on it) shows in the latencies of
                    // the events held up behind it rather than starting their clocks late.
                    let sent_ms = if load.rate > 0 {
                        // Pace: event `first` is due at first / rate seconds.
                        let offset = Duration::from_secs_f64(first as f64 / load.rate as f64);
                        tokio::time::sleep_until((started + offset).into()).await;
                        started_ms + offset.as_millis() as u64
                    } else {
                        crate::sink::now_ms()
                    };
                    let body = batch_body(&load, first, last, &filler, sent_ms);
                    let mut backoff = Duration::from_millis(50);
                    let failing_since = Instant::now();
                    loop {
                        let sent = Instant::now();
                        match send(&client, body.clone()).await {
                            Ok(()) => {
                                let us = sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
                                round_trips.lock().unwrap().push(us);
                                break;
                            }
                            Err(e) => {
                                if stop.load(Ordering::Relaxed) {
                                    return Ok(());
                                }
                                if failing_since.elapsed() > GIVE_UP {
                                    // Herald gone: the run ends with an error rather than never.
                                    return Err(e.context(format!("no batch accepted for {GIVE_UP:?}")));
                                }
                                retried.fetch_add(1, Ordering::Relaxed);
                                warn_now_and_then(&e);
                                tokio::time::sleep(backoff).await;
                                backoff = (backoff * 2).min(Duration::from_secs(1));
                            }
                        }
                    }
                    let n = last - first;
                    accepted.fetch_add(n, Ordering::Relaxed);
                    let second = started.elapsed().as_secs() as usize;
                    {
                        let mut t = timeline.lock().unwrap();
                        if t.len() <= second {
                            t.resize(second + 1, 0);
                        }
                        t[second] += n;
                    }
                    if let Some(bar) = &bar {
                        bar.inc(n);
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await??;
    }
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let seconds = started.elapsed().as_secs_f64();
    let n = accepted.load(Ordering::Relaxed);
    let timeline = timeline.lock().unwrap().clone();
    let mut publish_us = std::mem::take(&mut *round_trips.lock().unwrap());
    publish_us.sort_unstable();
    Ok(LoadReport {
        accepted: n,
        retried_batches: retried.load(Ordering::Relaxed),
        seconds,
        events_per_second: n as f64 / seconds.max(1e-9),
        timeline,
        publish_us,
    })
}

fn batch_end(load: &Load, first: u64) -> Option<u64> {
    match load.events {
        Some(total) if first >= total => None,
        Some(total) => Some((first + load.batch).min(total)),
        None => Some(first + load.batch),
    }
}

fn batch_body(load: &Load, first: u64, last: u64, filler: &str, sent: u64) -> Bytes {
    let events: Vec<_> = (first..last)
        .map(|i| {
            let tenant =
                if load.tenants == 0 { "default".to_string() } else { format!("t{}", i % u64::from(load.tenants)) };
            let mut event = serde_json::json!({
                "id": format!("{}-{i}", load.id_prefix), "type": load.event_type, "tenant": tenant,
                "data": { "n": i, "sentMs": sent, "pad": pad(load, filler) },
            });
            if load.keys > 0 {
                event["ordering_key"] = format!("k{}", i % u64::from(load.keys)).into();
            }
            event
        })
        .collect();
    Bytes::from(serde_json::to_vec(&events).expect("serializes"))
}

/// An event's padding: the shared run of `x`, or random letters and digits of the same length.
fn pad(load: &Load, filler: &str) -> String {
    use rand::{distributions::Alphanumeric, Rng};
    if !load.random_pad {
        return filler.to_string();
    }
    rand::thread_rng().sample_iter(&Alphanumeric).take(filler.len()).map(char::from).collect()
}

/// Publishes one pre-serialised batch (built once, so the generator spends its time sending).
async fn send(client: &herald_client::Client, body: Bytes) -> anyhow::Result<()> {
    let publish = client.send(http::Method::POST, "/v1/events/batch", Some(body));
    tokio::time::timeout(Duration::from_secs(30), publish).await??;
    Ok(())
}

fn warn_now_and_then(e: &anyhow::Error) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap();
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
        eprintln!("herald-load: {e:#}; retrying the batch");
        *last = Some(Instant::now());
    }
}

fn progress_bar(load: &Load) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !load.progress || !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = match load.events {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} events ({per_sec})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    Some(bar)
}
