//! What happens after an attempt: the one place that decides whether an outcome is retried,
//! when (the subscription's [`Policy`]), into which delay tier, and when a delivery is dead-
//! lettered instead. Every hand-off is a durable append made before the caller may settle
//! the delivery's offset (append first, then commit).

pub mod dead_letters;
pub mod policy;
pub mod tiers;

pub use policy::Policy;

use crate::log::{Log, LogRecord, Record};
use crate::model::{now_ms, rfc3339_ms, DeadLetter, Delivery};
use crate::registry::{Registry, Target};
use crate::transport::Outcome;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// The longest `Retry-After` honoured; a receiver asking for more gets this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What an attempt's outcome means for the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Done.
    Delivered,
    /// Try again, not before `not_before` when the receiver said so.
    Retry {
        /// Honoured `Retry-After`.
        not_before: Option<Duration>,
    },
    /// The receiver says the endpoint is gone for good (410): disable, do not retry.
    Gone,
}

/// Decides what an outcome means: 2xx is delivered; 410 disables; every other status,
/// timeouts, connection and TLS errors are retried; `Retry-After` counts on 429 and 503.
pub fn verdict(outcome: &Outcome) -> Verdict {
    match outcome {
        Outcome::Delivered { .. } => Verdict::Delivered,
        Outcome::Failed { status: Some(410), .. } => Verdict::Gone,
        Outcome::Failed { status, retry_after, .. } => {
            let honoured = matches!(status, Some(429 | 503)).then_some(*retry_after).flatten();
            Verdict::Retry { not_before: honoured.map(|d| d.min(RETRY_AFTER_CAP)) }
        }
    }
}

/// Where failed, deferred and early deliveries go.
#[derive(Clone)]
pub struct Retrier {
    log: Arc<dyn Log>,
    registry: Arc<Registry>,
    prefix: String,
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
    /// A retrier writing tiers under `prefix` and dead letters to `dlq_topic`.
    pub fn new(log: Arc<dyn Log>, registry: Arc<Registry>, prefix: String, dlq_topic: String) -> Self {
        Retrier { log, registry, prefix, dlq_topic }
    }

    /// The policy of a subscription.
    pub fn policy(target: &Target) -> Policy {
        Policy::from_spec(target.sub.retry.as_ref())
    }

    /// Attempts still to come after this one fails (the envelope's `pendingRetries`).
    pub fn pending_retries(&self, target: &Target, delivery: &Delivery) -> u32 {
        let seed = policy::seed(&delivery.event_id, &delivery.subscription, delivery.generation);
        Self::policy(target).pending_retries(delivery.attempt, delivery.budget_ms, now_ms(), seed)
    }

    /// Settles a failed attempt: schedules the next one, or dead-letters the delivery when
    /// the policy has no attempt left (or the receiver said 410, which also disables the
    /// subscription). Returns once that is durable.
    pub async fn after_failure(
        &self,
        target: &Target,
        delivery: &Delivery,
        raw: Bytes,
        last: LastAttempt,
        verdict: Verdict,
    ) -> bool {
        let not_before = match verdict {
            Verdict::Delivered => return false,
            Verdict::Gone => {
                let reason = format!("the receiver answered 410 Gone at {}", rfc3339_ms(now_ms()));
                if let Err(e) = self.registry.disable(&target.sub.id, reason).await {
                    tracing::error!(subscription = %target.sub.id, error = %e, "could not disable a gone subscription");
                }
                self.dead_letter(delivery, raw, last).await;
                return true;
            }
            Verdict::Retry { not_before } => not_before,
        };
        let seed = policy::seed(&delivery.event_id, &delivery.subscription, delivery.generation);
        let now = now_ms();
        match Self::policy(target).next_due(delivery.attempt, delivery.budget_ms, now, seed, not_before) {
            Some(due) => {
                let next = Delivery { attempt: delivery.attempt + 1, due_ms: due, ..delivery.clone() };
                let tier = self.schedule(&next).await;
                metrics::counter!(crate::metrics::RETRIES_SCHEDULED, "tier" => tiers::label(tier)).increment(1);
                false
            }
            None => {
                self.dead_letter(delivery, raw, last).await;
                true
            }
        }
    }

