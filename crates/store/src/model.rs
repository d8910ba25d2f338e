//! What the datastore keeps, and the validation of everything that goes in.
//!
//! Validation lives with the types so that every backend refuses the same inputs with the same
//! message, before a transaction starts: an invalid write changes nothing, not even the revision.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use tessera_spiffe::{Bundle, Selector, SpiffeId, TrustDomain};

use crate::StoreError;

/// Most selectors one entry or one query may carry; bounds what a request can make us store.
pub const MAX_SELECTORS: usize = 64;
/// Most DNS names one entry may carry.
pub const MAX_DNS_NAMES: usize = 64;
/// Longest entry hint, in bytes.
pub const MAX_HINT_LEN: usize = 1024;
/// Longest join token, in bytes.
pub const MAX_JOIN_TOKEN_LEN: usize = 256;
/// Most entries one `create_entries` call may carry: a batch holds the writers' lock while it
/// runs.
pub const MAX_BATCH: usize = 10_000;
/// Longest policy document, in bytes.
pub const MAX_POLICY_LEN: usize = 1 << 20;

/// A registration entry as stored: what [`NewEntry`] describes, plus its id and revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Stable random id, 32 lowercase hex characters, assigned at creation.
    pub id: String,
    pub spiffe_id: SpiffeId,
    pub parent_id: SpiffeId,
    pub selectors: BTreeSet<Selector>,
    pub x509_ttl_secs: u32,
    pub jwt_ttl_secs: u32,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub admin: bool,
    pub downstream: bool,
    pub federates_with: BTreeSet<TrustDomain>,
    /// Revision of the write that created the entry.
    pub created_revision: u64,
    /// Revision of the last write that changed it (equal to `created_revision` until updated).
    pub updated_revision: u64,
}

impl Entry {
    /// The entry's content without id and revisions, e.g. to change one field and update.
    pub fn to_new(&self) -> NewEntry {
        NewEntry {
            spiffe_id: self.spiffe_id.clone(),
            parent_id: self.parent_id.clone(),
            selectors: self.selectors.clone(),
            x509_ttl_secs: self.x509_ttl_secs,
            jwt_ttl_secs: self.jwt_ttl_secs,
            dns_names: self.dns_names.clone(),
            hint: self.hint.clone(),
            admin: self.admin,
            downstream: self.downstream,
            federates_with: self.federates_with.clone(),
        }
    }
}

/// A registration entry to create or to replace an existing one with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewEntry {
    pub spiffe_id: SpiffeId,
    /// An agent's ID (or a node alias) whose workloads may get this identity.
    pub parent_id: SpiffeId,
    /// All must match the caller (a subset match); at least one.
    pub selectors: BTreeSet<Selector>,
    pub x509_ttl_secs: u32,
    pub jwt_ttl_secs: u32,
    pub dns_names: Vec<String>,
    pub hint: String,
    pub admin: bool,
    pub downstream: bool,
    pub federates_with: BTreeSet<TrustDomain>,
}

