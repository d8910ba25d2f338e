//! The `FederationApi` admin service: federation relationships and foreign bundles. Served
//! next to `AdminApi` (admin socket, and admin mTLS behind the same admin-ID gate); every change
//! is audited and goes through the datastore's revision feed.

use std::sync::Arc;

use tessera_proto::v1 as pb;
use tessera_proto::v1::federation_api_server::FederationApi;
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_store::FederationRelationship;
use tessera_store::model::{FederationStatus, PROFILE_HTTPS_SPIFFE, PROFILE_HTTPS_WEB};
use tonic::{Request, Response, Status};

use super::{fetch, refresher, rules};
use crate::convert::{self, field_err, store_status};
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Federation {
    pub(crate) state: Arc<State>,
}

fn trust_domain(field: &str, s: &str) -> Result<TrustDomain, Status> {
    TrustDomain::new(s).map_err(|e| field_err(field, e))
}

fn status_pb(s: &FederationStatus) -> pb::FederationStatus {
    pb::FederationStatus {
        last_attempt_at: s.last_attempt_at.unwrap_or(0),
        last_success_at: s.last_success_at.unwrap_or(0),
        // Bounded here too, for an error stored before the refresher bounded them.
        last_error: s
            .last_error
            .as_deref()
            .map(|e| crate::bounded_error(e).into_owned())
            .unwrap_or_default(),
        last_error_at: s.last_error_at.unwrap_or(0),
        next_refresh_at: s.next_refresh_at.unwrap_or(0),
    }
}

impl Federation {
    fn audited<T>(
        &self,
        req_who: crate::audit::Caller,
        what: &str,
        detail: serde_json::Value,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        self.state.audited(&req_who, what, detail, result)
    }

    /// A foreign trust domain: the server's own bundle belongs to its CA, never to a
    /// relationship or a hand-set bundle (that would let an operator typo replace our roots).
    fn foreign(&self, field: &str, s: &str) -> Result<TrustDomain, Status> {
        let td = trust_domain(field, s)?;
        if td == self.state.td {
            return Err(field_err(
                field,
                format!("{td} is this server's own trust domain; its bundle is managed by its CA"),
            ));
        }
        Ok(td)
    }

    /// Checks a relationship request: every profile-specific argument in its place.
    fn relationship(
        &self,
        r: &pb::FederationRelationship,
    ) -> Result<FederationRelationship, Status> {
        let td = self.foreign("trust_domain", &r.trust_domain)?;
        fetch::parse_url(&r.bundle_endpoint_url)
            .map_err(|e| field_err("bundle_endpoint_url", e))?;
        let endpoint_spiffe_id = match (r.profile.as_str(), r.endpoint_spiffe_id.is_empty()) {
            (PROFILE_HTTPS_SPIFFE, false) => Some(
                SpiffeId::parse(&r.endpoint_spiffe_id)
                    .map_err(|e| field_err("endpoint_spiffe_id", e))?,
            ),
            (PROFILE_HTTPS_SPIFFE, true) => {
                return Err(field_err(
                    "endpoint_spiffe_id",
                    "the https_spiffe profile needs the SPIFFE ID the endpoint presents (--endpoint-spiffe-id)",
                ));
            }
            (PROFILE_HTTPS_WEB, true) => None,
            (PROFILE_HTTPS_WEB, false) => {
                return Err(field_err(
                    "endpoint_spiffe_id",
                    "only the https_spiffe profile takes an endpoint SPIFFE ID; https_web endpoints are authenticated by Web PKI",
                ));
            }
            (other, _) => {
                return Err(field_err(
                    "profile",
                    format!("{other:?}: must be https_web or https_spiffe"),
                ));
            }
        };
        let ca_bundle_pem = if r.ca_bundle_pem.is_empty() {
            None
        } else {
            if r.profile != PROFILE_HTTPS_WEB {
                return Err(field_err(
                    "ca_bundle_pem",
                    "only the https_web profile takes CA certificates (--ca-bundle); https_spiffe endpoints are authenticated by the federated bundle",
                ));
            }
            fetch::parse_ca_pem(&r.ca_bundle_pem).map_err(|e| field_err("ca_bundle_pem", e))?;
            Some(r.ca_bundle_pem.clone())
        };
        let rel = FederationRelationship {
            trust_domain: td,
            bundle_endpoint_url: r.bundle_endpoint_url.clone(),
            profile: r.profile.clone(),
            endpoint_spiffe_id,
            ca_bundle_pem,
        };
        rel.validate().map_err(store_status)?;
        Ok(rel)
    }

