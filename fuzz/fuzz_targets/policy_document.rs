//! Policy documents from arbitrary text: a local policy file (TOML), a document from the admin
//! API (JSON) and `tessera policy apply -f` (YAML) are refused with an error or compiled, never
//! a panic; a compiled set decides for callers with and without identity without one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_policy::{Addresses, NamedPolicy, PolicySet};
use tessera_spiffe::{SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(td) = TrustDomain::new("example.org") else {
        return;
    };
    if let Ok(set) = PolicySet::from_toml(td, text) {
        let addrs = Addresses::default();
        for src in ["spiffe://example.org/a/b", "spiffe://other.org/x"] {
            if let Ok(id) = SpiffeId::parse(src) {
                for port in [1, 80, 8080] {
                    let _ = set.decide_request(Some(&id), port, &addrs, None);
                    let _ = set.custom_checks(Some(&id), port, &addrs, None);
                }
            }
        }
        for port in [1, 80, 8080] {
            let _ = set.decide_request(None, port, &addrs, None);
            let _ = set.custom_checks(None, port, &addrs, None);
        }
    }
    if let Ok(p) = NamedPolicy::from_json("fuzz", text) {
        // A document that was accepted round-trips through its JSON form.
        assert_eq!(NamedPolicy::from_json("fuzz", &p.to_json()).ok(), Some(p));
    }
    let _ = tessera_policy::parse_documents(text);
});
