//! The rules of federation that need no I/O: which fetched bundle is accepted, and when to fetch
//! next. Pure, so that every rule has a table test.

use tessera_spiffe::{Bundle, TrustDomain};

/// Parses a bundle fetched (or given) for `td` and refuses one that would trust nothing (no
/// authority at all), one whose X.509 authority cannot be an anchor (see
/// `tessera_spiffe::x509::authority_problem`), and one that belongs to another trust
/// domain. A SPIFFE bundle does not name its trust domain, but each X.509 authority of a SPIFFE
/// CA carries `spiffe://<td>` (X509-SVID §3.2): an authority naming another trust domain means
/// the endpoint served someone else's bundle. Accepting it would let that trust domain's CA mint
/// identities of `td` — trust domains are never merged (SPIFFE Federation §2, Trust Domain and
/// Bundle §4: a bundle holds the authorities of exactly one trust domain).
///
/// A bundle whose X.509 authorities have all expired by `now` (Unix seconds) is refused as well
/// ([`all_authorities_expired`]).
pub(crate) fn accept_bundle(td: &TrustDomain, json: &[u8], now: u64) -> Result<Bundle, String> {
    let bundle =
        Bundle::parse(td.clone(), json).map_err(|e| format!("not a SPIFFE bundle of {td}: {e}"))?;
    if bundle.x509_authorities().is_empty() && bundle.jwt_authorities().is_empty() {
        return Err(format!(
            "the bundle of {td} has no X.509 or JWT authorities: it would trust nothing"
        ));
    }
    for (i, der) in bundle.x509_authorities().iter().enumerate() {
        if let Some(problem) = tessera_spiffe::x509::authority_problem(der) {
            return Err(format!("X.509 authority {i}: {problem}"));
        }
        if let Some(other) = tessera_spiffe::x509::uri_trust_domains(der)
            .into_iter()
            .find(|t| t != td)
        {
            return Err(format!(
                "the bundle is of trust domain {other}, not {td}: X.509 authority {i} names spiffe://{other} (trust domains are never merged)"
            ));
        }
    }
    if let Some(latest) = all_authorities_expired(&bundle, now) {
        return Err(format!(
            "every X.509 authority of the bundle of {td} has expired (the last one at {latest}): a bundle needs a current X.509 authority"
        ));
    }
    Ok(bundle)
}

/// When the bundle has X.509 authorities and every one has expired by `now`, the latest
/// `notAfter` among them (as text); `None` otherwise (a bundle with some expired and some valid
/// authorities is fine: that is a rotation in progress).
///
/// Why refuse it: a trust domain that is maintained always publishes its current CA, so a bundle
/// that holds only expired ones is broken or hostile, and accepting it would replace the last good
/// bundle (a black-box test's endpoint served a lone expired CA, and it was stored). webpki, our
/// own verifier, does not check a trust anchor's dates (RFC 5280 §6.1 leaves them out of path
/// validation), but the verifiers this bundle is handed to over the Workload API do (Go's
/// crypto/x509 in go-spiffe, OpenSSL/BoringSSL in Envoy): for them it trusts nothing. And with
/// `https_spiffe` it would lock the relationship out: the next fetch is authenticated against
/// the stored bundle, which no longer holds the CA that signed the endpoint's current SVID, so a
/// fixed bundle could never be fetched again. Keeping the last good bundle lets the partner fix
/// its endpoint.
fn all_authorities_expired(bundle: &Bundle, now: u64) -> Option<String> {
    let now = i64::try_from(now).unwrap_or(i64::MAX);
    let mut latest: Option<(i64, String)> = None;
    for der in bundle.x509_authorities() {
        // Every authority parsed when the bundle did; one whose date cannot be read (never the
        // case) leaves the bundle to the other checks rather than refusing it here.
        let (at, text) = tessera_spiffe::x509::not_after(der)?;
        // RFC 5280 §4.1.2.5: a certificate is valid through its notAfter second.
        if at >= now {
            return None;
        }
        if latest.as_ref().is_none_or(|(t, _)| at > *t) {
            latest = Some((at, text));
        }
    }
    latest.map(|(_, text)| text)
}

/// Refresh bounds, in seconds (`[federation]` in the server config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub(crate) floor: u64,
    pub(crate) ceiling: u64,
    pub(crate) default: u64,
}