impl NewEntry {
    /// An entry with the defaults of the architecture (X.509-SVID 1 h, JWT-SVID 5 min) and
    /// nothing optional set.
    pub fn new(
        spiffe_id: SpiffeId,
        parent_id: SpiffeId,
        selectors: impl IntoIterator<Item = Selector>,
    ) -> Self {
        Self {
            spiffe_id,
            parent_id,
            selectors: selectors.into_iter().collect(),
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            dns_names: Vec::new(),
            hint: String::new(),
            admin: false,
            downstream: false,
            federates_with: BTreeSet::new(),
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.spiffe_id.is_root() {
            return Err(StoreError::invalid(
                "spiffe_id",
                format!(
                    "{} has no path: a trust domain's own ID names no workload",
                    self.spiffe_id
                ),
            ));
        }
        if is_reserved(&self.spiffe_id) {
            return Err(StoreError::invalid(
                "spiffe_id",
                format!(
                    "{} is under {RESERVED_PATH}/, which is reserved for the trust domain's servers and agents",
                    self.spiffe_id
                ),
            ));
        }
        let td = self.spiffe_id.trust_domain();
        if !self.parent_id.is_member_of(&td) {
            return Err(StoreError::invalid(
                "parent_id",
                format!("{} is not in the entry's trust domain {td}", self.parent_id),
            ));
        }
        validate_selectors("selectors", &self.selectors)?;
        if self.x509_ttl_secs == 0 {
            return Err(StoreError::invalid("x509_ttl_secs", "must be at least 1"));
        }
        if self.jwt_ttl_secs == 0 {
            return Err(StoreError::invalid("jwt_ttl_secs", "must be at least 1"));
        }
        if self.dns_names.len() > MAX_DNS_NAMES {
            return Err(StoreError::invalid(
                "dns_names",
                format!("at most {MAX_DNS_NAMES} names are allowed"),
            ));
        }
        for (i, name) in self.dns_names.iter().enumerate() {
            validate_dns_name(name)
                .map_err(|reason| StoreError::invalid(format!("dns_names[{i}]"), reason))?;
            if self.dns_names[..i].contains(name) {
                return Err(StoreError::invalid(
                    format!("dns_names[{i}]"),
                    format!("{name:?} is listed twice"),
                ));
            }
        }
        if self.hint.len() > MAX_HINT_LEN {
            return Err(StoreError::invalid(
                "hint",
                format!(
                    "is {} bytes; at most {MAX_HINT_LEN} are allowed",
                    self.hint.len()
                ),
            ));
        }
        if self.hint.chars().any(char::is_control) {
            return Err(StoreError::invalid(
                "hint",
                "must not contain control characters",
            ));
        }
        if self.federates_with.contains(&td) {
            return Err(StoreError::invalid(
                "federates_with",
                format!("{td} is the entry's own trust domain, not a federated one"),
            ));
        }
        Ok(())
    }
}

/// The path under which Tessera names its own components: `spiffe://<td>/tessera/server` and
/// `spiffe://<td>/tessera/agent/<method>/<id>`.
pub const RESERVED_PATH: &str = "/tessera";

/// Whether `id` is in the reserved namespace ([`RESERVED_PATH`]), which no registration entry
/// and no minted SVID may use. Agents trust the server by exactly its ID and the server
/// authorizes agents by theirs, so an entry for `/tessera/server` would hand a workload the
/// server's identity, and a node alias named like an agent would make other agents its
/// parents. SPIRE reserves `/spire/` the same way.
pub fn is_reserved(id: &SpiffeId) -> bool {
    let path = id.path();
    path == RESERVED_PATH
        || path
            .strip_prefix(RESERVED_PATH)
            .is_some_and(|rest| rest.starts_with('/'))
}

pub(crate) fn validate_selectors(
    field: &str,
    selectors: &BTreeSet<Selector>,
) -> Result<(), StoreError> {
    if selectors.is_empty() {
        // The empty set is a subset of every caller's selectors (selector::matches).
        return Err(StoreError::invalid(
            field,
            "at least one selector is required (an empty set would match every caller)",
        ));
    }
    if selectors.len() > MAX_SELECTORS {
        return Err(StoreError::invalid(
            field,
            format!("at most {MAX_SELECTORS} selectors are allowed"),
        ));
    }
    Ok(())
}

/// RFC 1035 §2.3.1 host names as RFC 5280 dNSName SANs carry them (ASCII, labels of letters,
/// digits and inner hyphens, at most 63 bytes each, 253 in all), with an optional leading `*.`
/// wildcard label (RFC 6125 §6.4.3, which TLS clients accept only there).
fn validate_dns_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 253 {
        return Err(format!(
            "{name:?} is {} bytes; at most 253 are allowed",
            name.len()
        ));
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(format!("{name:?} has an empty label"));
        }
        if label.len() > 63 {
            return Err(format!("{name:?} has a label over 63 bytes"));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            return Err(format!(
                "{name:?} has {c:?}: only letters, digits, `-` and a leading `*.` are allowed"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("{name:?} has a label starting or ending with `-`"));
        }
    }
    Ok(())
}

