//! Webhook signatures: the Standard Webhooks scheme (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">`, secrets `whsec_<base64>`)
//! so a receiver can refuse a replay outside its tolerance window, plus the original gateway's
//! `X-IntentGate-Signature: sha256=<hex HMAC-SHA256 of the body>` so existing receivers keep
//! verifying.
//!
//! Keys: a `whsec_…` secret signs Standard Webhooks with its base64-decoded bytes; any other
//! secret signs with its bytes as given. `X-IntentGate-Signature` always uses the secret's bytes
//! as configured (what the original's receivers compare with). This module must never log or
//! return a secret.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable_hmac(),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

#[cold]
fn unreachable_hmac() -> ! {
    // `Hmac::new_from_slice` only fails for fixed-size-key MACs; HMAC takes any key length.
    panic!("HMAC-SHA256 refused a key")
}

/// The Standard Webhooks key of `secret`.
fn standard_key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD
            .decode(b64.trim())
            .unwrap_or_else(|_| secret.as_bytes().to_vec()),
        None => secret.as_bytes().to_vec(),
    }
}

/// Whether a `whsec_` secret decodes (checked when a destination is configured).
pub fn valid_secret(secret: &str) -> bool {
    match secret.strip_prefix("whsec_") {
        Some(b64) => STANDARD.decode(b64.trim()).is_ok_and(|k| !k.is_empty()),
        None => !secret.is_empty(),
    }
}

/// The signature headers of one webhook request.
pub fn headers(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Vec<(String, String)> {
    let ts = timestamp.to_string();
    let standard = hmac(
        &standard_key(secret),
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body],
    );
    let legacy = hmac(secret.as_bytes(), &[body]);
    vec![
        ("webhook-id".into(), id.to_owned()),
        ("webhook-timestamp".into(), ts),
        (
            "webhook-signature".into(),
            format!("v1,{}", STANDARD.encode(standard)),
        ),
        (
            "x-intentgate-signature".into(),
            format!("sha256={}", crate::audit::key::hex::encode(&legacy)),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_vector() {
        // The example of the Standard Webhooks specification (and its libraries' tests).
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        let h = headers(secret, id, 1614265330, body);
        assert_eq!(h[2].1, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_eq!(h[0].1, id);
        assert_eq!(h[1].1, "1614265330");
        assert!(h[3].1.starts_with("sha256=") && h[3].1.len() == 7 + 64);
        assert!(valid_secret(secret));
        assert!(!valid_secret("whsec_***"));
    }
}
