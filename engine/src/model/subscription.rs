//! Subscriptions: where a tenant's events go and how. The stored form keeps every field,
//! secrets included (it lives in the registry topic); API views leave secrets out.

use crate::config::HumanDuration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A secret string: never printed by `Debug`, so it cannot leak into logs.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// How deliveries reach the subscriber.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// Signed HTTP POST.
    #[default]
    Webhook,
    /// AMQP 0.9.1 publish.
    Amqp,
}

/// Signature scheme (the contract's `signature`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "scheme", rename_all = "lowercase", deny_unknown_fields)]
pub enum SignatureSpec {
    /// Standard Webhooks: `webhook-id`, `webhook-timestamp`, `webhook-signature`.
    #[default]
    Standard,
    /// HMAC-SHA256 of the body in a header of the subscriber's choice.
    Hmac {
        /// Header name, e.g. `x-hook-signature`.
        header: String,
        /// `base64` or `hex`.
        #[serde(default)]
        encoding: SignatureEncoding,
    },
    /// No signature.
    None,
}

/// Text encoding of an `hmac` signature.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    /// Standard base64 with padding.
    #[default]
    Base64,
    /// Lower-case hex.
    Hex,
}

/// Body shape (the contract's `payload`). `envelope` and `raw` carry the producer's `data` in
/// JavaScript's `JSON.stringify` form, which receivers written from the source systems'
/// guides verify (see `ingest::canonical`); `raw_bytes` carries it exactly as it was sent, for
/// receivers that verify the raw body of a producer's own format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PayloadFormat {
    /// `{"id","event","tenant","data",…}`.
    #[default]
    Envelope,
    /// The producer's `data` only.
    Raw,
    /// The producer's `data` bytes exactly as sent, whitespace and all.
    RawBytes,
}

impl PayloadFormat {
    /// Whether deliveries carry `data` in JavaScript's form rather than as sent.
    pub fn canonical(self) -> bool {
        !matches!(self, PayloadFormat::RawBytes)
    }
}

/// How Herald authenticates to the receiver (the contract's `auth`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP Basic.
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: Secret,
    },
    /// OAuth 2 bearer token fetched from `token_url`.
    Oauth2 {
        /// `password` or `client_credentials`.
        grant: String,
        /// Token endpoint.
        token_url: String,
        /// Client id.
        client_id: String,
        /// Client secret.
        #[serde(default)]
        client_secret: Option<Secret>,
        /// Resource owner (password grant).
        #[serde(default)]
        username: Option<String>,
        /// Resource owner's password (password grant).
        #[serde(default)]
        password: Option<Secret>,
        /// Requested scope.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// TLS options for the receiver connection (the contract's `tls`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsOptions {
    /// PEM file of CA certificates to trust.
    #[serde(default)]
    pub ca_file: Option<String>,
    /// Client certificate (PEM or PKCS#12).
    #[serde(default)]
    pub client_cert_file: Option<String>,
    /// Client key (PEM).
    #[serde(default)]
    pub client_key_file: Option<String>,
    /// Password of the PKCS#12 file or key.
    #[serde(default)]
    pub key_password: Option<Secret>,
    /// Accept any server certificate (explicit opt-in only).
    #[serde(default)]
    pub trust_all: bool,
}

/// AMQP target (the contract's `amqp`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpTarget {
    /// `amqp://` or `amqps://` broker URI.
    pub uri: Secret,
    /// Exchange to publish to.
    pub exchange: String,
    /// Event type → routing key; unmapped types use the type itself.
    #[serde(default)]
    pub routing_keys: BTreeMap<String, String>,
}

/// Retry policy (the contract's `retry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase", deny_unknown_fields)]
pub enum RetrySpec {
    /// Exponential backoff with jitter.
    Exponential {
        /// First delay.
        #[serde(default)]
        initial: Option<HumanDuration>,
        /// Growth factor per attempt.
        #[serde(default)]
        multiplier: Option<f64>,
        /// Ceiling of one delay.
        #[serde(default)]
        max_interval: Option<HumanDuration>,
        /// Fraction of random spread, 0..1.
        #[serde(default)]
        jitter: Option<f64>,
        /// Attempts in all, the first included.
        #[serde(default)]
        max_attempts: Option<u32>,
        /// No attempt after this long since the event was accepted.
        #[serde(default)]
        max_age: Option<HumanDuration>,
    },
    /// The same delay every time.
    Fixed {
        /// Delay between attempts.
        interval: HumanDuration,
        /// Attempts in all.
        max_attempts: u32,
    },
}

