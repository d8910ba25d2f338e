//! X509-SVID signing from a CSR on one core, against the crypto ceiling measured in the same run.
//!
//! Signing a CSR costs one ECDSA P-256 verification (the CSR's proof of possession) and one ECDSA
//! P-256 signature (the certificate), so the ceiling is 1 / (t_sign + t_verify) with the raw
//! aws-lc-rs operations below. Target: `sign_x509_svid` reaches at least 50 % of it.
//!
//! Run: `cargo bench -p tessera-pki --bench sign`
#![allow(clippy::unwrap_used, clippy::expect_used)] // bench code: a failed fixture should panic

use std::hint::black_box;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, UnparsedPublicKey};
use criterion::{Criterion, criterion_group, criterion_main};
use rcgen::{CertificateParams, KeyPair};
use tessera_pki::{SvidTemplate, X509Authority};
use tessera_spiffe::{SpiffeId, TrustDomain};

const NOW: u64 = 1_750_000_000;

fn svid_signing(c: &mut Criterion) {
    let td = TrustDomain::new("example.org").unwrap();
    let ca = X509Authority::self_signed(&td, NOW, 86_400).unwrap();
    let csr = CertificateParams::default()
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec();
    let tmpl = SvidTemplate {
        spiffe_id: SpiffeId::parse("spiffe://example.org/ns/payments/sa/api").unwrap(),
        dns_names: vec![],
        ttl_secs: 3600,
    };
    let svid = ca.sign_x509_svid(&csr, &tmpl, NOW).unwrap();

    // Baselines on a message the size of the certificate's signed part.
    let rng = SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref())
        .unwrap();
    let msg = svid.cert_der.clone();
    let sig = key.sign(&rng, &msg).unwrap();
    let public = UnparsedPublicKey::new(
        &signature::ECDSA_P256_SHA256_ASN1,
        key.public_key().as_ref().to_vec(),
    );
    public.verify(&msg, sig.as_ref()).unwrap();

    let mut g = c.benchmark_group("x509_svid_signing");
    g.bench_function("baseline_sign", |b| {
        b.iter(|| key.sign(&rng, black_box(&msg)).unwrap())
    });
    g.bench_function("baseline_verify", |b| {
        b.iter(|| public.verify(black_box(&msg), black_box(sig.as_ref())))
    });
    g.bench_function("sign_x509_svid", |b| {
        b.iter(|| ca.sign_x509_svid(black_box(&csr), &tmpl, NOW).unwrap())
    });
    g.finish();
}

criterion_group!(benches, svid_signing);
criterion_main!(benches);
