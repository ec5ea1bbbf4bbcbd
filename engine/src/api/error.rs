//! API errors in the contract's shape: `{"error":{"code","message","field"?}}` with a
//! fitting status, and the JSON body extractor that names the offending field.

use axum::extract::{FromRequest, Request};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use serde::de::DeserializeOwned;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    retry_after: Option<std::time::Duration>,
    /// The ids of a publish's events, for a refusal after which some of its deliveries may be
    /// written: what to send them again under (generated ids included).
    ids: Option<Vec<String>>,
}

impl ApiError {
    /// 400 `VALIDATION_ERROR` naming `field`.
    pub fn validation(field: impl Into<String>, message: impl Into<String>) -> Self {
        let field = field.into();
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "VALIDATION_ERROR",
            message: message.into(),
            field: (!field.is_empty()).then_some(field),
            retry_after: None,
            ids: None,
        }
    }

    /// 429: over a rate; come back after `wait` (sent as `Retry-After`).
    pub fn throttled(wait: std::time::Duration) -> Self {
        ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            code: "RATE_LIMITED",
            message: format!("too many requests; retry after {} s", whole_seconds(wait)),
            field: None,
            retry_after: Some(wait),
            ids: None,
        }
    }

    /// 429: the caller's tenant has `n` requests under way already.
    pub fn tenant_busy(n: usize) -> Self {
        let wait = std::time::Duration::from_secs(1);
        ApiError {
            message: format!("the tenant has {n} requests under way; retry after {} s", whole_seconds(wait)),
            ..ApiError::throttled(wait)
        }
    }

    /// 409 `CONFLICT`: the request cannot be carried out in `field`'s present state.
    pub fn conflict(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            code: "CONFLICT",
            message: message.into(),
            field: Some(field.into()),
            retry_after: None,
            ids: None,
        }
    }

    /// 403 `QUOTA_EXCEEDED`: the tenant has used up `setting`.
    pub fn quota(setting: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "QUOTA_EXCEEDED",
            message: format!("{} (quotas.{setting})", message.into()),
            field: None,
            retry_after: None,
            ids: None,
        }
    }

    /// 408: the request was not answered within `api.request_timeout`.
    pub fn timed_out() -> Self {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            code: "REQUEST_TIMEOUT",
            message: "the request took longer than api.request_timeout; work it began goes on (a publish may still be accepted: send it again with the same event ids)".into(),
            field: None,
            retry_after: None,
            ids: None,
        }
    }

    /// 401: no or a wrong bearer token.
    pub fn unauthorized() -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            code: "UNAUTHORIZED",
            message: "a valid bearer token is required".into(),
            field: None,
            retry_after: None,
            ids: None,
        }
    }

    /// 403: the caller may not do this.
    pub fn forbidden(message: &str) -> Self {
        ApiError {
            status: StatusCode::FORBIDDEN,
            code: "FORBIDDEN",
            message: message.into(),
            field: None,
            retry_after: None,
            ids: None,
        }
    }

    /// 404 for a missing object or route.
    pub fn not_found(what: &str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            code: "NOT_FOUND",
            message: format!("{what} not found"),
            field: None,
            retry_after: None,
            ids: None,
        }
    }

    /// 503: a store could not take or answer the request.
    pub fn unavailable(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "UNAVAILABLE",
            message: message.into(),
            field: None,
            retry_after: None,
            ids: None,
        }
    }
}

impl From<crate::model::Invalid> for ApiError {
    fn from(e: crate::model::Invalid) -> Self {
        ApiError::validation(e.field, e.message)
    }
}

impl From<crate::ingest::Refusal> for ApiError {
    fn from(e: crate::ingest::Refusal) -> Self {
        match e {
            crate::ingest::Refusal::Invalid(i) => i.into(),
            crate::ingest::Refusal::Log(l) => ApiError::of_log(
                l,
                "some of its deliveries may be written: send it again with the same event ids \
                 (receivers drop repeats by webhook-id)",
            ),
            crate::ingest::Refusal::FanOut { .. } => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "QUOTA_EXCEEDED",
                message: e.to_string(),
                field: None,
                retry_after: None,
                ids: None,
            },
            // Its tenant's writes under way fill its share: its own pace, so a 429 as over a rate.
            crate::ingest::Refusal::Busy(crate::ingest::Over::Tenant { .. }) => {
                ApiError { message: e.to_string(), ..ApiError::throttled(std::time::Duration::from_secs(1)) }
            }
            crate::ingest::Refusal::Busy(crate::ingest::Over::All { .. }) => ApiError {
                retry_after: Some(std::time::Duration::from_secs(1)),
                ids: None,
                ..ApiError::unavailable(e.to_string())
            },
            crate::ingest::Refusal::Unreadable { .. } => ApiError {
                retry_after: Some(std::time::Duration::from_secs(5)),
                ..ApiError::unavailable(e.to_string())
            },
            // The single event's; a batch names its place ([`crate::api::events`]).
            crate::ingest::Refusal::IdReused { .. } => ApiError::conflict("id", e.to_string()),
            crate::ingest::Refusal::TooLarge { ref field, .. } => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "PAYLOAD_TOO_LARGE",
                field: Some(field.clone()),
                message: e.to_string(),
                retry_after: None,
                ids: None,
            },
        }
    }
}

