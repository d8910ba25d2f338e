//! The admin API: everything the CLI does. Served on a Unix socket of mode 0600 in a directory
//! the server owns, so reaching it is the authorization (as SPIRE's admin socket). Every change
//! is written to the audit log with the caller's peer credentials.

use std::sync::Arc;

use tessera_pki::SvidTemplate;
use tessera_proto::v1 as pb;
use tessera_proto::v1::admin_api_server::AdminApi;
use tessera_spiffe::TrustDomain;
use tessera_store::{EntryQuery, NewEntry};
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::audit::Caller;
use crate::convert::{self, field_err, store_status};
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Admin {
    pub(crate) state: Arc<State>,
}

pub(crate) fn caller<T>(req: &Request<T>) -> Caller {
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|i| i.peer_cred);
    Caller {
        uid: cred.map(|c| c.uid()),
        pid: cred.and_then(|c| c.pid()),
        spiffe_id: req
            .extensions()
            .get::<crate::transport::PeerSvid>()
            .and_then(|p| p.id.as_ref().map(ToString::to_string)),
    }
}

/// Largest page of entries returned at once.
const MAX_PAGE: u32 = 1000;

impl Admin {
    /// Records the outcome of a change in the audit log and passes it through.
    fn audited<T>(
        &self,
        who: Caller,
        what: &str,
        detail: serde_json::Value,
        result: Result<T, Status>,
    ) -> Result<T, Status> {
        self.state.audited(&who, what, detail, result)
    }

    fn notify(&self, revision: u64) {
        self.state.feed.notify(revision);
    }

    /// Wakes sync streams after a change whose revision the store did not return (deletes).
    async fn notify_current(&self) -> Result<(), Status> {
        let rev = self
            .state
            .store
            .current_revision()
            .await
            .map_err(store_status)?;
        self.notify(rev);
        Ok(())
    }

    /// Every entry of one SPIFFE ID must agree on `admin`. Admin access is decided on the
    /// caller's SPIFFE ID (an SVID does not say which entry it was signed for), so a non-admin
    /// entry with an admin's ID, parented to another node, would give that node admin SVIDs.
    /// `except`: the entry being updated.
    async fn admin_flag_agrees(
        &self,
        new: &tessera_store::model::NewEntry,
        except: Option<&str>,
    ) -> Result<(), Status> {
        // The database is away: the write that follows is refused at once, while this read
        // would wait for the pool's time-out first.
        if !self.state.datastore_up() {
            return Ok(());
        }
        let same_id = self
            .state
            .store
            .list_entries(&tessera_store::EntryQuery {
                spiffe_id: Some(new.spiffe_id.clone()),
                ..tessera_store::EntryQuery::default()
            })
            .await
            .map_err(store_status)?;
        // The entry itself (by ID when updated; by parent and selectors, which with the
        // SPIFFE ID make an entry, when created again) is not another.
        let itself = |o: &&tessera_store::model::Entry| {
            Some(o.id.as_str()) == except
                || (o.parent_id == new.parent_id && o.selectors == new.selectors)
        };
        if let Some(other) = same_id.iter().find(|o| !itself(o) && o.admin != new.admin) {
            return Err(field_err(
                "admin",
                format!(
                    "entry {} has the same SPIFFE ID with admin {}: every entry of one SPIFFE ID \
                     must agree, since admin access goes by the SVID's SPIFFE ID (a node \
                     authorized for the other entry would get the same access); to change it, \
                     delete the other entries of this ID, change this one, and create them again",
                    other.id, other.admin
                ),
            ));
        }
        Ok(())
    }

