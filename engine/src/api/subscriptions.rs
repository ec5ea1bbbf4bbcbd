//! `/v1/subscriptions`: create, list, read, delete.

use super::auth::Principal;
use super::error::{ApiError, JsonBody, OptionalJsonBody, StrictValue};
use super::page::{self, StrictPath, StrictQuery};
use super::AppState;
use crate::admission::Breaker;
use crate::dispatch::Via;
use crate::model::{new_id, now_ms, Delivery, Outcome, Secret};
use crate::registry::spec;
use crate::target::Target;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::de::IntoDeserializer;
use serde::Deserialize;
use serde_json::json;

/// Creates a subscription; the answer is the only one (with rotation) that shows the secret.
pub async fn create(
    who: Principal,
    State(state): State<AppState>,
    JsonBody(StrictValue(body)): JsonBody<StrictValue>,
) -> Result<impl IntoResponse, ApiError> {
    let (extras, spec) = spec::create_body(body)?;
    let tenant = who.owner(extras.tenant)?;
    check_device(&state, spec.via_edge.as_deref(), &tenant)?;
    operator_only(&who, spec.proxy.is_some())?;
    let warnings = catalogued(&state, &spec.events)?;
    let target = state.registry.create(tenant, spec, extras.secret, state.quotas.subscriptions_per_tenant).await?;
    Ok((StatusCode::CREATED, Json(warned(target.sub.view_with_secret(), warnings))))
}

/// A subscription's egress (`proxy`) is the operator's to choose: which fixed addresses a
/// receiver sees, or going around the proxy, is not a tenant's decision.
fn operator_only(who: &Principal, sets_proxy: bool) -> Result<(), ApiError> {
    if sets_proxy && who.tenant().is_some() {
        return Err(ApiError::forbidden("only the admin chooses a subscription's egress proxy"));
    }
    Ok(())
}

/// Checks the event types a subscription names against the catalogue: with
/// `ingest.unknown_types = "reject"` one it lacks is refused, naming the entry; otherwise the
/// answer carries a warning for each (none while the catalogue is empty: a platform that does
/// not keep one is not warned about every subscription).
fn catalogued(state: &AppState, events: &[String]) -> Result<Vec<String>, ApiError> {
    let unknown = state.event_types.unknown(events);
    let reject = state.unknown_event_types == crate::config::UnknownTypes::Reject;
    if let (true, Some(&i)) = (reject, unknown.first()) {
        return Err(ApiError::validation(format!("events[{i}]"), "no event type of this name in the catalogue"));
    }
    if state.event_types.is_empty() {
        return Ok(Vec::new());
    }
    Ok(unknown
        .into_iter()
        .map(|i| format!("events[{i}]: {:?} is not in the event-type catalogue", events[i]))
        .collect())
}

/// `body` with `warnings` added when there are any.
fn warned(mut body: serde_json::Value, warnings: Vec<String>) -> serde_json::Value {
    if !warnings.is_empty() {
        body["warnings"] = json!(warnings);
    }
    body
}

/// `via_edge` must name an edge device of the subscription's own tenant.
fn check_device(state: &AppState, device: Option<&str>, tenant: &str) -> Result<(), ApiError> {
    match device {
        Some(id) if !id.is_empty() && state.devices.get(id, Some(tenant)).is_none() => {
            Err(ApiError::validation("via_edge", "no edge device with this id belongs to the subscription's tenant"))
        }
        _ => Ok(()),
    }
}

/// Query of a list call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
    transport: Option<String>,
    enabled: Option<String>,
    breaker: Option<String>,
}

/// What a list keeps: each filter the query names, checked.
struct Filter {
    via: Option<Via>,
    enabled: Option<bool>,
    breaker: Option<Breaker>,
}

