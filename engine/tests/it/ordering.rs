//! Ordered delivery per key: an ordered subscription's receiver sees each key's events one
//! after another in acceptance order, every event arrives, and a failing key holds back only
//! itself — through the API, on whichever backend the suite runs on, and across a SIGKILL.

use crate::support::metrics::scrape;
use crate::support::{serve_http1, spawn_herald, until, Api, TestHerald, TOKEN};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KEYS: usize = 20;
const EVENTS: usize = 1000;

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) seq: u64,
    id: String,
    pub(crate) status: u16,
}

/// A receiver of events `{"key","seq"}` that fails about one request in five (which, fixed
/// per event id and try, so a run is repeatable), answers after up to 8 ms, and fails every
/// request of the key `stuck` while `stuck_fails` is set. It records each key's requests in
/// the order they arrived.
#[derive(Clone)]
pub(crate) struct OrderedReceiver {
    addr: SocketAddr,
    pub(crate) seen: Arc<Mutex<BTreeMap<String, Vec<Seen>>>>,
    stuck: Arc<Mutex<Option<String>>>,
    random_failures: bool,
}

impl OrderedReceiver {
    pub(crate) async fn start(random_failures: bool) -> OrderedReceiver {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let r = OrderedReceiver {
            addr: listener.local_addr().unwrap(),
            seen: Default::default(),
            stuck: Default::default(),
            random_failures,
        };
        let state = r.clone();
        serve_http1(listener, move |req| state.clone().answer(req));
        r
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/ordered", self.addr)
    }

    async fn answer(self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let envelope: Value = serde_json::from_slice(&body).unwrap_or_default();
        let key = envelope["data"]["key"].as_str().unwrap_or("?").to_string();
        let seq = envelope["data"]["seq"].as_u64().unwrap_or(u64::MAX);
        let id = envelope["id"].as_str().unwrap_or("").to_string();
        let (status, pause) = {
            let mut seen = self.seen.lock().unwrap();
            let tries = seen.get(&key).map_or(0, |s| s.iter().filter(|s| s.id == id).count());
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (&id, tries).hash(&mut h);
            let roll = h.finish();
            let stuck = self.stuck.lock().unwrap().as_deref() == Some(key.as_str());
            let status = if stuck || (self.random_failures && roll % 5 == 0) { 503 } else { 200 };
            seen.entry(key).or_default().push(Seen { seq, id, status });
            (status, Duration::from_millis(roll % 9))
        };
        tokio::time::sleep(pause).await;
        Response::builder().status(status).body(Full::new(Bytes::from_static(b"ok"))).unwrap()
    }

    /// Keys whose every event `0..n` has been answered 200.
    pub(crate) fn complete(&self, per_key: &BTreeMap<String, u64>) -> usize {
        let seen = self.seen.lock().unwrap();
        per_key
            .iter()
            .filter(|(key, n)| {
                let ok: HashSet<u64> = seen
                    .get(*key)
                    .map(|s| s.iter().filter(|s| s.status == 200).map(|s| s.seq).collect())
                    .unwrap_or_default();
                (0..**n).all(|seq| ok.contains(&seq))
            })
            .count()
    }

    pub(crate) fn of(&self, key: &str) -> Vec<Seen> {
        self.seen.lock().unwrap().get(key).cloned().unwrap_or_default()
    }
}

/// Checks that `key`'s events reached the receiver one after another in order: a request for
/// event `n + 1` only ever came after event `n` was answered 200. With `duplicates`, an
/// event delivered already may come again (a crash repeats the attempt in flight), but never
/// once a later one has started.
pub(crate) fn assert_in_order(key: &str, seen: &[Seen], n: u64, duplicates: bool) {
    let mut delivered: Option<u64> = None; // the highest seq answered 200 so far
    for s in seen {
        let expected = delivered.map_or(0, |d| d + 1);
        if s.seq == expected {
            if s.status == 200 {
                delivered = Some(s.seq);
            }
            continue;
        }
        let repeat = delivered.is_some_and(|d| s.seq <= d);
        assert!(
            duplicates && repeat,
            "key {key}: event {} arrived while {expected} was due (delivered so far: {delivered:?}); requests: {:?}",
            s.seq,
            seen.iter().map(|s| (s.seq, s.status)).collect::<Vec<_>>()
        );
    }
    assert_eq!(delivered, n.checked_sub(1), "key {key}: every event delivered");
}

/// `EVENTS` events over `KEYS` keys (`k0`…), published in batches of 50 in acceptance order.
async fn publish(api: &Api, tag: &str) -> BTreeMap<String, u64> {
    let mut published = Published::default();
    publish_n(api, tag, EVENTS, &mut published).await;
    published.per_key
}

/// What was published: each key's event count, and each (key, seq)'s event id.
#[derive(Default)]
pub(crate) struct Published {
    pub(crate) per_key: BTreeMap<String, u64>,
    pub(crate) ids: BTreeMap<(String, u64), String>,
}

/// `n` more events over `KEYS` keys, in batches of 50, each key's `seq` going on from its
/// count so far. A batch answered `503` (the log could not take it: on Kafka, a broker that did
/// not answer within the producer's 30 s, as right after a process was SIGKILLed on a loaded
/// machine) is sent again with the same ids, as Herald asks of a producer; a Kafka write that
/// timed out may still have landed, so there a retry can add duplicates (that test allows them).
pub(crate) async fn publish_n(api: &Api, tag: &str, n: usize, published: &mut Published) {
    let mut batch = Vec::new();
    for i in 0..n {
        let (key, id) = (format!("k{}", (i * 7) % KEYS), format!("{tag}-{i}"));
        let seq = published.per_key.entry(key.clone()).or_default();
        published.ids.insert((key.clone(), *seq), id.clone());
        batch.push(json!({ "id": id, "type": "container.status.updated", "data": { "key": key, "seq": *seq } }));
        *seq += 1;
        if batch.len() == 50 {
            let batch = Value::Array(std::mem::take(&mut batch));
            until("the batch accepted (a 503 is sent again)", Duration::from_secs(120), || async {
                let (status, body) = api.post("/v1/events/batch", batch.clone()).await;
                (status != 503).then(|| assert_eq!(status, 202, "{body}"))
            })
            .await;
        }
    }
}

pub(crate) fn ordered_subscription(url: String) -> Value {
    json!({
        "url": url,
        "ordering": { "mode": "key", "key": "/data/key" },
        "retry": { "policy": "fixed", "interval": "50ms", "max_attempts": 100 },
    })
}

