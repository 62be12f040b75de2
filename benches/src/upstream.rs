//! The fast MCP upstream both the bare proxy and the gateway forward to: streamable HTTP with
//! JSON responses, the `echo` and `add` tools, `initialize` (with a session id), `ping` and
//! `tools/list`. It parses every request with serde_json like a real (small) tool server, and
//! does nothing else, so that the upstream costs the same for every system measured.
//!
//! It speaks either MCP revision family, as `tests/interop/upstream_server.py` does with the
//! official SDK ([`UpstreamEra`]):
//!
//! - `dual` (the default, like `mcp` 2.x): a request whose `MCP-Protocol-Version` header names
//!   2026-07-28 is stateless: `params._meta` must carry the envelope and agree with the
//!   header, `Mcp-Method` (and `Mcp-Name` for `tools/call`) must agree with the body (HTTP 400,
//!   `-32020` otherwise), `server/discover` is answered, `initialize`/`ping` are 404 `-32601`,
//!   and results carry `resultType`. Anything else is the handshake era; sessions are issued
//!   but, to also serve the IntentGate SDKs' plain JSON-RPC, not required.
//! - `handshake` (like `mcp` 1.x behind the interop test's `HandshakeOnly`): every POST that is
//!   not `initialize` and carries no `Mcp-Session-Id` is refused with HTTP 400 and `-32600`
//!   "Missing session ID" (so `server/discover` is too), and a session id it did not issue
//!   is 404.
//!
//! It is the bench's own, not `intentgate::demo`, so that the figures do not move when the demo
//! server changes, and so that the bare-proxy half of the benchmark builds without the gateway.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn reply(status: StatusCode, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn rpc_result(id: &Value, result: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "result": result})).unwrap_or_default()
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
    )
    .unwrap_or_default()
}

fn text(s: String) -> Value {
    json!({"content": [{"type": "text", "text": s}], "isError": false})
}

/// The stateless revision this upstream speaks in `dual` mode.
pub const MODERN: &str = "2026-07-28";
/// Revisions of the handshake era: this header value (or none) means "not stateless".
const HANDSHAKE_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];
const META_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
const META_CAPS: &str = "io.modelcontextprotocol/clientCapabilities";

/// Which MCP revisions the upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UpstreamEra {
    /// Both: stateless 2026-07-28 when the header says so, the handshake era otherwise.
    Dual,
    /// Handshake era only: refuses session-less requests as `mcp` 1.x does.
    Handshake,
}

impl UpstreamEra {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamEra::Dual => "dual",
            UpstreamEra::Handshake => "handshake",
        }
    }
}

fn header<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A modern request's envelope and routing headers agree with its body (or why not: the
/// HTTP status and JSON-RPC error of the official server).
fn check_modern(
    msg: &Value,
    method: &str,
    version: &str,
    h_method: Option<&str>,
    h_name: Option<&str>,
) -> Result<(), (StatusCode, i64, &'static str)> {
    let bad = |m| Err((StatusCode::BAD_REQUEST, -32020, m));
    let meta = msg.get("params").and_then(|p| p.get("_meta"));
    let Some(meta) = meta.filter(|m| m.get(META_CAPS).is_some()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            -32602,
            "params._meta envelope missing",
        ));
    };
    if meta.get(META_VERSION).and_then(Value::as_str) != Some(version) {
        return bad("MCP-Protocol-Version header does not match the envelope");
    }
    if version != MODERN {
        return Err((
            StatusCode::BAD_REQUEST,
            -32022,
            "Unsupported protocol version",
        ));
    }
    if h_method != Some(method) {
        return bad("Mcp-Method header does not match the body");
    }
    if method == "tools/call" {
        let name = msg
            .get("params")
            .and_then(|p| p.get("name"))
            .and_then(Value::as_str);
        if name.is_none() || h_name != name {
            return bad("Mcp-Name header does not match the body");
        }
    }
    Ok(())
}

