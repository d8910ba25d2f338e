//! What the agent holds for its workloads: the identities (entries with a signed SVID and its
//! key) and the trust bundles, published as immutable snapshots. Every change makes a new
//! snapshot with a higher version; Workload API streams watch for it and resend.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use tessera_spiffe::{BundleSet, Selector, SpiffeId, TrustDomain};
use tokio::sync::watch;
use zeroize::Zeroizing;

/// One identity a workload can receive.
pub struct Identity {
    pub entry_id: String,
    pub spiffe_id: SpiffeId,
    /// All must be among the caller's selectors.
    pub selectors: BTreeSet<Selector>,
    pub hint: String,
    pub federates_with: BTreeSet<TrustDomain>,
    /// DER certificates, leaf first (intermediates after it, root excluded).
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER of the SVID's private key; made on this node, never sent anywhere but to the
    /// workload the SVID is for.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Unix seconds.
    pub not_after: u64,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("selectors", &self.selectors)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// An immutable view of everything the agent serves.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Increases with every published snapshot.
    pub version: u64,
    pub trust_domain: Option<TrustDomain>,
    /// Identities in a stable order (by SPIFFE ID, then entry ID): the first matching one is a
    /// workload's default SVID.
    pub identities: Vec<Arc<Identity>>,
    /// The agent's own trust domain's bundle and the federated bundles it received.
    pub bundles: BundleSet,
}

impl Snapshot {
    /// The identities whose selectors are all among `caller`'s (the entry-matching rule of
    /// `tessera_spiffe::selector::matches`).
    pub fn identities_for(&self, caller: &BTreeSet<Selector>) -> Vec<Arc<Identity>> {
        self.identities
            .iter()
            .filter(|i| tessera_spiffe::selector::matches(&i.selectors, caller))
            .cloned()
            .collect()
    }
}

/// The Workload API's order of a caller's identities: by SPIFFE ID, then entry ID. The first
/// is the caller's default identity (§5.2.1); node mode presents and picks policies by it too.
pub(crate) fn sort_in_api_order(identities: &mut [Arc<Identity>]) {
    identities.sort_by(|a, b| {
        (a.spiffe_id.as_str(), a.entry_id.as_str())
            .cmp(&(b.spiffe_id.as_str(), b.entry_id.as_str()))
    });
}

/// The authorization policies the server pushed (every policy; each caller of `PolicyWatch`
/// gets those targeting its identity).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Policies {
    /// The sync revision these reflect.
    pub revision: u64,
    /// `[policy] default` of the trust domain: "deny" or "allow"; empty until the first sync.
    pub default_action: String,
    /// Name → JSON document.
    pub documents: std::collections::BTreeMap<String, String>,
}

/// The destination map the server pushed (the trust domain's; every caller of
/// `DestinationWatch` gets all of it).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destinations {
    /// The sync revision this reflects (0: not synced yet).
    pub revision: u64,
    /// Name → JSON document.
    pub documents: std::collections::BTreeMap<String, String>,
}

/// The agent's cache: one writer (the SVID manager) publishes snapshots; readers subscribe.
#[derive(Debug)]
pub struct Cache {
    tx: watch::Sender<Arc<Snapshot>>,
    policies: watch::Sender<Arc<Policies>>,
    destinations: watch::Sender<Arc<Destinations>>,
    /// kids of JWT keys an operator tainted: cached JWT-SVIDs they signed are minted again.
    tainted_jwt: std::sync::RwLock<BTreeSet<String>>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(Snapshot::default())),
            policies: watch::Sender::new(Arc::new(Policies::default())),
            destinations: watch::Sender::new(Arc::new(Destinations::default())),
            tainted_jwt: std::sync::RwLock::new(BTreeSet::new()),
        }
    }

    /// Sets the tainted JWT kids (the full set).
    pub fn set_tainted_jwt(&self, kids: &BTreeSet<String>) {
        let mut cur = self.tainted_jwt.write().unwrap_or_else(|p| p.into_inner());
        if *cur != *kids {
            cur.clone_from(kids);
        }
    }

    /// True when any JWT key is tainted.
    pub fn has_tainted_jwt(&self) -> bool {
        !self
            .tainted_jwt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// True when JWT key `kid` is tainted.
    pub fn is_jwt_tainted(&self, kid: &str) -> bool {
        self.tainted_jwt
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(kid)
    }

    /// Replaces the policies; subscribers wake only when something other than the revision
    /// changed.
    pub fn set_policies(&self, p: Policies) {
        self.policies.send_if_modified(|cur| {
            if cur.default_action == p.default_action && cur.documents == p.documents {
                return false;
            }
            *cur = Arc::new(p);
            true
        });
    }

    pub fn subscribe_policies(&self) -> watch::Receiver<Arc<Policies>> {
        self.policies.subscribe()
    }

    /// Replaces the destination map; subscribers wake when the documents change, or at the
    /// first sync (a proxy learns that the server's map, maybe empty, is known).
    pub fn set_destinations(&self, d: Destinations) {
        self.destinations.send_if_modified(|cur| {
            if cur.documents == d.documents && (cur.revision != 0 || d.revision == 0) {
                return false;
            }
            *cur = Arc::new(d);
            true
        });
    }

    pub fn subscribe_destinations(&self) -> watch::Receiver<Arc<Destinations>> {
        self.destinations.subscribe()
    }

    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Publishes a new snapshot built from `identities` and `bundles`; its version is one more
    /// than the current one.
    pub fn publish(
        &self,
        trust_domain: TrustDomain,
        mut identities: Vec<Arc<Identity>>,
        bundles: BundleSet,
    ) {
        sort_in_api_order(&mut identities);
        self.tx.send_modify(|cur| {
            *cur = Arc::new(Snapshot {
                version: cur.version + 1,
                trust_domain: Some(trust_domain),
                identities,
                bundles,
            });
        });
    }
}
