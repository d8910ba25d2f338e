//! Shared test fixtures: a certificate factory for valid and deliberately malformed X509-SVIDs,
//! and JWT signers that can produce any header or claims a test needs.
//!
//! Test-only (`publish = false`): `expect` here is on values the fixture itself made.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod access_log;
pub mod http;
pub mod netns;
pub mod pg_cluster;

pub use rcgen;

pub mod openssl;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use tessera_spiffe::bundle::EcCurve;
use tessera_spiffe::{Bundle, BundleSet, JwtKey, TrustDomain};
use time::{Duration, OffsetDateTime};

/// A bundle set with the root of every CA in `cas`.
pub fn bundle_set(cas: &[&TestCa]) -> BundleSet {
    let mut s = BundleSet::new();
    for ca in cas {
        s.upsert(ca.bundle());
    }
    s
}

/// A CA of one trust domain: a self-signed root, or an intermediate below another `TestCa`.
#[derive(Debug)]
pub struct TestCa {
    pub trust_domain: TrustDomain,
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate.
    pub cert: CertificateDer<'static>,
    /// Certificates between this CA and the root, this CA first, the root excluded.
    chain_to_root: Vec<CertificateDer<'static>>,
    root: CertificateDer<'static>,
}

/// An issued certificate chain (leaf first, up to but excluding the root) and the leaf's key.
#[derive(Debug)]
pub struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivatePkcs8KeyDer<'static>,
}

impl Issued {
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    pub fn chain_pem(&self) -> String {
        self.chain
            .iter()
            .map(|c| pem_block("CERTIFICATE", c))
            .collect()
    }
}

pub fn pem_block(tag: &str, der: &[u8]) -> String {
    use base64::engine::general_purpose::STANDARD;
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {tag}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ascii"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {tag}-----\n"));
    out
}

fn ca_params(td: &TrustDomain, cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Tessera test");
    dn.push(DnType::CommonName, cn);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(
        td.id()
            .as_str()
            .try_into()
            .expect("a trust domain ID is IA5"),
    )];
    let now = OffsetDateTime::now_utc();
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(1);
    p
}

impl TestCa {
    /// A self-signed root CA for `trust_domain`.
    pub fn new(trust_domain: &str) -> Self {
        let td = TrustDomain::new(trust_domain).expect("test trust domain");
        let key = KeyPair::generate().expect("keygen");
        let params = ca_params(&td, &format!("{td} root"));
        let cert = params.self_signed(&key).expect("self-sign").der().clone();
        Self {
            trust_domain: td,
            issuer: Issuer::new(params, key),
            root: cert.clone(),
            cert,
            chain_to_root: Vec::new(),
        }
    }

    /// An intermediate CA signed by this one.
    pub fn intermediate(&self) -> Self {
        self.intermediate_with(|_| {})
    }

    /// An intermediate CA whose parameters `edit` may break.
    pub fn intermediate_with(&self, edit: impl FnOnce(&mut CertificateParams)) -> Self {
        let key = KeyPair::generate().expect("keygen");
        let mut params = ca_params(
            &self.trust_domain,
            &format!("{} intermediate", self.trust_domain),
        );
        edit(&mut params);
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign")
            .der()
            .clone();
        let mut chain_to_root = vec![cert.clone()];
        chain_to_root.extend(self.chain_to_root.iter().cloned());
        Self {
            trust_domain: self.trust_domain.clone(),
            issuer: Issuer::new(params, key),
            cert,
            chain_to_root,
            root: self.root.clone(),
        }
    }

    pub fn root(&self) -> &CertificateDer<'static> {
        &self.root
    }

    /// The bundle of this CA's trust domain, holding its root.
    pub fn bundle(&self) -> Bundle {
        let mut b = Bundle::new(self.trust_domain.clone());
        b.add_x509_authority(self.root.to_vec())
            .expect("root parses");
        b
    }

    /// Parameters of a valid X509-SVID leaf for `spiffe_id` (which may be any string, even an invalid ID).
    pub fn leaf_params(spiffe_id: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Tessera test");
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        if !spiffe_id.is_empty() {
            p.subject_alt_names = vec![uri_san(spiffe_id)];
        }
        let now = OffsetDateTime::now_utc();
        p.not_before = now - Duration::minutes(5);
        p.not_after = now + Duration::hours(1);
        p
    }

    /// A valid X509-SVID for `spiffe_id`.
    pub fn issue(&self, spiffe_id: &str) -> Issued {
        self.issue_with(spiffe_id, |_| {})
    }

    /// An X509-SVID that expires `secs` seconds from now.
    pub fn issue_expiring(&self, spiffe_id: &str, secs: i64) -> Issued {
        self.issue_with(spiffe_id, |p| {
            p.not_after = time::OffsetDateTime::now_utc() + time::Duration::seconds(secs);
        })
    }

    /// An X509-SVID whose parameters `edit` may break.
    pub fn issue_with(&self, spiffe_id: &str, edit: impl FnOnce(&mut CertificateParams)) -> Issued {
        let key = KeyPair::generate().expect("keygen");
        let mut params = Self::leaf_params(spiffe_id);
        edit(&mut params);
        let leaf = params
            .signed_by(&key, &self.issuer)
            .expect("sign")
            .der()
            .clone();
        let mut chain = vec![leaf];
        chain.extend(self.chain_to_root.iter().cloned());
        Issued {
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
        }
    }
}

