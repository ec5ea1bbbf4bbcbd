//! Edge relay, as a system: a `herald serve` that may not reach loopback at all, `herald
//! edge` agent processes, and a loopback receiver only the agents can reach.

use crate::support::metrics::scrape;
use crate::support::WithoutSuiteKnobs;
use crate::support::{edge_connect_request, spawn_herald_with, until, Api, ChildGuard, Receiver, TOKEN};
use herald_load_tests::verify::Verifier;
use serde_json::json;
use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::time::Duration;

/// The status a WebSocket connection to the edge endpoint with `token` is answered with.
async fn connect_status(server: SocketAddr, token: &str) -> u16 {
    use tokio_tungstenite::tungstenite::Error;
    match tokio_tungstenite::connect_async(edge_connect_request(server, token)).await {
        Ok(_) => 101,
        Err(Error::Http(response)) => response.status().as_u16(),
        Err(e) => panic!("no answer: {e}"),
    }
}

/// Starts `herald edge` and waits until it says it is connected.
fn spawn_agent(server: SocketAddr, token: &str) -> ChildGuard {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["edge", "--server", &format!("http://{server}"), "--window", "16"])
        .env("HERALD_EDGE_TOKEN", token)
        .env("RUST_LOG", "warn")
        .without_suite_knobs()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("herald edge runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    loop {
        let line = lines.next().expect("the agent said it connected").unwrap();
        if line.starts_with("herald edge connected") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    ChildGuard(child)
}

/// Waits until Herald counts `n` agents connected.
async fn agents_connected(admin: &Api, n: usize) {
    until(&format!("{n} agents connected"), Duration::from_secs(10), || async {
        (scrape(admin).await.value("herald_edge_agents_connected", &[]) == n as f64).then_some(())
    })
    .await;
}

