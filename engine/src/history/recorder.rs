//! Appends history records to the history topic. Attempts from every delivery in flight are
//! gathered into one append (the log's group commit makes that one write). A delivery does not
//! wait for its record: instead its partition's commit point does ([`Recorder::gate`]), so an
//! offset is committed only once the history records of everything before it are durable, and
//! after a crash no settled attempt is missing. The wait has a budget: if the log cannot take
//! history in time, commits go on (`herald_history_late_total`) and the records follow.

use super::record::{self, HistoryRecord};
use crate::log::{partition_for, Committer, Log, LogError, Record};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The longest a commit waits for history records.
const BUDGET: Duration = Duration::from_secs(2);
/// Records gathered into one append at most.
const BATCH: usize = 4096;
/// Records waiting to be appended at most; beyond, new ones are dropped (and counted late).
const QUEUE: usize = 1 << 16;
/// Bytes of records waiting or being appended at most, likewise: a receiver chooses how large
/// an attempt's record is (its headers and the body kept), and [`QUEUE`] records of 16 KiB
/// held a gigabyte while the log took no history.
const QUEUE_BYTES: usize = 64 << 20;
/// The least time between two appends. Appending whatever was queued the moment the last
/// append returned made one small append (and, on the embedded log, one `fsync`) per
/// millisecond or so under load: during a 1 M backlog drain the log writer thread took
/// 0.15 of a core, nearly all of it switching in and out for those appends, and the index
/// woke as often to apply a few dozen records. Waiting out this gap gathers ~25 ms of
/// attempts into one append: the writer's share fell to a fifth and the drain ran 20 %
/// faster (BENCHMARKS.md, "Delivery history"). What waits is only the commit of offsets
/// (and the attempts' appearance in queries), never a delivery; an attempt after a quiet
/// spell is appended at once.
const APPEND_GAP: Duration = Duration::from_millis(25);
/// Bytes of records packed into one record of the topic at most ([`record::bundle`]): dozens
/// of attempts, a dozen events; small beside any record size a log takes, and a reader's batch
/// of them stays a few MiB.
const BUNDLE_BYTES: usize = 16 << 10;

/// Writes history records.
pub struct Recorder {
    log: Arc<dyn Log>,
    topic: String,
    queue: mpsc::Sender<(u64, Record)>,
    /// Held while numbering and queueing a record, so the queue is in sequence order.
    order: Mutex<()>,
    /// Sequence number of the last record queued.
    queued: AtomicU64,
    /// Sequence number up to which every record queued is durable.
    durable: watch::Receiver<u64>,
    /// Gated committers with commits waiting.
    waiting: Mutex<Vec<std::sync::Weak<Gated>>>,
    /// Dropped records are logged once a second at most.
    dropped_logged: crate::model::AtMostEvery,
    /// Bytes of the records queued or being appended ([`QUEUE_BYTES`]).
    held: Arc<std::sync::atomic::AtomicUsize>,
}

impl Recorder {
    /// A recorder appending to `topic`, with its writer running.
    pub fn start(log: Arc<dyn Log>, topic: String) -> Arc<Recorder> {
        let (queue, rx) = mpsc::channel(QUEUE);
        let (durable_tx, durable) = watch::channel(0);
        let held = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        tokio::spawn(write(log.clone(), topic.clone(), rx, durable_tx, held.clone()));
        let recorder = Arc::new(Recorder {
            log,
            topic,
            queue,
            order: Mutex::new(()),
            queued: AtomicU64::new(0),
            durable: durable.clone(),
            waiting: Mutex::default(),
            dropped_logged: Default::default(),
            held,
        });
        tokio::spawn(release(Arc::downgrade(&recorder), durable));
        recorder
    }

    fn record_of(rec: &HistoryRecord) -> Record {
        Record { key: bytes::Bytes::copy_from_slice(rec.key().as_bytes()), value: rec.encode() }
    }

