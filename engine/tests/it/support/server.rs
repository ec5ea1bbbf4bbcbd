//! Herald under test: in-process on a temporary data dir (on the embedded log, or on
//! librdkafka's mock cluster when `HERALD_TEST_BACKEND=kafka`), or as a child process. Both
//! take their settings from one list ([`ENV`]).

use super::{eventually, Api, TOKEN};
use herald::config::Config;
use herald::server::Extras;
use std::net::SocketAddr;
use std::time::Duration;

/// The settings every Herald under test runs with, in-process or as a child: the admin
/// token, receivers on loopback allowed, offsets flushed often, breakers that pause
/// briefly so tests on test timescales still see them at work, and the history indexed at
/// once (its deferral under load, tested in `history::tests`, would otherwise hold what a
/// test's first history query sees whenever the whole suite keeps its workers busy).
pub const ENV: &[(&str, &str)] = &[
    ("HERALD_ADMIN_TOKEN", TOKEN),
    ("HERALD_NETWORK_ALLOW", "127.0.0.0/8"),
    ("HERALD_LOG_FLUSH_INTERVAL", "20ms"),
    ("HERALD_HEALTH_BREAKER_PAUSE", "200ms"),
    ("HERALD_HEALTH_BREAKER_MAX_PAUSE", "1s"),
    ("HERALD_HISTORY_INDEX_DEFER", "0s"),
];

/// Config for an in-process server on a temporary data dir.
pub fn config(data_dir: &std::path::Path) -> Config {
    let mut env: Vec<(String, String)> = ENV.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    env.push(("HERALD_LISTEN".into(), "127.0.0.1:0".into()));
    let mut c = Config::load(None, &env).unwrap();
    c.data_dir = data_dir.to_path_buf();
    c
}

/// With `RUST_LOG` set, in-process servers log into the test's output.
pub fn trace_to_test_output() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Which log backend the in-process tests run on: `HERALD_TEST_BACKEND=kafka` runs them on
/// the librdkafka mock cluster (a real Kafka-protocol broker in-process), else embedded.
pub fn on_kafka() -> bool {
    std::env::var("HERALD_TEST_BACKEND").is_ok_and(|b| b == "kafka")
}

/// A Kafka-protocol broker for one test: librdkafka's mock cluster, with Herald's topics.
pub struct MockKafka(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>);

impl MockKafka {
    pub fn start(partitions: u32) -> MockKafka {
        Self::laid_out(partitions, 1)
    }

    /// As [`MockKafka::start`], the catalog topic made (by an operator, say) with
    /// `catalog_partitions`.
    pub fn laid_out(partitions: u32, catalog_partitions: u32) -> MockKafka {
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        // The mock broker has no CreateTopics: lay the topics out as Herald would.
        let layout = herald::config::LogConfig { partitions, ..Default::default() };
        for spec in herald::topics::Topics::new("herald.").specs(&layout, &Default::default()) {
            let n = if spec.compacted { catalog_partitions } else { spec.partitions };
            cluster.create_topic(&spec.name, n as i32, 1).expect("mock topic");
        }
        MockKafka(cluster)
    }

    /// Points `config` at this broker.
    /// Where clients of its own (a test reading a topic as it is) connect.
    pub fn bootstrap_servers(&self) -> String {
        self.0.bootstrap_servers()
    }

    pub fn configure(&self, config: &mut Config) {
        config.log.backend = herald::config::Backend::Kafka;
        config.log.brokers = self.0.bootstrap_servers();
        config.log.replication = 1;
    }
}

/// Starts Herald; on Kafka, waits until the consumer groups have handed it every partition
/// (the broker holds a new group back about 3 s), so tests time deliveries, not group joins.
async fn started(config: Config, kafka: bool, extras: Extras) -> herald::server::Herald {
    let all = config.log.partitions as usize * herald::topics::Topics::new("herald.").sources().len();
    let herald = herald::server::start_with(config, extras).await.unwrap();
    if kafka {
        eventually("every partition assigned", Duration::from_secs(30), || {
            (herald.partitions_owned() == all).then_some(())
        })
        .await;
    }
    herald
}

/// A running in-process Herald with its data dir (and its broker, on Kafka).
pub struct TestHerald {
    pub herald: herald::server::Herald,
    pub api: Api,
    pub dir: tempfile::TempDir,
    config: Config,
    kafka: Option<MockKafka>,
    extras: Extras,
}

impl TestHerald {
    pub async fn start() -> TestHerald {
        Self::start_with(|_| {}).await
    }

