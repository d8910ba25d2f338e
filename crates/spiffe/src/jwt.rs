//! JWT-SVIDs: strict parsing and validation per the JWT-SVID standard, and ES256 minting.
//!
//! Validation order, each step refusing the token before the next runs:
//! 1. compact JWS, three base64url parts (JWT-SVID §1, §5.1);
//! 2. `alg` on the allowlist (§2.1, §4: "before processing"), then only `alg`/`kid`/`typ` in the
//!    header (§2) and `typ` either `JWT` or `JOSE` (§2.3);
//! 3. claims: `sub` a SPIFFE ID (§3.1), `aud` and `exp` present (§3.2, §3.3);
//! 4. signature, with the key named by `kid` in the bundle of the subject's trust domain;
//! 5. `exp` in the future and `nbf` (if any) in the past, within the leeway (RFC 7519 §4.1.4–5);
//! 6. the expected audience among `aud` (§3.2).

use std::collections::BTreeMap;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, RsaPublicKeyComponents, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use crate::bundle::{BundleSource, EcCurve, JwtKey};
use crate::id::{IdError, SpiffeId};
use crate::json::UniqueMap;

/// Tokens larger than this are refused before any parsing, to bound the work an attacker can cause.
pub const MAX_TOKEN_LEN: usize = 64 * 1024;

/// The signature algorithms JWT-SVID §2.1 allows (RFC 7518 §3.3–3.5). Anything else, `none` and
/// the HMAC family above all, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    RS384,
    RS512,
    ES256,
    ES384,
    ES512,
    PS256,
    PS384,
    PS512,
}

