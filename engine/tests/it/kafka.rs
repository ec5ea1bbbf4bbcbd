//! Several Herald processes on one Kafka-protocol broker (librdkafka's mock cluster): they
//! share partitions through cooperative rebalancing and see one registry.

use crate::support::{config, eventually, until, Api, MockKafka, Receiver, TOKEN};
use herald::server::Herald;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;

const PARTITIONS: u32 = 4;

fn all_partitions() -> usize {
    PARTITIONS as usize * herald::topics::Topics::new("herald.").sources().len()
}

async fn start(kafka: &MockKafka, dir: &std::path::Path) -> (Herald, Api) {
    start_advertising(kafka, dir, None).await
}

/// As [`start`], telling other processes `advertise_url` when given.
async fn start_advertising(kafka: &MockKafka, dir: &std::path::Path, advertise_url: Option<String>) -> (Herald, Api) {
    crate::support::trace_to_test_output();
    let mut c = config(dir);
    c.advertise_url = advertise_url;
    c.log.partitions = PARTITIONS;
    kafka.configure(&mut c);
    // The mock broker closes a rebalance round only after the session timeout, so a shorter
    // one (through the pass-through table) keeps the two-round cooperative split quick.
    for (k, v) in [("session.timeout.ms", "6000"), ("heartbeat.interval.ms", "1000")] {
        c.log.kafka.0.insert(k.into(), v.into());
    }
    let herald = herald::server::start(c).await.unwrap();
    let api = Api::new(herald.addr, TOKEN);
    (herald, api)
}

