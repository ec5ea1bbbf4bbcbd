//! Changing subscriptions: PATCH, secret rotation with an overlap, and test pings.

use crate::support::{until, Receiver, TestHerald};
use herald_load_tests::verify::Verifier;
use serde_json::json;
use std::time::Duration;

#[tokio::test]
async fn patch_changes_what_is_delivered_and_validates_like_create() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/a"), "events": ["A"] })).await;
    let id = sub["id"].as_str().unwrap();
    h.api.subscribe(json!({ "url": rx.url("/taken") })).await;

    let (status, changed) = h
        .api
        .raw(
            "PATCH",
            &format!("/v1/subscriptions/{id}"),
            Some(json!({ "events": ["B"], "url": rx.url("/b") }).to_string().into()),
            Some(crate::support::TOKEN),
        )
        .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(changed["events"], json!(["B"]));
    assert_eq!(changed["id"], id);
    assert!(changed.get("secret").is_none());
    let (_, a) = h.api.post("/v1/events", json!({ "type": "A", "data": {} })).await;
    let (_, b) = h.api.post("/v1/events", json!({ "id": "after-patch", "type": "B", "data": {} })).await;
    assert_eq!((a["deliveries"].as_u64(), b["deliveries"].as_u64()), (Some(1), Some(2)), "A only reaches /taken now");
    let got = rx.wait_on("/b", 1).await;
    assert_eq!(got[0].header("webhook-id"), "after-patch");
    assert!(rx.on("/a").is_empty());

    let patch = |body: serde_json::Value| {
        let api = h.api.clone();
        let path = format!("/v1/subscriptions/{id}");
        async move { api.raw("PATCH", &path, Some(body.to_string().into()), Some(crate::support::TOKEN)).await }
    };
    for (body, field) in [
        (json!({ "url": rx.url("/taken") }), "url"),
        (json!({ "url": "ftp://x" }), "url"),
        (json!({ "timeout": "PT1H" }), "timeout"),
        (json!({ "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 0 } }), "retry.max_attempts"),
        (json!({ "tenant": "other" }), "tenant"),
    ] {
        let (status, err) = patch(body.clone()).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{body}: {err}");
    }
    let (status, _) =
        h.api.raw("PATCH", "/v1/subscriptions/sub_missing", Some("{}".into()), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 404);
    // Disabling and enabling again.
    let (_, off) = patch(json!({ "enabled": false })).await;
    assert_eq!(off["enabled"], false);
    let (_, none) = h.api.post("/v1/events", json!({ "type": "B", "data": {} })).await;
    assert_eq!(none["deliveries"], 1);
    let (_, on) = patch(json!({ "enabled": true })).await;
    assert_eq!(on["enabled"], true);
    assert!(on.get("disabled_reason").is_none());
}

#[tokio::test]
async fn rotation_sends_both_signatures_during_the_overlap_then_only_the_new_one() {
    let h = TestHerald::start_with(|c| c.signing.rotation_overlap = Duration::from_secs(2).into()).await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/r") })).await;
    let id = sub["id"].as_str().unwrap();
    let old = Verifier::new(sub["secret"].as_str().unwrap()).unwrap();
    let (status, rotated) =
        h.api.raw("POST", &format!("/v1/subscriptions/{id}/rotate-secret"), None, Some(crate::support::TOKEN)).await;
    assert_eq!(status, 200, "{rotated}");
    let new_secret = rotated["secret"].as_str().unwrap();
    assert_ne!(new_secret, sub["secret"].as_str().unwrap());
    assert!(rotated["previous_secret_expires_at"].is_string());
    let new = Verifier::new(new_secret).unwrap();
    let check = |r: &crate::support::Received, v: &Verifier, sig: &str| {
        v.verify(r.header("webhook-id"), r.header("webhook-timestamp"), &r.body, sig)
    };

    h.api.post("/v1/events", json!({ "id": "during", "type": "T", "data": {} })).await;
    let during = rx.wait_on("/r", 1).await.remove(0);
    let sigs: Vec<&str> = during.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 2, "both signatures during the overlap");
    assert!(check(&during, &new, sigs[0]) && !check(&during, &old, sigs[0]), "the new secret signs first");
    assert!(check(&during, &old, sigs[1]), "the old secret still signs");

    // After the overlap only the new secret signs.
    let api = h.api.clone();
    let mut n = 0;
    let after = until("a delivery after the overlap", Duration::from_secs(20), || {
        n += 1;
        let (api, rx, id) = (api.clone(), rx.clone(), format!("after-{n}"));
        async move {
            api.post("/v1/events", json!({ "id": id, "type": "T", "data": {} })).await;
            // Wait for this event's own delivery before judging it.
            let r = until("the event's delivery", Duration::from_secs(10), || {
                let found = rx.on("/r").into_iter().find(|r| r.header("webhook-id") == id);
                async move { found }
            })
            .await;
            (!r.header("webhook-signature").contains(' ')).then_some(r)
        }
    })
    .await;
    assert!(check(&after, &new, after.header("webhook-signature")));
    assert!(!check(&after, &old, after.header("webhook-signature")));
    // A rotation to a chosen secret is checked like one given at creation.
    let (status, err) =
        h.api.post(&format!("/v1/subscriptions/{id}/rotate-secret"), json!({ "secret": "not-whsec" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("secret")));
}

/// A second rotation within the first one's overlap (a double click, or a rotation to a chosen
/// secret just after one to a made one) must not end the first secret early: a receiver that
/// still holds it verifies until its own overlap ends, as after a single rotation.
#[tokio::test]
async fn a_second_rotation_within_the_overlap_keeps_the_first_secret_signing() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/r") })).await;
    let id = sub["id"].as_str().unwrap();
    let rotate = format!("/v1/subscriptions/{id}/rotate-secret");
    let mut secrets = vec![sub["secret"].as_str().unwrap().to_string()];
    for _ in 0..2 {
        let (status, rotated) = h.api.raw("POST", &rotate, None, Some(crate::support::TOKEN)).await;
        assert_eq!(status, 200, "{rotated}");
        secrets.push(rotated["secret"].as_str().unwrap().to_string());
    }
    h.api.post("/v1/events", json!({ "id": "after-two", "type": "T", "data": {} })).await;
    let got = rx.wait_on("/r", 1).await.remove(0);
    let sigs: Vec<&str> = got.header("webhook-signature").split(' ').collect();
    assert_eq!(sigs.len(), 3, "the new secret and both previous ones sign: {sigs:?}");
    for (n, secret) in secrets.iter().enumerate() {
        let v = Verifier::new(secret).unwrap();
        let ok = sigs.iter().any(|s| v.verify(got.header("webhook-id"), got.header("webhook-timestamp"), &got.body, s));
        assert!(ok, "secret {n} of {} verifies the delivery", secrets.len());
    }
}

/// An `hmac` header carries one signature (its receivers compare the whole header with one
/// digest), so a rotation takes effect at once: the answer says so and promises no overlap —
/// it showed `previous_secret_expires_at` a day ahead, as the console and README promised the
/// old secret kept signing, while every receiver holding it failed from that moment.
#[tokio::test]
async fn an_hmac_rotation_says_it_takes_effect_at_once() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let signature = json!({ "scheme": "hmac", "header": "x-hook-signature" });
    let sub = h.api.subscribe(json!({ "url": rx.url("/h"), "signature": signature, "secret": "old-secret" })).await;
    let id = sub["id"].as_str().unwrap();
    let (status, rotated) =
        h.api.post(&format!("/v1/subscriptions/{id}/rotate-secret"), json!({ "secret": "new-secret" })).await;
    assert_eq!(status, 200, "{rotated}");
    assert!(rotated.get("previous_secret_expires_at").is_none(), "no overlap promised: {rotated}");
    let warning = rotated["warnings"][0].as_str().unwrap_or_default();
    assert!(warning.contains("at once"), "{rotated}");
    let (_, read) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    assert!(read.get("previous_secret_expires_at").is_none(), "{read}");
    h.api.post("/v1/events", json!({ "id": "after", "type": "T", "data": {} })).await;
    let got = rx.wait_on("/h", 1).await.remove(0);
    let sig = got.header("x-hook-signature");
    assert!(herald_client::verify::hmac("new-secret", &got.body, sig, herald_client::verify::Encoding::Base64));
    assert!(!herald_client::verify::hmac("old-secret", &got.body, sig, herald_client::verify::Encoding::Base64));
}

