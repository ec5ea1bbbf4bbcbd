//! Ingest: validate published events, fan each out to the matching subscriptions, and
//! append one delivery record per match, durably, before the producer is answered. The
//! producer's JSON is put in JavaScript's form here, once (`canonical`), so every attempt
//! after shares the stored bytes.

pub mod canonical;

use crate::log::{Log, LogError, Record};
use crate::model::{new_id, now_ms, Delivery, EventInput, Invalid, PayloadFormat, MAX_EVENT_ID_LEN};
use crate::registry::{validate_tenant, Registry};
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// An event that passed validation.
#[derive(Debug, Clone)]
pub struct Event {
    /// Id: the producer's (its idempotency key) or generated; becomes `webhook-id`.
    pub id: String,
    /// Type: what subscriptions match on.
    pub event_type: String,
    /// Tenant: only its subscriptions receive it.
    pub tenant: String,
    /// `data`, in both forms: subscriptions choose one.
    pub data: Json,
    /// `changes`, in both forms, when given.
    pub changes: Option<Json>,
    /// Whether the producer gave the id (only those are checked for repeats).
    pub id_given: bool,
}

/// A JSON value of the producer's, as sent and in JavaScript's form (the same buffer when the
/// two are equal, as they are for compact producers).
#[derive(Debug, Clone)]
pub struct Json {
    /// The bytes as sent.
    pub sent: Bytes,
    /// `JSON.stringify(JSON.parse(sent))`.
    pub canonical: Bytes,
}

impl Json {
    /// Both forms of `text`; fails for JSON that JavaScript would change the meaning of.
    pub fn new(text: &str) -> Result<Json, canonical::CanonicalError> {
        let canonical = canonical::canonical(text.as_bytes())?;
        let sent =
            if canonical == text.as_bytes() { canonical.clone() } else { Bytes::copy_from_slice(text.as_bytes()) };
        Ok(Json { sent, canonical })
    }

    /// The form a subscription's payload carries.
    pub fn for_payload(&self, format: PayloadFormat) -> Bytes {
        if format.canonical() {
            self.canonical.clone()
        } else {
            self.sent.clone()
        }
    }
}

/// What was accepted for one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accepted {
    /// Event id.
    pub id: String,
    /// Deliveries appended for it.
    pub deliveries: usize,
}

fn field(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Validates one event; `prefix` names its place in a batch (e.g. `[3]`), `tenant` is used
/// when the event names none.
pub fn validate(input: EventInput, prefix: &str, default_tenant: &str) -> Result<Event, Invalid> {
    let bad = |name: &str, message: &str| Invalid { field: field(prefix, name), message: message.to_string() };
    let event_type = input.event_type;
    if event_type.is_empty() || event_type.len() > MAX_EVENT_ID_LEN || event_type.chars().any(char::is_control) {
        return Err(bad("type", "must be 1 to 255 bytes without control characters"));
    }
    let id_given = input.id.is_some();
    let id = match input.id {
        Some(id) => {
            // It travels as the webhook-id header: visible ASCII only.
            if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("id", "must be 1 to 255 visible ASCII characters"));
            }
            id
        }
        None => new_id("evt"),
    };
    let tenant = input.tenant.unwrap_or_else(|| default_tenant.to_string());
    validate_tenant(&tenant).map_err(|e| bad("tenant", &e.message))?;
    let json = |name: &str, text: &str| Json::new(text).map_err(|e| bad(name, &e.to_string()));
    let data = json("data", input.data.get())?;
    let changes = input.changes.map(|c| json("changes", c.get())).transpose()?;
    Ok(Event { id, event_type, tenant, data, changes, id_given })
}

/// How long an accepted event id is remembered, so a producer's retry is not published twice.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Most event ids remembered at once.
const IDEMPOTENCY_CAPACITY: usize = 200_000;

/// Recently accepted (tenant, event id) pairs and their delivery counts. In memory: after a
/// restart a repeated publish is appended again, and receivers drop it by `webhook-id`.
#[derive(Default)]
struct Recent {
    counts: HashMap<(String, String), usize>,
    order: VecDeque<((String, String), i64)>,
}

impl Recent {
    fn expire(&mut self, now: i64) {
        let horizon = now - IDEMPOTENCY_WINDOW.as_millis() as i64;
        while let Some((key, at)) = self.order.front() {
            if *at >= horizon && self.order.len() <= IDEMPOTENCY_CAPACITY {
                break;
            }
            self.counts.remove(key);
            self.order.pop_front();
        }
    }
}

/// Fans events out to their subscriptions and appends the deliveries, durably.
pub struct Ingest {
    log: Arc<dyn Log>,
    registry: Arc<Registry>,
    topic: String,
    recent: Mutex<Recent>,
}

impl Ingest {
    /// Ingest into `topic`.
    pub fn new(log: Arc<dyn Log>, registry: Arc<Registry>, topic: String) -> Self {
        Ingest { log, registry, topic, recent: Mutex::new(Recent::default()) }
    }

    /// Appends every delivery of `events` in one durable append; returns per-event counts.
    /// An event whose id (for its tenant) was accepted in the last [`IDEMPOTENCY_WINDOW`],
    /// in this request or an earlier one, gets the first answer back and appends nothing.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Vec<Accepted>, LogError> {
        let now = now_ms();
        let mut records = Vec::new();
        let mut accepted = Vec::with_capacity(events.len());
        let mut fresh: Vec<((String, String), usize)> = Vec::new();
        let mut new_events = 0u64;
        let known = |key: &(String, String), fresh: &[((String, String), usize)]| {
            fresh
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, n)| *n)
                .or_else(|| self.recent.lock().unwrap().counts.get(key).copied())
        };
        for event in events {
            let key = (event.tenant.clone(), event.id.clone());
            if event.id_given {
                if let Some(deliveries) = known(&key, &fresh) {
                    accepted.push(Accepted { id: event.id, deliveries });
                    continue;
                }
            }
            let targets = self.registry.matching(&event.tenant, &event.event_type);
            for target in &targets {
                let format = target.sub.spec.payload;
                let delivery = Delivery {
                    changes: event.changes.as_ref().map(|c| c.for_payload(format)),
                    ..Delivery::first_attempt(
                        event.id.clone(),
                        target.sub.id.clone(),
                        event.tenant.clone(),
                        event.event_type.clone(),
                        event.data.for_payload(format),
                        now,
                    )
                };
                records
                    .push(Record { key: Bytes::copy_from_slice(target.sub.id.as_bytes()), value: delivery.encode() });
            }
            if event.id_given {
                fresh.push((key, targets.len()));
            }
            new_events += 1;
            accepted.push(Accepted { id: event.id, deliveries: targets.len() });
        }
        self.log.append(&self.topic, records).await?;
        {
            let mut recent = self.recent.lock().unwrap();
            for (key, n) in fresh {
                recent.counts.insert(key.clone(), n);
                recent.order.push_back((key, now));
            }
            recent.expire(now);
        }
        metrics::counter!(crate::metrics::EVENTS_INGESTED).increment(new_events);
        Ok(accepted)
    }
}
