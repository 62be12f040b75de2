//! `GET /v1/mcp`: a handshake-era session's own event stream, where what the upstream announces
//! outside any call reaches the agent (resource updates it subscribed to, list changes); and
//! the sweeper that ends the streams and subscriptions of revoked or expired tokens and ended
//! sessions.
//!
//! A stream is opened with the token that opened the session and its `Mcp-Session-Id`; it
//! resumes after `Last-Event-ID` from the session's window on this replica. While open, the
//! token is re-checked every second (revoked, expired or stale revocation list: the stream and
//! the session's subscriptions end), and a comment keeps idle proxies from closing it. The
//! upstream's subscription to a URI is dropped when the last session subscribed to it goes.
//! This module must never open a stream for a session of another token, never keep one open
//! after its token stopped verifying, and never block the hub on a slow client.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{ACCEPT, CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::jsonrpc::{self, RpcError, code};
use crate::proxy::McpService;

/// How often a live stream re-checks its token.
const RECHECK: Duration = Duration::from_secs(1);
/// A keep-alive comment every this many re-checks.
const KEEPALIVE_EVERY: u32 = 15;
/// How often the sweeper looks at every session (tokens; ended sessions every few rounds).
const SWEEP: Duration = Duration::from_secs(5);
const ENDED_EVERY: u32 = 6;

fn refuse(status: StatusCode, err: &RpcError) -> Response<Body> {
    http::json_bytes(status, jsonrpc::error(None, err))
}

/// Whether the session's token still verifies, as the same token id (without the metrics of
/// a request's authentication).
pub(crate) fn still_valid(gw: &McpService, token: &str, jti: &str) -> bool {
    let now = crate::audit::time::now_ms() / 1000;
    matches!(gw.verifier.authenticate(token, now, &gw.revocations), Ok(g) if g.jti == jti)
}

/// Answers `GET /v1/mcp` (handshake era).
pub async fn open(gw: &Arc<McpService>, headers: &hyper::HeaderMap) -> Response<Body> {
    let Some(token) = http::bearer(headers) else {
        let err = RpcError::new(code::CAPABILITY, "capability check failed")
            .with_data(Value::from("missing bearer capability token"));
        return refuse(StatusCode::UNAUTHORIZED, &err);
    };
    let grant: Grant = match gw.authenticate(token) {
        Ok(g) => g,
        Err(e) => {
            let err = RpcError::new(code::CAPABILITY, "capability check failed")
                .with_data(Value::from(e.to_string()));
            return refuse(StatusCode::UNAUTHORIZED, &err);
        }
    };
    let accepts = http::header_str(headers, ACCEPT.as_str())
        .is_some_and(|a| a.contains("text/event-stream") || a.contains("*/*"));
    if !accepts {
        let err = RpcError::new(code::INVALID_REQUEST, "Not Acceptable").with_data(Value::from(
            "GET /v1/mcp answers with text/event-stream only",
        ));
        return refuse(StatusCode::NOT_ACCEPTABLE, &err);
    }
    let Some(session) = http::header_str(headers, "mcp-session-id") else {
        let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(
            "GET /v1/mcp needs the Mcp-Session-Id of an initialized session",
        ));
        return refuse(StatusCode::BAD_REQUEST, &err);
    };
    // Only the token that opened the session reads what it is sent (an attenuated child of
    // it would otherwise take over its stream).
    if let Err((status, err)) = crate::proxy::presented_session_as(gw, session, &grant, true).await
    {
        return refuse(status, &err);
    }
    // An id we did not number (or not a number) resumes nothing: the stream starts fresh.
    let last = http::header_str(headers, "last-event-id").and_then(|v| v.trim().parse().ok());
    let opened = match gw.streams.open(session, &grant, token, last) {
        Ok(o) => o,
        Err(e) => {
            let err = RpcError::new(code::INTERNAL_ERROR, "stream refused")
                .with_data(Value::from(e.to_string()));
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &err);
        }
    };
    // A stateless upstream's list changes come only on a listen, held by the gateway.
    for (name, _) in gw.upstreams.iter().filter(|(n, _)| grant.reaches(n)) {
        super::bridge::ensure_lists(&gw.streams, &gw.upstreams, name);
    }
    let (tx, rx) = mpsc::channel::<Bytes>(8);
    tokio::spawn(pump(
        Arc::downgrade(gw),
        session.to_owned(),
        token.to_owned(),
        grant.jti,
        opened,
        tx,
    ));
    let mut resp = Response::new(http::channel(rx));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Moves a session's events to its client until the client goes, the hub ends the stream