impl From<crate::registry::RegistryError> for ApiError {
    fn from(e: crate::registry::RegistryError) -> Self {
        match e {
            crate::registry::RegistryError::Invalid(i) => i.into(),
            crate::registry::RegistryError::Catalog(c) => c.into(),
            crate::registry::RegistryError::Deleted => ApiError::not_found("subscription"),
            e @ crate::registry::RegistryError::Conflict => ApiError::conflict("id", e.to_string()),
            e @ crate::registry::RegistryError::Quota(_) => ApiError::quota("subscriptions_per_tenant", e.to_string()),
        }
    }
}

impl From<crate::event_types::EventTypeError> for ApiError {
    fn from(e: crate::event_types::EventTypeError) -> Self {
        use crate::event_types::EventTypeError;
        match e {
            EventTypeError::Invalid(i) => i.into(),
            EventTypeError::Exists(_) => ApiError {
                status: StatusCode::CONFLICT,
                code: "CONFLICT",
                message: e.to_string(),
                field: Some("name".into()),
                retry_after: None,
                ids: None,
            },
            // A fixed bound, not a setting: the message must not name one to raise.
            EventTypeError::Full => ApiError {
                status: StatusCode::FORBIDDEN,
                code: "QUOTA_EXCEEDED",
                message: format!("{e} (a fixed limit); delete types no longer published"),
                field: Some("name".into()),
                retry_after: None,
                ids: None,
            },
            EventTypeError::Catalog(c) => c.into(),
            EventTypeError::Unchecked(_) => ApiError::unavailable(e.to_string()),
        }
    }
}

impl From<crate::catalog::CatalogError> for ApiError {
    fn from(e: crate::catalog::CatalogError) -> Self {
        static LOGGED: crate::model::AtMostEvery = crate::model::AtMostEvery::new();
        if LOGGED.due(1000) {
            // At a client's request rate otherwise; each refusal is counted by status.
            tracing::error!(error = %e, "catalog write failed (logged once a second at most)");
        }
        use crate::catalog::CatalogError;
        match e {
            // Refused before anything was sent, or a read that could not catch up.
            CatalogError::Log(crate::log::LogError::TooLarge { .. } | crate::log::LogError::UnknownTopic(_))
            | CatalogError::NotSettled { .. } => {
                ApiError::unavailable("the registry could not take the write; nothing changed, retry later")
            }
            // Appended and not seen again in time, or failed where the record may have reached
            // the broker (a delivery report timed out): it was said "nothing changed, retry",
            // and a retry made a second tenant, or a key nobody was shown.
            _ => ApiError::unavailable(
                "the registry could not confirm the write: it may have been made; look (GET) before sending \
                 it again",
            ),
        }
    }
}

impl From<crate::log::LogError> for ApiError {
    fn from(e: crate::log::LogError) -> Self {
        ApiError::of_log(e, "nothing was accepted")
    }
}

impl ApiError {
    /// The log could not take a write; `written` says what became of it (a single record is
    /// all or nothing, a publish's deliveries are not).
    fn of_log(e: crate::log::LogError, written: &str) -> Self {
        static LOGGED: crate::model::AtMostEvery = crate::model::AtMostEvery::new();
        if LOGGED.due(1000) {
            // At a client's request rate otherwise; each refusal is counted by status.
            tracing::error!(error = %e, "log write failed (logged once a second at most)");
        }
        match e {
            // A full disk: appends resume by themselves with space.
            crate::log::LogError::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => ApiError {
                status: StatusCode::INSUFFICIENT_STORAGE,
                code: "STORAGE_FULL",
                message: format!("the log's disk is full; {written}; retry once space is freed"),
                field: None,
                retry_after: None,
                ids: None,
            },
            // The log's topics take smaller records than this event makes (on Kafka, topics
            // made with a smaller `max.message.bytes`): a retry would be refused the same way.
            crate::log::LogError::TooLarge { bytes, max } => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "PAYLOAD_TOO_LARGE",
                message: format!("a record of {bytes} bytes is larger than the log takes ({max}); {written}"),
                field: None,
                retry_after: None,
                ids: None,
            },
            // Worth asking again in a second (`Retry-After`, as a 429 says): a write the log
            // refused once may be taken the next time. (A log broken for good says so at
            // `/healthz`, and is restarted; a catalog write not read back in time gets no wait:
            // it may have landed, and asking again would make a second key or device.)
            _ => ApiError {
                retry_after: Some(std::time::Duration::from_secs(1)),
                ids: None,
                ..ApiError::unavailable(format!("the log could not take the write; {written}; retry later"))
            },
        }
    }
}

