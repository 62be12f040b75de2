//! Results on their way back to the client, shaped for the client's revision whatever the
//! upstream's.
//!
//! The stateless revision's clients require `resultType` (and `cacheScope`/`ttlMs` on lists);
//! handshake-era clients know none of them. A result from an upstream of the other revision
//! is translated here: fields added or removed, an `InputRequiredResult` (which only a modern
//! client can answer) refused for a handshake-era client. Every list the gateway returns is
//! filtered per token, so it is never marked shareable: `cacheScope` is always `private`; so is
//! a decided `resources/read`. The upstream's notifications that came with an answer are
//! filtered to what this client may see ([`relayable`]: its request's progress, log messages)
//! and sent before the answer as one SSE body ([`event_stream`]). This module must never widen
//! what the pipeline or the token filter decided, nor relay another request's notifications.

use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value};

use super::era::meta;
use super::jsonrpc::{RpcError, code};
use super::raw::RawObject;
use crate::http::{self, Body};

/// Of the upstream's notifications before an answer, those the client may see: progress of
/// this very request (its `progressToken`, which the gateway forwarded unchanged) and log
/// messages. Others (list changes, resource updates, another request's progress) are dropped.
pub fn relayable(notifications: Vec<Value>, progress_token: Option<&Value>) -> Vec<Value> {
    notifications
        .into_iter()
        .filter(|n| match n.get("method").and_then(Value::as_str) {
            Some("notifications/progress") => {
                progress_token.is_some()
                    && n.get("params").and_then(|p| p.get("progressToken")) == progress_token
            }
            Some("notifications/message") => true,
            _ => false,
        })
        .collect()
}

