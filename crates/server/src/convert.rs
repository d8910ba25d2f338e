//! Conversions between API messages and datastore models. Every field from a request is parsed
//! here, and a bad one becomes `InvalidArgument` naming the field.

use std::collections::BTreeSet;

use tessera_proto::v1 as pb;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};
use tessera_store::model::{Agent, Entry, NewEntry};
use tonic::Status;

pub(crate) fn field_err(field: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {e}"))
}

pub(crate) fn spiffe_id(field: &str, s: &str) -> Result<SpiffeId, Status> {
    if s.is_empty() {
        return Err(field_err(field, "is required"));
    }
    SpiffeId::parse(s).map_err(|e| field_err(field, e))
}

pub(crate) fn selectors(field: &str, items: &[String]) -> Result<BTreeSet<Selector>, Status> {
    items
        .iter()
        .map(|s| Selector::parse(s).map_err(|e| field_err(field, e)))
        .collect()
}

/// An entry from a create/update request. TTLs of 0 take the server's defaults.
pub(crate) fn new_entry(
    e: &pb::Entry,
    default_x509_ttl: u32,
    default_jwt_ttl: u32,
) -> Result<NewEntry, Status> {
    let federates_with = e
        .federates_with
        .iter()
        .map(|t| TrustDomain::new(t).map_err(|err| field_err("federates_with", err)))
        .collect::<Result<BTreeSet<_>, _>>()?;
    let entry = NewEntry {
        spiffe_id: spiffe_id("spiffe_id", &e.spiffe_id)?,
        parent_id: spiffe_id("parent_id", &e.parent_id)?,
        selectors: selectors("selectors", &e.selectors)?,
        x509_ttl_secs: if e.x509_ttl_secs == 0 {
            default_x509_ttl
        } else {
            e.x509_ttl_secs
        },
        jwt_ttl_secs: if e.jwt_ttl_secs == 0 {
            default_jwt_ttl
        } else {
            e.jwt_ttl_secs
        },
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with,
    };
    entry
        .validate()
        .map_err(|err| Status::invalid_argument(err.to_string()))?;
    Ok(entry)
}

pub(crate) fn entry(e: &Entry) -> pb::Entry {
    pb::Entry {
        id: e.id.clone(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(ToString::to_string).collect(),
        x509_ttl_secs: e.x509_ttl_secs,
        jwt_ttl_secs: e.jwt_ttl_secs,
        dns_names: e.dns_names.clone(),
        hint: e.hint.clone(),
        admin: e.admin,
        downstream: e.downstream,
        federates_with: e.federates_with.iter().map(ToString::to_string).collect(),
        created_revision: e.created_revision,
        updated_revision: e.updated_revision,
    }
}

pub(crate) fn agent(a: &Agent) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestation_type: a.attestation_type.clone(),
        selectors: a.selectors.iter().map(ToString::to_string).collect(),
        serial: a.serial.clone(),
        expires_at: a.expires_at,
        banned: a.banned,
        created_revision: a.created_revision,
        updated_revision: a.updated_revision,
    }
}

pub(crate) fn bundle(td: &TrustDomain, json: &[u8]) -> pb::Bundle {
    let sequence = tessera_spiffe::Bundle::parse(td.clone(), json)
        .ok()
        .and_then(|b| b.sequence)
        .unwrap_or(0);
    pb::Bundle {
        trust_domain: td.to_string(),
        spiffe_bundle_json: json.to_vec(),
        sequence,
    }
}

/// Maps datastore errors to gRPC codes in one place.
pub(crate) fn store_status(e: tessera_store::StoreError) -> Status {
    use tessera_store::StoreError as E;
    match e {
        E::NotFound { .. } => Status::not_found(e.to_string()),
        E::Invalid { .. } => Status::invalid_argument(e.to_string()),
        E::AlreadyExists { .. } => Status::already_exists(e.to_string()),
        E::Conflict(_) => Status::failed_precondition(e.to_string()),
        E::Banned { .. } => Status::permission_denied(e.to_string()),
        // Writes (and reads not in memory) while the database is away: say what still works.
        E::Unavailable(_) => Status::unavailable(format!(
            "{e}: this server refuses changes until its datastore is back (agents keep their \
             SVIDs and are still served from memory); retry later"
        )),
        _ => Status::internal(e.to_string()),
    }
}
