//! Bytes of delivery records being written at once, per tenant and in all. A publish holds
//! its share from the moment it makes its records until the log has them, and that can outlast
//! the request: a client cut off by the API's timeout leaves its write running, so a stalled or
//! slow log, with clients that give up and send again, would otherwise grow Herald's memory
//! without bound — and one tenant fanning out large events could take all of it. Past its
//! tenant's share a publish is refused with `429`, past everyone's with `503`, after a short
//! wait for earlier writes to finish.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Permits count KiB, so one request's share of up to 4 TiB fits a single `acquire_many`.
const UNIT: u64 = 1024;

/// How long a publish holding no share yet waits for one before it is refused.
pub const WAIT: Duration = Duration::from_secs(10);

/// Which share a publish would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// Its tenant's (`quotas.pending_bytes`).
    Tenant {
        /// The share, in bytes.
        max: u64,
    },
    /// Everyone's (`ingest.pending_bytes`).
    All {
        /// The share, in bytes.
        max: u64,
    },
}

/// The shares, in all and per tenant.
pub struct Budget {
    all: Arc<Semaphore>,
    /// Told whenever a share gives bytes of `all` back while a request waits for room there:
    /// it tries again, rather than queueing on the semaphore, where the room freed went to the
    /// head of the queue — a large request ahead held every smaller one behind it, whatever its
    /// tenant. (A large one can now be refused while small ones keep the room taken: its own
    /// size, under a log too slow for everyone, is what it waits on.)
    freed: Arc<Freed>,
    all_max: u64,
    tenant_max: u64,
    /// A tenant's semaphore, while anyone holds or waits on it (dropped when idle, so names
    /// an admin publishes for do not pile up).
    tenants: Mutex<HashMap<String, Arc<Semaphore>>>,
}

/// Room given back in everyone's share, told to the requests waiting for it.
#[derive(Default)]
struct Freed {
    notify: Notify,
    /// Requests waiting: with none, a share given back tells no one (and takes no lock).
    waiting: AtomicUsize,
}

/// A request counted in [`Freed::waiting`] while it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What one request holds: released when dropped, once its records are written (or refused).
/// Its bytes per tenant are summed before they are rounded up to permits, so a request
/// within `quotas.fanout_bytes` fits its tenant's share whatever the number of its events
/// (rounded each, a thousand events of just over a KiB needed twice their bytes).
#[derive(Default)]
pub struct Share {
    all: Option<OwnedSemaphorePermit>,
    tenants: HashMap<String, (u64, OwnedSemaphorePermit)>,
    /// The budget's [`Budget::freed`], once bytes of `all` are held.
    freed: Option<Arc<Freed>>,
}

impl Drop for Share {
    fn drop(&mut self) {
        if let (Some(all), Some(freed)) = (self.all.take(), &self.freed) {
            drop(all);
            // After the bytes are back: a request counted from now on finds them itself.
            if freed.waiting.load(Ordering::SeqCst) > 0 {
                freed.notify.notify_waiters();
            }
        }
    }
}

fn permits(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(UNIT)).unwrap_or(u32::MAX)
}

fn merge(into: &mut Option<OwnedSemaphorePermit>, p: OwnedSemaphorePermit) {
    match into {
        Some(held) => held.merge(p),
        None => *into = Some(p),
    }
}

