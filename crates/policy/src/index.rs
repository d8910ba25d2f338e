//! The compiled form of the rules of one action: by port, then by principal key, so a decision
//! looks at only the rules that can match the caller.

use std::collections::HashMap;

use tessera_spiffe::SpiffeId;

use crate::document::{
    self, Addresses, Cond, HttpMatch, HttpRequest, PolicyError, Principal, Rule,
};

/// One rule after compilation.
#[derive(Debug, Clone)]
struct Compiled {
    policy: u32,
    rule: usize,
    /// `from.trust_domains`; empty = not restricted by this field.
    trust_domains: Vec<String>,
    /// `from.not_principals`: a match here excludes the caller.
    not_principals: Vec<Principal>,
    /// The HTTP fields of `to`, if any.
    http: Option<HttpMatch>,
    /// `when` conditions.
    when: Vec<Cond>,
}

/// Who asks: the SPIFFE ID proven in the session, or `None` for a caller that proved none
/// (plaintext admitted to policy in PERMISSIVE mode).
pub(crate) type Caller<'a> = Option<&'a SpiffeId>;

/// An HTTP request as the index matches it: as sent, and (when its path has segment
/// parameters) as an application that drops them reads it. The second reading is made once per
/// decision, not once per candidate rule.
pub(crate) struct Request<'a> {
    http: &'a HttpRequest<'a>,
    /// The path without `;params` (`crate::path::without_params`), where it differs.
    stripped: Option<String>,
}

impl<'a> Request<'a> {
    pub(crate) fn new(http: &'a HttpRequest<'a>) -> Self {
        Self {
            http,
            stripped: crate::path::without_params(http.path),
        }
    }
}

/// How a rule was reached, which decides what still has to be checked.
#[derive(Debug, Clone, Copy)]
enum Via {
    /// A principal pattern that names the caller's trust domain matched.
    Named,
    /// `*`: only the local trust domain.
    LocalAny,
    /// The rule has no principals: only `trust_domains` (or, without them, local) decides.
    NoPrincipals,
    /// A caller without identity reached the rule (see [`lookup`]).
    Unauthenticated,
}

#[derive(Debug, Clone, Default)]
struct PortIndex {
    exact: HashMap<String, Vec<u32>>,
    under: HashMap<String, Vec<u32>>,
    trust_domain: HashMap<String, Vec<u32>>,
    local_any: Vec<u32>,
    /// Rules with neither principals nor trust domains that are not for unauthenticated
    /// callers alone.
    no_principals: Vec<u32>,
    /// Rules with `from.unauthenticated`.
    unauthenticated: Vec<u32>,
}

#[derive(Debug, Clone, Default)]
pub(crate) struct ActionIndex {
    rules: Vec<Compiled>,
    by_port: HashMap<u16, PortIndex>,
    any_port: PortIndex,
    /// Whether a doubt makes a rule match: DENY, AUDIT and CUSTOM rules do (a restriction
    /// restricts), ALLOW rules do not (a permission never opens more than it names). A doubt is
    /// a rule with HTTP fields asked about plain TCP (no request), a condition whose attribute
    /// is unknown, a rule without principals or trust domains asked about a caller of another
    /// trust domain, and any rule asked about a caller without identity.
    fail_closed: bool,
}

