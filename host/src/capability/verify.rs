//! Authentication of a bearer token: decode, constant-time signature chain, `nbf`, then every
//! caveat in chain order (time, identity and shape checks), then revocation and its freshness.
//! The result is a [`Grant`] that the per-call checks in `grant.rs` run against.
//!
//! Clock leeway applies in one direction only, in the token holder's favour where that is safe:
//! a token whose `nbf` is up to `leeway` seconds in the future is accepted (a minting replica's
//! clock may run ahead). Expiry gets no leeway: a token is refused from the second `now >= exp`.
//! This module must never accept a caveat it does not understand, nor a field a caveat type does
//! not take.

use std::collections::HashMap;
use std::sync::Arc;

use super::MAX_LEEWAY_SECS;
use super::error::CapabilityError;
use super::glob::{Glob, MAX_WILDCARD_BYTES};
use super::grant::{Grant, Kind, Restriction};
use super::key::MasterKey;
use super::revocation::RevocationSet;
use super::token::{Caveat, Token};

/// Checks tokens against the master key.
#[derive(Debug, Clone)]
pub struct Verifier {
    key: MasterKey,
    leeway_secs: i64,
    /// Tokens already decoded and found signed by `key` (shared by clones, which share the key).
    verified: Arc<Verified>,
}

impl Verifier {
    /// A verifier with an `nbf` leeway of `leeway_secs` (clamped to 0..=[`MAX_LEEWAY_SECS`];
    /// it never extends `exp`). [`DEFAULT_LEEWAY_SECS`](super::DEFAULT_LEEWAY_SECS) is the usual choice.
    pub fn new(key: MasterKey, leeway_secs: i64) -> Verifier {
        Verifier {
            key,
            leeway_secs: leeway_secs.clamp(0, MAX_LEEWAY_SECS),
            verified: Arc::default(),
        }
    }

    /// Tokens kept as verified (tests).
    #[cfg(test)]
    pub(super) fn cached(&self) -> usize {
        self.verified.len()
    }

    /// The effective `nbf` leeway in seconds.
    pub fn leeway_secs(&self) -> i64 {
        self.leeway_secs
    }

    /// The master key (for minting with the same key).
    pub fn key(&self) -> &MasterKey {
        &self.key
    }

    /// Authenticates `bearer` at `now_unix`: everything about the token that does not depend on
    /// the call. Stateful limits are surfaced in the grant, not enforced.
    pub fn authenticate(
        &self,
        bearer: &str,
        now_unix: i64,
        revocations: &RevocationSet,
    ) -> Result<Grant, CapabilityError> {
        let token = match self.verified.get(bearer) {
            Some(token) => token,
            None => {
                let token = Token::decode(bearer)?;
                token.verify_signature(&self.key)?;
                self.verified.put(bearer, token)
            }
        };
        if token.nbf != 0 && now_unix.saturating_add(self.leeway_secs) < token.nbf {
            return Err(CapabilityError::NotYetValid);
        }
        let mut grant = Grant::new(&token);
        for (i, c) in token.cav.iter().enumerate() {
            apply(&mut grant, &token, i, c, now_unix)?;
        }
        let bytes = grant.wildcard_bytes();
        if bytes > MAX_WILDCARD_BYTES {
            return Err(CapabilityError::TooManyWildcards {
                bytes,
                max: MAX_WILDCARD_BYTES,
            });
        }
        revocations.check(&token.jti, &token.root_jti)?;
        Ok(grant)
    }
}

/// Tokens whose signature verified, by their exact text. Decoding and the HMAC chain are pure
/// functions of the text and the key, so a token seen again skips them (microseconds, more with
/// every caveat of a delegation chain); everything that depends on the call or the time — `nbf`,
/// every caveat, revocation — still runs on every call. Only a token that verified is kept, so
/// a flood of forged tokens cannot fill it; it is bounded in entries and in each entry's size,
/// and sharded so concurrent calls rarely meet on one lock. Its `Debug` never shows a token.
#[derive(Default)]
struct Verified {
    shards: [std::sync::Mutex<HashMap<Box<str>, Arc<Token>>>; VERIFIED_SHARDS],
    hasher: std::collections::hash_map::RandomState,
}

