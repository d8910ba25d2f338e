//! rustls configurations built from SVIDs and bundles: SPIFFE certificate verifiers for both sides
//! and a certificate resolver whose SVID can be swapped on rotation without touching live
//! connections.
//!
//! Every verifier here ends in [`crate::verify_svid`] (through the memo of chains it already
//! accepted against the same bundle snapshot, [`crate::memo`]); none looks at a certificate by
//! itself.

use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig, SignatureScheme,
};
use tessera_spiffe::{BundleSet, SpiffeId, TrustDomain};

use crate::memo::VerifiedChains;
use crate::{PeerRole, crypto_provider};

/// The handshake-signature half of a verifier, the same for every verifier here: TLS 1.2 is
/// never offered (our configs are TLS 1.3 only), and TLS 1.3 signatures are checked with the
/// provider's algorithms, so the peer proves it holds the key of the certificate it presented.
macro_rules! tls13_only_signatures {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::PeerIncompatible(
                rustls::PeerIncompatible::Tls12NotOffered,
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

/// The peer's chain as one slice, leaf first, as `verify_svid` takes it (borrowing, no copy).
fn chain_of<'a>(
    end_entity: &CertificateDer<'a>,
    intermediates: &[CertificateDer<'a>],
) -> Vec<CertificateDer<'a>> {
    std::iter::once(end_entity)
        .chain(intermediates)
        .cloned()
        .collect()
}

/// Bundles that can be replaced while connections use them (federation refreshes, CA rotation).
pub type SharedBundles = Arc<ArcSwap<BundleSet>>;

/// Which peer identities a client accepts from a server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Exactly this SPIFFE ID: a stale address mapping fails the handshake.
    Exact(SpiffeId),
    /// Any of these IDs.
    AnyOf(Vec<SpiffeId>),
    /// Any ID in this trust domain.
    MemberOf(TrustDomain),
}

impl ExpectedPeer {
    fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::AnyOf(ids) => ids.contains(id),
            Self::MemberOf(td) => id.is_member_of(td),
        }
    }
}

impl fmt::Display for ExpectedPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::AnyOf(ids) => {
                let list: Vec<&str> = ids.iter().map(SpiffeId::as_str).collect();
                write!(f, "one of [{}]", list.join(", "))
            }
            Self::MemberOf(td) => write!(f, "any ID in {td}"),
        }
    }
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    crypto_provider().signature_verification_algorithms
}

fn to_rustls_err(e: &crate::VerifyError) -> Error {
    Error::General(e.to_string())
}

/// Verifies a TLS server's X509-SVID and that its SPIFFE ID is the one expected.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundles: SharedBundles,
    expected: ExpectedPeer,
    algs: WebPkiSupportedAlgorithms,
    memo: VerifiedChains,
}

