//! Transports: how a delivery reaches its subscriber (a signed HTTP POST, an AMQP publish, or
//! an edge agent inside the customer's network), and the typed [`Outcome`] of each attempt.
//! Every transport sends what [`Target::sign`] made, and every one is bounded by the same
//! [`Transports::timeout`].

pub mod amqp;
pub mod edge;
pub mod guard;
pub mod http;
pub mod oauth;
pub mod p12;
pub mod tls;

use crate::model::{now_ms, range, Auth, Delivery, Failure, Outcome, TransportKind};
use crate::target::Target;
use ::http::header;
use std::sync::Arc;
use std::time::Duration;

pub use self::http::{HttpSettings, HttpTransport};
pub use guard::NetworkGuard;

/// Every transport Herald can deliver with.
#[derive(Clone)]
pub struct Transports {
    http: HttpTransport,
    amqp: amqp::AmqpTransport,
    tokens: oauth::Tokens,
    default_timeout: Duration,
    edge: Option<Arc<edge::EdgeHub>>,
}

impl Transports {
    /// Builds the transports.
    pub fn new(guard: NetworkGuard, settings: &HttpSettings, default_timeout: Duration) -> Self {
        let http = HttpTransport::new(guard.clone(), settings);
        Transports {
            tokens: oauth::Tokens::new(http.clone()),
            amqp: amqp::AmqpTransport::new(guard),
            http,
            default_timeout,
            edge: None,
        }
    }

    /// Delivers subscriptions that name an edge device through `hub`'s agents.
    pub fn with_edge(mut self, hub: Arc<edge::EdgeHub>) -> Self {
        self.edge = Some(hub);
        self
    }

    /// How long one attempt may take: the subscription's timeout (within its range), or the
    /// default.
    pub fn timeout(&self, target: &Target) -> Duration {
        target.sub.spec.timeout.map_or(self.default_timeout, |t| range::clamp_duration(t.0, range::TIMEOUT))
    }

    /// Makes attempt `delivery.attempt` of `delivery` to `target`. A failure's text is cut to
    /// [`MAX_DETAIL`](crate::model::outcome::MAX_DETAIL) whichever transport made it: a
    /// receiver chooses much of it (a certificate naming thousands of hosts, an HTTP/2
    /// GOAWAY's debug data), and it goes into the attempt's record, 85 KB of it a time.
    pub async fn deliver(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> Outcome {
        match self.attempt(target, delivery, pending_retries).await {
            Outcome::Failed { failure, latency, response } => {
                Outcome::Failed { failure: failure.bounded(), latency, response }
            }
            delivered => delivered,
        }
    }

    async fn attempt(&self, target: &Target, delivery: &Delivery, pending_retries: u32) -> Outcome {
        let timeout = self.timeout(target);
        if let Some(device) = &target.sub.spec.via_edge {
            let Some(hub) = &self.edge else {
                let detail = "edge delivery is not available in this process".to_string();
                return Outcome::failed(Failure::Unusable { detail }, Duration::ZERO);
            };
            return hub.deliver(device, target, delivery, pending_retries, timeout).await;
        }
        match target.sub.spec.transport {
            TransportKind::Webhook => self.webhook(target, delivery, pending_retries, timeout).await,
            TransportKind::Amqp => {
                let signed = target.sign(delivery, pending_retries, now_ms());
                // Boxed: a publish's future is larger than a webhook's, and every delivery's
                // future would carry it (see `Deliverer::deliver`).
                Box::pin(self.amqp.publish(target, delivery, signed, timeout)).await
            }
        }
    }

    /// A webhook attempt; with OAuth, a refused token is fetched anew and the request sent
    /// once more. The whole attempt — token fetches included, and the second send — is within
    /// the subscription's timeout, and each request is signed once its token is in (so its
    /// timestamp is when it is sent).
    async fn webhook(&self, target: &Target, delivery: &Delivery, pending_retries: u32, timeout: Duration) -> Outcome {
        let oauth = matches!(target.sub.spec.auth, Auth::Oauth2 { .. });
        let tls = target.tls.as_ref();
        let started = std::time::Instant::now();
        let deadline = started + timeout;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        let mut refreshed = false;
        loop {
            let bearer = match oauth {
                true => match self.tokens.bearer(&target.sub, target.credentials, tls, left()).await {
                    Ok(bearer) => Some(bearer),
                    Err(failure) => return Outcome::failed(failure, started.elapsed()),
                },
                false => None,
            };
            if left().is_zero() {
                return Outcome::failed(http::timed_out(timeout), started.elapsed());
            }
            let signed = target.sign(delivery, pending_retries, now_ms());
            // Room for every header up front (growing it reallocated per request).
            let mut headers = target.headers.clone();
            headers.reserve(signed.headers.len() + 1);
            headers.extend(signed.headers);
            if let Some(bearer) = &bearer {
                headers.insert(header::AUTHORIZATION, bearer.clone());
            }
            let request = http::WebhookRequest { uri: target.uri.clone(), headers, body: signed.body, timeout: left() };
            let egress = http::Egress::of(target.sub.spec.proxy.as_deref());
            let outcome = match self.http.send(request, tls, egress, &target.sub.tenant).await {
                // What is left of it timed out: the attempt's timeout is the subscription's.
                Outcome::Failed { failure: Failure::Timeout { .. }, latency, response } if oauth => {
                    Outcome::Failed { failure: http::timed_out(timeout), latency, response }
                }
                outcome => outcome,
            };
            if let (Some(bearer), false, Some(401)) = (&bearer, refreshed, outcome.status()) {
                self.tokens.forget(target.credentials, bearer);
                refreshed = true;
                continue;
            }
            return outcome;
        }
    }
}
