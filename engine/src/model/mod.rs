//! The nouns of the data flow: subscriptions, events, delivery records and dead letters.

mod dead_letter;
mod delivery;
mod event;
pub mod outcome;
pub mod range;
pub mod secret;
mod subscription;
pub mod trace;

pub use dead_letter::DeadLetter;
pub(crate) use delivery::{get_str, put_str};
pub use delivery::{DecodeError, Delivery};
pub use event::{
    check_event_id, check_event_type, check_ordering_key, named_in_a_url, EventInput, MAX_EVENT_ID_LEN,
    MAX_ORDERING_KEY_LEN,
};
pub use outcome::{whole_millis, Failure, Outcome, Response};
pub use secret::Secret;
#[cfg(test)]
pub(crate) use subscription::DIGESTS;
pub use subscription::{
    AmqpTarget, Auth, Credentials, OnDeadLetter, OrderingMode, OrderingSpec, PayloadFormat, ProfileKey, RetrySpec,
    SignatureEncoding, SignatureSpec, Subscription, SubscriptionSpec, Tls, TlsOptions, TransportKind,
};
pub use trace::TraceContext;

/// A field that failed validation: what the API answers `400` with, naming the field as a JSON
/// path (`url`, `headers.x-foo`, `[3].data`).
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a JSON path the client can find in what it sent.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl Invalid {
    /// `field` is wrong because `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid { field: field.into(), message: message.into() }
    }
}

/// The wall clock for deleting by age (history past its retention, dead letters past
/// theirs): never more than [`CLOCK_SLACK`] ahead of the wall clock when it was made plus the
/// monotonic time since. A clock stepped a month forward while Herald runs would otherwise
/// delete everything at the next tick — for good. (A clock already wrong when Herald starts is
/// taken as it is.)
#[derive(Debug, Clone, Copy)]
pub struct AgeClock {
    anchor: std::time::Instant,
    anchor_ms: i64,
}

/// How far ahead of the time counted since an [`AgeClock`] was made the wall clock may be for
/// deletion to go by it (NTP corrections, a VM's clock set after it resumed).
pub const CLOCK_SLACK: std::time::Duration = std::time::Duration::from_secs(3600);

impl AgeClock {
    /// A clock anchored at the wall clock now.
    pub fn start() -> AgeClock {
        AgeClock { anchor: std::time::Instant::now(), anchor_ms: now_ms() }
    }

    /// `wall_ms` (what the wall clock says), held to at most [`CLOCK_SLACK`] past the time
    /// counted since the anchor.
    pub fn guard(&self, wall_ms: i64) -> i64 {
        age_now(wall_ms, self.anchor_ms, self.anchor.elapsed())
    }
}

fn age_now(wall_ms: i64, anchor_ms: i64, elapsed: std::time::Duration) -> i64 {
    let counted = anchor_ms.saturating_add((elapsed + CLOCK_SLACK).as_millis().min(i64::MAX as u128) as i64);
    wall_ms.min(counted)
}

#[test]
fn a_clock_stepped_far_forward_is_held_back() {
    let day = 86_400_000;
    let hour = std::time::Duration::from_secs(3600);
    // Started at day 100; two hours later the clock says day 130.
    assert_eq!(age_now(130 * day, 100 * day, 2 * hour), 100 * day + 3 * 3_600_000);
    // Within the slack the wall clock counts; behind it too.
    assert_eq!(age_now(100 * day + 5_000, 100 * day, std::time::Duration::from_secs(1)), 100 * day + 5_000);
    assert_eq!(age_now(99 * day, 100 * day, hour), 99 * day);
}

/// Work that runs one at a time per key (a tenant): [`OneAtATime::start`] is `None` while one
/// runs. For requests whose work is large and shared (a rewind of 10,000 events, a replay that
/// reads the whole dead-letter topic), which a tenant key could otherwise start at its
/// request rate.
#[derive(Debug, Default, Clone)]
pub struct OneAtATime(std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>);

/// The one running for its key, until dropped.
#[derive(Debug)]
pub struct Running {
    key: String,
    all: OneAtATime,
}

impl OneAtATime {
    /// Starts `key`'s, unless one is running.
    pub fn start(&self, key: &str) -> Option<Running> {
        self.0.lock().unwrap().insert(key.to_string()).then(|| Running { key: key.to_string(), all: self.clone() })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.all.0.lock().unwrap().remove(&self.key);
    }
}

