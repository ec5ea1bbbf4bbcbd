//! Dead-letter entries: what is listed for a delivery that never got through (the record
//! format of the `dlq` topic is in `retry::dead_letters`).

use serde::{Deserialize, Serialize};

/// A delivery parked after its last attempt (the contract's dead-letter fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Entry id: the same for a delivery written twice by a crash, so it lists once.
    pub id: String,
    /// The event's id.
    pub event_id: String,
    /// Subscription the delivery was for.
    pub subscription: String,
    /// The tenant, so a tenant key lists only its own.
    pub tenant: String,
    /// The event's type.
    pub event: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the event was accepted, RFC 3339.
    pub first_attempt_at: String,
    /// When the last attempt ended, RFC 3339.
    pub last_attempt_at: String,
    /// HTTP status of the last attempt, when there was a response.
    pub last_status: Option<u16>,
    /// What went wrong last.
    pub last_error: Option<String>,
}
