//! What a receiver checks of a webhook Herald signed, with the receiver's copy of the secret.
//! Both checks compare in constant time and take the body exactly as received (bytes, not a
//! re-serialised document).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// How an `hmac` signature header is written (the subscription's `signature.encoding`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lowercase hex (OpenTrack's `X-OpenTrack-Signature`).
    Hex,
    /// Standard base64 (PackNet's `x-packsize-signature`, Punt Uit's `x-hook-signature`, the
    /// Automation API's `X-Signature`).
    Base64,
}

/// The `hmac` scheme: HMAC-SHA256 of the body with the secret, in the header the subscription
/// names. `signature` is that header's value.
/// An empty secret verifies nothing (Herald refuses one; anyone can sign with it).
pub fn hmac(secret: &str, body: &[u8], signature: &str, encoding: Encoding) -> bool {
    if secret.is_empty() {
        return false;
    }
    let given = match encoding {
        Encoding::Hex => hex::decode(signature.trim()),
        Encoding::Base64 => B64.decode(signature.trim()).map_err(|_| hex::FromHexError::InvalidStringLength),
    };
    let Ok(given) = given else { return false };
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// Why a Standard Webhooks signature is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The secret is not `whsec_<base64>` of at least [`MIN_KEY_BYTES`].
    #[error("the secret is not whsec_<base64> of at least 16 bytes")]
    Secret,
    /// `webhook-timestamp` is not a number of seconds.
    #[error("webhook-timestamp is not a number")]
    Timestamp,
    /// The timestamp is further from now than the tolerance (a replay, or a wrong clock).
    #[error("webhook-timestamp is {0} s from now")]
    Stale(i64),
    /// No signature in `webhook-signature` matches.
    #[error("no signature matches")]
    Signature,
}

/// A receiver's Standard Webhooks key, prepared once (a receiver checking many requests, or a
/// sender signing them, pays for the key's setup one time).
#[derive(Clone)]
pub struct Standard {
    mac: HmacSha256,
}

/// The shortest Standard Webhooks key Herald issues or takes: a shorter one — above all the
/// empty key of a secret that came out as `whsec_` (an unset variable) — is refused, since
/// anyone can sign with it.
pub const MIN_KEY_BYTES: usize = 16;

impl Standard {
    /// The key of a `whsec_<base64>` secret, of at least [`MIN_KEY_BYTES`].
    pub fn new(secret: &str) -> Result<Standard, Rejected> {
        let key = secret.strip_prefix("whsec_").and_then(|k| B64.decode(k).ok()).ok_or(Rejected::Secret)?;
        if key.len() < MIN_KEY_BYTES {
            return Err(Rejected::Secret);
        }
        Ok(Standard::from_key(&key))
    }

    /// The key from its bytes.
    pub fn from_key(key: &[u8]) -> Standard {
        Standard { mac: HmacSha256::new_from_slice(key).expect("any key length") }
    }

    fn mac_of(&self, id: &str, timestamp: &str, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        mac
    }

    /// The base64 signature of `id.timestamp.body` (what follows `v1,` in `webhook-signature`).
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        B64.encode(self.mac_of(id, timestamp, body).finalize().into_bytes())
    }

    /// Whether any `v1,<base64>` in `signatures` (several during a secret rotation) signs
    /// `id.timestamp.body`, compared in constant time. The timestamp is not judged here.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], signatures: &str) -> bool {
        let mac = self.mac_of(id, timestamp, body);
        signatures.split_whitespace().filter_map(|s| s.strip_prefix("v1,")).any(|sig| {
            let Ok(sig) = B64.decode(sig) else { return false };
            mac.clone().verify_slice(&sig).is_ok()
        })
    }
}

