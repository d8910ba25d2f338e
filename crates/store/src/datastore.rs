//! The `Datastore` trait: everything the server reads and writes, backend-independent.

use std::collections::BTreeSet;

use async_trait::async_trait;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};

use crate::StoreError;
use crate::model::{
    Agent, Destination, Entry, Event, FederationRelationship, FederationStatus, JoinToken,
    NewAgent, NewEntry, Policy, StoredBundle,
};

/// What [`Datastore::listen_revisions`] gives.
#[derive(Debug)]
pub struct RevisionListener {
    /// The newest revision announced.
    pub revisions: tokio::sync::watch::Receiver<u64>,
    /// Whether the listening session is up: it drops the moment the database goes away (and
    /// comes back within about two seconds of its return), so a server knows at once that it
    /// must not wait on the database, without polling it.
    pub connected: tokio::sync::watch::Receiver<bool>,
}

/// See [`Datastore::publish_authorities`]: `(server records, stored bundle JSON)` → the new
/// bundle JSON, or `None` when unchanged; an `Err` aborts the publication.
pub type MergeBundle =
    dyn Fn(&[(String, Vec<u8>)], Option<&[u8]>) -> Result<Option<Vec<u8>>, String> + Send + Sync;

/// Which entries [`Datastore::list_entries`] returns; every set field must match.
/// Results are ordered by id; page with `after` = the last id seen.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EntryQuery {
    pub parent_id: Option<SpiffeId>,
    pub spiffe_id: Option<SpiffeId>,
    /// Entries having all of these selectors (and maybe more). Empty: no selector filter.
    pub with_selectors: BTreeSet<Selector>,
    /// Only entries whose id sorts after this one.
    pub after: Option<String>,
    /// At most this many; `None`: all.
    pub limit: Option<u32>,
}

/// Which agents [`Datastore::list_agents`] returns, ordered by SPIFFE ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentQuery {
    pub banned: Option<bool>,
    pub after: Option<SpiffeId>,
    pub limit: Option<u32>,
}

/// Whether a destination may join the others stored (see [`Datastore::set_destination`]).
pub type AdmitDestination<'a> = dyn Fn(&[Destination]) -> Result<(), String> + Send + Sync + 'a;

/// The server's datastore.
///
/// Every write that others must learn about is one transaction that takes the next revision,
/// makes the change and records an [`Event`] with that revision (see the crate docs for why this
/// gives a gap-free feed). Writes that nobody follows — a server's own CA journal and the pruning
/// of expired tokens and old events — are transactions without a revision.
///
/// Invalid inputs are refused with [`StoreError::Invalid`] before anything is written.
#[async_trait]
pub trait Datastore: Send + Sync + std::fmt::Debug {
    /// `"sqlite"` or `"postgres"`.
    fn backend(&self) -> &'static str;

    /// One round trip to the database: `Err(Unavailable)` when it cannot be reached.
    async fn ping(&self) -> Result<(), StoreError>;

    // --- registration entries ---

    /// Creates an entry, or returns the existing one with the same SPIFFE ID, parent ID and
    /// selector set. The flag is `true` when this call created it (only then is a revision used).
    async fn create_entry(&self, entry: NewEntry) -> Result<(Entry, bool), StoreError>;

    /// Creates many entries in one transaction (one revision each), with `create_entry`'s
    /// idempotency per entry. All or nothing: one invalid entry (`entries[i].field`) fails all.
    /// At most [`MAX_BATCH`](crate::model::MAX_BATCH) entries.
    async fn create_entries(
        &self,
        entries: Vec<NewEntry>,
    ) -> Result<Vec<(Entry, bool)>, StoreError>;

    async fn get_entry(&self, id: &str) -> Result<Option<Entry>, StoreError>;

    async fn list_entries(&self, query: &EntryQuery) -> Result<Vec<Entry>, StoreError>;

    /// Every entry whose parent is one of `parents` (an agent's ID and its node aliases): what
    /// that agent is authorized to obtain SVIDs for. Ordered by id.
    async fn list_entries_by_parents(&self, parents: &[SpiffeId])
    -> Result<Vec<Entry>, StoreError>;

