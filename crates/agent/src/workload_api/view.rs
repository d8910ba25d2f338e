//! What one caller receives, computed from a cache snapshot and the caller's selectors. Pure: no
//! I/O, no clocks; the service calls these on every request and on every snapshot change, and
//! compares results so that a stream resends only when what *this* caller gets has changed.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tessera_proto::workload::{
    JwtBundlesResponse, X509BundlesResponse, X509svid, X509svidResponse,
};
use tessera_spiffe::bundle::BundleSource;
use tessera_spiffe::{Bundle, Selector, TrustDomain};

use super::WorkloadApiError;
use crate::{Identity, Snapshot};

/// The identities `selectors` entitle a caller to, in the snapshot's order (the first is the
/// default identity, SPIFFE Workload API §8).
///
/// Workload API §5.2.1 and §6.2.1: a non-empty `hint` MUST be unique among the returned SVIDs.
/// Like SPIRE, the first identity with a hint wins and later ones with the same hint are left out.
pub(crate) fn identities_for(
    snapshot: &Snapshot,
    selectors: &BTreeSet<Selector>,
) -> Vec<Arc<Identity>> {
    dedupe_hints(snapshot.identities_for(selectors))
}

pub(crate) fn dedupe_hints(identities: Vec<Arc<Identity>>) -> Vec<Arc<Identity>> {
    let mut seen = HashSet::new();
    identities
        .into_iter()
        .filter(|i| {
            if i.hint.is_empty() || seen.insert(i.hint.clone()) {
                true
            } else {
                tracing::warn!(
                    entry_id = %i.entry_id,
                    hint = %i.hint,
                    "identity left out of a Workload API response: another identity of the caller has the same hint"
                );
                false
            }
        })
        .collect()
}

/// The trust domains whose bundles a caller with `identities` may receive: the agent's own, each
/// identity's own, and those its entries federate with (Workload API §4.6).
pub(crate) fn trust_domains_for(
    snapshot: &Snapshot,
    identities: &[Arc<Identity>],
) -> BTreeSet<TrustDomain> {
    let mut tds: BTreeSet<TrustDomain> = snapshot.trust_domain.iter().cloned().collect();
    for i in identities {
        tds.insert(i.spiffe_id.trust_domain());
        tds.extend(i.federates_with.iter().cloned());
    }
    tds
}

/// The trust domains that are the caller's "own": the agent's and those of its SVIDs. Their
/// bundles must be present; federated ones are sent when the agent has them.
fn own_trust_domains(snapshot: &Snapshot, identities: &[Arc<Identity>]) -> BTreeSet<TrustDomain> {
    let mut tds: BTreeSet<TrustDomain> = snapshot.trust_domain.iter().cloned().collect();
    tds.extend(identities.iter().map(|i| i.spiffe_id.trust_domain()));
    tds
}

/// Bundle maps are keyed by the SPIFFE ID of the trust domain (`spiffe://<td>`), as the proto's
/// comments say and SPIRE sends.
fn bundle_key(td: &TrustDomain) -> String {
    td.id().as_str().to_owned()
}

fn x509_der(bundle: &Bundle) -> Vec<u8> {
    bundle.x509_authorities().concat()
}

fn required_bundle<'a>(
    snapshot: &'a Snapshot,
    td: &TrustDomain,
) -> Result<&'a Bundle, WorkloadApiError> {
    snapshot
        .bundles
        .bundle_for(td)
        .ok_or_else(|| WorkloadApiError::MissingBundle(td.to_string()))
}

/// FetchX509SVID (Workload API §5.2.1): one `X509SVID` per identity, each with the bundle of its
/// own trust domain, plus the federated bundles its entries federate with.
pub(crate) fn x509_svid_response(
    snapshot: &Snapshot,
    identities: &[Arc<Identity>],
) -> Result<X509svidResponse, WorkloadApiError> {
    if identities.is_empty() {
        return Err(WorkloadApiError::NoIdentity);
    }
    let mut svids = Vec::with_capacity(identities.len());
    for i in identities {
        let bundle = required_bundle(snapshot, &i.spiffe_id.trust_domain())?;
        svids.push(X509svid {
            spiffe_id: i.spiffe_id.as_str().to_owned(),
            // §5.1: ASN.1 DER, leaf first, intermediates may follow.
            x509_svid: i.chain.concat(),
            // §5.1: unencrypted PKCS#8 DER.
            x509_svid_key: i.key_pkcs8.to_vec(),
            bundle: x509_der(bundle),
            hint: i.hint.clone(),
        });
    }
    let own = own_trust_domains(snapshot, identities);
    let mut federated_bundles = HashMap::new();
    for td in identities.iter().flat_map(|i| i.federates_with.iter()) {
        if own.contains(td) {
            continue;
        }
        if let Some(b) = snapshot.bundles.bundle_for(td)
            && !b.x509_authorities().is_empty()
        {
            federated_bundles.insert(bundle_key(td), x509_der(b));
        }
    }
    Ok(X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles,
    })
}

