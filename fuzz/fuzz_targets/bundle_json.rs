//! SPIFFE bundles and bundle maps from arbitrary JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_spiffe::{Bundle, BundleSet, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let td = TrustDomain::new("example.org").unwrap();
    if let Ok(bundle) = Bundle::parse(td.clone(), data) {
        // What we write, we read back to the same bundle.
        let again = Bundle::parse(td, bundle.to_json().as_bytes()).expect("own output parses");
        assert_eq!(again, bundle);
    }
    let _ = BundleSet::parse_map(data);
});
