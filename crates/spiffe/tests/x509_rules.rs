//! X509-SVID rules on generated certificates, one row per MUST/MUST NOT of the standard.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use tessera_spiffe::x509::{X509SvidError, check_svid_chain, validate_svid_chain};
use tessera_test_util::rcgen::{
    self, BasicConstraints, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
};
use tessera_test_util::{TestCa, non_critical_digital_signature_ku, uri_san};

#[test]
fn a_valid_svid_yields_its_id() {
    let ca = TestCa::new("example.org");
    let svid = ca.issue("spiffe://example.org/web");
    assert_eq!(
        validate_svid_chain(&svid.chain).unwrap().as_str(),
        "spiffe://example.org/web"
    );
    // And through an intermediate, with the intermediate in the chain.
    let svid = ca.intermediate().issue("spiffe://example.org/web");
    assert_eq!(svid.chain.len(), 2);
    assert!(validate_svid_chain(&svid.chain).is_ok());
}

#[test]
fn each_broken_rule_is_reported() {
    use X509SvidError::*;
    let ca = TestCa::new("example.org");
    type Edit = fn(&mut rcgen::CertificateParams);
    let rows: &[(&str, &str, Edit, X509SvidError)] = &[
        // §2: exactly one URI SAN.
        (
            "two URI SANs",
            "spiffe://example.org/a",
            |p| p.subject_alt_names.push(uri_san("spiffe://example.org/b")),
            UriSanCount { count: 2 },
        ),
        ("no URI SAN", "", |_| {}, UriSanCount { count: 0 }),
        // §5.2: scheme must be spiffe.
        (
            "wrong scheme",
            "https://example.org/a",
            |_| {},
            LeafId {
                uri: "https://example.org/a".into(),
                source: tessera_spiffe::IdError::WrongScheme {
                    found: "https://".into(),
                },
            },
        ),
        // §3.1: leaf ID has a non-root path.
        (
            "no path",
            "spiffe://example.org",
            |_| {},
            LeafIdIsRoot {
                id: "spiffe://example.org".into(),
            },
        ),
        // §4.1: leaf cA=false.
        (
            "CA leaf",
            "spiffe://example.org/a",
            |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
            LeafIsCa,
        ),
        // §4.3: key usage present, critical, digitalSignature, no keyCertSign/cRLSign.
        (
            "missing key usage",
            "spiffe://example.org/a",
            |p| p.key_usages.clear(),
            MissingKeyUsage { index: 0 },
        ),
        (
            "non-critical key usage",
            "spiffe://example.org/a",
            |p| {
                p.key_usages.clear();
                p.custom_extensions
                    .push(non_critical_digital_signature_ku());
            },
            KeyUsageNotCritical { index: 0 },
        ),
        (
            "no digitalSignature",
            "spiffe://example.org/a",
            |p| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment],
            LeafMissingDigitalSignature,
        ),
        (
            "keyCertSign leaf",
            "spiffe://example.org/a",
            |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
            LeafSigningUsage {
                usage: "keyCertSign",
            },
        ),
        (
            "cRLSign leaf",
            "spiffe://example.org/a",
            |p| p.key_usages.push(KeyUsagePurpose::CrlSign),
            LeafSigningUsage { usage: "cRLSign" },
        ),
        // §4.4: EKU, when present, has serverAuth and clientAuth.
        (
            "EKU without clientAuth",
            "spiffe://example.org/a",
            |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafExtendedKeyUsage {
                missing: "clientAuth",
            },
        ),
        (
            "EKU without serverAuth",
            "spiffe://example.org/a",
            |p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafExtendedKeyUsage {
                missing: "serverAuth",
            },
        ),
    ];
    for (name, id, edit, want) in rows {
        let svid = ca.issue_with(id, *edit);
        assert_eq!(
            validate_svid_chain(&svid.chain).as_ref(),
            Err(want),
            "{name}"
        );
        assert!(
            check_svid_chain(&svid.chain).violations.contains(want),
            "{name}: report lists it"
        );
    }
}

#[test]
fn eku_is_optional() {
    let ca = TestCa::new("example.org");
    let svid = ca.issue_with("spiffe://example.org/a", |p| p.extended_key_usages.clear());
    assert!(validate_svid_chain(&svid.chain).is_ok());
}

