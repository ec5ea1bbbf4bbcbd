//! The delivery record: one event for one subscription, as it sits in the `deliveries` and
//! retry topics. A compact binary prefix of metadata is followed by the event's `data` (and
//! `changes`) bytes exactly as the producer sent them, so the payload is never re-serialised
//! and decoding shares the log's buffer instead of copying it.

use super::trace::TraceContext;
use bytes::{Buf, BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
const HAS_CHANGES: u8 = 1;
/// A trace context follows `changes` (records without one, and older records, lack the bit).
const HAS_TRACE: u8 = 2;
/// An ordering key follows the trace context (only ordered subscriptions' deliveries have one).
const HAS_ORDERING_KEY: u8 = 4;
/// Flag: `data` and `changes` are the bytes as sent (see [`Delivery::as_sent`]). A version
/// before it reads past the bit, and sends the bytes stored as they are, as it always did.
const AS_SENT: u8 = 8;

/// One delivery of one event to one subscription.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Event id; becomes `webhook-id`, unchanged across attempts.
    pub event_id: String,
    /// Subscription id (also the record key).
    pub subscription: String,
    /// Tenant that owns the event.
    pub tenant: String,
    /// Event type (the AMQP routing key's default).
    pub event_type: String,
    /// The attempt this record is for, from 1.
    pub attempt: u32,
    /// When the event was accepted (ms since epoch).
    pub accepted_ms: i64,
    /// Not to be attempted before this time (ms since epoch).
    pub due_ms: i64,
    /// Start of the attempt budget (`max_age` counts from here): acceptance, or the replay.
    pub budget_ms: i64,
    /// How often this delivery was replayed from the dead-letter topic.
    pub generation: u32,
    /// The producer's `data`, bytes as sent.
    pub data: Bytes,
    /// The producer's `changes`, bytes as sent, if any.
    pub changes: Option<Bytes>,
    /// The producer's trace context, if it sent one.
    pub trace: Option<TraceContext>,
    /// The key whose deliveries an ordered subscription makes one after another; `None` for
    /// an unordered delivery.
    pub ordering_key: Option<String>,
    /// Whether `data` and `changes` are the producer's bytes as sent, differing from
    /// JavaScript's form of them (made for a `raw_bytes` subscription): if the subscription
    /// has changed to a form that carries JavaScript's since, it is worked out when sent.
    pub as_sent: bool,
}

/// Why a record's bytes are not a delivery.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record ends before its fields do.
    #[error("delivery record truncated")]
    Truncated,
    /// A record format this build does not know.
    #[error("unknown delivery record version {0}")]
    Version(u8),
    /// A text field is not UTF-8.
    #[error("delivery record field is not UTF-8")]
    Utf8,
}

/// Writes a string of at most 64 KiB with its length (u16) first: the record formats' strings
/// (deliveries', ordering markers').
pub(crate) fn put_str(buf: &mut BytesMut, s: &str) {
    buf.put_u16_le(s.len() as u16);
    buf.put_slice(s.as_bytes());
}

/// Reads what [`put_str`] wrote.
pub(crate) fn get_str(buf: &mut Bytes) -> Result<String, DecodeError> {
    let b = get_bytes(buf, 2)?;
    String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8)
}

fn get_bytes(buf: &mut Bytes, width: usize) -> Result<Bytes, DecodeError> {
    if buf.remaining() < width {
        return Err(DecodeError::Truncated);
    }
    let len = if width == 2 { buf.get_u16_le() as usize } else { buf.get_u32_le() as usize };
    if buf.remaining() < len {
        return Err(DecodeError::Truncated);
    }
    Ok(buf.split_to(len))
}

impl Delivery {
    /// The first attempt of a newly accepted event, due at once; no `changes`.
    pub fn first_attempt(
        event_id: String,
        subscription: String,
        tenant: String,
        event_type: String,
        data: Bytes,
        now_ms: i64,
    ) -> Delivery {
        Delivery {
            event_id,
            subscription,
            tenant,
            event_type,
            attempt: 1,
            accepted_ms: now_ms,
            due_ms: now_ms,
            budget_ms: now_ms,
            generation: 0,
            data,
            changes: None,
            trace: None,
            ordering_key: None,
            as_sent: false,
        }
    }

    /// The length of [`Delivery::encode`]'s bytes (at most), without making them.
    pub fn encoded_len(&self) -> usize {
        42 + self.event_id.len()
            + self.subscription.len()
            + self.tenant.len()
            + self.event_type.len()
            + self.data.len()
            + self.changes.as_ref().map_or(0, |c| c.len() + 4)
            + self.trace.as_ref().map_or(0, TraceContext::encoded_len)
            + self.ordering_key.as_ref().map_or(0, |k| k.len() + 2)
            + 8
    }

