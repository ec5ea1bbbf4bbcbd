//! An event as a producer publishes it.

use serde::Deserialize;
use serde_json::value::RawValue;

/// Longest accepted event id and type: both travel as AMQP short strings (the message id and
/// type), which hold 255 bytes.
pub const MAX_EVENT_ID_LEN: usize = 255;

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
}