#[tokio::test]
async fn each_key_arrives_in_order_and_a_failing_key_holds_back_only_itself() {
    let h = TestHerald::start().await;
    let rx = OrderedReceiver::start(true).await;
    *rx.stuck.lock().unwrap() = Some("k0".into());
    let sub = h.api.subscribe(ordered_subscription(rx.url())).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    assert_eq!(sub["ordering"], json!({ "mode": "key", "key": "/data/key", "on_dead_letter": "skip" }));

    let started = Instant::now();
    let per_key = publish(&h.api, "ord").await;
    let others: BTreeMap<String, u64> =
        per_key.iter().filter(|(k, _)| *k != "k0").map(|(k, n)| (k.clone(), *n)).collect();

    // Every other key completes while k0 keeps failing.
    until("the 19 healthy keys delivered", Duration::from_secs(90), || async {
        (rx.complete(&others) == others.len()).then_some(())
    })
    .await;
    let healthy_done = started.elapsed();
    let k0 = rx.of("k0");
    assert!(k0.len() > 1, "k0's head was retried: {k0:?}");
    assert!(k0.iter().all(|s| s.seq == 0 && s.status == 503), "only k0's head was tried, and it failed: {k0:?}");

    // The blocked key is visible: the API, the metric and the head's attempts. The receiver
    // notes a 200 before Herald reads it, so a healthy key's last retry can still be in the list
    // for a moment after the receiver has every event: wait for Herald's view to settle.
    let blocked = until("only k0 listed as blocked", Duration::from_secs(30), || async {
        let (status, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        assert_eq!(status, 200, "{blocked}");
        (blocked["items"].as_array().map(Vec::len) == Some(1)).then_some(blocked)
    })
    .await;
    let items = blocked["items"].as_array().unwrap();
    assert_eq!(items[0]["key"], "k0");
    assert_eq!(items[0]["state"], "retrying");
    assert_eq!(items[0]["waiting"], per_key["k0"] - 1, "{blocked}");
    // 49 wait; 32 of them in memory, the rest in the log only.
    assert_eq!(items[0]["held"], 32, "{blocked}");
    let head = items[0]["head_event"].as_str().unwrap().to_string();
    assert_eq!(scrape(&h.api).await.value("herald_ordered_keys_blocked", &[]), 1.0);
    let (_, attempts) = h.api.get(&format!("/v1/attempts?event={head}")).await;
    let attempts = attempts["items"].as_array().unwrap();
    assert!(!attempts.is_empty() && attempts.iter().all(|a| a["ordering_key"] == "k0"), "{attempts:?}");

    // k0 recovers: its events follow, in order.
    *rx.stuck.lock().unwrap() = None;
    until("every key delivered", Duration::from_secs(90), || async {
        (rx.complete(&per_key) == per_key.len()).then_some(())
    })
    .await;
    for (key, n) in &per_key {
        assert_in_order(key, &rx.of(key), *n, false);
    }
    let total: usize = per_key.keys().map(|k| rx.of(k).iter().filter(|s| s.status == 200).count()).sum();
    assert_eq!(total, EVENTS, "each event delivered once");
    until("no key blocked", Duration::from_secs(10), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        blocked["items"].as_array().is_some_and(|i| i.is_empty()).then_some(())
    })
    .await;
    eprintln!(
        "ordered: 19 healthy keys' {} events in {healthy_done:?} while k0 failed",
        EVENTS - per_key["k0"] as usize
    );
}

#[tokio::test]
async fn a_dead_lettered_head_holds_its_key_until_an_operator_skips_it() {
    let h = TestHerald::start().await;
    let rx = OrderedReceiver::start(false).await;
    *rx.stuck.lock().unwrap() = Some("a".into());
    let sub_id =
        holding_subscription(&h.api, rx.url(), json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 2 }))
            .await;
    for (id, key, seq) in [("a0", "a", 0), ("a1", "a", 1), ("b0", "b", 0), ("a2", "a", 2)] {
        let (status, _) =
            h.api.post("/v1/events", json!({ "id": id, "type": "t", "data": { "key": key, "seq": seq } })).await;
        assert_eq!(status, 202);
    }
    // The event's own ordering_key wins over the pointer.
    let (status, _) = h
        .api
        .post("/v1/events", json!({ "id": "c0", "type": "t", "ordering_key": "c", "data": { "key": "c", "seq": 0 } }))
        .await;
    assert_eq!(status, 202);

    // The head can be dead-lettered before a2 is even read (two attempts 50 ms apart): wait for
    // both to be counted behind it.
    let blocked =
        until("key a held after its head is dead-lettered, two behind it", Duration::from_secs(30), || async {
            let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
            let item = blocked["items"].as_array()?.first()?.clone();
            (item["state"] == "dead_lettered" && item["waiting"] == 2).then_some(item)
        })
        .await;
    assert_eq!(
        (blocked["key"].as_str(), blocked["head_event"].as_str(), blocked["waiting"].as_u64()),
        (Some("a"), Some("a0"), Some(2))
    );
    let (_, dlq) = h.api.get("/v1/dlq").await;
    assert!(dlq["items"].as_array().unwrap().iter().any(|d| d["event_id"] == "a0"), "{dlq}");
    until("b and c delivered", Duration::from_secs(10), || async {
        (!rx.of("b").is_empty() && !rx.of("c").is_empty()).then_some(())
    })
    .await;
    assert!(rx.of("a").iter().all(|s| s.seq == 0), "a1 waits behind the held head: {:?}", rx.of("a"));

    // Skipping: a tenant's key of another tenant, a missing key, an unordered subscription.
    let (status, err) = h.api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), json!({})).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("key")), "{err}");
    let plain = h.api.subscribe(json!({ "url": format!("http://{}/plain", rx.addr) })).await;
    let (status, err) = h
        .api
        .post(&format!("/v1/subscriptions/{}/ordering/skip", plain["id"].as_str().unwrap()), json!({ "key": "a" }))
        .await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("ordering")), "{err}");

    *rx.stuck.lock().unwrap() = None;
    // A skip naming another head than the key's is not applied: once an event published after
    // it is through (markers and deliveries of a subscription are applied in log order), `a`
    // is still held.
    let skip = format!("/v1/subscriptions/{sub_id}/ordering/skip");
    let (status, body) = h.api.post(&skip, json!({ "key": "a", "event": "a1" })).await;
    assert_eq!(status, 202, "{body}");
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "b1", "type": "t", "data": { "key": "b", "seq": 1 } })).await;
    assert_eq!(status, 202);
    until("b1 delivered", Duration::from_secs(10), || async {
        rx.of("b").iter().any(|s| s.seq == 1 && s.status == 200).then_some(())
    })
    .await;
    let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
    assert_eq!(blocked["items"][0]["key"], "a", "a skip of another head left the key held: {blocked}");
    let (status, body) = h.api.post(&skip, json!({ "key": "a", "event": "a0" })).await;
    assert_eq!(status, 202, "{body}");
    let a = until("a1 and a2 delivered after the skip", Duration::from_secs(30), || async {
        let a = rx.of("a");
        (a.iter().filter(|s| s.status == 200).count() == 2).then_some(a)
    })
    .await;
    let delivered: Vec<u64> = a.iter().filter(|s| s.status == 200).map(|s| s.seq).collect();
    assert_eq!(delivered, [1, 2], "{a:?}");
    let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
    assert_eq!(blocked["items"], json!([]));
}

#[tokio::test]
async fn bad_ordering_settings_and_keys_are_refused_naming_the_field() {
    let h = TestHerald::start().await;
    for (ordering, field) in [
        (json!({ "mode": "sometimes" }), "ordering.mode"),
        (json!({ "key": "data/x" }), "ordering.key"),
        (json!({ "key": "/body/x" }), "ordering.key"),
        (json!({ "on_dead_letter": "retry" }), "ordering.on_dead_letter"),
        (json!({ "keys": "/data/x" }), "ordering.keys"),
    ] {
        let (status, err) =
            h.api.post("/v1/subscriptions", json!({ "url": "http://127.0.0.1:9/x", "ordering": ordering })).await;
        assert_eq!(status, 400, "{ordering}: {err}");
        assert_eq!(err["error"]["field"], field, "{ordering}: {err}");
    }
    for key in [json!(""), json!("x".repeat(256)), json!(7)] {
        let (status, err) = h.api.post("/v1/events", json!({ "type": "t", "data": {}, "ordering_key": key })).await;
        assert_eq!(status, 400, "{key}: {err}");
        assert_eq!(err["error"]["field"], "ordering_key", "{err}");
    }
}