/// An `hmac` signature header may be any header Herald does not need — `User-Agent` included,
/// which then carries the signature alone: it went out twice (Herald's own and the signature),
/// and receivers, reading the first, never verified a delivery.
#[tokio::test]
async fn a_signature_in_the_user_agent_header_is_its_only_value() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let signature = json!({ "scheme": "hmac", "header": "User-Agent" });
    h.api.subscribe(json!({ "url": rx.url("/ua"), "signature": signature, "secret": "ua-secret" })).await;
    h.api.post("/v1/events", json!({ "id": "ua-1", "type": "T", "data": {} })).await;
    let got = rx.wait_on("/ua", 1).await.remove(0);
    let values: Vec<_> = got.headers.get_all("user-agent").iter().collect();
    assert_eq!(values.len(), 1, "{values:?}");
    let sig = got.header("user-agent");
    assert!(herald_client::verify::hmac("ua-secret", &got.body, sig, herald_client::verify::Encoding::Base64));
}

#[tokio::test]
async fn the_test_endpoint_sends_a_signed_ping_and_reports_the_outcome() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/broken", 500);
    let ok = h.api.subscribe(json!({ "url": rx.url("/ok") })).await;
    let broken = h.api.subscribe(json!({ "url": rx.url("/broken") })).await;
    let (status, report) =
        h.api.post(&format!("/v1/subscriptions/{}/test", ok["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!((report["delivered"].as_bool(), report["status"].as_u64()), (Some(true), Some(200)), "{report}");
    let ping = &rx.on("/ok")[0];
    assert_eq!(ping.json()["event"], "herald.ping");
    let v = Verifier::new(ok["secret"].as_str().unwrap()).unwrap();
    assert!(v.verify(
        ping.header("webhook-id"),
        ping.header("webhook-timestamp"),
        &ping.body,
        ping.header("webhook-signature")
    ));
    let (_, report) =
        h.api.post(&format!("/v1/subscriptions/{}/test", broken["id"].as_str().unwrap()), json!({})).await;
    assert_eq!((report["delivered"].as_bool(), report["status"].as_u64()), (Some(false), Some(500)), "{report}");
    let (status, _) = h.api.post("/v1/subscriptions/sub_nope/test", json!({})).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn patch_with_null_clears_optional_fields() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h
        .api
        .subscribe(json!({
            "url": rx.url("/n"), "rate_limit": 5.0, "timeout": "10s", "key": "k-1", "max_in_flight": 3,
            "tls": { "trust_all": true }, "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 2 },
            "headers": { "X-Keep": "yes", "X-Drop": "no" }
        }))
        .await;
    let id = sub["id"].as_str().unwrap();
    for field in ["rate_limit", "timeout", "key", "max_in_flight", "tls", "retry"] {
        assert!(sub.get(field).is_some(), "{field} set at creation: {sub}");
    }
    let body = json!({ "rate_limit": null, "timeout": null, "key": null, "max_in_flight": null, "tls": null,
                       "retry": null, "headers": { "X-Drop": null } });
    let (status, cleared) = h
        .api
        .raw("PATCH", &format!("/v1/subscriptions/{id}"), Some(body.to_string().into()), Some(crate::support::TOKEN))
        .await;
    assert_eq!(status, 200, "{cleared}");
    let (_, read) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    for field in ["rate_limit", "timeout", "key", "max_in_flight", "tls", "retry"] {
        assert!(read.get(field).is_none(), "{field} cleared: {read}");
    }
    assert_eq!(read["headers"], json!({ "X-Keep": "********" }));
    // The change is what is delivered: no key in the query any more, the kept header sent.
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let got = rx.wait_on("/n", 1).await;
    assert_eq!(got[0].query, None);
    assert_eq!(got[0].header("x-keep"), "yes");
    assert!(got[0].header("x-drop").is_empty());
}

/// Header names are case-insensitive: a PATCH of `X-Token` changes the `x-token` set before
/// (it was kept beside it, and the old value sent), a `null` under another spelling removes
/// it, and a create naming one header twice is refused, the field named.
#[tokio::test]
async fn a_header_patched_under_another_spelling_is_the_same_header() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let sub = h.api.subscribe(json!({ "url": rx.url("/h"), "headers": { "x-token": "old", "X-Gone": "g" } })).await;
    let id = sub["id"].as_str().unwrap();
    let body = json!({ "headers": { "X-Token": "new", "x-gone": null } });
    let (status, patched) = h
        .api
        .raw("PATCH", &format!("/v1/subscriptions/{id}"), Some(body.to_string().into()), Some(crate::support::TOKEN))
        .await;
    assert_eq!(status, 200, "{patched}");
    let (_, read) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(read["headers"], json!({ "X-Token": "********" }), "{read}");
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let got = rx.wait_on("/h", 1).await;
    assert_eq!(got[0].header("x-token"), "new");
    assert!(got[0].header("x-gone").is_empty());
    let twice = json!({ "url": rx.url("/twice"), "headers": { "X-Token": "a", "x-token": "b" } });
    let (status, err) = h.api.post("/v1/subscriptions", twice).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("headers.x-token")), "{err}");
    // A patch naming one header twice is refused as a create is: which of the two it meant is
    // not for Herald to guess (it kept one, or removed both for a `null` beside a value).
    for patch in [json!({ "X-Token": "a", "x-token": "b" }), json!({ "X-Token": "a", "x-token": null })] {
        let body = json!({ "headers": patch });
        let (status, err) = h
            .api
            .raw(
                "PATCH",
                &format!("/v1/subscriptions/{id}"),
                Some(body.to_string().into()),
                Some(crate::support::TOKEN),
            )
            .await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("headers.x-token")), "{err}");
    }
}

