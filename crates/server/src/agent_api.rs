//! The agent API: node attestation, agent SVID renewal, the pushed `Sync` stream, and SVID
//! signing for the entries an agent is authorized for.
//!
//! Authorization rule (one place, [`AgentApi::authorized_parents`]): an agent may have SVIDs for
//! entries whose parent is its own ID, or whose parent is a node alias — an entry parented to the
//! server whose selectors are all among the agent's attested selectors. Anything else is refused
//! and logged.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tessera_pki::SvidTemplate;
use tessera_proto::v1 as pb;
use tessera_proto::v1::agent_api_server::AgentApi as AgentApiTrait;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain, selector};
use tessera_store::model::{Agent, Entry, EventKind, NewAgent};
use tessera_store::{EntryQuery, StoreError};
use tessera_tls::x509pop;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::{self, store_status};
use crate::federation::needs::Needs;
use crate::rate::{self, Limiter};
use crate::state::State;
use crate::transport::PeerSvid;

/// Entries per snapshot page: keeps every message far below gRPC's 4 MiB default limit.
pub(crate) const SNAPSHOT_PAGE: usize = 500;
/// Most SVIDs signed in one call.
const MAX_BATCH: usize = 1000;
/// The longest a node attestation may take, challenge and answer included.
const ATTEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(crate) struct AgentApi {
    pub(crate) state: Arc<State>,
    pub(crate) limits: Arc<Limits>,
}

/// Per-agent rate limits ([`crate::rate`]).
#[derive(Debug)]
pub(crate) struct Limits {
    sign: Limiter,
    mint_jwt: Limiter,
    renew: Limiter,
    /// The clock the buckets read (monotonic).
    start: std::time::Instant,
}

impl Limits {
    /// The limits for agents whose SVIDs live `agent_ttl_secs` (renewal follows it).
    pub(crate) fn new(agent_ttl_secs: u64) -> Self {
        Self {
            sign: Limiter::new(rate::SIGN),
            mint_jwt: Limiter::new(rate::MINT_JWT),
            renew: Limiter::new(rate::renew(agent_ttl_secs)),
            start: std::time::Instant::now(),
        }
    }

    /// Takes `n` of `what`'s tokens for `agent`, or refuses with RESOURCE_EXHAUSTED saying when
    /// to retry.
    fn take(
        &self,
        limiter: &Limiter,
        what: &str,
        agent: &SpiffeId,
        n: usize,
    ) -> Result<(), Status> {
        #[allow(clippy::cast_precision_loss)] // a batch is at most MAX_BATCH
        let n = n as f64;
        limiter
            .take(agent, n, self.start.elapsed().as_secs_f64())
            .map_err(|wait| {
                let l = limiter.limit();
                Status::resource_exhausted(format!(
                    "agent {agent} is over its {what} rate ({} at once, then {} a second); retry in {wait:.1} s",
                    l.burst, l.per_sec
                ))
            })
    }
}

