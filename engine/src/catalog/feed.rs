//! The registry topic as a feed: every process follows it and applies each record in log
//! order, its own writes included, so all processes hold the same subscriptions, tenants and
//! devices and settle a race (two creates of one URL) the same way. A write returns once this
//! process has applied it: read your writes.

use super::CatalogError;
use crate::log::{Log, LogError, LogRecord, Position, Record};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How long a write may take to come back through the feed.
const SEEN_WITHIN: Duration = Duration::from_secs(15);

/// Writes to the registry topic and waits until they have been applied.
pub struct Feed {
    log: Arc<dyn Log>,
    topic: String,
    /// Offset of the next record to apply.
    applied: watch::Receiver<u64>,
}

/// Advances a [`Feed`]: owned by the task that applies records.
pub struct Applied(watch::Sender<u64>);

impl Applied {
    /// Every record below `next` has been applied.
    pub fn set(&self, next: u64) {
        self.0.send_if_modified(|n| {
            let moved = next > *n;
            *n = (*n).max(next);
            moved
        });
    }
}

impl Feed {
    /// A feed on `topic` whose records below `next` are already applied.
    pub fn new(log: Arc<dyn Log>, topic: String, next: u64) -> (Feed, Applied) {
        let (tx, rx) = watch::channel(next);
        (Feed { log, topic, applied: rx }, Applied(tx))
    }

    /// Appends one record and waits until the follower applied it; returns where it landed.
    pub async fn write(&self, key: &[u8], value: Bytes) -> Result<Position, CatalogError> {
        let rec = Record { key: Bytes::copy_from_slice(key), value };
        let pos = self.log.append(&self.topic, vec![rec]).await?.pop().ok_or(LogError::Closed)?;
        self.applied_up_to(pos.offset + 1).await?;
        Ok(pos)
    }

    /// Waits until every record now in the registry topic has been applied here.
    pub async fn catch_up(&self) -> Result<(), CatalogError> {
        let end = self.log.end_offset(&self.topic, 0).await?;
        self.applied_up_to(end).await
    }

    /// Waits (bounded) until every record below `next` has been applied here.
    async fn applied_up_to(&self, next: u64) -> Result<(), CatalogError> {
        let mut applied = self.applied.clone();
        let seen = tokio::time::timeout(SEEN_WITHIN, applied.wait_for(|n| *n >= next)).await.map(|r| r.is_ok());
        match seen {
            Ok(true) => Ok(()),
            Ok(false) => Err(LogError::Closed.into()),
            Err(_) => Err(CatalogError::NotReadBack { offset: next, within: SEEN_WITHIN }),
        }
    }
}

/// The next offset after `records` (the registry topic has one partition).
pub fn next_offset(records: &[LogRecord]) -> u64 {
    records.iter().map(|r| r.offset + 1).max().unwrap_or(0)
}

/// Follows the registry topic from `from`, handing each record to `router`, until the log
/// closes or `stop` turns true.
pub async fn follow(
    log: Arc<dyn Log>,
    topic: String,
    from: u64,
    applied: Applied,
    router: super::Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut reader = loop {
        match log.follow(&topic, 0, from).await {
            Ok(r) => break r,
            Err(LogError::Closed) => return,
            Err(e) => tracing::error!(error = %e, "cannot follow the registry topic yet; retrying"),
        }
        if !crate::shutdown::sleep(Duration::from_secs(1), &mut stop).await {
            return;
        }
    };
    loop {
        let batch = tokio::select! {
            b = reader.next_batch(512) => b,
            _ = crate::shutdown::stopped(&mut stop) => return,
        };
        match batch {
            Ok(records) => {
                for rec in &records {
                    router.apply(rec);
                }
                if let Some(last) = records.last() {
                    applied.set(last.offset + 1);
                }
            }
            Err(LogError::Closed) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading the registry topic failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
