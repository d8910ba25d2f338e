//! `tessera.v1.DestinationWatch` on the agent socket: a proxy in transparent mode streams the
//! destination map the server owns (which identity must answer at which address and port).
//! The map is the trust domain's, the same for every caller, but it is still served only to
//! attested callers with an identity, exactly like `PolicyWatch`: it tells who runs where.
//! Pushed from the server's Sync stream, never polled.

use tessera_proto::v1 as pb;
use tessera_proto::v1::destination_watch_server::{DestinationWatch, DestinationWatchServer};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::cache::{Destinations, Snapshot};
use crate::workload_api::WorkloadApi;

#[derive(Debug, Clone)]
pub struct DestinationWatchService {
    api: WorkloadApi,
}

impl DestinationWatchService {
    pub fn new(api: WorkloadApi) -> Self {
        Self { api }
    }

    pub fn into_service(self) -> DestinationWatchServer<Self> {
        DestinationWatchServer::new(self)
    }
}

/// What a caller with these selectors gets; `None` when it has no identity.
fn build(
    snapshot: &Snapshot,
    selectors: &std::collections::BTreeSet<tessera_spiffe::Selector>,
    d: &Destinations,
) -> Option<pb::DestinationSnapshot> {
    crate::workload_api::view::identities_for(snapshot, selectors).first()?;
    Some(pb::DestinationSnapshot {
        destinations: d
            .documents
            .iter()
            .map(|(name, doc)| pb::StoredDestination {
                name: name.clone(),
                document_json: doc.clone(),
            })
            .collect(),
        revision: d.revision,
    })
}

#[tonic::async_trait]
impl DestinationWatch for DestinationWatchService {
    type WatchDestinationsStream = ReceiverStream<Result<pb::DestinationSnapshot, Status>>;

    async fn watch_destinations(
        &self,
        req: Request<pb::WatchDestinationsRequest>,
    ) -> Result<Response<Self::WatchDestinationsStream>, Status> {
        let peer = self.api.policy_caller(&req, "WatchDestinations")?;
        let destinations = self.api.cache().subscribe_destinations();
        crate::policy_watch::stream_for_caller(&self.api, peer, destinations, build).await
    }
}
