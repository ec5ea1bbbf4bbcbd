//! A shard works one partition: read a batch, start each record once it is due (at once for
//! fresh deliveries; at append time plus the tier's delay for a retry tier, so a tier
//! shard sleeps until its head is due), let deliveries finish in any order, and commit the
//! contiguous prefix of finished offsets. A read is never cancelled to make room for a
//! completion, and a completion never waits for a read.

use super::Deliverer;
use crate::log::{Committer, LogError, LogRecord, PartitionReader};
use crate::model::now_ms;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

type Read = Pin<Box<dyn Future<Output = (Box<dyn PartitionReader>, Result<Vec<LogRecord>, LogError>)> + Send>>;

/// Limits of one shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardLimits {
    /// Deliveries in flight at most.
    pub window: usize,
    /// Offsets held back from the commit point at most (in flight, or finished behind a
    /// slower one); reached only when one delivery is slower than this many others.
    pub max_uncommitted: usize,
    /// Records read at a time at most.
    pub batch: usize,
    /// On stop, how long in-flight deliveries may take to finish.
    pub drain: Duration,
}

fn read(mut reader: Box<dyn PartitionReader>, max: usize) -> Read {
    Box::pin(async move {
        let batch = reader.next_batch(max).await;
        (reader, batch)
    })
}

/// When a record may start: its append time plus the topic's delay.
fn due(rec: &LogRecord, delay: Duration) -> i64 {
    rec.timestamp_ms + delay.as_millis() as i64
}

/// Runs one partition until `stop` turns true, then drains within `limits.drain`.
pub async fn run(
    reader: Box<dyn PartitionReader>,
    deliverer: Arc<Deliverer>,
    delay: Duration,
    limits: ShardLimits,
    stats: Arc<crate::metrics::ShardStats>,
    mut stop: watch::Receiver<bool>,
) {
    let partition = reader.partition();
    let committer: Arc<dyn Committer> = reader.committer();
    let mut window = super::window::Window::default();
    let mut in_flight = FuturesUnordered::new();
    let mut waiting: VecDeque<LogRecord> = VecDeque::new();
    let mut idle = Some(reader);
    let mut reading: Option<Read> = None;
    loop {
        // Start what is due while the window has room.
        let now = now_ms();
        let has_room = |w: &super::window::Window| w.in_flight() < limits.window && w.held() < limits.max_uncommitted;
        while has_room(&window) && waiting.front().is_some_and(|r| due(r, delay) <= now) {
            let rec = waiting.pop_front().expect("checked");
            let offset = rec.offset;
            window.start(offset);
            let d = deliverer.clone();
            in_flight.push(
                async move {
                    d.process(rec).await;
                    offset
                }
                .boxed(),
            );
        }
        stats.set_in_flight(window.in_flight());
        let room = has_room(&window);
        // Read only when nothing is waiting, so memory stays bounded by one batch.
        if reading.is_none() && waiting.is_empty() && room {
            let max =
                (limits.window - window.in_flight()).min(limits.max_uncommitted - window.held()).min(limits.batch);
            reading = Some(read(idle.take().expect("reader is idle when no read is pending"), max));
        }
        let wake = waiting
            .front()
            .filter(|_| room)
            .map(|r| Instant::now() + Duration::from_millis((due(r, delay) - now_ms()).max(0) as u64));
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => break,
            Some(offset) = in_flight.next(), if !in_flight.is_empty() => {
                if let Some(next) = window.finish(offset) {
                    committer.commit(next);
                }
            }
            (reader, batch) = async { reading.as_mut().expect("guarded").await }, if reading.is_some() => {
                reading = None;
                idle = Some(reader);
                match batch {
                    Ok(records) => waiting.extend(records),
                    Err(LogError::Closed) => break,
                    Err(e) => {
                        tracing::error!(partition, error = %e, "reading the log failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            _ = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {}
        }
    }
    // Finish what is in flight (bounded), and commit what finished. Records still waiting
    // were never started: they are read again after a restart.
    let drained = tokio::time::timeout(limits.drain, async {
        while let Some(offset) = in_flight.next().await {
            if let Some(next) = window.finish(offset) {
                committer.commit(next);
            }
        }
    })
    .await;
    stats.set_in_flight(0);
    if drained.is_err() {
        tracing::warn!(
            partition,
            abandoned = window.in_flight(),
            "stopped with deliveries in flight; they will be redelivered"
        );
    }
}
