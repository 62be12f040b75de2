//! Where the CLI connects and as whom: flags, then environment, then the profile file, then the
//! quickstart's defaults.
//!
//! The profile file (`$INTENTGATE_CLI_CONFIG`, else `$XDG_CONFIG_HOME/intentgate/profiles.json`,
//! else `~/.config/intentgate/profiles.json`) names profiles:
//!
//! ```json
//! {"default": "local",
//!  "profiles": {"local": {"url": "http://127.0.0.1:8080",
//!                         "token_file": "intentgate-data/secrets.env", "tenant": "acme"}}}
//! ```
//!
//! The admin token never sits in the profile itself: it is read from a file (the token alone, or
//! a `secrets.env` with an `INTENTGATE_ADMIN_TOKEN=` line) or from an environment variable. This
//! module must never print a token.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use super::CliError;

/// How answers are printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Human-readable columns.
    #[default]
    Table,
    /// The API's JSON, one document per command: stable field names for scripts.
    Json,
}

/// The connection flags every admin verb takes (flags win over the environment and the profile).
#[derive(Args, Clone, Debug, Default)]
pub struct Connection {
    /// Profile to use from the profile file.
    #[arg(long, global = true, env = "INTENTGATE_PROFILE")]
    pub profile: Option<String>,
    /// Gateway base URL [default: http://127.0.0.1:8080].
    #[arg(long, global = true, env = "INTENTGATE_URL")]
    pub url: Option<String>,
    /// File holding the admin token (the token alone, or a secrets.env). The token itself can
    /// come from INTENTGATE_ADMIN_TOKEN; it is never taken as a flag, so it stays out of `ps`.
    #[arg(long, global = true, env = "INTENTGATE_ADMIN_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Tenant to act for (a tenant admin may name only its own).
    #[arg(long, global = true, env = "INTENTGATE_TENANT")]
    pub tenant: Option<String>,
    /// PEM CA certificates an https gateway must chain to [default: the system's roots].
    #[arg(long, global = true, env = "INTENTGATE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// What a verb connects to, resolved.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub token: String,
    pub tenant: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub output: Output,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("url", &self.url)
            .field("token", &"<redacted>")
            .field("tenant", &self.tenant)
            .finish()
    }
}

/// One profile of the file.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Name of an environment variable holding the token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// PEM CA certificates of an https gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<String>,
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

const DEFAULT_URL: &str = "http://127.0.0.1:8080";
const QUICKSTART_SECRETS: &str = "intentgate-data/secrets.env";

/// The profile file's path.
pub fn file_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("INTENTGATE_CLI_CONFIG") {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("intentgate").join("profiles.json"))
}

fn load_file(path: &Path) -> Result<ProfileFile, CliError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
            CliError::Usage(format!(
                "profile file {} is not valid: {e}\n  hint: fix it or rewrite it with `intentgate profile set`",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ProfileFile::default()),
        Err(e) => Err(CliError::Local(format!("{}: {e}", path.display()))),
    }
}

/// Reads a token file: the token alone, or the `INTENTGATE_ADMIN_TOKEN=` line of a secrets.env.
pub fn read_token_file(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!(
            "cannot read the admin token file {}: {e}\n  hint: name it with --token-file or INTENTGATE_ADMIN_TOKEN_FILE",
            path.display()
        ))
    })?;
    let token = crate::secrets::admin_token_in(&text);
    if token.is_empty() || token.contains(char::is_whitespace) {
        return Err(CliError::Usage(format!(
            "{} holds no admin token (expected the token alone or an INTENTGATE_ADMIN_TOKEN= line)",
            path.display()
        )));
    }
    Ok(token)
}

