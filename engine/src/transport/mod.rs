//! Transports: how a prepared delivery reaches its subscriber, and what came of it.

pub mod amqp;
pub mod guard;
pub mod http;
pub mod oauth;
pub mod tls;

use crate::model::{now_ms, Auth, Delivery, TransportKind};
use crate::payload;
use crate::registry::Target;
use crate::signing::{WEBHOOK_ID, WEBHOOK_TIMESTAMP};
use ::http::{header, HeaderValue, StatusCode};
use std::time::Duration;

pub use self::http::{HttpSettings, HttpTransport};
pub use guard::NetworkGuard;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered {
        /// Status code.
        status: u16,
        /// Time the request took.
        latency: Duration,
    },
    /// Anything else: a non-2xx status, a timeout, a connection or TLS error, a refusal.
    Failed {
        /// Status code, when there was a response.
        status: Option<u16>,
        /// What went wrong.
        error: String,
        /// The receiver's `Retry-After`, when given.
        retry_after: Option<Duration>,
        /// Time the attempt took.
        latency: Duration,
    },
}

impl Outcome {
    /// How long the attempt took.
    pub fn latency(&self) -> Duration {
        match self {
            Outcome::Delivered { latency, .. } | Outcome::Failed { latency, .. } => *latency,
        }
    }

    /// A failure without `Retry-After`.
    pub(crate) fn failed(status: Option<u16>, error: String, latency: Duration) -> Outcome {
        Outcome::Failed { status, error, retry_after: None, latency }
    }

    fn from_status(status: StatusCode, retry_after: Option<&HeaderValue>, latency: Duration) -> Outcome {
        if status.is_success() {
            return Outcome::Delivered { status: status.as_u16(), latency };
        }
        let retry_after = retry_after
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Outcome::Failed {
            status: Some(status.as_u16()),
            error: format!("receiver answered {status}"),
            retry_after,
            latency,
        }
    }
}

/// Every transport Herald can deliver with.
#[derive(Clone)]
pub struct Transports {
    http: HttpTransport,
    amqp: amqp::AmqpTransport,
    tokens: oauth::Tokens,
    default_timeout: Duration,
    edge: Option<std::sync::Arc<crate::edge::hub::EdgeHub>>,
}

impl Transports {
    /// Builds the transports.
    pub fn new(guard: NetworkGuard, settings: &HttpSettings, default_timeout: Duration) -> Self {
        let http = HttpTransport::new(guard.clone(), settings);
        Transports {
            tokens: oauth::Tokens::new(http.clone()),
            amqp: amqp::AmqpTransport::new(guard.clone()),
            http,
            default_timeout,
            edge: None,
        }
    }

    /// Delivers subscriptions that name an edge device through `hub`'s agents.
    pub fn with_edge(mut self, hub: std::sync::Arc<crate::edge::hub::EdgeHub>) -> Self {
        self.edge = Some(hub);
        self
    }

    /// The subscription's timeout, or the default.
    fn timeout(&self, target: &Target) -> Duration {
        target.sub.timeout.map_or(self.default_timeout, |t| t.0)
    }

    /// Makes attempt `delivery.attempt` of `delivery` to `target`.
    pub async fn deliver(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> Outcome {
        if let Some(device) = &target.sub.via_edge {
            let Some(hub) = &self.edge else {
                return Outcome::failed(None, "edge delivery is not available here".into(), Duration::ZERO);
            };
            return hub.deliver(device, target, delivery, pending_retries, self.timeout(target)).await;
        }
        match target.sub.transport {
            TransportKind::Webhook => self.deliver_webhook(target, delivery, pending_retries).await,
            TransportKind::Amqp => self.deliver_amqp(target, delivery, pending_retries).await,
        }
    }

    /// A webhook attempt; with OAuth, a refused token is fetched anew and the request sent
    /// once more.
    async fn deliver_webhook(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> Outcome {
        let oauth = matches!(target.sub.auth, Auth::Oauth2 { .. });
        let tls = target.sub.tls.as_ref();
        let mut refreshed = false;
        loop {
            let mut request = self.webhook_request(target, delivery, pending_retries);
            if oauth {
                match self.tokens.bearer(&target.sub.auth, tls).await {
                    Ok(bearer) => {
                        request.headers.insert(header::AUTHORIZATION, bearer);
                    }
                    Err(e) => return Outcome::failed(None, format!("oauth2: {e}"), Duration::ZERO),
                }
            }
            let outcome = self.http.send(request, tls).await;
            if oauth && !refreshed && matches!(outcome, Outcome::Failed { status: Some(401), .. }) {
                self.tokens.forget(&target.sub.auth).await;
                refreshed = true;
                continue;
            }
            return outcome;
        }
    }

    /// An AMQP attempt: the same body and signature headers as a webhook, published to the
    /// subscription's exchange.
    async fn deliver_amqp(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> Outcome {
        let Some(amqp) = &target.sub.amqp else {
            return Outcome::failed(None, "the subscription has no amqp settings".into(), Duration::ZERO);
        };
        let now = now_ms();
        let body = payload::build(target.sub.payload, delivery, pending_retries, now);
        let timestamp = now / 1000;
        let mut headers = vec![
            ("webhook-id".to_string(), delivery.event_id.clone()),
            ("webhook-timestamp".to_string(), timestamp.to_string()),
        ];
        if let Some((name, value)) = target.signer.signature(&delivery.event_id, timestamp, body.chunks()) {
            headers.push((name.to_string(), value.to_str().unwrap_or_default().to_string()));
        }
        self.amqp.publish(amqp, delivery, body, headers, self.timeout(target)).await
    }

    /// Builds the signed request for one attempt; the signature covers exactly the body sent.
    pub fn webhook_request(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> http::WebhookRequest {
        let now = now_ms();
        let body = payload::build(target.sub.payload, delivery, pending_retries, now);
        let mut headers = target.headers.clone();
        let timestamp = now / 1000;
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Ok(id) = HeaderValue::from_str(&delivery.event_id) {
            headers.insert(WEBHOOK_ID, id);
        }
        headers.insert(WEBHOOK_TIMESTAMP, HeaderValue::from(timestamp));
        if let Some((name, value)) = target.signer.signature(&delivery.event_id, timestamp, body.chunks()) {
            headers.insert(name, value);
        }
        http::WebhookRequest { uri: target.uri.clone(), headers, body, timeout: self.timeout(target) }
    }
}
