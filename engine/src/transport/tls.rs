//! TLS profiles of webhook connections: which roots to trust (webpki roots, plus a custom CA
//! file), which client certificate to present (PEM certificate and key, or PKCS#12 with a
//! password), or, only when explicitly asked, no server verification at all.

use crate::model::TlsOptions;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::Arc;

/// A TLS setting that cannot be used, naming its field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct TlsError {
    /// The field (`tls.ca_file`, …).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> TlsError {
    TlsError { field, message: message.into() }
}

/// What identifies a TLS profile: subscriptions with equal profiles share a client pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ProfileKey {
    ca_file: Option<String>,
    client_cert_file: Option<String>,
    client_key_file: Option<String>,
    key_password: Option<String>,
    trust_all: bool,
}

impl ProfileKey {
    /// The profile of a subscription's options.
    pub fn of(opts: &TlsOptions) -> Self {
        ProfileKey {
            ca_file: opts.ca_file.clone(),
            client_cert_file: opts.client_cert_file.clone(),
            client_key_file: opts.client_key_file.clone(),
            key_password: opts.key_password.as_ref().map(|p| p.expose().to_string()),
            trust_all: opts.trust_all,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| bad(field, format!("cannot read {path}: {e}")))
}

/// The client certificate chain and key of `opts`, if it names one.
fn client_identity(
    opts: &TlsOptions,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let Some(cert_file) = &opts.client_cert_file else {
        if opts.client_key_file.is_some() {
            return Err(bad("tls.client_cert_file", "a client key needs its certificate"));
        }
        return Ok(None);
    };
    let bytes = read("tls.client_cert_file", cert_file)?;
    let is_pem = bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ");
    if !is_pem {
        // PKCS#12: certificate chain and key in one file, opened with key_password.
        let password = opts.key_password.as_ref().map_or("", |p| p.expose());
        let store = p12_keystore::KeyStore::from_pkcs12(&bytes, password, p12_keystore::Pkcs12ImportPolicy::Strict)
            .map_err(|e| bad("tls.key_password", format!("cannot open the PKCS#12 file {cert_file}: {e}")))?;
        let (_, chain) =
            store.private_key_chain().ok_or_else(|| bad("tls.client_cert_file", "the PKCS#12 file holds no key"))?;
        let certs = chain.certs().iter().map(|c| CertificateDer::from(c.as_der().to_vec())).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
        return Ok(Some((certs, key)));
    }
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.client_cert_file", format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad("tls.client_cert_file", "holds no certificate"));
    }
    let key_file = opts
        .client_key_file
        .as_ref()
        .ok_or_else(|| bad("tls.client_key_file", "a PEM client certificate needs its key file"))?;
    let key = PrivateKeyDer::from_pem_slice(&read("tls.client_key_file", key_file)?)
        .map_err(|e| bad("tls.client_key_file", format!("not an unencrypted PEM private key: {e}")))?;
    Ok(Some((certs, key)))
}

/// The rustls configuration of a TLS profile (`None`: defaults).
pub fn client_config(opts: Option<&TlsOptions>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let default = TlsOptions::default();
    let opts = opts.unwrap_or(&default);
    let builder = if opts.trust_all {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(TrustAll(provider())))
    } else {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        if let Some(ca_file) = &opts.ca_file {
            let pem = read("tls.ca_file", ca_file)?;
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad("tls.ca_file", format!("not a PEM certificate: {e}")))?;
                roots.add(cert).map_err(|e| bad("tls.ca_file", format!("unusable CA certificate: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(bad("tls.ca_file", format!("{ca_file} holds no certificate")));
            }
        }
        builder.with_root_certificates(roots)
    };
    match client_identity(opts)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad("tls.client_key_file", format!("the key does not fit the certificate: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// Accepts any server certificate: only for `trust_all`, which the operator set explicitly
/// and is warned about at every start. Handshake signatures are still checked.
#[derive(Debug)]
struct TrustAll(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for TrustAll {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
