//! A member of a Kafka consumer group on one topic, with cooperative rebalancing.
//!
//! Each assigned partition gets its own queue (split from the consumer before the partition
//! is assigned, and again when a reader lost with a dead worker is reopened), so shards read
//! their partitions independently. On revoke the shard is
//! told to stop; the rebalance waits (bounded) until it has finished or abandoned its
//! in-flight deliveries and dropped its reader, then commits the stored offsets, and only
//! then lets the partition go. Offsets are stored only for the contiguous completed prefix
//! (the shard's commit point) and committed every second.

use super::reader::{Gaps, GAP_PAUSE};
use super::{kafka_error, KafkaConfig};
use crate::log::{Assignment, Committer, Consumer, LogError, LogRecord, PartitionReader};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use rdkafka::client::ClientContext;
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

type Kafka = StreamConsumer<GroupContext>;

/// Offsets of one assigned partition, for lag.
struct Progress {
    /// High watermark from the client's statistics.
    end: AtomicU64,
    /// Next offset stored for commit; `u64::MAX` until the first commit or read.
    stored: AtomicU64,
}

/// Tests: the bytes the client holds fetched ahead, by topic and partition, at its last
/// statistics.
#[cfg(test)]
pub(super) static PREFETCHED: Mutex<std::collections::BTreeMap<(String, i32), u64>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Rebalance callbacks: hand partitions to the dispatcher and take them back.
pub(super) struct GroupContext {
    topic: String,
    events: mpsc::UnboundedSender<Assignment>,
    consumer: OnceLock<Weak<Kafka>>,
    progress: Mutex<HashMap<i32, Arc<Progress>>>,
    /// Per assigned partition: disconnected once its reader is dropped.
    live: Mutex<HashMap<i32, std::sync::mpsc::Receiver<()>>>,
    closed: watch::Receiver<bool>,
    drain: Duration,
    /// Where the group starts a partition with no committed offset (`auto.offset.reset`,
    /// which Herald fixes at the earliest).
    reset: Offset,
}

impl ClientContext for GroupContext {
    fn stats(&self, stats: Statistics) {
        let Some(topic) = stats.topics.get(&self.topic) else { return };
        let progress = self.progress.lock().unwrap();
        #[cfg(test)]
        for (p, s) in &topic.partitions {
            PREFETCHED.lock().unwrap().insert((self.topic.clone(), *p), s.fetchq_size);
        }
        for (p, s) in &topic.partitions {
            if let (Some(state), true) = (progress.get(p), s.hi_offset >= 0) {
                state.end.store(s.hi_offset as u64, Ordering::Relaxed);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, base: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => self.assign(tpl),
            Rebalance::Revoke(tpl) => self.revoke(base, tpl),
            Rebalance::Error(e) => tracing::warn!(topic = %self.topic, error = %e, "kafka rebalance error"),
        }
    }
}

impl GroupContext {
    fn assign(&self, tpl: &TopicPartitionList) {
        // Upgrading is safe here: an assignment never arrives while the consumer drops.
        let Some(consumer) = self.consumer.get().and_then(Weak::upgrade) else { return };
        for elem in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
            let partition = elem.partition();
            // A reader from an earlier assignment that outlived its revoke still holds the
            // partition's queue: dropping it later would cut the new one's wake-ups off.
            let lingering = self.live.lock().unwrap().remove(&partition);
            if let Some(old) = lingering.filter(still_reading) {
                if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = old.recv_timeout(self.drain) {
                    tracing::warn!(topic = %self.topic, partition, "an earlier reader of the partition is still busy; reading it anyway");
                }
            }
            let progress = Arc::new(Progress { end: AtomicU64::new(0), stored: AtomicU64::new(u64::MAX) });
            self.progress.lock().unwrap().insert(partition, progress.clone());
            let Some(reader) = self.reader(&consumer, partition, progress) else { continue };
            tracing::info!(topic = %self.topic, partition, "partition assigned");
            let _ = self.events.send(Assignment::Assigned(Box::new(reader)));
        }
    }

