//! The dispatcher: consumes the `deliveries` topic and every retry tier, one shard per owned
//! partition (`shard`; `workers` starts, stops and restarts them), and makes each delivery as
//! the data flow reads:
//! decode → look up → gate (due, enabled, admitted) → sign and send → settle (`settle`).
//! A record's offset may be committed once it is settled, durably (`window`).

mod ordered;
mod settle;
mod shard;
mod window;
mod workers;

pub use ordered::{BlockedKey, LaneId, Marker, OrderedKeys};
pub use settle::{record, Deferral, Parked, Settled, Settlement, Settler, Via, Waits};
pub use shard::ShardLimits;

use crate::admission::{Busy, Probe};
use crate::history::{Index, Recorder, Since};
use crate::log::{Log, LogError, LogRecord};
use crate::metrics::Metrics;
use crate::model::{now_ms, Delivery};
use crate::registry::{Lookup, Registry};
use crate::retry::{self, tiers};
use crate::target::Target;
use crate::transport::Transports;
use futures::FutureExt;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, OwnedSemaphorePermit};
use tracing::Instrument;
use window::{Cut, InFlightBytes, Share, Shares};

/// Whatever observes settled deliveries besides metrics and the history (tests' probes).
pub trait Observe: Send + Sync {
    /// Sees one settled delivery.
    fn settled(&self, settled: &Settled);

    /// Sees a delivery about to be attempted (its transport called next).
    fn attempting(&self, _delivery: &Delivery) {}
}

/// Makes one delivery from its log record to its settlement.
pub struct Deliverer {
    registry: Arc<Registry>,
    transports: Transports,
    settler: Settler,
    observers: Vec<Arc<dyn Observe>>,
    history: Option<Arc<Recorder>>,
    /// What tells a retry that another generation of its delivery has delivered it.
    index: Option<Arc<Index>>,
    /// A failed look-up is logged every 10 s at most: it fails for every retry alike.
    index_failed: crate::model::AtMostEvery,
    /// Each tenant's bytes of records in flight, over every partition (see [`InFlightBytes`]).
    in_flight_bytes: InFlightBytes,
}

/// What the gate decided for a delivery that is due.
enum Gate<'a> {
    /// Go: an in-flight slot, the breaker's probe if this attempt is one, and its place in
    /// its tenant's share of the partition and of its bytes in flight.
    Open(OwnedSemaphorePermit, Probe<'a>, Share<'a>),
    /// Its subscription is disabled.
    Disabled,
    /// Not now.
    Busy(Busy),
}

impl Deliverer {
    /// Wires the stages together.
    pub fn new(registry: Arc<Registry>, transports: Transports, settler: Settler) -> Self {
        Deliverer {
            registry,
            transports,
            settler,
            observers: Vec::new(),
            history: None,
            index: None,
            index_failed: Default::default(),
            in_flight_bytes: InFlightBytes::new(crate::config::DEFAULT_TENANT_IN_FLIGHT_BYTES),
        }
    }

    /// Adds an observer of every settlement.
    pub fn observed_by(mut self, observer: Arc<dyn Observe>) -> Self {
        self.observers.push(observer);
        self
    }

    /// Records every settlement in the delivery history.
    pub fn recorded_by(mut self, history: Arc<Recorder>) -> Self {
        self.history = Some(history);
        self
    }

    /// Holds each tenant's records in flight to `bytes` (`dispatch.tenant_in_flight_bytes`).
    pub fn in_flight_bytes(mut self, bytes: usize) -> Self {
        self.in_flight_bytes = InFlightBytes::new(bytes);
        self
    }

    /// Looks a retry up in the history's index before it is made: one that another
    /// generation of its delivery has since delivered is not sent ([`Settlement::Superseded`]).
    pub fn superseded_in(mut self, index: Arc<Index>) -> Self {
        self.index = Some(index);
        self
    }

