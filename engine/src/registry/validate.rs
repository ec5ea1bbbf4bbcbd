//! Validation: the one place that decides whether a subscription is acceptable, whether it
//! comes from the API (create or PATCH) or from the config file; every error names its field.

use super::Target;
use crate::config::HumanDuration;
use crate::model::{
    new_id, now_ms, rfc3339_ms, Auth, RetrySpec, SignatureSpec, Subscription, SubscriptionInput, TransportKind,
};
use crate::signing::generate_secret;
use crate::transport::guard::NetworkGuard;
use std::time::Duration;

/// A field that failed validation.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct Invalid {
    /// The field, as a JSON path (`url`, `headers.x-foo`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

pub(crate) fn invalid(field: impl Into<String>, message: impl Into<String>) -> Invalid {
    Invalid { field: field.into(), message: message.into() }
}

/// Request timeouts a subscription may choose.
const TIMEOUT_RANGE: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(300));

fn check_duration(field: &str, d: Option<HumanDuration>, (min, max): (Duration, Duration)) -> Result<(), Invalid> {
    match d {
        Some(d) if d.0 < min || d.0 > max => {
            Err(invalid(field, format!("must be between {} and {}", HumanDuration(min), HumanDuration(max))))
        }
        _ => Ok(()),
    }
}