impl Filter {
    fn of(q: &ListQuery) -> Result<Filter, ApiError> {
        let via = q
            .transport
            .as_deref()
            .map(|t| {
                Via::ALL.into_iter().find(|v| v.label() == t).ok_or_else(|| {
                    let labels: Vec<_> = Via::ALL.iter().map(|v| v.label()).collect();
                    ApiError::validation("transport", format!("must be one of {}", labels.join(", ")))
                })
            })
            .transpose()?;
        let enabled = q
            .enabled
            .as_deref()
            .map(|e| e.parse().map_err(|_| ApiError::validation("enabled", "must be true or false")))
            .transpose()?;
        let breaker = q
            .breaker
            .as_deref()
            .map(|b| {
                Breaker::deserialize(b.into_deserializer()).map_err(|_: serde::de::value::Error| {
                    ApiError::validation("breaker", "must be closed, open or half_open")
                })
            })
            .transpose()?;
        Ok(Filter { via, enabled, breaker })
    }

    fn keeps(&self, t: &Target) -> bool {
        self.via.is_none_or(|v| Via::of(t) == v)
            && self.enabled.is_none_or(|e| t.sub.spec.enabled == e)
            && self.breaker.is_none_or(|b| t.admission.health().breaker == b)
    }
}

/// Lists subscriptions, `{"items","next"}`.
pub async fn list(
    who: Principal,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let filter = Filter::of(&q)?;
    let tenant = who.names(q.tenant.as_deref())?;
    let text = |o: &Option<String>| o.clone().unwrap_or_default();
    let (via, enabled, breaker) = (text(&q.transport), text(&q.enabled), text(&q.breaker));
    let listing = ["subscriptions", tenant.unwrap_or_default(), &via, &enabled, &breaker];
    let cursor = page::place(q.cursor.clone(), &listing)?;
    // A place in this list is a subscription id: another list's (a dead letter's `0.17`) or
    // a stray word was taken for one, and answered a first page or an empty one.
    if cursor.as_deref().is_some_and(|c| !c.starts_with("sub_") && !c.starts_with(crate::registry::STATIC_PREFIX)) {
        return Err(ApiError::validation("cursor", "not a cursor returned by this API"));
    }
    let (page, mut next) = state.registry.list(tenant, cursor.as_deref(), limit, page::MAX_SCAN, |t| filter.keeps(t));
    // Cut by size too: a subscription can be a quarter of a megabyte (a thousand event types),
    // and 500 of them made one answer of over 100 MB, built and held at once.
    // Each item written once, measured as it is written, and sent as written.
    let (mut items, mut bytes) = (Vec::new(), 0);
    for (i, t) in page.iter().enumerate() {
        let item = serde_json::value::to_raw_value(&view(t)).expect("a view serializes");
        bytes += item.get().len();
        items.push(item);
        if bytes >= page::MAX_BYTES && i + 1 < page.len() {
            next = Some(t.sub.id.clone());
            break;
        }
    }
    Ok(Json(serde_json::json!({ "items": items, "next": page::mark(next, &listing) })))
}

/// Reads one subscription.
pub async fn get(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let target = visible(&state, &who, &id)?;
    Ok(Json(view(&target)))
}

/// A subscription as reads show it: its view (no secrets) and its endpoint's `health` in
/// this process.
fn view(target: &crate::target::Target) -> serde_json::Value {
    let mut body = target.sub.view();
    body["health"] = serde_json::to_value(target.admission.health()).expect("serializes");
    body
}

/// Deletes one subscription; its pending deliveries are dropped.
pub async fn delete(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    // One this process cannot read (a newer version's record, or a secret sealed with a key
    // it lacks) may be deleted by its record's tenant: it holds that tenant's publishes here.
    let unreadable = state.registry.get(&id).is_none()
        && state
            .registry
            .unreadable_tenant(&id)
            .is_some_and(|t| who.sees(&t) && !id.starts_with(crate::registry::STATIC_PREFIX));
    if !unreadable {
        declared_in_file(&*visible(&state, &who, &id)?)?;
    }
    if state.registry.delete(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("subscription"))
    }
}

