//! `/v1/tenants`: the admin lists and creates tenants and issues and revokes their API keys.

use super::auth::Admin;
use super::error::{ApiError, JsonBody};
use super::page::StrictPath;
use super::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

/// `POST /v1/tenants` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTenant {
    name: String,
}

/// Creates a tenant: `{"id","name"}`.
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    JsonBody(t): JsonBody<NewTenant>,
) -> Result<impl IntoResponse, ApiError> {
    let name = super::display_name(&t.name)?;
    let tenant = state.tenants.create(name).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": tenant.id, "name": tenant.name }))))
}

/// Lists tenants, oldest first, with their keys' ids: `{"items","next"}`, all of them on one
/// page (`next` is always null: lists answer in one shape).
pub async fn list(_: Admin, State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "items": state.tenants.list(), "next": null }))
}

/// Issues an API key: `{"id","key"}`; the key is shown this once.
pub async fn issue_key(
    _: Admin,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    state.tenants.get(&id).ok_or_else(|| ApiError::not_found("tenant"))?;
    let (key_id, key) = state.tenants.issue_key(&id).await?;
    Ok((StatusCode::CREATED, Json(serde_json::json!({ "id": key_id, "key": key }))))
}

/// Revokes an API key.
pub async fn revoke_key(
    _: Admin,
    State(state): State<AppState>,
    StrictPath((id, key_id)): StrictPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    if state.tenants.revoke_key(&id, &key_id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("key"))
    }
}