    /// The server signs and registers only IDs of its own trust domain, and never one of the
    /// names it gives its own servers and agents (`tessera_store::model::is_reserved`).
    fn own_trust_domain(&self, field: &str, id: &tessera_spiffe::SpiffeId) -> Result<(), Status> {
        if !id.is_member_of(&self.state.td) {
            return Err(field_err(
                field,
                format!("{id} is not in trust domain {}", self.state.td),
            ));
        }
        if tessera_store::model::is_reserved(id) {
            return Err(field_err(
                field,
                format!(
                    "{id} is under {}/, which is reserved for the trust domain's servers and agents",
                    tessera_store::model::RESERVED_PATH
                ),
            ));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl AdminApi for Admin {
    async fn create_entry(
        &self,
        req: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::CreateEntryResponse>, Status> {
        let who = caller(&req);
        let msg = req.into_inner();
        let detail =
            serde_json::json!({ "spiffe_id": msg.entry.as_ref().map(|e| e.spiffe_id.clone()) });
        let result = async {
            let mut e = msg.entry.ok_or_else(|| field_err("entry", "is required"))?;
            // The ID's own trust domain first: a default parent filled in below would otherwise
            // be blamed for the mismatch, a field the caller never gave.
            if let Ok(id) = tessera_spiffe::SpiffeId::parse(&e.spiffe_id) {
                self.own_trust_domain("spiffe_id", &id)?;
            }
            if e.parent_id.is_empty()
                && let Some(parent) = self.state.default_parent.load_full()
            {
                e.parent_id = parent.to_string();
            }
            if !e.id.is_empty() {
                return Err(field_err("id", "is assigned by the server; leave it empty"));
            }
            let new = convert::new_entry(
                &e,
                self.state.default_x509_ttl(),
                self.state.default_jwt_ttl(),
            )?;
            self.own_trust_domain("spiffe_id", &new.spiffe_id)?;
            self.admin_flag_agrees(&new, None).await?;
            let (entry, created) = self
                .state
                .store
                .create_entry(new.clone())
                .await
                .map_err(store_status)?;
            // The same SPIFFE ID, parent and selectors make the same entry: asking again is
            // answered with it (idempotent), but only when everything else asked is what it has
            // too. Otherwise answering "exists" would drop the TTLs, federations, DNS names or
            // flags asked for without a word; refused instead, naming them (as SPIRE refuses a
            // "similar entry").
            if !created {
                let differs = settings_that_differ(&entry.to_new(), &new);
                if !differs.is_empty() {
                    return Err(Status::already_exists(format!(
                        "entry {} has this SPIFFE ID, parent ID and selectors with other settings ({}); nothing was changed: change it with `tessera entry update --id {}`",
                        entry.id,
                        differs.join(", "),
                        entry.id
                    )));
                }
            }
            if created {
                self.state.metrics.entries.inc();
                self.notify(entry.updated_revision);
                if entry.admin {
                    self.state.refresh_admin_ids().await.map_err(store_status)?;
                }
            }
            Ok(pb::CreateEntryResponse {
                entry: Some(convert::entry(&entry)),
                created,
            })
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "entry.create",
            detail,
            result,
        )?))
    }

    async fn get_entry(
        &self,
        req: Request<pb::GetEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let id = req.into_inner().id;
        match self
            .state
            .store
            .get_entry(&id)
            .await
            .map_err(store_status)?
        {
            Some(e) => Ok(Response::new(convert::entry(&e))),
            None => Err(Status::not_found(format!("entry {id:?} not found"))),
        }
    }

    async fn list_entries(
        &self,
        req: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let r = req.into_inner();
        let limit = if r.page_size == 0 {
            MAX_PAGE
        } else {
            r.page_size.min(MAX_PAGE)
        };
        let query = EntryQuery {
            parent_id: (!r.parent_id.is_empty())
                .then(|| convert::spiffe_id("parent_id", &r.parent_id))
                .transpose()?,
            spiffe_id: (!r.spiffe_id.is_empty())
                .then(|| convert::spiffe_id("spiffe_id", &r.spiffe_id))
                .transpose()?,
            with_selectors: convert::selectors("selectors", &r.selectors)?,
            after: (!r.page_token.is_empty()).then_some(r.page_token),
            limit: Some(limit),
        };
        let entries = self
            .state
            .store
            .list_entries(&query)
            .await
            .map_err(store_status)?;
        let next_page_token = if entries.len() == limit as usize {
            entries.last().map(|e| e.id.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListEntriesResponse {
            entries: entries.iter().map(convert::entry).collect(),
            next_page_token,
        }))
    }

    async fn update_entry(
        &self,
        req: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let who = caller(&req);
        let msg = req.into_inner();
        let detail = serde_json::json!({ "id": msg.entry.as_ref().map(|e| e.id.clone()) });
        let result = async {
            let e = msg.entry.ok_or_else(|| field_err("entry", "is required"))?;
            if e.id.is_empty() {
                return Err(field_err("id", "is required"));
            }
            let new = convert::new_entry(
                &e,
                self.state.default_x509_ttl(),
                self.state.default_jwt_ttl(),
            )?;
            self.own_trust_domain("spiffe_id", &new.spiffe_id)?;
            self.admin_flag_agrees(&new, Some(&e.id)).await?;
            // An update that changes nothing writes nothing: no new revision, so no agent
            // re-syncs the entry and no SVID is signed again for it.
            if let Some(held) = self
                .state
                .store
                .get_entry(&e.id)
                .await
                .map_err(store_status)?
                && held.to_new() == new
            {
                return Ok(convert::entry(&held));
            }
            let entry = self
                .state
                .store
                .update_entry(&e.id, new)
                .await
                .map_err(store_status)?;
            self.notify(entry.updated_revision);
            // The admin flag may have been set or cleared.
            self.state.refresh_admin_ids().await.map_err(store_status)?;
            Ok(convert::entry(&entry))
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "entry.update",
            detail,
            result,
        )?))
    }