#[test]
fn signing_certificate_rules() {
    let ca = TestCa::new("example.org");
    // §4.1: an extra non-CA certificate in the chain.
    let mut svid = ca.issue("spiffe://example.org/a");
    let other = ca.issue("spiffe://example.org/b");
    svid.chain.push(other.chain[0].clone());
    assert_eq!(
        validate_svid_chain(&svid.chain),
        Err(X509SvidError::SigningNotCa { index: 1 })
    );
    // §4.3: an intermediate without keyCertSign.
    let bad = ca.intermediate_with(|p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature]);
    let svid = bad.issue("spiffe://example.org/a");
    assert_eq!(
        validate_svid_chain(&svid.chain),
        Err(X509SvidError::SigningMissingKeyCertSign { index: 1 })
    );
    // §3.2: a signing certificate's SPIFFE ID has no path.
    let bad =
        ca.intermediate_with(|p| p.subject_alt_names = vec![uri_san("spiffe://example.org/ca")]);
    let svid = bad.issue("spiffe://example.org/a");
    assert!(matches!(
        validate_svid_chain(&svid.chain),
        Err(X509SvidError::SigningIdHasPath { index: 1, .. })
    ));
}

#[test]
fn report_lists_every_violation_of_a_very_bad_certificate() {
    let ca = TestCa::new("example.org");
    let svid = ca.issue_with("spiffe://example.org", |p| {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    });
    let report = check_svid_chain(&svid.chain);
    assert_eq!(report.spiffe_id, None);
    assert_eq!(
        report.violations,
        vec![
            X509SvidError::LeafIdIsRoot {
                id: "spiffe://example.org".into()
            },
            X509SvidError::LeafIsCa,
            X509SvidError::LeafMissingDigitalSignature,
            X509SvidError::LeafSigningUsage {
                usage: "keyCertSign"
            },
            X509SvidError::LeafSigningUsage { usage: "cRLSign" },
        ]
    );
}

#[test]
fn garbage_is_a_parse_error_not_a_panic() {
    assert_eq!(
        validate_svid_chain::<&[u8]>(&[]),
        Err(X509SvidError::EmptyChain)
    );
    for input in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x00", &[0xff; 64]] {
        assert!(matches!(
            validate_svid_chain(&[input]),
            Err(X509SvidError::Parse { index: 0, .. })
        ));
    }
    let ca = TestCa::new("example.org");
    let mut der = ca.issue("spiffe://example.org/a").chain[0].to_vec();
    der.push(0);
    assert!(matches!(
        validate_svid_chain(&[der]),
        Err(X509SvidError::Parse { .. })
    ));
}

use tessera_test_util::der;

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
const OID_SECP256K1: &[u8] = &[0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A];
const OID_BRAINPOOL_P256R1: &[u8] = &[
    0x06, 0x09, 0x2B, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07,
];
const OID_RSA_ENCRYPTION: &[u8] = &[
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x01,
];
const OID_RSASSA_PSS: &[u8] = &[
    0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x01, 0x0A,
];
const OID_X25519: &[u8] = &[0x06, 0x03, 0x2B, 0x65, 0x6E];

fn spki(alg_id: &[u8], key: &[u8]) -> Vec<u8> {
    let bits = [&[0u8][..], key].concat();
    der(0x30, &[der(0x30, alg_id), der(0x03, &bits)].concat())
}

fn ec_spki(curve: &[u8], point: &[u8]) -> Vec<u8> {
    spki(&[OID_EC_PUBLIC_KEY, curve].concat(), point)
}

/// An RSA key with a modulus of exactly `bits` bits (a multiple of 8); not a real key, which the
/// rule does not need.
fn rsa_spki(alg_oid: &[u8], bits: usize) -> Vec<u8> {
    let mut n = vec![0u8; 1 + bits / 8];
    n[1] = 0x80;
    n[bits / 8] = 0x01;
    let key = der(0x30, &[der(0x02, &n), der(0x02, &[1, 0, 1])].concat());
    let null: &[u8] = if alg_oid == OID_RSA_ENCRYPTION {
        &[0x05, 0x00]
    } else {
        &[]
    };
    spki(&[alg_oid, null].concat(), &key)
}

fn authority_params() -> rcgen::CertificateParams {
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name.push(rcgen::DnType::CommonName, "ca");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![uri_san("spiffe://example.org")];
    p
}

/// A CA certificate whose subject key is `spki`, of any algorithm: made with a P-256 key and its
/// SubjectPublicKeyInfo then swapped for `spki` (the signature no longer verifies;
/// `authority_problem` reads only the certificate's fields).
fn authority_with_spki(spki: Vec<u8>) -> Vec<u8> {
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = authority_params().self_signed(&key).unwrap().der().to_vec();
    let placeholder = rcgen::PublicKeyData::subject_public_key_info(&key);
    tessera_test_util::with_spki(&cert, &placeholder, &spki)
}

fn self_signed_authority(key: &rcgen::KeyPair) -> Vec<u8> {
    authority_params().self_signed(key).unwrap().der().to_vec()
}

