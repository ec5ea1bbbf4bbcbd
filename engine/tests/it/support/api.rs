//! A small JSON client for Herald's API.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::net::SocketAddr;

/// A small JSON client for the API.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub token: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(addr: SocketAddr, token: &str) -> Api {
        Api {
            base: format!("http://{addr}"),
            token: token.to_string(),
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn raw(&self, method: &str, path: &str, body: Option<Bytes>, token: Option<&str>) -> (StatusCode, Value) {
        self.try_raw(method, path, body, token).await.expect("API reachable")
    }

    /// Like [`Api::raw`], but a server that is gone is an `Err`, not a panic.
    pub async fn try_raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
    ) -> Result<(StatusCode, Value), String> {
        self.request(method, path, body, token).await.map(|(status, _, value)| (status, value))
    }

    /// A request whose answer's headers are wanted too.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
    ) -> Result<(StatusCode, http::HeaderMap, Value), String> {
        self.request_with(method, path, body, token, &[]).await
    }

    /// A request with extra headers (a `traceparent`, say).
    pub async fn request_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Bytes>,
        token: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, http::HeaderMap, Value), String> {
        let mut req = Request::builder().method(method).uri(format!("{}{path}", self.base));
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        if body.is_some() && !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            req = req.header("content-type", "application/json");
        }
        let resp = self
            .client
            .request(req.body(Full::new(body.unwrap_or_default())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        Ok((status, headers, value))
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.raw("POST", path, Some(Bytes::from(body.to_string())), Some(&self.token)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.raw("PATCH", path, Some(Bytes::from(body.to_string())), Some(&self.token)).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.raw("GET", path, None, Some(&self.token)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.raw("DELETE", path, None, Some(&self.token)).await
    }

    /// Creates a subscription and returns its JSON (secret included).
    pub async fn subscribe(&self, body: Value) -> Value {
        let (status, sub) = self.post("/v1/subscriptions", body).await;
        assert_eq!(status, StatusCode::CREATED, "{sub}");
        sub
    }
}

/// Creates a tenant through `admin` and a key for it: (tenant id, an API with that key).
pub async fn tenant_with_key(admin: &Api, name: &str) -> (String, Api) {
    let (status, tenant) = admin.post("/v1/tenants", serde_json::json!({ "name": name })).await;
    assert_eq!(status, 201, "{tenant}");
    let id = tenant["id"].as_str().unwrap().to_string();
    assert_eq!(tenant["name"], name);
    let (status, key) = admin.post(&format!("/v1/tenants/{id}/keys"), serde_json::json!({})).await;
    assert_eq!(status, 201, "{key}");
    let mut api = admin.clone();
    api.token = key["key"].as_str().unwrap().to_string();
    (id, api)
}
