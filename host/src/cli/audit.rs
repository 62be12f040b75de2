//! `intentgate audit query | export | verify | checkpoint | public-key` against the admin API.
//! (`audit verify --file …` verifies an export offline and needs no gateway; see `main.rs`.)

use std::io::{BufRead as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use super::client::Client;
use super::output::{self, cell};
use super::profile::Output;
use super::{CliError, with_client};

/// The filters of `GET /v1/admin/audit` and the export.
#[derive(Args, Debug, Clone, Default)]
pub struct Filters {
    /// RFC 3339 lower bound (inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// RFC 3339 upper bound (inclusive).
    #[arg(long)]
    pub to: Option<String>,
    #[arg(long)]
    pub agent_id: Option<String>,
    #[arg(long)]
    pub tool: Option<String>,
    /// allow, block or escalate.
    #[arg(long)]
    pub decision: Option<String>,
    /// The check that decided (capability, intent, policy, budget, upstream, …).
    #[arg(long)]
    pub check: Option<String>,
    /// A token id; a root id finds its whole delegation tree.
    #[arg(long)]
    pub jti: Option<String>,
    /// Event kind (intentgate.tool_call, admin/mint, …).
    #[arg(long)]
    pub event: Option<String>,
}

impl Filters {
    fn params(&self) -> Vec<(&'static str, String)> {
        [
            ("from", &self.from),
            ("to", &self.to),
            ("agent_id", &self.agent_id),
            ("tool", &self.tool),
            ("decision", &self.decision),
            ("check", &self.check),
            ("jti", &self.jti),
            ("event", &self.event),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k, v)))
        .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// NDJSON, lossless: what `audit verify --file` reads.
    Json,
    /// CSV for spreadsheets.
    Csv,
}

#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// Events matching the filters, newest first.
    #[command(
        after_help = "Examples:\n  intentgate audit query --tenant acme --decision block --limit 20\n  intentgate audit query --jti 3q2… -o json"
    )]
    Query {
        #[command(flatten)]
        filters: Filters,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Continue from a `next_cursor` of an earlier page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Stream the events to a file with progress; `--resume` continues a broken NDJSON export.
    #[command(
        after_help = "Examples:\n  intentgate audit export --tenant acme --out acme.ndjson\n  intentgate audit export --tenant acme --out acme.ndjson --resume\n  intentgate audit export --format csv --out acme.csv --from 2026-12-01"
    )]
    Export {
        #[command(flatten)]
        filters: Filters,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = ExportFormat::Json)]
        format: ExportFormat,
        /// Append after the last complete event already in --out (NDJSON only).
        #[arg(long)]
        resume: bool,
    },
    /// Verify the tenant's chain on the gateway (offline: --file, --checkpoint, --public-key).
    #[command(
        after_help = "Examples:\n  intentgate audit verify --tenant acme\n  intentgate audit verify --file acme.ndjson --checkpoint acme.note --public-key key.txt"
    )]
    Verify {
        /// An NDJSON export to verify offline, without the gateway.
        #[arg(long, requires_all = ["checkpoint", "public_key"])]
        file: Option<PathBuf>,
        /// A signed checkpoint kept outside the gateway (`audit checkpoint --out`).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// The log's public key (`audit public-key`): the text, or a file holding it.
        #[arg(long)]
        public_key: Option<String>,
    },
    /// The newest signed checkpoint of the tenant's chain, to keep outside the gateway.
    #[command(after_help = "Example:\n  intentgate audit checkpoint --tenant acme --out acme.note")]
    Checkpoint {
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The key that signs checkpoints (what offline verification takes).
    #[command(after_help = "Example:\n  intentgate audit public-key > key.txt")]
    PublicKey,
    /// Before rolling back to a binary older than the audit lookup file: enter every event in
    /// the SQLite database's own lookup tables, a short transaction at a time (the gateway may
    /// keep running). Works on the database file; no gateway connection.
    #[command(
        name = "prepare-rollback",
        after_help = "Example:\n  intentgate audit prepare-rollback --data-dir /var/lib/intentgate\n\nRun it just before stopping the gateway for the rollback: the older binary then enters only\nwhat was written after it, instead of every event since the upgrade in one transaction."
    )]
    PrepareRollback {
        /// The gateway's data directory (its database is `intentgate.sqlite3` there).
        #[arg(long, env = "INTENTGATE_DATA_DIR", default_value = "intentgate-data")]
        data_dir: PathBuf,
        /// The SQLite database file itself, instead of the data directory's.
        #[arg(long)]
        database: Option<PathBuf>,
    },
}