#[tokio::test]
async fn no_secret_of_any_kind_appears_in_a_read_or_a_list() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let secrets = [
        "whsec_c2VjcmV0LXNpZ25pbmcta2V5LWZvci10ZXN0",
        "query-key-77",
        "basic-pw-88",
        "header-token-99",
        "key-pass-11",
        "amqp-pw-22",
        "client-secret-33",
        "oauth-pw-44",
    ];
    let webhook = h
        .api
        .subscribe(json!({
            "url": rx.url("/s"), "secret": secrets[0], "key": secrets[1],
            "auth": { "type": "basic", "username": "u", "password": secrets[2] },
            "headers": { "Authorization-Extra": secrets[3] }, "tls": { "key_password": secrets[4] }
        }))
        .await;
    assert_eq!(webhook["secret"], secrets[0], "the create answer shows the signing secret, on purpose");
    h.api
        .subscribe(json!({ "transport": "amqp",
                           "amqp": { "uri": format!("amqp://herald:{}@127.0.0.1:5672/vh", secrets[5]), "exchange": "x" } }))
        .await;
    h.api
        .subscribe(json!({
            "url": rx.url("/o"),
            "auth": { "type": "oauth2", "grant": "password", "token_url": rx.url("/token"), "client_id": "c",
                      "client_secret": secrets[6], "username": "u", "password": secrets[7] }
        }))
        .await;
    let (_, list) = h.api.get("/v1/subscriptions").await;
    let (_, one) = h.api.get(&format!("/v1/subscriptions/{}", webhook["id"].as_str().unwrap())).await;
    for text in [list.to_string(), one.to_string()] {
        for secret in secrets {
            assert!(!text.contains(secret), "{secret} leaked: {text}");
        }
    }
    assert!(list.to_string().contains("amqp://herald:********@127.0.0.1:5672/vh"), "the broker stays visible: {list}");
}

