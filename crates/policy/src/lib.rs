//! Inbound authorization: Istio AuthorizationPolicy semantics keyed by SPIFFE identity.
//!
//! Pure: documents in, an index out, and [`PolicySet::decide`] answers for one connection (the
//! source ID proven in the TLS session and the destination port) without I/O and without scanning
//! every rule: rules are indexed by port and by principal (exact ID, every path prefix of the ID
//! on a segment boundary, its trust domain), so a decision costs a few hash lookups whatever the
//! number of rules.
//!
//! Order (ARCHITECTURE.md, "Policy model"): a CUSTOM policy's external authorizer denying → deny
//! (the caller asks the authorizers named by [`PolicySet::custom_checks`] before
//! [`PolicySet::decide`]); any DENY match → deny; no ALLOW policy at all → the default (`deny`
//! unless configured `allow`); an ALLOW match → allow; otherwise deny. AUDIT matches only mark the
//! decision; `dry_run` policies are evaluated in a shadow set and only reported.
//!
//! A set is compiled for one destination workload ([`PolicySet::for_workload`] keeps the
//! policies whose `targets` cover it, and the mesh-wide ones).

pub mod destination;
mod document;
mod index;
mod path;
mod shown;
mod strict;

use std::collections::BTreeSet;
use std::sync::Arc;

use serde::Deserialize;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};

pub use document::{
    Action, Addresses, Condition, DefaultAction, HttpRequest, IpNet, PolicyDocument, PolicyError,
    Rule, Source, Target,
};
use index::{ActionIndex, Request};
pub use path::{normalize_path, without_params as path_without_params};

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
        let document: PolicyDocument =
            from_json_at(json).map_err(|(field, msg)| PolicyError::new(name, field, msg))?;
        document::validate(name, &document)?;
        Ok(Self {
            name: name.to_owned(),
            document,
        })
    }

    /// The JSON document (the datastore's `Policy.document`).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.document).unwrap_or_default()
    }

    /// What is refused where a policy is written, beyond [`Self::validate`]: path patterns no
    /// normalized request can equal (see `document::written_form`). The policy API, policy sync,
    /// `policy apply` and local policy files call it; stored and pushed policies are read
    /// without it, so an older policy never stops a proxy from compiling its set.
    pub fn check_written(&self) -> Result<(), PolicyError> {
        document::written_form(&self.name, &self.document)
    }

    /// Checks the name and the document.
    pub fn validate(&self) -> Result<(), PolicyError> {
        validate_name(&self.name)?;
        document::validate(&self.name, &self.document)
    }

    /// Whether this policy applies to the destination workload `id` with the attested
    /// `selectors`: mesh-wide (no `targets`, no `selectors`), or a target pattern covers `id`
    /// (when `targets` are given) and the workload has every selector listed (when `selectors`
    /// are given). `selectors: None`: they were matched already by whoever sent this policy
    /// (the agent, which attested the workload). An invalid pattern covers nothing.
    pub fn applies_to(
        &self,
        id: &SpiffeId,
        local: &TrustDomain,
        selectors: Option<&BTreeSet<Selector>>,
    ) -> bool {
        let is_local = id.is_member_of(local);
        let by_id = self.document.targets.is_empty()
            || self.document.targets.iter().any(|t| {
                document::parse_principal(&self.name, "targets", t)
                    .map(|p| document::principal_matches(&p, id, is_local))
                    .unwrap_or(false)
            });
        let by_selectors = match selectors {
            None => true,
            Some(have) => self
                .document
                .selectors
                .iter()
                .all(|s| Selector::parse(s).is_ok_and(|s| have.contains(&s))),
        };
        by_id && by_selectors
    }
}

/// A policy name: what `tessera policy show NAME` takes and the store's `Policy.id`.
pub fn validate_name(name: &str) -> Result<(), PolicyError> {
    let ok = !name.is_empty()
        && name.len() <= 256
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'/'));
    if ok {
        Ok(())
    } else {
        Err(PolicyError::new(
            name,
            "name",
            "1 to 256 letters, digits, `.`, `_`, `-` or `/`",
        ))
    }
}

