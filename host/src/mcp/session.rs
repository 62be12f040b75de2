//! MCP session ids for handshake-era clients (`Mcp-Session-Id`).
//!
//! A session id is self-contained and signed (HMAC-SHA256 under a key derived from the master
//! key), so any replica that shares the master key honours a session opened on another: no
//! sticky sessions and no database round trip. A session is bound to the token that opened it
//! (tenant and token id); presenting it with another token is refused like an unknown session.
//! This module must never accept an id whose tag it has not checked in constant time.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "igs1";

/// The domain label of the multi-round state seal's key.
pub const ROUND_STATE_LABEL: &[u8] = b"intentgate/mcp-round-state/v1";

/// A key for another purpose, derived from the session key with a domain label, so replicas
/// sharing the master key share it too.
fn subkey(keyed: &HmacSha256, label: &[u8]) -> [u8; 32] {
    let mut mac = keyed.clone();
    mac.update(label);
    let mut key = [0u8; 32];
    key.copy_from_slice(&mac.finalize().into_bytes());
    key
}

/// Signs and checks session ids.
#[derive(Clone)]
pub struct SessionKeys {
    /// The HMAC keyed with the session key, cloned for each tag: keying costs two SHA-256
    /// blocks, paid once here instead of on every request that carries a session.
    keyed: HmacSha256,
    /// The HMAC of the multi-round state seal ([`Self::round_mac`]), keyed once.
    round: HmacSha256,
}

/// What a session id carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionClaims {
    pub tenant: String,
    pub jti: String,
    pub protocol_version: String,
    pub issued_at: i64,
    /// The very token that opened the session ([`opener_of`] its digest), so that only it
    /// opens the session's stream or ends the session; an attenuated child shares the `jti`.
    /// `None` in ids issued before it was recorded.
    pub opener: Option<String>,
}

/// The opener recorded in a session id: the first 16 bytes of the token's digest, in hex.
pub fn opener_of(token_digest: &[u8; 32]) -> String {
    token_digest[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl SessionKeys {
    /// Derives the session key from the gateway master key material.
    pub fn derive(master_key: &[u8]) -> Self {
        let mut mac = HmacSha256::new_from_slice(master_key).expect("HMAC accepts any key length");
        mac.update(b"intentgate/mcp-session/v1");
        let mut key = [0u8; 32];
        key.copy_from_slice(&mac.finalize().into_bytes());
        let keyed = HmacSha256::new_from_slice(&key).expect("HMAC accepts any key length");
        let round = HmacSha256::new_from_slice(&subkey(&keyed, ROUND_STATE_LABEL))
            .expect("HMAC accepts any key length");
        Self { keyed, round }
    }

    /// The HMAC of the multi-round state seal (`crate::mcp::rounds`), keyed with the subkey
    /// labelled [`ROUND_STATE_LABEL`].
    pub fn round_mac(&self) -> HmacSha256 {
        self.round.clone()
    }

    fn tag(&self, body: &str) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(body.as_bytes());
        mac
    }

    /// Issues a session id for these claims, with 16 random bytes so ids never repeat.
    pub fn issue(&self, claims: &SessionClaims) -> String {
        let mut nonce = [0u8; 16];
        // Without randomness the id is still unique enough through issued_at; never fail here.
        let _ = getrandom::fill(&mut nonce);
        let payload = serde_json::json!([
            claims.tenant,
            claims.jti,
            claims.protocol_version,
            claims.issued_at,
            URL_SAFE_NO_PAD.encode(nonce),
            claims.opener.as_deref().unwrap_or_default()
        ]);
        let body = format!(
            "{PREFIX}.{}",
            URL_SAFE_NO_PAD.encode(payload.to_string().as_bytes())
        );
        let tag = URL_SAFE_NO_PAD.encode(self.tag(&body).finalize().into_bytes());
        format!("{body}.{tag}")
    }

    /// Checks an id's signature and returns its claims; `None` for anything not issued by us.
    pub fn verify(&self, id: &str) -> Option<SessionClaims> {
        if id.len() > 1024 {
            return None;
        }
        let (body, tag) = id.rsplit_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        self.tag(body).verify_slice(&tag).ok()?;
        let payload = body.strip_prefix(PREFIX)?.strip_prefix('.')?;
        let raw = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
        let a = v.as_array()?;
        Some(SessionClaims {
            tenant: a.first()?.as_str()?.to_owned(),
            jti: a.get(1)?.as_str()?.to_owned(),
            protocol_version: a.get(2)?.as_str()?.to_owned(),
            issued_at: a.get(3)?.as_i64()?,
            opener: a
                .get(5)
                .and_then(serde_json::Value::as_str)
                .filter(|o| !o.is_empty())
                .map(str::to_owned),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> SessionClaims {
        SessionClaims {
            tenant: "acme".into(),
            jti: "abc".into(),
            protocol_version: "2025-11-25".into(),
            issued_at: 1_700_000_000,
            opener: Some(opener_of(&[7; 32])),
        }
    }

    #[test]
    fn round_trip_across_instances_with_same_key() {
        let a = SessionKeys::derive(b"master-key-material");
        let b = SessionKeys::derive(b"master-key-material");
        let id = a.issue(&claims());
        assert_eq!(b.verify(&id), Some(claims()));
        assert_ne!(a.issue(&claims()), id, "ids are unique");
        // An id issued before the opener was recorded still reads, without one.
        let before = SessionClaims {
            opener: None,
            ..claims()
        };
        assert_eq!(b.verify(&a.issue(&before)), Some(before));
    }

    #[test]
    fn forged_or_foreign_ids_are_refused() {
        let a = SessionKeys::derive(b"master-key-material");
        let other = SessionKeys::derive(b"another-master-key");
        let id = a.issue(&claims());
        assert_eq!(other.verify(&id), None);
        let mut tampered = id.clone();
        tampered.insert(6, 'x');
        assert_eq!(a.verify(&tampered), None);
        assert_eq!(a.verify("igs1.e30.AAAA"), None);
        assert_eq!(a.verify(""), None);
        assert_eq!(a.verify(&"a".repeat(5000)), None);
    }
}
