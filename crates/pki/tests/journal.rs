//! The CA rotation journal driven through a CA's whole life: prepare at half-life, activate at
//! 1/6 left, publish before signing, keep old keys until their last SVID has expired.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_pki::{Journal, JournalEntry, JournalEvent, PkiError, Status, SvidTemplate};
use tessera_spiffe::jwt::{Validation, validate};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_tls::{PeerRole, verify_svid};
use x509_parser::prelude::{FromDer, X509Certificate};

const T0: u64 = 1_750_000_000;
const TTL: u64 = 6000;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn half_life(e: &JournalEntry) -> u64 {
    let (nb, na) = (e.x509.not_before(), e.x509.not_after());
    nb + (na - nb) / 2
}

fn last_sixth(e: &JournalEntry) -> u64 {
    let (nb, na) = (e.x509.not_before(), e.x509.not_after());
    na - (na - nb) / 6
}

fn ids(j: &Journal) -> Vec<(u64, Status)> {
    j.entries().map(|e| (e.id, e.status)).collect()
}

fn bundle_has(b: &Bundle, e: &JournalEntry) -> bool {
    b.x509_authorities().iter().any(|c| c == e.x509.cert_der())
        && b.jwt_authority(e.jwt.kid()) == Some(&e.jwt.public_key())
}

fn svid(j: &Journal, now: u64) -> Vec<u8> {
    let csr = CertificateParams::default()
        .serialize_request(&KeyPair::generate().unwrap())
        .unwrap()
        .der()
        .to_vec();
    let tmpl = SvidTemplate {
        spiffe_id: SpiffeId::parse("spiffe://example.org/web").unwrap(),
        dns_names: vec![],
        ttl_secs: 3600,
    };
    j.active()
        .x509
        .sign_x509_svid(&csr, &tmpl, now)
        .unwrap()
        .cert_der
}

fn verifies(der: &[u8], bundle: &Bundle, now: u64) -> bool {
    verify_svid(
        &[CertificateDer::from(der)],
        bundle,
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
        PeerRole::Client,
    )
    .is_ok()
}

#[test]
fn a_new_journal_has_one_active_authority_in_its_bundle() {
    let j = Journal::new(&td(), T0, TTL).unwrap();
    assert_eq!(ids(&j), [(1, Status::Active)]);
    assert!(j.prepared().is_none());
    assert_eq!(j.active().created_at, T0);
    assert_eq!(j.active().x509.not_after(), T0 + TTL);
    assert_eq!(
        j.active().jwt.not_after(),
        T0 + TTL,
        "both keys end together"
    );
    let b = j.bundle().unwrap();
    assert_eq!(b.trust_domain(), &td());
    assert!(bundle_has(&b, j.active()));
    assert_eq!(
        (b.x509_authorities().len(), b.jwt_authorities().len()),
        (1, 1)
    );
    assert!(matches!(
        Journal::new(&td(), T0, 0),
        Err(PkiError::ZeroTtl { .. })
    ));
}

#[test]
fn rotation_prepares_at_half_life_and_activates_at_one_sixth_left() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let first_gen = j.generation();
    let half = half_life(j.active());
    let sixth = last_sixth(j.active());
    let first_end = j.active().x509.not_after();

    assert_eq!(j.tick(T0 + 1, TTL).unwrap(), []);
    assert_eq!(j.tick(half - 1, TTL).unwrap(), [], "not before half-life");
    assert_eq!(j.generation(), first_gen);

    // Half-life: the successor is prepared and published, but does not sign.
    assert_eq!(
        j.tick(half, TTL).unwrap(),
        [JournalEvent::Prepared { id: 2 }]
    );
    assert_eq!(ids(&j), [(1, Status::Active), (2, Status::Prepared)]);
    assert_eq!(j.active().id, 1);
    assert_ne!(j.generation(), first_gen, "the published keys changed");
    let published = j.bundle().unwrap();
    assert!(
        bundle_has(&published, j.prepared().unwrap()),
        "in the bundle before it signs"
    );
    assert!(bundle_has(&published, j.active()));
    let signed_by_first = svid(&j, half);

    let gen_prepared = j.generation();
    assert_eq!(
        j.tick(half + 1, TTL).unwrap(),
        [],
        "only one prepared at a time"
    );
    assert_eq!(j.tick(sixth - 1, TTL).unwrap(), [], "not before 1/6 left");

    // 1/6 left: the prepared one signs; the old one stays published.
    assert_eq!(
        j.tick(sixth, TTL).unwrap(),
        [JournalEvent::Activated { id: 2 }]
    );
    assert_eq!(ids(&j), [(1, Status::Old), (2, Status::Active)]);
    assert_eq!(
        j.generation(),
        gen_prepared,
        "activation publishes nothing new"
    );
    let bundle = j.bundle().unwrap();
    assert_eq!(
        bundle, published,
        "the same keys, before and after activation"
    );
    let signed_by_second = svid(&j, sixth);
    assert!(
        verifies(&signed_by_second, &published, sixth),
        "the bundle fetched before activation"
    );
    assert!(
        verifies(&signed_by_first, &bundle, sixth),
        "old SVIDs verify until they expire"
    );

    // The old authority leaves the bundle when it expires, not before; by then so has every
    // SVID it signed.
    let events = j.tick(first_end - 1, TTL).unwrap();
    assert!(!events.contains(&JournalEvent::Dropped { id: 1 }));
    let events = j.tick(first_end, TTL).unwrap();
    assert!(
        events.contains(&JournalEvent::Dropped { id: 1 }),
        "{events:?}"
    );
    let bundle = j.bundle().unwrap();
    assert!(
        !bundle
            .x509_authorities()
            .iter()
            .any(|c| c == &published.x509_authorities()[0])
    );
    assert_eq!(j.active().id, 2);
    assert!(!verifies(&signed_by_first, &bundle, first_end));
    assert!(verifies(&signed_by_second, &bundle, first_end - 1));
}