    /// Replaces the content of entry `id`, keeping its id and `created_revision`.
    /// `AlreadyExists` when another entry already has the new SPIFFE ID, parent and selectors.
    async fn update_entry(&self, id: &str, entry: NewEntry) -> Result<Entry, StoreError>;

    /// Deletes entry `id` and returns what it was.
    async fn delete_entry(&self, id: &str) -> Result<Entry, StoreError>;

    // --- agents ---

    /// Records a (re-)attested agent, replacing what was known of it (its `created_revision`
    /// stays). `Banned` if the agent is banned: it must be evicted first.
    async fn create_or_replace_agent(&self, agent: NewAgent) -> Result<Agent, StoreError>;

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<Agent>, StoreError>;

    async fn list_agents(&self, query: &AgentQuery) -> Result<Vec<Agent>, StoreError>;

    /// Records the agent's renewed SVID, replacing the one of serial `from_serial` (the SVID
    /// the renewal was authenticated with). `Banned` if it is banned; `NotFound` if it is gone
    /// or its current SVID is no longer `from_serial` (renewed, or evicted and attested again,
    /// since the request was authenticated: a stale SVID must not take the slot back).
    async fn update_agent_svid(
        &self,
        id: &SpiffeId,
        from_serial: &str,
        serial: &str,
        expires_at: i64,
    ) -> Result<Agent, StoreError>;

    async fn set_agent_banned(&self, id: &SpiffeId, banned: bool) -> Result<Agent, StoreError>;

    /// Evicts the agent: it must attest again. Returns what it was.
    async fn delete_agent(&self, id: &SpiffeId) -> Result<Agent, StoreError>;

    // --- join tokens ---

    /// Stores the token (as its SHA-256). `AlreadyExists` if that token is already stored.
    async fn create_join_token(&self, token: &JoinToken) -> Result<(), StoreError>;

    /// Uses the token up: `Some` for exactly one caller, however many present it at once, and
    /// only while `now < expires_at`; `None` for an unknown, used or expired token.
    async fn consume_join_token(
        &self,
        token: &str,
        now: i64,
    ) -> Result<Option<JoinToken>, StoreError>;

    /// Deletes tokens with `expires_at <= now`; returns how many.
    async fn prune_join_tokens(&self, now: i64) -> Result<u64, StoreError>;

    // --- bundles (ours and federated) ---

    async fn get_bundle(&self, td: &TrustDomain) -> Result<Option<StoredBundle>, StoreError>;

    /// Creates or replaces a trust domain's bundle (SPIFFE bundle JSON, checked by parsing it).
    /// Returns the revision of the change.
    async fn set_bundle(&self, td: &TrustDomain, bundle_json: &[u8]) -> Result<u64, StoreError>;

    async fn delete_bundle(&self, td: &TrustDomain) -> Result<(), StoreError>;

    async fn list_bundles(&self) -> Result<Vec<StoredBundle>, StoreError>;

    // --- CA journal: opaque, one per server, not in the feed ---

    async fn get_ca_journal(&self, server_id: &str) -> Result<Option<Vec<u8>>, StoreError>;

    async fn set_ca_journal(&self, server_id: &str, journal: &[u8]) -> Result<(), StoreError>;

    // --- the trust domain's authorities: one public record per server ---

    /// Records what server `server_id` publishes of its CA (`record`, opaque here) and
    /// recomputes the trust domain's bundle from every server's record, in one transaction that
    /// holds the revision lock: servers publishing at once never drop each other's keys.
    /// `merge(records, stored_bundle)` gets every record (this one's new value included) and
    /// the stored bundle JSON, and returns the new bundle JSON, or `None` when it is unchanged.
    /// A revision (a `BundleUpdated` event for `td`) is taken when the bundle or the record
    /// changed, and returned; nothing changed: `None`.
    async fn publish_authorities(
        &self,
        td: &TrustDomain,
        server_id: &str,
        record: &[u8],
        merge: &MergeBundle,
    ) -> Result<Option<u64>, StoreError>;

