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
                    }),
                    to: Some(Target {
                        ports: vec![u16::try_from(1000 + i % 100).unwrap()],
                    }),
                }],
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
