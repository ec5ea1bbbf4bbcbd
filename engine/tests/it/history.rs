//! Delivery history through the API: every attempt on record with the receiver's answer, each
//! event's state per subscription, resend, recover and rewind, tenant isolation, and history
//! that survives a SIGKILL.

use crate::support::{tenant_with_key, until, Api, Behaviour, Receiver, TestHerald, TOKEN};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A delivered attempt's record for the history topic, as a delivery would write it (tests
/// that need attempts the receivers could not make: old ones, or thousands).
fn delivered_attempt(id: &str, subscription: &str, tenant: &str, at_ms: i64) -> herald::log::Record {
    use herald::history::{AttemptRecord, HistoryRecord, State};
    let record = HistoryRecord::Attempt(AttemptRecord {
        id: id.into(),
        event_id: format!("evt-{id}"),
        subscription: subscription.into(),
        tenant: tenant.into(),
        event_type: "T".into(),
        attempt: 1,
        accepted_ms: at_ms,
        at_ms,
        duration_ms: 1,
        outcome: "delivered".into(),
        status: Some(200),
        error: None,
        response: None,
        state: State::Delivered,
        next_ms: None,
        ordering_key: None,
    });
    herald::log::Record { key: bytes::Bytes::from(subscription.to_string()), value: record.encode() }
}

/// Waits until `GET path` answers 200 with at least `n` items, and returns them.
async fn items(api: &Api, path: &str, n: usize) -> Vec<Value> {
    until(&format!("{n} items at {path}"), WAIT, || async {
        let (status, page) = api.get(path).await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        (status == 200 && items.len() >= n).then_some(items)
    })
    .await
}

/// Waits until event `id`'s delivery to `sub` is in `state`, and returns the event.
async fn state_of(api: &Api, id: &str, sub: &str, state: &str) -> Value {
    until(&format!("{id} {state} for {sub}"), WAIT, || async {
        let (status, event) = api.get(&format!("/v1/events/{id}")).await;
        let delivery = event["deliveries"].as_array()?.iter().find(|d| d["subscription"] == sub)?.clone();
        (status == 200 && delivery["state"] == state).then_some(event)
    })
    .await
}

/// A UTF-8 answer longer than `history.response_bytes`, cut inside a character, is still
/// text (what fits, whole characters), not the whole start in base64.
#[tokio::test]
async fn a_text_answer_cut_inside_a_character_stays_text() {
    let h = TestHerald::start().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}/accents", listener.local_addr().unwrap());
    crate::support::serve_http1(listener, |_req: hyper::Request<hyper::body::Incoming>| async {
        let body = format!("x{}", "é".repeat(600)); // byte 1,024 is the first of an é
        hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)))
    });
    h.api.subscribe(json!({ "url": url })).await;
    h.api.post("/v1/events", json!({ "id": "accents", "type": "T", "data": {} })).await;
    let attempt = items(&h.api, "/v1/attempts?event=accents", 1).await.remove(0);
    assert_eq!(attempt["response"]["body_encoding"], "text", "{attempt}");
    let body = attempt["response"]["body"].as_str().unwrap();
    assert!(body.starts_with("xé") && body.len() == 1023, "{} bytes", body.len());
}

/// A receiver's answer is kept within bounds whatever its headers: their names are cut as
/// their values are (a receiver answering with header names of 60 KB each made every attempt's
/// record that large, in the history topic and in every process's index).
#[tokio::test]
async fn a_receiver_s_long_header_names_are_kept_cut() {
    let h = TestHerald::start().await;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
    let url = format!("http://{}/names", listener.local_addr().unwrap());
    crate::support::serve_http1(listener, |_req: hyper::Request<hyper::body::Incoming>| async {
        let mut answer = hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(b"ok")));
        for i in 0..3 {
            let name = format!("x-{i}-{}", "a".repeat(60_000));
            answer.headers_mut().insert(http::HeaderName::from_bytes(name.as_bytes()).unwrap(), "v".parse().unwrap());
        }
        answer
    });
    h.api.subscribe(json!({ "url": url })).await;
    h.api.post("/v1/events", json!({ "id": "names", "type": "T", "data": {} })).await;
    let attempt = items(&h.api, "/v1/attempts?event=names", 1).await.remove(0);
    assert_eq!(attempt["status"], 200, "{attempt}");
    let headers = attempt["response"]["headers"].as_object().unwrap();
    let long: Vec<usize> = headers.keys().map(|n| n.len()).filter(|&n| n > 260).collect();
    assert!(long.is_empty(), "header names of {long:?} bytes kept");
    assert!(headers.keys().any(|n| n.starts_with("x-0-aaa")), "the names' start is kept: {:?}", headers.keys());
}

