//! The audit log key: an Ed25519 key that signs checkpoints of every tenant's chain, and its
//! public half in the C2SP signed-note key formats.
//!
//! Formats (as Go's `golang.org/x/mod/sumdb/note` writes them, so `note`-aware tools read them):
//! - signer key:   `PRIVATE+KEY+<name>+<keyhash hex8>+<base64(0x01 || 32-byte seed)>`
//! - verifier key: `<name>+<keyhash hex8>+<base64(0x01 || 32-byte public key)>`
//!
//! where `keyhash = SHA-256(name || "\n" || 0x01 || public key)[..4]`.
//!
//! The key comes from `INTENTGATE_AUDIT_LOG_KEY` (signer-key format, or a bare base64 32-byte
//! seed; read and parsed by `crate::config`) or is generated on first start into `audit-log.key` (mode 0600) in the data directory.
//! This module must never write the private key anywhere else, log it, or show it through `Debug`.

use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use super::AuditError;

/// File name of the generated key inside the data directory.
pub const KEY_FILE: &str = "audit-log.key";
/// Key name used when none is given.
pub const DEFAULT_KEY_NAME: &str = "intentgate-audit";
/// Signature algorithm byte of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;

/// The checkpoint signing key.
#[derive(Clone)]
pub struct LogKey {
    name: String,
    signing: SigningKey,
    key_id: [u8; 4],
}

impl fmt::Debug for LogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogKey")
            .field("name", &self.name)
            .field("verifier_key", &self.verifier().to_string())
            .finish_non_exhaustive()
    }
}

fn check_name(name: &str) -> Result<(), AuditError> {
    if name.is_empty()
        || name.contains('+')
        || name.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(AuditError::Key(format!(
            "key name {name:?} must be non-empty, without '+' or whitespace"
        )));
    }
    Ok(())
}

fn key_hash(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update(b"\n");
    h.update([ALG_ED25519]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

impl LogKey {
    /// A key from its 32-byte seed.
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<Self, AuditError> {
        check_name(name)?;
        let signing = SigningKey::from_bytes(&seed);
        let key_id = key_hash(name, signing.verifying_key().as_bytes());
        Ok(LogKey {
            name: name.to_owned(),
            signing,
            key_id,
        })
    }

    /// A fresh random key.
    pub fn generate(name: &str) -> Result<Self, AuditError> {
        let mut seed = [0u8; 32];
        getrandom::fill(&mut seed)
            .map_err(|e| AuditError::Key(format!("no randomness for the log key: {e}")))?;
        Self::from_seed(name, seed)
    }

    /// Parses the signer-key format, or a bare standard-base64 32-byte seed (named
    /// [`DEFAULT_KEY_NAME`]).
    pub fn parse(text: &str) -> Result<Self, AuditError> {
        let text = text.trim();
        if let Some(rest) = text.strip_prefix("PRIVATE+KEY+") {
            // The base64 key may itself contain '+': split off name and hash only.
            let mut parts = rest.splitn(3, '+');
            let (Some(name), Some(hash), Some(key)) = (parts.next(), parts.next(), parts.next())
            else {
                return Err(AuditError::Key("malformed signer key".into()));
            };
            let raw = B64
                .decode(key)
                .map_err(|_| AuditError::Key("signer key is not base64".into()))?;
            let Some((&ALG_ED25519, seed)) = raw.split_first() else {
                return Err(AuditError::Key("signer key is not an Ed25519 key".into()));
            };
            let seed: [u8; 32] = seed
                .try_into()
                .map_err(|_| AuditError::Key("signer key has the wrong length".into()))?;
            let key = Self::from_seed(name, seed)?;
            if hash != hex::encode(&key.key_id) {
                return Err(AuditError::Key("signer key hash does not match".into()));
            }
            return Ok(key);
        }
        let raw = B64
            .decode(text)
            .map_err(|_| AuditError::Key("log key is neither a signer key nor base64".into()))?;
        let seed: [u8; 32] = raw
            .try_into()
            .map_err(|_| AuditError::Key("a base64 log key must be 32 bytes".into()))?;
        Self::from_seed(DEFAULT_KEY_NAME, seed)
    }

    /// The key in `dir/audit-log.key`, generated (0600, written atomically) on first start.
    pub fn load_or_create(dir: &Path) -> Result<Self, AuditError> {
        let path = dir.join(KEY_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                refuse_if_readable_by_others(&path)?;
                return Self::parse(&text)
                    .map_err(|e| AuditError::Key(format!("{}: {e}", path.display())));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(AuditError::Io(e)),
        }
        std::fs::create_dir_all(dir)?;
        let key = Self::generate(DEFAULT_KEY_NAME)?;
        let tmp: PathBuf = dir.join(format!(".{KEY_FILE}.{}.tmp", std::process::id()));
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
            let mut f = opts.open(&tmp)?;
            f.write_all(key.signer_key_text().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
        }
        // Publish atomically: a concurrent start either links first or reads the winner's file.
        let linked = std::fs::hard_link(&tmp, &path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                // The new name is durable only once its directory is synced: without this, a
                // power cut after start-up can lose the file and the next start signs with a
                // new key (tests/powercut.rs).
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::File::open(dir)?.sync_all()?;
                tracing::info!(path = %path.display(), verifier_key = %key.verifier(), "generated the audit log key");
                Ok(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Self::parse(&std::fs::read_to_string(&path)?)
            }
            Err(e) => Err(AuditError::Io(e)),
        }
    }

    fn signer_key_text(&self) -> String {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.signing.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex::encode(&self.key_id),
            B64.encode(raw)
        )
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public half.
    pub fn verifier(&self) -> Verifier {
        Verifier {
            name: self.name.clone(),
            key: self.signing.verifying_key(),
            key_id: self.key_id,
        }
    }

    /// Signs `msg`; the signed-note signature is `key_id || signature`.
    pub(crate) fn sign_note_text(&self, msg: &[u8]) -> Vec<u8> {
        let sig: Signature = self.signing.sign(msg);
        let mut out = Vec::with_capacity(68);
        out.extend_from_slice(&self.key_id);
        out.extend_from_slice(&sig.to_bytes());
        out
    }
}

#[cfg(unix)]
fn refuse_if_readable_by_others(path: &Path) -> Result<(), AuditError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        // Whoever reads it can sign checkpoints: the chain's tamper evidence would be theirs
        // to forge. Refused like `secrets.env` (never a warning a start-up log buries).
        return Err(AuditError::Key(format!(
            "{}: readable by other users (mode {mode:o}); chmod 600 it",
            path.display()
        )));
    }
    Ok(())
}

