//! The delivery history: `GET /v1/attempts`, `GET /v1/events`, `GET /v1/events/{id}`,
//! `POST /v1/events/{id}/resend` and `POST /v1/subscriptions/{id}/recover`. A tenant key sees
//! its own tenant's history only; another tenant's ids answer 404.

use super::auth::Principal;
use super::error::{ApiError, JsonBody, OptionalJsonBody};
use super::page::{self, StrictPath, StrictQuery};
use super::AppState;
use crate::history::{AttemptQuery, DeliveryView, EventQuery, EventRecord, History, Index};
use crate::model::{now_ms, rfc3339_ms};
use crate::target::Target;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;

/// Events one recover call re-sends, about: it stops between milliseconds once it has this
/// many (the answer says where to continue; see `Index::recoverable`).
const RECOVER_MAX: usize = 10_000;
/// Deliveries appended at a time while recovering, at most.
const RECOVER_CHUNK: usize = 500;
/// Bytes of events (`data` and `changes`) loaded and appended at a time while recovering, about
/// (and no more than half of `quotas.fanout_bytes`): 500 events of a megabyte made a gigabyte
/// held by one call.
const RECOVER_CHUNK_BYTES: u64 = 8 << 20;
/// How long a lookup of an event not found waits for the index to take in what the history
/// topic holds (during a peak indexing may be behind by up to `history.index_defer`).
const FIND_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a recover waits for the same before choosing what to send, after the attempts
/// recorded so far reached the topic: the states it chooses by are then the newest ones
/// settled before it was asked, unless the index could not catch up in time (it says so).
const RECOVER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

/// Runs `f`, a read of the index for `tenant`'s query, in the tenant's turn (see
/// [`History::read`]).
async fn blocking<T: Send + 'static>(
    history: &History,
    tenant: &str,
    f: impl FnOnce(&Index) -> Result<T, crate::history::IndexError> + Send + 'static,
) -> Result<T, ApiError> {
    history.read(tenant, f).await.map_err(|_| ApiError::unavailable("the history index is not available"))?.map_err(
        |e| match e {
            crate::history::IndexError::Cursor => ApiError::validation("cursor", e.to_string()),
            e => ApiError::unavailable(e.to_string()),
        },
    )
}

fn history(state: &AppState) -> Result<&Arc<History>, ApiError> {
    state.history.as_ref().ok_or_else(|| ApiError::not_found("delivery history (history.retention is 0)"))
}

/// An RFC 3339 time in the query, as ms since the epoch.
fn time(field: &str, text: Option<&str>) -> Result<Option<i64>, ApiError> {
    text.map(|t| {
        chrono::DateTime::parse_from_rfc3339(t).map(|d| d.timestamp_millis()).map_err(|_| {
            // A query's `+` reads as a space: `...T09:00:00+02:00` arrives as `...T09:00:00 02:00`.
            let hint = if t.contains(' ') { " (in a query, write an offset's + as %2B)" } else { "" };
            ApiError::validation(field, format!("must be an RFC 3339 time, e.g. 2026-11-30T09:00:00Z{hint}"))
        })
    })
    .transpose()
}

/// `since` and `until`, each checked, and `until` not before `since`.
fn window(since: Option<&str>, until: Option<&str>) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let (since, until) = (time("since", since)?, time("until", until)?);
    if let (Some(s), Some(u)) = (since, until) {
        if u < s {
            return Err(ApiError::validation("until", "must not be before since"));
        }
    }
    Ok((since, until))
}

fn cursor(c: Option<String>) -> Result<Option<String>, ApiError> {
    match c {
        Some(c) if crate::history::index::decode_cursor(&c).is_none() => {
            Err(ApiError::validation("cursor", "not a cursor returned by this API"))
        }
        c => Ok(c),
    }
}

/// Query of `GET /v1/attempts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttemptsQuery {
    event: Option<String>,
    subscription: Option<String>,
    outcome: Option<String>,
    since: Option<String>,
    until: Option<String>,
    tenant: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Attempts, newest first.
