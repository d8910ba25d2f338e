//! Policy documents as written by people (TOML policy files, JSON in the datastore) and their
//! validation. Field names follow Istio's AuthorizationPolicy where they exist there; later issues
//! only add fields (HTTP methods and paths, CUSTOM, AUDIT), never rename these.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};

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
    /// The destination workloads this policy applies to, by attested selectors
    /// (`k8s:ns:payments`, `netns:name:bar`, `unix:uid:1000`): a workload is covered when its
    /// selectors include all of these, as an entry's selectors match a workload. With
    /// `targets` too, both must cover it. The agent matches them (it attested the workload);
    /// a proxy's local policy file cannot use them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<String>,
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
            selectors: Vec::new(),
            provider: None,
            dry_run: false,
        }
    }
}

/// All fields present must match (AND); values inside one field are alternatives (OR). A missing
/// field matches anything, except that a source of another trust domain matches an ALLOW rule
/// only if the rule names its trust domain, and a source without identity only if the rule says
/// `unauthenticated`. A DENY, AUDIT or CUSTOM rule without principals and trust domains covers
/// every trust domain, and every such rule covers callers without identity (a restriction never
/// fails open).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Source>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Target>,
    /// Further conditions (Istio's `when`); all must hold.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A condition on one attribute of the connection or request (Istio's `when`):
///
/// | `key` | values |
/// |---|---|
/// | `request.headers[<name>]` | header value patterns (exact, `prefix*`, `*suffix`, `*`); HTTP only |
/// | `source.ip`, `destination.ip` | addresses or networks (`198.18.0.0/15`, `2001:db8::/32`) |
/// | `destination.port` | port numbers |
///
/// `values`: one must match; `not_values`: none may. An attribute the proxy does not have (a
/// header on plain TCP) is treated like an HTTP field on TCP: a DENY (AUDIT, CUSTOM) rule
/// matches, an ALLOW rule does not. An address condition only ever narrows a rule that the
/// proven SPIFFE ID (or, for a caller without one, the rule's `unauthenticated`) already
/// matched: it is never a source of identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_values: Vec<String>,
}

/// Who connects: the SPIFFE ID proven in the TLS session, or (`unauthenticated`) a caller that
/// proved none.
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
    /// Callers with no identity: plaintext that a destination in PERMISSIVE mode hands to
    /// policy (Linkerd's `unauthenticated` client). With `principals` or `trust_domains` the
    /// rule matches those callers *or* unauthenticated ones; alone, unauthenticated ones only.
    /// An ALLOW rule admits a caller without identity only when it says so here; a DENY
    /// (AUDIT, CUSTOM) rule covers such callers whatever its principals, since a caller that
    /// proved nothing may be any of them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unauthenticated: bool,
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
    /// Bounded ([`Self::bounded`]): a message repeats the value it is about, which may come
    /// from outside and be megabytes (a policy sync source, the policy API, a file).
    pub(crate) fn new(policy: &str, field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            policy: policy.to_owned(),
            field: field.into(),
            message: message.into(),
        }
        .bounded()
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
    /// The request's headers (name, value) whose values are text; names in any case.
    pub headers: &'a [(&'a str, &'a str)],
}

/// The network addresses of a connection, where known: attributes for `when` conditions only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Addresses {
    pub source: Option<IpAddr>,
    pub destination: Option<IpAddr>,
}

impl Addresses {
    /// Both ends known: the connection from `source` to `destination`.
    pub fn between(source: std::net::SocketAddr, destination: std::net::SocketAddr) -> Self {
        Self {
            source: Some(source.ip()),
            destination: Some(destination.ip()),
        }
    }
}

