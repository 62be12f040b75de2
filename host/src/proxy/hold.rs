//! A synchronous approval: the escalated request is held until a person decides or the
//! approval times out, then decided again with its approval (and forwarded once, if allowed).
//!
//! A client that accepts `text/event-stream` gets the answer as an SSE stream at once, with a
//! comment every keep-alive interval so no proxy or client read timeout ends the wait; the
//! answer is its one event. Otherwise the request is held open and answered as JSON. Either
//! way the wait belongs to the client's connection: when the client goes (hyper drops the
//! request's future, or the stream's receiver), the wait is dropped with it, before anything
//! is forwarded.
//!
//! Chosen per request: `Prefer: respond-async` asks for the `-32019` answer, `Prefer: wait`
//! to be held; without either, what the policy's decision said (`approval_mode`), else
//! `INTENTGATE_APPROVAL_MODE`.
//!
//! This module must never forward a call whose approval it did not see approved, and never
//! keep waiting for a client that has gone.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::McpService;
use super::{CallContext, Endpoint};
use crate::approvals::{self, Status, wait::Outcome};
use crate::audit::{self, AuditEvent, Decision};
use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::era::Era;
use crate::mcp::jsonrpc::{self, RpcError};
use crate::pipeline::{Denial, Pending};

/// What a request's `Prefer` header (RFC 7240) says about waiting for an approval; the last
/// such preference given wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prefer {
    /// `respond-async`: answer at once.
    Async,
    /// `wait` or `wait=N`: hold the request (for at most N seconds, when given).
    Wait(Option<u64>),
}

fn prefer(headers: &hyper::HeaderMap) -> Option<Prefer> {
    let mut found = None;
    for v in headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for pref in v.split(',') {
            let pref = pref.split(';').next().unwrap_or_default();
            let (name, value) = pref.split_once('=').unwrap_or((pref, ""));
            let name = name.trim();
            if name.eq_ignore_ascii_case("respond-async") {
                found = Some(Prefer::Async);
            } else if name.eq_ignore_ascii_case("wait") {
                found = Some(Prefer::Wait(value.trim().parse().ok()));
            }
        }
    }
    found
}

/// Whether this request waits for its approval (see the module docs): the request's `Prefer`,
/// else what the policy said for this escalation (`policy`), else the gateway's mode. A
/// tenant that already holds its share of connections open (held requests and live streams,
/// [`crate::streams::Hub::hold`]) is answered at once instead, with how to resume.
pub(super) fn wanted(
    svc: &McpService,
    headers: &hyper::HeaderMap,
    tenant: &str,
    policy: Option<approvals::Mode>,
) -> bool {
    let wanted = match prefer(headers) {
        Some(Prefer::Async) => false,
        Some(Prefer::Wait(_)) => true,
        None => policy.unwrap_or(svc.pipeline.approvals().mode) == approvals::Mode::Sync,
    };
    wanted && svc.streams.can_hold(tenant)
}

/// How long a resume of a still-pending approval waits for its decision before it is
/// answered pending again: `Prefer: wait=N` seconds (at most an hour), none with
/// `Prefer: respond-async`, else `default`.
pub(super) fn poll_window(
    headers: &hyper::HeaderMap,
    default: std::time::Duration,
) -> std::time::Duration {
    match prefer(headers) {
        Some(Prefer::Async) => std::time::Duration::ZERO,
        Some(Prefer::Wait(Some(secs))) => std::time::Duration::from_secs(secs.min(3600)),
        Some(Prefer::Wait(None)) | None => default,
    }
}

/// Everything a held request needs, owned (the stream's task outlives the handler).
pub(super) struct Held {
    pub(super) svc: Arc<McpService>,
    pub(super) grant: Grant,
    pub(super) headers: hyper::HeaderMap,
    pub(super) remote: std::net::SocketAddr,
    pub(super) session: Option<String>,
    pub(super) era: Era,
    pub(super) endpoint: Endpoint,
    pub(super) rpc: jsonrpc::Request,
    pub(super) pending: Pending,
    /// The tenant's place for a connection held open, given back when the answer is sent.
    pub(super) _slot: crate::streams::HeldSlot,
}

