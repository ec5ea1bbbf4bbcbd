//! What happens after a failed attempt: the one place that decides whether an outcome is
//! retried ([`verdict`]), when (the subscription's [`Policy`]), into which delay tier
//! ([`tiers`]), and the durable writes that hand a delivery on: to a tier, or to the
//! dead-letter topic. Every write returns only once durable, so the caller may settle the
//! delivery's offset after it (append first, then commit).

pub mod dead_letters;
pub mod policy;
pub mod tiers;

pub use policy::Policy;

use crate::log::{Log, LogRecord, Record};
use crate::model::{now_ms, rfc3339_ms, DeadLetter, Delivery, Failure, Outcome};
use crate::target::Target;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// The longest `Retry-After` honoured; a receiver asking for more gets this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(3600);

/// What an attempt's outcome means for the delivery.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Delivered: nothing more to do.
    Delivered,
    /// Try again, not before `not_before` when the receiver said so.
    Retry {
        /// Honoured `Retry-After`.
        not_before: Option<Duration>,
    },
    /// The receiver says the endpoint is gone for good (410): disable, do not retry.
    Gone,
}

/// Decides what an outcome means: delivered is delivered; 410 disables; every other status,
/// timeouts, connection, TLS, broker and edge failures are retried; `Retry-After` counts on
/// 429 and 503.
pub fn verdict(outcome: &Outcome) -> Verdict {
    match outcome.failure() {
        None => Verdict::Delivered,
        Some(Failure::Status { status: 410, .. }) => Verdict::Gone,
        Some(Failure::Status { status: 429 | 503, retry_after_ms: Some(ms) }) => {
            Verdict::Retry { not_before: Some(Duration::from_millis(*ms).min(RETRY_AFTER_CAP)) }
        }
        Some(_) => Verdict::Retry { not_before: None },
    }
}

/// The policy of a subscription.
pub fn policy(target: &Target) -> Policy {
    Policy::from_spec(target.sub.spec.retry.as_ref())
}

/// When the attempt after a failed `delivery` is due, if the policy has one left.
pub fn next_due(target: &Target, delivery: &Delivery, not_before: Option<Duration>) -> Option<i64> {
    let seed = policy::seed(&delivery.event_id, &delivery.subscription, delivery.generation);
    policy(target).next_due(delivery.attempt, delivery.budget_ms, now_ms(), seed, not_before)
}

/// How late past its due time a retry the schedule put within `max_age` may come and still be
/// made: the schedule allows one due at the deadline itself (its `next_attempt_at` on record),
/// and reading it back from its tier takes a moment.
pub const ON_TIME_MS: i64 = 1000;

/// Whether `delivery`, not attempted before `at_ms`, would be past its policy's `max_age` then
/// — not a retry due within it and come on time ([`ON_TIME_MS`]).
pub fn outlived(target: &Target, delivery: &Delivery, at_ms: i64) -> bool {
    policy(target).deadline(delivery.budget_ms).is_some_and(|deadline| past(deadline, delivery.due_ms, at_ms))
}

fn past(deadline: i64, due_ms: i64, at_ms: i64) -> bool {
    at_ms > deadline && !(due_ms <= deadline && at_ms - due_ms <= ON_TIME_MS)
}

/// Attempts still to come after this one fails (the envelope's `pendingRetries`).
pub fn pending_retries(target: &Target, delivery: &Delivery) -> u32 {
    let seed = policy::seed(&delivery.event_id, &delivery.subscription, delivery.generation);
    policy(target).pending_retries(delivery.attempt, delivery.budget_ms, now_ms(), seed)
}

/// The durable hand-offs: a delivery into the tier that fits its wait, or into the
/// dead-letter topic.
#[derive(Clone)]
pub struct Retrier {
    log: Arc<dyn Log>,
    prefix: String,
    dlq_topic: String,
}

impl Retrier {
    /// A retrier writing tiers under `prefix` and dead letters to `dlq_topic`.
    pub fn new(log: Arc<dyn Log>, prefix: String, dlq_topic: String) -> Self {
        Retrier { log, prefix, dlq_topic }
    }

    /// Appends `delivery` to the tier that fits its remaining wait (or the shortest tier when
    /// it is already due), durably; returns the tier. A record the log refuses as too large
    /// (written before a lower `ingest.max_event_bytes`) is dead-lettered instead: `Err` with
    /// why.
    pub async fn schedule(&self, delivery: &Delivery) -> Result<Duration, String> {
        let wait = Duration::from_millis((delivery.due_ms - now_ms()).max(0) as u64);
        let tier = tiers::for_wait(wait).unwrap_or(tiers::TIERS[0]);
        let value = delivery.encode();
        let record = Record { key: Bytes::copy_from_slice(delivery.subscription.as_bytes()), value: value.clone() };
        if let Err(e) = self.append_durably(&tiers::topic(&self.prefix, tier), record).await {
            let made = delivery.attempt.saturating_sub(1);
            let why = format!("could not be rescheduled: {e}");
            self.dead_letter(delivery, value, made, None, why.clone()).await;
            return Err(why);
        }
        Ok(tier)
    }

