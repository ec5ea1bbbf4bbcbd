//! An event as a producer publishes it.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest accepted event id and type: both travel as AMQP short strings (the message id and
/// type), which hold 255 bytes.
pub const MAX_EVENT_ID_LEN: usize = 255;

/// Longest ordering key (an event's `ordering_key`, or the value a subscription's pointer finds):
/// an ordered subscription keeps one small state per blocked key, and this bounds its size.
pub const MAX_ORDERING_KEY_LEN: usize = 255;

/// Whether `key` can be an ordering key: the one rule events' `ordering_key`, the keys a
/// subscription's pointer finds and the skip API share. Returns what is wrong, if anything.
pub fn check_ordering_key(key: &str) -> Result<(), &'static str> {
    if key.is_empty() || key.len() > MAX_ORDERING_KEY_LEN {
        return Err("must be 1 to 255 bytes");
    }
    Ok(())
}

/// Whether `id` can be an event's id: the one rule publishes, lookups and skips share. It
/// travels as the `webhook-id` header, so visible ASCII only. Returns what is wrong, if anything.
pub fn check_event_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be 1 to 255 visible ASCII characters");
    }
    Ok(())
}

/// Whether a URL's path can name `name` (`/v1/events/{id}`, `/v1/event-types/{name}`):
/// clients resolve `.` and `..` away (`%2E` too), so what was made under them could never be
/// reached again. Asked where an event or a type is made, not of one made before (a lookup
/// by query, a subscription's `events`, a dead letter's replay still name it).
pub fn named_in_a_url(name: &str) -> Result<(), &'static str> {
    if matches!(name, "." | "..") {
        return Err("cannot be . or .. (no URL can name it)");
    }
    Ok(())
}

/// Whether `name` can be an event type: the one rule events, subscriptions' `events` and the
/// event-type catalogue share. Returns what is wrong, if anything.
pub fn check_event_type(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > MAX_EVENT_ID_LEN || name.chars().any(char::is_control) {
        return Err("must be 1 to 255 bytes without control characters");
    }
    Ok(())
}

/// `POST /v1/events` body. `data` and `changes` are kept as the exact bytes sent.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventInput {
    /// Idempotency key; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Event type, matched against subscriptions' `events`.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Tenant to publish for (admin only).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Any JSON.
    pub data: Box<RawValue>,
    /// Optional change description, any JSON.
    #[serde(default)]
    pub changes: Option<Box<RawValue>>,
    /// W3C `traceparent` of the producer's span (else the request's `traceparent` header).
    #[serde(default)]
    pub traceparent: Option<String>,
    /// W3C `tracestate` going with `traceparent`.
    #[serde(default)]
    pub tracestate: Option<String>,
    /// The key an ordered subscription keeps this event's deliveries in order by (else the
    /// subscription's `ordering.key` pointer finds one).
    #[serde(default)]
    pub ordering_key: Option<String>,
}
