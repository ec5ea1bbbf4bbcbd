//! The dead-letter topic: entries (the contract's fields plus the delivery record, for
//! replay) and replay markers. Entry ids are derived from (subscription, event, replay
//! generation), so an entry written twice by a crash between append and commit lists once;
//! a marker makes a replayed entry leave the list and refuse a second replay.

use crate::log::{Log, LogError, Record};
use crate::model::{now_ms, DeadLetter, Delivery};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::sync::Arc;

const ENTRY: u8 = b'D';
const REPLAYED: u8 = b'R';

/// The id of the dead letter of one delivery generation.
pub fn entry_id(subscription: &str, event_id: &str, generation: u32) -> String {
    let digest = Sha256::digest(format!("{subscription}\n{event_id}\n{generation}").as_bytes());
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

/// A live (not replayed) entry and where it is.
#[derive(Debug, Clone)]
pub struct Live {
    /// Position, the list cursor.
    pub position: (u32, u64),
    /// The entry.
    pub entry: DeadLetter,
    /// Its delivery record.
    pub delivery: Bytes,
}

/// What a replay asks for.
#[derive(Debug, Clone)]
pub enum Selection {
    /// These entries.
    Ids(Vec<String>),
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
    /// `not_found`, `already_replayed` or `unreadable`.
    pub reason: &'static str,
}

/// Lists and replays dead letters.
pub struct DeadLetters {
    log: Arc<dyn Log>,
    dlq_topic: String,
    deliveries_topic: String,
    replays: tokio::sync::Mutex<()>,
}

impl DeadLetters {
    /// Dead letters in `dlq_topic`, replayed into `deliveries_topic`.
    pub fn new(log: Arc<dyn Log>, dlq_topic: String, deliveries_topic: String) -> Self {
        DeadLetters { log, dlq_topic, deliveries_topic, replays: tokio::sync::Mutex::new(()) }
    }

    /// Every live entry, oldest first per partition, each id once; and the replayed ids.
    async fn scan(&self) -> Result<(Vec<Live>, HashSet<String>), LogError> {
        let mut records = self.log.read_all(&self.dlq_topic).await?;
        records.sort_by_key(|r| (r.partition, r.offset));
        let mut replayed = HashSet::new();
        let mut seen = HashSet::new();
        let mut live = Vec::new();
        for rec in records {
            match decode(rec.value) {
                Some(DlqRecord::Replayed(id)) => {
                    replayed.insert(id);
                }
                Some(DlqRecord::Entry { entry, delivery }) => {
                    if seen.insert(entry.id.clone()) {
                        live.push(Live { position: (rec.partition, rec.offset), entry: *entry, delivery });
                    }
                }
                None => tracing::warn!(
                    partition = rec.partition,
                    offset = rec.offset,
                    "unreadable dead-letter record skipped"
                ),
            }
        }
        live.retain(|l| !replayed.contains(&l.entry.id));
        Ok((live, replayed))
    }

    /// Live entries matching the filters after `after`, at most `limit`, and the cursor of
    /// the last one when more may follow.
    pub async fn list(
        &self,
        subscription: Option<&str>,
        tenant: Option<&str>,
        after: Option<(u32, u64)>,
        limit: usize,
    ) -> Result<(Vec<DeadLetter>, Option<(u32, u64)>), LogError> {
        let (live, _) = self.scan().await?;
        let mut page: Vec<Live> = live
            .into_iter()
            .filter(|l| after.is_none_or(|a| l.position > a))
            .filter(|l| subscription.is_none_or(|s| l.entry.subscription == s))
            .filter(|l| tenant.is_none_or(|t| l.entry.tenant == t))
            .take(limit + 1)
            .collect();
        let next = (page.len() > limit).then(|| page[limit - 1].position);
        page.truncate(limit);
        Ok((page.into_iter().map(|l| l.entry).collect(), next))
    }

    /// Re-enqueues the selected entries with a fresh attempt budget (attempt 1, `max_age`
    /// from now), then marks them replayed. `tenant` limits what may be replayed.
    pub async fn replay(&self, selection: Selection, tenant: Option<&str>) -> Result<ReplayReport, LogError> {
        let _one_at_a_time = self.replays.lock().await;
        let (live, replayed) = self.scan().await?;
        let visible = |l: &&Live| tenant.is_none_or(|t| l.entry.tenant == t);
        let mut report = ReplayReport::default();
        let chosen: Vec<&Live> = match &selection {
            Selection::Subscription(sub) => {
                live.iter().filter(visible).filter(|l| &l.entry.subscription == sub).collect()
            }
            Selection::Ids(ids) => {
                let mut chosen = Vec::new();
                for id in ids {
                    match live.iter().filter(visible).find(|l| &l.entry.id == id) {
                        Some(l) if !chosen.iter().any(|c: &&Live| c.entry.id == l.entry.id) => chosen.push(l),
                        Some(_) => {}
                        None if replayed.contains(id) => {
                            report.skipped.push(Skipped { id: id.clone(), reason: "already_replayed" })
                        }
                        None => report.skipped.push(Skipped { id: id.clone(), reason: "not_found" }),
                    }
                }
                chosen
            }
        };
        let now = now_ms();
        let mut deliveries = Vec::new();
        let mut markers = Vec::new();
        for l in chosen {
            let Ok(old) = Delivery::decode(l.delivery.clone()) else {
                report.skipped.push(Skipped { id: l.entry.id.clone(), reason: "unreadable" });
                continue;
            };
            let fresh = Delivery { attempt: 1, due_ms: now, budget_ms: now, generation: old.generation + 1, ..old };
            let key = Bytes::copy_from_slice(fresh.subscription.as_bytes());
            deliveries.push(Record { key: key.clone(), value: fresh.encode() });
            markers.push(Record { key, value: encode_replayed(&l.entry.id) });
            report.replayed.push(l.entry.id.clone());
        }
        // Enqueue first: a crash before the markers can only make a later replay repeat it.
        self.log.append(&self.deliveries_topic, deliveries).await?;
        self.log.append(&self.dlq_topic, markers).await?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_per_generation() {
        assert_eq!(entry_id("s", "e", 0), entry_id("s", "e", 0));
        assert_ne!(entry_id("s", "e", 0), entry_id("s", "e", 1));
        assert_ne!(entry_id("s", "e", 0), entry_id("s2", "e", 0));
    }

    #[test]
    fn records_round_trip() {
        let entry = DeadLetter {
            id: "dlq_1".into(),
            event_id: "e".into(),
            subscription: "s".into(),
            tenant: "t".into(),
            event: "T".into(),
            attempts: 3,
            first_attempt_at: "a".into(),
            last_attempt_at: "b".into(),
            last_status: Some(500),
            last_error: Some("x".into()),
        };
        match decode(encode_entry(&entry, &Bytes::from_static(b"raw"))) {
            Some(DlqRecord::Entry { entry: e, delivery }) => assert_eq!((*e, &delivery[..]), (entry, &b"raw"[..])),
            other => panic!("{other:?}"),
        }
        assert!(matches!(decode(encode_replayed("dlq_1")), Some(DlqRecord::Replayed(id)) if id == "dlq_1"));
        assert!(decode(Bytes::from_static(b"?junk")).is_none());
    }
}
