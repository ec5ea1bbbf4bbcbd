//! The HTTP API (`/v1`, JSON, bearer tokens) and the health endpoints.

mod auth;
mod console;
mod dlq;
mod edge;
mod error;
mod event_types;
mod events;
/// Events in one `POST /v1/events/batch` at most (the CLI splits a stream by it).
pub use events::MAX_BATCH;

/// A tenant's or an edge device's name as given, trimmed: 1 to 200 characters (characters, as
/// the message and the document's `maxLength` say, not bytes).
fn display_name(given: &str) -> Result<String, ApiError> {
    let name = given.trim();
    if name.is_empty() || name.chars().count() > 200 {
        return Err(ApiError::validation("name", "must be 1 to 200 characters"));
    }
    Ok(name.to_string())
}
mod history;
mod ordering;
mod page;
pub mod portal;
mod subscriptions;
mod tenants;
mod throttle;

pub use error::ApiError;

use crate::ingest::Ingest;
use crate::log::Log;
use crate::registry::Registry;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use std::sync::Arc;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 16 << 20;

/// Largest forwarded edge attempt: the largest event (12 MiB) in base64, with its subscription
/// (16 MiB refused it, every try, until it was dead-lettered).
const MAX_FORWARD_BYTES: usize = 24 << 20;

/// The most a request body may be on every other route: a subscription at its largest (256
/// KiB as stored) fits however its JSON is escaped. Bodies are read whole and
/// parsed, each byte of JSON a value of up to 16: 16 MiB on every route made a quarter of a
/// gigabyte per request of any tenant key.
pub const MAX_OTHER_BODY_BYTES: usize = 4 << 20;

/// What the handlers share, behind one `Arc`: axum clones the state for every extractor of
/// every request, and cloning the fields themselves (two dozen shared counts, the transports'
/// HTTP clients, strings) was about 2.5 % of Herald's CPU with one event per request (`perf`,
/// BENCHMARKS.md "Taking a CPU profile").
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state handlers get.
    pub fn new(shared: Shared) -> AppState {
        AppState(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct Shared {
    /// The registry topic as this process follows it: every authenticated request first
    /// waits until it has read whatever other processes changed before the request came.
    pub catalog: Arc<crate::catalog::feed::Feed>,
    /// The subscription registry.
    pub registry: Arc<Registry>,
    /// The ingest stage.
    pub ingest: Arc<Ingest>,
    /// The log, for readiness.
    pub log: Arc<dyn Log>,
    /// Why delivery stopped before the process was told to stop, if it did (see
    /// `dispatch::Dispatcher::run`): only a restart mends it.
    pub delivery_stopped: Arc<std::sync::atomic::AtomicBool>,
    /// The admin bearer token (compared in constant time).
    pub admin_token: Arc<str>,
    /// The dead-letter store.
    pub dead_letters: Arc<crate::retry::dead_letters::DeadLetters>,
    /// Scrape-time metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Ordered subscriptions' blocked keys on this process's partitions.
    pub ordered_keys: Arc<crate::dispatch::OrderedKeys>,
    /// Where ordering markers (an operator's skip) are written.
    pub ordered_topic: String,
    /// Transports, for test deliveries.
    pub transports: crate::transport::Transports,
    /// The delivery history, when it is kept.
    pub history: Option<Arc<crate::history::History>>,
    /// The largest event (`ingest.max_event_bytes`).
    pub max_event_bytes: usize,
    /// What one tenant may use.
    pub quotas: crate::config::QuotaConfig,
    /// Requests per tenant key.
    pub key_rate: Arc<throttle::Throttle>,
    /// Test pings per subscription.
    pub tests: Arc<throttle::Throttle>,
    /// Edge agent connections per tenant.
    pub edge_connects: Arc<throttle::Throttle>,
    /// How long a request may take (`api.request_timeout`).
    pub request_timeout: std::time::Duration,
    /// How long a rotated-out secret keeps signing.
    pub rotation_overlap: std::time::Duration,
    /// Tenants and their API keys.
    pub tenants: Arc<crate::tenants::Tenants>,
    /// Tenants' edge devices.
    pub devices: Arc<crate::devices::Devices>,
    /// Connected edge agents.
    pub edge: Arc<crate::transport::edge::EdgeHub>,
    /// The event-type catalogue.
    pub event_types: Arc<crate::event_types::EventTypes>,
    /// Whether every event of a type with a schema is checked (`ingest.validate`).
    pub validate_events: bool,
    /// What a subscription naming an uncatalogued type gets (`ingest.unknown_types`).
    pub unknown_event_types: crate::config::UnknownTypes,
    /// Portal links: their key, lifetime and base URL.
    pub portal: portal::Portal,
    /// Each tenant's requests under way, `api.tenant_requests` of one's at most (see
    /// `auth::hold_a_tenant_s_share`).
    pub underway: crate::model::TakenInTurns,
}

/// Runs `work` in a task of its own, for an operation that must not stop part-way: a request
/// cut off by `api.request_timeout` (whose `408` says work it began goes on) drops its
/// handler, and a recover or replay dropped so had queued its first parts and never the rest,
/// with nothing to say where to go on. `what` names it in a `503` if the task failed.
async fn goes_on_if_cut_off<T: Send + 'static>(
    what: &str,
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work).await.unwrap_or_else(|e| Err(ApiError::unavailable(format!("the {what} failed: {e}"))))
}

