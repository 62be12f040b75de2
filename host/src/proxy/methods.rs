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
//! `subscriptions/listen` stream, which `listen.rs` opens for stateless clients): a permitted
//! `resources/subscribe` and an `resources/unsubscribe` of a handshake-era client are
//! acknowledged by the gateway itself, and the session's subscription is bridged to a listen the
//! gateway holds upstream ([`crate::streams::bridge`]).
//! A permitted `resources/subscribe` without a session is acknowledged by the gateway and not
//! forwarded: no stream could carry its updates, and nothing could ever end it upstream.
//! A handshake-era session's subscription to a handshake-era upstream is recorded by
//! [`crate::streams`], which routes the upstream's updates to the sessions that subscribed;
//! the upstream's own subscription is dropped only when the last of them unsubscribes.
//!
//! With several upstreams ([`crate::upstreams`]) every name here is namespaced: a list merges
//! one page of each upstream the token may reach (its cursor says which upstreams have more,
//! and where), renaming each entry; a target is routed by its prefix and forwarded with the
//! upstream's own name. An upstream that does not answer leaves the others' entries listed, and
//! the list's `_meta` names it ([`crate::upstreams::UNAVAILABLE_META`]).
//!
//! This module must never forward a target the pipeline did not permit, and never list an
//! entry the token may not use.

use serde_json::{Map, Value, json};

