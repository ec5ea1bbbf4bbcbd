//! Wiring: open the log, load the registry, start the dispatcher and the API, and stop them
//! in order. `herald serve` is this plus a signal handler.

use crate::api::{self, AppState};
use crate::config::{Backend, Config};
use crate::dispatch::{Deliverer, Dispatcher, ShardLimits, Source};
use crate::ingest::Ingest;
use crate::log::embedded::{EmbeddedConfig, EmbeddedLog};
use crate::log::kafka::{KafkaConfig, KafkaLog};
use crate::log::{Log, LogError, Topics};
use crate::metrics::Metrics;
use crate::registry::feed::{self, Feed};
use crate::registry::Registry;
use crate::retry::dead_letters::DeadLetters;
use crate::retry::Retrier;
use crate::transport::{HttpSettings, NetworkGuard, Transports};
use rand::RngCore;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
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
        /// The path.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// The log could not be opened.
    #[error("opening the log: {0}")]
    Log(#[from] LogError),
    /// The listen address could not be bound.
    #[error("listening on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// A webhook declared in the config file is not valid.
    #[error("config file webhooks: {0}")]
    Webhooks(crate::registry::RegistryError),
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
        Ok(_) => {}
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
    f.sync_all()
}

/// A running Herald.
pub struct Herald {
    /// Address the API listens on.
    pub addr: SocketAddr,
    /// The admin token.
    pub admin_token: String,
    /// Where the token came from (print it once when generated).
    pub token_source: TokenSource,
    stop: watch::Sender<bool>,
    api: JoinHandle<()>,
    dispatcher: JoinHandle<()>,
    follower: (watch::Sender<bool>, JoinHandle<()>),
    metrics: Arc<Metrics>,
    log: Arc<dyn Log>,
}

/// Opens the configured backend with every topic Herald uses.
async fn open_log(config: &Config, topics: &Topics) -> Result<Arc<dyn Log>, LogError> {
    let specs = topics.specs(config.log.partitions);
    Ok(match config.log.backend {
        Backend::Embedded => {
            EmbeddedLog::open(EmbeddedConfig {
                dir: config.data_dir.join("log"),
                segment_bytes: config.log.segment_bytes,
                flush_interval: config.log.flush_interval.0,
                topics: specs,
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
            })
            .await?
        }
    })
}

/// Starts every stage from `config`.
pub async fn start(config: Config) -> Result<Herald, StartError> {
    let data_err = |source| StartError::DataDir { path: config.data_dir.display().to_string(), source };
    std::fs::create_dir_all(&config.data_dir).map_err(data_err)?;
    let (token, token_source) = admin_token(&config).map_err(data_err)?;

    let topics = Topics::new(&config.log.topic_prefix);
    let log = open_log(&config, &topics).await?;
    let guard = NetworkGuard::new(config.network.allow.clone());
    // One read of the registry topic serves subscriptions and tenants alike.
    let registry_records = log.read_all(&topics.subscriptions).await?;
    let next = feed::next_offset(&registry_records);
    let (feed, applied) = Feed::new(log.clone(), topics.subscriptions.clone(), next);
    let feed = Arc::new(feed);
    let registry = Arc::new(Registry::load(feed.clone(), &registry_records, guard.clone(), config.health.clone()));
    let tenants = Arc::new(crate::tenants::Tenants::load(feed.clone(), &registry_records));
    let devices = Arc::new(crate::edge::devices::Devices::load(feed, &registry_records));
    drop(registry_records);
    let (stop, stop_rx) = watch::channel(false);
    // Stopped last: deliveries finishing during shutdown may still write (disable on a 410).
    let (follow_stop, follow_rx) = watch::channel(false);
    // Every process follows the registry topic, so changes made through any of them apply here.
    let follower = {
        let (registry, tenants, devices) = (registry.clone(), tenants.clone(), devices.clone());
        let apply = move |rec: &crate::log::LogRecord| {
            registry.apply(rec);
            tenants.apply(rec);
            devices.apply(rec);
        };
        tokio::spawn(feed::follow(log.clone(), topics.subscriptions.clone(), next, applied, apply, follow_rx))
    };
    registry.sync_static(&config.static_webhooks()).await.map_err(StartError::Webhooks)?;

    let settings = HttpSettings {
        connect_timeout: config.http.connect_timeout.0,
        pool_idle_timeout: config.http.pool_idle_timeout.0,
        pool_max_idle_per_host: config.http.pool_max_idle_per_host,
    };
    // The recorder first, so every stage's metrics (the hub's gauge too) are recorded.
    let metrics = Arc::new(Metrics::new());
    let edge = crate::edge::hub::EdgeHub::new(devices.clone(), token.clone());
    let transports = Transports::new(guard, &settings, config.http.timeout.0).with_edge(edge.clone());
    let test_transports = transports.clone();
    let retrier = Retrier::new(log.clone(), registry.clone(), topics.prefix.clone(), topics.dlq.clone());
    let deliverer = Arc::new(Deliverer::new(registry.clone(), transports, retrier));
    let limits = ShardLimits {
        window: config.dispatch.window,
        max_uncommitted: config.dispatch.max_uncommitted,
        batch: config.dispatch.batch,
        drain: DRAIN,
    };
    let label = |topic: &str| topic.strip_prefix(&topics.prefix).unwrap_or(topic).to_string();
    let mut sources =
        vec![Source { topic: topics.deliveries.clone(), label: label(&topics.deliveries), delay: Duration::ZERO }];
    sources.extend(topics.tiers.iter().map(|(topic, delay)| Source {
        topic: topic.clone(),
        label: label(topic),
        delay: *delay,
    }));
    let dispatcher = Dispatcher::new(log.clone(), sources, DISPATCH_GROUP.into(), deliverer, limits, metrics.clone());
    let dispatcher = {
        let stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = dispatcher.run(stop_rx).await {
                tracing::error!(error = %e, "dispatcher stopped");
            }
        })
    };

    let ingest = Arc::new(Ingest::new(log.clone(), registry.clone(), topics.deliveries.clone()));
    let dead_letters = Arc::new(DeadLetters::new(log.clone(), topics.dlq.clone(), topics.deliveries.clone()));
    let (log_handle, metrics_handle, edge_hub) = (log.clone(), metrics.clone(), edge.clone());
    let state = AppState {
        registry,
        ingest,
        log,
        admin_token: token.clone().into(),
        dead_letters,
        metrics,
        transports: test_transports,
        devices,
        edge,
        rotation_overlap: config.signing.rotation_overlap.0,
        tenants,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
    edge_hub.advertise(config.advertise_url.clone().unwrap_or_else(|| format!("http://{addr}")));
    let app = api::router(state);
    let api = {
        let mut stop_rx = stop_rx.clone();
        tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { crate::shutdown::stopped(&mut stop_rx).await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "API server failed");
            }
        })
    };
    tracing::info!(%addr, backend = ?config.log.backend, data_dir = %config.data_dir.display(), "herald is serving");
    Ok(Herald {
        addr,
        admin_token: token,
        token_source,
        stop,
        api,
        dispatcher,
        follower: (follow_stop, follower),
        metrics: metrics_handle,
        log: log_handle,
    })
}

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
        if let Err(e) = self.log.close().await {
            tracing::error!(error = %e, "closing the log");
        }
    }
}