/// The router of every endpoint.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/events", post(events::publish).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)).get(history::list))
        .route("/v1/events/batch", post(events::publish_batch).layer(DefaultBodyLimit::max(MAX_BODY_BYTES)))
        .route("/v1/events/{id}", get(history::get))
        .route("/v1/events/{id}/resend", post(history::resend))
        .route("/v1/attempts", get(history::attempts))
        .route("/v1/subscriptions/{id}/recover", post(history::recover))
        .route("/v1/subscriptions", post(subscriptions::create).get(subscriptions::list))
        .route("/v1/subscriptions/{id}", get(subscriptions::get).patch(subscriptions::patch).delete(subscriptions::delete))
        .route("/v1/subscriptions/{id}/rotate-secret", post(subscriptions::rotate_secret))
        .route("/v1/subscriptions/{id}/test", post(subscriptions::test))
        .route("/v1/subscriptions/{id}/ordering/blocked", get(ordering::blocked))
        .route("/v1/subscriptions/{id}/ordering/skip", post(ordering::skip))
        .route("/v1/event-types", post(event_types::create).get(event_types::list))
        .route(
            "/v1/event-types/{name}",
            get(event_types::get).patch(event_types::patch).delete(event_types::delete),
        )
        .route("/v1/tenants", post(tenants::create).get(tenants::list))
        .route("/v1/tenants/{id}/portal", post(portal::mint).delete(portal::revoke))
        .route("/v1/tenants/{id}/keys", post(tenants::issue_key))
        .route("/v1/tenants/{id}/keys/{key_id}", axum::routing::delete(tenants::revoke_key))
        .route("/v1/edge-devices", post(edge::create).get(edge::list))
        .route("/v1/edge-devices/{id}", get(edge::get).delete(edge::delete))
        .route(crate::transport::edge::protocol::CONNECT_PATH, get(edge::connect))
        // A forwarded attempt carries its event.
        .route(
            crate::transport::edge::protocol::FORWARD_PATH,
            post(edge::forward).layer(DefaultBodyLimit::max(MAX_FORWARD_BYTES)),
        )
        .route("/v1/dlq", get(dlq::list))
        .route("/v1/dlq/replay", post(dlq::replay))
        .route("/v1/openapi.json", get(openapi))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/console", get(console::console))
        .route("/portal", get(console::portal))
        .route("/console/assets/{file}", get(console::asset))
        .route("/readyz", get(readyz))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            let body = serde_json::json!({"error": {"code": "METHOD_NOT_ALLOWED", "message": "method not allowed on this route"}});
            (StatusCode::METHOD_NOT_ALLOWED, Json(body))
        })
        .layer(DefaultBodyLimit::max(MAX_OTHER_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::hold_a_tenant_s_share))
        .layer(axum::middleware::from_fn_with_state(state.request_timeout, bounded))
        .layer(axum::middleware::from_fn(count_requests))
        .with_state(state)
}

/// Answers `408` to a request not answered within `api.request_timeout` (a client that sends
/// its body slowly cannot hold a handler). Edge connections and forwards are exempt: one is an
/// upgrade that lives on, the other waits as long as the attempt it forwards.
async fn bounded(
    State(limit): State<std::time::Duration>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let path = req.uri().path();
    if path == crate::transport::edge::protocol::CONNECT_PATH || path == crate::transport::edge::protocol::FORWARD_PATH
    {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => ApiError::timed_out().into_response(),
    }
}