/// An attested agent (node).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agent {
    pub spiffe_id: SpiffeId,
    /// The node attestor that admitted it (`join_token`, `x509pop`).
    pub attestation_type: String,
    /// Selectors the attestor found for the node; node-alias entries match on them.
    pub selectors: BTreeSet<Selector>,
    /// Hex serial number of the agent's current SVID: renewal must present this one.
    pub serial: String,
    /// Expiry of that SVID, Unix seconds.
    pub expires_at: i64,
    pub banned: bool,
    pub created_revision: u64,
    pub updated_revision: u64,
}

/// What node attestation establishes about an agent; stored by
/// [`Datastore::create_or_replace_agent`](crate::Datastore::create_or_replace_agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewAgent {
    pub spiffe_id: SpiffeId,
    pub attestation_type: String,
    pub selectors: BTreeSet<Selector>,
    pub serial: String,
    pub expires_at: i64,
}

impl NewAgent {
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.spiffe_id.is_root() {
            return Err(StoreError::invalid(
                "spiffe_id",
                format!(
                    "{} has no path: a trust domain's own ID is not an agent",
                    self.spiffe_id
                ),
            ));
        }
        let t = &self.attestation_type;
        let ok = t.len() <= 64
            && t.chars().next().is_some_and(|c| c.is_ascii_lowercase())
            && t.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !ok {
            return Err(StoreError::invalid(
                "attestation_type",
                format!(
                    "{t:?}: 1 to 64 lowercase letters, digits, `_` or `-`, starting with a letter"
                ),
            ));
        }
        if self.selectors.len() > MAX_SELECTORS {
            return Err(StoreError::invalid(
                "selectors",
                format!("at most {MAX_SELECTORS} selectors are allowed"),
            ));
        }
        validate_serial(&self.serial)
    }
}

pub(crate) fn validate_serial(serial: &str) -> Result<(), StoreError> {
    // RFC 5280 §4.1.2.2: serials are at most 20 octets.
    if serial.is_empty() || serial.len() > 40 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(StoreError::invalid(
            "serial",
            format!("{serial:?}: must be 1 to 40 hex digits (a certificate serial number)"),
        ));
    }
    Ok(())
}

/// A single-use node attestation token. Stored only as its SHA-256 hash, so a copy of the
/// database does not hand out node identities.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinToken {
    pub token: String,
    /// Unix seconds; the token is usable while `now < expires_at`.
    pub expires_at: i64,
}

impl fmt::Debug for JoinToken {
    // The token is a credential: keep it out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

impl JoinToken {
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_token(&self.token)
    }
}