/// A tenant with an API key and an edge device: (tenant id, tenant API, device id, token).
async fn tenant_with_device(admin: &Api, name: &str) -> (String, Api, String, String) {
    let (status, tenant) = admin.post("/v1/tenants", json!({ "name": name })).await;
    assert_eq!(status, 201, "{tenant}");
    let tenant_id = tenant["id"].as_str().unwrap().to_string();
    let (_, key) = admin.post(&format!("/v1/tenants/{tenant_id}/keys"), json!({})).await;
    let mut api = Api::new(admin.base.trim_start_matches("http://").parse().unwrap(), TOKEN);
    api.token = key["key"].as_str().unwrap().to_string();
    let (status, device) = api.post("/v1/edge-devices", json!({ "name": format!("{name} office") })).await;
    assert_eq!(status, 201, "{device}");
    assert_eq!(device["tenant"], tenant_id.as_str());
    let token = device["token"].as_str().unwrap().to_string();
    assert!(token.starts_with("he."), "{device}");
    let (_, listed) = api.get("/v1/edge-devices").await;
    assert!(listed.to_string().find("he.").is_none(), "the token is shown once: {listed}");
    (tenant_id, api, device["id"].as_str().unwrap().to_string(), token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_private_receiver_through_the_agent_even_across_an_agent_restart() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Herald itself may reach no private or loopback address: only the agents can.
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (acme_id, acme, acme_device, acme_token) = tenant_with_device(&admin, "Acme").await;
    let (globex_id, globex, globex_device, globex_token) = tenant_with_device(&admin, "Globex").await;

    // Directly, the receiver is out of Herald's reach; through the device it is fine.
    let (status, err) = acme.post("/v1/subscriptions", json!({ "url": rx.url("/direct") })).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["field"], "url");
    let retry = json!({ "policy": "fixed", "interval": "200ms", "max_attempts": 300 });
    let sub = acme.subscribe(json!({ "url": rx.url("/acme"), "via_edge": acme_device, "retry": retry })).await;
    assert_eq!(sub["via_edge"], acme_device.as_str());
    let verifier = Verifier::new(sub["secret"].as_str().unwrap()).unwrap();
    // Another tenant cannot route through Acme's device.
    let (status, err) =
        globex.post("/v1/subscriptions", json!({ "url": rx.url("/stolen"), "via_edge": acme_device })).await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["field"], "via_edge");
    globex.subscribe(json!({ "url": rx.url("/globex"), "via_edge": globex_device, "retry": retry })).await;
    // A device token is not an API key, and neither an API key nor the admin token connects
    // as a device (refused before waiting to see the catalog: it is no device token at all).
    let (status, _) = admin.raw("GET", "/v1/subscriptions", None, Some(&acme_token)).await;
    assert_eq!(status, 401);
    for token in [&acme.token, &admin.token, "he.not-a-device"] {
        assert_eq!(connect_status(addr, token).await, 401, "{token}");
    }

    let mut acme_agent = spawn_agent(addr, &acme_token);
    let _globex_agent = spawn_agent(addr, &globex_token);
    agents_connected(&admin, 2).await;

    // A stream of Acme events; the agent is killed mid-stream and comes back later.
    const EVENTS: usize = 200;
    let mut restarted = None;
    for i in 0..EVENTS {
        let event = json!({ "id": format!("a{i}"), "type": "T", "tenant": acme_id, "data": { "i": i } });
        let (status, body) = admin.post("/v1/events", event).await;
        assert_eq!(status, 202, "{body}");
        if i == 60 {
            rx.wait_on("/acme", 20).await;
            acme_agent.kill();
            until("Herald noticed the agent is gone", Duration::from_secs(10), || async {
                (scrape(&admin).await.value("herald_edge_agents_connected", &[]) == 1.0).then_some(())
            })
            .await;
        }
        if i == 140 {
            restarted = Some(spawn_agent(addr, &acme_token));
        }
    }
    let (_, body) = admin.post("/v1/events", json!({ "id": "g0", "type": "T", "tenant": globex_id, "data": {} })).await;
    assert_eq!(body["deliveries"], 1);
    let _restarted = restarted.unwrap();

    let arrived = until("every Acme event through the agent", Duration::from_secs(60), || async {
        let mut ids: HashMap<String, usize> = HashMap::new();
        for r in rx.on("/acme") {
            *ids.entry(r.header("webhook-id").to_string()).or_default() += 1;
        }
        (ids.len() == EVENTS).then_some(ids)
    })
    .await;
    for r in rx.on("/acme") {
        let ok = verifier.verify(
            r.header("webhook-id"),
            r.header("webhook-timestamp"),
            &r.body,
            r.header("webhook-signature"),
        );
        assert!(ok, "signed with the subscription's secret");
    }
    let duplicates: usize = arrived.values().map(|n| n - 1).sum();
    eprintln!("edge: {EVENTS} events through the agent, {duplicates} duplicates after killing it");
    // Each tenant's device got only its own tenant's deliveries.
    let globex_ids: Vec<String> =
        rx.wait_on("/globex", 1).await.iter().map(|r| r.header("webhook-id").to_string()).collect();
    assert_eq!(globex_ids, vec!["g0".to_string()]);
    assert!(rx.on("/direct").is_empty() && rx.on("/stolen").is_empty());

    // Reports trail the requests a little: wait for them to be counted.
    let m = until("a round trip measured per delivery", Duration::from_secs(10), || async {
        let m = scrape(&admin).await;
        (m.value("herald_edge_rtt_seconds", &[]) > EVENTS as f64).then_some(m.text)
    })
    .await;
    // One in-flight gauge for the process: device ids never become metric labels.
    assert!(m.contains("herald_edge_in_flight "), "the in-flight gauge is exposed");
    assert!(!m.contains(&acme_device), "no device id in /metrics");
}

/// An agent started with what can never work says so and stops, naming the flag (exit 2): a
/// server URL no request can be made of, or a token no header can carry, was retried for
/// good as "cannot reach herald"; a timeout of nothing timed every attempt out.
#[tokio::test]
async fn an_agent_started_with_what_can_never_work_says_so_and_stops() {
    let cases = [
        (vec!["--server", "https://"], "he.dev_x.secret", "--server"),
        (vec!["--server", "http://herald .example"], "he.dev_x.secret", "--server"),
        (vec!["--server", "http://127.0.0.1:9"], "he.dev_x.secret\r", "token"),
        (vec!["--server", "http://127.0.0.1:9"], "hk.key_x.secret", "token"),
        (vec!["--server", "http://127.0.0.1:9", "--timeout", "0s"], "he.dev_x.secret", "--timeout"),
        (vec!["--server", "http://127.0.0.1:9", "--window", "0"], "he.dev_x.secret", "--window"),
    ];
    for (args, token, named) in cases {
        let agent = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
            .arg("edge")
            .args(&args)
            .env("HERALD_EDGE_TOKEN", token)
            .env("RUST_LOG", "error")
            .without_suite_knobs()
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(10), agent).await;
        let out = out.unwrap_or_else(|_| panic!("{args:?} {token:?}: still running after 10 s")).unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?} {token:?}: {said}");
        assert!(said.contains(named), "{args:?} {token:?}: {said}");
    }
}

