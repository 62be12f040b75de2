//! The capability token (schema v4): its fields, strict decoding from the bearer string, the
//! wire encoding we mint, the HMAC signature chain and client-side attenuation.
//!
//! Decoding accepts any field order, whitespace and base64url with or without padding (the SDKs
//! re-encode tokens freely) but rejects everything ambiguous: duplicate or unknown fields, wrong
//! types, missing required fields, oversized input. This module must never trust the received
//! bytes for the signature (it re-canonicalizes) and never compare signatures in variable time.

use std::fmt;
use std::marker::PhantomData;

use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::CapabilityError;
use super::key::MasterKey;
use super::{MAX_CAVEATS, MAX_TOKEN_BYTES, canonical};

/// The only schema version accepted.
pub const TOKEN_VERSION: i64 = 4;

/// Base64url, padding optional, canonical trailing bits required (for the outer token).
const URL_LENIENT_PAD: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A decoded token. Field names are the wire names. `Debug` hides `sig`.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    pub v: i64,
    pub jti: String,
    pub root_jti: String,
    pub iss: String,
    pub tenant: String,
    pub zone: String,
    pub sub: String,
    pub iat: i64,
    /// Not-before (unix seconds); 0 when absent.
    pub nbf: i64,
    pub cav: Vec<Caveat>,
    /// Base64url (no padding) of the last HMAC of the chain.
    pub sig: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("v", &self.v)
            .field("jti", &self.jti)
            .field("root_jti", &self.root_jti)
            .field("iss", &self.iss)
            .field("tenant", &self.tenant)
            .field("zone", &self.zone)
            .field("sub", &self.sub)
            .field("iat", &self.iat)
            .field("nbf", &self.nbf)
            .field("cav", &self.cav)
            .field("sig", &"<redacted>")
            .finish()
    }
}

/// The token as it may appear on the wire (private: decoding goes through [`Token::decode`]).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireToken {
    v: i64,
    jti: String,
    root_jti: String,
    iss: String,
    tenant: String,
    zone: String,
    sub: String,
    iat: i64,
    #[serde(default)]
    nbf: i64,
    #[serde(default)]
    cav: Vec<MapOnly<Caveat>>,
    sig: String,
}

/// Accepts `T` only from a JSON object: serde's derived structs would also take an array of
/// field values in declaration order, a second spelling of the same token we do not want.
struct MapOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData)).map(MapOnly)
    }
}

/// One caveat as on the wire: a tagged union whose unused fields are empty/zero.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caveat {
    pub t: String,
    #[serde(default)]
    pub tools: Vec<String>,
    #[serde(default)]
    pub agent: String,
    #[serde(default)]
    pub exp: i64,
    #[serde(default)]
    pub max_calls: i64,
    #[serde(default)]
    pub step_up_at: i64,
    #[serde(default)]
    pub callees: Vec<String>,
    #[serde(default)]
    pub callee_zones: Vec<String>,
    #[serde(default)]
    pub servers: Vec<String>,
    #[serde(default)]
    pub rate_per_min: i64,
    #[serde(default)]
    pub max_cents: i64,
    #[serde(default)]
    pub risk_max: i64,
}

impl Caveat {
    /// A caveat of type `t` with every other field empty.
    pub fn bare(t: &str) -> Caveat {
        Caveat {
            t: t.to_owned(),
            ..Caveat::default()
        }
    }
    pub fn agent_lock(agent: &str) -> Caveat {
        Caveat {
            agent: agent.to_owned(),
            ..Caveat::bare("agent_lock")
        }
    }
    pub fn exp(at_unix: i64) -> Caveat {
        Caveat {
            exp: at_unix,
            ..Caveat::bare("exp")
        }
    }
    pub fn tool_allow<S: Into<String>>(tools: impl IntoIterator<Item = S>) -> Caveat {
        Caveat {
            tools: tools.into_iter().map(Into::into).collect(),
            ..Caveat::bare("tool_allow")
        }
    }
    pub fn tool_deny<S: Into<String>>(tools: impl IntoIterator<Item = S>) -> Caveat {
        Caveat {
            tools: tools.into_iter().map(Into::into).collect(),
            ..Caveat::bare("tool_deny")
        }
    }
    /// A list caveat (`tool_allow`, `tool_deny`, `resource_allow`, `resource_deny`,
    /// `prompt_allow` or `prompt_deny`: `t`), its globs carried in `tools`.
    pub fn scoped<S: Into<String>>(t: &str, globs: impl IntoIterator<Item = S>) -> Caveat {
        Caveat {
            tools: globs.into_iter().map(Into::into).collect(),
            ..Caveat::bare(t)
        }
    }
    pub fn max_calls(n: i64) -> Caveat {
        Caveat {
            max_calls: n,
            ..Caveat::bare("max_calls")
        }
    }
}