pub(crate) fn validate_token(token: &str) -> Result<(), StoreError> {
    if token.is_empty() || token.len() > MAX_JOIN_TOKEN_LEN {
        return Err(StoreError::invalid(
            "token",
            format!("must be 1 to {MAX_JOIN_TOKEN_LEN} bytes"),
        ));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(StoreError::invalid(
            "token",
            "must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

/// A trust bundle as stored: the SPIFFE bundle JSON (JWKS) of one trust domain, ours or a
/// federated one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredBundle {
    pub trust_domain: TrustDomain,
    pub bundle_json: Vec<u8>,
    pub updated_revision: u64,
}

pub(crate) fn validate_bundle(td: &TrustDomain, json: &[u8]) -> Result<(), StoreError> {
    Bundle::parse(td.clone(), json)
        .map(|_| ())
        .map_err(|e| StoreError::invalid("bundle", e.to_string()))
}

/// How we fetch a federated trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationRelationship {
    pub trust_domain: TrustDomain,
    /// `https://` URL of its bundle endpoint.
    pub bundle_endpoint_url: String,
    /// `https_web` (Web PKI) or `https_spiffe` (the endpoint presents an SVID).
    pub profile: String,
    /// The SVID the endpoint must present; required for `https_spiffe`, absent for `https_web`.
    pub endpoint_spiffe_id: Option<SpiffeId>,
    /// `https_web` only: PEM CA certificates that authenticate the endpoint (a private CA);
    /// `None`: the Mozilla root store.
    pub ca_bundle_pem: Option<String>,
}

/// Longest `ca_bundle_pem`, in bytes.
pub const MAX_CA_BUNDLE_PEM_LEN: usize = 1 << 20;
/// Longest fetch error kept in a [`FederationStatus`], in bytes.
pub const MAX_FETCH_ERROR_LEN: usize = 4096;

/// How fetching a federated bundle went, as the refresher last recorded it. Written without a
/// revision (nobody follows it), kept with the relationship and gone when it is deleted.
/// Times are Unix seconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FederationStatus {
    pub last_attempt_at: Option<i64>,
    pub last_success_at: Option<i64>,
    /// The last failure; kept after a later success, so that `last_error_at` against
    /// `last_success_at` tells which came last.
    pub last_error: Option<String>,
    pub last_error_at: Option<i64>,
    pub next_refresh_at: Option<i64>,
}

/// The bundle endpoint profiles of SPIFFE Trust Domain and Bundle §5.2.
pub const PROFILE_HTTPS_WEB: &str = "https_web";
pub const PROFILE_HTTPS_SPIFFE: &str = "https_spiffe";

impl FederationRelationship {
    pub fn validate(&self) -> Result<(), StoreError> {
        if let Some(pem) = &self.ca_bundle_pem {
            if self.profile != PROFILE_HTTPS_WEB {
                return Err(StoreError::invalid(
                    "ca_bundle_pem",
                    "only the https_web profile takes CA certificates; https_spiffe endpoints are authenticated by the federated bundle",
                ));
            }
            if pem.len() > MAX_CA_BUNDLE_PEM_LEN || !pem.contains("-----BEGIN CERTIFICATE-----") {
                return Err(StoreError::invalid(
                    "ca_bundle_pem",
                    format!(
                        "must be PEM with at least one CERTIFICATE, at most {MAX_CA_BUNDLE_PEM_LEN} bytes"
                    ),
                ));
            }
        }
        let url = &self.bundle_endpoint_url;
        let host = url.strip_prefix("https://").unwrap_or("");
        if host.is_empty()
            || url.len() > 2048
            || url.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(StoreError::invalid(
                "bundle_endpoint_url",
                format!("{url:?}: must be an https:// URL of at most 2048 bytes"),
            ));
        }
        match (self.profile.as_str(), &self.endpoint_spiffe_id) {
            (PROFILE_HTTPS_WEB, None) | (PROFILE_HTTPS_SPIFFE, Some(_)) => Ok(()),
            (PROFILE_HTTPS_WEB, Some(_)) => Err(StoreError::invalid(
                "endpoint_spiffe_id",
                "only the https_spiffe profile names the endpoint's SPIFFE ID",
            )),
            (PROFILE_HTTPS_SPIFFE, None) => Err(StoreError::invalid(
                "endpoint_spiffe_id",
                "the https_spiffe profile needs the SPIFFE ID the endpoint presents",
            )),
            (other, _) => Err(StoreError::invalid(
                "profile",
                format!("{other:?}: must be {PROFILE_HTTPS_WEB} or {PROFILE_HTTPS_SPIFFE}"),
            )),
        }
    }
}

/// An authorization policy, kept as its JSON document (the policy crate owns its meaning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub id: String,
    pub document: String,
}

impl Policy {
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_document(&self.id, &self.document, MAX_POLICY_LEN)
    }
}

/// A destination of the transparent mode's destination map, kept as its JSON document (the
/// policy crate's `destination` module owns its meaning).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Destination {
    pub id: String,
    pub document: String,
}

/// Longest destination document, in bytes.
pub const MAX_DESTINATION_LEN: usize = 64 * 1024;

impl Destination {
    pub fn validate(&self) -> Result<(), StoreError> {
        validate_document(&self.id, &self.document, MAX_DESTINATION_LEN)
    }
}

/// A named JSON document (a policy, a destination): the name's characters, the size, and
/// that it is JSON. Its meaning is checked by whoever writes it (the server's APIs).
fn validate_document(id: &str, document: &str, max: usize) -> Result<(), StoreError> {
    validate_policy_id(id)?;
    if document.len() > max {
        return Err(StoreError::invalid(
            "document",
            format!("at most {max} bytes are allowed"),
        ));
    }
    serde_json::from_str::<serde::de::IgnoredAny>(document)
        .map(|_| ())
        .map_err(|e| StoreError::invalid("document", format!("not JSON: {e}")))
}

