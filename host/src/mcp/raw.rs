//! Results kept as the upstream wrote them. A forwarded result is a JSON object whose top-level
//! members are all the gateway ever reshapes (`resultType`, `cacheScope`, `ttlMs`, `_meta`,
//! `requestState`, `_intentgate`), so it is read as a [`RawObject`]: its members in order, each
//! value the upstream's own text. The tool's content is never parsed into a tree, nor written
//! again: the client gets the upstream's bytes, spliced into the gateway's JSON-RPC envelope.
//! [`ResultBody`] is a method's result on its way out: such an object, or a tree the gateway
//! built itself. This module must never change the text of a member it was not asked to change.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// A JSON object as its top-level members, each value as text.
#[derive(Debug, Clone, Default)]
pub struct RawObject {
    members: Vec<(String, Box<RawValue>)>,
}

/// Above this many members, duplicate keys are found with a hash index rather than by scanning.
const SCAN_LIMIT: usize = 16;

impl RawObject {
    /// Reads an object (one level deep; the members' text is validated, not kept as trees).
    pub fn parse(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// A member's text.
    pub fn get(&self, key: &str) -> Option<&RawValue> {
        self.members
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| &**v)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A member read as a tree (for the few the gateway looks into).
    pub fn value(&self, key: &str) -> Option<Value> {
        self.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// A member that is a JSON string.
    pub fn string(&self, key: &str) -> Option<String> {
        self.get(key)
            .and_then(|raw| serde_json::from_str(raw.get()).ok())
    }

    /// Sets a member (in place when it exists, last otherwise).
    pub fn insert(&mut self, key: &str, value: &Value) {
        let Ok(raw) = serde_json::value::to_raw_value(value) else {
            return; // a `Value` always serialises
        };
        match self.members.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => *v = raw,
            None => self.members.push((key.to_owned(), raw)),
        }
    }

    pub fn remove(&mut self, key: &str) {
        self.members.retain(|(k, _)| k != key);
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The object as a tree (every member parsed), for the paths that rebuild a result.
    pub fn into_map(self) -> Map<String, Value> {
        self.members
            .into_iter()
            .filter_map(|(k, raw)| Some((k, serde_json::from_str(raw.get()).ok()?)))
            .collect()
    }

    /// A tree as members (each serialised once).
    pub fn from_map(map: Map<String, Value>) -> Self {
        let members = map
            .into_iter()
            .filter_map(|(k, v)| Some((k, serde_json::value::to_raw_value(&v).ok()?)))
            .collect();
        Self { members }
    }

    /// Of members with the same key, keeps the last (the one a parsed tree keeps).
    fn dedup(&mut self) {
        let n = self.members.len();
        let keep: Vec<bool> = if n <= SCAN_LIMIT {
            (0..n)
                .map(|i| {
                    let key = &self.members[i].0;
                    !self.members[i + 1..].iter().any(|(k, _)| k == key)
                })
                .collect()
        } else {
            let mut last = std::collections::HashMap::with_capacity(n);
            for (i, (k, _)) in self.members.iter().enumerate() {
                last.insert(k.as_str(), i);
            }
            (self.members.iter().enumerate())
                .map(|(i, (k, _))| last.get(k.as_str()) == Some(&i))
                .collect()
        };
        if keep.iter().all(|k| *k) {
            return;
        }
        let mut flags = keep.into_iter();
        self.members.retain(|_| flags.next().unwrap_or(true));
    }
}

impl Serialize for RawObject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.members.len()))?;
        for (k, v) in &self.members {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RawObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> Visitor<'de> for Members {
            type Value = RawObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawObject, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4).min(64));
                while let Some(entry) = map.next_entry::<String, Box<RawValue>>()? {
                    members.push(entry);
                }
                let mut o = RawObject { members };
                o.dedup();
                Ok(o)
            }
        }
        d.deserialize_map(Members)
    }
}

/// A method's result on its way to the client.
#[derive(Debug, Clone)]
pub enum ResultBody {
    /// Built (or rebuilt) by the gateway.
    Tree(Value),
    /// The upstream's object, reshaped by members only.
    Raw(RawObject),
}

impl From<Value> for ResultBody {
    fn from(v: Value) -> Self {
        Self::Tree(v)
    }
}

impl From<RawObject> for ResultBody {
    fn from(o: RawObject) -> Self {
        Self::Raw(o)
    }
}

impl ResultBody {
    /// The result as a tree (tests and the rare paths that look inside).
    pub fn into_value(self) -> Value {
        match self {
            Self::Tree(v) => v,
            Self::Raw(o) => Value::Object(o.into_map()),
        }
    }
}

impl Serialize for ResultBody {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Tree(v) => v.serialize(s),
            Self::Raw(o) => o.serialize(s),
        }
    }
}

/// A raw JSON text as a tree.
pub fn tree(raw: &RawValue) -> Result<Value, serde_json::Error> {
    serde_json::from_str(raw.get())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn members_keep_their_text_and_order() {
        let text = r#"{"zeta":1.50,"content":[{"type":"text","text":"a\u0041"}],"alpha":1e3}"#;
        let mut o = RawObject::parse(text).expect("object");
        assert_eq!(serde_json::to_string(&o).expect("json"), text);
        assert_eq!(o.get("alpha").map(RawValue::get), Some("1e3"));
        o.remove("zeta");
        o.insert("resultType", &json!("complete"));
        assert_eq!(
            serde_json::to_string(&o).expect("json"),
            r#"{"content":[{"type":"text","text":"a\u0041"}],"alpha":1e3,"resultType":"complete"}"#
        );
        o.insert("alpha", &json!(2));
        assert_eq!(o.value("alpha"), Some(json!(2)));
        assert_eq!(o.len(), 3);
    }

    #[test]
    fn only_objects_are_read_and_duplicates_keep_the_last() {
        assert!(RawObject::parse("[1]").is_err());
        assert!(RawObject::parse(r#"{"a":}"#).is_err());
        let o = RawObject::parse(r#"{"a":1,"b":2,"a":3}"#).expect("object");
        assert_eq!(serde_json::to_string(&o).expect("json"), r#"{"b":2,"a":3}"#);
        // Many members: the same rule through the hash index.
        let many: String = (0..40)
            .map(|i| format!(r#""k{}":{i}"#, i % 20))
            .collect::<Vec<_>>()
            .join(",");
        let o = RawObject::parse(&format!("{{{many}}}")).expect("object");
        assert_eq!(o.len(), 20);
        assert_eq!(o.value("k0"), Some(json!(20)));
        assert_eq!(o.string("k0"), None, "not a string");
    }

    #[test]
    fn a_body_is_a_tree_or_the_upstreams_text() {
        let raw = RawObject::parse(r#"{"n":1.0}"#).expect("object");
        assert_eq!(
            serde_json::to_string(&ResultBody::from(raw.clone())).expect("json"),
            r#"{"n":1.0}"#
        );
        assert_eq!(ResultBody::from(raw).into_value(), json!({"n": 1.0}));
        let map = json!({"b": [1], "a": "x"})
            .as_object()
            .cloned()
            .expect("map");
        let back = RawObject::from_map(map.clone());
        assert_eq!(back.into_map(), map);
    }
}
