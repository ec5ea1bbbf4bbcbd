//! Herald Console: the operator console (`/console`) and the tenant portal (`/portal`), one
//! static page and its script and styles, embedded in the binary (no build step, no CDN).
//! The page talks only to the public `/v1` API and `/metrics` with the token it holds in
//! session storage, so everything it does can be scripted.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

const INDEX: &str = include_str!("../../console/index.html");
const SCRIPT: &str = include_str!("../../console/app.js");
const STYLES: &str = include_str!("../../console/app.css");

/// Scripts, styles and requests only from this origin; no inline script; the page itself
/// decides whether it may be framed.
fn csp(frame_ancestors: &str) -> HeaderValue {
    let policy = format!(
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
    );
    HeaderValue::from_str(&policy).expect("a valid header")
}

fn page(frame_ancestors: &str) -> Response {
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], INDEX).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, csp(frame_ancestors));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The operator console: never framed.
pub async fn console() -> Response {
    page("'none'")
}

/// The tenant portal: platforms embed it in their own pages, so any origin may frame it (the
/// token comes in the link's fragment, which the framing page already holds).
pub async fn portal() -> Response {
    page("*")
}

/// The page's script and styles.
pub async fn asset(super::page::StrictPath(file): super::page::StrictPath<String>) -> Response {
    let (content_type, body) = match file.as_str() {
        "app.js" => ("text/javascript; charset=utf-8", SCRIPT),
        "app.css" => ("text/css; charset=utf-8", STYLES),
        _ => return super::ApiError::not_found("asset").into_response(),
    };
    let mut response = (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