    /// A reader of `partition` on a queue of its own, split from the consumer.
    fn reader(&self, consumer: &Arc<Kafka>, partition: i32, progress: Arc<Progress>) -> Option<GroupReader> {
        let Some(queue) = consumer.split_partition_queue(&self.topic, partition) else {
            tracing::error!(topic = %self.topic, partition, "cannot read partition: no queue");
            return None;
        };
        let (alive, watch_alive) = std::sync::mpsc::channel();
        self.live.lock().unwrap().insert(partition, watch_alive);
        Some(GroupReader {
            queue,
            partition: partition as u32,
            committer: Arc::new(GroupCommitter {
                consumer: Arc::downgrade(consumer),
                topic: self.topic.clone(),
                partition,
                progress,
            }),
            closed: self.closed.clone(),
            next: 0,
            _alive: alive,
            resume: None,
            gaps: Gaps::default(),
            reset: self.reset,
            held: false,
            fresh: true,
            resuming: None,
        })
    }

    fn revoke(&self, base: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let mut waiting = Vec::new();
        {
            // The progress lock first, as `reopen` takes it: from here on no reader is made
            // again for these partitions.
            let mut progress = self.progress.lock().unwrap();
            for elem in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
                let partition = elem.partition();
                progress.remove(&partition);
                let live = self.live.lock().unwrap().remove(&partition);
                if self.events.send(Assignment::Revoked(partition as u32)).is_err() {
                    continue; // the dispatcher is gone; nothing is in flight
                }
                waiting.extend(live.map(|live| (partition, live)));
            }
        }
        // The shard drains within `drain`; allow a little more for it to notice.
        let deadline = Instant::now() + self.drain + Duration::from_secs(2);
        for (partition, live) in waiting {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = live.recv_timeout(left) {
                tracing::warn!(topic = %self.topic, partition, "revoked partition still busy; releasing it anyway");
                // Kept, so an assignment of it back here waits for that reader to go.
                self.live.lock().unwrap().insert(partition, live);
            }
        }
        match base.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => {}
            Err(e) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::NoOffset) => {}
            Err(e) => tracing::warn!(topic = %self.topic, error = %e, "commit on revoke failed"),
        }
        for elem in tpl.elements().iter().filter(|e| e.topic() == self.topic) {
            tracing::info!(topic = %self.topic, partition = elem.partition(), "partition released");
        }
    }
}

/// This process's membership of the group on one topic.
pub(super) struct GroupConsumer {
    events: mpsc::UnboundedReceiver<Assignment>,
    /// Weak: the serving thread's handle is the one whose drop leaves the group.
    consumer: Weak<Kafka>,
}

impl GroupConsumer {
    /// Joins `group` on `topic`; a thread serves the group protocol until `closed`.
    /// `wait`: how long an idle fetch may wait at the broker (the topic's
    /// [`TopicSpec::read_within`](crate::log::TopicSpec::read_within)).
    pub(super) fn join(
        config: &KafkaConfig,
        group: &str,
        topic: &str,
        wait: Duration,
        closed: watch::Receiver<bool>,
        drain: Duration,
    ) -> Result<(GroupConsumer, std::thread::JoinHandle<()>), LogError> {
        let (tx, events) = mpsc::unbounded_channel();
        let group_id = format!("{group}.{topic}");
        let wait = wait.as_millis().to_string();
        let c = config.layered(
            // Defaults the pass-through table may change.
            &[
                ("auto.commit.interval.ms", "1000"),
                ("statistics.interval.ms", "5000"),
                ("fetch.wait.max.ms", &wait),
                ("queued.max.messages.kbytes", "16384"),
                // A process that dies hands its partitions over after 10 s, not Kafka's 45 s.
                ("session.timeout.ms", "10000"),
                ("heartbeat.interval.ms", "2000"),
                ("partition.assignment.strategy", "cooperative-sticky"),
            ],
            // What the guarantees rest on.
            &[
                ("group.id", &group_id),
                ("enable.auto.commit", "true"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
            ],
        );
        let context = GroupContext {
            topic: topic.to_string(),
            events: tx,
            consumer: OnceLock::new(),
            progress: Mutex::default(),
            live: Mutex::default(),
            closed: closed.clone(),
            drain,
            reset: Offset::Beginning,
        };
        let consumer: Arc<Kafka> = Arc::new(c.create_with_context(context).map_err(kafka_error)?);
        let _ = consumer.context().consumer.set(Arc::downgrade(&consumer));
        consumer.subscribe(&[topic]).map_err(kafka_error)?;
        let weak = Arc::downgrade(&consumer);
        let topic = topic.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("kafka-group-{topic}"))
            .spawn(move || serve(consumer, topic, closed))
            .map_err(LogError::Io)?;
        Ok((GroupConsumer { events, consumer: weak }, thread))
    }
}

