//! Request paths as the proxy's HTTP authorization normalizes them (`tessera_policy::normalize_path`).
#![no_main]

use libfuzzer_sys::fuzz_target;

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
});
