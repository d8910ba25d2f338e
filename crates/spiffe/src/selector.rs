//! Selectors: `type:value` facts about a workload or a node (`unix:uid:1000`, `agent:join_token:ID`).
//!
//! A registration entry matches a caller when every one of the entry's selectors is among the
//! caller's (a subset match). An entry therefore needs at least one selector: the empty set is a
//! subset of everything and would match every caller.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest selector accepted (type, colon and value), to bound what a request can make us store.
pub const MAX_SELECTOR_LEN: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    #[error("selector {input:?}: expected `type:value`, like unix:uid:1000")]
    Shape { input: String },
    #[error(
        "selector {input:?}: type {kind:?} must be lowercase letters, digits, `_` or `-`, starting with a letter"
    )]
    Type { input: String, kind: String },
    #[error("selector {input:?}: value must not be empty")]
    EmptyValue { input: String },
    #[error("selector {input:?}: value must not contain control characters")]
    ControlChar { input: String },
    #[error("selector is {len} bytes; at most {MAX_SELECTOR_LEN} are allowed")]
    TooLong { len: usize },
}

/// One selector. Ordered by type then value, so a sorted set has one canonical order.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Parses `type:value`; the value may itself contain `:` (`unix:uid:1000` is type `unix`,
    /// value `uid:1000`).
    pub fn parse(input: &str) -> Result<Self, SelectorError> {
        if input.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong { len: input.len() });
        }
        let Some((kind, value)) = input.split_once(':') else {
            return Err(SelectorError::Shape {
                input: input.to_owned(),
            });
        };
        Self::new(kind, value).map_err(|e| match e {
            SelectorError::Type { kind, .. } => SelectorError::Type {
                input: input.to_owned(),
                kind,
            },
            SelectorError::EmptyValue { .. } => SelectorError::EmptyValue {
                input: input.to_owned(),
            },
            SelectorError::ControlChar { .. } => SelectorError::ControlChar {
                input: input.to_owned(),
            },
            other => other,
        })
    }

    pub fn new(kind: &str, value: &str) -> Result<Self, SelectorError> {
        let input = || format!("{kind}:{value}");
        let mut chars = kind.chars();
        let type_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase())
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if !type_ok {
            return Err(SelectorError::Type {
                input: input(),
                kind: kind.to_owned(),
            });
        }
        if value.is_empty() {
            return Err(SelectorError::EmptyValue { input: input() });
        }
        if value.chars().any(char::is_control) {
            return Err(SelectorError::ControlChar { input: input() });
        }
        if kind.len() + 1 + value.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError::TooLong {
                len: kind.len() + 1 + value.len(),
            });
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    pub fn kind(&self) -> &str {
        &self.kind
    }

    pub fn value(&self) -> &str {
        &self.value
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Selector({self})")
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// True when every selector of `required` is in `have`: the entry-matching rule.
/// An empty `required` never matches (see the module docs).
pub fn matches(required: &BTreeSet<Selector>, have: &BTreeSet<Selector>) -> bool {
    !required.is_empty() && required.is_subset(have)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<Selector> {
        items.iter().map(|s| Selector::parse(s).unwrap()).collect()
    }

    #[test]
    fn selectors_parse_type_and_value() {
        let s = Selector::parse("unix:uid:1000").unwrap();
        assert_eq!((s.kind(), s.value()), ("unix", "uid:1000"));
        assert_eq!(s.to_string(), "unix:uid:1000");
        for (bad, want) in [
            ("unix", "expected `type:value`"),
            (":x", "type \"\""),
            ("Unix:uid:1", "type \"Unix\""),
            ("1x:y", "type \"1x\""),
            ("unix:", "value must not be empty"),
            ("unix:a\nb", "control characters"),
        ] {
            let err = Selector::parse(bad).unwrap_err().to_string();
            assert!(err.contains(want), "{bad:?}: {err}");
        }
        assert!(matches!(
            Selector::parse(&format!("k:{}", "v".repeat(MAX_SELECTOR_LEN))),
            Err(SelectorError::TooLong { .. })
        ));
    }

    #[test]
    fn entry_matches_when_its_selectors_are_a_subset() {
        let caller = set(&["unix:uid:1000", "unix:gid:1000", "unix:user:web"]);
        assert!(matches(&set(&["unix:uid:1000"]), &caller));
        assert!(matches(&set(&["unix:uid:1000", "unix:user:web"]), &caller));
        assert!(!matches(&set(&["unix:uid:1000", "unix:user:db"]), &caller));
        assert!(!matches(&set(&["unix:uid:0"]), &caller));
        // The empty set would match everyone, so it matches no one.
        assert!(!matches(&BTreeSet::new(), &caller));
    }
}
