//! Secrets: text that must never be shown by accident. A [`Secret`] prints as `<redacted>` in
//! `Debug` and serializes as `"********"`, unless the code serializing it says what it is
//! writing: [`revealing`] for the text itself (an edge agent's instructions, a cache key), or
//! [`storing`] for the stored form (the catalog), which is sealed with the operator's key when
//! one is installed (XChaCha20-Poly1305; `sealed:v1:` + base64 of nonce and ciphertext). So a
//! secret field added to any type is redacted in every view and encrypted at rest without
//! anyone remembering to.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, RwLock};

/// What a secret serializes as in views.
pub const REDACTED: &str = "********";

/// The prefix of a sealed secret in the stored form.
const SEALED: &str = "sealed:v1:";

/// Why a record holding a sealed secret cannot be read: no installed key opens it.
pub const UNOPENED: &str = "a sealed secret that no installed key opens (HERALD_SECRET_KEY)";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    View,
    Plain,
    Store,
}

thread_local! {
    /// How secrets on this thread serialize now. Set only inside [`revealing`] or [`storing`],
    /// around a synchronous serialization, so no other code on the thread can see it set.
    static MODE: Cell<Mode> = const { Cell::new(Mode::View) };
}

fn with_mode<T>(mode: Mode, f: impl FnOnce() -> T) -> T {
    struct Restore(Mode);
    impl Drop for Restore {
        fn drop(&mut self) {
            MODE.set(self.0);
        }
    }
    let _restore = Restore(MODE.replace(mode));
    f()
}

/// Runs `f` (a serialization) with secrets written as their text.
pub fn revealing<T>(f: impl FnOnce() -> T) -> T {
    with_mode(Mode::Plain, f)
}

/// Runs `f` (a serialization) with secrets in their stored form: sealed when a key is
/// installed, their text otherwise.
pub fn storing<T>(f: impl FnOnce() -> T) -> T {
    with_mode(Mode::Store, f)
}

/// Runs `f` (a deserialization of a stored record, the catalog's) with sealed secrets opened.
/// Anywhere else a sealed form is refused: a tenant sending one back through the API (from a
/// backup, the catalog's files, Kafka's topic) would otherwise have it opened with the
/// operator's key — and its text delivered to the tenant's own endpoint, or shown to it.
pub fn reading_stored<T>(f: impl FnOnce() -> T) -> T {
    with_mode(Mode::Store, f)
}

/// Whether secrets are being redacted now: for fields that views leave out entirely (the
/// signing secret) rather than show as `********`.
pub fn redacting<T>(_: &T) -> bool {
    MODE.get() == Mode::View
}

/// The operator's keys: the current one seals, every one opens (the previous ones during a
/// rotation).
pub struct Keys {
    current: XChaCha20Poly1305,
    all: Vec<XChaCha20Poly1305>,
}

/// Why a key is not usable.
#[derive(Debug, thiserror::Error)]
#[error("a secret key must be 32 bytes, base64-encoded (e.g. `openssl rand -base64 32`)")]
pub struct BadKey;

impl Keys {
    /// Keys from base64 text: `current`, and `previous` ones that still open what they sealed.
    pub fn new(current: &str, previous: &[String]) -> Result<Keys, BadKey> {
        let key = |text: &str| {
            let bytes = crate::config::Config::secret_key_bytes(text).ok_or(BadKey)?;
            XChaCha20Poly1305::new_from_slice(&bytes).map_err(|_| BadKey)
        };
        let current = key(current)?;
        let mut all = vec![current.clone()];
        for p in previous {
            all.push(key(p)?);
        }
        Ok(Keys { current, all })
    }

    fn seal(&self, text: &str) -> String {
        let mut nonce = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self.current.encrypt(XNonce::from_slice(&nonce), text.as_bytes()).expect("sealing cannot fail");
        let mut out = nonce.to_vec();
        out.extend(sealed);
        format!("{SEALED}{}", B64.encode(out))
    }

    fn open(&self, sealed: &str) -> Option<String> {
        let bytes = B64.decode(sealed).ok()?;
        let (nonce, body) = (bytes.get(..24)?, bytes.get(24..)?);
        self.all
            .iter()
            .find_map(|k| k.decrypt(XNonce::from_slice(nonce), body).ok())
            .and_then(|t| String::from_utf8(t).ok())
    }
}

/// The installed keys (set once at start by `herald serve`, or never: plain text).
static KEYS: RwLock<Option<Arc<Keys>>> = RwLock::new(None);

/// Installs the keys secrets are sealed with from now on (`None`: stored as text).
pub fn install(keys: Option<Keys>) {
    *KEYS.write().unwrap() = keys.map(Arc::new);
}

