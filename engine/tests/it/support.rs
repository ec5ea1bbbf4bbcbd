//! Test fixtures: the real server in-process or as a child process, a loopback hyper
//! receiver that records every request, and a small API client.

use bytes::Bytes;
use herald::config::Config;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

pub const TOKEN: &str = "test-admin-token-0123456789";

/// Polls `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `check` until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One request as the receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }
}

/// How the receiver answers on a path.
#[derive(Debug, Clone, Copy)]
pub enum Behaviour {
    /// Always this status.
    Status(u16),
    /// The first `n` requests of each event id get `status`, later ones 200.
    FailFirst { n: usize, status: u16 },
    /// Never answer.
    Hang,
    /// `status` with `Retry-After: secs`, for the first request of each event id.
    RetryAfter { status: u16, secs: u64 },
}

/// Serves HTTP/1 on `listener` with `handler`, a task per connection, for the test's life.
pub fn serve_http1<F, Fut>(listener: tokio::net::TcpListener, handler: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let answer = handler(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
}

/// A loopback webhook receiver.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    behaviours: Arc<Mutex<HashMap<String, Behaviour>>>,
    pub arrived: Arc<Notify>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let r = Receiver {
            addr,
            seen: Default::default(),
            status: Arc::new(AtomicU16::new(200)),
            behaviours: Default::default(),
            arrived: Arc::new(Notify::new()),
        };
        let state = r.clone();
        serve_http1(listener, move |req| state.clone().answer(req));
        r
    }

    /// Records a request and answers it as the path's behaviour says.
    async fn answer(self, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let state = self;
        let (parts, body) = req.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let path = parts.uri.path().to_string();
        let id = parts.headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let behaviour = state.behaviours.lock().unwrap().get(&path).copied();
        let earlier = {
            let mut seen = state.seen.lock().unwrap();
            let earlier = seen.iter().filter(|r| r.path == path && r.header("webhook-id") == id).count();
            seen.push(Received {
                path,
                query: parts.uri.query().map(str::to_string),
                headers: parts.headers,
                body,
                at: Instant::now(),
            });
            earlier
        };
        state.arrived.notify_waiters();
        let mut response = Response::builder();
        let status = match behaviour {
            None => state.status.load(Ordering::SeqCst),
            Some(Behaviour::Status(s)) => s,
            Some(Behaviour::FailFirst { n, status }) => {
                if earlier < n {
                    status
                } else {
                    200
                }
            }
            Some(Behaviour::Hang) => std::future::pending().await,
            Some(Behaviour::RetryAfter { status, secs }) => {
                if earlier == 0 {
                    response = response.header("retry-after", secs.to_string());
                    status
                } else {
                    200
                }
            }
        };
        response.status(status).body(Full::new(Bytes::from_static(b"ok"))).unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn respond_on(&self, path: &str, status: u16) {
        self.behave(path, Behaviour::Status(status));
    }

    pub fn behave(&self, path: &str, behaviour: Behaviour) {
        self.behaviours.lock().unwrap().insert(path.to_string(), behaviour);
    }

    pub fn all(&self) -> Vec<Received> {
        self.seen.lock().unwrap().clone()
    }

    pub fn on(&self, path: &str) -> Vec<Received> {
        self.all().into_iter().filter(|r| r.path == path).collect()
    }

    /// Waits until `n` requests have reached `path`.
    pub async fn wait_on(&self, path: &str, n: usize) -> Vec<Received> {
        eventually(&format!("{n} requests on {path}"), Duration::from_secs(20), || {
            let got = self.on(path);
            (got.len() >= n).then_some(got)
        })
        .await
    }
}

/// A small JSON client for the API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(addr: SocketAddr, token: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            token: token.to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn raw(&self, method: &str, path: &str, body: Option<Bytes>, token: Option<&str>) -> (StatusCode, Value) {
        self.try_raw(method, path, body, token).await.expect("API reachable")
    }

    /// Like [`Api::raw`], but a server that is gone is an `Err`, not a panic.
    pub async fn try_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value), String> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.unwrap_or_default())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, value))
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.raw("POST", path, Some(Bytes::from(body.to_string())), Some(&self.token)).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.raw("GET", path, None, Some(&self.token)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.raw("DELETE", path, None, Some(&self.token)).await
    }

    /// Creates a subscription and returns its JSON (secret included).
    pub async fn subscribe(&self, body: Value) -> Value {
        let (status, sub) = self.post("/v1/subscriptions", body).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        sub
    }
}

