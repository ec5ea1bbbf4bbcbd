//! Ingest: validate published events, fan each out to the matching subscriptions, and
//! append one delivery record per match, durably, before the producer is answered. The
//! producer's JSON is put in JavaScript's form here, once (`canonical`), so every attempt
//! after shares the stored bytes.

mod budget;
mod keys;

pub use budget::{Budget, Over};

use crate::canonical;
use crate::history::{EventRecord, HistoryRecord, Recorder, StateRecord};
use crate::log::{Log, LogError, Record};
use crate::model::{new_id, now_ms, Delivery, EventInput, Invalid, PayloadFormat};
use crate::registry::{validate_tenant, Registry};
use crate::target::Target;
use bytes::Bytes;
use keys::Keyed;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// An event that passed validation.
#[derive(Debug, Clone)]
pub struct Event {
    /// Id: the producer's (its idempotency key) or generated; becomes `webhook-id`.
    pub id: String,
    /// Type: what subscriptions match on.
    pub event_type: String,
    /// Tenant: only its subscriptions receive it.
    pub tenant: String,
    /// `data`, in both forms: subscriptions choose one.
    pub data: Json,
    /// `changes`, in both forms, when given.
    pub changes: Option<Json>,
    /// Whether the producer gave the id (only those are checked for repeats).
    pub id_given: bool,
    /// The producer's trace context (`traceparent`), kept with every delivery.
    pub trace: Option<crate::model::TraceContext>,
    /// The producer's ordering key, for subscriptions that keep order per key.
    pub ordering_key: Option<String>,
}

impl Event {
    /// What makes a repeat of this event the same event: its type, `data` and `changes` as
    /// documents — objects' members in any order (a producer's retry re-serialized from a hash
    /// map, whose order changes, is the same event), numbers as JavaScript reads them (their
    /// JavaScript form) — and its ordering key. Not its trace context, which a retry may give
    /// anew. Read from the JavaScript form as it stands ([`canonical::digest`]): parsed into a
    /// `serde_json::Value`, data a `Value` cannot hold (an integer past 2^64, a lone
    /// surrogate, deep nesting) read as nothing, so another event under a used id was taken
    /// for a repeat — and a megabyte of small objects took a hundred in memory.
    fn digest(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let form = |j: &Json| canonical::digest(&j.canonical).ok_or_else(|| j.canonical.clone());
        let mut h = std::hash::DefaultHasher::new();
        self.event_type.hash(&mut h);
        form(&self.data).hash(&mut h);
        self.changes.as_ref().map(form).hash(&mut h);
        self.ordering_key.hash(&mut h);
        h.finish()
    }
}

/// One request's deliveries, by the topic they go to.
#[derive(Default)]
struct Deliveries {
    plain: Vec<Record>,
    /// Ordered subscriptions' (their keys' sequencers read them).
    ordered: Vec<Record>,
}

impl Deliveries {
    fn push(&mut self, record: Record, ordered: bool) {
        if ordered { &mut self.ordered } else { &mut self.plain }.push(record);
    }

    fn len(&self) -> usize {
        self.plain.len() + self.ordered.len()
    }
}

/// The log record of `delivery` to `target`, with the event's `data` and `changes` in the
/// form the subscription's payload carries: the one place deliveries are made, for fresh
/// events and resent ones alike.
fn delivery_record(target: &Target, delivery: Delivery, data: &Json, changes: Option<&Json>) -> Record {
    let format = target.sub.spec.payload;
    let as_sent = !format.canonical() && (!data.same_forms() || changes.is_some_and(|c| !c.same_forms()));
    let delivery = Delivery {
        data: data.for_payload(format),
        changes: changes.map(|c| c.for_payload(format)),
        as_sent,
        ..delivery
    };
    Record { key: Bytes::copy_from_slice(target.sub.id.as_bytes()), value: delivery.encode() }
}

/// A JSON value of the producer's, as sent and in JavaScript's form (the same buffer when the
/// two are equal, as they are for compact producers).
#[derive(Debug, Clone)]
pub struct Json {
    /// The bytes as sent.
    pub sent: Bytes,
    /// `JSON.stringify(JSON.parse(sent))`.
    pub canonical: Bytes,
}

impl Json {
    /// Both forms of `text`; fails for JSON that JavaScript would change the meaning of.
    pub fn new(text: &str) -> Result<Json, canonical::CanonicalError> {
        let canonical = canonical::canonical(text.as_bytes())?;
        let sent =
            if canonical == text.as_bytes() { canonical.clone() } else { Bytes::copy_from_slice(text.as_bytes()) };
        Ok(Json { sent, canonical })
    }

    /// The form a subscription's payload carries.
    pub fn for_payload(&self, format: PayloadFormat) -> Bytes {
        self.form(format).clone()
    }

    /// Whether the bytes as sent are JavaScript's form already (a compact producer's: then
    /// one buffer, see [`Json::new`]; compared only if two).
    fn same_forms(&self) -> bool {
        (self.sent.as_ptr() == self.canonical.as_ptr() && self.sent.len() == self.canonical.len())
            || self.sent == self.canonical
    }

    fn form(&self, format: PayloadFormat) -> &Bytes {
        if format.canonical() {
            &self.canonical
        } else {
            &self.sent
        }
    }
}

/// Bytes of `data` and `changes` a record for `target` carries (its payload's form of each):
/// what the fan-out quota counts, at publish and at resend alike.
fn payload_bytes(target: &Target, data: &Json, changes: Option<&Json>) -> usize {
    let format = target.sub.spec.payload;
    data.form(format).len() + changes.map_or(0, |c| c.form(format).len())
}

/// What was accepted for one event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Accepted {
    /// Event id.
    pub id: String,
    /// Deliveries appended for it.
    pub deliveries: usize,
}

fn field(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Why an event was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// A field is not valid.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The log could not take the deliveries. Some may be written all the same (on Kafka each
    /// record succeeds or fails on its own; plain and ordered ones are two appends): the ids
    /// are not remembered, so a retry with the same ids writes them all, and receivers drop
    /// the repeats by `webhook-id`.
    #[error(transparent)]
    Log(LogError),
    /// The request would fan out to more bytes than `quotas.fanout_bytes`.
    #[error("this request fans out to {bytes} bytes of deliveries; the limit is quotas.fanout_bytes = {max}")]
    FanOut {
        /// What it would fan out to.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The deliveries being written already fill a share (the tenant's or everyone's), and
    /// did not drain within [`budget::WAIT`].
    #[error("{}", busy_message(.0))]
    Busy(Over),
    /// The event (the `index`th of the request) has an id accepted within
    /// [`IDEMPOTENCY_WINDOW`] for another event (type, data, changes or ordering key).
    #[error("an event with this id was accepted in the last {} minutes with another type, data, changes or ordering key; \
             it was not sent again and nothing of this request was accepted: give each event an id of its own",
             IDEMPOTENCY_WINDOW.as_secs() / 60)]
    IdReused {
        /// Its place in the request.
        index: usize,
    },
    /// A subscription of the event's tenant cannot be read by this process (its record was
    /// written by a newer version, or its secret sealed with a key this process lacks): what
    /// the event would be fanned out to is not known, and accepting it would drop that
    /// subscription's delivery unsaid.
    #[error(
        "subscription {subscription} of this tenant cannot be read by this process (written by a newer Herald, \
             or its secret sealed with a key this process lacks), so what the events would go to is not known; nothing \
             of this request was accepted: send it again once the process can read it (upgraded, or given the key), \
             through one that can, or after deleting that subscription"
    )]
    Unreadable {
        /// The subscription.
        subscription: String,
    },
    /// The event is larger than `ingest.max_event_bytes`.
    #[error("{field}: the event's data and changes are {bytes} bytes (as sent, or as delivered); the limit is ingest.max_event_bytes = {max}")]
    TooLarge {
        /// The event's `data` field, as a path in the request.
        field: String,
        /// Its size.
        bytes: usize,
        /// The limit.
        max: usize,
    },
}

