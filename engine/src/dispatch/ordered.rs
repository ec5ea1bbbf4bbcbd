//! Ordered delivery per key: the sequencer of one partition of the `ordered` topic.
//!
//! Ingest appends an ordered subscription's deliveries to the `ordered` topic (keyed by
//! subscription, so one partition holds all of a subscription's keys, in acceptance order).
//! The sequencer reads it in order and keeps, per *lane* (subscription, key) that has
//! something outstanding, one **head**: the delivery being attempted. The head's retries are
//! kept here, not in the tiers, so nothing of its key can pass it; the key's later deliveries
//! stay where they are, in the log, counted, with at most [`BUFFER`] of them held in memory
//! and the rest found again by reading the partition from where the last one held was
//! (`Log::read_partition`) when the head settles. A failing key costs one delivery and a few
//! counters however long its backlog; other keys and other subscriptions go on.
//!
//! What happens to a head is written back to the same partition as a [`Marker`] before it
//! takes effect — its next attempt, its end (delivered, dead-lettered, dropped), a key held
//! after a dead letter — so the lanes are a function of the partition's records: a restart,
//! or another process taking the partition over, rebuilds them by reading from the committed
//! offset, which never passes the oldest head still outstanding. Nothing is attempted while
//! that replay runs, so a settled head is not sent again and no head starts out of turn.
//!
//! An operator's skip is a marker too (written by the API), so any process can take it.

use super::window::{Cut, Shares};
use super::{Deliverer, Settlement, ShardLimits};
use crate::log::{Committer, Log, LogError, LogRecord, PartitionReader, Record};
use crate::model::{get_str, now_ms, put_str, rfc3339_ms, Delivery};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// A key's later deliveries held in memory at most; the rest wait in the log.
pub const BUFFER: usize = 32;

/// Bytes of later deliveries held in memory per partition at most (over all its keys); past
/// it a key's next deliveries are read back from the log one at a time.
pub const MAX_HELD_BYTES: usize = 32 << 20;

/// Bytes of heads' records larger than [`SMALL_HEAD`] held in memory per partition at most.
/// Past it, such a new head is kept without its record, and one that failed lets its record
/// go: each is read back from the log when it is attempted (or skipped). Without it, a
/// tenant's keys failing on purpose held every head whole — ten thousand keys of a megabyte
/// each, ten gigabytes a partition. A head held after a dead letter lets its record go
/// whatever its size (it is not attempted again).
pub const MAX_HEAD_BYTES: usize = 32 << 20;

/// Heads this small keep their records (bounded by the cap of keys: 40 MiB a partition at
/// 10,000): read back one at a time through the log's reader, shared by a process's
/// partitions, a tenant's large heads past the bound made every other tenant's small ones
/// wait on it.
const SMALL_HEAD: usize = 4 << 10;

/// Sequencers started in this process, for their ids.
static SEQUENCERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Records read at a time when looking for a key's next deliveries.
const SCAN_PAGE: usize = 512;

/// Bytes of records read while keys' next deliveries are looked for, of those keys, held
/// back at most (see [`Sequencer::deferred`]); past it, applying waits for the look to end.
const MAX_DEFERRED_BYTES: usize = 4 << 20;

/// How often held keys are looked at again: one whose subscription no longer holds keys
/// after a dead letter (deleted, or changed to `skip`) goes on.
const SWEEP: Duration = Duration::from_secs(10);

/// The first byte of a marker record; a delivery record starts with its version (1).
const MARKER: u8 = 0xA7;

/// A subscription and one of its keys: the unit that is kept in order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LaneId {
    /// The subscription.
    pub subscription: String,
    /// The ordering key.
    pub key: String,
}

/// What happened to a lane's head, as written to its partition (see the module's doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// The head (the delivery at offset `head`) failed; attempt `attempt` is due at `due_ms`.
    Attempted {
        /// Its lane.
        lane: LaneId,
        /// The head's offset.
        head: u64,
        /// The next attempt's number.
        attempt: u32,
        /// When it is due, ms since the epoch.
        due_ms: i64,
    },
    /// The head is done (delivered, dead-lettered, dropped or skipped): the next may go.
    Settled {
        /// Its lane.
        lane: LaneId,
        /// The head's offset.
        head: u64,
        /// It was held after a dead letter and is released (an operator's skip, or its
        /// subscription no longer holding keys): the key's later deliveries' budgets start
        /// here. Said by the marker itself, since a sequencer that starts past the head's
        /// `Blocked` marker (committed beyond it) would not know it. An optional last byte,
        /// which versions before it ignore.
        released: bool,
    },
    /// The head was dead-lettered and its subscription holds the key until an operator skips it.
    Blocked {
        /// Its lane.
        lane: LaneId,
        /// The head's offset.
        head: u64,
    },
    /// An operator asks that the key's head be skipped (dead-lettered if it is not yet) — only
    /// if it is still `event`, when one is named (a head that moved on is not skipped by mistake).
    Skip {
        /// Its lane.
        lane: LaneId,
        /// The head's event the operator saw, if named.
        event: Option<String>,
    },
}

impl Marker {
    /// The lane it is about.
    pub fn lane(&self) -> &LaneId {
        match self {
            Marker::Attempted { lane, .. }
            | Marker::Settled { lane, .. }
            | Marker::Blocked { lane, .. }
            | Marker::Skip { lane, .. } => lane,
        }
    }

    /// The record that carries it: keyed by subscription, so it lands in its lane's partition.
    pub fn record(&self) -> Record {
        let lane = self.lane();
        let mut buf = BytesMut::with_capacity(32 + lane.subscription.len() + lane.key.len());
        buf.put_u8(MARKER);
        let kind = match self {
            Marker::Attempted { .. } => 1,
            Marker::Settled { .. } => 2,
            Marker::Blocked { .. } => 3,
            Marker::Skip { .. } => 4,
        };
        buf.put_u8(kind);
        put_str(&mut buf, &lane.subscription);
        put_str(&mut buf, &lane.key);
        match self {
            Marker::Attempted { head, attempt, due_ms, .. } => {
                buf.put_u64_le(*head);
                buf.put_u32_le(*attempt);
                buf.put_i64_le(*due_ms);
            }
            Marker::Settled { head, released, .. } => {
                buf.put_u64_le(*head);
                if *released {
                    buf.put_u8(1);
                }
            }
            Marker::Blocked { head, .. } => buf.put_u64_le(*head),
            Marker::Skip { event, .. } => put_str(&mut buf, event.as_deref().unwrap_or("")),
        }
        Record { key: Bytes::copy_from_slice(lane.subscription.as_bytes()), value: buf.freeze() }
    }

    /// Reads a marker record; `None` for anything else (a delivery, or garbage).
    pub fn decode(mut value: Bytes) -> Option<Marker> {
        if value.remaining() < 2 || value.get_u8() != MARKER {
            return None;
        }
        let kind = value.get_u8();
        let lane = LaneId { subscription: get_str(&mut value).ok()?, key: get_str(&mut value).ok()? };
        let head = |v: &mut Bytes| (v.remaining() >= 8).then(|| v.get_u64_le());
        Some(match kind {
            1 => {
                let head = head(&mut value)?;
                if value.remaining() < 12 {
                    return None;
                }
                Marker::Attempted { lane, head, attempt: value.get_u32_le(), due_ms: value.get_i64_le() }
            }
            2 => {
                let head = head(&mut value)?;
                Marker::Settled { lane, head, released: value.remaining() >= 1 && value.get_u8() == 1 }
            }
            3 => Marker::Blocked { lane, head: head(&mut value)? },
            4 => Marker::Skip { lane, event: get_str(&mut value).ok().filter(|e| !e.is_empty()) },
            _ => return None,
        })
    }
}

/// Where a blocked key's head stands (what the API lists).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlockedKey {
    /// The subscription.
    pub subscription: String,
    /// The key.
    pub key: String,
    /// The head's event.
    pub head_event: String,
    /// Attempts made on the head so far.
    pub attempts: u32,
    /// `retrying`, or `dead_lettered` (held until skipped).
    pub state: &'static str,
    /// When the head is tried next, while retrying.
    pub next_attempt_at: Option<String>,
    /// The key's deliveries waiting behind the head.
    pub waiting: u64,
    /// How many of them are held in memory (at most [`BUFFER`]; the rest wait in the log).
    pub held: usize,
}

/// The keys blocked behind a failing or dead-lettered head, on the partitions this process
/// sequences: what `herald_ordered_keys_blocked` counts and the API lists.
#[derive(Default)]
pub struct OrderedKeys {
    /// With the sequencer that set each (a partition's old sequencer may end after its new
    /// one started: what it clears is only its own).
    blocked: Mutex<BTreeMap<LaneId, (u64, BlockedKey)>>,
    /// Bytes of records each sequencer holds in memory, by its own id (a partition's old
    /// sequencer may end after its new one started).
    held: Mutex<HashMap<u64, usize>>,
}

impl OrderedKeys {
    /// Up to `limit` blocked keys of `subscription`, in key order from after `after`, and
    /// whether more follow. Only the subscription's own range of the map is read: the lock is
    /// every sequencer's, and a subscription may have thousands of keys blocked.
    pub fn blocked(&self, subscription: &str, after: Option<&str>, limit: usize) -> (Vec<BlockedKey>, bool) {
        use std::ops::Bound;
        let blocked = self.blocked.lock().unwrap();
        let from = LaneId { subscription: subscription.to_string(), key: after.unwrap_or_default().to_string() };
        let from = if after.is_some() { Bound::Excluded(from) } else { Bound::Included(from) };
        let mut items = Vec::new();
        for (lane, (_, b)) in blocked.range((from, Bound::Unbounded)) {
            if lane.subscription != subscription {
                break;
            }
            if items.len() == limit {
                return (items, true);
            }
            items.push(b.clone());
        }
        (items, false)
    }

    /// Blocked keys in all.
    pub fn count(&self) -> usize {
        self.blocked.lock().unwrap().len()
    }

    /// Bytes of records held in memory over all partitions (`herald_ordered_held_bytes`).
    pub fn held_bytes(&self) -> usize {
        self.held.lock().unwrap().values().sum()
    }

    fn hold(&self, sequencer: u64, bytes: usize) {
        let mut held = self.held.lock().unwrap();
        match bytes {
            0 => held.remove(&sequencer),
            n => held.insert(sequencer, n),
        };
    }

    /// `lane` as `sequencer` sees it: blocked, or (`None`) not — unless another sequencer
    /// set it since.
    fn set(&self, sequencer: u64, lane: &LaneId, view: Option<BlockedKey>) {
        let mut blocked = self.blocked.lock().unwrap();
        match view {
            Some(v) => {
                blocked.insert(lane.clone(), (sequencer, v));
            }
            None => {
                if blocked.get(lane).is_some_and(|(by, _)| *by == sequencer) {
                    blocked.remove(lane);
                }
            }
        }
    }
}

/// Where a lane's head is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadState {
    /// Waiting for its due time.
    Waiting,
    /// Being attempted.
    InFlight,
    /// Dead-lettered, the key held until an operator skips it.
    Parked,
    /// Settled; the next delivery is being looked for in the log.
    Scanning,
}

