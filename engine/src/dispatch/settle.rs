//! Settling: the one place where what happened to a delivery is decided and made durable —
//! delivered, rescheduled into a tier, deferred without using an attempt, dead-lettered, or
//! dropped — and returned as one [`Settled`] value. Metrics are recorded from it once
//! ([`record`]), and anything else that observes deliveries (the history) observes it there.

use crate::admission::{Busy, Probe};
use crate::history::{AttemptRecord, HistoryRecord, State, StateRecord};
use crate::log::LogRecord;
use crate::metrics as m;
use crate::model::{new_id, now_ms, rfc3339_ms, Delivery, Failure, Outcome, TransportKind};
use crate::registry::Registry;
use crate::retry::{self, tiers, Retrier, Verdict};
use crate::target::Target;
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;

/// What became of one delivery record.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The receiver took it.
    Delivered,
    /// The attempt failed; attempt `attempt` is due at `due_ms`, waiting in `tier`.
    Rescheduled {
        /// The next attempt's number.
        attempt: u32,
        /// When it is due, ms since the epoch.
        due_ms: i64,
        /// The tier it waits in; `None` for the head of an ordered key, which waits with its
        /// key's sequencer.
        tier: Option<Duration>,
    },
    /// Not attempted now, and no attempt used: it waits in a tier until `due_ms`.
    Deferred {
        /// Why it was not attempted (a metric label, unless it is a routine hop).
        reason: Deferral,
        /// When it is looked at again, ms since the epoch.
        due_ms: i64,
    },
    /// Parked in the dead-letter topic.
    DeadLettered {
        /// Why it was parked (the dead letter's `last_error` says it in words).
        reason: Parked,
    },
    /// Its subscription was deleted: nobody wants it any more.
    Dropped,
    /// A retry not made: another generation of the delivery (a resend, recover or replay)
    /// delivered it meanwhile. Its state is that one's, so none is recorded — unless an
    /// earlier chain's failure overtook that delivery on record (`overtaken`): then its state
    /// is set back to delivered.
    Superseded {
        /// Whether the delivery's newest state on record is not its delivery.
        overtaken: bool,
    },
}

/// Why a delivery was not attempted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// It is not due yet (hopping down the tiers).
    NotDue,
    /// Admission said not now (in-flight cap, a slow endpoint's pace, rate limit, open breaker).
    Busy(Busy),
    /// Its subscription is not known here yet (the catalog could not be read, or its record is
    /// from a newer version): it waits rather than be dropped.
    UnknownSubscription,
    /// It held back its partition's commit point before it was sent (see
    /// `dispatch::window::Cut`): it waits in a tier, its attempt still to make.
    CommitPoint,
}

impl Deferral {
    /// The `reason` label of `herald_deliveries_deferred_total`, if it is counted there (a hop
    /// to a shorter tier is routine, not a deferral).
    pub fn label(self) -> Option<&'static str> {
        match self {
            Deferral::NotDue => None,
            Deferral::Busy(busy) => Some(busy.reason()),
            Deferral::UnknownSubscription => Some("unknown_subscription"),
            Deferral::CommitPoint => Some("commit_point"),
        }
    }
}

/// Why a delivery was dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub enum Parked {
    /// Its retry policy has no attempt left (attempts or `max_age`).
    Exhausted,
    /// The receiver answered 410 Gone (the subscription is disabled too).
    Gone,
    /// Its subscription is disabled.
    Disabled(String),
    /// The record is not a readable delivery.
    Malformed(String),
    /// Processing it panicked twice.
    Panicked(String),
    /// An operator skipped it, the blocked head of an ordered key.
    Skipped(String),
    /// Its retry tier refused its record (too large for the log).
    Unschedulable(String),
}

impl Parked {
    /// A short name for why (a span attribute, the `reason` of `herald_dead_letters_total`;
    /// the dead letter's `last_error` has the words).
    pub fn label(&self) -> &'static str {
        match self {
            Parked::Exhausted => "exhausted",
            Parked::Gone => "gone",
            Parked::Disabled(_) => "disabled",
            Parked::Malformed(_) => "malformed",
            Parked::Panicked(_) => "panicked",
            Parked::Skipped(_) => "skipped",
            Parked::Unschedulable(_) => "unschedulable",
        }
    }
}

