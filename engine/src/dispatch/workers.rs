//! The workers of one source topic's partitions: a shard (or, on the `ordered` topic, a
//! sequencer) started for each partition assigned and stopped when it is revoked.
//!
//! Supervised: deliveries are supervised inside the shard, but the loop around them (reads,
//! the in-flight window, commits) could still panic on a bug, and its task would end with
//! the partition silently unworked until the process restarted. Instead the partition is
//! read again from its committed offset by a new worker, after a pause that doubles with
//! each panic in a row (1 s up to 30 s), so a worker that panics at once every time costs a
//! log line, not a core. What the dead worker had started past the commit point is delivered
//! again, as after a crash.

use super::{ordered, shard, Deliverer, OrderedKeys, ShardLimits, Source};
use crate::log::{Assignment, Consumer, Log, LogError, PartitionReader};
use crate::metrics::Metrics;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The first pause before a worker that panicked is started again.
const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause.
const LONGEST_PAUSE: Duration = Duration::from_secs(30);
/// A worker that ran this long before it panicked starts the count of panics in a row anew.
const CALM: Duration = Duration::from_secs(60);

/// What a source's partitions are worked with.
pub(super) struct Work {
    pub log: Arc<dyn Log>,
    pub deliverer: Arc<Deliverer>,
    pub limits: ShardLimits,
    pub metrics: Arc<Metrics>,
    pub keys: Arc<OrderedKeys>,
}

/// A partition's worker that panicked, once its pause is over.
struct Died {
    partition: u32,
    /// Which worker of the partition (a revoked and reassigned partition has a new one).
    id: u64,
    /// Panics of the partition's workers in a row, this one included.
    in_a_row: u32,
    /// The dead worker's gauges, kept until the next worker's replace them: dropped with the
    /// worker, they read 0 — lag and stall alike — through every pause and every failed
    /// reopen, so a partition stuck restarting read as healthy and its stall alert reset.
    stats: Option<Arc<crate::metrics::ShardStats>>,
}

/// One partition's running worker.
struct Worker {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    id: u64,
}

/// The running workers of one source.
struct Workers {
    source: Source,
    work: Work,
    running: HashMap<u32, Worker>,
    next_id: u64,
    died: mpsc::UnboundedSender<Died>,
}

impl Workers {
    /// Starts the worker of `reader`'s partition; `in_a_row` panics of its predecessors.
    fn start(&mut self, reader: Box<dyn PartitionReader>, in_a_row: u32) {
        let partition = reader.partition();
        let (stop, rx) = watch::channel(false);
        let Work { log, deliverer, limits, metrics, keys } = &self.work;
        let stats = metrics.shard(&self.source.label, partition, reader.committer());
        let kept = stats.clone();
        let worker: BoxFuture<'static, ()> = if self.source.ordered {
            let (topic, log, keys, deliverer) =
                (self.source.topic.clone(), log.clone(), keys.clone(), deliverer.clone());
            ordered::run(reader, topic, log, deliverer, *limits, keys, stats, rx.clone()).boxed()
        } else {
            shard::run(reader, deliverer.clone(), self.source.delay, *limits, stats, rx.clone()).boxed()
        };
        self.next_id += 1;
        let died = Died { partition, id: self.next_id, in_a_row, stats: Some(kept) };
        let task = tokio::spawn(watched(worker, self.source.label.clone(), died, rx, self.died.clone()));
        self.running.insert(partition, Worker { stop, task, id: self.next_id });
    }

    /// Tries `died`'s partition again after another pause (its reader could not be reopened).
    fn retry(&mut self, died: Died) {
        let (stop, rx) = watch::channel(false);
        self.next_id += 1;
        let died = Died { partition: died.partition, id: self.next_id, in_a_row: died.in_a_row + 1, stats: died.stats };
        let partition = died.partition;
        let task = tokio::spawn(report_after_pause(died, rx, self.died.clone()));
        self.running.insert(partition, Worker { stop, task, id: self.next_id });
    }

    /// Whether `died` is about the partition's current worker (not one revoked since).
    fn is_current(&self, died: &Died) -> bool {
        self.running.get(&died.partition).is_some_and(|w| w.id == died.id)
    }

    /// Tells the partition's worker to stop; its task, to wait for.
    fn stop(&mut self, partition: u32) -> Option<JoinHandle<()>> {
        let worker = self.running.remove(&partition)?;
        worker.stop.send_replace(true);
        Some(worker.task)
    }
}

