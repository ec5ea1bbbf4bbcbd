//! Wiring: open the log, load the catalog, start the dispatcher and the API, and stop them
//! in order. `herald serve` is this plus a signal handler.

use crate::api::{self, AppState};
use crate::catalog::feed::{self, Feed};
use crate::catalog::Router;
use crate::config::{Backend, Config};
use crate::devices::Devices;
use crate::dispatch::{Deliverer, Dispatcher, Observe, OrderedKeys, Settler, ShardLimits, Source};
use crate::event_types::EventTypes;
use crate::history::History;
use crate::ingest::Ingest;
use crate::log::embedded::{EmbeddedConfig, EmbeddedLog, Faults};
use crate::log::kafka::{KafkaConfig, KafkaLog};
use crate::log::{Log, LogError};
use crate::metrics::Metrics;
use crate::registry::{Registry, Rules};
use crate::retry::dead_letters::DeadLetters;
use crate::retry::Retrier;
use crate::tenants::Tenants;
use crate::topics::Topics;
use crate::transport::edge::EdgeHub;
use crate::transport::{HttpSettings, NetworkGuard, Transports};
use rand::RngCore;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Consumer group of the dispatcher.
pub const DISPATCH_GROUP: &str = "herald-dispatch";

/// How long in-flight deliveries may take to finish when stopping.
const DRAIN: Duration = Duration::from_secs(10);

/// Why Herald could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The data directory or admin token file is unusable.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The directory, as configured.
        path: String,
        /// Why it could not be created or read (permissions, a full disk).
        source: std::io::Error,
    },
    /// The log could not be opened.
    #[error("opening the log: {0}")]
    Log(#[from] LogError),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address asked for (`--listen`).
        addr: SocketAddr,
        /// Why (in use, not permitted).
        source: std::io::Error,
    },
    /// A webhook declared in the config file is not valid.
    #[error("config file webhooks: {0}")]
    Webhooks(crate::registry::RegistryError),
    /// The secret key is not usable.
    #[error("secret_key: {0}")]
    Secrets(String),
    /// The delivery history could not be opened.
    #[error("history: {0}")]
    History(String),
}

/// Where the admin token came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenSource {
    /// Config or `HERALD_ADMIN_TOKEN`.
    Configured,
    /// Read from the data directory.
    Stored,
    /// Generated now and stored in the data directory.
    Generated,
}

/// The admin token: configured, else stored in the data dir, else generated and stored.
fn admin_token(config: &Config) -> Result<(String, TokenSource), std::io::Error> {
    if let Some(t) = &config.admin_token {
        return Ok((t.clone(), TokenSource::Configured));
    }
    let path = config.data_dir.join("admin-token");
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok((t.trim().to_string(), TokenSource::Stored)),
        // Empty: a crash came between creating it and its token reaching the disk. It never
        // held a token anyone was given; made again below.
        Ok(_) => std::fs::remove_file(&path)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut raw = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut raw);
    let token = format!("hrld_admin_{}", hex::encode(raw));
    write_private(&path, &token)?;
    Ok((token, TokenSource::Generated))
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    // Its name too, so a crash cannot leave the token printed but not kept.
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// A running Herald.
pub struct Herald {
    /// Address the API listens on.
    pub addr: SocketAddr,
    /// The admin token, to print once when it was generated.
    pub admin_token: String,
    /// Where the token came from (print it once when generated).
    pub token_source: TokenSource,
    stop: watch::Sender<bool>,
    api: JoinHandle<()>,
    dispatcher: JoinHandle<()>,
    follower: (watch::Sender<bool>, JoinHandle<()>),
    history: Option<(watch::Sender<bool>, Arc<History>)>,
    metrics: Arc<Metrics>,
    log: Arc<dyn Log>,
    /// The data directory's lock, held while this server runs.
    _lock: std::fs::File,
}

