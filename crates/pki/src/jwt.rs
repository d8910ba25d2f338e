//! The JWT-SVID signing key of a trust domain: ES256, named by a random `kid`.

use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use tessera_spiffe::bundle::EcCurve;
use tessera_spiffe::jwt::{Claims, mint_es256};
use tessera_spiffe::{JwtKey, SpiffeId};
use zeroize::Zeroizing;

use crate::PkiError;

/// Longest `kid` accepted when restoring a key; ours are 22 characters.
const MAX_KID_LEN: usize = 128;

/// The most audience values a JWT-SVID carries.
pub(crate) const MAX_AUDIENCES: usize = 32;
/// The longest audience value (bytes).
pub(crate) const MAX_AUDIENCE_LEN: usize = 1024;

/// An ES256 key that signs JWT-SVIDs until `not_after`.
pub struct JwtAuthority {
    kid: String,
    key: EcdsaKeyPair,
    pkcs8: Zeroizing<Vec<u8>>,
    not_after: u64,
}

impl std::fmt::Debug for JwtAuthority {
    /// Everything but the private key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthority")
            .field("kid", &self.kid)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl JwtAuthority {
    /// A new key with a random 128-bit `kid`, valid until `now + ttl_secs`.
    pub fn generate(now: u64, ttl_secs: u64) -> Result<Self, PkiError> {
        if ttl_secs == 0 {
            return Err(PkiError::ZeroTtl {
                what: "JWT authority",
            });
        }
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| PkiError::KeyGeneration(e.to_string()))?;
        let mut kid = [0u8; 16];
        rng.fill(&mut kid)
            .map_err(|_| PkiError::KeyGeneration("the system random generator failed".into()))?;
        Self::from_parts(
            &URL_SAFE_NO_PAD.encode(kid),
            pkcs8.as_ref(),
            now.saturating_add(ttl_secs),
        )
    }