/// FetchX509Bundles (Workload API §5.2.2): the caller's own trust domains' bundles (which MUST be
/// present) and the federated ones the agent has. A federated bundle without X.509 authorities
/// trusts nothing and is left out (§4.4: absence is redaction).
pub(crate) fn x509_bundles_response(
    snapshot: &Snapshot,
    identities: &[Arc<Identity>],
) -> Result<X509BundlesResponse, WorkloadApiError> {
    if identities.is_empty() {
        return Err(WorkloadApiError::NoIdentity);
    }
    let own = own_trust_domains(snapshot, identities);
    let mut bundles = HashMap::new();
    for td in trust_domains_for(snapshot, identities) {
        if own.contains(&td) {
            bundles.insert(bundle_key(&td), x509_der(required_bundle(snapshot, &td)?));
        } else if let Some(b) = snapshot.bundles.bundle_for(&td)
            && !b.x509_authorities().is_empty()
        {
            bundles.insert(bundle_key(&td), x509_der(b));
        }
    }
    Ok(X509BundlesResponse {
        crl: Vec::new(),
        bundles,
    })
}

/// FetchJWTBundles (Workload API §6.2.2): JWK Sets of the JWT authorities only ("MUST NOT
/// include keys with other uses").
pub(crate) fn jwt_bundles_response(
    snapshot: &Snapshot,
    identities: &[Arc<Identity>],
) -> Result<JwtBundlesResponse, WorkloadApiError> {
    if identities.is_empty() {
        return Err(WorkloadApiError::NoIdentity);
    }
    let own = own_trust_domains(snapshot, identities);
    let mut bundles = HashMap::new();
    for td in trust_domains_for(snapshot, identities) {
        let bundle = if own.contains(&td) {
            Some(required_bundle(snapshot, &td)?)
        } else {
            snapshot.bundles.bundle_for(&td)
        };
        if let Some(b) = bundle {
            bundles.insert(bundle_key(&td), b.jwt_jwks_json().into_bytes());
        }
    }
    Ok(JwtBundlesResponse { bundles })
}

/// The bundles a caller may validate JWT-SVIDs against: exactly those FetchJWTBundles would give
/// it (Workload API §6.3: "If a JWT bundle for the specified trust domain is not present, then
/// the token is untrusted"). A caller without identities validates against the agent's own
/// trust domain only, as in SPIRE.
#[derive(Debug)]
pub(crate) struct CallerBundles<'a> {
    snapshot: &'a Snapshot,
    allowed: BTreeSet<TrustDomain>,
}

impl<'a> CallerBundles<'a> {
    pub(crate) fn new(snapshot: &'a Snapshot, identities: &[Arc<Identity>]) -> Self {
        Self {
            snapshot,
            allowed: trust_domains_for(snapshot, identities),
        }
    }
}

impl BundleSource for CallerBundles<'_> {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        if self.allowed.contains(td) {
            self.snapshot.bundles.bundle_for(td)
        } else {
            None
        }
    }
}

/// JWT claims as a `google.protobuf.Struct` (ValidateJWTSVIDResponse.claims). JSON numbers become
/// doubles, as protobuf's JSON mapping does.
pub(crate) fn claims_to_struct(claims: &BTreeMap<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: claims
            .iter()
            .map(|(k, v)| (k.clone(), json_to_proto(v)))
            .collect(),
    }
}