/// A wait in whole seconds, rounded up and at least one: a client that waits as long as it is
/// told must find the token there.
fn whole_seconds(wait: std::time::Duration) -> u64 {
    (wait.as_nanos().div_ceil(1_000_000_000) as u64).max(1)
}

impl ApiError {
    /// This refusal of a publish of events with these `ids`, naming them when some of its
    /// deliveries may be written (the log's refusals): the producer sends them again under
    /// these, and receivers drop the repeats — it had no ids to do so with when it gave none.
    pub fn of_publish(refusal: crate::ingest::Refusal, ids: impl FnOnce() -> Vec<String>) -> Self {
        let written = matches!(refusal, crate::ingest::Refusal::Log(_));
        let e = ApiError::from(refusal);
        if written {
            let message = format!("{} — `ids` names them, generated ones too", e.message);
            return ApiError { ids: Some(ids()), message, ..e };
        }
        e
    }
}

impl ApiError {
    /// The error's object as answered (`{"code","message",…}`; the answer's `error`).
    pub fn body(&self) -> serde_json::Value {
        let mut error = serde_json::json!({ "code": self.code, "message": self.message });
        if let Some(field) = &self.field {
            error["field"] = field.as_str().into();
        }
        if let Some(ids) = &self.ids {
            error["ids"] = ids.clone().into();
        }
        if let Some(wait) = self.retry_after.map(whole_seconds) {
            error["retry_after"] = wait.into();
        }
        error
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let error = self.body();
        // In the body (as documented) and the header alike.
        let wait = self.retry_after.map(whole_seconds);
        let mut response = (self.status, Json(serde_json::json!({ "error": error }))).into_response();
        if let Some(wait) = wait {
            response.headers_mut().insert(header::RETRY_AFTER, wait.into());
        }
        response
    }
}

/// A JSON body parsed strictly; errors name the field (`data`, `[2].type`, `retry.policy`).
pub struct JsonBody<T>(pub T);

/// Turns a serde error at `path` into the field it concerns.
pub(super) fn field_of(path: &str, message: &str) -> String {
    // "missing field `type`" and "duplicate field `type`" concern a child of `path` (for an
    // unknown field the path already ends at that field).
    let child = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("missing field") || message.starts_with("duplicate field"));
    let path = if path == "." { "" } else { path };
    match child {
        Some(c) if path.is_empty() => c.to_string(),
        Some(c) => format!("{path}.{c}"),
        None => path.to_string(),
    }
}

/// A JSON body that may be left out: an empty body reads as `T::default()`; one that is
/// given is parsed exactly as [`JsonBody`] parses it.
pub struct OptionalJsonBody<T>(pub T);

/// Whether the credential a request's caller was taken with at its head is taken still, asked
/// once its body is in: a body sent slowly (up to `api.request_timeout`) outlived a revocation
/// of the key it came with, and did what it asked. Set by the authentication middleware for a
/// tenant's key or portal link (the admin token cannot be revoked while Herald runs).
#[derive(Clone)]
pub struct CallerStillValid(pub std::sync::Arc<dyn Fn() -> bool + Send + Sync>);

/// The body of a request that must be JSON if it says what it is, as bytes.
async fn json_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let caller = req.extensions().get::<CallerStillValid>().cloned();
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| ct.split(';').next().unwrap_or("").trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            code: "UNSUPPORTED_MEDIA_TYPE",
            message: "send the body as application/json".into(),
            field: None,
            retry_after: None,
            ids: None,
        });
    }
    let bytes = Bytes::from_request(req, state).await.map_err(|e| ApiError {
        status: e.status(),
        code: if e.status() == StatusCode::PAYLOAD_TOO_LARGE { "PAYLOAD_TOO_LARGE" } else { "BAD_REQUEST" },
        message: e.body_text(),
        field: None,
        retry_after: None,
        ids: None,
    })?;
    if caller.is_some_and(|still| !still.0()) {
        return Err(ApiError::unauthorized());
    }
    Ok(bytes)
}

