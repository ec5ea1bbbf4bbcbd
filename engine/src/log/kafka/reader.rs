//! Reads outside any consumer group: a page of one partition (whole-topic reads, the DLQ
//! list, ordered keys' scans), and followers that tail partitions from offsets (the
//! registry, the history index), one client per topic.

use super::{kafka_error, KafkaConfig};
use crate::log::{Committer, LogError, LogRecord, PartitionReader};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::stream_consumer::StreamPartitionQueue;
use rdkafka::consumer::{
    BaseConsumer, Consumer, ConsumerContext, DefaultConsumerContext, MessageStream, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumed message as a log record.
pub(super) fn to_record(m: &BorrowedMessage<'_>) -> LogRecord {
    LogRecord {
        partition: m.partition() as u32,
        offset: m.offset() as u64,
        timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
        key: Bytes::copy_from_slice(m.key().unwrap_or_default()),
        value: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
    }
}

/// Waits for one message, then takes whatever else is already fetched, up to `max` and about
/// [`crate::log::BATCH_BYTES`]. Cancel-safe: a message is taken from the queue only by a poll
/// that returns it.
pub(super) async fn next_batch<C: ConsumerContext>(
    mut stream: MessageStream<'_, C>,
    max: usize,
    closed: &mut watch::Receiver<bool>,
) -> Result<Vec<LogRecord>, LogError> {
    let first = tokio::select! {
        m = stream.next() => m,
        _ = crate::shutdown::stopped(closed) => return Err(LogError::Closed),
    };
    let mut out = Vec::new();
    match first {
        Some(Ok(m)) => out.push(to_record(&m)),
        Some(Err(e)) => return Err(kafka_error(e)),
        None => return Err(LogError::Closed),
    }
    let mut bytes = out[0].value.len();
    while out.len() < max && bytes < crate::log::BATCH_BYTES {
        match stream.next().now_or_never() {
            Some(Some(Ok(m))) => {
                let record = to_record(&m);
                bytes += record.value.len();
                out.push(record);
            }
            Some(Some(Err(e))) => {
                tracing::warn!(error = %e, "kafka consumer error");
                break;
            }
            _ => break,
        }
    }
    Ok(out)
}

/// Times a gap in a partition's offsets is read again before it is taken as final: about 2 s
/// at [`GAP_PAUSE`], a precaution for tansu on busy cores. (It was raised from three tries
/// for the two-process history test's rare miss of two attempts, which turned out to be
/// that test's own race: an event published through a process that had not yet read a new
/// subscription.) Herald's topics have no gaps on a real broker, so the patience costs
/// nothing there.
pub(super) const GAP_TRIES: u8 = 100;
/// The pause before a gap is read again.
pub(super) const GAP_PAUSE: Duration = Duration::from_millis(20);

/// A fetched batch, sifted.
#[derive(Debug, Default)]
pub(super) struct Sifted {
    /// The records to hand out: strictly rising from `next`, up to the first gap to re-read.
    pub fresh: Vec<LogRecord>,
    /// Records below `next` (fetched again after a fetch started over), dropped.
    pub skipped: usize,
    /// The offset to read again from: records after a gap were dropped.
    pub gap: Option<u64>,
    /// A gap taken as final: from the offset expected to the one that came.
    pub jumped: Option<(u64, u64)>,
}

/// Keeps what a reader at `next` may hand out of `batch`. Herald's data topics have no
/// transactions and no compaction, so their offsets are contiguous and a jump means records
/// not served yet: the records from the jump on are dropped, to be read again from the gap,
/// while `retry` allows it. (A reader with `next` 0 takes its first offset wherever it
/// starts.)
fn sift(batch: Vec<LogRecord>, mut next: u64, mut retry: impl FnMut(u64) -> bool) -> Sifted {
    let mut sifted = Sifted { fresh: Vec::with_capacity(batch.len()), ..Sifted::default() };
    for r in batch {
        if r.offset < next {
            sifted.skipped += 1;
            continue;
        }
        if r.offset > next && next > 0 {
            if retry(next) {
                sifted.gap = Some(next);
                break;
            }
            sifted.jumped = Some((next, r.offset));
        }
        next = r.offset + 1;
        sifted.fresh.push(r);
    }
    sifted
}

/// Gaps in a partition's offsets that a reader reads again. A broker may show an offset
/// before the record is readable — tansu 0.6.0's memory engine raises the high watermark
/// before it stores the batch, so a fetch racing two producers passes over a record stored a
/// moment later, and the client, having moved past it, never fetches it — so a gap is read
/// again, after [`GAP_PAUSE`], up to [`GAP_TRIES`] times before it is taken.
#[derive(Debug, Default)]
pub(super) struct Gaps {
    /// The last gap read again, and how many times.
    last: Option<(u64, u8)>,
}

impl Gaps {
    /// Whether the gap at `at` is to be read again (then counted), or taken: its tries spent.
    fn again(&mut self, at: u64) -> bool {
        let tries = self.last.filter(|(offset, _)| *offset == at).map_or(0, |(_, t)| t);
        if tries >= GAP_TRIES {
            return false;
        }
        self.last = Some((at, tries + 1));
        true
    }

    /// Logs that the gap at `at` of `topic`/`partition` is read again, or was taken.
    fn log(&self, topic: &str, partition: u32, at: u64, taken_to: Option<u64>) {
        match taken_to {
            Some(to) => {
                tracing::warn!(topic, partition, from = at, to, "offsets jumped; the records between were never served")
            }
            None => {
                let tries = self.last.map_or(0, |(_, t)| t);
                tracing::info!(
                    topic,
                    partition,
                    offset = at,
                    tries,
                    "offsets jumped; reading again from the first one missing"
                );
            }
        }
    }

    /// Sifts `batch` for a reader of `topic`/`partition` at `next`, logging what it drops; a
    /// gap it returns is counted as read again.
    pub(super) fn sift(&mut self, topic: &str, partition: u32, batch: Vec<LogRecord>, next: u64) -> Sifted {
        let sifted = sift(batch, next, |at| self.again(at));
        if sifted.skipped > 0 {
            tracing::debug!(topic, partition, records = sifted.skipped, "records fetched again skipped");
        }
        if let Some((from, to)) = sifted.jumped {
            self.log(topic, partition, from, Some(to));
        }
        if let Some(at) = sifted.gap {
            self.log(topic, partition, at, None);
        }
        sifted
    }
}

/// Reads pages of one partition at a time by assignment, without a consumer group.
pub(super) struct Reader {
    consumer: BaseConsumer,
}

impl Reader {
    pub(super) fn new(config: &KafkaConfig) -> Result<Reader, LogError> {
        let consumer = config
            .client()
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            // Assigned, never subscribed: the group id only enables the consumer queue.
            .set("group.id", "herald-reader")
            .create()
            .map_err(kafka_error)?;
        Ok(Reader { consumer })
    }

    /// The partition's high watermark: the offset the next record will get. Asked as the
    /// offset for the "latest" time, one request where `fetch_watermarks` makes two (every API
    /// request on Kafka waits for one of these: the catalog's `Feed::settled`).
    pub(super) fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let mut latest = TopicPartitionList::new();
        latest.add_partition_offset(topic, partition as i32, Offset::End).map_err(kafka_error)?;
        let found = self.consumer.offsets_for_times(latest, Timeout::After(READ_TIMEOUT));
        // Serve the client's queue (errors, statistics): this consumer is never read from.
        let _ = self.consumer.poll(Duration::ZERO);
        let found = found.map_err(kafka_error)?;
        let answer = found.find_partition(topic, partition as i32);
        match answer.as_ref().map(|p| (p.error(), p.offset())) {
            Some((Ok(()), Offset::Offset(end))) => Ok(end.max(0) as u64),
            Some((Err(e), _)) => Err(kafka_error(e)),
            other => Err(LogError::Backend(format!("no end offset for {topic}/{partition}: {other:?}"))),
        }
    }

    /// Up to `max` records of `topic`/`partition` from `from`, and where to go on (`None` at
    /// the partition's end).
    pub(super) fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        contiguous: bool,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        let p = partition as i32;
        let (low, high) =
            self.consumer.fetch_watermarks(topic, p, Timeout::After(READ_TIMEOUT)).map_err(kafka_error)?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        let start = from.max(low);
        if start >= high || max == 0 {
            return Ok((Vec::new(), None));
        }
        let assign = |at: u64| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, Offset::Offset(at as i64)).map_err(kafka_error)?;
            self.consumer.assign(&tpl).map_err(kafka_error)
        };
        assign(start)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut out: Vec<LogRecord> = Vec::new();
        let mut bytes = 0;
        let mut gaps = Gaps::default();
        let result = loop {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break Err(LogError::Backend(format!("reading {topic}/{partition} timed out at offset {start}")));
            };
            match self.consumer.poll(left) {
                Some(Ok(m)) => {
                    // Ignore anything still buffered from an earlier assignment.
                    if m.topic() != topic || m.partition() != p || (m.offset() as u64) < start {
                        continue;
                    }
                    if out.last().is_some_and(|r| r.offset >= m.offset() as u64) {
                        continue;
                    }
                    // A gap in a data topic's offsets is read again (see [`Gaps`]), from a
                    // fresh assignment.
                    let expected = out.last().map_or(start, |r| r.offset + 1);
                    let offset = m.offset() as u64;
                    if contiguous && offset > expected {
                        if gaps.again(expected) {
                            gaps.log(topic, partition, expected, None);
                            std::thread::sleep(GAP_PAUSE);
                            let _ = self.consumer.unassign();
                            if let Err(e) = assign(expected) {
                                break Err(e);
                            }
                            continue;
                        }
                        gaps.log(topic, partition, expected, Some(offset));
                    }
                    let rec = to_record(&m);
                    let last = rec.offset;
                    bytes += rec.key.len() + rec.value.len();
                    out.push(rec);
                    if out.len() >= max || bytes >= crate::log::PAGE_BYTES || last + 1 >= high {
                        break Ok(());
                    }
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) if !out.is_empty() => break Ok(()),
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => break Err(kafka_error(e)),
                None => {}
            }
        };
        let _ = self.consumer.unassign();
        result?;
        let next = out.last().map_or(high, |r| r.offset + 1);
        Ok((out, (next < high).then_some(next)))
    }
}

