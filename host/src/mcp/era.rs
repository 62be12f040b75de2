//! Which MCP revision a request speaks, and the modern (2026-07-28) per-request envelope.
//!
//! The `MCP-Protocol-Version` header decides the era, as the official servers do: absent or a
//! handshake revision (2025-11-25 and older) is the handshake era, exactly as before; any other
//! value is the stateless era, whose requests must then carry a valid `params._meta` envelope
//! that agrees with the headers ([`super::headers`]). Modern `_meta` without the header is a
//! handshake-era request. This module only classifies and validates: it must never authorize,
//! and never let a header choose anything the body contradicts.

use serde_json::{Map, Value, json};

use super::jsonrpc::{RpcError, code};

/// Handshake-era revisions the gateway speaks, newest first.
pub const HANDSHAKE_VERSIONS: &[&str] = &["2025-11-25", "2025-06-18", "2025-03-26", "2024-11-05"];

/// Stateless-era revisions the gateway speaks, newest first.
pub const MODERN_VERSIONS: &[&str] = &["2026-07-28"];

/// The newest stateless revision: what the gateway speaks to a modern upstream.
pub const LATEST_MODERN: &str = "2026-07-28";

/// Reserved `_meta` keys of the per-request envelope.
pub mod meta {
    pub const PROTOCOL_VERSION: &str = "io.modelcontextprotocol/protocolVersion";
    pub const CLIENT_CAPABILITIES: &str = "io.modelcontextprotocol/clientCapabilities";
    pub const CLIENT_INFO: &str = "io.modelcontextprotocol/clientInfo";
    pub const LOG_LEVEL: &str = "io.modelcontextprotocol/logLevel";
    pub const SERVER_INFO: &str = "io.modelcontextprotocol/serverInfo";

    /// The keys that describe one hop (client ↔ server), never passed across the gateway as is.
    pub const ENVELOPE: &[&str] = &[
        PROTOCOL_VERSION,
        CLIENT_CAPABILITIES,
        CLIENT_INFO,
        LOG_LEVEL,
    ];
}

/// The revision family of one request or peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Era {
    /// `initialize` handshake, `Mcp-Session-Id` sessions (2025-11-25 and older).
    Handshake,
    /// Stateless per-request envelope (2026-07-28).
    Modern(Envelope),
}

impl Era {
    pub fn is_modern(&self) -> bool {
        matches!(self, Era::Modern(_))
    }
}

/// The modern envelope a client sent in `params._meta`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub version: String,
    pub client_capabilities: Value,
    pub client_info: Option<Value>,
    /// The log level the client asks for with this request (`io.modelcontextprotocol/logLevel`).
    pub log_level: Option<String>,
}

/// What the `MCP-Protocol-Version` header says about the era, before the body is read.
pub fn era_of_header(version: Option<&str>) -> HeaderEra {
    match version {
        None => HeaderEra::Handshake,
        Some(v) if HANDSHAKE_VERSIONS.contains(&v) => HeaderEra::Handshake,
        Some(_) => HeaderEra::Modern,
    }
}

/// The era the header selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderEra {
    Handshake,
    Modern,
}

/// Whether `v` looks like a protocol revision (`YYYY-MM-DD`), for clearer errors.
pub fn is_version_shaped(v: &str) -> bool {
    let b = v.as_bytes();
    b.len() == 10
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            _ => c.is_ascii_digit(),
        })
}

/// The `-32022` refusal for a revision the gateway does not speak. It is answered on the
/// stateless path only (a handshake revision in the header is the handshake era), so its
/// `supported` list is the one `server/discover` advertises, as the official servers answer.
pub fn unsupported_version(requested: &str) -> RpcError {
    let message = if is_version_shaped(requested) {
        "Unsupported protocol version".to_owned()
    } else {
        "Unsupported protocol version: not a protocol revision (expected YYYY-MM-DD)".to_owned()
    };
    RpcError::new(code::UNSUPPORTED_VERSION, message)
        .with_data(json!({"supported": MODERN_VERSIONS, "requested": requested}))
}

/// Reads the envelope of a modern request: `params._meta` must be an object holding the
/// protocol version and the client capabilities (`-32602` otherwise).
pub fn envelope_shape(params: &Map<String, Value>) -> Result<&Map<String, Value>, RpcError> {
    let invalid = |why: &str| RpcError::new(code::INVALID_PARAMS, why.to_owned());
    let meta = match params.get("_meta") {
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(invalid(
                "params._meta must be an object carrying the protocol version and client capabilities",
            ));
        }
        None => {
            return Err(invalid(
                "params._meta is missing: a 2026-07-28 request carries the protocol version and client capabilities there",
            ));
        }
    };
    let missing: Vec<&str> = [meta::PROTOCOL_VERSION, meta::CLIENT_CAPABILITIES]
        .into_iter()
        .filter(|k| !meta.contains_key(*k))
        .collect();
    if !missing.is_empty() {
        return Err(invalid(&format!(
            "params._meta is missing the required envelope key(s): {}",
            missing.join(", ")
        )));
    }
    Ok(meta)
}

