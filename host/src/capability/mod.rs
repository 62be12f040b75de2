//! Capability tokens (IntentGate schema v4): format, mint, verify, attenuation rules, revocation.
//!
//! A token is base64url JSON signed with a macaroon-style HMAC-SHA256 chain rooted in the
//! [`MasterKey`]; holders may append caveats (attenuate) but never remove one. See
//! `shared/design/WIRE.md` for the wire contract. Verification is split in two so the MCP layer
//! can authenticate every method and check tool calls separately:
//!
//! 1. [`Verifier::authenticate`]: decode, signature, `nbf`, `exp`, `agent_lock`, caveat shape,
//!    revocation (and its freshness) → a [`Grant`];
//! 2. [`Grant::authorize`]: `tool_allow`, `tool_deny`, `resource_allow`, `resource_deny`,
//!    `prompt_allow`, `prompt_deny`, `mcp_allow`, `callee_allow`, `risk_max` and the requesting
//!    agent for one [`CallContext`] (a tool, resource or prompt: its [`Kind`]);
//!    [`Grant::allows`] filters the lists.
//!
//! Stateful limits (`max_calls`, `rate_limit`, `max_cost`, `step_up`) are surfaced on the grant
//! (minimum along the chain) for the budget and policy stages; they are not enforced here.
//!
//! This module must never panic on any input, never accept what it cannot fully check (unknown
//! caveat, unknown field, stale revocation list), never compare secrets in variable time, and
//! never print the key or a token.
//!
//! # Files
//!
//! | file | what |
//! |---|---|
//! | `key.rs` | [`MasterKey`] |
//! | `token.rs` | [`Token`], [`Caveat`]: decoding, encoding, signature chain, attenuation |
//! | `canonical.rs` | the Go-compatible canonical JSON the chain signs |
//! | `mint.rs` | [`MintRequest`], [`mint`] |
//! | `verify.rs` | [`Verifier`] |
//! | `grant.rs` | [`Grant`], [`CallContext`] |
//! | `glob.rs` | [`Glob`] patterns for tool, server and callee names |
//! | `revocation.rs` | [`RevocationSet`] |
//! | `error.rs` | [`CapabilityError`], [`MintError`], [`KeyError`] |
//! | `tests/` | cross-file unit tests: known answers, every caveat, tampering |

mod canonical;
mod error;
mod glob;
pub(crate) use error::cut;
mod grant;
mod key;
mod mint;
mod revocation;
mod token;
pub mod uri;
mod verify;

#[cfg(test)]
mod tests;

pub use error::{CapabilityError, KeyError, MintError};
pub use glob::Glob;
pub use grant::{CallContext, Grant, Kind};
pub use key::{GENERATED_KEY_BYTES, MIN_KEY_BYTES, MasterKey};
pub use mint::{DEFAULT_TENANT, DEFAULT_ZONE, ISSUER, MintRequest, Minted, is_valid_name, mint};
pub use revocation::RevocationSet;
pub use token::{Caveat, TOKEN_VERSION, Token};
pub use verify::Verifier;

/// Longest bearer token accepted (and minted), in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Most caveats a token may carry.
pub const MAX_CAVEATS: usize = 64;
/// Longest tool, server, agent or zone name a call may present, and longest pattern we mint.
pub const MAX_NAME_BYTES: usize = 512;
/// Longest subject we mint.
pub const MAX_SUBJECT_BYTES: usize = 256;
/// Longest TTL we mint (10 years); omit the TTL for a token without expiry.
pub const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;
/// Default `nbf` clock leeway, in seconds. Leeway never extends `exp`.
pub const DEFAULT_LEEWAY_SECS: i64 = 30;
/// Largest `nbf` clock leeway a [`Verifier`] accepts.
pub const MAX_LEEWAY_SECS: i64 = 300;