/// An agent whose stdout's reader is gone (`herald edge | head -1`, a log pipe restarted)
/// goes on: its "connected" line panicked, and the agent stopped at each connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_output_is_no_longer_read_goes_on_delivering() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (tenant, api, device, token) = tenant_with_device(&admin, "Piped").await;
    api.subscribe(json!({ "url": rx.url("/piped"), "via_edge": device })).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["edge", "--server", &format!("http://{addr}")])
        .env("HERALD_EDGE_TOKEN", &token)
        .env("RUST_LOG", "error")
        .without_suite_knobs()
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("herald edge runs");
    drop(child.stdout.take()); // nobody reads what it says
    let agent = ChildGuard(child);
    agents_connected(&admin, 1).await;
    let (status, body) =
        admin.post("/v1/events", json!({ "id": "p1", "type": "T", "tenant": tenant, "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    rx.wait_on("/piped", 1).await;
    let mut agent = agent;
    assert!(agent.0.try_wait().unwrap().is_none(), "the agent stopped");
}

/// A server that accepts the agent's connection and never answers the upgrade (a stalled
/// proxy) does not hold the agent for ever: it gives up and connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_connection_is_never_answered_connects_again() {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut agent = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["edge", "--server", &format!("http://{addr}")])
        .env("HERALD_EDGE_TOKEN", "he.dev_x.secret")
        .env("RUST_LOG", "error")
        .without_suite_knobs()
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("herald edge runs");
    let mut held = Vec::new();
    let within = herald::agent::CONNECT_WITHIN + Duration::from_secs(15);
    let second = tokio::time::timeout(within, async {
        for _ in 0..2 {
            let (socket, _) = listener.accept().await.unwrap();
            held.push(socket); // accepted, never answered
        }
    })
    .await;
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(second.is_ok(), "the agent waited on an unanswered connection for over {within:?}");
}

/// An attempt through an agent has the server's timeout (`http.timeout` when the
/// subscription sets none), as a direct one does: the agent used its own 30 s, so the server
/// counted an attempt it was still making a timeout, and sent it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_attempt_has_the_server_s_timeout() {
    let rx = Receiver::start().await;
    rx.behave("/slow", crate::support::Behaviour::Slow(Duration::from_secs(4)));
    let dir = tempfile::tempdir().unwrap();
    let env = [("HERALD_NETWORK_ALLOW", ""), ("HERALD_HTTP_TIMEOUT", "1s")];
    let (_herald, addr) = spawn_herald_with(dir.path(), &env);
    let admin = Api::new(addr, TOKEN);
    let (acme_id, acme, device, token) = tenant_with_device(&admin, "Acme").await;
    let retry = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    acme.subscribe(json!({ "url": rx.url("/slow"), "via_edge": device, "retry": retry })).await;
    let _agent = spawn_agent(addr, &token);
    agents_connected(&admin, 1).await;
    admin.post("/v1/events", json!({ "id": "slow", "type": "T", "tenant": acme_id, "data": {} })).await;
    let attempt = until("the attempt on record", Duration::from_secs(20), || async {
        let (_, page) = acme.get("/v1/attempts?event=slow").await;
        page["items"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(attempt["outcome"], "timeout", "{attempt}");
    assert!(attempt["duration_ms"].as_u64().unwrap() < 3_000, "the agent waited past the server's timeout: {attempt}");
}

/// The largest event Herald takes (12 MiB) goes through an agent too: base64 in a message of
/// the protocol it is 16 MiB and more, which the agent refused as a frame too long (its
/// connection ended, every delivery in flight with it, at each retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_event_goes_through_an_agent() {
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let env = [("HERALD_NETWORK_ALLOW", ""), ("HERALD_INGEST_MAX_EVENT_BYTES", "12582912")];
    let (_herald, addr) = spawn_herald_with(dir.path(), &env);
    let admin = Api::new(addr, TOKEN);
    let (acme_id, acme, device, token) = tenant_with_device(&admin, "Acme").await;
    acme.subscribe(json!({ "url": rx.url("/large"), "via_edge": device, "payload": "raw" })).await;
    let _agent = spawn_agent(addr, &token);
    agents_connected(&admin, 1).await;
    let text = "x".repeat((12 << 20) - 200);
    let (status, answer) =
        admin.post("/v1/events", json!({ "id": "large", "type": "T", "tenant": acme_id, "data": text })).await;
    assert_eq!(status, 202, "{answer}");
    let got = rx.wait_on("/large", 1).await;
    assert_eq!(got[0].body.len(), text.len() + 2, "the whole event, as a JSON string");
}

/// The attempt of an event published to a subscription at `url` through an agent, with the
/// server keeping `response_bytes` of each answer: its record, once delivered.
async fn attempt_through_an_agent(url: String, response_bytes: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let env = [("HERALD_NETWORK_ALLOW", ""), ("HERALD_HISTORY_RESPONSE_BYTES", response_bytes)];
    let (_herald, addr) = spawn_herald_with(dir.path(), &env);
    let admin = Api::new(addr, TOKEN);
    let (acme_id, acme, device, token) = tenant_with_device(&admin, "Acme").await;
    acme.subscribe(json!({ "url": url, "via_edge": device })).await;
    let _agent = spawn_agent(addr, &token);
    agents_connected(&admin, 1).await;
    let (status, answer) =
        admin.post("/v1/events", json!({ "id": "e", "type": "T", "tenant": acme_id, "data": {} })).await;
    assert_eq!(status, 202, "{answer}");
    let attempt = until("the edge attempt on record", Duration::from_secs(30), || async {
        let (_, page) = acme.get("/v1/attempts?event=e").await;
        page["items"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(attempt["outcome"], "delivered", "{attempt}");
    attempt
}

/// `history.response_bytes` holds for attempts made through an agent too (its report was
/// kept to 1 KiB whatever the setting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_attempt_keeps_as_much_of_the_answer_as_configured() {
    let rx = Receiver::start().await;
    let attempt = attempt_through_an_agent(rx.url("/short"), "1").await;
    assert_eq!(attempt["response"]["body"], "o", "the receiver's \"ok\" cut to 1 byte: {attempt}");
}

/// An edge attempt keeps as much of the answer as a direct one, up to `history.response_bytes`:
/// the agent kept 1 KiB whatever the server's history kept, so the record of an attempt
/// depended on how it travelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_attempt_keeps_as_much_of_a_long_answer_as_a_direct_one() {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}/long", listener.local_addr().unwrap());
    crate::support::serve_http1(listener, |_req: hyper::Request<hyper::body::Incoming>| async {
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from("x".repeat(3000))))
    });
    let attempt = attempt_through_an_agent(url, "4096").await;
    assert_eq!(attempt["response"]["body"].as_str().map(str::len), Some(3000), "{attempt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_holds_one_connection_and_deleting_it_ends_that_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, acme, device, token) = tenant_with_device(&admin, "Acme").await;
    let connected = |n: f64| {
        let admin = admin.clone();
        async move {
            until(&format!("{n} agents connected"), Duration::from_secs(10), || async {
                (scrape(&admin).await.value("herald_edge_agents_connected", &[]) == n).then_some(())
            })
            .await
        }
    };
    let _first = spawn_agent(addr, &token);
    connected(1.0).await;
    // A second connection with the same token replaces the first: never two.
    let _second = spawn_agent(addr, &token);
    connected(1.0).await;

    // Deleting the device ends its live connection, and the token no longer connects.
    assert_eq!(acme.delete(&format!("/v1/edge-devices/{device}")).await.0, 204);
    connected(0.0).await;
    until("the agents' reconnections refused", Duration::from_secs(20), || async {
        let refused = scrape(&admin)
            .await
            .value("herald_api_requests_total", &[("route", "/v1/edge/connect"), ("status", "401")]);
        (refused >= 1.0).then_some(())
    })
    .await;
    assert_eq!(scrape(&admin).await.value("herald_edge_agents_connected", &[]), 0.0);
}

/// An agent's messages are small (reports of attempts): one of megabytes ends its connection
/// instead of being read into memory, and a device's agent reconnects like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_agent_message_ends_the_connection() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Bulky").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":1}"#.into())).await.unwrap();
    // Unreadable as a message, but read whole first.
    let _ = ws.send(Message::Text("x".repeat(4 << 20).into())).await;
    let ended = crate::support::ws_ended(&mut ws, Duration::from_secs(10)).await;
    assert!(ended.is_some(), "the connection stayed open after a 4 MiB message");
}

/// An agent sending messages nobody asked for (no delivery was sent to it) is disconnected:
/// each was read and parsed, up to a megabyte apiece, on the cores every tenant's deliveries
/// share, for as long as the agent kept sending.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_sending_what_nobody_asked_for_is_disconnected() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Chatty").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":1}"#.into())).await.unwrap();
    agents_connected(&admin, 1).await;
    for _ in 0..1_000 {
        if ws.feed(Message::Text(r#"{"type":"hello","window":1}"#.into())).await.is_err() {
            break;
        }
    }
    let _ = ws.flush().await;
    let ended = crate::support::ws_ended(&mut ws, Duration::from_secs(10)).await;
    assert!(ended.is_some(), "the connection stayed open after 1,000 messages nobody asked for");
    agents_connected(&admin, 0).await;
}

/// An agent whose first message is not a readable hello is told why as the connection
/// closes (a policy close naming `window`): it was dropped without a word, and the agent
/// guessed another agent held the device's token and backed off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_hello_is_answered_with_a_close_that_says_why() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Terse").await;
    for hello in [r#"{"type":"hello"}"#, r#"{"type":"hello","window":-1}"#, "hi"] {
        let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
        ws.send(Message::Text(hello.into())).await.unwrap();
        let close = crate::support::ws_ended(&mut ws, Duration::from_secs(10)).await.expect("closed within 10 s");
        let frame = close.unwrap_or_else(|| panic!("{hello}: closed without a close frame"));
        assert_eq!(u16::from(frame.code), 1008, "{hello}");
        assert!(frame.reason.contains("window"), "{hello}: {}", frame.reason);
    }
}

