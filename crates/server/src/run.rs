//! Wiring: opens the datastore and the CA, starts the agent API, the admin API, the health
//! endpoint and the rotation timer, and stops them all on shutdown.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tessera_pki::SvidTemplate;
use tessera_proto::v1::admin_api_server::AdminApiServer;
use tessera_proto::v1::agent_api_server::AgentApiServer;
use tessera_proto::v1::authority_api_server::AuthorityApiServer;
use tessera_proto::v1::federation_api_server::FederationApiServer;
use tessera_spiffe::BundleSet;
use tessera_tls::{SharedBundles, SpiffeClientVerifier, SvidResolver};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::Admin;
use crate::agent_api::AgentApi;
use crate::audit::AuditLog;
use crate::ca::{CaManager, unix_now};
use crate::metrics::Metrics;
use crate::state::{Feed, State};
use crate::{ServerConfig, ServerError};

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
#[derive(Debug)]
pub struct RunningServer {
    /// Where the agent API listens (useful when configured with port 0).
    pub agent_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub admin_socket: PathBuf,
    admin_socket_file: crate::unix_socket::Bound,
    /// Where the admin API listens over mTLS, when `admin_bind_address` is set.
    pub admin_addr: Option<SocketAddr>,
    /// The trust bundle (SPIFFE JSON) at start, for agents that bootstrap from a file.
    pub bundle_json: String,
    /// Where the bundle endpoint listens, when `[bundle_endpoint]` is configured.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    state: Arc<State>,
}

impl RunningServer {
    /// Entries created without a parent ID get this one (dev mode: the embedded agent).
    pub fn set_default_parent(&self, id: tessera_spiffe::SpiffeId) {
        self.state.default_parent.store(Some(Arc::new(id)));
    }

