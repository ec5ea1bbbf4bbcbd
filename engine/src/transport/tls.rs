//! TLS profiles of webhook connections: which roots to trust (webpki roots, plus CA
//! certificates the subscription gives), which client certificate to present (PEM certificate
//! and key, or PKCS#12 with a password), or, only when explicitly asked, no server
//! verification at all.
//!
//! Material comes as content in the subscription (from a tenant, at most [`MAX_INLINE`] bytes a
//! field). Files
//! are read only under the operator's `tls.files_dir` (canonicalized, so `..` and links cannot
//! leave it), and never more than [`MAX_MATERIAL`] bytes of one (a device file cannot hang a
//! request).

use crate::model::TlsOptions;
use base64::Engine;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The most bytes of TLS material read from one of the operator's files.
pub const MAX_MATERIAL: u64 = 1 << 20;

/// The most bytes of PEM in one of a subscription's content fields that a tenant may send (a
/// chain of a few dozen certificates): it is kept in every process's memory with the
/// subscription, so not a whole file's worth. Checked on the API's input only
/// (`registry::validate::check_tenant_input`): subscriptions stored before it, and the
/// config file's static webhooks (whose files are read into content), keep working.
pub const MAX_INLINE: usize = 64 << 10;

/// Base64 characters of `tls.client_p12` at most (48 KiB of file).
const MAX_P12_BASE64: usize = 64 << 10;

