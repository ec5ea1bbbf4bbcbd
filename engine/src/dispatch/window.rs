//! The in-flight window of one partition: deliveries complete in any order, and the commit
//! point only ever covers the contiguous prefix of completed offsets. Concurrency is
//! bounded by `in_flight`; finished offsets waiting behind a slow one cost only a slot in
//! `pending`, so a hung delivery holds back commits, not other deliveries.
//!
//! A delivery in flight for longer than [`YOUNG`] is counted apart ([`Window::aged`]): the
//! shard bounds the young ones by its window and all of them by twice it, so deliveries to
//! endpoints that hang (each subscription up to its own slots) cannot fill the window and
//! hold up every other subscription of the partition.

use crate::model::{Failure, Outcome};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a delivery in flight counts as young: four times the admission's patience for a
/// slot (250 ms), so that a delivery waiting for one of its endpoint's slots never ages (with
/// 250 ms, a saturated run's waiters aged and let more start, each more work for admission:
/// 3–5 % fewer deliveries a second in `e2e.sh`), while an attempt that hangs does.
pub const YOUNG: Duration = Duration::from_secs(1);

/// How many more deliveries may start beside `in_flight`, `young` of them in flight for less
/// than [`YOUNG`], under a window of `window`: fewer young ones than the window, fewer than
/// twice it in all. The one rule for the shards and the ordered sequencer.
pub fn room(window: usize, young: usize, in_flight: usize) -> usize {
    window.saturating_sub(young).min((2 * window).saturating_sub(in_flight))
}

/// Each tenant's deliveries in flight in one partition: at most [`Shares::cap`] of them, so
/// one tenant's endpoints that hang — however many slots it gives them, however many of them
/// share the partition — cannot fill twice the window (all of them aged, the partition would
/// start nothing until their timeouts, up to five minutes, for every tenant there).
#[derive(Debug)]
pub struct Shares(Tally);

impl Shares {
    /// Shares of a partition whose window is `window`: three quarters of everything it may
    /// have in flight (twice the window), so every other tenant keeps room for half a window.
    pub fn new(window: usize) -> Shares {
        Shares(Tally::new(Self::cap(window)))
    }

    /// The most one tenant may have in flight in a partition of `window`.
    fn cap(window: usize) -> usize {
        (2 * window - window / 2).max(1)
    }

    /// One more delivery of `tenant` in flight, of `size` bytes, if its share of the partition
    /// has room and its bytes in flight in the process (`bytes`) do too: held until the guard
    /// drops.
    pub fn take<'a>(&'a self, bytes: &'a InFlightBytes, tenant: &'a str, size: usize) -> Result<Share<'a>, Full> {
        let now = crate::model::now_ms();
        self.0.take(tenant, 1, now).map_err(|_| Full::Share)?;
        if let Err(over) = bytes.0.take(tenant, size, now) {
            self.0.give(tenant, 1);
            return Err(Full::Bytes(over));
        }
        Ok(Share { shares: &self.0, bytes: &bytes.0, tenant, size })
    }
}

/// Why [`Shares::take`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The tenant's share of the partition is all in flight.
    Share,
    /// Its bytes in flight are at their bound, and have been refused more for this long.
    Bytes(std::time::Duration),
}

/// Bytes of records each tenant has in flight in the process, over every partition of every
/// topic (a delivery's future holds its whole record until it settles, for its dead letter):
/// at most `dispatch.tenant_in_flight_bytes` (64 MiB), though a tenant with nothing in flight
/// may always start one, however large. [`Shares`] bound a partition's deliveries, not their
/// size: one tenant's endpoints that hang, sent events of a megabyte, held 768 of them a
/// partition — gigabytes over the partitions and the retry tiers, until the process ran out of
/// memory, and after a restart ran out again on the same records.
#[derive(Debug)]
pub struct InFlightBytes(Tally);

impl InFlightBytes {
    /// At most `per_tenant` bytes of one tenant's in flight (beside its first).
    pub fn new(per_tenant: usize) -> InFlightBytes {
        InFlightBytes(Tally::new(per_tenant))
    }
}

