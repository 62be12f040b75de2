//! `intentgate-bench`: benchmarks that tell the truth about the gateway.
//!
//! ```text
//! cargo run --release -p intentgate-bench -- load     # gateway vs bare proxy, same run
//! cargo run --release -p intentgate-bench -- micro    # per-stage costs
//! cargo run --release -p intentgate-bench -- scale    # throughput vs worker threads and tenants
//! cargo run --release -p intentgate-bench -- swap     # hot swap of a tenant's policy under load
//! ```
//!
//! Every server under test runs in its own child process (this binary re-executed with a
//! `serve-*` subcommand) with its own tokio runtime; the load generator runs in this process on
//! a runtime of `--client-threads` workers. See `BENCHMARKS.md` for what the figures mean and
//! what limits each. Nothing here runs under `cargo test` except the unit tests of the maths.

// The gateway's request futures nest deeply (see the library's crate root).
#![recursion_limit = "256"]

/// The same allocator as the `intentgate` binary: the gateway runs in a child of this one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bare;
mod child;
#[cfg(feature = "gateway")]
mod gateway;
mod inside;
mod loadgen;
#[cfg(feature = "gateway")]
mod micro;
#[cfg_attr(not(feature = "gateway"), allow(dead_code))]
mod pg;
mod stages;
mod stats;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

use child::Server;
use loadgen::{ClientEra, Mode, Outcome, Spec, Target};
use stats::{fmt_ns, median, parse_duration};
use upstream::UpstreamEra;

#[derive(Parser)]
#[command(
    name = "intentgate-bench",
    about = "IntentGate benchmarks: gateway vs bare proxy, per-stage costs, scaling"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
// Parsed once at start: boxing the large variants would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Cmd {
    /// Load benchmark: upstream, bare proxy and gateway (SQLite, PostgreSQL) in one run.
    Load(LoadOpts),
    /// Throughput vs server worker threads and vs tenants (closed loop).
    Scale(ScaleOpts),
    /// MCP revisions: client era (plain, handshake, modern) × upstream era (dual, handshake)
    /// through the gateway, with the bare proxy where it can carry the pair, in one run.
    #[cfg(feature = "gateway")]
    Eras(ErasOpts),
    /// Per-stage micro-benchmarks: token verify, revocation lookup, audit append.
    #[cfg(feature = "gateway")]
    Micro(MicroOpts),
    /// Hot swap of a tenant's policy bundle under load: promote two drafts alternately.
    #[cfg(feature = "gateway")]
    Swap(SwapOpts),
    /// Where the gateway's CPU goes by pipeline stage, from a `load --perf` profile.
    Stages {
        /// A `perf.data` file.
        file: PathBuf,
        /// The run's server CPU µs per call, to turn shares into µs.
        #[arg(long)]
        us_per_call: Option<f64>,
    },
    /// (internal) the fast MCP upstream, in a child process.
    #[command(hide = true)]
    ServeUpstream(ServeSimple),
    /// (internal) the bare reverse proxy, in a child process.
    #[command(hide = true)]
    ServeBare(ServeSimple),
    /// (internal) the gateway, in a child process.
    #[cfg(feature = "gateway")]
    #[command(hide = true)]
    ServeGateway(gateway::ServeGateway),
}

#[derive(Args)]
struct ServeSimple {
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Upstream MCP URL (serve-bare only).
    #[arg(long)]
    upstream: Option<String>,
    /// MCP revisions the upstream speaks (serve-upstream only).
    #[arg(long, value_enum, default_value = "dual")]
    era: UpstreamEra,
}

#[derive(Args, Clone)]
struct Common {
    /// Measurement window of each run.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Warm-up before each run's window (connections open, caches and pools warm).
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    warmup: Duration,
    /// Repetitions of each closed-loop run (systems interleaved; the median is reported).
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Closed-loop concurrency (connections, each with one call in flight).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Agents per tenant, each with its own budgeted token (connection `i` calls with token
    /// `i % (tenants × agents)`): many tokens charged and audited at once, as in production.
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Size of the `text` argument of each call (0: a short sentence).
    #[arg(long, default_value_t = 0)]
    argument_bytes: usize,
    /// Bytes the upstream's `echo` adds to its answer (`pad`), for large results.
    #[arg(long, default_value_t = 0)]
    result_bytes: usize,
    /// tokio worker threads of the load generator (this process).
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// tokio worker threads of the upstream child.
    #[arg(long, default_value_t = 1)]
    upstream_threads: usize,
    /// MCP revision the load generator speaks: plain (header-less JSON-RPC, as the IntentGate
    /// SDKs), handshake (2025-11-25 sessions) or modern (2026-07-28, stateless).
    #[arg(long, value_enum, default_value = "plain")]
    era: ClientEra,
    /// MCP revisions the upstream speaks: dual (both, like `mcp` 2.x) or handshake (only the
    /// 2025-11-25 era with sessions, like `mcp` 1.x).
    #[arg(long, value_enum, default_value = "dual")]
    upstream_era: UpstreamEra,
    /// Pin the server under test to CPU 0 and the load generator and upstream to CPU 1
    /// (`taskset`). Default: unpinned, everything shares both cores.
    #[arg(long)]
    pin: bool,
    /// A run during which other processes used more CPU than this (cores, from `/proc/stat`
    /// minus the rig's own processes) is measured again, up to `--retries` times.
    #[arg(long, default_value_t = 0.25)]
    max_other_cores: f64,
    /// How many times to measure a run again because of foreign load (0: never).
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Where temporary data directories go (must be a real disk for honest fsync figures).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Rego policy of the gateway's default bundle (`--policy-file`; a `NAME_test.rego` beside
    /// it runs at start). Default: the token-scope policy that `intentgate serve --demo` uses.
    #[arg(long, default_value_os_t = default_policy())]
    policy: PathBuf,
    /// One more flag for every gateway started (`intentgate serve`'s own, e.g.
    /// `--gateway-flag=--audit-writer-nice=8`); repeat it for several.
    #[arg(long = "gateway-flag", allow_hyphen_values = true)]
    gateway_flags: Vec<String>,
}

fn default_policy() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies/examples/token_scope.rego")
}

#[derive(Args, Clone)]
struct LoadOpts {
    /// Systems, in order: direct (upstream alone), bare, sqlite, postgres (gateway with that
    /// store, driven with budgeted tokens: `max_calls` + `rate_limit`, as real tokens carry),
    /// sqlite-tools, postgres-tools (the same with tokens that carry only `tools`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,bare,sqlite,sqlite-tools,postgres,postgres-tools"
    )]
    systems: Vec<String>,
    #[command(flatten)]
    common: Common,
    /// tokio worker threads of each server under test (bare proxy and gateway alike).
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Tenants (one token each, connections spread over them).
    #[arg(long, default_value_t = 1)]
    tenants: usize,
    /// Open loop: offer this fraction of each system's closed-loop saturation (0 disables).
    #[arg(long, default_value_t = 0.5)]
    open_fraction: f64,
    /// Open loop: offer this many calls a second to every system instead of a fraction of its
    /// saturation (to compare builds at equal load).
    #[arg(long)]
    open_rate: Option<f64>,
    /// Open loop: most calls in flight (clients available to the pacer).
    #[arg(long, default_value_t = 256)]
    open_connections: usize,
    /// Record a `perf` profile of each gateway process during one extra closed-loop run, into
    /// this directory (needs `perf`).
    #[arg(long)]
    perf: Option<PathBuf>,
}

