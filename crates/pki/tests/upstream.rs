//! The X.509 CA under an external PKI made by `openssl` (root → enterprise intermediate →
//! Tessera CA → SVID): the chain verifies with Tessera's verifier and with `openssl verify`, the
//! bundle holds the root, and two trust domains under one root cannot mint each other's IDs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use rcgen::{CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_pki::{
    DiskUpstream, Journal, PkiError, SvidTemplate, UpstreamAuthority, X509Authority,
};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_test_util::openssl::{EnterprisePki, enterprise_pki, openssl_verify};
use tessera_test_util::pem_block;
use tessera_tls::{PeerRole, verify_svid};

fn now() -> u64 {
    tessera_test_util::unix_now()
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn upstream(pki: &EnterprisePki, with_bundle: bool) -> DiskUpstream {
    let chain = std::fs::read(&pki.int_cert).unwrap();
    let key = std::fs::read(&pki.int_key).unwrap();
    let root = std::fs::read(&pki.root_cert).unwrap();
    DiskUpstream::from_pem(&chain, &key, with_bundle.then_some(root.as_slice())).unwrap()
}

fn csr() -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec()
}

fn sign(ca: &X509Authority, id: &str) -> Vec<Vec<u8>> {
    let tmpl = SvidTemplate {
        spiffe_id: SpiffeId::parse(id).unwrap(),
        dns_names: vec![],
        ttl_secs: 600,
    };
    ca.sign_x509_svid(&csr(), &tmpl, now()).unwrap().chain()
}

fn tessera_verify(chain: &[Vec<u8>], bundle: &Bundle) -> Result<SpiffeId, String> {
    let chain: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    verify_svid(&chain, bundle, UnixTime::now(), PeerRole::Client).map_err(|e| e.to_string())
}

fn pem_chain(certs: &[Vec<u8>]) -> String {
    certs.iter().map(|c| pem_block("CERTIFICATE", c)).collect()
}

#[test]
fn svids_under_an_openssl_enterprise_pki_chain_to_its_root() {
    let dir = tempfile::tempdir().unwrap();
    let pki = enterprise_pki(dir.path(), "Acme");
    let up = upstream(&pki, true);
    let root_der = pem::parse(std::fs::read(&pki.root_cert).unwrap())
        .unwrap()
        .into_contents();
    assert_eq!(up.x509_roots(), vec![root_der.clone()]);

    let a = td("a.example");
    let mut j = Journal::new_with(&a, now(), 3600, &mut |n, t| {
        X509Authority::from_upstream(&a, n, t, &up)
    })
    .unwrap();
    j.set_upstream_roots(up.x509_roots());
    let ca = &j.x509().active().authority;
    assert!(ca.is_upstream_signed());
    assert!(ca.not_after() <= up.not_after());

    // The bundle publishes the enterprise root, not Tessera's intermediate.
    let bundle = j.bundle().unwrap();
    assert_eq!(bundle.x509_authorities(), [root_der]);

    // leaf, Tessera CA, enterprise intermediate; the root is not sent.
    let chain = sign(ca, "spiffe://a.example/web");
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[1], ca.cert_der());
    assert_eq!(
        tessera_verify(&chain, &bundle).unwrap().as_str(),
        "spiffe://a.example/web"
    );
    // The independent check: OpenSSL builds the same path to the root.
    let out = openssl_verify(
        dir.path(),
        &pki.root_cert,
        &pem_chain(&chain[1..]),
        &pem_chain(&chain[..1]),
    )
    .unwrap();
    assert!(out.contains("OK"), "{out}");
    // Without the enterprise intermediate the chain is broken, for both.
    let short = vec![chain[0].clone(), chain[1].clone()];
    assert!(tessera_verify(&short, &bundle).is_err());
    assert!(
        openssl_verify(
            dir.path(),
            &pki.root_cert,
            &pem_chain(&short[1..]),
            &pem_chain(&short[..1])
        )
        .is_err()
    );

    // The journal round-trips the upstream chain.
    let back = Journal::from_bytes(&j.to_bytes()).unwrap();
    let chain2 = sign(&back.x509().active().authority, "spiffe://a.example/web");
    assert_eq!(chain2.len(), 3);
    assert!(tessera_verify(&chain2, &bundle).is_ok());
}

