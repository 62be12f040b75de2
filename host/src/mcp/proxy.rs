//! The MCP methods besides `tools/call`, proxied to the upstream in its revision and shaped for
//! the client's:
//! - lists (`tools/list`, `resources/list`, `resources/templates/list`, `prompts/list`): one
//!   page, filtered to what the token's caveats allow (a template by its URI template);
//! - targets (`resources/read`, `resources/subscribe`, `prompts/get`, `completion/complete`):
//!   decoded ([`super::target`]), decided by the pipeline with their kind, forwarded with the
//!   permit, the result carrying the decision summary;
//! - `resources/unsubscribe`: authenticated and forwarded (it only narrows what the upstream
//!   sends).
//!
//! A stateless (2026-07-28) upstream has no subscribe pair (its subscriptions are a
//! `subscriptions/listen` stream, not opened yet): a permitted `resources/subscribe` and an
//! `resources/unsubscribe` of a handshake-era client are acknowledged by the gateway itself.
//! Update notifications reach no client yet, whichever the upstream's revision (the gateway
//! advertises `subscribe: false`).
//!
//! This module must never forward a target the pipeline did not permit, and never list an
//! entry the token may not use.

use serde_json::{Map, Value, json};

use super::era::Era;
use super::jsonrpc::{Request as RpcRequest, RpcError};
use super::target::Target;
use super::{CallContext, passthrough_error, translate, upstream_rpc_error};
use crate::capability::Kind;
use crate::http;
use crate::pipeline::ToolCall;
use crate::upstream::{Reply, Upstream, UpstreamEra, UpstreamError};

/// A list method: the result member holding the entries, the entry field that names one, and
/// the kind of caveat that governs it.
fn list_shape(method: &str) -> Option<(&'static str, &'static str, Kind)> {
    Some(match method {
        "tools/list" => ("tools", "name", Kind::Tool),
        "resources/list" => ("resources", "uri", Kind::Resource),
        "resources/templates/list" => ("resourceTemplates", "uriTemplate", Kind::Resource),
        "prompts/list" => ("prompts", "name", Kind::Prompt),
        _ => return None,
    })
}

/// Whether `method` is a list this module answers.
pub fn is_list(method: &str) -> bool {
    list_shape(method).is_some()
}

/// The upstream's result, when it is an object.
fn result_object(reply: Reply, method: &str) -> Result<Map<String, Value>, RpcError> {
    match reply {
        Reply::Result(Value::Object(r)) => Ok(r),
        Reply::Result(_) => Err(upstream_rpc_error(&UpstreamError::Malformed(format!(
            "{method} result is not an object"
        )))),
        Reply::Error(e) => Err(passthrough_error(e)),
    }
}

/// Whether `method` is a subscribe/unsubscribe the upstream cannot take (a stateless upstream),
/// so the gateway acknowledges it.
async fn acknowledged_here(upstream: &Upstream, method: &str) -> bool {
    matches!(method, "resources/subscribe" | "resources/unsubscribe")
        && matches!(upstream.era().await, Ok(UpstreamEra::Modern(_)))
}

impl CallContext<'_> {
    fn relay(&self) -> Option<&super::era::Envelope> {
        match self.era {
            Era::Modern(env) => Some(env),
            Era::Handshake => None,
        }
    }

    /// One page of a list, filtered to the token's scope.
    pub(super) async fn list(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        let Some((member, field, kind)) = list_shape(method) else {
            return Err(super::method_not_found(method));
        };
        let modern = self.era.is_modern();
        let Some(upstream) = self.gw.upstream.as_ref() else {
            let empty = Map::from_iter([(member.to_owned(), json!([]))]);
            return Ok(translate::list_for_client(empty, modern));
        };
        let mut params = Map::new();
        if let Some(c) = rpc.params.get("cursor") {
            params.insert("cursor".into(), c.clone());
        }
        let reply = upstream
            .forward(method, params, self.relay())
            .await
            .map_err(|e| upstream_rpc_error(&e))?;
        let mut result = result_object(reply, method)?;
        let entries = match result.remove(member) {
            Some(Value::Array(entries)) => entries,
            _ => Vec::new(),
        };
        let visible: Vec<Value> = entries
            .into_iter()
            .filter(|e| {
                e.get(field)
                    .and_then(Value::as_str)
                    .is_some_and(|n| self.grant.allows(kind, n))
            })
            .collect();
        result.insert(member.into(), Value::Array(visible));
        Ok(translate::list_for_client(result, modern))
    }

    /// A method that reaches a target: decided, then forwarded with its permit.
    pub(super) async fn target(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        let target = match Target::decode(method, &rpc.params) {
            Some(t) => t?,
            None => return Err(super::method_not_found(method)),
        };
        let call = ToolCall {
            grant: self.grant,
            kind: target.kind,
            tool: &target.name,
            arguments: &target.arguments,
            intent_prompt: http::header_str(self.headers, "x-intent-prompt"),
            agent: http::header_str(self.headers, "x-intentgate-agent"),
            remote_ip: self.remote.ip().to_string(),
            session_id: self.session,
            round: None,
            approval_id: self.approval_id(),
        };
        let (permit, upstream) = self.decide(&call).await?;
        if acknowledged_here(upstream, method).await {
            let mut ack = serde_json::Map::new();
            self.annotate(&mut ack, &permit);
            return Ok(Value::Object(ack));
        }
        // The body the target was decoded from, as decided (envelope keys are the upstream
        // client's to write for its own hop).
        let forwarding = std::time::Instant::now();
        let reply = upstream
            .forward_permitted(&permit, method, rpc.params.clone(), self.relay())
            .await;
        self.gw.metrics().forwarded(forwarding, &reply);
        let reply = match reply {
            Ok(r) => self.relay_notifications(r, &rpc.params),
            Err(e) => {
                self.gw
                    .pipeline
                    .record_upstream_failure(&call, &permit, e.status(), &e.to_string())
                    .await;
                return Err(upstream_rpc_error(&e));
            }
        };
        let result = result_object(reply, method)?;
        let mut result = translate::result_for_client(
            result,
            self.era.is_modern(),
            translate::is_cacheable(method),
        )?;
        self.annotate(&mut result, &permit);
        Ok(Value::Object(result))
    }

    /// A method forwarded as it is once authenticated (`resources/unsubscribe`).
    pub(super) async fn forward_plain(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        let Some(upstream) = self.gw.upstream.as_ref() else {
            return Err(upstream_rpc_error(&UpstreamError::NotConfigured));
        };
        if acknowledged_here(upstream, method).await {
            return Ok(json!({}));
        }
        let reply = upstream
            .forward(method, rpc.params.clone(), self.relay())
            .await
            .map_err(|e| upstream_rpc_error(&e))?;
        let result = result_object(reply, method)?;
        Ok(Value::Object(translate::result_for_client(
            result,
            self.era.is_modern(),
            false,
        )?))
    }
}
