//! Policy decision latency with 10,000 rules (target: < 2 µs, ARCHITECTURE.md performance table).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_policy::{
    Action, DefaultAction, NamedPolicy, PolicyDocument, PolicySet, Rule, Source, Target,
};
use tessera_spiffe::{SpiffeId, TrustDomain};

fn bench(c: &mut Criterion) {
    let policies: Vec<NamedPolicy> = (0..10_000u32)
        .map(|i| NamedPolicy {
            name: format!("p{i}"),
            document: PolicyDocument {
                action: if i % 10 == 0 {
                    Action::Deny
                } else {
                    Action::Allow
                },
                rules: vec![Rule {
                    from: Some(Source {
                        principals: vec![
                            format!("spiffe://example.org/ns/{}/sa/{i}", i % 50),
                            format!("spiffe://example.org/team/{i}/*"),
                        ],
                        trust_domains: vec![],
                        ..Source::default()
                    }),
                    to: Some(Target {
                        ports: vec![u16::try_from(8000 + i % 100).unwrap()],
                        ..Target::default()
                    }),
                    when: vec![],
                }],
                targets: vec![],
                selectors: vec![],
                provider: None,
                dry_run: false,
            },
        })
        .collect();
    let set = PolicySet::new(
        TrustDomain::new("example.org").unwrap(),
        DefaultAction::Deny,
        &policies,
    )
    .unwrap();
    let hit = SpiffeId::parse("spiffe://example.org/ns/21/sa/4221").unwrap();
    let prefix = SpiffeId::parse("spiffe://example.org/team/4221/web/frontend").unwrap();
    let miss = SpiffeId::parse("spiffe://example.org/ns/1/sa/unknown").unwrap();
    assert!(set.decide(&hit, 8021).allowed);
    c.bench_function("decide_10k_rules_exact_hit", |b| {
        b.iter(|| set.decide(std::hint::black_box(&hit), 8021))
    });
    c.bench_function("decide_10k_rules_prefix_hit", |b| {
        b.iter(|| set.decide(std::hint::black_box(&prefix), 8021))
    });
    c.bench_function("decide_10k_rules_miss", |b| {
        b.iter(|| set.decide(std::hint::black_box(&miss), 8021))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
