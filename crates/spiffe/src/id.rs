//! SPIFFE IDs and trust domain names, parsed exactly per the SPIFFE-ID standard (§2).
//!
//! Parsing never allocates more than the returned value and reports the first broken rule with the
//! byte offset where it was found, so `tessera id check` can point at the offending character.

use std::fmt;
use std::str::FromStr;

/// SPIFFE-ID §2: the scheme is `spiffe` and the ID is an absolute URI with an authority.
const SCHEME_PREFIX: &str = "spiffe://";

/// SPIFFE-ID §2.3: implementations MUST support IDs up to 2048 bytes; we accept exactly that and
/// refuse longer ones, since we SHOULD NOT generate them either.
pub const MAX_ID_LEN: usize = 2048;

/// SPIFFE-ID §2.3: RFC 3986 limits the host to 255 characters, so a trust domain name is at most 255 bytes.
pub const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Which rule of the SPIFFE-ID standard an input broke, and where (byte offsets into the input).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    #[error("SPIFFE ID is empty (SPIFFE-ID §2)")]
    Empty,
    #[error("scheme must be `spiffe://` (SPIFFE-ID §2); got {found:?}")]
    WrongScheme { found: String },
    #[error("trust domain is empty (SPIFFE-ID §2.1: the host MUST NOT be empty)")]
    EmptyTrustDomain,
    #[error(
        "trust domain is {len} bytes; at most {MAX_TRUST_DOMAIN_LEN} are allowed (SPIFFE-ID §2.3)"
    )]
    TrustDomainTooLong { len: usize },
    #[error("SPIFFE ID is {len} bytes; at most {MAX_ID_LEN} are allowed (SPIFFE-ID §2.3)")]
    TooLong { len: usize },
    #[error(
        "trust domain has {ch:?} at byte {at}: only lowercase letters, digits, `.`, `-` and `_` are allowed (SPIFFE-ID §2.1)"
    )]
    TrustDomainChar { ch: char, at: usize },
    #[error("port at byte {at}: a SPIFFE ID MUST NOT have a port (SPIFFE-ID §2.1)")]
    Port { at: usize },
    #[error("userinfo (`@`) at byte {at}: a SPIFFE ID MUST NOT have userinfo (SPIFFE-ID §2.1)")]
    UserInfo { at: usize },
    #[error("query (`?`) at byte {at}: a SPIFFE ID MUST NOT have a query (SPIFFE-ID §2)")]
    Query { at: usize },
    #[error("fragment (`#`) at byte {at}: a SPIFFE ID MUST NOT have a fragment (SPIFFE-ID §2)")]
    Fragment { at: usize },
    #[error("percent-encoding at byte {at} is not allowed (SPIFFE-ID §2.1, §2.2)")]
    PercentEncoded { at: usize },
    #[error("empty path segment at byte {at} (SPIFFE-ID §2.2)")]
    EmptySegment { at: usize },
    #[error("`.` or `..` path segment at byte {at} (SPIFFE-ID §2.2)")]
    DotSegment { at: usize },
    #[error("trailing `/` at byte {at} (SPIFFE-ID §2.2)")]
    TrailingSlash { at: usize },
    #[error(
        "path has {ch:?} at byte {at}: only letters, digits, `.`, `-` and `_` are allowed in a segment (SPIFFE-ID §2.2)"
    )]
    PathChar { ch: char, at: usize },
    #[error("a trust domain has no path; got {path:?}")]
    TrustDomainHasPath { path: String },
    #[error("path must be empty or start with `/`; got {found:?}")]
    RelativePath { found: String },
}

/// A trust domain name (`example.org`), valid per SPIFFE-ID §2.1.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(String);

