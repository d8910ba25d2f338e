//! The X.509 CA of a trust domain and the X509-SVIDs it issues.
//!
//! Data flow: a workload's CSR goes through [`crate::csr`], which proves possession of the key
//! and yields only the public key; everything else in the certificate comes from the
//! [`SvidTemplate`] the server built from a registration entry, and from the CA.

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use tessera_spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{ASN1Time, FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::{BACKDATE_SECS, PkiError, csr, int_hex};

/// What an X509-SVID says, decided by the server from a registration entry. Nothing a CSR asks for
/// can change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidTemplate {
    pub spiffe_id: SpiffeId,
    /// Extra DNS SANs (for clients that check host names); may be empty.
    pub dns_names: Vec<String>,
    /// Requested lifetime; the certificate never outlives the CA, so it may come out shorter.
    pub ttl_secs: u64,
}

/// An issued X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedSvid {
    /// The leaf certificate.
    pub cert_der: Vec<u8>,
    /// What must follow the leaf so that it chains to the bundle: empty under a self-signed CA
    /// (which is in the bundle itself); under an upstream authority, the CA certificate and the
    /// upstream intermediates, up to but not including the upstream root.
    pub intermediates: Vec<Vec<u8>>,
    pub serial_hex: String,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds; never after the CA's.
    pub not_after: u64,
}

impl SignedSvid {
    /// The chain to hand out: the leaf, then [`Self::intermediates`].
    pub fn chain(&self) -> Vec<Vec<u8>> {
        std::iter::once(self.cert_der.clone())
            .chain(self.intermediates.iter().cloned())
            .collect()
    }
}

/// An X.509 certificate authority: an EC P-256 key and its self-signed (or, later, upstream-signed)
/// CA certificate, whose URI SAN names the trust domain it signs for.
pub struct X509Authority {
    trust_domain: TrustDomain,
    cert_der: Vec<u8>,
    /// Holds the CA key, the CA's subject (written as each SVID's issuer) and its key identifier
    /// (written as each SVID's authority key identifier).
    issuer: Issuer<'static, KeyPair>,
    not_before: u64,
    not_after: u64,
    serial_hex: String,
    subject_key_id: String,
    /// True when the certificate was issued by someone else (an upstream authority).
    upstream_signed: bool,
    /// Upstream intermediates between this CA and the upstream root (root excluded).
    upstream_chain: Vec<Vec<u8>>,
}

impl std::fmt::Debug for X509Authority {
    /// Everything but the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Authority")
            .field("trust_domain", &self.trust_domain)
            .field("serial", &self.serial_hex)
            .field("subject_key_id", &self.subject_key_id)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("upstream_signed", &self.upstream_signed)
            .finish_non_exhaustive()
    }
}

impl X509Authority {
    /// A new self-signed root CA for `td`, valid from `now` (backdated) for `ttl_secs`.
    pub fn self_signed(td: &TrustDomain, now: u64, ttl_secs: u64) -> Result<Self, PkiError> {
        if ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let mut p = CertificateParams::default();
        // A short, key-derived name so operators can tell CAs apart in `openssl x509 -text`.
        let short_id = hex::encode(p.key_identifier(&key).get(..4).unwrap_or_default());
        // RFC 5280 Appendix A: ub-common-name is 64; long trust domain names are shortened.
        let td_part = td.as_str().get(..52).unwrap_or(td.as_str());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        dn.push(DnType::CommonName, format!("{td_part} CA {short_id}"));
        p.distinguished_name = dn;
        p.serial_number = Some(random_serial()?);
        // X509-SVID §4.1: signing certificates MUST set cA=true. No path length: the CA may
        // later sign intermediates for downstream servers.
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // X509-SVID §4.3: keyCertSign MUST be set on signing certificates, cRLSign MAY; rcgen
        // marks KeyUsage critical as §4.3 requires.
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        // X509-SVID §3.2: a signing certificate's SPIFFE ID is the trust domain's, with no path.
        // No name constraints, ever: rustls-webpki refuses every chain under a CA with URI name
        // constraints, so they would make every SVID of the trust domain unverifiable.
        p.subject_alt_names = vec![uri_san(td.id().as_str())?];
        p.not_before = datetime("CA notBefore", now.saturating_sub(BACKDATE_SECS))?;
        p.not_after = datetime(
            "CA notAfter",
            now.checked_add(ttl_secs).ok_or(PkiError::TimeOutOfRange {
                what: "CA notAfter",
                value: u64::MAX,
            })?,
        )?;
        let cert = p
            .self_signed(&key)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Self::new(cert.der().to_vec(), key, Vec::new())
    }

