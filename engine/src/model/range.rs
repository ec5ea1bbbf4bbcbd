//! The range of every number and duration a subscription carries: the API refuses values
//! outside them (`registry::validate`), the OpenAPI document and README state them, and the
//! code that acts on a stored subscription clamps into them, so a record written before a range
//! existed cannot reach arithmetic that overflows.

use std::time::Duration;

/// `timeout`: an attempt's, as the default (`http.timeout`) must be too, so decided with it.
pub const TIMEOUT: (Duration, Duration) = crate::config::ATTEMPT_TIMEOUT;
/// `retry.interval` (fixed).
pub const FIXED_INTERVAL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(86_400));
/// `retry.initial` (exponential).
pub const INITIAL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(3600));
/// `retry.max_interval` (exponential).
pub const MAX_INTERVAL: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(86_400));
/// `retry.max_age` (exponential).
pub const MAX_AGE: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(7 * 86_400));
/// `retry.multiplier`.
pub const MULTIPLIER: (f64, f64) = (1.0, 10.0);
/// `retry.jitter`.
pub const JITTER: (f64, f64) = (0.0, 1.0);
/// `retry.max_attempts`.
pub const MAX_ATTEMPTS: (u32, u32) = (1, 1000);
/// The longest a fixed schedule may span, `interval` × (`max_attempts` − 1): its deadline, a
/// day after its last attempt is due, within the longest `max_age`.
pub const FIXED_SPAN: Duration = Duration::from_secs(6 * 86_400);
/// `max_in_flight`.
pub const MAX_IN_FLIGHT: (u32, u32) = (1, 10_000);
/// `rate_limit`, deliveries per second.
pub const RATE_LIMIT: (f64, f64) = (0.01, 100_000.0);
/// Entries of `events`.
pub const EVENTS: usize = 1000;
/// Entries of `headers`.
pub const HEADERS: usize = 64;
/// Bytes of a header value, of `key`, of a credential.
pub const VALUE: usize = 4096;
/// Bytes of `url` (and `auth.token_url`).
pub const URL: usize = 2048;
/// Bytes of a whole subscription as stored (JSON, secrets included).
pub const SUBSCRIPTION_BYTES: usize = 256 << 10;

/// `d` moved into `(min, max)`: how a stored setting from before its range existed is used.
pub fn clamp_duration(d: Duration, (min, max): (Duration, Duration)) -> Duration {
    d.clamp(min, max)
}

/// `v` moved into `(min, max)`; a value that is not a number becomes `min`.
pub fn clamp_f64(v: f64, (min, max): (f64, f64)) -> f64 {
    if v.is_nan() {
        min
    } else {
        v.clamp(min, max)
    }
}

/// `v` moved into `(min, max)`.
pub fn clamp_u32(v: u32, (min, max): (u32, u32)) -> u32 {
    v.clamp(min, max)
}