/// Edge agent connections a tenant may open a second, after a burst of [`EDGE_CONNECT_BURST`]
/// (all its devices at once, after a restart): each connection is announced to every process
/// through the catalog, and withdrawn when it ends.
pub const EDGE_CONNECTS_PER_SECOND: f64 = 5.0;
/// See [`EDGE_CONNECTS_PER_SECOND`].
pub const EDGE_CONNECT_BURST: f64 = 100.0;

/// The per-key, per-subscription and per-tenant edge throttles `config` asks for.
pub fn throttles(
    config: &crate::config::Config,
) -> (Arc<throttle::Throttle>, Arc<throttle::Throttle>, Arc<throttle::Throttle>) {
    let rate = config.api.key_rate_limit;
    let tests = f64::from(config.quotas.tests_per_minute);
    (
        Arc::new(throttle::Throttle::new(rate, rate * 2.0, "key_rate")),
        Arc::new(throttle::Throttle::new(tests / 60.0, tests, "tests")),
        Arc::new(throttle::Throttle::new(EDGE_CONNECTS_PER_SECOND, EDGE_CONNECT_BURST, "edge_connects")),
    )
}

/// Counts every API request by route template (never the raw path: ids stay out of labels).
async fn count_requests(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    // A fixed set: any other method (a client may send any token, up to kilobytes long) is
    // counted as "other", so it cannot add series to /metrics.
    let method: &'static str = match req.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "PATCH" => "PATCH",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        "OPTIONS" => "OPTIONS",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!(crate::metrics::API_REQUEST_SECONDS, "route" => route.clone())
        .record(started.elapsed().as_secs_f64());
    metrics::counter!(crate::metrics::API_REQUESTS, "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let (status, text) = match state.metrics.scrape().await {
        Some(text) => (StatusCode::OK, text),
        None => (StatusCode::INTERNAL_SERVER_ERROR, bytes::Bytes::from_static(b"rendering failed\n")),
    };
    (status, [(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text)
}

/// The OpenAPI 3 document of this API (`engine/openapi/herald.json`).
pub const OPENAPI: &str = include_str!("../../openapi/herald.json");

/// The document (public, as it is in the repository); to a caller with a token, also the
/// event-type catalogue's examples as examples of `POST /v1/events`, so generated clients and
/// API explorers show the platform's real events without the catalogue going public.
async fn openapi(State(state): State<AppState>, mut parts: axum::http::request::Parts) -> impl IntoResponse {
    use axum::extract::FromRequestParts;
    let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
    let known =
        auth::bearer(&parts.headers).is_some() && auth::Principal::from_request_parts(&mut parts, &state).await.is_ok();
    if !known {
        return (json, bytes::Bytes::from_static(OPENAPI.as_bytes()));
    }
    // Made once per change of the catalogue: made per request, any key's call cloned every
    // type and parsed and wrote the whole document again.
    let doc = state.event_types.derived(|types| {
        let examples: serde_json::Map<String, serde_json::Value> = types
            .into_iter()
            .filter_map(|t| {
                let data = t.spec.example.clone()?;
                let example = serde_json::json!({
                    "summary": if t.spec.deprecated { format!("{} (deprecated)", t.name) } else { t.name.clone() },
                    "description": t.spec.description,
                    "value": { "type": t.name, "data": data },
                });
                Some((t.name.clone(), example))
            })
            .collect();
        if examples.is_empty() {
            return OPENAPI.to_string();
        }
        let mut doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("the embedded document is JSON");
        doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]["examples"] =
            serde_json::Value::Object(examples);
        doc.to_string()
    });
    (json, doc)
}

async fn healthz(State(state): State<AppState>) -> impl IntoResponse {
    // Only a restart mends either: a liveness probe restarts the process. What broke it (the
    // broker's own words, its addresses) is in Herald's log, not told to anyone who asks.
    let broken = if state.delivery_stopped.load(std::sync::atomic::Ordering::Relaxed) {
        // Events would still be accepted, and never delivered.
        Some("delivery stopped until Herald restarts; its log says why")
    } else {
        state.log.broken().map(|_| "the log takes no writes until Herald restarts; its log says why")
    };
    match broken {
        None => (StatusCode::OK, Json(serde_json::json!({ "status": "ok" }))),
        Some(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(serde_json::json!({ "status": "broken", "reason": reason })))
        }
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let log = state.log.ready().await;
    let body = serde_json::json!({ "log": log, "registry": true, "subscriptions": state.registry.len() });
    (if log { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE }, Json(body))
}