    /// A new CA for `td` whose certificate `upstream` signs: a fresh key, a CSR for it, and the
    /// certificate and chain the upstream returns, checked like any restored CA.
    pub fn from_upstream(
        td: &TrustDomain,
        now: u64,
        ttl_secs: u64,
        upstream: &dyn crate::UpstreamAuthority,
    ) -> Result<Self, PkiError> {
        if ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "CA" });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![uri_san(td.id().as_str())?];
        let csr = p
            .serialize_request(&key)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        let signed = upstream.mint_x509_ca(&crate::CaRequest {
            trust_domain: td,
            csr_der: csr.der(),
            ttl_secs,
            now,
        })?;
        let ca = Self::new(signed.cert_der, key, signed.chain)?;
        if ca.trust_domain() != td {
            return Err(PkiError::Upstream(format!(
                "{} returned a CA for trust domain {}, not {td}",
                upstream.name(),
                ca.trust_domain()
            )));
        }
        if !ca.upstream_signed {
            return Err(PkiError::Upstream(format!(
                "{} returned a self-signed certificate",
                upstream.name()
            )));
        }
        Ok(ca)
    }

    /// Restores a CA from its certificate and PKCS#8 private key, checking that the key is the
    /// certificate's and that the certificate may sign X509-SVIDs of one trust domain.
    pub fn from_parts(cert_der: &[u8], key_pkcs8_der: &[u8]) -> Result<Self, PkiError> {
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &key_pkcs8_der.into(),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| PkiError::CaKey(format!("not a PKCS#8 EC P-256 private key: {e}")))?;
        Self::new(cert_der.to_vec(), key, Vec::new())
    }

    /// [`Self::from_parts`] for a CA signed by an upstream authority: `upstream_chain` holds the
    /// upstream intermediates above it (root excluded), sent after every SVID it signs.
    pub fn from_parts_with_chain(
        cert_der: &[u8],
        key_pkcs8_der: &[u8],
        upstream_chain: Vec<Vec<u8>>,
    ) -> Result<Self, PkiError> {
        let key = KeyPair::from_pkcs8_der_and_sign_algo(
            &key_pkcs8_der.into(),
            &rcgen::PKCS_ECDSA_P256_SHA256,
        )
        .map_err(|e| PkiError::CaKey(format!("not a PKCS#8 EC P-256 private key: {e}")))?;
        Self::new(cert_der.to_vec(), key, upstream_chain)
    }

    fn new(
        cert_der: Vec<u8>,
        key: KeyPair,
        upstream_chain: Vec<Vec<u8>>,
    ) -> Result<Self, PkiError> {
        let bad = PkiError::CaCertificate;
        let cert = match X509Certificate::from_der(&cert_der) {
            Ok(([], cert)) => cert,
            Ok(_) => return Err(bad("trailing bytes after the certificate".into())),
            Err(e) => return Err(bad(format!("not a DER X.509 certificate: {e}"))),
        };
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::CaKey(
                "the private key does not belong to the certificate's public key".into(),
            ));
        }
        let mut is_ca = false;
        let mut key_cert_sign = false;
        let mut ski = None;
        let mut uris = Vec::new();
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                ParsedExtension::KeyUsage(ku) => key_cert_sign = ku.key_cert_sign(),
                ParsedExtension::SubjectKeyIdentifier(id) => ski = Some(hex::encode(id.0)),
                ParsedExtension::NameConstraints(_) => return Err(bad(NAME_CONSTRAINTS.into())),
                ParsedExtension::SubjectAlternativeName(san) => {
                    uris.extend(san.general_names.iter().filter_map(|name| match name {
                        GeneralName::URI(uri) => Some(*uri),
                        _ => None,
                    }));
                }
                _ => {}
            }
        }
        if !is_ca {
            return Err(bad(
                "it is not a CA (BasicConstraints cA is not true) (X509-SVID §4.1)".into(),
            ));
        }
        if !key_cert_sign {
            return Err(bad(
                "its key usage lacks keyCertSign (X509-SVID §4.3)".into()
            ));
        }
        // RFC 5280 §4.2.1.2: CA certificates MUST carry a subject key identifier; SVIDs name their
        // issuer by it (authority key identifier) so path building finds the right CA key
        // while two CAs of one trust domain overlap.
        let subject_key_id =
            ski.ok_or_else(|| bad("it has no subject key identifier (RFC 5280 §4.2.1.2)".into()))?;
        // X509-SVID §3.2: a signing certificate's SPIFFE ID is its trust domain's, without a
        // path. We require it: it is how this CA knows which IDs it may sign.
        let trust_domain = match uris.as_slice() {
            [uri] => match SpiffeId::parse(uri) {
                Ok(id) if id.is_root() => id.trust_domain(),
                Ok(_) => {
                    return Err(bad(format!(
                        "URI SAN {uri:?} has a path; a CA's SPIFFE ID MUST NOT (X509-SVID §3.2)"
                    )));
                }
                Err(e) => return Err(bad(format!("URI SAN {uri:?} is not a SPIFFE ID: {e}"))),
            },
            _ => {
                return Err(bad(format!(
                    "it has {} URI SANs; a Tessera CA has exactly one, spiffe://<trust domain> \
                     (X509-SVID §3.2)",
                    uris.len()
                )));
            }
        };
        let validity = cert.validity();
        let secs = |t: ASN1Time, what: &str| {
            u64::try_from(t.timestamp()).map_err(|_| bad(format!("{what} is before 1970")))
        };
        let not_before = secs(validity.not_before, "notBefore")?;
        let not_after = secs(validity.not_after, "notAfter")?;
        if not_after <= not_before {
            return Err(bad("notAfter is not after notBefore".into()));
        }
        let serial_hex = int_hex(cert.raw_serial());
        let upstream_signed = cert.issuer().as_raw() != cert.subject().as_raw();
        if !upstream_signed && !upstream_chain.is_empty() {
            return Err(bad(
                "it is self-signed, yet an upstream chain was given with it".into(),
            ));
        }
        drop(cert);
        let issuer = Issuer::from_ca_cert_der(&cert_der.as_slice().into(), key)
            .map_err(|e| bad(e.to_string()))?;
        Ok(Self {
            trust_domain,
            cert_der,
            issuer,
            not_before,
            not_after,
            serial_hex,
            subject_key_id,
            upstream_signed,
            upstream_chain,
        })
    }

    /// True when an upstream authority signed this CA (the bundle then holds the upstream root).
    pub fn is_upstream_signed(&self) -> bool {
        self.upstream_signed
    }

    /// The upstream intermediates above this CA, root excluded (empty when self-signed or signed
    /// directly by the upstream root).
    pub fn upstream_chain(&self) -> &[Vec<u8>] {
        &self.upstream_chain
    }

    /// What follows an SVID it signed: nothing for a self-signed CA (it is in the bundle), else
    /// this CA's certificate and the upstream intermediates.
    pub fn svid_intermediates(&self) -> Vec<Vec<u8>> {
        if !self.upstream_signed {
            return Vec::new();
        }
        std::iter::once(self.cert_der.clone())
            .chain(self.upstream_chain.iter().cloned())
            .collect()
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The CA private key as PKCS#8 DER, wiped from memory when dropped.
    pub fn key_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(self.issuer.key().serialize_der())
    }

    /// Unix seconds.
    pub fn not_before(&self) -> u64 {
        self.not_before
    }

    /// Unix seconds.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// The certificate's serial number in lowercase hex, without leading zeros.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }

    /// The subject key identifier in lowercase hex: the CA's name in logs and in the SVIDs'
    /// authority key identifier.
    pub fn subject_key_id(&self) -> &str {
        &self.subject_key_id
    }

    /// Signs the public key of `csr_der` into an X509-SVID described by `tmpl`.
    ///
    /// The CSR must carry a valid self-signature; only its public key is used. Its subject and
    /// requested extensions are ignored: a workload cannot ask for another ID, a CA flag or a
    /// longer life.
    pub fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        tmpl: &SvidTemplate,
        now: u64,
    ) -> Result<SignedSvid, PkiError> {
        if tmpl.ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "X509-SVID" });
        }
        let id = &tmpl.spiffe_id;
        // X509-SVID §3.1: a leaf's SPIFFE ID MUST have a path; the bare trust domain ID names
        // the trust domain, never a workload.
        if id.is_root() {
            return Err(PkiError::RootId { id: id.to_string() });
        }
        // A CA vouches only for its own trust domain (X509-SVID §5.1: the leaf's ID is verified
        // against the bundle of the trust domain in that ID).
        if !id.is_member_of(&self.trust_domain) {
            return Err(PkiError::ForeignId {
                id: id.to_string(),
                trust_domain: self.trust_domain.to_string(),
            });
        }
        let mut sans = Vec::with_capacity(1 + tmpl.dns_names.len());
        // X509-SVID §2: exactly one URI SAN, the SPIFFE ID.
        sans.push(uri_san(id.as_str())?);
        for name in &tmpl.dns_names {
            check_dns_name(name)?;
            sans.push(SanType::DnsName(name.as_str().try_into().map_err(
                |_| PkiError::DnsName {
                    name: name.clone(),
                    reason: "not ASCII",
                },
            )?));
        }
        if now >= self.not_after {
            return Err(PkiError::CaExpired {
                not_after: self.not_after,
                now,
            });
        }
        if now < self.not_before {
            return Err(PkiError::CaNotYetValid {
                not_before: self.not_before,
                now,
            });
        }
        let key = csr::verified_public_key(csr_der)?;

        // Backdated for clock skew, but not to before the CA itself was valid.
        let not_before = now.saturating_sub(BACKDATE_SECS).max(self.not_before);
        // An SVID never outlives its CA: the journal drops a CA from the bundle once it has
        // expired, and that is only safe if nothing it signed is still valid.
        let not_after = now.saturating_add(tmpl.ttl_secs).min(self.not_after);

        let mut p = CertificateParams::default();
        // A non-empty subject, so the SAN extension need not be critical (RFC 5280 §4.1.2.6,
        // X509-SVID §3.1); the identity is in the URI SAN alone.
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera");
        p.distinguished_name = dn;
        p.subject_alt_names = sans;
        // X509-SVID §4.1: leaf certificates MUST set cA to false (ExplicitNoCa writes
        // BasicConstraints, which Envoy and some SPIFFE clients require to be present).
        p.is_ca = IsCa::ExplicitNoCa;
        // X509-SVID §4.3: digitalSignature MUST be set, keyCertSign and cRLSign MUST NOT; rcgen
        // marks the extension critical as §4.3 requires.
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // X509-SVID §4.4: serverAuth and clientAuth, so the SVID works on both ends of mTLS.
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        // RFC 5280 §4.2.1.1: names the CA key, so path building picks the right one of two
        // overlapping CAs.
        p.use_authority_key_identifier_extension = true;
        let serial = random_serial()?;
        let serial_hex = int_hex(serial.as_ref());
        p.serial_number = Some(serial);
        p.not_before = datetime("X509-SVID notBefore", not_before)?;
        p.not_after = datetime("X509-SVID notAfter", not_after)?;
        let cert = p
            .signed_by(&key, &self.issuer)
            .map_err(|e| PkiError::Sign(e.to_string()))?;
        Ok(SignedSvid {
            cert_der: cert.der().to_vec(),
            intermediates: self.svid_intermediates(),
            serial_hex,
            not_before,
            not_after,
        })
    }
}

