//! The nouns of the data flow: subscriptions, events, delivery records and dead letters.

mod dead_letter;
mod delivery;
mod event;
pub mod outcome;
pub mod range;
pub mod secret;
mod subscription;
pub mod trace;

pub use dead_letter::DeadLetter;
pub(crate) use delivery::{get_str, put_str};
pub use delivery::{DecodeError, Delivery};
pub use event::{check_event_type, check_ordering_key, EventInput, MAX_EVENT_ID_LEN, MAX_ORDERING_KEY_LEN};
pub use outcome::{Failure, Outcome, Response};
pub use secret::Secret;
pub use subscription::{
    AmqpTarget, Auth, OnDeadLetter, OrderingMode, OrderingSpec, PayloadFormat, RetrySpec, SignatureEncoding,
    SignatureSpec, Subscription, SubscriptionSpec, TlsOptions, TransportKind,
};
pub use trace::TraceContext;

/// A field that failed validation: what the API answers `400` with, naming the field as a JSON
/// path (`url`, `headers.x-foo`, `[3].data`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a JSON path the client can find in what it sent.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// `field` is wrong because `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), message: message.into() }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    // From `SystemTime` directly: chrono's `Utc::now()` works out a calendar date only for
    // `timestamp_millis` to turn it back into a count, and this runs several times an attempt.
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => -i64::try_from(before.duration().as_millis()).unwrap_or(i64::MAX),
    }
}

/// RFC 3339 text (UTC, milliseconds) for a millisecond timestamp.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new time-ordered identifier with the given prefix, e.g. `sub_0192…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    #[test]
    fn now_ms_is_the_wall_clock_in_milliseconds_since_the_epoch() {
        let before = chrono::Utc::now().timestamp_millis();
        let now = super::now_ms();
        let after = chrono::Utc::now().timestamp_millis();
        assert!(before <= now && now <= after, "{before} <= {now} <= {after}");
    }
}
