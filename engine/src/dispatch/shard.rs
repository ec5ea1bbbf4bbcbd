//! A shard works one partition: read a batch, start each delivery, let them finish in any
//! order, and commit the contiguous prefix of finished offsets. A read is never cancelled
//! to make room for a completion, and a completion never waits for a read.

use super::Deliverer;
use crate::log::{Committer, LogError, LogRecord, PartitionReader};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

type Read = Pin<Box<dyn Future<Output = (Box<dyn PartitionReader>, Result<Vec<LogRecord>, LogError>)> + Send>>;

/// Limits of one shard.
#[derive(Debug, Clone, Copy)]
pub struct ShardLimits {
    /// Deliveries in flight at most.
    pub window: usize,
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

/// Runs one partition until `stop` turns true, then drains within `limits.drain`.
pub async fn run(
    reader: Box<dyn PartitionReader>,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
    mut stop: watch::Receiver<bool>,
) {
    let partition = reader.partition();
    let committer: Arc<dyn Committer> = reader.committer();
    let mut window = super::window::Window::default();
    let mut in_flight = FuturesUnordered::new();
    let mut idle = Some(reader);
    let mut reading: Option<Read> = None;
    loop {
        if reading.is_none() && window.held() < limits.window {
            let room = (limits.window - window.held()).min(limits.batch);
            reading = Some(read(idle.take().expect("reader is idle when no read is pending"), room));
        }
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
                    Ok(records) => {
                        for rec in records {
                            window.start(rec.offset);
                            let d = deliverer.clone();
                            in_flight.push(async move { let offset = rec.offset; d.process(rec).await; offset }.boxed());
                        }
                    }
                    Err(LogError::Closed) => break,
                    Err(e) => {
                        tracing::error!(partition, error = %e, "reading the log failed; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
    // Finish what is in flight (bounded), and commit what finished.
    let drained = tokio::time::timeout(limits.drain, async {
        while let Some(offset) = in_flight.next().await {
            if let Some(next) = window.finish(offset) {
                committer.commit(next);
            }
        }
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            partition,
            abandoned = window.in_flight(),
            "stopped with deliveries in flight; they will be redelivered"
        );
    }
}
