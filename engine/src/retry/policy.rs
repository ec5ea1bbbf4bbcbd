//! Retry policies: the one place that decides when the next attempt is due. Jitter is drawn
//! from a seed fixed per delivery, so the whole schedule is known in advance: the envelope's
//! `pendingRetries` is exact, and a restart replays the same schedule.

use crate::model::{range, RetrySpec};
use std::time::Duration;

/// The default promise: 185 attempts within 24 hours, exponential with jitter.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 185;
/// No attempt later than this after the event was accepted (or replayed), by default.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_INITIAL: Duration = Duration::from_secs(5);
const DEFAULT_MULTIPLIER: f64 = 2.0;
/// With 5 s doubling to this cap, the jitter-free schedule of 185 attempts spans 23.8 h;
/// jitter only shortens delays, so every draw stays inside 24 h.
const DEFAULT_MAX_INTERVAL: Duration = Duration::from_secs(480);
const DEFAULT_JITTER: f64 = 0.1;

/// A subscription's retry policy with every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub enum Policy {
    /// Delays grow by `multiplier` from `initial` up to `max_interval`, each shortened by a
    /// random fraction of at most `jitter`.
    Exponential {
        /// First delay.
        initial: Duration,
        /// Growth per attempt.
        multiplier: f64,
        /// Largest delay.
        max_interval: Duration,
        /// Largest random reduction, 0..1.
        jitter: f64,
        /// Attempts in all.
        max_attempts: u32,
        /// No attempt after this long from the budget's start.
        max_age: Duration,
    },
    /// The same delay every time.
    Fixed {
        /// The wait between any two attempts.
        interval: Duration,
        /// Attempts in all.
        max_attempts: u32,
    },
}

impl Default for Policy {
    fn default() -> Self {
        Policy::Exponential {
            initial: DEFAULT_INITIAL,
            multiplier: DEFAULT_MULTIPLIER,
            max_interval: DEFAULT_MAX_INTERVAL,
            jitter: DEFAULT_JITTER,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            max_age: DEFAULT_MAX_AGE,
        }
    }
}

/// What a fixed schedule's deadline leaves past its last attempt's due time (with
/// [`range::FIXED_SPAN`], within the longest `max_age`).
const FIXED_SLACK: Duration = Duration::from_secs(86_400);

