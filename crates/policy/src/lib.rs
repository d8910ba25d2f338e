//! Inbound authorization: Istio AuthorizationPolicy semantics keyed by SPIFFE identity.
//!
//! Pure: documents in, an index out, and [`PolicySet::decide`] answers for one connection (the
//! source ID proven in the TLS session and the destination port) without I/O and without scanning
//! every rule: rules are indexed by port and by principal (exact ID, every path prefix of the ID
//! on a segment boundary, its trust domain), so a decision costs a few hash lookups whatever the
//! number of rules.
//!
//! Order (ARCHITECTURE.md, "Policy model"): any DENY match → deny; no ALLOW policy at all → the
//! default (`deny` unless configured `allow`); an ALLOW match → allow; otherwise deny.

mod document;
mod index;

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;
use tessera_spiffe::{SpiffeId, TrustDomain};

pub use document::{Action, DefaultAction, PolicyDocument, PolicyError, Rule, Source, Target};
use index::ActionIndex;

/// A policy with its name, as stored (`Policy { id, document }` in the datastore) or written in a
/// policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedPolicy {
    pub name: String,
    pub document: PolicyDocument,
}

impl NamedPolicy {
    /// A policy from its JSON document (the datastore's `Policy.document`).
    pub fn from_json(name: &str, json: &str) -> Result<Self, PolicyError> {
        let document: PolicyDocument = serde_json::from_str(json)
            .map_err(|e| PolicyError::new(name, "document", e.to_string()))?;
        document::validate(name, &document)?;
        Ok(Self {
            name: name.to_owned(),
            document,
        })
    }
}

/// A local policy file (TOML):
///
/// ```toml
/// default = "deny"            # when no ALLOW policy exists; "allow" to admit
///
/// [[policy]]
/// name = "bar-from-foo"
/// action = "ALLOW"
/// [[policy.rules]]
/// from = { principals = ["spiffe://example.org/foo"] }
/// to = { ports = [8080] }
/// ```
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    #[serde(default)]
    default: Option<DefaultAction>,
    #[serde(default)]
    policy: Vec<FilePolicy>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FilePolicy {
    name: String,
    action: Action,
    #[serde(default)]
    rules: Vec<Rule>,
}

/// Why a decision was taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// A DENY policy matched (policy name, rule index).
    DeniedBy { policy: Arc<str>, rule: usize },
    /// An ALLOW policy matched (policy name, rule index).
    AllowedBy { policy: Arc<str>, rule: usize },
    /// ALLOW policies exist and none matched.
    NoAllowMatch,
    /// No ALLOW policy exists: the configured default applied.
    Default(DefaultAction),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeniedBy { policy, rule } => write!(f, "denied by policy {policy} rule {rule}"),
            Self::AllowedBy { policy, rule } => write!(f, "allowed by policy {policy} rule {rule}"),
            Self::NoAllowMatch => f.write_str("no ALLOW policy matched"),
            Self::Default(DefaultAction::Deny) => f.write_str("no policy: default deny"),
            Self::Default(DefaultAction::Allow) => f.write_str("no policy: default allow"),
        }
    }
}

/// The answer for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
}

/// Compiled policies of one workload.
#[derive(Debug, Clone)]
pub struct PolicySet {
    local: TrustDomain,
    default: DefaultAction,
    names: Vec<Arc<str>>,
    deny: ActionIndex,
    allow: ActionIndex,
    has_allow: bool,
}

impl PolicySet {
    /// Compiles validated policies. `local` is the trust domain a bare `*` stands for.
    pub fn new(
        local: TrustDomain,
        default: DefaultAction,
        policies: &[NamedPolicy],
    ) -> Result<Self, PolicyError> {
        let mut seen = BTreeSet::new();
        let mut names = Vec::with_capacity(policies.len());
        let mut deny = ActionIndex::default();
        let mut allow = ActionIndex::default();
        let mut has_allow = false;
        for (n, p) in policies.iter().enumerate() {
            if p.name.is_empty() {
                return Err(PolicyError::new(
                    &format!("#{n}"),
                    "name",
                    "a policy needs a name",
                ));
            }
            if !seen.insert(p.name.as_str()) {
                return Err(PolicyError::new(
                    &p.name,
                    "name",
                    "two policies have this name",
                ));
            }
            document::validate(&p.name, &p.document)?;
            let idx = u32::try_from(n).map_err(|_| {
                PolicyError::new(&p.name, "policy", "too many policies (at most 2^32)")
            })?;
            names.push(Arc::from(p.name.as_str()));
            let target = match p.document.action {
                Action::Deny => &mut deny,
                Action::Allow => {
                    has_allow = true;
                    &mut allow
                }
            };
            for (r, rule) in p.document.rules.iter().enumerate() {
                target.insert(&p.name, idx, r, rule)?;
            }
        }
        Ok(Self {
            local,
            default,
            names,
            deny,
            allow,
            has_allow,
        })
    }

    /// Parses and compiles a local policy file (TOML, see [`PolicyFile`]'s example). `source`
    /// names the file in errors.
    pub fn from_toml(local: TrustDomain, toml_text: &str) -> Result<Self, PolicyError> {
        Self::from_toml_or(local, toml_text, DefaultAction::Deny)
    }

    /// As [`Self::from_toml`], with the default used when the file sets none.
    pub fn from_toml_or(
        local: TrustDomain,
        toml_text: &str,
        default: DefaultAction,
    ) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(toml_text)
            .map_err(|e| PolicyError::new("(policy file)", "document", e.to_string()))?;
        let policies: Vec<NamedPolicy> = file
            .policy
            .into_iter()
            .map(|p| NamedPolicy {
                name: p.name,
                document: PolicyDocument {
                    action: p.action,
                    rules: p.rules,
                },
            })
            .collect();
        Self::new(local, file.default.unwrap_or(default), &policies)
    }

    /// No policy: everything gets `default`.
    pub fn empty(local: TrustDomain, default: DefaultAction) -> Self {
        Self {
            local,
            default,
            names: Vec::new(),
            deny: ActionIndex::default(),
            allow: ActionIndex::default(),
            has_allow: false,
        }
    }

    pub fn local_trust_domain(&self) -> &TrustDomain {
        &self.local
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Decides a connection from `source` (the peer's verified SPIFFE ID) to `port`.
    pub fn decide(&self, source: &SpiffeId, port: u16) -> Decision {
        let local = source.is_member_of(&self.local);
        if let Some((p, rule)) = self.deny.find(source, local, port) {
            return Decision {
                allowed: false,
                reason: Reason::DeniedBy {
                    policy: self.name(p),
                    rule,
                },
            };
        }
        if !self.has_allow {
            return Decision {
                allowed: self.default == DefaultAction::Allow,
                reason: Reason::Default(self.default),
            };
        }
        match self.allow.find(source, local, port) {
            Some((p, rule)) => Decision {
                allowed: true,
                reason: Reason::AllowedBy {
                    policy: self.name(p),
                    rule,
                },
            },
            None => Decision {
                allowed: false,
                reason: Reason::NoAllowMatch,
            },
        }
    }

    fn name(&self, idx: u32) -> Arc<str> {
        self.names
            .get(idx as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from("?"))
    }
}

#[cfg(test)]
mod tests;
