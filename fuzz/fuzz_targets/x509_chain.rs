//! X509-SVID rules and chain verification on arbitrary certificate chains.
//!
//! Input: a sequence of (2-byte big-endian length, DER) records; the last record is also used as
//! the bundle's root, so webpki's path building runs on fuzzed input too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_spiffe::x509::check_svid_chain;
use tessera_spiffe::{Bundle, validate_svid_chain};
use tessera_tls::{PeerRole, verify_svid};

fuzz_target!(|data: &[u8]| {
    let mut certs = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 && certs.len() < 8 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        certs.push(&body[..take]);
        rest = &body[take..];
    }
    let report = check_svid_chain(&certs);
    assert_eq!(validate_svid_chain(&certs).is_ok(), report.violations.is_empty() && report.spiffe_id.is_some());
    let chain: Vec<CertificateDer<'_>> = certs.iter().map(|c| CertificateDer::from(*c)).collect();
    if let (Some(id), Some(root)) = (report.spiffe_id, certs.last()) {
        let mut bundle = Bundle::new(id.trust_domain());
        if bundle.add_x509_authority(root.to_vec()).is_ok() {
            let _ = verify_svid(&chain, &bundle, UnixTime::since_unix_epoch(std::time::Duration::from_secs(1_800_000_000)), PeerRole::Client);
        }
    }
});
