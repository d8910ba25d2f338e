//! Policies from the agent and live re-authorization.
//!
//! [`watch_policies`] streams the policies that target this proxy's identity from the agent's
//! `tessera.v1.PolicyWatch` service (pushed, never polled), compiles each snapshot and swaps it
//! in. Every open inbound connection is registered in a [`Registry`]; after each swap, every
//! registered connection is decided again under the new set, and those now denied are closed
//! with a log line naming the policy (or the reason) that closed them. A change that puts a
//! connection or request under a CUSTOM policy whose external authorizer was never asked about
//! it asks that authorizer (in the background) and closes what it denies; authorizers asked
//! before are not asked again. On a port declared
//! `:http` the unit is the request: every request in flight (a gRPC stream, a slow download) is
//! decided again with its method, path, host and headers, and those now denied are ended.
//! Until the first snapshot arrives the proxy denies everything (fails closed): no window
//! where a stale or missing policy lets traffic through.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tessera_policy::{Addresses, DefaultAction, NamedPolicy, PolicySet};
use tessera_proto::v1 as pb;
use tessera_spiffe::SpiffeId;
use tokio::sync::watch;

use crate::identity::Identity;

/// One open connection: who, to which port, and how to close it.
#[derive(Debug)]
struct Conn {
    /// `None`: plaintext admitted to policy in PERMISSIVE mode (no identity).
    src: Option<Arc<SpiffeId>>,
    port: u16,
    /// The peer's certificate chain as verified at the handshake (re-verified on bundle change).
    chain: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// An HTTP port: each request is decided under the current set, so a policy change is not
    /// re-decided with TCP semantics here: the requests in flight are decided again instead
    /// (bundle re-verification still applies to the connection).
    http: Option<Arc<HttpRequests>>,
    /// The connection's two ends: its addresses for `when` conditions, and what an external
    /// authorizer is shown about it. `None`: not known (then no address condition holds).
    ends: Option<Ends>,
    /// The CUSTOM providers whose authorizers admitted the connection.
    asked: Asked,
    close: watch::Sender<Option<String>>,
}

/// The two ends of an inbound connection, as policy's `when` conditions and an external
/// authorizer (`crate::authz::CheckInput`) see them.
#[derive(Debug, Clone)]
pub struct Ends {
    pub peer: SocketAddr,
    pub target: SocketAddr,
    /// This workload's ID.
    pub own: Option<Arc<SpiffeId>>,
}

impl Ends {
    /// The addresses `when` conditions look at.
    pub fn addresses(&self) -> Addresses {
        Addresses::between(self.peer, self.target)
    }
}

impl Conn {
    fn addrs(&self) -> Addresses {
        self.ends.as_ref().map(Ends::addresses).unwrap_or_default()
    }
}

/// An HTTP request's attributes, owned: kept with a request in flight to decide it again, and
/// handed to an authorizer asked in the background.
#[derive(Debug, Clone)]
struct OwnedRequest {
    method: String,
    path: String,
    host: String,
    headers: Vec<(String, String)>,
}

impl OwnedRequest {
    fn new(req: &tessera_policy::HttpRequest<'_>) -> Self {
        Self {
            method: req.method.to_owned(),
            path: req.path.to_owned(),
            host: req.host.to_owned(),
            headers: req
                .headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
        }
    }

    /// The headers borrowed, for [`Self::request`].
    fn headers(&self) -> Vec<(&str, &str)> {
        self.headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    /// The request as policy takes it, with `headers` from [`Self::headers`].
    fn request<'a>(&'a self, headers: &'a [(&'a str, &'a str)]) -> tessera_policy::HttpRequest<'a> {
        tessera_policy::HttpRequest {
            method: &self.method,
            path: &self.path,
            host: &self.host,
            headers,
        }
    }
}

/// The providers (by name) whose authorizers admitted a connection or request (empty, and
/// unallocated, where no CUSTOM policy applies).
type Asked = Mutex<Vec<Arc<str>>>;

fn lock_asked(a: &Asked) -> std::sync::MutexGuard<'_, Vec<Arc<str>>> {
    a.lock().unwrap_or_else(|p| p.into_inner())
}