pub(crate) fn validate_policy_id(id: &str) -> Result<(), StoreError> {
    let ok = !id.is_empty()
        && id.len() <= 256
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::invalid(
            "id",
            format!("{id:?}: 1 to 256 letters, digits, `.`, `_`, `-` or `/`"),
        ))
    }
}

pub(crate) fn validate_server_id(id: &str) -> Result<(), StoreError> {
    if id.is_empty() || id.len() > 256 || id.chars().any(char::is_control) {
        return Err(StoreError::invalid(
            "server_id",
            "must be 1 to 256 bytes without control characters",
        ));
    }
    Ok(())
}

/// One change, as the revision feed reports it. `key` says which object changed: an entry's
/// id, an agent's SPIFFE ID, a trust domain, a policy or destination id, or a join token's SHA-256
/// (hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub revision: u64,
    pub kind: EventKind,
    pub key: String,
}

/// What changed. Readers fetch the object by key to learn its new state (or its absence).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    EntryCreated,
    EntryUpdated,
    EntryDeleted,
    AgentCreated,
    AgentUpdated,
    AgentBanned,
    AgentUnbanned,
    /// Evicted: the agent must attest again.
    AgentDeleted,
    JoinTokenCreated,
    JoinTokenConsumed,
    BundleUpdated,
    BundleDeleted,
    FederationUpdated,
    FederationDeleted,
    PolicyUpdated,
    PolicyDeleted,
    DestinationUpdated,
    DestinationDeleted,
}

impl EventKind {
    const ALL: [EventKind; 18] = [
        Self::EntryCreated,
        Self::EntryUpdated,
        Self::EntryDeleted,
        Self::AgentCreated,
        Self::AgentUpdated,
        Self::AgentBanned,
        Self::AgentUnbanned,
        Self::AgentDeleted,
        Self::JoinTokenCreated,
        Self::JoinTokenConsumed,
        Self::BundleUpdated,
        Self::BundleDeleted,
        Self::FederationUpdated,
        Self::FederationDeleted,
        Self::PolicyUpdated,
        Self::PolicyDeleted,
        Self::DestinationUpdated,
        Self::DestinationDeleted,
    ];