/// The envelope's version once the headers agreed with it: a string the gateway speaks.
pub fn envelope_version(meta: &Map<String, Value>) -> Result<Envelope, RpcError> {
    let Some(version) = meta.get(meta::PROTOCOL_VERSION).and_then(Value::as_str) else {
        return Err(RpcError::new(
            code::INVALID_PARAMS,
            "the protocol-version envelope value must be a string",
        ));
    };
    if !MODERN_VERSIONS.contains(&version) {
        return Err(unsupported_version(version));
    }
    let client_capabilities = meta
        .get(meta::CLIENT_CAPABILITIES)
        .cloned()
        .unwrap_or(Value::Null);
    if !client_capabilities.is_object() {
        return Err(RpcError::new(
            code::INVALID_PARAMS,
            "the clientCapabilities envelope value must be an object",
        ));
    }
    Ok(Envelope {
        version: version.to_owned(),
        client_capabilities,
        client_info: meta.get(meta::CLIENT_INFO).cloned(),
        log_level: meta
            .get(meta::LOG_LEVEL)
            .and_then(Value::as_str)
            .filter(|l| l.len() <= 16 && l.bytes().all(|b| b.is_ascii_lowercase()))
            .map(str::to_owned),
    })
}

/// The HTTP status of a JSON-RPC error in the modern era (the official servers' table); every
/// other code, IntentGate's typed denials included, is answered with 200.
pub fn modern_status(code: i64) -> u16 {
    match code {
        code::PARSE_ERROR
        | code::INVALID_REQUEST
        | code::INVALID_PARAMS
        | code::HEADER_MISMATCH
        | code::MISSING_CAPABILITY
        | code::UNSUPPORTED_VERSION => 400,
        code::METHOD_NOT_FOUND => 404,
        _ => 200,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_decides_the_era() {
        assert_eq!(era_of_header(None), HeaderEra::Handshake);
        assert_eq!(era_of_header(Some("2025-11-25")), HeaderEra::Handshake);
        assert_eq!(era_of_header(Some("2024-11-05")), HeaderEra::Handshake);
        assert_eq!(era_of_header(Some("2026-07-28")), HeaderEra::Modern);
        // Unknown values go to the modern path, whose ladder refuses them with -32022.
        assert_eq!(era_of_header(Some("banana")), HeaderEra::Modern);
        assert_eq!(era_of_header(Some("2030-01-01")), HeaderEra::Modern);
    }

    #[test]
    fn version_shape() {
        assert!(is_version_shaped("2026-07-28"));
        assert!(!is_version_shaped("banana"));
        assert!(!is_version_shaped("2026-07-2x"));
        assert!(!is_version_shaped(""));
        assert!(!is_version_shaped("2026/07/28"));
    }

    #[test]
    fn envelope_ladder() {
        let p = |v: Value| v.as_object().cloned().expect("object");
        assert_eq!(
            envelope_shape(&p(json!({})))
                .map(|_| ())
                .expect_err("refused")
                .code,
            code::INVALID_PARAMS
        );
        assert_eq!(
            envelope_shape(&p(json!({"_meta": 5})))
                .map(|_| ())
                .expect_err("refused")
                .code,
            code::INVALID_PARAMS
        );
        let only_version = p(json!({"_meta": {meta::PROTOCOL_VERSION: "2026-07-28"}}));
        let e = envelope_shape(&only_version)
            .map(|_| ())
            .expect_err("refused");
        assert!(e.message.contains("clientCapabilities"), "{e:?}");
        let good = p(json!({"_meta": {meta::PROTOCOL_VERSION: "2026-07-28",
                                      meta::CLIENT_CAPABILITIES: {}}}));
        let m = envelope_shape(&good).expect("shape");
        assert_eq!(envelope_version(m).expect("version").version, "2026-07-28");
        let future = p(json!({"_meta": {meta::PROTOCOL_VERSION: "2031-01-01",
                                        meta::CLIENT_CAPABILITIES: {}}}));
        let e = envelope_version(envelope_shape(&future).expect("shape")).expect_err("refused");
        assert_eq!(e.code, code::UNSUPPORTED_VERSION);
        let data = e.data.expect("data");
        assert_eq!(data["requested"], "2031-01-01");
        assert_eq!(
            data["supported"],
            json!(MODERN_VERSIONS),
            "as server/discover"
        );
        let number =
            p(json!({"_meta": {meta::PROTOCOL_VERSION: 5, meta::CLIENT_CAPABILITIES: {}}}));
        let e = envelope_version(envelope_shape(&number).expect("shape")).expect_err("refused");
        assert_eq!(e.code, code::INVALID_PARAMS);
    }

    #[test]
    fn modern_statuses() {
        assert_eq!(modern_status(code::HEADER_MISMATCH), 400);
        assert_eq!(modern_status(code::UNSUPPORTED_VERSION), 400);
        assert_eq!(modern_status(code::METHOD_NOT_FOUND), 404);
        assert_eq!(modern_status(code::CAPABILITY), 200);
    }
}