/// Opens the configured backend with every topic Herald uses.
async fn open_log(config: &Config, topics: &Topics, faults: &Faults) -> Result<Arc<dyn Log>, LogError> {
    let specs = topics.specs(&config.log, &config.history);
    Ok(match config.log.backend {
        Backend::Embedded => {
            EmbeddedLog::open(EmbeddedConfig {
                dir: config.data_dir.join("log"),
                segment_bytes: config.log.segment_bytes,
                flush_interval: config.log.flush_interval.0,
                topics: specs,
                journal_bytes: crate::log::embedded::DEFAULT_JOURNAL_BYTES,
                faults: faults.clone(),
            })
            .await?
        }
        Backend::Kafka => {
            KafkaLog::open(KafkaConfig {
                brokers: config.log.brokers.clone(),
                replication: config.log.replication,
                properties: config.log.kafka.0.clone(),
                topics: specs,
                drain: DRAIN,
                retention: config.log.retention.0,
                min_insync_replicas: config.log.min_insync_replicas,
                max_record_bytes: config.ingest.max_record_bytes(),
            })
            .await?
        }
    })
}

/// The catalog's owners, loaded and following the topic.
struct Stores {
    /// The registry topic as followed here: requests wait on it to see other processes' changes.
    catalog: Arc<Feed>,
    registry: Arc<Registry>,
    tenants: Arc<Tenants>,
    devices: Arc<Devices>,
    event_types: Arc<EventTypes>,
    /// Stopped last: deliveries finishing during shutdown may still write (disable on a 410).
    follower: (watch::Sender<bool>, JoinHandle<()>),
}

/// Installs the key secrets are sealed with, or says once that they are stored as text.
fn seal_secrets(config: &Config) -> Result<bool, StartError> {
    let key = config.sealing_key().map_err(|e| StartError::Secrets(e.to_string()))?;
    let Some(key) = key else {
        crate::model::secret::install(None);
        tracing::warn!(
            "no secret key: subscription secrets are stored in the catalog as text; set HERALD_SECRET_KEY (32 bytes, \
             base64) to encrypt them"
        );
        return Ok(false);
    };
    let keys = crate::model::secret::Keys::new(&key, &config.previous_secret_keys)
        .map_err(|e| StartError::Secrets(e.to_string()))?;
    crate::model::secret::install(Some(keys));
    Ok(true)
}

/// Reads the catalog once (subscriptions, tenants and devices share it), then follows it, so
/// changes made through any process apply here.
async fn open_catalog(log: &Arc<dyn Log>, topics: &Topics, config: &Config) -> Result<Stores, StartError> {
    let sealed = seal_secrets(config)?;
    let records = log.read_all(&topics.subscriptions).await?;
    let next = feed::next_offset(&records);
    let (feed, applied) = Feed::new(log.clone(), topics.subscriptions.clone(), next);
    let feed = Arc::new(feed);
    let guard = NetworkGuard::new(config.network.allow.clone()).denying(config.network.deny.clone());
    let proxies = egress_proxies(config).into_keys().collect();
    let rules = Rules { guard, tls_files_dir: config.http.tls_files_dir.clone(), proxies, tenant_folders: Vec::new() };
    let registry = Arc::new(Registry::load(feed.clone(), &records, rules, config.health.clone()));
    // Started without the key they were sealed with (or with another), those subscriptions
    // were left out, and publishes for them answered `202` with none of their deliveries made.
    let unopened = registry.unopened();
    match unopened {
        0 => {}
        _ if config.secret_key_lost => {} // deleted below, once the catalog is followed
        n => {
            return Err(StartError::Secrets(format!(
                "{n} subscriptions in the catalog hold secrets sealed with a key not given: set secret_key (or \
                 secret_key_file) to the key they were sealed with, or keep it in previous_secret_keys after a \
                 rotation; if it is lost for good, secret_key_lost = true deletes them at start"
            )))
        }
    }
    let tenants = Arc::new(Tenants::load(feed.clone(), &records));
    let devices = Arc::new(Devices::load(feed.clone(), &records));
    if !log.shared() {
        devices.forget_presences();
    }
    let event_types = Arc::new(EventTypes::load(feed.clone(), &records));
    let router = Router::new(registry.clone(), tenants.clone(), devices.clone(), event_types.clone());
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(feed::follow(log.clone(), topics.subscriptions.clone(), next, applied, router, stopped));
    if unopened > 0 {
        let n = registry.forget_unopened().await.map_err(|e| StartError::Secrets(e.to_string()))?;
        tracing::warn!(subscriptions = n, "deleted: their secrets were sealed with a key lost (secret_key_lost)");
    }
    registry.sync_static(&config.static_webhooks()).await.map_err(StartError::Webhooks)?;
    if sealed {
        registry.reseal(&records).await.map_err(StartError::Webhooks)?;
    }
    Ok(Stores { catalog: feed, registry, tenants, devices, event_types, follower: (stop, task) })
}