/// One key with something outstanding.
struct Lane {
    /// The head's record, as read (its offset is the head's identity); its value is empty
    /// while `evicted`.
    head: LogRecord,
    /// The head's record is not held in memory (see [`MAX_HEAD_BYTES`]): it is read back from
    /// the log when it is attempted.
    evicted: bool,
    /// The head's record is gone from the log (past its retention): it can no longer be sent,
    /// and waits, listed, for an operator's skip.
    gone: bool,
    /// The head's event (for the API).
    event: String,
    /// Its next attempt's number and due time (the record's own, until a marker says more).
    attempt: u32,
    due_ms: i64,
    state: HeadState,
    /// An operator asked to skip the head while it was being attempted; when (the skip's
    /// record's time).
    skip: bool,
    skip_at: Option<i64>,
    /// Set when an operator released the key after a dead letter held it: no later delivery
    /// of the key has its retry budget (`max_age`) start before then. They waited for the
    /// operator, not for their receiver; counted from acceptance, those held past it got one
    /// attempt each, and a failure dead-lettered them at once.
    budget_floor: i64,
    /// An older head than this one (read before this sequencer began, so never its head
    /// here) was dead-lettered holding the key, as a marker read since says: its settling,
    /// when read, is the key's release.
    parked_before: Option<u64>,
    /// The head is the first of the key this sequencer read, not one it took on after
    /// settling the one before: only then can a marker read later settle an older head of
    /// the key that this sequencer never held (see `Sequencer::older_head_settled`).
    inherited: bool,
    /// A marker said the head was settled while this sequencer was attempting it again (the
    /// last owner's, read after a takeover or a replay that went live at the cap of keys):
    /// the key moves on when that attempt ends, not during it, so two of its deliveries are
    /// never under way at once.
    settled_elsewhere: bool,
    /// The same for a marker saying the head was dead-lettered and its key held: it is held
    /// once that attempt ends (unless the attempt delivered it), not during it — held then, an
    /// operator's skip started the key's next delivery beside it.
    blocked_elsewhere: bool,
    /// Since when the key is held after its head's dead letter (ms; the `Blocked` marker's
    /// time when read from one, so a restart does not start the hold over): a key held longer
    /// than `limits.max_hold` goes on (see `Sequencer::sweep`).
    held_ms: i64,
    /// When the settling marker read meanwhile released the key (see `Marker::Settled`): the
    /// key's later deliveries' budgets start there once the attempt ends.
    released_at: Option<i64>,
    /// The key's deliveries waiting behind the head, in the log.
    waiting: u64,
    /// The first of them, at most [`BUFFER`].
    buffered: VecDeque<LogRecord>,
    /// Where the first waiting delivery not buffered is looked for.
    scan_from: u64,
}

impl Lane {
    fn new(head: LogRecord, d: &Delivery) -> Lane {
        let mut lane = Lane {
            scan_from: head.offset + 1,
            head: head.clone(),
            evicted: false,
            gone: false,
            event: String::new(),
            attempt: 0,
            due_ms: 0,
            state: HeadState::Waiting,
            skip: false,
            skip_at: None,
            budget_floor: 0,
            parked_before: None,
            inherited: true,
            settled_elsewhere: false,
            blocked_elsewhere: false,
            held_ms: 0,
            released_at: None,
            waiting: 0,
            buffered: VecDeque::new(),
        };
        lane.take_head(head, d);
        lane.inherited = true;
        lane
    }

    /// `head` (the delivery `d`) becomes the key's head, waiting for its first attempt.
    fn take_head(&mut self, head: LogRecord, d: &Delivery) {
        self.head = head;
        self.evicted = false;
        self.gone = false;
        self.event = d.event_id.clone();
        self.attempt = d.attempt;
        self.due_ms = d.due_ms;
        self.state = HeadState::Waiting;
        self.skip = false;
        self.skip_at = None;
        self.settled_elsewhere = false;
        self.blocked_elsewhere = false;
        self.released_at = None;
        self.inherited = false;
    }

    /// The key, held after a dead letter, is released (by the skip read at `skip_at`, else
    /// now): its later deliveries' budgets start no earlier (`budget_floor`).
    fn released(&mut self) {
        self.budget_floor = self.budget_floor.max(self.skip_at.unwrap_or_else(now_ms));
    }

    /// The head's delivery record as it is to be attempted now (its attempt and due time),
    /// or what to read back from the log to make it.
    fn attempt_record(&self) -> HeadRecord {
        let at = AsAttempted { attempt: self.attempt, due_ms: self.due_ms, budget_floor: self.budget_floor };
        if self.evicted {
            HeadRecord::InLog(self.head.offset, at)
        } else {
            HeadRecord::Held(at.made(self.head.clone()))
        }
    }

    /// Lets the head's record go from memory (it is read back when needed); returns its bytes.
    fn evict(&mut self) -> usize {
        if self.evicted {
            return 0;
        }
        self.evicted = true;
        std::mem::take(&mut self.head.value).len()
    }

    /// Blocked: its head failed at least once, or is held after a dead letter.
    fn blocked(&self, lane: &LaneId) -> Option<BlockedKey> {
        let parked = self.state == HeadState::Parked;
        let failing = (self.attempt > 1 || self.gone) && self.state != HeadState::Scanning;
        (parked || failing).then(|| BlockedKey {
            subscription: lane.subscription.clone(),
            key: lane.key.clone(),
            head_event: self.event.clone(),
            attempts: if parked { self.attempt } else { self.attempt.saturating_sub(1) },
            state: match (parked, self.gone) {
                (true, _) => "dead_lettered",
                (false, true) => "gone",
                (false, false) => "retrying",
            },
            next_attempt_at: (!parked).then(|| rfc3339_ms(self.due_ms)),
            waiting: self.waiting,
            held: self.buffered.len(),
        })
    }
}

/// What an attempt (or skip) on a head came to, once its marker is durable.
enum Done {
    /// The head is settled: the next may go.
    Settled,
    /// It waits for another attempt (or, deferred, the same one) at `due_ms`.
    Again { attempt: u32, due_ms: i64 },
    /// Its record is gone from the log: it is looked for again at `due_ms`, and waits for an
    /// operator's skip.
    Gone { attempt: u32, due_ms: i64 },
    /// Dead-lettered; the key is held.
    Parked,
}

/// A head's record to attempt: held in memory, or to be read back from the log at its offset.
enum HeadRecord {
    Held(Option<LogRecord>),
    InLog(u64, AsAttempted),
}

/// What a head's record says at its next attempt (the record's own, until markers said more).
#[derive(Debug, Clone, Copy)]
struct AsAttempted {
    attempt: u32,
    due_ms: i64,
    budget_floor: i64,
}

impl AsAttempted {
    /// `head` as it is to be attempted; `None` if it is not a delivery.
    fn made(self, head: LogRecord) -> Option<LogRecord> {
        let d = Delivery::decode(head.value.clone()).ok()?;
        let budget_ms = d.budget_ms.max(self.budget_floor);
        if (d.attempt, d.due_ms, d.budget_ms) == (self.attempt, self.due_ms, budget_ms) {
            return Some(head); // its first attempt, as most are: no copy
        }
        let d = Delivery { attempt: self.attempt, due_ms: self.due_ms, budget_ms, ..d };
        Some(LogRecord { value: d.encode(), ..head })
    }
}

/// Where a sequencer reads a head's record back from.
#[derive(Clone)]
struct ReadBack {
    log: Arc<dyn Log>,
    topic: String,
    partition: u32,
}

impl HeadRecord {
    /// The record to attempt, read back from the log if it is not held; `Err` when that read
    /// failed (the head is tried again later), `Ok(None)` when it is not a delivery.
    async fn fetch(self, from: &ReadBack) -> Result<Option<LogRecord>, LogError> {
        match self {
            HeadRecord::Held(rec) => Ok(rec),
            HeadRecord::InLog(offset, at) => {
                let (records, _) = from.log.read_partition(&from.topic, from.partition, offset, 1).await?;
                let rec = records.into_iter().find(|r| r.offset == offset);
                Ok(rec.and_then(|r| at.made(r)))
            }
        }
    }
}

/// An attempt (or skip) that ended: its lane, head, what it came to, and the marker that must
/// be durable before that takes effect.
type Finished = BoxFuture<'static, (LaneId, u64, Done, Option<Marker>)>;
/// One append of the markers gathered meanwhile; resolves to the transitions they carry.
type Marking = BoxFuture<'static, Vec<(LaneId, u64, Done)>>;
/// One pass over the partition: per lane, what it found.
type Scan = BoxFuture<'static, HashMap<LaneId, Found>>;
type Read = BoxFuture<'static, (Box<dyn PartitionReader>, Result<Vec<LogRecord>, LogError>)>;
/// What one look past the records left unread found: the markers there, and where it ended.
type Ahead = BoxFuture<'static, (Vec<(u64, Marker)>, u64, u64)>;

/// One partition's lanes.
struct Sequencer {
    partition: u32,
    topic: String,
    log: Arc<dyn Log>,
    deliverer: Arc<Deliverer>,
    committer: Arc<dyn Committer>,
    limits: ShardLimits,
    keys: Arc<OrderedKeys>,
    /// Each tenant's heads in flight here, bounded as in the shards ([`Shares`]): one
    /// tenant's keys to endpoints that hang cannot fill the partition's window.
    shares: Arc<Shares>,
    lanes: HashMap<LaneId, Lane>,
    /// Every lane's head offset: the lowest is as far as the partition may be committed.
    heads: BTreeMap<u64, LaneId>,
    /// Waiting heads by due time.
    timers: BTreeSet<(i64, u64)>,
    attempts: FuturesUnordered<Finished>,
    /// Heads attempted, oldest first, with when: one in flight past `window::YOUNG` counts
    /// apart from the window, as in the shards, so that heads whose endpoint hangs cannot fill
    /// it and hold up every other subscription's keys on the partition.
    started: VecDeque<(Instant, u64)>,
    /// Heads whose attempt is in flight, with when it started (an entry of `started` from a
    /// head's earlier attempt must not age its next), and those of them past `window::YOUNG`.
    attempting: HashMap<u64, Instant>,
    aged: HashSet<u64>,
    /// Ended attempts whose markers wait for the append in flight, and that append: markers
    /// go to the log in groups, one append for all that ended meanwhile.
    to_mark: Vec<(LaneId, u64, Done, Marker)>,
    marking: Option<Marking>,
    /// Lanes whose next deliveries are to be looked for in the log, and the one pass doing it.
    needy: HashMap<LaneId, (u64, usize)>,
    scan: Option<Scan>,
    /// Records read and not yet applied: applying waits while the partition holds as many
    /// keys as it may (`limits.max_keys`).
    unread: VecDeque<LogRecord>,
    /// Records read, in order, of keys whose next deliveries are being looked for in the log:
    /// applied once each key has its next head, so a marker for one of them is never read
    /// before it is. Other keys' records go on being applied meanwhile — a tenant's sparse key
    /// whose look reads millions of records holds up only itself — up to
    /// [`MAX_DEFERRED_BYTES`] of these held back (the record and its key), then applying waits.
    deferred: VecDeque<(LaneId, LogRecord)>,
    deferred_bytes: usize,
    /// The keys of `deferred`, each with its first record's offset: a pass looks for a key's
    /// next deliveries below it only (those after it are not counted yet).
    deferred_lanes: HashMap<LaneId, u64>,
    /// Bytes the pass in flight may hold (of [`MAX_HELD_BYTES`], the rest left to keys whose
    /// records are applied meanwhile).
    scan_reserved: usize,
    /// Bytes of later deliveries held in memory over all keys (about [`MAX_HELD_BYTES`] at most).
    held: usize,
    /// Bytes of heads' records held in memory (see [`MAX_HEAD_BYTES`]).
    head_bytes: usize,
    /// This sequencer among those of the process (for `OrderedKeys::hold`).
    id: u64,
    /// The offset after the last record applied.
    read_to: u64,
    /// The partition's end when the sequencer started: until it is read, nothing is attempted.
    replay_end: u64,
    committed: u64,
    /// Replay is over and skips read during it have acted.
    live: bool,
    idle: Option<Box<dyn PartitionReader>>,
    reading: Option<Read>,
    /// At the cap of keys, the partition past what is left unread is looked through for
    /// operators' skips (the only markers another writer adds while this sequencer is live):
    /// else a partition whose every key is held after a dead letter never read the skip that
    /// frees one. The look in flight, how far looks have gone, and the offsets of skips
    /// applied ahead (passed over when reading reaches them). Looks go on from where the last
    /// ended, so the latest marker of each key in what was looked at is kept (a key's markers
    /// only move it on: whether the latest would move it says whether any would), judged again
    /// at each skip — one found while its own marker's append was still settling must not hold
    /// a later skip back for good; past [`AHEAD_KEYS`] of them, no skip naming no head acts.
    ahead: Option<Ahead>,
    ahead_to: u64,
    latest_ahead: Latest,
    applied_ahead: BTreeSet<u64>,
}

