//! Wiring: open the log, load the registry, start the dispatcher and the API, and stop them
//! in order. `herald serve` is this plus a signal handler.

use crate::api::{self, AppState};
use crate::config::{Backend, Config};
use crate::dispatch::{Deliverer, Dispatcher, ShardLimits, Source};
use crate::ingest::Ingest;
use crate::log::embedded::{EmbeddedConfig, EmbeddedLog};
use crate::log::{Log, LogError, Topics};
use crate::metrics::Metrics;
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
    /// The configured backend is not built in yet.
    #[error("log backend {0:?} is not available in this build; use \"embedded\"")]
    Backend(Backend),
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
    log: Arc<EmbeddedLog>,
}

/// Starts every stage from `config`.
pub async fn start(config: Config) -> Result<Herald, StartError> {
    if config.log.backend != Backend::Embedded {
        return Err(StartError::Backend(config.log.backend));
    }
    let data_err = |source| StartError::DataDir { path: config.data_dir.display().to_string(), source };
    std::fs::create_dir_all(&config.data_dir).map_err(data_err)?;
    let (token, token_source) = admin_token(&config).map_err(data_err)?;

    let topics = Topics::new(&config.log.topic_prefix);
    let embedded = EmbeddedLog::open(EmbeddedConfig {
        dir: config.data_dir.join("log"),
        segment_bytes: config.log.segment_bytes,
        flush_interval: config.log.flush_interval.0,
        topics: topics.specs(config.log.partitions),
    })
    .await?;
    let log: Arc<dyn Log> = embedded.clone();
    let guard = NetworkGuard::new(config.network.allow.clone());
    // One read of the registry topic serves subscriptions and tenants alike.
    let registry_records = log.read_all(&topics.subscriptions).await?;
    let registry = Arc::new(Registry::load(
        log.clone(),
        topics.subscriptions.clone(),
        &registry_records,
        guard.clone(),
        config.health.clone(),
    ));
    let tenants = Arc::new(crate::tenants::Tenants::load(log.clone(), topics.subscriptions.clone(), &registry_records));
    drop(registry_records);
    registry.sync_static(&config.webhooks).await.map_err(StartError::Webhooks)?;

    let settings = HttpSettings {
        connect_timeout: config.http.connect_timeout.0,
        pool_idle_timeout: config.http.pool_idle_timeout.0,
        pool_max_idle_per_host: config.http.pool_max_idle_per_host,
    };
    let transports = Transports::new(guard, &settings, config.http.timeout.0);
    let test_transports = transports.clone();
    let retrier = Retrier::new(log.clone(), registry.clone(), topics.prefix.clone(), topics.dlq.clone());
    let deliverer = Arc::new(Deliverer::new(registry.clone(), transports, retrier));
    let limits = ShardLimits {
        window: config.dispatch.window,
        max_uncommitted: config.dispatch.max_uncommitted,
        batch: config.dispatch.batch,
        drain: DRAIN,
    };
    let (stop, stop_rx) = watch::channel(false);
    let label = |topic: &str| topic.strip_prefix(&topics.prefix).unwrap_or(topic).to_string();
    let mut sources =
        vec![Source { topic: topics.deliveries.clone(), label: label(&topics.deliveries), delay: Duration::ZERO }];
    sources.extend(topics.tiers.iter().map(|(topic, delay)| Source {
        topic: topic.clone(),
        label: label(topic),
        delay: *delay,
    }));
    let metrics = Arc::new(Metrics::new());
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
    let state = AppState {
        registry,
        ingest,
        log,
        admin_token: token.clone().into(),
        dead_letters,
        metrics,
        transports: test_transports,
        rotation_overlap: config.signing.rotation_overlap.0,
        tenants,
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen { addr: config.listen, source })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen { addr: config.listen, source })?;
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
    tracing::info!(%addr, backend = "embedded", data_dir = %config.data_dir.display(), "herald is serving");
    Ok(Herald { addr, admin_token: token, token_source, stop, api, dispatcher, log: embedded })
}

impl Herald {
    /// The log this server runs on (tests append raw records through it).
    pub fn log(&self) -> Arc<dyn Log> {
        self.log.clone()
    }

    /// Stops taking requests, lets in-flight deliveries finish (bounded), commits, closes the log.
    pub async fn stop(self) {
        self.stop.send_replace(true);
        let _ = self.api.await;
        let _ = self.dispatcher.await;
        if let Err(e) = self.log.close().await {
            tracing::error!(error = %e, "closing the log");
        }
    }
}