/// The secret processes authenticate edge forwards with: configured, or derived from the
/// admin token (so processes sharing one agree without another setting, and a forward secret
/// that leaks is not the admin token).
fn forward_secret(config: &Config, admin_token: &str) -> String {
    use hmac::Mac;
    if let Some(s) = &config.edge.forward_secret {
        return s.clone();
    }
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(admin_token.as_bytes()).expect("any key length");
    mac.update(b"herald edge forward v1");
    hex::encode(mac.finalize().into_bytes())
}

/// The named egress proxies (`http.proxies`): the one list both the transport and the checks of
/// a subscription's `proxy` are made from (their URLs were checked when the config loaded).
fn egress_proxies(config: &Config) -> std::collections::BTreeMap<String, crate::transport::http::Proxy> {
    let parse = |url: &String| crate::transport::http::Proxy::parse(url, &config.http.no_proxy);
    config.http.proxies.iter().filter_map(|(name, url)| Some((name.clone(), parse(url)?))).collect()
}

/// Every transport, edge delivery through `hub` included.
fn transports(config: &Config, hub: Arc<EdgeHub>) -> Transports {
    let settings = HttpSettings {
        connect_timeout: config.http.connect_timeout.0,
        pool_idle_timeout: config.http.pool_idle_timeout.0,
        pool_max_idle_per_host: config.http.pool_max_idle_per_host,
        kept_connections: kept_connections(),
        response_bytes: config.history.kept_response_bytes(),
        tls_files_dir: config.http.tls_files_dir.clone(),
        proxy: config.http.proxy.as_ref().and_then(|p| crate::transport::http::Proxy::parse(p, &config.http.no_proxy)),
        proxies: egress_proxies(config),
    };
    let guard = NetworkGuard::new(config.network.allow.clone()).denying(config.network.deny.clone());
    Transports::new(guard, &settings, config.http.timeout.0).with_edge(hub)
}

/// Starts the dispatcher on every source topic.
fn spawn_dispatcher(
    config: &Config,
    log: &Arc<dyn Log>,
    topics: &Topics,
    deliverer: Arc<Deliverer>,
    metrics: Arc<Metrics>,
    keys: Arc<OrderedKeys>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let limits = ShardLimits {
        window: config.dispatch.window,
        max_uncommitted: config.dispatch.max_uncommitted,
        batch: config.dispatch.batch,
        max_keys: config.dispatch.ordered_max_keys,
        max_hold: config.log.retention.0,
        drain: DRAIN,
    };
    let sources = topics
        .sources()
        .into_iter()
        .map(|(topic, label, delay)| Source { ordered: topic == topics.ordered, topic, label, delay })
        .collect();
    let dispatcher = Dispatcher::new(log.clone(), sources, DISPATCH_GROUP.into(), deliverer, limits, metrics, keys);
    tokio::spawn(async move {
        if let Err(e) = dispatcher.run(stop).await {
            tracing::error!(error = %e, "dispatcher stopped");
        }
    })
}

