//! Tenants and keys: each tenant sees and changes only its own objects.

use crate::support::{tenant_with_key, until, Api, Receiver, TestHerald};
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn a_tenant_key_sees_and_changes_only_its_own_objects() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/a-down", 500);
    let (a_id, a) = tenant_with_key(&h.api, "Acme").await;
    let (b_id, b) = tenant_with_key(&h.api, "Globex").await;
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    let a_sub = a.subscribe(json!({ "url": rx.url("/a-down"), "retry": once })).await;
    assert_eq!(a_sub["tenant"], a_id.as_str());
    let b_sub = b.subscribe(json!({ "url": rx.url("/b") })).await;
    // The same URL under another tenant is fine; a tenant cannot create for another.
    b.subscribe(json!({ "url": rx.url("/a-down") })).await;
    let (status, err) = a.post("/v1/subscriptions", json!({ "url": rx.url("/x"), "tenant": b_id })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tenant")));

    let (_, own) = a.get("/v1/subscriptions").await;
    assert_eq!(own["items"].as_array().unwrap().len(), 1, "{own}");
    // Asking for another tenant's is refused, naming the field (it answered the key's own, as
    // if they were the other's); naming its own is fine.
    for path in ["/v1/subscriptions", "/v1/dlq", "/v1/events", "/v1/attempts", "/v1/edge-devices", "/v1/events/x"] {
        let (status, err) = a.get(&format!("{path}?tenant={b_id}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tenant")), "{path}: {err}");
    }
    let (status, err) = a.post("/v1/events/x/resend", json!({ "tenant": b_id })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tenant")), "{err}");
    let (_, asked_for_own) = a.get(&format!("/v1/subscriptions?tenant={a_id}")).await;
    assert_eq!(asked_for_own["items"], own["items"]);
    let b_path = format!("/v1/subscriptions/{}", b_sub["id"].as_str().unwrap());
    assert_eq!(a.get(&b_path).await.0, 404);
    assert_eq!(a.raw("PATCH", &b_path, Some(r#"{"enabled":false}"#.into()), Some(&a.token)).await.0, 404);
    assert_eq!(a.post(&format!("{b_path}/rotate-secret"), json!({})).await.0, 404);
    assert_eq!(a.post(&format!("{b_path}/test"), json!({})).await.0, 404);
    assert_eq!(a.delete(&b_path).await.0, 404);
    assert_eq!(h.api.get(&b_path).await.0, 200, "B's subscription is untouched");

    // Only the admin publishes, naming the tenant; tenant keys cannot manage tenants.
    let (status, err) = a.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (403, Some("FORBIDDEN")));
    assert_eq!(a.post("/v1/tenants", json!({ "name": "x" })).await.0, 403);
    let (_, accepted) =
        h.api.post("/v1/events", json!({ "id": "for-a", "type": "T", "tenant": a_id, "data": {} })).await;
    assert_eq!(accepted["deliveries"], 1);

    // A's dead letter is A's alone.
    let a2 = a.clone();
    let entries = until("A's dead letter", Duration::from_secs(10), || async {
        let (_, page) = a2.get("/v1/dlq").await;
        let items = page["items"].as_array().unwrap().clone();
        (!items.is_empty()).then_some(items)
    })
    .await;
    let entry_id = entries[0]["id"].as_str().unwrap().to_string();
    let (_, b_dlq) = b.get("/v1/dlq").await;
    assert!(b_dlq["items"].as_array().unwrap().is_empty(), "{b_dlq}");
    let (_, b_replay) = b.post("/v1/dlq/replay", json!({ "ids": [entry_id] })).await;
    assert_eq!(b_replay["skipped"][0]["reason"], "not_found", "{b_replay}");
    let (status, b_replay_sub) = b.post("/v1/dlq/replay", json!({ "subscription": a_sub["id"] })).await;
    assert_eq!(status, 404, "{b_replay_sub}");
    let (_, a_replay) = a.post("/v1/dlq/replay", json!({ "ids": [entry_id] })).await;
    assert_eq!(a_replay["replayed"].as_array().unwrap().len(), 1, "{a_replay}");
    // Replayed, the entry is still A's alone: B is not told it was there at all.
    let (_, b_again) = b.post("/v1/dlq/replay", json!({ "ids": [entry_id] })).await;
    assert_eq!(b_again["skipped"][0]["reason"], "not_found", "{b_again}");
    let (_, a_again) = a.post("/v1/dlq/replay", json!({ "ids": [entry_id] })).await;
    assert_eq!(a_again["skipped"][0]["reason"], "already_replayed", "{a_again}");

    // A revoked key stops working at once.
    let key_id = a.token.split('.').nth(1).unwrap().to_string();
    assert_eq!(h.api.delete(&format!("/v1/tenants/{a_id}/keys/{key_id}")).await.0, 204);
    let (status, _) = a.get("/v1/subscriptions").await;
    assert_eq!(status, 401);
    assert_eq!(h.api.delete(&format!("/v1/tenants/{a_id}/keys/{key_id}")).await.0, 404);
    // Forged keys fail.
    let mut forged = b.clone();
    forged.token = format!("hk.{key_id}.{}", "0".repeat(48));
    assert_eq!(forged.get("/v1/subscriptions").await.0, 401);
}

#[tokio::test]
async fn tenants_and_keys_survive_a_restart() {
    let h = TestHerald::start().await;
    let (a_id, a) = tenant_with_key(&h.api, "Acme").await;
    a.subscribe(json!({ "url": "https://hooks.example.com/a" })).await;
    let h = h.restart().await;
    let mut again = Api::new(h.herald.addr, &a.token);
    again.token = a.token.clone();
    let (status, list) = again.get("/v1/subscriptions").await;
    assert_eq!(status, 200);
    assert_eq!(list["items"][0]["tenant"], a_id.as_str());
    h.herald.stop().await;
}

/// One tenant's requests under way are bounded, so its bodies sent slowly (each held whole
/// until it is in, up to 4 MiB, for up to the request timeout) cannot take Herald's memory or
/// its connections from other tenants: past the bound its next request is answered `429`
/// at once, another tenant's is served, and the tenant's own are served again once its
/// requests end. The bound is `api.tenant_requests` (4 here; 16 unless set).
#[tokio::test]
async fn one_tenant_s_slow_requests_are_bounded_and_hold_nobody_else_s() {
    use tokio::io::AsyncWriteExt;
    let h = TestHerald::start_with(|c| c.api.tenant_requests = 4).await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let (_, acme) = tenant_with_key(&h.api, "Acme").await;
    let addr = h.herald.addr;
    let mut slow = Vec::new();
    for _ in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/subscriptions HTTP/1.1\r\nhost: herald\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: 4000000\r\n\r\n{{\"url\":",
            mallory.token
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        slow.push(stream);
    }
    let refused = until("mallory's next request refused", Duration::from_secs(20), || async {
        let (status, body) = mallory.get("/v1/subscriptions").await;
        (status == 429).then_some(body)
    })
    .await;
    assert_eq!(refused["error"]["code"], "RATE_LIMITED", "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("4 requests under way"), "{refused}");
    let (status, body) = acme.get("/v1/subscriptions").await;
    assert_eq!(status, 200, "another tenant is served: {body}");
    drop(slow);
    until("mallory served again once its requests end", Duration::from_secs(20), || async {
        (mallory.get("/v1/subscriptions").await.0 == 200).then_some(())
    })
    .await;
}

/// A key revoked while a request of it was still sending its body did not stop that request:
/// who the caller is was decided at its head, and a body sent slowly for up to the request
/// timeout then made an edge device (a token for good) with a key already revoked. The key is
/// checked again once the body is in.
#[tokio::test]
async fn a_key_revoked_while_its_request_s_body_arrives_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = TestHerald::start_with(|c| c.api.tenant_requests = 1).await;
    let (tenant, key) = tenant_with_key(&h.api, "Leaky").await;
    let body = br#"{"name":"after-revocation"}"#;
    let mut stream = tokio::net::TcpStream::connect(h.herald.addr).await.unwrap();
    let head = format!(
        "POST /v1/edge-devices HTTP/1.1\r\nhost: herald\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        key.token,
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body[..8]).await.unwrap();
    // The request holds the tenant's one place once its key was taken at the head.
    until("the slow request authenticated", Duration::from_secs(20), || async {
        (key.get("/v1/subscriptions").await.0 == 429).then_some(())
    })
    .await;
    let key_id = key.token.split('.').nth(1).unwrap().to_string();
    assert_eq!(h.api.delete(&format!("/v1/tenants/{tenant}/keys/{key_id}")).await.0, 204);
    stream.write_all(&body[8..]).await.unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&chunk[..n]);
    }
    let said = String::from_utf8_lossy(&answer).to_string();
    assert!(said.starts_with("HTTP/1.1 401"), "{said}");
    let (_, devices) = h.api.get("/v1/edge-devices").await;
    assert!(devices["items"].as_array().unwrap().iter().all(|d| d["name"] != "after-revocation"), "{devices}");
}

/// A request's head is bounded well below hyper's default (about 400 KB a connection, kept
/// until the head is in: anyone, without a token, could hold that on each of
/// `api.max_connections`): a larger head is refused with `431`.
#[tokio::test]
async fn a_request_head_past_64_kib_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = TestHerald::start().await;
    let mut stream = tokio::net::TcpStream::connect(h.herald.addr).await.unwrap();
    let head = format!("GET /healthz HTTP/1.1\r\nhost: herald\r\nx-big: {}\r\n\r\n", "a".repeat(100_000));
    // The server may answer and close before the whole head is written.
    let _ = stream.write_all(head.as_bytes()).await;
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer)).await.unwrap().unwrap();
    let status = String::from_utf8_lossy(&answer[..n]).to_string();
    assert!(status.starts_with("HTTP/1.1 431"), "{status}");
}

