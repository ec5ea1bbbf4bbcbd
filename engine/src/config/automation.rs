//! The Automation API's `webHook` section, accepted exactly as its integration guide writes it
//! (in a JSON config file, or as `[webHook]` in TOML), and read as one static webhook: the
//! same meaning, so an operator can paste the section they already have.
//!
//! The one difference: the guide's product trusts every TLS certificate unless told
//! otherwise; Herald verifies certificates unless `useSslTrustAll` is `true`, and says so once
//! at start when the section leaves it out.

use super::{HumanDuration, Spelling, StaticWebhook};
use serde::{Deserialize, Deserializer, Serialize};
use std::time::Duration;

/// The guide's `"webHook": {…}`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AutomationWebHook {
    /// Whether notifications are sent.
    #[serde(default)]
    pub enabled: bool,
    /// The receiver's URL.
    pub endpoint: String,
    /// Appended as `?key=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Milliseconds as a number (the guide's unit), or a duration string (`"30s"`, `"PT30S"`).
    #[serde(default, deserialize_with = "millis_or_duration", skip_serializing_if = "Option::is_none")]
    pub connection_timeout: Option<HumanDuration>,
    /// HMAC-SHA256 secret of `X-Signature` (base64 of the digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Accept any server certificate. Absent means `false` in Herald (the guide's default is
    /// `true`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_ssl_trust_all: Option<bool>,
    /// Present `sslKeyFile` as the client certificate.
    #[serde(default)]
    pub use_ssl_client_cert: bool,
    /// CA certificates (PEM) to trust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_trust_file: Option<String>,
    /// The client certificate and key: PKCS#12 (with `sslKeyPassword`) or PEM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_file: Option<String>,
    /// The password of `sslKeyFile`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_key_password: Option<String>,
}

/// The name the section's subscription is kept under (`static-webHook`).
pub const NAME: &str = "webHook";

impl AutomationWebHook {
    /// The static webhook this section means: raw payloads signed into `X-Signature`.
    pub fn to_static(&self) -> StaticWebhook {
        if self.use_ssl_trust_all.is_none() {
            tracing::warn!(
                "webHook: useSslTrustAll is not set; unlike the Automation API's own default, Herald verifies the \
                 receiver's TLS certificate (set \"useSslTrustAll\": true to accept any)"
            );
        }
        let client_cert = self.use_ssl_client_cert.then(|| self.ssl_key_file.clone()).flatten();
        StaticWebhook {
            name: NAME.into(),
            tenant: None,
            enabled: self.enabled,
            endpoint: self.endpoint.clone(),
            key: self.key.clone(),
            connection_timeout: self.connection_timeout,
            secret: self.secret.clone(),
            signature_encoding: None,
            events: Vec::new(),
            trust_all: self.use_ssl_trust_all.unwrap_or(false),
            trust_file: self.ssl_trust_file.clone(),
            key_password: client_cert.as_ref().and(self.ssl_key_password.clone()),
            client_cert,
            key_file: None,
            spelling: Spelling::AutomationApi,
        }
    }
}

/// The guide's field for a subscription field, for error messages.
pub(super) fn setting(field: &str) -> &str {
    match field {
        "url" => "endpoint",
        "timeout" => "connectionTimeout",
        "tls.ca_file" => "sslTrustFile",
        "tls.client_cert_file" | "tls.client_key_file" => "sslKeyFile",
        "tls.key_password" => "sslKeyPassword",
        "tls.trust_all" => "useSslTrustAll",
        other => other,
    }
}

fn millis_or_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<HumanDuration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Given {
        Millis(u64),
        Text(String),
    }
    Ok(Some(match Given::deserialize(d)? {
        Given::Millis(ms) => HumanDuration(Duration::from_millis(ms)),
        Given::Text(t) => t.parse().map_err(serde::de::Error::custom)?,
    }))
}

impl std::fmt::Debug for AutomationWebHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        super::redacted("AutomationWebHook", self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guides_section_reads_as_a_static_webhook() {
        let section: AutomationWebHook = serde_json::from_str(
            r#"{"enabled": true, "endpoint": "https://erp.example/hook", "key": "k1", "connectionTimeout": 5000,
                "secret": "s3cret", "useSslTrustAll": false, "useSslClientCert": true,
                "sslTrustFile": "/etc/ca.pem", "sslKeyFile": "/etc/client.p12", "sslKeyPassword": "pw"}"#,
        )
        .unwrap();
        let hook = section.to_static();
        assert_eq!(hook.endpoint, "https://erp.example/hook");
        assert_eq!(hook.key.as_deref(), Some("k1"));
        assert_eq!(hook.connection_timeout, Some(HumanDuration(Duration::from_secs(5))));
        assert_eq!(hook.client_cert.as_deref(), Some("/etc/client.p12"));
        assert_eq!(hook.key_password.as_deref(), Some("pw"));
        assert!(!hook.trust_all);
        // Without the client-certificate switch the key file is not presented.
        let plain: AutomationWebHook =
            serde_json::from_str(r#"{"endpoint": "https://x.example/", "sslKeyFile": "/k.p12"}"#).unwrap();
        let hook = plain.to_static();
        assert!(hook.client_cert.is_none() && !hook.enabled && !hook.trust_all);
    }
}