#[derive(Args, Clone)]
struct ScaleOpts {
    #[command(flatten)]
    common: Common,
    /// Server worker-thread counts to try (bare proxy and gateway/SQLite).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    threads: Vec<usize>,
    /// Tenant counts to try (gateway/SQLite at --server-threads).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    tenants: Vec<usize>,
    /// Server worker threads for the tenant sweep.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Store of the gateway: sqlite or postgres.
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Tenants with their own promoted policy bundle, cumulative steps (gateway memory and
    /// throughput at each; empty to skip).
    #[arg(long, value_delimiter = ',', default_value = "0,16,64,256")]
    bundles: Vec<usize>,
}

#[cfg(feature = "gateway")]
#[derive(Args, Clone)]
struct ErasOpts {
    #[command(flatten)]
    common: Common,
    /// Client revisions to drive.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "plain,handshake,modern"
    )]
    client_eras: Vec<ClientEra>,
    /// Upstream revisions to put behind the gateway (one upstream and one gateway each).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dual,handshake"
    )]
    upstream_eras: Vec<UpstreamEra>,
    /// tokio worker threads of each gateway and bare proxy.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Store of the gateways: sqlite or postgres.
    #[arg(long, default_value = "sqlite")]
    store: String,
    /// Leave out the bare-proxy reference runs.
    #[arg(long)]
    no_bare: bool,
}

#[cfg(feature = "gateway")]
#[derive(Args, Clone)]
struct SwapOpts {
    #[command(flatten)]
    common: Common,
    /// Promote the other draft this often during the window.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    every: Duration,
    /// tokio worker threads of the gateway.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Store of the gateway: sqlite or postgres.
    #[arg(long, default_value = "sqlite")]
    store: String,
}

#[cfg(feature = "gateway")]
#[derive(Args, Clone)]
struct MicroOpts {
    /// Which: fsync, verify, revocation, plugin, audit, metrics, tracing, results (default:
    /// all).
    #[arg(
        value_delimiter = ',',
        default_value = "fsync,verify,revocation,plugin,audit,metrics,tracing,results"
    )]
    which: Vec<String>,
    /// Audit backends.
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    backends: Vec<String>,
    /// Repetitions of each timed batch.
    #[arg(long, default_value_t = 7)]
    reps: usize,
    /// Audit: measurement window per case.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    duration: Duration,
    /// Audit: warm-up per case.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Audit cases as appenders:tenants[:tokens] (without tokens, each call number names its
    /// own token, shared by the appenders at that number).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1:1,16:1,64:1,256:1,1024:1,256:4,256:16"
    )]
    audit_cases: Vec<String>,
    /// tokio worker threads for the micro-benchmarks.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    work_dir: PathBuf,
    /// Rego policy for the plugin micro-benchmark.
    #[arg(long, default_value_os_t = default_policy())]
    policy: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Load(o) => load(o),
        Cmd::Scale(o) => scale(o),
        #[cfg(feature = "gateway")]
        Cmd::Micro(o) => micro_main(o),
        #[cfg(feature = "gateway")]
        Cmd::Swap(o) => swap(o),
        #[cfg(feature = "gateway")]
        Cmd::Eras(o) => eras(o),
        Cmd::Stages { file, us_per_call } => stages::report(&file, us_per_call),
        Cmd::ServeUpstream(o) => serve_simple(o, false),
        Cmd::ServeBare(o) => serve_simple(o, true),
        #[cfg(feature = "gateway")]
        Cmd::ServeGateway(o) => gateway::serve(o),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intentgate-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