    /// Stops every endpoint and waits for them.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for mut t in self.tasks {
            // Streams end on the stop signal; a connection that does not drain in time is cut.
            if tokio::time::timeout(Duration::from_secs(5), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
        self.admin_socket_file.remove();
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// The server's own X509-SVID (`spiffe://<td>/tessera/server`), with a key made here.
fn server_svid(state: &State) -> Result<(Arc<rustls::sign::CertifiedKey>, u64), ServerError> {
    let key = rcgen::KeyPair::generate().map_err(|e| ServerError::Tls(e.to_string()))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let tmpl = SvidTemplate {
        spiffe_id: state.server_id.clone(),
        dns_names: Vec::new(),
        ttl_secs: state.cfg.svid.agent_ttl.0,
    };
    let signed = state.ca.sign(csr.der(), &tmpl)?;
    let ck = tessera_tls::certified_key(
        signed
            .chain()
            .into_iter()
            .map(CertificateDer::from)
            .collect(),
        PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok((ck, signed.not_after))
}

fn load_x509pop_roots(cfg: &ServerConfig) -> Result<Vec<Vec<u8>>, ServerError> {
    let Some(path) = &cfg.node_attestation.x509pop.ca_bundle_path else {
        return Ok(Vec::new());
    };
    let roots: Vec<Vec<u8>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| {
            ServerError::Invalid(format!(
                "node_attestation.x509pop.ca_bundle_path {}: {e}",
                path.display()
            ))
        })?
        .map(|c| c.map(|c| c.to_vec()))
        .collect::<Result<_, _>>()
        .map_err(|e| {
            ServerError::Invalid(format!(
                "node_attestation.x509pop.ca_bundle_path {}: {e}",
                path.display()
            ))
        })?;
    if roots.is_empty() {
        return Err(ServerError::Invalid(format!(
            "node_attestation.x509pop.ca_bundle_path {}: no CERTIFICATE in it",
            path.display()
        )));
    }
    Ok(roots)
}

/// The upstream authority of `[upstream_authority]`, if one is configured.
fn load_upstream(
    cfg: &ServerConfig,
) -> Result<Option<Arc<dyn tessera_pki::UpstreamAuthority>>, ServerError> {
    let Some(disk) = &cfg.upstream_authority.disk else {
        return Ok(None);
    };
    let read = |what: &str, p: &std::path::Path| {
        std::fs::read(p).map_err(|e| {
            ServerError::Invalid(format!(
                "upstream_authority.disk.{what} {}: {e}",
                p.display()
            ))
        })
    };
    let chain = read("cert_chain_path", &disk.cert_chain_path)?;
    let key = zeroize::Zeroizing::new(read("key_path", &disk.key_path)?);
    let bundle = match &disk.bundle_path {
        Some(p) => Some(read("bundle_path", p)?),
        None => None,
    };
    let up = tessera_pki::DiskUpstream::from_pem(&chain, &key, bundle.as_deref())
        .map_err(|e| ServerError::Invalid(format!("upstream_authority.disk: {e}")))?;
    Ok(Some(Arc::new(up)))
}

/// The trust the mTLS endpoints verify clients with: every server's authorities of our trust
/// domain (an agent may hold an SVID that another server of the domain signed).
pub(crate) fn own_bundles(state: &State) -> Result<BundleSet, ServerError> {
    let mut set = BundleSet::new();
    set.insert(state.ca.trust_bundle()?)
        .map_err(|e| ServerError::Ca(e.to_string()))?;
    Ok(set)
}

/// Reads every entry and agent into memory (a page at a time).
pub(crate) async fn load_memory(state: &State) -> Result<(), ServerError> {
    let store = &state.store;
    let mut entries = Vec::new();
    loop {
        let page = store
            .list_entries(&tessera_store::EntryQuery {
                after: entries.last().map(|e: &tessera_store::Entry| e.id.clone()),
                limit: Some(5000),
                ..tessera_store::EntryQuery::default()
            })
            .await?;
        let done = page.len() < 5000;
        entries.extend(page);
        if done {
            break;
        }
    }
    let mut agents = Vec::new();
    loop {
        let page = store
            .list_agents(&tessera_store::AgentQuery {
                after: agents
                    .last()
                    .map(|a: &tessera_store::Agent| a.spiffe_id.clone()),
                limit: Some(5000),
                ..tessera_store::AgentQuery::default()
            })
            .await?;
        let done = page.len() < 5000;
        agents.extend(page);
        if done {
            break;
        }
    }
    state.memory.load(entries, agents);
    Ok(())
}

/// Starts a server from `cfg`; returns once every endpoint listens.
pub async fn start(cfg: ServerConfig) -> Result<RunningServer, ServerError> {
    cfg.validate()
        .map_err(|e| ServerError::Invalid(e.to_string()))?;
    // Before anything is created: bad upstream files change nothing.
    let upstream = load_upstream(&cfg)?;
    let io_err = |what: String| move |source| ServerError::Io { what, source };
    std::fs::create_dir_all(&cfg.data_dir)
        .map_err(io_err(format!("create {}", cfg.data_dir.display())))?;
    std::fs::set_permissions(&cfg.data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(io_err(format!("chmod {}", cfg.data_dir.display())))?;

    let store = tessera_store::open(&cfg.datastore_url()).await?;
    let now = unix_now();
    let ca = CaManager::open(
        &cfg.trust_domain,
        &cfg.data_dir,
        cfg.ca.ttl.0,
        now,
        upstream,
    )?;
    ca.tick(now)?;
    ca.publish(&store).await?;
    let revision = store.current_revision().await?;
    let (metrics, registry) = Metrics::new();

    let (stop, stop_rx) = watch::channel(false);
    let state = Arc::new(State {
        admin_ids: arc_swap::ArcSwap::from_pointee(std::collections::HashSet::new()),
        default_parent: arc_swap::ArcSwapOption::empty(),
        stopping: stop_rx.clone(),
        rotation_wake: tokio::sync::Notify::new(),
        td: cfg.trust_domain.clone(),
        server_id: crate::server_id(&cfg.trust_domain),
        x509pop_roots: load_x509pop_roots(&cfg)?,
        audit: AuditLog::new(cfg.data_dir.join("audit.log")),
        cfg,
        store,
        ca,
        feed: Feed::new(revision),
        memory: crate::memory::Memory::default(),
        applied: crate::state::Applied::new(revision),
        datastore_up: std::sync::atomic::AtomicBool::new(true),
        policies_seen: arc_swap::ArcSwapOption::empty(),
        destinations_seen: arc_swap::ArcSwapOption::empty(),
        policy_sync: crate::policy_sync::SyncStatuses::default(),
        metrics,
    });

    // Every entry and agent in memory (kept current by the follower); counted once here, the
    // admin API keeps the gauges current from then on.
    load_memory(&state).await?;
    let (entries, _) = state.memory.len();
    state
        .metrics
        .entries
        .set(i64::try_from(entries).unwrap_or(i64::MAX));

    let mut tasks = Vec::new();

    // Agent API: mTLS with the server SVID; client certificates verified against our bundle and
    // optional at the TLS layer, because node attestation happens before an agent has one.
    let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(own_bundles(&state)?));
    let (svid, mut svid_expiry) = server_svid(&state)?;
    let resolver = SvidResolver::new(svid);
    let tls = tessera_tls::server_config(
        resolver.clone(),
        Arc::new(SpiffeClientVerifier::new(bundles.clone(), false)),
        &[b"h2"],
    )
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    let listener = tokio::net::TcpListener::bind(state.cfg.bind_address)
        .await
        .map_err(io_err(format!("bind agent API {}", state.cfg.bind_address)))?;
    let agent_addr = listener
        .local_addr()
        .map_err(io_err("agent API address".into()))?;
    let incoming = crate::transport::tls_incoming(listener, Arc::new(tls));
    let agent_svc = AgentApiServer::new(AgentApi {
        state: state.clone(),
        limits: Arc::new(crate::agent_api::Limits::new(state.cfg.svid.agent_ttl.0)),
    });
    let shutdown = stopped(stop_rx.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::grpc_status::server()
            .add_service(agent_svc)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            tracing::error!(error = %e, "agent API stopped");
        }
    }));

    state.refresh_admin_ids().await?;
    // Changes other servers of the trust domain make (PostgreSQL: woken by LISTEN/NOTIFY).
    let listener = state.store.listen_revisions().await?;
    tasks.push(crate::follow::spawn(
        state.clone(),
        bundles.clone(),
        stop_rx.clone(),
        listener,
    ));
    // Admin API over mTLS, when configured: client SVIDs are mandatory, and only the SPIFFE IDs
    // of entries marked admin get through the interceptor.
    let mut admin_addr = None;
    if let Some(addr) = state.cfg.admin_bind_address {
        let tls = tessera_tls::server_config(
            resolver.clone(),
            Arc::new(SpiffeClientVerifier::new(bundles.clone(), true)),
            &[b"h2"],
        )
        .map_err(|e| ServerError::Tls(e.to_string()))?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(io_err(format!("bind admin API {addr}")))?;
        admin_addr = Some(
            listener
                .local_addr()
                .map_err(io_err("admin API address".into()))?,
        );
        let incoming = crate::transport::tls_incoming(listener, Arc::new(tls));
        let gate = state.clone();
        let admin_gate = move |req: tonic::Request<()>| {
            let peer = req
                .extensions()
                .get::<crate::transport::PeerSvid>()
                .and_then(|p| p.id.clone());
            match peer {
                Some(id) if gate.admin_ids.load().contains(&id) => Ok(req),
                Some(id) => Err(tonic::Status::permission_denied(format!(
                    "{id} is not an admin: only SVIDs of entries marked admin may use the admin API"
                ))),
                None => Err(tonic::Status::unauthenticated(
                    "an admin X509-SVID is required",
                )),
            }
        };
        let svc = AdminApiServer::with_interceptor(
            Admin {
                state: state.clone(),
            },
            admin_gate.clone(),
        );
        let fed_svc = FederationApiServer::with_interceptor(
            crate::federation::api::Federation {
                state: state.clone(),
            },
            admin_gate,
        );
        let shutdown = stopped(stop_rx.clone());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::grpc_status::server()
                .add_service(svc)
                .add_service(fed_svc)
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
            {
                tracing::error!(error = %e, "admin API (mTLS) stopped");
            }
        }));
    }

    // Admin API on the Unix socket.
    let admin_socket = state.cfg.admin_socket.clone();
    let uds = crate::transport::bind_admin_socket(&admin_socket)?;
    let admin_socket_file = crate::unix_socket::Bound::record(&admin_socket);
    let admin_svc = AdminApiServer::new(Admin {
        state: state.clone(),
    });
    // Forced CA rotation (`tessera authority ...`), on the same socket.
    let authority_svc = AuthorityApiServer::new(crate::authority::Authorities {
        state: state.clone(),
    });
    // Federation relationships and static bundles (`tessera federation|bundle ...`).
    let fed_svc = FederationApiServer::new(crate::federation::api::Federation {
        state: state.clone(),
    });
    // Authorization policies (`tessera policy ...`).
    let policy_svc =
        tessera_proto::v1::policy_api_server::PolicyApiServer::new(crate::policy_api::Policies {
            state: state.clone(),
        });
    // The destination map of transparent interception (`tessera destination ...`).
    let destination_svc = tessera_proto::v1::destination_api_server::DestinationApiServer::new(
        crate::destination_api::Destinations {
            state: state.clone(),
        },
    );
    let shutdown = stopped(stop_rx.clone());
    tasks.push(tokio::spawn(async move {
        if let Err(e) = crate::grpc_status::server()
            .add_service(admin_svc)
            .add_service(authority_svc)
            .add_service(fed_svc)
            .add_service(policy_svc)
            .add_service(destination_svc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(uds),
                shutdown,
            )
            .await
        {
            tracing::error!(error = %e, "admin API stopped");
        }
    }));

    // Federation: the bundle endpoint (when configured) and the federated bundles' refresher.
    let bundle_endpoint_addr =
        match crate::federation::endpoint::start(state.clone(), resolver.clone(), stop_rx.clone())
            .await?
        {
            Some((addr, task)) => {
                tasks.push(task);
                Some(addr)
            }
            None => None,
        };
    tasks.push(crate::federation::refresher::spawn(
        state.clone(),
        stop_rx.clone(),
    ));
    tasks.extend(crate::policy_sync::spawn(state.clone()));

    // Health and metrics.
    let ready_state = state.clone();
    let ready: tessera_telemetry::ReadyCheck = Arc::new(move || {
        let s = ready_state.clone();
        Box::pin(async move {
            // Known unreachable (the listener's session is down): say so without waiting on
            // the pool.
            let ping = if s.datastore_up() {
                s.store.ping().await
            } else {
                Err(tessera_store::StoreError::Unavailable(
                    "the listening session to the database is down".into(),
                ))
            };
            match ping {
                Ok(()) => {
                    s.metrics.datastore_up.set(1);
                    // A server whose CA cannot sign serves no SVIDs: not ready, so a load
                    // balancer or orchestrator sees it.
                    match s.ca.cannot_sign(unix_now()) {
                        Some(why) => Err(format!("not ready: {why}")),
                        None => Ok(()),
                    }
                }
                Err(e) => {
                    s.metrics.datastore_up.set(0);
                    Err(format!(
                        "degraded: the datastore is unreachable; serving agents from memory \
                         and refusing changes until it is back ({e})"
                    ))
                }
            }
        })
    });
    let (health_addr, health_task) = tessera_telemetry::serve(
        state.cfg.health_bind_address,
        tessera_telemetry::router(registry, ready),
        stopped(stop_rx.clone()),
    )
    .await
    .map_err(io_err(format!(
        "bind health endpoint {}",
        state.cfg.health_bind_address
    )))?;
    tasks.push(health_task);

    // Rotation: CA journal steps, bundle publication and the server's own SVID.
    let rot_state = state.clone();
    let mut rot_stop = stop_rx.clone();
    tasks.push(tokio::spawn(async move {
        // Consecutive failed steps: retried after 2, 4, … up to 300 s, not every second (an
        // expired upstream fails every step until its files are replaced).
        let mut failures: u32 = 0;
        loop {
            let now = unix_now();
            let svid_due = svid_expiry.saturating_sub(rot_state.cfg.svid.agent_ttl.0 / 2);
            let wait = rot_state
                .ca
                .next_tick_in(now)
                .min(svid_due.saturating_sub(now).max(1));
            let wait = if failures == 0 {
                wait
            } else {
                wait.max(2u64.saturating_pow(failures).min(300))
            };
            // A forced step (`tessera authority ...`) has already published the bundle; the
            // server then takes the new bundle as its own trust and a new SVID at once (its old
            // one may come from a CA that was just tainted).
            let forced = tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(wait)) => false,
                () = rot_state.rotation_wake.notified() => true,
                _ = rot_stop.changed() => return,
            };
            let now = unix_now();
            if forced && let Ok(set) = own_bundles(&rot_state) {
                bundles.store(Arc::new(set));
            }
            let svid_due = if forced { now } else { svid_due };
            let mut failed = false;
            match rot_state.ca.tick(now) {
                Ok(true) => match rot_state.ca.publish(&rot_state.store).await {
                    Ok(Some(rev)) => {
                        rot_state.feed.notify(rev);
                        if let Ok(set) = own_bundles(&rot_state) {
                            bundles.store(Arc::new(set));
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "cannot publish the rotated bundle"),
                },
                Ok(false) => {}
                Err(e) => {
                    failed = true;
                    tracing::error!(error = %e, "CA rotation failed");
                }
            }
            if now >= svid_due {
                match server_svid(&rot_state) {
                    Ok((ck, exp)) => {
                        resolver.swap(ck);
                        svid_expiry = exp;
                    }
                    Err(e) => {
                        failed = true;
                        tracing::error!(error = %e, "cannot renew the server SVID");
                    }
                }
            }
            failures = if failed {
                failures.saturating_add(1)
            } else {
                0
            };
        }
    }));

    let bundle_json = state.ca.trust_bundle()?.to_json();
    tracing::info!(
        trust_domain = %state.td,
        agent_api = %agent_addr,
        admin_socket = %admin_socket.display(),
        health = %health_addr,
        datastore = state.store.backend(),
        "tessera server started"
    );
    Ok(RunningServer {
        agent_addr,
        health_addr,
        admin_socket,
        admin_socket_file,
        admin_addr,
        bundle_json,
        bundle_endpoint_addr,
        stop,
        tasks,
        state,
    })
}
