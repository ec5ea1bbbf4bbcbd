//! Reads outside any consumer group: a page of one partition (whole-topic reads, the DLQ
//! list), and a follower that tails one partition from an offset (the registry).

use super::{kafka_error, KafkaConfig};
use crate::log::{Committer, LogError, LogRecord, PartitionReader};
use async_trait::async_trait;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, MessageStream, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};
use std::sync::Arc;
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

/// Waits for one message, then takes whatever else is already fetched, up to `max`.
/// Cancel-safe: a message is taken from the queue only by a poll that returns it.
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
    while out.len() < max {
        match stream.next().now_or_never() {
            Some(Some(Ok(m))) => out.push(to_record(&m)),
            Some(Some(Err(e))) => {
                tracing::warn!(error = %e, "kafka consumer error");
                break;
            }
            _ => break,
        }
    }
    Ok(out)
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

    /// The partition's high watermark: the offset the next record will get.
    pub(super) fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        let (_, high) = self
            .consumer
            .fetch_watermarks(topic, partition as i32, Timeout::After(READ_TIMEOUT))
            .map_err(kafka_error)?;
        Ok(high.max(0) as u64)
    }

    /// Up to `max` records of `topic`/`partition` from `from`, and where to go on (`None` at
    /// the partition's end).
    pub(super) fn read(
        &mut self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        let p = partition as i32;
        let (low, high) =
            self.consumer.fetch_watermarks(topic, p, Timeout::After(READ_TIMEOUT)).map_err(kafka_error)?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        let start = from.max(low);
        if start >= high || max == 0 {
            return Ok((Vec::new(), None));
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, p, Offset::Offset(start as i64)).map_err(kafka_error)?;
        self.consumer.assign(&tpl).map_err(kafka_error)?;
        let deadline = Instant::now() + READ_TIMEOUT;
        let mut out: Vec<LogRecord> = Vec::new();
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
                    let rec = to_record(&m);
                    let last = rec.offset;
                    out.push(rec);
                    if out.len() >= max || last + 1 >= high {
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

/// Tails one partition from an offset, outside any group; nothing is committed.
pub(super) struct Follower {
    consumer: StreamConsumer,
    partition: u32,
    closed: watch::Receiver<bool>,
}

impl Follower {
    pub(super) fn start(
        config: &KafkaConfig,
        topic: &str,
        partition: u32,
        from: u64,
        closed: watch::Receiver<bool>,
    ) -> Result<Follower, LogError> {
        let consumer: StreamConsumer = config
            .client()
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "20")
            .set("group.id", "herald-follower")
            .create()
            .map_err(kafka_error)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition as i32, Offset::Offset(from as i64)).map_err(kafka_error)?;
        consumer.assign(&tpl).map_err(kafka_error)?;
        Ok(Follower { consumer, partition, closed })
    }
}

#[async_trait]
impl PartitionReader for Follower {
    fn partition(&self) -> u32 {
        self.partition
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        next_batch(self.consumer.stream(), max, &mut self.closed).await
    }

    fn committer(&self) -> Arc<dyn Committer> {
        Arc::new(crate::log::NoCommit)
    }
}