/// An amount each tenant holds, up to a cap (beside its first, however large), and since when
/// (ms, 0 if not) it has been refused more without a take between; a tenant holding nothing
/// is forgotten.
#[derive(Debug)]
struct Tally {
    cap: usize,
    held: std::sync::Mutex<std::collections::HashMap<String, (usize, i64)>>,
}

impl Tally {
    fn new(cap: usize) -> Tally {
        Tally { cap, held: Default::default() }
    }

    /// Holds `amount` more of `tenant`'s if they fit; else how long it has been refused more
    /// without a take between (`now` in ms).
    fn take(&self, tenant: &str, amount: usize, now: i64) -> Result<(), std::time::Duration> {
        let mut held = self.held.lock().unwrap();
        match held.get_mut(tenant) {
            Some((n, refused)) if n.saturating_add(amount) > self.cap => {
                if *refused == 0 {
                    *refused = now;
                }
                return Err(std::time::Duration::from_millis((now - *refused).max(0) as u64));
            }
            Some((n, refused)) => {
                *n += amount;
                *refused = 0;
            }
            None => {
                held.insert(tenant.to_string(), (amount, 0));
            }
        }
        Ok(())
    }

    fn give(&self, tenant: &str, amount: usize) {
        let mut held = self.held.lock().unwrap();
        if let Some((n, _)) = held.get_mut(tenant) {
            *n = n.saturating_sub(amount);
            if *n == 0 {
                held.remove(tenant);
            }
        }
    }
}

/// A delivery's place in its tenant's share of a partition and its bytes in flight
/// ([`Shares::take`]), given back when dropped. One guard for both: it is held across the
/// attempt, in every delivery's future.
#[derive(Debug)]
pub struct Share<'a> {
    shares: &'a Tally,
    bytes: &'a Tally,
    tenant: &'a str,
    size: usize,
}

impl Drop for Share<'_> {
    fn drop(&mut self) {
        self.shares.give(self.tenant, 1);
        self.bytes.give(self.tenant, self.size);
    }
}

/// Ends attempts that hold back a partition's commit point. A delivery in flight keeps every
/// offset after it from being committed, and at `dispatch.max_uncommitted` offsets held the
/// partition starts nothing more: one attempt hanging for its timeout (up to five minutes)
/// stopped every tenant's deliveries there once the others had moved that far past it. Past
/// half of that, the shard ends the oldest attempts that have aged ([`Window::cut_below`]),
/// each settling as a failure ([`Failure::Held`]) whose retry is durable in a tier before its
/// offset is committed: nothing is lost, and the attempt is made again later.
#[derive(Debug, Clone)]
pub struct Cut(Option<watch::Receiver<u64>>);

impl Cut {
    /// A shard's: its sender moves the offset below which attempts end.
    pub fn channel() -> (watch::Sender<u64>, Cut) {
        let (tx, rx) = watch::channel(0);
        (tx, Cut(Some(rx)))
    }

    /// Never ends an attempt (an ordered sequencer's: a key's head holds only its own key).
    pub fn never() -> Cut {
        Cut(None)
    }

    /// The outcome of `attempt` for the record at `offset`, or [`Failure::Held`] if the shard
    /// ends it first (dropping it, as a timeout does). Pinned where the caller holds it: moved
    /// in here, the attempt's future would take its room twice in every delivery's future.
    pub async fn race<F: Future<Output = Outcome>>(&mut self, offset: u64, attempt: Pin<&mut F>) -> Outcome {
        let started = std::time::Instant::now();
        tokio::select! {
            // The cut first: an attempt reaching here already cut is not started at all.
            biased;
            () = self.reached(offset) => {
                let after = started.elapsed();
                Outcome::failed(Failure::Held { after_ms: crate::model::whole_millis(after) }, after)
            }
            outcome = attempt => outcome,
        }
    }

