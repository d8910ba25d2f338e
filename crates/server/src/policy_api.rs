//! The `PolicyApi` admin service (`tessera policy ...`): authorization policies stored in the
//! datastore as their JSON document. Each change is validated whole by `tessera-policy` (errors
//! name the policy and the field, and change nothing), audited, and becomes a revision of the
//! change feed, which pushes it to every agent's `Sync` stream.

use std::sync::Arc;

use tessera_policy::{DefaultAction, NamedPolicy};
use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_api_server::PolicyApi;
use tessera_store::Policy;
use tonic::{Request, Response, Status};

use crate::convert::{field_err, store_status};
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Policies {
    pub(crate) state: Arc<State>,
}

/// The configured `[policy] default` as it travels ("deny" | "allow").
pub(crate) fn default_str(state: &State) -> &'static str {
    match state.cfg.policy.default {
        DefaultAction::Deny => "deny",
        DefaultAction::Allow => "allow",
    }
}

fn to_pb(p: Policy) -> pb::StoredPolicy {
    pb::StoredPolicy {
        name: p.id,
        document_json: p.document,
    }
}

/// Every stored policy (the first page of a Sync snapshot). While the datastore is known to be
/// unreachable, the set last read: an agent that fails over during an outage still gets its
/// snapshot (issue 8: sync streams are served from memory then).
pub(crate) async fn all_pb(state: &State) -> Result<Vec<pb::StoredPolicy>, Status> {
    let read = state
        .store
        .list_policies()
        .await
        .map(|l| l.into_iter().map(to_pb).collect());
    crate::state::read_or_seen(state, read, &state.policies_seen)
}

/// The Sync change for a policy event: the policy as it is now, or its deletion.
pub(crate) async fn change(state: &State, name: &str) -> Result<pb::change::Change, Status> {
    Ok(
        match state.store.get_policy(name).await.map_err(store_status)? {
            Some(p) => pb::change::Change::PolicyUpdated(to_pb(p)),
            None => pb::change::Change::PolicyDeleted(name.to_owned()),
        },
    )
}

/// A policy of a set owned by a sync source is changed only there: a manual change would be
/// undone at the next poll, or worse, stand until then as if the owner had decided it.
fn refuse_synced(state: &State, name: &str) -> Result<(), Status> {
    match crate::policy_sync::owner(state, name) {
        Some(s) => Err(Status::failed_precondition(format!(
            "policy {name:?} belongs to the policy set {:?}, owned by its sync source {}: change it there",
            s.set,
            s.url
                .clone()
                .or_else(|| s.directory.as_ref().map(|d| d.display().to_string()))
                .unwrap_or_default()
        ))),
        None => Ok(()),
    }
}

/// Validates a policy and returns it with its document in canonical JSON.
fn checked(p: &pb::StoredPolicy) -> Result<Policy, Status> {
    tessera_policy::validate_name(&p.name).map_err(|e| field_err("name", e))?;
    let named = NamedPolicy::from_json(&p.name, &p.document_json)
        .and_then(|n| n.check_written().map(|()| n))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    Ok(Policy {
        id: named.name.clone(),
        document: named.to_json(),
    })
}

#[tonic::async_trait]
impl PolicyApi for Policies {
    async fn apply_policy(
        &self,
        req: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::PolicyResponse>, Status> {
        let who = crate::admin::caller(&req);
        let r = req.get_ref();
        let name = r
            .policy
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let detail = serde_json::json!({ "name": name, "create_only": r.create_only });
        let result = async {
            let p = r
                .policy
                .as_ref()
                .ok_or_else(|| field_err("policy", "missing"))?;
            let policy = checked(p)?;
            refuse_synced(&self.state, &policy.id)?;
            let store = &self.state.store;
            // create_only is decided inside the store's write: of two creates of one name, on
            // any servers, one succeeds.
            let written = if r.create_only {
                store.create_policy(&policy).await
            } else {
                store.set_policy(&policy).await
            };
            let revision = written.map_err(|e| match e {
                tessera_store::StoreError::AlreadyExists { .. } => Status::already_exists(format!(
                    "policy {:?} exists (use `tessera policy apply` to replace it)",
                    policy.id
                )),
                e => store_status(e),
            })?;
            self.state.feed.notify(revision);
            Ok(pb::PolicyResponse {
                policy: Some(to_pb(policy)),
                revision,
            })
        }
        .await;
        self.state
            .audited(&who, "apply_policy", detail, result)
            .map(Response::new)
    }

    async fn get_policy(
        &self,
        req: Request<pb::PolicyName>,
    ) -> Result<Response<pb::PolicyResponse>, Status> {
        let name = &req.get_ref().name;
        tessera_policy::validate_name(name).map_err(|e| field_err("name", e))?;
        match self
            .state
            .store
            .get_policy(name)
            .await
            .map_err(store_status)?
        {
            Some(p) => Ok(Response::new(pb::PolicyResponse {
                policy: Some(to_pb(p)),
                revision: 0,
            })),
            None => Err(Status::not_found(format!("no policy {name:?}"))),
        }
    }

    async fn list_policies(
        &self,
        _req: Request<pb::ListPoliciesRequest>,
    ) -> Result<Response<pb::ListPoliciesResponse>, Status> {
        Ok(Response::new(pb::ListPoliciesResponse {
            policies: all_pb(&self.state).await?,
            default_action: default_str(&self.state).to_owned(),
        }))
    }

    async fn get_policy_sync_status(
        &self,
        _req: Request<pb::PolicySyncStatusRequest>,
    ) -> Result<Response<pb::PolicySyncStatusResponse>, Status> {
        Ok(Response::new(pb::PolicySyncStatusResponse {
            sources: crate::policy_sync::status_pb(&self.state),
        }))
    }

    async fn delete_policy(
        &self,
        req: Request<pb::PolicyName>,
    ) -> Result<Response<pb::PolicyResponse>, Status> {
        let who = crate::admin::caller(&req);
        let name = req.get_ref().name.clone();
        let detail = serde_json::json!({ "name": name });
        let result = async {
            tessera_policy::validate_name(&name).map_err(|e| field_err("name", e))?;
            refuse_synced(&self.state, &name)?;
            let store = &self.state.store;
            let p = store.delete_policy(&name).await.map_err(store_status)?;
            let revision = store.current_revision().await.map_err(store_status)?;
            self.state.feed.notify(revision);
            Ok(pb::PolicyResponse {
                policy: Some(to_pb(p)),
                revision,
            })
        }
        .await;
        self.state
            .audited(&who, "delete_policy", detail, result)
            .map(Response::new)
    }
}