    /// Whether `delivery`, a retry, has been delivered since it was scheduled, by the index
    /// (read off the runtime's workers: it may read the disk). A recover or resend of a
    /// delivery still retrying sends it at once, beside the retry waiting in a tier, which
    /// then sent it once more. As far as the index has read: a retry due within its lag of
    /// the other's delivery is still sent. Not an ordered key's head, which waits with its
    /// key (a resend joins the key's line behind it).
    async fn delivered_since(&self, delivery: &Delivery) -> Since {
        let Some(index) = &self.index else { return Since::No };
        if delivery.attempt < 2 || delivery.ordering_key.is_some() {
            return Since::No;
        }
        let (index, d) = (index.clone(), delivery.clone());
        match tokio::task::spawn_blocking(move || index.delivered(&d)).await {
            Ok(Ok(since)) => since,
            // Sent rather than lost: the worst of it is the duplicate this check is for.
            Ok(Err(e)) => {
                if self.index_failed.due(10_000) {
                    tracing::warn!(error = %e, "retries' states could not be read; they are attempted");
                }
                Since::No
            }
            Err(_) => Since::No,
        }
    }

    /// Processes one record (keeping a delivery that must wait where `waits` says), once
    /// more if that panics before it is settled; returns only when it is settled (durably;
    /// its history record queued, and durable before a commit of its offset goes through), so
    /// its offset may be committed. A record that panicked twice is the caller's to park
    /// ([`Deliverer::park_panicked`], boxed where awaited: it would add to every delivery's
    /// future), with the last panic's message here, so no record can stop its partition.
    pub async fn process_supervised(
        &self,
        rec: &LogRecord,
        waits: Waits,
        shares: &Shares,
        cut: &mut Cut,
    ) -> Result<Settled, String> {
        let mut last = String::new();
        for attempt in 1..=2 {
            match AssertUnwindSafe(self.deliver(rec.clone(), waits, shares, cut)).catch_unwind().await {
                Ok(mut settled) => {
                    self.settled(rec, &mut settled, waits);
                    return Ok(settled);
                }
                Err(panic) => {
                    last = panic_message(panic.as_ref());
                    tracing::error!(partition = rec.partition, offset = rec.offset, attempt, panic = %last, "a delivery panicked");
                }
            }
        }
        Err(last)
    }

    /// Observes and records a settled delivery. A panic in either is caught and logged, not
    /// run again from the start: the delivery is settled (sent, or its retry or dead letter
    /// durable), and processing it again sent it again and started a second chain of retries.
    /// An ordered head's record (`Waits::InLane`) is left in `settled` for its sequencer,
    /// which appends it with [`Deliverer::record_now`].
    fn settled(&self, rec: &LogRecord, settled: &mut Settled, waits: Waits) {
        let caught = |what: &str, done: std::thread::Result<()>| {
            if let Err(panic) = done {
                let panic = panic_message(panic.as_ref());
                tracing::error!(partition = rec.partition, offset = rec.offset, panic = %panic, "{what} a settled delivery panicked");
            }
        };
        caught("observing", std::panic::catch_unwind(AssertUnwindSafe(|| self.observe(settled))));
        if waits == Waits::InTiers {
            caught("recording", std::panic::catch_unwind(AssertUnwindSafe(|| self.write_history(settled))));
        }
    }

    /// Dead-letters the head of an ordered key an operator skipped; its record is left for
    /// [`Deliverer::record_now`].
    pub async fn skip(&self, delivery: Delivery, raw: bytes::Bytes) -> Settled {
        let settled = self.settler.skipped(delivery, raw).await;
        self.observe(&settled);
        settled
    }

    /// Appends `settled`'s history record now and durably (queued, if that append fails or
    /// takes longer than the history's budget): an
    /// ordered head's, before its sequencer's marker — once that is durable the head is never
    /// attempted again, so a record still queued when the process died was lost for good, and
    /// waiting for the queue instead held every ordered key behind all tenants' history.
    pub async fn record_now(&self, settled: &mut Settled) {
        let Some(history) = &self.history else { return };
        // Caught as in `settled`: a panic making the record must not take the head's future.
        let made = std::panic::catch_unwind(AssertUnwindSafe(|| settled.take_history(now_ms())));
        let Ok(Some(record)) = made else { return };
        history.append_or_queue(&record).await;
    }