/// A tenant's edge devices are bounded like its subscriptions (`quotas.edge_devices_per_tenant`,
/// 100 by default): each is a catalog record, listed whole and read by every process.
#[tokio::test]
async fn a_tenant_s_edge_devices_are_bounded() {
    let h = crate::support::TestHerald::start().await;
    let (status, tenant) = h.api.post("/v1/tenants", json!({ "name": "Many" })).await;
    assert_eq!(status, 201, "{tenant}");
    let tenant = tenant["id"].as_str().unwrap().to_string();
    for i in 0..96 {
        let (status, d) =
            h.api.post("/v1/edge-devices", json!({ "name": format!("site {i}"), "tenant": tenant })).await;
        assert_eq!(status, 201, "{d}");
    }
    // Creates racing each other stop at the quota too.
    let creates = (0..12).map(|i| {
        let (api, tenant) = (h.api.clone(), tenant.clone());
        async move { api.post("/v1/edge-devices", json!({ "name": format!("race {i}"), "tenant": tenant })).await.0 }
    });
    let statuses = futures::future::join_all(creates).await;
    assert_eq!(statuses.iter().filter(|s| s.as_u16() == 201).count(), 4, "{statuses:?}");
    let (status, err) = h.api.post("/v1/edge-devices", json!({ "name": "one more", "tenant": tenant })).await;
    assert_eq!((status.as_u16(), &err["error"]["code"]), (403, &json!("QUOTA_EXCEEDED")), "{err}");
    // Another tenant's are its own.
    let (status, d) = h.api.post("/v1/edge-devices", json!({ "name": "elsewhere" })).await;
    assert_eq!(status, 201, "{d}");
}