impl ActionIndex {
    pub(crate) fn new(fail_closed: bool) -> Self {
        Self {
            fail_closed,
            ..Self::default()
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub(crate) fn insert(
        &mut self,
        name: &str,
        policy: u32,
        rule_idx: usize,
        rule: &Rule,
    ) -> Result<(), PolicyError> {
        let from = rule.from.clone().unwrap_or_default();
        let mut trust_domains = Vec::with_capacity(from.trust_domains.len());
        for (i, td) in from.trust_domains.iter().enumerate() {
            let field = format!("rules[{rule_idx}].from.trust_domains[{i}]");
            trust_domains.push(
                document::parse_trust_domain(name, &field, td)?
                    .as_str()
                    .to_owned(),
            );
        }
        let mut principals = Vec::with_capacity(from.principals.len());
        for (i, p) in from.principals.iter().enumerate() {
            let field = format!("rules[{rule_idx}].from.principals[{i}]");
            principals.push(document::parse_principal(name, &field, p)?);
        }
        let mut not_principals = Vec::with_capacity(from.not_principals.len());
        for (i, p) in from.not_principals.iter().enumerate() {
            let field = format!("rules[{rule_idx}].from.not_principals[{i}]");
            not_principals.push(document::parse_principal(name, &field, p)?);
        }
        let http = match &rule.to {
            Some(to) => document::compile_http(name, rule_idx, to)?,
            None => None,
        };
        let when = document::compile_when(name, rule_idx, &rule.when)?;
        let id = u32::try_from(self.rules.len()).map_err(|_| {
            PolicyError::new(
                name,
                format!("rules[{rule_idx}]"),
                "too many rules (at most 2^32)",
            )
        })?;
        self.rules.push(Compiled {
            policy,
            rule: rule_idx,
            trust_domains,
            not_principals,
            http,
            when,
        });
        let keys = Keys {
            principals: &principals,
            // `from = { unauthenticated = true }` alone is for callers without identity only;
            // it must not also become a rule for every local caller.
            authenticated: !(from.unauthenticated
                && from.principals.is_empty()
                && from.trust_domains.is_empty()),
            unauthenticated: from.unauthenticated,
        };
        let ports = rule.to.as_ref().map(|t| t.ports.as_slice()).unwrap_or(&[]);
        if ports.is_empty() {
            add(&mut self.any_port, id, &keys);
        } else {
            for port in ports {
                add(self.by_port.entry(*port).or_default(), id, &keys);
            }
        }
        Ok(())
    }

    /// The first matching rule (lowest policy, then rule index) for `source` on `port`.
    pub(crate) fn find(
        &self,
        source: Caller<'_>,
        local: bool,
        port: u16,
        addrs: &Addresses,
        req: Option<&Request<'_>>,
    ) -> Option<(u32, usize)> {
        let mut best: Option<(u32, usize)> = None;
        let mut consider = |ids: &[u32], via: Via| {
            for id in ids {
                let Some(c) = self.rules.get(*id as usize) else {
                    continue;
                };
                if self.matches(c, via, source, local)
                    && self.matches_rest(c, source, local, port, addrs, req)
                {
                    let key = (c.policy, c.rule);
                    if best.is_none_or(|b| key < b) {
                        best = Some(key);
                    }
                }
            }
        };
        for idx in [Some(&self.any_port), self.by_port.get(&port)]
            .into_iter()
            .flatten()
        {
            lookup(idx, source, self.fail_closed, &mut consider);
        }
        best
    }

    /// The fields the index does not key on: not-principals and HTTP.
    /// Every matching policy (sorted, once each).
    pub(crate) fn find_all(
        &self,
        source: Caller<'_>,
        local: bool,
        port: u16,
        addrs: &Addresses,
        req: Option<&Request<'_>>,
    ) -> Vec<u32> {
        let mut out = Vec::new();
        let mut consider = |ids: &[u32], via: Via| {
            for id in ids {
                let Some(c) = self.rules.get(*id as usize) else {
                    continue;
                };
                if self.matches(c, via, source, local)
                    && self.matches_rest(c, source, local, port, addrs, req)
                {
                    out.push(c.policy);
                }
            }
        };
        for idx in [Some(&self.any_port), self.by_port.get(&port)]
            .into_iter()
            .flatten()
        {
            lookup(idx, source, self.fail_closed, &mut consider);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    fn matches_rest(
        &self,
        c: &Compiled,
        source: Caller<'_>,
        local: bool,
        port: u16,
        addrs: &Addresses,
        req: Option<&Request<'_>>,
    ) -> bool {
        // A caller without identity is none of the excluded principals.
        if let Some(source) = source
            && c.not_principals
                .iter()
                .any(|p| document::principal_matches(p, source, local))
        {
            return false;
        }
        let http = match (&c.http, req) {
            (None, _) => true,
            (Some(h), Some(r)) => self.http_matches(h, r),
            (Some(_), None) => self.fail_closed,
        };
        // An attribute not known here (a header on TCP, an address not given) is answered as
        // an HTTP field on TCP is: a restriction still restricts, a permission does not open.
        http && c.when.iter().all(|w| {
            w.eval(port, addrs, req.map(|r| r.http))
                .unwrap_or(self.fail_closed)
        })
    }

    /// A path with segment parameters (`/admin;x/users`) has two readings: as it is, and as
    /// an application that drops them reads it (`/admin/users`, `crate::path::without_params`).
    /// Both are possible, so a restriction applies when either matches and a permission only
    /// when both do: a DENY on `/admin/*` is not passed with `;x`, and an ALLOW of `/public/*`
    /// does not open `/public/..;/admin`.
    fn http_matches(&self, h: &HttpMatch, r: &Request<'_>) -> bool {
        let as_sent = h.matches(r.http);
        let Some(path) = &r.stripped else {
            return as_sent;
        };
        let stripped = h.matches(&HttpRequest { path, ..*r.http });
        if self.fail_closed {
            as_sent || stripped
        } else {
            as_sent && stripped
        }
    }

    fn matches(&self, c: &Compiled, via: Via, source: Caller<'_>, local: bool) -> bool {
        let Some(source) = source else {
            // Reached only through `lookup`'s rules for callers without identity.
            return matches!(via, Via::Unauthenticated);
        };
        let td = source.trust_domain_str();
        let td_listed = c.trust_domains.iter().any(|t| t == td);
        match via {
            Via::Named => c.trust_domains.is_empty() || td_listed,
            // `*` stands for the local trust domain only (ARCHITECTURE.md, "Policy model").
            Via::LocalAny => local && (c.trust_domains.is_empty() || td_listed),
            // Without principals, `trust_domains` decides. Without either, an ALLOW rule is for
            // the local trust domain only (another trust domain is admitted only by name), but a
            // DENY, AUDIT or CUSTOM rule is for every caller: a restriction written without a
            // source (`to = { ports = [22] }`) must not let federated callers through.
            Via::NoPrincipals => {
                if c.trust_domains.is_empty() {
                    local || self.fail_closed
                } else {
                    td_listed
                }
            }
            // An authenticated caller never reaches a rule this way.
            Via::Unauthenticated => false,
        }
    }
}

/// What a rule is keyed on.
struct Keys<'a> {
    principals: &'a [Principal],
    /// The rule is for authenticated callers (always, unless it names only unauthenticated ones).
    authenticated: bool,
    unauthenticated: bool,
}

fn add(idx: &mut PortIndex, id: u32, keys: &Keys<'_>) {
    if keys.unauthenticated {
        idx.unauthenticated.push(id);
    }
    if !keys.authenticated {
        return;
    }
    if keys.principals.is_empty() {
        idx.no_principals.push(id);
        return;
    }
    for p in keys.principals {
        let list = match p {
            Principal::Exact(s) => idx.exact.entry(s.as_str().to_owned()).or_default(),
            Principal::Under(prefix) => idx.under.entry(prefix.clone()).or_default(),
            Principal::TrustDomain(td) => {
                idx.trust_domain.entry(td.as_str().to_owned()).or_default()
            }
            Principal::LocalAny => &mut idx.local_any,
        };
        // A rule listing two patterns that both match is reached twice; harmless.
        list.push(id);
    }
}

/// Hands `consider` the rules of `idx` that may match `source`.
fn lookup(
    idx: &PortIndex,
    source: Caller<'_>,
    fail_closed: bool,
    consider: &mut impl FnMut(&[u32], Via),
) {
    let Some(source) = source else {
        // A caller that proved no identity (PERMISSIVE plaintext). A permission opens only
        // what it names: an ALLOW rule admits such a caller only with `unauthenticated`. A
        // restriction restricts: a DENY (AUDIT, CUSTOM) rule covers it whatever its
        // principals, since nothing shows the caller is not one of them — otherwise a
        // workload denied by name could send plaintext to get past its DENY.
        consider(&idx.unauthenticated, Via::Unauthenticated);
        if fail_closed {
            for ids in idx
                .exact
                .values()
                .chain(idx.under.values())
                .chain(idx.trust_domain.values())
            {
                consider(ids, Via::Unauthenticated);
            }
            consider(&idx.local_any, Via::Unauthenticated);
            consider(&idx.no_principals, Via::Unauthenticated);
        }
        return;
    };
    let s = source.as_str();
    if let Some(ids) = idx.exact.get(s) {
        consider(ids, Via::Named);
    }
    if !idx.under.is_empty() {
        // Every proper prefix ending in `/` after the trust domain: `spiffe://td/a/b` yields
        // `spiffe://td/a/`, so a pattern matches on a segment boundary only.
        let path_start = s.len() - source.path().len();
        for (i, _) in s[path_start..].match_indices('/').skip(1) {
            if let Some(ids) = idx.under.get(&s[..path_start + i + 1]) {
                consider(ids, Via::Named);
            }
        }
    }
    if let Some(ids) = idx.trust_domain.get(source.trust_domain_str()) {
        consider(ids, Via::Named);
    }
    consider(&idx.local_any, Via::LocalAny);
    consider(&idx.no_principals, Via::NoPrincipals);
}
