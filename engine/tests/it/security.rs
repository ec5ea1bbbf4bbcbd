//! What a hostile tenant would try, each through the API with a tenant key: every attack is
//! refused with a `4xx` naming the field, or is harmless, while another tenant's healthy
//! subscriptions on every partition keep receiving everything (the security review's
//! findings, one test each; TLS files are in `tls.rs`, edge devices in `edge.rs`).

use crate::support::metrics::scrape;
use crate::support::{tenant_with_key, until, Api, Receiver, TestHerald, TOKEN};
use bytes::Bytes;
use herald::dispatch::{Observe, Parked, Settled, Settlement};
use herald::server::Extras;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BYSTANDER_IP: &str = "127.0.0.2";

/// Herald with loopback closed to tenants, except for the bystander's address.
fn loopback_closed(c: &mut herald::config::Config) {
    c.network.allow = vec![format!("{BYSTANDER_IP}/32").parse().unwrap()];
}

/// Another tenant minding its own business: one healthy subscription on each partition of the
/// deliveries topic, fed events before, during and after an attack.
struct Bystander {
    tenant: String,
    rx: Receiver,
    /// Receiver paths, one a partition.
    paths: Vec<String>,
    sent: Vec<String>,
}

impl Bystander {
    async fn join(h: &TestHerald) -> Bystander {
        // Its subscriptions are made by the admin, so tests may throttle tenant keys hard.
        let (tenant, _) = tenant_with_key(&h.api, "Bystander").await;
        // On 127.0.0.2: a test that closes loopback to tenants lets this address alone through.
        let rx = Receiver::start_on(BYSTANDER_IP).await;
        let partitions = h.partitions();
        let mut covered = HashSet::new();
        let mut paths = Vec::new();
        // Exactly one a partition: a subscription landing on a covered partition is deleted, so
        // its fan-out (one record a partition) stays well under the quotas the tests set.
        for n in 0.. {
            if covered.len() == partitions as usize {
                break;
            }
            assert!(n < 500, "subscriptions should cover {partitions} partitions");
            let path = format!("/by/{n}");
            let sub = h.api.subscribe(json!({ "url": rx.url(&path), "tenant": tenant })).await;
            let id = sub["id"].as_str().unwrap();
            if covered.insert(herald::log::partition_for(id.as_bytes(), partitions)) {
                paths.push(path);
            } else {
                let (status, body) = h.api.delete(&format!("/v1/subscriptions/{id}")).await;
                assert!(status.is_success(), "{status} {body}");
            }
        }
        Bystander { tenant, rx, paths, sent: Vec::new() }
    }

    /// Publishes one event to every one of the bystander's subscriptions.
    async fn publish(&mut self, admin: &Api) {
        let id = format!("by-{}", self.sent.len());
        let event = json!({ "id": id, "type": "T", "tenant": self.tenant, "data": { "n": self.sent.len() } });
        let (status, body) = admin.post("/v1/events", event).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["deliveries"], self.paths.len(), "{body}");
        self.sent.push(id);
    }

    /// Waits until every subscription has received every event published so far.
    async fn received_everything(&self) {
        until("every bystander event on every partition", Duration::from_secs(30), || async {
            let all = self.paths.iter().all(|path| {
                let got: HashSet<String> =
                    self.rx.on(path).iter().map(|r| r.header("webhook-id").to_string()).collect();
                self.sent.iter().all(|id| got.contains(id))
            });
            all.then_some(())
        })
        .await;
    }
}

/// Counts deliveries this Herald parked because processing them panicked (the panic metric
/// is per process, and another test panics on purpose).
#[derive(Default)]
struct Panics(std::sync::atomic::AtomicUsize);

impl Observe for Panics {
    fn settled(&self, settled: &Settled) {
        if matches!(settled.settlement, Settlement::DeadLettered { reason: Parked::Panicked(_) }) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// Herald adjusted by `tweak`, and what it parked for panicking.
async fn watched(tweak: impl FnOnce(&mut herald::config::Config)) -> (TestHerald, Arc<Panics>) {
    let panics = Arc::new(Panics::default());
    let extras = Extras { observers: vec![panics.clone()], ..Extras::default() };
    (TestHerald::start_with_extras(tweak, extras).await, panics)
}

fn no_panics(panics: &Panics) {
    assert_eq!(panics.0.load(std::sync::atomic::Ordering::SeqCst), 0, "no delivery panicked");
}

#[tokio::test]
async fn settings_that_used_to_panic_delivery_are_refused_naming_the_field() {
    let (h, panics) = watched(|_| {}).await;
    let mut bystander = Bystander::join(&h).await;
    bystander.publish(&h.api).await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let url = "https://hooks.example.com/m";
    let amqp = json!({ "uri": "amqp://u:p@broker.example.com:5672/%2f", "exchange": "x" });
    let long_name = "X".repeat(300);
    let many_headers: serde_json::Map<String, Value> = (0..20_000).map(|i| (format!("X-H{i}"), json!("v"))).collect();
    let exponential = |extra: Value| {
        let mut r = json!({ "policy": "exponential" });
        r.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        json!({ "url": url, "retry": r })
    };
    for (body, field) in [
        (json!({ "url": url, "rate_limit": 1e-20 }), "rate_limit"),
        (json!({ "url": url, "rate_limit": -1 }), "rate_limit"),
        (exponential(json!({ "initial": "P3650D", "max_interval": "P3650D", "jitter": 0 })), "retry.initial"),
        (exponential(json!({ "max_interval": "P99999D", "jitter": 0 })), "retry.max_interval"),
        (exponential(json!({ "multiplier": 1e300 })), "retry.multiplier"),
        (exponential(json!({ "jitter": 7.5 })), "retry.jitter"),
        (exponential(json!({ "max_attempts": 4_294_967_295u64 })), "retry.max_attempts"),
        (exponential(json!({ "max_age": "P99999999999999999999D" })), "retry.max_age"),
        (json!({ "url": url, "timeout": "P99999999999999999999D" }), "timeout"),
        (json!({ "url": url, "timeout": "PT0S" }), "timeout"),
        (
            json!({ "url": url, "retry": { "policy": "fixed", "interval": "PT99999999999999999999S", "max_attempts": 3 } }),
            "retry.interval",
        ),
        // A fixed schedule past the longest max_age (7 days): a day apart 1,000 times.
        (
            json!({ "url": url, "retry": { "policy": "fixed", "interval": "P1D", "max_attempts": 1000 } }),
            "retry.max_attempts",
        ),
        (json!({ "url": url, "max_in_flight": 0 }), "max_in_flight"),
        (json!({ "url": url, "headers": many_headers }), "headers"),
        (json!({ "url": url, "signature": { "scheme": "hmac", "header": long_name } }), "signature.header"),
        (
            json!({ "transport": "amqp", "amqp": amqp, "signature": { "scheme": "hmac", "header": long_name } }),
            "signature.header",
        ),
        (json!({ "url": url, "headers": { long_name.clone(): "v" } }), &format!("headers.{long_name}")),
    ] {
        let (status, err) = mallory.post("/v1/subscriptions", body.clone()).await;
        let shown = err.to_string().chars().take(300).collect::<String>();
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{shown}");
    }
    // The same through PATCH, on a subscription that exists.
    let sub = mallory.subscribe(json!({ "url": url })).await;
    let path = format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap());
    let patch = json!({ "retry": { "policy": "exponential", "initial": "P99999D" } }).to_string();
    let (status, err) = mallory.raw("PATCH", &path, Some(patch.into()), Some(&mallory.token)).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("retry.initial")), "{err}");

    // Event ids and types longer than an AMQP short string are refused at the door, naming them.
    for (event, field) in [
        (json!({ "id": "i".repeat(256), "type": "T", "data": {} }), "id"),
        (json!({ "type": "t".repeat(256), "data": {} }), "type"),
    ] {
        let (status, err) = h.api.post("/v1/events", event).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some(field)), "{err}");
    }
    bystander.publish(&h.api).await;
    bystander.received_everything().await;
    no_panics(&panics);
}

