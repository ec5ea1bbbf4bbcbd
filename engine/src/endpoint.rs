//! Per-subscription endpoint state in this process: the in-flight cap as a semaphore, and
//! the endpoint's recent latency, which decides how long a delivery may queue for a slot
//! (a fast endpoint's backlog drains within it; a hung endpoint's deliveries leave the
//! partition's window quickly) and how far a delivery that ran out of patience is deferred.

use crate::model::now_ms;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// In-flight cap of a subscription that sets none.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;

/// How long a delivery queues for a slot before it is deferred: a backlog that drains
/// within it stays in memory, and it is the longest a hung endpoint's deliveries can hold
/// a partition's window slots.
pub const PATIENCE: Duration = Duration::from_millis(250);

/// Load on one subscription's endpoint.
#[derive(Debug)]
pub struct Endpoint {
    slots: Arc<Semaphore>,
    /// Exponentially weighted mean of attempt latency, microseconds.
    latency_us: AtomicU64,
    /// When a slot was last taken or an attempt last completed, ms since the epoch: with
    /// every slot held, no movement for longer than [`PATIENCE`] means the endpoint stalled.
    last_progress_ms: AtomicI64,
}

/// Why a delivery was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Busy {
    /// How long to defer it.
    pub defer: Duration,
}

impl Endpoint {
    /// State for an endpoint with `max_in_flight` (or the default) slots.
    pub fn new(max_in_flight: Option<u32>) -> Self {
        let cap = max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT).max(1);
        Endpoint {
            slots: Arc::new(Semaphore::new(cap as usize)),
            latency_us: AtomicU64::new(0),
            last_progress_ms: AtomicI64::new(now_ms()),
        }
    }

    /// Mean latency of recent attempts.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// Records an attempt's latency.
    pub fn observe(&self, latency: Duration) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
        let sample = latency.as_micros().min(u64::MAX as u128) as u64;
        let _ = self.latency_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample } else { old - old / 8 + sample / 8 })
        });
    }

    /// Takes an in-flight slot: at once if one is free; else, if the endpoint is still
    /// completing requests, after queueing (in order) for at most [`PATIENCE`]. A delivery
    /// that runs out of patience, or finds every slot held by requests that have not moved
    /// for longer than that (a stalled endpoint), is busy: defer it by about two mean latencies.
    pub async fn admit(&self) -> Result<OwnedSemaphorePermit, Busy> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
            return Ok(p);
        }
        let busy = || Busy { defer: (self.latency() * 2).clamp(Duration::from_millis(100), Duration::from_secs(10)) };
        let stalled = now_ms() - self.last_progress_ms.load(Ordering::Relaxed) > PATIENCE.as_millis() as i64;
        if stalled {
            return Err(busy());
        }
        match tokio::time::timeout(PATIENCE, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => {
                self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
                Ok(p)
            }
            _ => Err(busy()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admits_up_to_the_cap_then_queues_until_patience_runs_out() {
        let e = Endpoint::new(Some(2));
        e.observe(Duration::from_millis(10));
        let a = e.admit().await.unwrap();
        let _b = e.admit().await.unwrap();
        // A third waits for a slot and gets it when one frees.
        let freed = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(a);
        };
        let (third, ()) = tokio::join!(e.admit(), freed);
        assert!(third.is_ok());
        // With every slot taken and nothing freeing, a waiter gives up after its patience...
        let started = std::time::Instant::now();
        let busy = e.admit().await.unwrap_err();
        assert!(started.elapsed() >= PATIENCE);
        assert_eq!(busy.defer, Duration::from_millis(100));
        // ...and once nothing has completed for that long, the endpoint counts as stalled:
        // the next delivery is deferred at once instead of waiting.
        let started = std::time::Instant::now();
        assert!(e.admit().await.is_err());
        assert!(started.elapsed() < Duration::from_millis(50));
    }

    #[test]
    fn latency_is_a_moving_mean() {
        let e = Endpoint::new(None);
        e.observe(Duration::from_millis(80));
        assert_eq!(e.latency(), Duration::from_millis(80));
        for _ in 0..50 {
            e.observe(Duration::from_millis(8));
        }
        assert!(e.latency() < Duration::from_millis(10));
    }
}
