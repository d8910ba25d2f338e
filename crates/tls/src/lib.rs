//! The one place Tessera chooses a rustls `CryptoProvider` and the one place it verifies SPIFFE
//! certificates.
//!
//! Every component that accepts an X509-SVID from outside (the proxy's peers, the server's agents,
//! `tessera svid inspect --bundle`) calls [`verify_svid`]: first the X509-SVID rules of
//! `tessera-spiffe`, then RFC 5280 path validation by webpki to the bundle of the SVID's *own* trust
//! domain. Nothing else in the workspace may look at a peer certificate's SAN to decide identity.

use std::sync::Arc;

pub mod config;
pub mod memo;
pub mod records;
pub mod web;
pub mod x509pop;

pub use config::{
    ExpectedPeer, InsecureBootstrapVerifier, SharedBundles, SpiffeClientVerifier,
    SpiffeServerVerifier, SvidResolver, certified_key, client_config, leaf_not_after,
    leaf_serial_hex, peer_spiffe_id, server_config,
};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_spiffe::{BundleSource, SpiffeId, X509SvidError, validate_svid_chain};

/// The crypto provider for every TLS endpoint Tessera runs: rustls with aws-lc-rs.
///
/// TLS 1.3 cipher suites only, AES-GCM first (hardware accelerated on every server CPU we target),
/// ChaCha20-Poly1305 last. The whole-process default is not touched, so a library that installs
/// its own provider cannot change ours and ours cannot change theirs.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::aws_lc_rs::{self, cipher_suite};
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            cipher_suite::TLS13_AES_128_GCM_SHA256,
            cipher_suite::TLS13_AES_256_GCM_SHA384,
            cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..aws_lc_rs::default_provider()
    })
}

/// Which side of a TLS connection presented the certificate being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// The peer is a TLS client (we are the server).
    Client,
    /// The peer is a TLS server (we are the client).
    Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    #[error("not an X509-SVID: {0}")]
    Svid(#[from] X509SvidError),
    #[error("no trust bundle for trust domain {trust_domain} of {spiffe_id}")]
    NoBundle {
        trust_domain: String,
        spiffe_id: String,
    },
    #[error(
        "the bundle of {trust_domain} has no X.509 authorities, so none of its X509-SVIDs can be trusted (Trust Domain and Bundle §4.1.3)"
    )]
    EmptyBundle { trust_domain: String },
    #[error(
        "X509-SVID of {spiffe_id} does not verify against the bundle of {trust_domain}: {reason}"
    )]
    Chain {
        spiffe_id: String,
        trust_domain: String,
        reason: String,
    },
}

/// Verifies an X509-SVID chain (leaf first; intermediates after it; the root may be omitted) and
/// returns the leaf's SPIFFE ID.
///
/// The chain must satisfy every X509-SVID rule and must verify (RFC 5280 path validation, X509-SVID
/// §5.1) to a CA in the bundle of the leaf's own trust domain, at time `now`. Trusting any other
/// trust domain's roots for this ID would let one trust domain mint identities of another.
pub fn verify_svid(
    chain: &[CertificateDer<'_>],
    bundles: &dyn BundleSource,
    now: UnixTime,
    role: PeerRole,
) -> Result<SpiffeId, VerifyError> {
    let id = validate_svid_chain(chain)?;
    let td = id.trust_domain();
    let bundle = bundles
        .bundle_for(&td)
        .ok_or_else(|| VerifyError::NoBundle {
            trust_domain: td.to_string(),
            spiffe_id: id.to_string(),
        })?;
    let chain_err = |reason: String| VerifyError::Chain {
        spiffe_id: id.to_string(),
        trust_domain: td.to_string(),
        reason,
    };
    let ders: Vec<CertificateDer<'_>> = bundle
        .x509_authorities()
        .iter()
        .map(|d| CertificateDer::from(d.as_slice()))
        .collect();
    let mut anchors = Vec::with_capacity(ders.len());
    // For each anchor, the bundle certificate it came from (to read its SANs below).
    let mut anchor_ders = Vec::with_capacity(ders.len());
    for der in &ders {
        // Authorities were parsed when the bundle was built; one webpki cannot use is skipped
        // rather than trusted, and if none is left we say so below.
        if let Ok(anchor) = webpki::anchor_from_trusted_cert(der) {
            anchors.push(anchor);
            anchor_ders.push(der);
        }
    }
    if anchors.is_empty() {
        return Err(VerifyError::EmptyBundle {
            trust_domain: td.to_string(),
        });
    }
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err(VerifyError::Svid(X509SvidError::EmptyChain));
    };
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| chain_err(describe(&e)))?;
    let usage = match role {
        PeerRole::Client => webpki::KeyUsage::client_auth(),
        PeerRole::Server => webpki::KeyUsage::server_auth(),
    };
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| chain_err(describe(&e)))?;
    // Every CA of the verified path, not only the leaf's issuer: the key of each one vouches for
    // everything below it, so a CA of trust domain A anywhere above a CA without an ID could
    // otherwise mint B's identities through it (when A and B share a root).
    for ca in path.intermediate_certificates() {
        check_ca_names_trust_domain(ca.der().as_ref(), &td).map_err(chain_err)?;
    }
    let anchor_der = anchors
        .iter()
        .position(|a| std::ptr::eq(a, path.anchor()))
        .and_then(|i| anchor_ders.get(i))
        .map_or(&[][..], |d| d.as_ref());
    check_ca_names_trust_domain(anchor_der, &td).map_err(chain_err)?;
    Ok(id)
}