impl Alg {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            "ES512" => Self::ES512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
            Self::ES512 => "ES512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtError {
    #[error("token is {len} bytes; at most {MAX_TOKEN_LEN} are accepted")]
    TooLarge { len: usize },
    #[error(
        "token is not a JWS in compact serialization (three base64url parts separated by `.`) (JWT-SVID §5.1)"
    )]
    NotCompact,
    #[error("token {part} is not base64url without padding")]
    Base64 { part: &'static str },
    #[error("token {part} is not a JSON object: {reason}")]
    Json { part: &'static str, reason: String },
    #[error("token header has no `alg` (JWT-SVID §2.1)")]
    MissingAlg,
    #[error("token `alg` {alg:?} is not allowed; only RS/ES/PS 256/384/512 are (JWT-SVID §2.1)")]
    UnsupportedAlg { alg: String },
    #[error("token header has {name:?}; only `alg`, `kid` and `typ` are allowed (JWT-SVID §2)")]
    ForbiddenHeader { name: String },
    #[error("token header `typ` is {typ:?}; it must be `JWT` or `JOSE` (JWT-SVID §2.3)")]
    BadType { typ: String },
    #[error("token header has no `kid`, so no bundle key can be chosen to check its signature")]
    MissingKid,
    #[error("token header `{name}` must be a string")]
    HeaderNotString { name: &'static str },
    #[error("token has no `sub` claim (JWT-SVID §3.1)")]
    MissingSubject,
    #[error("token `sub` is not a valid SPIFFE ID: {0} (JWT-SVID §3.1)")]
    Subject(IdError),
    #[error("token has no `aud` claim, or it is empty (JWT-SVID §3.2)")]
    MissingAudience,
    #[error("token `aud` must be a string or an array of strings (RFC 7519 §4.1.3)")]
    BadAudience,
    #[error("token has no `exp` claim (JWT-SVID §3.3)")]
    MissingExpiry,
    #[error("token `{claim}` must be a non-negative NumericDate (RFC 7519 §2)")]
    BadNumericDate { claim: &'static str },
    #[error("no bundle for trust domain {trust_domain} of the token's subject")]
    NoBundle { trust_domain: String },
    #[error("the bundle of {trust_domain} has no JWT key {kid:?}")]
    UnknownKid { trust_domain: String, kid: String },
    #[error("key {kid:?} cannot verify `alg` {alg}: wrong key type or curve")]
    KeyAlgMismatch { kid: String, alg: &'static str },
    #[error("token signature does not verify with key {kid:?}")]
    BadSignature { kid: String },
    #[error("token expired at {exp} (now {now}, leeway {leeway}s) (JWT-SVID §3.3)")]
    Expired { exp: u64, now: u64, leeway: u64 },
    #[error("token is not valid before {nbf} (now {now}, leeway {leeway}s) (RFC 7519 §4.1.5)")]
    NotYetValid { nbf: u64, now: u64, leeway: u64 },
    #[error("token audience {aud:?} does not contain {expected:?} (JWT-SVID §3.2)")]
    AudienceMismatch { aud: Vec<String>, expected: String },
    #[error("cannot sign the token: {0}")]
    Sign(String),
}

/// A JWT-SVID whose structure was checked (and, from [`validate`], whose signature and claims too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvid {
    pub token: String,
    pub spiffe_id: SpiffeId,
    pub audience: Vec<String>,
    /// Seconds since the Unix epoch.
    pub expiry: u64,
    pub issued_at: Option<u64>,
    pub kid: String,
    pub alg: Alg,
    /// All claims, for callers that want more than the standard ones (ValidateJWTSVID returns them).
    pub claims: BTreeMap<String, Value>,
}

/// Options for [`validate`].
#[derive(Debug, Clone, Copy)]
pub struct Validation<'a> {
    /// The audience this validator identifies with; it MUST be among `aud` (JWT-SVID §3.2).
    pub audience: &'a str,
    /// Seconds since the Unix epoch.
    pub now: u64,
    /// Clock-skew allowance in seconds for `exp` and `nbf`.
    pub leeway: u64,
}

/// Parses a token and checks everything except signature, time and audience. Used for tokens this
/// process minted itself (to read their expiry) and as the first half of [`validate`].
pub fn parse_unverified(token: &str) -> Result<(JwtSvid, Signed<'_>), JwtError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::TooLarge { len: token.len() });
    }
    let mut parts = token.split('.');
    let (Some(h), Some(c), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::NotCompact);
    };
    let header_bytes = b64(h, "header")?;
    let header: UniqueMap<Value> = json(&header_bytes, "header")?;

    // §2.1 / §4: the algorithm is checked before anything else in the token is looked at.
    let alg = match header.0.iter().find(|(k, _)| k == "alg") {
        None => return Err(JwtError::MissingAlg),
        Some((_, Value::String(a))) => {
            Alg::parse(a).ok_or_else(|| JwtError::UnsupportedAlg { alg: a.clone() })?
        }
        Some((_, other)) => {
            return Err(JwtError::UnsupportedAlg {
                alg: other.to_string(),
            });
        }
    };
    let mut kid = None;
    for (name, value) in &header.0 {
        match name.as_str() {
            "alg" => {}
            "kid" => match value {
                Value::String(k) => kid = Some(k.clone()),
                _ => return Err(JwtError::HeaderNotString { name: "kid" }),
            },
            // §2.3: optional; if set, `JWT` or `JOSE`.
            "typ" => match value {
                Value::String(t) if t == "JWT" || t == "JOSE" => {}
                Value::String(t) => return Err(JwtError::BadType { typ: t.clone() }),
                _ => return Err(JwtError::HeaderNotString { name: "typ" }),
            },
            // §2: "Any header not described here, registered or private, MUST NOT be included" —
            // this is what shuts out `jku`, `x5u`, `jwk`, `crit` and other key-injection vectors.
            other => {
                return Err(JwtError::ForbiddenHeader {
                    name: other.to_owned(),
                });
            }
        }
    }
    // §2.2 makes `kid` optional for issuers, but a validator needs it to pick the key; go-spiffe
    // and SPIRE refuse tokens without it too.
    let kid = kid.filter(|k| !k.is_empty()).ok_or(JwtError::MissingKid)?;

    let claims_bytes = b64(c, "claims")?;
    let claims: UniqueMap<Value> = json(&claims_bytes, "claims")?;
    let claims: BTreeMap<String, Value> = claims.0.into_iter().collect();

    let spiffe_id = match claims.get("sub") {
        Some(Value::String(s)) => SpiffeId::parse(s).map_err(JwtError::Subject)?,
        Some(_) => return Err(JwtError::Subject(IdError::Empty)),
        None => return Err(JwtError::MissingSubject),
    };
    let audience = match claims.get("aud") {
        None => return Err(JwtError::MissingAudience),
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or(JwtError::BadAudience))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(JwtError::BadAudience),
    };
    if audience.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    let expiry = numeric_date(&claims, "exp")?.ok_or(JwtError::MissingExpiry)?;
    let issued_at = numeric_date(&claims, "iat")?;
    numeric_date(&claims, "nbf")?;

    let signature = b64(s, "signature")?;
    let signed_len = h.len() + 1 + c.len();
    let svid = JwtSvid {
        token: token.to_owned(),
        spiffe_id,
        audience,
        expiry,
        issued_at,
        kid,
        alg,
        claims,
    };
    Ok((
        svid,
        Signed {
            message: &token[..signed_len],
            signature,
        },
    ))
}

