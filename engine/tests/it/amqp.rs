//! AMQP delivery against a real RabbitMQ on loopback (`scripts/test` installs and starts
//! Debian's rabbitmq-server). One sequential test, because it restarts the broker.

use crate::support::{until, TestHerald};
use herald_load_tests::verify::Verifier;
use lapin::options::{BasicGetOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

pub(crate) const BROKER: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub(crate) async fn channel() -> (Connection, Channel) {
    let conn = Connection::connect(BROKER, ConnectionProperties::default())
        .await
        .expect("RabbitMQ reachable on 127.0.0.1:5672 (./scripts/test installs and starts it)");
    let ch = conn.create_channel().await.unwrap();
    (conn, ch)
}

pub(crate) async fn topic(ch: &Channel, exchange: &str, durable: bool, bindings: &[(&str, &str)]) {
    let opts = ExchangeDeclareOptions { durable, ..Default::default() };
    ch.exchange_declare(exchange.into(), ExchangeKind::Topic, opts, FieldTable::default()).await.unwrap();
    for (queue, key) in bindings {
        ch.queue_declare((*queue).into(), QueueDeclareOptions { durable, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind(
            (*queue).into(),
            exchange.into(),
            (*key).into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
}

pub(crate) async fn take(ch: &Channel, queue: &str) -> Option<lapin::message::BasicGetMessage> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.ok().flatten()
}

/// Runs `rabbitmqctl -q` with `args` against the suite's broker; its output. It must succeed.
fn rabbitmqctl(args: &[&str]) -> String {
    let out = std::process::Command::new("rabbitmqctl").arg("-q").args(args).output().expect("rabbitmqctl runs");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn header(props: &lapin::BasicProperties, name: &str) -> String {
    match props.headers().as_ref().and_then(|h| h.inner().get(&ShortString::from(name)).cloned()) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        other => panic!("header {name}: {other:?}"),
    }
}

#[tokio::test]
async fn events_are_published_to_the_exchange_by_routing_key_and_survive_a_broker_restart() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!(
        "{:x}",
        std::process::id() as u64 * 1_000_003
            + std::time::SystemTime::now().elapsed().map(|d| d.as_nanos() as u64).unwrap_or(7)
    );
    let h = TestHerald::start().await;
    let (_conn, ch) = channel().await;

    // 1. Routing keys per event type, properties and signature headers.
    let exchange = format!("herald-test-{run}");
    let (q_imported, q_machine) = (format!("imported-{run}"), format!("machine-{run}"));
    topic(&ch, &exchange, false, &[(&q_imported, "ImportedStatus"), (&q_machine, "MachineGroupStatus")]).await;
    let sub = h
        .api
        .subscribe(json!({
            "transport": "amqp",
            "amqp": { "uri": BROKER, "exchange": exchange,
                      "routing_keys": { "Imported": "ImportedStatus", "MachineGroupChanged": "MachineGroupStatus" } },
            "retry": { "policy": "fixed", "interval": "200ms", "max_attempts": 3 }
        }))
        .await;
    assert!(!sub.to_string().contains(":guest@"), "the broker password is never returned: {sub}");
    let verifier = Verifier::new(sub["secret"].as_str().unwrap()).unwrap();
    let (_, a) = h.api.post("/v1/events", json!({ "id": "imp-1", "type": "Imported", "data": { "batch": 7 } })).await;
    let (_, b) = h
        .api
        .post("/v1/events", json!({ "id": "mg-1", "type": "MachineGroupChanged", "data": { "group": "A" } }))
        .await;
    assert_eq!((a["deliveries"].as_u64(), b["deliveries"].as_u64()), (Some(1), Some(1)));
    for (queue, id, event) in [(&q_imported, "imp-1", "Imported"), (&q_machine, "mg-1", "MachineGroupChanged")] {
        let msg =
            until(&format!("{event} on its queue"), Duration::from_secs(15), || async { take(&ch, queue).await }).await;
        let props = &msg.delivery.properties;
        let body: serde_json::Value = serde_json::from_slice(&msg.delivery.data).unwrap();
        assert_eq!((body["id"].as_str(), body["event"].as_str()), (Some(id), Some(event)));
        assert_eq!(props.message_id().as_ref().map(|s| s.as_str()), Some(id));
        assert_eq!(props.content_type().as_ref().map(|s| s.as_str()), Some("application/json"));
        assert_eq!(*props.delivery_mode(), Some(2), "persistent");
        assert!(props.timestamp().is_some_and(|t| t > 0));
        assert_eq!(
            msg.delivery.routing_key.as_str(),
            if event == "Imported" { "ImportedStatus" } else { "MachineGroupStatus" }
        );
        assert!(verifier.verify(
            id,
            &header(props, "webhook-timestamp"),
            &msg.delivery.data,
            &header(props, "webhook-signature")
        ));
    }

    // 1b. PATCH moves the subscription to another exchange; the next delivery goes there. The
    // `amqp` object is sent back as a view shows it, the URI's password the placeholder (the
    // console's edit does so): the stored password is kept — it was replaced by the
    // placeholder, and every delivery after failed the broker's login.
    let moved = format!("herald-moved-{run}");
    let q_moved = format!("moved-{run}");
    topic(&ch, &moved, false, &[(&q_moved, "#")]).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let (_, seen) = h.api.get(&path).await;
    let mut amqp = seen["amqp"].clone();
    assert!(amqp["uri"].as_str().unwrap().contains(":********@"), "{amqp}");
    let mut elsewhere = amqp.clone();
    elsewhere["uri"] = json!(amqp["uri"].as_str().unwrap().replace("127.0.0.1", "127.0.0.2"));
    let (status, err) = h.api.patch(&path, json!({ "amqp": elsewhere })).await;
    assert_eq!(
        (status.as_u16(), err["error"]["field"].as_str()),
        (400, Some("amqp.uri")),
        "another broker needs its password: {err}"
    );
    amqp["exchange"] = json!(moved);
    let (status, patched) =
        h.api.raw("PATCH", &path, Some(json!({ "amqp": amqp }).to_string().into()), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 200, "{patched}");
    assert_eq!(patched["amqp"]["exchange"], moved.as_str());
    assert!(!patched.to_string().contains(":guest@"), "the broker password is never returned: {patched}");
    h.api.post("/v1/events", json!({ "id": "imp-2", "type": "Imported", "data": { "batch": 8 } })).await;
    let msg =
        until("the event on the new exchange", Duration::from_secs(15), || async { take(&ch, &q_moved).await }).await;
    assert_eq!(msg.delivery.properties.message_id().as_ref().map(|s| s.as_str()), Some("imp-2"));
    assert_eq!(msg.delivery.exchange.as_str(), moved.as_str());
    assert!(take(&ch, &q_imported).await.is_none(), "nothing more on the old exchange");

    // 2. An unroutable key and a missing exchange are failures: retried, then dead-lettered.
    let once_more = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 2 });
    let unbound = format!("herald-unbound-{run}");
    topic(&ch, &unbound, false, &[]).await; // an exchange with no queue bound
    let unroutable = h
        .api
        .subscribe(json!({ "transport": "amqp", "events": ["Unbound"], "amqp": { "uri": BROKER, "exchange": unbound }, "retry": once_more }))
        .await;
    let missing = h
        .api
        .subscribe(json!({ "transport": "amqp", "events": ["Lost"], "amqp": { "uri": BROKER, "exchange": format!("missing-{run}") }, "retry": once_more }))
        .await;
    h.api.post("/v1/events", json!({ "type": "Unbound", "data": {} })).await;
    h.api.post("/v1/events", json!({ "type": "Lost", "data": {} })).await;
    let api = h.api.clone();
    let dead = until("both failures dead-lettered", Duration::from_secs(20), || async {
        let (_, page) = api.get("/v1/dlq").await;
        let items = page["items"].as_array().unwrap().clone();
        let has = |sub: &serde_json::Value| items.iter().any(|e| e["subscription"] == sub["id"]);
        (has(&unroutable) && has(&missing)).then_some(items)
    })
    .await;
    let error_of = |sub: &serde_json::Value| {
        dead.iter()
            .find(|e| e["subscription"] == sub["id"])
            .map(|e| (e["attempts"].as_u64(), e["last_error"].as_str().unwrap().to_string()))
            .unwrap()
    };
    let (attempts, error) = error_of(&unroutable);
    assert_eq!(attempts, Some(2));
    assert!(error.contains("unroutable"), "{error}");
    let (attempts, error) = error_of(&missing);
    assert_eq!(attempts, Some(2));
    assert!(error.to_lowercase().contains("not_found") || error.contains("404"), "{error}");

    // 3. The broker stops mid-stream and comes back: every event arrives at least once.
    let durable_exchange = format!("herald-durable-{run}");
    let durable_queue = format!("durable-{run}");
    topic(&ch, &durable_exchange, true, &[(&durable_queue, "#")]).await;
    h.api
        .subscribe(json!({
            "transport": "amqp", "events": ["Steady"], "amqp": { "uri": BROKER, "exchange": durable_exchange },
            "retry": { "policy": "fixed", "interval": "300ms", "max_attempts": 200 }
        }))
        .await;
    for i in 0..40 {
        if i == 15 {
            rabbitmqctl(&["stop_app"]);
        }
        if i == 25 {
            rabbitmqctl(&["start_app"]);
            rabbitmqctl(&["await_startup", "--timeout", "60"]);
        }
        let (status, _) =
            h.api.post("/v1/events", json!({ "id": format!("steady-{i}"), "type": "Steady", "data": i })).await;
        assert_eq!(status, 202, "Herald keeps accepting while the broker is down");
        tokio::time::sleep(Duration::from_millis(50)).await; // pacing the producer, not synchronisation
    }
    let (_conn2, ch2) = channel().await; // the first connection died with the broker
    let seen: std::sync::Arc<std::sync::Mutex<(HashSet<String>, usize)>> = Default::default();
    until("all 40 events in the durable queue", Duration::from_secs(60), || {
        let (ch2, queue, seen) = (ch2.clone(), durable_queue.clone(), seen.clone());
        async move {
            while let Some(msg) = take(&ch2, &queue).await {
                let id = msg.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
                let mut s = seen.lock().unwrap();
                s.0.insert(id);
                s.1 += 1;
            }
            (seen.lock().unwrap().0.len() >= 40).then_some(())
        }
    })
    .await;
    let copies = seen.lock().unwrap().1;
    eprintln!("amqp restart test: 40 events, {copies} messages received ({} duplicates)", copies - 40);
}

/// RabbitMQ returns an unroutable message before it confirms it, and may confirm several
/// publishes in one frame; which publish a return belongs to is read from the message itself,
/// so a routed event is never counted unroutable and, worse, an unroutable one never counted
/// delivered (sent nowhere, yet "delivered" on record and never retried).
#[tokio::test]
async fn each_unroutable_message_is_failed_and_each_routed_one_delivered_however_confirms_are_grouped() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id() as u64 * 7_919 + rand::random::<u32>() as u64);
    let h = TestHerald::start().await;
    let (_conn, ch) = channel().await;
    let exchange = format!("herald-mixed-{run}");
    let queue = format!("mixed-{run}");
    topic(&ch, &exchange, false, &[(&queue, "routed")]).await;
    let sub = h
        .api
        .subscribe(json!({
            "transport": "amqp",
            "amqp": { "uri": BROKER, "exchange": exchange, "routing_keys": { "Routed": "routed", "Unrouted": "nowhere" } },
            "retry": { "policy": "fixed", "interval": "100ms", "max_attempts": 1 }
        }))
        .await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let (mut routed, mut unrouted) = (HashSet::new(), HashSet::new());
    for round in 0..4 {
        let batch: Vec<serde_json::Value> = (0..100)
            .map(|i| {
                let id = format!("m-{round}-{i}");
                let kind = if i % 2 == 0 { "Routed" } else { "Unrouted" };
                if i % 2 == 0 { &mut routed } else { &mut unrouted }.insert(id.clone());
                json!({ "id": id, "type": kind, "data": { "i": i } })
            })
            .collect();
        let (status, body) = h.api.post("/v1/events/batch", serde_json::Value::Array(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    let api = h.api.clone();
    let dead: HashSet<String> = until("every unroutable message dead-lettered", Duration::from_secs(60), || async {
        let (_, page) = api.get(&format!("/v1/dlq?subscription={sub_id}&limit=500")).await;
        let ids: HashSet<String> =
            page["items"].as_array()?.iter().filter_map(|e| e["event_id"].as_str().map(String::from)).collect();
        (ids.len() >= unrouted.len()).then_some(ids)
    })
    .await;
    let arrived: std::sync::Arc<std::sync::Mutex<HashSet<String>>> = Default::default();
    until("every routed message on its queue", Duration::from_secs(30), || {
        let (ch, queue, arrived) = (ch.clone(), queue.clone(), arrived.clone());
        async move {
            while let Some(msg) = take(&ch, &queue).await {
                let id = msg.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
                arrived.lock().unwrap().insert(id);
            }
            (arrived.lock().unwrap().len() >= 200).then_some(())
        }
    })
    .await;
    let arrived = arrived.lock().unwrap().clone();
    assert_eq!(arrived, routed, "the routed events arrived");
    let wrongly_failed: Vec<_> = dead.intersection(&routed).collect();
    let wrongly_delivered: Vec<_> = unrouted.difference(&dead).collect();
    assert!(
        wrongly_failed.is_empty() && wrongly_delivered.is_empty(),
        "routed but counted unroutable: {wrongly_failed:?}; unroutable but counted delivered: {wrongly_delivered:?}"
    );
}

/// lapin logs each message a broker returns at `warn`, payload and headers whole: with the
/// default logging, a tenant's unroutable subscription copied its events into Herald's own
/// log. Herald reports those attempts itself (history, dead letters), without the payload.
#[tokio::test]
async fn a_returned_message_s_payload_is_not_written_to_herald_s_log() {
    use std::io::Read;
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id() as u64 * 7_907 + rand::random::<u32>() as u64);
    let dir = tempfile::tempdir().unwrap();
    let mut child = crate::support::serve_command(dir.path())
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("herald binary runs");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let addr: std::net::SocketAddr = loop {
        let line = lines.next().expect("herald printed its address").unwrap();
        if let Some(a) = line.strip_prefix("herald listening on http://") {
            break a.parse().unwrap();
        }
    };
    let mut stderr = child.stderr.take().unwrap();
    let logged = std::thread::spawn(move || {
        let mut all = String::new();
        let _ = stderr.read_to_string(&mut all);
        all
    });
    let api = crate::support::Api::new(addr, crate::support::TOKEN);
    let (_conn, ch) = channel().await;
    let exchange = format!("herald-quiet-{run}");
    topic(&ch, &exchange, false, &[]).await; // no queue bound: every message comes back
    let sub = api
        .subscribe(json!({ "transport": "amqp", "amqp": { "uri": BROKER, "exchange": exchange },
                           "retry": { "policy": "fixed", "interval": "100ms", "max_attempts": 1 } }))
        .await;
    let marker = format!("customer-secret-data-{run}");
    let (status, _) = api.post("/v1/events", json!({ "type": "T", "data": { "note": marker } })).await;
    assert_eq!(status, 202);
    let sub_id = sub["id"].as_str().unwrap().to_string();
    until("the returned message dead-lettered", Duration::from_secs(30), || async {
        let (_, dlq) = api.get(&format!("/v1/dlq?subscription={sub_id}")).await;
        (!dlq["items"].as_array()?.is_empty()).then_some(())
    })
    .await;
    let _ = child.kill();
    let _ = child.wait();
    let logged = logged.join().unwrap();
    // lapin wrote the message out as Rust sees it (the payload as a list of bytes), with the
    // exchange it came back from.
    assert!(!logged.contains(&marker) && !logged.contains(&exchange), "the message is in Herald's log:\n{logged}");
}

/// The broker's memory alarm back to normal when the test ends, however it ends: every later
/// AMQP test publishes through the same broker. (0.4: the default of the RabbitMQ `scripts/test`
/// installs, which puts it back too, should a killed run have left the alarm set.)
struct Unblock;

impl Drop for Unblock {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["-q", "set_vm_memory_high_watermark", "0.4"]).status();
    }
}