/// A subscription record already in the log with settings from before they were range-checked
/// (what an older version could have stored): delivery clamps them instead of overflowing.
#[tokio::test]
async fn a_hostile_subscription_already_in_the_log_cannot_stop_delivery() {
    use herald::log::Record;
    use herald::model::{Subscription, SubscriptionSpec};
    let (h, panics) = watched(|_| {}).await;
    let mut bystander = Bystander::join(&h).await;
    bystander.publish(&h.api).await;
    let (mallory, _) = tenant_with_key(&h.api, "Mallory").await;
    let rx = Receiver::start().await;
    rx.respond_on("/hostile", 500);
    let sub = Subscription::unchecked(
        "sub_hostile_from_an_old_version".into(),
        mallory.clone(),
        SubscriptionSpec { url: rx.url("/hostile"), ..SubscriptionSpec::default() },
        herald::signing::generate_secret(),
    );
    let mut stored: Value = serde_json::from_slice(&sub.stored()).unwrap();
    stored["rate_limit"] = json!(1e-20);
    stored["max_in_flight"] = json!(0);
    stored["timeout"] = json!("P3650D");
    stored["retry"] = json!({ "policy": "exponential", "initial": "P3650D", "multiplier": 1e300,
        "max_interval": "P3650D", "jitter": 7.5, "max_attempts": 4_294_967_295u64, "max_age": "P3650D" });
    let record = Record { key: Bytes::from(sub.id.clone()), value: Bytes::from(serde_json::to_vec(&stored).unwrap()) };
    h.herald.log().append("herald.subscriptions", vec![record]).await.unwrap();
    until("the hostile subscription is in the catalog", Duration::from_secs(10), || async {
        (h.api.get(&format!("/v1/subscriptions/{}", sub.id)).await.0 == 200).then_some(())
    })
    .await;

    for i in 0..5 {
        let event = json!({ "id": format!("m-{i}"), "type": "T", "tenant": mallory, "data": {} });
        let (status, body) = h.api.post("/v1/events", event).await;
        assert_eq!((status.as_u16(), &body["deliveries"]), (202, &json!(1)), "{body}");
        bystander.publish(&h.api).await;
    }
    // The first attempt goes out; its failure is scheduled (not overflowed), the rest are
    // paced by the clamped rate limit.
    rx.wait_on("/hostile", 1).await;
    until("the hostile subscription's retry scheduled and the rest paced", Duration::from_secs(20), || async {
        let m = scrape(&h.api).await;
        let retried = m.value("herald_retries_scheduled_total", &[]) >= 1.0;
        let paced = m.value("herald_deliveries_deferred_total", &[("reason", "rate_limit")]) >= 1.0;
        (retried && paced).then_some(())
    })
    .await;
    bystander.received_everything().await;
    no_panics(&panics);
}

