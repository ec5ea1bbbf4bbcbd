//! Request signatures: the one place that decides the signature bytes. Keys are prepared
//! once per subscription; signing walks the body's chunks, so the payload is never copied.

use crate::model::{Secret, SignatureEncoding, SignatureSpec};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use bytes::Bytes;
use hmac::{Hmac, Mac};
use http::{HeaderName, HeaderValue};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Prefix of generated secrets, as Standard Webhooks defines.
pub const SECRET_PREFIX: &str = "whsec_";

/// Why a secret or signature header is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningError {
    /// A `standard` secret must be `whsec_` followed by base64 of at least 16 bytes.
    #[error("a standard-scheme secret must be \"whsec_\" followed by base64 of 16 to 64 bytes")]
    MalformedSecret,
    /// `hmac` secrets must not be empty.
    #[error("the secret must not be empty")]
    EmptySecret,
    /// The chosen header name is not a valid or allowed header.
    #[error("{0:?} is not a usable signature header name")]
    BadHeader(String),
}

/// Standard Webhooks header names.
pub const WEBHOOK_ID: HeaderName = HeaderName::from_static("webhook-id");
/// Standard Webhooks timestamp header.
pub const WEBHOOK_TIMESTAMP: HeaderName = HeaderName::from_static("webhook-timestamp");
/// Standard Webhooks signature header.
pub const WEBHOOK_SIGNATURE: HeaderName = HeaderName::from_static("webhook-signature");

/// A new random secret: `whsec_` + base64 of 24 random bytes.
pub fn generate_secret() -> Secret {
    let mut key = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut key);
    Secret(format!("{SECRET_PREFIX}{}", B64.encode(key)))
}

/// The HMAC key of a `standard` secret: the base64 after `whsec_` (the prefix is optional,
/// as in the reference libraries).
pub fn standard_key(secret: &Secret) -> Result<Vec<u8>, SigningError> {
    let text = secret.expose();
    let b64 = text.strip_prefix(SECRET_PREFIX).unwrap_or(text);
    let key = B64.decode(b64).map_err(|_| SigningError::MalformedSecret)?;
    if !(16..=64).contains(&key.len()) {
        return Err(SigningError::MalformedSecret);
    }
    Ok(key)
}

#[derive(Clone)]
enum Scheme {
    Standard,
    Hmac { header: HeaderName, encoding: SignatureEncoding },
    None,
}

/// Signs requests for one subscription, with one key or, during a rotation, several.
#[derive(Clone)]
pub struct Signer {
    scheme: Scheme,
    keys: Vec<HmacSha256>,
    /// The keys being rotated out and when each stops being used (ms since epoch).
    previous: Vec<(HmacSha256, i64)>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer").field("keys", &self.keys.len()).finish_non_exhaustive()
    }
}