    /// Whether the subscription holds a key whose head was dead-lettered until it is skipped
    /// (`"on_dead_letter": "block"`); a deleted one, or one no longer ordered, does not. One
    /// whose record cannot be read here (a newer version's) might: its keys stay held, as its
    /// deliveries wait, rather than be let go for good on a guess.
    pub fn holds(&self, subscription: &str) -> bool {
        match self.registry.get(subscription) {
            Some(t) => t
                .sub
                .spec
                .ordering
                .as_ref()
                .is_some_and(|o| o.ordered() && o.on_dead_letter == crate::model::OnDeadLetter::Block),
            None => self.registry.unreadable(subscription),
        }
    }

    /// Whether the subscription is gone: deleted, as far as this process has read (one whose
    /// record cannot be read here is not).
    pub fn gone(&self, subscription: &str) -> bool {
        self.registry.get(subscription).is_none() && !self.registry.unreadable(subscription)
    }

    /// Whether this process has caught up with the catalog (within a second): before then, a
    /// subscription missing here may be one made through another process since it last read
    /// (or its feed is failing), not one deleted.
    pub async fn catalog_caught_up(&self) -> bool {
        tokio::time::timeout(Duration::from_secs(1), self.registry.caught_up()).await.unwrap_or(false)
    }

    /// Records `settled` (after its observers: the record takes the receiver's answer).
    fn write_history(&self, settled: &mut Settled) {
        if let Some(history) = &self.history {
            if let Some(record) = settled.take_history(now_ms()) {
                history.record(&record);
            }
        }
    }

    /// Waits until the history of every settled delivery is durable (bounded): a stopping
    /// shard's last commits need it.
    pub async fn history_synced(&self) {
        if let Some(h) = &self.history {
            h.synced().await;
        }
    }

    /// The committer a shard commits through: with history kept, one that commits an offset
    /// only once the history of everything before it is durable.
    pub fn committer(&self, inner: Arc<dyn crate::log::Committer>) -> Arc<dyn crate::log::Committer> {
        match &self.history {
            Some(h) => h.gate(inner),
            None => inner,
        }
    }

    /// Settles a record whose processing panicked twice ([`Deliverer::process_supervised`]).
    /// Observing or recording it may panic (it is the same record): that is caught, so the
    /// partition moves on.
    pub async fn park_panicked(&self, rec: &LogRecord, message: String, waits: Waits) -> Settled {
        let mut settled = self.settler.panicked(rec, message).await;
        self.settled(rec, &mut settled, waits);
        settled
    }

    /// Parks a record that is not a readable delivery, and records it.
    pub async fn park_malformed(&self, rec: &LogRecord, error: String) -> Settled {
        let settled = self.settler.malformed(rec, error).await;
        self.observe(&settled);
        settled
    }

    fn observe(&self, settled: &Settled) {
        record(settled);
        for o in &self.observers {
            o.settled(settled);
        }
    }