#[tokio::test]
async fn a_tenant_cannot_borrow_another_tenant_s_oauth_token() {
    let tokens = crate::tls::token_server().await;
    let (receiver, seen) = crate::tls::bearer_receiver(tokens.valid.clone()).await;
    let h = TestHerald::start().await;
    let (acme_id, acme) = tenant_with_key(&h.api, "Acme").await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let credentials = |secret: Option<&str>| {
        let mut auth = json!({ "type": "oauth2", "grant": "client_credentials", "token_url": tokens.url, "client_id": "client-1" });
        if let Some(s) = secret {
            auth["client_secret"] = json!(s);
        }
        auth
    };
    acme.subscribe(json!({ "url": receiver, "auth": credentials(Some("client-secret")) })).await;
    h.api.post("/v1/events", json!({ "id": "acme-1", "type": "T", "tenant": acme_id, "data": {} })).await;
    let log = seen.clone();
    until("Acme's delivery with its token", Duration::from_secs(10), || async {
        (!log.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    assert_eq!(seen.lock().unwrap()[0].1, "Bearer tok-1");

    // Mallory knows Acme's token URL and client id, not its secret; its own receiver records
    // whatever Herald sends it.
    let trap = Receiver::start().await;
    let (status, err) =
        mallory.post("/v1/subscriptions", json!({ "url": trap.url("/trap"), "auth": credentials(None) })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("auth.client_secret")), "{err}");
    for (i, secret) in ["guessed", "client-secret "].into_iter().enumerate() {
        let sub = mallory
            .subscribe(json!({ "url": trap.url(&format!("/trap{i}")), "auth": credentials(Some(secret)) }))
            .await;
        let (status, answer) =
            mallory.post(&format!("/v1/subscriptions/{}/test", sub["id"].as_str().unwrap()), json!({})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivered"], false, "{answer}");
        assert_eq!(answer["outcome"], "auth_error", "{answer}");
    }
    assert!(trap.all().is_empty(), "Acme's token never reaches Mallory's receiver: {:?}", trap.all().len());
    assert_eq!(tokens.issued.load(std::sync::atomic::Ordering::SeqCst), 1, "only Acme was ever issued a token");
}

#[tokio::test]
async fn a_token_endpoint_cannot_make_herald_overflow_with_expires_in() {
    use http::Response;
    use http_body_util::Full;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let token_url = format!("http://{}/token", listener.local_addr().unwrap());
    crate::support::serve_http1(listener, |_req| async {
        let body = r#"{"access_token":"forever","token_type":"Bearer","expires_in":18446744073709551615}"#;
        Response::builder().header("content-type", "application/json").body(Full::new(Bytes::from(body))).unwrap()
    });
    let (h, panics) = watched(|_| {}).await;
    let mut bystander = Bystander::join(&h).await;
    let rx = Receiver::start().await;
    let auth = json!({ "type": "oauth2", "grant": "client_credentials", "token_url": token_url, "client_id": "c", "client_secret": "s" });
    h.api.subscribe(json!({ "url": rx.url("/forever"), "auth": auth })).await;
    for i in 0..3 {
        h.api.post("/v1/events", json!({ "id": format!("f-{i}"), "type": "T", "data": {} })).await;
        bystander.publish(&h.api).await;
    }
    let got = rx.wait_on("/forever", 3).await;
    assert!(got.iter().all(|r| r.header("authorization") == "Bearer forever"));
    bystander.received_everything().await;
    no_panics(&panics);
}

/// The guard sees through every way of writing an internal IPv4 address as IPv6, knows the
/// cloud metadata and benchmarking ranges, and never tells the tenant which address a name
/// resolved to.
#[tokio::test]
async fn internal_addresses_are_refused_however_they_are_written_without_naming_them() {
    let h = TestHerald::start_with(|c| c.network.allow.clear()).await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    for url in [
        "http://[::127.0.0.1]/",                          // IPv4-compatible
        "http://[::ffff:127.0.0.1]/",                     // IPv4-mapped
        "http://[2002:7f00:1::1]/",                       // 6to4 of 127.0.0.1
        "http://[2002:a00:1::1]/",                        // 6to4 of 10.0.0.1
        "http://[2001:0:4136:e378:8000:63bf:f5ff:fffe]/", // Teredo of 10.0.0.1
        "http://[fec0::1]/",                              // site-local
        "http://168.63.129.16/",                          // Azure's metadata and DNS
        "http://169.254.169.254/latest/meta-data/",       // link-local metadata
        "http://198.18.0.1/",                             // benchmarking
        "http://[::1]/",
        "http://0.0.0.0/",
    ] {
        let (status, err) = mallory.post("/v1/subscriptions", json!({ "url": url })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{url}: {err}");
    }
    // A name is resolved when it is used; the answer says it is internal, not where it went.
    let port = Receiver::start().await.url("/").split(':').nth(2).unwrap().split('/').next().unwrap().to_string();
    let sub = mallory.subscribe(json!({ "url": format!("http://localhost:{port}/scan") })).await;
    let (status, answer) =
        mallory.post(&format!("/v1/subscriptions/{}/test", sub["id"].as_str().unwrap()), json!({})).await;
    assert_eq!(
        (status.as_u16(), &answer["delivered"], &answer["outcome"]),
        (200, &json!(false), &json!("refused")),
        "{answer}"
    );
    let text = answer.to_string();
    for leak in ["127.0.0.1", "::1"] {
        assert!(!text.contains(leak), "the answer names the internal address {leak}: {text}");
    }
}

/// lapin's URI parser drops IPv6 literals and falls back to `localhost` with `guest/guest`:
/// Herald must connect to the address it checked, never to its own host.
#[tokio::test]
async fn amqp_to_an_ipv6_broker_never_reaches_herald_s_own_host() {
    let _broker = crate::support::RABBITMQ.lock().await;
    let (_conn, ch) = crate::amqp::channel().await;
    let exchange = format!("sec-ipv6-{}", std::process::id());
    let queue = format!("{exchange}-q");
    crate::amqp::topic(&ch, &exchange, false, &[(&queue, "#")]).await;
    let h = TestHerald::start_with(loopback_closed).await;
    let mut bystander = Bystander::join(&h).await;
    let (mallory_id, mallory) = tenant_with_key(&h.api, "Mallory").await;
    // A public IPv6 address (there is no route to it here), as a literal with and without a
    // port, and a name for Herald's own host (judged when connecting, like every name).
    let uris = [
        "amqp://guest:guest@[2606:4700:4700::1111]:5672/%2f",
        "amqp://guest:guest@[2606:4700:4700::1111]/%2f",
        "amqp://guest:guest@localhost:5672/%2f",
    ];
    for uri in uris {
        let sub = mallory
            .subscribe(json!({ "transport": "amqp", "amqp": { "uri": uri, "exchange": exchange },
                               "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 1 } }))
            .await;
        let (status, answer) =
            mallory.post(&format!("/v1/subscriptions/{}/test", sub["id"].as_str().unwrap()), json!({})).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["delivered"], false, "{uri}: {answer}");
        let text = answer.to_string();
        for leak in ["127.0.0.1", "localhost", "::1"] {
            assert!(!text.contains(leak), "{uri}: the answer names {leak}: {text}");
        }
    }
    let (_, accepted) =
        h.api.post("/v1/events", json!({ "id": "v6-1", "type": "T", "tenant": mallory_id, "data": {} })).await;
    assert_eq!(accepted["deliveries"], uris.len(), "{accepted}");
    bystander.publish(&h.api).await;
    until("every AMQP attempt failed and was dead-lettered", Duration::from_secs(30), || async {
        let (_, dlq) = mallory.get("/v1/dlq").await;
        (dlq["items"].as_array().unwrap().len() == uris.len()).then_some(())
    })
    .await;
    assert!(crate::amqp::take(&ch, &queue).await.is_none(), "nothing was published to the broker on Herald's host");
    bystander.received_everything().await;
}

/// Every label value comes from a fixed set: no method, path or id a client sends becomes a
/// series, so `/metrics` stays the same size whatever the traffic.
#[tokio::test]
async fn metrics_stay_bounded_whatever_methods_and_paths_clients_send() {
    // A process of its own: metrics are per process, and other tests add series meanwhile.
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = crate::support::spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let junk = |i: usize| format!("X{}{}", "M".repeat(i % 7 * 1000), i);
    // Every series these requests may legitimately add exists after a warm-up.
    for i in 0..7 {
        let _ = api.try_raw(&junk(i), &format!("/v1/subscriptions/sub_{i}"), None, None).await;
        let _ = api.try_raw("GET", &format!("/v1/nothing/{i}"), None, Some(TOKEN)).await;
    }
    scrape(&api).await;
    let series = |m: &crate::support::metrics::Scrape| -> std::collections::BTreeSet<String> {
        m.samples()
            .iter()
            .map(|s| format!("{} {:?}", s.metric, s.labels.iter().collect::<std::collections::BTreeMap<_, _>>()))
            .collect()
    };
    let before = series(&scrape(&api).await);
    for i in 7..300 {
        let _ = api.try_raw(&junk(i), &format!("/v1/subscriptions/sub_{i}"), None, None).await;
        let _ = api.try_raw("GET", &format!("/v1/nothing/{i}"), None, Some(TOKEN)).await;
    }
    let after = scrape(&api).await;
    let new: Vec<String> = series(&after).difference(&before).cloned().collect();
    assert!(new.is_empty(), "no new series from methods, paths or ids: {new:?}");
    assert!(!after.text.contains("MMMM") && !after.text.contains("sub_1"), "no client text in labels");
}

#[tokio::test]
async fn a_tenant_s_subscriptions_are_capped_and_the_others_are_not_affected() {
    let h = TestHerald::start_with(|c| c.quotas.subscriptions_per_tenant = 3).await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let (_, acme) = tenant_with_key(&h.api, "Acme").await;
    for i in 0..3 {
        mallory.subscribe(json!({ "url": format!("https://hooks.example.com/m{i}") })).await;
    }
    let (status, err) = mallory.post("/v1/subscriptions", json!({ "url": "https://hooks.example.com/m3" })).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (403, Some("QUOTA_EXCEEDED")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("quotas.subscriptions_per_tenant"), "{err}");
    acme.subscribe(json!({ "url": "https://hooks.example.com/a" })).await;
    let (_, listed) = mallory.get("/v1/subscriptions").await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn the_fan_out_quota_counts_each_subscription_s_own_payload_form() {
    // The first subscription (envelope) carries the data in JavaScript's form, 9 bytes; the
    // two after it (`raw_bytes`) as sent, 8 KB each. Sized from the first alone, 16 KB of
    // records passed a 10 KB quota.
    let h = TestHerald::start_with(|c| c.quotas.fanout_bytes = 10_000).await;
    let (mallory_id, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let rx = Receiver::start().await;
    mallory.subscribe(json!({ "url": rx.url("/env") })).await;
    for i in 0..2 {
        mallory.subscribe(json!({ "url": rx.url(&format!("/raw{i}")), "payload": "raw_bytes" })).await;
    }
    let body = format!(r#"{{"id":"ws","type":"T","tenant":"{mallory_id}","data":{{"pad":1{}}}}}"#, " ".repeat(8000));
    let (status, _, err) = h.api.request("POST", "/v1/events", Some(body.into()), Some(&h.api.token)).await.unwrap();
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{err}");
}

#[tokio::test]
async fn fan_out_tests_and_request_rates_are_limited_per_tenant_with_clear_answers() {
    let h = TestHerald::start_with(|c| {
        c.quotas.fanout_bytes = 10_000;
        c.quotas.tests_per_minute = 2;
        c.api.key_rate_limit = 5.0;
    })
    .await;
    let mut bystander = Bystander::join(&h).await;
    let (mallory_id, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let rx = Receiver::start().await;
    let mut subs = Vec::new();
    for i in 0..3 {
        subs.push(mallory.subscribe(json!({ "url": rx.url(&format!("/m{i}")) })).await);
    }

    // 4 KB to three subscriptions is 12 KB of fan-out: refused whole, nothing appended.
    let big = json!({ "id": "big", "type": "T", "tenant": mallory_id, "data": { "pad": "p".repeat(4000) } });
    let (status, err) = h.api.post("/v1/events", big).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{err}");
    // What each delivery record copies counts, `changes` included, not only `data`.
    let changed = json!({ "id": "changed", "type": "T", "tenant": mallory_id, "data": {}, "changes": [{ "pad": "p".repeat(4000) }] });
    let (status, err) = h.api.post("/v1/events", changed).await;
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (413, Some("QUOTA_EXCEEDED")), "{err}");
    let small = json!({ "id": "small", "type": "T", "tenant": mallory_id, "data": { "pad": "p".repeat(1000) } });
    assert_eq!(h.api.post("/v1/events", small).await.0, 202);
    for i in 0..3 {
        let got = rx.wait_on(&format!("/m{i}"), 1).await;
        assert!(got.iter().all(|r| r.header("webhook-id") == "small"), "the refused event was not appended");
    }

    // `/test` sends a real request: two a minute per subscription, then 429 with Retry-After.
    let test_path = format!("/v1/subscriptions/{}/test", subs[0]["id"].as_str().unwrap());
    for _ in 0..2 {
        assert_eq!(mallory.post(&test_path, json!({})).await.0, 200);
    }
    let (status, headers, err) =
        mallory.request("POST", &test_path, Some("{}".into()), Some(&mallory.token)).await.unwrap();
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (429, Some("RATE_LIMITED")), "{err}");
    let wait: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "Retry-After {wait}");

    // The key's request rate: 5 a second (10 at once), then 429; the admin is not limited.
    let mut throttled = None;
    for _ in 0..40 {
        let (status, headers, _) =
            mallory.request("GET", "/v1/subscriptions", None, Some(&mallory.token)).await.unwrap();
        if status == 429 {
            throttled = Some(headers["retry-after"].to_str().unwrap().to_string());
            break;
        }
    }
    assert!(throttled.is_some(), "the key was throttled");
    for _ in 0..40 {
        assert_eq!(h.api.get("/v1/subscriptions").await.0, 200);
    }
    let m = scrape(&h.api).await;
    assert!(m.value("herald_api_throttled_total", &[("reason", "key_rate")]) >= 1.0);
    assert!(m.value("herald_api_throttled_total", &[("reason", "tests")]) >= 1.0);
    bystander.publish(&h.api).await;
    bystander.received_everything().await;
}

/// Reads from `stream` until `done` holds for what arrived or the server closes it; `None` if
/// neither happens within `within`.
async fn read_until(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
    done: impl Fn(&str) -> bool,
) -> Option<String> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if done(&String::from_utf8_lossy(&got)) {
                return;
            }
        }
    })
    .await;
    read.ok().map(|_| String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test]
async fn slow_clients_cannot_hold_the_api() {
    let h = TestHerald::start_with(|c| {
        c.api.header_read_timeout = Duration::from_millis(500).into();
        c.api.request_timeout = Duration::from_millis(800).into();
    })
    .await;
    let addr = h.herald.addr;
    // Slowloris: headers that never end are cut off.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: herald\r\nX-Slow: ").await.unwrap();
    assert!(read_until(&mut slow, Duration::from_secs(10), |_| false).await.is_some(), "a slow header is cut off");

    // A body that never ends gets 408.
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v1/subscriptions HTTP/1.1\r\nHost: herald\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"url\""
    );
    trickle.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut trickle, Duration::from_secs(10), |got| got.contains("\r\n\r\n")).await;
    let answer = answer.expect("an answer");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(h.api.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_flood_of_connections_is_capped_and_the_api_stays_up() {
    let h = TestHerald::start_with(|c| c.api.max_connections = 8).await;
    let addr = h.herald.addr;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Over the limit: closed unanswered at once (an accepted connection would be held for the
    // 10 s header timeout).
    let mut extra = tokio::net::TcpStream::connect(addr).await.unwrap();
    let closed = read_until(&mut extra, Duration::from_secs(5), |_| false).await;
    assert_eq!(closed.as_deref(), Some(""), "closed unanswered");
    drop(held);
    until("the API serves again", Duration::from_secs(10), || async {
        matches!(h.api.try_raw("GET", "/healthz", None, None).await, Ok((s, _)) if s == 200).then_some(())
    })
    .await;
    assert!(scrape(&h.api).await.value("herald_api_connections_refused_total", &[]) >= 1.0);
}

#[tokio::test]
async fn edge_forwards_need_the_forward_secret_not_the_admin_token() {
    let h = TestHerald::start().await;
    let body = Some(Bytes::from_static(b"{}"));
    let (status, err) = h.api.raw("POST", "/v1/edge/forward", body.clone(), Some(TOKEN)).await;
    assert_eq!(status, 401, "{err}");
    let (status, _) = h.api.raw("POST", "/v1/edge/forward", body, None).await;
    assert_eq!(status, 401);
}

/// A forward (another process's attempt through an agent connected here) goes only to the
/// device its subscription names: not one tenant's delivery, secrets and all, to another
/// tenant's agent, whoever holds the forward secret.
#[tokio::test]
async fn an_edge_forward_goes_only_to_the_subscription_s_own_device() {
    let secret = "f".repeat(32);
    let h = TestHerald::start_with(|c| c.edge.forward_secret = Some("f".repeat(32))).await;
    let (_, acme) = tenant_with_key(&h.api, "Acme").await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let (_, acme_device) = acme.post("/v1/edge-devices", json!({ "name": "acme office" })).await;
    let (_, mallory_device) = mallory.post("/v1/edge-devices", json!({ "name": "mallory office" })).await;
    let sub =
        acme.subscribe(json!({ "url": "http://10.1.2.3/hook", "via_edge": acme_device["id"].as_str().unwrap() })).await;
    let forward = json!({
        "device": mallory_device["id"].as_str().unwrap(),
        "subscription": sub["id"].as_str().unwrap(),
        "delivery": "AAAA",
        "pending_retries": 0,
        "timeout_ms": 1000,
    });
    let body = Some(Bytes::from(forward.to_string()));
    let (status, err) = h.api.raw("POST", "/v1/edge/forward", body, Some(&secret)).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("device")), "{err}");
}

/// Every file under `dir`, with its mode; directories too.
fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, u32, bool)>) {
    use std::os::unix::fs::PermissionsExt;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::metadata(&path).unwrap();
        out.push((path.clone(), meta.permissions().mode() & 0o777, meta.is_dir()));
        if meta.is_dir() {
            walk(&path, out);
        }
    }
}

