//! The dead-letter topic: entries (the contract's fields plus the delivery record, for
//! replay) and replay markers. Entry ids are derived from (tenant, subscription, event,
//! replay generation), so an entry written twice by a crash between append and commit lists once;
//! a marker makes a replayed entry leave the list and refuse a second replay.

use crate::log::{Log, LogError, Record};
use crate::model::{now_ms, DeadLetter, Delivery};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

const ENTRY: u8 = b'D';
const REPLAYED: u8 = b'R';

/// The id of the dead letter of one delivery generation. The tenant is in it: event ids are
/// a tenant's own, and a static webhook moved to another tenant keeps its subscription id — two
/// tenants' events of one id had one entry id, one tenant's entry hid the other's in every list
/// and a replay of one marked both. (Entries keep the id they were written with.)
pub fn entry_id(tenant: &str, subscription: &str, event_id: &str, generation: u32) -> String {
    let digest = Sha256::digest(format!("{tenant}\n{subscription}\n{event_id}\n{generation}").as_bytes());
    format!("dlq_{}", hex::encode(&digest[..12]))
}

/// Encodes an entry with the delivery record it parks.
pub fn encode_entry(entry: &DeadLetter, delivery: &Bytes) -> Bytes {
    let meta = serde_json::to_vec(entry).expect("dead letter serializes");
    let mut buf = BytesMut::with_capacity(5 + meta.len() + delivery.len());
    buf.put_u8(ENTRY);
    buf.put_u32_le(meta.len() as u32);
    buf.put_slice(&meta);
    buf.put_slice(delivery);
    buf.freeze()
}

fn encode_replayed(id: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(1 + id.len());
    buf.put_u8(REPLAYED);
    buf.put_slice(id.as_bytes());
    buf.freeze()
}

/// A record of the dead-letter topic.
#[derive(Debug, Clone)]
pub enum DlqRecord {
    /// A parked delivery.
    Entry {
        /// The listed fields.
        entry: Box<DeadLetter>,
        /// The delivery record, for replay.
        delivery: Bytes,
    },
    /// The entry with this id was replayed.
    Replayed(String),
}

/// Decodes a dead-letter record; `None` for bytes that are neither kind.
pub fn decode(mut bytes: Bytes) -> Option<DlqRecord> {
    if bytes.is_empty() {
        return None;
    }
    match bytes.get_u8() {
        ENTRY if bytes.len() >= 4 => {
            let len = bytes.get_u32_le() as usize;
            if bytes.len() < len {
                return None;
            }
            let meta = bytes.split_to(len);
            Some(DlqRecord::Entry { entry: Box::new(serde_json::from_slice(&meta).ok()?), delivery: bytes })
        }
        REPLAYED => Some(DlqRecord::Replayed(String::from_utf8(bytes.to_vec()).ok()?)),
        _ => None,
    }
}

/// What a replay asks for.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These entries; only among `subscription`'s when given (its partition alone is read).
    Ids {
        /// Entry ids.
        ids: Vec<String>,
        /// The subscription they belong to, when the caller knows it.
        subscription: Option<String>,
    },
    /// Every live entry of a subscription.
    Subscription(String),
}

/// Outcome of a replay.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ReplayReport {
    /// Entries re-enqueued.
    pub replayed: Vec<String>,
    /// Entries not re-enqueued, with why.
    pub skipped: Vec<Skipped>,
}

/// An entry a replay left alone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    /// The id asked for.
    pub id: String,
    /// `not_found`, `already_replayed`, `unreadable`, or what the caller's check refused
    /// (`subscription_deleted`, `subscription_disabled`).
    pub reason: &'static str,
}

/// Records read from the topic at a time: pages stream, the topic is never held whole.
const SCAN_CHUNK: usize = 1024;

/// Records one page of a list looks at, at most. A tenant's few entries behind another's
/// million would otherwise cost a read of the whole topic per page (and a console polls the
/// list); past this the page ends where the scan stopped, short or empty, with `next`.
pub const LIST_SCAN: usize = 10_000;

/// Bytes of records one page of a list reads, at most (an entry holds its delivery, payload
/// and all): 10,000 entries of a megabyte were 10 GB read for one page.
const LIST_SCAN_BYTES: usize = 64 << 20;

/// How much one scan may look at before it stops where it is.
#[derive(Clone, Copy)]
struct Budget {
    records: usize,
    bytes: usize,
}

impl Budget {
    /// No bound: a scan that must see everything it was given (a replay).
    const WHOLE: Budget = Budget { records: usize::MAX, bytes: usize::MAX };
}

/// How old the replay markers read may be when listing (see `DeadLetters::read_markers`).
const LIST_MARKERS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

/// Entries replayed per append.
const REPLAY_CHUNK: usize = 1000;

/// Payload bytes replayed per append, at most (about; the entry that passes it is the last):
/// a thousand entries of a megabyte each held at once, then copied, was gigabytes per replay.
const REPLAY_CHUNK_BYTES: usize = 8 << 20;

