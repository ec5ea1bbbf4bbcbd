//! Who is calling: the admin token, a tenant's API key, or a tenant's portal link (see
//! `portal`), checked in constant time. A tenant key or portal link sees only its tenant's
//! objects; another tenant's ids answer 404.

use super::error::ApiError;
use super::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;

/// The caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Principal {
    /// Holds the admin token: everything.
    Admin,
    /// Holds a key of this tenant: its own subscriptions and dead letters.
    Tenant(String),
}

impl Principal {
    /// The tenant the caller is limited to (`None` for the admin).
    pub fn tenant(&self) -> Option<&str> {
        match self {
            Principal::Admin => None,
            Principal::Tenant(t) => Some(t),
        }
    }

    /// The tenant a request names (`tenant`, in its query or body) as the caller may: the
    /// admin any (`None`: it named none); a tenant key its own only — naming another is
    /// refused, not answered with its own tenant's objects as if they were the other's.
    pub fn names<'a>(&'a self, given: Option<&'a str>) -> Result<Option<&'a str>, ApiError> {
        match (self.tenant(), given) {
            (None, given) => Ok(given),
            (Some(own), Some(given)) if given != own => {
                Err(ApiError::validation("tenant", "a tenant key reaches objects of its own tenant only"))
            }
            (Some(own), _) => Ok(Some(own)),
        }
    }

    /// The tenant a new object belongs to (or whose objects a request reads, when it must be
    /// one): as [`Principal::names`], the default tenant when none is named.
    pub fn owner(&self, given: Option<String>) -> Result<String, ApiError> {
        Ok(self.names(given.as_deref())?.unwrap_or(crate::tenants::DEFAULT_TENANT).to_string())
    }

    /// Whether the caller may see objects of `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.tenant().is_none_or(|t| t == tenant)
    }
}

/// The bearer token of a request, if it has one. The scheme is read in any case (RFC 9110
/// §11.1): `BEARER <token>`, as some clients and gateways write it, was refused.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// A caller holding the admin token (tenant keys get 403).
pub struct Admin;

/// Who a request's caller is, as [`hold_a_tenant_s_share`] found it: the handlers' extractors
/// read it rather than check the token again.
#[derive(Clone)]
struct Authenticated(Principal);

/// A portal link's tenant and when it was minted, if `token` is one whose signature and
/// lifetime hold (no catalog needed: its revocation is [`tenant_taking`]'s to judge).
fn portal_link(state: &AppState, token: &str) -> Option<(String, i64)> {
    token.starts_with("hp.").then(|| state.portal.key.verify(token, crate::model::now_ms())).flatten()
}

/// The tenant whose key `token` is, or whose portal link `portal` is (from [`portal_link`]),
/// if the catalog as this process knows it takes it: the one place that decides, at a
/// request's head and again once its body is in.
fn tenant_taking(state: &AppState, token: &str, portal: Option<(String, i64)>) -> Option<String> {
    match portal {
        // Unless the tenant's links minted then were revoked since.
        Some((tenant, issued_ms)) => {
            state.tenants.get(&tenant).is_some_and(|t| t.takes_portal_link(issued_ms)).then_some(tenant)
        }
        None => state.tenants.authenticate(token),
    }
}

/// Whether a tenant's key or portal link, taken at the request's head, is taken still: the
/// body extractors ask once the body is in (see [`super::error::CallerStillValid`]).
fn still_valid(state: &AppState, token: &str, tenant: &str) -> bool {
    let portal = match portal_link(state, token) {
        None if token.starts_with("hp.") => return false, // expired meanwhile
        portal => portal,
    };
    tenant_taking(state, token, portal).is_some_and(|t| t == tenant)
}

