//! Wiring of the agent: node identity, the sync client, the SVID manager, agent SVID renewal, the
//! Workload API and the health endpoint.
//!
//! Data flow: the sync task applies the server's `Sync` stream to a [`SyncState`] (entries and
//! bundle at a revision) and publishes it on a watch channel; the SVID manager turns that state
//! into signed identities (keys made here, CSRs signed by the server) and publishes cache
//! snapshots, which the Workload API streams to workloads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject as _;
use tessera_proto::v1 as pb;
use tessera_proto::v1::agent_api_client::AgentApiClient;
use tessera_server::client::ServerTrust;
use tessera_spiffe::{Bundle, BundleSet, Selector, SpiffeId, TrustDomain};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

use crate::cache::{Cache, Identity};
use crate::config::AgentConfig;
use crate::node::{self, NodeIdentity, key_and_csr};
use crate::{AgentError, JwtMinter};

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Entries and bundles as the server last described them.
#[derive(Debug, Clone, Default)]
pub(crate) struct SyncState {
    pub(crate) revision: u64,
    pub(crate) entries: BTreeMap<String, pb::Entry>,
    pub(crate) bundle: Option<Bundle>,
    /// Authority IDs an operator tainted: SVIDs they signed are replaced at once.
    pub(crate) tainted_x509: std::collections::BTreeSet<String>,
    pub(crate) tainted_jwt: std::collections::BTreeSet<String>,
    /// Bundles of the trust domains this agent's entries federate with (the server sends only
    /// those), each parsed as its own trust domain's: never merged into ours.
    pub(crate) federated: BTreeMap<TrustDomain, Bundle>,
    /// Authorization policies (name → JSON document) and the trust domain's default.
    pub(crate) policies: BTreeMap<String, String>,
    pub(crate) policy_default: String,
    /// The destination map (name → JSON document).
    pub(crate) destinations: BTreeMap<String, String>,
}

impl SyncState {
    fn set_tainted(&mut self, t: pb::TaintedAuthorities) {
        self.tainted_x509 = t.x509_authority_ids.into_iter().collect();
        self.tainted_jwt = t.jwt_authority_ids.into_iter().collect();
    }

    /// Our bundle and the federated ones, as the cache serves them.
    fn bundle_set(&self) -> Option<BundleSet> {
        let own = self.bundle.as_ref()?;
        let mut set = BundleSet::new();
        set.upsert(own.clone());
        for b in self.federated.values() {
            set.upsert(b.clone());
        }
        Some(set)
    }
}

/// A federated bundle from the server, parsed as the bundle of the trust domain it names.
fn federated_bundle(own: &TrustDomain, b: &pb::Bundle) -> Option<Bundle> {
    let td = TrustDomain::new(&b.trust_domain).ok()?;
    if &td == own {
        return None;
    }
    match Bundle::parse(td, &b.spiffe_bundle_json) {
        Ok(parsed) => Some(parsed),
        Err(e) => {
            tracing::error!(trust_domain = %b.trust_domain, error = %e, "the server sent a federated bundle that does not parse; ignoring it");
            None
        }
    }
}

/// What the tasks share.
struct Shared {
    cfg: AgentConfig,
    td: TrustDomain,
    /// Every server of the trust domain this agent may use, and which one it uses now.
    servers: Vec<SocketAddr>,
    current: std::sync::atomic::AtomicUsize,
    server_id: SpiffeId,
    bundles: tessera_tls::SharedBundles,
    node: ArcSwap<NodeIdentity>,
    client: ArcSwap<AgentApiClient<Channel>>,
    cache: Arc<Cache>,
    banned: std::sync::atomic::AtomicBool,
    metrics: Arc<crate::metrics::AgentMetrics>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("td", &self.td)
            .finish_non_exhaustive()
    }
}

impl Shared {
    fn server_addr(&self) -> SocketAddr {
        let i = self.current.load(std::sync::atomic::Ordering::SeqCst);
        self.servers[i % self.servers.len()]
    }

    /// Moves to the next server of the list (when there is more than one); returns whether it
    /// did. Every task picks the new client up on its next call; the cache, and so every SVID
    /// and Workload API stream, stays as it is.
    fn fail_over(&self) -> bool {
        if self.servers.len() < 2 {
            return false;
        }
        let from = self.server_addr();
        self.current
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let to = self.server_addr();
        match self.reconnect() {
            Ok(()) => {
                tracing::info!(%from, %to, "moving to another server");
                self.metrics.failovers.inc();
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot build a client for the next server");
                false
            }
        }
    }

    fn client(&self) -> AgentApiClient<Channel> {
        self.client.load().as_ref().clone()
    }

    /// A new client for the current agent SVID (after attestation or renewal: connections made
    /// with an older SVID are refused by the server).
    fn reconnect(&self) -> Result<(), AgentError> {
        let resolver = self.node.load().resolver()?;
        let c = tessera_server::client::agent_api(
            self.server_addr(),
            ServerTrust::Bundles(self.bundles.clone()),
            self.server_id.clone(),
            Some(resolver),
        )
        .map_err(|e| AgentError::Crypto(e.to_string()))?;
        self.client.store(Arc::new(c));
        Ok(())
    }
}

