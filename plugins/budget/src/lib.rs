//! Built-in budget check: per-agent and per-tenant ceilings on calls per window and on cost
//! (cents) per window, plus the token's `max_calls` and `max_cents` (`max_cost` caveat).
//!
//! The price of a call is this configuration's (`costs`, else `default_cost_cents`), so the
//! token's `max_cents` is charged here, and only here: one conditional charge
//! `token-cents:<tenant>:<root jti>` of the call's price against the token's limit, shared by
//! every attenuated child of the root and, through the host's store, by every replica. A free
//! call (price 0) is never charged, so a `max_cents: 0` token may call free tools only.
//!
//! It reads the host-owned counters and proposes charges; it never counts anything itself. The
//! host applies the charges atomically and conditionally, and only for calls that every other
//! check allowed, so blocked calls are never charged.
//!
//! Configuration (JSON, every field optional):
//! ```json
//! {"agent": {"calls": 1000, "cents": 500, "window_secs": 86400},
//!  "tenant": {"calls": 100000, "window_secs": 86400},
//!  "costs": {"send_email_internal": 2}, "default_cost_cents": 0,
//!  "enforce_token_max_calls": false}
//! ```
//!
//! `enforce_token_max_calls` is off by default: the gateway itself charges every token's
//! `max_calls` (one conditional counter per token, in the call's audit transaction), so this
//! plugin charging it too would make one limit two writes. Turn it on to share one call budget
//! across a root token and all its attenuated children (`token-calls:<tenant>:<root jti>`).

/// Inside the component: free lists per small size class before dlmalloc.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOCATOR: intentgate_plugin_alloc::SizeClasses =
    intentgate_plugin_alloc::SizeClasses::new();

use intentgate_plugin_sdk::{
    Charge, Check, CheckResult, IntentRecord, ToolCall, Verdict, glob_match, host,
};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    agent: Option<Ceiling>,
    #[serde(default)]
    tenant: Option<Ceiling>,
    /// Cost in cents per tool, by glob pattern. A JSON object has no order, so the most
    /// specific matching pattern wins: the one with the most literal (non-wildcard)
    /// characters, and among equally specific ones the highest price.
    #[serde(default)]
    costs: BTreeMap<String, u64>,
    #[serde(default)]
    default_cost_cents: u64,
    #[serde(default)]
    enforce_token_max_calls: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ceiling {
    #[serde(default)]
    calls: Option<u64>,
    #[serde(default)]
    cents: Option<u64>,
    #[serde(default = "day")]
    window_secs: u64,
}

/// The longest window (ten years): a window's length is part of its counter key, which the
/// host bounds at 256 bytes.
const MAX_WINDOW_SECS: u64 = 10 * 366 * 86_400;

fn day() -> u64 {
    86_400
}

struct Budget {
    config: Config,
}

impl Check for Budget {
    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = if config.trim().is_empty() {
            Config::default()
        } else {
            serde_json::from_str(config).map_err(|e| format!("budget configuration: {e}"))?
        };
        for (name, ceiling) in [("agent", &config.agent), ("tenant", &config.tenant)] {
            if let Some(c) = ceiling
                && !(1..=MAX_WINDOW_SECS).contains(&c.window_secs)
            {
                return Err(format!(
                    "budget {name}.window_secs must be between 1 and {MAX_WINDOW_SECS} (ten years)"
                ));
            }
        }
        Ok(Self { config })
    }

    fn evaluate(&self, call: &ToolCall, _intent: Option<&IntentRecord>) -> CheckResult {
        let now_secs = host::now_unix_ms() / 1000;
        let cost = self.cost(&call.tool);
        let mut charges = Vec::new();
        let mut labels = Vec::new();
        let scopes = [
            (
                "agent",
                format!("{}:{}", call.tenant, key_part(&call.agent_id)),
                &self.config.agent,
            ),
            ("tenant", call.tenant.clone(), &self.config.tenant),
        ];
        for (scope, id, ceiling) in scopes {
            let Some(c) = ceiling else { continue };
            let window_start = now_secs - now_secs % c.window_secs;
            // A key is counted in windows of one length: the host deletes a key's window once a
            // later one exists, so an hourly and a daily ceiling sharing a key would lose the
            // day's count every hour. A day (the default) keeps the key it always had.
            let len = match c.window_secs {
                86_400 => String::new(),
                secs => format!("@{secs}s"),
            };
            if let Some(limit) = c.calls {
                charges.push(Charge {
                    key: format!("{scope}-calls{len}:{id}"),
                    window_start,
                    amount: 1,
                    limit,
                });
                labels.push(format!("{scope} calls per {}s", c.window_secs));
            }
            if let (Some(limit), true) = (c.cents, cost > 0) {
                charges.push(Charge {
                    key: format!("{scope}-cents{len}:{id}"),
                    window_start,
                    amount: cost,
                    limit,
                });
                labels.push(format!("{scope} cents per {}s", c.window_secs));
            }
        }
        if let (Some(limit), true) = (call.token.max_cents, cost > 0) {
            charges.push(Charge {
                key: format!("token-cents:{}:{}", call.tenant, call.token.root_jti),
                window_start: 0,
                amount: cost,
                limit,
            });
            labels.push("token max_cents".to_string());
        }
        if let (true, Some(limit)) = (self.config.enforce_token_max_calls, call.token.max_calls) {
            charges.push(Charge {
                key: format!("token-calls:{}:{}", call.tenant, call.token.root_jti),
                window_start: 0,
                amount: 1,
                limit,
            });
            labels.push("token max_calls".to_string());
        }
        for (charge, label) in charges.iter().zip(&labels) {
            let used = host::counter(&charge.key, charge.window_start);
            if used.saturating_add(charge.amount) > charge.limit {
                return Verdict::block(format!(
                    "budget exceeded: {label} ({used}/{})",
                    charge.limit
                ))
                .into();
            }
        }
        CheckResult::from(Verdict::allow(format!(
            "within budget ({} counters)",
            charges.len()
        )))
        .with_charges(charges)
    }
}

