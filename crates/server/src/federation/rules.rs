//! The rules of federation that need no I/O: which fetched bundle is accepted, and when to fetch
//! next. Pure, so that every rule has a table test.

use tessera_spiffe::{Bundle, TrustDomain};

/// Parses a bundle fetched (or given) for `td` and refuses one that belongs to another trust
/// domain. A SPIFFE bundle does not name its trust domain, but each X.509 authority of a SPIFFE
/// CA carries `spiffe://<td>` (X509-SVID §3.2): an authority naming another trust domain means
/// the endpoint served someone else's bundle. Accepting it would let that trust domain's CA mint
/// identities of `td` — trust domains are never merged (SPIFFE Federation §2, Trust Domain and
/// Bundle §4: a bundle holds the authorities of exactly one trust domain).
pub(crate) fn accept_bundle(td: &TrustDomain, json: &[u8]) -> Result<Bundle, String> {
    let bundle =
        Bundle::parse(td.clone(), json).map_err(|e| format!("not a SPIFFE bundle of {td}: {e}"))?;
    for (i, der) in bundle.x509_authorities().iter().enumerate() {
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
}
