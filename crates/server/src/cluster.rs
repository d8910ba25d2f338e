//! Several servers of one trust domain on one shared datastore: what each server publishes of
//! its CA (an [`AuthorityRecord`]: the public parts of its authorities and its taint marks,
//! never a private key) and how the trust domain's bundle and tainted set are computed from
//! every server's record. Pure: the datastore runs [`merge_bundle`] inside the transaction that
//! holds the revision lock (see `Datastore::publish_authorities`), so two servers publishing at
//! once cannot drop each other's keys.
//!
//! Why each server keeps its own key instead of sharing one through the database: a database
//! dump or a read-only replica then never holds a signing key, and a server's key lives only in
//! its own data_dir (mode 0600), as with one server. Every key is in the shared bundle before it
//! signs: a server publishes at start before it serves, and its journal pre-publishes each
//! successor at half-life (SPIFFE Trust Domain and Bundle §4: verifiers must hold a key before
//! they meet SVIDs it signed).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};
use tessera_spiffe::{Bundle, TrustDomain};

use crate::ca::Tainted;

/// What one server publishes of its CA, stored per server in the datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuthorityRecord {
    /// SPIFFE bundle JSON of this server's published authorities (prepared, active, old).
    pub(crate) bundle: String,
    pub(crate) tainted_x509: Vec<String>,
    pub(crate) tainted_jwt: Vec<String>,
    /// Unix seconds after which none of its authorities verifies anything: a server that is
    /// gone for good drops out of the bundle then, without anyone cleaning up after it.
    pub(crate) expires_at: u64,
}

impl AuthorityRecord {
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub(crate) fn parse(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| e.to_string())
    }
}

/// The records that still count at `now`: readable, not expired; ours (`own`) always. A record
/// that cannot be read is skipped with a warning rather than blocking every publication.
fn live_records(
    td: &TrustDomain,
    records: &[(String, Vec<u8>)],
    own: &str,
    now: u64,
) -> Vec<(AuthorityRecord, Bundle)> {
    let mut out = Vec::new();
    for (server, bytes) in records {
        let parsed = AuthorityRecord::parse(bytes).and_then(|r| {
            Bundle::parse(td.clone(), r.bundle.as_bytes())
                .map(|b| (r, b))
                .map_err(|e| e.to_string())
        });
        match parsed {
            Ok((r, _)) if r.expires_at <= now && server != own => {}
            Ok(rb) => out.push(rb),
            Err(e) => {
                tracing::warn!(server, error = %e, "skipping an unreadable authority record");
            }
        }
    }
    out
}

/// The union of every live record's authorities (no sequence set).
pub(crate) fn union_bundle(
    td: &TrustDomain,
    records: &[(String, Vec<u8>)],
    own: &str,
    now: u64,
) -> Bundle {
    let mut bundle = Bundle::new(td.clone());
    for (_, b) in live_records(td, records, own, now) {
        for der in b.x509_authorities() {
            // Parsed once already; cannot fail here.
            let _ = bundle.add_x509_authority(der.clone());
        }
        for (kid, key) in b.jwt_authorities() {
            // Two servers minting the same kid (random 128-bit ids) would be refused here and
            // keep the first: verifiers must never be handed two keys under one kid.
            if let Err(e) = bundle.add_jwt_authority(kid, key.clone()) {
                tracing::warn!(error = %e, "JWT key id published by two servers; keeping the first");
            }
        }
    }
    bundle
}

/// The datastore's merge step: the union of the live records, or `None` when the stored bundle
/// already has exactly those authorities. A changed bundle gets the stored sequence plus one
/// (Trust Domain and Bundle §4.1.1: it MUST change whenever the contents do).
pub(crate) fn merge_bundle(
    td: &TrustDomain,
    records: &[(String, Vec<u8>)],
    stored: Option<&[u8]>,
    own: &str,
    now: u64,
) -> Result<Option<Vec<u8>>, String> {
    let mut merged = union_bundle(td, records, own, now);
    let previous = match stored {
        Some(json) => {
            Some(Bundle::parse(td.clone(), json).map_err(|e| format!("stored bundle: {e}"))?)
        }
        None => None,
    };
    if let Some(prev) = &previous
        && same_authorities(prev, &merged)
    {
        return Ok(None);
    }
    merged.sequence = Some(previous.and_then(|p| p.sequence).unwrap_or(0) + 1);
    Ok(Some(merged.to_json().into_bytes()))
}