/// The requests in flight on one HTTP connection. A request is authorized when it starts, but
/// may last far longer than any policy (a gRPC stream, a large download): like a connection, it
/// is decided again on every policy change and ended once denied.
#[derive(Debug, Default)]
pub struct HttpRequests {
    next: AtomicU64,
    inflight: Mutex<HashMap<u64, InFlight>>,
}

/// What a request was authorized with, kept to decide it again.
#[derive(Debug)]
struct InFlight {
    req: OwnedRequest,
    /// The CUSTOM providers whose authorizers admitted the request.
    asked: Asked,
    close: watch::Sender<Option<String>>,
}

impl HttpRequests {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, InFlight>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks a request until the returned guard is dropped (its response ended, or it was
    /// refused). Tracked from before it is decided, so that no policy change is missed.
    pub fn track(self: &Arc<Self>, req: &tessera_policy::HttpRequest<'_>) -> RequestGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.lock().insert(
            id,
            InFlight {
                req: OwnedRequest::new(req),
                asked: Asked::default(),
                close,
            },
        );
        RequestGuard {
            requests: self.clone(),
            id,
            closed,
        }
    }
}

/// One tracked request; untracks it when dropped.
#[derive(Debug)]
pub struct RequestGuard {
    requests: Arc<HttpRequests>,
    id: u64,
    closed: watch::Receiver<Option<String>>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.requests.lock().remove(&self.id);
    }
}

impl RequestGuard {
    /// Records the providers whose authorizers admitted the request.
    pub fn set_asked(&self, providers: Vec<Arc<str>>) {
        if providers.is_empty() {
            return;
        }
        if let Some(r) = self.requests.lock().get(&self.id) {
            lock_asked(&r.asked).extend(providers);
        }
    }

    /// Resolves with the reason once policy denies the request (never, otherwise); owns what
    /// it waits on, so a response body can hold it.
    pub fn denied(&self) -> impl std::future::Future<Output = String> + Send + 'static {
        let mut closed = self.closed.clone();
        async move { wait_for_reason(&mut closed).await }
    }
}

/// Why a live connection must close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Policy now denies it, or its peer's certificate no longer verifies (the reason).
    Denied(String),
    /// The peer certificate it was authorized with expired (`max_connection_age = "svid"`): an
    /// end of life, not a refusal.
    Expired,
}

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Denied(why) => f.write_str(why),
            Self::Expired => f.write_str(
                "the peer certificate it was authorized with expired (max_connection_age = \"svid\")",
            ),
        }
    }
}

/// Resolves with the reason once `closed` holds one; never if its sender is gone.
async fn wait_for_reason(closed: &mut watch::Receiver<Option<String>>) -> String {
    match closed
        .wait_for(|c| c.is_some())
        .await
        .map(|r| r.clone().unwrap_or_default())
    {
        Ok(r) => r,
        Err(_) => std::future::pending().await,
    }
}

/// The open inbound connections, for re-authorization.
#[derive(Debug, Default)]
pub struct Registry {
    /// The external authorizers, when any are configured: CUSTOM was asked at admission, so a
    /// policy change decides the rest of the order and asks only authorizers not asked yet.
    authorizers: std::sync::OnceLock<Arc<crate::authz::Authorizers>>,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Conn>>,
}

/// Removes its connection from the registry when dropped.
#[derive(Debug)]
pub struct Registration {
    registry: Arc<Registry>,
    id: u64,
    /// Becomes `Some(reason)` when the connection must close.
    pub closed: watch::Receiver<Option<String>>,
    /// When the peer certificate the connection was authorized with expires (Unix seconds);
    /// `None`: no limit (`max_connection_age = "unlimited"`).
    expires_at: Option<i64>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

impl Registration {
    /// Marks the connection as HTTP (see `Conn::http`); its requests are tracked in the
    /// returned set.
    pub fn set_http(&self) -> Arc<HttpRequests> {
        let requests = Arc::new(HttpRequests::default());
        if let Some(c) = self.registry.lock().get_mut(&self.id) {
            c.http = Some(requests.clone());
        }
        requests
    }

