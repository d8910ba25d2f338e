//! A JSON value read from JSON or YAML text that refuses a key written twice in one mapping, at
//! any depth.
//!
//! `serde_json::Value` (and `serde_yaml_ng` reading into it) keeps the last of two equal keys,
//! so `action: ALLOW` then `action: DENY` was stored as DENY, while a policy administration
//! point that keeps the first would show ALLOW: one document read two ways. The typed structs
//! refuse a duplicate field already (serde derive), but documents pass through a `Value` first
//! (to take `name` out), so the check is made here, while the text is read.

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// One step of the path to a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    Index(usize),
    Key(String),
}

/// A key written twice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Duplicate {
    /// The mapping it is in, from the top of the text.
    pub(crate) at: Vec<Step>,
    pub(crate) key: String,
    /// The `name` of the top-level item it is in, when read before the duplicate.
    pub(crate) item_name: Option<String>,
}

/// Why a text was not read.
#[derive(Debug)]
pub(crate) enum ReadError {
    Duplicate(Duplicate),
    Json(serde_json::Error),
    Yaml(serde_yaml_ng::Error),
}

/// Reads `text` as JSON when `json`, as YAML otherwise, refusing duplicate keys.
pub(crate) fn read(text: &str, json: bool) -> Result<Value, ReadError> {
    let mut state = State::default();
    let r = if json {
        let mut de = serde_json::Deserializer::from_str(text);
        Seed(&mut state)
            .deserialize(&mut de)
            .and_then(|v| de.end().map(|()| v))
            .map_err(ReadError::Json)
    } else {
        Seed(&mut state)
            .deserialize(serde_yaml_ng::Deserializer::from_str(text))
            .map_err(ReadError::Yaml)
    };
    match (r, state.duplicate) {
        (Err(_), Some(d)) => Err(ReadError::Duplicate(d)),
        (r, _) => r,
    }
}

#[derive(Default)]
struct State {
    at: Vec<Step>,
    item_name: Option<String>,
    duplicate: Option<Duplicate>,
}

struct Seed<'a>(&'a mut State);

impl<'de> DeserializeSeed<'de> for Seed<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Seed<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        if let Ok(v) = i64::try_from(v) {
            Ok(Value::Number(v.into()))
        } else {
            self.visit_u128(u128::try_from(v).unwrap_or(u128::MAX))
        }
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        u64::try_from(v)
            .map(|v| Value::Number(v.into()))
            .map_err(|_| E::custom("an integer out of range"))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        Seed(self.0).deserialize(d)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let st = self.0;
        let mut out = Vec::new();
        loop {
            st.at.push(Step::Index(out.len()));
            let next = seq.next_element_seed(Seed(&mut *st))?;
            st.at.pop();
            match next {
                Some(v) => out.push(v),
                None => return Ok(Value::Array(out)),
            }
        }
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let st = self.0;
        // A policy: the whole text, or an element of the top-level list.
        let is_item = matches!(st.at.as_slice(), [] | [Step::Index(_)]);
        if is_item {
            st.item_name = None;
        }
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                let msg = format!("duplicate key `{}`", tessera_spiffe::abbreviate(&key, 100));
                st.duplicate = Some(Duplicate {
                    at: st.at.clone(),
                    key,
                    item_name: st.item_name.clone(),
                });
                return Err(de::Error::custom(msg));
            }
            st.at.push(Step::Key(key.clone()));
            let value = map.next_value_seed(Seed(&mut *st))?;
            st.at.pop();
            if let (true, "name", Value::String(n)) = (is_item, key.as_str(), &value) {
                st.item_name = Some(n.clone());
            }
            out.insert(key, value);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn duplicate(text: &str, json: bool) -> Duplicate {
        match read(text, json) {
            Err(ReadError::Duplicate(d)) => d,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn values_read_as_serde_json_reads_them() {
        for (text, json) in [
            (
                r#"[{"a":1,"b":[-2,2.5,true,null,"s"],"c":{}}, 18446744073709551615]"#,
                true,
            ),
            (
                "- a: 1\n  b: [-2, 2.5, true, ~, s]\n  c: {}\n- 18446744073709551615\n",
                false,
            ),
        ] {
            let want: Value = if json {
                serde_json::from_str(text).unwrap()
            } else {
                serde_yaml_ng::from_str(text).unwrap()
            };
            assert_eq!(read(text, json).unwrap(), want, "{text}");
        }
        assert!(matches!(read("[1] x", true), Err(ReadError::Json(_))));
        assert!(matches!(read("a: [", false), Err(ReadError::Yaml(_))));
    }

    #[test]
    fn a_key_written_twice_is_refused_at_any_depth_in_json_and_yaml() {
        let d = duplicate("name: a\naction: ALLOW\naction: DENY\n", false);
        assert_eq!(
            (d.at, d.key, d.item_name),
            (vec![], "action".into(), Some("a".into()))
        );
        let d = duplicate(r#"{"name":"a","action":"ALLOW","action":"DENY"}"#, true);
        assert_eq!(
            (d.key.as_str(), d.item_name.as_deref()),
            ("action", Some("a"))
        );
        let d = duplicate(
            r#"[{"name":"a"},{"rules":[{"to":{"ports":[1],"ports":[2]}}],"name":"b"}]"#,
            true,
        );
        assert_eq!(
            (d.at, d.key.as_str(), d.item_name),
            (
                vec![
                    Step::Index(1),
                    Step::Key("rules".into()),
                    Step::Index(0),
                    Step::Key("to".into())
                ],
                "ports",
                // `name` comes after the duplicate: not known yet (and not item 0's).
                None
            )
        );
        let d = duplicate(
            "- name: a\n  rules:\n  - from: {principals: [x], principals: [y]}\n",
            false,
        );
        assert_eq!(
            (d.key.as_str(), d.item_name.as_deref()),
            ("principals", Some("a"))
        );
        // Equal values are still two keys.
        duplicate("{\"a\": 1, \"a\": 1}", true);
    }
}
