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
}

impl std::fmt::Debug for SecretSeal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretSeal(..)")
    }
}

impl SecretSeal {
    /// The seal of this gateway's master key material (every replica derives the same).
    pub fn derive(master_key: &[u8]) -> Self {
        let mut mac =
            <Hmac<Sha256> as Mac>::new_from_slice(master_key).expect("HMAC accepts any key length");
        mac.update(b"intentgate/outbox-destination-secrets/v1");
        let bytes = mac.finalize().into_bytes();
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).expect("a 32-byte key");
        Self {
            key: LessSafeKey::new(key),
        }
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
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt())?;
        let mut data = rest.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(id.as_bytes()), &mut data)
            .map_err(|_| corrupt())?;
        String::from_utf8(plain.to_vec()).map_err(|_| corrupt())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