/// Secrets are sealed in the catalog with the operator's key, a rotated key still opens what
/// the old one sealed (and Herald reseals it), and every file Herald writes is its user's alone.
#[tokio::test]
async fn secrets_are_sealed_at_rest_survive_a_key_rotation_and_files_are_private() {
    use base64::Engine;
    let b64 = |byte: u8| base64::engine::general_purpose::STANDARD.encode([byte; 32]);
    let (old_key, new_key) = (b64(7), b64(9));
    let rx = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let spawn = |env: &[(&str, &str)]| crate::support::spawn_herald_with(&data, env);

    let (mut herald, addr) = spawn(&[("HERALD_SECRET_KEY", &old_key)]);
    let api = Api::new(addr, TOKEN);
    let sub = api
        .subscribe(json!({ "url": rx.url("/sealed"), "headers": { "X-Api-Key": "header-secret-2" },
                           "auth": { "type": "basic", "username": "u", "password": "basic-secret-1" } }))
        .await;
    let secret = sub["secret"].as_str().unwrap().to_string();
    let verify = crate::support::verify::standard(&secret);
    let got = deliver_sealed(&api, &rx, "sealed-1").await;
    assert!(verify(&got) && got.header("x-api-key") == "header-secret-2");
    herald.kill();

    let mut files = Vec::new();
    walk(&data, &mut files);
    assert!(files.iter().any(|(p, _, _)| p.extension().is_some_and(|e| e == "log")), "segments were written");
    let signing_key = secret.trim_start_matches("whsec_");
    for (path, mode, is_dir) in &files {
        assert_eq!(*mode, if *is_dir { 0o700 } else { 0o600 }, "{}: {mode:o}", path.display());
        if !is_dir {
            let bytes = String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
            for plain in [signing_key, "basic-secret-1", "header-secret-2"] {
                assert!(!bytes.contains(plain), "{} holds a secret in clear", path.display());
            }
        }
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&data).unwrap().permissions().mode() & 0o777, 0o700);

    // Rotation: the new key seals, the old one still opens; Herald reseals at start, so the
    // old key can then be dropped.
    let (mut herald, addr) = spawn(&[("HERALD_SECRET_KEY", &new_key), ("HERALD_PREVIOUS_SECRET_KEYS", &old_key)]);
    let api = Api::new(addr, TOKEN);
    let got = deliver_sealed(&api, &rx, "sealed-2").await;
    assert!(verify(&got) && got.header("x-api-key") == "header-secret-2");
    herald.kill();
    let (mut herald, addr) = spawn(&[("HERALD_SECRET_KEY", &new_key)]);
    let api = Api::new(addr, TOKEN);
    let got = deliver_sealed(&api, &rx, "sealed-3").await;
    assert!(verify(&got) && got.header("authorization") == "Basic dTpiYXNpYy1zZWNyZXQtMQ==");
    herald.kill();

    // Started without the key, or with another one, Herald cannot open what is sealed: it
    // refuses to start, naming the setting — it started, each such subscription unreadable,
    // and answered publishes `202` with none of their deliveries made.
    for key in [None, Some(b64(3))] {
        let mut serve = tokio::process::Command::from(crate::support::serve_command(&data));
        serve.kill_on_drop(true);
        if let Some(key) = &key {
            serve.env("HERALD_SECRET_KEY", key);
        }
        let out = tokio::time::timeout(Duration::from_secs(20), serve.output()).await;
        let out = out.unwrap_or_else(|_| panic!("started with the key {key:?}")).unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains("secret_key"), "{key:?}: {said}");
    }
    // A key lost for good: told so, Herald deletes those subscriptions at start — and then
    // starts without being told.
    let (mut herald, addr) = spawn(&[("HERALD_SECRET_KEY_LOST", "true")]);
    let (_, listed) = Api::new(addr, TOKEN).get("/v1/subscriptions").await;
    assert_eq!(listed["items"], json!([]), "{listed}");
    herald.kill();
    let (_herald, addr) = spawn(&[]);
    assert_eq!(Api::new(addr, TOKEN).get("/healthz").await.0, 200);
}

