//! Herald Console and the tenant portal: the API they stand on (portal links, the tenant list,
//! subscription health, devices' connection state), the pages' security headers, and the whole
//! console driven in Debian's chromium by Playwright (`engine/tests/browser/console.mjs`).

use crate::support::{tenant_with_key, until, Receiver, TestHerald, TOKEN};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[tokio::test]
async fn portal_links_act_as_their_tenant_and_nothing_more() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let (acme, acme_api) = tenant_with_key(&h.api, "Acme").await;
    let (_, other_api) = tenant_with_key(&h.api, "Other").await;
    let mine = acme_api.subscribe(json!({ "url": rx.url("/acme") })).await;
    let theirs = other_api.subscribe(json!({ "url": rx.url("/other") })).await;

    let (status, link) = h.api.post(&format!("/v1/tenants/{acme}/portal"), json!({})).await;
    assert_eq!(status, 201, "{link}");
    let url = link["url"].as_str().unwrap();
    let token = link["token"].as_str().unwrap();
    assert!(url.starts_with(&h.api.base) && url.ends_with(&format!("/portal#token={token}")), "{url}");
    assert!(!url.contains(&acme_api.token) && !url.contains(TOKEN), "the link carries no API key");
    assert!(link["expires_at"].as_str().unwrap().ends_with('Z'));

    let mut portal = h.api.clone();
    portal.token = token.to_string();
    let (status, subs) = portal.get("/v1/subscriptions").await;
    assert_eq!(status, 200);
    let ids: Vec<_> = subs["items"].as_array().unwrap().iter().map(|s| s["id"].clone()).collect();
    assert_eq!(ids, vec![mine["id"].clone()], "only its own tenant's");
    let (status, _) = portal.get(&format!("/v1/subscriptions/{}", theirs["id"].as_str().unwrap())).await;
    assert_eq!(status, 404, "another tenant's id is not found");
    for (method, path) in [("GET", "/v1/tenants".to_string()), ("POST", format!("/v1/tenants/{acme}/keys"))] {
        let (status, body) = portal.raw(method, &path, None, Some(token)).await;
        assert_eq!(status, 403, "{method} {path}: {body}");
    }
    let (status, _) = portal.post(&format!("/v1/tenants/{acme}/portal"), json!({})).await;
    assert_eq!(status, 403, "a portal link cannot mint links");

    // Altered or foreign links are refused.
    let tampered = token.replacen(&acme, "default", 1);
    let (status, _) = portal.raw("GET", "/v1/subscriptions", None, Some(&tampered)).await;
    assert_eq!(status, 401);
    let (status, err) = h.api.post(&format!("/v1/tenants/{acme}/portal"), json!({ "ttl": "10s" })).await;
    assert_eq!((status.as_u16(), err["error"]["field"].as_str()), (400, Some("ttl")), "{err}");
    let (status, _) = h.api.post("/v1/tenants/ten_nobody/portal", json!({})).await;
    assert_eq!(status, 404);
    let (status, err) = h.api.post(&format!("/v1/tenants/{acme}/portal"), json!({ "ttl": "2h", "x": 1 })).await;
    assert_eq!(status, 400, "{err}");
    let (status, link) = h.api.post(&format!("/v1/tenants/{acme}/portal"), json!({ "ttl": "2h" })).await;
    assert_eq!(status, 201, "{link}");

    // Behind a proxy that ends TLS (no `api.public_url` set), the link is https: an http link
    // to the same host sent the token to whoever answers plain HTTP on the tenant's network.
    let path = format!("/v1/tenants/{acme}/portal");
    for proxied in [("x-forwarded-proto", "https"), ("forwarded", "for=192.0.2.60;proto=https;by=203.0.113.43")] {
        let (status, _, link) =
            h.api.request_with("POST", &path, Some("{}".into()), Some(TOKEN), &[proxied]).await.unwrap();
        assert_eq!(status, 201, "{link}");
        assert!(link["url"].as_str().unwrap().starts_with("https://"), "{proxied:?}: {link}");
    }
}