impl Token {
    /// Decodes a bearer string: size bound, base64url (padding optional), strict JSON, `v == 4`,
    /// caveat count bound. Does not check the signature or any caveat.
    pub fn decode(bearer: &str) -> Result<Token, CapabilityError> {
        let bearer = bearer.trim_matches(|c: char| c.is_ascii_whitespace());
        if bearer.is_empty() {
            return Err(CapabilityError::Missing);
        }
        if bearer.len() > MAX_TOKEN_BYTES {
            return Err(CapabilityError::TooLarge { len: bearer.len() });
        }
        let json = URL_LENIENT_PAD
            .decode(bearer)
            .map_err(|_| CapabilityError::Malformed("not base64url".into()))?;
        let MapOnly(w) = serde_json::from_slice::<MapOnly<WireToken>>(&json)
            .map_err(|e| CapabilityError::Malformed(json_reason(&e)))?;
        let token = Token {
            v: w.v,
            jti: w.jti,
            root_jti: w.root_jti,
            iss: w.iss,
            tenant: w.tenant,
            zone: w.zone,
            sub: w.sub,
            iat: w.iat,
            nbf: w.nbf,
            cav: w.cav.into_iter().map(|MapOnly(c)| c).collect(),
            sig: w.sig,
        };
        if token.v != TOKEN_VERSION {
            return Err(CapabilityError::UnsupportedVersion(token.v));
        }
        if token.cav.len() > MAX_CAVEATS {
            return Err(CapabilityError::TooManyCaveats(token.cav.len()));
        }
        for (field, value) in [
            ("jti", &token.jti),
            ("root_jti", &token.root_jti),
            ("tenant", &token.tenant),
            ("zone", &token.zone),
            ("sub", &token.sub),
        ] {
            if value.is_empty() {
                return Err(CapabilityError::Malformed(format!("empty {field}")));
            }
        }
        if token.iat == 0 {
            return Err(CapabilityError::Malformed("missing iat".into()));
        }
        Ok(token)
    }

    /// The bearer string: base64url (no padding) of the token as Go marshals it.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(canonical::token(self))
    }

    /// Recomputes the signature chain under `key` and sets `sig` (used by mint).
    pub(crate) fn sign(&mut self, key: &MasterKey) {
        self.sig = URL_SAFE_NO_PAD.encode(self.chain(key));
    }

    /// Checks `sig` against the chain recomputed under `key`, in constant time.
    pub fn verify_signature(&self, key: &MasterKey) -> Result<(), CapabilityError> {
        let presented = decode_sig(&self.sig)?;
        if bool::from(presented.ct_eq(&self.chain(key))) {
            Ok(())
        } else {
            Err(CapabilityError::BadSignature)
        }
    }

    /// Appends `caveat` without the master key: `sig' = HMAC(sig, canonical(caveat))`.
    /// The child keeps `jti` and `root_jti`, as the SDKs do.
    pub fn attenuate(&self, caveat: Caveat) -> Result<Token, CapabilityError> {
        let parent = decode_sig(&self.sig)?;
        let mut child = self.clone();
        let sig = hmac_sha256(&parent, &canonical::caveat(&caveat));
        child.cav.push(caveat);
        child.sig = URL_SAFE_NO_PAD.encode(sig);
        Ok(child)
    }

    fn chain(&self, key: &MasterKey) -> [u8; 32] {
        let mut sig = hmac_sha256(key.bytes(), &canonical::payload(self));
        for c in &self.cav {
            sig = hmac_sha256(&sig, &canonical::caveat(c));
        }
        sig
    }
}

/// `sig` must be the canonical unpadded base64url form of exactly 32 bytes.
fn decode_sig(sig: &str) -> Result<[u8; 32], CapabilityError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| CapabilityError::MalformedSignature)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| CapabilityError::MalformedSignature)
}

/// HMAC-SHA256 for any key length, without a fallible constructor: keys longer than the block
/// are hashed first and shorter ones zero-padded, exactly as RFC 2104 (and `new_from_slice`) do.
pub(crate) fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > block.len() {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new(&block.into());
    mac.update(msg);
    mac.finalize().into_bytes().into()
}

/// A short, bounded reason from a serde_json error (it may quote a piece of the caller's input).
fn json_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    // serde_json appends " at line L column C"; keep the reason, which names fields and types.
    let reason = msg.split(" at line ").next().unwrap_or("invalid JSON");
    let mut out: String = reason.chars().take(120).collect();
    if out.is_empty() {
        out.push_str("invalid JSON");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc4231() {
        // RFC 4231 test case 2 (short key) and 6 (key longer than the block).
        let t2 = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&t2),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let key = [0xaau8; 131];
        let t6 = hmac_sha256(
            &key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex(&t6),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
        let key64 = [0x0bu8; 64];
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&key64).expect("any length");
        mac.update(b"x");
        assert_eq!(
            hmac_sha256(&key64, b"x"),
            <[u8; 32]>::from(mac.finalize().into_bytes())
        );
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn signature_encoding_must_be_canonical() {
        let good = URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert!(decode_sig(&good).is_ok());
        assert_eq!(
            decode_sig(&format!("{good}=")),
            Err(CapabilityError::MalformedSignature)
        );
        assert_eq!(
            decode_sig(&good[..42]),
            Err(CapabilityError::MalformedSignature)
        );
        assert_eq!(
            decode_sig(&URL_SAFE_NO_PAD.encode([7u8; 31])),
            Err(CapabilityError::MalformedSignature)
        );
        // Same 32 bytes, but non-zero trailing bits in the last character.
        let last = good.as_bytes()[42];
        let alt = match last {
            b'A'..=b'Y' => last + 1,
            _ => b'B',
        };
        let mut tweaked = good.clone().into_bytes();
        tweaked[42] = alt;
        let tweaked = String::from_utf8(tweaked).expect("ascii");
        assert_eq!(
            decode_sig(&tweaked),
            Err(CapabilityError::MalformedSignature)
        );
        let std_alphabet = good.replace('-', "+").replace('_', "/");
        if std_alphabet != good {
            assert_eq!(
                decode_sig(&std_alphabet),
                Err(CapabilityError::MalformedSignature)
            );
        }
    }

    #[test]
    fn json_reason_is_bounded() {
        let e = serde_json::from_str::<MapOnly<WireToken>>(&format!(
            "{{\"v\":\"{}\"}}",
            "x".repeat(5000)
        ))
        .err()
        .expect("type error");
        let r = json_reason(&e);
        assert!(r.chars().count() <= 120, "{r}");
        assert!(!r.contains(" at line "));
    }
}