const VERIFIED_SHARDS: usize = 8;
/// Tokens kept per shard; a full shard gives up one entry for each new one.
const VERIFIED_PER_SHARD: usize = 512;
/// Longer tokens (very long delegation chains) are verified every time, not kept.
const VERIFIED_MAX_BYTES: usize = 8 << 10;

impl Verified {
    fn shard(&self, bearer: &str) -> &std::sync::Mutex<HashMap<Box<str>, Arc<Token>>> {
        let i = std::hash::BuildHasher::hash_one(&self.hasher, bearer) as usize % VERIFIED_SHARDS;
        &self.shards[i]
    }

    fn get(&self, bearer: &str) -> Option<Arc<Token>> {
        self.shard(bearer).lock().ok()?.get(bearer).cloned()
    }

    /// Keeps a token that verified; returns it.
    fn put(&self, bearer: &str, token: Token) -> Arc<Token> {
        let token = Arc::new(token);
        if bearer.len() <= VERIFIED_MAX_BYTES
            && let Ok(mut shard) = self.shard(bearer).lock()
        {
            // A full shard gives up one entry, not all of them: a holder minting attenuation
            // after attenuation of its own token must not empty everyone else's entries.
            if shard.len() >= VERIFIED_PER_SHARD
                && let Some(victim) = shard.keys().next().cloned()
            {
                shard.remove(&victim);
            }
            shard.insert(bearer.into(), Arc::clone(&token));
        }
        token
    }

    fn len(&self) -> usize {
        (self.shards.iter())
            .map(|s| s.lock().map(|m| m.len()).unwrap_or(0))
            .sum()
    }
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verified")
            .field("tokens", &self.len())
            .finish()
    }
}

/// Field bits, to check that a caveat sets only the fields its type takes.
const TOOLS: u16 = 1;
const AGENT: u16 = 1 << 1;
const EXP: u16 = 1 << 2;
const MAX_CALLS: u16 = 1 << 3;
const STEP_UP_AT: u16 = 1 << 4;
const CALLEES: u16 = 1 << 5;
const CALLEE_ZONES: u16 = 1 << 6;
const SERVERS: u16 = 1 << 7;
const RATE: u16 = 1 << 8;
const CENTS: u16 = 1 << 9;
const RISK: u16 = 1 << 10;

fn fields_set(c: &Caveat) -> u16 {
    [
        (!c.tools.is_empty(), TOOLS),
        (!c.agent.is_empty(), AGENT),
        (c.exp != 0, EXP),
        (c.max_calls != 0, MAX_CALLS),
        (c.step_up_at != 0, STEP_UP_AT),
        (!c.callees.is_empty(), CALLEES),
        (!c.callee_zones.is_empty(), CALLEE_ZONES),
        (!c.servers.is_empty(), SERVERS),
        (c.rate_per_min != 0, RATE),
        (c.max_cents != 0, CENTS),
        (c.risk_max != 0, RISK),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |acc, (_, bit)| acc | bit)
}

/// The caveat types, the name used in errors and the fields each may set.
const KINDS: [(&str, u16); 15] = [
    ("exp", EXP),
    ("tool_allow", TOOLS),
    ("tool_deny", TOOLS),
    // The resource and prompt caveats carry their globs in `tools`, the one list field of the
    // wire caveat, so every SDK that can attenuate with a tool list can write them.
    ("resource_allow", TOOLS),
    ("resource_deny", TOOLS),
    ("prompt_allow", TOOLS),
    ("prompt_deny", TOOLS),
    ("agent_lock", AGENT),
    ("max_calls", MAX_CALLS),
    ("step_up", STEP_UP_AT),
    ("callee_allow", CALLEES | CALLEE_ZONES),
    ("mcp_allow", SERVERS),
    ("rate_limit", RATE),
    ("max_cost", CENTS),
    ("risk_max", RISK),
];