    /// Every path but an attempt's is boxed where it is awaited, here and in what it awaits:
    /// a future is as large as its largest await, this one is most of every delivery's
    /// future, and the shard copies that whole into a fresh allocation for each delivery
    /// (at 3.7 KB, about 4 % of a drain's CPU; `shard`'s test holds the size).
    async fn deliver(&self, rec: LogRecord, waits: Waits, shares: &Shares, cut: &mut Cut) -> Settled {
        let delivery = match Delivery::decode(rec.value.clone()) {
            Ok(d) => d,
            Err(e) => return Box::pin(self.settler.malformed(&rec, e.to_string())).await,
        };
        let target = match self.registry.lookup(&delivery.subscription).await {
            // A subscription of another tenant now (a static webhook the config file moved
            // keeps its id): the delivery's own subscription is gone.
            Lookup::Found(t) if t.sub.tenant != delivery.tenant => return self.settler.dropped(delivery),
            Lookup::Found(t) => t,
            Lookup::Deleted => return self.settler.dropped(delivery),
            Lookup::Unknown => return Box::pin(self.settler.unknown(delivery, waits)).await,
        };
        let transport = Via::of(&target);
        if waits == Waits::InTiers && tiers::for_wait(wait(&delivery)).is_some() {
            // Not due yet: hop to the tier that fits the rest of the wait.
            let due = delivery.due_ms;
            return Box::pin(self.settler.defer(delivery, transport, Deferral::NotDue, due, waits)).await;
        }
        // Less than the shortest tier: wait here, so no attempt is ever early.
        let left = wait(&delivery);
        if !left.is_zero() {
            tokio::time::sleep(left).await;
        }
        // Looked for first: a retry delivered since by a resend or recover is done, not a dead
        // letter past its max_age (whose state, the newer, would read over the delivery's).
        match Box::pin(self.delivered_since(&delivery)).await {
            Since::No => {}
            since => return self.settler.superseded(delivery, transport, since == Since::Overtaken),
        }
        if target.sub.spec.enabled && retry::outlived(&target, &delivery, now_ms()) {
            // Came due after its max_age (Herald was down, or far behind): not sent late. (A
            // disabled subscription's is parked as that, below, with its own reason.)
            return Box::pin(self.settler.outlived(&target, delivery, rec.value, None)).await;
        }
        let (_slot, probe, _share) = match gate(&target, shares, &self.in_flight_bytes, rec.value.len()).await {
            Gate::Open(slot, probe, share) => (slot, probe, share),
            Gate::Disabled => return Box::pin(self.settler.disabled(&target, delivery, rec.value)).await,
            Gate::Busy(busy) => {
                let due = now_ms() + busy.defer().as_millis() as i64;
                if retry::outlived(&target, &delivery, due) {
                    return Box::pin(self.settler.outlived(&target, delivery, rec.value, Some(busy))).await;
                }
                return Box::pin(self.settler.defer(delivery, transport, Deferral::Busy(busy), due, waits)).await;
            }
        };
        if cut.reached_now(rec.offset) {
            // Its partition's commit point was held back past the bound while it waited for its
            // slot: never sent, so no attempt — it waits in a tier, and the commit point moves.
            return Box::pin(self.settler.cut(&target, delivery, rec.value, transport, waits)).await;
        }
        let pending = retry::pending_retries(&target, &delivery);
        let span = crate::telemetry::attempt_span(
            &delivery.event_id,
            &delivery.subscription,
            transport.label(),
            delivery.attempt,
            delivery.trace.as_ref(),
        );
        for o in &self.observers {
            o.attempting(&delivery);
        }
        // In the attempt's span: the `traceparent` receivers get names it as their parent.
        // Ended early if it holds back the partition's commit point too far (see `Cut`).
        let outcome = {
            let attempt = std::pin::pin!(self.transports.deliver(&target, &delivery, pending).instrument(span.clone()));
            cut.race(rec.offset, attempt).await
        };
        let delivered = matches!(outcome, crate::model::Outcome::Delivered { .. });
        crate::telemetry::attempted(&span, outcome.label(), outcome.status(), delivered);
        let settled = self.settler.attempted(&target, delivery, rec.value, outcome, probe, waits).await;
        if let Settlement::DeadLettered { reason } = &settled.settlement {
            crate::telemetry::dead_lettered(&span, reason.label());
        }
        settled
    }
}

/// A caught panic's message, for logs and dead letters.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// How long until `delivery` is due (zero when it is).
fn wait(delivery: &Delivery) -> Duration {
    Duration::from_millis((delivery.due_ms - now_ms()).max(0) as u64)
}