/// A TLS setting that cannot be used, naming its field.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct TlsError {
    /// The field (`tls.ca_pem`, …).
    pub field: &'static str,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> TlsError {
    TlsError { field, message: message.into() }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads at most [`MAX_MATERIAL`] bytes of `path`, which must lie under `dir` (the operator's
/// `tls.files_dir`). Errors do not tell a tenant whether a file outside it exists.
pub fn read_under(field: &'static str, path: &str, dir: Option<&Path>) -> Result<Vec<u8>, TlsError> {
    let Some(dir) = dir else {
        return Err(bad(field, "files on Herald's server cannot be named here; send the content instead (PEM)"));
    };
    let Some((_, real)) = within(dir, path).filter(|(_, real)| real.is_file()) else { return Err(not_under(field)) };
    read_at_most(&real).map_err(|e| match e {
        Unread::Io(_) => not_under(field),
        Unread::Over => bad(field, format!("larger than {MAX_MATERIAL} bytes")),
    })
}

/// A tenant's file that is not there to read: said the same whatever the reason, and without
/// where the directory lies on the server (tenants name files relative to it).
fn not_under(field: &'static str) -> TlsError {
    bad(field, "must name a readable file under the TLS directory (`http.tls_files_dir`)")
}

/// Why a file could not be read whole.
enum Unread {
    Io(std::io::Error),
    /// Larger than [`MAX_MATERIAL`].
    Over,
}

/// At most [`MAX_MATERIAL`] bytes of `path`.
fn read_at_most(path: &Path) -> Result<Vec<u8>, Unread> {
    let file = std::fs::File::open(path).map_err(Unread::Io)?;
    let mut bytes = Vec::new();
    file.take(MAX_MATERIAL + 1).read_to_end(&mut bytes).map_err(Unread::Io)?;
    if bytes.len() as u64 > MAX_MATERIAL {
        return Err(Unread::Over);
    }
    Ok(bytes)
}

/// What the files a profile names were when looked at: their paths under `dir`, each with its
/// length and modification time (`None`: not readable then). A file replaced in place — a
/// certificate renewed before the old one expires — differs, and its profile is built again.
pub fn file_stamps(opts: &TlsOptions, dir: Option<&Path>) -> Vec<(PathBuf, Option<(u64, std::time::SystemTime)>)> {
    let Some(dir) = dir else { return Vec::new() };
    [&opts.ca_file, &opts.client_cert_file, &opts.client_key_file]
        .into_iter()
        .flatten()
        .map(|path| {
            let path = dir.join(path);
            let stamp = std::fs::metadata(&path).ok().and_then(|m| Some((m.len(), m.modified().ok()?)));
            (path, stamp)
        })
        .collect()
}

/// `dir` and `path` under it, both canonical (so `..` and links cannot leave it), if `path`
/// exists and lies in `dir`.
fn within(dir: &Path, path: &str) -> Option<(PathBuf, PathBuf)> {
    let root = dir.canonicalize().ok()?;
    let real = root.join(path).canonicalize().ok()?;
    real.starts_with(&root).then_some((root, real))
}

/// The first-level folder of `dir` that file `path` lies in, resolved as opening it would
/// resolve it (`..`, links, an absolute path): none for a file that is not there, or not
/// under `dir`.
pub fn folder_under(dir: &Path, path: &str) -> Option<String> {
    let (root, real) = within(dir, path)?;
    real.strip_prefix(&root).ok()?.components().next()?.as_os_str().to_str().map(String::from)
}

/// Reads at most [`MAX_MATERIAL`] bytes of the operator's own file `path`.
pub fn read_bounded(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    read_at_most(path).map_err(|e| match e {
        Unread::Io(e) => bad(field, format!("cannot read {}: {e}", path.display())),
        Unread::Over => bad(field, format!("larger than {MAX_MATERIAL} bytes")),
    })
}

/// The bytes of one piece of material: the content field, else the file field (under `dir`).
fn material(
    content: Option<&[u8]>,
    (content_field, file_field): (&'static str, &'static str),
    file: Option<&String>,
    dir: Option<&Path>,
) -> Result<Option<Vec<u8>>, TlsError> {
    match (content, file) {
        (Some(c), _) if c.len() as u64 > MAX_MATERIAL => {
            Err(bad(content_field, format!("larger than {MAX_MATERIAL} bytes")))
        }
        (Some(c), None) => Ok(Some(c.to_vec())),
        (Some(_), Some(_)) => Err(bad(file_field, format!("give {content_field} or {file_field}, not both"))),
        (None, Some(path)) => read_under(file_field, path, dir).map(Some),
        (None, None) => Ok(None),
    }
}

/// The client certificate chain and key of `opts`, if it has one.
fn client_identity(
    opts: &TlsOptions,
    dir: Option<&Path>,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let password = opts.key_password.as_ref().map_or("", |p| p.expose());
    let p12 = match &opts.client_p12 {
        // A client's file is a few KiB; what opening one asks for is counted below (`p12`).
        Some(b64) if b64.expose().len() > MAX_P12_BASE64 => {
            return Err(bad("tls.client_p12", format!("larger than {} bytes", MAX_P12_BASE64 / 4 * 3)))
        }
        Some(b64) => Some(
            base64::engine::general_purpose::STANDARD
                .decode(b64.expose().trim())
                .map_err(|_| bad("tls.client_p12", "must be base64 of a PKCS#12 file"))?,
        ),
        None => None,
    };
    let cert = material(
        opts.client_cert_pem.as_deref().map(str::as_bytes),
        ("tls.client_cert_pem", "tls.client_cert_file"),
        opts.client_cert_file.as_ref(),
        dir,
    )?;
    let is_pkcs12 = |bytes: &[u8]| !(bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN "));
    let (p12, cert) = match (p12, cert) {
        (Some(_), Some(_)) => return Err(bad("tls.client_p12", "give client_p12 or a PEM certificate, not both")),
        // A PKCS#12 file named by client_cert_file (as the Automation API's guide has it).
        (None, Some(c)) if is_pkcs12(&c) => (Some(c), None),
        other => other,
    };
    if let Some(p12) = p12 {
        super::p12::check(&p12, password).map_err(|e| match e {
            super::p12::Refused::Undecryptable => bad("tls.key_password", e.to_string()),
            _ => bad("tls.client_p12", e.to_string()),
        })?;
        let store = p12_keystore::KeyStore::from_pkcs12(&p12, password, p12_keystore::Pkcs12ImportPolicy::Strict)
            .map_err(|e| bad("tls.key_password", format!("cannot open the PKCS#12 content: {e}")))?;
        let (_, chain) =
            store.private_key_chain().ok_or_else(|| bad("tls.client_p12", "the PKCS#12 content holds no key"))?;
        let certs = chain.certs().iter().map(|c| CertificateDer::from(c.as_der().to_vec())).collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().as_der().to_vec()));
        return Ok(Some((certs, key)));
    }
    let key = material(
        opts.client_key_pem.as_ref().map(|k| k.expose().as_bytes()),
        ("tls.client_key_pem", "tls.client_key_file"),
        opts.client_key_file.as_ref(),
        dir,
    )?;
    let Some(cert) = cert else {
        if key.is_some() {
            return Err(bad("tls.client_cert_pem", "a client key needs its certificate"));
        }
        return Ok(None);
    };
    let certs = CertificateDer::pem_slice_iter(&cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("tls.client_cert_pem", format!("not a PEM certificate: {e}")))?;
    if certs.is_empty() {
        return Err(bad("tls.client_cert_pem", "holds no certificate"));
    }
    let key = key.ok_or_else(|| bad("tls.client_key_pem", "a PEM client certificate needs its key"))?;
    let key = PrivateKeyDer::from_pem_slice(&key)
        .map_err(|e| bad("tls.client_key_pem", format!("not an unencrypted PEM private key: {e}")))?;
    Ok(Some((certs, key)))
}