    /// Starts with a config adjusted by `tweak`, on the backend the suite runs on.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHerald {
        Self::start_with_extras(tweak, Extras::default()).await
    }

    /// Starts with a config adjusted by `tweak` and `extras` (observers, injected faults).
    pub async fn start_with_extras(tweak: impl FnOnce(&mut Config), extras: Extras) -> TestHerald {
        trace_to_test_output();
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        tweak(&mut config);
        let kafka = on_kafka().then(|| MockKafka::start(config.log.partitions));
        if let Some(k) = &kafka {
            k.configure(&mut config);
        }
        let herald = started(config.clone(), kafka.is_some(), extras.clone()).await;
        let api = Api::new(herald.addr, TOKEN);
        TestHerald { herald, api, dir, config, kafka, extras }
    }

    /// Partitions of each topic.
    pub fn partitions(&self) -> u32 {
        self.config.log.partitions
    }

    /// Stops the server and starts it again on the same data and broker.
    pub async fn restart(self) -> TestHerald {
        self.restart_after(async {}).await
    }

    /// Stops the server, waits for `meanwhile` (Herald down for a while), and starts it again
    /// on the same data and broker.
    pub async fn restart_after(self, meanwhile: impl std::future::Future<Output = ()>) -> TestHerald {
        let TestHerald { herald, api: _, dir, config, kafka, extras } = self;
        herald.stop().await;
        meanwhile.await;
        let herald = started(config.clone(), kafka.is_some(), extras.clone()).await;
        let api = Api::new(herald.addr, TOKEN);
        TestHerald { herald, api, dir, config, kafka, extras }
    }

    /// Stops the server and starts it again on the same data and broker, its config first
    /// changed by `tweak` (an operator editing the file between runs).
    pub async fn restart_with(mut self, tweak: impl FnOnce(&mut Config)) -> TestHerald {
        tweak(&mut self.config);
        self.restart().await
    }

    /// Stops the server and returns every dead letter in its log.
    pub async fn stop_and_read_dlq(self) -> Vec<herald::model::DeadLetter> {
        if self.kafka.is_none() {
            self.herald.stop().await;
            return read_dlq(self.dir.path()).await;
        }
        let log = self.herald.log();
        self.herald.stop().await;
        let records = log.read_all("herald.dlq").await.unwrap();
        drop(self.kafka);
        dead_letters(records)
    }
}

fn dead_letters(records: Vec<herald::log::LogRecord>) -> Vec<herald::model::DeadLetter> {
    use herald::retry::dead_letters::{decode, DlqRecord};
    records
        .into_iter()
        .filter_map(|r| match decode(r.value).expect("dead-letter record") {
            DlqRecord::Entry { entry, .. } => Some(*entry),
            DlqRecord::Replayed(_) => None,
        })
        .collect()
}

/// Opens the embedded log of a stopped server's data dir (its default topics), with `faults`
/// injected into its appends.
pub async fn open_log(
    data_dir: &std::path::Path,
    faults: herald::log::embedded::Faults,
) -> Result<std::sync::Arc<herald::log::embedded::EmbeddedLog>, herald::log::LogError> {
    use herald::log::embedded::{EmbeddedConfig, EmbeddedLog};
    EmbeddedLog::open(EmbeddedConfig {
        dir: data_dir.join("log"),
        segment_bytes: 64 << 20,
        flush_interval: Duration::from_secs(1),
        topics: herald::topics::Topics::new("herald.")
            .specs(&herald::config::LogConfig::default(), &Default::default()),
        journal_bytes: herald::log::embedded::DEFAULT_JOURNAL_BYTES,
        faults,
    })
    .await
}

/// Reads the dead-letter topic of a stopped server's data dir.
pub async fn read_dlq(data_dir: &std::path::Path) -> Vec<herald::model::DeadLetter> {
    use herald::log::Log;
    let log = open_log(data_dir, None).await.unwrap();
    dead_letters(log.read_all(&herald::topics::Topics::new("herald.").dlq).await.unwrap())
}

/// A WebSocket request to connect to `server`'s edge endpoint as a device presenting `token`.
pub fn edge_connect_request(
    server: SocketAddr,
    token: &str,
) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let path = herald::transport::edge::protocol::CONNECT_PATH;
    let mut request = format!("ws://{server}{path}").into_client_request().unwrap();
    request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

/// How an edge connection ended within `within`: `Some` with the close frame Herald sent, if
/// any (`Some(None)`: closed without one, or dropped); `None` if it was still open.
pub async fn ws_ended<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    within: Duration,
) -> Option<Option<tokio_tungstenite::tungstenite::protocol::CloseFrame>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    tokio::time::timeout(within, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(frame))) => return frame,
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .ok()
}

/// The suite's own settings (`./scripts/test`'s knobs), not Herald's: a process the suite
/// starts is not given them, since Herald refuses `HERALD_*` settings it does not know.
const SUITE_KNOBS: [&str; 3] = ["HERALD_TEST_BACKEND", "HERALD_TANSU", "HERALD_CHROMIUM"];

/// A command that leaves out [`SUITE_KNOBS`].
pub trait WithoutSuiteKnobs {
    fn without_suite_knobs(&mut self) -> &mut Self;
}