    /// Restores a key. The `kid` must be URL-safe text (it appears in JWKS and token headers).
    pub fn from_parts(kid: &str, pkcs8: &[u8], not_after: u64) -> Result<Self, PkiError> {
        let bad_kid = |reason| PkiError::Kid {
            kid: kid.to_owned(),
            reason,
        };
        if kid.is_empty() {
            return Err(bad_kid("empty"));
        }
        if kid.len() > MAX_KID_LEN {
            return Err(bad_kid("longer than 128 bytes"));
        }
        if !kid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad_kid("may hold only letters, digits, `-` and `_`"));
        }
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| PkiError::JwtKey(format!("not a PKCS#8 EC P-256 private key: {e}")))?;
        Ok(Self {
            kid: kid.to_owned(),
            key,
            pkcs8: Zeroizing::new(pkcs8.to_vec()),
            not_after,
        })
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// Unix seconds; no token outlives it.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// The private key as PKCS#8 DER, wiped from memory when dropped.
    pub fn key_pkcs8_der(&self) -> Zeroizing<Vec<u8>> {
        self.pkcs8.clone()
    }

    /// The public key, as it is published in the bundle under [`Self::kid`].
    pub fn public_key(&self) -> JwtKey {
        JwtKey::Ec {
            curve: EcCurve::P256,
            point: self.key.public_key().as_ref().to_vec(),
        }
    }

    /// Mints a JWT-SVID for `sub`, expiring at `now + ttl_secs` or when this key does, whichever
    /// is first. Tokens always carry `kid` and `alg: ES256`.
    ///
    /// The caller decides whether `sub` may have a token; this key signs for whatever subject it
    /// is given.
    pub fn mint(
        &self,
        sub: &SpiffeId,
        audience: &[String],
        ttl_secs: u64,
        now: u64,
    ) -> Result<String, PkiError> {
        if ttl_secs == 0 {
            return Err(PkiError::ZeroTtl { what: "JWT-SVID" });
        }
        // JWT-SVID §3.2: `aud` MUST be present with at least one value.
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(PkiError::EmptyAudience);
        }
        // Every value is signed into the token and the token travels in headers: bounded, so
        // no caller (a workload, a compromised agent) can make the CA sign megabytes.
        let longest = audience.iter().map(String::len).max().unwrap_or(0);
        if audience.len() > MAX_AUDIENCES || longest > MAX_AUDIENCE_LEN {
            return Err(PkiError::AudienceTooLarge {
                count: audience.len(),
                longest,
                max_count: MAX_AUDIENCES,
                max_len: MAX_AUDIENCE_LEN,
            });
        }
        if now >= self.not_after {
            return Err(PkiError::CaExpired {
                not_after: self.not_after,
                now,
            });
        }
        let claims = Claims {
            subject: sub,
            audience,
            issued_at: now,
            // A token never outlives the key that validates it: the key leaves the bundle then.
            expiry: now.saturating_add(ttl_secs).min(self.not_after),
        };
        Ok(mint_es256(&self.key, &self.kid, &claims)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::Bundle;
    use tessera_spiffe::TrustDomain;
    use tessera_spiffe::jwt::{Validation, parse_unverified, validate};

    fn id() -> SpiffeId {
        SpiffeId::parse("spiffe://example.org/web").unwrap()
    }

    fn aud() -> Vec<String> {
        vec!["db".to_owned()]
    }

    #[test]
    fn kids_are_random_url_safe_and_128_bits() {
        let a = JwtAuthority::generate(0, 60).unwrap();
        let b = JwtAuthority::generate(0, 60).unwrap();
        assert_ne!(a.kid(), b.kid());
        assert_eq!(URL_SAFE_NO_PAD.decode(a.kid()).unwrap().len(), 16);
    }

    #[test]
    fn tokens_expire_with_the_key_and_validate_against_its_public_key() {
        let now = 1_700_000_000;
        let key = JwtAuthority::generate(now, 100).unwrap();
        let token = key.mint(&id(), &aud(), 3600, now).unwrap();
        let (svid, _) = parse_unverified(&token).unwrap();
        assert_eq!(svid.expiry, now + 100, "capped at the key's not_after");
        assert_eq!(svid.kid, key.kid());
        assert_eq!(svid.alg.as_str(), "ES256");
        let short = key.mint(&id(), &aud(), 30, now).unwrap();
        assert_eq!(parse_unverified(&short).unwrap().0.expiry, now + 30);

        let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
        bundle
            .add_jwt_authority(key.kid(), key.public_key())
            .unwrap();
        let opts = Validation {
            audience: "db",
            now,
            leeway: 0,
        };
        assert_eq!(validate(&token, &bundle, opts).unwrap().spiffe_id, id());
    }

    #[test]
    fn minting_refuses_empty_audience_zero_ttl_and_an_expired_key() {
        let key = JwtAuthority::generate(100, 100).unwrap();
        // A bounded audience: at most MAX_AUDIENCES values of at most MAX_AUDIENCE_LEN bytes.
        let many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("a{i}")).collect();
        assert!(matches!(
            key.mint(&id(), &many, 60, 100),
            Err(PkiError::AudienceTooLarge { count: 33, .. })
        ));
        let long = vec!["a".repeat(MAX_AUDIENCE_LEN + 1)];
        assert!(matches!(
            key.mint(&id(), &long, 60, 100),
            Err(PkiError::AudienceTooLarge { .. })
        ));
        assert!(key.mint(&id(), &many[..MAX_AUDIENCES], 60, 100).is_ok());
        assert_eq!(key.mint(&id(), &[], 60, 100), Err(PkiError::EmptyAudience));
        assert_eq!(
            key.mint(&id(), &[String::new()], 60, 100),
            Err(PkiError::EmptyAudience)
        );
        assert!(matches!(
            key.mint(&id(), &aud(), 0, 100),
            Err(PkiError::ZeroTtl { .. })
        ));
        assert!(matches!(
            key.mint(&id(), &aud(), 60, 200),
            Err(PkiError::CaExpired { .. })
        ));
    }

    #[test]
    fn restoring_checks_kid_and_key() {
        let key = JwtAuthority::generate(0, 60).unwrap();
        let again = JwtAuthority::from_parts(key.kid(), &key.key_pkcs8_der(), 60).unwrap();
        assert_eq!(again.public_key(), key.public_key());
        for kid in ["", "a b", "a/b", "a.b", &"k".repeat(129)] {
            assert!(
                matches!(
                    JwtAuthority::from_parts(kid, &key.key_pkcs8_der(), 60),
                    Err(PkiError::Kid { .. })
                ),
                "{kid:?}"
            );
        }
        assert!(matches!(
            JwtAuthority::from_parts("k", b"not a key", 60),
            Err(PkiError::JwtKey(_))
        ));
    }
}