impl Held {
    /// The held request's answer: streamed (with keep-alives) or whole.
    pub(super) async fn respond(self, stream: bool) -> Response<Body> {
        if !stream {
            let (ctx_out, id) = self.finish().await;
            return ctx_out.into_response(&id);
        }
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let keepalive = self.svc.pipeline.approvals().keepalive;
        tokio::spawn(crate::telemetry::trace::propagate(async move {
            let finishing = self.finish();
            tokio::pin!(finishing);
            let mut tick = tokio::time::interval(keepalive);
            tick.tick().await;
            let answer = loop {
                tokio::select! {
                    done = &mut finishing => break done,
                    // The client went away: the wait ends here, before any forward.
                    _ = tx.closed() => return,
                    _ = tick.tick() => {
                        let comment = Bytes::from_static(b": waiting for approval\n\n");
                        if !crate::http::to_client(&tx, comment).await {
                            return;
                        }
                    }
                }
            };
            let (out, id) = answer;
            let mut event = Vec::new();
            for n in &out.notifications {
                event.extend_from_slice(b"event: message\ndata: ");
                event.extend_from_slice(n.to_string().as_bytes());
                event.extend_from_slice(b"\n\n");
            }
            event.extend_from_slice(b"event: message\ndata: ");
            event.extend_from_slice(&out.body(&id));
            event.extend_from_slice(b"\n\n");
            let _ = crate::http::to_client(&tx, Bytes::from(event)).await;
        }));
        let mut resp = Response::new(http::channel(rx));
        *resp.status_mut() = StatusCode::OK;
        let h = resp.headers_mut();
        h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        resp
    }

    /// Waits for the decision, then answers: the call decided again with its approval, or the
    /// rejection or timeout.
    async fn finish(self) -> (Answer, Value) {
        let id = self.rpc.id.clone().unwrap_or(Value::Null);
        let outcome = self.wait_and_run().await;
        (outcome, id)
    }

    async fn wait_and_run(&self) -> Answer {
        let svc = &self.svc;
        let db = svc.pipeline.audit().db();
        let pending = &self.pending;
        let tenant = &self.grant.tenant;
        let deadline = tokio::time::Instant::now()
            + std::time::Duration::from_millis(
                u64::try_from(pending.expires_ms - audit::time::now_ms()).unwrap_or(0),
            );
        let waited = svc
            .approvals
            .wait(db, tenant, &pending.pending_id, deadline)
            .await;
        let decided = match waited {
            Ok(Outcome::Decided(a)) => *a,
            Ok(Outcome::TimedOut) => match self.time_out().await {
                Some(a) => a,
                None => {
                    return self.refused(Denial::ApprovalTimedOut {
                        pending_id: pending.pending_id.clone(),
                    });
                }
            },
            Err(e) => return self.refused(Denial::Audit(e.to_string())),
        };
        match decided.status {
            Status::Approved => {}
            Status::Rejected => {
                return self.refused(Denial::ApprovalRejected {
                    pending_id: pending.pending_id.clone(),
                    note: decided.decide_note.filter(|n| !n.is_empty()),
                });
            }
            // Another request of the same call, holding the same approval, ran it first.
            Status::Consumed => {
                return self.refused(Denial::Approval(format!(
                    "approval {} was already used by another request of this call",
                    pending.pending_id
                )));
            }
            _ => {
                return self.refused(Denial::ApprovalTimedOut {
                    pending_id: pending.pending_id.clone(),
                });
            }
        }
        // A session ended while the call waited (`DELETE`, on any replica) runs nothing more:
        // a subscription would outlive it, and every other request naming it is refused.
        if let Some(session) = self.session.as_deref() {
            match crate::mcp::ended::is_ended(svc.store.as_ref(), session).await {
                Ok(false) => {}
                Ok(true) => {
                    return self.refused(Denial::Approval(format!(
                        "approval {} is for a call of a session that has ended",
                        pending.pending_id
                    )));
                }
                Err(e) => return self.refused(Denial::Audit(e.to_string())),
            }
        }
        // Approved: decided again, with the approval consumed in the call's commit.
        let mut ctx = CallContext::new(
            svc,
            &self.grant,
            &self.headers,
            self.remote,
            self.session.as_deref(),
            &self.era,
        );
        ctx.approval = Some(pending.pending_id.clone());
        let outcome = ctx.dispatch(self.endpoint, &self.rpc).await;
        Answer {
            notifications: ctx.take_notifications(),
            outcome,
            modern: self.era.is_modern(),
            decided: ctx.decided(),
        }
    }

