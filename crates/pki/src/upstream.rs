//! Upstream authorities (external PKI): the server's X.509 CA as an intermediate under an
//! enterprise root instead of a self-signed root.
//!
//! The interface is the one SPIRE's UpstreamAuthority plugins use: the server makes a key and a
//! CSR, the upstream returns the signed CA certificate plus the chain to its roots, and the roots
//! are what the trust bundle publishes. [`DiskUpstream`] signs with a CA certificate and key read
//! from files. A networked upstream (a nested Tessera server, Vault) implements the same trait by
//! sending the CSR over its API; the server calls [`UpstreamAuthority::mint_x509_ca`] from its
//! rotation task, outside any async context, so such an implementation may block on its client.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tessera_spiffe::TrustDomain;
use x509_parser::extensions::ParsedExtension;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::x509::{datetime, random_serial, uri_san};
use crate::{BACKDATE_SECS, PkiError, csr};

/// What the server asks an upstream to sign.
#[derive(Debug, Clone, Copy)]
pub struct CaRequest<'a> {
    /// The only trust domain the CA may sign for; written as its URI SAN (X509-SVID §3.2),
    /// whatever the CSR says.
    pub trust_domain: &'a TrustDomain,
    /// PKCS#10 CSR (DER) for the new CA key; only its public key is used.
    pub csr_der: &'a [u8],
    /// Requested lifetime; the upstream may shorten it (never past its own certificate).
    pub ttl_secs: u64,
    /// Unix seconds.
    pub now: u64,
}

/// What an upstream returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamCa {
    /// The new CA certificate (DER).
    pub cert_der: Vec<u8>,
    /// The certificates between it and an upstream root, nearest first, root excluded.
    pub chain: Vec<Vec<u8>>,
}

/// An external authority that signs the server's X.509 CAs.
pub trait UpstreamAuthority: Send + Sync + std::fmt::Debug {
    /// A short name for messages and `tessera authority` output (`disk`).
    fn name(&self) -> &str;
    /// Signs a CA certificate for the CSR's key.
    fn mint_x509_ca(&self, req: &CaRequest<'_>) -> Result<UpstreamCa, PkiError>;
    /// The roots every CA it signs chains to: the trust bundle's X.509 authorities.
    fn x509_roots(&self) -> Vec<Vec<u8>>;
    /// Subject key identifiers (hex) of the upstream certificates that sign, nearest first.
    fn authority_ids(&self) -> Vec<String>;
}

/// An upstream CA certificate and key read from disk (`[upstream_authority.disk]`).
pub struct DiskUpstream {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate and the intermediates above it, nearest first, root excluded
    /// (empty when the signing certificate is itself a root).
    chain: Vec<Vec<u8>>,
    roots: Vec<Vec<u8>>,
    ids: Vec<String>,
    not_before: u64,
    not_after: u64,
}

impl std::fmt::Debug for DiskUpstream {
    /// Everything but the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskUpstream")
            .field("authority_ids", &self.ids)
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// The facts of one certificate the upstream needs.
struct Facts {
    der: Vec<u8>,
    subject: Vec<u8>,
    issuer: Vec<u8>,
    spki: Vec<u8>,
    ski: Option<String>,
    /// Its authority key identifier (hex): which key signed it.
    aki: Option<String>,
    is_ca: bool,
    key_cert_sign: bool,
    /// Whether it has a keyUsage extension at all.
    key_usage: bool,
    /// basicConstraints pathLenConstraint: at most this many CA certificates below it.
    path_len: Option<u32>,
    not_before: u64,
    not_after: u64,
}

fn facts(der: Vec<u8>, what: &str) -> Result<Facts, PkiError> {
    let bad = |m: String| PkiError::Upstream(format!("{what}: {m}"));
    let cert = match X509Certificate::from_der(&der) {
        Ok(([], c)) => c,
        Ok(_) => return Err(bad("trailing bytes after a certificate".into())),
        Err(e) => return Err(bad(format!("not a DER X.509 certificate: {e}"))),
    };
    let mut is_ca = false;
    let mut key_cert_sign = false;
    let mut key_usage = false;
    let mut path_len = None;
    let mut ski = None;
    let mut aki = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::BasicConstraints(bc) => {
                is_ca = bc.ca;
                path_len = bc.path_len_constraint;
            }
            ParsedExtension::KeyUsage(ku) => {
                key_usage = true;
                key_cert_sign = ku.key_cert_sign();
            }
            ParsedExtension::SubjectKeyIdentifier(id) => ski = Some(hex::encode(id.0)),
            ParsedExtension::AuthorityKeyIdentifier(id) => {
                aki = id.key_identifier.as_ref().map(|k| hex::encode(k.0));
            }
            _ => {}
        }
    }
    let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
    let f = Facts {
        subject: cert.subject().as_raw().to_vec(),
        issuer: cert.issuer().as_raw().to_vec(),
        spki: cert.public_key().subject_public_key.data.to_vec(),
        ski,
        aki,
        is_ca,
        key_cert_sign,
        key_usage,
        path_len,
        not_before: secs(cert.validity().not_before),
        not_after: secs(cert.validity().not_after),
        der: Vec::new(),
    };
    drop(cert);
    Ok(Facts { der, ..f })
}