fn busy_message(over: &Over) -> String {
    match over {
        Over::Tenant { max } => format!(
            "this tenant's publishes have {max} bytes of deliveries being written (quotas.pending_bytes); \
             nothing of this request was accepted: send it again once they are written"
        ),
        Over::All { max } => format!(
            "Herald has {max} bytes of deliveries being written (ingest.pending_bytes); \
             nothing of this request was accepted: send it again later"
        ),
    }
}

/// Validates one event; `prefix` names its place in a batch (e.g. `[3]`), `tenant` is used
/// when the event names none, and `data` with `changes` may be at most `max_bytes`.
pub fn validate(input: EventInput, prefix: &str, default_tenant: &str, max_bytes: usize) -> Result<Event, Refusal> {
    // The field named is `data` if it is too large alone, else `changes`, which adds the rest.
    let too_large = |data: usize, changes: usize| {
        let name = if data > max_bytes || changes == 0 { "data" } else { "changes" };
        Refusal::TooLarge { field: field(prefix, name), bytes: data + changes, max: max_bytes }
    };
    let (data_bytes, changes_bytes) = (input.data.get().len(), input.changes.as_ref().map_or(0, |c| c.get().len()));
    if data_bytes + changes_bytes > max_bytes {
        return Err(too_large(data_bytes, changes_bytes));
    }
    let bad = |name: &str, message: &str| Invalid { field: field(prefix, name), message: message.to_string() };
    let event_type = input.event_type;
    crate::model::check_event_type(&event_type).map_err(|e| bad("type", e))?;
    let id_given = input.id.is_some();
    let id = match input.id {
        Some(id) => {
            crate::model::check_event_id(&id)
                .and_then(|_| crate::model::named_in_a_url(&id))
                .map_err(|e| bad("id", e))?;
            id
        }
        None => new_id("evt"),
    };
    let tenant = input.tenant.unwrap_or_else(|| default_tenant.to_string());
    validate_tenant(&tenant).map_err(|e| bad("tenant", &e.message))?;
    let json = |name: &str, text: &str| Json::new(text).map_err(|e| Refusal::from(bad(name, &e.to_string())));
    let data = json("data", input.data.get())?;
    let changes = input.changes.map(|c| json("changes", c.get())).transpose()?;
    // And in the form delivered, which may be longer (`1e20` is written out in full): every
    // record stays within the log's record limit, so none is refused after others were written.
    let (data_bytes, changes_bytes) = (data.canonical.len(), changes.as_ref().map_or(0, |c| c.canonical.len()));
    if data_bytes + changes_bytes > max_bytes {
        return Err(too_large(data_bytes, changes_bytes));
    }
    let trace = input
        .traceparent
        .map(|tp| crate::model::TraceContext::parse(&tp, input.tracestate.as_deref()))
        .transpose()
        .map_err(|(name, message)| bad(name, message))?;
    let ordering_key = input.ordering_key;
    if let Some(key) = &ordering_key {
        crate::model::check_ordering_key(key).map_err(|e| bad("ordering_key", e))?;
    }
    Ok(Event { id, event_type, tenant, data, changes, id_given, trace, ordering_key })
}

/// How long an accepted event id is remembered at least (unless its tenant publishes more
/// than [`GENERATION`] ids in it), so a producer's retry is not published twice.
pub const IDEMPOTENCY_WINDOW: std::time::Duration = std::time::Duration::from_secs(600);

/// Most event ids remembered at once, of all tenants.
const IDEMPOTENCY_CAPACITY: usize = 200_000;

/// The next accepted event's place ([`EventRecord::seq`]): what orders a batch's events, which
/// share their millisecond, when they are sent again.
static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// Most ids one generation of a tenant's holds before it is retired: a tenant alone keeps
/// its latest this many at least.
const GENERATION: usize = IDEMPOTENCY_CAPACITY / 2;

/// Ids a tenant's first generation holds (it grows in place up to this many: a small table's
/// regrowth is cheap); each later one it fills before the window ends is made, up front, for
/// twice as many as the one before, up to [`GENERATION`].
const FIRST_GENERATION: usize = 1024;

/// An event id (per tenant) seen recently: being appended by a request now, or accepted with
/// this many deliveries, its content's [`Event::digest`] being `digest`.
enum Seen {
    Pending(watch::Receiver<Option<usize>>),
    Done { deliveries: usize, digest: u64 },
}

/// A (tenant, event id) pair.
type Key = (String, String);

/// One generation of a tenant's remembered ids, by event id.
type Ids = HashMap<String, Seen>;

/// One tenant's remembered ids, in generations: ids go into the current one; when it is
/// [`IDEMPOTENCY_WINDOW`] old or holds the ids it was made for (`room`) it joins the earlier
/// ones, which are retired whole once every id in them is a window old, or once the newer
/// ones hold the latest [`GENERATION`]. Every publish takes the lock these are under, so
/// nothing under it may take long: a single map expired id by id would rehash everything it
/// holds as it doubled (57 k and 115 k ids, at 28 and 57 s of 2,000 events/s, the steady
/// scenario's spikes) and again in place whenever its removals' tombstones used up its slack.
/// Past the first, each generation is sized up front and turned before it would grow. Kept
/// until a window old even while a new tenant's generations double: retired as the next one
/// began, a fresh tenant's batch of a thousand forgot its first ids within the batch.
struct Generations {
    current: Ids,
    /// The ids `current` was made for.
    room: usize,
    /// When `current` began, in ms since the epoch.
    since: i64,
    /// Earlier generations, newest first, each with when its last id could have come.
    earlier: VecDeque<(Ids, i64)>,
}

impl Generations {
    fn new(now: i64) -> Generations {
        Generations { current: Ids::new(), room: FIRST_GENERATION, since: now, earlier: VecDeque::new() }
    }

    /// An empty generation with room for `ids` and an eighth more (a burst beyond it costs
    /// one resize, not an error); the first grows as it fills. Untouched, the room is address
    /// space, not memory; full, a generation of [`GENERATION`] ids takes about 12 MiB (its
    /// table and its ids' strings).
    fn made_for(ids: usize) -> Ids {
        match ids > FIRST_GENERATION {
            true => HashMap::with_capacity(ids + ids / 8),
            false => Ids::new(),
        }
    }

