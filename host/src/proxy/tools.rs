//! `initialize` (handshake era) and `tools/call` of either revision: the call
//! decoded into one [`Invocation`], decided by the pipeline, forwarded with its permit, and its
//! result shaped for the client's revision, multi-round calls sealed ([`crate::mcp::rounds`]).
//! This module must never forward a call the pipeline did not permit.

use hyper::header::HeaderValue;
use hyper::{Response, StatusCode};
use serde_json::{Value, json};

use super::{
    CallContext, SESSION_HEADER, now_secs, passthrough_error, translate, upstream_rpc_error,
};
use crate::approvals::{Status, wait::Outcome};
use crate::http::{self, Body};
use crate::mcp::call::Invocation;
use crate::mcp::discover;
use crate::mcp::era::Era;
use crate::mcp::jsonrpc::{self, Id, Request as RpcRequest, RpcError, code};
use crate::mcp::raw::{RawObject, ResultBody};
use crate::mcp::rounds::{self, RoundSeal, RoundState};
use crate::mcp::session::SessionClaims;
use crate::pipeline::{CallKind, Pending, Round, ToolCall, is_reserved_tool_name};
use crate::upstream::Reply;

impl CallContext<'_> {
    pub(super) async fn initialize(&self, rpc: &RpcRequest, id: &Id) -> Response<Body> {
        let requested = rpc.param_str("protocolVersion").unwrap_or_default();
        let version = discover::negotiate_handshake(requested);
        let result = discover::initialize_result(version, &self.upstream_profile().await);
        let session_id = self.svc.sessions.issue(&SessionClaims {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            protocol_version: version.to_owned(),
            issued_at: now_secs(),
            opener: Some(crate::mcp::session::opener_of(&self.grant.token_digest)),
        });
        self.svc.metrics().server.session_issued();
        let mut resp = http::json_bytes(StatusCode::OK, jsonrpc::result(id, &result));
        if let Ok(v) = HeaderValue::from_str(&session_id) {
            resp.headers_mut().insert(SESSION_HEADER, v);
        }
        resp
    }

    /// What binds the rounds of this call (everything but the links themselves).
    fn round_binding(&self, inv: &Invocation) -> RoundState {
        RoundState {
            tenant: self.grant.tenant.clone(),
            jti: self.grant.jti.clone(),
            tool: inv.name.clone(),
            args_digest: rounds::args_digest(&inv.arguments),
            call_event: 0,
            round: 0,
            issued_at: now_secs(),
            inner: None,
        }
    }

    pub(super) async fn tools_call(&self, rpc: &RpcRequest) -> Result<ResultBody, RpcError> {
        let mut inv = Invocation::decode(&rpc.params)?;
        if is_reserved_tool_name(&inv.name) {
            // It would read as a resource, prompt or completion to the checks and the audit.
            return Err(
                RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(
                    "tool names starting with resource:, prompt: or completion: are reserved",
                )),
            );
        }
        let route = self.route_name(&inv.name)?;
        let modern = self.era.is_modern();
        if modern && let Some(r) = route {
            // The client's `Mcp-Param-*` headers must agree with the arguments the tool marks.
            let marked = r.upstream.marked_arguments(r.original).await;
            let empty = serde_json::Map::new();
            let args = inv.arguments.as_object().unwrap_or(&empty);
            crate::mcp::params::check(self.headers, &marked, args)?;
        }
        let seal = RoundSeal::new(&self.svc.sessions);
        // A later round of a multi-round call: the state must be one the gateway sealed for
        // this very call; it names the call's first audit event and the round.
        let mut previous = match &inv.request_state {
            Some(s) => Some(
                seal.open(s, &self.round_binding(&inv), now_secs())
                    .map_err(|e| {
                        RpcError::new(code::INVALID_PARAMS, "Invalid or expired requestState")
                            .with_data(Value::from(e.to_string()))
                    })?,
            ),
            None => None,
        };
        // A state sealed for a pending approval (round 0): the retry long-polls the decision,
        // then the call is decided again with its approval.
        let mut resumes: Option<String> = None;
        if let Some(p) = previous.as_ref().filter(|p| p.round == 0) {
            let id = p.inner.clone().unwrap_or_default();
            if let Some(still) = self.await_approval(&id).await? {
                return Ok(self.approval_input_required(&inv, &still).into());
            }
            resumes = Some(id);
            previous = None;
        } else if let Some(id) = self.approval_id() {
            // A resume by header long-polls the same way; still pending is `-32019` again
            // (nothing was decided, so nothing is audited).
            if let Some(still) = self.await_approval(id).await? {
                return Err(super::denial::rpc_error(
                    &crate::pipeline::Denial::ApprovalPending(still),
                ));
            }
        }
        // Answers belong to a later round only: the upstream asked them through the gateway,
        // whose seal names the round. Sent with a first round, they would pre-answer a question
        // (a confirmation) nobody was shown, and no check would see it.
        if previous.is_none() {
            inv.input_responses = None;
        }
        let call = ToolCall {
            grant: self.grant,
            kind: CallKind::Tool,
            tool: &inv.name,
            arguments: &inv.arguments,
            intent_prompt: http::header_str(self.headers, "x-intent-prompt"),
            agent: http::header_str(self.headers, "x-intentgate-agent"),
            remote_ip: self.remote.ip().to_string(),
            session_id: self.session,
            round: previous.as_ref().map(|p| Round {
                call_event: p.call_event,
                number: p.round.saturating_add(1),
            }),
            approval_id: resumes.as_deref().or_else(|| self.approval_id()),
            upstream: route.map(|r| r.name),
        };
        // Every round is decided again; only the first is charged.
        let (permit, upstream) = match self.decide(&call).await {
            Ok(decided) => decided,
            // A stateless-era client that is not held gets the pending approval as an
            // input-required result: any MCP client resumes it by retrying with the state.
            Err(e) if modern => match self.take_pending() {
                Some(p)
                    if !super::hold::wanted(self.svc, self.headers, &self.grant.tenant, p.mode) =>
                {
                    return Ok(self.approval_input_required(&inv, &p).into());
                }
                // Held (by `handle`): the pending approval goes back for it.
                Some(p) => {
                    if let Ok(mut slot) = self.pending.lock() {
                        *slot = Some(p);
                    }
                    return Err(e);
                }
                None => return Err(e),
            },
            Err(e) => return Err(e),
        };
        // A call held open at a handshake-era upstream that asked this 2026-07-28 client
        // something: resumed with the client's answers, or a new one held when it asks.
        let held = previous
            .as_ref()
            .and_then(|p| p.inner.as_deref())
            .and_then(|s| s.strip_prefix(HELD));
        if let Some(id) = held {
            let step = self.resume_held(&call, &inv, id, rpc).await?;
            return self
                .held_answer(&inv, &call, &permit, previous.as_ref(), step, rpc)
                .await;
        }
        if modern && self.holds(upstream).await {
            let mut params = inv.forward_params(None);
            if let Some(r) = route {
                crate::upstreams::rename_target("tools/call", &mut params, r.original);
            }
            let forwarded_as = route.map_or(inv.name.as_str(), |r| r.original);
            let cleared = clear(&permit, &inv, forwarded_as)?;
            let step = self.hold_call(&call, cleared, params, rpc).await?;
            return self
                .held_answer(&inv, &call, &permit, previous.as_ref(), step, rpc)
                .await;
        }
        let mut params = inv.forward_params(previous.as_ref().and_then(|p| p.inner.as_deref()));
        if let Some(r) = route {
            crate::upstreams::rename_target("tools/call", &mut params, r.original);
        }
        let forwarded_as = route.map_or(inv.name.as_str(), |r| r.original);
        let cleared = clear(&permit, &inv, forwarded_as)?;
        let mut result = match self.forward(&call, cleared, upstream, params, rpc).await? {
            Ok(r) => r,
            Err(other) => return Ok(other.into()),
        };
        // A handshake-era client cannot answer an input-required result itself: its input
        // requests are relayed to it as requests on its event stream, and the call is sent
        // again with its answers, each round decided again (and charged once, with the first).
        let mut number = 1;
        while !modern && translate::is_input_required(&result) && self.to_client.is_some() {
            number += 1;
            if number > MAX_RELAYED_ROUNDS {
                break;
            }
            let answers = self.ask_inputs(&call, rpc, &result).await;
            let round = ToolCall {
                grant: self.grant,
                kind: CallKind::Tool,
                tool: &inv.name,
                arguments: &inv.arguments,
                intent_prompt: call.intent_prompt,
                agent: call.agent,
                remote_ip: call.remote_ip.clone(),
                session_id: call.session_id,
                round: Some(Round {
                    call_event: permit.event_id,
                    number,
                }),
                approval_id: None,
                upstream: call.upstream,
            };
            let (next_permit, upstream) = self.decide(&round).await?;
            let state = result.string("requestState");
            let mut params = inv.forward_params(state.as_deref());
            params.insert("inputResponses".into(), Value::Object(answers));
            if let Some(r) = route {
                crate::upstreams::rename_target("tools/call", &mut params, r.original);
            }
            let cleared = clear(&next_permit, &inv, forwarded_as)?;
            result = match self.forward(&round, cleared, upstream, params, rpc).await? {
                Ok(r) => r,
                Err(other) => return Ok(other.into()),
            };
        }
        if modern && translate::is_input_required(&result) {
            // What the upstream asks the agent's user is decided before the client sees it,
            // as when it is asked during a handshake-era call.
            self.decide_inputs(&call, &mut result).await?;
            // Hand out the gateway's seal instead of the upstream's state.
            let mut next = self.round_binding(&inv);
            next.call_event = previous.as_ref().map_or(permit.event_id, |p| p.call_event);
            next.round = call.round.as_ref().map_or(1, |r| r.number);
            next.inner = result.string("requestState");
            result.insert("requestState", &Value::from(seal.seal(&next)));
        }
        let mut result = translate::call_for_client(result, modern)?;
        self.annotate(&mut result, &permit);
        Ok(result.into())
    }

    /// Forwards a permitted call: the upstream's result object, as its text (`Err` holds a
    /// result that is not an object, passed on as is), its requests to the client relayed when
    /// the client takes an event stream, its failure recorded against the decision.
    async fn forward(
        &self,
        call: &ToolCall<'_>,
        cleared: crate::pipeline::Cleared<'_>,
        upstream: &crate::upstream::Upstream,
        params: serde_json::Map<String, Value>,
        rpc: &RpcRequest,
    ) -> Result<Result<RawObject, Value>, RpcError> {
        let permit = cleared.permit;
        let relay = match self.era {
            Era::Modern(env) => Some(env),
            Era::Handshake => None,
        };
        let forwarding = std::time::Instant::now();
        // The upstream may ask this call's client something (sampling, elicitation): relayed
        // when the client takes an event stream, refused otherwise.
        let ask_client = self.asker(call, rpc).map(super::ask::Asker::into_handler);
        // Cancellable by its client (`cancel.rs`) while it is in flight.
        let cancellable = match (rpc.id.as_ref(), call.upstream) {
            (Some(id), Some(name)) => self.svc.in_flight.register(self.grant, id, name),
            _ => None,
        };
        let sending = upstream.call_tool_relaying(cleared, params, relay, ask_client.as_ref());
        let reply = match &cancellable {
            Some(r) => {
                crate::upstream::SENT
                    .scope(std::sync::Arc::clone(&r.sent), sending)
                    .await
            }
            None => sending.await,
        };
        self.settle_forwarded(call, permit, forwarding, reply, rpc)
            .await
    }

    /// The upstream's answer to a forwarded call, as [`Self::forward`] returns it.
    async fn settle_forwarded(
        &self,
        call: &ToolCall<'_>,
        permit: &crate::pipeline::Permit,
        forwarding: std::time::Instant,
        reply: Result<crate::upstream::Relayed, crate::upstream::UpstreamError>,
        rpc: &RpcRequest,
    ) -> Result<Result<RawObject, Value>, RpcError> {
        self.forwarded(call.upstream, forwarding, &reply);
        let reply = match reply {
            Ok(r) => self.relay_notifications(r, &rpc.params),
            Err(e) => {
                self.svc
                    .pipeline
                    .record_upstream_failure(call, permit, e.status(), &e.to_string())
                    .await;
                return Err(upstream_rpc_error(&e));
            }
        };
        match reply {
            // Read one level deep: the members the translation touches, the rest as text.
            Reply::Result(raw) => match RawObject::parse(raw.get()) {
                Ok(r) => Ok(Ok(r)),
                // Not an object: passed on as it is (no member to translate).
                Err(_) => crate::mcp::raw::tree(&raw).map(Err).map_err(|e| {
                    upstream_rpc_error(&crate::upstream::UpstreamError::Malformed(e.to_string()))
                }),
            },
            Reply::Error(e) => Err(passthrough_error(e)),
        }
    }

    /// Asks a handshake-era client the input requests of an input-required result, one by
    /// one, on its event stream; its answers keyed as the requests were.
    async fn ask_inputs(
        &self,
        call: &ToolCall<'_>,
        rpc: &RpcRequest,
        result: &RawObject,
    ) -> serde_json::Map<String, Value> {
        let mut answers = serde_json::Map::new();
        let Some(asker) = self.asker(call, rpc) else {
            return answers;
        };
        let Some(Value::Object(requests)) = result.value("inputRequests") else {
            return answers;
        };
        for (key, mut request) in requests.into_iter().take(MAX_RELAYED_INPUTS) {
            // An input request carries no id (it is not a JSON-RPC request of its own); it is
            // asked as one, or the asker would take it for a notification.
            if let Some(m) = request.as_object_mut() {
                m.entry("id").or_insert_with(|| Value::from(key.clone()));
            }
            let reply = asker.ask(request).await;
            // An input the client refused is answered as declined, so the tool can go on.
            let answer = match reply.get("result") {
                Some(r) => r.clone(),
                None => json!({"action": "decline"}),
            };
            answers.insert(key, answer);
        }
        answers
    }

    /// Whether a 2026-07-28 client's call to `upstream` is held open when the upstream asks
    /// something: the upstream speaks the handshake era (it asks during the call) and the
    /// client declared it can be asked.
    async fn holds(&self, upstream: &crate::upstream::Upstream) -> bool {
        let Era::Modern(env) = self.era else {
            return false;
        };
        let caps = &env.client_capabilities;
        let askable = ["sampling", "elicitation", "roots"]
            .iter()
            .any(|k| caps.get(*k).is_some());
        askable
            && matches!(
                upstream.era().await,
                Ok(crate::upstream::UpstreamEra::Handshake)
            )
    }

    /// Starts a permitted call at a handshake-era upstream in a task of its own, and waits for
    /// its end or its first request to the client.
    async fn hold_call(
        &self,
        call: &ToolCall<'_>,
        cleared: crate::pipeline::Cleared<'_>,
        params: serde_json::Map<String, Value>,
        rpc: &RpcRequest,
    ) -> Result<HeldStep, RpcError> {
        let Era::Modern(env) = self.era else {
            return Err(RpcError::new(code::INTERNAL_ERROR, "not a held call"));
        };
        let Some(upstream) = call.upstream.and_then(|n| self.svc.upstreams.shared(n)) else {
            return Err(upstream_rpc_error(
                &crate::upstream::UpstreamError::NotConfigured,
            ));
        };
        let (tx, events) = tokio::sync::mpsc::channel::<Value>(8);
        let relays = std::sync::Arc::clone(&self.svc.relays);
        let (tenant, token) = (self.grant.tenant.clone(), self.grant.token_key());
        let handler = std::sync::Arc::new(crate::upstream::ServerRequests::new(
            &self.grant.tenant,
            &token.clone(),
            move |request: Value| {
                let (relays, tx) = (std::sync::Arc::clone(&relays), tx.clone());
                let (tenant, token) = (tenant.clone(), token.clone());
                Box::pin(async move {
                    if request.get("id").is_none() {
                        let _ = tx.send(request).await;
                        return serde_json::Map::new();
                    }
                    relays.relay(&tenant, &token, &tx, request).await
                })
                    as crate::store::BoxFuture<'static, serde_json::Map<String, Value>>
            },
        ));
        let started = std::time::Instant::now();
        let done = upstream
            .spawn_call_tool(cleared, params, Some(env.clone()), handler)
            .map_err(|e| upstream_rpc_error(&e))?;
        let held = crate::mcp::relay::HeldCall::new(
            &self.grant.tenant,
            &self.grant.token_key(),
            events,
            done,
        );
        Ok(self.await_held(call, held, started, rpc).await)
    }

    /// Resumes the call held under `id`: the client's answers go to the upstream's requests,
    /// then the call is waited for again.
    async fn resume_held(
        &self,
        call: &ToolCall<'_>,
        inv: &Invocation,
        id: &str,
        rpc: &RpcRequest,
    ) -> Result<HeldStep, RpcError> {
        let (tenant, token) = (&self.grant.tenant, &self.grant.token_key());
        let Some(held) = self.svc.relays.resume(tenant, token, id) else {
            return Err(
                RpcError::new(code::INVALID_PARAMS, "Invalid or expired requestState").with_data(
                    Value::from(
                        "the call it resumes ended, or is held by another replica of the gateway",
                    ),
                ),
            );
        };
        if let Some(Value::Object(answers)) = &inv.input_responses {
            for (key, answer) in answers {
                self.svc
                    .relays
                    .deliver(tenant, token, json!({"id": key, "result": answer}));
            }
        }
        Ok(self
            .await_held(call, held, std::time::Instant::now(), rpc)
            .await)
    }

    /// Waits for a held call's next request to its client (decided first, like one asked
    /// during a handshake-era call; a refused one is answered to the upstream as an error) or
    /// its end. Its notifications are kept for the client as they come.
    async fn await_held(
        &self,
        call: &ToolCall<'_>,
        mut held: crate::mcp::relay::HeldCall,
        started: std::time::Instant,
        rpc: &RpcRequest,
    ) -> HeldStep {
        let token = rpc
            .params
            .get("_meta")
            .and_then(|m| m.get("progressToken"))
            .cloned();
        let asking = super::ask::Asking {
            grant: self.grant,
            tool: call.tool,
            upstream: call.upstream,
            remote_ip: &call.remote_ip,
            session: call.session_id,
        };
        loop {
            tokio::select! {
                Some(message) = held.events.recv() => {
                    if message.get("id").is_none() {
                        self.keep_notifications(vec![message], token.as_ref());
                        continue;
                    }
                    match asking.decide(self.svc, &message).await {
                        Ok(()) => return HeldStep::Asked(message, held),
                        Err(refused) => {
                            let error = json!({"code": refused.code, "message": refused.message});
                            self.svc.relays.deliver(
                                &self.grant.tenant,
                                &self.grant.token_key(),
                                json!({"id": message["id"], "error": error}),
                            );
                        }
                    }
                }
                ended = &mut held.done => {
                    let mut late = Vec::new();
                    while let Ok(n) = held.events.try_recv() {
                        late.push(n);
                    }
                    self.keep_notifications(late, token.as_ref());
                    let reply = ended.unwrap_or_else(|e| {
                        Err(crate::upstream::UpstreamError::Unavailable(format!(
                            "the held call ended: {e}"
                        )))
                    });
                    return HeldStep::Finished(started, reply);
                }
            }
        }
    }

    fn keep_notifications(&self, notifications: Vec<Value>, token: Option<&Value>) {
        let keep = translate::relayable(notifications, token);
        if let Ok(mut n) = self.notifications.lock() {
            n.extend(keep);
        }
    }

    /// What a 2026-07-28 client gets for a held call's step: its final result, or the
    /// upstream's request as an input-required result whose sealed state resumes the call.
    async fn held_answer(
        &self,
        inv: &Invocation,
        call: &ToolCall<'_>,
        permit: &crate::pipeline::Permit,
        previous: Option<&RoundState>,
        step: HeldStep,
        rpc: &RpcRequest,
    ) -> Result<ResultBody, RpcError> {
        {
            let (request, held) = match step {
                HeldStep::Finished(started, reply) => {
                    let result = match self
                        .settle_forwarded(call, permit, started, reply, rpc)
                        .await?
                    {
                        Ok(r) => r,
                        Err(other) => return Ok(other.into()),
                    };
                    let mut result = translate::call_for_client(result, true)?;
                    self.annotate(&mut result, permit);
                    return Ok(result.into());
                }
                HeldStep::Asked(request, held) => (request, held),
            };
            let id = request["id"].as_str().unwrap_or_default().to_owned();
            if !self.svc.relays.hold(&id, held) {
                return Err(RpcError::new(
                    code::INTERNAL_ERROR,
                    "too many calls waiting for their clients",
                ));
            }
            let mut next = self.round_binding(inv);
            next.call_event = previous.map_or(permit.event_id, |p| p.call_event);
            next.round = call.round.as_ref().map_or(1, |r| r.number);
            next.inner = Some(format!("{HELD}{id}"));
            let state = RoundSeal::new(&self.svc.sessions).seal(&next);
            let mut result = serde_json::Map::new();
            result.insert("resultType".into(), Value::from(translate::INPUT_REQUIRED));
            result.insert(
                "inputRequests".into(),
                json!({id: {"method": request["method"], "params": request["params"]}}),
            );
            result.insert("requestState".into(), Value::from(state));
            self.annotate(&mut result, permit);
            Ok(ResultBody::Tree(Value::Object(result)))
        }
    }

    /// Decides each input request of an input-required result handed to a 2026-07-28 client
    /// (the client answers them itself); the first refused one refuses the call. The requests
    /// the client gets are the ones decided, written back from the parsed tree: with duplicate
    /// keys in the upstream's text, a client whose parser keeps the first could otherwise act
    /// on a request no check saw.
    async fn decide_inputs(
        &self,
        call: &ToolCall<'_>,
        result: &mut RawObject,
    ) -> Result<(), RpcError> {
        let value = result.value("inputRequests");
        let Some(requests) = super::ask::input_requests(value.as_ref())?.cloned() else {
            return Ok(());
        };
        let asking = super::ask::Asking {
            grant: self.grant,
            tool: call.tool,
            upstream: call.upstream,
            remote_ip: &call.remote_ip,
            session: call.session_id,
        };
        for request in requests.values() {
            asking.decide(self.svc, request).await?;
        }
        result.insert("inputRequests", &Value::Object(requests));
        Ok(())
    }

    /// Who asks this call's client what the upstream asks it, when the client can be asked
    /// (it takes an event stream on a handshake-era call).
    fn asker(&self, call: &ToolCall<'_>, rpc: &RpcRequest) -> Option<super::ask::Asker> {
        let (Some(tx), Some(svc)) = (self.to_client.as_ref(), self.owner.as_ref()) else {
            return None;
        };
        Some(super::ask::Asker {
            svc: std::sync::Arc::clone(svc),
            grant: self.grant.clone(),
            tool: call.tool.to_owned(),
            upstream: call.upstream.map(str::to_owned),
            remote_ip: call.remote_ip.clone(),
            session: call.session_id.map(str::to_owned),
            to_client: tx.clone(),
            progress_token: rpc
                .params
                .get("_meta")
                .and_then(|m| m.get("progressToken"))
                .cloned(),
        })
    }

    /// The input-required result of a pending approval (2026-07-28): state only, sealed to
    /// this call, naming the approval in `_meta` for clients that know the gateway.
    fn approval_input_required(&self, inv: &Invocation, p: &Pending) -> Value {
        let mut state = self.round_binding(inv);
        state.round = 0;
        state.inner = Some(p.pending_id.clone());
        json!({
            "resultType": translate::INPUT_REQUIRED,
            "requestState": RoundSeal::new(&self.svc.sessions).seal(&state),
            "_meta": {APPROVAL_META: p.to_json()},
        })
    }

    /// Long-polls a pending approval for at most [`APPROVAL_LONG_POLL`] (or the request's
    /// `Prefer: wait=N`, none with `respond-async`; never past its expiry):
    /// `Some` when it is still pending (answer input-required again), `None` once it was
    /// decided or expired (decide the call with it).
    async fn await_approval(&self, id: &str) -> Result<Option<Pending>, RpcError> {
        let audit = self.svc.pipeline.audit();
        let tenant = &self.grant.tenant;
        let store = |e: crate::approvals::query::QueryError| {
            super::denial::rpc_error(&crate::pipeline::Denial::Audit(e.to_string()))
        };
        let Some(row) = crate::approvals::query::get(audit.db(), Some(tenant), id)
            .await
            .map_err(store)?
        else {
            return Ok(None); // refused by the pipeline as unknown
        };
        if row.agent_id != self.grant.subject {
            return Ok(None); // refused by the pipeline as another agent's
        }
        let now = crate::audit::time::now_ms();
        let left = u64::try_from(row.expires_ms - now).unwrap_or(0);
        // The poll holds its connection as a held call does: past the tenant's share of
        // connections held open it waits a second at most (a client that retries at once is
        // paced, and holds its connection only that long).
        let slot = self.svc.streams.hold(tenant);
        let window = super::hold::poll_window(self.headers, APPROVAL_LONG_POLL);
        let window = if slot.is_some() {
            window
        } else {
            window.min(std::time::Duration::from_secs(1))
        };
        let until =
            tokio::time::Instant::now() + window.min(std::time::Duration::from_millis(left));
        let waited = self
            .svc
            .approvals
            .wait(audit.db(), tenant, id, until)
            .await
            .map_err(store)?;
        drop(slot);
        match waited {
            Outcome::Decided(_) => Ok(None),
            Outcome::TimedOut if row.status_at(crate::audit::time::now_ms()) == Status::Pending => {
                Ok(Some(Pending {
                    // Still waiting in the queue: the queue answers, not a check.
                    check: "approval",
                    pending_id: row.pending_id,
                    reason: row.reason,
                    requires_step_up: row.requires_step_up,
                    expires_ms: row.expires_ms,
                    mode: None,
                }))
            }
            Outcome::TimedOut => Ok(None),
        }
    }
}