/// An agent id as a part of a counter key: the host refuses keys holding `/` (a tenant's
/// counters are `tenant/…`) or longer than 256 bytes, and a subject may be a SPIFFE id or a
/// URL of up to 256 bytes. `%` and `/` are escaped; a long id keeps its first 120 bytes and a
/// 64-bit FNV-1a digest of the whole (subjects are minted by operators, not chosen by agents).
fn key_part(id: &str) -> String {
    let escaped = id.replace('%', "%25").replace('/', "%2F");
    if escaped.len() <= 160 {
        return escaped;
    }
    let mut cut = 120;
    while !escaped.is_char_boundary(cut) {
        cut -= 1;
    }
    let digest = id.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("{}~{digest:016x}", &escaped[..cut])
}

impl Budget {
    fn cost(&self, tool: &str) -> u64 {
        let literal = |p: &str| p.chars().filter(|c| !matches!(c, '*' | '?')).count();
        self.config
            .costs
            .iter()
            .filter(|(pattern, _)| glob_match(pattern, tool))
            .max_by_key(|(pattern, cents)| (literal(pattern), **cents))
            .map(|(_, cents)| *cents)
            .unwrap_or(self.config.default_cost_cents)
    }
}

intentgate_plugin_sdk::export_check!(Budget);

#[cfg(test)]
mod tests {
    use super::*;
    use intentgate_plugin_sdk::VerdictKind;
    use intentgate_plugin_sdk::testing::{Harness, call};

