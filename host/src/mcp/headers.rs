//! The MCP routing headers (`MCP-Protocol-Version`, `Mcp-Method`, `Mcp-Name`): reading them
//! from a client, checking that they agree with the body, and deriving them from a body the
//! gateway sends upstream.
//!
//! Headers exist so intermediaries can route without parsing bodies; a gateway that decided
//! from them could be told one thing while the tool server is told another. So: a header that
//! disagrees with the body (or appears twice) refuses the request with HTTP 400 and `-32020`
//! before any check runs; decisions read the body only; and the headers sent upstream are
//! computed from the body being forwarded ([`for_upstream`]). This module must never copy a
//! client's header to an upstream request.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hyper::HeaderMap;
use hyper::header::HeaderValue;
use serde_json::Value;

use super::era::{HeaderEra, meta};
use super::jsonrpc::{Request, RpcError, code};

pub const PROTOCOL_VERSION: &str = "mcp-protocol-version";
pub const METHOD: &str = "mcp-method";
pub const NAME: &str = "mcp-name";

/// Methods whose target is mirrored into `Mcp-Name`, and the body parameter that holds it.
pub fn name_param(method: &str) -> Option<&'static str> {
    match method {
        "tools/call" | "prompts/get" => Some("name"),
        "resources/read" => Some("uri"),
        _ => None,
    }
}

/// The routing headers of one client request, each read once.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routing {
    pub version: Option<String>,
    pub method: Option<String>,
    /// Raw (possibly `=?base64?…?=`-wrapped) value.
    pub name: Option<String>,
}

fn mismatch(why: impl Into<String>) -> RpcError {
    RpcError::new(code::HEADER_MISMATCH, why.into())
}

impl Routing {
    /// A notification's `Mcp-Method`, when sent, names the body's method: a server never acts
    /// on a notification whose headers say another (clients need not send it on one).
    pub fn agree_on_notification(&self, rpc: &Request) -> Result<(), RpcError> {
        match &self.method {
            Some(m) if *m != rpc.method => Err(mismatch(
                "Mcp-Method header does not match the notification's method",
            )),
            _ => Ok(()),
        }
    }

    /// Reads the routing headers; a duplicated or unreadable one is a mismatch (first-copy and
    /// last-copy readers would disagree).
    pub fn read(headers: &HeaderMap) -> Result<Routing, RpcError> {
        let one = |name: &str| -> Result<Option<String>, RpcError> {
            let mut all = headers.get_all(name).iter();
            let Some(first) = all.next() else {
                return Ok(None);
            };
            if all.next().is_some() {
                return Err(mismatch(format!("{name} header appears more than once")));
            }
            first
                .to_str()
                .map(|s| Some(s.to_owned()))
                .map_err(|_| mismatch(format!("{name} header is not visible ASCII")))
        };
        Ok(Routing {
            version: one(PROTOCOL_VERSION)?,
            method: one(METHOD)?,
            name: one(NAME)?,
        })
    }

    /// Checks the headers against the body. In the modern era `Mcp-Method` (and `Mcp-Name` for
    /// name-bearing methods) are required and the version must equal the envelope's; in the
    /// handshake era the headers are optional but, when present, must agree just the same.
    pub fn agree_with(&self, rpc: &Request, era: HeaderEra) -> Result<(), RpcError> {
        let body_version = rpc
            .params
            .get("_meta")
            .and_then(Value::as_object)
            .and_then(|m| m.get(meta::PROTOCOL_VERSION));
        match (era, &self.version, body_version) {
            (HeaderEra::Modern, Some(h), Some(Value::String(b))) if h == b => {}
            (HeaderEra::Modern, _, _) => {
                return Err(mismatch(
                    "MCP-Protocol-Version header does not match the request envelope's protocol version",
                ));
            }
            (HeaderEra::Handshake, Some(h), Some(b)) if b.as_str() != Some(h.as_str()) => {
                return Err(mismatch(
                    "MCP-Protocol-Version header does not match the protocol version in params._meta",
                ));
            }
            (HeaderEra::Handshake, _, _) => {}
        }
        match (&self.method, era) {
            (Some(m), _) if *m != rpc.method => {
                return Err(mismatch(
                    "Mcp-Method header does not match the request body's method",
                ));
            }
            (None, HeaderEra::Modern) => {
                return Err(mismatch("Mcp-Method header is missing"));
            }
            _ => {}
        }
        if let Some(param) = name_param(&rpc.method) {
            let body = rpc.params.get(param).filter(|v| !v.is_null());
            let header = self.name.as_deref().map(decode_value);
            let agrees = match (body, header) {
                (None, None) => true,
                // A modern request whose body names nothing fails its own validation later.
                (Some(_), None) => era == HeaderEra::Handshake,
                (Some(Value::String(b)), Some(Some(h))) => *b == h,
                _ => false,
            };
            if !agrees {
                return Err(mismatch(format!(
                    "Mcp-Name header does not match the request body's {param:?} parameter"
                )));
            }
        }
        Ok(())
    }
}