/// Clears the call's body under its permit: the tool and arguments forwarded are the decided.
fn clear<'p>(
    permit: &'p crate::pipeline::Permit,
    inv: &Invocation,
    forwarded_as: &'p str,
) -> Result<crate::pipeline::Cleared<'p>, RpcError> {
    permit
        .clear(CallKind::Tool, &inv.name, &inv.arguments, forwarded_as)
        .map_err(|_| upstream_rpc_error(&crate::upstream::UpstreamError::NotDecided))
}

/// The prefix of a sealed round state's upstream state that names a held call instead.
const HELD: &str = "igheld:";

/// Where a held call is (see [`CallContext::hold_call`]).
enum HeldStep {
    /// Ended, with the upstream's answer (and when the wait for it began).
    Finished(
        std::time::Instant,
        Result<crate::upstream::Relayed, crate::upstream::UpstreamError>,
    ),
    /// The upstream asked the client something (the request under its `igq-` id): the call
    /// waits for the client's answer.
    Asked(Value, crate::mcp::relay::HeldCall),
}

/// Most rounds of one handshake-era call whose input requests are relayed to its client.
const MAX_RELAYED_ROUNDS: u32 = 16;
/// Most input requests of one round relayed.
const MAX_RELAYED_INPUTS: usize = 16;

/// The `_meta` key of a pending approval in an input-required result.
pub const APPROVAL_META: &str = "io.intentgate/approval";

/// How long a stateless-era retry of a pending approval waits for its decision before it is
/// answered input-required again.
pub const APPROVAL_LONG_POLL: std::time::Duration = std::time::Duration::from_secs(20);
