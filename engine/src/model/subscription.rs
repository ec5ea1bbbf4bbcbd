//! Subscriptions: where a tenant's events go and how. [`SubscriptionSpec`] declares every field
//! a client may set, once; the stored [`Subscription`] is a spec plus what the server decides
//! (id, owner, signing secrets, timestamps), and the create body, PATCH and the config file's
//! static webhooks all build a spec. Secret fields are typed [`Secret`], so views redact them
//! without a list of names to keep up to date.

use super::secret::{self, Secret};
use crate::config::HumanDuration;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

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
#[serde(tag = "scheme", rename_all = "lowercase")]
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
/// guides verify (see `canonical`); `raw_bytes` carries it exactly as it was sent, for
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
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Auth {
    /// No credentials.
    #[default]
    None,
    /// HTTP Basic.
    Basic {
        /// User name.
        username: String,
        /// Password (a secret: never returned).
        password: Secret,
    },
    /// OAuth 2 bearer token fetched from `token_url`.
    Oauth2 {
        /// `password` or `client_credentials`.
        grant: String,
        /// Token endpoint.
        token_url: String,
        /// The client id the token endpoint knows Herald by.
        client_id: String,
        /// Client secret, sent in HTTP Basic to the token endpoint (a secret).
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

/// TLS options for the receiver connection (the contract's `tls`). Certificates and keys
/// come as content (PEM, or PKCS#12 as base64): a tenant never names a file on Herald's server.
/// The `*_file` paths are for the operator's own config file (static webhooks), or for files
/// under `tls.files_dir` when the operator sets one.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsOptions {
    /// CA certificates to trust besides the public roots, PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_pem: Option<String>,
    /// The client certificate chain, PEM (with `client_key_pem`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_pem: Option<String>,
    /// The client certificate's key, PEM (a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_pem: Option<Secret>,
    /// The client certificate and key as PKCS#12, base64 (a secret; opened with
    /// `key_password`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_p12: Option<Secret>,
    /// Password of the PKCS#12 content or file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_password: Option<Secret>,
    /// Accept any server certificate (explicit opt-in only; warned about at every start).
    #[serde(default)]
    pub trust_all: bool,
    /// A PEM file of CA certificates (operator's config file, or under `tls.files_dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// A client certificate file, PEM or PKCS#12 (as `ca_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_cert_file: Option<String>,
    /// A client key file, PEM (as `ca_file`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<String>,
}

/// AMQP target (the contract's `amqp`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AmqpTarget {
    /// `amqp://` or `amqps://` broker URI; views show it with the password redacted.
    #[serde(serialize_with = "secret::uri_with_password_redacted")]
    pub uri: Secret,
    /// Exchange to publish to.
    pub exchange: String,
    /// Event type → routing key; unmapped types use the type itself.
    #[serde(default)]
    pub routing_keys: BTreeMap<String, String>,
}

/// Retry policy (the contract's `retry`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "policy", rename_all = "lowercase", try_from = "RetryFields")]
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

/// `retry` as read: one flat object, so a bad value is reported at its own path
/// (`retry.max_age`), which serde cannot do inside an internally tagged enum.
#[derive(Deserialize)]
struct RetryFields {
    policy: RetryPolicy,
    #[serde(default)]
    initial: Option<HumanDuration>,
    #[serde(default)]
    multiplier: Option<f64>,
    #[serde(default)]
    max_interval: Option<HumanDuration>,
    #[serde(default)]
    jitter: Option<f64>,
    #[serde(default)]
    max_attempts: Option<u32>,
    #[serde(default)]
    max_age: Option<HumanDuration>,
    #[serde(default)]
    interval: Option<HumanDuration>,
}

#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum RetryPolicy {
    Exponential,
    Fixed,
}

impl TryFrom<RetryFields> for RetrySpec {
    type Error = String;