/// (replaced, too slow, session ended) or the token stops verifying.
async fn pump(
    gw: Weak<McpService>,
    session: String,
    token: String,
    jti: String,
    opened: super::Opened,
    tx: mpsc::Sender<Bytes>,
) {
    // The first bytes reach the client at once, so it sees the stream open.
    let mut first = b": stream open\n\n".to_vec();
    for e in opened.replay {
        first.extend_from_slice(&e);
    }
    if !crate::http::to_client(&tx, Bytes::from(first)).await {
        return;
    }
    let mut events = opened.events;
    let mut tick = tokio::time::interval(RECHECK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks = 0u32;
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Some(event) => {
                    if !crate::http::to_client(&tx, event).await {
                        return;
                    }
                }
                None => return,
            },
            () = tx.closed() => return,
            _ = tick.tick() => {
                let Some(gw) = gw.upgrade() else { return };
                if !still_valid(&gw, &token, &jti) {
                    let orphaned = gw.streams.end(&session);
                    release(&gw, orphaned).await;
                    return;
                }
                ticks += 1;
                if ticks.is_multiple_of(KEEPALIVE_EVERY) {
                    let _ = tx.try_send(Bytes::from_static(b": keepalive\n\n"));
                }
            }
        }
    }
}

/// Tells each upstream to stop sending updates of URIs no session subscribes to any more.
pub async fn release(gw: &McpService, uris: Vec<String>) {
    for uri in uris {
        super::bridge::stop(&gw.streams, &uri);
        let route = match gw.upstreams.route_uri(&uri) {
            Ok(Some(r)) => r,
            _ => continue,
        };
        let params = Map::from_iter([("uri".to_owned(), Value::from(route.original))]);
        if let Err(e) = route
            .upstream
            .forward("resources/unsubscribe", params, None)
            .await
        {
            tracing::debug!(upstream = route.name, error = %e, "unsubscribe of an orphaned URI failed");
        }
    }
}

/// Ends, every few seconds, the streams and subscriptions of sessions whose token no longer
/// verifies or that were ended on another replica, and forgets idle sessions. Runs for as
/// long as the gateway does.
pub async fn sweep(gw: Weak<McpService>) {
    let mut rounds = 0u32;
    loop {
        // With no session in the hub there is nothing to sweep: park until one appears, so
        // an idle gateway is never woken by this task.
        let idle = match gw.upgrade() {
            Some(svc) if svc.streams.counts().0 == 0 => Some(Arc::clone(&svc.streams)),
            Some(_) => None,
            None => return,
        };
        if let Some(hub) = idle {
            hub.first_entry().await;
        }
        tokio::time::sleep(SWEEP).await;
        let Some(gw) = gw.upgrade() else { return };
        rounds += 1;
        let mut orphaned = Vec::new();
        for (session, token, jti) in gw.streams.tokens() {
            let ended = !still_valid(&gw, &token, &jti)
                || (rounds.is_multiple_of(ENDED_EVERY)
                    // A store that cannot say keeps the session: requests on it are refused
                    // anyway until the store answers.
                    && crate::mcp::ended::is_ended(gw.store.as_ref(), &session)
                        .await
                        .unwrap_or(false));
            if ended {
                orphaned.extend(gw.streams.end(&session));
            }
        }
        gw.streams.forget_idle();
        release(&gw, orphaned).await;
    }
}
