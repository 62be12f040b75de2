//! Forwarding to the upstream MCP server (streamable HTTP; JSON or SSE responses).
//!
//! One pooled HTTP client and, toward a stateful upstream, one shared MCP session opened lazily
//! and reopened when the upstream forgets it, so calls do not pay a handshake each. Every call
//! is bounded in time and response size. Failures are reported as [`UpstreamError`], distinct
//! from authorization denials. This module must never forward a `tools/call` on its own: it
//! takes a [`crate::pipeline::Permit`] for that.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::pipeline::Permit;

/// The protocol revision the gateway asks a handshake-era upstream for.
pub const HANDSHAKE_VERSION: &str = "2025-11-25";

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("no upstream configured")]
    NotConfigured,
    #[error("upstream unreachable: {0}")]
    Unavailable(String),
    #[error("upstream timed out after {0:?}")]
    Timeout(Duration),
    #[error("upstream answered HTTP {status}")]
    Status { status: u16, detail: String },
    #[error("upstream response exceeds {0} bytes")]
    TooLarge(usize),
    #[error("upstream response is not a JSON-RPC answer: {0}")]
    Malformed(String),
}

impl UpstreamError {
    /// The HTTP status to record in the audit event (0 when none was received).
    pub fn status(&self) -> u16 {
        match self {
            Self::Status { status, .. } => *status,
            _ => 0,
        }
    }
}

/// The upstream's answer to one JSON-RPC request: either `result` or `error`, as sent.
#[derive(Debug, Clone)]
pub enum Reply {
    Result(Value),
    Error(Value),
}

struct Session {
    id: Option<HeaderValue>,
    protocol_version: HeaderValue,
    initialize_result: Value,
}

/// The pooled client for one upstream server.
pub struct Upstream {
    uri: Uri,
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    max_response: usize,
    next_id: AtomicU64,
    session: ArcSwapOption<Session>,
    opening: tokio::sync::Mutex<()>,
}