pub fn uri_san(uri: &str) -> SanType {
    SanType::URI(uri.try_into().expect("test URI is IA5"))
}

/// A key usage extension marked non-critical with only digitalSignature set, for the test that
/// X509-SVID §4.3's "MUST be marked critical" is enforced (rcgen always marks it critical).
pub fn non_critical_digital_signature_ku() -> rcgen::CustomExtension {
    // BIT STRING, 1 unused bit... encoded as: 03 02 07 80 (digitalSignature = bit 0).
    let mut ext =
        rcgen::CustomExtension::from_oid_content(&[2, 5, 29, 15], vec![0x03, 0x02, 0x07, 0x80]);
    ext.set_criticality(false);
    ext
}

/// An ES256 JWT signer with a key ID, able to sign arbitrary headers and claims.
#[derive(Debug)]
pub struct JwtSigner {
    pub kid: String,
    pub key: EcdsaKeyPair,
}

impl JwtSigner {
    pub fn new(kid: &str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .expect("keygen");
        let key =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                .expect("pkcs8");
        Self {
            kid: kid.to_owned(),
            key,
        }
    }

    pub fn public(&self) -> JwtKey {
        JwtKey::Ec {
            curve: EcCurve::P256,
            point: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Adds this signer's key to `bundle` under its `kid`.
    pub fn add_to(&self, bundle: &mut Bundle) {
        bundle
            .add_jwt_authority(&self.kid, self.public())
            .expect("kid is new");
    }

    /// Signs `header` and `claims` exactly as given.
    pub fn sign_raw(&self, header: &serde_json::Value, claims: &serde_json::Value) -> String {
        let mut t = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), t.as_bytes())
            .expect("sign");
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
        t
    }
}

/// An RSA-2048 JWT signer, for the RS*/PS* algorithms of the allowlist.
#[derive(Debug)]
pub struct RsaJwtSigner {
    pub kid: String,
    pub key: RsaKeyPair,
}

impl RsaJwtSigner {
    pub fn new(kid: &str) -> Self {
        let key = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa keygen");
        Self {
            kid: kid.to_owned(),
            key,
        }
    }

    pub fn public(&self) -> JwtKey {
        let pk = self.key.public_key();
        JwtKey::Rsa {
            n: pk.modulus().big_endian_without_leading_zero().to_vec(),
            e: pk.exponent().big_endian_without_leading_zero().to_vec(),
        }
    }

