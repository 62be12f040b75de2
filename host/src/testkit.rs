//! Test support: a throwaway PostgreSQL server started from the machine's own binaries, so the
//! store's test suite (and end-to-end tests) run against a real PostgreSQL with no setup.
//!
//! [`PgServer::shared`] starts one server per test process on first use; each test takes a
//! fresh database from it with [`PgServer::fresh_database`]. [`PgServer::start`] starts a
//! private one that is stopped when dropped.
//!
//! How it runs: `initdb` into a new temp dir (`--no-sync`, password auth on TCP, trust only on
//! the unix socket inside that 0700 dir), then `pg_ctl start -w` listening on 127.0.0.1 only,
//! on a free port, with `fsync=off` (test data is disposable). `initdb` refuses to run as root,
//! so when the effective uid is 0 (CI, this machine) every server command runs as the
//! `postgres` user through `runuser -u postgres --`, with the temp dir `chown`ed to it.
//!
//! Shutdown: a static is never dropped, so the server is not stopped by `Drop` alone. Before
//! the server starts, a watchdog `sh` is spawned in its own process group (so Ctrl-C or a test
//! runner killing the test's process group does not take it down) with its stdin a pipe whose
//! write end only this process holds (close-on-exec, so no other child inherits it). When this
//! process exits, for any reason short of the watchdog itself being SIGKILLed, the pipe reaches
//! EOF and the watchdog runs `pg_ctl stop -m immediate` and removes the temp dir. `Drop` of a
//! private server closes the pipe and waits for the same watchdog.
//!
//! [`StallProxy`] stands between a client and a server and can stop forwarding without closing
//! anything (a stalled disk or a black-holed database, as the client sees it).
//!
//! Missing binaries are an error naming the Debian package, never a silent skip.
//! This module must never be used by the gateway itself, never touch a server or directory it
//! did not create, and never listen beyond loopback. Standard library only.

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The Debian package that provides `initdb`, `pg_ctl` and `createdb`.
const PACKAGE_HINT: &str =
    "install the Debian package postgresql-15 (apt-get install -y postgresql-15)";
/// The OS user that runs the server when the tests run as root.
const PG_OS_USER: &str = "postgres";
/// How many ports to try when a picked free port is taken before the server binds it.
const START_ATTEMPTS: u32 = 4;

static SHARED: OnceLock<Result<PgServer, String>> = OnceLock::new();
static TEMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// A running throwaway PostgreSQL server.
#[derive(Debug)]
pub struct PgServer {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    password: String,
    as_postgres_user: bool,
    next_db: AtomicU64,
    watchdog: Option<Child>,
}

