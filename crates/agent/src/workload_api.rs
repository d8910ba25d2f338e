//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, from the upstream `workloadapi.proto`), served on
//! a Unix socket to callers identified by kernel facts.
//!
//! How a request flows:
//! 1. the connection is accepted and its caller pinned by a pidfd ([`CallerConn`]);
//! 2. the request must carry `workload.spiffe.io: true` (Workload Endpoint §3, §6);
//! 3. the caller is attested on every call (`tessera_workload_attest`, on a blocking thread) into
//!    selectors, which pick its identities from the current [`Snapshot`]; the caller is re-checked
//!    after that decision, so a process that replaced it (PID reuse) never receives it;
//! 4. unary calls answer; streams send the full state at once and then again whenever a new
//!    snapshot changes what *this* caller gets (Workload API §4.3), re-checking the caller before
//!    each update, and end when the client goes away, when the caller loses every identity
//!    (`PermissionDenied`), or when the agent shuts down (`Unavailable`).
//!
//! Every error goes through one mapping to gRPC codes (`error::to_status`).

pub(crate) mod error;
mod jwt_cache;
mod transport;
pub(crate) mod view;

use std::collections::BTreeSet;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tessera_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tessera_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, WitBundlesRequest, WitBundlesResponse,
    WitsvidRequest, WitsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svidRequest,
    X509svidResponse,
};
use tessera_spiffe::{Selector, SpiffeId, jwt};
use tessera_workload_attest::{Attestation, Attestor, PeerProcess};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

pub use error::WorkloadApiError;
pub use transport::{Caller, CallerConn, bind, incoming};

pub(crate) use error::to_status;
use jwt_cache::{JwtCache, TokenKey};

use crate::{Cache, Identity, JwtMinter, Snapshot};

/// SPIFFE Workload Endpoint §3: the static metadata every request must carry, against SSRF.
const SECURITY_HEADER: &str = "workload.spiffe.io";
const SECURITY_HEADER_VALUE: &[u8] = b"true";

/// Clock-skew allowance when validating JWT-SVIDs for callers.
const JWT_LEEWAY_SECS: u64 = 30;

/// How long [`serve`] waits, after its shutdown signal, for connections to close on their own.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Builds one stream message for a caller from a snapshot and the caller's identities.
type Build<R> = fn(&Snapshot, &[Arc<Identity>]) -> Result<R, WorkloadApiError>;

/// The Workload API service. Cheap to clone (clones share everything, the open-stream counter
/// too); one value serves one socket.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<Cache>,
    attestor: Arc<Attestor>,
    jwt: Arc<dyn JwtMinter>,
    jwt_svids: Arc<JwtCache>,
    streams: Arc<AtomicUsize>,
    metrics: Option<Arc<crate::metrics::AgentMetrics>>,
    /// Set to true when [`serve`] is told to stop: every stream then ends.
    stop: Arc<watch::Sender<bool>>,
    /// Envoy SDS, served on the same socket by [`serve`].
    sds: Arc<crate::config::SdsConfig>,
}

impl WorkloadApi {
    /// Serves identities and bundles from `cache` to callers that `attestor` maps to selectors;
    /// JWT-SVIDs come from `jwt` and are reused until half their lifetime has passed.
    pub fn new(cache: Arc<Cache>, attestor: Arc<Attestor>, jwt: Arc<dyn JwtMinter>) -> Self {
        Self {
            cache,
            attestor,
            jwt,
            jwt_svids: Arc::new(JwtCache::default()),
            streams: Arc::new(AtomicUsize::new(0)),
            metrics: None,
            stop: Arc::new(watch::Sender::new(false)),
            sds: Arc::default(),
        }
    }

    /// The resource names Envoy SDS answers to on this socket (default: SPIRE's).
    pub fn with_sds(mut self, sds: crate::config::SdsConfig) -> Self {
        self.sds = Arc::new(sds);
        self
    }

    /// How many response streams (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) are open now.
    /// Each has one task; it ends, and this count drops, as soon as its client goes away.
    /// Records streams, attestation failures and first-response latency in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::AgentMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    pub fn active_streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// The tonic service, for a server that also serves other services on the same socket. Such
    /// a server must accept connections through [`incoming`] (or tonic's Unix listener) so that
    /// requests know their caller.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// For Envoy SDS (`crate::sds`), which serves the same callers the same way: the caller's
    /// pinned process, without the security header (SDS is not a Workload API call; Envoy does
    /// not send the header, and SPIRE does not ask SDS callers for it).
    pub(crate) fn sds_caller<T>(&self, req: &Request<T>) -> Result<PeerProcess, WorkloadApiError> {
        let peer = transport::caller_of(req)?;
        tracing::debug!(
            pid = peer.creds().pid,
            uid = peer.creds().uid,
            "Envoy SDS call"
        );
        Ok(peer)
    }