/// How a delivery travels, as metrics and the history name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// A signed HTTP POST from Herald.
    Webhook,
    /// An AMQP publish.
    Amqp,
    /// Through the subscription's edge agent.
    Edge,
}

impl Via {
    /// Every way, in the order the API lists them.
    pub const ALL: [Via; 3] = [Via::Webhook, Via::Amqp, Via::Edge];

    /// How `target`'s deliveries travel.
    pub fn of(target: &Target) -> Via {
        match (&target.sub.spec.via_edge, target.sub.spec.transport) {
            (Some(_), _) => Via::Edge,
            (None, TransportKind::Webhook) => Via::Webhook,
            (None, TransportKind::Amqp) => Via::Amqp,
        }
    }

    /// The `transport` label.
    pub fn label(self) -> &'static str {
        match self {
            Via::Webhook => "webhook",
            Via::Amqp => "amqp",
            Via::Edge => "edge",
        }
    }
}

/// One settled delivery: the value metrics and the history observe.
#[derive(Debug, Clone)]
pub struct Settled {
    /// The delivery (`None` for a record that is not one).
    pub delivery: Option<Delivery>,
    /// How it travels (webhook when its subscription is not known).
    pub transport: Via,
    /// The attempt made, if one was.
    pub attempt: Option<Outcome>,
    /// What became of it.
    pub settlement: Settlement,
}

impl Settled {
    fn of(delivery: Delivery, transport: Via, settlement: Settlement) -> Settled {
        Settled { delivery: Some(delivery), transport, attempt: None, settlement }
    }
}

impl Settled {
    /// What the delivery history records of this settlement, made at `now_ms`: an attempt
    /// (with its typed outcome and the delivery's state after it), a failure inside Herald
    /// (a disabled subscription, recorded like an attempt that did not leave), or a state
    /// change; nothing for a deferral (no attempt was used) or a record that is not a delivery.
    /// The receiver's answer moves into the record: nothing reads it after the history, and
    /// copying its headers for every delivery was half the cost of making the record.
    pub fn take_history(&mut self, now_ms: i64) -> Option<HistoryRecord> {
        let d = self.delivery.as_ref()?;
        let (state, next_ms) = match &self.settlement {
            Settlement::Delivered => (State::Delivered, None),
            Settlement::Rescheduled { due_ms, .. } => (State::Retrying, Some(*due_ms)),
            Settlement::DeadLettered { .. } => (State::DeadLettered, None),
            Settlement::Dropped => (State::Dropped, None),
            Settlement::Superseded { overtaken: true } => (State::Delivered, None),
            Settlement::Deferred { .. } | Settlement::Superseded { .. } => return None,
        };
        let response = self.attempt.as_mut().and_then(Outcome::take_response);
        // An attempt is never dated before it was due (below); a settlement without one — a
        // skipped head, a deleted subscription's drop, a record refused by its tier — is dated
        // now, whatever its due time (dated at it, a day ahead, its dead letter outdated the
        // replay that followed).
        let due = if self.attempt.is_some() { d.due_ms } else { i64::MIN };
        let attempt = |outcome: &str, latency: Duration, status, error, response| {
            HistoryRecord::Attempt(AttemptRecord {
                id: new_id("att"),
                event_id: d.event_id.clone(),
                subscription: d.subscription.clone(),
                tenant: d.tenant.clone(),
                event_type: d.event_type.clone(),
                attempt: d.attempt,
                accepted_ms: d.accepted_ms,
                // When it began — but never before it was due, by the clock that scheduled it:
                // a process whose clock runs behind that one's (or one stepped back) dated a
                // retry before the attempt it follows, whose `retrying` then read as the
                // delivery's newest state.
                at_ms: (now_ms - latency.as_millis().min(i64::MAX as u128) as i64).max(due),
                duration_ms: crate::model::whole_millis(latency),
                outcome: outcome.to_string(),
                status,
                error,
                response,
                state,
                next_ms,
                ordering_key: d.ordering_key.clone(),
            })
        };
        match (&self.attempt, &self.settlement) {
            (Some(o), _) => {
                Some(attempt(o.label(), o.latency(), o.status(), o.failure().map(ToString::to_string), response))
            }
            (None, Settlement::DeadLettered { reason: Parked::Disabled(why) }) => Some(attempt(
                crate::model::outcome::DISABLED,
                Duration::ZERO,
                None,
                Some(format!("subscription is disabled: {why}")),
                None,
            )),
            (None, settlement) => Some(HistoryRecord::State(StateRecord {
                event_id: d.event_id.clone(),
                subscription: d.subscription.clone(),
                tenant: d.tenant.clone(),
                accepted_ms: d.accepted_ms,
                at_ms: now_ms,
                state,
                error: match settlement {
                    Settlement::DeadLettered {
                        reason:
                            Parked::Panicked(why)
                            | Parked::Malformed(why)
                            | Parked::Skipped(why)
                            | Parked::Unschedulable(why),
                    } => Some(why.clone()),
                    _ => None,
                },
            })),
        }
    }
}