    /// Fields of the other policy are kept out here, so the API's read-back check names them
    /// as unknown.
    fn try_from(f: RetryFields) -> Result<Self, String> {
        Ok(match f.policy {
            RetryPolicy::Exponential => RetrySpec::Exponential {
                initial: f.initial,
                multiplier: f.multiplier,
                max_interval: f.max_interval,
                jitter: f.jitter,
                max_attempts: f.max_attempts,
                max_age: f.max_age,
            },
            RetryPolicy::Fixed => RetrySpec::Fixed {
                interval: f.interval.ok_or("missing field `interval`")?,
                max_attempts: f.max_attempts.ok_or("missing field `max_attempts`")?,
            },
        })
    }
}

/// Every field of a subscription a client may set: declared once, and what the create body,
/// PATCH (a JSON Merge Patch onto it) and the config file's static webhooks are made of.
/// Unknown fields are ignored when reading a stored record (a newer version's field must not
/// make an older process drop the subscription); the API refuses them, naming them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscriptionSpec {
    /// Target URL (webhook); for AMQP a label derived from the broker and exchange when empty.
    pub url: String,
    /// Event types delivered; empty means all.
    pub events: Vec<String>,
    /// How deliveries travel: a webhook, or an AMQP publish.
    pub transport: TransportKind,
    /// Signature scheme.
    pub signature: SignatureSpec,
    /// Body shape.
    pub payload: PayloadFormat,
    /// Extra request headers. Their values are secrets (they often carry credentials): views
    /// show `********`.
    pub headers: BTreeMap<String, Secret>,
    /// Value of the `key` query parameter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<Secret>,
    /// Request timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timeout: Option<HumanDuration>,
    /// Receiver authentication.
    pub auth: Auth,
    /// TLS options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsOptions>,
    /// AMQP target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amqp: Option<AmqpTarget>,
    /// Retry policy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<RetrySpec>,
    /// Deliveries in flight at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<u32>,
    /// Deliveries per second at most.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// Whether deliveries are made.
    pub enabled: bool,
    /// The edge device (`edg_…`) that makes this subscription's deliveries from inside the
    /// customer's network, instead of Herald itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub via_edge: Option<String>,
    /// Which egress proxy webhooks leave through: one the operator named in `http.proxies`,
    /// or `"none"` to go direct; absent, `http.proxy` (if any) is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<String>,
    /// Per-key ordering: deliveries with the same key are made one after another.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordering: Option<OrderingSpec>,
}

/// `ordering`: a subscription that opts in gets each key's deliveries strictly one after
/// another, in the order they were accepted, while other keys flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OrderingSpec {
    /// `key` (ordered per key) or `none` (as if `ordering` were absent).
    pub mode: OrderingMode,
    /// Where the key is taken from when an event carries no `ordering_key`: a JSON pointer
    /// into the event (`/data/containerId`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What a dead-lettered delivery does to the rest of its key.
    pub on_dead_letter: OnDeadLetter,
}

impl Default for OrderingSpec {
    fn default() -> Self {
        OrderingSpec { mode: OrderingMode::Key, key: None, on_dead_letter: OnDeadLetter::Skip }
    }
}

impl OrderingSpec {
    /// Whether deliveries are ordered per key.
    pub fn ordered(&self) -> bool {
        self.mode == OrderingMode::Key
    }
}

/// `ordering.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderingMode {
    /// Unordered, as without `ordering`.
    None,
    /// One after another per key.
    Key,
}

/// `ordering.on_dead_letter`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDeadLetter {
    /// The key's next delivery goes on once the head is dead-lettered.
    Skip,
    /// The key waits until an operator skips the dead-lettered head.
    Block,
}

impl Default for SubscriptionSpec {
    fn default() -> Self {
        SubscriptionSpec {
            url: String::new(),
            events: Vec::new(),
            transport: TransportKind::default(),
            signature: SignatureSpec::default(),
            payload: PayloadFormat::default(),
            headers: BTreeMap::new(),
            key: None,
            timeout: None,
            auth: Auth::default(),
            tls: None,
            amqp: None,
            retry: None,
            max_in_flight: None,
            rate_limit: None,
            enabled: true,
            via_edge: None,
            proxy: None,
            ordering: None,
        }
    }
}

