//! The local index of the history topic: every process reads every partition of the topic into
//! its own store (a global table, as Kafka Streams keeps one), so any process answers any
//! query, and the store can always be rebuilt from the topic. The store is fjall (an LSM tree)
//! with one keyspace per UTC day: expiry deletes whole keyspaces, never scans, and nothing
//! grows past the retention. The offsets read so far are written in the same atomic batch as
//! what they produced, so after a crash the index resumes exactly where its data ends.

use super::keys::{self, Key};
use super::record::{
    self, attempt_view, listing, read_listing, AttemptRecord, DeliveryState, EventRecord, HistoryRecord, State,
};
use crate::log::LogRecord;
use crate::model::rfc3339_ms;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use serde_json::value::RawValue;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::RwLock;
use std::time::Duration;

/// Why the index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// The store failed.
    #[error("history index: {0}")]
    Store(#[from] fjall::Error),
    /// Its directory could not be made.
    #[error("history index directory: {0}")]
    Io(#[from] std::io::Error),
    /// A cursor that is not a position in the list asked for (another list's, or the same
    /// list's for another filter).
    #[error("not a cursor of this list: use the next a page of this query returned")]
    Cursor,
}

/// Most index entries one query looks at before it answers with what it found and a cursor
/// (a filter that matches little cannot make a request scan the whole history).
const SCAN_LIMIT: usize = 20_000;

/// Most delivery states one recover call looks at (see [`Index::recoverable`]): a few tens of
/// milliseconds of reads.
const RECOVER_SCAN: usize = 100_000;

/// Versions of one delivery a recover reads in turn before it reads only the newest (see
/// [`Index::recoverable`]).
const VERSIONS_READ_IN_TURN: usize = 64;

/// What [`Index::recoverable`] found: `(tenant, event)` oldest first, and the time (ms) to go
/// on from when it stopped early (its events were not looked at yet).
#[derive(Debug)]
pub struct Recoverable {
    /// The events to send again.
    pub events: Vec<(String, String)>,
    /// Where a next call goes on (`since`), if this one stopped early.
    pub continue_from_ms: Option<i64>,
}

/// History records indexed in one atomic write at most (unless one record of the topic holds
/// more): enough that a write's fixed costs are small, few enough that its buffers stay below
/// the allocator's huge-allocation size (batches of 4096 had every batch's growing buffers
/// faulted in and zeroed afresh, 18 % of the indexer's time).
const APPLY_BATCH: usize = 1024;

/// A page of a list.
#[derive(Debug, Default)]
pub struct Page {
    /// The items, as JSON.
    pub items: Vec<Box<RawValue>>,
    /// Where the next page starts, if there is one.
    pub next: Option<String>,
}

/// What `GET /v1/attempts` asks for.
#[derive(Debug, Default, Clone)]
pub struct AttemptQuery {
    /// Whose attempts.
    pub tenant: String,
    /// Only this event's.
    pub event: Option<String>,
    /// Only this subscription's.
    pub subscription: Option<String>,
    /// Only attempts with this outcome label.
    pub outcome: Option<String>,
    /// Made at or after this time (ms).
    pub since_ms: Option<i64>,
    /// Made at or before this time (ms).
    pub until_ms: Option<i64>,
    /// Most items.
    pub limit: usize,
    /// Bytes of items past which a page ends (past the first), when bounded: 500 attempts of
    /// 64 KiB responses of control characters (six bytes each in JSON) were 200 MB at once.
    pub max_bytes: Option<usize>,
    /// Where to continue.
    pub cursor: Option<String>,
}

/// What `GET /v1/events` asks for.
#[derive(Debug, Default, Clone)]
pub struct EventQuery {
    /// Whose events.
    pub tenant: String,
    /// Only events of this type.
    pub event_type: Option<String>,
    /// Accepted at or after (ms).
    pub since_ms: Option<i64>,
    /// Accepted at or before (ms).
    pub until_ms: Option<i64>,
    /// Most items.
    pub limit: usize,
    /// Where to continue.
    pub cursor: Option<String>,
}

/// One delivery of an event, as `GET /v1/events/{id}` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeliveryView {
    /// The subscription.
    pub subscription: String,
    /// Where it stands.
    pub state: &'static str,
    /// Attempts made.
    pub attempts: u32,
    /// When the last one started.
    pub last_attempt_at: Option<String>,
    /// When the next one is due.
    pub next_attempt_at: Option<String>,
}

/// Continues a scan: the day and the last key returned.
fn encode_cursor(day: u32, key: &[u8]) -> String {
    use base64::Engine;
    let mut bytes = day.to_be_bytes().to_vec();
    bytes.extend_from_slice(key);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A cursor read back; `None` for one that is not ours.
pub fn decode_cursor(cursor: &str) -> Option<(u32, Vec<u8>)> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(cursor).ok()?;
    let day = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    Some((day, bytes[4..].to_vec()))
}

/// What ties a page of one event's attempts to that event: 8 bytes of a hash of its id.
fn event_cursor_tag(event_id: &str) -> [u8; 8] {
    use sha2::Digest;
    sha2::Sha256::digest(event_id.as_bytes())[..8].try_into().expect("8 bytes")
}

/// The index.
pub struct Index {
    db: Database,
    meta: Keyspace,
    days: RwLock<BTreeMap<u32, Keyspace>>,
    retention: Duration,
    /// Memtable bytes (active and sealed, every keyspace) beyond which indexing waits.
    write_buffer: u64,
    /// When the store's journal was last written out, and how often it is ([`SYNC_EVERY`]).
    synced: std::sync::Mutex<std::time::Instant>,
    sync_every: Duration,
    /// By partition written by this process: the next offset to index as on disk, as of the
    /// last [`Index::sync`] (see [`Index::durable_offset`]).
    durable: std::sync::Mutex<HashMap<u32, u64>>,
    /// Bumped after every write, for those waiting for the index to catch up.
    progress: tokio::sync::watch::Sender<u64>,
    /// Attempt records read by queries (what a test of their cost counts).
    #[cfg(test)]
    attempt_reads: std::sync::atomic::AtomicUsize,
    /// Delivery state versions read by queries.
    #[cfg(test)]
    version_reads: std::sync::atomic::AtomicUsize,
}

/// The first key after every key that starts with `prefix`, if there is one.
fn after_prefix(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut after = prefix.to_vec();
    while let Some(last) = after.pop() {
        if last < u8::MAX {
            after.push(last + 1);
            return Some(after);
        }
    }
    None
}

/// The key range of `prefix` followed by a newest-first time within `[since, until]`.
fn newest_first_bounds(prefix: &[u8], since: Option<i64>, until: Option<i64>) -> (Vec<u8>, Option<Vec<u8>>) {
    let mut start = prefix.to_vec();
    start.extend_from_slice(&(u64::MAX - until.unwrap_or(i64::MAX).max(0) as u64).to_be_bytes());
    let end = match since {
        Some(s) if s > 0 => {
            let mut e = prefix.to_vec();
            e.extend_from_slice(&(u64::MAX - (s - 1) as u64).to_be_bytes());
            Some(e)
        }
        _ => keys::prefix_end(prefix),
    };
    (start, end)
}

/// A day keyspace's memtable (fjall's default is 64 MiB). The memtables are most of Herald's
/// own heap with history on (`heaptrack`: 92 of 120 MB at 32 MiB, the skiplist holding about
/// 1.4× what fjall counts), and what the allocator keeps around them is most of the rest: at
/// 32 MiB a 10 M backlog drain peaked at 302 MiB of RSS, at 16 MiB at 218 MiB (#20's bound is
/// 256 MB; BENCHMARKS.md, "Backlog"). What smaller memtables cost is compaction, see
/// [`L0_TABLES`].
const MEMTABLE_BYTES: u64 = 16 << 20;

/// Flushed tables merged into level 1 at once, and level 1's table size (fjall's defaults: 4
/// and 64 MiB). Every key starts with a tenant's or a subscription's id followed by a
/// newest-first time, so each flushed table overlaps nearly every table of level 1, and each
/// merge rewrites level 1 whole: what decides the compaction work is how often level 0 is
/// merged against how large level 1 has grown. Sixteen 16 MiB memtables a merge (eight
/// before) took fjall's worker from 15.1–15.9 s to 11.6–12.1 s of CPU over 1.6 M deliveries
/// indexed at once (e2e, history at `0s`), and a 10 M fill from 88 k to 97 k attempts/s;
/// KV separation (values of 96 or 512 bytes and more in blob files) saved nothing more. A scan
/// reads up to sixteen level-0 tables: at 10 M attempts `?event=` p99 0.65 → 1.2 ms,
/// `?subscription=&limit=100` 1.7 → 2.1 ms (BENCHMARKS.md, "Delivery history"). fjall slows
/// writers at 20 level-0 tables and halts them at 30: only the indexer, which yields anyway.
/// fjall keeps a keyspace's options from its creation, so a day created by an older version
/// keeps the older ones.
const L0_TABLES: u8 = 16;
/// See [`L0_TABLES`].
const TABLE_BYTES: u64 = 32 << 20;

/// Memtable bytes (active and sealed, every day) beyond which indexing waits for the store's
/// flush worker: one full memtable being flushed while the next fills. That worker yields to
/// delivery like the indexer, and fjall holds writers back only once four memtables are sealed
/// — and it seals a full memtable on that same worker, between compactions. While a 10 M
/// backlog drained, the worker sat in compactions and the active memtable grew to over 6 GiB
/// (RSS 6.8 GiB). Waiting on the queued flushes alone (before) never saw it: nothing was sealed.
const WRITE_BUFFER_BYTES: u64 = 2 * MEMTABLE_BYTES;

/// How often indexing writes the store's journal out to disk. fjall hands its journal to the
/// OS at every write and syncs it whole only when a full memtable is sealed: a memtable's worth
/// of dirty pages written back at once, in `fsync`s of 115–220 ms (`perf trace --duration 10`
/// at 1,300 single events/s), and the log's group-commit `fdatasync`s — on which every
/// accepted event and committed offset waits — queued behind that writeback. Written out this
/// often, each sync is a fraction of a MiB: BENCHMARKS.md, "Latency at half load". The tables
/// fjall writes in flushes and merges are still synced whole (up to 854 ms in that trace). It
/// also bounds what a crash makes the index read again.
const SYNC_EVERY: Duration = Duration::from_millis(200);

