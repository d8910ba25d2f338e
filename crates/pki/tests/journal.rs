//! The CA rotation journal driven through a CA's whole life: prepare at half-life, activate at
//! 1/6 left, publish before signing, keep old keys until their last SVID has expired.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::time::Duration;

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_pki::{
    Journal, JournalEvent, JwtAuthority, Kind, PkiError, Slot, Status, SvidTemplate, X509Authority,
};
use tessera_spiffe::jwt::{Validation, validate};
use tessera_spiffe::{Bundle, SpiffeId, TrustDomain};
use tessera_tls::{PeerRole, verify_svid};
use x509_parser::prelude::{FromDer, X509Certificate};

const T0: u64 = 1_750_000_000;
const TTL: u64 = 6000;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn half_life<A: tessera_pki::Authority>(e: &Slot<A>) -> u64 {
    let (nb, na) = (e.created_at, e.authority.not_after());
    nb + (na - nb) / 2
}

fn last_sixth<A: tessera_pki::Authority>(e: &Slot<A>) -> u64 {
    let (nb, na) = (e.created_at, e.authority.not_after());
    na - (na - nb) / 6
}

fn ids(j: &Journal) -> Vec<(u64, Status)> {
    j.x509().entries().map(|e| (e.id, e.status)).collect()
}

fn jwt_ids(j: &Journal) -> Vec<(u64, Status)> {
    j.jwt().entries().map(|e| (e.id, e.status)).collect()
}

fn bundle_has(b: &Bundle, e: &Slot<X509Authority>) -> bool {
    b.x509_authorities()
        .iter()
        .any(|c| c == e.authority.cert_der())
}

fn bundle_has_jwt(b: &Bundle, e: &Slot<JwtAuthority>) -> bool {
    b.jwt_authority(e.authority.kid()) == Some(&e.authority.public_key())
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
    j.x509()
        .active()
        .authority
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

const X: Kind = Kind::X509;
const J: Kind = Kind::Jwt;

#[test]
fn a_new_journal_has_one_active_authority_of_each_kind_in_its_bundle() {
    let j = Journal::new(&td(), T0, TTL).unwrap();
    assert_eq!(ids(&j), [(1, Status::Active)]);
    assert_eq!(jwt_ids(&j), [(2, Status::Active)]);
    assert!(j.x509().prepared().is_none());
    assert_eq!(j.x509().active().created_at, T0);
    assert_eq!(j.x509().active().authority.not_after(), T0 + TTL);
    assert_eq!(j.jwt().active().authority.not_after(), T0 + TTL);
    let b = j.bundle().unwrap();
    assert_eq!(b.trust_domain(), &td());
    assert!(bundle_has(&b, j.x509().active()));
    assert!(bundle_has_jwt(&b, j.jwt().active()));
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
    let half = half_life(j.x509().active());
    let sixth = last_sixth(j.x509().active());
    let first_end = j.x509().active().authority.not_after();

    assert_eq!(j.tick(T0 + 1, TTL).unwrap(), []);
    assert_eq!(j.tick(half - 1, TTL).unwrap(), [], "not before half-life");
    assert_eq!(j.generation(), first_gen);

    // Half-life: the successors are prepared and published, but do not sign.
    assert_eq!(
        j.tick(half, TTL).unwrap(),
        [
            JournalEvent::Prepared { kind: X, id: 3 },
            JournalEvent::Prepared { kind: J, id: 4 }
        ]
    );
    assert_eq!(ids(&j), [(1, Status::Active), (3, Status::Prepared)]);
    assert_eq!(jwt_ids(&j), [(2, Status::Active), (4, Status::Prepared)]);
    assert_ne!(j.generation(), first_gen, "the published keys changed");
    let published = j.bundle().unwrap();
    assert!(
        bundle_has(&published, j.x509().prepared().unwrap()),
        "in the bundle before it signs"
    );
    assert!(bundle_has_jwt(&published, j.jwt().prepared().unwrap()));
    assert!(bundle_has(&published, j.x509().active()));
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
        [
            JournalEvent::Activated { kind: X, id: 3 },
            JournalEvent::Activated { kind: J, id: 4 }
        ]
    );
    assert_eq!(ids(&j), [(1, Status::Old), (3, Status::Active)]);
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
    assert!(!events.contains(&JournalEvent::Dropped { kind: X, id: 1 }));
    let events = j.tick(first_end, TTL).unwrap();
    assert!(
        events.contains(&JournalEvent::Dropped { kind: X, id: 1 }),
        "{events:?}"
    );
    assert!(events.contains(&JournalEvent::Dropped { kind: J, id: 2 }));
    let bundle = j.bundle().unwrap();
    assert!(
        !bundle
            .x509_authorities()
            .iter()
            .any(|c| c == &published.x509_authorities()[0])
    );
    assert_eq!(j.x509().active().id, 3);
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
        j.x509().active().authority.not_after()
    );
}

