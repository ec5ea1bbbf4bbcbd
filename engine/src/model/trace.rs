//! A producer's W3C trace context (`traceparent`, `tracestate`), kept with an event's
//! deliveries across the log, retries and processes, so every attempt joins the producer's
//! trace and a receiver gets a `traceparent` naming the attempt as its parent.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Longest `tracestate` kept (the W3C limit is 32 members; 512 bytes is what it recommends
/// propagating at least).
pub const MAX_TRACESTATE: usize = 512;

/// The part of a trace context Herald carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The trace.
    pub trace_id: [u8; 16],
    /// The producer's span, the parent of Herald's.
    pub parent_id: [u8; 8],
    /// Trace flags (bit 0: sampled).
    pub flags: u8,
    /// `tracestate`, as received (empty when none).
    pub state: String,
}

fn hex_array<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = hex::decode(s).ok()?;
    // W3C: lowercase only, and an all-zero id is invalid.
    if s.bytes().any(|b| b.is_ascii_uppercase()) || bytes.iter().all(|&b| b == 0) {
        return None;
    }
    bytes.try_into().ok()
}

impl TraceContext {
    /// Reads a `traceparent` (and `tracestate`) as the W3C Trace Context spec defines them;
    /// `Err` names which of the two is wrong and how.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Result<TraceContext, (&'static str, &'static str)> {
        const BAD: (&str, &str) = ("traceparent", "must be a W3C traceparent: 00-<32 hex>-<16 hex>-<2 hex>");
        let tp = traceparent.trim();
        if !tp.is_ascii() {
            return Err(BAD);
        }
        // Later versions may append fields after these four; version 00 has exactly four.
        let head = tp.get(..55).ok_or(BAD)?;
        let (version, rest) = head.split_at(2);
        if version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
            return Err(BAD);
        }
        if (version == "00" && tp.len() != 55) || (tp.len() > 55 && !tp[55..].starts_with('-')) {
            return Err(BAD);
        }
        let mut parts = rest.split('-').skip(1);
        let (Some(trace), Some(parent), Some(flags), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BAD);
        };
        let trace_id = hex_array::<16>(trace).filter(|_| trace.len() == 32).ok_or(BAD)?;
        let parent_id = hex_array::<8>(parent).filter(|_| parent.len() == 16).ok_or(BAD)?;
        let lower_hex = |s: &str| s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        let flags = u8::from_str_radix(flags, 16).ok().filter(|_| flags.len() == 2 && lower_hex(flags)).ok_or(BAD)?;
        let state = tracestate.unwrap_or_default().trim();
        if state.len() > MAX_TRACESTATE || !state.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(("tracestate", "must be at most 512 printable ASCII characters"));
        }
        Ok(TraceContext { trace_id, parent_id, flags, state: state.to_string() })
    }

    /// The `traceparent` of a span of this trace with id `span_id` (a child of the producer's),
    /// with `flags` (only the bits W3C defines: sampled and random trace id; others are zeroed).
    pub fn child(&self, span_id: [u8; 8], flags: u8) -> String {
        format!("00-{}-{}-{:02x}", hex::encode(self.trace_id), hex::encode(span_id), flags & 0x03)
    }

    /// Appends the context to a delivery record.
    pub(crate) fn encode(&self, buf: &mut BytesMut) {
        buf.put_slice(&self.trace_id);
        buf.put_slice(&self.parent_id);
        buf.put_u8(self.flags);
        buf.put_u16_le(self.state.len() as u16);
        buf.put_slice(self.state.as_bytes());
    }

    /// Bytes [`TraceContext::encode`] writes.
    pub(crate) fn encoded_len(&self) -> usize {
        27 + self.state.len()
    }

    /// Reads what [`TraceContext::encode`] wrote; `None` when the bytes end too soon.
    pub(crate) fn decode(buf: &mut Bytes) -> Option<TraceContext> {
        if buf.remaining() < 27 {
            return None;
        }
        let mut trace_id = [0; 16];
        buf.copy_to_slice(&mut trace_id);
        let mut parent_id = [0; 8];
        buf.copy_to_slice(&mut parent_id);
        let flags = buf.get_u8();
        let len = buf.get_u16_le() as usize;
        if buf.remaining() < len {
            return None;
        }
        let state = String::from_utf8(buf.split_to(len).to_vec()).ok()?;
        Some(TraceContext { trace_id, parent_id, flags, state })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_w3c_traceparents_and_refuses_the_invalid_ones() {
        let t = TraceContext::parse(TP, Some("congo=t61rcWkgMzE")).unwrap();
        assert_eq!(hex::encode(t.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!((t.flags, t.state.as_str()), (1, "congo=t61rcWkgMzE"));
        assert_eq!(t.child([1; 8], t.flags), "00-4bf92f3577b34da6a3ce929d0e0e4736-0101010101010101-01");
        assert!(t.child([1; 8], 0xff).ends_with("-03"), "unknown flag bits are not passed on");
        // A later version may carry more fields; version 00 may not.
        assert!(TraceContext::parse(&format!("01{}-extra", &TP[2..]), None).is_ok());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0A",
            "0é-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        ] {
            assert_eq!(TraceContext::parse(bad, None).unwrap_err().0, "traceparent", "{bad:?}");
        }
        assert_eq!(TraceContext::parse(TP, Some("a=\u{7}")).unwrap_err().0, "tracestate");
    }

    #[test]
    fn survives_the_record() {
        let t = TraceContext::parse(TP, Some("k=v")).unwrap();
        let mut buf = BytesMut::new();
        t.encode(&mut buf);
        assert_eq!(buf.len(), t.encoded_len());
        assert_eq!(TraceContext::decode(&mut buf.freeze()), Some(t));
    }
}