/// A day's keyspace: written once, read now and then, so every level is LZ4-compressed (records
/// shrink about twofold). The CPU this takes is mostly spare: the index's threads are in the
/// idle class. Not free, though: at a fixed load on two cores shared with other work they
/// still lengthened delivery's run-queue waits (LZ4 about a sixth of their CPU; BENCHMARKS.md,
/// "Latency at half load", twenty-ninth session).
///
/// Index and filter blocks are partitioned at every level (fjall's default does so from L3 on).
/// A table written with one whole index block keeps every data block's last key until the
/// table is finished, and in a compaction those keys are slices of the decompressed blocks it
/// read, so each key holds its whole source block: `heaptrack` during a 600 k backlog drain put
/// 26 MiB of the peak heap there, and 8 MiB in the whole filter's key hashes. Partitions are
/// written out as they fill. A query reads one more (small) block per table.
fn day_options() -> KeyspaceCreateOptions {
    use fjall::config::{CompressionPolicy, PartitioningPolicy};
    KeyspaceCreateOptions::default()
        .data_block_compression_policy(CompressionPolicy::all(fjall::CompressionType::Lz4))
        .index_block_partitioning_policy(PartitioningPolicy::all(true))
        .filter_block_partitioning_policy(PartitioningPolicy::all(true))
        .max_memtable_size(MEMTABLE_BYTES)
        .compaction_strategy(std::sync::Arc::new(
            fjall::compaction::Leveled::default().with_l0_threshold(L0_TABLES).with_table_target_size(TABLE_BYTES),
        ))
}

/// One atomic write of [`Index::apply`]: these records of the topic, about `members` history
/// records, and the offset to note after them.
#[derive(Debug, PartialEq)]
struct Run {
    records: std::ops::Range<usize>,
    members: usize,
    next: u64,
}

/// `records` split into runs of at most [`APPLY_BATCH`] history records; a record of the topic
/// is never split, and one holding more than that is a run of its own. The last run notes
/// `next` (reading may go on past records it skipped); the others the offset after their last
/// record. Always at least one run, so `next` is noted even with nothing to index.
fn runs(records: &[LogRecord], next: u64) -> Vec<Run> {
    let mut runs = Vec::new();
    let (mut start, mut members) = (0, 0);
    for (i, rec) in records.iter().enumerate() {
        let these = record::members(&rec.value).at_most();
        if members > 0 && members + these > APPLY_BATCH {
            runs.push(Run { records: start..i, members, next: rec.offset });
            (start, members) = (i, 0);
        }
        members += these;
    }
    runs.push(Run { records: start..records.len(), members, next });
    runs
}

/// What a visit tells a scan.
enum Flow {
    Go,
    /// Stop here; a next page goes on after this entry.
    Stop,
    /// Stop: nothing further can match (no next page).
    End,
}

/// Versions a retry reads looking for a delivery since its generation began: the failures that
/// overtake one are the few sent before the index had it, and a chain never delivered (an
/// outage's) read all of its own at every retry — thousands for its last. Past them, the retry
/// is sent (a duplicate at worst).
const OVERTAKING_READ: usize = 16;

/// Whether a retry's delivery was delivered since its generation began ([`Index::delivered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Not delivered since (or not known to be): the retry is made.
    No,
    /// Delivered, and that is its newest state.
    Newest,
    /// Delivered, then overtaken on record by an earlier chain's failure: its state reads
    /// wrong (`retrying`, and then its retries' dead letter) until it is set right.
    Overtaken,
}

impl Index {
    /// Opens (creating if needed) the index in `dir`, keeping `retention` of history.
    pub fn open(dir: &Path, retention: Duration) -> Result<Index, IndexError> {
        Self::open_bounded(dir, retention, WRITE_BUFFER_BYTES)
    }

    /// [`Index::open`] with indexing waiting beyond `write_buffer` memtable bytes.
    fn open_bounded(dir: &Path, retention: Duration, write_buffer: u64) -> Result<Index, IndexError> {
        crate::log::private::create_dir(dir)?;
        // One background worker: flushes and compactions of derived data need not take a
        // core from delivery.
        let db = Database::builder(dir).worker_threads(1).open()?;
        Self::yield_to_delivery();
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let mut days = BTreeMap::new();
        for name in db.list_keyspace_names() {
            if let Some(day) = keys::day_of_name(&name) {
                days.insert(day, db.keyspace(&name, day_options)?);
            }
        }
        // What a killed process left in the OS's buffers is on disk before anything counts on
        // it: the offsets read now are where the topic's retention may reclaim up to.
        db.persist(fjall::PersistMode::SyncData)?;
        let synced = std::sync::Mutex::new(std::time::Instant::now());
        let progress = tokio::sync::watch::Sender::new(0);
        Ok(Index {
            db,
            meta,
            days: RwLock::new(days),
            retention,
            write_buffer,
            synced,
            sync_every: SYNC_EVERY,
            durable: Default::default(),
            progress,
            #[cfg(test)]
            attempt_reads: Default::default(),
            #[cfg(test)]
            version_reads: Default::default(),
        })
    }

