//! OAuth 2 bearer tokens for receivers behind OAuth: fetched from the token endpoint with the
//! password or client-credentials grant, cached until shortly before they expire, and fetched
//! anew when the receiver answers 401.
//!
//! The cache is keyed by the tenant and a digest of every credential (client secret and
//! password included), so a token is only ever reused for the same tenant presenting the same
//! credentials. One fetch per key at a time, shared by every delivery waiting for it, and no
//! lock is held while it runs: a blackholed token endpoint costs each delivery its own
//! timeout, not a queue of them. The fetch runs in a task of its own (within
//! [`TOKEN_TIMEOUT`]) and settles its slot itself, whoever still waits: a token endpoint slower
//! than the subscription's timeout still yields a token for the attempts after, instead of
//! each attempt dropping the fetch at its timeout and the next one starting another.

use super::http::HttpTransport;
use crate::model::{Auth, Credentials, Failure, Subscription, Tls};
use crate::payload::Body;
use base64::Engine;
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use http::{header, HeaderMap, HeaderValue, Uri};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a token request may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Tokens are dropped this long (at most) before they expire.
const EARLY: Duration = Duration::from_secs(30);

/// The longest a token is cached, whatever `expires_in` says.
const LONGEST: Duration = Duration::from_secs(24 * 3600);

/// Tokens cached at most: past it, expired ones are swept out and then those soonest to
/// expire, down to half (so a sweep comes once per that many fetches). With
/// [`LONGEST_TOKEN`] it bounds the cache (to 64 MiB) whatever tenants' token endpoints
/// answer and however many subscriptions (or changes of `scope`) they make.
const CACHED_AT_MOST: usize = if cfg!(test) { 64 } else { 4096 };

/// The longest access token taken. Real ones, JWTs included, are a few KiB, and receivers'
/// servers refuse request headers much longer; a token endpoint answering a megabyte would
/// otherwise be held in memory for a day per subscription.
const LONGEST_TOKEN: usize = 16 * 1024;

type Fetched = Result<(HeaderValue, Instant), Failure>;

enum Slot {
    /// A token, until when, and whose (its tenant's).
    Ready(HeaderValue, Instant, Arc<str>),
    /// A fetch under way (which one: the task settles only its own slot).
    Fetching(u64, Shared<BoxFuture<'static, Fetched>>),
}

/// Bearer tokens by tenant and credentials, shared by every delivery that needs one.
#[derive(Clone)]
pub struct Tokens {
    http: HttpTransport,
    slots: Arc<Mutex<HashMap<[u8; 32], Slot>>>,
    fetches: Arc<AtomicU64>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    /// Seconds; some providers (Azure AD's v1 endpoint among them) send it as a string, and
    /// one that cannot be read is taken as absent — it only tunes the cache.
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl TokenResponse {
    fn expires_in(&self) -> Option<u64> {
        match self.expires_in.as_ref()? {
            serde_json::Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        }
    }
}

/// Drops expired tokens and then, if that is not enough, down to half of [`CACHED_AT_MOST`]:
/// those of the tenants holding the most first, each tenant's soonest to expire first
/// (fetches under way stay: their tasks settle them). By expiry alone, a tenant churning its
/// `scope` with tokens of a day pushed every other tenant's hour-long ones out, each sweep,
/// and their next deliveries waited for a token again.
fn make_room(slots: &mut HashMap<[u8; 32], Slot>) {
    let now = Instant::now();
    slots.retain(|_, s| !matches!(s, Slot::Ready(_, until, _) if *until <= now));
    let excess = slots.len().saturating_sub(CACHED_AT_MOST / 2);
    if excess == 0 {
        return;
    }
    let mut held: HashMap<Arc<str>, usize> = HashMap::new();
    for s in slots.values() {
        if let Slot::Ready(_, _, tenant) = s {
            *held.entry(tenant.clone()).or_default() += 1;
        }
    }
    let mut ready: Vec<(usize, Instant, [u8; 32])> = (slots.iter())
        .filter_map(|(k, s)| match s {
            Slot::Ready(_, until, tenant) => Some((held[tenant], *until, *k)),
            Slot::Fetching(..) => None,
        })
        .collect();
    ready.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for (.., key) in ready.into_iter().take(excess) {
        slots.remove(&key);
    }
}

impl Tokens {
    /// A cache fetching through `http` (so token endpoints pass the network guard too).
    pub fn new(http: HttpTransport) -> Self {
        Tokens { http, slots: Default::default(), fetches: Default::default() }
    }

