//! A shard works one partition: read a batch, start each record once it is due (at once for
//! fresh deliveries; at append time plus the tier's delay for a retry tier, so a tier shard
//! sleeps until its head is due), let deliveries finish in any order, and commit the
//! contiguous prefix of finished offsets. A read is never cancelled to make room for a
//! completion, and a completion never waits for a read.
//!
//! Supervised: a delivery that panics is processed once more; one that panics twice is
//! dead-lettered with the panic's message, so no record can stop its partition, for this
//! process or, after a restart, the next.

use super::window::{Cut, Shares, Window};
use super::Deliverer;
use crate::log::{Committer, LogError, LogRecord, PartitionReader};
use crate::metrics::ShardStats;
use crate::model::now_ms;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

type Read = BoxFuture<'static, (Box<dyn PartitionReader>, Result<Vec<LogRecord>, LogError>)>;

/// Limits of one shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardLimits {
    /// Young deliveries in flight at most (twice this in all; see `Window::young`).
    pub window: usize,
    /// Offsets held back from the commit point at most (in flight, or finished behind a
    /// slower one); reached only when one delivery is slower than this many others. Past half
    /// of it, the aged attempts holding it back are ended and retried (see `window::Cut`).
    pub max_uncommitted: usize,
    /// Records read at a time at most.
    pub batch: usize,
    /// Ordered keys with something outstanding per partition at most (`ordered`'s sequencer).
    pub max_keys: usize,
    /// How long an ordered key stays held after a dead letter at most (`log.retention`): its
    /// head holds the partition's commit point, and so every tenant's records behind it on
    /// disk (on Kafka the broker deletes them past it anyway).
    pub max_hold: Duration,
    /// On stop, how long in-flight deliveries may take to finish.
    pub drain: Duration,
}

/// One partition's work in progress.
struct Shard {
    deliverer: Arc<Deliverer>,
    delay: Duration,
    limits: ShardLimits,
    committer: Arc<dyn Committer>,
    window: Window,
    /// Each tenant's deliveries in flight here, bounded (see [`Shares`]).
    shares: Arc<Shares>,
    /// Ends the attempts that hold back the commit point too far (see [`Cut`]).
    cut_below: watch::Sender<u64>,
    cut: Cut,
    in_flight: FuturesUnordered<BoxFuture<'static, u64>>,
    /// Read, not started yet (they wait to be due, or for room in the window).
    waiting: VecDeque<LogRecord>,
    /// Their values' bytes.
    waiting_bytes: usize,
    idle: Option<Box<dyn PartitionReader>>,
    reading: Option<Read>,
}

/// Runs one partition until `stop` turns true, then drains within `limits.drain`.
pub async fn run(
    reader: Box<dyn PartitionReader>,
    deliverer: Arc<Deliverer>,
    delay: Duration,
    limits: ShardLimits,
    stats: Arc<ShardStats>,
    mut stop: watch::Receiver<bool>,
) {
    let partition = reader.partition();
    let (cut_below, cut) = Cut::channel();
    let mut shard = Shard {
        committer: deliverer.committer(reader.committer()),
        deliverer,
        delay,
        limits,
        window: Window::default(),
        shares: Arc::new(Shares::new(limits.window)),
        cut_below,
        cut,
        in_flight: FuturesUnordered::new(),
        waiting: VecDeque::new(),
        waiting_bytes: 0,
        idle: Some(reader),
        reading: None,
    };
    loop {
        shard.start_due();
        shard.cut_hanging(partition);
        stats.set_in_flight(shard.window.in_flight());
        stats.set_waiting_bytes(shard.waiting_bytes);
        let wake = shard.wake_at();
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => break,
            Some(offset) = shard.in_flight.next(), if !shard.in_flight.is_empty() => shard.finished(offset),
            (reader, batch) = async { shard.reading.as_mut().expect("guarded").await }, if shard.reading.is_some() => {
                if !shard.read(reader, batch, partition).await {
                    break;
                }
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
        }
    }
    shard.drain(partition).await;
    stats.set_in_flight(0);
    stats.set_waiting_bytes(0);
}

