//! JSON objects that reject duplicate member names.
//!
//! RFC 8259 leaves duplicate names undefined and serde_json keeps the last one silently. For
//! security-relevant documents that is an attack surface (a second `alg` in a JOSE header, a second
//! bundle for one trust domain: SPIFFE Trust Domain and Bundle §6.3), so we refuse them.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};

/// A JSON object's members in document order, with duplicates rejected while parsing.
#[derive(Debug)]
pub(crate) struct UniqueMap<V>(pub(crate) Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V_<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for V_<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("duplicate member {k:?}")));
                    }
                    let v = map.next_value::<V>()?;
                    out.push((k, v));
                }
                Ok(UniqueMap(out))
            }
        }
        d.deserialize_map(V_(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_members_are_rejected() {
        let err = serde_json::from_str::<UniqueMap<serde_json::Value>>(r#"{"a":1,"b":2,"a":3}"#)
            .unwrap_err();
        assert!(err.to_string().contains("duplicate member \"a\""), "{err}");
        let ok = serde_json::from_str::<UniqueMap<u8>>(r#"{"a":1,"b":2}"#).unwrap();
        assert_eq!(ok.0, vec![("a".to_owned(), 1), ("b".to_owned(), 2)]);
    }
}
