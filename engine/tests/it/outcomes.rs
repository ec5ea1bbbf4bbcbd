//! Typed outcomes: one kind of failure gets one label on every transport. A receiver that
//! hangs, a broker that accepts the connection and never speaks, and an edge agent that never
//! reports are each counted as `outcome="timeout"`, and dead-lettered saying they timed out.

use crate::support::metrics::scrape;
use crate::support::{edge_connect_request, spawn_herald, until, Api, Behaviour, Receiver, TOKEN};
use futures::SinkExt;
use serde_json::json;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// A TCP server that accepts connections and never answers: an AMQP broker that hangs.
async fn silent_broker() -> std::net::SocketAddr {
    silent_broker_counting().await.0
}

/// A silent broker, and how many connections it has taken.
async fn silent_broker_counting() -> (std::net::SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            held.push(socket);
        }
    });
    (addr, accepted)
}

/// An edge agent that says hello and never reports an outcome.
async fn mute_agent(addr: std::net::SocketAddr, token: &str) {
    let (mut ws, _) =
        tokio_tungstenite::connect_async(edge_connect_request(addr, token)).await.expect("agent connects");
    ws.send(Message::Text(json!({ "type": "hello", "window": 8 }).to_string().into())).await.unwrap();
    tokio::spawn(async move {
        use futures::StreamExt;
        while ws.next().await.is_some() {} // read and ignore, keeping the connection
    });
}

#[tokio::test]
async fn a_timeout_is_counted_as_timeout_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.behave("/hang", Behaviour::Hang);
    // A process of its own: the metrics recorder is per process.
    let (_child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    api.subscribe(json!({ "url": rx.url("/hang"), "events": ["H"], "timeout": "300ms", "retry": once })).await;
    let broker = silent_broker().await;
    api.subscribe(json!({
        "transport": "amqp", "events": ["A"], "timeout": "300ms", "retry": once,
        "amqp": { "uri": format!("amqp://guest:guest@{broker}/%2f"), "exchange": "x" }
    }))
    .await;
    let (status, device) = api.post("/v1/edge-devices", json!({ "name": "mute" })).await;
    assert_eq!(status, 201, "{device}");
    mute_agent(addr, device["token"].as_str().unwrap()).await;
    api.subscribe(json!({
        "url": "http://10.9.9.9/behind-the-agent", "events": ["E"], "timeout": "100ms", "retry": once,
        "via_edge": device["id"]
    }))
    .await;
    for t in ["H", "A", "E"] {
        let (status, answer) = api.post("/v1/events", json!({ "type": t, "data": {} })).await;
        assert_eq!((status.as_u16(), answer["deliveries"].as_u64()), (202, Some(1)), "{answer}");
    }
    let text = until("a timeout counted for each transport", Duration::from_secs(30), || async {
        let m = scrape(&api).await;
        let timeouts = |t| m.value("herald_attempts_total", &[("transport", t), ("outcome", "timeout")]);
        ["webhook", "amqp", "edge"].into_iter().all(|t| timeouts(t) == 1.0).then_some(m.text)
    })
    .await;
    assert!(!text.contains("outcome=\"error\""), "no failure is an unlabelled error");
    let dead = until("three dead letters", Duration::from_secs(10), || async {
        let (_, page) = api.get("/v1/dlq").await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        (items.len() == 3).then_some(items)
    })
    .await;
    for entry in dead {
        let error = entry["last_error"].as_str().unwrap();
        assert!(error.starts_with("timed out after"), "{error}");
    }
}

/// Attempts to a broker that never answers the AMQP handshake time out, and do not each open
/// a connection of their own: lapin's connection thread waits on the silent peer whatever
/// becomes of the attempt, so each attempt that opened anew left a thread and a socket behind.
#[tokio::test]
async fn timed_out_amqp_attempts_to_a_silent_broker_share_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let (broker, accepted) = silent_broker_counting().await;
    let retry = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 20 });
    api.subscribe(json!({
        "transport": "amqp", "events": ["A"], "timeout": "300ms", "retry": retry,
        "amqp": { "uri": format!("amqp://guest:guest@{broker}/%2f"), "exchange": "x" }
    }))
    .await;
    let (status, _) = api.post("/v1/events", json!({ "type": "A", "data": {} })).await;
    assert_eq!(status, 202);
    until("dead-lettered after its attempts", Duration::from_secs(60), || async {
        let (_, page) = api.get("/v1/dlq").await;
        (page["items"].as_array().map(Vec::len) == Some(1)).then_some(())
    })
    .await;
    let attempts = scrape(&api).await.value("herald_attempts_total", &[("transport", "amqp"), ("outcome", "timeout")]);
    assert_eq!(attempts, 20.0);
    let opened = accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(opened <= 2, "{opened} connections for 20 attempts");
    let threads = std::fs::read_dir(format!("/proc/{}/task", child.0.id()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim() == "lapin-io-loop")
        .count();
    assert!(threads <= 2, "{threads} lapin connection threads");
}