    /// Appends `delivery` to the tier that fits its remaining wait (or the shortest tier when
    /// it is already due), durably; returns the tier.
    pub async fn schedule(&self, delivery: &Delivery) -> Duration {
        let wait = Duration::from_millis((delivery.due_ms - now_ms()).max(0) as u64);
        let tier = tiers::for_wait(wait).unwrap_or(tiers::TIERS[0]);
        let record = Record { key: Bytes::copy_from_slice(delivery.subscription.as_bytes()), value: delivery.encode() };
        self.append_durably(&tiers::topic(&self.prefix, tier), record).await;
        tier
    }

    /// Parks a delivery in the dead-letter topic with the contract's fields.
    pub async fn dead_letter(&self, delivery: &Delivery, raw: Bytes, last: LastAttempt) {
        let entry = DeadLetter {
            id: dead_letters::entry_id(&delivery.subscription, &delivery.event_id, delivery.generation),
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
        let record = Record {
            key: Bytes::copy_from_slice(delivery.subscription.as_bytes()),
            value: dead_letters::encode_entry(&entry, &raw),
        };
        self.append_durably(&self.dlq_topic, record).await;
        metrics::counter!(crate::metrics::DEAD_LETTERS).increment(1);
    }

    /// Dead-letters a record that is not a readable delivery, so it cannot stop its partition.
    pub async fn park_malformed(&self, rec: &LogRecord, error: String) {
        let subscription = String::from_utf8_lossy(&rec.key).into_owned();
        tracing::error!(partition = rec.partition, offset = rec.offset, error = %error, "malformed delivery record dead-lettered");
        let entry = DeadLetter {
            id: dead_letters::entry_id(&subscription, &format!("malformed@{}.{}", rec.partition, rec.offset), 0),
            event_id: String::new(),
            subscription: subscription.clone(),
            tenant: String::new(),
            event: String::new(),
            attempts: 0,
            first_attempt_at: rfc3339_ms(rec.timestamp_ms),
            last_attempt_at: rfc3339_ms(now_ms()),
            last_status: None,
            last_error: Some(format!(
                "malformed delivery record at partition {} offset {}: {error}",
                rec.partition, rec.offset
            )),
        };
        let record = Record { key: rec.key.clone(), value: dead_letters::encode_entry(&entry, &rec.value) };
        self.append_durably(&self.dlq_topic, record).await;
        metrics::counter!(crate::metrics::DEAD_LETTERS).increment(1);
    }

    /// Appends, retrying until durable: the caller must not settle the delivery before that.
    async fn append_durably(&self, topic: &str, record: Record) {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.log.append(topic, vec![record.clone()]).await {
                Ok(_) => return,
                Err(e) => {
                    tracing::error!(topic, error = %e, "append failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: Option<u16>, retry_after: Option<u64>) -> Outcome {
        Outcome::Failed {
            status,
            error: "x".into(),
            retry_after: retry_after.map(Duration::from_secs),
            latency: Duration::ZERO,
        }
    }

    #[test]
    fn decides_what_is_retried() {
        assert_eq!(verdict(&Outcome::Delivered { status: 204, latency: Duration::ZERO }), Verdict::Delivered);
        assert_eq!(verdict(&failed(Some(410), None)), Verdict::Gone);
        for status in [Some(400), Some(404), Some(500), Some(302), None] {
            assert_eq!(verdict(&failed(status, None)), Verdict::Retry { not_before: None }, "{status:?}");
        }
        assert_eq!(verdict(&failed(Some(429), Some(30))), Verdict::Retry { not_before: Some(Duration::from_secs(30)) });
        assert_eq!(verdict(&failed(Some(503), Some(86_400))), Verdict::Retry { not_before: Some(RETRY_AFTER_CAP) });
        // Retry-After on other statuses is not a promise the receiver can make.
        assert_eq!(verdict(&failed(Some(500), Some(30))), Verdict::Retry { not_before: None });
    }
}
