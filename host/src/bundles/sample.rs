//! Recorded calls for a dry-run, read back from the tenant's audit chain (`"sample":
//! "last-24h"` in `POST /v1/admin/policies/dry-run` and `…/bundles/{digest}/dry-run`).
//!
//! A replay sees what the audit event kept: tenant, agent, tool, token ids, caveat count and,
//! as far as `INTENTGATE_AUDIT_PERSIST_ARG_VALUES` allowed, the argument values (keys recorded
//! without a value replay as `null`). It never sees the intent prompt or the token's caveats,
//! which the audit does not store. The agent's usage is rebuilt from the allowed calls of the
//! sample itself, in time order, per UTC day. Only decisions the bundle made are replayed:
//! calls stopped by the capability check never reached a bundle, and upstream events are
//! outcomes, not decisions. This module reads the audit tables and must never write them.

use std::collections::HashMap;

use serde_json::{Map, Value};

use super::registry::RecordedCall;
use crate::audit::kinds;
use crate::audit::query::{self, AuditFilter};
use crate::plugins::{CheckInput, TokenInput, Usage, VerdictKind};
use crate::store::Db;

/// Most calls one dry-run replays (the newest ones of the window).
pub const MAX_SAMPLE: usize = 10_000;

/// Longest window a sample may name.
const MAX_WINDOW_MS: i64 = 31 * 86_400_000;

/// A sample name that is not `last-<N><m|h|d>`, or a read error.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// Not a sample name this API knows.
    #[error(
        "sample {0:?}: expected last-<N>m, last-<N>h or last-<N>d (e.g. last-24h), at most 31 days"
    )]
    Name(String),
    /// The audit store could not be read.
    #[error("reading the audit log: {0}")]
    Audit(#[from] crate::audit::AuditError),
}

