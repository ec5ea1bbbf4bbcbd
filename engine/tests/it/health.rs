//! Endpoint health: the circuit breaker bounds what a dead endpoint receives, the rate limit
//! paces deliveries, and continuous failure disables a subscription.

use crate::support::{until, Receiver, TestHerald};
use serde_json::json;
use std::time::{Duration, Instant};

#[tokio::test]
async fn a_dead_endpoint_gets_a_trickle_from_the_breaker_and_everything_after_it_recovers() {
    let h = TestHerald::start_with(|c| {
        c.health.breaker_failures = 3;
        c.health.breaker_pause = Duration::from_millis(300).into();
        c.health.breaker_max_pause = Duration::from_millis(600).into();
    })
    .await;
    let rx = Receiver::start().await;
    rx.respond_on("/down", 503);
    // Without a breaker, 30 events retried every 50 ms for 2 s would be about 1 200 requests.
    h.api
        .subscribe(
            json!({ "url": rx.url("/down"), "retry": { "policy": "fixed", "interval": "50ms", "max_attempts": 1000 } }),
        )
        .await;
    for i in 0..30 {
        h.api.post("/v1/events", json!({ "id": format!("out-{i}"), "type": "T", "data": i })).await;
    }
    let outage = Duration::from_secs(2);
    tokio::time::sleep(outage).await; // the outage's length: a scenario parameter, not a wait for state
    let during = rx.on("/down").len();
    rx.respond_on("/down", 200);
    let recovered = Instant::now();
    // The first burst (every event's first attempt) plus a probe per pause.
    assert!(during <= 30 + 12, "{during} requests reached the endpoint during a {outage:?} outage");
    let deferred: f64 = crate::support::metrics::scrape(&h.api)
        .await
        .value("herald_deliveries_deferred_total", &[("reason", "circuit_breaker")]);
    assert!(deferred > 0.0, "deliveries held back by the open breaker are counted");
    // After recovery every event arrives.
    until("all 30 events delivered after recovery", Duration::from_secs(30), || async {
        let delivered: std::collections::HashSet<String> =
            rx.on("/down").iter().filter(|r| r.at >= recovered).map(|r| r.header("webhook-id").to_string()).collect();
        (delivered.len() == 30).then_some(())
    })
    .await;
    eprintln!("breaker test: {during} requests during a 2 s outage for 30 events, {} in all", rx.on("/down").len());
}

#[tokio::test]
async fn the_rate_limit_paces_deliveries() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/paced"), "rate_limit": 20 })).await;
    let events: Vec<_> = (0..50).map(|i| json!({ "type": "T", "data": i })).collect();
    h.api.post("/v1/events/batch", serde_json::Value::Array(events)).await;
    let got = rx.wait_on("/paced", 50).await;
    let span = got.last().unwrap().at - got[0].at;
    // A second's worth (20) at once, then 20 per second: the other 30 take about 1.5 s.
    assert!(span >= Duration::from_millis(1300), "50 deliveries at 20/s took only {span:?}");
}

#[tokio::test]
async fn continuous_failure_disables_the_subscription() {
    // A process of its own, so the disabled gauge is this server's alone.
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    rx.respond_on("/broken", 500);
    let (_child, addr) = crate::support::spawn_herald_with(dir.path(), &[("HERALD_HEALTH_DISABLE_AFTER", "500ms")]);
    let api = crate::support::Api::new(addr, crate::support::TOKEN);
    let sub = api
        .subscribe(json!({ "url": rx.url("/broken"), "retry": { "policy": "fixed", "interval": "100ms", "max_attempts": 100 } }))
        .await;
    let id = sub["id"].as_str().unwrap().to_string();
    api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let state = until("the subscription to be disabled", Duration::from_secs(20), || async {
        let (_, s) = api.get(&format!("/v1/subscriptions/{id}")).await;
        (s["enabled"] == false).then_some(s)
    })
    .await;
    assert!(state["disabled_reason"].as_str().unwrap().contains("failing continuously"), "{state}");
    assert_eq!(crate::support::metrics::scrape(&api).await.value("herald_subscriptions_disabled", &[]), 1.0);
}

#[tokio::test]
async fn a_name_resolving_to_a_private_address_is_refused_at_connect_time() {
    // No network.allow: loopback is private to this guard.
    let h = TestHerald::start_with(|c| c.network.allow.clear()).await;
    let rx = Receiver::start().await;
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    // An IP literal is refused when the subscription is created...
    let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": rx.url("/x") })).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("network.allow"));
    // ...a name is judged by what it resolves to, when connecting.
    let url = format!("http://localhost:{}/x", rx.addr.port());
    h.api.subscribe(json!({ "url": url, "retry": once })).await;
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let api = h.api.clone();
    let entry = until("the refused delivery in the dead-letter list", Duration::from_secs(10), || async {
        let (_, page) = api.get("/v1/dlq").await;
        page["items"].as_array().unwrap().first().cloned()
    })
    .await;
    assert!(entry["last_error"].as_str().unwrap().contains("network.allow"), "{entry}");
    assert!(rx.all().is_empty(), "nothing reached the private address");
}

#[tokio::test]
async fn a_hanging_receiver_is_a_failure_within_the_subscription_timeout() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.behave("/hang", crate::support::Behaviour::Hang);
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    h.api.subscribe(json!({ "url": rx.url("/hang"), "timeout": "PT0.5S", "retry": once })).await;
    let published = Instant::now();
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let api = h.api.clone();
    let entry = until("the timed-out delivery dead-lettered", Duration::from_secs(10), || async {
        let (_, page) = api.get("/v1/dlq").await;
        page["items"].as_array().unwrap().first().cloned()
    })
    .await;
    let took = published.elapsed();
    assert!(entry["last_error"].as_str().unwrap().contains("timed out"), "{entry}");
    assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500), "timeout took {took:?}");
}