/// The least a delivery refused for its tenant's bytes in flight waits, and the most.
const BYTES_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
const MAX_BYTES_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a due delivery of `size` bytes may be attempted now: its subscription enabled, its
/// tenant's share of the partition not all in flight nor its bytes in flight in the process,
/// and admitted (breaker, rate limit, an in-flight slot).
async fn gate<'a>(target: &'a Target, shares: &'a Shares, bytes: &'a InFlightBytes, size: usize) -> Gate<'a> {
    if !target.sub.spec.enabled {
        return Gate::Disabled;
    }
    let share = match shares.take(bytes, &target.sub.tenant, size) {
        Ok(share) => share,
        // Looked at again no sooner than a delivery ages: the share is full of ones that hang.
        Err(window::Full::Share) => return Gate::Busy(Busy::Share(target.admission.busy_wait().max(window::YOUNG))),
        // Bytes held by deliveries that may hang for their whole timeout: looked at again as
        // long again as the tenant has been refused (5 s at least, a minute at most), not
        // every second — each look appends its record, up to a megabyte, again.
        Err(window::Full::Bytes(refused)) => {
            return Gate::Busy(Busy::Share(refused.clamp(BYTES_WAIT, MAX_BYTES_WAIT)));
        }
    };
    match target.admission.admit().await {
        Ok((slot, probe)) => Gate::Open(slot, probe, share),
        Err(busy) => Gate::Busy(busy),
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
    /// The `ordered` topic: its partitions are sequenced per key, not worked as shards.
    pub ordered: bool,
}

/// Runs shards for the partitions this process owns, for every source topic.
pub struct Dispatcher {
    log: Arc<dyn Log>,
    sources: Vec<Source>,
    group: String,
    deliverer: Arc<Deliverer>,
    limits: ShardLimits,
    metrics: Arc<Metrics>,
    keys: Arc<OrderedKeys>,
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
        keys: Arc<OrderedKeys>,
    ) -> Self {
        Dispatcher { log, sources, group, deliverer, limits, metrics, keys }
    }

    /// Joins the consumer group on every source and runs until `stop` turns true; or fails
    /// once any source cannot be consumed, or its consumer ends before the stop (the group's
    /// thread gone): that source's deliveries (fresh ones, or a tier's retries) would stop
    /// while events were still accepted, so the process says it is broken (`/healthz`) for a
    /// restart to mend. Sources already started run on meanwhile.
    pub async fn run(self, stop: watch::Receiver<bool>) -> Result<(), Stopped> {
        let mut loops = tokio::task::JoinSet::new();
        for source in &self.sources {
            let consumer = match self.log.consume(&self.group, &source.topic).await {
                Ok(consumer) => consumer,
                Err(error) => {
                    loops.detach_all(); // those started run on
                    return Err(Stopped::Consume { label: source.label.clone(), error });
                }
            };
            let work = workers::Work {
                log: self.log.clone(),
                deliverer: self.deliverer.clone(),
                limits: self.limits,
                metrics: self.metrics.clone(),
                keys: self.keys.clone(),
            };
            let run = workers::run_source(consumer, source.clone(), work, stop.clone());
            let label = source.label.clone();
            loops.spawn(async move {
                run.await;
                label
            });
        }
        sources_ended(loops, stop).await
    }
}

/// Waits for every source's loop to end; the first to end before `stop` is a failure (see
/// [`Dispatcher::run`]).
async fn sources_ended(mut loops: tokio::task::JoinSet<String>, stop: watch::Receiver<bool>) -> Result<(), Stopped> {
    while let Some(ended) = loops.join_next().await {
        if !*stop.borrow() {
            let label = ended.unwrap_or_else(|e| format!("a source whose loop panicked ({e})"));
            // The others run on until the stop (dropped, the set would abort them): the
            // process says it is broken, and delivers what it can until it is restarted.
            loops.detach_all();
            return Err(Stopped::Ended { label });
        }
    }
    Ok(())
}