/// The `standard` scheme (Standard Webhooks): `webhook-signature` holds one or more
/// `v1,<base64>` signatures (several during a secret rotation) of `id.timestamp.body`; the
/// timestamp must be within `tolerance_s` of `now_s`.
pub fn standard(
    secret: &str,
    id: &str,
    timestamp: &str,
    body: &[u8],
    signatures: &str,
    now_s: i64,
    tolerance_s: i64,
) -> Result<(), Rejected> {
    let key = Standard::new(secret)?;
    let ts: i64 = timestamp.trim().parse().map_err(|_| Rejected::Timestamp)?;
    // A sender's timestamp may be anything: no arithmetic on it may overflow.
    if now_s.abs_diff(ts) > tolerance_s.unsigned_abs() {
        return Err(Rejected::Stale(now_s.saturating_sub(ts)));
    }
    key.verify(id, timestamp.trim(), body, signatures).then_some(()).ok_or(Rejected::Signature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_in_both_encodings_and_a_changed_byte_fails() {
        let body = br#"{"type":"x","data":{"i":1}}"#;
        let mut mac = HmacSha256::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        let tag = mac.finalize().into_bytes();
        assert!(hmac("s3cret", body, &hex::encode(tag), Encoding::Hex));
        assert!(hmac("s3cret", body, &B64.encode(tag), Encoding::Base64));
        assert!(!hmac("s3cret", br#"{"type":"x","data":{"i":2}}"#, &hex::encode(tag), Encoding::Hex));
        assert!(!hmac("other", body, &hex::encode(tag), Encoding::Hex));
        assert!(!hmac("s3cret", body, "not hex", Encoding::Hex));
    }

    #[test]
    fn standard_webhooks_accepts_any_listed_signature_within_the_tolerance() {
        let secret = format!("whsec_{}", B64.encode(b"0123456789abcdef0123456789abcdef"));
        let mut mac = HmacSha256::new_from_slice(b"0123456789abcdef0123456789abcdef").unwrap();
        mac.update(b"msg_1.1700000000.{}");
        let sig = format!("v1,{}", B64.encode(mac.finalize().into_bytes()));
        let both = format!("v1,AAAA {sig}");
        assert_eq!(standard(&secret, "msg_1", "1700000000", b"{}", &both, 1_700_000_100, 300), Ok(()));
        assert_eq!(
            standard(&secret, "msg_1", "1700000000", b"{}", &sig, 1_700_001_000, 300),
            Err(Rejected::Stale(1000))
        );
        assert_eq!(standard(&secret, "msg_2", "1700000000", b"{}", &sig, 1_700_000_000, 300), Err(Rejected::Signature));
        assert_eq!(standard("nope", "msg_1", "1700000000", b"{}", &sig, 1_700_000_000, 300), Err(Rejected::Secret));
        let far = standard(&secret, "msg_1", "-9223372036854775808", b"{}", &sig, 1_700_000_000, 300);
        assert!(matches!(far, Err(Rejected::Stale(_))), "{far:?}");
    }

    /// A receiver whose secret came out empty (an unset variable: `whsec_`, `""`) accepts
    /// nothing: anyone can compute an HMAC with an empty key, so a helper taking one accepted
    /// forgeries. Herald issues no Standard key under 16 bytes and no empty `hmac` secret.
    #[test]
    fn a_secret_herald_never_issues_verifies_nothing() {
        let forged = |key: &[u8]| {
            let mut mac = HmacSha256::new_from_slice(key).unwrap();
            mac.update(b"msg_1.1700000000.{}");
            format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
        };
        for (secret, key) in [("whsec_", &b""[..]), ("whsec_c2hvcnQ=", b"short")] {
            let sig = forged(key);
            assert_eq!(standard(secret, "msg_1", "1700000000", b"{}", &sig, 1_700_000_000, 300), Err(Rejected::Secret));
        }
        let mut mac = HmacSha256::new_from_slice(b"").unwrap();
        mac.update(b"{}");
        assert!(!hmac("", b"{}", &hex::encode(mac.finalize().into_bytes()), Encoding::Hex));
    }
}
