//! Delivery history: every attempt on record, each event's state per subscription, and the
//! events themselves for `history.retention`, so an operator can answer "did you send it, and
//! what did our server say?", resend one event and recover an endpoint after an outage.
//!
//! Records go to the `history` topic of the log where attempts settle (`recorder`), so the
//! history is as durable as delivery and works the same on both backends; every process builds
//! its own index of the whole topic (`index`), so on Kafka any process answers any query. See
//! the README's "Delivery history" for why, and for sizing.

pub mod index;
mod keys;
pub mod record;
mod recorder;

pub use index::{AttemptQuery, DeliveryView, EventQuery, Index, IndexError, Page, Since};
pub use record::{AttemptRecord, EventRecord, HistoryRecord, State, StateRecord};
pub use recorder::Recorder;

use crate::log::{Log, LogError};
use crate::metrics::Metrics;
use crate::model::now_ms;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Records of the topic read at a time at most. Under load each is a bundle of up to 16 KiB
/// of history records (a read of them holds 4 MiB at most; a record of one event up to
/// `ingest.max_event_bytes`, as before); the index writes what it reads in bounded batches of
/// its own.
const READ_BATCH: usize = 256;

/// How often days past retention are looked for, and the lag measured.
const UPKEEP_EVERY: Duration = Duration::from_secs(1);

/// The share of the delivery runtime's worker time spent working (not parked) at and above
/// which delivery counts as busy, and indexing waits (see [`Load`]).
const BUSY: f64 = 0.5;

/// How long one measure of that share holds, and how often a waiting indexer looks again.
const BUSY_WINDOW: Duration = Duration::from_millis(100);

/// How long delivery counts as busy after a window that was: as a burst's last deliveries thin
/// out, the workers' share dips below [`BUSY`] while they still run, and indexing a deferral's
/// backlog then, at full speed, competed with them (on Kafka, 1.5–4 µs a delivery of a
/// 400,000-delivery run; BENCHMARKS.md, thirty-fourth session).
const QUIET: Duration = Duration::from_secs(1);

/// Requests that wait in [`History::caught_up`] at once, at most; others answer from what is
/// indexed without waiting, so lookups of ids never accepted cannot hold many connections.
const CATCH_UP_WAITERS: usize = 16;

/// Of those, one tenant's at most: one tenant looking up ids in a loop must not take every
/// place, so that another's lookup of an event accepted a moment ago is answered 404.
const CATCH_UP_WAITERS_PER_TENANT: usize = 2;

/// Queries' reads of the index running at once, all tenants', at most (see [`History::read`]).
const READS_AT_ONCE: usize = 4;

/// Of those, one tenant's at most: a query looks at up to 20,000 entries (tens of ms of a
/// core), and a tenant key at its request rate (100/s by default) asked for more cores than the
/// machine has, on the blocking threads the embedded log's reads share — every tenant's
/// deliveries and queries slowed behind one tenant's.
const READS_PER_TENANT: usize = 2;

/// A tenant's place among the waiters, given back when dropped.
struct TenantWaiter<'a> {
    waiting: &'a std::sync::Mutex<std::collections::HashMap<String, usize>>,
    tenant: String,
}

impl<'a> TenantWaiter<'a> {
    fn take(
        waiting: &'a std::sync::Mutex<std::collections::HashMap<String, usize>>,
        tenant: &str,
    ) -> Option<TenantWaiter<'a>> {
        let mut map = waiting.lock().unwrap();
        let n = map.entry(tenant.to_string()).or_default();
        if *n >= CATCH_UP_WAITERS_PER_TENANT {
            return None;
        }
        *n += 1;
        Some(TenantWaiter { waiting, tenant: tenant.to_string() })
    }
}

impl Drop for TenantWaiter<'_> {
    fn drop(&mut self) {
        let mut map = self.waiting.lock().unwrap();
        if let Some(n) = map.get_mut(&self.tenant) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.tenant);
            }
        }
    }
}

/// Whether delivery keeps this process's workers busy, so indexing should wait. The index's
/// threads are in the idle scheduling class, yet while deliveries peak they still run in every
/// gap the workers leave and cost them: end to end (`e2e.sh 8 200000`) history on delivered
/// 0.86 of history off, and 0.96 with the index not written during the run (BENCHMARKS.md,
/// "Delivery history", twentieth session). So while the workers are busy the indexer holds
/// the batch it read — for at most `history.index_defer`, and never records that old — and
/// indexes it once they are not: a burst is indexed after it, a sustained peak with at most
/// that much delay. The cost is moved, not removed. One per process, shared by every
/// partition's reader, so they all see one measure.
struct Load {
    runtime: tokio::runtime::Handle,
    defer: Duration,
    sample: std::sync::Mutex<Sample>,
    /// Requests waiting for the index to reach the ends they saw: no holding while any does.
    wanting: std::sync::atomic::AtomicUsize,
    /// Tests: delivery counts as busy whatever the workers do.
    #[cfg(test)]
    busy: std::sync::atomic::AtomicBool,
}