impl Shard {
    /// Room for another delivery: fewer young ones than the window (those in flight past
    /// `window::YOUNG` count apart, so hanging endpoints cannot fill it), fewer than twice the
    /// window in all, and the commit point not held back too far.
    fn has_room(&self) -> bool {
        self.room() > 0
    }

    fn room(&self) -> usize {
        let w = &self.window;
        super::window::room(self.limits.window, w.young(), w.in_flight())
            .min(self.limits.max_uncommitted.saturating_sub(w.held()))
    }

    /// When a record may start: its append time (as [`arrived`] left it) plus the topic's
    /// delay.
    fn due(&self, rec: &LogRecord) -> i64 {
        due(rec.timestamp_ms, self.delay)
    }

    /// Starts what is due while the window has room; reads more only when nothing waits, so
    /// memory stays bounded by one batch.
    fn start_due(&mut self) {
        self.window.age(Instant::now());
        let now = now_ms();
        while self.has_room() && self.waiting.front().is_some_and(|r| self.due(r) <= now) {
            let rec = self.waiting.pop_front().expect("checked");
            self.waiting_bytes -= rec.value.len();
            if !self.window.start(rec.offset) {
                tracing::debug!(offset = rec.offset, "record handed out again; already started");
                continue;
            }
            self.in_flight.push(supervised(self.deliverer.clone(), rec, self.shares.clone(), self.cut.clone()));
        }
        // Nothing due for a while (a retry tier's batch waits for its time, up to four hours):
        // the log need not fetch ahead meanwhile (see `PartitionReader::hold`).
        let later = self.waiting.front().is_some_and(|r| self.due(r) - now > HOLD_AFTER.as_millis() as i64);
        if let (Some(reader), true) = (self.idle.as_mut(), later) {
            reader.hold();
        }
        if self.reading.is_none() && self.waiting.is_empty() && self.has_room() {
            let room = self.room().min(self.limits.batch);
            let mut reader = self.idle.take().expect("reader is idle when no read is pending");
            self.reading = Some(
                async move {
                    let batch = reader.next_batch(room).await;
                    (reader, batch)
                }
                .boxed(),
            );
        }
    }

    /// When the head of the waiting records is due, if the window has room to start it; or,
    /// with young deliveries filling it, when the oldest of them ages (a completion or a read
    /// wakes the shard otherwise), so that it can start or read more.
    fn wake_at(&self) -> Option<Instant> {
        if !self.has_room() {
            return self.window.next_aging();
        }
        let head = self.waiting.front()?;
        Some(Instant::now() + Duration::from_millis((self.due(head) - now_ms()).max(0) as u64))
    }

    /// Past half of `max_uncommitted` offsets held, ends the aged attempts holding the commit
    /// point back (see [`Cut`]), so that the partition goes on before it stops at the limit.
    fn cut_hanging(&mut self, partition: u32) {
        let Some(below) = self.window.cut_below(self.limits.max_uncommitted / 2) else {
            return;
        };
        if below > *self.cut_below.borrow() {
            tracing::warn!(
                partition,
                below,
                held = self.window.held(),
                "ending attempts in flight that hold back the commit point; they are sent again later"
            );
            self.cut_below.send_replace(below);
        }
    }

    fn finished(&mut self, offset: u64) {
        if let Some(next) = self.window.finish(offset) {
            self.committer.commit(next);
        }
    }

