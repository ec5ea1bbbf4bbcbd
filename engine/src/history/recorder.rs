//! Appends history records to the history topic. Attempts are gathered from every delivery in
//! flight into one append (the log's group commit makes that one write), and each delivery
//! waits for its record to be durable before its offset may be committed: after a crash no
//! settled attempt is missing. The wait has a budget: if the log cannot take history records
//! in time, delivery goes on (`herald_history_late_total`) and the record is still written
//! when it can be.

use super::record::HistoryRecord;
use crate::log::{Log, LogError, Record};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// The longest a delivery waits for its history record.
const BUDGET: Duration = Duration::from_secs(2);
/// Records gathered into one append at most.
const BATCH: usize = 4096;
/// Appends in flight at once (later batches do not wait for an earlier slow one).
const APPENDS: usize = 4;
/// Records waiting to be appended at most; beyond, new ones are not waited for.
const QUEUE: usize = 1 << 16;

struct Pending {
    record: Record,
    done: oneshot::Sender<()>,
}

/// Writes history records.
pub struct Recorder {
    log: Arc<dyn Log>,
    topic: String,
    queue: mpsc::Sender<Pending>,
}

impl Recorder {
    /// A recorder appending to `topic`, with its writer running.
    pub fn start(log: Arc<dyn Log>, topic: String) -> Arc<Recorder> {
        let (queue, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(log.clone(), topic.clone(), rx));
        Arc::new(Recorder { log, topic, queue })
    }

    fn record_of(rec: &HistoryRecord) -> Record {
        Record { key: bytes::Bytes::copy_from_slice(rec.key().as_bytes()), value: rec.encode() }
    }

    /// Records `rec` and waits until it is durable, or for the budget at most.
    pub async fn record(&self, rec: &HistoryRecord) {
        let (done, durable) = oneshot::channel();
        if self.queue.try_send(Pending { record: Self::record_of(rec), done }).is_err() {
            metrics::counter!(crate::metrics::HISTORY_LATE).increment(1);
            return;
        }
        if tokio::time::timeout(BUDGET, durable).await.is_err() {
            metrics::counter!(crate::metrics::HISTORY_LATE).increment(1);
        }
    }

    /// Appends `records` now (accepted events: the request waits for them like for its
    /// deliveries).
    pub async fn append(&self, records: &[HistoryRecord]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        self.log.append(&self.topic, records.iter().map(Self::record_of).collect()).await.map(|_| ())
    }
}

/// The writer: takes whatever is queued, appends it in one go (retrying a failed append until
/// the log takes it), then tells each waiting delivery.
async fn write(log: Arc<dyn Log>, topic: String, mut rx: mpsc::Receiver<Pending>) {
    let slots = Arc::new(Semaphore::new(APPENDS));
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (log, topic) = (log.clone(), topic.clone());
        tokio::spawn(async move {
            let records: Vec<Record> = batch.iter().map(|p| p.record.clone()).collect();
            let mut backoff = Duration::from_millis(50);
            loop {
                match log.append(&topic, records.clone()).await {
                    Ok(_) => break,
                    Err(LogError::Closed) => return,
                    Err(e @ LogError::TooLarge { .. }) => {
                        tracing::error!(error = %e, "history records too large for the log; dropped");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, records = records.len(), "history append failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            for p in batch {
                let _ = p.done.send(());
            }
            drop(slot);
        });
    }
}