/// A tenant's portal links are revoked at once, all of them, without touching another
/// tenant's or the admin token: a link pasted where it should not be worked for its whole
/// lifetime (a week at most), and only rotating the admin token or the secret key — every
/// tenant's links and every automation — ended it.
#[tokio::test]
async fn a_tenant_s_portal_links_are_revoked_together_and_stay_revoked() {
    let h = TestHerald::start().await;
    let (acme, acme_api) = tenant_with_key(&h.api, "Acme").await;
    let (other, _) = tenant_with_key(&h.api, "Other").await;
    let link = |tenant: String| {
        let api = h.api.clone();
        async move {
            let (status, link) = api.post(&format!("/v1/tenants/{tenant}/portal"), json!({})).await;
            assert_eq!(status, 201, "{link}");
            let mut portal = api.clone();
            portal.token = link["token"].as_str().unwrap().to_string();
            portal
        }
    };
    let (leaked, others) = (link(acme.clone()).await, link(other.clone()).await);
    assert_eq!(leaked.get("/v1/subscriptions").await.0, 200);
    // Minted just before the revocation by a process whose clock runs 30 s ahead of the one
    // that revokes (the link is dated by the minting process's clock).
    let mut ahead = h.api.clone();
    let now = herald::model::now_ms();
    ahead.token = herald::api::portal::PortalKey::derive(TOKEN, None).mint(&acme, now + 30_000, now + 3_600_000);
    assert_eq!(ahead.get("/v1/subscriptions").await.0, 200);

    let revoke = format!("/v1/tenants/{acme}/portal");
    assert_eq!(acme_api.delete(&revoke).await.0, 403, "a tenant key cannot revoke");
    assert_eq!(leaked.delete(&revoke).await.0, 403, "nor a portal link");
    assert_eq!(h.api.delete("/v1/tenants/ten_nobody/portal").await.0, 404);
    assert_eq!(h.api.delete(&revoke).await.0, 204);
    assert_eq!(leaked.get("/v1/subscriptions").await.0, 401, "the link minted before is refused");
    assert_eq!(ahead.get("/v1/subscriptions").await.0, 401, "so is one dated by a clock ahead");
    assert_eq!(others.get("/v1/subscriptions").await.0, 200, "another tenant's link still works");
    assert_eq!(acme_api.get("/v1/subscriptions").await.0, 200, "the tenant's keys still work");
    let fresh = link(acme.clone()).await;
    assert_eq!(fresh.get("/v1/subscriptions").await.0, 200, "a link minted after works");
    let (_, tenants) = h.api.get("/v1/tenants").await;
    let listed = tenants["items"].as_array().unwrap().iter().find(|t| t["id"] == acme.as_str()).unwrap().clone();
    assert!(listed["portal_links_from"].is_string(), "the list says since when links are taken: {listed}");

    // The default tenant's too (it is never stored until then), and all of it after a restart.
    let default_link = link("default".to_string()).await;
    assert_eq!(h.api.delete("/v1/tenants/default/portal").await.0, 204);
    assert_eq!(default_link.get("/v1/subscriptions").await.0, 401);
    let h = h.restart().await;
    let mut leaked = leaked;
    leaked.base = h.api.base.clone();
    assert_eq!(leaked.get("/v1/subscriptions").await.0, 401, "still refused after a restart");
    let mut fresh = fresh;
    fresh.base = h.api.base.clone();
    assert_eq!(fresh.get("/v1/subscriptions").await.0, 200);
    let (_, tenants) = h.api.get("/v1/tenants").await;
    assert_eq!(tenants["items"][0]["id"], "default", "the default tenant is listed first still: {tenants}");
}

#[tokio::test]
async fn what_the_console_reads_is_in_the_api() {
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let (acme, _) = tenant_with_key(&h.api, "Acme").await;
    let (status, key) = h.api.post(&format!("/v1/tenants/{acme}/keys"), json!({})).await;
    assert_eq!(status, 201);

    // Tenants with their keys' ids, never the keys.
    let (status, tenants) = h.api.get("/v1/tenants").await;
    assert_eq!(status, 200);
    let listed = tenants["items"].as_array().unwrap().iter().find(|t| t["id"] == acme.as_str()).unwrap().clone();
    assert_eq!(listed["name"], "Acme");
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().any(|k| k["id"] == key["id"]));
    assert!(!tenants.to_string().contains(key["key"].as_str().unwrap()), "keys are shown once only");
    let (status, _) = h.api.delete(&format!("/v1/tenants/{acme}/keys/{}", key["id"].as_str().unwrap())).await;
    assert_eq!(status, 204);
    let (_, tenants) = h.api.get("/v1/tenants").await;
    assert!(!tenants.to_string().contains(key["id"].as_str().unwrap()), "a revoked key is not listed");

    // Every subscription read carries its endpoint's health.
    rx.respond_on("/down", 500);
    let retry = json!({ "policy": "fixed", "interval": "100ms", "max_attempts": 2 });
    let sub = h.api.subscribe(json!({ "url": rx.url("/down"), "retry": retry, "max_in_flight": 7 })).await;
    let id = sub["id"].as_str().unwrap();
    let (_, read) = h.api.get(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(read["health"]["breaker"], "closed");
    assert_eq!(read["health"]["max_in_flight"], 7);
    assert_eq!(read["health"]["in_flight"], 0);
    h.api.post("/v1/events", json!({ "id": "e1", "type": "t", "data": {} })).await;
    until("the failures counted in health", Duration::from_secs(20), || async {
        let (_, list) = h.api.get("/v1/subscriptions").await;
        let s = list["items"].as_array()?.iter().find(|s| s["id"] == id)?.clone();
        (s["health"]["consecutive_failures"].as_u64()? >= 2).then_some(())
    })
    .await;

    // Devices say whether their agent is connected.
    let (status, device) = h.api.post("/v1/edge-devices", json!({ "name": "gw", "tenant": acme })).await;
    assert_eq!(status, 201, "{device}");
    let (_, devices) = h.api.get("/v1/edge-devices").await;
    assert_eq!(devices["items"][0]["connected"], false);
    let (_, one) = h.api.get(&format!("/v1/edge-devices/{}", device["id"].as_str().unwrap())).await;
    assert_eq!(one["connected"], false);
}

