//! x509pop node attestation: an agent proves it holds the private key of a node certificate that
//! chains to a CA the server is configured to trust (proof of possession, as SPIRE's x509pop).
//!
//! The server sends random bytes; the agent signs [`CHALLENGE_CONTEXT`] followed by them. The
//! context prefix makes the signature useless for anything but this protocol.

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::aws_lc_rs as algs;
use x509_parser::prelude::*;

/// Prefix of every signed x509pop challenge.
pub const CHALLENGE_CONTEXT: &[u8] = b"tessera x509pop challenge v1\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NodeCertError {
    #[error("no node certificate was sent")]
    Empty,
    #[error("no x509pop CA is configured")]
    NoRoots,
    #[error("node certificate does not verify against the x509pop CA bundle: {0}")]
    Chain(String),
    #[error(
        "proof of possession failed: the challenge signature does not verify with the node certificate's key"
    )]
    Signature,
}

/// What the server learns from a verified node certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCert {
    /// SHA-256 of the leaf certificate (hex): the stable part of the agent's ID.
    pub fingerprint: String,
    pub subject_cn: Option<String>,
    /// SHA-256 (hex) of every CA certificate on the verified path, root included.
    pub ca_fingerprints: Vec<String>,
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Verifies a node certificate chain (leaf first) to one of `roots` for client authentication.
pub fn verify_node_chain(
    chain: &[CertificateDer<'_>],
    roots: &[CertificateDer<'_>],
    now: UnixTime,
) -> Result<NodeCert, NodeCertError> {
    let (leaf, intermediates) = chain.split_first().ok_or(NodeCertError::Empty)?;
    let anchors: Vec<_> = roots
        .iter()
        .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
        .collect();
    if anchors.is_empty() {
        return Err(NodeCertError::NoRoots);
    }
    let ee = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| NodeCertError::Chain(format!("{e:?}")))?;
    let path = ee
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| NodeCertError::Chain(format!("{e:?}")))?;
    let mut ca_fingerprints: Vec<String> = path
        .intermediate_certificates()
        .map(|c| sha256_hex(&c.der()))
        .collect();
    let anchor = path.anchor();
    for (root, a) in roots.iter().zip(
        roots
            .iter()
            .map(|r| webpki::anchor_from_trusted_cert(r).ok()),
    ) {
        if let Some(a) = a
            && a.subject == anchor.subject
            && a.subject_public_key_info == anchor.subject_public_key_info
        {
            ca_fingerprints.push(sha256_hex(root));
        }
    }
    let subject_cn = X509Certificate::from_der(leaf).ok().and_then(|(_, c)| {
        c.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    });
    Ok(NodeCert {
        fingerprint: sha256_hex(leaf),
        subject_cn,
        ca_fingerprints,
    })
}

/// Checks the agent's signature over the challenge with the node certificate's key.
pub fn verify_pop(
    leaf: &CertificateDer<'_>,
    challenge: &[u8],
    signature: &[u8],
) -> Result<(), NodeCertError> {
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|_| NodeCertError::Signature)?;
    let mut msg = CHALLENGE_CONTEXT.to_vec();
    msg.extend_from_slice(challenge);
    let candidates: [&dyn rustls_pki_types::SignatureVerificationAlgorithm; 5] = [
        algs::ECDSA_P256_SHA256,
        algs::ECDSA_P384_SHA384,
        algs::ED25519,
        algs::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
        algs::RSA_PKCS1_2048_8192_SHA256,
    ];
    if candidates
        .iter()
        .any(|alg| ee.verify_signature(*alg, &msg, signature).is_ok())
    {
        Ok(())
    } else {
        Err(NodeCertError::Signature)
    }
}