#[tokio::test]
async fn every_attempt_is_on_record_with_the_receiver_s_answer() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.behave("/flaky", Behaviour::FailFirst { n: 2, status: 503 });
    let retry = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 5 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/flaky"), "retry": retry })).await;
    let sub_id = sub["id"].as_str().unwrap();
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "order-1001", "type": "order.created", "data": { "n": 1001 } })).await;
    assert_eq!(status, 202);

    let attempts = items(&h.api, "/v1/attempts?event=order-1001", 3).await;
    let statuses: Vec<u64> = attempts.iter().rev().map(|a| a["status"].as_u64().unwrap()).collect();
    assert_eq!(statuses, [503, 503, 200], "oldest first: {attempts:?}");
    let outcomes: Vec<&str> = attempts.iter().rev().map(|a| a["outcome"].as_str().unwrap()).collect();
    assert_eq!(outcomes, ["failed", "failed", "delivered"]);
    let numbers: Vec<u64> = attempts.iter().map(|a| a["attempt"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [3, 2, 1], "newest first");
    for a in &attempts {
        assert_eq!(a["subscription"], sub_id);
        assert_eq!(a["event"], "order.created");
        assert_eq!(a["tenant"], "default");
        assert_eq!(a["response"]["body"], "ok", "{a}");
        assert!(chrono::DateTime::parse_from_rfc3339(a["at"].as_str().unwrap()).is_ok());
        assert!(a["duration_ms"].as_u64().is_some());
    }
    assert!(attempts[1]["next_attempt_at"].is_string(), "a failed attempt says when the next is due");
    assert!(attempts[0]["next_attempt_at"].is_null());
    assert_eq!(attempts[2]["error"], "receiver answered 503 Service Unavailable");

    let event = state_of(&h.api, "order-1001", sub_id, "delivered").await;
    assert_eq!(event["type"], "order.created");
    assert_eq!(event["data"], json!({ "n": 1001 }));
    assert_eq!(event["deliveries"][0]["attempts"], 3);
    assert!(event["deliveries"][0]["last_attempt_at"].is_string());

    // One event's, a page at a time; its cursor is that event's only.
    let (_, first) = h.api.get("/v1/attempts?event=order-1001&limit=2").await;
    let next = first["next"].as_str().expect("a next page of the event's attempts").to_string();
    let (_, second) = h.api.get(&format!("/v1/attempts?event=order-1001&limit=2&cursor={next}")).await;
    assert_eq!(second["items"][0]["attempt"], 1, "{second}");
    assert!(second["next"].is_null());
    let (status, err) = h.api.get(&format!("/v1/attempts?event=order-1002&cursor={next}")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    let (status, err) = h.api.get(&format!("/v1/attempts?subscription={sub_id}&cursor={next}")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");

    // By subscription, a page at a time; by outcome.
    let (_, first) = h.api.get(&format!("/v1/attempts?subscription={sub_id}&limit=2")).await;
    assert_eq!(first["items"].as_array().unwrap().len(), 2);
    let next = first["next"].as_str().expect("a next page");
    let (_, second) = h.api.get(&format!("/v1/attempts?subscription={sub_id}&limit=2&cursor={next}")).await;
    let ids: HashSet<&str> = first["items"]
        .as_array()
        .unwrap()
        .iter()
        .chain(second["items"].as_array().unwrap())
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 3, "pages do not overlap and miss nothing");
    let (_, failed) = h.api.get("/v1/attempts?outcome=failed").await;
    assert_eq!(failed["items"].as_array().unwrap().len(), 2);
    let (_, listed) = h.api.get("/v1/events?type=order.created").await;
    assert_eq!(listed["items"][0]["id"], "order-1001");

    // Bad queries name the field.
    for (query, field) in [("outcome=exploded", "outcome"), ("since=yesterday", "since"), ("cursor=%21", "cursor")] {
        let (status, err) = h.api.get(&format!("/v1/attempts?{query}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{query}: {err}");
    }
    assert_eq!(h.api.get("/v1/events/no-such-event").await.0, 404);
    // A `+` in a query's time is a space unless written %2B: the error says so.
    let (status, err) = h.api.get("/v1/attempts?since=2026-11-30T09:00:00+02:00").await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("since")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("%2B"), "{err}");
    // An id no event can have is refused at once, naming it (it waited for the index, then 404).
    for id in ["x".repeat(256), "with%20space".to_string()] {
        let (status, err) = h.api.get(&format!("/v1/events/{id}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("id")), "{id}: {err}");
        let (status, err) = h.api.post(&format!("/v1/events/{id}/resend"), json!({})).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("id")), "{id}: {err}");
    }
}

/// An event can be looked up and resent the moment it is accepted: a lookup that misses
/// waits for the index to take in what the history topic holds (during a peak, indexing may
/// be behind by up to `history.index_defer`), and an id never accepted still answers 404.
#[tokio::test]
async fn an_event_is_found_and_resent_the_moment_it_is_accepted() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/ok") })).await;
    for i in 0..20 {
        let id = format!("now-{i}");
        let (status, _) = h.api.post("/v1/events", json!({ "id": id, "type": "T", "data": { "i": i } })).await;
        assert_eq!(status, 202);
        let asked = std::time::Instant::now();
        let (status, mut event) = h.api.get(&format!("/v1/events/{id}")).await;
        if status == 404 {
            // Only once the lookup waited out its bound (the suite can starve the index's
            // idle-class thread that long); before, it answered 404 at once.
            assert!(asked.elapsed() >= Duration::from_millis(4900), "{id}: 404 without waiting for the index");
            event = state_of(&h.api, &id, sub["id"].as_str().unwrap(), "delivered").await;
        } else {
            assert_eq!(status, 200, "{id} right after it was accepted: {event}");
        }
        assert_eq!(event["deliveries"][0]["subscription"], sub["id"], "{event}");
    }
    let (status, _) = h.api.post("/v1/events", json!({ "id": "now-resent", "type": "T", "data": {} })).await;
    assert_eq!(status, 202);
    let asked = std::time::Instant::now();
    let (mut status, mut answer) = h.api.post("/v1/events/now-resent/resend", json!({})).await;
    if status == 404 {
        assert!(asked.elapsed() >= Duration::from_millis(4900), "404 without waiting for the index: {answer}");
        state_of(&h.api, "now-resent", sub["id"].as_str().unwrap(), "delivered").await;
        (status, answer) = h.api.post("/v1/events/now-resent/resend", json!({})).await;
    }
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(1)), "{answer}");
    let (status, _) = h.api.get("/v1/events/never-accepted").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn dead_letters_show_in_the_event_state_and_resend_recover_and_rewind_send_again() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/down", 500);
    let once = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 2 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/down"), "retry": once })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    for i in 0..3 {
        h.api.post("/v1/events", json!({ "id": format!("down-{i}"), "type": "T", "data": { "i": i } })).await;
    }
    for i in 0..3 {
        let event = state_of(&h.api, &format!("down-{i}"), &sub_id, "dead_lettered").await;
        assert_eq!(event["deliveries"][0]["attempts"], 2, "{event}");
    }

    // The receiver is back: resend one event (same webhook-id, fresh budget).
    rx.respond_on("/down", 200);
    let (status, answer) = h.api.post("/v1/events/down-0/resend", json!({ "subscription": sub_id })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(1)), "{answer}");
    state_of(&h.api, "down-0", &sub_id, "delivered").await;
    let arrived = |id: &str| {
        rx.on("/down").iter().filter(|r| r.header("webhook-id") == id && r.json()["data"].is_object()).count()
    };
    assert_eq!(arrived("down-0"), 3, "two failed attempts and the resend");

    // Recover: every failed event since a time, not the delivered one.
    let since = before.to_rfc3339();
    let (status, answer) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(2)), "{answer}");
    assert!(answer["history_lag"].is_u64(), "it says how far behind the index was: {answer}");
    for i in 1..3 {
        state_of(&h.api, &format!("down-{i}"), &sub_id, "delivered").await;
    }
    assert_eq!(arrived("down-0"), 3, "the delivered event was not sent again");

    // Rewind: every event in the window, delivered or not.
    let (status, answer) =
        h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since, "all": true })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(3)), "{answer}");
    until("every event sent once more", WAIT, || async { (arrived("down-0") == 4).then_some(()) }).await;
    until("the others too", WAIT, || async { ((1..3).all(|i| arrived(&format!("down-{i}")) == 4)).then_some(()) })
        .await;

    let (status, err) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({})).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("since")), "{err}");
    // A `since` in the future names `since`, not the `until` the client never sent.
    let later = json!({ "since": "2099-01-01T00:00:00Z" });
    let (status, err) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), later).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("since")), "{err}");
    let window = json!({ "since": "2099-01-02T00:00:00Z", "until": "2099-01-01T00:00:00Z" });
    let (status, err) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), window).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("until")), "{err}");
    let (status, err) = h.api.post("/v1/events/down-0/resend", json!({ "subscription": "sub_other" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("subscription")), "{err}");
}

