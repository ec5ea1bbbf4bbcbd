//! `GET /v1/dlq`: dead letters, filtered by subscription and tenant, paged.

use super::auth::Admin;
use super::error::ApiError;
use super::AppState;
use crate::model::DeadLetter;
use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

/// Query of `GET /v1/dlq`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DlqQuery {
    subscription: Option<String>,
    tenant: Option<String>,
    cursor: Option<String>,
    limit: Option<usize>,
}

/// Lists dead letters oldest first per partition; `next` is the position to continue from.
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    query: Result<Query<DlqQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(q) = query.map_err(|e| ApiError::validation("query", e.body_text()))?;
    let limit = q.limit.unwrap_or(50);
    if limit == 0 || limit > 500 {
        return Err(ApiError::validation("limit", "must be between 1 and 500"));
    }
    let after = match q.cursor.as_deref() {
        None => None,
        Some(c) => {
            let parsed = c.split_once('.').and_then(|(p, o)| Some((p.parse::<u32>().ok()?, o.parse::<u64>().ok()?)));
            Some(parsed.ok_or_else(|| ApiError::validation("cursor", "not a cursor returned by this API"))?)
        }
    };
    let mut records = state.log.read_all(&state.dlq_topic).await?;
    records.sort_by_key(|r| (r.partition, r.offset));
    let mut items = Vec::new();
    let mut next = None;
    for rec in records {
        if after.is_some_and(|a| (rec.partition, rec.offset) <= a) {
            continue;
        }
        let Some((entry, _)) = DeadLetter::decode(rec.value) else { continue };
        if q.subscription.as_ref().is_some_and(|s| *s != entry.subscription)
            || q.tenant.as_ref().is_some_and(|t| *t != entry.tenant)
        {
            continue;
        }
        if items.len() == limit {
            break;
        }
        next = Some(format!("{}.{}", rec.partition, rec.offset));
        items.push(entry);
    }
    if items.len() < limit {
        next = None;
    }
    Ok(Json(serde_json::json!({ "items": items, "next": next })))
}
