//! JWT-SVIDs minted for workloads, reused until half their lifetime has passed (as SPIRE does), so
//! that a workload asking on every request does not make the agent ask the server every time.
//!
//! A token is cached per (entry, SPIFFE ID, audience set): only a caller entitled to the entry's
//! identity is ever handed it, because the Workload API matches the caller first. A cached token
//! whose signing key has left the bundle is dropped, so a revoked JWT authority stops being served
//! at once.

use std::collections::HashMap;
use std::sync::Mutex;

use tessera_spiffe::bundle::BundleSource;
use tessera_spiffe::{JwtError, SpiffeId};

/// At most this many tokens are kept; beyond it, stale ones go first, then those nearest their
/// refresh time. Bounds what a workload asking for many audiences can make the agent hold.
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    entry_id: String,
    spiffe_id: String,
    /// Sorted and without duplicates: `["a","b"]` and `["b","a","a"]` are one token.
    audience: Vec<String>,
}

impl TokenKey {
    pub(crate) fn new(entry_id: &str, spiffe_id: &SpiffeId, audience: &[String]) -> Self {
        let mut audience = audience.to_vec();
        audience.sort();
        audience.dedup();
        Self {
            entry_id: entry_id.to_owned(),
            spiffe_id: spiffe_id.as_str().to_owned(),
            audience,
        }
    }

    pub(crate) fn entry_id(&self) -> &str {
        &self.entry_id
    }

    /// The audience to mint for (normalised).
    pub(crate) fn audience(&self) -> &[String] {
        &self.audience
    }
}

#[derive(Debug)]
struct Cached {
    token: String,
    kid: String,
    /// Unix seconds after which the token is minted anew.
    refresh_at: u64,
}

/// Why a minted token was not accepted from the minter.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MintedTokenError {
    #[error("the minted token does not parse: {0}")]
    Parse(#[from] JwtError),
    #[error("the minted token is for {got}, not for {want}")]
    WrongSubject { got: String, want: String },
}

#[derive(Default)]
pub(crate) struct JwtCache {
    entries: Mutex<HashMap<TokenKey, Cached>>,
}

impl std::fmt::Debug for JwtCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are bearer credentials: never printed.
        f.debug_struct("JwtCache")
            .field("len", &self.lock().len())
            .finish()
    }
}

impl JwtCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TokenKey, Cached>> {
        // The map is valid after any panic of a holder (every mutation is a single call).
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Drops every cached token signed by a key for which `tainted(kid)` holds, so the next
    /// request mints a new one with the active key.
    pub(crate) fn forget_tainted(&self, tainted: impl Fn(&str) -> bool) {
        self.lock().retain(|_, c| !tainted(&c.kid));
    }

    /// A cached token for `key` that is still before its refresh time and whose key is still in
    /// `bundles`.
    pub(crate) fn get(
        &self,
        key: &TokenKey,
        spiffe_id: &SpiffeId,
        now: u64,
        bundles: &dyn BundleSource,
    ) -> Option<String> {
        let mut entries = self.lock();
        let cached = entries.get(key)?;
        let key_known = bundles
            .bundle_for(&spiffe_id.trust_domain())
            .is_some_and(|b| b.jwt_authority(&cached.kid).is_some());
        if now < cached.refresh_at && key_known {
            Some(cached.token.clone())
        } else {
            entries.remove(key);
            None
        }
    }

