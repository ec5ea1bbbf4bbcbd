//! The embedded log: partitioned topics as segment files in the data directory, a single
//! group-commit writer thread, persisted consumer offsets, and reclaim of consumed segments.
//! It is the default backend, so `herald serve` needs nothing but a disk.

mod offsets;
mod partition;
mod segment;

use super::{
    partition_for, Assignment, Committer, Consumer, Log, LogError, LogRecord, PartitionReader, Position, Record,
    TopicSpec,
};
use async_trait::async_trait;
use offsets::OffsetStore;
use partition::{Partition, PartitionRef};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// How the embedded log is laid out and tuned.
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Root directory (`<data-dir>/log`).
    pub dir: PathBuf,
    /// A segment is sealed once it would grow past this many bytes.
    pub segment_bytes: u64,
    /// How often committed offsets are persisted and consumed segments reclaimed.
    pub flush_interval: Duration,
    /// The topics to open or create.
    pub topics: Vec<TopicSpec>,
}

type Topic = Arc<Vec<PartitionRef>>;

struct AppendRequest {
    records: Vec<(PartitionRef, Record)>,
    reply: oneshot::Sender<Result<Vec<Position>, String>>,
}

/// The log in local files: what `herald serve` runs on with nothing else installed.
pub struct EmbeddedLog {
    topics: HashMap<String, Topic>,
    writer: mpsc::UnboundedSender<AppendRequest>,
    offsets: Arc<OffsetStore>,
    closed: watch::Sender<bool>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl EmbeddedLog {
    /// Opens the log, recovering every partition (torn tails cut off, compacted topics
    /// compacted), and starts the writer thread and the offset flusher.
    pub async fn open(config: EmbeddedConfig) -> Result<Arc<Self>, LogError> {
        let cfg = config.clone();
        let (topics, offsets) = tokio::task::spawn_blocking(move || -> Result<_, LogError> {
            let mut topics = HashMap::new();
            for spec in &cfg.topics {
                let mut parts = Vec::new();
                for p in 0..spec.partitions {
                    let dir = cfg.dir.join("topics").join(&spec.name).join(p.to_string());
                    let part = Partition::open(p, dir, cfg.segment_bytes)?;
                    if spec.compacted && part.compact()? {
                        tracing::info!(topic = %spec.name, partition = p, "compacted");
                    }
                    parts.push(Arc::new(part));
                }
                topics.insert(spec.name.clone(), Arc::new(parts));
            }
            let offsets = OffsetStore::open(cfg.dir.join("offsets"))?;
            Ok((topics, Arc::new(offsets)))
        })
        .await
        .map_err(|e| LogError::Backend(e.to_string()))??;

        let (writer, rx) = mpsc::unbounded_channel();
        std::thread::Builder::new().name("herald-log-writer".into()).spawn(move || write_loop(rx))?;
        let (closed, _) = watch::channel(false);
        let log = Arc::new(EmbeddedLog { topics, writer, offsets, closed });
        tokio::spawn(flush_loop(Arc::downgrade(&log), config.flush_interval));
        Ok(log)
    }

    fn topic(&self, name: &str) -> Result<&Topic, LogError> {
        self.topics.get(name).ok_or_else(|| LogError::UnknownTopic(name.to_string()))
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<&PartitionRef, LogError> {
        self.topic(topic)?.get(partition as usize).ok_or_else(|| LogError::UnknownTopic(format!("{topic}/{partition}")))
    }

    /// Persists offsets and reclaims fully consumed segments now.
    pub async fn flush(&self) -> Result<(), LogError> {
        let offsets = self.offsets.clone();
        let topics: Vec<(String, Topic)> = self.topics.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Decide what may go before flushing, so nothing is reclaimed past what is on disk.
            let mut plan = Vec::new();
            for (name, parts) in &topics {
                for part in parts.iter() {
                    if let Some(min) = offsets.min_committed(name, part.id()) {
                        plan.push((part.clone(), min));
                    }
                }
            }
            offsets.flush()?;
            for (part, min) in plan {
                part.reclaim(min)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| LogError::Backend(e.to_string()))??;
        Ok(())
    }

    /// Number of segment files of a partition (for tests of reclaim).
    pub fn segment_count(&self, topic: &str, partition: u32) -> Result<usize, LogError> {
        Ok(self.partition(topic, partition)?.segment_count())
    }
}

async fn flush_loop(log: std::sync::Weak<EmbeddedLog>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(log) = log.upgrade() else { return };
        if *log.closed.borrow() {
            return;
        }
        if let Err(e) = log.flush().await {
            tracing::error!(error = %e, "persisting consumer offsets failed");
        }
    }
}

/// The group-commit loop: take every request that is waiting, write each partition's share
/// in one write, fsync each touched partition once (in parallel), then answer them all.
fn write_loop(mut rx: mpsc::UnboundedReceiver<AppendRequest>) {
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while group.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => group.push(r),
                Err(_) => break,
            }
        }
        commit_group(group);
    }
}