/// One client following any of one topic's partitions from offsets of their own, outside any
/// group, each partition read through a queue of its own ([`Follower`]). One client for all
/// of a topic's followed partitions rather than one each: the history topic's eight followers
/// made eight fetch requests where one carries them all, each client with its connections
/// and threads (on a broker sharing the cores, its work was history's cost on Kafka).
pub(super) struct Followed {
    consumer: Arc<StreamConsumer>,
    topic: String,
    /// Offsets are contiguous (not a compacted topic): gaps are read again.
    contiguous: bool,
    /// The partitions with a live follower: a partition's queue has one reader.
    followed: Mutex<HashSet<u32>>,
}

impl Followed {
    /// A client for `topic`, following nothing yet; `wait`: how long an idle fetch may wait at
    /// the broker.
    pub(super) fn new(
        config: &KafkaConfig,
        topic: &str,
        contiguous: bool,
        wait: Duration,
    ) -> Result<Arc<Followed>, LogError> {
        let wait = wait.as_millis().to_string();
        let consumer: StreamConsumer = config
            .layered(
                // Defaults the pass-through table may change.
                &[
                    ("fetch.wait.max.ms", &wait),
                    // librdkafka prefetches up to 64 MiB a partition by default (per
                    // partition, with a queue each); a reader that falls behind (the history
                    // index while deliveries take the cores) would hold that much for each
                    // partition it follows.
                    ("queued.max.messages.kbytes", "16384"),
                ],
                &[("enable.auto.commit", "false"), ("auto.offset.reset", "earliest"), ("group.id", "herald-follower")],
            )
            .create()
            .map_err(kafka_error)?;
        let followed = Mutex::default();
        Ok(Arc::new(Followed { consumer: Arc::new(consumer), topic: topic.to_string(), contiguous, followed }))
    }

