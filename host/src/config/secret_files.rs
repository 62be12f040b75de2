//! Secrets read from files (`INTENTGATE_*_FILE`, `--*-file`): a Kubernetes or Docker secret is
//! mounted as a file, and a secret passed as a flag is visible to every user of the machine in
//! the process list. Each file setting stands for the setting of the same name without
//! `_FILE`; setting both is refused, so which one applies is never a guess.
//!
//! Must never print a file's contents, in an error or anywhere else.

use std::path::{Path, PathBuf};

use clap::Args;

use super::{ConfigError, ServeArgs, invalid};

/// A secret file larger than this is not a secret (a wrong path, a certificate bundle).
const MAX_SECRET_FILE: u64 = 64 * 1024;

const ADMIN_TOKEN_FILE: &str = "INTENTGATE_ADMIN_TOKEN_FILE";

/// The `*_FILE` settings.
#[derive(Args, Clone, Default)]
pub struct SecretFiles {
    /// Read INTENTGATE_MASTER_KEY from this file.
    #[arg(long, env = "INTENTGATE_MASTER_KEY_FILE", value_name = "PATH")]
    pub master_key_file: Option<PathBuf>,
    /// Read INTENTGATE_ADMIN_TOKEN from this file: the token alone, or a `secrets.env` with an
    /// `INTENTGATE_ADMIN_TOKEN=` line (read as the CLI's `--token-file` reads it).
    #[arg(long, env = "INTENTGATE_ADMIN_TOKEN_FILE", value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Read INTENTGATE_TENANT_ADMINS from this file (one `tenant:token` a line, or
    /// comma-separated).
    #[arg(long, env = "INTENTGATE_TENANT_ADMINS_FILE", value_name = "PATH")]
    pub tenant_admins_file: Option<PathBuf>,
    /// Read INTENTGATE_POSTGRES_URL from this file.
    #[arg(long, env = "INTENTGATE_POSTGRES_URL_FILE", value_name = "PATH")]
    pub postgres_url_file: Option<PathBuf>,
    /// Read INTENTGATE_METRICS_TOKEN from this file.
    #[arg(long, env = "INTENTGATE_METRICS_TOKEN_FILE", value_name = "PATH")]
    pub metrics_token_file: Option<PathBuf>,
    /// Read INTENTGATE_WEBHOOK_SECRET from this file.
    #[arg(long, env = "INTENTGATE_WEBHOOK_SECRET_FILE", value_name = "PATH")]
    pub webhook_secret_file: Option<PathBuf>,
    /// Read INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET from this file.
    #[arg(
        long,
        env = "INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET_FILE",
        value_name = "PATH"
    )]
    pub sentinel_client_secret_file: Option<PathBuf>,
    /// Read INTENTGATE_SIEM_SPLUNK_TOKEN from this file.
    #[arg(long, env = "INTENTGATE_SIEM_SPLUNK_TOKEN_FILE", value_name = "PATH")]
    pub splunk_token_file: Option<PathBuf>,
    /// Read INTENTGATE_SIEM_DATADOG_API_KEY from this file.
    #[arg(
        long,
        env = "INTENTGATE_SIEM_DATADOG_API_KEY_FILE",
        value_name = "PATH"
    )]
    pub datadog_api_key_file: Option<PathBuf>,
    /// Read INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY from this file.
    #[arg(
        long,
        env = "INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY_FILE",
        value_name = "PATH"
    )]
    pub s3_secret_access_key_file: Option<PathBuf>,
    /// Read OTEL_EXPORTER_OTLP_HEADERS (which may carry an exporter's credential) from this
    /// file.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS_FILE", value_name = "PATH")]
    pub otlp_headers_file: Option<PathBuf>,
}