/// The signed part of a token and its signature.
#[derive(Debug)]
pub struct Signed<'a> {
    message: &'a str,
    signature: Vec<u8>,
}

/// Validates a JWT-SVID completely (see the module docs for the order of checks).
pub fn validate(
    token: &str,
    bundles: &dyn BundleSource,
    opts: Validation<'_>,
) -> Result<JwtSvid, JwtError> {
    let (svid, signed) = parse_unverified(token)?;
    let td = svid.spiffe_id.trust_domain();
    // The key comes only from the bundle of the subject's own trust domain: a key of another
    // trust domain can never vouch for this subject.
    let bundle = bundles.bundle_for(&td).ok_or_else(|| JwtError::NoBundle {
        trust_domain: td.to_string(),
    })?;
    let key = bundle
        .jwt_authority(&svid.kid)
        .ok_or_else(|| JwtError::UnknownKid {
            trust_domain: td.to_string(),
            kid: svid.kid.clone(),
        })?;
    verify_signature(svid.alg, key, signed.message.as_bytes(), &signed.signature).map_err(
        |mismatch| {
            if mismatch {
                JwtError::KeyAlgMismatch {
                    kid: svid.kid.clone(),
                    alg: svid.alg.as_str(),
                }
            } else {
                JwtError::BadSignature {
                    kid: svid.kid.clone(),
                }
            }
        },
    )?;
    if opts.now > svid.expiry.saturating_add(opts.leeway) {
        return Err(JwtError::Expired {
            exp: svid.expiry,
            now: opts.now,
            leeway: opts.leeway,
        });
    }
    if let Some(nbf) = numeric_date(&svid.claims, "nbf")?
        && nbf > opts.now.saturating_add(opts.leeway)
    {
        return Err(JwtError::NotYetValid {
            nbf,
            now: opts.now,
            leeway: opts.leeway,
        });
    }
    if !svid.audience.iter().any(|a| a == opts.audience) {
        return Err(JwtError::AudienceMismatch {
            aud: svid.audience.clone(),
            expected: opts.audience.to_owned(),
        });
    }
    Ok(svid)
}

