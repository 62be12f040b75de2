//! A throwaway PostgreSQL server for the PostgreSQL configuration of the benchmarks, started
//! from the machine's binaries (`initdb`, `pg_ctl` on `PATH` or under
//! `/usr/lib/postgresql/*/bin`) in a temporary directory, durable settings left at their
//! defaults (`fsync=on`, `synchronous_commit=on`) so it is compared fairly with SQLite
//! `synchronous=FULL`. PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user (via `runuser`). Stopped (`pg_ctl stop -m fast`) and deleted on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    run_as: Option<String>,
    pub url: String,
}

fn find_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for d in std::env::split_paths(&path) {
        if d.join("initdb").exists() && d.join("pg_ctl").exists() {
            return Some(d);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort();
    found.pop()
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

impl PgServer {
    /// Whether PostgreSQL binaries are available on this machine.
    pub fn available() -> bool {
        find_bin().is_some()
    }

    fn command(&self, tool: &str) -> Command {
        command(&self.bin, self.run_as.as_deref(), tool)
    }

    /// Initialises and starts a server; returns once it accepts connections.
    pub fn start(root: &Path) -> Result<PgServer, String> {
        let bin = find_bin().ok_or("no PostgreSQL binaries (initdb, pg_ctl) found")?;
        let dir = tempfile::Builder::new()
            .prefix("intentgate-bench-pg-")
            .tempdir_in(root)
            .map_err(|e| format!("tempdir: {e}"))?;
        let run_as = is_root().then(|| "postgres".to_owned());
        if let Some(user) = &run_as {
            let ok = Command::new("chown")
                .arg("-R")
                .arg(format!("{user}:"))
                .arg(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                return Err(format!("cannot chown the PostgreSQL directory to {user}"));
            }
        }
        let port = free_port().map_err(|e| format!("free port: {e}"))?;
        let data = dir.path().join("data");
        let out = command(&bin, run_as.as_deref(), "initdb")
            .arg("-D")
            .arg(&data)
            .args(["-U", "bench", "--auth=trust", "-E", "UTF8", "--no-sync"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=200",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        let pg = PgServer {
            url: format!("postgres://bench@127.0.0.1:{port}/postgres"),
            dir,
            bin,
            run_as,
        };
        let out = pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(&opts)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .output()
            .map_err(|e| format!("pg_ctl start: {e}"))?;
        if !out.status.success() {
            let log = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "pg_ctl start failed: {}{log}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(pg)
    }
}

fn command(bin: &Path, run_as: Option<&str>, tool: &str) -> Command {
    match run_as {
        Some(user) => {
            let mut c = Command::new("runuser");
            c.arg("-u").arg(user).arg("--").arg(bin.join(tool));
            c
        }
        None => Command::new(bin.join(tool)),
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "fast", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
