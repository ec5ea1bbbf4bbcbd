//! PKCS#12 files a tenant sends (`tls.client_p12`): the key derivation work one asks for,
//! counted before any of it is done.
//!
//! A PKCS#12 file names its own cost: rounds for its MAC, for each encrypted part and for each
//! shrouded key — up to a million each, and scrypt up to a GiB of memory, in the crate that
//! opens it. Several hundred shrouded keys fit in the 48 KiB a file may have, so one file
//! could ask for minutes of CPU or gigabytes, on whichever thread checks or first uses the
//! subscription (the API's, under the registry's lock; a delivery worker's). Exporters ask
//! for a few thousand rounds a derivation (OpenSSL 2,048, Java 10,000), so a file may ask for
//! [`MAX_ROUNDS`] in all. Keys inside an encrypted part are seen only by decrypting it; that
//! derivation is counted first, like every other.

use cbc::cipher::{block_padding::Pkcs7, BlockModeDecrypt, KeyIvInit};
use cms::cert::x509::spki::AlgorithmIdentifierOwned;
use cms::encrypted_data::EncryptedData;
use der::asn1::{ContextSpecific, ObjectIdentifier, OctetString};
use der::{Decode, Encode};
use pkcs12::pbe_params::{EncryptedPrivateKeyInfo, Pkcs12PbeParams};
use pkcs12::safe_bag::SafeContents;
use pkcs12::{kdf, AuthenticatedSafe, Pfx};
use pkcs5::pbes2;

/// Rounds of key derivation one file may ask for in all (a PBKDF2 round is two hashes).
pub const MAX_ROUNDS: u64 = 1_000_000;

/// Memory one scrypt derivation may ask for (`128 · N · r` bytes).
pub const MAX_SCRYPT_BYTES: u64 = 32 << 20;

const DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ENCRYPTED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.6");
const PBES2: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.5.13");
const PBE_SHA1_3DES: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.1.3");
const PBE_SHA1_RC2_40: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.12.1.6");

/// Why a PKCS#12 file is not opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Its derivations add up to more than [`MAX_ROUNDS`].
    #[error("asks for more than {MAX_ROUNDS} rounds of key derivation in all; export it with fewer iterations (a few thousand is usual)")]
    TooMuchWork,
    /// One scrypt derivation asks for more than [`MAX_SCRYPT_BYTES`].
    #[error("asks scrypt for more than {} MiB of memory", MAX_SCRYPT_BYTES >> 20)]
    ScryptMemory,
    /// Secret bags are not client identities (and would be derived too).
    #[error("holds a secret bag; give only the client's key and certificates")]
    SecretBag,
    /// Not DER of a PKCS#12 file.
    #[error("not a PKCS#12 file: {0}")]
    Malformed(String),
    /// An encrypted part does not decrypt with the password given.
    #[error("cannot open the PKCS#12 content: wrong password or a damaged file")]
    Undecryptable,
    /// An encrypted part uses a scheme neither this check nor the opener reads.
    #[error("an encrypted part uses a scheme Herald does not open; use PBES2 (AES) or PBE-SHA1-3DES")]
    Unsupported,
}

fn malformed(e: der::Error) -> Refused {
    Refused::Malformed(e.to_string())
}

/// Checks that opening `p12` with `password` asks for no more than [`MAX_ROUNDS`] rounds of
/// key derivation and [`MAX_SCRYPT_BYTES`] of memory a derivation. What it decrypts to look
/// inside was counted before; the opener then does at most the same work again.
pub fn check(p12: &[u8], password: &str) -> Result<(), Refused> {
    let pfx = Pfx::from_der(p12).map_err(malformed)?;
    let mut rounds = Rounds(0);
    if let Some(mac) = &pfx.mac_data {
        rounds.add(u64::try_from(mac.iterations).unwrap_or(0))?;
    }
    if pfx.auth_safe.content_type != DATA {
        return Ok(()); // the opener refuses it after the MAC, which is counted
    }
    let safes = AuthenticatedSafe::from_der(octets(&pfx.auth_safe.content)?.as_bytes()).map_err(malformed)?;
    // Everything in sight is counted before any derivation runs; then each encrypted part is
    // opened (its own derivation counted) and its keys counted.
    let mut sealed = Vec::new();
    for safe in &safes {
        if safe.content_type == DATA {
            rounds.bags(&SafeContents::from_der(octets(&safe.content)?.as_bytes()).map_err(malformed)?)?;
        } else if safe.content_type == ENCRYPTED_DATA {
            let data = EncryptedData::from_der(&safe.content.to_der().map_err(malformed)?).map_err(malformed)?;
            rounds.add(cost(&data.enc_content_info.content_enc_alg)?)?;
            sealed.push(data);
        }
    }
    for data in sealed {
        let Some(content) = &data.enc_content_info.encrypted_content else { continue };
        let plain = decrypt(&data.enc_content_info.content_enc_alg, content.as_bytes(), password)?;
        rounds.bags(&SafeContents::from_der(&plain).map_err(|_| Refused::Undecryptable)?)?;
    }
    Ok(())
}