    /// The name stored in the `events.kind` column (and used by serde).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EntryCreated => "entry_created",
            Self::EntryUpdated => "entry_updated",
            Self::EntryDeleted => "entry_deleted",
            Self::AgentCreated => "agent_created",
            Self::AgentUpdated => "agent_updated",
            Self::AgentBanned => "agent_banned",
            Self::AgentUnbanned => "agent_unbanned",
            Self::AgentDeleted => "agent_deleted",
            Self::JoinTokenCreated => "join_token_created",
            Self::JoinTokenConsumed => "join_token_consumed",
            Self::BundleUpdated => "bundle_updated",
            Self::BundleDeleted => "bundle_deleted",
            Self::FederationUpdated => "federation_updated",
            Self::FederationDeleted => "federation_deleted",
            Self::PolicyUpdated => "policy_updated",
            Self::PolicyDeleted => "policy_deleted",
            Self::DestinationUpdated => "destination_updated",
            Self::DestinationDeleted => "destination_deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn entry() -> NewEntry {
        NewEntry::new(
            id("spiffe://example.org/web"),
            id("spiffe://example.org/tessera/agent/join_token/n1"),
            [Selector::parse("unix:uid:1000").unwrap()],
        )
    }

    #[test]
    fn invalid_entries_name_the_field() {
        type Mutate = fn(&mut NewEntry);
        let cases: &[(Mutate, &str, &str)] = &[
            (
                |e| e.selectors.clear(),
                "selectors",
                "an empty set would match every caller",
            ),
            (
                |e| e.spiffe_id = id("spiffe://example.org"),
                "spiffe_id",
                "no path",
            ),
            (
                |e| e.parent_id = id("spiffe://other.org/agent"),
                "parent_id",
                "trust domain",
            ),
            (
                |e| e.spiffe_id = id("spiffe://example.org/tessera/server"),
                "spiffe_id",
                "reserved",
            ),
            (
                |e| e.spiffe_id = id("spiffe://example.org/tessera/agent/x509pop/abc"),
                "spiffe_id",
                "reserved",
            ),
            (
                |e| e.spiffe_id = id("spiffe://example.org/tessera"),
                "spiffe_id",
                "reserved",
            ),
            (|e| e.x509_ttl_secs = 0, "x509_ttl_secs", "at least 1"),
            (|e| e.jwt_ttl_secs = 0, "jwt_ttl_secs", "at least 1"),
            (
                |e| e.dns_names = vec!["ok.example".into(), "bad_name".into()],
                "dns_names[1]",
                "'_'",
            ),
            (|e| e.dns_names = vec!["".into()], "dns_names[0]", "empty"),
            (
                |e| e.dns_names = vec!["a..b".into()],
                "dns_names[0]",
                "empty label",
            ),
            (|e| e.dns_names = vec!["-a.b".into()], "dns_names[0]", "`-`"),
            (
                |e| e.dns_names = vec![format!("{}.x", "a".repeat(64))],
                "dns_names[0]",
                "63",
            ),
            (
                |e| e.dns_names = vec!["a.b".into(), "a.b".into()],
                "dns_names[1]",
                "twice",
            ),
            (
                |e| e.dns_names = vec!["a.*.b".into()],
                "dns_names[0]",
                "'*'",
            ),
            (
                |e| e.hint = "h".repeat(MAX_HINT_LEN + 1),
                "hint",
                "at most 1024",
            ),
            (|e| e.hint = "a\nb".into(), "hint", "control"),
            (
                |e| {
                    e.federates_with
                        .insert(TrustDomain::new("example.org").unwrap());
                },
                "federates_with",
                "own trust domain",
            ),
        ];
        for (mutate, field, reason) in cases {
            let mut e = entry();
            mutate(&mut e);
            match e.validate() {
                Err(StoreError::Invalid {
                    field: f,
                    reason: r,
                }) => {
                    assert_eq!(&f, field, "{r}");
                    assert!(r.contains(reason), "{field}: {r:?} lacks {reason:?}");
                }
                other => panic!("{field}: expected Invalid, got {other:?}"),
            }
        }
        let mut ok = entry();
        ok.dns_names = vec!["*.web.example.org".into(), "web-1.example.org".into()];
        ok.hint = "h".repeat(MAX_HINT_LEN);
        ok.federates_with
            .insert(TrustDomain::new("partner.org").unwrap());
        ok.validate().unwrap();
    }

    #[test]
    fn join_token_debug_hides_the_token() {
        let t = JoinToken {
            token: "s3cret".into(),
            expires_at: 1,
        };
        assert!(!format!("{t:?}").contains("s3cret"));
    }

    #[test]
    fn event_kinds_round_trip_through_their_stored_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert_eq!(EventKind::parse("nope"), None);
    }

    #[test]
    fn federation_profiles_and_endpoint_ids_go_together() {
        let mut r = FederationRelationship {
            trust_domain: TrustDomain::new("partner.org").unwrap(),
            bundle_endpoint_url: "https://partner.org/bundle".into(),
            profile: PROFILE_HTTPS_WEB.into(),
            endpoint_spiffe_id: None,
            ca_bundle_pem: None,
        };
        r.validate().unwrap();
        r.ca_bundle_pem = Some("junk".into());
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .starts_with("ca_bundle_pem:")
        );
        r.ca_bundle_pem = None;
        r.profile = PROFILE_HTTPS_SPIFFE.into();
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .starts_with("endpoint_spiffe_id:")
        );
        r.endpoint_spiffe_id = Some(id("spiffe://partner.org/bundle-server"));
        r.validate().unwrap();
        r.bundle_endpoint_url = "http://partner.org/bundle".into();
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .starts_with("bundle_endpoint_url:")
        );
        r.bundle_endpoint_url = "https://partner.org/bundle".into();
        r.profile = "ftp".into();
        assert!(
            r.validate()
                .unwrap_err()
                .to_string()
                .starts_with("profile:")
        );
    }
}
