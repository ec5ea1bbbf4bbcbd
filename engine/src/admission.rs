//! Admission control and the circuit breaker: per-subscription state in this process that
//! decides whether a delivery may be attempted now. The in-flight cap, the optional rate
//! limit, recent latency, and health (the breaker, the continuous-failure clock).
//!
//! Admission: a delivery takes an in-flight slot at once, or queues for one for at most
//! [`PATIENCE`] (a fast endpoint's backlog drains within it; a hung endpoint's deliveries
//! leave the partition's window quickly); a stalled endpoint's deliveries are deferred at once,
//! and so is one that, at the pace queued deliveries have lately been served, would not get a
//! slot within its patience (an endpoint that keeps answering but does not keep up).
//! Health: after `failures` consecutive failed attempts the breaker opens for a pause that
//! doubles after each failed probe; while it is open deliveries wait in the retry tiers
//! without using an attempt, and once the pause is over one probe goes through.

use crate::config::HealthConfig;
use crate::model::{now_ms, range};
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A circuit breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Breaker {
    /// Deliveries go through.
    Closed,
    /// Paused after consecutive failures.
    Open,
    /// The pause is over: one probe decides.
    HalfOpen,
}

/// An endpoint's health in this process: what an operator looks at first.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EndpointHealth {
    /// The breaker.
    pub breaker: Breaker,
    /// Attempts in flight now.
    pub in_flight: u32,
    /// The in-flight cap.
    pub max_in_flight: u32,
    /// Recent attempts' mean latency (exponentially weighted), ms.
    pub latency_ms: f64,
    /// Failures in a row since the last success.
    pub consecutive_failures: u32,
}

/// In-flight cap of a subscription that sets none.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 64;

/// How long a delivery queues for a slot before it is deferred: a backlog that drains
/// within it stays in memory, and it is the longest a hung endpoint's deliveries can hold
/// a partition's window slots.
pub const PATIENCE: Duration = Duration::from_millis(250);

/// The longest a delivery is deferred for by admission.
const MAX_DEFER: Duration = Duration::from_secs(3600);

/// The furthest ahead a turn is promised to a delivery deferred for its endpoint's pace: a
/// turn worked out from a pace that then quickens is waited for in full, so the promise is
/// kept short enough that such a wait is bounded; past it, a delivery comes back, and if the
/// endpoint is still behind it is given a later turn. (Turns past it are all given it, so a
/// backlog of more than this much of an endpoint's pace comes back together.)
const MAX_TURN_AHEAD: Duration = Duration::from_secs(60);

/// How quickly the measured pace forgets: evidence this old counts for about a third. Long
/// enough to hold a slot's worth of grants from an endpoint whose every slot takes up to this
/// long to turn over (the pace is used only with that much evidence), and to see past a
/// moment's stall of this machine.
const PACE_MEMORY: Duration = Duration::from_secs(10);

/// While a probe is out, other deliveries wait at most this long before looking again.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Why a delivery may not be attempted now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// At the in-flight cap (or stalled): defer this long.
    Full(Duration),
    /// A slow endpoint sent more than it answers: by its pace, no slot within the patience.
    /// Defer until this delivery's turn.
    Pace(Duration),
    /// Over the rate limit: defer this long.
    Rate(Duration),
    /// Its tenant has its whole share of the partition's deliveries in flight (the
    /// dispatcher's `window::Shares`): defer this long.
    Share(Duration),
    /// The circuit breaker is open: defer this long.
    Open(Duration),
}

impl Busy {
    /// How long to defer.
    pub fn defer(self) -> Duration {
        match self {
            Busy::Full(d) | Busy::Pace(d) | Busy::Rate(d) | Busy::Share(d) | Busy::Open(d) => d,
        }
    }

    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Busy::Full(_) => "in_flight_cap",
            Busy::Pace(_) => "endpoint_pace",
            Busy::Rate(_) => "rate_limit",
            Busy::Share(_) => "tenant_share",
            Busy::Open(_) => "circuit_breaker",
        }
    }
}

/// The circuit breaker's probe: the one attempt let through to an endpoint whose pause is
/// over. Another may start once this one is settled ([`Admission::succeeded`] or
/// [`Admission::failed`]) or dropped unsettled, as an attempt is when it panics or its
/// partition stops mid-way; a flag cleared by hand only when the attempt was settled stayed
/// set on those paths, and every later delivery to the endpoint was deferred as if a probe
/// were still out.
#[derive(Debug)]
pub struct Probe<'a>(Option<&'a AtomicI64>);

impl Probe<'_> {
    /// Not a probe: an attempt with the breaker closed.
    pub const NONE: Probe<'static> = Probe(None);

    /// Whether this attempt is the breaker's probe.
    pub fn is_probe(&self) -> bool {
        self.0.is_some()
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(probing) = self.0 {
            probing.store(0, Ordering::Release);
        }
    }
}

/// How far behind the bucket's time a reading may be and still be a race between callers
/// rather than the clock stepped back.
const CLOCK_STEP_MS: i64 = 1_000;

/// A token bucket of `rate` per second, holding up to `capacity` tokens (full at first). Paces
/// a subscription's deliveries, and a tenant key's API requests.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    capacity: f64,
    state: Mutex<(f64, i64)>,
}

impl Bucket {
    /// A full bucket of `capacity` (at least one) refilled at `rate` per second.
    pub fn new(rate: f64, capacity: f64) -> Bucket {
        let capacity = capacity.max(1.0);
        Bucket { rate, capacity, state: Mutex::new((capacity, now_ms())) }
    }

    /// Gives back a token taken for something that did not go ahead.
    pub fn put_back(&self) {
        let mut s = self.state.lock().unwrap();
        s.0 = (s.0 + 1.0).min(self.capacity);
    }

