//! Request bodies for one delivery attempt. The producer's `data` bytes are shared into the
//! body as they are (no copy, no re-serialisation); only the small envelope around them is
//! written per attempt, because `deliveryAttempt`, `pendingRetries` and `sentAt` change.

use crate::canonical;
use crate::model::{rfc3339_ms, Delivery, PayloadFormat};
use bytes::{BufMut, Bytes, BytesMut};
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A request body made of shared chunks, sent in order.
#[derive(Debug, Clone, Default)]
pub struct Body {
    chunks: VecDeque<Bytes>,
    len: u64,
}

impl Body {
    /// A body of the given chunks.
    pub fn new(chunks: impl IntoIterator<Item = Bytes>) -> Body {
        let chunks: VecDeque<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        let len = chunks.iter().map(|c| c.len() as u64).sum();
        Body { chunks, len }
    }

    /// The chunks, for signing.
    pub fn chunks(&self) -> &[Bytes] {
        self.chunks.as_slices().0
    }

    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the body is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The body as one contiguous buffer (copies; for tests and the AMQP transport).
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::with_capacity(self.len as usize);
        self.chunks.iter().for_each(|c| out.extend_from_slice(c));
        out.freeze()
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
    }
}

fn push_json_str(buf: &mut BytesMut, s: &str) {
    serde_json::to_writer(buf.writer(), s).expect("writing to memory cannot fail");
}

/// The body for `delivery` in `format`: the envelope for this attempt, or the raw data.
pub fn build(format: PayloadFormat, delivery: &Delivery, pending_retries: u32, sent_at_ms: i64) -> Body {
    if format.canonical() && delivery.as_sent {
        // Made for `raw_bytes` before the subscription changed to a form that carries
        // JavaScript's: worked out now (what the guides' receivers verify). Only such
        // deliveries pay for it; the text was checked at ingest, so it cannot fail.
        let js = |b: &Bytes| canonical::canonical(b).unwrap_or_else(|_| b.clone());
        let changes = delivery.changes.as_ref().map(js);
        let d = Delivery { data: js(&delivery.data), changes, as_sent: false, ..delivery.clone() };
        return build(format, &d, pending_retries, sent_at_ms);
    }
    match format {
        PayloadFormat::Raw | PayloadFormat::RawBytes => Body::new([delivery.data.clone()]),
        PayloadFormat::Envelope => envelope(delivery, pending_retries, sent_at_ms),
    }
}

/// `{"id","event","tenant","data","changes"?,"deliveryAttempt","pendingRetries","sentAt"}`.
fn envelope(d: &Delivery, pending_retries: u32, sent_at_ms: i64) -> Body {
    // Head and tail share one allocation (this runs once per attempt).
    let mut buf = BytesMut::with_capacity(192 + d.event_id.len() + d.event_type.len() + d.tenant.len());
    buf.put_slice(b"{\"id\":");
    push_json_str(&mut buf, &d.event_id);
    buf.put_slice(b",\"event\":");
    push_json_str(&mut buf, &d.event_type);
    buf.put_slice(b",\"tenant\":");
    push_json_str(&mut buf, &d.tenant);
    buf.put_slice(b",\"data\":");
    let head = buf.split().freeze();
    let _ = write!(buf, ",\"deliveryAttempt\":{},\"pendingRetries\":{},\"sentAt\":", d.attempt, pending_retries);
    push_json_str(&mut buf, &rfc3339_ms(sent_at_ms));
    buf.put_u8(b'}');
    let tail = buf.freeze();
    match &d.changes {
        Some(changes) => Body::new([head, d.data.clone(), Bytes::from_static(b",\"changes\":"), changes.clone(), tail]),
        None => Body::new([head, d.data.clone(), tail]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(changes: Option<&'static str>) -> Delivery {
        Delivery {
            event_id: "evt_\"quoted\"".into(),
            subscription: "sub_1".into(),
            tenant: "acme".into(),
            event_type: "OrderCreated".into(),
            attempt: 2,
            accepted_ms: 0,
            due_ms: 0,
            budget_ms: 0,
            generation: 0,
            data: Bytes::from_static(br#"{"orderId": "A-1",  "n": 1.50}"#),
            changes: changes.map(|c| Bytes::from_static(c.as_bytes())),
            trace: None,
            ordering_key: None,
            as_sent: false,
        }
    }

    #[test]
    fn envelope_is_valid_json_with_data_bytes_untouched() {
        let d = delivery(Some(r#"[{"op":"add"}]"#));
        let body = build(PayloadFormat::Envelope, &d, 7, 1_700_000_000_123).to_bytes();
        let text = std::str::from_utf8(&body).unwrap();
        assert!(text.contains(r#""data":{"orderId": "A-1",  "n": 1.50}"#), "{text}");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "evt_\"quoted\"");
        assert_eq!(v["event"], "OrderCreated");
        assert_eq!(v["tenant"], "acme");
        assert_eq!(v["changes"][0]["op"], "add");
        assert_eq!(v["deliveryAttempt"], 2);
        assert_eq!(v["pendingRetries"], 7);
        assert_eq!(v["sentAt"], "2023-11-14T22:13:20.123Z");
    }

    #[test]
    fn envelope_without_changes_has_no_changes_key() {
        let body = build(PayloadFormat::Envelope, &delivery(None), 0, 0).to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v.get("changes").is_none());
    }

    /// One made as sent for `raw_bytes`, sent after its subscription changed to a form that
    /// carries JavaScript's, is sent in that form; one made in JavaScript's form is shared
    /// into the body as it is.
    #[test]
    fn a_delivery_made_as_sent_goes_in_javascript_s_form_when_the_form_asks_for_it() {
        let d = Delivery { as_sent: true, ..delivery(Some(r#"[ {"op" : "add"} ]"#)) };
        assert_eq!(&build(PayloadFormat::RawBytes, &d, 0, 0).to_bytes()[..], br#"{"orderId": "A-1",  "n": 1.50}"#);
        assert_eq!(&build(PayloadFormat::Raw, &d, 0, 0).to_bytes()[..], br#"{"orderId":"A-1","n":1.5}"#);
        let text = String::from_utf8(build(PayloadFormat::Envelope, &d, 0, 0).to_bytes().to_vec()).unwrap();
        assert!(text.contains(r#""data":{"orderId":"A-1","n":1.5},"changes":[{"op":"add"}]"#), "{text}");
    }

    #[test]
    fn raw_is_the_data_buffer_itself() {
        let d = delivery(None);
        let body = build(PayloadFormat::Raw, &d, 0, 0);
        assert_eq!(body.chunks().len(), 1);
        assert_eq!(body.chunks()[0].as_ptr(), d.data.as_ptr());
        assert_eq!(body.len(), d.data.len() as u64);
    }
}
