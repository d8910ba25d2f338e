//! Trust bundles in the SPIFFE bundle format (a JWK Set), and sets of bundles keyed by trust domain.
//!
//! Standards: SPIFFE Trust Domain and Bundle §4 (the JWK Set), §5 (bundle maps), X509-SVID §6 and
//! JWT-SVID §6 (the keys of each SVID type).

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::{Deserialize, Serialize};
use x509_parser::prelude::*;

use crate::id::{IdError, TrustDomain};
use crate::json::UniqueMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BundleError {
    #[error("bundle for {trust_domain}: not valid JSON for a SPIFFE bundle: {reason}")]
    Json {
        trust_domain: String,
        reason: String,
    },
    #[error("bundle for {trust_domain}: keys[{index}]: {reason}")]
    Key {
        trust_domain: String,
        index: usize,
        reason: String,
    },
    #[error(
        "bundle for {trust_domain}: two jwt-svid keys have kid {kid:?}; a key ID must name one key"
    )]
    DuplicateKid { trust_domain: String, kid: String },
    #[error(
        "bundle map: trust domain {0} appears twice (SPIFFE Trust Domain and Bundle §5.1.1: consumers MUST reject duplicates)"
    )]
    DuplicateTrustDomain(String),
    // `source` repeats the name it refuses (a "found" part), so it is cut like the name is.
    #[error(
        "bundle map: trust domain {name:?} is not valid: {}",
        abbreviate(&.source.to_string(), MESSAGE_MAX)
    )]
    TrustDomain { name: String, source: IdError },
    #[error("bundle map: not valid JSON: {0}")]
    MapJson(String),
    #[error("X.509 authority is not a parseable DER certificate: {0}")]
    Certificate(String),
}

/// The most bytes of one value from the input that an error repeats ([`abbreviate`]).
pub(crate) const VALUE_MAX: usize = 64;
/// The most bytes of a parser's message (serde's repeats the value it refuses) kept.
pub(crate) const MESSAGE_MAX: usize = 256;

pub(crate) use crate::text::abbreviate;

/// A JWT-SVID signing key from a bundle. Only key types usable with the JWT-SVID `alg` allowlist
/// (JWT-SVID §2.1: RSA and ECDSA P-256/384/521) are represented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtKey {
    /// An ECDSA public key as an uncompressed SEC1 point (`04 || x || y`).
    Ec { curve: EcCurve, point: Vec<u8> },
    /// An RSA public key: big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EcCurve {
    P256,
    P384,
    P521,
}

impl EcCurve {
    fn from_jwk(crv: &str) -> Option<Self> {
        match crv {
            "P-256" => Some(Self::P256),
            "P-384" => Some(Self::P384),
            "P-521" => Some(Self::P521),
            _ => None,
        }
    }
    pub fn jwk_name(self) -> &'static str {
        match self {
            Self::P256 => "P-256",
            Self::P384 => "P-384",
            Self::P521 => "P-521",
        }
    }
    /// Bytes of one coordinate.
    fn coord_len(self) -> usize {
        match self {
            Self::P256 => 32,
            Self::P384 => 48,
            Self::P521 => 66,
        }
    }
}

/// The trust bundle of one trust domain: the CA certificates that anchor its X509-SVIDs and the
/// keys that sign its JWT-SVIDs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bundle {
    trust_domain: TrustDomain,
    x509_authorities: Vec<Vec<u8>>,
    jwt_authorities: BTreeMap<String, JwtKey>,
    /// SPIFFE Trust Domain and Bundle §4.1.1.
    pub sequence: Option<u64>,
    /// SPIFFE Trust Domain and Bundle §4.1.2, in seconds.
    pub refresh_hint: Option<u64>,
}

/// Anything that can answer "what is the bundle of trust domain X": a [`Bundle`] (for its own
/// trust domain only) or a [`BundleSet`].
pub trait BundleSource {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle>;
}

impl BundleSource for Bundle {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        (self.trust_domain == *td).then_some(self)
    }
}

/// The JSON shape of a JWK we read. Known members are typed (serde rejects a duplicate known
/// member); unknown members are tolerated as §4.1 requires.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    kid: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x5c: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct RawBundle {
    /// §4.1.3: "The parameter `keys` MUST be present."
    keys: Vec<serde_json::Value>,
    spiffe_sequence: Option<serde_json::Value>,
    spiffe_refresh_hint: Option<serde_json::Value>,
}

