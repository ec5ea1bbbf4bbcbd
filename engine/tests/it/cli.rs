//! The admin CLI, run as a binary against a real server: tables for people, `--json` for
//! scripts, exit codes a script can rely on.

use crate::support::{Receiver, TestHerald, TOKEN};
use serde_json::Value;
use std::process::Output;

/// `herald args…` against `server`, started with its stdin, stdout and stderr piped.
fn spawned(server: &str, args: &[&str]) -> tokio::process::Child {
    // The connection flags and `--json` go after the subcommand (`herald tenants list --json`).
    let (json, args): (Vec<&str>, Vec<&str>) = args.iter().partition(|a| **a == "--json");
    tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(args)
        .args(json)
        .args(["--server", server, "--token", TOKEN])
        .env_remove("HERALD_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

async fn herald(server: &str, args: &[&str], stdin: Option<&str>) -> Output {
    use tokio::io::AsyncWriteExt;
    let mut child = spawned(server, args);
    let mut input = child.stdin.take().unwrap();
    // A command that stops reading early (input it refuses) closes the pipe: not a failure here.
    let _ = input.write_all(stdin.unwrap_or_default().as_bytes()).await;
    drop(input);
    tokio::time::timeout(std::time::Duration::from_secs(30), child.wait_with_output()).await.unwrap().unwrap()
}

/// The command's stderr, once it is checked that it exited with `code` (`what` says which
/// command, when a test runs several).
fn exited(out: &Output, code: i32, what: &str) -> String {
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(code), "{what}{said}");
    said
}

fn json(out: &Output) -> Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn an_operator_scripts_herald_with_its_cli() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    let base = h.api.base.clone();

    let tenant = json(&herald(&base, &["--json", "tenants", "create", "Acme"], None).await);
    let tenant_id = tenant["id"].as_str().unwrap();
    let key = json(&herald(&base, &["--json", "keys", "issue", tenant_id], None).await);
    assert!(key["key"].as_str().unwrap().starts_with("hk."));
    let listed = text(&herald(&base, &["tenants", "list"], None).await);
    assert!(
        listed.starts_with("ID") && listed.contains("Acme") && listed.contains(key["id"].as_str().unwrap()),
        "{listed}"
    );

    let url = rx.url("/cli");
    let sub = json(
        &herald(
            &base,
            &["--json", "subscriptions", "create", "--url", &url, "--events", "a,b", "--tenant", tenant_id],
            None,
        )
        .await,
    );
    let sub_id = sub["id"].as_str().unwrap();
    assert!(sub["secret"].as_str().unwrap().starts_with("whsec_"));
    let patched = json(
        &herald(&base, &["--json", "subscriptions", "patch", sub_id, "--set", r#"{"rate_limit": 5}"#], None).await,
    );
    assert_eq!(patched["rate_limit"], 5.0);
    let table = text(&herald(&base, &["subscriptions", "list", "--tenant", tenant_id], None).await);
    assert!(table.contains(sub_id) && table.contains("a,b") && table.contains("closed"), "{table}");
    // Filters go to the server, which names a bad one; a page ends with how to get the next.
    let off = json(
        &herald(
            &base,
            &["--json", "subscriptions", "create", "--url", &rx.url("/cli-off"), "--tenant", tenant_id],
            None,
        )
        .await,
    );
    let off_id = off["id"].as_str().unwrap();
    herald(&base, &["subscriptions", "patch", off_id, "--set", r#"{"enabled": false}"#], None).await;
    let disabled = text(&herald(&base, &["subscriptions", "list", "--enabled", "false"], None).await);
    assert!(disabled.contains(off_id) && !disabled.contains(sub_id), "{disabled}");
    let webhooks =
        text(&herald(&base, &["subscriptions", "list", "--transport", "webhook", "--enabled", "true"], None).await);
    assert!(webhooks.contains(sub_id) && !webhooks.contains(off_id), "{webhooks}");
    let bad = herald(&base, &["subscriptions", "list", "--breaker", "ajar"], None).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("breaker"), "{bad:?}");
    let first = herald(&base, &["--json", "subscriptions", "list", "--tenant", tenant_id], None).await;
    assert!(json(&first)["next"].is_null(), "two subscriptions fit one page");
    herald(&base, &["subscriptions", "delete", off_id], None).await;

    // One event from flags, then three from stdin lines (a batch).
    let sent = json(
        &herald(
            &base,
            &["--json", "events", "send", "--type", "a", "--tenant", tenant_id, "--id", "e-1", "--data", r#"{"n":1}"#],
            None,
        )
        .await,
    );
    assert_eq!(sent["deliveries"], 1);
    let lines = (2..=4)
        .map(|n| format!(r#"{{"id":"e-{n}","type":"b","tenant":"{tenant_id}","data":{{"n":{n}}}}}"#))
        .collect::<Vec<_>>()
        .join("\n");
    let batch = json(&herald(&base, &["--json", "events", "send", "--stdin"], Some(&lines)).await);
    assert_eq!(batch["items"].as_array().unwrap().len(), 3);
    rx.wait_on("/cli", 4).await;

    // A stream longer than a batch goes 1,000 at a time; one refused says what went before it
    // (a script re-sending all of it would publish those again) and where it stopped.
    let other = json(&herald(&base, &["--json", "tenants", "create", "Stream"], None).await);
    let other = other["id"].as_str().unwrap();
    let mut lines: Vec<String> =
        (1..=1003).map(|n| format!(r#"{{"id":"s-{n}","type":"b","tenant":"{other}","data":{{}}}}"#)).collect();
    lines[1001] = format!(r#"{{"id":"s-1002","tenant":"{other}","data":{{}}}}"#);
    let out = herald(&base, &["events", "send", "--stdin"], Some(&lines.join("\n"))).await;
    let said = exited(&out, 1, "");
    assert!(said.contains("1000 events before line 1001 were accepted") && said.contains("1001–1003"), "{said}");
    crate::support::until("the accepted events on record", std::time::Duration::from_secs(20), || {
        let (base, other) = (base.clone(), other.to_string());
        async move {
            let out = herald(&base, &["--json", "events", "get", "s-1000", "--tenant", &other], None).await;
            out.status.success().then_some(())
        }
    })
    .await;
    let missing = herald(&base, &["--json", "events", "get", "s-1001", "--tenant", other], None).await;
    assert_eq!(missing.status.code(), Some(1), "the refused batch's events were not accepted");
    // A line that is not JSON past the first batch says the same.
    let mut lines: Vec<String> =
        (1..=1001).map(|n| format!(r#"{{"id":"j-{n}","type":"b","tenant":"{other}","data":{{}}}}"#)).collect();
    lines.push("{bad".into());
    let out = herald(&base, &["events", "send", "--stdin"], Some(&lines.join("\n"))).await;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains("line 1002 is not JSON") && said.contains("1000 events before line 1001 were accepted"),
        "{said}"
    );
    // The bad line the first of a batch: the events before it were accepted.
    lines.truncate(1000);
    for (n, line) in lines.iter_mut().enumerate() {
        *line = format!(r#"{{"id":"k-{n}","type":"b","tenant":"{other}","data":{{}}}}"#);
    }
    lines.push("{bad".into());
    let out = herald(&base, &["events", "send", "--stdin"], Some(&lines.join("\n"))).await;
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        said.contains("line 1001 is not JSON") && said.contains("1000 events before line 1001 were accepted"),
        "{said}"
    );

    let attempts = crate::support::until("the attempts on record", std::time::Duration::from_secs(20), || {
        let base = base.clone();
        let sub_id = sub_id.to_string();
        async move {
            let out = herald(&base, &["attempts", "--subscription", &sub_id], None).await;
            let t = text(&out);
            (t.lines().count() == 5).then_some(t)
        }
    })
    .await;
    assert!(attempts.contains("delivered") && attempts.contains("200"), "{attempts}");
    let event = json(&herald(&base, &["--json", "events", "get", "e-1", "--tenant", tenant_id], None).await);
    assert_eq!(event["deliveries"][0]["state"], "delivered");
    // A listing with more to it says how to go on, and --cursor goes on.
    let first = herald(&base, &["events", "list", "--tenant", tenant_id, "--limit", "1"], None).await;
    let said = String::from_utf8_lossy(&first.stderr).into_owned();
    let cursor = said.split("--cursor ").nth(1).map(|c| c.trim().trim_end_matches(')').trim_matches('\'').to_string());
    let cursor = cursor.unwrap_or_else(|| panic!("no cursor offered: {said}"));
    let second = json(
        &herald(&base, &["--json", "events", "list", "--tenant", tenant_id, "--limit", "1", "--cursor", &cursor], None)
            .await,
    );
    let second_id = second["items"][0]["id"].as_str().unwrap().to_string();
    assert!(
        !text(&first).contains(&second_id),
        "the second page goes on from the first: {second_id} in {}",
        text(&first)
    );

    // Exit codes: 1 when the API refuses (its error on stderr), 2 for bad usage, 3 when the
    // server is not there.
    let missing = herald(&base, &["subscriptions", "get", "sub_nope"], None).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404"), "{missing:?}");
    // Ids reach the server as written: a space or a `#` in one makes no other request (a `#`
    // cut the path short: this deleted the subscription itself).
    let spaced = herald(&base, &["subscriptions", "get", "a b"], None).await;
    assert_eq!(spaced.status.code(), Some(1), "{spaced:?}");
    let hashed = herald(&base, &["subscriptions", "delete", &format!("{sub_id}#x")], None).await;
    assert_eq!(hashed.status.code(), Some(1), "{hashed:?}");
    let invalid = herald(&base, &["subscriptions", "create", "--url", "not a url"], None).await;
    assert_eq!(invalid.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&invalid.stderr).contains("url"), "{invalid:?}");
    // A 200 that says what was asked did not happen is a failure too: a test delivery that
    // failed, a replay that skipped entries.
    let dead =
        json(&herald(&base, &["--json", "subscriptions", "create", "--url", "http://127.0.0.1:9/dead"], None).await);
    let dead_id = dead["id"].as_str().unwrap();
    let tested = herald(&base, &["subscriptions", "test", dead_id], None).await;
    assert_eq!(tested.status.code(), Some(1), "{tested:?}");
    assert!(String::from_utf8_lossy(&tested.stderr).contains("the test delivery failed"), "{tested:?}");
    let replayed = herald(&base, &["--json", "dlq", "replay", "--ids", "dlq_missing"], None).await;
    assert_eq!(replayed.status.code(), Some(1), "{replayed:?}");
    let answer: Value = serde_json::from_slice(&replayed.stdout).unwrap();
    assert_eq!(answer["skipped"][0]["reason"], "not_found", "the answer is still printed");
    assert_eq!(herald(&base, &["subscriptions", "frobnicate"], None).await.status.code(), Some(2));
    assert_eq!(herald("http://127.0.0.1:9", &["tenants", "list"], None).await.status.code(), Some(3));

    // The event-type catalogue: a definition from stdin, a table, a refusal naming the field.
    let definition = r#"{"name":"order.created","schema":{"type":"object","required":["id"]},"example":{"id":1}}"#;
    let created = json(&herald(&base, &["--json", "event-types", "create", "--file", "-"], Some(definition)).await);
    assert_eq!(created["name"], "order.created");
    let types = text(&herald(&base, &["event-types", "list"], None).await);
    assert!(types.starts_with("NAME") && types.contains("order.created"), "{types}");
    let bad = herald(&base, &["event-types", "patch", "order.created", "--set", r#"{"example":{}}"#], None).await;
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("example"), "{bad:?}");
    assert_eq!(text(&herald(&base, &["event-types", "delete", "order.created"], None).await).trim(), "deleted");

    let deleted = herald(&base, &["subscriptions", "delete", sub_id], None).await;
    assert_eq!(text(&deleted).trim(), "deleted");
    let completions = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["completions", "bash"])
        .output()
        .await
        .unwrap();
    assert!(text(&completions).contains("subscriptions"), "bash completions name the subcommands");
}

/// A publish cut off by the API's request timeout (a slow disk) is answered 408, but its write
/// goes on and the events are delivered: the CLI says the batch may or may not have been
/// accepted and exits 3, as for a server it lost — not "refused, none of it accepted" with 1,
/// which led a script to send events without ids again, delivering them twice.
#[tokio::test]
async fn a_publish_cut_off_by_the_request_timeout_is_not_called_refused() {
    use herald::log::embedded::Fault;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    if crate::support::on_kafka() {
        return; // the fault layer is the embedded log's
    }
    let slow = Arc::new(AtomicBool::new(false));
    let flag = slow.clone();
    let faults: herald::log::embedded::Faults = Some(Arc::new(move |fault: Fault<'_>| {
        if matches!(fault, Fault::Write(_)) && flag.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1500));
        }
        Ok(())
    }));
    let h = TestHerald::start_with_extras(
        |c| c.api.request_timeout = std::time::Duration::from_millis(300).into(),
        herald::server::Extras { faults, ..Default::default() },
    )
    .await;
    let rx = Receiver::start().await;
    h.api.subscribe(serde_json::json!({ "url": rx.url("/slow") })).await;
    slow.store(true, Ordering::SeqCst);
    let lines = "{\"type\":\"A\",\"data\":{\"n\":1}}\n{\"type\":\"A\",\"data\":{\"n\":2}}\n";
    let out = herald(&h.api.base, &["events", "send", "--stdin"], Some(lines)).await;
    slow.store(false, Ordering::SeqCst);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("none of it accepted"), "{said}");
    assert!(said.contains("may or may not have been accepted"), "{said}");
    assert_eq!(out.status.code(), Some(3), "{said}");
    rx.wait_on("/slow", 2).await;
}

/// A batch the server throttles (`429`: the tenant's writes under way fill its share of
/// `quotas.pending_bytes`) was not accepted: the CLI says so, and when to come back, and exits
/// 3 (try again later) — it said the batch "may or may not have been accepted", as for a
/// server it lost, and a script could not tell that sending those lines again was safe. The
/// server here stands in for Herald with its documented answers (the real one takes ten
/// seconds of a full share to refuse).
#[tokio::test]
async fn a_throttled_batch_is_said_not_accepted() {
    use http_body_util::Full;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = format!("http://{}", listener.local_addr().unwrap());
    let calls = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = calls.clone();
    crate::support::serve_http1(listener, move |_req| {
        let first = seen.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            let (status, body) = if first {
                let items: Vec<Value> =
                    (0..1000).map(|n| serde_json::json!({ "id": format!("e{n}"), "deliveries": 1 })).collect();
                (202, serde_json::json!({ "items": items, "deliveries": 1000 }))
            } else {
                let error = serde_json::json!({ "code": "RATE_LIMITED", "message": "tenant t1 has 1048576 bytes being written; retry after 1 s", "retry_after": 1 });
                (429, serde_json::json!({ "error": error }))
            };
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .header("retry-after", "1")
                .body(Full::new(bytes::Bytes::from(body.to_string())))
                .unwrap()
        }
    });
    let lines: String = (0..1001).map(|n| format!("{{\"type\":\"A\",\"data\":{{\"n\":{n}}}}}\n")).collect();
    let out = herald(&server, &["events", "send", "--stdin"], Some(&lines)).await;
    let said = exited(&out, 3, "");
    assert!(said.contains("lines 1001–1001 was not accepted"), "{said}");
    assert!(said.contains("the 1000 events before line 1001 were accepted"), "{said}");
    assert!(said.contains("retry after 1 s"), "{said}");
    assert!(!said.contains("may or may not"), "{said}");
}

/// A server that cannot be reached is said with its cause — hyper's own words were only
/// "client error (Connect)" — and exits 3.
#[tokio::test]
async fn an_unreachable_server_is_said_with_its_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = herald(&format!("http://{closed}"), &["tenants", "list"], None).await;
    let said = exited(&out, 3, "");
    assert!(said.to_lowercase().contains("refused"), "{said}");
}

/// A `--server` that is no http(s) URL is the caller's mistake (exit 2), said before anything
/// is sent — not "server unreachable" (exit 3).
#[tokio::test]
async fn a_server_that_is_no_url_is_a_usage_error() {
    for server in
        ["localhost:8080", "ftp://h/", "http://", "http:localhost:8080", " http://127.0.0.1:1", "http://bücher.example"]
    {
        let out = herald(server, &["tenants", "list"], None).await;
        let said = exited(&out, 2, &format!("{server}: "));
        assert!(said.contains("--server"), "{server}: {said}");
    }
}

/// A server that answers but is not Herald's API (a wrong port, an ingress's page for every
/// path, a redirect) is said so, exit 2: a 200 with a web page was taken as done — a publish
/// printed the page and exited 0, a delete said "deleted" — and nothing had been done.
#[tokio::test]
async fn a_server_that_is_not_herald_s_api_is_said_so() {
    let rx = Receiver::start().await; // answers `ok` to everything
    rx.respond_on("/v1/tenants", 301);
    for args in [
        &["events", "send", "--type", "a", "--data", "{}"][..],
        &["subscriptions", "delete", "sub_x"],
        &["events", "send", "--stdin"],
        &["tenants", "list"],
    ] {
        let out = herald(&rx.url(""), args, Some("{\"type\":\"a\",\"data\":{}}\n")).await;
        let said = exited(&out, 2, &format!("{args:?}: "));
        assert!(said.contains("not Herald's API"), "{args:?}: {said}");
    }
}

/// Input past the largest request Herald takes is refused once that much is read, naming the
/// line or file (exit 2): a line without end was held in memory whole, however long
/// (`head -c 4G /dev/zero | herald events send --stdin` ended killed for want of memory).
#[tokio::test]
async fn input_past_the_largest_request_is_refused_as_it_is_read() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let endless = "a".repeat(20 << 20);
    let out = herald(&h.api.base, &["events", "send", "--stdin"], Some(&endless)).await;
    let said = exited(&out, 2, "");
    assert!(said.contains("line 1") && said.contains("16 MiB"), "{said}");
    let out = herald(&h.api.base, &["events", "send", "--type", "t", "--file", "-"], Some(&endless)).await;
    let said = exited(&out, 2, "");
    assert!(said.contains("16 MiB"), "{said}");
}

/// Lines on stdin are sent once input pauses, not held for the next 999 or the end of
/// input: `tail -f events.jsonl | herald events send --stdin` published nothing for good.
#[tokio::test]
async fn stdin_lines_are_sent_once_input_pauses() {
    use tokio::io::AsyncWriteExt;
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let mut child = spawned(&h.api.base, &["events", "send", "--stdin"]);
    let mut input = child.stdin.take().unwrap();
    let line = |id: &str| format!("{{\"id\":\"{id}\",\"type\":\"t\",\"data\":{{}}}}\n");
    for id in ["tail-1", "tail-2"] {
        input.write_all(line(id).as_bytes()).await.unwrap();
        input.flush().await.unwrap();
        crate::support::until(
            &format!("{id} published with stdin still open"),
            std::time::Duration::from_secs(10),
            || async { (h.api.get(&format!("/v1/events/{id}")).await.0 == 200).then_some(()) },
        )
        .await;
    }
    // A steady trickle, a line every 100 ms, is no pause: its first line goes all the same.
    let writing = tokio::spawn(async move {
        for n in 0..40 {
            input.write_all(line(&format!("trickle-{n}")).as_bytes()).await.unwrap();
            input.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await; // the producer's pace
        }
        input
    });
    crate::support::until("the trickle's first line published", std::time::Duration::from_secs(2), || async {
        (h.api.get("/v1/events/trickle-0").await.0 == 200).then_some(())
    })
    .await;
    drop(writing.await.unwrap());
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("tail-1") && said.contains("trickle-39"), "{said}");
}