/// A rewind re-sends up to 10,000 events: a tenant key firing them at its request rate made
/// up to a million deliveries a second in the shared log. One recover of a tenant's runs at
/// a time; another meanwhile is answered 409, and the first queues all it found.
#[tokio::test]
async fn a_tenant_s_recovers_run_one_at_a_time() {
    let h = TestHerald::start().await;
    let (tenant, mallory) = crate::support::tenant_with_key(&h.api, "Mallory").await;
    let rx = Receiver::start().await;
    let sub = mallory.subscribe(json!({ "url": rx.url("/rewound") })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let before = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    for round in 0..4 {
        let batch: Vec<_> = (0..500)
            .map(|i| json!({ "id": format!("r-{round}-{i}"), "type": "T", "tenant": tenant, "data": {} }))
            .collect();
        let (status, body) = h.api.post("/v1/events/batch", serde_json::Value::Array(batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    rx.wait_on("/rewound", 2000).await;
    until("every attempt on record", WAIT, || async {
        let (mut count, mut cursor) = (0, None::<String>);
        loop {
            let next = cursor.as_ref().map_or(String::new(), |c| format!("&cursor={c}"));
            let (_, page) = mallory.get(&format!("/v1/attempts?subscription={sub_id}&limit=500{next}")).await;
            count += page["items"].as_array()?.len();
            match page["next"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        (count >= 2000).then_some(())
    })
    .await;
    let path = format!("/v1/subscriptions/{sub_id}/recover");
    let answers =
        futures::future::join_all((0..8).map(|_| mallory.post(&path, json!({ "since": before, "all": true })))).await;
    let refused = answers.iter().filter(|(s, _)| s.as_u16() == 409).count();
    let done: Vec<_> = answers.iter().filter(|(s, _)| s.as_u16() == 202).collect();
    assert!(refused >= 1, "{answers:?}");
    assert!(!done.is_empty(), "{answers:?}");
    assert!(done.iter().all(|(_, a)| a["queued"] == 2000), "{done:?}");
    let (_, err) = answers.iter().find(|(s, _)| s.as_u16() == 409).unwrap();
    assert_eq!(err["error"]["code"], "CONFLICT", "{err}");
}

#[tokio::test]
async fn another_tenant_sees_none_of_it() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let (acme_id, acme) = tenant_with_key(&h.api, "Acme").await;
    let (_, globex) = tenant_with_key(&h.api, "Globex").await;
    let sub = acme.subscribe(json!({ "url": rx.url("/acme") })).await;
    let sub_id = sub["id"].as_str().unwrap();
    h.api.post("/v1/events", json!({ "id": "acme-1", "type": "T", "tenant": acme_id, "data": {} })).await;
    items(&acme, "/v1/attempts?event=acme-1", 1).await;
    assert_eq!(acme.get("/v1/events/acme-1").await.0, 200);
    items(&acme, "/v1/events", 1).await;

    assert_eq!(globex.get("/v1/events/acme-1").await.0, 404);
    // Naming the other tenant is refused, not answered with its own (or none).
    for path in [format!("/v1/events/acme-1?tenant={acme_id}"), format!("/v1/attempts?tenant={acme_id}")] {
        let (status, err) = globex.get(&path).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("tenant")), "{path}: {err}");
    }
    for path in [
        "/v1/attempts?event=acme-1".to_string(),
        format!("/v1/attempts?subscription={sub_id}"),
        "/v1/attempts".to_string(),
        "/v1/events".to_string(),
    ] {
        let (status, page) = globex.get(&path).await;
        assert_eq!(status, 200, "{path}");
        assert!(page["items"].as_array().unwrap().is_empty(), "{path}: {page}");
    }
    assert_eq!(globex.post("/v1/events/acme-1/resend", json!({})).await.0, 404);
    let since = json!({ "since": "2020-01-01T00:00:00Z", "all": true });
    assert_eq!(globex.post(&format!("/v1/subscriptions/{sub_id}/recover"), since).await.0, 404);
    assert_eq!(rx.on("/acme").len(), 1, "nothing was sent again");
}

#[tokio::test]
async fn records_older_than_the_retention_are_not_kept() {
    let h = TestHerald::start_with(|c| c.history.retention = Duration::from_secs(2 * 86_400).into()).await;
    let day = 86_400_000;
    let now = herald::model::now_ms();
    let records = vec![
        delivered_attempt("att_recent", "sub_old", "default", now - day),
        delivered_attempt("att_expired", "sub_old", "default", now - 5 * day),
    ];
    h.herald.log().append("herald.history", records).await.unwrap();
    let kept = items(&h.api, "/v1/attempts?subscription=sub_old", 1).await;
    let ids: Vec<&str> = kept.iter().map(|a| a["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["att_recent"], "what is past retention is not indexed");
}

/// Another tenant's subscription answers an empty page at once: a scan of its attempts (up to
/// the scan's limit) answered with a cursor that carries the time of that tenant's attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenant_s_subscription_answers_nothing_not_even_a_cursor() {
    let h = TestHerald::start().await;
    let (acme_id, acme) = tenant_with_key(&h.api, "Acme").await;
    let (_, globex) = tenant_with_key(&h.api, "Globex").await;
    let rx = Receiver::start().await;
    let sub = acme.subscribe(json!({ "url": rx.url("/acme") })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let now = herald::model::now_ms();
    let records = (0..20_050i64)
        .map(|i| delivered_attempt(&format!("att_{i:06}"), &sub_id, &acme_id, now - 60_000 + i))
        .collect();
    h.herald.log().append("herald.history", records).await.unwrap();
    until("all of Acme's attempts indexed", WAIT, || async {
        let (_, page) = acme.get(&format!("/v1/attempts?subscription={sub_id}&limit=1")).await;
        (page["items"][0]["id"] == "att_020049").then_some(())
    })
    .await;
    let (status, page) = globex.get(&format!("/v1/attempts?subscription={sub_id}")).await;
    assert_eq!(status, 200);
    assert_eq!(page, json!({ "items": [], "next": null }));
    // Deleted, its attempts kept for the retention: the same, and input checked as for any.
    assert_eq!(acme.delete(&format!("/v1/subscriptions/{sub_id}")).await.0, 204);
    let (status, page) = globex.get(&format!("/v1/attempts?subscription={sub_id}")).await;
    assert_eq!((status.as_u16(), page), (200, json!({ "items": [], "next": null })));
    let (status, _) = globex.get(&format!("/v1/attempts?subscription={sub_id}&limit=0")).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_settled_attempt_is_missing_after_a_sigkill() {
    no_settled_attempt_is_missing_after_a_sigkill_of(json!({})).await;
}

/// The same with ordered delivery, whose lanes move on by markers of their own: a head's
/// marker was made durable before its attempt's history, so a SIGKILL between the two left
/// an attempt that was made (and is never made again) out of the history for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_settled_ordered_attempt_is_missing_after_a_sigkill() {
    no_settled_attempt_is_missing_after_a_sigkill_of(json!({ "ordering": { "mode": "key", "key": "/data/key" } }))
        .await;
}

async fn no_settled_attempt_is_missing_after_a_sigkill_of(spec: serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let (mut herald, addr) = crate::support::spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let mut sub = json!({ "url": rx.url("/k") });
    sub.as_object_mut().unwrap().extend(spec.as_object().unwrap().clone());
    let sub = api.subscribe(sub).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    for i in 0..200 {
        let data = json!({ "i": i, "key": format!("key-{}", i % 10) });
        let (status, _) = api.post("/v1/events", json!({ "id": format!("k-{i}"), "type": "T", "data": data })).await;
        assert_eq!(status, 202);
        if i == 150 {
            rx.wait_on("/k", 100).await;
            herald.kill();
            break;
        }
    }
    let received: HashSet<String> = rx.on("/k").iter().map(|r| r.header("webhook-id").to_string()).collect();
    let (_herald, addr) = crate::support::spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    until("a delivered attempt on record for every event the receiver got", WAIT, || async {
        let mut delivered = HashSet::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut path = format!("/v1/attempts?subscription={sub_id}&outcome=delivered&limit=500");
            if let Some(c) = &cursor {
                path.push_str(&format!("&cursor={c}"));
            }
            let (status, page) = api.get(&path).await;
            if status != 200 {
                return None;
            }
            delivered.extend(page["items"].as_array()?.iter().map(|a| a["event_id"].as_str().unwrap().to_string()));
            cursor = page["next"].as_str().map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
        received.is_subset(&delivered).then_some(())
    })
    .await;
}

/// A window whose end is before its start, a cursor from past the window and one naming an
/// absurd position are answered as the contract says (a 400 naming the field, or an empty
/// page) — not with a 503 from a panic in the index.
#[tokio::test]
async fn reversed_windows_and_stray_cursors_are_answered_not_a_panic() {
    use base64::Engine;
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(json!({ "url": rx.url("/ok") })).await;
    let (status, body) = h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    let id = body["id"].as_str().unwrap().to_string();
    // Indexed, so there is a day to scan.
    items(&h.api, &format!("/v1/attempts?event={id}"), 1).await;
    let (since, until) = ("2026-01-02T00:00:00Z", "2026-01-01T00:00:00Z");
    for path in ["/v1/events", "/v1/attempts"] {
        let (status, err) = h.api.get(&format!("{path}?since={since}&until={until}")).await;
        assert_eq!(status, 400, "{path}: {err}");
        assert_eq!(err["error"]["field"], "until", "{path}: {err}");
    }
    // A cursor of day 0 naming no entry of these lists (none the API gave): refused.
    let today = chrono::Utc::now().format("%Y-%m-%dT00:00:00Z").to_string();
    for path in ["/v1/events", "/v1/attempts"] {
        let (status, err) = h.api.get(&format!("{path}?cursor=AAAAAA&since={today}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{path}: {err}");
    }
    // An event's attempts from a position past any count, in a cursor not made for it.
    let mut far = vec![0xFF; 4];
    far.extend_from_slice(&u64::MAX.to_be_bytes());
    let far = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(far);
    let (status, err) = h.api.get(&format!("/v1/attempts?event={id}&cursor={far}")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    let (status, page) = h.api.get(&format!("/v1/dlq?cursor=0.{}", u64::MAX)).await;
    assert_eq!((status.as_u16(), page["items"].as_array().map(Vec::len)), (200, Some(0)), "{page}");
    // A cursor of one list given to another, or to the same list for another subscription,
    // is refused: it was taken as a position, skipping or repeating what it should not.
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    items(&h.api, "/v1/events", 2).await;
    let (_, events) = h.api.get("/v1/events?limit=1").await;
    let next = events["next"].as_str().expect("a next page").to_string();
    let (status, err) = h.api.get(&format!("/v1/attempts?cursor={next}")).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    let other = h.api.subscribe(json!({ "url": rx.url("/other") })).await;
    let subs = [other["id"].as_str().unwrap().to_string()];
    let (_, attempts) = h.api.get("/v1/attempts?limit=1").await;
    let next = attempts["next"].as_str().expect("a next page of attempts").to_string();
    let (status, err) = h.api.get(&format!("/v1/attempts?subscription={}&cursor={next}", subs[0])).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{err}");
    for cursor in ["zzz", "0.17"] {
        let (status, err) = h.api.get(&format!("/v1/subscriptions?cursor={cursor}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("cursor")), "{cursor}: {err}");
    }
}

/// A dead letter replayed is pending again in the event's state until its attempt settles —
/// not still dead-lettered, which a recover in between would send once more.
#[tokio::test]
async fn a_replayed_dead_letter_is_pending_again_until_it_settles() {
    let h = TestHerald::start_with(|c| {
        // The breaker opens at the first failure and stays open: replayed deliveries wait.
        c.health.breaker_failures = 1;
        c.health.breaker_pause = Duration::from_secs(600).into();
        c.health.breaker_max_pause = Duration::from_secs(600).into();
    })
    .await;
    let rx = Receiver::start().await;
    rx.respond_on("/down", 500);
    let once = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 1 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/down"), "retry": once })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    h.api.post("/v1/events", json!({ "id": "parked-1", "type": "T", "data": {} })).await;
    state_of(&h.api, "parked-1", &sub_id, "dead_lettered").await;
    let dead = items(&h.api, "/v1/dlq", 1).await;
    let (status, answer) = h.api.post("/v1/dlq/replay", json!({ "ids": [dead[0]["id"]] })).await;
    assert_eq!((status.as_u16(), answer["replayed"].as_array().map(Vec::len)), (200, Some(1)), "{answer}");
    state_of(&h.api, "parked-1", &sub_id, "pending").await;
}

/// A subscription at `/big` of a new receiver, and ten events of 200 KiB delivered to it: the
/// receiver, the subscription's id and a time just before they were published.
async fn ten_large_events_delivered(api: &Api) -> (Receiver, String, String) {
    let rx = Receiver::start().await;
    let sub = api.subscribe(json!({ "url": rx.url("/big") })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    for i in 0..10 {
        let event = json!({ "id": format!("big-{i}"), "type": "T", "data": { "pad": "p".repeat(200 << 10) } });
        assert_eq!(api.post("/v1/events", event).await.0, 202);
    }
    for i in 0..10 {
        state_of(api, &format!("big-{i}"), &sub_id, "delivered").await;
    }
    (rx, sub_id, since)
}

/// A recover loads and appends its events in parts bounded by bytes (and within the fan-out
/// quota a publish is held to), not 500 at a time whatever their size: with a quota of 1 MiB,
/// ten events of 200 KiB are all sent again, in parts.
#[tokio::test]
async fn a_recover_of_large_events_goes_in_parts_within_the_fan_out_quota() {
    let h = TestHerald::start_with(|c| {
        c.quotas.fanout_bytes = 1 << 20;
        c.ingest.max_event_bytes = 256 << 10;
    })
    .await;
    let (rx, sub_id, since) = ten_large_events_delivered(&h.api).await;
    let (status, answer) =
        h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since, "all": true })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(10)), "{answer}");
    rx.wait_on("/big", 20).await;
}

/// A recover whose deliveries could not be appended (the disk refused them) leaves the
/// event's state as it was, so the recover asked again finds and sends it; it must not be
/// left "pending" for ever with nothing queued.
#[tokio::test]
async fn a_recover_refused_by_the_log_can_be_asked_again() {
    use herald::log::embedded::Fault;
    use std::sync::atomic::{AtomicBool, Ordering};
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    let refuse = std::sync::Arc::new(AtomicBool::new(false));
    let flag = refuse.clone();
    let faults: herald::log::embedded::Faults = Some(std::sync::Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Write(path) if flag.load(Ordering::SeqCst) && path.to_string_lossy().contains("deliveries") => {
            Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
        }
        _ => Ok(()),
    }));
    let extras = herald::server::Extras { faults, ..herald::server::Extras::default() };
    let h = TestHerald::start_with_extras(|_| {}, extras).await;
    let rx = Receiver::start().await;
    rx.respond_on("/down", 500);
    let once = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 1 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/down"), "retry": once })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    h.api.post("/v1/events", json!({ "id": "refused-1", "type": "T", "data": {} })).await;
    state_of(&h.api, "refused-1", &sub_id, "dead_lettered").await;
    rx.respond_on("/down", 200);
    let recover = format!("/v1/subscriptions/{sub_id}/recover");
    refuse.store(true, Ordering::SeqCst);
    let (status, answer) = h.api.post(&recover, json!({ "since": since })).await;
    refuse.store(false, Ordering::SeqCst);
    assert!(status.is_server_error(), "{status}: {answer}");
    let (status, answer) = h.api.post(&recover, json!({ "since": since })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(1)), "{answer}");
    state_of(&h.api, "refused-1", &sub_id, "delivered").await;
}

/// A disabled subscription dead-letters what is sent to it at once: a resend or recover to one
/// was answered `202` as queued, and each made a second dead letter of the event beside the
/// first (a whole-subscription replay after re-enabling then sent it twice). Refused with
/// `409`, as a dead letter's replay is; a resend to every subscription leaves it out.
#[tokio::test]
async fn a_disabled_subscription_takes_no_resend_or_recover() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/off", 500);
    let once = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 1 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/off"), "retry": once })).await;
    let id = sub["id"].as_str().unwrap().to_string();
    let since = chrono::Utc::now() - chrono::Duration::minutes(5);
    h.api.post("/v1/events", json!({ "id": "off-1", "type": "T", "data": {} })).await;
    let dead_letters = |api: Api, id: String| async move {
        let (_, page) = api.get(&format!("/v1/dlq?subscription={id}")).await;
        page["items"].as_array().map_or(0, Vec::len)
    };
    until("the dead letter", Duration::from_secs(10), || async {
        (dead_letters(h.api.clone(), id.clone()).await == 1).then_some(())
    })
    .await;
    state_of(&h.api, "off-1", &id, "dead_lettered").await;
    let (status, _) = h.api.patch(&format!("/v1/subscriptions/{id}"), json!({ "enabled": false })).await;
    assert_eq!(status, 200);

    let (status, err) = h.api.post("/v1/events/off-1/resend", json!({ "subscription": id })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("subscription")), "{err}");
    let since = since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, err) = h.api.post(&format!("/v1/subscriptions/{id}/recover"), json!({ "since": since })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("subscription")), "{err}");
    // A request that could never be taken says so first, whatever the subscription's state.
    let (status, err) = h.api.post(&format!("/v1/subscriptions/{id}/recover"), json!({ "since": "then" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("since")), "{err}");
    let (status, all) = h.api.post("/v1/events/off-1/resend", json!({})).await;
    assert_eq!((status.as_u16(), all["queued"].as_u64()), (202, Some(0)), "{all}");
}

