//! Cross-checks our SPIFFE ID parser against the independent `spiffe` crate.
//!
//! The `spiffe` crate does not enforce the 255-byte trust domain and 2048-byte ID limits of
//! SPIFFE-ID §2.3, so inputs here stay inside them; the limits have their own unit tests.
//!
//! Two known, deliberate differences: the `spiffe` crate lowercases an uppercase scheme or trust
//! domain, while SPIFFE-ID §2 and §2.1 say the scheme is `spiffe` and the host "MUST be lowercase"
//! (go-spiffe rejects both too). We reject, so an ID has exactly one spelling and compares byte
//! for byte; the test asserts exactly that.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use proptest::prelude::*;
use tessera_spiffe::{SpiffeId, TrustDomain};

/// Strings that look like SPIFFE IDs, with characters chosen to hit every rule.
fn id_like() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        8 => Just("spiffe://"),
        1 => Just("SPIFFE://"),
        1 => Just("spiffe:/"),
        1 => Just("http://"),
        1 => Just(""),
    ];
    let td = "[a-z0-9._-]{0,12}|[a-zA-Z0-9._:@%?#\\[\\] -]{0,12}";
    let path = prop::collection::vec(
        "[a-zA-Z0-9._-]{0,6}|\\.|\\.\\.|[a-zA-Z0-9._%?#:@ ]{0,6}",
        0..5,
    );
    (scheme, td, path, any::<bool>()).prop_map(|(s, td, segs, trailing)| {
        let mut id = format!("{s}{td}");
        for seg in segs {
            id.push('/');
            id.push_str(&seg);
        }
        if trailing {
            id.push('/');
        }
        id
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn id_parsing_agrees_with_the_spiffe_crate(input in id_like()) {
        let ours = SpiffeId::parse(&input);
        let theirs = spiffe::SpiffeId::new(&input);
        if !input.starts_with("spiffe://") && input.to_ascii_lowercase().starts_with("spiffe://") {
            prop_assert!(matches!(ours, Err(tessera_spiffe::IdError::WrongScheme { .. })), "{:?}", input);
            return Ok(());
        }
        let authority = input.strip_prefix("spiffe://").map(|r| r.split('/').next().unwrap_or(r));
        if authority.is_some_and(|a| a.bytes().any(|b| b.is_ascii_uppercase())) && theirs.is_ok() {
            prop_assert!(
                matches!(ours, Err(tessera_spiffe::IdError::TrustDomainChar { ch, .. }) if ch.is_ascii_uppercase()),
                "uppercase trust domain {:?} must be refused, got {:?}", input, ours
            );
            return Ok(());
        }
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "input {:?}: ours {:?}, theirs {:?}", input, ours, theirs);
        if let (Ok(o), Ok(t)) = (ours, theirs) {
            prop_assert_eq!(o.trust_domain_str(), t.trust_domain().to_string());
            prop_assert_eq!(o.path(), t.path());
            prop_assert_eq!(o.to_string(), t.to_string());
        }
    }

    #[test]
    fn trust_domain_parsing_agrees_with_the_spiffe_crate(input in "[a-zA-Z0-9._:@%/ -]{0,20}") {
        let ours = TrustDomain::new(&input);
        let theirs = spiffe::TrustDomain::new(&input);
        if input.bytes().any(|b| b.is_ascii_uppercase()) && theirs.is_ok() {
            prop_assert!(ours.is_err(), "uppercase trust domain {:?} must be refused", input);
            return Ok(());
        }
        prop_assert_eq!(ours.is_ok(), theirs.is_ok(), "input {:?}: ours {:?}, theirs {:?}", input, ours, theirs);
    }

    #[test]
    fn any_string_parses_or_errors_without_panicking(input in "\\PC{0,64}") {
        let _ = SpiffeId::parse(&input);
        let _ = TrustDomain::new(&input);
    }
}