impl AuditCmd {
    /// Runs the online verbs (`Verify` with `--file` is handled offline by the binary).
    pub fn run(self, conn: &super::Connection) -> Result<(), CliError> {
        with_client(conn, |c| self.remote(c))
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        let out = c.output();
        match self {
            AuditCmd::Query {
                filters,
                limit,
                cursor,
            } => {
                let mut q = filters.params();
                q.push(("limit", limit.clamp(1, 1000).to_string()));
                if let Some(cur) = cursor {
                    q.push(("cursor", cur));
                }
                let v = c.get("/v1/admin/audit", &q).await?;
                let rows = v
                    .get("items")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                output::print(
                    out,
                    &v,
                    &rows,
                    &[
                        "id", "ts", "tenant", "event", "decision", "check", "agent_id", "tool",
                        "reason",
                    ],
                );
                if out == Output::Table
                    && let Some(next) = v.get("next_cursor").filter(|n| !n.is_null())
                {
                    eprintln!("more: --cursor {}", cell(Some(next)));
                }
                Ok(())
            }
            AuditCmd::Export {
                filters,
                out: path,
                format,
                resume,
            } => export(&c, filters, &path, format, resume).await,
            AuditCmd::Verify {
                checkpoint,
                public_key,
                ..
            } => {
                // Online, the gateway checks the chain against its own key; a checkpoint kept
                // outside it is what catches a rewritten chain, so it is never dropped.
                if public_key.is_some() {
                    return Err(CliError::Local(
                        "--public-key is for verifying an export offline (with --file)".into(),
                    ));
                }
                let mut q = Vec::new();
                if let Some(path) = checkpoint {
                    let note = std::fs::read_to_string(&path)
                        .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
                    q.push(("checkpoint", note));
                }
                let v = c.get("/v1/admin/audit/verify", &q).await?;
                let ok = v.get("ok") == Some(&Value::Bool(true));
                match out {
                    Output::Json => println!("{}", output::pretty(&v)),
                    Output::Table if ok => println!(
                        "ok: tenant {} chain verified ({} events)",
                        cell(v.get("tenant")),
                        cell(v.get("verified"))
                    ),
                    Output::Table if v.get("broken_at").is_none() => println!(
                        "BROKEN: tenant {} chain holds ({} events), but: {} {}",
                        cell(v.get("tenant")),
                        cell(v.get("verified")),
                        cell(v.get("unlisted")),
                        cell(v.get("checkpoints"))
                    ),
                    Output::Table => println!(
                        "BROKEN: tenant {} chain fails at event {} ({} verified before it)",
                        cell(v.get("tenant")),
                        cell(v.get("broken_at")),
                        cell(v.get("verified"))
                    ),
                }
                if ok {
                    Ok(())
                } else {
                    Err(CliError::Refused(
                        "the audit chain does not verify: keep the export and the checkpoints as evidence".into(),
                    ))
                }
            }
            AuditCmd::Checkpoint { out: path } => {
                let note = c
                    .get("/v1/admin/audit/checkpoints", &[("format", "note".into())])
                    .await?;
                let text = note.as_str().map(str::to_owned).unwrap_or_default();
                match path {
                    Some(p) => {
                        std::fs::write(&p, &text)
                            .map_err(|e| CliError::Local(format!("{}: {e}", p.display())))?;
                        eprintln!("wrote the signed checkpoint to {}", p.display());
                    }
                    None => print!("{text}"),
                }
                Ok(())
            }
            AuditCmd::PrepareRollback { .. } => Err(CliError::Local(
                "prepare-rollback works on the database file, not through the gateway".into(),
            )),
            AuditCmd::PublicKey => {
                let v = c.get("/v1/admin/audit/public-key", &[]).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&v)),
                    Output::Table => println!("{}", cell(v.get("verifier_key"))),
                }
                Ok(())
            }
        }
    }
}

