//! X509-SVID rules (the X509-SVID standard, §2–§5.2) checked on a parsed certificate chain.
//!
//! This module decides whether a chain *looks like* an X509-SVID: one URI SAN, leaf and signing
//! certificate constraints, key usage. It does not check signatures, validity periods or trust
//! anchors; `tessera-tls` does that with webpki and calls [`validate_svid_chain`] first.

use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::*;

use crate::id::{IdError, SpiffeId};

/// One rule of the X509-SVID standard that a chain breaks. `index` is the position in the chain
/// (0 = leaf).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum X509SvidError {
    #[error("the certificate chain is empty")]
    EmptyChain,
    #[error("certificate {index} cannot be parsed: {reason}")]
    Parse { index: usize, reason: String },
    #[error(
        "leaf has {count} URI SANs; an X509-SVID MUST contain exactly one (X509-SVID §2, §5.2)"
    )]
    UriSanCount { count: usize },
    #[error("leaf URI SAN {uri:?} is not a valid SPIFFE ID: {source}")]
    LeafId { uri: String, source: IdError },
    #[error(
        "leaf SPIFFE ID {id} has no path; leaf SPIFFE IDs MUST have a non-root path (X509-SVID §3.1, §5.2)"
    )]
    LeafIdIsRoot { id: String },
    #[error("leaf has cA=true; leaf certificates MUST set cA to false (X509-SVID §4.1, §5.2)")]
    LeafIsCa,
    #[error(
        "certificate {index} has no key usage extension; it MUST be set on all SVIDs (X509-SVID §4.3)"
    )]
    MissingKeyUsage { index: usize },
    #[error(
        "certificate {index}: the key usage extension MUST be marked critical (X509-SVID §4.3)"
    )]
    KeyUsageNotCritical { index: usize },
    #[error("leaf key usage lacks digitalSignature, which leaf SVIDs MUST set (X509-SVID §4.3)")]
    LeafMissingDigitalSignature,
    #[error("leaf key usage sets {usage}, which leaf SVIDs MUST NOT set (X509-SVID §4.3, §5.2)")]
    LeafSigningUsage { usage: &'static str },
    #[error(
        "leaf extended key usage lacks {missing}; when present it MUST include serverAuth and clientAuth (X509-SVID §4.4)"
    )]
    LeafExtendedKeyUsage { missing: &'static str },
    #[error(
        "certificate {index} is not a CA (cA is not true) but is not the leaf; signing certificates MUST set cA=true (X509-SVID §4.1)"
    )]
    SigningNotCa { index: usize },
    #[error(
        "certificate {index} is a signing certificate without keyCertSign, which it MUST set (X509-SVID §4.3)"
    )]
    SigningMissingKeyCertSign { index: usize },
    #[error(
        "certificate {index} is a signing certificate whose SPIFFE ID {id} has a path; it MUST NOT (X509-SVID §3.2)"
    )]
    SigningIdHasPath { index: usize, id: String },
    #[error(
        "leaf has an empty Subject but its SAN extension is not critical (X509-SVID §3.1, RFC 5280 §4.1.2.6)"
    )]
    EmptySubjectNonCriticalSan,
}

/// What [`check_svid_chain`] found: the leaf's SPIFFE ID (when there is exactly one valid one) and
/// every rule broken, in chain order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SvidReport {
    pub spiffe_id: Option<SpiffeId>,
    pub violations: Vec<X509SvidError>,
}

/// Checks every X509-SVID rule on a DER chain (leaf first) and returns the leaf's SPIFFE ID, or
/// the first rule broken.
pub fn validate_svid_chain<C: AsRef<[u8]>>(chain: &[C]) -> Result<SpiffeId, X509SvidError> {
    let mut first_error = None;
    let report = check(chain, &mut |e| {
        first_error = Some(e);
        false
    });
    match (first_error, report) {
        (Some(e), _) => Err(e),
        (None, Some(id)) => Ok(id),
        // Unreachable in practice: no violation means the leaf had one valid ID.
        (None, None) => Err(X509SvidError::UriSanCount { count: 0 }),
    }
}

