//! Forced rotation end to end, through the `tessera authority` CLI against a server and agent in
//! this process, watched by a real SPIFFE client (the Rust `spiffe` crate) on the Workload API:
//! prepare → activate → taint (every SVID is replaced at once) → revoke (the old CA leaves the
//! bundle and its SVIDs are refused); out-of-order steps are refused. And the upstream
//! authority: SVIDs under an openssl-made enterprise PKI verify with `openssl verify`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use support::{aki, bundle_of, chain_of, verifies_at};
use tessera_test_util::openssl::{enterprise_pki, openssl_verify};
use tessera_test_util::pem_block;
use tokio_stream::StreamExt as _;

/// Runs `tessera authority ...` against the admin socket; returns (success, stdout, stderr).
async fn authority(admin: &Path, args: &[&str]) -> (bool, String, String) {
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .arg("authority")
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .await
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn ok(admin: &Path, args: &[&str]) -> String {
    let (success, out, err) = authority(admin, args).await;
    assert!(success, "{args:?}: {err}");
    out
}

async fn refused(admin: &Path, args: &[&str], want: &str) {
    let (success, _, err) = authority(admin, args).await;
    assert!(!success, "{args:?} should be refused");
    assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    // Only the error: what the step would have done is not announced for a refused step.
    assert!(err.starts_with("error: "), "{args:?}: {err}");
}

async fn show(admin: &Path, kind: &str) -> serde_json::Value {
    serde_json::from_str(&ok(admin, &[kind, "show", "--output", "json"]).await).unwrap()
}

fn id_with_status(v: &serde_json::Value, status: &str) -> String {
    v["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["status"] == status)
        .unwrap_or_else(|| panic!("no {status} authority in {v}"))["authority_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn taint_replaces_every_svid_at_once_and_revoke_makes_them_fail() {
    let d = support::start("rotate.example", |_| {}).await;
    let admin = d.admin_socket.clone();
    d.entry("/web", 3600).await;
    let client = d.workload_client().await;
    let (mut stream, first) = support::x509_stream(&client).await;
    let old_chain = chain_of(&first);
    let x509 = show(&admin, "x509").await;
    let ca1 = id_with_status(&x509, "active");
    assert_eq!(aki(&old_chain[0]), ca1, "signed by the active CA");
    let jwt_aud = vec!["db".to_owned()];
    let old_token = client.fetch_jwt_token(&jwt_aud, None).await.unwrap();
    let kid1 = id_with_status(&show(&admin, "jwt").await, "active");

    // Out of order: the active CA cannot be tainted or revoked; nothing is prepared to activate.
    refused(
        &admin,
        &["x509", "taint", "--authority-id", &ca1],
        "is active",
    )
    .await;
    refused(
        &admin,
        &["x509", "revoke", "--authority-id", &ca1],
        "is active",
    )
    .await;
    refused(&admin, &["x509", "activate"], "prepare one first").await;
    refused(
        &admin,
        &["x509", "taint", "--authority-id", "00ff"],
        "no X.509 authority",
    )
    .await;

    // prepare: published (the stream gets a bundle with two CAs), signs nothing yet.
    let (_, _, said) = authority(&admin, &["x509", "prepare"]).await;
    assert!(said.contains("signs nothing until"), "explains: {said}");
    let ca2 = id_with_status(&show(&admin, "x509").await, "prepared");
    refused(
        &admin,
        &["x509", "taint", "--authority-id", &ca2],
        "only prepared",
    )
    .await;
    refused(&admin, &["x509", "prepare"], "already prepared").await;
    ok(&admin, &["x509", "activate"]).await;
    refused(
        &admin,
        &["x509", "revoke", "--authority-id", &ca1],
        "not tainted",
    )
    .await;

    // taint: the workload's stream delivers an SVID from the new CA without waiting for
    // half-life (the SVID lives an hour).
    let tainted_at = Instant::now();
    let out = ok(&admin, &["x509", "taint", "--authority-id", &ca1]).await;
    assert!(out.contains("replaces every SVID"), "{out}");
    let fresh = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ctx) = stream.next().await {
            let ctx = ctx.unwrap();
            let chain = chain_of(&ctx);
            if !chain.is_empty() && aki(&chain[0]) == ca2 {
                return ctx;
            }
        }
        panic!("stream ended")
    })
    .await
    .expect("a fresh SVID from the new CA within 20 s of the taint");
    eprintln!(
        "taint → fresh SVID in the workload's stream: {:?}",
        tainted_at.elapsed()
    );
    let new_chain = chain_of(&fresh);
    let bundle_before = bundle_of(&fresh, &d.td);
    assert!(
        verifies_at(&old_chain, &bundle_before, support::now()).is_ok(),
        "tainted, not revoked: still verifies"
    );
    let x509 = show(&admin, "x509").await;
    assert_eq!(x509["authorities"][0]["tainted"], true);

    // revoke: the old CA leaves the bundle, so the old SVID fails everywhere.
    let out = ok(&admin, &["x509", "revoke", "--authority-id", &ca1]).await;
    assert!(out.contains("left the trust bundle"), "{out}");
    let after = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ctx) = stream.next().await {
            let ctx = ctx.unwrap();
            if bundle_of(&ctx, &d.td).x509_authorities().len() == 1 {
                return ctx;
            }
        }
        panic!("stream ended")
    })
    .await
    .expect("a bundle without the revoked CA");
    let bundle = bundle_of(&after, &d.td);
    let err = verifies_at(&old_chain, &bundle, support::now()).unwrap_err();
    assert!(err.contains("unknown issuer"), "{err}");
    verifies_at(&chain_of(&after), &bundle, support::now()).unwrap();
    verifies_at(&new_chain, &bundle, support::now()).unwrap();
    // The agent renewed its own SVID when its CA was tainted: it still gets new SVIDs signed.
    d.entry("/after-revoke", 3600).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(ctx) = stream.next().await {
            if ctx.unwrap().svids().len() == 2 {
                return;
            }
        }
    })
    .await
    .expect("the agent still works after the revoke");

    // JWT: the same steps on the JWT key; a tainted key's cached token is replaced, a revoked
    // key's token no longer validates.
    refused(
        &admin,
        &["jwt", "taint", "--authority-id", &kid1],
        "is active",
    )
    .await;
    ok(&admin, &["jwt", "prepare"]).await;
    let kid2 = id_with_status(&show(&admin, "jwt").await, "prepared");
    ok(&admin, &["jwt", "activate"]).await;
    ok(&admin, &["jwt", "taint", "--authority-id", &kid1]).await;
    let new_token = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let t = client.fetch_jwt_token(&jwt_aud, None).await.unwrap();
            if t != old_token {
                return t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a token from the new key after the taint");
    let header = |t: &str| tessera_spiffe::jwt::parse_unverified(t).unwrap().0.kid;
    assert_eq!(header(&new_token), kid2);
    assert!(client.validate_jwt_token("db", &old_token).await.is_ok());
    ok(&admin, &["jwt", "revoke", "--authority-id", &kid1]).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        while client.validate_jwt_token("db", &old_token).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("ValidateJWTSVID refuses a token of the revoked key");
    assert!(client.validate_jwt_token("db", &new_token).await.is_ok());

    // No upstream here: the upstream steps explain themselves and do nothing.
    let (success, out, _) = authority(&admin, &["upstream", "show"]).await;
    assert!(success && out.contains("self-signed"), "{out}");
    refused(
        &admin,
        &["upstream", "taint", "--authority-id", "aa"],
        "not rotated by Tessera",
    )
    .await;
    d.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn svids_under_an_openssl_enterprise_pki_verify_with_openssl() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = enterprise_pki(pki_dir.path(), "Acme");
    let disk = tessera_server::config::DiskUpstreamConfig {
        cert_chain_path: pki.int_cert.clone(),
        key_path: pki.int_key.clone(),
        bundle_path: Some(pki.root_cert.clone()),
    };
    let d = support::start("acme.example", |cfg| {
        cfg.upstream_authority.disk = Some(disk);
    })
    .await;
    d.entry("/payments", 3600).await;
    let client = d.workload_client().await;
    let (_stream, ctx) = support::x509_stream(&client).await;
    let chain = chain_of(&ctx);
    // leaf → Tessera CA → enterprise intermediate (the root stays out of the chain).
    assert_eq!(chain.len(), 3, "leaf, Tessera CA, enterprise intermediate");
    let root = pem::parse(std::fs::read(&pki.root_cert).unwrap())
        .unwrap()
        .into_contents();
    let bundle = bundle_of(&ctx, &d.td);
    assert_eq!(
        bundle.x509_authorities(),
        [root],
        "the bundle is the enterprise root"
    );
    verifies_at(&chain, &bundle, support::now()).unwrap();
    let pems: Vec<String> = chain.iter().map(|c| pem_block("CERTIFICATE", c)).collect();
    let out = openssl_verify(
        pki_dir.path(),
        &pki.root_cert,
        &pems[1..].concat(),
        &pems[0],
    )
    .unwrap();
    assert!(out.contains(": OK"), "{out}");

    // The upstream and the CA it signed are listed; revoking an upstream-signed CA is refused
    // (it is not in the bundle), with the reason.
    let up = show(&d.admin_socket, "upstream").await;
    assert_eq!(up["upstream"], "disk");
    let x509 = show(&d.admin_socket, "x509").await;
    assert_eq!(x509["authorities"][0]["upstream_signed"], true);
    let ca1 = id_with_status(&x509, "active");
    ok(&d.admin_socket, &["x509", "prepare"]).await;
    ok(&d.admin_socket, &["x509", "activate"]).await;
    ok(&d.admin_socket, &["x509", "taint", "--authority-id", &ca1]).await;
    refused(
        &d.admin_socket,
        &["x509", "revoke", "--authority-id", &ca1],
        "revoke it at the upstream PKI",
    )
    .await;
    d.shutdown().await;
}

