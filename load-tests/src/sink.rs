//! The verifying sink: a hyper server that answers like a configurable receiver (latency,
//! failures, outages), verifies every signature, and records each (path, event id)'s first
//! arrival and count, and each first arrival's end-to-end latency, to report loss,
//! duplicates and latency over time.

use crate::verify::Verifier;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How the sink answers.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// Each answer waits uniformly between these many milliseconds.
    pub latency_ms: (u64, u64),
    /// Fraction of requests (0..1) answered with one of `failure_statuses`.
    pub failure_ratio: f64,
    /// Statuses used for failures (default 500 and 503).
    pub failure_statuses: Vec<u16>,
    /// Windows after start during which every request gets 503.
    pub outages: Vec<(Duration, Duration)>,
    /// Only paths starting with this prefix behave so; others answer 200 at once.
    pub only_prefix: Option<String>,
    /// Writes every request to stdout as it arrives: method, path, headers, body.
    pub print: bool,
}

/// Shards of the arrivals map. One map behind one lock held every request while it grew: at a
/// million arrivals a resize rehashes them all, and the sink's stall would be measured as
/// Herald's latency. Sharded, a resize is a 64th of that and holds a 64th of the requests.
const SHARDS: usize = 64;

/// What the sink saw: (path, event id) → arrivals, sharded by the key's hash.
struct Seen {
    shards: Vec<Mutex<HashMap<String, u32>>>,
    hasher: std::collections::hash_map::RandomState,
    distinct: AtomicU64,
}

impl Seen {
    fn new() -> Seen {
        Seen {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: Default::default(),
            distinct: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<HashMap<String, u32>> {
        use std::hash::BuildHasher;
        &self.shards[self.hasher.hash_one(key) as usize % SHARDS]
    }

    /// Makes room for `arrivals` keys in all, so no shard grows during a run. Every shard
    /// fills at the same pace, so all 64 grew within the same fraction of a second (at 229 k,
    /// 458 k and 917 k arrivals: rehashing up to ~1 M keys at once on the cores Herald shares).
    /// Steady runs at 2,000 events/s × 8 had latency spikes near those moments; with the map
    /// reserved the spikes at 28 and 57 s remained: they were Herald's idempotency map growing
    /// at the same moments (BENCHMARKS.md, "Latency at half load", thirty-first session).
    fn reserve(&self, arrivals: u64) {
        let each = arrivals as usize / SHARDS;
        for shard in &self.shards {
            // An eighth more than the mean: a shard's share of a uniform hash strays far less.
            shard.lock().unwrap().reserve(each + each / 8 + 64);
        }
    }

    /// Counts an arrival of `key`; whether it is the first.
    fn arrive(&self, key: String) -> bool {
        let mut shard = self.shard(&key).lock().unwrap();
        let count = shard.entry(key).or_insert(0);
        *count += 1;
        let first = *count == 1;
        if first {
            self.distinct.fetch_add(1, Ordering::Relaxed);
        }
        first
    }
}

/// Counters and arrivals, shared with the server's tasks.
pub struct SinkState {
    started: Instant,
    requests: AtomicU64,
    failures_sent: AtomicU64,
    bad_signatures: AtomicU64,
    verifier: Option<Verifier>,
    behaviour: RwLock<Behaviour>,
    seen: Seen,
    /// Per second since start: first arrivals, and the end-to-end latencies in ms of those
    /// that carried a `sentMs` (one without it has no latency, not a latency of 0).
    per_second: Mutex<Vec<(u64, Vec<u32>)>>,
    /// The first and the latest first arrival, in ns since start (`u64::MAX` and 0 before
    /// any): a rate over exactly the span deliveries took, by the same clock for Herald and
    /// for the ideal loop.
    first_arrival_ns: AtomicU64,
    last_arrival_ns: AtomicU64,
}

/// A running sink.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    state: Arc<SinkState>,
    task: tokio::task::JoinHandle<()>,
}

/// The sink's totals and timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SinkReport {
    /// Requests answered (every attempt).
    pub requests: u64,
    /// Requests answered with a failure on purpose.
    pub failures_sent: u64,
    /// Distinct (path, event id) pairs that arrived.
    pub distinct: u64,
    /// Arrivals beyond the first of a pair that was answered 2xx at least once.
    pub duplicates: u64,
    /// Signatures that did not verify.
    pub bad_signatures: u64,
    /// From the first distinct arrival to the last, seconds.
    pub seconds: f64,
    /// Distinct arrivals over that span (the one rate every scenario reports, by this clock
    /// for Herald and for the ideal loop alike).
    pub deliveries_per_second: f64,
    /// Per second since the sink started: (first arrivals, p50 ms, p99 ms).
    pub timeline: Vec<(u64, u64, u32, u32)>,
    /// End-to-end latency of every first arrival, sorted, in ms.
    #[serde(skip)]
    pub latencies_ms: Vec<u32>,
}