    fn held(&self) -> usize {
        self.current.len() + self.earlier.iter().map(|(ids, _)| ids.len()).sum::<usize>()
    }

    fn get(&self, id: &str) -> Option<&Seen> {
        self.current.get(id).or_else(|| self.earlier.iter().find_map(|(ids, _)| ids.get(id)))
    }

    /// Starts a new generation if the current one is full or a window old (twice as large if
    /// it filled within the window), and retires the earlier ones past the window or beyond
    /// the latest [`GENERATION`] ids into `retired`.
    fn turn(&mut self, now: i64, retired: &mut Vec<Ids>) {
        let window = IDEMPOTENCY_WINDOW.as_millis() as i64;
        let age = now - self.since;
        let full = self.current.len() >= self.room;
        if full || age >= window {
            if full && age < window {
                self.room = (self.room * 2).min(GENERATION);
            } else {
                // A window that did not fill it: the next is made for twice what came, so a
                // past burst's room is not kept (a burst again fills it, and the one after
                // doubles).
                self.room = (self.current.len() * 2).clamp(FIRST_GENERATION, self.room.max(FIRST_GENERATION));
            }
            // Its ids came before its window ended (each insert turns it first when due).
            let ended = now.min(self.since + window);
            let current = std::mem::replace(&mut self.current, Generations::made_for(self.room));
            if !current.is_empty() {
                self.earlier.push_front((current, ended));
            }
            self.since = now;
        }
        let mut newer = self.current.len();
        let keep = (self.earlier.iter())
            .take_while(|(ids, ended)| {
                let kept = *ended > now - window && newer < GENERATION;
                newer += ids.len();
                kept
            })
            .count();
        retired.extend(self.earlier.drain(keep..).map(|(ids, _)| ids));
    }

    /// Retires the oldest generation (the current one if it is the only one).
    fn retire_oldest(&mut self) -> Ids {
        match self.earlier.pop_back() {
            Some((ids, _)) => ids,
            None => std::mem::replace(&mut self.current, Generations::made_for(self.room)),
        }
    }
}

/// Recently accepted (tenant, event id) pairs, each tenant's in [`Generations`] of its own:
/// one tenant's volume turns over its own ids only (shared, another's 100,000 ids in a minute
/// forgot every tenant's in a minute, and their producers' retries were published again).
/// Past [`IDEMPOTENCY_CAPACITY`] ids in all, the tenants holding the most forget their older
/// generation first. Retired generations are freed off the lock, large ones off the runtime's
/// threads. In memory: after a restart a repeated publish is appended again, and receivers
/// drop it by `webhook-id`.
struct Recent {
    tenants: HashMap<String, Generations>,
    /// Ids being appended now ([`Seen::Pending`]), kept apart from the generations: retired
    /// with one, an id still being appended (a Kafka append can take 30 s) was forgotten, and
    /// a retry after a timeout reserved it again and appended it twice. As many as the
    /// appends under way hold.
    pending: HashMap<Key, Seen>,
    /// Ids the tenants' generations hold.
    held: usize,
    /// When the tenants were last looked over for generations past the window.
    swept: i64,
}

impl Recent {
    fn new(now: i64) -> Recent {
        Recent { tenants: HashMap::new(), pending: HashMap::new(), held: 0, swept: now }
    }

    fn get(&self, key: &Key) -> Option<&Seen> {
        self.pending.get(key).or_else(|| self.tenants.get(&key.0)?.get(&key.1))
    }

    /// Marks `key` as being appended by a request now.
    fn pend(&mut self, key: Key, rx: watch::Receiver<Option<usize>>) {
        self.pending.insert(key, Seen::Pending(rx));
    }

    /// Forgets `key` if it is still being appended: its append failed.
    fn abandon(&mut self, key: &Key) {
        self.pending.remove(key);
    }

    /// Remembers `key`, accepted with `deliveries` at `now`; returns what was retired to make
    /// room, for the caller to free after letting go of the lock.
    #[must_use]
    fn remember(&mut self, key: Key, deliveries: usize, digest: u64, now: i64) -> Vec<Ids> {
        self.pending.remove(&key);
        let mut retired = Vec::new();
        let (tenant, id) = key;
        let t = self.tenants.entry(tenant).or_insert_with(|| Generations::new(now));
        t.turn(now, &mut retired);
        if t.current.insert(id, Seen::Done { deliveries, digest }).is_none() {
            self.held += 1;
        }
        self.held -= retired.iter().map(HashMap::len).sum::<usize>();
        retired
    }

    /// Turns every tenant's generations past the window, a minute apart at most, and forgets
    /// tenants that hold nothing; then, past the capacity, retires the older generations of
    /// the tenants holding the most until an eighth is free. Returns what was retired, for the
    /// caller to free after letting go of the lock.
    #[must_use]
    fn turn(&mut self, now: i64) -> Vec<Ids> {
        let mut retired = Vec::new();
        let window = IDEMPOTENCY_WINDOW.as_millis() as i64;
        if now - self.swept >= window / 10 {
            self.swept = now;
            for t in self.tenants.values_mut() {
                t.turn(now, &mut retired);
            }
            self.tenants.retain(|_, t| t.held() > 0);
            self.held -= retired.iter().map(HashMap::len).sum::<usize>();
        }
        if self.held > IDEMPOTENCY_CAPACITY {
            // The tenant holding the most each time, judged again after each retirement: in
            // turn down a list sorted once, a tenant holding a tenth of the heaviest's lost
            // its only generation while the heaviest kept several.
            let mut most: std::collections::BinaryHeap<(usize, String)> =
                self.tenants.iter().map(|(k, t)| (t.held(), k.clone())).collect();
            while self.held > IDEMPOTENCY_CAPACITY - IDEMPOTENCY_CAPACITY / 8 {
                let Some((_, tenant)) = most.pop() else { break };
                let Some(t) = self.tenants.get_mut(&tenant) else { continue };
                let older = t.retire_oldest();
                self.held -= older.len();
                retired.push(older);
                if t.held() > 0 {
                    most.push((t.held(), tenant));
                }
            }
        }
        retired
    }
}

/// Appends deliveries, each to its topic, durably (the two appends side by side).
async fn append_deliveries(log: &dyn Log, topic: &str, ordered_topic: &str, d: Deliveries) -> Result<(), LogError> {
    let to = |topic, records: Vec<Record>| async move {
        if records.is_empty() {
            return Ok(());
        }
        log.append(topic, records).await.map(|_| ())
    };
    tokio::try_join!(to(topic, d.plain), to(ordered_topic, d.ordered)).map(|_| ())
}

/// After a publish refused for its deliveries (`refused`), whose events' history records were
/// written beside them: each of their deliveries recorded `dropped`, saying why — else the
/// events stood on record, listed, with every delivery `pending` for good, though the producer
/// was told none was accepted. Dated when the event was accepted, before any attempt: a
/// delivery the log took after all (on Kafka the plain and ordered appends, and each record,
/// succeed or fail on their own) is sent, and its attempts' states are the newer.
fn dropped_on_record(recorder: &Recorder, history: &[HistoryRecord], refused: &LogError) {
    let error = format!(
        "the publish was refused ({refused}): not accepted, and not sent unless the log took it after all or it is published again"
    );
    for rec in history {
        let HistoryRecord::Event(e) = rec else { continue };
        for sub in &e.subscriptions {
            recorder.record(&HistoryRecord::State(StateRecord {
                event_id: e.id.clone(),
                subscription: sub.clone(),
                tenant: e.tenant.clone(),
                accepted_ms: e.accepted_ms,
                at_ms: e.accepted_ms,
                state: crate::history::State::Dropped,
                error: Some(error.clone()),
            }));
        }
    }
}