pub async fn attempts(
    who: Principal,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<AttemptsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let history = history(&state)?;
    if let Some(o) = &q.outcome {
        // The typed outcome's labels, and the one a disabled subscription's attempt gets.
        use crate::model::outcome::{DISABLED, LABELS};
        if !LABELS.contains(&o.as_str()) && o != DISABLED {
            return Err(ApiError::validation("outcome", format!("must be one of {}, {DISABLED}", LABELS.join(", "))));
        }
    }
    // Named filters name something: an empty or impossible one answered an empty page, read
    // as "never sent".
    if let Some(event) = &q.event {
        crate::model::check_event_id(event).map_err(|e| ApiError::validation("event", e))?;
    }
    if q.subscription.as_deref().is_some_and(|s| s.trim().is_empty()) {
        return Err(ApiError::validation("subscription", "must name a subscription"));
    }
    let named = q.tenant.is_some();
    let mut tenant = who.owner(q.tenant)?;
    if let (Some(sub), None, false) = (&q.subscription, who.tenant(), named) {
        // A subscription's attempts are its tenant's: the admin need not name it, with an
        // event or without. (A tenant named is the one read; another tenant's subscription,
        // deleted or not, answers an empty page: the index stops at its first entry.)
        if let Some(t) = state.registry.get(sub) {
            tenant = t.sub.tenant.clone();
        }
    }
    let (since_ms, until_ms) = window(q.since.as_deref(), q.until.as_deref())?;
    let text = |o: &Option<String>| o.clone().unwrap_or_default();
    let listing = [
        "attempts".to_string(),
        tenant.clone(),
        text(&q.event),
        text(&q.subscription),
        text(&q.outcome),
        text(&q.since),
        text(&q.until),
    ];
    let listing: Vec<&str> = listing.iter().map(String::as_str).collect();
    let query = AttemptQuery {
        tenant,
        event: q.event,
        subscription: q.subscription,
        outcome: q.outcome,
        since_ms,
        until_ms,
        limit: page::limit(q.limit)?,
        max_bytes: Some(page::MAX_BYTES),
        cursor: cursor(page::place(q.cursor, &listing)?)?,
    };
    let tenant = query.tenant.clone();
    let page = blocking(history, &tenant, move |index| index.attempts(&query)).await?;
    Ok(Json(serde_json::json!({ "items": page.items, "next": page::mark(page.next, &listing) })))
}

/// Query of `GET /v1/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(rename = "type")]
    event_type: Option<String>,
    since: Option<String>,
    until: Option<String>,
    tenant: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// The tenant's events, newest first.
pub async fn list(
    who: Principal,
    State(state): State<AppState>,
    StrictQuery(q): StrictQuery<EventsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let history = history(&state)?;
    let (since_ms, until_ms) = window(q.since.as_deref(), q.until.as_deref())?;
    let tenant = who.owner(q.tenant)?;
    let text = |o: &Option<String>| o.clone().unwrap_or_default();
    let listing = ["events".to_string(), tenant.clone(), text(&q.event_type), text(&q.since), text(&q.until)];
    let listing: Vec<&str> = listing.iter().map(String::as_str).collect();
    let query = EventQuery {
        tenant,
        event_type: q.event_type,
        since_ms,
        until_ms,
        limit: page::limit(q.limit)?,
        cursor: cursor(page::place(q.cursor, &listing)?)?,
    };
    let tenant = query.tenant.clone();
    let page = blocking(history, &tenant, move |index| index.events(&query)).await?;
    Ok(Json(serde_json::json!({ "items": page.items, "next": page::mark(page.next, &listing) })))
}

/// Query naming a tenant (the admin's).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantQuery {
    tenant: Option<String>,
}

/// The event, looked up again once the index has caught up if it was not found: an event
/// accepted a moment ago may not be indexed yet.
async fn find(history: &Arc<History>, tenant: String, id: String) -> Result<EventRecord, ApiError> {
    // One no event can have is not waited for.
    crate::model::check_event_id(&id).map_err(|e| ApiError::validation("id", e))?;
    let lookup = || {
        let (owner, id) = (tenant.clone(), id.clone());
        blocking(history, &tenant, move |index| index.event(&owner, &id))
    };
    if let Some(event) = lookup().await? {
        return Ok(event);
    }
    history.caught_up(&tenant, FIND_CATCH_UP).await;
    lookup().await?.ok_or_else(|| ApiError::not_found("event"))
}

/// One event and where each of its deliveries stands.
pub async fn get(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    StrictQuery(q): StrictQuery<TenantQuery>,
) -> Result<impl IntoResponse, ApiError> {
    let history = history(&state)?;
    let event = find(history, who.owner(q.tenant)?, id).await?;
    let tenant = event.tenant.clone();
    let (event, mut deliveries) =
        blocking(history, &tenant, move |index| index.deliveries(&event).map(|d| (event, d))).await?;
    dropped_with_their_subscriptions(&state, &event.tenant, &mut deliveries).await;
    Ok(Json(serde_json::json!({
        "id": event.id,
        "tenant": event.tenant,
        "type": event.event_type,
        "accepted_at": rfc3339_ms(event.accepted_ms),
        "data": event.data_json(),
        "changes": event.changes_json(),
        "ordering_key": event.ordering_key,
        "deliveries": deliveries,
    })))
}

