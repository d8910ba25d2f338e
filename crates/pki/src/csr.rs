//! PKCS#10 certification requests: the proof of possession that stands between a workload's key
//! and an SVID. Only the public key comes out of here; the request's subject, attributes and
//! requested extensions are never read, so a CSR cannot ask for anything the template did not say.

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use rcgen::{PublicKeyData, SignatureAlgorithm};
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::*;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::PkiError;

/// The public key of a CSR whose self-signature verified, in the form rcgen writes into a
/// certificate's SubjectPublicKeyInfo.
#[derive(Debug)]
pub(crate) struct VerifiedKey {
    /// The subjectPublicKey BIT STRING contents (EC point, RSAPublicKey DER, or Ed25519 key).
    raw: Vec<u8>,
    /// Fixes the SPKI's AlgorithmIdentifier rcgen writes (the key type and curve).
    alg: &'static SignatureAlgorithm,
}

impl PublicKeyData for VerifiedKey {
    fn der_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        self.alg
    }
}

#[derive(Clone, Copy)]
enum KeyKind {
    P256,
    P384,
    Rsa,
    Ed25519,
}

impl KeyKind {
    fn name(self) -> &'static str {
        match self {
            Self::P256 => "EC P-256",
            Self::P384 => "EC P-384",
            Self::Rsa => "RSA",
            Self::Ed25519 => "Ed25519",
        }
    }

    /// The supported public key types. RSA keys outside 2048-4096 bits and points that are not
    /// uncompressed are refused here rather than discovered by a peer later.
    fn of(spki: &SubjectPublicKeyInfo<'_>) -> Result<Self, PkiError> {
        let oid = &spki.algorithm.algorithm;
        let unsupported = |what: String| PkiError::UnsupportedKey { algorithm: what };
        let key = &spki.subject_public_key.data;
        let kind = if *oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or_else(|| unsupported("EC key without a named curve".into()))?;
            let (kind, point_len) = if curve == OID_EC_P256 {
                (Self::P256, 65)
            } else if curve == OID_NIST_EC_P384 {
                (Self::P384, 97)
            } else {
                return Err(unsupported(format!("EC curve {curve}")));
            };
            // RFC 5480 §2.2: the uncompressed form MUST be supported; compressed is optional, and
            // not every TLS peer accepts it, so an SVID only ever carries an uncompressed point.
            if key.len() != point_len || key.first() != Some(&0x04) {
                return Err(unsupported(format!(
                    "{} key that is not an uncompressed point",
                    kind.name()
                )));
            }
            kind
        } else if *oid == OID_PKCS1_RSAENCRYPTION {
            let bits = match spki.parsed() {
                Ok(x509_parser::public_key::PublicKey::RSA(rsa)) => bit_len(rsa.modulus),
                _ => return Err(unsupported("RSA key that does not parse".into())),
            };
            if !(2048..=4096).contains(&bits) {
                return Err(PkiError::RsaKeySize { bits });
            }
            Self::Rsa
        } else if *oid == OID_SIG_ED25519 {
            if key.len() != 32 {
                return Err(unsupported("Ed25519 key that is not 32 bytes".into()));
            }
            Self::Ed25519
        } else {
            return Err(unsupported(format!("with OID {oid}")));
        };
        Ok(kind)
    }

    /// The signature algorithms accepted on a CSR for this key type. SHA-1 and RSA-PSS are not:
    /// SHA-1 signatures no longer prove possession (chosen-prefix collisions), and every client
    /// that makes RSA CSRs can make PKCS#1 v1.5 ones.
    fn verification(
        self,
        sig_oid: &x509_parser::der_parser::oid::Oid<'_>,
    ) -> Option<&'static dyn VerificationAlgorithm> {
        let sig = |o| *sig_oid == o;
        Some(match self {
            Self::P256 if sig(OID_SIG_ECDSA_WITH_SHA256) => &signature::ECDSA_P256_SHA256_ASN1,
            Self::P256 if sig(OID_SIG_ECDSA_WITH_SHA384) => &signature::ECDSA_P256_SHA384_ASN1,
            Self::P384 if sig(OID_SIG_ECDSA_WITH_SHA384) => &signature::ECDSA_P384_SHA384_ASN1,
            Self::P384 if sig(OID_SIG_ECDSA_WITH_SHA256) => &signature::ECDSA_P384_SHA256_ASN1,
            Self::Rsa if sig(OID_PKCS1_SHA256WITHRSA) => &signature::RSA_PKCS1_2048_8192_SHA256,
            Self::Rsa if sig(OID_PKCS1_SHA384WITHRSA) => &signature::RSA_PKCS1_2048_8192_SHA384,
            Self::Rsa if sig(OID_PKCS1_SHA512WITHRSA) => &signature::RSA_PKCS1_2048_8192_SHA512,
            Self::Ed25519 if sig(OID_SIG_ED25519) => &signature::ED25519,
            _ => return None,
        })
    }

    /// The rcgen algorithm whose SPKI AlgorithmIdentifier matches this key type. (The signature
    /// half of it is never used: the CA's own key signs the certificate.)
    fn spki_alg(self) -> &'static SignatureAlgorithm {
        match self {
            Self::P256 => &rcgen::PKCS_ECDSA_P256_SHA256,
            Self::P384 => &rcgen::PKCS_ECDSA_P384_SHA384,
            Self::Rsa => &rcgen::PKCS_RSA_SHA256,
            Self::Ed25519 => &rcgen::PKCS_ED25519,
        }
    }
}

