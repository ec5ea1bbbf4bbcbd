//! What one attempt came to, whichever transport made it: the one typed result that the retry
//! verdict, metrics labels, dead-letter `last_error`, the delivery history and an edge agent's
//! report all derive from, so one event gets the same label on every transport.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// The receiver took it: a 2xx answer, or a publish the broker confirmed (200).
    Delivered {
        /// Status code.
        status: u16,
        /// How long the attempt took.
        #[serde(with = "millis")]
        latency: Duration,
        /// The start of the receiver's answer, when there was one and a history keeps it
        /// (with history off it is not copied).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response: Option<Response>,
    },
    /// Anything else.
    Failed {
        /// What kind of failure: decides the label and whether it is retried.
        failure: Failure,
        /// How long the attempt took.
        #[serde(with = "millis")]
        latency: Duration,
        /// The start of the receiver's answer, when there was one and a history keeps it
        /// (with history off it is not copied).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        response: Option<Response>,
    },
}

/// Why an attempt failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Failure {
    /// The receiver answered, but not 2xx.
    #[error("receiver answered {}", status_text(*status))]
    Status {
        /// Status code.
        status: u16,
        /// The receiver's `Retry-After`, in ms, when it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// No answer within the subscription's timeout (or a broker's confirm, or an edge agent's
    /// report, within it).
    #[error("timed out after {}", humantime::format_duration(Duration::from_millis(*after_ms)))]
    Timeout {
        /// The timeout, ms.
        after_ms: u64,
    },
    /// Ended by Herald before its timeout: it held back its partition's commit point (see
    /// `dispatch::window::Cut`). Retried as a timeout is, but not held against the endpoint's
    /// health (the breaker and its pace untouched); labelled `timeout`.
    #[error(
        "ended after {}: it held back its partition's commit point (dispatch.max_uncommitted) while later deliveries went on; retried",
        humantime::format_duration(Duration::from_millis(*after_ms))
    )]
    Held {
        /// How long it had been in flight, ms.
        after_ms: u64,
    },
    /// The attempt's timeout ran out before it was sent, while Herald prepared it: its TLS
    /// profile was still being built (a PKCS#12 file's key derivation, one build at a time,
    /// tenants in turns). Retried as a timeout is, labelled `timeout`, but never sent: nothing
    /// of the endpoint's health or pace, nor a request's latency.
    #[error(
        "timed out after {} before it was sent: its TLS profile was still being built; retried",
        humantime::format_duration(Duration::from_millis(*after_ms))
    )]
    Unready {
        /// The timeout, ms.
        after_ms: u64,
    },
    /// The connection could not be made or broke (DNS, refused, reset).
    #[error("connection failed: {detail}")]
    Connect {
        /// What the network stack said.
        detail: String,
    },
    /// The TLS handshake failed (certificate, protocol).
    #[error("TLS failed: {detail}")]
    Tls {
        /// What the TLS stack said.
        detail: String,
    },
    /// The network guard refused the target's address.
    #[error("{detail}")]
    Refused {
        /// The refusal, naming the setting that would allow it.
        detail: String,
    },
    /// Credentials for the receiver could not be obtained (an OAuth token endpoint failed).
    #[error("authentication failed: {detail}")]
    Auth {
        /// What went wrong.
        detail: String,
    },
    /// The broker returned the message: no queue is bound for its routing key.
    #[error("unroutable: exchange {exchange:?} has no queue bound for routing key {routing_key:?}")]
    Unroutable {
        /// Exchange published to.
        exchange: String,
        /// Routing key used.
        routing_key: String,
    },
    /// The broker refused the message (a negative confirm).
    #[error("the broker refused the message (nack)")]
    Nacked,
    /// The broker closed the channel or connection (a missing exchange, an access error).
    #[error("broker error: {detail}")]
    Broker {
        /// What the broker or client said.
        detail: String,
    },
    /// The subscription's edge agent is not connected to any Herald process.
    #[error("edge device {device} is not connected")]
    EdgeOffline {
        /// The device.
        device: String,
    },
    /// The edge agent had no room in its window for the attempt's whole timeout.
    #[error("edge device {device} had no room in its window")]
    EdgeBusy {
        /// The device.
        device: String,
    },
    /// The tenant's broker connections are all open and busy (see
    /// `transport::amqp::TENANT_BROKERS`): retried, but not held against the endpoint's health.
    #[error("the tenant's {open} broker connections are all busy; tried again later")]
    BrokerBusy {
        /// Connections the tenant has open.
        open: usize,
    },
    /// The attempt's timeout ran out waiting for a place among the publishes in flight to its
    /// broker (`transport::amqp`'s window, shared by the tenant's subscriptions to that URI):
    /// never sent, so retried but not held against the subscription's health — another
    /// subscription's slow queue filled the window. Labelled `broker_busy`.
    #[error(
        "timed out after {} before it was sent: the publishes in flight to the broker (shared by the tenant's subscriptions to it) were all unconfirmed; retried",
        humantime::format_duration(Duration::from_millis(*after_ms))
    )]
    BrokerWindowFull {
        /// The timeout, ms.
        after_ms: u64,
    },
    /// The subscription cannot be delivered as it is configured (fix it with PATCH).
    #[error("not deliverable as configured: {detail}")]
    Unusable {
        /// What is wrong.
        detail: String,
    },
}

