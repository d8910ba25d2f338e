//! X509-SVID chain verification (SPIFFE rules + webpki path validation), with raw ECDSA P-256
//! verification of the same crypto library (aws-lc-rs) as the baseline measured in the same run.
//!
//! Run: `cargo bench -p tessera-tls --bench verify`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use criterion::{Criterion, criterion_group, criterion_main};
use rustls_pki_types::UnixTime;
use tessera_spiffe::validate_svid_chain;
use tessera_test_util::TestCa;
use tessera_tls::{PeerRole, verify_svid};

fn chain_verification(c: &mut Criterion) {
    let ca = TestCa::new("example.org");
    let bundle = ca.bundle();
    let direct = ca.issue("spiffe://example.org/ns/payments/sa/api");
    let via_intermediate = ca
        .intermediate()
        .issue("spiffe://example.org/ns/payments/sa/api");
    let now = UnixTime::now();
    assert!(verify_svid(&direct.chain, &bundle, now, PeerRole::Client).is_ok());
    assert!(verify_svid(&via_intermediate.chain, &bundle, now, PeerRole::Client).is_ok());

    // Baseline: one raw ECDSA P-256 SHA-256 verification (a leaf under the root costs one).
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .unwrap();
    let msg = direct.chain[0].to_vec();
    let sig = key.sign(&rng, &msg).unwrap();
    let raw = UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );

    let mut g = c.benchmark_group("x509_svid");
    g.bench_function("baseline_raw_ecdsa_p256_verify", |b| {
        b.iter(|| raw.verify(black_box(&msg), black_box(sig.as_ref())))
    });
    g.bench_function("spiffe_rules_only", |b| {
        b.iter(|| validate_svid_chain(black_box(&direct.chain)))
    });
    g.bench_function("verify_leaf_under_root", |b| {
        b.iter(|| verify_svid(black_box(&direct.chain), &bundle, now, PeerRole::Client))
    });
    g.bench_function("verify_leaf_via_intermediate", |b| {
        b.iter(|| {
            verify_svid(
                black_box(&via_intermediate.chain),
                &bundle,
                now,
                PeerRole::Client,
            )
        })
    });
    g.finish();
}

/// One TLS 1.3 key exchange as each side of a handshake does it: an ephemeral key pair and one
/// agreement with the peer's share, for every group `crypto_provider()` offers. The handshake
/// rate of the tunnel depends on it; the order of the offered groups follows these figures.
fn key_exchange(c: &mut Criterion) {
    use aws_lc_rs::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey};
    let rng = SystemRandom::new();
    let mut g = c.benchmark_group("key_exchange");
    for (name, alg) in [
        ("x25519", &agreement::X25519),
        ("secp256r1", &agreement::ECDH_P256),
        ("secp384r1", &agreement::ECDH_P384),
    ] {
        let peer = EphemeralPrivateKey::generate(alg, &rng).unwrap();
        let peer_pub = peer.compute_public_key().unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mine = EphemeralPrivateKey::generate(alg, &rng).unwrap();
                let share = mine.compute_public_key().unwrap();
                black_box(share.as_ref().len());
                agreement::agree_ephemeral(
                    mine,
                    UnparsedPublicKey::new(alg, peer_pub.as_ref()),
                    (),
                    |k| {
                        black_box(k.len());
                        Ok(())
                    },
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, chain_verification, key_exchange);
criterion_main!(benches);