    /// The bootstrap bundle, checked to be the relationship's trust domain's.
    fn bootstrap(
        &self,
        rel: &FederationRelationship,
        json: &[u8],
    ) -> Result<Option<Bundle>, Status> {
        if json.is_empty() {
            return Ok(None);
        }
        rules::accept_bundle(&rel.trust_domain, json, crate::ca::unix_now())
            .map(Some)
            .map_err(|e| field_err("bootstrap_bundle_json", e))
    }

    /// Stores a relationship (and its bootstrap bundle first, so that the first fetch can use
    /// it) and wakes everyone that follows the feed.
    /// Create (`create = true`) or update a relationship, audited as `federation.create` or
    /// `federation.update`.
    async fn save_audited(
        &self,
        req: Request<pb::FederationRelationship>,
        create: bool,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let who = crate::admin::caller(&req);
        let r = req.into_inner();
        let detail = serde_json::json!({ "trust_domain": r.trust_domain, "url": r.bundle_endpoint_url, "profile": r.profile });
        let result = self.save(&r, create).await;
        let action = if create {
            "federation.create"
        } else {
            "federation.update"
        };
        self.audited(who, action, detail, result).map(Response::new)
    }

    async fn save(
        &self,
        r: &pb::FederationRelationship,
        creating: bool,
    ) -> Result<pb::FederationRelationship, Status> {
        let rel = self.relationship(r)?;
        let boot = self.bootstrap(&rel, &r.bootstrap_bundle_json)?;
        let store = &self.state.store;
        let existing = store
            .get_federation_relationship(&rel.trust_domain)
            .await
            .map_err(store_status)?;
        match (creating, existing.is_some()) {
            (true, true) => {
                return Err(Status::already_exists(format!(
                    "a federation relationship with {} already exists; use `federation update`",
                    rel.trust_domain
                )));
            }
            (false, false) => {
                return Err(Status::not_found(format!(
                    "no federation relationship with {}",
                    rel.trust_domain
                )));
            }
            _ => {}
        }
        if let Some(id) = &rel.endpoint_spiffe_id
            && boot.is_none()
        {
            let etd = id.trust_domain();
            let have = etd == self.state.td
                || store
                    .get_bundle(&etd)
                    .await
                    .map_err(store_status)?
                    .is_some();
            if !have {
                return Err(field_err(
                    "bootstrap_bundle_json",
                    format!(
                        "the https_spiffe endpoint {id} is authenticated with the bundle of {etd}, and none is stored: give the bootstrap bundle (--bundle-file)"
                    ),
                ));
            }
        }
        if boot.is_some() {
            let rev = store
                .set_bundle(&rel.trust_domain, &r.bootstrap_bundle_json)
                .await
                .map_err(store_status)?;
            self.state.feed.notify(rev);
        }
        let rev = store
            .set_federation_relationship(&rel)
            .await
            .map_err(store_status)?;
        self.state.feed.notify(rev);
        self.describe(rel).await
    }

    async fn describe(
        &self,
        rel: FederationRelationship,
    ) -> Result<pb::FederationRelationship, Status> {
        let store = &self.state.store;
        let status = store
            .get_federation_status(&rel.trust_domain)
            .await
            .map_err(store_status)?
            .unwrap_or_default();
        let bundle = store
            .get_bundle(&rel.trust_domain)
            .await
            .map_err(store_status)?
            .map(|b| convert::bundle(&rel.trust_domain, &b.bundle_json));
        Ok(pb::FederationRelationship {
            trust_domain: rel.trust_domain.to_string(),
            bundle_endpoint_url: rel.bundle_endpoint_url,
            profile: rel.profile,
            endpoint_spiffe_id: rel
                .endpoint_spiffe_id
                .map(|i| i.to_string())
                .unwrap_or_default(),
            ca_bundle_pem: rel.ca_bundle_pem.unwrap_or_default(),
            bootstrap_bundle_json: Vec::new(),
            status: Some(status_pb(&status)),
            bundle,
        })
    }

    async fn get_rel(&self, td: &TrustDomain) -> Result<FederationRelationship, Status> {
        self.state
            .store
            .get_federation_relationship(td)
            .await
            .map_err(store_status)?
            .ok_or_else(|| Status::not_found(format!("no federation relationship with {td}")))
    }
}

#[tonic::async_trait]
impl FederationApi for Federation {
    async fn create_federation(
        &self,
        req: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        self.save_audited(req, true).await
    }

