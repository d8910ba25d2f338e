//! The malformed-certificate matrix through the one verifier: every bad SVID is refused with the
//! rule it breaks, and a good one yields its SPIFFE ID.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_spiffe::{BundleSet, X509SvidError};
use tessera_test_util::rcgen::{BasicConstraints, IsCa, KeyUsagePurpose};
use tessera_test_util::{TestCa, non_critical_digital_signature_ku, uri_san};
use tessera_tls::{PeerRole, VerifyError, verify_svid};
use time::{Duration, OffsetDateTime};

fn bundles(cas: &[&TestCa]) -> BundleSet {
    let mut set = BundleSet::new();
    for ca in cas {
        set.insert(ca.bundle()).unwrap();
    }
    set
}

fn verify(chain: &[CertificateDer<'static>], set: &BundleSet) -> Result<String, VerifyError> {
    verify_svid(chain, set, UnixTime::now(), PeerRole::Client).map(|id| id.to_string())
}

#[test]
fn valid_svids_verify_directly_and_through_an_intermediate() {
    let ca = TestCa::new("example.org");
    let set = bundles(&[&ca]);
    let svid = ca.issue("spiffe://example.org/web");
    assert_eq!(
        verify(&svid.chain, &set).unwrap(),
        "spiffe://example.org/web"
    );
    assert_eq!(
        verify_svid(&svid.chain, &set, UnixTime::now(), PeerRole::Server)
            .unwrap()
            .as_str(),
        "spiffe://example.org/web"
    );
    let svid = ca
        .intermediate()
        .intermediate()
        .issue("spiffe://example.org/web");
    assert_eq!(svid.chain.len(), 3);
    assert_eq!(
        verify(&svid.chain, &set).unwrap(),
        "spiffe://example.org/web"
    );
    // Without the intermediates the path cannot be built.
    assert!(matches!(
        verify(&svid.chain[..1], &set),
        Err(VerifyError::Chain { .. })
    ));
}

#[test]
fn malformed_svids_are_refused_with_the_rule_they_break() {
    let ca = TestCa::new("example.org");
    let set = bundles(&[&ca]);
    type Edit = fn(&mut tessera_test_util::rcgen::CertificateParams);
    let rows: &[(&str, &str, Edit, &str)] = &[
        (
            "two URI SANs",
            "spiffe://example.org/a",
            |p| p.subject_alt_names.push(uri_san("spiffe://example.org/b")),
            "2 URI SANs",
        ),
        (
            "CA leaf",
            "spiffe://example.org/a",
            |p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained),
            "cA=true",
        ),
        (
            "keyCertSign leaf",
            "spiffe://example.org/a",
            |p| p.key_usages.push(KeyUsagePurpose::KeyCertSign),
            "keyCertSign",
        ),
        (
            "missing key usage",
            "spiffe://example.org/a",
            |p| p.key_usages.clear(),
            "no key usage extension",
        ),
        (
            "non-critical key usage",
            "spiffe://example.org/a",
            |p| {
                p.key_usages.clear();
                p.custom_extensions
                    .push(non_critical_digital_signature_ku());
            },
            "MUST be marked critical",
        ),
        ("no path", "spiffe://example.org", |_| {}, "non-root path"),
        (
            "wrong scheme",
            "https://example.org/a",
            |_| {},
            "scheme must be `spiffe://`",
        ),
        (
            "expired",
            "spiffe://example.org/a",
            |p| {
                p.not_before = OffsetDateTime::now_utc() - Duration::hours(2);
                p.not_after = OffsetDateTime::now_utc() - Duration::hours(1);
            },
            "expired",
        ),
        (
            "not yet valid",
            "spiffe://example.org/a",
            |p| {
                p.not_before = OffsetDateTime::now_utc() + Duration::hours(1);
                p.not_after = OffsetDateTime::now_utc() + Duration::hours(2);
            },
            "not valid yet",
        ),
    ];
    for (name, id, edit, want) in rows {
        let svid = ca.issue_with(id, *edit);
        let err = verify(&svid.chain, &set).unwrap_err().to_string();
        assert!(err.contains(want), "{name}: {err}");
    }
}

#[test]
fn an_svid_is_checked_only_against_its_own_trust_domain() {
    let ca = TestCa::new("example.org");
    let other = TestCa::new("other.org");
    // Wrong trust domain: example.org's CA signs an ID of other.org. With only example.org's
    // bundle there is no bundle for the ID; with both, other.org's roots do not verify it.
    let svid = ca.issue("spiffe://other.org/web");
    assert!(matches!(
        verify(&svid.chain, &bundles(&[&ca])),
        Err(VerifyError::NoBundle { .. })
    ));
    let err = verify(&svid.chain, &bundles(&[&ca, &other])).unwrap_err();
    assert!(
        matches!(&err, VerifyError::Chain { trust_domain, .. } if trust_domain == "other.org"),
        "{err}"
    );
    assert!(err.to_string().contains("unknown issuer"), "{err}");
}