/// Ctrl-C is how `tail -f events.jsonl | herald events send --stdin` ends: it killed the
/// command with nothing said — the events accepted were never listed, nor where sending stopped.
/// It lists them, says from which line nothing was sent, and exits 130.
#[tokio::test]
async fn an_interrupted_stdin_says_what_was_sent() {
    use tokio::io::AsyncWriteExt;
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let mut child = spawned(&h.api.base, &["events", "send", "--stdin", "--json"]);
    let mut input = child.stdin.take().unwrap();
    for id in ["ctrl-c-1", "ctrl-c-2"] {
        input.write_all(format!("{{\"id\":\"{id}\",\"type\":\"t\",\"data\":{{}}}}\n").as_bytes()).await.unwrap();
    }
    input.flush().await.unwrap();
    crate::support::until("both lines published with stdin still open", std::time::Duration::from_secs(10), || async {
        (h.api.get("/v1/events/ctrl-c-2").await.0 == 200).then_some(())
    })
    .await;
    let pid = rustix::process::Pid::from_raw(child.id().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(10), child.wait_with_output()).await.unwrap().unwrap();
    drop(input);
    let (said, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(130), "{said} / {err}");
    let listed: Value = serde_json::from_str(&said).unwrap_or_else(|e| panic!("{e}: {said}"));
    let ids: Vec<&str> = listed["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["ctrl-c-1", "ctrl-c-2"], "{said}");
    assert!(err.contains("interrupted") && err.contains("nothing after line 2 was sent"), "{err}");
}

/// A server whose certificate a private authority signed (an internal CA, behind a company's
/// proxy) is trusted with `--ca-file` (or `HERALD_CA_FILE`), beside the public ones: every
/// command failed `UnknownIssuer`, exit 3 — "try again later", which never helped.
#[tokio::test]
async fn a_private_certificate_authority_is_trusted_with_ca_file() {
    let pki = crate::tls::pki();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.open_server.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let svc = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
                    let page = bytes::Bytes::from_static(br#"{"items":[{"id":"t1","name":"Behind TLS"}],"next":null}"#);
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(page)))
                });
                let io = hyper_util::rt::TokioIo::new(tls);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    let server = format!("https://localhost:{port}");
    let out = herald(&server, &["tenants", "list"], None).await;
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let ca = pki.ca.to_str().unwrap();
    let out = herald(&server, &["tenants", "list", "--ca-file", ca], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("Behind TLS"));
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_pem.path(), "no certificate here").unwrap();
    let out = herald(&server, &["tenants", "list", "--ca-file", not_pem.path().to_str().unwrap()], None).await;
    let said = exited(&out, 2, "");
    assert!(said.contains("--ca-file"), "{said}");
}