/// The agent ID for a join token. The token is a secret and IDs are public, so the ID carries a
/// hash of it (the first 128 bits of SHA-256), never the token.
pub(crate) fn join_token_agent_id(
    td: &TrustDomain,
    token: &str,
) -> Result<SpiffeId, tessera_spiffe::IdError> {
    let digest = x509pop::sha256_hex(token.as_bytes());
    crate::agent_id(td, "join_token", &digest[..32])
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl AgentApi {
    /// The attested, unbanned agent behind this request's client certificate.
    async fn authenticate<T>(&self, req: &Request<T>) -> Result<Agent, Status> {
        let peer = req
            .extensions()
            .get::<PeerSvid>()
            .cloned()
            .unwrap_or_default();
        let id = peer.id.ok_or_else(|| {
            Status::unauthenticated("an agent SVID (client certificate) is required")
        })?;
        // TLS checked the SVID's validity at the handshake only, and a connection is reused for
        // as long as the agent likes: without this an expired agent SVID kept signing and even
        // renewed itself on a connection opened before it expired (SPIRE checks notAfter on
        // every call for the same reason).
        let now = i64::try_from(crate::ca::unix_now()).unwrap_or(i64::MAX);
        if peer.not_after.is_none_or(|t| now > t) {
            return Err(Status::unauthenticated(format!(
                "the agent SVID of this connection ({id}) has expired: attest again"
            )));
        }
        if !id.is_member_of(&self.state.td) || !id.path().starts_with("/tessera/agent/") {
            return Err(Status::permission_denied(format!(
                "{id} is not an agent of {}",
                self.state.td
            )));
        }
        let read = async {
            if self.state.datastore_up() {
                self.state.store.get_agent(&id).await
            } else {
                Err(StoreError::Unavailable(
                    "the datastore is unreachable".into(),
                ))
            }
        };
        let agent = match read.await {
            Ok(found) => found,
            // The datastore is unreachable: the agent as memory has it (see memory.rs).
            Err(StoreError::Unavailable(_)) => self.state.memory.agent(&id),
            Err(e) => return Err(store_status(e)),
        }
        .ok_or_else(|| {
            Status::unauthenticated(format!(
                "agent {id} is not attested (evicted?): attest again"
            ))
        })?;
        if agent.banned {
            return Err(Status::permission_denied(format!("agent {id} is banned")));
        }
        // Only the agent's current SVID is accepted: after a renewal or an eviction followed by
        // re-attestation, an older (possibly stolen) SVID of the same ID is worthless.
        if peer.serial_hex.as_deref() != Some(agent.serial.as_str()) {
            return Err(Status::unauthenticated(format!(
                "the certificate presented is not agent {id}'s current SVID: renew or attest again"
            )));
        }
        Ok(agent)
    }

    /// The parents whose entries `agent` may have: itself and every node alias it matches.
    async fn authorized_parents(&self, agent: &Agent) -> Result<BTreeSet<SpiffeId>, Status> {
        Ok(self.node_aliases(agent).await?.0)
    }

    /// [`Self::authorized_parents`], and the IDs of the node-alias entries it matched (a sync
    /// stream follows them: when one is deleted or moved, the parents are read again).
    async fn node_aliases(
        &self,
        agent: &Agent,
    ) -> Result<(BTreeSet<SpiffeId>, BTreeSet<String>), Status> {
        let query = EntryQuery {
            parent_id: Some(self.state.server_id.clone()),
            ..EntryQuery::default()
        };
        let read = async {
            if self.state.datastore_up() {
                self.state.store.list_entries(&query).await
            } else {
                Err(StoreError::Unavailable(
                    "the datastore is unreachable".into(),
                ))
            }
        };
        let aliases = match read.await {
            Ok(list) => list,
            Err(StoreError::Unavailable(_)) => self
                .state
                .memory
                .entries_by_parents([&self.state.server_id]),
            Err(e) => return Err(store_status(e)),
        };
        let mut parents = BTreeSet::from([agent.spiffe_id.clone()]);
        let mut ids = BTreeSet::new();
        for alias in aliases {
            if selector::matches(&alias.selectors, &agent.selectors) {
                parents.insert(alias.spiffe_id);
                ids.insert(alias.id);
            }
        }
        Ok((parents, ids))
    }

    /// From memory's index by parent: serving a sync queries nothing per agent.
    async fn authorized_entries(&self, parents: &BTreeSet<SpiffeId>) -> Result<Vec<Entry>, Status> {
        Ok(self.state.memory.entries_by_parents(parents))
    }

    /// Entry `id` from the datastore, or as last read while the datastore is unreachable.
    async fn entry(&self, id: &str) -> Result<Option<Entry>, Status> {
        let read = async {
            if self.state.datastore_up() {
                self.state.store.get_entry(id).await
            } else {
                Err(StoreError::Unavailable(
                    "the datastore is unreachable".into(),
                ))
            }
        };
        match read.await {
            Ok(found) => Ok(found),
            Err(StoreError::Unavailable(_)) => Ok(self.state.memory.entry(id)),
            Err(e) => Err(store_status(e)),
        }
    }

    fn sign(&self, csr: &[u8], tmpl: &SvidTemplate) -> Result<tessera_pki::SignedSvid, Status> {
        let started = std::time::Instant::now();
        let signed = self
            .state
            .ca
            .sign(csr, tmpl)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        self.state
            .metrics
            .sign_seconds
            .observe(started.elapsed().as_secs_f64());
        self.state.metrics.svids_signed.inc();
        Ok(signed)
    }

    /// Node attestation by method; returns the agent's ID and attested selectors.
    async fn attest(
        &self,
        params: &pb::AttestParams,
        inbound: &mut Streaming<pb::AttestAgentRequest>,
        tx: &mpsc::Sender<Result<pb::AttestAgentResponse, Status>>,
    ) -> Result<(SpiffeId, BTreeSet<Selector>), Status> {
        let td = &self.state.td;
        match params.method.as_str() {
            "join_token" => {
                let token = match params.payload.as_slice() {
                    [one] => std::str::from_utf8(one)
                        .map_err(|_| Status::invalid_argument("join token is not UTF-8"))?,
                    _ => {
                        return Err(Status::invalid_argument(
                            "join_token attestation takes exactly one token",
                        ));
                    }
                };
                let now = i64::try_from(crate::ca::unix_now()).unwrap_or(i64::MAX);
                // Consumed atomically in the datastore: of concurrent attempts exactly one wins.
                let used = self
                    .state
                    .store
                    .consume_join_token(token, now)
                    .await
                    .map_err(store_status)?;
                if used.is_none() {
                    return Err(Status::permission_denied(
                        "join token is unknown, expired or already used",
                    ));
                }
                let id =
                    join_token_agent_id(td, token).map_err(|e| Status::internal(e.to_string()))?;
                let digest = &x509pop::sha256_hex(token.as_bytes())[..32];
                let sel = Selector::new("agent", &format!("join_token:{digest}"))
                    .map_err(|e| Status::internal(e.to_string()))?;
                Ok((id, BTreeSet::from([sel])))
            }
            "x509pop" => {
                if self.state.x509pop_roots.is_empty() {
                    return Err(Status::failed_precondition(
                        "x509pop attestation is not configured on this server",
                    ));
                }
                let chain: Vec<rustls::pki_types::CertificateDer<'_>> = params
                    .payload
                    .iter()
                    .map(|c| rustls::pki_types::CertificateDer::from(c.as_slice()))
                    .collect();
                let roots: Vec<rustls::pki_types::CertificateDer<'_>> = self
                    .state
                    .x509pop_roots
                    .iter()
                    .map(|c| rustls::pki_types::CertificateDer::from(c.as_slice()))
                    .collect();
                let node =
                    x509pop::verify_node_chain(&chain, &roots, rustls::pki_types::UnixTime::now())
                        .map_err(|e| Status::permission_denied(e.to_string()))?;
                let mut challenge = vec![0u8; 32];
                aws_lc_rs::rand::fill(&mut challenge)
                    .map_err(|_| Status::internal("no randomness available"))?;
                tx.send(Ok(pb::AttestAgentResponse {
                    step: Some(pb::attest_agent_response::Step::Challenge(
                        challenge.clone(),
                    )),
                }))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
                let answer = match inbound.next().await {
                    Some(Ok(pb::AttestAgentRequest {
                        step: Some(pb::attest_agent_request::Step::ChallengeResponse(sig)),
                    })) => sig,
                    Some(Err(e)) => return Err(e),
                    _ => {
                        return Err(Status::invalid_argument(
                            "expected the x509pop challenge response",
                        ));
                    }
                };
                let leaf = chain
                    .first()
                    .ok_or_else(|| Status::invalid_argument("no node certificate"))?;
                x509pop::verify_pop(leaf, &challenge, &answer)
                    .map_err(|e| Status::permission_denied(e.to_string()))?;
                let id = crate::agent_id(td, "x509pop", &node.fingerprint)
                    .map_err(|e| Status::internal(e.to_string()))?;
                let mut sels = BTreeSet::new();
                if let Some(cn) = &node.subject_cn
                    && let Ok(s) = Selector::new("agent", &format!("x509pop:subject_cn:{cn}"))
                {
                    sels.insert(s);
                }
                for fp in &node.ca_fingerprints {
                    if let Ok(s) = Selector::new("agent", &format!("x509pop:ca_fingerprint:{fp}")) {
                        sels.insert(s);
                    }
                }
                Ok((id, sels))
            }
            other => Err(Status::invalid_argument(format!(
                "attestation method {other:?} is not supported; use join_token or x509pop"
            ))),
        }
    }

    async fn attest_flow(
        &self,
        mut inbound: Streaming<pb::AttestAgentRequest>,
        tx: &mpsc::Sender<Result<pb::AttestAgentResponse, Status>>,
    ) -> Result<pb::AttestResult, Status> {
        let params = match inbound.next().await {
            Some(Ok(pb::AttestAgentRequest {
                step: Some(pb::attest_agent_request::Step::Params(p)),
            })) => p,
            Some(Err(e)) => return Err(e),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must carry attestation params",
                ));
            }
        };
        // A bad CSR is refused before anything is spent: a join token is single-use, and it
        // was burned even when the agent's CSR could not be signed.
        tessera_pki::check_csr(&params.csr)
            .map_err(|e| Status::invalid_argument(format!("csr: {e}")))?;
        let (id, selectors) = self.attest(&params, &mut inbound, tx).await?;
        let tmpl = SvidTemplate {
            spiffe_id: id.clone(),
            dns_names: Vec::new(),
            ttl_secs: self.state.cfg.svid.agent_ttl.0,
        };
        let signed = self.sign(&params.csr, &tmpl)?;
        let agent = NewAgent {
            spiffe_id: id.clone(),
            attestation_type: params.method.clone(),
            selectors,
            serial: signed.serial_hex.clone(),
            expires_at: i64::try_from(signed.not_after).unwrap_or(i64::MAX),
        };
        // A banned agent cannot come back by attesting again (the store refuses: evict first).
        let stored = self
            .state
            .store
            .create_or_replace_agent(agent)
            .await
            .map_err(store_status)?;
        self.state.feed.notify(stored.updated_revision);
        tracing::info!(agent = %id, method = %params.method, "agent attested");
        Ok(pb::AttestResult {
            spiffe_id: id.to_string(),
            svid_chain: signed.chain(),
            bundle: Some(crate::admin::own_bundle(&self.state).await?),
        })
    }
}