/// A subscription signed with `hmac` and a secret of its own, rotated, may change to the
/// `standard` scheme: the previous secret, which that scheme cannot use, is left out of the
/// overlap instead of refusing the change (for good, as it was, even after the overlap).
#[tokio::test]
async fn a_rotated_hmac_subscription_may_change_to_the_standard_scheme() {
    let h = TestHerald::start_with(|c| c.signing.rotation_overlap = Duration::from_secs(60).into()).await;
    let rx = Receiver::start().await;
    let sub = h
        .api
        .subscribe(json!({ "url": rx.url("/r"), "secret": "plain-secret", "signature": { "scheme": "hmac", "header": "x-sig" } }))
        .await;
    let id = sub["id"].as_str().unwrap();
    let (status, rotated) =
        h.api.raw("POST", &format!("/v1/subscriptions/{id}/rotate-secret"), None, Some(crate::support::TOKEN)).await;
    assert_eq!(status, 200, "{rotated}");
    let patch = json!({ "signature": { "scheme": "standard" } }).to_string().into();
    let (status, changed) =
        h.api.raw("PATCH", &format!("/v1/subscriptions/{id}"), Some(patch), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 200, "{changed}");
    h.api.post("/v1/events", json!({ "id": "after-change", "type": "T", "data": {} })).await;
    let got = rx.wait_on("/r", 1).await.remove(0);
    let verifier = Verifier::new(rotated["secret"].as_str().unwrap()).unwrap();
    let sig = got.header("webhook-signature");
    assert!(!sig.contains(' '), "one signature: {sig}");
    assert!(verifier.verify(got.header("webhook-id"), got.header("webhook-timestamp"), &got.body, sig));
}

