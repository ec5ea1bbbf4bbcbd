//! What the history topic carries: an event as accepted (with its payload, so it can be sent
//! again), each attempt as it settled, and state changes that are not attempts (dropped,
//! parked without an attempt, queued again). Records about one delivery may be read in any
//! order across partitions, so a state carries its own time and the newest wins.
//!
//! Records are binary (see [`codec`]): every settled attempt is written once and read once by
//! every process's index, and JSON cost more CPU on that path than the rest of the history
//! (field names, escaping, and the event's `data` parsed on every read). Records written as
//! JSON by earlier versions (their first byte is `{`) are still read.

use crate::model::{rfc3339_ms, Response};
use base64::Engine;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

/// One record of the history topic. Earlier versions wrote it as JSON, externally tagged
/// (`{"event": {…}}`), which is why it still derives `Deserialize`.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
    /// `data` as accepted (JSON text).
    #[serde(deserialize_with = "legacy::raw")]
    pub data: Bytes,
    /// `changes` as accepted (JSON text).
    #[serde(default, deserialize_with = "legacy::raw_opt")]
    pub changes: Option<Bytes>,
    /// The producer's ordering key, if it gave one (a resend keeps it).
    #[serde(default)]
    pub ordering_key: Option<String>,
    /// Its place among the events its process accepted (counted from the process's start):
    /// what orders events accepted in one millisecond (a batch's), which the history's keys
    /// order by their ids' hashes. 0 in records written before it was kept.
    #[serde(default)]
    pub seq: u64,
}

impl EventRecord {
    /// `data`, as the JSON value the API shows.
    pub fn data_json(&self) -> Box<RawValue> {
        json_of(&self.data)
    }

    /// `changes`, as the JSON value the API shows.
    pub fn changes_json(&self) -> Option<Box<RawValue>> {
        self.changes.as_deref().map(json_of)
    }
}

/// Bytes checked as JSON when they were accepted, as a JSON value (`null` should they not be).
fn json_of(bytes: &[u8]) -> Box<RawValue> {
    RawValue::from_string(String::from_utf8_lossy(bytes).into_owned())
        .unwrap_or_else(|_| RawValue::from_string("null".into()).expect("null is JSON"))
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
    #[serde(default)]
    pub status: Option<u16>,
    /// What went wrong, in words.
    #[serde(default)]
    pub error: Option<String>,
    /// The start of the receiver's answer.
    #[serde(default)]
    pub response: Option<Response>,
    /// The delivery's state after this attempt.
    pub state: State,
    /// When the next attempt is due, if one is scheduled.
    #[serde(default)]
    pub next_ms: Option<i64>,
    /// The key an ordered subscription keeps this delivery in order by: while it is retrying
    /// or dead-lettered and blocking, the key's later deliveries wait behind it.
    #[serde(default)]
    pub ordering_key: Option<String>,
}

/// A state change that is not an attempt.
#[derive(Debug, Clone, Deserialize)]
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
    #[serde(default)]
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
    pub fn encode(&self) -> Bytes {
        codec::encode(self)
    }

    /// A record read back (binary, or JSON from an earlier version); `None` for one this
    /// version does not understand.
    pub fn decode(bytes: &[u8]) -> Option<HistoryRecord> {
        match bytes.first() {
            Some(b'{') => serde_json::from_slice(bytes).ok(),
            _ => codec::decode(bytes),
        }
    }
}

/// One version of a delivery's state, as kept in the index: each attempt (and each change
/// without one) adds a version, and the newest is the delivery's state.
#[derive(Debug, Clone, Deserialize)]
pub struct DeliveryState {
    /// Where it stands.
    pub state: State,
    /// When that became so.
    pub at_ms: i64,
    /// The attempt that made it so (0 for a change without one).
    pub attempt: u32,
    /// When the next attempt is due.
    #[serde(default)]
    pub next_ms: Option<i64>,
    /// The event's tenant.
    pub tenant: String,
    /// The event.
    pub event: String,
    /// The attempt's id, for an attempt.
    #[serde(default)]
    pub attempt_id: Option<String>,
}