/// Two processes on `kafka`, A started first, each with a data directory of its own.
async fn two(kafka: &MockKafka) -> ([tempfile::TempDir; 2], (Herald, Api), (Herald, Api)) {
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = start(kafka, dirs[0].path()).await;
    let b = start(kafka, dirs[1].path()).await;
    (dirs, a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_the_partitions_and_the_registry() {
    let kafka = MockKafka::start(PARTITIONS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rx = Receiver::start().await;
    let (a, api_a) = start(&kafka, dir_a.path()).await;
    eventually("A owns every partition", Duration::from_secs(30), || {
        (a.partitions_owned() == all_partitions()).then_some(())
    })
    .await;
    // Subscriptions on every partition, created through A.
    let mut subs = Vec::new();
    for i in 0..8 {
        subs.push(api_a.subscribe(json!({ "url": rx.url(&format!("/s{i}")) })).await);
    }

    // B joins: the partitions are split without stopping A, and B sees A's subscriptions.
    let (b, api_b) = start(&kafka, dir_b.path()).await;
    let (_, list) = api_b.get("/v1/subscriptions").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 8, "B loaded A's subscriptions: {list}");
    eventually("the partitions split between A and B", Duration::from_secs(60), || {
        let (na, nb) = (a.partitions_owned(), b.partitions_owned());
        (na + nb == all_partitions() && na > 0 && nb > 0).then_some(())
    })
    .await;
    // A subscription created through B is visible through A at once after B answered.
    let late = api_b.subscribe(json!({ "url": rx.url("/late") })).await;
    let (status, _) = api_a.get(&format!("/v1/subscriptions/{}", late["id"].as_str().unwrap())).await;
    assert!(status == 200 || status == 404);
    until("A sees B's subscription", Duration::from_secs(10), || async {
        let (status, _) = api_a.get(&format!("/v1/subscriptions/{}", late["id"].as_str().unwrap())).await;
        (status == 200).then_some(())
    })
    .await;

    // Events published through either process reach every subscription.
    for i in 0..40 {
        let api = if i % 2 == 0 { &api_a } else { &api_b };
        let (status, body) = api.post("/v1/events", json!({ "id": format!("e{i}"), "type": "T", "data": {} })).await;
        assert_eq!(status, 202, "{body}");
    }
    for i in 0..8 {
        let got = rx.wait_on(&format!("/s{i}"), 40).await;
        assert_eq!(got.len(), 40, "every event exactly once on /s{i}");
    }

    // B leaves cleanly: A takes its partitions back and nothing is lost or repeated.
    b.stop().await;
    eventually("A owns every partition again", Duration::from_secs(60), || {
        (a.partitions_owned() == all_partitions()).then_some(())
    })
    .await;
    for i in 40..60 {
        api_a.post("/v1/events", json!({ "id": format!("e{i}"), "type": "T", "data": {} })).await;
    }
    for i in 0..8 {
        let got = rx.wait_on(&format!("/s{i}"), 60).await;
        let mut seen: HashMap<String, usize> = HashMap::new();
        for r in &got {
            *seen.entry(r.json()["id"].as_str().unwrap_or_default().to_string()).or_default() += 1;
        }
        assert_eq!(seen.len(), 60, "/s{i} got every event");
    }
    a.stop().await;
}

/// A subscription made through one process gets every event published afterwards through
/// any other, even one published the moment the create returned (before the other process
/// would have read it from the registry topic on its own); likewise a tenant's new API key
/// works through any process at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_through_any_process_after_a_create_goes_to_the_new_subscription() {
    let kafka = MockKafka::start(PARTITIONS);
    let (_dirs, (a, api_a), (b, api_b)) = two(&kafka).await;
    let mut short = Vec::new();
    for i in 0..20 {
        api_a.subscribe(json!({ "url": format!("http://127.0.0.1:9/new{i}") })).await;
        let (status, accepted) = api_b.post("/v1/events", json!({ "type": "T", "data": { "i": i } })).await;
        assert_eq!(status, 202, "{accepted}");
        if accepted["deliveries"] != i + 1 {
            short.push(format!("event {i}: {accepted}"));
        }
    }
    assert!(short.is_empty(), "events that missed subscriptions made before them: {short:#?}");
    // A tenant's key made through A works through B at once (tenants do not publish; they
    // read and manage their own subscriptions).
    for i in 0..10 {
        let (_, through_a) = crate::support::tenant_with_key(&api_a, &format!("t{i}")).await;
        let through_b = Api::new(b.addr, &through_a.token);
        let (status, body) = through_b.get("/v1/subscriptions").await;
        assert_eq!(status, 200, "a key made through A, used through B at once: {body}");
    }
    b.stop().await;
    a.stop().await;
}

/// Behind a load balancer a platform's calls land on either process: whatever one call made
/// or changed through A, the next call through B sees (read your writes across processes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_either_process_sees_what_was_made_through_the_other_before_it() {
    let kafka = MockKafka::start(PARTITIONS);
    let (_dirs, (a, api_a), (b, api_b)) = two(&kafka).await;
    let mut missed = Vec::new();
    for i in 0..8 {
        // A subscription made through A is there through B.
        let sub = api_a.subscribe(json!({ "url": format!("http://127.0.0.1:9/seen{i}") })).await;
        let (status, body) = api_b.get(&format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap())).await;
        if status != 200 {
            missed.push(format!("round {i}: subscription read through B: {status} {body}"));
        }
        // An event type whose schema is checked, defined through A, is checked through B.
        let name = format!("order.placed.{i}");
        let schema = json!({ "type": "object", "required": ["id"] });
        let (status, body) =
            api_a.post("/v1/event-types", json!({ "name": name, "schema": schema, "validate": true })).await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = api_b.post("/v1/events", json!({ "type": name, "data": { "no_id": true } })).await;
        if status != 400 {
            missed.push(format!("round {i}: an event that does not fit its type, through B: {status} {body}"));
        }
        // An edge device made through A may carry a subscription made through B.
        let (status, device) = api_a.post("/v1/edge-devices", json!({ "name": format!("office{i}") })).await;
        assert_eq!(status, 201, "{device}");
        let url = format!("http://127.0.0.1:9/edge{i}");
        let (status, body) = api_b.post("/v1/subscriptions", json!({ "url": url, "via_edge": device["id"] })).await;
        if status != 201 {
            missed.push(format!("round {i}: a subscription through B via A's new device: {status} {body}"));
        }
        // A key revoked through A no longer works through B.
        let (tenant, key) = crate::support::tenant_with_key(&api_a, &format!("revoked{i}")).await;
        let through_b = Api::new(b.addr, &key.token);
        assert_eq!(through_b.get("/v1/subscriptions").await.0, 200);
        let key_id = key.token.split('.').nth(1).unwrap().to_string();
        assert_eq!(api_a.delete(&format!("/v1/tenants/{tenant}/keys/{key_id}")).await.0, 204);
        let (status, body) = through_b.get("/v1/subscriptions").await;
        if status != 401 {
            missed.push(format!("round {i}: a key revoked through A, used through B: {status} {body}"));
        }
    }
    assert!(missed.is_empty(), "calls through B that did not see A's changes: {missed:#?}");
    b.stop().await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_racing_to_create_one_url_agree_on_a_single_winner() {
    let kafka = MockKafka::start(PARTITIONS);
    let (dirs, (a, api_a), (b, api_b)) = two(&kafka).await;
    for round in 0..10 {
        let body = json!({ "url": format!("https://hooks.example.com/race/{round}"), "tenant": "acme" });
        let (ra, rb) =
            tokio::join!(api_a.post("/v1/subscriptions", body.clone()), api_b.post("/v1/subscriptions", body));
        let statuses = [ra.0.as_u16(), rb.0.as_u16()];
        assert!(statuses.contains(&201), "round {round}: one create wins: {ra:?} {rb:?}");
        let loser = if ra.0 == 201 { &rb } else { &ra };
        assert_eq!(loser.0, 400, "round {round}: the other is refused: {loser:?}");
        assert_eq!(loser.1["error"]["field"], "url", "{loser:?}");
    }
    let count = |api: &Api| {
        let api = api.clone();
        async move {
            let (_, list) = api.get("/v1/subscriptions?tenant=acme&limit=100").await;
            list["items"].as_array().unwrap().len()
        }
    };
    until("both processes list one subscription per URL", Duration::from_secs(10), || async {
        (count(&api_a).await == 10 && count(&api_b).await == 10).then_some(())
    })
    .await;
    b.stop().await;
    // Read back from the log alone, the registry agrees.
    let (again, api_again) = start(&kafka, dirs[1].path()).await;
    assert_eq!(count(&api_again).await, 10);
    again.stop().await;
    a.stop().await;
}