/// Where a delivery that must wait for a later attempt is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waits {
    /// In the retry tiers, durably, so its record's offset may be committed.
    InTiers,
    /// With its key's sequencer (the head of an ordered key), which records the next attempt
    /// itself: its key's later deliveries must not pass it.
    InLane,
}

/// How long a delivery of a subscription not known here waits before it is looked at again
/// at first (this process may not have read a new subscription yet) ...
const UNKNOWN_WAIT: Duration = Duration::from_secs(5);

/// ... and at most, however long it has stayed unknown (a record a newer version wrote, a
/// secret sealed with a lost key: an operator's to mend).
const UNKNOWN_WAIT_MAX: Duration = Duration::from_secs(600);

/// How long a delivery cut before it was sent (see [`super::Cut`]) waits in a tier at first ...
const CUT_WAIT: Duration = Duration::from_secs(1);

/// ... and at most, however long its partition's commit point stays held back.
const CUT_WAIT_MAX: Duration = Duration::from_secs(60);

/// When a delivery Herald holds back itself (not for its endpoint: no attempt is made) is
/// looked at again: `1/part` of how long its budget has run, between `least` and `most`. Each
/// wait is another append of it into a tier other tenants share, so the longer one stays held,
/// the less often it is appended.
fn due_after_a_growing_wait(delivery: &Delivery, part: i64, least: Duration, most: Duration) -> i64 {
    let now = now_ms();
    now + ((now - delivery.budget_ms) / part).clamp(least.as_millis() as i64, most.as_millis() as i64)
}

/// Makes settlements durable: tiers and dead letters through the retrier, and the
/// subscription changes an outcome implies (disabled after a 410, or after failing too long).
pub struct Settler {
    registry: Arc<Registry>,
    retrier: Retrier,
}

impl Settler {
    /// A settler writing through `retrier`.
    pub fn new(registry: Arc<Registry>, retrier: Retrier) -> Self {
        Settler { registry, retrier }
    }

