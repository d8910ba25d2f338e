//! Node mode (issue 10): one proxy process serving every enrolled workload of a node, each
//! through its own proxy instance — the same inbound, outbound, policy and re-authorization
//! code as a sidecar (`crate::run::start`) — whose sockets all live inside the workload's
//! network namespace (`crate::sockets`). So a connection's source identity is the workload whose
//! namespace it was accepted in, with that workload's own key; never an address.
//!
//! The controller is driven by events (from the agent's delegated identity stream): attach a
//! workload (its namespace, SVID and bundles), update its SVID or its policies, detach it (its
//! listeners and connections end at once and its key is dropped).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tessera_spiffe::BundleSet;

use crate::identity::Identity;
use crate::run::{ProxyOptions, RunningProxy};
use crate::sockets::Netns;
use crate::telemetry::Telemetry;

/// An enrolled workload's X509-SVID and the bundles to verify its peers with.
#[derive(Debug)]
pub struct WorkloadSvid {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub bundles: BundleSet,
}

/// What the controller is told.
#[derive(Debug)]
pub enum WorkloadEvent {
    /// A workload was enrolled: `id` is the agent's workload ID (never reused), `name` names it
    /// in logs (its namespace name), `netns` is its network namespace.
    Attached {
        id: String,
        name: String,
        netns: OwnedFd,
        svid: WorkloadSvid,
        /// Its policies as the agent has them: in force before its listeners are bound, so a
        /// connection that reaches it first (an upgrade's new process shares the ports of the
        /// old one) is decided as the old process would, not denied while the separate
        /// [`WorkloadEvent::Policies`] is on its way. `None`: denied until that event.
        policies: Option<tessera_proto::v1::PolicySnapshot>,
    },
    /// Its SVID rotated or its bundles changed.
    Svid { id: String, svid: WorkloadSvid },
    /// The policies that apply to it changed.
    Policies {
        id: String,
        snapshot: tessera_proto::v1::PolicySnapshot,
    },
    /// The server's destination map changed (the trust domain's, one for the whole node).
    Destinations {
        snapshot: tessera_proto::v1::DestinationSnapshot,
    },
    /// It was detached (or is gone): drain it.
    Detached { id: String },
    /// The agent's stream (re)started: what it announces until [`WorkloadEvent::Synced`] is
    /// every workload it still has.
    Resync,
    /// The agent has announced every workload it has: any other workload served here was
    /// detached or lost its identity while the stream was down, and is drained.
    Synced,
}

struct Instance {
    name: String,
    identity: Arc<Identity>,
    proxy: RunningProxy,
}

/// The node proxy's workloads.
pub struct NodeProxy {
    /// What every workload's instance serves (ports, transparent mode, authorizers); its
    /// `netns` is set per workload, and its policy comes from [`WorkloadEvent::Policies`].
    template: ProxyOptions,
    /// Interception rules installed in each workload's namespace at attach, when set.
    rules: Option<crate::transparent::RuleParams>,
    telemetry: Arc<Telemetry>,
    workloads: HashMap<String, Instance>,
    /// Between [`WorkloadEvent::Resync`] and [`WorkloadEvent::Synced`]: the workloads the
    /// agent announced again.
    announced: Option<std::collections::HashSet<String>>,
    /// The server's destination map as last pushed (merged into every workload's in transparent
    /// mode, and into a new workload's before it serves).
    pushed: crate::config::DestinationMap,
    /// Ready: the agent's stream announced every workload once (each was attached, or its
    /// error logged) and this process still accepts. An upgrade's old process is stopped only
    /// once its successor is ready: before, a workload's ports may be held by the old process
    /// alone, and closing them would refuse that workload's connections.
    ready: Arc<std::sync::atomic::AtomicBool>,
    /// [`Self::stop_accepting`] was called: never ready again.
    stopped: bool,
}