/// Checks a new subscription and fills in what the server decides.
pub fn validate(input: SubscriptionInput, tenant: String, guard: &NetworkGuard) -> Result<Subscription, Invalid> {
    validate_tenant(&tenant)?;
    let mut input = input;
    // Through an edge device the target is reached from the customer's network, where
    // private addresses are the point: Herald's own network guard does not apply.
    let open = NetworkGuard::new(vec!["0.0.0.0/0".parse().expect("net"), "::/0".parse().expect("net")]);
    let guard = match &input.via_edge {
        Some(d) if d.is_empty() || d.len() > 64 => return Err(invalid("via_edge", "must name an edge device")),
        Some(_) => &open,
        None => guard,
    };
    match input.transport {
        TransportKind::Webhook => {
            if input.amqp.is_some() {
                return Err(invalid("amqp", "only valid with transport \"amqp\""));
            }
        }
        TransportKind::Amqp => {
            let target = input
                .amqp
                .as_ref()
                .ok_or_else(|| invalid("amqp", "transport \"amqp\" needs amqp.uri and amqp.exchange"))?;
            crate::transport::amqp::validate(target).map_err(|(field, message)| invalid(field, message))?;
            if input.url.is_empty() {
                // The label of an AMQP subscription: broker and exchange, never the password.
                let mut uri = url::Url::parse(target.uri.expose()).map_err(|e| invalid("amqp.uri", e.to_string()))?;
                let _ = uri.set_password(None);
                let _ = uri.set_username("");
                input.url = format!("{}{}", uri.as_str().trim_end_matches('/'), format_args!("/{}", target.exchange));
            }
            validate_amqp_host(target, guard)?;
            return finish(input, tenant);
        }
    }
    if input.url.is_empty() {
        return Err(invalid("url", "required"));
    }
    let url = url::Url::parse(&input.url).map_err(|e| invalid("url", format!("not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(invalid("url", "must be an http or https URL"));
    }
    let host = url.host_str().ok_or_else(|| invalid("url", "must have a host"))?;
    guard.check_host(host).map_err(|e| invalid("url", e.to_string()))?;
    if input.url.len() > 2048 {
        return Err(invalid("url", "must be at most 2048 characters"));
    }
    if let Some(tls) = &input.tls {
        crate::transport::tls::client_config(Some(tls)).map_err(|e| invalid(e.field, e.message))?;
    }
    if let Auth::Oauth2 { grant, token_url, client_secret, username, password, .. } = &input.auth {
        let url = url::Url::parse(token_url).map_err(|e| invalid("auth.token_url", format!("not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(invalid("auth.token_url", "must be an http or https URL with a host"));
        }
        guard.check_host(url.host_str().unwrap_or_default()).map_err(|e| invalid("auth.token_url", e.to_string()))?;
        match grant.as_str() {
            "password" if username.is_none() || password.is_none() => {
                return Err(invalid("auth.username", "the password grant needs username and password"))
            }
            "client_credentials" if client_secret.is_none() => {
                return Err(invalid("auth.client_secret", "the client_credentials grant needs client_secret"))
            }
            "password" | "client_credentials" => {}
            _ => return Err(invalid("auth.grant", "must be \"password\" or \"client_credentials\"")),
        }
    }
    finish(input, tenant)
}

fn validate_amqp_host(target: &crate::model::AmqpTarget, guard: &NetworkGuard) -> Result<(), Invalid> {
    let uri = url::Url::parse(target.uri.expose()).map_err(|e| invalid("amqp.uri", e.to_string()))?;
    guard.check_host(uri.host_str().unwrap_or_default()).map_err(|e| invalid("amqp.uri", e.to_string()))
}

/// The checks every transport shares, then the stored form.
fn finish(input: SubscriptionInput, tenant: String) -> Result<Subscription, Invalid> {
    for (i, e) in input.events.iter().enumerate() {
        if e.is_empty() || e.len() > 256 {
            return Err(invalid(format!("events[{i}]"), "event types are 1 to 256 characters"));
        }
    }
    if input.key.as_ref().is_some_and(|k| k.expose().is_empty()) {
        return Err(invalid("key", "must not be empty"));
    }
    check_duration("timeout", input.timeout, TIMEOUT_RANGE)?;
    match &input.retry {
        Some(RetrySpec::Fixed { interval, max_attempts }) => {
            check_duration("retry.interval", Some(*interval), (Duration::from_millis(1), Duration::from_secs(86_400)))?;
            if !(1..=1000).contains(max_attempts) {
                return Err(invalid("retry.max_attempts", "must be between 1 and 1000"));
            }
        }
        Some(RetrySpec::Exponential { multiplier, jitter, max_attempts, .. }) => {
            if multiplier.is_some_and(|m| !(1.0..=10.0).contains(&m)) {
                return Err(invalid("retry.multiplier", "must be between 1 and 10"));
            }
            if jitter.is_some_and(|j| !(0.0..=1.0).contains(&j)) {
                return Err(invalid("retry.jitter", "must be between 0 and 1"));
            }
            if max_attempts.is_some_and(|m| !(1..=1000).contains(&m)) {
                return Err(invalid("retry.max_attempts", "must be between 1 and 1000"));
            }
        }
        None => {}
    }
    if input.max_in_flight.is_some_and(|m| m == 0 || m > 10_000) {
        return Err(invalid("max_in_flight", "must be between 1 and 10000"));
    }
    if input.rate_limit.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        return Err(invalid("rate_limit", "must be a positive number of deliveries per second"));
    }
    let secret = match (input.secret, &input.signature) {
        (Some(s), _) => s,
        (None, _) => generate_secret(),
    };
    let now = rfc3339_ms(now_ms());
    let sub = Subscription {
        id: new_id("sub"),
        tenant,
        url: input.url,
        events: input.events,
        transport: input.transport,
        secret,
        previous_secret: None,
        previous_secret_until: None,
        signature: input.signature,
        payload: input.payload,
        headers: input.headers,
        key: input.key,
        timeout: input.timeout,
        auth: input.auth,
        tls: input.tls,
        amqp: input.amqp,
        retry: input.retry,
        max_in_flight: input.max_in_flight,
        rate_limit: input.rate_limit,
        enabled: input.enabled.unwrap_or(true),
        via_edge: input.via_edge,
        disabled_reason: None,
        created_at: now.clone(),
        updated_at: now,
    };
    // Compiling checks the secret against the scheme, the headers and the URL once more.
    Target::compile(sub.clone())?;
    if matches!(sub.signature, SignatureSpec::Standard)
        && !sub.secret.expose().starts_with(crate::signing::SECRET_PREFIX)
    {
        return Err(invalid("secret", "a standard-scheme secret must start with \"whsec_\""));
    }
    Ok(sub)
}

/// Tenant names: 1 to 64 of letters, digits, `-`, `_`, `.`.
pub fn validate_tenant(tenant: &str) -> Result<(), Invalid> {
    let ok = !tenant.is_empty()
        && tenant.len() <= 64
        && tenant.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid("tenant", "must be 1 to 64 letters, digits, '-', '_' or '.'"))
    }
}

/// Id prefix of subscriptions declared in the config file.
pub const STATIC_PREFIX: &str = "static-";

/// A config-file webhook as a creation request: HMAC in `X-Signature`, raw payloads.
pub(super) fn static_input(w: &crate::config::StaticWebhook) -> SubscriptionInput {
    use crate::model::{PayloadFormat, Secret, SignatureEncoding, TlsOptions};
    let tls = (w.trust_all || w.trust_file.is_some() || w.client_cert.is_some()).then(|| TlsOptions {
        ca_file: w.trust_file.clone(),
        client_cert_file: w.client_cert.clone(),
        client_key_file: w.key_file.clone(),
        key_password: w.key_password.clone().map(Secret),
        trust_all: w.trust_all,
    });
    let encoding =
        if w.signature_encoding.as_deref() == Some("hex") { SignatureEncoding::Hex } else { SignatureEncoding::Base64 };
    let (signature, secret) = match &w.secret {
        Some(s) => (SignatureSpec::Hmac { header: "X-Signature".into(), encoding }, Some(Secret(s.clone()))),
        None => (SignatureSpec::None, None),
    };
    SubscriptionInput {
        tenant: w.tenant.clone(),
        url: w.endpoint.clone(),
        events: w.events.clone(),
        transport: TransportKind::Webhook,
        secret,
        signature,
        payload: PayloadFormat::Raw,
        headers: Default::default(),
        key: w.key.clone().map(Secret),
        timeout: Some(w.connection_timeout.unwrap_or(HumanDuration(Duration::from_secs(30)))),
        auth: Auth::None,
        tls,
        amqp: None,
        retry: None,
        max_in_flight: None,
        rate_limit: None,
        enabled: Some(w.enabled),
        via_edge: None,
    }
}
