//! `POST /v1/events` and `POST /v1/events/batch`.

use super::auth::Admin;
use super::error::{ApiError, JsonBody};
use super::AppState;
use crate::event_types::CHECKED_IN_PLACE;
use crate::ingest;
use crate::model::EventInput;
use crate::tenants::DEFAULT_TENANT;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

/// Events in one batch at most.
pub const MAX_BATCH: usize = 1000;

/// The request's W3C trace context, if its headers carry a valid one: as the spec says of
/// headers, an invalid one is ignored (the events start no trace), never a reason to refuse
/// them. A context in an event's own fields is checked, and refused naming the field.
fn header_context(headers: &HeaderMap) -> Option<(String, Option<String>)> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (parent, state) = (text("traceparent")?, text("tracestate"));
    match crate::model::TraceContext::parse(&parent, state.as_deref()) {
        Ok(_) => Some((parent, state)),
        Err(_) => match crate::model::TraceContext::parse(&parent, None) {
            Ok(_) => Some((parent, None)), // only the tracestate is bad: drop it
            Err(_) => {
                tracing::debug!("an invalid traceparent header ignored");
                None
            }
        },
    }
}

/// `input` with the request's trace context when it has none of its own.
fn traced(mut input: EventInput, context: &Option<(String, Option<String>)>) -> EventInput {
    if let (None, Some((parent, state))) = (&input.traceparent, context) {
        input.traceparent = Some(parent.clone());
        input.tracestate = input.tracestate.or_else(|| state.clone());
    }
    input
}

/// The spans of accepting `events` (each a child of its producer's span), open while they
/// are published.
fn ingest_spans(events: &[ingest::Event]) -> Vec<tracing::Span> {
    events.iter().map(|e| crate::telemetry::ingest_span(&e.id, &e.event_type, &e.tenant, e.trace.as_ref())).collect()
}

/// Publishes one event.
pub async fn publish(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(input): JsonBody<EventInput>,
) -> Result<impl IntoResponse, ApiError> {
    let event = ingest::validate(traced(input, &header_context(&headers)), "", DEFAULT_TENANT, state.max_event_bytes)?;
    fits_its_type(&state, &event, "", &mut { CHECKED_IN_PLACE }).await?;
    let spans = ingest_spans(std::slice::from_ref(&event));
    let id = event.id.clone();
    let accepted = state.ingest.publish(vec![event]).await.map_err(|e| ApiError::of_publish(e, || vec![id]))?;
    drop(spans);
    Ok((StatusCode::ACCEPTED, Json(&accepted[0]).into_response()))
}

/// A batch's events, read one at a time and refused at the first past [`MAX_BATCH`]: read
/// whole first, a 16 MiB body of small events took some 200 MB before it was refused.
pub struct Batch(Vec<EventInput>);

impl<'de> serde::Deserialize<'de> for Batch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Events;
        impl<'de> serde::de::Visitor<'de> for Events {
            type Value = Vec<EventInput>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                write!(f, "an array of 1 to {MAX_BATCH} events")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut events = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX_BATCH));
                while let Some(event) = seq.next_element()? {
                    if events.len() == MAX_BATCH {
                        return Err(serde::de::Error::custom(format!("a batch holds 1 to {MAX_BATCH} events")));
                    }
                    events.push(event);
                }
                Ok(events)
            }
        }
        d.deserialize_seq(Events).map(Batch)
    }
}

/// Publishes up to [`MAX_BATCH`] events atomically: all are validated before any is appended.
pub async fn publish_batch(
    _: Admin,
    State(state): State<AppState>,
    headers: HeaderMap,
    JsonBody(Batch(inputs)): JsonBody<Batch>,
) -> Result<impl IntoResponse, ApiError> {
    if inputs.is_empty() {
        return Err(ApiError::validation("", format!("a batch holds 1 to {MAX_BATCH} events")));
    }
    let context = header_context(&headers);
    let (mut events, mut in_place) = (Vec::with_capacity(inputs.len()), CHECKED_IN_PLACE);
    for (i, input) in inputs.into_iter().enumerate() {
        let prefix = format!("[{i}]");
        let event = ingest::validate(traced(input, &context), &prefix, DEFAULT_TENANT, state.max_event_bytes)?;
        fits_its_type(&state, &event, &prefix, &mut in_place).await?;
        events.push(event);
    }
    let spans = ingest_spans(&events);
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).collect();
    let accepted = state.ingest.publish(events).await.map_err(|e| match e {
        ingest::Refusal::IdReused { index } => ApiError::conflict(&format!("[{index}].id"), e.to_string()),
        e => ApiError::of_publish(e, || ids),
    })?;
    drop(spans);
    let deliveries: usize = accepted.iter().map(|a| a.deliveries).sum();
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "items": accepted, "deliveries": deliveries }))))
}

/// Refuses an event whose `data` does not fit its type's schema in the catalogue (when
/// validation is on for the type, or for all with `ingest.validate`). Not a repeat of one
/// accepted: a producer's retry after a lost answer (its deliveries already going out) was
/// refused once the admin had tightened the schema since, and a producer taking that `400`
/// for "not accepted" sent the event again under a new id.
async fn fits_its_type(
    state: &AppState,
    event: &ingest::Event,
    prefix: &str,
    in_place: &mut usize,
) -> Result<(), ApiError> {
    let (types, data) = (&state.event_types, event.data.sent.clone());
    match types.check_event(&event.event_type, &event.tenant, data, prefix, state.validate_events, in_place).await {
        Err(_) if state.ingest.repeats(event) => Ok(()),
        checked => Ok(checked?),
    }
}
