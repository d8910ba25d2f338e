//! Real TLS 1.3 handshakes on loopback with the SPIFFE verifiers, and x509pop proofs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tessera_spiffe::{BundleSet, SpiffeId};
use tessera_test_util::rcgen::{self, KeyPair};
use tessera_test_util::{Issued, TestCa};
use tessera_tls::x509pop::{self, CHALLENGE_CONTEXT, NodeCertError};
use tessera_tls::{
    ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver, certified_key,
    client_config, peer_spiffe_id, server_config,
};

fn resolver(svid: &Issued) -> Arc<SvidResolver> {
    let key = PrivateKeyDer::Pkcs8(svid.key.clone_key());
    SvidResolver::new(certified_key(svid.chain.clone(), key).unwrap())
}

fn shared(ca: &TestCa) -> tessera_tls::SharedBundles {
    let mut set = BundleSet::new();
    set.insert(ca.bundle()).unwrap();
    Arc::new(ArcSwap::from_pointee(set))
}

/// Runs one handshake and a byte echo; returns (client result, server-seen peer ID).
fn handshake(
    server_svid: &Issued,
    client_svid: Option<&Issued>,
    server_bundles: tessera_tls::SharedBundles,
    client_bundles: tessera_tls::SharedBundles,
    expected: ExpectedPeer,
    mandatory: bool,
) -> (Result<(), String>, Option<SpiffeId>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let scfg = Arc::new(
        server_config(
            resolver(server_svid),
            Arc::new(SpiffeClientVerifier::new(server_bundles, mandatory)),
            &[],
        )
        .unwrap(),
    );
    let server = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(scfg).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 4];
        match tls.read_exact(&mut buf) {
            Ok(()) => {
                let peer = peer_spiffe_id(tls.conn.peer_certificates());
                tls.write_all(&buf).unwrap();
                tls.flush().unwrap();
                peer
            }
            Err(_) => None,
        }
    });
    let ccfg = Arc::new(
        client_config(
            Arc::new(SpiffeServerVerifier::new(client_bundles, expected)),
            client_svid.map(resolver),
            &[],
        )
        .unwrap(),
    );
    let conn =
        rustls::ClientConnection::new(ccfg, ServerName::try_from("tessera.invalid").unwrap())
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    let result = (|| {
        tls.write_all(b"ping").map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"ping");
        Ok(())
    })();
    drop(tls);
    (result, server.join().unwrap())
}

#[test]
fn mutual_tls_with_svids_names_both_peers() {
    let ca = TestCa::new("example.org");
    let server = ca.issue("spiffe://example.org/server");
    let client = ca.issue("spiffe://example.org/client");
    let want = ExpectedPeer::Exact(SpiffeId::parse("spiffe://example.org/server").unwrap());
    let (res, peer) = handshake(&server, Some(&client), shared(&ca), shared(&ca), want, true);
    res.unwrap();
    assert_eq!(peer.unwrap().as_str(), "spiffe://example.org/client");
}

#[test]
fn a_server_with_an_unexpected_id_fails_the_handshake() {
    let ca = TestCa::new("example.org");
    let server = ca.issue("spiffe://example.org/impostor");
    let client = ca.issue("spiffe://example.org/client");
    let want = ExpectedPeer::Exact(SpiffeId::parse("spiffe://example.org/server").unwrap());
    let (res, peer) = handshake(&server, Some(&client), shared(&ca), shared(&ca), want, true);
    assert!(res.is_err());
    assert!(peer.is_none());
}

#[test]
fn a_client_of_a_foreign_ca_or_without_a_certificate_is_refused_when_mandatory() {
    let ca = TestCa::new("example.org");
    let other = TestCa::new("example.org");
    let server = ca.issue("spiffe://example.org/server");
    let foreign = other.issue("spiffe://example.org/client");
    let want = ExpectedPeer::MemberOf(ca.trust_domain.clone());
    let (res, peer) = handshake(
        &server,
        Some(&foreign),
        shared(&ca),
        shared(&ca),
        want.clone(),
        true,
    );
    assert!(res.is_err() && peer.is_none());
    let (res, peer) = handshake(&server, None, shared(&ca), shared(&ca), want.clone(), true);
    assert!(res.is_err() && peer.is_none());
    // Optional client auth: the handshake completes and there is no peer identity.
    let (res, peer) = handshake(&server, None, shared(&ca), shared(&ca), want, false);
    res.unwrap();
    assert!(peer.is_none());
}