/// Checks every X509-SVID rule on a DER chain (leaf first) and reports all that are broken, for
/// tools such as `tessera svid inspect`.
pub fn check_svid_chain<C: AsRef<[u8]>>(chain: &[C]) -> SvidReport {
    let mut violations = Vec::new();
    let spiffe_id = check(chain, &mut |e| {
        violations.push(e);
        true
    });
    SvidReport {
        spiffe_id,
        violations,
    }
}

/// The one implementation of the rules. `report` receives each violation and returns whether to
/// keep going. Returns the leaf's SPIFFE ID when it has exactly one valid URI SAN.
fn check<C: AsRef<[u8]>>(
    chain: &[C],
    report: &mut dyn FnMut(X509SvidError) -> bool,
) -> Option<SpiffeId> {
    macro_rules! violation {
        ($e:expr) => {
            if !report($e) {
                return None;
            }
        };
    }
    if chain.is_empty() {
        report(X509SvidError::EmptyChain);
        return None;
    }
    let mut leaf_id = None;
    for (index, der) in chain.iter().enumerate() {
        let cert = match X509Certificate::from_der(der.as_ref()) {
            Ok(([], cert)) => cert,
            Ok(_) => {
                violation!(X509SvidError::Parse {
                    index,
                    reason: "trailing bytes after the certificate".into()
                });
                continue;
            }
            Err(e) => {
                violation!(X509SvidError::Parse {
                    index,
                    reason: e.to_string()
                });
                continue;
            }
        };
        let facts = match CertFacts::read(&cert) {
            Ok(f) => f,
            Err(reason) => {
                violation!(X509SvidError::Parse { index, reason });
                continue;
            }
        };

        // X509-SVID §4.3: "The key usage extension MUST be set on all SVIDs, and MUST be marked critical."
        match facts.key_usage {
            None => violation!(X509SvidError::MissingKeyUsage { index }),
            Some((false, _)) => violation!(X509SvidError::KeyUsageNotCritical { index }),
            Some(_) => {}
        }
        let ku = facts.key_usage.map(|(_, ku)| ku);

        if index == 0 {
            // X509-SVID §2: exactly one URI SAN; validators MUST reject more than one (§5.2).
            match facts.uri_sans.as_slice() {
                [uri] => match SpiffeId::parse(uri) {
                    // §5.2: the scheme MUST be `spiffe` (checked by parse) and the path non-root (§3.1).
                    Ok(id) if id.is_root() => {
                        violation!(X509SvidError::LeafIdIsRoot { id: id.to_string() })
                    }
                    Ok(id) => leaf_id = Some(id),
                    Err(source) => violation!(X509SvidError::LeafId {
                        uri: (*uri).to_owned(),
                        source
                    }),
                },
                other => violation!(X509SvidError::UriSanCount { count: other.len() }),
            }
            // §3.1 via RFC 5280 §4.1.2.6: without a Subject the SAN carries the identity and must be critical.
            if facts.subject_empty && !facts.san_critical {
                violation!(X509SvidError::EmptySubjectNonCriticalSan);
            }
            // §4.1 and §5.2: the leaf MUST have cA=false (absent basic constraints means not a CA).
            if facts.is_ca {
                violation!(X509SvidError::LeafIsCa);
            }
            if let Some(ku) = ku {
                // §4.3: leaf SVIDs MUST set digitalSignature and MUST NOT set keyCertSign or cRLSign;
                // §5.2 makes the latter a validator duty, so a leaf can never act as a CA.
                if !ku.digital_signature() {
                    violation!(X509SvidError::LeafMissingDigitalSignature);
                }
                if ku.key_cert_sign() {
                    violation!(X509SvidError::LeafSigningUsage {
                        usage: "keyCertSign"
                    });
                }
                if ku.crl_sign() {
                    violation!(X509SvidError::LeafSigningUsage { usage: "cRLSign" });
                }
            }
            // §4.4: EKU is optional, but when present it MUST include both serverAuth and clientAuth.
            if let Some((server, client)) = facts.eku {
                if !server {
                    violation!(X509SvidError::LeafExtendedKeyUsage {
                        missing: "serverAuth"
                    });
                }
                if !client {
                    violation!(X509SvidError::LeafExtendedKeyUsage {
                        missing: "clientAuth"
                    });
                }
            }
        } else {
            // §4.1: every certificate above the leaf signs, so it MUST be a CA. A non-CA extra
            // certificate in the chain is rejected rather than skipped: a chain is what the peer
            // proves, and an unexplained member is a sign of a confused or malicious sender.
            if !facts.is_ca {
                violation!(X509SvidError::SigningNotCa { index });
            }
            // §4.3: signing certificates MUST set keyCertSign.
            if let Some(ku) = ku
                && !ku.key_cert_sign()
            {
                violation!(X509SvidError::SigningMissingKeyCertSign { index });
            }
            // §3.2: a signing certificate's SPIFFE ID, if present, MUST NOT have a path.
            for uri in &facts.uri_sans {
                if let Ok(id) = SpiffeId::parse(uri)
                    && !id.is_root()
                {
                    violation!(X509SvidError::SigningIdHasPath {
                        index,
                        id: id.to_string()
                    });
                }
            }
        }
    }
    leaf_id
}