impl Connection {
    /// Flags (and their environment variables) over the profile over the defaults; see
    /// [`Connection::resolve_in`] for where the token comes from.
    pub fn resolve(&self) -> Result<Target, CliError> {
        let file = match file_path() {
            Some(p) => load_file(&p)?,
            None => ProfileFile::default(),
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        self.resolve_in(&file, &env, Path::new(QUICKSTART_SECRETS))
    }

    /// Resolves against a profile file, an environment (`env` gives a variable's value, an
    /// empty one as unset) and where the quickstart's secrets would be.
    ///
    /// The token is tied to the gateway it was made for. A profile that names its own gateway
    /// and its own token is used whole: the environment's `INTENTGATE_ADMIN_TOKEN`, which is
    /// often the local gateway's, never goes to the profile's gateway (an explicit
    /// `--token-file` still wins). The quickstart's `intentgate-data/secrets.env` is read only
    /// for a gateway on this machine, never sent to another host.
    fn resolve_in(
        &self,
        file: &ProfileFile,
        env: &dyn Fn(&str) -> Option<String>,
        quickstart: &Path,
    ) -> Result<Target, CliError> {
        let profile = match self.profile.as_deref().or(file.default.as_deref()) {
            Some(name) => match file.profiles.get(name) {
                Some(p) => p.clone(),
                None if self.profile.is_some() => {
                    return Err(CliError::Usage(format!(
                        "no profile named {name:?}\n  hint: `intentgate profile list` shows them; `intentgate profile set {name} --url URL --token-file FILE` makes it"
                    )));
                }
                None => Profile::default(),
            },
            None => Profile::default(),
        };
        let gateway_of_profile = self.url.is_none() && profile.url.is_some();
        let url = self
            .url
            .clone()
            .or(profile.url)
            .unwrap_or_else(|| DEFAULT_URL.to_owned());
        let url = url.trim_end_matches('/').to_owned();
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(CliError::Usage(format!(
                "the gateway URL must start with http:// or https://, got {url:?}"
            )));
        }
        let profile_token = || -> Result<Option<String>, CliError> {
            if let Some(var) = &profile.token_env {
                return env(var).map(Some).ok_or_else(|| {
                    CliError::Usage(format!(
                        "the profile reads the admin token from ${var}, which is not set"
                    ))
                });
            }
            profile
                .token_file
                .as_deref()
                .map(read_token_file)
                .transpose()
        };
        let names_token = profile.token_env.is_some() || profile.token_file.is_some();
        let token = if let Some(path) = &self.token_file {
            read_token_file(path)?
        } else if gateway_of_profile && names_token {
            profile_token()?.unwrap_or_default()
        } else if let Some(t) = env("INTENTGATE_ADMIN_TOKEN") {
            t
        } else if let Some(t) = profile_token()? {
            t
        } else if is_loopback(&url) && quickstart.is_file() {
            read_token_file(quickstart)?
        } else {
            return Err(CliError::Usage(
                "no admin token: set INTENTGATE_ADMIN_TOKEN, pass --token-file FILE, or make a profile (`intentgate profile set NAME --url URL --token-file FILE`)".into(),
            ));
        };
        Ok(Target {
            url,
            token,
            tenant: self.tenant.clone().or(profile.tenant),
            ca_file: self.ca_file.clone().or(profile.ca_file),
            output: self.output,
        })
    }
}

/// Whether a gateway URL's host is this machine (`localhost` or a loopback address).
pub(super) fn is_loopback(url: &str) -> bool {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return false;
    };
    let Some(host) = uri.host() else {
        return false;
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// `intentgate profile …`: manage the profile file.
#[derive(Subcommand, Debug)]
pub enum ProfileCmd {
    /// Create or change a profile.
    #[command(
        after_help = "Example:\n  intentgate profile set local --url http://127.0.0.1:8080 \\\n      --token-file intentgate-data/secrets.env --tenant acme --default"
    )]
    Set {
        name: String,
        #[arg(long)]
        url: Option<String>,
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Environment variable holding the token (instead of a file).
        #[arg(long)]
        token_env: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// PEM CA certificates of an https gateway.
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Make it the profile used when none is named.
        #[arg(long)]
        default: bool,
    },
    /// List the profiles (never the tokens).
    #[command(after_help = "Example:\n  intentgate profile list")]
    List,
}