#[tonic::async_trait]
impl AgentApiTrait for AgentApi {
    type AttestAgentStream = BoxStream<pb::AttestAgentResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest_agent(
        &self,
        req: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            // Attestation is a few messages: a stream that sends nothing (or never answers the
            // challenge) is dropped, not held, since anyone can open one without a certificate.
            let result = tokio::time::timeout(ATTEST_TIMEOUT, this.attest_flow(inbound, &tx))
                .await
                .unwrap_or_else(|_| {
                    Err(Status::deadline_exceeded(format!(
                        "attestation did not complete within {} s",
                        ATTEST_TIMEOUT.as_secs()
                    )))
                });
            let msg = result.map(|r| pb::AttestAgentResponse {
                step: Some(pb::attest_agent_response::Step::Result(r)),
            });
            if let Err(e) = &msg {
                this.state.metrics.error("attest_agent");
                tracing::warn!(error = %e.message(), "agent attestation refused");
            }
            let _ = tx.send(msg).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew_agent(
        &self,
        req: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        self.limits
            .take(&self.limits.renew, "renewal", &agent.spiffe_id, 1)?;
        let tmpl = SvidTemplate {
            spiffe_id: agent.spiffe_id.clone(),
            dns_names: Vec::new(),
            ttl_secs: self.state.cfg.svid.agent_ttl.0,
        };
        let signed = self.sign(&req.get_ref().csr, &tmpl)?;
        let expires = i64::try_from(signed.not_after).unwrap_or(i64::MAX);
        let stored = self
            .state
            .store
            .update_agent_svid(&agent.spiffe_id, &agent.serial, &signed.serial_hex, expires)
            .await
            .map_err(|e| match e {
                // Renewed or re-attested since this request was authenticated: the SVID it
                // came with is no longer the agent's, exactly as `authenticate` would now say.
                StoreError::NotFound { .. } => Status::unauthenticated(format!(
                    "the certificate presented is no longer agent {}'s current SVID: {e}",
                    agent.spiffe_id
                )),
                e => store_status(e),
            })?;
        self.state.feed.notify(stored.updated_revision);
        Ok(Response::new(pb::RenewAgentResponse {
            svid_chain: signed.chain(),
        }))
    }

    async fn sync(
        &self,
        req: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let agent = self.authenticate(&req).await?;
        let svid_not_after = req
            .extensions()
            .get::<PeerSvid>()
            .and_then(|p| p.not_after)
            .unwrap_or(0);
        let after = req.get_ref().after_revision;
        let (tx, rx) = mpsc::channel(16);
        let this = self.clone();
        this.state.metrics.sync_streams.inc();
        tokio::spawn(async move {
            if let Err(e) = this.sync_loop(agent, svid_not_after, after, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
            this.state.metrics.sync_streams.dec();
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn sign_x509_svids(
        &self,
        req: Request<pb::SignX509SvidsRequest>,
    ) -> Result<Response<pb::SignX509SvidsResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        let requests = &req.get_ref().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_BATCH} SVIDs per call, got {}",
                requests.len()
            )));
        }
        self.limits.take(
            &self.limits.sign,
            "X.509-SVID signing",
            &agent.spiffe_id,
            requests.len(),
        )?;
        let parents = self.authorized_parents(&agent).await?;
        let mut results = Vec::with_capacity(requests.len());
        for r in requests {
            let entry = self.entry(&r.entry_id).await?;
            let outcome = match entry {
                None => Err(format!("entry {:?} not found", r.entry_id)),
                Some(e) if !parents.contains(&e.parent_id) => {
                    tracing::warn!(agent = %agent.spiffe_id, entry = %e.id, spiffe_id = %e.spiffe_id, "refused to sign: agent not authorized for entry");
                    self.state.metrics.error("sign_x509_svids");
                    Err(format!(
                        "agent is not authorized for entry {:?}",
                        r.entry_id
                    ))
                }
                Some(e) => {
                    let tmpl = SvidTemplate {
                        spiffe_id: e.spiffe_id.clone(),
                        dns_names: e.dns_names.clone(),
                        ttl_secs: u64::from(e.x509_ttl_secs),
                    };
                    // Leaf first, then what chains it to the bundle (the CA and upstream
                    // intermediates under an upstream authority).
                    self.sign(&r.csr, &tmpl)
                        .map(|s| s.chain())
                        .map_err(|s| s.message().to_owned())
                }
            };
            results.push(match outcome {
                Ok(chain) => pb::SvidResult {
                    entry_id: r.entry_id.clone(),
                    svid_chain: chain,
                    error: String::new(),
                },
                Err(error) => pb::SvidResult {
                    entry_id: r.entry_id.clone(),
                    svid_chain: Vec::new(),
                    error,
                },
            });
        }
        Ok(Response::new(pb::SignX509SvidsResponse { results }))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::MintJwtSvidRequest>,
    ) -> Result<Response<pb::MintJwtSvidResponse>, Status> {
        let agent = self.authenticate(&req).await?;
        self.limits.take(
            &self.limits.mint_jwt,
            "JWT-SVID minting",
            &agent.spiffe_id,
            1,
        )?;
        let r = req.get_ref();
        let entry = self
            .state
            .store
            .get_entry(&r.entry_id)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("entry {:?} not found", r.entry_id)))?;
        if !self
            .authorized_parents(&agent)
            .await?
            .contains(&entry.parent_id)
        {
            tracing::warn!(agent = %agent.spiffe_id, entry = %entry.id, "refused to mint a JWT-SVID: agent not authorized for entry");
            return Err(Status::permission_denied(format!(
                "agent is not authorized for entry {:?}",
                r.entry_id
            )));
        }
        let token = self
            .state
            .ca
            .mint_jwt(&entry.spiffe_id, &r.audience, u64::from(entry.jwt_ttl_secs))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::MintJwtSvidResponse { token }))
    }
}