/// The window a sample name covers, in milliseconds.
pub fn window_ms(name: &str) -> Result<i64, SampleError> {
    let bad = || SampleError::Name(name.to_string());
    let spec = name.strip_prefix("last-").ok_or_else(bad)?;
    let unit = spec.chars().next_back().ok_or_else(bad)?;
    let digits = &spec[..spec.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let unit_ms = match unit {
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    if n <= 0 || ms > MAX_WINDOW_MS {
        return Err(bad());
    }
    Ok(ms)
}

/// The tenant's recorded tool-call decisions of the last `window_ms` before `now_ms`, oldest
/// first, at most [`MAX_SAMPLE`] (the newest).
pub async fn recorded_calls(
    db: &Db,
    tenant: &str,
    window_ms: i64,
    now_ms: i64,
) -> Result<Vec<RecordedCall>, SampleError> {
    let filter = AuditFilter {
        tenant: Some(tenant.to_string()),
        from_ms: Some(now_ms - window_ms),
        to_ms: Some(now_ms),
        ..Default::default()
    };
    let mut events = Vec::new();
    let mut cursor: Option<String> = None;
    'pages: loop {
        let page = query::list(db, &filter, cursor.as_deref(), 1000).await?;
        for record in &page.items {
            if let Some(event) = Replayable::from_body(record.id, &record.body_value()) {
                events.push(event);
                if events.len() == MAX_SAMPLE {
                    break 'pages;
                }
            }
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    events.reverse();
    Ok(with_usage(events))
}

/// One decision event that a bundle made.
struct Replayable {
    id: i64,
    day: String,
    decision: VerdictKind,
    input: CheckInput,
}

impl Replayable {
    fn from_body(id: i64, body: &Value) -> Option<Self> {
        let text = |k: &str| body.get(k).and_then(Value::as_str).unwrap_or_default();
        if text("event") != kinds::TOOL_CALL || matches!(text("check"), "capability" | "upstream") {
            return None;
        }
        let decision = match text("decision") {
            "allow" => VerdictKind::Allow,
            "block" => VerdictKind::Block,
            "escalate" => VerdictKind::Escalate,
            _ => return None,
        };
        let mut args: Map<String, Value> = body
            .get("arg_keys")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(|k| (k.to_string(), Value::Null))
            .collect();
        if let Some(Value::Object(values)) = body.get("arg_values") {
            args.extend(values.clone());
        }
        let agent = text("agent_id").to_string();
        Some(Replayable {
            id,
            day: text("ts").get(..10).unwrap_or_default().to_string(),
            decision,
            input: CheckInput {
                tenant: text("tenant").to_string(),
                agent_id: agent.clone(),
                tool: text("tool").to_string(),
                arguments: Value::Object(args).to_string(),
                intent_prompt: None,
                token: TokenInput {
                    jti: text("capability_token_id").to_string(),
                    root_jti: text("root_capability_token_id").to_string(),
                    subject: agent,
                    caveat_count: body
                        .get("caveat_count")
                        .and_then(Value::as_u64)
                        .and_then(|n| u32::try_from(n).ok())
                        .unwrap_or(0),
                    ..Default::default()
                },
                usage: Usage::default(),
            },
        })
    }
}

/// Fill each call's usage from the allowed calls before it on the same UTC day.
fn with_usage(events: Vec<Replayable>) -> Vec<RecordedCall> {
    let mut per_tool: HashMap<(String, String, String), u64> = HashMap::new();
    let mut per_agent: HashMap<(String, String), u64> = HashMap::new();
    events
        .into_iter()
        .map(|mut e| {
            let agent_key = (e.day.clone(), e.input.agent_id.clone());
            let tool_key = (e.day, e.input.agent_id.clone(), e.input.tool.clone());
            e.input.usage = Usage {
                calls_today_tool: per_tool.get(&tool_key).copied().unwrap_or(0),
                calls_today_total: per_agent.get(&agent_key).copied().unwrap_or(0),
            };
            if e.decision == VerdictKind::Allow {
                *per_tool.entry(tool_key).or_default() += 1;
                *per_agent.entry(agent_key).or_default() += 1;
            }
            RecordedCall {
                input: e.input,
                decision: e.decision,
                id: Some(e.id.to_string()),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sample_names() {
        assert_eq!(window_ms("last-24h").expect("24h"), 86_400_000);
        assert_eq!(window_ms("last-15m").expect("15m"), 900_000);
        assert_eq!(window_ms("last-7d").expect("7d"), 7 * 86_400_000);
        for bad in [
            "",
            "24h",
            "last-",
            "last-h",
            "last-0h",
            "last--1h",
            "last-24x",
            "last-32d",
            "last-99999999999999999d",
            "last-1é",
            "last-é",
            "last-+1h",
        ] {
            assert!(window_ms(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn event(decision: &str, check: &str, tool: &str, ts: &str) -> Value {
        json!({"event": "intentgate.tool_call", "decision": decision, "check": check,
               "tenant": "acme", "agent_id": "bot", "tool": tool, "ts": ts,
               "arg_keys": ["to", "body"], "arg_values": {"to": "a@acme.example"},
               "capability_token_id": "j1", "caveat_count": 3})
    }

    #[test]
    fn only_bundle_decisions_are_replayed_with_recorded_arguments() {
        let ok =
            Replayable::from_body(7, &event("allow", "", "send_email", "2026-11-29T10:00:00Z"))
                .expect("a decision");
        assert_eq!(ok.decision, VerdictKind::Allow);
        let args: Value = serde_json::from_str(&ok.input.arguments).expect("json");
        assert_eq!(args, json!({"to": "a@acme.example", "body": null}));
        assert_eq!(ok.input.token.caveat_count, 3);
        assert_eq!(ok.input.token.subject, "bot");
        for skipped in [
            event("block", "capability", "x", "2026-11-29T10:00:00Z"),
            event("block", "upstream", "x", "2026-11-29T10:00:00Z"),
            json!({"event": "admin/mint", "decision": "allow"}),
            json!({"event": "intentgate.tool_call"}),
        ] {
            assert!(Replayable::from_body(1, &skipped).is_none(), "{skipped}");
        }
    }

    #[test]
    fn usage_counts_allowed_calls_earlier_the_same_day() {
        let evs = [
            event("allow", "", "send_email", "2026-11-28T23:59:00Z"),
            event("allow", "", "send_email", "2026-11-29T01:00:00Z"),
            event("block", "policy", "send_email", "2026-11-29T02:00:00Z"),
            event("allow", "", "read_invoice", "2026-11-29T03:00:00Z"),
            event("allow", "", "send_email", "2026-11-29T04:00:00Z"),
        ];
        let calls = with_usage(
            evs.iter()
                .enumerate()
                .filter_map(|(i, e)| Replayable::from_body(i as i64, e))
                .collect(),
        );
        let usage: Vec<(u64, u64)> = calls
            .iter()
            .map(|c| {
                (
                    c.input.usage.calls_today_tool,
                    c.input.usage.calls_today_total,
                )
            })
            .collect();
        assert_eq!(usage, vec![(0, 0), (0, 0), (1, 1), (0, 1), (1, 2)]);
    }
}
