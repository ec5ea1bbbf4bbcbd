//! Prometheus metrics: every name Herald exports, the recorder (installed once per process),
//! and the scrape-time gauges (lag and in-flight per shard, and whatever the stages above
//! register with [`Metrics::on_scrape`]). Labels come from fixed sets only: transport,
//! outcome, tier, topic, partition, API route and method; never an event, subscription,
//! tenant or device id, so `/metrics` stays the same size whatever the traffic.
//!
//! This module sits just above the log: every stage may record here, and it imports none of
//! them (append latency is recorded by wrapping the log, [`timed`]).

use crate::log::{Committer, Consumer, Log, LogError, LogRecord, PartitionReader, Position, Record};
use async_trait::async_trait;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

/// Events accepted through the API.
pub const EVENTS_INGESTED: &str = "herald_events_ingested_total";
/// Deliveries settled, by `transport` and `outcome` (`delivered`, `dead_lettered`, `dropped`,
/// `superseded`: a retry not made, another generation having delivered it).
pub const DELIVERIES: &str = "herald_deliveries_total";
/// Attempts made, by `transport` and `outcome` (`success`, `client_error`, `server_error`,
/// `other_status`, then a failure's label — `timeout`, `connect_error`, … — and `tls_unready`
/// for one never sent for want of its TLS profile).
pub const ATTEMPTS: &str = "herald_attempts_total";
/// Request latency of one attempt, by `transport`.
pub const REQUEST_SECONDS: &str = "herald_delivery_request_seconds";
/// Event accepted (or resent, recovered, replayed) → delivered, by `transport`.
pub const END_TO_END_SECONDS: &str = "herald_delivery_end_to_end_seconds";
/// Retries scheduled, by `tier`.
pub const RETRIES_SCHEDULED: &str = "herald_retries_scheduled_total";
/// Deliveries deferred without an attempt, by `reason` (`in_flight_cap`, `endpoint_pace`,
/// `rate_limit`, `tenant_share`, `circuit_breaker`, `unknown_subscription`, `commit_point`).
pub const DEFERRED: &str = "herald_deliveries_deferred_total";
/// Ordered subscriptions' keys whose head has failed or is held after a dead letter.
pub const ORDERED_KEYS_BLOCKED: &str = "herald_ordered_keys_blocked";
/// Bytes of ordered deliveries' records held in memory: heads, and those buffered behind them.
pub const ORDERED_HELD_BYTES: &str = "herald_ordered_held_bytes";
/// Spans the OTLP collector did not take (refused, unreachable): dropped.
pub const TRACE_SPANS_UNEXPORTED: &str = crate::telemetry::SPANS_UNEXPORTED;
/// 1 while the log takes no writes until Herald restarts (as `/healthz` says `broken`).
pub const LOG_BROKEN: &str = "herald_log_broken";
/// 1 once delivery stopped until Herald restarts (a source's consumer failed or ended), as
/// `/healthz` says `broken`: events are still accepted, and not delivered.
pub const DELIVERY_STOPPED: &str = "herald_delivery_stopped";
/// Deliveries parked in the dead-letter topic.
pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
/// The `reason`s of [`DEAD_LETTERS`] (`dispatch::Parked::label`'s, set up at zero): the
/// tenant's — retries exhausted, 410 Gone, a disabled subscription, an ordered key skipped —
/// and Herald's own — a record it cannot read, a panic, a delivery it cannot schedule.
pub const DEAD_LETTER_REASONS: &[&str] =
    &["exhausted", "gone", "disabled", "skipped", "malformed", "panicked", "unschedulable"];