/// A broker under a resource alarm blocks its publishers (`connection.blocked`) and stops
/// reading their publishes. An attempt through a connection the broker has blocked fails at
/// once, saying so — before, each waited its whole timeout with its payload queued in the
/// client, for as long as the alarm lasted (and a tenant's broker can block for ever).
#[tokio::test]
async fn a_publish_through_a_blocked_connection_fails_at_once_saying_so() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id());
    let h = TestHerald::start().await;
    let (_conn, ch) = channel().await;
    let (exchange, queue) = (format!("herald-blocked-{run}"), format!("blocked-{run}"));
    topic(&ch, &exchange, false, &[(&queue, "#")]).await;
    let sub = h
        .api
        .subscribe(json!({ "transport": "amqp", "amqp": { "uri": BROKER, "exchange": exchange }, "timeout": "2s",
                           "retry": { "policy": "fixed", "interval": "1h", "max_attempts": 2 } }))
        .await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    h.api.post("/v1/events", json!({ "id": "before", "type": "T", "data": {} })).await;
    until("the first event on its queue", Duration::from_secs(15), || async { take(&ch, &queue).await }).await;

    let unblock = Unblock;
    rabbitmqctl(&["set_vm_memory_high_watermark", "0"]);
    let attempt = |id: &'static str| {
        let (api, sub_id) = (h.api.clone(), sub_id.clone());
        async move {
            let (_, page) = api.get(&format!("/v1/attempts?event={id}&subscription={sub_id}")).await;
            page["items"].as_array().and_then(|a| a.first().cloned())
        }
    };
    // The first publish the alarm meets is the one that gets the connection blocked.
    h.api.post("/v1/events", json!({ "id": "meets-the-alarm", "type": "T", "data": {} })).await;
    until("the attempt the alarm met", Duration::from_secs(15), || attempt("meets-the-alarm")).await;
    h.api.post("/v1/events", json!({ "id": "while-blocked", "type": "T", "data": {} })).await;
    let blocked = until("the attempt while blocked", Duration::from_secs(15), || attempt("while-blocked")).await;
    drop(unblock);
    assert!(blocked["error"].as_str().unwrap_or_default().contains("blocked"), "{blocked}");
    assert!(blocked["duration_ms"].as_u64().unwrap_or(u64::MAX) < 1000, "failed at once: {blocked}");
}

