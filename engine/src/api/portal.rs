//! Tenant portal links: `POST /v1/tenants/{id}/portal` mints a short-lived, signed token for
//! one tenant and a console URL that carries it in its fragment (never sent to a server, so it
//! stays out of access logs and `Referer`). The token acts as that tenant's key and nothing
//! more: admin endpoints answer 403 to it.
//!
//! Tokens are `hp.<tenant>.<expires ms>.<issued ms>.<HMAC-SHA256>`, keyed by a key derived
//! from the admin token and the secret key ([`PortalKey::derive`]), so every process of a
//! deployment checks them without shared state, and rotating either revokes every link at
//! once. Nothing is stored per link; a tenant's links are revoked together by the time they
//! are taken from (`DELETE /v1/tenants/{id}/portal`, on the tenant's record).

use super::auth::Admin;
use super::error::{ApiError, OptionalJsonBody};
use super::page::StrictPath;
use super::AppState;
use crate::config::HumanDuration;
use crate::model::{now_ms, rfc3339_ms};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::time::Duration;

type HmacSha256 = Hmac<Sha256>;

/// The key portal tokens are signed with, derived from the admin token (and the secret key),
/// and the key of links minted before a secret key was used for them, still taken.
#[derive(Clone)]
pub struct PortalKey(HmacSha256, Option<HmacSha256>);

impl std::fmt::Debug for PortalKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortalKey(********)")
    }
}

impl PortalKey {
    /// The key of a deployment whose admin token is `admin_token` and whose secret key (the
    /// one secrets are sealed with, as configured) is `secret_key`. A link goes to a tenant:
    /// keyed by the admin token alone, its holder could test guesses at the token offline, two
    /// HMACs a guess; with the secret key (32 random bytes) in the key too, it cannot. Without
    /// one (Herald warns at start), the admin token alone.
    ///
    /// Links minted by the admin token alone (before a secret key was set, or by a version
    /// before this one) are still taken until they expire — a week at most — so an upgrade or
    /// a rolling restart does not sign tenants out; only new links carry the secret key.
    pub fn derive(admin_token: &str, secret_key: Option<&str>) -> PortalKey {
        let keyed =
            |mac: HmacSha256| HmacSha256::new_from_slice(&mac.finalize().into_bytes()).expect("HMAC takes any key");
        let mut v1 = HmacSha256::new_from_slice(admin_token.as_bytes()).expect("HMAC takes any key");
        v1.update(b"herald portal links v1");
        match secret_key {
            Some(k) => {
                let mut v2 = HmacSha256::new_from_slice(k.as_bytes()).expect("HMAC takes any key");
                v2.update(b"herald portal links v2\0");
                v2.update(admin_token.as_bytes());
                PortalKey(keyed(v2), Some(keyed(v1)))
            }
            None => PortalKey(keyed(v1), None),
        }
    }

    /// What a token's tag signs: its tenant, expiry and (but in links minted before links
    /// said it) when it was minted.
    fn mac(key: &HmacSha256, tenant: &str, expires_ms: i64, issued_ms: Option<i64>) -> HmacSha256 {
        let mut mac = key.clone();
        match issued_ms {
            Some(issued) => mac.update(format!("hp.{tenant}.{expires_ms}.{issued}").as_bytes()),
            None => mac.update(format!("hp.{tenant}.{expires_ms}").as_bytes()),
        }
        mac
    }

    /// A token for `tenant` minted at `issued_ms`, valid until `expires_ms`.
    pub fn mint(&self, tenant: &str, issued_ms: i64, expires_ms: i64) -> String {
        let tag = hex::encode(Self::mac(&self.0, tenant, expires_ms, Some(issued_ms)).finalize().into_bytes());
        format!("hp.{tenant}.{expires_ms}.{issued_ms}.{tag}")
    }

    /// The tenant a presented token was minted for and when, if it is one of ours and still
    /// valid at `now_ms` (the tag is compared in constant time). A link minted before links
    /// said when is taken as minted as early as it can have been (its expiry less the longest
    /// lifetime), so a revocation refuses it too.
    pub fn verify(&self, presented: &str, now_ms: i64) -> Option<(String, i64)> {
        let rest = presented.strip_prefix("hp.")?;
        let (tenant, rest) = rest.split_once('.')?;
        let (expires, rest) = rest.split_once('.')?;
        let expires_ms: i64 = expires.parse().ok()?;
        let (issued_ms, tag) = match rest.split_once('.') {
            Some((issued, tag)) => (Some(issued.parse::<i64>().ok()?), tag),
            None => (None, rest),
        };
        let tag = hex::decode(tag).ok()?;
        let ours = |key: &HmacSha256| Self::mac(key, tenant, expires_ms, issued_ms).verify_slice(&tag).is_ok();
        if !ours(&self.0) && !self.1.as_ref().is_some_and(ours) {
            return None;
        }
        let longest = crate::config::ApiConfig::PORTAL_TTL.1.as_millis() as i64;
        let issued_ms = issued_ms.unwrap_or(expires_ms.saturating_sub(longest));
        (now_ms < expires_ms).then(|| (tenant.to_string(), issued_ms))
    }
}

/// `POST /v1/tenants/{id}/portal` body (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewPortal {
    /// How long the link works; default `api.portal_ttl`.
    ttl: Option<HumanDuration>,
}

