//! X509-SVID issuance from CSRs: every rule of `X509Authority::sign_x509_svid`, checked on the
//! certificate that comes out and through the project's one verifier (`tessera_tls::verify_svid`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::time::Duration;

use rcgen::{
    CertificateParams, CustomExtension, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, PublicKeyData as _, RsaKeySize, SanType,
};
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_pki::{PkiError, SvidTemplate, X509Authority};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain, validate_svid_chain};
use tessera_test_util::TestCa;
use tessera_tls::{PeerRole, verify_svid};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

const NOW: u64 = 1_750_000_000;
const DAY: u64 = 86_400;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn ca() -> X509Authority {
    X509Authority::self_signed(&td(), NOW, DAY).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn tmpl(spiffe_id: &str) -> SvidTemplate {
    SvidTemplate {
        spiffe_id: id(spiffe_id),
        dns_names: Vec::new(),
        ttl_secs: 3600,
    }
}

fn csr(key: &KeyPair) -> Vec<u8> {
    CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn p256_csr() -> Vec<u8> {
    csr(&KeyPair::generate().unwrap())
}

fn bundle(ca: &X509Authority) -> Bundle {
    let mut b = Bundle::new(ca.trust_domain().clone());
    b.add_x509_authority(ca.cert_der().to_vec()).unwrap();
    b
}

fn at(secs: u64) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(secs))
}

/// The issued certificate must be accepted by the verifier every peer uses, in both roles.
fn assert_verifies(ca: &X509Authority, der: &[u8], when: u64, want: &str) {
    let chain = [CertificateDer::from(der)];
    for role in [PeerRole::Client, PeerRole::Server] {
        let got = verify_svid(&chain, &bundle(ca), at(when), role).unwrap();
        assert_eq!(got.as_str(), want);
    }
    assert_eq!(validate_svid_chain(&chain).unwrap().as_str(), want);
}

fn parse(der: &[u8]) -> X509Certificate<'_> {
    let (rest, cert) = X509Certificate::from_der(der).unwrap();
    assert!(rest.is_empty());
    cert
}

fn uri_sans(cert: &X509Certificate<'_>) -> Vec<String> {
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn issued_svid_verifies_with_the_tls_verifier_against_a_bundle_holding_the_ca() {
    let ca = ca();
    let svid = ca
        .sign_x509_svid(
            &p256_csr(),
            &tmpl("spiffe://example.org/ns/prod/sa/api"),
            NOW,
        )
        .unwrap();
    assert_verifies(
        &ca,
        &svid.cert_der,
        NOW,
        "spiffe://example.org/ns/prod/sa/api",
    );
    // And not against another CA of the same trust domain.
    let other = X509Authority::self_signed(&td(), NOW, DAY).unwrap();
    let chain = [CertificateDer::from(svid.cert_der.as_slice())];
    assert!(verify_svid(&chain, &bundle(&other), at(NOW), PeerRole::Client).is_err());
}

#[test]
fn the_ca_certificate_is_a_signing_certificate_of_the_trust_domain() {
    let ca = ca();
    let cert = parse(ca.cert_der());
    assert_eq!(uri_sans(&cert), ["spiffe://example.org"]);
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.critical && bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical, "X509-SVID §4.3: key usage is critical");
    assert!(ku.value.key_cert_sign() && ku.value.crl_sign() && ku.value.digital_signature());
    assert!(
        cert.name_constraints().unwrap().is_none(),
        "webpki fails every chain under URI name constraints"
    );
    assert_eq!(ca.not_before(), NOW - 10, "backdated for clock skew");
    assert_eq!(ca.not_after(), NOW + DAY);
    assert_eq!(cert.validity().not_before.timestamp() as u64, NOW - 10);
    assert_eq!(cert.validity().not_after.timestamp() as u64, NOW + DAY);
    let subject = cert.subject().to_string();
    assert!(subject.contains("O=Tessera"), "{subject}");
    assert!(subject.contains("CN=example.org CA "), "{subject}");
    assert_eq!(
        ca.serial_hex(),
        hex::encode(cert.raw_serial()).trim_start_matches("00")
    );
    assert_ne!(
        ca.serial_hex(),
        X509Authority::self_signed(&td(), NOW, DAY)
            .unwrap()
            .serial_hex()
    );
    assert!(matches!(
        X509Authority::self_signed(&td(), NOW, 0),
        Err(PkiError::ZeroTtl { .. })
    ));
}