/// Two changes of one subscription made at once through two processes: neither is lost
/// silently. Each was a whole record made from the version its process had, so the later one
/// undid the other's change while both answered 200; now a change made from a version another
/// change has replaced is refused with 409, and the other stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_changes_through_two_processes_lose_none_silently() {
    let kafka = MockKafka::start(PARTITIONS);
    let (_dirs, (a, api_a), (b, api_b)) = two(&kafka).await;
    let sub = api_a.subscribe(json!({ "url": "https://hooks.example.com/patched", "tenant": "acme" })).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    until("B sees the subscription", Duration::from_secs(10), || async {
        (api_b.get(&path).await.0 == 200).then_some(())
    })
    .await;
    let mut refused = 0;
    for round in 0..10u64 {
        let header = format!("x-round-{round}");
        let (ra, rb) = tokio::join!(
            api_a.patch(&path, json!({ "headers": { header.clone(): "v" } })),
            api_b.patch(&path, json!({ "max_in_flight": round + 1 }))
        );
        for (status, body) in [&ra, &rb] {
            assert!(*status == 200 || *status == 409, "round {round}: {status} {body}");
        }
        refused += [&ra, &rb].iter().filter(|r| r.0 == 409).count();
        // Both processes have read both records once they answer alike.
        let now = until("both processes agree", Duration::from_secs(10), || async {
            let (x, y) = (api_a.get(&path).await.1, api_b.get(&path).await.1);
            (x == y).then_some(x)
        })
        .await;
        if ra.0 == 200 {
            assert!(now["headers"].get(&header).is_some(), "round {round}: A's 200 change lost: {now}");
        }
        if rb.0 == 200 {
            assert_eq!(now["max_in_flight"], round + 1, "round {round}: B's 200 change lost: {now}");
        }
    }
    eprintln!("concurrent changes: {refused} of 20 refused with 409");
    assert!(refused > 0, "no round raced: the test showed nothing");
    b.stop().await;
    a.stop().await;
}

