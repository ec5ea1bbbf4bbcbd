//! What Herald and an edge agent say to each other over the agent's WebSocket: JSON text
//! messages. The agent opens with `hello` (its window); Herald sends `deliver`, at most
//! `window` unanswered at a time; the agent answers each with `outcome`.

use crate::model::{Delivery, Outcome, Subscription};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde::{Deserialize, Serialize};

/// The path agents connect to.
pub const CONNECT_PATH: &str = "/v1/edge/connect";

/// Largest window an agent may ask for.
pub const MAX_WINDOW: u32 = 4096;

/// Largest message an agent may send: its messages are a hello and reports of attempts (a
/// response's start, its headers), a few KiB; past this the connection ends rather than a
/// message of up to the WebSocket library's 64 MiB being read into memory.
pub const MAX_AGENT_MESSAGE: usize = 1 << 20;

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
        /// How many deliveries the agent takes at once: flow control, so Herald never
        /// buries a slow agent.
        window: u32,
    },
    /// What one attempt came to.
    Outcome(Report),
}

/// One attempt's result as the agent reports it: the same typed outcome a direct attempt
/// has, so an attempt gets the same label whichever way it was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The `deliver` message answered.
    pub seq: u64,
    /// What the attempt came to.
    pub outcome: Outcome,
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
    /// The outcome as the server takes it: every text an agent sends is bounded, since it is
    /// copied into dead letters and the history; of the receiver's answer, as much as the
    /// history keeps (`response_bytes`; none without a history), as for any attempt. The
    /// latency is at most `waited`, how long Herald waited for the report: the agent runs on
    /// the tenant's machine, and the attempt's time on record is taken from it (a latency of
    /// centuries put the attempt in a day long expired, missing from the history).
    pub fn into_outcome(self, response_bytes: Option<usize>, waited: std::time::Duration) -> Outcome {
        let keep = |r: Option<crate::model::outcome::Response>| Some(r?.bounded(response_bytes?));
        match self.outcome {
            Outcome::Failed { failure, latency, response } => {
                Outcome::Failed { failure: failure.bounded(), latency: latency.min(waited), response: keep(response) }
            }
            Outcome::Delivered { status, latency, response } => {
                Outcome::Delivered { status, latency: latency.min(waited), response: keep(response) }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Failure;
    use std::time::Duration;

    #[test]
    fn reports_carry_typed_outcomes_and_arrive_bounded() {
        let failed = Outcome::failed(Failure::Connect { detail: "x".repeat(100_000) }, Duration::from_millis(3));
        let json = serde_json::to_string(&ToServer::Outcome(Report { seq: 9, outcome: failed })).unwrap();
        assert!(json.contains("\"type\":\"outcome\""), "{json}");
        let ToServer::Outcome(back) = serde_json::from_str(&json).unwrap() else { panic!("an outcome") };
        let outcome = back.into_outcome(Some(1024), Duration::MAX);
        assert_eq!(outcome.label(), "connect_error");
        assert!(outcome.failure().unwrap().to_string().len() < 2048);
    }
}