fn keys() -> Option<Arc<Keys>> {
    KEYS.read().unwrap().clone()
}

/// Whether `stored` (a secret's stored form) was sealed with the current key: records that are
/// not are rewritten at start, after a key is set or rotated.
pub fn sealed_with_current(stored: &str) -> bool {
    match (keys(), stored.strip_prefix(SEALED)) {
        (Some(k), Some(sealed)) => B64
            .decode(sealed)
            .ok()
            .and_then(|b| Some(k.current.decrypt(XNonce::from_slice(b.get(..24)?), b.get(24..)?).is_ok()))
            .unwrap_or(false),
        (None, _) => true,
        (Some(_), None) => false,
    }
}

/// A secret string.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl Secret {
    /// The secret's text, for the code that uses it (signing, authenticating, connecting).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether this is the placeholder a view shows, sent back as if it were the secret.
    pub fn is_placeholder(&self) -> bool {
        self.0 == REDACTED
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match MODE.get() {
            Mode::View => s.serialize_str(REDACTED),
            Mode::Plain => s.serialize_str(&self.0),
            Mode::Store => match keys() {
                Some(k) => s.serialize_str(&k.seal(&self.0)),
                None => s.serialize_str(&self.0),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    /// The text; a sealed one opened with the installed keys, only inside [`reading_stored`].
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.strip_prefix(SEALED) {
            None => Ok(Secret(text)),
            Some(_) if MODE.get() != Mode::Store => Err(serde::de::Error::custom(format!(
                "a secret in its sealed form (`{SEALED}…`) is not taken: give the secret itself"
            ))),
            Some(sealed) => {
                keys().and_then(|k| k.open(sealed)).map(Secret).ok_or_else(|| serde::de::Error::custom(UNOPENED))
            }
        }
    }
}

/// Serializes a URI secret (an AMQP broker URI) with only its password redacted in views, so
/// the broker and virtual host stay visible.
pub fn uri_with_password_redacted<S: Serializer>(uri: &Secret, s: S) -> Result<S::Ok, S::Error> {
    if MODE.get() != Mode::View {
        return uri.serialize(s);
    }
    match url::Url::parse(uri.expose()) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some(REDACTED));
            }
            s.serialize_str(u.as_str())
        }
        Err(_) => s.serialize_str(REDACTED),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize)]
    struct Holder {
        plain: String,
        secret: Secret,
        #[serde(skip_serializing_if = "redacting")]
        hidden: Secret,
        #[serde(serialize_with = "uri_with_password_redacted")]
        uri: Secret,
    }

    #[test]
    fn secrets_are_redacted_unless_revealed_on_purpose() {
        let h = Holder {
            plain: "p".into(),
            secret: Secret("s3cr3t".into()),
            hidden: Secret("h1dden".into()),
            uri: Secret("amqp://user:pw@broker/vh".into()),
        };
        let view = serde_json::to_string(&h).unwrap();
        assert_eq!(view, r#"{"plain":"p","secret":"********","uri":"amqp://user:********@broker/vh"}"#);
        let stored = revealing(|| serde_json::to_string(&h).unwrap());
        assert!(stored.contains("s3cr3t") && stored.contains("h1dden") && stored.contains(":pw@"), "{stored}");
        // Revealing ends with the closure, even when it panics.
        assert_eq!(serde_json::to_string(&h).unwrap(), view);
        let _ = std::panic::catch_unwind(|| revealing(|| panic!("boom")));
        assert_eq!(serde_json::to_string(&h).unwrap(), view);
        assert_eq!(format!("{:?}", h.secret), "Secret(<redacted>)");
    }

    #[test]
    fn sealed_secrets_open_with_the_current_or_a_previous_key() {
        let (old, new) = (B64.encode([7u8; 32]), B64.encode([9u8; 32]));
        let sealed_by_old = {
            let k = Keys::new(&old, &[]).unwrap();
            k.seal("s3cr3t")
        };
        let keys = Keys::new(&new, std::slice::from_ref(&old)).unwrap();
        assert_eq!(keys.open(sealed_by_old.strip_prefix(SEALED).unwrap()).as_deref(), Some("s3cr3t"));
        let sealed = keys.seal("s3cr3t");
        assert!(!sealed.contains("s3cr3t") && sealed != keys.seal("s3cr3t"), "random nonces");
        assert!(Keys::new(&old, &[]).unwrap().open(sealed.strip_prefix(SEALED).unwrap()).is_none());
        assert!(Keys::new("too short", &[]).is_err());
    }
}
