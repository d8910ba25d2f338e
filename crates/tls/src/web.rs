//! TLS for the SPIFFE bundle endpoint (SPIFFE Trust Domain and Bundle §5): the one TLS surface
//! that talks to the outside world, not only to Tessera peers, so it follows Mozilla's
//! "intermediate" recommendation — TLS 1.2 and 1.3, ECDHE key exchange, AEAD ciphers only —
//! instead of the TLS 1.3-only mesh configuration of [`crate::crypto_provider`].
//!
//! Both profiles are here:
//! - `https_web` (§5.2.1): the endpoint presents a Web PKI certificate; clients check it against
//!   root CAs (the Mozilla root store, or a private CA's certificates) and the host name.
//! - `https_spiffe` (§5.2.2): the endpoint presents an X509-SVID; clients verify it with
//!   [`crate::SpiffeServerVerifier`] (through [`crate::verify_svid`]) against the bundle of the
//!   endpoint's trust domain and check its SPIFFE ID.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ResolvesServerCert;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Mozilla "intermediate" (server side TLS guidelines, v5.7): TLS 1.3 suites, then TLS 1.2
/// ECDHE suites with AES-GCM or ChaCha20-Poly1305, ECDSA before RSA. The guideline's DHE-RSA
/// suites are left out: rustls has no finite-field DHE, and every client it lists speaks ECDHE.
pub fn web_crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, cipher_suite as cs};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

const WEB_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The bundle endpoint's server configuration: Mozilla intermediate, no client authentication
/// (§5.2: the bundle is public), certificate from `cert` (a fixed Web PKI certificate or the
/// server's rotating SVID resolver).
pub fn bundle_endpoint_server_config(
    cert: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, rustls::Error> {
    let mut cfg = ServerConfig::builder_with_provider(web_crypto_provider())
        .with_protocol_versions(WEB_VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// A fixed certificate chain and key (https_web), as a resolver. Refuses a key that does not
/// belong to the chain's first certificate.
pub fn fixed_cert(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<dyn ResolvesServerCert>, rustls::Error> {
    if chain.is_empty() {
        return Err(rustls::Error::General("no certificate".into()));
    }
    let signing_key = web_crypto_provider().key_provider.load_private_key(key)?;
    let ck = rustls::sign::CertifiedKey::new(chain, signing_key);
    ck.keys_match()?;
    Ok(Arc::new(Fixed(Arc::new(ck))))
}

#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// An https_web client: the endpoint's certificate must chain to `roots` (a private CA's
/// certificates) or, when `None`, to the Mozilla root store, and name the URL's host.
pub fn web_client_config(
    roots: Option<&[CertificateDer<'static>]>,
) -> Result<ClientConfig, rustls::Error> {
    let mut store = RootCertStore::empty();
    match roots {
        Some(certs) => {
            for c in certs {
                store.add(c.clone())?;
            }
        }
        None => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let verifier =
        WebPkiServerVerifier::builder_with_provider(Arc::new(store), web_crypto_provider())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
    let mut cfg = ClientConfig::builder_with_provider(web_crypto_provider())
        .with_protocol_versions(WEB_VERSIONS)?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}

/// An https_spiffe client: `verifier` is a [`crate::SpiffeServerVerifier`] expecting the
/// endpoint's SPIFFE ID; TLS 1.3 as everywhere SVIDs are verified.
pub fn spiffe_client_config(
    verifier: Arc<dyn ServerCertVerifier>,
) -> Result<ClientConfig, rustls::Error> {
    crate::client_config(verifier, None, &[b"http/1.1"])
}
