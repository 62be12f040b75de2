//! The gateway's own secrets: the capability master key and the superadmin token.
//!
//! Given in the environment they are used as is; otherwise they are generated once, on first
//! start, into `<data dir>/secrets.env` (mode 0600, created exclusively) and read back on later
//! starts. This module must never log or print a secret value, only where the file is.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

const FILE_NAME: &str = "secrets.env";
const KEY_VAR: &str = "INTENTGATE_MASTER_KEY";
const ADMIN_VAR: &str = "INTENTGATE_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is malformed: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error("no randomness available: {0}")]
    Random(String),
}

/// The secrets the gateway runs with, and the file they came from when generated.
pub struct Secrets {
    /// The master key's text, trimmed: the keys derived from it (sealed destination secrets,
    /// session ids) must not depend on a newline a Secret file ends with, since the capability
    /// verifier ignores it.
    pub master_key: String,
    /// The master key's text as given, when trimming changed it: what seals made before the
    /// trimming were derived from (opened as a fallback).
    pub legacy_master_key: Option<String>,
    pub admin_token: String,
    /// The file holding generated secrets, when any secret came from it.
    pub file: Option<PathBuf>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secrets")
            .field("file", &self.file)
            .finish_non_exhaustive()
    }
}

fn random_b64(n: usize) -> Result<String, SecretsError> {
    let mut buf = vec![0u8; n];
    getrandom::fill(&mut buf).map_err(|e| SecretsError::Random(e.to_string()))?;
    Ok(URL_SAFE_NO_PAD.encode(buf))
}

/// Uses the given secrets, or loads (or creates) the missing ones from `<data_dir>/secrets.env`.
pub fn load_or_create(
    data_dir: &Path,
    master_key: Option<&str>,
    admin_token: Option<&str>,
) -> Result<Secrets, SecretsError> {
    if let (Some(k), Some(a)) = (master_key, admin_token) {
        return Ok(Secrets::new(k, a, None));
    }
    ensure_private_dir(data_dir)?;
    let path = data_dir.join(FILE_NAME);
    let (file_key, file_admin) = match fs::metadata(&path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(SecretsError::Permissions { path, mode });
            }
            read_file(&path)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_file(&path)?,
        Err(source) => return Err(SecretsError::Io { path, source }),
    };
    Ok(Secrets::new(
        master_key.unwrap_or(&file_key),
        admin_token.unwrap_or(&file_admin),
        Some(path),
    ))
}

impl Secrets {
    fn new(master_key: &str, admin_token: &str, file: Option<PathBuf>) -> Self {
        let trimmed = master_key.trim();
        Secrets {
            master_key: trimmed.to_owned(),
            legacy_master_key: (trimmed != master_key).then(|| master_key.to_owned()),
            admin_token: admin_token.trim().to_owned(),
            file,
        }
    }
}

/// The admin token a token file holds: the value of its `INTENTGATE_ADMIN_TOKEN=` line when it
/// is a `secrets.env` (as [`load_or_create`] writes it), else the whole text; trimmed either way.
/// The one reading of such a file, for `serve` (`INTENTGATE_ADMIN_TOKEN_FILE`) and the CLI
/// (`--token-file`): the two take the same token from the same file.
pub fn admin_token_in(text: &str) -> String {
    let prefix = format!("{ADMIN_VAR}=");
    text.lines()
        .find_map(|l| l.trim().strip_prefix(prefix.as_str()))
        .map(|v| v.trim().trim_matches('"'))
        .unwrap_or(text.trim())
        .to_owned()
}

/// Creates the data directory (0700) if needed.
pub fn ensure_private_dir(dir: &Path) -> Result<(), SecretsError> {
    if !dir.exists() {
        fs::create_dir_all(dir).map_err(|source| SecretsError::DataDir {
            path: dir.to_owned(),
            source,
        })?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|source| {
            SecretsError::DataDir {
                path: dir.to_owned(),
                source,
            }
        })?;
    }
    Ok(())
}

fn create_file(path: &Path) -> Result<(String, String), SecretsError> {
    let key = random_b64(32)?;
    let admin = format!("igadm_{}", random_b64(32)?);
    let io = |source| SecretsError::Io {
        path: path.to_owned(),
        source,
    };
    // create_new: two gateways starting at once must not overwrite each other's secrets.
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io)?;
    let body = format!(
        "# IntentGate secrets, generated on first start. Keep this file private (0600).\n\
         {KEY_VAR}={key}\n{ADMIN_VAR}={admin}\n"
    );
    f.write_all(body.as_bytes()).map_err(io)?;
    f.sync_all().map_err(io)?;
    // The file's name is durable only once its directory is synced (a power cut must not make
    // the next start generate other secrets).
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
    Ok((key, admin))
}

