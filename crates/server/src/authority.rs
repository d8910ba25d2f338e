//! The authority API (`tessera authority ...`): forced rotation of the X.509 CA and the JWT key,
//! on the admin socket next to the admin API.
//!
//! Semantics follow SPIRE's LocalAuthority API: prepare (published, not signing) → activate
//! (signs; the previous one is old) → taint (an old authority: agents replace what it signed at
//! once) → revoke (a tainted one leaves the bundle). Each step refuses to run out of order with
//! `FAILED_PRECONDITION` and a message naming the step that comes first; each success says what
//! happened and what comes next.

use std::sync::Arc;

use tessera_pki::{Authority as _, JournalEvent, Kind, Rotation, Slot};
use tessera_proto::v1 as pb;
use tessera_proto::v1::authority_api_server::AuthorityApi;
use tonic::{Request, Response, Status};

use crate::ServerError;
use crate::state::State;

#[derive(Debug, Clone)]
pub(crate) struct Authorities {
    pub(crate) state: Arc<State>,
}

fn kind_of(req: &pb::AuthorityRequest) -> Result<Option<Kind>, Status> {
    match pb::AuthorityKind::try_from(req.kind) {
        Ok(pb::AuthorityKind::X509) => Ok(Some(Kind::X509)),
        Ok(pb::AuthorityKind::Jwt) => Ok(Some(Kind::Jwt)),
        Ok(pb::AuthorityKind::X509Upstream) => Ok(None),
        _ => Err(Status::invalid_argument(
            "kind: expected X509, JWT or X509_UPSTREAM",
        )),
    }
}

fn status(e: ServerError) -> Status {
    match e {
        ServerError::Precondition(m) => Status::failed_precondition(m),
        other => Status::internal(other.to_string()),
    }
}

fn info<A: tessera_pki::Authority>(s: &Slot<A>, upstream_signed: bool) -> pb::AuthorityInfo {
    pb::AuthorityInfo {
        authority_id: s.authority.authority_id().to_owned(),
        status: s.status.to_string(),
        tainted: s.tainted,
        created_at: s.created_at,
        not_after: s.authority.not_after(),
        upstream_signed,
        slot_id: s.id,
    }
}

fn infos<A: tessera_pki::Authority>(
    r: &Rotation<A>,
    upstream_signed: impl Fn(&A) -> bool,
) -> Vec<pb::AuthorityInfo> {
    r.entries()
        .map(|s| info(s, upstream_signed(&s.authority)))
        .collect()
}

