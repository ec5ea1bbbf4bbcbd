//! What Herald and an edge agent say to each other over the agent's WebSocket: JSON text
//! messages. The agent opens with `hello` (its window); Herald sends `deliver`, at most
//! `window` unanswered at a time; the agent answers each with `outcome`.

use crate::model::{Delivery, Subscription};
use crate::transport::Outcome;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The path agents connect to.
pub const CONNECT_PATH: &str = "/v1/edge/connect";

/// Largest window an agent may ask for.
pub const MAX_WINDOW: u32 = 4096;

/// Herald → agent.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToAgent {
    /// Make this attempt.
    Deliver {
        /// Answer with the same number.
        seq: u64,
        /// The subscription as stored: target, signing, timeouts, TLS, auth.
        subscription: Box<Subscription>,
        /// The delivery record, base64 of its binary form.
        delivery: String,
        /// The envelope's `pendingRetries`.
        pending_retries: u32,
    },
}

/// Agent → Herald.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToServer {
    /// The first message: how many deliveries may be unanswered at once.
    Hello {
        /// The window.
        window: u32,
    },
    /// What one attempt came to.
    Outcome(Report),
}

/// One attempt's result as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The `deliver` message answered.
    pub seq: u64,
    /// Whether the receiver took it (2xx, or a confirmed publish).
    pub delivered: bool,
    /// Status code, when there was a response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The receiver's `Retry-After`, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
    /// How long the attempt took at the agent, ms.
    pub latency_ms: u64,
}

/// Herald → Herald: make this attempt through the agent connected to you (several
/// processes share partitions, but an agent connects to one of them).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// The edge device.
    pub device: String,
    /// The subscription id.
    pub subscription: String,
    /// The delivery record, base64 of its binary form.
    pub delivery: String,
    /// The envelope's `pendingRetries`.
    pub pending_retries: u32,
    /// The attempt's timeout, ms.
    pub timeout_ms: u64,
}

/// The path processes forward edge deliveries to (admin token).
pub const FORWARD_PATH: &str = "/v1/edge/forward";

/// The delivery record as sent.
pub fn encode_delivery(d: &Delivery) -> String {
    B64.encode(d.encode())
}

/// The delivery record back, if well formed.
pub fn decode_delivery(s: &str) -> Option<Delivery> {
    Delivery::decode(B64.decode(s).ok()?.into()).ok()
}

impl Report {
    /// The agent's report of `outcome` for message `seq`.
    pub fn of(seq: u64, outcome: &Outcome) -> Report {
        match outcome {
            Outcome::Delivered { status, latency } => Report {
                seq,
                delivered: true,
                status: Some(*status),
                error: None,
                retry_after_ms: None,
                latency_ms: latency.as_millis() as u64,
            },
            Outcome::Failed { status, error, retry_after, latency } => Report {
                seq,
                delivered: false,
                status: *status,
                error: Some(error.clone()),
                retry_after_ms: retry_after.map(|d| d.as_millis() as u64),
                latency_ms: latency.as_millis() as u64,
            },
        }
    }

    /// Back into an outcome on the server.
    pub fn outcome(&self) -> Outcome {
        let latency = Duration::from_millis(self.latency_ms);
        if self.delivered {
            return Outcome::Delivered { status: self.status.unwrap_or(200), latency };
        }
        Outcome::Failed {
            status: self.status,
            error: format!("via edge: {}", self.error.as_deref().unwrap_or("failed")),
            retry_after: self.retry_after_ms.map(Duration::from_millis),
            latency,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_round_trip_outcomes() {
        let ok = Outcome::Delivered { status: 204, latency: Duration::from_millis(12) };
        assert_eq!(Report::of(7, &ok).outcome(), ok);
        let failed = Outcome::Failed {
            status: Some(503),
            error: "receiver answered 503".into(),
            retry_after: Some(Duration::from_secs(2)),
            latency: Duration::from_millis(3),
        };
        let back = Report::of(8, &failed).outcome();
        assert!(
            matches!(back, Outcome::Failed { status: Some(503), retry_after: Some(d), .. } if d == Duration::from_secs(2))
        );
        let json = serde_json::to_string(&ToServer::Outcome(Report::of(9, &ok))).unwrap();
        assert!(json.contains("\"type\":\"outcome\""), "{json}");
    }
}