/// A recover of a delivery still retrying sends it now; its earlier retries, still waiting
/// in a tier, then find it delivered and are not sent — the receiver got the event once more
/// from the old chain (and, had it failed again, the event read dead-lettered though delivered).
#[tokio::test]
async fn a_recovered_delivery_s_earlier_retries_are_not_sent_again() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/flaky", 500);
    // Far enough apart that the recover (which may wait for the index) comes before the
    // second retry, and that the recovered delivery is past the clocks' allowance after the
    // event's acceptance (`CLOCKS_APART_MS`).
    let slow = json!({ "policy": "fixed", "interval": "5s", "max_attempts": 4 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/flaky"), "retry": slow })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    h.api.post("/v1/events", json!({ "id": "flaky-1", "type": "T", "data": {} })).await;
    // Two failed attempts, 5 s apart: the recover comes more than the clocks' allowance after
    // the event's acceptance.
    let api = h.api.clone();
    until("two failed attempts", WAIT, || async {
        let (_, event) = api.get("/v1/events/flaky-1").await;
        (event["deliveries"][0]["attempts"] == 2 && event["deliveries"][0]["state"] == "retrying").then_some(())
    })
    .await;
    rx.respond_on("/flaky", 200);
    let (status, answer) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(1)), "{answer}");
    state_of(&h.api, "flaky-1", &sub_id, "delivered").await;
    // The old chain's third attempt comes due 5 s after its second: looked at, then left.
    until("the old chain's retry looked at", WAIT, || async {
        let m = crate::support::metrics::scrape(&api).await;
        let superseded = m.value("herald_deliveries_total", &[("transport", "webhook"), ("outcome", "superseded")]);
        (superseded >= 1.0 || rx.on("/flaky").len() >= 4).then_some(())
    })
    .await;
    assert_eq!(rx.on("/flaky").len(), 3, "the two failed attempts and the recovered one, no more");
    let event = state_of(&h.api, "flaky-1", &sub_id, "delivered").await;
    assert_eq!(event["deliveries"][0]["state"], "delivered", "{event}");
}

