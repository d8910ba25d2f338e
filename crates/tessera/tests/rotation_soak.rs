//! Rotation soak: a workload streaming the Workload API (the Rust `spiffe` crate) stays valid
//! across several automatic CA rotations with no gap — at every moment, the SVID it holds chains
//! to the bundle it holds and has not expired.
//!
//! In CI: CA TTL 60 s, SVID TTL 10 s, three rotations (about 2.5 minutes; the test fails past
//! 4). By hand, longer: `TESSERA_SOAK_ROTATIONS=20 cargo test -p tessera --test rotation_soak
//! -- --nocapture` (about 20 minutes; the limit grows with the count).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use support::{aki, bundle_of, chain_of, not_after, verifies_at};
use tessera_server::config::Secs;
use tokio_stream::StreamExt as _;

const CA_TTL: u64 = 60;
const SVID_TTL: u32 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workloads_stay_valid_across_ca_rotations_with_no_gap() {
    let rotations: usize = std::env::var("TESSERA_SOAK_ROTATIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // First activation at 5/6 of the first CA's life, then one per half-life.
    let limit = Duration::from_secs(CA_TTL * 5 / 6 + (rotations as u64) * CA_TTL / 2 + 60);
    let d = support::start("soak.example", |cfg| {
        cfg.ca.ttl = Secs(CA_TTL);
        cfg.svid.default_x509_ttl = Secs(u64::from(SVID_TTL));
        cfg.svid.default_jwt_ttl = Secs(30);
        cfg.svid.agent_ttl = Secs(30);
        cfg.node_attestation.join_token.default_ttl = Secs(30);
    })
    .await;
    d.entry("/soak", SVID_TTL).await;
    let client = d.workload_client().await;
    let (mut stream, first) = support::x509_stream(&client).await;
    let started = Instant::now();
    let mut held = Some((chain_of(&first), bundle_of(&first, &d.td)));
    let mut cas = BTreeSet::from([aki(&chain_of(&first)[0])]);
    let mut updates = 0u32;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    // A rotation is counted when the workload's SVID comes from a CA it has not seen before.
    while cas.len() < rotations + 1 {
        assert!(
            started.elapsed() < limit,
            "only {} CAs seen in {limit:?}",
            cas.len()
        );
        tokio::select! {
            msg = stream.next() => {
                let ctx = msg.expect("stream open").expect("no error");
                let chain = chain_of(&ctx);
                let bundle = bundle_of(&ctx, &d.td);
                let now = support::now();
                // The new message is consistent in itself ...
                verifies_at(&chain, &bundle, now).unwrap_or_else(|e| {
                    panic!("update {updates}: the SVID does not chain to its own bundle: {e}")
                });
                // ... and arrived while the one before was still valid (no gap).
                if let Some((prev, _)) = &held {
                    assert!(
                        not_after(&prev[0]) > now,
                        "update {updates} came after the previous SVID expired"
                    );
                }
                if cas.insert(aki(&chain[0])) {
                    eprintln!(
                        "{:>4}s: SVID from CA #{} ({})",
                        started.elapsed().as_secs(),
                        cas.len(),
                        aki(&chain[0])
                    );
                }
                updates += 1;
                held = Some((chain, bundle));
            }
            _ = tick.tick() => {
                // Between updates: what the workload holds is valid now.
                if let Some((chain, bundle)) = &held {
                    verifies_at(chain, bundle, support::now()).unwrap_or_else(|e| {
                        panic!(
                            "{}s after start the workload's SVID does not verify against its bundle: {e}",
                            started.elapsed().as_secs()
                        )
                    });
                }
            }
        }
    }
    eprintln!(
        "{rotations} CA rotations, {updates} Workload API updates, no gap, in {:?}",
        started.elapsed()
    );
    d.shutdown().await;
}
