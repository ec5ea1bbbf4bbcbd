//! Dead-letter entries: what the `dlq` topic holds for a delivery that never got through.
//! A record is `u32 meta length | meta JSON | delivery record`, so the entry can be listed
//! without decoding the payload and replayed with it.

use super::Delivery;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// A delivery parked after its last attempt (the contract's dead-letter fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Entry id.
    pub id: String,
    /// The event's id.
    pub event_id: String,
    /// Subscription the delivery was for.
    pub subscription: String,
    /// Tenant.
    pub tenant: String,
    /// Event type.
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

impl DeadLetter {
    /// Encodes the entry with the delivery it parks.
    pub fn encode(&self, delivery: &Bytes) -> Bytes {
        let meta = serde_json::to_vec(self).expect("dead letter serializes");
        let mut buf = BytesMut::with_capacity(4 + meta.len() + delivery.len());
        buf.put_u32_le(meta.len() as u32);
        buf.put_slice(&meta);
        buf.put_slice(delivery);
        buf.freeze()
    }

    /// Decodes an entry and the raw delivery record it carries.
    pub fn decode(mut bytes: Bytes) -> Option<(DeadLetter, Bytes)> {
        if bytes.len() < 4 {
            return None;
        }
        let len = bytes.get_u32_le() as usize;
        if bytes.len() < len {
            return None;
        }
        let meta = bytes.split_to(len);
        Some((serde_json::from_slice(&meta).ok()?, bytes))
    }

    /// The delivery this entry parks, if its record is intact.
    pub fn delivery(raw: &Bytes) -> Option<Delivery> {
        Delivery::decode(raw.clone()).ok()
    }
}