/// The catalog is read in order from one partition: one made with several (by an operator
/// ahead of Herald) lost two writes in three to partitions no process follows. Refused at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalog_topic_with_several_partitions_is_refused_at_start() {
    let kafka = MockKafka::laid_out(PARTITIONS, 3);
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.log.partitions = PARTITIONS;
    kafka.configure(&mut c);
    let err = herald::server::start(c).await.err().expect("refused");
    assert!(err.to_string().contains("one partition"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_agent_connected_to_one_process_serves_the_deliveries_of_both() {
    let kafka = MockKafka::start(PARTITIONS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let rx = Receiver::start().await;
    let (a, api_a) = start(&kafka, dir_a.path()).await;
    // B advertises the same address as A (as every process does with `listen = "0.0.0.0:8080"`
    // on hosts of their own): a process tells an agent's presence as its own by its process,
    // not its address, so B still forwards to A (by address it took A's presence for its own
    // and failed each attempt as offline).
    let (b, _api_b) = start_advertising(&kafka, dir_b.path(), Some(format!("http://{}", a.addr))).await;
    // Every group split evenly, so B owns half of the deliveries partitions.
    eventually("the partitions split evenly", Duration::from_secs(60), || {
        (a.partitions_owned() == all_partitions() / 2 && b.partitions_owned() == all_partitions() / 2).then_some(())
    })
    .await;
    let (status, device) = api_a.post("/v1/edge-devices", json!({ "name": "office" })).await;
    assert_eq!(status, 201, "{device}");
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(herald::agent::run(
        herald::agent::AgentConfig {
            server: format!("http://{}", a.addr),
            token: device["token"].as_str().unwrap().to_string(),
            window: 32,
            allow: vec!["0.0.0.0/0".parse().unwrap()],
            default_timeout: Duration::from_secs(10),
            tls_files_dir: None,
        },
        stopped,
    ));
    // Subscriptions on every deliveries partition, all through the agent connected to A.
    let retry = json!({ "policy": "fixed", "interval": "200ms", "max_attempts": 100 });
    let mut covered = std::collections::HashSet::new();
    let mut paths = Vec::new();
    while covered.len() < PARTITIONS as usize {
        let path = format!("/e{}", paths.len());
        let sub = api_a.subscribe(json!({ "url": rx.url(&path), "via_edge": device["id"], "retry": retry })).await;
        covered.insert(herald::log::partition_for(sub["id"].as_str().unwrap().as_bytes(), PARTITIONS));
        paths.push(path);
    }
    for i in 0..10 {
        api_a.post("/v1/events", json!({ "id": format!("e{i}"), "type": "T", "data": {} })).await;
    }
    for path in &paths {
        let got = rx.wait_on(path, 10).await;
        let ids: std::collections::HashSet<_> = got.iter().map(|r| r.header("webhook-id").to_string()).collect();
        assert_eq!(ids.len(), 10, "{path}: every event, whichever process owned its partition");
    }
    stop.send_replace(true);
    agent.await.unwrap().unwrap();
    b.stop().await;
    a.stop().await;
}

/// A device's agent that connects to another process replaces its connection on the first
/// too, as within one process (at most one connection lives per device): the first kept it,
/// preferred it for its own attempts, and the two split the device's deliveries for as long
/// as both lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connected_to_another_process_is_disconnected_from_the_first() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let kafka = MockKafka::start(PARTITIONS);
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, api_a) = start(&kafka, dir_a.path()).await;
    let (b, _api_b) = start(&kafka, dir_b.path()).await;
    let (status, device) = api_a.post("/v1/edge-devices", json!({ "name": "office" })).await;
    assert_eq!(status, 201, "{device}");
    let token = device["token"].as_str().unwrap().to_string();
    let hello = || Message::Text(r#"{"type":"hello","window":4}"#.into());
    let connect = |addr| {
        let token = token.clone();
        async move {
            // B learns of the device from the catalog: connect once it knows the token.
            until("the device known", Duration::from_secs(20), || async {
                tokio_tungstenite::connect_async(crate::support::edge_connect_request(addr, &token)).await.ok()
            })
            .await
            .0
        }
    };
    let mut on_a = connect(a.addr).await;
    on_a.send(hello()).await.unwrap();
    until("A's connection announced", Duration::from_secs(20), || {
        let api_a = api_a.clone();
        let id = device["id"].as_str().unwrap().to_string();
        async move {
            let (_, d) = api_a.get(&format!("/v1/edge-devices/{id}")).await;
            (d["connected"] == true).then_some(())
        }
    })
    .await;
    let mut on_b = connect(b.addr).await;
    on_b.send(hello()).await.unwrap();
    // Pings every 15 s: A's connection ends within that (and a grace).
    let ended = crate::support::ws_ended(&mut on_a, Duration::from_secs(40)).await;
    assert!(ended.is_some(), "the device's connection to A lasted beside its newer one to B");
    drop(on_b);
    b.stop().await;
    a.stop().await;
}

/// A partition's worker that dies takes its reader with it; `reopen` gives the partition a
/// new reader that starts at the offset the dead one committed — or, if it committed none,
/// at the group's committed offset — so nothing past the commit point is skipped, and what
/// the dead reader's queue still held is not handed out out of order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reopened_reader_reads_again_from_the_committed_offset() {
    use herald::log::{Assignment, PartitionReader, Record};
    let kafka = MockKafka::start(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let (herald, _api) = start(&kafka, dir.path()).await;
    let log = herald.log();
    // The dead-letter topic: Herald reads it by pages, in no group of its own.
    let topic = "herald.dlq";
    let append = |key: &'static str, n: usize| {
        let log = log.clone();
        async move {
            let records = (0..n).map(|i| Record { key: key.into(), value: format!("{key}-{i}").into() }).collect();
            log.append(topic, records).await.unwrap()
        }
    };
    // Reads until `n` records came, within a deadline.
    async fn read(reader: &mut Box<dyn PartitionReader>, n: usize, max: usize) -> Vec<(u64, String)> {
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            while got.len() < n {
                for r in reader.next_batch(max).await.unwrap() {
                    got.push((r.offset, String::from_utf8(r.value.to_vec()).unwrap()));
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} records within 20 s; got {got:?}"));
        got
    }
    let written = append("read", 10).await;
    let p = written[0].partition;
    let other = ["a", "b", "c", "d", "e", "f", "g", "h"]
        .into_iter()
        .find(|k| herald::log::partition_for(k.as_bytes(), PARTITIONS) != p)
        .unwrap();
    let unread = append(other, 3).await;
    let q = unread[0].partition;
    assert_ne!(p, q);

    let mut consumer = log.consume("reopen-test", topic).await.unwrap();
    let mut readers = HashMap::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !(readers.contains_key(&p) && readers.contains_key(&q)) {
            if let Some(Assignment::Assigned(r)) = consumer.next_assignment().await {
                readers.insert(r.partition(), r);
            }
        }
    })
    .await
    .expect("both partitions assigned");

    // Read two of `p` (the rest wait in its queue), commit one, and lose the reader.
    let mut reader = readers.remove(&p).unwrap();
    let first = read(&mut reader, 2, 2).await;
    assert_eq!(first[0].0, written[0].offset);
    reader.committer().commit(written[1].offset);
    // One reader a partition: a second split from its queue would stall once the first goes.
    assert!(consumer.reopen(p).await.is_err(), "reopened while its reader lives");
    drop(reader);
    let mut reader = consumer.reopen(p).await.unwrap();
    let again = read(&mut reader, 9, 100).await;
    let expected: Vec<(u64, String)> = (1..10).map(|i| (written[i].offset, format!("read-{i}"))).collect();
    assert_eq!(again, expected, "read again from the committed offset, in order, once each");

    // `q`'s reader never handed out a record: the new one starts where the group does.
    drop(readers.remove(&q).unwrap());
    let mut reader = consumer.reopen(q).await.unwrap();
    let again = read(&mut reader, 3, 100).await;
    assert_eq!(again.iter().map(|(o, _)| *o).collect::<Vec<_>>(), unread.iter().map(|u| u.offset).collect::<Vec<_>>());

    assert!(consumer.reopen(PARTITIONS + 7).await.is_err(), "a partition that is not ours");
    drop((reader, consumer));
    herald.stop().await;
}

