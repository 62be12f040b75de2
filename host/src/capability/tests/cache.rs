//! The verified-token cache (`verify.rs`) changes nothing but the cost: a token seen again
//! is still checked for time, caveats and revocation on every call; only a token that
//! verified under this verifier's key is kept; a one-character change is a new token.

use super::*;

#[test]
fn a_cached_token_is_still_checked_for_time_and_revocation() {
    let m = mint_ok(&MintRequest {
        ttl_seconds: Some(100),
        ..req("bot")
    });
    let v = verifier();
    let set = RevocationSet::always_fresh();
    assert!(v.authenticate(&m.token, NOW, &set).is_ok());
    assert_eq!(v.cached(), 1, "kept once verified");
    assert!(v.authenticate(&m.token, NOW, &set).is_ok(), "seen again");
    assert_eq!(v.cached(), 1);
    // Expired at its second: the cached signature does not carry the time along.
    assert_eq!(
        v.authenticate(&m.token, NOW + 100, &set).err(),
        Some(CapabilityError::Expired { caveat: 1 })
    );
    // Revoked: refused on the very next call.
    set.extend([m.root_jti.clone()]);
    assert_eq!(
        v.authenticate(&m.token, NOW, &set).err(),
        Some(CapabilityError::Revoked)
    );
}

#[test]
fn only_tokens_signed_by_this_key_are_kept() {
    let m = mint_ok(&req("bot"));
    let v = verifier();
    assert!(v.authenticate(&m.token, NOW, &fresh()).is_ok());
    // The same text under another key: refused, the other verifier's cache is not consulted.
    let other = Verifier::new(
        MasterKey::from_bytes(b"fedcba9876543210fedcba9876543210")
            .unwrap_or_else(|e| panic!("{e}")),
        DEFAULT_LEEWAY_SECS,
    );
    assert_eq!(
        other.authenticate(&m.token, NOW, &fresh()).err(),
        Some(CapabilityError::BadSignature)
    );
    assert_eq!(
        other.authenticate(&m.token, NOW, &fresh()).err(),
        Some(CapabilityError::BadSignature),
        "a refusal is not kept"
    );
    assert_eq!(other.cached(), 0, "nothing kept from a refusal");
    // A forged variant of a cached token (its caveats edited, the signature kept) is a new
    // text, verified from scratch, and refused.
    let forged = edit_json(&m.token, |t| t["sub"] = Value::from("root"));
    assert_ne!(forged, m.token);
    assert_eq!(
        v.authenticate(&forged, NOW, &fresh()).err(),
        Some(CapabilityError::BadSignature)
    );
    assert_eq!(v.cached(), 1, "the forgery was not kept");
    // An attenuated child verifies on its own (its own text) and keeps its narrower grant.
    let child = attenuate(&m.token, vec![Caveat::tool_allow(["a"])]);
    let g = v
        .authenticate(&child, NOW, &fresh())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(g.authorize(&CallContext::tool("a")).is_ok());
    assert!(g.authorize(&CallContext::tool("b")).is_err());
    let parent = v
        .authenticate(&m.token, NOW, &fresh())
        .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        parent.authorize(&CallContext::tool("b")).is_ok(),
        "the parent's grant is its own"
    );
}

/// A full cache gives up one entry for each new one: thousands of attenuations of one token,
/// each a valid token of its own, leave the cache full, not emptied shard after shard.
#[test]
fn a_full_cache_gives_up_one_entry_at_a_time() {
    let m = mint_ok(&req("bot"));
    let v = verifier();
    for i in 0..6_000 {
        let t = attenuate(&m.token, vec![Caveat::tool_allow([format!("t{i}")])]);
        assert!(v.authenticate(&t, NOW, &fresh()).is_ok());
    }
    assert_eq!(v.cached(), 8 * 512, "every shard full");
}