impl PgServer {
    /// The server shared by every test of this process, started on first use. It is stopped
    /// (and its directory removed) by its watchdog when the process exits.
    pub fn shared() -> Result<&'static PgServer, String> {
        SHARED
            .get_or_init(PgServer::start)
            .as_ref()
            .map_err(Clone::clone)
    }

    /// Starts a private server, stopped and removed when dropped.
    pub fn start() -> Result<PgServer, String> {
        let bin = find_bin_dir()?;
        let as_postgres_user = effective_uid()? == 0;
        if as_postgres_user {
            run(
                Command::new("id").args(["-u", PG_OS_USER]),
                "id -u postgres",
            )
            .map_err(|e| {
                format!(
                    "running as root, so PostgreSQL must run as the `{PG_OS_USER}` user, \
                     which is missing ({e}); {PACKAGE_HINT} (it creates that user)"
                )
            })?;
        }
        let dir = make_temp_dir()?;
        let mut server = PgServer {
            bin,
            dir,
            port: 0,
            password: random_hex(),
            as_postgres_user,
            next_db: AtomicU64::new(0),
            watchdog: None,
        };
        // From here on, dropping `server` cleans up whatever was created.
        server.init()?;
        server.watchdog = Some(server.spawn_watchdog()?);
        server.launch()?;
        Ok(server)
    }

    /// The URL of the server's `postgres` database (superuser).
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// The URL of database `name` on this server.
    pub fn database_url(&self, name: &str) -> String {
        format!(
            "postgres://postgres:{}@127.0.0.1:{}/{name}",
            self.password, self.port
        )
    }

    /// The server's temp dir (data, socket, log); removed when the server stops.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The port the server listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a new empty database and returns its URL: one per test keeps tests independent
    /// while they share the server.
    pub fn fresh_database(&self) -> Result<String, String> {
        let n = self.next_db.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}_{n}", std::process::id());
        let port = self.port.to_string();
        run(
            Command::new(self.bin.join("createdb"))
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-w",
                    &name,
                ])
                .env("PGPASSWORD", &self.password)
                .env_remove("PGSERVICE"),
            "createdb",
        )
        .map_err(|e| format!("{e}\n{}", self.log_tail()))?;
        Ok(self.database_url(&name))
    }

    /// The last lines of the server log, for error messages.
    pub fn log_tail(&self) -> String {
        let log = fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let from = lines.len().saturating_sub(20);
        format!("postgres.log (tail):\n{}", lines[from..].join("\n"))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// A command for a server binary, run as the `postgres` user when we are root.
    fn server_command(&self, program: &str) -> Command {
        let program = self.bin.join(program);
        if self.as_postgres_user {
            let mut c = Command::new("runuser");
            c.args(["-u", PG_OS_USER, "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    fn chown_to_server_user(&self, path: &Path) -> Result<(), String> {
        if self.as_postgres_user {
            run(
                Command::new("chown")
                    .arg("-R")
                    .arg(format!("{PG_OS_USER}:"))
                    .arg(path),
                "chown",
            )?;
        }
        Ok(())
    }

    fn init(&self) -> Result<(), String> {
        let pwfile = self.dir.join("pwfile");
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&pwfile)
            .and_then(|mut f| f.write_all(self.password.as_bytes()))
            .map_err(|e| format!("cannot write {}: {e}", pwfile.display()))?;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(self.dir.join("sock"))
            .map_err(|e| format!("cannot create the socket dir: {e}"))?;
        self.chown_to_server_user(&self.dir)?;
        let result = run(
            self.server_command("initdb")
                .arg("-D")
                .arg(self.data_dir())
                .args(["-U", "postgres", "-E", "UTF8", "--locale=C"])
                .arg(format!("--pwfile={}", pwfile.display()))
                .args([
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--no-sync",
                    "--no-instructions",
                ]),
            "initdb",
        );
        let _ = fs::remove_file(&pwfile);
        result.map(|_| ())
    }

    /// The process that stops the server when this process is gone (see the module doc).
    fn spawn_watchdog(&self) -> Result<Child, String> {
        const SCRIPT: &str = r#"trap '' INT HUP TERM QUIT PIPE
read _ignored || true
if [ "$3" = yes ]; then
  runuser -u postgres -- "$2" -D "$1/data" -m immediate stop
else
  "$2" -D "$1/data" -m immediate stop
fi
rm -rf -- "$1"
"#;
        Command::new("sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("intentgate-pg-watchdog")
            .arg(&self.dir)
            .arg(self.bin.join("pg_ctl"))
            .arg(if self.as_postgres_user { "yes" } else { "no" })
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start the PostgreSQL watchdog (sh): {e}"))
    }

    fn launch(&mut self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            self.port = free_port()?;
            let sock = self.dir.join("sock");
            let sock = sock.to_string_lossy();
            if sock.contains('\'') {
                return Err(format!("the temp dir path {sock:?} contains a quote"));
            }
            let options = format!(
                "-c listen_addresses=127.0.0.1 -p {} -k '{sock}' -c fsync=off \
                 -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 \
                 -c shared_buffers=32MB",
                self.port
            );
            let started = run(
                self.server_command("pg_ctl")
                    .arg("-D")
                    .arg(self.data_dir())
                    .arg("-l")
                    .arg(self.dir.join("postgres.log"))
                    .args(["-w", "-t", "60", "-o", &options, "start"]),
                "pg_ctl start",
            );
            match started {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{e}\n{}", self.log_tail()),
            }
        }
        Err(format!(
            "PostgreSQL did not start after {START_ATTEMPTS} attempts: {last}"
        ))
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        match self.watchdog.take() {
            Some(mut watchdog) => {
                // EOF on its stdin: the watchdog stops the server and removes the directory.
                drop(watchdog.stdin.take());
                let _ = watchdog.wait();
            }
            None => {
                let _ = self
                    .server_command("pg_ctl")
                    .arg("-D")
                    .arg(self.data_dir())
                    .args(["-m", "immediate", "stop"])
                    .stdin(Stdio::null())
                    .output();
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs a command to completion; an error carries its status and output.
fn run(cmd: &mut Command, what: &str) -> Result<Output, String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The directory holding `initdb`, `pg_ctl`, `postgres` and `createdb`: from PATH (symlinks
/// resolved, so the sibling binaries are found) or the newest `/usr/lib/postgresql/*/bin`.
fn find_bin_dir() -> Result<PathBuf, String> {
    let complete = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres", "createdb"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if !dir.join("initdb").is_file() || !dir.join("pg_ctl").is_file() {
                continue;
            }
            if let Some(real) = fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .filter(|d| complete(d))
            {
                return Ok(real);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            complete(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        format!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres, createdb) were not found on \
             PATH or under /usr/lib/postgresql/*/bin; {PACKAGE_HINT}"
        )
    })
}

/// The effective uid, from /proc/self/status (falls back to `id -u`).
fn effective_uid() -> Result<u32, String> {
    if let Ok(status) = fs::read_to_string("/proc/self/status")
        && let Some(euid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
    {
        return Ok(euid);
    }
    let out = run(Command::new("id").arg("-u"), "id -u")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("cannot read the effective uid: {e}"))
}

/// A new private directory under the system temp dir.
fn make_temp_dir() -> Result<PathBuf, String> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let dir = base.join(format!(
            "intentgate-pg-{}-{}-{}",
            std::process::id(),
            TEMP_SEQ.fetch_add(1, Ordering::Relaxed),
            &random_hex()[..8]
        ));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(format!("cannot create {}: {e}", dir.display())),
        }
    }
    Err(format!("cannot create a temp dir under {}", base.display()))
}

/// A loopback port that was free a moment ago.
fn free_port() -> Result<u16, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("cannot find a free loopback port: {e}"))
}

/// 128 random bits as hex (std's `RandomState` is seeded from the OS).
fn random_hex() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut out = String::with_capacity(32);
    for i in 0..2u64 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(nanos);
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

/// The `host:port` of a `postgres://user:password@host:port/db` URL.
pub fn host_port(url: &str) -> Option<String> {
    let after_scheme = url.split_once("://")?.1;
    let authority = after_scheme.split('/').next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    host_port.contains(':').then(|| host_port.to_owned())
}

/// A loopback TCP proxy that can stop forwarding without closing anything: a stalled disk or a
/// black-holed database as its client sees it. While paused, bytes are read into the proxy and
/// held; on resume they flow on. Threads and blocking sockets only (std).
#[derive(Debug)]
pub struct StallProxy {
    addr: std::net::SocketAddr,
    paused: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl StallProxy {
    /// Starts forwarding every connection on a new loopback port to `target` (`host:port`).
    pub fn start(target: &str) -> Result<StallProxy, String> {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;
        let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("proxy bind: {e}"))?;
        let addr = listener
            .local_addr()
            .map_err(|e| format!("proxy addr: {e}"))?;
        let paused = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let target = target.to_owned();
        let (p, s) = (paused.clone(), stop.clone());
        std::thread::Builder::new()
            .name("stall-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if s.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    let Ok(server) = std::net::TcpStream::connect(&target) else {
                        continue;
                    };
                    for (from, to) in [(&client, &server), (&server, &client)] {
                        let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                            continue;
                        };
                        let (p, s) = (p.clone(), s.clone());
                        let _ = std::thread::Builder::new()
                            .name("stall-proxy-pump".into())
                            .spawn(move || pump(from, to, &p, &s));
                    }
                }
            })
            .map_err(|e| format!("proxy thread: {e}"))?;
        Ok(StallProxy { addr, paused, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Stop forwarding (connections stay open, nothing arrives).
    pub fn pause(&self) {
        self.paused.store(true, Ordering::Release);
    }

    /// Forward again, held bytes first.
    pub fn resume(&self) {
        self.paused.store(false, Ordering::Release);
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.paused.store(false, Ordering::Release);
        // Wake the accept loop so it sees `stop`.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Copies `from` to `to`, holding each chunk while paused, until either side closes or `stop`.
fn pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    paused: &std::sync::atomic::AtomicBool,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::Read;
    let _ = from.set_read_timeout(Some(std::time::Duration::from_millis(50)));
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stop.load(Ordering::Acquire) {
            break;
        }
        while paused.load(Ordering::Acquire) {
            if stop.load(Ordering::Acquire) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                while paused.load(Ordering::Acquire) && !stop.load(Ordering::Acquire) {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}