/// A CA in the path of an X509-SVID that carries a SPIFFE ID must carry exactly the ID of the
/// leaf's trust domain (X509-SVID §3.2: a signing certificate's SPIFFE ID, if present, SHOULD
/// reside in the trust domain of the leaves it issues; Tessera makes that a MUST, for every CA
/// of the path, since each one's key can sign the CAs below it).
///
/// Path validation alone only proves the chain reaches a root of the leaf's bundle. When several
/// trust domains' CAs share one enterprise root (an upstream authority), the root is in each of
/// their bundles, so without this rule trust domain A's CA could mint identities of B, directly or
/// through a CA of its own that names no trust domain. Tessera's CAs and SPIRE's carry this SAN.
/// A CA without any SPIFFE ID is accepted: §3.2 makes the ID optional, and other conforming PKIs
/// (federation peers, enterprise roots) issue from such CAs.
fn check_ca_names_trust_domain(
    issuer_der: &[u8],
    td: &tessera_spiffe::TrustDomain,
) -> Result<(), String> {
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(issuer_der) else {
        return Err("a CA certificate of its chain does not parse".into());
    };
    let mut spiffe_ids = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name
                    && uri.starts_with("spiffe://")
                {
                    spiffe_ids.push(*uri);
                }
            }
        }
    }
    let want = td.id();
    match spiffe_ids.as_slice() {
        [one] if *one == want.as_str() => Ok(()),
        [] => Ok(()),
        ids => Err(format!(
            "a CA of its chain is for {}, not {want}: a CA signs only for its own trust domain (X509-SVID §3.2)",
            ids.join(", ")
        )),
    }
}

/// webpki's errors in the words of someone debugging an SVID.
fn describe(e: &webpki::Error) -> String {
    match e {
        webpki::Error::CertExpired { .. } => "the certificate has expired".into(),
        webpki::Error::CertNotValidYet { .. } => "the certificate is not valid yet".into(),
        webpki::Error::UnknownIssuer => {
            "it is not signed by any CA in that bundle (unknown issuer)".into()
        }
        webpki::Error::InvalidSignatureForPublicKey => {
            "a signature in the chain does not verify".into()
        }
        webpki::Error::CaUsedAsEndEntity => "the leaf is a CA certificate".into(),
        webpki::Error::EndEntityUsedAsCa => "a non-CA certificate is used as an issuer".into(),
        webpki::Error::RequiredEkuNotFoundContext(_) => {
            "the extended key usage does not allow this use".into()
        }
        other => format!("{other:?}"),
    }
}

/// The SHA-256 of a certificate's DER, lower-case hex: the `Hash` of Envoy's
/// `x-forwarded-client-cert` header, which names the certificate a client proved.
pub fn cert_sha256_hex(der: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, der);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The current time as webpki wants it.
pub fn now() -> UnixTime {
    UnixTime::now()
}