#[tokio::test]
async fn order_holds_across_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let rx = OrderedReceiver::start(true).await;
    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    api.subscribe(ordered_subscription(rx.url())).await;
    let per_key = publish(&api, "kill").await;
    // Kill once delivery is well under way, not done.
    let delivered = || rx.seen.lock().unwrap().values().flatten().filter(|s| s.status == 200).count();
    until("a third delivered", Duration::from_secs(60), || async { (delivered() >= EVENTS / 3).then_some(()) }).await;
    child.kill();
    let at_kill = delivered();
    let (_child, _) = spawn_herald(dir.path());
    until("every key delivered after the restart", Duration::from_secs(120), || async {
        (rx.complete(&per_key) == per_key.len()).then_some(())
    })
    .await;
    for (key, n) in &per_key {
        assert_in_order(key, &rx.of(key), *n, true);
    }
    eprintln!("ordered across SIGKILL: {at_kill} of {EVENTS} delivered before the kill");
}

/// A sequencer that panics outside any one attempt (here its reader, while armed) is started
/// again from its partition's committed offset, its lanes rebuilt from the log: every key
/// still arrives complete and in order.
#[tokio::test]
async fn order_holds_when_a_sequencer_panics_and_is_started_again() {
    use herald::log::embedded::Fault;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    let (armed, fired) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicUsize::new(0)));
    let (flag, count) = (armed.clone(), fired.clone());
    let faults: herald::log::embedded::Faults = Some(Arc::new(move |fault: Fault<'_>| {
        if let Fault::Read(path) = fault {
            if flag.load(Ordering::SeqCst) && path.components().any(|c| c.as_os_str() == "herald.ordered") {
                count.fetch_add(1, Ordering::SeqCst);
                panic!("a bug in reading {}", path.display());
            }
        }
        Ok(())
    }));
    let extras = herald::server::Extras { faults, ..Default::default() };
    let h = TestHerald::start_with_extras(|c| c.log.partitions = 1, extras).await;
    let rx = OrderedReceiver::start(true).await;
    h.api.subscribe(ordered_subscription(rx.url())).await;
    let mut published = Published::default();
    publish_n(&h.api, "pre", 200, &mut published).await;
    let delivered = || rx.seen.lock().unwrap().values().flatten().filter(|s| s.status == 200).count();
    until("some delivered", Duration::from_secs(60), || async { (delivered() >= 50).then_some(()) }).await;
    // Armed until a worker panicked (the counter is the process's: other tests' count too, so
    // this test's own panics are counted in the hook).
    let before = scrape(&h.api).await.value("herald_partition_workers_panicked_total", &[]);
    armed.store(true, Ordering::SeqCst);
    publish_n(&h.api, "post", 200, &mut published).await;
    until("the sequencer panicked", Duration::from_secs(30), || async {
        let after = scrape(&h.api).await.value("herald_partition_workers_panicked_total", &[]);
        (fired.load(Ordering::SeqCst) > 0 && after > before).then_some(())
    })
    .await;
    armed.store(false, Ordering::SeqCst);
    let per_key = published.per_key;
    until("every key delivered after the restart", Duration::from_secs(120), || async {
        (rx.complete(&per_key) == per_key.len()).then_some(())
    })
    .await;
    for (key, n) in &per_key {
        assert_in_order(key, &rx.of(key), *n, true);
    }
}

/// A receiver of ordered events that answers 503 to all while `failing` is set, and counts,
/// per key, the requests it saw and the events it took.
#[derive(Clone, Default)]
struct SwitchedReceiver {
    failing: Arc<std::sync::atomic::AtomicBool>,
    tried: Arc<Mutex<BTreeMap<String, usize>>>,
    taken: Arc<Mutex<BTreeMap<String, usize>>>,
}

/// Serves `answer(key, envelope)` for each request on a loopback listener (`key`: the
/// event's `data.key`); the URL to subscribe.
async fn serve_keyed<F, Fut>(answer: F) -> String
where
    F: Fn(String, Value) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}/ordered", listener.local_addr().unwrap());
    serve_http1(listener, move |req: Request<hyper::body::Incoming>| {
        let answer = answer.clone();
        async move {
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            let envelope: Value = serde_json::from_slice(&body).unwrap_or_default();
            answer(envelope["data"]["key"].as_str().unwrap_or("?").to_string(), envelope).await
        }
    });
    url
}

impl SwitchedReceiver {
    async fn start() -> (SwitchedReceiver, String) {
        let r = SwitchedReceiver::default();
        let state = r.clone();
        let url = serve_keyed(move |key: String, _| {
            let state = state.clone();
            async move {
                *state.tried.lock().unwrap().entry(key.clone()).or_default() += 1;
                let status = if state.failing.load(std::sync::atomic::Ordering::SeqCst) {
                    503
                } else {
                    *state.taken.lock().unwrap().entry(key).or_default() += 1;
                    200
                };
                Response::builder().status(status).body(Full::new(Bytes::new())).unwrap()
            }
        })
        .await;
        (r, url)
    }

    fn fail(&self, failing: bool) {
        self.failing.store(failing, std::sync::atomic::Ordering::SeqCst);
    }

    /// Keys starting with `prefix` that were tried, and that were delivered.
    fn counts(&self, prefix: &str) -> (usize, usize) {
        let of =
            |m: &Mutex<BTreeMap<String, usize>>| m.lock().unwrap().keys().filter(|k| k.starts_with(prefix)).count();
        (of(&self.tried), of(&self.taken))
    }
}

/// A server with one partition and no breaker: a key whose receiver is down retries, rather
/// than wait out a pause.
async fn one_partition() -> TestHerald {
    TestHerald::start_with(one_partition_no_breaker).await
}

fn one_partition_no_breaker(c: &mut herald::config::Config) {
    c.log.partitions = 1;
    c.health.breaker_failures = 1_000_000;
}

/// As [`one_partition`], of at most two keys.
async fn two_keys_a_partition() -> TestHerald {
    TestHerald::start_with(|c| {
        one_partition_no_breaker(c);
        c.dispatch.ordered_max_keys = 2;
    })
    .await
}

/// A subscription ordered by `data.key` that holds a key after a dead letter
/// (`"on_dead_letter": "block"`), with `retry`; its id.
async fn holding_subscription(api: &Api, url: impl Into<String>, retry: Value) -> String {
    let sub = api
        .subscribe(json!({
            "url": url.into(),
            "ordering": { "key": "/data/key", "on_dead_letter": "block" },
            "retry": retry,
        }))
        .await;
    sub["id"].as_str().unwrap().to_string()
}

/// One event for each of `n` new keys `{prefix}0`…, in one batch.
async fn one_event_per_key(api: &Api, prefix: &str, n: usize) {
    let events: Vec<Value> = (0..n)
        .map(|i| json!({ "type": "container.status.updated", "data": { "key": format!("{prefix}{i}"), "seq": 0 } }))
        .collect();
    let (status, body) = api.post("/v1/events/batch", Value::Array(events)).await;
    assert_eq!(status, 202, "{body}");
}