/// This process's TCP sockets to the broker's port that are not yet closed, by their state
/// (`/proc/net/tcp`'s hex: 01 established, 08 close-wait).
fn sockets_to_the_broker() -> Vec<String> {
    let mine: std::collections::HashSet<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
        .collect();
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2)?.ends_with(":1628") && mine.contains(*f.get(9)?)).then(|| f[3].to_string())
        })
        .collect()
}

/// A connection the broker closes (a restart, an operator's `close_connection`) lets go of its
/// socket within seconds, though Herald's link to it is kept until its next use: the socket
/// Herald holds to cut a connection lapin cannot end was kept half-closed until then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_the_broker_closes_lets_go_of_its_socket() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id());
    let h = TestHerald::start().await;
    let (conn, ch) = channel().await;
    let (exchange, queue) = (format!("herald-closed-{run}"), format!("closed-{run}"));
    topic(&ch, &exchange, false, &[(&queue, "#")]).await;
    h.api.subscribe(json!({ "transport": "amqp", "amqp": { "uri": BROKER, "exchange": exchange } })).await;
    h.api.post("/v1/events", json!({ "id": "opens-it", "type": "T", "data": {} })).await;
    until("the event on its queue", Duration::from_secs(15), || async { take(&ch, &queue).await }).await;
    drop((ch, conn));
    let before = sockets_to_the_broker();
    assert!(!before.is_empty(), "no socket to the broker");
    tokio::task::spawn_blocking(|| rabbitmqctl(&["close_all_connections", "closed by the test"])).await.unwrap();
    until("every socket to the broker let go", Duration::from_secs(15), || async {
        sockets_to_the_broker().is_empty().then_some(())
    })
    .await;
}