/// The id of the last complete NDJSON line of `path`, after cutting off a torn last line.
fn resume_point(path: &Path) -> Result<Option<i64>, CliError> {
    let local = |e: std::io::Error| CliError::Local(format!("{}: {e}", path.display()));
    let file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(local(e)),
    };
    let mut reader = std::io::BufReader::new(&file);
    let (mut good_len, mut pos, mut last_id) = (0u64, 0u64, None);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader.read_until(b'\n', &mut line).map_err(local)?;
        if n == 0 {
            break;
        }
        pos += n as u64;
        if line.ends_with(b"\n") {
            let id = serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|v| v.get("id").and_then(Value::as_i64))
                .ok_or_else(|| {
                    CliError::Usage(format!(
                        "{} is not an NDJSON audit export; cannot resume it",
                        path.display()
                    ))
                })?;
            last_id = Some(id);
            good_len = pos;
        }
    }
    // A torn last line (the transfer broke mid-line) is cut and fetched again.
    file.set_len(good_len).map_err(local)?;
    Ok(last_id)
}

async fn export(
    c: &Client,
    filters: Filters,
    path: &Path,
    format: ExportFormat,
    resume: bool,
) -> Result<(), CliError> {
    let mut q = filters.params();
    q.push((
        "format",
        match format {
            ExportFormat::Json => "json".into(),
            ExportFormat::Csv => "csv".into(),
        },
    ));
    let local = |e: std::io::Error| CliError::Local(format!("{}: {e}", path.display()));
    let partial = {
        let mut name = path.as_os_str().to_owned();
        name.push(".partial");
        std::path::PathBuf::from(name)
    };
    let existed = path.exists();
    let mut file = if resume {
        if format != ExportFormat::Json {
            return Err(CliError::Usage(
                "--resume needs --format json (NDJSON)".into(),
            ));
        }
        if let Some(id) = resume_point(path)? {
            q.push(("after_id", id.to_string()));
            eprintln!("resuming after event {id}");
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(local)?;
        f.seek(std::io::SeekFrom::End(0)).map_err(local)?;
        f
    } else {
        // A new export goes to `<file>.partial` first: an existing export (evidence) is
        // replaced only by one that arrived whole, never truncated by one that failed.
        std::fs::File::create(&partial).map_err(local)?
    };
    let (mut events, mut bytes) = (0u64, 0u64);
    let progress = |events: u64, bytes: u64| {
        eprint!("\r{events} events, {} written", human_bytes(bytes));
    };
    let streamed = c
        .stream("/v1/admin/audit/export", &q, |chunk| {
            file.write_all(chunk).map_err(local)?;
            bytes += chunk.len() as u64;
            events += chunk.iter().filter(|b| **b == b'\n').count() as u64;
            progress(events, bytes);
            Ok(())
        })
        .await;
    file.sync_all().map_err(local)?;
    if !resume {
        if streamed.is_ok() || (!existed && bytes > 0) {
            // Whole, or the first export to this file: `--resume` goes on from what arrived.
            std::fs::rename(&partial, path).map_err(local)?;
        } else if bytes == 0 {
            let _ = std::fs::remove_file(&partial);
        } else {
            eprintln!(
                "\nthe export broke off: {} is unchanged; what arrived is in {}",
                path.display(),
                partial.display()
            );
        }
    }
    streamed?;
    if format == ExportFormat::Csv {
        events = events.saturating_sub(1); // the header line
    }
    progress(events, bytes);
    eprintln!("\nexported to {}", path.display());
    if c.output() == Output::Json {
        println!(
            "{}",
            output::pretty(
                &serde_json::json!({"file": path.display().to_string(), "events": events, "bytes": bytes})
            )
        );
    }
    Ok(())
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1u32 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1u32 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_cuts_a_torn_line_and_finds_the_last_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("x.ndjson");
        std::fs::write(&p, "{\"id\":3,\"a\":1}\n{\"id\":7,\"a\":2}\n{\"id\":9,\"a").expect("write");
        assert_eq!(resume_point(&p).expect("resume"), Some(7));
        assert_eq!(
            std::fs::read_to_string(&p).expect("read"),
            "{\"id\":3,\"a\":1}\n{\"id\":7,\"a\":2}\n"
        );
        assert_eq!(resume_point(&dir.path().join("none")).expect("none"), None);
        std::fs::write(&p, "id,ts\n").expect("write");
        assert!(matches!(resume_point(&p), Err(CliError::Usage(_))));
    }
}
