//! OAuth 2 bearer tokens for receivers behind OAuth: fetched from the token endpoint with
//! the password or client-credentials grant, cached until shortly before they expire, and
//! fetched anew when the receiver answers 401. One fetch per key at a time, so a burst of
//! deliveries makes one token request.

use super::http::HttpTransport;
use crate::model::{Auth, TlsOptions};
use crate::payload::Body;
use base64::Engine;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Uri};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a token request may take.
const TOKEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Tokens are dropped this long (at most) before they expire.
const EARLY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    token_url: String,
    client_id: String,
    username: Option<String>,
    grant: String,
}

type Slot = Arc<tokio::sync::Mutex<Option<(HeaderValue, Instant)>>>;

/// The token cache.
#[derive(Clone)]
pub struct Tokens {
    http: HttpTransport,
    slots: Arc<Mutex<HashMap<Key, Slot>>>,
}

#[derive(serde::Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Tokens {
    /// A cache fetching through `http` (so token endpoints pass the network guard too).
    pub fn new(http: HttpTransport) -> Self {
        Tokens { http, slots: Default::default() }
    }

    fn slot(&self, key: Key) -> Slot {
        self.slots.lock().unwrap().entry(key).or_default().clone()
    }

    fn key(auth: &Auth) -> Option<Key> {
        match auth {
            Auth::Oauth2 { grant, token_url, client_id, username, .. } => Some(Key {
                token_url: token_url.clone(),
                client_id: client_id.clone(),
                username: username.clone(),
                grant: grant.clone(),
            }),
            _ => None,
        }
    }

    /// The `Authorization` value for `auth`: cached, or fetched now (over the
    /// subscription's TLS profile, since token endpoints often share the receiver's CA).
    pub async fn bearer(&self, auth: &Auth, tls: Option<&TlsOptions>) -> Result<HeaderValue, String> {
        let key = Self::key(auth).ok_or("not an oauth2 subscription")?;
        let slot = self.slot(key);
        let mut cached = slot.lock().await;
        if let Some((value, until)) = cached.as_ref() {
            if Instant::now() < *until {
                return Ok(value.clone());
            }
        }
        let (value, until) = self.fetch(auth, tls).await?;
        *cached = Some((value.clone(), until));
        Ok(value)
    }

    /// Drops the cached token of `auth` (the receiver refused it).
    pub async fn forget(&self, auth: &Auth) {
        if let Some(key) = Self::key(auth) {
            *self.slot(key).lock().await = None;
        }
    }

    async fn fetch(&self, auth: &Auth, tls: Option<&TlsOptions>) -> Result<(HeaderValue, Instant), String> {
        let Auth::Oauth2 { grant, token_url, client_id, client_secret, username, password, scope } = auth else {
            return Err("not an oauth2 subscription".into());
        };
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
            let mut value = HeaderValue::from_str(&format!("Basic {basic}")).map_err(|e| e.to_string())?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        let uri: Uri = token_url.parse().map_err(|_| "token_url is not a URI".to_string())?;
        let body = Body::new([Bytes::from(form)]);
        let (status, body) = self
            .http
            .exchange(uri, headers, body, TOKEN_TIMEOUT, tls)
            .await
            .map_err(|e| format!("token request failed: {e}"))?;
        if !(200..300).contains(&status) {
            return Err(format!("token endpoint answered {status}"));
        }
        let token: TokenResponse =
            serde_json::from_slice(&body).map_err(|e| format!("token endpoint answered unreadable JSON: {e}"))?;
        let lifetime = Duration::from_secs(token.expires_in.unwrap_or(3600));
        let until = Instant::now() + lifetime.saturating_sub(EARLY.min(lifetime / 10));
        let mut value = HeaderValue::from_str(&format!("Bearer {}", token.access_token))
            .map_err(|_| "the access token is not valid header text".to_string())?;
        value.set_sensitive(true);
        Ok((value, until))
    }
}