/// A socket bound to `addr`, not listened on yet (as `TcpListener::bind` makes one: the
/// address reusable at once after a restart).
fn bound(addr: SocketAddr) -> std::io::Result<tokio::net::TcpSocket> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Serves the API on `listener` until `stop` turns true.
fn serve_api(
    config: &Config,
    listener: tokio::net::TcpListener,
    state: AppState,
    stop: watch::Receiver<bool>,
) -> Result<(SocketAddr, JoinHandle<()>), StartError> {
    let listen = |source| StartError::Listen { addr: config.listen, source };
    let addr = listener.local_addr().map_err(listen)?;
    state.edge.advertise(config.advertise_url.clone().unwrap_or_else(|| format!("http://{addr}")));
    let app = api::router(state);
    let mut limits = config.api.clone();
    limits.max_connections = within_open_files(limits.max_connections);
    let task = tokio::spawn(serve_connections(listener, app, limits, stop));
    Ok((addr, task))
}

/// `api.max_connections`, fitted within the descriptors free under the process's open-files
/// limit (first raised to its hard limit): at most half of them, the rest left for webhooks'
/// connections and the log's files. Past the limit (1,024 on many systems, under the default
/// 4,096 connections), idle connections without a token took every descriptor, and then every
/// tenant's new webhook connections and the log's next segment failed. Those already open
/// count — a parent may leave its own open in Herald: half the limit then ran out before the
/// API's share was full, and connections past it waited unaccepted instead of being closed.
fn within_open_files(wanted: usize) -> usize {
    let Some((files, open)) = open_files() else { return wanted };
    let most = (files.saturating_sub(open) / 2).max(16);
    if wanted > most {
        tracing::warn!(
            configured = wanted,
            open_files = files,
            already_open = open,
            "api.max_connections lowered to {most}, half of the descriptors free under the open-files limit (raise it: ulimit -n, LimitNOFILE)"
        );
        return most;
    }
    wanted
}

/// The process's open-files limit (first raised to its hard limit) and how many descriptors
/// are open now; `None` when there is no limit.
fn open_files() -> Option<(usize, usize)> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current.is_some() && limit.maximum != limit.current {
        let raised = Rlimit { current: limit.maximum, maximum: limit.maximum };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            limit = raised;
        }
    }
    let files = usize::try_from(limit.current?).unwrap_or(usize::MAX);
    // The directory's own descriptor is listed too; where there is no /proc, none are counted.
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |fds| fds.count().saturating_sub(1));
    Some((files, open))
}

/// Webhook connections kept open for reuse: [`crate::transport::http::KEPT_CONNECTIONS`], or a
/// quarter of the descriptors free under the open-files limit if that is fewer (the API takes
/// half, see [`within_open_files`]; the rest is for connections in use and the log's files).
fn kept_connections() -> usize {
    let most = crate::transport::http::KEPT_CONNECTIONS;
    open_files().map_or(most, |(files, open)| (files.saturating_sub(open) / 4).clamp(16, most))
}