/// Any JSON, read strictly: an object with a field given twice is refused, naming the field,
/// as a typed body's is (serde's `Value` keeps the last one silently, so a subscription posted
/// with two `url`s took the second).
#[derive(Debug)]
pub struct StrictValue(pub serde_json::Value);

impl<'de> serde::Deserialize<'de> for StrictValue {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(serde_json::Value::Null, Into::into))
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_none<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_some<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(items.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut object = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate field `{key}`")));
            }
            let StrictValue(v) = map.next_value()?;
            object.insert(key, v);
        }
        Ok(object.into())
    }
}

/// Parses `bytes` strictly; an error names the field it concerns.
fn parse_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = inner.to_string();
        let field = field_of(&path, &message);
        // serde's message carries " at line 1 column 7"; keep it, it helps with raw JSON.
        ApiError::validation(field, message)
    })
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = json_bytes(req, state).await?;
        parse_strict(&bytes).map(JsonBody)
    }
}

impl<S: Send + Sync, T: DeserializeOwned + Default> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = json_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(T::default()));
        }
        parse_strict(&bytes).map(OptionalJsonBody)
    }
}

#[cfg(test)]
mod tests {
    use super::{field_of, ApiError, StatusCode};

    /// A catalog write appended but not read back in time may have been made: said so, not
    /// "nothing changed, retry" — a retried tenant creation made a second tenant.
    #[test]
    fn a_write_not_read_back_says_it_may_have_been_made() {
        let within = std::time::Duration::from_secs(15);
        let e = ApiError::from(crate::catalog::CatalogError::NotReadBack { offset: 7, within });
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.message.contains("may have been made"), "{}", e.message);
        let timed_out =
            ApiError::from(crate::catalog::CatalogError::Log(crate::log::LogError::Backend("timed out".into())));
        assert!(timed_out.message.contains("may have been made"), "{}", timed_out.message);
        let refused = ApiError::from(crate::catalog::CatalogError::NotSettled { within });
        assert!(refused.message.contains("nothing changed"), "{}", refused.message);
    }

    /// A write the log refuses is logged once a second at most: a client resending a publish
    /// the log refuses (too large for a Kafka topic's `max.message.bytes`, or at once while the
    /// cluster is away) wrote an error line per request, at its key's request rate.
    #[test]
    fn refused_writes_are_logged_once_a_second_at_most() {
        let seen = crate::telemetry::logged("info", || {
            for _ in 0..1000 {
                let _ = ApiError::from(crate::log::LogError::TooLarge { bytes: 2 << 20, max: 1 << 20 });
                let _ = ApiError::from(crate::catalog::CatalogError::Log(crate::log::LogError::Closed));
            }
        });
        assert!(seen.len() <= 4, "{} lines for 2,000 refusals", seen.len());
    }

    #[test]
    fn names_the_field_a_serde_error_is_about() {
        assert_eq!(field_of(".", "missing field `type` at line 1 column 2"), "type");
        assert_eq!(field_of("[2]", "missing field `type`"), "[2].type");
        assert_eq!(field_of("retry.foo", "unknown field `foo`, expected one of"), "retry.foo");
        assert_eq!(field_of("timeout", "invalid duration"), "timeout");
        assert_eq!(field_of(".", "EOF while parsing"), "");
        assert_eq!(field_of("[0]", "duplicate field `data` at line 1 column 30"), "[0].data");
    }

    /// A client that waits as long as `Retry-After` says is let in: the wait is rounded up
    /// (4.99 s sent as 4 had it refused again for the last 0.99 s).
    #[test]
    fn retry_after_rounds_the_wait_up() {
        let response =
            axum::response::IntoResponse::into_response(ApiError::throttled(std::time::Duration::from_millis(4_010)));
        assert_eq!(response.headers()["retry-after"], "5");
        let response = axum::response::IntoResponse::into_response(ApiError::throttled(
            std::time::Duration::from_micros(1_000_400),
        ));
        assert_eq!(response.headers()["retry-after"], "2", "not 0.4 ms early");
        let err = ApiError::throttled(std::time::Duration::from_millis(10));
        assert!(err.message.contains("after 1 s"), "{}", err.message);
    }

    /// A record the log cannot take will not fit on a retry either: 413, not "retry later".
    #[test]
    fn a_record_too_large_for_the_log_is_413_and_a_broken_log_503() {
        let too_large = ApiError::from(crate::log::LogError::TooLarge { bytes: 2 << 20, max: 1 << 20 });
        assert_eq!((too_large.status, too_large.code), (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"));
        let broken = ApiError::from(crate::log::LogError::Backend("down".into()));
        assert_eq!(broken.status, StatusCode::SERVICE_UNAVAILABLE);
    }
}