#[cfg(not(unix))]
fn refuse_if_readable_by_others(_path: &Path) -> Result<(), AuditError> {
    Ok(())
}

/// A public log key: verifies checkpoint signatures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verifier {
    name: String,
    key: VerifyingKey,
    key_id: [u8; 4],
}

impl fmt::Display for Verifier {
    /// The verifier-key text `<name>+<hash>+<base64(0x01 || key)>`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut raw = Vec::with_capacity(33);
        raw.push(ALG_ED25519);
        raw.extend_from_slice(self.key.as_bytes());
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(&self.key_id),
            B64.encode(raw)
        )
    }
}

impl Verifier {
    /// Whether `text` is a bare base64 32-byte public key (not the `name+hash+base64` form).
    pub fn is_bare_key(text: &str) -> bool {
        B64.decode(text.trim()).is_ok_and(|raw| raw.len() == 32)
    }

    /// Parses a verifier key (`name+hash+base64`) or a bare base64 32-byte public key, which then
    /// takes the name `default_name`.
    pub fn parse(text: &str, default_name: &str) -> Result<Self, AuditError> {
        let text = text.trim();
        // A bare key is 32 bytes of base64 (which may contain '+'); anything else must be the
        // `name+hash+base64` form.
        let bare = B64.decode(text).ok().filter(|raw| raw.len() == 32);
        let (name, hash, raw) = match bare {
            Some(raw) => (default_name.to_owned(), None, raw),
            None => {
                let mut parts = text.splitn(3, '+');
                let (Some(name), Some(hash), Some(key)) =
                    (parts.next(), parts.next(), parts.next())
                else {
                    return Err(AuditError::Key("malformed verifier key".into()));
                };
                let raw = B64
                    .decode(key)
                    .map_err(|_| AuditError::Key("verifier key is not base64".into()))?;
                match raw.split_first() {
                    Some((&ALG_ED25519, k)) => (name.to_owned(), Some(hash), k.to_vec()),
                    _ => return Err(AuditError::Key("verifier key is not Ed25519".into())),
                }
            }
        };
        check_name(&name)?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|_| AuditError::Key("public key must be 32 bytes".into()))?;
        let key = VerifyingKey::from_bytes(&bytes)
            .map_err(|_| AuditError::Key("not a valid Ed25519 public key".into()))?;
        let key_id = key_hash(&name, &bytes);
        if let Some(hash) = hash
            && hash != hex::encode(&key_id)
        {
            return Err(AuditError::Key("verifier key hash does not match".into()));
        }
        Ok(Verifier { name, key, key_id })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn key_id(&self) -> [u8; 4] {
        self.key_id
    }