/// A key over its rate is refused once and counted once: the request was checked twice (by
/// the place-holding middleware, then by its handler), each refusal counted twice, and one the
/// bucket refilled for in between was served without holding a place.
#[tokio::test]
async fn a_key_over_its_rate_is_refused_and_counted_once() {
    let h = TestHerald::start_with(|c| c.api.key_rate_limit = 1.0).await;
    let (_, key) = tenant_with_key(&h.api, "Acme").await;
    let throttled = || async {
        let m = crate::support::metrics::scrape(&h.api).await;
        m.value("herald_api_throttled_total", &[("reason", "key_rate")])
    };
    let before = throttled().await;
    let refused = until("a request over the key's rate", Duration::from_secs(10), || async {
        (key.get("/v1/subscriptions").await.0 == 429).then_some(())
    });
    refused.await;
    let after = until("the refusal counted", Duration::from_secs(10), || async {
        let now = throttled().await;
        (now > before).then_some(now)
    })
    .await;
    assert_eq!(after, before + 1.0, "one refusal, counted once");
    // The OpenAPI document is public: a bad key gets it as anyone does.
    let mut bad = key.clone();
    bad.token = "hk.nobody.nothing".into();
    let (status, doc) = bad.get("/v1/openapi.json").await;
    assert_eq!((status.as_u16(), doc["openapi"].is_string()), (200, true), "{doc}");
}

