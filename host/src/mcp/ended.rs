//! Ended handshake-era sessions: `DELETE /v1/mcp` with an `Mcp-Session-Id` ends that session on
//! every replica.
//!
//! Session ids are self-contained and signed ([`super::session`]), so any replica accepts one
//! without a lookup; ending one therefore needs a shared list of ended ids. It lives in the
//! store's session table (`mcp_sessions`), one row per ended id, keyed by a digest of the id
//! (`ended:<base64url(SHA-256(id))>`, a fixed length whatever the id's), kept for
//! [`RETENTION_SECS`], or longer when the ending token expires later (a session is bound to a
//! token id, which attenuated children share with their root, so the ending token's own expiry
//! does not bound the session's). Session ids carry no expiry of their own yet, so an id ended
//! more than [`RETENTION_SECS`] ago by a token that is still valid would be accepted again.
//! Expired rows are pruned when a session is ended. A request
//! presenting a session id is checked against the list (one indexed read; the SQLite store
//! remembers the ids it has no row for, `store/absent.rs`, and PostgreSQL answers concurrent
//! reads with one query, `store/session_reads.rs`); when the store cannot answer, the request
//! is refused rather than served on a possibly ended session. This module must never accept a
//! session whose end it could not rule out.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use sha2::{Digest, Sha256};

use super::session::SessionClaims;
use crate::store::{SessionRecord, Store, StoreError};

/// How long an ended id is remembered when its token has no expiry (a year).
pub const RETENTION_SECS: i64 = 365 * 24 * 3600;

/// Marks the row as an ended session, not a live one.
const ENDED: &str = "ended";

/// The row id of an ended session id.
pub fn key(session_id: &str) -> String {
    format!(
        "{ENDED}:{}",
        URL_SAFE_NO_PAD.encode(Sha256::digest(session_id.as_bytes()))
    )
}

/// Records that `session_id` (with `claims`, already verified) has ended, for
/// [`RETENTION_SECS`] or until `token_expires_at` when later. Idempotent.
pub async fn end(
    store: &dyn Store,
    session_id: &str,
    claims: &SessionClaims,
    token_expires_at: Option<i64>,
    now: i64,
) -> Result<(), StoreError> {
    let record = SessionRecord {
        id: key(session_id),
        tenant: claims.tenant.clone(),
        token_jti: claims.jti.clone(),
        upstream_session: None,
        protocol_version: ENDED.to_owned(),
        created_at: now,
        expires_at: token_expires_at
            .unwrap_or(0)
            .max(now.saturating_add(RETENTION_SECS)),
    };
    store.put_session(&record).await?;
    if let Err(e) = store.prune_sessions().await {
        tracing::warn!(error = %e, "could not prune expired session records");
    }
    Ok(())
}

/// Whether `session_id` was ended (on any replica).
pub async fn is_ended(store: &dyn Store, session_id: &str) -> Result<bool, StoreError> {
    Ok(store
        .get_session(&key(session_id))
        .await?
        .is_some_and(|r| r.protocol_version == ENDED))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fixed_length_and_distinct() {
        let a = key("igs1.a.b");
        assert_eq!(a.len(), "ended:".len() + 43);
        assert_ne!(a, key("igs1.a.c"));
        assert_eq!(key(&"x".repeat(1000)).len(), a.len());
    }
}
