//! `tessera.v1.PolicyWatch` on the agent socket: a proxy streams the authorization policies
//! that apply to its own identity. Callers are attested exactly like Workload API callers
//! (security header, pinned process, same attestor and entry matching, re-checked before each
//! message); a caller's identity is its default SVID's SPIFFE ID (the first matching identity,
//! the one the proxy serves with). A new message goes out whenever the policies or the caller's
//! identity change: pushed from the server's Sync stream, never polled.

use std::sync::Arc;

use tessera_policy::NamedPolicy;
use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_watch_server::{PolicyWatch, PolicyWatchServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cache::{Policies, Snapshot};
use crate::workload_api::WorkloadApi;
use crate::workload_api::error::to_status;

#[derive(Debug, Clone)]
pub struct PolicyWatchService {
    api: WorkloadApi,
}

impl PolicyWatchService {
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    pub fn into_service(self) -> PolicyWatchServer<Self> {
        PolicyWatchServer::new(self)
    }
}

/// What a caller with these identities gets; `None` when it has no identity.
pub(crate) fn build(
    snapshot: &Snapshot,
    selectors: &std::collections::BTreeSet<tessera_spiffe::Selector>,
    policies: &Policies,
) -> Option<pb::PolicySnapshot> {
    let ids = crate::workload_api::view::identities_for(snapshot, selectors);
    let own = &ids.first()?.spiffe_id;
    let local = own.trust_domain();
    let mut out = Vec::new();
    for (name, doc) in &policies.documents {
        // A document that does not parse here (a newer server's field) is skipped with a log
        // line by the proxy's compile step; the agent passes on only what applies.
        match NamedPolicy::from_json(name, doc) {
            Ok(p) if p.applies_to(own, &local, Some(selectors)) => out.push(pb::StoredPolicy {
                name: name.clone(),
                document_json: doc.clone(),
            }),
            Ok(_) => {}
            // An unparseable policy might have targeted this caller: send it, so the proxy
            // refuses the whole set (fail closed) rather than silently dropping a DENY.
            Err(_) => out.push(pb::StoredPolicy {
                name: name.clone(),
                document_json: doc.clone(),
            }),
        }
    }
    Some(pb::PolicySnapshot {
        spiffe_id: own.to_string(),
        policies: out,
        default_action: policies.default_action.clone(),
        revision: policies.revision,
    })
}

type WatchStream = ReceiverStream<Result<pb::PolicySnapshot, Status>>;

#[tonic::async_trait]
impl PolicyWatch for PolicyWatchService {
    type WatchPoliciesStream = WatchStream;

    async fn watch_policies(
        &self,
        req: Request<pb::WatchPoliciesRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        let peer = self.api.policy_caller(&req, "WatchPolicies")?;
        let policies = self.api.cache().subscribe_policies();
        stream_for_caller(&self.api, peer, policies, |snap, selectors, pol| {
            build(snap, selectors, pol)
        })
        .await
    }
}

/// A stream for an attested caller of the agent socket (`PolicyWatch`, `DestinationWatch`):
/// `build` makes a message from the agent's identities, the caller's selectors and `data`
/// (`None`: the caller has no identity, refused); a new message goes out whenever the
/// identities or `data` change and the message differs from the last one sent, after checking
/// that the caller is still the attested process (PID reuse).
pub(crate) async fn stream_for_caller<T, M>(
    api: &WorkloadApi,
    peer: tessera_workload_attest::PeerProcess,
    mut data: tokio::sync::watch::Receiver<Arc<T>>,
    build: impl Fn(&Snapshot, &std::collections::BTreeSet<tessera_spiffe::Selector>, &T) -> Option<M>
    + Send
    + 'static,
) -> Result<Response<ReceiverStream<Result<M, Status>>>, Status>
where
    T: Send + Sync + 'static,
    M: Clone + PartialEq + Send + 'static,
{
    let attestation = Arc::new(api.attest(peer).await.map_err(to_status)?);
    let mut snapshots = api.cache().subscribe();
    let mut stop = api.stop_signal();
    let first = {
        let snap = snapshots.borrow_and_update().clone();
        let d = data.borrow_and_update().clone();
        build(&snap, attestation.selectors(), &d)
    };
    let Some(first) = first else {
        return Err(Status::permission_denied(
            "no identity for this caller: this stream serves workloads with an SVID",
        ));
    };
    let (tx, rx) = mpsc::channel(1);
    let api = api.clone();
    tokio::spawn(async move {
        let mut last = first.clone();
        if tx.send(Ok(first)).await.is_err() {
            return;
        }
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = stop.wait_for(|s| *s) => return,
                r = snapshots.changed() => if r.is_err() { return },
                r = data.changed() => if r.is_err() { return },
            }
            let snap = snapshots.borrow_and_update().clone();
            let d = data.borrow_and_update().clone();
            let Some(next) = build(&snap, attestation.selectors(), &d) else {
                let _ = tx
                    .send(Err(Status::permission_denied(
                        "this caller no longer has an identity",
                    )))
                    .await;
                return;
            };
            if next == last {
                continue;
            }
            // PID reuse: the process must still be the one attested.
            if let Err(e) = api.recheck(attestation.clone()).await {
                let _ = tx.send(Err(to_status(e))).await;
                return;
            }
            last = next.clone();
            if tx.send(Ok(next)).await.is_err() {
                return;
            }
        }
    });
    Ok(Response::new(ReceiverStream::new(rx)))
}