/// A PATCH that changes nothing writes nothing: each record stays in the catalog until
/// compaction and every process applies it, and a tenant PATCHing `{}` at its request rate
/// grew what every start reads. It answers the subscription as it stands.
#[tokio::test]
async fn a_patch_that_changes_nothing_writes_nothing() {
    let h = TestHerald::start().await;
    let sub = h.api.subscribe(json!({ "url": "https://hooks.example.com/same", "rate_limit": 5.0 })).await;
    let id = sub["id"].as_str().unwrap();
    let end = || async { h.herald.log().end_offset("herald.subscriptions", 0).await.unwrap() };
    let before = end().await;
    for patch in [json!({}), json!({ "rate_limit": 5.0 }), json!({ "url": "https://hooks.example.com/same" })] {
        let (status, body) = h.api.patch(&format!("/v1/subscriptions/{id}"), patch.clone()).await;
        assert_eq!((status.as_u16(), &body["id"], &body["rate_limit"]), (200, &sub["id"], &json!(5.0)), "{patch}");
    }
    assert_eq!(end().await, before, "nothing written");
    let (status, body) = h.api.patch(&format!("/v1/subscriptions/{id}"), json!({ "rate_limit": 6.0 })).await;
    assert_eq!((status.as_u16(), &body["rate_limit"]), (200, &json!(6.0)));
    assert!(end().await > before, "a change is written");
}

/// A subscription the config file declares (`[[webhooks]]`) is made from the file at every
/// start: a change through the API was answered as made and then undone at the next start —
/// a rotated secret went back to the file's (receivers verifying the new one refused every
/// delivery), a disabled webhook came back. Refused, naming the id.
#[tokio::test]
async fn a_webhook_the_config_file_declares_is_changed_there_not_through_the_api() {
    let rx = Receiver::start().await;
    let webhook: herald::config::StaticWebhook =
        serde_json::from_value(json!({ "name": "erp", "endpoint": rx.url("/erp"), "secret": "file-secret" })).unwrap();
    let h = TestHerald::start_with(|c| c.webhooks.push(webhook)).await;
    let path = "/v1/subscriptions/static-erp";
    for (status, err) in [
        h.api.patch(path, json!({ "url": rx.url("/elsewhere") })).await,
        h.api.patch(path, json!({ "enabled": false, "timeout": "5s" })).await,
        h.api.post(&format!("{path}/rotate-secret"), json!({})).await,
        h.api.delete(path).await,
    ] {
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (409, Some("id")), "{err}");
    }
    let (status, sub) = h.api.get(path).await;
    assert_eq!((status.as_u16(), sub["enabled"].as_bool()), (200, Some(true)), "{sub}");
    // Its `enabled` alone may be set (on again after Herald disabled it, or off in an
    // emergency), until the next start sets the file's.
    let (status, sub) = h.api.patch(path, json!({ "enabled": false })).await;
    assert_eq!((status.as_u16(), sub["enabled"].as_bool()), (200, Some(false)), "{sub}");
    let h = h.restart().await;
    let (_, sub) = h.api.get(path).await;
    assert_eq!(sub["enabled"], true, "the file's again: {sub}");
}

/// A user and password in a config-file webhook's endpoint are sent as HTTP Basic credentials
/// and kept sealed with the subscription's other secrets: they were kept in its URL — shown
/// on every read (the console's, a tenant key's), stored unsealed — and never sent (HTTP
/// drops a URL's user information), the receiver refusing every delivery without a word why.
#[tokio::test]
async fn a_file_webhook_s_endpoint_credentials_are_sent_as_basic_auth_not_shown() {
    use base64::Engine;
    let rx = Receiver::start().await;
    let endpoint = rx.url("/erp").replace("http://", "http://erp%40acme:s3cr%3At@");
    let webhook: herald::config::StaticWebhook =
        serde_json::from_value(json!({ "name": "erp", "endpoint": endpoint })).unwrap();
    let h = TestHerald::start_with(|c| c.webhooks.push(webhook)).await;
    let (status, sub) = h.api.get("/v1/subscriptions/static-erp").await;
    assert_eq!(status, 200, "{sub}");
    assert!(!sub.to_string().contains("s3cr"), "{sub}");
    assert_eq!(sub["url"], rx.url("/erp"), "{sub}");
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let got = rx.wait_on("/erp", 1).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("erp@acme:s3cr:t");
    assert_eq!(got[0].header("authorization"), format!("Basic {basic}"));
    // A token alone as the user (an API key's usual form): Basic with an empty password, as
    // curl sends it — refused at start before, the file naming no password to give.
    let rx = Receiver::start().await;
    let endpoint = rx.url("/crm").replace("http://", "http://tok3n@");
    let webhook: herald::config::StaticWebhook =
        serde_json::from_value(json!({ "name": "crm", "endpoint": endpoint })).unwrap();
    let h = TestHerald::start_with(|c| c.webhooks.push(webhook)).await;
    let (_, sub) = h.api.get("/v1/subscriptions/static-crm").await;
    assert!(!sub.to_string().contains("tok3n@"), "{sub}");
    h.api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    let got = rx.wait_on("/crm", 1).await;
    let basic = base64::engine::general_purpose::STANDARD.encode("tok3n:");
    assert_eq!(got[0].header("authorization"), format!("Basic {basic}"));
}