/// Sequences one partition of the `ordered` topic until `stop` turns true, then lets the
/// attempts in flight finish (bounded).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    reader: Box<dyn PartitionReader>,
    topic: String,
    log: Arc<dyn Log>,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
    keys: Arc<OrderedKeys>,
    stats: Arc<crate::metrics::ShardStats>,
    mut stop: watch::Receiver<bool>,
) {
    let partition = reader.partition();
    let replay_end = loop {
        match log.end_offset(&topic, partition).await {
            Ok(end) => break end,
            Err(LogError::Closed) => return,
            Err(e) => {
                tracing::error!(partition, error = %e, "reading the ordered topic's end failed; retrying");
                if !crate::shutdown::sleep(Duration::from_millis(500), &mut stop).await {
                    return;
                }
            }
        }
    };
    let mut seq = Sequencer::new(reader, topic, log, deliverer, limits, keys, replay_end);
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reported = 0;
    loop {
        seq.start_due();
        seq.read_more();
        seq.scan_more();
        seq.mark_more();
        stats.set_in_flight(seq.attempts.len());
        if seq.held + seq.head_bytes != reported {
            reported = seq.held + seq.head_bytes;
            seq.keys.hold(seq.id, reported);
        }
        let wake = seq.wake_at();
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => break,
            Some((lane, head, done, marker)) = seq.attempts.next(), if !seq.attempts.is_empty() => {
                seq.attempted(head);
                seq.ended(lane, head, done, marker);
            }
            marked = async { seq.marking.as_mut().expect("guarded").await }, if seq.marking.is_some() => {
                seq.marking = None;
                for (lane, head, done) in marked {
                    seq.finished(lane, head, done);
                }
            }
            found = async { seq.scan.as_mut().expect("guarded").await }, if seq.scan.is_some() => {
                seq.scanned(found);
            }
            (reader, batch) = async { seq.reading.as_mut().expect("guarded").await }, if seq.reading.is_some() => {
                if !seq.read(reader, batch).await {
                    break;
                }
            }
            (markers, started, to) = async { seq.ahead.as_mut().expect("guarded").await }, if seq.ahead.is_some() => {
                seq.ahead = None;
                seq.looked(markers, started, to);
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
            _ = sweep.tick() => seq.sweep().await,
        }
    }
    seq.drain().await;
    stats.set_in_flight(0);
}

impl Sequencer {
    fn new(
        reader: Box<dyn PartitionReader>,
        topic: String,
        log: Arc<dyn Log>,
        deliverer: Arc<Deliverer>,
        limits: ShardLimits,
        keys: Arc<OrderedKeys>,
        replay_end: u64,
    ) -> Sequencer {
        let partition = reader.partition();
        let raw = reader.committer();
        Sequencer {
            partition,
            committer: deliverer.committer(raw),
            topic,
            log,
            deliverer,
            shares: Arc::new(Shares::new(limits.window)),
            limits,
            keys,
            lanes: HashMap::new(),
            heads: BTreeMap::new(),
            timers: BTreeSet::new(),
            attempts: FuturesUnordered::new(),
            started: VecDeque::new(),
            attempting: HashMap::new(),
            aged: HashSet::new(),
            to_mark: Vec::new(),
            marking: None,
            needy: HashMap::new(),
            scan: None,
            unread: VecDeque::new(),
            deferred: VecDeque::new(),
            deferred_bytes: 0,
            deferred_lanes: HashMap::new(),
            scan_reserved: 0,
            held: 0,
            head_bytes: 0,
            id: SEQUENCERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            // Set by the first record read: a committer's idea of the committed offset can run
            // ahead of where its reader starts (Kafka's reports the end until a first commit).
            read_to: 0,
            replay_end,
            committed: 0,
            live: false,
            idle: Some(reader),
            reading: None,
            ahead: None,
            ahead_to: 0,
            latest_ahead: Latest::default(),
            applied_ahead: BTreeSet::new(),
        }
    }

    fn replaying(&self) -> bool {
        !self.live && self.read_to < self.replay_end
    }

    /// Keeps one read pending: every record is looked at as it comes (a waiting delivery costs
    /// a count, not memory), so reading never waits for the lanes.
    fn read_more(&mut self) {
        if self.reading.is_some() || !self.unread.is_empty() {
            return;
        }
        let Some(mut reader) = self.idle.take() else { return };
        let batch = self.limits.batch;
        self.reading = Some(
            async move {
                let records = reader.next_batch(batch).await;
                (reader, records)
            }
            .boxed(),
        );
    }

