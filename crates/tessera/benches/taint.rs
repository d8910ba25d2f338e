//! Forced rotation: time from `tessera authority x509 taint` (the AuthorityApi call) until every
//! workload holds an SVID from the new CA. A server and an agent run in this process; N entries
//! match this process, so one Workload API stream (the Rust `spiffe` crate) carries all N SVIDs.
//! Measured twice per round: until the agent's cache holds N fresh SVIDs, and until the workload's
//! stream delivers a message in which all N are fresh. Each round prepares and activates a new
//! CA, taints the previous one, measures, and revokes it.
//!
//! Run: `cargo bench -p tessera --bench taint` (`TESSERA_BENCH_TAINT_ENTRIES=100,1000` and
//! `TESSERA_BENCH_TAINT_ROUNDS=5` by default).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_proto::v1::authority_api_client::AuthorityApiClient;
use tokio_stream::StreamExt as _;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .map(|s| s.trim().parse().unwrap())
        .collect()
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<58} n={:<3} p50={:>9.3?} max={:>9.3?}",
        v.len(),
        v[v.len() / 2],
        v[v.len() - 1]
    );
}

fn req(id: &str) -> pb::AuthorityRequest {
    pb::AuthorityRequest {
        kind: pb::AuthorityKind::X509 as i32,
        authority_id: id.to_owned(),
    }
}

async fn run(n: usize, rounds: usize) {
    let d = support::start("taint.bench", |_| {}).await;
    for i in 0..n {
        d.entry(&format!("/w/{i}"), 3600).await;
    }
    let mut cache = d.agent.cache.subscribe();
    cache.wait_for(|s| s.identities.len() == n).await.unwrap();
    let client = d.workload_client().await;
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let mut authority = AuthorityApiClient::new(
        tessera_server::client::unix_channel(&d.admin_socket)
            .await
            .unwrap(),
    );
    let (mut at_cache, mut at_stream) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let old = authority
            .get_authority_state(req(""))
            .await
            .unwrap()
            .into_inner();
        let old = old
            .authorities
            .iter()
            .find(|a| a.status == "active")
            .unwrap()
            .authority_id
            .clone();
        // Prepare publishes a new bundle, on which the agent re-signs every SVID (still with the
        // active CA); let that settle before activating, which changes no bundle.
        authority.prepare_authority(req("")).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        while let Ok(Some(_)) =
            tokio::time::timeout(Duration::from_millis(300), stream.next()).await
        {}
        let new = authority
            .activate_authority(req(""))
            .await
            .unwrap()
            .into_inner();
        let new = new
            .state
            .unwrap()
            .authorities
            .iter()
            .find(|a| a.status == "active")
            .unwrap()
            .authority_id
            .clone();
        let fresh_in = |s: &tessera_agent::Snapshot| {
            s.identities.len() == n
                && s.identities
                    .iter()
                    .all(|i| support::aki(&i.chain[0]) == new)
        };
        assert!(
            !fresh_in(&d.agent.cache.current()),
            "nothing re-signed before the taint"
        );
        let t0 = Instant::now();
        authority.taint_authority(req(&old)).await.unwrap();
        let mut cache = d.agent.cache.subscribe();
        let c = async {
            cache.wait_for(|s| fresh_in(s)).await.unwrap();
            t0.elapsed()
        };
        let s = async {
            while let Some(ctx) = stream.next().await {
                let ctx = ctx.unwrap();
                if ctx.svids().len() == n
                    && ctx
                        .svids()
                        .iter()
                        .all(|s| support::aki(s.cert_chain()[0].as_ref()) == new)
                {
                    return t0.elapsed();
                }
            }
            panic!("stream ended");
        };
        let (c, s) = tokio::join!(c, s);
        at_cache.push(c);
        at_stream.push(s);
        authority.revoke_authority(req(&old)).await.unwrap();
    }
    report(
        &format!("taint → {n} SVIDs fresh in the agent cache"),
        at_cache,
    );
    report(
        &format!("taint → {n} SVIDs fresh in the workload's stream"),
        at_stream,
    );
    d.shutdown().await;
}

fn main() {
    let rounds = env_list("TESSERA_BENCH_TAINT_ROUNDS", "5")[0];
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    for n in env_list("TESSERA_BENCH_TAINT_ENTRIES", "100,1000") {
        rt.block_on(run(n, rounds));
    }
}