    /// The `Authorization` value for `sub`'s OAuth credentials: cached, or fetched now (over
    /// the subscription's TLS profile, since token endpoints often share the receiver's CA),
    /// waiting at most `timeout`.
    pub async fn bearer(
        &self,
        sub: &Subscription,
        credentials: Credentials,
        tls: Option<&Tls>,
        timeout: Duration,
    ) -> Result<HeaderValue, Failure> {
        let key = credentials.bytes();
        let fetch = {
            let mut slots = self.slots.lock().unwrap();
            match slots.get(&key) {
                Some(Slot::Ready(value, until, _)) if Instant::now() < *until => return Ok(value.clone()),
                Some(Slot::Fetching(_, f)) => f.clone(),
                _ => {
                    let generation = self.fetches.fetch_add(1, Ordering::Relaxed);
                    let (this, auth, tls) = (self.clone(), sub.spec.auth.clone(), tls.cloned());
                    let (proxy, tenant) = (sub.spec.proxy.clone(), sub.tenant.clone());
                    let task = tokio::spawn(async move {
                        let fetched = this.fetch(&auth, tls.as_ref(), proxy.as_deref(), &tenant).await;
                        let mut slots = this.slots.lock().unwrap();
                        match &fetched {
                            Ok((value, until)) => {
                                slots.insert(key, Slot::Ready(value.clone(), *until, tenant.as_str().into()));
                            }
                            Err(_) if matches!(slots.get(&key), Some(Slot::Fetching(g, _)) if *g == generation) => {
                                slots.remove(&key);
                            }
                            Err(_) => {}
                        }
                        fetched
                    });
                    let all = self.slots.clone();
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            // The fetch died before settling its slot: free it for the next.
                            let mut all = all.lock().unwrap();
                            if matches!(all.get(&key), Some(Slot::Fetching(g, _)) if *g == generation) {
                                all.remove(&key);
                            }
                            Err(Failure::Auth { detail: format!("fetching a token: {e}") })
                        })
                    }
                    .boxed()
                    .shared();
                    if slots.len() >= CACHED_AT_MOST {
                        make_room(&mut slots);
                    }
                    slots.insert(key, Slot::Fetching(generation, f.clone()));
                    f
                }
            }
        };
        tokio::time::timeout(timeout, fetch)
            .await
            .unwrap_or_else(|_| Err(Failure::Auth { detail: "the token endpoint did not answer in time".into() }))
            .map(|(value, _)| value)
    }

    /// Drops the cached token of `sub` if it is still `refused` (the receiver refused it).
    /// A refusal of an older one leaves the newer alone: requests sent with a token the
    /// receiver revoked are refused one after another, and each that came after the new token
    /// was cached threw it away — a fetch for every one of them, each revoking the one before
    /// at a provider that keeps one token of a client valid.
    pub fn forget(&self, credentials: Credentials, refused: &HeaderValue) {
        let key = credentials.bytes();
        let mut slots = self.slots.lock().unwrap();
        if matches!(slots.get(&key), Some(Slot::Ready(value, ..)) if value == refused) {
            slots.remove(&key);
        }
    }

    /// Fetches a token, through the subscription's egress (`proxy`) like its webhooks.
    async fn fetch(&self, auth: &Auth, tls: Option<&Tls>, proxy: Option<&str>, tenant: &str) -> Fetched {
        let Auth::Oauth2 { grant, token_url, client_id, client_secret, username, password, scope } = auth else {
            return Err(Failure::Unusable { detail: "not an oauth2 subscription".into() });
        };
        let failed = |detail: String| Failure::Auth { detail };
        // Built in a block: the serializer is not `Send` and must not live across an await.
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", grant);
            form.append_pair("client_id", client_id);
            if grant == "password" {
                form.append_pair("username", username.as_deref().unwrap_or(""));
                form.append_pair("password", password.as_ref().map_or("", |p| p.expose()));
            }
            if let Some(scope) = scope {
                form.append_pair("scope", scope);
            }
            form.finish()
        };
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/x-www-form-urlencoded"));
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(secret) = client_secret {
            // RFC 6749 §2.3.1: client credentials in HTTP Basic.
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{client_id}:{}", secret.expose()));
            let mut value = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|e| failed(e.to_string()))?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let uri: Uri = token_url.parse().map_err(|_| failed("token_url is not a URI".into()))?;
        let mut request = http::Request::post(uri).body(Body::new([Bytes::from(form)])).expect("a POST of a URI");
        *request.headers_mut() = headers;
        let (status, body) =
            self.http.exchange(request, TOKEN_TIMEOUT, tls, super::http::Egress::of(proxy), tenant).await.map_err(
                |e| match e {
                    // The network guard's refusal is told as such, not as credentials refused.
                    Failure::Refused { .. } => e,
                    e => failed(format!("token request failed: {e}")),
                },
            )?;
        if !(200..300).contains(&status) {
            return Err(failed(format!("token endpoint answered {status}")));
        }
        let token: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| failed(format!("token endpoint answered unreadable JSON: {e}")))?;
        // Saturating: a huge `expires_in` caches for a day, never overflows the clock.
        let lifetime = Duration::from_secs(token.expires_in().unwrap_or(3600)).min(LONGEST);
        let until = Instant::now() + lifetime.saturating_sub(EARLY.min(lifetime / 10));
        if token.access_token.len() > LONGEST_TOKEN {
            return Err(failed(format!("the access token is longer than {} KiB", LONGEST_TOKEN / 1024)));
        }
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| failed("the access token is not valid header text".into()))?;
        value.set_sensitive(true);
        Ok((value, until))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A token whose `expires_in` came as a string (Azure AD v1) was refused as unreadable
    /// JSON: every attempt of the subscription failed, for good.
    #[test]
    fn expires_in_is_read_as_a_number_or_a_numeric_string() {
        let read = |json: &str| serde_json::from_str::<TokenResponse>(json).map(|t| t.expires_in());
        assert_eq!(read(r#"{"access_token":"t","expires_in":3599}"#).unwrap(), Some(3599));
        assert_eq!(read(r#"{"access_token":"t","expires_in":"3599"}"#).unwrap(), Some(3599));
        assert_eq!(read(r#"{"access_token":"t","expires_in":3599.5}"#).unwrap(), Some(3599));
        assert_eq!(read(r#"{"access_token":"t","expires_in":"soon"}"#).unwrap(), None);
        assert_eq!(read(r#"{"access_token":"t","expires_in":null}"#).unwrap(), None);
        assert_eq!(read(r#"{"access_token":"t"}"#).unwrap(), None);
    }
    use crate::model::{Secret, SubscriptionSpec};
    use crate::transport::guard::NetworkGuard;
    use crate::transport::http::HttpSettings;
    use http_body_util::Full;

    /// A token endpoint on loopback answering `token` to every request; its URL.
    async fn token_endpoint(token: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/token", listener.local_addr().unwrap());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let token = token.clone();
                let svc = hyper::service::service_fn(move |_req| {
                    let body = serde_json::json!({ "access_token": token, "expires_in": 3600 }).to_string();
                    async move { Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc),
                );
            }
        });
        url
    }

    fn subscription(token_url: &str, scope: String) -> Subscription {
        let auth = Auth::Oauth2 {
            grant: "client_credentials".into(),
            token_url: token_url.into(),
            client_id: "c".into(),
            client_secret: Some(Secret("s".into())),
            username: None,
            password: None,
            scope: Some(scope),
        };
        Subscription::unchecked(
            "sub".into(),
            "t".into(),
            SubscriptionSpec { auth, ..SubscriptionSpec::default() },
            crate::signing::generate_secret(),
        )
    }

    /// `sub`'s token, as an attempt asks for it.
    async fn bearer(tokens: &Tokens, sub: &Subscription) -> Result<HeaderValue, Failure> {
        tokens.bearer(sub, Credentials::of(sub), None, Duration::from_secs(5)).await
    }

    fn tokens() -> Tokens {
        let guard = NetworkGuard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        Tokens::new(HttpTransport::new(guard, &HttpSettings::default()))
    }

    #[tokio::test]
    async fn the_cache_holds_a_bounded_number_of_tokens_however_many_credentials_there_are() {
        let url = token_endpoint("t".repeat(1000)).await;
        let tokens = tokens();
        for i in 0..4 * CACHED_AT_MOST {
            bearer(&tokens, &subscription(&url, format!("scope-{i}"))).await.unwrap();
        }
        let cached = tokens.slots.lock().unwrap().len();
        assert!(cached <= CACHED_AT_MOST, "{cached} tokens cached");
        // The latest are kept: fetched again, it comes from the cache.
        let fetches = tokens.fetches.load(Ordering::Relaxed);
        bearer(&tokens, &subscription(&url, format!("scope-{}", 4 * CACHED_AT_MOST - 1))).await.unwrap();
        assert_eq!(tokens.fetches.load(Ordering::Relaxed), fetches);
    }

    /// One tenant making token after token (its `scope` changed each time) does not push
    /// another tenant's token out of the cache: room is made from the tenants holding most.
    #[tokio::test]
    async fn one_tenant_s_many_tokens_do_not_push_another_s_out() {
        let url = token_endpoint("t".repeat(100)).await;
        let tokens = tokens();
        let other = Subscription { tenant: "other".into(), ..subscription(&url, "mine".into()) };
        bearer(&tokens, &other).await.unwrap();
        for i in 0..4 * CACHED_AT_MOST {
            bearer(&tokens, &subscription(&url, format!("scope-{i}"))).await.unwrap();
        }
        let fetches = tokens.fetches.load(Ordering::Relaxed);
        bearer(&tokens, &other).await.unwrap();
        assert_eq!(tokens.fetches.load(Ordering::Relaxed), fetches, "the other tenant's token still cached");
    }

    #[tokio::test]
    async fn an_access_token_too_long_for_a_header_is_refused() {
        let url = token_endpoint("t".repeat(LONGEST_TOKEN + 1)).await;
        let tokens = tokens();
        match bearer(&tokens, &subscription(&url, "s".into())).await {
            Err(Failure::Auth { detail }) => assert!(detail.contains("longer than 16 KiB"), "{detail}"),
            other => panic!("{other:?}"),
        }
        assert!(tokens.slots.lock().unwrap().is_empty(), "nothing cached");
    }
}