/// How many tenants' idle queues [`TakenInTurns`] keeps before it forgets them.
const FORGET_PAST: usize = 1024;

/// Heavy work that all tenants share so many at a time (PKCS#12 key derivation one at a time,
/// name lookups 128), taken in turns among tenants: each tenant's work queues on its own first,
/// so at most so many of a tenant's wait in the shared queue or hold it, and another tenant's
/// waits for those of each tenant's with some queued — not for every one a tenant's flood
/// asked for.
#[derive(Debug, Clone)]
pub struct TakenInTurns {
    shared: std::sync::Arc<tokio::sync::Semaphore>,
    /// How many of one tenant's may hold or wait for the shared room at once.
    per_tenant: usize,
    /// Each tenant's queue; a tenant with none waiting or running is forgotten.
    own: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, std::sync::Arc<tokio::sync::Semaphore>>>>,
}

/// A tenant's turn, held until dropped (by the work itself, not a caller that may stop waiting).
#[derive(Debug)]
pub struct Turn {
    _own: Option<tokio::sync::OwnedSemaphorePermit>,
    _shared: tokio::sync::OwnedSemaphorePermit,
}

impl Default for TakenInTurns {
    /// One at a time, one of a tenant's.
    fn default() -> Self {
        TakenInTurns::new(1, 1)
    }
}

impl TakenInTurns {
    /// `per_key` of each key's at a time (a tenant's, a subscription's), with no bound on all
    /// keys' together.
    pub fn per_key(per_key: usize) -> Self {
        TakenInTurns::new(tokio::sync::Semaphore::MAX_PERMITS, per_key)
    }

    /// `shared` at a time, `per_tenant` of one tenant's.
    pub fn new(shared: usize, per_tenant: usize) -> Self {
        TakenInTurns {
            shared: std::sync::Arc::new(tokio::sync::Semaphore::new(shared)),
            per_tenant,
            own: Default::default(),
        }
    }

    /// How many of one tenant's may hold or wait for the shared room at once.
    pub fn per_tenant(&self) -> usize {
        self.per_tenant
    }

    /// Waits for `tenant`'s turn.
    pub async fn turn(&self, tenant: &str) -> Turn {
        let own = self.queue_of(tenant).acquire_owned().await.expect("never closed");
        Turn { _own: Some(own), _shared: self.shared.clone().acquire_owned().await.expect("never closed") }
    }

    /// `tenant`'s turn if one is free now, of its own and of the shared room: for work that is
    /// refused rather than queued (a tenant's requests past its bound are answered `429`).
    pub fn try_turn(&self, tenant: &str) -> Option<Turn> {
        let own = self.queue_of(tenant).try_acquire_owned().ok()?;
        Some(Turn { _own: Some(own), _shared: self.shared.clone().try_acquire_owned().ok()? })
    }

    /// `tenant`'s own queue, made if it has none.
    fn queue_of(&self, tenant: &str) -> std::sync::Arc<tokio::sync::Semaphore> {
        let mut queues = self.own.lock().unwrap();
        // A tenant with none waiting or running is forgotten (its queue held by the map alone);
        // looked for only past a thousand, so that a lookup is not a walk of every tenant.
        if queues.len() > FORGET_PAST {
            queues.retain(|_, q| std::sync::Arc::strong_count(q) > 1);
        }
        queues
            .entry(tenant.to_string())
            .or_insert_with(|| std::sync::Arc::new(tokio::sync::Semaphore::new(self.per_tenant)))
            .clone()
    }

    /// Waits for a turn of the shared room only: for work of no known tenant.
    pub async fn shared_turn(&self) -> Turn {
        Turn { _own: None, _shared: self.shared.clone().acquire_owned().await.expect("never closed") }
    }
}

/// Says yes at most once in so many milliseconds, from any thread: for a log line that what
/// causes it may repeat thousands of times a second (a metric counts every one).
#[derive(Debug, Default)]
pub struct AtMostEvery(std::sync::atomic::AtomicI64);

impl AtMostEvery {
    /// One that says yes at the first asking (for a `static`).
    pub const fn new() -> Self {
        AtMostEvery(std::sync::atomic::AtomicI64::new(0))
    }