/// Publishes event `id` and waits for it at the receiver's `/sealed`.
async fn deliver_sealed(api: &Api, rx: &Receiver, id: &str) -> crate::support::Received {
    let (status, body) = api.post("/v1/events", json!({ "id": id, "type": "T", "data": {} })).await;
    assert_eq!(status, 202, "{body}");
    until(id, Duration::from_secs(20), || async { rx.on("/sealed").into_iter().find(|r| r.header("webhook-id") == id) })
        .await
}

/// Without a key Herald still runs, and says once at start that secrets are stored as text.
#[tokio::test]
async fn without_a_secret_key_herald_says_so_once() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = crate::support::serve_command(dir.path())
        .env("RUST_LOG", "info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut guard = crate::support::ChildGuard(child);
    let started = stdout.lines().map_while(Result::ok).any(|l| l.contains("listening on"));
    assert!(started, "Herald started");
    guard.kill();
    let log: Vec<String> = std::io::BufReader::new(stderr).lines().map_while(Result::ok).collect();
    let warnings = log.iter().filter(|l| l.contains("no secret key")).count();
    assert_eq!(warnings, 1, "{log:?}");
}

/// `RUST_LOG` set but empty (common in env files) is as if unset, and one with a level
/// misspelt (`warning`) is refused naming it: the first turned off every log line but lapin's
/// errors, the second every line but those of a target named "warning" — the warnings above
/// among them, unseen.
#[tokio::test]
async fn a_rust_log_that_names_no_level_does_not_silence_herald() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |rust_log: &str| {
        let mut serve = tokio::process::Command::from(crate::support::serve_command(dir.path()));
        serve.env("RUST_LOG", rust_log);
        serve.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).kill_on_drop(true);
        serve.spawn().unwrap()
    };
    let out = tokio::time::timeout(Duration::from_secs(20), serve("warning").wait_with_output()).await;
    let out = out.expect("refused at once").unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("RUST_LOG"), "{said}");
    // Empty, and a bare target (legitimate: everything of that target) both log the warning.
    for rust_log in ["", "herald"] {
        let mut child = serve(rust_log);
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stderr.take().unwrap()));
        let warned = tokio::time::timeout(Duration::from_secs(20), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("no secret key") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(warned, Ok(true), "RUST_LOG={rust_log:?}: the warning is logged");
    }
}

