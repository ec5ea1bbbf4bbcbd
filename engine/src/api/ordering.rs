//! `/v1/subscriptions/{id}/ordering`: an ordered subscription's blocked keys, and skipping a
//! blocked key's head so the rest of the key goes on.

use super::auth::Principal;
use super::error::{ApiError, JsonBody};
use super::page::{self, StrictPath, StrictQuery};
use super::subscriptions::visible;
use super::AppState;
use crate::dispatch::{LaneId, Marker};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;

/// The subscription, if it keeps order per key (or, for a skip, ever did: keys queued while it
/// was ordered are still sequenced), or it has keys blocked here: `ordering` removed while a
/// key was held leaves that key sequenced, and it must still be listed and skipped.
fn ordered(
    state: &AppState,
    who: &Principal,
    id: &str,
    or_was: bool,
) -> Result<std::sync::Arc<crate::target::Target>, ApiError> {
    let target = visible(state, who, id)?;
    let keeps = target.sub.spec.ordering.as_ref().is_some_and(|o| o.ordered() || or_was);
    if !keeps && state.ordered_keys.blocked(&target.sub.id, None, 1).0.is_empty() {
        return Err(ApiError::validation("ordering", "this subscription does not keep order per key"));
    }
    Ok(target)
}

/// `GET …/ordering/blocked` query.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockedQuery {
    limit: Option<usize>,
    cursor: Option<String>,
}

/// The keys whose head has failed (retrying) or is held after a dead letter, with the head's
/// event and how many deliveries wait behind it, in key order, a page at a time (a
/// subscription may have ten thousand). On Kafka each process lists the keys of the
/// partitions it sequences.
pub async fn blocked(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    StrictQuery(q): StrictQuery<BlockedQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let target = ordered(&state, &who, &id, false)?;
    let limit = page::limit(q.limit)?;
    let listing = ["ordering/blocked", target.sub.id.as_str()];
    let after = match page::place(q.cursor, &listing)? {
        None => None,
        Some(c) => Some(
            hex::decode(&c)
                .ok()
                .and_then(|k| String::from_utf8(k).ok())
                .ok_or_else(|| ApiError::validation("cursor", "not a cursor returned by this API"))?,
        ),
    };
    let (items, more) = state.ordered_keys.blocked(&target.sub.id, after.as_deref(), limit);
    let next = more.then(|| items.last().map(|b| hex::encode(&b.key))).flatten();
    Ok(Json(serde_json::json!({ "items": items, "next": page::mark(next, &listing) })))
}

/// `POST /v1/subscriptions/{id}/ordering/skip` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SkipRequest {
    key: String,
    /// The head's event as the blocked-keys list showed it: skipped only if it is still the head.
    #[serde(default)]
    event: Option<String>,
}

/// Skips the key's head: dead-lettered (if it is not already, so it can be replayed), and
/// the key's next delivery goes on. Written to the log, so whichever process sequences the
/// key takes it; answered once durable.
pub async fn skip(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    JsonBody(req): JsonBody<SkipRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let target = ordered(&state, &who, &id, true)?;
    crate::model::check_ordering_key(&req.key).map_err(|e| ApiError::validation("key", e))?;
    if let Some(event) = &req.event {
        crate::model::check_event_id(event).map_err(|e| ApiError::validation("event", e))?;
    }
    let lane = LaneId { subscription: target.sub.id.clone(), key: req.key.clone() };
    let marker = Marker::Skip { lane, event: req.event };
    state.log.append(&state.ordered_topic, vec![marker.record()]).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "subscription": target.sub.id, "key": req.key, "skip": "queued" })),
    ))
}