    async fn read(&mut self, reader: Box<dyn PartitionReader>, batch: Result<Vec<LogRecord>, LogError>) -> bool {
        self.reading = None;
        self.idle = Some(reader);
        match batch {
            Ok(records) => {
                self.unread.extend(records);
                self.apply_unread();
            }
            Err(LogError::Closed) => return false,
            Err(e) => {
                tracing::error!(partition = self.partition, error = %e, "reading the ordered topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        true
    }

    /// Applies what was read, in order, until the partition holds as many keys as it may
    /// (then again as keys settle: see [`Sequencer::finished`]); a record of a key whose next
    /// deliveries are being looked for in the log is held back until they are found.
    fn apply_unread(&mut self) {
        let mut capped = false;
        loop {
            if self.lanes.len() >= self.limits.max_keys {
                capped = !self.unread.is_empty();
                break;
            }
            if self.deferred_bytes >= MAX_DEFERRED_BYTES {
                break;
            }
            let Some(rec) = self.unread.pop_front() else { break };
            if rec.offset < self.read_to {
                continue; // handed out again
            }
            self.read_to = rec.offset + 1;
            if self.applied_ahead.remove(&rec.offset) {
                continue;
            }
            match self.looking_for(&rec) {
                Some(lane) => {
                    self.deferred_bytes += deferred_size(&lane, &rec);
                    self.deferred_lanes.entry(lane.clone()).or_insert(rec.offset);
                    self.deferred.push_back((lane, rec));
                }
                None => self.apply(rec),
            }
        }
        if !self.live && (capped || !self.replaying()) {
            if capped {
                // The markers that would settle these keys lie further on, past deliveries
                // of keys not open yet: replay would wait for them for ever (nothing is
                // attempted while it runs, so no key settles to make room). It ends here
                // instead; a key whose head the partition's last sequencer settled after this
                // point is attempted again (at least once, as after any crash), and its
                // marker, read later, moves the key on once that attempt ends.
                tracing::warn!(
                    partition = self.partition,
                    keys = self.lanes.len(),
                    read_to = self.read_to,
                    replay_end = self.replay_end,
                    "replaying the ordered topic reached dispatch.ordered_max_keys; going on from here"
                );
            }
            self.live = true;
            self.replayed();
        }
        if capped {
            self.look_ahead();
        }
        self.commit();
    }

    /// The key of `rec` if its record must wait (see [`Sequencer::deferred`]): the key's next
    /// deliveries are being looked for, or an earlier record of it waits.
    fn looking_for(&self, rec: &LogRecord) -> Option<LaneId> {
        if self.scan.is_none() && self.needy.is_empty() && self.deferred.is_empty() {
            return None;
        }
        let lane = match Marker::decode(rec.value.clone()) {
            Some(marker) => marker.lane().clone(),
            None => {
                let d = Delivery::decode(rec.value.clone()).ok()?;
                LaneId { subscription: d.subscription, key: d.ordering_key.unwrap_or_default() }
            }
        };
        let waits = self.lanes.get(&lane).is_some_and(|l| l.state == HeadState::Scanning)
            || self.deferred_lanes.contains_key(&lane);
        waits.then_some(lane)
    }

    /// Applies the records held back whose keys have their next heads now, in order; a key
    /// looking again (or again after one of them) keeps the rest of its own. Only after a
    /// pass: no key stops looking otherwise (run at each read, it went over thousands of
    /// held-back records a batch).
    fn apply_deferred(&mut self) {
        if self.deferred.is_empty() {
            return;
        }
        let mut kept: VecDeque<(LaneId, LogRecord)> = VecDeque::new();
        self.deferred_lanes.clear();
        for (lane, rec) in std::mem::take(&mut self.deferred) {
            let looking = self.lanes.get(&lane).is_some_and(|l| l.state == HeadState::Scanning);
            if looking || self.deferred_lanes.contains_key(&lane) {
                self.deferred_lanes.entry(lane.clone()).or_insert(rec.offset);
                kept.push_back((lane, rec));
                continue;
            }
            self.deferred_bytes = self.deferred_bytes.saturating_sub(deferred_size(&lane, &rec));
            self.apply(rec);
        }
        self.deferred = kept;
    }

    /// What a pass over the log found: each key's next deliveries, then what was held back
    /// for them and what is left unread.
    fn scanned(&mut self, found: HashMap<LaneId, Found>) {
        self.scan = None;
        self.scan_reserved = 0;
        for (lane, found) in found {
            self.found(lane, found);
        }
        self.apply_deferred();
        self.apply_unread();
    }

    /// Takes one record of the partition: a delivery joins its lane; a marker moves a lane on.
    fn apply(&mut self, rec: LogRecord) {
        if let Some(marker) = Marker::decode(rec.value.clone()) {
            return self.mark(marker, rec.timestamp_ms);
        }
        let delivery = match Delivery::decode(rec.value.clone()) {
            Ok(d) => d,
            Err(e) => {
                // Not a delivery: parked so it cannot stop the partition (or be lost).
                let (deliverer, offset) = (self.deliverer.clone(), rec.offset);
                let lane = LaneId { subscription: String::new(), key: format!("malformed@{offset}") };
                // Not committed past until it is parked.
                self.heads.insert(offset, lane.clone());
                self.attempts.push(
                    async move {
                        deliverer.park_malformed(&rec, e.to_string()).await;
                        (lane, offset, Done::Settled, None)
                    }
                    .boxed(),
                );
                return;
            }
        };
        let lane = LaneId {
            subscription: delivery.subscription.clone(),
            key: delivery.ordering_key.clone().unwrap_or_default(),
        };
        match self.lanes.get_mut(&lane) {
            Some(l) => {
                l.waiting += 1;
                // Buffered only while every earlier one is, so the buffer is always the front.
                if l.buffered.len() as u64 == l.waiting - 1
                    && l.buffered.len() < BUFFER
                    && self.held + self.scan_reserved < MAX_HELD_BYTES
                {
                    l.scan_from = rec.offset + 1;
                    self.held += rec.value.len();
                    l.buffered.push_back(owned(rec));
                }
                let view = l.blocked(&lane);
                if view.is_some() {
                    self.keys.set(self.id, &lane, view);
                }
            }
            None => {
                let mut l = Lane::new(rec, &delivery);
                take_in(&mut self.head_bytes, &mut l);
                self.heads.insert(l.head.offset, lane.clone());
                self.timers.insert((l.due_ms, l.head.offset));
                self.lanes.insert(lane, l);
            }
        }
    }

    /// Applies a marker; each applies once (to the head it names, forward only), so reading
    /// back a marker this sequencer wrote and applied changes nothing.
    fn mark(&mut self, marker: Marker, at_ms: i64) {
        match marker {
            Marker::Attempted { lane, head, attempt, due_ms } => {
                self.again(&lane, head, attempt, due_ms);
            }
            Marker::Settled { lane, head, released } => {
                let released = released.then_some(at_ms);
                if self.older_head_settled(&lane, head, at_ms, released.is_some()) {
                    return;
                }
                let l = self.lanes.get_mut(&lane).filter(|l| l.head.offset == head && l.state == HeadState::InFlight);
                match l {
                    Some(l) => {
                        l.settled_elsewhere = true;
                        l.released_at = released;
                    }
                    None => self.release(&lane, head, released),
                }
            }
            Marker::Blocked { lane, head } => match self.lanes.get_mut(&lane) {
                Some(l) if head < l.head.offset => l.parked_before = Some(head),
                Some(l) if l.head.offset == head && l.state == HeadState::InFlight => l.blocked_elsewhere = true,
                _ => self.park(&lane, head, at_ms),
            },
            Marker::Skip { lane, event } => {
                let Some(l) = self.lanes.get_mut(&lane) else { return };
                if event.is_some_and(|e| e != l.event) {
                    return; // the head it named is gone: its key moved on
                }
                l.skip = true;
                l.skip_at = Some(at_ms);
                if self.live {
                    self.skip_now(&lane);
                }
            }
        }
    }

    /// A marker settling a head of `lane` older than its head here: one before where this
    /// sequencer began reading (a restart, a takeover), which it never held, settled after
    /// what was read of the key since. So a skip read before it was that head's, the head
    /// when the skip was written (one naming no event would otherwise skip this head too);
    /// and if that head held the key (or a skip released it), this is the key's release,
    /// which the later deliveries' budgets start from (as `Lane::released` does live; a skip
    /// of a head that was only retrying gives them that much more, no less). Whether it was one.
    fn older_head_settled(&mut self, lane: &LaneId, head: u64, at_ms: i64, released: bool) -> bool {
        // A head this sequencer took on after settling the one before: a late marker of that
        // one (its own read back, or a last owner's after a takeover) says nothing of skips.
        let Some(l) = self.lanes.get_mut(lane).filter(|l| head < l.head.offset && l.inherited) else { return false };
        if l.skip || released || l.parked_before == Some(head) {
            l.budget_floor = l.budget_floor.max(l.skip_at.unwrap_or(at_ms));
        }
        l.skip = false;
        l.skip_at = None;
        l.parked_before = None;
        true
    }

    fn again(&mut self, lane: &LaneId, head: u64, attempt: u32, due_ms: i64) {
        let Some(l) = self.lanes.get_mut(lane).filter(|l| l.head.offset == head) else { return };
        // A marker read back after the head settled (its lane now looks for the next) is old news.
        let stale = attempt < l.attempt || (attempt == l.attempt && due_ms < l.due_ms);
        if stale || matches!(l.state, HeadState::Parked | HeadState::Scanning) {
            return;
        }
        self.timers.remove(&(l.due_ms, head));
        l.attempt = attempt;
        l.due_ms = due_ms;
        if l.state != HeadState::InFlight {
            l.state = HeadState::Waiting;
            self.timers.insert((due_ms, head));
        }
        self.keys.set(self.id, lane, l.blocked(lane));
    }

    /// Holds the key after its head at `head` was dead-lettered, since `held_ms` (or since
    /// earlier, when it was held already).
    fn park(&mut self, lane: &LaneId, head: u64, held_ms: i64) {
        let Some(l) = self.lanes.get_mut(lane).filter(|l| l.head.offset == head && l.state != HeadState::Scanning)
        else {
            return;
        };
        self.timers.remove(&(l.due_ms, head));
        l.held_ms = if l.state == HeadState::Parked { l.held_ms.min(held_ms) } else { held_ms };
        l.state = HeadState::Parked;
        // Held until an operator acts, perhaps for days: not in memory meanwhile.
        self.head_bytes -= l.evict();
        self.keys.set(self.id, lane, l.blocked(lane));
        if l.skip && self.live {
            self.skip_now(lane); // an operator asked while its last attempt was under way
        }
    }

    /// The head at `head` is settled: the key's next delivery becomes its head (found in the
    /// log when none is buffered), or the lane is done.
    /// `released`: when its marker said it released the key (see `Marker::Settled`).
    fn release(&mut self, lane: &LaneId, head: u64, released: Option<i64>) {
        let Some(l) = self.lanes.get_mut(lane).filter(|l| l.head.offset == head) else { return };
        if l.state == HeadState::Scanning {
            return;
        }
        // A marker saying so releases a held key whatever this run saw of the hold (its
        // `Blocked` marker read mid-attempt, or not at all).
        if (l.state == HeadState::Parked && l.skip) || released.is_some() {
            // By an operator's skip or the sweep, as a replay reads it (live: `skip_now`).
            l.skip_at = l.skip_at.or(released);
            l.released();
        }
        self.timers.remove(&(l.due_ms, head));
        self.keys.set(self.id, lane, None);
        if l.waiting == 0 {
            self.head_bytes -= l.evict();
            self.heads.remove(&head);
            self.lanes.remove(lane);
            return;
        }
        if let Some(next) = l.buffered.pop_front() {
            self.held = self.held.saturating_sub(next.value.len());
            self.next_head(lane, next);
            return;
        }
        // The next ones wait in the log: read on from where the last one held was (one pass
        // for every lane that needs it). The old head's offset stays the commit floor until
        // a new head is found.
        l.state = HeadState::Scanning;
        let room = if self.held < MAX_HELD_BYTES { BUFFER } else { 1 };
        self.needy.insert(lane.clone(), (l.scan_from, l.waiting.min(room as u64) as usize));
    }

    /// Starts a pass over the log for the lanes waiting for their next deliveries, if none is
    /// running: one sequential read serves them all, so a partition never has more than one.
    fn scan_more(&mut self) {
        if self.scan.is_some() || self.needy.is_empty() {
            return;
        }
        // Each key below its first record held back: read past, it is not counted yet (it is
        // applied after this pass), and a pass that found less than it wanted went on from
        // `to`, past it, for good.
        let wants = std::mem::take(&mut self.needy)
            .into_iter()
            .map(|(lane, (from, want))| {
                let below = self.deferred_lanes.get(&lane).copied().unwrap_or(u64::MAX).min(self.read_to);
                (lane, (from, want, below))
            })
            .collect();
        let (log, topic, partition, to) = (self.log.clone(), self.topic.clone(), self.partition, self.read_to);
        // What may be held now over all lanes: each asked for its buffer's worth when it was
        // released, with the partition below the limit then, and hundreds released during one
        // pass all found theirs in the next. Half of it: keys whose records are applied while
        // the pass runs buffer theirs in the rest.
        let budget = MAX_HELD_BYTES.saturating_sub(self.held) / 2;
        self.scan_reserved = budget;
        self.scan = Some(async move { scan(&*log, &topic, partition, wants, to, budget).await }.boxed());
    }

    fn found(&mut self, lane: LaneId, found: Found) {
        let Some(l) = self.lanes.get_mut(&lane) else { return };
        l.scan_from = found.look_on_from;
        if found.records.is_empty() && found.cut {
            // Its next head is there, past what the pass could hold: the next pass finds it.
            let room = if self.held < MAX_HELD_BYTES { BUFFER } else { 1 };
            self.needy.insert(lane, (l.scan_from, l.waiting.min(room as u64) as usize));
            return;
        }
        // Buffered ones arrived while scanning only if none waited unbuffered: none did.
        let mut found: VecDeque<LogRecord> = found.records.into();
        self.held += found.iter().map(|r| r.value.len()).sum::<usize>();
        found.extend(l.buffered.drain(..));
        l.buffered = found;
        match l.buffered.pop_front() {
            Some(next) => {
                self.held = self.held.saturating_sub(next.value.len());
                self.next_head(&lane, next)
            }
            None => {
                tracing::error!(
                    partition = self.partition,
                    subscription = %lane.subscription,
                    waiting = l.waiting,
                    "an ordered key's next deliveries were not found in the log; the key is released"
                );
                let head = l.head.offset;
                self.head_bytes -= l.evict();
                self.heads.remove(&head);
                self.lanes.remove(&lane);
            }
        }
        self.commit();
    }

    fn next_head(&mut self, lane: &LaneId, next: LogRecord) {
        let l = self.lanes.get_mut(lane).expect("a lane being released exists");
        let d = match Delivery::decode(next.value.clone()) {
            Ok(d) => d,
            Err(_) => return, // read and decoded once already
        };
        self.heads.remove(&l.head.offset);
        if l.waiting == 0 {
            tracing::error!(partition = self.partition, subscription = %lane.subscription, "an ordered key's count of waiting deliveries was off");
        }
        l.waiting = l.waiting.saturating_sub(1);
        self.head_bytes -= l.evict();
        l.take_head(next, &d);
        take_in(&mut self.head_bytes, l);
        self.heads.insert(l.head.offset, lane.clone());
        self.timers.insert((l.due_ms, l.head.offset));
        self.commit();
    }

    /// An operator's skip, now that it may act: a held head is released; a waiting one is
    /// dead-lettered first; one being attempted is skipped when its attempt ends, if it failed.
    fn skip_now(&mut self, lane: &LaneId) {
        let Some(l) = self.lanes.get_mut(lane) else { return };
        match l.state {
            HeadState::Parked | HeadState::Waiting => {
                // A held head is in the dead-letter topic already; a waiting one goes there now.
                let parked = l.state == HeadState::Parked;
                if parked {
                    l.released();
                }
                l.state = HeadState::InFlight;
                self.timers.remove(&(l.due_ms, l.head.offset));
                let (head, rec) = (l.head.offset, l.attempt_record());
                let (deliverer, lane, from) = (self.deliverer.clone(), lane.clone(), self.read_back());
                self.attempts.push(
                    async move {
                        if !parked {
                            let rec = match rec.fetch(&from).await {
                                Ok(rec) => rec,
                                Err(e) => {
                                    tracing::error!(partition = from.partition, offset = head, error = %e, "reading a skipped head back failed; trying again");
                                    // Waited here: the skip, still asked for, acts again as
                                    // soon as this ends.
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                    let again = Done::Again { attempt: 0, due_ms: now_ms() };
                                    return (lane, head, again, None);
                                }
                            };
                            if let Some(d) = rec.as_ref().and_then(|r| Delivery::decode(r.value.clone()).ok()) {
                                let mut skipped = deliverer.skip(d, rec.expect("decoded").value).await;
                                deliverer.record_now(&mut skipped).await;
                            }
                        }
                        let marker = Marker::Settled { lane: lane.clone(), head, released: parked };
                        (lane, head, Done::Settled, Some(marker))
                    }
                    .boxed(),
                );
            }
            HeadState::InFlight | HeadState::Scanning => {}
        }
    }

    /// Room for another attempt: fewer young ones than the window, twice it in all.
    fn has_room(&self) -> bool {
        let young = self.attempts.len().saturating_sub(self.aged.len());
        super::window::room(self.limits.window, young, self.attempts.len()) > 0
    }

    /// Counts apart the attempts in flight for `window::YOUNG` or longer.
    fn age(&mut self) {
        let now = Instant::now();
        while let Some(&(at, head)) = self.started.front() {
            if now.duration_since(at) < super::window::YOUNG {
                break;
            }
            self.started.pop_front();
            if self.attempting.get(&head) == Some(&at) {
                self.aged.insert(head);
            }
        }
    }

    /// A head's attempt ended.
    fn attempted(&mut self, head: u64) {
        self.attempting.remove(&head);
        self.aged.remove(&head);
    }

    /// Where heads' records are read back from.
    fn read_back(&self) -> ReadBack {
        ReadBack { log: self.log.clone(), topic: self.topic.clone(), partition: self.partition }
    }

    /// Starts every head that is due, while the window has room; nothing during replay.
    fn start_due(&mut self) {
        if self.replaying() {
            return;
        }
        self.age();
        let now = now_ms();
        while self.has_room() {
            let Some(&(due, head)) = self.timers.first() else { break };
            if due > now {
                break;
            }
            self.timers.pop_first();
            let Some(lane) = self.heads.get(&head).cloned() else { continue };
            let l = self.lanes.get_mut(&lane).expect("a head's lane exists");
            if l.state != HeadState::Waiting {
                continue;
            }
            l.state = HeadState::InFlight;
            let rec = l.attempt_record();
            let attempt = l.attempt;
            let at = Instant::now();
            self.started.push_back((at, head));
            self.attempting.insert(head, at);
            let (deliverer, shares, from) = (self.deliverer.clone(), self.shares.clone(), self.read_back());
            self.attempts.push(attempt_head(deliverer, shares, from, lane, head, attempt, rec));
        }
    }

    /// When the earliest waiting head is due, if there is room to start it; with none, when
    /// the oldest attempt ages (an ended attempt wakes the sequencer otherwise).
    fn wake_at(&self) -> Option<Instant> {
        if self.replaying() {
            return None;
        }
        if !self.has_room() {
            return self.started.front().map(|&(at, _)| at + super::window::YOUNG);
        }
        let &(due, _) = self.timers.first()?;
        Some(Instant::now() + Duration::from_millis((due - now_ms()).max(0) as u64))
    }

    /// An attempt (or skip) ended: it takes effect now, or once its marker is durable.
    fn ended(&mut self, lane: LaneId, head: u64, done: Done, marker: Option<Marker>) {
        match marker {
            Some(marker) => self.to_mark.push((lane, head, done, marker)),
            None => self.finished(lane, head, done),
        }
    }

    /// Appends the gathered markers in one go, if no append is in flight.
    fn mark_more(&mut self) {
        if self.marking.is_some() || self.to_mark.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.to_mark);
        let (log, topic) = (self.log.clone(), self.topic.clone());
        self.marking = Some(
            async move {
                // No lane moves before its marker is durable (markers are far below the size limit).
                let records = batch.iter().map(|(_, _, _, m)| m.record()).collect();
                let _ = crate::log::append_durably(&*log, &topic, records).await;
                batch.into_iter().map(|(lane, head, done, _)| (lane, head, done)).collect()
            }
            .boxed(),
        );
    }

    /// A head's attempt (or skip) ended and its marker is durable. A key that settled makes
    /// room for what waits past the cap of keys.
    fn finished(&mut self, lane: LaneId, head: u64, done: Done) {
        if lane.subscription.is_empty() {
            self.heads.remove(&head); // a malformed record, parked
        }
        let this_head = self.lanes.get(&lane).filter(|l| l.head.offset == head);
        let elsewhere = this_head.is_some_and(|l| l.settled_elsewhere);
        let released_at = this_head.and_then(|l| l.released_at);
        let blocked = this_head.is_some_and(|l| l.blocked_elsewhere);
        let gone = matches!(done, Done::Gone { .. });
        match done {
            Done::Settled => self.release(&lane, head, None),
            // Settled already (see `Lane::settled_elsewhere`): whatever this attempt found.
            _ if elsewhere => self.release(&lane, head, released_at),
            // Held already (`Lane::blocked_elsewhere`), and this attempt did not deliver it.
            _ if blocked => self.park(&lane, head, now_ms()),
            Done::Parked => self.park(&lane, head, now_ms()),
            Done::Again { attempt, due_ms } | Done::Gone { attempt, due_ms } => {
                // Unless the head settled meanwhile (another process's marker, after a rebalance).
                if let Some(l) =
                    self.lanes.get_mut(&lane).filter(|l| l.head.offset == head && l.state == HeadState::InFlight)
                {
                    l.gone = gone;
                    l.state = HeadState::Waiting;
                    l.attempt = l.attempt.max(attempt);
                    l.due_ms = due_ms;
                    if self.head_bytes > MAX_HEAD_BYTES / 2 && l.head.value.len() > SMALL_HEAD {
                        // Failing heads give way to new ones: read back at their next attempt.
                        self.head_bytes -= l.evict();
                    }
                    self.timers.insert((due_ms, head));
                    self.keys.set(self.id, &lane, l.blocked(&lane));
                    if l.skip {
                        self.skip_now(&lane);
                    }
                }
            }
        }
        if self.unread.is_empty() {
            self.commit();
        } else {
            self.apply_unread();
        }
    }

    /// Lets a held key go on once its subscription no longer holds keys (it was deleted, or no
    /// longer says `"on_dead_letter": "block"`), or once it has been held longer than
    /// `limits.max_hold`; otherwise it would hold the partition's commit point for good, and
    /// with it every tenant's records of the partition on disk. A key waiting for a retry
    /// whose subscription was deleted is attempted now, for the same reason (the attempt finds
    /// the subscription gone and lets it go): its retry could be a day off.
    async fn sweep(&mut self) {
        if !self.live {
            return;
        }
        // Skips written since the last look, while the cap still holds reading back.
        if self.lanes.len() >= self.limits.max_keys && !self.unread.is_empty() {
            self.look_ahead();
        }
        let max_hold = i64::try_from(crate::model::whole_millis(self.limits.max_hold)).unwrap_or(i64::MAX);
        let oldest_held = now_ms().saturating_sub(max_hold);
        let loose = |seq: &Self| -> Vec<LaneId> {
            seq.lanes
                .iter()
                .filter(|(id, l)| {
                    l.state == HeadState::Parked && (!seq.deliverer.holds(&id.subscription) || l.held_ms < oldest_held)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        let orphaned = |seq: &Self| -> Vec<LaneId> {
            let soon = now_ms() + SWEEP.as_millis() as i64;
            seq.lanes
                .iter()
                .filter(|(id, l)| {
                    l.state == HeadState::Waiting && l.due_ms > soon && seq.deliverer.gone(&id.subscription)
                })
                .map(|(id, _)| id.clone())
                .collect()
        };
        if loose(self).is_empty() && orphaned(self).is_empty() {
            return;
        }
        // Judged again once caught up with the catalog: a subscription missing here may be one
        // made through another process since this one last read, not one deleted — taken for
        // deleted, its held keys went on past their dead-lettered heads. Boxed: rare.
        let deliverer = self.deliverer.clone();
        if !Box::pin(deliverer.catalog_caught_up()).await {
            return;
        }
        for lane in orphaned(self) {
            self.due_now(&lane);
        }
        let loose = loose(self);
        if loose.is_empty() {
            return;
        }
        tracing::warn!(
            partition = self.partition,
            keys = loose.len(),
            "held keys go on: their subscription no longer holds keys, or they were held past log.retention"
        );
        for lane in loose {
            self.skip_now(&lane);
        }
    }

    /// Makes `lane`'s head, waiting for its due time, due now.
    fn due_now(&mut self, lane: &LaneId) {
        let Some(l) = self.lanes.get_mut(lane) else { return };
        if l.state != HeadState::Waiting {
            return;
        }
        self.timers.remove(&(l.due_ms, l.head.offset));
        l.due_ms = now_ms();
        self.timers.insert((l.due_ms, l.head.offset));
    }

    /// Looks for operators' skips past the records left unread at the cap (see `ahead`): in
    /// those read already at once, in the log past them in a pass.
    fn look_ahead(&mut self) {
        if !self.live || self.ahead.is_some() {
            return;
        }
        // The records left unread run on from the last one applied: every record before a
        // skip among them is among them.
        let unread = self.unread_markers();
        let mut latest = Latest::default();
        self.apply_ahead(unread, &mut latest);
        let unread_end = self.unread.back().map_or(self.read_to, |r| r.offset + 1);
        if self.ahead_to < unread_end {
            // Reading went past what earlier looks saw: look again from the unread ones' end.
            self.ahead_to = unread_end;
            self.latest_ahead = Latest::default();
        }
        let (log, topic, partition, from) = (self.log.clone(), self.topic.clone(), self.partition, self.ahead_to);
        self.ahead = Some(async move { markers_from(&*log, &topic, partition, from).await }.boxed());
    }

    /// A look ahead found `markers` from `started` to `to`: skips among them act now if they
    /// would in their turn, the latest marker of each key being kept in `latest_ahead`.
    fn looked(&mut self, markers: Vec<(u64, Marker)>, started: u64, to: u64) {
        if started != self.ahead_to {
            return; // looked again from elsewhere meanwhile
        }
        self.ahead_to = to;
        // Before these: the records left unread, then what earlier looks saw (later, so theirs
        // are the latest).
        let mut latest = Latest::default();
        for (_, m) in self.unread_markers() {
            latest.note(m);
        }
        latest.overflow |= self.latest_ahead.overflow;
        for m in std::mem::take(&mut self.latest_ahead.by_key).into_values() {
            latest.note(m);
        }
        self.apply_ahead(markers, &mut latest);
        self.latest_ahead = latest;
    }

    /// The markers among the records left unread, in order.
    fn unread_markers(&self) -> Vec<(u64, Marker)> {
        (self.unread.iter())
            .filter(|r| r.offset >= self.read_to)
            .filter_map(|r| Some((r.offset, Marker::decode(r.value.clone())?)))
            .collect()
    }

    /// Applies, ahead of their turn, the skips among `markers` (in offset order) that act now
    /// as they would in their turn ([`acts_ahead`]); the others wait for it. `latest`: each
    /// key's latest marker in what lies between the first record left unread and `markers`,
    /// brought up to date with `markers`.
    fn apply_ahead(&mut self, markers: Vec<(u64, Marker)>, latest: &mut Latest) {
        // A key with a marker still to be read before the skip (another writer's: a takeover's
        // replay that went live at the cap leaves the last owner's — a key's head settled, the
        // next one held — behind the records it stopped at) may have moved on by then.
        for (offset, marker) in markers {
            let Marker::Skip { lane, event } = &marker else {
                latest.note(marker);
                continue;
            };
            if offset < self.read_to || self.applied_ahead.contains(&offset) {
                continue;
            }
            let l = self.lanes.get(lane);
            let unsure = latest.overflow || latest.by_key.get(lane).is_some_and(|m| would_move(m, l));
            if acts_ahead(l, event.as_deref(), unsure) {
                self.applied_ahead.insert(offset);
                self.mark(marker, now_ms());
            }
        }
    }

    /// Replay is over: skips read during it act now.
    fn replayed(&mut self) {
        let skipped: Vec<LaneId> = self.lanes.iter().filter(|(_, l)| l.skip).map(|(id, _)| id.clone()).collect();
        for lane in skipped {
            self.skip_now(&lane);
        }
    }

    /// Commits up to the oldest head still outstanding (or all that was read).
    fn commit(&mut self) {
        let held_back = self.deferred.front().map_or(self.read_to, |(_, rec)| rec.offset);
        let floor = self.heads.keys().next().copied().unwrap_or(self.read_to).min(self.read_to).min(held_back);
        if floor > self.committed {
            self.committed = floor;
            self.committer.commit(floor);
        }
    }

    async fn drain(&mut self) {
        let drained = tokio::time::timeout(self.limits.drain, async {
            while let Some((lane, head, done, marker)) = self.attempts.next().await {
                self.attempted(head);
                self.ended(lane, head, done, marker);
            }
            // Every marker of an attempt made is written before the partition goes.
            loop {
                self.mark_more();
                let Some(marking) = self.marking.take() else { break };
                for (lane, head, done) in marking.await {
                    self.finished(lane, head, done);
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                partition = self.partition,
                "stopped with ordered attempts in flight; they will be made again"
            );
        }
        self.deliverer.history_synced().await;
    }
}

impl Drop for Sequencer {
    /// Its keys are no longer blocked here once it goes, drained or not (a sequencer that
    /// panicked left them listed; the next one of the partition lists its own).
    fn drop(&mut self) {
        for lane in self.lanes.keys() {
            self.keys.set(self.id, lane, None);
        }
        self.keys.hold(self.id, 0);
    }
}

/// A record held in memory for longer than it was read for: copied out of the read buffer it
/// came in (a slice of up to 256 KiB of the embedded log's), which it would keep whole.
fn owned(mut rec: LogRecord) -> LogRecord {
    rec.value = Bytes::copy_from_slice(&rec.value);
    rec
}

/// Holds `l`'s new head's record in memory ([`owned`]) if the partition's heads leave room,
/// else lets it go (it is read back when attempted).
fn take_in(head_bytes: &mut usize, l: &mut Lane) {
    let len = l.head.value.len();
    if len <= SMALL_HEAD || *head_bytes + len <= MAX_HEAD_BYTES {
        *head_bytes += len;
        l.head = owned(l.head.clone());
    } else {
        l.evict();
    }
}

/// Attempts a head (supervised like any delivery: a second panic dead-letters it), and says
/// what became of it with the marker to write before that takes effect.
fn attempt_head(
    deliverer: Arc<Deliverer>,
    shares: Arc<Shares>,
    from: ReadBack,
    lane: LaneId,
    head: u64,
    attempt: u32,
    rec: HeadRecord,
) -> Finished {
    async move {
        let rec = match rec.fetch(&from).await {
            Ok(Some(rec)) => rec,
            Ok(None) if deliverer.gone(&lane.subscription) => {
                // Its subscription deleted too: nothing is left to send it to, or to skip it.
                let marker = Marker::Settled { lane: lane.clone(), head, released: false };
                return (lane, head, Done::Settled, Some(marker));
            }
            Ok(None) => {
                // Gone from the log (its retention passed while it waited): not settled
                // silently — the key stays blocked, listed, until an operator skips it.
                tracing::error!(partition = from.partition, offset = head, subscription = %lane.subscription, "an ordered head's record is no longer in the log (past its retention?); its key waits for an operator's skip");
                return (lane, head, Done::Gone { attempt, due_ms: now_ms() + 60_000 }, None);
            }
            Err(e) => {
                tracing::error!(partition = from.partition, offset = head, error = %e, "reading an ordered head back failed; trying again");
                return (lane, head, Done::Again { attempt, due_ms: now_ms() + 1000 }, None);
            }
        };
        let mut settled = match deliverer.process_supervised(&rec, super::Waits::InLane, &shares, &mut Cut::never()).await {
            Ok(s) => s,
            // Boxed: rare, and it would add to every head's future.
            Err(_) => {
                let message = "processing an ordered delivery panicked twice".to_string();
                Box::pin(deliverer.park_panicked(&rec, message, super::Waits::InLane)).await
            }
        };
        // Durable before the marker this head's end makes (the attempt is never made again
        // once that is).
        deliverer.record_now(&mut settled).await;
        let (done, marker) = match settled.settlement {
            // `Superseded` is never an ordered head's (its retries are not looked up): settled
            // like a delivery should that change.
            Settlement::Delivered | Settlement::Dropped | Settlement::Superseded { .. } => {
                (Done::Settled, Some(Marker::Settled { lane: lane.clone(), head, released: false }))
            }
            Settlement::DeadLettered { .. } if deliverer.holds(&lane.subscription) => {
                (Done::Parked, Some(Marker::Blocked { lane: lane.clone(), head }))
            }
            Settlement::DeadLettered { .. } => {
                (Done::Settled, Some(Marker::Settled { lane: lane.clone(), head, released: false }))
            }
            Settlement::Rescheduled { attempt, due_ms, .. } => {
                (Done::Again { attempt, due_ms }, Some(Marker::Attempted { lane: lane.clone(), head, attempt, due_ms }))
            }
            // No attempt was used: it is tried again as it is, at its time.
            Settlement::Deferred { due_ms, .. } => (Done::Again { attempt, due_ms }, None),
        };
        (lane, head, done, marker)
    }
    .boxed()
}

/// Whether an operator's skip of `lane`'s head (naming `event`, if it does), read ahead of its
/// turn, acts now as it would in its turn: the key is open and its head not being looked for
/// (a skip then is cleared when the next head is found); a skip naming the head's event acts
/// on it whatever comes before; one naming none only when nothing before it could move the
/// key on (`unsure`: a marker for it lies before the skip).
fn acts_ahead(lane: Option<&Lane>, event: Option<&str>, unsure: bool) -> bool {
    let Some(l) = lane.filter(|l| l.state != HeadState::Scanning) else { return false };
    match event {
        Some(e) => e == l.event,
        None => !unsure,
    }
}

/// Whether a marker read would move `lane` from where it stands (one this sequencer wrote
/// has: it acted when written; a key being looked for is left to its turn anyway).
fn would_move(marker: &Marker, lane: Option<&Lane>) -> bool {
    match (marker, lane.filter(|l| l.state != HeadState::Scanning)) {
        (_, None) | (Marker::Skip { .. }, _) => false,
        (Marker::Settled { head, .. }, Some(l)) => l.head.offset == *head,
        (Marker::Blocked { head, .. }, Some(l)) => l.head.offset == *head && l.state != HeadState::Parked,
        (Marker::Attempted { head, attempt, due_ms, .. }, Some(l)) => {
            l.head.offset == *head && (*attempt, *due_ms) > (l.attempt, l.due_ms)
        }
    }
}

/// Keys whose latest marker a look ahead keeps at most (past it, only skips naming their head
/// act ahead of their turn).
const AHEAD_KEYS: usize = 50_000;

/// The latest marker (not a skip) of each key, in records looked at ahead of their turn.
#[derive(Default)]
struct Latest {
    by_key: HashMap<LaneId, Marker>,
    /// More keys than [`AHEAD_KEYS`] had one.
    overflow: bool,
}

impl Latest {
    /// Takes `m` as its key's latest (a skip is not kept).
    fn note(&mut self, m: Marker) {
        if matches!(m, Marker::Skip { .. }) {
            return;
        }
        if self.by_key.len() >= AHEAD_KEYS && !self.by_key.contains_key(m.lane()) {
            self.overflow = true;
            return;
        }
        self.by_key.insert(m.lane().clone(), m);
    }
}

/// Pages one look ahead reads at most: on a partition appended to as fast as it is read, a
/// look that went on to the end would never report.
const AHEAD_PAGES: usize = 64;

/// The markers in `partition` from `from`, where the look started (`from`), and where it ended
/// (the end, or as far as it read: the next look goes on from there).
async fn markers_from(log: &dyn Log, topic: &str, partition: u32, mut from: u64) -> (Vec<(u64, Marker)>, u64, u64) {
    let started = from;
    let mut markers = Vec::new();
    for _ in 0..AHEAD_PAGES {
        match log.read_partition(topic, partition, from, SCAN_PAGE).await {
            Ok((records, next)) => {
                for rec in records {
                    from = from.max(rec.offset + 1);
                    if let Some(marker) = Marker::decode(rec.value) {
                        markers.push((rec.offset, marker));
                    }
                }
                match next {
                    Some(next) => from = from.max(next),
                    None => return (markers, started, from),
                }
            }
            Err(e) => {
                tracing::warn!(topic, partition, error = %e, "looking for skips past the cap of keys failed; looking again later");
                return (markers, started, from);
            }
        }
    }
    (markers, started, from)
}

/// What one pass over the log found for a lane.
struct Found {
    /// Its next deliveries, copied out of the reads they came in ([`owned`]).
    records: Vec<LogRecord>,
    /// Where the lane looks on from for more.
    look_on_from: u64,
    /// The pass stopped taking the lane's deliveries before it had all it wanted: with none
    /// taken, its next head is there and is looked for in the next pass.
    cut: bool,
}

/// Bytes a record held back (see [`Sequencer::deferred`]) counts for.
fn deferred_size(lane: &LaneId, rec: &LogRecord) -> usize {
    rec.value.len() + lane.subscription.len() + lane.key.len() + 64
}

/// Reads `partition` (below `to`, what the sequencer has read) for the next deliveries of
/// each lane in `wants` (from where its last one was, as many as it wants, below where its
/// records not counted yet begin), in one pass from the lowest of those offsets; returns what
/// each lane found and where to look on for it.
/// Each lane's first (its next head) is taken whatever the rest's budget, small ones always,
/// larger ones while they come to [`MAX_HEAD_BYTES`] in the pass (and the pass's first, so
/// that each makes headway); the rest, to be held, only while they come to no more than
/// `budget` bytes in all. A lane cut short looks on from its last one found, or from the head
/// it was not given.
async fn scan(
    log: &dyn Log,
    topic: &str,
    partition: u32,
    wants: HashMap<LaneId, (u64, usize, u64)>,
    to: u64,
    mut budget: usize,
) -> HashMap<LaneId, Found> {
    let mut from = wants.values().map(|(from, _, _)| *from).min().unwrap_or(to);
    let to = to.min(wants.values().map(|(_, _, below)| *below).max().unwrap_or(to));
    let end = |lane: &LaneId| wants[lane].2.min(to);
    let mut found: HashMap<LaneId, Found> = wants
        .keys()
        .map(|lane| (lane.clone(), Found { records: Vec::new(), look_on_from: end(lane), cut: false }))
        .collect();
    let mut heads_budget = MAX_HEAD_BYTES;
    let mut taken = false;
    let mut unsatisfied = wants.len();
    let mut failures = 0;
    'pages: while from < to && unsatisfied > 0 {
        match log.read_partition(topic, partition, from, SCAN_PAGE).await {
            Ok((records, next)) => {
                for rec in records {
                    if rec.offset >= to {
                        break 'pages;
                    }
                    from = rec.offset + 1;
                    if Marker::decode(rec.value.clone()).is_some() {
                        continue;
                    }
                    let Ok(d) = Delivery::decode(rec.value.clone()) else { continue };
                    let lane = LaneId { subscription: d.subscription, key: d.ordering_key.unwrap_or_default() };
                    let Some(&(start, want, below)) = wants.get(&lane) else { continue };
                    let f = found.get_mut(&lane).expect("every wanted lane");
                    if rec.offset < start || rec.offset >= below || f.records.len() == want || f.cut {
                        continue;
                    }
                    let len = rec.value.len();
                    let (room, large) = match f.records.is_empty() {
                        true => (&mut heads_budget, len > SMALL_HEAD),
                        false => (&mut budget, true),
                    };
                    if large {
                        if len > *room && (taken || !f.records.is_empty()) {
                            // Held no more: it is looked for again (a head in the next pass,
                            // the rest once the buffer runs dry).
                            if f.records.is_empty() {
                                f.look_on_from = rec.offset;
                            }
                            f.cut = true;
                            unsatisfied -= 1;
                            continue;
                        }
                        *room = room.saturating_sub(len);
                    }
                    taken = true;
                    f.look_on_from = rec.offset + 1;
                    f.records.push(owned(rec));
                    if f.records.len() == want {
                        unsatisfied -= 1;
                    }
                }
                match next {
                    Some(next) => from = from.max(next),
                    None => break,
                }
            }
            Err(e) => {
                // Never taken for "nothing found": that would let later deliveries go first.
                failures = (failures + 1).min(50);
                tracing::error!(topic, partition, error = %e, "reading ordered keys' next deliveries failed; retrying");
                tokio::time::sleep(Duration::from_millis(100 * failures)).await;
            }
        }
    }
    // A lane that found fewer than it wanted, and was not cut short, has none left below its end.
    for (lane, f) in found.iter_mut() {
        if f.records.len() < wants[lane].1 && !f.cut {
            f.look_on_from = end(lane);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An embedded log with one ordered topic, "o", of one partition.
    async fn ordered_log(dir: &std::path::Path) -> Arc<crate::log::embedded::EmbeddedLog> {
        let spec = crate::log::TopicSpec { keyed: true, ..crate::log::TopicSpec::for_tests("o", 1) };
        crate::log::embedded::EmbeddedLog::for_tests(dir, vec![spec]).await
    }

    /// A delivery of `key`'s with a body of `bytes`, as the ordered topic holds it.
    fn keyed_record(event: String, key: String, bytes: usize) -> Record {
        let d =
            Delivery::first_attempt(event, "sub_1".into(), "t".into(), "T".into(), Bytes::from(vec![b'x'; bytes]), 0);
        let d = Delivery { ordering_key: Some(key), ..d };
        Record { key: Bytes::from_static(b"sub_1"), value: d.encode() }
    }

    /// The next heads one pass finds are bounded too: taken whatever their size, 200 keys'
    /// settling in one pass returned 50 MiB of heads at once (and each, a slice of its read,
    /// kept that read's window), a tenant's keys of large events one partition's gigabytes.
    #[tokio::test]
    async fn a_pass_holds_a_bounded_number_of_bytes_of_next_heads() {
        let dir = tempfile::tempdir().unwrap();
        let log = ordered_log(dir.path()).await;
        let lane = |k: usize| LaneId { subscription: "sub_1".into(), key: format!("k{k}") };
        let records: Vec<Record> =
            (0..200).map(|k| keyed_record(format!("e{k}"), format!("k{k}"), 256 << 10)).collect();
        for chunk in records.chunks(20) {
            log.append("o", chunk.to_vec()).await.unwrap();
        }
        let wants = (0..200).map(|k| (lane(k), (0, BUFFER, u64::MAX))).collect();
        let found = scan(&*log, "o", 0, wants, 200, 0).await;
        let bytes: usize = found.values().flat_map(|f| &f.records).map(|r| r.value.len()).sum();
        assert!(bytes <= MAX_HEAD_BYTES, "{bytes} bytes of heads found in one pass");
        let cut: HashMap<LaneId, (u64, usize, u64)> = found
            .iter()
            .filter(|(_, f)| f.records.is_empty())
            .map(|(lane, f)| {
                assert!(f.cut, "{lane:?} was cut short, its head not found for it");
                (lane.clone(), (f.look_on_from, BUFFER, u64::MAX))
            })
            .collect();
        assert!(!cut.is_empty() && cut.len() < 200, "{} of 200 cut short", cut.len());
        let next = scan(&*log, "o", 0, cut.clone(), 200, 0).await;
        for (lane, (from, _, _)) in &cut {
            let f = next[lane].records.first().map(|r| r.offset);
            assert!(f.is_none() || f == Some(*from), "{lane:?} found its head where it was left");
        }
        assert!(next.values().any(|f| !f.records.is_empty()), "the next pass makes headway");
    }

    /// Lanes released while the partition was below its limit each ask for a buffer's worth;
    /// found in one pass, what they get to hold stays within what is left of the limit (plus
    /// each one's next head), and one cut short looks on from its last one found.
    #[tokio::test]
    async fn a_pass_for_many_lanes_holds_no_more_than_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let log = ordered_log(dir.path()).await;
        let lane = |k: usize| LaneId { subscription: "sub_1".into(), key: format!("k{k}") };
        let records: Vec<Record> = (0..10)
            .flat_map(|i| (0..10).map(move |k| keyed_record(format!("e{k}-{i}"), format!("k{k}"), 1000)))
            .collect();
        let size = records[0].value.len();
        log.append("o", records).await.unwrap();
        let wants = (0..10).map(|k| (lane(k), (0, BUFFER, u64::MAX))).collect();
        let found = scan(&*log, "o", 0, wants, 100, 5 * size).await;
        let held: usize = found.values().map(|f| f.records.iter().skip(1).map(|r| r.value.len()).sum::<usize>()).sum();
        assert!(held <= 5 * size, "{held} bytes held beyond the heads, budget {}", 5 * size);
        for (lane, Found { records, look_on_from, .. }) in &found {
            assert!(!records.is_empty(), "{lane:?} found its next head");
            assert_eq!(*look_on_from, records.last().unwrap().offset + 1, "{lane:?} looks on from its last one found");
        }
        let all = (0..10).map(|k| (lane(k), (0, BUFFER, u64::MAX))).collect();
        let unbounded = scan(&*log, "o", 0, all, 100, usize::MAX).await;
        assert!(
            unbounded.values().all(|f| f.records.len() == 10 && f.look_on_from == 100),
            "with room, each found all ten"
        );
    }

    /// A sequencer of the one-partition ordered topic of `log`, live, with nothing read yet.
    async fn live_sequencer(log: Arc<crate::log::embedded::EmbeddedLog>) -> Sequencer {
        use crate::transport::{HttpSettings, NetworkGuard, Transports};
        let mut consumer = log.consume("g", "o").await.unwrap();
        let Some(crate::log::Assignment::Assigned(reader)) = consumer.next_assignment().await else {
            panic!("the partition assigned")
        };
        let registry = Arc::new(crate::registry::Registry::stubbed());
        let transports =
            Transports::new(NetworkGuard::new(Vec::new()), &HttpSettings::default(), Duration::from_secs(1));
        let log: Arc<dyn Log> = log;
        let retrier = crate::retry::Retrier::new(log.clone(), "t".into(), "dlq".into());
        let deliverer =
            Arc::new(Deliverer::new(registry.clone(), transports, super::super::Settler::new(registry, retrier)));
        let limits = ShardLimits {
            window: 8,
            max_uncommitted: 1000,
            batch: 100,
            max_keys: 1000,
            max_hold: Duration::from_secs(3600),
            drain: Duration::from_secs(1),
        };
        let mut seq = Sequencer::new(reader, "o".into(), log, deliverer, limits, Arc::default(), 0);
        seq.live = true;
        seq
    }

    /// A record of the ordered topic at `offset`.
    fn read_at(offset: u64, record: Record) -> LogRecord {
        LogRecord { partition: 0, offset, timestamp_ms: 0, key: record.key, value: record.value }
    }

    /// While one key's next deliveries are looked for in the log, other keys' records go on
    /// being applied: the pass waited for stopped the whole partition, so a tenant's sparse
    /// key, whose look read millions of records, held up every other tenant's ordered
    /// deliveries on it. The looking key's own records (a marker settling its next head, read
    /// before the pass found that head) wait for the pass, and hold the commit point.
    #[tokio::test]
    async fn other_keys_go_on_while_one_key_s_next_deliveries_are_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        let mut seq = live_sequencer(ordered_log(dir.path()).await).await;
        let looking = LaneId { subscription: "sub_1".into(), key: "a".into() };
        let other = LaneId { subscription: "sub_1".into(), key: "b".into() };
        // Key a: its head at 0, and its next (at 1) waiting in the log, unbuffered; a pass for
        // it under way.
        seq.unread.push_back(read_at(0, keyed_record("e0".into(), "a".into(), 10)));
        seq.apply_unread();
        let l = seq.lanes.get_mut(&looking).unwrap();
        l.state = HeadState::Scanning;
        l.waiting = 1;
        seq.read_to = 2;
        seq.scan = Some(futures::future::pending().boxed());
        // Read meanwhile: key b's first delivery, and the marker settling key a's next head.
        seq.unread.push_back(read_at(2, keyed_record("e2".into(), "b".into(), 10)));
        let settled = Marker::Settled { lane: looking.clone(), head: 1, released: false };
        seq.unread.push_back(read_at(3, settled.record()));
        seq.apply_unread();
        assert!(seq.lanes.contains_key(&other), "key b waited for key a's pass");
        assert_eq!(seq.read_to, 4);
        assert_eq!(seq.deferred.len(), 1, "key a's marker waits for its head");
        assert_eq!(seq.committed, 0, "committed past the head");
        // The pass finds key a's next head: then the marker settling it is applied.
        let found =
            Found { records: vec![read_at(1, keyed_record("e1".into(), "a".into(), 10))], look_on_from: 2, cut: false };
        seq.scanned(HashMap::from([(looking.clone(), found)]));
        assert!(seq.deferred.is_empty());
        assert!(!seq.lanes.contains_key(&looking), "its next head, settled by the marker read, is done");
        assert_eq!(seq.heads.keys().copied().collect::<Vec<_>>(), vec![2], "key b's head is the commit floor");
        assert_eq!(seq.committed, 2);
    }

    /// A pass looks for a key's next deliveries only below its first record held back for
    /// it: past it, it found that record too (held, then applied again when let go: sent
    /// twice), and when it found fewer than the key's count it went on from past it for good
    /// (counted, never found: lost).
    #[tokio::test]
    async fn a_pass_looks_for_a_key_s_deliveries_only_below_those_held_back() {
        let dir = tempfile::tempdir().unwrap();
        let log = ordered_log(dir.path()).await;
        let records: Vec<Record> = [("e0", "a"), ("e1", "a"), ("e2", "a"), ("e3", "b")]
            .into_iter()
            .map(|(event, key)| keyed_record(event.into(), key.into(), 10))
            .collect();
        log.append("o", records).await.unwrap();
        let mut seq = live_sequencer(log.clone()).await;
        let looking = LaneId { subscription: "sub_1".into(), key: "a".into() };
        let all = log.read_partition("o", 0, 0, 10).await.unwrap().0;
        seq.unread.push_back(all[0].clone());
        seq.apply_unread();
        // Key a's head settled; it counts two more waiting (one more than the log holds below
        // what is read next: a count off, or a record past retention) and looks for them.
        let l = seq.lanes.get_mut(&looking).unwrap();
        (l.state, l.waiting, l.scan_from) = (HeadState::Scanning, 2, 1);
        seq.read_to = 2;
        seq.needy.insert(looking.clone(), (1, 2));
        seq.unread.extend(all[2..].iter().cloned());
        seq.apply_unread();
        assert_eq!(seq.deferred.len(), 1, "key a's e2 held back");
        seq.scan_more();
        let found = seq.scan.as_mut().expect("a pass").await;
        assert_eq!(found[&looking].records.iter().map(|r| r.offset).collect::<Vec<_>>(), vec![1], "below e2 only");
        assert_eq!(found[&looking].look_on_from, 2, "goes on from e2, not past it");
        seq.scanned(found);
        let l = &seq.lanes[&looking];
        assert_eq!((l.head.offset, l.scan_from), (1, 2));
        assert!(l.buffered.iter().all(|r| r.offset != 2), "e2 held and counted again");
    }

    /// A head whose record is gone from the log, of a subscription deleted too, is let go at
    /// its attempt: waiting for a skip, it held the key and the partition's commit point for
    /// good, looked at again every minute (every sweep, once its subscription was deleted).
    #[tokio::test]
    async fn a_gone_head_of_a_deleted_subscription_is_let_go_at_its_attempt() {
        use crate::transport::{HttpSettings, NetworkGuard, Transports};
        let log: Arc<dyn Log> = Arc::new(crate::log::stub::Stub::new(true, true));
        let registry = Arc::new(crate::registry::Registry::stubbed());
        let transports =
            Transports::new(NetworkGuard::new(Vec::new()), &HttpSettings::default(), Duration::from_secs(1));
        let retrier = crate::retry::Retrier::new(log.clone(), "t".into(), "dlq".into());
        let deliverer =
            Arc::new(Deliverer::new(registry.clone(), transports, super::super::Settler::new(registry, retrier)));
        let lane = LaneId { subscription: "sub_deleted".into(), key: "k".into() };
        let at = AsAttempted { attempt: 2, due_ms: 0, budget_floor: 0 };
        let from = ReadBack { log, topic: "o".into(), partition: 0 };
        let shares = Arc::new(Shares::new(8));
        let (_, head, done, marker) = attempt_head(deliverer, shares, from, lane, 7, 2, HeadRecord::InLog(7, at)).await;
        assert_eq!(head, 7);
        assert!(matches!(done, Done::Settled), "let go");
        assert!(matches!(marker, Some(Marker::Settled { head: 7, .. })), "with its marker");
    }

    /// A head whose record is gone from the log waits for an operator's skip: it is listed
    /// blocked (`gone`) from its first attempt. Before, at attempt 1 it was never listed, so
    /// nobody could see what to skip, and it held its partition's commit point for good.
    #[test]
    fn a_head_whose_record_is_gone_is_listed_for_a_skip() {
        let id = LaneId { subscription: "sub_1".into(), key: "k".into() };
        let d = Delivery::first_attempt("h1".into(), "sub_1".into(), "t".into(), "T".into(), Bytes::new(), 0);
        let rec = LogRecord { partition: 0, offset: 7, timestamp_ms: 0, key: Bytes::new(), value: d.encode() };
        let mut lane = Lane::new(rec, &d);
        assert!(lane.blocked(&id).is_none(), "a first attempt's head is not blocked");
        lane.gone = true;
        let listed = lane.blocked(&id).expect("listed");
        assert_eq!((listed.state, listed.attempts), ("gone", 0));
    }

    /// A skip read ahead of its turn acts only as it would in its turn: on an open key not
    /// being looked for, on the head it names, or — naming none — when no marker before it
    /// would move the key first (another writer's, read after a takeover that went live at
    /// the cap); markers this sequencer wrote move nothing when read back.
    #[test]
    fn a_skip_read_ahead_acts_only_as_it_would_in_its_turn() {
        let id = LaneId { subscription: "sub_1".into(), key: "k".into() };
        let d = Delivery::first_attempt("h1".into(), "sub_1".into(), "t".into(), "T".into(), Bytes::new(), 0);
        let rec = LogRecord { partition: 0, offset: 7, timestamp_ms: 0, key: Bytes::new(), value: d.encode() };
        let mut lane = Lane::new(rec, &d);
        assert!(acts_ahead(Some(&lane), Some("h1"), true), "names the head: acts whatever is before");
        assert!(!acts_ahead(Some(&lane), Some("h0"), false), "names another head");
        assert!(acts_ahead(Some(&lane), None, false));
        assert!(!acts_ahead(Some(&lane), None, true), "a marker before it may move the key");
        assert!(!acts_ahead(None, None, false), "a key not open yet waits for its turn");
        let settled = |head| Marker::Settled { lane: id.clone(), head, released: false };
        let blocked = Marker::Blocked { lane: id.clone(), head: 7 };
        assert!(would_move(&settled(7), Some(&lane)) && !would_move(&settled(3), Some(&lane)));
        assert!(would_move(&blocked, Some(&lane)));
        let again = |attempt, due_ms| Marker::Attempted { lane: id.clone(), head: 7, attempt, due_ms };
        assert!(would_move(&again(2, 100), Some(&lane)) && !would_move(&again(1, 0), Some(&lane)));
        // Kept as a key's latest marker, it is judged again at each skip: read while its own
        // append was settling (the head still in flight), then the head parked.
        let mut latest = Latest::default();
        for m in [settled(3), blocked.clone(), Marker::Skip { lane: id.clone(), event: None }] {
            latest.note(m);
        }
        lane.state = HeadState::InFlight;
        assert!(would_move(&latest.by_key[&id], Some(&lane)), "unsure while in flight");
        lane.state = HeadState::Parked;
        assert!(!would_move(&latest.by_key[&id], Some(&lane)), "its own Blocked, read back");
        assert!(!would_move(&blocked, Some(&lane)), "its own Blocked, read back");
        let mut many = Latest::default();
        for i in 0..=AHEAD_KEYS {
            many.note(Marker::Settled {
                lane: LaneId { subscription: "s".into(), key: i.to_string() },
                head: 0,
                released: false,
            });
        }
        assert!(many.overflow && many.by_key.len() == AHEAD_KEYS, "bounded, and then unsure for all");
        lane.state = HeadState::Scanning;
        assert!(!acts_ahead(Some(&lane), Some("h1"), false), "a skip is cleared when the next head is found");
        assert!(!would_move(&settled(7), Some(&lane)));
    }

    /// A partition's old sequencer may end (draining) after its new one started and listed
    /// the partition's held keys: what it clears as it goes is only what it set itself.
    #[test]
    fn an_old_sequencer_clears_only_the_blocked_keys_it_listed() {
        let keys = OrderedKeys::default();
        let lane = LaneId { subscription: "sub_1".into(), key: "k".into() };
        let view = || BlockedKey {
            subscription: "sub_1".into(),
            key: "k".into(),
            head_event: "e".into(),
            attempts: 2,
            state: "dead_lettered",
            next_attempt_at: None,
            waiting: 0,
            held: 0,
        };
        keys.set(1, &lane, Some(view())); // the old sequencer's
        keys.set(2, &lane, Some(view())); // the new one's, replaying
        keys.set(1, &lane, None); // the old one ends
        assert_eq!(keys.blocked("sub_1", None, 500).0.len(), 1, "still listed");
        keys.set(2, &lane, None);
        assert_eq!(keys.count(), 0);
    }

    #[test]
    fn markers_round_trip_and_nothing_else_reads_as_one() {
        let lane = LaneId { subscription: "sub_1".into(), key: "container-7".into() };
        for m in [
            Marker::Attempted { lane: lane.clone(), head: 42, attempt: 3, due_ms: 1_700_000_000_000 },
            Marker::Settled { lane: lane.clone(), head: 7, released: false },
            Marker::Settled { lane: lane.clone(), head: 7, released: true },
            Marker::Blocked { lane: lane.clone(), head: 9 },
            Marker::Skip { lane: lane.clone(), event: None },
            Marker::Skip { lane: lane.clone(), event: Some("evt_1".into()) },
        ] {
            let rec = m.record();
            assert_eq!(&rec.key[..], b"sub_1");
            assert_eq!(Marker::decode(rec.value.clone()), Some(m));
            for cut in 0..rec.value.len() - 1 {
                let _ = Marker::decode(rec.value.slice(..cut)); // no panic on any prefix
            }
        }
        let d = Delivery::first_attempt("e".into(), "s".into(), "t".into(), "x".into(), Bytes::new(), 0);
        assert_eq!(Marker::decode(d.encode()), None);
        // A release is one more byte, after what versions before it read (they ignore it).
        let plain = Marker::Settled { lane: lane.clone(), head: 7, released: false }.record().value;
        let released = Marker::Settled { lane, head: 7, released: true }.record().value;
        assert_eq!((&released[..plain.len()], released.len()), (&plain[..], plain.len() + 1));
    }
}