#[test]
fn a_long_trust_domain_still_gets_a_common_name_within_64_characters() {
    let long = TrustDomain::new(&format!("{}.example.org", "a".repeat(200))).unwrap();
    let ca = X509Authority::self_signed(&long, NOW, DAY).unwrap();
    let cert = parse(ca.cert_der());
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned();
    assert!(cn.len() <= 64, "{cn}");
    assert_eq!(uri_sans(&cert), [long.id().to_string()]);
}

#[test]
fn leaf_carries_exactly_the_svid_extensions() {
    let ca = ca();
    let mut t = tmpl("spiffe://example.org/web");
    t.dns_names = vec!["web.example.org".into(), "*.web.internal".into()];
    let svid = ca.sign_x509_svid(&p256_csr(), &t, NOW).unwrap();
    let cert = parse(&svid.cert_der);

    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.critical, "X509-SVID §4.3: key usage MUST be critical");
    assert!(ku.value.digital_signature());
    assert_eq!(ku.value.flags, 1, "digitalSignature only");
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(
        !bc.value.ca,
        "X509-SVID §4.1: cA=false, and the extension present"
    );
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.any && eku.other.is_empty());
    assert_eq!(uri_sans(&cert), ["spiffe://example.org/web"]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let dns: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some(*d),
            _ => None,
        })
        .collect();
    assert_eq!(dns, ["web.example.org", "*.web.internal"]);
    assert!(
        !san.critical,
        "subject is not empty, so the SAN need not be critical"
    );
    assert_eq!(cert.subject().to_string(), "O=Tessera");
    assert_eq!(cert.issuer(), parse(ca.cert_der()).subject());

    // The authority key identifier names this CA's key.
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => aki.key_identifier.as_ref(),
            _ => None,
        })
        .unwrap();
    assert_eq!(hex::encode(aki.0), ca.subject_key_id());

    assert_eq!(
        svid.serial_hex,
        hex::encode(cert.raw_serial()).trim_start_matches("00")
    );
    assert!(
        svid.serial_hex.len() >= 30,
        "about 128 random bits: {}",
        svid.serial_hex
    );
    let again = ca.sign_x509_svid(&p256_csr(), &t, NOW).unwrap();
    assert_ne!(again.serial_hex, svid.serial_hex);
    assert_verifies(&ca, &svid.cert_der, NOW, "spiffe://example.org/web");
}

#[test]
fn the_csr_subject_and_requested_extensions_are_ignored() {
    let ca = ca();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "root of everything");
    dn.push(DnType::OrganizationName, "Mallory");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![
        SanType::URI("spiffe://example.org/admin".try_into().unwrap()),
        SanType::URI("spiffe://other.org/x".try_into().unwrap()),
        SanType::DnsName("evil.example".try_into().unwrap()),
    ];
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::CodeSigning];
    // rcgen does not put BasicConstraints in a CSR by itself: ask for cA=true by hand.
    let mut bc =
        CustomExtension::from_oid_content(&[2, 5, 29, 19], vec![0x30, 0x03, 0x01, 0x01, 0xff]);
    bc.set_criticality(true);
    p.custom_extensions = vec![bc];
    let request = p.serialize_request(&key).unwrap().der().to_vec();

    let svid = ca
        .sign_x509_svid(&request, &tmpl("spiffe://example.org/web"), NOW)
        .unwrap();
    let cert = parse(&svid.cert_der);
    assert_eq!(uri_sans(&cert), ["spiffe://example.org/web"]);
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1, "no DNS name from the CSR");
    assert!(!cert.basic_constraints().unwrap().unwrap().value.ca);
    assert_eq!(cert.key_usage().unwrap().unwrap().value.flags, 1);
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && eku.client_auth && !eku.code_signing);
    assert_eq!(cert.subject().to_string(), "O=Tessera");
    // The key is the CSR's.
    assert_eq!(
        cert.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    assert_verifies(&ca, &svid.cert_der, NOW, "spiffe://example.org/web");
}

