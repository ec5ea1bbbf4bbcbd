//! Checking signatures as a receiver would, with code written from the specifications (none of
//! Herald's signing code), so the checks check it.

use super::Received;
use herald_load_tests::verify::Verifier;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A Standard Webhooks check of `whsec_` secret `secret` over a received request.
pub fn standard(secret: &str) -> impl Fn(&Received) -> bool {
    let v = Verifier::new(secret).expect("a whsec_ secret");
    move |r| v.verify(r.header("webhook-id"), r.header("webhook-timestamp"), &r.body, r.header("webhook-signature"))
}

/// HMAC-SHA256 of `body` keyed with `key`: the `hmac` scheme's signature before encoding.
pub fn hmac_sha256(key: &[u8], body: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(body);
    mac.finalize().into_bytes().to_vec()
}