#[test]
fn two_trust_domains_under_one_root_cannot_mint_each_others_ids() {
    let dir = tempfile::tempdir().unwrap();
    let pki = enterprise_pki(dir.path(), "Acme");
    let up = upstream(&pki, true);
    let a = td("a.example");
    let b = td("b.example");
    let ca_a = X509Authority::from_upstream(&a, now(), 3600, &up).unwrap();
    let ca_b = X509Authority::from_upstream(&b, now(), 3600, &up).unwrap();
    let mut bundle_b = Bundle::new(b.clone());
    for r in up.x509_roots() {
        bundle_b.add_x509_authority(r).unwrap();
    }
    // B's own SVIDs verify against B's bundle (the shared root).
    assert!(tessera_verify(&sign(&ca_b, "spiffe://b.example/db"), &bundle_b).is_ok());

    // A's CA refuses to sign for B ...
    let tmpl = SvidTemplate {
        spiffe_id: SpiffeId::parse("spiffe://b.example/db").unwrap(),
        dns_names: vec![],
        ttl_secs: 600,
    };
    assert!(matches!(
        ca_a.sign_x509_svid(&csr(), &tmpl, now()),
        Err(PkiError::ForeignId { .. })
    ));
    // ... and a leaf for B made with A's CA key anyway (a compromised server of A) chains to
    // the shared root, which OpenSSL accepts, but Tessera's verifier refuses it: the issuing CA
    // names a.example.
    let issuer = Issuer::from_ca_cert_der(
        &ca_a.cert_der().into(),
        KeyPair::try_from(ca_a.key_pkcs8_der().as_slice()).unwrap(),
    )
    .unwrap();
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::OrganizationName, "Evil");
    p.subject_alt_names = vec![SanType::URI("spiffe://b.example/db".try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.use_authority_key_identifier_extension = true;
    let forged = p
        .signed_by(&KeyPair::generate().unwrap(), &issuer)
        .unwrap()
        .der()
        .to_vec();
    let mut chain = vec![forged];
    chain.extend(ca_a.svid_intermediates());
    assert!(
        openssl_verify(
            dir.path(),
            &pki.root_cert,
            &pem_chain(&chain[1..]),
            &pem_chain(&chain[..1])
        )
        .is_ok(),
        "path validation alone accepts it"
    );
    let err = tessera_verify(&chain, &bundle_b).unwrap_err();
    assert!(
        err.contains("CA of its chain is for spiffe://a.example"),
        "{err}"
    );
}

#[test]
fn bad_upstream_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let pki = enterprise_pki(dir.path(), "Acme");
    let other_dir = tempfile::tempdir().unwrap();
    let other = enterprise_pki(other_dir.path(), "Other");
    let read = |p: &std::path::Path| std::fs::read(p).unwrap();
    let err = |r: Result<DiskUpstream, PkiError>| r.unwrap_err().to_string();
    // A key that belongs to no certificate in the chain file.
    let e = err(DiskUpstream::from_pem(
        &read(&pki.int_cert),
        &read(&other.int_key),
        Some(&read(&pki.root_cert)),
    ));
    assert!(e.contains("belongs to no certificate"), "{e}");
    // A chain that does not reach the given root.
    let e = err(DiskUpstream::from_pem(
        &read(&pki.int_cert),
        &read(&pki.int_key),
        Some(&read(&other.root_cert)),
    ));
    assert!(e.contains("does not reach a root"), "{e}");
    // No root at all.
    let e = err(DiskUpstream::from_pem(
        &read(&pki.int_cert),
        &read(&pki.int_key),
        None,
    ));
    assert!(e.contains("no upstream root"), "{e}");
    // Garbage.
    let e = err(DiskUpstream::from_pem(b"junk", &read(&pki.int_key), None));
    assert!(e.contains("cert_chain_path"), "{e}");
    let e = err(DiskUpstream::from_pem(&read(&pki.int_cert), b"junk", None));
    assert!(e.contains("key_path"), "{e}");
    // The root itself may sign (chain file = the root): then nothing is sent but the CA.
    let up = DiskUpstream::from_pem(&read(&pki.root_cert), &read(&pki.root_key), None).unwrap();
    let ca = X509Authority::from_upstream(&td("a.example"), now(), 600, &up).unwrap();
    assert_eq!(ca.svid_intermediates().len(), 1);
    let mut bundle = Bundle::new(td("a.example"));
    bundle
        .add_x509_authority(up.x509_roots().remove(0))
        .unwrap();
    assert!(tessera_verify(&sign(&ca, "spiffe://a.example/x"), &bundle).is_ok());
}