/// A retry of a delivery a recover has delivered since, coming due past its `max_age` (Herald
/// was stopped meanwhile), is not a dead letter: it was dead-lettered before its delivery was
/// looked for, and the dead letter's state, newer, made the delivered event read
/// `dead_lettered`, listed it in the dead letters, and offered it to the next recover.
#[tokio::test]
async fn a_delivered_event_s_old_retry_past_its_max_age_is_not_dead_lettered() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/flaky", 500);
    // The old chain's third attempt comes 16 s after acceptance: room for the recover (which
    // may wait for the index) and the stop on a slow machine.
    let slow = json!({ "policy": "exponential", "initial": "8s", "multiplier": 1, "jitter": 0, "max_attempts": 4, "max_age": "18s" });
    let sub = h.api.subscribe(json!({ "url": rx.url("/flaky"), "retry": slow })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let accepted = Instant::now();
    h.api.post("/v1/events", json!({ "id": "aged-1", "type": "T", "data": {} })).await;
    let api = h.api.clone();
    until("two failed attempts", WAIT, || async {
        let (_, event) = api.get("/v1/events/aged-1").await;
        (event["deliveries"][0]["attempts"] == 2 && event["deliveries"][0]["state"] == "retrying").then_some(())
    })
    .await;
    rx.respond_on("/flaky", 200);
    let (status, answer) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(1)), "{answer}");
    state_of(&h.api, "aged-1", &sub_id, "delivered").await;
    assert_eq!(rx.on("/flaky").len(), 3, "stopped before the old chain's third attempt");
    // Stopped until the old chain's third attempt (due 16 s after acceptance) is past the
    // delivery's max_age (18 s) by more than a retry may come late.
    let h = h
        .restart_after(until("past the retry's max_age", WAIT, || async {
            (accepted.elapsed() > Duration::from_secs(21)).then_some(())
        }))
        .await;
    let api = h.api.clone();
    until("the old chain's retry looked at", WAIT, || async {
        let m = crate::support::metrics::scrape(&api).await;
        let superseded = m.value("herald_deliveries_total", &[("transport", "webhook"), ("outcome", "superseded")]);
        let parked = m.value(herald::metrics::DEAD_LETTERS, &[]);
        (superseded + parked >= 1.0).then_some(())
    })
    .await;
    let event = state_of(&h.api, "aged-1", &sub_id, "delivered").await;
    assert_eq!(event["deliveries"][0]["state"], "delivered", "{event}");
    let (_, dlq) = h.api.get(&format!("/v1/dlq?subscription={sub_id}")).await;
    assert_eq!(dlq["items"], json!([]), "{dlq}");
    assert_eq!(rx.on("/flaky").len(), 3, "the two failed attempts and the recovered one, no more");
}