/// A TLS failure with an `amqps://` broker (an expired or self-signed certificate, or a plain
/// port) is `tls_error`, as a webhook's is: it read `connect_error`, and what watched
/// `tls_error` missed every AMQP subscription.
#[tokio::test]
async fn a_tls_failure_with_a_broker_is_a_tls_error() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let h = TestHerald::start().await;
    let plain_port = BROKER.replace("amqp://", "amqps://");
    let sub = h
        .api
        .subscribe(json!({ "transport": "amqp", "amqp": { "uri": plain_port, "exchange": "x" }, "timeout": "5s",
                           "retry": { "policy": "fixed", "interval": "1h", "max_attempts": 2 } }))
        .await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    h.api.post("/v1/events", json!({ "id": "over-tls", "type": "T", "data": {} })).await;
    let attempt = until("the attempt over TLS", Duration::from_secs(15), || async {
        let (_, page) = h.api.get(&format!("/v1/attempts?event=over-tls&subscription={sub_id}")).await;
        page["items"].as_array().and_then(|a| a.first().cloned())
    })
    .await;
    assert_eq!(attempt["outcome"], "tls_error", "{attempt}");
}

/// A tenant's AMQP subscriptions to many broker URIs share at most 16 connections: each was a
/// connection of its own, kept for ten minutes, each a thread of lapin's and up to 64 MiB of
/// buffers (frames of up to 1 MiB as the URI asked) — a thousand subscriptions took a thousand
/// threads and gigabytes from every tenant. Past the cap, the least recently used idle one is
/// closed to make room: every delivery still arrives, and another tenant's are untouched.
// Two workers, as Herald runs: a connection dropped is cut on the runtime once lapin has closed
// it, and `rabbitmqctl` blocks the thread it is called on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_s_broker_connections_are_capped_and_every_delivery_still_arrives() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id());
    let vhost = format!("herald-cap-{run}");
    rabbitmqctl(&["add_vhost", &vhost]);
    rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
    let in_vhost = format!("amqp://guest:guest@127.0.0.1:5672/{vhost}");
    let conn = Connection::connect(&in_vhost, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let (exchange, queue) = ("capped", "capped-q");
    topic(&ch, exchange, false, &[(queue, "#")]).await;

    let h = TestHerald::start().await;
    let (mallory, _) = crate::support::tenant_with_key(&h.api, "Mallory").await;
    for i in 0..20 {
        // Each its own URI (one more setting apart), each asking for frames of a megabyte.
        let uri = format!("{in_vhost}?heartbeat={}&frame_max=1048576", 30 + i);
        let (status, body) = h
            .api
            .post("/v1/subscriptions", json!({ "tenant": mallory, "transport": "amqp", "amqp": { "uri": uri, "exchange": exchange },
                                               "retry": { "policy": "fixed", "interval": "200ms", "max_attempts": 20 } }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "to-twenty", "tenant": mallory, "type": "T", "data": {} })).await;
    assert_eq!(status, 202);
    let got = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    until("the twenty deliveries on the queue", Duration::from_secs(60), || {
        let (ch, got) = (ch.clone(), got.clone());
        async move {
            while take(&ch, queue).await.is_some() {
                got.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            (got.load(std::sync::atomic::Ordering::Relaxed) == 20).then_some(())
        }
    })
    .await;
    let herald_connections =
        rabbitmqctl(&["list_connections", "vhost", "--no-table-headers"]).lines().filter(|l| l.trim() == vhost).count()
            - 1; // the test's own
    drop(conn);
    rabbitmqctl(&["delete_vhost", &vhost]);
    assert!(herald_connections <= 16, "{herald_connections} connections of one tenant's");
}

/// A subscription's `headers` travel as the message's headers (in lower case, as the signature
/// headers do; a headers exchange can route on them): they were accepted, sealed, and never
/// sent. `key`, a webhook's query parameter, has no place in an AMQP publish: refused naming
/// it, as `tls` and `auth` are, instead of kept and ignored.
#[tokio::test]
async fn a_subscription_s_headers_travel_with_its_messages_and_key_is_refused() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let run = format!("{:x}", std::process::id() as u64 * 7 + herald::model::now_ms() as u64);
    let h = TestHerald::start().await;
    let (_conn, ch) = channel().await;
    let exchange = format!("herald-headers-{run}");
    let queue = format!("headers-{run}");
    topic(&ch, &exchange, false, &[(&queue, "#")]).await;
    let amqp = json!({ "uri": BROKER, "exchange": exchange });
    let (status, refused) =
        h.api.post("/v1/subscriptions", json!({ "transport": "amqp", "amqp": amqp, "key": "k-1" })).await;
    assert_eq!((status.as_u16(), refused["error"]["field"].as_str()), (400, Some("key")), "{refused}");
    let big = json!({ "X-Big": "v".repeat(herald::transport::amqp::HEADER_BYTES) });
    let (status, refused) =
        h.api.post("/v1/subscriptions", json!({ "transport": "amqp", "amqp": amqp, "headers": big })).await;
    assert_eq!((status.as_u16(), refused["error"]["field"].as_str()), (400, Some("headers")), "{refused}");
    let headers = json!({ "X-Customer": "c-42", "User-Agent": "acme-router" });
    h.api.subscribe(json!({ "transport": "amqp", "amqp": amqp, "headers": headers })).await;
    h.api.post("/v1/events", json!({ "id": "hdr-1", "type": "Imported", "data": {} })).await;
    let msg = until("the event on its queue", Duration::from_secs(15), || async { take(&ch, &queue).await }).await;
    assert_eq!(header(&msg.delivery.properties, "x-customer"), "c-42");
    assert_eq!(header(&msg.delivery.properties, "user-agent"), "acme-router", "the tenant's own, kept");
    assert!(!header(&msg.delivery.properties, "webhook-signature").is_empty());
}