/// The workers' busy time at the last measure, and when a window last measured busy.
struct Sample {
    at: std::time::Instant,
    busy: Duration,
    busy_at: Option<std::time::Instant>,
}

impl Load {
    fn new(runtime: tokio::runtime::Handle, defer: Duration) -> Load {
        let busy = Self::busy_total(&runtime.metrics());
        let sample = Sample { at: std::time::Instant::now(), busy, busy_at: None };
        Load {
            runtime,
            defer,
            sample: std::sync::Mutex::new(sample),
            wanting: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            busy: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Someone waits for the index (see [`History::caught_up`]): nothing is held while the
    /// returned guard lives, so the wait is short even while delivery is busy. Meanwhile
    /// delivery pays the index as it goes, as it did before the deferral — only for as long as
    /// the index takes to reach what the waiter needs: lifted for a fixed five seconds, a
    /// tenant looking up ids that do not exist in a loop kept every tenant's deliveries paying
    /// for it.
    fn want(&self) -> Wanting<'_> {
        self.wanting.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Wanting(self)
    }

    fn busy_total(m: &tokio::runtime::RuntimeMetrics) -> Duration {
        (0..m.num_workers()).map(|w| m.worker_total_busy_duration(w)).sum()
    }

    /// Whether delivery is busy: the workers' busy share since the previous measure (taken
    /// again once [`BUSY_WINDOW`] has passed) is at least [`BUSY`], or was within [`QUIET`].
    /// tokio adds to a worker's busy time when it parks, or every few dozen polls, so a share
    /// is lumpy; a lump only makes a window look busier.
    fn busy(&self) -> bool {
        #[cfg(test)]
        if self.busy.load(std::sync::atomic::Ordering::Relaxed) {
            return true;
        }
        let mut s = self.sample.lock().unwrap();
        let elapsed = s.at.elapsed();
        if elapsed >= BUSY_WINDOW {
            let m = self.runtime.metrics();
            let busy = Self::busy_total(&m);
            let workers = m.num_workers().max(1) as f64;
            let share = busy.saturating_sub(s.busy).as_secs_f64() / (elapsed.as_secs_f64() * workers);
            (s.at, s.busy) = (std::time::Instant::now(), busy);
            if share >= BUSY {
                s.busy_at = Some(s.at);
            }
        }
        s.busy_at.is_some_and(|at| at.elapsed() < QUIET)
    }

    /// Whether a batch held since `held` whose oldest record was written at `oldest_ms` should
    /// wait on: delivery is busy, and neither the batch has waited nor its records are as old
    /// as the deferral. The wait is bounded on the monotonic clock too, so a record stamped in
    /// the future (a producer's clock ahead, the clock stepped back) cannot hold it longer.
    fn defers(&self, held: std::time::Instant, oldest_ms: i64, now_ms: i64) -> bool {
        let defer_ms = self.defer.as_millis().min(i64::MAX as u128) as i64;
        !self.defer.is_zero()
            && held.elapsed() < self.defer
            && self.wanting.load(std::sync::atomic::Ordering::Relaxed) == 0
            && now_ms.saturating_sub(oldest_ms) < defer_ms
            && self.busy()
    }
}

/// A wait for the index (see [`Load::want`]), ended when dropped.
struct Wanting<'a>(&'a Load);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.wanting.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The history of this process: the recorder that writes it and the index that answers.
pub struct History {
    /// Writes records to the topic.
    pub recorder: Arc<Recorder>,
    /// Answers queries.
    pub index: Arc<Index>,
    log: Arc<dyn Log>,
    topic: String,
    partitions: u32,
    load: Arc<Load>,
    waiters: tokio::sync::Semaphore,
    /// Waiters by tenant (at most [`CATCH_UP_WAITERS_PER_TENANT`] each).
    waiting: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    tasks: std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Tenants with a recover under way (see [`History::recovering`]).
    recovering: crate::model::OneAtATime,
    /// Queries' reads, in turns among tenants (see [`History::read`]).
    reads: crate::model::TakenInTurns,
}