/// A recover cut off by the request timeout goes on, as the `408` says work does: the request
/// was dropped part-way, its first parts queued and the rest never, with nothing to say where
/// to go on from (a rewind asked again sent the first parts twice).
#[tokio::test]
async fn a_recover_cut_off_by_the_request_timeout_goes_on() {
    use std::sync::atomic::Ordering;
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    let (faults, slow) = crate::support::slow_syncs(Duration::from_millis(1500));
    let h = TestHerald::start_with_extras(
        |c| {
            c.api.request_timeout = Duration::from_secs(1).into();
            (c.quotas.fanout_bytes, c.ingest.max_event_bytes) = (1 << 20, 1 << 20);
        },
        herald::server::Extras { faults, ..Default::default() },
    )
    .await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/big") })).await;
    let sub_id = sub["id"].as_str().unwrap().to_string();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    // Each event a part of its own: more than half the fan-out quota.
    for i in 0..4 {
        let data = json!({ "pad": "x".repeat(300_000), "i": i });
        h.api.post("/v1/events", json!({ "id": format!("big-{i}"), "type": "T", "data": data })).await;
    }
    rx.wait_on("/big", 4).await;
    for i in 0..4 {
        state_of(&h.api, &format!("big-{i}"), &sub_id, "delivered").await;
    }
    slow.store(true, Ordering::SeqCst);
    let body = json!({ "since": since, "all": true });
    let (status, answer) = h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), body).await;
    assert_eq!(status, 408, "{answer}");
    slow.store(false, Ordering::SeqCst);
    let got = rx.wait_on("/big", 8).await;
    for i in 0..4 {
        let id = format!("big-{i}");
        assert_eq!(got.iter().filter(|r| r.header("webhook-id") == id).count(), 2, "{id} sent again once");
    }
}