/// Connections that never start a request — silent, or half an HTTP/2 preface, or a whole one
/// and then nothing — are closed after `api.header_read_timeout` like a slow header, so no
/// one, token or not, can hold every connection slot.
#[tokio::test]
async fn connections_that_never_start_a_request_cannot_hold_the_api() {
    let h = TestHerald::start_with(|c| {
        c.api.max_connections = 3;
        c.api.header_read_timeout = Duration::from_millis(500).into();
    })
    .await;
    let addr = h.herald.addr;
    let mut held = Vec::new();
    for opening in [&b""[..], b"PRI * HTTP/2.0\r\n", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(opening).await.unwrap();
        held.push(stream);
    }
    until("the API serves again while they stay connected", Duration::from_secs(10), || async {
        matches!(h.api.try_raw("GET", "/healthz", None, None).await, Ok((s, _)) if s == 200).then_some(())
    })
    .await;
    for stream in &mut held {
        assert!(read_until(stream, Duration::from_secs(5), |_| false).await.is_some(), "closed by Herald");
    }
}

/// A page of subscriptions is bounded in bytes as well as in count: a tenant's 500
/// subscriptions of a quarter of a megabyte each (a thousand long event types) made one
/// list answer of over 100 MB, built and held at once per request.
#[tokio::test]
async fn a_page_of_subscriptions_is_bounded_in_bytes() {
    let h = TestHerald::start().await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let events: Vec<String> = (0..1000).map(|i| format!("{i:04}.{}", "e".repeat(240))).collect();
    for i in 0..24 {
        let (status, body) = mallory
            .post("/v1/subscriptions", json!({ "url": format!("https://hooks.example.com/{i}"), "events": events }))
            .await;
        assert_eq!(status, 201, "{body}");
    }
    let (mut seen, mut cursor, mut pages) = (std::collections::HashSet::new(), None::<String>, 0);
    loop {
        let path = match &cursor {
            Some(c) => format!("/v1/subscriptions?limit=500&cursor={c}"),
            None => "/v1/subscriptions?limit=500".to_string(),
        };
        let (status, page) = mallory.get(&path).await;
        assert_eq!(status, 200, "{page}");
        let bytes = page.to_string().len();
        assert!(bytes <= 5 << 20, "a page of {bytes} bytes");
        pages += 1;
        for item in page["items"].as_array().unwrap() {
            assert!(seen.insert(item["id"].as_str().unwrap().to_string()), "listed twice: {}", item["id"]);
        }
        match page["next"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 24, "every subscription listed once");
    assert!(pages > 1, "cut into pages by size");
}

/// Clients that send requests and never read the answers (their receive window shut): the
/// answers' writes stall, and nothing bounded them, so such clients held every connection
/// slot for good, token or not. A write that makes no progress for `api.request_timeout`
/// ends the connection.
#[tokio::test]
async fn clients_that_never_read_their_answers_cannot_hold_the_api() {
    let h = TestHerald::start_with(|c| {
        c.api.max_connections = 2;
        c.api.header_read_timeout = Duration::from_millis(500).into();
        c.api.request_timeout = Duration::from_millis(800).into();
    })
    .await;
    let addr = h.herald.addr;
    let mut held = Vec::new();
    let pipelined = "GET /v1/openapi.json HTTP/1.1\r\nhost: herald\r\n\r\n".repeat(200);
    for _ in 0..2 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut stream = socket.connect(addr).await.unwrap();
        stream.write_all(pipelined.as_bytes()).await.unwrap();
        held.push(stream);
    }
    until("the API serves again while they stay connected", Duration::from_secs(20), || async {
        matches!(h.api.try_raw("GET", "/healthz", None, None).await, Ok((s, _)) if s == 200).then_some(())
    })
    .await;
    drop(held);
}

/// A token URL whose name resolves into Herald's own network is refused by the guard when
/// the token is fetched, and the attempt says `refused` — not `auth`, as if the credentials
/// had been turned down.
#[tokio::test]
async fn a_token_url_refused_by_the_guard_is_a_refused_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (_herald, addr) = crate::support::spawn_herald_with(dir.path(), &[("HERALD_NETWORK_ALLOW", "")]);
    let api = Api::new(addr, TOKEN);
    let auth = json!({ "type": "oauth2", "grant": "client_credentials", "token_url": "http://localhost:9/token", "client_id": "c", "client_secret": "s" });
    let (status, sub) = api
        .post(
            "/v1/subscriptions",
            json!({ "url": "https://hooks.example.com/x", "auth": auth, "retry": { "policy": "fixed", "interval": "1s", "max_attempts": 1 } }),
        )
        .await;
    assert_eq!(status, 201, "{sub}");
    api.post("/v1/events", json!({ "type": "T", "data": {} })).await;
    until("the attempt counted as refused", Duration::from_secs(20), || async {
        let m = scrape(&api).await;
        let refused = m.value("herald_attempts_total", &[("transport", "webhook"), ("outcome", "refused")]);
        let auth = m.value("herald_attempts_total", &[("transport", "webhook"), ("outcome", "auth_error")]);
        assert_eq!(auth, 0.0, "counted as auth_error");
        (refused == 1.0).then_some(())
    })
    .await;
}

/// Only publishing takes bodies of up to 16 MiB (a batch of events): every other route is
/// refused past 4 MiB before its body is read whole and parsed (a 16 MiB array of zeros made
/// a quarter of a gigabyte of JSON values on a subscription create).
#[tokio::test]
async fn bodies_other_than_publishing_are_bounded_to_a_few_mib() {
    let h = TestHerald::start().await;
    let (_, mallory) = tenant_with_key(&h.api, "Mallory").await;
    let big = format!("{{\"url\":\"https://hooks.example.com/x\",\"events\":[{}0]}}", "0,".repeat(3 << 20));
    let (status, _, err) =
        mallory.request("POST", "/v1/subscriptions", Some(big.into()), Some(&mallory.token)).await.unwrap();
    assert_eq!((status.as_u16(), err["error"]["code"].as_str()), (413, Some("PAYLOAD_TOO_LARGE")), "{err}");
    // A batch of events may still be large.
    let events: Vec<Value> = (0..6)
        .map(|i| json!({ "id": format!("big-{i}"), "type": "T", "data": { "pad": "p".repeat(900 << 10) } }))
        .collect();
    assert_eq!(h.api.post("/v1/events/batch", json!(events)).await.0, 202);
}

