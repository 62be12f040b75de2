//! A handshake-era session's life at the gateway: a presented `Mcp-Session-Id` is checked
//! (issued by a gateway sharing the master key, to this token, not ended), and `DELETE /v1/mcp`
//! ends one on every replica ([`crate::mcp::ended`]). This module must never accept a session of
//! another token, nor one whose end it could not rule out.

use hyper::{Response, StatusCode};
use serde_json::Value;

use super::McpService;
use super::{now_secs, refusal_reason};
use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::jsonrpc::{RpcError, code};
use crate::mcp::session::SessionClaims;
use crate::mcp::{SESSION_HEADER, bad_request, ended, rpc_response};

fn no_session() -> RpcError {
    RpcError::new(-32001, "Session not found")
}

/// Checks a presented `Mcp-Session-Id`: issued by a gateway sharing the master key, to this
/// token, and not ended on any replica. An unknown or ended one is 404 so the client opens a
/// new session, as the transport specifies; a store that cannot say is 503 (fail closed).
pub(crate) async fn presented_session(
    svc: &McpService,
    id: &str,
    grant: &Grant,
) -> Result<(), (StatusCode, RpcError)> {
    presented_session_as(svc, id, grant, false).await
}

/// Whether `claims` name the token of `grant`: its tree (tenant and `jti`), and with `opener`
/// the very token that opened the session (what its stream, its subscriptions and its end
/// need: an attenuated child may call in its parent's session, but neither read what the
/// session is sent, change what it is sent, nor end it). An id issued before openers were
/// recorded names none: only calls go on in it, and its client opens a new session for the
/// rest (a `404` says so).
fn holds(claims: &SessionClaims, grant: &Grant, opener: bool) -> bool {
    claims.tenant == grant.tenant
        && claims.jti == grant.jti
        && (!opener
            || claims
                .opener
                .as_ref()
                .is_some_and(|o| *o == crate::mcp::session::opener_of(&grant.token_digest)))
}

/// Whether `grant` is the very token that opened session `id` (see [`holds`]).
pub(crate) fn opened_by(svc: &McpService, id: &str, grant: &Grant) -> bool {
    svc.sessions
        .verify(id)
        .is_some_and(|c| holds(&c, grant, true))
}

/// [`presented_session`], and with `opener` only for the token that opened the session.
pub(crate) async fn presented_session_as(
    svc: &McpService,
    id: &str,
    grant: &Grant,
    opener: bool,
) -> Result<(), (StatusCode, RpcError)> {
    match svc.sessions.verify(id) {
        Some(c) if holds(&c, grant, opener) => {}
        _ => return Err((StatusCode::NOT_FOUND, no_session())),
    }
    match ended::is_ended(svc.store.as_ref(), id).await {
        Ok(false) => Ok(()),
        Ok(true) => Err((StatusCode::NOT_FOUND, no_session())),
        Err(e) => {
            tracing::error!(error = %e, "cannot tell whether a session was ended");
            let err = RpcError::new(code::INTERNAL_ERROR, "session store unavailable");
            Err((StatusCode::SERVICE_UNAVAILABLE, err))
        }
    }
}

/// `DELETE /v1/mcp`: ends the handshake-era session the request names, on every replica. The
/// token must be the one that opened it (another token's, an unknown or an ended session is
/// 404, as for any request); without a token 401, without a session id 400.
pub(super) async fn end_session(svc: &McpService, headers: &hyper::HeaderMap) -> Response<Body> {
    let grant = match http::bearer(headers)
        .ok_or(None)
        .and_then(|t| svc.authenticate(t).map_err(Some))
    {
        Ok(g) => g,
        Err(e) => {
            let err = RpcError::new(code::CAPABILITY, "capability check failed")
                .with_data(Value::from(refusal_reason(e.as_ref())));
            return rpc_response(StatusCode::UNAUTHORIZED, None, &err);
        }
    };
    let Some(id) = http::header_str(headers, SESSION_HEADER) else {
        let err = RpcError::new(code::INVALID_REQUEST, "Invalid Request").with_data(Value::from(
            "DELETE needs the Mcp-Session-Id of the session to end",
        ));
        return bad_request(None, &err);
    };
    let claims = match svc.sessions.verify(id) {
        Some(c) if holds(&c, &grant, true) => c,
        _ => return rpc_response(StatusCode::NOT_FOUND, None, &no_session()),
    };
    let store = svc.store.as_ref();
    let ended = match ended::is_ended(store, id).await {
        Ok(true) => return rpc_response(StatusCode::NOT_FOUND, None, &no_session()),
        Ok(false) => ended::end(store, id, &claims, grant.expires_at, now_secs()).await,
        Err(e) => Err(e),
    };
    match ended {
        Ok(()) => {
            // Its stream and subscriptions on this replica end now; other replicas' sweepers
            // find it ended in the store.
            let orphaned = svc.streams.end(id);
            crate::streams::listen::release(svc, orphaned).await;
            http::status(StatusCode::NO_CONTENT)
        }
        Err(e) => {
            tracing::error!(error = %e, "could not record an ended session");
            let err = RpcError::new(code::INTERNAL_ERROR, "session store unavailable");
            rpc_response(StatusCode::SERVICE_UNAVAILABLE, None, &err)
        }
    }
}