/// A document from JSON; an error gives the field it is in, so a wrong type names it
/// (`rules[0].from`, `tunnel_port`; `document` for the whole), and the message without a
/// position: the JSON may be what this crate made from YAML, where the path says where and a
/// position would mislead.
pub(crate) fn from_json_at<T: serde::de::DeserializeOwned>(
    json: &str,
) -> Result<T, (String, String)> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(json)).map_err(|e| {
        let at = e.path().to_string();
        let field = if at == "." { "document".to_owned() } else { at };
        let msg = e.into_inner().to_string();
        let msg = msg.rfind(" at line ").map_or(msg.as_str(), |i| &msg[..i]);
        (field, msg.to_owned())
    })
}

/// Policies written as YAML or JSON (what `tessera policy apply -f` reads): one policy (a
/// mapping with `name` and the document's fields) or a list of them, possibly empty (an empty
/// text too). Every policy is validated, names are unique and no mapping has a key twice; the
/// first error names the policy (or its position) and the field.
pub fn parse_documents(text: &str) -> Result<Vec<NamedPolicy>, PolicyError> {
    parse_text(text, Empty::Allowed)
}

/// As [`parse_documents`], for a text that states a whole policy set (what a policy sync source
/// serves, each of its files): a text with no value — empty, only whitespace or comments, or a
/// YAML null (`~`, `null`) — is refused, since a broken server, proxy or half-written file gives
/// exactly that, and reading it as "no policies" would delete every policy of the set, DENY
/// policies included. An empty list (`[]`) is how a source says "no policies".
pub fn parse_set_documents(text: &str) -> Result<Vec<NamedPolicy>, PolicyError> {
    parse_text(text, Empty::Refused)
}

/// Policies of a text from outside, checked as written ([`NamedPolicy::check_written`]). Every
/// error is bounded, as every [`PolicyError`] is: it repeats what the text holds, which may be
/// megabytes.
fn parse_text(text: &str, empty: Empty) -> Result<Vec<NamedPolicy>, PolicyError> {
    named_documents(text, "policy", validate_name, empty)?
        .into_iter()
        .map(|(name, json)| {
            let p = NamedPolicy::from_json(&name, &json)?;
            p.check_written()?;
            Ok(p)
        })
        .collect()
}

/// Whether a text with no value at all reads as an empty list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Empty {
    Allowed,
    Refused,
}

/// Named JSON documents written as YAML or JSON: one mapping (`name` and the document's fields)
/// or a list of them, possibly empty (a text with no value too, when `empty` allows it); each
/// name checked by `valid_name` and none twice, and no key twice in any mapping. Returns (name,
/// the document without `name`, as JSON). Errors name the item (its name, or `#i` before it has
/// one; `(document)` for the whole text) and the field. `kind` is what an item is called in
/// messages ("policy", "destination").
pub(crate) fn named_documents(
    text: &str,
    kind: &str,
    valid_name: impl Fn(&str) -> Result<(), PolicyError>,
    empty: Empty,
) -> Result<Vec<(String, String)>, PolicyError> {
    let t = text.trim_start();
    let json = t.starts_with('{') || t.starts_with('[');
    let value = if t.is_empty() {
        serde_json::Value::Null
    } else {
        strict::read(text, json).map_err(|e| match e {
            strict::ReadError::Duplicate(d) => duplicate_error(&d),
            strict::ReadError::Json(e) => PolicyError::new(
                "(document)",
                "document",
                format!("not JSON (a text that starts with {{ or [ is read as JSON, YAML otherwise): {e}"),
            ),
            strict::ReadError::Yaml(e) => {
                PolicyError::new("(document)", "document", format!("not YAML: {e}"))
            }
        })?
    };
    let items = match value {
        serde_json::Value::Array(a) => a,
        one @ serde_json::Value::Object(_) => vec![one],
        serde_json::Value::Null if empty == Empty::Allowed => Vec::new(),
        serde_json::Value::Null => {
            return Err(PolicyError::new(
                "(document)",
                "document",
                format!(
                    "the document is empty (no text, only comments, or a YAML null): refused, as a broken server or file gives that too; to say there is no {kind}, send an empty list `[]`"
                ),
            ));
        }
        _ => {
            return Err(PolicyError::new(
                "(document)",
                "document",
                format!("expected a {kind} (a mapping with `name`) or a list of them"),
            ));
        }
    };
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let at = format!("#{i}");
        let serde_json::Value::Object(mut map) = item else {
            return Err(PolicyError::new(&at, kind, "expected a mapping"));
        };
        let name = match map.remove("name") {
            Some(serde_json::Value::String(n)) => n,
            _ => return Err(PolicyError::new(&at, "name", "a string `name` is required")),
        };
        valid_name(&name)?;
        if !seen.insert(name.clone()) {
            return Err(PolicyError::new(
                &name,
                "name",
                format!("two {kind} entries have this name"),
            ));
        }
        out.push((name, serde_json::Value::Object(map).to_string()));
    }
    Ok(out)
}