/// An agent that says hello, then stops reading its socket (and says hello now and then, so
/// Herald does not drop it for silence): once its socket is full, what Herald queues for it
/// is bounded, and deleting its device still ends the connection at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_is_still_disconnected_when_its_device_is_deleted() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (tenant, acme, device, token) = tenant_with_device(&admin, "Stalled").await;
    // A short timeout: an attempt waits this long for room in the agent's queue, then is
    // refused `edge_busy`.
    acme.subscribe(
        json!({ "url": "http://127.0.0.1:9/never", "via_edge": device, "max_in_flight": 1000, "timeout": "1s" }),
    )
    .await;
    let (ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    let (mut write, read) = ws.split();
    write.send(Message::Text(r#"{"type":"hello","window":4096}"#.into())).await.unwrap();
    let talking = tokio::spawn(async move {
        let _unread = read; // held, never polled
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if write.send(Message::Text(r#"{"type":"hello","window":4096}"#.into())).await.is_err() {
                return;
            }
        }
    });
    agents_connected(&admin, 1).await;
    // About 60 MB of deliveries for an agent that reads none of them: more than the sockets
    // between hold and the 8 MiB Herald queues for one agent.
    let pad = "x".repeat(48 << 10);
    for batch in 0..40 {
        let events: Vec<_> = (0..20)
            .map(|i| json!({ "id": format!("big-{batch}-{i}"), "tenant": tenant, "type": "t", "data": { "pad": pad } }))
            .collect();
        assert_eq!(admin.post("/v1/events/batch", json!(events)).await.0, 202);
    }
    // The socket is full and the queue at its bound: attempts past it wait for room, then are
    // refused.
    until("attempts refused as the agent's queue is full", Duration::from_secs(30), || async {
        let busy = [("transport", "edge"), ("outcome", "edge_busy")];
        (scrape(&admin).await.value("herald_attempts_total", &busy) >= 1.0).then_some(())
    })
    .await;
    assert_eq!(acme.delete(&format!("/v1/edge-devices/{device}")).await.0, 204);
    until("the stalled agent disconnected", Duration::from_secs(10), || async {
        (scrape(&admin).await.value("herald_edge_agents_connected", &[]) == 0.0).then_some(())
    })
    .await;
    talking.abort();
}

/// An agent sending a flood of unreadable messages gets a few log lines, not one each: a
/// million one-byte frames wrote a million warnings (lock contention, CPU, the log pipeline's
/// disk) on cores other tenants' deliveries share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_flood_of_unreadable_messages_is_not_logged_one_by_one() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr, log) = crate::support::spawn_herald_logged(dir.path(), &[]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Noisy").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":16}"#.into())).await.unwrap();
    agents_connected(&admin, 1).await;
    for _ in 0..5_000 {
        ws.feed(Message::Text("x".into())).await.unwrap();
    }
    ws.flush().await.unwrap();
    ws.close(None).await.unwrap();
    // Read in order: once the connection is gone, every frame before its close was read.
    agents_connected(&admin, 0).await;
    let lines = log.lock().unwrap().matches("unreadable message from an edge agent").count();
    assert!((1..=3).contains(&lines), "{lines} log lines for 5,000 unreadable messages");
}

/// An agent connected when Herald was killed is not still "connected" after the restart (one
/// process on the embedded log: every presence found at start is a dead run's), and attempts
/// through its device are `edge_offline` — not forwarded to the dead run's address, which the
/// tenant's history then showed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_of_a_killed_run_is_not_taken_for_a_live_agent() {
    use futures::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let dir = tempfile::tempdir().unwrap();
    let (mut herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, acme, device, token) = tenant_with_device(&admin, "Stale").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":4}"#.into())).await.unwrap();
    agents_connected(&admin, 1).await;
    let rx = crate::support::Receiver::start().await;
    let retry = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 1 });
    let sub = acme.subscribe(json!({ "url": rx.url("/x"), "via_edge": device, "retry": retry })).await;
    herald.kill();
    drop(ws);
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let mut acme = acme;
    acme.base = admin.base.clone();
    let (status, got) = acme.get(&format!("/v1/edge-devices/{device}")).await;
    assert_eq!((status.as_u16(), &got["connected"]), (200, &json!(false)), "{got}");
    let tenant = sub["tenant"].as_str().unwrap();
    assert_eq!(admin.post("/v1/events", json!({ "type": "t", "tenant": tenant, "data": {} })).await.0, 202);
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let attempt = until("the attempt on record", Duration::from_secs(20), || async {
        let (_, page) = acme.get(&format!("/v1/attempts?subscription={sub_id}")).await;
        page["items"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(attempt["outcome"], "edge_offline", "{attempt}");
}

/// Two agents run with one device's token: each connection replaces the other. Each agent
/// backs off further every time its connection ends that soon, instead of both reconnecting
/// several times a second for ever (each connection a presence record in the catalog).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_with_one_token_back_off_instead_of_taking_turns() {
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Twice").await;
    let connects = || async {
        scrape(&admin).await.value("herald_api_requests_total", &[("route", "/v1/edge/connect"), ("status", "101")])
    };
    let _first = spawn_agent(addr, &token);
    let _second = spawn_agent(addr, &token);
    let before = connects().await;
    // A window of time is what is measured here: how often they connect in it.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let during = connects().await - before;
    assert!(during <= 20.0, "{during} connections in 15 s");
}

/// Every edge connection is announced to every process through the catalog (and withdrawn
/// when it ends), and every API request waits for the catalog: a tenant's agents connecting
/// in a tight loop would make every process apply that stream. Connections are throttled per
/// tenant (a burst for all its devices after a restart, then a few a second): 429.
#[tokio::test]
async fn a_tenant_s_edge_connections_are_throttled() {
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (_, _, _, token) = tenant_with_device(&admin, "Loopy").await;
    let mut statuses = HashMap::<u16, usize>::new();
    for _ in 0..300 {
        *statuses.entry(connect_status(addr, &token).await).or_default() += 1;
    }
    assert!(statuses.get(&429).copied().unwrap_or(0) > 100, "{statuses:?}");
    assert!(statuses.get(&101).copied().unwrap_or(0) >= 100, "a burst goes through: {statuses:?}");
}

/// An agent runs on a tenant's own machine, so what it reports is the tenant's word: a
/// latency of 300 years put the attempt's time in 1970 (its day long expired), so the attempt
/// was missing from the history and the delivered event showed as `retrying`. The time an
/// attempt took is at most what Herald waited for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_s_reported_latency_cannot_move_the_attempt_out_of_the_history() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let admin = Api::new(addr, TOKEN);
    let (tenant, api, device, token) = tenant_with_device(&admin, "Boastful").await;
    let sub = api.subscribe(json!({ "url": rx.url("/far"), "via_edge": device })).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":1}"#.into())).await.unwrap();
    agents_connected(&admin, 1).await;
    let (status, body) =
        admin.post("/v1/events", json!({ "id": "far-1", "tenant": tenant, "type": "T", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    let seq = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(Ok(Message::Text(text))) = ws.next().await {
                let msg: serde_json::Value = serde_json::from_str(&text).unwrap();
                if msg["type"] == "deliver" {
                    return msg["seq"].as_u64().unwrap();
                }
            }
        }
    })
    .await
    .expect("a delivery reaches the agent");
    let report = json!({ "type": "outcome", "seq": seq,
        "outcome": { "result": "delivered", "status": 200, "latency": 10_000_000_000_000u64 } });
    ws.send(Message::Text(report.to_string().into())).await.unwrap();
    let sub_id = sub["id"].as_str().unwrap();
    let attempts = until("the attempt on record", Duration::from_secs(20), || async {
        let (_, page) = api.get(&format!("/v1/attempts?subscription={sub_id}")).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        (!items.is_empty()).then_some(items)
    })
    .await;
    let at = chrono::DateTime::parse_from_rfc3339(attempts[0]["at"].as_str().unwrap()).unwrap();
    assert!((chrono::Utc::now() - at.to_utc()).num_minutes().abs() < 5, "the attempt's time: {at}");
    let (_, event) = api.get("/v1/events/far-1").await;
    assert_eq!(event["deliveries"][0]["state"], "delivered", "{event}");
}