impl StateRecord {
    /// `delivery` queued again at `at_ms` (a resend, a dead letter's replay): pending until
    /// its attempt settles.
    pub fn pending(delivery: &crate::model::Delivery, at_ms: i64) -> StateRecord {
        StateRecord {
            event_id: delivery.event_id.clone(),
            subscription: delivery.subscription.clone(),
            tenant: delivery.tenant.clone(),
            accepted_ms: delivery.accepted_ms,
            at_ms,
            state: State::Pending,
            error: None,
        }
    }
}

impl DeliveryState {
    /// The bytes the index keeps.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode_state(self)
    }

    /// A version read back from the index (binary, or JSON from an earlier version).
    pub fn decode(bytes: &[u8]) -> Option<DeliveryState> {
        match bytes.first() {
            Some(b'{') => serde_json::from_slice(bytes).ok(),
            _ => codec::decode_state(bytes),
        }
    }

    /// Whether `self` is newer than `other`.
    pub fn newer_than(&self, other: &DeliveryState) -> bool {
        (self.at_ms, self.attempt) > (other.at_ms, other.attempt)
    }
}

/// The value an event's entry in a tenant's list of events keeps: its id and type.
pub fn listing(id: &str, event_type: &str) -> Vec<u8> {
    codec::encode_listing(id, event_type)
}

/// What [`listing`] wrote (or the JSON pair earlier versions wrote).
pub fn read_listing(bytes: &[u8]) -> Option<(String, String)> {
    match bytes.first() {
        Some(b'[') => serde_json::from_slice(bytes).ok(),
        _ => codec::decode_listing(bytes),
    }
}

/// Several records of one partition appended as one record of the topic. A record of the
/// topic costs the same on its way whatever it holds — a producer call, a broker's per-message
/// work, a frame on disk, a consumer's per-message work — and on Kafka that was a third of what
/// history added to a delivery (BENCHMARKS.md, "Delivery history"), so the recorder packs what
/// it appends together into bundles; the index reads their members.
pub fn bundle(members: &[&[u8]]) -> Bytes {
    codec::encode_bundle(members)
}

/// The records one value of the topic holds: a bundle's members, or the value itself. A damaged
/// bundle's unreadable rest comes out as one last member (to be refused when it does not
/// decode); bytes after the members its count names are ignored, as the codec ignores bytes
/// after the fields it knows.
pub fn members(value: &[u8]) -> Members<'_> {
    codec::members(value)
}

pub use codec::Members;

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

/// Reading what earlier versions wrote as JSON.
mod legacy {
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer};
    use serde_json::value::RawValue;

    pub fn raw<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        Ok(Bytes::from(Box::<RawValue>::deserialize(d)?.get().to_owned()))
    }

    pub fn raw_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Bytes>, D::Error> {
        Ok(Option::<Box<RawValue>>::deserialize(d)?.map(|r| Bytes::from(r.get().to_owned())))
    }
}

/// The binary form: a format byte (never `{`, so JSON records of earlier versions are told
/// apart), a kind byte, then the fields in a fixed order — integers little-endian, texts and
/// bytes with a u32 length, optional fields behind a presence byte. A reader ignores bytes
/// after the fields it knows, so later versions can append fields.
mod codec {
    use super::{AttemptRecord, DeliveryState, EventRecord, HistoryRecord, State, StateRecord};
    use crate::model::Response;
    use bytes::{BufMut, Bytes, BytesMut};

    const FORMAT: u8 = 1;
    const EVENT: u8 = b'e';
    const ATTEMPT: u8 = b'a';
    const STATE: u8 = b's';

    struct Out(BytesMut);

    impl Out {
        fn new(kind: u8, capacity: usize) -> Out {
            let mut b = BytesMut::with_capacity(capacity + 2);
            b.put_u8(FORMAT);
            b.put_u8(kind);
            Out(b)
        }
        fn bytes(&mut self, b: &[u8]) {
            self.0.put_u32_le(u32::try_from(b.len()).unwrap_or(u32::MAX));
            self.0.put_slice(&b[..b.len().min(u32::MAX as usize)]);
        }
        fn text(&mut self, s: &str) {
            self.bytes(s.as_bytes());
        }
        fn opt<T>(&mut self, v: Option<T>, put: impl FnOnce(&mut Out, T)) {
            self.0.put_u8(v.is_some() as u8);
            if let Some(v) = v {
                put(self, v);
            }
        }
        fn i64(&mut self, v: i64) {
            self.0.put_i64_le(v);
        }
        fn u32(&mut self, v: u32) {
            self.0.put_u32_le(v);
        }
    }

