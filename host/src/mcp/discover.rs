//! What the gateway says about itself: `initialize` (handshake era) and `server/discover`
//! (stateless era), whichever revision the upstream speaks.
//!
//! The gateway is the server its agents talk to, so it answers both itself: the version is
//! negotiated with the gateway, and the capabilities are the upstream's (from its `initialize`
//! result or its `server/discover` result) narrowed to what the gateway proxies and governs:
//! tools, resources, prompts and completions; list-change notifications and resource
//! subscriptions only where it relays them (a handshake-era session's stream), never logging. A discover result is per token, so it is `cacheScope: private`. This module must
//! never advertise a capability the gateway does not govern.

use serde_json::{Map, Value, json};

use super::era::{HANDSHAKE_VERSIONS, MODERN_VERSIONS, meta};
use super::translate::{COMPLETE, DEFAULT_TTL_MS};

const INSTRUCTIONS: &str = "Tool calls, resource reads, prompts and completions are authorized by \
     IntentGate; what is outside your token's scope is hidden.";

fn server_info() -> Value {
    json!({"name": "intentgate", "version": env!("CARGO_PKG_VERSION")})
}

/// What the upstream told the gateway about itself (either revision), when it could be asked.
#[derive(Debug, Clone, Default)]
pub struct UpstreamProfile {
    pub capabilities: Option<Value>,
    pub instructions: Option<String>,
}

/// The upstream's capabilities narrowed to what the gateway proxies: tools, resources,
/// prompts and completions. The upstream's `listChanged` and `subscribe` flags are passed on
/// (`streams`) since the gateway relays those notifications: to a handshake-era client on its
/// session's `GET` stream ([`crate::streams`]), to a stateless-era one on its
/// `subscriptions/listen` streams. No upstream at all still offers tools (an empty list), so clients keep working and
/// learn of the outage on their first call.
fn capabilities(profile: &UpstreamProfile, streams: bool) -> Value {
    let offered = |what: &str| match &profile.capabilities {
        Some(c) => c.get(what),
        None => None,
    };
    let offers = |what: &str| match &profile.capabilities {
        Some(c) => c.get(what).is_some(),
        None => what == "tools",
    };
    let flag = |what: &str, name: &str| {
        streams
            && offered(what)
                .and_then(|c| c.get(name))
                .and_then(Value::as_bool)
                .unwrap_or(false)
    };
    let mut caps = Map::new();
    if offers("tools") {
        caps.insert(
            "tools".into(),
            json!({"listChanged": flag("tools", "listChanged")}),
        );
    }
    if offers("resources") {
        caps.insert(
            "resources".into(),
            json!({"listChanged": flag("resources", "listChanged"),
                   "subscribe": flag("resources", "subscribe")}),
        );
    }
    if offers("prompts") {
        caps.insert(
            "prompts".into(),
            json!({"listChanged": flag("prompts", "listChanged")}),
        );
    }
    if offers("completions") {
        caps.insert("completions".into(), json!({}));
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
        "capabilities": capabilities(profile, true),
        "serverInfo": server_info(),
        "instructions": instructions(profile),
    })
}

/// The `server/discover` result for a stateless-era client.
pub fn discover_result(profile: &UpstreamProfile) -> Value {
    json!({
        "supportedVersions": MODERN_VERSIONS,
        "capabilities": capabilities(profile, true),
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
            capabilities: Some(json!({"tools": {"listChanged": true}, "prompts": {},
                                      "logging": {}, "experimental": {"x": {}}})),
            instructions: Some("Invoices.".into()),
        };
        let d = discover_result(&profile);
        assert_eq!(d["supportedVersions"], json!(["2026-07-28"]));
        // Relayed on listen streams.
        assert_eq!(
            d["capabilities"],
            json!({"tools": {"listChanged": true}, "prompts": {"listChanged": false}})
        );
        assert_eq!(d["cacheScope"], "private");
        assert_eq!(d["resultType"], "complete");
        assert!(d["ttlMs"].is_u64());
        assert!(
            d["instructions"]
                .as_str()
                .is_some_and(|s| s.starts_with("Invoices."))
        );
        // A handshake-era session has a stream: the upstream's list changes are relayed.
        let i = initialize_result("2025-06-18", &profile);
        assert_eq!(i["protocolVersion"], "2025-06-18");
        assert_eq!(
            i["capabilities"],
            json!({"tools": {"listChanged": true}, "prompts": {"listChanged": false}})
        );
    }

    #[test]
    fn only_what_the_upstream_offers_is_offered() {
        let none = UpstreamProfile {
            capabilities: Some(json!({"logging": {}})),
            instructions: None,
        };
        assert_eq!(discover_result(&none)["capabilities"], json!({}));
        let all = UpstreamProfile {
            capabilities: Some(
                json!({"resources": {"subscribe": true, "listChanged": true},
                                      "completions": {}}),
            ),
            instructions: None,
        };
        assert_eq!(
            discover_result(&all)["capabilities"],
            json!({"resources": {"listChanged": true, "subscribe": true}, "completions": {}})
        );
        assert_eq!(
            initialize_result("2025-11-25", &all)["capabilities"],
            json!({"resources": {"listChanged": true, "subscribe": true}, "completions": {}})
        );
        assert_eq!(
            discover_result(&UpstreamProfile::default())["capabilities"],
            json!({"tools": {"listChanged": false}})
        );
        assert_eq!(negotiate_handshake("2024-11-05"), "2024-11-05");
        assert_eq!(negotiate_handshake("1999-01-01"), "2025-11-25");
    }
}