    /// Records the providers whose authorizers admitted the connection.
    pub fn set_asked(&self, providers: Vec<Arc<str>>) {
        if providers.is_empty() {
            // No CUSTOM policy applied: nothing to record, and no second registry lock per
            // connection.
            return;
        }
        if let Some(c) = self.registry.lock().get(&self.id) {
            lock_asked(&c.asked).extend(providers);
        }
    }

    /// Resolves with the reason once the connection must close (never, otherwise).
    pub async fn wait(&mut self) -> Closed {
        let Some(at) = self.expires_at else {
            return Closed::Denied(self.wait_closed().await);
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let left = Duration::from_secs(u64::try_from(at).unwrap_or(0).saturating_sub(now));
        tokio::select! {
            r = self.wait_closed() => Closed::Denied(r),
            () = tokio::time::sleep(left) => {
                // No connection outlives the identity it was authorized with (a deleted entry,
                // a banned agent): ARCHITECTURE.md "Policy model".
                tracing::info!("closing a connection: the peer certificate it was authorized with expired (max_connection_age = \"svid\")");
                Closed::Expired
            }
        }
    }

    async fn wait_closed(&mut self) -> String {
        wait_for_reason(&mut self.closed).await
    }
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Conn>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an open connection: who (`None`: no identity), to which port, when its peer
    /// certificate expires, its chain, and its two ends (`ends`: its addresses, and what an
    /// external authorizer would be shown, so a policy change can ask one from the first
    /// moment).
    pub fn register(
        self: &Arc<Self>,
        src: Option<Arc<SpiffeId>>,
        port: u16,
        expires_at: Option<i64>,
        chain: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
        ends: Option<Ends>,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = watch::channel(None);
        self.lock().insert(
            id,
            Conn {
                src,
                port,
                chain,
                http: None,
                ends,
                asked: Asked::default(),
                close,
            },
        );
        Registration {
            registry: self.clone(),
            id,
            closed,
            expires_at,
        }
    }

    /// The external authorizers for CUSTOM policies (none configured: nothing to keep).
    pub fn set_authorizers(&self, authorizers: Arc<crate::authz::Authorizers>) {
        if !authorizers.is_empty() {
            let _ = self.authorizers.set(authorizers);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Decides every open connection again under `set`; closes the denied ones. On HTTP
    /// connections each request in flight is decided instead, and the denied ones are ended.
    /// Returns how many connections and requests were closed.
    pub fn reevaluate(&self, set: &PolicySet) -> usize {
        let mut closed = 0;
        let authorizers = self.authorizers.get();
        // With external authorizers, CUSTOM was asked at admission (or at the request);
        // the rest of the order is decided again here, and authorizers not asked yet are
        // asked (`ask_new_authorizers`).
        let redecide = |conn: &Conn, req: Option<&tessera_policy::HttpRequest<'_>>| {
            if authorizers.is_some() {
                set.decide_request(conn.src.as_deref(), conn.port, &conn.addrs(), req)
            } else {
                decide(set, conn.src.as_deref(), conn.port, &conn.addrs(), req)
            }
        };
        for conn in self.lock().values() {
            if conn.close.borrow().is_some() {
                continue;
            }
            let Some(requests) = &conn.http else {
                let d = redecide(conn, None);
                if !d.allowed {
                    tracing::warn!(
                        src = caller(conn.src.as_deref()),
                        port = conn.port,
                        policy = d.reason.policy().unwrap_or(""),
                        reason = %d.reason,
                        "closing a live connection that policy now denies"
                    );
                    let _ = conn
                        .close
                        .send(Some(format!("re-authorization: {}", d.reason)));
                    closed += 1;
                } else if let Some(a) = authorizers {
                    ask_new_authorizers(a, set, conn, None, &conn.asked, &conn.close);
                }
                continue;
            };
            for r in requests.lock().values() {
                if r.close.borrow().is_some() {
                    continue;
                }
                let headers = r.req.headers();
                let req = r.req.request(&headers);
                let d = redecide(conn, Some(&req));
                if !d.allowed {
                    tracing::warn!(
                        src = caller(conn.src.as_deref()),
                        port = conn.port,
                        method = %r.req.method,
                        path = %r.req.path,
                        policy = d.reason.policy().unwrap_or(""),
                        reason = %d.reason,
                        "ending an HTTP request in flight that policy now denies"
                    );
                    let _ = r
                        .close
                        .send(Some(format!("re-authorization: {}", d.reason)));
                    closed += 1;
                } else if let Some(a) = authorizers {
                    ask_new_authorizers(a, set, conn, Some((&req, &r.req)), &r.asked, &r.close);
                }
            }
        }
        closed
    }
    /// Verifies every open connection's peer chain again against `bundles` (after a bundle
    /// change: a CA removed from the bundle must not keep connections it authenticated) and
    /// closes those that no longer verify. Returns how many were closed.
    pub fn reverify(&self, bundles: &tessera_spiffe::BundleSet) -> usize {
        let now = tessera_tls::now();
        let mut closed = 0;
        for conn in self.lock().values() {
            if conn.close.borrow().is_some() || conn.chain.is_empty() {
                continue;
            }
            if let Err(e) =
                tessera_tls::verify_svid(&conn.chain, bundles, now, tessera_tls::PeerRole::Client)
            {
                tracing::warn!(src = caller(conn.src.as_deref()), port = conn.port, error = %e, "closing a live connection: its peer certificate no longer verifies against the current bundle");
                let _ = conn
                    .close
                    .send(Some(format!("re-verification after a bundle change: {e}")));
                closed += 1;
            }
        }
        closed
    }
}

/// A policy change can put a live connection or request under a CUSTOM policy whose external
/// authorizer was never asked about it (CUSTOM comes first in the order, and its deny is
/// final): that authorizer is asked now, in the background, and what it denies is closed. An
/// authorizer asked before is not asked again (its answer was about this same connection), so
/// unrelated changes cost the authorizers nothing. Providers are marked asked before the call,
/// so two quick changes ask once; a deny or an unreachable authorizer closes the connection
/// anyway (unless the provider is `fail_open`), which makes the mark moot.
fn ask_new_authorizers(
    authorizers: &Arc<crate::authz::Authorizers>,
    set: &PolicySet,
    conn: &Conn,
    req: Option<(&tessera_policy::HttpRequest<'_>, &OwnedRequest)>,
    asked: &Asked,
    close: &watch::Sender<Option<String>>,
) {
    let checks: Vec<tessera_policy::CustomCheck> = {
        let mut done = lock_asked(asked);
        let new: Vec<_> = set
            .custom_checks(
                conn.src.as_deref(),
                conn.port,
                &conn.addrs(),
                req.map(|(r, _)| r),
            )
            .into_iter()
            .filter(|c| !done.contains(&c.provider))
            .collect();
        done.extend(new.iter().map(|c| c.provider.clone()));
        new
    };
    let Some(first) = checks.first() else {
        return;
    };
    let handle = tokio::runtime::Handle::try_current();
    let (Some(ends), Ok(handle)) = (conn.ends.clone(), handle) else {
        // Fail closed: a CUSTOM policy covers it and its authorizer cannot be asked.
        let _ = close.send(Some(format!(
            "re-authorization: CUSTOM policy {} now covers it and its authorizer cannot be asked (fail closed)",
            first.policy
        )));
        return;
    };
    let owned = req.map(|(_, o)| o.clone());
    let (authorizers, src, port, close) = (
        authorizers.clone(),
        conn.src.clone(),
        conn.port,
        close.clone(),
    );
    handle.spawn(async move {
        let input = |http| crate::authz::CheckInput {
            src: src.as_deref(),
            src_addr: Some(ends.peer),
            dst: ends.own.as_deref(),
            dst_addr: Some(ends.target),
            http,
        };
        let denied = match &owned {
            None => authorizers.check(&checks, &input(None)).await,
            Some(o) => {
                let headers = o.headers();
                authorizers
                    .check(&checks, &input(Some(o.request(&headers))))
                    .await
            }
        };
        if let Some(deny) = denied {
            tracing::warn!(
                src = caller(src.as_deref()),
                port,
                policy = deny.reason.policy().unwrap_or(""),
                reason = %deny.reason,
                "closing a live connection or request that a CUSTOM policy's authorizer now denies"
            );
            let _ = close.send(Some(format!("re-authorization: {}", deny.reason)));
        }
    });
}

/// Re-verifies open connections on every bundle or SVID change of this proxy, and decides them
/// again under the current policy (an own-identity change changes which policies apply; the
/// agent then pushes a new set, which [`install`] re-evaluates too).
pub async fn watch_identity(
    identity: Arc<Identity>,
    policy: Arc<ArcSwap<PolicySet>>,
    registry: Arc<Registry>,
) {
    let mut changes = identity.subscribe_changes();
    while changes.changed().await.is_ok() {
        let bundles = identity.bundles().load_full();
        let reverified = registry.reverify(&bundles);
        let denied = registry.reevaluate(&policy.load());
        if reverified + denied > 0 {
            tracing::info!(
                closed = reverified + denied,
                "identity or bundle change: live connections re-authorized"
            );
        }
    }
}

fn default_of(s: &str) -> Result<DefaultAction, String> {
    match s {
        "deny" => Ok(DefaultAction::Deny),
        "allow" => Ok(DefaultAction::Allow),
        other => Err(format!("default_action {other:?}: expected deny or allow")),
    }
}

/// Compiles one pushed snapshot for `own`. Any bad document refuses the whole snapshot (the
/// last good set stays): dropping one policy could drop a DENY.
pub fn compile_snapshot(own: &SpiffeId, snap: &pb::PolicySnapshot) -> Result<PolicySet, String> {
    let default = default_of(&snap.default_action)?;
    let mut policies = Vec::with_capacity(snap.policies.len());
    for p in &snap.policies {
        policies
            .push(NamedPolicy::from_json(&p.name, &p.document_json).map_err(|e| e.to_string())?);
    }
    PolicySet::for_workload(own, default, &policies).map_err(|e| e.to_string())
}

/// Decides a connection. CUSTOM policies come first in the order; this proxy has no external
/// authorizer client yet, so a connection a CUSTOM policy covers is denied (fail closed), never
/// silently admitted past the authorizer it names.
pub fn decide(
    set: &PolicySet,
    src: Option<&SpiffeId>,
    port: u16,
    addrs: &Addresses,
    req: Option<&tessera_policy::HttpRequest<'_>>,
) -> tessera_policy::Decision {
    if set.has_custom()
        && let Some(c) = set.custom_checks(src, port, addrs, req).into_iter().next()
    {
        return tessera_policy::Decision::custom_denied(
            c.policy,
            format!(
                "external authorizer {:?} is not available in this proxy (fail closed)",
                c.provider.as_ref()
            ),
        );
    }
    set.decide_request(src, port, addrs, req)
}

/// The caller as logs name it: its SPIFFE ID, or `unauthenticated` for plaintext admitted to
/// policy in PERMISSIVE mode.
pub fn caller(src: Option<&SpiffeId>) -> &str {
    src.map_or("unauthenticated", SpiffeId::as_str)
}

/// How long an authorized connection may live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MaxConnectionAge {
    /// Until the peer certificate it was authorized with expires.
    #[default]
    Svid,
    /// No limit (policy changes still close it).
    Unlimited,
}

/// One structured decision-log line per decision (allow, deny, audit, dry-run), naming the
/// deciding policy.
pub fn log_decision(d: &tessera_policy::Decision, src: Option<&SpiffeId>, port: u16, what: &str) {
    let policy = d.reason.policy().unwrap_or("");
    let src = caller(src);
    match d.kind() {
        "deny" => {
            tracing::info!(target: "tessera::decision", decision = "deny", %src, port, policy, reason = %d.reason, what)
        }
        "audit" => {
            tracing::info!(target: "tessera::decision", decision = "audit", %src, port, policy, audit_policy = d.audit.as_deref().unwrap_or(""), reason = %d.reason, what)
        }
        _ => {
            tracing::debug!(target: "tessera::decision", decision = "allow", %src, port, policy, reason = %d.reason, what)
        }
    }
    if let Some(shadow) = &d.dry_run {
        tracing::info!(
            target: "tessera::decision",
            decision = "dry-run",
            %src,
            port,
            would = if shadow.allowed { "allow" } else { "deny" },
            policy = shadow.reason.policy().unwrap_or(""),
            reason = %shadow.reason,
            what
        );
    }
}

/// Installs `set` and closes the connections it denies.
pub fn install(policy: &ArcSwap<PolicySet>, registry: &Registry, set: PolicySet) {
    let set = Arc::new(set);
    policy.store(set.clone());
    let closed = registry.reevaluate(&set);
    tracing::info!(policies = set.len(), closed, "authorization policy updated");
}

/// Reads the local policy file again when it changes or on SIGHUP (`crate::reload`), compiles
/// it for this proxy's current identity (`default` when the file sets none) and installs it, so
/// that every live connection and request is decided again, as after a pushed change. A file
/// that cannot be read or compiled leaves the set in force, with an error naming the file and
/// the field: dropping the whole set, or one policy of it, could drop a DENY.
pub async fn watch_policy_file(
    file: crate::reload::WatchedFile,
    default: DefaultAction,
    identity: Arc<Identity>,
    policy: Arc<ArcSwap<PolicySet>>,
    registry: Arc<Registry>,
) {
    crate::reload::watch(file, |text| {
        let own = identity
            .spiffe_id()
            .ok_or_else(|| "the proxy has no identity".to_owned())?;
        let set =
            PolicySet::from_toml_for_workload(&own, text, default).map_err(|e| e.to_string())?;
        install(&policy, &registry, set);
        Ok(())
    })
    .await;
}

/// Streams policies from the agent at `socket` forever (reconnecting with backoff).
pub async fn watch_policies(
    socket: PathBuf,
    identity: Arc<Identity>,
    policy: Arc<ArcSwap<PolicySet>>,
    registry: Arc<Registry>,
) {
    reconnecting("policy stream", &socket, || {
        stream_once(&socket, &identity, &policy, &registry)
    })
    .await
}

/// Why a stream from the agent ended.
#[derive(Debug)]
pub(crate) enum StreamError {
    /// The agent does not offer this stream: an older agent, during an upgrade of the node.
    /// Not an outage: asked again rarely, and said once.
    NotOffered(String),
    Failed(String),
}

impl From<String> for StreamError {
    fn from(e: String) -> Self {
        Self::Failed(e)
    }
}

impl StreamError {
    /// The agent's answer to opening `method`.
    pub(crate) fn opening(method: &str, s: &tonic::Status) -> Self {
        let e = format!("{method}: {}", s.message());
        match s.code() {
            tonic::Code::Unimplemented => Self::NotOffered(e),
            _ => Self::Failed(e),
        }
    }
}

/// How often an agent that does not offer a stream is asked again.
const NOT_OFFERED_RETRY: Duration = Duration::from_secs(60);

/// Runs a stream from the agent socket forever: `once` until it ends or fails, then again
/// after a backoff of 100 ms doubling to 5 s (an agent restart is a matter of seconds). An
/// agent that does not offer the stream is said so once and asked again every minute.
pub(crate) async fn reconnecting<F, Fut>(what: &str, socket: &Path, mut once: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), StreamError>>,
{
    let mut backoff = Duration::from_millis(100);
    let mut said_not_offered = false;
    loop {
        let wait = match once().await {
            Ok(()) => {
                tracing::warn!("{what} ended; reconnecting");
                said_not_offered = false;
                backoff
            }
            Err(StreamError::NotOffered(e)) => {
                if !said_not_offered {
                    tracing::warn!(error = %e, socket = %socket.display(), "the agent does not offer the {what} (an older agent?); asking again every {} s", NOT_OFFERED_RETRY.as_secs());
                    said_not_offered = true;
                }
                NOT_OFFERED_RETRY
            }
            Err(StreamError::Failed(e)) => {
                tracing::warn!(error = %e, socket = %socket.display(), "{what}");
                said_not_offered = false;
                backoff
            }
        };
        tokio::time::sleep(wait).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn stream_once(
    socket: &Path,
    identity: &Identity,
    policy: &ArcSwap<PolicySet>,
    registry: &Registry,
) -> Result<(), StreamError> {
    use tessera_proto::v1::policy_watch_client::PolicyWatchClient;
    let channel = crate::identity::uds_channel(socket).await?;
    // Attested like a Workload API call, header included (Workload API §4).
    let req = crate::identity::agent_request(pb::WatchPoliciesRequest {});
    let mut stream = PolicyWatchClient::new(channel)
        .watch_policies(req)
        .await
        .map_err(|s| StreamError::opening("WatchPolicies", &s))?
        .into_inner();
    loop {
        match stream.message().await {
            Ok(Some(snap)) => {
                let Some(own) = identity.spiffe_id() else {
                    continue;
                };
                if snap.spiffe_id != own.as_str() {
                    tracing::warn!(agent_says = %snap.spiffe_id, own = %own, "policies selected for another identity than this proxy's SVID; using them only for that identity");
                }
                match compile_snapshot(&own, &snap) {
                    Ok(set) => install(policy, registry, set),
                    Err(e) => {
                        tracing::error!(error = %e, revision = snap.revision, "refusing a policy snapshot; the last good policy stays in force")
                    }
                }
            }
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("WatchPolicies stream: {}", s.message()).into()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An agent that does not offer a stream (an older one) is asked again every minute, not
    /// on the 5 s backoff of an outage (which filled the log with a warning every 5 s).
    #[tokio::test(start_paused = true)]
    async fn an_agent_without_the_stream_is_asked_again_every_minute() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let tries = async |not_offered: bool| {
            let calls = AtomicU32::new(0);
            let run = reconnecting("test stream", Path::new("/nonexistent"), || {
                calls.fetch_add(1, Ordering::Relaxed);
                async move {
                    Err(if not_offered {
                        StreamError::NotOffered("WatchTest: unimplemented".into())
                    } else {
                        StreamError::Failed("WatchTest: connection refused".into())
                    })
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(590), run).await;
            calls.load(Ordering::Relaxed)
        };
        // Just under ten minutes: once at the start and once a minute.
        assert_eq!(tries(true).await, 10);
        // An outage is retried within 5 s all along.
        assert!(tries(false).await > 100);
    }

    fn snap(default: &str, policies: &[(&str, &str)]) -> pb::PolicySnapshot {
        pb::PolicySnapshot {
            spiffe_id: "spiffe://example.org/db".into(),
            policies: policies
                .iter()
                .map(|(n, d)| pb::StoredPolicy {
                    name: (*n).into(),
                    document_json: (*d).into(),
                })
                .collect(),
            default_action: default.into(),
            revision: 1,
        }
    }

    #[tokio::test]
    async fn a_new_deny_closes_live_connections_it_denies_only() {
        let own = SpiffeId::parse("spiffe://example.org/db").unwrap();
        let td = own.trust_domain();
        let policy = ArcSwap::from_pointee(PolicySet::empty(td, DefaultAction::Allow));
        let registry = Arc::new(Registry::default());
        let foo = Arc::new(SpiffeId::parse("spiffe://example.org/foo").unwrap());
        let bar = Arc::new(SpiffeId::parse("spiffe://example.org/bar").unwrap());
        let mut f = registry.register(Some(foo), 5432, None, Arc::default(), None);
        let b = registry.register(Some(bar), 5432, None, Arc::default(), None);
        // PERMISSIVE plaintext: no identity, so nothing shows it is not foo (fail closed).
        let mut anon = registry.register(None, 5432, None, Arc::default(), None);
        let set = compile_snapshot(
            &own,
            &snap(
                "allow",
                &[(
                    "no-foo",
                    r#"{"action":"DENY","rules":[{"from":{"principals":["spiffe://example.org/foo"]}}]}"#,
                )],
            ),
        )
        .unwrap();
        install(&policy, &registry, set);
        let reason = tokio::time::timeout(Duration::from_secs(1), f.wait())
            .await
            .unwrap();
        assert!(
            matches!(&reason, Closed::Denied(r) if r.contains("no-foo")),
            "{reason}"
        );
        let reason = tokio::time::timeout(Duration::from_secs(1), anon.wait())
            .await
            .unwrap();
        assert!(
            matches!(&reason, Closed::Denied(r) if r.contains("no-foo")),
            "{reason}"
        );
        assert!(b.closed.borrow().is_none());
        drop(f);
        drop(anon);
        assert_eq!(registry.len(), 1);
    }

    #[tokio::test]
    async fn a_connection_ends_when_the_peer_certificate_expires() {
        let registry = Arc::new(Registry::default());
        let foo = Arc::new(SpiffeId::parse("spiffe://example.org/foo").unwrap());
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap();
        let mut expired =
            registry.register(Some(foo.clone()), 1, Some(now - 1), Arc::default(), None);
        let why = tokio::time::timeout(Duration::from_secs(1), expired.wait())
            .await
            .unwrap();
        assert_eq!(why, Closed::Expired, "{why}");
        assert!(why.to_string().contains("expired"), "{why}");
        let mut later = registry.register(Some(foo), 1, Some(now + 3600), Arc::default(), None);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), later.wait())
                .await
                .is_err()
        );
    }

    #[test]
    fn a_bundle_change_closes_connections_whose_peer_no_longer_verifies() {
        let ca = tessera_test_util::TestCa::new("example.org");
        let other = tessera_test_util::TestCa::new("example.org");
        let svid = ca.issue("spiffe://example.org/foo");
        let registry = Arc::new(Registry::default());
        let foo = Arc::new(SpiffeId::parse("spiffe://example.org/foo").unwrap());
        let conn = registry.register(Some(foo), 1, None, Arc::new(svid.chain.clone()), None);
        let mut set = tessera_spiffe::BundleSet::new();
        set.upsert(ca.bundle());
        assert_eq!(registry.reverify(&set), 0);
        assert!(conn.closed.borrow().is_none());
        // The CA that authenticated the peer left the bundle.
        let mut rotated = tessera_spiffe::BundleSet::new();
        rotated.upsert(other.bundle());
        assert_eq!(registry.reverify(&rotated), 1);
        assert!(
            conn.closed
                .borrow()
                .as_deref()
                .unwrap()
                .contains("bundle change")
        );
    }

    #[test]
    fn custom_policies_fail_closed_without_an_authorizer() {
        let own = SpiffeId::parse("spiffe://example.org/db").unwrap();
        let set = compile_snapshot(
            &own,
            &snap(
                "allow",
                &[(
                    "ext",
                    r#"{"action":"CUSTOM","provider":"opa","rules":[{"to":{"ports":[80]}}]}"#,
                )],
            ),
        )
        .unwrap();
        let src = SpiffeId::parse("spiffe://example.org/web").unwrap();
        let d = decide(&set, Some(&src), 80, &Addresses::default(), None);
        assert!(!d.allowed);
        assert_eq!(d.reason.policy(), Some("ext"));
        assert!(decide(&set, Some(&src), 81, &Addresses::default(), None).allowed);
    }

    #[test]
    fn a_bad_snapshot_is_refused_whole() {
        let own = SpiffeId::parse("spiffe://example.org/db").unwrap();
        let e = compile_snapshot(
            &own,
            &snap(
                "deny",
                &[
                    ("ok", r#"{"action":"ALLOW"}"#),
                    ("bad", r#"{"action":"NOPE"}"#),
                ],
            ),
        )
        .unwrap_err();
        assert!(e.contains("bad"), "{e}");
        assert!(compile_snapshot(&own, &snap("maybe", &[])).is_err());
        // Policies targeting another workload are left out.
        let s = compile_snapshot(
            &own,
            &snap(
                "allow",
                &[(
                    "web-only",
                    r#"{"action":"DENY","targets":["spiffe://example.org/web"]}"#,
                )],
            ),
        )
        .unwrap();
        assert!(s.is_empty());
    }
}