#[test]
fn a_late_tick_prepares_first_and_activates_only_on_a_later_tick() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let sixth = last_sixth(j.x509().active());
    // The server slept through half-life: the successor must still be published before use.
    assert_eq!(
        j.tick(sixth + 10, TTL).unwrap(),
        [
            JournalEvent::Prepared { kind: X, id: 3 },
            JournalEvent::Prepared { kind: J, id: 4 }
        ]
    );
    assert_eq!(j.x509().active().id, 1);
    assert_eq!(
        j.tick(sixth + 11, TTL).unwrap(),
        [
            JournalEvent::Activated { kind: X, id: 3 },
            JournalEvent::Activated { kind: J, id: 4 }
        ]
    );
}

#[test]
fn an_expired_active_authority_with_no_successor_is_replaced_at_once() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let end = j.x509().active().authority.not_after();
    let events = j.tick(end + 100, TTL).unwrap();
    assert_eq!(
        events,
        [
            JournalEvent::Prepared { kind: X, id: 3 },
            JournalEvent::Activated { kind: X, id: 3 },
            JournalEvent::Prepared { kind: J, id: 4 },
            JournalEvent::Activated { kind: J, id: 4 },
            JournalEvent::Dropped { kind: X, id: 1 },
            JournalEvent::Dropped { kind: J, id: 2 },
        ]
    );
    assert_eq!(ids(&j), [(3, Status::Active)]);
    assert!(verifies(
        &svid(&j, end + 100),
        &j.bundle().unwrap(),
        end + 100
    ));
}

#[test]
fn an_expired_prepared_successor_is_not_left_active() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.x509().active()), TTL).unwrap();
    // Down for longer than the successor's whole life.
    let far = T0 + 3 * TTL;
    j.tick(far, TTL).unwrap();
    assert_eq!(ids(&j).len(), 1);
    assert_eq!(ids(&j)[0].1, Status::Active);
    assert!(j.x509().active().authority.not_after() > far);
    assert!(j.jwt().active().authority.not_after() > far);
}

#[test]
fn a_changed_ttl_applies_to_the_next_authority() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let half = half_life(j.x509().active());
    j.tick(half, 2 * TTL).unwrap();
    assert_eq!(
        j.x509().prepared().unwrap().authority.not_after(),
        half + 2 * TTL
    );
    assert!(matches!(j.tick(half, 0), Err(PkiError::ZeroTtl { .. })));
}

#[test]
fn jwt_svids_minted_by_the_active_key_validate_with_the_bundle() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["db".to_owned()];
    let token = j
        .jwt()
        .active()
        .authority
        .mint(&sub, &aud, 300, T0)
        .unwrap();
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
    j.tick(half_life(j.jwt().active()), TTL).unwrap();
    let sixth = last_sixth(j.jwt().active());
    j.tick(sixth, TTL).unwrap();
    let token2 = j
        .jwt()
        .active()
        .authority
        .mint(&sub, &aud, 300, sixth)
        .unwrap();
    let bundle = j.bundle().unwrap();
    assert_eq!(
        validate(&token2, &bundle, opts(sixth)).unwrap().kid,
        j.jwt().active().authority.kid()
    );
    assert!(validate(&token, &bundle, opts(T0 + 100)).is_ok());
}