/// Mints a portal link: `{"url","token","expires_at"}`.
pub async fn mint(
    _: Admin,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
    headers: HeaderMap,
    OptionalJsonBody(req): OptionalJsonBody<NewPortal>,
) -> Result<impl IntoResponse, ApiError> {
    let Some(tenant) = state.tenants.get(&id) else {
        return Err(ApiError::not_found("tenant"));
    };
    let ttl = req.ttl.map_or(state.portal.ttl, |t| t.0);
    let (min, max) = crate::config::ApiConfig::PORTAL_TTL;
    if !(min..=max).contains(&ttl) {
        return Err(ApiError::validation("ttl", "must be from 1 minute to 7 days"));
    }
    // Never before the tenant's links were last revoked, as this process has read it: a link
    // minted after a revocation (here, or on a process whose clock is behind the one that
    // revoked) works.
    let now = now_ms();
    let issued_ms = now.max(tenant.portal_links_from_ms().unwrap_or(i64::MIN));
    // Its lifetime from now, whatever it is dated: a revoking clock far ahead would lengthen it.
    let expires_ms = now + ttl.as_millis() as i64;
    let token = state.portal.key.mint(&id, issued_ms, expires_ms);
    let base = match &state.portal.public_url {
        Some(url) => url.trim_end_matches('/').to_string(),
        None => {
            // Where the admin reached us: the link works for the same audience. Through a proxy
            // that ends TLS, https: a plain-HTTP link sent the token to whoever answers plain
            // HTTP on the tenant's network.
            let host = headers.get(header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("localhost");
            let scheme = if proxied_over_tls(&headers) { "https" } else { "http" };
            format!("{scheme}://{host}")
        }
    };
    let body = serde_json::json!({
        "url": format!("{base}/portal#token={token}"),
        "token": token,
        "expires_at": rfc3339_ms(expires_ms),
    });
    Ok((StatusCode::CREATED, Json(body)))
}

/// Revokes every portal link of a tenant minted until now (`DELETE /v1/tenants/{id}/portal`):
/// a link pasted where it should not be otherwise works for its whole lifetime, and rotating
/// the admin token or the secret key ends every tenant's links. Links minted after work.
pub async fn revoke(
    _: Admin,
    State(state): State<AppState>,
    StrictPath(id): StrictPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    match state.tenants.revoke_portal_links(&id).await? {
        true => Ok(StatusCode::NO_CONTENT),
        false => Err(ApiError::not_found("tenant")),
    }
}

/// Whether the request came through a proxy that took it over TLS: `X-Forwarded-Proto: https`
/// or `Forwarded: …;proto=https` (RFC 7239), as the proxy nearest the client said it.
fn proxied_over_tls(headers: &HeaderMap) -> bool {
    let said = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let forwarded_proto = said("x-forwarded-proto").and_then(|v| v.split(',').next()).map(str::trim);
    let rfc7239 = said("forwarded").and_then(|v| {
        v.split(',').next()?.split(';').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            k.trim().eq_ignore_ascii_case("proto").then(|| v.trim().trim_matches('"'))
        })
    });
    forwarded_proto.or(rfc7239).is_some_and(|p| p.eq_ignore_ascii_case("https"))
}

/// What the API needs to mint and check portal links.
#[derive(Debug, Clone)]
pub struct Portal {
    /// Signs and checks tokens.
    pub key: PortalKey,
    /// Default lifetime of a link.
    pub ttl: Duration,
    /// The base URL links start with (`api.public_url`); else the request's `Host`.
    pub public_url: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_verify_only_unaltered_unexpired_and_under_the_same_admin_token() {
        let key = PortalKey::derive("admin-token", None);
        let token = key.mint("ten_a", 500, 2_000);
        let a = Some(("ten_a".to_string(), 500));
        assert_eq!(key.verify(&token, 1_999), a);
        assert_eq!(key.verify(&token, 2_000), None, "expired");
        assert_eq!(key.verify(&token.replace("ten_a", "ten_b"), 1_000), None, "another tenant");
        assert_eq!(key.verify(&token.replace(".2000.", ".9000."), 1_000), None, "extended");
        assert_eq!(key.verify(&token.replace(".500.", ".900."), 1_000), None, "minted later, said");
        assert_eq!(PortalKey::derive("rotated", None).verify(&token, 1_000), None, "admin token rotated");
        let sealed = PortalKey::derive("admin-token", Some("secret"));
        assert_eq!(sealed.verify(&token, 1_000), a, "a link minted before still works");
        let token = sealed.mint("ten_a", 500, 2_000);
        assert_eq!(sealed.verify(&token, 1_000), a);
        assert_eq!(key.verify(&token, 1_000), None, "the admin token alone does not check it");
        assert_eq!(PortalKey::derive("rotated", Some("secret")).verify(&token, 1_000), None, "admin token rotated");
        assert_eq!(key.verify("hk.key_x.secret", 1_000), None);
        assert_eq!(key.verify("hp.x", 1_000), None);
        // A link minted before links said when: taken as minted a week before it expires.
        let week = 7 * 86_400_000;
        let old_tag = hex::encode(PortalKey::mac(&key.0, "ten_a", week + 2_000, None).finalize().into_bytes());
        let old = format!("hp.ten_a.{}.{old_tag}", week + 2_000);
        assert_eq!(key.verify(&old, 1_000), Some(("ten_a".to_string(), 2_000)));
        assert_eq!(key.verify(&old.replace(&format!(".{old_tag}"), &format!(".1.{old_tag}")), 1_000), None);
    }
}