    /// Takes a finished read; `false` when the log closed.
    async fn read(
        &mut self,
        reader: Box<dyn PartitionReader>,
        batch: Result<Vec<LogRecord>, LogError>,
        partition: u32,
    ) -> bool {
        self.reading = None;
        self.idle = Some(reader);
        match batch {
            Ok(records) => {
                let now = now_ms();
                self.waiting_bytes += records.iter().map(|r| r.value.len()).sum::<usize>();
                self.waiting.extend(records.into_iter().map(|mut rec| {
                    rec.timestamp_ms = arrived(rec.timestamp_ms, now);
                    rec
                }));
            }
            Err(LogError::Closed) => return false,
            Err(e) => {
                tracing::error!(partition, error = %e, "reading the log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        true
    }

    /// Finishes what is in flight (bounded), and commits what finished. Records still
    /// waiting were never started: they are read again after a restart.
    async fn drain(&mut self, partition: u32) {
        let drained = tokio::time::timeout(self.limits.drain, async {
            while let Some(offset) = self.in_flight.next().await {
                self.finished(offset);
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                partition,
                abandoned = self.window.in_flight(),
                "stopped with deliveries in flight; they will be redelivered"
            );
        }
        self.deliverer.history_synced().await;
    }
}

/// A record's append time as its shard counts it: never later than when it was read. A record
/// stamped in the future (another process's clock ahead, or this one's stepped back) would
/// otherwise hold its tier, and every record behind it, for the size of the step; capping
/// against the time of each look instead never makes it due. The delivery's own due time still
/// keeps every attempt from being early.
fn arrived(appended_ms: i64, read_ms: i64) -> i64 {
    appended_ms.min(read_ms)
}

/// How far off the next record of a shard must be due for its reader to hold (see
/// [`Shard::start_due`]): far enough that holding and reading again (a seek) are rare next to
/// the wait; the fresh deliveries topic never waits so long.
const HOLD_AFTER: Duration = Duration::from_secs(5);

fn due(arrived_ms: i64, delay: Duration) -> i64 {
    arrived_ms.saturating_add(delay.as_millis() as i64)
}

/// Processes `rec`, once more if that panics, and parks it in the dead-letter topic if it
/// panics again; resolves to its offset once it is settled.
fn supervised(deliverer: Arc<Deliverer>, rec: LogRecord, shares: Arc<Shares>, cut: Cut) -> BoxFuture<'static, u64> {
    supervise(deliverer, rec, shares, cut).boxed()
}

/// [`supervised`]'s future, unboxed, so that its size can be measured
/// (`a_deliverys_future_stays_small`).
async fn supervise(deliverer: Arc<Deliverer>, rec: LogRecord, shares: Arc<Shares>, mut cut: Cut) -> u64 {
    // Not `if let`: its scrutinee, a whole `Settled`, would be held across the park's await.
    let Err(last) = deliverer.process_supervised(&rec, super::Waits::InTiers, &shares, &mut cut).await else {
        return rec.offset;
    };
    Box::pin(deliverer.park_panicked(&rec, last, super::Waits::InTiers)).await;
    rec.offset
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Holds the size `Deliverer::deliver` explains (3,768 bytes before its cold paths were
    /// boxed): an await of something large on an attempt's path shows here.
    #[test]
    fn a_deliverys_future_stays_small() {
        fn size<F: FnOnce(Arc<Deliverer>, LogRecord, Arc<Shares>, Cut) -> Fut, Fut>(_: F) -> usize {
            std::mem::size_of::<Fut>()
        }
        let bytes = size(supervise);
        // 3,200 before a tenant's bytes in flight were bounded (their guard, and the gate's
        // look at them, 32 bytes); 3,232 before a delivery said whether its data is as sent
        // (a flag, 8 bytes with the record's alignment).
        assert!(bytes <= 3240, "a delivery's future is {bytes} bytes (2,904 when this was written)");
    }

    /// The shard looks at its head again and again as time goes by: a record stamped in the
    /// future (another process's clock ahead, or this one's stepped back) must still come due
    /// the tier's delay after it was read, or it holds every record behind it.
    #[test]
    fn a_record_stamped_in_the_future_is_due_the_delay_after_it_was_read() {
        let delay = Duration::from_secs(30);
        let mut now = 0;
        let stamp = arrived(3_600_000, 0);
        while due(stamp, delay) > now && now < 4_000_000 {
            now += 1_000;
        }
        assert_eq!(now, 30_000, "the head started at {now} ms");
    }

    #[test]
    fn a_clock_stepped_back_does_not_hold_a_tier() {
        let delay = Duration::from_secs(30);
        // Appended a minute "in the future" (the clock then stepped back an hour's worth).
        assert_eq!(due(arrived(3_600_000, 0), delay), 30_000);
        assert_eq!(due(arrived(1_000, 5_000), delay), 31_000);
    }
}
