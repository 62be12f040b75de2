//! Several upstream MCP servers behind one endpoint: the router that holds one
//! [`crate::upstream::Upstream`] per configured name, and the namespacing that tells the agent
//! which server a tool, prompt or resource belongs to.
//!
//! With one upstream nothing is renamed: tools, prompts and resource URIs keep the upstream's
//! own names, so a gateway configured as before behaves as before. With several, as
//! multi-server gateways do (agentgateway, ContextForge):
//! - a tool or prompt is exposed as `<upstream><separator><name>` (`github__create_issue`; the
//!   separator is `INTENTGATE_UPSTREAM_SEPARATOR`, `__` by default, which MCP tool names and
//!   function-calling APIs accept and upstream names cannot contain);
//! - a resource URI or URI template is exposed as `<upstream>+<uri>` (`db+file:///schema.sql`):
//!   a prefix to the URI's scheme, so the result is still an absolute URI (RFC 3986 schemes
//!   allow `+`; not `_`, hence a fixed character here), resources behind templates route
//!   without a table learned from `resources/list`, and every replica routes alike;
//! - the prefix routes a call to its upstream, which gets its own name back.
//!
//! The checks (capability caveats, policy, audit) see the exposed name, and the upstream's name
//! as the server and callee of `mcp_allow`/`callee_allow`. Lists merge every upstream's page,
//! and their cursors say which upstream each continuation belongs to ([`encode_cursor`]).
//!
//! This module must never route a name to an upstream it does not name (a namespaced name
//! without a configured prefix is refused, never sent to a guessed upstream), and never show
//! an upstream's URL (see [`crate::upstream`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Poll;

use base64::Engine as _;
use serde_json::{Map, Value, json};

use crate::mcp::discover::UpstreamProfile;
use crate::upstream::{Upstream, UpstreamError};

/// What joins an upstream's name and a resource URI (see the module documentation).
pub const URI_SEPARATOR: char = '+';

/// The `_meta` key of a merged list naming the upstreams that did not answer.
pub const UNAVAILABLE_META: &str = "io.intentgate/unavailable";

/// A URI of `upstream` as agents know it: prefixed with the upstream's name when there are
/// several upstreams (`namespaced`), as it is otherwise.
pub fn expose_uri_as(upstream: &str, original: &str, namespaced: bool) -> String {
    if namespaced {
        format!("{upstream}{URI_SEPARATOR}{original}")
    } else {
        original.to_owned()
    }
}

/// Every configured upstream, by name, in configuration order.
pub struct Upstreams {
    entries: Vec<(String, std::sync::Arc<Upstream>)>,
    separator: String,
    /// What the last exchange with each upstream showed (see [`Health`]), by entry.
    health: Box<[AtomicU8]>,
}

/// What the last exchange with an upstream showed: nothing yet, an answer (whatever it
/// said), or no answer (unreachable, timed out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Unknown = 0,
    Up = 1,
    Down = 2,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unknown => "unknown",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

/// Where a call goes: the upstream's name and client, and the name or URI it knows the target
/// by (the exposed one with the prefix removed; the same when nothing is namespaced).
#[derive(Clone, Copy)]
pub struct Route<'g, 'n> {
    pub name: &'g str,
    pub upstream: &'g Upstream,
    pub original: &'n str,
}

/// A name or URI that no configured upstream's prefix starts.
#[derive(Debug, thiserror::Error)]
#[error("{what} {name:?} names no configured upstream: expected UPSTREAM{separator}{what}")]
pub struct Unrouted {
    pub what: &'static str,
    pub name: String,
    pub separator: String,
}

/// A list cursor that is not one this gateway handed out.
#[derive(Debug, thiserror::Error)]
#[error("invalid cursor")]
pub struct BadCursor;

impl Upstreams {
    /// `entries` in the order they were configured (names unique, checked by the config).
    pub fn new(entries: Vec<(String, Upstream)>, separator: impl Into<String>) -> Self {
        Self {
            health: entries.iter().map(|_| AtomicU8::new(0)).collect(),
            entries: entries
                .into_iter()
                .map(|(n, u)| (n, std::sync::Arc::new(u)))
                .collect(),
            separator: separator.into(),
        }
    }

    /// Notes what an exchange with the upstream `name` showed: down when it could not be
    /// reached or timed out, up when it answered anything.
    pub fn note<T>(&self, name: Option<&str>, result: &Result<T, UpstreamError>) {
        let Some(i) = name.and_then(|n| self.entries.iter().position(|(e, _)| e == n)) else {
            return;
        };
        let h = match result {
            Err(UpstreamError::Unavailable(_) | UpstreamError::Timeout(_)) => Health::Down,
            _ => Health::Up,
        };
        self.health[i].store(h as u8, Ordering::Relaxed);
    }