/// A subscription as stored in the registry: a spec, and what the server decides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscription {
    /// Server-made id; also the key of its deliveries' partition.
    pub id: String,
    /// The owning tenant: whose keys see it and whose events it receives.
    pub tenant: String,
    /// What the client asked for.
    #[serde(flatten)]
    pub spec: SubscriptionSpec,
    /// Signing secret: in the stored form only; views leave it out (create and rotation add
    /// it to their answer on purpose).
    #[serde(skip_serializing_if = "secret::redacting")]
    pub secret: Secret,
    /// The secret being rotated out: still signed with until `previous_secret_until`.
    #[serde(default, skip_serializing_if = "hidden_or_none")]
    pub previous_secret: Option<Secret>,
    /// End of the rotation overlap, ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_secret_until: Option<i64>,
    /// Secrets rotated out before `previous_secret` whose own overlap has not ended (newest
    /// first): a second rotation within the first one's overlap would otherwise end the first
    /// secret at once, failing every receiver still holding it. Stored only.
    #[serde(default, skip_serializing_if = "hidden_or_empty")]
    pub earlier_secrets: Vec<RotatedSecret>,
    /// Why it was disabled by Herald, if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled_reason: Option<String>,
    /// Creation time, RFC 3339.
    pub created_at: String,
    /// Last change, RFC 3339.
    pub updated_at: String,
    /// The catalog offset of the version this record was made from (a change, not a
    /// creation): a change made from a version before the subscription was deleted is
    /// ignored, so a process that had not read the delete cannot bring it back. Stored only.
    #[serde(default, skip_serializing_if = "secret::redacting")]
    pub based_on: Option<u64>,
}

fn hidden_or_none(s: &Option<Secret>) -> bool {
    s.is_none() || secret::redacting(s)
}

fn hidden_or_empty(s: &[RotatedSecret]) -> bool {
    s.is_empty() || secret::redacting(&s)
}

/// A secret rotated out, and the end of its overlap (ms since the epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotatedSecret {
    pub secret: Secret,
    pub until: i64,
}

/// How many rotated-out secrets sign beside the current one at most: each costs an HMAC per
/// attempt, and a tenant rotating in a loop must not make its deliveries dearer without end.
/// Past it the oldest ends early.
pub const MAX_ROTATED_SECRETS: usize = 4;

impl Subscription {
    /// A subscription of `tenant` made from `spec` with `secret`, as `id`: unchecked, stamped
    /// with no time, no secret rotated out. What tests, benchmarks and records written by hand
    /// start from; the API's come through the registry, which checks them.
    pub fn unchecked(id: String, tenant: String, spec: SubscriptionSpec, secret: Secret) -> Self {
        Subscription {
            id,
            tenant,
            spec,
            secret,
            previous_secret: None,
            previous_secret_until: None,
            earlier_secrets: Vec::new(),
            based_on: None,
            disabled_reason: None,
            created_at: String::new(),
            updated_at: String::new(),
        }
    }