/// Err(true): the key cannot be used with this alg; Err(false): the signature is wrong.
fn verify_signature(alg: Alg, key: &JwtKey, msg: &[u8], sig: &[u8]) -> Result<(), bool> {
    use Alg::*;
    match (alg, key) {
        (ES256 | ES384 | ES512, JwtKey::Ec { curve, point }) => {
            let algorithm: &'static signature::EcdsaVerificationAlgorithm = match (alg, curve) {
                (ES256, EcCurve::P256) => &signature::ECDSA_P256_SHA256_FIXED,
                (ES384, EcCurve::P384) => &signature::ECDSA_P384_SHA384_FIXED,
                (ES512, EcCurve::P521) => &signature::ECDSA_P521_SHA512_FIXED,
                _ => return Err(true),
            };
            UnparsedPublicKey::new(algorithm, point)
                .verify(msg, sig)
                .map_err(|_| false)
        }
        (RS256 | RS384 | RS512 | PS256 | PS384 | PS512, JwtKey::Rsa { n, e }) => {
            let algorithm: &'static signature::RsaParameters = match alg {
                RS256 => &signature::RSA_PKCS1_2048_8192_SHA256,
                RS384 => &signature::RSA_PKCS1_2048_8192_SHA384,
                RS512 => &signature::RSA_PKCS1_2048_8192_SHA512,
                PS256 => &signature::RSA_PSS_2048_8192_SHA256,
                PS384 => &signature::RSA_PSS_2048_8192_SHA384,
                _ => &signature::RSA_PSS_2048_8192_SHA512,
            };
            RsaPublicKeyComponents { n, e }
                .verify(algorithm, msg, sig)
                .map_err(|_| false)
        }
        _ => Err(true),
    }
}

/// The claims of a token we mint.
#[derive(Debug, Clone)]
pub struct Claims<'a> {
    pub subject: &'a SpiffeId,
    pub audience: &'a [String],
    pub issued_at: u64,
    pub expiry: u64,
}

/// Mints an ES256 JWT-SVID. Tokens we mint always carry `kid` (so validators can choose the key)
/// and `typ: JWT`, and `aud` is a single string when there is one audience (JWT-SVID §3.2
/// recommends one).
pub fn mint_es256(key: &EcdsaKeyPair, kid: &str, claims: &Claims<'_>) -> Result<String, JwtError> {
    if claims.audience.is_empty() {
        return Err(JwtError::MissingAudience);
    }
    if kid.is_empty() {
        return Err(JwtError::MissingKid);
    }
    let header = serde_json::json!({ "alg": "ES256", "kid": kid, "typ": "JWT" });
    let aud = match claims.audience {
        [one] => Value::String(one.clone()),
        many => Value::from(many.to_vec()),
    };
    let body = serde_json::json!({
        "sub": claims.subject.as_str(),
        "aud": aud,
        "exp": claims.expiry,
        "iat": claims.issued_at,
    });
    let mut token = URL_SAFE_NO_PAD.encode(header.to_string());
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(body.to_string()));
    let sig = key
        .sign(&SystemRandom::new(), token.as_bytes())
        .map_err(|e| JwtError::Sign(e.to_string()))?;
    token.push('.');
    token.push_str(&URL_SAFE_NO_PAD.encode(sig.as_ref()));
    Ok(token)
}

fn b64(part: &str, name: &'static str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Base64 { part: name })
}

fn json<T: serde::de::DeserializeOwned>(bytes: &[u8], part: &'static str) -> Result<T, JwtError> {
    serde_json::from_slice(bytes).map_err(|e| JwtError::Json {
        part,
        reason: e.to_string(),
    })
}

/// RFC 7519 §2 NumericDate: seconds since the epoch, possibly fractional. Negative, non-finite or
/// non-numeric values are refused.
fn numeric_date(
    claims: &BTreeMap<String, Value>,
    claim: &'static str,
) -> Result<Option<u64>, JwtError> {
    match claims.get(claim) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(u) = n.as_u64() {
                Ok(Some(u))
            } else {
                match n.as_f64() {
                    Some(f) if f.is_finite() && f >= 0.0 && f < u64::MAX as f64 => {
                        // Truncation is intended: sub-second precision does not matter for expiry.
                        Ok(Some(f as u64))
                    }
                    _ => Err(JwtError::BadNumericDate { claim }),
                }
            }
        }
        Some(_) => Err(JwtError::BadNumericDate { claim }),
    }
}