    /// Takes a token, or says how long until one is there.
    pub fn take(&self, now_ms: i64) -> Result<(), Duration> {
        let mut s = self.state.lock().unwrap();
        let capacity = self.capacity;
        s.0 = (s.0 + (now_ms - s.1).max(0) as f64 / 1000.0 * self.rate).min(capacity);
        // Never back: a caller that read the clock before another took the lock would have
        // the time between credited again. But a clock stepped back (NTP, a restored VM) by
        // more than such a race is followed: kept, the bucket refilled nothing until the wall
        // clock came back to where it had been — every key and paced endpoint refused for as
        // long as the step.
        s.1 = if now_ms < s.1 - CLOCK_STEP_MS { now_ms } else { s.1.max(now_ms) };
        if s.0 >= 1.0 {
            s.0 -= 1.0;
            Ok(())
        } else {
            // Saturating: a rate too small to pace (a stored value from before it was
            // range-checked) defers for an hour rather than overflowing.
            Err(Duration::try_from_secs_f64(((1.0 - s.0) / self.rate).max(0.001)).unwrap_or(MAX_DEFER).min(MAX_DEFER))
        }
    }
}

/// The queue for an endpoint's slots, and the pace at which it has lately been served: slots
/// granted to queued deliveries over the time someone was queued. Whether to defer is judged
/// by this, not by attempts' latency (under CPU saturation a few slow attempts swing a
/// latency average, and a guess from it once deferred a third of an end-to-end run; latency
/// helps space the turns, [`Admission::turn`], and stands in only where no pace can be
/// measured: each slot slower than the patience, see [`Admission::admit`]), nor by
/// each waiter's own view (waiters' waits overlap, so a pause counts once per waiter, and the
/// first behind slots all taken together sees one slot in a whole latency while the endpoint
/// turns over all of them).
#[derive(Debug)]
struct Queue {
    /// Deliveries queued now.
    len: u32,
    /// Slots granted to queued deliveries lately, fading with age.
    granted: f64,
    /// Seconds someone was queued lately, fading the same way.
    busy: f64,
    at: tokio::time::Instant,
}

impl Queue {
    /// Brings the sums up to now: the time since the last change counts as busy when someone
    /// was queued, and older evidence fades.
    fn advance(&mut self) {
        let now = tokio::time::Instant::now();
        let elapsed = (now - self.at).as_secs_f64();
        let fade = (-elapsed / PACE_MEMORY.as_secs_f64()).exp();
        self.granted *= fade;
        // The busy time just passed, faded as if spread evenly over it.
        let busy_now = if self.len > 0 { PACE_MEMORY.as_secs_f64() * (1.0 - fade) } else { 0.0 };
        self.busy = self.busy * fade + busy_now;
        self.at = now;
    }

    /// Slots granted a second to queued deliveries, once at least `evidence` grants have been
    /// seen lately.
    fn per_second(&self, evidence: f64) -> Option<f64> {
        (self.granted >= evidence && self.busy > 0.0).then(|| self.granted / self.busy)
    }
}

/// A delivery's place in the queue for a slot, left when dropped (the slot taken, the
/// patience over, or the delivery cancelled).
struct Queued<'a> {
    queue: &'a Mutex<Queue>,
    /// Deliveries queued, this one included, when it joined.
    position: u32,
    /// The pace when it joined (see [`Queue::per_second`]).
    per_second: Option<f64>,
    granted: bool,
}

impl<'a> Queued<'a> {
    fn join(queue: &'a Mutex<Queue>, evidence: f64) -> Queued<'a> {
        let mut q = queue.lock().unwrap();
        q.advance();
        q.len += 1;
        Queued { queue, position: q.len, per_second: q.per_second(evidence), granted: false }
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let mut q = self.queue.lock().unwrap();
        q.advance();
        q.len -= 1;
        if self.granted {
            q.granted += 1.0;
        }
    }
}

/// What one failed attempt did to the endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Health {
    /// The breaker opened (or re-opened after a failed probe) with this pause.
    pub opened: Option<Duration>,
    /// The endpoint has now failed continuously for longer than `disable_after`.
    pub give_up: bool,
}

/// Load and health of one subscription's endpoint, as this process sees it.
#[derive(Debug)]
pub struct Admission {
    slots: Arc<Semaphore>,
    cap: u32,
    bucket: Option<Bucket>,
    /// Exponentially weighted mean of attempt latency, microseconds.
    latency_us: AtomicU64,
    /// When a slot was last taken or an attempt last completed: with every slot held, no
    /// movement for longer than [`PATIENCE`] means the endpoint stalled.
    last_progress_ms: AtomicI64,
    /// Deliveries queued for a slot, and the pace they are served at (the fast path needs no
    /// count: it finds a slot only when nobody is queued).
    queue: Mutex<Queue>,
    /// Until when (µs after `origin`) the endpoint's slots are promised to deliveries
    /// deferred for its pace ([`Admission::turn`]).
    turns_until_us: AtomicI64,
    /// The same for deliveries deferred for the rate limit: a token apart, each.
    rate_turns_until_us: AtomicI64,
    origin: tokio::time::Instant,
    failures: AtomicU32,
    failing_since_ms: AtomicI64,
    open_until_ms: AtomicI64,
    pause_ms: AtomicI64,
    /// When the breaker's probe went out (ms since the epoch), 0 while none is out.
    probing: AtomicI64,
    health: HealthConfig,
}