/// The facts about one certificate that the rules need, read once.
struct CertFacts<'a> {
    uri_sans: Vec<&'a str>,
    san_critical: bool,
    subject_empty: bool,
    is_ca: bool,
    /// (critical, usage)
    key_usage: Option<(bool, KeyUsage)>,
    /// (serverAuth, clientAuth) when the extension is present.
    eku: Option<(bool, bool)>,
}

impl<'a> CertFacts<'a> {
    fn read(cert: &'a X509Certificate<'a>) -> Result<Self, String> {
        let mut facts = CertFacts {
            uri_sans: Vec::new(),
            san_critical: false,
            subject_empty: cert.subject().iter().next().is_none(),
            is_ca: false,
            key_usage: None,
            eku: None,
        };
        let mut seen = std::collections::HashSet::new();
        for ext in cert.extensions() {
            // RFC 5280 §4.2: "A certificate MUST NOT include more than one instance of a particular
            // extension" — two SAN or key-usage extensions would make the rules above ambiguous.
            if !seen.insert(ext.oid.to_id_string()) {
                return Err(format!("extension {} appears twice", ext.oid));
            }
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    facts.san_critical = ext.critical;
                    for name in &san.general_names {
                        if let GeneralName::URI(uri) = name {
                            facts.uri_sans.push(uri);
                        }
                    }
                }
                ParsedExtension::BasicConstraints(bc) => facts.is_ca = bc.ca,
                ParsedExtension::KeyUsage(ku) => facts.key_usage = Some((ext.critical, *ku)),
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    facts.eku = Some((eku.server_auth, eku.client_auth));
                }
                ParsedExtension::ParseError { error } => {
                    return Err(format!("extension {} is malformed: {error}", ext.oid));
                }
                _ => {}
            }
        }
        Ok(facts)
    }
}

/// Why a certificate cannot serve as an X.509 authority of a trust bundle, or `None` when it can.
///
/// X509-SVID §4.1: a certificate that signs SVIDs MUST be a CA (`basicConstraints` with `cA`
/// true), so a leaf pasted into a bundle by mistake is refused rather than trusted as an anchor
/// (a trust anchor's own constraints are not checked during path building, so nothing later
/// would catch it). Its key must be one the SVID verifier can use ([`authority_key_problem`]).
pub fn authority_problem(der: &[u8]) -> Option<String> {
    let cert = match X509Certificate::from_der(der) {
        Ok(([], cert)) => cert,
        Ok(_) => return Some("trailing bytes after the certificate".into()),
        Err(e) => return Some(format!("not an X.509 certificate: {e}")),
    };
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {}
        Ok(_) => {
            return Some(
                "not a CA certificate (basicConstraints cA is not true; X509-SVID §4.1): a leaf cannot be a trust anchor".into(),
            );
        }
        Err(e) => return Some(format!("basicConstraints is malformed: {e}")),
    }
    authority_key_problem(cert.public_key())
}

/// The object identifiers of ML-DSA-44, -65 and -87 public keys (FIPS 204; RFC 9881 §2).
const ML_DSA_OIDS: [&str; 3] = [
    "2.16.840.1.101.3.4.3.17",
    "2.16.840.1.101.3.4.3.18",
    "2.16.840.1.101.3.4.3.19",
];

