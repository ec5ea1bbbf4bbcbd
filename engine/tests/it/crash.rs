//! Crash safety: a `herald serve` child process is killed with SIGKILL while events are
//! published and delivered; after a restart (also over a torn log tail) every acknowledged
//! event is delivered at least once. And a clean stop (SIGTERM) leaves the log checkpointed.

use crate::support::{open_log, spawn_herald, until, Api, Receiver, TOKEN};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Appends half a frame to every deliveries segment, as a crash mid-write leaves it.
fn tear_tails(data_dir: &Path) -> usize {
    let mut torn = 0;
    let topic = data_dir.join("log/topics/herald.deliveries");
    for part in std::fs::read_dir(topic).unwrap() {
        let mut segs: Vec<_> = std::fs::read_dir(part.unwrap().path()).unwrap().map(|e| e.unwrap().path()).collect();
        segs.sort();
        if let Some(last) = segs.last() {
            let mut f = std::fs::OpenOptions::new().append(true).open(last).unwrap();
            f.write_all(&[0x40, 0, 0, 0, 0xde, 0xad, 0xbe, 0xef, 1, 2, 3]).unwrap();
            torn += 1;
        }
    }
    torn
}

#[tokio::test]
async fn sigkill_mid_stream_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    for path in ["/a", "/b"] {
        api.subscribe(json!({ "url": rx.url(path) })).await;
    }

    // Publish batches until enough are acknowledged and delivery is under way, then kill.
    let acked: Arc<Mutex<Vec<String>>> = Default::default();
    let publisher = {
        let api = api.clone();
        let acked = acked.clone();
        tokio::spawn(async move {
            for batch in 0.. {
                let events: Vec<_> = (0..25)
                    .map(|i| json!({ "id": format!("e-{batch}-{i}"), "type": "T", "data": { "n": i } }))
                    .collect();
                let body = bytes::Bytes::from(serde_json::Value::Array(events).to_string());
                match api.try_raw("POST", "/v1/events/batch", Some(body), Some(TOKEN)).await {
                    Ok((status, resp)) if status == 202 => {
                        let ids = resp["items"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|i| i["id"].as_str().unwrap().to_string())
                            .collect::<Vec<_>>();
                        acked.lock().unwrap().extend(ids);
                    }
                    Ok((status, resp)) => panic!("publish failed: {status} {resp}"),
                    Err(_) => return, // the server is gone
                }
            }
        })
    };
    until("500 acknowledged events and deliveries under way", Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= 500 && rx.all().len() >= 100).then_some(())
    })
    .await;
    child.kill(); // SIGKILL
    publisher.await.unwrap();
    let acked: HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let delivered_before = rx.all().len();
    assert!(tear_tails(dir.path()) > 0);

    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    let (status, ready) = api.raw("GET", "/readyz", None, None).await;
    assert_eq!(status, 200, "{ready}");
    let per_path = |path: &str| -> HashMap<String, usize> {
        let mut m = HashMap::new();
        for r in rx.on(path) {
            *m.entry(r.header("webhook-id").to_string()).or_insert(0) += 1;
        }
        m
    };
    until("every acknowledged event at both receivers", Duration::from_secs(60), || async {
        ["/a", "/b"]
            .iter()
            .all(|p| {
                let got = per_path(p);
                acked.iter().all(|id| got.contains_key(id))
            })
            .then_some(())
    })
    .await;
    let total = rx.all().len();
    let duplicates = total - ["/a", "/b"].iter().map(|p| per_path(p).len()).sum::<usize>();
    eprintln!(
        "crash test: {} events acknowledged, {} deliveries before SIGKILL, {} after restart, {} duplicates",
        acked.len(),
        delivered_before,
        total,
        duplicates
    );
    child.kill();
}

#[tokio::test]
async fn sigkill_in_the_middle_of_retry_schedules_loses_nothing() {
    use crate::support::Behaviour;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    // Each event fails twice, then succeeds on its third attempt, 500 ms apart.
    rx.behave("/flaky", Behaviour::FailFirst { n: 2, status: 503 });
    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    api.subscribe(
        json!({ "url": rx.url("/flaky"), "retry": { "policy": "fixed", "interval": "500ms", "max_attempts": 5 } }),
    )
    .await;
    let events: Vec<_> = (0..200).map(|i| json!({ "id": format!("r-{i}"), "type": "T", "data": i })).collect();
    let (status, _) = api.post("/v1/events/batch", serde_json::Value::Array(events)).await;
    assert_eq!(status, 202);
    // Kill once every event has failed at least once and none has succeeded yet: all 200
    // are somewhere in the retry tiers.
    until("every event's first attempt", Duration::from_secs(30), || async {
        (rx.on("/flaky").len() >= 200).then_some(())
    })
    .await;
    child.kill();
    let attempts_before = rx.on("/flaky").len();

    let (mut child, _) = spawn_herald(dir.path());
    let succeeded = || {
        let mut per_id: HashMap<String, usize> = HashMap::new();
        for r in rx.on("/flaky") {
            *per_id.entry(r.header("webhook-id").to_string()).or_insert(0) += 1;
        }
        per_id.values().filter(|&&n| n >= 3).count()
    };
    until("all 200 events delivered on their third attempt", Duration::from_secs(60), || async {
        (succeeded() == 200).then_some(())
    })
    .await;
    eprintln!(
        "retry crash test: {} attempts before SIGKILL, {} in all for 200 events (600 without the crash)",
        attempts_before,
        rx.on("/flaky").len()
    );
    child.kill();
}