/// Deliveries whose processing panicked twice, parked in the dead-letter topic.
pub const PANICS: &str = "herald_deliveries_panicked_total";
/// Partition workers (shards, sequencers) that panicked outside any one delivery; each is
/// started again from the committed offset while this process still owns its partition.
pub const WORKERS_PANICKED: &str = "herald_partition_workers_panicked_total";
/// Deliveries in flight, by `source` topic and `partition`.
pub const IN_FLIGHT: &str = "herald_in_flight";
/// Bytes of records read and not started yet (a retry tier's wait to be due), by `source`
/// and `partition`.
pub const WAITING_BYTES: &str = "herald_dispatch_waiting_bytes";
/// Records appended but not yet committed by the dispatcher, by `source` and `partition`.
pub const CONSUMER_LAG: &str = "herald_consumer_lag";
/// Seconds a partition's commit point has not moved while it had records unsettled.
pub const PARTITION_STALLED: &str = "herald_partition_stalled_seconds";
/// Subscriptions whose circuit breaker is open.
pub const BREAKERS_OPEN: &str = "herald_circuit_breakers_open";
/// Subscriptions known to the registry.
pub const SUBSCRIPTIONS: &str = "herald_subscriptions";
/// Subscriptions disabled (by a 410 or by an operator).
pub const SUBSCRIPTIONS_DISABLED: &str = "herald_subscriptions_disabled";
/// API requests served by the catalog this process knew, because it could not tell in time
/// that it had read every change made through other processes (Kafka: the broker slow or
/// unreachable).
pub const CATALOG_UNSETTLED: &str = "herald_catalog_unsettled_total";
/// Edge agents connected to this process.
pub const EDGE_AGENTS: &str = "herald_edge_agents_connected";
/// Deliveries sent to edge agents connected to this process and not yet answered.
pub const EDGE_IN_FLIGHT: &str = "herald_edge_in_flight";
/// Round trip to an edge agent: the time to its report minus the attempt's own duration.
pub const EDGE_RTT_SECONDS: &str = "herald_edge_rtt_seconds";
/// Partitions (deliveries and retry tiers) this process works on now.
pub const PARTITIONS_OWNED: &str = "herald_partitions_owned";
/// Durable append latency, by `topic`.
pub const LOG_APPEND_SECONDS: &str = "herald_log_append_seconds";
/// API requests, by `route`, `method` and `status`.
pub const API_REQUESTS: &str = "herald_api_requests_total";
/// API request latency, by `route`.
pub const API_REQUEST_SECONDS: &str = "herald_api_request_seconds";
/// API connections closed at once because `api.max_connections` were open.
pub const API_CONNECTIONS_REFUSED: &str = "herald_api_connections_refused_total";
/// API requests refused with `429`, by `reason` (`key_rate`, `tests`, `edge_connects`,
/// `pending_bytes`).
pub const API_THROTTLED: &str = "herald_api_throttled_total";
/// History records not yet in this process's index (summed over the topic's partitions).
pub const HISTORY_LAG: &str = "herald_history_lag";
/// History records indexed by this process.
pub const HISTORY_RECORDS: &str = "herald_history_records_total";
/// Bytes of this process's history index on disk.
pub const HISTORY_BYTES: &str = "herald_history_bytes";
/// History entries deleted for being past `history.retention`.
pub const HISTORY_EXPIRED: &str = "herald_history_expired_total";
/// Attempts whose history record was not durable within the budget (delivery went on).
pub const HISTORY_LATE: &str = "herald_history_late_total";
/// History records that will never be written: the recorder's queue was full while the log
/// took no history, or an accepted event's records were too large for the log.
pub const HISTORY_DROPPED: &str = "herald_history_dropped_total";

/// Every metric name above, for documentation and tests.
pub const ALL: &[&str] = &[
    EVENTS_INGESTED,
    DELIVERIES,
    ATTEMPTS,
    REQUEST_SECONDS,
    END_TO_END_SECONDS,
    RETRIES_SCHEDULED,
    DEFERRED,
    DEAD_LETTERS,
    TRACE_SPANS_UNEXPORTED,
    PANICS,
    WORKERS_PANICKED,
    IN_FLIGHT,
    WAITING_BYTES,
    CONSUMER_LAG,
    PARTITION_STALLED,
    BREAKERS_OPEN,
    SUBSCRIPTIONS,
    SUBSCRIPTIONS_DISABLED,
    CATALOG_UNSETTLED,
    PARTITIONS_OWNED,
    EDGE_AGENTS,
    EDGE_IN_FLIGHT,
    EDGE_RTT_SECONDS,
    LOG_APPEND_SECONDS,
    API_REQUESTS,
    API_REQUEST_SECONDS,
    API_CONNECTIONS_REFUSED,
    API_THROTTLED,
    HISTORY_LAG,
    HISTORY_RECORDS,
    HISTORY_BYTES,
    HISTORY_EXPIRED,
    HISTORY_LATE,
    HISTORY_DROPPED,
    ORDERED_KEYS_BLOCKED,
    ORDERED_HELD_BYTES,
    LOG_BROKEN,
    DELIVERY_STOPPED,
];

/// Fine below 10 ms, where the latency budget of a healthy delivery lies (a p99 read from
/// these buckets is only as exact as the bucket it falls in).
const LATENCY_BUCKETS: &[f64] = &[
    0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];
/// From accepted to delivered: a healthy delivery's milliseconds, and the seconds to a day a
/// retried one takes — finely enough between 1 and 60 s that a p99 of a few seconds (a slow
/// hour) reads as that, not anywhere up to the next bucket (it went 1, 5, 30).
const END_TO_END_BUCKETS: &[f64] = &[
    0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    1800.0, 3600.0, 21600.0, 86400.0,
];