fn octets(any: &der::Any) -> Result<OctetString, Refused> {
    OctetString::from_der(&any.to_der().map_err(malformed)?).map_err(malformed)
}

/// The rounds counted so far.
struct Rounds(u64);

impl Rounds {
    fn add(&mut self, rounds: u64) -> Result<(), Refused> {
        self.0 = self.0.saturating_add(rounds);
        if self.0 > MAX_ROUNDS {
            return Err(Refused::TooMuchWork);
        }
        Ok(())
    }

    /// Counts the shrouded keys of `bags` (keys and certificates in the clear cost nothing).
    fn bags(&mut self, bags: &SafeContents) -> Result<(), Refused> {
        for bag in bags {
            if bag.bag_id == pkcs12::PKCS_12_PKCS8_KEY_BAG_OID {
                let key: ContextSpecific<EncryptedPrivateKeyInfo> =
                    ContextSpecific::from_der(&bag.bag_value).map_err(malformed)?;
                self.add(cost(&key.value.encryption_algorithm)?)?;
            } else if bag.bag_id == pkcs12::PKCS_12_SECRET_BAG_OID {
                return Err(Refused::SecretBag);
            }
        }
        Ok(())
    }
}

fn pbes2_params(alg: &AlgorithmIdentifierOwned) -> Result<pbes2::Parameters, Refused> {
    let params = alg.parameters.as_ref().ok_or(Refused::Malformed("PBES2 without parameters".into()))?;
    pbes2::Parameters::from_der(&params.to_der().map_err(malformed)?).map_err(malformed)
}

fn pbe_params(alg: &AlgorithmIdentifierOwned) -> Result<Pkcs12PbeParams, Refused> {
    let params = alg.parameters.as_ref().ok_or(Refused::Malformed("PBE without parameters".into()))?;
    Pkcs12PbeParams::from_der(&params.to_der().map_err(malformed)?).map_err(malformed)
}

/// The rounds decrypting with `alg` takes: PBKDF2 for a 32-byte key (two blocks of SHA-1),
/// PKCS#12's own derivation for a key and an IV, scrypt by its `N · r · p`. Schemes the
/// opener does not read cost nothing: it refuses them without deriving.
fn cost(alg: &AlgorithmIdentifierOwned) -> Result<u64, Refused> {
    if alg.oid == PBES2 {
        return match pbes2_params(alg)?.kdf {
            pbes2::Kdf::Pbkdf2(p) => Ok(2 * u64::from(p.iteration_count)),
            pbes2::Kdf::Scrypt(s) => {
                let (n, r, p) = (s.cost_parameter, u64::from(s.block_size), u64::from(s.parallelization));
                if n.saturating_mul(r).saturating_mul(128) > MAX_SCRYPT_BYTES {
                    return Err(Refused::ScryptMemory);
                }
                Ok(n.saturating_mul(r).saturating_mul(p))
            }
            _ => Ok(0),
        };
    }
    if alg.oid == PBE_SHA1_3DES || alg.oid == PBE_SHA1_RC2_40 {
        return Ok(3 * u64::try_from(pbe_params(alg)?.iterations).unwrap_or(0));
    }
    Ok(0)
}