fn serve_simple(o: ServeSimple, bare: bool) -> Result<(), String> {
    let rt = runtime(o.worker_threads)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let server = if bare {
            let uri: hyper::Uri = o
                .upstream
                .ok_or("serve-bare needs --upstream")?
                .parse()
                .map_err(|e| format!("--upstream: {e}"))?;
            tokio::spawn(bare::serve(listener, uri))
        } else {
            tokio::spawn(upstream::serve(listener, o.era))
        };
        child::ready_then_wait_for_stdin_eof(addr).await;
        server.abort();
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------------
// Systems under test

/// A system the load generator drives, and what to count as its CPU.
#[derive(Clone)]
struct System {
    name: String,
    label: String,
    addr: std::net::SocketAddr,
    path: &'static str,
    /// Process whose CPU is the server's cost (None: the upstream itself).
    pid: Option<u32>,
    /// Also count PostgreSQL processes as server CPU.
    with_postgres: bool,
    /// The gateway (as opposed to the upstream alone or the bare proxy).
    gateway: bool,
    /// Bearer tokens for this system (empty: the rig's shared ones, for equal request sizes).
    tokens: Vec<String>,
    /// The gateway's superadmin token.
    #[cfg_attr(not(feature = "gateway"), allow(dead_code))]
    admin_token: String,
    /// Index of the upstream it forwards to (in `Rig::upstreams`).
    upstream: usize,
    /// The MCP revision the load generator speaks to it.
    era: ClientEra,
}

/// Children and temporary state of one benchmark run; dropped in reverse order.
struct Rig {
    /// The upstreams (the first is the default one), with the revisions each speaks.
    upstreams: Vec<(UpstreamEra, Server)>,
    servers: Vec<Server>,
    systems: Vec<System>,
    tokens: Vec<String>,
    _pg: Option<pg::PgServer>,
    _dirs: Vec<tempfile::TempDir>,
    cpus_server: Option<&'static str>,
    cpus_client: Option<&'static str>,
    /// The upstream new systems forward to.
    current_upstream: usize,
    /// The revision new systems are driven with.
    era: ClientEra,
    /// The `tools/call` params every call sends (JSON text).
    params: String,
    /// Gateways started from now on annotate results with `_intentgate` (opt-in since issue
    /// 13): the swap benchmark reads each answer's bundle digest there.
    annotate: bool,
}

/// The `echo` call's params: a short sentence unless `--argument-bytes`, and the upstream's
/// padding of its answer (`--result-bytes`).
fn tool_params(common: &Common) -> String {
    let text = match common.argument_bytes {
        0 => "hello from intentgate-bench".to_owned(),
        n => "a".repeat(n),
    };
    let mut args = serde_json::json!({"text": text});
    if common.result_bytes > 0 {
        args["pad"] = serde_json::Value::from(common.result_bytes);
    }
    serde_json::json!({"name": "echo", "arguments": args}).to_string()
}

impl Rig {
    fn new(common: &Common) -> Result<Rig, String> {
        let (cpus_server, cpus_client) = if common.pin {
            (Some("0"), Some("1"))
        } else {
            (None, None)
        };
        if let Some(c) = cpus_client {
            pin_self(c)?;
        }
        let mut rig = Rig {
            upstreams: Vec::new(),
            servers: Vec::new(),
            systems: Vec::new(),
            tokens: Vec::new(),
            _pg: None,
            _dirs: Vec::new(),
            cpus_server,
            cpus_client,
            current_upstream: 0,
            era: common.era,
            params: tool_params(common),
            annotate: false,
        };
        rig.add_upstream(common.upstream_era, common)?;
        rig.current_upstream = 0;
        Ok(rig)
    }

    /// Starts another upstream speaking `era`; systems added from now on forward to it.
    fn add_upstream(&mut self, era: UpstreamEra, common: &Common) -> Result<usize, String> {
        let s = Server::spawn(
            &format!("upstream ({})", era.as_str()),
            &[
                "serve-upstream".into(),
                "--worker-threads".into(),
                common.upstream_threads.to_string(),
                "--era".into(),
                era.as_str().into(),
            ],
            self.cpus_client,
        )?;
        self.upstreams.push((era, s));
        self.current_upstream = self.upstreams.len() - 1;
        Ok(self.current_upstream)
    }

    fn upstream_url(&self) -> String {
        format!(
            "http://{}/mcp",
            self.upstreams[self.current_upstream].1.addr
        )
    }

    /// Another view of system `i`, driven in `era` (same process).
    fn alias(&mut self, i: usize, era: ClientEra) -> usize {
        let mut s = self.systems[i].clone();
        s.era = era;
        self.systems.push(s);
        self.systems.len() - 1
    }

    fn add(
        &mut self,
        name: &str,
        server_threads: usize,
        tenants: usize,
        common: &Common,
    ) -> Result<(), String> {
        match name {
            "direct" => {
                self.systems.push(System {
                    name: "direct".into(),
                    label: "upstream alone (no proxy)".into(),
                    addr: self.upstreams[self.current_upstream].1.addr,
                    path: "/mcp",
                    pid: None,
                    with_postgres: false,
                    gateway: false,
                    tokens: Vec::new(),
                    admin_token: String::new(),
                    upstream: self.current_upstream,
                    era: self.era,
                });
            }
            "bare" => {
                let s = Server::spawn(
                    "bare proxy",
                    &[
                        "serve-bare".into(),
                        "--worker-threads".into(),
                        server_threads.to_string(),
                        "--upstream".into(),
                        self.upstream_url(),
                    ],
                    self.cpus_server,
                )?;
                self.systems.push(System {
                    name: format!("bare/{server_threads}t"),
                    label: "bare proxy (same hyper stack, no checks)".into(),
                    addr: s.addr,
                    path: "/v1/mcp",
                    pid: Some(s.pid()),
                    with_postgres: false,
                    gateway: false,
                    tokens: Vec::new(),
                    admin_token: String::new(),
                    upstream: self.current_upstream,
                    era: self.era,
                });
                self.servers.push(s);
            }
            "sqlite" | "postgres" | "sqlite-tools" | "postgres-tools" => {
                self.add_gateway(name, server_threads, tenants, common)?
            }
            other => {
                return Err(format!(
                    "unknown system {other:?} (direct, bare, sqlite, sqlite-tools, postgres, postgres-tools)"
                ));
            }
        }
        Ok(())
    }

    #[cfg(not(feature = "gateway"))]
    fn add_gateway(&mut self, name: &str, _: usize, _: usize, _: &Common) -> Result<(), String> {
        Err(format!(
            "system {name} needs the gateway: build with the default `gateway` feature"
        ))
    }

    #[cfg(feature = "gateway")]
    fn add_gateway(
        &mut self,
        system: &str,
        server_threads: usize,
        tenants: usize,
        common: &Common,
    ) -> Result<(), String> {
        let budgeted = !system.ends_with("-tools");
        let store = system.trim_end_matches("-tools");
        let root = common.work_dir.as_path();
        let dir = tempfile::Builder::new()
            .prefix("intentgate-bench-gw-")
            .tempdir_in(root)
            .map_err(|e| format!("tempdir in {}: {e}", root.display()))?;
        let key = gateway::new_master_key()?;
        let admin_token = format!(
            "bench-admin-{}",
            gateway::new_master_key()?
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(24)
                .collect::<String>()
        );
        let mut args: Vec<String> = vec![
            "serve-gateway".into(),
            "--worker-threads".into(),
            server_threads.to_string(),
            "--addr".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            dir.path().display().to_string(),
            // `--flag=value`: a URL-safe base64 key may start with `-`.
            format!("--master-key={key}"),
            format!("--admin-token={admin_token}"),
            "--upstream-url".into(),
            self.upstream_url(),
            "--policy-file".into(),
            common.policy.display().to_string(),
        ];
        if self.annotate {
            args.push("--annotate-results".into());
        }
        args.extend(common.gateway_flags.iter().cloned());
        let label = if store == "postgres" {
            if self._pg.is_none() {
                self._pg = Some(pg::PgServer::start(root)?);
            }
            let url = self._pg.as_ref().map(|p| p.url.clone()).unwrap_or_default();
            args.push("--postgres-url".into());
            args.push(url);
            "gateway, full pipeline, PostgreSQL audit"
        } else {
            "gateway, full pipeline, SQLite audit"
        };
        let label = if budgeted {
            format!("{label}, max_calls + rate_limit token")
        } else {
            format!("{label}, tools-only token")
        };
        let s = Server::spawn(&format!("gateway ({store})"), &args, self.cpus_server)?;
        // Each gateway has its own master key, hence its own tokens. Systems without a key
        // (direct, bare) send the first gateway's tokens, so every request has the same size.
        let tokens = gateway::mint_tokens(&key, tenants, common.agents, "echo", budgeted)?;
        if self.tokens.is_empty() {
            self.tokens = tokens.clone();
        }
        self.systems.push(System {
            name: format!("{system}/{server_threads}t"),
            label,
            addr: s.addr,
            path: "/v1/mcp",
            pid: Some(s.pid()),
            with_postgres: store == "postgres",
            gateway: true,
            tokens,
            admin_token,
            upstream: self.current_upstream,
            era: self.era,
        });
        self.servers.push(s);
        self._dirs.push(dir);
        Ok(())
    }

    fn target(&self, i: usize) -> Target {
        let s = &self.systems[i];
        let tokens = if s.tokens.is_empty() {
            self.tokens.clone()
        } else {
            s.tokens.clone()
        };
        Target {
            addr: s.addr,
            path: s.path.to_owned(),
            tokens,
            params: self.params.clone(),
            era: s.era,
        }
    }
}

fn pin_self(cpus: &str) -> Result<(), String> {
    let pid = std::process::id().to_string();
    let ok = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid])
        .stdout(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err("taskset failed (needed for --pin)".into())
    }
}

// ---------------------------------------------------------------------------------------------
// CPU accounting

#[derive(Clone, Copy, Default)]
struct Cpu {
    server: f64,
    upstream: f64,
    client: f64,
    postgres: f64,
    busy: f64,
}

fn cpu_snapshot(rig: &Rig, sys: &System) -> Cpu {
    let busy = child::machine_cpu_secs().map_or(0.0, |(busy, _)| busy);
    Cpu {
        server: sys.pid.and_then(child::process_cpu_secs).unwrap_or(0.0),
        upstream: child::process_cpu_secs(rig.upstreams[sys.upstream].1.pid()).unwrap_or(0.0),
        client: child::process_cpu_secs(std::process::id()).unwrap_or(0.0),
        postgres: if sys.with_postgres {
            child::cpu_secs_by_comm("postgres")
        } else {
            0.0
        },
        busy,
    }
}

/// CPU used during a window, in core-seconds.
#[derive(Clone, Copy, Default)]
struct CpuUse {
    server: f64,
    upstream: f64,
    client: f64,
    /// Busy time of processes that are not part of the benchmark (other work on the machine).
    other: f64,
    window: f64,
}

fn cpu_delta(a: Cpu, b: Cpu, window: f64) -> CpuUse {
    let server = (b.server - a.server) + (b.postgres - a.postgres);
    let upstream = b.upstream - a.upstream;
    let client = b.client - a.client;
    let busy = b.busy - a.busy;
    CpuUse {
        server,
        upstream,
        client,
        other: (busy - server - upstream - client).max(0.0),
        window,
    }
}

struct Run {
    system: usize,
    outcome: Outcome,
    cpu: CpuUse,
    /// The gateway's `/metrics` over the window (gateways only).
    inside: Option<inside::Breakdown>,
}

/// Runs one measurement against system `i`, sampling CPU over the window.
/// Runs one measurement against system `i`; when other work on the machine took more than
/// `--max-other-cores` during the window, waits for the machine to calm down and measures
/// again (up to `--retries` times), keeping the run with the least foreign load.
fn measure(
    rt: &tokio::runtime::Runtime,
    rig: &Rig,
    i: usize,
    common: &Common,
    mode: Mode,
    connections: usize,
) -> Run {
    let mut best = measure_once(rt, rig, i, common, mode, connections);
    for attempt in 1..=common.retries {
        let other = best.cpu.other / best.cpu.window.max(1e-9);
        if other <= common.max_other_cores {
            break;
        }
        eprintln!(
            "note: {}: other processes used {other:.2} cores during the window; measuring again ({attempt}/{})",
            rig.systems[i].name, common.retries
        );
        wait_for_quiet(common.max_other_cores, Duration::from_secs(60));
        let r = measure_once(rt, rig, i, common, mode, connections);
        if r.cpu.other < best.cpu.other {
            best = r;
        }
    }
    best
}

