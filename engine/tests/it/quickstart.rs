//! The README's quick start, run as a newcomer runs it: its shell blocks are taken from the
//! README itself and run with bash in a fresh directory (only `cargo run --release -p …` is
//! swapped for the binaries this test build made), and what they print is checked against
//! what the README promises.

use crate::support::until;
use crate::support::WithoutSuiteKnobs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The `sh` blocks of the README's "Quick start" section, and the block it says the receiver
/// prints.
fn quick_start() -> (Vec<String>, String) {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")).unwrap();
    let start = readme.find("\n## Quick start\n").expect("the README has a Quick start");
    let rest = &readme[start + 1..];
    let section = &rest[..rest[3..].find("\n## ").map_or(rest.len(), |e| e + 3)];
    let mut blocks = Vec::new();
    let mut promised = String::new();
    let mut parts = section.split("```");
    parts.next();
    while let (Some(block), _) = (parts.next(), parts.next()) {
        match block.split_once('\n') {
            Some(("sh", body)) => blocks.push(body.to_string()),
            Some(("", body)) if promised.is_empty() => promised = body.to_string(),
            _ => {}
        }
    }
    (blocks, promised)
}

/// A command group killed as a whole when the test ends (bash and what it started).
struct Group(tokio::process::Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Some(pid) = self.0.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        }
    }
}

fn bash(script: &str, dir: &Path, stdout: Stdio) -> tokio::process::Child {
    tokio::process::Command::new("bash")
        .arg("-ec")
        .arg(script)
        .current_dir(dir)
        .env_remove("HERALD_ADMIN_TOKEN")
        // The suite's own knobs are not settings of the server the README starts.
        .without_suite_knobs()
        .stdout(stdout)
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("bash runs")
}

fn binaries() -> (PathBuf, PathBuf) {
    let herald = PathBuf::from(env!("CARGO_BIN_EXE_herald"));
    let sink = herald.with_file_name("herald-sink");
    assert!(sink.exists(), "{} is missing: build it with `cargo build -p herald-load-tests`", sink.display());
    (herald, sink)
}

async fn listening(port: u16) {
    until(&format!("something listening on {port}"), WAIT, || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await;
}

#[tokio::test]
async fn the_readme_quick_start_runs_as_written() {
    if crate::support::on_kafka() {
        return; // the quick start is the embedded default
    }
    let (blocks, promised) = quick_start();
    assert_eq!(blocks.len(), 3, "server, receiver, client: {blocks:?}");
    let (herald, sink) = binaries();
    let ours = |block: &str| {
        block
            .replace("cargo run --release -p herald-load-tests --bin herald-sink --", &sink.display().to_string())
            .replace("cargo run --release -p herald --", &herald.display().to_string())
    };
    let dir = tempfile::tempdir().unwrap();
    // The README's ports are fixed: a Herald or sink left running from following it would
    // answer in place of the test's, and the test failed far from the cause.
    for port in [8080, 9000] {
        assert!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} is taken (a Herald or herald-sink left running from the quick start?): stop it and run again"
        );
    }

    let _server = Group(bash(&ours(&blocks[0]), dir.path(), Stdio::null()));
    listening(8080).await;
    let printed = dir.path().join("receiver.out");
    let _receiver = Group(bash(&ours(&blocks[1]), dir.path(), Stdio::from(std::fs::File::create(&printed).unwrap())));
    listening(9000).await;
    let client = bash(&ours(&blocks[2]), dir.path(), Stdio::piped());
    let out = tokio::time::timeout(WAIT, client.wait_with_output()).await.expect("the client block ends").unwrap();
    let answers = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the client block failed: {answers}");
    assert!(answers.contains("\"secret\":\"whsec_"), "the subscription's secret is shown: {answers}");
    assert!(answers.contains("\"deliveries\":1"), "the event has one delivery: {answers}");

    let got = until("the receiver printing the webhook", WAIT, || {
        let printed = printed.clone();
        async move { std::fs::read_to_string(printed).ok().filter(|p| p.contains("A-1001")) }
    })
    .await;
    assert!(got.starts_with("POST /hooks\n"), "{got}");
    // Every line the README promises is there, with values of this run.
    for line in promised.lines().filter(|l| !l.is_empty()) {
        let expected: Vec<String> = if line.starts_with('{') {
            // The body: every field the README shows (its values are this run's).
            line.split('"')
                .skip(1)
                .step_by(2)
                .filter(|k| line.contains(&format!("\"{k}\":")))
                .map(|k| format!("\"{k}\":"))
                .collect()
        } else if let Some((name, _)) = line.split_once(": ") {
            vec![format!("\n{name}: ")]
        } else {
            vec![line.to_string()]
        };
        for e in expected {
            assert!(got.contains(&e), "the README promises {line:?} ({e}); the receiver printed:\n{got}");
        }
    }
    assert!(got.contains("\"data\":{\"orderId\":\"A-1001\"}"), "{got}");
}
