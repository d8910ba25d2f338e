//! Policy documents as written by people (TOML policy files, JSON in the datastore) and their
//! validation. Field names follow Istio's AuthorizationPolicy where they exist there; later issues
//! only add fields (HTTP methods and paths, CUSTOM, AUDIT), never rename these.

use serde::Deserialize;
use tessera_spiffe::{SpiffeId, TrustDomain};

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
        }
    }
}

/// One policy: an action and the rules that trigger it (any rule matching triggers it). An ALLOW
/// policy with no rules matches nothing, so its presence alone denies everything ("allow
/// nothing"), as in Istio.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// All fields present must match (AND); values inside one field are alternatives (OR). A missing
/// field matches anything, except that a source of another trust domain matches only a rule that
/// names its trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub from: Option<Source>,
    #[serde(default)]
    pub to: Option<Target>,
}

/// Who connects: the SPIFFE ID proven in the TLS session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Exact IDs, `spiffe://<td>/<path>/*`, `spiffe://<td>/*`, or `*` (any ID of the local trust
    /// domain only).
    #[serde(default)]
    pub principals: Vec<String>,
    /// Trust domains admitted (the way to admit every ID of another trust domain).
    #[serde(default)]
    pub trust_domains: Vec<String>,
}

/// What is connected to on this workload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// What the default decision is when no ALLOW policy exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAction {
    #[default]
    Deny,
    Allow,
}

/// A validation error that names the policy and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {policy:?}: {field}: {message}")]
pub struct PolicyError {
    pub policy: String,
    pub field: String,
    pub message: String,
}

impl PolicyError {
    pub(crate) fn new(policy: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            policy: policy.to_owned(),
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A principal pattern after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Principal {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Every ID strictly under this path (`spiffe://td/a/*` → the `spiffe://td/a/` prefix, so the
    /// match is on a segment boundary: `/a/*` never matches `/ab`).
    Under(String),
    /// Every ID of this trust domain (`spiffe://td/*`): names the trust domain explicitly.
    TrustDomain(TrustDomain),
    /// `*`: any ID of the local trust domain only. Another trust domain is admitted only where it
    /// is named, so a bare wildcard written for local callers never opens the door to a federated
    /// trust domain.
    LocalAny,
}

pub(crate) fn parse_principal(
    policy: &str,
    field: &str,
    p: &str,
) -> Result<Principal, PolicyError> {
    if p == "*" {
        return Ok(Principal::LocalAny);
    }
    let (base, wildcard) = match p.strip_suffix("/*") {
        Some(b) => (b, true),
        None => (p, false),
    };
    if base.contains('*') {
        return Err(PolicyError::new(
            policy,
            field,
            format!(
                "{p:?}: `*` is allowed only alone or as the last segment (`spiffe://<td>/<path>/*`)"
            ),
        ));
    }
    let id = SpiffeId::parse(base)
        .map_err(|e| PolicyError::new(policy, field, format!("{p:?}: {e}")))?;
    match (wildcard, id.is_root()) {
        (true, true) => Ok(Principal::TrustDomain(id.trust_domain())),
        (true, false) => Ok(Principal::Under(format!("{}/", id.as_str()))),
        (false, false) => Ok(Principal::Exact(id)),
        (false, true) => Err(PolicyError::new(
            policy,
            field,
            format!(
                "{p:?} is a trust domain, not a workload ID; write {p}/* for every ID in it, or use trust_domains"
            ),
        )),
    }
}

pub(crate) fn parse_trust_domain(
    policy: &str,
    field: &str,
    td: &str,
) -> Result<TrustDomain, PolicyError> {
    TrustDomain::new(td).map_err(|e| PolicyError::new(policy, field, format!("{td:?}: {e}")))
}

/// A named policy document, checked field by field.
pub(crate) fn validate(name: &str, doc: &PolicyDocument) -> Result<(), PolicyError> {
    for (r, rule) in doc.rules.iter().enumerate() {
        if let Some(from) = &rule.from {
            for (i, p) in from.principals.iter().enumerate() {
                parse_principal(name, &format!("rules[{r}].from.principals[{i}]"), p)?;
            }
            for (i, td) in from.trust_domains.iter().enumerate() {
                parse_trust_domain(name, &format!("rules[{r}].from.trust_domains[{i}]"), td)?;
            }
        }
        if let Some(i) = rule
            .to
            .as_ref()
            .and_then(|to| to.ports.iter().position(|p| *p == 0))
        {
            return Err(PolicyError::new(
                name,
                format!("rules[{r}].to.ports[{i}]"),
                "port 0 is not a port",
            ));
        }
    }
    Ok(())
}