#[test]
fn a_csr_whose_signature_does_not_verify_is_refused() {
    let ca = ca();
    let good = p256_csr();
    // Flip a bit of the signature...
    let mut bad_sig = good.clone();
    *bad_sig.last_mut().unwrap() ^= 0x01;
    assert_eq!(
        ca.sign_x509_svid(&bad_sig, &tmpl("spiffe://example.org/web"), NOW),
        Err(PkiError::CsrSignature)
    );
    // ...or of the signed content (inside the subject name).
    let mut bad_body = good.clone();
    let cn = bad_body.windows(5).position(|w| w == b"rcgen").unwrap();
    bad_body[cn] ^= 0x01;
    assert_eq!(
        ca.sign_x509_svid(&bad_body, &tmpl("spiffe://example.org/web"), NOW),
        Err(PkiError::CsrSignature)
    );
    // A CSR signed by another key than the one it carries: swap in another key's SPKI.
    let other = KeyPair::generate().unwrap();
    let mine = KeyPair::generate().unwrap();
    let mut swapped = csr(&mine);
    let at = swapped
        .windows(65)
        .position(|w| w == mine.public_key_raw())
        .unwrap();
    swapped[at..at + 65].copy_from_slice(other.public_key_raw());
    assert_eq!(
        ca.sign_x509_svid(&swapped, &tmpl("spiffe://example.org/web"), NOW),
        Err(PkiError::CsrSignature)
    );
    assert!(
        ca.sign_x509_svid(&good, &tmpl("spiffe://example.org/web"), NOW)
            .is_ok()
    );
}

#[test]
fn rsa_p384_and_ed25519_csrs_are_signed() {
    let ca = ca();
    let keys = [
        KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap(),
        KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, RsaKeySize::_2048).unwrap(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA384, RsaKeySize::_3072).unwrap(),
        KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA512, RsaKeySize::_4096).unwrap(),
    ];
    for key in &keys {
        let svid = ca
            .sign_x509_svid(&csr(key), &tmpl("spiffe://example.org/k"), NOW)
            .unwrap_or_else(|e| panic!("{:?}: {e}", key.algorithm()));
        let cert = parse(&svid.cert_der);
        assert_eq!(
            cert.public_key().raw,
            key.subject_public_key_info().as_slice(),
            "{:?}: the certificate holds exactly the CSR's key",
            key.algorithm()
        );
        assert_verifies(&ca, &svid.cert_der, NOW, "spiffe://example.org/k");
    }
}

#[test]
fn unsupported_keys_and_signature_algorithms_are_refused_by_name() {
    let ca = ca();
    let p521 = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
    let err = ca
        .sign_x509_svid(&csr(&p521), &tmpl("spiffe://example.org/k"), NOW)
        .unwrap_err();
    assert!(matches!(err, PkiError::UnsupportedKey { .. }), "{err}");
    assert!(
        err.to_string().contains("1.3.132.0.35"),
        "names the curve: {err}"
    );

    // A 1024-bit RSA key: refused for its size before its signature is even looked at.
    let rsa1024 = handmade_csr(
        &rsa_spki(128),
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ],
    );
    assert_eq!(
        ca.sign_x509_svid(&rsa1024, &tmpl("spiffe://example.org/k"), NOW),
        Err(PkiError::RsaKeySize { bits: 1024 })
    );
    let rsa8192 = handmade_csr(
        &rsa_spki(1024),
        &[
            0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b,
        ],
    );
    assert_eq!(
        ca.sign_x509_svid(&rsa8192, &tmpl("spiffe://example.org/k"), NOW),
        Err(PkiError::RsaKeySize { bits: 8192 })
    );
    // A P-256 key with an RSA signature algorithm (sha1WithRSAEncryption).
    let key = KeyPair::generate().unwrap();
    let p256_spki = key.subject_public_key_info();
    let sha1_rsa = [
        0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05,
    ];
    let err = ca
        .sign_x509_svid(
            &handmade_csr(&p256_spki, &sha1_rsa),
            &tmpl("spiffe://example.org/k"),
            NOW,
        )
        .unwrap_err();
    assert!(
        matches!(&err, PkiError::UnsupportedCsrSignature { algorithm, key } if algorithm == "1.2.840.113549.1.1.5" && *key == "EC P-256"),
        "{err}"
    );
}