/// §4.1.1 and §4.1.2: when present, both are integers; negative values have no meaning.
fn non_negative_int(
    td: &TrustDomain,
    name: &str,
    section: &str,
    v: Option<serde_json::Value>,
) -> Result<Option<u64>, BundleError> {
    match v {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| BundleError::Json {
            trust_domain: td.to_string(),
            reason: format!(
                "`{name}` must be a non-negative integer, got {} (Trust Domain and Bundle {section})",
                abbreviate(&v.to_string(), VALUE_MAX)
            ),
        }),
    }
}

#[derive(Serialize)]
struct OutJwk<'a> {
    #[serde(rename = "use")]
    use_: &'static str,
    kty: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    crv: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    y: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    x5c: Option<[String; 1]>,
}

impl OutJwk<'_> {
    fn new(kty: &'static str) -> Self {
        Self {
            use_: "jwt-svid",
            kty,
            kid: None,
            crv: None,
            x: None,
            y: None,
            n: None,
            e: None,
            x5c: None,
        }
    }
}

#[derive(Serialize)]
struct OutBundle<'a> {
    keys: Vec<OutJwk<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_sequence: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    spiffe_refresh_hint: Option<u64>,
}

impl Bundle {
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            x509_authorities: Vec::new(),
            jwt_authorities: BTreeMap::new(),
            sequence: None,
            refresh_hint: None,
        }
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// DER-encoded CA certificates, in the order they were added.
    pub fn x509_authorities(&self) -> &[Vec<u8>] {
        &self.x509_authorities
    }

    pub fn jwt_authorities(&self) -> &BTreeMap<String, JwtKey> {
        &self.jwt_authorities
    }

    pub fn jwt_authority(&self, kid: &str) -> Option<&JwtKey> {
        self.jwt_authorities.get(kid)
    }

    /// Adds a CA certificate (DER) after checking that it parses; duplicates are ignored.
    pub fn add_x509_authority(&mut self, der: Vec<u8>) -> Result<(), BundleError> {
        parse_cert(&der).map_err(BundleError::Certificate)?;
        if !self.x509_authorities.contains(&der) {
            self.x509_authorities.push(der);
        }
        Ok(())
    }

    /// Adds a JWT signing key; a second, different key under the same `kid` is refused.
    pub fn add_jwt_authority(&mut self, kid: &str, key: JwtKey) -> Result<(), BundleError> {
        match self.jwt_authorities.entry(kid.to_owned()) {
            Entry::Vacant(v) => {
                v.insert(key);
                Ok(())
            }
            Entry::Occupied(o) if *o.get() == key => Ok(()),
            Entry::Occupied(_) => Err(BundleError::DuplicateKid {
                trust_domain: self.trust_domain.to_string(),
                kid: kid.to_owned(),
            }),
        }
    }

    pub fn remove_jwt_authority(&mut self, kid: &str) -> Option<JwtKey> {
        self.jwt_authorities.remove(kid)
    }

    pub fn remove_x509_authority(&mut self, der: &[u8]) -> bool {
        let before = self.x509_authorities.len();
        self.x509_authorities.retain(|d| d != der);
        before != self.x509_authorities.len()
    }

    /// Parses a SPIFFE bundle (JWK Set) for `trust_domain`.
    pub fn parse(trust_domain: TrustDomain, json: &[u8]) -> Result<Self, BundleError> {
        let raw: RawBundle = serde_json::from_slice(json).map_err(|e| BundleError::Json {
            trust_domain: trust_domain.to_string(),
            reason: serde_reason(&e),
        })?;
        Self::from_raw(trust_domain, raw)
    }

    fn from_raw(trust_domain: TrustDomain, raw: RawBundle) -> Result<Self, BundleError> {
        let sequence = non_negative_int(
            &trust_domain,
            "spiffe_sequence",
            "§4.1.1",
            raw.spiffe_sequence,
        )?;
        let refresh_hint = non_negative_int(
            &trust_domain,
            "spiffe_refresh_hint",
            "§4.1.2",
            raw.spiffe_refresh_hint,
        )?;
        let mut bundle = Self::new(trust_domain);
        bundle.sequence = sequence;
        bundle.refresh_hint = refresh_hint;
        for (index, value) in raw.keys.into_iter().enumerate() {
            let key_err = |reason: String| BundleError::Key {
                trust_domain: bundle.trust_domain.to_string(),
                index,
                reason,
            };
            let jwk: RawJwk =
                serde_json::from_value(value).map_err(|e| key_err(serde_reason(&e)))?;
            match jwk.use_.as_deref() {
                Some("x509-svid") => {
                    // Trust Domain and Bundle §4.2.1: an unknown `kty` means the whole JWK is ignored.
                    if !matches!(jwk.kty.as_deref(), Some("EC" | "RSA" | "OKP")) {
                        continue;
                    }
                    // X509-SVID §6.1: "The value MUST include exactly one CA certificate". §6.2 lets a
                    // consumer ignore extra values, but like go-spiffe we refuse them: with more than
                    // one, which certificate the publisher meant to trust is ambiguous.
                    let der = match jwk.x5c.as_deref() {
                        Some([one]) => STANDARD
                            .decode(one)
                            .map_err(|e| key_err(format!("x5c[0] is not base64 DER: {e}")))?,
                        Some(many) => {
                            return Err(key_err(format!(
                                "x509-svid key must have exactly one x5c certificate, found {}",
                                many.len()
                            )));
                        }
                        None => {
                            return Err(key_err("x509-svid key has no x5c certificate".into()));
                        }
                    };
                    parse_cert(&der).map_err(|e| key_err(format!("x5c[0]: {e}")))?;
                    if !bundle.x509_authorities.contains(&der) {
                        bundle.x509_authorities.push(der);
                    }
                }
                Some("jwt-svid") => {
                    let key = match jwk.kty.as_deref() {
                        Some("EC") => ec_key(&jwk).map_err(key_err)?,
                        Some("RSA") => rsa_key(&jwk).map_err(key_err)?,
                        // §4.2.1: unknown (or, for JWT-SVID §2.1, unusable) key types are ignored.
                        _ => continue,
                    };
                    // JWT-SVID §6.1: the `kid` parameter of each jwt-svid JWK MUST be set; it is how
                    // a validator finds the key for a token.
                    let kid = match jwk.kid.as_deref() {
                        Some(k) if !k.is_empty() => k,
                        _ => return Err(key_err("jwt-svid key has no kid".into())),
                    };
                    if bundle.jwt_authorities.contains_key(kid) {
                        return Err(BundleError::DuplicateKid {
                            trust_domain: bundle.trust_domain.to_string(),
                            kid: abbreviate(kid, VALUE_MAX).into_owned(),
                        });
                    }
                    bundle.jwt_authorities.insert(kid.to_owned(), key);
                }
                // §4.2.2: a missing or unknown `use` means the whole JWK is ignored.
                _ => continue,
            }
        }
        Ok(bundle)
    }

    /// The bundle as SPIFFE bundle JSON.
    pub fn to_json(&self) -> String {
        let mut keys = Vec::new();
        for der in &self.x509_authorities {
            let key = X509Certificate::from_der(der)
                .ok()
                .and_then(|(_, cert)| jwt_key_from_spki(cert.public_key()));
            // A CA key we cannot describe as a JWK (Ed25519, say) is still published with its certificate.
            let mut jwk = key.as_ref().map_or_else(|| OutJwk::new("EC"), jwt_key_jwk);
            jwk.use_ = "x509-svid";
            jwk.x5c = Some([STANDARD.encode(der)]);
            keys.push(jwk);
        }
        for (kid, key) in &self.jwt_authorities {
            let mut jwk = jwt_key_jwk(key);
            jwk.kid = Some(kid);
            keys.push(jwk);
        }
        let out = OutBundle {
            keys,
            spiffe_sequence: self.sequence,
            spiffe_refresh_hint: self.refresh_hint,
        };
        serde_json::to_string_pretty(&out).unwrap_or_default()
    }

    /// The JWT authorities alone as a JWK Set: what the Workload API's JWT bundles carry.
    pub fn jwt_jwks_json(&self) -> String {
        let mut only = Self::new(self.trust_domain.clone());
        only.jwt_authorities = self.jwt_authorities.clone();
        only.sequence = self.sequence;
        only.refresh_hint = self.refresh_hint;
        only.to_json()
    }
}