/// Frees retired generations, large ones on a blocking thread: ~100 k ids are a few
/// milliseconds of frees.
fn free(retired: Vec<Ids>) {
    if retired.iter().map(HashMap::len).sum::<usize>() > 1_000 {
        tokio::task::spawn_blocking(move || drop(retired));
    }
}

/// How long a request waits for another that is appending the same event id.
const SAME_ID_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Fans events out to their subscriptions and appends the deliveries, durably.
pub struct Ingest {
    log: Arc<dyn Log>,
    registry: Arc<Registry>,
    topic: String,
    /// Where ordered subscriptions' deliveries go (their keys' sequencers read it).
    ordered_topic: String,
    /// Shared with the task that finishes a publish's write (see [`Ingest::publish`]).
    recent: Arc<Mutex<Recent>>,
    /// `quotas.fanout_bytes`.
    max_fanout: u64,
    /// Where accepted events are recorded, when history is kept.
    history: Option<Arc<Recorder>>,
    /// Bytes of deliveries being written, per tenant and in all.
    budget: Arc<Budget>,
}

/// The ids this request reserved: released (as refused) unless the append succeeded.
struct Reserved {
    recent: Arc<Mutex<Recent>>,
    mine: Vec<(Key, watch::Sender<Option<usize>>)>,
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.mine.is_empty() {
            return;
        }
        let mut recent = self.recent.lock().unwrap();
        for (key, _) in self.mine.drain(..) {
            recent.abandon(&key);
        }
    }
}

impl Ingest {
    /// Ingest into `topic`, ordered subscriptions' deliveries into `ordered_topic`; one request
    /// may fan out to `max_fanout` bytes, and the writes under way hold `budget`'s bytes.
    pub fn new(
        log: Arc<dyn Log>,
        registry: Arc<Registry>,
        topic: String,
        ordered_topic: String,
        max_fanout: u64,
        budget: Budget,
    ) -> Self {
        Ingest {
            log,
            registry,
            topic,
            ordered_topic,
            recent: Arc::new(Mutex::new(Recent::new(now_ms()))),
            max_fanout,
            history: None,
            budget: Arc::new(budget),
        }
    }

    /// Records every accepted event in the delivery history too.
    pub fn recorded_by(mut self, history: Arc<Recorder>) -> Self {
        self.history = Some(history);
        self
    }

    /// Reserves the given ids of `events` that no request has seen, after waiting for any
    /// request appending one of them now: so concurrent duplicates append once.
    async fn reserve(&self, events: &[Event]) -> Reserved {
        loop {
            let (busy, retired): (Vec<watch::Receiver<Option<usize>>>, _) = {
                let mut recent = self.recent.lock().unwrap();
                let retired = recent.turn(now_ms());
                let busy: Vec<_> = events
                    .iter()
                    .filter(|e| e.id_given)
                    .filter_map(|e| match recent.get(&(e.tenant.clone(), e.id.clone())) {
                        Some(Seen::Pending(rx)) => Some(rx.clone()),
                        _ => None,
                    })
                    .collect();
                if busy.is_empty() {
                    let mut mine = Vec::new();
                    for e in events.iter().filter(|e| e.id_given) {
                        let key = (e.tenant.clone(), e.id.clone());
                        if recent.get(&key).is_none() {
                            let (tx, rx) = watch::channel(None);
                            recent.pend(key.clone(), rx);
                            mine.push((key, tx));
                        }
                    }
                    drop(recent);
                    free(retired);
                    return Reserved { recent: self.recent.clone(), mine };
                }
                (busy, retired)
            };
            free(retired);
            for mut rx in busy {
                let _ = tokio::time::timeout(SAME_ID_WAIT, rx.wait_for(Option::is_some)).await;
            }
        }
    }

    /// Whether `event` repeats one accepted within [`IDEMPOTENCY_WINDOW`] (its id given, the
    /// same content): it is answered as the first was, whatever its type's schema says now.
    pub fn repeats(&self, event: &Event) -> bool {
        if !event.id_given {
            return false;
        }
        // Before the lock every publish takes: it reads the whole event.
        let digest = event.digest();
        let key = (event.tenant.clone(), event.id.clone());
        matches!(self.recent.lock().unwrap().get(&key), Some(Seen::Done { digest: seen, .. }) if *seen == digest)
    }