/// Starts a worker for each partition assigned, stops it when its partition is revoked, and
/// starts a new one from the committed offset when one panics.
pub(super) async fn run_source(
    mut consumer: Box<dyn Consumer>,
    source: Source,
    work: Work,
    mut stop: watch::Receiver<bool>,
) {
    let (died_tx, mut died) = mpsc::unbounded_channel();
    let mut workers = Workers { source, work, running: HashMap::new(), next_id: 0, died: died_tx };
    // Revoked workers drain side by side, each within the whole drain budget; the group waits
    // for their readers to drop, not for this loop.
    let mut draining = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => break,
            Some(_) = draining.join_next(), if !draining.is_empty() => {}
            Some(dead) = died.recv() => {
                if !workers.is_current(&dead) {
                    continue;
                }
                match consumer.reopen(dead.partition).await {
                    // The dead worker's stats go once the next worker's are registered, which
                    // keep the partition's series (`ShardStats`'s drop zeroes only the last).
                    Ok(reader) => workers.start(reader, dead.in_a_row),
                    Err(LogError::Closed) => {}
                    Err(e) => {
                        tracing::error!(source = %workers.source.label, partition = dead.partition, error = %e, "could not read the partition again; trying later");
                        workers.retry(dead);
                    }
                }
            }
            change = consumer.next_assignment() => match change {
                Some(Assignment::Assigned(reader)) => workers.start(reader, 0),
                Some(Assignment::Revoked(partition)) => {
                    if let Some(task) = workers.stop(partition) {
                        draining.spawn(task);
                    }
                }
                None => break,
            },
        }
    }
    let partitions: Vec<u32> = workers.running.keys().copied().collect();
    let tasks: Vec<_> = partitions.into_iter().filter_map(|p| workers.stop(p)).collect();
    for task in tasks {
        let _ = task.await;
    }
    while draining.join_next().await.is_some() {}
}

/// Runs `worker`; if it panics, counts and logs it, then reports `died` after its pause.
async fn watched(
    worker: BoxFuture<'static, ()>,
    source: String,
    mut died: Died,
    stop: watch::Receiver<bool>,
    report: mpsc::UnboundedSender<Died>,
) {
    let started = Instant::now();
    // Kept only for a worker that panics: one that ends otherwise (revoked, stopped) lets
    // its gauges go at once.
    let stats = died.stats.take();
    let Err(panic) = AssertUnwindSafe(worker).catch_unwind().await else { return };
    if let Some(stats) = &stats {
        stats.set_in_flight(0);
        stats.set_waiting_bytes(0);
    }
    died.stats = stats;
    died.in_a_row = if started.elapsed() >= CALM { 1 } else { died.in_a_row + 1 };
    metrics::counter!(crate::metrics::WORKERS_PANICKED).increment(1);
    tracing::error!(
        source,
        partition = died.partition,
        panic = %super::panic_message(panic.as_ref()),
        pause = ?pause(died.in_a_row),
        "a partition's worker panicked; it is read again from its committed offset after a pause"
    );
    report_after_pause(died, stop, report).await;
}

/// Reports `died` once its pause is over, unless the partition is stopped first.
async fn report_after_pause(died: Died, mut stop: watch::Receiver<bool>, report: mpsc::UnboundedSender<Died>) {
    tokio::select! {
        _ = crate::shutdown::stopped(&mut stop) => {}
        _ = tokio::time::sleep(pause(died.in_a_row)) => { let _ = report.send(died); }
    }
}

/// The pause after `in_a_row` panics: doubling from [`FIRST_PAUSE`] to [`LONGEST_PAUSE`].
fn pause(in_a_row: u32) -> Duration {
    FIRST_PAUSE.saturating_mul(1 << in_a_row.saturating_sub(1).min(5)).min(LONGEST_PAUSE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pause_doubles_up_to_half_a_minute() {
        let pauses: Vec<u64> = (1..=8).map(|n| pause(n).as_secs()).collect();
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
    }
}