    async fn delete_entry(
        &self,
        req: Request<pb::DeleteEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let who = caller(&req);
        let id = req.into_inner().id;
        let detail = serde_json::json!({ "id": id });
        let result = async {
            let entry = self
                .state
                .store
                .delete_entry(&id)
                .await
                .map_err(store_status)?;
            self.state.metrics.entries.dec();
            if entry.admin {
                self.state.refresh_admin_ids().await.map_err(store_status)?;
            }
            self.notify_current().await?;
            Ok(convert::entry(&entry))
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "entry.delete",
            detail,
            result,
        )?))
    }

    async fn generate_join_token(
        &self,
        req: Request<pb::GenerateJoinTokenRequest>,
    ) -> Result<Response<pb::GenerateJoinTokenResponse>, Status> {
        let who = caller(&req);
        let ttl = match req.into_inner().ttl_secs {
            0 => self.state.cfg.node_attestation.join_token.default_ttl.0,
            t => u64::from(t),
        };
        let result = async {
            let token = random_token()?;
            let expires_at = i64::try_from(crate::ca::unix_now() + ttl).unwrap_or(i64::MAX);
            self.state
                .store
                .create_join_token(&tessera_store::model::JoinToken {
                    token: token.clone(),
                    expires_at,
                })
                .await
                .map_err(store_status)?;
            let agent = crate::agent_api::join_token_agent_id(&self.state.td, &token)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(pb::GenerateJoinTokenResponse {
                token,
                expires_at,
                agent_spiffe_id: agent.to_string(),
            })
        }
        .await;
        let detail = serde_json::json!({
            "ttl_secs": ttl,
            "agent_spiffe_id": result.as_ref().map(|r| r.agent_spiffe_id.clone()).unwrap_or_default(),
        });
        Ok(Response::new(self.audited(
            who,
            "token.generate",
            detail,
            result,
        )?))
    }

    async fn list_agents(
        &self,
        _req: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let agents = self
            .state
            .store
            .list_agents(&tessera_store::AgentQuery::default())
            .await
            .map_err(store_status)?;
        self.state
            .metrics
            .agents
            .set(i64::try_from(agents.len()).unwrap_or(i64::MAX));
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(convert::agent).collect(),
        }))
    }

    async fn get_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let id = convert::spiffe_id("spiffe_id", &req.into_inner().spiffe_id)?;
        match self
            .state
            .store
            .get_agent(&id)
            .await
            .map_err(store_status)?
        {
            Some(a) => Ok(Response::new(convert::agent(&a))),
            None => Err(Status::not_found(format!("agent {id} not found"))),
        }
    }

    async fn ban_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&req);
        let raw = req.into_inner().spiffe_id;
        let detail = serde_json::json!({ "spiffe_id": raw });
        let result = async {
            let id = convert::spiffe_id("spiffe_id", &raw)?;
            let agent = self
                .state
                .store
                .set_agent_banned(&id, true)
                .await
                .map_err(store_status)?;
            self.notify(agent.updated_revision);
            Ok(convert::agent(&agent))
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "agent.ban",
            detail,
            result,
        )?))
    }

    async fn evict_agent(
        &self,
        req: Request<pb::GetAgentRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let who = caller(&req);
        let raw = req.into_inner().spiffe_id;
        let detail = serde_json::json!({ "spiffe_id": raw });
        let result = async {
            let id = convert::spiffe_id("spiffe_id", &raw)?;
            let agent = self
                .state
                .store
                .delete_agent(&id)
                .await
                .map_err(store_status)?;
            self.notify_current().await?;
            Ok(convert::agent(&agent))
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "agent.evict",
            detail,
            result,
        )?))
    }

    async fn get_bundle(
        &self,
        _req: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::Bundle>, Status> {
        own_bundle(&self.state).await.map(Response::new)
    }

    async fn mint_x509_svid(
        &self,
        req: Request<pb::MintX509SvidRequest>,
    ) -> Result<Response<pb::MintX509SvidResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let detail = serde_json::json!({ "spiffe_id": r.spiffe_id, "ttl_secs": r.ttl_secs });
        let result = async {
            let id = convert::spiffe_id("spiffe_id", &r.spiffe_id)?;
            self.own_trust_domain("spiffe_id", &id)?;
            let ttl = if r.ttl_secs == 0 {
                self.state.cfg.svid.default_x509_ttl.0
            } else {
                u64::from(r.ttl_secs)
            };
            let tmpl = SvidTemplate {
                spiffe_id: id,
                dns_names: r.dns_names,
                ttl_secs: ttl,
            };
            let signed = self
                .state
                .ca
                .sign(&r.csr, &tmpl)
                .map_err(|e| field_err("csr", e))?;
            self.state.metrics.svids_signed.inc();
            Ok(pb::MintX509SvidResponse {
                svid_chain: signed.chain(),
                bundle: Some(own_bundle(&self.state).await?),
            })
        }
        .await;
        Ok(Response::new(self.audited(
            who,
            "svid.mint",
            detail,
            result,
        )?))
    }

    async fn mint_jwt_svid(
        &self,
        req: Request<pb::AdminMintJwtSvidRequest>,
    ) -> Result<Response<pb::AdminMintJwtSvidResponse>, Status> {
        let who = caller(&req);
        let r = req.into_inner();
        let detail = serde_json::json!({ "spiffe_id": r.spiffe_id, "audience": r.audience });
        let result = async {
            let id = convert::spiffe_id("spiffe_id", &r.spiffe_id)?;
            self.own_trust_domain("spiffe_id", &id)?;
            let ttl = if r.ttl_secs == 0 {
                self.state.cfg.svid.default_jwt_ttl.0
            } else {
                u64::from(r.ttl_secs)
            };
            let token = self
                .state
                .ca
                .mint_jwt(&id, &r.audience, ttl)
                .map_err(|e| field_err("audience", e))?;
            Ok(pb::AdminMintJwtSvidResponse { token })
        }
        .await;
        Ok(Response::new(
            self.audited(who, "jwt.mint", detail, result)?,
        ))
    }
}