    /// Appends every delivery of `events` in one durable append; returns per-event counts.
    /// An event whose id (for its tenant) was accepted in the last [`IDEMPOTENCY_WINDOW`],
    /// in this request or an earlier one (or is being appended by a concurrent one), gets the
    /// first answer back and appends nothing. Fans out to the subscriptions this process
    /// knows: the API has waited for every one made before the request, through any process
    /// (`Feed::settle`).
    pub async fn publish(&self, events: Vec<Event>) -> Result<Vec<Accepted>, Refusal> {
        let mut reserved = self.reserve(&events).await;
        let now = now_ms();
        let mut records = Deliveries::default();
        let mut accepted = Vec::with_capacity(events.len());
        let mut counts: HashMap<(String, String), (usize, u64)> = HashMap::new();
        let mut new_events = 0u64;
        let mut fanout = 0u64;
        let mut history = Vec::new();
        // Held until the write below is done, whether or not the request waits for it.
        let mut share = budget::Share::default();
        for event in events {
            let key = (event.tenant.clone(), event.id.clone());
            if event.id_given {
                let earlier = counts.get(&key).copied().or_else(|| match self.recent.lock().unwrap().get(&key) {
                    Some(Seen::Done { deliveries, digest }) => Some((*deliveries, *digest)),
                    _ => None,
                });
                if let Some((deliveries, digest)) = earlier {
                    if digest != event.digest() {
                        return Err(Refusal::IdReused { index: accepted.len() });
                    }
                    accepted.push(Accepted { id: event.id, deliveries });
                    continue;
                }
            }
            if let Some(subscription) = self.registry.unreadable_of(&event.tenant) {
                return Err(Refusal::Unreadable { subscription });
            }
            let targets = self.registry.matching(&event.tenant, &event.event_type);
            let mut keyed = Keyed::new(
                &event.id,
                &event.event_type,
                &event.tenant,
                event.ordering_key.as_deref(),
                &event.data,
                event.changes.as_ref(),
                keys::pointers(&targets),
            );
            for (i, target) in targets.iter().enumerate() {
                let first = Delivery::first_attempt(
                    event.id.clone(),
                    target.sub.id.clone(),
                    event.tenant.clone(),
                    event.event_type.clone(),
                    Bytes::new(),
                    now,
                );
                let key = keyed.key_for(target);
                let ordered = key.is_some();
                let first = Delivery { trace: event.trace.clone(), ordering_key: key, ..first };
                let record = delivery_record(target, first, &event.data, event.changes.as_ref());
                if i == 0 {
                    // What every record of the event copies (data, changes, ids, trace), counted
                    // before the others are made: the first one's size without its payload,
                    // plus each subscription's own payload form (as sent or JavaScript's, which
                    // can differ by megabytes of whitespace or written-out numbers).
                    let payload = |t: &Target| payload_bytes(t, &event.data, event.changes.as_ref());
                    let overhead = (record.key.len() + record.value.len()).saturating_sub(payload(target));
                    let bytes = targets.iter().map(|t| (overhead + payload(t)) as u64).sum::<u64>();
                    self.admit(&mut fanout, &mut share, &event.tenant, bytes).await?;
                }
                records.push(record, ordered);
            }
            if self.history.is_some() {
                if targets.is_empty() {
                    // Its copy is held until the log has it, as deliveries' records are: an
                    // event nobody subscribes to makes only that, counted as they are (one
                    // with deliveries is counted by them, at least its size each).
                    let copy = event.data.sent.len() + event.changes.as_ref().map_or(0, |c| c.sent.len());
                    self.admit(&mut fanout, &mut share, &event.tenant, copy as u64).await?;
                }
                history.push(HistoryRecord::Event(EventRecord {
                    id: event.id.clone(),
                    tenant: event.tenant.clone(),
                    event_type: event.event_type.clone(),
                    accepted_ms: now,
                    subscriptions: targets.iter().map(|t| t.sub.id.clone()).collect(),
                    data: event.data.sent.clone(),
                    changes: event.changes.as_ref().map(|c| c.sent.clone()),
                    ordering_key: event.ordering_key.clone(),
                    seq: SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
                }));
            }
            if event.id_given {
                counts.insert(key, (targets.len(), event.digest()));
            }
            new_events += 1;
            accepted.push(Accepted { id: event.id, deliveries: targets.len() });
        }
        // The history's copy of each event and its deliveries are appended together (the
        // log's group commit makes them one write); the answer waits for both. In a task of
        // its own, which also remembers the ids once the write succeeded: a request cut off
        // meanwhile (the API's timeout, a client that gave up) leaves records the log still
        // writes and delivers, and a retry with the same id must find it remembered (or wait
        // for it, pending), not send it again.
        let (log, topic, ordered_topic) = (self.log.clone(), self.topic.clone(), self.ordered_topic.clone());
        let recorder = self.history.clone();
        let written = tokio::spawn(async move {
            let deliveries = append_deliveries(&*log, &topic, &ordered_topic, records);
            match &recorder {
                Some(h) => {
                    let (delivered, recorded) = tokio::join!(deliveries, h.append(&history));
                    if let (Err(e), Ok(())) = (&delivered, &recorded) {
                        dropped_on_record(h, &history, e);
                    }
                    delivered?;
                    // The deliveries are written and will be sent: the events are accepted
                    // (refused, a retry would send them all again). Their history records
                    // follow through the recorder's queue, retried until the log takes them.
                    match recorded {
                        Ok(()) => {}
                        // Queued, each would be refused again, and a log that stops a batch at
                        // its first too-large record would lose the attempts queued beside it.
                        Err(e @ LogError::TooLarge { .. }) => {
                            metrics::counter!(crate::metrics::HISTORY_DROPPED).increment(history.len() as u64);
                            tracing::error!(error = %e, events = history.len(), "accepted events' history records are too large for the log; not recorded");
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, events = history.len(), "accepted events' history records were not written with their deliveries; queued");
                            for rec in &history {
                                h.record(rec);
                            }
                        }
                    }
                }
                None => deliveries.await?,
            }
            let retired = {
                let mut recent = reserved.recent.lock().unwrap();
                let mut retired = Vec::new();
                for (key, tx) in reserved.mine.drain(..) {
                    let (n, digest) = counts.get(&key).copied().unwrap_or_default();
                    retired.extend(recent.remember(key, n, digest, now));
                    tx.send_replace(Some(n));
                }
                retired.extend(recent.turn(now));
                retired
            };
            free(retired);
            drop(share);
            metrics::counter!(crate::metrics::EVENTS_INGESTED).increment(new_events);
            Ok::<_, LogError>(())
        });
        written
            .await
            .map_err(|e| Refusal::Log(LogError::Backend(format!("publishing: {e}"))))?
            .map_err(Refusal::Log)?;
        Ok(accepted)
    }

    /// Counts an event's `bytes` of delivery records (of `tenant`) into a request's `fanout`,
    /// held to `quotas.fanout_bytes`, and into its `share` of what is being written.
    async fn admit(
        &self,
        fanout: &mut u64,
        share: &mut budget::Share,
        tenant: &str,
        bytes: u64,
    ) -> Result<(), Refusal> {
        *fanout = fanout.saturating_add(bytes);
        if *fanout > self.max_fanout {
            return Err(Refusal::FanOut { bytes: *fanout, max: self.max_fanout });
        }
        self.budget.take(share, tenant, bytes).await.map_err(Refusal::Busy)
    }

    /// Bytes of delivery records one request may make (`quotas.fanout_bytes`).
    pub fn max_fanout(&self) -> u64 {
        self.max_fanout
    }

    /// Sends recorded events again, each to its targets, now, in one append: a fresh attempt
    /// budget and the same id (so `webhook-id`), a new delivery generation, and the state back
    /// to pending. Returns the deliveries queued. As [`Ingest::publish`], a call may make at
    /// most `quotas.fanout_bytes` of delivery records (a recover sends its events in parts
    /// that fit).
    pub async fn resend(&self, items: &[(EventRecord, Vec<Arc<Target>>)]) -> Result<usize, Refusal> {
        let invalid = |e: canonical::CanonicalError| Invalid::new("data", e.to_string());
        let now = now_ms();
        // A generation no earlier one has: dead letters and jitter are per generation.
        let generation = u32::try_from(now / 1000).unwrap_or(u32::MAX);
        let mut records = Deliveries::default();
        let mut states = Vec::new();
        let mut fanout = 0u64;
        let mut share = budget::Share::default();
        for (event, targets) in items {
            // Checked as JSON (so UTF-8) when the event was accepted.
            let data = Json::new(&String::from_utf8_lossy(&event.data)).map_err(invalid)?;
            let changes =
                event.changes.as_ref().map(|c| Json::new(&String::from_utf8_lossy(c))).transpose().map_err(invalid)?;
            // Each target's own payload form, as at publish.
            let bytes = targets.iter().map(|t| payload_bytes(t, &data, changes.as_ref()) as u64).sum::<u64>();
            self.admit(&mut fanout, &mut share, &event.tenant, bytes).await?;
            let mut keyed = Keyed::new(
                &event.id,
                &event.event_type,
                &event.tenant,
                event.ordering_key.as_deref(),
                &data,
                changes.as_ref(),
                keys::pointers(targets),
            );
            for target in targets {
                let key = keyed.key_for(target);
                let ordered = key.is_some();
                let delivery = Delivery {
                    event_id: event.id.clone(),
                    subscription: target.sub.id.clone(),
                    tenant: event.tenant.clone(),
                    event_type: event.event_type.clone(),
                    attempt: 1,
                    accepted_ms: event.accepted_ms,
                    due_ms: now,
                    budget_ms: now,
                    generation,
                    data: Bytes::new(),
                    changes: None,
                    // The history keeps no trace context, so a resend carries none (a dead
                    // letter's replay keeps its record's).
                    trace: None,
                    ordering_key: key,
                    as_sent: false,
                };
                states.push(HistoryRecord::State(StateRecord::pending(&delivery, now)));
                records.push(delivery_record(target, delivery, &data, changes.as_ref()), ordered);
            }
        }
        let queued = records.len();
        if queued == 0 {
            return Ok(0);
        }
        // The deliveries first, then their pending states (stamped before, so an attempt that
        // settles in between is still the newer state): a state written for deliveries the
        // log then refused would leave the event pending for ever with nothing queued, and a
        // recover asked again, which sends what is dead-lettered or retrying, would skip it.
        // In a task of its own, states included, which holds the share until the log has the
        // records: a request cut off meanwhile leaves them being written (it gave its share
        // back, and a tenant sending again queued as much again), and their states recorded
        // (else a recover asked again sent them once more).
        let (log, topic, ordered_topic) = (self.log.clone(), self.topic.clone(), self.ordered_topic.clone());
        let history = self.history.clone();
        let written = tokio::spawn(async move {
            append_deliveries(&*log, &topic, &ordered_topic, records).await?;
            drop(share);
            if let Some(h) = &history {
                if let Err(e) = h.append(&states).await {
                    // Queued all the same: their attempts will be recorded.
                    tracing::warn!(error = %e, "resent deliveries queued; their pending state was not recorded");
                }
            }
            Ok::<_, LogError>(())
        });
        written.await.map_err(|e| Refusal::Log(LogError::Backend(format!("resending: {e}"))))?.map_err(Refusal::Log)?;
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: usize) -> Key {
        ("tenant".to_string(), format!("evt_{i}"))
    }

    /// What the tenants' generations hold, counted again from scratch.
    fn counted(recent: &Recent) -> usize {
        recent.tenants.values().map(Generations::held).sum()
    }

    /// The ids are remembered under the lock every publish takes: nothing that holds them may
    /// grow (rehashing all it holds) while they arrive, however many do.
    #[test]
    fn remembering_ids_never_regrows_what_holds_them() {
        let mut recent = Recent::new(0);
        let mut room = 0;
        for i in 0..3 * GENERATION + 1_000 {
            drop(recent.remember(key(i), 1, 0, 0));
            let t = &recent.tenants["tenant"];
            if t.current.len() == 1 {
                room = t.current.capacity();
            }
            // The first grows in place: a table of a thousand ids.
            if t.room > FIRST_GENERATION {
                assert_eq!(t.current.capacity(), room, "grew after {i} ids");
            }
            drop(recent.turn(0));
        }
        assert_eq!(recent.tenants["tenant"].room, GENERATION, "grown, generation by generation");
    }

    /// A tenant's generations are made for what it publishes now, not its busiest window: once
    /// grown they kept a table for 112,500 ids (6 MiB) at every turn, however few ids came.
    #[test]
    fn a_tenant_s_generations_shrink_back_after_a_burst() {
        let mut recent = Recent::new(0);
        for i in 0..250_000 {
            drop(recent.remember(key(i), 1, 0, 0));
            drop(recent.turn(0));
        }
        assert_eq!(recent.tenants["tenant"].room, GENERATION);
        // The burst's last generation, partly filled, makes the next for twice what it held;
        // from the one after, each is made for what came in the window before.
        for s in 0..4 * IDEMPOTENCY_WINDOW.as_secs() as usize {
            let at = s as i64 * 1000;
            drop(recent.remember(key(250_000 + s), 1, 0, at));
            drop(recent.turn(at));
        }
        let t = &recent.tenants["tenant"];
        assert!(t.current.capacity() < 5_000, "a table for {} ids", t.current.capacity());
        assert!(t.earlier.iter().all(|(ids, _)| ids.capacity() < 5_000));
    }

    /// At least the latest half of the capacity is remembered, and never more than it.
    #[test]
    fn the_latest_ids_are_remembered_up_to_the_capacity() {
        let mut recent = Recent::new(0);
        for i in 0..2 * GENERATION + 10 {
            drop(recent.remember(key(i), 1, 0, 0));
            drop(recent.turn(0));
            assert!(recent.held <= IDEMPOTENCY_CAPACITY);
        }
        assert!(recent.get(&key(2 * GENERATION + 9)).is_some());
        assert!(recent.get(&key(GENERATION + 10)).is_some(), "the latest half of the capacity");
        assert!(recent.get(&key(9)).is_none(), "more than the capacity");
        assert_eq!(recent.held, counted(&recent));
    }

    /// A new tenant's ids are remembered for the window while its generations grow: retired
    /// as each larger one began, a fresh tenant's batch of a thousand forgot its first 448
    /// within the batch, and 2,000 ids a minute were remembered for seconds.
    #[test]
    fn a_new_tenant_s_ids_are_remembered_while_its_generations_grow() {
        let mut recent = Recent::new(0);
        for i in 0..5_000 {
            drop(recent.remember(key(i), 1, 0, 0));
            drop(recent.turn(0));
        }
        assert!((0..5_000).all(|i| recent.get(&key(i)).is_some()), "a batch forgot its first ids");
        let window = IDEMPOTENCY_WINDOW.as_millis() as i64;
        let mut recent = Recent::new(0);
        let per_minute = 2_000;
        for i in 0..10 * per_minute {
            let at = (i / per_minute) as i64 * 60_000;
            drop(recent.remember(key(i), 1, 0, at));
            drop(recent.turn(at));
        }
        let at = window - 1;
        drop(recent.turn(at));
        assert!((0..10 * per_minute).all(|i| recent.get(&key(i)).is_some()), "forgotten within the window");
        assert_eq!(recent.held, counted(&recent));
    }

    /// One tenant's volume turns over its own ids, not another's: a tenant publishing a few
    /// keeps them for the window however many another publishes (shared, the generations
    /// turned by the first's 100,000 ids forgot the second's in seconds, and its producer's
    /// retry was published again).
    #[test]
    fn one_tenant_s_volume_does_not_shorten_another_tenant_s_memory() {
        let mut recent = Recent::new(0);
        let other = ("globex".to_string(), "evt_1".to_string());
        drop(recent.remember(other.clone(), 2, 7, 0));
        for i in 0..3 * GENERATION {
            drop(recent.remember(key(i), 1, 0, 0));
            drop(recent.turn(0));
        }
        assert!(matches!(recent.get(&other), Some(Seen::Done { deliveries: 2, digest: 7 })), "forgotten");
        assert!(recent.get(&key(3 * GENERATION - 1)).is_some());
        assert_eq!(recent.held, counted(&recent));
    }

    /// Many tenants' ids together stay within the capacity: past it, the tenants holding the
    /// most forget their older ids first, and the one holding the fewest keeps its own.
    #[test]
    fn past_the_capacity_the_tenants_holding_the_most_forget_first() {
        let mut recent = Recent::new(0);
        let few = ("few".to_string(), "evt_1".to_string());
        drop(recent.remember(few.clone(), 1, 0, 0));
        for i in 0..2 * IDEMPOTENCY_CAPACITY {
            let key = (format!("tenant_{}", i % 40), format!("evt_{i}"));
            drop(recent.remember(key, 1, 0, 0));
            drop(recent.turn(0));
            assert!(recent.held <= IDEMPOTENCY_CAPACITY, "{} held after {i} ids", recent.held);
        }
        assert_eq!(recent.held, counted(&recent));
        assert!(recent.get(&few).is_some(), "the tenant holding the fewest forgot");
        let last = 2 * IDEMPOTENCY_CAPACITY - 1;
        assert!(recent.get(&(format!("tenant_{}", last % 40), format!("evt_{last}"))).is_some());
    }

    /// Past the capacity, the tenant holding the most forgets generation after generation
    /// before tenants holding a tenth as many forget anything.
    #[test]
    fn past_the_capacity_the_heaviest_tenant_forgets_again_before_lighter_ones() {
        let mut recent = Recent::new(0);
        let light = |t: usize, i: usize| (format!("light_{t}"), format!("evt_{i}"));
        for t in 0..13 {
            for i in 0..10_000 {
                drop(recent.remember(light(t, i), 1, 0, 0));
            }
        }
        for i in 0..135_000 {
            drop(recent.remember(key(i), 1, 0, 0));
            drop(recent.turn(0));
        }
        assert!(recent.held <= IDEMPOTENCY_CAPACITY);
        for t in 0..13 {
            assert!((0..10_000).all(|i| recent.get(&light(t, i)).is_some()), "light_{t} forgot");
        }
        assert!(recent.get(&key(134_999)).is_some());
        assert_eq!(recent.held, counted(&recent));
    }

    /// An id is remembered for the window at least, and forgotten after twice the window,
    /// even if no other id arrives in between; a tenant holding nothing is forgotten too.
    #[test]
    fn an_id_is_remembered_for_the_window_and_forgotten_after_two() {
        let window = IDEMPOTENCY_WINDOW.as_millis() as i64;
        let mut recent = Recent::new(0);
        drop(recent.remember(key(1), 3, 0, 0));
        drop(recent.turn(window - 1));
        drop(recent.remember(key(2), 3, 0, window));
        drop(recent.turn(window));
        assert!(matches!(recent.get(&key(1)), Some(Seen::Done { deliveries: 3, .. })), "within the window");
        drop(recent.turn(2 * window - 1));
        assert!(recent.get(&key(2)).is_some(), "a window after it arrived");
        drop(recent.turn(3 * window));
        assert!(recent.get(&key(2)).is_none(), "two windows after it arrived");
        assert!(recent.tenants.is_empty(), "a tenant holding nothing is let go");
        assert_eq!(recent.held, 0);
    }

    /// An event whose deliveries are written is accepted, whatever became of its history
    /// record (appended beside them): refused, the producer was told nothing was accepted
    /// while its deliveries went out, and its retry sent them all again.
    #[tokio::test]
    async fn an_event_whose_deliveries_are_written_is_accepted_whatever_its_history_append_says() {
        use crate::log::stub::Stub;
        let log = Arc::new(Stub::new(true, true).refusing_as_too_large("history"));
        let registry = Arc::new(Registry::stubbed());
        registry.hold("t", &serde_json::json!({ "url": "https://hooks.example/a" }));
        let recorder = Recorder::start(log.clone(), "herald.history".into());
        let ingest = ingest_on(log.clone(), registry, Budget::unbounded()).recorded_by(recorder);
        let event = Event {
            id: "x".into(),
            event_type: "T".into(),
            tenant: "t".into(),
            data: Json::new("{}").unwrap(),
            changes: None,
            id_given: true,
            trace: None,
            ordering_key: None,
        };
        let accepted = ingest.publish(vec![event.clone()]).await.expect("accepted: its deliveries are written");
        assert_eq!(accepted[0].deliveries, 1);
        let again = ingest.publish(vec![event]).await.expect("a repeat");
        assert_eq!(again[0].deliveries, 1);
        assert_eq!(log.appends.lock().unwrap().len(), 1, "its deliveries appended once");
    }

    /// A publish refused for its deliveries (the log refused them) whose history record was
    /// written beside them leaves its event on record — the producer told nothing was
    /// accepted, the event listed with every delivery `pending` for good. Each delivery is
    /// recorded `dropped` after it, saying why.
    #[tokio::test]
    async fn a_refused_publish_s_event_on_record_says_its_deliveries_were_dropped() {
        use crate::history::record::{members, HistoryRecord, State};
        use crate::log::stub::Stub;
        let log = Arc::new(Stub::new(true, true).refusing_as_too_large("deliveries"));
        let registry = Arc::new(Registry::stubbed());
        registry.hold("t", &serde_json::json!({ "url": "https://hooks.example/a" }));
        let recorder = Recorder::start(log.clone(), "herald.history".into());
        let ingest = ingest_on(log.clone(), registry, Budget::unbounded()).recorded_by(recorder.clone());
        let refused = ingest.publish(vec![event("x", "t")]).await;
        assert!(matches!(refused, Err(Refusal::Log(_))), "refused");
        recorder.synced().await;
        let written: Vec<HistoryRecord> = log
            .appends
            .lock()
            .unwrap()
            .iter()
            .flatten()
            .flat_map(|r| members(&r.value).filter_map(HistoryRecord::decode).collect::<Vec<_>>())
            .collect();
        assert!(written.iter().any(|r| matches!(r, HistoryRecord::Event(e) if e.id == "x")), "the event is on record");
        let dropped = written.iter().any(|r| {
            matches!(r, HistoryRecord::State(s) if s.event_id == "x" && s.state == State::Dropped && s.error.is_some()
                && s.at_ms == s.accepted_ms)
        });
        assert!(
            dropped,
            "its delivery said dropped, as of its acceptance (older than any attempt): {} records",
            written.len()
        );
    }

    /// Ingest on `log` with no fan-out quota.
    fn ingest_on(log: Arc<dyn Log>, registry: Arc<Registry>, budget: Budget) -> Ingest {
        Ingest::new(log, registry, "herald.deliveries".into(), "herald.ordered".into(), u64::MAX, budget)
    }

    fn event(id: &str, tenant: &str) -> Event {
        Event {
            id: id.into(),
            event_type: "T".into(),
            tenant: tenant.into(),
            data: Json::new(&format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000))).unwrap(),
            changes: None,
            id_given: true,
            trace: None,
            ordering_key: None,
        }
    }

    /// Publishes whose requests were cut off while the log stalls keep their bytes until the
    /// log has them: their tenant's next publish is refused (its clients giving up and
    /// sending again grew Herald's memory without bound), and another tenant's is not held
    /// back by them.
    #[tokio::test(start_paused = true)]
    async fn writes_cut_off_while_the_log_stalls_hold_their_tenant_s_share() {
        use crate::log::stub::Stub;
        use std::sync::atomic::Ordering;
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let registry = Arc::new(Registry::stubbed());
        for tenant in ["a", "b"] {
            for i in 0..4 {
                registry.hold(tenant, &serde_json::json!({ "url": format!("https://hooks.example/{i}") }));
            }
        }
        // A tenant may have about two such events' deliveries (4 × 100 kB each) being written.
        let ingest = Arc::new(ingest_on(log.clone(), registry, Budget::new(1_000_000, 10_000_000)));
        for i in 0..2 {
            let publish = ingest.publish(vec![event(&format!("a{i}"), "a")]);
            let cut_off = tokio::time::timeout(std::time::Duration::from_secs(1), publish);
            assert!(cut_off.await.is_err(), "the request is cut off; its write goes on");
        }
        assert_eq!(log.started.load(Ordering::SeqCst), 2);
        // Bounded: on the old code it waited on the stalled log for good.
        let again = tokio::time::timeout(3 * budget::WAIT, ingest.publish(vec![event("a2", "a")])).await;
        let again = again.expect("answered, not left waiting on the stalled log");
        assert!(matches!(again, Err(Refusal::Busy(Over::Tenant { max: 1_000_000 }))), "{again:?}");
        assert_eq!(log.started.load(Ordering::SeqCst), 2, "nothing more held for the stalled log");
        let other = tokio::spawn({
            let ingest = ingest.clone();
            async move { ingest.publish(vec![event("b0", "b")]).await }
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while log.started.load(Ordering::SeqCst) < 3 {
            assert!(tokio::time::Instant::now() < deadline, "another tenant's publish reaches the log");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        log.resume();
        assert_eq!(other.await.unwrap().expect("accepted once the log takes it")[0].deliveries, 4);
        let later = ingest.publish(vec![event("a2", "a")]).await.expect("a's bytes came back once written");
        assert_eq!(later[0].deliveries, 4);
    }

    /// An event's history record holds its data until the log has it, whether or not any
    /// subscription wants the event: events nobody subscribes to, cut off while the log
    /// stalls and sent again, took no share, and grew Herald's memory without bound.
    #[tokio::test(start_paused = true)]
    async fn events_nobody_subscribes_to_hold_their_tenant_s_share_for_their_history() {
        use crate::log::stub::Stub;
        use std::sync::atomic::Ordering;
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let recorder = Recorder::start(log.clone(), "herald.history".into());
        let budget = Budget::new(250_000, 10_000_000);
        let ingest = ingest_on(log.clone(), Arc::new(Registry::stubbed()), budget).recorded_by(recorder);
        for i in 0..2 {
            let publish = ingest.publish(vec![event(&format!("a{i}"), "a")]);
            let cut_off = tokio::time::timeout(std::time::Duration::from_secs(1), publish);
            assert!(cut_off.await.is_err(), "the request is cut off; its write goes on");
        }
        let again = tokio::time::timeout(3 * budget::WAIT, ingest.publish(vec![event("a2", "a")])).await;
        let again = again.expect("answered, not left waiting on the stalled log");
        assert!(matches!(again, Err(Refusal::Busy(Over::Tenant { max: 250_000 }))), "{again:?}");
        log.resume();
        let later = ingest.publish(vec![event("a3", "a")]).await.expect("a's bytes came back once written");
        assert_eq!(later[0].deliveries, 0);
    }

    /// An event as large as a tenant's share allows its deliveries to be is accepted with the
    /// history on: its history copy is not counted beside them (a share is what the largest
    /// fan-out needs, and a copy on top refused such an event for good).
    #[tokio::test]
    async fn an_event_whose_deliveries_fill_the_share_is_accepted_with_the_history_on() {
        use crate::log::stub::Stub;
        let log = Arc::new(Stub::new(true, true));
        let registry = Arc::new(Registry::stubbed());
        registry.hold("a", &serde_json::json!({ "url": "https://hooks.example/1" }));
        let recorder = Recorder::start(log.clone(), "herald.history".into());
        let ingest = ingest_on(log.clone(), registry, Budget::new(150_000, 10_000_000)).recorded_by(recorder);
        let accepted = ingest.publish(vec![event("a0", "a")]).await.expect("accepted");
        assert_eq!(accepted[0].deliveries, 1);
    }

    /// Resends cut off while the log stalls keep their tenant's share as publishes do.
    #[tokio::test(start_paused = true)]
    async fn resends_cut_off_while_the_log_stalls_hold_their_tenant_s_share() {
        use crate::log::stub::Stub;
        use std::sync::atomic::Ordering;
        let log = Arc::new(Stub::new(true, true));
        log.stalled.store(true, Ordering::SeqCst);
        let registry = Arc::new(Registry::stubbed());
        let targets: Vec<Arc<Target>> = (0..4)
            .map(|i| registry.hold("a", &serde_json::json!({ "url": format!("https://hooks.example/{i}") })))
            .collect();
        let ingest = ingest_on(log.clone(), registry, Budget::new(1_000_000, 10_000_000));
        let record = |id: &str| EventRecord {
            id: id.into(),
            tenant: "a".into(),
            event_type: "T".into(),
            accepted_ms: 0,
            subscriptions: targets.iter().map(|t| t.sub.id.clone()).collect(),
            data: Bytes::from(format!("{{\"pad\":\"{}\"}}", "x".repeat(100_000))),
            changes: None,
            ordering_key: None,
            seq: 0,
        };
        for i in 0..2 {
            let items = [(record(&format!("e{i}")), targets.clone())];
            let cut_off = tokio::time::timeout(std::time::Duration::from_secs(1), ingest.resend(&items));
            assert!(cut_off.await.is_err(), "cut off; its write goes on");
        }
        let items = [(record("e2"), targets.clone())];
        let again = tokio::time::timeout(3 * budget::WAIT, ingest.resend(&items)).await;
        let again = again.expect("answered, not left waiting on the stalled log");
        assert!(matches!(again, Err(Refusal::Busy(Over::Tenant { .. }))), "{again:?}");
        assert_eq!(log.started.load(Ordering::SeqCst), 2, "nothing more held for the stalled log");
    }

    /// An id being appended stays reserved however many generations turn meanwhile (a Kafka
    /// append can take 30 s, in which 5,000 ids a second turn two): dropped with a retired
    /// generation, a retry after a timeout reserved it again and appended it twice. Its append
    /// failing, it is forgotten.
    #[test]
    fn an_id_being_appended_stays_reserved_across_turns_until_it_ends() {
        let mut recent = Recent::new(0);
        let (_tx, rx) = watch::channel(None);
        recent.pend(key(1), rx);
        let (_tx2, rx2) = watch::channel(None);
        recent.pend(key(2), rx2);
        for turn in 0..3 {
            for i in 0..GENERATION {
                drop(recent.remember(key(10 + turn * GENERATION + i), 1, 0, 0));
            }
            drop(recent.turn(0));
        }
        assert!(matches!(recent.get(&key(1)), Some(Seen::Pending(_))), "still being appended");
        recent.abandon(&key(1));
        assert!(recent.get(&key(1)).is_none());
        drop(recent.remember(key(2), 4, 7, 0));
        assert!(matches!(recent.get(&key(2)), Some(Seen::Done { deliveries: 4, digest: 7 })));
    }
}
