//! Minting root tokens under the master key, from a validated [`MintRequest`].
//!
//! Caveats are appended in the original gateway's order: `agent_lock{sub}`, `exp` (when a TTL is
//! given), then `tool_allow`, `max_calls`, `mcp_allow`, `rate_limit`, `max_cost`, `risk_max`,
//! `step_up`, `callee_allow` as requested, then ours: `resource_allow`, `prompt_allow`. This module must never mint a token that our own
//! verifier would refuse (bad pattern, too large), nor one with an ambiguous zero limit, nor a
//! caveat the gateway cannot evaluate (`risk_max`, `callee_zones`): those are refused by name.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::error::MintError;
use super::glob::Glob;
use super::key::MasterKey;
use super::token::{Caveat, TOKEN_VERSION, Token};
use super::{MAX_NAME_BYTES, MAX_SUBJECT_BYTES, MAX_TOKEN_BYTES, MAX_TTL_SECONDS};

/// The issuer stamped on every token.
pub const ISSUER: &str = "intentgate";
/// Tenant and zone used when the request names none.
pub const DEFAULT_TENANT: &str = "default";
pub const DEFAULT_ZONE: &str = "default";

/// What to mint. Empty lists and `None` mean "no such caveat".
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MintRequest {
    /// The agent the token is bound to (required).
    pub subject: String,
    /// `[A-Za-z0-9._-]{1,64}`; default `"default"`.
    pub tenant: Option<String>,
    /// `[A-Za-z0-9._-]{1,64}`; default `"default"`.
    pub zone: Option<String>,
    /// Lifetime from `now`, 1..=[`MAX_TTL_SECONDS`]; `None` mints a token without expiry.
    pub ttl_seconds: Option<u64>,
    /// `tool_allow` globs.
    pub tools: Vec<String>,
    /// `max_calls` (at least 1).
    pub max_calls: Option<u64>,
    /// `mcp_allow` globs over upstream server names.
    pub servers: Vec<String>,
    /// `rate_limit` calls per minute (at least 1).
    pub rate_per_min: Option<u64>,
    /// `max_cost` in cents (0 allows no spending).
    pub max_cents: Option<u64>,
    /// `risk_max`: refused (the gateway computes no risk score); kept so the request names it.
    pub risk_max: Option<u64>,
    /// `step_up`: unix time of the operator's fresh step-up factor.
    pub step_up_at: Option<u64>,
    /// `callee_allow` globs over the upstream server's name (the callee of every call).
    pub callees: Vec<String>,
    /// `callee_allow` zones: refused (the gateway knows no zone for its upstream).
    pub callee_zones: Vec<String>,
    /// Not-before, unix seconds.
    pub nbf: Option<u64>,
    /// `resource_allow` globs over resource URIs (none: every resource).
    pub resources: Vec<String>,
    /// `prompt_allow` globs over prompt names (none: every prompt).
    pub prompts: Vec<String>,
}

/// A freshly minted token. `Debug` does not show the token.
#[derive(Clone, PartialEq, Eq)]
pub struct Minted {
    /// The bearer string: shown once, never stored.
    pub token: String,
    pub jti: String,
    pub root_jti: String,
    pub subject: String,
    pub tenant: String,
    pub zone: String,
    pub expires_at: Option<i64>,
}

impl fmt::Debug for Minted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Minted")
            .field("token", &"<redacted>")
            .field("jti", &self.jti)
            .field("subject", &self.subject)
            .field("tenant", &self.tenant)
            .field("zone", &self.zone)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Mints a root token for `req` at `now_unix` (seconds).
pub fn mint(key: &MasterKey, req: &MintRequest, now_unix: i64) -> Result<Minted, MintError> {
    let mut random = [0u8; 12];
    getrandom::fill(&mut random).map_err(|_| MintError::Random)?;
    mint_with_random(key, req, now_unix, random)
}