/// Decodes a header value that may carry the `=?base64?…?=` sentinel; `None` for a malformed
/// sentinel (bad or non-canonical base64, bad UTF-8), so it never matches by accident.
pub fn decode_value(raw: &str) -> Option<String> {
    let Some(payload) = raw
        .strip_prefix("=?base64?")
        .and_then(|r| r.strip_suffix("?="))
    else {
        return Some(raw.to_owned());
    };
    let bytes = STANDARD.decode(payload).ok()?;
    if STANDARD.encode(&bytes) != payload {
        return None;
    }
    String::from_utf8(bytes).ok()
}

/// Encodes a value for a header: printable ASCII without edge whitespace passes verbatim,
/// anything else is wrapped in the base64 sentinel.
pub fn encode_value(v: &str) -> String {
    let plain = v.bytes().all(|b| (0x20..=0x7e).contains(&b))
        && v.trim() == v
        && !(v.starts_with("=?base64?") && v.ends_with("?="));
    if plain {
        v.to_owned()
    } else {
        format!("=?base64?{}?=", STANDARD.encode(v.as_bytes()))
    }
}

/// The routing headers for a modern request body the gateway is about to send upstream,
/// computed from that body alone.
pub fn for_upstream(body: &Value) -> Result<Vec<(&'static str, HeaderValue)>, String> {
    let method = body
        .get("method")
        .and_then(Value::as_str)
        .ok_or("body has no method")?;
    let params = body.get("params").and_then(Value::as_object);
    let version = params
        .and_then(|p| p.get("_meta"))
        .and_then(|m| m.get(meta::PROTOCOL_VERSION))
        .and_then(Value::as_str)
        .ok_or("body has no protocol version envelope")?;
    let value = |s: &str| HeaderValue::from_str(s).map_err(|e| e.to_string());
    let mut out = vec![
        (PROTOCOL_VERSION, value(version)?),
        (METHOD, value(method)?),
    ];
    let name = name_param(method)
        .and_then(|param| params.and_then(|p| p.get(param)))
        .and_then(Value::as_str);
    if let Some(name) = name {
        out.push((NAME, value(&encode_value(name))?));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rpc(v: Value) -> Request {
        match super::super::jsonrpc::parse(v.to_string().as_bytes()) {
            Ok(super::super::jsonrpc::Incoming::Request(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    fn routing(version: Option<&str>, method: Option<&str>, name: Option<&str>) -> Routing {
        Routing {
            version: version.map(str::to_owned),
            method: method.map(str::to_owned),
            name: name.map(str::to_owned),
        }
    }

    fn modern_call(name: &str) -> Request {
        rpc(
            json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": name, "arguments": {},
            "_meta": {meta::PROTOCOL_VERSION: "2026-07-28", meta::CLIENT_CAPABILITIES: {}}}}),
        )
    }

    /// A modern notification whose `Mcp-Method` names another method is refused (it would
    /// cancel a call while its headers say it reports progress); without the header it is
    /// taken, as clients need not send it on a notification.
    #[test]
    fn a_notifications_method_header_names_its_method() {
        let cancel = rpc(
            json!({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                "params": {"requestId": 1}}),
        );
        let other = routing(Some("2026-07-28"), Some("notifications/progress"), None);
        let e = super::super::classify(&other, HeaderEra::Modern, &cancel).expect_err("mismatch");
        assert_eq!(e.code, code::HEADER_MISMATCH);
        for method in [Some("notifications/cancelled"), None] {
            let r = routing(Some("2026-07-28"), method, None);
            assert!(
                super::super::classify(&r, HeaderEra::Modern, &cancel).is_ok(),
                "{method:?}"
            );
        }
    }

    #[test]
    fn modern_headers_must_agree() {
        let call = modern_call("echo");
        let ok = routing(Some("2026-07-28"), Some("tools/call"), Some("echo"));
        assert_eq!(ok.agree_with(&call, HeaderEra::Modern), Ok(()));
        for bad in [
            routing(Some("2026-07-28"), Some("tools/list"), Some("echo")),
            routing(Some("2026-07-28"), None, Some("echo")),
            routing(Some("2026-07-28"), Some("tools/call"), None),
            routing(Some("2026-07-28"), Some("tools/call"), Some("Echo")),
            routing(
                Some("2026-07-28"),
                Some("tools/call"),
                Some("delete_records"),
            ),
            routing(Some("2027-01-01"), Some("tools/call"), Some("echo")),
        ] {
            let e = bad
                .agree_with(&call, HeaderEra::Modern)
                .expect_err("refused");
            assert_eq!(e.code, code::HEADER_MISMATCH, "{bad:?}");
        }
    }

    #[test]
    fn handshake_headers_are_optional_but_never_outvote() {
        let call = rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                              "params": {"name": "echo", "arguments": {}}}));
        assert_eq!(
            Routing::default().agree_with(&call, HeaderEra::Handshake),
            Ok(())
        );
        let v = routing(Some("2025-11-25"), None, None);
        assert_eq!(v.agree_with(&call, HeaderEra::Handshake), Ok(()));
        for bad in [
            routing(None, Some("tools/list"), None),
            routing(None, None, Some("delete_records")),
        ] {
            assert_eq!(
                bad.agree_with(&call, HeaderEra::Handshake)
                    .expect_err("refused")
                    .code,
                code::HEADER_MISMATCH
            );
        }
        // Modern _meta with a handshake header: the body says otherwise.
        let call = modern_call("echo");
        let e = v
            .agree_with(&call, HeaderEra::Handshake)
            .expect_err("refused");
        assert_eq!(e.code, code::HEADER_MISMATCH);
        // Modern _meta without the header: a handshake-era request.
        assert_eq!(
            Routing::default().agree_with(&call, HeaderEra::Handshake),
            Ok(())
        );
    }

    #[test]
    fn sentinel_round_trip() {
        for v in ["echo", "naïve", " padded ", "=?base64?x?=", "tab\there"] {
            let enc = encode_value(v);
            assert_eq!(decode_value(&enc).as_deref(), Some(v), "{enc}");
        }
        assert_eq!(encode_value("echo"), "echo");
        assert_eq!(decode_value("=?base64?not base64?="), None);
        // Non-canonical: trailing bits set.
        assert_eq!(decode_value("=?base64?ZW=?="), None);
        let call = modern_call("naïve");
        let h = routing(
            Some("2026-07-28"),
            Some("tools/call"),
            Some(&encode_value("naïve")),
        );
        assert_eq!(h.agree_with(&call, HeaderEra::Modern), Ok(()));
    }

    #[test]
    fn upstream_headers_come_from_the_body() {
        let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "naïve", "_meta": {meta::PROTOCOL_VERSION: "2026-07-28"}}});
        let h = for_upstream(&body).expect("headers");
        assert_eq!(
            h[0],
            (PROTOCOL_VERSION, HeaderValue::from_static("2026-07-28"))
        );
        assert_eq!(h[1], (METHOD, HeaderValue::from_static("tools/call")));
        assert_eq!(h[2].0, NAME);
        assert_eq!(
            decode_value(h[2].1.to_str().expect("ascii")).as_deref(),
            Some("naïve")
        );
        assert!(for_upstream(&json!({"method": "tools/list", "params": {}})).is_err());
    }

    #[test]
    fn duplicates_are_refused() {
        let mut h = HeaderMap::new();
        h.append(METHOD, HeaderValue::from_static("tools/call"));
        h.append(METHOD, HeaderValue::from_static("tools/list"));
        assert_eq!(
            Routing::read(&h).expect_err("refused").code,
            code::HEADER_MISMATCH
        );
    }
}
