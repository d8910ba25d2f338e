//! `tessera destination` against a server in this process: a file of destinations (`-f`, YAML or
//! JSON) is checked whole before anything is sent, applied in order, and listed back in its
//! canonical form; one that clashes with a stored destination is refused, naming it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::{Command, Output};

fn destination(admin: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["destination", "--admin-socket", admin.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap()
}

fn ok(admin: &std::path::Path, args: &[&str]) -> String {
    let o = destination(admin, args);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{args:?}: {}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

fn refused(admin: &std::path::Path, args: &[&str]) -> String {
    let o = destination(admin, args);
    assert!(!o.status.success(), "{args:?} was accepted");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn names(admin: &std::path::Path) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(&ok(admin, &["list", "--output", "json"])).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_of_destinations_is_checked_whole_and_applied() {
    let d = support::start("example.org", |_| {}).await;
    let admin = d.admin_socket.clone();
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };

    // A bad entry anywhere in the file: refused, naming the entry and field; nothing stored.
    let bad = file(
        "bad.yaml",
        "- name: db\n  cidr: 198.18.0.7\n  ports: [5432]\n  spiffe_id: spiffe://example.org/db\n- name: web\n  cidr: 198.18.1.0/16\n  spiffe_id: spiffe://example.org/web\n",
    );
    let e = refused(&admin, &["apply", "-f", &bad]);
    assert!(e.contains("web.cidr"), "{e}");
    assert!(names(&admin).is_empty(), "a bad file changed something");
    // Two entries of the file that claim one address and port.
    let clash = file(
        "clash.json",
        r#"[{"name":"a","cidr":"198.18.0.9","ports":[80,443],"spiffe_id":"spiffe://example.org/a"},
            {"name":"b","cidr":"198.18.0.9/32","ports":[80],"spiffe_id":"spiffe://example.org/b"}]"#,
    );
    let e = refused(&admin, &["create", "-f", &clash]);
    assert!(e.contains(r#""a""#) && e.contains(r#""b""#), "{e}");
    assert!(names(&admin).is_empty());
    // A file and flags together.
    let e = refused(&admin, &["apply", "-f", &bad, "x", "--cidr", "198.18.0.1"]);
    assert!(e.contains("cannot be used with"), "{e}");

    // A good file: applied in order, listed back canonical.
    let good = file(
        "good.yaml",
        "- name: db\n  cidr: 198.18.0.7\n  ports: [5432, 5432]\n  spiffe_id: spiffe://example.org/db\n- name: web\n  cidr: 198.18.1.0/24\n  spiffe_id: spiffe://example.org/web\n  tunnel_port: 15009\n",
    );
    let out: serde_json::Value =
        serde_json::from_str(&ok(&admin, &["create", "-f", &good, "--output", "json"])).unwrap();
    assert_eq!(out.as_array().unwrap().len(), 2, "{out}");
    assert_eq!(names(&admin), ["db", "web"]);
    let db: serde_json::Value = serde_json::from_str(&ok(&admin, &["show", "db"])).unwrap();
    assert_eq!(db["cidr"], "198.18.0.7/32");
    assert_eq!(db["ports"], serde_json::json!([5432]));
    // create again: the names exist.
    let e = refused(&admin, &["create", "-f", &good]);
    assert!(e.contains("db"), "{e}");
    // A file whose second entry is refused: the first is stored, and JSON output says so.
    let half = file(
        "half.yaml",
        "- name: cache\n  cidr: 198.18.0.8\n  spiffe_id: spiffe://example.org/cache\n- name: web\n  cidr: 198.18.1.0/24\n  spiffe_id: spiffe://example.org/web\n",
    );
    let o = destination(&admin, &["create", "-f", &half, "--output", "json"]);
    assert!(!o.status.success());
    let out: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(out[0]["name"], "cache", "{out}");
    assert_eq!(out.as_array().unwrap().len(), 1, "{out}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("\"web\""));
    assert_eq!(names(&admin), ["cache", "db", "web"]);
    ok(&admin, &["delete", "cache"]);

    // A file whose entry clashes with a stored one: the server refuses it, naming both.
    let other = file(
        "other.yaml",
        "name: db2\ncidr: 198.18.0.7\nports: [5432]\nspiffe_id: spiffe://example.org/impostor\n",
    );
    let e = refused(&admin, &["apply", "-f", &other]);
    assert!(e.contains("db2") && e.contains("db"), "{e}");
    assert_eq!(names(&admin), ["db", "web"]);

    // The flags still work alone.
    ok(
        &admin,
        &[
            "apply",
            "cache",
            "--cidr",
            "198.18.0.8",
            "--spiffe-id",
            "spiffe://example.org/cache",
        ],
    );
    assert_eq!(names(&admin), ["cache", "db", "web"]);
    let e = refused(&admin, &["apply", "cache2", "--cidr", "198.18.0.8"]);
    assert!(e.contains("--spiffe-id"), "{e}");
}
