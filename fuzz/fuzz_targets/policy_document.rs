//! Policy documents from arbitrary text: a local policy file (TOML), a document from the admin
//! API (JSON) and `tessera policy apply -f` (YAML) are refused with an error or compiled, never
//! a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_policy::{NamedPolicy, PolicySet};
use tessera_spiffe::TrustDomain;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(td) = TrustDomain::new("example.org") else {
        return;
    };
    let _ = PolicySet::from_toml(td, text);
    if let Ok(p) = NamedPolicy::from_json("fuzz", text) {
        // A document that was accepted round-trips through its JSON form.
        assert_eq!(NamedPolicy::from_json("fuzz", &p.to_json()).ok(), Some(p));
    }
    let _ = tessera_policy::parse_documents(text);
});