/// RFC 5280 §4.1.2.2: positive, at most 20 octets. 128 random bits, so serials never repeat and
/// cannot be predicted (the defence against chosen-prefix collisions on the signed part).
pub(crate) fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 17];
    // A leading zero octet keeps the INTEGER positive whatever the top random bit is.
    SystemRandom::new()
        .fill(&mut bytes[1..])
        .map_err(|_| PkiError::KeyGeneration("the system random generator failed".into()))?;
    if bytes[1..].iter().all(|b| *b == 0) {
        bytes[16] = 1; // RFC 5280 §4.1.2.2: serial numbers MUST be positive, so not zero.
    }
    Ok(SerialNumber::from_slice(&bytes))
}

/// rustls-webpki refuses every chain under a CA with URI name constraints, so such a CA would
/// make every SVID of the trust domain unverifiable.
const NAME_CONSTRAINTS: &str = "it has name constraints, under which rustls-webpki refuses \
                                every SPIFFE chain; a Tessera CA must not set them";

pub(crate) fn uri_san(uri: &str) -> Result<SanType, PkiError> {
    // A valid SPIFFE ID is ASCII (SPIFFE-ID §2), so this cannot fail; say so if it ever does.
    uri.try_into()
        .map(SanType::URI)
        .map_err(|_| PkiError::Sign(format!("URI {uri:?} is not IA5 text")))
}