    struct In<'a>(&'a [u8]);

    impl<'a> In<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            let (head, rest) = (self.0.get(..n)?, self.0.get(n..)?);
            self.0 = rest;
            Some(head)
        }
        fn u8(&mut self) -> Option<u8> {
            Some(self.take(1)?[0])
        }
        fn u16(&mut self) -> Option<u16> {
            Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn i64(&mut self) -> Option<i64> {
            Some(i64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn u64(&mut self) -> Option<u64> {
            Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
        }
        fn bytes(&mut self) -> Option<&'a [u8]> {
            let n = self.u32()? as usize;
            self.take(n)
        }
        fn text(&mut self) -> Option<String> {
            String::from_utf8(self.bytes()?.to_vec()).ok()
        }
        fn opt<T>(&mut self, get: impl FnOnce(&mut In<'a>) -> Option<T>) -> Option<Option<T>> {
            match self.u8()? {
                0 => Some(None),
                1 => get(self).map(Some),
                _ => None,
            }
        }
    }

    fn state_byte(s: State) -> u8 {
        match s {
            State::Pending => 0,
            State::Delivered => 1,
            State::Retrying => 2,
            State::DeadLettered => 3,
            State::Dropped => 4,
        }
    }

    fn state_of(b: u8) -> Option<State> {
        Some(match b {
            0 => State::Pending,
            1 => State::Delivered,
            2 => State::Retrying,
            3 => State::DeadLettered,
            4 => State::Dropped,
            _ => return None,
        })
    }

    pub fn encode(rec: &HistoryRecord) -> Bytes {
        let out = match rec {
            HistoryRecord::Event(e) => {
                let mut o = Out::new(EVENT, 64 + e.id.len() + e.data.len() + e.subscriptions.len() * 32);
                o.i64(e.accepted_ms);
                o.text(&e.id);
                o.text(&e.tenant);
                o.text(&e.event_type);
                o.u32(e.subscriptions.len() as u32);
                for s in &e.subscriptions {
                    o.text(s);
                }
                o.bytes(&e.data);
                o.opt(e.changes.as_deref(), Out::bytes);
                o.opt(e.ordering_key.as_deref(), Out::text);
                o.0.put_u64_le(e.seq);
                o
            }
            HistoryRecord::Attempt(a) => {
                let response = a.response.as_ref().map_or(0, |r| r.body.len() + r.headers.len() * 48);
                let mut o = Out::new(ATTEMPT, 192 + response);
                o.text(&a.id);
                o.text(&a.event_id);
                o.text(&a.subscription);
                o.text(&a.tenant);
                o.text(&a.event_type);
                o.u32(a.attempt);
                o.i64(a.accepted_ms);
                o.i64(a.at_ms);
                o.0.put_u64_le(a.duration_ms);
                o.text(&a.outcome);
                o.opt(a.status, |o, s| o.0.put_u16_le(s));
                o.opt(a.error.as_deref(), Out::text);
                o.opt(a.response.as_ref(), |o, r| {
                    o.0.put_u16_le(r.status);
                    o.u32(r.headers.len() as u32);
                    for (n, v) in &r.headers {
                        o.text(n);
                        o.text(v);
                    }
                    o.bytes(&r.body);
                });
                o.0.put_u8(state_byte(a.state));
                o.opt(a.next_ms, Out::i64);
                o.opt(a.ordering_key.as_deref(), Out::text);
                o
            }
            HistoryRecord::State(s) => {
                let mut o = Out::new(STATE, 96);
                o.text(&s.event_id);
                o.text(&s.subscription);
                o.text(&s.tenant);
                o.i64(s.accepted_ms);
                o.i64(s.at_ms);
                o.0.put_u8(state_byte(s.state));
                o.opt(s.error.as_deref(), Out::text);
                o
            }
        };
        out.0.freeze()
    }

    pub fn decode(bytes: &[u8]) -> Option<HistoryRecord> {
        let mut i = In(bytes);
        if i.u8()? != FORMAT {
            return None;
        }
        Some(match i.u8()? {
            EVENT => HistoryRecord::Event(EventRecord {
                accepted_ms: i.i64()?,
                id: i.text()?,
                tenant: i.text()?,
                event_type: i.text()?,
                subscriptions: {
                    let n = i.u32()? as usize;
                    // Each takes at least its length's 4 bytes: a count larger than the record
                    // could hold is damage, not a reason to allocate.
                    if n > i.0.len() / 4 {
                        return None;
                    }
                    (0..n).map(|_| i.text()).collect::<Option<_>>()?
                },
                data: Bytes::copy_from_slice(i.bytes()?),
                changes: i.opt(|i| i.bytes().map(Bytes::copy_from_slice))?,
                ordering_key: i.opt(In::text)?,
                // Records written before it end here.
                seq: if i.0.is_empty() { 0 } else { i.u64()? },
            }),
            ATTEMPT => HistoryRecord::Attempt(AttemptRecord {
                id: i.text()?,
                event_id: i.text()?,
                subscription: i.text()?,
                tenant: i.text()?,
                event_type: i.text()?,
                attempt: i.u32()?,
                accepted_ms: i.i64()?,
                at_ms: i.i64()?,
                duration_ms: i.u64()?,
                outcome: i.text()?,
                status: i.opt(In::u16)?,
                error: i.opt(In::text)?,
                response: i.opt(|i| {
                    let status = i.u16()?;
                    let n = i.u32()? as usize;
                    if n > i.0.len() / 8 {
                        return None;
                    }
                    let headers = (0..n).map(|_| Some((i.text()?, i.text()?))).collect::<Option<_>>()?;
                    Some(Response { status, headers, body: Bytes::copy_from_slice(i.bytes()?) })
                })?,
                state: state_of(i.u8()?)?,
                next_ms: i.opt(In::i64)?,
                ordering_key: i.opt(In::text)?,
            }),
            STATE => HistoryRecord::State(StateRecord {
                event_id: i.text()?,
                subscription: i.text()?,
                tenant: i.text()?,
                accepted_ms: i.i64()?,
                at_ms: i.i64()?,
                state: state_of(i.u8()?)?,
                error: i.opt(In::text)?,
            }),
            _ => return None,
        })
    }

    const BUNDLE: u8 = b'b';

    /// `FORMAT`, `BUNDLE`, the number of members (u32), then each member with its length.
    pub fn encode_bundle(members: &[&[u8]]) -> Bytes {
        let size = members.iter().map(|m| m.len() + 4).sum::<usize>();
        let mut o = Out::new(BUNDLE, size + 4);
        o.u32(members.len() as u32);
        for m in members {
            o.bytes(m);
        }
        o.0.freeze()
    }

    /// The members of a value of the topic (see [`super::members`]).
    pub struct Members<'a> {
        rest: &'a [u8],
        left: usize,
        bundled: bool,
    }

    impl Members<'_> {
        /// How many records are left, at most (a damaged bundle's count cannot exceed what
        /// its bytes could hold).
        pub fn at_most(&self) -> usize {
            self.left
        }
    }

    impl<'a> Iterator for Members<'a> {
        type Item = &'a [u8];

        fn next(&mut self) -> Option<&'a [u8]> {
            if self.left == 0 {
                return None;
            }
            self.left -= 1;
            let mut i = In(self.rest);
            // A plain record is its own only member.
            let member = if self.bundled { i.bytes() } else { None };
            match member {
                Some(member) => {
                    self.rest = i.0;
                    Some(member)
                }
                None => {
                    self.left = 0;
                    Some(std::mem::take(&mut self.rest))
                }
            }
        }
    }

    pub fn members(value: &[u8]) -> Members<'_> {
        let mut i = In(value);
        if let (Some(FORMAT), Some(BUNDLE), Some(count)) = (i.u8(), i.u8(), i.u32()) {
            // Each member takes at least its length's 4 bytes.
            return Members { rest: i.0, left: (count as usize).min(i.0.len() / 4), bundled: true };
        }
        Members { rest: value, left: 1, bundled: false }
    }

    const LISTING: u8 = b'l';

    pub fn encode_listing(id: &str, event_type: &str) -> Vec<u8> {
        let mut o = Out::new(LISTING, 8 + id.len() + event_type.len());
        o.text(id);
        o.text(event_type);
        o.0.to_vec()
    }

    pub fn decode_listing(bytes: &[u8]) -> Option<(String, String)> {
        let mut i = In(bytes);
        if (i.u8()?, i.u8()?) != (FORMAT, LISTING) {
            return None;
        }
        Some((i.text()?, i.text()?))
    }

    pub fn encode_state(s: &DeliveryState) -> Vec<u8> {
        let mut o = Out::new(STATE, 64 + s.tenant.len() + s.event.len());
        o.0.put_u8(state_byte(s.state));
        o.i64(s.at_ms);
        o.u32(s.attempt);
        o.opt(s.next_ms, Out::i64);
        o.text(&s.tenant);
        o.text(&s.event);
        o.opt(s.attempt_id.as_deref(), Out::text);
        o.0.to_vec()
    }

    pub fn decode_state(bytes: &[u8]) -> Option<DeliveryState> {
        let mut i = In(bytes);
        if (i.u8()?, i.u8()?) != (FORMAT, STATE) {
            return None;
        }
        Some(DeliveryState {
            state: state_of(i.u8()?)?,
            at_ms: i.i64()?,
            attempt: i.u32()?,
            next_ms: i.opt(In::i64)?,
            tenant: i.text()?,
            event: i.text()?,
            attempt_id: i.opt(In::text)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bundle_holds_its_members_in_order_and_a_plain_record_is_its_own() {
        let encoded: Vec<Bytes> = records().iter().map(HistoryRecord::encode).collect();
        let refs: Vec<&[u8]> = encoded.iter().map(|b| &b[..]).collect();
        let bundle = bundle(&refs);
        let members = members(&bundle);
        assert_eq!(members.at_most(), encoded.len());
        let back: Vec<HistoryRecord> = members.map(|m| HistoryRecord::decode(m).expect("a member decodes")).collect();
        assert_eq!(format!("{back:?}"), format!("{:?}", records()));

        let plain: Vec<&[u8]> = super::members(&encoded[1]).collect();
        assert_eq!(plain, [&encoded[1][..]]);
        let json = br#"{"kind":"state"}"#;
        assert_eq!(super::members(json).collect::<Vec<_>>(), [&json[..]], "an earlier version's JSON record");
    }

    #[test]
    fn a_damaged_bundle_gives_what_it_can_and_never_more_than_its_bytes_hold() {
        let encoded: Vec<Bytes> = records().iter().map(HistoryRecord::encode).collect();
        let refs: Vec<&[u8]> = encoded.iter().map(|b| &b[..]).collect();
        let bundle = bundle(&refs);
        // Cut in the middle of the second member: the first comes out whole, then the rest once.
        let cut = 2 + 4 + 4 + encoded[0].len() + 4 + encoded[1].len() / 2;
        let got: Vec<&[u8]> = members(&bundle[..cut]).collect();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0], &encoded[0][..]);
        assert!(HistoryRecord::decode(got[1]).is_none());
        // A count far beyond the bytes.
        let mut lying = bundle.to_vec();
        lying[2..6].copy_from_slice(&u32::MAX.to_le_bytes());
        let members = members(&lying);
        assert!(members.at_most() <= lying.len() / 4);
        let got: Vec<&[u8]> = members.collect();
        assert_eq!(got[..encoded.len()], refs[..], "the members that are there");
        assert_eq!(got.len(), encoded.len() + 1, "then what is left, once (empty here)");
    }

    fn attempt() -> AttemptRecord {
        AttemptRecord {
            id: "att_1".into(),
            event_id: "evt_1".into(),
            subscription: "sub_1".into(),
            tenant: "acme".into(),
            event_type: "order.created".into(),
            attempt: 3,
            accepted_ms: 1_700_000_000_000,
            at_ms: 1_700_000_000_500,
            duration_ms: 12,
            outcome: "failed".into(),
            status: Some(503),
            error: Some("receiver answered 503 Service Unavailable".into()),
            response: Some(Response {
                status: 503,
                headers: vec![("content-type".into(), "text/plain".into())],
                body: Bytes::from_static(b"busy \xff"),
            }),
            state: State::Retrying,
            next_ms: Some(1_700_000_005_000),
            ordering_key: Some("order-1".into()),
        }
    }

    fn records() -> Vec<HistoryRecord> {
        vec![
            HistoryRecord::Event(EventRecord {
                id: "e".into(),
                tenant: "t".into(),
                event_type: "T".into(),
                accepted_ms: 1,
                subscriptions: vec!["s".into(), "s2".into()],
                data: Bytes::from_static(br#"{"a": [1, 2.50]}"#),
                changes: Some(Bytes::from_static(b"[]")),
                ordering_key: None,
                seq: 7,
            }),
            HistoryRecord::Attempt(attempt()),
            HistoryRecord::Attempt(AttemptRecord {
                status: None,
                error: None,
                response: None,
                next_ms: None,
                ..attempt()
            }),
            HistoryRecord::State(StateRecord {
                event_id: "e".into(),
                subscription: "s".into(),
                tenant: "t".into(),
                accepted_ms: 1,
                at_ms: 2,
                state: State::Dropped,
                error: Some("deleted".into()),
            }),
        ]
    }

    #[test]
    fn every_kind_reads_back_field_for_field() {
        for rec in records() {
            let bytes = rec.encode();
            assert_ne!(bytes[0], b'{', "told apart from JSON");
            let back = HistoryRecord::decode(&bytes).expect("reads back");
            assert_eq!(format!("{back:?}"), format!("{rec:?}"));
        }
        let state = DeliveryState {
            state: State::Retrying,
            at_ms: 5,
            attempt: 2,
            next_ms: Some(9),
            tenant: "t".into(),
            event: "e".into(),
            attempt_id: Some("att".into()),
        };
        assert_eq!(format!("{:?}", DeliveryState::decode(&state.encode())), format!("{:?}", Some(state)));
    }

    #[test]
    fn damaged_records_are_refused_without_a_panic() {
        for rec in records() {
            let bytes = rec.encode();
            for cut in 0..bytes.len() {
                let _ = HistoryRecord::decode(&bytes[..cut]);
                let mut flipped = bytes.to_vec();
                flipped[cut] ^= 0xff;
                let _ = HistoryRecord::decode(&flipped);
            }
            assert!(HistoryRecord::decode(&bytes[..bytes.len() / 2]).is_none(), "half a record is not one");
        }
        let huge_count =
            [1, b'e', 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
        assert!(HistoryRecord::decode(&huge_count).is_none());
    }

    #[test]
    fn an_event_written_before_its_place_was_kept_reads_with_place_0() {
        let bytes = records()[0].encode();
        let Some(HistoryRecord::Event(old)) = HistoryRecord::decode(&bytes[..bytes.len() - 8]) else { panic!("read") };
        let Some(HistoryRecord::Event(new)) = HistoryRecord::decode(&bytes) else { panic!("read") };
        assert_eq!((old.seq, new.seq, old.ordering_key, old.id), (0, 7, None, new.id));
    }

    #[test]
    fn json_records_of_earlier_versions_are_still_read() {
        let event = br#"{"event":{"id":"e","tenant":"t","type":"T","accepted_ms":1,"subscriptions":["s"],"data":{"a": [1, 2.50]}}}"#;
        let Some(HistoryRecord::Event(e)) = HistoryRecord::decode(event) else { panic!("an event") };
        assert_eq!(&e.data[..], br#"{"a": [1, 2.50]}"#, "the producer's bytes, untouched");
        assert_eq!(e.data_json().get(), r#"{"a": [1, 2.50]}"#);
        let attempt = br#"{"attempt":{"id":"a","event_id":"e","subscription":"s","tenant":"t","type":"T","attempt":1,"accepted_ms":1,"at_ms":2,"duration_ms":3,"outcome":"delivered","status":200,"response":{"status":200,"headers":[["x","y"]],"body":"b2s="},"state":"delivered"}}"#;
        let Some(HistoryRecord::Attempt(a)) = HistoryRecord::decode(attempt) else { panic!("an attempt") };
        assert_eq!((a.state, a.response.map(|r| r.body)), (State::Delivered, Some(Bytes::from_static(b"ok"))));
        let state =
            br#"{"state":"retrying","at_ms":5,"attempt":2,"next_ms":9,"tenant":"t","event":"e","attempt_id":"att"}"#;
        assert_eq!(DeliveryState::decode(state).map(|s| (s.state, s.next_ms)), Some((State::Retrying, Some(9))));
    }
}