#[tokio::test]
async fn console_pages_come_from_the_binary_with_a_content_security_policy() {
    let h = TestHerald::start().await;
    for (path, frame_ancestors) in [("/console", "frame-ancestors 'none'"), ("/portal", "frame-ancestors *")] {
        let (status, headers, body) = h.api.request("GET", path, None, None).await.unwrap();
        assert_eq!(status, 200, "{path}");
        assert!(headers["content-type"].to_str().unwrap().starts_with("text/html"));
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && csp.contains("default-src 'none'"), "{csp}");
        assert!(csp.ends_with(frame_ancestors), "{path}: {csp}");
        assert_eq!(headers["referrer-policy"], "no-referrer");
        assert!(body.as_str().unwrap().contains("/console/assets/app.js"));
    }
    let (status, headers, _) = h.api.request("GET", "/console/assets/app.js", None, None).await.unwrap();
    assert_eq!(status, 200);
    assert!(headers["content-type"].to_str().unwrap().starts_with("text/javascript"));
    let (status, _, _) = h.api.request("GET", "/console/assets/../../etc/passwd", None, None).await.unwrap();
    assert_eq!(status, 404);
    let (status, _, _) = h.api.request("GET", "/console/assets/secret.js", None, None).await.unwrap();
    assert_eq!(status, 404);
}

/// Debian's chromium, or `HERALD_CHROMIUM`.
fn chromium() -> PathBuf {
    let path = std::env::var_os("HERALD_CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(path.exists(), "{} is missing: ./scripts/test installs Debian's chromium", path.display());
    path
}

fn browser_tests() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    assert!(
        dir.join("node_modules/playwright-core").exists(),
        "playwright-core is missing: run `npm ci --prefix engine/tests/browser` (./scripts/test does)"
    );
    dir
}

/// Where screenshots go: `target/console-screenshots`, kept as the run's artifacts.
fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), PathBuf::from);
    target.join("console-screenshots")
}

#[tokio::test]
async fn an_operator_and_a_tenant_use_the_console_in_a_real_browser() {
    if crate::support::on_kafka() {
        return; // the pages are the same on both backends; the API tests above run on both
    }
    let (chromium, dir) = (chromium(), browser_tests());
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    rx.respond_on("/fail", 500);
    // A second tenant, whose data the portal must never show.
    let (globex, other) = tenant_with_key(&h.api, "Globex").await;
    let other_sub = other.subscribe(json!({ "url": rx.url("/globex") })).await;
    let event = json!({ "id": "globex-1", "tenant": globex, "type": "order.created", "data": {} });
    let (status, accepted) = h.api.post("/v1/events", event).await;
    assert_eq!(status, 202, "{accepted}");
    until("the other tenant's event on record", Duration::from_secs(20), || async {
        let (status, _) = h.api.get(&format!("/v1/events/globex-1?tenant={globex}")).await;
        (status == 200).then_some(())
    })
    .await;

    let run = tokio::process::Command::new("node")
        .arg(dir.join("console.mjs"))
        .current_dir(&dir)
        .env("HERALD_URL", &h.api.base)
        .env("HERALD_ADMIN_TOKEN", TOKEN)
        .env("OK_URL", rx.url("/ok"))
        .env("FAIL_URL", rx.url("/fail"))
        .env("OTHER_SUB", other_sub["id"].as_str().unwrap())
        .env("OTHER_EVENT", "globex-1")
        .env("SHOTS", screenshots())
        .env("CHROMIUM", chromium)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(240), run).await.expect("the browser run ends").unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the browser run failed:\n{said}");
    assert!(said.contains("every step passed"), "{said}");
    assert!(rx.on("/ok").iter().any(|r| r.header("webhook-id") == "order-1001"), "the event went out");
    // The subscription edited in the form kept its secret header (the form showed it masked).
    assert!(rx.on("/ok").iter().any(|r| r.header("x-api-key") == "s3cret-value"), "the edit kept the secret header");
}