/// An X.509 authority's key must be one `tessera_tls::verify_svid` can use (webpki with
/// aws-lc-rs): a bundle endpoint served a lone secp256k1 CA, which was accepted and replaced the
/// good bundle, so nothing of that trust domain verified any more. Which kinds the verifier
/// really takes is checked end to end in tessera-server's `federation::rules` tests.
#[test]
fn an_authority_key_must_be_one_the_svid_verifier_can_use() {
    use aws_lc_rs::signature::{self, KeyPair as _};
    use tessera_spiffe::x509::authority_problem;

    let gen_key = |alg| rcgen::KeyPair::generate_for(alg).unwrap();
    let accepted: Vec<(&str, Vec<u8>)> = vec![
        (
            "P-256",
            self_signed_authority(&gen_key(&rcgen::PKCS_ECDSA_P256_SHA256)),
        ),
        (
            "P-384",
            self_signed_authority(&gen_key(&rcgen::PKCS_ECDSA_P384_SHA384)),
        ),
        (
            "P-521",
            self_signed_authority(&gen_key(&rcgen::PKCS_ECDSA_P521_SHA512)),
        ),
        (
            "Ed25519",
            self_signed_authority(&gen_key(&rcgen::PKCS_ED25519)),
        ),
        (
            "RSA-2048",
            self_signed_authority(
                &rcgen::KeyPair::generate_rsa_for(
                    &rcgen::PKCS_RSA_SHA256,
                    rcgen::RsaKeySize::_2048,
                )
                .unwrap(),
            ),
        ),
        (
            "RSA-8192",
            authority_with_spki(rsa_spki(OID_RSA_ENCRYPTION, 8192)),
        ),
        (
            "ML-DSA-44",
            self_signed_authority(&gen_key(&rcgen::PKCS_ML_DSA_44)),
        ),
        (
            "ML-DSA-65",
            self_signed_authority(&gen_key(&rcgen::PKCS_ML_DSA_65)),
        ),
        (
            "ML-DSA-87",
            self_signed_authority(&gen_key(&rcgen::PKCS_ML_DSA_87)),
        ),
    ];
    for (name, der) in &accepted {
        assert_eq!(authority_problem(der), None, "{name}");
    }

    let k1 =
        signature::EcdsaKeyPair::generate(&signature::ECDSA_P256K1_SHA256_ASN1_SIGNING).unwrap();
    let p256 =
        signature::EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    // A real P-256 x with y = 1: the hostile endpoint's JWT key, here as a CA key.
    let mut off_curve = p256.public_key().as_ref().to_vec();
    off_curve[33..].fill(0);
    off_curve[64] = 1;
    let refused: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "secp256k1",
            ec_spki(OID_SECP256K1, k1.public_key().as_ref()),
            "an EC key on curve 1.3.132.0.10 (secp256k1): the SVID verifier takes only P-256, P-384 and P-521",
        ),
        (
            "brainpoolP256r1",
            ec_spki(OID_BRAINPOOL_P256R1, p256.public_key().as_ref()),
            "an EC key on curve 1.3.36.3.3.2.8.1.1.7:",
        ),
        (
            "P-256 point off the curve",
            ec_spki(OID_P256, &off_curve),
            "the P-256 public key is not a point on the curve",
        ),
        (
            "RSA-1024",
            rsa_spki(OID_RSA_ENCRYPTION, 1024),
            "an RSA key of 1024 bits: at least 2048 are needed",
        ),
        (
            "RSA-8200",
            rsa_spki(OID_RSA_ENCRYPTION, 8200),
            "an RSA key of 8200 bits: the SVID verifier takes at most 8192",
        ),
        (
            "RSASSA-PSS key",
            rsa_spki(OID_RSASSA_PSS, 2048),
            "a key of algorithm 1.2.840.113549.1.1.10, which the SVID verifier cannot use",
        ),
        (
            "X25519",
            spki(OID_X25519, &[9; 32]),
            "a key of algorithm 1.3.101.110, which the SVID verifier cannot use",
        ),
    ];
    for (name, spki, want) in refused {
        let problem = authority_problem(&authority_with_spki(spki));
        assert!(
            problem.as_deref().is_some_and(|p| p.starts_with(want)),
            "{name}: {problem:?}"
        );
    }
    // The same synthetic builders make keys that pass, so the refusals above are about the key.
    assert_eq!(
        authority_problem(&authority_with_spki(ec_spki(
            OID_P256,
            p256.public_key().as_ref()
        ))),
        None
    );
    assert_eq!(
        authority_problem(&authority_with_spki(rsa_spki(OID_RSA_ENCRYPTION, 2048))),
        None
    );
}