/// A partition holding as many keys as it may (`dispatch.ordered_max_keys`) reads on as they
/// settle — and a sequencer started on such a partition (a restart, a Kafka takeover) does
/// not wait for ever to read markers that lie past the cap.
#[tokio::test]
async fn an_ordered_partition_at_its_key_cap_goes_on_as_keys_settle_and_after_a_restart() {
    const CAP: usize = 20;
    let h = TestHerald::start_with(|c| {
        c.log.partitions = 1;
        c.dispatch.ordered_max_keys = CAP;
        // The receiver is down on purpose: its keys retry, rather than wait out a breaker.
        c.health.breaker_failures = 1_000_000;
    })
    .await;
    let (rx, url) = SwitchedReceiver::start().await;
    h.api.subscribe(ordered_subscription(url)).await;

    // Three times the cap of keys, the receiver down: only the cap's worth are tried.
    rx.fail(true);
    one_event_per_key(&h.api, "a", 3 * CAP).await;
    until("the cap's worth of keys tried", Duration::from_secs(30), || async {
        (rx.counts("a").0 >= CAP).then_some(())
    })
    .await;
    let retried = |prefix: &'static str| {
        let rx = rx.clone();
        move || {
            let rx = rx.clone();
            async move {
                let tried = rx.tried.lock().unwrap();
                (tried.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, n)| n).sum::<usize>() >= 3 * CAP)
                    .then_some(())
            }
        }
    };
    until("the first keys retried", Duration::from_secs(30), retried("a")).await;
    assert_eq!(rx.counts("a").0, CAP, "keys past the cap wait");
    // Up again: as keys settle the rest are read and delivered.
    rx.fail(false);
    until("every key delivered", Duration::from_secs(60), || async { (rx.counts("a").1 == 3 * CAP).then_some(()) })
        .await;

    // At the cap again, then a restart: its sequencer replays to the cap, and goes on.
    rx.fail(true);
    one_event_per_key(&h.api, "b", 3 * CAP).await;
    until("the cap's worth of keys tried", Duration::from_secs(30), || async {
        (rx.counts("b").0 >= CAP).then_some(())
    })
    .await;
    until("the first keys retried", Duration::from_secs(30), retried("b")).await;
    let h = h.restart().await;
    rx.fail(false);
    until("every key delivered after the restart", Duration::from_secs(60), || async {
        (rx.counts("b").1 == 3 * CAP).then_some(())
    })
    .await;
    drop(h);
}

/// A key released by an operator after a dead letter held it: its later deliveries' retry
/// budgets (`max_age`) start no earlier than the release — they waited for the operator, not
/// their receiver. Counted from acceptance, one held past it got a single attempt, and its
/// first failure dead-lettered it.
#[tokio::test]
async fn deliveries_held_behind_a_blocked_head_keep_their_retries_after_the_release() {
    let retry = json!({ "policy": "exponential", "initial": "100ms", "max_interval": "200ms", "max_attempts": 20, "max_age": "2s" });
    release_a_delivery_held_past_its_max_age(retry, Duration::from_secs(2), false).await;
}

/// The same after a restart that begins past the released head: the release is read back from
/// the log (the head's dead letter, then its settling), not forgotten, and the held
/// delivery's retries still count from it, not from its acceptance. (A `max_age` of 10 s: a
/// restart on Kafka, its group joined again, takes seconds of it.)
#[tokio::test]
async fn held_deliveries_keep_their_retries_after_the_release_across_a_restart() {
    let retry = json!({ "policy": "exponential", "initial": "300ms", "max_interval": "300ms", "max_attempts": 100, "max_age": "10s" });
    release_a_delivery_held_past_its_max_age(retry, Duration::from_secs(10), true).await;
}

/// A key's head dead-lettered past `max_age` (the subscription's `retry`), a delivery held
/// behind it past its own, then released by an operator (the server restarted after its first
/// attempt, with `restart`): it is retried and delivered, the head the only dead letter.
async fn release_a_delivery_held_past_its_max_age(retry: Value, max_age: Duration, restart: bool) {
    let h = TestHerald::start_with(|c| c.health.breaker_failures = 1_000_000).await;
    let (rx, url) = SwitchedReceiver::start().await;
    let sub_id = holding_subscription(&h.api, url, retry).await;
    rx.fail(true);
    let published = tokio::time::Instant::now();
    for seq in 0..2 {
        let (status, _) = h.api.post("/v1/events", json!({ "type": "t", "data": { "key": "a", "seq": seq } })).await;
        assert_eq!(status, 202);
    }
    until("the head dead-lettered past its max_age, the key held", Duration::from_secs(30), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        (blocked["items"][0]["state"] == "dead_lettered" && blocked["items"][0]["waiting"] == 1).then_some(())
    })
    .await;
    // Not synchronisation: the scenario is a delivery held past its own max_age (after its
    // acceptance) before the operator releases the key.
    tokio::time::sleep_until(published + max_age + Duration::from_secs(1)).await;
    let tried = rx.tried.lock().unwrap()["a"];
    release_and_see_it_retried(h, &rx, &sub_id, json!({ "key": "a" }), tried, restart).await;
}

/// Key `a`'s held head skipped with `skip`, `tried` requests of the key seen before: the held
/// delivery's first attempt fails, then (after a restart, with `restart`) it is retried and
/// delivered, the skipped head the only dead letter.
async fn release_and_see_it_retried(
    h: TestHerald,
    rx: &SwitchedReceiver,
    sub_id: &str,
    skip: Value,
    tried: usize,
    restart: bool,
) {
    assert_eq!(h.api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), skip).await.0, 202);
    until("the held delivery's first attempt (failing)", Duration::from_secs(10), || async {
        (rx.tried.lock().unwrap()["a"] > tried).then_some(())
    })
    .await;
    let h = if restart { h.restart().await } else { h };
    rx.fail(false);
    until("the held delivery retried and delivered", Duration::from_secs(30), || async {
        rx.taken.lock().unwrap().contains_key("a").then_some(())
    })
    .await;
    let (_, dlq) = h.api.get(&format!("/v1/dlq?subscription={sub_id}")).await;
    assert_eq!(dlq["items"].as_array().unwrap().len(), 1, "only the skipped head is a dead letter: {dlq}");
}

/// As the README has it, the operator's skip names the held head's event; the key's next
/// delivery, published after the head was held, becomes its head, and the partition is
/// committed past the head's `Blocked` marker. A restart that begins there never reads that
/// marker, and the skip (naming the old head) does not match the new one: the settling marker
/// itself must say it released the key, or the held delivery's retries count from its
/// acceptance and it is dead-lettered at its next failure, long past its `max_age`.
#[tokio::test]
async fn a_release_read_back_after_a_restart_past_the_hold_keeps_the_retries() {
    let h = TestHerald::start_with(|c| c.health.breaker_failures = 1_000_000).await;
    let (rx, url) = SwitchedReceiver::start().await;
    let retry = json!({ "policy": "exponential", "initial": "300ms", "max_interval": "300ms", "max_attempts": 100, "max_age": "10s" });
    let sub_id = holding_subscription(&h.api, url, retry).await;
    rx.fail(true);
    let blocked = || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        blocked["items"][0].clone()
    };
    let event = |id: &str, seq: u64| json!({ "id": id, "type": "t", "data": { "key": "a", "seq": seq } });
    assert_eq!(h.api.post("/v1/events", event("a0", 0)).await.0, 202);
    until("the head held after its dead letter", Duration::from_secs(30), || async {
        (blocked().await["state"] == "dead_lettered").then_some(())
    })
    .await;
    let published = tokio::time::Instant::now();
    assert_eq!(h.api.post("/v1/events", event("a1", 1)).await.0, 202);
    until("the next delivery held behind it", Duration::from_secs(10), || async {
        (blocked().await["waiting"] == 1).then_some(())
    })
    .await;
    // Not synchronisation: the scenario is a delivery held past its own max_age (after its
    // acceptance) before the operator releases the key.
    tokio::time::sleep_until(published + Duration::from_secs(11)).await;
    let tried = rx.tried.lock().unwrap()["a"];
    release_and_see_it_retried(h, &rx, &sub_id, json!({ "key": "a", "event": "a0" }), tried, true).await;
}