    /// Follows `partition` from `from`: its queue is split off before it is assigned, so
    /// none of its records reaches the client's own queue. `None` if it already has a live
    /// follower on this client.
    pub(super) fn follow(
        self: &Arc<Self>,
        partition: u32,
        from: u64,
        closed: watch::Receiver<bool>,
    ) -> Result<Option<Follower>, LogError> {
        if !self.followed.lock().unwrap().insert(partition) {
            return Ok(None);
        }
        let release = || self.followed.lock().unwrap().remove(&partition);
        let Some(queue) = self.consumer.split_partition_queue(&self.topic, partition as i32) else {
            release();
            return Err(LogError::Backend(format!("cannot read {}/{partition}: no queue", self.topic)));
        };
        let mut tpl = TopicPartitionList::new();
        let assigned = tpl
            .add_partition_offset(&self.topic, partition as i32, Offset::Offset(from as i64))
            .and_then(|()| self.consumer.incremental_assign(&tpl));
        if let Err(e) = assigned {
            // The queue first: dropping a handle of a partition's queue clears its wake-up,
            // which a follower made once the partition is free would share.
            drop(queue);
            release();
            return Err(kafka_error(e));
        }
        let (client, gaps) = (self.clone(), Gaps::default());
        Ok(Some(Follower { client, queue: Some(queue), partition, closed, next: 0, gaps, reread: None }))
    }

    /// How many partitions are followed through this client.
    #[cfg(test)]
    pub(super) fn following(&self) -> usize {
        self.followed.lock().unwrap().len()
    }
}

/// Tails one partition from an offset, on its topic's [`Followed`] client; nothing is
/// committed. Dropped, it gives the partition back to be followed again from anywhere.
pub(super) struct Follower {
    client: Arc<Followed>,
    /// Always there until the follower drops (see its `Drop`).
    queue: Option<StreamPartitionQueue<DefaultConsumerContext>>,
    partition: u32,
    closed: watch::Receiver<bool>,
    /// The offset after the last record handed out (0 before the first: what is served first
    /// is taken, wherever it starts — past the offset asked for once retention took the rest,
    /// or from the start if the offset is past the partition's end, a topic made again).
    /// Records fetched for an earlier follower of the partition are not served: librdkafka
    /// drops those of an assignment that ended.
    next: u64,
    gaps: Gaps,
    /// A gap to read again before the next read.
    reread: Option<u64>,
}