fn pem_certs(pem_bytes: &[u8], what: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    let blocks = pem::parse_many(pem_bytes)
        .map_err(|e| PkiError::Upstream(format!("{what}: not PEM: {e}")))?;
    let certs: Vec<Vec<u8>> = blocks
        .into_iter()
        .filter(|b| b.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(PkiError::Upstream(format!("{what}: no CERTIFICATE in it")));
    }
    Ok(certs)
}

impl DiskUpstream {
    /// Loads the upstream from PEM: `cert_chain` holds the signing CA certificate and the
    /// intermediates between it and the root (any order; a root in it is ignored unless
    /// `bundle` is absent), `key` the signing certificate's private key (PKCS#8), `bundle` the
    /// upstream roots (absent: the self-signed certificates of `cert_chain`).
    ///
    /// Refuses a key that matches no certificate, a signing certificate that is not a CA with
    /// keyCertSign, and a chain that does not link, by issuer and subject names, to a root.
    pub fn from_pem(
        cert_chain: &[u8],
        key: &[u8],
        bundle: Option<&[u8]>,
    ) -> Result<Self, PkiError> {
        let up = PkiError::Upstream;
        let key_text = std::str::from_utf8(key).map_err(|_| up("key_path: not PEM text".into()))?;
        let key = KeyPair::from_pem(key_text).map_err(|e| {
            up(format!(
                "key_path: not a private key this server can sign with ({e}): an unencrypted \
                 PKCS#8, PKCS#1 or SEC1 key of ECDSA P-256 or P-384, Ed25519, or RSA of at \
                 least 2048 bits (an encrypted key: `openssl pkcs8 -topk8 -nocrypt`)"
            ))
        })?;
        let certs = pem_certs(cert_chain, "cert_chain_path")?
            .into_iter()
            .map(|d| facts(d, "cert_chain_path"))
            .collect::<Result<Vec<_>, _>>()?;
        let self_signed = |f: &Facts| f.subject == f.issuer;
        let roots: Vec<Facts> = match bundle {
            Some(b) => pem_certs(b, "bundle_path")?
                .into_iter()
                .map(|d| facts(d, "bundle_path"))
                .collect::<Result<_, _>>()?,
            None => certs
                .iter()
                .filter(|f| self_signed(f))
                .map(|f| facts(f.der.clone(), "cert_chain_path"))
                .collect::<Result<_, _>>()?,
        };
        if roots.is_empty() {
            return Err(up(
                "no upstream root: set bundle_path, or put the root in cert_chain_path".into(),
            ));
        }
        // Every root is published as a trust anchor of the trust domain. webpki does not read
        // a trust anchor's extensions, but OpenSSL, Go and Envoy do: a root that is not a CA,
        // or whose keyUsage leaves out keyCertSign, makes them refuse every SVID under it
        // (RFC 5280 §4.2.1.9, §4.2.1.3), so it is refused here rather than published.
        for r in &roots {
            if !r.is_ca || (r.key_usage && !r.key_cert_sign) {
                return Err(up(format!(
                    "bundle_path: the root {} is not a CA certificate (basicConstraints CA:TRUE \
                     and, with keyUsage, keyCertSign: RFC 5280 §4.2.1.9, §4.2.1.3); other \
                     verifiers would refuse every SVID under it",
                    r.ski
                        .as_deref()
                        .unwrap_or("without a subject key identifier")
                )));
            }
        }
        let signing = certs
            .iter()
            .position(|f| f.spki == key.public_key_raw())
            .ok_or_else(|| {
                up("key_path: the key belongs to no certificate in cert_chain_path".into())
            })?;
        let sign = &certs[signing];
        if !sign.is_ca || !sign.key_cert_sign {
            return Err(up(
                "cert_chain_path: the certificate of key_path is not a CA with keyCertSign \
                 (RFC 5280 §4.2.1.3, §4.2.1.9), so it cannot sign the server's CA"
                    .into(),
            ));
        }
        // Walk from the signing certificate up through the file's intermediates to a root.
        let mut chain = Vec::new();
        let mut ids = Vec::new();
        let mut cur = sign;
        let mut not_before = 0;
        let mut not_after = u64::MAX;
        loop {
            if roots.iter().any(|r| r.der == cur.der) {
                break; // the signing certificate is itself a root
            }
            chain.push(cur.der.clone());
            ids.push(cur.ski.clone().unwrap_or_default());
            not_before = not_before.max(cur.not_before);
            not_after = not_after.min(cur.not_after);
            if roots.iter().any(|r| r.subject == cur.issuer) {
                break;
            }
            if chain.len() > certs.len() {
                return Err(up("cert_chain_path: the chain loops".into()));
            }
            cur = certs
                .iter()
                .find(|f| f.subject == cur.issuer && !self_signed(f))
                .ok_or_else(|| {
                    up(
                        "cert_chain_path: the chain does not reach a root of bundle_path (a \
                        certificate's issuer is neither in the file nor a root)"
                            .into(),
                    )
                })?;
        }
        if chain.is_empty() {
            ids.push(sign.ski.clone().unwrap_or_default());
            not_before = sign.not_before;
            not_after = sign.not_after;
        }
        // The root the chain reached bounds the CA's life too: other verifiers check a trust
        // anchor's validity (OpenSSL, Go), so a CA must not outlive it.
        // By name, and by key identifier where both say one: during a root rollover two roots
        // often share a subject, and the other one's dates or pathLen must not be taken.
        let reached = roots.iter().find(|r| {
            r.der == cur.der
                || (r.subject == cur.issuer
                    && (cur.aki.is_none() || r.ski.is_none() || cur.aki == r.ski))
        });
        if let Some(root) = reached {
            not_before = not_before.max(root.not_before);
            not_after = not_after.min(root.not_after);
        }
        // pathLenConstraint (RFC 5280 §4.2.1.9): each certificate above the server's CA allows
        // at most that many CA certificates below it; the server's CA is one, and each
        // intermediate between them one more. webpki checks it for intermediates but not for
        // the root, so every SVID would be refused by other verifiers only; checked here for
        // all, so the error names the certificate.
        let above: Vec<(&[u8], Option<u32>, &str)> = certs
            .iter()
            .filter(|f| chain.contains(&f.der))
            .map(|f| (f.der.as_slice(), f.path_len, "cert_chain_path"))
            .chain(reached.map(|r| (r.der.as_slice(), r.path_len, "bundle_path")))
            .collect();
        for (der, path_len, file) in above {
            let below = chain
                .iter()
                .position(|c| c.as_slice() == der)
                .unwrap_or(chain.len())
                + 1;
            if let Some(max) = path_len
                && usize::try_from(max).unwrap_or(usize::MAX) < below
            {
                return Err(up(format!(
                    "{file}: a certificate has pathLenConstraint {max}, but {below} CA \
                     certificate(s) would be below it (the server's CA and the intermediates \
                     between them; RFC 5280 §4.2.1.9): no SVID under it would verify"
                )));
            }
        }
        let issuer = Issuer::from_ca_cert_der(&sign.der.as_slice().into(), key)
            .map_err(|e| up(format!("cert_chain_path: {e}")))?;
        Ok(Self {
            issuer,
            chain,
            roots: roots.into_iter().map(|r| r.der).collect(),
            ids,
            not_before,
            not_after,
        })
    }

