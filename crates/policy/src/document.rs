//! Policy documents as written by people (TOML policy files, JSON in the datastore) and their
//! validation. Field names follow Istio's AuthorizationPolicy where they exist there; later issues
//! only add fields (HTTP methods and paths, CUSTOM, AUDIT), never rename these.

use serde::{Deserialize, Serialize};
use tessera_spiffe::{SpiffeId, TrustDomain};

/// What a matching policy does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
pub enum Action {
    #[serde(rename = "ALLOW")]
    Allow,
    #[serde(rename = "DENY")]
    Deny,
    /// Only marks the decision in the decision log; never changes it.
    #[serde(rename = "AUDIT")]
    Audit,
    /// Asks an external authorizer (`provider`), first of all; its deny is final.
    #[serde(rename = "CUSTOM")]
    Custom,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "ALLOW",
            Self::Deny => "DENY",
            Self::Audit => "AUDIT",
            Self::Custom => "CUSTOM",
        }
    }
}

/// One policy: an action and the rules that trigger it (any rule matching triggers it). An ALLOW
/// policy with no rules matches nothing, so its presence alone denies everything ("allow
/// nothing"), as in Istio.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyDocument {
    pub action: Action,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// The destination workloads this policy applies to, as SPIFFE ID patterns (the principal
    /// syntax). Empty: every workload (mesh-wide).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<String>,
    /// CUSTOM only: the external authorizer's name (a provider configured on the proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Not enforced: the decision log says what the policy would have done.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
}

impl PolicyDocument {
    /// A document with an action and rules and nothing else.
    pub fn new(action: Action, rules: Vec<Rule>) -> Self {
        Self {
            action,
            rules,
            targets: Vec::new(),
            provider: None,
            dry_run: false,
        }
    }
}

/// All fields present must match (AND); values inside one field are alternatives (OR). A missing
/// field matches anything, except that a source of another trust domain matches only a rule that
/// names its trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Target>,
}

/// Who connects: the SPIFFE ID proven in the TLS session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Source {
    /// Exact IDs, `spiffe://<td>/<path>/*`, `spiffe://<td>/*`, or `*` (any ID of the local trust
    /// domain only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Trust domains admitted (the way to admit every ID of another trust domain).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
    /// Sources excluded, same syntax as `principals` (a match here makes the rule not match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_principals: Vec<String>,
}

/// What is connected to on this workload. The HTTP fields apply to requests on ports declared
/// HTTP; on plain TCP a DENY (AUDIT, CUSTOM) rule treats them as matching and an ALLOW rule as
/// not matching, so a rule written for HTTP never widens what TCP admits.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// HTTP methods (exact, upper case).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_methods: Vec<String>,
    /// Request paths: exact, `prefix*`, `*suffix` or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_paths: Vec<String>,
    /// Host (`:authority`/`Host`, port ignored), case-insensitive: exact, `prefix*`, `*suffix`, `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_hosts: Vec<String>,
}

impl Target {
    /// Whether the rule says anything about HTTP requests.
    pub fn has_http(&self) -> bool {
        !(self.methods.is_empty()
            && self.not_methods.is_empty()
            && self.paths.is_empty()
            && self.not_paths.is_empty()
            && self.hosts.is_empty()
            && self.not_hosts.is_empty())
    }
}

/// What the default decision is when no ALLOW policy exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
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

/// An HTTP value pattern: exact, `prefix*`, `*suffix` or `*` (Istio's string match).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Any,
}

impl StrMatch {
    pub(crate) fn matches(&self, v: &str) -> bool {
        match self {
            Self::Exact(e) => v == e,
            Self::Prefix(p) => v.starts_with(p.as_str()),
            Self::Suffix(s) => v.ends_with(s.as_str()),
            Self::Any => true,
        }
    }

