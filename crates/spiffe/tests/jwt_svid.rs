//! JWT-SVID validation, one row per rule of the JWT-SVID standard.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use serde_json::{Value, json};
use tessera_spiffe::jwt::{self, Claims, JwtError, Validation};
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use tessera_test_util::{JwtSigner, RsaJwtSigner, unix_now};

const NOW: u64 = 1_800_000_000;

/// A predicate on the error a table row expects.
type Expect = fn(&JwtError) -> bool;

fn opts() -> Validation<'static> {
    Validation {
        audience: "spiffe://example.org/db",
        now: NOW,
        leeway: 30,
    }
}

fn setup() -> (JwtSigner, BundleSet) {
    let signer = JwtSigner::new("k1");
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    signer.add_to(&mut bundle);
    let mut set = BundleSet::new();
    set.insert(bundle).unwrap();
    (signer, set)
}

fn header() -> Value {
    json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
}

fn claims() -> Value {
    json!({"sub": "spiffe://example.org/web", "aud": ["spiffe://example.org/db"], "exp": NOW + 300, "iat": NOW})
}

#[test]
fn minted_token_validates_and_carries_kid_and_es256() {
    let (signer, set) = setup();
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["spiffe://example.org/db".to_owned(), "other".to_owned()];
    let token = jwt::mint_es256(
        &signer.key,
        "k1",
        &Claims {
            subject: &sub,
            audience: &aud,
            issued_at: NOW,
            expiry: NOW + 300,
        },
    )
    .unwrap();
    let svid = jwt::validate(&token, &set, opts()).unwrap();
    assert_eq!(svid.spiffe_id, sub);
    assert_eq!(svid.audience, aud);
    assert_eq!(svid.expiry, NOW + 300);
    assert_eq!(svid.kid, "k1");
    assert_eq!(svid.alg, jwt::Alg::ES256);
    // The other audience is accepted too; a third is not.
    assert!(
        jwt::validate(
            &token,
            &set,
            Validation {
                audience: "other",
                ..opts()
            }
        )
        .is_ok()
    );
    assert!(matches!(
        jwt::validate(
            &token,
            &set,
            Validation {
                audience: "third",
                ..opts()
            }
        ),
        Err(JwtError::AudienceMismatch { .. })
    ));
}

#[test]
fn header_rules() {
    let (signer, set) = setup();
    let rows: &[(&str, Value, Expect)] = &[
        // §2.1: the allowlist, checked before anything else (the bogus `jku` is never reached).
        (
            "alg none",
            json!({"alg": "none", "kid": "k1", "jku": "https://evil"}),
            |e| matches!(e, JwtError::UnsupportedAlg { alg } if alg == "none"),
        ),
        ("alg HS256", json!({"alg": "HS256", "kid": "k1"}), |e| {
            matches!(e, JwtError::UnsupportedAlg { .. })
        }),
        ("alg EdDSA", json!({"alg": "EdDSA", "kid": "k1"}), |e| {
            matches!(e, JwtError::UnsupportedAlg { .. })
        }),
        ("alg not a string", json!({"alg": 256, "kid": "k1"}), |e| {
            matches!(e, JwtError::UnsupportedAlg { .. })
        }),
        ("no alg", json!({"kid": "k1"}), |e| {
            *e == JwtError::MissingAlg
        }),
        // §2: no header beyond alg/kid/typ.
        (
            "jku header",
            json!({"alg": "ES256", "kid": "k1", "jku": "https://evil"}),
            |e| matches!(e, JwtError::ForbiddenHeader { name } if name == "jku"),
        ),
        (
            "jwk header",
            json!({"alg": "ES256", "kid": "k1", "jwk": {}}),
            |e| matches!(e, JwtError::ForbiddenHeader { name } if name == "jwk"),
        ),
        (
            "crit header",
            json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
            |e| matches!(e, JwtError::ForbiddenHeader { .. }),
        ),
        // §2.3: typ JWT or JOSE.
        (
            "typ at+jwt",
            json!({"alg": "ES256", "kid": "k1", "typ": "at+jwt"}),
            |e| matches!(e, JwtError::BadType { .. }),
        ),
        // A validator needs kid to pick the key.
        ("no kid", json!({"alg": "ES256"}), |e| {
            *e == JwtError::MissingKid
        }),
        ("kid not a string", json!({"alg": "ES256", "kid": 1}), |e| {
            matches!(e, JwtError::HeaderNotString { name: "kid" })
        }),
        ("unknown kid", json!({"alg": "ES256", "kid": "nope"}), |e| {
            matches!(e, JwtError::UnknownKid { .. })
        }),
        // The EC key cannot verify an RSA or P-384 alg.
        (
            "alg/key mismatch",
            json!({"alg": "ES384", "kid": "k1"}),
            |e| matches!(e, JwtError::KeyAlgMismatch { .. }),
        ),
        (
            "alg/key type mismatch",
            json!({"alg": "RS256", "kid": "k1"}),
            |e| matches!(e, JwtError::KeyAlgMismatch { .. }),
        ),
    ];
    for (name, h, want) in rows {
        let token = signer.sign_raw(h, &claims());
        let err = jwt::validate(&token, &set, opts()).unwrap_err();
        assert!(want(&err), "{name}: got {err:?}");
    }
    for typ in ["JWT", "JOSE"] {
        let token = signer.sign_raw(&json!({"alg": "ES256", "kid": "k1", "typ": typ}), &claims());
        assert!(jwt::validate(&token, &set, opts()).is_ok(), "typ {typ}");
    }
    // typ is optional (§2.3).
    let token = signer.sign_raw(&json!({"alg": "ES256", "kid": "k1"}), &claims());
    assert!(jwt::validate(&token, &set, opts()).is_ok());
}

