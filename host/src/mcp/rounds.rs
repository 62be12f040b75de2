//! Multi-round tool calls (2026-07-28 `InputRequiredResult`): the gateway's seal around the
//! upstream's `requestState`.
//!
//! When a tool answers "input required", the client retries the same call with its answers and
//! the echoed `requestState`. The gateway hands out its own state instead of the upstream's: a
//! signed value that carries the upstream's state plus what links the rounds (the first
//! round's audit event, the round number) and binds them to one call (tenant, token, tool,
//! arguments digest). So every round is authorized again, a retry cannot smuggle another tool
//! or other arguments under a paid-for call, budgets are charged once, and the audit shows one
//! call with linked rounds. Any replica sharing the master key can open the seal. This module
//! must never return an upstream state whose seal it has not verified in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::session::SessionKeys;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "igr1";
/// A round must be answered within this many seconds of the previous one.
pub const MAX_AGE_SECS: i64 = 15 * 60;
/// Bound on a sealed state presented by a client.
const MAX_LEN: usize = 64 * 1024;

/// What links the rounds of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundState {
    pub tenant: String,
    pub jti: String,
    pub tool: String,
    /// SHA-256 (base64url) of the RFC 8785 form of the call's arguments.
    pub args_digest: String,
    /// The audit event id of the call's first round.
    pub call_event: i64,
    /// The round that produced this state (1 for the first call).
    pub round: u32,
    pub issued_at: i64,
    /// The upstream's own `requestState`, byte-exact.
    pub inner: Option<String>,
}

/// Why a presented `requestState` was refused (the client sees one frozen message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoundError {
    #[error("requestState is not one the gateway issued")]
    Forged,
    #[error("requestState expired")]
    Expired,
    #[error("requestState belongs to another call")]
    OtherCall,
}

/// Seals and opens round states.
#[derive(Clone)]
pub struct RoundSeal {
    /// The HMAC keyed once with the round-state key.
    keyed: HmacSha256,
}

/// The digest that binds a state to the call's arguments.
pub fn args_digest(arguments: &Value) -> String {
    let canonical = crate::audit::jcs::canonicalize(arguments);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

impl RoundSeal {
    pub fn new(sessions: &SessionKeys) -> Self {
        Self {
            keyed: sessions.round_mac(),
        }
    }

    fn mac(&self, body: &str) -> Option<HmacSha256> {
        let mut mac = self.keyed.clone();
        mac.update(body.as_bytes());
        Some(mac)
    }

    /// The value handed to the client as `requestState`.
    pub fn seal(&self, s: &RoundState) -> String {
        let payload = json!([
            s.tenant,
            s.jti,
            s.tool,
            s.args_digest,
            s.call_event,
            s.round,
            s.issued_at,
            s.inner
        ]);
        let body = format!(
            "{PREFIX}.{}",
            URL_SAFE_NO_PAD.encode(payload.to_string().as_bytes())
        );
        let tag = self
            .mac(&body)
            .map(|m| URL_SAFE_NO_PAD.encode(m.finalize().into_bytes()))
            .unwrap_or_default();
        format!("{body}.{tag}")
    }

    /// Opens a state the client echoed and checks it belongs to this call and is fresh.
    pub fn open(
        &self,
        presented: &str,
        expect: &RoundState,
        now: i64,
    ) -> Result<RoundState, RoundError> {
        if presented.len() > MAX_LEN {
            return Err(RoundError::Forged);
        }
        let (body, tag) = presented.rsplit_once('.').ok_or(RoundError::Forged)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| RoundError::Forged)?;
        self.mac(body)
            .ok_or(RoundError::Forged)?
            .verify_slice(&tag)
            .map_err(|_| RoundError::Forged)?;
        let payload = body
            .strip_prefix(PREFIX)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or(RoundError::Forged)?;
        let raw = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| RoundError::Forged)?;
        let v: Value = serde_json::from_slice(&raw).map_err(|_| RoundError::Forged)?;
        let a = v.as_array().ok_or(RoundError::Forged)?;
        let s = |i: usize| a.get(i).and_then(Value::as_str).map(str::to_owned);
        let state = (|| {
            Some(RoundState {
                tenant: s(0)?,
                jti: s(1)?,
                tool: s(2)?,
                args_digest: s(3)?,
                call_event: a.get(4)?.as_i64()?,
                round: u32::try_from(a.get(5)?.as_u64()?).ok()?,
                issued_at: a.get(6)?.as_i64()?,
                inner: match a.get(7)? {
                    Value::Null => None,
                    Value::String(x) => Some(x.clone()),
                    _ => return None,
                },
            })
        })()
        .ok_or(RoundError::Forged)?;
        if now - state.issued_at > MAX_AGE_SECS || state.issued_at > now + 60 {
            return Err(RoundError::Expired);
        }
        if state.tenant != expect.tenant
            || state.jti != expect.jti
            || state.tool != expect.tool
            || state.args_digest != expect.args_digest
        {
            return Err(RoundError::OtherCall);
        }
        Ok(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> RoundState {
        RoundState {
            tenant: "acme".into(),
            jti: "j1".into(),
            tool: "confirm".into(),
            args_digest: args_digest(&json!({"b": 1, "a": "x"})),
            call_event: 42,
            round: 1,
            issued_at: 1_000,
            inner: Some("upstream-state".into()),
        }
    }

    #[test]
    fn seal_round_trip_across_replicas() {
        let a = RoundSeal::new(&SessionKeys::derive(b"master"));
        let b = RoundSeal::new(&SessionKeys::derive(b"master"));
        let sealed = a.seal(&state());
        assert_eq!(b.open(&sealed, &state(), 1_010), Ok(state()));
        // Key order of the arguments does not matter.
        assert_eq!(args_digest(&json!({"a": "x", "b": 1})), state().args_digest);
    }

    #[test]
    fn forged_expired_or_foreign_states_are_refused() {
        let a = RoundSeal::new(&SessionKeys::derive(b"master"));
        let other = RoundSeal::new(&SessionKeys::derive(b"other"));
        let sealed = a.seal(&state());
        assert_eq!(
            other.open(&sealed, &state(), 1_010),
            Err(RoundError::Forged)
        );
        assert_eq!(
            a.open("upstream-state", &state(), 1_010),
            Err(RoundError::Forged)
        );
        let mut tampered = sealed.clone();
        tampered.insert(7, 'A');
        assert_eq!(a.open(&tampered, &state(), 1_010), Err(RoundError::Forged));
        assert_eq!(
            a.open(&sealed, &state(), 1_000 + MAX_AGE_SECS + 1),
            Err(RoundError::Expired)
        );
        let mut another = state();
        another.tool = "delete_records".into();
        assert_eq!(a.open(&sealed, &another, 1_010), Err(RoundError::OtherCall));
        let mut other_args = state();
        other_args.args_digest = args_digest(&json!({"a": "y", "b": 1}));
        assert_eq!(
            a.open(&sealed, &other_args, 1_010),
            Err(RoundError::OtherCall)
        );
    }
}