    /// Serialises the record.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        buf.put_u8(VERSION);
        let trace = if self.trace.is_some() { HAS_TRACE } else { 0 };
        let key = if self.ordering_key.is_some() { HAS_ORDERING_KEY } else { 0 };
        let as_sent = if self.as_sent { AS_SENT } else { 0 };
        buf.put_u8(if self.changes.is_some() { HAS_CHANGES } else { 0 } | trace | key | as_sent);
        buf.put_u32_le(self.attempt);
        buf.put_i64_le(self.accepted_ms);
        buf.put_i64_le(self.due_ms);
        buf.put_i64_le(self.budget_ms);
        buf.put_u32_le(self.generation);
        put_str(&mut buf, &self.event_id);
        put_str(&mut buf, &self.subscription);
        put_str(&mut buf, &self.tenant);
        put_str(&mut buf, &self.event_type);
        buf.put_u32_le(self.data.len() as u32);
        buf.put_slice(&self.data);
        if let Some(changes) = &self.changes {
            buf.put_u32_le(changes.len() as u32);
            buf.put_slice(changes);
        }
        if let Some(trace) = &self.trace {
            trace.encode(&mut buf);
        }
        if let Some(key) = &self.ordering_key {
            put_str(&mut buf, key);
        }
        buf.freeze()
    }

    /// Parses a record; `data` and `changes` share `bytes`' buffer.
    pub fn decode(mut bytes: Bytes) -> Result<Delivery, DecodeError> {
        if bytes.remaining() < 34 {
            return Err(DecodeError::Truncated);
        }
        let version = bytes.get_u8();
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let flags = bytes.get_u8();
        let attempt = bytes.get_u32_le();
        let accepted_ms = bytes.get_i64_le();
        let due_ms = bytes.get_i64_le();
        let budget_ms = bytes.get_i64_le();
        let generation = bytes.get_u32_le();
        let event_id = get_str(&mut bytes)?;
        let subscription = get_str(&mut bytes)?;
        let tenant = get_str(&mut bytes)?;
        let event_type = get_str(&mut bytes)?;
        let data = get_bytes(&mut bytes, 4)?;
        let changes = if flags & HAS_CHANGES != 0 { Some(get_bytes(&mut bytes, 4)?) } else { None };
        let trace = if flags & HAS_TRACE != 0 {
            Some(TraceContext::decode(&mut bytes).ok_or(DecodeError::Truncated)?)
        } else {
            None
        };
        let ordering_key = if flags & HAS_ORDERING_KEY != 0 { Some(get_str(&mut bytes)?) } else { None };
        Ok(Delivery {
            event_id,
            subscription,
            tenant,
            event_type,
            attempt,
            accepted_ms,
            due_ms,
            budget_ms,
            generation,
            data,
            changes,
            trace,
            ordering_key,
            as_sent: flags & AS_SENT != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Delivery {
        Delivery {
            event_id: "evt_1".into(),
            subscription: "sub_1".into(),
            tenant: "acme".into(),
            event_type: "OrderCreated".into(),
            attempt: 3,
            accepted_ms: 1_700_000_000_000,
            due_ms: 1_700_000_060_000,
            budget_ms: 1_700_000_000_000,
            generation: 2,
            data: Bytes::from_static(br#"{"orderId": "A-1"}"#),
            changes: Some(Bytes::from_static(br#"[{"op":"replace"}]"#)),
            trace: None,
            ordering_key: None,
            as_sent: false,
        }
    }

    #[test]
    fn round_trips_with_and_without_changes_and_a_trace() {
        let d = sample();
        assert_eq!(Delivery::decode(d.encode()).unwrap(), d);
        let d = Delivery { changes: None, ..sample() };
        assert_eq!(Delivery::decode(d.encode()).unwrap(), d);
        let trace = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", Some("k=v")).ok();
        for changes in [None, sample().changes] {
            for ordering_key in [None, Some("container-7".to_string())] {
                for as_sent in [false, true] {
                    let d = Delivery {
                        changes: changes.clone(),
                        trace: trace.clone(),
                        ordering_key: ordering_key.clone(),
                        as_sent,
                        ..sample()
                    };
                    assert_eq!(Delivery::decode(d.encode()).unwrap(), d);
                }
            }
        }
    }

    #[test]
    fn data_is_not_copied_on_decode() {
        let bytes = sample().encode();
        let d = Delivery::decode(bytes.clone()).unwrap();
        let inside = bytes.as_ptr_range();
        assert!(inside.contains(&d.data.as_ptr()));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let full = sample().encode();
        for cut in 0..full.len() {
            assert!(Delivery::decode(full.slice(..cut)).is_err(), "cut at {cut}");
        }
        assert_eq!(Delivery::decode(Bytes::from_static(&[9; 40])), Err(DecodeError::Version(9)));
    }
}
