//! A handshake-era tool call whose client takes an event stream, run so the upstream's requests
//! during the call (`relay.rs`) can reach the client: the call runs on the request's task; if
//! it ends before the upstream asks anything, the answer is the usual one (JSON, or the event
//! stream of its notifications); at the upstream's first request the call moves to a task of
//! its own and the answer becomes an event stream at once, carrying that request, any later
//! ones, and finally the call's response.
//!
//! This module must never write to the stream after the call's response, and never keep the
//! client's stream open once the call ended.

use std::sync::Arc;

use bytes::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::Value;
use tokio::sync::mpsc;

use super::McpService;
use super::{CallContext, Decided, Endpoint, hold, respond_parts};
use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::era::Era;
use crate::mcp::jsonrpc::{self, RpcError};
use crate::pipeline::Pending;

/// What the call's task needs, owned.
pub(super) struct Owned {
    pub(super) svc: Arc<McpService>,
    pub(super) grant: Grant,
    pub(super) headers: hyper::HeaderMap,
    pub(super) remote: std::net::SocketAddr,
    pub(super) session: Option<String>,
    pub(super) era: Era,
    pub(super) endpoint: Endpoint,
    pub(super) rpc: jsonrpc::Request,
}

/// How the call ended.
struct Finished {
    outcome: Result<crate::mcp::raw::ResultBody, RpcError>,
    notifications: Vec<Value>,
    decided: Option<Decided>,
    pending: Option<Pending>,
}

pub(super) async fn call(owned: Owned) -> Response<Body> {
    let owned = Arc::new(owned);
    let (to_client, mut requests) = mpsc::channel::<Value>(8);
    let task_owned = Arc::clone(&owned);
    // The call runs here, on the request's task, until the upstream asks something: most calls
    // end first, and pay for no task of their own. At the first request it moves to a task
    // of its own, since the answer becomes a stream that outlives this function.
    let mut call = Box::pin(crate::telemetry::trace::propagate(async move {
        let o = &*task_owned;
        let mut ctx = CallContext::new(
            &o.svc,
            &o.grant,
            &o.headers,
            o.remote,
            o.session.as_deref(),
            &o.era,
        );
        ctx.to_client = Some(to_client);
        ctx.owner = Some(Arc::clone(&o.svc));
        let outcome = ctx.dispatch(o.endpoint, &o.rpc).await;
        Finished {
            outcome,
            notifications: ctx.take_notifications(),
            decided: ctx.decided(),
            pending: ctx.take_pending(),
        }
    }));
    let id = owned.rpc.id.clone().unwrap_or(Value::Null);
    let first = tokio::select! {
        f = &mut call => return answer(&owned, &id, f).await,
        Some(request) = requests.recv() => request,
    };
    let mut done = tokio::spawn(call);
    // The upstream asked the client something: answer as an event stream from now on.
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(async move {
        let mut next = Some(first);
        loop {
            if let Some(request) = next.take() {
                if !crate::http::to_client(&tx, event(&request.to_string())).await {
                    return; // the client is gone; its relayed requests are refused
                }
                continue;
            }
            tokio::select! {
                Some(request) = requests.recv() => next = Some(request),
                finished = &mut done => {
                    let Ok(f) = finished else { return }; // the call's task panicked
                    let mut out = Vec::new();
                    for n in &f.notifications {
                        out.extend_from_slice(&event(&n.to_string()));
                    }
                    let body = match &f.outcome {
                        Ok(result) => jsonrpc::result(&id, result),
                        Err(err) => jsonrpc::error(Some(&id), err),
                    };
                    out.extend_from_slice(&event(&String::from_utf8_lossy(&body)));
                    let _ = crate::http::to_client(&tx, Bytes::from(out)).await;
                    return;
                }
            }
        }
    });
    let mut resp = Response::new(http::channel(rx));
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn event(data: &str) -> Bytes {
    Bytes::from(format!("event: message\ndata: {data}\n\n"))
}

/// The whole answer of a call that ended without asking the client anything (held for its
/// approval when it was escalated and the client asked to wait).
async fn answer(owned: &Arc<Owned>, id: &Value, f: Finished) -> Response<Body> {
    if f.outcome.is_err()
        && let Some(pending) = f.pending
        && let Some(slot) = hold::wanted(
            &owned.svc,
            &owned.headers,
            &owned.grant.tenant,
            pending.mode,
        )
        .then(|| owned.svc.streams.hold(&owned.grant.tenant))
        .flatten()
    {
        let held = hold::Held {
            svc: Arc::clone(&owned.svc),
            grant: owned.grant.clone(),
            headers: owned.headers.clone(),
            remote: owned.remote,
            session: owned.session.clone(),
            era: owned.era.clone(),
            endpoint: owned.endpoint,
            rpc: owned.rpc.clone(),
            pending,
            _slot: slot,
        };
        return Box::pin(held.respond(true)).await;
    }
    respond_parts(
        &owned.headers,
        id,
        owned.era.is_modern(),
        f.outcome,
        f.notifications,
        f.decided,
    )
}