/// The number of significant bits of a big-endian unsigned integer.
fn bit_len(int: &[u8]) -> usize {
    match int.iter().position(|b| *b != 0) {
        Some(i) => (int.len() - i) * 8 - int[i].leading_zeros() as usize,
        None => 0,
    }
}

/// Parses a DER CSR, verifies its self-signature (the requester's proof that it holds the private
/// key, RFC 2986 §3) and returns its public key. Nothing else of the request is used.
pub(crate) fn verified_public_key(csr_der: &[u8]) -> Result<VerifiedKey, PkiError> {
    let csr = match X509CertificationRequest::from_der(csr_der) {
        Ok(([], csr)) => csr,
        Ok(_) => {
            return Err(PkiError::CsrParse(
                "trailing bytes after the request".into(),
            ));
        }
        Err(e) => return Err(PkiError::CsrParse(e.to_string())),
    };
    let info = &csr.certification_request_info;
    let spki = &info.subject_pki;
    let kind = KeyKind::of(spki)?;
    // A BIT STRING with unused bits is not a key or a signature we could have made sense of.
    if spki.subject_public_key.unused_bits != 0 || csr.signature_value.unused_bits != 0 {
        return Err(PkiError::CsrParse(
            "key or signature BIT STRING has unused bits".into(),
        ));
    }
    let sig_oid = &csr.signature_algorithm.algorithm;
    let alg = kind
        .verification(sig_oid)
        .ok_or_else(|| PkiError::UnsupportedCsrSignature {
            algorithm: sig_oid.to_id_string(),
            key: kind.name(),
        })?;
    UnparsedPublicKey::new(alg, &spki.subject_public_key.data)
        .verify(info.raw, &csr.signature_value.data)
        .map_err(|_| PkiError::CsrSignature)?;
    Ok(VerifiedKey {
        raw: spki.subject_public_key.data.to_vec(),
        alg: kind.spki_alg(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair};

    fn csr_for(key: &KeyPair) -> Vec<u8> {
        CertificateParams::default()
            .serialize_request(key)
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn the_key_that_comes_out_is_the_requests_key() {
        let key = KeyPair::generate().unwrap();
        let got = verified_public_key(&csr_for(&key)).unwrap();
        assert_eq!(got.der_bytes(), key.public_key_raw());
        assert_eq!(got.subject_public_key_info(), key.subject_public_key_info());
    }

    #[test]
    fn every_flipped_bit_of_the_signed_part_is_refused() {
        let key = KeyPair::generate().unwrap();
        let csr = csr_for(&key);
        let (_, parsed) = X509CertificationRequest::from_der(&csr).unwrap();
        let offset = |part: &[u8]| part.as_ptr() as usize - csr.as_ptr() as usize;
        let info = parsed.certification_request_info.raw;
        let sig = &parsed.signature_value.data;
        // Every byte the signature covers, and every byte of the signature. (The signature
        // AlgorithmIdentifier is not covered; a flip there that still parses names the same or
        // another algorithm, which either verifies this signature correctly or refuses it.)
        let bytes = (offset(info)..offset(info) + info.len()).chain(offset(sig)..csr.len());
        for i in bytes {
            let mut bad = csr.clone();
            bad[i] ^= 0x01;
            assert!(verified_public_key(&bad).is_err(), "byte {i} flipped");
        }
    }

    #[test]
    fn bit_length_ignores_leading_zeros() {
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(bit_len(&[0, 0]), 0);
        assert_eq!(bit_len(&[0, 0x80, 0]), 16);
        assert_eq!(bit_len(&[0x7f, 0xff]), 15);
        assert_eq!(bit_len(&[1]), 1);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_refused() {
        assert!(matches!(
            verified_public_key(b""),
            Err(PkiError::CsrParse(_))
        ));
        assert!(matches!(
            verified_public_key(&[0x30, 0x03, 0x02, 0x01, 0x00]),
            Err(PkiError::CsrParse(_))
        ));
        let mut csr = csr_for(&KeyPair::generate().unwrap());
        csr.push(0);
        assert!(matches!(
            verified_public_key(&csr),
            Err(PkiError::CsrParse(m)) if m.contains("trailing")
        ));
    }
}