    /// Lowers the CPU priority of the store's own background threads (flushes, compactions)
    /// like the indexing thread's ([`background_priority`]): derived data waits while
    /// deliveries need the cores.
    pub fn yield_to_delivery() {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else { return };
        for task in tasks.flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            let tid = task.file_name().to_str().and_then(|t| t.parse::<i32>().ok());
            if let (true, Some(tid)) = (comm.starts_with("fjall"), tid) {
                background_priority(tid);
            }
        }
    }

    /// The first day still kept at `now_ms`.
    fn first_kept_day(&self, now_ms: i64) -> u32 {
        let retention = i64::try_from(self.retention.as_millis()).unwrap_or(i64::MAX);
        keys::day(now_ms.saturating_sub(retention))
    }

    /// Day `day`'s keyspace, created on first use; `None` for a day already past retention.
    fn day(&self, day: u32, now_ms: i64) -> Result<Option<Keyspace>, IndexError> {
        if let Some(ks) = self.days.read().unwrap().get(&day) {
            return Ok(Some(ks.clone()));
        }
        if day < self.first_kept_day(now_ms) {
            return Ok(None);
        }
        let mut days = self.days.write().unwrap();
        if let Some(ks) = days.get(&day) {
            return Ok(Some(ks.clone()));
        }
        let ks = self.db.keyspace(&keys::day_name(day), day_options)?;
        days.insert(day, ks.clone());
        Ok(Some(ks))
    }

    /// A kept day's keyspace, if there is one.
    fn kept(&self, day: u32) -> Option<Keyspace> {
        self.days.read().unwrap().get(&day).cloned()
    }

    /// The days kept, newest first, within `[from, to]` (none when `to` is before `from`: a
    /// cursor from past the window's start).
    fn days_newest_first(&self, from: u32, to: u32) -> Vec<(u32, Keyspace)> {
        if to < from {
            return Vec::new();
        }
        self.days.read().unwrap().range(from..=to).rev().map(|(d, ks)| (*d, ks.clone())).collect()
    }

    fn offset_key(partition: u32) -> Vec<u8> {
        format!("offset/{partition}").into_bytes()
    }

    /// Whether the memtables hold more than [`WRITE_BUFFER_BYTES`], so more indexing should
    /// wait (the index falls behind, `herald_history_lag`, and catches up). If none of them is
    /// sealed — fjall's worker has not got round to sealing the full one — the days' active
    /// memtables are sealed here, which queues their flush; so the wait always ends, and a
    /// past day's memtable that will never fill does not hold it up either.
    pub fn flush_backlog(&self) -> bool {
        // `write_buffer_size` and `rotate_memtable` are marked experimental in fjall 3.1
        // (pinned in Cargo.lock); they are the only measure and the only lever.
        if self.db.write_buffer_size() < self.write_buffer {
            return false;
        }
        let days: Vec<Keyspace> = self.days.read().unwrap().values().cloned().collect();
        if days.iter().any(|ks| ks.sealed_memtable_count() > 0) {
            return true; // being flushed; wait for it
        }
        let mut sealed = false;
        for ks in &days {
            match ks.rotate_memtable() {
                Ok(rotated) => sealed |= rotated,
                Err(e) => tracing::warn!(error = %e, "sealing a history memtable failed"),
            }
        }
        // Nothing to seal means the bytes are not the days' (the store's own bookkeeping), or a
        // flush that has just finished is taking them off the count: waiting might not end.
        sealed
    }

    /// Records of the history topic not indexed yet, given the ends of its partitions
    /// (partition, end offset): what `herald_history_lag` shows and a waiter waits out.
    pub fn behind(&self, ends: &[(u32, u64)]) -> u64 {
        ends.iter().map(|&(p, end)| end.saturating_sub(self.offset(p))).sum()
    }

    /// The offset of `partition` of the history topic read so far.
    pub fn offset(&self, partition: u32) -> u64 {
        match self.meta.get(Self::offset_key(partition)) {
            Ok(Some(v)) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            _ => 0,
        }
    }

    /// Indexes `records` of `partition` and notes that reading continues at `next`, atomically
    /// with what it indexed: in [`runs`] of history records (a record of the topic may be a
    /// bundle of them), each written with the offset after its last record of the topic.
    /// Returns how many history records were indexed. Only blind writes, three keys an
    /// attempt: an attempt is stored as its record (its view is made when a query returns it),
    /// and a delivery's states are kept side by side as versions (the newest is read), so
    /// indexing never reads the store.
    pub fn apply(&self, partition: u32, records: &[LogRecord], next: u64, now_ms: i64) -> Result<usize, IndexError> {
        // Before this process's first write of the partition, its offset is the one the open
        // found, on disk since.
        self.durable.lock().unwrap().entry(partition).or_insert_with(|| self.offset(partition));
        let mut applied = 0;
        for run in runs(records, next) {
            // Sized up front (at most three entries a record, and the offset): growing it
            // faulted in fresh pages on every batch. Written to the OS like `Database::batch`.
            let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), run.members * 3 + 1)
                .durability(Some(fjall::PersistMode::Buffer));
            let mut in_run = 0;
            for rec in &records[run.records] {
                for value in record::members(&rec.value) {
                    let Some(record) = HistoryRecord::decode(value) else {
                        tracing::warn!(
                            partition,
                            offset = rec.offset,
                            "a history record this version cannot read; skipped"
                        );
                        continue;
                    };
                    in_run += 1;
                    self.index_one(&mut batch, record, value, now_ms)?;
                }
            }
            batch.insert(&self.meta, Self::offset_key(partition), run.next.to_be_bytes());
            batch.commit()?;
            metrics::counter!(crate::metrics::HISTORY_RECORDS).increment(in_run as u64);
            applied += in_run;
            self.progress.send_modify(|n| *n += 1);
        }
        self.sync_if_due()?;
        Ok(applied)
    }

    /// Changes after every write of the index: to wait for its offsets to move.
    pub fn progress(&self) -> tokio::sync::watch::Receiver<u64> {
        self.progress.subscribe()
    }

    /// Writes the store's journal out if [`SYNC_EVERY`] has passed since it last was: after
    /// each batch indexed, and now and then while indexing is idle, so that what the last
    /// batches indexed reaches the disk too.
    pub fn sync_if_due(&self) -> Result<(), IndexError> {
        if self.synced.lock().unwrap().elapsed() >= self.sync_every {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes the store's journal out now: everything indexed so far is on disk.
    pub fn sync(&self) -> Result<(), IndexError> {
        let mut synced = self.synced.lock().unwrap();
        // Read before the journal is written out, so what it says is in what is written.
        let partitions: Vec<u32> = self.durable.lock().unwrap().keys().copied().collect();
        let written: Vec<(u32, u64)> = partitions.into_iter().map(|p| (p, self.offset(p))).collect();
        self.db.persist(fjall::PersistMode::SyncData)?;
        self.durable.lock().unwrap().extend(written);
        *synced = std::time::Instant::now();
        Ok(())
    }

    /// The next offset of `partition` to index as the index on disk has it: up to there the
    /// topic's records may go with its retention (`Log::read_up_to`). The offset as written
    /// ([`Index::offset`]) runs ahead of it by up to [`SYNC_EVERY`]; reported as the read
    /// position, a power cut after the topic's reclaim lost those records from both.
    pub fn durable_offset(&self, partition: u32) -> u64 {
        let durable = self.durable.lock().unwrap().get(&partition).copied();
        durable.unwrap_or_else(|| self.offset(partition))
    }

    /// Tests: the journal is written out only by [`Index::sync`].
    #[cfg(test)]
    pub(crate) fn unsynced(mut self) -> Self {
        self.sync_every = Duration::MAX;
        self
    }

    /// Adds one history record's entries to `batch`; `value` is its bytes, stored as they are.
    fn index_one(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        record: HistoryRecord,
        value: &[u8],
        now_ms: i64,
    ) -> Result<(), IndexError> {
        match record {
            HistoryRecord::Event(e) => {
                let Some(ks) = self.day(keys::day(e.accepted_ms), now_ms)? else { return Ok(()) };
                batch.insert(&ks, Key::new(keys::EVENT).id(&e.tenant).id(&e.id).done(), value);
                let listed = Key::new(keys::EVENTS).id(&e.tenant).newest_first(e.accepted_ms).id(&e.id).done();
                batch.insert(&ks, listed, listing(&e.id, &e.event_type));
            }
            HistoryRecord::Attempt(a) => {
                if let Some(ks) = self.day(keys::day(a.at_ms), now_ms)? {
                    let key = Key::new(keys::ATTEMPT).id(&a.tenant).newest_first(a.at_ms).id(&a.id).done();
                    batch.insert(&ks, key, value);
                    let key =
                        Key::new(keys::BY_SUBSCRIPTION).id(&a.subscription).newest_first(a.at_ms).id(&a.id).done();
                    batch.insert(&ks, key, keys::hash(&a.tenant).to_be_bytes());
                }
                let state = DeliveryState {
                    state: a.state,
                    at_ms: a.at_ms,
                    attempt: a.attempt.max(1),
                    next_ms: a.next_ms,
                    tenant: a.tenant,
                    event: a.event_id,
                    attempt_id: Some(a.id),
                };
                self.put_state(batch, &a.subscription, a.accepted_ms, &state, now_ms)?;
            }
            HistoryRecord::State(s) => {
                let state = DeliveryState {
                    state: s.state,
                    at_ms: s.at_ms,
                    attempt: 0,
                    next_ms: None,
                    tenant: s.tenant,
                    event: s.event_id,
                    attempt_id: None,
                };
                self.put_state(batch, &s.subscription, s.accepted_ms, &state, now_ms)?;
            }
        }
        Ok(())
    }

    /// Writes one version of a delivery's state, in the day its event was accepted.
    fn put_state(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        subscription: &str,
        accepted_ms: i64,
        state: &DeliveryState,
        now_ms: i64,
    ) -> Result<(), IndexError> {
        let Some(ks) = self.day(keys::day(accepted_ms), now_ms)? else { return Ok(()) };
        let key = Key::new(keys::STATE)
            .id(subscription)
            .time(accepted_ms)
            .id(&state.event)
            .time(state.at_ms)
            .number(state.attempt)
            // Two resends' attempts of one number in one millisecond are two versions, not one
            // (keys written before this end at the number, and read the same).
            .id(state.attempt_id.as_deref().unwrap_or_default())
            .done();
        batch.insert(&ks, key, state.encode());
        Ok(())
    }

    /// Visits the versions of one delivery's state, newest first (from those made at
    /// `up_to_ms`, if given), until `visit` stops. Not collected, and each caller bounds how
    /// many it reads: a tenant's resends and retries can give one delivery hundreds of
    /// thousands.
    fn each_version(
        &self,
        subscription: &str,
        event: &EventRecord,
        up_to_ms: Option<i64>,
        visit: impl FnMut(DeliveryState) -> Flow,
    ) -> Result<(), IndexError> {
        self.versions(subscription, &event.tenant, &event.id, event.accepted_ms, up_to_ms, visit)
    }

    /// [`Index::each_version`] of the delivery to `subscription` of `tenant`'s event `id`,
    /// accepted at `accepted_ms`.
    fn versions(
        &self,
        subscription: &str,
        tenant: &str,
        id: &str,
        accepted_ms: i64,
        up_to_ms: Option<i64>,
        mut visit: impl FnMut(DeliveryState) -> Flow,
    ) -> Result<(), IndexError> {
        let Some(ks) = self.kept(keys::day(accepted_ms)) else { return Ok(()) };
        let key = || Key::new(keys::STATE).id(subscription).time(accepted_ms).id(id);
        let prefix = key().done();
        // Versions are keyed by the time they were made: those after `up_to_ms` are not read.
        let end = match up_to_ms {
            Some(up_to) if up_to < i64::MAX => key().time(up_to.saturating_add(1)).done(),
            _ => after_prefix(&prefix).expect("a key starts with its kind's letter, below 0xFF"),
        };
        for item in ks.range(prefix.clone()..end).rev() {
            #[cfg(test)]
            self.version_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (_, value) = item.into_inner()?;
            let Some(v) = DeliveryState::decode(&value) else { continue };
            if v.event == id && v.tenant == tenant && matches!(visit(v), Flow::Stop) {
                break;
            }
        }
        Ok(())
    }

    /// Whether `delivery` has been delivered since its generation began (`budget_ms`: its
    /// acceptance, or the resend, recover or replay that made it): a state on record dated
    /// [`CLOCKS_APART_MS`] or more after it is `delivered` — by a later generation, or by this
    /// very attempt before a crash took its commit. An earlier generation's delivery does not
    /// count: a resend's retry read, while the index had not yet taken in the resend, the
    /// delivery before it, and was dropped. The times are two processes' clocks (the state's
    /// is the attempt's, the budget the resend's): within the allowance a delivery is taken
    /// for an earlier one, and the retry is sent (a duplicate at worst, not a loss). Versions
    /// are keyed by time and attempt, the order [`DeliveryState::newer_than`] goes by, and read
    /// newest first, back to the budget's start: not the newest alone — an earlier chain's
    /// retry that failed after the delivery (sent before the index had it) stood on top of it,
    /// and that chain's every later retry was sent, to its dead letter.
    pub fn delivered(&self, delivery: &crate::model::Delivery) -> Result<Since, IndexError> {
        let mut since_budget = Since::No;
        let (sub, tenant, event) = (&delivery.subscription, &delivery.tenant, &delivery.event_id);
        let since = delivery.budget_ms.saturating_add(CLOCKS_APART_MS);
        // What stands above a delivery: failures only (an earlier chain's, sent before the index
        // had the delivery), or a later generation begun since (its `pending`).
        let (mut newest, mut later_generation, mut read) = (true, false, 0);
        self.versions(sub, tenant, event, delivery.accepted_ms, None, |v| {
            read += 1;
            if v.at_ms < since || read > OVERTAKING_READ {
                return Flow::Stop;
            }
            if v.state == State::Delivered {
                since_budget = match newest || later_generation {
                    // Its state is a later generation's to make: superseded, nothing set right.
                    true => Since::Newest,
                    false => Since::Overtaken,
                };
                return Flow::Stop;
            }
            later_generation |= v.state == State::Pending;
            newest = false;
            Flow::Go
        })?;
        Ok(since_budget)
    }

    /// The attempt record `id` of `tenant`, made at `at_ms`.
    fn attempt_record(&self, tenant: &str, at_ms: i64, id: &str) -> Result<Option<AttemptRecord>, IndexError> {
        let Some(ks) = self.kept(keys::day(at_ms)) else { return Ok(None) };
        #[cfg(test)]
        self.attempt_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = Key::new(keys::ATTEMPT).id(tenant).newest_first(at_ms).id(id).done();
        Ok(match ks.get(key)?.and_then(|b| HistoryRecord::decode(&b)) {
            Some(HistoryRecord::Attempt(a)) if a.id == id && a.tenant == tenant => Some(a),
            _ => None,
        })
    }

    /// Deletes every day past retention; returns how many entries went with them.
    pub fn expire(&self, now_ms: i64) -> Result<u64, IndexError> {
        let first = self.first_kept_day(now_ms);
        let old: Vec<(u32, Keyspace)> = {
            let mut days = self.days.write().unwrap();
            let keep = days.split_off(&first);
            std::mem::replace(&mut *days, keep).into_iter().collect()
        };
        let mut entries = 0;
        for (day, ks) in old {
            entries += ks.approximate_len() as u64;
            tracing::info!(day = %keys::day_name(day), "history past retention deleted");
            self.db.delete_keyspace(ks)?;
        }
        Ok(entries)
    }

    /// Writes everything in memory out to the index's tables (a bulk load's last step, so the
    /// journal need not be replayed at the next start).
    pub fn flush(&self) -> Result<(), IndexError> {
        for ks in self.days.read().unwrap().values() {
            ks.rotate_memtable_and_wait()?;
        }
        self.meta.rotate_memtable_and_wait()?;
        Ok(())
    }

    /// Starts writing back the table each keyspace is writing now (its newest), without
    /// waiting: fjall writes a flush's or a merge's table (up to [`TABLE_BYTES`]) through the
    /// page cache and syncs it whole when it is finished — a burst of writeback like the one
    /// the log's checkpoints made (`log::embedded::journal::WRITE_BACK_EVERY`), which the
    /// log's group-commit syncs queue behind. Called every [`TABLE_WRITE_BACK_EVERY`] by the
    /// indexing thread; a table already clean costs a system call.
    pub fn write_back_tables(&self) {
        for path in self.newest_tables() {
            if let Ok(file) = std::fs::File::open(path) {
                crate::log::embedded::start_write_back(&file);
            }
        }
    }

    /// The newest table file of each keyspace (fjall numbers tables in the order it starts
    /// them, in `tables/<id>` under the keyspace's own folder).
    fn newest_tables(&self) -> Vec<std::path::PathBuf> {
        let folders: Vec<std::path::PathBuf> = std::iter::once(&self.meta)
            .chain(self.days.read().unwrap().values())
            .map(|ks| ks.path().join("tables"))
            .collect();
        let newest = |folder: std::path::PathBuf| {
            let tables = std::fs::read_dir(folder).ok()?;
            let numbered =
                tables.flatten().filter_map(|t| Some((t.file_name().to_str()?.parse::<u64>().ok()?, t.path())));
            numbered.max_by_key(|(id, _)| *id).map(|(_, path)| path)
        };
        folders.into_iter().filter_map(newest).collect()
    }

    /// Bytes the index takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Visits entries within `[start, end)` newest day first, from after `from` (a cursor),
    /// until `visit` stops or [`SCAN_LIMIT`] entries were seen; returns the cursor after the
    /// last entry visited if the scan did not reach the end.
    fn scan(
        &self,
        (start, end): (Vec<u8>, Option<Vec<u8>>),
        days: (u32, u32),
        from: Option<(u32, Vec<u8>)>,
        mut visit: impl FnMut(&Keyspace, &[u8], &[u8]) -> Flow,
    ) -> Result<Option<String>, IndexError> {
        let last_day = from.as_ref().map_or(days.1, |(d, _)| (*d).min(days.1));
        let mut seen = 0;
        if let Some((_, key)) = &from {
            // The last entry a page of this query visited lies within its range.
            if key.as_slice() < start.as_slice() || end.as_ref().is_some_and(|e| key >= e) {
                return Err(IndexError::Cursor);
            }
        }
        for (day, ks) in self.days_newest_first(days.0, last_day) {
            let lower = match &from {
                Some((d, key)) if *d == day => Bound::Excluded(key.clone()),
                _ => Bound::Included(start.clone()),
            };
            let upper = end.clone().map_or(Bound::Unbounded, Bound::Excluded);
            for item in ks.range::<Vec<u8>, _>((lower, upper)) {
                let (key, value) = item.into_inner()?;
                seen += 1;
                let flow = visit(&ks, &key, &value);
                if matches!(flow, Flow::End) {
                    return Ok(None);
                }
                if matches!(flow, Flow::Stop) || seen >= SCAN_LIMIT {
                    return Ok(Some(encode_cursor(day, &key)));
                }
            }
        }
        Ok(None)
    }

    /// The day range a time window covers.
    fn day_span(since: Option<i64>, until: Option<i64>) -> (u32, u32) {
        (since.map_or(0, keys::day), until.map_or(u32::MAX, keys::day))
    }

    /// Attempts, newest first.
    pub fn attempts(&self, q: &AttemptQuery) -> Result<Page, IndexError> {
        if let Some(event) = &q.event {
            return self.attempts_of_event(q, event);
        }
        let limit = q.limit.max(1);
        let from = q.cursor.as_deref().and_then(decode_cursor);
        let mut items: Vec<Box<RawValue>> = Vec::new();
        let (mut bytes, max_bytes) = (0, q.max_bytes.unwrap_or(usize::MAX));
        // The record at the `a` key, if it is one the query asks for.
        let wanted = |ks: &Keyspace, a_key: &[u8], stored: Option<&[u8]>| -> Option<Box<RawValue>> {
            let fetched;
            let stored = match stored {
                Some(s) => s,
                None => {
                    fetched = ks.get(a_key).ok().flatten()?;
                    &fetched
                }
            };
            let Some(HistoryRecord::Attempt(a)) = HistoryRecord::decode(stored) else { return None };
            let matches = a.tenant == q.tenant
                && q.subscription.as_ref().is_none_or(|s| *s == a.subscription)
                && q.outcome.as_ref().is_none_or(|o| *o == a.outcome);
            matches.then(|| serde_json::value::to_raw_value(&attempt_view(&a)).ok()).flatten()
        };
        let prefix = match &q.subscription {
            Some(sub) => Key::new(keys::BY_SUBSCRIPTION).id(sub).done(),
            None => Key::new(keys::ATTEMPT).id(&q.tenant).done(),
        };
        let by_subscription = q.subscription.is_some();
        // The caller's tenant as a subscription's entries carry it (their value, as indexed).
        let tenant_word = keys::hash(&q.tenant).to_be_bytes();
        let bounds = newest_first_bounds(&prefix, q.since_ms, q.until_ms);
        let span = Self::day_span(q.since_ms, q.until_ms);
        let next = self.scan(bounds, span, from, |ks, key, value| {
            let item = if by_subscription {
                if value != tenant_word.as_slice() {
                    // Another tenant's subscription (a subscription has one tenant): nothing
                    // here is the caller's, and a cursor would carry its attempts' times.
                    return Flow::End;
                }
                // `s | sub | -at | attempt` → the tenant's hash: the `a` key is its neighbour.
                let mut a_key = vec![keys::ATTEMPT];
                a_key.extend_from_slice(value);
                a_key.extend_from_slice(&key[prefix.len()..]);
                wanted(ks, &a_key, None)
            } else {
                wanted(ks, key, Some(value))
            };
            if let Some(item) = item {
                bytes += item.get().len();
                items.push(item);
            }
            if items.len() >= limit || bytes >= max_bytes {
                Flow::Stop
            } else {
                Flow::Go
            }
        })?;
        Ok(Page { items, next })
    }

    /// One event's attempts, newest first (by time, then id): found through its deliveries'
    /// state versions, each delivery's newest first. Only references to the newest `limit`
    /// are held while looking (a delivery stops being read once the rest of it is older than
    /// all of those), and only the page's attempt records are read — but for an `outcome`
    /// filter, which reads each candidate's, at most [`SCAN_LIMIT`] of them a request, shared
    /// among the deliveries: one that reaches its share stops there, and the page then ends at
    /// the newest place any delivery stopped, with a cursor to go on below it.
    /// The cursor is the last attempt's place, not a count: attempts made between two pages
    /// neither repeat nor push an attempt past the next page.
    fn attempts_of_event(&self, q: &AttemptQuery, event_id: &str) -> Result<Page, IndexError> {
        // Another list's cursor, or another event's, is refused rather than taken for a place.
        let below: Option<(i64, String)> = match q.cursor.as_deref().and_then(decode_cursor) {
            None => None,
            Some((u32::MAX, key)) if key.len() >= 16 && key[8..16] == event_cursor_tag(event_id) => {
                let at = i64::from_be_bytes(key[..8].try_into().expect("8 bytes"));
                Some((at, String::from_utf8(key[16..].to_vec()).map_err(|_| IndexError::Cursor)?))
            }
            Some(_) => return Err(IndexError::Cursor),
        };
        let Some(event) = self.event(&q.tenant, event_id)? else { return Ok(Page::default()) };
        let limit = q.limit.max(1);
        // One more than the page, to know whether there is a next.
        let keep = limit.saturating_add(1);
        let subs: Vec<&String> =
            event.subscriptions.iter().filter(|s| q.subscription.as_ref().is_none_or(|w| w == *s)).collect();
        let share = (SCAN_LIMIT / subs.len().max(1)).max(64);
        let mut newest: std::collections::BinaryHeap<std::cmp::Reverse<(i64, String)>> = Default::default();
        // The newest place a delivery stopped at its share (the last it looked at): everything
        // at or above it has been looked at in every delivery.
        let mut horizon: Option<(i64, String)> = None;
        let mut failed = None;
        // Versions above the page are not read: those after `until`, or above the cursor's
        // millisecond (those of that millisecond are, and passed over below).
        let up_to = match (q.until_ms, &below) {
            (Some(until), Some((at, _))) => Some(until.min(*at)),
            (until, below) => until.or(below.as_ref().map(|(at, _)| *at)),
        };
        for sub in subs {
            let (mut looked, mut last_looked) = (0usize, None::<(i64, String)>);
            self.each_version(sub, &event, up_to, |v| {
                looked += 1;
                if looked > share {
                    // Everything at or above the last one looked at has been.
                    if let Some(here) = last_looked.take() {
                        if horizon.as_ref().is_none_or(|h| here > *h) {
                            horizon = Some(here);
                        }
                    }
                    return Flow::Stop;
                }
                if q.until_ms.is_some_and(|u| v.at_ms > u) {
                    return Flow::Go;
                }
                if q.since_ms.is_some_and(|s| v.at_ms < s) {
                    // The rest of this delivery is older still.
                    return Flow::Stop;
                }
                // A version without an attempt (a resend queued) is a place too: a delivery
                // whose share ran out among such had none, and its attempts were never listed.
                let place = v.attempt_id.clone().unwrap_or_default();
                if below.as_ref().is_some_and(|(at, below_id)| (v.at_ms, &place) >= (*at, below_id)) {
                    return Flow::Go; // on an earlier page
                }
                last_looked = Some((v.at_ms, place));
                let Some(id) = v.attempt_id else { return Flow::Go };
                if let Some(std::cmp::Reverse(oldest)) = newest.peek().filter(|_| newest.len() >= keep) {
                    if (v.at_ms, &id) <= (oldest.0, &oldest.1) {
                        // Older than every one kept: so is the rest of this delivery, but for
                        // versions of the same millisecond (ordered by the ids' hashes).
                        return if v.at_ms < oldest.0 { Flow::Stop } else { Flow::Go };
                    }
                }
                if let Some(outcome) = &q.outcome {
                    match self.attempt_record(&event.tenant, v.at_ms, &id) {
                        Ok(Some(a)) if a.outcome == *outcome => {}
                        Ok(_) => return Flow::Go,
                        Err(e) => {
                            failed = Some(e);
                            return Flow::Stop;
                        }
                    }
                }
                newest.push(std::cmp::Reverse((v.at_ms, id)));
                if newest.len() > keep {
                    newest.pop();
                }
                Flow::Go
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
        }
        // Sorted as `Reverse`: newest first. Past the horizon a delivery was not looked at.
        let found: Vec<(i64, String)> = newest
            .into_sorted_vec()
            .into_iter()
            .map(|std::cmp::Reverse(x)| x)
            .filter(|x| horizon.as_ref().is_none_or(|h| x >= h))
            .collect();
        let mut items = Vec::with_capacity(limit.min(found.len()));
        let (mut bytes, mut cut) = (0, None);
        for (i, (at_ms, id)) in found.iter().take(limit).enumerate() {
            if let Some(a) = self.attempt_record(&event.tenant, *at_ms, id)? {
                if let Ok(item) = serde_json::value::to_raw_value(&attempt_view(&a)) {
                    bytes += item.get().len();
                    items.push(item);
                }
            }
            if bytes >= q.max_bytes.unwrap_or(usize::MAX) && i + 1 < found.len() {
                cut = Some(found[i].clone());
                break;
            }
        }
        let next_place = match (cut, found.len() > limit) {
            (Some(place), _) => Some(place),
            (None, true) => found.get(limit - 1).cloned(),
            (None, false) => horizon,
        };
        let next = next_place.map(|(at, id)| {
            let mut place = at.to_be_bytes().to_vec();
            place.extend_from_slice(&event_cursor_tag(event_id));
            place.extend_from_slice(id.as_bytes());
            encode_cursor(u32::MAX, &place)
        });
        Ok(Page { items, next })
    }

    /// The tenant's events, newest first: `{id, tenant, type, accepted_at}`.
    pub fn events(&self, q: &EventQuery) -> Result<Page, IndexError> {
        let limit = q.limit.max(1);
        let from = q.cursor.as_deref().and_then(decode_cursor);
        let prefix = Key::new(keys::EVENTS).id(&q.tenant).done();
        let bounds = newest_first_bounds(&prefix, q.since_ms, q.until_ms);
        let mut items = Vec::new();
        let next = self.scan(bounds, Self::day_span(q.since_ms, q.until_ms), from, |_, key, value| {
            let Some((id, event_type)) = read_listing(value) else { return Flow::Go };
            if q.event_type.as_ref().is_some_and(|t| *t != event_type) {
                return Flow::Go;
            }
            let at = keys::read_word(key, prefix.len()).map(|inv| (u64::MAX - inv) as i64).unwrap_or(0);
            let item =
                serde_json::json!({ "id": id, "tenant": q.tenant, "type": event_type, "accepted_at": rfc3339_ms(at) });
            items.push(serde_json::value::to_raw_value(&item).expect("items serialize"));
            if items.len() >= limit {
                Flow::Stop
            } else {
                Flow::Go
            }
        })?;
        Ok(Page { items, next })
    }

    /// The event `id` of `tenant`, as recorded when it was accepted.
    pub fn event(&self, tenant: &str, id: &str) -> Result<Option<EventRecord>, IndexError> {
        let key = Key::new(keys::EVENT).id(tenant).id(id).done();
        for (_, ks) in self.days_newest_first(0, u32::MAX) {
            if let Some(v) = ks.get(&key)? {
                if let Some(HistoryRecord::Event(e)) = HistoryRecord::decode(&v) {
                    if e.tenant == tenant && e.id == id {
                        return Ok(Some(e));
                    }
                }
            }
        }
        Ok(None)
    }

    /// Each delivery of an event: its state, attempts, and when the last and next are. Of
    /// each delivery's newest versions, at most [`SCAN_LIMIT`] over the event's deliveries
    /// (at least 100 each) are read: past that its attempts are counted no further.
    pub fn deliveries(&self, event: &EventRecord) -> Result<Vec<DeliveryView>, IndexError> {
        let mut views = Vec::with_capacity(event.subscriptions.len());
        let share = (SCAN_LIMIT / event.subscriptions.len().max(1)).max(100);
        for sub in &event.subscriptions {
            let (mut newest, mut attempts, mut last_attempt_ms) = (None::<DeliveryState>, 0u32, None::<i64>);
            let mut looked = 0;
            self.each_version(sub, event, None, |v| {
                if v.attempt_id.is_some() {
                    attempts = attempts.saturating_add(1);
                    last_attempt_ms = last_attempt_ms.max(Some(v.at_ms));
                }
                if newest.as_ref().is_none_or(|n| v.newer_than(n)) {
                    newest = Some(v);
                }
                looked += 1;
                if looked >= share {
                    Flow::Stop
                } else {
                    Flow::Go
                }
            })?;
            views.push(DeliveryView {
                subscription: sub.clone(),
                state: newest.as_ref().map_or(State::Pending, |s| s.state).as_str(),
                attempts,
                last_attempt_at: last_attempt_ms.map(rfc3339_ms),
                next_attempt_at: newest.filter(|s| s.state == State::Retrying).and_then(|s| s.next_ms).map(rfc3339_ms),
            });
        }
        Ok(views)
    }

    /// Events of `subscription` accepted within `[since, until]` whose delivery is dead-lettered
    /// or retrying (or every one that was attempted, with `all`), oldest first: `(tenant,
    /// event)`, and where to go on when it stopped early. It stops only between milliseconds
    /// (a request's events share one, so stopping inside it left the rest behind for good), once
    /// it has `max` or has looked at [`RECOVER_SCAN`] states — so a window of millions of
    /// delivered events costs one call a bounded amount, and may find none and say where to go
    /// on. `max` is passed by the events of the millisecond it stops in.
    pub fn recoverable(
        &self,
        subscription: &str,
        since_ms: i64,
        until_ms: i64,
        all: bool,
        max: usize,
    ) -> Result<Recoverable, IndexError> {
        let prefix = Key::new(keys::STATE).id(subscription).done();
        let start = Key::new(keys::STATE).id(subscription).time(since_ms).done();
        let end = Key::new(keys::STATE).id(subscription).time(until_ms.saturating_add(1)).done();
        let days: Vec<Keyspace> = self
            .days
            .read()
            .unwrap()
            .range(keys::day(since_ms)..=keys::day(until_ms).max(keys::day(since_ms)))
            .map(|(_, k)| k.clone())
            .collect();
        let mut found = Vec::new();
        let mut seen = 0;
        // Versions of one delivery are neighbours (same accepted time and event), oldest first:
        // the delivery's key, when it was accepted, and its newest version.
        let mut current: Option<(Vec<u8>, i64, DeliveryState)> = None;
        let take = |(_, _, newest): (Vec<u8>, i64, DeliveryState), found: &mut Vec<(String, String)>| {
            // A rewind takes what was attempted, delivered or not: not what was dropped (never
            // to be sent: a publish refused after its event was recorded) nor what is pending
            // (its own attempt to come).
            let rewound = all && !matches!(newest.state, State::Dropped | State::Pending);
            if rewound || matches!(newest.state, State::DeadLettered | State::Retrying) {
                found.push((newest.tenant, newest.event));
            }
        };
        for ks in days {
            let mut from = start.clone();
            // Read on from `from`; a delivery with many versions is left for its newest.
            'read: loop {
                let mut run = 0usize;
                for item in ks.range(from.clone()..end.clone()) {
                    #[cfg(test)]
                    self.version_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let (key, value) = item.into_inner()?;
                    seen += 1;
                    let delivery = key[..prefix.len() + 16].to_vec();
                    let accepted = keys::read_word(&key, prefix.len()).unwrap_or(0) as i64;
                    let Some(state) = DeliveryState::decode(&value) else { continue };
                    match &mut current {
                        Some((d, _, newest)) if *d == delivery => {
                            if state.newer_than(newest) {
                                *newest = state;
                            }
                            run += 1;
                            if run >= VERSIONS_READ_IN_TURN {
                                // Its newest version is its last: read that, and go on after it.
                                if let Some(last) = ks.prefix(&delivery).next_back() {
                                    let (_, value) = last.into_inner()?;
                                    if let Some(last) = DeliveryState::decode(&value) {
                                        if last.newer_than(newest) {
                                            *newest = last;
                                        }
                                    }
                                }
                                match after_prefix(&delivery) {
                                    Some(after) => from = after,
                                    None => break 'read,
                                }
                                continue 'read;
                            }
                        }
                        _ => {
                            run = 0;
                            let new_millisecond = current.as_ref().is_some_and(|(_, at, _)| *at != accepted);
                            if let Some(done) = current.replace((delivery, accepted, state)) {
                                take(done, &mut found);
                            }
                            if new_millisecond && (found.len() >= max || seen >= RECOVER_SCAN) {
                                return Ok(Recoverable { events: found, continue_from_ms: Some(accepted) });
                            }
                        }
                    }
                }
                break;
            }
        }
        if let Some(done) = current {
            take(done, &mut found);
        }
        Ok(Recoverable { events: found, continue_from_ms: None })
    }
}

/// How far apart two processes' clocks are allowed for when a delivery is judged to be since a
/// retry's generation began ([`Index::delivered`]): a delivery stamped by a clock this far
/// ahead of the resending one is still taken for an earlier one.
pub const CLOCKS_APART_MS: i64 = 2_000;

/// How often the indexing thread starts the writeback of the tables being written
/// ([`Index::write_back_tables`]): a merge writes some tens of MiB a second here, so each
/// writeback is a MiB or two. Without it, at 2,000 events/s with history on, every run had a
/// second or three of 13–65 ms p99 near 22 and 44 s, when fjall finished a table (~32 MiB
/// dirty at once); with it, none in four pairs (BENCHMARKS.md, "Latency at half load",
/// thirtieth and thirty-first sessions).
pub const TABLE_WRITE_BACK_EVERY: Duration = Duration::from_millis(50);

/// Puts thread `tid` (0: the calling one) in the idle scheduling class, which runs only on a
/// core nothing else wants: the history index is derived data, and a delivery woken on a
/// core it holds must not wait for it. A nice value of 19 was not enough: a woken worker still
/// waited out the niced thread's slice (end-to-end p99 at a steady 1,300 single events/s:
/// 21–28 ms niced, 17 ms idle, 13 ms with history off). Threads it starts inherit the class.
/// Falls back to nice 19 where the idle class is refused, and off Linux.
pub(crate) fn background_priority(tid: i32) {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `param` is a valid sched_param for the call's duration; an unknown tid only
        // makes the call fail.
        if unsafe { libc::sched_setscheduler(tid, libc::SCHED_IDLE, &param) } == 0 {
            return;
        }
    }
    if let Err(e) = rustix::process::setpriority_process(rustix::process::Pid::from_raw(tid), 19) {
        tracing::debug!(tid, error = %e, "could not lower a history thread's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::AttemptRecord;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_history_thread_runs_in_the_idle_class_and_what_it_starts_inherits_it() {
        let policies = std::thread::spawn(|| {
            background_priority(0);
            // SAFETY: querying the calling thread's policy has no preconditions.
            let own = unsafe { libc::sched_getscheduler(0) };
            let child = std::thread::spawn(|| unsafe { libc::sched_getscheduler(0) }).join().unwrap();
            (own, child)
        })
        .join()
        .unwrap();
        assert_eq!(policies, (libc::SCHED_IDLE, libc::SCHED_IDLE));
        // SAFETY: as above.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_IDLE, "only that thread yields");
    }

    fn attempt(id: &str, at_ms: i64) -> LogRecord {
        attempt_with(id, at_ms, |_| {})
    }

    /// [`attempt`], changed by `change` before it is encoded.
    fn attempt_with(id: &str, at_ms: i64, change: impl FnOnce(&mut AttemptRecord)) -> LogRecord {
        let mut a = AttemptRecord {
            id: id.into(),
            event_id: format!("evt-{id}"),
            subscription: "sub".into(),
            tenant: "t".into(),
            event_type: "T".into(),
            attempt: 1,
            accepted_ms: at_ms,
            at_ms,
            duration_ms: 3,
            outcome: "delivered".into(),
            status: Some(200),
            error: None,
            response: None,
            state: State::Delivered,
            next_ms: None,
            ordering_key: None,
        };
        change(&mut a);
        let value = HistoryRecord::Attempt(a).encode();
        LogRecord { partition: 0, offset: 0, key: bytes::Bytes::new(), value, timestamp_ms: at_ms }
    }

    /// Event `e`'s first attempt to `s1`, accepted at `accepted`.
    fn first_attempt_of_e(accepted: i64) -> crate::model::Delivery {
        crate::model::Delivery::first_attempt(
            "e".into(),
            "s1".into(),
            "t".into(),
            "T".into(),
            bytes::Bytes::new(),
            accepted,
        )
    }

    /// A state record of `event` (tenant `t`) to `subscription`, accepted at `accepted`, made
    /// at `at_ms`.
    fn state_at(event: &str, subscription: &str, accepted: i64, at_ms: i64, state: State) -> LogRecord {
        let s = crate::history::record::StateRecord {
            event_id: event.into(),
            subscription: subscription.into(),
            tenant: "t".into(),
            accepted_ms: accepted,
            at_ms,
            state,
            error: None,
        };
        LogRecord { value: HistoryRecord::State(s).encode(), ..attempt("x", accepted) }
    }

    /// The record of event `e` of tenant `t`, accepted at `accepted` for `subscriptions`.
    fn event_e(accepted: i64, subscriptions: &[&str]) -> LogRecord {
        let event = HistoryRecord::Event(EventRecord {
            id: "e".into(),
            tenant: "t".into(),
            event_type: "T".into(),
            accepted_ms: accepted,
            subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
            data: bytes::Bytes::from_static(b"{}"),
            changes: None,
            ordering_key: None,
            seq: 0,
        });
        LogRecord { value: event.encode(), ..attempt("x", accepted) }
    }

    fn all(index: &Index) -> Vec<String> {
        let q = AttemptQuery { tenant: "t".into(), limit: 100, ..AttemptQuery::default() };
        index
            .attempts(&q)
            .unwrap()
            .items
            .iter()
            .map(|i| serde_json::from_str::<serde_json::Value>(i.get()).unwrap()["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// A retry is left only for a delivery made since its generation began: a resend's retry
    /// that finds, while the index has not yet taken in the resend, the delivery before it
    /// (the event was delivered, then sent again on purpose) is still made.
    #[test]
    fn a_delivery_counts_against_a_retry_only_if_made_since_its_generation_began() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let delivered = attempt_with("d", accepted + 10, |a| {
            (a.event_id, a.subscription, a.accepted_ms) = ("e".into(), "s1".into(), accepted);
        });
        let records = vec![event_e(accepted, &["s1"]), delivered];
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let first = first_attempt_of_e(accepted);
        let retry = |budget_ms: i64| crate::model::Delivery { attempt: 2, due_ms: now, budget_ms, ..first.clone() };
        let at = accepted + 10; // the delivery's time
        let apart = CLOCKS_APART_MS;
        let delivered = |d: &crate::model::Delivery| index.delivered(d).unwrap() != Since::No;
        assert!(delivered(&retry(at - apart)), "an earlier chain's retry, delivered since by another");
        assert!(!delivered(&retry(at + 50)), "a resend's retry: that delivery was before it");
        assert!(!delivered(&retry(at - apart + 1)), "within the clocks' allowance: taken for before it");
    }

    /// A later generation's delivery still counts once an earlier chain's failed retry (sent
    /// while the index had not taken the delivery in) is on record after it: only the newest
    /// version was read, so every later retry of that chain was sent, ran to its last attempt
    /// and was dead-lettered, and the delivered event read `dead_lettered`. The retry is told
    /// its delivery was overtaken, so its state can be set right.
    #[test]
    fn a_delivery_overtaken_by_an_earlier_chain_s_failure_still_supersedes_its_retries() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let resent = accepted + 20_000;
        let delivered = attempt_with("d", resent + 3_000, |a| {
            (a.event_id, a.subscription, a.accepted_ms) = ("e".into(), "s1".into(), accepted);
        });
        let failed = attempt_with("f", resent + 4_000, |a| {
            (a.event_id, a.subscription, a.accepted_ms, a.attempt) = ("e".into(), "s1".into(), accepted, 3);
            (a.outcome, a.status, a.state, a.next_ms) = ("failed".into(), Some(500), State::Retrying, Some(now));
        });
        let records = vec![event_e(accepted, &["s1"]), delivered, failed];
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let first = first_attempt_of_e(accepted);
        let old_chain = crate::model::Delivery { attempt: 4, due_ms: now, ..first.clone() };
        assert_eq!(index.delivered(&old_chain).unwrap(), Since::Overtaken);
        let after_it = crate::model::Delivery { budget_ms: resent + 5_000, ..old_chain.clone() };
        assert_eq!(index.delivered(&after_it).unwrap(), Since::No, "nothing delivered since its budget began");
        // A later generation begun above the delivery (a rewind's `pending`, its attempt then
        // failed): the old chain is superseded, but the state is that generation's, not set
        // back to delivered (which its own retry then took for its delivery, and was never sent).
        let rewound = accepted + 40_000;
        let failed_again = attempt_with("g", rewound + 1_000, |a| {
            (a.event_id, a.subscription, a.accepted_ms) = ("e".into(), "s1".into(), accepted);
            (a.outcome, a.status, a.state, a.next_ms) = ("failed".into(), Some(500), State::Retrying, Some(now));
        });
        let records = vec![state_at("e", "s1", accepted, rewound, State::Pending), failed_again];
        index.apply(0, &records, 10, now).unwrap();
        assert_eq!(index.delivered(&old_chain).unwrap(), Since::Newest);
        let rewind_s = crate::model::Delivery { budget_ms: rewound, ..old_chain.clone() };
        assert_eq!(index.delivered(&rewind_s).unwrap(), Since::No, "the rewind's retry is sent");
        // A chain never delivered reads a bounded number of its versions at each retry.
        let mut records = Vec::new();
        for i in 0..180 {
            records.push(attempt_with(&format!("n{i:03}"), accepted + 1 + i, |a| {
                (a.event_id, a.subscription, a.accepted_ms, a.attempt) =
                    ("n".into(), "s1".into(), accepted, 1 + i as u32);
                (a.outcome, a.status, a.state) = ("failed".into(), Some(500), State::Retrying);
            }));
        }
        index.apply(0, &records, 400, now).unwrap();
        let never = crate::model::Delivery { event_id: "n".into(), attempt: 181, ..old_chain };
        let before = index.version_reads.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(index.delivered(&never).unwrap(), Since::No);
        let reads = index.version_reads.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert!(reads <= OVERTAKING_READ + 1, "{reads} versions read");
    }

    /// An event a tenant retried and resent into thousands of attempts: a page of them reads
    /// that page's attempt records, not every one (each up to a few KiB of response), and holds
    /// no more than the page's worth of references while it finds them.
    #[test]
    fn a_page_of_one_event_s_attempts_reads_only_that_page() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let subs = ["s1", "s2", "s3"];
        let mut records = vec![event_e(accepted, &subs)];
        for (n, sub) in subs.iter().enumerate() {
            for i in 0..300i64 {
                records.push(attempt_with(&format!("{sub}-{i}"), accepted + 1 + i * 3 + n as i64, |a| {
                    (a.event_id, a.subscription, a.accepted_ms, a.attempt) =
                        ("e".into(), sub.to_string(), accepted, i as u32 + 1);
                    (a.state, a.outcome) = (State::Retrying, "failed".into());
                }));
            }
        }
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let ids = |page: &Page| -> Vec<String> {
            page.items
                .iter()
                .map(|i| {
                    serde_json::from_str::<serde_json::Value>(i.get()).unwrap()["id"].as_str().unwrap().to_string()
                })
                .collect()
        };
        let q = AttemptQuery { tenant: "t".into(), event: Some("e".into()), limit: 4, ..AttemptQuery::default() };
        let before = index.attempt_reads.load(std::sync::atomic::Ordering::Relaxed);
        let first = index.attempts(&q).unwrap();
        let read = index.attempt_reads.load(std::sync::atomic::Ordering::Relaxed) - before;
        assert_eq!(ids(&first), ["s3-299", "s2-299", "s1-299", "s3-298"]);
        assert!(read <= 4, "a page of 4 read {read} attempt records");
        let second = index.attempts(&AttemptQuery { cursor: first.next.clone(), ..q.clone() }).unwrap();
        assert_eq!(ids(&second), ["s2-298", "s1-298", "s3-297", "s2-297"]);
        let filtered = AttemptQuery { since_ms: Some(accepted + 1 + 299 * 3), ..q.clone() };
        assert_eq!(ids(&index.attempts(&filtered).unwrap()), ["s3-299", "s2-299", "s1-299"]);
        // Bounded in bytes: a page ends past `max_bytes`, and the next goes on from there,
        // for one event's attempts and for the tenant's.
        for q in [q.clone(), AttemptQuery { event: None, ..q.clone() }] {
            let one = index.attempts(&AttemptQuery { max_bytes: Some(1), limit: 3, ..q.clone() }).unwrap();
            let whole = index.attempts(&AttemptQuery { limit: 3, ..q.clone() }).unwrap();
            assert_eq!(ids(&one), ids(&whole)[..1], "{q:?}");
            let on = index.attempts(&AttemptQuery { cursor: one.next.clone(), limit: 2, ..q.clone() }).unwrap();
            assert_eq!(ids(&on), ids(&whole)[1..], "{q:?}");
        }
    }

    /// An event of one subscription (`s`) with `n` failed attempts after one `timeout`, each a
    /// millisecond apart; the index and when it was applied.
    fn an_event_with_attempts(dir: &std::path::Path, n: i64) -> (Index, i64) {
        let index = Index::open(dir, Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let mut records = vec![event_e(accepted, &["s"])];
        for i in 0..=n {
            records.push(attempt_with(&format!("a{i:06}"), accepted + 1 + i, |a| {
                (a.event_id, a.subscription, a.accepted_ms, a.attempt) =
                    ("e".into(), "s".into(), accepted, i as u32 + 1);
                (a.state, a.outcome) = (State::Retrying, if i == 0 { "timeout" } else { "failed" }.into());
            }));
        }
        index.apply(0, &records, records.len() as u64, now).unwrap();
        (index, accepted)
    }

    fn ids_of(page: &Page) -> Vec<String> {
        page.items
            .iter()
            .map(|i| serde_json::from_str::<serde_json::Value>(i.get()).unwrap()["id"].as_str().unwrap().to_string())
            .collect()
    }

    /// A page of an event's attempts goes on from the last one shown: an attempt made between
    /// two pages neither repeats one nor pushes one past the next page (the cursor was a count).
    #[test]
    fn an_event_s_next_page_goes_on_from_its_last_attempt_whatever_came_since() {
        let dir = tempfile::tempdir().unwrap();
        let (index, accepted) = an_event_with_attempts(dir.path(), 5);
        let q = AttemptQuery { tenant: "t".into(), event: Some("e".into()), limit: 2, ..AttemptQuery::default() };
        let first = index.attempts(&q).unwrap();
        assert_eq!(ids_of(&first), ["a000005", "a000004"]);
        let late = attempt_with("a000006", accepted + 10, |a| {
            (a.event_id, a.subscription, a.accepted_ms, a.attempt) = ("e".into(), "s".into(), accepted, 7);
        });
        index.apply(0, &[late], 100, accepted + 100_000).unwrap();
        let second = index.attempts(&AttemptQuery { cursor: first.next.clone(), ..q.clone() }).unwrap();
        assert_eq!(ids_of(&second), ["a000003", "a000002"]);
    }

    /// An `outcome` filter that reaches its budget of attempt records ends the page with a
    /// cursor to go on from, not with `next: null` as if nothing more matched.
    #[test]
    fn an_outcome_filter_past_its_budget_says_where_to_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let (index, _) = an_event_with_attempts(dir.path(), SCAN_LIMIT as i64 + 10);
        let mut q = AttemptQuery {
            tenant: "t".into(),
            event: Some("e".into()),
            outcome: Some("timeout".into()),
            limit: 10,
            ..AttemptQuery::default()
        };
        let mut found = Vec::new();
        for _ in 0..5 {
            let page = index.attempts(&q).unwrap();
            found.extend(ids_of(&page));
            match page.next {
                Some(next) => q.cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(found, ["a000000"], "the timeout, found by following the cursor");
    }

    /// One delivery's state versions are read a bounded number a query however many a
    /// tenant's resends and retries gave it (hundreds of thousands, at its request rate): an
    /// event's state read them all; a page of its attempts below `until`, or below a cursor,
    /// read every newer one first (paging through them, their square); a recover read every
    /// one, stopping only between milliseconds, which one event's versions all share — each
    /// on the blocking threads every tenant's reads and the embedded log's share.
    #[test]
    fn one_delivery_s_many_versions_are_read_a_bounded_number_a_query() {
        use std::sync::atomic::Ordering::Relaxed;
        let dir = tempfile::tempdir().unwrap();
        let n = 2 * SCAN_LIMIT;
        let (index, accepted) = an_event_with_attempts(dir.path(), n as i64);
        let read = |f: &dyn Fn()| {
            let before = index.version_reads.load(Relaxed);
            f();
            index.version_reads.load(Relaxed) - before
        };
        let event = index.event("t", "e").unwrap().unwrap();
        let reads = read(&|| {
            let views = index.deliveries(&event).unwrap();
            assert_eq!((views[0].state, views[0].attempts), ("retrying", SCAN_LIMIT as u32), "counted up to the bound");
            assert_eq!(views[0].last_attempt_at, Some(rfc3339_ms(accepted + 1 + n as i64)));
        });
        assert!(reads <= SCAN_LIMIT + 1, "{reads} versions read for an event's state");
        let q = AttemptQuery {
            tenant: "t".into(),
            event: Some("e".into()),
            until_ms: Some(accepted + 10),
            limit: 5,
            ..AttemptQuery::default()
        };
        let reads = read(&|| {
            let page = index.attempts(&q).unwrap();
            assert_eq!(ids_of(&page), ["a000009", "a000008", "a000007", "a000006", "a000005"]);
            let next =
                index.attempts(&AttemptQuery { cursor: page.next.clone(), until_ms: None, ..q.clone() }).unwrap();
            assert_eq!(ids_of(&next), ["a000004", "a000003", "a000002", "a000001", "a000000"]);
        });
        assert!(reads <= 100, "{reads} versions read for two pages of the oldest attempts");
        let reads = read(&|| {
            let found = index.recoverable("s", accepted, accepted, false, 100).unwrap();
            assert_eq!(found.events, [("t".to_string(), "e".to_string())]);
        });
        assert!(reads <= 1000, "{reads} versions read to recover one event");
    }

    /// A rewind (`all`) sends again what was attempted, delivered or not: not a delivery
    /// `dropped` (never to be sent: a publish refused after its event was recorded, a deleted
    /// subscription's) nor one `pending` (its own attempt is still to come).
    #[test]
    fn a_rewind_sends_again_only_what_was_attempted() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let state = |event: &str, state: State| state_at(event, "s", accepted, accepted + 5, state);
        let records = vec![
            attempt_with("a", accepted + 1, |a| {
                (a.event_id, a.subscription, a.accepted_ms) = ("delivered".into(), "s".into(), accepted);
            }),
            state("dropped", State::Dropped),
            state("pending", State::Pending),
        ];
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let found = index.recoverable("s", accepted, now, true, 100).unwrap();
        assert_eq!(found.events, [("t".to_string(), "delivered".to_string())]);
    }

    /// A delivery whose newest versions are not attempts (resends queued behind a held key)
    /// past its share of a page's reads ends the page with a place to go on from below them:
    /// with none, the page ended `next: null` and the delivery's attempts were never listed.
    #[test]
    fn a_delivery_past_its_share_in_versions_without_attempts_still_lists_its_attempts() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100_000;
        let subs: Vec<String> = (0..400).map(|i| format!("s{i}")).collect();
        let names: Vec<&str> = subs.iter().map(String::as_str).collect();
        let mut records = vec![event_e(accepted, &names)];
        records.push(attempt_with("a000000", accepted + 1, |a| {
            (a.event_id, a.subscription, a.accepted_ms, a.attempt) = ("e".into(), "s0".into(), accepted, 1);
        }));
        for i in 0..100 {
            records.push(state_at("e", "s0", accepted, accepted + 2 + i, State::Pending));
        }
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let mut q = AttemptQuery { tenant: "t".into(), event: Some("e".into()), limit: 10, ..AttemptQuery::default() };
        let mut found = Vec::new();
        for _ in 0..10 {
            let page = index.attempts(&q).unwrap();
            found.extend(ids_of(&page));
            match page.next {
                Some(next) => q.cursor = Some(next),
                None => break,
            }
        }
        assert_eq!(found, ["a000000"], "found by following the cursor");
    }

    /// Two resends of one event make attempts of the same number in the same millisecond (in
    /// lockstep with a fixed interval): each keeps its own state version, so neither drops out
    /// of the event's attempts or its count.
    #[test]
    fn attempts_of_one_number_in_one_millisecond_keep_a_version_each() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 100;
        let mut records = vec![event_e(accepted, &["s"])];
        for id in ["gen1", "gen2"] {
            records.push(attempt_with(id, now, |a| {
                (a.event_id, a.subscription, a.accepted_ms) = ("e".into(), "s".into(), accepted);
            }));
        }
        index.apply(0, &records, records.len() as u64, now).unwrap();
        let event = index.event("t", "e").unwrap().unwrap();
        assert_eq!(index.deliveries(&event).unwrap()[0].attempts, 2);
        let q = AttemptQuery { tenant: "t".into(), event: Some("e".into()), limit: 10, ..AttemptQuery::default() };
        assert_eq!(index.attempts(&q).unwrap().items.len(), 2);
    }

    /// Events accepted in one request share their millisecond: a recover that stops at its
    /// most and says where to go on must not leave the rest of that millisecond behind.
    #[test]
    fn recovering_in_parts_leaves_no_event_of_a_shared_millisecond_behind() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let accepted = now - 500;
        let dead = |id: &str, accepted: i64| {
            attempt_with(id, now, |a| {
                (a.accepted_ms, a.state, a.outcome, a.status) =
                    (accepted, State::DeadLettered, "failed".into(), Some(500));
            })
        };
        let records: Vec<LogRecord> = ["a", "b", "c", "d", "e"].iter().map(|id| dead(id, accepted)).collect();
        index.apply(0, &records, 1, now).unwrap();
        let mut recovered = Vec::new();
        let mut since = 0;
        // Another millisecond's event after them, so the first call stops between the two.
        let later = dead("f", accepted + 1);
        index.apply(0, &[later], 2, now).unwrap();
        let mut calls = 0;
        loop {
            calls += 1;
            let found = index.recoverable("sub", since, now, false, 2).unwrap();
            recovered.extend(found.events.iter().map(|(_, e)| e.clone()));
            match found.continue_from_ms {
                Some(next) if calls < 10 => since = next,
                _ => break,
            }
        }
        assert_eq!(calls, 2, "all of the first millisecond, then the rest");
        recovered.sort();
        assert_eq!(recovered, ["evt-a", "evt-b", "evt-c", "evt-d", "evt-e", "evt-f"]);
    }

    #[test]
    fn a_bundle_s_members_are_indexed_each_and_the_offset_follows_the_topic_records() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(86_400)).unwrap();
        let now = 100 * 86_400_000 + 1000;
        // Three topic records at offsets 7, 8, 9: a bundle of more than one write's worth of
        // attempts, a plain attempt, and a bundle of two.
        let attempts: Vec<LogRecord> =
            (0..APPLY_BATCH + 10).map(|i| attempt(&format!("a{i}"), now + i as i64)).collect();
        let values: Vec<&[u8]> = attempts.iter().map(|r| &r.value[..]).collect();
        let at = |offset: u64, value: bytes::Bytes| LogRecord { offset, value, ..attempt("x", now) };
        let records = [
            at(7, record::bundle(&values[..APPLY_BATCH + 5])),
            at(8, values[APPLY_BATCH + 5].to_vec().into()),
            at(9, record::bundle(&values[APPLY_BATCH + 6..APPLY_BATCH + 8])),
        ];
        assert_eq!(index.apply(0, &records, 10, now).unwrap(), APPLY_BATCH + 8);
        assert_eq!(index.offset(0), 10);
        // Written in two: the large bundle alone, noting offset 8; then the rest, noting 10.
        assert_eq!(
            runs(&records, 10),
            [Run { records: 0..1, members: APPLY_BATCH + 5, next: 8 }, Run { records: 1..3, members: 3, next: 10 }]
        );
        let want: Vec<String> = (0..5).map(|i| format!("a{}", APPLY_BATCH + 7 - i)).collect();
        assert_eq!(all(&index)[..5], want, "every member is an attempt of its own");
    }

    /// The tables whose writeback the indexing thread starts early are found where fjall keeps
    /// them (a layout change would silently turn that off): the newest of each day's keyspace.
    #[test]
    fn the_newest_table_of_each_day_is_found_for_early_writeback() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(dir.path(), Duration::from_secs(30 * 86_400)).unwrap();
        let day = 86_400_000;
        let now = 100 * day + 1000;
        let mut offset = 0;
        let mut write = |ids: std::ops::Range<i64>, at: i64| {
            let records: Vec<LogRecord> = ids.map(|i| attempt(&format!("a{i}"), at + i)).collect();
            offset += records.len() as u64;
            index.apply(0, &records, offset, now).unwrap();
            index.flush().unwrap();
        };
        write(0..50, now - day);
        write(50..100, now);
        write(100..150, now - day);
        let newest = index.newest_tables();
        assert!(newest.len() >= 2, "one table or more in each day written: {newest:?}");
        for path in &newest {
            let id: u64 = path.file_name().unwrap().to_str().unwrap().parse().unwrap();
            let siblings = std::fs::read_dir(path.parent().unwrap()).unwrap().flatten();
            let ids: Vec<u64> = siblings.filter_map(|t| t.file_name().to_str()?.parse().ok()).collect();
            assert_eq!(ids.iter().max(), Some(&id), "{path:?} is its keyspace's newest of {ids:?}");
        }
        let yesterday = newest.iter().filter(|p| std::fs::read_dir(p.parent().unwrap()).unwrap().count() >= 2);
        assert!(yesterday.count() >= 1, "the day written twice has two tables, and the later is found");
        index.write_back_tables();
    }

    #[test]
    fn runs_stay_within_a_write_s_worth_and_never_split_a_record_of_the_topic() {
        let now = 100 * 86_400_000;
        let plain = |offset: u64| LogRecord { offset, ..attempt("p", now) };
        let bundle_of = |offset: u64, n: usize| {
            let one = attempt("b", now).value;
            let members: Vec<&[u8]> = (0..n).map(|_| &one[..]).collect();
            LogRecord { offset, value: record::bundle(&members), ..attempt("b", now) }
        };
        assert_eq!(runs(&[], 5), [Run { records: 0..0, members: 0, next: 5 }], "the offset is noted anyway");
        // 1000 + 24 fit in one write; 1 more does not; a gap in the offsets (12 → 20) is kept.
        let records = [bundle_of(10, 1000), bundle_of(11, 24), plain(12), bundle_of(20, 2000), plain(21)];
        assert_eq!(
            runs(&records, 30),
            [
                Run { records: 0..2, members: APPLY_BATCH, next: 12 },
                Run { records: 2..3, members: 1, next: 20 },
                Run { records: 3..4, members: 2000, next: 21 },
                Run { records: 4..5, members: 1, next: 30 },
            ]
        );
    }

    #[test]
    fn memtables_beyond_the_bound_are_sealed_and_flushed_even_if_the_store_did_not_seal_them() {
        let dir = tempfile::tempdir().unwrap();
        // Far below a memtable's own size, so fjall never seals one by itself here: as when
        // its worker is busy compacting.
        let bound = 64 << 10;
        let index = Index::open_bounded(dir.path(), Duration::from_secs(86_400), bound).unwrap();
        let now = 100 * 86_400_000 + 1000;
        let mut offset = 0;
        while index.db.write_buffer_size() < bound {
            let batch: Vec<_> = (0..100).map(|i| attempt(&format!("a{offset}-{i}"), now)).collect();
            offset += 100;
            index.apply(0, &batch, offset, now).unwrap();
            assert!(offset < 100_000, "the write buffer never reached the bound");
        }
        assert!(index.flush_backlog(), "over the bound, indexing waits");
        // ... and not for ever: the memtable was sealed, so it is flushed and the wait ends. fjall
        // takes a flushed memtable out of the tree a moment before it takes its bytes off the
        // count, and in that moment there is nothing left to wait for (the wait ends, the count
        // is still high): so the count is waited for as well.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while index.flush_backlog() || index.db.write_buffer_size() >= bound {
            assert!(std::time::Instant::now() < deadline, "still {} bytes", index.db.write_buffer_size());
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(all(&index).len(), 100, "what was flushed still answers (one page of 100)");
    }

    #[test]
    fn expiry_deletes_whole_days_past_retention_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let day = 86_400_000;
        let index = Index::open(dir.path(), Duration::from_secs(2 * 86_400)).unwrap();
        let t0 = 100 * day + 1000;
        index.apply(0, &[attempt("a-old", t0 - day), attempt("a-new", t0)], 2, t0).unwrap();
        assert_eq!(all(&index), ["a-new", "a-old"]);
        assert_eq!(index.offset(0), 2);
        assert_eq!(index.expire(t0 + day).unwrap(), 0, "both days are within two days");
        let expired = index.expire(t0 + 2 * day).unwrap();
        assert!(expired >= 3, "the older day's entries went: {expired}");
        assert_eq!(all(&index), ["a-new"]);
        // A record for a day already expired is not indexed again.
        index.apply(0, &[attempt("a-late", t0 - day)], 3, t0 + 2 * day).unwrap();
        assert_eq!(all(&index), ["a-new"]);
        drop(index);
        let reopened = Index::open(dir.path(), Duration::from_secs(2 * 86_400)).unwrap();
        assert_eq!((all(&reopened), reopened.offset(0)), (vec!["a-new".to_string()], 3), "kept across a restart");
    }
}