fn self_signed(now: u64, ttl: u64) -> Result<X509Authority, PkiError> {
    X509Authority::self_signed(&td(), now, ttl)
}

#[test]
fn forced_rotation_runs_prepare_activate_taint_revoke_in_order_only() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let first = j.x509().active().authority.subject_key_id().to_owned();
    let before = svid(&j, T0 + 1);
    let rot = |e: PkiError, want: &str| {
        assert!(matches!(e, PkiError::Rotation(_)), "{e}");
        assert!(e.to_string().contains(want), "want {want:?} in: {e}");
    };
    // Out of order: nothing prepared, the active one cannot be tainted or revoked.
    rot(j.activate(X).unwrap_err(), "prepare one first");
    rot(j.taint(X, &first).unwrap_err(), "is active");
    rot(j.revoke(X, &first).unwrap_err(), "is active");
    rot(
        j.taint(X, "ffff").unwrap_err(),
        "no X.509 authority \"ffff\"",
    );

    let g = j.generation();
    let ev = j.prepare(X, T0 + 2, TTL, &mut self_signed).unwrap();
    assert_eq!(ev, [JournalEvent::Prepared { kind: X, id: 3 }]);
    assert!(j.generation() > g, "published");
    let next = j
        .x509()
        .prepared()
        .unwrap()
        .authority
        .subject_key_id()
        .to_owned();
    rot(
        j.prepare(X, T0 + 2, TTL, &mut self_signed).unwrap_err(),
        "already prepared",
    );
    rot(j.taint(X, &next).unwrap_err(), "only prepared");
    assert_eq!(
        j.activate(X).unwrap(),
        [JournalEvent::Activated { kind: X, id: 3 }]
    );
    rot(j.revoke(X, &first).unwrap_err(), "not tainted");
    assert_eq!(
        j.taint(X, &first).unwrap(),
        [JournalEvent::Tainted { kind: X, id: 1 }]
    );
    assert_eq!(j.x509().tainted_ids(), std::slice::from_ref(&first));
    rot(j.taint(X, &first).unwrap_err(), "already tainted");
    // Tainted but still published: SVIDs it signed verify until they are replaced.
    assert!(verifies(&before, &j.bundle().unwrap(), T0 + 3));
    let g = j.generation();
    assert_eq!(
        j.revoke(X, &first).unwrap(),
        [JournalEvent::Revoked { kind: X, id: 1 }]
    );
    assert!(j.generation() > g);
    assert!(j.x509().find(&first).is_none());
    assert!(!verifies(&before, &j.bundle().unwrap(), T0 + 3), "revoked");
    assert!(verifies(&svid(&j, T0 + 3), &j.bundle().unwrap(), T0 + 3));
    // JWT keeps its own rotation: untouched by all of the above.
    assert_eq!(jwt_ids(&j), [(2, Status::Active)]);
}

#[test]
fn a_revoked_jwt_key_leaves_the_bundle_and_its_tokens_fail() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["db".to_owned()];
    let kid = j.jwt().active().authority.kid().to_owned();
    let token = j
        .jwt()
        .active()
        .authority
        .mint(&sub, &aud, 300, T0)
        .unwrap();
    j.prepare(J, T0 + 1, TTL, &mut self_signed).unwrap();
    let new_kid = j.jwt().prepared().unwrap().authority.kid().to_owned();
    assert!(
        j.bundle().unwrap().jwt_authority(&new_kid).is_some(),
        "published before it signs"
    );
    j.activate(J).unwrap();
    j.taint(J, &kid).unwrap();
    assert_eq!(j.jwt().tainted_ids(), std::slice::from_ref(&kid));
    let opts = Validation {
        audience: "db",
        now: T0 + 2,
        leeway: 0,
    };
    assert!(validate(&token, &j.bundle().unwrap(), opts).is_ok());
    j.revoke(J, &kid).unwrap();
    assert!(j.bundle().unwrap().jwt_authority(&kid).is_none());
    assert!(validate(&token, &j.bundle().unwrap(), opts).is_err());
    assert_eq!(ids(&j), [(1, Status::Active)], "X.509 untouched");
}

