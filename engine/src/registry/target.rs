//! A subscription compiled for delivery: parsed URI with its `key`, fixed headers, prepared
//! signing keys and the endpoint's load and health state.

use super::validate::{invalid, Invalid};
use crate::config::HealthConfig;
use crate::endpoint::Endpoint;
use crate::model::{Auth, Subscription};
use crate::signing::{Signer, SigningError};
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// A subscription compiled for delivery.
#[derive(Debug)]
pub struct Target {
    /// The stored subscription.
    pub sub: Subscription,
    /// Prepared signing keys.
    pub signer: Signer,
    /// Request URI, `key` query parameter included.
    pub uri: Uri,
    /// Fixed headers: custom ones, user agent, Basic auth.
    pub headers: HeaderMap,
    /// Load on the endpoint in this process.
    pub endpoint: Endpoint,
}

/// Headers Herald sets itself; a subscription cannot override them.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

const USER_AGENT: &str = concat!("Herald/", env!("CARGO_PKG_VERSION"));

impl Target {
    /// Compiles a stored subscription with default endpoint health settings.
    pub fn compile(sub: Subscription) -> Result<Target, Invalid> {
        Self::compile_with(sub, HealthConfig::default())
    }

    /// Compiles a stored subscription; fails only if it could never be delivered.
    pub fn compile_with(sub: Subscription, health: HealthConfig) -> Result<Target, Invalid> {
        let mut signer = Signer::new(&sub.signature, &[&sub.secret]).map_err(|e| match e {
            SigningError::BadHeader(_) => invalid("signature.header", e.to_string()),
            _ => invalid("secret", e.to_string()),
        })?;
        if let (Some(previous), Some(until)) = (&sub.previous_secret, sub.previous_secret_until) {
            signer = signer.with_previous(previous, until).map_err(|e| invalid("secret", e.to_string()))?;
        }
        let mut url = url::Url::parse(&sub.url).map_err(|e| invalid("url", e.to_string()))?;
        if let Some(key) = &sub.key {
            url.query_pairs_mut().append_pair("key", key.expose());
        }
        let uri: Uri = url.as_str().parse().map_err(|_| invalid("url", "not a valid request URI"))?;
        let mut headers = HeaderMap::new();
        headers.insert(http::header::USER_AGENT, HeaderValue::from_static(USER_AGENT));
        for (name, value) in &sub.headers {
            let field = format!("headers.{name}");
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| invalid(&field, "not a valid header name"))?;
            if RESERVED_HEADERS.contains(&name.as_str()) {
                return Err(invalid(&field, "this header is set by Herald and cannot be overridden"));
            }
            let value = HeaderValue::from_str(value).map_err(|_| invalid(&field, "not a valid header value"))?;
            headers.insert(name, value);
        }
        if let Auth::Basic { username, password } = &sub.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{}", password.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {token}"))
                .map_err(|_| invalid("auth.username", "not valid in a header"))?;
            value.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, value);
        }
        let endpoint = Endpoint::new(sub.max_in_flight, sub.rate_limit, health);
        Ok(Target { sub, signer, uri, headers, endpoint })
    }
}
