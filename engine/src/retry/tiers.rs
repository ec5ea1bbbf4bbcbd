//! Durable delay tiers: one topic per fixed delay. A retry goes to the largest tier no longer
//! than its remaining wait and hops down until it is due, so within a tier partition due
//! times rise with offsets and a consumer only ever waits for its head.

use std::time::Duration;

/// The tier delays, shortest first.
pub const TIERS: &[Duration] = &[
    Duration::from_millis(100),
    Duration::from_millis(250),
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(5),
    Duration::from_secs(10),
    Duration::from_secs(30),
    Duration::from_secs(60),
    Duration::from_secs(120),
    Duration::from_secs(300),
    Duration::from_secs(600),
    Duration::from_secs(1800),
    Duration::from_secs(3600),
    Duration::from_secs(7200),
    Duration::from_secs(14400),
];

/// A remaining wait below this (the shortest tier) is slept in place instead of hopping.
pub const SLACK: Duration = Duration::from_millis(100);

/// Topic name of a tier: its label under the topic prefix, e.g. `herald.retry.30s`.
pub fn topic(prefix: &str, delay: Duration) -> String {
    format!("{prefix}{}", label(delay))
}

/// The tier for a remaining wait: the longest not exceeding it, or `None` when it is due.
pub fn for_wait(wait: Duration) -> Option<Duration> {
    if wait < SLACK {
        return None;
    }
    Some(TIERS.iter().rev().find(|&&t| t <= wait).copied().unwrap_or(TIERS[0]))
}

/// A tier's name in metrics (the `tier` of retries scheduled, the `source` of its shards) and
/// logs, e.g. `retry.30s`: the one spelling, which its topic name ends with too.
pub fn label(delay: Duration) -> String {
    format!("retry.{}", humantime::format_duration(delay).to_string().replace(' ', ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_keeps_twice_the_longest_tier() {
        assert_eq!(crate::config::MIN_LOG_RETENTION, *TIERS.last().unwrap() * 2);
    }

    #[test]
    fn picks_the_longest_tier_that_does_not_overshoot() {
        assert_eq!(for_wait(Duration::from_millis(10)), None);
        assert_eq!(for_wait(Duration::from_millis(99)), None);
        assert_eq!(for_wait(Duration::from_millis(100)), Some(Duration::from_millis(100)));
        assert_eq!(for_wait(Duration::from_secs(45)), Some(Duration::from_secs(30)));
        assert_eq!(for_wait(Duration::from_secs(1800)), Some(Duration::from_secs(1800)));
        assert_eq!(for_wait(Duration::from_secs(86_400)), Some(Duration::from_secs(14_400)));
        assert_eq!(topic("herald.", Duration::from_millis(250)), "herald.retry.250ms");
        assert_eq!(topic("herald.", Duration::from_secs(1800)), "herald.retry.30m");
    }

    #[test]
    fn hops_reach_any_wait_within_the_slack() {
        for ms in [100u64, 999, 1_234, 45_000, 299_999, 3_601_000, 86_400_000] {
            let mut left = Duration::from_millis(ms);
            let mut hops = 0;
            while let Some(t) = for_wait(left) {
                left = left.saturating_sub(t);
                hops += 1;
            }
            assert!(left < SLACK, "{ms} ms leaves {left:?}");
            assert!(hops <= 12, "{ms} ms took {hops} hops");
        }
    }
}