/// Checks caveat `i` and folds it into the grant.
fn apply(
    grant: &mut Grant,
    token: &Token,
    i: usize,
    c: &Caveat,
    now: i64,
) -> Result<(), CapabilityError> {
    let Some(&(kind, allowed)) = KINDS.iter().find(|(k, _)| *k == c.t) else {
        let kind: String = c.t.chars().take(32).collect();
        return Err(CapabilityError::UnknownCaveat { caveat: i, kind });
    };
    let bad = |reason: &str| CapabilityError::MalformedCaveat {
        caveat: i,
        kind,
        reason: reason.to_owned(),
    };
    if fields_set(c) & !allowed != 0 {
        return Err(bad("sets fields this caveat type does not take"));
    }
    let non_negative = |v: i64| {
        if v < 0 {
            Err(bad("negative value"))
        } else {
            Ok(v)
        }
    };
    match kind {
        "exp" => {
            if c.exp == 0 {
                return Err(bad("missing exp"));
            }
            if now >= c.exp {
                return Err(CapabilityError::Expired { caveat: i });
            }
            if grant.expires_at.is_none_or(|e| c.exp < e) {
                grant.expires_at = Some(c.exp);
                grant.expiry_caveat = i;
            }
        }
        "agent_lock" => {
            if c.agent != token.sub {
                return Err(CapabilityError::AgentLockMismatch { caveat: i });
            }
        }
        "tool_allow" => grant.push(Restriction::ToolAllow {
            caveat: i,
            globs: globs(&c.tools, &bad)?,
        }),
        "tool_deny" => grant.push(Restriction::ToolDeny {
            caveat: i,
            globs: globs(&c.tools, &bad)?,
        }),
        "resource_allow" | "prompt_allow" => grant.push(Restriction::KindAllow {
            kind: target_kind(kind),
            caveat: i,
            globs: globs(&c.tools, &bad)?,
        }),
        "resource_deny" | "prompt_deny" => grant.push(Restriction::KindDeny {
            kind: target_kind(kind),
            caveat: i,
            globs: globs(&c.tools, &bad)?,
        }),
        "mcp_allow" => grant.push(Restriction::McpAllow {
            caveat: i,
            globs: globs(&c.servers, &bad)?,
        }),
        "callee_allow" => grant.push(Restriction::CalleeAllow {
            caveat: i,
            agents: globs(&c.callees, &bad)?,
            zones: c.callee_zones.clone(),
        }),
        "risk_max" => {
            let max = non_negative(c.risk_max)?;
            let capped = u8::try_from(max.min(100)).unwrap_or(0);
            grant.risk_max = Some(grant.risk_max.map_or(capped, |m| m.min(capped)));
            grant.push(Restriction::RiskMax { caveat: i, max });
        }
        "max_calls" => grant.max_calls = min_u64(grant.max_calls, non_negative(c.max_calls)?),
        "rate_limit" => {
            grant.rate_per_min = min_u64(grant.rate_per_min, non_negative(c.rate_per_min)?)
        }
        "max_cost" => grant.max_cents = min_u64(grant.max_cents, non_negative(c.max_cents)?),
        "step_up" => {
            let at = non_negative(c.step_up_at)?;
            grant.step_up_at = Some(grant.step_up_at.map_or(at, |s| s.min(at)));
        }
        _ => {
            return Err(CapabilityError::UnknownCaveat {
                caveat: i,
                kind: kind.to_owned(),
            });
        }
    }
    Ok(())
}

/// The kind a `resource_*` or `prompt_*` caveat restricts.
fn target_kind(caveat_type: &str) -> Kind {
    if caveat_type.starts_with("resource_") {
        Kind::Resource
    } else {
        Kind::Prompt
    }
}

fn globs(
    patterns: &[String],
    bad: &dyn Fn(&str) -> CapabilityError,
) -> Result<Vec<Glob>, CapabilityError> {
    patterns
        .iter()
        .map(|p| {
            if p.len() > super::MAX_NAME_BYTES {
                return Err(bad("pattern longer than a name may be"));
            }
            Glob::new(p).map_err(bad)
        })
        .collect()
}

/// The smaller of a running minimum and a non-negative caveat value.
fn min_u64(cur: Option<u64>, v: i64) -> Option<u64> {
    let v = u64::try_from(v).unwrap_or(0);
    Some(cur.map_or(v, |c| c.min(v)))
}
