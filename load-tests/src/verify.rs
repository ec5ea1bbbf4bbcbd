//! Receiver-side Standard Webhooks verification, written from the specification (it does
//! not call Herald's signing code, so it checks it).

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A receiver's verifier for one `whsec_` secret.
#[derive(Clone)]
pub struct Verifier {
    mac: Hmac<Sha256>,
}

impl Verifier {
    /// Prepares the key; `None` when the secret is not `whsec_` + base64.
    pub fn new(secret: &str) -> Option<Verifier> {
        let key = B64.decode(secret.strip_prefix("whsec_").unwrap_or(secret)).ok()?;
        Some(Verifier { mac: Hmac::new_from_slice(&key).ok()? })
    }

    /// The base64 signature of `id.timestamp.body` (what follows `v1,`).
    pub fn sign(&self, id: &str, timestamp: &str, body: &[u8]) -> String {
        let mut mac = self.mac.clone();
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.as_bytes());
        mac.update(b".");
        mac.update(body);
        B64.encode(mac.finalize().into_bytes())
    }

    /// Whether any `v1,` signature in `header` matches `id.timestamp.body`.
    pub fn verify(&self, id: &str, timestamp: &str, body: &[u8], header: &str) -> bool {
        let expected = self.sign(id, timestamp, body);
        header.split(' ').filter_map(|s| s.strip_prefix("v1,")).any(|s| s == expected)
    }
}