/// Waits (at most `within`) until the machine's busy CPU over one second is below `cores`.
fn wait_for_quiet(cores: f64, within: Duration) {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let a = child::machine_cpu_secs().map_or(0.0, |(b, _)| b);
        std::thread::sleep(Duration::from_secs(1));
        let b = child::machine_cpu_secs().map_or(0.0, |(b, _)| b);
        // The idle servers of the rig use a few hundredths of a core.
        if b - a <= cores + 0.1 {
            return;
        }
    }
}

fn measure_once(
    rt: &tokio::runtime::Runtime,
    rig: &Rig,
    i: usize,
    common: &Common,
    mode: Mode,
    connections: usize,
) -> Run {
    let spec = Spec {
        target: rig.target(i),
        connections,
        warmup: common.warmup,
        duration: common.duration,
        mode,
        record: false,
    };
    let sys = &rig.systems[i];
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = {
        let warmup = common.warmup;
        let duration = common.duration;
        let start = Instant::now();
        std::thread::scope(|s| {
            s.spawn(|| {
                let scrape = || {
                    (sys.gateway && !sys.admin_token.is_empty())
                        .then(|| {
                            rt.handle()
                                .block_on(inside::scrape(sys.addr, &sys.admin_token))
                        })
                        .flatten()
                };
                std::thread::sleep(warmup.saturating_sub(start.elapsed()));
                let a = cpu_snapshot(rig, sys);
                let seen_a = scrape();
                std::thread::sleep((warmup + duration).saturating_sub(start.elapsed()));
                let b = cpu_snapshot(rig, sys);
                let seen_b = scrape();
                let inside = seen_a
                    .zip(seen_b)
                    .and_then(|(a, b)| inside::between(&a, &b));
                let _ = tx.send((a, b, inside));
            });
            rt.block_on(loadgen::run(&spec))
        })
    };
    let (a, b, inside) = rx.recv().unwrap_or_default();
    let cpu = cpu_delta(a, b, common.duration.as_secs_f64());
    Run {
        system: i,
        outcome,
        cpu,
        inside,
    }
}

/// Where an average call's time went in each gateway run, by the gateway's own clocks.
fn print_inside<'a>(rig: &Rig, runs: impl Iterator<Item = &'a Run>) {
    let rows: Vec<String> = runs
        .filter_map(|r| {
            let b = r.inside.as_ref()?;
            let load = match r.outcome.mode {
                Mode::Closed => format!("closed c={}", r.outcome.connections),
                Mode::Open { rate } => format!("open {rate:.0}/s"),
            };
            Some(inside::row(&rig.systems[r.system].name, &load, b))
        })
        .collect();
    if rows.is_empty() {
        return;
    }
    println!(
        "\n## where a call's time goes (the gateway's /metrics over each window: means)\n\n{}",
        inside::header()
    );
    for row in rows {
        println!("{row}");
    }
}

fn us_per_call(cpu_secs: f64, calls: u64) -> String {
    if calls == 0 {
        return "-".into();
    }
    format!("{:.1}", cpu_secs / calls as f64 * 1e6)
}

fn print_run(rig: &Rig, r: &Run, rep: Option<usize>) {
    let o = &r.outcome;
    let mode = match o.mode {
        Mode::Closed => format!("closed c={}", o.connections),
        Mode::Open { rate } => format!("open {rate:.0}/s"),
    };
    let w = r.cpu.window.max(1e-9);
    println!(
        "| {} | {} | {} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        rig.systems[r.system].name,
        rep.map(|r| r.to_string()).unwrap_or_else(|| "-".into()),
        mode,
        o.throughput(),
        fmt_ns(o.latency.p50),
        fmt_ns(o.latency.p99),
        fmt_ns(o.latency.p999),
        fmt_ns(o.latency.max),
        o.errors,
        us_per_call(r.cpu.server, o.ok),
        r.cpu.server / w,
        r.cpu.client / w,
        r.cpu.upstream / w,
        r.cpu.other / w,
    );
    for e in &o.error_examples {
        println!("|   error example: {} |", e.replace('|', "/"));
    }
}

const RUN_HEADER: &str = "| system | rep | load | calls/s | p50 | p99 | p99.9 | max | errors | server CPU µs/call | server cores | loadgen cores | upstream cores | other cores |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn print_machine(common: &Common, extra: &str) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines().next().map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .unwrap_or("0")
                    .parse::<f64>()
                    .unwrap_or(0.0)
                    / 1024.0
                    / 1024.0
            })
        })
        .unwrap_or(0.0);
    println!(
        "machine: {cpu}, {cores} cores, {mem:.0} GiB; load average {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "settings: warm-up {:?}, window {:?}, {} reps, client threads {}, upstream threads {}, pinned {}, client era {}, upstream era {}{extra}",
        common.warmup,
        common.duration,
        common.reps,
        common.client_threads,
        common.upstream_threads,
        common.pin,
        common.era.as_str(),
        common.upstream_era.as_str()
    );
}

// ---------------------------------------------------------------------------------------------
// load

fn check_systems(rt: &tokio::runtime::Runtime, rig: &Rig) -> Result<(), String> {
    for (i, s) in rig.systems.iter().enumerate() {
        if s.gateway {
            rt.block_on(loadgen::wait_healthy(s.addr, Duration::from_secs(60)))?;
        }
        rt.block_on(loadgen::probe(&rig.target(i))).map_err(|e| {
            format!(
                "{} ({}) does not answer a tools/call correctly: {e}",
                s.name, s.label
            )
        })?;
    }
    Ok(())
}