#[test]
fn svids_never_outlive_the_authority_that_signed_them() {
    let j = Journal::new(&td(), T0, 3000).unwrap();
    let der = svid(&j, T0 + 2900);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    assert_eq!(
        cert.validity().not_after.timestamp() as u64,
        j.active().x509.not_after()
    );
}

#[test]
fn a_late_tick_prepares_first_and_activates_only_on_a_later_tick() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let sixth = last_sixth(j.active());
    // The server slept through half-life: the successor must still be published before use.
    assert_eq!(
        j.tick(sixth + 10, TTL).unwrap(),
        [JournalEvent::Prepared { id: 2 }]
    );
    assert_eq!(j.active().id, 1);
    assert_eq!(
        j.tick(sixth + 11, TTL).unwrap(),
        [JournalEvent::Activated { id: 2 }]
    );
}

#[test]
fn an_expired_active_authority_with_no_successor_is_replaced_at_once() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let end = j.active().x509.not_after();
    let events = j.tick(end + 100, TTL).unwrap();
    assert_eq!(
        events,
        [
            JournalEvent::Prepared { id: 2 },
            JournalEvent::Activated { id: 2 },
            JournalEvent::Dropped { id: 1 },
        ]
    );
    assert_eq!(ids(&j), [(2, Status::Active)]);
    assert!(verifies(
        &svid(&j, end + 100),
        &j.bundle().unwrap(),
        end + 100
    ));
}

#[test]
fn an_expired_prepared_successor_is_not_left_active() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.active()), TTL).unwrap();
    // Down for longer than the successor's whole life.
    let far = T0 + 3 * TTL;
    let events = j.tick(far, TTL).unwrap();
    assert_eq!(
        events,
        [
            JournalEvent::Activated { id: 2 },
            JournalEvent::Prepared { id: 3 },
            JournalEvent::Activated { id: 3 },
            JournalEvent::Dropped { id: 1 },
            JournalEvent::Dropped { id: 2 },
        ]
    );
    assert_eq!(ids(&j), [(3, Status::Active)]);
    assert!(j.active().x509.not_after() > far);
}

#[test]
fn a_changed_ttl_applies_to_the_next_authority() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let half = half_life(j.active());
    j.tick(half, 2 * TTL).unwrap();
    assert_eq!(j.prepared().unwrap().x509.not_after(), half + 2 * TTL);
    assert!(matches!(j.tick(half, 0), Err(PkiError::ZeroTtl { .. })));
}

#[test]
fn jwt_svids_minted_by_the_active_key_validate_with_the_bundle() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["db".to_owned()];
    let token = j.active().jwt.mint(&sub, &aud, 300, T0).unwrap();
    let opts = |now| Validation {
        audience: "db",
        now,
        leeway: 0,
    };
    assert_eq!(
        validate(&token, &j.bundle().unwrap(), opts(T0))
            .unwrap()
            .spiffe_id,
        sub
    );

    // After a rotation the old token still validates; a new one comes from the new key.
    j.tick(half_life(j.active()), TTL).unwrap();
    let sixth = last_sixth(j.active());
    j.tick(sixth, TTL).unwrap();
    let token2 = j.active().jwt.mint(&sub, &aud, 300, sixth).unwrap();
    let bundle = j.bundle().unwrap();
    assert_eq!(
        validate(&token2, &bundle, opts(sixth)).unwrap().kid,
        j.active().jwt.kid()
    );
    assert!(validate(&token, &bundle, opts(T0 + 100)).is_ok());
}