impl History {
    /// Opens the index in `dir`, starts reading every partition of `topic` into it, and
    /// expires what passes `retention`, until `stop`. While the workers of the runtime it is
    /// called on are busy, indexing waits up to `defer` (see [`Load`]).
    pub fn start(
        log: Arc<dyn Log>,
        topic: &str,
        dir: &Path,
        retention: Duration,
        defer: Duration,
        metrics: &Metrics,
        stop: watch::Receiver<bool>,
    ) -> Result<Arc<History>, HistoryError> {
        let index = Arc::new(Index::open(dir, retention)?);
        let partitions = log.partitions(topic)?;
        let load = Arc::new(Load::new(tokio::runtime::Handle::current(), defer));
        let thread =
            start_indexer(log.clone(), topic.to_string(), partitions, index.clone(), load.clone(), stop.clone());
        let tasks = vec![tokio::spawn(upkeep(log.clone(), topic.to_string(), partitions, index.clone(), stop))];
        let bytes = index.clone();
        metrics.on_scrape(move || metrics::gauge!(crate::metrics::HISTORY_BYTES).set(bytes.disk_bytes() as f64));
        metrics::counter!(crate::metrics::HISTORY_RECORDS).increment(0);
        metrics::counter!(crate::metrics::HISTORY_EXPIRED).increment(0);
        metrics::counter!(crate::metrics::HISTORY_LATE).increment(0);
        metrics::counter!(crate::metrics::HISTORY_DROPPED).increment(0);
        let recorder = Recorder::start(log.clone(), topic.to_string());
        Ok(Arc::new(History {
            recorder,
            index,
            log,
            topic: topic.to_string(),
            partitions,
            load,
            waiters: tokio::sync::Semaphore::new(CATCH_UP_WAITERS),
            waiting: Default::default(),
            tasks: std::sync::Mutex::new(tasks),
            thread: std::sync::Mutex::new(thread),
            recovering: Default::default(),
            reads: crate::model::TakenInTurns::new(READS_AT_ONCE, READS_PER_TENANT),
        }))
    }

    /// Runs `read`, a query's read of the index for `tenant`, off the async threads once it is
    /// the tenant's turn ([`READS_PER_TENANT`] of a tenant's, [`READS_AT_ONCE`] in all); the
    /// turn is held by the read itself, so a caller that stops waiting does not free it while
    /// the read still runs. `Err` if the read panicked.
    pub async fn read<T: Send + 'static>(
        &self,
        tenant: &str,
        read: impl FnOnce(&Index) -> Result<T, IndexError> + Send + 'static,
    ) -> Result<Result<T, IndexError>, tokio::task::JoinError> {
        let turn = self.reads.turn(tenant).await;
        let index = self.index.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            read(&index)
        })
        .await
    }

    /// Starts a recover of `tenant`'s, unless one is under way (`None`): a rewind re-sends up
    /// to 10,000 events, and a tenant key sending them at its request rate made up to a
    /// million deliveries a second in the log every tenant shares.
    pub fn recovering(&self, tenant: &str) -> Option<crate::model::Running> {
        self.recovering.start(tenant)
    }

    /// Waits until the index holds everything the topic held when called, for at most
    /// `within`, with indexing no longer held back meanwhile: for answers that must not miss
    /// the newest records (an event not found yet, a recover). Returns how many records of
    /// the topic the index still lacks then (0: it caught up); `None` if the topic's end could
    /// not be read, or [`CATCH_UP_WAITERS`] requests (or [`CATCH_UP_WAITERS_PER_TENANT`] of
    /// `tenant`'s) are waiting already.
    pub async fn caught_up(&self, tenant: &str, within: Duration) -> Option<u64> {
        let _tenant = TenantWaiter::take(&self.waiting, tenant)?;
        let _waiting = self.waiters.try_acquire().ok()?;
        let deadline = tokio::time::Instant::now() + within;
        let mut ends = Vec::with_capacity(self.partitions as usize);
        for p in 0..self.partitions {
            match tokio::time::timeout_at(deadline, self.log.end_offset(&self.topic, p)).await {
                Ok(Ok(end)) => ends.push((p, end)),
                _ => return None,
            }
        }
        // Subscribed before the first look, so a write between the look and the wait wakes it.
        let mut progress = self.index.progress();
        if self.index.behind(&ends) == 0 {
            return Some(0); // nothing to lift the deferral for
        }
        let _wanting = self.load.want();
        loop {
            let behind = self.index.behind(&ends);
            if behind == 0 {
                return Some(0);
            }
            if !matches!(tokio::time::timeout_at(deadline, progress.changed()).await, Ok(Ok(()))) {
                return Some(behind);
            }
        }
    }

    /// Waits for the readers to end (after the stop signal), so the index is closed once the
    /// last handle to it goes.
    pub async fn stopped(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap());
        for t in tasks {
            let _ = t.await;
        }
        // The readers on the indexing thread end at the stop signal too, and so does it.
        let thread = self.thread.lock().unwrap().take();
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Why the history could not start.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The index could not be opened.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The topic is not there.
    #[error("history topic: {0}")]
    Log(#[from] LogError),
}

