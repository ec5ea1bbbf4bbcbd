//! The dispatcher: consumes the `deliveries` topic and every retry tier, one shard per owned
//! partition, and makes each delivery: look up the subscription, take a slot under its
//! in-flight cap, sign, send, then settle (done, rescheduled or dead-lettered, durably)
//! before the offset may be committed.

mod shard;
mod window;

pub use shard::ShardLimits;

use crate::log::{Assignment, Log, LogError, LogRecord};
use crate::metrics::{self as m, Metrics};
use crate::model::{now_ms, Delivery, TransportKind};
use crate::registry::{Registry, Target};
use crate::retry::{tiers, verdict, LastAttempt, Retrier, Verdict};
use crate::transport::{Outcome, Transports};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
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
        let Some(target) = self.registry.get_current(&delivery.subscription).await else {
            // Deleted since the event was accepted: the customer no longer wants it.
            tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, "subscription gone; delivery dropped");
            metrics::counter!(m::DELIVERIES, "transport" => "webhook", "outcome" => "dropped").increment(1);
            return;
        };
        let transport = transport_label(target.sub.transport);
        let wait = delivery.due_ms - now_ms();
        if wait >= tiers::SLACK.as_millis() as i64 {
            // Not due yet: hop to the tier that fits the rest of the wait.
            self.retrier.schedule(&delivery).await;
            return;
        }
        if wait > 0 {
            // Less than the shortest tier: wait here, so no attempt is ever early.
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        if !target.sub.enabled {
            let reason = target.sub.disabled_reason.as_deref().unwrap_or("disabled");
            let last = LastAttempt { status: None, error: format!("subscription is disabled: {reason}") };
            self.retrier.dead_letter(&delivery, raw, last).await;
            metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "dead_lettered").increment(1);
            return;
        }
        let (_slot, probe) = match target.endpoint.admit().await {
            Ok(admitted) => admitted,
            Err(busy) => {
                // Not now (cap, rate limit or open breaker): wait in a tier without using an
                // attempt, rather than hold this partition's window.
                let later = Delivery { due_ms: now_ms() + busy.defer().as_millis() as i64, ..delivery };
                self.retrier.schedule(&later).await;
                metrics::counter!(m::DEFERRED, "reason" => busy.reason()).increment(1);
                return;
            }
        };
        let pending = self.retrier.pending_retries(&target, &delivery);
        let outcome = self.transports.deliver(&target, &delivery, pending).await;
        target.endpoint.observe(outcome.latency());
        metrics::histogram!(m::REQUEST_SECONDS, "transport" => transport).record(outcome.latency().as_secs_f64());
        match (verdict(&outcome), outcome) {
            (Verdict::Delivered, Outcome::Delivered { status, .. }) => {
                target.endpoint.succeeded(probe);
                metrics::counter!(m::ATTEMPTS, "transport" => transport, "outcome" => m::attempt_outcome(Some(status), "")).increment(1);
                metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "delivered").increment(1);
                let age = (now_ms() - delivery.accepted_ms).max(0) as f64 / 1000.0;
                metrics::histogram!(m::END_TO_END_SECONDS, "transport" => transport).record(age);
            }
            (v, Outcome::Failed { status, error, .. }) => {
                self.judge_health(&target, probe).await;
                metrics::counter!(m::ATTEMPTS, "transport" => transport, "outcome" => m::attempt_outcome(status, &error)).increment(1);
                tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, attempt = delivery.attempt, ?status, %error, "delivery failed");
                if self.retrier.after_failure(&target, &delivery, raw, LastAttempt { status, error }, v).await {
                    metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "dead_lettered")
                        .increment(1);
                }
            }
            (_, Outcome::Delivered { .. }) => unreachable!("a 2xx is always delivered"),
        }
    }
}

impl Deliverer {
    /// Counts a failed attempt against the endpoint's health: opens its breaker, or disables
    /// the subscription once it has failed continuously for too long.
    async fn judge_health(&self, target: &Target, probe: bool) {
        let health = target.endpoint.failed(probe);
        if let Some(pause) = health.opened {
            tracing::warn!(subscription = %target.sub.id, pause = %humantime::format_duration(pause), "circuit breaker opened");
        }
        if health.give_up {
            let reason =
                format!("failing continuously; disabled automatically at {}", crate::model::rfc3339_ms(now_ms()));
            if let Err(e) = self.registry.disable(&target.sub.id, reason).await {
                tracing::error!(subscription = %target.sub.id, error = %e, "could not disable a failing subscription");
            }
        }
    }
}

fn transport_label(kind: TransportKind) -> &'static str {
    match kind {
        TransportKind::Webhook => "webhook",
        TransportKind::Amqp => "amqp",
    }
}

/// A topic the dispatcher consumes, and how long its records wait before they start.
#[derive(Debug, Clone)]
pub struct Source {
    /// Topic name.
    pub topic: String,
    /// Short name for metrics (`deliveries`, `retry.30s`).
    pub label: String,
    /// Fixed delay of the topic (zero for fresh deliveries).
    pub delay: Duration,
}

/// Runs shards for the partitions this process owns, for every source topic.
pub struct Dispatcher {
    log: Arc<dyn Log>,
    sources: Vec<Source>,
    group: String,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    /// A dispatcher for `sources` in consumer group `group`.
    pub fn new(
        log: Arc<dyn Log>,
        sources: Vec<Source>,
        group: String,
        deliverer: Arc<Deliverer>,
        limits: ShardLimits,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dispatcher { log, sources, group, deliverer, limits, metrics }
    }

    /// Joins the consumer group on every source and runs until `stop` turns true.
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<(), LogError> {
        let mut loops = Vec::new();
        for source in &self.sources {
            let consumer = self.log.consume(&self.group, &source.topic).await?;
            let (deliverer, metrics) = (self.deliverer.clone(), self.metrics.clone());
            let run = run_source(consumer, source.clone(), deliverer, self.limits, metrics, stop.clone());
            loops.push(tokio::spawn(run));
        }
        for l in loops {
            let _ = l.await;
        }
        Ok(())
    }
}

async fn run_source(
    mut consumer: Box<dyn crate::log::Consumer>,
    source: Source,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let mut shards: HashMap<u32, (watch::Sender<bool>, JoinHandle<()>)> = HashMap::new();
    loop {
        tokio::select! {
            _ = crate::shutdown::stopped(&mut stop) => break,
            change = consumer.next_assignment() => match change {
                Some(Assignment::Assigned(reader)) => {
                    let partition = reader.partition();
                    let (tx, rx) = watch::channel(false);
                    let stats = metrics.shard(&source.label, partition, reader.committer());
                    let task = tokio::spawn(shard::run(reader, deliverer.clone(), source.delay, limits, stats, rx));
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
}
