//! `/v1/subscriptions`: create, list, read, delete.

use super::auth::Admin;
use super::error::{ApiError, JsonBody};
use super::events::DEFAULT_TENANT;
use super::page::{self, StrictQuery};
use super::AppState;
use crate::model::SubscriptionInput;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

/// Creates a subscription; the answer is the only one (with rotation) that shows the secret.
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    JsonBody(input): JsonBody<SubscriptionInput>,
) -> Result<impl IntoResponse, ApiError> {
    let tenant = input.tenant.clone().unwrap_or_else(|| DEFAULT_TENANT.to_string());
    let target = state.registry.create(input, tenant).await?;
    Ok((StatusCode::CREATED, Json(target.sub.view(true))))
}

/// Query of a list call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    tenant: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Lists subscriptions, `{"items","next"}`.
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<ListQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let (page, next) = state.registry.list(q.tenant.as_deref(), q.cursor.as_deref(), limit);
    let items: Vec<_> = page.iter().map(|t| t.sub.view(false)).collect();
    Ok(Json(serde_json::json!({ "items": items, "next": next })))
}

/// Reads one subscription.
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let target = state.registry.get(&id).ok_or_else(|| ApiError::not_found("subscription"))?;
    Ok(Json(target.sub.view(false)))
}

/// Deletes one subscription; its pending deliveries are dropped.
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    if state.registry.delete(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found("subscription"))
    }
}
