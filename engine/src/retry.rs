//! What happens after an attempt fails. Until retry tiers are built, a failed delivery goes
//! straight to the `dlq` topic with its status and error, so nothing is dropped; the append
//! is made durable before the delivery's offset may be committed.

use crate::log::{Log, LogRecord, Record};
use crate::model::{new_id, now_ms, rfc3339_ms, DeadLetter, Delivery};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// Parks deliveries that will not be attempted again.
#[derive(Clone)]
pub struct Retrier {
    log: Arc<dyn Log>,
    dlq_topic: String,
}

/// What the last attempt ended with.
#[derive(Debug, Clone)]
pub struct LastAttempt {
    /// Status code, if there was a response.
    pub status: Option<u16>,
    /// The failure.
    pub error: String,
}

impl Retrier {
    /// A retrier writing to `dlq_topic`.
    pub fn new(log: Arc<dyn Log>, dlq_topic: String) -> Self {
        Retrier { log, dlq_topic }
    }

    /// Remaining attempts after this one, as the envelope's `pendingRetries` tells receivers.
    pub fn pending_retries(&self, _delivery: &Delivery) -> u32 {
        0
    }

    /// Settles a failed attempt: dead-letters it. Returns once that is durable.
    pub async fn after_failure(&self, delivery: &Delivery, raw: Bytes, last: LastAttempt) {
        let entry = DeadLetter {
            id: new_id("dlq"),
            event_id: delivery.event_id.clone(),
            subscription: delivery.subscription.clone(),
            tenant: delivery.tenant.clone(),
            event: delivery.event_type.clone(),
            attempts: delivery.attempt,
            first_attempt_at: rfc3339_ms(delivery.accepted_ms),
            last_attempt_at: rfc3339_ms(now_ms()),
            last_status: last.status,
            last_error: Some(last.error),
        };
        self.park(&delivery.subscription, entry, raw).await;
    }

    /// Dead-letters a record that is not a readable delivery, so it cannot stop its partition.
    pub async fn park_malformed(&self, rec: &LogRecord, error: String) {
        let subscription = String::from_utf8_lossy(&rec.key).into_owned();
        tracing::error!(partition = rec.partition, offset = rec.offset, error = %error, "malformed delivery record dead-lettered");
        let now = rfc3339_ms(now_ms());
        let entry = DeadLetter {
            id: new_id("dlq"),
            event_id: String::new(),
            subscription: subscription.clone(),
            tenant: String::new(),
            event: String::new(),
            attempts: 0,
            first_attempt_at: rfc3339_ms(rec.timestamp_ms),
            last_attempt_at: now,
            last_status: None,
            last_error: Some(format!(
                "malformed delivery record at partition {} offset {}: {error}",
                rec.partition, rec.offset
            )),
        };
        self.park(&subscription, entry, rec.value.clone()).await;
    }

    /// Appends to the dead-letter topic, retrying until it is durable: the caller must not
    /// settle the delivery before that.
    async fn park(&self, key: &str, entry: DeadLetter, raw: Bytes) {
        let record = Record { key: Bytes::copy_from_slice(key.as_bytes()), value: entry.encode(&raw) };
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.log.append(&self.dlq_topic, vec![record.clone()]).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(error = %e, "dead-letter append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