/// Why an entry of a subscription may not be replayed now, if it may not (the caller's check:
/// deleted, disabled).
pub type Refuse<'a> = &'a (dyn Fn(&str, &str) -> Option<&'static str> + Sync);

/// Lists and replays dead letters, reading the topic a page at a time. The ids of replayed
/// entries (small: only what was replayed) are kept in memory, and brought up to date from
/// the topic's newer markers before each list or replay: on Kafka another process may have
/// replayed an entry since.
pub struct DeadLetters {
    log: Arc<dyn Log>,
    dlq_topic: String,
    deliveries_topic: String,
    /// Held by the task that appends a replay's deliveries and markers, not by the request:
    /// a request cancelled mid-append let the next replay read the markers before they were
    /// written, and send the same entries again.
    replays: Arc<tokio::sync::Mutex<()>>,
    /// Replayed entries' ids, each with where its marker is (partition and offset; the offset
    /// unknown, `u64::MAX`, until this process reads back a marker it wrote).
    replayed: std::sync::Mutex<HashMap<String, (u32, u64)>>,
    markers_read: tokio::sync::Mutex<MarkersRead>,
    /// Wakes the task that reads the markers a list left unread ([`DeadLetters::read_markers_behind`]).
    markers_wanted: Arc<tokio::sync::Notify>,
    /// Where a replayed delivery is recorded pending again, when history is kept.
    history: Option<Arc<dyn ReplayRecorder>>,
    /// Tenants with a replay under way ([`DeadLetters::replaying`]).
    replaying: crate::model::OneAtATime,
    /// Lists reading the topic: [`LISTS_AT_ONCE`] in all, one of a tenant's (the admin's
    /// counted as one tenant's). Each reads up to [`LIST_SCAN`] records of every tenant's
    /// entries, on the blocking threads the embedded log's reads share: a tenant key polling
    /// in a loop had as many reading at once as it sent.
    lists: crate::model::TakenInTurns,
}

impl Drop for DeadLetters {
    /// Wakes the task reading markers behind, which then finds this gone and ends.
    fn drop(&mut self) {
        self.markers_wanted.notify_one();
    }
}

/// Lists of dead letters reading the topic at once, all tenants' (see `DeadLetters::lists`).
const LISTS_AT_ONCE: usize = 4;

/// How far the replay markers have been read, and when the ids of those retention deleted
/// were last let go.
#[derive(Default)]
struct MarkersRead {
    /// Per partition, how far its markers have been read into `replayed` (empty: not yet).
    to: Vec<u64>,
    /// When they were last read.
    at: Option<std::time::Instant>,
    /// When the ids of markers no longer in the topic were last let go.
    pruned: Option<std::time::Instant>,
}

/// How often the ids of replayed entries are looked over for those retention deleted (a read
/// of one record per partition).
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Records replayed deliveries as pending again (the delivery history; the server wires it,
/// so this module needs nothing of the history's).
#[async_trait::async_trait]
pub trait ReplayRecorder: Send + Sync {
    /// `replayed` were enqueued again at `at_ms`; durable once this returns.
    async fn pending(&self, replayed: &[Delivery], at_ms: i64) -> Result<(), LogError>;
}

/// Bytes a log counts beside a record's key and value against its size limit (Kafka: about
/// 36 of the record's own, 61 of its batch's).
const RECORD_FRAMING: usize = 128;

/// One entry read from the topic.
struct Found {
    position: (u32, u64),
    entry: DeadLetter,
    delivery: Bytes,
}

impl DeadLetters {
    /// Dead letters in `dlq_topic`, replayed into `deliveries_topic`.
    pub fn new(log: Arc<dyn Log>, dlq_topic: String, deliveries_topic: String) -> Self {
        DeadLetters {
            log,
            dlq_topic,
            deliveries_topic,
            replays: Default::default(),
            replayed: Default::default(),
            markers_read: Default::default(),
            markers_wanted: Default::default(),
            history: None,
            replaying: Default::default(),
            lists: crate::model::TakenInTurns::new(LISTS_AT_ONCE, 1),
        }
    }

    /// Reads the replay markers in a task of its own, whatever a list leaves unread past its
    /// budget (the whole topic after a start, once a list is made: not read at every start
    /// whether anyone lists or not) — a list never waits for it, and shows what is known
    /// meanwhile.
    pub fn read_markers_behind(self: &Arc<Self>) {
        let (me, wanted) = (Arc::downgrade(self), self.markers_wanted.clone());
        tokio::spawn(async move {
            loop {
                wanted.notified().await;
                let Some(dead_letters) = me.upgrade() else { break };
                if let Err(e) = dead_letters.read_markers(std::time::Duration::ZERO, None).await {
                    tracing::warn!(error = %e, "reading the dead-letter topic's replay markers failed; read again at the next list");
                }
            }
        });
    }

    /// Starts a replay of `tenant`'s, unless one is under way (`None`): a replay by ids reads
    /// the dead-letter topic until it finds them (all of it, for an id that is not there),
    /// and a tenant key started thousands of such reads at its request rate.
    pub fn replaying(&self, tenant: &str) -> Option<crate::model::Running> {
        self.replaying.start(tenant)
    }

    /// Records each replayed delivery as pending in the delivery history too (as a resend
    /// does): until its attempt settles, the event no longer reads dead-lettered, so a
    /// recover meanwhile does not send it once more.
    pub fn recorded_by(mut self, history: Arc<dyn ReplayRecorder>) -> Self {
        self.history = Some(history);
        self
    }

    /// Reads the replay markers appended since the last read (by any process) into the ids
    /// replayed, unless that read is younger than `fresh`: the whole topic the first time,
    /// what is new after. A replay reads them all at once (a second replay of an entry must be
    /// refused, whichever process made the first); a list at most once a second (on Kafka
    /// each partition's end is a request to the broker, and a console polls the list), no
    /// more than `budget` of them a call, and not at all while another call reads them — the
    /// first list after a start read the whole topic, payloads and all, under this lock, and
    /// every tenant's lists waited (they may list an entry replayed meanwhile; its replay is
    /// refused all the same, as replays read every marker first).
    async fn read_markers(&self, fresh: std::time::Duration, budget: Option<Budget>) -> Result<(), LogError> {
        let mut read = match budget {
            None => self.markers_read.lock().await,
            Some(_) => match self.markers_read.try_lock() {
                Ok(read) => read,
                Err(_) => return Ok(()),
            },
        };
        if read.at.is_some_and(|at| at.elapsed() < fresh) {
            return Ok(());
        }
        let mut budget = budget.unwrap_or(Budget::WHOLE);
        let partitions = self.log.partitions(&self.dlq_topic)? as usize;
        read.to.resize(partitions, 0);
        let mut caught_up = true;
        'partitions: for (p, read_to) in read.to.iter_mut().enumerate() {
            // Its end first: cheaper than a read on Kafka, and most calls find nothing new.
            if self.log.end_offset(&self.dlq_topic, p as u32).await? <= *read_to {
                continue;
            }
            let mut from = Some(*read_to);
            while let Some(at) = from {
                if budget.records == 0 || budget.bytes == 0 {
                    caught_up = false;
                    break 'partitions;
                }
                let (records, next) = self.log.read_partition(&self.dlq_topic, p as u32, at, SCAN_CHUNK).await?;
                if let Some(last) = records.last() {
                    *read_to = last.offset + 1;
                }
                budget.records = budget.records.saturating_sub(records.len());
                budget.bytes = budget.bytes.saturating_sub(records.iter().map(|r| r.value.len()).sum());
                let ids = records.into_iter().filter_map(|r| match decode(r.value) {
                    Some(DlqRecord::Replayed(id)) => Some((id, (p as u32, r.offset))),
                    _ => None,
                });
                self.replayed.lock().unwrap().extend(ids);
                from = next;
            }
        }
        // Only once read to the end: a list cut short leaves the rest to the task reading
        // behind, or the next list.
        if caught_up {
            read.at = Some(std::time::Instant::now());
        } else {
            self.markers_wanted.notify_one();
        }
        if read.pruned.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            read.pruned = Some(std::time::Instant::now());
            // Not the request's failure: looked at again at the next.
            if let Err(e) = self.forget_deleted(partitions as u32).await {
                read.pruned = None;
                tracing::warn!(error = %e, "looking for replayed dead letters retention deleted failed");
            }
        }
        Ok(())
    }

    /// Lets go of the ids whose markers retention has deleted from the topic (their entries,
    /// before them in the same partition, went first), so the ids kept stay as many as the
    /// topic holds.
    async fn forget_deleted(&self, partitions: u32) -> Result<(), LogError> {
        for p in 0..partitions {
            let (first, _) = self.log.read_partition(&self.dlq_topic, p, 0, 1).await?;
            // Nothing left: everything below its end is gone.
            let start = match first.first() {
                Some(r) => r.offset,
                None => self.log.end_offset(&self.dlq_topic, p).await?,
            };
            self.replayed.lock().unwrap().retain(|_, (q, offset)| *q != p || *offset >= start);
        }
        Ok(())
    }

    fn is_replayed(&self, id: &str) -> bool {
        self.replayed.lock().unwrap().contains_key(id)
    }

    /// Partitions holding `subscription`'s entries (all of them when `None`).
    fn partitions(&self, subscription: Option<&str>) -> Result<Vec<u32>, LogError> {
        let n = self.log.partitions(&self.dlq_topic)?;
        Ok(match subscription {
            // Entries are keyed by subscription, so one subscription's are in one partition.
            Some(s) => vec![crate::log::partition_for(s.as_bytes(), n)],
            None => (0..n).collect(),
        })
    }

    /// Streams live entries of `partitions` (each up to its end offset, exclusive) after
    /// `after`, calling `take` until it says stop or `budget` is spent on records (of any
    /// kind) looked at; then the position of the last one looked at, where a next scan goes on.
    /// `replayed_too` streams replayed entries as well.
    async fn scan(
        &self,
        partitions: Vec<(u32, u64)>,
        after: Option<(u32, u64)>,
        mut budget: Budget,
        replayed_too: bool,
        mut take: impl FnMut(Found) -> std::ops::ControlFlow<()>,
    ) -> Result<Option<(u32, u64)>, LogError> {
        for (p, end) in partitions {
            let mut from = match after {
                Some((ap, _)) if ap > p => continue,
                // A position past any offset (not one this API gave out) has nothing after it.
                Some((ap, ao)) if ap == p => ao.checked_add(1),
                _ => Some(0),
            };
            while let Some(at) = from {
                if at >= end {
                    break;
                }
                let (records, next) = self.log.read_partition(&self.dlq_topic, p, at, SCAN_CHUNK).await?;
                for rec in records.into_iter().take_while(|r| r.offset < end) {
                    let position = (rec.partition, rec.offset);
                    budget.bytes = budget.bytes.saturating_sub(rec.value.len());
                    match decode(rec.value) {
                        Some(DlqRecord::Entry { entry, delivery }) if replayed_too || !self.is_replayed(&entry.id) => {
                            if take(Found { position, entry: *entry, delivery }).is_break() {
                                return Ok(None);
                            }
                        }
                        Some(_) => {}
                        None => tracing::warn!(
                            partition = position.0,
                            offset = position.1,
                            "unreadable dead-letter record skipped"
                        ),
                    }
                    // Counted once looked at: the next scan goes on after this one.
                    budget.records -= 1;
                    if budget.records == 0 || budget.bytes == 0 {
                        return Ok(Some(position));
                    }
                }
                from = next;
            }
        }
        Ok(None)
    }

    /// Live entries matching the filters after `after`, at most `limit`, and the cursor of
    /// the last one when more follow. Reads only as far as the page needs, and no more than
    /// [`LIST_SCAN`] records or [`LIST_SCAN_BYTES`]: a page cut short there ends with the
    /// cursor of where it stopped.
    pub async fn list(
        &self,
        subscription: Option<&str>,
        tenant: Option<&str>,
        after: Option<(u32, u64)>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<(u32, u64)>), LogError> {
        let _turn = self.lists.turn(tenant.unwrap_or_default()).await;
        self.read_markers(LIST_MARKERS_FRESH, Some(Budget { records: LIST_SCAN, bytes: LIST_SCAN_BYTES })).await?;
        // Positions and entries only: a page of 500 kept each payload (up to megabytes) too.
        let mut page: Vec<((u32, u64), DeadLetter)> = Vec::new();
        let mut seen = HashSet::new();
        let mut more = false;
        let partitions = self.partitions(subscription)?.into_iter().map(|p| (p, u64::MAX)).collect();
        let stopped = self
            .scan(partitions, after, Budget { records: LIST_SCAN, bytes: LIST_SCAN_BYTES }, false, |f| {
                let wanted = subscription.is_none_or(|s| f.entry.subscription == s)
                    && tenant.is_none_or(|t| f.entry.tenant == t);
                if !wanted || !seen.insert(f.entry.id.clone()) {
                    return std::ops::ControlFlow::Continue(());
                }
                if page.len() == limit {
                    more = true;
                    return std::ops::ControlFlow::Break(());
                }
                page.push((f.position, f.entry));
                std::ops::ControlFlow::Continue(())
            })
            .await?;
        let next = if more { page.last().map(|(position, _)| *position) } else { stopped };
        Ok((page.into_iter().map(|(_, entry)| entry).collect(), next))
    }

    /// Re-enqueues the selected entries with a fresh attempt budget (attempt 1, `max_age`
    /// from now), then marks them replayed. `tenant` limits what may be replayed; `refuse`
    /// says why an entry's subscription may not take it now (it is then skipped and stays).
    /// Only entries there when the replay began are replayed: one that fails again at once (a
    /// subscription answering 4xx, `max_attempts` 1) comes back as a new entry behind the
    /// scan, which a scan to the moving end replayed again, and again.
    /// Reading takes no lock, only marking does (`enqueue`): one replay's long read (ids
    /// looked for through the whole topic) does not hold up another's.
    pub async fn replay(
        &self,
        selection: Selection,
        tenant: Option<&str>,
        refuse: Refuse<'_>,
    ) -> Result<ReplayReport, LogError> {
        self.read_markers(std::time::Duration::ZERO, None).await?;
        let visible = |f: &Found| tenant.is_none_or(|t| f.entry.tenant == t);
        let (of, mut wanted): (Option<&str>, Option<HashSet<&str>>) = match &selection {
            Selection::Subscription(sub) => (Some(sub), None),
            Selection::Ids { ids, subscription } => {
                (subscription.as_deref(), Some(ids.iter().map(String::as_str).collect()))
            }
        };
        let mut partitions = Vec::new();
        for p in self.partitions(of)? {
            partitions.push((p, self.log.end_offset(&self.dlq_topic, p).await?));
        }
        let mut report = ReplayReport::default();
        let mut after = None;
        loop {
            // A chunk at a time: at most so many entries and so many payload bytes held.
            let (mut chunk, mut bytes, mut cut) = (Vec::<Found>::new(), 0, false);
            let mut seen = HashSet::new();
            // Ids asked for are looked for among replayed entries too, which `enqueue` then
            // skips as `already_replayed`: an entry is told replayed only to whom sees it (an
            // id replayed was `already_replayed` to any tenant that named it, which says it is
            // another's).
            self.scan(partitions.clone(), after, Budget::WHOLE, wanted.is_some(), |f| {
                let chosen = match &mut wanted {
                    Some(ids) => ids.contains(f.entry.id.as_str()),
                    None => true,
                };
                if !chosen || of.is_some_and(|s| f.entry.subscription != s) || !visible(&f) {
                    return std::ops::ControlFlow::Continue(());
                }
                if let Some(ids) = &mut wanted {
                    ids.remove(f.entry.id.as_str());
                }
                if seen.insert(f.entry.id.clone()) {
                    bytes += f.delivery.len();
                    chunk.push(f);
                }
                cut = chunk.len() == REPLAY_CHUNK || bytes >= REPLAY_CHUNK_BYTES;
                if cut || wanted.as_ref().is_some_and(|ids| ids.is_empty()) {
                    std::ops::ControlFlow::Break(())
                } else {
                    std::ops::ControlFlow::Continue(())
                }
            })
            .await?;
            after = chunk.last().map(|f| f.position);
            self.enqueue(chunk, refuse, &mut report).await?;
            // Also done once every id asked for is found, even by a chunk cut at its bound.
            if !cut || wanted.as_ref().is_some_and(|ids| ids.is_empty()) {
                break;
            }
        }
        if let (Selection::Ids { ids, .. }, Some(wanted)) = (&selection, wanted) {
            for id in ids.iter().filter(|id| wanted.contains(id.as_str())) {
                if !report.skipped.iter().any(|s| &s.id == id) {
                    report.skipped.push(Skipped { id: id.clone(), reason: "not_found" });
                }
            }
        }
        Ok(report)
    }

    /// Appends fresh deliveries for `entries`, then their replay markers (enqueue first: a
    /// crash between the two can only make a later replay repeat them). Both in a task of
    /// their own, the markers retried until they are taken: a request cancelled between the
    /// two (a client gone, the API's timeout on a long replay) or a failed marker append left
    /// deliveries enqueued without markers, which the operator's second try sent again.
    /// One at a time, after reading the markers again: what a replay running beside this one
    /// (here or in another process) marked while this one read is not sent twice.
    async fn enqueue(
        &self,
        entries: Vec<Found>,
        refuse: Refuse<'_>,
        report: &mut ReplayReport,
    ) -> Result<(), LogError> {
        if entries.is_empty() {
            return Ok(());
        }
        let one_at_a_time = self.replays.clone().lock_owned().await;
        self.read_markers(std::time::Duration::ZERO, None).await?;
        let now = now_ms();
        let max_record = self.log.max_record_bytes().unwrap_or(usize::MAX);
        let mut deliveries = Vec::new();
        let mut markers = Vec::new();
        let mut ids = Vec::new();
        let mut replayed = Vec::new();
        for f in entries {
            if self.is_replayed(&f.entry.id) {
                report.skipped.push(Skipped { id: f.entry.id, reason: "already_replayed" });
                continue;
            }
            if let Some(reason) = refuse(&f.entry.subscription, &f.entry.tenant) {
                report.skipped.push(Skipped { id: f.entry.id, reason });
                continue;
            }
            let Ok(old) = Delivery::decode(f.delivery.clone()) else {
                report.skipped.push(Skipped { id: f.entry.id.clone(), reason: "unreadable" });
                continue;
            };
            let fresh = Delivery { attempt: 1, due_ms: now, budget_ms: now, generation: old.generation + 1, ..old };
            let key = Bytes::copy_from_slice(fresh.subscription.as_bytes());
            let value = fresh.encode();
            // With room for the record's and its batch's framing, which the log counts too.
            if (key.len() + value.len()).saturating_add(RECORD_FRAMING) > max_record {
                // Written before the log's limit was lowered: refused, it stopped the append
                // after the records before it were sent (Kafka takes each on its own), so
                // every replay sent those again and never got past it.
                report.skipped.push(Skipped { id: f.entry.id, reason: "too_large" });
                continue;
            }
            deliveries.push(Record { key: key.clone(), value });
            if self.history.is_some() {
                replayed.push(fresh);
            }
            markers.push(Record { key, value: encode_replayed(&f.entry.id) });
            ids.push(f.entry.id);
        }
        if ids.is_empty() {
            return Ok(());
        }
        let (log, topic, dlq) = (self.log.clone(), self.deliveries_topic.clone(), self.dlq_topic.clone());
        let history = self.history.clone();
        tokio::spawn(async move {
            let _one_at_a_time = one_at_a_time;
            // The deliveries first, then their pending states, as a resend does (a state
            // recorded for deliveries the log refused would read pending with nothing queued).
            log.append(&topic, deliveries).await?;
            if let Some(h) = &history {
                if let Err(e) = h.pending(&replayed, now).await {
                    tracing::warn!(error = %e, "replayed deliveries queued; their pending state was not recorded");
                }
            }
            crate::log::append_durably(&*log, &dlq, markers).await
        })
        .await
        .map_err(|e| LogError::Backend(format!("replaying dead letters: {e}")))??;
        // Where their markers are is learned when they are read back (perhaps read already).
        let mut known = self.replayed.lock().unwrap();
        for id in &ids {
            known.entry(id.clone()).or_insert((0, u64::MAX));
        }
        drop(known);
        report.replayed.extend(ids);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_generation() {
        assert_eq!(entry_id("t", "s", "e", 0), entry_id("t", "s", "e", 0));
        assert_ne!(entry_id("t", "s", "e", 0), entry_id("t", "s", "e", 1));
        assert_ne!(entry_id("t", "s", "e", 0), entry_id("t", "s2", "e", 0));
        assert_ne!(entry_id("t", "s", "e", 0), entry_id("t2", "s", "e", 0));
    }

    /// An entry of subscription `s`'s event `e`, with the id given.
    fn dead_letter(id: String) -> DeadLetter {
        DeadLetter {
            id,
            event_id: "e".into(),
            subscription: "s".into(),
            tenant: "t".into(),
            event: "T".into(),
            attempts: 3,
            first_attempt_at: "a".into(),
            last_attempt_at: "b".into(),
            last_status: Some(500),
            last_error: Some("x".into()),
        }
    }

    #[test]
    fn records_round_trip() {
        let entry = dead_letter("dlq_1".into());
        match decode(encode_entry(&entry, &Bytes::from_static(b"raw"))) {
            Some(DlqRecord::Entry { entry: e, delivery }) => assert_eq!((*e, &delivery[..]), (entry, &b"raw"[..])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode(encode_replayed("dlq_1")), Some(DlqRecord::Replayed(id)) if id == "dlq_1"));
        assert!(decode(Bytes::from_static(b"?junk")).is_none());
    }

    /// An embedded log with topics `dlq` and `deliveries` of `partitions` each.
    async fn log_of(dir: &std::path::Path, partitions: u32) -> Arc<dyn Log> {
        use crate::log::TopicSpec;
        let topics = vec![TopicSpec::for_tests("dlq", partitions), TopicSpec::for_tests("deliveries", partitions)];
        crate::log::embedded::EmbeddedLog::for_tests(dir, topics).await
    }

    /// `n` dead letters of `subscription` (of tenant `tenant`), events `e0`, `e1`, ….
    async fn park(log: &dyn Log, subscription: &str, tenant: &str, n: usize) -> Vec<String> {
        park_sized(log, subscription, tenant, n, 0).await
    }

    /// As [`park`], each delivery's payload `bytes` long.
    async fn park_sized(log: &dyn Log, subscription: &str, tenant: &str, n: usize, bytes: usize) -> Vec<String> {
        let mut ids = Vec::new();
        let records = (0..n)
            .map(|i| {
                let event = format!("e{i}");
                let delivery = Delivery::first_attempt(
                    event.clone(),
                    subscription.into(),
                    tenant.into(),
                    "T".into(),
                    Bytes::from(vec![b'x'; bytes]),
                    0,
                );
                let entry = DeadLetter {
                    subscription: subscription.into(),
                    tenant: tenant.into(),
                    event_id: event.clone(),
                    ..dead_letter(entry_id("t", subscription, &event, 0))
                };
                ids.push(entry.id.clone());
                Record {
                    key: Bytes::copy_from_slice(subscription.as_bytes()),
                    value: encode_entry(&entry, &delivery.encode()),
                }
            })
            .collect();
        log.append("dlq", records).await.unwrap();
        ids
    }

    /// A tenant's entry behind 25,000 of another tenant's: each page looks at no more than
    /// `LIST_SCAN` records and says where to go on, and following `next` finds it.
    #[tokio::test]
    async fn a_page_of_the_list_looks_at_a_bounded_part_of_the_topic() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path(), 1).await;
        // One of theirs exactly where the first page's budget ends, one further on.
        park(&*log, "s-a", "a", LIST_SCAN).await;
        let mut theirs = park(&*log, "s-b", "b", 1).await;
        park(&*log, "s-a", "a", 15_000).await;
        theirs.extend(park(&*log, "s-b2", "b", 1).await);
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let (mut found, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let (items, next) = dlq.list(None, Some("b"), after, 10).await.unwrap();
            pages += 1;
            found.extend(items.into_iter().map(|e| e.id));
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
        assert_eq!(found, theirs);
        assert_eq!(pages, 3, "25,002 records at 10,000 a page");
        log.close().await.unwrap();
    }

    /// A page looks at a bounded number of bytes too: 10,000 entries of a megabyte each
    /// (a tenant's dead letters of large events) were 10 GB read for one page of another
    /// tenant's list, at the request rate of a console polling it.
    #[tokio::test]
    async fn a_page_of_the_list_reads_a_bounded_number_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path(), 1).await;
        for _ in 0..12 {
            park_sized(&*log, "s-a", "a", 10, 1 << 20).await;
        }
        let theirs = park(&*log, "s-b", "b", 1).await;
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let (items, next) = dlq.list(None, Some("b"), None, 10).await.unwrap();
        assert!(items.is_empty() && next.is_some(), "the first page read all 120 MB: {items:?}, {next:?}");
        let (mut found, mut after) = (Vec::new(), next);
        while let Some(at) = after {
            let (items, next) = dlq.list(None, Some("b"), Some(at), 10).await.unwrap();
            found.extend(items.into_iter().map(|e| e.id));
            after = next;
        }
        assert_eq!(found, theirs, "following next finds it");
        log.close().await.unwrap();
    }

    /// A list reads the replay markers within its page's budget, and never waits for
    /// another's read of them: the first list after a start read the whole topic, payloads
    /// and all, under a lock every tenant's lists and replays take — a tenant's gigabytes of
    /// dead letters had every other tenant's list answer `408` until it was done.
    #[tokio::test]
    async fn a_list_reads_the_replay_markers_within_its_budget() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let inner = log_of(dir.path(), 1).await;
        let theirs = park(&*inner, "s-b", "b", 1).await;
        park(&*inner, "s-a", "a", LIST_SCAN + 2 * SCAN_CHUNK).await;
        let log = Arc::new(Gated { partition: 0, at: (LIST_SCAN + SCAN_CHUNK) as u64, ..Gated::new(inner) });
        log.armed.store(true, SeqCst);
        let dlq = Arc::new(DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()));
        let within = std::time::Duration::from_secs(10);
        let listed = tokio::time::timeout(within, dlq.list(None, Some("b"), None, 1)).await;
        let (items, _) = listed.expect("the list read the whole topic's markers first").unwrap();
        assert_eq!(items.into_iter().map(|e| e.id).collect::<Vec<_>>(), theirs);
        // The task reading behind takes up the rest, holding the read; a list meanwhile goes on.
        dlq.read_markers_behind();
        let deadline = std::time::Instant::now() + within;
        while log.waiting.load(SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "nothing read the markers behind the list");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let listed = tokio::time::timeout(within, dlq.list(None, Some("b"), None, 1)).await;
        assert!(listed.expect("a list waited for the read behind").is_ok());
        log.armed.store(false, SeqCst);
        while dlq.markers_read.try_lock().map_or(true, |read| read.at.is_none()) {
            assert!(std::time::Instant::now() < deadline, "the read behind never ended");
            log.open.notify_waiters();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        log.close().await.unwrap();
    }

    /// Reads of one partition of `dlq` at or past `at` wait for the gate while it is armed.
    /// Appends to `deliveries` are counted (their bytes), held while `hold` is set (until
    /// `release`), and with `echo` dead-letter what they enqueue again at once (a subscription
    /// failing every attempt at once).
    struct Gated {
        inner: Arc<dyn Log>,
        partition: u32,
        at: u64,
        armed: std::sync::atomic::AtomicBool,
        open: tokio::sync::Notify,
        waiting: std::sync::atomic::AtomicUsize,
        echo: bool,
        hold: std::sync::atomic::AtomicBool,
        release: tokio::sync::Notify,
        appends: std::sync::Mutex<Vec<usize>>,
        /// The record limit it says it has (as Kafka's).
        max_record: Option<usize>,
        /// Where `dlq`'s partitions start (retention deleted what was before).
        start: std::sync::atomic::AtomicU64,
    }

    impl Gated {
        fn new(inner: Arc<dyn Log>) -> Gated {
            Gated {
                inner,
                partition: 0,
                at: u64::MAX,
                armed: false.into(),
                open: tokio::sync::Notify::new(),
                waiting: 0.into(),
                echo: false,
                hold: false.into(),
                release: tokio::sync::Notify::new(),
                appends: Default::default(),
                max_record: None,
                start: 0.into(),
            }
        }
    }

    #[async_trait::async_trait]
    impl Log for Gated {
        fn partitions(&self, topic: &str) -> Result<u32, LogError> {
            self.inner.partitions(topic)
        }
        async fn append(&self, topic: &str, records: Vec<Record>) -> Result<Vec<crate::log::Position>, LogError> {
            if topic != "deliveries" {
                return self.inner.append(topic, records).await;
            }
            self.appends.lock().unwrap().push(records.iter().map(|r| r.value.len()).sum());
            if self.hold.load(std::sync::atomic::Ordering::SeqCst) {
                let released = self.release.notified();
                self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                released.await;
            }
            let again: Vec<Record> = records
                .iter()
                .filter(|_| self.echo)
                .map(|r| {
                    let d = Delivery::decode(r.value.clone()).unwrap();
                    let entry = DeadLetter {
                        subscription: d.subscription.clone(),
                        tenant: d.tenant.clone(),
                        event_id: d.event_id.clone(),
                        ..dead_letter(entry_id(&d.tenant, &d.subscription, &d.event_id, d.generation))
                    };
                    Record { key: r.key.clone(), value: encode_entry(&entry, &r.value) }
                })
                .collect();
            let positions = self.inner.append(topic, records).await?;
            if !again.is_empty() {
                self.inner.append("dlq", again).await?;
            }
            Ok(positions)
        }
        async fn read_all(&self, topic: &str) -> Result<Vec<crate::log::LogRecord>, LogError> {
            self.inner.read_all(topic).await
        }
        async fn read_partition(
            &self,
            topic: &str,
            partition: u32,
            from: u64,
            max: usize,
        ) -> Result<(Vec<crate::log::LogRecord>, Option<u64>), LogError> {
            let gated = topic == "dlq" && partition == self.partition && from >= self.at;
            if gated && self.armed.load(std::sync::atomic::Ordering::SeqCst) {
                let opened = self.open.notified();
                self.waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                opened.await;
            }
            let from = match topic {
                "dlq" => from.max(self.start.load(std::sync::atomic::Ordering::SeqCst)),
                _ => from,
            };
            self.inner.read_partition(topic, partition, from, max).await
        }
        async fn end_offset(&self, topic: &str, partition: u32) -> Result<u64, LogError> {
            self.inner.end_offset(topic, partition).await
        }
        async fn consume(&self, group: &str, topic: &str) -> Result<Box<dyn crate::log::Consumer>, LogError> {
            self.inner.consume(group, topic).await
        }
        async fn follow(
            &self,
            topic: &str,
            partition: u32,
            from: u64,
        ) -> Result<Box<dyn crate::log::PartitionReader>, LogError> {
            self.inner.follow(topic, partition, from).await
        }
        async fn ready(&self) -> bool {
            self.inner.ready().await
        }
        async fn close(&self) -> Result<(), LogError> {
            self.inner.close().await
        }
        fn max_record_bytes(&self) -> Option<usize> {
            self.max_record
        }
        fn shared(&self) -> bool {
            self.inner.shared()
        }
        fn read_up_to(&self, topic: &str, partition: u32, offset: u64) {
            self.inner.read_up_to(topic, partition, offset)
        }
        fn broken(&self) -> Option<String> {
            self.inner.broken()
        }
    }

    /// A dead letter larger than the log now takes (written before `ingest.max_event_bytes`
    /// was lowered) is skipped as `too_large`, and the others are replayed: appended with
    /// them, it stopped the append (on Kafka after the records before it were sent), so each
    /// replay sent those again and none got past it.
    #[tokio::test]
    async fn a_dead_letter_larger_than_the_log_takes_is_skipped_and_the_rest_replayed() {
        let dir = tempfile::tempdir().unwrap();
        let inner = log_of(dir.path(), 1).await;
        let mut ids = park(&*inner, "s1", "a", 2).await;
        let large = park_sized(&*inner, "s2", "a", 1, 100_000).await;
        ids.extend(large.iter().cloned());
        let log = Arc::new(Gated { max_record: Some(50_000), ..Gated::new(inner.clone()) });
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let report =
            dlq.replay(Selection::Ids { ids: ids.clone(), subscription: None }, None, &|_, _| None).await.unwrap();
        assert_eq!(report.replayed, ids[..2]);
        assert_eq!(report.skipped.len(), 1);
        assert_eq!((report.skipped[0].id.as_str(), report.skipped[0].reason), (large[0].as_str(), "too_large"));
        assert_eq!(inner.read_all("deliveries").await.unwrap().len(), 2, "the other two sent, once");
        inner.close().await.unwrap();
    }

    /// The ids of replayed entries are let go once the topic no longer holds their markers
    /// (nor so the entries, which come before them): kept for the process's life, a tenant
    /// replaying entries that fail again at once grew them by a round's ids every round.
    #[tokio::test]
    async fn replayed_ids_are_let_go_once_retention_has_deleted_them() {
        let dir = tempfile::tempdir().unwrap();
        let inner = log_of(dir.path(), 1).await;
        let ids = park(&*inner, "s1", "a", 3).await;
        let log = Arc::new(Gated::new(inner.clone()));
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let selection = Selection::Ids { ids: ids.clone(), subscription: None };
        assert_eq!(dlq.replay(selection, None, &|_, _| None).await.unwrap().replayed, ids);
        let again = dlq.replay(Selection::Ids { ids: ids.clone(), subscription: None }, None, &|_, _| None).await;
        assert!(again.unwrap().replayed.is_empty(), "replayed once");
        // Retention deletes the entries and their markers; later ones stay.
        let later = park(&*inner, "s1", "a", 1).await;
        let end = inner.end_offset("dlq", 0).await.unwrap();
        log.start.store(end - 1, std::sync::atomic::Ordering::SeqCst);
        dlq.markers_read.lock().await.pruned = None;
        dlq.read_markers(std::time::Duration::ZERO, None).await.unwrap();
        assert_eq!(dlq.replayed.lock().unwrap().len(), 0, "ids of entries the topic no longer holds");
        let (listed, _) = dlq.list(None, None, None, 10).await.unwrap();
        assert_eq!(listed.into_iter().map(|e| e.id).collect::<Vec<_>>(), later);
        // Replayed too, then everything deleted: a partition retention emptied holds none.
        dlq.replay(Selection::Ids { ids: later.clone(), subscription: None }, None, &|_, _| None).await.unwrap();
        dlq.read_markers(std::time::Duration::ZERO, None).await.unwrap();
        assert_eq!(dlq.replayed.lock().unwrap().len(), 1);
        log.start.store(inner.end_offset("dlq", 0).await.unwrap(), std::sync::atomic::Ordering::SeqCst);
        dlq.markers_read.lock().await.pruned = None;
        dlq.read_markers(std::time::Duration::ZERO, None).await.unwrap();
        assert_eq!(dlq.replayed.lock().unwrap().len(), 0, "ids of a partition retention emptied");
        inner.close().await.unwrap();
    }

    /// A replay by ids reads the whole topic for them; while it reads, another tenant's
    /// replay goes through (only marking is one at a time).
    #[tokio::test]
    async fn a_long_replay_read_does_not_hold_up_another_replay() {
        let dir = tempfile::tempdir().unwrap();
        let inner = log_of(dir.path(), 2).await;
        let in_partition =
            |p: u32| (0..).map(|i| format!("s{i}")).find(|s| crate::log::partition_for(s.as_bytes(), 2) == p).unwrap();
        let (filler, victim) = (in_partition(1), in_partition(0));
        park(&*inner, &filler, "a", 3 * SCAN_CHUNK).await;
        park(&*inner, &victim, "b", 3).await;
        let log = Arc::new(Gated { partition: 1, at: SCAN_CHUNK as u64, ..Gated::new(inner) });
        let dlq = Arc::new(DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()));
        dlq.read_markers(std::time::Duration::ZERO, None).await.unwrap(); // markers read: none
        log.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let long = tokio::spawn({
            let dlq = dlq.clone();
            async move {
                dlq.replay(
                    Selection::Ids { ids: vec!["dlq_nowhere".into()], subscription: None },
                    Some("a"),
                    &|_, _| None,
                )
                .await
            }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the long replay never reached the gate");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let other = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            dlq.replay(Selection::Subscription(victim.clone()), Some("b"), &|_, _| None),
        )
        .await
        .expect("held up by another tenant's replay")
        .unwrap();
        assert_eq!(other.replayed.len(), 3);
        assert!(!long.is_finished(), "the long replay was still reading");
        log.armed.store(false, std::sync::atomic::Ordering::SeqCst);
        log.open.notify_waiters();
        let long = long.await.unwrap().unwrap();
        assert_eq!(long.skipped[0].reason, "not_found");
        log.close().await.unwrap();
    }

    /// One tenant's lists of dead letters scan the shared topic one at a time, and another
    /// tenant's are not behind them: each reads up to 10,000 records (64 MiB) of every
    /// tenant's entries, and a tenant key polling in a loop had as many reading at once as it
    /// sent, on the blocking threads the embedded log's reads share.
    #[tokio::test]
    async fn one_tenant_s_lists_scan_the_topic_one_at_a_time() {
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let inner = log_of(dir.path(), 1).await;
        park(&*inner, "s", "a", 2 * SCAN_CHUNK).await;
        let log = Arc::new(Gated { partition: 0, at: SCAN_CHUNK as u64, ..Gated::new(inner) });
        let dlq = Arc::new(DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()));
        dlq.read_markers(std::time::Duration::ZERO, None).await.unwrap(); // markers read: none
        log.armed.store(true, SeqCst);
        let list = |tenant: &'static str| {
            let dlq = dlq.clone();
            tokio::spawn(async move { dlq.list(None, Some(tenant), None, 10).await })
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let greedy: Vec<_> = (0..5).map(|_| list("greedy")).collect();
        while log.waiting.load(SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "no list reached the gate");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(log.waiting.load(SeqCst), 1, "one tenant's lists reading the topic at once");
        let other = list("other");
        while log.waiting.load(SeqCst) < 2 {
            assert!(std::time::Instant::now() < deadline, "another tenant's list waited behind them");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        log.armed.store(false, SeqCst);
        while !(other.is_finished() && greedy.iter().all(|t| t.is_finished())) {
            assert!(std::time::Instant::now() < deadline, "the lists never ended");
            log.open.notify_waiters();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        for list in greedy.into_iter().chain([other]) {
            assert!(list.await.unwrap().unwrap().0.is_empty());
        }
        log.close().await.unwrap();
    }

    /// Two processes on one log (Kafka): an entry one of them replayed is no longer listed by
    /// the other, and a second replay of it there is refused, not sent again.
    #[tokio::test]
    async fn an_entry_replayed_by_another_process_is_neither_listed_nor_replayed_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path(), 2).await;
        let delivery = Delivery::first_attempt("e".into(), "s".into(), "t".into(), "T".into(), Bytes::new(), 0);
        let entry = dead_letter(entry_id("t", "s", "e", 0));
        let record = Record { key: Bytes::from_static(b"s"), value: encode_entry(&entry, &delivery.encode()) };
        log.append("dlq", vec![record]).await.unwrap();
        let (a, b) = (
            DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()),
            DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()),
        );
        assert_eq!(b.list(None, None, None, 10).await.unwrap().0.len(), 1, "listed by both");
        let one = |id: &str| Selection::Ids { ids: vec![id.to_string()], subscription: None };
        let report = a.replay(one(&entry.id), None, &|_, _| None).await.unwrap();
        assert_eq!(report.replayed, vec![entry.id.clone()]);
        // A list reads markers at most once a second: within a couple of seconds it is gone.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !b.list(None, None, None, 10).await.unwrap().0.is_empty() {
            assert!(std::time::Instant::now() < deadline, "replayed elsewhere, still listed");
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let again = b.replay(one(&entry.id), None, &|_, _| None).await.unwrap();
        assert!(again.replayed.is_empty(), "sent again: {again:?}");
        assert_eq!(again.skipped[0].reason, "already_replayed");
        let again = b.replay(Selection::Subscription("s".into()), None, &|_, _| None).await.unwrap();
        assert!(again.replayed.is_empty(), "sent again: {again:?}");
        let sent = log.read_all("deliveries").await.unwrap();
        assert_eq!(sent.len(), 1, "one delivery enqueued in all");
        log.close().await.unwrap();
    }

    /// A replay of a subscription whose deliveries fail again at once (and come back as new
    /// entries behind the scan) replays what was there when it began, once, and ends.
    #[tokio::test]
    async fn a_replay_does_not_chase_the_entries_its_own_deliveries_make() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Gated { echo: true, ..Gated::new(log_of(dir.path(), 1).await) });
        let parked = park(&*log, "s", "t", REPLAY_CHUNK + 500).await;
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let report = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            dlq.replay(Selection::Subscription("s".into()), None, &|_, _| None),
        )
        .await
        .expect("the replay ended")
        .unwrap();
        assert_eq!(report.replayed.len(), parked.len());
        assert_eq!(log.read_all("deliveries").await.unwrap().len(), parked.len(), "each sent once");
        assert_eq!(dlq.list(Some("s"), None, None, 500).await.unwrap().0.len(), 500, "the new entries stay");
        log.close().await.unwrap();
    }

    /// A replay holds and appends a bounded number of payload bytes at a time, however large
    /// each entry is.
    #[tokio::test]
    async fn a_replay_appends_a_bounded_number_of_bytes_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Gated::new(log_of(dir.path(), 1).await));
        let size = 300 << 10;
        let parked = park_sized(&*log, "s", "t", 60, size).await;
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let report = dlq.replay(Selection::Subscription("s".into()), None, &|_, _| None).await.unwrap();
        assert_eq!(report.replayed.len(), parked.len());
        let appends = log.appends.lock().unwrap().clone();
        assert!(appends.len() > 1, "{appends:?}");
        assert!(appends.iter().all(|&n| n <= REPLAY_CHUNK_BYTES + size + 4096), "{appends:?}");
        log.close().await.unwrap();
    }

    /// A replay whose request is cancelled while its deliveries are being appended keeps the
    /// next replay waiting until its markers are written: the same entry is not sent twice.
    #[tokio::test]
    async fn a_cancelled_replay_holds_the_next_one_until_its_markers_are_written() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(Gated::new(log_of(dir.path(), 1).await));
        let ids = park(&*log, "s", "t", 1).await;
        let dlq = Arc::new(DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into()));
        let one = || Selection::Ids { ids: ids.clone(), subscription: None };
        log.hold.store(true, std::sync::atomic::Ordering::SeqCst);
        let first = tokio::spawn({
            let (dlq, one) = (dlq.clone(), one());
            async move { dlq.replay(one, None, &|_, _| None).await }
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the first replay never appended");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        first.abort(); // the request goes (a client gone, the API's timeout); its append goes on
        log.hold.store(false, std::sync::atomic::Ordering::SeqCst);
        let second = tokio::spawn({
            let (dlq, one) = (dlq.clone(), one());
            async move { dlq.replay(one, None, &|_, _| None).await }
        });
        // Let the second replay run as far as it can before the first append is let go.
        for _ in 0..50 {
            tokio::task::yield_now().await;
        }
        log.release.notify_waiters();
        let second = tokio::time::timeout(std::time::Duration::from_secs(10), second).await.unwrap().unwrap().unwrap();
        assert!(second.replayed.is_empty(), "sent twice: {second:?}");
        assert_eq!(log.read_all("deliveries").await.unwrap().len(), 1);
        log.close().await.unwrap();
    }

    /// What the caller's check refuses is skipped with its reason and stays listed.
    #[tokio::test]
    async fn an_entry_the_check_refuses_is_skipped_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        let log = log_of(dir.path(), 1).await;
        let ids = park(&*log, "s", "t", 2).await;
        let dlq = DeadLetters::new(log.clone(), "dlq".into(), "deliveries".into());
        let report = dlq
            .replay(Selection::Ids { ids: ids.clone(), subscription: None }, None, &|_, _| Some("subscription_deleted"))
            .await
            .unwrap();
        assert!(report.replayed.is_empty());
        assert!(report.skipped.iter().all(|s| s.reason == "subscription_deleted"), "{report:?}");
        assert_eq!(dlq.list(None, None, None, 10).await.unwrap().0.len(), 2);
        assert!(log.read_all("deliveries").await.unwrap().is_empty());
        log.close().await.unwrap();
    }
}