fn same_authorities(a: &Bundle, b: &Bundle) -> bool {
    let set = |x: &Bundle| {
        x.x509_authorities()
            .iter()
            .cloned()
            .collect::<BTreeSet<_>>()
    };
    set(a) == set(b) && a.jwt_authorities() == b.jwt_authorities()
}

/// The tainted authorities of every live record: an agent replaces what any of them signed,
/// whichever server it syncs with.
pub(crate) fn union_tainted(
    td: &TrustDomain,
    records: &[(String, Vec<u8>)],
    own: &str,
    now: u64,
) -> Tainted {
    let mut x509 = BTreeSet::new();
    let mut jwt = BTreeSet::new();
    for (r, _) in live_records(td, records, own, now) {
        x509.extend(r.tainted_x509);
        jwt.extend(r.tainted_jwt);
    }
    Tainted {
        x509: x509.into_iter().collect(),
        jwt: jwt.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn record(ca: &tessera_pki::X509Authority, tainted: &[&str], expires_at: u64) -> Vec<u8> {
        let mut b = Bundle::new(td());
        b.add_x509_authority(ca.cert_der().to_vec()).unwrap();
        AuthorityRecord {
            bundle: b.to_json(),
            tainted_x509: tainted.iter().map(|s| (*s).to_owned()).collect(),
            tainted_jwt: Vec::new(),
            expires_at,
        }
        .to_bytes()
    }

    #[test]
    fn the_bundle_is_the_union_of_live_records_and_changes_only_with_them() {
        let now = 1_000;
        let a = tessera_pki::X509Authority::self_signed(&td(), now, 3600).unwrap();
        let b = tessera_pki::X509Authority::self_signed(&td(), now, 3600).unwrap();
        let gone = tessera_pki::X509Authority::self_signed(&td(), now, 3600).unwrap();
        let records = vec![
            ("a".to_owned(), record(&a, &["ka"], now + 10)),
            ("b".to_owned(), record(&b, &[], now + 10)),
            // Expired: a server that is gone for good.
            ("c".to_owned(), record(&gone, &["kc"], now)),
            ("d".to_owned(), b"not json".to_vec()),
        ];
        let json = merge_bundle(&td(), &records, None, "a", now)
            .unwrap()
            .unwrap();
        let merged = Bundle::parse(td(), &json).unwrap();
        assert_eq!(merged.sequence, Some(1));
        let have: BTreeSet<_> = merged.x509_authorities().iter().cloned().collect();
        let want: BTreeSet<_> = [a.cert_der().to_vec(), b.cert_der().to_vec()].into();
        assert_eq!(have, want);
        // Unchanged: nothing to write.
        assert_eq!(
            merge_bundle(&td(), &records, Some(&json), "b", now).unwrap(),
            None
        );
        // One server fewer: a new bundle, next sequence.
        let json2 = merge_bundle(&td(), &records[..1], Some(&json), "a", now)
            .unwrap()
            .unwrap();
        let fewer = Bundle::parse(td(), &json2).unwrap();
        assert_eq!(fewer.sequence, Some(2));
        assert_eq!(fewer.x509_authorities(), &[a.cert_der().to_vec()]);
        // Our own record counts even past its expiry (our journal is the judge of our keys).
        let ours_late = merge_bundle(&td(), &records[2..3], None, "c", now).unwrap();
        assert!(ours_late.is_some());

        let t = union_tainted(&td(), &records, "a", now);
        assert_eq!(t.x509, vec!["ka".to_owned()]);
    }
}
