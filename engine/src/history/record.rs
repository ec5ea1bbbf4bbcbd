//! What the history topic carries: an event as accepted (with its payload, so it can be sent
//! again), each attempt as it settled, and state changes that are not attempts (dropped,
//! parked without an attempt, queued again). Records about one delivery may be read in any
//! order across partitions, so a state carries its own time and the newest wins.

use crate::model::{rfc3339_ms, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// One record of the history topic, externally tagged (`{"event": {…}}`): an internally tagged
/// enum would buffer the record and lose the raw `data`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryRecord {
    /// An event was accepted.
    Event(EventRecord),
    /// An attempt settled.
    Attempt(AttemptRecord),
    /// A delivery's state changed without an attempt.
    State(StateRecord),
}

/// An accepted event: what `GET /v1/events/{id}` shows and what a resend sends again.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    /// The event's id (`webhook-id`).
    pub id: String,
    /// Its tenant.
    pub tenant: String,
    /// Its type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// When it was accepted, ms since the epoch.
    pub accepted_ms: i64,
    /// The subscriptions it matched.
    pub subscriptions: Vec<String>,
    /// `data` as the producer sent it.
    pub data: Box<RawValue>,
    /// `changes` as the producer sent them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub changes: Option<Box<RawValue>>,
    /// The producer's ordering key, if it gave one (a resend keeps it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Accepted (or queued again), no attempt settled since.
    Pending,
    /// The receiver took it.
    Delivered,
    /// The last attempt failed; another is scheduled.
    Retrying,
    /// Parked in the dead-letter topic.
    DeadLettered,
    /// Its subscription was deleted.
    Dropped,
}

impl State {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Retrying => "retrying",
            State::DeadLettered => "dead_lettered",
            State::Dropped => "dropped",
        }
    }
}

/// One settled attempt, from its typed outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// The attempt's own id.
    pub id: String,
    /// The event.
    pub event_id: String,
    /// The subscription.
    pub subscription: String,
    /// The tenant.
    pub tenant: String,
    /// The event's type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// 1-based, within the delivery's attempt budget.
    pub attempt: u32,
    /// When the event was accepted (where the delivery's state is kept).
    pub accepted_ms: i64,
    /// When the attempt started.
    pub at_ms: i64,
    /// How long it took.
    pub duration_ms: u64,
    /// The outcome's label (`delivered`, `failed`, `timeout`, …).
    pub outcome: String,
    /// The receiver's status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong, in words.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The start of the receiver's answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<Response>,
    /// The delivery's state after this attempt.
    pub state: State,
    /// When the next attempt is due, if one is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<i64>,
    /// The key an ordered subscription keeps this delivery in order by: while it is retrying
    /// or dead-lettered and blocking, the key's later deliveries wait behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ordering_key: Option<String>,
}

/// A state change that is not an attempt.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateRecord {
    /// The event.
    pub event_id: String,
    /// The subscription.
    pub subscription: String,
    /// The tenant.
    pub tenant: String,
    /// When the event was accepted.
    pub accepted_ms: i64,
    /// When the change happened.
    pub at_ms: i64,
    /// The new state.
    pub state: State,
    /// Why, when it is a failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HistoryRecord {
    /// The key the record is appended under: one subscription's records share a partition,
    /// so its attempts are read in the order they were made.
    pub fn key(&self) -> &str {
        match self {
            HistoryRecord::Event(e) => &e.id,
            HistoryRecord::Attempt(a) => &a.subscription,
            HistoryRecord::State(s) => &s.subscription,
        }
    }

    /// The record's bytes on the topic.
    pub fn encode(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).expect("history records serialize"))
    }

    /// A record read back; `None` for one this version does not understand.
    pub fn decode(bytes: &[u8]) -> Option<HistoryRecord> {
        serde_json::from_slice(bytes).ok()
    }
}

/// One version of a delivery's state, as kept in the index: each attempt (and each change
/// without one) adds a version, and the newest is the delivery's state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Where it stands.
    pub state: State,
    /// When that became so.
    pub at_ms: i64,
    /// The attempt that made it so (0 for a change without one).
    pub attempt: u32,
    /// When the next attempt is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_ms: Option<i64>,
    /// The event's tenant.
    pub tenant: String,
    /// The event.
    pub event: String,
    /// The attempt's id, for an attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt_id: Option<String>,
}

impl DeliveryState {
    /// Whether `self` is newer than `other`.
    pub fn newer_than(&self, other: &DeliveryState) -> bool {
        (self.at_ms, self.attempt) > (other.at_ms, other.attempt)
    }
}

/// The API's view of an attempt (what `GET /v1/attempts` lists), made once when it is indexed.
pub fn attempt_view(a: &AttemptRecord) -> serde_json::Value {
    let response = a.response.as_ref().map(|r| {
        let headers: serde_json::Map<String, serde_json::Value> =
            r.headers.iter().map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone()))).collect();
        let (body, encoding) = match std::str::from_utf8(&r.body) {
            Ok(text) => (text.to_string(), "text"),
            Err(_) => (base64::engine::general_purpose::STANDARD.encode(&r.body), "base64"),
        };
        serde_json::json!({ "status": r.status, "headers": headers, "body": body, "body_encoding": encoding })
    });
    serde_json::json!({
        "id": a.id,
        "event_id": a.event_id,
        "subscription": a.subscription,
        "tenant": a.tenant,
        "event": a.event_type,
        "attempt": a.attempt,
        "at": rfc3339_ms(a.at_ms),
        "duration_ms": a.duration_ms,
        "outcome": a.outcome,
        "status": a.status,
        "error": a.error,
        "response": response,
        "state": a.state.as_str(),
        "next_attempt_at": a.next_ms.map(rfc3339_ms),
        "ordering_key": a.ordering_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back() {
        let event = HistoryRecord::Event(EventRecord {
            id: "e".into(),
            tenant: "t".into(),
            event_type: "T".into(),
            accepted_ms: 1,
            subscriptions: vec!["s".into()],
            data: RawValue::from_string(r#"{"a": [1, 2.50]}"#.into()).unwrap(),
            changes: None,
            ordering_key: None,
        });
        let HistoryRecord::Event(back) = HistoryRecord::decode(&event.encode()).expect("reads back") else {
            panic!("an event")
        };
        assert_eq!(back.data.get(), r#"{"a": [1, 2.50]}"#, "the producer's bytes, untouched");
        let state = HistoryRecord::State(StateRecord {
            event_id: "e".into(),
            subscription: "s".into(),
            tenant: "t".into(),
            accepted_ms: 1,
            at_ms: 2,
            state: State::Dropped,
            error: None,
        });
        assert!(matches!(HistoryRecord::decode(&state.encode()), Some(HistoryRecord::State(_))));
    }
}