    /// The raw public key, standard base64.
    pub fn public_key_base64(&self) -> String {
        B64.encode(self.key.as_bytes())
    }

    /// Checks a signed-note signature (`key_id || 64-byte signature`) over `msg`.
    pub(crate) fn verify_note_sig(&self, msg: &[u8], sig: &[u8]) -> bool {
        let Some((id, sig)) = sig.split_first_chunk::<4>() else {
            return false;
        };
        let Ok(sig) = <[u8; 64]>::try_from(sig) else {
            return false;
        };
        *id == self.key_id
            && self
                .key
                .verify_strict(msg, &Signature::from_bytes(&sig))
                .is_ok()
    }
}

/// Lowercase hex, shared by the audit module.
pub(crate) mod hex {
    pub fn encode(bytes: &[u8]) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    pub fn decode32(s: &str) -> Option<[u8; 32]> {
        let b = s.as_bytes();
        if b.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in b.chunks_exact(2).enumerate() {
            let hi = (pair[0] as char).to_digit(16)?;
            let lo = (pair[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file others can read is refused (they could sign checkpoints), as `secrets.env`
    /// is; the file the gateway writes is not.
    #[cfg(unix)]
    #[test]
    fn a_key_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        let made = LogKey::load_or_create(dir.path()).expect("created");
        let again = LogKey::load_or_create(dir.path()).expect("read again");
        assert_eq!(again.verifier(), made.verifier());
        let path = dir.path().join(KEY_FILE);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = LogKey::load_or_create(dir.path()).expect_err("refused");
        assert!(e.to_string().contains("chmod 600"), "{e}");
    }

    #[test]
    fn signer_and_verifier_text_round_trip() {
        let key = LogKey::from_seed("gw.example", [7u8; 32]).expect("key");
        let again = LogKey::parse(&key.signer_key_text()).expect("parse");
        assert_eq!(again.verifier(), key.verifier());
        let vk = key.verifier().to_string();
        assert!(vk.starts_with("gw.example+"));
        assert_eq!(Verifier::parse(&vk, "x").expect("vk"), key.verifier());
        let bare =
            Verifier::parse(&key.verifier().public_key_base64(), "gw.example").expect("bare");
        assert_eq!(bare, key.verifier());
        // A tampered hash or key is refused.
        let mut bad = vk.clone();
        bad.replace_range(bad.find('+').map(|i| i + 1..i + 2).unwrap_or(0..0), "z");
        assert!(Verifier::parse(&bad, "x").is_err());
        assert!(LogKey::parse("PRIVATE+KEY+a+00000000+AQ==").is_err());
        assert!(LogKey::from_seed("has space", [1; 32]).is_err());
    }

    #[test]
    fn signatures_verify_only_for_the_message() {
        let key = LogKey::generate("k").expect("key");
        let sig = key.sign_note_text(b"hello\n");
        let v = key.verifier();
        assert!(v.verify_note_sig(b"hello\n", &sig));
        assert!(!v.verify_note_sig(b"hello!\n", &sig));
        let other = LogKey::generate("k").expect("key").verifier();
        assert!(!other.verify_note_sig(b"hello\n", &sig));
    }

    #[test]
    fn load_or_create_persists_with_0600() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = LogKey::load_or_create(dir.path()).expect("create");
        let b = LogKey::load_or_create(dir.path()).expect("load");
        assert_eq!(a.verifier(), b.verifier());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.path().join(KEY_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(!format!("{a:?}").contains(&B64.encode(a.signing.as_bytes())));
    }
}