/// The API's accept loop: at most `api.max_connections` at once (more are closed at once), each
/// given `api.header_read_timeout` to send its headers (a slow client cannot hold a connection
/// open for free) — its first request's too: one that starts none in that time (silent, or
/// stalled in an HTTP/2 preface, which hyper-util's version detection waits on without a
/// timer) is closed — upgrades allowed (edge agents' WebSockets), HTTP/1 only (no client of the
/// API speaks HTTP/2, and an idle HTTP/2 connection has no header timeout); on stop,
/// connections finish their requests (bounded).
async fn serve_connections(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    limits: crate::config::ApiConfig,
    mut stop: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new()).http1_only();
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout.0);
    let first_request_within = limits.header_read_timeout.0;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = crate::shutdown::stopped(&mut stop) => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors, most often: accept fails at once until some close, so
                // trying again at once would spin a core. (axum's own loop waits a second.)
                metrics::counter!(crate::metrics::API_CONNECTIONS_REFUSED).increment(1);
                tracing::warn!(error = %e, "cannot accept an API connection; pausing accepts for 50 ms");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(crate::metrics::API_CONNECTIONS_REFUSED).increment(1);
            continue; // dropping the stream closes it
        };
        let _ = stream.set_nodelay(true);
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (app, seen) = (app.clone(), started.clone());
        let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
            seen.store(true, std::sync::atomic::Ordering::Relaxed);
            tower::ServiceExt::oneshot(app.clone(), req)
        });
        let stream = WriteStall::new(stream, limits.request_timeout.0);
        let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).into_owned();
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let no_request = async {
                tokio::time::sleep(first_request_within).await;
                if started.load(std::sync::atomic::Ordering::Relaxed) {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                _ = connection => {}
                _ = no_request => {} // dropping the connection closes it
            }
            drop(slot);
        });
    }
    // Closed before the drain: left open, the kernel still completed new connections that no
    // one would answer — health checks hung instead of being refused, and load balancers
    // went on sending publishes to a process stopping.
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown()).await.is_err() {
        tracing::warn!("API connections still open after the drain; closing them");
    }
}

/// An API connection whose writes may make no progress for at most `within`, then fail
/// (closing it): a client that sends requests and never reads the answers (its receive window
/// shut) otherwise held its connection slot for good, since nothing else bounds hyper's
/// writes — header and request timeouts end before an answer is written out.
struct WriteStall {
    inner: tokio::net::TcpStream,
    within: Duration,
    /// Since when a write has been waiting, as a timer.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl WriteStall {
    fn new(inner: tokio::net::TcpStream, within: Duration) -> Self {
        WriteStall { inner, within, stalled: None }
    }

