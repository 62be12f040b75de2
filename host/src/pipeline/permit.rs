//! What an allowed call may send upstream: a [`Permit`] records what was decided (the kind,
//! the target as the checks saw it, a keyed fingerprint of the arguments), and forwarding
//! takes a [`Cleared`] body, which only [`Permit::clear`] makes, and only for a body whose
//! target and arguments are the decided ones. The upstream client checks the params it is
//! about to send against the cleared permit once more, after any renaming.
//!
//! The fingerprint is SipHash with keys drawn once per process, over the arguments' structure
//! (type tags, lengths, members in key order): a body cannot be made to collide with the decided one
//! without the keys. This module must never clear a body that differs from the one decided,
//! and never let a permit be made outside the pipeline.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;

use super::{CallKind, ToolCall};

/// Proof that a call was decided `allow` and its audit event is durable, with what it decided.
// The private fields keep every module of this crate but the pipeline from making a Permit.
#[derive(Debug)]
pub struct Permit {
    /// The id of the decision's audit event.
    pub event_id: i64,
    pub bundle_digest: String,
    pub started: Instant,
    kind: CallKind,
    target: String,
    arguments: u64,
}

/// A body cleared for forwarding under a permit: its target as the upstream knows it.
#[derive(Debug, Clone, Copy)]
pub struct Cleared<'p> {
    pub permit: &'p Permit,
    /// The target's name or URI as sent to the upstream (the decided one, its prefix removed
    /// when several upstreams are namespaced).
    pub forwarded_as: &'p str,
}

/// A body that is not the one decided.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the forwarded {what} is not the one decided")]
pub struct NotDecided {
    pub what: &'static str,
}

fn keys() -> &'static std::collections::hash_map::RandomState {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    KEYS.get_or_init(std::collections::hash_map::RandomState::new)
}

/// The keyed fingerprint of a JSON value's structure.
pub fn fingerprint(v: &Value) -> u64 {
    fn walk(v: &Value, h: &mut impl Hasher) {
        match v {
            Value::Null => h.write_u8(0),
            Value::Bool(b) => {
                h.write_u8(1);
                h.write_u8(u8::from(*b));
            }
            Value::Number(n) => {
                h.write_u8(2);
                h.write(n.to_string().as_bytes());
                h.write_u8(0xff);
            }
            Value::String(s) => {
                h.write_u8(3);
                h.write_usize(s.len());
                h.write(s.as_bytes());
            }
            Value::Array(a) => {
                h.write_u8(4);
                h.write_usize(a.len());
                for x in a {
                    walk(x, h);
                }
            }
            Value::Object(m) => {
                h.write_u8(5);
                h.write_usize(m.len());
                for (k, x) in m {
                    h.write_usize(k.len());
                    h.write(k.as_bytes());
                    walk(x, h);
                }
            }
        }
    }
    let mut h = keys().build_hasher();
    walk(v, &mut h);
    h.finish()
}

impl Permit {
    pub(super) fn new(
        event_id: i64,
        bundle_digest: String,
        started: Instant,
        call: &ToolCall<'_>,
    ) -> Self {
        Permit {
            event_id,
            bundle_digest,
            started,
            kind: call.kind,
            target: call.tool.to_owned(),
            arguments: fingerprint(call.arguments),
        }
    }

    /// The kind of call decided.
    pub fn kind(&self) -> CallKind {
        self.kind
    }

    /// The target decided, as the checks saw it (tool name, URI, prompt name).
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Clears a body for forwarding: `target` and `arguments` must be those decided;
    /// `forwarded_as` is the target's name at the upstream.
    pub fn clear<'p>(
        &'p self,
        kind: CallKind,
        target: &str,
        arguments: &Value,
        forwarded_as: &'p str,
    ) -> Result<Cleared<'p>, NotDecided> {
        if kind != self.kind {
            return Err(NotDecided { what: "kind" });
        }
        if target != self.target {
            return Err(NotDecided { what: "target" });
        }
        if fingerprint(arguments) != self.arguments {
            return Err(NotDecided { what: "arguments" });
        }
        Ok(Cleared {
            permit: self,
            forwarded_as,
        })
    }

    /// Whether `arguments` are the decided ones.
    pub fn covers_arguments(&self, arguments: &Value) -> bool {
        fingerprint(arguments) == self.arguments
    }

    /// A permit for unit tests of modules that forward (never made by them otherwise).
    #[cfg(test)]
    pub(crate) fn for_test(kind: CallKind, target: &str, arguments: &Value) -> Self {
        Permit {
            event_id: 1,
            bundle_digest: String::new(),
            started: Instant::now(),
            kind,
            target: target.to_owned(),
            arguments: fingerprint(arguments),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_the_decided_body_is_cleared() {
        let args = json!({"text": "hi"});
        let p = Permit::for_test(CallKind::Tool, "gh__echo", &args);
        let ok = p
            .clear(CallKind::Tool, "gh__echo", &json!({"text": "hi"}), "echo")
            .expect("the decided body");
        assert_eq!(ok.forwarded_as, "echo");
        let no = |what| Err(NotDecided { what });
        assert_eq!(
            p.clear(CallKind::Tool, "gh__send_email", &args, "send_email")
                .map(|_| ()),
            no("target")
        );
        assert_eq!(
            p.clear(CallKind::Tool, "gh__echo", &json!({"text": "rm"}), "echo")
                .map(|_| ()),
            no("arguments")
        );
        assert_eq!(
            p.clear(CallKind::Prompt, "gh__echo", &args, "echo")
                .map(|_| ()),
            no("kind")
        );
    }

    #[test]
    fn fingerprints_tell_structures_apart() {
        let a = json!({"to": "a@example.com", "n": 1});
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
        for other in [
            json!({"to": "a@example.com", "n": 2}),
            json!({"to": "a@example.com", "n": "1"}),
            json!({"to": "b@example.com", "n": 1}),
            json!({"to": "a@example.com"}),
            json!(["to", "a@example.com", "n", 1]),
            json!({"to": ["a@example.com"], "n": 1}),
            json!({"ton": "a@example.com"}),
        ] {
            assert_ne!(fingerprint(&a), fingerprint(&other), "{other}");
        }
        // Objects are sorted maps: the same members in any order are the same arguments.
        assert_eq!(
            fingerprint(&json!({"a": 1, "b": 2})),
            fingerprint(&json!({"b": 2, "a": 1}))
        );
    }
}