/// A static webhook keeps its id (`static-<name>`) when the config file moves it to another
/// tenant: the first tenant's retries, and its dead letters replayed by id, then went to the
/// second tenant's endpoint, signed with its secret, and that endpoint's answers went into the
/// first tenant's history. A delivery is made only to a subscription of its own tenant; one
/// whose subscription now belongs to another is dropped, as for a deleted subscription, and a
/// replay of its dead letter is refused as one of a deleted subscription.
#[tokio::test]
async fn a_static_webhook_moved_to_another_tenant_gets_none_of_the_first_tenant_s_deliveries() {
    use crate::support::Behaviour;
    let rx = Receiver::start().await;
    rx.behave("/acme", Behaviour::RetryAfter { status: 503, secs: 1 });
    rx.respond_on("/acme-gone", 410);
    rx.respond_on("/globex-crm", 410);
    let webhook = |name: &str, tenant: &str, url: String| -> herald::config::StaticWebhook {
        serde_json::from_value(json!({ "name": name, "tenant": tenant, "endpoint": url })).unwrap()
    };
    let acme = [webhook("erp", "acme", rx.url("/acme")), webhook("crm", "acme", rx.url("/acme-gone"))];
    let h = TestHerald::start_with(|c| c.webhooks.extend(acme)).await;
    let (status, body) =
        h.api.post("/v1/events", json!({ "id": "acme-1", "tenant": "acme", "type": "T", "data": {} })).await;
    assert_eq!((status.as_u16(), body["deliveries"].as_u64()), (202, Some(2)), "{body}");
    rx.wait_on("/acme", 1).await;
    let parked = until("crm's dead letter", Duration::from_secs(20), || async {
        let (_, page) = h.api.get("/v1/dlq?subscription=static-crm").await;
        page["items"][0]["id"].as_str().map(str::to_string)
    })
    .await;

    let before = chrono::Utc::now() - chrono::Duration::minutes(5);
    let globex = [webhook("erp", "globex", rx.url("/globex")), webhook("crm", "globex", rx.url("/globex-crm"))];
    let h = h.restart_with(|c| c.webhooks = globex.to_vec()).await;
    let (_, sub) = h.api.get("/v1/subscriptions/static-erp").await;
    assert_eq!(sub["tenant"], "globex", "{sub}");
    let (status, report) = h.api.post("/v1/dlq/replay", json!({ "ids": [parked] })).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["skipped"][0]["reason"], "subscription_deleted", "{report}");
    let state = until("acme's retry settled", Duration::from_secs(30), || async {
        let (_, event) = h.api.get("/v1/events/acme-1?tenant=acme").await;
        let deliveries = event["deliveries"].as_array().cloned().unwrap_or_default();
        let erp = deliveries.iter().find(|d| d["subscription"] == "static-erp")?;
        let state = erp["state"].as_str().unwrap_or("").to_string();
        let settled = !["retrying", "pending", ""].contains(&state.as_str());
        (settled || !rx.on("/globex").is_empty()).then_some(state)
    })
    .await;
    let globex_got = rx.on("/globex").len() + rx.on("/globex-crm").len();
    assert_eq!(globex_got, 0, "acme's event reached globex's endpoints");
    assert_eq!(state, "dropped");
    // A recover of the subscription, now globex's, finds none of acme's events to send.
    let since = before.to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let (status, recovered) =
        h.api.post("/v1/subscriptions/static-crm/recover", json!({ "since": since, "all": true })).await;
    assert_eq!((status.as_u16(), recovered["queued"].as_u64()), (202, Some(0)), "{recovered}");
    // Globex's own event of the same id, dead-lettered by the same subscription, is an entry
    // of its own: the two had one id (the tenant was not in it), and one listed for both.
    let (status, _) =
        h.api.post("/v1/events", json!({ "id": "acme-1", "tenant": "globex", "type": "T", "data": {} })).await;
    assert_eq!(status, 202);
    let listed = until("globex's dead letter beside acme's", Duration::from_secs(20), || async {
        let (_, page) = h.api.get("/v1/dlq?subscription=static-crm").await;
        let items = page["items"].as_array().cloned().unwrap_or_default();
        items.iter().any(|i| i["tenant"] == "globex").then_some(items)
    })
    .await;
    let tenants: HashSet<&str> = listed.iter().filter_map(|i| i["tenant"].as_str()).collect();
    assert_eq!(tenants, HashSet::from(["acme", "globex"]), "{listed:?}");
}

/// Connections without a token cannot take every file descriptor: the API's connections are
/// fitted within the descriptors free when Herald starts (half of them), so those past that
/// are closed at once — with the default 4,096 over a limit of 1,024, idle ones took every
/// descriptor, and every tenant's new webhook connections and the log's next segment failed.
/// Descriptors already open count: Herald started with 120 of its 256 taken (left by a parent)
/// kept half the limit for the API, ran out before the API's share was full, and left every
/// connection past it waiting unaccepted, none closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_without_a_token_cannot_take_every_file_descriptor() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    // This process opens 200 connections beside every other test's descriptors: up to its
    // hard limit, or some fail to connect.
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    // Idle connections are not closed for their silence within the test (its own timeout).
    let env = [("HERALD_API_HEADER_READ_TIMEOUT", "120s")];
    let (_herald, addr) = crate::support::spawn_herald_with_files(dir.path(), &env, 256, 120);
    // Each connection waits for its end: those past the API's share (about 60 of the 130 or
    // so left) are closed by Herald at once.
    let closed = Arc::new(AtomicUsize::new(0));
    let mut idle = Vec::new();
    for _ in 0..200 {
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else { continue };
        let closed = closed.clone();
        idle.push(tokio::spawn(async move {
            let mut byte = [0u8; 1];
            if let Ok(0) = s.read(&mut byte).await {
                closed.fetch_add(1, Ordering::SeqCst);
            }
            std::future::pending::<()>().await; // held open until aborted
        }));
    }
    assert!(idle.len() >= 190, "{} of 200 connections made", idle.len());
    until("connections past the API's share closed", Duration::from_secs(30), || async {
        (closed.load(Ordering::SeqCst) >= 100).then_some(())
    })
    .await;
    for task in idle {
        task.abort();
    }
    let api = Api::new(addr, TOKEN);
    until("the API answers again", Duration::from_secs(20), || async {
        matches!(api.try_raw("GET", "/healthz", None, None).await, Ok((s, _)) if s == 200).then_some(())
    })
    .await;
}

/// A portal link is handed to a tenant (and whoever it forwards it to); its tag was keyed by
/// the admin token alone, so its holder could test guesses at the admin token offline, two
/// HMACs a guess. With a secret key set, the link's key takes that random key too: the admin
/// token alone no longer checks a link, and the link still works.
///
/// A process of its own: the secret key is installed process-wide, and installed in the
/// tests' process it sealed the secrets of tests running beside it, which then could not
/// open them after a restart without it.
#[tokio::test]
async fn a_portal_link_cannot_be_used_to_test_guesses_at_the_admin_token() {
    use base64::Engine;
    let sealing = base64::engine::general_purpose::STANDARD.encode([5u8; 32]);
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = crate::support::spawn_herald_with(dir.path(), &[("HERALD_SECRET_KEY", &sealing)]);
    let api = Api::new(addr, TOKEN);
    let (acme, _) = crate::support::tenant_with_key(&api, "Acme").await;
    let (status, link) = api.post(&format!("/v1/tenants/{acme}/portal"), json!({})).await;
    assert_eq!(status, 201, "{link}");
    let token = link["token"].as_str().unwrap();
    let guessed = herald::api::portal::PortalKey::derive(TOKEN, None);
    assert_eq!(guessed.verify(token, herald::model::now_ms()), None, "the admin token alone checks the link");
    let mut portal = api.clone();
    portal.token = token.to_string();
    assert_eq!(portal.get("/v1/subscriptions").await.0, 200, "the link works");
}