    /// What a write that came to `polled` means: progress resets the timer; waiting past
    /// `within` is an error.
    fn watch<T>(&mut self, polled: Poll<std::io::Result<T>>, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let within = self.within;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(within)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {within:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl tokio::io::AsyncRead for WriteStall {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for WriteStall {
    fn poll_write(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(polled, cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(polled, cx)
    }

    fn poll_shutdown(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// What a caller may add to a server beyond its configuration.
#[derive(Default, Clone)]
pub struct Extras {
    /// Observers of every settled delivery, besides metrics. (An attempt's `response` is there
    /// only when a history is kept.)
    pub observers: Vec<Arc<dyn Observe>>,
    /// Faults injected into the embedded log's writes (tests of failing disks).
    pub faults: Faults,
}

/// Starts every stage from `config`.
pub async fn start(config: Config) -> Result<Herald, StartError> {
    start_with(config, Extras::default()).await
}

/// Starts every stage from `config`, with `extras`.
pub async fn start_with(config: Config, extras: Extras) -> Result<Herald, StartError> {
    let data_err = |source| StartError::DataDir { path: config.data_dir.display().to_string(), source };
    crate::log::private::create_dir(&config.data_dir).map_err(data_err)?;
    let lock = crate::log::private::lock_dir(&config.data_dir).map_err(data_err)?;
    // Bound before anything is changed (an admin token made, the file's webhooks written): a
    // start refused for its port leaves nothing behind. Listened on only once every stage is
    // up: until then a connection is refused, not left unanswered in a backlog (a TCP health
    // check passed, and publishes hung through a long journal replay).
    let socket = bound(config.listen).map_err(|source| StartError::Listen { addr: config.listen, source })?;
    crate::telemetry::configure(&config.tracing);
    if crate::log::private::open_to_others(&config.data_dir) {
        tracing::warn!(
            path = %config.data_dir.display(),
            "the data directory can be read by other users; it holds events and subscriptions (chmod 700)"
        );
    }
    let (token, token_source) = admin_token(&config).map_err(data_err)?;
    // The recorder first, so every stage's metrics (the hub's gauges too) are recorded.
    let metrics = Arc::new(Metrics::new());
    let topics = Topics::new(&config.log.topic_prefix);
    let log = crate::metrics::timed(open_log(&config, &topics, &extras.faults).await?);
    let stores = open_catalog(&log, &topics, &config).await?;
    let hub =
        EdgeHub::new(stores.devices.clone(), forward_secret(&config, &token), config.history.kept_response_bytes());
    let transports = transports(&config, hub.clone());
    let retrier = Retrier::new(log.clone(), topics.prefix.clone(), topics.dlq.clone());
    let settler = Settler::new(stores.registry.clone(), retrier);
    let (stop, stop_rx) = watch::channel(false);
    let (history_stop, history_stop_rx) = watch::channel(false);
    let history = if config.history.enabled() {
        let dir = config.data_dir.join("history");
        let started = History::start(
            log.clone(),
            &topics.history,
            &dir,
            config.history.retention.0,
            config.history.index_defer.0,
            &metrics,
            history_stop_rx,
        );
        Some(started.map_err(|e| StartError::History(e.to_string()))?)
    } else {
        None
    };
    let mut deliverer = extras
        .observers
        .iter()
        .fold(Deliverer::new(stores.registry.clone(), transports.clone(), settler), |d, o| d.observed_by(o.clone()))
        .in_flight_bytes(config.dispatch.tenant_in_flight_bytes(&config.ingest));
    let mut ingest = Ingest::new(
        log.clone(),
        stores.registry.clone(),
        topics.deliveries.clone(),
        topics.ordered.clone(),
        config.quotas.fanout_bytes,
        crate::ingest::Budget::new(config.tenant_pending_bytes(), config.pending_bytes()),
    );
    if let Some(h) = &history {
        deliverer = deliverer.recorded_by(h.recorder.clone()).superseded_in(h.index.clone());
        ingest = ingest.recorded_by(h.recorder.clone());
    }
    let deliverer = Arc::new(deliverer);
    let ordered_keys = Arc::new(OrderedKeys::default());
    let dispatcher =
        spawn_dispatcher(&config, &log, &topics, deliverer, metrics.clone(), ordered_keys.clone(), stop_rx.clone());
    let registry = stores.registry.clone();
    let keys = ordered_keys.clone();
    let scraped_log = log.clone();
    metrics.on_scrape(move || {
        metrics::gauge!(crate::metrics::LOG_BROKEN).set(if scraped_log.broken().is_some() { 1.0 } else { 0.0 });
        metrics::gauge!(crate::metrics::ORDERED_KEYS_BLOCKED).set(keys.count() as f64);
        metrics::gauge!(crate::metrics::ORDERED_HELD_BYTES).set(keys.held_bytes() as f64);
        let (total, disabled) = registry.counts();
        metrics::gauge!(crate::metrics::SUBSCRIPTIONS).set(total as f64);
        metrics::gauge!(crate::metrics::SUBSCRIPTIONS_DISABLED).set(disabled as f64);
        metrics::gauge!(crate::metrics::BREAKERS_OPEN).set(registry.breakers_open() as f64);
    });
    let (key_rate, tests, edge_connects) = api::throttles(&config);
    // Read and checked once already, by `seal_secrets`.
    let sealing = config.sealing_key().map_err(|e| StartError::Secrets(e.to_string()))?;
    let state = AppState::new(api::Shared {
        catalog: stores.catalog.clone(),
        registry: stores.registry.clone(),
        ingest: Arc::new(ingest),
        history: history.clone(),
        log: log.clone(),
        admin_token: token.clone().into(),
        dead_letters: Arc::new({
            let dead_letters = DeadLetters::new(log.clone(), topics.dlq.clone(), topics.deliveries.clone());
            match &history {
                Some(h) => dead_letters.recorded_by(Arc::new(ReplaysInHistory(h.recorder.clone()))),
                None => dead_letters,
            }
        }),
        metrics: metrics.clone(),
        ordered_keys,
        ordered_topic: topics.ordered.clone(),
        transports,
        devices: stores.devices.clone(),
        edge: hub,
        rotation_overlap: config.signing.rotation_overlap.0,
        max_event_bytes: config.ingest.max_event_bytes,
        quotas: config.quotas.clone(),
        key_rate,
        edge_connects,
        tests,
        request_timeout: config.api.request_timeout.0,
        tenants: stores.tenants.clone(),
        event_types: stores.event_types.clone(),
        validate_events: config.ingest.validate,
        unknown_event_types: config.ingest.unknown_types,
        portal: api::portal::Portal {
            key: api::portal::PortalKey::derive(&token, sealing.as_deref()),
            ttl: config.api.portal_ttl.0,
            public_url: config.api.public_url.clone(),
        },
    });
    let listener = socket.listen(1024).map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let (addr, api) = serve_api(&config, listener, state, stop_rx)?;
    tracing::info!(%addr, backend = ?config.log.backend, data_dir = %config.data_dir.display(), "herald is serving");
    Ok(Herald {
        addr,
        admin_token: token,
        token_source,
        stop,
        api,
        dispatcher,
        follower: stores.follower,
        history: history.map(|h| (history_stop, h)),
        metrics,
        log,
        _lock: lock,
    })
}

/// How long a stop waits, at most, for history records the log has not taken yet (once the
/// deliveries have ended): their offsets may be committed already, so not written now, they
/// are never written.
const HISTORY_DRAIN: Duration = Duration::from_secs(10);

impl Herald {
    /// The log this server runs on (tests append raw records through it).
    pub fn log(&self) -> Arc<dyn Log> {
        self.log.clone()
    }

    /// Partitions (of the deliveries topic and every retry tier) this process works on now;
    /// on Kafka it grows once the consumer groups have assigned them.
    pub fn partitions_owned(&self) -> usize {
        self.metrics.shards_running()
    }

    /// Stops taking requests, lets in-flight deliveries finish (bounded), commits, closes the log.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.api.await;
        let _ = self.dispatcher.await;
        self.follower.0.send_replace(true);
        let _ = self.follower.1.await;
        if let Some((stop, history)) = self.history {
            let unwritten = history.recorder.drain(HISTORY_DRAIN).await;
            if unwritten > 0 {
                tracing::error!(
                    records = unwritten,
                    "history records the log has not taken are lost at this stop; their attempts are not on record"
                );
            }
            stop.send_replace(true);
            history.stopped().await;
        }
        if let Err(e) = self.log.close().await {
            tracing::error!(error = %e, "closing the log");
        }
    }
}

/// A replayed dead letter is pending again in the delivery history, as a resent event is.
struct ReplaysInHistory(Arc<crate::history::Recorder>);

#[async_trait::async_trait]
impl crate::retry::dead_letters::ReplayRecorder for ReplaysInHistory {
    async fn pending(&self, replayed: &[crate::model::Delivery], at_ms: i64) -> Result<(), LogError> {
        use crate::history::{HistoryRecord, StateRecord};
        let states: Vec<HistoryRecord> =
            replayed.iter().map(|d| HistoryRecord::State(StateRecord::pending(d, at_ms))).collect();
        self.0.append(&states).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A crash between creating the token file and its token reaching the disk leaves it empty:
    /// the next start makes a token again rather than failing for ever on "File exists".
    #[test]
    fn an_empty_admin_token_file_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("admin-token"), "").unwrap();
        let config = Config { data_dir: dir.path().to_path_buf(), admin_token: None, ..Config::default() };
        let (token, source) = admin_token(&config).unwrap();
        assert!(matches!(source, TokenSource::Generated));
        assert_eq!(std::fs::read_to_string(dir.path().join("admin-token")).unwrap(), token);
    }
}