/// A webhook changed into an AMQP subscription is held to AMQP's rules for what it brings
/// along: its `key` (a webhook's query parameter, never sent over AMQP) and headers past
/// what an AMQP message carries were "kept" from the webhook's spec, so neither check ran,
/// and at delivery the headers were left off and the key ignored, silently.
#[tokio::test]
async fn a_webhook_changed_to_amqp_is_held_to_amqp_s_rules() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let big = json!({ "X-Big": "v".repeat(herald::transport::amqp::HEADER_BYTES) });
    let sub = h.api.subscribe(json!({ "url": rx.url("/hook"), "key": "k-1", "headers": big })).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let amqp = json!({ "uri": "amqp://guest:guest@127.0.0.1:5672/%2f", "exchange": "herald-switched" });
    let (status, refused) = h.api.patch(&path, json!({ "transport": "amqp", "amqp": amqp })).await;
    assert_eq!((status.as_u16(), refused["error"]["field"].as_str()), (400, Some("key")), "{refused}");
    let (status, refused) = h.api.patch(&path, json!({ "transport": "amqp", "amqp": amqp, "key": null })).await;
    assert_eq!((status.as_u16(), refused["error"]["field"].as_str()), (400, Some("headers")), "{refused}");
    let small = json!({ "X-Big": null, "X-Customer": "c-42" });
    let (status, changed) =
        h.api.patch(&path, json!({ "transport": "amqp", "amqp": amqp, "key": null, "headers": small })).await;
    assert_eq!(status.as_u16(), 200, "{changed}");
    assert_eq!(changed["transport"], "amqp", "{changed}");
}

/// A delivery waiting for its retry when its subscription's `payload` changes is sent in the
/// form the subscription asks for now: one made for `raw_bytes` and sent as `raw` after a
/// change carried the producer's spacing, where the receivers of the guides verify
/// `JSON.stringify(JSON.parse(body))` — rejected at every retry, then dead-lettered.
#[tokio::test]
async fn a_delivery_waiting_when_the_payload_form_changes_is_sent_in_the_new_form() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/form", 503);
    let retry = json!({ "policy": "fixed", "interval": "200ms", "max_attempts": 100 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/form"), "payload": "raw_bytes", "retry": retry })).await;
    let id = sub["id"].as_str().unwrap();
    let body = r#"{"type":"t","id":"spaced-1","data":{ "a" : 1.50 }}"#;
    let (status, resp) = h.api.raw("POST", "/v1/events", Some(body.into()), Some(crate::support::TOKEN)).await;
    assert_eq!(status, 202, "{resp}");
    assert_eq!(&rx.wait_on("/form", 1).await[0].body[..], br#"{ "a" : 1.50 }"#, "as sent, at first");
    let (status, patched) = h.api.patch(&format!("/v1/subscriptions/{id}"), json!({ "payload": "raw" })).await;
    assert_eq!(status, 200, "{patched}");
    // Retries made before the change reached the receiver are let by; once it answers, the
    // last one it took is in the form asked for now.
    let before = rx.on("/form").len();
    rx.wait_on("/form", before + 2).await;
    rx.respond_on("/form", 200);
    until("the event delivered", Duration::from_secs(20), || async {
        let (_, event) = h.api.get("/v1/events/spaced-1").await;
        (event["deliveries"][0]["state"] == "delivered").then_some(())
    })
    .await;
    assert_eq!(&rx.on("/form").last().unwrap().body[..], br#"{"a":1.5}"#);
}