/// A tenant's client certificate and key files lie in its own folder of the TLS directory
/// (`<dir>/<tenant>/`): else one tenant could name another's and present that identity to a
/// receiver that trusts it (the key never shows, but it signs for whoever names it). CA files
/// may lie anywhere in the directory: CA certificates are public. Checked where a subscription
/// is written, whose tenant it is; `tenant_folders` names tenants' folders besides those
/// spelt as tenant ids.
pub fn check_tenant_files(
    opts: &TlsOptions,
    dir: Option<&Path>,
    tenant: &str,
    tenant_folders: &[String],
) -> Result<(), TlsError> {
    let named = [("tls.client_cert_file", &opts.client_cert_file), ("tls.client_key_file", &opts.client_key_file)];
    for (field, path) in named {
        let (Some(path), Some(dir)) = (path, dir) else { continue };
        let outside =
            || bad(field, format!("must name a file in this tenant's folder of the TLS directory ({tenant}/…)"));
        let (Some((root, own)), Some((_, real))) = (within(dir, tenant), within(dir, path)) else {
            return Err(outside());
        };
        if own == root || !real.starts_with(&own) {
            return Err(outside());
        }
    }
    // A CA file is public and may lie anywhere in the directory — but not in another tenant's
    // folder: its answers (a file that is there, one that is not, one that holds no
    // certificate) would list that folder's files.
    if let (Some(path), Some(dir)) = (&opts.ca_file, dir) {
        let another = folder_under(dir, path).is_some_and(|f| {
            let tenants = crate::tenants::looks_like_tenant_id(&f) || tenant_folders.contains(&f);
            f != tenant && tenants && dir.join(&f).is_dir()
        });
        if another {
            return Err(not_under("tls.ca_file"));
        }
    }
    Ok(())
}

/// The rustls configuration of a TLS profile (`None`: defaults); files are read only under
/// `files_dir`.
pub fn client_config(opts: Option<&TlsOptions>, files_dir: Option<&Path>) -> Result<ClientConfig, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let default = TlsOptions::default();
    let opts = opts.unwrap_or(&default);
    let builder = if opts.trust_all {
        builder.dangerous().with_custom_certificate_verifier(Arc::new(TrustAll(provider())))
    } else {
        let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        let ca = material(
            opts.ca_pem.as_deref().map(str::as_bytes),
            ("tls.ca_pem", "tls.ca_file"),
            opts.ca_file.as_ref(),
            files_dir,
        )?;
        if let Some(pem) = ca {
            let mut added = 0;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| bad("tls.ca_pem", format!("not a PEM certificate: {e}")))?;
                roots.add(cert).map_err(|e| bad("tls.ca_pem", format!("unusable CA certificate: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(bad("tls.ca_pem", "holds no certificate"));
            }
        }
        builder.with_root_certificates(roots)
    };
    match client_identity(opts, files_dir)? {
        Some((certs, key)) => builder
            .with_client_auth_cert(certs, key)
            .map_err(|e| bad("tls.client_key_pem", format!("the key does not fit the certificate: {e}"))),
        None => Ok(builder.with_no_client_auth()),
    }
}

/// The operator's TLS files of a config-file webhook, read now into content (the returned
/// options' PEM and PKCS#12 fields): stored with the subscription, keys as secrets, so
/// deliveries never read server files.
pub fn inline_files(
    ca: Option<&PathBuf>,
    cert: Option<&PathBuf>,
    key: Option<&PathBuf>,
) -> Result<TlsOptions, TlsError> {
    let text = |field, bytes: Vec<u8>| String::from_utf8(bytes).map_err(|_| bad(field, "not a PEM text file"));
    let ca = ca.map(|p| read_bounded("tls.ca_file", p).and_then(|b| text("tls.ca_file", b))).transpose()?;
    let (mut cert_pem, mut p12) = (None, None);
    if let Some(p) = cert {
        let bytes = read_bounded("tls.client_cert_file", p)?;
        if bytes.starts_with(b"-----") || bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            cert_pem = Some(text("tls.client_cert_file", bytes)?);
        } else {
            p12 = Some(base64::engine::general_purpose::STANDARD.encode(bytes));
        }
    }
    let key =
        key.map(|p| read_bounded("tls.client_key_file", p).and_then(|b| text("tls.client_key_file", b))).transpose()?;
    Ok(TlsOptions {
        ca_pem: ca,
        client_cert_pem: cert_pem,
        client_key_pem: key.map(crate::model::Secret),
        client_p12: p12.map(crate::model::Secret),
        ..TlsOptions::default()
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_read_only_under_the_operators_directory_and_boundedly() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), b"not really a pem").unwrap();
        assert_eq!(read_under("tls.ca_file", "ca.pem", Some(dir.path())).unwrap(), b"not really a pem");
        for escape in ["../etc/passwd", "/etc/passwd", "/dev/zero", "missing.pem"] {
            let e = read_under("tls.ca_file", escape, Some(dir.path())).unwrap_err();
            assert_eq!(e.field, "tls.ca_file");
            assert!(!e.message.contains("No such file") && !e.message.contains("denied"), "{e}");
        }
        assert!(read_under("tls.ca_file", "ca.pem", None).unwrap_err().message.contains("content"));
        // Even the operator's own device file is read boundedly, not forever.
        let e = read_bounded("tls.ca_file", Path::new("/dev/zero")).unwrap_err();
        assert!(e.message.contains("larger than"), "{e}");
    }
}