#[test]
fn serialization_round_trips_keys_states_taint_and_generation() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.x509().active()), TTL).unwrap();
    let sixth = last_sixth(j.x509().active());
    j.tick(sixth, TTL).unwrap();
    j.prepare(X, sixth + 1, TTL, &mut self_signed).unwrap();
    let old = j
        .x509()
        .entries()
        .next()
        .unwrap()
        .authority
        .subject_key_id()
        .to_owned();
    j.taint(X, &old).unwrap();
    assert_eq!(
        ids(&j),
        [(1, Status::Old), (3, Status::Active), (5, Status::Prepared)]
    );
    let bytes = j.to_bytes();
    let back = Journal::from_bytes(&bytes).unwrap();
    assert_eq!(ids(&back), ids(&j));
    assert_eq!(jwt_ids(&back), jwt_ids(&j));
    assert_eq!(back.x509().tainted_ids(), [old]);
    assert_eq!(back.generation(), j.generation());
    assert_eq!(back.trust_domain(), j.trust_domain());
    assert_eq!(back.bundle().unwrap(), j.bundle().unwrap());
    for (a, b) in back.x509().entries().zip(j.x509().entries()) {
        assert_eq!(a.authority.key_pkcs8_der(), b.authority.key_pkcs8_der());
        assert_eq!((a.created_at, a.tainted), (b.created_at, b.tainted));
    }
    for (a, b) in back.jwt().entries().zip(j.jwt().entries()) {
        assert_eq!(a.authority.key_pkcs8_der(), b.authority.key_pkcs8_der());
        assert_eq!(a.authority.not_after(), b.authority.not_after());
    }
    // The restored journal carries on where the original was.
    let now = last_sixth(back.x509().active());
    let mut back = back;
    assert_eq!(back.tick(now, TTL).unwrap(), j.tick(now, TTL).unwrap());
    assert!(verifies(&svid(&back, now), &j.bundle().unwrap(), now));
}

#[test]
fn a_format_1_journal_is_read() {
    let j = Journal::new(&td(), T0, TTL).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&j.to_bytes()).unwrap();
    let x = &v["x509"][0];
    let k = &v["jwt"][0];
    let v1 = serde_json::json!({
        "version": 1, "trust_domain": "example.org", "next_id": 2, "generation": 1,
        "entries": [{
            "id": 1, "status": "active", "created_at": T0, "tainted": false,
            "x509_cert": x["cert"], "x509_key": x["key"],
            "jwt_kid": k["kid"], "jwt_key": k["key"], "jwt_not_after": k["not_after"],
        }]
    });
    let back = Journal::from_bytes(v1.to_string().as_bytes()).unwrap();
    assert_eq!(ids(&back), [(1, Status::Active)]);
    assert_eq!(jwt_ids(&back), [(1, Status::Active)]);
    assert_eq!(back.bundle().unwrap(), j.bundle().unwrap());
}

