//! Paging and query strings shared by every list endpoint: `?limit=&cursor=`, the page
//! bounds, and query errors in the contract's shape.

use super::error::ApiError;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

/// Page size when none is asked for.
pub const DEFAULT_LIMIT: usize = 50;

/// Largest page.
pub const MAX_LIMIT: usize = 500;

/// Bytes of a page's items after which it ends (with a cursor), whatever its `limit`: items
/// a tenant makes large (subscriptions) would otherwise make answers of hundreds of MB.
pub const MAX_BYTES: usize = 4 << 20;

/// Most entries a filtered in-memory list looks at for one page: enough that a page is
/// rarely cut short, few enough that no request holds a lock for long (about a millisecond).
pub const MAX_SCAN: usize = 10_000;

/// A page's `next` marked with the listing it was made for — the list and its filters, `~`
/// and a digest of them — so that passed back with other filters, or to another list, it is
/// refused rather than taken for a place in a different listing (skipping or repeating items).
pub fn mark(next: Option<String>, listing: &[&str]) -> Option<String> {
    next.map(|place| format!("{place}~{}", digest(listing)))
}

/// The place a `cursor` given back names, if it was made for this `listing` (see [`mark`]).
/// One with no mark at all, as versions before marks gave, is taken as it was then (each
/// list checks its form), so paging goes on across a rolling upgrade.
pub fn place(cursor: Option<String>, listing: &[&str]) -> Result<Option<String>, ApiError> {
    let Some(cursor) = cursor else { return Ok(None) };
    match cursor.rsplit_once('~') {
        None => Ok(Some(cursor)),
        Some((place, mark)) if mark == digest(listing) => Ok(Some(place.to_string())),
        _ => Err(ApiError::validation(
            "cursor",
            "not a cursor this list gave with these filters: pass `next` back with the same path and filters",
        )),
    }
}

fn digest(listing: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in listing {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    hash.finalize()[..6].iter().map(|b| format!("{b:02x}")).collect()
}

/// The page size asked for, checked.
pub fn limit(requested: Option<usize>) -> Result<usize, ApiError> {
    let limit = requested.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::validation("limit", format!("must be between 1 and {MAX_LIMIT}")));
    }
    Ok(limit)
}

/// Path parameters; a bad one (not UTF-8, say) is a `VALIDATION_ERROR` naming `path`, in
/// the contract's shape rather than the router's plain text.
pub struct StrictPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for StrictPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(p) = axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::validation("path", e.body_text()))?;
        Ok(StrictPath(p))
    }
}

/// A query string parsed strictly; a bad one is a `VALIDATION_ERROR` naming its parameter.
pub struct StrictQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for StrictQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(StrictQuery).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            let field = super::error::field_of(&path, &message);
            ApiError::validation(if field.is_empty() { "query".into() } else { field }, message)
        })
    }
}
