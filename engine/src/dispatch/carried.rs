//! How much of its window a shard uses: the subscriptions its partition carried lately, each
//! twice its in-flight cap (its deliveries under way and as many queued for a slot), up to
//! `dispatch.window`; all of it for a while after a delivery was deferred for want of a slot.
//!
//! Why: past a subscription's cap, the window's records queue for a slot, and they are the
//! look-ahead that lets a partition's other subscriptions pass one whose records queue. A
//! partition carrying one fast subscription has nobody to let pass, and there the look-ahead
//! cost 7–14 % of the CPU per delivery (BENCHMARKS.md, "The partition window"). Once a record
//! waited out its patience and was deferred, an endpoint is slower than its queue: the whole
//! window opens, as before, so its records cannot hold up the others.

use bytes::Bytes;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// How long a subscription counts towards its partition's window after its last record
/// started, and how long the whole window stays open after a deferral for want of a slot.
pub const CARRIED_FOR: Duration = Duration::from_secs(10);

/// The least window a shard uses (room for its first reads, and for small caps).
pub const LEAST: usize = 64;

/// Subscriptions a partition carried lately.
#[derive(Debug, Default)]
pub struct Carried {
    /// By record key (the subscription): its in-flight cap, and when a record of it last started.
    seen: HashMap<Bytes, (u32, Instant)>,
    /// Twice the caps in `seen`.
    wanted: usize,
    swept: Option<Instant>,
    /// Until when the whole window is open.
    open_until: Option<Instant>,
}

impl Carried {
    /// A record of `key` starts; `cap` is asked for its subscription's in-flight cap only the
    /// first time it is seen (lately).
    pub fn saw(&mut self, key: &Bytes, now: Instant, cap: impl FnOnce() -> u32) {
        if let Some((_, at)) = self.seen.get_mut(key) {
            *at = now;
            return;
        }
        let cap = cap();
        self.wanted += 2 * cap as usize;
        self.seen.insert(key.clone(), (cap, now));
    }

    /// A delivery waited out its patience for a slot and was deferred.
    pub fn slot_wanted(&mut self, now: Instant) {
        self.open_until = Some(now + CARRIED_FOR);
    }

    /// The window to use now, of `configured` at most; forgets (once a second) subscriptions
    /// not seen for [`CARRIED_FOR`].
    pub fn window(&mut self, configured: usize, now: Instant) -> usize {
        if self.swept.is_none_or(|at| now - at >= Duration::from_secs(1)) {
            self.swept = Some(now);
            let mut forgotten = 0;
            self.seen.retain(|_, (cap, at)| {
                let keep = now - *at < CARRIED_FOR;
                if !keep {
                    forgotten += 2 * *cap as usize;
                }
                keep
            });
            self.wanted -= forgotten;
        }
        if self.open_until.is_some_and(|until| now < until) {
            return configured;
        }
        configured.min(self.wanted.max(LEAST))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_uses_twice_the_caps_of_what_it_carries_up_to_the_window() {
        let (mut c, t0) = (Carried::default(), Instant::now());
        assert_eq!(c.window(512, t0), LEAST, "room for the first reads");
        c.saw(&Bytes::from("a"), t0, || 64);
        assert_eq!(c.window(512, t0), 128);
        c.saw(&Bytes::from("b"), t0, || 100);
        assert_eq!(c.window(512, t0), 328);
        c.saw(&Bytes::from("c"), t0, || 500);
        assert_eq!(c.window(512, t0), 512, "never more than configured");
        assert_eq!(c.window(8, t0), 8);
    }

    #[test]
    fn a_cap_is_looked_up_once_and_a_subscription_not_seen_lately_is_forgotten() {
        let (mut c, t0) = (Carried::default(), Instant::now());
        let a = Bytes::from("a");
        c.saw(&a, t0, || 64);
        c.saw(&a, t0 + Duration::from_secs(5), || unreachable!("already known"));
        c.saw(&Bytes::from("b"), t0, || 64);
        assert_eq!(c.window(512, t0 + Duration::from_secs(5)), 256);
        // b last started 10 s ago; a 5 s ago.
        assert_eq!(c.window(512, t0 + CARRIED_FOR), 128);
        assert_eq!(c.window(512, t0 + Duration::from_secs(15)), LEAST);
    }

    #[test]
    fn a_deferral_for_want_of_a_slot_opens_the_whole_window_for_a_while() {
        let (mut c, t0) = (Carried::default(), Instant::now());
        let a = Bytes::from("a");
        c.saw(&a, t0, || 64);
        c.slot_wanted(t0);
        assert_eq!(c.window(512, t0 + Duration::from_secs(1)), 512);
        c.saw(&a, t0 + Duration::from_secs(5), || 64);
        assert_eq!(c.window(512, t0 + CARRIED_FOR), 128);
    }
}