    /// Whether the record at `offset` is to end now (before it is sent: then it is not sent).
    pub fn reached_now(&self, offset: u64) -> bool {
        self.0.as_ref().is_some_and(|rx| offset < *rx.borrow())
    }

    /// Resolves once the record at `offset` is to end; never, for [`Cut::never`] or once its
    /// shard is gone. (A delivery's own receiver: waited on as it is, not cloned per attempt.)
    async fn reached(&mut self, offset: u64) {
        if let Some(rx) = &mut self.0 {
            if rx.wait_for(|&below| offset < below).await.is_ok() {
                return;
            }
        }
        std::future::pending().await
    }
}

/// Offsets started and not yet covered by the commit point.
#[derive(Debug, Default)]
pub struct Window {
    /// Offset, done, and when it started.
    pending: VecDeque<(u64, bool, Instant)>,
    in_flight: usize,
    /// The highest offset ever started (the pending queue empties as commits move on).
    last_started: Option<u64>,
    /// Every offset started at or before this one has aged (started [`YOUNG`] ago or more).
    aged_through: Option<u64>,
    /// Of those in flight, how many have aged.
    aged: usize,
}

impl Window {
    /// Records that work on `offset` began, if offsets still rise (gaps allowed); `false` for
    /// an offset at or below the last one started — a record a reader handed out again (Kafka
    /// can fetch a stretch twice): it was started already, and letting it in would break the
    /// order the commit point is computed from, and with it, what a commit promises.
    #[must_use]
    pub fn start(&mut self, offset: u64) -> bool {
        self.start_at(offset, Instant::now())
    }

    /// [`Window::start`], at `now`.
    pub fn start_at(&mut self, offset: u64, now: Instant) -> bool {
        if self.pending.back().is_some_and(|&(o, ..)| o >= offset) || self.last_started.is_some_and(|o| o >= offset) {
            return false;
        }
        self.last_started = Some(offset);
        self.pending.push_back((offset, false, now));
        self.in_flight += 1;
        true
    }

    /// Counts as aged what started [`YOUNG`] before `now` or earlier.
    pub fn age(&mut self, now: Instant) {
        let from = match self.aged_through {
            Some(through) => self.pending.partition_point(|&(o, ..)| o <= through),
            None => 0,
        };
        for &(offset, done, started) in self.pending.range(from..) {
            if now.duration_since(started) < YOUNG {
                break;
            }
            self.aged_through = Some(offset);
            if !done {
                self.aged += 1;
            }
        }
    }

    /// When the oldest young delivery ages, or a little before (the oldest young entry may
    /// have finished: a wake-up for nothing, rather than a walk over the window each time the
    /// shard waits with it full).
    pub fn next_aging(&self) -> Option<Instant> {
        let from = self.aged_through.map_or(0, |through| self.pending.partition_point(|&(o, ..)| o <= through));
        self.pending.get(from).map(|&(_, _, started)| started + YOUNG)
    }

    /// Records that `offset` is done; returns the new commit point (the offset after the
    /// completed prefix) when it moved.
    pub fn finish(&mut self, offset: u64) -> Option<u64> {
        let i = self.pending.binary_search_by_key(&offset, |&(o, ..)| o).ok()?;
        if self.pending[i].1 {
            return None;
        }
        self.pending[i].1 = true;
        self.in_flight -= 1;
        if self.aged_through.is_some_and(|through| offset <= through) {
            self.aged -= 1;
        }
        let mut last = None;
        while let Some(&(o, true, _)) = self.pending.front() {
            last = Some(o);
            self.pending.pop_front();
        }
        last.map(|o| self.pending.front().map_or(o + 1, |&(next, ..)| next))
    }

    /// Deliveries started and not finished.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Deliveries in flight for less than [`YOUNG`] (as of the last [`Window::age`]).
    pub fn young(&self) -> usize {
        self.in_flight - self.aged
    }

    /// Offsets held back from the commit point (in flight, or done behind one in flight).
    pub fn held(&self) -> usize {
        self.pending.len()
    }