/// The error for a key written twice: the policy is the item's name when it was read before the
/// duplicate (else `#i`), the field the path to the key within the item.
fn duplicate_error(d: &strict::Duplicate) -> PolicyError {
    let (item, rest) = match d.at.split_first() {
        Some((strict::Step::Index(i), rest)) => (*i, rest),
        _ => (0, d.at.as_slice()),
    };
    let mut field = String::new();
    for step in rest.iter().chain([&strict::Step::Key(d.key.clone())]) {
        match step {
            strict::Step::Index(i) => field.push_str(&format!("[{i}]")),
            strict::Step::Key(k) => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(k);
            }
        }
    }
    let policy = d.item_name.clone().unwrap_or_else(|| format!("#{item}"));
    PolicyError::new(
        &policy,
        field,
        format!(
            "the key `{}` is written twice in one mapping: refused, since one reader would take the first and another the last",
            d.key
        ),
    )
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
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default)]
    selectors: Vec<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    dry_run: bool,
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
    /// A CUSTOM policy's external authorizer denied (or failed, closed).
    CustomDenied { policy: Arc<str>, detail: String },
    /// An HTTP port: the connection is admitted to HTTP parsing and each request is decided.
    PerRequest,
}

impl Reason {
    /// The policy that decided, if one did.
    pub fn policy(&self) -> Option<&str> {
        match self {
            Self::DeniedBy { policy, .. }
            | Self::AllowedBy { policy, .. }
            | Self::CustomDenied { policy, .. } => Some(policy),
            Self::NoAllowMatch | Self::Default(_) | Self::PerRequest => None,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::DeniedBy { policy, rule } => write!(f, "denied by policy {policy} rule {rule}"),
            Self::AllowedBy { policy, rule } => write!(f, "allowed by policy {policy} rule {rule}"),
            Self::NoAllowMatch => f.write_str("no ALLOW policy matched"),
            Self::Default(DefaultAction::Deny) => f.write_str("no policy: default deny"),
            Self::Default(DefaultAction::Allow) => f.write_str("no policy: default allow"),
            Self::PerRequest => f.write_str("HTTP port: each request decided"),
            Self::CustomDenied { policy, detail } => {
                write!(f, "denied by CUSTOM policy {policy}: {detail}")
            }
        }
    }
}

/// The answer for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub reason: Reason,
    /// The first AUDIT policy that matched (the decision log marks it; nothing else changes).
    pub audit: Option<Arc<str>>,
    /// What the policies marked `dry_run` would have decided, when that differs from the
    /// decision or a dry-run policy would have been the deciding one.
    pub dry_run: Option<Box<Decision>>,
}

impl Decision {
    fn new(allowed: bool, reason: Reason) -> Self {
        Self {
            allowed,
            reason,
            audit: None,
            dry_run: None,
        }
    }

    /// A decision taken by a CUSTOM policy's authorizer (deny).
    pub fn custom_denied(policy: Arc<str>, detail: String) -> Self {
        Self::new(false, Reason::CustomDenied { policy, detail })
    }

    /// An HTTP connection admitted to per-request decisions.
    pub fn http_per_request() -> Self {
        Self::new(true, Reason::PerRequest)
    }

    /// `allow`, `deny`, `audit` (allowed and marked) as the decision log names it.
    pub fn kind(&self) -> &'static str {
        match (self.allowed, self.audit.is_some()) {
            (false, _) => "deny",
            (true, true) => "audit",
            (true, false) => "allow",
        }
    }
}

/// A CUSTOM policy that matched: its authorizer must be asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomCheck {
    pub policy: Arc<str>,
    pub provider: Arc<str>,
}

/// Compiled policies of one workload.
#[derive(Debug, Clone)]
pub struct PolicySet {
    local: TrustDomain,
    default: DefaultAction,
    names: Vec<Arc<str>>,
    /// The provider of each CUSTOM policy, by policy index.
    providers: Vec<Option<Arc<str>>>,
    deny: ActionIndex,
    allow: ActionIndex,
    audit: ActionIndex,
    custom: ActionIndex,
    has_allow: bool,
    /// Every policy with the `dry_run` ones enforced too; `None` when there are none.
    shadow: Option<Box<PolicySet>>,
}