#[test]
fn serialization_round_trips_keys_states_and_generation() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.active()), TTL).unwrap();
    j.tick(last_sixth(j.active()), TTL).unwrap();
    j.tick(half_life(j.active()), TTL).unwrap();
    assert_eq!(
        ids(&j),
        [(1, Status::Old), (2, Status::Active), (3, Status::Prepared)]
    );
    let bytes = j.to_bytes();
    let back = Journal::from_bytes(&bytes).unwrap();
    assert_eq!(ids(&back), ids(&j));
    assert_eq!(back.generation(), j.generation());
    assert_eq!(back.trust_domain(), j.trust_domain());
    assert_eq!(back.bundle().unwrap(), j.bundle().unwrap());
    for (a, b) in back.entries().zip(j.entries()) {
        assert_eq!(a.x509.key_pkcs8_der(), b.x509.key_pkcs8_der());
        assert_eq!(a.jwt.key_pkcs8_der(), b.jwt.key_pkcs8_der());
        assert_eq!(a.jwt.not_after(), b.jwt.not_after());
        assert_eq!((a.created_at, a.tainted), (b.created_at, b.tainted));
    }
    // The restored journal carries on where the original was.
    let now = last_sixth(back.active());
    let mut back = back;
    assert_eq!(back.tick(now, TTL).unwrap(), j.tick(now, TTL).unwrap());
    assert!(verifies(&svid(&back, now), &j.bundle().unwrap(), now));
}

#[test]
fn garbage_and_inconsistent_journals_are_refused() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.active()), TTL).unwrap();
    let good: serde_json::Value = serde_json::from_slice(&j.to_bytes()).unwrap();
    let edit = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut v = good.clone();
        f(&mut v);
        Journal::from_bytes(v.to_string().as_bytes())
    };
    let refused = |r: Result<Journal, PkiError>, want: &str| {
        let err = r.unwrap_err();
        assert!(matches!(err, PkiError::Journal(_)), "{err}");
        assert!(err.to_string().contains(want), "want {want:?} in: {err}");
    };

    refused(Journal::from_bytes(b""), "not a journal");
    refused(Journal::from_bytes(b"\xff\x00garbage"), "not a journal");
    refused(Journal::from_bytes(b"{}"), "missing field");
    refused(Journal::from_bytes(&[b'['; 10_000]), "not a journal");
    refused(edit(&|v| v["version"] = 2.into()), "format version 2");
    refused(edit(&|v| v["extra"] = 1.into()), "unknown field");
    refused(
        edit(&|v| v["trust_domain"] = "Bad.Org".into()),
        "trust domain",
    );
    refused(
        edit(&|v| v["trust_domain"] = "other.org".into()),
        "not other.org",
    );
    refused(
        edit(&|v| v["entries"][0]["x509_key"] = "!!".into()),
        "entry 1: `x509_key` is not base64",
    );
    refused(
        edit(&|v| v["entries"][0]["x509_cert"] = "AAAA".into()),
        "entry 1: CA certificate",
    );
    refused(
        edit(&|v| v["entries"][0]["x509_key"] = good["entries"][1]["x509_key"].clone()),
        "does not belong",
    );
    refused(
        edit(&|v| v["entries"][1]["jwt_kid"] = good["entries"][0]["jwt_kid"].clone()),
        "used twice",
    );
    refused(
        edit(&|v| v["entries"][1]["jwt_kid"] = "a b".into()),
        "JWT key ID",
    );
    refused(
        edit(&|v| v["entries"][1]["jwt_key"] = "AAAA".into()),
        "JWT signing key",
    );
    refused(
        edit(&|v| v["entries"][1]["status"] = "active".into()),
        "exactly one active",
    );
    refused(
        edit(&|v| v["entries"][0]["status"] = "prepared".into()),
        "exactly one active",
    );
    refused(
        edit(&|v| v["entries"][1]["status"] = "retired".into()),
        "unknown variant",
    );
    refused(
        edit(&|v| v["entries"][1]["id"] = 1.into()),
        "ids must increase",
    );
    refused(edit(&|v| v["next_id"] = 2.into()), "below next_id");
    refused(edit(&|v| v["generation"] = u64::MAX.into()), "is above");
    refused(
        edit(&|v| {
            v["entries"][0]["status"] = "old".into();
            v["entries"].as_array_mut().unwrap().remove(1);
        }),
        "no active entry",
    );
    refused(
        edit(&|v| v["entries"][0]["id"] = (-1).into()),
        "not a journal",
    );
    assert!(edit(&|_| {}).is_ok());
}