    /// Lower-cased patterns for hosts (host names compare case-insensitively, RFC 9110 4.2.3).
    fn lower(self) -> Self {
        match self {
            Self::Exact(e) => Self::Exact(e.to_ascii_lowercase()),
            Self::Prefix(p) => Self::Prefix(p.to_ascii_lowercase()),
            Self::Suffix(s) => Self::Suffix(s.to_ascii_lowercase()),
            Self::Any => Self::Any,
        }
    }
}

pub(crate) fn parse_str_match(policy: &str, field: &str, v: &str) -> Result<StrMatch, PolicyError> {
    let bad = |m: &str| Err(PolicyError::new(policy, field, format!("{v:?}: {m}")));
    if v.is_empty() {
        return bad("empty");
    }
    if v == "*" {
        return Ok(StrMatch::Any);
    }
    if v.chars().any(|c| c.is_control() || c == ' ') {
        return bad("spaces and control characters are not allowed");
    }
    let m = if let Some(p) = v.strip_suffix('*') {
        StrMatch::Prefix(p.to_owned())
    } else if let Some(s) = v.strip_prefix('*') {
        StrMatch::Suffix(s.to_owned())
    } else {
        StrMatch::Exact(v.to_owned())
    };
    let inner = match &m {
        StrMatch::Exact(x) | StrMatch::Prefix(x) | StrMatch::Suffix(x) => x,
        StrMatch::Any => "",
    };
    if inner.contains('*') {
        return bad("`*` is allowed only alone, first or last");
    }
    Ok(m)
}

/// The HTTP part of a rule, compiled.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct HttpMatch {
    pub(crate) methods: Vec<String>,
    pub(crate) not_methods: Vec<String>,
    pub(crate) paths: Vec<StrMatch>,
    pub(crate) not_paths: Vec<StrMatch>,
    pub(crate) hosts: Vec<StrMatch>,
    pub(crate) not_hosts: Vec<StrMatch>,
}

/// The attributes of one HTTP request that rules look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    pub method: &'a str,
    /// The path without the query.
    pub path: &'a str,
    /// The host, without a port, any case.
    pub host: &'a str,
}

impl HttpMatch {
    /// All present fields match (values within a field OR; a `not_` value matching excludes).
    pub(crate) fn matches(&self, r: &HttpRequest<'_>) -> bool {
        let host = r.host.to_ascii_lowercase();
        let any = |l: &[StrMatch], v: &str| l.iter().any(|m| m.matches(v));
        (self.methods.is_empty() || self.methods.iter().any(|m| m == r.method))
            && !self.not_methods.iter().any(|m| m == r.method)
            && (self.paths.is_empty() || any(&self.paths, r.path))
            && !any(&self.not_paths, r.path)
            && (self.hosts.is_empty() || any(&self.hosts, &host))
            && !any(&self.not_hosts, &host)
    }
}

fn parse_method(policy: &str, field: &str, m: &str) -> Result<String, PolicyError> {
    // A method is an RFC 9110 token; methods are case-sensitive and the registered ones are
    // upper case, so `get` would silently never match: refuse it.
    if m.is_empty()
        || !m
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
    {
        return Err(PolicyError::new(
            policy,
            field,
            format!("{m:?}: an HTTP method in upper case (GET, POST, ...)"),
        ));
    }
    Ok(m.to_owned())
}