impl PolicySet {
    /// Compiles validated policies. `local` is the trust domain a bare `*` stands for.
    pub fn new(
        local: TrustDomain,
        default: DefaultAction,
        policies: &[NamedPolicy],
    ) -> Result<Self, PolicyError> {
        let shadow = if policies.iter().any(|p| p.document.dry_run) {
            let enforced: Vec<NamedPolicy> = policies
                .iter()
                .map(|p| {
                    let mut p = p.clone();
                    p.document.dry_run = false;
                    p
                })
                .collect();
            Some(Box::new(Self::compile(local.clone(), default, &enforced)?))
        } else {
            None
        };
        let mut set = Self::compile(local, default, policies)?;
        set.shadow = shadow;
        Ok(set)
    }

    /// Compiles the policies that apply to the destination workload `own` (mesh-wide ones and
    /// those whose `targets` cover it; `selectors` were matched by the agent that sent them);
    /// `*` stands for `own`'s trust domain.
    pub fn for_workload(
        own: &SpiffeId,
        default: DefaultAction,
        policies: &[NamedPolicy],
    ) -> Result<Self, PolicyError> {
        let local = own.trust_domain();
        let mine: Vec<NamedPolicy> = policies
            .iter()
            .filter(|p| p.applies_to(own, &local, None))
            .cloned()
            .collect();
        Self::new(local, default, &mine)
    }