/// Deliveries still to be made whose subscription is gone read `dropped`, as they will be
/// when their attempt comes due: a deletion writes nothing to the history, and a delivery
/// waiting on a retry read `retrying`, its next attempt never to be made, for hours. Gone as
/// the dispatcher judges it ([`crate::registry::Registry::lookup_all`]): deleted, or another
/// tenant's since; one not known yet (made through another process a moment ago, or written
/// by a newer version) keeps its state, since its delivery waits.
async fn dropped_with_their_subscriptions(state: &AppState, tenant: &str, deliveries: &mut [DeliveryView]) {
    use crate::registry::Lookup;
    let waiting = |d: &DeliveryView| matches!(d.state, "retrying" | "pending");
    let found = {
        let ids: Vec<&str> = deliveries.iter().filter(|d| waiting(d)).map(|d| d.subscription.as_str()).collect();
        state.registry.lookup_all(&ids).await
    };
    for (d, found) in deliveries.iter_mut().filter(|d| waiting(d)).zip(found) {
        let gone = match found {
            Lookup::Found(t) => t.sub.tenant != tenant,
            Lookup::Deleted => true,
            Lookup::Unknown => false,
        };
        if gone {
            d.state = crate::history::State::Dropped.as_str();
            d.next_attempt_at = None;
        }
    }
}

/// `POST /v1/events/{id}/resend` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResendRequest {
    subscription: Option<String>,
    tenant: Option<String>,
}

/// The subscriptions of `event` that still exist and are enabled (a named one must be one it
/// matched). A disabled one would dead-letter what is resent at once, as a new entry beside
/// the old — answered `409`, as a dead letter's replay is.
fn targets(state: &AppState, event: &EventRecord, only: Option<&str>) -> Result<Vec<Arc<Target>>, ApiError> {
    let live = |id: &str| state.registry.get(id).filter(|t| t.sub.tenant == event.tenant);
    match only {
        Some(sub) => {
            if !event.subscriptions.iter().any(|s| s == sub) {
                return Err(ApiError::validation("subscription", "the event did not match this subscription"));
            }
            let target = live(sub).ok_or_else(|| ApiError::not_found("subscription"))?;
            enabled(&target)?;
            Ok(vec![target])
        }
        None => Ok(event.subscriptions.iter().filter_map(|s| live(s)).filter(|t| t.sub.spec.enabled).collect()),
    }
}

/// `409` for a disabled subscription: what is sent to it is dead-lettered at once.
fn enabled(target: &Target) -> Result<(), ApiError> {
    match target.sub.spec.enabled {
        true => Ok(()),
        false => Err(ApiError::conflict("subscription", "the subscription is disabled: enable it, then send again")),
    }
}

/// Sends an event again, now, to one subscription or every one it matched.
pub async fn resend(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    // The body is optional: none resends to every subscription the event matched.
    OptionalJsonBody(req): OptionalJsonBody<ResendRequest>,
) -> Result<impl IntoResponse, ApiError> {
    let history = history(&state)?;
    let event = find(history, who.owner(req.tenant)?, id).await?;
    let targets = targets(&state, &event, req.subscription.as_deref())?;
    let subscriptions: Vec<String> = targets.iter().map(|t| t.sub.id.clone()).collect();
    let id = event.id.clone();
    let queued = state.ingest.resend(&[(event, targets)]).await?;
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "id": id, "queued": queued, "subscriptions": subscriptions }))))
}

/// `POST /v1/subscriptions/{id}/recover` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    since: String,
    until: Option<String>,
    #[serde(default)]
    all: bool,
}

/// Re-sends the subscription's events accepted in a window whose delivery is dead-lettered or
/// still retrying (every one with `all`: a rewind for a receiver that lost its data).
pub async fn recover(
    who: Principal,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    JsonBody(req): JsonBody<RecoverRequest>,
) -> Result<impl IntoResponse, ApiError> {
    // A rewind asked again after one cut off part-way would send its first parts twice; the
    // tenant's next recover waits for this one to end (`409` meanwhile).
    super::goes_on_if_cut_off("recover", recover_now(who, state, id, req)).await
}