/// A running agent.
#[derive(Debug)]
pub struct RunningAgent {
    pub spiffe_id: SpiffeId,
    pub socket_path: PathBuf,
    socket_file: tessera_server::unix_socket::Bound,
    /// The node-mode admin socket, when one is served.
    admin_socket_file: Option<tessera_server::unix_socket::Bound>,
    pub cache: Arc<Cache>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningAgent {
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for mut t in self.tasks {
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        // Also when the serving task was cut short; only if the file is still ours.
        self.socket_file.remove();
        if let Some(f) = &self.admin_socket_file {
            f.remove();
        }
    }
}

fn bootstrap_trust(cfg: &AgentConfig) -> Result<ServerTrust, AgentError> {
    if let Some(p) = &cfg.trust_bundle_path {
        let bytes = std::fs::read(p).map_err(|e| AgentError::Io {
            what: format!("read trust_bundle_path {}", p.display()),
            source: e,
        })?;
        let bundle = if bytes.trim_ascii_start().starts_with(b"{") {
            Bundle::parse(cfg.trust_domain.clone(), &bytes).map_err(|e| {
                AgentError::Config(format!("trust_bundle_path {}: {e}", p.display()))
            })?
        } else {
            let mut b = Bundle::new(cfg.trust_domain.clone());
            for c in CertificateDer::pem_slice_iter(&bytes) {
                let c = c.map_err(|e| {
                    AgentError::Config(format!("trust_bundle_path {}: {e}", p.display()))
                })?;
                b.add_x509_authority(c.to_vec()).map_err(|e| {
                    AgentError::Config(format!("trust_bundle_path {}: {e}", p.display()))
                })?;
            }
            b
        };
        // Without an X.509 authority nothing can verify the server: say so about this file,
        // not later as a failed attestation that seems to blame the server.
        if bundle.x509_authorities().is_empty() {
            return Err(AgentError::Config(format!(
                "trust_bundle_path {}: no X.509 authority in it (expected PEM CA certificates or a SPIFFE bundle JSON of {})",
                p.display(),
                cfg.trust_domain
            )));
        }
        let mut set = BundleSet::new();
        set.upsert(bundle);
        return Ok(ServerTrust::Bundles(Arc::new(ArcSwap::from_pointee(set))));
    }
    if cfg.insecure_bootstrap {
        tracing::warn!(
            "insecure_bootstrap = true: the server is NOT verified on first contact; anyone on the path could impersonate it. Set trust_bundle_path instead."
        );
        return Ok(ServerTrust::InsecureBootstrap);
    }
    Err(AgentError::Config(
        "the agent has no way to trust the server: set trust_bundle_path (or insecure_bootstrap = true)".into(),
    ))
}

async fn attest(
    cfg: &AgentConfig,
    addr: SocketAddr,
    server_id: &SpiffeId,
) -> Result<(NodeIdentity, Bundle), AgentError> {
    let trust = bootstrap_trust(cfg)?;
    let mut client = tessera_server::client::agent_api(addr, trust, server_id.clone(), None)
        .map_err(|e| AgentError::Crypto(e.to_string()))?;
    let (key, csr) = key_and_csr()?;
    let res = match (&cfg.x509pop_cert_path, &cfg.x509pop_key_path, cfg.join_token.as_deref()) {
        (Some(cert_path), Some(key_path), _) => {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| AgentError::Io { what: format!("read {}", p.display()), source: e })
            };
            let chain: Vec<Vec<u8>> = CertificateDer::pem_slice_iter(&read(cert_path)?)
                .map(|c| c.map(|c| c.to_vec()))
                .collect::<Result<_, _>>()
                .map_err(|e| AgentError::Config(format!("x509pop_cert_path {}: {e}", cert_path.display())))?;
            let pem = String::from_utf8(read(key_path)?)
                .map_err(|_| AgentError::Config(format!("x509pop_key_path {}: not PEM text", key_path.display())))?;
            let node_key = rcgen::KeyPair::from_pem(&pem)
                .map_err(|e| AgentError::Config(format!("x509pop_key_path {}: {e}", key_path.display())))?;
            tessera_server::client::attest_x509pop(&mut client, chain, csr, |msg| {
                use rcgen::SigningKey as _;
                node_key.sign(msg).map_err(|e| e.to_string())
            })
            .await
        }
        (_, _, Some(token)) => tessera_server::client::attest_join_token(&mut client, token, csr).await,
        _ => {
            return Err(AgentError::Config(
                "no stored agent SVID and nothing to attest with: set join_token or x509pop_cert_path/x509pop_key_path".into(),
            ));
        }
    }
    .map_err(|e| AgentError::Server(format!("node attestation failed: {}", e.message())))?;
    let id = SpiffeId::parse(&res.spiffe_id)
        .map_err(|e| AgentError::Server(format!("server sent a bad agent ID: {e}")))?;
    let bundle = res
        .bundle
        .ok_or_else(|| AgentError::Server("no bundle in the attestation result".into()))?;
    let bundle = Bundle::parse(cfg.trust_domain.clone(), &bundle.spiffe_bundle_json)
        .map_err(|e| AgentError::Server(format!("server sent a bad bundle: {e}")))?;
    let node = NodeIdentity::new(id, res.svid_chain, key)?;
    tracing::info!(agent = %node.spiffe_id, "node attested");
    Ok((node, bundle))
}