/// Starts the thread that reads the topic and writes the index, at the lowest CPU priority: the
/// index is derived data, so when deliveries need every core it falls behind
/// (`herald_history_lag`) and catches up when they do not, instead of slowing them. It runs
/// its own single-threaded runtime, so reading the topic (and the blocking reads the embedded
/// log makes, on threads this one starts, which inherit its priority) yields too.
fn start_indexer(
    log: Arc<dyn Log>,
    topic: String,
    partitions: u32,
    index: Arc<Index>,
    load: Arc<Load>,
    stop: watch::Receiver<bool>,
) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new().name("history-index".into()).spawn(move || {
        // Only this thread (and what it starts) yields.
        index::background_priority(0);
        let runtime =
            match tokio::runtime::Builder::new_current_thread().thread_name("history-read").enable_all().build() {
                Ok(r) => r,
                Err(e) => return tracing::error!(error = %e, "cannot start the history indexer"),
            };
        runtime.block_on(async move {
            // Ends with this runtime, when the readers have.
            let tables = index.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(index::TABLE_WRITE_BACK_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    tables.write_back_tables();
                }
            });
            let readers: Vec<_> = (0..partitions)
                .map(|p| tokio::spawn(follow(log.clone(), topic.clone(), p, index.clone(), load.clone(), stop.clone())))
                .collect();
            for r in readers {
                let _ = r.await;
            }
        });
    });
    spawned.map_err(|e| tracing::error!(error = %e, "cannot start the history indexer")).ok()
}

/// Reads one partition of the topic into the index, from where the index left off.
async fn follow(
    log: Arc<dyn Log>,
    topic: String,
    partition: u32,
    index: Arc<Index>,
    load: Arc<Load>,
    mut stop: watch::Receiver<bool>,
) {
    let pause = Duration::from_millis(500);
    loop {
        let from = index.offset(partition);
        // What the index holds on disk may go with the topic's retention (embedded log);
        // what it does not, waits.
        log.read_up_to(&topic, partition, index.durable_offset(partition));
        let mut reader = match log.follow(&topic, partition, from).await {
            Ok(r) => r,
            Err(LogError::Closed) => return,
            Err(e) => {
                tracing::warn!(partition, error = %e, "cannot read the history topic; retrying");
                if !crate::shutdown::sleep(pause, &mut stop).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let batch = tokio::select! {
                b = reader.next_batch(READ_BATCH) => b,
                _ = crate::shutdown::stopped(&mut stop) => return,
            };
            let records = match batch {
                Ok(r) if r.is_empty() => continue,
                Ok(r) => r,
                Err(LogError::Closed) => return,
                Err(e) => {
                    tracing::warn!(partition, error = %e, "reading the history topic failed; resuming");
                    if !crate::shutdown::sleep(pause, &mut stop).await {
                        return;
                    }
                    break;
                }
            };
            // Memory stays bounded: while the store's memtables wait for its flush worker,
            // wait with them.
            while index.flush_backlog() {
                if !crate::shutdown::sleep(Duration::from_millis(20), &mut stop).await {
                    return;
                }
            }
            // While deliveries keep the workers busy, these wait (up to the deferral).
            let (held, oldest) = (std::time::Instant::now(), records.iter().map(|r| r.timestamp_ms).min());
            while load.defers(held, oldest.unwrap_or(i64::MAX), now_ms()) {
                if !crate::shutdown::sleep(BUSY_WINDOW, &mut stop).await {
                    return;
                }
            }
            let next = records.last().map_or(from, |r| r.offset + 1);
            // On the indexer's own thread: blocking here holds up only the other partitions'
            // readers, which feed the same index one batch at a time anyway.
            // The index counts what it indexed (`herald_history_records_total`) as it writes.
            if let Err(e) = index.apply(partition, &records, next, now_ms()) {
                tracing::error!(partition, error = %e, "indexing history failed; resuming from the last indexed record");
                if !crate::shutdown::sleep(pause, &mut stop).await {
                    return;
                }
                break;
            }
            log.read_up_to(&topic, partition, index.durable_offset(partition));
        }
    }
}

/// Deletes days past retention and measures how far the index trails the topic; a stop ends
/// it at once, whatever it waits on (a broker gone quiet answers each partition's end after
/// 10 s: a stop waited for all of them, past a service manager's grace period).
async fn upkeep(log: Arc<dyn Log>, topic: String, partitions: u32, index: Arc<Index>, mut stop: watch::Receiver<bool>) {
    // A clock stepped forward would otherwise delete every day of history at the next tick
    // (for good: the index has read those records, and the topic keeps a day).
    let clock = crate::model::AgeClock::start();
    let mut tick = tokio::time::interval(UPKEEP_EVERY);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
        let once = upkeep_once(&*log, &topic, partitions, &index, &clock);
        tokio::select! {
            _ = once => {}
            _ = crate::shutdown::stopped(&mut stop) => return,
        }
    }
}