    /// With more than `keep` offsets held, the offset below which attempts still in flight
    /// should end ([`Cut`]): those among the oldest beyond `keep` that have aged (as of the
    /// last [`Window::age`]); `None` when none should.
    pub fn cut_below(&self, keep: usize) -> Option<u64> {
        let over = self.pending.len().checked_sub(keep).filter(|&n| n > 0)?;
        let through = self.aged_through?;
        let (last, ..) = self.pending[over - 1];
        let below = last.min(through) + 1;
        self.pending.front().is_some_and(|&(front, ..)| front < below).then_some(below)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_holds_at_most_its_share_and_gives_it_back() {
        let (shares, bytes) = (Shares::new(8), InFlightBytes::new(1 << 30));
        let held: Vec<_> = (0..12).map(|_| shares.take(&bytes, "mallory", 1).expect("within the share")).collect();
        assert_eq!(
            shares.take(&bytes, "mallory", 1).err(),
            Some(Full::Share),
            "12 of the 16 a partition of 8 may have in flight"
        );
        let other = shares.take(&bytes, "acme", 1).expect("another tenant has room");
        drop(held);
        assert!(shares.take(&bytes, "mallory", 1).is_ok());
        drop(other);
        assert!(shares.0.held.lock().unwrap().len() <= 1, "tenants with nothing in flight are forgotten");
        assert!(bytes.0.held.lock().unwrap().is_empty(), "and their bytes");
    }

    /// A tenant's bytes in flight stay within their bound, over partitions, beside a first
    /// delivery however large; a refusal for bytes gives its partition share back.
    #[test]
    fn a_tenant_s_bytes_in_flight_are_bounded_over_every_partition() {
        let (one, two, bytes) = (Shares::new(8), Shares::new(8), InFlightBytes::new(1000));
        let first = one.take(&bytes, "mallory", 5000).expect("a first delivery, however large");
        assert!(
            matches!(two.take(&bytes, "mallory", 1), Err(Full::Bytes(_))),
            "past the bound, in another partition too"
        );
        assert!(one.0.held.lock().unwrap()["mallory"].0 == 1, "the refused one's share given back");
        let other = two.take(&bytes, "acme", 600).expect("another tenant's bytes are its own");
        drop(first);
        let a = one.take(&bytes, "mallory", 600).unwrap();
        assert!(two.take(&bytes, "mallory", 600).is_err(), "1,200 bytes past 1,000");
        let b = two.take(&bytes, "mallory", 400).expect("1,000 within 1,000");
        drop((a, b, other));
        assert!(bytes.0.held.lock().unwrap().is_empty());
    }

    #[test]
    fn a_record_handed_out_again_is_not_started_twice_and_the_commit_point_stays_true() {
        let mut w = Window::default();
        for o in [10, 11, 12] {
            assert!(w.start(o));
        }
        // A reader fetched 11..=12 again (and, after 10 was committed, 10 too).
        assert_eq!(w.finish(10), Some(11));
        assert!(!w.start(10));
        assert!(!w.start(11));
        assert!(!w.start(12));
        assert!(w.start(13));
        assert_eq!(w.in_flight(), 3);
        assert_eq!(w.finish(13), None, "11 and 12 are not done: nothing past them commits");
        assert_eq!(w.finish(12), None);
        assert_eq!(w.finish(11), Some(14));
    }

    #[test]
    fn deliveries_in_flight_past_young_count_apart() {
        let mut w = Window::default();
        let t0 = Instant::now();
        for o in [1, 2, 3] {
            assert!(w.start_at(o, t0));
        }
        let later = t0 + YOUNG;
        for o in [4, 5] {
            assert!(w.start_at(o, t0 + Duration::from_millis(1)));
        }
        w.finish(2);
        w.age(later);
        assert_eq!((w.in_flight(), w.young()), (4, 2), "1 and 3 aged; 2 finished young");
        assert_eq!(w.finish(1), Some(3));
        assert_eq!(w.finish(4), None);
        assert_eq!((w.in_flight(), w.young()), (2, 1));
        w.age(later + YOUNG);
        assert_eq!(w.young(), 0);
        w.finish(3);
        w.finish(5);
        assert_eq!((w.in_flight(), w.young(), w.held()), (0, 0, 0));
    }

    #[test]
    fn only_aged_attempts_among_the_oldest_past_keep_are_cut() {
        let mut w = Window::default();
        let t0 = Instant::now();
        for o in 0..4 {
            assert!(w.start_at(o, t0));
        }
        for o in 4..10 {
            assert!(w.start_at(o, t0 + YOUNG));
        }
        assert_eq!(w.cut_below(6), None, "nothing has aged");
        w.age(t0 + YOUNG);
        assert_eq!(w.cut_below(10), None, "not past keep");
        assert_eq!(w.cut_below(8), Some(2), "the two oldest");
        assert_eq!(w.cut_below(3), Some(4), "the aged ones only: 4.. are young");
        w.finish(0);
        assert_eq!(w.cut_below(3), Some(4));
        for o in 4..10 {
            w.finish(o);
        }
        assert_eq!(w.cut_below(3), Some(4), "done behind one in flight still counts as held");
        for o in 1..4 {
            w.finish(o);
        }
        assert_eq!((w.held(), w.cut_below(0)), (0, None));
    }

    #[tokio::test]
    async fn a_cut_ends_the_attempts_below_it_and_never_ends_none() {
        let (tx, cut) = Cut::channel();
        let hang = || std::future::pending::<Outcome>();
        let below = tokio::spawn({
            let mut cut = cut.clone();
            async move { cut.race(4, std::pin::pin!(hang())).await }
        });
        let above = tokio::spawn({
            let mut cut = cut.clone();
            async move { cut.race(5, std::pin::pin!(hang())).await }
        });
        tx.send_replace(5);
        let ended = below.await.unwrap();
        assert_eq!(ended.label(), "timeout");
        assert!(matches!(ended.failure(), Some(Failure::Held { .. })), "{ended:?}");
        let waited = tokio::time::timeout(Duration::from_millis(50), above).await;
        assert!(waited.is_err(), "offset 5 is not below 5: still in flight");
        let done = Outcome::Delivered { status: 200, latency: Duration::ZERO, response: None };
        assert_eq!(Cut::never().race(0, std::pin::pin!(async { done.clone() })).await, done);
        drop(tx);
        let (gone, mut cut) = Cut::channel();
        drop(gone);
        let later = async {
            tokio::time::sleep(Duration::from_millis(10)).await; // an attempt that takes a while
            done.clone()
        };
        assert_eq!(cut.race(0, std::pin::pin!(later)).await, done, "a gone shard ends nothing");
    }

    #[test]
    fn commits_only_the_contiguous_prefix() {
        let mut w = Window::default();
        for o in [10, 11, 12, 14] {
            assert!(w.start(o));
        }
        assert_eq!(w.in_flight(), 4);
        assert_eq!(w.finish(12), None);
        assert_eq!(w.finish(12), None, "finishing twice changes nothing");
        assert_eq!((w.in_flight(), w.held()), (3, 4));
        assert_eq!(w.finish(11), None);
        assert_eq!(w.finish(10), Some(14)); // 10..=12 done, 14 still pending
        assert_eq!(w.finish(14), Some(15));
        assert_eq!(w.held(), 0);
    }

    #[test]
    fn out_of_order_completion_in_any_permutation_ends_at_the_last_offset() {
        use rand::seq::SliceRandom;
        let mut rng = rand::thread_rng();
        for _ in 0..200 {
            let mut w = Window::default();
            let offsets: Vec<u64> = (0..50).map(|i| i * 2).collect();
            offsets.iter().for_each(|&o| assert!(w.start(o)));
            let mut order = offsets.clone();
            order.shuffle(&mut rng);
            let mut commit = 0;
            for o in order {
                if let Some(c) = w.finish(o) {
                    assert!(c > commit, "commit point moves forward");
                    commit = c;
                }
            }
            assert_eq!(commit, 99);
        }
    }
}
