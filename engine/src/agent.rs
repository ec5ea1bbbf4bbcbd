//! `herald edge`: the agent a customer runs inside their own network. It keeps one outbound
//! WebSocket to Herald, reconnecting with backoff, and makes each delivery it is sent with
//! the same transports, signing and timeouts as the server, then reports the outcome.

use crate::model::{Failure, Outcome, Subscription};
use crate::target::Target;
use crate::transport::edge::protocol::{decode_delivery, Report, ToAgent, ToServer, CONNECT_PATH};
use crate::transport::{HttpSettings, NetworkGuard, Transports};
use futures::{SinkExt, StreamExt};
use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// How the agent runs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Herald's base URL (`https://…` in production).
    pub server: String,
    /// The device token (`he.…`).
    pub token: String,
    /// Deliveries it takes at once.
    pub window: u32,
    /// Networks targets may be in; the agent's purpose is private ones, so all by default.
    pub allow: Vec<ipnet::IpNet>,
    /// Request timeout where a subscription sets none.
    pub default_timeout: Duration,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The server URL cannot be turned into a WebSocket URL.
    #[error("--server must be an http:// or https:// URL: {0}")]
    Server(String),
}

/// Subscriptions compiled into targets, by id and version.
type Targets = Arc<Mutex<HashMap<String, (String, Arc<Target>)>>>;

/// A connection that lasted this long was a good one: the next reconnection starts from the
/// shortest backoff. One that ended sooner (two agents run with one device's token, each
/// connection replacing the other) backs off further each time.
const STEADY: Duration = Duration::from_secs(10);

/// Herald pings every 15 s: this long without any message from it, the connection is dead
/// (a failover, a firewall dropping it silently) and the agent connects again.
const SILENCE: Duration = Duration::from_secs(45);

/// Runs until `stop` turns true, reconnecting whenever the connection is lost.
pub async fn run(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    let url = match config.server.trim_end_matches('/') {
        s if s.starts_with("https://") => format!("wss://{}{CONNECT_PATH}", &s[8..]),
        s if s.starts_with("http://") => format!("ws://{}{CONNECT_PATH}", &s[7..]),
        s => return Err(AgentError::Server(s.to_string())),
    };
    let settings = HttpSettings::default();
    let transports = Transports::new(NetworkGuard::new(config.allow.clone()), &settings, config.default_timeout);
    let targets: Targets = Arc::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        let session = session(&url, &config, &transports, &targets);
        let began = std::time::Instant::now();
        let ended = tokio::select! {
            r = session => r,
            _ = crate::shutdown::stopped(&mut stop) => return Ok(()),
        };
        match ended {
            Ok(()) if began.elapsed() >= STEADY => {
                tracing::warn!(server = %config.server, "connection to herald closed; reconnecting");
                backoff = Duration::from_millis(200);
            }
            Ok(()) => tracing::warn!(
                server = %config.server,
                retry_in = ?backoff,
                "connection to herald closed soon after it opened (is another agent running with this device's token?)"
            ),
            Err(e) => tracing::warn!(server = %config.server, error = %e, retry_in = ?backoff, "cannot reach herald"),
        }
        let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
        if !crate::shutdown::sleep(jittered, &mut stop).await {
            return Ok(());
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// One connection: hello, then deliveries until it closes.
async fn session(
    url: &str,
    config: &AgentConfig,
    transports: &Transports,
    targets: &Targets,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    let bearer = format!("Bearer {}", config.token);
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        http::HeaderValue::from_str(&bearer)
            .map_err(|e| tokio_tungstenite::tungstenite::Error::HttpFormat(e.into()))?,
    );
    let (ws, _) = tokio_tungstenite::connect_async(request).await?;
    let (mut sink, mut stream) = ws.split();
    let hello = serde_json::to_string(&ToServer::Hello { window: config.window }).expect("serializes");
    sink.send(Message::Text(hello.into())).await?;
    tracing::info!(server = %config.server, window = config.window, "connected to herald");
    println!("herald edge connected to {}", config.server);
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = async {
        while let Some(text) = rx.recv().await {
            sink.send(Message::Text(text.into())).await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    let reader = async {
        loop {
            let msg = match tokio::time::timeout(SILENCE, stream.next()).await {
                Ok(Some(msg)) => msg,
                Ok(None) => break,
                Err(_) => {
                    let silent = std::io::Error::new(std::io::ErrorKind::TimedOut, "herald went silent");
                    return Err(tokio_tungstenite::tungstenite::Error::Io(silent));
                }
            };
            let text = match msg? {
                Message::Text(t) => t,
                Message::Close(_) => break,
                _ => continue,
            };
            let Ok(ToAgent::Deliver { seq, subscription, delivery, pending_retries }) = serde_json::from_str(&text)
            else {
                tracing::warn!("unreadable message from herald");
                continue;
            };
            let (tx, transports, targets) = (tx.clone(), transports.clone(), targets.clone());
            tokio::spawn(async move {
                let outcome = attempt(&transports, &targets, *subscription, &delivery, pending_retries).await;
                let report = ToServer::Outcome(Report { seq, outcome });
                let _ = tx.send(serde_json::to_string(&report).expect("serializes"));
            });
        }
        Ok(())
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}

/// Makes one delivery locally, exactly as the server would without an edge.
async fn attempt(
    transports: &Transports,
    targets: &Targets,
    mut sub: Subscription,
    delivery: &str,
    pending_retries: u32,
) -> Outcome {
    let failed = |detail: String| Outcome::failed(Failure::Unusable { detail }, Duration::ZERO);
    let Some(delivery) = decode_delivery(delivery) else { return failed("unreadable delivery record".into()) };
    sub.spec.via_edge = None;
    let cached = targets.lock().unwrap().get(&sub.id).filter(|(v, _)| *v == sub.updated_at).map(|(_, t)| t.clone());
    let target = match cached {
        Some(t) => t,
        None => {
            let version = sub.updated_at.clone();
            let id = sub.id.clone();
            match Target::compile(sub) {
                Ok(t) => {
                    let t = Arc::new(t);
                    targets.lock().unwrap().insert(id, (version, t.clone()));
                    t
                }
                Err(e) => return failed(format!("subscription not usable here: {e}")),
            }
        }
    };
    transports.deliver(&target, &delivery, pending_retries).await
}