fn json_to_proto(v: &Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(prost_types::NullValue::NullValue.into()),
        Value::Bool(b) => Kind::BoolValue(*b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        Value::String(s) => Kind::StringValue(s.clone()),
        Value::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.iter().map(json_to_proto).collect(),
        }),
        Value::Object(map) => Kind::StructValue(prost_types::Struct {
            fields: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_proto(v)))
                .collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::{BundleSet, SpiffeId};
    use zeroize::Zeroizing;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    /// A bundle with one real CA certificate (bundles parse what they hold).
    fn bundle(td_name: &str) -> Bundle {
        tessera_test_util::TestCa::new(td_name).bundle()
    }

    fn identity(id: &str, hint: &str, federates: &[&str]) -> Arc<Identity> {
        Arc::new(Identity {
            entry_id: format!("entry-{id}"),
            spiffe_id: SpiffeId::parse(id).unwrap(),
            selectors: [Selector::parse("unix:uid:1").unwrap()].into(),
            hint: hint.to_owned(),
            federates_with: federates.iter().map(|f| td(f)).collect(),
            chain: vec![b"leaf".to_vec(), b"inter".to_vec()],
            key_pkcs8: Zeroizing::new(b"key".to_vec()),
            not_after: 0,
        })
    }

    fn snapshot(identities: Vec<Arc<Identity>>, bundles: Vec<Bundle>) -> Snapshot {
        let mut set = BundleSet::new();
        for b in bundles {
            set.insert(b).unwrap();
        }
        Snapshot {
            version: 1,
            trust_domain: Some(td("example.org")),
            identities,
            bundles: set,
        }
    }

    #[test]
    fn duplicate_hints_keep_only_the_first_identity() {
        // Workload API §5.2.1: hints are unique among returned SVIDs; empty hints never clash.
        let ids = vec![
            identity("spiffe://example.org/a", "internal", &[]),
            identity("spiffe://example.org/b", "internal", &[]),
            identity("spiffe://example.org/c", "", &[]),
            identity("spiffe://example.org/d", "", &[]),
        ];
        let kept: Vec<_> = dedupe_hints(ids)
            .iter()
            .map(|i| i.spiffe_id.as_str().to_owned())
            .collect();
        assert_eq!(
            kept,
            [
                "spiffe://example.org/a",
                "spiffe://example.org/c",
                "spiffe://example.org/d"
            ]
        );
    }

    #[test]
    fn x509_response_concatenates_the_chain_and_keys_federated_bundles_by_trust_domain_id() {
        let ids = vec![identity(
            "spiffe://example.org/a",
            "",
            &["fed.org", "absent.org"],
        )];
        let snap = snapshot(ids.clone(), vec![bundle("example.org"), bundle("fed.org")]);
        let resp = x509_svid_response(&snap, &ids).unwrap();
        assert_eq!(resp.svids.len(), 1);
        assert_eq!(resp.svids[0].x509_svid, b"leafinter");
        assert_eq!(resp.svids[0].x509_svid_key, b"key");
        assert!(!resp.svids[0].bundle.is_empty());
        assert_eq!(
            resp.federated_bundles.keys().collect::<Vec<_>>(),
            ["spiffe://fed.org"]
        );
        assert!(resp.crl.is_empty());
    }

    #[test]
    fn no_identities_is_no_identity_issued() {
        let snap = snapshot(vec![], vec![bundle("example.org")]);
        assert!(matches!(
            x509_svid_response(&snap, &[]),
            Err(WorkloadApiError::NoIdentity)
        ));
        assert!(matches!(
            x509_bundles_response(&snap, &[]),
            Err(WorkloadApiError::NoIdentity)
        ));
        assert!(matches!(
            jwt_bundles_response(&snap, &[]),
            Err(WorkloadApiError::NoIdentity)
        ));
    }

    #[test]
    fn a_missing_own_bundle_is_an_error_not_an_empty_bundle() {
        let ids = vec![identity("spiffe://example.org/a", "", &[])];
        let snap = snapshot(ids.clone(), vec![]);
        assert!(matches!(
            x509_svid_response(&snap, &ids),
            Err(WorkloadApiError::MissingBundle(_))
        ));
        assert!(matches!(
            jwt_bundles_response(&snap, &ids),
            Err(WorkloadApiError::MissingBundle(_))
        ));
    }

    #[test]
    fn bundles_include_only_federations_of_the_callers_entries() {
        let ids = vec![identity("spiffe://example.org/a", "", &["fed.org"])];
        let snap = snapshot(
            ids.clone(),
            vec![
                bundle("example.org"),
                bundle("fed.org"),
                bundle("other.org"),
            ],
        );
        let x = x509_bundles_response(&snap, &ids).unwrap();
        let mut keys: Vec<_> = x.bundles.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["spiffe://example.org", "spiffe://fed.org"]);
        let j = jwt_bundles_response(&snap, &ids).unwrap();
        let mut keys: Vec<_> = j.bundles.keys().cloned().collect();
        keys.sort();
        assert_eq!(keys, ["spiffe://example.org", "spiffe://fed.org"]);

        let scoped = CallerBundles::new(&snap, &ids);
        assert!(scoped.bundle_for(&td("fed.org")).is_some());
        assert!(scoped.bundle_for(&td("other.org")).is_none());
        let nobody = CallerBundles::new(&snap, &[]);
        assert!(nobody.bundle_for(&td("example.org")).is_some());
        assert!(nobody.bundle_for(&td("fed.org")).is_none());
    }

    #[test]
    fn claims_convert_every_json_type() {
        use prost_types::value::Kind;
        let claims: BTreeMap<String, Value> = serde_json::from_value(serde_json::json!({
            "sub": "spiffe://example.org/a",
            "aud": ["a", "b"],
            "exp": 1700000000,
            "n": null,
            "b": true,
            "o": {"x": 1.5}
        }))
        .unwrap();
        let s = claims_to_struct(&claims);
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://example.org/a".into()))
        );
        assert_eq!(
            s.fields["exp"].kind,
            Some(Kind::NumberValue(1_700_000_000.0))
        );
        assert_eq!(s.fields["b"].kind, Some(Kind::BoolValue(true)));
        assert!(matches!(s.fields["n"].kind, Some(Kind::NullValue(_))));
        let Some(Kind::ListValue(l)) = &s.fields["aud"].kind else {
            panic!("aud is a list")
        };
        assert_eq!(l.values.len(), 2);
        let Some(Kind::StructValue(o)) = &s.fields["o"].kind else {
            panic!("o is a struct")
        };
        assert_eq!(o.fields["x"].kind, Some(Kind::NumberValue(1.5)));
    }
}