/// Serves the consumer's own queue (rebalances, errors, statistics) on a thread of its
/// own, because a revoke blocks while shards drain.
fn serve(consumer: Arc<Kafka>, topic: String, mut closed: watch::Receiver<bool>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        loop {
            tokio::select! {
                m = consumer.recv() => match m {
                    Ok(m) => {
                        use rdkafka::Message;
                        tracing::error!(topic = %topic, partition = m.partition(), offset = m.offset(), "record arrived outside its partition queue; it will be read again after a restart");
                    }
                    Err(e) => tracing::warn!(topic = %topic, error = %e, "kafka consumer"),
                },
                _ = crate::shutdown::stopped(&mut closed) => break,
            }
        }
    });
    if let Err(e) = consumer.commit_consumer_state(CommitMode::Sync) {
        if e.rdkafka_error_code() != Some(rdkafka::types::RDKafkaErrorCode::NoOffset) {
            tracing::warn!(topic = %topic, error = %e, "final commit failed");
        }
    }
    // Dropping the last handle leaves the group (readers are gone by now).
    drop(consumer);
}

#[async_trait]
impl Consumer for GroupConsumer {
    async fn next_assignment(&mut self) -> Option<Assignment> {
        self.events.recv().await
    }

    /// Splits the partition's queue again; the new reader's first read moves the fetch
    /// position back (see [`Resume`]) before it reads.
    async fn reopen(&mut self, partition: u32) -> Result<Box<dyn PartitionReader>, LogError> {
        let consumer = self.consumer.upgrade().ok_or(LogError::Closed)?;
        let context = consumer.context();
        if *context.closed.borrow() {
            return Err(LogError::Closed);
        }
        let partition = partition as i32;
        let not_ours =
            || LogError::Backend(format!("partition {}/{partition} is not assigned to this process", context.topic));
        // Held while the reader is made: a revoke takes it first, so a partition being
        // revoked gets no new reader.
        let assigned = context.progress.lock().unwrap();
        let progress = assigned.get(&partition).cloned().ok_or_else(not_ours)?;
        // One reader a partition: a second one split from the same queue loses its wake-ups
        // when the first is dropped. The caller tries again later.
        if context.live.lock().unwrap().get(&partition).is_some_and(still_reading) {
            return Err(LogError::Backend(format!("partition {}/{partition} still has a live reader", context.topic)));
        }
        let mut reader = context.reader(&consumer, partition, progress.clone()).ok_or_else(not_ours)?;
        drop(assigned);
        match progress.stored.load(Ordering::Relaxed) {
            u64::MAX => reader.resume = Some(Resume::Committed),
            stored => {
                reader.resume = Some(Resume::At(stored));
                // Whatever a seek of the dead reader's still lands, nothing below is handed
                // out and a jump past it is a gap.
                reader.next = stored;
            }
        }
        Ok(Box::new(reader))
    }
}

/// Whether the reader that `alive` watches is still there.
fn still_reading(alive: &std::sync::mpsc::Receiver<()>) -> bool {
    matches!(alive.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty))
}

