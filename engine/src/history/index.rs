//! The local index of the history topic: every process reads every partition of the topic into
//! its own store (a global table, as Kafka Streams keeps one), so any process answers any
//! query, and the store can always be rebuilt from the topic. The store is fjall (an LSM tree)
//! with one keyspace per UTC day: expiry deletes whole keyspaces, never scans, and nothing
//! grows past the retention. The offsets read so far are written in the same atomic batch as
//! what they produced, so after a crash the index resumes exactly where its data ends.

use super::keys::{self, Key};
use super::record::{attempt_view, DeliveryState, EventRecord, HistoryRecord, State};
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
}

/// Most index entries one query looks at before it answers with what it found and a cursor
/// (a filter that matches little cannot make a request scan the whole history).
const SCAN_LIMIT: usize = 20_000;

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

/// The index.
pub struct Index {
    db: Database,
    meta: Keyspace,
    days: RwLock<BTreeMap<u32, Keyspace>>,
    retention: Duration,
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

/// What a visit tells a scan.
enum Flow {
    Go,
    Stop,
}

impl Index {
    /// Opens (creating if needed) the index in `dir`, keeping `retention` of history.
    pub fn open(dir: &Path, retention: Duration) -> Result<Index, IndexError> {
        crate::log::private::create_dir(dir)?;
        let db = Database::builder(dir).open()?;
        let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
        let mut days = BTreeMap::new();
        for name in db.list_keyspace_names() {
            if let Some(day) = keys::day_of_name(&name) {
                days.insert(day, db.keyspace(&name, KeyspaceCreateOptions::default)?);
            }
        }
        Ok(Index { db, meta, days: RwLock::new(days), retention })
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
        let ks = self.db.keyspace(&keys::day_name(day), KeyspaceCreateOptions::default)?;
        days.insert(day, ks.clone());
        Ok(Some(ks))
    }

    /// The days kept, newest first, within `[from, to]`.
    fn days_newest_first(&self, from: u32, to: u32) -> Vec<(u32, Keyspace)> {
        self.days.read().unwrap().range(from..=to).rev().map(|(d, ks)| (*d, ks.clone())).collect()
    }

    fn offset_key(partition: u32) -> Vec<u8> {
        format!("offset/{partition}").into_bytes()
    }

    /// The offset of `partition` of the history topic read so far.
    pub fn offset(&self, partition: u32) -> u64 {
        match self.meta.get(Self::offset_key(partition)) {
            Ok(Some(v)) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
            _ => 0,
        }
    }