/// Attests with the first server of `servers` that answers.
async fn attest_any(
    cfg: &AgentConfig,
    servers: &[SocketAddr],
    server_id: &SpiffeId,
) -> Result<(NodeIdentity, Bundle), AgentError> {
    let mut last = AgentError::Config("no server address configured".into());
    for addr in servers {
        match attest(cfg, *addr, server_id).await {
            Ok(done) => return Ok(done),
            Err(e) => {
                tracing::warn!(server = %addr, error = %e, "node attestation failed; trying the next server");
                last = e;
            }
        }
    }
    Err(last)
}

/// Starts the agent: attests (or loads its stored identity), then serves the Workload API.
pub async fn start(cfg: AgentConfig) -> Result<RunningAgent, AgentError> {
    cfg.validate().map_err(AgentError::Config)?;
    let servers = cfg.servers().map_err(AgentError::Config)?;
    let td = cfg.trust_domain.clone();
    let server_id = tessera_server::server_id(&td);
    let now = unix_now();
    let (node, bundle) = match node::load(&cfg.data_dir, &td, now)? {
        Some(found) => {
            tracing::info!(agent = %found.0.spiffe_id, "using the stored agent SVID");
            found
        }
        None => {
            let (node, bundle) = attest_any(&cfg, &servers, &server_id).await?;
            node::save(&cfg.data_dir, &node, &bundle)?;
            (node, bundle)
        }
    };
    let mut set = BundleSet::new();
    set.upsert(bundle);
    let bundles: tessera_tls::SharedBundles = Arc::new(ArcSwap::from_pointee(set));
    let spiffe_id = node.spiffe_id.clone();
    let client = tessera_server::client::agent_api(
        servers[0],
        ServerTrust::Bundles(bundles.clone()),
        server_id.clone(),
        Some(node.resolver()?),
    )
    .map_err(|e| AgentError::Crypto(e.to_string()))?;
    let cache = Arc::new(Cache::new());
    let (metrics, registry) = crate::metrics::AgentMetrics::new();
    let shared = Arc::new(Shared {
        metrics,
        td: td.clone(),
        servers,
        current: std::sync::atomic::AtomicUsize::new(0),
        server_id,
        bundles,
        node: ArcSwap::from_pointee(node),
        client: ArcSwap::from_pointee(client),
        cache: cache.clone(),
        banned: std::sync::atomic::AtomicBool::new(false),
        cfg,
    });
    let (stop, stop_rx) = watch::channel(false);
    let (state_tx, state_rx) = watch::channel(Arc::new(SyncState::default()));
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(sync_task(
        shared.clone(),
        state_tx,
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(svid_task(
        shared.clone(),
        state_rx.clone(),
        stop_rx.clone(),
    )));
    tasks.push(tokio::spawn(renew_task(
        shared.clone(),
        state_rx.clone(),
        stop_rx.clone(),
    )));

    let attestor = Arc::new(tessera_workload_attest::Attestor::new(
        shared.cfg.max_hash_bytes,
    ));
    let minter: Arc<dyn JwtMinter> = Arc::new(ServerMinter {
        shared: shared.clone(),
    });
    let api = crate::workload_api::WorkloadApi::new(cache.clone(), attestor, minter)
        .with_metrics(shared.metrics.clone())
        .with_sds(shared.cfg.sds.clone());
    let mut admin_socket_file = None;
    if let Some(path) = shared.cfg.admin_socket_path.clone() {
        let enrollments = crate::enroll::Enrollments::restore(&shared.cfg.data_dir);
        let authorized = shared
            .cfg
            .authorized_delegates
            .iter()
            .map(|s| SpiffeId::parse(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| AgentError::Config(format!("authorized_delegates: {e}")))?;
        let delegation = Arc::new(crate::enroll::Delegation {
            api: api.clone(),
            handle: tokio::runtime::Handle::current(),
            authorized,
        });
        crate::enroll::serve(&path, enrollments.clone(), Some(delegation)).map_err(|e| {
            AgentError::Io {
                what: format!("agent admin socket {}", path.display()),
                source: e,
            }
        })?;
        admin_socket_file = Some(tessera_server::unix_socket::Bound::record(&path));
        tracing::info!(socket = %path.display(), enrolled = enrollments.len(), "node-mode enrollment on the agent admin socket");
        tasks.push(tokio::spawn(enrolled_svid_task(
            shared.clone(),
            enrollments,
            state_rx.clone(),
            stop_rx.clone(),
        )));
    }
    // Bound here, not in the task: an agent that cannot serve the Workload API (a live agent on
    // the socket, a path too long) fails to start instead of running without it.
    let socket_path = shared.cfg.socket_path.clone();
    let listener = crate::workload_api::bind(&socket_path)
        .await
        .map_err(|e| AgentError::Config(e.to_string()))?;
    let socket_file = tessera_server::unix_socket::Bound::record(&socket_path);
    tracing::info!(socket = %socket_path.display(), "Workload API listening");
    let mut srx = stop_rx.clone();
    let served_file = socket_file.clone();
    tasks.push(tokio::spawn(async move {
        let shutdown = async move {
            let _ = srx.wait_for(|s| *s).await;
        };
        if let Err(e) =
            crate::workload_api::serve_bound(listener, &served_file, api, shutdown).await
        {
            tracing::error!(error = %e, "Workload API stopped");
        }
    }));
    if let Some(addr) = shared.cfg.health_bind_address {
        let ready_cache = cache.clone();
        let ready = tessera_telemetry::ready_when(move || {
            if ready_cache.current().trust_domain.is_some() {
                Ok(())
            } else {
                Err("no sync with the server yet")
            }
        });
        let mut hrx = stop_rx.clone();
        let (_, t) = tessera_telemetry::serve(
            addr,
            tessera_telemetry::router(registry, ready),
            async move {
                let _ = hrx.wait_for(|s| *s).await;
            },
        )
        .await
        .map_err(|e| AgentError::Io {
            what: format!("bind health endpoint {addr}"),
            source: e,
        })?;
        tasks.push(t);
    }
    tracing::info!(agent = %spiffe_id, socket = %socket_path.display(), "tessera agent started");
    Ok(RunningAgent {
        spiffe_id,
        socket_path,
        socket_file,
        admin_socket_file,
        cache,
        stop,
        tasks,
    })
}

/// Follows the server's Sync stream, reconnecting with backoff and resuming from the last
/// revision.
async fn sync_task(
    shared: Arc<Shared>,
    state_tx: watch::Sender<Arc<SyncState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut state = SyncState::default();
    // Servers tried since the last stream that worked: a full round without one backs off.
    let mut tried = 0usize;
    loop {
        if *stop.borrow() {
            return;
        }
        let mut client = shared.client();
        let result = tokio::select! {
            r = client.sync(pb::SyncRequest { after_revision: state.revision }) => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match result {
            Ok(resp) => {
                backoff = Duration::from_millis(100);
                tried = 0;
                let mut stream = resp.into_inner();
                let mut pending: Option<SyncState> = None;
                loop {
                    let msg = tokio::select! {
                        m = stream.next() => m,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    match msg {
                        Some(Ok(m)) => {
                            if apply(&shared.td, &mut state, &mut pending, m) {
                                if let Some(b) = &state.bundle {
                                    let mut set = BundleSet::new();
                                    set.upsert(b.clone());
                                    shared.bundles.store(Arc::new(set));
                                }
                                shared.cache.set_policies(crate::cache::Policies {
                                    revision: state.revision,
                                    default_action: state.policy_default.clone(),
                                    documents: state.policies.clone(),
                                });
                                shared.cache.set_destinations(crate::cache::Destinations {
                                    revision: state.revision,
                                    documents: state.destinations.clone(),
                                });
                                let _ = state_tx.send(Arc::new(state.clone()));
                            }
                        }
                        Some(Err(e)) => {
                            handle_status(&shared, &e).await;
                            if is_server_loss(&e) && shared.fail_over() {
                                tried += 1;
                            }
                            break;
                        }
                        None => break,
                    }
                }
            }
            Err(e) => {
                handle_status(&shared, &e).await;
                if is_server_loss(&e) && shared.fail_over() {
                    tried += 1;
                }
            }
        }
        // Straight on to the next server until each was tried once; then back off.
        let pause = if tried > 0 && tried < shared.servers.len() {
            Duration::from_millis(50)
        } else {
            let b = backoff;
            backoff = (backoff * 2).min(Duration::from_secs(10));
            b
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// The server went away or cannot serve (shutting down, unreachable, its database gone): worth
/// trying another. Refusals of this agent are not: every server would say the same.
fn is_server_loss(e: &tonic::Status) -> bool {
    matches!(
        e.code(),
        tonic::Code::Unavailable
            | tonic::Code::Unknown
            | tonic::Code::Internal
            | tonic::Code::Cancelled
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Aborted
    )
}

/// Reacts to an error from the server: banned and evicted agents say so in the log.
async fn handle_status(shared: &Shared, e: &tonic::Status) {
    use std::sync::atomic::Ordering;
    match e.code() {
        tonic::Code::PermissionDenied => {
            if !shared.banned.swap(true, Ordering::SeqCst) {
                tracing::error!(
                    reason = e.message(),
                    "the server refuses this agent (banned?): no new SVIDs will be issued"
                );
            }
        }
        tonic::Code::Unauthenticated => {
            tracing::error!(
                reason = e.message(),
                "the server does not accept this agent's SVID (evicted?): attesting again"
            );
            let cfg = &shared.cfg;
            match attest(cfg, shared.server_addr(), &shared.server_id).await {
                Ok((node, bundle)) => {
                    if let Err(err) = node::save(&cfg.data_dir, &node, &bundle) {
                        tracing::error!(error = %err, "cannot persist the new agent SVID");
                    }
                    shared.node.store(Arc::new(node));
                    shared.banned.store(false, Ordering::SeqCst);
                    if let Err(err) = shared.reconnect() {
                        tracing::error!(error = %err, "cannot use the new agent SVID");
                    }
                }
                Err(err) => tracing::error!(error = %err, "re-attestation failed"),
            }
        }
        // The stream belonged to the agent SVID before its renewal (the server ends it shortly
        // after): the next one is opened with the current SVID, on the same server.
        tonic::Code::FailedPrecondition => {
            tracing::info!(reason = e.message(), "sync stream ended; reconnecting")
        }
        _ => {
            tracing::warn!(code = ?e.code(), reason = e.message(), "sync with the server interrupted; reconnecting")
        }
    }
}

/// Applies one Sync message; returns true when `state` changed (a complete snapshot arrived, or
/// a change was applied).
fn apply(
    td: &TrustDomain,
    state: &mut SyncState,
    pending: &mut Option<SyncState>,
    msg: pb::SyncResponse,
) -> bool {
    match msg.msg {
        Some(pb::sync_response::Msg::Snapshot(page)) => {
            let p = pending.get_or_insert_with(|| SyncState {
                bundle: state.bundle.clone(),
                ..SyncState::default()
            });
            p.revision = page.revision;
            p.policy_default = page.policy_default;
            for pol in page.policies {
                p.policies.insert(pol.name, pol.document_json);
            }
            for d in page.destinations {
                p.destinations.insert(d.name, d.document_json);
            }
            if let Some(t) = page.tainted {
                p.set_tainted(t);
            }
            for e in page.entries {
                p.entries.insert(e.id.clone(), e);
            }
            for b in page.bundles {
                if b.trust_domain == td.as_str() {
                    if let Ok(parsed) = Bundle::parse(td.clone(), &b.spiffe_bundle_json) {
                        p.bundle = Some(parsed);
                    }
                } else if let Some(fed) = federated_bundle(td, &b) {
                    p.federated.insert(fed.trust_domain().clone(), fed);
                }
            }
            if page.last {
                if let Some(done) = pending.take() {
                    *state = done;
                }
                return true;
            }
            false
        }
        Some(pb::sync_response::Msg::Change(ch)) => {
            state.revision = state.revision.max(ch.revision);
            match ch.change {
                Some(pb::change::Change::EntryUpserted(e)) => {
                    state.entries.insert(e.id.clone(), e);
                }
                Some(pb::change::Change::EntryDeleted(id)) => {
                    state.entries.remove(&id);
                }
                Some(pb::change::Change::AuthoritiesTainted(t)) => {
                    tracing::info!(x509 = ?t.x509_authority_ids, jwt = ?t.jwt_authority_ids, "the server reports tainted authorities; replacing what they signed");
                    state.set_tainted(t);
                }
                Some(pb::change::Change::BundleUpdated(b)) if b.trust_domain == td.as_str() => {
                    match Bundle::parse(td.clone(), &b.spiffe_bundle_json) {
                        Ok(parsed) => state.bundle = Some(parsed),
                        Err(e) => {
                            tracing::error!(error = %e, "the server sent a bundle that does not parse; keeping the last one")
                        }
                    }
                }
                Some(pb::change::Change::BundleUpdated(b)) => {
                    if let Some(fed) = federated_bundle(td, &b) {
                        state.federated.insert(fed.trust_domain().clone(), fed);
                    }
                }
                Some(pb::change::Change::PolicyUpdated(p)) => {
                    state.policies.insert(p.name, p.document_json);
                }
                Some(pb::change::Change::PolicyDeleted(name)) => {
                    state.policies.remove(&name);
                }
                Some(pb::change::Change::DestinationUpdated(d)) => {
                    state.destinations.insert(d.name, d.document_json);
                }
                Some(pb::change::Change::DestinationDeleted(name)) => {
                    state.destinations.remove(&name);
                }
                Some(pb::change::Change::BundleDeleted(name)) => {
                    // Our own bundle is never dropped: the agent would trust nothing.
                    if let Ok(fed) = TrustDomain::new(&name)
                        && &fed != td
                    {
                        state.federated.remove(&fed);
                    }
                }
                _ => {}
            }
            true
        }
        None => false,
    }
}

struct Held {
    identity: Arc<Identity>,
    entry_revision: u64,
    /// The entry revision whose selectors, hint and federations `identity` carries: ahead of
    /// `entry_revision` when the entry changed and its new SVID is not signed yet.
    view_revision: u64,
    /// The entry now names another SPIFFE ID (or a selector this agent cannot parse): the held
    /// SVID is not served until the new one arrives.
    withheld: bool,
    rotate_at: u64,
    bundle_seq: Option<u64>,
    /// The signing CA's subject key identifier (the leaf's authority key identifier).
    authority_id: Option<String>,
}

/// Half of the validity left when the SVID arrived, minus up to 10 % jitter so a fleet does not
/// renew in lockstep. Counted from arrival, not from notBefore: the CA backdates notBefore for
/// clock skew, which would otherwise make short-lived SVIDs look half-expired at once.
pub(crate) fn rotate_at(received: u64, not_after: u64) -> u64 {
    let not_before = received;
    let life = not_after.saturating_sub(not_before);
    let mut b = [0u8; 2];
    let jitter = if aws_lc_rs::rand::fill(&mut b).is_ok() {
        u64::from(u16::from_le_bytes(b)) % (life / 10 + 1)
    } else {
        0
    };
    not_before + life / 2 - jitter.min(life / 2)
}

/// Keeps one signed SVID per entry: signs new and changed entries, rotates at half-life, drops
/// deleted entries, and publishes cache snapshots. Keeps serving cached SVIDs while the server is
/// unreachable (they are dropped only when they expire).
async fn svid_task(
    shared: Arc<Shared>,
    mut state_rx: watch::Receiver<Arc<SyncState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut held: HashMap<String, Held> = HashMap::new();
    // Backoff after a failed signing call: short at first, because the usual cause is brief
    // (the agent SVID was just renewed, after a taint say, and the old connection is refused).
    let mut retry_delay = Duration::from_millis(100);
    loop {
        let state = state_rx.borrow_and_update().clone();
        let now = unix_now();
        let seq = state.bundle.as_ref().and_then(|b| b.sequence);
        held.retain(|id, _| state.entries.contains_key(id));
        let due: Vec<&pb::Entry> = state
            .entries
            .values()
            .filter(|e| match held.get(&e.id) {
                None => true,
                Some(h) => {
                    h.entry_revision != e.updated_revision
                        || now >= h.rotate_at
                        || h.bundle_seq != seq
                        // Signed by a tainted CA: replaced now, not at half-life.
                        || h
                            .authority_id
                            .as_ref()
                            .is_some_and(|a| state.tainted_x509.contains(a))
                }
            })
            .collect();
        let mut retry = false;
        if !due.is_empty() && !shared.banned.load(std::sync::atomic::Ordering::SeqCst) {
            for chunk in due.chunks(500) {
                match sign_batch(&shared, chunk).await {
                    Ok(signed) => {
                        for (entry, identity) in signed {
                            let received = unix_now();
                            let na = identity.not_after;
                            let authority_id = identity
                                .chain
                                .first()
                                .and_then(|c| node::authority_key_id(c));
                            if held.contains_key(&entry.id) {
                                shared.metrics.rotations.inc();
                            }
                            held.insert(
                                entry.id.clone(),
                                Held {
                                    identity: Arc::new(identity),
                                    entry_revision: entry.updated_revision,
                                    view_revision: entry.updated_revision,
                                    withheld: false,
                                    rotate_at: rotate_at(received, na),
                                    bundle_seq: seq,
                                    authority_id,
                                },
                            );
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot get SVIDs signed; serving cached ones and retrying");
                        retry = true;
                        break;
                    }
                }
            }
        }
        // An entry that changed but is not signed again yet (signing failed, or the server
        // refused it): who gets its SVID is decided by the entry as it is now, at once.
        for (id, h) in &mut held {
            let Some(e) = state.entries.get(id) else {
                continue;
            };
            if h.view_revision == e.updated_revision {
                continue;
            }
            h.view_revision = e.updated_revision;
            match under_current_entry(&h.identity, e) {
                Some(i) => {
                    h.identity = Arc::new(i);
                    h.withheld = false;
                }
                None => h.withheld = true,
            }
        }
        shared.cache.set_tainted_jwt(&state.tainted_jwt);
        if let Some(set) = state.bundle_set() {
            let live: Vec<Arc<Identity>> = held
                .values()
                .filter(|h| h.identity.not_after > now && !h.withheld)
                .map(|h| h.identity.clone())
                .collect();
            let current = shared.cache.current();
            let changed = current.identities.len() != live.len()
                || current.bundles != set
                || !live
                    .iter()
                    .all(|l| current.identities.iter().any(|c| Arc::ptr_eq(c, l)));
            if changed {
                shared
                    .metrics
                    .svids_cached
                    .set(i64::try_from(live.len()).unwrap_or(i64::MAX));
                shared.cache.publish(shared.td.clone(), live, set);
            }
        }
        let next = held
            .values()
            .map(|h| h.rotate_at.min(h.identity.not_after))
            .min()
            .unwrap_or(now + 3600);
        let wait = if retry {
            let d = retry_delay;
            retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
            d
        } else {
            retry_delay = Duration::from_millis(100);
            Duration::from_secs(next.saturating_sub(now).clamp(1, 3600))
        };
        tokio::select! {
            r = state_rx.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// SVIDs of the enrolled workloads (node mode): for each workload, every entry whose selectors
/// are all among the workload's, signed for a key of that workload alone (`sign_batch` makes
/// a fresh key per request), renewed at half-life or when the entry changes. Entries that no
/// longer match are dropped with their keys.
async fn enrolled_svid_task(
    shared: Arc<Shared>,
    enrollments: Arc<crate::enroll::Enrollments>,
    mut state_rx: watch::Receiver<Arc<SyncState>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut changes = enrollments.subscribe();
    let mut retry_delay = Duration::from_millis(100);
    loop {
        let state = state_rx.borrow_and_update().clone();
        changes.borrow_and_update();
        let mut failed = false;
        for (wid, selectors) in enrollments.selectors() {
            let matching: Vec<&pb::Entry> = state
                .entries
                .values()
                .filter(|e| {
                    !e.selectors.is_empty()
                        && e.selectors
                            .iter()
                            .all(|s| Selector::parse(s).is_ok_and(|s| selectors.contains(&s)))
                })
                .collect();
            let pairs: Vec<(String, u64)> = matching
                .iter()
                .map(|e| (e.id.clone(), e.updated_revision))
                .collect();
            let due = enrollments.due(&wid, &pairs, unix_now());
            let due: Vec<&pb::Entry> = matching
                .iter()
                .filter(|e| due.contains(&e.id))
                .copied()
                .collect();
            let mut signed = Vec::new();
            if !due.is_empty() && !shared.banned.load(std::sync::atomic::Ordering::SeqCst) {
                match sign_batch(&shared, &due).await {
                    Ok(v) => {
                        for (entry, identity) in v {
                            let at = rotate_at(unix_now(), identity.not_after);
                            signed.push((entry.id.clone(), entry.updated_revision, identity, at));
                        }
                    }
                    Err(e) => {
                        tracing::warn!(workload = %wid, error = %e, "cannot get an enrolled workload's SVIDs signed; retrying");
                        failed = true;
                    }
                }
            }
            enrollments.store(&wid, &pairs, signed);
        }
        // Rotation is checked at least every 30 s (SVIDs live far longer).
        let wait = if failed {
            let d = retry_delay;
            retry_delay = (retry_delay * 2).min(Duration::from_secs(5));
            d
        } else {
            retry_delay = Duration::from_millis(100);
            Duration::from_secs(30)
        };
        tokio::select! {
            r = state_rx.changed() => if r.is_err() { return },
            r = changes.changed() => if r.is_err() { return },
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

async fn sign_batch<'a>(
    shared: &Shared,
    entries: &[&'a pb::Entry],
) -> Result<Vec<(&'a pb::Entry, Identity)>, String> {
    let mut keys = Vec::with_capacity(entries.len());
    let mut requests = Vec::with_capacity(entries.len());
    for e in entries {
        let (key, csr) = key_and_csr().map_err(|e| e.to_string())?;
        keys.push(key);
        requests.push(pb::SvidRequest {
            entry_id: e.id.clone(),
            csr,
        });
    }
    let resp = shared
        .client()
        .sign_x509_svids(pb::SignX509SvidsRequest { requests })
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    let mut out = Vec::new();
    for ((entry, key), result) in entries.iter().zip(keys).zip(resp.results) {
        if !result.error.is_empty() || result.entry_id != entry.id {
            tracing::warn!(entry = %entry.id, error = %result.error, "the server did not sign an SVID");
            continue;
        }
        let Ok(spiffe_id) = SpiffeId::parse(&entry.spiffe_id) else {
            continue;
        };
        let Some(selectors) = entry_selectors(&entry.selectors) else {
            tracing::warn!(entry = %entry.id, selectors = ?entry.selectors, "entry left out: a selector does not parse here");
            continue;
        };
        let federates_with = entry_federations(&entry.federates_with);
        let not_after = result
            .svid_chain
            .first()
            .and_then(|c| node::validity(c).ok())
            .map_or(0, |v| v.1);
        out.push((
            *entry,
            Identity {
                entry_id: entry.id.clone(),
                spiffe_id,
                selectors,
                hint: entry.hint.clone(),
                federates_with,
                chain: result.svid_chain,
                key_pkcs8: key,
                not_after,
            },
        ));
    }
    Ok(out)
}

/// Renews the agent SVID at half-life, or at once when the CA that signed it is tainted (it
/// may be revoked next, and the server would then refuse this agent).
async fn renew_task(
    shared: Arc<Shared>,
    mut state_rx: watch::Receiver<Arc<SyncState>>,
    mut stop: watch::Receiver<bool>,
) {
    let node_tainted = |state: &SyncState, shared: &Shared| {
        shared
            .node
            .load()
            .chain
            .first()
            .and_then(|c| node::authority_key_id(c))
            .is_some_and(|a| state.tainted_x509.contains(&a))
    };
    loop {
        let now = unix_now();
        let at = shared.node.load().renew_at();
        let wait = Duration::from_secs(at.saturating_sub(now).max(1));
        let tainted_now = tokio::select! {
            () = tokio::time::sleep(wait) => false,
            r = state_rx.changed() => {
                if r.is_err() { return }
                let state = state_rx.borrow_and_update().clone();
                node_tainted(&state, &shared)
            }
            _ = stop.wait_for(|s| *s) => return,
        };
        if !tainted_now && unix_now() < shared.node.load().renew_at() {
            continue;
        }
        let result = async {
            let (key, csr) = key_and_csr().map_err(|e| e.to_string())?;
            let resp = shared
                .client()
                .renew_agent(pb::RenewAgentRequest { csr })
                .await
                .map_err(|s| s.message().to_owned())?;
            let id = shared.node.load().spiffe_id.clone();
            NodeIdentity::new(id, resp.into_inner().svid_chain, key).map_err(|e| e.to_string())
        }
        .await;
        match result {
            Ok(node) => {
                if let Some(b) = shared.bundles.load().iter().next().cloned()
                    && let Err(e) = node::save(&shared.cfg.data_dir, &node, &b)
                {
                    tracing::error!(error = %e, "cannot persist the renewed agent SVID");
                }
                shared.node.store(Arc::new(node));
                if let Err(e) = shared.reconnect() {
                    tracing::error!(error = %e, "cannot use the renewed agent SVID");
                }
                tracing::info!("renewed the agent SVID");
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent SVID renewal failed; retrying");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(5)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    }
}

/// Mints JWT-SVIDs through the server.
struct ServerMinter {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServerMinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServerMinter")
    }
}

#[tonic::async_trait]
impl JwtMinter for ServerMinter {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<String, tonic::Status> {
        let resp = self
            .shared
            .client()
            .mint_jwt_svid(pb::MintJwtSvidRequest {
                entry_id: entry_id.to_owned(),
                audience: audience.to_vec(),
            })
            .await?;
        Ok(resp.into_inner().token)
    }
}

/// A held SVID as served once its entry changed, before the new SVID is signed: the same
/// certificate and key, matched by the entry's current selectors, hint and federations (who
/// may have an identity is the entry's to say, at once, as in SPIRE). `None` when the entry
/// now names another SPIFFE ID (the certificate no longer matches it) or has a selector this
/// agent cannot parse: then nothing is served for it until the new SVID arrives.
fn under_current_entry(held: &Identity, entry: &pb::Entry) -> Option<Identity> {
    if held.spiffe_id.as_str() != entry.spiffe_id {
        return None;
    }
    Some(Identity {
        entry_id: held.entry_id.clone(),
        spiffe_id: held.spiffe_id.clone(),
        selectors: entry_selectors(&entry.selectors)?,
        hint: entry.hint.clone(),
        federates_with: entry_federations(&entry.federates_with),
        chain: held.chain.clone(),
        key_pkcs8: zeroize::Zeroizing::new(held.key_pkcs8.to_vec()),
        not_after: held.not_after,
    })
}

/// An entry's selectors, or `None` when one of them does not parse here (a newer server's):
/// then the whole entry is refused, since leaving the selector out would make the entry match
/// more workloads than it names (an entry matches when all its selectors are the caller's).
fn entry_selectors(raw: &[String]) -> Option<BTreeSet<Selector>> {
    raw.iter().map(|s| Selector::parse(s).ok()).collect()
}

/// The trust domains an entry federates with (the server validated them when it stored the
/// entry; one this agent cannot parse only narrows which bundles are sent).
fn entry_federations(raw: &[String]) -> BTreeSet<TrustDomain> {
    raw.iter()
        .filter_map(|t| TrustDomain::new(t).ok())
        .collect()
}

#[cfg(test)]
mod federation_tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    fn pb_bundle(ca: &tessera_test_util::TestCa) -> pb::Bundle {
        let b = ca.bundle();
        pb::Bundle {
            trust_domain: b.trust_domain().to_string(),
            spiffe_bundle_json: b.to_json().into_bytes(),
            sequence: 0,
        }
    }

    fn change(c: pb::change::Change) -> pb::SyncResponse {
        pb::SyncResponse {
            msg: Some(pb::sync_response::Msg::Change(pb::Change {
                revision: 7,
                change: Some(c),
            })),
        }
    }

    #[test]
    fn federated_bundles_are_kept_per_trust_domain_and_never_replace_ours() {
        let own = td("example.org");
        let (own_ca, fed_ca, fed_ca2) = (
            tessera_test_util::TestCa::new("example.org"),
            tessera_test_util::TestCa::new("fed.test"),
            tessera_test_util::TestCa::new("fed.test"),
        );
        let mut state = SyncState::default();
        let mut pending = None;
        let snap = pb::SyncResponse {
            msg: Some(pb::sync_response::Msg::Snapshot(pb::SnapshotPage {
                entries: Vec::new(),
                bundles: vec![pb_bundle(&own_ca), pb_bundle(&fed_ca)],
                revision: 5,
                last: true,
                tainted: None,
                ..Default::default()
            })),
        };
        assert!(apply(&own, &mut state, &mut pending, snap));
        let set = state.bundle_set().unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(
            state.federated[&td("fed.test")].x509_authorities(),
            [fed_ca.root().to_vec()]
        );

        // A pushed update replaces the federated bundle; ours is untouched.
        apply(
            &own,
            &mut state,
            &mut pending,
            change(pb::change::Change::BundleUpdated(pb_bundle(&fed_ca2))),
        );
        assert_eq!(
            state.federated[&td("fed.test")].x509_authorities(),
            [fed_ca2.root().to_vec()]
        );
        assert_eq!(
            state.bundle.as_ref().unwrap().x509_authorities(),
            [own_ca.root().to_vec()]
        );

        // Deleting our own trust domain's bundle is ignored; a federated one goes.
        for name in ["example.org", "fed.test"] {
            apply(
                &own,
                &mut state,
                &mut pending,
                change(pb::change::Change::BundleDeleted(name.into())),
            );
        }
        assert!(state.bundle.is_some());
        assert!(state.federated.is_empty());
        assert_eq!(state.bundle_set().unwrap().len(), 1);
        assert_eq!(state.revision, 7);
    }
}

#[cfg(test)]
mod selector_tests {
    use super::*;

    #[test]
    fn a_changed_entry_decides_who_gets_its_held_svid_before_it_is_signed_again() {
        let held = Identity {
            entry_id: "e1".into(),
            spiffe_id: tessera_spiffe::SpiffeId::parse("spiffe://example.org/web").unwrap(),
            selectors: [Selector::parse("unix:uid:1000").unwrap()].into(),
            hint: String::new(),
            federates_with: BTreeSet::new(),
            chain: vec![b"leaf".to_vec()],
            key_pkcs8: zeroize::Zeroizing::new(b"key".to_vec()),
            not_after: 9,
        };
        let mut entry = pb::Entry {
            id: "e1".into(),
            spiffe_id: "spiffe://example.org/web".into(),
            selectors: vec!["unix:uid:1001".into()],
            hint: "internal".into(),
            ..Default::default()
        };
        let now = under_current_entry(&held, &entry).unwrap();
        let uid = |u: &str| Selector::parse(&format!("unix:uid:{u}")).unwrap();
        assert!(now.selectors.contains(&uid("1001")) && !now.selectors.contains(&uid("1000")));
        assert_eq!(
            (now.hint.as_str(), now.chain.clone()),
            ("internal", held.chain.clone())
        );
        entry.spiffe_id = "spiffe://example.org/api".into();
        assert!(under_current_entry(&held, &entry).is_none());
    }

    #[test]
    fn an_entry_with_a_selector_this_agent_cannot_parse_is_refused_whole() {
        let ok = entry_selectors(&["unix:uid:1000".into(), "netns:name:a".into()]);
        assert_eq!(ok.map(|s| s.len()), Some(2));
        assert!(entry_selectors(&["unix:uid:1000".into(), "no-colon".into()]).is_none());
    }
}
