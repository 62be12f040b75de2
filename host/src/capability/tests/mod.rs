//! Unit tests across the capability module, one file per concern: `mint.rs` (known answers,
//! mint → verify, request validation), `caveats.rs` (every caveat type allowed and denied, time
//! boundaries, revocation), `tamper.rs` (decoding strictness, tampering, arbitrary input).
//! Every test here must be able to fail: each rejection is checked against its specific error,
//! next to a control that passes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;

use super::*;

mod cache;
mod caveats;
mod mint;
mod tamper;

pub(super) const NOW: i64 = 1_700_000_000;

pub(super) fn key() -> MasterKey {
    MasterKey::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap_or_else(|e| panic!("{e}"))
}

pub(super) fn verifier() -> Verifier {
    Verifier::new(key(), DEFAULT_LEEWAY_SECS)
}

pub(super) fn fresh() -> RevocationSet {
    RevocationSet::always_fresh()
}

pub(super) fn req(subject: &str) -> MintRequest {
    MintRequest {
        subject: subject.into(),
        ..MintRequest::default()
    }
}

pub(super) fn mint_ok(r: &MintRequest) -> Minted {
    mint(&key(), r, NOW).unwrap_or_else(|e| panic!("mint: {e}"))
}

pub(super) fn auth(token: &str) -> Result<Grant, CapabilityError> {
    verifier().authenticate(token, NOW, &fresh())
}

pub(super) fn grant(token: &str) -> Grant {
    auth(token).unwrap_or_else(|e| panic!("authenticate: {e}"))
}

pub(super) fn decode(token: &str) -> Token {
    Token::decode(token).unwrap_or_else(|e| panic!("decode: {e}"))
}

/// Appends caveats client-side (no master key), as the SDKs do.
pub(super) fn attenuate(token: &str, caveats: Vec<Caveat>) -> String {
    let mut t = decode(token);
    for c in caveats {
        t = t.attenuate(c).unwrap_or_else(|e| panic!("attenuate: {e}"));
    }
    t.encode()
}

/// Re-encodes a token from edited JSON, keeping its (now stale) signature.
pub(super) fn edit_json(token: &str, f: impl FnOnce(&mut Value)) -> String {
    let raw = URL_SAFE_NO_PAD
        .decode(token)
        .unwrap_or_else(|e| panic!("{e}"));
    let mut v: Value = serde_json::from_slice(&raw).unwrap_or_else(|e| panic!("{e}"));
    f(&mut v);
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap_or_default())
}

pub(super) fn raw_b64(json_text: &str) -> String {
    URL_SAFE_NO_PAD.encode(json_text.as_bytes())
}