/// An operator's skip that names no event acts on the key's head when it is read. After a
/// restart that begins past the head it acted on (that head settled, the next one under way),
/// reading it back must not skip the next head too: it was the older head's (its settling
/// follows it in the log).
#[tokio::test]
async fn a_skip_read_back_after_a_restart_does_not_skip_the_next_head() {
    let h = TestHerald::start_with(|c| c.health.breaker_failures = 1_000_000).await;
    let rx = OrderedReceiver::start(false).await;
    *rx.stuck.lock().unwrap() = Some("a".into());
    let sub_id =
        holding_subscription(&h.api, rx.url(), json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 2 }))
            .await;
    for seq in 0..3 {
        let (status, _) = h
            .api
            .post("/v1/events", json!({ "id": format!("a{seq}"), "type": "t", "data": { "key": "a", "seq": seq } }))
            .await;
        assert_eq!(status, 202);
    }
    until("a0 dead-lettered, two behind it", Duration::from_secs(30), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        let item = blocked["items"].as_array()?.first()?.clone();
        (item["state"] == "dead_lettered" && item["waiting"] == 2).then_some(())
    })
    .await;
    // a1 is to fail and wait for its next attempt when the server restarts.
    let (status, body) = h
        .api
        .patch(
            &format!("/v1/subscriptions/{sub_id}"),
            json!({ "retry": { "policy": "fixed", "interval": "2s", "max_attempts": 100 } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = h.api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), json!({ "key": "a" })).await;
    assert_eq!(status, 202);
    until("a1 tried once (failing)", Duration::from_secs(10), || async {
        rx.of("a").iter().any(|s| s.seq == 1).then_some(())
    })
    .await;
    let h = h.restart().await;
    *rx.stuck.lock().unwrap() = None;
    let a = until("a1 and a2 delivered after the restart", Duration::from_secs(20), || async {
        let a = rx.of("a");
        (a.iter().filter(|s| s.status == 200).count() == 2).then_some(a)
    })
    .await;
    let delivered: Vec<u64> = a.iter().filter(|s| s.status == 200).map(|s| s.seq).collect();
    assert_eq!(delivered, [1, 2], "{a:?}");
    let (_, dlq) = h.api.get(&format!("/v1/dlq?subscription={sub_id}")).await;
    let dead: Vec<&str> = dlq["items"].as_array().unwrap().iter().filter_map(|d| d["event_id"].as_str()).collect();
    assert_eq!(dead, ["a0"], "only the head the operator skipped: {dlq}");
}

/// A held key is let go when its subscription no longer holds keys (deleted, or set to
/// `skip`) — not when its record cannot be read here (a newer version wrote it): what it says
/// is then unknown, and the key stays held, as its deliveries wait.
#[tokio::test]
async fn a_key_stays_held_while_its_subscription_cannot_be_read() {
    let h = one_partition().await;
    let (rx, url) = SwitchedReceiver::start().await;
    rx.fail(true);
    let retry = json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 2 });
    let hold = |events: &str, url: String| json!({ "url": url, "events": [events], "ordering": { "key": "/data/key", "on_dead_letter": "block" }, "retry": retry });
    let unread = h.api.subscribe(hold("A", format!("{url}?a"))).await["id"].as_str().unwrap().to_string();
    let changed = h.api.subscribe(hold("B", format!("{url}?b"))).await["id"].as_str().unwrap().to_string();
    for (kind, key) in [("A", "a"), ("B", "b")] {
        for seq in 0..2 {
            let (status, _) =
                h.api.post("/v1/events", json!({ "type": kind, "data": { "key": key, "seq": seq } })).await;
            assert_eq!(status, 202);
        }
    }
    for sub in [&unread, &changed] {
        until("the key held after its head's dead letter", Duration::from_secs(30), || async {
            let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub}/ordering/blocked")).await;
            (blocked["items"][0]["state"] == "dead_lettered").then_some(())
        })
        .await;
    }
    // A record of `unread` this version cannot read (an auth type it does not know).
    let record = herald::log::Record {
        key: bytes::Bytes::from(unread.clone()),
        value: bytes::Bytes::from(json!({ "id": unread, "auth": { "type": "signed-jwt-v9" } }).to_string()),
    };
    h.herald.log().append("herald.subscriptions", vec![record]).await.unwrap();
    until("the record read (and not understood)", Duration::from_secs(10), || async {
        (h.api.get(&format!("/v1/subscriptions/{unread}")).await.0 == 404).then_some(())
    })
    .await;
    // `changed` no longer holds keys: the next sweep lets its key go; its next delivery is
    // tried (twice) and dead-lettered without holding it again.
    let (status, body) = h
        .api
        .patch(
            &format!("/v1/subscriptions/{changed}"),
            json!({ "ordering": { "key": "/data/key", "on_dead_letter": "skip" } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    until(
        "the changed subscription's key let go, its next delivery dead-lettered",
        Duration::from_secs(30),
        || async {
            let (_, dlq) = h.api.get(&format!("/v1/dlq?subscription={changed}")).await;
            (dlq["items"].as_array()?.len() == 2).then_some(())
        },
    )
    .await;
    // Its key leaves the list once the dead letter's marker is durable, a moment after the
    // dead letter itself is listed.
    until("the changed subscription's key no longer listed", Duration::from_secs(10), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{changed}/ordering/blocked")).await;
        blocked["items"].as_array()?.is_empty().then_some(())
    })
    .await;
    let blocked = scrape(&h.api).await.value("herald_ordered_keys_blocked", &[]);
    assert_eq!(blocked, 1.0, "the unreadable subscription's key is still held");
}

/// A skipped head is counted under its subscription's transport (it was `webhook` for all).
#[tokio::test]
async fn a_skipped_head_is_counted_under_its_own_transport() {
    // A process of its own: the counters are per process.
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = crate::support::spawn_herald_with(dir.path(), &[]);
    let api = Api::new(addr, crate::support::TOKEN);
    let (status, device) = api.post("/v1/edge-devices", json!({ "name": "gw" })).await;
    assert_eq!(status, 201, "{device}");
    // No agent connects: the head fails (edge offline) and waits an hour for its next attempt.
    let sub = api
        .subscribe(json!({
            "url": "http://10.9.8.7/hook", "via_edge": device["id"],
            "ordering": { "key": "/data/key" },
            "retry": { "policy": "fixed", "interval": "1h", "max_attempts": 10 },
        }))
        .await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    api.post("/v1/events", json!({ "type": "t", "data": { "key": "a" } })).await;
    until("the head retrying", Duration::from_secs(20), || async {
        let (_, blocked) = api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        (blocked["items"][0]["state"] == "retrying").then_some(())
    })
    .await;
    let (status, _) = api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), json!({ "key": "a" })).await;
    assert_eq!(status, 202);
    let dead = |transport: &'static str| {
        let api = api.clone();
        async move {
            crate::support::metrics::scrape(&api)
                .await
                .value("herald_deliveries_total", &[("transport", transport), ("outcome", "dead_lettered")])
        }
    };
    until("the skip counted as an edge dead letter", Duration::from_secs(20), || async {
        (dead("edge").await == 1.0).then_some(())
    })
    .await;
    assert_eq!(dead("webhook").await, 0.0);
}

/// A partition whose every key is held after a dead letter, at its cap of keys, still takes an
/// operator's skip: it lies past a delivery of a key not open yet, and reading stopped there.
#[tokio::test]
async fn a_skip_frees_a_partition_whose_keys_are_all_held_at_its_cap() {
    let h = two_keys_a_partition().await;
    let (rx, url) = SwitchedReceiver::start().await;
    let sub_id =
        holding_subscription(&h.api, url, json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 2 })).await;
    rx.fail(true);
    one_event_per_key(&h.api, "a", 3).await;
    until("two keys held after a dead letter", Duration::from_secs(30), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        let items = blocked["items"].as_array()?.clone();
        (items.len() == 2 && items.iter().all(|i| i["state"] == "dead_lettered")).then_some(())
    })
    .await;
    rx.fail(false);
    let (status, body) = h.api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), json!({ "key": "a0" })).await;
    assert_eq!(status, 202, "{body}");
    until("the third key delivered once the skip freed a place", Duration::from_secs(30), || async {
        rx.taken.lock().unwrap().contains_key("a2").then_some(())
    })
    .await;
    assert!(!rx.taken.lock().unwrap().contains_key("a1"), "a1 is still held");
}

