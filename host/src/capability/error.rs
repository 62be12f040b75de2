//! Typed errors of the capability layer: why a token was refused, why a mint request was refused,
//! why a master key could not be loaded.
//!
//! Every `Display` string is a short reason that is safe to send back to the caller (it becomes
//! the `data` of a JSON-RPC `-32010` error). It must never contain key material, a signature, or
//! the token itself; names echoed from the request are truncated.

use thiserror::Error;

/// The longest request-supplied name (tool, agent, server) echoed in an error message.
const ECHO_MAX: usize = 64;

/// Why a bearer token was not accepted, or why a call was outside its scope.
///
/// `caveat` fields are zero-based indexes into the token's caveat chain.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CapabilityError {
    /// No token was presented.
    #[error("missing capability token")]
    Missing,
    /// The token is longer than [`super::MAX_TOKEN_BYTES`].
    #[error("capability token too large ({len} bytes)")]
    TooLarge { len: usize },
    /// Not base64url, not JSON, a wrong type, a duplicate or unknown field, or a missing field.
    #[error("malformed capability token: {0}")]
    Malformed(String),
    /// `v` is not 4.
    #[error("unsupported token version {0} (expected 4)")]
    UnsupportedVersion(i64),
    /// More than [`super::MAX_CAVEATS`] caveats.
    #[error("too many caveats ({0})")]
    TooManyCaveats(usize),
    /// `sig` is not the canonical base64url encoding of 32 bytes.
    #[error("malformed token signature")]
    MalformedSignature,
    /// The HMAC chain does not end in `sig` (tampered token or another key).
    #[error("invalid token signature")]
    BadSignature,
    /// A caveat type this gateway does not know: denied by default.
    #[error("unknown caveat type {kind:?} at caveat {caveat} (deny by default)")]
    UnknownCaveat { caveat: usize, kind: String },
    /// A known caveat type with fields it does not take, or a value out of range.
    #[error("malformed caveat {caveat} ({kind}): {reason}")]
    MalformedCaveat {
        caveat: usize,
        kind: &'static str,
        reason: String,
    },
    /// `nbf` is later than now plus the clock leeway.
    #[error("token not yet valid (nbf)")]
    NotYetValid,
    /// `now >= exp` for an `exp` caveat.
    #[error("token expired (caveat {caveat}, exp)")]
    Expired { caveat: usize },
    /// An `agent_lock` caveat names someone other than the token's subject.
    #[error("caveat {caveat} (agent_lock) does not match the token subject")]
    AgentLockMismatch { caveat: usize },
    /// The request names an agent other than the token's subject.
    #[error("agent {agent:?} does not match the token's agent_lock")]
    AgentMismatch { agent: String },
    /// The token's `jti` or `root_jti` is in the revocation set.
    #[error("token revoked")]
    Revoked,
    /// The revocation set has not been synced recently enough: failing closed.
    #[error("revocation list is stale; refusing tokens until it is synced")]
    RevocationStale,
    /// The token's patterns with a `*` add up to more than [`super::glob::MAX_WILDCARD_BYTES`].
    #[error("the token's wildcard patterns take {bytes} bytes (at most {max})")]
    TooManyWildcards { bytes: usize, max: usize },
    /// A request-supplied name is longer than [`super::MAX_NAME_BYTES`].
    #[error("{what} name too long")]
    NameTooLong { what: &'static str },
    /// A resource URI an upstream could read as another URI ([`super::uri::ambiguity`]).
    #[error("resource {uri:?} is refused: {why}; send the URI in its plain form")]
    AmbiguousUri { uri: String, why: &'static str },
    /// The tool matches no pattern of a `tool_allow` caveat.
    #[error("tool {tool:?} not allowed by caveat {caveat} (tool_allow)")]
    ToolNotAllowed { tool: String, caveat: usize },
    /// The tool matches a pattern of a `tool_deny` caveat.
    #[error("tool {tool:?} denied by caveat {caveat} (tool_deny)")]
    ToolDenied { tool: String, caveat: usize },
    /// The resource URI or prompt name matches no pattern of a `resource_allow` /
    /// `prompt_allow` caveat.
    #[error("{kind} {name:?} not allowed by caveat {caveat} ({kind}_allow)")]
    NotAllowed {
        kind: &'static str,
        name: String,
        caveat: usize,
    },
    /// The resource URI or prompt name matches a pattern of a `resource_deny` / `prompt_deny`
    /// caveat.
    #[error("{kind} {name:?} denied by caveat {caveat} ({kind}_deny)")]
    Denied {
        kind: &'static str,
        name: String,
        caveat: usize,
    },
    /// The upstream server is unknown or matches no pattern of an `mcp_allow` caveat.
    #[error("upstream server {server:?} not allowed by caveat {caveat} (mcp_allow)")]
    ServerNotAllowed {
        server: Option<String>,
        caveat: usize,
    },
    /// The call is not agent-to-agent, or the callee is not allowed by a `callee_allow` caveat.
    #[error("callee {callee:?} not allowed by caveat {caveat} (callee_allow)")]
    CalleeNotAllowed {
        callee: Option<String>,
        caveat: usize,
    },
    /// The caller's risk score exceeds a `risk_max` ceiling.
    #[error("risk {risk} exceeds ceiling {max} of caveat {caveat} (risk_max)")]
    RiskTooHigh { risk: u8, max: i64, caveat: usize },
    /// A `risk_max` caveat, but no risk score exists for the call: the gateway does not
    /// evaluate `risk_max`, so the token is refused (fail closed).
    #[error(
        "caveat {caveat} (risk_max) cannot be evaluated: this gateway computes no risk score and does not evaluate risk_max"
    )]
    RiskNotEvaluated { caveat: usize },
}