impl TrustDomain {
    /// Parses a bare trust domain name (`example.org`) or a trust domain ID (`spiffe://example.org`),
    /// as go-spiffe and SPIRE accept both wherever a trust domain is configured.
    pub fn new(input: &str) -> Result<Self, IdError> {
        if input.contains("://") {
            let id = SpiffeId::parse(input)?;
            if !id.is_root() {
                return Err(IdError::TrustDomainHasPath {
                    path: id.path().to_owned(),
                });
            }
            return Ok(id.trust_domain());
        }
        validate_trust_domain(input, 0)?;
        Ok(Self(input.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<name>`.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            uri: format!("{SCHEME_PREFIX}{}", self.0),
            path_start: SCHEME_PREFIX.len() + self.0.len(),
        }
    }

    /// An ID in this trust domain with the given path (`/a/b`, or `` for the root).
    pub fn id_with_path(&self, path: &str) -> Result<SpiffeId, IdError> {
        if !path.is_empty() && !path.starts_with('/') {
            return Err(IdError::RelativePath {
                found: path.to_owned(),
            });
        }
        SpiffeId::parse(&format!("{SCHEME_PREFIX}{}{path}", self.0))
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A SPIFFE ID (`spiffe://example.org/payments/api`), valid per SPIFFE-ID §2.
///
/// Stored as the exact input string (a valid ID has exactly one spelling: the standard admits no
/// case folding, percent-encoding or dot segments), with the offset where the path begins.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SpiffeId {
    uri: String,
    path_start: usize,
}

impl SpiffeId {
    /// Parses a SPIFFE ID, reporting the first rule it breaks.
    pub fn parse(input: &str) -> Result<Self, IdError> {
        if input.is_empty() {
            return Err(IdError::Empty);
        }
        let Some(rest) = input.strip_prefix(SCHEME_PREFIX) else {
            // SPIFFE-ID §2: "Valid SPIFFE IDs MUST have the scheme set to `spiffe`". Scheme case
            // folding is not accepted: an ID has one spelling, so it compares byte for byte.
            let shown = match input.find("://") {
                Some(i) => &input[..i + 3],
                None => input.get(..input.len().min(16)).unwrap_or(input),
            };
            return Err(IdError::WrongScheme {
                found: shown.to_owned(),
            });
        };
        // SPIFFE-ID §2.3: the whole URI counts, scheme and separator included.
        if input.len() > MAX_ID_LEN {
            return Err(IdError::TooLong { len: input.len() });
        }
        let base = SCHEME_PREFIX.len();
        let td_len = rest.find('/').unwrap_or(rest.len());
        validate_trust_domain(&rest[..td_len], base)?;
        let path_start = base + td_len;
        validate_path(&input[path_start..], path_start)?;
        Ok(Self {
            uri: input.to_owned(),
            path_start,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.uri[SCHEME_PREFIX.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().to_owned())
    }

    /// The path, `""` for the trust domain's own ID, else starting with `/`.
    pub fn path(&self) -> &str {
        &self.uri[self.path_start..]
    }

    /// True for `spiffe://<td>` (no path): the trust domain itself, never a workload.
    pub fn is_root(&self) -> bool {
        self.path_start == self.uri.len()
    }

    pub fn is_member_of(&self, td: &TrustDomain) -> bool {
        self.trust_domain_str() == td.as_str()
    }

    /// The path's segments, in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> {
        self.path().split('/').skip(1)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl FromStr for SpiffeId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::new(&s).map_err(serde::de::Error::custom)
    }
}

/// SPIFFE-ID §2.1. `offset` is where `td` starts in the caller's input, for error positions.
fn validate_trust_domain(td: &str, offset: usize) -> Result<(), IdError> {
    if td.is_empty() {
        return Err(IdError::EmptyTrustDomain);
    }
    for (i, ch) in td.char_indices() {
        let at = offset + i;
        match ch {
            'a'..='z' | '0'..='9' | '.' | '-' | '_' => {}
            // Name the URI component the character would start, since that is the rule it breaks.
            ':' => return Err(IdError::Port { at }),
            '@' => return Err(IdError::UserInfo { at }),
            '?' => return Err(IdError::Query { at }),
            '#' => return Err(IdError::Fragment { at }),
            '%' => return Err(IdError::PercentEncoded { at }),
            _ => return Err(IdError::TrustDomainChar { ch, at }),
        }
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(IdError::TrustDomainTooLong { len: td.len() });
    }
    Ok(())
}

/// SPIFFE-ID §2.2. `path` is empty or starts with `/`; `offset` is where it starts in the input.
fn validate_path(path: &str, offset: usize) -> Result<(), IdError> {
    if path.is_empty() {
        return Ok(());
    }
    let bytes = path.as_bytes();
    let mut seg_start = 1; // index just after a '/'
    for (i, ch) in path.char_indices().skip(1) {
        let at = offset + i;
        match ch {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => {}
            '/' => {
                check_segment(&path[seg_start..i], offset + seg_start)?;
                seg_start = i + 1;
            }
            '?' => return Err(IdError::Query { at }),
            '#' => return Err(IdError::Fragment { at }),
            '%' => return Err(IdError::PercentEncoded { at }),
            _ => return Err(IdError::PathChar { ch, at }),
        }
    }
    if bytes.last() == Some(&b'/') {
        return Err(IdError::TrailingSlash {
            at: offset + path.len() - 1,
        });
    }
    check_segment(&path[seg_start..], offset + seg_start)
}

fn check_segment(seg: &str, at: usize) -> Result<(), IdError> {
    match seg {
        "" => Err(IdError::EmptySegment { at }),
        "." | ".." => Err(IdError::DotSegment { at }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Table of SPIFFE-ID §2 rules: (input, expected result).
    #[test]
    fn id_rules_table() {
        use IdError::*;
        /// (trust domain, path) of a valid ID, or the error.
        type Want = Result<(&'static str, &'static str), IdError>;
        let cases: &[(&str, Want)] = &[
            // §2: scheme, authority, optional path.
            ("spiffe://example.org", Ok(("example.org", ""))),
            (
                "spiffe://example.org/a/b-c/d_e/F.9",
                Ok(("example.org", "/a/b-c/d_e/F.9")),
            ),
            ("spiffe://1.2.3.4/x", Ok(("1.2.3.4", "/x"))),
            (
                "spiffe://a_b-c.d/...x/..y/.z",
                Ok(("a_b-c.d", "/...x/..y/.z")),
            ),
            ("", Err(Empty)),
            (
                "http://example.org/a",
                Err(WrongScheme {
                    found: "http://".into(),
                }),
            ),
            (
                "SPIFFE://example.org/a",
                Err(WrongScheme {
                    found: "SPIFFE://".into(),
                }),
            ),
            (
                "spiffe:/example.org/a",
                Err(WrongScheme {
                    found: "spiffe:/example.".into(),
                }),
            ),
            (
                "example.org/a",
                Err(WrongScheme {
                    found: "example.org/a".into(),
                }),
            ),
            // §2.1 trust domain.
            ("spiffe://", Err(EmptyTrustDomain)),
            ("spiffe:///a", Err(EmptyTrustDomain)),
            (
                "spiffe://Example.org/a",
                Err(TrustDomainChar { ch: 'E', at: 9 }),
            ),
            (
                "spiffe://exa mple.org",
                Err(TrustDomainChar { ch: ' ', at: 12 }),
            ),
            ("spiffe://[::1]/a", Err(TrustDomainChar { ch: '[', at: 9 })),
            ("spiffe://example.org:443/a", Err(Port { at: 20 })),
            ("spiffe://user@example.org/a", Err(UserInfo { at: 13 })),
            ("spiffe://example.org?x=1", Err(Query { at: 20 })),
            ("spiffe://example.org#f", Err(Fragment { at: 20 })),
            ("spiffe://exa%41mple.org", Err(PercentEncoded { at: 12 })),
            (
                "spiffe://exämple.org",
                Err(TrustDomainChar { ch: 'ä', at: 11 }),
            ),
            // §2.2 path.
            ("spiffe://example.org/", Err(TrailingSlash { at: 20 })),
            ("spiffe://example.org/a/", Err(TrailingSlash { at: 22 })),
            ("spiffe://example.org//a", Err(EmptySegment { at: 21 })),
            ("spiffe://example.org/a//b", Err(EmptySegment { at: 23 })),
            ("spiffe://example.org/./a", Err(DotSegment { at: 21 })),
            ("spiffe://example.org/a/..", Err(DotSegment { at: 23 })),
            ("spiffe://example.org/a/../b", Err(DotSegment { at: 23 })),
            ("spiffe://example.org/a%2Fb", Err(PercentEncoded { at: 22 })),
            ("spiffe://example.org/a?x", Err(Query { at: 22 })),
            ("spiffe://example.org/a#x", Err(Fragment { at: 22 })),
            (
                "spiffe://example.org/a b",
                Err(PathChar { ch: ' ', at: 22 }),
            ),
            (
                "spiffe://example.org/a:b",
                Err(PathChar { ch: ':', at: 22 }),
            ),
            (
                "spiffe://example.org/a@b",
                Err(PathChar { ch: '@', at: 22 }),
            ),
            ("spiffe://example.org/ü", Err(PathChar { ch: 'ü', at: 21 })),
        ];
        for (input, want) in cases {
            let got = SpiffeId::parse(input);
            match (want, &got) {
                (Ok((td, path)), Ok(id)) => {
                    assert_eq!(id.trust_domain_str(), *td, "{input}");
                    assert_eq!(id.path(), *path, "{input}");
                    assert_eq!(id.to_string(), *input, "display round-trips {input}");
                }
                (Err(e), Err(g)) => assert_eq!(g, e, "{input}"),
                _ => panic!("{input}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn id_of_exactly_2048_bytes_is_accepted_and_2049_rejected() {
        // §2.3: MUST support up to 2048 bytes. Build a path of 63-byte segments to reach the limit.
        let prefix = "spiffe://example.org";
        let mut id = prefix.to_owned();
        while id.len() + 64 <= MAX_ID_LEN {
            id.push('/');
            id.push_str(&"a".repeat(63));
        }
        let pad = MAX_ID_LEN - id.len() - 1;
        id.push('/');
        id.push_str(&"b".repeat(pad));
        assert_eq!(id.len(), MAX_ID_LEN);
        assert!(SpiffeId::parse(&id).is_ok());
        id.push('c');
        assert_eq!(
            SpiffeId::parse(&id),
            Err(IdError::TooLong {
                len: MAX_ID_LEN + 1
            })
        );
    }

    #[test]
    fn trust_domain_of_255_bytes_is_accepted_and_256_rejected() {
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN);
        assert!(TrustDomain::new(&td).is_ok());
        assert!(SpiffeId::parse(&format!("spiffe://{td}/x")).is_ok());
        let td = "a".repeat(MAX_TRUST_DOMAIN_LEN + 1);
        assert_eq!(
            TrustDomain::new(&td),
            Err(IdError::TrustDomainTooLong { len: 256 })
        );
        assert_eq!(
            SpiffeId::parse(&format!("spiffe://{td}/x")),
            Err(IdError::TrustDomainTooLong { len: 256 })
        );
    }

    #[test]
    fn trust_domain_accepts_name_or_root_id_only() {
        assert_eq!(
            TrustDomain::new("example.org").unwrap().as_str(),
            "example.org"
        );
        assert_eq!(
            TrustDomain::new("spiffe://example.org").unwrap().as_str(),
            "example.org"
        );
        assert!(TrustDomain::new("spiffe://example.org/a").is_err());
        assert_eq!(TrustDomain::new(""), Err(IdError::EmptyTrustDomain));
        assert_eq!(TrustDomain::new("a:1"), Err(IdError::Port { at: 1 }));
    }

    #[test]
    fn ids_built_from_a_trust_domain_are_validated() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(td.id().as_str(), "spiffe://example.org");
        assert!(td.id().is_root());
        let id = td.id_with_path("/ns/web").unwrap();
        assert_eq!(id.segments().collect::<Vec<_>>(), ["ns", "web"]);
        assert!(id.is_member_of(&td));
        assert!(td.id_with_path("ns").is_err());
        assert!(td.id_with_path("/a/../b").is_err());
    }
}
