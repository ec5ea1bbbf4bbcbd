//! Ingest: validate published events, fan each out to the matching subscriptions, and
//! append one delivery record per match, durably, before the producer is answered.

use crate::log::{Log, LogError, Record};
use crate::model::{new_id, now_ms, Delivery, EventInput, MAX_EVENT_ID_LEN};
use crate::registry::{validate_tenant, Invalid, Registry};
use bytes::Bytes;
use std::sync::Arc;

/// An event that passed validation.
#[derive(Debug, Clone)]
pub struct Event {
    /// Id (given or generated).
    pub id: String,
    /// Type.
    pub event_type: String,
    /// Tenant.
    pub tenant: String,
    /// `data` bytes as sent.
    pub data: Bytes,
    /// `changes` bytes as sent.
    pub changes: Option<Bytes>,
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
    if event_type.is_empty() || event_type.len() > 256 || event_type.chars().any(char::is_control) {
        return Err(bad("type", "must be 1 to 256 characters without control characters"));
    }
    let id = match input.id {
        Some(id) => {
            // It travels as the webhook-id header: visible ASCII only.
            if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("id", "must be 1 to 256 visible ASCII characters"));
            }
            id
        }
        None => new_id("evt"),
    };
    let tenant = input.tenant.unwrap_or_else(|| default_tenant.to_string());
    validate_tenant(&tenant).map_err(|e| bad("tenant", &e.message))?;
    Ok(Event {
        id,
        event_type,
        tenant,
        data: Bytes::copy_from_slice(input.data.get().as_bytes()),
        changes: input.changes.map(|c| Bytes::copy_from_slice(c.get().as_bytes())),
    })
}

/// Fans out and appends.
pub struct Ingest {
    log: Arc<dyn Log>,
    registry: Arc<Registry>,
    topic: String,
}

impl Ingest {
    /// Ingest into `topic`.
    pub fn new(log: Arc<dyn Log>, registry: Arc<Registry>, topic: String) -> Self {
        Ingest { log, registry, topic }
    }

    /// Appends every delivery of `events` in one durable append; returns per-event counts.
    pub async fn publish(&self, events: Vec<Event>) -> Result<Vec<Accepted>, LogError> {
        let now = now_ms();
        let mut records = Vec::new();
        let mut accepted = Vec::with_capacity(events.len());
        for event in events {
            let targets = self.registry.matching(&event.tenant, &event.event_type);
            for target in &targets {
                let delivery = Delivery {
                    event_id: event.id.clone(),
                    subscription: target.sub.id.clone(),
                    tenant: event.tenant.clone(),
                    event_type: event.event_type.clone(),
                    attempt: 1,
                    accepted_ms: now,
                    due_ms: now,
                    budget_ms: now,
                    generation: 0,
                    data: event.data.clone(),
                    changes: event.changes.clone(),
                };
                records
                    .push(Record { key: Bytes::copy_from_slice(target.sub.id.as_bytes()), value: delivery.encode() });
            }
            accepted.push(Accepted { id: event.id, deliveries: targets.len() });
        }
        self.log.append(&self.topic, records).await?;
        metrics::counter!(crate::metrics::EVENTS_INGESTED).increment(accepted.len() as u64);
        Ok(accepted)
    }
}