/// Holds a tenant's place for the whole of each of its requests, body included: a tenant key
/// is limited by its request rate, but nothing bounded how many of its requests were under way
/// — bodies sent slowly are each held whole until in (up to 4 MiB, for up to
/// `api.request_timeout`), and one key's hundreds of them took gigabytes and every connection.
/// Past `api.tenant_requests` its next is answered `429` at once. Who the caller is is
/// decided here for the handlers: a tenant key's or portal link's refusal on the API's routes
/// is the answer; any other request that fails to authenticate goes on, for its handler to
/// judge (an edge device's token; the OpenAPI document, public to a caller with a bad token).
pub async fn hold_a_tenant_s_share(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if bearer(req.headers()).is_none() {
        return next.run(req).await;
    }
    let (mut parts, body) = req.into_parts();
    let mut held = None;
    match Principal::from_request_parts(&mut parts, &state).await {
        Ok(who) => {
            if let Principal::Tenant(tenant) = &who {
                match state.underway.try_turn(tenant) {
                    Some(place) => held = Some(place),
                    None => return ApiError::tenant_busy(state.underway.per_tenant()).into_response(),
                }
                // A body may take up to the request timeout to arrive: a key revoked meanwhile
                // made an edge device or a subscription all the same.
                let (state, token, tenant) =
                    (state.clone(), bearer(&parts.headers).unwrap_or("").to_string(), tenant.clone());
                parts.extensions.insert(super::error::CallerStillValid(std::sync::Arc::new(move || {
                    still_valid(&state, &token, &tenant)
                })));
            }
            parts.extensions.insert(Authenticated(who));
        }
        // A tenant key's or portal link's refusal (unknown, over its rate) is the answer:
        // checked again by the handler, a refused request counted twice against its rate, and
        // one the bucket had refilled for meanwhile was served without a place.
        Err(refused)
            if parts.uri.path().starts_with("/v1/")
                && parts.uri.path() != "/v1/openapi.json"
                && bearer(&parts.headers).is_some_and(|t| t.starts_with("hp.") || t.starts_with("hk.")) =>
        {
            return refused.into_response();
        }
        // Other tokens (an edge device's) are their handlers' to judge.
        Err(_) => {}
    }
    let response = next.run(axum::extract::Request::from_parts(parts, body)).await;
    drop(held);
    response
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(Authenticated(who)) = parts.extensions.get::<Authenticated>() {
            return Ok(who.clone());
        }
        let token = bearer(&parts.headers).ok_or_else(ApiError::unauthorized)?;
        let admin = crate::tenants::same_secret(token, &state.admin_token);
        if !admin && !token.starts_with("hp.") && crate::tenants::parse_token(token, "hk").is_none() {
            return Err(ApiError::unauthorized()); // no token of any kind: nothing to wait for
        }
        // A portal link's signature and lifetime need no catalog: one that fails them is
        // refused before the wait below, as a token of no kind is (anyone could hold a request
        // on a slow broker's catalog with `hp.` and anything after it).
        let portal = if !admin && token.starts_with("hp.") {
            Some(portal_link(state, token).ok_or_else(ApiError::unauthorized)?)
        } else {
            None
        };
        // The one place a request waits to see every catalog change made before it, through
        // any process: the key it presents, the subscriptions an event goes to, the types
        // it is checked against, the objects it reads.
        state.catalog.settle().await;
        if admin {
            return Ok(Principal::Admin);
        }
        let is_portal = portal.is_some();
        let tenant = tenant_taking(state, token, portal).ok_or_else(ApiError::unauthorized)?;
        // Taken first, so nobody can spend another key's rate. A portal link is limited like
        // its tenant's keys, all its tenant's links as one.
        if is_portal {
            state.key_rate.admit(&format!("portal:{tenant}"))?;
        } else {
            let (key_id, _) = crate::tenants::parse_token(token, "hk").ok_or_else(ApiError::unauthorized)?;
            state.key_rate.admit(key_id)?;
        }
        Ok(Principal::Tenant(tenant))
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match Principal::from_request_parts(parts, state).await? {
            Principal::Admin => Ok(Admin),
            Principal::Tenant(_) => Err(ApiError::forbidden("this needs the admin token")),
        }
    }
}