async fn handle(
    req: Request<Incoming>,
    sessions: Arc<AtomicU64>,
    era: UpstreamEra,
) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new());
    }
    let modern_version = header(&req, "mcp-protocol-version")
        .filter(|v| era == UpstreamEra::Dual && !HANDSHAKE_VERSIONS.contains(v))
        .map(str::to_owned);
    let h_method = header(&req, "mcp-method").map(str::to_owned);
    let h_name = header(&req, "mcp-name").map(str::to_owned);
    let session_in = header(&req, "mcp-session-id").map(str::to_owned);
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, Vec::new()),
    };
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => {
            return reply(
                StatusCode::BAD_REQUEST,
                rpc_error(&Value::Null, -32700, "Parse error"),
            );
        }
    };
    let method = msg
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default();
    if era == UpstreamEra::Handshake && method != "initialize" {
        match session_in.as_deref() {
            None => {
                let id = Value::from("server-error");
                return reply(
                    StatusCode::BAD_REQUEST,
                    rpc_error(&id, -32600, "Bad Request: Missing session ID"),
                );
            }
            Some(s) => {
                let issued = s
                    .strip_prefix("bench-session-")
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > 0 && n < sessions.load(Ordering::Relaxed));
                if !issued {
                    let id = msg.get("id").cloned().unwrap_or(Value::Null);
                    return reply(
                        StatusCode::NOT_FOUND,
                        rpc_error(&id, -32001, "Session not found"),
                    );
                }
            }
        }
    }
    let Some(id) = msg.get("id").cloned() else {
        return reply(StatusCode::ACCEPTED, Vec::new());
    };
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let mut session = None;
    if let Some(v) = &modern_version {
        if let Err((status, code, message)) =
            check_modern(&msg, method, v, h_method.as_deref(), h_name.as_deref())
        {
            return reply(status, rpc_error(&id, code, message));
        }
        if matches!(method, "initialize" | "ping") {
            return reply(
                StatusCode::NOT_FOUND,
                rpc_error(&id, -32601, "Method not found"),
            );
        }
    }
    let modern = modern_version.is_some();
    let body = match method {
        "server/discover" if era == UpstreamEra::Dual => rpc_result(
            &id,
            json!({
                "supportedVersions": [MODERN],
                "capabilities": {"tools": {"listChanged": false}},
                "resultType": "complete",
                "cacheScope": "public",
                "ttlMs": 60000,
                "_meta": {"io.modelcontextprotocol/serverInfo": {"name": "intentgate-bench-upstream", "version": "0"}},
            }),
        ),
        "initialize" => {
            let n = sessions.fetch_add(1, Ordering::Relaxed);
            session = Some(format!("bench-session-{n}"));
            let version = params
                .get("protocolVersion")
                .and_then(Value::as_str)
                .unwrap_or("2025-11-25");
            rpc_result(
                &id,
                json!({
                    "protocolVersion": version,
                    "capabilities": {"tools": {"listChanged": false}},
                    "serverInfo": {"name": "intentgate-bench-upstream", "version": "0"},
                }),
            )
        }
        "ping" => rpc_result(&id, json!({})),
        "tools/list" => {
            let mut r = json!({"tools": [
                {"name": "echo", "description": "Returns its `text` argument.", "inputSchema": {"type": "object"}},
                {"name": "add", "description": "Adds `a` and `b`.", "inputSchema": {"type": "object"}},
            ]});
            if modern {
                r["resultType"] = json!("complete");
                r["cacheScope"] = json!("public");
                r["ttlMs"] = json!(60000);
            }
            rpc_result(&id, r)
        }
        "tools/call" => {
            let name = params
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let args = params.get("arguments");
            let arg = |k: &str| args.and_then(|a| a.get(k));
            let mut r = match name {
                "echo" => {
                    let mut t = arg("text")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned();
                    // `pad`: a large answer to a small call (bounded).
                    let pad = arg("pad").and_then(Value::as_u64).unwrap_or(0).min(MAX_PAD);
                    t.extend(std::iter::repeat_n('x', usize::try_from(pad).unwrap_or(0)));
                    text(t)
                }
                "add" => {
                    let a = arg("a").and_then(Value::as_f64).unwrap_or(0.0);
                    let b = arg("b").and_then(Value::as_f64).unwrap_or(0.0);
                    text(format!("{}", a + b))
                }
                other => {
                    return reply(
                        StatusCode::OK,
                        rpc_error(&id, -32602, &format!("Unknown tool: {other}")),
                    );
                }
            };
            if modern {
                r["resultType"] = json!("complete");
            }
            rpc_result(&id, r)
        }
        _ => rpc_error(&id, -32601, "Method not found"),
    };
    let mut resp = reply(StatusCode::OK, body);
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
        resp.headers_mut().insert("mcp-session-id", s);
    }
    resp
}

/// Most bytes `echo` pads its answer with.
const MAX_PAD: u64 = 16 << 20;

/// Serves on `listener` forever, speaking `era`.
pub async fn serve(listener: TcpListener, era: UpstreamEra) {
    let sessions = Arc::new(AtomicU64::new(1));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let sessions = Arc::clone(&sessions);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let sessions = Arc::clone(&sessions);
                async move { Ok::<_, Infallible>(handle(req, sessions, era).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modern_requests_must_agree_with_their_headers() {
        let msg = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "echo",
            "_meta": {META_VERSION: MODERN, META_CAPS: {}},
        }});
        assert!(check_modern(&msg, "tools/call", MODERN, Some("tools/call"), Some("echo")).is_ok());
        let code = |r: Result<(), (StatusCode, i64, &str)>| r.err().map(|e| e.1);
        assert_eq!(
            code(check_modern(
                &msg,
                "tools/call",
                MODERN,
                Some("tools/call"),
                Some("add")
            )),
            Some(-32020)
        );
        assert_eq!(
            code(check_modern(&msg, "tools/call", MODERN, None, Some("echo"))),
            Some(-32020)
        );
        assert_eq!(
            code(check_modern(
                &msg,
                "tools/call",
                "2026-01-01",
                Some("tools/call"),
                Some("echo")
            )),
            Some(-32020)
        );
        let bare =
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "echo"}});
        assert_eq!(
            code(check_modern(
                &bare,
                "tools/call",
                MODERN,
                Some("tools/call"),
                Some("echo")
            )),
            Some(-32602)
        );
    }
}