    /// Settles an attempt's outcome: delivered, rescheduled by the policy, or dead-lettered.
    pub async fn attempted(
        &self,
        target: &Target,
        delivery: Delivery,
        raw: Bytes,
        outcome: Outcome,
        probe: Probe<'_>,
        waits: Waits,
    ) -> Settled {
        // Ended by Herald, not by the receiver (see `dispatch::window::Cut`), or held up
        // behind an edge agent's full window (another subscription's attempts fill it):
        // retried as the policy says (it counts as an attempt, and so repeats stay bounded by
        // `max_attempts` whatever the load), but it says nothing of the endpoint's health or
        // pace — others' load must not open its breaker or disable it.
        let held = outcome.failure().is_some_and(Failure::heralds_own);
        if !held {
            target.admission.observe(outcome.latency());
        }
        let transport = Via::of(target);
        let settlement = match retry::verdict(&outcome) {
            Verdict::Delivered => {
                target.admission.succeeded(probe);
                Settlement::Delivered
            }
            // The failed paths are boxed: their awaits (disabling the subscription, a retry's
            // append, a dead letter) were most of this future's size, which every delivery's
            // future carries (see `Deliverer::deliver`).
            Verdict::Gone => {
                Box::pin(async {
                    self.judge_health(target, probe).await;
                    let reason = format!("the receiver answered 410 Gone at {}", rfc3339_ms(now_ms()));
                    if self.disable(target, reason).await {
                        self.park(&delivery, raw, &outcome, Parked::Gone).await
                    } else {
                        // The subscription left that URL while the attempt was in flight: the
                        // URL is gone, not the subscription, and the delivery goes on as a failure.
                        self.again(target, &delivery, raw, &outcome, None, waits).await
                    }
                })
                .await
            }
            Verdict::Retry { not_before } => {
                Box::pin(async {
                    if held {
                        drop(probe);
                    } else {
                        self.judge_health(target, probe).await;
                    }
                    self.again(target, &delivery, raw, &outcome, not_before, waits).await
                })
                .await
            }
        };
        Settled { delivery: Some(delivery), transport, attempt: Some(outcome), settlement }
    }