async fn recover_now(
    who: Principal,
    state: AppState,
    id: String,
    req: RecoverRequest,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let history = history(&state)?.clone();
    let target = state
        .registry
        .get(&id)
        .filter(|t| who.sees(&t.sub.tenant))
        .ok_or_else(|| ApiError::not_found("subscription"))?;
    let since = time("since", Some(&req.since))?.expect("given");
    let until = time("until", req.until.as_deref())?;
    match until {
        Some(until) if until < since => return Err(ApiError::validation("until", "must not be before since")),
        None if now_ms() < since => return Err(ApiError::validation("since", "must not be in the future")),
        _ => {}
    }
    enabled(&target)?;
    let until = until.unwrap_or_else(now_ms);
    let _one = history.recovering(&target.sub.tenant).ok_or_else(|| {
        ApiError::conflict(
            "subscription",
            "a recover of this tenant's is under way: send this one once it has answered",
        )
    })?;
    history.recorder.synced().await;
    let behind = history.caught_up(&target.sub.tenant, RECOVER_CATCH_UP).await;
    let (sub, tenant) = (id.clone(), target.sub.tenant.clone());
    let mut found =
        blocking(&history, &tenant, move |index| index.recoverable(&sub, since, until, req.all, RECOVER_MAX)).await?;
    // The subscription's events of its own tenant only: one that changed tenant (a static
    // webhook the config file moved keeps its id) has the first tenant's in its history too,
    // and resending those rewrote that tenant's delivery states and spent its fan-out quota.
    found.events.retain(|(tenant, _)| *tenant == target.sub.tenant);
    if target.sub.spec.ordering.as_ref().is_some_and(|o| o.ordered()) {
        // Found in the order of their acceptance, but a millisecond's (a batch's) in the order
        // of their ids' hashes: a key's events of one batch were sent again out of order.
        let events = std::mem::take(&mut found.events);
        found.events = blocking(&history, &tenant, move |index| {
            let mut placed: Vec<((i64, u64), (String, String))> = events
                .into_iter()
                .map(|(tenant, id)| {
                    let at = index.event(&tenant, &id).ok().flatten().map_or((0, 0), |e| (e.accepted_ms, e.seq));
                    (at, (tenant, id))
                })
                .collect();
            placed.sort_by_key(|(at, _)| *at);
            Ok(placed.into_iter().map(|(_, e)| e).collect())
        })
        .await?;
    }
    let mut queued = 0;
    let budget = RECOVER_CHUNK_BYTES.min(state.ingest.max_fanout() / 2).max(1);
    let mut rest = found.events.as_slice();
    // Why it stopped before the end, and the acceptance time of the first event not queued.
    let mut stopped: Option<(ApiError, i64)> = None;
    while !rest.is_empty() {
        // Looked up again for each part: a subscription disabled or deleted meanwhile takes no
        // more (the 409 above, or the 404), rather than dead-lettering each at once.
        let now = state.registry.get(&id).filter(|t| t.sub.tenant == target.sub.tenant);
        let gone = match &now {
            None => Some(ApiError::not_found("subscription")),
            Some(t) => enabled(t).err(),
        };
        let ahead = rest[..rest.len().min(RECOVER_CHUNK)].to_vec();
        // Events within the budget (one at least, however large), and how many were looked at:
        // one that would pass it is left for the next part.
        let (events, looked) = blocking(&history, &tenant, move |index| {
            let (mut events, mut bytes) = (Vec::new(), 0u64);
            for (looked, (tenant, event)) in ahead.iter().enumerate() {
                if let Some(e) = index.event(tenant, event).ok().flatten() {
                    // As the quota counts it: the larger of the bytes as published and
                    // JavaScript's form (an envelope's; `1e20` is 21 bytes in it), so that a
                    // part within the budget is within the quota for any subscription.
                    let form = |text: &[u8]| crate::canonical::canonical(text).map_or(0, |c| c.len()).max(text.len());
                    let size = (form(&e.data) + e.changes.as_deref().map_or(0, form)) as u64;
                    if !events.is_empty() && bytes + size > budget {
                        return Ok((events, looked));
                    }
                    bytes += size;
                    events.push(e);
                }
            }
            Ok((events, ahead.len()))
        })
        .await?;
        rest = &rest[looked..];
        let Some(first) = events.first().map(|e| e.accepted_ms) else { continue };
        let refused = match gone {
            Some(e) => Err(e),
            None => {
                let items: Vec<_> = events.into_iter().map(|e| (e, vec![target.clone()])).collect();
                state.ingest.resend(&items).await.map_err(ApiError::from)
            }
        };
        match refused {
            Ok(n) => queued += n,
            // Nothing queued yet: the error is the answer (ask again as it says).
            Err(e) if queued == 0 => return Err(e),
            // Some parts queued: what they were and where to go on, with why it stopped — an
            // error alone left the caller to ask again from the start, and a rewind then sent
            // those parts twice.
            Err(e) => {
                stopped = Some((e, first));
                break;
            }
        }
    }
    let continue_from = match &stopped {
        Some((_, from)) => Some(rfc3339_ms(*from)),
        None => found.continue_from_ms.map(rfc3339_ms),
    };
    // The window's end as this call took it (`now` when not given): to go on from
    // `continue_from` with, not a later `now` that takes in what was delivered meanwhile.
    let mut answer = serde_json::json!({
        "queued": queued, "continue_from": continue_from, "until": rfc3339_ms(until), "history_lag": behind,
    });
    if let Some((e, _)) = stopped {
        answer["stopped"] = e.body();
    }
    Ok((StatusCode::ACCEPTED, Json(answer)))
}