/// The start of a receiver's answer, kept for the delivery history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Headers, in order, as text.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// The first bytes of the body.
    #[serde(default, with = "body_bytes")]
    pub body: Bytes,
}

/// Most response headers kept, and most bytes of each name and each value (a receiver chooses
/// them: names of 60 KB each made every attempt's record that large, in the history topic and
/// in every process's index).
pub const RESPONSE_HEADERS: usize = 32;
const RESPONSE_HEADER_TEXT: usize = 256;

impl Response {
    /// The response with at most [`RESPONSE_HEADERS`] headers of bounded size and `body_bytes`
    /// of body (for one reported by an edge agent: as much as a direct attempt keeps, which
    /// `history.response_bytes` bounds — cut to 1 KiB, an edge attempt's record kept less).
    pub fn bounded(self, body_bytes: usize) -> Response {
        let headers = self
            .headers
            .into_iter()
            .take(RESPONSE_HEADERS)
            .map(|(n, v)| (truncate(&n, RESPONSE_HEADER_TEXT), truncate(&v, RESPONSE_HEADER_TEXT)))
            .collect();
        let keep = body_bytes.min(crate::config::MAX_RESPONSE_BYTES);
        let body = match self.body.len() > keep {
            true => whole_characters(self.body.slice(..keep)),
            false => self.body,
        };
        Response { status: self.status, headers, body }
    }

    /// The parts of an answer worth keeping: its status, bounded headers, and `body`.
    pub fn new(status: u16, headers: &http::HeaderMap, body: Bytes) -> Response {
        let headers = headers
            .iter()
            .take(RESPONSE_HEADERS)
            .map(|(n, v)| {
                let text = String::from_utf8_lossy(v.as_bytes());
                (truncate(n.as_str(), RESPONSE_HEADER_TEXT), truncate(&text, RESPONSE_HEADER_TEXT))
            })
            .collect();
        Response { status, headers, body }
    }
}

/// A body cut short, without the part of a UTF-8 character the cut left at its end: a text
/// answer cut inside a character would otherwise be kept as bytes (and shown in base64).
pub fn whole_characters(cut: Bytes) -> Bytes {
    match std::str::from_utf8(&cut) {
        Err(e) if e.error_len().is_none() => cut.slice(..e.valid_up_to()),
        _ => cut,
    }
}

/// `text` cut to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

fn status_text(status: u16) -> String {
    match http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()) {
        Some(reason) => format!("{status} {reason}"),
        None => status.to_string(),
    }
}

/// Most bytes of any text a failure carries: it is copied into dead letters and the history,
/// and an edge agent's report is not to be trusted to be small.
pub const MAX_DETAIL: usize = 1024;

