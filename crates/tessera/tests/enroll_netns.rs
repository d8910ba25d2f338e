//! Node-mode enrollment on the agent's admin socket, with `tessera server`, `tessera agent` and
//! `tessera workload` as processes and real network namespaces: a workload is attached by its
//! namespace (SCM_RIGHTS) and gets the SVIDs of the entries its `netns:name:` (and `attach:`)
//! selectors match, with keys of its own; a caller cannot claim attested selectors; a file that
//! is not a network namespace is refused; the socket is 0600; detach removes the workload; an
//! agent restart keeps the workloads whose namespace still exists and drops the others.
//!
//! Needs root (CI runs as root); skipped with a reason otherwise, failing instead under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use support::netns::{ControlPlane, tessera, wait_until};
use tessera_test_util::netns::{Net, usable};

fn workload(cp: &ControlPlane, args: &[&str]) -> Output {
    tessera()
        .arg("workload")
        .args(args)
        .args(["--output", "json"])
        .env("TESSERA_AGENT_ADMIN_SOCKET", &cp.agent_admin)
        .output()
        .unwrap()
}

fn ok(o: Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn refused(o: Output) -> String {
    assert!(
        !o.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn listed(cp: &ControlPlane) -> Vec<serde_json::Value> {
    ok(workload(cp, &["list"]))["workloads"]
        .as_array()
        .unwrap()
        .clone()
}

fn svids_of(cp: &ControlPlane, id: &str) -> Vec<(String, String)> {
    listed(cp)
        .iter()
        .find(|w| w["id"] == id)
        .map(|w| {
            w["svids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["spiffe_id"].as_str().unwrap().to_owned(),
                        s["key_sha256"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn workloads_are_attached_by_namespace_with_keys_of_their_own() {
    if !usable("workloads_are_attached_by_namespace_with_keys_of_their_own") {
        return;
    }
    let mut cp = ControlPlane::start();
    let mut net = Net::new();
    let w1 = net.node("w1", Ipv4Addr::new(198, 18, 0, 1));
    let w2 = net.node("w2", Ipv4Addr::new(198, 18, 0, 2));
    let gone = net.node("gone", Ipv4Addr::new(198, 18, 0, 3));
    // web: any workload in w1 or w2's namespaces... one entry per namespace, plus one that
    // needs an attach: selector too.
    cp.entry("web", &w1, &[]);
    cp.entry("web", &w2, &[]);
    cp.entry("api", &w2, &["--selector", "attach:app:api"]);
    cp.entry("gone", &gone, &[]);

    // The socket is root's alone.
    let mode = std::fs::metadata(&cp.agent_admin)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let a1 = ok(workload(
        &cp,
        &["attach", "--netns", &format!("/run/netns/{w1}")],
    ));
    let id1 = a1["workload"]["id"].as_str().unwrap().to_owned();
    assert_eq!(a1["workload"]["netns"], w1.as_str());
    let a2 = ok(workload(
        &cp,
        &[
            "attach",
            "--netns",
            &format!("/run/netns/{w2}"),
            "--selector",
            "attach:app:api",
        ],
    ));
    let id2 = a2["workload"]["id"].as_str().unwrap().to_owned();
    assert_ne!(id1, id2);
    let a3 = ok(workload(
        &cp,
        &["attach", "--netns", &format!("/run/netns/{gone}")],
    ));
    let id3 = a3["workload"]["id"].as_str().unwrap().to_owned();

    // SVIDs for the matching entries, each workload with keys of its own.
    wait_until("the enrolled workloads' SVIDs", 20, || {
        svids_of(&cp, &id1).len() == 1 && svids_of(&cp, &id2).len() == 2
    });
    let s1 = svids_of(&cp, &id1);
    let s2 = svids_of(&cp, &id2);
    assert_eq!(s1[0].0, "spiffe://example.org/web");
    let mut ids2: Vec<&str> = s2.iter().map(|s| s.0.as_str()).collect();
    ids2.sort_unstable();
    assert_eq!(
        ids2,
        ["spiffe://example.org/api", "spiffe://example.org/web"]
    );
    let web2 = s2.iter().find(|s| s.0.ends_with("/web")).unwrap();
    assert_ne!(s1[0].1, web2.1, "two workloads of one identity share a key");
    assert_ne!(s2[0].1, s2[1].1);

    // A caller cannot claim what the agent attests; a non-network-namespace is refused.
    let e = refused(workload(
        &cp,
        &[
            "attach",
            "--netns",
            &format!("/run/netns/{w1}"),
            "--selector",
            "unix:uid:0",
        ],
    ));
    assert!(e.contains("only attach: selectors"), "{e}");
    let e = refused(workload(&cp, &["attach", "--netns", "/proc/self/ns/mnt"]));
    assert!(e.contains("not a network namespace"), "{e}");
    let e = refused(workload(&cp, &["attach", "--netns", "/etc/hostname"]));
    assert!(e.contains("not a namespace"), "{e}");
    let e = refused(workload(&cp, &["detach", "--workload", "w-nope"]));
    assert!(e.contains("no enrolled workload"), "{e}");
    assert_eq!(listed(&cp).len(), 3);

    // Detach.
    ok(workload(&cp, &["detach", "--workload", &id1]));
    assert!(listed(&cp).iter().all(|w| w["id"] != id1.as_str()));

    // An agent restart: w2 is restored (same ID), the deleted namespace is dropped.
    net.remove_node(&gone);
    cp.restart_agent();
    let after = listed(&cp);
    let ids: Vec<&str> = after.iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id2.as_str()], "after the restart: {after:?}");
    assert!(!ids.contains(&id3.as_str()));
    wait_until("the restored workload's SVIDs", 20, || {
        svids_of(&cp, &id2).len() == 2
    });
}