fn decrypt(alg: &AlgorithmIdentifierOwned, data: &[u8], password: &str) -> Result<Vec<u8>, Refused> {
    if alg.oid == PBES2 {
        return pbes2_params(alg)?.decrypt(password.as_bytes(), data).map_err(|_| Refused::Undecryptable);
    }
    let (key_len, rc2) = match alg.oid {
        oid if oid == PBE_SHA1_3DES => (24, false),
        oid if oid == PBE_SHA1_RC2_40 => (5, true),
        _ => return Err(Refused::Unsupported),
    };
    let params = pbe_params(alg)?;
    let derive = |kind, len| {
        kdf::derive_key_utf8::<sha1::Sha1>(password, params.salt.as_bytes(), kind, params.iterations, len)
            .map_err(|_| Refused::Undecryptable)
    };
    let (key, iv) = (derive(kdf::Pkcs12KeyType::EncryptionKey, key_len)?, derive(kdf::Pkcs12KeyType::Iv, 8)?);
    let plain = if rc2 {
        cbc::Decryptor::<rc2::Rc2>::new_from_slices(&key, &iv).map(|c| c.decrypt_padded_vec::<Pkcs7>(data))
    } else {
        cbc::Decryptor::<des::TdesEde3>::new_from_slices(&key, &iv).map(|c| c.decrypt_padded_vec::<Pkcs7>(data))
    };
    plain.map_err(|_| Refused::Undecryptable)?.map_err(|_| Refused::Undecryptable)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pkcs12::safe_bag::SafeBag;

    fn pbkdf2_alg(iterations: u32) -> AlgorithmIdentifierOwned {
        let params = pbes2::Parameters::generate_pbkdf2_sha256_aes256cbc(iterations, &[7; 16], [9; 16]).unwrap();
        AlgorithmIdentifierOwned { oid: PBES2, parameters: Some(der::Any::encode_from(&params).unwrap()) }
    }

    fn shrouded(alg: AlgorithmIdentifierOwned) -> SafeBag {
        let info =
            EncryptedPrivateKeyInfo { encryption_algorithm: alg, encrypted_data: OctetString::new([0u8; 16]).unwrap() };
        // Encoding puts the value in its explicit tag; decoding keeps the tag.
        SafeBag { bag_id: pkcs12::PKCS_12_PKCS8_KEY_BAG_OID, bag_value: info.to_der().unwrap(), bag_attributes: None }
    }

    /// A file of one data part holding `bags` in the clear (their keys are not real: nothing
    /// here is derived).
    fn file(bags: Vec<SafeBag>) -> Vec<u8> {
        let contents = OctetString::new(bags.to_der().unwrap()).unwrap();
        let safe =
            cms::content_info::ContentInfo { content_type: DATA, content: der::Any::encode_from(&contents).unwrap() };
        let auth = OctetString::new(vec![safe].to_der().unwrap()).unwrap();
        Pfx {
            version: pkcs12::pfx::Version::V3,
            auth_safe: cms::content_info::ContentInfo {
                content_type: DATA,
                content: der::Any::encode_from(&auth).unwrap(),
            },
            mac_data: None,
        }
        .to_der()
        .unwrap()
    }

    #[test]
    fn a_file_s_derivations_are_counted_before_any_runs() {
        // Three keys at 100 000 PBKDF2 rounds pass; a fourth passes the budget.
        assert_eq!(check(&file((0..3).map(|_| shrouded(pbkdf2_alg(100_000))).collect()), "pw"), Ok(()));
        let many = file((0..6).map(|_| shrouded(pbkdf2_alg(100_000))).collect());
        assert_eq!(check(&many, "pw"), Err(Refused::TooMuchWork));
        // One derivation at the opener's own cap is already more than a file may ask.
        assert_eq!(check(&file(vec![shrouded(pbkdf2_alg(1_000_000))]), "pw"), Err(Refused::TooMuchWork));
    }

    #[test]
    fn scrypt_asking_for_more_memory_than_allowed_is_refused_unrun() {
        let scrypt = |log_n: u8, r: u32| {
            let params = pbes2::Parameters::generate_scrypt_aes256cbc(
                pkcs5::scrypt::Params::new(log_n, r, 1).unwrap(),
                &[7; 16],
                [9; 16],
            )
            .unwrap();
            AlgorithmIdentifierOwned { oid: PBES2, parameters: Some(der::Any::encode_from(&params).unwrap()) }
        };
        // 2^20 · 8 · 128 bytes: the opener's own cap, a GiB.
        assert_eq!(check(&file(vec![shrouded(scrypt(20, 8))]), "pw"), Err(Refused::ScryptMemory));
        assert_eq!(check(&file(vec![shrouded(scrypt(14, 8))]), "pw"), Ok(()));
    }

    #[test]
    fn files_as_exporters_write_them_pass_and_a_wrong_password_is_told() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["client".into()]).unwrap().self_signed(&key).unwrap();
        let mut store = p12_keystore::KeyStore::new();
        let chain = p12_keystore::PrivateKeyChain::new(
            b"client".to_vec(),
            p12_keystore::PrivateKey::from_der(&key.serialize_der()).unwrap(),
            vec![p12_keystore::Certificate::from_der(cert.der()).unwrap()],
        );
        store.add_entry("client", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
        use p12_keystore::EncryptionAlgorithm::*;
        for alg in [PbeWithHmacSha256AndAes256, PbeWithShaAnd3KeyTripleDesCbc, PbeWithShaAnd40BitRc4Cbc] {
            let file = store.writer("pw").encryption_algorithm(alg).encryption_iterations(2048).write().unwrap();
            assert_eq!(check(&file, "pw"), Ok(()), "{alg:?}");
            assert_eq!(check(&file, "not the password"), Err(Refused::Undecryptable), "{alg:?}");
        }
    }

    #[test]
    fn secret_bags_and_garbage_are_refused() {
        let secret =
            SafeBag { bag_id: pkcs12::PKCS_12_SECRET_BAG_OID, bag_value: vec![0x05, 0x00], bag_attributes: None };
        assert_eq!(check(&file(vec![secret]), "pw"), Err(Refused::SecretBag));
        assert!(matches!(check(b"not der", "pw"), Err(Refused::Malformed(_))));
    }
}