/// Fills each secret whose `_FILE` setting is given from its file.
pub(super) fn apply(args: &mut ServeArgs) -> Result<(), ConfigError> {
    let files = std::mem::take(&mut args.secret_files);
    let pairs: [(&'static str, Option<PathBuf>, &mut Option<String>); 11] = [
        (
            "INTENTGATE_MASTER_KEY_FILE",
            files.master_key_file,
            &mut args.master_key,
        ),
        (
            ADMIN_TOKEN_FILE,
            files.admin_token_file,
            &mut args.admin_token,
        ),
        (
            "INTENTGATE_TENANT_ADMINS_FILE",
            files.tenant_admins_file,
            &mut args.tenant_admins,
        ),
        (
            "INTENTGATE_POSTGRES_URL_FILE",
            files.postgres_url_file,
            &mut args.postgres_url,
        ),
        (
            "INTENTGATE_METRICS_TOKEN_FILE",
            files.metrics_token_file,
            &mut args.telemetry.metrics_token,
        ),
        (
            "INTENTGATE_WEBHOOK_SECRET_FILE",
            files.webhook_secret_file,
            &mut args.outbox.webhook_secret,
        ),
        (
            "INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET_FILE",
            files.sentinel_client_secret_file,
            &mut args.outbox.sentinel_client_secret,
        ),
        (
            "INTENTGATE_SIEM_SPLUNK_TOKEN_FILE",
            files.splunk_token_file,
            &mut args.outbox.splunk_token,
        ),
        (
            "INTENTGATE_SIEM_DATADOG_API_KEY_FILE",
            files.datadog_api_key_file,
            &mut args.outbox.datadog_api_key,
        ),
        (
            "INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY_FILE",
            files.s3_secret_access_key_file,
            &mut args.outbox.s3_secret_access_key,
        ),
        (
            "OTEL_EXPORTER_OTLP_HEADERS_FILE",
            files.otlp_headers_file,
            &mut args.telemetry.otlp_headers,
        ),
    ];
    for (setting, path, value) in pairs {
        let Some(path) = path else {
            continue;
        };
        // An empty variable counts as unset (as a chart that always sets it leaves it).
        if value.as_deref().is_some_and(|v| !v.trim().is_empty()) {
            let direct = setting.trim_end_matches("_FILE");
            return Err(invalid(
                setting,
                format!("is set and so is {direct}: set one"),
            ));
        }
        let mut secret = read(setting, &path)?;
        if setting == ADMIN_TOKEN_FILE {
            // A `secrets.env` (the generated one, say) holds more than the token: the whole
            // text could never match. One reading for `serve` and the CLI.
            secret = crate::secrets::admin_token_in(&secret);
        }
        *value = Some(secret);
    }
    Ok(())
}

/// The secret in `path`: its text without the surrounding whitespace (a file written by
/// `echo` or a secret manager ends in a newline no client sends).
fn read(setting: &'static str, path: &Path) -> Result<String, ConfigError> {
    use std::io::Read as _;
    let shown = path.display();
    let cannot = |e: std::io::Error| invalid(setting, format!("cannot read {shown}: {e}"));
    // A pipe or a device (`/dev/stdin`, `/dev/zero`) could block the start (opening a pipe
    // waits for a writer) or never end: checked before opening (following symlinks, as a
    // Kubernetes secret volume's are).
    if !std::fs::metadata(path).map_err(cannot)?.is_file() {
        return Err(invalid(setting, format!("{shown} is not a regular file")));
    }
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mut bytes = Vec::new();
    file.take(MAX_SECRET_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_SECRET_FILE {
        return Err(invalid(
            setting,
            format!("{shown} holds more than {MAX_SECRET_FILE} bytes, more than a secret"),
        ));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid(setting, format!("{shown} is not UTF-8 text")))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(invalid(setting, format!("{shown} is empty")));
    }
    Ok(secret.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn args(list: &[&str]) -> ServeArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(list);
        T::try_parse_from(v).expect("clap parse").a
    }

    /// A secret mounted as a file is read without its newline, stands for its setting, and is
    /// never shown in an error; both forms at once, an empty file or a missing one are refused
    /// by the file setting's name.
    #[test]
    fn secrets_are_read_from_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = |name: &str, text: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write");
            p.display().to_string()
        };
        let admin = file("admin", b"file-admin-token-0123456789\n");
        let metrics = file("metrics", b"  file-metrics-token-0123456789\r\n");
        let pg = file("pg", b"postgres://u:pw@127.0.0.1:1/db\n");
        let hook = file("hook", b"whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n");
        let c = args(&[
            "--admin-token-file",
            &admin,
            "--metrics-token-file",
            &metrics,
            "--postgres-url-file",
            &pg,
            "--webhook-secret-file",
            &hook,
            "--webhook-url",
            "http://127.0.0.1:9/hook",
        ])
        .validate()
        .expect("valid");
        assert_eq!(
            c.admin_token.as_deref(),
            Some("file-admin-token-0123456789")
        );
        assert_eq!(
            c.telemetry.metrics.token.as_deref(),
            Some("file-metrics-token-0123456789")
        );
        assert!(
            matches!(&c.store, crate::config::StoreChoice::Postgres(u) if u == "postgres://u:pw@127.0.0.1:1/db")
        );

        let both = args(&[
            "--admin-token",
            "direct-admin-token-0123456789",
            "--admin-token-file",
            &admin,
        ])
        .validate()
        .expect_err("both refused")
        .to_string();
        assert!(both.starts_with("INTENTGATE_ADMIN_TOKEN_FILE"), "{both}");
        assert!(
            both.contains("INTENTGATE_ADMIN_TOKEN:") || both.contains("INTENTGATE_ADMIN_TOKEN "),
            "{both}"
        );

        let empty = file("empty", b"\n\n");
        let e = args(&["--master-key-file", &empty])
            .validate()
            .expect_err("empty")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_MASTER_KEY_FILE") && e.contains("empty"),
            "{e}"
        );

        let missing = dir.path().join("nope").display().to_string();
        let e = args(&["--tenant-admins-file", &missing])
            .validate()
            .expect_err("missing")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_TENANT_ADMINS_FILE") && e.contains("cannot read"),
            "{e}"
        );

        let binary = file("binary", &[0xff, 0xfe, 0x00, 0x41]);
        let e = args(&["--webhook-secret-file", &binary])
            .validate()
            .expect_err("binary")
            .to_string();
        assert!(e.contains("not UTF-8"), "{e}");

        // An empty variable beside its file counts as unset.
        let c = args(&["--admin-token", "", "--admin-token-file", &admin])
            .validate()
            .expect("empty direct value is unset");
        assert_eq!(
            c.admin_token.as_deref(),
            Some("file-admin-token-0123456789")
        );

        let folder = dir.path().display().to_string();
        let e = args(&["--admin-token-file", &folder])
            .validate()
            .expect_err("a folder")
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        // A named pipe would block the start in `open` until a writer came.
        let fifo = dir.path().join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let e = args(&["--admin-token-file", &fifo.display().to_string()])
            .validate()
            .expect_err("a pipe")
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let e = args(&["--admin-token-file", "/dev/zero"])
            .validate()
            .expect_err("a device")
            .to_string();
        assert!(e.contains("not a regular file"), "{e}");

        let big = file("big", &vec![b'a'; 70_000]);
        let e = args(&["--admin-token-file", &big])
            .validate()
            .expect_err("big")
            .to_string();
        assert!(e.contains("more than"), "{e}");
        assert!(!e.contains("aaaa"), "a file's text is never shown: {e}");
        // A secret the check after reading refuses is not shown either.
        let short = file("short", b"hunter2\n");
        let e = args(&["--admin-token-file", &short])
            .validate()
            .expect_err("too short")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_ADMIN_TOKEN") && !e.contains("hunter2"),
            "{e}"
        );

        // A secrets.env (the generated one, say) as the admin token file: its
        // INTENTGATE_ADMIN_TOKEN= line is the token, as the CLI's --token-file reads it.
        let env = file(
            "secrets.env",
            b"# IntentGate secrets\nINTENTGATE_MASTER_KEY=c2l4dGVlbi1ieXRlcy1vZi1rZXktbWF0ZXJpYWw=\nINTENTGATE_ADMIN_TOKEN=igadm_env-file-token-0123456789\n",
        );
        let c = args(&["--admin-token-file", &env])
            .validate()
            .expect("a secrets.env");
        assert_eq!(
            c.admin_token.as_deref(),
            Some("igadm_env-file-token-0123456789")
        );
        let cli = crate::cli::profile::read_token_file(std::path::Path::new(&env))
            .expect("the CLI reads it");
        assert_eq!(c.admin_token, Some(cli), "serve and the CLI agree");
        // One tenant:token a line.
        let tenants = file(
            "tenants",
            b"acme:acme-admin-token-0123456789\nglobex:globex-admin-token-0123456789\n",
        );
        let c = args(&["--tenant-admins-file", &tenants])
            .validate()
            .expect("one a line");
        assert_eq!(c.tenant_admins.len(), 2);
        // A file of two lines is not one token: refused, unquoted.
        let two = file(
            "two",
            b"first-admin-token-0123456789\nsecond-line-0123456789\n",
        );
        let e = args(&["--admin-token-file", &two])
            .validate()
            .expect_err("two lines")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_ADMIN_TOKEN") && !e.contains("first-admin"),
            "{e}"
        );

        let key = file("key", b"c2l4dGVlbi1ieXRlcy1vZi1rZXktbWF0ZXJpYWw=\n");
        let c = args(&["--master-key-file", &key])
            .validate()
            .expect("valid");
        assert_eq!(
            c.master_key.as_deref(),
            Some("c2l4dGVlbi1ieXRlcy1vZi1rZXktbWF0ZXJpYWw=")
        );
    }
}
