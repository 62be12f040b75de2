//! A tool's result reaches the client as the upstream wrote it: the gateway reshapes only the
//! top-level members the revisions disagree on (and `_intentgate` when asked to annotate), and
//! never parses the content into a tree to write it again. Numbers keep their spelling, keys
//! their order, strings their escapes — a client that hashes or signs what the tool returned
//! sees what the tool sent.

use serde_json::{Value, json};

use crate::support::gateway::{self, Backend};
use crate::support::http::{json_upstream, send};

/// What the upstream's tool returns, byte for byte: a number a tree would respell (`1.50`,
/// `1e3`, an integer beyond 64 bits), keys out of order, an escaped string, and the members a
/// stateless upstream adds (`resultType`, its identity in `_meta`).
const CONTENT: &str = r#""content":[{"type":"text","text":"caf\u00e9 \ud83d\ude00"}]"#;
const STRUCTURED: &str =
    r#""structuredContent":{"zeta":1.50,"alpha":1e3,"big":123456789012345678901234567890}"#;

fn tool_result() -> String {
    format!(
        r#"{{{CONTENT},{STRUCTURED},"isError":false,"resultType":"complete","_meta":{{"io.modelcontextprotocol/serverInfo":{{"name":"verbatim","version":"1"}}}}}}"#
    )
}

/// What a stateless (2026-07-28) upstream whose one tool answers [`tool_result`] says.
fn verbatim(body: &[u8], _uri: &str) -> String {
    let msg: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let id = msg["id"].to_string();
    match msg["method"].as_str() {
        Some("server/discover") => format!(
            r#"{{"jsonrpc":"2.0","id":{id},"result":{}}}"#,
            json!({"supportedVersions": ["2026-07-28"],
                "capabilities": {"tools": {}},
                "serverInfo": {"name": "verbatim", "version": "1"},
                "resultType": "complete"})
        ),
        Some("tools/call") => {
            format!(
                r#"{{"jsonrpc":"2.0","id":{id},"result":{}}}"#,
                tool_result()
            )
        }
        _ => format!(
            r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":-32601,"message":"Method not found"}}}}"#
        ),
    }
}

/// A `tools/call` of either revision, as its client sends it.
fn call(modern: bool) -> (Vec<u8>, Vec<(&'static str, &'static str)>) {
    let mut params = json!({"name": "verbatim", "arguments": {"q": 1}});
    let mut headers = vec![("content-type", "application/json")];
    if modern {
        params["_meta"] = json!({
            "io.modelcontextprotocol/protocolVersion": "2026-07-28",
            "io.modelcontextprotocol/clientCapabilities": {},
            "io.modelcontextprotocol/clientInfo": {"name": "t", "version": "0"},
        });
        headers.extend([
            ("mcp-protocol-version", "2026-07-28"),
            ("mcp-method", "tools/call"),
            ("mcp-name", "verbatim"),
        ]);
    }
    let body = json!({"jsonrpc": "2.0", "id": "c-1", "method": "tools/call", "params": params});
    (serde_json::to_vec(&body).expect("json"), headers)
}

#[tokio::test]
async fn a_tool_result_reaches_the_client_as_the_upstream_wrote_it() {
    let upstream = json_upstream(verbatim).await;
    let url = format!("http://{upstream}/mcp");
    for annotate in [false, true] {
        let extra: &[&str] = if annotate {
            &["--annotate-results"]
        } else {
            &[]
        };
        let tg = gateway::start(Backend::Sqlite, Some(&url), extra).await;
        let (token, _) = tg
            .mint(json!({"subject": "verbatim", "tools": ["verbatim"]}))
            .await;
        let auth = format!("Bearer {token}");
        for modern in [false, true] {
            let (body, mut headers) = call(modern);
            headers.push(("authorization", auth.as_str()));
            let (status, h, bytes) =
                send("POST", &format!("{}/v1/mcp", tg.url), &headers, body).await;
            let text = String::from_utf8(bytes.to_vec()).expect("utf-8");
            let ctx = format!("modern {modern}, annotate {annotate}: {text}");
            assert_eq!(status, 200, "{ctx}");
            assert_eq!(h["x-intentgate-decision"], "allow", "{ctx}");
            // The client's id, and the tool's members in the upstream's very spelling.
            assert!(
                text.starts_with(r#"{"jsonrpc":"2.0","id":"c-1","result":{"#),
                "{ctx}"
            );
            assert!(text.contains(CONTENT), "{ctx}");
            assert!(text.contains(STRUCTURED), "{ctx}");
            let v: Value = serde_json::from_str(&text).expect("json");
            let result = &v["result"];
            assert_eq!(result["isError"], false, "{ctx}");
            // What the revisions disagree on is reshaped; the upstream's identity never shows.
            assert_eq!(result.get("resultType").is_some(), modern, "{ctx}");
            assert!(result.get("_meta").is_none(), "{ctx}");
            assert_eq!(
                result.get("_intentgate").map(|a| a["decision"].clone()),
                annotate.then(|| json!("allow")),
                "{ctx}"
            );
        }
        tg.shutdown().await;
    }
}
