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
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
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
    /// The directory subscriptions' `tls.*_file` names are read under, as on the server
    /// (`http.tls_files_dir`): without it, a subscription naming one cannot be delivered here.
    pub tls_files_dir: Option<std::path::PathBuf>,
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The server URL cannot be turned into a WebSocket URL.
    #[error("--server must be an http:// or https:// URL: {0}")]
    Server(String),
    /// The token is no device token, or holds what no header can carry.
    #[error("the device token (--token, HERALD_EDGE_TOKEN) {0}")]
    Token(&'static str),
    /// A setting out of the range the server takes.
    #[error("{0}")]
    Setting(String),
}

/// Subscriptions compiled into targets, by id and version.
type Targets = Arc<Mutex<HashMap<String, (String, Arc<Target>)>>>;

/// A connection that lasted this long was a good one: the next reconnection starts from the
/// shortest backoff. One that ended sooner (two agents run with one device's token, each
/// connection replacing the other) backs off further each time.
const STEADY: Duration = Duration::from_secs(10);

/// Largest message from Herald the agent reads: a delivery of the largest event, in base64,
/// with its subscription.
const MAX_MESSAGE: usize = 64 << 20;

/// How long connecting (TCP, TLS, the WebSocket upgrade, the hello) may take: a proxy or a
/// stalled Herald that accepts and never answers the upgrade held the agent for ever.
pub const CONNECT_WITHIN: Duration = Duration::from_secs(20);

/// Herald pings every 15 s: this long without any message from it, the connection is dead
/// (a failover, a firewall dropping it silently) and the agent connects again.
const SILENCE: Duration = Duration::from_secs(45);