fn commit_group(group: Vec<AppendRequest>) {
    // Bucket records by partition, remembering where each came from.
    let mut buckets: Vec<(PartitionRef, Vec<(usize, usize)>)> = Vec::new();
    let mut by_part: HashMap<*const Partition, usize> = HashMap::new();
    for (r, req) in group.iter().enumerate() {
        for (i, (part, _)) in req.records.iter().enumerate() {
            let slot = *by_part.entry(Arc::as_ptr(part)).or_insert_with(|| {
                buckets.push((part.clone(), Vec::new()));
                buckets.len() - 1
            });
            buckets[slot].1.push((r, i));
        }
    }
    let ts = now_ms();
    let outcomes: Vec<std::io::Result<u64>> = std::thread::scope(|s| {
        let handles: Vec<_> = buckets
            .iter()
            .map(|(part, members)| {
                let group = &group;
                s.spawn(move || {
                    let records: Vec<(&[u8], &[u8])> = members
                        .iter()
                        .map(|&(r, i)| {
                            let rec = &group[r].records[i].1;
                            (&rec.key[..], &rec.value[..])
                        })
                        .collect();
                    part.append(&records, ts)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("log writer panicked")).collect()
    });
    let mut positions: Vec<Vec<Option<Position>>> = group.iter().map(|r| vec![None; r.records.len()]).collect();
    let mut failures: Vec<Option<String>> = vec![None; group.len()];
    for ((part, members), outcome) in buckets.iter().zip(outcomes) {
        match outcome {
            Ok(first) => {
                for (k, &(r, i)) in members.iter().enumerate() {
                    positions[r][i] = Some(Position { partition: part.id(), offset: first + k as u64 });
                }
            }
            Err(e) => {
                tracing::error!(partition = part.id(), error = %e, "log append failed");
                for &(r, _) in members {
                    failures[r] = Some(e.to_string());
                }
            }
        }
    }
    for ((req, pos), failure) in group.into_iter().zip(positions).zip(failures) {
        let answer = match failure {
            Some(e) => Err(e),
            None => Ok(pos.into_iter().map(|p| p.expect("every record placed")).collect()),
        };
        let _ = req.reply.send(answer);
    }
}

/// A stored frame as the log interface hands it out.
fn record(partition: u32, f: segment::Frame) -> LogRecord {
    LogRecord { partition, offset: f.offset, timestamp_ms: f.timestamp_ms, key: f.key, value: f.value }
}

/// Up to `max` durable records of `part` at or after `from` (skipping gaps), and the offset to
/// continue from, `None` once the durable end is reached. Blocking: run it off the runtime.
fn read_chunk(part: &Partition, from: u64, max: usize) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
    let end = part.end_offset();
    let mut next = from.max(part.start_offset());
    loop {
        if next >= end {
            return Ok((Vec::new(), None));
        }
        let (frames, after) = part.read(next, max.max(1), 4 << 20)?;
        if !frames.is_empty() {
            let records = frames.into_iter().map(|f| record(part.id(), f)).collect();
            return Ok((records, (after < end).then_some(after)));
        }
        if after <= next {
            return Ok((Vec::new(), None));
        }
        next = after;
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.topic(topic)?.len() as u32)
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let parts = self.topic(topic)?;
        let n = parts.len() as u32;
        let records = records.into_iter().map(|r| (parts[partition_for(&r.key, n) as usize].clone(), r)).collect();
        let (reply, rx) = oneshot::channel();
        self.writer.send(AppendRequest { records, reply }).map_err(|_| LogError::Closed)?;
        let answer = rx.await;
        match answer {
            Ok(Ok(positions)) => Ok(positions),
            Ok(Err(e)) => Err(LogError::Io(std::io::Error::other(e))),
            Err(_) => Err(LogError::Closed),
        }
    }

    async fn read_all(&self, topic: &str) -> Result<Vec<LogRecord>, LogError> {
        let parts = self.topic(topic)?.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<LogRecord>, LogError> {
            let mut out = Vec::new();
            for part in parts.iter() {
                let mut from = Some(0);
                while let Some(at) = from {
                    let (records, next) = read_chunk(part, at, 4096)?;
                    out.extend(records);
                    from = next;
                }
            }
            Ok(out)
        })
        .await
        .map_err(|e| LogError::Backend(e.to_string()))?
    }

    async fn read_partition(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
    ) -> Result<(Vec<LogRecord>, Option<u64>), LogError> {
        let part = self.partition(topic, partition)?.clone();
        tokio::task::spawn_blocking(move || read_chunk(&part, from, max))
            .await
            .map_err(|e| LogError::Backend(e.to_string()))?
    }

    async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
        Ok(self.partition(topic, partition)?.end_offset())
    }

    async fn consume(&self, group: &str, topic: &str) -> Result<Box<dyn Consumer>, LogError> {
        let parts = self.topic(topic)?;
        self.offsets.join(group, topic);
        // One process owns every partition of the embedded log.
        let pending = parts
            .iter()
            .rev()
            .map(|part| {
                let reader = EmbeddedReader {
                    next: self.offsets.get(group, topic, part.id()),
                    end: part.watch_end(),
                    part: part.clone(),
                    offsets: self.offsets.clone(),
                    group: Some(group.to_string()),
                    topic: topic.to_string(),
                };
                Box::new(reader) as Box<dyn PartitionReader>
            })
            .collect();
        Ok(Box::new(EmbeddedConsumer { pending, closed: self.closed.subscribe() }))
    }

    async fn follow(&self, topic: &str, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, LogError> {
        let part = self.partition(topic, partition)?.clone();
        Ok(Box::new(EmbeddedReader {
            next: from,
            end: part.watch_end(),
            part,
            offsets: self.offsets.clone(),
            group: None,
            topic: topic.to_string(),
        }))
    }

    async fn ready(&self) -> bool {
        !self.writer.is_closed() && !*self.closed.borrow()
    }

    /// Stops the flusher after a final flush; appends still in the writer complete.
    async fn close(&self) -> Result<(), LogError> {
        self.closed.send_replace(true);
        self.flush().await
    }
}