fn read_file(path: &Path) -> Result<(String, String), SecretsError> {
    let text = fs::read_to_string(path).map_err(|source| SecretsError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut key = None;
    let mut admin = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((KEY_VAR, v)) => key = Some(v.trim().to_owned()),
            Some((ADMIN_VAR, v)) => admin = Some(v.trim().to_owned()),
            _ => {}
        }
    }
    let missing = |var: &str| SecretsError::Malformed {
        path: path.to_owned(),
        reason: format!("{var} is missing"),
    };
    Ok((
        key.ok_or_else(|| missing(KEY_VAR))?,
        admin.ok_or_else(|| missing(ADMIN_VAR))?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The quickstart runs `intentgate serve` in a checkout: the data directory it creates
    /// there (secrets included) must never show up as something to commit.
    #[test]
    fn the_default_data_dir_is_ignored_by_git() {
        let ignore = include_str!("../../.gitignore");
        assert!(
            ignore.lines().any(|l| l.trim() == "/intentgate-data"),
            ".gitignore must list /intentgate-data"
        );
    }

    #[test]
    fn generated_once_private_and_stable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let a = load_or_create(&data, None, None).expect("create");
        let path = a.file.clone().expect("file");
        assert_eq!(
            fs::metadata(&path).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        let b = load_or_create(&data, None, None).expect("reload");
        assert_eq!(a.master_key, b.master_key);
        assert_eq!(a.admin_token, b.admin_token);
        assert!(!format!("{a:?}").contains(&a.admin_token));
        // An explicit value wins over the file.
        let c = load_or_create(&data, None, Some("explicit-admin-token")).expect("mixed");
        assert_eq!(c.admin_token, "explicit-admin-token");
        assert_eq!(c.master_key, a.master_key);
    }

    /// Secrets from a file ending in a newline are the same secrets: the derived keys and the
    /// admin token match what clients and other replicas use.
    #[test]
    fn given_secrets_are_trimmed_and_the_text_as_given_kept_for_old_seals() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = load_or_create(
            dir.path(),
            Some("key-text\n"),
            Some("admin-token-0123456789\n"),
        )
        .expect("given");
        assert_eq!(s.master_key, "key-text");
        assert_eq!(s.legacy_master_key.as_deref(), Some("key-text\n"));
        assert_eq!(s.admin_token, "admin-token-0123456789");
        let s = load_or_create(dir.path(), Some("key-text"), Some("admin-token-0123456789"))
            .expect("given");
        assert_eq!(s.legacy_master_key, None);
    }

    #[test]
    fn world_readable_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        load_or_create(dir.path(), None, None).expect("create");
        let path = dir.path().join(FILE_NAME);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = load_or_create(dir.path(), None, None).expect_err("must be refused");
        assert!(matches!(err, SecretsError::Permissions { .. }), "{err}");
    }
}

/// A configured bearer secret, kept as its SHA-256: compared with a presented one in constant
/// time over the digests, so neither the secret's bytes nor its length show in the timing (a
/// constant-time comparison of the raw bytes still ends early on a length mismatch).
#[derive(Clone)]
pub struct BearerSecret([u8; 32]);

impl BearerSecret {
    pub fn new(secret: &str) -> Self {
        use sha2::Digest;
        Self(sha2::Sha256::digest(secret.as_bytes()).into())
    }

    /// Whether `presented` is this secret.
    pub fn matches(&self, presented: &str) -> bool {
        use sha2::Digest;
        use subtle::ConstantTimeEq;
        let digest: [u8; 32] = sha2::Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.0))
    }
}

impl std::fmt::Debug for BearerSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerSecret(<redacted>)")
    }
}

#[cfg(test)]
mod bearer_tests {
    use super::BearerSecret;

    #[test]
    fn only_the_very_secret_matches() {
        let s = BearerSecret::new("super-secret-token-1");
        assert!(s.matches("super-secret-token-1"));
        assert!(!s.matches("super-secret-token-"));
        assert!(!s.matches("super-secret-token-12"));
        assert!(!s.matches(""));
        assert_eq!(format!("{s:?}"), "BearerSecret(<redacted>)");
    }
}
