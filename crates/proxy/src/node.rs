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
    },
    /// Its SVID rotated or its bundles changed.
    Svid { id: String, svid: WorkloadSvid },
    /// The policies that apply to it changed.
    Policies {
        id: String,
        snapshot: tessera_proto::v1::PolicySnapshot,
    },
    /// It was detached (or is gone): drain it.
    Detached { id: String },
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
        template.default_action = tessera_policy::DefaultAction::Deny;
        template.netns = None;
        Self {
            template,
            rules,
            telemetry,
            workloads: HashMap::new(),
        }
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
        match event {
            WorkloadEvent::Attached {
                id,
                name,
                netns,
                svid,
            } => self.attach(id, name, netns, svid).await,
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
            ns.run(move || crate::transparent::install(&rules))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("workload {name}: {e}"))?;
        }
        let identity = Identity::new();
        identity
            .update(svid.chain, svid.key, svid.bundles)
            .map_err(|e| format!("workload {name}: {e}"))?;
        let mut opts = self.template.clone();
        opts.netns = Some(ns);
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