/// Lines of large events close a batch early: 1,000 lines of 20 KB (all valid) made a body
/// past the server's largest, refused every time, so such input could not be sent at all.
#[tokio::test]
async fn large_events_on_stdin_go_in_batches_the_server_takes() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let pad = "x".repeat(20_000);
    let lines: Vec<String> =
        (0..1000).map(|n| format!(r#"{{"id":"big-{n}","type":"b","data":{{"pad":"{pad}"}}}}"#)).collect();
    let out = herald(&h.api.base, &["--json", "events", "send", "--stdin"], Some(&lines.join("\n"))).await;
    let sent = json(&out);
    assert_eq!(sent["items"].as_array().unwrap().len(), 1000, "every line accepted");
}

/// Names come from tenants: printed as they are, their escape sequences ran in the operator's
/// terminal (clearing it, faking rows, writing the clipboard). Control characters are shown
/// escaped; `--json` gives the text exactly.
#[tokio::test]
async fn control_characters_in_names_are_shown_escaped() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let (status, body) = h.api.post("/v1/tenants", serde_json::json!({ "name": "Evil\u{1b}[2J\u{7}Co" })).await;
    assert_eq!(status, 201, "{body}");
    let listed = text(&herald(&h.api.base, &["tenants", "list"], None).await);
    assert!(!listed.contains('\u{1b}') && !listed.contains('\u{7}'), "{listed:?}");
    assert!(listed.contains(r"Evil\u{1b}[2J\u{7}Co"), "{listed}");
    let shown = herald(&h.api.base, &["tenants", "create", "Other\u{1b}]52;c;Zm9v\u{7}"], None).await;
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let shown = text(&shown);
    assert!(shown.contains(r"Other\u{1b}]52;c;Zm9v\u{7}") && !shown.contains('\u{1b}'), "{shown:?}");
    let exact = json(&herald(&h.api.base, &["--json", "tenants", "list"], None).await);
    assert!(exact["items"].as_array().unwrap().iter().any(|t| t["name"] == "Evil\u{1b}[2J\u{7}Co"));
}