/// A subscription as stored in the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Server-made id.
    pub id: String,
    /// Owner.
    pub tenant: String,
    /// Target URL (webhook) or a label for the AMQP target.
    pub url: String,
    /// Event types delivered; empty means all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Transport.
    #[serde(default)]
    pub transport: TransportKind,
    /// Signing secret.
    pub secret: Secret,
    /// The secret being rotated out: still signed with until `previous_secret_until`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret: Option<Secret>,
    /// End of the rotation overlap, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<i64>,
    /// Signature scheme.
    #[serde(default)]
    pub signature: SignatureSpec,
    /// Body shape.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Value of the `key` query parameter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Secret>,
    /// Request timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Receiver authentication.
    #[serde(default)]
    pub auth: Auth,
    /// TLS options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOptions>,
    /// AMQP target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amqp: Option<AmqpTarget>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Deliveries in flight at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Deliveries per second at most.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// Whether deliveries are made.
    pub enabled: bool,
    /// The edge device (`edg_…`) that makes this subscription's deliveries from inside the
    /// customer's network, instead of Herald itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_edge: Option<String>,
    /// Why it was disabled by Herald, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
}

/// `POST /v1/subscriptions` body: the stored fields a client may set.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionInput {
    /// Owner (admin only; a tenant key implies its tenant).
    #[serde(default)]
    pub tenant: Option<String>,
    /// Target URL (for AMQP, a label derived from the broker and exchange when absent).
    #[serde(default)]
    pub url: String,
    /// Event types; absent or empty means all.
    #[serde(default)]
    pub events: Vec<String>,
    /// Transport.
    #[serde(default)]
    pub transport: TransportKind,
    /// Signing secret; generated when absent.
    #[serde(default)]
    pub secret: Option<Secret>,
    /// Signature scheme.
    #[serde(default)]
    pub signature: SignatureSpec,
    /// Body shape.
    #[serde(default)]
    pub payload: PayloadFormat,
    /// Extra request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `key` query parameter.
    #[serde(default)]
    pub key: Option<Secret>,
    /// Request timeout.
    #[serde(default)]
    pub timeout: Option<HumanDuration>,
    /// Receiver authentication.
    #[serde(default)]
    pub auth: Auth,
    /// TLS options.
    #[serde(default)]
    pub tls: Option<TlsOptions>,
    /// AMQP target.
    #[serde(default)]
    pub amqp: Option<AmqpTarget>,
    /// Retry policy.
    #[serde(default)]
    pub retry: Option<RetrySpec>,
    /// In-flight cap.
    #[serde(default)]
    pub max_in_flight: Option<u32>,
    /// Rate cap, deliveries/s.
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Enabled (default true).
    #[serde(default)]
    pub enabled: Option<bool>,
    /// Deliver through this edge device.
    #[serde(default)]
    pub via_edge: Option<String>,
}

/// `PATCH /v1/subscriptions/{id}` body: the fields given replace the stored ones.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionPatch {
    /// Target URL.
    pub url: Option<String>,
    /// Event types (empty: all).
    pub events: Option<Vec<String>>,
    /// Signature scheme.
    pub signature: Option<SignatureSpec>,
    /// Body shape.
    pub payload: Option<PayloadFormat>,
    /// Extra request headers.
    pub headers: Option<BTreeMap<String, String>>,
    /// `key` query parameter.
    pub key: Option<Secret>,
    /// Request timeout.
    pub timeout: Option<HumanDuration>,
    /// Receiver authentication.
    pub auth: Option<Auth>,
    /// TLS options.
    pub tls: Option<TlsOptions>,
    /// Retry policy.
    pub retry: Option<RetrySpec>,
    /// In-flight cap.
    pub max_in_flight: Option<u32>,
    /// Rate cap.
    pub rate_limit: Option<f64>,
    /// Enabled; enabling clears `disabled_reason`.
    pub enabled: Option<bool>,
    /// Deliver through this edge device; `""` delivers directly again.
    pub via_edge: Option<String>,
}