#[test]
fn not_after_is_capped_at_the_cas_and_not_before_is_backdated() {
    let ca = X509Authority::self_signed(&td(), NOW, 3600).unwrap();
    let mut t = tmpl("spiffe://example.org/web");
    t.ttl_secs = 7200;
    let later = NOW + 1000;
    let svid = ca.sign_x509_svid(&p256_csr(), &t, later).unwrap();
    assert_eq!(svid.not_after, ca.not_after(), "never beyond the CA");
    assert_eq!(svid.not_before, later - 10, "backdated 10 s for clock skew");
    let cert = parse(&svid.cert_der);
    assert_eq!(cert.validity().not_after.timestamp() as u64, ca.not_after());
    assert_eq!(cert.validity().not_before.timestamp() as u64, later - 10);

    t.ttl_secs = 60;
    let short = ca.sign_x509_svid(&p256_csr(), &t, later).unwrap();
    assert_eq!(short.not_after, later + 60);
    assert_eq!(
        parse(&short.cert_der).validity().not_after.timestamp() as u64,
        later + 60
    );
    // Just after the CA was made, the backdating stops at the CA's own notBefore.
    let fresh = ca.sign_x509_svid(&p256_csr(), &t, NOW).unwrap();
    assert_eq!(fresh.not_before, ca.not_before());
    assert_verifies(&ca, &svid.cert_der, later - 5, "spiffe://example.org/web");
}

#[test]
fn templates_that_break_a_rule_are_refused() {
    let ca = ca();
    let csr = p256_csr();
    let sign = |t: &SvidTemplate, now| ca.sign_x509_svid(&csr, t, now);
    assert!(matches!(
        sign(&tmpl("spiffe://example.org"), NOW),
        Err(PkiError::RootId { .. })
    ));
    assert!(matches!(
        sign(&tmpl("spiffe://other.org/web"), NOW),
        Err(PkiError::ForeignId { .. })
    ));
    let mut zero = tmpl("spiffe://example.org/web");
    zero.ttl_secs = 0;
    assert!(matches!(sign(&zero, NOW), Err(PkiError::ZeroTtl { .. })));
    let mut bad_dns = tmpl("spiffe://example.org/web");
    bad_dns.dns_names = vec!["ok.example".into(), "bad name".into()];
    let err = sign(&bad_dns, NOW).unwrap_err();
    assert!(err.to_string().contains("\"bad name\""), "{err}");
    assert_eq!(
        sign(&tmpl("spiffe://example.org/web"), NOW + DAY),
        Err(PkiError::CaExpired {
            not_after: NOW + DAY,
            now: NOW + DAY
        })
    );
    assert!(matches!(
        sign(&tmpl("spiffe://example.org/web"), NOW - 11),
        Err(PkiError::CaNotYetValid { .. })
    ));
}

#[test]
fn a_restored_ca_signs_like_the_original() {
    let ca = ca();
    let restored = X509Authority::from_parts(ca.cert_der(), &ca.key_pkcs8_der()).unwrap();
    assert_eq!(restored.cert_der(), ca.cert_der());
    assert_eq!(restored.serial_hex(), ca.serial_hex());
    assert_eq!(restored.subject_key_id(), ca.subject_key_id());
    assert_eq!(
        (restored.not_before(), restored.not_after()),
        (ca.not_before(), ca.not_after())
    );
    assert_eq!(restored.trust_domain(), &td());
    let svid = restored
        .sign_x509_svid(&p256_csr(), &tmpl("spiffe://example.org/web"), NOW)
        .unwrap();
    // Verifies against a bundle holding the original certificate.
    assert_verifies(&ca, &svid.cert_der, NOW, "spiffe://example.org/web");
}