impl Authorities {
    fn state_of(&self, kind: Option<Kind>) -> pb::AuthorityState {
        let ca = &self.state.ca;
        let upstream = ca
            .upstream()
            .map(|u| u.name().to_owned())
            .unwrap_or_default();
        let (k, authorities) = match kind {
            Some(Kind::X509) => (
                pb::AuthorityKind::X509,
                ca.with_journal(|j| infos(j.x509(), |a| a.is_upstream_signed())),
            ),
            Some(Kind::Jwt) => (
                pb::AuthorityKind::Jwt,
                ca.with_journal(|j| infos(j.jwt(), |_| false)),
            ),
            None => (
                pb::AuthorityKind::X509Upstream,
                ca.upstream()
                    .map(|u| {
                        u.authority_ids()
                            .into_iter()
                            .map(|id| pb::AuthorityInfo {
                                authority_id: id,
                                status: "active".into(),
                                ..Default::default()
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
            ),
        };
        pb::AuthorityState {
            kind: k as i32,
            authorities,
            upstream,
        }
    }

    /// Runs one forced step and, after it, republishes the bundle if its keys changed (waking the
    /// sync streams), wakes the rotation task (which refreshes the server's own trust and SVID),
    /// and explains what happened.
    async fn step(
        &self,
        step: Step,
        req: &pb::AuthorityRequest,
    ) -> Result<pb::AuthorityStepResponse, Status> {
        let kind = kind_of(req)?.ok_or_else(upstream_refused)?;
        let ca = &self.state.ca;
        let (events, id) = match step {
            Step::Prepare => {
                let ev = ca.prepare(kind).map_err(status)?;
                let id = ca.with_journal(|j| match kind {
                    Kind::X509 => j
                        .x509()
                        .prepared()
                        .map(|s| s.authority.authority_id().to_owned()),
                    Kind::Jwt => j
                        .jwt()
                        .prepared()
                        .map(|s| s.authority.authority_id().to_owned()),
                });
                (ev, id.unwrap_or_default())
            }
            Step::Activate => {
                let ev = ca.activate(kind).map_err(status)?;
                let id = ca.with_journal(|j| match kind {
                    Kind::X509 => j.x509().active().authority.authority_id().to_owned(),
                    Kind::Jwt => j.jwt().active().authority.authority_id().to_owned(),
                });
                (ev, id)
            }
            Step::Taint => {
                let id = authority_id(req)?;
                (ca.taint(kind, &id).map_err(status)?, id)
            }
            Step::Revoke => {
                let id = authority_id(req)?;
                (ca.revoke(kind, &id).map_err(status)?, id)
            }
        };
        match ca.publish(&self.state.store).await {
            Ok(Some(rev)) => self.state.feed.notify(rev),
            Ok(None) => {}
            Err(e) => return Err(Status::internal(format!("cannot publish the bundle: {e}"))),
        }
        self.state.rotation_wake.notify_one();
        Ok(pb::AuthorityStepResponse {
            message: explain(&events, kind, &id),
            state: Some(self.state_of(Some(kind))),
        })
    }

    async fn audited(
        &self,
        step: Step,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStepResponse>, Status> {
        let who = crate::admin::caller(&req);
        let r = req.get_ref();
        let detail =
            serde_json::json!({"kind": r.kind().as_str_name(), "authority_id": r.authority_id});
        let result = self.step(step, r).await;
        let what = format!("authority {}", step.name());
        self.state
            .audited(&who, &what, detail, result)
            .map(Response::new)
    }
}

#[derive(Debug, Clone, Copy)]
enum Step {
    Prepare,
    Activate,
    Taint,
    Revoke,
}

impl Step {
    fn name(self) -> &'static str {
        match self {
            Self::Prepare => "prepare",
            Self::Activate => "activate",
            Self::Taint => "taint",
            Self::Revoke => "revoke",
        }
    }
}

fn explain(events: &[JournalEvent], kind: Kind, id: &str) -> String {
    let k = kind;
    let cmd = if kind == Kind::X509 { "x509" } else { "jwt" };
    match events.first() {
        Some(JournalEvent::Prepared { .. }) => format!(
            "prepared {k} authority {id}: it is in the trust bundle now (agents receive it \
             through their sync stream) but signs nothing yet; next: `tessera authority {cmd} \
             activate` once every verifier has the new bundle"
        ),
        Some(JournalEvent::Activated { .. }) => format!(
            "activated {k} authority {id}: it signs every new SVID from now on; the previous one \
             is old and stays in the bundle until it expires; next, if it may be compromised: \
             `tessera authority {cmd} taint --authority-id <old id>`"
        ),
        Some(JournalEvent::Tainted { .. }) => format!(
            "tainted {k} authority {id}: every agent is told now and replaces every SVID it \
             signed; it stays in the bundle, so nothing breaks while they do; next: \
             `tessera authority {cmd} revoke --authority-id {id}`"
        ),
        Some(JournalEvent::Revoked { .. }) => format!(
            "revoked {k} authority {id}: it left the trust bundle; every SVID it signed is now \
             refused by every verifier"
        ),
        _ => format!("{k} authority {id}: nothing changed"),
    }
}

#[tonic::async_trait]
impl AuthorityApi for Authorities {
    async fn get_authority_state(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityState>, Status> {
        let kind = kind_of(req.get_ref())?;
        Ok(Response::new(self.state_of(kind)))
    }

    async fn prepare_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStepResponse>, Status> {
        self.audited(Step::Prepare, req).await
    }

    async fn activate_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStepResponse>, Status> {
        self.audited(Step::Activate, req).await
    }

    async fn taint_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStepResponse>, Status> {
        self.audited(Step::Taint, req).await
    }

    async fn revoke_authority(
        &self,
        req: Request<pb::AuthorityRequest>,
    ) -> Result<Response<pb::AuthorityStepResponse>, Status> {
        self.audited(Step::Revoke, req).await
    }
}

fn authority_id(req: &pb::AuthorityRequest) -> Result<String, Status> {
    let id = req.authority_id.trim();
    if id.is_empty() {
        return Err(Status::invalid_argument(
            "authority_id is required: the old authority to act on (`tessera authority ... show` \
             lists them)",
        ));
    }
    Ok(id.to_owned())
}

fn upstream_refused() -> Status {
    Status::failed_precondition(
        "the upstream authority is not rotated by Tessera: its certificate and key are files \
         (`[upstream_authority.disk]`); replace them and restart the server, then run `tessera \
         authority x509 prepare` and `activate` to move to a CA signed by the new upstream key. \
         `tessera authority upstream show` lists what signs now",
    )
}
