//! The master key that roots every token's HMAC chain.
//!
//! Loaded from base64 in either alphabet, padded or not (as the original accepts), at least
//! [`MIN_KEY_BYTES`] bytes; or generated from the OS random source. This module must never print,
//! log or compare the key in variable time: `Debug`/`Display` are redacted, there is no
//! `PartialEq`, and the only way to get the bytes out is the explicitly named
//! [`MasterKey::expose_base64`] (for the secrets module that persists it).

use std::fmt;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use sha2::{Digest, Sha256};

use super::error::KeyError;

/// Shortest accepted key, in decoded bytes.
pub const MIN_KEY_BYTES: usize = 16;
/// Longest accepted key, in decoded bytes (a sanity bound on configuration input).
pub const MAX_KEY_BYTES: usize = 1024;
/// Length of a generated key.
pub const GENERATED_KEY_BYTES: usize = 32;

const LENIENT: GeneralPurposeConfig =
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
const STD_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
const URL_ANY_PAD: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);

/// The gateway's HMAC master key.
#[derive(Clone)]
pub struct MasterKey {
    bytes: Box<[u8]>,
}

impl MasterKey {
    /// Parses base64 (standard or url alphabet, padded or not; surrounding whitespace ignored).
    pub fn from_base64(text: &str) -> Result<MasterKey, KeyError> {
        let text = text.trim();
        let bytes = STD_ANY_PAD
            .decode(text)
            .or_else(|_| URL_ANY_PAD.decode(text))
            .map_err(|_| KeyError::NotBase64)?;
        MasterKey::from_bytes(&bytes)
    }

    /// Uses raw key bytes (length-checked).
    pub fn from_bytes(bytes: &[u8]) -> Result<MasterKey, KeyError> {
        if bytes.len() < MIN_KEY_BYTES {
            return Err(KeyError::TooShort {
                min: MIN_KEY_BYTES,
                got: bytes.len(),
            });
        }
        if bytes.len() > MAX_KEY_BYTES {
            return Err(KeyError::TooLong { max: MAX_KEY_BYTES });
        }
        Ok(MasterKey {
            bytes: bytes.into(),
        })
    }

    /// A fresh key of [`GENERATED_KEY_BYTES`] random bytes.
    pub fn generate() -> Result<MasterKey, KeyError> {
        let mut bytes = [0u8; GENERATED_KEY_BYTES];
        getrandom::fill(&mut bytes).map_err(|_| KeyError::Random)?;
        MasterKey::from_bytes(&bytes)
    }

    /// The key as unpadded base64url, for writing it to its 0600 file. Handle with care.
    pub fn expose_base64(&self) -> String {
        URL_SAFE_NO_PAD.encode(&self.bytes)
    }

    /// A short non-secret identifier of the key (first 8 bytes of a domain-separated SHA-256,
    /// hex), so operators can tell which key a replica runs without seeing it.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"intentgate master key fingerprint\0");
        h.update(&self.bytes);
        h.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(<redacted>)")
    }
}

impl fmt::Display for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted master key>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_every_alphabet_and_padding() {
        // 18 bytes chosen so the encodings contain url/std-specific characters.
        let raw: Vec<u8> = vec![
            0xfb, 0xff, 0xbf, 0xfb, 0xef, 0xfe, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ];
        let std = base64::engine::general_purpose::STANDARD.encode(&raw);
        let url = base64::engine::general_purpose::URL_SAFE.encode(&raw);
        assert!(std.contains('+') || std.contains('/'));
        for text in [
            std.clone(),
            std.trim_end_matches('=').to_owned(),
            url.clone(),
            url.trim_end_matches('=').to_owned(),
            format!(" {std}\n"),
        ] {
            let k = MasterKey::from_base64(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(k.bytes(), raw.as_slice());
        }
    }

    #[test]
    fn rejects_short_long_and_garbage() {
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 15]);
        assert_eq!(
            MasterKey::from_base64(&short).err(),
            Some(KeyError::TooShort { min: 16, got: 15 })
        );
        assert_eq!(
            MasterKey::from_base64("not base64!!").err(),
            Some(KeyError::NotBase64)
        );
        assert_eq!(
            MasterKey::from_base64("").err(),
            Some(KeyError::TooShort { min: 16, got: 0 })
        );
        assert_eq!(
            MasterKey::from_bytes(&[0u8; 1025]).err(),
            Some(KeyError::TooLong { max: 1024 })
        );
        // Mixed alphabets are neither std nor url base64.
        assert_eq!(
            MasterKey::from_base64("ab+cd_efghijklmnopqrstuv").err(),
            Some(KeyError::NotBase64)
        );
    }

    #[test]
    fn never_prints_the_key() {
        let k =
            MasterKey::from_bytes(b"super-secret-key-material").unwrap_or_else(|e| panic!("{e}"));
        for shown in [format!("{k:?}"), format!("{k}"), format!("{:#?}", k)] {
            assert!(!shown.contains("super"), "{shown}");
            assert!(!shown.contains(&k.expose_base64()), "{shown}");
        }
        assert_eq!(k.fingerprint().len(), 16);
    }

    #[test]
    fn generate_is_random_and_round_trips() {
        let a = MasterKey::generate().unwrap_or_else(|e| panic!("{e}"));
        let b = MasterKey::generate().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.bytes().len(), 32);
        assert_ne!(a.bytes(), b.bytes());
        let back = MasterKey::from_base64(&a.expose_base64()).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back.bytes(), a.bytes());
    }
}