#[test]
fn restoring_refuses_a_wrong_key_a_leaf_and_name_constraints() {
    let ca = ca();
    let other = X509Authority::self_signed(&td(), NOW, DAY).unwrap();
    assert!(matches!(
        X509Authority::from_parts(ca.cert_der(), &other.key_pkcs8_der()),
        Err(PkiError::CaKey(m)) if m.contains("does not belong")
    ));
    assert!(matches!(
        X509Authority::from_parts(ca.cert_der(), b"junk"),
        Err(PkiError::CaKey(_))
    ));
    assert!(matches!(
        X509Authority::from_parts(b"junk", &ca.key_pkcs8_der()),
        Err(PkiError::CaCertificate(_))
    ));
    let mut trailing = ca.cert_der().to_vec();
    trailing.push(0);
    assert!(matches!(
        X509Authority::from_parts(&trailing, &ca.key_pkcs8_der()),
        Err(PkiError::CaCertificate(m)) if m.contains("trailing")
    ));

    // A leaf SVID with its own key is not a CA.
    let test_ca = TestCa::new("example.org");
    let leaf = test_ca.issue("spiffe://example.org/web");
    let err = X509Authority::from_parts(leaf.leaf(), leaf.key.secret_pkcs8_der()).unwrap_err();
    assert!(err.to_string().contains("not a CA"), "{err}");

    // A CA with URI name constraints would break every chain under rustls-webpki.
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::default();
    p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org".try_into().unwrap())];
    p.name_constraints = Some(rcgen::NameConstraints {
        permitted_subtrees: vec![rcgen::GeneralSubtree::DnsName("example.org".into())],
        excluded_subtrees: vec![],
    });
    let cert = p.self_signed(&key).unwrap();
    let err = X509Authority::from_parts(cert.der(), &key.serialize_der()).unwrap_err();
    assert!(err.to_string().contains("name constraints"), "{err}");

    // A CA whose URI SAN has a path is not a signing certificate of a trust domain (§3.2).
    p.name_constraints = None;
    p.subject_alt_names = vec![SanType::URI("spiffe://example.org/ca".try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    let err = X509Authority::from_parts(cert.der(), &key.serialize_der()).unwrap_err();
    assert!(err.to_string().contains("X509-SVID §3.2"), "{err}");
}

#[test]
fn debug_output_never_shows_the_private_key() {
    let ca = ca();
    let key = ca.key_pkcs8_der();
    let shown = format!("{ca:?}");
    assert!(shown.contains(ca.serial_hex()));
    assert!(!shown.contains(&hex::encode(&key[key.len() - 32..])));
}

// --- a minimal DER writer for CSRs rcgen cannot make ---

use tessera_test_util::der;

/// An rsaEncryption SPKI with a modulus of `bytes` bytes (top bit set) and exponent 65537.
fn rsa_spki(bytes: usize) -> Vec<u8> {
    let mut modulus = vec![0u8];
    modulus.push(0xc1);
    modulus.extend(std::iter::repeat_n(0x5a, bytes - 1));
    let rsa_key = der(0x30, &[der(0x02, &modulus), der(0x02, &[1, 0, 1])].concat());
    let alg = der(
        0x30,
        &[
            vec![
                0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01,
            ],
            vec![0x05, 0x00],
        ]
        .concat(),
    );
    let mut bits = vec![0u8];
    bits.extend(rsa_key);
    der(0x30, &[alg, der(0x03, &bits)].concat())
}

/// A CSR with this SPKI and signature algorithm OID, and a signature of junk.
fn handmade_csr(spki: &[u8], sig_oid: &[u8]) -> Vec<u8> {
    let info = der(
        0x30,
        &[
            der(0x02, &[0]),
            der(0x30, &[]),
            spki.to_vec(),
            der(0xa0, &[]),
        ]
        .concat(),
    );
    let alg = der(0x30, sig_oid);
    der(0x30, &[info, alg, der(0x03, &[0, 0x30, 0x00])].concat())
}