/// serde's message, which may repeat a refused value whole (`invalid type: string "…"`).
fn serde_reason(e: &serde_json::Error) -> String {
    abbreviate(&e.to_string(), MESSAGE_MAX).into_owned()
}

fn parse_cert(der: &[u8]) -> Result<(), String> {
    match X509Certificate::from_der(der) {
        Ok(([], _)) => Ok(()),
        Ok(_) => Err("trailing bytes after the certificate".into()),
        Err(e) => Err(format!("not a DER X.509 certificate: {e}")),
    }
}

fn b64url_field(name: &str, v: Option<&String>) -> Result<Vec<u8>, String> {
    let v = v.ok_or_else(|| format!("missing `{name}`"))?;
    URL_SAFE_NO_PAD
        .decode(v)
        .map_err(|e| format!("`{name}` is not base64url without padding: {e}"))
}

fn ec_key(jwk: &RawJwk) -> Result<JwtKey, String> {
    let crv = jwk.crv.as_deref().ok_or("EC key has no `crv`")?;
    let curve = EcCurve::from_jwk(crv)
        .ok_or_else(|| format!("unsupported EC curve {:?}", abbreviate(crv, VALUE_MAX)))?;
    let x = b64url_field("x", jwk.x.as_ref())?;
    let y = b64url_field("y", jwk.y.as_ref())?;
    let len = curve.coord_len();
    // RFC 7518 §6.2.1.2: coordinates are the full-length big-endian octets for the curve.
    if x.len() != len || y.len() != len {
        return Err(format!(
            "{crv} coordinates must be {len} bytes each, got {} and {}",
            x.len(),
            y.len()
        ));
    }
    let mut point = Vec::with_capacity(1 + 2 * len);
    point.push(0x04);
    point.extend_from_slice(&x);
    point.extend_from_slice(&y);
    if !ec_point_is_valid(curve, &point) {
        return Err(format!(
            "the {crv} point (x, y) is not on the curve: not a public key (SEC 1 v2 §3.2.2)"
        ));
    }
    Ok(JwtKey::Ec { curve, point })
}