/// Changes a subscription: a JSON Merge Patch onto its spec (`null` clears a field), checked
/// like a new one.
pub async fn patch(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    JsonBody(StrictValue(patch)): JsonBody<StrictValue>,
) -> Result<impl IntoResponse, ApiError> {
    if let Some(current) = state.registry.get(&id).filter(|t| who.sees(&t.sub.tenant)) {
        // Its `enabled` may be set: turned on again after Herald disabled it (a 410, failing
        // too long), or off in an emergency — until the next start sets the file's again.
        let only_enabled = patch.as_object().is_some_and(|o| o.keys().all(|k| k == "enabled"));
        if !only_enabled {
            declared_in_file(&current)?;
        }
        let device = patch.get("via_edge").and_then(|d| d.as_str());
        check_device(&state, device, &current.sub.tenant)?;
    }
    operator_only(&who, patch.get("proxy").is_some())?;
    // A patch's `events` replaces the list whole (arrays are not merged); a malformed one is
    // refused below, by the registry.
    let events: Vec<String> =
        patch.get("events").and_then(|e| serde_json::from_value(e.clone()).ok()).unwrap_or_default();
    let warnings = catalogued(&state, &events)?;
    let target =
        state.registry.update(&id, who.tenant(), &patch).await?.ok_or_else(|| ApiError::not_found("subscription"))?;
    Ok(Json(warned(view(&target), warnings)))
}

/// `POST /v1/subscriptions/{id}/rotate-secret` body: the new secret, or none to generate one.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    #[serde(default)]
    secret: Option<Secret>,
}

/// Rotates the signing secret; the answer shows the new one (the only time besides create).
/// An empty body is allowed.
pub async fn rotate_secret(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<RotateRequest>,
) -> Result<impl IntoResponse, ApiError> {
    if let Ok(current) = visible(&state, &who, &id) {
        declared_in_file(&current)?;
    }
    let target = state
        .registry
        .rotate_secret(&id, who.tenant(), req.secret, state.rotation_overlap)
        .await?
        .ok_or_else(|| ApiError::not_found("subscription"))?;
    let warnings = match target.sub.spec.signature {
        crate::model::SignatureSpec::Hmac { .. } => {
            vec!["an hmac signature header carries one signature: the new secret signs at once, with no overlap \
             (receivers holding the old one fail until they have the new)"
                .to_string()]
        }
        _ => Vec::new(),
    };
    Ok(Json(warned(target.sub.view_with_secret(), warnings)))
}

/// Sends a signed `herald.ping` event to the subscription now and reports what happened.
pub async fn test(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let target = visible(&state, &who, &id)?;
    state.tests.admit(&target.sub.id)?;
    let now = now_ms();
    let ping = Delivery {
        event_id: new_id("ping"),
        subscription: target.sub.id.clone(),
        tenant: target.sub.tenant.clone(),
        event_type: "herald.ping".into(),
        attempt: 1,
        accepted_ms: now,
        due_ms: now,
        budget_ms: now,
        generation: 0,
        data: bytes::Bytes::from_static(br#"{"ping":true}"#),
        changes: None,
        trace: None,
        ordering_key: None,
        as_sent: false,
    };
    let outcome = state.transports.deliver(&target, &ping, 0).await;
    let body = json!({
        "delivered": matches!(outcome, Outcome::Delivered { .. }),
        "event_id": ping.event_id,
        "outcome": outcome.label(),
        "status": outcome.status(),
        "error": outcome.failure().map(ToString::to_string),
        "latency_ms": outcome.latency().as_millis() as u64,
    });
    Ok(Json(body))
}

/// Refuses a change to a subscription the config file declares (`[[webhooks]]`): the file is
/// what it is made from at every start (of every process, on Kafka), so a change through the
/// API was answered as made and then undone — a rotated secret went back to the file's with no
/// overlap, a disabled webhook came back.
fn declared_in_file(target: &crate::target::Target) -> Result<(), ApiError> {
    match target.sub.id.starts_with(crate::registry::STATIC_PREFIX) {
        true => Err(ApiError::conflict(
            "id",
            "declared in the config file ([[webhooks]]): change it there (only `enabled` may be set here, until the next start)",
        )),
        false => Ok(()),
    }
}

/// The subscription `id` if the caller may see it; another tenant's answers 404, as if it
/// did not exist.
pub(super) fn visible(
    state: &AppState,
    who: &Principal,
    id: &str,
) -> Result<std::sync::Arc<crate::target::Target>, ApiError> {
    state.registry.get(id).filter(|t| who.sees(&t.sub.tenant)).ok_or_else(|| ApiError::not_found("subscription"))
}