    /// Each upstream's name and what the last exchange with it showed.
    pub fn health(&self) -> impl Iterator<Item = (&str, Health)> {
        self.entries.iter().zip(&*self.health).map(|((n, _), h)| {
            let h = match h.load(Ordering::Relaxed) {
                1 => Health::Up,
                2 => Health::Down,
                _ => Health::Unknown,
            };
            (n.as_str(), h)
        })
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether names are namespaced: more than one upstream.
    pub fn namespaced(&self) -> bool {
        self.entries.len() > 1
    }

    pub fn separator(&self) -> &str {
        &self.separator
    }

    /// Each upstream with its name, in configuration order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Upstream)> {
        self.entries.iter().map(|(n, u)| (n.as_str(), &**u))
    }

    pub fn get(&self, name: &str) -> Option<&Upstream> {
        self.entries
            .iter()
            .find_map(|(n, u)| (n == name).then_some(&**u))
    }

    /// [`Self::get`], owned: for a call that outlives its request (a held call, `mcp/relay.rs`).
    pub fn shared(&self, name: &str) -> Option<std::sync::Arc<Upstream>> {
        self.entries
            .iter()
            .find_map(|(n, u)| (n == name).then(|| std::sync::Arc::clone(u)))
    }

    /// The upstream a tool or prompt name goes to: `Ok(None)` when none is configured.
    pub fn route_name<'n>(&self, exposed: &'n str) -> Result<Option<Route<'_, 'n>>, Unrouted> {
        let separator = self.separator.as_str();
        self.route(exposed, "NAME", separator, |e| e.split_once(separator))
    }

    /// The upstream a resource URI (or URI template) goes to: `Ok(None)` when none is
    /// configured.
    pub fn route_uri<'n>(&self, exposed: &'n str) -> Result<Option<Route<'_, 'n>>, Unrouted> {
        self.route(exposed, "URI", "+", |e| e.split_once(URI_SEPARATOR))
    }

    fn route<'n>(
        &self,
        exposed: &'n str,
        what: &'static str,
        separator: &str,
        split: impl Fn(&'n str) -> Option<(&'n str, &'n str)>,
    ) -> Result<Option<Route<'_, 'n>>, Unrouted> {
        match self.entries.as_slice() {
            [] => Ok(None),
            [(name, upstream)] => Ok(Some(Route {
                name,
                upstream,
                original: exposed,
            })),
            entries => split(exposed)
                .filter(|(_, rest)| !rest.is_empty())
                .and_then(|(prefix, original)| {
                    entries
                        .iter()
                        .find(|(n, _)| n == prefix)
                        .map(|(name, upstream)| Route {
                            name,
                            upstream,
                            original,
                        })
                })
                .map(Some)
                .ok_or_else(|| Unrouted {
                    what,
                    name: exposed.chars().take(128).collect(),
                    separator: separator.to_owned(),
                }),
        }
    }

    /// The name an agent sees for `upstream`'s tool or prompt `original`.
    pub fn expose_name(&self, upstream: &str, original: &str) -> String {
        if self.namespaced() {
            format!("{upstream}{}{original}", self.separator)
        } else {
            original.to_owned()
        }
    }

    /// The URI an agent sees for `upstream`'s resource (or template) `original`.
    pub fn expose_uri(&self, upstream: &str, original: &str) -> String {
        expose_uri_as(upstream, original, self.namespaced())
    }

    /// What the upstreams `reaches` accepts say about themselves, together: the union of their capabilities
    /// (an upstream that cannot be asked adds none), their instructions each under its name.
    /// `None` capabilities when no upstream could be asked.
    pub async fn profile(&self, reaches: impl Fn(&str) -> bool) -> UpstreamProfile {
        let reached = self.entries.iter().filter(|(name, _)| reaches(name));
        let asked = join_all(reached.map(|(name, up)| async move {
            let profile = up.profile().await;
            self.note(Some(name), &profile);
            match profile {
                Ok(p) => Some((name.as_str(), p)),
                Err(e) => {
                    tracing::debug!(upstream = %name, error = %e, "upstream profile unavailable");
                    None
                }
            }
        }))
        .await;
        let profiles: Vec<(&str, UpstreamProfile)> = asked.into_iter().flatten().collect();
        if let [(_, only)] = profiles.as_slice()
            && !self.namespaced()
        {
            return only.clone();
        }
        let mut caps: Option<Map<String, Value>> = None;
        let mut instructions = Vec::new();
        for (name, p) in &profiles {
            if let Some(Value::Object(c)) = &p.capabilities {
                let merged = caps.get_or_insert_with(Map::new);
                for (k, v) in c {
                    merged.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
            if let Some(i) = p.instructions.as_deref().filter(|i| !i.is_empty()) {
                instructions.push(format!("{name}: {i}"));
            }
        }
        UpstreamProfile {
            capabilities: caps.map(Value::Object),
            instructions: (!instructions.is_empty()).then(|| instructions.join("\n\n")),
        }
    }
}

/// A forwarded request's target, where [`rename_target`] finds it (`None` for methods
/// without one, or a body without it).
pub fn target_of<'p>(method: &str, params: &'p Map<String, Value>) -> Option<&'p str> {
    let slot = match method {
        "tools/call" | "prompts/get" => params.get("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => params.get("uri"),
        "completion/complete" => match params.get("ref") {
            Some(Value::Object(r)) => r.get(completed_key(r)?),
            _ => None,
        },
        _ => None,
    };
    slot.and_then(Value::as_str)
}