/// Where a reopened reader starts: what the dead reader took from the partition's queue is
/// gone with it, so the fetch position is moved back before the new one reads.
#[derive(Debug, Clone, Copy)]
enum Resume {
    /// The offset the dead reader's worker stored last.
    At(u64),
    /// It stored none: the group's committed offset (or, with none, where
    /// `auto.offset.reset` starts the group).
    Committed,
    /// A gap in the offsets, read again from its first offset after [`GAP_PAUSE`] (see
    /// [`Gaps`]).
    Gap(u64),
    /// The reader was held (see `PartitionReader::hold`): fetching starts again at its read
    /// position, past what it handed out, whatever the hold took off the queue.
    Held(u64),
}

struct GroupReader {
    queue: StreamPartitionQueue<GroupContext>,
    partition: u32,
    committer: Arc<GroupCommitter>,
    closed: watch::Receiver<bool>,
    /// The offset after the last record handed out: librdkafka can fetch a stretch again
    /// (after a fetch error or a reset), and a partition must read strictly in order.
    next: u64,
    /// Dropped with the reader, which tells a waiting revoke that the shard let go.
    _alive: std::sync::mpsc::Sender<()>,
    /// Where to move the fetch position before the next read (a reopened reader's start, or
    /// a gap in the offsets to read again).
    resume: Option<Resume>,
    /// Gaps in the offsets read again.
    gaps: Gaps,
    /// Where the group starts a partition with no committed offset.
    reset: Offset,
    /// Paused by a hold (see `PartitionReader::hold`), until the next read.
    held: bool,
    /// The partition is resumed before this reader's first read: the client keeps a pause
    /// with the partition, not the reader, and one an earlier reader's hold left (then a
    /// revoke, or its worker's death) would have this one wait for ever.
    fresh: bool,
    /// A read's resume, on a blocking thread (librdkafka waits for its broker thread), done
    /// before the read's seek; a read cancelled meanwhile leaves it to finish by itself, and
    /// the next read waits for it.
    resuming: Option<tokio::task::JoinHandle<()>>,
}

impl GroupReader {
    /// This reader's partition, as the client names it.
    fn partitions(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.committer.topic, self.committer.partition);
        tpl
    }

    /// Moves the partition's fetch position to where `resume` says (blocking calls, so on a
    /// blocking thread); records fetched before are discarded by the client. Cancel-safe: the
    /// caller clears `resume` only once this returned, and a seek already on the blocking
    /// thread that lands after a cancel is harmless (`next` skips what it repeats, and a jump
    /// past `next` is read again as a gap).
    async fn seek(&self, resume: Resume) -> Result<(), LogError> {
        if matches!(resume, Resume::Gap(_)) {
            // Here, not on the blocking thread: a read cancelled meanwhile seeks nothing.
            tokio::time::sleep(GAP_PAUSE).await;
        }
        let consumer = self.committer.consumer.upgrade().ok_or(LogError::Closed)?;
        let (topic, partition, reset) = (self.committer.topic.clone(), self.committer.partition, self.reset);
        tokio::task::spawn_blocking(move || {
            let timeout = Duration::from_secs(10);
            let offset = match resume {
                Resume::At(n) | Resume::Gap(n) | Resume::Held(n) => Offset::Offset(n as i64),
                Resume::Committed => {
                    let mut tpl = TopicPartitionList::new();
                    tpl.add_partition(&topic, partition);
                    let committed = consumer.committed_offsets(tpl, timeout).map_err(kafka_error)?;
                    match committed.find_partition(&topic, partition).map(|e| e.offset()) {
                        Some(Offset::Offset(n)) => Offset::Offset(n),
                        _ => reset,
                    }
                }
            };
            consumer.seek(&topic, partition, offset, timeout).map_err(kafka_error)?;
            if matches!(resume, Resume::At(_) | Resume::Committed) {
                tracing::info!(topic = %topic, partition, offset = ?offset, "partition reopened");
            }
            Ok(())
        })
        .await
        .map_err(|e| LogError::Backend(e.to_string()))?
    }
}