/// A recover refused by the log part-way has queued its first parts: it answers what it
/// queued and where to go on, so asking again from there sends the rest once — it answered an
/// error alone, and a rewind asked again sent its first parts twice.
#[tokio::test]
async fn a_recover_refused_part_way_says_what_it_queued_and_where_to_go_on() {
    use herald::log::embedded::Fault;
    use std::sync::atomic::{AtomicUsize, Ordering};
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    // While armed (non-zero), the writes of deliveries it lets through before refusing.
    let armed = std::sync::Arc::new(AtomicUsize::new(0));
    let left = armed.clone();
    let faults: herald::log::embedded::Faults = Some(std::sync::Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Write(path) if path.to_string_lossy().contains("deliveries") => match left.load(Ordering::SeqCst) {
            0 => Ok(()),
            1 => Err(std::io::Error::from(std::io::ErrorKind::StorageFull)),
            n => {
                left.store(n - 1, Ordering::SeqCst);
                Ok(())
            }
        },
        _ => Ok(()),
    }));
    let extras = herald::server::Extras { faults, ..herald::server::Extras::default() };
    let h = TestHerald::start_with_extras(
        |c| {
            c.quotas.fanout_bytes = 1 << 20;
            c.ingest.max_event_bytes = 256 << 10;
        },
        extras,
    )
    .await;
    let (rx, sub_id, since) = ten_large_events_delivered(&h.api).await;
    // Parts of two events (half the quota each): the first part is written, the second refused.
    armed.store(2, Ordering::SeqCst);
    let recover = format!("/v1/subscriptions/{sub_id}/recover");
    let (status, answer) = h.api.post(&recover, json!({ "since": since, "all": true })).await;
    armed.store(0, Ordering::SeqCst);
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(2)), "{answer}");
    assert!(answer["stopped"]["message"].is_string(), "it says why it stopped: {answer}");
    let from = answer["continue_from"].as_str().expect("where to go on").to_string();
    // The window's end, to go on with: going on to "now", the rewind took in what was
    // delivered since it began (here `big-late`), and under steady traffic never ended.
    let until = answer["until"].as_str().expect("the window's end").to_string();
    let late = json!({ "id": "big-late", "type": "T", "data": {} });
    assert_eq!(h.api.post("/v1/events", late).await.0, 202);
    state_of(&h.api, "big-late", &sub_id, "delivered").await;
    let (status, answer) = h.api.post(&recover, json!({ "since": from, "until": until, "all": true })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(8)), "{answer}");
    assert_eq!(answer["until"], until.as_str(), "{answer}");
    rx.wait_on("/big", 20).await;
    for i in 0..10 {
        let id = format!("big-{i}");
        let sent = rx.on("/big").iter().filter(|r| r.header("webhook-id") == id).count();
        assert!(sent <= 2, "{id} sent {sent} times");
    }
    assert_eq!(rx.on("/big").iter().filter(|r| r.header("webhook-id") == "big-late").count(), 1);
}