/// A receiver for keys `a` and `b`: requests of `b` fail at once while `b_fails` (its head
/// holds the partition's commit point where it is), each of `a` takes 1 s and succeeds. It
/// counts the requests of each key under way at once, and the most ever.
#[derive(Clone, Default)]
struct OverlapReceiver {
    b_fails: Arc<std::sync::atomic::AtomicBool>,
    busy: Arc<Mutex<BTreeMap<String, (usize, usize)>>>,
    taken: Arc<Mutex<Vec<u64>>>,
}

impl OverlapReceiver {
    async fn start() -> (OverlapReceiver, String) {
        let r = OverlapReceiver::default();
        let state = r.clone();
        let url = serve_keyed(move |key: String, envelope: Value| {
            let state = state.clone();
            async move {
                if key == "b" {
                    let fails = state.b_fails.load(std::sync::atomic::Ordering::SeqCst);
                    return Response::builder()
                        .status(if fails { 503 } else { 200 })
                        .body(Full::new(Bytes::new()))
                        .unwrap();
                }
                {
                    let mut busy = state.busy.lock().unwrap();
                    let (now, most) = busy.entry(key.clone()).or_default();
                    *now += 1;
                    *most = (*most).max(*now);
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
                state.busy.lock().unwrap().get_mut(&key).unwrap().0 -= 1;
                state.taken.lock().unwrap().push(envelope["data"]["seq"].as_u64().unwrap_or(u64::MAX));
                Response::builder().status(200).body(Full::new(Bytes::new())).unwrap()
            }
        })
        .await;
        (r, url)
    }

    fn most(&self, key: &str) -> usize {
        self.busy.lock().unwrap().get(key).map_or(0, |b| b.1)
    }
}

/// A sequencer that replays a partition whose heads were settled by the last one (a restart,
/// a takeover) may attempt such a head again before it reads the marker that says so (its
/// replay went live at the cap of keys, and reads on as another key settles): that marker
/// then waits for the attempt under way, and the key's next delivery starts after it, never
/// beside it.
#[tokio::test]
async fn a_settled_marker_read_during_a_repeated_attempt_does_not_start_the_next_beside_it() {
    let h = two_keys_a_partition().await;
    let (rx, url) = OverlapReceiver::start().await;
    rx.b_fails.store(true, std::sync::atomic::Ordering::SeqCst);
    h.api.subscribe(ordered_subscription(url)).await;
    let event = |key: &str, seq: u64| json!({ "type": "container.status.updated", "data": { "key": key, "seq": seq } });
    let (status, _) = h.api.post("/v1/events/batch", json!([event("b", 0), event("a", 0), event("a", 1)])).await;
    assert_eq!(status, 202);
    until("a's events delivered", Duration::from_secs(30), || async {
        (rx.taken.lock().unwrap().len() >= 2).then_some(())
    })
    .await;
    let h = h.restart().await;
    // Replayed to the cap (b, a): a's first event is attempted again; b settles, and the
    // markers after it are read while that attempt is under way.
    rx.b_fails.store(false, std::sync::atomic::Ordering::SeqCst);
    let (status, _) = h.api.post("/v1/events/batch", json!([event("a", 2), event("a", 3)])).await;
    assert_eq!(status, 202);
    until("a's later events delivered", Duration::from_secs(30), || async {
        let taken = rx.taken.lock().unwrap();
        (taken.contains(&2) && taken.contains(&3)).then_some(())
    })
    .await;
    assert_eq!(rx.most("a"), 1, "two of a key's deliveries under way at once: {:?}", rx.taken.lock().unwrap());
    drop(h);
}

/// The ordered topic's sequencer has a window of attempts per partition too: heads of a
/// subscription whose endpoint hangs (as many as its slots, here the whole window) must not
/// hold up another subscription's keys there for their whole timeout. An attempt in flight
/// past a second counts apart, as in the shards.
#[tokio::test]
async fn hanging_heads_of_one_subscription_do_not_hold_up_another_s_keys() {
    let h = TestHerald::start_with(|c| {
        c.log.partitions = 1;
        c.dispatch.window = 8;
    })
    .await;
    let hanging = serve_keyed(|_, _| std::future::pending()).await;
    let seen = Arc::new(Mutex::new(Vec::<(String, Instant)>::new()));
    let log = seen.clone();
    let fine = serve_keyed(move |key, _| {
        log.lock().unwrap().push((key, Instant::now()));
        async { Response::builder().status(200).body(Full::new(Bytes::new())).unwrap() }
    })
    .await;
    let ordering = json!({ "mode": "key", "key": "/data/key" });
    h.api
        .subscribe(json!({ "url": hanging, "ordering": ordering, "max_in_flight": 8, "timeout": "5s",
            "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 2 } }))
        .await;
    h.api.subscribe(json!({ "url": fine, "ordering": ordering })).await;
    let mut sent = std::collections::HashMap::new();
    for i in 0..40 {
        let key = format!("k{i}");
        sent.insert(key.clone(), Instant::now());
        let event = json!({ "type": "container.status.updated", "data": { "key": key, "seq": 0 } });
        assert_eq!(h.api.post("/v1/events", event).await.0, 202);
        tokio::time::sleep(Duration::from_millis(20)).await; // pacing the producer, not synchronisation
    }
    let got = until("every key at the healthy endpoint", Duration::from_secs(30), || {
        let got = seen.lock().unwrap().clone();
        async move { (got.len() >= 40).then_some(got) }
    })
    .await;
    let worst = got.iter().map(|(k, at)| *at - sent[k]).max().unwrap();
    eprintln!("ordered head-of-line test: worst healthy latency {worst:?}");
    // A second's aging and this machine's slack; before, the attempts' whole timeout (5.7 s
    // with a 3 s one).
    assert!(worst < Duration::from_millis(2500), "the healthy subscription's keys waited {worst:?}");
}

/// Ordered heads are bounded per tenant as the shards' deliveries are: one tenant's keys to an
/// endpoint that hangs — more of them than the partition's window holds twice over — do not
/// hold another tenant's ordered deliveries on the partition for their whole timeout.
#[tokio::test]
async fn a_tenant_s_hanging_ordered_keys_do_not_hold_another_tenant_s() {
    let h = TestHerald::start_with(|c| {
        c.log.partitions = 1;
        c.dispatch.window = 8;
    })
    .await;
    let rx = crate::support::Receiver::start().await;
    rx.behave("/stuck", crate::support::Behaviour::Hang);
    let ordered = json!({ "mode": "key", "key": "/data/key" });
    let retry = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 2 });
    h.api
        .subscribe(json!({ "url": rx.url("/stuck"), "tenant": "mallory", "ordering": ordered, "timeout": "5s",
                           "max_in_flight": 32, "retry": retry }))
        .await;
    h.api.subscribe(json!({ "url": rx.url("/fast"), "ordering": ordered })).await;
    for i in 0..24 {
        let event =
            json!({ "id": format!("m{i}"), "type": "T", "tenant": "mallory", "data": { "key": format!("k{i}") } });
        assert_eq!(h.api.post("/v1/events", event).await.0, 202);
    }
    // Once Mallory's heads have aged and filled what they may, the other tenant's keys pass.
    let got = until("Mallory's heads in flight", Duration::from_secs(10), || {
        let n = rx.on("/stuck").len();
        async move { (n >= 12).then_some(()) }
    });
    got.await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // lets them age past window::YOUNG: the case under test
    let sent = Instant::now();
    for i in 0..5 {
        let event = json!({ "id": format!("a{i}"), "type": "T", "data": { "key": format!("a{i}") } });
        assert_eq!(h.api.post("/v1/events", event).await.0, 202);
    }
    rx.wait_on("/fast", 5).await;
    let took = sent.elapsed();
    assert!(took < Duration::from_millis(2500), "another tenant's ordered deliveries waited {took:?}");
}

/// Each key with something outstanding holds its head; held whole, a tenant's keys failing
/// on purpose held every head's record in memory — ten thousand keys of a megabyte, ten
/// gigabytes a partition. Heads' records take at most 32 MiB a partition: past that, and once
/// they fail, they are read back from the log when attempted, and still delivered whole.
#[tokio::test]
async fn failing_heads_keep_a_bounded_number_of_bytes_in_memory_and_are_read_back_whole() {
    if crate::support::on_kafka() {
        // librdkafka's mock cluster keeps only the last few megabytes of a partition (its low
        // watermark rises past 40 MB of heads), so read-backs would find them gone; the bound
        // is the sequencer's, the same on both backends.
        return;
    }
    let h = one_partition().await;
    let (rx, url) = SwitchedReceiver::start().await;
    let sub_id =
        holding_subscription(&h.api, url, json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1000 })).await;
    rx.fail(true);
    let keys = 44; // 900 KB each: about 40 MB of heads, past the 32 MiB held
    for i in 0..keys {
        let event = json!({ "type": "T", "data": { "key": format!("big{i}"), "pad": "x".repeat(900_000) } });
        let (status, body) = h.api.post("/v1/events", event).await;
        assert_eq!(status, 202, "{body}");
    }
    until("every head attempted and failing", Duration::from_secs(60), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        (blocked["items"].as_array()?.len() == keys && rx.counts("big").0 == keys).then_some(())
    })
    .await;
    let held = scrape(&h.api).await.value("herald_ordered_held_bytes", &[]);
    assert!(held > 0.0 && held <= (32 << 20) as f64, "{held} bytes of heads held");

    rx.fail(false);
    until("every key delivered, read back whole", Duration::from_secs(60), || async {
        (rx.counts("big").1 == keys).then_some(())
    })
    .await;
    until("nothing held once every key settled", Duration::from_secs(10), || async {
        (scrape(&h.api).await.value("herald_ordered_held_bytes", &[]) == 0.0).then_some(())
    })
    .await;
}