/// Whether `point` (SEC 1 encoded) is a public key of `curve`: on the curve and not the point at
/// infinity. SEC 1 v2 §3.2.2: a public key must be validated before it is used. Checked when a
/// key is read, not only when it verifies: the keys of a bundle are stored and handed on to
/// workloads over the Workload API, whose JWT libraries may not check (an off-curve point is
/// the material of invalid-curve attacks); go-jose refuses such a JWK ("X/Y are not on declared
/// curve"). A black-box test's bundle endpoint served one and it was accepted and stored.
pub(crate) fn ec_point_is_valid(curve: EcCurve, point: &[u8]) -> bool {
    use aws_lc_rs::signature;
    let alg: &'static signature::EcdsaVerificationAlgorithm = match curve {
        EcCurve::P256 => &signature::ECDSA_P256_SHA256_ASN1,
        EcCurve::P384 => &signature::ECDSA_P384_SHA384_ASN1,
        EcCurve::P521 => &signature::ECDSA_P521_SHA512_ASN1,
    };
    // Raw octets only: aws-lc-rs would also take a whole SubjectPublicKeyInfo here.
    matches!(point.first(), Some(0x02..=0x04))
        && signature::ParsedPublicKey::new(alg, point).is_ok()
}

fn rsa_key(jwk: &RawJwk) -> Result<JwtKey, String> {
    let n = b64url_field("n", jwk.n.as_ref())?;
    let e = b64url_field("e", jwk.e.as_ref())?;
    let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
    // RSA keys below 2048 bits are refused by our verifier (RSA_*_2048_8192); say so at load time.
    if bits < 2048 {
        return Err(format!(
            "RSA modulus is about {bits} bits; at least 2048 are required"
        ));
    }
    if e.is_empty() {
        return Err("RSA exponent is empty".into());
    }
    rsa_exponent_problem(&n, &e).map_or(Ok(JwtKey::Rsa { n, e }), Err)
}

/// RFC 8017 §3.1: an RSA public exponent is an odd integer with 3 <= e <= n - 1. e = 1 makes
/// "signatures" anyone can compute (s = m), and an even e is no RSA key at all. Our verifier
/// (aws-lc) refuses such keys only when a token is checked, but the bundle's keys are also stored
/// and handed to workloads over the Workload API, whose JWT libraries may not check; a black-box
/// test's bundle endpoint served e = 1 and it was accepted. No minimum above 3 (65537, say) is
/// required: neither the RFC nor go-jose asks for one.
fn rsa_exponent_problem(n: &[u8], e: &[u8]) -> Option<String> {
    let significant = |v: &[u8]| -> Vec<u8> { v.iter().copied().skip_while(|b| *b == 0).collect() };
    let (n, e) = (significant(n), significant(e));
    if e.last().is_none_or(|b| b % 2 == 0) {
        return Some("the RSA exponent is even: not an RSA key (RFC 8017 §3.1)".into());
    }
    if e.as_slice() == [1] {
        return Some(
            "the RSA exponent is 1: anyone could forge signatures (RFC 8017 §3.1: e >= 3)".into(),
        );
    }
    // Big-endian, no leading zeros: the longer is larger, and of equal length, the first byte
    // that differs decides.
    if (e.len(), e.as_slice()) >= (n.len(), n.as_slice()) {
        return Some(
            "the RSA exponent is not smaller than the modulus (RFC 8017 §3.1: e <= n - 1)".into(),
        );
    }
    None
}