/// An IPv4 or IPv6 network (`198.18.0.0/15`, `2001:2::/48`, or one address): `when`
/// conditions here, and the proxy's destination map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl std::str::FromStr for IpNet {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl std::fmt::Display for IpNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl IpNet {
    /// The prefix length (32 or 128 for one address).
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| {
            format!("{s:?}: an IP address or network (198.18.0.0/15, 2001:db8::/32)")
        })?;
        // Connections to an IPv4 address are matched as IPv4 (a dual-stack socket's mapped
        // form is unmapped first), so a mapped network could never match: ask for IPv4.
        if let IpAddr::V6(v6) = addr
            && let Some(v4) = v6.to_ipv4_mapped()
        {
            return Err(format!(
                "{s:?}: an IPv4-mapped IPv6 address; write the IPv4 address ({v4}) instead"
            ));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length is 0..={max}"))?,
        };
        let net = Self { addr, prefix };
        if !net.contains(addr) || Self::bits(addr) & !net.mask() != 0 {
            return Err(format!("{s:?}: host bits are set below the prefix length"));
        }
        Ok(net)
    }

    fn bits(a: IpAddr) -> u128 {
        match a {
            IpAddr::V4(v) => u128::from(u32::from(v)),
            IpAddr::V6(v) => u128::from(v),
        }
    }

    fn mask(&self) -> u128 {
        let width = if self.addr.is_ipv4() { 32 } else { 128 };
        let ones = u128::MAX
            .checked_shl(128 - u32::from(self.prefix))
            .unwrap_or(0);
        ones >> (128 - width)
    }

    /// (is IPv4, prefix length, the network's address bits): what a table of networks with
    /// this prefix length is keyed by.
    pub(crate) fn key(&self) -> (bool, u8, u128) {
        (
            self.addr.is_ipv4(),
            self.prefix,
            Self::bits(self.addr) & self.mask(),
        )
    }

    /// The key `ip` has among networks of this family and prefix length ([`Self::key`]); an
    /// IPv4-mapped IPv6 address counts as its IPv4 address, as in [`Self::contains`].
    pub(crate) fn key_of(ip: IpAddr, v4: bool, prefix: u8) -> Option<u128> {
        let ip = match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if ip.is_ipv4() != v4 {
            return None;
        }
        let net = Self { addr: ip, prefix };
        Some(Self::bits(ip) & net.mask())
    }

    /// Whether `ip` is in the network; an IPv4-mapped IPv6 address counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v) => v.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        ip.is_ipv4() == self.addr.is_ipv4()
            && Self::bits(ip) & self.mask() == Self::bits(self.addr) & self.mask()
    }
}

/// What a condition looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CondKey {
    /// Lower-case header name.
    Header(String),
    SourceIp,
    DestinationIp,
    DestinationPort,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CondValues {
    Str(Vec<StrMatch>),
    Net(Vec<IpNet>),
    Port(Vec<u16>),
}

impl CondValues {
    fn is_empty(&self) -> bool {
        match self {
            Self::Str(v) => v.is_empty(),
            Self::Net(v) => v.is_empty(),
            Self::Port(v) => v.is_empty(),
        }
    }
}

/// A compiled condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cond {
    key: CondKey,
    values: CondValues,
    not_values: CondValues,
}

impl Cond {
    /// Whether the condition holds; `None` when the attribute is unknown here (a header on
    /// plain TCP, an address the proxy was not given).
    pub(crate) fn eval(
        &self,
        port: u16,
        addrs: &Addresses,
        req: Option<&HttpRequest<'_>>,
    ) -> Option<bool> {
        let one = |values: &CondValues| -> Option<bool> {
            Some(match (&self.key, values) {
                (CondKey::Header(name), CondValues::Str(m)) => header_value(req?.headers, name)
                    .is_some_and(|v| m.iter().any(|m| m.matches(&v))),
                (CondKey::SourceIp, CondValues::Net(n)) => {
                    let ip = addrs.source?;
                    n.iter().any(|n| n.contains(ip))
                }
                (CondKey::DestinationIp, CondValues::Net(n)) => {
                    let ip = addrs.destination?;
                    n.iter().any(|n| n.contains(ip))
                }
                (CondKey::DestinationPort, CondValues::Port(p)) => p.contains(&port),
                _ => false,
            })
        };
        let yes = if self.values.is_empty() {
            true
        } else {
            one(&self.values)?
        };
        let no = if self.not_values.is_empty() {
            false
        } else {
            one(&self.not_values)?
        };
        Some(yes && !no)
    }
}

/// A header's value as a condition sees it: every copy, in order, joined with `,` (RFC 9110
/// §5.3 makes the copies one list), as Istio and Envoy match them. Matching each copy alone let
/// a caller add `x-tenant: tenant-a` beside a `tenant-b` a trusted hop set and satisfy a rule
/// on `tenant-a`, while the application reads the joined value. `None` when absent.
fn header_value<'a>(headers: &[(&str, &'a str)], name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let mut copies = headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| *v);
    let first = copies.next()?;
    Some(match copies.next() {
        None => std::borrow::Cow::Borrowed(first),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for v in copies {
                joined.push(',');
                joined.push_str(v);
            }
            std::borrow::Cow::Owned(joined)
        }
    })
}

