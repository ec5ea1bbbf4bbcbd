//! `/v1/edge-devices`: a tenant's edge devices (the token is shown once, at creation), and
//! `/v1/edge/connect`, where agents open their WebSocket with a device token.

use super::auth::Principal;
use super::error::{ApiError, JsonBody};
use super::page::{StrictPath, StrictQuery};
use super::AppState;
use crate::registry::Lookup;
use crate::transport::edge::protocol::{decode_delivery, Forward, Report};
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

/// `POST /v1/edge-devices` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    name: String,
    /// Owner (admin only; a tenant key implies its tenant).
    #[serde(default)]
    tenant: Option<String>,
}

/// Creates a device: `{"id","tenant","name","created_at","token"}`; the token is shown once.
pub async fn create(
    who: Principal,
    State(state): State<AppState>,
    JsonBody(d): JsonBody<NewDevice>,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = who.owner(d.tenant)?;
    crate::registry::validate_tenant(&tenant)?;
    let name = super::display_name(&d.name)?;
    let max = state.quotas.edge_devices_per_tenant;
    let Some((device, token)) = state.devices.create(&tenant, name, max).await? else {
        return Err(ApiError::quota("edge_devices_per_tenant", format!("this tenant has its {max} edge devices")));
    };
    let mut body = serde_json::to_value(&device).expect("serializes");
    body["token"] = token.into();
    Ok((StatusCode::CREATED, Json(body)))
}

/// Query of the list call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
}

/// Lists devices (`{"items"}`) with whether each has an agent connected here.
pub async fn list(
    who: Principal,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = who.names(q.tenant.as_deref())?;
    let items: Vec<_> = state.devices.list(tenant).iter().map(|d| view(&state, d)).collect();
    // One page: a tenant has at most `quotas.edge_devices_per_tenant`.
    Ok(Json(serde_json::json!({ "items": items, "next": null })))
}

/// A device as the API shows it: with `connected`, whether its agent is connected to any
/// process of the deployment (as the registry topic last said).
fn view(state: &AppState, device: &crate::devices::EdgeDevice) -> serde_json::Value {
    let mut body = serde_json::to_value(device).expect("serializes");
    body["connected"] = state.devices.located(&device.id).is_some().into();
    body
}

/// Reads one device.
pub async fn get(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let device = state.devices.get(&id, who.tenant()).ok_or_else(|| ApiError::not_found("edge device"))?;
    Ok(Json(view(&state, &device)))
}

/// Deletes a device; its token stops working.
pub async fn delete(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    if state.devices.delete(&id, who.tenant()).await? {
        // Its token stops working now, and so does a connection made with it (processes that
        // hold one elsewhere close it within a ping interval).
        state.edge.disconnect(&id);
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("edge device"))
    }
}

/// An agent's connection: a WebSocket, authenticated by its device token.
pub async fn connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let token = super::auth::bearer(&headers).ok_or_else(ApiError::unauthorized)?;
    if crate::tenants::parse_token(token, "he").is_none() {
        return Err(ApiError::unauthorized()); // no device token at all: nothing to wait for
    }
    // Told in the API's own shape (a proxy that drops the upgrade's headers lands here).
    let ws = ws.map_err(|e| ApiError::validation("connection", format!("a WebSocket upgrade is required: {e}")))?;
    state.catalog.settle().await; // a device made through another process a moment ago
    let device = state.devices.authenticate(token).ok_or_else(ApiError::unauthorized)?;
    state.edge_connects.admit(&device.tenant)?;
    let hub = state.edge.clone();
    let limit = crate::transport::edge::protocol::MAX_AGENT_MESSAGE;
    Ok(ws.max_message_size(limit).max_frame_size(limit).on_upgrade(move |socket| hub.serve(device, socket)))
}

/// A caller that presented the processes' shared forward secret (checked before the body is
/// read, so nobody else learns anything from how a body is judged).
pub struct Forwarder;

impl axum::extract::FromRequestParts<AppState> for Forwarder {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut http::request::Parts, state: &AppState) -> Result<Self, ApiError> {
        let presented = super::auth::bearer(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        if !state.edge.forward_allowed(presented) {
            return Err(ApiError::unauthorized());
        }
        Ok(Forwarder)
    }
}

/// Another Herald process asks this one to make an attempt through an agent connected here.
/// Authenticated with the processes' shared forward secret, not a user's token.
pub async fn forward(
    _: Forwarder,
    State(state): State<AppState>,
    JsonBody(f): JsonBody<Forward>,
) -> Result<impl IntoResponse, ApiError> {
    let Lookup::Found(target) = state.registry.lookup(&f.subscription).await else {
        return Err(ApiError::not_found("subscription"));
    };
    // Only to the device the subscription names: a forward is another process's attempt of
    // that subscription, never a way to send one tenant's delivery (and its secrets) to
    // another tenant's agent.
    if target.sub.spec.via_edge.as_deref() != Some(f.device.as_str()) {
        return Err(ApiError::validation("device", "is not the edge device this subscription names"));
    }
    let delivery =
        decode_delivery(&f.delivery).ok_or_else(|| ApiError::validation("delivery", "not a delivery record"))?;
    let timeout = std::time::Duration::from_millis(f.timeout_ms.clamp(1, 600_000));
    let outcome = state.edge.deliver_here(&f.device, &target, &delivery, f.pending_retries, timeout).await;
    Ok(Json(Report { seq: 0, outcome }))
}