    async fn update_federation(
        &self,
        req: Request<pb::FederationRelationship>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        self.save_audited(req, false).await
    }

    async fn get_federation(
        &self,
        req: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let td = trust_domain("trust_domain", &req.get_ref().trust_domain)?;
        let rel = self.get_rel(&td).await?;
        Ok(Response::new(self.describe(rel).await?))
    }

    async fn list_federations(
        &self,
        _req: Request<pb::ListFederationsRequest>,
    ) -> Result<Response<pb::ListFederationsResponse>, Status> {
        let rels = self
            .state
            .store
            .list_federation_relationships()
            .await
            .map_err(store_status)?;
        let mut relationships = Vec::with_capacity(rels.len());
        for rel in rels {
            relationships.push(self.describe(rel).await?);
        }
        Ok(Response::new(pb::ListFederationsResponse { relationships }))
    }

    async fn delete_federation(
        &self,
        req: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let who = crate::admin::caller(&req);
        let detail = serde_json::json!({ "trust_domain": req.get_ref().trust_domain });
        let result = async {
            let td = trust_domain("trust_domain", &req.get_ref().trust_domain)?;
            let rel = self.get_rel(&td).await?;
            let described = self.describe(rel).await?;
            self.state
                .store
                .delete_federation_relationship(&td)
                .await
                .map_err(store_status)?;
            let rev = self
                .state
                .store
                .current_revision()
                .await
                .map_err(store_status)?;
            self.state.feed.notify(rev);
            Ok(described)
        }
        .await;
        self.audited(who, "federation.delete", detail, result)
            .map(Response::new)
    }

    async fn refresh_federation(
        &self,
        req: Request<pb::FederationRequest>,
    ) -> Result<Response<pb::FederationRelationship>, Status> {
        let td = trust_domain("trust_domain", &req.get_ref().trust_domain)?;
        let (_, outcome) = refresher::refresh_one(&self.state, &td, 0)
            .await
            .map_err(store_status)?;
        if let Err(e) = outcome {
            return Err(Status::unavailable(format!(
                "fetching the bundle of {td} failed: {e} (the last good bundle is kept)"
            )));
        }
        let rel = self.get_rel(&td).await?;
        Ok(Response::new(self.describe(rel).await?))
    }

    async fn set_bundle(
        &self,
        req: Request<pb::SetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let who = crate::admin::caller(&req);
        let detail = serde_json::json!({ "trust_domain": req.get_ref().trust_domain });
        let result = async {
            let r = req.get_ref();
            let td = self.foreign("trust_domain", &r.trust_domain)?;
            rules::accept_bundle(&td, &r.spiffe_bundle_json, crate::ca::unix_now())
                .map_err(|e| field_err("spiffe_bundle_json", e))?;
            let rev = self
                .state
                .store
                .set_bundle(&td, &r.spiffe_bundle_json)
                .await
                .map_err(store_status)?;
            self.state.feed.notify(rev);
            Ok(convert::bundle(&td, &r.spiffe_bundle_json))
        }
        .await;
        self.audited(who, "bundle.set", detail, result)
            .map(Response::new)
    }

    async fn list_bundles(
        &self,
        _req: Request<pb::ListBundlesRequest>,
    ) -> Result<Response<pb::ListBundlesResponse>, Status> {
        let bundles = self
            .state
            .store
            .list_bundles()
            .await
            .map_err(store_status)?
            .iter()
            .map(|b| convert::bundle(&b.trust_domain, &b.bundle_json))
            .collect();
        Ok(Response::new(pb::ListBundlesResponse { bundles }))
    }

    async fn delete_bundle(
        &self,
        req: Request<pb::DeleteBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        let who = crate::admin::caller(&req);
        let detail = serde_json::json!({ "trust_domain": req.get_ref().trust_domain });
        let result = async {
            let td = self.foreign("trust_domain", &req.get_ref().trust_domain)?;
            let store = &self.state.store;
            let old = store
                .get_bundle(&td)
                .await
                .map_err(store_status)?
                .ok_or_else(|| Status::not_found(format!("no bundle of {td} is stored")))?;
            store.delete_bundle(&td).await.map_err(store_status)?;
            let rev = store.current_revision().await.map_err(store_status)?;
            self.state.feed.notify(rev);
            Ok(convert::bundle(&td, &old.bundle_json))
        }
        .await;
        self.audited(who, "bundle.delete", detail, result)
            .map(Response::new)
    }
}
