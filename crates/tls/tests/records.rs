//! The record layer against rustls itself: after a real mutual-TLS handshake, one side hands its
//! keys to `tessera_tls::records` and the other stays a rustls connection. Every record each
//! side sends must be read by the other, so the layer speaks TLS 1.3 exactly, KeyUpdate
//! included (rustls derives the next keys with its own code).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::io::{Read, Write};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};
use tessera_spiffe::BundleSet;
use tessera_test_util::{Issued, TestCa};
use tessera_tls::records::{self, HEADER, OVERHEAD, Opened, RecordError, TrafficSecretLog};
use tessera_tls::{
    ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, certified_key,
    server_config,
};

fn resolver(svid: &Issued) -> Arc<SvidResolver> {
    let key = PrivateKeyDer::Pkcs8(svid.key.clone_key());
    SvidResolver::new(certified_key(svid.chain.clone(), key).unwrap())
}

struct Pair {
    c: ClientConnection,
    s: ServerConnection,
    /// The traffic secrets each side's key log captured.
    clog: Arc<TrafficSecretLog>,
    slog: Arc<TrafficSecretLog>,
}

/// A finished handshake between a rustls client and server, in memory, with `suite` (the
/// client offers only it), each with its own traffic secret log.
fn handshake(suite: rustls::SupportedCipherSuite) -> Pair {
    let ca = TestCa::new("example.org");
    let server = ca.issue("spiffe://example.org/server");
    let client = ca.issue("spiffe://example.org/client");
    let mut set = BundleSet::new();
    set.insert(ca.bundle()).unwrap();
    let bundles: tessera_tls::SharedBundles = Arc::new(ArcSwap::from_pointee(set));
    let mut scfg = server_config(
        resolver(&server),
        Arc::new(SpiffeClientVerifier::new(bundles.clone(), true)),
        &[],
    )
    .unwrap();
    scfg.enable_secret_extraction = true;
    scfg.send_tls13_tickets = 0;
    let slog = Arc::new(TrafficSecretLog::default());
    scfg.key_log = slog.clone();
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..(*tessera_tls::crypto_provider()).clone()
    };
    let mut ccfg = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            bundles,
            ExpectedPeer::Exact("spiffe://example.org/server".parse().unwrap()),
        )))
        .with_client_cert_resolver(resolver(&client));
    ccfg.enable_secret_extraction = true;
    let clog = Arc::new(TrafficSecretLog::default());
    ccfg.key_log = clog.clone();
    let mut c = ClientConnection::new(
        Arc::new(ccfg),
        ServerName::try_from("tessera.invalid").unwrap(),
    )
    .unwrap();
    let mut s = ServerConnection::new(Arc::new(scfg)).unwrap();
    for _ in 0..10 {
        let buf = drain(&mut *c);
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        let buf = drain(&mut *s);
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            assert_eq!(c.negotiated_cipher_suite(), Some(suite));
            return Pair { c, s, clog, slog };
        }
    }
    panic!("handshake did not finish");
}

/// Everything `conn` has to send.
fn drain<D>(conn: &mut rustls::ConnectionCommon<D>) -> Vec<u8> {
    let mut buf = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut buf).unwrap();
    }
    buf
}

fn seal(s: &mut records::Sealer, data: &[u8]) -> Vec<u8> {
    let mut rec = vec![0; data.len() + OVERHEAD];
    rec[HEADER..HEADER + data.len()].copy_from_slice(data);
    let n = s.seal_data(&mut rec, data.len()).unwrap();
    rec.truncate(n);
    rec
}

/// Opens every record in `wire`; returns the data and whether close_notify came.
fn open_all(o: &mut records::Opener, wire: Vec<u8>) -> Result<(Vec<u8>, bool), RecordError> {
    open_all_updates(o, wire).map(|(data, closed, _)| (data, closed))
}

/// [`open_all`], and the `request_update` of every KeyUpdate on the way.
fn open_all_updates(
    o: &mut records::Opener,
    mut wire: Vec<u8>,
) -> Result<(Vec<u8>, bool, Vec<bool>), RecordError> {
    let mut data = Vec::new();
    let mut updates = Vec::new();
    let mut at = 0;
    while at < wire.len() {
        match o.open(&mut wire[at..])? {
            Opened::Need(n) => panic!("a record cut short: need {n}"),
            Opened::Data { len, data: r } => {
                data.extend_from_slice(&wire[at + r.start..at + r.end]);
                at += len;
            }
            Opened::KeyUpdate { len, requested } => {
                updates.push(requested);
                at += len;
            }
            Opened::Closed { len } => {
                assert_eq!(at + len, wire.len(), "bytes after close_notify");
                return Ok((data, true, updates));
            }
        }
    }
    Ok((data, false, updates))
}

fn suites() -> Vec<rustls::SupportedCipherSuite> {
    tessera_tls::crypto_provider().cipher_suites.clone()
}