impl Schedule {
    /// Seconds until the next fetch after a success: the bundle's `spiffe_refresh_hint` (Trust
    /// Domain and Bundle §4.1.2), or our default without one, kept within floor and ceiling —
    /// a hostile hint can neither make us hammer the endpoint nor stop us refreshing.
    pub(crate) fn after_success(&self, hint: Option<u64>) -> u64 {
        hint.unwrap_or(self.default)
            .clamp(self.floor, self.ceiling.max(self.floor))
    }

    /// Seconds until the next fetch after `failures` consecutive failures (at least 1): the
    /// floor, doubled per further failure, at most the ceiling. The last good bundle is kept
    /// meanwhile.
    pub(crate) fn after_failure(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(32);
        self.floor
            .saturating_mul(1u64 << doublings)
            .min(self.ceiling.max(self.floor))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_test_util::{der, with_spki};

    fn accept_bundle_now(td: &TrustDomain, json: &[u8]) -> Result<Bundle, String> {
        accept_bundle(td, json, crate::ca::unix_now())
    }

    fn ca_params(td: &str) -> rcgen::CertificateParams {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("{td} ca"));
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p.subject_alt_names = vec![tessera_test_util::uri_san(&format!("spiffe://{td}"))];
        p
    }

    fn bundle_of(td: &TrustDomain, authorities: &[&[u8]]) -> Vec<u8> {
        let mut b = Bundle::new(td.clone());
        for der in authorities {
            b.add_x509_authority(der.to_vec()).unwrap();
        }
        b.to_json().into_bytes()
    }