/// A line that closes the first batch early (two large events past a batch's bytes) sent the
/// first line alone as a single event, and the rest of the input was never sent — exit 0.
/// `--tenant` with `--stdin` was ignored: the lines went to the default tenant's subscriptions.
#[tokio::test]
async fn every_line_on_stdin_is_sent_and_to_the_tenant_named() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start_with(|c| c.ingest.max_event_bytes = 12 << 20).await;
    let pad = "x".repeat(5 << 20);
    let lines = [
        format!(r#"{{"id":"large-a","type":"b","data":{{"pad":"{pad}"}}}}"#),
        format!(r#"{{"id":"large-b","type":"b","data":{{"pad":"{pad}"}}}}"#),
        r#"{"id":"small-c","type":"b","data":{}}"#.to_string(),
    ];
    let sent = json(&herald(&h.api.base, &["--json", "events", "send", "--stdin"], Some(&lines.join("\n"))).await);
    let ids: Vec<&str> = sent["items"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["large-a", "large-b", "small-c"], "{sent}");
    for id in ids {
        assert_eq!(h.api.get(&format!("/v1/events/{id}")).await.0, 200, "{id} on record");
    }

    let (status, acme) = h.api.post("/v1/tenants", serde_json::json!({ "name": "Acme" })).await;
    assert_eq!(status, 201, "{acme}");
    let acme = acme["id"].as_str().unwrap();
    let line = r#"{"id":"t-1","type":"x","data":{}}"#;
    json(&herald(&h.api.base, &["--json", "events", "send", "--stdin", "--tenant", acme], Some(line)).await);
    assert_eq!(h.api.get(&format!("/v1/events/t-1?tenant={acme}")).await.0, 200, "the named tenant's");
    assert_eq!(h.api.get("/v1/events/t-1").await.0, 404, "not the default tenant's");
    let out = herald(&h.api.base, &["events", "send", "--stdin", "--type", "x"], Some(line)).await;
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Output piped into a reader that has gone (`herald … | head -1`) ends the command quietly
/// (exit 0: the request was made), not with a panic and exit code 101.
#[tokio::test]
async fn output_to_a_closed_pipe_ends_quietly() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    // Spawned, not `output()`, which would take stdout for its own pipe.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["tenants", "list", "--json", "--server", &h.api.base, "--token", TOKEN])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert_eq!(out.status.code(), Some(0), "{:?}: {said}", out.status);
}

/// The CLI sends an event's `data` as written: it parsed it into a `serde_json::Value` and
/// wrote that out again, so keys came sorted, whitespace went, and an integer past 2^64 was
/// rounded — what a `raw_bytes` receiver got was not what the producer wrote, and Herald's
/// "never changes a value" did not hold through its own CLI. With `--data`, `--file` and
/// `--stdin` alike.
#[tokio::test]
async fn an_event_s_data_reaches_the_receiver_as_written() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let rx = Receiver::start().await;
    h.api.subscribe(serde_json::json!({ "url": rx.url("/bytes"), "payload": "raw_bytes" })).await;
    let data = r#"{ "z" : 1, "amount": 123456789012345678901234567890, "a": [1.50] }"#;
    let out = herald(&h.api.base, &["events", "send", "--type", "t", "--id", "by-data", "--data", data], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("event.json");
    std::fs::write(&file, format!(r#"{{"type":"t","data":{data}}}"#)).unwrap();
    let out = herald(&h.api.base, &["events", "send", "--id", "by-file", "--file", file.to_str().unwrap()], None).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines = format!(
        "{{\"id\":\"line-1\",\"type\":\"t\",\"data\":{data}}}\n{{\"id\":\"line-2\",\"type\":\"t\",\"data\":{data}}}\n"
    );
    let out = herald(&h.api.base, &["events", "send", "--stdin", "--tenant", "default"], Some(&lines)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for received in rx.wait_on("/bytes", 4).await {
        assert_eq!(std::str::from_utf8(&received.body).unwrap(), data, "{}", received.header("webhook-id"));
    }
}

/// A `--file` that holds no JSON object, given with flags that set its fields, is said to be
/// the caller's mistake (exit 2, naming `--file`) — indexing it panicked (exit 101).
#[tokio::test]
async fn a_file_that_is_no_object_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.json");
    std::fs::write(&file, r#"[{"type":"t","data":{}}]"#).unwrap();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let server = format!("http://{closed}");
    for args in [
        &["events", "send", "--file", file.to_str().unwrap(), "--tenant", "acme"][..],
        &["subscriptions", "create", "--file", file.to_str().unwrap(), "--url", "https://example.com/h"][..],
    ] {
        let out = herald(&server, args, None).await;
        let said = exited(&out, 2, &format!("{args:?}: "));
        assert!(said.contains("--file") && said.contains("object"), "{said}");
    }
}

/// A refusal after which some of a publish's deliveries may be written (the log refused the
/// write part-way: `503`, or `413` from a Kafka topic with a smaller limit) names the events'
/// ids, generated ones too, to send them again under: the CLI printed the message alone, so
/// a producer that gave no ids could only send them again under new ones (delivered twice);
/// and it called the `413` "refused, none of it accepted" (exit 1). The ids are said, with
/// exit 3 (it may or may not have been accepted). The stand-in server answers as Herald
/// documents.
#[tokio::test]
async fn a_refusal_naming_the_events_ids_says_them() {
    use http_body_util::Full;
    for status in [503u16, 413] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = format!("http://{}", listener.local_addr().unwrap());
        crate::support::serve_http1(listener, move |_req| async move {
            let error = serde_json::json!({
                "code": if status == 503 { "UNAVAILABLE" } else { "TOO_LARGE" },
                "message": "the log refused the write; some of its deliveries may be written: send it again with the same event ids (`ids` names them, generated ones too)",
                "ids": ["evt_generated_1", "evt_generated_2"],
            });
            hyper::Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Full::new(bytes::Bytes::from(serde_json::json!({ "error": error }).to_string())))
                .unwrap()
        });
        let lines = "{\"type\":\"A\",\"data\":{}}\n{\"type\":\"A\",\"data\":{}}\n";
        let out = herald(&server, &["events", "send", "--stdin"], Some(lines)).await;
        let said = exited(&out, 3, &format!("{status}: "));
        assert!(said.contains("evt_generated_1") && said.contains("evt_generated_2"), "{status}: {said}");
        assert!(!said.contains("none of it accepted"), "{status}: {said}");
        let out = herald(&server, &["events", "send", "--type", "A", "--data", "{}"], None).await;
        let said = exited(&out, 3, &format!("{status}: "));
        assert!(said.contains("evt_generated_1"), "{status}: {said}");
    }
}

/// A token a header cannot carry (a stray carriage return from a file written on Windows) is
/// the caller's mistake, told before anything is sent (exit 2, the token not shown) — it was
/// "unexpected answer" with exit 3, "try again later", and a script retrying on 3 looped.
#[tokio::test]
async fn a_token_no_header_can_carry_is_a_usage_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["tenants", "list", "--server", &format!("http://{closed}"), "--token", "he.secret\rpart"])
        .env_remove("HERALD_TOKEN")
        .output()
        .await
        .unwrap();
    let said = exited(&out, 2, "");
    assert!(said.contains("token") && !said.contains("secret"), "{said}");
}

