//! `GET /v1/dlq` (filtered by subscription and tenant, paged) and `POST /v1/dlq/replay`.

use super::auth::Principal;
use super::error::{ApiError, JsonBody};
use super::page::{self, StrictQuery};
use super::AppState;
use crate::retry::dead_letters::Selection;
use axum::extract::State;
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

/// Lists live dead letters, oldest first per partition.
pub async fn list(
    who: Principal,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<DlqQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let limit = page::limit(q.limit)?;
    let tenant = who.names(q.tenant.as_deref())?;
    let subscription = q.subscription.clone().unwrap_or_default();
    let listing = ["dlq", tenant.unwrap_or_default(), &subscription];
    let after = match page::place(q.cursor.clone(), &listing)?.as_deref() {
        None => None,
        Some(c) => {
            let parsed = c.split_once('.').and_then(|(p, o)| Some((p.parse::<u32>().ok()?, o.parse::<u64>().ok()?)));
            Some(parsed.ok_or_else(|| ApiError::validation("cursor", "not a cursor returned by this API"))?)
        }
    };
    let (items, next) = state.dead_letters.list(q.subscription.as_deref(), tenant, after, limit).await?;
    let next = page::mark(next.map(|(p, o)| format!("{p}.{o}")), &listing);
    Ok(Json(serde_json::json!({ "items": items, "next": next })))
}

/// `POST /v1/dlq/replay` body: entry ids (of `subscription` when given, which reads only its
/// partition), or every entry of a subscription.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    #[serde(default)]
    ids: Option<Vec<String>>,
    #[serde(default)]
    subscription: Option<String>,
}

/// Re-enqueues dead letters with a fresh attempt budget; each entry at most once.
pub async fn replay(
    who: Principal,
    State(state): State<AppState>,
    JsonBody(req): JsonBody<ReplayRequest>,
) -> Result<impl IntoResponse, ApiError> {
    super::goes_on_if_cut_off("replay", replay_now(who, state, req)).await
}

async fn replay_now(
    who: Principal,
    state: AppState,
    req: ReplayRequest,
) -> Result<Json<crate::retry::dead_letters::ReplayReport>, ApiError> {
    let selection = match (req.ids, req.subscription) {
        (Some(ids), subscription) if !ids.is_empty() && ids.len() <= 1000 => Selection::Ids { ids, subscription },
        (Some(_), _) => return Err(ApiError::validation("ids", "give 1 to 1000 ids")),
        (None, Some(sub)) => Selection::Subscription(sub),
        (None, None) => return Err(ApiError::validation("ids", "give ids, a subscription, or both")),
    };
    // A deleted subscription would drop what is replayed (the dead letters gone, nothing
    // sent), a disabled one dead-letter it again at once: refused, and they stay listed. So is
    // one now another tenant's (a static webhook the config file moved keeps its id): for the
    // entry's tenant, its subscription is gone.
    let refuse = |sub: &str, tenant: &str| match state.registry.get(sub) {
        None => Some("subscription_deleted"),
        Some(t) if t.sub.tenant != tenant => Some("subscription_deleted"),
        Some(t) if !t.sub.spec.enabled => Some("subscription_disabled"),
        Some(_) => None,
    };
    if let Selection::Subscription(sub) = &selection {
        // A whole subscription's: 404 when the caller has none such, 409 when it is disabled.
        let theirs = state.registry.get(sub).is_some_and(|t| who.tenant().is_none_or(|x| t.sub.tenant == x));
        if !theirs {
            return Err(ApiError::not_found("subscription"));
        }
        if state.registry.get(sub).is_some_and(|t| !t.sub.spec.enabled) {
            return Err(ApiError::conflict("subscription", "the subscription is disabled: enable it, then replay"));
        }
    }
    let _one = match who.tenant() {
        Some(tenant) => Some(state.dead_letters.replaying(tenant).ok_or_else(|| {
            ApiError::conflict("ids", "a replay of this tenant's is under way: send this one once it has answered")
        })?),
        None => None,
    };
    let report = state.dead_letters.replay(selection, who.tenant(), &refuse).await?;
    Ok(Json(report))
}
