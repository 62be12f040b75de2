//! A small built-in MCP tool server (streamable HTTP, JSON responses) with a few harmless tools,
//! started by `intentgate serve --demo` as the upstream so a newcomer sees allow and deny at
//! once. Also the fast upstream of the benchmarks.
//!
//! Its tools touch nothing: `send_email` and `delete_records` only say what they would do. It
//! must never be started unless asked for, and it listens on loopback only.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use hyper::body::Incoming;
use hyper::header::HeaderValue;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::http::{self, Body};
use crate::mcp::jsonrpc::{self, Incoming as Message, RpcError, code};

const TOOLS: &[(&str, &str)] = &[
    ("echo", "Returns its `text` argument."),
    ("add", "Adds the numbers `a` and `b`."),
    ("read_invoice", "Returns a made-up invoice for `id`."),
    (
        "send_email",
        "Pretends to send an email to `to` (sends nothing).",
    ),
    (
        "delete_records",
        "Pretends to delete records in `table` (deletes nothing).",
    ),
];

fn tool_list() -> Value {
    let tools: Vec<Value> = TOOLS
        .iter()
        .map(|(name, description)| {
            json!({
                "name": name,
                "description": description,
                "inputSchema": {"type": "object", "additionalProperties": true},
            })
        })
        .collect();
    json!({ "tools": tools })
}

fn text(s: String) -> Value {
    json!({"content": [{"type": "text", "text": s}], "isError": false})
}

fn call_tool(params: &serde_json::Map<String, Value>) -> Result<Value, RpcError> {
    let name = params
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let args = params.get("arguments").cloned().unwrap_or(json!({}));
    let arg = |k: &str| args.get(k).cloned().unwrap_or(Value::Null);
    Ok(match name {
        "echo" => text(arg("text").as_str().unwrap_or_default().to_owned()),
        "add" => {
            let (a, b) = (arg("a").as_f64(), arg("b").as_f64());
            match (a, b) {
                (Some(a), Some(b)) => text(format!("{}", a + b)),
                _ => {
                    json!({"content": [{"type": "text", "text": "a and b must be numbers"}], "isError": true})
                }
            }
        }
        "read_invoice" => text(format!(
            "invoice {}: ACME Supplies, 3 items, EUR 1,240.00, due in 30 days",
            arg("id")
        )),
        "send_email" => text(format!("(demo) would send an email to {}", arg("to"))),
        "delete_records" => text(format!("(demo) would delete records in {}", arg("table"))),
        other => {
            return Err(RpcError::new(
                code::INVALID_PARAMS,
                format!("Unknown tool: {other}"),
            ));
        }
    })
}

async fn handle(req: Request<Incoming>, sessions: Arc<AtomicU64>) -> Response<Body> {
    if req.method() != Method::POST {
        return http::status(StatusCode::METHOD_NOT_ALLOWED);
    }
    let body = match http::read_body(req.into_body(), 1 << 20).await {
        Ok(b) => b,
        Err(_) => return http::status(StatusCode::PAYLOAD_TOO_LARGE),
    };
    let rpc = match jsonrpc::parse(&body) {
        Ok(Message::Request(r)) => r,
        Ok(Message::Response(_)) => return http::status(StatusCode::ACCEPTED),
        Err((id, e)) => {
            return http::json_bytes(StatusCode::BAD_REQUEST, jsonrpc::error(id.as_ref(), &e));
        }
    };
    let Some(id) = rpc.id.clone() else {
        return http::status(StatusCode::ACCEPTED);
    };
    let mut session = None;
    let outcome = match rpc.method.as_str() {
        "initialize" => {
            let n = sessions.fetch_add(1, Ordering::Relaxed);
            session = Some(format!("demo-session-{n}"));
            Ok(json!({
                "protocolVersion": rpc.param_str("protocolVersion").unwrap_or("2025-11-25"),
                "capabilities": {"tools": {"listChanged": false}},
                "serverInfo": {"name": "intentgate-demo-tools", "version": env!("CARGO_PKG_VERSION")},
            }))
        }
        "ping" => Ok(json!({})),
        "tools/list" => Ok(tool_list()),
        "tools/call" => call_tool(&rpc.params),
        _ => Err(RpcError::new(code::METHOD_NOT_FOUND, "Method not found")),
    };
    let mut resp = match outcome {
        Ok(r) => http::json_bytes(StatusCode::OK, jsonrpc::result(&id, &r)),
        Err(e) => http::json_bytes(StatusCode::OK, jsonrpc::error(Some(&id), &e)),
    };
    if let Some(s) = session.and_then(|s| HeaderValue::from_str(&s).ok()) {
        resp.headers_mut().insert("mcp-session-id", s);
    }
    resp
}

/// Starts the demo server on `addr` (loopback); returns its MCP URL and the server task.
pub async fn spawn(addr: &str) -> std::io::Result<(Uri, tokio::task::JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    if !local.ip().is_loopback() {
        return Err(std::io::Error::other(
            "the demo server listens on loopback only",
        ));
    }
    let uri: Uri = format!("http://{local}/mcp")
        .parse()
        .map_err(std::io::Error::other)?;
    let sessions = Arc::new(AtomicU64::new(1));
    let task = tokio::spawn(async move {
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
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok((uri, task))
}