/// Why the key of an X.509 authority is one that the SVID verifier cannot use, or `None`.
///
/// `tessera_tls::verify_svid` builds paths with webpki's `ALL_VERIFICATION_ALGS` (aws-lc-rs), so
/// the key of a CA that signs for a trust domain must be exactly one of: ECDSA on P-256, P-384 or
/// P-521; Ed25519; RSA (`rsaEncryption`) of 2048 to 8192 bits (`RSA_*_2048_8192`); ML-DSA-44, -65
/// or -87. webpki skips an anchor whose key it cannot use, so a bundle whose only authority has
/// another key trusts nothing. A black-box test's bundle endpoint served a lone secp256k1 CA: it
/// replaced the stored good bundle and the partner's SVIDs were refused from then on. RSA keys
/// under 2048 bits are also too weak to anchor a trust domain (NIST SP 800-131A), and an EC point
/// off its curve is no public key (SEC 1 v2 §3.2.2). Keep this list in step with the verifier: a
/// test in tessera-server (`federation::rules`) checks every accepted kind against
/// `verify_svid`.
pub fn authority_key_problem(spki: &SubjectPublicKeyInfo<'_>) -> Option<String> {
    use x509_parser::oid_registry as oids;
    let alg = &spki.algorithm.algorithm;
    if *alg == oids::OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve_oid = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        let curve = match curve_oid {
            Some(c) if c == oids::OID_EC_P256 => crate::bundle::EcCurve::P256,
            Some(c) if c == oids::OID_NIST_EC_P384 => crate::bundle::EcCurve::P384,
            Some(c) if c == oids::OID_NIST_EC_P521 => crate::bundle::EcCurve::P521,
            Some(c) => {
                return Some(format!(
                    "an EC key on curve {c}{}: the SVID verifier takes only P-256, P-384 and P-521",
                    if c.to_id_string() == "1.3.132.0.10" {
                        " (secp256k1)"
                    } else {
                        ""
                    }
                ));
            }
            None => return Some("an EC key without a named curve".into()),
        };
        if !crate::bundle::ec_point_is_valid(curve, &spki.subject_public_key.data) {
            return Some(format!(
                "the {} public key is not a point on the curve (SEC 1 v2 §3.2.2)",
                curve.jwk_name()
            ));
        }
        return None;
    }
    if *alg == oids::OID_PKCS1_RSAENCRYPTION {
        let Ok(x509_parser::public_key::PublicKey::RSA(rsa)) = spki.parsed() else {
            return Some("the RSA public key does not parse".into());
        };
        let modulus: Vec<u8> = rsa
            .modulus
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        let bits = modulus.first().map_or(0, |b| {
            (modulus.len() - 1) * 8 + (8 - b.leading_zeros() as usize)
        });
        if bits < 2048 {
            return Some(format!(
                "an RSA key of {bits} bits: at least 2048 are needed"
            ));
        }
        if bits > 8192 {
            return Some(format!(
                "an RSA key of {bits} bits: the SVID verifier takes at most 8192"
            ));
        }
        return None;
    }
    if *alg == oids::OID_SIG_ED25519 || ML_DSA_OIDS.contains(&alg.to_id_string().as_str()) {
        return None;
    }
    Some(format!(
        "a key of algorithm {alg}, which the SVID verifier cannot use (it takes ECDSA P-256, P-384 and P-521, Ed25519, RSA of 2048 to 8192 bits, and ML-DSA)"
    ))
}

/// A certificate's `notAfter` (RFC 5280 §4.1.2.5: valid through that second), as Unix seconds
/// and as RFC 2822 text for messages; `None` when the certificate does not parse.
pub fn not_after(der: &[u8]) -> Option<(i64, String)> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let t = cert.validity().not_after;
    Some((
        t.timestamp(),
        t.to_rfc2822().unwrap_or_else(|_| t.to_string()),
    ))
}

/// The trust domains named by the SPIFFE IDs in a certificate's URI SANs (a SPIFFE CA names
/// its own, `spiffe://<td>`, X509-SVID §3.2). URIs that are not SPIFFE IDs are ignored; a
/// certificate that does not parse names none. Used to refuse a federated bundle whose
/// authorities belong to another trust domain (SPIFFE Federation §4: trust domains are never
/// merged).
pub fn uri_trust_domains(der: &[u8]) -> Vec<crate::TrustDomain> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && let Ok(id) = SpiffeId::parse(uri)
                {
                    out.push(id.trust_domain());
                }
            }
        }
    }
    out
}
