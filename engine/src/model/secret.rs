//! Secrets: text that must never be shown by accident. A [`Secret`] prints as `<redacted>` in
//! `Debug` and serializes as `"********"`, unless the code serializing it says, with
//! [`revealing`], that it is writing the stored form (the registry topic, an edge agent's
//! instructions). So a secret field added to any type is redacted in every API view without
//! anyone remembering to.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::cell::Cell;
use std::fmt;

/// What a secret serializes as in views.
pub const REDACTED: &str = "********";

thread_local! {
    /// Whether secrets on this thread serialize as their text. Set only inside [`revealing`],
    /// around a synchronous serialization, so no other code on the thread can see it set.
    static REVEAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` (a serialization) with secrets written as their text: the stored form.
pub fn revealing<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            REVEAL.set(self.0);
        }
    }
    let _restore = Restore(REVEAL.replace(true));
    f()
}

/// Whether secrets are being redacted now: for fields that views leave out entirely (the
/// signing secret) rather than show as `********`.
pub fn redacting<T>(_: &T) -> bool {
    !REVEAL.get()
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
        if REVEAL.get() {
            s.serialize_str(&self.0)
        } else {
            s.serialize_str(REDACTED)
        }
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret)
    }
}

/// Serializes a URI secret (an AMQP broker URI) with only its password redacted in views, so
/// the broker and virtual host stay visible.
pub fn uri_with_password_redacted<S: Serializer>(uri: &Secret, s: S) -> Result<S::Ok, S::Error> {
    if REVEAL.get() {
        return s.serialize_str(uri.expose());
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
}