impl SpiffeServerVerifier {
    pub fn new(bundles: SharedBundles, expected: ExpectedPeer) -> Self {
        Self {
            bundles,
            expected,
            algs: algorithms(),
            memo: VerifiedChains::default(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // The server name is not used: SPIFFE authenticates the peer by the ID in its SVID
        // (X509-SVID §5), not by DNS names, so the expected ID is what we check.
        let chain = chain_of(end_entity, intermediates);
        let bundles = self.bundles.load();
        let id = self
            .memo
            .verify(&chain, &bundles, now, PeerRole::Server)
            .map_err(|e| to_rustls_err(&e))?;
        if !self.expected.allows(&id) {
            return Err(Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// Verifies a TLS client's X509-SVID against the bundle of its own trust domain.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundles: SharedBundles,
    mandatory: bool,
    algs: WebPkiSupportedAlgorithms,
    memo: VerifiedChains,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets a client without a certificate complete the handshake (the
    /// server's node-attestation call needs that); such a connection then has no peer identity.
    pub fn new(bundles: SharedBundles, mandatory: bool) -> Self {
        Self {
            bundles,
            mandatory,
            algs: algorithms(),
            memo: VerifiedChains::default(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        let chain = chain_of(end_entity, intermediates);
        let bundles = self.bundles.load();
        self.memo
            .verify(&chain, &bundles, now, PeerRole::Client)
            .map_err(|e| to_rustls_err(&e))?;
        Ok(ClientCertVerified::assertion())
    }

    tls13_only_signatures!();
}

/// An X509-SVID with its private key, as rustls presents it.
pub fn certified_key(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<CertifiedKey>, Error> {
    let provider = crypto_provider();
    let signing_key = provider.key_provider.load_private_key(key)?;
    Ok(Arc::new(CertifiedKey::new(chain, signing_key)))
}

/// Presents whatever SVID was stored last: rotation swaps it in place, and connections already
/// established keep the one they were made with.
#[derive(Debug)]
pub struct SvidResolver(ArcSwap<CertifiedKey>);

impl SvidResolver {
    pub fn new(initial: Arc<CertifiedKey>) -> Arc<Self> {
        Arc::new(Self(ArcSwap::new(initial)))
    }

    pub fn swap(&self, next: Arc<CertifiedKey>) {
        self.0.store(next);
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl rustls::client::ResolvesClientCert for SvidResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider_arc() -> Arc<CryptoProvider> {
    crypto_provider()
}

/// A TLS 1.3 server config presenting `svid` and verifying client SVIDs with `clients`.
///
/// Session resumption is off, on both sides (see [`client_config`]). A resumed TLS 1.3 handshake
/// (RFC 8446 §2.2) skips certificate verification and carries over the peer's chain from the
/// first one, so a ticket would keep an identity alive after its SVID expired or its CA left the
/// bundle, against X509-SVID §5 (validate against the bundle as it is now). Every handshake
/// verifies the chain against the bundles of that moment instead; the chain check is memoized
/// per bundle snapshot, so what a resumption would save is the key exchange and the signatures.
pub fn server_config(
    svid: Arc<SvidResolver>,
    clients: Arc<SpiffeClientVerifier>,
    alpn: &[&[u8]],
) -> Result<ServerConfig, Error> {
    let mut cfg = ServerConfig::builder_with_provider(provider_arc())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(clients)
        .with_cert_resolver(svid);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
    Ok(cfg)
}

/// A TLS 1.3 client config that verifies the server as `server` and presents `svid` if given.
/// Resumption is off, for the reason given at [`server_config`].
pub fn client_config(
    server: Arc<dyn ServerCertVerifier>,
    svid: Option<Arc<SvidResolver>>,
    alpn: &[&[u8]],
) -> Result<ClientConfig, Error> {
    let builder = ClientConfig::builder_with_provider(provider_arc())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(server);
    let mut cfg = match svid {
        Some(r) => builder.with_client_cert_resolver(r),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(cfg)
}

/// The SPIFFE ID of a peer whose chain a verifier above has already accepted in this handshake.
/// Returns `None` when the peer sent no certificate.
pub fn peer_spiffe_id(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    let certs = certs?;
    tessera_spiffe::validate_svid_chain(certs).ok()
}

/// The end of a certificate's validity (`notAfter`, Unix seconds): how long a connection
/// authorized with it may live (`max_connection_age = "svid"` in the proxy).
pub fn leaf_not_after(leaf: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The serial number of a certificate as lowercase hex of its bytes without leading zero bytes
/// (`"00"` for zero), the form the CA reports and the datastore records for an agent's SVID.
pub fn leaf_serial_hex(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::prelude::FromDer as _;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(leaf).ok()?;
    let raw = cert.raw_serial();
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len());
    let hex: String = raw[start..].iter().map(|b| format!("{b:02x}")).collect();
    Some(if hex.is_empty() { "00".to_owned() } else { hex })
}

/// Accepts a server on first contact WITHOUT verifying its chain, only that it presents an SVID
/// of the expected ID (`insecure_bootstrap = true`). Anyone on the path can impersonate the
/// server during that first connection; the agent warns about it at every start. The bundle the
/// server returns is verified from then on.
#[derive(Debug)]
pub struct InsecureBootstrapVerifier {
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl InsecureBootstrapVerifier {
    pub fn new(expected: SpiffeId) -> Self {
        Self {
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = tessera_spiffe::validate_svid_chain(std::slice::from_ref(end_entity))
            .map_err(|e| Error::General(e.to_string()))?;
        if id != self.expected {
            return Err(Error::General(format!(
                "server presented {id}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    tls13_only_signatures!();
}