#[test]
fn x509pop_verifies_chain_and_possession() {
    // A node CA outside SPIFFE (an enterprise PKI) and a node certificate under it.
    let node_ca_key = KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "node CA");
    let root = p.self_signed(&node_ca_key).unwrap().der().clone();
    let issuer = rcgen::Issuer::new(p, node_ca_key);
    let node_key = KeyPair::generate().unwrap();
    let mut np = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    np.distinguished_name
        .push(rcgen::DnType::CommonName, "node-1");
    np.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let leaf: CertificateDer<'static> = np.signed_by(&node_key, &issuer).unwrap().der().clone();

    let node = x509pop::verify_node_chain(
        std::slice::from_ref(&leaf),
        std::slice::from_ref(&root),
        UnixTime::now(),
    )
    .unwrap();
    assert_eq!(node.subject_cn.as_deref(), Some("node-1"));
    assert_eq!(node.ca_fingerprints, vec![x509pop::sha256_hex(&root)]);
    assert_eq!(node.fingerprint, x509pop::sha256_hex(&leaf));

    let challenge = [7u8; 32];
    let mut msg = CHALLENGE_CONTEXT.to_vec();
    msg.extend_from_slice(&challenge);
    use rcgen::SigningKey as _;
    let sig = node_key.sign(&msg).unwrap();
    x509pop::verify_pop(&leaf, &challenge, &sig).unwrap();
    // A signature over another challenge, or by another key, fails.
    assert_eq!(
        x509pop::verify_pop(&leaf, &[8u8; 32], &sig),
        Err(NodeCertError::Signature)
    );
    let other = KeyPair::generate().unwrap().sign(&msg).unwrap();
    assert_eq!(
        x509pop::verify_pop(&leaf, &challenge, &other),
        Err(NodeCertError::Signature)
    );
    // A node certificate of another CA does not verify; no roots is its own error.
    let stranger = TestCa::new("example.org");
    assert!(matches!(
        x509pop::verify_node_chain(
            std::slice::from_ref(&leaf),
            std::slice::from_ref(stranger.root()),
            UnixTime::now()
        ),
        Err(NodeCertError::Chain(_))
    ));
    assert_eq!(
        x509pop::verify_node_chain(&[leaf], &[], UnixTime::now()),
        Err(NodeCertError::NoRoots)
    );
}

/// Runs `clients.len()` connections against one server config in sequence, each with its own
/// client config; before connection `i`, `between(i)` may change the bundles. Returns each
/// connection's outcome as the client saw it.
fn sequence(
    scfg: Arc<rustls::ServerConfig>,
    clients: Vec<Arc<rustls::ClientConfig>>,
    between: impl Fn(usize),
) -> Vec<Result<rustls::HandshakeKind, String>> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let n = clients.len();
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let (tcp, _) = listener.accept().unwrap();
            let conn = rustls::ServerConnection::new(scfg.clone()).unwrap();
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut buf = [0u8; 4];
            if tls.read_exact(&mut buf).is_ok() {
                let _ = tls.write_all(&buf);
                let _ = tls.flush();
            }
        }
    });
    let mut out = Vec::new();
    for (i, ccfg) in clients.into_iter().enumerate() {
        between(i);
        let conn =
            rustls::ClientConnection::new(ccfg, ServerName::try_from("tessera.invalid").unwrap())
                .unwrap();
        let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
        let r = (|| {
            tls.write_all(b"ping").map_err(|e| e.to_string())?;
            let mut buf = [0u8; 4];
            tls.read_exact(&mut buf).map_err(|e| e.to_string())?;
            // Read on until the server closes, so tickets it may send after the echo arrive.
            let mut rest = Vec::new();
            let _ = tls.read_to_end(&mut rest);
            tls.conn
                .handshake_kind()
                .ok_or_else(|| "no handshake".to_owned())
        })();
        out.push(r);
    }
    server.join().unwrap();
    out
}

#[test]
fn no_session_is_resumed_so_a_ca_removed_from_the_bundle_takes_effect_at_once() {
    // X509-SVID §5: a peer is validated against the bundle as it is now. A resumed handshake
    // (RFC 8446 §2.2) verifies no certificate, so neither side may offer one.
    let ca = TestCa::new("example.org");
    let other = TestCa::new("example.org");
    let server = ca.issue("spiffe://example.org/server");
    let client = ca.issue("spiffe://example.org/client");
    let want = ExpectedPeer::Exact(SpiffeId::parse("spiffe://example.org/server").unwrap());
    let (server_bundles, client_bundles) = (shared(&ca), shared(&ca));
    let scfg = Arc::new(
        server_config(
            resolver(&server),
            Arc::new(SpiffeClientVerifier::new(server_bundles.clone(), true)),
            &[],
        )
        .unwrap(),
    );
    let ccfg = |resume: bool| {
        let mut c = client_config(
            Arc::new(SpiffeServerVerifier::new(
                client_bundles.clone(),
                want.clone(),
            )),
            Some(resolver(&client)),
            &[],
        )
        .unwrap();
        if resume {
            // A client that asks to resume anyway (not one of ours): the server must not.
            c.resumption = rustls::client::Resumption::in_memory_sessions(8);
        }
        Arc::new(c)
    };
    let without_ca = || {
        let mut set = BundleSet::new();
        set.insert(other.bundle()).unwrap();
        Arc::new(set)
    };

    // Client side: our client config, reused; the server's CA leaves the client's bundle.
    let ours = ccfg(false);
    let results = sequence(scfg.clone(), vec![ours.clone(), ours], |i| {
        if i == 1 {
            client_bundles.store(without_ca());
        }
    });
    assert_eq!(results[0], Ok(rustls::HandshakeKind::Full));
    assert!(results[1].is_err(), "{:?}", results[1]);
    client_bundles.store(shared(&ca).load_full());

    // Server side: a client that would resume; the client's CA leaves the server's bundle.
    let resuming = ccfg(true);
    let results = sequence(scfg, vec![resuming.clone(), resuming], |i| {
        if i == 1 {
            server_bundles.store(without_ca());
        }
    });
    assert_eq!(results[0], Ok(rustls::HandshakeKind::Full));
    assert!(results[1].is_err(), "{:?}", results[1]);
}