/// Why the dispatcher stopped before it was told to.
#[derive(Debug, thiserror::Error)]
pub enum Stopped {
    /// A source's consumer could not be made.
    #[error("cannot consume {label}: {error}")]
    Consume {
        /// The source.
        label: String,
        /// What the log said.
        error: LogError,
    },
    /// A source's consumer ended before the stop.
    #[error("the consumer of {label} ended: its deliveries stopped")]
    Ended {
        /// The source.
        label: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A delivery its shard's cut reached while it waited for its slot was never sent: it waits
    /// in a tier without using an attempt, and nothing is on record as attempted (it was a
    /// `timeout` of 0 ms, an attempt of its budget, that no receiver ever saw).
    #[tokio::test]
    async fn a_delivery_cut_before_it_was_sent_is_deferred_not_attempted() {
        use crate::transport::{HttpSettings, NetworkGuard, Transports};
        let log = Arc::new(crate::log::stub::Stub::new(true, true));
        let registry = Arc::new(Registry::stubbed());
        let target = registry.hold("t", &serde_json::json!({ "url": "https://hooks.example/a" }));
        let transports =
            Transports::new(NetworkGuard::new(Vec::new()), &HttpSettings::default(), Duration::from_secs(1));
        let retrier = crate::retry::Retrier::new(log.clone(), "herald.".into(), "herald.dlq".into());
        let deliverer = Deliverer::new(registry.clone(), transports, Settler::new(registry, retrier));
        let delivery = Delivery::first_attempt(
            "e".into(),
            target.sub.id.clone(),
            "t".into(),
            "T".into(),
            bytes::Bytes::from_static(b"{}"),
            now_ms(),
        );
        let rec = LogRecord {
            partition: 0,
            offset: 4,
            timestamp_ms: 0,
            key: bytes::Bytes::from(target.sub.id.clone()),
            value: delivery.encode(),
        };
        let (cut_below, mut cut) = Cut::channel();
        cut_below.send_replace(5);
        let shares = Shares::new(8);
        let settled = deliverer.process_supervised(&rec, Waits::InTiers, &shares, &mut cut).await.unwrap();
        assert!(settled.attempt.is_none(), "no attempt on record: {:?}", settled.attempt);
        assert!(matches!(settled.settlement, Settlement::Deferred { .. }), "{:?}", settled.settlement);
        let waiting = Delivery::decode(log.appends.lock().unwrap()[0][0].value.clone()).unwrap();
        assert_eq!(waiting.attempt, 1, "its attempt still to make");
        assert!(waiting.due_ms <= now_ms() + 1_100, "a young one looked at again soon");
        // One cut again and again (a backlog behind a hanging endpoint) waits longer each time
        // its budget has run longer, up to a minute: every second, it was an append a second.
        let old = Delivery { budget_ms: now_ms() - 3_600_000, ..delivery };
        let rec = LogRecord { value: old.encode(), offset: 4, ..rec };
        deliverer.process_supervised(&rec, Waits::InTiers, &shares, &mut cut).await.unwrap();
        let waiting = Delivery::decode(log.appends.lock().unwrap()[1][0].value.clone()).unwrap();
        assert!(waiting.due_ms >= now_ms() + 55_000, "an hour into its budget: {} ms", waiting.due_ms - now_ms());
    }

    /// A source whose consumer ends while the others run stops the dispatcher at once (and
    /// the process then says it is broken): its loop was awaited after the others', which run
    /// until the stop, so that source's deliveries stopped unsaid while events were accepted.
    #[tokio::test]
    async fn a_source_that_ends_before_the_stop_stops_the_dispatcher_at_once() {
        let (stop, stopped) = watch::channel(false);
        let ran_to_the_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let until_stopped = |label: &'static str| {
            let (mut stopped, ran) = (stopped.clone(), ran_to_the_stop.clone());
            async move {
                let _ = stopped.wait_for(|s| *s).await;
                ran.store(true, std::sync::atomic::Ordering::SeqCst);
                label.to_string()
            }
        };
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(until_stopped("deliveries"));
        loops.spawn(async { "retry.30s".to_string() });
        let ended = tokio::time::timeout(Duration::from_secs(5), sources_ended(loops, stopped.clone())).await;
        assert!(matches!(&ended, Ok(Err(Stopped::Ended { label })) if label == "retry.30s"), "{ended:?}");
        // The other source ran on until the stop (an aborted loop never gets there).
        stop.send_replace(true);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !ran_to_the_stop.load(std::sync::atomic::Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the other source's loop was aborted");
            tokio::task::yield_now().await;
        }
        stop.send_replace(false);
        // At a stop every loop ends, and that is no failure.
        let mut loops = tokio::task::JoinSet::new();
        loops.spawn(until_stopped("deliveries"));
        loops.spawn(until_stopped("retry.30s"));
        stop.send_replace(true);
        let ended = tokio::time::timeout(Duration::from_secs(5), sources_ended(loops, stopped)).await;
        assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    }
}