/// Roots and intermediates that other verifiers (OpenSSL, Go, Envoy) would refuse every SVID
/// under are refused when the upstream is loaded, naming the problem; the root's validity
/// bounds the CAs made under it.
#[test]
fn upstream_chains_other_verifiers_would_refuse_are_refused_at_load() {
    use tessera_test_util::rcgen_pki;
    let load = |(root, int, key): (Vec<u8>, Vec<u8>, Vec<u8>)| {
        DiskUpstream::from_pem(&int, &key, Some(&root)).map_err(|e| e.to_string())
    };
    let e = load(rcgen_pki(|r| r.is_ca = IsCa::ExplicitNoCa, |_| {})).unwrap_err();
    assert!(e.contains("bundle_path") && e.contains("not a CA"), "{e}");
    let e = load(rcgen_pki(
        |r| r.key_usages = vec![KeyUsagePurpose::DigitalSignature],
        |_| {},
    ))
    .unwrap_err();
    assert!(e.contains("not a CA") && e.contains("keyCertSign"), "{e}");
    // Root pathLen 0 above an intermediate; intermediate pathLen 0 above the server's CA.
    let e = load(rcgen_pki(
        |r| r.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0)),
        |_| {},
    ))
    .unwrap_err();
    assert!(
        e.contains("bundle_path") && e.contains("pathLenConstraint 0") && e.contains("2 CA"),
        "{e}"
    );
    let e = load(rcgen_pki(
        |_| {},
        |i| i.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0)),
    ))
    .unwrap_err();
    assert!(
        e.contains("cert_chain_path") && e.contains("pathLenConstraint 0"),
        "{e}"
    );
    let up = load(rcgen_pki(
        |r| r.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(1)),
        |i| i.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0)),
    ));
    assert!(
        up.is_err(),
        "the intermediate's 0 leaves no room for the server's CA"
    );
    // Room for exactly what is below: accepted.
    let up = load(rcgen_pki(
        |r| r.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(2)),
        |i| i.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(1)),
    ))
    .unwrap();
    let ca = X509Authority::from_upstream(&td("a.example"), now(), 600, &up).unwrap();
    let mut bundle = Bundle::new(td("a.example"));
    bundle
        .add_x509_authority(up.x509_roots().remove(0))
        .unwrap();
    assert!(tessera_verify(&sign(&ca, "spiffe://a.example/x"), &bundle).is_ok());

    // An expired root: nothing can be made under it, and the error says why.
    let past = rcgen::date_time_ymd(2020, 1, 1);
    let up = load(rcgen_pki(
        |r| {
            r.not_before = past;
            r.not_after = rcgen::date_time_ymd(2021, 1, 1);
        },
        |_| {},
    ))
    .unwrap();
    let e = X509Authority::from_upstream(&td("a.example"), now(), 600, &up)
        .unwrap_err()
        .to_string();
    assert!(e.contains("expired"), "{e}");
    // A root that ends in an hour: the CA ends with it, not after it.
    let soon = now() + 3600;
    let up = load(rcgen_pki(
        |r| {
            r.not_after = time::OffsetDateTime::from_unix_timestamp(soon as i64).unwrap();
        },
        |_| {},
    ))
    .unwrap();
    let ca = X509Authority::from_upstream(&td("a.example"), now(), 86_400, &up).unwrap();
    assert!(ca.not_after() <= soon, "{} > {soon}", ca.not_after());
    // An upstream not valid yet.
    let up = load(rcgen_pki(
        |_| {},
        |i| {
            i.not_before =
                time::OffsetDateTime::from_unix_timestamp((now() + 86_400) as i64).unwrap();
        },
    ))
    .unwrap();
    let e = X509Authority::from_upstream(&td("a.example"), now(), 600, &up)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not valid before"), "{e}");
}

/// Two roots with one name (a root rollover): the one whose key signed the chain (by key
/// identifier) bounds the CA and has its pathLen checked, not the other.
#[test]
fn of_two_roots_with_one_name_the_signing_one_is_taken() {
    use tessera_test_util::rcgen_pki;
    let soon = now() + 3600;
    let (old_root, _, _) = rcgen_pki(
        |r| {
            r.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
            r.not_after = time::OffsetDateTime::from_unix_timestamp(soon as i64).unwrap();
        },
        |_| {},
    );
    let (new_root, int, key) = rcgen_pki(|_| {}, |_| {});
    let bundle = [old_root, new_root].concat();
    let up = DiskUpstream::from_pem(&int, &key, Some(&bundle)).unwrap();
    let ca = X509Authority::from_upstream(&td("a.example"), now(), 86_400, &up).unwrap();
    assert!(ca.not_after() > soon, "bounded by the other root");
}