/// The tenant list is paged like every other list, and filtered by name: a platform has a
/// tenant per customer, and one answer of every tenant with its keys — asked by the console
/// at every page load — was megabytes at ten thousand of them.
#[tokio::test]
async fn the_tenant_list_is_paged_and_filtered_by_name() {
    let h = TestHerald::start().await;
    let mut made = Vec::new();
    for n in 0..7 {
        let name = if n % 2 == 0 { format!("Acme {n}") } else { format!("Globex {n}") };
        let (status, t) = h.api.post("/v1/tenants", json!({ "name": name })).await;
        assert_eq!(status, 201, "{t}");
        made.push(t["id"].as_str().unwrap().to_string());
    }
    // Three at a time, oldest first, the default tenant first of all; every one once.
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/tenants?limit=3&cursor={}", c),
            None => "/v1/tenants?limit=3".to_string(),
        };
        let (status, page) = h.api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let items = page["items"].as_array().unwrap();
        assert!(items.len() <= 3, "{page}");
        seen.extend(items.iter().map(|t| t["id"].as_str().unwrap().to_string()));
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    let mut expected = vec!["default".to_string()];
    expected.extend(made.iter().cloned());
    assert_eq!(seen, expected);

    // By name, any case, a part of it.
    let (status, page) = h.api.get("/v1/tenants?name=acME").await;
    assert_eq!(status, 200, "{page}");
    let names: Vec<_> = page["items"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["Acme 0", "Acme 2", "Acme 4", "Acme 6"]);

    // A cursor of another listing, or none of this API's, is refused, the field named.
    let (_, first) = h.api.get("/v1/tenants?limit=1&name=acme").await;
    let other = first["next"].as_str().unwrap();
    let (status, err) = h.api.get(&format!("/v1/tenants?limit=1&cursor={}", other)).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    let (status, err) = h.api.get("/v1/tenants?cursor=sub_x").await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    let (status, err) = h.api.get("/v1/tenants?limit=0").await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("limit")), "{err}");
    let (status, err) = h.api.get("/v1/tenants?colour=red").await;
    assert_eq!(status, 400, "{err}");
}