/// A device's window full with one subscription's attempts (its receiver hangs) makes the
/// device's other subscriptions' attempts `edge_busy`: congestion behind the agent, not their
/// endpoint's health — counted against it, a healthy endpoint's breaker opened (and in time
/// the subscription was disabled).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attempts_held_up_by_a_full_agent_window_do_not_open_the_breaker() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) =
        spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", ""), ("HERALD_HEALTH_BREAKER_FAILURES", "2")]);
    let admin = Api::new(addr, TOKEN);
    let (tenant, api, device, token) = tenant_with_device(&admin, "Crowded").await;
    let retry = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 50 });
    api.subscribe(json!({ "url": rx.url("/slow"), "via_edge": device, "events": ["slow"] })).await;
    let fine = api
        .subscribe(
            json!({ "url": rx.url("/fine"), "via_edge": device, "events": ["fine"], "timeout": "1s", "retry": retry }),
        )
        .await;
    let fine = fine["id"].as_str().unwrap().to_string();
    // An agent taking one delivery at a time, which never answers.
    let (mut ws, _) = tokio_tungstenite::connect_async(edge_connect_request(addr, &token)).await.expect("connects");
    ws.send(Message::Text(r#"{"type":"hello","window":1}"#.into())).await.unwrap();
    agents_connected(&admin, 1).await;
    admin.post("/v1/events", json!({ "id": "slow-1", "tenant": tenant, "type": "slow", "data": {} })).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while !matches!(ws.next().await, Some(Ok(Message::Text(t))) if t.contains("\"deliver\"")) {}
    })
    .await
    .expect("the slow subscription's delivery holds the window");
    admin.post("/v1/events", json!({ "id": "fine-1", "tenant": tenant, "type": "fine", "data": {} })).await;
    until("three busy attempts of the other subscription", Duration::from_secs(30), || async {
        let (_, page) = api.get(&format!("/v1/attempts?subscription={fine}&outcome=edge_busy")).await;
        (page["items"].as_array()?.len() >= 3).then_some(())
    })
    .await;
    let (_, sub) = api.get(&format!("/v1/subscriptions/{fine}")).await;
    assert_eq!(sub["health"]["breaker"], "closed", "{sub}");
    assert_eq!(sub["enabled"], true);
}

