//! The fast MCP upstream both the bare proxy and the gateway forward to: streamable HTTP with
//! JSON responses, the `echo` and `add` tools, `initialize` (with a session id), `ping` and
//! `tools/list`. It parses every request with serde_json like a real (small) tool server, and
//! does nothing else, so that the upstream costs the same for every system measured.
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
    serde_json::to_vec(&json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}))
        .unwrap_or_default()
}

fn text(s: String) -> Value {
    json!({"content": [{"type": "text", "text": s}], "isError": false})
}

async fn handle(req: Request<Incoming>, sessions: Arc<AtomicU64>) -> Response<Full<Bytes>> {
    if req.method() != Method::POST {
        return reply(StatusCode::METHOD_NOT_ALLOWED, Vec::new());
    }
    let body = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(StatusCode::PAYLOAD_TOO_LARGE, Vec::new()),
    };
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(_) => return reply(StatusCode::BAD_REQUEST, rpc_error(&Value::Null, -32700, "Parse error")),
    };
    let Some(id) = msg.get("id").cloned() else {
        return reply(StatusCode::ACCEPTED, Vec::new());
    };
    let method = msg.get("method").and_then(Value::as_str).unwrap_or_default();
    let params = msg.get("params").cloned().unwrap_or(Value::Null);
    let mut session = None;
    let body = match method {
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
        "tools/list" => rpc_result(
            &id,
            json!({"tools": [
                {"name": "echo", "description": "Returns its `text` argument.", "inputSchema": {"type": "object"}},
                {"name": "add", "description": "Adds `a` and `b`.", "inputSchema": {"type": "object"}},
            ]}),
        ),
        "tools/call" => {
            let name = params.get("name").and_then(Value::as_str).unwrap_or_default();
            let args = params.get("arguments");
            let arg = |k: &str| args.and_then(|a| a.get(k));
            match name {
                "echo" => rpc_result(
                    &id,
                    text(arg("text").and_then(Value::as_str).unwrap_or_default().to_owned()),
                ),
                "add" => {
                    let a = arg("a").and_then(Value::as_f64).unwrap_or(0.0);
                    let b = arg("b").and_then(Value::as_f64).unwrap_or(0.0);
                    rpc_result(&id, text(format!("{}", a + b)))
                }
                other => rpc_error(&id, -32602, &format!("Unknown tool: {other}")),
            }
        }
        _ => rpc_error(&id, -32601, "Method not found"),
    };
    let mut resp = reply(StatusCode::OK, body);
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
        resp.headers_mut().insert("mcp-session-id", s);
    }
    resp
}

/// Serves on `listener` forever.
pub async fn serve(listener: TcpListener) {
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
                async move { Ok::<_, Infallible>(handle(req, sessions).await) }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