/// The process's recorder handle: installed on first use, shared afterwards (tests run
/// several servers in one process).
fn handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets(LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(END_TO_END_SECONDS.into()), END_TO_END_BUCKETS))
                .expect("bucket lists are not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics shows only Herald's own");
            }
            // Histogram samples pile up until folded into buckets; fold them every few
            // seconds even when nobody scrapes (a 5 M backlog drained unscraped grew RSS by
            // about 300 MiB before this).
            let upkeep = handle.clone();
            let _ = std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                upkeep.run_upkeep();
            });
            handle
        })
        .clone()
}

/// Handles of the delivery path's counters and histograms, by name and label values, kept per
/// thread: the `metrics` macros build (and allocate) a key and look it up in the registry on
/// every call, and settling a delivery made four such calls. The labels' names are the
/// metric's own, so the values (at most two) identify the series. A series is keyed by where
/// its strings are, not by their text: they are `'static`, so the address and length name
/// the text, and hashing three pairs of words is a few multiplies, where SipHash over the
/// bytes of each lookup was about 1 % of a drain's CPU (thirty-second session's profile). The
/// same text at two addresses only makes two handles of one series.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Series([(usize, usize); 3]);

/// Hashes the words of a [`Series`] (FxHash's step: rotate, xor, multiply).
#[derive(Default)]
struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn write(&mut self, bytes: &[u8]) {
        bytes.iter().for_each(|&b| self.write_usize(b as usize));
    }
    fn write_usize(&mut self, word: usize) {
        self.0 = (self.0.rotate_left(5) ^ word as u64).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type Handles<T> = std::collections::HashMap<Series, T, std::hash::BuildHasherDefault<WordHasher>>;

thread_local! {
    static COUNTERS: std::cell::RefCell<Handles<metrics::Counter>> = {
        // Installed before the first handle is made: a handle made without a recorder would
        // count nowhere for the life of the thread.
        handle();
        Default::default()
    };
    static HISTOGRAMS: std::cell::RefCell<Handles<metrics::Histogram>> = {
        handle();
        Default::default()
    };
}

/// The counter `name` with `labels` (at most two), from this thread's handles.
pub fn counter(name: &'static str, labels: &[(&'static str, &'static str)]) -> metrics::Counter {
    cached(&COUNTERS, name, labels, |labels| metrics::counter!(name, labels))
}

/// The histogram `name` with `labels` (at most two), from this thread's handles.
pub fn histogram(name: &'static str, labels: &[(&'static str, &'static str)]) -> metrics::Histogram {
    cached(&HISTOGRAMS, name, labels, |labels| metrics::histogram!(name, labels))
}

/// The handle of one series from `cache`, made by `make` the first time.
fn cached<T: Clone>(
    cache: &'static std::thread::LocalKey<std::cell::RefCell<Handles<T>>>,
    name: &'static str,
    labels: &[(&'static str, &'static str)],
    make: impl FnOnce(Vec<metrics::Label>) -> T,
) -> T {
    let series = series(name, labels);
    cache.with(|c| {
        c.borrow_mut()
            .entry(series)
            .or_insert_with(|| make(labels.iter().map(|&(k, v)| metrics::Label::from_static_parts(k, v)).collect()))
            .clone()
    })
}

fn series(name: &'static str, labels: &[(&'static str, &'static str)]) -> Series {
    debug_assert!(labels.len() <= 2, "{name}: at most two labels");
    let at = |s: &'static str| (s.as_ptr() as usize, s.len());
    Series([at(name), at(labels.first().map_or("", |l| l.1)), at(labels.get(1).map_or("", |l| l.1))])
}

/// One shard's live numbers, read at scrape time.
pub struct ShardStats {
    source: String,
    partition: u32,
    /// Every shard's, [`Metrics::shards`]: looked at as it drops.
    all: Shards,
    committer: Arc<dyn Committer>,
    in_flight: AtomicUsize,
    waiting_bytes: AtomicUsize,
}

impl ShardStats {
    /// Sets the shard's in-flight count.
    pub fn set_in_flight(&self, n: usize) {
        self.in_flight.store(n, Ordering::Relaxed);
    }

    /// Sets the bytes of the records it has read and not started.
    pub fn set_waiting_bytes(&self, n: usize) {
        self.waiting_bytes.store(n, Ordering::Relaxed);
    }

    /// The labels of its series.
    fn labels(&self) -> [(&'static str, String); 2] {
        [("source", self.source.clone()), ("partition", self.partition.to_string())]
    }
}

impl Drop for ShardStats {
    /// The partition is no longer worked here (revoked, or stopped): its series read 0 from
    /// now on (the exporter cannot drop a series), so a sum over processes counts only its new
    /// owner's. A worker that panicked keeps its stats until the next one starts (see
    /// `dispatch::workers`), which sets them at the next scrape; one already started for the
    /// partition keeps them (a scrape holding the kept stats as they were replaced zeroed the
    /// series it had just set).
    fn drop(&mut self) {
        // Upgraded under the lock, looked at (and let go, maybe the last hold, which drops
        // here too) after it.
        let live: Vec<Arc<ShardStats>> = self.all.lock().unwrap().iter().filter_map(Weak::upgrade).collect();
        if live.iter().any(|s| s.source == self.source && s.partition == self.partition) {
            return;
        }
        let labels = self.labels();
        metrics::gauge!(CONSUMER_LAG, &labels).set(0.0);
        metrics::gauge!(IN_FLIGHT, &labels).set(0.0);
        metrics::gauge!(WAITING_BYTES, &labels).set(0.0);
        metrics::gauge!(PARTITION_STALLED, &labels).set(0.0);
    }
}

type Hook = Box<dyn Fn() + Send + Sync>;

/// The shards registered, weakly: shared with each, which looks at the others as it drops.
type Shards = Arc<Mutex<Vec<Weak<ShardStats>>>>;

/// Scrape-time metrics of this server.
pub struct Metrics {
    handle: PrometheusHandle,
    shards: Shards,
    /// By source and partition: the commit point at the last scrape, and since when it has
    /// stood there with records behind it (see [`PARTITION_STALLED`]). Kept across a
    /// partition's workers, so one restarting over and over on the same record reads stalled.
    moved: Mutex<std::collections::HashMap<(String, u32), (u64, std::time::Instant)>>,
    hooks: Mutex<Vec<Hook>>,
    /// The last scrape's text and when its render started ([`Metrics::scrape`]).
    last: Mutex<Option<(std::time::Instant, bytes::Bytes)>>,
    /// Held while a scrape renders: one render at a time, the others wait for its text.
    rendering: tokio::sync::Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Installs the recorder if needed and exposes every series from the start (at zero), so
    /// dashboards and alerts see 0 rather than nothing.
    pub fn new() -> Self {
        let metrics = Metrics {
            handle: handle(),
            shards: Shards::default(),
            moved: Mutex::default(),
            hooks: Mutex::new(Vec::new()),
            last: Mutex::default(),
            rendering: tokio::sync::Mutex::new(()),
        };
        describe();
        metrics::counter!(EVENTS_INGESTED).increment(0);
        metrics::counter!(PANICS).increment(0);
        metrics::counter!(WORKERS_PANICKED).increment(0);
        metrics::counter!(API_CONNECTIONS_REFUSED).increment(0);
        metrics::counter!(CATALOG_UNSETTLED).increment(0);
        for reason in ["key_rate", "tests", "edge_connects", "pending_bytes"] {
            metrics::counter!(API_THROTTLED, "reason" => reason).increment(0);
        }
        for reason in [
            "in_flight_cap",
            "endpoint_pace",
            "rate_limit",
            "tenant_share",
            "circuit_breaker",
            "unknown_subscription",
            "commit_point",
        ] {
            metrics::counter!(DEFERRED, "reason" => reason).increment(0);
        }
        for reason in DEAD_LETTER_REASONS {
            metrics::counter!(DEAD_LETTERS, "reason" => *reason).increment(0);
        }
        metrics::counter!(TRACE_SPANS_UNEXPORTED).increment(0);
        // Every transport's, and every outcome an attempt can be counted under: a series that
        // appears with its first increment loses that increment to `rate()` (an AMQP-only
        // deployment's first burst of failures went uncounted in the error ratio).
        let by_status = ["success", "client_error", "server_error", "other_status"];
        let without_status = crate::model::outcome::LABELS.iter().filter(|l| !matches!(**l, "delivered" | "failed"));
        let outcomes: Vec<&str> = by_status
            .into_iter()
            .chain(without_status.copied())
            .chain(crate::model::outcome::METRIC_ONLY_LABELS.iter().copied())
            .collect();
        for transport in ["webhook", "amqp", "edge"] {
            for outcome in ["delivered", "dead_lettered", "dropped", "superseded"] {
                metrics::counter!(DELIVERIES, "transport" => transport, "outcome" => outcome).increment(0);
            }
            for outcome in &outcomes {
                metrics::counter!(ATTEMPTS, "transport" => transport, "outcome" => *outcome).increment(0);
            }
        }
        for tier in crate::retry::tiers::TIERS {
            metrics::counter!(RETRIES_SCHEDULED, "tier" => crate::retry::tiers::label(*tier)).increment(0);
        }
        metrics::counter!(RETRIES_SCHEDULED, "tier" => "ordered").increment(0);
        metrics
    }

    /// Registers a shard; its gauges disappear from updates once the returned value drops.
    pub fn shard(&self, source: &str, partition: u32, committer: Arc<dyn Committer>) -> Arc<ShardStats> {
        let stats = Arc::new(ShardStats {
            source: source.to_string(),
            partition,
            all: self.shards.clone(),
            committer,
            in_flight: 0.into(),
            waiting_bytes: 0.into(),
        });
        self.shards.lock().unwrap().push(Arc::downgrade(&stats));
        stats
    }

    /// Partitions this process is working on now, across every source topic.
    pub fn shards_running(&self) -> usize {
        self.shards.lock().unwrap().iter().filter(|w| w.strong_count() > 0).count()
    }

    /// Runs `hook` before every scrape (stages above this one set their gauges in it).
    pub fn on_scrape(&self, hook: impl Fn() + Send + Sync + 'static) {
        self.hooks.lock().unwrap().push(Box::new(hook));
    }

    /// [`Metrics::render`], off the runtime's threads, one render at a time: a scrape that
    /// came while another rendered takes the next render's text, shared by every scrape that
    /// waited for it (a flood of scrapes is one render after another, not one each on a
    /// blocking thread of its own, which parked every one of those threads the log's reads
    /// need). Every answer is rendered after its scrape came: what a caller did before it
    /// shows.
    pub async fn scrape(self: &Arc<Self>) -> Option<bytes::Bytes> {
        let came = std::time::Instant::now();
        let _one = self.rendering.lock().await;
        if let Some((started, text)) = &*self.last.lock().unwrap() {
            if *started >= came {
                return Some(text.clone());
            }
        }
        let started = std::time::Instant::now();
        let me = self.clone();
        let text = bytes::Bytes::from(tokio::task::spawn_blocking(move || me.render()).await.ok()?);
        *self.last.lock().unwrap() = Some((started, text.clone()));
        Some(text)
    }

    /// The Prometheus text exposition, with scrape-time gauges brought up to date.
    pub fn render(&self) -> String {
        let shards: Vec<Arc<ShardStats>> = {
            let mut list = self.shards.lock().unwrap();
            list.retain(|w| w.strong_count() > 0);
            list.iter().filter_map(Weak::upgrade).collect()
        };
        metrics::gauge!(PARTITIONS_OWNED).set(shards.len() as f64);
        for s in shards {
            let labels = s.labels();
            let committed = s.committer.committed();
            let lag = s.committer.end_offset().saturating_sub(committed);
            metrics::gauge!(CONSUMER_LAG, &labels).set(lag as f64);
            // How long the commit point has stood with records behind it: the lag alone does
            // not show a stuck partition (on Kafka its end is the fetches' high watermark, and
            // a partition that reads nothing fetches nothing, so its lag stands still too).
            let stalled = {
                let mut all = self.moved.lock().unwrap();
                let now = std::time::Instant::now();
                let moved = all.entry((s.source.clone(), s.partition)).or_insert((committed, now));
                if moved.0 != committed || lag == 0 {
                    *moved = (committed, now);
                }
                moved.1.elapsed().as_secs_f64()
            };
            metrics::gauge!(PARTITION_STALLED, &labels).set(if lag == 0 { 0.0 } else { stalled });
            metrics::gauge!(IN_FLIGHT, &labels).set(s.in_flight.load(Ordering::Relaxed) as f64);
            metrics::gauge!(WAITING_BYTES, &labels).set(s.waiting_bytes.load(Ordering::Relaxed) as f64);
        }
        for hook in self.hooks.lock().unwrap().iter() {
            hook();
        }
        self.handle.run_upkeep();
        self.handle.render()
    }
}

/// HELP texts.
fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(EVENTS_INGESTED, "Events accepted through the API.");
    describe_gauge!(
        HISTORY_LAG,
        "Records of the history topic not yet in this process's index (a bundle of history records counts once)."
    );
    describe_counter!(HISTORY_RECORDS, "History records indexed by this process.");
    describe_gauge!(HISTORY_BYTES, Unit::Bytes, "Bytes of this process's history index on disk.");
    describe_counter!(HISTORY_EXPIRED, "History entries deleted for being past history.retention.");
    describe_counter!(
        HISTORY_LATE,
        "Attempts whose history record was not durable within the budget; delivery went on without waiting."
    );
    describe_counter!(
        HISTORY_DROPPED,
        "History records that will never be written (the recorder's queue full while the log took no history, or records too large for the log): attempts or events missing from the history for good."
    );
    describe_counter!(
        DELIVERIES,
        "Deliveries settled, by outcome: delivered, dead_lettered, dropped (subscription deleted)."
    );
    describe_counter!(ATTEMPTS, "Delivery attempts, by outcome.");
    describe_histogram!(REQUEST_SECONDS, Unit::Seconds, "Latency of one delivery attempt.");
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Time from event accepted (or resent, recovered, replayed) to delivered."
    );
    describe_counter!(RETRIES_SCHEDULED, "Retries scheduled, by delay tier.");
    describe_counter!(
        DEFERRED,
        "Deliveries deferred without an attempt, by reason: in-flight cap, a slow endpoint's pace, rate limit, open circuit breaker, unknown subscription."
    );
    describe_counter!(
        TRACE_SPANS_UNEXPORTED,
        "Spans the OTLP collector did not take (refused or unreachable), dropped."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Deliveries parked in the dead-letter topic, by reason (exhausted, gone, disabled, skipped: the tenant's; malformed, panicked, unschedulable: Herald's own)."
    );
    describe_counter!(PANICS, "Deliveries whose processing panicked twice and were parked in the dead-letter topic.");
    describe_counter!(
        WORKERS_PANICKED,
        "Partition workers that panicked outside any one delivery (each started again from the committed offset)."
    );
    describe_gauge!(IN_FLIGHT, "Deliveries in flight, by source topic and partition.");
    describe_gauge!(
        WAITING_BYTES,
        Unit::Bytes,
        "Bytes of records read and not started yet (a retry tier's, until due), by source topic and partition."
    );
    describe_gauge!(CONSUMER_LAG, "Records appended but not yet committed, by source topic and partition.");
    describe_gauge!(
        PARTITION_STALLED,
        "Seconds a partition's commit point has not moved while it had records unsettled (as seen at scrapes), by source topic and partition: a stuck partition, which its lag alone does not show."
    );
    describe_gauge!(BREAKERS_OPEN, "Subscriptions whose circuit breaker is open or half-open (probing).");
    describe_gauge!(
        ORDERED_KEYS_BLOCKED,
        "Keys of ordered subscriptions whose head delivery has failed (or is held after a dead letter), on the partitions this process sequences: their later deliveries wait."
    );
    describe_gauge!(
        ORDERED_HELD_BYTES,
        "Bytes of ordered deliveries' records held in memory (heads, at most 32 MiB a partition, and those buffered behind them, as much again), on the partitions this process sequences."
    );
    describe_gauge!(
        LOG_BROKEN,
        "1 while the log takes no writes until Herald restarts (a failed journal checkpoint, a fatal Kafka producer error), as /healthz says broken: every publish is refused."
    );
    describe_gauge!(
        DELIVERY_STOPPED,
        "1 once delivery stopped until Herald restarts (a source's consumer could not be made or ended), as /healthz says broken: events are still accepted, and not delivered."
    );
    describe_gauge!(SUBSCRIPTIONS, "Subscriptions in the registry.");
    describe_gauge!(SUBSCRIPTIONS_DISABLED, "Subscriptions disabled.");
    describe_counter!(
        CATALOG_UNSETTLED,
        "API requests served by the catalog this process knew: it could not tell in time that it had read every change made through other processes."
    );
    describe_gauge!(EDGE_AGENTS, "Edge agents connected to this process.");
    describe_gauge!(EDGE_IN_FLIGHT, "Deliveries sent to edge agents connected here and not yet answered.");
    describe_histogram!(EDGE_RTT_SECONDS, Unit::Seconds, "Round trip to an edge agent, less the attempt itself.");
    describe_gauge!(PARTITIONS_OWNED, "Partitions of the deliveries and retry topics this process works on now.");
    describe_histogram!(LOG_APPEND_SECONDS, Unit::Seconds, "Durable log append latency, by topic.");
    describe_counter!(API_REQUESTS, "API requests, by route template, method and status.");
    describe_histogram!(API_REQUEST_SECONDS, Unit::Seconds, "API request latency, by route template.");
    describe_counter!(API_CONNECTIONS_REFUSED, "API connections closed at once: api.max_connections were open.");
    describe_counter!(
        API_THROTTLED,
        "API requests refused with 429, by reason (key_rate, tests, edge_connects, pending_bytes)."
    );
}