/// A stop by SIGTERM checkpoints the embedded log, emptying the group journal, so the next start
/// has nothing to write back (it used to rewrite up to 64 MiB at every start) — shown by opening
/// the stopped server's log with every write to a segment failing — and every acknowledged event
/// is in it. (That the segments are synced first is the log's own test's:
/// `a_clean_close_leaves_nothing_for_the_next_open_to_write_back`.)
#[tokio::test]
async fn a_sigterm_stop_leaves_nothing_for_the_next_start_to_write_back() {
    use herald::log::embedded::{Fault, Faults};
    use herald::log::Log;
    let dir = tempfile::tempdir().unwrap();
    let rx = Receiver::start().await;
    let (mut child, addr) = spawn_herald(dir.path());
    let api = Api::new(addr, TOKEN);
    api.subscribe(json!({ "url": rx.url("/a") })).await;
    let mut acked = Vec::new();
    for batch in 0..4 {
        let ids: Vec<String> = (0..25).map(|i| format!("stop-{batch:03}-{i:03}")).collect();
        let events: Vec<_> = ids.iter().map(|id| json!({ "id": id, "type": "T", "data": {} })).collect();
        let (status, resp) = api
            .raw("POST", "/v1/events/batch", Some(serde_json::Value::Array(events).to_string().into()), Some(TOKEN))
            .await;
        assert_eq!(status, 202, "{resp}");
        acked.extend(ids);
    }
    let pid = rustix::process::Pid::from_raw(child.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || child.0.wait()))
        .await
        .expect("herald exits within 30 s of SIGTERM")
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit}");

    let refused: Faults = Some(Arc::new(|fault: Fault<'_>| match fault {
        Fault::Write(path) if path.extension().is_some_and(|e| e == "log") => {
            Err(std::io::Error::other("injected EIO"))
        }
        _ => Ok(()),
    }));
    let log = open_log(dir.path(), refused).await.expect("a log with nothing to write back");
    let deliveries = log.read_all(&herald::topics::Topics::new("herald.").deliveries).await.unwrap();
    let held: String = deliveries.iter().map(|r| String::from_utf8_lossy(&r.value).into_owned()).collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !held.contains(id.as_str())).collect();
    assert!(missing.is_empty(), "acknowledged events missing from the log: {missing:?}");
}

/// A second SIGTERM (or Ctrl-C) during the drain ends the process at once — the first waited
/// out its drain however many followed, up to tens of seconds; the log is then as after a
/// SIGKILL, which the tests above cover. SIGHUP (a closed terminal) drains as SIGTERM does,
/// where it killed the process on the spot.
#[tokio::test]
async fn a_second_sigterm_ends_the_drain_at_once_and_sighup_drains() {
    use rustix::process::{kill_process, Pid, Signal};
    for (signals, within) in
        [(vec![Signal::TERM, Signal::TERM], Duration::from_secs(3)), (vec![Signal::HUP], Duration::from_secs(30))]
    {
        let dir = tempfile::tempdir().unwrap();
        let rx = Receiver::start().await;
        rx.behave("/hang", crate::support::Behaviour::Hang);
        let (mut child, addr, log) = crate::support::spawn_herald_logged(dir.path(), &[("RUST_LOG", "info")]);
        let api = Api::new(addr, TOKEN);
        // A test ping to a receiver that never answers, for 20 s: it holds the drain open.
        let sub = api.subscribe(json!({ "url": rx.url("/hang"), "timeout": "20s" })).await;
        let ping = format!("/v1/subscriptions/{}/test", sub["id"].as_str().unwrap());
        // (Its connection ends with the process: an answer is not waited for.)
        let pinging = tokio::spawn(async move { api.try_raw("POST", &ping, Some("{}".into()), Some(TOKEN)).await });
        rx.wait_on("/hang", 1).await;
        let pid = Pid::from_raw(child.0.id() as i32).unwrap();
        let started = std::time::Instant::now();
        for signal in signals.iter() {
            // Each taken before the next is sent (two pending at once are one).
            let n = log.lock().unwrap().matches("shutting down").count();
            kill_process(pid, *signal).unwrap();
            crate::support::eventually("the signal taken", Duration::from_secs(10), || {
                (log.lock().unwrap().matches("shutting down").count() > n).then_some(())
            })
            .await;
        }
        let exit = tokio::time::timeout(within, tokio::task::spawn_blocking(move || child.0.wait()))
            .await
            .unwrap_or_else(|_| panic!("herald still running {within:?} after {signals:?}"))
            .unwrap()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            exit.signal(),
            None,
            "{signals:?}: ended by the signal itself ({exit}) after {:?}",
            started.elapsed()
        );
        pinging.abort();
    }
}

/// Started under `nohup` (SIGHUP ignored), a closing terminal does not stop Herald: the
/// disposition it inherited is kept. Before, the drain's handler was installed over it, and
/// `nohup herald serve &` stopped when its terminal closed.
#[tokio::test]
async fn under_nohup_a_sighup_does_not_stop_herald() {
    use rustix::process::{kill_process, Pid, Signal};
    let dir = tempfile::tempdir().unwrap();
    let (mut child, _addr, log) = crate::support::spawn_herald_nohup(dir.path(), &[("RUST_LOG", "info")]);
    let pid = child.0.id();
    // Listening is said once its signals are set up: SIGHUP is still ignored, not caught.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = |name: &str| {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        u64::from_str_radix(line[name.len()..].trim(), 16).unwrap()
    };
    assert_eq!((mask("SigIgn:") & 1, mask("SigCgt:") & 1), (1, 0), "SIGHUP ignored, not caught");
    kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::HUP).unwrap();
    kill_process(Pid::from_raw(pid as i32).unwrap(), Signal::TERM).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(30), tokio::task::spawn_blocking(move || child.0.wait()))
        .await
        .expect("stopped by the SIGTERM")
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "drained once, for the SIGTERM: {exit}");
    assert_eq!(log.lock().unwrap().matches("shutting down").count(), 1);
}
