#![allow(clippy::unwrap_used, clippy::expect_used)]

use super::*;

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn set(toml_text: &str) -> PolicySet {
    PolicySet::from_toml(td("example.org"), toml_text).unwrap()
}

fn allow_from(principals: &str) -> PolicySet {
    set(&format!(
        "[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = {{ principals = [{principals}] }}\n"
    ))
}

#[test]
fn no_policy_defaults_to_deny_and_can_be_configured_to_allow() {
    let none = PolicySet::empty(td("example.org"), DefaultAction::Deny);
    let d = none.decide(&id("spiffe://example.org/foo"), 80);
    assert!(!d.allowed);
    assert_eq!(d.reason, Reason::Default(DefaultAction::Deny));
    let open = set("default = \"allow\"\n");
    assert!(open.decide(&id("spiffe://example.org/foo"), 80).allowed);
}

#[test]
fn exact_principal() {
    let s = allow_from("\"spiffe://example.org/foo\"");
    assert!(s.decide(&id("spiffe://example.org/foo"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/foo/x"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/fo"), 1).allowed);
    assert_eq!(
        s.decide(&id("spiffe://example.org/baz"), 1).reason,
        Reason::NoAllowMatch
    );
}

#[test]
fn path_wildcard_matches_on_segment_boundary_only() {
    let s = allow_from("\"spiffe://example.org/a/*\"");
    assert!(s.decide(&id("spiffe://example.org/a/b"), 1).allowed);
    assert!(s.decide(&id("spiffe://example.org/a/b/c"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/ab"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/ab/c"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/a"), 1).allowed);
    assert!(!s.decide(&id("spiffe://other.org/a/b"), 1).allowed);
}

#[test]
fn trust_domain_wildcard_names_that_trust_domain() {
    let s = allow_from("\"spiffe://other.org/*\"");
    assert!(s.decide(&id("spiffe://other.org/x"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/x"), 1).allowed);
}

#[test]
fn bare_star_is_the_local_trust_domain_only() {
    let s = allow_from("\"*\"");
    assert!(
        s.decide(&id("spiffe://example.org/anything/at/all"), 1)
            .allowed
    );
    assert!(!s.decide(&id("spiffe://other.org/x"), 1).allowed);
    // A rule without `from` admits local callers only, too.
    let any = set("[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\n");
    assert!(any.decide(&id("spiffe://example.org/x"), 1).allowed);
    assert!(!any.decide(&id("spiffe://other.org/x"), 1).allowed);
}

#[test]
fn trust_domains_admit_a_foreign_trust_domain_and_and_with_principals() {
    let s = set(
        "[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = { trust_domains = [\"other.org\"] }\n",
    );
    assert!(s.decide(&id("spiffe://other.org/x"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/x"), 1).allowed);
    assert!(!s.decide(&id("spiffe://third.org/x"), 1).allowed);
    let both = set(
        "[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = { principals = [\"spiffe://other.org/a/*\"], trust_domains = [\"other.org\"] }\n",
    );
    assert!(both.decide(&id("spiffe://other.org/a/b"), 1).allowed);
    assert!(!both.decide(&id("spiffe://other.org/c"), 1).allowed);
}

#[test]
fn ports_restrict_rules() {
    let s = set(
        "[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = { principals = [\"*\"] }\nto = { ports = [8080, 9090] }\n",
    );
    assert!(s.decide(&id("spiffe://example.org/x"), 8080).allowed);
    assert!(s.decide(&id("spiffe://example.org/x"), 9090).allowed);
    assert!(!s.decide(&id("spiffe://example.org/x"), 8081).allowed);
}

#[test]
fn deny_comes_first_and_names_the_policy() {
    let s = set(concat!(
        "[[policy]]\nname = \"allow-all\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = { principals = [\"*\"] }\n",
        "[[policy]]\nname = \"no-baz\"\naction = \"DENY\"\n[[policy.rules]]\nfrom = { principals = [\"spiffe://example.org/baz\"] }\n",
    ));
    assert!(s.decide(&id("spiffe://example.org/foo"), 1).allowed);
    let d = s.decide(&id("spiffe://example.org/baz"), 1);
    assert!(!d.allowed);
    assert_eq!(
        d.reason,
        Reason::DeniedBy {
            policy: Arc::from("no-baz"),
            rule: 0
        }
    );
    assert_eq!(d.reason.to_string(), "denied by policy no-baz rule 0");
}

#[test]
fn deny_only_policies_fall_back_to_the_default() {
    let s = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"no-baz\"\naction = \"DENY\"\n[[policy.rules]]\nfrom = { principals = [\"spiffe://example.org/baz\"] }\n",
    ));
    assert!(s.decide(&id("spiffe://example.org/foo"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/baz"), 1).allowed);
}

#[test]
fn an_allow_policy_without_rules_allows_nothing() {
    let s = set("default = \"allow\"\n[[policy]]\nname = \"nothing\"\naction = \"ALLOW\"\n");
    assert!(!s.decide(&id("spiffe://example.org/foo"), 1).allowed);
}

#[test]
fn validation_errors_name_policy_and_field() {
    let cases = [
        ("\"spiffe://example.org/a*\"", "rules[0].from.principals[0]"),
        ("\"spiffe://Example.org/a\"", "rules[0].from.principals[0]"),
        ("\"spiffe://example.org\"", "rules[0].from.principals[0]"),
        ("\"*/x\"", "rules[0].from.principals[0]"),
        ("\"http://example.org/a\"", "rules[0].from.principals[0]"),
    ];
    for (p, field) in cases {
        let e = PolicySet::from_toml(
            td("example.org"),
            &format!(
                "[[policy]]\nname = \"bad\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = {{ principals = [{p}] }}\n"
            ),
        )
        .unwrap_err();
        assert_eq!(e.policy, "bad", "{p}");
        assert_eq!(e.field, field, "{p}: {e}");
    }
    // A path pattern in a spelling no normalized request has would never match: refused with
    // the spelling to write instead.
    let e = PolicySet::from_toml(
        td("example.org"),
        "[[policy]]\nname = \"enc\"\naction = \"DENY\"\n[[policy.rules]]\nto = { paths = [\"/ok/*\", \"/enc/%7euser\"] }\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].to.paths[1]");
    assert!(
        e.to_string().contains("never matches") && e.to_string().contains("write `~`"),
        "{e}"
    );
    let e = PolicySet::from_toml(
        td("example.org"),
        "[[policy]]\nname = \"tds\"\naction = \"DENY\"\n[[policy.rules]]\nfrom = { trust_domains = [\"ok.org\", \"Bad\"] }\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].from.trust_domains[1]");
    let e = PolicySet::from_toml(
        td("example.org"),
        "[[policy]]\nname = \"port\"\naction = \"DENY\"\n[[policy.rules]]\nto = { ports = [0] }\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].to.ports[0]");
    let e = PolicySet::from_toml(
        td("example.org"),
        "[[policy]]\nname = \"a\"\naction = \"ALLOW\"\n[[policy]]\nname = \"a\"\naction = \"DENY\"\n",
    )
    .unwrap_err();
    assert_eq!((e.policy.as_str(), e.field.as_str()), ("a", "name"));
    // Unknown fields and actions are refused, not ignored.
    assert!(
        PolicySet::from_toml(
            td("example.org"),
            "[[policy]]\nname = \"a\"\naction = \"PERMIT\"\n"
        )
        .is_err()
    );
    assert!(
        PolicySet::from_toml(
            td("example.org"),
            "[[policy]]\nname = \"a\"\naction = \"ALLOW\"\nwho = 1\n"
        )
        .is_err()
    );
}

#[test]
fn stored_json_documents_compile() {
    let p = NamedPolicy::from_json(
        "bar",
        r#"{"action":"ALLOW","rules":[{"from":{"principals":["spiffe://example.org/foo"]},"to":{"ports":[8080]}}]}"#,
    )
    .unwrap();
    let s = PolicySet::new(td("example.org"), DefaultAction::Deny, &[p]).unwrap();
    assert!(s.decide(&id("spiffe://example.org/foo"), 8080).allowed);
    let e = NamedPolicy::from_json(
        "bar",
        r#"{"action":"ALLOW","rules":[{"from":{"principals":[""]}}]}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].from.principals[0]");
}

#[test]
fn ten_thousand_rules_still_pick_the_right_one() {
    let mut policies = Vec::new();
    for i in 0..10_000u32 {
        policies.push(NamedPolicy {
            name: format!("p{i}"),
            document: PolicyDocument {
                action: Action::Allow,
                rules: vec![Rule {
                    from: Some(Source {
                        principals: vec![format!("spiffe://example.org/svc/{i}")],
                        trust_domains: vec![],
                        ..Source::default()
                    }),
                    to: Some(Target {
                        ports: vec![u16::try_from(1000 + i % 100).unwrap()],
                        ..Target::default()
                    }),
                    when: vec![],
                }],
                targets: vec![],
                selectors: vec![],
                provider: None,
                dry_run: false,
            },
        });
    }
    let s = PolicySet::new(td("example.org"), DefaultAction::Deny, &policies).unwrap();
    let d = s.decide(&id("spiffe://example.org/svc/4242"), 1042);
    assert_eq!(
        d.reason,
        Reason::AllowedBy {
            policy: Arc::from("p4242"),
            rule: 0
        }
    );
    assert!(!s.decide(&id("spiffe://example.org/svc/4242"), 1043).allowed);
}

fn req<'a>(method: &'a str, path: &'a str, host: &'a str) -> HttpRequest<'a> {
    HttpRequest {
        method,
        path,
        host,
        headers: &[],
    }
}

#[test]
fn http_routes_allow_get_public_and_deny_post_admin() {
    let s = set(concat!(
        "[[policy]]\nname = \"public\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { principals = [\"*\"] }\nto = { methods = [\"GET\"], paths = [\"/public\", \"/static/*\"] }\n",
        "[[policy]]\nname = \"no-admin\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "to = { methods = [\"POST\"], paths = [\"/admin*\"], not_hosts = [\"*.internal\"] }\n",
    ));
    let foo = id("spiffe://example.org/foo");
    let r = |m, p, h| s.decide_request(Some(&foo), 80, &Addresses::default(), Some(&req(m, p, h)));
    assert!(r("GET", "/public", "a.example").allowed);
    assert!(r("GET", "/static/x.css", "a.example").allowed);
    assert!(!r("GET", "/private", "a.example").allowed);
    assert!(!r("PUT", "/public", "a.example").allowed);
    let d = r("POST", "/admin/users", "a.example");
    assert!(!d.allowed);
    assert_eq!(d.reason.policy(), Some("no-admin"));
    // not_hosts excludes (case-insensitively): the DENY does not match, no ALLOW does either.
    assert_eq!(
        r("POST", "/admin", "X.INTERNAL").reason,
        Reason::NoAllowMatch
    );
    // On plain TCP the HTTP-only DENY matches (fail closed) and the HTTP-only ALLOW does not.
    assert_eq!(s.decide(&foo, 80).reason.policy(), Some("no-admin"));
    let only_allow = set(concat!(
        "[[policy]]\nname = \"get\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "to = { methods = [\"GET\"] }\n",
    ));
    assert_eq!(only_allow.decide(&foo, 80).reason, Reason::NoAllowMatch);
    assert!(
        only_allow
            .decide_request(
                Some(&foo),
                80,
                &Addresses::default(),
                Some(&req("GET", "/", "h"))
            )
            .allowed
    );
}

#[test]
fn a_restriction_without_a_source_covers_callers_of_every_trust_domain() {
    // A partner trust domain is admitted on every port; `no-ssh` names no source. ALLOW without
    // a source is local-only (a permission admits another trust domain only by name), but a
    // DENY, AUDIT or CUSTOM rule without one must restrict federated callers too, or it fails
    // open for exactly the callers the operator trusts least.
    let s = set(concat!(
        "[[policy]]\nname = \"partner\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { trust_domains = [\"partner.org\"] }\n",
        "[[policy]]\nname = \"no-ssh\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "to = { ports = [22] }\n",
        "[[policy]]\nname = \"watch-ssh\"\naction = \"AUDIT\"\n[[policy.rules]]\n",
        "to = { ports = [22] }\n",
        "[[policy]]\nname = \"ext\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n",
        "to = { ports = [22] }\n",
    ));
    let partner = id("spiffe://partner.org/x");
    assert!(s.decide(&partner, 443).allowed);
    let d = s.decide(&partner, 22);
    assert!(!d.allowed);
    assert_eq!(d.reason.policy(), Some("no-ssh"));
    assert_eq!(
        s.custom_checks(Some(&partner), 22, &Addresses::default(), None)
            .len(),
        1
    );
    let d = s.decide(&id("spiffe://example.org/x"), 22);
    assert_eq!((d.allowed, d.reason.policy()), (false, Some("no-ssh")));
    // Only `not_principals`, with the default allow: "everyone but ops" is everyone.
    let s = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"ops-only\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "from = { not_principals = [\"spiffe://example.org/ops\"] }\n",
    ));
    assert!(!s.decide(&partner, 1).allowed);
    assert!(s.decide(&id("spiffe://example.org/ops"), 1).allowed);
    // The audit index follows the same rule.
    let s = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"watch\"\naction = \"AUDIT\"\n[[policy.rules]]\n",
    ));
    assert_eq!(s.decide(&partner, 1).audit.as_deref(), Some("watch"));
}

#[test]
fn not_principals_exclude() {
    let s = set(concat!(
        "[[policy]]\nname = \"all-but-b\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/ns/*\"], not_principals = [\"spiffe://example.org/ns/b/*\"] }\n",
    ));
    assert!(s.decide(&id("spiffe://example.org/ns/a/x"), 1).allowed);
    assert!(!s.decide(&id("spiffe://example.org/ns/b/x"), 1).allowed);
}

#[test]
fn audit_marks_and_changes_nothing() {
    let s = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"watch-foo\"\naction = \"AUDIT\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/foo\"] }\n",
    ));
    let d = s.decide(&id("spiffe://example.org/foo"), 1);
    assert!(d.allowed);
    assert_eq!(d.audit.as_deref(), Some("watch-foo"));
    assert_eq!(d.kind(), "audit");
    let d = s.decide(&id("spiffe://example.org/bar"), 1);
    assert_eq!(
        (d.audit, d.reason),
        (None, Reason::Default(DefaultAction::Allow))
    );
}

#[test]
fn dry_run_reports_without_enforcing() {
    let s = set(concat!(
        "[[policy]]\nname = \"all\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "[[policy]]\nname = \"try-deny\"\naction = \"DENY\"\ndry_run = true\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/foo\"] }\n",
    ));
    let d = s.decide(&id("spiffe://example.org/foo"), 1);
    assert!(d.allowed, "dry-run is not enforced");
    let shadow = d.dry_run.expect("dry run reported");
    assert!(!shadow.allowed);
    assert_eq!(shadow.reason.policy(), Some("try-deny"));
    assert!(
        s.decide(&id("spiffe://example.org/bar"), 1)
            .dry_run
            .is_none()
    );
}

#[test]
fn custom_policies_are_listed_for_the_caller_once_per_provider() {
    let s = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"ext\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n",
        "to = { ports = [8080] }\n",
        "[[policy]]\nname = \"ext2\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n",
    ));
    assert!(s.has_custom());
    let foo = id("spiffe://example.org/foo");
    let c = s.custom_checks(Some(&foo), 8080, &Addresses::default(), None);
    assert_eq!(
        c,
        vec![CustomCheck {
            policy: Arc::from("ext"),
            provider: Arc::from("opa")
        }]
    );
    assert_eq!(
        s.custom_checks(Some(&foo), 9, &Addresses::default(), None)[0]
            .policy
            .as_ref(),
        "ext2"
    );
    // CUSTOM does not take part in decide(): the default applies.
    assert!(s.decide(&foo, 8080).allowed);
}

#[test]
fn targets_select_the_destination_workload() {
    let p = |name: &str, targets: &str| {
        NamedPolicy::from_json(
            name,
            &format!(r#"{{"action":"DENY","targets":[{targets}],"rules":[{{}}]}}"#),
        )
        .unwrap()
    };
    let policies = vec![
        p("to-db", r#""spiffe://example.org/db""#),
        p("to-web", r#""spiffe://example.org/web/*""#),
    ];
    let db = PolicySet::for_workload(
        &id("spiffe://example.org/db"),
        DefaultAction::Allow,
        &policies,
    )
    .unwrap();
    assert_eq!(db.len(), 1);
    assert_eq!(
        db.decide(&id("spiffe://example.org/x"), 1).reason.policy(),
        Some("to-db")
    );
    let other = PolicySet::for_workload(
        &id("spiffe://example.org/cache"),
        DefaultAction::Allow,
        &policies,
    )
    .unwrap();
    assert!(other.is_empty());
    assert!(other.decide(&id("spiffe://example.org/x"), 1).allowed);
}

#[test]
fn new_fields_are_validated_by_name() {
    let cases = [
        (r#"{"action":"CUSTOM"}"#, "provider"),
        (r#"{"action":"CUSTOM","provider":"a b"}"#, "provider"),
        (r#"{"action":"ALLOW","provider":"opa"}"#, "provider"),
        (
            r#"{"action":"ALLOW","targets":["spiffe://example.org"]}"#,
            "targets[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{"from":{"not_principals":["x"]}}]}"#,
            "rules[0].from.not_principals[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{"to":{"methods":["get"]}}]}"#,
            "rules[0].to.methods[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{},{"to":{"paths":["admin"]}}]}"#,
            "rules[1].to.paths[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{"to":{"not_paths":["/a*b*"]}}]}"#,
            "rules[0].to.not_paths[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{"to":{"hosts":["http://x/"]}}]}"#,
            "rules[0].to.hosts[0]",
        ),
        (
            r#"{"action":"ALLOW","rules":[{"to":{"hosts":["a.example","b.example."]}}]}"#,
            "rules[0].to.hosts[1]",
        ),
    ];
    for (doc, field) in cases {
        let e = NamedPolicy::from_json("p1", doc).unwrap_err();
        assert_eq!(
            (e.policy.as_str(), e.field.as_str()),
            ("p1", field),
            "{doc}: {e}"
        );
    }
    assert!(NamedPolicy::from_json("p1", r#"{"action":"ALLOW","oops":1}"#).is_err());
}

#[test]
fn documents_round_trip_through_json() {
    let json = r#"{"action":"CUSTOM","rules":[{"from":{"principals":["*"],"not_principals":["spiffe://example.org/x"]},"to":{"ports":[80],"methods":["GET"],"paths":["/p*"]}}],"targets":["spiffe://example.org/db"],"provider":"opa","dry_run":true}"#;
    let p = NamedPolicy::from_json("rt", json).unwrap();
    assert_eq!(p.to_json(), json);
    assert_eq!(NamedPolicy::from_json("rt", &p.to_json()).unwrap(), p);
}

fn addrs(src: &str, dst: &str) -> Addresses {
    Addresses {
        source: Some(src.parse().unwrap()),
        destination: Some(dst.parse().unwrap()),
    }
}

/// Copies of a header are one value joined with `,` (Istio/Envoy): a caller cannot satisfy an
/// ALLOW's value, or escape a DENY's `not_values`, by adding a copy beside the one a trusted hop
/// set.
#[test]
fn duplicate_headers_are_matched_as_one_joined_value() {
    let s = set(concat!(
        "[[policy]]\nname = \"tenant-a\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "when = [{ key = \"request.headers[x-tenant]\", values = [\"tenant-a\"] }]\n",
        "[[policy]]\nname = \"verdict\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "when = [{ key = \"request.headers[x-verdict]\", not_values = [\"ok\"] }]\n",
    ));
    let foo = id("spiffe://example.org/foo");
    let req = |headers: &'static [(&'static str, &'static str)]| HttpRequest {
        method: "GET",
        path: "/",
        host: "h",
        headers,
    };
    let at = addrs("198.18.0.1", "198.18.0.2");
    let d = |r: &HttpRequest<'_>| s.decide_request(Some(&foo), 80, &at, Some(r));
    let ok: &[(&str, &str)] = &[("x-tenant", "tenant-a"), ("x-verdict", "ok")];
    assert!(d(&req(ok)).allowed);
    let two_tenants: &[(&str, &str)] = &[
        ("x-tenant", "tenant-b"),
        ("X-Tenant", "tenant-a"),
        ("x-verdict", "ok"),
    ];
    assert_eq!(d(&req(two_tenants)).reason, Reason::NoAllowMatch);
    let two_verdicts: &[(&str, &str)] = &[
        ("x-tenant", "tenant-a"),
        ("x-verdict", "ok"),
        ("x-verdict", "denied"),
    ];
    assert_eq!(d(&req(two_verdicts)).reason.policy(), Some("verdict"));
}

#[test]
fn when_conditions_narrow_rules() {
    let s = set(concat!(
        "[[policy]]\nname = \"tenant-a\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/foo\"] }\n",
        "when = [{ key = \"request.headers[X-Tenant]\", values = [\"a\", \"team-*\"] },\n",
        "        { key = \"source.ip\", values = [\"198.18.0.0/15\", \"2001:db8::/32\"], not_values = [\"198.18.0.9\"] }]\n",
        "[[policy]]\nname = \"no-port-9\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "when = [{ key = \"destination.port\", values = [\"9\"] }, { key = \"destination.ip\", not_values = [\"10.0.0.0/8\"] }]\n",
    ));
    let foo = id("spiffe://example.org/foo");
    let hdr = |v: &'static str| HttpRequest {
        method: "GET",
        path: "/",
        host: "h",
        headers: Box::leak(Box::new([("x-tenant", v)])),
    };
    let at = addrs("198.18.0.1", "198.18.0.2");
    let d =
        |port, a: &Addresses, r: Option<&HttpRequest<'_>>| s.decide_request(Some(&foo), port, a, r);
    assert!(d(80, &at, Some(&hdr("a"))).allowed);
    assert!(d(80, &at, Some(&hdr("team-blue"))).allowed);
    assert!(
        !d(80, &at, Some(&hdr("b"))).allowed,
        "header value not listed"
    );
    // IPv6 networks, and IPv4 clients seen as IPv4-mapped IPv6.
    assert!(d(80, &addrs("2001:db8::7", "::1"), Some(&hdr("a"))).allowed);
    assert!(d(80, &addrs("::ffff:198.18.0.3", "::1"), Some(&hdr("a"))).allowed);
    assert!(
        !d(80, &addrs("198.18.0.9", "198.18.0.2"), Some(&hdr("a"))).allowed,
        "not_values"
    );
    assert!(!d(80, &addrs("203.0.113.1", "198.18.0.2"), Some(&hdr("a"))).allowed);
    // Unknown attributes: the ALLOW with a header condition does not open TCP, nor does one
    // with an address condition when the address is not known.
    assert_eq!(d(80, &at, None).reason, Reason::NoAllowMatch);
    assert_eq!(
        d(80, &Addresses::default(), Some(&hdr("a"))).reason,
        Reason::NoAllowMatch
    );
    // The DENY on port 9 applies except towards 10/8; an unknown destination address counts as
    // matching for a DENY (fail closed).
    assert_eq!(
        d(9, &at, Some(&hdr("a"))).reason.policy(),
        Some("no-port-9")
    );
    assert!(d(9, &addrs("198.18.0.1", "10.1.2.3"), Some(&hdr("a"))).allowed);
    assert_eq!(
        d(9, &Addresses::default(), None).reason.policy(),
        Some("no-port-9")
    );
}

#[test]
fn bad_when_conditions_name_the_field() {
    let cases = [
        (
            "{ key = \"source.port\", values = [\"1\"] }",
            "rules[0].when[0].key",
            "not a condition key",
        ),
        (
            "{ key = \"request.headers[]\", values = [\"1\"] }",
            "rules[0].when[0].key",
            "header field name",
        ),
        (
            "{ key = \"request.headers[a b]\", values = [\"1\"] }",
            "rules[0].when[0].key",
            "header field name",
        ),
        (
            "{ key = \"source.ip\" }",
            "rules[0].when[0]",
            "values or not_values",
        ),
        (
            "{ key = \"source.ip\", values = [\"198.18.0.1/15\"] }",
            "rules[0].when[0].values[0]",
            "host bits",
        ),
        (
            "{ key = \"source.ip\", values = [\"10.0.0.0/33\"] }",
            "rules[0].when[0].values[0]",
            "0..=32",
        ),
        (
            "{ key = \"destination.ip\", not_values = [\"example.com\"] }",
            "rules[0].when[0].not_values[0]",
            "an IP address",
        ),
        (
            "{ key = \"destination.port\", values = [\"0\"] }",
            "rules[0].when[0].values[0]",
            "1..=65535",
        ),
        (
            "{ key = \"request.headers[x]\", values = [\"a*b\"] }",
            "rules[0].when[0].values[0]",
            "`*`",
        ),
    ];
    for (cond, field, msg) in cases {
        let text = format!(
            "[[policy]]\nname = \"p\"\naction = \"ALLOW\"\n[[policy.rules]]\nwhen = [{cond}]\n"
        );
        let e = PolicySet::from_toml(td("example.org"), &text).unwrap_err();
        assert_eq!(e.policy, "p", "{cond}");
        assert_eq!(e.field, field, "{cond}: {e}");
        assert!(e.message.contains(msg), "{cond}: {e}");
    }
    // And a stored JSON document is checked the same way.
    let e = NamedPolicy::from_json(
        "j",
        r#"{"action":"DENY","rules":[{"when":[{"key":"nope","values":["1"]}]}]}"#,
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].when[0].key");
}

#[test]
fn selector_targets_cover_workloads_with_every_selector() {
    let p = NamedPolicy::from_json(
        "payments-only",
        r#"{"action":"DENY","rules":[{}],"targets":["spiffe://example.org/svc/*"],"selectors":["k8s:ns:payments","unix:uid:1000"]}"#,
    )
    .unwrap();
    let local = td("example.org");
    let sel = |l: &[&str]| -> BTreeSet<Selector> {
        l.iter().map(|s| Selector::parse(s).unwrap()).collect()
    };
    let svc = id("spiffe://example.org/svc/a");
    let both = sel(&["k8s:ns:payments", "unix:uid:1000", "unix:gid:5"]);
    assert!(p.applies_to(&svc, &local, Some(&both)));
    assert!(
        !p.applies_to(&svc, &local, Some(&sel(&["k8s:ns:payments"]))),
        "one selector missing"
    );
    assert!(
        !p.applies_to(&id("spiffe://example.org/db"), &local, Some(&both)),
        "targets and selectors both apply"
    );
    // Matched already by the agent that sent it.
    assert!(p.applies_to(&svc, &local, None));
    // Mesh-wide without either.
    let all = NamedPolicy::from_json("all", r#"{"action":"DENY","rules":[{}]}"#).unwrap();
    assert!(all.applies_to(&svc, &local, Some(&BTreeSet::new())));
    // A bad selector names the field; a local policy file cannot target by selector.
    let e =
        NamedPolicy::from_json("bad", r#"{"action":"DENY","selectors":["nocolon"]}"#).unwrap_err();
    assert_eq!(e.field, "selectors[0]");
    let e = PolicySet::from_toml_for_workload(
        &svc,
        "[[policy]]\nname = \"s\"\naction = \"DENY\"\nselectors = [\"k8s:ns:x\"]\n",
        DefaultAction::Deny,
    )
    .unwrap_err();
    assert_eq!((e.policy.as_str(), e.field.as_str()), ("s", "selectors"));
}

#[test]
fn documents_parse_from_yaml_and_json_and_name_what_is_wrong() {
    let yaml = "- name: a\n  action: ALLOW\n  rules: [{from: {principals: [\"*\"]}}]\n- name: b\n  action: DENY\n";
    let ps = parse_documents(yaml).unwrap();
    assert_eq!(
        ps.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(),
        ["a", "b"]
    );
    let one = parse_documents(r#"{"name":"c","action":"AUDIT"}"#).unwrap();
    assert_eq!(one[0].document.action, Action::Audit);
    assert!(parse_documents("[]").unwrap().is_empty());
    assert!(parse_documents("").unwrap().is_empty());
    for (text, policy, field) in [
        (
            "- name: a\n  action: ALLOW\n- name: a\n  action: DENY\n",
            "a",
            "name",
        ),
        ("- action: ALLOW\n", "#0", "name"),
        ("- name: x\n  action: MAYBE\n", "x", "action"),
        (
            "- name: t\n  action: ALLOW\n  rules: [{from: {principals: 5}}]\n",
            "t",
            "rules[0].from.principals",
        ),
        ("- name: u\n  action: ALLOW\n  colour: red\n", "u", "colour"),
        (
            "- name: y\n  action: DENY\n  rules: [{to: {ports: [0]}}]\n",
            "y",
            "rules[0].to.ports[0]",
        ),
        ("- name: \"bad name\"\n  action: DENY\n", "bad name", "name"),
        ("42", "(document)", "document"),
        ("{not json", "(document)", "document"),
    ] {
        let e = parse_documents(text).unwrap_err();
        assert_eq!(
            (e.policy.as_str(), e.field.as_str()),
            (policy, field),
            "{text}: {e}"
        );
    }
}

#[test]
fn a_caller_without_identity_is_allowed_only_by_name_and_covered_by_every_restriction() {
    // PERMISSIVE mode hands plaintext to policy as a caller without identity (`None`).
    let s = set(concat!(
        "[[policy]]\nname = \"legacy\"\naction = \"ALLOW\"\n",
        "[[policy.rules]]\nfrom = { unauthenticated = true }\nto = { ports = [8080] }\n",
        "[[policy.rules]]\nfrom = { unauthenticated = true }\n",
        "to = { ports = [8081], methods = [\"GET\"], paths = [\"/public/*\"] }\n",
        "when = [{ key = \"source.ip\", values = [\"198.18.0.0/15\"] }]\n",
        "[[policy]]\nname = \"foo\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/foo\"], unauthenticated = true }\n",
        "to = { ports = [9000] }\n",
        "[[policy]]\nname = \"local\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "from = { principals = [\"*\"], not_principals = [\"spiffe://example.org/bad\"] }\n",
        "to = { ports = [7000, 7001, 7002] }\n",
        "[[policy]]\nname = \"no-bad\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/bad\"] }\nto = { ports = [9000, 7001] }\n",
        "[[policy]]\nname = \"no-plaintext\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "from = { unauthenticated = true }\nto = { ports = [7002] }\n",
    ));
    let none = Addresses::default();
    let at = addrs("198.18.0.1", "198.18.0.2");
    let anon =
        |port, a: &Addresses, r: Option<&HttpRequest<'_>>| s.decide_request(None, port, a, r);
    let foo = id("spiffe://example.org/foo");

    // Named by `unauthenticated`: admitted, and the HTTP fields and conditions still narrow it.
    assert_eq!(
        anon(8080, &at, None).reason,
        Reason::AllowedBy {
            policy: Arc::from("legacy"),
            rule: 0
        }
    );
    assert!(anon(8081, &at, Some(&req("GET", "/public/a", "h"))).allowed);
    assert!(!anon(8081, &at, Some(&req("POST", "/public/a", "h"))).allowed);
    assert!(!anon(8081, &at, Some(&req("GET", "/admin", "h"))).allowed);
    assert!(
        !anon(
            8081,
            &addrs("203.0.113.1", "198.18.0.2"),
            Some(&req("GET", "/public/a", "h"))
        )
        .allowed
    );
    // `unauthenticated` alone is for callers without identity only: it opens nothing to an
    // authenticated caller, local or not.
    assert_eq!(s.decide(&foo, 8080).reason, Reason::NoAllowMatch);
    // `*`, `not_principals` and rules for identities never admit a caller without one.
    assert_eq!(anon(7000, &at, None).reason, Reason::NoAllowMatch);
    // With principals too, the rule admits those principals or callers without identity.
    assert!(s.decide(&foo, 9000).allowed);
    // Every DENY rule of the port covers a caller without identity: it may be `bad`, sending
    // plaintext to get past the DENY that names it.
    assert_eq!(anon(9000, &at, None).reason.policy(), Some("no-bad"));
    assert_eq!(anon(7001, &none, None).reason.policy(), Some("no-bad"));
    // A DENY of unauthenticated callers only: plaintext refused, identities untouched.
    assert_eq!(anon(7002, &at, None).reason.policy(), Some("no-plaintext"));
    assert!(s.decide(&foo, 7002).allowed);
    assert_eq!(
        s.decide(&id("spiffe://example.org/bad"), 7000).reason,
        Reason::NoAllowMatch
    );

    // Without ALLOW policies the default decides, for callers without identity too.
    let open = set("default = \"allow\"\n");
    assert!(open.decide_request(None, 1, &none, None).allowed);
    let closed = PolicySet::empty(td("example.org"), DefaultAction::Deny);
    assert_eq!(
        closed.decide_request(None, 1, &none, None).reason,
        Reason::Default(DefaultAction::Deny)
    );
    // CUSTOM and AUDIT are restrictions too: they cover a caller without identity.
    let ext = set(concat!(
        "default = \"allow\"\n",
        "[[policy]]\nname = \"ext\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n",
        "from = { principals = [\"spiffe://example.org/foo\"] }\n",
        "[[policy]]\nname = \"watch\"\naction = \"AUDIT\"\n[[policy.rules]]\n",
        "from = { trust_domains = [\"example.org\"] }\n",
    ));
    assert_eq!(ext.custom_checks(None, 1, &none, None).len(), 1);
    assert_eq!(
        ext.decide_request(None, 1, &none, None).audit.as_deref(),
        Some("watch")
    );
    // Round trip: the field is written only when set, so existing documents keep their JSON.
    let p = parse_documents("name: x\naction: ALLOW\nrules: [{from: {unauthenticated: true}}]\n")
        .unwrap();
    assert!(p[0].to_json().contains("\"unauthenticated\":true"));
    let q = parse_documents("name: y\naction: ALLOW\nrules: [{from: {principals: [\"*\"]}}]\n")
        .unwrap();
    assert!(!q[0].to_json().contains("unauthenticated"));
    let e =
        parse_documents("name: z\naction: ALLOW\nrules: [{from: {unauthenticated: yes-please}}]\n")
            .unwrap_err();
    assert_eq!(e.field, "rules[0].from.unauthenticated", "{e}");
    assert!(e.message.contains("expected a boolean"), "{e}");
    assert!(!e.message.contains("line"), "{e}");
}

#[test]
fn segment_parameters_do_not_pass_a_restriction_nor_widen_a_permission() {
    let s = set(concat!(
        "[[policy]]\nname = \"public\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
        "to = { paths = [\"/public/*\", \"/admin/*\"], not_paths = [\"/admin/keys*\"] }\n",
        "[[policy]]\nname = \"no-admin-users\"\naction = \"DENY\"\n[[policy.rules]]\n",
        "to = { paths = [\"/admin/users*\"] }\n",
    ));
    let foo = id("spiffe://example.org/foo");
    let r = |p| {
        s.decide_request(
            Some(&foo),
            80,
            &Addresses::default(),
            Some(&req("GET", p, "h")),
        )
    };
    // A servlet container routes `/admin;x/users` to `/admin/users`: the DENY still applies.
    assert!(!r("/admin/users").allowed);
    assert_eq!(r("/admin;x/users").reason.policy(), Some("no-admin-users"));
    assert_eq!(
        r("/admin/users;jsessionid=1").reason.policy(),
        Some("no-admin-users")
    );
    // A not_paths exclusion in an ALLOW is a restriction too.
    assert!(!r("/admin/keys").allowed);
    assert_eq!(r("/admin/keys;v=1").reason, Reason::NoAllowMatch);
    // `..;` is a dot-segment once the parameter is dropped: `/public/..;/admin/users` is
    // `/admin/users`, and the ALLOW of `/public/*` does not open it.
    assert_eq!(
        r("/public/..;/admin/users").reason.policy(),
        Some("no-admin-users")
    );
    assert_eq!(r("/public/..;/private").reason, Reason::NoAllowMatch);
    // Parameters that change neither reading's match are fine.
    assert!(r("/public/a;v=1").allowed);
    assert!(r("/admin/settings;v=2").allowed);
}

#[test]
fn a_text_with_no_value_is_refused_as_a_whole_set_and_an_empty_list_empties_it() {
    // A policy sync source's document (or file) is the whole set: a reply with no value, what a
    // broken server or proxy sends, must not read as "no policies" and delete every DENY.
    for text in [
        "",
        " \n\t\n",
        "~",
        "null",
        "Null",
        "# nothing yet\n",
        "---\n",
        "--- ~\n",
    ] {
        let e = parse_set_documents(text).unwrap_err();
        assert_eq!(
            (e.policy.as_str(), e.field.as_str()),
            ("(document)", "document"),
            "{text:?}: {e}"
        );
        assert!(
            e.message.contains("empty") && e.message.contains("`[]`"),
            "{text:?}: {e}"
        );
    }
    for text in ["[]", "[ ]\n", "--- []\n", "# none\n[]\n"] {
        assert!(parse_set_documents(text).unwrap().is_empty(), "{text:?}");
    }
    let one = parse_set_documents("name: a\naction: DENY\nrules: [{}]\n").unwrap();
    assert_eq!(one[0].document.action, Action::Deny);
    // A file given to `tessera policy apply -f` is not a whole set: its own check says "no
    // policy in the file".
    assert!(parse_documents("").unwrap().is_empty());
    assert!(parse_documents("~").unwrap().is_empty());
}

#[test]
fn a_key_written_twice_is_refused_naming_the_policy_and_the_key() {
    // serde_json::Value and serde_yaml_ng keep the last of two keys: DENY here, where a reader
    // keeping the first sees ALLOW.
    for (text, policy, field) in [
        ("name: a\naction: ALLOW\naction: DENY\n", "a", "action"),
        (
            r#"{"name":"a","action":"ALLOW","action":"DENY"}"#,
            "a",
            "action",
        ),
        (
            "- name: a\n  action: ALLOW\n- name: b\n  action: ALLOW\n  rules:\n  - from: {principals: [\"*\"]}\n    from: {principals: [spiffe://example.org/x]}\n",
            "b",
            "rules[0].from",
        ),
        (
            r#"[{"name":"a","action":"ALLOW"},{"rules":[{"to":{"ports":[80],"ports":[81]}}],"name":"b","action":"DENY"}]"#,
            "#1",
            "rules[0].to.ports",
        ),
        ("name: a\nname: b\naction: DENY\n", "a", "name"),
        // Equal values are two keys all the same.
        ("name: a\naction: DENY\naction: DENY\n", "a", "action"),
    ] {
        for parse in [parse_documents, parse_set_documents] {
            let e = parse(text).unwrap_err();
            assert_eq!(
                (e.policy.as_str(), e.field.as_str()),
                (policy, field),
                "{text}: {e}"
            );
            assert!(e.message.contains("twice"), "{text}: {e}");
        }
    }
    // Destination files are read by the same reader.
    let e = destination::parse_documents(
        "name: db\ncidr: 198.18.0.7\ncidr: 198.18.0.8\nspiffe_id: spiffe://example.org/db\n",
    )
    .unwrap_err();
    assert!(e.to_string().contains("cidr"), "{e}");
}

#[test]
fn an_error_about_a_document_repeats_only_the_start_of_a_long_value() {
    // A 3 MB value was repeated whole: a 3 MB line from `tessera policy apply -f`, and a 3 MB
    // log line and sync status on every poll of a source.
    let long = "a".repeat(3 << 20);
    for text in [
        format!(
            "name: p\naction: ALLOW\nrules: [{{from: {{principals: [\"spiffe://example.org/{long}\"]}}}}]\n"
        ),
        format!(
            "name: p\naction: ALLOW\nrules: [{{from: {{principals: [\"spiffe://{long}/x\"]}}}}]\n"
        ),
        // YAML keys have at most 1024 characters: long keys in JSON.
        format!(r#"{{"name":"p","action":"ALLOW","{long}":1}}"#),
        format!(r#"{{"name":"p","action":"ALLOW","{long}":1,"{long}":2}}"#),
        format!("name: \"{long}\"\naction: ALLOW\n"),
        format!("name: p\naction: \"{long}\"\n"),
    ] {
        for parse in [parse_documents, parse_set_documents] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.len() < 1024, "{} bytes: {}", e.len(), &e[..300]);
            assert!(e.contains("bytes cut)"), "{e}");
        }
    }
    let e = parse_documents(&format!(
        "name: p\naction: ALLOW\nrules: [{{from: {{principals: [\"spiffe://example.org/{long}\"]}}}}]\n"
    ))
    .unwrap_err();
    assert_eq!(e.field, "rules[0].from.principals[0]");
    assert!(e.message.starts_with("\"spiffe://example.org/aaa"), "{e}");
}

/// A policy from the policy API (JSON) whose principal is megabytes: the error names it by its
/// start, not whole.
#[test]
fn a_policy_api_document_with_a_huge_value_gets_a_short_error() {
    let long = format!("spiffe://example.org/{}", "a".repeat(3_000_000));
    let doc = format!(r#"{{"action":"ALLOW","rules":[{{"from":{{"principals":["{long}"]}}}}]}}"#);
    let e = NamedPolicy::from_json("big", &doc).unwrap_err().to_string();
    assert!(e.len() < 1024, "{} bytes", e.len());
    assert!(e.contains("spiffe://example.org/aaa"), "{e}");
}

/// A path pattern no normalized request can equal is refused where a policy is written (a
/// document from `policy apply` or a sync source, a local file), but a stored or pushed policy
/// with one (written before the rule) still compiles: otherwise one old policy would leave
/// every upgraded proxy denying all traffic.
#[test]
fn a_pattern_in_a_never_matching_spelling_is_refused_only_where_written() {
    let doc = r#"{"action":"DENY","rules":[{"to":{"paths":["/a//b"]}}]}"#;
    let stored = NamedPolicy::from_json("old", doc).unwrap();
    let e = stored.check_written().unwrap_err();
    assert_eq!(e.field, "rules[0].to.paths[0]");
    assert!(e.to_string().contains("never matches"), "{e}");
    PolicySet::new(td("example.org"), DefaultAction::Deny, &[stored]).unwrap();
    let e = parse_documents("name: old\naction: DENY\nrules:\n  - to: {paths: [\"/a//b\"]}\n")
        .unwrap_err();
    assert_eq!(e.field, "rules[0].to.paths[0]");
    let e = PolicySet::from_toml(
        td("example.org"),
        "[[policy]]\nname = \"f\"\naction = \"DENY\"\n[[policy.rules]]\nto = { paths = [\"/a//b\"] }\n",
    )
    .unwrap_err();
    assert_eq!(e.field, "rules[0].to.paths[0]");
}