/// Runs until `stop` turns true, reconnecting whenever the connection is lost.
pub async fn run(config: AgentConfig, mut stop: watch::Receiver<bool>) -> Result<(), AgentError> {
    let url = checked(&config)?;
    // As much of a receiver's answer as any server's history may keep: the server cuts it to
    // its own `history.response_bytes` (and drops it with no history). At 1 KiB here, an edge
    // attempt's record kept less than a direct one's.
    let settings = HttpSettings {
        tls_files_dir: config.tls_files_dir.clone(),
        response_bytes: Some(crate::config::MAX_RESPONSE_BYTES),
        ..HttpSettings::default()
    };
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
        let lasted = began.elapsed();
        backoff = backoff_after(backoff, lasted);
        match ended {
            Ok(()) if lasted >= STEADY => {
                tracing::warn!(server = %config.server, "connection to herald closed; reconnecting")
            }
            Ok(()) => tracing::warn!(
                server = %config.server,
                retry_in = ?backoff,
                "connection to herald closed soon after it opened (is another agent running with this device's token?)"
            ),
            Err(e) if refused_token(&e) => {
                // Revoked or mistyped: said as such, and asked again at most once a minute
                // (the device may be made again, or a process not yet told of a new token).
                backoff = backoff.max(REFUSED_RETRY);
                tracing::error!(server = %config.server, error = %e, retry_in = ?backoff, "herald refused this device's token: revoked, or not this device's");
            }
            Err(e) => tracing::warn!(server = %config.server, error = %e, retry_in = ?backoff, "cannot reach herald"),
        }
        let jittered = backoff.mul_f64(rand::thread_rng().gen_range(0.8..1.2));
        if !crate::shutdown::sleep(jittered, &mut stop).await {
            return Ok(());
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// How long an agent whose token Herald refused waits before it asks again.
const REFUSED_RETRY: Duration = Duration::from_secs(60);

/// Whether Herald answered the connection with 401 or 403: the token, not the network.
fn refused_token(e: &tokio_tungstenite::tungstenite::Error) -> bool {
    matches!(e, tokio_tungstenite::tungstenite::Error::Http(r) if matches!(r.status().as_u16(), 401 | 403))
}

/// The wait before the next connection, after one that lasted `lasted` with `backoff` before
/// it: back to the shortest after a steady connection, however it ended (a Herald restart
/// ends one with a reset or silence, not a close, and kept the agent offline up to 10 s more).
fn backoff_after(backoff: Duration, lasted: Duration) -> Duration {
    if lasted >= STEADY {
        Duration::from_millis(200)
    } else {
        backoff
    }
}

/// The WebSocket URL of `config.server`, once what can never work is told: a server URL no
/// request can be made of, a token no header can carry or that is no device's, a timeout out
/// of the server's range — each was retried for good as "cannot reach herald" (a timeout of
/// nothing timed every attempt out).
fn checked(config: &AgentConfig) -> Result<String, AgentError> {
    let url = match config.server.trim_end_matches('/') {
        s if s.starts_with("https://") => format!("wss://{}{CONNECT_PATH}", &s[8..]),
        s if s.starts_with("http://") => format!("ws://{}{CONNECT_PATH}", &s[7..]),
        s => return Err(AgentError::Server(s.to_string())),
    };
    if url.as_str().into_client_request().is_err() {
        return Err(AgentError::Server(config.server.clone()));
    }
    if bearer(&config.token).is_err() {
        return Err(AgentError::Token("holds characters an HTTP header cannot carry (a line break?)"));
    }
    if crate::tenants::parse_token(&config.token, "he").is_none() {
        return Err(AgentError::Token("is not an edge device's (he.…): it is shown once when the device is made"));
    }
    let (least, most) = crate::model::range::TIMEOUT;
    if !(least..=most).contains(&config.default_timeout) {
        return Err(AgentError::Setting(format!(
            "--timeout must be between {least:?} and {most:?}, as a subscription's"
        )));
    }
    if !(1..=crate::transport::edge::protocol::MAX_WINDOW).contains(&config.window) {
        let most = crate::transport::edge::protocol::MAX_WINDOW;
        return Err(AgentError::Setting(format!("--window must be between 1 and {most}")));
    }
    Ok(url)
}

/// The `authorization` header `token` is sent in: [`checked`] tells at start when no header
/// can carry it, and each connection sends it.
fn bearer(token: &str) -> Result<http::HeaderValue, http::header::InvalidHeaderValue> {
    http::HeaderValue::from_str(&format!("Bearer {token}"))
}

/// One connection: hello, then deliveries until it closes.
async fn session(
    url: &str,
    config: &AgentConfig,
    transports: &Transports,
    targets: &Targets,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert(
        http::header::AUTHORIZATION,
        bearer(&config.token).map_err(|e| tokio_tungstenite::tungstenite::Error::HttpFormat(e.into()))?,
    );
    let hello = serde_json::to_string(&ToServer::Hello { window: config.window }).expect("serializes");
    let connecting = async {
        // Herald's largest event (12 MiB) is over 16 MiB in base64 in one message (one frame):
        // tungstenite's default frame bound refused it and ended the connection at each try.
        let limits = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
            .max_frame_size(Some(MAX_MESSAGE))
            .max_message_size(Some(MAX_MESSAGE));
        let (ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(limits), false).await?;
        let (mut sink, stream) = ws.split();
        sink.send(Message::Text(hello.into())).await?;
        Ok::<_, tokio_tungstenite::tungstenite::Error>((sink, stream))
    };
    let (mut sink, mut stream) = tokio::time::timeout(CONNECT_WITHIN, connecting).await.map_err(|_| {
        let stalled = std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting to herald took too long");
        tokio_tungstenite::tungstenite::Error::Io(stalled)
    })??;
    tracing::info!(server = %config.server, window = config.window, "connected to herald");
    // Not `println!`: it panics once stdout's reader is gone (`herald edge | head -1`, a log
    // pipe restarted), and took the agent down with it.
    let _ = writeln!(std::io::stdout(), "herald edge connected to {}", config.server);
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let writer = async {
        while let Some(text) = rx.recv().await {
            sink.send(Message::Text(text.into())).await?;
        }
        Ok::<_, tokio_tungstenite::tungstenite::Error>(())
    };
    // The attempts of this connection, ended with it: the server settles them `edge_offline`
    // once it is gone and retries them through the next, so one that went on was a delivery
    // off the record, sent again (out of order for an ordered key) and past the window.
    let mut attempts = tokio::task::JoinSet::new();
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
                Message::Close(frame) => {
                    // Herald says why it refused the connection (a hello it could not read).
                    if let Some(frame) = frame.filter(|f| f.code == CloseCode::Policy) {
                        tracing::error!(server = %config.server, reason = %frame.reason, "herald refused this connection");
                    }
                    break;
                }
                _ => continue,
            };
            let Ok(ToAgent::Deliver { seq, subscription, delivery, pending_retries }) = serde_json::from_str(&text)
            else {
                tracing::warn!("unreadable message from herald");
                continue;
            };
            let (tx, transports, targets) = (tx.clone(), transports.clone(), targets.clone());
            while attempts.try_join_next().is_some() {} // those ended
            attempts.spawn(async move {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A refused token is told apart from a network that failed: it is said as such and asked
    /// again once a minute, not every 10 s for ever as "cannot reach herald".
    #[test]
    fn a_refused_token_is_told_apart_from_an_unreachable_server() {
        use tokio_tungstenite::tungstenite::Error;
        let answered =
            |status: u16| Error::Http(Box::new(http::Response::builder().status(status).body(None).unwrap()));
        assert!(refused_token(&answered(401)) && refused_token(&answered(403)));
        assert!(!refused_token(&answered(502)));
        assert!(!refused_token(&Error::ConnectionClosed));
    }

    /// A steady connection resets the backoff however it ended; a short one keeps it growing.
    #[test]
    fn a_steady_connection_resets_the_backoff_however_it_ended() {
        assert_eq!(
            backoff_after(Duration::from_secs(10), STEADY + Duration::from_secs(3600)),
            Duration::from_millis(200)
        );
        assert_eq!(backoff_after(Duration::from_secs(5), Duration::from_secs(1)), Duration::from_secs(5));
    }
}