/// The same for a `Blocked` marker: a replay that went live at the cap of keys attempts a
/// head again that the last run dead-lettered, and reads that run's `Blocked` marker while the
/// attempt is under way. Held at once, the key was listed dead-lettered and an operator's skip
/// started its next delivery beside the attempt; it is held once the attempt ends.
#[tokio::test]
async fn a_blocked_marker_read_during_a_repeated_attempt_holds_the_key_once_it_ends() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    let h = two_keys_a_partition().await;
    let b_fails = Arc::new(AtomicBool::new(true));
    let a0_takes = Arc::new(AtomicU64::new(0));
    let busy = Arc::new(Mutex::new((0usize, 0usize))); // key a's requests under way, and the most
    let taken = Arc::new(Mutex::new(Vec::<u64>::new()));
    let url = serve_keyed({
        let (b_fails, a0_takes, busy, taken) = (b_fails.clone(), a0_takes.clone(), busy.clone(), taken.clone());
        move |key: String, envelope: Value| {
            let (b_fails, a0_takes, busy, taken) = (b_fails.clone(), a0_takes.clone(), busy.clone(), taken.clone());
            async move {
                let answer = |status: u16| Response::builder().status(status).body(Full::new(Bytes::new())).unwrap();
                if key == "b" {
                    return answer(if b_fails.load(SeqCst) { 503 } else { 200 });
                }
                let seq = envelope["data"]["seq"].as_u64().unwrap_or(u64::MAX);
                {
                    let mut b = busy.lock().unwrap();
                    b.0 += 1;
                    b.1 = b.1.max(b.0);
                }
                // The receiver's own pace: a0 fails (slowly after the restart), the rest succeed.
                let (takes, status) = if seq == 0 { (a0_takes.load(SeqCst), 503) } else { (200, 200) };
                tokio::time::sleep(Duration::from_millis(takes)).await;
                busy.lock().unwrap().0 -= 1;
                if status == 200 {
                    taken.lock().unwrap().push(seq);
                }
                answer(status)
            }
        }
    })
    .await;
    let retry = json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 20 });
    let sub_id = holding_subscription(&h.api, url, retry).await;
    let event = |key: &str, seq: u64| json!({ "type": "container.status.updated", "data": { "key": key, "seq": seq } });
    let (status, _) = h.api.post("/v1/events/batch", json!([event("b", 0), event("a", 0), event("a", 1)])).await;
    assert_eq!(status, 202);
    let states = |api: Api| {
        let sub_id = sub_id.clone();
        async move {
            let (_, blocked) = api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
            let items = blocked["items"].as_array().cloned().unwrap_or_default();
            items.iter().map(|i| (i["key"].as_str().unwrap_or("").to_string(), i["state"].clone())).collect::<Vec<_>>()
        }
    };
    until("both heads dead-lettered, their keys held", Duration::from_secs(30), || async {
        let states = states(h.api.clone()).await;
        (states.len() == 2 && states.iter().all(|(_, s)| s == "dead_lettered")).then_some(())
    })
    .await;
    // Replayed to the cap (b, a): both heads attempted again; b's succeeds, and the markers
    // after it (a0's `Blocked` among them) are read while a0's, slow now, is under way.
    b_fails.store(false, SeqCst);
    a0_takes.store(3000, SeqCst);
    let h = h.restart().await;
    until("key a held again", Duration::from_secs(30), || async {
        states(h.api.clone()).await.iter().any(|(k, s)| k == "a" && s == "dead_lettered").then_some(())
    })
    .await;
    let (status, body) = h.api.post(&format!("/v1/subscriptions/{sub_id}/ordering/skip"), json!({ "key": "a" })).await;
    assert_eq!(status, 202, "{body}");
    until("a's next event delivered", Duration::from_secs(30), || async {
        taken.lock().unwrap().contains(&1).then_some(())
    })
    .await;
    assert_eq!(busy.lock().unwrap().1, 1, "two of a key's deliveries under way at once");
}

/// A key held after a dead letter holds its partition's commit point, so every tenant's
/// records of that `ordered` partition stay on disk behind it: one tenant's held key grew the
/// embedded log without bound. Held longer than `log.retention` (past which a Kafka broker
/// deletes the records anyway), it goes on by itself, as one whose subscription was deleted —
/// held that long, counted from its dead letter: its head, retried for longer than the
/// retention before it, is not let go at once.
#[tokio::test]
async fn a_key_held_longer_than_the_log_retention_goes_on_by_itself() {
    const RETENTION: Duration = Duration::from_secs(12);
    let h = TestHerald::start_with(|c| {
        c.log.retention = RETENTION.into();
        c.health.breaker_failures = 1_000_000;
    })
    .await;
    let rx = OrderedReceiver::start(false).await;
    *rx.stuck.lock().unwrap() = Some("a".into());
    // The head is dead-lettered about 14 s after it was accepted, older than the retention.
    let retry = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 15 });
    let sub_id = holding_subscription(&h.api, rx.url(), retry).await;
    for (id, seq) in [("a0", 0), ("a1", 1)] {
        let (status, _) =
            h.api.post("/v1/events", json!({ "id": id, "type": "t", "data": { "key": "a", "seq": seq } })).await;
        assert_eq!(status, 202);
    }
    until("key a held after its head is dead-lettered", Duration::from_secs(40), || async {
        let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
        (blocked["items"][0]["state"] == "dead_lettered").then_some(())
    })
    .await;
    let held = Instant::now();
    *rx.stuck.lock().unwrap() = None;
    // The sweep looks every 10 s.
    until("a1 delivered once the hold outlived the retention", RETENTION + Duration::from_secs(30), || async {
        rx.of("a").iter().any(|s| s.seq == 1 && s.status == 200).then_some(())
    })
    .await;
    assert!(held.elapsed() >= RETENTION - Duration::from_secs(1), "let go after {:?} held", held.elapsed());
    let (_, blocked) = h.api.get(&format!("/v1/subscriptions/{sub_id}/ordering/blocked")).await;
    assert_eq!(blocked["items"], json!([]));
}