#[test]
fn claim_rules() {
    let (signer, set) = setup();
    let with = |f: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut c = claims();
        f(c.as_object_mut().unwrap());
        signer.sign_raw(&header(), &c)
    };
    let rows: Vec<(&str, String, Expect)> = vec![
        // §3.1
        (
            "no sub",
            with(&|c| {
                c.remove("sub");
            }),
            |e| *e == JwtError::MissingSubject,
        ),
        (
            "sub not a SPIFFE ID",
            with(&|c| {
                c.insert("sub".into(), json!("https://example.org/web"));
            }),
            |e| matches!(e, JwtError::Subject(_)),
        ),
        (
            "sub with a trailing slash",
            with(&|c| {
                c.insert("sub".into(), json!("spiffe://example.org/web/"));
            }),
            |e| matches!(e, JwtError::Subject(_)),
        ),
        // §3.2
        (
            "no aud",
            with(&|c| {
                c.remove("aud");
            }),
            |e| *e == JwtError::MissingAudience,
        ),
        (
            "empty aud",
            with(&|c| {
                c.insert("aud".into(), json!([]));
            }),
            |e| *e == JwtError::MissingAudience,
        ),
        (
            "aud of numbers",
            with(&|c| {
                c.insert("aud".into(), json!([1]));
            }),
            |e| *e == JwtError::BadAudience,
        ),
        (
            "wrong aud",
            with(&|c| {
                c.insert("aud".into(), json!("spiffe://example.org/other"));
            }),
            |e| matches!(e, JwtError::AudienceMismatch { .. }),
        ),
        // §3.3
        (
            "no exp",
            with(&|c| {
                c.remove("exp");
            }),
            |e| *e == JwtError::MissingExpiry,
        ),
        (
            "exp a string",
            with(&|c| {
                c.insert("exp".into(), json!("soon"));
            }),
            |e| matches!(e, JwtError::BadNumericDate { claim: "exp" }),
        ),
        (
            "negative exp",
            with(&|c| {
                c.insert("exp".into(), json!(-1));
            }),
            |e| matches!(e, JwtError::BadNumericDate { claim: "exp" }),
        ),
        (
            "expired beyond leeway",
            with(&|c| {
                c.insert("exp".into(), json!(NOW - 31));
            }),
            |e| matches!(e, JwtError::Expired { .. }),
        ),
        (
            "nbf in the future",
            with(&|c| {
                c.insert("nbf".into(), json!(NOW + 31));
            }),
            |e| matches!(e, JwtError::NotYetValid { .. }),
        ),
        // The bundle is chosen by the subject's trust domain.
        (
            "subject of another trust domain",
            with(&|c| {
                c.insert("sub".into(), json!("spiffe://other.org/web"));
            }),
            |e| matches!(e, JwtError::NoBundle { trust_domain } if trust_domain == "other.org"),
        ),
    ];
    for (name, token, want) in &rows {
        let err = jwt::validate(token, &set, opts()).unwrap_err();
        assert!(want(&err), "{name}: got {err:?}");
    }
    // Within the leeway both ways, and a single-string aud, are fine.
    for token in [
        with(&|c| {
            c.insert("exp".into(), json!(NOW - 30));
        }),
        with(&|c| {
            c.insert("nbf".into(), json!(NOW + 30));
        }),
        with(&|c| {
            c.insert("aud".into(), json!("spiffe://example.org/db"));
        }),
        with(&|c| {
            c.insert("exp".into(), json!((NOW + 10) as f64 + 0.5));
        }),
    ] {
        assert!(jwt::validate(&token, &set, opts()).is_ok(), "{token}");
    }
}

