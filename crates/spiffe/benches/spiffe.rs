//! SPIFFE ID parsing and JWT-SVID validation, with raw ECDSA P-256 verification of the same
//! crypto library (aws-lc-rs) as the baseline measured in the same run.
//!
//! Run: `cargo bench -p tessera-spiffe --bench spiffe`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, KeyPair as _, UnparsedPublicKey};
use criterion::{Criterion, criterion_group, criterion_main};
use tessera_spiffe::jwt::{self, Claims, Validation};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_test_util::JwtSigner;

fn id_parsing(c: &mut Criterion) {
    let mut g = c.benchmark_group("spiffe_id");
    g.bench_function("parse_typical", |b| {
        b.iter(|| SpiffeId::parse(black_box("spiffe://prod.example.com/ns/payments/sa/api")))
    });
    let long = format!("spiffe://example.org{}", "/segment-0123456789".repeat(100));
    g.bench_function("parse_2kib", |b| {
        b.iter(|| SpiffeId::parse(black_box(&long)))
    });
    g.finish();
}

fn jwt_validation(c: &mut Criterion) {
    let signer = JwtSigner::new("k1");
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    signer.add_to(&mut bundle);
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["spiffe://example.org/db".to_owned()];
    let now = 1_800_000_000;
    let token = jwt::mint_es256(
        &signer.key,
        "k1",
        &Claims {
            subject: &sub,
            audience: &aud,
            issued_at: now,
            expiry: now + 300,
        },
    )
    .unwrap();
    let opts = Validation {
        audience: "spiffe://example.org/db",
        now,
        leeway: 0,
    };

    // Baseline: one raw ECDSA P-256 SHA-256 verification of the same signed bytes.
    let (signed, sig_b64) = token.rsplit_once('.').unwrap();
    use base64::Engine as _;
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(sig_b64)
        .unwrap();
    let public = signer.key.public_key().as_ref().to_vec();
    let raw = UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, public);
    assert!(raw.verify(signed.as_bytes(), &sig).is_ok());

    let mut g = c.benchmark_group("jwt_svid");
    g.bench_function("baseline_raw_ecdsa_p256_verify", |b| {
        b.iter(|| raw.verify(black_box(signed.as_bytes()), black_box(&sig)))
    });
    g.bench_function("validate_es256", |b| {
        b.iter(|| jwt::validate(black_box(&token), &bundle, opts))
    });
    g.bench_function("mint_es256", |b| {
        b.iter(|| {
            jwt::mint_es256(
                &signer.key,
                "k1",
                &Claims {
                    subject: &sub,
                    audience: &aud,
                    issued_at: now,
                    expiry: now + 300,
                },
            )
        })
    });
    g.finish();
    let _ = SystemRandom::new();
}

criterion_group!(benches, id_parsing, jwt_validation);
criterion_main!(benches);