/// A rewind (`recover` with `all`) sends an ordered key's events again in the order they were
/// accepted. A batch's events share their millisecond, and the history finds one
/// millisecond's events in the order of their ids' hashes: a key's status updates published in
/// one request came back shuffled, the receiver left with an older state as the last.
#[tokio::test]
async fn a_rewind_sends_one_batch_s_events_of_a_key_again_in_their_order() {
    let h = TestHerald::start().await;
    let rx = crate::support::Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/ordered"), "ordering": { "key": "/data/key" } })).await;
    let since = herald::model::rfc3339_ms(herald::model::now_ms() - 1000);
    let batch: Vec<Value> = (0..20)
        .map(|seq| json!({ "id": format!("r{seq}"), "type": "t", "data": { "key": "k", "seq": seq } }))
        .collect();
    assert_eq!(h.api.post("/v1/events/batch", json!(batch)).await.0, 202);
    let seqs = |got: &[crate::support::Received]| {
        got.iter().map(|r| r.json()["data"]["seq"].as_u64().unwrap()).collect::<Vec<_>>()
    };
    let first = rx.wait_on("/ordered", 20).await;
    assert_eq!(seqs(&first), (0..20).collect::<Vec<_>>(), "delivered in order");
    // Arrived is not yet settled: the last attempt's record may still be on its way to the
    // history, and a rewind then finds 19.
    crate::support::until("the last delivery on record", Duration::from_secs(20), || async {
        let (_, event) = h.api.get("/v1/events/r19").await;
        (event["deliveries"][0]["state"] == "delivered").then_some(())
    })
    .await;
    let (status, body) = h
        .api
        .post(
            &format!("/v1/subscriptions/{}/recover", sub["id"].as_str().unwrap()),
            json!({ "since": since, "all": true }),
        )
        .await;
    assert_eq!((status.as_u16(), body["queued"].as_u64()), (202, Some(20)), "{body}");
    let all = rx.wait_on("/ordered", 40).await;
    assert_eq!(seqs(&all[20..]), (0..20).collect::<Vec<_>>(), "sent again in order");
}

/// A subscription's blocked keys come a page at a time, in key order: a subscription may have
/// ten thousand, and the whole list was built on every request under the lock every
/// partition's sequencer takes.
#[tokio::test]
async fn blocked_keys_are_listed_a_page_at_a_time() {
    let h = TestHerald::start().await;
    let (rx, url) = SwitchedReceiver::start().await;
    let sub_id =
        holding_subscription(&h.api, url, json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 1 })).await;
    rx.fail(true);
    one_event_per_key(&h.api, "p", 5).await;
    let path = format!("/v1/subscriptions/{sub_id}/ordering/blocked");
    until("five keys held", Duration::from_secs(30), || async {
        let (_, blocked) = h.api.get(&format!("{path}?limit=500")).await;
        (blocked["items"].as_array()?.len() == 5).then_some(())
    })
    .await;
    let (mut keys, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let query = cursor.as_ref().map_or(String::new(), |c| format!("&cursor={c}"));
        let (status, page) = h.api.get(&format!("{path}?limit=2{query}")).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 2, "{page}");
        keys.extend(items.iter().map(|i| i["key"].as_str().unwrap().to_string()));
        pages += 1;
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!((keys, pages), (vec!["p0", "p1", "p2", "p3", "p4"].into_iter().map(String::from).collect(), 3));
    let (status, err) = h.api.get(&format!("{path}?cursor=nonsense")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
}

/// A deleted subscription's keys waiting for a retry go on at once (their heads' attempts
/// find the subscription gone), not at their due time: up to a day later, each held the
/// partition's commit point (and with it every tenant's records of the partition on disk) and
/// a place under the cap of keys.
#[tokio::test]
async fn a_deleted_subscription_s_retrying_keys_go_without_waiting_for_their_retry() {
    let h = one_partition().await;
    let (rx, url) = SwitchedReceiver::start().await;
    let sub_id =
        holding_subscription(&h.api, url, json!({ "policy": "fixed", "interval": "1h", "max_attempts": 5 })).await;
    rx.fail(true);
    one_event_per_key(&h.api, "gone", 3).await;
    until("each key's head failed once and waits an hour", Duration::from_secs(30), || async {
        let blocked = scrape(&h.api).await.value("herald_ordered_keys_blocked", &[]);
        (rx.counts("gone").0 == 3 && blocked == 3.0).then_some(())
    })
    .await;
    let (status, body) = h.api.delete(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(status, 204, "{body}");
    until("the deleted subscription's keys let go", Duration::from_secs(40), || async {
        (scrape(&h.api).await.value("herald_ordered_keys_blocked", &[]) == 0.0).then_some(())
    })
    .await;
    assert_eq!(rx.counts("gone").1, 0, "nothing sent to a deleted subscription");
}

/// A subscription whose `ordering` was removed while one of its keys was held keeps that key
/// sequenced: its blocked keys are still listed and a skip still lets the key go on — both
/// were refused, naming `ordering`, and the key waited for its hold to run out.
#[tokio::test]
async fn a_key_held_when_ordering_was_removed_can_still_be_listed_and_skipped() {
    let h = TestHerald::start().await;
    let rx = OrderedReceiver::start(false).await;
    *rx.stuck.lock().unwrap() = Some("a".into());
    let sub_id =
        holding_subscription(&h.api, rx.url(), json!({ "policy": "fixed", "interval": "50ms", "max_attempts": 2 }))
            .await;
    for (id, seq) in [("a0", 0), ("a1", 1)] {
        let (status, _) =
            h.api.post("/v1/events", json!({ "id": id, "type": "t", "data": { "key": "a", "seq": seq } })).await;
        assert_eq!(status, 202);
    }
    let blocked_path = format!("/v1/subscriptions/{sub_id}/ordering/blocked");
    until("key a held after its head is dead-lettered", Duration::from_secs(30), || async {
        let (_, blocked) = h.api.get(&blocked_path).await;
        let item = blocked["items"].as_array()?.first()?.clone();
        (item["state"] == "dead_lettered").then_some(())
    })
    .await;
    let (status, body) = h.api.patch(&format!("/v1/subscriptions/{sub_id}"), json!({ "ordering": null })).await;
    assert_eq!(status, 200, "{body}");
    let (status, blocked) = h.api.get(&blocked_path).await;
    assert_eq!((status.as_u16(), blocked["items"][0]["key"].as_str()), (200, Some("a")), "{blocked}");
    *rx.stuck.lock().unwrap() = None;
    let skip = format!("/v1/subscriptions/{sub_id}/ordering/skip");
    let (status, body) = h.api.post(&skip, json!({ "key": "a", "event": "a0" })).await;
    assert_eq!(status, 202, "{body}");
    until("a1 delivered once its head is skipped", Duration::from_secs(20), || async {
        rx.of("a").iter().any(|s| s.seq == 1 && s.status == 200).then_some(())
    })
    .await;
}