/// A secret's sealed form (in the catalog's files, a backup, Kafka's `subscriptions` topic —
/// what sealing keeps from whoever reads them) is not a secret the API takes: sent back in a
/// header or as a signing secret it was opened with the operator's key, and the plain text
/// delivered to the sender's own endpoint or shown in the create's answer — any tenant key
/// decrypted any tenant's secrets. Refused, the field named.
#[tokio::test]
async fn a_sealed_secret_sent_to_the_api_is_refused_not_opened() {
    use base64::Engine;
    let sealing = base64::engine::general_purpose::STANDARD.encode([6u8; 32]);
    let dir = tempfile::tempdir().unwrap();
    let (_child, addr) = crate::support::spawn_herald_with(dir.path(), &[("HERALD_SECRET_KEY", &sealing)]);
    let admin = Api::new(addr, TOKEN);
    let (_, victim) = crate::support::tenant_with_key(&admin, "Victim").await;
    let (_, thief) = crate::support::tenant_with_key(&admin, "Thief").await;
    let (status, made) = victim
        .post(
            "/v1/subscriptions",
            json!({ "url": "https://victim.example/hook", "headers": { "X-Pass": "victim-s3cret" } }),
        )
        .await;
    assert_eq!(status, 201, "{made}");
    let sealed = until("the sealed secrets on disk", Duration::from_secs(10), || async {
        let mut found = Vec::new();
        let (mut dirs, prefix) = (vec![dir.path().to_path_buf()], b"sealed:v1:");
        while let Some(d) = dirs.pop() {
            for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                    continue;
                }
                let bytes = std::fs::read(&path).unwrap_or_default();
                for at in (0..bytes.len()).filter(|&i| bytes[i..].starts_with(prefix)) {
                    let b64 = |c: &u8| c.is_ascii_alphanumeric() || b"+/=".contains(c);
                    let len = prefix.len() + bytes[at + prefix.len()..].iter().take_while(|c| b64(c)).count();
                    found.push(String::from_utf8_lossy(&bytes[at..at + len]).into_owned());
                }
            }
        }
        (!found.is_empty()).then_some(found)
    })
    .await;
    for blob in &sealed {
        let url = "https://thief.example/hook";
        let (status, err) = thief.post("/v1/subscriptions", json!({ "url": url, "headers": { "X-Leak": blob } })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("headers.X-Leak")), "{err}");
        let (status, err) = thief.post("/v1/subscriptions", json!({ "url": url, "secret": blob })).await;
        assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("secret")), "{err}");
        assert!(!err.to_string().contains("victim-s3cret"), "{err}");
    }
}

/// `network.deny` refuses addresses the special ranges do not cover — the operator's own
/// public ones, such as a dual-stack host's global IPv6 address — whatever `network.allow`
/// says: an IP literal when the subscription is made, a name by what it resolves to when the
/// attempt is made (it reaches nothing).
#[tokio::test]
async fn denied_ranges_are_refused_at_creation_and_at_connect() {
    let h = TestHerald::start_with(|c| c.network.deny = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let rx = Receiver::start().await;
    let literal = rx.url("/denied");
    assert!(literal.contains("127.0.0.1"), "{literal}");
    let (status, err) = h.api.post("/v1/subscriptions", json!({ "url": literal })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("url")), "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("network.deny"), "{err}");
    let named = literal.replace("127.0.0.1", "localhost");
    let once = json!({ "policy": "fixed", "interval": "1s", "max_attempts": 1 });
    h.api.subscribe(json!({ "url": named, "retry": once })).await;
    h.api.post("/v1/events", json!({ "id": "to-denied", "type": "T", "data": {} })).await;
    let api = h.api.clone();
    let attempt = until("the attempt on record", Duration::from_secs(15), || async {
        let (_, page) = api.get("/v1/attempts?event=to-denied").await;
        page["items"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(attempt["outcome"], "refused", "{attempt}");
    assert!(rx.on("/denied").is_empty(), "nothing reached the denied address");
}

/// A configured admin token retires the one a first start generated and stored: it was left
/// in the data directory, and a later start whose configuration no longer set one (a unit file
/// or compose change) read it back — the leaked token a rotation had replaced was admin again.
#[tokio::test]
async fn a_configured_admin_token_retires_the_stored_one() {
    use herald::server::TokenSource;
    if crate::support::on_kafka() {
        return; // the token lives in the data directory, the same on both backends
    }
    let h = TestHerald::start_with(|c| c.admin_token = None).await;
    let leaked = h.herald.admin_token.clone();
    assert_eq!(h.herald.token_source, TokenSource::Generated);
    let h = h.restart_with(|c| c.admin_token = Some(TOKEN.into())).await;
    assert_eq!(h.herald.token_source, TokenSource::Configured);
    let h = h.restart_with(|c| c.admin_token = None).await;
    assert_ne!(h.herald.admin_token, leaked, "the rotated-away token is admin again");
    assert_eq!(h.herald.token_source, TokenSource::Generated, "a new token, shown");
    let (status, _) = h.api.raw("GET", "/v1/subscriptions", None, Some(&leaked)).await;
    assert_eq!(status, 401);
    let retired = std::fs::read_to_string(h.dir.path().join("admin-token.retired")).unwrap();
    assert_eq!(retired.trim(), leaked, "kept for whoever still reads it");
}

/// A first start that fails after the admin token is made (here for two of the file's
/// webhooks sharing a name) leaves no token behind: the start that succeeds makes it and is
/// the one to say so. Before, the failed start stored it unshown, every later start read it
/// back as stored, and nobody was ever shown the token the data directory was locked with.
#[tokio::test]
async fn a_first_start_that_fails_leaves_the_admin_token_to_the_one_that_succeeds() {
    use herald::server::{Extras, TokenSource};
    if crate::support::on_kafka() {
        return; // the token lives in the data directory, the same on both backends
    }
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::config(dir.path());
    config.admin_token = None;
    let webhook: herald::config::StaticWebhook =
        serde_json::from_value(json!({ "name": "erp", "endpoint": "http://127.0.0.1:9/a" })).unwrap();
    let mut twice = config.clone();
    twice.webhooks = vec![webhook.clone(), webhook];
    assert!(herald::server::start_with(twice, Extras::default()).await.is_err(), "two webhooks named erp");
    let herald = herald::server::start_with(config, Extras::default()).await.expect("started");
    assert_eq!(herald.token_source, TokenSource::Generated, "the start that succeeds shows the token");
    let stored = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    assert_eq!(stored, herald.admin_token);
    herald.stop().await;
}
