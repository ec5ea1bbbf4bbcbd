//! Throttles at the API's edge, so one tenant cannot crowd out the others: a request rate per
//! tenant key (checked after the key is authenticated, so nobody can spend another tenant's
//! rate), and a rate of test pings per subscription (`/test` sends a real request to the
//! receiver: unthrottled, it would be an amplifier). Over a limit: `429` with `Retry-After`.

use super::error::ApiError;
use crate::admission::Bucket;
use crate::model::now_ms;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Buckets kept before idle ones are swept out.
const SWEEP_AT: usize = 10_000;

/// Token buckets by key.
pub struct Throttle {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (Bucket, i64)>>,
    reason: &'static str,
}

impl Throttle {
    /// `rate` per second per key, `burst` at once; refusals are counted under `reason`.
    pub fn new(rate: f64, burst: f64, reason: &'static str) -> Throttle {
        Throttle { rate, burst, buckets: Mutex::new(HashMap::new()), reason }
    }

    /// Lets one request of `key` through, or refuses it saying when to come back.
    pub fn admit(&self, key: &str) -> Result<(), ApiError> {
        let now = now_ms();
        let mut buckets = self.buckets.lock().unwrap();
        if buckets.len() >= SWEEP_AT {
            // Forget keys idle long enough to have refilled.
            let full_after = (self.burst / self.rate * 1000.0) as i64;
            buckets.retain(|_, (_, last)| now - *last < full_after);
        }
        let (bucket, last) =
            buckets.entry(key.to_string()).or_insert_with(|| (Bucket::new(self.rate, self.burst), now));
        *last = now;
        bucket.take(now).map_err(|wait| {
            metrics::counter!(crate::metrics::API_THROTTLED, "reason" => self.reason).increment(1);
            ApiError::throttled(wait.max(Duration::from_secs(1)))
        })
    }
}
