//! What the gateway says about itself: `initialize` (handshake era) and `server/discover`
//! (stateless era), whichever revision the upstream speaks.
//!
//! The gateway is the server its agents talk to, so it answers both itself: the version is
//! negotiated with the gateway, and the capabilities are the upstream's (from its `initialize`
//! result or its `server/discover` result) narrowed to what the gateway proxies and the token
//! may use: tools, never list-change notifications it would not relay. A discover result is
//! per token, so it is `cacheScope: private`. This module must never advertise a capability
//! the gateway does not govern.

use serde_json::{Map, Value, json};

use super::era::{HANDSHAKE_VERSIONS, MODERN_VERSIONS, meta};
use super::translate::{COMPLETE, DEFAULT_TTL_MS};

const INSTRUCTIONS: &str =
    "Tool calls are authorized by IntentGate; tools outside your token's scope are hidden.";

fn server_info() -> Value {
    json!({"name": "intentgate", "version": env!("CARGO_PKG_VERSION")})
}

/// What the upstream told the gateway about itself (either revision), when it could be asked.
#[derive(Debug, Clone, Default)]
pub struct UpstreamProfile {
    pub capabilities: Option<Value>,
    pub instructions: Option<String>,
}

/// The upstream's capabilities narrowed to what the gateway proxies: tools (without
/// `listChanged`, which the gateway does not relay). No upstream at all still offers tools (an
/// empty list), so clients keep working and learn of the outage on their first call.
fn capabilities(profile: &UpstreamProfile) -> Value {
    let offers_tools = match &profile.capabilities {
        Some(c) => c.get("tools").is_some(),
        None => true,
    };
    let mut caps = Map::new();
    if offers_tools {
        caps.insert("tools".into(), json!({"listChanged": false}));
    }
    Value::Object(caps)
}

fn instructions(profile: &UpstreamProfile) -> String {
    match profile.instructions.as_deref().filter(|s| !s.is_empty()) {
        Some(up) => format!("{up}\n\n{INSTRUCTIONS}"),
        None => INSTRUCTIONS.to_owned(),
    }
}

/// The version a handshake-era client gets: the one it asked for when the gateway speaks it,
/// the newest otherwise.
pub fn negotiate_handshake(requested: &str) -> &'static str {
    HANDSHAKE_VERSIONS
        .iter()
        .find(|v| **v == requested)
        .copied()
        .unwrap_or(HANDSHAKE_VERSIONS[0])
}

/// The `initialize` result for a handshake-era client.
pub fn initialize_result(version: &str, profile: &UpstreamProfile) -> Value {
    json!({
        "protocolVersion": version,
        "capabilities": capabilities(profile),
        "serverInfo": server_info(),
        "instructions": instructions(profile),
    })
}

/// The `server/discover` result for a stateless-era client.
pub fn discover_result(profile: &UpstreamProfile) -> Value {
    json!({
        "supportedVersions": MODERN_VERSIONS,
        "capabilities": capabilities(profile),
        "instructions": instructions(profile),
        "resultType": COMPLETE,
        "cacheScope": "private",
        "ttlMs": DEFAULT_TTL_MS,
        "_meta": {meta::SERVER_INFO: server_info()},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discover_from_a_handshake_upstream() {
        let profile = UpstreamProfile {
            capabilities: Some(json!({"tools": {"listChanged": true}, "prompts": {}})),
            instructions: Some("Invoices.".into()),
        };
        let d = discover_result(&profile);
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        assert_eq!(d["capabilities"], json!({"tools": {"listChanged": false}}));
        assert_eq!(d["cacheScope"], "private");
        assert_eq!(d["resultType"], "complete");
        assert!(d["ttlMs"].is_u64());
        assert!(
            d["instructions"]
                .as_str()
                .is_some_and(|s| s.starts_with("Invoices."))
        );
        let i = initialize_result("2025-06-18", &profile);
        assert_eq!(i["protocolVersion"], "2025-06-18");
        assert_eq!(i["capabilities"], json!({"tools": {"listChanged": false}}));
    }

    #[test]
    fn nothing_but_tools_is_offered() {
        let none = UpstreamProfile {
            capabilities: Some(json!({"prompts": {}})),
            instructions: None,
        };
        assert_eq!(discover_result(&none)["capabilities"], json!({}));
        assert_eq!(
            discover_result(&UpstreamProfile::default())["capabilities"],
            json!({"tools": {"listChanged": false}})
        );
        assert_eq!(negotiate_handshake("2024-11-05"), "2024-11-05");
        assert_eq!(negotiate_handshake("1999-01-01"), "2025-11-25");
    }
}