/// The `sentMs` number in a body, written by the generator when it built the event.
fn sent_ms(body: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"sentMs\":";
    let at = body.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits: &[u8] = &body[at..];
    let end = digits.iter().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// A request as a person reads it: the request line, the headers that say what it is (not
/// `host`, `content-length` or `user-agent`), a blank line, the body.
fn print_request(parts: &http::request::Parts, body: &[u8]) {
    use std::io::Write;
    let mut text = format!("{} {}\n", parts.method, parts.uri.path());
    for (name, value) in &parts.headers {
        if !matches!(name.as_str(), "host" | "content-length" | "user-agent") {
            text.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes())));
        }
    }
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(body));
    text.push_str("\n\n");
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl SinkState {
    async fn answer(&self, path: &str, id: &str, timestamp: &str, signature: &str, body: Bytes) -> StatusCode {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Some(v) = &self.verifier {
            if !v.verify(id, timestamp, &body, signature) {
                // Refused, as a receiver would, and not counted as delivered: a signing
                // regression then shows as missing deliveries, never as a rate.
                self.bad_signatures.fetch_add(1, Ordering::Relaxed);
                return StatusCode::UNAUTHORIZED;
            }
        }
        let (delay, fail) = {
            let b = self.behaviour.read().unwrap();
            if b.only_prefix.as_deref().is_some_and(|p| !path.starts_with(p)) {
                (Duration::ZERO, None)
            } else {
                let since = self.started.elapsed();
                let mut rng = rand::thread_rng();
                let delay = if b.latency_ms.1 > 0 {
                    Duration::from_millis(rng.gen_range(b.latency_ms.0..=b.latency_ms.1.max(b.latency_ms.0)))
                } else {
                    Duration::ZERO
                };
                let fail = if b.outages.iter().any(|(from, to)| since >= *from && since < *to) {
                    Some(503)
                } else if b.failure_ratio > 0.0 && rng.gen_bool(b.failure_ratio.min(1.0)) {
                    let statuses =
                        if b.failure_statuses.is_empty() { &[500, 503][..] } else { &b.failure_statuses[..] };
                    Some(statuses[rng.gen_range(0..statuses.len())])
                } else {
                    None
                };
                (delay, fail)
            }
        };
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(status) = fail {
            self.failures_sent.fetch_add(1, Ordering::Relaxed);
            return StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        }
        let latency = sent_ms(&body).map(|sent| now_ms().saturating_sub(sent) as u32);
        let second = self.started.elapsed().as_secs();
        if self.seen.arrive(format!("{path}|{id}")) {
            let ns = self.started.elapsed().as_nanos() as u64;
            self.first_arrival_ns.fetch_min(ns, Ordering::Relaxed);
            self.last_arrival_ns.fetch_max(ns, Ordering::Relaxed);
            let idx = second as usize;
            let mut per_second = self.per_second.lock().unwrap();
            while per_second.len() <= idx {
                per_second.push((0, Vec::new()));
            }
            per_second[idx].0 += 1;
            per_second[idx].1.extend(latency);
        }
        StatusCode::OK
    }
}

impl Sink {
    /// Makes room for `arrivals` distinct deliveries before a run, so the sink's own
    /// bookkeeping does not grow (and stall) while it measures latency.
    pub fn expect(&self, arrivals: u64) {
        self.state.seen.reserve(arrivals);
    }

    /// Starts on `listen`, verifying with `secret` when given.
    pub async fn start(listen: SocketAddr, secret: Option<&str>, behaviour: Behaviour) -> std::io::Result<Sink> {
        let verifier = secret.map(|s| {
            crate::verify::verifier(s)
                .ok_or_else(|| std::io::Error::other("the secret must be whsec_ followed by base64"))
        });
        let verifier = verifier.transpose()?;
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(SinkState {
            started: Instant::now(),
            requests: AtomicU64::new(0),
            failures_sent: AtomicU64::new(0),
            bad_signatures: AtomicU64::new(0),
            verifier,
            behaviour: RwLock::new(behaviour),
            seen: Seen::new(),
            per_second: Mutex::default(),
            first_arrival_ns: AtomicU64::new(u64::MAX),
            last_arrival_ns: AtomicU64::new(0),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let state = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            if state.behaviour.read().unwrap().print {
                                print_request(&parts, &body);
                            }
                            let h = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok()).unwrap_or("");
                            let status = state
                                .answer(
                                    parts.uri.path(),
                                    h("webhook-id"),
                                    h("webhook-timestamp"),
                                    h("webhook-signature"),
                                    body,
                                )
                                .await;
                            Ok::<_, std::convert::Infallible>(
                                Response::builder().status(status).body(Full::new(Bytes::new())).unwrap(),
                            )
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Sink { addr, state, task })
    }

