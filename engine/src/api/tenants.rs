//! `/v1/tenants`: the admin lists and creates tenants and issues and revokes their API keys.

use super::auth::Admin;
use super::error::{ApiError, JsonBody};
use super::page::{self, StrictPath, StrictQuery};
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

/// `GET /v1/tenants` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// Only tenants whose name holds this, in any case.
    name: Option<String>,
}

/// Lists tenants, the default first and then oldest first, with their keys' ids:
/// `{"items","next"}`, paged like every list — a platform has a tenant per customer, and all
/// of them in one answer, asked by the console at each page load, was megabytes.
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let name = q.name.unwrap_or_default();
    let listing = ["tenants", name.as_str()];
    let after = page::place(q.cursor, &listing)?;
    let not_ours = || ApiError::validation("cursor", "not a cursor returned by this API");
    let (items, next) = state
        .tenants
        .list(Some(name.as_str()).filter(|n| !n.is_empty()), after.as_deref(), limit)
        .ok_or_else(not_ours)?;
    Ok(Json(serde_json::json!({ "items": items, "next": page::mark(next, &listing) })))
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