#[test]
fn signature_and_encoding_rules() {
    let (signer, set) = setup();
    let good = signer.sign_raw(&header(), &claims());
    // A token signed by a key that is not in the bundle under that kid.
    let impostor = JwtSigner::new("k1").sign_raw(&header(), &claims());
    assert!(matches!(
        jwt::validate(&impostor, &set, opts()),
        Err(JwtError::BadSignature { .. })
    ));
    // Claims swapped after signing.
    let parts: Vec<&str> = good.split('.').collect();
    let other = signer.sign_raw(&header(), &json!({"sub": "spiffe://example.org/admin", "aud": "spiffe://example.org/db", "exp": NOW + 300}));
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert!(matches!(
        jwt::validate(&forged, &set, opts()),
        Err(JwtError::BadSignature { .. })
    ));
    // §1, §5.1: compact serialization only.
    for bad in ["", "a.b", "a.b.c.d", "a.b.c.d.e"] {
        assert_eq!(
            jwt::validate(bad, &set, opts()).unwrap_err(),
            JwtError::NotCompact,
            "{bad:?}"
        );
    }
    let json_serialization =
        r#"{"payload":"e30","signatures":[{"protected":"e30","signature":""}]}"#;
    assert_eq!(
        jwt::validate(json_serialization, &set, opts()).unwrap_err(),
        JwtError::NotCompact
    );
    // Padding and non-base64url characters.
    let padded = format!("{}=.{}.{}", parts[0], parts[1], parts[2]);
    assert!(matches!(
        jwt::validate(&padded, &set, opts()),
        Err(JwtError::Base64 { part: "header" })
    ));
    let bad_sig = format!("{}.{}.{}+", parts[0], parts[1], parts[2]);
    assert!(matches!(
        jwt::validate(&bad_sig, &set, opts()),
        Err(JwtError::Base64 { part: "signature" })
    ));
    // Duplicate header or claim names (a second `alg` must not slip past the allowlist).
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let dup = format!(
        "{}.{}.{}",
        b64(r#"{"alg":"ES256","kid":"k1","alg":"none"}"#),
        parts[1],
        parts[2]
    );
    assert!(matches!(
        jwt::validate(&dup, &set, opts()),
        Err(JwtError::Json { part: "header", .. })
    ));
    let huge = "a".repeat(jwt::MAX_TOKEN_LEN + 1);
    assert!(matches!(
        jwt::validate(&huge, &set, opts()),
        Err(JwtError::TooLarge { .. })
    ));
}

#[test]
fn rsa_and_pss_algorithms_of_the_allowlist_verify() {
    let rsa = RsaJwtSigner::new("r1");
    let mut bundle = Bundle::new(TrustDomain::new("example.org").unwrap());
    bundle.add_jwt_authority("r1", rsa.public()).unwrap();
    for alg in ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"] {
        let token = rsa.sign_raw(alg, &json!({"alg": alg, "kid": "r1"}), &claims());
        let svid = jwt::validate(&token, &bundle, opts()).unwrap_or_else(|e| panic!("{alg}: {e}"));
        assert_eq!(svid.alg.as_str(), alg);
        // The same signature under a different alg of the family fails.
        let other = if alg.starts_with("RS") {
            "PS256"
        } else {
            "RS256"
        };
        let parts: Vec<&str> = token.split('.').collect();
        use base64::Engine as _;
        let h = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(json!({"alg": other, "kid": "r1"}).to_string());
        let swapped = format!("{h}.{}.{}", parts[1], parts[2]);
        assert!(
            matches!(
                jwt::validate(&swapped, &bundle, opts()),
                Err(JwtError::BadSignature { .. })
            ),
            "{alg}->{other}"
        );
    }
}

#[test]
fn real_clock_round_trip() {
    let (signer, set) = setup();
    let now = unix_now();
    let sub = SpiffeId::parse("spiffe://example.org/web").unwrap();
    let aud = vec!["a".to_owned()];
    let token = jwt::mint_es256(
        &signer.key,
        "k1",
        &Claims {
            subject: &sub,
            audience: &aud,
            issued_at: now,
            expiry: now + 60,
        },
    )
    .unwrap();
    let svid = jwt::validate(
        &token,
        &set,
        Validation {
            audience: "a",
            now,
            leeway: 0,
        },
    )
    .unwrap();
    assert_eq!(svid.issued_at, Some(now));
    assert!(
        jwt::mint_es256(
            &signer.key,
            "",
            &Claims {
                subject: &sub,
                audience: &aud,
                issued_at: now,
                expiry: now
            }
        )
        .is_err()
    );
    assert!(
        jwt::mint_es256(
            &signer.key,
            "k1",
            &Claims {
                subject: &sub,
                audience: &[],
                issued_at: now,
                expiry: now
            }
        )
        .is_err()
    );
}