/// Whole milliseconds of `d`, saturating.
fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// SplitMix64: a tiny, well-known mixer; enough to turn (seed, attempt) into a uniform draw.
fn unit(seed: u64, attempt: u32) -> f64 {
    let mut z = seed ^ (attempt as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

/// The jitter seed of a delivery: stable across attempts and restarts, new per replay.
pub fn seed(event_id: &str, subscription: &str, generation: u32) -> u64 {
    use std::hash::{Hash, Hasher};
    // DefaultHasher with fixed keys is stable within a build; a changed schedule after an
    // upgrade is harmless.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (event_id, subscription, generation).hash(&mut h);
    h.finish()
}

impl Policy {
    /// The policy a subscription asked for, defaults filled in.
    pub fn from_spec(spec: Option<&RetrySpec>) -> Policy {
        let Some(spec) = spec else { return Policy::default() };
        match spec {
            // Clamped into the documented ranges: the API refuses anything outside them, but a
            // subscription stored before a range existed must not reach overflowing arithmetic.
            RetrySpec::Fixed { interval, max_attempts } => Policy::Fixed {
                interval: range::clamp_duration(interval.0, range::FIXED_INTERVAL),
                max_attempts: range::clamp_u32(*max_attempts, range::MAX_ATTEMPTS),
            },
            RetrySpec::Exponential { initial, multiplier, max_interval, jitter, max_attempts, max_age } => {
                let initial = range::clamp_duration(initial.map_or(DEFAULT_INITIAL, |d| d.0), range::INITIAL);
                let max_interval = max_interval.map_or(DEFAULT_MAX_INTERVAL, |d| d.0);
                Policy::Exponential {
                    initial,
                    multiplier: range::clamp_f64(multiplier.unwrap_or(DEFAULT_MULTIPLIER), range::MULTIPLIER),
                    max_interval: range::clamp_duration(max_interval, range::MAX_INTERVAL).max(initial),
                    jitter: range::clamp_f64(jitter.unwrap_or(DEFAULT_JITTER), range::JITTER),
                    max_attempts: range::clamp_u32(max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS), range::MAX_ATTEMPTS),
                    max_age: range::clamp_duration(max_age.map_or(DEFAULT_MAX_AGE, |d| d.0), range::MAX_AGE),
                }
            }
        }
    }

    /// Attempts in all.
    pub fn max_attempts(&self) -> u32 {
        match self {
            Policy::Exponential { max_attempts, .. } | Policy::Fixed { max_attempts, .. } => *max_attempts,
        }
    }

    /// Largest single delay the policy makes.
    pub fn max_interval(&self) -> Duration {
        match self {
            Policy::Exponential { max_interval, .. } => *max_interval,
            Policy::Fixed { interval, .. } => *interval,
        }
    }

    /// How long after its budget began a delivery may still be attempted. A fixed schedule
    /// has no `max_age` of its own: it gets its span and a day more — room for its attempts'
    /// own durations, a receiver's `Retry-After` and deferrals, so that its last attempt is
    /// made — within the longest `max_age` (7 days, the log's default retention too), so that
    /// no delivery, one held back by an open breaker or a rate limit included, is kept longer.
    fn max_age(&self) -> Option<Duration> {
        match self {
            Policy::Exponential { max_age, .. } => Some(*max_age),
            Policy::Fixed { interval, max_attempts } => {
                let span = interval.saturating_mul(max_attempts.saturating_sub(1));
                Some(span.saturating_add(FIXED_SLACK).min(range::MAX_AGE.1))
            }
        }
    }

    /// The wait between attempt `attempt` (from 1) and the next.
    pub fn delay_after(&self, attempt: u32, seed: u64) -> Duration {
        match self {
            Policy::Fixed { interval, .. } => *interval,
            Policy::Exponential { initial, multiplier, max_interval, jitter, .. } => {
                let grown = initial.as_secs_f64() * multiplier.powi(attempt.saturating_sub(1).min(1000) as i32);
                let nominal = grown.min(max_interval.as_secs_f64());
                let secs = nominal * (1.0 - jitter.clamp(0.0, 1.0) * unit(seed, attempt));
                Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(*max_interval)
            }
        }
    }

    /// When attempt `attempt + 1` is due, if there is one: `None` once the attempts are
    /// used up or the next would fall after `max_age` from `budget_ms`. `not_before` moves
    /// the attempt later (a receiver's `Retry-After`), never earlier.
    pub fn next_due(
        &self,
        attempt: u32,
        budget_ms: i64,
        now_ms: i64,
        seed: u64,
        not_before: Option<Duration>,
    ) -> Option<i64> {
        if attempt >= self.max_attempts() {
            return None;
        }
        let mut delay = self.delay_after(attempt, seed);
        if let Some(later) = not_before {
            delay = delay.max(later);
        }
        let due = now_ms.saturating_add(millis(delay));
        match self.deadline(budget_ms) {
            Some(deadline) if due > deadline => None,
            _ => Some(due),
        }
    }

    /// The last moment any attempt of a delivery whose budget began at `budget_ms` may be
    /// made (`max_age` after it), if the policy has one.
    pub fn deadline(&self, budget_ms: i64) -> Option<i64> {
        self.max_age().map(|age| budget_ms.saturating_add(millis(age)))
    }

    /// Attempts still to come if attempt `attempt`, made at `now_ms`, fails and every later
    /// one fails too (the envelope's `pendingRetries`). On every attempt, so usually O(1):
    /// jitter only shortens delays, so when even the jitter-free rest of the schedule ends
    /// within `max_age`, every remaining attempt fits; only near the end of the budget is the
    /// schedule walked.
    pub fn pending_retries(&self, attempt: u32, budget_ms: i64, now_ms: i64, seed: u64) -> u32 {
        let left = self.max_attempts().saturating_sub(attempt);
        let fits = match self.max_age() {
            None => true,
            Some(age) => {
                now_ms.saturating_add(self.nominal_span_ms(attempt, left)) <= budget_ms.saturating_add(millis(age))
            }
        };
        if fits {
            left
        } else {
            self.walk_pending(attempt, budget_ms, now_ms, seed)
        }
    }

    /// The jitter-free time, rounded up to whole ms, from attempt `attempt` to `n` attempts
    /// later: a geometric sum up to the cap, then the cap per attempt.
    fn nominal_span_ms(&self, attempt: u32, n: u32) -> i64 {
        let secs = match self {
            Policy::Fixed { interval, .. } => interval.as_secs_f64() * n as f64,
            Policy::Exponential { initial, multiplier, max_interval, .. } => {
                let (d0, m, cap) = (initial.as_secs_f64(), *multiplier, max_interval.as_secs_f64());
                // The delay after attempt k is min(d0 * m^(k-1), cap), for k in attempt..attempt+n.
                let first = attempt.saturating_sub(1).min(1000) as i32;
                let below_cap = if m > 1.0 && d0 > 0.0 && cap > d0 {
                    let to_cap = ((cap / d0).ln() / m.ln()).ceil() as i32; // first exponent at or over the cap
                    (to_cap - first).clamp(0, n as i32)
                } else if d0 < cap {
                    n as i32
                } else {
                    0
                };
                let geometric = if below_cap == 0 {
                    0.0
                } else if m > 1.0 {
                    d0 * m.powi(first) * (m.powi(below_cap) - 1.0) / (m - 1.0)
                } else {
                    d0 * below_cap as f64
                };
                geometric + cap * (n as i32 - below_cap) as f64
            }
        };
        // `as` saturates (and makes a NaN 0), so an absurd schedule is simply very long.
        ((secs * 1000.0).ceil() as i64).saturating_add(1)
    }

    /// `pending_retries` the long way: draws every remaining delay.
    fn walk_pending(&self, attempt: u32, budget_ms: i64, now_ms: i64, seed: u64) -> u32 {
        let mut n = 0;
        let mut at = now_ms;
        let mut a = attempt;
        while let Some(due) = self.next_due(a, budget_ms, at, seed, None) {
            n += 1;
            a += 1;
            at = due;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    /// Every attempt time of a delivery that always fails, relative to acceptance.
    fn schedule(p: &Policy, seed: u64) -> Vec<i64> {
        let mut times = vec![0i64];
        let mut attempt = 1;
        while let Some(due) = p.next_due(attempt, 0, *times.last().unwrap(), seed, None) {
            times.push(due);
            attempt += 1;
        }
        times
    }

    /// A subscription stored before its settings were range-checked (or written to the log by
    /// hand) must not panic or hang delivery, whatever it holds.
    #[test]
    fn settings_from_an_unchecked_record_cannot_overflow_or_hang() {
        let huge = Some(HumanDuration(Duration::from_secs(u64::MAX / 4)));
        let specs = [
            RetrySpec::Exponential {
                initial: huge,
                multiplier: Some(1e300),
                max_interval: huge,
                jitter: Some(0.0),
                max_attempts: Some(u32::MAX),
                max_age: huge,
            },
            RetrySpec::Exponential {
                initial: Some(HumanDuration(Duration::ZERO)),
                multiplier: Some(-3.0),
                max_interval: Some(HumanDuration(Duration::ZERO)),
                jitter: Some(7.5),
                max_attempts: Some(u32::MAX),
                max_age: huge,
            },
            RetrySpec::Fixed { interval: HumanDuration(Duration::from_secs(u64::MAX)), max_attempts: u32::MAX },
            RetrySpec::Fixed { interval: HumanDuration(Duration::ZERO), max_attempts: u32::MAX },
        ];
        for spec in specs {
            let p = Policy::from_spec(Some(&spec));
            for attempt in [0, 1, 2, 999, 1000, u32::MAX] {
                for now in [0, i64::MAX / 2, i64::MAX] {
                    let _ = p.delay_after(attempt, 7);
                    let _ = p.next_due(attempt, now, now, 7, Some(Duration::MAX));
                    let _ = p.pending_retries(attempt, 0, now, 7);
                }
            }
            assert!(p.max_attempts() <= range::MAX_ATTEMPTS.1, "{p:?}");
            assert!(p.max_interval() <= range::MAX_INTERVAL.1.max(range::FIXED_INTERVAL.1), "{p:?}");
        }
    }

    #[test]
    fn the_default_makes_185_attempts_inside_24_hours_for_any_jitter() {
        let day = 24 * 3600 * 1000;
        let p = Policy::default();
        for s in 0..2000u64 {
            let times = schedule(&p, s.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            assert_eq!(times.len(), 185, "seed {s}");
            let last = *times.last().unwrap();
            assert!(last <= day, "seed {s}: last attempt at {last} ms");
            assert!(last >= day * 85 / 100, "seed {s}: the schedule should span close to 24 h, got {last} ms");
            assert!(times.windows(2).all(|w| w[1] > w[0]));
        }
    }

    #[test]
    fn no_attempt_is_ever_made_after_max_age() {
        let spec = RetrySpec::Exponential {
            initial: Some(HumanDuration(Duration::from_secs(60))),
            multiplier: Some(3.0),
            max_interval: Some(HumanDuration(Duration::from_secs(7200))),
            jitter: Some(0.5),
            max_attempts: Some(1000),
            max_age: Some(HumanDuration(Duration::from_secs(6 * 3600))),
        };
        let p = Policy::from_spec(Some(&spec));
        for s in 0..500 {
            let times = schedule(&p, s);
            assert!(*times.last().unwrap() <= 6 * 3600 * 1000);
            assert!(times.len() < 1000);
        }
        // Retry-After cannot push an attempt past max_age either.
        assert_eq!(p.next_due(1, 0, 0, 1, Some(Duration::from_secs(7 * 3600))), None);
    }

    #[test]
    fn the_fixed_schedule_is_exactly_five_attempts_thirty_minutes_apart() {
        let spec = RetrySpec::Fixed { interval: HumanDuration(Duration::from_secs(1800)), max_attempts: 5 };
        let p = Policy::from_spec(Some(&spec));
        let times = schedule(&p, 42);
        assert_eq!(times, vec![0, 1_800_000, 3_600_000, 5_400_000, 7_200_000]);
    }

    /// A fixed schedule ends a day after its last attempt is due, at most seven days after
    /// the event (the longest `max_age`, and the log's default retention): it had no deadline
    /// at all, so one stored as a day apart a thousand times retried for three years, and a
    /// delivery held back (an open breaker, a rate limit) never aged out. The day past its
    /// span leaves room for its attempts' durations, so the longest schedule allowed (six
    /// days) makes its last attempt.
    #[test]
    fn a_fixed_schedule_ends_a_day_after_its_last_attempt() {
        let day = 86_400_000;
        let spec = RetrySpec::Fixed { interval: HumanDuration(Duration::from_secs(86_400)), max_attempts: 1000 };
        let p = Policy::from_spec(Some(&spec));
        assert_eq!(p.deadline(0), Some(7 * day), "stored before the limit: cut at seven days");
        assert_eq!(p.next_due(7, 0, 7 * day, 1, None), None);
        assert!(*schedule(&p, 1).last().unwrap() <= 7 * day);
        let longest = RetrySpec::Fixed { interval: HumanDuration(Duration::from_secs(86_400)), max_attempts: 7 };
        let p = Policy::from_spec(Some(&longest));
        assert_eq!(p.deadline(0), Some(7 * day));
        // Each attempt taking 30 s, and its next due a day after it ends: all seven are made.
        let (mut now, mut made) = (0i64, 1);
        while let Some(due) = p.next_due(made, 0, now + 30_000, 1, None) {
            (now, made) = (due, made + 1);
        }
        assert_eq!(made, 7);
    }

    #[test]
    fn pending_retries_counts_what_the_schedule_still_holds() {
        let p = Policy::default();
        assert_eq!(p.pending_retries(1, 0, 0, 7), 184);
        assert_eq!(p.pending_retries(185, 0, 0, 7), 0);
        let fixed = Policy::Fixed { interval: Duration::from_millis(10), max_attempts: 4 };
        assert_eq!((1..=4).map(|a| fixed.pending_retries(a, 0, 0, 0)).collect::<Vec<_>>(), vec![3, 2, 1, 0]);
        // Late in the budget, max_age leaves fewer attempts than max_attempts would.
        let late = 23 * 3600 * 1000;
        assert!(p.pending_retries(10, 0, late, 7) < 10);
    }

    #[test]
    fn the_quick_count_always_equals_walking_the_schedule() {
        let fixed = Policy::Fixed { interval: Duration::from_secs(1800), max_attempts: 5 };
        let custom = Policy::from_spec(Some(&RetrySpec::Exponential {
            initial: Some(HumanDuration(Duration::from_millis(50))),
            multiplier: Some(1.5),
            max_interval: Some(HumanDuration(Duration::from_secs(600))),
            jitter: Some(0.0),
            max_attempts: Some(60),
            max_age: Some(HumanDuration(Duration::from_secs(3 * 3600))),
        }));
        let flat = Policy::from_spec(Some(&RetrySpec::Exponential {
            initial: Some(HumanDuration(Duration::from_secs(10))),
            multiplier: Some(1.0),
            max_interval: None,
            jitter: Some(1.0),
            max_attempts: Some(30),
            max_age: Some(HumanDuration(Duration::from_secs(200))),
        }));
        for p in [Policy::default(), fixed, custom, flat] {
            for s in 0..40u64 {
                for attempt in [1, 2, 7, 30, 100, 184, 185] {
                    for now in [0i64, 3_600_000, 20 * 3_600_000, 23 * 3_600_000 + 59 * 60_000] {
                        assert_eq!(
                            p.pending_retries(attempt, 0, now, s),
                            p.walk_pending(attempt, 0, now, s),
                            "{p:?} seed {s} attempt {attempt} at {now}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn jitter_is_stable_per_delivery_and_differs_between_deliveries() {
        let p = Policy::default();
        assert_eq!(p.delay_after(3, seed("e1", "s1", 0)), p.delay_after(3, seed("e1", "s1", 0)));
        let distinct: std::collections::HashSet<_> =
            (0..50).map(|i| p.delay_after(3, seed(&format!("e{i}"), "s1", 0))).collect();
        assert!(distinct.len() > 40);
        let d = p.delay_after(3, 99);
        assert!(d <= Duration::from_secs(20) && d >= Duration::from_secs(18));
    }
}