    #[test]
    fn charges_until_the_ceiling_then_blocks() {
        let h = Harness::<Budget>::new(r#"{"agent": {"calls": 2, "window_secs": 60}}"#)
            .expect("configure");
        h.set_now_ms(120_500);
        let c = call("t").build();
        for _ in 0..2 {
            let r = h.evaluate(&c, None);
            assert_eq!(r.verdict.kind, VerdictKind::Allow);
            assert_eq!(r.charges.len(), 1);
            assert_eq!(r.charges[0].window_start, 120);
            assert!(h.apply_charges(&r));
        }
        let r = h.evaluate(&c, None);
        assert_eq!(r.verdict.kind, VerdictKind::Block, "{}", r.verdict.reason);
        assert!(r.charges.is_empty());
        // A new window starts from zero.
        h.set_now_ms(180_000);
        assert_eq!(h.evaluate(&c, None).verdict.kind, VerdictKind::Allow);
    }

    /// A daily ceiling keeps the key it always had; any other window length has a key of its
    /// own, so that an hourly and a daily ceiling never share a counter.
    #[test]
    fn each_window_length_counts_under_a_key_of_its_own() {
        let key = |config: &str| {
            let h = Harness::<Budget>::new(config).expect("configure");
            let r = h.evaluate(&call("t").agent("bot").build(), None);
            r.charges.iter().map(|c| c.key.clone()).collect::<Vec<_>>()
        };
        let day = key(r#"{"agent": {"calls": 9, "cents": 9}, "default_cost_cents": 1}"#);
        let hour = key(
            r#"{"agent": {"calls": 9, "cents": 9, "window_secs": 3600}, "default_cost_cents": 1}"#,
        );
        assert_eq!(day.len(), 2);
        assert!(day[0].starts_with("agent-calls:") && day[1].starts_with("agent-cents:"));
        assert!(
            hour[0].starts_with("agent-calls@3600s:") && hour[1].starts_with("agent-cents@3600s:")
        );
        assert!(day.iter().all(|k| !hour.contains(k)), "{day:?} {hour:?}");
    }

    #[test]
    fn a_window_is_between_a_second_and_ten_years() {
        let config = |secs: u64| format!(r#"{{"agent": {{"calls": 9, "window_secs": {secs}}}}}"#);
        assert!(Harness::<Budget>::new(&config(0)).is_err());
        assert!(Harness::<Budget>::new(&config(MAX_WINDOW_SECS)).is_ok());
        assert!(Harness::<Budget>::new(&config(u64::MAX)).is_err());
    }

    #[test]
    fn token_max_calls_and_costs() {
        let h = Harness::<Budget>::new(
            r#"{"tenant": {"cents": 5}, "costs": {"send_*": 3}, "enforce_token_max_calls": true}"#,
        )
        .expect("configure");
        let c = call("send_email").max_calls(1).build();
        let r = h.evaluate(&c, None);
        assert_eq!(r.charges.len(), 2);
        assert!(h.apply_charges(&r));
        let r = h.evaluate(&c, None);
        assert_eq!(r.verdict.kind, VerdictKind::Block);
        assert!(r.verdict.reason.contains("cents") || r.verdict.reason.contains("max_calls"));
    }

    #[test]
    fn the_token_max_calls_is_left_to_the_gateway_by_default() {
        let h = Harness::<Budget>::new("").expect("configure");
        let r = h.evaluate(&call("send_email").max_calls(1).build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Allow);
        assert!(r.charges.is_empty(), "{:?}", r.charges);
    }

    /// An agent named by a SPIFFE id or a URL (a `/`, up to 256 bytes) gets counter keys the
    /// host takes: no `/`, at most 256 bytes, distinct per agent.
    #[test]
    fn agent_keys_hold_no_slash_and_stay_short() {
        let long = format!("https://agents.example/{}", "x".repeat(230));
        let ids = [
            "spiffe://acme.org/agent/billing",
            "spiffe://acme.org%2Fagent/billing",
            long.as_str(),
        ];
        let mut keys = Vec::new();
        for id in ids {
            let k = key_part(id);
            assert!(!k.contains('/') && k.len() <= 160 + 17, "{k}");
            keys.push(k);
        }
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 3, "distinct: {keys:?}");
        let h = Harness::<Budget>::new(r#"{"agent": {"calls": 10, "window_secs": 60}}"#)
            .expect("configure");
        let r = h.evaluate(&call("read").agent(ids[0]).build(), None);
        assert_eq!(r.verdict.kind, VerdictKind::Allow, "{}", r.verdict.reason);
        assert!(
            r.charges
                .iter()
                .all(|c| !c.key.contains('/') && c.key.len() <= 256)
        );
    }

    /// The most specific pattern prices a call, whatever the object's key order (a wildcard
    /// sorts before letters, and used to shadow every pattern it shares a prefix with).
    #[test]
    fn the_most_specific_pattern_prices_a_call() {
        let h = Harness::<Budget>::new(
            r#"{"costs": {"*": 1, "pay_*": 10, "pay_large": 500, "wire": 1000}}"#,
        )
        .expect("configure");
        for (tool, price) in [
            ("pay_large", 500),
            ("pay_small", 10),
            ("wire", 1000),
            ("read", 1),
        ] {
            let r = h.evaluate(&call(tool).max_cents(10_000).build(), None);
            assert_eq!(r.verdict.kind, VerdictKind::Allow, "{}", r.verdict.reason);
            assert_eq!(r.charges[0].amount, price, "{tool}");
        }
    }

    #[test]
    fn token_max_cents_is_charged_per_root_at_the_configured_price() {
        let h = Harness::<Budget>::new(
            r#"{"costs": {"send_*": 3, "read_*": 0}, "default_cost_cents": 1}"#,
        )
        .expect("configure");
        // max_cents 0: priced tools are refused, free ones are allowed and never charged.
        let zero = call("send_email").max_cents(0).build();
        let r = h.evaluate(&zero, None);
        assert_eq!(r.verdict.kind, VerdictKind::Block, "{}", r.verdict.reason);
        assert!(
            r.verdict.reason.contains("max_cents"),
            "{}",
            r.verdict.reason
        );
        let free = call("read_file").max_cents(0).build();
        let r = h.evaluate(&free, None);
        assert_eq!(r.verdict.kind, VerdictKind::Allow);
        assert!(r.charges.is_empty(), "a free call is not charged");
        // max_cents 7 at 3 a call: two calls (6), the third (9) would exceed it.
        let paid = call("send_email").max_cents(7).root_jti("root-a").build();
        for _ in 0..2 {
            let r = h.evaluate(&paid, None);
            assert_eq!(r.verdict.kind, VerdictKind::Allow, "{}", r.verdict.reason);
            assert_eq!(r.charges.len(), 1);
            assert_eq!(r.charges[0].amount, 3);
            assert_eq!(r.charges[0].limit, 7);
            assert!(h.apply_charges(&r));
        }
        assert_eq!(h.evaluate(&paid, None).verdict.kind, VerdictKind::Block);
        // A child of the same root shares the counter: 1 cent left, the default price fits.
        let child = call("other").max_cents(7).root_jti("root-a").build();
        let r = h.evaluate(&child, None);
        assert_eq!(r.verdict.kind, VerdictKind::Allow, "{}", r.verdict.reason);
        assert!(h.apply_charges(&r));
        assert_eq!(h.evaluate(&child, None).verdict.kind, VerdictKind::Block);
        // Another root has its own.
        let other = call("send_email").max_cents(7).root_jti("root-b").build();
        assert_eq!(h.evaluate(&other, None).verdict.kind, VerdictKind::Allow);
    }
}