/// An SSE response: each notification as an event, then the answer (an encoded JSON-RPC
/// response).
pub fn event_stream(notifications: &[Value], answer: &[u8]) -> Response<Body> {
    let mut body = Vec::with_capacity(answer.len() + 256 * notifications.len());
    for n in notifications {
        body.extend_from_slice(b"event: message\ndata: ");
        body.extend_from_slice(n.to_string().as_bytes());
        body.extend_from_slice(b"\n\n");
    }
    body.extend_from_slice(b"event: message\ndata: ");
    body.extend_from_slice(answer);
    body.extend_from_slice(b"\n\n");
    let mut resp = Response::new(http::full(body));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

pub const COMPLETE: &str = "complete";
pub const INPUT_REQUIRED: &str = "input_required";

/// How long a modern client may cache a per-token list when the upstream said nothing.
pub const DEFAULT_TTL_MS: u64 = 0;

/// A result's top-level members, as the translation reads and writes them: a tree the gateway
/// holds, or the upstream's text ([`RawObject`], whose other members are left as they came).
pub trait Members {
    /// A member, as a tree.
    fn member(&self, key: &str) -> Option<Value>;
    fn has(&self, key: &str) -> bool;
    fn set(&mut self, key: &str, value: Value);
    fn unset(&mut self, key: &str);
}

impl Members for Map<String, Value> {
    fn member(&self, key: &str) -> Option<Value> {
        self.get(key).cloned()
    }
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn set(&mut self, key: &str, value: Value) {
        self.insert(key.to_owned(), value);
    }
    fn unset(&mut self, key: &str) {
        self.remove(key);
    }
}

impl Members for RawObject {
    fn member(&self, key: &str) -> Option<Value> {
        self.value(key)
    }
    fn has(&self, key: &str) -> bool {
        self.contains_key(key)
    }
    fn set(&mut self, key: &str, value: Value) {
        self.insert(key, &value);
    }
    fn unset(&mut self, key: &str) {
        self.remove(key);
    }
}

/// The upstream's server identity is not the client's business: the gateway is its server.
fn drop_upstream_identity(result: &mut impl Members) {
    if !result.has("_meta") {
        return;
    }
    if let Some(Value::Object(mut m)) = result.member("_meta")
        && m.remove(meta::SERVER_INFO).is_some()
    {
        if m.is_empty() {
            result.unset("_meta");
        } else {
            result.set("_meta", Value::Object(m));
        }
    }
}

/// A cacheable result (`tools/list`) for the client's revision.
pub fn list_for_client(mut result: Map<String, Value>, modern: bool) -> Value {
    drop_upstream_identity(&mut result);
    if modern {
        let ttl = result
            .get("ttlMs")
            .and_then(Value::as_u64)
            .unwrap_or(DEFAULT_TTL_MS);
        result.insert("resultType".into(), Value::from(COMPLETE));
        result.insert("cacheScope".into(), Value::from("private"));
        result.insert("ttlMs".into(), Value::from(ttl));
    } else {
        for k in ["resultType", "cacheScope", "ttlMs"] {
            result.remove(k);
        }
    }
    Value::Object(result)
}

/// Whether an upstream `tools/call` result asks for another round.
pub fn is_input_required(result: &impl Members) -> bool {
    result.member("resultType").as_ref().and_then(Value::as_str) == Some(INPUT_REQUIRED)
}

/// A final `tools/call` result for the client's revision. An `InputRequiredResult` for a
/// handshake-era client is an error: that client cannot answer it.
pub fn call_for_client<M: Members>(result: M, modern: bool) -> Result<M, RpcError> {
    result_for_client(result, modern, false)
}

/// Methods whose modern results are cacheable (`cacheScope`, `ttlMs`): the lists and
/// `resources/read`.
pub fn is_cacheable(method: &str) -> bool {
    matches!(
        method,
        "tools/list"
            | "resources/list"
            | "resources/templates/list"
            | "prompts/list"
            | "resources/read"
    )
}

/// A result of any method for the client's revision: `resultType` (and for a cacheable one
/// `cacheScope: private` and `ttlMs`) added for a modern client, removed for a handshake-era
/// one, to which an `InputRequiredResult` is an error.
pub fn result_for_client<M: Members>(
    mut result: M,
    modern: bool,
    cacheable: bool,
) -> Result<M, RpcError> {
    drop_upstream_identity(&mut result);
    if modern {
        if !result.has("resultType") {
            result.set("resultType", Value::from(COMPLETE));
        }
        if cacheable {
            let ttl = (result.member("ttlMs").as_ref())
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_TTL_MS);
            result.set("cacheScope", Value::from("private"));
            result.set("ttlMs", Value::from(ttl));
        }
        return Ok(result);
    }
    if is_input_required(&result) {
        return Err(
            RpcError::new(code::INTERNAL_ERROR, "upstream failure").with_data(serde_json::json!({
                "upstream_status": 200,
                "detail": "the tool asked for more input (a 2026-07-28 multi-round call); \
                           connect with MCP-Protocol-Version 2026-07-28 to answer it",
            })),
        );
    }
    for k in ["resultType", "cacheScope", "ttlMs"] {
        result.unset(k);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().cloned().expect("object")
    }

    #[test]
    fn lists_are_private_for_modern_clients_and_plain_for_others() {
        let from_handshake = obj(json!({"tools": []}));
        let m = list_for_client(from_handshake.clone(), true);
        assert_eq!(m["resultType"], "complete");
        assert_eq!(m["cacheScope"], "private");
        assert_eq!(m["ttlMs"], 0);
        let from_modern = obj(
            json!({"tools": [], "resultType": "complete", "cacheScope": "public",
            "ttlMs": 5000, "_meta": {meta::SERVER_INFO: {"name": "up"}}}),
        );
        let m = list_for_client(from_modern.clone(), true);
        assert_eq!(
            m["cacheScope"], "private",
            "a per-token list is never shareable"
        );
        assert_eq!(m["ttlMs"], 5000);
        assert!(m.get("_meta").is_none());
        let h = list_for_client(from_modern, false);
        assert_eq!(h, json!({"tools": []}));
    }

    #[test]
    fn only_this_requests_progress_and_log_messages_are_relayed() {
        let notes = vec![
            json!({"method": "notifications/progress", "params": {"progressToken": 7}}),
            json!({"method": "notifications/progress", "params": {"progressToken": 8}}),
            json!({"method": "notifications/message", "params": {"level": "info"}}),
            json!({"method": "notifications/resources/updated", "params": {"uri": "x"}}),
        ];
        let kept = relayable(notes.clone(), Some(&json!(7)));
        assert_eq!(kept, [notes[0].clone(), notes[2].clone()]);
        assert_eq!(relayable(notes.clone(), None), [notes[2].clone()]);
    }

    #[test]
    fn reads_are_private_and_plain_results_lose_modern_fields() {
        let read = obj(json!({"contents": [], "cacheScope": "public", "ttlMs": 60000}));
        let m =
            result_for_client(read.clone(), true, is_cacheable("resources/read")).expect("modern");
        assert_eq!(m["cacheScope"], "private");
        assert_eq!(m["ttlMs"], 60000);
        assert_eq!(m["resultType"], "complete");
        let h = result_for_client(read, false, true).expect("handshake");
        assert_eq!(Value::Object(h), json!({"contents": []}));
        let prompt = obj(json!({"messages": []}));
        let m = result_for_client(prompt, true, is_cacheable("prompts/get")).expect("modern");
        assert!(m.get("cacheScope").is_none());
        assert!(!is_cacheable("completion/complete"));
    }

    #[test]
    fn calls_translate_both_ways() {
        let plain = obj(json!({"content": [], "isError": false}));
        assert_eq!(
            call_for_client(plain.clone(), true).expect("ok")["resultType"],
            "complete"
        );
        let modern = obj(json!({"content": [], "resultType": "complete"}));
        assert!(
            call_for_client(modern, false)
                .expect("ok")
                .get("resultType")
                .is_none()
        );
        let more = obj(json!({"resultType": "input_required", "requestState": "s"}));
        assert!(is_input_required(&more));
        assert_eq!(
            call_for_client(more.clone(), false)
                .expect_err("refused")
                .code,
            code::INTERNAL_ERROR
        );
        assert_eq!(
            call_for_client(more, true).expect("ok")["resultType"],
            "input_required"
        );
    }
}