/// The member of a completion's `ref` that names what is completed, by the ref's type: a
/// prompt's `name`, a resource template's `uri` (as `proxy/target.rs` decodes it, so a ref
/// carrying both is decided, renamed and checked on the same one).
fn completed_key(reference: &Map<String, Value>) -> Option<&'static str> {
    match reference.get("type").and_then(Value::as_str) {
        Some("ref/prompt") => Some("name"),
        Some("ref/resource") => Some("uri"),
        _ => None,
    }
}

/// Rewrites a forwarded request's target from its exposed name or URI to the upstream's own
/// (`original`): `params.name` of `tools/call` and `prompts/get`, `params.uri` of the
/// `resources/*` targets, `params.ref.name`/`.uri` of `completion/complete`.
pub fn rename_target(method: &str, params: &mut Map<String, Value>, original: &str) {
    let slot = match method {
        "tools/call" | "prompts/get" => params.get_mut("name"),
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => params.get_mut("uri"),
        "completion/complete" => match params.get_mut("ref") {
            Some(Value::Object(r)) => match completed_key(r) {
                Some(key) => r.get_mut(key),
                None => None,
            },
            _ => None,
        },
        _ => None,
    };
    if let Some(v) = slot {
        *v = Value::from(original);
    }
}

/// A merged list's cursor: which upstreams have more, and each one's own cursor.
pub fn encode_cursor(pending: &[(String, Value)]) -> String {
    let pairs: Vec<Value> = pending.iter().map(|(n, c)| json!([n, c])).collect();
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(json!({"v": 1, "next": pairs}).to_string())
}

/// The upstreams and their cursors a merged list's cursor continues (only names in `known`).
pub fn decode_cursor(cursor: &Value, known: &Upstreams) -> Result<Vec<(String, Value)>, BadCursor> {
    let text = cursor.as_str().ok_or(BadCursor)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| BadCursor)?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| BadCursor)?;
    if v.get("v") != Some(&json!(1)) {
        return Err(BadCursor);
    }
    let Some(Value::Array(pairs)) = v.get("next") else {
        return Err(BadCursor);
    };
    let mut out: Vec<(String, Value)> = Vec::with_capacity(pairs.len());
    for p in pairs {
        match p.as_array().map(Vec::as_slice) {
            Some([Value::String(n), c])
                if known.get(n).is_some() && !out.iter().any(|(o, _)| o == n) =>
            {
                out.push((n.clone(), c.clone()));
            }
            _ => return Err(BadCursor),
        }
    }
    if out.is_empty() {
        return Err(BadCursor);
    }
    Ok(out)
}