/// An agent's connection that breaks ends the attempts it was making for it: the server has
/// settled them `edge_offline` and retries them through the next connection, so an attempt
/// of the dead one that goes on was a delivery off the record — sent again on retry, out of
/// order for an ordered key, and past `--window` beside the new connection's. (They ran on in
/// detached tasks, each up to its timeout, here 30 s.) A TCP relay between agent and server
/// stands in for the network that breaks; the receiver never answers and counts the
/// connections held open to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_agent_connection_ends_the_attempts_made_for_it() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use tokio::io::AsyncReadExt;
    let h = crate::support::TestHerald::start().await;
    // The receiver: each connection is one attempt, held unanswered until the agent lets go.
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hold", receiver.local_addr().unwrap());
    let (open, arrived) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (o, a) = (open.clone(), arrived.clone());
    tokio::spawn(async move {
        while let Ok((mut s, _)) = receiver.accept().await {
            let (o, a) = (o.clone(), a.clone());
            tokio::spawn(async move {
                o.fetch_add(1, Ordering::SeqCst);
                a.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    // The relay: every connection through it is cut at once when asked.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    let piped: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
    let (server, kept) = (h.herald.addr, piped.clone());
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = relay.accept().await {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(server).await else { continue };
            kept.lock().unwrap().push(tokio::spawn(async move {
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            }));
        }
    });
    let (status, device) = h.api.post("/v1/edge-devices", json!({ "name": "office" })).await;
    assert_eq!(status, 201, "{device}");
    let retry = json!({ "policy": "fixed", "interval": "200ms", "max_attempts": 50 });
    h.api.subscribe(json!({ "url": url, "via_edge": device["id"], "retry": retry, "timeout": "30s" })).await;
    let (_stop, stopped) = tokio::sync::watch::channel(false);
    let _agent = tokio::spawn(herald::agent::run(
        herald::agent::AgentConfig {
            server: format!("http://{relay_addr}"),
            token: device["token"].as_str().unwrap().to_string(),
            window: 1,
            allow: vec!["127.0.0.0/8".parse().unwrap()],
            default_timeout: Duration::from_secs(30),
            tls_files_dir: None,
        },
        stopped,
    ));
    h.api.post("/v1/events", json!({ "id": "held-1", "type": "T", "data": {} })).await;
    until("the first attempt at the receiver", Duration::from_secs(20), || async {
        (open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
    for pipe in piped.lock().unwrap().drain(..) {
        pipe.abort();
    }
    until("the retry through the next connection", Duration::from_secs(20), || async {
        (arrived.load(Ordering::SeqCst) >= 2).then_some(())
    })
    .await;
    until("the dead connection's attempt let go", Duration::from_secs(10), || async {
        (open.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;
}