fn load(o: LoadOpts) -> Result<(), String> {
    let common = &o.common;
    let mut systems = o.systems.clone();
    if systems.iter().any(|s| s == "postgres") && !pg::PgServer::available() {
        eprintln!(
            "note: no PostgreSQL binaries on this machine; skipping the PostgreSQL configuration"
        );
        systems.retain(|s| s != "postgres");
    }
    let mut rig = Rig::new(common)?;
    for s in &systems {
        rig.add(s, o.server_threads, o.tenants, common)?;
    }
    let rt = runtime(common.client_threads)?;
    check_systems(&rt, &rig)?;

    println!("# intentgate-bench load\n");
    print_machine(
        common,
        &format!(
            ", server threads {}, tenants {}, agents (tokens) per tenant {}",
            o.server_threads, o.tenants, common.agents
        ),
    );
    println!("systems (idle CPU: the server's own CPU over 2 s without load):");
    for s in &rig.systems {
        let idle = s.pid.map(|pid| {
            let a = child::process_cpu_secs(pid).unwrap_or(0.0);
            std::thread::sleep(Duration::from_secs(2));
            (child::process_cpu_secs(pid).unwrap_or(0.0) - a) / 2.0
        });
        match idle {
            Some(c) => println!(
                "- {}: {} at {}; idle CPU {:.3} cores",
                s.name, s.label, s.addr, c
            ),
            None => println!("- {}: {} at {}", s.name, s.label, s.addr),
        }
    }
    println!(
        "\n## closed loop, {} connections\n\n{RUN_HEADER}",
        common.concurrency
    );
    let mut runs: Vec<Run> = Vec::new();
    for rep in 1..=common.reps.max(1) {
        for i in 0..rig.systems.len() {
            let r = measure(&rt, &rig, i, common, Mode::Closed, common.concurrency);
            print_run(&rig, &r, Some(rep));
            runs.push(r);
        }
    }

    // Summary: the median repetition of each system.
    let bare = rig.systems.iter().position(|s| s.name.starts_with("bare"));
    let median_run = |i: usize| -> Option<&Run> {
        let mut mine: Vec<&Run> = runs.iter().filter(|r| r.system == i).collect();
        mine.sort_by(|a, b| a.outcome.throughput().total_cmp(&b.outcome.throughput()));
        mine.get(mine.len() / 2).copied()
    };
    let sat: Vec<f64> = (0..rig.systems.len())
        .map(|i| {
            median(
                &runs
                    .iter()
                    .filter(|r| r.system == i)
                    .map(|r| r.outcome.throughput())
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let cpu_per_call = |i: usize| -> f64 {
        let (cpu, calls) = runs
            .iter()
            .filter(|r| r.system == i)
            .fold((0.0, 0u64), |(c, n), r| {
                (c + r.cpu.server, n + r.outcome.ok)
            });
        if calls == 0 {
            f64::NAN
        } else {
            cpu / calls as f64 * 1e6
        }
    };
    println!("\n## summary (median of {} reps)\n", common.reps.max(1));
    println!(
        "| system | calls/s | vs bare | p50 | p99 | p99.9 | errors (all reps) | server CPU µs/call | CPU vs bare |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for i in 0..rig.systems.len() {
        let Some(m) = median_run(i) else { continue };
        let (ratio, cpu_ratio) = match bare {
            Some(b) => (
                format!("{:.0}%", sat[i] / sat[b] * 100.0),
                format!("{:.2}×", cpu_per_call(i) / cpu_per_call(b)),
            ),
            None => ("-".into(), "-".into()),
        };
        let cpu = cpu_per_call(i);
        println!(
            "| {} | {:.0} | {ratio} | {} | {} | {} | {} | {} | {} |",
            rig.systems[i].name,
            sat[i],
            fmt_ns(m.outcome.latency.p50),
            fmt_ns(m.outcome.latency.p99),
            fmt_ns(m.outcome.latency.p999),
            runs.iter()
                .filter(|r| r.system == i)
                .map(|r| r.outcome.errors)
                .sum::<u64>(),
            if cpu.is_finite() && rig.systems[i].pid.is_some() {
                format!("{cpu:.1}")
            } else {
                "-".into()
            },
            if rig.systems[i].pid.is_some() {
                cpu_ratio
            } else {
                "-".into()
            },
        );
    }

    // Open loop at a fraction of each system's saturation; the bare proxy also at each
    // gateway's rate, so latencies compare at equal offered load.
    let mut open_runs: Vec<Run> = Vec::new();
    if o.open_fraction > 0.0 {
        println!(
            "\n## open loop at {:.0}% of each gateway's closed-loop saturation (latency from the scheduled send time)\n\n{RUN_HEADER}",
            o.open_fraction * 100.0
        );
        for (i, &saturation) in sat.iter().enumerate() {
            let is_gw = rig.systems[i].gateway;
            if !is_gw && rig.systems.iter().any(|s| s.gateway) {
                continue;
            }
            let rate = o.open_rate.unwrap_or(saturation * o.open_fraction).max(1.0);
            let r = measure(
                &rt,
                &rig,
                i,
                common,
                Mode::Open { rate },
                o.open_connections,
            );
            print_run(&rig, &r, None);
            let p99 = r.outcome.latency.p99;
            open_runs.push(r);
            if let Some(b) = bare.filter(|_| is_gw) {
                let rb = measure(
                    &rt,
                    &rig,
                    b,
                    common,
                    Mode::Open { rate },
                    o.open_connections,
                );
                print_run(&rig, &rb, None);
            }
            if is_gw {
                println!(
                    "|   goal p99 ≤ 2 ms at {:.0}% of saturation: {} ({}) |",
                    o.open_fraction * 100.0,
                    if p99 <= 2_000_000 { "met" } else { "NOT met" },
                    fmt_ns(p99)
                );
            }
        }
    }

    print_inside(&rig, runs.iter().chain(&open_runs));

    if let Some(b) = bare {
        println!("\n## goals\n");
        for i in 0..rig.systems.len() {
            if rig.systems[i].gateway {
                let pct = sat[i] / sat[b] * 100.0;
                println!(
                    "- {}: {:.0}% of bare-proxy throughput (goal ≥ 50%): {}",
                    rig.systems[i].name,
                    pct,
                    if pct >= 50.0 { "met" } else { "NOT met" }
                );
            }
        }
    }

    if let Some(dir) = &o.perf {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        println!("\n## profiles (perf record, one extra closed-loop run per gateway)\n");
        for i in 0..rig.systems.len() {
            let Some(pid) = rig.systems[i].pid.filter(|_| rig.systems[i].gateway) else {
                continue;
            };
            let file = dir.join(format!(
                "{}.perf.data",
                rig.systems[i].name.replace('/', "-")
            ));
            let secs = (common.warmup + common.duration).as_secs_f64();
            let mut perf = std::process::Command::new("perf")
                .args([
                    "record",
                    "-F",
                    "499",
                    "--call-graph",
                    "dwarf,16384",
                    "-p",
                    &pid.to_string(),
                    "-o",
                ])
                .arg(&file)
                .args(["--", "sleep", &format!("{:.1}", secs)])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn();
            // Start perf during the warm-up so it covers the window.
            let r = measure(&rt, &rig, i, common, Mode::Closed, common.concurrency);
            if let Ok(p) = perf.as_mut() {
                let _ = p.wait();
            }
            print_run(&rig, &r, None);
            println!("|   profile: {} |", file.display());
        }
    }
    drop(rig);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// scale

fn scale(o: ScaleOpts) -> Result<(), String> {
    let common = &o.common;
    let rt = runtime(common.client_threads)?;
    println!("# intentgate-bench scale\n");
    print_machine(common, &format!(", gateway store {}", o.store));
    println!(
        "\n## closed loop vs server worker threads, {} connections\n\n{RUN_HEADER}",
        common.concurrency
    );
    let mut rows = Vec::new();
    for &t in &o.threads {
        let mut rig = Rig::new(common)?;
        rig.add("bare", t, 1, common)?;
        rig.add(&o.store, t, 1, common)?;
        check_systems(&rt, &rig)?;
        let mut tput = [Vec::new(), Vec::new()];
        for rep in 1..=common.reps.max(1) {
            for (i, tp) in tput.iter_mut().enumerate() {
                let r = measure(&rt, &rig, i, common, Mode::Closed, common.concurrency);
                print_run(&rig, &r, Some(rep));
                tp.push(r.outcome.throughput());
            }
        }
        rows.push((format!("{t} threads"), median(&tput[0]), median(&tput[1])));
    }
    println!(
        "\n## closed loop vs tenants ({} server threads)\n\n{RUN_HEADER}",
        o.server_threads
    );
    for &n in &o.tenants {
        let mut rig = Rig::new(common)?;
        rig.add(&o.store, o.server_threads, n, common)?;
        check_systems(&rt, &rig)?;
        let mut tput = Vec::new();
        for rep in 1..=common.reps.max(1) {
            let r = measure(&rt, &rig, 0, common, Mode::Closed, common.concurrency);
            print_run(&rig, &r, Some(rep));
            tput.push(r.outcome.throughput());
        }
        rows.push((
            format!("{n} tenants, {} threads", o.server_threads),
            f64::NAN,
            median(&tput),
        ));
    }
    #[cfg(feature = "gateway")]
    if !o.bundles.is_empty() {
        scale_bundles(&o, &rt)?;
    }
    println!(
        "\n## summary (median calls/s)\n\n| configuration | bare proxy | gateway ({}) | ratio |\n|---|---:|---:|---:|",
        o.store
    );
    for (label, b, g) in rows {
        let (bs, ratio) = if b.is_finite() {
            (format!("{b:.0}"), format!("{:.0}%", g / b * 100.0))
        } else {
            ("-".into(), "-".into())
        };
        println!("| {label} | {bs} | {g:.0} | {ratio} |");
    }
    Ok(())
}

/// Gateway memory and throughput as tenants get their own promoted policy bundle.
#[cfg(feature = "gateway")]
fn scale_bundles(o: &ScaleOpts, rt: &tokio::runtime::Runtime) -> Result<(), String> {
    use hyper::Method;
    let common = &o.common;
    let most = o.bundles.iter().copied().max().unwrap_or(0).max(1);
    let mut rig = Rig::new(common)?;
    rig.add(&o.store, o.server_threads, most, common)?;
    let all_tokens = rig.systems[0].tokens.clone();
    rig.systems[0].tokens.truncate(1);
    check_systems(rt, &rig)?;
    let (addr, admin, pid) = (
        rig.systems[0].addr,
        rig.systems[0].admin_token.clone(),
        rig.systems[0].pid.unwrap_or(0),
    );
    let source = std::fs::read_to_string(&common.policy)
        .map_err(|e| format!("{}: {e}", common.policy.display()))?;
    println!(
        "\n## tenants with their own promoted bundle ({} server threads; each bundle: the default policy plus a per-tenant comment, so its own digest; a tenant with a promoted bundle also keeps its previous one built for rollback)\n",
        o.server_threads
    );
    println!(
        "| tenants with own bundle | admin time to draft + promote the step | gateway RSS | RSS per bundle since 0 | tenants driven | calls/s | p99 | errors |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let mut loaded = 0usize;
    let mut rss0: Option<u64> = None;
    let mut steps = o.bundles.clone();
    steps.sort_unstable();
    for &n in &steps {
        let t = Instant::now();
        let load_one = |k: usize| -> Result<(), String> {
            let tenant = format!("bench-{k}");
            let body = serde_json::json!({"rego_source": format!("{source}\n# bench tenant {k}\n"), "name": format!("scale-{k}")}).to_string();
            let (status, reply) = rt.block_on(loadgen::admin(
                addr,
                Method::POST,
                &format!("/v1/admin/policies/drafts?tenant={tenant}"),
                &admin,
                &body,
            ))?;
            let v: serde_json::Value =
                serde_json::from_slice(&reply).map_err(|e| format!("draft: HTTP {status}: {e}"))?;
            let id = v.get("id").and_then(|i| i.as_str()).ok_or_else(|| {
                format!(
                    "draft for {tenant}: HTTP {status}: {}",
                    String::from_utf8_lossy(&reply)
                )
            })?;
            let body = serde_json::json!({"draft_id": id}).to_string();
            let (status, reply) = rt.block_on(loadgen::admin(
                addr,
                Method::POST,
                &format!("/v1/admin/policies/active?tenant={tenant}"),
                &admin,
                &body,
            ))?;
            if !status.is_success() {
                return Err(format!(
                    "promote for {tenant}: HTTP {status}: {}",
                    String::from_utf8_lossy(&reply)
                ));
            }
            Ok(())
        };
        let mut refused = None;
        while loaded < n {
            if let Err(e) = load_one(loaded) {
                refused = Some(e);
                break;
            }
            loaded += 1;
        }
        let n = loaded;
        let admin_time = t.elapsed();
        // Drive the loaded tenants (up to one per connection; tenant 0 when none is loaded).
        rig.systems[0].tokens = all_tokens[..n.clamp(1, common.concurrency)].to_vec();
        let r = measure(rt, &rig, 0, common, Mode::Closed, common.concurrency);
        let rss = child::process_rss_kib(pid).unwrap_or(0);
        let base = *rss0.get_or_insert(rss);
        let per = if n > 0 {
            format!("{:.0} KiB", (rss as f64 - base as f64) / n as f64)
        } else {
            "-".into()
        };
        println!(
            "| {n} | {:.2}s | {:.1} MiB | {per} | {} | {:.0} | {} | {} |",
            admin_time.as_secs_f64(),
            rss as f64 / 1024.0,
            rig.systems[0].tokens.len(),
            r.outcome.throughput(),
            fmt_ns(r.outcome.latency.p99),
            r.outcome.errors
        );
        if let Some(e) = refused {
            println!(
                "\nthe gateway refused the next bundle (tenant {n} would have been the {}th): {e}",
                n + 1
            );
            break;
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// eras

/// Whether the bare proxy (which translates nothing) can carry a client era to an upstream era.
fn bare_carries(client: ClientEra, upstream: UpstreamEra) -> bool {
    upstream == UpstreamEra::Dual || client == ClientEra::Handshake
}

#[cfg(feature = "gateway")]
fn eras(o: ErasOpts) -> Result<(), String> {
    let mut common = o.common.clone();
    let first_upstream = *o.upstream_eras.first().ok_or("--upstream-eras is empty")?;
    let first_client = *o.client_eras.first().ok_or("--client-eras is empty")?;
    common.upstream_era = first_upstream;
    common.era = first_client;
    let common = &common;
    let mut rig = Rig::new(common)?;
    // (client era, upstream era, gateway system, bare system)
    let mut cells: Vec<(ClientEra, UpstreamEra, usize, Option<usize>)> = Vec::new();
    for (k, &u) in o.upstream_eras.iter().enumerate() {
        if k > 0 {
            rig.add_upstream(u, common)?;
        }
        rig.era = first_client;
        let g = rig.systems.len();
        rig.add(&o.store, o.server_threads, 1, common)?;
        let b = if o.no_bare {
            None
        } else {
            rig.add("bare", o.server_threads, 1, common)?;
            Some(rig.systems.len() - 1)
        };
        for (j, &c) in o.client_eras.iter().enumerate() {
            let gi = if j == 0 { g } else { rig.alias(g, c) };
            let bi = b
                .filter(|_| bare_carries(c, u))
                .map(|b| if j == 0 { b } else { rig.alias(b, c) });
            for i in [Some(gi), bi].into_iter().flatten() {
                let s = &mut rig.systems[i];
                let kind = if s.gateway { o.store.as_str() } else { "bare" };
                s.name = format!("{kind} {}→{}", c.as_str(), u.as_str());
            }
            cells.push((c, u, gi, bi));
        }
    }
    // Only the cells' systems are driven (a bare proxy in front of a handshake-only upstream
    // exists for the handshake client alone).
    let measured: Vec<usize> = cells
        .iter()
        .flat_map(|&(_, _, g, b)| [Some(g), b])
        .flatten()
        .collect();
    let rt = runtime(common.client_threads)?;
    for &i in &measured {
        let s = &rig.systems[i];
        if s.gateway {
            rt.block_on(loadgen::wait_healthy(s.addr, Duration::from_secs(60)))?;
        }
        rt.block_on(loadgen::probe(&rig.target(i)))
            .map_err(|e| format!("{} does not answer a tools/call correctly: {e}", s.name))?;
    }
    println!(
        "# intentgate-bench eras
"
    );
    print_machine(
        common,
        &format!(
            ", gateway store {}, server threads {}",
            o.store, o.server_threads
        ),
    );
    println!(
        "
client eras: plain = header-less JSON-RPC (IntentGate SDKs); handshake = initialize once per connection, then Mcp-Session-Id + MCP-Protocol-Version {}; modern = MCP-Protocol-Version {} + Mcp-Method + Mcp-Name + params._meta on every call.",
        loadgen::HANDSHAKE_VERSION,
        loadgen::MODERN_VERSION
    );
    println!(
        "upstream eras: dual = both revisions (the gateway finds 2026-07-28 by server/discover and talks to it statelessly); handshake = 2025-11-25 only, session-less requests refused with HTTP 400 -32600 (the gateway falls back to initialize and one pooled session)."
    );
    println!(
        "
## closed loop, {} connections (systems interleaved per rep)

{RUN_HEADER}",
        common.concurrency
    );
    let mut runs: Vec<Run> = Vec::new();
    for rep in 1..=common.reps.max(1) {
        for &i in &measured {
            let r = measure(&rt, &rig, i, common, Mode::Closed, common.concurrency);
            print_run(&rig, &r, Some(rep));
            runs.push(r);
        }
    }
    let agg = |i: usize| -> (f64, f64, f64, u64, f64) {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.system == i).collect();
        let tput = median(
            &mine
                .iter()
                .map(|r| r.outcome.throughput())
                .collect::<Vec<_>>(),
        );
        let per_call: Vec<f64> = mine
            .iter()
            .filter(|r| r.outcome.ok > 0)
            .map(|r| r.cpu.server / r.outcome.ok as f64 * 1e6)
            .collect();
        let lo = per_call.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = per_call.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let mut p99: Vec<f64> = mine.iter().map(|r| r.outcome.latency.p99 as f64).collect();
        p99.sort_by(f64::total_cmp);
        let errors = mine.iter().map(|r| r.outcome.errors).sum();
        (
            tput,
            median(&per_call),
            median(&p99),
            errors,
            (hi - lo).max(0.0),
        )
    };
    println!("
## matrix (median of {} reps; CPU µs/call is the server process's user+system CPU per completed call, range over reps in brackets)
", common.reps.max(1));
    println!(
        "| client era | upstream era | gateway calls/s | gateway p99 | gateway CPU µs/call | errors | bare calls/s | bare CPU µs/call | gateway − bare µs/call |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    let mut by_cell = Vec::new();
    for &(c, u, g, b) in &cells {
        let (gt, gc, gp99, ge, gspread) = agg(g);
        let (bt, bc) = b
            .map(|b| {
                let (t, c, _, _, _) = agg(b);
                (format!("{t:.0}"), c)
            })
            .unwrap_or(("(cannot carry)".into(), f64::NAN));
        println!(
            "| {} | {} | {gt:.0} | {} | {gc:.1} (±{:.0}) | {ge} | {bt} | {} | {} |",
            c.as_str(),
            u.as_str(),
            fmt_ns(gp99 as u64),
            gspread / 2.0,
            if bc.is_finite() {
                format!("{bc:.1}")
            } else {
                "-".into()
            },
            if bc.is_finite() {
                format!("{:.1}", gc - bc)
            } else {
                "-".into()
            },
        );
        by_cell.push((c, u, gt, gc));
    }
    println!(
        "
## issue 7: a modern-revision tools/call costs no more than a handshake-revision one
"
    );
    for &u in &o.upstream_eras {
        let get = |c: ClientEra| {
            by_cell
                .iter()
                .find(|x| x.0 == c && x.1 == u)
                .map(|x| (x.2, x.3))
        };
        if let (Some((mt, mc)), Some((ht, hc))) =
            (get(ClientEra::Modern), get(ClientEra::Handshake))
        {
            println!(
                "- upstream {}: modern {mc:.1} µs/call vs handshake {hc:.1} µs/call of gateway CPU ({:+.1}%), throughput {mt:.0} vs {ht:.0} calls/s ({:+.1}%): {}",
                u.as_str(),
                (mc / hc - 1.0) * 100.0,
                (mt / ht - 1.0) * 100.0,
                if mc <= hc {
                    "met"
                } else if mc <= hc * 1.03 {
                    "met within 3% (run-to-run noise)"
                } else {
                    "NOT met"
                }
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// micro

#[cfg(feature = "gateway")]
fn micro_main(o: MicroOpts) -> Result<(), String> {
    println!("# intentgate-bench micro\n");
    let rt = runtime(o.threads)?;
    for w in &o.which {
        match w.as_str() {
            "fsync" => micro::fsync(&o.work_dir, 300)?,
            "verify" => micro::verify(o.reps)?,
            "revocation" => micro::revocation(o.reps)?,
            "audit" => {
                let cases: Vec<micro::AuditShape> = o
                    .audit_cases
                    .iter()
                    .map(|c| {
                        let bad = |_| format!("bad case {c} (appenders:tenants[:tokens])");
                        let mut parts = c.split(':');
                        let a = parts.next().unwrap_or(c).parse().map_err(bad)?;
                        let t = parts.next().unwrap_or("1").parse().map_err(bad)?;
                        let k = parts.next().map(str::parse).transpose().map_err(bad)?;
                        if parts.next().is_some() {
                            return Err(format!("bad case {c} (appenders:tenants[:tokens])"));
                        }
                        Ok((a, t, k))
                    })
                    .collect::<Result<_, String>>()?;
                for b in &o.backends {
                    if b == "postgres" && !pg::PgServer::available() {
                        println!("\n(no PostgreSQL binaries: PostgreSQL audit skipped)");
                        continue;
                    }
                    rt.block_on(micro::audit(b, &o.work_dir, &cases, o.warmup, o.duration))?;
                }
            }
            "plugin" => micro::plugin(o.reps, &o.policy)?,
            "metrics" => micro::metrics(o.reps)?,
            "tracing" => micro::tracing(o.reps)?,
            "results" => micro::results(o.reps)?,
            other => return Err(format!("unknown micro-benchmark {other:?}")),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// swap

#[cfg(feature = "gateway")]
struct Promotion {
    action: &'static str,
    sent: Duration,
    answered: Duration,
    digest: u64,
    ok: bool,
}

#[cfg(feature = "gateway")]
fn swap(o: SwapOpts) -> Result<(), String> {
    use hyper::Method;
    let common = &o.common;
    let mut rig = Rig::new(common)?;
    // Each answer must say which bundle decided it.
    rig.annotate = true;
    rig.add(&o.store, o.server_threads, 1, common)?;
    let rt = runtime(common.client_threads)?;
    check_systems(&rt, &rig)?;
    let sys = &rig.systems[0];
    let (addr, admin) = (sys.addr, sys.admin_token.clone());
    let tenant = "bench-0";

    // Two drafts that both allow the bench call and differ only in a comment, so each has its
    // own digest and the gateway's answers say which one decided.
    let source = std::fs::read_to_string(&common.policy)
        .map_err(|e| format!("{}: {e}", common.policy.display()))?;
    let mut drafts = Vec::new();
    for (name, extra) in [
        ("swap-a", "\n# bench variant a\n"),
        ("swap-b", "\n# bench variant b\n"),
    ] {
        let body = serde_json::json!({"rego_source": format!("{source}{extra}"), "name": name})
            .to_string();
        let (status, reply) = rt.block_on(loadgen::admin(
            addr,
            Method::POST,
            &format!("/v1/admin/policies/drafts?tenant={tenant}"),
            &admin,
            &body,
        ))?;
        let v: serde_json::Value = serde_json::from_slice(&reply).map_err(|e| e.to_string())?;
        let id = v.get("id").and_then(|i| i.as_str()).ok_or_else(|| {
            format!(
                "draft {name}: HTTP {status}: {}",
                String::from_utf8_lossy(&reply)
            )
        })?;
        drafts.push(id.to_owned());
    }
    let promote = |id: &str| {
        let body = serde_json::json!({"draft_id": id}).to_string();
        let path = format!("/v1/admin/policies/active?tenant={tenant}");
        let admin = admin.clone();
        async move { loadgen::admin(addr, Method::POST, &path, &admin, &body).await }
    };
    let rollback = || {
        let path = format!("/v1/admin/policies/rollback?tenant={tenant}");
        let admin = admin.clone();
        async move { loadgen::admin(addr, Method::POST, &path, &admin, "{}").await }
    };
    let (status, reply) = rt.block_on(promote(&drafts[0]))?;
    if !status.is_success() {
        return Err(format!(
            "promote: HTTP {status}: {}",
            String::from_utf8_lossy(&reply)
        ));
    }

    println!("# intentgate-bench swap\n");
    print_machine(
        common,
        &format!(
            ", gateway store {}, server threads {}, promote every {:?}",
            o.store, o.server_threads, o.every
        ),
    );
    let spec = Spec {
        target: rig.target(0),
        connections: common.concurrency,
        warmup: common.warmup,
        duration: common.duration,
        mode: Mode::Closed,
        record: true,
    };
    // Baseline: the same load, no promotion.
    let base = rt.block_on(loadgen::run(&spec));
    // With promotions every `every`, alternating between the two drafts, from the start of the
    // window to its end.
    let every = o.every;
    let window = common.duration;
    let warmup = common.warmup;
    let ids = drafts.clone();
    let digests: Vec<u64> = ids.iter().map(|d| loadgen::digest_prefix(d)).collect();
    let (run, promotions) = rt.block_on(async {
        let t0 = Instant::now() + warmup;
        let ids = ids.clone();
        let digests = digests.clone();
        let promote = &promote;
        let rollback = &rollback;
        let swapper = async move {
            let mut out = Vec::new();
            let mut k: u32 = 1;
            loop {
                let at = t0 + every * k;
                if at >= t0 + window {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                // Odd: promote draft b (a becomes the rollback target); even: roll back to a.
                let i = (k % 2) as usize;
                let sent = Instant::now();
                let (action, r) = if i == 1 {
                    ("promote", promote(&ids[1]).await)
                } else {
                    ("rollback", rollback().await)
                };
                out.push(Promotion {
                    action,
                    sent: sent - t0,
                    answered: Instant::now() - t0,
                    digest: digests[i],
                    ok: matches!(r, Ok((s, _)) if s.is_success()),
                });
                k += 1;
            }
            out
        };
        tokio::join!(loadgen::run(&spec), swapper)
    });

    println!(
        "\n| run | calls/s | p50 | p99 | p99.9 | max | errors |\n|---|---:|---:|---:|---:|---:|---:|"
    );
    for (label, r) in [("no promotion", &base), ("promotion every interval", &run)] {
        println!(
            "| {label} | {:.0} | {} | {} | {} | {} | {} |",
            r.throughput(),
            fmt_ns(r.latency.p50),
            fmt_ns(r.latency.p99),
            fmt_ns(r.latency.p999),
            fmt_ns(r.latency.max),
            r.errors
        );
        for e in &r.error_examples {
            println!("|   error example: {} |", e.replace('|', "/"));
        }
    }
    // Per promotion: how long the admin call took, when the first call decided by the new
    // bundle completed, and until when calls decided by the old one kept completing.
    println!(
        "\n| swap at | action | admin call | first call on new bundle (from swap sent) | last call on old bundle (after swap answered) |\n|---:|---|---:|---:|---:|"
    );
    let mut admin_lat = Vec::new();
    let mut first_new = Vec::new();
    let mut last_old = Vec::new();
    let ms = |d: f64| format!("{:.2}ms", d * 1e3);
    for (i, p) in promotions.iter().enumerate() {
        let old = if i == 0 {
            digests[0]
        } else {
            promotions[i - 1].digest
        };
        let next_sent = promotions.get(i + 1).map_or(Duration::MAX, |n| n.sent);
        let fnew = run
            .calls
            .iter()
            .find(|c| c.ok && c.digest == p.digest && c.done >= p.sent && c.done < next_sent)
            .map(|c| c.done.as_secs_f64() - p.sent.as_secs_f64());
        let lold = run
            .calls
            .iter()
            .filter(|c| c.ok && c.digest == old && c.done >= p.answered && c.done < next_sent)
            .map(|c| c.done.as_secs_f64() - p.answered.as_secs_f64())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let adm = p.answered.as_secs_f64() - p.sent.as_secs_f64();
        admin_lat.push(adm);
        if let Some(f) = fnew {
            first_new.push(f);
        }
        last_old.push(lold.unwrap_or(0.0));
        println!(
            "| {:.2}s | {} | {}{} | {} | {} |",
            p.sent.as_secs_f64(),
            p.action,
            ms(adm),
            if p.ok { "" } else { " (FAILED)" },
            fnew.map_or("none".into(), ms),
            lold.map_or("none".into(), ms),
        );
    }
    let maxf = |v: &[f64]| v.iter().copied().fold(f64::NAN, f64::max);
    // Mis-attribution: a successful call whose answer names a bundle that was never active
    // (no digest, or another one), or a call *sent* after a swap was answered (and completed
    // before the next swap was sent) that reports the bundle the swap replaced. Calls in
    // flight across a swap may finish on either bundle and are not counted.
    let known = |d: u64| digests.contains(&d);
    let unknown = run
        .calls
        .iter()
        .filter(|c| c.ok && !known(c.digest))
        .count();
    let mut stale = 0usize;
    let mut checked = 0usize;
    for (i, p) in promotions.iter().enumerate() {
        let next_sent = promotions.get(i + 1).map_or(Duration::MAX, |n| n.sent);
        for c in run.calls.iter().filter(|c| c.ok && c.done < next_sent) {
            let sent = c.done.saturating_sub(c.latency);
            if sent >= p.answered && p.ok {
                checked += 1;
                if c.digest != p.digest {
                    stale += 1;
                }
            }
        }
    }
    let base_unknown = base
        .calls
        .iter()
        .filter(|c| c.ok && c.digest != digests[0])
        .count();
    println!(
        "\nattribution: {} calls checked against the swap answered before they were sent: {stale} reported the replaced bundle; {unknown} successful calls (of {}) named no or an unknown bundle; baseline run: {base_unknown} calls not on bundle a",
        checked,
        run.calls.iter().filter(|c| c.ok).count()
    );
    println!(
        "\nswaps: {} ({} failed); admin call median {} max {}; first call on the new bundle median {} max {}; old bundle drained within {} of the answer (max)",
        promotions.len(),
        promotions.iter().filter(|p| !p.ok).count(),
        ms(median(&admin_lat)),
        ms(maxf(&admin_lat)),
        ms(median(&first_new)),
        ms(maxf(&first_new)),
        ms(maxf(&last_old)),
    );
    // Throughput and tail per 100 ms, without and with promotions: a promotion should not
    // show; a stall in both columns is the gateway's (or the machine's), not the swap's.
    println!(
        "\n| 100 ms bin | calls, no promotion | p99 | calls, with promotions | p99 | errors | promotion sent in bin |\n|---:|---:|---:|---:|---:|---:|---|"
    );
    let bins = (window.as_millis() / 100) as usize;
    let bin = |calls: &[loadgen::CallRecord], lo: Duration, hi: Duration| {
        let mut lat = stats::Samples::default();
        let mut errs = 0;
        for c in calls.iter().filter(|c| c.done >= lo && c.done < hi) {
            if c.ok {
                lat.push(c.latency);
            } else {
                errs += 1;
            }
        }
        (lat.summary(), errs)
    };
    for b in 0..bins {
        let lo = Duration::from_millis(b as u64 * 100);
        let hi = lo + Duration::from_millis(100);
        let (s0, _) = bin(&base.calls, lo, hi);
        let (s1, e1) = bin(&run.calls, lo, hi);
        let promo = promotions.iter().any(|p| p.sent >= lo && p.sent < hi);
        println!(
            "| {:.1}s | {} | {} | {} | {} | {} | {} |",
            lo.as_secs_f64(),
            s0.count,
            fmt_ns(s0.p99),
            s1.count,
            fmt_ns(s1.p99),
            e1,
            if promo { "yes" } else { "" }
        );
    }
    Ok(())
}
