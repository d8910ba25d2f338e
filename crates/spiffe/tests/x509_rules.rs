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
