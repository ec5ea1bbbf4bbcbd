//! The durable log: the one interface the engine uses to append and consume records,
//! whichever backend stores them.

pub mod embedded;
pub mod kafka;
mod partitioner;
pub mod private;
#[cfg(test)]
pub(crate) mod stub;

use async_trait::async_trait;
use bytes::Bytes;

pub use partitioner::partition_for;

/// A record to append: `key` chooses the partition, `value` is opaque bytes.
#[derive(Debug, Clone)]
pub struct Record {
    /// Partitioning key (for deliveries: the subscription id).
    pub key: Bytes,
    /// The record's payload.
    pub value: Bytes,
}

/// A record as stored, with its position in the log.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// Partition the record lives in.
    pub partition: u32,
    /// Offset within the partition; strictly increasing, possibly with gaps.
    pub offset: u64,
    /// Append time, milliseconds since the Unix epoch.
    pub timestamp_ms: i64,
    /// Partitioning key.
    pub key: Bytes,
    /// Payload; empty for a tombstone in a compacted topic.
    pub value: Bytes,
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The partition its key hashed to.
    pub partition: u32,
    /// Offset within the partition.
    pub offset: u64,
}

/// A topic and how it is laid out.
#[derive(Debug, Clone)]
pub struct TopicSpec {
    /// Full topic name, prefix included.
    pub name: String,
    /// Partitions: the most shards that can work it at once.
    pub partitions: u32,
    /// Keep only the newest record per key (the catalog).
    pub compacted: bool,
    /// Records older than this may be deleted (dead letters); `None`: kept until every
    /// consumer group has consumed them (deliveries and tiers), or forever (the catalog).
    pub retention: Option<std::time::Duration>,
    /// Its retention waits for a reader that keeps its own place outside any consumer group
    /// (the history index, on the embedded log): a record is reclaimed by age only once that
    /// reader has said, with [`Log::read_up_to`], that it read it. Else records the reader
    /// had not read when Herald stopped could be gone when it starts again, later than the
    /// retention.
    pub retention_waits_for_reader: bool,
    /// How soon after it is written a reader should see a record: on Kafka, how long a fetch
    /// that finds nothing new may wait at the broker (a broker slow to answer such a fetch when
    /// records arrive, as tansu is, has readers trail by up to this much; Kafka answers at
    /// once). Longer means fewer fetches while idle. The embedded log's readers wake on each
    /// append and ignore it. Chosen per topic in [`crate::topics::Topics::specs`].
    pub read_within: std::time::Duration,
    /// One key's records must stay in one partition (ordered deliveries, and the markers
    /// their sequencer writes keyed alike): a topic that exists keeps its partition count
    /// whatever `log.partitions` says now, since a key hashed anew would land elsewhere.
    pub keyed: bool,
}

#[cfg(test)]
impl TopicSpec {
    /// A plain topic as unit tests lay one out: `partitions`, kept, not compacted or keyed,
    /// read within 20 ms (change what a test needs with `..`).
    pub(crate) fn for_tests(name: &str, partitions: u32) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            compacted: false,
            retention: None,
            retention_waits_for_reader: false,
            read_within: std::time::Duration::from_millis(20),
            keyed: false,
        }
    }
}

/// Errors from either log backend.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The topic was not declared when the log was opened.
    #[error("unknown topic {0}")]
    UnknownTopic(String),
    /// Disk or broker I/O failed.
    #[error("log I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The log is shutting down and takes no more work.
    #[error("log is closed")]
    Closed,
    /// A record is larger than the log can store (the API's size limit keeps events below it).
    #[error("a record of {bytes} bytes is larger than the log takes ({max} bytes)")]
    TooLarge {
        /// The record's size.
        bytes: usize,
        /// The most the log takes.
        max: usize,
    },
    /// The backend rejected the operation.
    #[error("log backend error: {0}")]
    Backend(String),
}

/// Bytes of records one page read takes at most (past its first record): pages of large
/// records (dead letters of 1 MiB events, 1,024 to a page) were gigabytes at once.
pub const PAGE_BYTES: usize = 4 << 20;

/// About the most bytes a partition reader's batch holds (always one record, however large):
/// what a retry tier's shard reads it keeps until due, up to the longest tier's four hours.
pub const BATCH_BYTES: usize = 1 << 20;