    /// Queues `rec`; it is durable by the time a commit gated by this recorder goes through.
    /// With [`QUEUE`] records waiting (the log has not taken history for a while), it is
    /// dropped instead: counted (`herald_history_dropped_total`), and logged at most once a
    /// second, since it will never be in the history.
    pub fn record(&self, rec: &HistoryRecord) {
        let record = Self::record_of(rec);
        let size = held_size(&record);
        let _ordered = self.order.lock().unwrap();
        let seq = self.queued.load(Ordering::SeqCst) + 1;
        let room = self.held.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
            (held + size <= QUEUE_BYTES).then_some(held + size)
        });
        if room.is_ok() {
            match self.queue.try_send((seq, record)) {
                Ok(()) => {
                    self.queued.store(seq, Ordering::SeqCst);
                    return;
                }
                Err(_) => {
                    self.held.fetch_sub(size, Ordering::SeqCst);
                }
            }
        }
        metrics::counter!(crate::metrics::HISTORY_DROPPED).increment(1);
        if self.dropped_logged.due(1000) {
            tracing::error!(
                waiting_bytes = self.held.load(Ordering::SeqCst),
                "the log has not taken history for a while: attempts settling now are not recorded"
            );
        }
    }

    /// Appends `records` now (accepted events: the request waits for them like for its
    /// deliveries).
    pub async fn append(&self, records: &[HistoryRecord]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        let records = for_topic(&*self.log, &self.topic, records.iter().map(Self::record_of).collect());
        self.log.append(&self.topic, records).await.map(|_| ())
    }

    /// Appends `rec` now, within the budget a commit waits for history; queued if the log
    /// refuses it or does not take it by then (an ordered head's record, before its marker:
    /// awaited without a bound, a history partition whose leader was away held each head for
    /// the producer's whole message timeout). A record both appended late and queued is kept
    /// once (the index keys an attempt by its id).
    pub async fn append_or_queue(&self, rec: &HistoryRecord) {
        match tokio::time::timeout(BUDGET, self.append(std::slice::from_ref(rec))).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "a history record was not appended; queued");
                self.record(rec);
            }
            Err(_) => self.record(rec),
        }
    }

    /// Waits until every record queued so far is durable, or the budget passed.
    pub async fn synced(&self) {
        self.drain(BUDGET).await;
    }

    /// Waits, `within` at most, until every record queued so far is durable; returns how many
    /// are not. For a stop, once deliveries have ended and before the log closes: records the
    /// log did not take in time (their offsets committed late) are written if it takes them
    /// by then — closed under the writer waiting out its back-off, they were lost for good.
    pub async fn drain(&self, within: Duration) -> u64 {
        let target = self.queued.load(Ordering::SeqCst);
        let mut durable = self.durable.clone();
        let _ = tokio::time::timeout(within, durable.wait_for(|d| *d >= target)).await;
        let done = *durable.borrow();
        target.saturating_sub(done)
    }

    /// `inner`, committing an offset only once every history record queued before it is
    /// durable (or the budget passed).
    pub fn gate(self: &Arc<Self>, inner: Arc<dyn Committer>) -> Arc<dyn Committer> {
        Arc::new_cyclic(|me| Gated { inner, recorder: self.clone(), pending: Mutex::default(), me: me.clone() })
    }
}

/// A committer whose commits wait for the history.
struct Gated {
    inner: Arc<dyn Committer>,
    recorder: Arc<Recorder>,
    /// Commits waiting: the offset, the last record before it, and when to stop waiting.
    pending: Mutex<VecDeque<(u64, u64, Instant)>>,
    me: std::sync::Weak<Gated>,
}

impl Committer for Gated {
    fn commit(&self, next: u64) {
        let seq = self.recorder.queued.load(Ordering::SeqCst);
        if *self.recorder.durable.borrow() >= seq && self.pending.lock().unwrap().is_empty() {
            self.inner.commit(next);
            return;
        }
        let mut pending = self.pending.lock().unwrap();
        if pending.is_empty() {
            self.recorder.waiting.lock().unwrap().push(self.me.clone());
        }
        pending.push_back((next, seq, Instant::now() + BUDGET));
    }

    fn end_offset(&self) -> u64 {
        self.inner.end_offset()
    }

    fn committed(&self) -> u64 {
        self.inner.committed()
    }
}

impl Drop for Gated {
    /// The last commits whose history is durable go through as the shard lets go (it waits
    /// for [`Recorder::synced`] first when it stops).
    fn drop(&mut self) {
        let done = *self.recorder.durable.borrow();
        let pending = self.pending.get_mut().unwrap();
        if let Some(next) = pending.iter().take_while(|(_, seq, _)| *seq <= done).map(|(n, _, _)| *n).last() {
            self.inner.commit(next);
        }
    }
}