    /// Changes how the sink answers from now on.
    pub fn behave(&self, behaviour: Behaviour) {
        *self.state.behaviour.write().unwrap() = behaviour;
    }

    /// Distinct (path, event id) pairs that arrived so far.
    pub fn distinct(&self) -> u64 {
        self.state.seen.distinct.load(Ordering::Relaxed)
    }

    /// How long the sink has been running: outage windows count from its start.
    pub fn age(&self) -> Duration {
        self.state.started.elapsed()
    }

    /// Whether `id` has arrived on `path` (answered 2xx at least once).
    pub fn arrived(&self, path: &str, id: &str) -> bool {
        let key = format!("{path}|{id}");
        self.state.seen.shard(&key).lock().unwrap().contains_key(&key)
    }

    /// From the first first arrival to the latest (zero before two).
    pub fn arrival_span(&self) -> Duration {
        let first = self.state.first_arrival_ns.load(Ordering::Relaxed);
        let last = self.state.last_arrival_ns.load(Ordering::Relaxed);
        Duration::from_nanos(last.saturating_sub(first))
    }

    /// Requests answered so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Totals, duplicates and the latency timeline so far.
    pub fn report(&self) -> SinkReport {
        let duplicates = (self.state.seen.shards.iter())
            .map(|s| s.lock().unwrap().values().map(|&c| u64::from(c.saturating_sub(1))).sum::<u64>())
            .sum();
        let mut all = Vec::new();
        let timeline = (self.state.per_second.lock().unwrap())
            .iter()
            .enumerate()
            .map(|(s, (arrivals, lat))| {
                let mut lat = lat.clone();
                lat.sort_unstable();
                all.extend_from_slice(&lat);
                (s as u64, *arrivals, percentile(&lat, 0.50), percentile(&lat, 0.99))
            })
            .collect();
        all.sort_unstable();
        let seconds = self.arrival_span().as_secs_f64().max(1e-9);
        let distinct = self.distinct();
        SinkReport {
            requests: self.requests(),
            failures_sent: self.state.failures_sent.load(Ordering::Relaxed),
            distinct,
            duplicates,
            seconds,
            deliveries_per_second: distinct.saturating_sub(1) as f64 / seconds,
            bad_signatures: self.state.bad_signatures.load(Ordering::Relaxed),
            timeline,
            latencies_ms: all,
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `q` quantile of sorted values (0 when empty).
pub fn percentile(sorted: &[u32], q: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn arrivals_are_counted_once_each_across_shards() {
        let seen = super::Seen::new();
        let firsts = (0..1000).filter(|i| seen.arrive(format!("/s{}|evt-{i}", i % 8))).count();
        let again = (0..1000).filter(|i| seen.arrive(format!("/s{}|evt-{i}", i % 8))).count();
        assert_eq!((firsts, again), (1000, 0));
        assert_eq!(seen.distinct.load(std::sync::atomic::Ordering::Relaxed), 1000);
        let dups: u32 = seen.shards.iter().map(|s| s.lock().unwrap().values().map(|c| c - 1).sum::<u32>()).sum();
        assert_eq!(dups, 1000);
    }

    #[test]
    fn no_shard_grows_during_a_run_it_expected() {
        let seen = super::Seen::new();
        seen.reserve(100_000);
        let capacities = || seen.shards.iter().map(|s| s.lock().unwrap().capacity()).collect::<Vec<_>>();
        let before = capacities();
        for i in 0..100_000 {
            seen.arrive(format!("/s{}|evt-{i}", i % 8));
        }
        assert_eq!(capacities(), before, "a shard grew (rehashed) while arrivals came in");
    }

    #[test]
    fn sent_ms_is_found_in_an_envelope() {
        let body = br#"{"id":"e","data":{"n":1,"sentMs":1700000000123,"pad":"x"}}"#;
        assert_eq!(super::sent_ms(body), Some(1_700_000_000_123));
        assert_eq!(super::sent_ms(b"{}"), None);
        assert_eq!(super::percentile(&[1, 2, 3, 4, 100], 0.5), 3);
    }
}