struct EmbeddedConsumer {
    pending: Vec<Box<dyn PartitionReader>>,
    closed: watch::Receiver<bool>,
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn next_assignment(&mut self) -> Option<Assignment> {
        if let Some(reader) = self.pending.pop() {
            return Some(Assignment::Assigned(reader));
        }
        let _ = self.closed.wait_for(|c| *c).await;
        None
    }
}

struct EmbeddedReader {
    part: PartitionRef,
    next: u64,
    end: watch::Receiver<u64>,
    offsets: Arc<OffsetStore>,
    /// `None` when following outside any group.
    group: Option<String>,
    topic: String,
}

#[async_trait]
impl PartitionReader for EmbeddedReader {
    fn partition(&self) -> u32 {
        self.part.id()
    }

    async fn next_batch(&mut self, max: usize) -> Result<Vec<LogRecord>, LogError> {
        loop {
            let end = *self.end.borrow_and_update();
            if self.next >= end {
                self.end.changed().await.map_err(|_| LogError::Closed)?;
                continue;
            }
            let part = self.part.clone();
            let from = self.next;
            let (frames, next) = tokio::task::spawn_blocking(move || part.read(from, max, 1 << 20))
                .await
                .map_err(|e| LogError::Backend(e.to_string()))??;
            self.next = next.max(self.next);
            if !frames.is_empty() {
                let partition = self.part.id();
                return Ok(frames.into_iter().map(|f| record(partition, f)).collect());
            }
            if self.next == from {
                // Planned against a segment that was just reclaimed; re-plan from the new start.
                self.next = self.part.start_offset().max(from);
                if self.next == from {
                    tokio::task::yield_now().await;
                }
            }
        }
    }

    fn committer(&self) -> Arc<dyn Committer> {
        let Some(group) = self.group.clone() else { return Arc::new(crate::log::NoCommit) };
        Arc::new(EmbeddedCommitter {
            part: self.part.clone(),
            offsets: self.offsets.clone(),
            group,
            topic: self.topic.clone(),
        })
    }
}

struct EmbeddedCommitter {
    part: PartitionRef,
    offsets: Arc<OffsetStore>,
    group: String,
    topic: String,
}

impl Committer for EmbeddedCommitter {
    fn commit(&self, next: u64) {
        self.offsets.commit(&self.group, &self.topic, self.part.id(), next);
    }

    fn end_offset(&self) -> u64 {
        self.part.end_offset()
    }

    fn committed(&self) -> u64 {
        self.offsets.get(&self.group, &self.topic, self.part.id())
    }
}

#[cfg(test)]
mod tests;