impl Gated {
    /// Commits what may go through now; whether commits are still waiting.
    fn release(&self, durable: u64, now: Instant) -> bool {
        let mut pending = self.pending.lock().unwrap();
        let mut release = None;
        let mut late = 0;
        while let Some(&(next, seq, until)) = pending.front() {
            if seq <= durable {
                release = Some(next);
            } else if until <= now {
                release = Some(next);
                late += 1;
            } else {
                break;
            }
            pending.pop_front();
        }
        if let Some(next) = release {
            self.inner.commit(next);
        }
        if late > 0 {
            metrics::counter!(crate::metrics::HISTORY_LATE).increment(late);
        }
        !pending.is_empty()
    }
}

/// Lets waiting commits through as the history they wait for becomes durable, or once their
/// budget is spent; only committers with commits waiting are looked at.
async fn release(recorder: std::sync::Weak<Recorder>, mut durable: watch::Receiver<u64>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Until the writer ends (its log closed): then only budgets release commits.
    let mut writing = true;
    loop {
        tokio::select! {
            changed = durable.changed(), if writing => writing = changed.is_ok(),
            _ = tick.tick() => {}
        }
        let Some(recorder) = recorder.upgrade() else { return };
        let done = *durable.borrow();
        let now = Instant::now();
        let waiting = std::mem::take(&mut *recorder.waiting.lock().unwrap());
        let still: Vec<_> = waiting.into_iter().filter(|w| w.upgrade().is_some_and(|g| g.release(done, now))).collect();
        recorder.waiting.lock().unwrap().extend(still);
    }
}

/// `records` as they go to `topic` ([`bundled`] by its partitions). A topic whose partitions
/// are unknown would refuse the append anyway: then the records go as they are, and the
/// append reports why.
fn for_topic(log: &dyn Log, topic: &str, records: Vec<Record>) -> Vec<Record> {
    match log.partitions(topic) {
        Ok(partitions) => bundled(records, partitions),
        Err(_) => records,
    }
}

/// `records` as they go to the topic: those bound for one partition, in their order, packed
/// into bundles of up to [`BUNDLE_BYTES`] (keyed by their first member, so a bundle goes where
/// each of its members would have gone); a record alone, or too large to share, goes as it is.
fn bundled(records: Vec<Record>, partitions: u32) -> Vec<Record> {
    let partitions = partitions.max(1);
    let mut by_partition: Vec<Vec<Record>> = (0..partitions).map(|_| Vec::new()).collect();
    for r in records {
        let p = partition_for(&r.key, partitions) as usize;
        by_partition[p].push(r);
    }
    let mut out = Vec::new();
    for records in by_partition {
        let mut group: Vec<Record> = Vec::new();
        let mut bytes = 0;
        for r in records {
            if !group.is_empty() && bytes + r.value.len() + 4 > BUNDLE_BYTES {
                out.push(pack(std::mem::take(&mut group)));
                bytes = 0;
            }
            bytes += r.value.len() + 4;
            group.push(r);
        }
        if !group.is_empty() {
            out.push(pack(group));
        }
    }
    out
}

/// One record of the topic for `group`: its only member, or a bundle of them.
fn pack(mut group: Vec<Record>) -> Record {
    if group.len() == 1 {
        return group.pop().expect("one");
    }
    let members: Vec<&[u8]> = group.iter().map(|r| &r.value[..]).collect();
    Record { key: group[0].key.clone(), value: record::bundle(&members) }
}

