//! Destination-map lookup, what every intercepted connection does: a map of 10,000 entries (a
//! trust domain's services pushed by the server: /32 addresses with ports, some /24 networks for
//! every port), the indexed lookup against a scan of the ordered entries (the baseline, in the
//! same run), for a destination that is mapped and one that is not.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use tessera_policy::destination::{DestinationDoc, DestinationMap};

fn map(n: u32) -> DestinationMap {
    let entries = (0..n).map(|i| {
        let doc = if i % 100 == 0 {
            DestinationDoc {
                cidr: format!("10.{}.{}.0/24", 100 + i / 25_600, (i / 100) % 256),
                ports: vec![],
                spiffe_id: format!("spiffe://example.org/net/{i}"),
                tunnel_port: None,
            }
        } else {
            DestinationDoc {
                cidr: format!("10.{}.{}.{}", i / 65_536, (i / 256) % 256, i % 256),
                ports: vec![8080, u16::try_from(9000 + i % 100).unwrap()],
                spiffe_id: format!("spiffe://example.org/svc/{i}"),
                tunnel_port: None,
            }
        };
        (format!("d{i}"), doc.check().unwrap())
    });
    DestinationMap::build(entries).unwrap()
}

fn bench(c: &mut Criterion) {
    let m = map(10_000);
    let hit: SocketAddr = "10.0.30.7:8080".parse().unwrap();
    let miss: SocketAddr = "192.0.2.1:443".parse().unwrap();
    assert!(m.lookup(hit).is_some() && m.lookup(miss).is_none());
    assert_eq!(m.lookup(hit), m.lookup_by_scan(hit));
    let mut g = c.benchmark_group("destination_lookup_10k");
    g.bench_function("index/mapped", |b| {
        b.iter(|| m.lookup(std::hint::black_box(hit)))
    });
    g.bench_function("index/unmapped", |b| {
        b.iter(|| m.lookup(std::hint::black_box(miss)))
    });
    g.bench_function("scan/mapped", |b| {
        b.iter(|| m.lookup_by_scan(std::hint::black_box(hit)))
    });
    g.bench_function("scan/unmapped", |b| {
        b.iter(|| m.lookup_by_scan(std::hint::black_box(miss)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