#[test]
fn the_client_side_layer_and_a_rustls_server_read_each_other() {
    for suite in suites() {
        let Pair { c, mut s, clog, .. } = handshake(suite);
        let (mut sealer, mut opener) =
            records::from_secrets(&c.dangerous_extract_secrets().unwrap(), &clog, true).unwrap();

        // Ours → rustls: a small record, a full one, an empty one, then close_notify.
        let big: Vec<u8> = (0..records::MAX_PLAINTEXT)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut wire = seal(&mut sealer, b"hello");
        wire.extend(seal(&mut sealer, &big));
        wire.extend(seal(&mut sealer, b""));
        wire.extend(sealer.close_notify().unwrap());
        let mut rd = &wire[..];
        while !rd.is_empty() {
            s.read_tls(&mut rd).unwrap();
            s.process_new_packets().unwrap();
        }
        let mut got = Vec::new();
        s.reader().read_to_end(&mut got).unwrap(); // Ok only after close_notify
        let mut want = b"hello".to_vec();
        want.extend(&big);
        assert_eq!(got, want, "{suite:?}");

        // rustls → ours: data in rustls's own records (it splits at 2^14), then close_notify.
        let reply: Vec<u8> = (0..40_000).map(|i| (i % 253) as u8).collect();
        s.writer().write_all(&reply).unwrap();
        s.send_close_notify();
        let (data, closed) = open_all(&mut opener, drain(&mut *s)).unwrap();
        assert_eq!(data, reply, "{suite:?}");
        assert!(closed);
    }
}

#[test]
fn the_server_side_layer_and_a_rustls_client_read_each_other() {
    for suite in suites() {
        let Pair { mut c, s, slog, .. } = handshake(suite);
        let (mut sealer, mut opener) =
            records::from_secrets(&s.dangerous_extract_secrets().unwrap(), &slog, false).unwrap();
        c.writer().write_all(b"request").unwrap();
        let (data, closed) = open_all(&mut opener, drain(&mut *c)).unwrap();
        assert_eq!((data.as_slice(), closed), (&b"request"[..], false));

        let wire = seal(&mut sealer, b"response");
        c.read_tls(&mut &wire[..]).unwrap();
        c.process_new_packets().unwrap();
        let mut got = [0u8; 8];
        c.reader().read_exact(&mut got).unwrap();
        assert_eq!(&got, b"response");
    }
}

#[test]
fn a_record_rustls_sealed_and_someone_altered_is_refused() {
    let Pair { c, mut s, clog, .. } = handshake(suites()[0]);
    let (_, mut opener) =
        records::from_secrets(&c.dangerous_extract_secrets().unwrap(), &clog, true).unwrap();
    s.writer().write_all(b"integrity").unwrap();
    let mut wire = drain(&mut *s);
    let last = wire.len() - 1;
    wire[last] ^= 0x80; // a bit of the tag
    assert_eq!(open_all(&mut opener, wire), Err(RecordError::BadMac));
}

/// `data` from ours to rustls `s`, read back through its reader.
fn to_rustls(s: &mut ServerConnection, wire: &[u8], len: usize) -> Vec<u8> {
    let mut rd = wire;
    while !rd.is_empty() {
        s.read_tls(&mut rd).unwrap();
        s.process_new_packets().unwrap();
    }
    let mut got = vec![0; len];
    s.reader().read_exact(&mut got).unwrap();
    got
}

#[test]
fn key_updates_both_ways_with_rustls_in_every_suite() {
    for suite in suites() {
        let Pair { c, mut s, clog, .. } = handshake(suite);
        let (mut sealer, mut opener) =
            records::from_secrets(&c.dangerous_extract_secrets().unwrap(), &clog, true).unwrap();
        for round in 0..3u8 {
            // rustls updates its key (and asks for ours): we follow and read what comes after.
            s.refresh_traffic_keys().unwrap();
            s.writer().write_all(&[round; 100]).unwrap();
            let (data, _, updates) = open_all_updates(&mut opener, drain(&mut *s)).unwrap();
            assert_eq!(data, [round; 100], "{suite:?}");
            assert_eq!(updates, [true], "{suite:?}");

            // We update ours (which answers rustls), asking rustls to update again (§4.6.3):
            // rustls reads our data under the new key, and answers with a KeyUpdate before its
            // next data.
            let mut wire = sealer.key_update(true).unwrap();
            wire.extend(seal(&mut sealer, &[round + 100; 50]));
            assert_eq!(to_rustls(&mut s, &wire, 50), [round + 100; 50], "{suite:?}");
            s.writer().write_all(b"after").unwrap();
            let (data, _, updates) = open_all_updates(&mut opener, drain(&mut *s)).unwrap();
            assert_eq!(data, b"after", "{suite:?}");
            assert_eq!(
                updates,
                [false],
                "rustls answered the request once: {suite:?}"
            );

            // And an update nobody asked to answer.
            let mut wire = sealer.key_update(false).unwrap();
            wire.extend(seal(&mut sealer, b"quiet"));
            assert_eq!(to_rustls(&mut s, &wire, 5), b"quiet", "{suite:?}");
        }
    }
}

#[test]
fn secrets_of_another_connection_or_none_are_refused() {
    let one = handshake(suites()[0]);
    let two = handshake(suites()[0]);
    let secrets = one.c.dangerous_extract_secrets().unwrap();
    // The second connection's secrets do not give the first one's keys.
    assert_eq!(
        records::from_secrets(&secrets, &two.clog, true).err(),
        Some(RecordError::SecretMismatch)
    );
    // The right log, the wrong side: the server's secret is the other direction's.
    let secrets = two.c.dangerous_extract_secrets().unwrap();
    let empty = TrafficSecretLog::default();
    assert_eq!(
        records::from_secrets(&secrets, &empty, true).err(),
        Some(RecordError::NoSecret)
    );
    assert_eq!(
        records::from_secrets(&secrets, &two.slog, false).err(),
        Some(RecordError::SecretMismatch)
    );
}