/// The trust domain's bundle as stored (with its sequence number).
pub(crate) async fn own_bundle(state: &State) -> Result<pb::Bundle, Status> {
    let td: &TrustDomain = &state.td;
    match state.store.get_bundle(td).await.map_err(store_status)? {
        Some(b) => Ok(convert::bundle(td, &b.bundle_json)),
        None => Err(Status::unavailable("the trust bundle is not published yet")),
    }
}

/// 32 random bytes as hex: join tokens are bearer secrets, so they carry 256 bits.
fn random_token() -> Result<String, Status> {
    let mut b = [0u8; 32];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| Status::internal("no randomness available"))?;
    Ok(hex::encode(b))
}

/// The settings (beyond SPIFFE ID, parent and selectors) in which `asked` differs from `held`,
/// as "field held (asked asked)".
fn settings_that_differ(held: &NewEntry, asked: &NewEntry) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = |name: &str, differ: bool, h: String, a: String| {
        if differ {
            out.push(format!("{name} {h} (asked {a})"));
        }
    };
    let secs = |s: u32| crate::config::Secs(u64::from(s)).to_string();
    let list = |v: Vec<String>| format!("[{}]", v.join(", "));
    field(
        "x509_ttl",
        held.x509_ttl_secs != asked.x509_ttl_secs,
        secs(held.x509_ttl_secs),
        secs(asked.x509_ttl_secs),
    );
    field(
        "jwt_ttl",
        held.jwt_ttl_secs != asked.jwt_ttl_secs,
        secs(held.jwt_ttl_secs),
        secs(asked.jwt_ttl_secs),
    );
    field(
        "dns_names",
        held.dns_names != asked.dns_names,
        list(held.dns_names.clone()),
        list(asked.dns_names.clone()),
    );
    field(
        "federates_with",
        held.federates_with != asked.federates_with,
        list(
            held.federates_with
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
        list(
            asked
                .federates_with
                .iter()
                .map(ToString::to_string)
                .collect(),
        ),
    );
    field(
        "hint",
        held.hint != asked.hint,
        format!("{:?}", held.hint),
        format!("{:?}", asked.hint),
    );
    field(
        "admin",
        held.admin != asked.admin,
        held.admin.to_string(),
        asked.admin.to_string(),
    );
    field(
        "downstream",
        held.downstream != asked.downstream,
        held.downstream.to_string(),
        asked.downstream.to_string(),
    );
    out
}
