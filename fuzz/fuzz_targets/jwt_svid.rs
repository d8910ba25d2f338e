//! JWT-SVID parsing and validation of arbitrary tokens against a bundle with one key.
#![no_main]

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use libfuzzer_sys::fuzz_target;
use tessera_spiffe::bundle::EcCurve;
use tessera_spiffe::jwt::{self, Validation};
use tessera_spiffe::{Bundle, JwtKey, TrustDomain};

fn bundle() -> &'static Bundle {
    static B: OnceLock<Bundle> = OnceLock::new();
    B.get_or_init(|| {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new()).unwrap();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let mut b = Bundle::new(TrustDomain::new("example.org").unwrap());
        let point = key.public_key().as_ref().to_vec();
        b.add_jwt_authority("k1", JwtKey::Ec { curve: EcCurve::P256, point }).unwrap();
        b
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let _ = jwt::parse_unverified(token);
    // No input can carry a valid signature by our random key, so validation must always fail.
    let opts = Validation { audience: "a", now: 1_800_000_000, leeway: 0 };
    assert!(jwt::validate(token, bundle(), opts).is_err());
});
