//! A bounded memo of certificate chains that [`crate::verify_svid`] has already accepted against
//! one bundle snapshot, so that a peer opening many connections does not pay for the same path
//! validation (X.509 parsing, path building and the CA's ECDSA signature on the leaf) on every
//! handshake.
//!
//! What is reused and why that is safe:
//! - The result of `verify_svid` is a pure function of the chain bytes, the bundle set, the role
//!   (EKU) and the time. An entry is used only for the identical chain bytes and role, and only
//!   while the bundle set is the very same snapshot (`Arc::ptr_eq`; the entry holds the `Arc`,
//!   so its address cannot be reused by another snapshot while the entry exists). A bundle
//!   change (rotation, taint, revocation, a federation refresh) therefore misses and verifies
//!   again, exactly as before.
//! - Time: the entry records the intersection of the chain's validity periods (RFC 5280
//!   §4.1.2.5) and is used only inside it, so an expired SVID is refused as before.
//! - The handshake signature (TLS 1.3 CertificateVerify, RFC 8446 §4.4.3), which proves the peer
//!   holds the key, is never memoized: rustls checks it on every handshake.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rustls::pki_types::{CertificateDer, UnixTime};
use tessera_spiffe::{BundleSet, SpiffeId};

use crate::{PeerRole, VerifyError, verify_svid};

/// Entries kept at most; when full the memo starts over (a simple bound, no eviction order).
const CAPACITY: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    /// The chain's certificates, each prefixed by its length (so chains split differently never
    /// collide).
    chain: Vec<u8>,
    client: bool,
}

#[derive(Debug)]
struct Entry {
    bundles: Arc<BundleSet>,
    id: SpiffeId,
    /// Seconds since the epoch: the latest notBefore and the earliest notAfter of the chain.
    not_before: u64,
    not_after: u64,
}

/// Verified chains per bundle snapshot. One per verifier.
#[derive(Debug, Default)]
pub struct VerifiedChains {
    entries: Mutex<HashMap<Key, Entry>>,
}

fn key(chain: &[CertificateDer<'_>], role: PeerRole) -> Key {
    let mut k = Vec::with_capacity(chain.iter().map(|c| c.len() + 4).sum());
    for c in chain {
        k.extend_from_slice(&(c.len() as u32).to_be_bytes());
        k.extend_from_slice(c);
    }
    Key {
        chain: k,
        client: role == PeerRole::Client,
    }
}

/// The intersection of the validity periods of every certificate in the chain, or `None` if one
/// does not parse (then nothing is memoized).
fn validity(chain: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    let mut nb = 0u64;
    let mut na = u64::MAX;
    for c in chain {
        let (_, cert) = x509_parser::parse_x509_certificate(c).ok()?;
        let v = cert.validity();
        nb = nb.max(u64::try_from(v.not_before.timestamp()).ok()?);
        na = na.min(u64::try_from(v.not_after.timestamp()).ok()?);
    }
    Some((nb, na))
}

impl VerifiedChains {
    /// [`verify_svid`], answered from the memo when this exact chain was accepted against this
    /// exact bundle snapshot and `now` is inside the chain's validity.
    pub fn verify(
        &self,
        chain: &[CertificateDer<'_>],
        bundles: &Arc<BundleSet>,
        now: UnixTime,
        role: PeerRole,
    ) -> Result<SpiffeId, VerifyError> {
        let k = key(chain, role);
        let t = now.as_secs();
        if let Ok(map) = self.entries.lock()
            && let Some(e) = map.get(&k)
            && Arc::ptr_eq(&e.bundles, bundles)
            && e.not_before <= t
            && t <= e.not_after
        {
            return Ok(e.id.clone());
        }
        let id = verify_svid(chain, bundles.as_ref(), now, role)?;
        if let Some((not_before, not_after)) = validity(chain)
            && let Ok(mut map) = self.entries.lock()
        {
            if map.len() >= CAPACITY {
                map.clear();
            }
            map.insert(
                k,
                Entry {
                    bundles: bundles.clone(),
                    id: id.clone(),
                    not_before,
                    not_after,
                },
            );
        }
        Ok(id)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use tessera_test_util::TestCa;

    fn set(ca: &TestCa) -> Arc<BundleSet> {
        let mut s = BundleSet::default();
        s.upsert(ca.bundle());
        Arc::new(s)
    }

    #[test]
    fn a_hit_needs_the_same_snapshot_and_a_valid_time() {
        let ca = TestCa::new("example.org");
        let svid = ca.issue("spiffe://example.org/foo");
        let chain = svid.chain.clone();
        let memo = VerifiedChains::default();
        let b1 = set(&ca);
        let now = UnixTime::now();
        let id = memo.verify(&chain, &b1, now, PeerRole::Client).unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/foo");
        assert_eq!(memo.len(), 1);
        assert_eq!(memo.verify(&chain, &b1, now, PeerRole::Client).unwrap(), id);

        // A new snapshot without the CA: verified again, and refused.
        let other = TestCa::new("example.org");
        let b2 = set(&other);
        assert!(memo.verify(&chain, &b2, now, PeerRole::Client).is_err());

        // Far in the future the memo is not consulted: the chain has expired.
        let later = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            now.as_secs() + 10 * 365 * 86_400,
        ));
        assert!(memo.verify(&chain, &b1, later, PeerRole::Client).is_err());

        // The role is part of the key.
        let _ = memo.verify(&chain, &b1, now, PeerRole::Server);
        assert!(memo.len() <= 2);
    }
}
