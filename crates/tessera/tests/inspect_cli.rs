//! The inspection verbs as a user runs them: real process, real files, exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::process::{Command, Output};

use tessera_test_util::rcgen::KeyUsagePurpose;
use tessera_test_util::{TestCa, pem_block, uri_san};

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("run tessera")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn id_check_accepts_valid_ids_and_names_the_broken_rule() {
    let o = tessera(&["id", "check", "spiffe://example.org/ns/web"]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(
        out.contains("trust domain: example.org") && out.contains("path:         /ns/web"),
        "{out}"
    );

    for (id, rule) in [
        ("spiffe://example.org/a/", "trailing `/` at byte 22"),
        ("spiffe://example.org:8080/a", "MUST NOT have a port"),
        ("spiffe://example.org/%41", "percent-encoding at byte 21"),
        ("https://example.org/a", "scheme must be `spiffe://`"),
        ("spiffe://example.org/a/../b", "`.` or `..` path segment"),
    ] {
        let o = tessera(&["id", "check", id]);
        let (_, err) = text(&o);
        assert!(!o.status.success(), "{id} must fail");
        assert!(err.contains(rule), "{id}: {err}");
    }
    let o = tessera(&["id", "check", "--output", "json", "spiffe://example.org/x"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["path"], "/x");
}

#[test]
fn svid_inspect_shows_a_valid_svid_and_verifies_it_against_its_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("example.org");
    let svid = ca
        .intermediate()
        .issue_with("spiffe://example.org/web", |p| {
            p.subject_alt_names
                .push(tessera_test_util::rcgen::SanType::DnsName(
                    "web.example.org".try_into().unwrap(),
                ));
        });
    let pem_path = dir.path().join("svid.pem");
    // A PEM file as written by SVID helpers: the chain and the key; the key is skipped.
    std::fs::write(
        &pem_path,
        svid.chain_pem() + &pem_block("PRIVATE KEY", svid.key.secret_pkcs8_der()),
    )
    .unwrap();
    let bundle_path = dir.path().join("bundle.json");
    std::fs::write(&bundle_path, ca.bundle().to_json()).unwrap();
    let root_pem = dir.path().join("root.pem");
    std::fs::write(&root_pem, pem_block("CERTIFICATE", ca.root())).unwrap();

    let o = tessera(&["svid", "inspect", pem_path.to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}{err}");
    assert!(out.contains("SPIFFE ID: spiffe://example.org/web"), "{out}");
    assert!(out.contains("DNS SAN:     web.example.org"), "{out}");
    assert!(out.contains("key usage:   digitalSignature"), "{out}");
    assert!(out.contains("certificate 1 (signing, CA)"), "{out}");
    assert!(out.contains("X509-SVID rules: all satisfied"), "{out}");

    for bundle in [&bundle_path, &root_pem] {
        let o = tessera(&[
            "svid",
            "inspect",
            pem_path.to_str().unwrap(),
            "--bundle",
            bundle.to_str().unwrap(),
        ]);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}{err}");
        assert!(out.contains("chain verifies against the bundle"), "{out}");
    }

    // DER input: the concatenated chain, as the Workload API carries it.
    let der_path = dir.path().join("svid.der");
    std::fs::write(
        &der_path,
        svid.chain
            .iter()
            .flat_map(|c| c.to_vec())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let o = tessera(&[
        "svid",
        "inspect",
        "--output",
        "json",
        der_path.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(v["certificates"].as_array().unwrap().len(), 2);
    assert_eq!(v["valid"], true);

    // A bundle of another CA: the chain does not verify and the exit code says so.
    let other = TestCa::new("example.org");
    let other_path = dir.path().join("other.json");
    std::fs::write(&other_path, other.bundle().to_json()).unwrap();
    let o = tessera(&[
        "svid",
        "inspect",
        pem_path.to_str().unwrap(),
        "--bundle",
        other_path.to_str().unwrap(),
    ]);
    let (out, _) = text(&o);
    assert!(!o.status.success());
    assert!(out.contains("chain does NOT verify"), "{out}");
}

#[test]
fn svid_inspect_lists_every_rule_a_bad_certificate_breaks() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("example.org");
    let bad = ca.issue_with("spiffe://example.org/a", |p| {
        p.subject_alt_names.push(uri_san("spiffe://example.org/b"));
        p.key_usages.push(KeyUsagePurpose::KeyCertSign);
    });
    let path = dir.path().join("bad.pem");
    std::fs::write(&path, bad.chain_pem()).unwrap();
    let o = tessera(&["svid", "inspect", path.to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(!o.status.success());
    assert!(out.contains("leaf has 2 URI SANs"), "{out}");
    assert!(out.contains("leaf key usage sets keyCertSign"), "{out}");
    assert!(out.contains("URI SAN:     spiffe://example.org/b"), "{out}");
}

#[test]
fn svid_inspect_refuses_unreadable_input_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.der");
    std::fs::write(&garbage, b"\x30\x82\xff\xffnot a certificate").unwrap();
    let keyonly = dir.path().join("key.pem");
    std::fs::write(&keyonly, pem_block("PRIVATE KEY", b"abc")).unwrap();
    let cases = [
        (
            garbage.to_str().unwrap().to_owned(),
            "DER certificate 0 (byte 0): not an X.509 certificate",
        ),
        (keyonly.to_str().unwrap().to_owned(), "no CERTIFICATE block"),
        (
            dir.path().join("missing.pem").to_str().unwrap().to_owned(),
            "cannot read",
        ),
    ];
    for (path, want) in cases {
        let o = tessera(&["svid", "inspect", &path]);
        let (_, err) = text(&o);
        assert!(!o.status.success());
        assert!(err.contains(want), "{path}: {err}");
    }
    let o = tessera(&["svid", "inspect", "--trust-domain", "x.org", "f.pem"]);
    assert!(
        !o.status.success(),
        "--trust-domain without --bundle is refused by the flag parser"
    );
}
