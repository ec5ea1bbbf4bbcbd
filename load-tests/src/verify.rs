//! The sink's and the ideal loop's Standard Webhooks key: the client library's receiver-side
//! check (written from the specification, not from Herald's signing code, so it checks it),
//! with the sink's leniency about the `whsec_` prefix.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;

/// A receiver's verifier for one `whsec_` secret.
pub type Verifier = herald_client::verify::Standard;

/// Prepares the key of `secret` (`whsec_` + base64, or the base64 alone); `None` when it is
/// not base64.
pub fn verifier(secret: &str) -> Option<Verifier> {
    let key = B64.decode(secret.strip_prefix("whsec_").unwrap_or(secret)).ok()?;
    Some(Verifier::from_key(&key))
}