/// Appends `records`, retrying a failed append until the log takes it (or could never take
/// it); `false` when the log is closed, so nothing it was given is durable.
async fn append_until_taken(log: &Arc<dyn Log>, topic: &str, records: Vec<Record>) -> bool {
    let mut backoff = Duration::from_millis(50);
    loop {
        match log.append(topic, records.clone()).await {
            Ok(_) => return true,
            Err(LogError::Closed) => return false,
            Err(e @ LogError::TooLarge { .. }) => {
                let dropped: usize = records.iter().map(|r| record::members(&r.value).count()).sum();
                metrics::counter!(crate::metrics::HISTORY_DROPPED).increment(dropped as u64);
                tracing::error!(error = %e, records = dropped, "history records too large for the log; dropped");
                return true;
            }
            Err(e) => {
                tracing::warn!(error = %e, records = records.len(), "history append failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// What a queued record counts against [`QUEUE_BYTES`], taken and given back the same.
fn held_size(record: &Record) -> usize {
    record.key.len() + record.value.len()
}

/// The writer: takes whatever is queued, at most once every [`APPEND_GAP`] unless the last
/// append was a full [`BATCH`] (a gap after full batches would cap history at 160 k records a
/// second), appends it in one go, then marks it durable.
async fn write(
    log: Arc<dyn Log>,
    topic: String,
    mut rx: mpsc::Receiver<(u64, Record)>,
    durable: watch::Sender<u64>,
    held: Arc<std::sync::atomic::AtomicUsize>,
) {
    // When the last append started, if it was not full: after a full one, more is waiting.
    let mut last_append: Option<Instant> = None;
    while let Some((first_seq, first)) = rx.recv().await {
        if let Some(at) = last_append {
            tokio::time::sleep_until(at + APPEND_GAP).await;
        }
        let mut last = first_seq;
        let mut records = vec![first];
        while records.len() < BATCH {
            match rx.try_recv() {
                Ok((seq, r)) => {
                    last = last.max(seq);
                    records.push(r);
                }
                Err(_) => break,
            }
        }
        last_append = (records.len() < BATCH).then(Instant::now);
        let bytes: usize = records.iter().map(held_size).sum();
        if !append_until_taken(&log, &topic, for_topic(&*log, &topic, records)).await {
            // Closed: these records, and any after, will never be durable. Commits gated on
            // them wait out their budget (counted late) instead of passing as if they were.
            return;
        }
        held.fetch_sub(bytes, Ordering::SeqCst);
        durable.send_modify(|d| *d = (*d).max(last));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::{State, StateRecord};
    use crate::log::stub::Stub;
    use bytes::Bytes;

    fn state(n: usize) -> HistoryRecord {
        HistoryRecord::State(StateRecord {
            event_id: format!("evt_{n}"),
            subscription: "sub".into(),
            tenant: "t".into(),
            accepted_ms: 0,
            at_ms: 0,
            state: State::Pending,
            error: None,
        })
    }

    /// Records waiting are bounded by their bytes too, not only their number: a receiver
    /// chooses how large each attempt's record is (32 headers of 512 bytes, the kept body), so
    /// 65,536 of them waiting for a log that stopped taking history held over a gigabyte.
    #[tokio::test]
    async fn records_waiting_for_the_log_are_bounded_by_their_bytes() {
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let recorder = Recorder::start(log.clone(), "history".into());
        let large = |n: usize| match state(n) {
            HistoryRecord::State(s) => HistoryRecord::State(StateRecord { error: Some("e".repeat(16 << 10)), ..s }),
            other => other,
        };
        for n in 0..8_192 {
            recorder.record(&large(n));
        }
        let held = recorder.held.load(Ordering::SeqCst);
        assert!(held <= QUEUE_BYTES, "{held} bytes held");
        assert!(held > QUEUE_BYTES / 2, "what fits is kept: {held} bytes");
        log.resume();
    }

    /// A record appended now (an ordered head's) waits for the log within the budget, then is
    /// queued: it waited for the log's own timeout (30 s on Kafka) with every key behind it.
    #[tokio::test(start_paused = true)]
    async fn a_record_appended_now_waits_for_the_log_within_the_budget() {
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let recorder = Recorder::start(log.clone(), "history".into());
        let started = Instant::now();
        recorder.append_or_queue(&state(0)).await;
        assert!(started.elapsed() <= BUDGET + Duration::from_millis(100), "{:?}", started.elapsed());
        assert_eq!(recorder.queued.load(Ordering::SeqCst), 1, "queued once the budget passed");
        log.resume();
    }

    /// The clock is paused: it moves only when every task waits, so records queued one at a
    /// time, with the writer free to run between them, show whether it waits out the gap.
    #[tokio::test(start_paused = true)]
    async fn a_lone_record_is_appended_at_once_and_those_within_the_gap_together() {
        let log = Arc::new(Stub::new(true, true));
        let recorder = Recorder::start(log.clone(), "history".into());
        let started = Instant::now();
        // Per append, the history records it carried (bundled or not).
        let appended = || -> Vec<usize> {
            let appends = log.appends.lock().unwrap();
            appends.iter().map(|a| a.iter().map(|r| record::members(&r.value).count()).sum()).collect()
        };
        recorder.record(&state(0));
        recorder.synced().await;
        assert_eq!(appended(), [1]);
        assert_eq!(Instant::now(), started, "a lone record waited");

        for n in 1..=100 {
            recorder.record(&state(n));
            tokio::task::yield_now().await;
        }
        recorder.synced().await;
        assert_eq!(appended(), [1, 100], "records queued within the gap went out apart");
        assert_eq!(log.appends.lock().unwrap()[1].len(), 1, "in one bundle");
        assert!(Instant::now() >= started + APPEND_GAP);
    }

    /// A record dropped for good (the queue full while the log takes no history) is counted
    /// apart from those merely late: both went to `herald_history_late_total`, which also rises
    /// in routine moments, so attempts missing from the history for good went unseen.
    #[tokio::test]
    async fn a_record_dropped_for_good_is_counted_apart_from_late_ones() {
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let recorder = Recorder::start(log.clone(), "history".into());
        recorder.record(&state(0));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.started.load(Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the writer never began its append");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        for n in 1..=QUEUE {
            recorder.record(&state(n)); // fills the queue while the writer waits on the log
        }
        let exporter = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = exporter.handle();
        metrics::with_local_recorder(&exporter, || recorder.record(&state(QUEUE + 1)));
        let text = scrape.render();
        assert!(text.contains("herald_history_dropped_total 1"), "{text}");
        assert!(!text.contains("herald_history_late_total"), "{text}");
    }

    /// Records the log refuses as too large are counted dropped, as many as the refused
    /// bundles held: they were only logged.
    #[tokio::test]
    async fn records_too_large_for_the_log_are_counted_dropped() {
        let exporter = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = exporter.handle();
        let _local = metrics::set_default_local_recorder(&exporter);
        let mut stub = Stub::new(true, true);
        stub.too_large = Some("history");
        let recorder = Recorder::start(Arc::new(stub), "history".into());
        recorder.record(&state(0));
        recorder.record(&state(1));
        recorder.synced().await;
        let text = scrape.render();
        assert!(text.contains("herald_history_dropped_total 2"), "{text}");
    }

    /// The committer underneath a gate: the last offset committed.
    #[derive(Default)]
    struct Committed(AtomicU64);

    impl Committer for Committed {
        fn commit(&self, next: u64) {
            self.0.store(next, Ordering::SeqCst);
        }
        fn end_offset(&self) -> u64 {
            0
        }
        fn committed(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    /// A record the log refused because it is closed is not durable: a commit after it waits
    /// out the budget (counted late), rather than passing at once as if it were.
    #[tokio::test(start_paused = true)]
    async fn a_record_a_closed_log_refused_is_not_taken_for_durable() {
        let log = Arc::new(Stub::new(false, true));
        let recorder = Recorder::start(log, "history".into());
        let inner = Arc::new(Committed::default());
        let gated = recorder.gate(inner.clone());
        recorder.record(&state(0));
        gated.commit(5);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(inner.committed(), 0, "committed past a record the log refused");
        tokio::time::sleep(BUDGET).await;
        assert_eq!(inner.committed(), 5, "the budget still lets it through");
    }

    #[test]
    fn records_are_bundled_per_partition_in_order_and_within_the_size() {
        let partitions = 3;
        let mut records = Vec::new();
        for n in 0..600 {
            let key = format!("sub_{}", n % 7);
            // Every 50th record is too large to share a bundle (with its length, it would not fit).
            let size = if n % 50 == 0 { BUNDLE_BYTES } else { 100 + n % 300 };
            records.push(Record { key: key.into_bytes().into(), value: format!("{n:08}").repeat(size / 8).into() });
        }
        let out = bundled(records.clone(), partitions);
        assert!(out.len() < records.len() / 10, "{} topic records for {}", out.len(), records.len());
        let mut seen: Vec<Vec<Bytes>> = vec![Vec::new(); partitions as usize];
        for r in &out {
            let p = partition_for(&r.key, partitions) as usize;
            let members: Vec<&[u8]> = record::members(&r.value).collect();
            if members.len() > 1 {
                assert!(r.value.len() <= BUNDLE_BYTES + 6, "a bundle of {} bytes", r.value.len());
            }
            seen[p].extend(members.iter().map(|m| Bytes::copy_from_slice(m)));
        }
        for (p, got) in seen.iter().enumerate() {
            let want: Vec<Bytes> = records
                .iter()
                .filter(|r| partition_for(&r.key, partitions) as usize == p)
                .map(|r| r.value.clone())
                .collect();
            assert_eq!(got, &want, "partition {p}: every record once, in order, where its key sends it");
        }
        let lone = Record { key: "sub".into(), value: HistoryRecord::encode(&state(1)) };
        assert_eq!(bundled(vec![lone.clone()], partitions)[0].value, lone.value, "a lone record goes as it is");
    }
}