    /// Indexes `records` of `partition` and notes that reading continues at `next`, in one
    /// atomic batch. Returns how many records were indexed.
    pub fn apply(&self, partition: u32, records: &[LogRecord], next: u64, now_ms: i64) -> Result<usize, IndexError> {
        let mut batch = self.db.batch();
        // States changed in this batch: a later record must see an earlier one's change.
        let mut states: HashMap<(u32, Vec<u8>), (Keyspace, DeliveryState)> = HashMap::new();
        let mut applied = 0;
        for rec in records {
            let Some(record) = HistoryRecord::decode(&rec.value) else {
                tracing::warn!(partition, offset = rec.offset, "a history record this version cannot read; skipped");
                continue;
            };
            applied += 1;
            match record {
                HistoryRecord::Event(e) => {
                    let Some(ks) = self.day(keys::day(e.accepted_ms), now_ms)? else { continue };
                    batch.insert(&ks, Key::new(keys::EVENT).part(&e.tenant).part(&e.id).done(), rec.value.to_vec());
                    let listed = Key::new(keys::EVENTS).part(&e.tenant).newest_first(e.accepted_ms).part(&e.id).done();
                    batch.insert(&ks, listed, e.event_type.as_bytes());
                    for sub in &e.subscriptions {
                        let key = Key::new(keys::RECOVERY).part(sub).time(e.accepted_ms).part(&e.id).done();
                        batch.insert(&ks, key, e.tenant.as_bytes());
                    }
                }
                HistoryRecord::Attempt(a) => {
                    if let Some(ks) = self.day(keys::day(a.at_ms), now_ms)? {
                        let view = serde_json::to_vec(&attempt_view(&a)).expect("views serialize");
                        let key = Key::new(keys::ATTEMPT).part(&a.tenant).newest_first(a.at_ms).part(&a.id).done();
                        batch.insert(&ks, key, view);
                        let key = Key::new(keys::BY_SUBSCRIPTION)
                            .part(&a.subscription)
                            .newest_first(a.at_ms)
                            .part(&a.id)
                            .done();
                        batch.insert(&ks, key, a.tenant.as_bytes());
                        let key = Key::new(keys::BY_EVENT)
                            .part(&a.tenant)
                            .part(&a.event_id)
                            .newest_first(a.at_ms)
                            .part(&a.id)
                            .done();
                        batch.insert(&ks, key, a.subscription.as_bytes());
                    }
                    let state = DeliveryState {
                        state: a.state,
                        at_ms: a.at_ms,
                        attempt: a.attempt,
                        last_attempt_ms: Some(a.at_ms),
                        next_ms: a.next_ms,
                    };
                    self.merge_state(
                        &mut states,
                        (&a.tenant, &a.event_id, &a.subscription),
                        a.accepted_ms,
                        state,
                        now_ms,
                    )?;
                }
                HistoryRecord::State(s) => {
                    let state = DeliveryState {
                        state: s.state,
                        at_ms: s.at_ms,
                        attempt: 0,
                        last_attempt_ms: None,
                        next_ms: None,
                    };
                    self.merge_state(
                        &mut states,
                        (&s.tenant, &s.event_id, &s.subscription),
                        s.accepted_ms,
                        state,
                        now_ms,
                    )?;
                }
            }
        }
        for ((_, key), (ks, state)) in states {
            batch.insert(&ks, key, serde_json::to_vec(&state).expect("states serialize"));
        }
        batch.insert(&self.meta, Self::offset_key(partition), next.to_be_bytes());
        batch.commit()?;
        Ok(applied)
    }

