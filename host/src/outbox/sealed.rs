//! Destination secrets at rest (webhook secrets, SIEM tokens, cloud keys): sealed with
//! ChaCha20-Poly1305 under a key derived from the gateway's master key, the destination id as
//! associated data, so a database dump alone reveals none of them and a sealed secret cannot be
//! moved to another destination's row.
//!
//! A stored value without the seal prefix is a secret written before sealing existed: it is
//! read as it is and sealed the next time the destination is saved. This module must never log
//! or return a secret in an error.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD_NO_PAD;
use hmac::{Hmac, Mac};
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use sha2::Sha256;

use super::OutboxError;

const PREFIX: &str = "igsec1:";

/// Seals and opens destination secrets.
pub struct SecretSeal {
    key: LessSafeKey,
    /// The key of the master key's text as given before it was trimmed, when that differed:
    /// secrets sealed under it still open.
    legacy: Option<LessSafeKey>,
}

impl std::fmt::Debug for SecretSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretSeal(..)")
    }
}

fn key_of(master_key: &[u8]) -> LessSafeKey {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(master_key).expect("HMAC accepts any key length");
    mac.update(b"intentgate/outbox-destination-secrets/v1");
    let bytes = mac.finalize().into_bytes();
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("a 32-byte key"))
}

impl SecretSeal {
    /// The seal of this gateway's master key material (every replica derives the same).
    pub fn derive(master_key: &[u8]) -> Self {
        Self {
            key: key_of(master_key),
            legacy: None,
        }
    }

    /// [`Self::derive`], also opening what was sealed under `legacy` (the master key's text
    /// before it was trimmed); new seals use `master_key`.
    pub fn with_legacy(mut self, legacy: Option<&[u8]>) -> Self {
        self.legacy = legacy.map(key_of);
        self
    }

    /// The stored form of `secret` for destination `id`.
    pub fn seal(&self, id: &str, secret: &str) -> Result<String, OutboxError> {
        let mut nonce = [0u8; NONCE_LEN];
        getrandom::fill(&mut nonce)
            .map_err(|_| OutboxError::Invalid("no randomness to seal a secret".into()))?;
        let mut data = secret.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut data,
            )
            .map_err(|_| OutboxError::Invalid("a secret could not be sealed".into()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{PREFIX}{}", STANDARD_NO_PAD.encode(out)))
    }

    /// The secret of destination `id` from its stored form.
    pub fn open(&self, id: &str, stored: &str) -> Result<String, OutboxError> {
        let Some(sealed) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_owned());
        };
        let corrupt =
            || OutboxError::Corrupt(format!("the secret of destination {id} cannot be opened"));
        let bytes = STANDARD_NO_PAD.decode(sealed).map_err(|_| corrupt())?;
        if bytes.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, rest) = bytes.split_at(NONCE_LEN);
        for key in std::iter::once(&self.key).chain(&self.legacy) {
            let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt())?;
            let mut data = rest.to_vec();
            if let Ok(plain) = key.open_in_place(nonce, Aad::from(id.as_bytes()), &mut data) {
                return String::from_utf8(plain.to_vec()).map_err(|_| corrupt());
            }
        }
        Err(corrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A master key given with a trailing newline (a Secret file) seals as the trimmed key
    /// does, and what was sealed under the untrimmed text before still opens.
    #[test]
    fn the_untrimmed_master_key_still_opens_what_it_sealed() {
        let before = SecretSeal::derive(b"K0123456789\n");
        let stored = before.seal("d", "whsec_x").expect("seal");
        let now = SecretSeal::derive(b"K0123456789").with_legacy(Some(b"K0123456789\n"));
        assert_eq!(now.open("d", &stored).expect("legacy opens"), "whsec_x");
        let fresh = now.seal("d", "whsec_y").expect("seal");
        let trimmed_only = SecretSeal::derive(b"K0123456789");
        assert_eq!(trimmed_only.open("d", &fresh).expect("open"), "whsec_y");
        assert!(
            trimmed_only.open("d", &stored).is_err(),
            "without the fallback"
        );
    }

    #[test]
    fn secrets_round_trip_and_are_bound_to_their_destination_and_key() {
        let seal = SecretSeal::derive(b"master key one");
        let stored = seal.seal("dest-a", "whsec_c2VjcmV0").expect("seal");
        assert!(stored.starts_with(PREFIX));
        assert!(!stored.contains("c2VjcmV0"), "{stored}");
        assert_ne!(
            stored,
            seal.seal("dest-a", "whsec_c2VjcmV0").expect("seal"),
            "fresh nonce"
        );
        assert_eq!(
            seal.open("dest-a", &stored).expect("open"),
            "whsec_c2VjcmV0"
        );
        assert!(
            seal.open("dest-b", &stored).is_err(),
            "moved to another row"
        );
        let other = SecretSeal::derive(b"master key two");
        assert!(other.open("dest-a", &stored).is_err(), "another master key");
        let mut tampered = stored.clone();
        tampered.pop();
        assert!(seal.open("dest-a", &tampered).is_err());
        // A secret stored before sealing existed is read as is.
        assert_eq!(seal.open("dest-a", "plain").expect("legacy"), "plain");
    }
}