#[test]
fn a_foreign_ca_of_the_same_name_is_not_trusted() {
    let ca = TestCa::new("example.org");
    let impostor = TestCa::new("example.org");
    let svid = impostor.issue("spiffe://example.org/web");
    // Both CAs have the same subject name, so webpki finds the real root as the issuer by name and
    // the impostor's signature fails to verify under its key.
    let err = verify(&svid.chain, &bundles(&[&ca])).unwrap_err();
    assert!(matches!(err, VerifyError::Chain { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("a signature in the chain does not verify"),
        "{err}"
    );
    // The impostor's own bundle does trust it: the refusal above is about the anchor, not the leaf.
    assert!(verify(&svid.chain, &bundles(&[&impostor])).is_ok());
}

#[test]
fn a_chain_with_an_extra_non_ca_certificate_is_refused() {
    let ca = TestCa::new("example.org");
    let mut svid = ca.issue("spiffe://example.org/web");
    svid.chain
        .push(ca.issue("spiffe://example.org/other").chain[0].clone());
    assert_eq!(
        verify(&svid.chain, &bundles(&[&ca])),
        Err(VerifyError::Svid(X509SvidError::SigningNotCa { index: 1 }))
    );
}

#[test]
fn an_empty_bundle_trusts_nothing() {
    // Trust Domain and Bundle §4.1.3: an empty key set revokes everything.
    let ca = TestCa::new("example.org");
    let mut set = BundleSet::new();
    set.insert(tessera_spiffe::Bundle::new(ca.trust_domain.clone()))
        .unwrap();
    let svid = ca.issue("spiffe://example.org/web");
    assert!(matches!(
        verify(&svid.chain, &set),
        Err(VerifyError::EmptyBundle { .. })
    ));
    assert!(matches!(
        verify(&[], &set),
        Err(VerifyError::Svid(X509SvidError::EmptyChain))
    ));
}

#[test]
fn an_issuing_ca_may_omit_a_spiffe_id_but_never_name_another_trust_domain() {
    // X509-SVID §3.2: a signing certificate's SPIFFE ID is optional (SHOULD); when present it
    // must be the leaf's trust domain (Tessera makes the SHOULD a MUST).
    let root = TestCa::new("example.org");
    let set = bundles(&[&root]);
    let plain = root.intermediate_with(|p| p.subject_alt_names.clear());
    let svid = plain.issue("spiffe://example.org/web");
    assert_eq!(
        verify(&svid.chain, &set).unwrap(),
        "spiffe://example.org/web"
    );
    let other = root.intermediate_with(|p| {
        p.subject_alt_names = vec![uri_san("spiffe://other.example")];
    });
    let svid = other.issue("spiffe://example.org/web");
    let err = verify(&svid.chain, &set).unwrap_err().to_string();
    assert!(
        err.contains("CA of its chain is for spiffe://other.example"),
        "{err}"
    );
}

#[test]
fn no_ca_anywhere_in_the_path_may_name_another_trust_domain() {
    // Trust domains sharing a root: other.example's CA (under example.org's root here, the shared
    // root of an upstream authority) signs a sub-CA that names no trust domain, which signs a
    // leaf of example.org. The leaf's own issuer names nothing, but a CA above it is another
    // trust domain's: its key could mint any identity below it (X509-SVID §3.2, made a MUST).
    let root = TestCa::new("example.org");
    let set = bundles(&[&root]);
    let foreign = root.intermediate_with(|p| {
        p.subject_alt_names = vec![uri_san("spiffe://other.example")];
    });
    let unnamed = foreign.intermediate_with(|p| p.subject_alt_names.clear());
    let svid = unnamed.issue("spiffe://example.org/payments");
    let err = verify(&svid.chain, &set).unwrap_err().to_string();
    assert!(
        err.contains("CA of its chain is for spiffe://other.example"),
        "{err}"
    );
    // The same depth with CAs that are example.org's or name nothing is accepted.
    let own = root.intermediate();
    let unnamed = own.intermediate_with(|p| p.subject_alt_names.clear());
    let svid = unnamed.issue("spiffe://example.org/payments");
    assert_eq!(
        verify(&svid.chain, &set).unwrap(),
        "spiffe://example.org/payments"
    );
}