/// One round of [`upkeep`]: the partitions' ends are asked for together.
async fn upkeep_once(log: &dyn Log, topic: &str, partitions: u32, index: &Arc<Index>, clock: &crate::model::AgeClock) {
    let idx = index.clone();
    Index::yield_to_delivery();
    let now = clock.guard(now_ms());
    // With the index written out now and then while idle, the topic's records its last
    // batches held go with the retention too.
    if let Ok((expired, synced)) = tokio::task::spawn_blocking(move || (idx.expire(now), idx.sync_if_due())).await {
        match expired {
            Ok(n) if n > 0 => metrics::counter!(crate::metrics::HISTORY_EXPIRED).increment(n),
            Err(e) => tracing::warn!(error = %e, "expiring history failed"),
            _ => {}
        }
        if let Err(e) = synced {
            tracing::warn!(error = %e, "writing the history index out failed");
        }
    }
    for p in 0..partitions {
        log.read_up_to(topic, p, index.durable_offset(p));
    }
    let ends = futures::future::join_all((0..partitions).map(|p| async move { (p, log.end_offset(topic, p).await) }));
    let ends: Vec<(u32, u64)> = ends.await.into_iter().filter_map(|(p, end)| Some((p, end.ok()?))).collect();
    // Only when every partition's end was read: with none (the broker unreachable) the
    // lag read 0, a stuck index looking caught up; the last figure stands meanwhile.
    if ends.len() == partitions as usize {
        metrics::gauge!(crate::metrics::HISTORY_LAG).set(index.behind(&ends) as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A stop ends the upkeep at once, even while it waits on the log (a broker gone quiet
    /// answers each partition's end after 10 s): it waited a partition at a time, and a stop
    /// during an outage took partitions × 10 s, past a service manager's grace period.
    #[tokio::test]
    async fn a_stop_ends_the_upkeep_while_it_waits_on_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(dir.path(), Duration::from_secs(86_400)).unwrap());
        let log = Arc::new(crate::log::stub::Stub::new(true, true));
        log.ends_hang.store(true, Ordering::SeqCst);
        let (stop, stopped) = watch::channel(false);
        let upkept = tokio::spawn(upkeep(log.clone(), "h".into(), 8, index, stopped));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while log.end_queries.load(Ordering::Relaxed) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "the upkeep never asked the log");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(2), upkept).await;
        assert!(ended.is_ok(), "the upkeep went on waiting on the log after the stop");
    }

    /// Waits until `load` says `defers` for records written now, within a deadline.
    fn until_defers(load: &Load, defers: bool) -> bool {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            if load.defers(std::time::Instant::now(), now_ms(), now_ms()) == defers {
                return true;
            }
            std::thread::sleep(BUSY_WINDOW);
        }
        false
    }

    #[test]
    fn indexing_waits_while_the_workers_are_busy_and_never_past_the_deferral() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
        let load = Load::new(runtime.handle().clone(), Duration::from_secs(30));
        let never = Load::new(runtime.handle().clone(), Duration::ZERO);
        // A task that keeps the one worker working (as deliveries at their peak do).
        let spin = Arc::new(AtomicBool::new(true));
        let spinning = spin.clone();
        runtime.spawn(async move {
            while spinning.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(1));
                tokio::task::yield_now().await;
            }
        });
        assert!(until_defers(&load, true), "a busy runtime does not hold indexing back");
        // However busy delivery is: records as old as the deferral are indexed, a batch held
        // that long is indexed (even if its records claim to be from the future), and with
        // no deferral nothing waits.
        let now = std::time::Instant::now();
        assert!(!load.defers(now, now_ms() - 30_000, now_ms()));
        assert!(!load.defers(now - Duration::from_secs(30), now_ms() + 3_600_000, now_ms()));
        assert!(load.defers(now, now_ms() + 3_600_000, now_ms()));
        assert!(!never.defers(now, now_ms(), now_ms()));
        // Someone waiting for the index lifts the deferral while they wait, however busy
        // delivery is.
        let asked = Load::new(runtime.handle().clone(), Duration::from_secs(30));
        assert!(until_defers(&asked, true));
        let wanting = asked.want();
        assert!(!asked.defers(now, now_ms(), now_ms()), "a waiter leaves indexing held back");
        drop(wanting);
        assert!(asked.defers(now, now_ms(), now_ms()), "held back again once nobody waits");
        // Delivery going quiet lets indexing go — not at the first quiet window, as the last
        // deliveries of a burst thin out, but once it has stayed quiet for QUIET.
        assert!(until_defers(&load, true));
        let last_busy = std::time::Instant::now();
        spin.store(false, Ordering::Relaxed);
        assert!(until_defers(&load, false), "indexing still waits once delivery is idle");
        assert!(
            last_busy.elapsed() >= QUIET - BUSY_WINDOW * 2,
            "indexing went {:?} after delivery",
            last_busy.elapsed()
        );
    }

    /// An embedded log of one history partition in `dir`, in segments of 4 KiB, whose records
    /// go with a retention of 1 ms once its reader has read them — reclaimed only when a test
    /// flushes it.
    async fn retained_history(dir: &Path) -> Arc<crate::log::embedded::EmbeddedLog> {
        use crate::log::embedded::{EmbeddedConfig, EmbeddedLog, DEFAULT_JOURNAL_BYTES};
        let topic = crate::log::TopicSpec {
            retention: Some(Duration::from_millis(1)),
            retention_waits_for_reader: true,
            read_within: Duration::from_millis(50),
            ..crate::log::TopicSpec::for_tests("history", 1)
        };
        EmbeddedLog::open(EmbeddedConfig {
            dir: dir.join("log"),
            segment_bytes: 4096,
            flush_interval: Duration::from_secs(3600),
            topics: vec![topic],
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            faults: None,
        })
        .await
        .unwrap()
    }

    /// Event `evt_{i}` of tenant `t`, its data padded to about 200 bytes.
    fn padded_event(i: usize) -> EventRecord {
        EventRecord {
            id: format!("evt_{i}"),
            tenant: "t".into(),
            event_type: "T".into(),
            accepted_ms: now_ms(),
            subscriptions: vec!["sub".into()],
            data: bytes::Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(200))),
            changes: None,
            ordering_key: None,
            seq: 0,
        }
    }

    /// Records events 0 to 99 into `log`'s history topic (over more than three segments); the
    /// recorder and how many segments they fill.
    async fn hundred_events(log: &Arc<crate::log::embedded::EmbeddedLog>) -> (Arc<Recorder>, usize) {
        let recorder = Recorder::start(log.clone(), "history".into());
        for i in 0..100 {
            recorder.append(&[HistoryRecord::Event(padded_event(i))]).await.unwrap();
        }
        let segments = log.segment_count("history", 0).unwrap();
        assert!(segments > 3, "{segments} segments");
        (recorder, segments)
    }

    /// Herald stopped with records of the history topic not indexed yet, and stayed down
    /// longer than the embedded topic's retention: they wait for the index, which takes them
    /// when it starts again; once indexed they go with the retention.
    #[test]
    fn records_the_index_had_not_read_outlive_the_topic_s_retention() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let log = retained_history(dir.path()).await;
            // Recorded while the index was down.
            let (_recorder, segments) = hundred_events(&log).await;
            // Past the retention: the flusher's reclaim finds every sealed segment old enough.
            let written = now_ms();
            while now_ms() <= written + 1 {
                std::thread::yield_now();
            }
            log.flush().await.unwrap();
            assert_eq!(log.segment_count("history", 0).unwrap(), segments, "reclaimed unread");
            let (stop, stopped) = watch::channel(false);
            let history = History::start(
                log.clone(),
                "history",
                &dir.path().join("index"),
                Duration::from_secs(86_400),
                Duration::ZERO,
                &Metrics::new(),
                stopped,
            )
            .unwrap();
            assert_eq!(history.caught_up("t", Duration::from_secs(20)).await, Some(0));
            for i in 0..100 {
                assert!(history.index.event("t", &format!("evt_{i}")).unwrap().is_some(), "evt_{i} lost");
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while log.segment_count("history", 0).unwrap() > 1 {
                assert!(std::time::Instant::now() < deadline, "read records kept past the retention");
                log.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.send(true).unwrap();
            history.stopped().await;
        });
    }

    /// The topic's records go with its retention only once the index holding them is on
    /// disk: read positions were reported as each batch reached the store's journal in memory
    /// (written out every 200 ms, and after a catch-up's last batch not at all), so a power
    /// cut after the reclaim lost those records from the index and the topic both.
    #[test]
    fn the_topic_s_records_go_only_once_the_index_holding_them_is_on_disk() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let log = retained_history(dir.path()).await;
            let (recorder, segments) = hundred_events(&log).await;
            // An index that writes its journal out only when told to.
            let index =
                Arc::new(Index::open(&dir.path().join("index"), Duration::from_secs(86_400)).unwrap().unsynced());
            let load = Arc::new(Load::new(tokio::runtime::Handle::current(), Duration::ZERO));
            let (stop, stopped) = watch::channel(false);
            let reader = tokio::spawn(follow(log.clone(), "history".into(), 0, index.clone(), load, stopped));
            let indexed = |n: u64| {
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let index = index.clone();
                async move {
                    while index.offset(0) < n {
                        assert!(std::time::Instant::now() < deadline, "indexed up to {}", index.offset(0));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            };
            indexed(100).await;
            let past = now_ms();
            while now_ms() <= past + 1 {
                std::thread::yield_now();
            }
            log.flush().await.unwrap();
            assert_eq!(log.segment_count("history", 0).unwrap(), segments, "reclaimed before the index was on disk");
            // Written out: the next batch read tells the log how far the index holds for good.
            index.sync().unwrap();
            recorder.append(&[HistoryRecord::Event(padded_event(100))]).await.unwrap();
            indexed(101).await;
            // (The reader tells the log just after the index has the batch.)
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while log.segment_count("history", 0).unwrap() >= segments {
                assert!(std::time::Instant::now() < deadline, "what the index holds on disk is kept");
                log.flush().await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.send(true).unwrap();
            reader.await.unwrap();
        });
    }

    /// A history of two partitions on an embedded log in `dir`, indexing deferred up to
    /// `defer`; and the sender that stops it.
    async fn started(dir: &Path, defer: Duration) -> (Arc<History>, watch::Sender<bool>) {
        use crate::log::embedded::{EmbeddedConfig, EmbeddedLog, DEFAULT_JOURNAL_BYTES};
        use crate::log::TopicSpec;
        let topic = TopicSpec {
            name: "history".into(),
            partitions: 2,
            compacted: false,
            retention: None,
            retention_waits_for_reader: false,
            read_within: Duration::from_millis(50),
            keyed: false,
        };
        let log = EmbeddedLog::open(EmbeddedConfig {
            dir: dir.join("log"),
            segment_bytes: 1 << 20,
            flush_interval: Duration::from_millis(20),
            topics: vec![topic],
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            faults: None,
        })
        .await
        .unwrap();
        let (stop, stopped) = watch::channel(false);
        let day = Duration::from_secs(86_400);
        let history = History::start(log, "history", &dir.join("index"), day, defer, &Metrics::new(), stopped).unwrap();
        (history, stop)
    }

    /// A tenant's queries read the index [`READS_PER_TENANT`] at a time, and another tenant's
    /// read goes on meanwhile: one tenant's queries at its request rate took every core the
    /// machine has, on the blocking threads the log's reads share.
    #[test]
    fn a_tenant_s_queries_read_the_index_a_few_at_a_time_and_another_s_go_on() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let (history, stop) = started(dir.path(), Duration::ZERO).await;
            // Each of the greedy tenant's reads holds its thread until the gate opens.
            let gate = Arc::new((std::sync::Mutex::new(false), std::sync::Condvar::new()));
            let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let greedy: Vec<_> = (0..10)
                .map(|_| {
                    let (history, gate, running) = (history.clone(), gate.clone(), running.clone());
                    tokio::spawn(async move {
                        history
                            .read("greedy", move |_| {
                                running.fetch_add(1, Ordering::SeqCst);
                                let open = gate.0.lock().unwrap();
                                drop(gate.1.wait_while(open, |open| !*open).unwrap());
                                Ok(())
                            })
                            .await
                    })
                })
                .collect();
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while running.load(Ordering::SeqCst) < READS_PER_TENANT {
                assert!(std::time::Instant::now() < deadline, "the greedy tenant's reads never started");
                tokio::task::yield_now().await;
            }
            let other = tokio::time::timeout(Duration::from_secs(10), history.read("other", |_| Ok(7))).await;
            assert_eq!(other.expect("another tenant's read waited").unwrap().unwrap(), 7);
            assert_eq!(running.load(Ordering::SeqCst), READS_PER_TENANT, "the greedy tenant's reads at once");
            *gate.0.lock().unwrap() = true;
            gate.1.notify_all();
            for read in greedy {
                read.await.unwrap().unwrap().unwrap();
            }
            assert_eq!(running.load(Ordering::SeqCst), 10);
            stop.send(true).unwrap();
            history.stopped().await;
        });
    }

    /// Tenant `t`'s event `evt_now`, accepted now.
    fn event_now() -> EventRecord {
        EventRecord {
            id: "evt_now".into(),
            tenant: "t".into(),
            event_type: "T".into(),
            accepted_ms: now_ms(),
            subscriptions: vec!["sub".into()],
            data: bytes::Bytes::from_static(b"{}"),
            changes: None,
            ordering_key: None,
            seq: 0,
        }
    }

    /// A lookup of an event the index does not hold lifts the deferral only while the index
    /// lacks records the topic has, and only until it has them: lifted for five seconds at
    /// each lookup, a tenant looking up ids that never existed, in a loop, kept every
    /// tenant's deliveries paying for the index as it went.
    #[test]
    fn a_lookup_lifts_the_deferral_only_while_the_index_catches_up() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let (history, stop) = started(dir.path(), Duration::from_secs(600)).await;
            history.load.busy.store(true, Ordering::Relaxed);
            let defers = || history.load.defers(std::time::Instant::now(), now_ms(), now_ms());
            assert!(defers());
            assert_eq!(history.caught_up("t", Duration::from_secs(5)).await, Some(0), "nothing to wait for");
            assert!(defers(), "lifted though the index lacked nothing");
            history.recorder.append(&[HistoryRecord::Event(event_now())]).await.unwrap();
            assert_eq!(history.caught_up("t", Duration::from_secs(20)).await, Some(0));
            assert!(history.index.event("t", "evt_now").unwrap().is_some());
            assert!(defers(), "still lifted once the index had what was asked for");
            stop.send(true).unwrap();
            history.stopped().await;
        });
    }

    /// While delivery is busy and indexing waits, an answer that must not miss the newest
    /// records (`caught_up`) gets them indexed at once, not a deferral later.
    #[test]
    fn catching_up_indexes_what_the_topic_holds_though_indexing_waits() {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let dir = tempfile::tempdir().unwrap();
        runtime.block_on(async {
            let (history, stop) = started(dir.path(), Duration::from_secs(600)).await;
            // Delivery at its peak, whatever this machine's load makes of a measure.
            history.load.busy.store(true, Ordering::Relaxed);
            assert!(history.load.defers(std::time::Instant::now(), now_ms(), now_ms()));
            history.recorder.append(&[HistoryRecord::Event(event_now())]).await.unwrap();
            let ends = history.log.end_offset("history", 0).await.unwrap()
                + history.log.end_offset("history", 1).await.unwrap();
            assert_eq!(ends, 1, "the event is in the topic");
            assert!(history.index.event("t", "evt_now").unwrap().is_none(), "indexed without waiting");
            // Beyond the bound on waiters, a request answers from what is indexed.
            let all = history.waiters.try_acquire_many(CATCH_UP_WAITERS as u32).unwrap();
            assert_eq!(history.caught_up("t", Duration::from_secs(20)).await, None);
            assert!(history.index.event("t", "evt_now").unwrap().is_none(), "indexed without a waiter");
            drop(all);
            // Nor can one tenant take every place: its own waits beyond its share answer at once.
            let greedy: Vec<_> = (0..CATCH_UP_WAITERS_PER_TENANT)
                .map(|_| TenantWaiter::take(&history.waiting, "greedy").unwrap())
                .collect();
            assert_eq!(history.caught_up("greedy", Duration::from_secs(20)).await, None);
            assert!(history.index.event("t", "evt_now").unwrap().is_none());
            drop(greedy);
            assert_eq!(history.caught_up("t", Duration::from_secs(20)).await, Some(0));
            assert!(history.index.event("t", "evt_now").unwrap().is_some());
            stop.send(true).unwrap();
            history.stopped().await;
        });
    }
}