impl Admission {
    /// State for an endpoint with `max_in_flight` (or the default) slots and an optional
    /// rate limit in deliveries per second, both within their ranges.
    pub fn new(max_in_flight: Option<u32>, rate_limit: Option<f64>, health: HealthConfig) -> Self {
        let cap = range::clamp_u32(max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT), range::MAX_IN_FLIGHT);
        let rate_limit = rate_limit.map(|r| range::clamp_f64(r, range::RATE_LIMIT));
        Admission {
            slots: Arc::new(Semaphore::new(cap as usize)),
            cap,
            // A second's worth in a burst.
            bucket: rate_limit.map(|rate| Bucket::new(rate, rate)),
            latency_us: AtomicU64::new(0),
            last_progress_ms: AtomicI64::new(now_ms()),
            queue: Mutex::new(Queue { len: 0, granted: 0.0, busy: 0.0, at: tokio::time::Instant::now() }),
            turns_until_us: AtomicI64::new(0),
            rate_turns_until_us: AtomicI64::new(0),
            origin: tokio::time::Instant::now(),
            failures: AtomicU32::new(0),
            failing_since_ms: AtomicI64::new(0),
            open_until_ms: AtomicI64::new(0),
            pause_ms: AtomicI64::new(0),
            probing: AtomicI64::new(0),
            health,
        }
    }

    /// Mean latency of recent attempts.
    pub fn latency(&self) -> Duration {
        Duration::from_micros(self.latency_us.load(Ordering::Relaxed))
    }

    /// The endpoint's health as this process sees it now, for people (the API's `health`).
    pub fn health(&self) -> EndpointHealth {
        let now = now_ms();
        let until = self.open_until_ms.load(Ordering::Acquire);
        let breaker = match until {
            0 => Breaker::Closed,
            _ if now < until => Breaker::Open,
            _ => Breaker::HalfOpen,
        };
        EndpointHealth {
            breaker,
            in_flight: self.cap.saturating_sub(self.slots.available_permits().min(u32::MAX as usize) as u32),
            max_in_flight: self.cap,
            latency_ms: self.latency().as_secs_f64() * 1000.0,
            consecutive_failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Whether the breaker is open, or half-open with its probe out: what
    /// `herald_circuit_breakers_open` counts, so that an endpoint failing all along stays
    /// counted across its probes (a hanging one's takes its whole timeout). Not one whose
    /// pause is over with nothing probing (an idle or disabled subscription's, which no
    /// success will ever close).
    pub fn not_closed(&self) -> bool {
        self.open_until_ms.load(Ordering::Acquire) > now_ms() || self.probing.load(Ordering::Acquire) != 0
    }

    /// The breaker's verdict: go ahead (with the [`Probe`] when this attempt tests an endpoint
    /// whose pause is over), or how long to wait.
    fn breaker(&self, now: i64) -> Result<Probe<'_>, Busy> {
        self.breaker_seen(now, self.open_until_ms.load(Ordering::Acquire))
    }

    /// [`Self::breaker`] with the pause's end as read (`until`), which a failing probe may
    /// have moved on since.
    fn breaker_seen(&self, now: i64, until: i64) -> Result<Probe<'_>, Busy> {
        if until == 0 {
            return Ok(Probe::NONE);
        }
        if now < until {
            return Err(Busy::Open(Duration::from_millis((until - now) as u64)));
        }
        // Half-open: one probe at a time.
        match self.probing.compare_exchange(0, now.max(1), Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => {
                // The pause read may be over only because the probe before this one failed
                // and opened a new one between that read and this exchange: then this is no
                // probe.
                let now_until = self.open_until_ms.load(Ordering::Acquire);
                if now_until > now {
                    self.probing.store(0, Ordering::Release);
                    return Err(Busy::Open(Duration::from_millis((now_until - now) as u64)));
                }
                Ok(Probe(Some(&self.probing)))
            }
            Err(out_since) => {
                // As long again as the probe has been out (at least PROBE_WAIT, or the pause
                // if shorter; at most the longest pause): a probe that hangs for its timeout,
                // up to five minutes, had the endpoint's whole backlog appended again every
                // 5 s — sixty times a delivery; now a few times, and a probe that ends soon
                // still lets the backlog go on soon after.
                let pause = Duration::from_millis(self.pause_ms.load(Ordering::Relaxed).max(0) as u64);
                let out = Duration::from_millis((now - out_since).max(0) as u64);
                let longest = self.health.breaker_max_pause.0.max(PROBE_WAIT);
                Err(Busy::Open(out.max(pause.min(PROBE_WAIT)).min(longest)))
            }
        }
    }

    /// How long a delivery that finds no room waits before it is looked at again: twice what
    /// an attempt takes here — or, when no slot has come free for longer than that, twice how
    /// long it has been stalled (latency is learnt from attempts that end, so an endpoint that
    /// stops answering looked instant until its first timeout, and its backlog went round the
    /// shared 100 ms tier all that while).
    pub fn busy_wait(&self) -> Duration {
        let stalled = Duration::from_millis((now_ms() - self.last_progress_ms.load(Ordering::Relaxed)).max(0) as u64);
        (self.latency().max(stalled) * 2).clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Admits a delivery: breaker, rate limit, then an in-flight slot. Returns the slot and
    /// the breaker's probe when this attempt is one (a delivery not admitted is no probe: the
    /// probe is dropped with it, and the next delivery may probe).
    pub async fn admit(&self) -> Result<(OwnedSemaphorePermit, Probe<'_>), Busy> {
        let now = now_ms();
        let probe = self.breaker(now)?;
        if let Some(bucket) = &self.bucket {
            // A turn of its own, a token apart from every turn already promised (as for the
            // pace, `turn`): all deferred to the next token came back together, one took it
            // and the rest were deferred again, so a backlog of N behind a rate of r cost
            // about N²/2 appends over its N/r seconds. Promised no further ahead than the
            // pace's turns: a promise is written into the tier and cannot be taken back, so
            // a limit raised (or a delivery dead-lettered past its max_age after taking a
            // turn) would otherwise leave the backlog coming back at the old rate for an hour.
            bucket.take(now).map_err(|wait| {
                let apart =
                    Duration::try_from_secs_f64(1.0 / bucket.rate).unwrap_or(MAX_TURN_AHEAD).min(MAX_TURN_AHEAD);
                Busy::Rate(self.promise(&self.rate_turns_until_us, wait, apart, MAX_TURN_AHEAD))
            })?;
        }
        match self.slot(now).await {
            Ok(slot) => Ok((slot, probe)),
            Err(busy) => {
                // Not sent: its token is given back. Spent, a delivery deferred for a slot or
                // the pace took one each time, and the endpoint was sent less than either
                // limit allows while deliveries at their rate-limit turns found none.
                if let Some(bucket) = &self.bucket {
                    bucket.put_back();
                }
                Err(busy)
            }
        }
    }

    /// An in-flight slot for a delivery the breaker and the rate limit let through (`now`
    /// when they looked), or how long to wait.
    async fn slot(&self, now: i64) -> Result<OwnedSemaphorePermit, Busy> {
        let full = || Busy::Full(self.busy_wait());
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
            // A slot free with nobody queued: the endpoint is not behind, so turns promised
            // while it was no longer push the next deferral back. (Zero, not now: a turn is
            // never before now anyway, and the fast path reads no clock.)
            if self.turns_until_us.load(Ordering::Relaxed) != 0 {
                self.turns_until_us.store(0, Ordering::Relaxed);
            }
            return Ok(p);
        }
        if now - self.last_progress_ms.load(Ordering::Relaxed) >= PATIENCE.as_millis() as i64 {
            return Err(full());
        }
        // A slow endpoint sent more than it answers: a delivery that, at the pace queued ones
        // have lately been served, would not get a slot within its patience is deferred now,
        // rather than hold its slot of the partition's window for the whole patience and be
        // deferred then (the surplus would hold PATIENCE times its rate of the window, and
        // every other subscription there would wait for room). Two exceptions besides a
        // slot's worth of evidence. A slot's worth of queue always waits: it holds no more of
        // the window than the slots do, and its waits keep the pace up to date. And an
        // endpoint whose slots each turn over within
        // half the patience is left to the patience: that is a fast endpoint slowed by this
        // machine's own load (two saturated cores make a queue of hundreds look like 300 ms),
        // and deferring its backlog feeds on itself, each deferral an append and a read that
        // slow the pace further (without this condition, end-to-end runs deferred hundreds to
        // a thousand deliveries and ran slower: BENCHMARKS.md "Backlog").
        let mut queued = Queued::join(&self.queue, self.cap as f64);
        if queued.position > self.cap {
            let slow = |per_second: &f64| self.cap as f64 / per_second > PATIENCE.as_secs_f64() / 2.0;
            // With no pace measured, what the slots take by their latency when a slot turns
            // over (the latency over the slots) slower than the patience itself: then no queued
            // delivery is ever granted one within it, so no pace is ever measured, and a serial
            // receiver answering in 400 ms had its backlog deferred all together, back all
            // together, one sent and the rest deferred again — N²/2 appends of a shared tier
            // for N deliveries, its slot idle more than half the time. Not sooner: 64 slots at
            // a latency this machine's load swells to 300 ms turn over every 5 ms.
            let by_latency = || {
                let per_slot = self.latency().as_secs_f64() / self.cap as f64;
                (per_slot > PATIENCE.as_secs_f64()).then(|| 1.0 / per_slot)
            };
            let pace = match queued.per_second {
                Some(measured) => Some(measured).filter(slow),
                None => by_latency(),
            };
            if let Some(per_second) = pace {
                let wait = Duration::try_from_secs_f64(queued.position as f64 / per_second).unwrap_or(MAX_TURN_AHEAD);
                if wait > PATIENCE {
                    return Err(Busy::Pace(self.turn(wait, per_second)));
                }
            }
        }
        let slot = tokio::time::timeout(PATIENCE, self.slots.clone().acquire_owned()).await;
        queued.granted = matches!(slot, Ok(Ok(_)));
        drop(queued);
        match slot {
            Ok(Ok(p)) => {
                self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
                Ok(p)
            }
            _ => Err(full()),
        }
    }

    /// How long to defer a delivery that would wait `wait` for a slot: until a turn of its
    /// own, after every turn already promised, one grant of a slot apart. Deferred deliveries
    /// so come back about when the endpoint can take them, one by one; all deferred for the
    /// same short pause would come back together, find the slots as full, and be deferred
    /// again, an append and a read each for nothing (with a backlog for an endpoint at 50 ms,
    /// 110 deferrals a delivery).
    ///
    /// Turns are spaced at the measured pace (`per_second`), or at what the slots can take by
    /// their latency (the cap over the mean latency) when that is faster, up to a quarter
    /// faster. A backlog is deferred mostly in its first half second, while the pace has
    /// little evidence and swings with the first waves of slots; turns spaced at it alone
    /// left a 200 ms endpoint's slots a tenth idle for the whole drain (274–278 against 317
    /// deliveries/s), and the early estimates there ran 1–16 % below what the slots could
    /// take. An early turn only queues, or is deferred once more; a late one is time the
    /// endpoint never gets back. The quarter bounds the correction because the mean latency
    /// can say far more than the slots take: it leaves out the time a slot is held around the
    /// request (settling, an edge agent's link), and instant failures pull it towards zero;
    /// turns spaced at it alone would come back together and be deferred again.
    fn turn(&self, wait: Duration, per_second: f64) -> Duration {
        let by_latency = match self.latency().as_secs_f64() {
            latency if latency > 0.0 => self.cap as f64 / latency,
            _ => 0.0,
        };
        let per_second = per_second.max(by_latency.min(per_second * 1.25));
        let apart =
            Duration::try_from_secs_f64(1.0 / per_second.max(1e-3)).unwrap_or(MAX_TURN_AHEAD).min(MAX_TURN_AHEAD);
        self.promise(&self.turns_until_us, wait, apart, MAX_TURN_AHEAD)
    }

    /// The next turn on `turns_until_us`: no sooner than `wait` from now, `apart` after the
    /// last one promised, and no further than `horizon` (turns past it are all given it).
    fn promise(&self, turns_until_us: &AtomicI64, wait: Duration, apart: Duration, horizon: Duration) -> Duration {
        let now = self.origin.elapsed().as_micros() as i64;
        let (apart, horizon_us) = ((apart.as_micros() as i64).max(1), horizon.as_micros() as i64);
        let earliest = now + wait.min(horizon).as_micros() as i64;
        let promised = turns_until_us
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |until| {
                Some((until.max(earliest) + apart).min(now + horizon_us))
            })
            .unwrap_or_else(|until| until);
        Duration::from_micros((promised.max(earliest) - now) as u64).min(horizon)
    }

    /// Records an attempt's latency.
    pub fn observe(&self, latency: Duration) {
        self.last_progress_ms.store(now_ms(), Ordering::Relaxed);
        let sample = latency.as_micros().min(u64::MAX as u128) as u64;
        let _ = self.latency_us.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
            Some(if old == 0 { sample } else { old - old / 8 + sample / 8 })
        });
    }

    /// A successful attempt: the breaker closes and the failure clock stops. (The probe, if
    /// this was one, ends only after: the next delivery sees the breaker closed.)
    pub fn succeeded(&self, probe: Probe<'_>) {
        self.failures.store(0, Ordering::Relaxed);
        self.failing_since_ms.store(0, Ordering::Relaxed);
        if self.open_until_ms.swap(0, Ordering::AcqRel) != 0 {
            self.pause_ms.store(0, Ordering::Relaxed);
        }
        drop(probe);
    }

    /// A failed attempt: counts towards opening the breaker and towards giving up. (A failed
    /// probe opens it again for longer, before the probe ends.)
    pub fn failed(&self, probe: Probe<'_>) -> Health {
        let now = now_ms();
        // When failing began: now, or what an earlier failure set. Read from the exchange
        // itself — a success on another thread may clear it right after, and a second read
        // would then see 0, "failing since 1970", and give a flaky endpoint up.
        let since = match self.failing_since_ms.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => now,
            Err(earlier) => earlier,
        };
        let disable_after = self.health.disable_after.0;
        let give_up = !disable_after.is_zero() && now - since >= disable_after.as_millis() as i64;
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let mut opened = None;
        if probe.is_probe()
            || (failures >= self.health.breaker_failures && self.open_until_ms.load(Ordering::Acquire) == 0)
        {
            let first = self.health.breaker_pause.0.as_millis() as i64;
            let max = self.health.breaker_max_pause.0.as_millis() as i64;
            let pause = match self.pause_ms.load(Ordering::Relaxed) {
                0 => first,
                p => (p * 2).min(max),
            };
            self.pause_ms.store(pause, Ordering::Relaxed);
            self.open_until_ms.store(now + pause, Ordering::Release);
            opened = Some(Duration::from_millis(pause as u64));
        }
        drop(probe);
        Health { opened, give_up }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HumanDuration;

    fn health(failures: u32, pause_ms: u64) -> HealthConfig {
        HealthConfig {
            breaker_failures: failures,
            breaker_pause: HumanDuration(Duration::from_millis(pause_ms)),
            breaker_max_pause: HumanDuration(Duration::from_millis(pause_ms * 4)),
            disable_after: HumanDuration(Duration::ZERO),
        }
    }

    /// Callers read the clock before taking the bucket's lock, so one may come with a time
    /// older than the last refill: that must not move the refill back and credit the same
    /// time twice.
    #[test]
    fn a_take_with_an_older_time_credits_no_time_twice() {
        let b = Bucket::new(1.0, 5.0);
        let t = now_ms() + 10_000;
        for _ in 0..5 {
            assert!(b.take(t).is_ok(), "full at first");
        }
        assert!(b.take(t - 1000).is_err(), "an older time finds it empty");
        // A second after `t`, one token has come, not two.
        assert!(b.take(t + 1000).is_ok());
        assert!(b.take(t + 1000).is_err(), "the second before `t` was credited twice");
    }

    /// The clock stepped back an hour: the bucket goes on refilling from the new time, rather
    /// than refusing everything until the clock is back where it was.
    #[test]
    fn a_clock_stepped_back_does_not_freeze_the_bucket() {
        let b = Bucket::new(1.0, 1.0);
        let t = now_ms();
        assert!(b.take(t).is_ok());
        let stepped = t - 3_600_000;
        assert!(b.take(stepped).is_err(), "no token yet: none was credited for the step");
        assert!(b.take(stepped + 2_000).is_ok(), "two seconds on, a token has come");
    }

    /// A success on another thread between a failure marking when failing began and reading
    /// it back must not make the failure read "failing since 1970" and give the endpoint up.
    #[test]
    fn a_success_racing_a_failure_never_gives_a_flaky_endpoint_up() {
        let e = Arc::new(Admission::new(None, None, HealthConfig::default()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let succeeding = {
            let (e, stop) = (e.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    e.succeeded(Probe::NONE);
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut gave_up = 0;
        while std::time::Instant::now() < deadline {
            for _ in 0..1000 {
                gave_up += usize::from(e.failed(Probe::NONE).give_up);
            }
        }
        stop.store(true, Ordering::Relaxed);
        succeeding.join().unwrap();
        assert_eq!(gave_up, 0, "an endpoint failing for microseconds was given up (disable_after is 5 days)");
    }

    #[tokio::test]
    async fn admits_up_to_the_cap_then_queues_until_patience_runs_out() {
        let e = Admission::new(Some(2), None, HealthConfig::default());
        e.observe(Duration::from_millis(10));
        let (a, _) = e.admit().await.unwrap();
        let _b = e.admit().await.unwrap();
        let freed = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(a);
        };
        let (third, ()) = tokio::join!(e.admit(), freed);
        assert!(third.is_ok());
        // With every slot taken and nothing freeing, a waiter gives up after its patience...
        let started = std::time::Instant::now();
        let busy = e.admit().await.unwrap_err();
        assert!(started.elapsed() >= PATIENCE);
        // (Back after twice how long nothing has come free: its latency, 10 ms, says nothing
        // about an endpoint that has stopped answering.)
        let Busy::Full(back) = busy else { panic!("{busy:?}") };
        assert!((PATIENCE * 2..Duration::from_secs(1)).contains(&back), "{back:?}");
        // ...and once nothing has moved for that long, the endpoint counts as stalled.
        let started = std::time::Instant::now();
        assert!(e.admit().await.is_err());
        // (Without waiting out its patience again: bounded by it, not by a guess at how
        // loaded the machine running the test is.)
        assert!(started.elapsed() < PATIENCE);
    }

    impl Admission {
        fn queued(&self) -> u32 {
            self.queue.lock().unwrap().len
        }
    }

    /// Spawns a delivery that queues for a slot, and waits until it has. It resolves to the
    /// slot, if it got one.
    async fn queue_one(e: &Arc<Admission>) -> tokio::task::JoinHandle<Option<OwnedSemaphorePermit>> {
        let before = e.queued();
        let waiter = tokio::spawn({
            let e = e.clone();
            async move { e.admit().await.ok().map(|(slot, _)| slot) }
        });
        for _ in 0..100_000 {
            if e.queued() != before || waiter.is_finished() {
                return waiter;
            }
            tokio::task::yield_now().await;
        }
        panic!("the delivery never queued");
    }

    // Paused: waits are exactly what the test says, however loaded the machine is.
    #[tokio::test(start_paused = true)]
    async fn a_delivery_that_would_wait_past_its_patience_at_the_pace_queued_ones_were_served_is_deferred_at_once() {
        // Whether to defer is judged by waits measured in the queue, not by latency (here 5 s:
        // two slots of it would take 0.4 a second, far below the pace, so it spaces nothing).
        // The next comes one grant at that pace (about 100 ms) after the first, not with it.
        let apart = turns_apart_with_latency(Duration::from_secs(5)).await;
        assert!(apart > Duration::from_millis(97) && apart < Duration::from_millis(101), "{apart:?}");
    }

    // The pace decides whether to defer; the turns are spaced at what the slots can take by
    // their latency when that is faster (a young pace runs low: turns spaced at it alone left
    // a slow endpoint's slots idle through a whole backlog), but at most a quarter faster.
    #[tokio::test(start_paused = true)]
    async fn turns_are_spaced_at_the_slots_latency_when_that_is_faster_than_the_pace_by_up_to_a_quarter() {
        // Two slots of 180 ms: 11.1 a second, a tenth above the pace: 90 ms apart, not 100.
        let apart = turns_apart_with_latency(Duration::from_millis(180)).await;
        assert!(apart > Duration::from_millis(89) && apart < Duration::from_millis(91), "{apart:?}");
        // Two slots of 10 ms would be 200 a second, twenty times the pace: held to a quarter
        // above it (80 ms apart), not 5 ms.
        let apart = turns_apart_with_latency(Duration::from_millis(10)).await;
        assert!(apart > Duration::from_millis(78) && apart < Duration::from_millis(81), "{apart:?}");
    }

    /// With attempts' mean latency at `latency` and the queue served ten a second, two more
    /// deliveries: the first, third in the queue, would wait about 300 ms, so it is deferred
    /// at once for its turn, and so is the next. How far apart their turns are.
    async fn turns_apart_with_latency(latency: Duration) -> Duration {
        let e = Arc::new(Admission::new(Some(2), None, HealthConfig::default()));
        e.observe(latency);
        let _held = served_ten_a_second(&e).await;
        let started = tokio::time::Instant::now();
        let Busy::Pace(turn) = e.admit().await.unwrap_err() else { panic!("deferred for the pace") };
        assert_eq!(started.elapsed(), Duration::ZERO, "deferred without waiting");
        assert!(turn > Duration::from_millis(280) && turn < Duration::from_millis(310), "{turn:?}");
        let Busy::Pace(next) = e.admit().await.unwrap_err() else { panic!("deferred for the pace") };
        next.saturating_sub(turn)
    }

    /// Two slots served ten a second to queued deliveries (three granted over 300 ms), then
    /// both taken and a slot's worth queued behind them. The slots it returns must be held
    /// for the queue to stay as it is.
    #[must_use]
    async fn served_ten_a_second(e: &Arc<Admission>) -> impl Sized {
        let (first, _) = e.admit().await.unwrap();
        let (second, _) = e.admit().await.unwrap();
        // No evidence yet: two queue at once, a third 100 ms later, and a slot is freed every
        // 100 ms.
        let [one, two] = [queue_one(e).await, queue_one(e).await];
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(first);
        let one = one.await.unwrap().expect("the first queued got the first slot freed");
        let late = queue_one(e).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(second);
        let two = two.await.unwrap().expect("the second queued got the second");
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(one);
        let three = late.await.unwrap().expect("the third got the third");
        // Three slots granted in 300 ms with someone queued: ten a second. A slot's worth
        // still queues (two here)...
        let queued = [queue_one(e).await, queue_one(e).await];
        assert_eq!(e.queued(), 2);
        (two, three, queued)
    }

    // An endpoint whose every slot takes 1.6 s to turn over (eight, one freed every 200 ms):
    // a slot's worth of evidence takes longer than a second to gather, and is kept.
    #[tokio::test(start_paused = true)]
    async fn a_very_slow_endpoints_pace_is_measured_too() {
        let e = Arc::new(Admission::new(Some(8), None, HealthConfig::default()));
        let mut held = Vec::new();
        for _ in 0..8 {
            held.push(e.admit().await.unwrap().0);
        }
        for _ in 0..10 {
            let waiter = queue_one(&e).await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(held.remove(0));
            held.push(waiter.await.unwrap().expect("the queued delivery got the freed slot"));
        }
        // Five a second: a slot's worth queues, the ninth (1.8 s away) is deferred at once.
        let _queued: Vec<_> = futures::future::join_all((0..8).map(|_| queue_one(&e))).await;
        assert_eq!(e.queued(), 8);
        let started = tokio::time::Instant::now();
        let Busy::Pace(turn) = e.admit().await.unwrap_err() else { panic!("deferred for the pace") };
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(turn > Duration::from_millis(1700) && turn < Duration::from_millis(1900), "{turn:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_endpoints_queue_is_joined_not_deferred_even_when_long() {
        let e = Arc::new(Admission::new(Some(2), None, HealthConfig::default()));
        e.observe(Duration::from_secs(5));
        let mut held: Vec<_> = vec![e.admit().await.unwrap(), e.admit().await.unwrap()];
        // Slots freed every 10 ms: a hundred a second.
        for _ in 0..5 {
            let waiter = queue_one(&e).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(held.remove(0));
            assert!(waiter.await.unwrap().is_some());
            held.push(e.admit().await.unwrap());
        }
        // Forty queued: about 400 ms at that pace, past the patience, but a slot turns over
        // every 20 ms: a fast endpoint, behind only for now. All wait.
        let queue: Vec<_> = futures::future::join_all((0..40).map(|_| queue_one(&e))).await;
        assert_eq!(e.queued(), 40);
        drop(held);
        for waiter in queue {
            assert!(waiter.await.unwrap().is_some(), "every queued delivery got a slot");
        }
    }

    /// With no pace measured yet, a queue is deferred by the slots' latency only when a slot
    /// turns over slower than the patience: 64 slots at a latency swollen to 300 ms by this
    /// machine's load turn over every 5 ms, and their queue waits; one slot at 400 ms does not.
    #[tokio::test(start_paused = true)]
    async fn without_a_pace_only_slots_slower_than_the_patience_defer_by_latency() {
        let fast = Arc::new(Admission::new(Some(64), None, HealthConfig::default()));
        fast.observe(Duration::from_millis(300));
        let _held: Vec<_> = futures::future::join_all((0..64).map(|_| fast.admit())).await;
        let queue: Vec<_> = futures::future::join_all((0..8).map(|_| queue_one(&fast))).await;
        assert_eq!(fast.queued(), 8, "queued, not deferred");
        drop(queue);
        let serial = Arc::new(Admission::new(Some(1), None, HealthConfig::default()));
        serial.observe(Duration::from_millis(400));
        let _held = serial.admit().await.unwrap();
        let _first = queue_one(&serial).await; // a slot's worth of queue always waits
        assert!(matches!(serial.admit().await, Err(Busy::Pace(_))), "deferred to a turn at once");
    }

    #[tokio::test]
    async fn health_shows_the_breaker_the_slots_taken_and_the_failures() {
        let e = Admission::new(Some(4), None, health(2, 10_000));
        let (slot, probe) = e.admit().await.unwrap();
        let h = e.health();
        assert_eq!((h.breaker, h.in_flight, h.max_in_flight, h.consecutive_failures), (Breaker::Closed, 1, 4, 0));
        e.failed(probe);
        e.failed(Probe::NONE);
        drop(slot);
        let h = e.health();
        assert_eq!((h.breaker, h.in_flight, h.consecutive_failures), (Breaker::Open, 0, 2));
    }

    #[tokio::test]
    async fn the_breaker_opens_after_consecutive_failures_probes_once_and_backs_off() {
        let e = Admission::new(None, None, health(3, 40));
        for _ in 0..2 {
            let (_slot, probe) = e.admit().await.unwrap();
            assert_eq!(e.failed(probe).opened, None);
        }
        let (_slot, probe) = e.admit().await.unwrap();
        assert_eq!(e.failed(probe).opened, Some(Duration::from_millis(40)));
        assert!(matches!(e.admit().await, Err(Busy::Open(_))));
        tokio::time::sleep(Duration::from_millis(45)).await;
        // Half-open: exactly one probe goes through.
        let (_probe_slot, probe) = e.admit().await.unwrap();
        assert!(probe.is_probe());
        assert!(matches!(e.admit().await, Err(Busy::Open(_))));
        // Counted as not closed while its probe is out (a hanging endpoint's probe takes its
        // whole timeout: counted only while paused, it left the gauge at 0 that long each
        // cycle, and an alert held for 15 minutes never fired).
        assert!(e.not_closed());
        // The probe fails: open again, for twice as long.
        assert_eq!(e.failed(probe).opened, Some(Duration::from_millis(80)));
        tokio::time::sleep(Duration::from_millis(85)).await;
        let (_slot, probe) = e.admit().await.unwrap();
        assert!(probe.is_probe());
        e.succeeded(probe);
        assert!(!e.not_closed());
        let (_slot, probe) = e.admit().await.unwrap();
        assert!(!probe.is_probe());
        // Open again, then left: past its pause with no probe, it is not counted for good.
        let e = Admission::new(None, None, health(1, 20));
        let (_slot, probe) = e.admit().await.unwrap();
        e.failed(probe);
        assert!(e.not_closed());
        tokio::time::sleep(Duration::from_millis(25)).await;
        assert!(!e.not_closed(), "nothing probing: an idle or disabled endpoint's pause is over");
    }

    /// A delivery that read the pause as over just before a failing probe opened a new one, and
    /// took the probe flag just after that probe let it go, is no probe: the breaker has just
    /// opened again (two probes in one pause doubled the pause twice).
    #[tokio::test]
    async fn a_pause_read_before_a_failing_probe_reopened_the_breaker_lets_no_second_probe() {
        let e = Admission::new(None, None, health(1, 40));
        let (_slot, probe) = e.admit().await.unwrap();
        assert!(e.failed(probe).opened.is_some());
        tokio::time::sleep(Duration::from_millis(45)).await;
        let now = now_ms();
        let stale = e.open_until_ms.load(Ordering::Acquire); // read as over by a second delivery...
        let (_probe_slot, probe) = e.admit().await.unwrap();
        assert!(probe.is_probe());
        e.failed(probe); // ...while the probe fails and opens the breaker again
        assert!(matches!(e.breaker_seen(now, stale), Err(Busy::Open(_))), "a second probe in the new pause");
        assert_eq!(e.probing.load(Ordering::Acquire), 0, "and the flag is left free");
    }

    /// While a probe is out, the others wait as long again as it has been out (at least 5 s,
    /// at most the longest pause): a probe hanging for its timeout, up to five minutes, had the
    /// endpoint's whole backlog deferred, and appended again, every 5 s — sixty times each.
    #[tokio::test]
    async fn while_a_probe_hangs_the_others_wait_as_long_again_as_it_has_been_out() {
        let mut config = health(1, 20);
        config.breaker_max_pause = Duration::from_secs(600).into();
        let e = Admission::new(None, None, config);
        let (_slot, probe) = e.admit().await.unwrap();
        assert!(e.failed(probe).opened.is_some());
        tokio::time::sleep(Duration::from_millis(25)).await;
        let (_probe_slot, probe) = e.admit().await.unwrap();
        assert!(probe.is_probe());
        assert!(matches!(e.admit().await, Err(Busy::Open(d)) if d <= PROBE_WAIT), "just out: the least wait");
        // The probe has been out a minute (its start moved back, as a hanging attempt's is).
        e.probing.store(now_ms() - 60_000, Ordering::Release);
        match e.admit().await {
            Err(Busy::Open(d)) => assert!(d >= Duration::from_secs(59) && d <= Duration::from_secs(61), "{d:?}"),
            other => panic!("{:?}", other.map(|_| ())),
        }
        // Never past the longest pause.
        e.probing.store(now_ms() - 3_600_000, Ordering::Release);
        assert!(matches!(e.admit().await, Err(Busy::Open(d)) if d == Duration::from_secs(600)));
        drop(probe);
        assert!(e.admit().await.unwrap().1.is_probe(), "once it ends, the next delivery probes");
    }

    // An attempt that panics, or whose partition stops while it is out, is dropped unsettled:
    // if it was the probe, the next delivery probes, rather than every delivery after it
    // being deferred for good as if the probe were still out.
    #[tokio::test]
    async fn a_probe_dropped_unsettled_lets_the_next_delivery_probe() {
        let e = Admission::new(None, None, health(1, 20));
        let (_slot, probe) = e.admit().await.unwrap();
        assert!(e.failed(probe).opened.is_some());
        tokio::time::sleep(Duration::from_millis(25)).await;
        let probe = e.admit().await;
        assert!(probe.is_ok(), "half-open: a probe goes through");
        assert!(matches!(e.admit().await, Err(Busy::Open(_))), "one probe at a time");
        drop(probe);
        let next = e.admit().await;
        assert!(next.is_ok(), "the probe was dropped: the next delivery probes");
        assert!(next.unwrap().1.is_probe());
    }

    /// A delivery deferred for want of a slot is not sent: its rate-limit token is given
    /// back. Spent, a subscription with both limits was sent less than either allows.
    #[tokio::test]
    async fn a_delivery_deferred_for_a_slot_gives_its_token_back() {
        let e = Admission::new(Some(1), Some(4.0), HealthConfig::default());
        let (held, _) = e.admit().await.unwrap(); // one token, the only slot
        for _ in 0..3 {
            assert!(matches!(e.admit().await, Err(Busy::Full(_))), "no slot");
        }
        drop(held);
        // The three deferred spent nothing: the bucket's other three tokens are there.
        for i in 0..3 {
            let (slot, _) = e.admit().await.unwrap_or_else(|b| panic!("token {i} spent by a deferral: {b:?}"));
            drop(slot);
        }
    }

    #[tokio::test]
    async fn the_rate_limit_hands_out_a_second_of_tokens_then_paces() {
        let e = Admission::new(None, Some(10.0), HealthConfig::default());
        let mut admitted = Vec::new();
        for _ in 0..10 {
            admitted.push(e.admit().await.unwrap());
        }
        let next = e.admit().await;
        match next {
            Err(Busy::Rate(wait)) => assert!(wait <= Duration::from_millis(100)),
            other => panic!("rate limited expected, got {:?}", other.map(|(_, p)| p)),
        }
    }

    #[tokio::test]
    async fn deliveries_deferred_for_the_rate_get_turns_a_token_apart() {
        // A backlog behind a rate limit: each deferred delivery comes back at a turn of its
        // own, one token apart, not all at the next token (where all but one were deferred
        // again: an append each, a backlog of N cost about N²/2 appends to drain).
        let e = Admission::new(None, Some(10.0), HealthConfig::default());
        let mut held = Vec::new();
        for _ in 0..10 {
            held.push(e.admit().await.unwrap());
        }
        let mut waits = Vec::new();
        for _ in 0..50 {
            match e.admit().await {
                Err(Busy::Rate(wait)) => waits.push(wait),
                other => panic!("rate limited expected, got {:?}", other.map(|(_, p)| p)),
            }
        }
        for pair in waits.windows(2) {
            let apart = pair[1].saturating_sub(pair[0]);
            assert!(apart >= Duration::from_millis(95) && apart <= Duration::from_millis(105), "{waits:?}");
        }
        assert!(waits[49] >= Duration::from_millis(4900), "{waits:?}");
        // Never promised further ahead than the pace's turns: a promise cannot be taken back,
        // and a limit raised meanwhile should reach the backlog within a minute.
        let mut last = Duration::ZERO;
        for _ in 0..1000 {
            let Err(Busy::Rate(wait)) = e.admit().await else { panic!("rate limited expected") };
            last = wait;
        }
        assert!(last <= MAX_TURN_AHEAD && last >= MAX_TURN_AHEAD - Duration::from_millis(200), "{last:?}");
    }

    #[test]
    fn continuous_failure_past_disable_after_gives_up() {
        let mut h = health(1000, 10);
        h.disable_after = HumanDuration(Duration::from_millis(30));
        let e = Admission::new(None, None, h);
        assert!(!e.failed(Probe::NONE).give_up);
        std::thread::sleep(Duration::from_millis(35));
        assert!(e.failed(Probe::NONE).give_up);
        e.succeeded(Probe::NONE);
        assert!(!e.failed(Probe::NONE).give_up, "a success restarts the clock");
    }
}
