//! `/v1/event-types`: the event-type catalogue. The admin defines it; tenant keys read it
//! (it tells a tenant what it can subscribe to).

use super::auth::{Admin, Principal};
use super::error::{ApiError, JsonBody, StrictValue};
use super::page::StrictPath;
use super::AppState;
use crate::event_types::EventTypeSpec;
use crate::model::Invalid;
use crate::registry::spec::strict;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde_json::Value;

/// Adds an event type: the body is `name` and the spec's fields.
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    JsonBody(StrictValue(mut body)): JsonBody<StrictValue>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(object) = body.as_object_mut() else {
        return Err(Invalid::new("", "the body must be a JSON object").into());
    };
    let name = match object.remove("name") {
        Some(Value::String(name)) => name,
        Some(_) => return Err(ApiError::validation("name", "must be a string")),
        None => return Err(ApiError::validation("name", "missing field `name`")),
    };
    let spec: EventTypeSpec = strict(&body)?;
    let created = state.event_types.create(name, spec).await?;
    Ok((StatusCode::CREATED, Json(created)))
}

/// The whole catalogue, by name, on one page: `{"items","next"}` (`next` always null).
pub async fn list(_: Principal, State(state): State<AppState>) -> impl IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], state.event_types.page())
}

/// One event type.
pub async fn get(
    _: Principal,
    State(state): State<AppState>,
    StrictPath(name): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.event_types.get(&name).map(Json).ok_or_else(|| ApiError::not_found("event type"))
}

/// Changes an event type: each field given replaces the stored one, `null` clears it (a
/// schema is replaced whole, never merged).
pub async fn patch(
    _: Admin,
    State(state): State<AppState>,
    StrictPath(name): StrictPath<String>,
    JsonBody(StrictValue(patch)): JsonBody<StrictValue>,
) -> Result<impl IntoResponse, ApiError> {
    let Value::Object(patch) = patch else {
        return Err(ApiError::validation("", "a patch is a JSON object of the fields to change"));
    };
    if patch.contains_key("name") {
        return Err(ApiError::validation("name", "an event type cannot be renamed; create the new name instead"));
    }
    let merge = |current: &EventTypeSpec| {
        let mut merged = serde_json::to_value(current).expect("a spec serializes");
        let fields = merged.as_object_mut().expect("a spec is an object");
        for (key, value) in patch {
            if value.is_null() {
                fields.remove(&key);
            } else {
                fields.insert(key, value);
            }
        }
        strict::<EventTypeSpec>(&merged)
    };
    let updated = state.event_types.update(&name, merge).await?.ok_or_else(|| ApiError::not_found("event type"))?;
    Ok(Json(updated))
}

/// Removes an event type from the catalogue (subscriptions and events naming it are not
/// touched).
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    StrictPath(name): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    if state.event_types.delete(&name).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("event type"))
    }
}