    /// Whether `verify_svid` (the verifier of every TLS handshake) trusts `leaf` under a bundle
    /// holding only `ca`.
    fn verifies(td: &TrustDomain, ca: &[u8], leaf: &[u8]) -> Result<(), String> {
        let bundle = Bundle::parse(td.clone(), &bundle_of(td, &[ca])).unwrap();
        tessera_tls::verify_svid(
            &[rustls::pki_types::CertificateDer::from(leaf)],
            &bundle,
            tessera_tls::now(),
            tessera_tls::PeerRole::Client,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    }

    /// `tessera_spiffe::x509::authority_key_problem` must accept exactly the keys the verifier
    /// can use. Every kind it accepts anchors a real SVID through `verify_svid`.
    #[test]
    fn every_kind_of_authority_key_accepted_is_one_verify_svid_can_use() {
        let td = TrustDomain::new("b.test").unwrap();
        let gen_key = |alg| rcgen::KeyPair::generate_for(alg).unwrap();
        let rsa = |size| rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, size).unwrap();
        let kinds = [
            ("P-256", gen_key(&rcgen::PKCS_ECDSA_P256_SHA256)),
            ("P-384", gen_key(&rcgen::PKCS_ECDSA_P384_SHA384)),
            ("P-521", gen_key(&rcgen::PKCS_ECDSA_P521_SHA512)),
            ("Ed25519", gen_key(&rcgen::PKCS_ED25519)),
            ("RSA-2048", rsa(rcgen::RsaKeySize::_2048)),
            ("RSA-4096", rsa(rcgen::RsaKeySize::_4096)),
            ("ML-DSA-44", gen_key(&rcgen::PKCS_ML_DSA_44)),
            ("ML-DSA-65", gen_key(&rcgen::PKCS_ML_DSA_65)),
            ("ML-DSA-87", gen_key(&rcgen::PKCS_ML_DSA_87)),
        ];
        for (name, key) in kinds {
            let params = ca_params("b.test");
            let ca = params.self_signed(&key).unwrap().der().to_vec();
            let issuer = rcgen::Issuer::new(params, key);
            let leaf = tessera_test_util::TestCa::leaf_params("spiffe://b.test/w")
                .signed_by(&rcgen::KeyPair::generate().unwrap(), &issuer)
                .unwrap()
                .der()
                .to_vec();
            accept_bundle_now(&td, &bundle_of(&td, &[&ca]))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            verifies(&td, &ca, &leaf).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// An ECDSA key of aws-lc-rs as an rcgen signer: lets a secp256k1 key sign certificates.
    struct EcSigner(aws_lc_rs::signature::EcdsaKeyPair);

    impl rcgen::PublicKeyData for EcSigner {
        fn der_bytes(&self) -> &[u8] {
            use aws_lc_rs::signature::KeyPair as _;
            self.0.public_key().as_ref()
        }
        // The signature algorithm (ecdsa-with-SHA256) is the same for both curves; the key's
        // curve is set right in the certificate afterwards.
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_ECDSA_P256_SHA256
        }
    }

    impl rcgen::SigningKey for EcSigner {
        fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
            self.0
                .sign(&aws_lc_rs::rand::SystemRandom::new(), msg)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| rcgen::Error::RemoteKeyError)
        }
    }

    /// The hostile endpoint's secp256k1 CA: refused, and rightly, since `verify_svid` cannot
    /// use it even for an SVID it really signed. The same construction on P-256 verifies.
    #[test]
    fn a_secp256k1_authority_is_refused_because_verify_svid_cannot_use_it() {
        use aws_lc_rs::signature::{self, EcdsaKeyPair};
        let td = TrustDomain::new("b.test").unwrap();
        let ec_public_key = [0x06, 0x07, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x02, 0x01];
        let p256 = [0x06, 0x08, 0x2A, 0x86, 0x48, 0xCE, 0x3D, 0x03, 0x01, 0x07];
        let secp256k1 = [0x06, 0x05, 0x2B, 0x81, 0x04, 0x00, 0x0A];
        for (alg, curve) in [
            (&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &p256[..]),
            (&signature::ECDSA_P256K1_SHA256_ASN1_SIGNING, &secp256k1[..]),
        ] {
            let signer = EcSigner(EcdsaKeyPair::generate(alg).unwrap());
            let params = ca_params("b.test");
            let made = params.self_signed(&signer).unwrap().der().to_vec();
            let spki = der(
                0x30,
                &[
                    der(0x30, &[&ec_public_key[..], curve].concat()),
                    der(
                        0x03,
                        &[&[0u8][..], rcgen::PublicKeyData::der_bytes(&signer)].concat(),
                    ),
                ]
                .concat(),
            );
            let ca = with_spki(
                &made,
                &rcgen::PublicKeyData::subject_public_key_info(&signer),
                &spki,
            );
            let leaf = tessera_test_util::TestCa::leaf_params("spiffe://b.test/w")
                .signed_by(
                    &rcgen::KeyPair::generate().unwrap(),
                    &rcgen::Issuer::new(params, signer),
                )
                .unwrap()
                .der()
                .to_vec();
            let accepted = accept_bundle_now(&td, &bundle_of(&td, &[&ca]));
            let verified = verifies(&td, &ca, &leaf);
            if curve == p256 {
                accepted.unwrap();
                verified.unwrap();
            } else {
                assert_eq!(
                    accepted.unwrap_err(),
                    "X.509 authority 0: an EC key on curve 1.3.132.0.10 (secp256k1): the SVID verifier takes only P-256, P-384 and P-521"
                );
                assert!(verified.is_err());
            }
        }
    }

    /// The hostile endpoint's lone expired CA replaced the good bundle. Refused; an expired
    /// authority beside a valid one (a rotation) is fine.
    #[test]
    fn a_bundle_whose_every_x509_authority_has_expired_is_refused() {
        let td = TrustDomain::new("b.test").unwrap();
        let ca = |from: i32, to: i32| {
            let mut p = ca_params("b.test");
            p.not_before = rcgen::date_time_ymd(from, 1, 1);
            p.not_after = rcgen::date_time_ymd(to, 1, 1);
            p.self_signed(&rcgen::KeyPair::generate().unwrap())
                .unwrap()
                .der()
                .to_vec()
        };
        let (old, older, valid) = (ca(2020, 2022), ca(2019, 2021), ca(2020, 2099));
        for authorities in [&[&old[..]][..], &[&older, &old], &[&old, &older]] {
            let err = accept_bundle_now(&td, &bundle_of(&td, authorities)).unwrap_err();
            assert_eq!(
                err,
                "every X.509 authority of the bundle of b.test has expired (the last one at Sat, 01 Jan 2022 00:00:00 +0000): a bundle needs a current X.509 authority"
            );
        }
        assert!(accept_bundle_now(&td, &bundle_of(&td, &[&old, &valid])).is_ok());
        assert!(accept_bundle_now(&td, &bundle_of(&td, &[&valid])).is_ok());
        // RFC 5280 §4.1.2.5: valid through its notAfter second, expired the second after.
        let end = u64::try_from(tessera_spiffe::x509::not_after(&old).unwrap().0).unwrap();
        let json = bundle_of(&td, &[&old]);
        assert!(accept_bundle(&td, &json, end).is_ok());
        assert!(accept_bundle(&td, &json, end + 1).is_err());
        // JWT authorities alone: no X.509 authority to have expired.
        let mut jwt_only = Bundle::new(td.clone());
        tessera_test_util::JwtSigner::new("k").add_to(&mut jwt_only);
        assert!(accept_bundle_now(&td, jwt_only.to_json().as_bytes()).is_ok());
    }

    #[test]
    fn refresh_hint_is_honoured_within_floor_and_ceiling() {
        let s = Schedule {
            floor: 30,
            ceiling: 3600,
            default: 300,
        };
        for (hint, want) in [
            (None, 300),          // no hint: our default
            (Some(60), 60),       // hint inside the bounds
            (Some(1), 30),        // below the floor
            (Some(0), 30),        // zero: the floor, never a busy loop
            (Some(86_400), 3600), // above the ceiling
        ] {
            assert_eq!(s.after_success(hint), want, "{hint:?}");
        }
    }

    #[test]
    fn failures_back_off_from_the_floor_to_the_ceiling() {
        let s = Schedule {
            floor: 30,
            ceiling: 200,
            default: 300,
        };
        assert_eq!(
            (1..=6).map(|n| s.after_failure(n)).collect::<Vec<_>>(),
            [30, 60, 120, 200, 200, 200]
        );
        assert_eq!(s.after_failure(u32::MAX), 200);
    }

    #[test]
    fn a_bundle_of_another_trust_domain_is_refused() {
        let td = TrustDomain::new("b.test").unwrap();
        let own = tessera_test_util::TestCa::new("b.test").bundle().to_json();
        assert_eq!(
            accept_bundle_now(&td, own.as_bytes())
                .unwrap()
                .trust_domain(),
            &td
        );
        let other = tessera_test_util::TestCa::new("c.test").bundle().to_json();
        let err = accept_bundle_now(&td, other.as_bytes()).unwrap_err();
        assert!(err.contains("of trust domain c.test, not b.test"), "{err}");
        let err = accept_bundle_now(&td, b"<html>").unwrap_err();
        assert!(err.starts_with("not a SPIFFE bundle of b.test"), "{err}");
    }

    #[test]
    fn a_bundle_that_would_trust_nothing_or_a_leaf_or_a_weak_key_is_refused() {
        let td = TrustDomain::new("b.test").unwrap();
        let err = accept_bundle_now(&td, br#"{"keys":[]}"#).unwrap_err();
        assert!(err.contains("has no X.509 or JWT authorities"), "{err}");

        let ca = tessera_test_util::TestCa::new("b.test");
        let leaf = ca.issue("spiffe://b.test/web").chain[0].to_vec();
        let mut with_leaf = tessera_spiffe::Bundle::new(td.clone());
        with_leaf.add_x509_authority(leaf).unwrap();
        let err = accept_bundle_now(&td, with_leaf.to_json().as_bytes()).unwrap_err();
        assert!(
            err.starts_with("X.509 authority 0: not a CA certificate"),
            "{err}"
        );

        let has_openssl = std::process::Command::new("openssl")
            .arg("version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_openssl {
            assert_ne!(
                std::env::var("CI").as_deref(),
                Ok("true"),
                "CI installs openssl"
            );
            eprintln!("skipping the RSA-1024 half: no openssl here");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        tessera_test_util::openssl::openssl(
            dir.path(),
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:1024",
                "-nodes",
                "-subj",
                "/CN=weak",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-keyout",
                "k.pem",
                "-out",
                "c.pem",
                "-days",
                "1",
            ],
        );
        let pem = std::fs::read(dir.path().join("c.pem")).unwrap();
        use rustls::pki_types::pem::PemObject as _;
        let der = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        let mut weak = tessera_spiffe::Bundle::new(td.clone());
        weak.add_x509_authority(der.to_vec()).unwrap();
        let err = accept_bundle_now(&td, weak.to_json().as_bytes()).unwrap_err();
        assert_eq!(
            err,
            "X.509 authority 0: an RSA key of 1024 bits: at least 2048 are needed"
        );
    }
}