#[tokio::test]
async fn a_server_with_broken_upstream_files_does_not_start_and_says_why() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = enterprise_pki(pki_dir.path(), "Acme");
    let other_dir = tempfile::tempdir().unwrap();
    let other = enterprise_pki(other_dir.path(), "Other");
    for (disk, want) in [
        (
            tessera_server::config::DiskUpstreamConfig {
                cert_chain_path: pki.int_cert.clone(),
                key_path: other.int_key.clone(),
                bundle_path: Some(pki.root_cert.clone()),
            },
            "belongs to no certificate",
        ),
        (
            tessera_server::config::DiskUpstreamConfig {
                cert_chain_path: pki.int_cert.clone(),
                key_path: pki.int_key.clone(),
                bundle_path: Some(other.root_cert.clone()),
            },
            "does not reach a root",
        ),
        (
            tessera_server::config::DiskUpstreamConfig {
                cert_chain_path: pki_dir.path().join("missing.pem"),
                key_path: pki.int_key.clone(),
                bundle_path: None,
            },
            "cert_chain_path",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tessera_server::ServerConfig {
            data_dir: dir.path().join("server"),
            bind_address: "127.0.0.1:0".parse().unwrap(),
            health_bind_address: "127.0.0.1:0".parse().unwrap(),
            admin_socket: dir.path().join("admin/admin.sock"),
            upstream_authority: tessera_server::config::UpstreamAuthorityConfig {
                disk: Some(disk),
            },
            ..tessera_server::ServerConfig::default()
        };
        let err = tessera_server::start(cfg).await.unwrap_err().to_string();
        assert!(err.contains("upstream_authority.disk"), "{err}");
        assert!(err.contains(want), "want {want:?} in {err}");
        assert!(!dir.path().join("server").exists(), "nothing created");
    }
}