/// A deletion in the catalog is a Kafka tombstone (a record with no value): compaction keeps
/// a key's newest record, and keeps a key whose newest is a tombstone only until
/// `delete.retention.ms`. Written as an empty value, every deleted subscription (and device,
/// presence, event type) stayed in the catalog for good, read by every process at every start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_subscription_leaves_a_tombstone_in_the_catalog() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let kafka = MockKafka::start(PARTITIONS);
    let dir = tempfile::tempdir().unwrap();
    let (herald, api) = start(&kafka, dir.path()).await;
    let rx = Receiver::start().await;
    let sub = api.subscribe(json!({ "url": rx.url("/gone-soon") })).await;
    let id = sub["id"].as_str().unwrap().to_string();
    assert_eq!(api.delete(&format!("/v1/subscriptions/{id}")).await.0, 204);
    herald.stop().await;

    let topic = herald::topics::Topics::new("herald.").subscriptions;
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap_servers())
        .set("group.id", "tombstone-check")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let (_, end) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10)).unwrap();
    // The newest record of the subscription's key, read to the partition's end.
    let mut newest = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::time::Instant::now() < deadline {
        let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) else { continue };
        if m.key().is_some_and(|k| String::from_utf8_lossy(k).contains(&id)) {
            newest = Some(m.payload().map(<[u8]>::len));
        }
        if m.offset() + 1 >= end {
            break;
        }
    }
    assert_eq!(
        newest,
        Some(None),
        "the subscription's newest catalog record: a value of {newest:?} bytes, not a tombstone"
    );
}