fn jwt_key_jwk<'a>(key: &JwtKey) -> OutJwk<'a> {
    match key {
        JwtKey::Ec { curve, point } => {
            let len = curve.coord_len();
            let mut jwk = OutJwk::new("EC");
            jwk.crv = Some(curve.jwk_name());
            jwk.x = point.get(1..1 + len).map(|c| URL_SAFE_NO_PAD.encode(c));
            jwk.y = point.get(1 + len..).map(|c| URL_SAFE_NO_PAD.encode(c));
            jwk
        }
        JwtKey::Rsa { n, e } => {
            let mut jwk = OutJwk::new("RSA");
            jwk.n = Some(URL_SAFE_NO_PAD.encode(n));
            jwk.e = Some(URL_SAFE_NO_PAD.encode(e));
            jwk
        }
    }
}

/// The public key of a SubjectPublicKeyInfo as a [`JwtKey`], if it is an RSA or NIST-curve EC key.
pub fn jwt_key_from_spki(spki: &SubjectPublicKeyInfo<'_>) -> Option<JwtKey> {
    use x509_parser::public_key::PublicKey;
    match spki.parsed().ok()? {
        PublicKey::EC(point) => {
            let curve_oid = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
            let curve = if curve_oid == x509_parser::oid_registry::OID_EC_P256 {
                EcCurve::P256
            } else if curve_oid == x509_parser::oid_registry::OID_NIST_EC_P384 {
                EcCurve::P384
            } else if curve_oid == x509_parser::oid_registry::OID_NIST_EC_P521 {
                EcCurve::P521
            } else {
                return None;
            };
            let data = point.data();
            (data.len() == 1 + 2 * curve.coord_len() && data.first() == Some(&0x04)).then(|| {
                JwtKey::Ec {
                    curve,
                    point: data.to_vec(),
                }
            })
        }
        PublicKey::RSA(rsa) => Some(JwtKey::Rsa {
            n: rsa
                .modulus
                .iter()
                .copied()
                .skip_while(|b| *b == 0)
                .collect(),
            e: rsa
                .exponent
                .iter()
                .copied()
                .skip_while(|b| *b == 0)
                .collect(),
        }),
        _ => None,
    }
}

/// Bundles of several trust domains, at most one per trust domain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundleSet {
    bundles: BTreeMap<TrustDomain, Bundle>,
}

impl BundleSource for BundleSet {
    fn bundle_for(&self, td: &TrustDomain) -> Option<&Bundle> {
        self.bundles.get(td)
    }
}