    /// Signs with `alg` (`RS256`…`PS512`).
    pub fn sign_raw(
        &self,
        alg: &str,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> String {
        let padding: &'static dyn signature::RsaEncoding = match alg {
            "RS256" => &signature::RSA_PKCS1_SHA256,
            "RS384" => &signature::RSA_PKCS1_SHA384,
            "RS512" => &signature::RSA_PKCS1_SHA512,
            "PS256" => &signature::RSA_PSS_SHA256,
            "PS384" => &signature::RSA_PSS_SHA384,
            _ => &signature::RSA_PSS_SHA512,
        };
        let mut t = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(padding, &SystemRandom::new(), t.as_bytes(), &mut sig)
            .expect("sign");
        t.push('.');
        t.push_str(&URL_SAFE_NO_PAD.encode(&sig));
        t
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A PostgreSQL schema of its own for one test, in the database named by
/// `TESSERA_TEST_POSTGRES_URL` (CI starts one with `.ci/postgres.sh`).
pub mod pg {
    use sqlx::{Connection as _, Executor as _};

    /// The test database URL, or `None` with the reason printed. With `CI=true` a missing URL is
    /// a failure: CI must run the PostgreSQL half.
    pub fn url() -> Option<String> {
        match std::env::var("TESSERA_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => Some(url),
            _ if std::env::var("CI").is_ok_and(|v| v == "true") => panic!(
                "CI=true but TESSERA_TEST_POSTGRES_URL is not set: CI must run the PostgreSQL half \
                 (eval \"$(bash .ci/postgres.sh)\" before cargo test)"
            ),
            _ => {
                eprintln!("skipping PostgreSQL half: TESSERA_TEST_POSTGRES_URL not set");
                None
            }
        }
    }

    /// A fresh schema; [`Schema::url`] connects with it as the search path.
    #[derive(Debug)]
    pub struct Schema {
        base: String,
        name: String,
        pub url: String,
    }

    fn with_query(url: &str, pair: &str) -> String {
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{pair}")
    }

    /// Creates `t_<name>_<random>`; `None` when the PostgreSQL half is skipped.
    pub async fn fresh_schema(name: &str) -> Option<Schema> {
        let base = url()?;
        let mut suffix = [0u8; 6];
        aws_lc_rs::rand::fill(&mut suffix).expect("randomness");
        let clean: String = name
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(40)
            .collect();
        let schema = format!("t_{clean}_{}", hex::encode(suffix));
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .expect("connect to the test database");
        admin
            .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
            .await
            .expect("create schema");
        let url = with_query(&base, &format!("options[search_path]={schema}"));
        Some(Schema {
            base,
            name: schema,
            url,
        })
    }

    impl Schema {
        /// Drops the schema and everything in it.
        pub async fn drop(self) {
            if let Ok(mut admin) = sqlx::PgConnection::connect(&self.base).await {
                let _ = admin
                    .execute(sqlx::AssertSqlSafe(format!(
                        "DROP SCHEMA {} CASCADE",
                        self.name
                    )))
                    .await;
            }
        }
    }
}

/// A root and an issuing intermediate made with rcgen, each adjusted by its closure before it
/// is signed: (root PEM, intermediate PEM, intermediate key PEM). For upstream-authority tests
/// of chains `openssl` cannot easily make (a root with pathLenConstraint, an expired root).
pub fn rcgen_pki(
    root: impl FnOnce(&mut rcgen::CertificateParams),
    int: impl FnOnce(&mut rcgen::CertificateParams),
) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let ca = |name: &str| {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name.push(rcgen::DnType::CommonName, name);
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        p
    };
    let root_key = rcgen::KeyPair::generate().unwrap();
    let mut rp = ca("Root");
    root(&mut rp);
    let root_cert = rp.self_signed(&root_key).unwrap();
    let issuer = rcgen::Issuer::new(rp, root_key);
    let int_key = rcgen::KeyPair::generate().unwrap();
    let mut ip = ca("Issuing");
    ip.use_authority_key_identifier_extension = true;
    int(&mut ip);
    let int_cert = ip.signed_by(&int_key, &issuer).unwrap();
    (
        root_cert.pem().into_bytes(),
        int_cert.pem().into_bytes(),
        int_key.serialize_pem().into_bytes(),
    )
}

/// A DER TLV with a definite length (X.690 §8.1): for certificates, keys and CSRs that rcgen
/// cannot make (a secp256k1 key, an off-curve point, a malformed extension).
pub fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if let Ok(short @ 0..0x80) = u8::try_from(len) {
        out.push(short);
    } else {
        let bytes: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | u8::try_from(bytes.len()).unwrap_or(0x7f));
        out.extend(bytes);
    }
    out.extend_from_slice(content);
    out
}

/// The header and content lengths of the DER TLV at the start of `b`.
fn tlv(b: &[u8]) -> (usize, usize) {
    match b[1] {
        short @ 0..0x80 => (2, usize::from(short)),
        long => {
            let n = usize::from(long & 0x7F);
            let len = b[2..2 + n].iter().fold(0, |a, x| a << 8 | usize::from(*x));
            (2 + n, len)
        }
    }
}

/// Certificate `cert` with the SubjectPublicKeyInfo `old` in its TBS replaced by `new`, for a
/// certificate with a key rcgen cannot make (another curve, an off-curve point). Its signature no
/// longer verifies, which does not matter for a trust anchor (never checked) or for a check
/// that reads only the certificate's fields.
pub fn with_spki(cert: &[u8], old: &[u8], new: &[u8]) -> Vec<u8> {
    let (h, _) = tlv(cert);
    let outer = &cert[h..];
    let (th, tl) = tlv(outer);
    let tbs = &outer[th..th + tl];
    let at = tbs
        .windows(old.len())
        .position(|w| w == old)
        .expect("the certificate holds `old`");
    let tbs = [&tbs[..at], new, &tbs[at + old.len()..]].concat();
    der(0x30, &[der(0x30, &tbs), outer[th + tl..].to_vec()].concat())
}