    /// Whether to go ahead now: `every_ms` or more since the last yes (or never one).
    pub fn due(&self, every_ms: i64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let (now, last) = (now_ms(), self.0.load(Relaxed));
        (last == 0 || now - last >= every_ms) && self.0.compare_exchange(last, now, Relaxed, Relaxed).is_ok()
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    // From `SystemTime` directly: chrono's `Utc::now()` works out a calendar date only for
    // `timestamp_millis` to turn it back into a count, and this runs several times an attempt.
    ms_since_epoch(std::time::SystemTime::now())
}

/// Milliseconds from the Unix epoch to `t`, rounded down like chrono's `timestamp_millis`
/// (a clock set before 1970 gives a negative count rather than a panic).
fn ms_since_epoch(t: std::time::SystemTime) -> i64 {
    match t.duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => i64::try_from(before.duration().as_nanos().div_ceil(1_000_000)).map_or(i64::MIN, |ms| -ms),
    }
}

/// RFC 3339 text (UTC, milliseconds) for a millisecond timestamp.
pub fn rfc3339_ms(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A new time-ordered identifier with the given prefix, e.g. `sub_0192…`.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    #[tokio::test]
    async fn a_key_s_turns_come_one_at_a_time_and_are_forgotten_when_nobody_waits() {
        let turns = super::TakenInTurns::per_key(1);
        let first = turns.turn("a").await;
        let other = turns.turn("b").await; // another key's at once
        let waiting = turns.turn("a");
        tokio::pin!(waiting);
        assert!(futures::poll!(waiting.as_mut()).is_pending(), "a's second waits for its first");
        drop(first);
        let second = waiting.await;
        drop((second, other));
        // A wait given up is forgotten with its key.
        let first = turns.turn("a").await;
        let mut given_up = Box::pin(turns.turn("a"));
        assert!(futures::poll!(given_up.as_mut()).is_pending());
        drop(first);
        drop(given_up);
        // Forgotten once past so many keys, when a turn is taken: a and b, and every key not
        // held but the few taken since.
        let held = turns.turn("held").await;
        for key in 0..super::FORGET_PAST {
            drop(turns.turn(&key.to_string()).await);
        }
        let keys: Vec<String> = turns.own.lock().unwrap().keys().cloned().collect();
        assert!(keys.len() < 4 && keys.contains(&"held".into()) && !keys.contains(&"a".into()), "{keys:?}");
        drop(held);
    }

    #[tokio::test]
    async fn a_turn_tried_is_had_only_while_one_is_free() {
        let turns = super::TakenInTurns::new(3, 2);
        let a = [turns.try_turn("a"), turns.try_turn("a")];
        assert!(a.iter().all(Option::is_some), "a's two");
        assert!(turns.try_turn("a").is_none(), "a's third, past its own");
        let b = turns.try_turn("b");
        assert!(b.is_some(), "another's at once");
        assert!(turns.try_turn("c").is_none(), "past the shared room");
        drop(a);
        assert!(turns.try_turn("a").is_some(), "a's again once its own ended");
    }

    #[test]
    fn at_most_every_says_yes_once_in_its_interval() {
        let gate = super::AtMostEvery::default();
        assert!(gate.due(60_000), "the first time");
        assert!(!gate.due(60_000) && !gate.due(60_000), "again within the interval");
        assert!(gate.due(0), "once the interval has passed");
    }

    #[test]
    fn milliseconds_since_the_epoch_round_down_like_chrono() {
        for nanos in [0i64, 1, 999_999, 1_000_000, 1_700_000_000_123_456_789, -1, -500_000, -1_000_000, -1_000_001] {
            let t = if nanos >= 0 {
                UNIX_EPOCH + Duration::from_nanos(nanos as u64)
            } else {
                UNIX_EPOCH - Duration::from_nanos(nanos.unsigned_abs())
            };
            let chrono = chrono::DateTime::from_timestamp_nanos(nanos).timestamp_millis();
            assert_eq!(super::ms_since_epoch(t), chrono, "{nanos} ns");
        }
        let now = super::now_ms();
        assert!((now - chrono::Utc::now().timestamp_millis()).abs() < 60_000, "{now}");
    }
}