impl ProfileCmd {
    pub fn run(self) -> Result<(), CliError> {
        let path = file_path().ok_or_else(|| {
            CliError::Usage("no profile file location: set INTENTGATE_CLI_CONFIG or HOME".into())
        })?;
        let mut file = load_file(&path)?;
        match self {
            ProfileCmd::List => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&serde_json::json!({
                        "file": path.display().to_string(),
                        "default": file.default,
                        "profiles": file.profiles,
                    }))
                    .unwrap_or_default()
                );
                Ok(())
            }
            ProfileCmd::Set {
                name,
                url,
                token_file,
                token_env,
                tenant,
                ca_file,
                default,
            } => {
                let p = file.profiles.entry(name.clone()).or_default();
                if url.is_some() {
                    p.url = url;
                }
                if let Some(f) = token_file {
                    // Stored absolute, so the profile works from any directory.
                    let f = std::path::absolute(&f).unwrap_or(f);
                    p.token_file = Some(f);
                    p.token_env = None;
                }
                if token_env.is_some() {
                    p.token_env = token_env;
                    p.token_file = None;
                }
                if tenant.is_some() {
                    p.tenant = tenant;
                }
                if let Some(f) = ca_file {
                    p.ca_file = Some(std::path::absolute(&f).unwrap_or(f));
                }
                if default || file.default.is_none() {
                    file.default = Some(name.clone());
                }
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| CliError::Local(format!("{}: {e}", dir.display())))?;
                }
                let text = serde_json::to_string_pretty(&file).unwrap_or_default();
                std::fs::write(&path, text + "\n")
                    .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
                println!("profile {name:?} saved in {}", path.display());
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_alone_or_secrets_env() {
        let dir = tempfile::tempdir().expect("tempdir");
        let alone = dir.path().join("t");
        std::fs::write(&alone, "abc123\n").expect("write");
        assert_eq!(read_token_file(&alone).expect("token"), "abc123");
        let env = dir.path().join("secrets.env");
        std::fs::write(
            &env,
            "INTENTGATE_MASTER_KEY=k\nINTENTGATE_ADMIN_TOKEN=tok-9\n",
        )
        .expect("write");
        assert_eq!(read_token_file(&env).expect("token"), "tok-9");
        let empty = dir.path().join("e");
        std::fs::write(&empty, "\n").expect("write");
        assert!(matches!(read_token_file(&empty), Err(CliError::Usage(_))));
    }

    fn profiles(url: &str) -> ProfileFile {
        let prod = Profile {
            url: Some(url.into()),
            token_env: Some("PROD_TOKEN".into()),
            ..Profile::default()
        };
        let bare = Profile {
            url: Some(url.into()),
            ..Profile::default()
        };
        ProfileFile {
            default: None,
            profiles: [("prod".to_owned(), prod), ("bare".to_owned(), bare)].into(),
        }
    }

    fn token_of(
        conn: &Connection,
        file: &ProfileFile,
        quickstart: &Path,
    ) -> Result<String, CliError> {
        let env = |name: &str| match name {
            "INTENTGATE_ADMIN_TOKEN" => Some("local-token".to_owned()),
            "PROD_TOKEN" => Some("prod-token".to_owned()),
            _ => None,
        };
        conn.resolve_in(file, &env, quickstart).map(|t| t.token)
    }

    #[test]
    fn a_profiles_gateway_gets_the_profiles_token_not_the_environments() {
        let file = profiles("https://gw.example.com");
        let none = Path::new("/nonexistent/secrets.env");
        let named = |profile: &str| Connection {
            profile: Some(profile.into()),
            ..Connection::default()
        };
        assert_eq!(
            token_of(&named("prod"), &file, none).expect("token"),
            "prod-token"
        );
        // The same profile as the default: used whole too.
        let by_default = ProfileFile {
            default: Some("prod".into()),
            ..file.clone()
        };
        let plain = Connection::default();
        assert_eq!(
            token_of(&plain, &by_default, none).expect("token"),
            "prod-token"
        );
        // Another gateway named on the command line: the environment's token is for it.
        let elsewhere = Connection {
            url: Some("http://127.0.0.1:9".into()),
            ..named("prod")
        };
        assert_eq!(
            token_of(&elsewhere, &file, none).expect("token"),
            "local-token"
        );
        // A profile that names no token takes the environment's.
        assert_eq!(
            token_of(&named("bare"), &file, none).expect("token"),
            "local-token"
        );
        // An explicit token file wins over everything.
        let dir = tempfile::tempdir().expect("tempdir");
        let t = dir.path().join("t");
        std::fs::write(&t, "file-token\n").expect("write");
        let with_file = Connection {
            token_file: Some(t),
            ..named("prod")
        };
        assert_eq!(
            token_of(&with_file, &file, none).expect("token"),
            "file-token"
        );
    }

    #[test]
    fn the_quickstarts_secrets_go_only_to_a_gateway_on_this_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets.env");
        std::fs::write(&secrets, "INTENTGATE_ADMIN_TOKEN=quickstart-token\n").expect("write");
        let no_env = |_: &str| None;
        let at = |url: &str| Connection {
            url: Some(url.into()),
            ..Connection::default()
        };
        let empty = ProfileFile::default();
        for local in [
            "http://127.0.0.1:8080",
            "http://localhost:8080",
            "http://[::1]:8080",
        ] {
            let t = at(local)
                .resolve_in(&empty, &no_env, &secrets)
                .expect(local);
            assert_eq!(t.token, "quickstart-token", "{local}");
        }
        for remote in ["https://gw.example.com", "http://10.0.0.5:8080"] {
            let refused = at(remote).resolve_in(&empty, &no_env, &secrets);
            assert!(
                matches!(&refused, Err(CliError::Usage(m)) if m.contains("no admin token")),
                "{remote}: the quickstart's token would be sent"
            );
        }
    }

    #[test]
    fn target_debug_never_shows_the_token() {
        let t = Target {
            url: "http://x".into(),
            token: "very-secret".into(),
            tenant: None,
            ca_file: None,
            output: Output::Json,
        };
        assert!(!format!("{t:?}").contains("very-secret"));
    }
}