/// `log` with the latency of every append recorded (by topic) in
/// `herald_log_append_seconds`, so neither backend records metrics itself.
pub fn timed(log: Arc<dyn Log>) -> Arc<dyn Log> {
    Arc::new(Timed(log))
}

struct Timed(Arc<dyn Log>);

#[async_trait]
impl Log for Timed {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        self.0.partitions(topic)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        let started = std::time::Instant::now();
        let appended = self.0.append(topic, records).await;
        metrics::histogram!(LOG_APPEND_SECONDS, "topic" => topic.to_string()).record(started.elapsed().as_secs_f64());
        appended
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<LogRecord>, LogError> {
        self.0.read_all(topic).await
    }

    async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        self.0.read_partition(topic, partition, from, max).await
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        self.0.end_offset(topic, partition).await
    }

    fn shared(&self) -> bool {
        self.0.shared()
    }

    fn max_record_bytes(&self) -> Option<usize> {
        self.0.max_record_bytes()
    }

    async fn consume(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError> {
        self.0.consume(group, topic).await
    }

    async fn follow(&self, topic: &str, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, LogError> {
        self.0.follow(topic, partition, from).await
    }

    fn read_up_to(&self, topic: &str, partition: u32, offset: u64) {
        self.0.read_up_to(topic, partition, offset)
    }

    async fn ready(&self) -> bool {
        self.0.ready().await
    }

    fn broken(&self) -> Option<String> {
        self.0.broken()
    }

    async fn close(&self) -> Result<(), LogError> {
        self.0.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scrapes that come while one renders share the next render: `/metrics` is open to
    /// anyone, each render walks every subscription under the registry's lock, and each
    /// scrape rendered on a blocking thread of its own. A scrape alone renders afresh.
    #[tokio::test]
    async fn scrapes_that_come_while_one_renders_share_the_next() {
        let m = Arc::new(Metrics::new());
        let renders = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = renders.clone();
        m.on_scrape(move || {
            counted.fetch_add(1, Ordering::Relaxed);
        });
        let rendering = m.rendering.lock().await; // one under way
        let waiting: Vec<_> = (0..8)
            .map(|_| {
                tokio::spawn({
                    let m = m.clone();
                    async move { m.scrape().await }
                })
            })
            .collect();
        // The scrapes come and queue behind it (the test's runtime has one thread: each runs
        // to its wait as this one yields).
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        drop(rendering);
        let texts: Vec<_> = futures::future::join_all(waiting).await.into_iter().map(|t| t.unwrap()).collect();
        assert_eq!(renders.load(Ordering::Relaxed), 1, "eight scrapes, one render");
        assert!(texts.iter().all(|t| t.is_some() && *t == texts[0]));
        m.scrape().await;
        assert_eq!(renders.load(Ordering::Relaxed), 2, "a scrape alone renders afresh");
    }

    /// Between a second and a minute no end-to-end bucket is more than three times the one
    /// below it: a p99 of 1.2 s read anywhere up to 5 s.
    #[test]
    fn end_to_end_buckets_tell_seconds_apart() {
        let seconds: Vec<f64> = END_TO_END_BUCKETS.iter().copied().filter(|b| (1.0..=60.0).contains(b)).collect();
        for pair in seconds.windows(2) {
            assert!(pair[1] / pair[0] <= 3.0, "{} s then {} s", pair[0], pair[1]);
        }
    }

    /// Every stage gets the log through this wrapper. It passed on what it was written for
    /// but not what the trait's defaults answered: the history index's word that it had read
    /// the topic went nowhere — on the embedded log the history topic, whose retention waits
    /// for that word, was kept for good (disk without bound) — and `/healthz` never saw a
    /// broken log (only a restart mends one; the liveness probe never restarted it).
    #[tokio::test]
    async fn the_timed_log_passes_on_what_a_reader_has_read_and_a_broken_log() {
        use crate::log::embedded::{EmbeddedConfig, EmbeddedLog, Fault};
        use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
        let dir = tempfile::tempdir().unwrap();
        let failing = Arc::new(AtomicBool::new(false));
        let flag = failing.clone();
        let topic = crate::log::TopicSpec {
            name: "h".into(),
            partitions: 1,
            compacted: false,
            retention: Some(std::time::Duration::from_millis(1)),
            retention_waits_for_reader: true,
            read_within: std::time::Duration::from_millis(20),
            keyed: false,
        };
        let embedded = EmbeddedLog::open(EmbeddedConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 4096,
            flush_interval: std::time::Duration::from_secs(3600),
            topics: vec![topic],
            journal_bytes: 16 << 10,
            faults: Some(Arc::new(move |fault: Fault<'_>| match fault {
                Fault::Sync(path, _) if flag.load(SeqCst) && path.extension().is_some_and(|e| e == "log") => {
                    Err(std::io::Error::other("injected segment fsync failure"))
                }
                _ => Ok(()),
            })),
        })
        .await
        .unwrap();
        let log = timed(embedded.clone());
        let record = || crate::log::Record { key: bytes::Bytes::from_static(b"k"), value: vec![b'v'; 1000].into() };
        for _ in 0..20 {
            log.append("h", vec![record()]).await.unwrap();
        }
        let segments = || {
            std::fs::read_dir(dir.path().join("topics/h/0"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "log"))
                .count()
        };
        let before = segments();
        assert!(before >= 4, "{before} segments");
        log.read_up_to("h", 0, 20);
        embedded.flush_at(crate::model::now_ms() + 1000).await.unwrap();
        assert!(
            segments() < before,
            "what the reader has read is reclaimed past its retention: {} of {before} left",
            segments()
        );

        assert_eq!(log.broken(), None);
        failing.store(true, SeqCst);
        let mut refused = false;
        for _ in 0..100 {
            if log.append("h", vec![record()]).await.is_err() {
                refused = true;
                break;
            }
        }
        assert!(refused, "a failed checkpoint refuses appends");
        assert!(log.broken().is_some(), "and the wrapper says the log is broken");
    }

    /// A partition that goes to another process (or whose worker ends) stops counting here:
    /// its last lag stayed exported for good, and summed with the new owner's.
    #[test]
    fn a_partition_no_longer_worked_here_shows_no_lag_or_work_in_flight() {
        struct Behind;
        impl Committer for Behind {
            fn commit(&self, _: u64) {}
            fn end_offset(&self) -> u64 {
                40
            }
            fn committed(&self) -> u64 {
                0
            }
        }
        let m = Metrics::new();
        let s = m.shard("retry.revoked-test", 7, Arc::new(Behind));
        s.set_in_flight(3);
        s.set_waiting_bytes(2048);
        let line = |name: &str, value: u32| format!(r#"{name}{{source="retry.revoked-test",partition="7"}} {value}"#);
        let text = m.render();
        assert!(text.contains(&line(CONSUMER_LAG, 40)) && text.contains(&line(IN_FLIGHT, 3)), "{text}");
        assert!(text.contains(&line(WAITING_BYTES, 2048)), "{text}");
        drop(s);
        let text = m.render();
        assert!(text.contains(&line(CONSUMER_LAG, 0)) && text.contains(&line(IN_FLIGHT, 0)), "{text}");
        assert!(text.contains(&line(WAITING_BYTES, 0)), "{text}");
    }

    /// A partition whose commit point stands still with records behind it says so, however
    /// its lag moves (on Kafka a partition reading nothing fetches nothing, so its lag stands
    /// still too, and the lag alert, which wants it growing, never fired); one whose commit
    /// point moves, or that has nothing behind it, reads 0.
    #[test]
    fn a_partition_whose_commit_point_stands_still_behind_records_reads_stalled() {
        struct Offsets(AtomicU64, AtomicU64);
        impl Committer for Offsets {
            fn commit(&self, next: u64) {
                self.1.store(next, SeqCst);
            }
            fn end_offset(&self) -> u64 {
                self.0.load(SeqCst)
            }
            fn committed(&self) -> u64 {
                self.1.load(SeqCst)
            }
        }
        use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
        let offsets = Arc::new(Offsets(AtomicU64::new(40), AtomicU64::new(10)));
        let m = Metrics::new();
        let s = m.shard("stall-test", 3, offsets.clone());
        let stalled = |m: &Metrics| -> f64 {
            let text = m.render();
            let prefix = format!(r#"{PARTITION_STALLED}{{source="stall-test",partition="3"}} "#);
            let line = text.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{text}"));
            line[prefix.len()..].parse().unwrap()
        };
        let Some(ago) = std::time::Instant::now().checked_sub(std::time::Duration::from_secs(600)) else {
            return; // a machine up for less than ten minutes
        };
        let key = ("stall-test".to_string(), 3);
        assert!(stalled(&m) < 60.0);
        m.moved.lock().unwrap().get_mut(&key).unwrap().1 = ago; // last moved ten minutes ago
        assert!(stalled(&m) >= 600.0, "a commit point standing behind records reads stalled");
        // Its worker restarts (a record it panics on): still stalled.
        drop(s);
        let _restarted = m.shard("stall-test", 3, offsets.clone());
        assert!(stalled(&m) >= 600.0, "a restarted worker's partition reads stalled still");
        offsets.commit(20);
        assert!(stalled(&m) < 60.0, "it moved");
        m.moved.lock().unwrap().get_mut(&key).unwrap().1 = ago;
        offsets.commit(40);
        assert_eq!(stalled(&m), 0.0, "nothing behind it");
        offsets.0.store(50, SeqCst); // records arrive after an idle hour
        assert!(stalled(&m) < 60.0, "the idle time before them is no stall");
    }

    /// The handles are keyed by where their strings are: the same text elsewhere (a label
    /// value built at run time, leaked to be `'static`) must still count into the one series.
    #[test]
    fn a_series_counts_once_whatever_copy_of_its_text_names_it() {
        let name: &'static str = "herald_test_series_total";
        let copy: &'static str = String::from("delivered").leak();
        assert_ne!(copy.as_ptr(), "delivered".as_ptr());
        counter(name, &[("outcome", "delivered")]).increment(2);
        counter(name, &[("outcome", copy)]).increment(3);
        counter(name, &[("outcome", "failed")]).increment(1);
        let text = handle().render();
        let line = |value: &str| {
            text.lines().find(|l| l.starts_with(&format!("{name}{{outcome=\"{value}\"}}"))).map(|l| l.to_string())
        };
        assert_eq!(line("delivered").as_deref(), Some("herald_test_series_total{outcome=\"delivered\"} 5"));
        assert_eq!(line("failed").as_deref(), Some("herald_test_series_total{outcome=\"failed\"} 1"));
    }
}