#[test]
fn garbage_and_inconsistent_journals_are_refused() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    j.tick(half_life(j.x509().active()), TTL).unwrap();
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
    refused(edit(&|v| v["version"] = 3.into()), "format version 3");
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
        edit(&|v| v["x509"][0]["key"] = "!!".into()),
        "X.509 entry 1: `key` is not base64",
    );
    refused(
        edit(&|v| v["x509"][0]["cert"] = "AAAA".into()),
        "X.509 entry 1: CA certificate",
    );
    refused(
        edit(&|v| v["x509"][0]["key"] = good["x509"][1]["key"].clone()),
        "does not belong",
    );
    refused(
        edit(&|v| v["jwt"][1]["kid"] = good["jwt"][0]["kid"].clone()),
        "used twice",
    );
    refused(edit(&|v| v["jwt"][1]["kid"] = "a b".into()), "JWT key ID");
    refused(
        edit(&|v| v["jwt"][1]["key"] = "AAAA".into()),
        "JWT signing key",
    );
    refused(
        edit(&|v| v["x509"][1]["status"] = "active".into()),
        "exactly one active",
    );
    refused(
        edit(&|v| v["x509"][0]["status"] = "prepared".into()),
        "exactly one active",
    );
    refused(
        edit(&|v| v["x509"][1]["status"] = "retired".into()),
        "unknown variant",
    );
    refused(
        edit(&|v| v["x509"][1]["id"] = 1.into()),
        "ids must increase",
    );
    refused(edit(&|v| v["next_id"] = 3.into()), "below next_id");
    refused(edit(&|v| v["generation"] = u64::MAX.into()), "is above");
    refused(
        edit(&|v| {
            v["x509"][0]["status"] = "old".into();
            v["x509"].as_array_mut().unwrap().remove(1);
        }),
        "no active X.509 entry",
    );
    refused(edit(&|v| v["x509"][0]["id"] = (-1).into()), "not a journal");
    assert!(edit(&|_| {}).is_ok());
}

/// An X.509 CA that cannot be made (an upstream down, or one whose end caps every new CA at the
/// active one's end) does not hold up the JWT rotation, is reported, and is tried again after
/// a growing wait rather than at every tick.
#[test]
fn a_stalled_x509_step_lets_the_jwt_rotation_go_on_and_waits_to_retry() {
    let mut j = Journal::new(&td(), T0, TTL).unwrap();
    let half = half_life(j.x509().active());
    let active_end = j.x509().active().authority.not_after();
    let calls = std::cell::Cell::new(0);
    let mut down = |_now: u64, _ttl: u64| -> Result<X509Authority, PkiError> {
        calls.set(calls.get() + 1);
        Err(PkiError::Upstream("the upstream is down".into()))
    };
    let events = j.tick_with(half, TTL, &mut down).unwrap();
    assert_eq!(
        events,
        [JournalEvent::Prepared {
            kind: Kind::Jwt,
            id: 3
        }]
    );
    assert_eq!(
        j.x509_problem(),
        Some(("upstream authority: the upstream is down", 1))
    );
    assert_eq!(j.next_step_in(half), 30, "retried in 30 s, not at once");
    // Not due yet: the upstream is not asked.
    j.tick_with(half + 10, TTL, &mut down).unwrap();
    assert_eq!(calls.get(), 1);
    j.tick_with(half + 30, TTL, &mut down).unwrap();
    assert_eq!((calls.get(), j.x509_problem().map(|p| p.1)), (2, Some(2)));
    assert_eq!(j.next_step_in(half + 30), 60, "the wait doubles");
    // A CA that would end with the active one gains nothing: not prepared.
    let at = half + 90;
    // An upstream whose certificate ends with the active CA.
    let (root, int, key) = tessera_test_util::rcgen_pki(
        |_| {},
        |i| {
            i.not_after =
                time::OffsetDateTime::from_unix_timestamp(i64::try_from(active_end).unwrap())
                    .unwrap();
        },
    );
    let up = tessera_pki::DiskUpstream::from_pem(&int, &key, Some(&root)).unwrap();
    let mut capped = |now: u64, ttl: u64| X509Authority::from_upstream(&td(), now, ttl, &up);
    assert!(j.tick_with(at, TTL, &mut capped).unwrap().is_empty());
    let (why, _) = j.x509_problem().unwrap();
    assert!(why.contains("could not outlive the active one"), "{why}");
    assert!(j.x509().prepared().is_none());
    // Back: prepared, and the problem is gone.
    let at = at + 120;
    let events = j
        .tick_with(at, TTL, &mut |now, ttl| {
            X509Authority::self_signed(&td(), now, ttl)
        })
        .unwrap();
    assert_eq!(
        events,
        [JournalEvent::Prepared {
            kind: Kind::X509,
            id: 4
        }]
    );
    assert_eq!(j.x509_problem(), None);
}