impl WithoutSuiteKnobs for std::process::Command {
    fn without_suite_knobs(&mut self) -> &mut Self {
        for knob in SUITE_KNOBS {
            self.env_remove(knob);
        }
        self
    }
}

impl WithoutSuiteKnobs for tokio::process::Command {
    fn without_suite_knobs(&mut self) -> &mut Self {
        self.as_std_mut().without_suite_knobs();
        self
    }
}

/// `herald serve` on a free port over `data_dir`, with the suite's settings and none of its
/// own knobs — not started: the one place such a command is made.
pub fn serve_command(data_dir: &std::path::Path) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(data_dir);
    command.envs(ENV.iter().copied()).without_suite_knobs();
    command
}

/// Starts `herald serve` on a free port and returns it with its address.
pub fn spawn_herald(data_dir: &std::path::Path) -> (ChildGuard, SocketAddr) {
    spawn_herald_with(data_dir, &[])
}

/// Starts `herald serve` with extra environment variables.
pub fn spawn_herald_with(data_dir: &std::path::Path, env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    spawn_herald_as(data_dir, env, std::process::Stdio::inherit(), None, false)
}

/// Starts `herald serve` allowed at most `files` open files (soft and hard limit alike), with
/// `already_open` descriptors open before it starts (as a parent that leaks its own leaves them).
pub fn spawn_herald_with_files(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
    files: u64,
    already_open: u32,
) -> (ChildGuard, SocketAddr) {
    spawn_herald_as(data_dir, env, std::process::Stdio::inherit(), Some((files, already_open)), false)
}

/// Starts `herald serve` with extra environment variables, its log (stderr) kept: what it has
/// written so far is in the returned string.
pub fn spawn_herald_logged(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (ChildGuard, SocketAddr, std::sync::Arc<std::sync::Mutex<String>>) {
    spawn_herald_logged_as(data_dir, env, false)
}

/// As [`spawn_herald_logged`], started as `nohup` starts it: SIGHUP ignored.
pub fn spawn_herald_nohup(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
) -> (ChildGuard, SocketAddr, std::sync::Arc<std::sync::Mutex<String>>) {
    spawn_herald_logged_as(data_dir, env, true)
}

fn spawn_herald_logged_as(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
    ignore_hangup: bool,
) -> (ChildGuard, SocketAddr, std::sync::Arc<std::sync::Mutex<String>>) {
    let (mut guard, addr) = spawn_herald_as(data_dir, env, std::process::Stdio::piped(), None, ignore_hangup);
    let stderr = guard.0.stderr.take().unwrap();
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
            let mut kept = kept.lock().unwrap();
            kept.push_str(&line);
            kept.push('\n');
        }
    });
    (guard, addr, log)
}

fn spawn_herald_as(
    data_dir: &std::path::Path,
    env: &[(&str, &str)],
    stderr: std::process::Stdio,
    files: Option<(u64, u32)>,
    ignore_hangup: bool,
) -> (ChildGuard, SocketAddr) {
    use std::os::unix::process::CommandExt;
    let mut command = serve_command(data_dir);
    let limit = files.map(|(files, _)| libc::rlimit { rlim_cur: files, rlim_max: files });
    let already_open = files.map_or(0, |(_, open)| open);
    // SAFETY: between fork and exec only close_range, setrlimit, dup and signal are called,
    // each async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            // The test process's own descriptors (librdkafka's pipes are not close-on-exec)
            // would be the child's too, dozens of them while Kafka tests run beside: closed at
            // exec, so every Herald starts as a service does.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
            // Duplicated before the limit is lowered: the test process's descriptors, closed
            // only at exec, may still fill every number under it.
            for _ in 0..already_open {
                if libc::dup(0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(limit) = limit {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Set either way: run under `nohup` (as a suite in the background may be), the
            // tests' process ignores SIGHUP, and every Herald it starts would inherit that.
            let hangup = if ignore_hangup { libc::SIG_IGN } else { libc::SIG_DFL };
            if libc::signal(libc::SIGHUP, hangup) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .env("RUST_LOG", "warn")
        // The caller's variables last, so they win over the defaults above.
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("herald binary runs");
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let addr = loop {
        let line = lines.next().expect("herald printed its address").unwrap();
        if let Some(a) = line.strip_prefix("herald listening on http://") {
            break a.parse().unwrap();
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe; a gap in a topic's
    // offsets taken as final (records never served) is said in the test's output, so a
    // shortfall a test sees can be told from one Herald made.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if line.contains("never served") {
                eprintln!("herald {addr}: {line}");
            }
        }
    });
    (ChildGuard(child), addr)
}

/// A child process that is killed when the guard drops, so a failing test leaves no server
/// behind (holding ports and its parent's output pipes).
pub struct ChildGuard(pub std::process::Child);

impl ChildGuard {
    /// SIGKILL, and reap.
    pub fn kill(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