    /// Records the timeout (the approval expires with an audit event). `Some` when a decision
    /// landed at the last moment instead.
    async fn time_out(&self) -> Option<approvals::Approval> {
        let g = &self.grant;
        let mut e = AuditEvent::new(audit::kinds::APPROVAL_EXPIRED, g.tenant.clone());
        e.decision = Some(Decision::Block);
        e.check = "approval".to_owned();
        e.reason = "approval timed out".to_owned();
        e.pending_id = self.pending.pending_id.clone();
        e.agent_id = g.subject.clone();
        e.jti = g.jti.clone();
        e.root_jti = g.root_jti.clone();
        e.remote_ip = self.remote.ip().to_string();
        let write = approvals::ApprovalWrite::Expire {
            id: self.pending.pending_id.clone(),
            pending_only: true,
            at_ms: audit::time::now_ms(),
        };
        match self
            .svc
            .pipeline
            .audit()
            .append_with(e, Vec::new(), Some(write))
            .await
        {
            Ok(a) if a.refused.is_some() => {
                // Decided meanwhile: act on the decision.
                approvals::query::get(
                    self.svc.pipeline.audit().db(),
                    Some(&g.tenant),
                    &self.pending.pending_id,
                )
                .await
                .ok()
                .flatten()
                .filter(|a| a.status != Status::Pending)
            }
            Ok(_) => None,
            Err(err) => {
                tracing::error!(error = %err, "approvals: the timeout of a held call was not recorded");
                None
            }
        }
    }

    fn refused(&self, denial: Denial) -> Answer {
        Answer {
            notifications: Vec::new(),
            outcome: Err(super::denial::rpc_error(&denial)),
            modern: self.era.is_modern(),
            decided: None,
        }
    }
}

/// A held request's outcome, ready to encode.
struct Answer {
    notifications: Vec<Value>,
    outcome: Result<crate::mcp::raw::ResultBody, RpcError>,
    modern: bool,
    /// The decision of the resumed call, for the headers of a whole (not streamed) answer.
    decided: Option<super::Decided>,
}

impl Answer {
    /// The JSON-RPC message of the answer (the notifications are sent as their own events).
    fn body(&self, id: &Value) -> Vec<u8> {
        match &self.outcome {
            Ok(result) => jsonrpc::result(id, result),
            Err(err) => jsonrpc::error(Some(id), err),
        }
    }

    fn into_response(self, id: &Value) -> Response<Body> {
        let status = match &self.outcome {
            Err(err) if self.modern => {
                StatusCode::from_u16(crate::mcp::era::modern_status(err.code))
                    .unwrap_or(StatusCode::OK)
            }
            _ => StatusCode::OK,
        };
        let mut resp = http::json_bytes(status, self.body(id));
        if let Some(d) = self.decided {
            d.stamp(&mut resp);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(values: &[&str]) -> hyper::HeaderMap {
        let mut h = hyper::HeaderMap::new();
        for v in values {
            h.append(
                "prefer",
                hyper::header::HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn prefer_reads_wait_and_respond_async_the_last_one_winning() {
        assert_eq!(prefer(&headers(&[])), None);
        assert_eq!(prefer(&headers(&["wait"])), Some(Prefer::Wait(None)));
        assert_eq!(
            prefer(&headers(&["handling=lenient, wait=5"])),
            Some(Prefer::Wait(Some(5)))
        );
        assert_eq!(
            prefer(&headers(&["Wait = 7 ; x=y"])),
            Some(Prefer::Wait(Some(7)))
        );
        assert_eq!(
            prefer(&headers(&["wait=5", "respond-async"])),
            Some(Prefer::Async)
        );
        let d = std::time::Duration::from_secs(20);
        assert_eq!(poll_window(&headers(&["wait=99999"]), d).as_secs(), 3600);
        assert_eq!(poll_window(&headers(&["respond-async"]), d).as_secs(), 0);
        assert_eq!(poll_window(&headers(&["wait"]), d), d);
    }
}