impl Subscription {
    /// The editable fields as a creation request, for validating a changed subscription
    /// exactly like a new one.
    pub fn as_input(&self) -> SubscriptionInput {
        SubscriptionInput {
            tenant: Some(self.tenant.clone()),
            url: self.url.clone(),
            events: self.events.clone(),
            transport: self.transport,
            secret: Some(self.secret.clone()),
            signature: self.signature.clone(),
            payload: self.payload,
            headers: self.headers.clone(),
            key: self.key.clone(),
            timeout: self.timeout,
            auth: self.auth.clone(),
            tls: self.tls.clone(),
            amqp: self.amqp.clone(),
            retry: self.retry.clone(),
            max_in_flight: self.max_in_flight,
            rate_limit: self.rate_limit,
            enabled: Some(self.enabled),
            via_edge: self.via_edge.clone(),
        }
    }

    /// The API view: every field but the secrets (the signing secret only when
    /// `with_secret`, as on create and rotation).
    pub fn view(&self, with_secret: bool) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("subscription serializes");
        let obj = v.as_object_mut().expect("object");
        if !with_secret {
            obj.remove("secret");
        }
        obj.remove("previous_secret");
        if let Some(until) = obj.remove("previous_secret_until").and_then(|v| v.as_i64()) {
            obj.insert("previous_secret_expires_at".into(), super::rfc3339_ms(until).into());
        }
        if obj.contains_key("key") {
            obj.insert("key".into(), serde_json::Value::String("********".into()));
        }
        if let Some(auth) = obj.get_mut("auth").and_then(|a| a.as_object_mut()) {
            auth.remove("password");
            auth.remove("client_secret");
        }
        if let Some(tls) = obj.get_mut("tls").and_then(|t| t.as_object_mut()) {
            tls.remove("key_password");
        }
        if let Some(amqp) = obj.get_mut("amqp").and_then(|t| t.as_object_mut()) {
            if let Some(uri) = amqp.get("uri").and_then(|u| u.as_str()) {
                let redacted = redact_userinfo(uri);
                amqp.insert("uri".into(), serde_json::Value::String(redacted));
            }
        }
        v
    }

    /// Whether an event of `event_type` goes to this subscription.
    pub fn wants(&self, event_type: &str) -> bool {
        self.enabled && (self.events.is_empty() || self.events.iter().any(|e| e == event_type))
    }
}

/// Replaces the password in a URI's user-info with `****`.
fn redact_userinfo(uri: &str) -> String {
    match url::Url::parse(uri) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("****"));
            u.to_string()
        }
        _ => uri.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Subscription {
        Subscription {
            id: "sub_1".into(),
            tenant: "t".into(),
            url: "https://example.com/hook".into(),
            events: vec![],
            transport: TransportKind::Webhook,
            secret: Secret("whsec_abc".into()),
            previous_secret: Some(Secret("whsec_old".into())),
            previous_secret_until: Some(0),
            signature: SignatureSpec::Standard,
            payload: PayloadFormat::Envelope,
            headers: BTreeMap::new(),
            key: Some(Secret("k".into())),
            timeout: None,
            auth: Auth::Basic { username: "u".into(), password: Secret("pw".into()) },
            tls: None,
            amqp: Some(AmqpTarget {
                uri: Secret("amqp://u:hunter2@host/vh".into()),
                exchange: "x".into(),
                routing_keys: BTreeMap::new(),
            }),
            retry: None,
            max_in_flight: None,
            rate_limit: None,
            enabled: true,
            via_edge: None,
            disabled_reason: None,
            created_at: "now".into(),
            updated_at: "now".into(),
        }
    }

    #[test]
    fn views_leave_out_every_secret() {
        let text = sample().view(false).to_string();
        for secret in ["whsec_abc", "whsec_old", "\"pw\"", "hunter2", "\"k\""] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(sample().view(true).to_string().contains("whsec_abc"));
        assert!(!format!("{:?}", sample()).contains("hunter2"));
    }

    #[test]
    fn empty_events_match_everything() {
        let mut s = sample();
        assert!(s.wants("Anything"));
        s.events = vec!["OrderCreated".into()];
        assert!(s.wants("OrderCreated") && !s.wants("OrderShipped"));
        s.enabled = false;
        assert!(!s.wants("OrderCreated"));
    }
}