impl std::fmt::Debug for NodeProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProxy")
            .field("workloads", &self.workloads.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl NodeProxy {
    pub fn new(
        mut template: ProxyOptions,
        rules: Option<crate::transparent::RuleParams>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        // Policies arrive per workload; until the first, an instance denies (fail closed).
        template.policy = None;
        template.policy_socket = None;
        // The server's destination map comes in the agent's node stream
        // ([`WorkloadEvent::Destinations`]), once for every workload.
        template.destination_socket = None;
        template.default_action = tessera_policy::DefaultAction::Deny;
        template.netns = None;
        Self {
            template,
            rules,
            telemetry,
            workloads: HashMap::new(),
            announced: None,
            pushed: crate::config::DestinationMap::default(),
            ready: Arc::default(),
            stopped: false,
        }
    }

    /// Whether this process serves every workload the agent announced (see the `ready` field),
    /// shared with a health endpoint.
    pub fn readiness(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.ready.clone()
    }

    pub fn len(&self) -> usize {
        self.workloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workloads.is_empty()
    }

    /// Closes every workload's listeners and keeps their open connections (an upgrade: the
    /// new process has bound the same ports with `SO_REUSEPORT`). Then wait for
    /// [`Telemetry::active_connections`] to reach 0, or a deadline, and drop the controller.
    pub fn stop_accepting(&mut self) {
        // A draining process is no longer ready: nothing should be sent its way.
        self.stopped = true;
        self.ready.store(false, std::sync::atomic::Ordering::SeqCst);
        for w in self.workloads.values_mut() {
            w.proxy.stop_accepting();
        }
    }

    /// The running instance of workload `id` (tests, metrics).
    pub fn instance(&self, id: &str) -> Option<&RunningProxy> {
        self.workloads.get(id).map(|i| &i.proxy)
    }

    /// Applies one event. An error concerns that workload only (it is not served).
    pub async fn apply(&mut self, event: WorkloadEvent) -> Result<(), String> {
        if let (Some(seen), WorkloadEvent::Attached { id, .. } | WorkloadEvent::Svid { id, .. }) =
            (&mut self.announced, &event)
        {
            seen.insert(id.clone());
        }
        match event {
            WorkloadEvent::Attached {
                id,
                name,
                netns,
                svid,
                policies,
            } => self.attach(id, name, netns, svid, policies).await,
            WorkloadEvent::Svid { id, svid } => {
                let w = self.get(&id)?;
                w.identity
                    .update(svid.chain, svid.key, svid.bundles)
                    .map_err(|e| format!("workload {}: {e}", w.name))
            }
            WorkloadEvent::Policies { id, snapshot } => {
                let w = self.get(&id)?;
                let own = w
                    .identity
                    .spiffe_id()
                    .ok_or_else(|| format!("workload {}: no identity", w.name))?;
                // A bad snapshot is refused whole; the last good set stays (as in a sidecar).
                let set = crate::live::compile_snapshot(&own, &snapshot)
                    .map_err(|e| format!("workload {}: policy snapshot refused: {e}", w.name))?;
                crate::live::install(&w.proxy.policy, &w.proxy.connections, set);
                Ok(())
            }
            WorkloadEvent::Destinations { snapshot } => {
                // Refused whole when a document does not parse, or when it clashes with the
                // config file's map (the same for every workload here); the map in force stays.
                let pushed = crate::destinations::pushed_map(&snapshot)
                    .and_then(|p| {
                        if let Some(t) = &self.template.transparent {
                            t.destinations.merge(&p).map_err(|e| e.to_string())?;
                        }
                        Ok(p)
                    })
                    .map_err(|e| {
                        format!("the server's destination map refused, the map in force stays: {e}")
                    })?;
                for w in self.workloads.values() {
                    if let Some(sources) = &w.proxy.destinations {
                        sources
                            .set_pushed(pushed.clone())
                            .map_err(|e| format!("workload {}: {e}", w.name))?;
                    }
                }
                self.pushed = pushed;
                Ok(())
            }
            WorkloadEvent::Resync => {
                self.announced = Some(std::collections::HashSet::new());
                Ok(())
            }
            WorkloadEvent::Synced => {
                let Some(seen) = self.announced.take() else {
                    return Ok(());
                };
                // Every announced workload went through `attach` before this event (events are
                // applied in order): its listeners are bound, or its error was logged.
                self.ready
                    .store(!self.stopped, std::sync::atomic::Ordering::SeqCst);
                // Not announced again: detached, or its last entry deleted, while the stream
                // was down (the agent sends no `detached` for what it never sent this stream).
                let gone: Vec<String> = self
                    .workloads
                    .keys()
                    .filter(|id| !seen.contains(*id))
                    .cloned()
                    .collect();
                for id in gone {
                    if let Some(w) = self.workloads.remove(&id) {
                        tracing::info!(workload = %w.name, id, "workload not announced again after the agent's stream restarted: listeners and connections closed");
                    }
                }
                Ok(())
            }
            WorkloadEvent::Detached { id } => {
                match self.workloads.remove(&id) {
                    Some(w) => {
                        tracing::info!(workload = %w.name, id, "workload detached: listeners and connections closed");
                        // Dropping the instance ends its tasks and connections; the identity's
                        // last reference (and so the workload's key) goes with it.
                        drop(w);
                    }
                    None => tracing::debug!(id, "detach of a workload not served here"),
                }
                Ok(())
            }
        }
    }

    fn get(&self, id: &str) -> Result<&Instance, String> {
        self.workloads
            .get(id)
            .ok_or_else(|| format!("workload {id} is not attached here"))
    }

    async fn attach(
        &mut self,
        id: String,
        name: String,
        netns: OwnedFd,
        svid: WorkloadSvid,
        policies: Option<tessera_proto::v1::PolicySnapshot>,
    ) -> Result<(), String> {
        if self.workloads.contains_key(&id) {
            return Err(format!(
                "workload {id} ({name}) is attached already; a re-attach is a new workload ID"
            ));
        }
        let ns = Netns::enter(netns, &name).map_err(|e| e.to_string())?;
        match ns.run(crate::sockets::enable_request_migration).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(workload = %name, error = %e, "cannot set tcp_migrate_req: connections queued at an upgrade may be reset");
            }
        }
        if let Some(rules) = self.rules {
            // Interception inside the workload's namespace, from its namespace thread (the
            // iptables process inherits that thread's namespace). The rules stay if this
            // process dies: the workload's traffic then fails closed.
            let v6 = ns
                .run(move || crate::transparent::install(&rules))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("workload {name}: {e}"))?;
            tracing::debug!(workload = %name, ipv6 = ?v6, "interception rules installed");
        }
        let identity = Identity::with_svid(svid.chain, svid.key, svid.bundles)
            .map_err(|e| format!("workload {name}: {e}"))?;
        let mut opts = self.template.clone();
        opts.netns = Some(ns);
        opts.pushed_destinations = Some(self.pushed.clone());
        opts.pushed_policy = policies;
        let proxy = crate::run::start(opts, identity.clone(), self.telemetry.clone())
            .await
            .map_err(|e| format!("workload {name}: {e}"))?;
        tracing::info!(
            workload = %name,
            id,
            spiffe_id = %identity.spiffe_id().map(|i| i.to_string()).unwrap_or_default(),
            "workload attached: serving inside its network namespace"
        );
        self.workloads.insert(
            id,
            Instance {
                name,
                identity,
                proxy,
            },
        );
        Ok(())
    }
}