impl AgentApi {
    /// Whether the agent of a sync stream may keep it, asked after every snapshot. A snapshot
    /// is read at the store's current revision, which may be past events of the batch this loop
    /// was in (or past the revision it started from), so a ban or an eviction among them would
    /// never be looked at as an event: the agent record is read again instead.
    async fn still_admitted(&self, agent: &Agent) -> Result<(), Status> {
        if self.still_current(agent).await? {
            Ok(())
        } else {
            Err(superseded(agent))
        }
    }

    /// Whether the stream's SVID is still the agent's (false: renewed, or evicted and attested
    /// again); an error when the agent is banned or evicted.
    async fn still_current(&self, agent: &Agent) -> Result<bool, Status> {
        let id = &agent.spiffe_id;
        let now = match self.state.store.get_agent(id).await {
            Ok(a) => a,
            Err(StoreError::Unavailable(_)) => self.state.memory.agent(id),
            Err(e) => return Err(store_status(e)),
        };
        match now {
            Some(a) if a.banned => Err(Status::permission_denied(format!("agent {id} was banned"))),
            Some(a) => Ok(a.serial == agent.serial),
            None => Err(Status::permission_denied(format!("agent {id} was evicted"))),
        }
    }

    /// Sends a snapshot (or a delta, when resuming and the feed still has it), then every change
    /// as it commits, until the agent goes away or is banned/evicted.
    /// `svid_not_after`: the end of the agent SVID the stream was opened with (Unix seconds);
    /// the stream ends then, as a call with that SVID would be refused.
    async fn sync_loop(
        &self,
        agent: Agent,
        svid_not_after: i64,
        after: u64,
        tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
    ) -> Result<(), Status> {
        let store = &self.state.store;
        // Subscribe before reading so a change committed during the snapshot still wakes us.
        // Woken by the follower once memory holds the change (see state::Applied).
        let mut wake = self.state.applied.subscribe();
        let mut stopping = self.state.stopping.clone();
        let now = i64::try_from(crate::ca::unix_now()).unwrap_or(i64::MAX);
        // Valid through its notAfter second (RFC 5280 §4.1.2.5): ends just after it.
        let svid_end = tokio::time::sleep(std::time::Duration::from_secs(
            u64::try_from(svid_not_after.saturating_sub(now).saturating_add(1)).unwrap_or(0),
        ));
        tokio::pin!(svid_end);
        // Set when the agent's record moved to another SVID: the stream then ends at
        // `svid_end`, moved to at most SUPERSEDED_GRACE ahead.
        let mut superseded_svid = false;
        let (mut parents, mut alias_ids) = self.node_aliases(&agent).await?;
        // IDs of the entries this agent holds: known after a snapshot; unknown (None) when it
        // resumed, in which case every entry that is no longer its own is sent as deleted.
        let mut sent: Option<BTreeSet<String>> = None;
        // Which federated bundles this agent's entries need (sent on first need, removed after
        // the last): from the snapshot, or read once when resuming.
        let mut needs = Needs::default();
        let current = store.current_revision().await.map_err(store_status)?;
        let resumable = after > 0 && after <= current && store.events_after(after, 1).await.is_ok();
        let mut tainted = self.state.ca.tainted();
        let mut last = if resumable {
            needs = Needs::from_entries(&self.authorized_entries(&parents).await?);
            // The agent already has everything up to `after`; the tainted set is not in the
            // feed, so it is sent again.
            let set = tainted.borrow_and_update().clone();
            if !set.is_empty() {
                send_tainted(tx, after, &set).await?;
            }
            after
        } else {
            tainted.borrow_and_update();
            let rev = self
                .send_snapshot(&parents, &mut sent, &mut needs, tx)
                .await?;
            self.still_admitted(&agent).await?;
            rev
        };
        loop {
            // A busy stream may not wait (where `svid_end` is watched) for a long time.
            if svid_end.is_elapsed() {
                return Err(if superseded_svid {
                    superseded(&agent)
                } else {
                    Status::unauthenticated(format!(
                        "the agent SVID of this stream ({}) has expired: reconnect with the current one",
                        agent.spiffe_id
                    ))
                });
            }
            let from_memory = self.state.applied.events_after(last, 1000);
            let read = match from_memory {
                Some(ev) => Ok(ev),
                None => store.events_after(last, 1000).await,
            };
            let events = match read {
                Ok(ev) => ev,
                Err(StoreError::Compacted { .. }) => {
                    last = self
                        .send_snapshot(&parents, &mut sent, &mut needs, tx)
                        .await?;
                    self.still_admitted(&agent).await?;
                    continue;
                }
                Err(e) => return Err(store_status(e)),
            };
            if events.is_empty() {
                let mut taint_changed = false;
                tokio::select! {
                    changed = wake.changed() => if changed.is_err() { return Ok(()) },
                    // An operator tainted an authority: tell the agent at once, so it replaces
                    // every SVID that authority signed.
                    changed = tainted.changed() => {
                        if changed.is_err() { return Ok(()) }
                        taint_changed = true;
                    }
                    () = tx.closed() => return Ok(()),
                    // Ended at the top of the loop.
                    () = &mut svid_end => continue,
                    _ = stopping.wait_for(|s| *s) => {
                        return Err(Status::unavailable("server is shutting down; reconnect and resume"));
                    }
                }
                if taint_changed {
                    let set = tainted.borrow_and_update().clone();
                    send_tainted(tx, last, &set).await?;
                }
                continue;
            }
            for ev in events {
                last = ev.revision;
                // A node alias changed, or one this agent matched was moved or deleted: which
                // parents it has may have changed (entries under a deleted alias are no longer
                // its own, nor any created under that ID later), so they are read again and a
                // snapshot sent.
                let alias_changed = match ev.kind {
                    EventKind::EntryCreated | EventKind::EntryUpdated => {
                        match self.state.memory.entry(&ev.key) {
                            Some(e) => {
                                e.parent_id == self.state.server_id || alias_ids.contains(&e.id)
                            }
                            None => alias_ids.contains(&ev.key),
                        }
                    }
                    EventKind::EntryDeleted => alias_ids.contains(&ev.key),
                    _ => false,
                };
                if alias_changed {
                    (parents, alias_ids) = self.node_aliases(&agent).await?;
                    last = self
                        .send_snapshot(&parents, &mut sent, &mut needs, tx)
                        .await?;
                    self.still_admitted(&agent).await?;
                    break;
                }
                let mut changes = Vec::new();
                // Trust domains whose bundles this event made needed / no longer needed.
                let mut gained = Vec::new();
                let mut lost = Vec::new();
                match ev.kind {
                    EventKind::EntryCreated | EventKind::EntryUpdated => {
                        // Memory is current up to at least this event (it may be newer,
                        // which only means the agent gets the newest content sooner).
                        match self.state.memory.entry(&ev.key) {
                            Some(e) if parents.contains(&e.parent_id) => {
                                if let Some(held) = &mut sent {
                                    held.insert(e.id.clone());
                                }
                                (gained, lost) = needs.upsert(&e.id, &e.federates_with);
                                changes.push(pb::change::Change::EntryUpserted(convert::entry(&e)));
                            }
                            // Moved away from this agent (or never its): make sure it is gone.
                            Some(_) | None => {
                                lost = needs.remove(&ev.key);
                                let held = sent.as_mut().is_none_or(|h| h.remove(&ev.key));
                                if held {
                                    changes.push(pb::change::Change::EntryDeleted(ev.key.clone()));
                                }
                            }
                        }
                    }
                    EventKind::EntryDeleted => {
                        if let Some(held) = &mut sent {
                            held.remove(&ev.key);
                        }
                        lost = needs.remove(&ev.key);
                        changes.push(pb::change::Change::EntryDeleted(ev.key.clone()));
                    }
                    EventKind::BundleUpdated => {
                        let td = TrustDomain::new(&ev.key)
                            .map_err(|e| Status::internal(e.to_string()))?;
                        // Our own bundle, and federated bundles this agent's entries need.
                        if td == self.state.td || needs.contains(&td) {
                            gained.push(td);
                        }
                    }
                    EventKind::BundleDeleted => {
                        let td = TrustDomain::new(&ev.key)
                            .map_err(|e| Status::internal(e.to_string()))?;
                        if needs.contains(&td) {
                            changes.push(pb::change::Change::BundleDeleted(ev.key.clone()));
                        }
                    }
                    // Every agent gets every policy: the agent selects those targeting each
                    // workload (policies are small; targets may match any workload it serves).
                    EventKind::PolicyUpdated | EventKind::PolicyDeleted => {
                        changes.push(crate::policy_api::change(&self.state, &ev.key).await?);
                    }
                    // The destination map is the trust domain's: every agent gets all of it.
                    EventKind::DestinationUpdated | EventKind::DestinationDeleted => {
                        changes.push(crate::destination_api::change(&self.state, &ev.key).await?);
                    }
                    // This agent renewed its SVID (or attested again): the stream belongs to
                    // the SVID it was opened with, which is no longer the agent's. Without
                    // this, a stolen SVID superseded by a renewal kept a stream of the node's
                    // entries and selectors for good.
                    EventKind::AgentUpdated
                        if ev.key == agent.spiffe_id.as_str()
                            && !superseded_svid
                            && !self.still_current(&agent).await? =>
                    {
                        let end = tokio::time::Instant::now() + SUPERSEDED_GRACE;
                        if end < svid_end.deadline() {
                            svid_end.as_mut().reset(end);
                        }
                        superseded_svid = true;
                    }
                    EventKind::AgentBanned | EventKind::AgentDeleted
                        if ev.key == agent.spiffe_id.as_str() =>
                    {
                        let why = if ev.kind == EventKind::AgentBanned {
                            "banned"
                        } else {
                            "evicted"
                        };
                        tracing::info!(agent = %agent.spiffe_id, why, "closing sync stream");
                        return Err(Status::permission_denied(format!(
                            "agent {} was {why}",
                            agent.spiffe_id
                        )));
                    }
                    _ => {}
                }
                for td in gained {
                    if let Some(b) = store.get_bundle(&td).await.map_err(store_status)? {
                        changes.push(pb::change::Change::BundleUpdated(convert::bundle(
                            &td,
                            &b.bundle_json,
                        )));
                    }
                }
                for td in lost {
                    if td != self.state.td {
                        changes.push(pb::change::Change::BundleDeleted(td.to_string()));
                    }
                }
                for change in changes {
                    let msg = pb::SyncResponse {
                        msg: Some(pb::sync_response::Msg::Change(pb::Change {
                            revision: ev.revision,
                            change: Some(change),
                        })),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Sends the authorized entries and the bundle in pages; returns the revision they describe.
    async fn send_snapshot(
        &self,
        parents: &BTreeSet<SpiffeId>,
        sent: &mut Option<BTreeSet<String>>,
        needs: &mut Needs,
        tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
    ) -> Result<u64, Status> {
        // Read the revision first: anything committed after it is replayed from the feed, so
        // the snapshot may be newer than `revision` but never older.
        // The snapshot comes from memory once memory has caught up with the datastore (one read
        // of the revision per snapshot, so a stream opened right after a write sees it); memory
        // may then be a little newer than `revision`, never older. Memory stuck behind (the
        // follower cannot read the feed): from the datastore.
        let revision = match self.state.store.current_revision().await {
            Ok(r) => r,
            // The datastore is away: memory as it is (an agent failing over to this server
            // during the outage still gets its entries).
            Err(StoreError::Unavailable(_)) => self.state.applied.revision(),
            Err(e) => return Err(store_status(e)),
        };
        let mut applied = self.state.applied.subscribe();
        let caught_up = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            applied.wait_for(|r| *r >= revision),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        let entries = if caught_up {
            self.authorized_entries(parents).await?
        } else {
            let list: Vec<SpiffeId> = parents.iter().cloned().collect();
            self.state
                .store
                .list_entries_by_parents(&list)
                .await
                .map_err(store_status)?
        };
        let mut bundles = vec![crate::admin::own_bundle(&self.state).await?];
        let tainted = tainted_pb(&self.state.ca.tainted().borrow());
        *needs = Needs::from_entries(&entries);
        for td in needs.all() {
            if let Some(b) = self
                .state
                .store
                .get_bundle(td)
                .await
                .map_err(store_status)?
            {
                bundles.push(convert::bundle(td, &b.bundle_json));
            }
        }
        let policies = crate::policy_api::all_pb(&self.state).await?;
        let destinations = crate::destination_api::all_pb(&self.state).await?;
        *sent = Some(entries.iter().map(|e| e.id.clone()).collect());
        let pages: Vec<&[Entry]> = if entries.is_empty() {
            vec![&[]]
        } else {
            entries.chunks(SNAPSHOT_PAGE).collect()
        };
        let n = pages.len();
        for (i, page) in pages.into_iter().enumerate() {
            let msg = pb::SyncResponse {
                msg: Some(pb::sync_response::Msg::Snapshot(pb::SnapshotPage {
                    entries: page.iter().map(convert::entry).collect(),
                    bundles: if i == 0 { bundles.clone() } else { Vec::new() },
                    revision,
                    last: i + 1 == n,
                    tainted: (i == 0).then(|| tainted.clone()),
                    policies: if i == 0 { policies.clone() } else { Vec::new() },
                    policy_default: crate::policy_api::default_str(&self.state).to_owned(),
                    destinations: if i == 0 {
                        destinations.clone()
                    } else {
                        Vec::new()
                    },
                })),
            };
            tx.send(Ok(msg))
                .await
                .map_err(|_| Status::cancelled("agent went away"))?;
        }
        Ok(revision)
    }
}

/// The end of a stream whose SVID is no longer the agent's. FAILED_PRECONDITION, not
/// UNAVAILABLE (the agent would take it for a lost server and fail over) nor UNAUTHENTICATED
/// (it would attest again): the agent reconnects to this server with its current SVID.
fn superseded(agent: &Agent) -> Status {
    Status::failed_precondition(format!(
        "agent {}'s SVID changed since this stream began (renewed): reconnect with the current one",
        agent.spiffe_id
    ))
}

/// How long a stream opened with a superseded agent SVID lives on: the agent swaps to its new
/// SVID within moments of a renewal, so its reconnect finds the new client; a stolen, superseded
/// SVID keeps the feed no longer than this.
const SUPERSEDED_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

fn tainted_pb(t: &crate::ca::Tainted) -> pb::TaintedAuthorities {
    pb::TaintedAuthorities {
        x509_authority_ids: t.x509.clone(),
        jwt_authority_ids: t.jwt.clone(),
    }
}

async fn send_tainted(
    tx: &mpsc::Sender<Result<pb::SyncResponse, Status>>,
    revision: u64,
    set: &crate::ca::Tainted,
) -> Result<(), Status> {
    let msg = pb::SyncResponse {
        msg: Some(pb::sync_response::Msg::Change(pb::Change {
            revision,
            change: Some(pb::change::Change::AuthoritiesTainted(tainted_pb(set))),
        })),
    };
    tx.send(Ok(msg))
        .await
        .map_err(|_| Status::cancelled("agent went away"))
}