impl BundleSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a bundle; a second bundle for a trust domain already present is refused, since two
    /// bundles for one name would make the choice of trust anchors ambiguous (§6.3).
    pub fn insert(&mut self, bundle: Bundle) -> Result<(), BundleError> {
        match self.bundles.entry(bundle.trust_domain.clone()) {
            Entry::Vacant(v) => {
                v.insert(bundle);
                Ok(())
            }
            Entry::Occupied(o) => Err(BundleError::DuplicateTrustDomain(o.key().to_string())),
        }
    }

    /// Inserts or replaces the bundle of its trust domain (a newer version of the same bundle).
    pub fn upsert(&mut self, bundle: Bundle) {
        self.bundles.insert(bundle.trust_domain.clone(), bundle);
    }

    pub fn remove(&mut self, td: &TrustDomain) -> Option<Bundle> {
        self.bundles.remove(td)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Bundle> {
        self.bundles.values()
    }

    pub fn len(&self) -> usize {
        self.bundles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bundles.is_empty()
    }

    /// Parses a SPIFFE bundle map (`{"trust_domains": {"<td>": <bundle>, ...}}`, §5.1).
    pub fn parse_map(json: &[u8]) -> Result<Self, BundleError> {
        #[derive(Deserialize)]
        struct RawMap {
            /// §5.1.1: "A static `trust_domains` key MUST be set, and MAY be empty."
            trust_domains: UniqueMap<RawBundle>,
        }
        // UniqueMap rejects a repeated name while parsing (§5.1.1, §6.3); names that differ in
        // spelling but denote the same trust domain are caught by `insert` below.
        let raw: RawMap = serde_json::from_slice(json).map_err(|e| {
            let msg = e.to_string();
            match msg.split_once("duplicate member ") {
                Some((_, rest)) => BundleError::DuplicateTrustDomain(
                    abbreviate(
                        rest.split(" at line")
                            .next()
                            .unwrap_or(rest)
                            .trim_matches('"'),
                        VALUE_MAX,
                    )
                    .into_owned(),
                ),
                None => BundleError::MapJson(serde_reason(&e)),
            }
        })?;
        let mut set = Self::new();
        for (name, raw_bundle) in raw.trust_domains.0 {
            let td = TrustDomain::new(&name).map_err(|source| BundleError::TrustDomain {
                name: abbreviate(&name, VALUE_MAX).into_owned(),
                source,
            })?;
            set.insert(Bundle::from_raw(td, raw_bundle)?)?;
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td(s: &str) -> TrustDomain {
        TrustDomain::new(s).unwrap()
    }

    const EC_X: &str = "fK-wKTnKL7KFLM27lqq5DC-bxrVaH6rDV-IcCSEOeL4";
    const EC_Y: &str = "wq-g3TQWxYlV51TCPH030yXsRxvujD4hUUaIQrXk4KI";

    fn jwt_jwk(kid: &str) -> String {
        format!(
            r#"{{"kty":"EC","use":"jwt-svid","kid":"{kid}","crv":"P-256","x":"{EC_X}","y":"{EC_Y}"}}"#
        )
    }

    #[test]
    fn jwt_keys_are_read_with_sequence_and_refresh_hint() {
        let json = format!(
            r#"{{"keys":[{}],"spiffe_sequence":7,"spiffe_refresh_hint":300,"extra":true}}"#,
            jwt_jwk("k1")
        );
        let b = Bundle::parse(td("example.org"), json.as_bytes()).unwrap();
        assert_eq!(b.sequence, Some(7));
        assert_eq!(b.refresh_hint, Some(300));
        assert!(
            matches!(b.jwt_authority("k1"), Some(JwtKey::Ec { curve: EcCurve::P256, point }) if point.len() == 65)
        );
        // And back: what we write parses to the same bundle.
        let again = Bundle::parse(td("example.org"), b.to_json().as_bytes()).unwrap();
        assert_eq!(again, b);
    }

    #[test]
    fn unknown_use_and_kty_are_ignored() {
        // Trust Domain and Bundle §4.2.1, §4.2.2.
        let json = format!(
            r#"{{"keys":[
                {{"kty":"EC","use":"wit-svid","kid":"w","crv":"P-256","x":"{EC_X}","y":"{EC_Y}"}},
                {{"kty":"EC","kid":"nouse","crv":"P-256","x":"{EC_X}","y":"{EC_Y}"}},
                {{"kty":"oct","use":"jwt-svid","kid":"sym","k":"AAAA"}},
                {{"kty":"XYZ","use":"x509-svid","x5c":["not-even-base64"]}},
                {}
            ]}}"#,
            jwt_jwk("k1")
        );
        let b = Bundle::parse(td("example.org"), json.as_bytes()).unwrap();
        assert_eq!(b.jwt_authorities().keys().collect::<Vec<_>>(), ["k1"]);
        assert!(b.x509_authorities().is_empty());
    }

    #[test]
    fn malformed_bundles_are_rejected_with_the_key_index() {
        let cases: &[(&str, &str)] = &[
            (r#"{"spiffe_sequence":1}"#, "missing field `keys`"),
            (
                r#"{"keys":[],"spiffe_sequence":-1}"#,
                "`spiffe_sequence` must be a non-negative integer",
            ),
            (
                r#"{"keys":[],"spiffe_refresh_hint":"300"}"#,
                "`spiffe_refresh_hint` must be a non-negative integer",
            ),
            (r#"{"keys":[],"keys":[]}"#, "duplicate field `keys`"),
            (
                r#"{"keys":[{"kty":"EC","use":"x509-svid"}]}"#,
                "keys[0]: x509-svid key has no x5c",
            ),
            (
                r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AA==","AA=="]}]}"#,
                "exactly one x5c",
            ),
            (
                r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["AAAA"]}]}"#,
                "not a DER X.509",
            ),
            (
                r#"{"keys":[{"kty":"EC","use":"x509-svid","x5c":["!!"]}]}"#,
                "not base64",
            ),
            (
                r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-256","x":"AA","y":"AA","kid":"a"}]}"#,
                "32 bytes",
            ),
            (
                r#"{"keys":[{"kty":"EC","use":"jwt-svid","crv":"P-192","x":"AA","y":"AA","kid":"a"}]}"#,
                "unsupported EC curve",
            ),
            (
                r#"{"keys":[{"kty":"RSA","use":"jwt-svid","n":"AQAB","e":"AQAB","kid":"a"}]}"#,
                "at least 2048",
            ),
            ("[1,2]", "not valid JSON for a SPIFFE bundle"),
            ("", "not valid JSON"),
        ];
        for (json, want) in cases {
            let err = Bundle::parse(td("example.org"), json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{json}: {err}");
        }
        let no_kid = format!(
            r#"{{"keys":[{}]}}"#,
            jwt_jwk("k").replace(r#","kid":"k""#, "")
        );
        let err = Bundle::parse(td("example.org"), no_kid.as_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("keys[0]: jwt-svid key has no kid"),
            "{err}"
        );
        let dup = format!(r#"{{"keys":[{},{}]}}"#, jwt_jwk("k"), jwt_jwk("k"));
        assert_eq!(
            Bundle::parse(td("example.org"), dup.as_bytes()).unwrap_err(),
            BundleError::DuplicateKid {
                trust_domain: "example.org".into(),
                kid: "k".into()
            }
        );
    }

    /// A black-box test's hostile bundle endpoint: a 1 MB `crv`, a 1 MB `spiffe_refresh_hint`
    /// array, a 1 MB value where serde wanted another type, a 1 MB repeated `kid`. Each error
    /// was the whole value (and was logged, stored and printed); now each is short.
    #[test]
    fn errors_never_repeat_a_huge_value_whole() {
        let huge = "A".repeat(1 << 20);
        let cases = [
            (
                format!(
                    r#"{{"keys":[{{"kty":"EC","use":"jwt-svid","kid":"a","crv":"{huge}","x":"AA","y":"AA"}}]}}"#
                ),
                "unsupported EC curve \"AAAA",
            ),
            (
                format!(
                    r#"{{"keys":[],"spiffe_refresh_hint":[{}1]}}"#,
                    "1,".repeat(1 << 19)
                ),
                "`spiffe_refresh_hint` must be a non-negative integer, got [1,1,1",
            ),
            (
                format!(r#"{{"keys":[],"spiffe_sequence":"{huge}"}}"#),
                "`spiffe_sequence` must be a non-negative integer",
            ),
            (
                format!(r#"{{"keys":[{{"kty":"EC","use":"x509-svid","x5c":"{huge}"}}]}}"#),
                "keys[0]: invalid type: string \"AAAA",
            ),
            (format!(r#"{{"keys":"{huge}"}}"#), "invalid type: string"),
        ];
        for (json, want) in &cases {
            let err = Bundle::parse(td("example.org"), json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{}", abbreviate(&err, 300));
            assert!(
                err.len() < 512,
                "{} bytes: {}",
                err.len(),
                abbreviate(&err, 300)
            );
        }
        let dup = format!(r#"{{"keys":[{},{}]}}"#, jwt_jwk(&huge), jwt_jwk(&huge));
        let err = Bundle::parse(td("example.org"), dup.as_bytes()).unwrap_err();
        assert!(err.to_string().len() < 512, "{}", err.to_string().len());
        // The bundle map: a huge trust domain name, valid or not, and a huge duplicate.
        let b = r#"{"keys":[]}"#;
        for map in [
            format!(r#"{{"trust_domains":{{"{huge}":{b}}}}}"#),
            format!(r#"{{"trust_domains":{{"x{huge}":{b},"x{huge}":{b}}}}}"#),
            format!(r#"{{"trust_domains":"{huge}"}}"#),
        ] {
            let err = BundleSet::parse_map(map.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                err.len() < 1024,
                "{} bytes: {}",
                err.len(),
                abbreviate(&err, 300)
            );
        }
    }

    #[test]
    fn an_ec_point_off_its_curve_is_refused() {
        // The hostile endpoint's key: a real P-256 x with y = 1.
        let y1 = URL_SAFE_NO_PAD.encode([&[0u8; 31][..], &[1]].concat());
        for (x, y) in [
            (EC_X, y1.as_str()),
            (EC_X, EC_X),
            (
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ),
        ] {
            let json = format!(
                r#"{{"keys":[{{"kty":"EC","use":"jwt-svid","kid":"a","crv":"P-256","x":"{x}","y":"{y}"}}]}}"#
            );
            let err = Bundle::parse(td("example.org"), json.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("keys[0]: the P-256 point (x, y) is not on the curve"),
                "{err}"
            );
        }
        // The same x with its real y is a key (see jwt_keys_are_read_with_sequence_and_refresh_hint).
        assert!(
            Bundle::parse(
                td("example.org"),
                format!(r#"{{"keys":[{}]}}"#, jwt_jwk("k")).as_bytes()
            )
            .is_ok()
        );
        // A P-256 point is not a P-384 key either (and its length already says so).
        assert!(!ec_point_is_valid(
            EcCurve::P384,
            &[&[4u8][..], &[7; 64]].concat()
        ));
    }

    #[test]
    fn an_rsa_exponent_must_be_odd_and_at_least_3_and_below_the_modulus() {
        // A 2048-bit odd modulus; the exponent checks do not need a real key.
        let mut n = vec![0xC5u8; 256];
        n[255] = 0x01;
        let rsa = |e: &[u8]| {
            let json = format!(
                r#"{{"keys":[{{"kty":"RSA","use":"jwt-svid","kid":"r","n":"{}","e":"{}"}}]}}"#,
                URL_SAFE_NO_PAD.encode(&n),
                URL_SAFE_NO_PAD.encode(e)
            );
            Bundle::parse(td("example.org"), json.as_bytes()).map_err(|e| e.to_string())
        };
        for (e, want) in [
            (&[1u8][..], "the RSA exponent is 1"),
            (&[0, 0, 1], "the RSA exponent is 1"),
            (&[0], "is even"),
            (&[2], "is even"),
            (&[1, 0, 0], "is even"),
            (&n[..], "not smaller than the modulus"),
            (&[0xFF; 257], "not smaller than the modulus"),
        ] {
            let err = rsa(e).unwrap_err();
            assert!(err.contains(want), "e={e:02x?}: {err}");
        }
        let mut n_minus_2 = n.clone();
        n_minus_2[255] = 0xFF;
        n_minus_2[254] -= 1;
        for e in [&[3u8][..], &[1, 0, 1], &n_minus_2[..]] {
            let b = rsa(e).unwrap();
            assert!(
                matches!(b.jwt_authority("r"), Some(JwtKey::Rsa { e: got, .. }) if got == e),
                "e={e:02x?}"
            );
        }
    }

    #[test]
    fn bundle_map_rejects_duplicate_trust_domains() {
        let b = r#"{"keys":[]}"#;
        let ok = format!(r#"{{"trust_domains":{{"a.org":{b},"b.org":{b}}}}}"#);
        let set = BundleSet::parse_map(ok.as_bytes()).unwrap();
        assert_eq!(set.len(), 2);
        // §5.1.1 / §6.3: the same name twice.
        let dup = format!(r#"{{"trust_domains":{{"a.org":{b},"a.org":{b}}}}}"#);
        assert_eq!(
            BundleSet::parse_map(dup.as_bytes()).unwrap_err(),
            BundleError::DuplicateTrustDomain("a.org".into())
        );
        // Two spellings of one trust domain.
        let dup2 = format!(r#"{{"trust_domains":{{"a.org":{b},"spiffe://a.org":{b}}}}}"#);
        assert_eq!(
            BundleSet::parse_map(dup2.as_bytes()).unwrap_err(),
            BundleError::DuplicateTrustDomain("a.org".into())
        );
        let bad = format!(r#"{{"trust_domains":{{"A.org":{b}}}}}"#);
        assert!(matches!(
            BundleSet::parse_map(bad.as_bytes()),
            Err(BundleError::TrustDomain { .. })
        ));
        assert!(
            BundleSet::parse_map(br#"{}"#)
                .unwrap_err()
                .to_string()
                .contains("trust_domains")
        );
        let mut set = BundleSet::new();
        set.insert(Bundle::new(td("a.org"))).unwrap();
        assert_eq!(
            set.insert(Bundle::new(td("a.org"))).unwrap_err(),
            BundleError::DuplicateTrustDomain("a.org".into())
        );
    }
}