// ---- the agent's delegated identity stream ----

/// Reads frames (4-byte big-endian length, JSON) and the descriptors that come with them.
struct FrameReader {
    buf: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

const MAX_FRAME: usize = 4 << 20;

impl FrameReader {
    fn next(&mut self, s: &std::os::unix::net::UnixStream) -> Result<serde_json::Value, String> {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, recvmsg};
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]])
                    as usize;
                if len > MAX_FRAME {
                    return Err(format!("a frame of {len} bytes from the agent"));
                }
                if self.buf.len() >= 4 + len {
                    let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
                    return serde_json::from_slice(&body).map_err(|e| format!("bad frame: {e}"));
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
            let mut anc = RecvAncillaryBuffer::new(&mut space);
            let r = recvmsg(
                s,
                &mut [std::io::IoSliceMut::new(&mut chunk)],
                &mut anc,
                RecvFlags::CMSG_CLOEXEC,
            )
            .map_err(|e| format!("recvmsg: {e}"))?;
            for m in anc.drain() {
                if let RecvAncillaryMessage::ScmRights(it) = m {
                    self.fds.extend(it);
                }
            }
            if r.bytes == 0 {
                return Err("the agent closed the stream".into());
            }
            self.buf.extend_from_slice(&chunk[..r.bytes]);
        }
    }
}

fn svid_of(v: &serde_json::Value) -> Result<WorkloadSvid, String> {
    use base64::Engine as _;
    let b64 = |s: &serde_json::Value| {
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap_or_default())
            .map_err(|e| format!("base64: {e}"))
    };
    // The instance serves with the first SVID (the workload's default identity).
    let first = v["svids"]
        .as_array()
        .and_then(|a| a.first())
        .ok_or("no SVID for the workload")?;
    let chain = first["chain"]
        .as_array()
        .ok_or("no chain")?
        .iter()
        .map(|c| b64(c).map(CertificateDer::from))
        .collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::Pkcs8(b64(&first["key_pkcs8"])?.into());
    let mut bundles = BundleSet::new();
    if let Some(m) = v["bundles"].as_object() {
        for (td, json) in m {
            let td = tessera_spiffe::TrustDomain::new(td).map_err(|e| e.to_string())?;
            let b = tessera_spiffe::Bundle::parse(td, json.as_str().unwrap_or_default().as_bytes())
                .map_err(|e| e.to_string())?;
            bundles.upsert(b);
        }
    }
    Ok(WorkloadSvid {
        chain,
        key,
        bundles,
    })
}