impl Failure {
    /// The failure with every text it carries cut to [`MAX_DETAIL`] bytes.
    pub fn bounded(self) -> Failure {
        let cut = |s: String| truncate(&s, MAX_DETAIL);
        match self {
            Failure::Connect { detail } => Failure::Connect { detail: cut(detail) },
            Failure::Tls { detail } => Failure::Tls { detail: cut(detail) },
            Failure::Refused { detail } => Failure::Refused { detail: cut(detail) },
            Failure::Auth { detail } => Failure::Auth { detail: cut(detail) },
            Failure::Broker { detail } => Failure::Broker { detail: cut(detail) },
            Failure::Unusable { detail } => Failure::Unusable { detail: cut(detail) },
            Failure::Unroutable { exchange, routing_key } => {
                Failure::Unroutable { exchange: cut(exchange), routing_key: cut(routing_key) }
            }
            Failure::EdgeOffline { device } => Failure::EdgeOffline { device: cut(device) },
            Failure::EdgeBusy { device } => Failure::EdgeBusy { device: cut(device) },
            f @ (Failure::Status { .. }
            | Failure::Timeout { .. }
            | Failure::Held { .. }
            | Failure::Unready { .. }
            | Failure::Nacked
            | Failure::BrokerBusy { .. }
            | Failure::BrokerWindowFull { .. }) => f,
        }
    }

    /// The outcome label of this failure in the history and the API (`failed` for a status).
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Status { .. } => "failed",
            Failure::Timeout { .. } | Failure::Held { .. } | Failure::Unready { .. } => "timeout",
            Failure::Connect { .. } => "connect_error",
            Failure::Tls { .. } => "tls_error",
            Failure::Refused { .. } => "refused",
            Failure::Auth { .. } => "auth_error",
            Failure::Unroutable { .. } => "unroutable",
            Failure::Nacked => "nacked",
            Failure::Broker { .. } => "broker_error",
            Failure::EdgeOffline { .. } => "edge_offline",
            Failure::EdgeBusy { .. } => "edge_busy",
            Failure::BrokerBusy { .. } | Failure::BrokerWindowFull { .. } => "broker_busy",
            Failure::Unusable { .. } => "misconfigured",
        }
    }

    /// The receiver's status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Failure::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether Herald's own waits or limits ended the attempt, not the endpoint: ended to free
    /// its partition's commit point, held behind an edge agent's full window or a tenant's
    /// broker connections in use, or waiting for its TLS profile to be built. It says nothing of the endpoint's health or pace, nor of how
    /// long its requests take.
    pub fn heralds_own(&self) -> bool {
        self.never_sent() || matches!(self, Failure::Held { .. })
    }

    /// Whether the attempt never left: held behind an edge agent's full window or a tenant's
    /// broker connections in use, or its TLS profile not built in time (an attempt ended to
    /// free the commit point was in flight).
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            Failure::EdgeBusy { .. }
                | Failure::BrokerBusy { .. }
                | Failure::BrokerWindowFull { .. }
                | Failure::Unready { .. }
        )
    }
}

/// The label of an attempt not made because its subscription is disabled (history only: no
/// transport was involved, so it is no [`Outcome`]).
pub const DISABLED: &str = "disabled";

/// The `outcome` labels of `herald_attempts_total` that are no [`Outcome::label`] (see
/// [`Outcome::metric_label`]).
pub const METRIC_ONLY_LABELS: &[&str] = &["tls_unready"];

/// Every label [`Outcome::label`] can give, for metrics set up at zero and for documentation.
pub const LABELS: &[&str] = &[
    "delivered",
    "failed",
    "timeout",
    "connect_error",
    "tls_error",
    "refused",
    "auth_error",
    "unroutable",
    "nacked",
    "broker_error",
    "edge_offline",
    "edge_busy",
    "broker_busy",
    "misconfigured",
];