impl Drop for Follower {
    fn drop(&mut self) {
        // The queue before the partition is freed: dropping a handle of a partition's queue
        // clears its wake-up, which the next follower of the partition shares.
        drop(self.queue.take());
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.client.topic, self.partition as i32);
        match self.client.consumer.incremental_unassign(&tpl) {
            Ok(()) => {
                self.client.followed.lock().unwrap().remove(&self.partition);
            }
            // Still assigned: it stays taken, and a next follower gets a client of its own.
            Err(e) => {
                tracing::warn!(topic = %self.client.topic, partition = self.partition, error = %e, "cannot stop following")
            }
        }
    }
}

#[async_trait]
impl PartitionReader for Follower {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        let client = self.client.clone();
        let topic = client.topic.as_str();
        loop {
            // Cleared only once the seek is done: a read cancelled meanwhile seeks again.
            if let Some(at) = self.reread {
                tokio::time::sleep(GAP_PAUSE).await;
                // Not waited for (a zero timeout): records fetched before it are still
                // discarded when read, and this thread is not held.
                let offset = Offset::Offset(at as i64);
                client.consumer.seek(topic, self.partition as i32, offset, Duration::ZERO).map_err(kafka_error)?;
                self.reread = None;
            }
            // The client's own queue (errors; records only if a split failed) is served by
            // whichever of its followers waits.
            let Some(queue) = &self.queue else { return Err(LogError::Closed) };
            let batch = tokio::select! {
                b = next_batch(queue.stream(), max, &mut self.closed) => b?,
                m = client.consumer.recv() => {
                    match m {
                        Ok(m) => tracing::error!(topic, partition = m.partition(), offset = m.offset(), "record arrived outside its partition queue"),
                        Err(e) => tracing::warn!(topic, error = %e, "kafka follower"),
                    }
                    continue;
                }
            };
            if !client.contiguous {
                return Ok(batch);
            }
            let sifted = self.gaps.sift(topic, self.partition, batch, self.next);
            self.reread = sifted.gap;
            if let Some(last) = sifted.fresh.last() {
                self.next = last.offset + 1;
                return Ok(sifted.fresh);
            }
        }
    }

    fn committer(&self) -> Arc<dyn Committer> {
        Arc::new(crate::log::NoCommit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(offsets: &[u64]) -> Vec<LogRecord> {
        offsets
            .iter()
            .map(|&offset| LogRecord {
                partition: 0,
                offset,
                timestamp_ms: 0,
                key: Default::default(),
                value: Default::default(),
            })
            .collect()
    }

    fn offsets(records: &[LogRecord]) -> Vec<u64> {
        records.iter().map(|r| r.offset).collect()
    }

    #[test]
    fn a_gap_stops_the_batch_to_be_read_again_and_is_taken_once_retries_are_spent() {
        // The offsets tansu's memory engine served under two producers: 10920 not yet stored.
        let s = sift(batch(&[10918, 10919, 10921, 10923, 10922]), 10918, |_| true);
        assert_eq!((offsets(&s.fresh), s.gap, s.jumped), (vec![10918, 10919], Some(10920), None));
        // Read again from the gap, it is there.
        let s = sift(batch(&[10920, 10921, 10922]), 10920, |_| true);
        assert_eq!((offsets(&s.fresh), s.gap, s.jumped), (vec![10920, 10921, 10922], None, None));
        // A gap that stays (retries spent) is taken, and reported.
        let s = sift(batch(&[5, 6, 9, 10]), 5, |_| false);
        assert_eq!((offsets(&s.fresh), s.gap, s.jumped), (vec![5, 6, 9, 10], None, Some((7, 9))));
    }

    #[test]
    fn each_gap_is_read_again_a_bounded_number_of_times() {
        let mut gaps = Gaps::default();
        let tries: Vec<bool> = (0..=GAP_TRIES).map(|_| gaps.again(5)).collect();
        assert_eq!(tries.iter().filter(|t| **t).count(), usize::from(GAP_TRIES));
        assert_eq!(tries.last(), Some(&false), "then it is taken");
        assert!(gaps.again(9), "another gap is counted afresh");
    }

    #[test]
    fn records_fetched_again_are_skipped_and_a_new_reader_starts_anywhere() {
        let s = sift(batch(&[3, 4, 5, 6]), 5, |_| true);
        assert_eq!((offsets(&s.fresh), s.skipped, s.gap), (vec![5, 6], 2, None));
        let s = sift(batch(&[40, 41]), 0, |_| true);
        assert_eq!((offsets(&s.fresh), s.gap), (vec![40, 41], None));
    }
}