fn parse_key(policy: &str, field: &str, key: &str) -> Result<CondKey, PolicyError> {
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        // A field name is an RFC 9110 token (section 5.1); names compare case-insensitively.
        let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
        if name.is_empty() || !name.bytes().all(token) {
            return Err(PolicyError::new(
                policy,
                field,
                format!("{key:?}: request.headers[<name>] with a header field name"),
            ));
        }
        return Ok(CondKey::Header(name.to_ascii_lowercase()));
    }
    match key {
        "source.ip" => Ok(CondKey::SourceIp),
        "destination.ip" => Ok(CondKey::DestinationIp),
        "destination.port" => Ok(CondKey::DestinationPort),
        _ => Err(PolicyError::new(
            policy,
            field,
            format!(
                "{key:?}: not a condition key (request.headers[<name>], source.ip, destination.ip, destination.port)"
            ),
        )),
    }
}

fn parse_values(
    policy: &str,
    field: &str,
    key: &CondKey,
    values: &[String],
) -> Result<CondValues, PolicyError> {
    let at = |i: usize| format!("{field}[{i}]");
    Ok(match key {
        CondKey::Header(_) => CondValues::Str(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| parse_str_match(policy, &at(i), v))
                .collect::<Result<_, _>>()?,
        ),
        CondKey::SourceIp | CondKey::DestinationIp => CondValues::Net(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| IpNet::parse(v).map_err(|m| PolicyError::new(policy, at(i), m)))
                .collect::<Result<_, _>>()?,
        ),
        CondKey::DestinationPort => CondValues::Port(
            values
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    v.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                        PolicyError::new(policy, at(i), format!("{v:?}: a port number 1..=65535"))
                    })
                })
                .collect::<Result<_, _>>()?,
        ),
    })
}

/// Compiles rule `r`'s `when` list.
pub(crate) fn compile_when(
    policy: &str,
    r: usize,
    when: &[Condition],
) -> Result<Vec<Cond>, PolicyError> {
    when.iter()
        .enumerate()
        .map(|(i, c)| {
            let base = format!("rules[{r}].when[{i}]");
            let key = parse_key(policy, &format!("{base}.key"), &c.key)?;
            if c.values.is_empty() && c.not_values.is_empty() {
                return Err(PolicyError::new(
                    policy,
                    base,
                    "a condition needs values or not_values",
                ));
            }
            let values = parse_values(policy, &format!("{base}.values"), &key, &c.values)?;
            let not_values =
                parse_values(policy, &format!("{base}.not_values"), &key, &c.not_values)?;
            Ok(Cond {
                key,
                values,
                not_values,
            })
        })
        .collect()
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
                // The proxy matches hosts without a trailing dot (`bar.example.` names
                // `bar.example`, RFC 1034 §3.1), so a pattern with one could never match.
                if h.ends_with('.') {
                    return Err(PolicyError::new(
                        policy,
                        field,
                        format!("{h:?}: a host name without its trailing dot (hosts are matched without it)"),
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
    for (i, s) in doc.selectors.iter().enumerate() {
        Selector::parse(s).map_err(|e| {
            PolicyError::new(name, format!("selectors[{i}]"), format!("{s:?}: {e}"))
        })?;
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
        compile_when(name, r, &rule.when)?;
    }
    Ok(())
}

/// Path patterns in a spelling no normalized request has, refused where a policy is *written*
/// (the policy API, a sync source, `policy apply`, a local policy file): a DENY on `/a//b` or
/// `/caf%c3%a9` would silently deny nothing. Not part of [`validate`], which also reads stored
/// and pushed policies: one written before this rule must still compile (as before, it matches
/// nothing), or a single old policy would leave every upgraded proxy denying all traffic.
pub(crate) fn written_form(name: &str, doc: &PolicyDocument) -> Result<(), PolicyError> {
    for (r, rule) in doc.rules.iter().enumerate() {
        let Some(to) = &rule.to else { continue };
        for (field, list) in [("paths", &to.paths), ("not_paths", &to.not_paths)] {
            for (i, p) in list.iter().enumerate() {
                let field = format!("rules[{r}].to.{field}[{i}]");
                let problem = match parse_str_match(name, &field, p)? {
                    StrMatch::Exact(x) => crate::path::pattern_problem(&x, true, true),
                    StrMatch::Prefix(x) => crate::path::pattern_problem(&x, true, false),
                    StrMatch::Suffix(x) => crate::path::pattern_problem(&x, false, true),
                    StrMatch::Any => None,
                };
                if let Some(why) = problem {
                    return Err(PolicyError::new(
                        name,
                        field,
                        format!("{p:?} never matches: {why}"),
                    ));
                }
            }
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