    /// Checks a token the minter returned and caches it. `now` stands in for a missing `iat`.
    pub(crate) fn insert(
        &self,
        key: TokenKey,
        spiffe_id: &SpiffeId,
        token: &str,
        now: u64,
    ) -> Result<(), MintedTokenError> {
        let (svid, _) = tessera_spiffe::jwt::parse_unverified(token)?;
        if svid.spiffe_id != *spiffe_id {
            return Err(MintedTokenError::WrongSubject {
                got: svid.spiffe_id.as_str().to_owned(),
                want: spiffe_id.as_str().to_owned(),
            });
        }
        let issued = svid.issued_at.unwrap_or(now).min(svid.expiry);
        let refresh_at = issued + (svid.expiry - issued) / 2;
        if refresh_at <= now {
            return Ok(());
        }
        let mut entries = self.lock();
        if entries.len() >= MAX_ENTRIES && !entries.contains_key(&key) {
            entries.retain(|_, c| c.refresh_at > now);
            if entries.len() >= MAX_ENTRIES
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, c)| c.refresh_at)
                    .map(|(k, _)| k.clone())
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(
            key,
            Cached {
                token: token.to_owned(),
                kid: svid.kid,
                refresh_at,
            },
        );
        Ok(())
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tessera_spiffe::Bundle;
    use tessera_spiffe::jwt::{Claims, mint_es256};
    use tessera_test_util::JwtSigner;

    fn mint(signer: &JwtSigner, id: &SpiffeId, iat: u64, exp: u64) -> String {
        mint_es256(
            &signer.key,
            &signer.kid,
            &Claims {
                subject: id,
                audience: &["aud".to_owned()],
                issued_at: iat,
                expiry: exp,
            },
        )
        .unwrap()
    }

    fn setup() -> (JwtSigner, SpiffeId, Bundle) {
        let signer = JwtSigner::new("k1");
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let mut bundle = Bundle::new(id.trust_domain());
        signer.add_to(&mut bundle);
        (signer, id, bundle)
    }

    #[test]
    fn audience_order_and_duplicates_do_not_matter() {
        let id = SpiffeId::parse("spiffe://example.org/w").unwrap();
        let a = TokenKey::new("e", &id, &["b".into(), "a".into(), "a".into()]);
        let b = TokenKey::new("e", &id, &["a".into(), "b".into()]);
        assert_eq!(a, b);
    }

    #[test]
    fn a_token_is_reused_until_half_its_lifetime() {
        let (signer, id, bundle) = setup();
        let cache = JwtCache::default();
        let key = TokenKey::new("e", &id, &["aud".into()]);
        let token = mint(&signer, &id, 1000, 1300);
        cache.insert(key.clone(), &id, &token, 1000).unwrap();
        assert_eq!(cache.get(&key, &id, 1149, &bundle), Some(token));
        assert_eq!(cache.get(&key, &id, 1150, &bundle), None);
        assert_eq!(cache.len(), 0);
    }

    #[test]
    fn a_token_whose_key_left_the_bundle_is_not_served() {
        let (signer, id, _) = setup();
        let cache = JwtCache::default();
        let key = TokenKey::new("e", &id, &["aud".into()]);
        cache
            .insert(key.clone(), &id, &mint(&signer, &id, 1000, 1300), 1000)
            .unwrap();
        let empty = Bundle::new(id.trust_domain());
        assert_eq!(cache.get(&key, &id, 1001, &empty), None);
    }

    #[test]
    fn a_token_for_another_subject_is_refused() {
        let (signer, id, _) = setup();
        let other = SpiffeId::parse("spiffe://example.org/other").unwrap();
        let cache = JwtCache::default();
        let err = cache
            .insert(
                TokenKey::new("e", &id, &["aud".into()]),
                &id,
                &mint(&signer, &other, 1000, 1300),
                1000,
            )
            .unwrap_err();
        assert!(matches!(err, MintedTokenError::WrongSubject { .. }));
        assert!(matches!(
            cache.insert(TokenKey::new("e", &id, &["aud".into()]), &id, "garbage", 1),
            Err(MintedTokenError::Parse(_))
        ));
    }

    #[test]
    fn the_cache_is_bounded() {
        let (signer, id, _) = setup();
        let cache = JwtCache::default();
        let token = mint(&signer, &id, 1000, 1300);
        for i in 0..MAX_ENTRIES + 5 {
            cache
                .insert(
                    TokenKey::new("e", &id, &[format!("aud{i}")]),
                    &id,
                    &token,
                    1000,
                )
                .unwrap();
        }
        assert_eq!(cache.len(), MAX_ENTRIES);
    }
}
