//! The embedded log: partitioned topics as segment files in the data directory, a single
//! group-commit writer thread whose groups are made durable by one journal sync each
//! ([`journal`]), persisted consumer offsets, and reclaim of consumed segments.
//! It is the default backend, so `herald serve` needs nothing but a disk.

mod journal;
mod offsets;
mod partition;
mod segment;

use super::{
    partition_for, Assignment, Committer, Consumer, Log, LogError, LogRecord, PartitionReader, Position, Record,
    TopicSpec,
};
use crate::model::now_ms;
use async_trait::async_trait;
use bytes::BytesMut;
use journal::Journal;
use offsets::OffsetStore;
pub use partition::start_write_back;
use partition::{AppendError, Partition, PartitionRef, Staged, Wait};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// Bytes of each group-journal file, unless configured otherwise.
pub const DEFAULT_JOURNAL_BYTES: u64 = journal::DEFAULT_BYTES;

/// How the embedded log is laid out and tuned.
#[derive(Clone)]
pub struct EmbeddedConfig {
    /// Root directory (`<data-dir>/log`).
    pub dir: PathBuf,
    /// A segment is sealed once it would grow past this many bytes.
    pub segment_bytes: u64,
    /// How often committed offsets are persisted and consumed segments reclaimed.
    pub flush_interval: Duration,
    /// The topics to open or create.
    pub topics: Vec<TopicSpec>,
    /// Bytes of each of the two group-journal files before the writer turns to the other
    /// ([`DEFAULT_JOURNAL_BYTES`] unless a test wants many turns).
    pub journal_bytes: u64,
    /// Faults to inject into segment reads and writes (tests of disk full and failing disks).
    pub faults: Faults,
}