use super::target::Target;
use super::{CallContext, now_secs, passthrough_error, translate, upstream_rpc_error};
use crate::capability::Kind;
use crate::http;
use crate::mcp::era::Era;
use crate::mcp::jsonrpc::{Request as RpcRequest, RpcError, code};
use crate::mcp::rounds::{self, RoundSeal, RoundState};
use crate::pipeline::{CallKind, Round, ToolCall};
use crate::upstream::{Reply, Upstream, UpstreamEra, UpstreamError};
use crate::upstreams::{self, Route, Unrouted};

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
        Reply::Result(r) => match crate::mcp::raw::tree(&r) {
            Ok(Value::Object(r)) => Ok(r),
            _ => Err(upstream_rpc_error(&UpstreamError::Malformed(format!(
                "{method} result is not an object"
            )))),
        },
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
    fn relay(&self) -> Option<&crate::mcp::era::Envelope> {
        match self.era {
            Era::Modern(env) => Some(env),
            Era::Handshake => None,
        }
    }

    /// Records a permitted call forwarded to `upstream` at `started`: metrics and the
    /// upstream's health.
    pub(super) fn forwarded<T>(
        &self,
        upstream: Option<&str>,
        started: std::time::Instant,
        reply: &Result<T, UpstreamError>,
    ) {
        (self.svc.metrics()).forwarded_to(upstream, started, reply);
        self.svc.upstreams.note(upstream, reply);
    }

    /// The refusal of a name no upstream's prefix starts, naming the upstreams this token
    /// may reach (never the others).
    fn unrouted(&self, e: &Unrouted) -> RpcError {
        let reachable: Vec<&str> = (self.svc.upstreams.iter())
            .map(|(n, _)| n)
            .filter(|n| self.grant.reaches(n))
            .collect();
        RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(format!(
            "{e}; upstreams: {}",
            reachable.join(", ")
        )))
    }

    /// The upstream a tool or prompt name goes to (`None`: no upstream configured).
    pub(super) fn route_name<'n>(
        &self,
        exposed: &'n str,
    ) -> Result<Option<Route<'_, 'n>>, RpcError> {
        self.svc
            .upstreams
            .route_name(exposed)
            .map_err(|e| self.unrouted(&e))
    }

    /// The upstream a target of `kind` goes to: by URI for resources and resource templates,
    /// by name otherwise.
    fn route_target<'n>(
        &self,
        kind: CallKind,
        exposed: &'n str,
    ) -> Result<Option<Route<'_, 'n>>, RpcError> {
        match kind.capability_kind() {
            Kind::Resource => self.svc.upstreams.route_uri(exposed),
            _ => self.svc.upstreams.route_name(exposed),
        }
        .map_err(|e| self.unrouted(&e))
    }

    /// One page of a list, filtered to the token's scope; with several upstreams, one page of
    /// each merged.
    pub(super) async fn list(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        let Some((member, field, kind)) = list_shape(method) else {
            return Err(super::method_not_found(method));
        };
        let modern = self.era.is_modern();
        let ups = &self.svc.upstreams;
        let reached = |n: &&str| self.grant.reaches(n);
        // Which upstreams to ask, each with its own cursor.
        let asked: Vec<(&str, &Upstream, Option<Value>)> = if ups.namespaced() {
            match rpc.params.get("cursor") {
                None | Some(Value::Null) => ups
                    .iter()
                    .filter(|(n, _)| reached(n))
                    .map(|(n, u)| (n, u, None))
                    .collect(),
                Some(c) => upstreams::decode_cursor(c, ups)
                    .map_err(|e| {
                        RpcError::new(code::INVALID_PARAMS, "Invalid params")
                            .with_data(Value::from(e.to_string()))
                    })?
                    .into_iter()
                    .filter_map(|(n, c)| {
                        let (name, up) = ups.iter().find(|(k, _)| *k == n)?;
                        reached(&name).then_some((name, up, Some(c)))
                    })
                    .collect(),
            }
        } else {
            ups.iter()
                .filter(|(n, _)| reached(n))
                .map(|(n, u)| (n, u, rpc.params.get("cursor").cloned()))
                .collect()
        };
        let relay = self.relay();
        let pages = upstreams::join_all(asked.iter().map(|(name, up, cursor)| async move {
            let mut params = Map::new();
            if let Some(c) = cursor {
                params.insert("cursor".into(), c.clone());
            }
            let page = up.forward(method, params, relay).await;
            self.svc.upstreams.note(Some(name), &page);
            (*name, page)
        }))
        .await;
        if !ups.namespaced() {
            // One upstream: its page as it is, filtered (its cursor, its other members).
            let Some((_, page)) = pages.into_iter().next() else {
                let empty = Map::from_iter([(member.to_owned(), json!([]))]);
                return Ok(translate::list_for_client(empty, modern));
            };
            let reply = page.map_err(|e| upstream_rpc_error(&e))?;
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
            return Ok(translate::list_for_client(result, modern));
        }
        let mut merged = Vec::new();
        let mut next: Vec<(String, Value)> = Vec::new();
        let mut missing: Vec<&str> = Vec::new();
        let mut failure = None;
        for (name, page) in pages {
            let reply = match page {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(upstream = %name, error = %e, method, "list: upstream unavailable");
                    missing.push(name);
                    failure.get_or_insert_with(|| upstream_rpc_error(&e));
                    continue;
                }
            };
            let mut result = match result_object(reply, method) {
                Ok(r) => r,
                // An upstream without this kind of entry (it does not offer prompts) adds none.
                Err(e) if e.code == code::METHOD_NOT_FOUND => continue,
                Err(e) => {
                    missing.push(name);
                    failure.get_or_insert(e);
                    continue;
                }
            };
            if let Some(Value::Array(entries)) = result.remove(member) {
                for mut entry in entries {
                    let Some(original) = entry.get(field).and_then(Value::as_str) else {
                        continue;
                    };
                    let exposed = match kind {
                        Kind::Resource => ups.expose_uri(name, original),
                        _ => ups.expose_name(name, original),
                    };
                    if self.grant.allows(kind, &exposed) {
                        entry[field] = Value::from(exposed);
                        merged.push(entry);
                    }
                }
            }
            match result.remove("nextCursor") {
                None | Some(Value::Null) => {}
                Some(c) => next.push((name.to_owned(), c)),
            }
        }
        if let Some(e) = failure
            && missing.len() == asked.len()
        {
            return Err(e); // none answered: as one upstream down would be
        }
        let mut result = Map::from_iter([(member.to_owned(), Value::Array(merged))]);
        if !next.is_empty() {
            result.insert(
                "nextCursor".into(),
                Value::from(upstreams::encode_cursor(&next)),
            );
        }
        if !missing.is_empty() {
            result.insert(
                "_meta".into(),
                json!({upstreams::UNAVAILABLE_META: missing}),
            );
        }
        Ok(translate::list_for_client(result, modern))
    }

    /// A method that reaches a target: decided, then forwarded with its permit.
    pub(super) async fn target(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        let target = match Target::decode(method, &rpc.params) {
            Some(t) => t?,
            None => return Err(super::method_not_found(method)),
        };
        if method == "resources/subscribe" {
            self.owns_subscriptions()?;
        }
        let route = self.route_target(target.kind, &target.name)?;
        // A later round (2026-07-28): the state must be one the gateway sealed for this very
        // target and arguments; it names the first round's audit event and the round.
        let seal = RoundSeal::new(&self.svc.sessions);
        let binding = self.target_binding(&target);
        let previous = match rpc.params.get("requestState") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(seal.open(s, &binding, now_secs()).map_err(|e| {
                RpcError::new(code::INVALID_PARAMS, "Invalid or expired requestState")
                    .with_data(Value::from(e.to_string()))
            })?),
            Some(_) => {
                return Err(RpcError::new(code::INVALID_PARAMS, "Invalid params")
                    .with_data(Value::from("params.requestState must be a string")));
            }
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
            round: previous.as_ref().map(|p| Round {
                call_event: p.call_event,
                number: p.round.saturating_add(1),
            }),
            approval_id: self.approval_id(),
            upstream: route.map(|r| r.name),
        };
        let (permit, upstream) = self.decide(&call).await?;
        // A subscribe without a session has no stream to be sent updates on, and the
        // upstream's one session serves every agent: it is decided (and audited) and
        // acknowledged here, or the upstream would keep a subscription nobody can end.
        let sessionless = method == "resources/subscribe" && self.session.is_none();
        if sessionless || acknowledged_here(upstream, method).await {
            // A session's subscription is bridged to the upstream's listen (`streams::bridge`).
            if self.record_subscription(method, &target.name)?
                && let Some(r) = route
            {
                let (hub, ups) = (&self.svc.streams, &self.svc.upstreams);
                crate::streams::bridge::ensure(hub, ups, r.name, &target.name, r.original);
            }
            let mut ack = serde_json::Map::new();
            self.annotate(&mut ack, &permit);
            return Ok(Value::Object(ack));
        }
        // A session's subscription is the gateway's to route: recorded before the upstream
        // may send its first update.
        let subscribed = self.record_subscription(method, &target.name)?;
        // The body the target was decoded from, as decided (envelope keys are the upstream
        // client's to write for its own hop).
        let forwarded_as = route.map_or(target.name.as_str(), |r| r.original);
        let cleared = permit
            .clear(target.kind, &target.name, &target.arguments, forwarded_as)
            .map_err(|_| upstream_rpc_error(&UpstreamError::NotDecided))?;
        let mut params = renamed(method, &rpc.params, route);
        if let Some(p) = &previous {
            // The client's answers to the requests it was given, and the upstream's own state.
            if let Some(answers @ Value::Object(_)) = rpc.params.get("inputResponses") {
                params.insert("inputResponses".into(), answers.clone());
            }
            if let Some(inner) = &p.inner {
                params.insert("requestState".into(), Value::from(inner.as_str()));
            }
        }
        let forwarding = std::time::Instant::now();
        let reply = upstream
            .forward_permitted(cleared, method, params, self.relay())
            .await;
        self.forwarded(call.upstream, forwarding, &reply);
        let reply = match reply {
            Ok(r) => self.relay_notifications(r, &rpc.params),
            Err(e) => {
                self.forget_subscription(subscribed, &target.name);
                self.svc
                    .pipeline
                    .record_upstream_failure(&call, &permit, e.status(), &e.to_string())
                    .await;
                return Err(upstream_rpc_error(&e));
            }
        };
        let mut result = match result_object(reply, method) {
            Ok(r) => r,
            Err(e) => {
                self.forget_subscription(subscribed, &target.name);
                return Err(e);
            }
        };
        if self.era.is_modern() && translate::is_input_required(&result) {
            // What the upstream asks the agent's user is decided before the client sees it
            // (as during a tool call), and the upstream's state goes out under the gateway's
            // seal, bound to this target. (A handshake-era client cannot answer it:
            // `result_for_client` refuses it below.)
            if let Err(e) = self.decide_target_inputs(&call, &mut result).await {
                self.forget_subscription(subscribed, &target.name);
                return Err(e);
            }
            let mut next = binding;
            next.call_event = previous.as_ref().map_or(permit.event_id, |p| p.call_event);
            next.round = previous.as_ref().map_or(1, |p| p.round.saturating_add(1));
            next.inner = result
                .get("requestState")
                .and_then(Value::as_str)
                .map(str::to_owned);
            result.insert("requestState".into(), Value::from(seal.seal(&next)));
        }
        if let Some(r) = route {
            expose_contents(&self.svc.upstreams, r.name, &mut result);
        }
        let mut result = translate::result_for_client(
            result,
            self.era.is_modern(),
            translate::is_cacheable(method),
        )?;
        self.annotate(&mut result, &permit);
        Ok(Value::Object(result))
    }

    /// What binds the rounds of a target's call: the token, the target as the checks name it
    /// (`prompt:…`, `resource:…`, `completion:…`: never a tool's), and its arguments.
    fn target_binding(&self, target: &Target) -> RoundState {
        RoundState {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            tool: target.kind.qualified(&target.name).into_owned(),
            args_digest: rounds::args_digest(&target.arguments),
            call_event: 0,
            round: 0,
            issued_at: now_secs(),
            inner: None,
        }
    }

    /// Decides each input request of a target's input-required result (the first refused one
    /// refuses the call), and gives the client exactly the requests decided.
    async fn decide_target_inputs(
        &self,
        call: &ToolCall<'_>,
        result: &mut Map<String, Value>,
    ) -> Result<(), RpcError> {
        let Some(requests) = super::ask::input_requests(result.get("inputRequests"))?.cloned()
        else {
            return Ok(());
        };
        let qualified = call.name();
        let asking = super::ask::Asking {
            grant: self.grant,
            tool: &qualified,
            upstream: call.upstream,
            remote_ip: &call.remote_ip,
            session: call.session_id,
        };
        for request in requests.values() {
            asking.decide(self.svc, request).await?;
        }
        result.insert("inputRequests".into(), Value::Object(requests));
        Ok(())
    }

    /// Records a handshake-era session's subscription to `uri` (`true` when recorded); other
    /// methods and sessionless clients record nothing.
    fn record_subscription(&self, method: &str, uri: &str) -> Result<bool, RpcError> {
        let (Some(session), Some(token)) = (self.session, http::bearer(self.headers)) else {
            return Ok(false);
        };
        if method != "resources/subscribe" {
            return Ok(false);
        }
        self.svc
            .streams
            .subscribe(session, self.grant, token, uri)
            .map(|_| true)
            .map_err(|e| {
                RpcError::new(code::INTERNAL_ERROR, "subscription refused")
                    .with_data(Value::from(e.to_string()))
            })
    }

    /// A session's subscriptions are its opener's, as its stream is: a token attenuated from
    /// it may call in the session but not change what the session is sent (nor, by
    /// subscribing, take over which token the session's stream is checked against).
    fn owns_subscriptions(&self) -> Result<(), RpcError> {
        match self.session {
            Some(id) if !super::opened_by(self.svc, id, self.grant) => Err(RpcError::new(
                code::INVALID_REQUEST,
                "only the token that opened this session may change its subscriptions",
            )),
            _ => Ok(()),
        }
    }

    /// Undoes [`Self::record_subscription`] when the upstream did not take it.
    fn forget_subscription(&self, recorded: bool, uri: &str) {
        if let (true, Some(session)) = (recorded, self.session) {
            self.svc.streams.unsubscribe(session, uri);
        }
    }

    /// A method forwarded as it is once authenticated (`resources/unsubscribe`).
    pub(super) async fn forward_plain(&self, rpc: &RpcRequest) -> Result<Value, RpcError> {
        let method = rpc.method.as_str();
        self.owns_subscriptions()?;
        let uri = rpc.param_str("uri").unwrap_or_default();
        let route = self
            .svc
            .upstreams
            .route_uri(uri)
            .map_err(|e| self.unrouted(&e))?;
        let Some(upstream) = route.map(|r| r.upstream) else {
            return Err(upstream_rpc_error(&UpstreamError::NotConfigured));
        };
        // Without a session nothing of this client's is subscribed, and the upstream's one
        // session serves every agent's subscriptions: nothing is forwarded, or any token could
        // end another tenant's subscription.
        let Some(session) = self.session else {
            return Ok(json!({}));
        };
        if acknowledged_here(upstream, method).await {
            if self.svc.streams.unsubscribe(session, uri) {
                crate::streams::bridge::stop(&self.svc.streams, uri);
            }
            return Ok(json!({}));
        }
        // This session did not subscribe, or another session on this replica still does: the
        // upstream keeps sending.
        if !self.svc.streams.unsubscribe(session, uri) {
            return Ok(json!({}));
        }
        let reply = upstream
            .forward(method, renamed(method, &rpc.params, route), self.relay())
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

/// The body to forward: `params` with the target renamed to the upstream's own name or URI
/// when it was namespaced.
/// Only the members the decision saw and `_meta` (a progress token, the stateless envelope)
/// are forwarded: any other member would reach the upstream undecided. A later round's
/// `inputResponses` and `requestState` go upstream only as `target` opened them from its seal.
pub(super) fn renamed(
    method: &str,
    params: &Map<String, Value>,
    route: Option<Route<'_, '_>>,
) -> Map<String, Value> {
    let decided: &[&str] = match method {
        "resources/read" | "resources/subscribe" | "resources/unsubscribe" => &["uri"],
        "prompts/get" => &["name", "arguments"],
        "completion/complete" => &["ref", "argument", "context"],
        _ => &[],
    };
    let mut params: Map<String, Value> = params
        .iter()
        .filter(|(k, _)| k.as_str() == "_meta" || decided.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(r) = route {
        upstreams::rename_target(method, &mut params, r.original);
    }
    params
}

/// A `resources/read` result's `contents[].uri` as the agent knows them (namespaced by
/// `upstream` when there are several upstreams).
fn expose_contents(ups: &upstreams::Upstreams, upstream: &str, result: &mut Map<String, Value>) {
    if !ups.namespaced() {
        return;
    }
    if let Some(Value::Array(contents)) = result.get_mut("contents") {
        for c in contents {
            if let Some(uri) = c.get("uri").and_then(Value::as_str) {
                let exposed = ups.expose_uri(upstream, uri);
                c["uri"] = Value::from(exposed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a target method forwards is what its decision saw, and `_meta`: a member the
    /// checks never saw (or a later round's members sent without a seal) stays here.
    #[test]
    fn only_decided_members_are_forwarded() {
        let cases = [
            (
                "resources/read",
                json!({"uri": "file:///a", "_meta": {"progressToken": 1}, "range": "0-9",
                       "inputResponses": {}, "requestState": "x"}),
                json!({"uri": "file:///a", "_meta": {"progressToken": 1}}),
            ),
            (
                "prompts/get",
                json!({"name": "greet", "arguments": {"who": "a"}, "override": true}),
                json!({"name": "greet", "arguments": {"who": "a"}}),
            ),
            (
                "completion/complete",
                json!({"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": ""},
                       "context": {"arguments": {}}, "extra": 1}),
                json!({"ref": {"type": "ref/prompt", "name": "p"}, "argument": {"name": "a", "value": ""},
                       "context": {"arguments": {}}}),
            ),
        ];
        for (method, sent, forwarded) in cases {
            let params = sent.as_object().cloned().expect("object");
            assert_eq!(
                Value::Object(renamed(method, &params, None)),
                forwarded,
                "{method}"
            );
        }
    }
}
