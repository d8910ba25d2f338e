//! Request paths as the proxy's HTTP authorization normalizes them (`tessera_policy::normalize_path`),
//! and decided by a DENY on `/admin/*`: no spelling that an application reads as under
//! `/admin/` (as sent, or with `;params` dropped as servlet containers do) gets past it.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tessera_policy::{Addresses, HttpRequest, PolicySet};
use tessera_spiffe::{SpiffeId, TrustDomain};

const POLICY: &str = r#"
default = "allow"
[[policy]]
name = "no-admin"
action = "DENY"
[[policy.rules]]
to = { paths = ["/admin/*"] }
"#;

fn deny_admin() -> Option<&'static (PolicySet, SpiffeId)> {
    static SET: OnceLock<Option<(PolicySet, SpiffeId)>> = OnceLock::new();
    SET.get_or_init(|| {
        let td = TrustDomain::new("example.org").ok()?;
        let set = PolicySet::from_toml(td, POLICY).ok()?;
        Some((set, SpiffeId::parse("spiffe://example.org/foo").ok()?))
    })
    .as_ref()
}

/// The path as a servlet container routes it: `;params` dropped from every segment, then
/// dot-segments resolved (written independently of the policy crate's own version).
fn servlet_reading(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/').skip(1) {
        match seg.split(';').next().unwrap_or("") {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = tessera_policy::normalize_path(raw) else {
        return;
    };
    if path == "*" {
        return;
    }
    // What policy decided on is what the application receives; an application that normalizes
    // again must land on the same resource, so normalizing is idempotent.
    assert_eq!(
        tessera_policy::normalize_path(&path).as_deref(),
        Ok(path.as_str()),
        "{raw:?}"
    );
    assert!(path.starts_with('/'), "{raw:?} -> {path:?}");
    assert!(!path.contains("//"), "{raw:?} -> {path:?}");
    for seg in path.split('/') {
        assert!(seg != "." && seg != "..", "{raw:?} -> {path:?}");
    }
    let Some((set, foo)) = deny_admin() else {
        return;
    };
    let req = HttpRequest {
        method: "GET",
        path: &path,
        host: "h",
        headers: &[],
    };
    let d = set.decide_request(Some(foo), 80, &Addresses::default(), Some(&req));
    let under_admin = |p: &str| p.starts_with("/admin/");
    if under_admin(&path) || servlet_reading(&path).is_some_and(|p| under_admin(&p)) {
        assert!(!d.allowed, "{raw:?} -> {path:?} passed the DENY on /admin/*");
    }
});