/// Runs futures of one type concurrently on this task; their outputs in their order.
pub async fn join_all<F: Future>(futures: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<Pin<Box<F>>> = futures.into_iter().map(Box::pin).collect();
    let mut outputs: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, out) in futures.iter_mut().zip(outputs.iter_mut()) {
            if out.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *out = Some(v),
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    outputs.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn upstreams(names: &[&str]) -> Upstreams {
        let tls = crate::tls::plaintext_only().expect("tls");
        let entries = names
            .iter()
            .map(|n| {
                let uri: hyper::Uri = format!("http://127.0.0.1:9/{n}").parse().expect("uri");
                let up = Upstream::new(uri, Duration::from_millis(50), 1 << 20, tls.clone());
                ((*n).to_owned(), up)
            })
            .collect();
        Upstreams::new(entries, "__")
    }

    #[test]
    fn one_upstream_keeps_plain_names() {
        let u = upstreams(&["default"]);
        let r = u.route_name("github__x").expect("routed").expect("some");
        assert_eq!((r.name, r.original), ("default", "github__x"));
        assert_eq!(u.expose_name("default", "x"), "x");
        assert_eq!(u.expose_uri("default", "file:///a"), "file:///a");
        assert!(upstreams(&[]).route_name("x").expect("ok").is_none());
    }

    #[test]
    fn several_upstreams_route_by_prefix() {
        let u = upstreams(&["github", "db", "db-2"]);
        let r = u
            .route_name("db__delete__all")
            .expect("routed")
            .expect("some");
        assert_eq!((r.name, r.original), ("db", "delete__all"));
        let r = u.route_name("db-2__q").expect("routed").expect("some");
        assert_eq!((r.name, r.original), ("db-2", "q"));
        assert_eq!(
            u.expose_name("github", "create_issue"),
            "github__create_issue"
        );
        for bad in ["create_issue", "jira__x", "db__", "__x", "db_x"] {
            let e = u.route_name(bad).err().expect(bad);
            assert!(e.to_string().contains("UPSTREAM__NAME"), "{e}");
        }
        let r = u
            .route_uri("db+git+https://h/x")
            .expect("routed")
            .expect("some");
        assert_eq!((r.name, r.original), ("db", "git+https://h/x"));
        assert_eq!(u.expose_uri("db", "note://{topic}"), "db+note://{topic}");
        assert!(u.route_uri("file:///a").is_err());
        assert!(u.route_uri("jira+file:///a").is_err());
    }

    #[test]
    fn targets_are_renamed_where_each_method_names_them() {
        let mut p = json!({"name": "gh__x", "arguments": {}})
            .as_object()
            .cloned()
            .expect("o");
        rename_target("tools/call", &mut p, "x");
        assert_eq!(p["name"], "x");
        let mut p = json!({"ref": {"type": "ref/resource", "uri": "gh+note://{t}"},
                           "argument": {"name": "t", "value": ""}})
        .as_object()
        .cloned()
        .expect("o");
        rename_target("completion/complete", &mut p, "note://{t}");
        assert_eq!(p["ref"]["uri"], "note://{t}");
        let mut p = json!({"uri": "gh+file:///a"})
            .as_object()
            .cloned()
            .expect("o");
        rename_target("resources/unsubscribe", &mut p, "file:///a");
        assert_eq!(p["uri"], "file:///a");
        // A prompt's ref carrying a `uri` too: its `name` is what was decided, so that is what
        // is renamed and what the last check before sending reads.
        let mut p = json!({"ref": {"type": "ref/prompt", "name": "gh__greet", "uri": "gh__other"},
                           "argument": {"name": "who", "value": ""}})
        .as_object()
        .cloned()
        .expect("o");
        rename_target("completion/complete", &mut p, "greet");
        assert_eq!(p["ref"]["name"], "greet");
        assert_eq!(p["ref"]["uri"], "gh__other");
        assert_eq!(target_of("completion/complete", &p), Some("greet"));
        let mut untyped = p.clone();
        untyped["ref"].as_object_mut().expect("ref").remove("type");
        assert_eq!(target_of("completion/complete", &untyped), None);
    }

    #[test]
    fn cursors_round_trip_and_refuse_strangers() {
        let u = upstreams(&["github", "db"]);
        let pending = vec![
            ("db".to_owned(), json!("c2")),
            ("github".into(), json!("c1")),
        ];
        let c = Value::from(encode_cursor(&pending));
        assert_eq!(decode_cursor(&c, &u).expect("decoded"), pending);
        let other = Value::from(encode_cursor(&[("jira".into(), json!("c"))]));
        assert!(decode_cursor(&other, &u).is_err());
        assert!(decode_cursor(&Value::from(encode_cursor(&[])), &u).is_err());
        assert!(decode_cursor(&json!("not base64!"), &u).is_err());
        assert!(decode_cursor(&json!(7), &u).is_err());
    }

    #[tokio::test]
    async fn futures_are_joined_in_order() {
        let out = join_all((0..3u64).map(|i| async move {
            tokio::time::sleep(Duration::from_millis(30 - i * 10)).await;
            i
        }))
        .await;
        assert_eq!(out, [0, 1, 2]);
    }
}