/// `--stdin` tells a script what it needs to go on from, whatever happens:
/// - one line answers `{"items":[…]}` with `--json` as many do (it answered the single
///   publish's `{"id","deliveries"}`, so `jq '.items[]'` failed on input of one line);
/// - a batch failing after others were accepted prints those (ids generated for events that
///   gave none included) before its error: only the count was said, and events without ids
///   could not be found again;
/// - the line of the item a refusal names: the server's `[i]` counts from 0 and blank lines
///   are skipped, and the CLI said "item [i] is its i-th line", a line or more off.
#[tokio::test]
async fn stdin_says_which_events_went_and_which_line_was_refused() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start().await;
    let one = json(
        // (After a byte-order mark, as a Windows editor writes a file's first line.)
        &herald(&h.api.base, &["--json", "events", "send", "--stdin"], Some("\u{feff}{\"type\":\"t\",\"data\":{}}\n"))
            .await,
    );
    assert!(one["items"][0]["id"].as_str().is_some_and(|id| !id.is_empty()), "{one}");

    let mut lines: Vec<String> = (0..1000).map(|_| r#"{"type":"t","data":{}}"#.to_string()).collect();
    lines.push(String::new());
    lines.push(r#"{"type":"t","data":{}}"#.into());
    lines.push(String::new());
    lines.push(r#"{"data":{}}"#.into()); // line 1004, the batch's item [1]: no type
    let out = herald(&h.api.base, &["--json", "events", "send", "--stdin"], Some(&lines.join("\n"))).await;
    let said = exited(&out, 1, "");
    assert!(said.contains("line 1004"), "{said}");
    let accepted: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {said}"));
    let ids = accepted["items"].as_array().unwrap();
    assert_eq!(ids.len(), 1000, "the first batch's events, listed");
    let first = ids[0]["id"].as_str().unwrap();
    assert_eq!(h.api.get(&format!("/v1/events/{first}")).await.0, 200, "found again by its generated id");
}

/// A batch whose fan-out passes the tenant's `quotas.fanout_bytes` (its events times the
/// subscriptions they match) is sent again in halves, down to single events: every batch of a
/// tenant whose events match many subscriptions was refused `413`, the same input failing on
/// every run, and `--stdin` had no batch size to set. One event alone past the quota is still
/// refused, naming its line.
#[tokio::test]
async fn stdin_batches_past_the_fan_out_quota_go_in_smaller_ones() {
    if crate::support::on_kafka() {
        return; // the CLI is a client of the API, the same on both backends
    }
    let h = TestHerald::start_with(|c| c.quotas.fanout_bytes = 20_000).await;
    let rx = Receiver::start().await;
    for i in 0..3 {
        h.api.subscribe(serde_json::json!({ "url": rx.url(&format!("/f{i}")) })).await;
    }
    // 40 events of 1 KB to 3 subscriptions: 120 KB of fan-out a batch, six times the quota.
    let pad = "p".repeat(1000);
    let lines: Vec<String> =
        (0..40).map(|n| format!(r#"{{"id":"q-{n}","type":"t","data":{{"pad":"{pad}"}}}}"#)).collect();
    let sent = json(&herald(&h.api.base, &["--json", "events", "send", "--stdin"], Some(&lines.join("\n"))).await);
    assert_eq!(sent["items"].as_array().unwrap().len(), 40, "{sent}");
    rx.wait_on("/f2", 40).await;
    let big = format!(r#"{{"id":"q-big","type":"t","data":{{"pad":"{}"}}}}"#, "p".repeat(10_000));
    let out = herald(&h.api.base, &["events", "send", "--stdin"], Some(&format!("{}\n{big}\n", lines[0]))).await;
    let said = exited(&out, 1, "");
    assert!(said.contains("line 2"), "{said}");
}