fn stored_destination(d: &serde_json::Value) -> tessera_proto::v1::StoredDestination {
    tessera_proto::v1::StoredDestination {
        name: d["name"].as_str().unwrap_or_default().to_owned(),
        document_json: d["document_json"].as_str().unwrap_or_default().to_owned(),
    }
}

/// A policy snapshot as the agent's node stream writes it.
fn policy_snapshot_of(s: &serde_json::Value) -> tessera_proto::v1::PolicySnapshot {
    tessera_proto::v1::PolicySnapshot {
        spiffe_id: s["spiffe_id"].as_str().unwrap_or_default().to_owned(),
        default_action: s["default_action"].as_str().unwrap_or_default().to_owned(),
        revision: s["revision"].as_u64().unwrap_or(0),
        policies: s["policies"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|p| tessera_proto::v1::StoredPolicy {
                        name: p["name"].as_str().unwrap_or_default().to_owned(),
                        document_json: p["document_json"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

fn event_of(
    v: &serde_json::Value,
    fds: &mut std::collections::VecDeque<OwnedFd>,
) -> Result<Option<WorkloadEvent>, String> {
    let id = v["workload"].as_str().unwrap_or_default().to_owned();
    Ok(match v["event"].as_str() {
        Some("attached") => {
            let netns = fds
                .pop_front()
                .ok_or("an attached event without its namespace")?;
            Some(WorkloadEvent::Attached {
                name: v["netns"].as_str().unwrap_or(&id).to_owned(),
                netns,
                svid: svid_of(v)?,
                // An older agent sends none: the `policies` event that follows brings them.
                policies: v["policies"]
                    .is_object()
                    .then(|| policy_snapshot_of(&v["policies"])),
                id,
            })
        }
        Some("svids") => Some(WorkloadEvent::Svid {
            svid: svid_of(v)?,
            id,
        }),
        Some("policies") if v["snapshot"].is_object() => Some(WorkloadEvent::Policies {
            snapshot: policy_snapshot_of(&v["snapshot"]),
            id,
        }),
        Some("policies") => None,
        Some("destinations") if v["snapshot"].is_object() => {
            let s = &v["snapshot"];
            Some(WorkloadEvent::Destinations {
                snapshot: tessera_proto::v1::DestinationSnapshot {
                    revision: s["revision"].as_u64().unwrap_or(0),
                    destinations: s["destinations"]
                        .as_array()
                        .map(|a| a.iter().map(stored_destination).collect())
                        .unwrap_or_default(),
                },
            })
        }
        Some("destinations") => None,
        Some("detached") => Some(WorkloadEvent::Detached { id }),
        Some("synced") => Some(WorkloadEvent::Synced),
        Some("keepalive") => None,
        other => return Err(format!("unknown event {other:?}")),
    })
}

/// Follows the agent's delegated identity stream on its admin socket, forever (reconnecting
/// with backoff), sending the events to `tx`. Runs on a thread of its own (blocking socket).
/// After a reconnect the agent sends every workload again as `attached`: the consumer treats an
/// attach of a workload it serves as an SVID update.
pub fn follow_agent(socket: std::path::PathBuf, tx: tokio::sync::mpsc::Sender<WorkloadEvent>) {
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        let r = (|| -> Result<(), String> {
            let mut s = std::os::unix::net::UnixStream::connect(&socket)
                .map_err(|e| format!("connect {}: {e}", socket.display()))?;
            let body = br#"{"op":"watch"}"#;
            let mut frame = u32::try_from(body.len())
                .unwrap_or(0)
                .to_be_bytes()
                .to_vec();
            frame.extend_from_slice(body);
            std::io::Write::write_all(&mut s, &frame).map_err(|e| e.to_string())?;
            let mut reader = FrameReader {
                buf: Vec::new(),
                fds: Default::default(),
            };
            let first = reader.next(&s)?;
            if first["ok"] != true {
                return Err(format!(
                    "the agent refused the delegated stream: {}",
                    first["error"].as_str().unwrap_or("?")
                ));
            }
            tracing::info!(socket = %socket.display(), "following the agent's delegated identity stream");
            if tx.blocking_send(WorkloadEvent::Resync).is_err() {
                return Ok(());
            }
            loop {
                let v = reader.next(&s)?;
                match event_of(&v, &mut reader.fds) {
                    Ok(Some(ev)) => {
                        if tx.blocking_send(ev).is_err() {
                            return Ok(());
                        }
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(error = %e, "ignoring a bad event from the agent"),
                }
            }
        })();
        if tx.is_closed() {
            return;
        }
        if let Err(e) = r {
            tracing::warn!(error = %e, "delegated identity stream");
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(std::time::Duration::from_secs(5));
    }
}