    /// Schedules a failed attempt's next as its policy says (not before `not_before`), or
    /// dead-letters the delivery once the policy is spent.
    async fn again(
        &self,
        target: &Target,
        delivery: &Delivery,
        raw: Bytes,
        outcome: &Outcome,
        not_before: Option<Duration>,
        waits: Waits,
    ) -> Settlement {
        tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, attempt = delivery.attempt, outcome = outcome.label(), "attempt failed");
        match retry::next_due(target, delivery, not_before) {
            Some(due_ms) => {
                let next = Delivery { attempt: delivery.attempt + 1, due_ms, ..delivery.clone() };
                match waits {
                    Waits::InTiers => match self.retrier.schedule(&next).await {
                        Ok(tier) => Settlement::Rescheduled { attempt: next.attempt, due_ms, tier: Some(tier) },
                        Err(why) => Settlement::DeadLettered { reason: Parked::Unschedulable(why) },
                    },
                    Waits::InLane => Settlement::Rescheduled { attempt: next.attempt, due_ms, tier: None },
                }
            }
            None => self.park(delivery, raw, outcome, Parked::Exhausted).await,
        }
    }

    /// Defers a delivery without using an attempt: it waits (in a tier, or in its lane) until
    /// `due_ms`.
    pub async fn defer(
        &self,
        delivery: Delivery,
        transport: Via,
        reason: Deferral,
        due_ms: i64,
        waits: Waits,
    ) -> Settled {
        let later = Delivery { due_ms, ..delivery };
        if waits == Waits::InTiers {
            if let Err(why) = self.retrier.schedule(&later).await {
                return Settled::of(later, transport, Settlement::DeadLettered { reason: Parked::Unschedulable(why) });
            }
        }
        Settled::of(later, transport, Settlement::Deferred { reason, due_ms })
    }

    /// Defers a delivery whose subscription is not known here yet: an eighth of how long its
    /// budget has run, between [`UNKNOWN_WAIT`] and [`UNKNOWN_WAIT_MAX`] (each wait is another
    /// append of it; every 5 s for good, 100,000 of them were 20,000 appends a second into the
    /// tier other tenants' retries share).
    pub async fn unknown(&self, delivery: Delivery, waits: Waits) -> Settled {
        let due = due_after_a_growing_wait(&delivery, 8, UNKNOWN_WAIT, UNKNOWN_WAIT_MAX);
        self.defer(delivery, Via::Webhook, Deferral::UnknownSubscription, due, waits).await
    }

    /// Defers a delivery its shard's cut reached before it was sent: a sixteenth of how long
    /// its budget has run, between [`CUT_WAIT`] and [`CUT_WAIT_MAX`] — or dead-letters it if
    /// that is past its policy's `max_age`.
    pub async fn cut(&self, target: &Target, delivery: Delivery, raw: Bytes, via: Via, waits: Waits) -> Settled {
        let due = due_after_a_growing_wait(&delivery, 16, CUT_WAIT, CUT_WAIT_MAX);
        if retry::outlived(target, &delivery, due) {
            return Box::pin(self.outlived(target, delivery, raw, None)).await;
        }
        self.defer(delivery, via, Deferral::CommitPoint, due, waits).await
    }

    /// Dead-letters the head of an ordered key that an operator skipped.
    pub async fn skipped(&self, delivery: Delivery, raw: Bytes) -> Settled {
        let error = format!("skipped by an operator at {}; the key's later deliveries went on", rfc3339_ms(now_ms()));
        // A waiting head's record is for its next attempt, not made.
        self.retrier.dead_letter(&delivery, raw, delivery.attempt.saturating_sub(1), None, error.clone()).await;
        let via = self.via(&delivery);
        Settled::of(delivery, via, Settlement::DeadLettered { reason: Parked::Skipped(error) })
    }

    /// How the subscription of `delivery` delivers, for the metrics' `transport` label (a
    /// deleted one's: `webhook`).
    fn via(&self, delivery: &Delivery) -> Via {
        self.registry.get(&delivery.subscription).map_or(Via::Webhook, |t| Via::of(&t))
    }

    /// Dead-letters a delivery of a disabled subscription.
    pub async fn disabled(&self, target: &Target, delivery: Delivery, raw: Bytes) -> Settled {
        let reason = target.sub.disabled_reason.clone().unwrap_or_else(|| "disabled".into());
        let error = format!("subscription is disabled: {reason}");
        // Its record is for an attempt not made.
        self.retrier.dead_letter(&delivery, raw, delivery.attempt.saturating_sub(1), None, error).await;
        Settled::of(delivery, Via::of(target), Settlement::DeadLettered { reason: Parked::Disabled(reason) })
    }

    /// Dead-letters a delivery that would be attempted after its policy's `max_age` — held
    /// back by admission (`busy`: rate limit, open breaker, slots) or come due late (`None`:
    /// Herald was down or behind): it is not sent later than the policy allows.
    pub async fn outlived(&self, target: &Target, delivery: Delivery, raw: Bytes, busy: Option<Busy>) -> Settled {
        let why = match busy {
            Some(busy) => format!("held back ({}) past it", busy.reason()),
            None => "came due after it".to_string(),
        };
        let error = format!("not attempted again within the retry policy's max_age: {why}");
        self.retrier.dead_letter(&delivery, raw, delivery.attempt.saturating_sub(1), None, error).await;
        Settled::of(delivery, Via::of(target), Settlement::DeadLettered { reason: Parked::Exhausted })
    }

    /// Drops a delivery of a deleted subscription.
    pub fn dropped(&self, delivery: Delivery) -> Settled {
        tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, "subscription deleted; delivery dropped");
        Settled::of(delivery, Via::Webhook, Settlement::Dropped)
    }

    /// Ends a retry another generation of its delivery has delivered since.
    pub fn superseded(&self, delivery: Delivery, transport: Via, overtaken: bool) -> Settled {
        tracing::debug!(subscription = %delivery.subscription, event = %delivery.event_id, attempt = delivery.attempt, "delivered by a later generation; retry not made");
        Settled::of(delivery, transport, Settlement::Superseded { overtaken })
    }

    /// Dead-letters a record that is not a readable delivery, so it cannot stop its partition.
    pub async fn malformed(&self, rec: &LogRecord, error: String) -> Settled {
        self.retrier.park_malformed(rec, error.clone()).await;
        let settlement = Settlement::DeadLettered { reason: Parked::Malformed(error) };
        Settled { delivery: None, transport: Via::Webhook, attempt: None, settlement }
    }

    /// Dead-letters a record whose processing panicked twice, with the panic's message.
    pub async fn panicked(&self, rec: &LogRecord, message: String) -> Settled {
        let error = format!("processing this delivery panicked twice: {message}");
        tracing::error!(partition = rec.partition, offset = rec.offset, %error, "delivery parked");
        metrics::counter!(m::PANICS).increment(1);
        match Delivery::decode(rec.value.clone()) {
            Ok(delivery) => {
                self.retrier.dead_letter(&delivery, rec.value.clone(), delivery.attempt, None, error.clone()).await;
                let settlement = Settlement::DeadLettered { reason: Parked::Panicked(error) };
                let via = self.via(&delivery);
                Settled::of(delivery, via, settlement)
            }
            Err(_) => self.malformed(rec, error).await,
        }
    }

    async fn park(&self, delivery: &Delivery, raw: Bytes, outcome: &Outcome, reason: Parked) -> Settlement {
        let error = outcome.failure().map(ToString::to_string).unwrap_or_default();
        self.retrier.dead_letter(delivery, raw, delivery.attempt, outcome.status(), error).await;
        Settlement::DeadLettered { reason }
    }

    /// Disables the subscription as `judged` (the version the attempt was made with); `false`
    /// when it has changed since (moved to another URL, say), and was left as it is. A
    /// catalog that cannot be written is logged, and taken as disabled: the receiver said so.
    async fn disable(&self, judged: &Target, reason: String) -> bool {
        match self.registry.disable(judged, reason).await {
            Ok(disabled) => disabled,
            Err(e) => {
                tracing::error!(subscription = %judged.sub.id, error = %e, "could not disable a subscription");
                true
            }
        }
    }

    /// Counts a failed attempt against the endpoint's health: opens its breaker, or disables
    /// the subscription once it has failed continuously for too long.
    async fn judge_health(&self, target: &Target, probe: Probe<'_>) {
        let health = target.admission.failed(probe);
        if let Some(pause) = health.opened {
            tracing::warn!(subscription = %target.sub.id, pause = %humantime::format_duration(pause), "circuit breaker opened");
        }
        if health.give_up {
            let reason = format!("failing continuously; disabled automatically at {}", rfc3339_ms(now_ms()));
            self.disable(target, reason).await;
        }
    }
}