    fn compile(
        local: TrustDomain,
        default: DefaultAction,
        policies: &[NamedPolicy],
    ) -> Result<Self, PolicyError> {
        let mut seen = BTreeSet::new();
        let mut names = Vec::with_capacity(policies.len());
        let mut providers = Vec::with_capacity(policies.len());
        let mut deny = ActionIndex::new(true);
        let mut allow = ActionIndex::new(false);
        let mut audit = ActionIndex::new(true);
        let mut custom = ActionIndex::new(true);
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
            providers.push(p.document.provider.as_deref().map(Arc::from));
            if p.document.dry_run {
                // Evaluated only in the shadow set.
                continue;
            }
            let target = match p.document.action {
                Action::Deny => &mut deny,
                Action::Allow => {
                    has_allow = true;
                    &mut allow
                }
                Action::Audit => &mut audit,
                Action::Custom => &mut custom,
            };
            for (r, rule) in p.document.rules.iter().enumerate() {
                target.insert(&p.name, idx, r, rule)?;
            }
        }
        Ok(Self {
            local,
            default,
            names,
            providers,
            deny,
            allow,
            audit,
            custom,
            has_allow,
            shadow: None,
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
        let (file_default, policies) = parse_file(toml_text)?;
        Self::new(local, file_default.unwrap_or(default), &policies)
    }

    /// As [`Self::from_toml_or`], keeping only the policies that apply to the destination
    /// workload `own` (see [`Self::for_workload`]).
    pub fn from_toml_for_workload(
        own: &SpiffeId,
        toml_text: &str,
        default: DefaultAction,
    ) -> Result<Self, PolicyError> {
        let (file_default, policies) = parse_file(toml_text)?;
        if let Some(p) = policies.iter().find(|p| !p.document.selectors.is_empty()) {
            // Only the agent knows a workload's attested selectors; a local file is this
            // proxy's own, so it names its targets by SPIFFE ID.
            return Err(PolicyError::new(
                &p.name,
                "selectors",
                "selector targets are matched by the agent; a local policy file targets by SPIFFE ID (`targets`)",
            ));
        }
        Self::for_workload(own, file_default.unwrap_or(default), &policies)
    }

    /// No policy: everything gets `default`.
    pub fn empty(local: TrustDomain, default: DefaultAction) -> Self {
        Self {
            local,
            default,
            names: Vec::new(),
            providers: Vec::new(),
            deny: ActionIndex::new(true),
            allow: ActionIndex::new(false),
            audit: ActionIndex::new(true),
            custom: ActionIndex::new(true),
            has_allow: false,
            shadow: None,
        }
    }

    /// The default that applies when no ALLOW policy exists.
    pub fn default_action(&self) -> DefaultAction {
        self.default
    }

    /// Whether any CUSTOM policy is in force (the caller needs an authorizer round trip).
    pub fn has_custom(&self) -> bool {
        !self.custom.is_empty()
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

    /// Decides a connection from `source` (the peer's verified SPIFFE ID) to `port` (plain TCP,
    /// or the connection-level check before any HTTP request is read).
    pub fn decide(&self, source: &SpiffeId, port: u16) -> Decision {
        self.decide_request(Some(source), port, &Addresses::default(), None)
    }

    /// Decides one HTTP request (`req`) or, with `None`, a TCP connection; `addrs` are the
    /// connection's addresses where known (for `when` conditions). `source` is the SPIFFE ID
    /// the peer proved, or `None` for a caller that proved none (plaintext that PERMISSIVE mode
    /// admits to policy): only rules that say `unauthenticated` allow it, and every DENY rule
    /// of its port covers it. CUSTOM policies are not consulted here: ask
    /// [`Self::custom_checks`]' authorizers first.
    pub fn decide_request(
        &self,
        source: Option<&SpiffeId>,
        port: u16,
        addrs: &Addresses,
        req: Option<&HttpRequest<'_>>,
    ) -> Decision {
        let req = req.map(Request::new);
        let req = req.as_ref();
        let mut d = self.enforce(source, port, addrs, req);
        if let Some(shadow) = &self.shadow {
            let s = shadow.enforce(source, port, addrs, req);
            let by_dry_run = s
                .reason
                .policy()
                .is_some_and(|p| d.reason.policy() != Some(p));
            if s.allowed != d.allowed || by_dry_run {
                d.dry_run = Some(Box::new(s));
            }
        }
        d
    }

    fn enforce(
        &self,
        source: Option<&SpiffeId>,
        port: u16,
        addrs: &Addresses,
        req: Option<&Request<'_>>,
    ) -> Decision {
        let local = source.is_some_and(|s| s.is_member_of(&self.local));
        let mut d = self.decide_enforced(source, local, port, addrs, req);
        if !self.audit.is_empty() {
            d.audit = self
                .audit
                .find(source, local, port, addrs, req)
                .map(|(p, _)| self.name(p));
        }
        d
    }

    fn decide_enforced(
        &self,
        source: Option<&SpiffeId>,
        local: bool,
        port: u16,
        addrs: &Addresses,
        req: Option<&Request<'_>>,
    ) -> Decision {
        if let Some((p, rule)) = self.deny.find(source, local, port, addrs, req) {
            return Decision::new(
                false,
                Reason::DeniedBy {
                    policy: self.name(p),
                    rule,
                },
            );
        }
        if !self.has_allow {
            return Decision::new(
                self.default == DefaultAction::Allow,
                Reason::Default(self.default),
            );
        }
        match self.allow.find(source, local, port, addrs, req) {
            Some((p, rule)) => Decision::new(
                true,
                Reason::AllowedBy {
                    policy: self.name(p),
                    rule,
                },
            ),
            None => Decision::new(false, Reason::NoAllowMatch),
        }
    }

    /// The CUSTOM policies matching this connection or request, whose authorizers must all
    /// allow before [`Self::decide_request`] is consulted (CUSTOM comes first in the order).
    /// One per provider: the first matching policy names it.
    pub fn custom_checks(
        &self,
        source: Option<&SpiffeId>,
        port: u16,
        addrs: &Addresses,
        req: Option<&HttpRequest<'_>>,
    ) -> Vec<CustomCheck> {
        if self.custom.is_empty() {
            return Vec::new();
        }
        let local = source.is_some_and(|s| s.is_member_of(&self.local));
        let req = req.map(Request::new);
        let mut out: Vec<CustomCheck> = Vec::new();
        for p in self
            .custom
            .find_all(source, local, port, addrs, req.as_ref())
        {
            let Some(Some(provider)) = self.providers.get(p as usize) else {
                continue;
            };
            if !out.iter().any(|c| c.provider == *provider) {
                out.push(CustomCheck {
                    policy: self.name(p),
                    provider: provider.clone(),
                });
            }
        }
        out
    }

    fn name(&self, idx: u32) -> Arc<str> {
        self.names
            .get(idx as usize)
            .cloned()
            .unwrap_or_else(|| Arc::from("?"))
    }
}

/// A policy file's default and policies.
fn parse_file(toml_text: &str) -> Result<(Option<DefaultAction>, Vec<NamedPolicy>), PolicyError> {
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
                targets: p.targets,
                selectors: p.selectors,
                provider: p.provider,
                dry_run: p.dry_run,
            },
        })
        .collect();
    // A local policy file is written by hand: refused at load, where its author sees why.
    for p in &policies {
        p.check_written()?;
    }
    Ok((file.default, policies))
}

#[cfg(test)]
mod tests;