    /// The API view: every field, secrets redacted, the signing secret left out.
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("subscription serializes");
        let obj = v.as_object_mut().expect("object");
        // Only Standard Webhooks carries several signatures: an `hmac` header carries the new
        // secret's alone, so no overlap is promised for it.
        let overlaps = self.spec.signature == SignatureSpec::Standard;
        if let Some(until) = obj.remove("previous_secret_until").and_then(|v| v.as_i64()).filter(|_| overlaps) {
            obj.insert("previous_secret_expires_at".into(), super::rfc3339_ms(until).into());
        }
        v
    }

    /// The view with the signing secret: the answer to create and to rotation, the only two.
    pub fn view_with_secret(&self) -> serde_json::Value {
        let mut v = self.view();
        v["secret"] = self.secret.expose().into();
        v
    }

    /// The secrets rotated out that still sign at `now_ms`, newest first.
    pub fn rotated_out(&self, now_ms: i64) -> impl Iterator<Item = (&Secret, i64)> {
        let previous = self.previous_secret.as_ref().zip(self.previous_secret_until);
        previous
            .into_iter()
            .chain(self.earlier_secrets.iter().map(|e| (&e.secret, e.until)))
            .filter(move |(_, until)| *until > now_ms)
    }

    /// Rotates to `new`: the current secret signs beside it until `until`, and the secrets
    /// rotated out before it keep their own overlaps (at most [`MAX_ROTATED_SECRETS`] in all).
    pub fn rotate(&mut self, new: Secret, now_ms: i64, until: i64) {
        let mut earlier: Vec<RotatedSecret> =
            self.rotated_out(now_ms).map(|(secret, until)| RotatedSecret { secret: secret.clone(), until }).collect();
        earlier.truncate(MAX_ROTATED_SECRETS - 1);
        self.previous_secret = Some(std::mem::replace(&mut self.secret, new));
        self.previous_secret_until = Some(until);
        self.earlier_secrets = earlier;
    }

    /// The stored form, secrets and all, sealed when a key is installed (the catalog's record).
    pub fn stored(&self) -> Vec<u8> {
        secret::storing(|| serde_json::to_vec(self).expect("subscription serializes"))
    }

    /// Whether an event of `event_type` goes to this subscription.
    pub fn wants(&self, event_type: &str) -> bool {
        self.spec.enabled && (self.spec.events.is_empty() || self.spec.events.iter().any(|e| e == event_type))
    }
}

/// What identifies a TLS profile: subscriptions with equal profiles share a client pool. A
/// digest of every option, secrets included, so no secret is kept in the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProfileKey([u8; 32]);

impl ProfileKey {
    /// The profile of a subscription's options.
    pub fn of(opts: &TlsOptions) -> Self {
        #[cfg(test)]
        DIGESTS.with(|n| n.set(n.get() + 1));
        let all = secret::revealing(|| serde_json::to_vec(opts)).expect("options serialize");
        ProfileKey(Sha256::digest(all).into())
    }
}