pub(crate) fn datetime(what: &'static str, secs: u64) -> Result<OffsetDateTime, PkiError> {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .filter(|t| t.year() <= 9999)
        .ok_or(PkiError::TimeOutOfRange { what, value: secs })
}

/// A DNS SAN: labels of letters, digits and hyphens (RFC 1035 §2.3.1, RFC 5280 §4.2.1.6
/// "preferred name syntax"), each 1-63 bytes, at most 253 in all, optionally a leading `*.`
/// wildcard label.
fn check_dns_name(name: &str) -> Result<(), PkiError> {
    let err = |reason| PkiError::DnsName {
        name: name.to_owned(),
        reason,
    };
    if name.len() > 253 {
        return Err(err("longer than 253 bytes (RFC 1035 §2.3.4)"));
    }
    let rest = name.strip_prefix("*.").unwrap_or(name);
    if rest.is_empty() {
        return Err(err("empty"));
    }
    for label in rest.split('.') {
        if label.is_empty() {
            return Err(err("has an empty label"));
        }
        if label.len() > 63 {
            return Err(err("has a label longer than 63 bytes (RFC 1035 §2.3.4)"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(err(
                "labels may hold only letters, digits and `-` (a `*` only as a whole first label)",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_follow_the_preferred_syntax() {
        for ok in [
            "a",
            "api.example.org",
            "*.example.org",
            "x-1.y",
            &"a".repeat(63),
        ] {
            assert!(check_dns_name(ok).is_ok(), "{ok}");
        }
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(62),
        ]
        .join(".");
        assert_eq!(long.len(), 254);
        for bad in [
            "",
            "*.",
            "*",
            "a..b",
            ".a",
            "a.",
            "a.*.b",
            "*.*.a",
            "a_b",
            "a b",
            "é.org",
            &"a".repeat(64),
            &long,
        ] {
            assert!(
                matches!(check_dns_name(bad), Err(PkiError::DnsName { name, .. }) if name == bad),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn serials_are_positive_distinct_and_128_bits() {
        let a = random_serial().unwrap();
        let b = random_serial().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.as_ref().len(), 17);
        assert_eq!(a.as_ref()[0], 0);
    }

    #[test]
    fn times_beyond_the_year_9999_are_refused() {
        assert!(datetime("x", 253_402_300_799).is_ok());
        assert!(datetime("x", 253_402_300_800).is_err());
        assert!(datetime("x", u64::MAX).is_err());
    }
}