    /// Unix seconds: no CA it signs can outlive this.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }
}

impl UpstreamAuthority for DiskUpstream {
    fn name(&self) -> &str {
        "disk"
    }

    fn mint_x509_ca(&self, req: &CaRequest<'_>) -> Result<UpstreamCa, PkiError> {
        if req.ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        if req.now >= self.not_after {
            return Err(PkiError::Upstream(format!(
                "the upstream chain (its signing certificate, an intermediate or its root) \
                 expired at {} (now {}); replace the files of [upstream_authority.disk]",
                self.not_after, req.now
            )));
        }
        if req.now < self.not_before {
            return Err(PkiError::Upstream(format!(
                "the upstream chain (its signing certificate, an intermediate or its root) is \
                 not valid before {} (now {}); check the clock or the files of \
                 [upstream_authority.disk]",
                self.not_before, req.now
            )));
        }
        let key = csr::verified_public_key(req.csr_der)?;
        let td = req.trust_domain;
        let mut p = CertificateParams::default();
        let short_id = hex::encode(p.key_identifier(&key).get(..4).unwrap_or_default());
        let td_part = td.as_str().get(..52).unwrap_or(td.as_str());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::CommonName, format!("{td_part} CA {short_id}"));
        p.distinguished_name = dn;
        p.serial_number = Some(random_serial()?);
        // X509-SVID §4.1 and §4.3, as for a self-signed CA (see `X509Authority::self_signed`).
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // X509-SVID §3.2: the trust domain's SPIFFE ID. Tessera's verifiers require every CA
        // of a leaf's path that names a trust domain to name the leaf's, which is what keeps two trust domains under one enterprise root
        // from minting each other's identities.
        p.subject_alt_names = vec![uri_san(td.id().as_str())?];
        // RFC 5280 §4.2.1.1: names the upstream key, for path building.
        p.use_authority_key_identifier_extension = true;
        p.not_before = datetime(
            "CA notBefore",
            req.now.saturating_sub(BACKDATE_SECS).max(self.not_before),
        )?;
        // A CA never outlives the upstream certificate above it: the chain would break first.
        p.not_after = datetime(
            "CA notAfter",
            req.now.saturating_add(req.ttl_secs).min(self.not_after),
        )?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok(UpstreamCa {
            cert_der: cert.der().to_vec(),
            chain: self.chain.clone(),
        })
    }

    fn x509_roots(&self) -> Vec<Vec<u8>> {
        self.roots.clone()
    }

    fn authority_ids(&self) -> Vec<String> {
        self.ids.clone()
    }
}