/// Records a settled delivery's metrics: the one place they are counted.
pub fn record(settled: &Settled) {
    let transport = settled.transport.label();
    // The series every delivery touches come from cached handles (`m::counter`); the rarer
    // ones use the macros.
    if let Some(outcome) = &settled.attempt {
        m::counter(m::ATTEMPTS, &[("transport", transport), ("outcome", outcome.metric_label())]).increment(1);
        // Not attempts that never left (an edge agent's full window, waited up to the whole
        // timeout): one tenant's saturated device set the fleet's request p99 at its timeout.
        if !outcome.failure().is_some_and(Failure::never_sent) {
            m::histogram(m::REQUEST_SECONDS, &[("transport", transport)]).record(outcome.latency().as_secs_f64());
        }
    }
    match &settled.settlement {
        Settlement::Delivered => {
            m::counter(m::DELIVERIES, &[("transport", transport), ("outcome", "delivered")]).increment(1);
            // From acceptance — or, for a later generation, the resend, recover or replay that
            // made it (its budget's start): a resent event's whole age (a week, for last
            // week's) set the fleet's p99. (Not the budget for the first: an ordered key's
            // held delivery gets a fresh one, yet was waiting all along.)
            if let Some(d) = &settled.delivery {
                let since = if d.generation == 0 { d.accepted_ms } else { d.budget_ms };
                let age = (now_ms() - since).max(0) as f64 / 1000.0;
                m::histogram(m::END_TO_END_SECONDS, &[("transport", transport)]).record(age);
            }
        }
        Settlement::Rescheduled { tier, .. } => {
            let tier = tier.map_or_else(|| "ordered".to_string(), tiers::label);
            metrics::counter!(m::RETRIES_SCHEDULED, "tier" => tier).increment(1);
        }
        Settlement::Deferred { reason, .. } => {
            if let Some(reason) = reason.label() {
                metrics::counter!(m::DEFERRED, "reason" => reason).increment(1);
            }
        }
        Settlement::DeadLettered { reason } => {
            metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "dead_lettered").increment(1);
            metrics::counter!(m::DEAD_LETTERS, "reason" => reason.label()).increment(1);
        }
        Settlement::Dropped => {
            metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "dropped").increment(1);
        }
        Settlement::Superseded { .. } => {
            metrics::counter!(m::DELIVERIES, "transport" => transport, "outcome" => "superseded").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason a delivery is dead-lettered for is a series set up at zero.
    #[test]
    fn every_dead_letter_reason_is_a_metric_reason() {
        let why = String::new;
        let all = [
            Parked::Exhausted,
            Parked::Gone,
            Parked::Disabled(why()),
            Parked::Malformed(why()),
            Parked::Panicked(why()),
            Parked::Skipped(why()),
            Parked::Unschedulable(why()),
        ];
        let labels: Vec<&str> = all.iter().map(Parked::label).collect();
        assert_eq!(labels.len(), crate::metrics::DEAD_LETTER_REASONS.len());
        assert!(labels.iter().all(|l| crate::metrics::DEAD_LETTER_REASONS.contains(l)), "{labels:?}");
    }

    /// An attempt that never left (held behind an edge agent's full window for its whole
    /// timeout) is no request's latency: one tenant's saturated device set the fleet's request
    /// p99 at its timeout. One Herald ended to free the commit point was in flight, and is.
    #[test]
    fn attempts_that_never_left_are_not_request_latencies() {
        let exporter = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let scrape = exporter.handle();
        let settled = |outcome: Outcome| Settled {
            delivery: None,
            transport: Via::Edge,
            attempt: Some(outcome),
            settlement: Settlement::Dropped,
        };
        metrics::with_local_recorder(&exporter, || {
            let waited = Duration::from_secs(30);
            record(&settled(Outcome::failed(Failure::EdgeBusy { device: "d".into() }, waited)));
            record(&settled(Outcome::Delivered { status: 200, latency: Duration::from_millis(3), response: None }));
            record(&settled(Outcome::failed(Failure::Held { after_ms: 240_000 }, Duration::from_secs(240))));
        });
        let text = scrape.render();
        assert!(text.contains(r#"herald_delivery_request_seconds_count{transport="edge"} 2"#), "{text}");
        assert!(text.contains(r#"herald_attempts_total{transport="edge",outcome="edge_busy"} 1"#), "{text}");
    }
    use crate::log::stub::Stub;

    /// A delivery whose tier refuses it as too large (a record written before a lower
    /// `ingest.max_event_bytes`, or a Kafka topic's smaller `max.message.bytes`) is
    /// dead-lettered instead; what is recorded of it (history, metrics) must say so, not that
    /// it waits in a tier.
    #[tokio::test]
    async fn a_delivery_its_tier_refuses_is_reported_dead_lettered() {
        let log = Arc::new(Stub::new(true, true).refusing_as_too_large(".retry."));
        let registry = Arc::new(Registry::stubbed());
        let settler = Settler::new(registry, Retrier::new(log.clone(), "herald.".into(), "herald.dlq".into()));
        let delivery = Delivery::first_attempt("e".into(), "s".into(), "t".into(), "T".into(), Bytes::new(), now_ms());
        let later = now_ms() + 60_000;
        let settled = settler.defer(delivery, Via::Webhook, Deferral::NotDue, later, Waits::InTiers).await;
        assert!(matches!(settled.settlement, Settlement::DeadLettered { .. }), "{:?}", settled.settlement);
        let appends = log.appends.lock().unwrap();
        assert_eq!(appends.len(), 1, "one dead letter");
    }

    /// A delivery whose subscription stays unknown (a record a newer version wrote, a secret
    /// sealed with a lost key) waits longer the longer its budget has run: every 5 s for
    /// good, 100,000 such deliveries were 20,000 appends a second into the tier other
    /// tenants' retries share. A young one (a subscription this process has not read yet)
    /// is looked at again soon.
    #[tokio::test]
    async fn a_delivery_whose_subscription_stays_unknown_waits_longer_and_longer() {
        let log = Arc::new(Stub::new(true, true));
        let settler =
            Settler::new(Arc::new(Registry::stubbed()), Retrier::new(log, "herald.".into(), "herald.dlq".into()));
        let waited = |age_ms: i64| {
            let now = now_ms();
            let delivery =
                Delivery::first_attempt("e".into(), "s".into(), "t".into(), "T".into(), Bytes::new(), now - age_ms);
            let settler = &settler;
            async move {
                match settler.unknown(delivery, Waits::InTiers).await.settlement {
                    Settlement::Deferred { due_ms, .. } => due_ms - now,
                    other => panic!("{other:?}"),
                }
            }
        };
        assert!(waited(0).await <= 6_000, "a young one soon");
        let hour = waited(3_600_000).await;
        assert!((5 * 60_000..=11 * 60_000).contains(&hour), "an hour old: {hour} ms");
        let week = waited(7 * 86_400_000).await;
        assert!(week <= 11 * 60_000, "bounded: {week} ms");
    }

    /// A retry superseded by a delivery an earlier chain's failure overtook on record sets the
    /// state back to delivered; one superseded by the newest state records nothing.
    #[test]
    fn a_retry_superseded_by_an_overtaken_delivery_sets_its_state_right() {
        use crate::history::{record::State, HistoryRecord};
        let delivery = Delivery::first_attempt("e".into(), "s".into(), "t".into(), "T".into(), Bytes::new(), 0);
        let mut overtaken = Settled::of(delivery.clone(), Via::Webhook, Settlement::Superseded { overtaken: true });
        let Some(HistoryRecord::State(s)) = overtaken.take_history(5_000) else { panic!("a state record") };
        assert_eq!((s.state, s.at_ms), (State::Delivered, 5_000));
        let mut newest = Settled::of(delivery, Via::Webhook, Settlement::Superseded { overtaken: false });
        assert!(newest.take_history(5_000).is_none());
    }

    /// An attempt is on record no earlier than it was due, by the clock that scheduled it: a
    /// retry made by another process whose clock runs behind (or after this one's clock stepped
    /// back) was dated before the attempt it follows, so that earlier attempt's `retrying` read
    /// as the newest state of a delivered event — and a recover sent it again.
    #[test]
    fn an_attempt_is_dated_no_earlier_than_it_was_due() {
        use crate::history::HistoryRecord;
        let mut delivery = Delivery::first_attempt("e".into(), "s".into(), "t".into(), "T".into(), Bytes::new(), 0);
        (delivery.attempt, delivery.due_ms) = (2, 50_000);
        let latency = Duration::from_millis(10);
        let delivered = Outcome::Delivered { status: 200, latency, response: None };
        let mut settled = Settled {
            delivery: Some(delivery),
            transport: Via::Webhook,
            attempt: Some(delivered),
            settlement: Settlement::Delivered,
        };
        // This process's clock reads 44 s, six behind the one that scheduled the retry.
        let Some(HistoryRecord::Attempt(a)) = settled.take_history(44_000) else { panic!("an attempt") };
        assert_eq!(a.at_ms, 50_000);
        let mut on_time =
            Settled { attempt: Some(Outcome::Delivered { status: 200, latency, response: None }), ..settled };
        let Some(HistoryRecord::Attempt(a)) = on_time.take_history(60_010) else { panic!("an attempt") };
        assert_eq!(a.at_ms, 60_000, "when it began, by a clock that agrees");
        // Settled without an attempt (a skipped head whose retry was a day ahead): now.
        let mut skipped = Settled {
            attempt: None,
            settlement: Settlement::DeadLettered { reason: Parked::Skipped("by the operator".into()) },
            ..on_time
        };
        let Some(HistoryRecord::State(s)) = skipped.take_history(44_000) else { panic!("a state") };
        assert_eq!(s.at_ms, 44_000, "not dated at its due time");
    }
}