/// [`mint`] with the random part of the `jti` supplied (deterministic tests).
pub(crate) fn mint_with_random(
    key: &MasterKey,
    req: &MintRequest,
    now_unix: i64,
    random: [u8; 12],
) -> Result<Minted, MintError> {
    if now_unix <= 0 {
        return Err(MintError::OutOfRange { field: "now" });
    }
    let subject = checked_subject(&req.subject)?;
    let tenant = checked_name("tenant", req.tenant.as_deref(), DEFAULT_TENANT)?;
    let zone = checked_name("zone", req.zone.as_deref(), DEFAULT_ZONE)?;
    let expires_at = match req.ttl_seconds {
        None => None,
        Some(ttl) if (1..=MAX_TTL_SECONDS).contains(&ttl) => {
            Some(now_unix.saturating_add(int(ttl, "ttl_seconds")?))
        }
        Some(_) => {
            return Err(MintError::TtlOutOfRange {
                max: MAX_TTL_SECONDS,
            });
        }
    };
    let nbf = match req.nbf {
        None => 0,
        Some(n) => {
            let n = int(n, "nbf")?;
            if n == 0 || expires_at.is_some_and(|e| n >= e) {
                return Err(MintError::OutOfRange { field: "nbf" });
            }
            n
        }
    };

    let mut cav = vec![Caveat::agent_lock(subject)];
    if let Some(exp) = expires_at {
        cav.push(Caveat::exp(exp));
    }
    if !req.tools.is_empty() {
        cav.push(Caveat::tool_allow(checked_patterns("tools", &req.tools)?));
    }
    if let Some(n) = req.max_calls {
        cav.push(Caveat::max_calls(positive(n, "max_calls")?));
    }
    if !req.servers.is_empty() {
        cav.push(Caveat {
            servers: checked_patterns("servers", &req.servers)?,
            ..Caveat::bare("mcp_allow")
        });
    }
    if let Some(n) = req.rate_per_min {
        cav.push(Caveat {
            rate_per_min: positive(n, "rate_per_min")?,
            ..Caveat::bare("rate_limit")
        });
    }
    if let Some(n) = req.max_cents {
        cav.push(Caveat {
            max_cents: int(n, "max_cents")?,
            ..Caveat::bare("max_cost")
        });
    }
    if req.risk_max.is_some() {
        // No risk score exists: a risk_max caveat could only ever refuse.
        return Err(MintError::Unsupported {
            field: "risk_max",
            reason: "this gateway computes no risk score, so it cannot evaluate a risk_max caveat",
        });
    }
    if let Some(at) = req.step_up_at {
        let at = int(at, "step_up_at")?;
        if at == 0 {
            return Err(MintError::OutOfRange {
                field: "step_up_at",
            });
        }
        cav.push(Caveat {
            step_up_at: at,
            ..Caveat::bare("step_up")
        });
    }
    if !req.callee_zones.is_empty() {
        for z in &req.callee_zones {
            checked_name("callee_zones", Some(z), "")?;
        }
        // The callee is the upstream server, whose zone the gateway does not know.
        return Err(MintError::Unsupported {
            field: "callee_zones",
            reason: "the gateway knows no zone for its upstream server; name the upstream in callees",
        });
    }
    if !req.callees.is_empty() {
        cav.push(Caveat {
            callees: checked_patterns("callees", &req.callees)?,
            ..Caveat::bare("callee_allow")
        });
    }
    if !req.resources.is_empty() {
        let globs = checked_patterns("resources", &req.resources)?;
        cav.push(Caveat::scoped("resource_allow", globs));
    }
    if !req.prompts.is_empty() {
        let globs = checked_patterns("prompts", &req.prompts)?;
        cav.push(Caveat::scoped("prompt_allow", globs));
    }

    // What verification refuses is never minted: the wildcard patterns of every caveat
    // together stay within the bound a holder's caveats are held to.
    let wildcard = cav
        .iter()
        .flat_map(|c| c.tools.iter().chain(&c.servers).chain(&c.callees))
        .filter_map(|p| Glob::new(p).ok())
        .map(|g| g.wildcard_bytes())
        .sum::<usize>();
    if wildcard > super::glob::MAX_WILDCARD_BYTES {
        return Err(MintError::InvalidPattern {
            field: "tools",
            pattern: String::new(),
            reason: "the patterns with a '*' exceed 1024 bytes in one token",
        });
    }
    let mut id = [0u8; 16];
    // The original truncates the time to 32 bits too; it only orders ids, uniqueness is random.
    id[..4].copy_from_slice(&((now_unix & 0xffff_ffff) as u32).to_be_bytes());
    id[4..].copy_from_slice(&random);
    let jti = URL_SAFE_NO_PAD.encode(id);
    let mut token = Token {
        v: TOKEN_VERSION,
        jti: jti.clone(),
        root_jti: jti.clone(),
        iss: ISSUER.to_owned(),
        tenant: tenant.to_owned(),
        zone: zone.to_owned(),
        sub: subject.to_owned(),
        iat: now_unix,
        nbf,
        cav,
        sig: String::new(),
    };
    token.sign(key);
    let encoded = token.encode();
    if encoded.len() > MAX_TOKEN_BYTES {
        return Err(MintError::TooLarge { len: encoded.len() });
    }
    Ok(Minted {
        token: encoded,
        jti: jti.clone(),
        root_jti: jti,
        subject: token.sub,
        tenant: token.tenant,
        zone: token.zone,
        expires_at,
    })
}

fn checked_subject(s: &str) -> Result<&str, MintError> {
    if s.is_empty() {
        return Err(MintError::EmptySubject);
    }
    if s.len() > MAX_SUBJECT_BYTES || s.chars().any(char::is_control) {
        return Err(MintError::InvalidSubject {
            max: MAX_SUBJECT_BYTES,
        });
    }
    Ok(s)
}

/// Whether `s` is a valid tenant or zone name: `[A-Za-z0-9._-]{1,64}`.
pub fn is_valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn checked_name<'a>(
    field: &'static str,
    v: Option<&'a str>,
    default: &'a str,
) -> Result<&'a str, MintError> {
    match v {
        None => Ok(default),
        Some(s) if is_valid_name(s) => Ok(s),
        Some(s) => Err(MintError::InvalidName {
            field,
            value: super::error::echo(s),
        }),
    }
}

fn checked_patterns(field: &'static str, patterns: &[String]) -> Result<Vec<String>, MintError> {
    let invalid = |p: &str, reason| MintError::InvalidPattern {
        field,
        pattern: super::error::echo(p),
        reason,
    };
    for p in patterns {
        if p.is_empty() {
            return Err(invalid(p, "empty pattern"));
        }
        if p.len() > MAX_NAME_BYTES {
            return Err(invalid(p, "too long"));
        }
        Glob::new(p).map_err(|reason| invalid(p, reason))?;
    }
    Ok(patterns.to_vec())
}

fn int(v: u64, field: &'static str) -> Result<i64, MintError> {
    i64::try_from(v).map_err(|_| MintError::OutOfRange { field })
}

fn positive(v: u64, field: &'static str) -> Result<i64, MintError> {
    if v == 0 {
        return Err(MintError::ZeroLimit { field });
    }
    int(v, field)
}