    /// `PolicyWatch` and `DestinationWatch` (`crate::policy_watch`) check their callers as the
    /// Workload API does: the security header, then the pinned process.
    pub(crate) fn policy_caller<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
    ) -> Result<PeerProcess, Status> {
        self.caller(req, method)
    }

    /// Attests `peer` exactly as Workload API calls do (bounded blocking threads). The caller
    /// must re-check the attestation after deciding what to send and before sending it.
    pub(crate) async fn attest(&self, peer: PeerProcess) -> Result<Attestation, WorkloadApiError> {
        let result = self.attest_then(peer, |_| Ok(())).await.map(|(a, ())| a);
        if let (Err(WorkloadApiError::Attest(_)), Some(m)) = (&result, &self.metrics) {
            m.attestation_failures.inc();
        }
        result
    }

    /// Re-checks that an attested caller is still the process that was attested (PID reuse).
    pub(crate) async fn recheck(
        &self,
        attestation: Arc<Attestation>,
    ) -> Result<(), WorkloadApiError> {
        blocking(move || Ok(attestation.recheck()?)).await
    }

    pub(crate) fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub(crate) fn metrics(&self) -> Option<&Arc<crate::metrics::AgentMetrics>> {
        self.metrics.as_ref()
    }

    /// Becomes true when the server is stopping.
    pub(crate) fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub(crate) fn sds_config(&self) -> Arc<crate::config::SdsConfig> {
        self.sds.clone()
    }

    /// The checks every RPC starts with: the security header, then the caller's pinned process.
    fn caller<T>(&self, req: &Request<T>, rpc: &'static str) -> Result<PeerProcess, Status> {
        check_security_header(req).map_err(to_status)?;
        let peer = transport::caller_of(req).map_err(to_status)?;
        tracing::debug!(
            rpc,
            pid = peer.creds().pid,
            uid = peer.creds().uid,
            "Workload API call"
        );
        Ok(peer)
    }

    /// Attests `peer` (on a blocking thread: it reads `/proc` and may hash an executable), lets
    /// `decide` pick what the caller gets, then re-checks that the caller is still the process
    /// that was attested before handing the decision back.
    async fn attest_then<R, F>(
        &self,
        peer: PeerProcess,
        decide: F,
    ) -> Result<(Attestation, R), WorkloadApiError>
    where
        F: FnOnce(&BTreeSet<Selector>) -> Result<R, WorkloadApiError> + Send + 'static,
        R: Send + 'static,
    {
        let attestor = self.attestor.clone();
        blocking(move || {
            let attestation = attestor.attest_peer(&peer)?;
            let decision = decide(attestation.selectors())?;
            // PID reuse between accept and attestation must never grant an identity.
            attestation.recheck()?;
            Ok((attestation, decision))
        })
        .await
    }

    /// Attests the caller, computes its first message and starts the stream's task.
    async fn open_stream<R>(
        &self,
        peer: PeerProcess,
        build: Build<R>,
    ) -> Result<ReceiverStream<Result<R, Status>>, WorkloadApiError>
    where
        R: Clone + PartialEq + Send + Sync + 'static,
    {
        // Subscribed before the first message is computed, so no snapshot published after it
        // can be missed.
        let mut snapshots = self.cache.subscribe();
        let snapshot = snapshots.borrow_and_update().clone();
        let (attestation, first) = self
            .attest_then(peer, move |selectors| {
                build(&snapshot, &view::identities_for(&snapshot, selectors))
            })
            .await?;
        Ok(self.spawn_stream(Arc::new(attestation), snapshots, first, build))
    }

    fn spawn_stream<R>(
        &self,
        attestation: Arc<Attestation>,
        mut snapshots: watch::Receiver<Arc<Snapshot>>,
        first: R,
        build: Build<R>,
    ) -> ReceiverStream<Result<R, Status>>
    where
        R: Clone + PartialEq + Send + Sync + 'static,
    {
        let (tx, rx) = mpsc::channel(1);
        let guard = StreamGuard::new(
            &self.streams,
            self.metrics.as_ref().map(|m| m.streams.clone()),
        );
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            let _guard = guard;
            // Workload API §4.3: the first message is sent as soon as possible.
            if !deliver(&tx, Ok(first.clone()), &mut stop).await {
                return;
            }
            let mut last = first;
            loop {
                tokio::select! {
                    // The client cancelled the call or went away: release everything.
                    () = tx.closed() => return,
                    _ = stop.wait_for(|stopped| *stopped) => {
                        let _ = tx.try_send(Err(to_status(WorkloadApiError::ShuttingDown)));
                        return;
                    }
                    changed = snapshots.changed() => if changed.is_err() {
                        let _ = tx.try_send(Err(to_status(WorkloadApiError::ShuttingDown)));
                        return;
                    },
                }
                let snapshot = snapshots.borrow_and_update().clone();
                let next = build(
                    &snapshot,
                    &view::identities_for(&snapshot, attestation.selectors()),
                );
                let item = match next {
                    // Workload API §4.3: messages follow changes of what this caller gets, not
                    // every change of the agent's cache.
                    Ok(message) if message == last => continue,
                    Ok(message) => {
                        let pinned = attestation.clone();
                        match blocking(move || Ok(pinned.recheck()?)).await {
                            Ok(()) => {
                                last = message.clone();
                                Ok(message)
                            }
                            Err(e) => Err(to_status(e)),
                        }
                    }
                    // Workload API §5.2.1: a caller that lost every identity gets
                    // PermissionDenied, and the stream ends.
                    Err(e) => Err(to_status(e)),
                };
                let ends = item.is_err();
                if !deliver(&tx, item, &mut stop).await || ends {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    async fn jwt_svid(
        &self,
        identity: &Identity,
        audience: &[String],
        snapshot: &Snapshot,
        now: u64,
    ) -> Result<Jwtsvid, WorkloadApiError> {
        let key = TokenKey::new(&identity.entry_id, &identity.spiffe_id, audience);
        // A token signed by a tainted key is minted again with the active one.
        if self.cache.has_tainted_jwt() {
            self.jwt_svids
                .forget_tainted(|kid| self.cache.is_jwt_tainted(kid));
        }
        let token = match self
            .jwt_svids
            .get(&key, &identity.spiffe_id, now, &snapshot.bundles)
        {
            Some(token) => token,
            None => {
                let token = self
                    .jwt
                    .mint(key.entry_id(), key.audience())
                    .await
                    .map_err(WorkloadApiError::Mint)?;
                self.jwt_svids
                    .insert(key, &identity.spiffe_id, &token, now)
                    .map_err(|e| WorkloadApiError::BadMintedToken(e.to_string()))?;
                token
            }
        };
        Ok(Jwtsvid {
            spiffe_id: identity.spiffe_id.as_str().to_owned(),
            svid: token,
            hint: identity.hint.clone(),
        })
    }

    async fn fetch_jwt_svids(
        &self,
        peer: PeerProcess,
        req: JwtsvidRequest,
    ) -> Result<JwtsvidResponse, WorkloadApiError> {
        // Workload API §6.2.1 and §4.5: `audience` is mandatory.
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(WorkloadApiError::InvalidRequest(
                "`audience` is required: at least one audience, none empty (SPIFFE Workload API §6.2.1)"
                    .to_owned(),
            ));
        }
        let wanted = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(SpiffeId::parse(&req.spiffe_id).map_err(|e| {
                WorkloadApiError::InvalidRequest(format!("`spiffe_id` {:?}: {e}", req.spiffe_id))
            })?)
        };
        let snapshot = self.cache.current();
        let decided_on = snapshot.clone();
        let (attestation, identities) = self
            .attest_then(peer, move |selectors| {
                // §6.2.1: with `spiffe_id`, only that identity, and only if the caller has it;
                // without, one JWT-SVID per identity.
                let mine = decided_on
                    .identities_for(selectors)
                    .into_iter()
                    .filter(|i| wanted.as_ref().is_none_or(|w| i.spiffe_id == *w))
                    .collect();
                let mine = view::dedupe_hints(mine);
                if mine.is_empty() {
                    Err(WorkloadApiError::NoIdentity)
                } else {
                    Ok(mine)
                }
            })
            .await?;
        let now = unix_now();
        let svids = futures::future::try_join_all(
            identities
                .iter()
                .map(|i| self.jwt_svid(i, &req.audience, &snapshot, now)),
        )
        .await?;
        // Minting may have taken a round trip to the server: the tokens go only to the process
        // that was attested.
        blocking(move || Ok(attestation.recheck()?)).await?;
        Ok(JwtsvidResponse { svids })
    }

    async fn validate(
        &self,
        peer: PeerProcess,
        req: ValidateJwtsvidRequest,
    ) -> Result<ValidateJwtsvidResponse, WorkloadApiError> {
        // Workload API §6.2.3 and §4.5: both fields are mandatory.
        if req.audience.is_empty() {
            return Err(WorkloadApiError::InvalidRequest(
                "`audience` is required (SPIFFE Workload API §6.2.3)".to_owned(),
            ));
        }
        if req.svid.is_empty() {
            return Err(WorkloadApiError::InvalidRequest(
                "`svid` is required (SPIFFE Workload API §6.2.3)".to_owned(),
            ));
        }
        // Validation needs no identity of the caller's own (as in SPIRE), but the caller is
        // attested all the same: its entries decide which federated bundles it trusts.
        let snapshot = self.cache.current();
        let decided_on = snapshot.clone();
        let (_attestation, identities) = self
            .attest_then(peer, move |selectors| {
                Ok(view::identities_for(&decided_on, selectors))
            })
            .await?;
        // §6.3: the bundle of the subject's trust domain, among those this caller would get from
        // FetchJWTBundles; any other trust domain's token is untrusted.
        let bundles = view::CallerBundles::new(&snapshot, &identities);
        let svid = jwt::validate(
            &req.svid,
            &bundles,
            jwt::Validation {
                audience: &req.audience,
                now: unix_now(),
                leeway: JWT_LEEWAY_SECS,
            },
        )
        .map_err(WorkloadApiError::InvalidToken)?;
        Ok(ValidateJwtsvidResponse {
            spiffe_id: svid.spiffe_id.as_str().to_owned(),
            claims: Some(view::claims_to_struct(&svid.claims)),
        })
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ReceiverStream<Result<X509svidResponse, Status>>;
    type FetchX509BundlesStream = ReceiverStream<Result<X509BundlesResponse, Status>>;
    type FetchJWTBundlesStream = ReceiverStream<Result<JwtBundlesResponse, Status>>;
    type FetchWITSVIDStream = tokio_stream::Empty<Result<WitsvidResponse, Status>>;
    type FetchWITBundlesStream = tokio_stream::Empty<Result<WitBundlesResponse, Status>>;

    /// Workload API §5.2.1.
    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let started = std::time::Instant::now();
        let peer = self.caller(&request, "FetchX509SVID")?;
        let result = self.open_stream(peer, view::x509_svid_response).await;
        if let Some(m) = &self.metrics {
            match &result {
                Ok(_) => m.api_latency.observe(started.elapsed().as_secs_f64()),
                Err(WorkloadApiError::Attest(_)) => {
                    m.attestation_failures.inc();
                }
                Err(_) => {}
            }
        }
        result.map(Response::new).map_err(to_status)
    }

    /// Workload API §5.2.2. Like SPIRE, only a caller with at least one identity gets bundles.
    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let peer = self.caller(&request, "FetchX509Bundles")?;
        self.open_stream(peer, view::x509_bundles_response)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    /// Workload API §6.2.1.
    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let peer = self.caller(&request, "FetchJWTSVID")?;
        self.fetch_jwt_svids(peer, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    /// Workload API §6.2.2. Like SPIRE, only a caller with at least one identity gets bundles.
    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let peer = self.caller(&request, "FetchJWTBundles")?;
        self.open_stream(peer, view::jwt_bundles_response)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    /// Workload API §6.2.3.
    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let peer = self.caller(&request, "ValidateJWTSVID")?;
        self.validate(peer, request.into_inner())
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    /// Workload API §7: the WIT-SVID profile is optional; without it, `Unimplemented`.
    async fn fetch_witsvid(
        &self,
        request: Request<WitsvidRequest>,
    ) -> Result<Response<Self::FetchWITSVIDStream>, Status> {
        check_security_header(&request).map_err(to_status)?;
        Err(to_status(WorkloadApiError::WitUnsupported))
    }

    /// Workload API §7: the WIT-SVID profile is optional; without it, `Unimplemented`.
    async fn fetch_wit_bundles(
        &self,
        request: Request<WitBundlesRequest>,
    ) -> Result<Response<Self::FetchWITBundlesStream>, Status> {
        check_security_header(&request).map_err(to_status)?;
        Err(to_status(WorkloadApiError::WitUnsupported))
    }
}

/// Binds the Workload API socket at `socket_path` (see [`bind`]) and serves `api` on it until
/// `shutdown` completes (see [`serve_listener`]); then the socket file is removed, if it is
/// still the one bound here.
pub async fn serve(
    socket_path: &Path,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadApiError> {
    let listener = bind(socket_path).await?;
    let socket_file = tessera_server::unix_socket::Bound::record(socket_path);
    serve_bound(listener, &socket_file, api, shutdown).await
}

/// [`serve_listener`] on a listener [`bind`] made, whose file is `socket_file`; then that file
/// is removed, if it is still the one bound.
pub async fn serve_bound(
    listener: UnixListener,
    socket_file: &tessera_server::unix_socket::Bound,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadApiError> {
    let result = serve_listener(listener, api, shutdown).await;
    socket_file.remove();
    result
}

/// Streams one Workload API connection may have open at once: the limit of every Tessera gRPC
/// server.
pub use tessera_server::grpc_status::MAX_STREAMS_PER_CONNECTION;

/// Serves `api` on a listener [`bind`] made until `shutdown` completes. Then open streams end
/// with `Unavailable` (clients reconnect) and open connections get a few seconds to close.
pub async fn serve_listener(
    listener: UnixListener,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()>,
) -> Result<(), WorkloadApiError> {
    let stop = api.stop.clone();
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        // Streams never finish on their own; without this, a graceful shutdown would wait for
        // every client to hang up.
        stop.send_replace(true);
        let _ = stopped_tx.send(());
    };
    let sds = crate::sds::SecretDiscovery::new(api.clone()).into_service();
    let policies = crate::policy_watch::PolicyWatchService::new(api.clone()).into_service();
    let destinations =
        crate::destination_watch::DestinationWatchService::new(api.clone()).into_service();
    // A workload needs a handful of streams (X.509, JWT bundles, a few SDS resources); each open
    // stream holds the agent's resources (a descriptor to re-check its caller among them), so one
    // connection may not open thousands (MAX_STREAMS_PER_CONNECTION).
    let server = tessera_server::grpc_status::server()
        .add_service(api.into_service())
        .add_service(sds)
        .add_service(policies)
        .add_service(destinations)
        .serve_with_incoming_shutdown(incoming(listener), signal);
    tokio::pin!(server);
    tokio::select! {
        result = &mut server => Ok(result?),
        () = async {
            if stopped_rx.await.is_err() {
                std::future::pending::<()>().await;
            }
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("Workload API: connections still open after the shutdown grace period; closing them");
            Ok(())
        }
    }
}

/// SPIFFE Workload Endpoint §3: `workload.spiffe.io: true`, exactly (case sensitive); §6: else
/// `InvalidArgument`.
fn check_security_header<T>(req: &Request<T>) -> Result<(), WorkloadApiError> {
    match req.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == SECURITY_HEADER_VALUE => Ok(()),
        _ => Err(WorkloadApiError::MissingSecurityHeader),
    }
}

/// Sends one stream item unless the client is gone or the agent is stopping; true if sent.
async fn deliver<R>(
    tx: &mpsc::Sender<Result<R, Status>>,
    item: Result<R, Status>,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    tokio::select! {
        biased;
        sent = tx.send(item) => sent.is_ok(),
        _ = stop.wait_for(|stopped| *stopped) => false,
    }
}

/// At most this many attestations (/proc reads, hashing) run at once. Without a bound, a burst of
/// callers (thousands of workloads reconnecting after an agent restart) makes tokio start up to
/// 512 blocking threads, each with its own stack and allocator arena: hundreds of MiB of RSS for
/// work that is short anyway.
const MAX_CONCURRENT_ATTESTATIONS: usize = 16;

async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> Result<R, WorkloadApiError> + Send + 'static,
) -> Result<R, WorkloadApiError> {
    static LIMIT: tokio::sync::Semaphore =
        tokio::sync::Semaphore::const_new(MAX_CONCURRENT_ATTESTATIONS);
    let _permit = LIMIT
        .acquire()
        .await
        .map_err(|e| WorkloadApiError::Task(e.to_string()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkloadApiError::Task(e.to_string()))?
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts a stream while its task lives.
#[derive(Debug)]
struct StreamGuard(
    Arc<AtomicUsize>,
    Option<prometheus_client::metrics::gauge::Gauge>,
);

impl StreamGuard {
    fn new(
        count: &Arc<AtomicUsize>,
        gauge: Option<prometheus_client::metrics::gauge::Gauge>,
    ) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        if let Some(g) = &gauge {
            g.inc();
        }
        Self(count.clone(), gauge)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        if let Some(g) = &self.1 {
            g.dec();
        }
    }
}