/// Config for an in-process server on a temporary data dir.
pub fn config(data_dir: &std::path::Path) -> Config {
    let env = vec![
        ("HERALD_ADMIN_TOKEN".to_string(), TOKEN.to_string()),
        ("HERALD_NETWORK_ALLOW".to_string(), "127.0.0.0/8".to_string()),
        ("HERALD_LISTEN".to_string(), "127.0.0.1:0".to_string()),
        ("HERALD_LOG_FLUSH_INTERVAL".to_string(), "20ms".to_string()),
        // Breakers pause briefly, so tests on test timescales still see them at work.
        ("HERALD_HEALTH_BREAKER_PAUSE".to_string(), "200ms".to_string()),
        ("HERALD_HEALTH_BREAKER_MAX_PAUSE".to_string(), "1s".to_string()),
    ];
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
        let cluster = rdkafka::mocking::MockCluster::new(1).expect("mock cluster");
        // The mock broker has no CreateTopics: lay the topics out as Herald would.
        for spec in herald::topics::Topics::new("herald.").specs(partitions) {
            cluster.create_topic(&spec.name, spec.partitions as i32, 1).expect("mock topic");
        }
        MockKafka(cluster)
    }

    /// Points `config` at this broker.
    pub fn configure(&self, config: &mut Config) {
        config.log.backend = herald::config::Backend::Kafka;
        config.log.brokers = self.0.bootstrap_servers();
        config.log.replication = 1;
    }
}

/// Starts Herald; on Kafka, waits until the consumer groups have handed it every partition
/// (the broker holds a new group back about 3 s), so tests time deliveries, not group joins.
async fn started(config: Config, kafka: bool) -> herald::server::Herald {
    let all = config.log.partitions as usize * (1 + herald::retry::tiers::TIERS.len());
    let herald = herald::server::start(config).await.unwrap();
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
}

impl TestHerald {
    pub async fn start() -> TestHerald {
        Self::start_with(|_| {}).await
    }

    /// Starts with a config adjusted by `tweak`, on the backend the suite runs on.
    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestHerald {
        trace_to_test_output();
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(dir.path());
        tweak(&mut config);
        let kafka = on_kafka().then(|| MockKafka::start(config.log.partitions));
        if let Some(k) = &kafka {
            k.configure(&mut config);
        }
        let herald = started(config.clone(), kafka.is_some()).await;
        let api = Api::new(herald.addr, TOKEN);
        TestHerald { herald, api, dir, config, kafka }
    }

    /// Stops the server and starts it again on the same data and broker.
    pub async fn restart(self) -> TestHerald {
        let TestHerald { herald, api: _, dir, config, kafka } = self;
        herald.stop().await;
        let herald = started(config.clone(), kafka.is_some()).await;
        let api = Api::new(herald.addr, TOKEN);
        TestHerald { herald, api, dir, config, kafka }
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

/// Reads the dead-letter topic of a stopped server's data dir.
pub async fn read_dlq(data_dir: &std::path::Path) -> Vec<herald::model::DeadLetter> {
    use herald::log::embedded::{EmbeddedConfig, EmbeddedLog};
    use herald::log::Log;
    use herald::topics::Topics;
    let topics = Topics::new("herald.");
    let log = EmbeddedLog::open(EmbeddedConfig {
        dir: data_dir.join("log"),
        segment_bytes: 64 << 20,
        flush_interval: Duration::from_secs(1),
        topics: topics.specs(8),
    })
    .await
    .unwrap();
    dead_letters(log.read_all(&topics.dlq).await.unwrap())
}

/// Starts `herald serve` on a free port and returns it with its address.
pub fn spawn_herald(data_dir: &std::path::Path) -> (ChildGuard, SocketAddr) {
    spawn_herald_with(data_dir, &[])
}

/// Starts `herald serve` with extra environment variables.
pub fn spawn_herald_with(data_dir: &std::path::Path, env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        .env("HERALD_ADMIN_TOKEN", TOKEN)
        .env("HERALD_NETWORK_ALLOW", "127.0.0.0/8")
        .env("HERALD_LOG_FLUSH_INTERVAL", "50ms")
        .env("HERALD_HEALTH_BREAKER_PAUSE", "200ms")
        .env("HERALD_HEALTH_BREAKER_MAX_PAUSE", "1s")
        .env("RUST_LOG", "warn")
        // The suite's own switch is not a setting of the server.
        .env_remove("HERALD_TEST_BACKEND")
        // The caller's variables last, so they win over the defaults above.
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
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
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
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
