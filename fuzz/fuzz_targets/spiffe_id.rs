//! SPIFFE IDs, trust domain names and workload endpoint addresses from arbitrary bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_spiffe::{EndpointAddr, SpiffeId, TrustDomain};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(id) = SpiffeId::parse(s) {
        // A valid ID has one spelling: display round-trips byte for byte.
        assert_eq!(id.as_str(), s);
        assert_eq!(SpiffeId::parse(&id.to_string()).ok(), Some(id.clone()));
        assert!(id.as_str().len() <= 2048);
        let td = id.trust_domain();
        assert!(td.as_str().len() <= 255);
        assert_eq!(td.id_with_path(id.path()).ok(), Some(id));
    }
    let _ = TrustDomain::new(s);
    if let Ok(addr) = EndpointAddr::parse(s) {
        assert_eq!(EndpointAddr::parse(&addr.to_string()).ok(), Some(addr));
    }
});