/// Headers Herald sets on every request itself (framing, hop-by-hop, the Standard Webhooks
/// set): neither a subscription's custom headers nor its `hmac` signature header may be one.
const RESERVED: &[&str] = &[
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

/// The trace-context headers Herald sets for traced events: new subscriptions may not set them
/// (refused when written), and a subscription stored before they were Herald's keeps
/// delivering, without its own copy.
pub const TRACE_HEADERS: &[&str] = &["traceparent", "tracestate"];

/// Longest header name a subscription may choose (AMQP headers allow 255 bytes).
pub const MAX_HEADER_NAME: usize = 128;

/// Whether Herald sets `name` itself, so a subscription cannot.
pub fn reserved(name: &HeaderName) -> bool {
    RESERVED.contains(&name.as_str())
}

impl Signer {
    /// Prepares keys for `spec` from `secrets` (newest first).
    pub fn new(spec: &SignatureSpec, secrets: &[&Secret]) -> Result<Signer, SigningError> {
        let (scheme, keys) = match spec {
            SignatureSpec::None => (Scheme::None, Vec::new()),
            SignatureSpec::Standard => {
                // The one place the `whsec_` rule is decided: a secret without the prefix is
                // refused when it is set (key bytes alone are easy to mistake for a password).
                if secrets.iter().any(|s| !s.expose().starts_with(SECRET_PREFIX)) {
                    return Err(SigningError::MalformedSecret);
                }
                let keys = secrets
                    .iter()
                    .map(|s| standard_key(s).map(|k| HmacSha256::new_from_slice(&k).expect("any key length")))
                    .collect::<Result<_, _>>()?;
                (Scheme::Standard, keys)
            }
            SignatureSpec::Hmac { header, encoding } => {
                let name =
                    HeaderName::from_bytes(header.as_bytes()).map_err(|_| SigningError::BadHeader(header.clone()))?;
                // `authorization` is the receiver's credentials (`auth`), never a signature;
                // AMQP carries header names as short strings, so they stay well under 255 bytes.
                if reserved(&name) || name == http::header::AUTHORIZATION || header.len() > MAX_HEADER_NAME {
                    return Err(SigningError::BadHeader(header.clone()));
                }
                if secrets.iter().any(|s| s.expose().is_empty()) {
                    return Err(SigningError::EmptySecret);
                }
                let keys = secrets
                    .iter()
                    .map(|s| HmacSha256::new_from_slice(s.expose().as_bytes()).expect("any key length"))
                    .collect();
                (Scheme::Hmac { header: name, encoding: *encoding }, keys)
            }
        };
        Ok(Signer { scheme, keys, previous: Vec::new() })
    }

    /// Also signs with `secret` until `until_ms` (a rotation's overlap), for the `standard`
    /// scheme, whose header carries several signatures; `hmac` headers carry one, the new.
    pub fn with_previous(mut self, secret: &Secret, until_ms: i64) -> Result<Signer, SigningError> {
        if let Scheme::Standard = self.scheme {
            let key = standard_key(secret)?;
            self.previous.push((HmacSha256::new_from_slice(&key).expect("any key length"), until_ms));
        }
        Ok(self)
    }

    /// The header an `hmac` signature goes in (the Standard Webhooks ones are reserved).
    pub fn header(&self) -> Option<&HeaderName> {
        match &self.scheme {
            Scheme::Hmac { header, .. } => Some(header),
            Scheme::Standard | Scheme::None => None,
        }
    }

    /// The headers that identify and sign one request whose body is the concatenation of
    /// `body`: `webhook-id` and `webhook-timestamp` (for every scheme, so receivers can drop
    /// duplicates) and the scheme's signature over exactly those bytes.
    pub fn headers(&self, id: &str, timestamp: i64, body: &[Bytes]) -> Vec<(HeaderName, HeaderValue)> {
        let mut headers = Vec::with_capacity(3);
        // Event ids are checked at ingest to be visible ASCII, so this always succeeds.
        if let Ok(id) = HeaderValue::from_str(id) {
            headers.push((WEBHOOK_ID, id));
        }
        // One text of the timestamp, signed and sent (the header shares its bytes).
        let stamp = Bytes::from(timestamp.to_string());
        let signature = self.signature(id, timestamp, &stamp, body);
        headers.push((WEBHOOK_TIMESTAMP, header_value(stamp)));
        headers.extend(signature);
        headers
    }

    /// The signature header for a request whose body is the concatenation of `body`; `stamp`
    /// is `timestamp` as text. Written into one string (this runs once per attempt: a string
    /// per signature, joined, then copied into the header cost four allocations more).
    fn signature(&self, id: &str, timestamp: i64, stamp: &[u8], body: &[Bytes]) -> Option<(HeaderName, HeaderValue)> {
        let mut value = String::with_capacity(48 * (self.keys.len() + self.previous.len() + 1));
        let name = match &self.scheme {
            Scheme::None => return None,
            Scheme::Standard => {
                let previous = self.previous.iter().filter(|(_, until)| timestamp * 1000 < *until).map(|(k, _)| k);
                for key in self.keys.iter().chain(previous) {
                    let tag = mac(key, &[id.as_bytes(), b".", stamp, b"."], body);
                    next_signature(&mut value);
                    value.push_str("v1,");
                    B64.encode_string(tag, &mut value);
                }
                WEBHOOK_SIGNATURE
            }
            Scheme::Hmac { header, encoding } => {
                for key in &self.keys {
                    let tag = mac(key, &[], body);
                    next_signature(&mut value);
                    match encoding {
                        SignatureEncoding::Base64 => B64.encode_string(tag, &mut value),
                        SignatureEncoding::Hex => value.push_str(&hex::encode(tag)),
                    }
                }
                header.clone()
            }
        };
        Some((name, header_value(Bytes::from(value))))
    }
}

/// The HMAC of `prefix` then `body` under `key`.
fn mac(key: &HmacSha256, prefix: &[&[u8]], body: &[Bytes]) -> impl AsRef<[u8]> {
    let mut mac = key.clone();
    prefix.iter().for_each(|p| mac.update(p));
    body.iter().for_each(|c| mac.update(c));
    mac.finalize().into_bytes()
}

/// Separates signatures in one header value with a space.
fn next_signature(value: &mut String) {
    if !value.is_empty() {
        value.push(' ');
    }
}

/// A header value of text Herald wrote (digits, base64, hex), without copying it.
fn header_value(text: Bytes) -> HeaderValue {
    HeaderValue::from_maybe_shared(text).expect("digits, base64 and hex are valid header text")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer(spec: SignatureSpec, secrets: &[&str]) -> Signer {
        let secrets: Vec<Secret> = secrets.iter().map(|s| Secret(s.to_string())).collect();
        Signer::new(&spec, &secrets.iter().collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn standard_matches_the_published_test_vector() {
        let s = signer(SignatureSpec::Standard, &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let body = [Bytes::from_static(br#"{"test": 2432232314}"#)];
        let (name, value) = s.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, b"1614265330", &body).unwrap();
        assert_eq!(name, "webhook-signature");
        assert_eq!(value, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn chunked_bodies_sign_like_the_whole() {
        let s = signer(SignatureSpec::Standard, &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let parts = [Bytes::from_static(br#"{"test": "#), Bytes::from_static(b"2432232314}")];
        let (_, value) = s.signature("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, b"1614265330", &parts).unwrap();
        assert_eq!(value, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn headers_carry_the_id_the_timestamp_and_the_signature_over_them() {
        let s = signer(SignatureSpec::Standard, &["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let body = [Bytes::from_static(br#"{"test": 2432232314}"#)];
        let headers = s.headers("msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, &body);
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["webhook-id", "webhook-timestamp", "webhook-signature"]);
        assert_eq!(headers[0].1, "msg_p5jXN8AQM9LWM0D4loKWxJek");
        assert_eq!(headers[1].1, "1614265330");
        assert_eq!(headers[2].1, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        let none = signer(SignatureSpec::None, &[]);
        assert_eq!(none.headers("evt_1", -5, &body).len(), 2, "ids and timestamps for every scheme");
    }

    #[test]
    fn rotation_sends_both_signatures_space_separated() {
        let new = generate_secret();
        let s = signer(SignatureSpec::Standard, &[new.expose(), "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]);
        let (_, value) = s
            .signature(
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1_614_265_330,
                b"1614265330",
                &[Bytes::from_static(br#"{"test": 2432232314}"#)],
            )
            .unwrap();
        let parts: Vec<&str> = value.to_str().unwrap().split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[1], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn hmac_uses_the_secret_text_as_key_in_hex_or_base64() {
        // echo -n 'hello' | openssl dgst -sha256 -hmac 'secret'
        let expected_hex = "88aab3ede8d3adf94d26ab90d3bafd4a2083070c3bcce9c014ee04a443847c0b";
        let hex = signer(
            SignatureSpec::Hmac { header: "X-OpenTrack-Signature".into(), encoding: SignatureEncoding::Hex },
            &["secret"],
        );
        let (name, value) = hex.signature("ignored", 0, b"0", &[Bytes::from_static(b"hello")]).unwrap();
        assert_eq!(name, "x-opentrack-signature");
        assert_eq!(value, expected_hex);
        let b64 = signer(
            SignatureSpec::Hmac { header: "x-packsize-signature".into(), encoding: SignatureEncoding::Base64 },
            &["secret"],
        );
        let (_, value) = b64.signature("ignored", 0, b"0", &[Bytes::from_static(b"hello")]).unwrap();
        assert_eq!(B64.decode(value.as_bytes()).unwrap(), hex::decode(expected_hex).unwrap());
    }

    #[test]
    fn bad_secrets_and_headers_are_refused() {
        let bad = Secret("whsec_not base64!".into());
        assert_eq!(Signer::new(&SignatureSpec::Standard, &[&bad]).unwrap_err(), SigningError::MalformedSecret);
        let spec = SignatureSpec::Hmac { header: "content-type".into(), encoding: SignatureEncoding::Hex };
        assert!(matches!(Signer::new(&spec, &[&Secret("s".into())]), Err(SigningError::BadHeader(_))));
        assert!(signer(SignatureSpec::None, &[]).signature("id", 1, b"1", &[]).is_none());
        assert!(standard_key(&generate_secret()).is_ok());
    }
}