/// History records the log did not take in time (their deliveries' offsets committed late,
/// as documented, so delivery went on) are written at a clean stop if the log takes them by
/// then. Before, the stop closed the log under the writer waiting out its back-off, and the
/// attempt — made, committed, never made again — was missing from the history for good.
#[tokio::test]
async fn history_records_late_for_a_failing_disk_are_written_at_a_clean_stop() {
    use herald::log::embedded::Fault;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Arc;
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    let failing = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicUsize::new(0));
    let (flag, count) = (failing.clone(), refused.clone());
    let faults: herald::log::embedded::Faults = Some(Arc::new(move |fault: Fault<'_>| match fault {
        Fault::Write(path) if flag.load(Ordering::SeqCst) && path.to_string_lossy().contains("herald.history") => {
            count.fetch_add(1, Ordering::SeqCst);
            Err(std::io::Error::other("EIO"))
        }
        _ => Ok(()),
    }));
    let extras = herald::server::Extras { faults, ..Default::default() };
    let h = TestHerald::start_with_extras(|c| c.log.partitions = 1, extras).await;
    let rx = Receiver::start().await;
    // Answered after a second: its attempt is recorded once the history's disk fails.
    rx.behave("/late", Behaviour::Slow(Duration::from_secs(1)));
    h.api.subscribe(json!({ "url": rx.url("/late"), "events": ["A"] })).await;
    let (status, body) = h.api.post("/v1/events", json!({ "id": "late-1", "type": "A", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    failing.store(true, Ordering::SeqCst);
    rx.wait_on("/late", 1).await;
    // Its offset committed past the budget, and the writer's back-off grown past the 2 s a
    // stop waits for the shards' history (50 ms doubling: 3.2 s after seven refusals).
    until("the commit let through late, the writer backing off", WAIT, || async {
        let late = crate::support::metrics::scrape(&h.api).await.value("herald_history_late_total", &[]);
        (late >= 1.0 && refused.load(Ordering::SeqCst) >= 7).then_some(())
    })
    .await;
    failing.store(false, Ordering::SeqCst);
    let h = h.restart().await;
    let attempts = items(&h.api, "/v1/attempts?event=late-1", 1).await;
    assert_eq!(attempts[0]["outcome"], "delivered", "{attempts:?}");
    assert_eq!(rx.on("/late").len(), 1, "sent once: its offset was committed");
}

/// The admin asking for a subscription's attempts gets its tenant's, with an event named too,
/// and the tenant it names when it names one; a filter that names nothing is refused, naming
/// it. `?subscription=S&event=E` read the default tenant (an empty page), `tenant=` was
/// overridden by the subscription's, and `?event=` answered an empty page — "never sent".
#[tokio::test]
async fn the_attempts_filters_are_read_as_given() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let (acme_id, acme) = tenant_with_key(&h.api, "Acme").await;
    let (globex_id, _) = tenant_with_key(&h.api, "Globex").await;
    let sub = acme.subscribe(json!({ "url": rx.url("/acme") })).await;
    let sub_id = sub["id"].as_str().unwrap();
    let (status, body) =
        h.api.post("/v1/events", json!({ "id": "f1", "type": "T", "tenant": acme_id, "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    state_of(&acme, "f1", sub_id, "delivered").await;
    let count = |path: String| {
        let api = h.api.clone();
        async move {
            let (status, page) = api.get(&path).await;
            assert_eq!(status, 200, "{path}: {page}");
            page["items"].as_array().unwrap().len()
        }
    };
    assert_eq!(count(format!("/v1/attempts?subscription={sub_id}")).await, 1);
    assert_eq!(count(format!("/v1/attempts?subscription={sub_id}&event=f1")).await, 1);
    assert_eq!(count(format!("/v1/attempts?subscription={sub_id}&tenant={globex_id}")).await, 0);
    assert_eq!(count(format!("/v1/attempts?subscription={sub_id}&tenant={acme_id}")).await, 1);
    for (query, field) in
        [("event=", "event"), ("subscription=", "subscription"), (&*format!("event={}", "e".repeat(300)), "event")]
    {
        let (status, err) = h.api.get(&format!("/v1/attempts?{query}")).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{query}: {err}");
    }
}

/// A delivery waiting to be retried when its subscription is deleted reads `dropped` (the
/// README's "its subscription was deleted"), with no next attempt: it read `retrying`, with
/// a next attempt that would never be made, until that retry came due (hours, at most a day).
#[tokio::test]
async fn a_delivery_whose_subscription_is_deleted_reads_dropped() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/gone", 500);
    let retry = json!({ "policy": "fixed", "interval": "1h", "max_attempts": 3 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/gone"), "retry": retry })).await;
    let sub_id = sub["id"].as_str().unwrap();
    assert_eq!(h.api.post("/v1/events", json!({ "id": "gone-1", "type": "T", "data": {} })).await.0, 202);
    let event = state_of(&h.api, "gone-1", sub_id, "retrying").await;
    assert!(event["deliveries"][0]["next_attempt_at"].is_string(), "{event}");
    assert_eq!(h.api.delete(&format!("/v1/subscriptions/{sub_id}")).await.0, 204);
    let event = state_of(&h.api, "gone-1", sub_id, "dropped").await;
    assert!(event["deliveries"][0]["next_attempt_at"].is_null(), "{event}");
    assert_eq!(event["deliveries"][0]["attempts"], 1, "{event}");
}

/// A recover's parts are sized by what the fan-out quota counts, the payload's form (here
/// JavaScript's, for an envelope): sized by the bytes as published, ten events of numbers
/// written `1e20` (50 KB, 220 KB in JavaScript's form) went as one part past the quota,
/// refused `413` at every call, so the window could never be recovered.
#[tokio::test]
async fn a_recover_s_parts_are_sized_as_the_quota_counts_them() {
    let h = TestHerald::start_with(|c| {
        c.quotas.fanout_bytes = 1 << 20;
        c.ingest.max_event_bytes = 256 << 10;
    })
    .await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/wide") })).await;
    let sub_id = sub["id"].as_str().unwrap();
    let since = (chrono::Utc::now() - chrono::Duration::seconds(1)).to_rfc3339();
    let numbers = format!("[{}]", vec!["1e20"; 10_000].join(","));
    for i in 0..10 {
        let body = format!(r#"{{"id":"wide-{i}","type":"T","data":{numbers}}}"#);
        let (status, answer) = h.api.raw("POST", "/v1/events", Some(bytes::Bytes::from(body)), Some(TOKEN)).await;
        assert_eq!(status, 202, "{answer}");
    }
    for i in 0..10 {
        state_of(&h.api, &format!("wide-{i}"), sub_id, "delivered").await;
    }
    let (status, answer) =
        h.api.post(&format!("/v1/subscriptions/{sub_id}/recover"), json!({ "since": since, "all": true })).await;
    assert_eq!((status.as_u16(), &answer["queued"]), (202, &json!(10)), "{answer}");
    rx.wait_on("/wide", 20).await;
}