pub(crate) fn compile_http(
    policy: &str,
    r: usize,
    to: &Target,
) -> Result<Option<HttpMatch>, PolicyError> {
    if !to.has_http() {
        return Ok(None);
    }
    let methods = |name: &str, l: &[String]| -> Result<Vec<String>, PolicyError> {
        l.iter()
            .enumerate()
            .map(|(i, m)| parse_method(policy, &format!("rules[{r}].to.{name}[{i}]"), m))
            .collect()
    };
    let paths = |name: &str, l: &[String]| -> Result<Vec<StrMatch>, PolicyError> {
        l.iter()
            .enumerate()
            .map(|(i, p)| {
                let field = format!("rules[{r}].to.{name}[{i}]");
                if !(p.starts_with('/') || p.starts_with('*')) {
                    return Err(PolicyError::new(
                        policy,
                        field,
                        format!("{p:?}: a path starts with `/` (or `*` for a suffix match)"),
                    ));
                }
                parse_str_match(policy, &field, p)
            })
            .collect()
    };
    let hosts = |name: &str, l: &[String]| -> Result<Vec<StrMatch>, PolicyError> {
        l.iter()
            .enumerate()
            .map(|(i, h)| {
                let field = format!("rules[{r}].to.{name}[{i}]");
                if h.contains('/') {
                    return Err(PolicyError::new(
                        policy,
                        field,
                        format!("{h:?}: a host name, not a URL"),
                    ));
                }
                parse_str_match(policy, &field, h).map(StrMatch::lower)
            })
            .collect()
    };
    Ok(Some(HttpMatch {
        methods: methods("methods", &to.methods)?,
        not_methods: methods("not_methods", &to.not_methods)?,
        paths: paths("paths", &to.paths)?,
        not_paths: paths("not_paths", &to.not_paths)?,
        hosts: hosts("hosts", &to.hosts)?,
        not_hosts: hosts("not_hosts", &to.not_hosts)?,
    }))
}

/// A provider name: what the proxy's `[[authz_provider]]` is called.
pub(crate) fn valid_provider(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 128
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A named policy document, checked field by field.
pub(crate) fn validate(name: &str, doc: &PolicyDocument) -> Result<(), PolicyError> {
    match (&doc.action, &doc.provider) {
        (Action::Custom, None) => {
            return Err(PolicyError::new(
                name,
                "provider",
                "a CUSTOM policy names the external authorizer that decides",
            ));
        }
        (Action::Custom, Some(p)) if !valid_provider(p) => {
            return Err(PolicyError::new(
                name,
                "provider",
                format!("{p:?}: 1 to 128 letters, digits, `.`, `_` or `-`"),
            ));
        }
        (Action::Custom, Some(_)) | (_, None) => {}
        (a, Some(_)) => {
            return Err(PolicyError::new(
                name,
                "provider",
                format!("only a CUSTOM policy has a provider, not {}", a.as_str()),
            ));
        }
    }
    for (i, t) in doc.targets.iter().enumerate() {
        parse_principal(name, &format!("targets[{i}]"), t)?;
    }
    for (r, rule) in doc.rules.iter().enumerate() {
        if let Some(from) = &rule.from {
            for (i, p) in from.principals.iter().enumerate() {
                parse_principal(name, &format!("rules[{r}].from.principals[{i}]"), p)?;
            }
            for (i, td) in from.trust_domains.iter().enumerate() {
                parse_trust_domain(name, &format!("rules[{r}].from.trust_domains[{i}]"), td)?;
            }
            for (i, p) in from.not_principals.iter().enumerate() {
                parse_principal(name, &format!("rules[{r}].from.not_principals[{i}]"), p)?;
            }
        }
        if let Some(to) = &rule.to {
            if let Some(i) = to.ports.iter().position(|p| *p == 0) {
                return Err(PolicyError::new(
                    name,
                    format!("rules[{r}].to.ports[{i}]"),
                    "port 0 is not a port",
                ));
            }
            compile_http(name, r, to)?;
        }
    }
    Ok(())
}

/// Whether a principal pattern covers `id` (`local`: `id` is of the local trust domain).
pub(crate) fn principal_matches(p: &Principal, id: &SpiffeId, local: bool) -> bool {
    match p {
        Principal::Exact(e) => e == id,
        Principal::Under(prefix) => id.as_str().starts_with(prefix.as_str()),
        Principal::TrustDomain(td) => id.trust_domain_str() == td.as_str(),
        Principal::LocalAny => local,
    }
}