#[async_trait]
impl PartitionReader for GroupReader {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        if self.held || self.fresh {
            let consumer = self.committer.consumer.upgrade().ok_or(LogError::Closed)?;
            let (tpl, topic, partition) = (self.partitions(), self.committer.topic.clone(), self.partition);
            self.resuming = Some(tokio::task::spawn_blocking(move || {
                if let Err(e) = consumer.resume(&tpl) {
                    tracing::warn!(topic = %topic, partition, error = %e, "could not resume a held partition");
                }
            }));
            (self.held, self.fresh) = (false, false);
        }
        if let Some(resuming) = self.resuming.as_mut() {
            let _ = resuming.await;
            self.resuming = None;
        }
        let batch = loop {
            // Cleared only once the seek is done: a read cancelled meanwhile seeks again.
            if let Some(resume) = self.resume {
                self.seek(resume).await?;
                self.resume = None;
            }
            let batch = super::reader::next_batch(self.queue.stream(), max, &mut self.closed).await?;
            let sifted = self.gaps.sift(&self.committer.topic, self.partition, batch, self.next);
            if let Some(at) = sifted.gap {
                self.resume = Some(Resume::Gap(at));
            }
            if !sifted.fresh.is_empty() {
                break sifted.fresh;
            }
        };
        if let Some(last) = batch.last() {
            self.next = last.offset + 1;
        }
        if let Some(first) = batch.first() {
            let _ = self.committer.progress.stored.compare_exchange(
                u64::MAX,
                first.offset,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Ok(batch)
    }

    fn committer(&self) -> Arc<dyn Committer> {
        self.committer.clone()
    }

    /// Pauses the partition's fetching and drops what the client fetched ahead (taken off
    /// the queue and let go); the next read resumes it and seeks back to `next`, so what
    /// was dropped is fetched again then. (Pausing alone stops new fetches but leaves the
    /// queue as full as it was, up to `queued.max.messages.kbytes`.)
    fn hold(&mut self) {
        if self.held || self.fresh || self.resuming.is_some() {
            return;
        }
        let Some(consumer) = self.committer.consumer.upgrade() else { return };
        // Here, not on a blocking thread (librdkafka waits for its broker thread to take it,
        // as a rule at once): a reader made after this one is dropped must find the pause
        // done, or its resume could come first and the partition stay paused. Once per batch
        // a tier holds, for up to hours.
        if let Err(e) = consumer.pause(&self.partitions()) {
            tracing::warn!(topic = %self.committer.topic, partition = self.partition, error = %e, "could not pause a held partition");
            return;
        }
        self.held = true;
        // What the client fetched ahead is dropped only when the next read is sure to seek:
        // to `next`, past what was handed out; or to where a seek still pending goes (a
        // reopened reader's start, a gap read again), which it keeps. A reader that has read
        // nothing yet keeps its queue (the client's own position is its start).
        if self.resume.is_none() {
            if self.next == 0 {
                return;
            }
            self.resume = Some(Resume::Held(self.next));
        }
        let mut stream = self.queue.stream();
        while let Some(Some(_)) = stream.next().now_or_never() {}
    }
}

struct GroupCommitter {
    consumer: Weak<Kafka>,
    topic: String,
    partition: i32,
    progress: Arc<Progress>,
}

impl Committer for GroupCommitter {
    fn commit(&self, next: u64) {
        self.progress.stored.store(next, Ordering::Relaxed);
        let Some(consumer) = self.consumer.upgrade() else { return };
        let mut tpl = TopicPartitionList::new();
        if tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(next as i64)).is_ok() {
            if let Err(e) = consumer.store_offsets(&tpl) {
                // After a revoke the partition is no longer ours to commit.
                tracing::debug!(topic = %self.topic, partition = self.partition, error = %e, "offset not stored");
            }
        }
    }

    fn end_offset(&self) -> u64 {
        self.progress.end.load(Ordering::Relaxed)
    }

    fn committed(&self) -> u64 {
        match self.progress.stored.load(Ordering::Relaxed) {
            u64::MAX => self.end_offset(),
            n => n,
        }
    }
}