impl Budget {
    /// A tenant may have `tenant_max` bytes being written, everyone together `all_max`.
    pub fn new(tenant_max: u64, all_max: u64) -> Budget {
        let size = |max: u64| usize::try_from(max.div_ceil(UNIT)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        Budget {
            all: Arc::new(Semaphore::new(size(all_max))),
            freed: Arc::default(),
            all_max,
            tenant_max,
            tenants: Mutex::default(),
        }
    }

    /// A budget that never refuses (unit tests of what sits on it).
    pub fn unbounded() -> Budget {
        Budget::new(u64::MAX, u64::MAX)
    }

    fn tenant(&self, name: &str) -> Arc<Semaphore> {
        let mut tenants = self.tenants.lock().unwrap();
        if let Some(s) = tenants.get(name) {
            return s.clone();
        }
        // Idle ones go when the map has doubled since: amortised, and bounded by the tenants
        // writing at once.
        if tenants.len() >= 64 && tenants.len().is_power_of_two() {
            tenants.retain(|_, s| Arc::strong_count(s) > 1);
        }
        let size = usize::try_from(self.tenant_max.div_ceil(UNIT)).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
        let s = Arc::new(Semaphore::new(size));
        tenants.insert(name.to_string(), s.clone());
        s
    }

    /// Adds `bytes` for `tenant` to `share`. A share that holds nothing yet waits up to
    /// [`WAIT`] for room; one that holds some takes it at once or not at all, so two requests
    /// can never wait for each other's bytes.
    pub async fn take(&self, share: &mut Share, tenant: &str, bytes: u64) -> Result<(), Over> {
        let taken = self.take_inner(share, tenant, bytes).await;
        if let Err(Over::Tenant { .. }) = taken {
            metrics::counter!(crate::metrics::API_THROTTLED, "reason" => "pending_bytes").increment(1);
        }
        taken
    }

    async fn take_inner(&self, share: &mut Share, tenant: &str, bytes: u64) -> Result<(), Over> {
        if bytes == 0 {
            return Ok(());
        }
        // The permits this adds to what the share holds for the tenant (none, when the sum
        // stays within the KiB it already holds).
        let held = share.tenants.get(tenant).map_or(0, |(b, _)| *b);
        let n = permits(held.saturating_add(bytes)) - permits(held);
        if n == 0 {
            share.tenants.get_mut(tenant).expect("held").0 += bytes;
            return Ok(());
        }
        let may_wait = share.all.is_none();
        let mine = self.tenant(tenant);
        let over_tenant = Over::Tenant { max: self.tenant_max };
        let over_all = Over::All { max: self.all_max };
        let deadline = tokio::time::Instant::now() + WAIT;
        let own = match mine.clone().try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) if may_wait => tokio::time::timeout_at(deadline, mine.acquire_many_owned(n))
                .await
                .map_err(|_| over_tenant)?
                .map_err(|_| over_tenant)?,
            Err(_) => return Err(over_tenant),
        };
        // Room in everyone's share: taken when there is enough, else looked for again each
        // time a share gives some back (see `freed`), until the deadline.
        let _waiting = may_wait.then(|| {
            self.freed.waiting.fetch_add(1, Ordering::SeqCst);
            Waiting(&self.freed.waiting)
        });
        let all = loop {
            let freed = self.freed.notify.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.all.clone().try_acquire_many_owned(n) {
                Ok(p) => break p,
                Err(_) if may_wait => {
                    tokio::time::timeout_at(deadline, freed).await.map_err(|_| over_all)?;
                }
                Err(_) => return Err(over_all),
            }
        };
        match share.tenants.get_mut(tenant) {
            Some((sum, held)) => {
                *sum += bytes;
                held.merge(own);
            }
            None => {
                share.tenants.insert(tenant.to_string(), (bytes, own));
            }
        }
        merge(&mut share.all, all);
        share.freed.get_or_insert_with(|| self.freed.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A tenant past its share waits, then is refused; another tenant is not held up by it;
    /// the bytes come back when the share is dropped.
    #[tokio::test(start_paused = true)]
    async fn a_tenant_past_its_share_is_refused_and_another_is_not() {
        let budget = Budget::new(4 * MIB, 6 * MIB);
        let mut a = Share::default();
        budget.take(&mut a, "a", 4 * MIB).await.unwrap();
        let mut a2 = Share::default();
        assert_eq!(budget.take(&mut a2, "a", MIB).await, Err(Over::Tenant { max: 4 * MIB }));
        let mut b = Share::default();
        budget.take(&mut b, "b", 2 * MIB).await.expect("another tenant has room");
        let mut c = Share::default();
        assert_eq!(budget.take(&mut c, "c", MIB).await, Err(Over::All { max: 6 * MIB }), "everyone's share is used");
        drop(a);
        budget.take(&mut a2, "a", 3 * MIB).await.expect("a's bytes came back");
    }

    /// A waiting request gets its bytes when an earlier write finishes within the wait.
    #[tokio::test(start_paused = true)]
    async fn a_request_waits_for_an_earlier_write_to_finish() {
        let budget = Arc::new(Budget::new(4 * MIB, 8 * MIB));
        let mut first = Share::default();
        budget.take(&mut first, "a", 4 * MIB).await.unwrap();
        let waiting = tokio::spawn({
            let budget = budget.clone();
            async move {
                let (mut second, started) = (Share::default(), tokio::time::Instant::now());
                budget.take(&mut second, "a", MIB).await.map(|()| started.elapsed())
            }
        });
        // The earlier write takes half the wait (time is paused: this runs once the request
        // above waits).
        tokio::time::sleep(WAIT / 2).await;
        drop(first);
        assert_eq!(waiting.await.unwrap(), Ok(WAIT / 2), "it waited for the write, then got its bytes");
    }

    /// One tenant's request waiting for room in everyone's share does not hold up another
    /// tenant's small one that fits the room there is: queued on the shared semaphore (first
    /// come, first served, the room handed to the head as it frees), the small one waited
    /// behind the large one until that gave up, ten seconds on.
    #[tokio::test(start_paused = true)]
    async fn a_large_request_waiting_for_room_does_not_hold_up_a_small_one() {
        let budget = Arc::new(Budget::new(4 * MIB, 6 * MIB));
        let (mut c, mut d) = (Share::default(), Share::default());
        budget.take(&mut c, "c", 3 * MIB).await.unwrap();
        budget.take(&mut d, "d", 2 * MIB).await.unwrap();
        let large = tokio::spawn({
            let budget = budget.clone();
            async move { budget.take(&mut Share::default(), "a", 4 * MIB).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await; // the large one is waiting
        let started = tokio::time::Instant::now();
        budget.take(&mut Share::default(), "b", 10 << 10).await.expect("fits the room there is");
        assert_eq!(started.elapsed(), Duration::ZERO, "at once, not behind the large one");
        drop(c);
        assert_eq!(large.await.unwrap(), Ok(()), "the large one gets its room when it frees");
    }

    /// A request that already holds bytes does not wait for more (two such requests would
    /// wait for each other): it is refused at once.
    #[tokio::test(start_paused = true)]
    async fn a_request_holding_bytes_never_waits() {
        let budget = Budget::new(4 * MIB, 8 * MIB);
        let (mut x, mut y) = (Share::default(), Share::default());
        budget.take(&mut x, "a", 2 * MIB).await.unwrap();
        budget.take(&mut y, "a", 2 * MIB).await.unwrap();
        let started = tokio::time::Instant::now();
        assert_eq!(budget.take(&mut x, "a", MIB).await, Err(Over::Tenant { max: 4 * MIB }));
        assert_eq!(started.elapsed(), Duration::ZERO, "refused without waiting");
    }

    /// A request's bytes are summed before they are rounded to permits: a thousand events of
    /// just over a KiB each fit a share of their sum (rounded each, the request needed twice
    /// that and was refused every time on an idle server).
    #[tokio::test(start_paused = true)]
    async fn many_small_events_fit_a_share_of_their_sum() {
        let budget = Budget::new(1_040_000, 1_040_000);
        let mut share = Share::default();
        for i in 0..1000 {
            assert_eq!(budget.take(&mut share, "a", 1_040).await, Ok(()), "event {i}");
        }
    }

    /// Tenants nobody writes for are not kept.
    #[tokio::test]
    async fn idle_tenants_are_forgotten() {
        let budget = Budget::new(4 * MIB, 8 * MIB);
        for i in 0..1000 {
            let mut s = Share::default();
            budget.take(&mut s, &format!("t{i}"), 1).await.unwrap();
        }
        assert!(budget.tenants.lock().unwrap().len() < 600, "idle tenants pruned");
    }
}