#[cfg(test)]
thread_local! {
    /// Tests: profile keys worked out on this thread.
    pub(crate) static DIGESTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A subscription's TLS options with their profile's key, worked out once, as the
/// subscription is compiled: the key digests every option, certificates included, and worked
/// out at each send it took 2 µs of a delivery's ~30 for a client certificate and its CA, and
/// 47 µs for a tenant's CA bundle of 64 KiB.
#[derive(Debug, Clone)]
pub struct Tls {
    /// The options.
    pub options: TlsOptions,
    /// Their profile.
    pub key: ProfileKey,
}

impl Tls {
    /// The options with their key.
    pub fn new(options: TlsOptions) -> Tls {
        let key = ProfileKey::of(&options);
        Tls { options, key }
    }
}

/// The cache key of a subscription's credentials: a digest of its tenant and every credential
/// field. Worked out once, as the subscription is compiled (`Target`), not at every send:
/// the fields include its TLS material (see [`Tls`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credentials([u8; 32]);

impl Credentials {
    /// The key of `sub`'s credentials.
    pub fn of(sub: &Subscription) -> Credentials {
        let credentials =
            secret::revealing(|| serde_json::to_vec(&(&sub.tenant, &sub.spec.auth, &sub.spec.tls, &sub.spec.proxy)))
                .expect("credentials serialize");
        Credentials(Sha256::digest(credentials).into())
    }

    /// The key's bytes.
    pub fn bytes(self) -> [u8; 32] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Subscription {
        Subscription {
            id: "sub_1".into(),
            tenant: "t".into(),
            spec: SubscriptionSpec {
                url: "https://example.com/hook".into(),
                headers: [("X-Api-Token".to_string(), Secret("tok3n".into()))].into(),
                key: Some(Secret("k".into())),
                auth: Auth::Basic { username: "u".into(), password: Secret("pw".into()) },
                amqp: Some(AmqpTarget {
                    uri: Secret("amqp://u:hunter2@host/vh".into()),
                    exchange: "x".into(),
                    routing_keys: BTreeMap::new(),
                }),
                ..SubscriptionSpec::default()
            },
            secret: Secret("whsec_abc".into()),
            previous_secret: Some(Secret("whsec_old".into())),
            previous_secret_until: Some(0),
            earlier_secrets: vec![RotatedSecret { secret: Secret("whsec_older".into()), until: 0 }],
            disabled_reason: None,
            created_at: "now".into(),
            updated_at: "now".into(),
            based_on: Some(3),
        }
    }

    #[test]
    fn views_leave_out_every_secret() {
        let text = sample().view().to_string();
        for secret in ["whsec_abc", "whsec_old", "whsec_older", "\"pw\"", "hunter2", "\"k\"", "tok3n"] {
            assert!(!text.contains(secret), "{secret} leaked in {text}");
        }
        assert!(text.contains("amqp://u:********@host/vh"), "{text}");
        assert!(text.contains("previous_secret_expires_at"), "{text}");
        assert!(sample().view_with_secret().to_string().contains("whsec_abc"));
        assert!(!format!("{:?}", sample()).contains("hunter2"));
    }

    #[test]
    fn the_stored_form_keeps_every_secret_and_reads_back() {
        let stored = sample().stored();
        let text = String::from_utf8(stored.clone()).unwrap();
        for secret in ["whsec_abc", "whsec_old", "whsec_older", "hunter2", "tok3n"] {
            assert!(text.contains(secret), "{secret} missing from {text}");
        }
        assert_eq!(serde_json::from_slice::<Subscription>(&stored).unwrap(), sample());
    }

    #[test]
    fn rotations_keep_each_secret_until_its_own_overlap_ends_a_bounded_few() {
        let mut sub = sample();
        sub.previous_secret = None;
        sub.earlier_secrets.clear();
        for n in 0..10 {
            sub.rotate(Secret(format!("whsec_{n}")), 1_000 + n, 10_000 + n);
        }
        let live: Vec<_> = sub.rotated_out(1_009).map(|(s, until)| (s.expose().to_string(), until)).collect();
        assert_eq!(live.len(), MAX_ROTATED_SECRETS, "{live:?}");
        assert_eq!(live[0], ("whsec_8".to_string(), 10_009), "the newest rotated out first");
        assert_eq!(sub.secret.expose(), "whsec_9");
        // Past their overlaps the earlier ones sign nothing and the next rotation drops them.
        assert_eq!(sub.rotated_out(10_008).count(), 1);
        sub.rotate(Secret("whsec_10".into()), 10_008, 20_000);
        assert_eq!(sub.earlier_secrets.len(), 1, "only the one still in its overlap is kept");
        // A record written before `earlier_secrets` existed reads back with none.
        let mut v: serde_json::Value = serde_json::from_slice(&sample().stored()).unwrap();
        v.as_object_mut().unwrap().remove("earlier_secrets");
        assert!(serde_json::from_value::<Subscription>(v).unwrap().earlier_secrets.is_empty());
    }

    #[test]
    fn a_newer_versions_fields_do_not_make_a_record_unreadable() {
        let mut v: serde_json::Value = serde_json::from_slice(&sample().stored()).unwrap();
        v["ordering_v9"] = serde_json::json!({"mode": "key"});
        v["auth"]["mfa"] = true.into();
        let back: Subscription = serde_json::from_value(v).unwrap();
        assert_eq!(back.spec.url, "https://example.com/hook");
    }

    #[test]
    fn empty_events_match_everything() {
        let mut s = sample();
        assert!(s.wants("Anything"));
        s.spec.events = vec!["OrderCreated".into()];
        assert!(s.wants("OrderCreated") && !s.wants("OrderShipped"));
        s.spec.enabled = false;
        assert!(!s.wants("OrderCreated"));
    }
}
