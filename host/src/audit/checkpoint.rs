//! Signed checkpoints of a tenant's chain, in the C2SP tlog-checkpoint / signed-note text format:
//!
//! ```text
//! <origin>
//! <size>
//! <base64 root hash>
//!
//! — <key name> <base64(key id || Ed25519 signature)>
//! ```
//!
//! The origin is `<key name>/<tenant>` (tenant bytes outside `[A-Za-z0-9._~-]` percent-encoded),
//! the size is the number of events in the chain, and the **root hash is the chain head hash after
//! event `size`** (not a Merkle tree root: this log is a hash chain, so there are no inclusion
//! proofs; a verifier re-walks the chain instead). A checkpoint kept outside the database pins the
//! history: a rewritten chain no longer reaches the same hash at `size`, and a cut tail no longer
//! has `size` events.
//!
//! This module must never accept a checkpoint whose signature it did not verify.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use super::AuditError;
use super::key::{LogKey, Verifier};

/// A parsed and signature-checked checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root_hash: [u8; 32],
}

/// The origin line of `tenant`'s chain under `key_name`.
pub fn origin_for(key_name: &str, tenant: &str) -> String {
    let mut out = String::with_capacity(key_name.len() + tenant.len() + 1);
    out.push_str(key_name);
    out.push('/');
    for b in tenant.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b'-') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Checkpoint {
    /// The signed note text for this checkpoint.
    pub fn sign(&self, key: &LogKey) -> String {
        let body = self.body();
        let sig = key.sign_note_text(body.as_bytes());
        format!("{body}\n\u{2014} {} {}\n", key.name(), B64.encode(sig))
    }

    fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root_hash)
        )
    }

    /// Parses a signed note and checks that `verifier` signed it. Other signature lines (from
    /// witnesses or other keys) are ignored; at least one must be by `verifier`.
    pub fn open(note: &str, verifier: &Verifier) -> Result<Self, AuditError> {
        let bad = |what: &str| AuditError::InvalidCheckpoint(what.to_owned());
        let note = note.replace("\r\n", "\n");
        let (body, sigs) = note
            .split_once("\n\n")
            .ok_or_else(|| bad("no blank line before the signatures"))?;
        let body = format!("{body}\n");
        let mut signed = false;
        for line in sigs.lines().filter(|l| !l.is_empty()) {
            let rest = line
                .strip_prefix("\u{2014} ")
                .ok_or_else(|| bad("signature line must start with an em dash"))?;
            let (name, sig) = rest
                .split_once(' ')
                .ok_or_else(|| bad("malformed signature line"))?;
            if name != verifier.name() {
                continue;
            }
            let sig = B64
                .decode(sig.trim())
                .map_err(|_| bad("signature is not base64"))?;
            if verifier.verify_note_sig(body.as_bytes(), &sig) {
                signed = true;
                break;
            }
        }
        if !signed {
            return Err(bad("not signed by the given log key"));
        }
        let mut lines = body.lines();
        let origin = lines
            .next()
            .filter(|l| !l.is_empty())
            .ok_or_else(|| bad("no origin"))?;
        let size: u64 = lines
            .next()
            .and_then(|l| {
                // Decimal without leading zeros, as tlog-checkpoint requires.
                (l == "0" || !l.starts_with('0'))
                    .then(|| l.parse().ok())
                    .flatten()
            })
            .ok_or_else(|| bad("size is not a decimal number"))?;
        let root = lines
            .next()
            .and_then(|l| B64.decode(l).ok())
            .and_then(|r| <[u8; 32]>::try_from(r).ok())
            .ok_or_else(|| bad("root hash is not 32 bytes of base64"))?;
        Ok(Checkpoint {
            origin: origin.to_owned(),
            size,
            root_hash: root,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_open_round_trip_and_tamper() {
        let key = LogKey::from_seed("gw", [3; 32]).expect("key");
        let cp = Checkpoint {
            origin: origin_for("gw", "acme corp"),
            size: 42,
            root_hash: [9; 32],
        };
        assert_eq!(cp.origin, "gw/acme%20corp");
        let note = cp.sign(&key);
        let lines: Vec<&str> = note.lines().collect();
        assert_eq!(
            lines[..4],
            ["gw/acme%20corp", "42", &B64.encode([9u8; 32]), ""]
        );
        assert!(lines[4].starts_with("\u{2014} gw "));
        assert_eq!(Checkpoint::open(&note, &key.verifier()).expect("open"), cp);
        let forged = note.replace("\n42\n", "\n43\n");
        assert!(Checkpoint::open(&forged, &key.verifier()).is_err());
        let other = LogKey::from_seed("gw", [4; 32]).expect("key");
        assert!(Checkpoint::open(&note, &other.verifier()).is_err());
        assert!(Checkpoint::open("gw/a\n1\n", &key.verifier()).is_err());
    }
}