/// The log backends' common interface (embedded files or Kafka).
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Number of partitions of `topic`.
    fn partitions(&self, topic: &str) -> Result<u32, LogError>;

    /// Appends records, each to the partition its key hashes to, and returns only once
    /// all of them are durable. Positions are returned in input order.
    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError>;

    /// Reads every record currently in `topic`, all partitions, oldest first per partition.
    async fn read_all(&self, topic: &str) -> Result<Vec<LogRecord>, LogError>;

    /// Reads up to `max` records of one partition at or after `from`, and about
    /// [`PAGE_BYTES`] at most (always one); returns them and the offset to continue from,
    /// `None` once the partition's current end is reached. For scanning a large topic a page
    /// at a time.
    async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError>;

    /// Offset of the next record to be appended to one partition.
    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError>;

    /// Whether other processes may append to this log's topics (Kafka), so what this process
    /// has read of a topic can trail what is in it. The embedded log has one process.
    fn shared(&self) -> bool;

    /// The largest record an append takes, when the log has a limit below any record Herald
    /// makes now (Kafka's `message.max.bytes`, set from `ingest.max_event_bytes`): a record
    /// written before that was lowered (a dead letter) may be past it.
    fn max_record_bytes(&self) -> Option<usize>;

    /// Joins consumer `group` on `topic`; the consumer is told which partitions it owns.
    async fn consume(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError>;

    /// Tails one partition from `from`, outside any consumer group: every process sees every
    /// record (the registry follows its topic this way). The reader's committer does nothing.
    async fn follow(&self, topic: &str, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, LogError>;

    /// The reader of a topic whose retention waits for it (`TopicSpec::retention_waits_for_reader`)
    /// has read `partition` up to `offset` (exclusive): what is before may be reclaimed by age.
    /// Kafka keeps such a topic for all of its retention and ignores this.
    fn read_up_to(&self, topic: &str, partition: u32, offset: u64);

    /// Whether the log can take appends right now (readiness).
    async fn ready(&self) -> bool;

    /// Why the log can never take an append again in this process, if it cannot (liveness:
    /// only a restart mends it).
    fn broken(&self) -> Option<String>;

    /// Stops consumers, persists their progress and releases the log.
    async fn close(&self) -> Result<(), LogError>;
}

/// Appends `records`, retrying (with backoff) until they are durable: a caller that settles
/// something after an append must not do so before. Only records too large for the log are
/// given up on, since retrying cannot help them.
pub async fn append_durably(log: &dyn Log, topic: &str, records: Vec<Record>) -> Result<(), LogError> {
    let mut backoff = std::time::Duration::from_millis(50);
    loop {
        match log.append(topic, records.clone()).await {
            Ok(_) => return Ok(()),
            Err(e @ LogError::TooLarge { .. }) => {
                tracing::error!(topic, error = %e, "a record too large for the log");
                return Err(e);
            }
            Err(e) => {
                tracing::error!(topic, error = %e, "append failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
            }
        }
    }
}

/// A change in the set of partitions a consumer owns.
pub enum Assignment {
    /// A partition is now ours: read it from its committed offset.
    Assigned(Box<dyn PartitionReader>),
    /// A partition was taken away: stop working on it.
    Revoked(u32),
}

/// A member of a consumer group.
#[async_trait]
pub trait Consumer: Send {
    /// Waits for the next assignment change; `None` once the log is closed.
    async fn next_assignment(&mut self) -> Option<Assignment>;

    /// A new reader of a partition this consumer was assigned, from its committed offset,
    /// for a worker that died and took its reader with it (a panic outside any one
    /// delivery): what it had read past the committed offset is read again. The old reader
    /// must be gone; a partition revoked meanwhile is refused.
    async fn reopen(&mut self, partition: u32) -> Result<Box<dyn PartitionReader>, LogError>;
}

/// Reads one owned partition in order.
#[async_trait]
pub trait PartitionReader: Send {
    /// The partition read.
    fn partition(&self) -> u32;

    /// Waits until records past the read position exist, then returns up to `max` of them.
    /// Cancel-safe: a cancelled call loses no records.
    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError>;

    /// A handle that records progress on this partition, usable while a read is pending.
    fn committer(&self) -> std::sync::Arc<dyn Committer>;

    /// The caller will not read for a while (the records it holds are not due yet): the log
    /// may stop fetching ahead for this partition, and let go of what it fetched, until the
    /// next read, which goes on from the read position. A retry tier's shard keeps its batch
    /// for up to four hours, and what Kafka's client fetched behind it stayed as long: 16 MiB
    /// a partition of each tier (2.3 GiB of a process's memory at eight partitions, one
    /// tenant's endpoint down for hours enough to fill the long tiers).
    fn hold(&mut self) {}
}

/// Records a consumer's progress on one partition.
pub trait Committer: Send + Sync {
    /// Every offset below `next` is done; persisted soon after.
    fn commit(&self, next: u64);

    /// Offset of the next record that will be appended (for lag).
    fn end_offset(&self) -> u64;

    /// The committed offset: everything below it is done (for lag).
    fn committed(&self) -> u64;
}

/// The committer of a reader outside any group: progress is not recorded.
pub(crate) struct NoCommit;

impl Committer for NoCommit {
    fn commit(&self, _next: u64) {}

    fn end_offset(&self) -> u64 {
        0
    }

    fn committed(&self) -> u64 {
        0
    }
}