    /// Parks a delivery in the dead-letter topic with the contract's fields, `attempts` made;
    /// `raw` is its record, kept for replay.
    pub async fn dead_letter(
        &self,
        delivery: &Delivery,
        raw: Bytes,
        attempts: u32,
        last_status: Option<u16>,
        last_error: String,
    ) {
        let entry = DeadLetter {
            id: dead_letters::entry_id(
                &delivery.tenant,
                &delivery.subscription,
                &delivery.event_id,
                delivery.generation,
            ),
            event_id: delivery.event_id.clone(),
            subscription: delivery.subscription.clone(),
            tenant: delivery.tenant.clone(),
            event: delivery.event_type.clone(),
            attempts,
            first_attempt_at: rfc3339_ms(delivery.accepted_ms),
            last_attempt_at: rfc3339_ms(now_ms()),
            last_status,
            last_error: Some(crate::model::outcome::truncate(&last_error, crate::model::outcome::MAX_DETAIL)),
        };
        let key = Bytes::copy_from_slice(delivery.subscription.as_bytes());
        let record = Record { key: key.clone(), value: dead_letters::encode_entry(&entry, &raw) };
        if let Err(e) = self.append_durably(&self.dlq_topic, record).await {
            // Too large for the log: park the entry without its payload, saying so.
            let mut entry = entry;
            entry.last_error = Some(format!("{}; payload dropped: {e}", entry.last_error.unwrap_or_default()));
            let record = Record { key, value: dead_letters::encode_entry(&entry, &Bytes::new()) };
            let _ = self.append_durably(&self.dlq_topic, record).await;
        }
    }

    /// Dead-letters a record that is not a readable delivery, so it cannot stop its partition.
    pub async fn park_malformed(&self, rec: &LogRecord, error: String) {
        let subscription = String::from_utf8_lossy(&rec.key).into_owned();
        tracing::error!(partition = rec.partition, offset = rec.offset, error = %error, "malformed delivery record dead-lettered");
        let entry = DeadLetter {
            id: dead_letters::entry_id("", &subscription, &format!("malformed@{}.{}", rec.partition, rec.offset), 0),
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
        if self.append_durably(&self.dlq_topic, record).await.is_err() {
            let record = Record { key: rec.key.clone(), value: dead_letters::encode_entry(&entry, &Bytes::new()) };
            let _ = self.append_durably(&self.dlq_topic, record).await;
        }
    }

    /// One record, durably ([`crate::log::append_durably`]).
    async fn append_durably(&self, topic: &str, record: Record) -> Result<(), crate::log::LogError> {
        crate::log::append_durably(&*self.log, topic, vec![record]).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failed(status: Option<u16>, retry_after: Option<u64>) -> Outcome {
        let failure = match status {
            Some(status) => Failure::Status { status, retry_after_ms: retry_after.map(|s| s * 1000) },
            None => Failure::Timeout { after_ms: 10 },
        };
        Outcome::failed(failure, Duration::ZERO)
    }

    /// A retry the schedule put at the deadline itself, read back a moment later, is made; one
    /// come late (Herald down, far behind) or held back past it is not.
    #[test]
    fn a_retry_due_within_max_age_and_come_on_time_is_not_outlived() {
        let deadline = 100_000;
        assert!(!past(deadline, deadline, deadline + 50), "due at the deadline, read 50 ms later");
        assert!(!past(deadline, deadline - 10, deadline + ON_TIME_MS - 10));
        assert!(past(deadline, deadline, deadline + ON_TIME_MS + 1), "come late");
        assert!(past(deadline, deadline - 5_000, deadline + 1), "held back past it");
        assert!(past(deadline, deadline + 1, deadline + 2), "due past it");
        assert!(!past(deadline, 0, deadline), "at the deadline itself");
    }

    #[test]
    fn decides_what_is_retried() {
        let delivered = Outcome::Delivered { status: 204, latency: Duration::ZERO, response: None };
        assert_eq!(verdict(&delivered), Verdict::Delivered);
        assert_eq!(verdict(&failed(Some(410), None)), Verdict::Gone);
        for status in [Some(400), Some(404), Some(500), Some(302), None] {
            assert_eq!(verdict(&failed(status, None)), Verdict::Retry { not_before: None }, "{status:?}");
        }
        for failure in [Failure::Nacked, Failure::EdgeOffline { device: "d".into() }] {
            assert_eq!(verdict(&Outcome::failed(failure, Duration::ZERO)), Verdict::Retry { not_before: None });
        }
        assert_eq!(verdict(&failed(Some(429), Some(30))), Verdict::Retry { not_before: Some(Duration::from_secs(30)) });
        assert_eq!(verdict(&failed(Some(503), Some(86_400))), Verdict::Retry { not_before: Some(RETRY_AFTER_CAP) });
        // Retry-After on other statuses is not a promise the receiver can make.
        assert_eq!(verdict(&failed(Some(500), Some(30))), Verdict::Retry { not_before: None });
    }
}