/// A file operation of the append or read path, offered to an injected fault.
#[derive(Debug, Clone, Copy)]
pub enum Fault<'a> {
    /// Reading records from this segment file.
    Read(&'a std::path::Path),
    /// Writing a batch to this segment file.
    Write(&'a std::path::Path),
    /// Making this file durable (through this open file: a test of a power cut can tell which
    /// file behind a name was synced).
    Sync(&'a std::path::Path, &'a std::fs::File),
    /// Starting this segment file's writeback early (a hint: refusing it only skips it).
    WriteBack(&'a std::path::Path),
    /// Making a directory's entries durable (at open).
    SyncDir(&'a std::path::Path),
}

/// A hook that may fail an operation of the append or read path as the disk would (ENOSPC,
/// EIO), so tests can show that no failure loses or corrupts an acknowledged record (or, by
/// panicking, stand for a bug in a partition's reader).
pub type Faults = Option<Arc<dyn Fn(Fault<'_>) -> std::io::Result<()> + Send + Sync>>;

type Topic = Arc<Vec<PartitionRef>>;

/// How far a topic's own reader has read each partition (`Log::read_up_to`).
type ReadUpTo = Arc<Vec<AtomicU64>>;

struct AppendRequest {
    records: Vec<(PartitionRef, Record)>,
    reply: oneshot::Sender<Result<Vec<Position>, Refused>>,
}

/// What the writer thread is asked to do.
enum Job {
    Append(AppendRequest),
    /// A checkpoint of everything appended before it, at a clean close ([`Journal::clear`]).
    Clear(oneshot::Sender<std::io::Result<()>>),
}

impl AppendRequest {
    fn bytes(&self) -> usize {
        self.records.iter().map(|(_, r)| r.key.len() + r.value.len()).sum()
    }
}

/// A group takes no more requests once it holds this many bytes.
const GROUP_BYTES: usize = 64 << 20;

/// Why a group of appends was refused: nothing of it was kept.
#[derive(Debug, Clone)]
enum Refused {
    TooLarge(usize),
    Io(std::io::ErrorKind, String),
}

/// The log in local files: what `herald serve` runs on with nothing else installed.
pub struct EmbeddedLog {
    topics: HashMap<String, Topic>,
    /// Topics with a retention by age, and compacted ones, for the flusher; for a topic whose
    /// retention waits for its reader, how far that reader read each partition.
    retention: Vec<(Topic, Duration, Option<ReadUpTo>)>,
    /// The clock reclaiming by age goes by.
    age_clock: crate::model::AgeClock,
    compacted: Vec<Topic>,
    writer: mpsc::UnboundedSender<Job>,
    /// Consumed segments for the reaper thread to delete, paced, off the flusher's path.
    reaper: std::sync::mpsc::Sender<PathBuf>,
    offsets: Arc<OffsetStore>,
    closed: watch::Sender<bool>,
    /// Set once the group journal refuses every append until a restart.
    journal_failed: Arc<std::sync::atomic::AtomicBool>,
}

impl EmbeddedLog {
    /// An embedded log in `dir` holding `topics`, as unit tests open one: 8 MiB segments,
    /// flushed every 20 ms, no faults.
    #[cfg(test)]
    pub(crate) async fn for_tests(dir: &std::path::Path, topics: Vec<super::TopicSpec>) -> Arc<Self> {
        EmbeddedLog::open(EmbeddedConfig {
            dir: dir.to_path_buf(),
            segment_bytes: 8 << 20,
            flush_interval: std::time::Duration::from_millis(20),
            topics,
            journal_bytes: DEFAULT_JOURNAL_BYTES,
            faults: None,
        })
        .await
        .unwrap()
    }

    /// Opens the log, recovering every partition (torn tails cut off, what the group journal
    /// holds written back, compacted topics compacted), and starts the writer thread and the
    /// offset flusher.
    pub async fn open(config: EmbeddedConfig) -> Result<Arc<Self>, LogError> {
        let cfg = config.clone();
        let (topics, offsets, journal) = tokio::task::spawn_blocking(move || -> Result<_, LogError> {
            let mut topics = HashMap::new();
            for spec in &cfg.topics {
                if spec.name.len() > journal::MAX_TOPIC {
                    return Err(LogError::Backend(format!("topic name longer than {} bytes", journal::MAX_TOPIC)));
                }
                let dir = cfg.dir.join("topics").join(&spec.name);
                let mut parts = Vec::new();
                for p in 0..partitions_on_disk(&dir, spec)? {
                    let part = Partition::open(
                        p,
                        &spec.name,
                        !spec.compacted,
                        dir.join(p.to_string()),
                        cfg.segment_bytes,
                        cfg.faults.clone(),
                    )?;
                    if spec.compacted && part.compact()? {
                        tracing::info!(topic = %spec.name, partition = p, "compacted");
                    }
                    parts.push(Arc::new(part));
                }
                topics.insert(spec.name.clone(), Arc::new(parts));
            }
            let (mut journal, replay) = Journal::open(&cfg.dir.join("journal"), cfg.journal_bytes, cfg.faults.clone())?;
            restore(&topics, replay, &mut journal)?;
            for part in topics.values().flat_map(|t| t.iter()) {
                part.drop_empty_sealed()?;
                part.opened()?;
            }
            journal.start()?;
            let offsets = OffsetStore::open(cfg.dir.join("offsets"))?;
            // The directories above the partitions hold the names everything below is found
            // by: synced once, bottom up (a partition's own directory is synced with its first
            // file). ext4 and xfs commit them with any later fsync; other file systems need not,
            // and a power cut could lose a topic, the offsets, or the log itself.
            let mut dirs: Vec<PathBuf> = cfg.topics.iter().map(|t| cfg.dir.join("topics").join(&t.name)).collect();
            dirs.extend([cfg.dir.join("topics"), cfg.dir.clone()]);
            dirs.extend(cfg.dir.parent().map(Path::to_path_buf));
            for dir in dirs {
                if let Some(fault) = &cfg.faults {
                    fault(Fault::SyncDir(&dir))?;
                }
                partition::sync_dir(&dir)?;
            }
            Ok((topics, Arc::new(offsets), journal))
        })
        .await
        .map_err(|e| LogError::Backend(e.to_string()))??;

        let (writer, rx) = mpsc::unbounded_channel();
        let journal_failed = journal.failed();
        std::thread::Builder::new().name("herald-log-writer".into()).spawn(move || write_loop(rx, journal))?;
        let (reaper, doomed) = std::sync::mpsc::channel();
        std::thread::Builder::new().name("herald-log-reaper".into()).spawn(move || reap_loop(doomed))?;
        let (closed, _) = watch::channel(false);
        let of = |spec: &TopicSpec| topics[&spec.name].clone();
        let read_up_to = |t: &TopicSpec| {
            t.retention_waits_for_reader.then(|| Arc::new((0..of(t).len()).map(|_| AtomicU64::new(0)).collect()))
        };
        let retention = config.topics.iter().filter_map(|t| Some((of(t), t.retention?, read_up_to(t)))).collect();
        let compacted = config.topics.iter().filter(|t| t.compacted).map(of).collect();
        let log = Arc::new(EmbeddedLog {
            topics,
            retention,
            age_clock: crate::model::AgeClock::start(),
            compacted,
            writer,
            reaper,
            offsets,
            closed,
            journal_failed,
        });
        tokio::spawn(flush_loop(Arc::downgrade(&log), config.flush_interval));
        Ok(log)
    }

    fn topic(&self, name: &str) -> Result<&Topic, LogError> {
        self.topics.get(name).ok_or_else(|| LogError::UnknownTopic(name.to_string()))
    }

    fn partition(&self, topic: &str, partition: u32) -> Result<&PartitionRef, LogError> {
        self.topic(topic)?.get(partition as usize).ok_or_else(|| LogError::UnknownTopic(format!("{topic}/{partition}")))
    }

    /// Persists offsets, reclaims segments every consumer has consumed or that outlived their
    /// topic's retention, and compacts catalog segments that piled up. Consumed segments are
    /// handed to the reaper thread, so their files may still be going when this returns.
    pub async fn flush(&self) -> Result<(), LogError> {
        self.flush_at(now_ms()).await
    }

    /// [`EmbeddedLog::flush`] with the wall clock saying `wall_ms` (held back by the log's
    /// [`crate::model::AgeClock`]: a clock stepped forward past `log.dlq_retention` while
    /// Herald ran deleted every dead letter).
    pub(crate) async fn flush_at(&self, wall_ms: i64) -> Result<(), LogError> {
        let now = self.age_clock.guard(wall_ms);
        let offsets = self.offsets.clone();
        let reaper = self.reaper.clone();
        let topics: Vec<(String, Topic)> = self.topics.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let retention = self.retention.clone();
        let compacted = self.compacted.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            // Every step runs whatever another failed, the first error reported: a compaction
            // that cannot write its scratch file on a full disk stopped the offsets being saved
            // and consumed segments being reclaimed, so the disk never freed itself.
            let mut first_error = None;
            let mut note = |r: std::io::Result<()>| {
                if let Err(e) = r {
                    first_error.get_or_insert(e);
                }
            };
            for (parts, keep, read) in &retention {
                for (p, part) in parts.iter().enumerate() {
                    let read = read.as_ref().map(|r| r[p].load(Ordering::Acquire));
                    note(part.reclaim_older(now - keep.as_millis() as i64, read).map(drop));
                }
            }
            for parts in &compacted {
                for part in parts.iter() {
                    note(part.compact_sealed().map(drop));
                }
            }
            // What every group has committed in memory has been settled: reclaimed even when
            // saving the offsets failed, since a group that restarts from an older saved
            // offset goes on from the partition's start (nothing unsettled is below it).
            let mut plan = Vec::new();
            for (name, parts) in &topics {
                for part in parts.iter() {
                    if let Some(min) = offsets.min_committed(name, part.id()) {
                        plan.push((part.clone(), min));
                    }
                }
            }
            note(offsets.flush());
            for (part, min) in plan {
                for path in part.reclaim(min) {
                    // Only fails once the reaper is gone, with the process: the file stays and
                    // the next start reclaims it again.
                    let _ = reaper.send(path);
                }
            }
            first_error.map_or(Ok(()), Err)
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

/// Deletes consumed segments one after another, each in paced steps
/// ([`partition::remove_in_steps`]): about 35 ms for a 64 MiB segment, which inside the
/// flusher made every later offset flush wait once a large backlog had drained (dozens of
/// segments at once) — seconds in which a crash would have redelivered more. A failure leaves
/// the file (or its `*.deleting` rename) for the next start to remove.
fn reap_loop(doomed: std::sync::mpsc::Receiver<PathBuf>) {
    for path in doomed {
        if let Err(e) = partition::remove_in_steps(&path) {
            tracing::warn!(path = %path.display(), error = %e, "deleting a consumed segment failed");
        }
    }
}

/// The group-commit loop: take every request that is waiting, write each partition's share
/// in one write, make the group durable with one journal sync, then answer them all.
fn write_loop(mut rx: mpsc::UnboundedReceiver<Job>, mut journal: Journal) {
    let mut buffers = Buffers::default();
    while let Some(job) = rx.blocking_recv() {
        let first = match job {
            Job::Append(first) => first,
            Job::Clear(done) => {
                let _ = done.send(journal.clear());
                continue;
            }
        };
        let mut bytes = first.bytes();
        let mut group = vec![first];
        let mut then_clear = None;
        // Bounded in bytes too: a group is one journal entry, held in memory whole.
        while group.len() < 4096 && bytes < GROUP_BYTES {
            match rx.try_recv() {
                Ok(Job::Append(r)) => {
                    bytes += r.bytes();
                    group.push(r);
                }
                Ok(Job::Clear(done)) => {
                    then_clear = Some(done);
                    break;
                }
                Err(_) => break,
            }
        }
        commit_group(group, &mut journal, &mut buffers);
        buffers.trim();
        if let Some(done) = then_clear {
            let _ = done.send(journal.clear());
        }
    }
}

/// The buffers a group is encoded into, kept between groups: fresh ones per group commit made
/// the allocator fault in (and zero) new pages on every append.
#[derive(Default)]
struct Buffers {
    /// The group's journal entry: the frames of every journaled share.
    entry: BytesMut,
    /// The frames of the compacted topics' shares, which are not journaled.
    plain: BytesMut,
}

impl Buffers {
    /// A buffer grown past this (a huge group) is not kept.
    const KEEP: usize = 8 << 20;

    fn trim(&mut self) {
        for buf in [&mut self.entry, &mut self.plain] {
            if buf.capacity() > Self::KEEP {
                *buf = BytesMut::new();
            }
        }
    }
}

/// Appends a group all or nothing: every partition's share is written, then the group is made
/// durable — one journal entry for the shares of plain topics, a sync of its own for a
/// compacted topic's — and only then published; if any write or sync fails, every share is
/// rolled back and every request refused, so a refused append leaves nothing behind (a
/// producer's retry is not a duplicate) and an acknowledged one is always readable.
fn commit_group(group: Vec<AppendRequest>, journal: &mut Journal, buffers: &mut Buffers) {
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
    journal::begin(&mut buffers.entry);
    buffers.plain.clear();
    let mut staged = Vec::with_capacity(buckets.len());
    let mut refused = None;
    for (part, members) in &buckets {
        let records: Vec<(&[u8], &[u8])> = members
            .iter()
            .map(|&(r, i)| {
                let rec = &group[r].records[i].1;
                (&rec.key[..], &rec.value[..])
            })
            .collect();
        let written = if part.journaled() {
            let at = journal::begin_share(&mut buffers.entry, part.topic(), part.id());
            let written = part.stage(&records, ts, &mut buffers.entry);
            journal::end_share(&mut buffers.entry, at);
            written
        } else {
            part.stage(&records, ts, &mut buffers.plain)
        };
        match written {
            Ok(s) => staged.push(s),
            Err(AppendError::TooLarge { bytes }) => {
                refused = Some(Refused::TooLarge(bytes));
                break;
            }
            Err(AppendError::Io(e)) => {
                tracing::error!(partition = part.id(), error = %e, "log write failed; the group is rolled back");
                refused = Some(Refused::Io(e.kind(), e.to_string()));
                break;
            }
        }
    }
    if refused.is_none() {
        if let Err(e) = make_durable(&buckets, &staged, journal, &mut buffers.entry) {
            tracing::error!(error = %e, "making a log group durable failed; the group is rolled back");
            refused = Some(Refused::Io(e.kind(), e.to_string()));
        }
    }
    if let Some(refused) = refused {
        for ((part, _), st) in buckets.iter().zip(staged) {
            part.rollback(st);
        }
        for req in group {
            let _ = req.reply.send(Err(refused.clone()));
        }
        return;
    }
    let mut positions: Vec<Vec<Option<Position>>> = group.iter().map(|r| vec![None; r.records.len()]).collect();
    for ((part, members), st) in buckets.iter().zip(staged) {
        let first = part.publish(st);
        for (k, &(r, i)) in members.iter().enumerate() {
            positions[r][i] = Some(Position { partition: part.id(), offset: first + k as u64 });
        }
    }
    for (req, pos) in group.into_iter().zip(positions) {
        let _ = req.reply.send(Ok(pos.into_iter().map(|p| p.expect("every record placed")).collect()));
    }
}

/// Makes a staged group durable: a compacted topic's share (rare: catalog changes) synced on
/// its own, the rest as the one journal entry, each journaled share's file first noted for the
/// journal's checkpoint.
fn make_durable(
    buckets: &[(PartitionRef, Vec<(usize, usize)>)],
    staged: &[Staged],
    journal: &mut Journal,
    entry: &mut BytesMut,
) -> std::io::Result<()> {
    for ((part, _), st) in buckets.iter().zip(staged) {
        if !part.journaled() {
            sync_share(part, st)?;
        }
    }
    if journal::has_shares(entry) {
        for ((part, _), st) in buckets.iter().zip(staged) {
            if part.journaled() {
                journal.written(part, st)?;
            }
        }
        journal.commit(entry)?;
    }
    Ok(())
}

/// Syncs one share; a panic in it is an error of that share, so the group is refused rather
/// than the writer dying with requests unanswered.
fn sync_share(part: &Partition, staged: &Staged) -> std::io::Result<()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| part.sync(staged)))
        .unwrap_or_else(|_| Err(std::io::Error::other("log sync panicked")))
}

/// Writes back into their partitions the records the group journal holds (at open, before
/// anything reads them): each partition is cut back to the first offset the journal has for it
/// and its records appended again with their offsets and times, so whatever of them a crash
/// kept from the disk is restored, and what did reach it is rewritten the same.
fn restore(
    topics: &HashMap<String, Topic>,
    replay: Vec<journal::Replay>,
    journal: &mut Journal,
) -> std::io::Result<()> {
    let mut restored = 0usize;
    for r in replay {
        let Some(part) = topics.get(&r.topic).and_then(|t| t.get(r.partition as usize)).filter(|p| p.journaled())
        else {
            // A topic renamed (`log.topic_prefix` changed) or no longer journaled: nothing reads
            // the old partition any more.
            tracing::error!(topic = %r.topic, partition = r.partition, records = r.frames.len(), "the log journal holds records of a partition this log does not journal; they are not restored");
            continue;
        };
        let Some(last) = r.frames.last() else { continue };
        if part.end_offset() > last.offset + 1 {
            // A group staged into the segment but never committed to the journal (a crash
            // while it was written): the journal holds the partition's newest acknowledged
            // append, so what lies past it was never acknowledged and is cut with the rest.
            // Leaving the partition as it was would keep a stretch a power cut damaged before
            // it (writeback goes in any order) from being put back.
            tracing::info!(topic = %r.topic, partition = r.partition, records = part.end_offset() - last.offset - 1, "records past the log journal's last were never acknowledged; cut");
        }
        // Only a contiguous run can be put back whole: after a gap (which should not happen),
        // what comes before it is not the journal's to cut.
        let from = r.frames.windows(2).rposition(|w| w[1].offset != w[0].offset + 1).map_or(0, |i| i + 1);
        if from > 0 {
            tracing::warn!(topic = %r.topic, partition = r.partition, at = r.frames[from].offset, "a gap in the log journal's records of a partition; restoring from after it");
        }
        let cut = r.frames[from].offset.max(part.start_offset());
        let frames: Vec<&segment::Frame> = r.frames[from..].iter().filter(|f| f.offset >= cut).collect();
        if frames.is_empty() {
            continue;
        }
        part.truncate_to(cut)?;
        let mut buf = BytesMut::new();
        for run in frames.chunk_by(|a, b| a.timestamp_ms == b.timestamp_ms) {
            let records: Vec<(&[u8], &[u8])> = run.iter().map(|f| (&f.key[..], &f.value[..])).collect();
            buf.clear();
            let st = part.stage(&records, run[0].timestamp_ms, &mut buf).map_err(|e| match e {
                AppendError::Io(e) => e,
                AppendError::TooLarge { bytes } => {
                    std::io::Error::other(format!("a journaled record of {bytes} bytes"))
                }
            })?;
            journal.written(part, &st)?;
            part.publish(st);
        }
        restored += frames.len();
    }
    // Every file written back is synced before the journal starts a new epoch.
    journal.sync_written()?;
    if restored > 0 {
        tracing::info!(records = restored, "log records restored from the group journal");
    }
    Ok(())
}

/// How many partitions a topic has: as configured, or more when its directory already holds
/// more (lowering `log.partitions` must not orphan the records in the others); a keyed topic
/// that exists, exactly as many as it holds.
fn partitions_on_disk(dir: &std::path::Path, spec: &TopicSpec) -> std::io::Result<u32> {
    let mut on_disk = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries {
            let name = entry?.file_name();
            if let Some(p) = name.to_str().and_then(|s| s.parse::<u32>().ok()) {
                on_disk = on_disk.max(p + 1);
            }
        }
    }
    let n = match on_disk {
        0 => spec.partitions,
        found if spec.keyed => found,
        found => found.max(spec.partitions),
    };
    if n != spec.partitions {
        tracing::warn!(topic = %spec.name, configured = spec.partitions, on_disk, using = n, keyed = spec.keyed,
            "the topic has other partitions on disk than configured (a keyed topic keeps its own)");
    }
    Ok(n)
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
    let mut replanned = 0;
    loop {
        if next >= end {
            return Ok((Vec::new(), None));
        }
        let (frames, after) = part.read(next, max.max(1), super::PAGE_BYTES)?;
        if !frames.is_empty() {
            let records = frames.into_iter().map(|f| record(part.id(), f)).collect();
            return Ok((records, (after < end).then_some(after)));
        }
        if after <= next {
            // The segment went (reclaimed, or compacted under a new name) between planning the
            // read and opening it: go on from the partition's new start, or plan again (a few
            // times: each is another file gone under the read).
            let start = part.start_offset();
            if start <= next {
                replanned += 1;
                if replanned > 3 {
                    return Ok((Vec::new(), None));
                }
            }
            next = next.max(start);
            continue;
        }
        next = after;
    }
}

#[async_trait]
impl Log for EmbeddedLog {
    fn partitions(&self, topic: &str) -> Result<u32, LogError> {
        Ok(self.topic(topic)?.len() as u32)
    }

    /// One process: what it has read of a topic is all there is.
    fn shared(&self) -> bool {
        false
    }

    /// No limit below the records Herald makes.
    fn max_record_bytes(&self) -> Option<usize> {
        None
    }

    fn read_up_to(&self, topic: &str, partition: u32, offset: u64) {
        let Some(topic) = self.topics.get(topic) else { return };
        let read = self.retention.iter().find(|(t, _, _)| Arc::ptr_eq(t, topic)).and_then(|(_, _, r)| r.as_ref());
        if let Some(slot) = read.and_then(|r| r.get(partition as usize)) {
            slot.fetch_max(offset, Ordering::AcqRel);
        }
    }

    async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<Position>, LogError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let parts = self.topic(topic)?;
        let n = parts.len() as u32;
        let records = records.into_iter().map(|r| (parts[partition_for(&r.key, n) as usize].clone(), r)).collect();
        let (reply, rx) = oneshot::channel();
        self.writer.send(Job::Append(AppendRequest { records, reply })).map_err(|_| LogError::Closed)?;
        let answer = rx.await;
        match answer {
            Ok(Ok(positions)) => Ok(positions),
            Ok(Err(Refused::TooLarge(bytes))) => Err(LogError::TooLarge { bytes, max: segment::MAX_FRAME - 20 }),
            Ok(Err(Refused::Io(kind, message))) => Err(LogError::Io(std::io::Error::new(kind, message))),
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
        let parts = self.topic(topic)?.clone();
        self.offsets.join(group, topic)?;
        let consumer = EmbeddedConsumer {
            // One process owns every partition of the embedded log.
            pending: parts.iter().rev().cloned().collect(),
            parts,
            offsets: self.offsets.clone(),
            group: group.to_string(),
            topic: topic.to_string(),
            closed: self.closed.subscribe(),
        };
        Ok(Box::new(consumer))
    }

    async fn follow(&self, topic: &str, partition: u32, from: u64) -> Result<Box<dyn PartitionReader>, LogError> {
        let part = self.partition(topic, partition)?.clone();
        Ok(Box::new(EmbeddedReader {
            next: from,
            hint: None,
            end: part.watch_end(),
            part,
            offsets: self.offsets.clone(),
            group: None,
            topic: topic.to_string(),
        }))
    }

    async fn ready(&self) -> bool {
        !self.writer.is_closed() && !*self.closed.borrow() && !self.journal_failed.load(Ordering::Relaxed)
    }

    /// A journal that failed its checkpoint takes no append until a restart writes the log
    /// back from it: the process is broken (`/healthz` answers 503, so an orchestrator
    /// restarts it), not only not ready.
    fn broken(&self) -> Option<String> {
        self.journal_failed
            .load(Ordering::Relaxed)
            .then(|| "the log's journal failed a checkpoint; it takes no appends until Herald restarts".to_string())
    }

    /// Stops the flusher after a final flush; appends still in the writer complete, then the
    /// journal is checkpointed whole, so the next open has nothing to write back. A failed
    /// flush does not skip the checkpoint; the first error is returned.
    async fn close(&self) -> Result<(), LogError> {
        self.closed.send_replace(true);
        let flushed = self.flush().await;
        let (done, cleared) = oneshot::channel();
        self.writer.send(Job::Clear(done)).map_err(|_| LogError::Closed)?;
        let cleared = cleared.await.map_err(|_| LogError::Closed)?;
        flushed?;
        Ok(cleared?)
    }
}

struct EmbeddedConsumer {
    /// Partitions not handed out yet.
    pending: Vec<PartitionRef>,
    parts: Topic,
    offsets: Arc<OffsetStore>,
    group: String,
    topic: String,
    closed: watch::Receiver<bool>,
}

impl EmbeddedConsumer {
    /// A reader of `part` in this group, from its committed offset — or, if that is past the
    /// partition's end, from the end the open found: records lost below a commit (a file
    /// removed by hand, a disk that lied about a sync) had their offsets taken by the next
    /// appends, which a reader waiting at the commit never read. (Past the end, the commit
    /// is an earlier run's: this run's commits are of records it has.)
    fn reader(&self, part: &PartitionRef) -> Box<dyn PartitionReader> {
        let committed = self.offsets.get(&self.group, &self.topic, part.id());
        let (end, from) = (part.end_offset(), part.end_at_open());
        let next = if committed > end {
            tracing::error!(topic = %self.topic, partition = part.id(), group = %self.group, committed, end, from, "a consumer's committed offset is past the partition's end (records were lost); reading from where the log opened");
            self.offsets.rewind(&self.group, &self.topic, part.id(), from);
            from
        } else {
            committed
        };
        Box::new(EmbeddedReader {
            next,
            hint: None,
            end: part.watch_end(),
            part: part.clone(),
            offsets: self.offsets.clone(),
            group: Some(self.group.clone()),
            topic: self.topic.clone(),
        })
    }
}

#[async_trait]
impl Consumer for EmbeddedConsumer {
    async fn next_assignment(&mut self) -> Option<Assignment> {
        if let Some(part) = self.pending.pop() {
            return Some(Assignment::Assigned(self.reader(&part)));
        }
        let _ = self.closed.wait_for(|c| *c).await;
        None
    }

    async fn reopen(&mut self, partition: u32) -> Result<Box<dyn PartitionReader>, LogError> {
        if *self.closed.borrow() {
            return Err(LogError::Closed);
        }
        let part = self
            .parts
            .iter()
            .find(|p| p.id() == partition)
            .ok_or_else(|| LogError::UnknownTopic(format!("{}/{partition}", self.topic)))?;
        Ok(self.reader(part))
    }
}

struct EmbeddedReader {
    part: PartitionRef,
    next: u64,
    /// Where the last read stopped.
    hint: Option<partition::ReadHint>,
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
            let from = self.next;
            // Read here, on the runtime's thread, what the page cache holds (a log being
            // worked is nearly always there, just written), and only what would wait for the
            // disk on a blocking thread. Reading every batch on a blocking thread meant its
            // buffers were allocated on one thread and freed on others, and mimalloc got such
            // pages back only through ones it abandons: a 10 M backlog's drain held ~50 MiB for
            // ten minutes, then climbed to 183–208 MiB and stayed. Read here, the same drain
            // held 48–58 MiB throughout, and ran at 10,356 deliveries/s against 8,426–8,720
            // (a build reading every batch here; BENCHMARKS.md, "Backlog").
            let max_bytes = crate::log::BATCH_BYTES;
            let read = match self.part.read_on(from, max, max_bytes, &mut self.hint, Wait::No) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    let part = self.part.clone();
                    let mut hint = self.hint.take();
                    let (read, hint) = tokio::task::spawn_blocking(move || {
                        (part.read_on(from, max, max_bytes, &mut hint, Wait::Yes), hint)
                    })
                    .await
                    .map_err(|e| LogError::Backend(e.to_string()))?;
                    self.hint = hint;
                    read
                }
                read => read,
            };
            let (frames, next) = read?;
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