    /// Keeps `state` for a delivery if it is newer than what is known.
    fn merge_state(
        &self,
        states: &mut HashMap<(u32, Vec<u8>), (Keyspace, DeliveryState)>,
        (tenant, event, subscription): (&str, &str, &str),
        accepted_ms: i64,
        mut state: DeliveryState,
        now_ms: i64,
    ) -> Result<(), IndexError> {
        let day = keys::day(accepted_ms);
        let Some(ks) = self.day(day, now_ms)? else { return Ok(()) };
        let key = Key::new(keys::STATE).part(tenant).part(event).part(subscription).done();
        let known = match states.get(&(day, key.clone())) {
            Some((_, s)) => Some(s.clone()),
            None => ks.get(&key)?.and_then(|v| serde_json::from_slice::<DeliveryState>(&v).ok()),
        };
        if let Some(known) = known {
            if !state.newer_than(&known) {
                return Ok(());
            }
            state.last_attempt_ms = state.last_attempt_ms.or(known.last_attempt_ms);
        }
        states.insert((day, key), (ks, state));
        Ok(())
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

    /// Bytes the index takes on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    /// Visits entries under `prefix` newest day first, within `[start, end)` of each day, from
    /// after `from` (a cursor), until `visit` stops or [`SCAN_LIMIT`] entries were seen; returns
    /// the cursor after the last entry visited if the scan did not reach the end.
    fn scan(
        &self,
        (start, end): (Vec<u8>, Option<Vec<u8>>),
        days: (u32, u32),
        from: Option<(u32, Vec<u8>)>,
        mut visit: impl FnMut(&Keyspace, &[u8], &[u8]) -> Flow,
    ) -> Result<Option<String>, IndexError> {
        let last_day = from.as_ref().map_or(days.1, |(d, _)| (*d).min(days.1));
        let mut seen = 0;
        for (day, ks) in self.days_newest_first(days.0, last_day) {
            let lower = match &from {
                Some((d, key)) if *d == day && key.as_slice() >= start.as_slice() => Bound::Excluded(key.clone()),
                _ => Bound::Included(start.clone()),
            };
            let upper = end.clone().map_or(Bound::Unbounded, Bound::Excluded);
            for item in ks.range::<Vec<u8>, _>((lower, upper)) {
                let (key, value) = item.into_inner()?;
                seen += 1;
                let stop = matches!(visit(&ks, &key, &value), Flow::Stop);
                if stop || seen >= SCAN_LIMIT {
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
        let limit = q.limit.max(1);
        let from = q.cursor.as_deref().and_then(decode_cursor);
        let mut items: Vec<Box<RawValue>> = Vec::new();
        let wanted = |view: &[u8]| -> Option<Box<RawValue>> {
            if let Some(outcome) = &q.outcome {
                #[derive(serde::Deserialize)]
                struct Outcome<'a> {
                    outcome: &'a str,
                }
                if serde_json::from_slice::<Outcome>(view).ok()?.outcome != outcome {
                    return None;
                }
            }
            serde_json::from_slice(view).ok()
        };
        // The attempt's full view, from the key of an entry pointing at it.
        let view_at = |ks: &Keyspace, tenant: &str, time_and_id: &[u8]| -> Option<Vec<u8>> {
            let mut key = Key::new(keys::ATTEMPT).part(tenant).done();
            key.extend_from_slice(time_and_id);
            ks.get(key).ok().flatten().map(|v| v.to_vec())
        };
        let (prefix, kind) = match (&q.event, &q.subscription) {
            (Some(event), _) => (Key::new(keys::BY_EVENT).part(&q.tenant).part(event).done(), keys::BY_EVENT),
            (None, Some(sub)) => (Key::new(keys::BY_SUBSCRIPTION).part(sub).done(), keys::BY_SUBSCRIPTION),
            (None, None) => (Key::new(keys::ATTEMPT).part(&q.tenant).done(), keys::ATTEMPT),
        };
        let bounds = newest_first_bounds(&prefix, q.since_ms, q.until_ms);
        let span = Self::day_span(q.since_ms, q.until_ms);
        let next = self.scan(bounds, span, from, |ks, key, value| {
            let rest = &key[prefix.len()..];
            let view = match kind {
                keys::ATTEMPT => Some(value.to_vec()),
                keys::BY_EVENT => {
                    if q.subscription.as_deref().is_some_and(|s| s.as_bytes() != value) {
                        return Flow::Go;
                    }
                    view_at(ks, &q.tenant, rest)
                }
                _ => match std::str::from_utf8(value) {
                    Ok(tenant) if tenant == q.tenant => view_at(ks, tenant, rest),
                    _ => None,
                },
            };
            if let Some(item) = view.as_deref().and_then(wanted) {
                items.push(item);
            }
            if items.len() >= limit {
                Flow::Stop
            } else {
                Flow::Go
            }
        })?;
        Ok(Page { items, next })
    }

    /// The tenant's events, newest first: `{id, tenant, type, accepted_at}`.
    pub fn events(&self, q: &EventQuery) -> Result<Page, IndexError> {
        let limit = q.limit.max(1);
        let from = q.cursor.as_deref().and_then(decode_cursor);
        let prefix = Key::new(keys::EVENTS).part(&q.tenant).done();
        let bounds = newest_first_bounds(&prefix, q.since_ms, q.until_ms);
        let mut items = Vec::new();
        let next = self.scan(bounds, Self::day_span(q.since_ms, q.until_ms), from, |_, key, value| {
            let event_type = String::from_utf8_lossy(value);
            if q.event_type.as_deref().is_some_and(|t| t != event_type) {
                return Flow::Go;
            }
            let at = keys::read_time(key, prefix.len()).map(|inv| (u64::MAX - inv) as i64).unwrap_or(0);
            if let Some((id, _)) = keys::read_part(key, prefix.len() + 8) {
                let item = serde_json::json!({ "id": id, "tenant": q.tenant, "type": event_type, "accepted_at": rfc3339_ms(at) });
                items.push(serde_json::value::to_raw_value(&item).expect("items serialize"));
            }
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
        let key = Key::new(keys::EVENT).part(tenant).part(id).done();
        for (_, ks) in self.days_newest_first(0, u32::MAX) {
            if let Some(v) = ks.get(&key)? {
                if let Some(HistoryRecord::Event(e)) = HistoryRecord::decode(&v) {
                    return Ok(Some(e));
                }
            }
        }
        Ok(None)
    }

    /// Each delivery of an event: its state, attempts, and when the last and next are.
    pub fn deliveries(&self, event: &EventRecord) -> Result<Vec<DeliveryView>, IndexError> {
        let day = keys::day(event.accepted_ms);
        let mut states: HashMap<String, DeliveryState> = HashMap::new();
        if let Some(ks) = self.days.read().unwrap().get(&day).cloned() {
            let prefix = Key::new(keys::STATE).part(&event.tenant).part(&event.id).done();
            for item in ks.prefix(&prefix) {
                let (key, value) = item.into_inner()?;
                if let (Some((sub, _)), Ok(state)) =
                    (keys::read_part(&key, prefix.len()), serde_json::from_slice::<DeliveryState>(&value))
                {
                    states.insert(sub.to_string(), state);
                }
            }
        }
        let mut attempts: HashMap<String, u32> = HashMap::new();
        let prefix = Key::new(keys::BY_EVENT).part(&event.tenant).part(&event.id).done();
        for (_, ks) in self.days_newest_first(day, u32::MAX) {
            for item in ks.prefix(&prefix) {
                let (_, sub) = item.into_inner()?;
                *attempts.entry(String::from_utf8_lossy(&sub).into_owned()).or_default() += 1;
            }
        }
        let mut subs = event.subscriptions.clone();
        subs.extend(states.keys().filter(|s| !event.subscriptions.contains(s)).cloned());
        Ok(subs
            .into_iter()
            .map(|sub| {
                let state = states.get(&sub);
                DeliveryView {
                    state: state.map_or(State::Pending, |s| s.state).as_str(),
                    attempts: attempts.get(&sub).copied().unwrap_or(0),
                    last_attempt_at: state.and_then(|s| s.last_attempt_ms).map(rfc3339_ms),
                    next_attempt_at: state
                        .filter(|s| s.state == State::Retrying)
                        .and_then(|s| s.next_ms)
                        .map(rfc3339_ms),
                    subscription: sub,
                }
            })
            .collect())
    }

    /// Events of `subscription` accepted within `[since, until]` whose delivery is dead-lettered
    /// or retrying (or every one, with `all`), oldest first, at most `max`: `(tenant, event)`.
    pub fn recoverable(
        &self,
        subscription: &str,
        since_ms: i64,
        until_ms: i64,
        all: bool,
        max: usize,
    ) -> Result<Vec<(String, String)>, IndexError> {
        let prefix = Key::new(keys::RECOVERY).part(subscription).done();
        let mut start = prefix.clone();
        start.extend_from_slice(&(since_ms.max(0) as u64).to_be_bytes());
        let mut end = prefix.clone();
        end.extend_from_slice(&(until_ms.max(0) as u64).saturating_add(1).to_be_bytes());
        let mut found = Vec::new();
        let days: Vec<(u32, Keyspace)> = self
            .days
            .read()
            .unwrap()
            .range(keys::day(since_ms)..=keys::day(until_ms))
            .map(|(d, k)| (*d, k.clone()))
            .collect();
        for (_, ks) in days {
            for item in ks.range(start.clone()..end.clone()) {
                let (key, tenant) = item.into_inner()?;
                let Some((event, _)) = keys::read_part(&key, prefix.len() + 8) else { continue };
                let tenant = String::from_utf8_lossy(&tenant).into_owned();
                if !all {
                    let state_key = Key::new(keys::STATE).part(&tenant).part(event).part(subscription).done();
                    let state = ks.get(state_key)?.and_then(|v| serde_json::from_slice::<DeliveryState>(&v).ok());
                    if !matches!(state.map(|s| s.state), Some(State::DeadLettered | State::Retrying)) {
                        continue;
                    }
                }
                found.push((tenant, event.to_string()));
                if found.len() >= max {
                    return Ok(found);
                }
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::record::AttemptRecord;

    fn attempt(id: &str, at_ms: i64) -> LogRecord {
        let rec = HistoryRecord::Attempt(AttemptRecord {
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
        });
        LogRecord { partition: 0, offset: 0, key: bytes::Bytes::new(), value: rec.encode(), timestamp_ms: at_ms }
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