/// Why a mint request was refused. Messages name the offending field.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum MintError {
    #[error("subject is required")]
    EmptySubject,
    #[error("subject must be at most {max} bytes without control characters")]
    InvalidSubject { max: usize },
    #[error("{field} {value:?} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    InvalidName { field: &'static str, value: String },
    #[error("{field} is empty: omit it for no restriction")]
    EmptyList { field: &'static str },
    #[error("{field} pattern {pattern:?} is invalid: {reason}")]
    InvalidPattern {
        field: &'static str,
        pattern: String,
        reason: &'static str,
    },
    #[error("ttl_seconds must be between 1 and {max}; omit it for a token without expiry")]
    TtlOutOfRange { max: u64 },
    #[error("{field} must be at least 1; omit it for no limit")]
    ZeroLimit { field: &'static str },
    #[error("{field} is out of range")]
    OutOfRange { field: &'static str },
    /// A caveat this gateway cannot evaluate: minting it would make a token that is refused
    /// on every call.
    #[error("{field} is not supported: {reason}")]
    Unsupported {
        field: &'static str,
        reason: &'static str,
    },
    #[error("minted token would be {len} bytes, more than the verifier accepts")]
    TooLarge { len: usize },
    #[error("operating system random source failed")]
    Random,
}

/// Why a master key could not be loaded or generated. Never includes the key.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum KeyError {
    #[error("master key is not valid base64 (standard or url alphabet, padded or not)")]
    NotBase64,
    #[error("master key must decode to at least {min} bytes (got {got})")]
    TooShort { min: usize, got: usize },
    #[error("master key must decode to at most {max} bytes")]
    TooLong { max: usize },
    #[error("operating system random source failed")]
    Random,
}

/// A request-supplied name, cut to a length fit for an error message.
pub(crate) fn echo(name: &str) -> String {
    cut(name, ECHO_MAX)
}

/// `s`, cut at a character boundary to at most `max` bytes (and `…` where it was cut).
pub(crate) fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_truncates_on_char_boundary() {
        assert_eq!(echo("abc"), "abc");
        let long = "é".repeat(40); // 80 bytes
        let cut = echo(&long);
        assert!(cut.ends_with('…'));
        assert!(cut.len() <= ECHO_MAX + '…'.len_utf8());
        assert_eq!(super::cut("tool", 8), "tool");
        assert_eq!(
            super::cut(&"x".repeat(1 << 20), 512).len(),
            512 + '…'.len_utf8()
        );
        assert_eq!(super::cut("aé", 2), "a…");
    }

    #[test]
    fn messages_are_short_reasons() {
        let e = CapabilityError::ToolNotAllowed {
            tool: "x".into(),
            caveat: 2,
        };
        assert_eq!(
            e.to_string(),
            "tool \"x\" not allowed by caveat 2 (tool_allow)"
        );
        assert_eq!(
            CapabilityError::Expired { caveat: 1 }.to_string(),
            "token expired (caveat 1, exp)"
        );
    }
}
