//! The dispatcher: consumes the `deliveries` topic, one shard per owned partition, and makes
//! each delivery: look up the subscription, sign, send, then settle (done, or handed to the
//! retry path) before the offset may be committed.

mod shard;
mod window;

pub use shard::ShardLimits;

use crate::log::{Assignment, Log, LogError, LogRecord};
use crate::model::Delivery;
use crate::registry::Registry;
use crate::retry::{LastAttempt, Retrier};
use crate::transport::{Outcome, Transports};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Makes one delivery from its log record to its settlement.
pub struct Deliverer {
    registry: Arc<Registry>,
    transports: Transports,
    retrier: Retrier,
}

impl Deliverer {
    /// Wires the stages together.
    pub fn new(registry: Arc<Registry>, transports: Transports, retrier: Retrier) -> Self {
        Deliverer { registry, transports, retrier }
    }

    /// Processes one record; returns only when it is settled, so its offset may be committed.
    pub async fn process(&self, rec: LogRecord) {
        let raw = rec.value.clone();
        let delivery = match Delivery::decode(rec.value.clone()) {
            Ok(d) => d,
            Err(e) => return self.retrier.park_malformed(&rec, e.to_string()).await,
        };
        let Some(target) = self.registry.get(&delivery.subscription) else {
            // Deleted since the event was accepted: the customer no longer wants it.
            tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, "subscription gone; delivery dropped");
            return;
        };
        if !target.sub.enabled {
            let last = LastAttempt { status: None, error: "subscription is disabled".into() };
            return self.retrier.after_failure(&delivery, raw, last).await;
        }
        let pending = self.retrier.pending_retries(&delivery);
        match self.transports.deliver(&target, &delivery, pending).await {
            Outcome::Delivered { .. } => {}
            Outcome::Failed { status, error, .. } => {
                tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, ?status, %error, "delivery failed");
                self.retrier.after_failure(&delivery, raw, LastAttempt { status, error }).await;
            }
        }
    }
}

/// Runs shards for the partitions this process owns.
pub struct Dispatcher {
    log: Arc<dyn Log>,
    topic: String,
    group: String,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
}

impl Dispatcher {
    /// A dispatcher for `topic` in consumer group `group`.
    pub fn new(
        log: Arc<dyn Log>,
        topic: String,
        group: String,
        deliverer: Arc<Deliverer>,
        limits: ShardLimits,
    ) -> Self {
        Dispatcher { log, topic, group, deliverer, limits }
    }

    /// Joins the consumer group and runs until `stop` turns true; then stops every shard.
    pub async fn run(self, mut stop: watch::Receiver<bool>) -> Result<(), LogError> {
        let mut consumer = self.log.consume(&self.group, &self.topic).await?;
        let mut shards: HashMap<u32, (watch::Sender<bool>, JoinHandle<()>)> = HashMap::new();
        loop {
            tokio::select! {
                _ = crate::shutdown::stopped(&mut stop) => break,
                change = consumer.next_assignment() => match change {
                    Some(Assignment::Assigned(reader)) => {
                        let partition = reader.partition();
                        let (tx, rx) = watch::channel(false);
                        let task = tokio::spawn(shard::run(reader, self.deliverer.clone(), self.limits, rx));
                        shards.insert(partition, (tx, task));
                    }
                    Some(Assignment::Revoked(partition)) => {
                        if let Some((tx, task)) = shards.remove(&partition) {
                            tx.send_replace(true);
                            let _ = task.await;
                        }
                    }
                    None => break,
                },
            }
        }
        for (tx, _) in shards.values() {
            tx.send_replace(true);
        }
        for (_, (_, task)) in shards {
            let _ = task.await;
        }
        Ok(())
    }
}