    /// Every server's authority record, ordered by server id.
    async fn list_authority_records(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;

    // --- federation relationships ---

    /// Creates or replaces the relationship with `rel.trust_domain`; returns the revision.
    async fn set_federation_relationship(
        &self,
        rel: &FederationRelationship,
    ) -> Result<u64, StoreError>;

    async fn get_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationRelationship>, StoreError>;

    async fn list_federation_relationships(
        &self,
    ) -> Result<Vec<FederationRelationship>, StoreError>;

    async fn delete_federation_relationship(
        &self,
        td: &TrustDomain,
    ) -> Result<FederationRelationship, StoreError>;

    /// Records how fetching `td`'s bundle went (no revision: nobody follows it). `NotFound`
    /// when there is no relationship with `td`.
    async fn set_federation_status(
        &self,
        td: &TrustDomain,
        status: &FederationStatus,
    ) -> Result<(), StoreError>;

    /// The fetch status of the relationship with `td` (`None`: no such relationship).
    async fn get_federation_status(
        &self,
        td: &TrustDomain,
    ) -> Result<Option<FederationStatus>, StoreError>;

    // --- policies ---

    /// Creates or replaces policy `policy.id`; returns the revision.
    async fn set_policy(&self, policy: &Policy) -> Result<u64, StoreError>;

    /// Creates policy `policy.id`, refused (`AlreadyExists`) if it exists: decided inside the
    /// write, once no other writer can come between, so of two creates of one name (on two
    /// servers) exactly one succeeds.
    async fn create_policy(&self, policy: &Policy) -> Result<u64, StoreError>;

    async fn get_policy(&self, id: &str) -> Result<Option<Policy>, StoreError>;

    async fn list_policies(&self) -> Result<Vec<Policy>, StoreError>;

    async fn delete_policy(&self, id: &str) -> Result<Policy, StoreError>;

    // --- the destination map ---

    /// Creates (`create_only`: refused with `AlreadyExists` if `d.id` exists) or replaces
    /// destination `d.id`; returns the revision. `admit` is asked about `d` with every other
    /// stored destination inside the write transaction, once no other writer's change can come
    /// between (the revision counter is held): its `Err(why)` refuses the change
    /// (`Conflict`). So two servers writing at once cannot store two destinations that clash,
    /// which each would have admitted against what it read before.
    async fn set_destination(
        &self,
        d: &Destination,
        create_only: bool,
        admit: &AdmitDestination<'_>,
    ) -> Result<u64, StoreError>;

    async fn get_destination(&self, id: &str) -> Result<Option<Destination>, StoreError>;

    async fn list_destinations(&self) -> Result<Vec<Destination>, StoreError>;

    async fn delete_destination(&self, id: &str) -> Result<Destination, StoreError>;

    // --- the revision feed ---

    /// The revision of the last committed change (0 for a new store).
    async fn current_revision(&self) -> Result<u64, StoreError>;

    /// Up to `limit` events with revisions after `revision`, in order. Revisions are contiguous,
    /// so a reader that resumes after the last revision it saw misses nothing; if the events it
    /// needs were pruned, it gets `Compacted`, and if its revision is ahead of the store's
    /// (a restored database), `FutureRevision`: either way it must take a snapshot instead.
    async fn events_after(&self, revision: u64, limit: u32) -> Result<Vec<Event>, StoreError>;

    /// PostgreSQL: a receiver that holds the newest revision committed by any server sharing
    /// the database, woken by LISTEN/NOTIFY as each commit becomes visible (and after a lost
    /// connection, once it is back, with the revision read then, so nothing waits for a
    /// notification that was lost). Followers still read the changes with
    /// [`Self::events_after`]; this only wakes them, and costs no statement while idle.
    /// The listening task ends when every receiver of `revisions` is dropped. SQLite: `None`
    /// (one server per file; its writers wake their own followers).
    async fn listen_revisions(&self) -> Result<Option<RevisionListener>, StoreError>;

    /// Deletes events with revisions before `before_revision` (at most up to the current one);
    /// returns how many.
    async fn prune_events(&self, before_revision: u64) -> Result<u64, StoreError>;
}
