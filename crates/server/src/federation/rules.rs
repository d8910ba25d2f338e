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
pub(crate) fn accept_bundle(td: &TrustDomain, json: &[u8]) -> Result<Bundle, String> {
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
    Ok(bundle)
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
            accept_bundle(&td, own.as_bytes()).unwrap().trust_domain(),
            &td
        );
        let other = tessera_test_util::TestCa::new("c.test").bundle().to_json();
        let err = accept_bundle(&td, other.as_bytes()).unwrap_err();
        assert!(err.contains("of trust domain c.test, not b.test"), "{err}");
        let err = accept_bundle(&td, b"<html>").unwrap_err();
        assert!(err.starts_with("not a SPIFFE bundle of b.test"), "{err}");
    }

    #[test]
    fn a_bundle_that_would_trust_nothing_or_a_leaf_or_a_weak_key_is_refused() {
        let td = TrustDomain::new("b.test").unwrap();
        let err = accept_bundle(&td, br#"{"keys":[]}"#).unwrap_err();
        assert!(err.contains("has no X.509 or JWT authorities"), "{err}");

        let ca = tessera_test_util::TestCa::new("b.test");
        let leaf = ca.issue("spiffe://b.test/web").chain[0].to_vec();
        let mut with_leaf = tessera_spiffe::Bundle::new(td.clone());
        with_leaf.add_x509_authority(leaf).unwrap();
        let err = accept_bundle(&td, with_leaf.to_json().as_bytes()).unwrap_err();
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
        let err = accept_bundle(&td, weak.to_json().as_bytes()).unwrap_err();
        assert_eq!(
            err,
            "X.509 authority 0: an RSA key of 1024 bits: at least 2048 are needed"
        );
    }
}