impl Outcome {
    /// A failure without a response.
    pub fn failed(failure: Failure, latency: Duration) -> Outcome {
        Outcome::Failed { failure, latency, response: None }
    }

    /// How long the attempt took.
    pub fn latency(&self) -> Duration {
        match self {
            Outcome::Delivered { latency, .. } | Outcome::Failed { latency, .. } => *latency,
        }
    }

    /// The receiver's status, when it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status, .. } => Some(*status),
            Outcome::Failed { failure, .. } => failure.status(),
        }
    }

    /// The failure, if it failed.
    pub fn failure(&self) -> Option<&Failure> {
        match self {
            Outcome::Delivered { .. } => None,
            Outcome::Failed { failure, .. } => Some(failure),
        }
    }

    /// Takes the start of the receiver's answer, if there was one (only the history keeps it).
    pub fn take_response(&mut self) -> Option<Response> {
        match self {
            Outcome::Delivered { response, .. } | Outcome::Failed { response, .. } => response.take(),
        }
    }

    /// The outcome label: `delivered`, or the failure's (one of [`LABELS`]).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered { .. } => "delivered",
            Outcome::Failed { failure, .. } => failure.label(),
        }
    }

    /// The `outcome` label of `herald_attempts_total`: answers by status class (`success`,
    /// `client_error`, `server_error`, `other_status`), anything else by its failure label —
    /// but an attempt never sent for want of its TLS profile (`timeout` in the history) is
    /// `tls_unready`: counted a receiver's timeout, one tenant's slow builds raised the error
    /// ratio every other tenant's endpoints are paged on.
    pub fn metric_label(&self) -> &'static str {
        match self.status() {
            Some(200..=299) => "success",
            Some(400..=499) => "client_error",
            Some(500..=599) => "server_error",
            Some(_) => "other_status",
            None if matches!(self.failure(), Some(Failure::Unready { .. })) => "tls_unready",
            None => self.label(),
        }
    }
}

/// `d` in whole milliseconds (saturating: a `Duration` holds more than a `u64` of them).
pub fn whole_millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// Durations as whole milliseconds on the wire (edge reports).
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(super::whole_millis(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Response bodies as base64 on the wire (they need not be text).
mod body_bytes {
    use base64::engine::general_purpose::STANDARD as B64;
    use base64::Engine;
    use bytes::Bytes;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&B64.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(d)?;
        B64.decode(text).map(Bytes::from).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_the_type_not_the_text() {
        let timeout = Outcome::failed(Failure::Timeout { after_ms: 1500 }, Duration::from_millis(1500));
        assert_eq!((timeout.label(), timeout.metric_label()), ("timeout", "timeout"));
        assert_eq!(timeout.failure().unwrap().to_string(), "timed out after 1s 500ms");
        let gone = Outcome::failed(Failure::Status { status: 503, retry_after_ms: None }, Duration::ZERO);
        assert_eq!((gone.label(), gone.metric_label(), gone.status()), ("failed", "server_error", Some(503)));
        assert_eq!(gone.failure().unwrap().to_string(), "receiver answered 503 Service Unavailable");
        let ok = Outcome::Delivered { status: 204, latency: Duration::ZERO, response: None };
        assert_eq!((ok.label(), ok.metric_label()), ("delivered", "success"));
        for f in [Failure::Nacked, Failure::EdgeOffline { device: "d".into() }] {
            assert!(LABELS.contains(&f.label()));
        }
    }

    #[test]
    fn outcomes_cross_the_edge_protocol_unchanged() {
        let o = Outcome::Failed {
            failure: Failure::Status { status: 429, retry_after_ms: Some(2000) },
            latency: Duration::from_millis(12),
            response: Some(Response {
                status: 429,
                headers: vec![("x".into(), "y".into())],
                body: Bytes::from("slow"),
            }),
        };
        let text = serde_json::to_string(&o).unwrap();
        assert_eq!(serde_json::from_str::<Outcome>(&text).unwrap(), o);
        assert_eq!(truncate("héllo", 2), "h…");
    }
}
