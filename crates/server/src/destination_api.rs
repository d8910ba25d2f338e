//! The `DestinationApi` admin service (`tessera destination ...`): the destination map of
//! transparent interception, owned by the server. Each destination is stored as its JSON
//! document, checked by the same code the proxies use (`tessera_policy::destination`), refused
//! when it would make an address and port ambiguous, audited, and pushed to every agent's
//! `Sync` stream as a revision of the change feed.

use std::sync::Arc;

use tessera_policy::destination::{DestinationDoc, DestinationMap};
use tessera_proto::v1 as pb;
use tessera_proto::v1::destination_api_server::DestinationApi;
use tessera_store::Destination;
use tonic::{Request, Response, Status};

use crate::convert::{field_err, store_status};
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Destinations {
    pub(crate) state: Arc<State>,
}

fn to_pb(d: Destination) -> pb::StoredDestination {
    pb::StoredDestination {
        name: d.id,
        document_json: d.document,
    }
}

/// Every stored destination (the first page of a Sync snapshot). While the datastore is known
/// to be unreachable, the map last read, as for policies (`policy_api::all_pb`).
pub(crate) async fn all_pb(state: &State) -> Result<Vec<pb::StoredDestination>, Status> {
    let read = state
        .store
        .list_destinations()
        .await
        .map(|l| l.into_iter().map(to_pb).collect());
    crate::state::read_or_seen(state, read, &state.destinations_seen)
}

/// The Sync change for a destination event: the destination as it is now, or its deletion.
pub(crate) async fn change(state: &State, name: &str) -> Result<pb::change::Change, Status> {
    Ok(
        match state
            .store
            .get_destination(name)
            .await
            .map_err(store_status)?
        {
            Some(d) => pb::change::Change::DestinationUpdated(to_pb(d)),
            None => pb::change::Change::DestinationDeleted(name.to_owned()),
        },
    )
}

fn check_name(name: &str) -> Result<(), Status> {
    tessera_policy::destination::validate_name(name).map_err(|e| field_err("name", e.message))
}

/// Validates a destination and returns it with its document in canonical JSON.
fn checked(
    d: &pb::StoredDestination,
) -> Result<(Destination, tessera_policy::destination::Destination), Status> {
    check_name(&d.name)?;
    let dest = DestinationDoc::from_json(&d.document_json).map_err(|e| {
        Status::invalid_argument(format!(
            "destination {:?}: {}: {}",
            d.name, e.field, e.message
        ))
    })?;
    Ok((
        Destination {
            id: d.name.clone(),
            document: dest.to_json(),
        },
        dest,
    ))
}

/// Refuses `new` when, with the `others` stored, some address and port would have two expected
/// identities: which one a proxy expects must not depend on the order it learns them (every
/// proxy also refuses such a map, keeping its last good one). Asked by the store inside the
/// write transaction, so two servers applying at once cannot both pass it.
fn refuse_ambiguous(
    name: &str,
    new: &tessera_policy::destination::Destination,
    others: &[Destination],
) -> Result<(), String> {
    let others = others.iter().filter_map(|d| {
        // A stored document that no longer parses (written by a newer server) cannot be
        // compared; proxies refuse it too, which the operator sees in their logs.
        DestinationDoc::from_json(&d.document)
            .ok()
            .map(|p| (format!("destination {:?}", d.id), p))
    });
    DestinationMap::build(others.chain([(format!("destination {name:?}"), new.clone())]))
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tonic::async_trait]
impl DestinationApi for Destinations {
    async fn apply_destination(
        &self,
        req: Request<pb::ApplyDestinationRequest>,
    ) -> Result<Response<pb::DestinationResponse>, Status> {
        let who = crate::admin::caller(&req);
        let r = req.get_ref();
        let name = r
            .destination
            .as_ref()
            .map(|d| d.name.clone())
            .unwrap_or_default();
        let detail = serde_json::json!({ "name": name, "create_only": r.create_only });
        let result = async {
            let d = r
                .destination
                .as_ref()
                .ok_or_else(|| field_err("destination", "missing"))?;
            let (stored, parsed) = checked(d)?;
            // Both checks, create_only's and the map's, run in the store's write transaction.
            let revision = self
                .state
                .store
                .set_destination(&stored, r.create_only, &|others| {
                    refuse_ambiguous(&stored.id, &parsed, others)
                })
                .await
                .map_err(|e| match e {
                    tessera_store::StoreError::AlreadyExists { .. } => {
                        Status::already_exists(format!(
                            "destination {:?} exists (use `tessera destination apply` to replace it)",
                            stored.id
                        ))
                    }
                    tessera_store::StoreError::Conflict(why) => Status::failed_precondition(why),
                    e => store_status(e),
                })?;
            self.state.feed.notify(revision);
            Ok(pb::DestinationResponse {
                destination: Some(to_pb(stored)),
                revision,
            })
        }
        .await;
        self.state
            .audited(&who, "apply_destination", detail, result)
            .map(Response::new)
    }

    async fn get_destination(
        &self,
        req: Request<pb::DestinationName>,
    ) -> Result<Response<pb::DestinationResponse>, Status> {
        let name = &req.get_ref().name;
        check_name(name)?;
        match self
            .state
            .store
            .get_destination(name)
            .await
            .map_err(store_status)?
        {
            Some(d) => Ok(Response::new(pb::DestinationResponse {
                destination: Some(to_pb(d)),
                revision: 0,
            })),
            None => Err(Status::not_found(format!("no destination {name:?}"))),
        }
    }

    async fn list_destinations(
        &self,
        _req: Request<pb::ListDestinationsRequest>,
    ) -> Result<Response<pb::ListDestinationsResponse>, Status> {
        Ok(Response::new(pb::ListDestinationsResponse {
            destinations: all_pb(&self.state).await?,
        }))
    }

    async fn delete_destination(
        &self,
        req: Request<pb::DestinationName>,
    ) -> Result<Response<pb::DestinationResponse>, Status> {
        let who = crate::admin::caller(&req);
        let name = req.get_ref().name.clone();
        let detail = serde_json::json!({ "name": name });
        let result = async {
            check_name(&name)?;
            let store = &self.state.store;
            let d = store
                .delete_destination(&name)
                .await
                .map_err(store_status)?;
            let revision = store.current_revision().await.map_err(store_status)?;
            self.state.feed.notify(revision);
            Ok(pb::DestinationResponse {
                destination: Some(to_pb(d)),
                revision,
            })
        }
        .await;
        self.state
            .audited(&who, "delete_destination", detail, result)
            .map(Response::new)
    }
}