impl Upstream {
    pub fn new(uri: Uri, timeout: Duration, max_response: usize) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .build(connector);
        Self {
            uri,
            client,
            timeout,
            max_response,
            next_id: AtomicU64::new(1),
            session: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
        }
    }

    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The upstream's `initialize` result (opening the shared session if needed).
    pub async fn initialize_result(&self) -> Result<Value, UpstreamError> {
        Ok(self.session().await?.initialize_result.clone())
    }

    /// Lists tools (one page; `cursor` as the client sent it).
    pub async fn list_tools(&self, cursor: Option<&Value>) -> Result<Reply, UpstreamError> {
        let params = match cursor {
            Some(c) => json!({ "cursor": c }),
            None => json!({}),
        };
        self.request("tools/list", params).await
    }

    /// Forwards a `tools/call` that the pipeline permitted.
    pub async fn call_tool(&self, _permit: &Permit, params: Value) -> Result<Reply, UpstreamError> {
        self.request("tools/call", params).await
    }

    /// Sends one request within the shared session; reopens the session once if the upstream
    /// says it no longer knows it.
    async fn request(&self, method: &str, params: Value) -> Result<Reply, UpstreamError> {
        let session = self.session().await?;
        match self.send(method, params.clone(), Some(&session)).await {
            Err(UpstreamError::Status { status: 404, .. }) if session.id.is_some() => {
                self.session.compare_and_swap(&Some(Arc::clone(&session)), None);
                let fresh = self.session().await?;
                self.send(method, params, Some(&fresh)).await
            }
            other => other,
        }
    }

    async fn session(&self) -> Result<Arc<Session>, UpstreamError> {
        if let Some(s) = self.session.load_full() {
            return Ok(s);
        }
        let _guard = self.opening.lock().await;
        if let Some(s) = self.session.load_full() {
            return Ok(s);
        }
        let s = Arc::new(self.open_session().await?);
        self.session.store(Some(Arc::clone(&s)));
        Ok(s)
    }

    async fn open_session(&self) -> Result<Session, UpstreamError> {
        let params = json!({
            "protocolVersion": HANDSHAKE_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "intentgate", "version": env!("CARGO_PKG_VERSION")},
        });
        let (reply, session_id) = self.exchange("initialize", params, None).await?;
        let result = match reply {
            Reply::Result(r) => r,
            Reply::Error(e) => {
                return Err(UpstreamError::Malformed(format!(
                    "initialize refused: {e}"
                )));
            }
        };
        let version = result
            .get("protocolVersion")
            .and_then(Value::as_str)
            .unwrap_or(HANDSHAKE_VERSION);
        let protocol_version = HeaderValue::from_str(version)
            .map_err(|_| UpstreamError::Malformed("bad protocolVersion".into()))?;
        let session = Session {
            id: session_id,
            protocol_version,
            initialize_result: result,
        };
        self.notify("notifications/initialized", &session).await?;
        Ok(session)
    }

    async fn send(
        &self,
        method: &str,
        params: Value,
        session: Option<&Session>,
    ) -> Result<Reply, UpstreamError> {
        Ok(self.exchange(method, params, session).await?.0)
    }

    fn build(
        &self,
        body: Vec<u8>,
        session: Option<&Session>,
    ) -> Result<Request<Full<Bytes>>, UpstreamError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        if let Some(s) = session {
            req = req.header("mcp-protocol-version", s.protocol_version.clone());
            if let Some(id) = &s.id {
                req = req.header("mcp-session-id", id.clone());
            }
        }
        req.body(Full::new(Bytes::from(body)))
            .map_err(|e| UpstreamError::Unavailable(e.to_string()))
    }

    async fn notify(&self, method: &str, session: &Session) -> Result<(), UpstreamError> {
        let body = serde_json::to_vec(&json!({"jsonrpc": "2.0", "method": method}))
            .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let req = self.build(body, Some(session))?;
        let resp = tokio::time::timeout(self.timeout, self.client.request(req))
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
            .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
        let status = resp.status();
        // Drain so the connection goes back to the pool.
        let _ = Limited::new(resp.into_body(), self.max_response).collect().await;
        if status.is_success() {
            Ok(())
        } else {
            Err(UpstreamError::Status {
                status: status.as_u16(),
                detail: format!("{method} refused"),
            })
        }
    }

    /// One JSON-RPC round trip; returns the reply and the session id header, if any.
    async fn exchange(
        &self,
        method: &str,
        params: Value,
        session: Option<&Session>,
    ) -> Result<(Reply, Option<HeaderValue>), UpstreamError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = serde_json::to_vec(&json!({
            "jsonrpc": "2.0", "id": id, "method": method, "params": params
        }))
        .map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let req = self.build(body, session)?;
        let fut = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unavailable(e.to_string()))?;
            let status = resp.status();
            let session_id = resp.headers().get("mcp-session-id").cloned();
            let is_sse = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let body = Limited::new(resp.into_body(), self.max_response)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        UpstreamError::TooLarge(self.max_response)
                    } else {
                        UpstreamError::Unavailable(e.to_string())
                    }
                })?
                .to_bytes();
            Ok::<_, UpstreamError>((status, session_id, is_sse, body))
        };
        let (status, session_id, is_sse, body) = tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))??;
        if status != StatusCode::OK {
            let detail = String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned();
            return Err(UpstreamError::Status {
                status: status.as_u16(),
                detail,
            });
        }
        let message = if is_sse {
            find_sse_response(&body, id)?
        } else {
            serde_json::from_slice::<Value>(&body)
                .map_err(|e| UpstreamError::Malformed(e.to_string()))?
        };
        Ok((to_reply(message)?, session_id))
    }
}

fn to_reply(mut message: Value) -> Result<Reply, UpstreamError> {
    let Some(obj) = message.as_object_mut() else {
        return Err(UpstreamError::Malformed("not a JSON object".into()));
    };
    if let Some(r) = obj.remove("result") {
        Ok(Reply::Result(r))
    } else if let Some(e) = obj.remove("error") {
        Ok(Reply::Error(e))
    } else {
        Err(UpstreamError::Malformed("neither result nor error".into()))
    }
}

/// Picks the JSON-RPC response with our id out of an SSE stream (skipping notifications and
/// server requests the upstream interleaves).
fn find_sse_response(body: &[u8], id: u64) -> Result<Value, UpstreamError> {
    let text = std::str::from_utf8(body).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
    let mut data = String::new();
    let check = |data: &mut String| -> Option<Value> {
        if data.is_empty() {
            return None;
        }
        let parsed = serde_json::from_str::<Value>(data).ok();
        data.clear();
        let v = parsed?;
        (v.get("id").and_then(Value::as_u64) == Some(id)
            && (v.get("result").is_some() || v.get("error").is_some()))
        .then_some(v)
    };
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            if let Some(v) = check(&mut data) {
                return Ok(v);
            }
        } else if let Some(rest) = line.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(rest.strip_prefix(' ').unwrap_or(rest));
        }
    }
    check(&mut data).ok_or_else(|| UpstreamError::Malformed("no response in event stream".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_picks_our_response() {
        let body = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\n\
event: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\"result\":{\"ok\":true}}\r\n\r\n";
        let v = find_sse_response(body, 7).expect("found");
        assert_eq!(v["result"]["ok"], true);
        assert!(find_sse_response(body, 8).is_err());
        assert!(find_sse_response(b"data: {bad", 1).is_err());
    }
}
