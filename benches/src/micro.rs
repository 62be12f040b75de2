//! Per-stage micro-benchmarks of the gateway's hot path, called through the library exactly as
//! the request path calls them:
//!
//! - `verify`: [`Verifier::authenticate`] (decode, HMAC chain, caveats, revocation) by caveat
//!   count, and [`Grant::authorize`] for one tool;
//! - `fsync`: the disk's flush latency, the floor under every durable audit append;
//! - `revocation`: [`RevocationSet::is_revoked`] by set size, hit and miss;
//! - `audit`: [`AuditLog::append`] throughput with group commit, by concurrent appenders and
//!   tenants, on SQLite and on PostgreSQL (a throwaway server);
//! - `plugin`: the default bundle's check components ([`intentgate::bundles::Snapshot`] intent,
//!   policy, budget), warm, and with a core's caches evicted between calls;
//! - `metrics`: the telemetry a call pays ([`intentgate::metrics::Metrics`]: decision counter,
//!   stage histograms, upstream counter; a log event filtered off), by tenant count and contention;
//! - `tracing`: what tracing costs a call with sampling off ([`intentgate::telemetry`]: the W3C
//!   header parse, ids, the call's log span and task-local, the stage hooks, the upstream's
//!   `traceparent`), and with sampling on up to handing the trace to the export queue.
//!
//! Timing: each case runs a warm-up, then `reps` repetitions of a timed batch; the reported
//! figure is the median repetition's on-CPU time per operation (the thread's own run time from
//! `/proc/thread-self/schedstat`, so preemption by other work on a shared machine is not
//! counted), with the spread across repetitions and the wall-clock median beside it.
//! The per-call percentiles of `audit` come from one timestamp pair per append.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use intentgate::audit::{AuditConfig, AuditEvent, AuditLog, Decision, LogKey, kinds};
use intentgate::bundles::{BundleSpec, Registry};
use intentgate::capability::{
    CallContext, Caveat, DEFAULT_LEEWAY_SECS, MasterKey, MintRequest, RevocationSet, Token,
    Verifier, mint,
};
use intentgate::config::PolicySource;
use intentgate::plugins::{CheckInput, TokenInput, Usage};
use intentgate::store::{self, StoreConfig};

use crate::stats::{Samples, fmt_ns, median};

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// On-CPU nanoseconds of the calling thread so far (`/proc/thread-self/schedstat`), so that a
/// batch preempted by other work on the machine is not charged for the time it did not run.
fn thread_cpu_ns() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    s.split_whitespace().next()?.parse().ok()
}

/// Per-operation cost of one case: median over repetitions, on-CPU and wall-clock.
#[derive(Clone, Copy)]
struct PerOp {
    cpu: f64,
    cpu_min: f64,
    cpu_max: f64,
    wall: f64,
}

/// Times `op` in `reps` batches after a 200 ms warm-up. A batch is at least `batch` calls and
/// at least ~100 ms (the scheduler updates a thread's run time at ticks and switches, so
/// shorter batches would read as zero or a whole tick).
fn time_per_op(batch: u32, reps: usize, mut op: impl FnMut()) -> PerOp {
    let warm = Instant::now();
    let mut warm_calls = 0u32;
    while warm.elapsed() < Duration::from_millis(200) {
        op();
        warm_calls = warm_calls.saturating_add(1);
    }
    let batch = batch.max(warm_calls / 2).max(1);
    let mut cpu = Vec::with_capacity(reps);
    let mut wall = Vec::with_capacity(reps);
    for _ in 0..reps {
        let c = thread_cpu_ns();
        let t = Instant::now();
        for _ in 0..batch {
            op();
        }
        let w = t.elapsed().as_nanos() as f64;
        let c = match (c, thread_cpu_ns()) {
            (Some(a), Some(b)) => (b - a) as f64,
            _ => w,
        };
        cpu.push(c / f64::from(batch));
        wall.push(w / f64::from(batch));
    }
    PerOp {
        cpu: median(&cpu),
        cpu_min: cpu.iter().copied().fold(f64::INFINITY, f64::min),
        cpu_max: cpu.iter().copied().fold(0.0, f64::max),
        wall: median(&wall),
    }
}

fn ns(v: f64) -> String {
    fmt_ns(v as u64)
}

/// A token with exactly `n` caveats: minted (`agent_lock` + `tool_allow`, the smallest token
/// that can call a tool), then attenuated with alternating `tool_allow` / `tool_deny` caveats
/// that all leave `echo` allowed, so every one of them is checked.
fn token_with_caveats(key: &MasterKey, n: usize) -> Result<String, String> {
    let req = MintRequest {
        subject: "bench-agent".into(),
        tenant: Some("bench".into()),
        tools: vec!["echo".into(), "read_*".into()],
        ..MintRequest::default()
    };
    let minted = mint(key, &req, now_unix()).map_err(|e| e.to_string())?;
    let mut token = Token::decode(&minted.token).map_err(|e| e.to_string())?;
    while token.cav.len() < n {
        let i = token.cav.len();
        let caveat = if i % 2 == 0 {
            Caveat::tool_allow(["echo", "read_*"])
        } else {
            Caveat::tool_deny([format!("forbidden_{i}")])
        };
        token = token.attenuate(caveat).map_err(|e| e.to_string())?;
    }
    if token.cav.len() != n {
        return Err(format!(
            "minted token has {} caveats, wanted {n}",
            token.cav.len()
        ));
    }
    Ok(token.encode())
}

pub fn verify(reps: usize) -> Result<(), String> {
    println!(
        "\n## token verify (Verifier::authenticate: decode + HMAC chain + caveats + revocation)\n"
    );
    println!(
        "First sight: a token this verifier has not verified yet (decode + HMAC chain). Seen \
         again: a token it verified before (decode and HMAC chain kept; nbf, caveats and \
         revocation run).\n"
    );
    println!(
        "| caveats | token bytes | first sight, on-CPU per verify (median of {reps}) | min..max | seen again, on-CPU | verifies/s/core (first sight) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    let key = MasterKey::generate().map_err(|e| e.to_string())?;
    let verifier = Verifier::new(key.clone(), DEFAULT_LEEWAY_SECS);
    let revoked = RevocationSet::always_fresh();
    revoked.extend((0..10_000).map(|i| format!("revoked-{i}")));
    let now = now_unix();
    for n in [2usize, 4, 8, 16, 32, 64] {
        let token = token_with_caveats(&key, n)?;
        verifier
            .authenticate(&token, now, &revoked)
            .map_err(|e| format!("token with {n} caveats does not verify: {e}"))?;
        // A verifier of its own per call: nothing verified before.
        let t = time_per_op(2_000, reps, || {
            black_box(
                Verifier::new(key.clone(), DEFAULT_LEEWAY_SECS)
                    .authenticate(black_box(&token), now, &revoked)
                    .is_ok(),
            );
        });
        let again = time_per_op(2_000, reps, || {
            black_box(
                verifier
                    .authenticate(black_box(&token), now, &revoked)
                    .is_ok(),
            );
        });
        println!(
            "| {n} | {} | {} | {}..{} | {} | {:.0} |",
            token.len(),
            ns(t.cpu),
            ns(t.cpu_min),
            ns(t.cpu_max),
            ns(again.cpu),
            1e9 / t.cpu
        );
    }
    let token = token_with_caveats(&key, 4)?;
    let grant = verifier
        .authenticate(&token, now, &revoked)
        .map_err(|e| e.to_string())?;
    let ctx = CallContext {
        kind: intentgate::capability::Kind::Tool,
        tool: "echo",
        agent: None,
        server: Some("default"),
        callee: None,
        risk: None,
        template: false,
        own_name: None,
    };
    let t = time_per_op(100_000, reps, || {
        black_box(grant.authorize(black_box(&ctx)).is_ok());
    });
    println!(
        "\nGrant::authorize (4 caveats, tool `echo`): {} on-CPU per call",
        ns(t.cpu)
    );
    Ok(())
}

pub fn revocation(reps: usize) -> Result<(), String> {
    println!("\n## revocation lookup (RevocationSet::is_revoked)\n");
    println!("| revoked ids | miss (on-CPU) | hit (on-CPU) |");
    println!("|---:|---:|---:|");
    for size in [0usize, 1_000, 100_000, 1_000_000] {
        let set = RevocationSet::always_fresh();
        set.extend((0..size).map(|i| format!("tok_{i:024x}")));
        let miss = "tok_ffffffffffffffffffffffff".to_owned();
        let hit = format!("tok_{:024x}", size / 2);
        let m = time_per_op(200_000, reps, || {
            black_box(set.is_revoked(black_box(&miss)));
        });
        let h = if size > 0 {
            let h = time_per_op(200_000, reps, || {
                black_box(set.is_revoked(black_box(&hit)));
            });
            ns(h.cpu)
        } else {
            "-".into()
        };
        println!("| {size} | {} | {h} |", ns(m.cpu));
    }
    Ok(())
}

/// The `n`th call of an appender; `token` names the appender's own token when the case gives
/// a token count, else every call names the token `n` (so concurrent appenders share one).
fn tool_call_event(tenant: &str, n: u64, token: Option<usize>) -> AuditEvent {
    let mut e = AuditEvent::new(kinds::TOOL_CALL, tenant);
    e.decision = Some(Decision::Allow);
    e.agent_id = "bench-agent".into();
    e.tool = "echo".into();
    e.arg_keys = vec!["text".into()];
    e.jti = match token {
        // Spread over the key space, as random token ids are.
        Some(t) => format!(
            "tok_{:024x}",
            (t as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ),
        None => format!("tok_{n:024x}"),
    };
    e.root_jti = e.jti.clone();
    e.caveat_count = Some(2);
    e.remote_ip = "127.0.0.1".into();
    e.latency_ms = Some(0);
    e
}

/// The durability floor: latency of writing 4 KiB to a file and `fdatasync`-ing it, in the
/// directory the stores use, both appending (the file grows: the filesystem journal commits
/// too) and overwriting a preallocated region (as a reused SQLite WAL or PostgreSQL WAL segment
/// does). Every audited call waits for at least one such flush (SQLite WAL with
/// `synchronous=FULL`, PostgreSQL with `synchronous_commit=on`).
pub fn fsync(root: &Path, n: usize) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let dir = tempfile::Builder::new()
        .prefix("intentgate-bench-fsync-")
        .tempdir_in(root)
        .map_err(|e| e.to_string())?;
    let block = [0x5au8; 4096];
    let e = |e: std::io::Error| e.to_string();
    println!(
        "\n## fsync floor ({}: 4 KiB write + fdatasync, {n} times each)\n",
        root.display()
    );
    println!("| write | p50 | p90 | p99 | max |\n|---|---:|---:|---:|---:|");
    for append in [true, false] {
        let path = dir.path().join(if append { "append" } else { "overwrite" });
        let mut f = std::fs::File::create(&path).map_err(e)?;
        if !append {
            for _ in 0..256 {
                f.write_all(&block).map_err(e)?;
            }
            f.sync_all().map_err(e)?;
        }
        let label = if append {
            "append (file grows)"
        } else {
            "overwrite (preallocated)"
        };
        sync_row(label, n, &f, Duration::ZERO, |i| {
            if append {
                (&f).write_all(&block)
            } else {
                f.write_all_at(&block, (i as u64 % 256) * 4096)
            }
        })
        .map_err(e)?;
    }
    // What a one-event audit commit hands the sync: SQLite writes each WAL frame as a 24-byte
    // header and a 4 KiB page (two writes), and such a commit writes 5 frames (the row, the
    // chain's `(tenant, seq)` index, the sequence, a counter, the chain head; the token, time,
    // agent and tool lookup tables are written a slice of events at a time): 960 of 1,266
    // transactions in the WAL at one call in flight, most others 7. The device time grows
    // with them.
    const FRAMES: usize = 5;
    const FRAME: usize = 24 + 4096;
    let path = dir.path().join("commit");
    let mut f = std::fs::File::create(&path).map_err(e)?;
    // Written, not `set_len`: a hole would make every write allocate, as an append does.
    f.write_all(&vec![0u8; 256 * FRAMES * FRAME]).map_err(e)?;
    f.sync_all().map_err(e)?;
    let header = [0xa5u8; 24];
    let label = format!(
        "overwrite, a one-event commit's WAL frames ({FRAMES} × {FRAME} bytes in {} writes)",
        2 * FRAMES
    );
    let frames = |i: usize| {
        let base = (i % 256) * FRAMES * FRAME;
        for frame in 0..FRAMES {
            let at = (base + frame * FRAME) as u64;
            f.write_all_at(&header, at)?;
            f.write_all_at(&block, at + 24)?;
        }
        Ok(())
    };
    sync_row(&label, n, &f, Duration::ZERO, frames).map_err(e)?;
    // With one call in flight the device idles between two syncs while the call goes
    // upstream and back (about 0.6 ms), and on a virtual machine a sync after an idle pause
    // takes longer than one right after another (session 28: 240 against 190 µs at p50).
    // This row is the floor of that regime: the same frames, written after such a pause.
    let label = format!(
        "{label}, each after {} µs idle (as at one call in flight)",
        IDLE_GAP.as_micros()
    );
    sync_row(&label, n, &f, IDLE_GAP, frames).map_err(e)?;
    Ok(())
}

/// The pause before each write of the idle-gap row: what a call at one call in flight spends
/// outside its sync (the upstream's round trip, the checks, the response).
const IDLE_GAP: Duration = Duration::from_micros(600);

/// Times `n` syncs of `f` (after 10 unmeasured), each after `idle` and `write(i)`, and prints
/// their row.
fn sync_row(
    label: &str,
    n: usize,
    f: &std::fs::File,
    idle: Duration,
    mut write: impl FnMut(usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut samples = Samples::with_capacity(n);
    for i in 0..n + 10 {
        if !idle.is_zero() {
            std::thread::sleep(idle);
        }
        write(i)?;
        let t = Instant::now();
        f.sync_data()?;
        if i >= 10 {
            samples.push(t.elapsed());
        }
    }
    let s = samples.summary();
    println!(
        "| {label} | {} | {} | {} | {} |",
        fmt_ns(s.p50),
        fmt_ns(s.p90),
        fmt_ns(s.p99),
        fmt_ns(s.max)
    );
    Ok(())
}

/// One audit case: `appenders` tasks appending as fast as answers come back, spread over
/// `tenants` tenants (and, when given, `tokens` tokens: appender `i` calls with token
/// `i % tokens`, as agents with long-lived tokens do), for `duration` after a warm-up.
async fn audit_case(
    log: &AuditLog,
    db: &store::Db,
    (appenders, tenants, tokens): AuditShape,
    warmup: Duration,
    duration: Duration,
) -> AuditCase {
    let start = Instant::now();
    let from = start + warmup;
    let end = from + duration;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let before = log.stats();
    let cpu_at = |when: Instant| {
        let me = std::process::id();
        async move {
            tokio::time::sleep_until(when.into()).await;
            crate::child::process_cpu_secs(me).unwrap_or(0.0)
        }
    };
    let cpu_window = tokio::spawn(async move {
        let a = cpu_at(from).await;
        let b = cpu_at(end).await;
        b - a
    });
    let lag_window = tokio::spawn(lookup_lag(db.clone(), from, end));
    let mut tasks = Vec::new();
    for i in 0..appenders {
        let log = log.clone();
        let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
        let tenant = format!("bench-{}", i % tenants.max(1));
        let token = tokens.map(|k| i % k.max(1));
        tasks.push(tokio::spawn(async move {
            let mut samples = Samples::with_capacity(16 * 1024);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                if t >= end {
                    break;
                }
                n += 1;
                let r = log.append(tool_call_event(&tenant, n, token)).await;
                let done = Instant::now();
                if done >= from && done <= end {
                    match r {
                        Ok(_) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                            samples.push(done - t);
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
            samples
        }));
    }
    let mut all = Samples::default();
    for t in tasks {
        if let Ok(s) = t.await {
            all.extend(s);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let after = log.stats();
    let events = after.events.saturating_sub(before.events);
    let ok = ok.load(Ordering::Relaxed);
    let rate = ok as f64 / duration.as_secs_f64();
    let cpu = cpu_window.await.unwrap_or(f64::NAN);
    AuditCase {
        rate,
        failed: failed.load(Ordering::Relaxed),
        events_per_batch: per(events, after.batches.saturating_sub(before.batches)),
        events_per_transaction: per(
            events,
            after.transactions.saturating_sub(before.transactions),
        ),
        cpu_us_per_event: if ok > 0 {
            cpu / ok as f64 * 1e6
        } else {
            f64::NAN
        },
        latency: all.summary(),
        lookup_lag: lag_window.await.ok().flatten(),
    }
}

/// On SQLite: the most events the audit query's lookup tables lagged behind the audit table,
/// sampled every 100 ms over the measured window (events a filtered query reads from the
/// audit table itself instead of through them). `None` elsewhere.
async fn lookup_lag(db: store::Db, from: Instant, end: Instant) -> Option<i64> {
    tokio::time::sleep_until(from.into()).await;
    let mut most = None;
    while Instant::now() < end {
        let lag = intentgate::audit::query::lookup_lag(&db).await.ok()??;
        most = Some(most.unwrap_or(0).max(lag));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    most
}

/// `a / b`, NaN when nothing was counted.
fn per(a: u64, b: u64) -> f64 {
    if b > 0 { a as f64 / b as f64 } else { f64::NAN }
}

struct AuditCase {
    rate: f64,
    failed: u64,
    /// Events per tenant batch (what one tenant's writer hands in at once).
    events_per_batch: f64,
    /// Events per write transaction: the group-commit factor (on SQLite a transaction carries
    /// the batches of every tenant handed in meanwhile).
    events_per_transaction: f64,
    /// CPU of the whole process (appenders, writer, SQLite thread or PostgreSQL client) per event;
    /// PostgreSQL's own CPU is not included.
    cpu_us_per_event: f64,
    latency: crate::stats::Summary,
    /// SQLite: the lookup tables' largest lag in the window, in events.
    lookup_lag: Option<i64>,
}

/// An audit case: appenders, tenants, and the number of tokens they call with (`None`: a
/// token per call number, shared by the appenders at that number).
pub type AuditShape = (usize, usize, Option<usize>);

pub async fn audit(
    backend: &str,
    root: &Path,
    cases: &[AuditShape],
    warmup: Duration,
    duration: Duration,
) -> Result<(), String> {
    let _pg;
    let (cfg, label) = match backend {
        "sqlite" => {
            let dir = tempfile::Builder::new()
                .prefix("intentgate-bench-audit-")
                .tempdir_in(root)
                .map_err(|e| e.to_string())?;
            let path = dir.path().join("audit.sqlite3");
            // Keep the directory for the life of the case.
            let cfg = StoreConfig::Sqlite { path };
            _pg = Holder::Dir(dir);
            (cfg, "SQLite (WAL, synchronous=FULL)")
        }
        "postgres" => {
            let pg = crate::pg::PgServer::start(root)?;
            let cfg = StoreConfig::Postgres {
                url: pg.url.clone(),
            };
            _pg = Holder::Pg(pg);
            (cfg, "PostgreSQL (fsync=on, synchronous_commit=on)")
        }
        other => return Err(format!("unknown backend {other:?} (sqlite or postgres)")),
    };
    let store = store::connect(&cfg).await.map_err(|e| e.to_string())?;
    let key = LogKey::generate("bench").map_err(|e| e.to_string())?;
    let log = AuditLog::open(store.db(), key, AuditConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    println!("\n## audit append, {label}, group commit (AuditConfig::default())\n");
    println!(
        "| appenders | tenants | tokens | events/s | events/transaction | events/tenant batch | bench-process CPU µs/event | append p50 | p99 | p99.9 | failed | lookup lag, most |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &shape in cases {
        let (appenders, tenants, tokens) = shape;
        let c = audit_case(&log, &store.db(), shape, warmup, duration).await;
        let tokens = tokens.map_or_else(|| "per call".to_owned(), |k| k.to_string());
        println!(
            "| {appenders} | {tenants} | {tokens} | {:.0} | {:.1} | {:.1} | {:.1} | {} | {} | {} | {} | {} |",
            c.rate,
            c.events_per_transaction,
            c.events_per_batch,
            c.cpu_us_per_event,
            fmt_ns(c.latency.p50),
            fmt_ns(c.latency.p99),
            fmt_ns(c.latency.p999),
            c.failed,
            c.lookup_lag
                .map_or_else(|| "-".to_owned(), |n| n.to_string()),
        );
    }
    Ok(())
}

enum Holder {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(#[allow(dead_code)] crate::pg::PgServer),
}

/// The check plugins of the default bundle, as the pipeline runs them: the built-in intent,
/// policy (regorus inside a component, configured with `policy`) and budget components, through
/// `Snapshot::intent`, `Snapshot::policy` and `Snapshot::budget` on pooled instances
/// (one tenant, so every call after the warm-up reuses an instance).
pub fn plugin(reps: usize, policy: &Path) -> Result<(), String> {
    println!(
        "\n## plugin evaluate (default bundle: built-in intent, policy-rego, budget components)\n"
    );
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut tests = Vec::new();
    if let Some(stem) = policy.file_stem() {
        let t = policy.with_file_name(format!("{}_test.rego", stem.to_string_lossy()));
        if t.is_file() {
            tests.push((name(&t), read(&t)?));
        }
    }
    let source = PolicySource {
        modules: vec![(name(policy), read(policy)?)],
        tests,
    };
    let spec = BundleSpec::builtin().with_policy_config(source.to_config());
    let t = Instant::now();
    let registry = Registry::builtin_with_default(spec).map_err(|e| e.to_string())?;
    let compile = t.elapsed();
    let t = Instant::now();
    let snap = registry.snapshot("bench");
    let first_snapshot = t.elapsed();
    let input = CheckInput {
        tenant: "bench".into(),
        agent_id: "bench-agent-0".into(),
        tool: "echo".into(),
        arguments: r#"{"text":"hello from intentgate-bench"}"#.into(),
        intent_prompt: None,
        token: TokenInput {
            jti: "tok_000000000000000000000001".into(),
            root_jti: "tok_000000000000000000000001".into(),
            subject: "bench-agent-0".into(),
            zone: "default".into(),
            caveat_count: 2,
            max_calls: None,
            max_cents: None,
            step_up_at: None,
        },
        usage: Usage::default(),
    };
    let intent = snap.intent(&input).map_err(|e| e.to_string())?;
    let verdict = snap
        .policy(&input, &intent.record)
        .map_err(|e| e.to_string())?;
    if !verdict.is_allow() {
        return Err(format!(
            "policy {} does not allow the bench call: {}",
            policy.display(),
            verdict.reason
        ));
    }
    println!("policy: {}", policy.display());
    println!(
        "compile the built-in components (Registry::builtin_with_default): {}",
        fmt_ns(compile.as_nanos() as u64)
    );
    println!(
        "first snapshot for a tenant (instantiate + configure, incl. Rego parse): {}\n",
        fmt_ns(first_snapshot.as_nanos() as u64)
    );
    println!(
        "| stage | on-CPU per call (median of {reps}) | min..max | wall per call | calls/s/core |"
    );
    println!("|---|---:|---:|---:|---:|");
    let row = |label: &str, t: PerOp| {
        println!(
            "| {label} | {} | {}..{} | {} | {:.0} |",
            ns(t.cpu),
            ns(t.cpu_min),
            ns(t.cpu_max),
            ns(t.wall),
            1e9 / t.cpu
        );
    };
    row(
        "intent",
        time_per_op(500, reps, || {
            black_box(snap.intent(black_box(&input)).is_ok());
        }),
    );
    row(
        "policy (Rego)",
        time_per_op(500, reps, || {
            black_box(snap.policy(black_box(&input), &intent.record).is_ok());
        }),
    );
    row(
        "budget",
        time_per_op(500, reps, || {
            black_box(snap.budget(black_box(&input)).is_ok());
        }),
    );
    row(
        "all three (Snapshot::decide)",
        time_per_op(500, reps, || {
            black_box(snap.decide(black_box(&input)).is_ok());
        }),
    );
    // The request path: the same stages through `call_async` (the guest on a fiber that
    // yields at epoch ticks), polled here without an executor so only the plugin cost shows.
    row(
        "intent, async (request path)",
        time_per_op(500, reps, || {
            black_box(poll_to_end(snap.intent_async(black_box(&input))).is_ok());
        }),
    );
    row(
        "policy (Rego), async (request path)",
        time_per_op(500, reps, || {
            black_box(poll_to_end(snap.policy_async(black_box(&input), &intent.record)).is_ok());
        }),
    );
    row(
        "budget, async (request path)",
        time_per_op(500, reps, || {
            black_box(poll_to_end(snap.budget_async(black_box(&input))).is_ok());
        }),
    );
    // On the request path a check runs after the HTTP server, the other checks, SQLite and
    // the kernel's network code have had the core: its code, its instance's memory and their
    // page-table entries are no longer cached. These rows evict a core's own caches between
    // calls (a sweep over twice its L2) and subtract the sweep's own cost (median). They still
    // run faster than the checks of a gateway at one call in flight: there the branch
    // predictors and the instruction side are cold too (BENCHMARKS.md, session 13).
    let mut sweep = vec![0u8; COLD_SWEEP_BYTES];
    let mut evict = move || {
        for i in (0..sweep.len()).step_by(64) {
            sweep[i] = sweep[i].wrapping_add(1);
        }
        black_box(&sweep);
    };
    let alone = time_per_op(50, reps, &mut evict);
    let cold = |label: &str, t: PerOp| {
        let less = |v: f64, sweep: f64| (v - sweep).max(1.0);
        let cpu = less(t.cpu, alone.cpu);
        println!(
            "| {label} | {} | {}..{} | {} | {:.0} |",
            ns(cpu),
            ns(less(t.cpu_min, alone.cpu)),
            ns(less(t.cpu_max, alone.cpu)),
            ns(less(t.wall, alone.wall)),
            1e9 / cpu
        );
    };
    cold(
        "intent, async, caches cold",
        time_per_op(50, reps, || {
            evict();
            black_box(poll_to_end(snap.intent_async(black_box(&input))).is_ok());
        }),
    );
    cold(
        "policy (Rego), async, caches cold",
        time_per_op(50, reps, || {
            evict();
            black_box(poll_to_end(snap.policy_async(black_box(&input), &intent.record)).is_ok());
        }),
    );
    cold(
        "budget, async, caches cold",
        time_per_op(50, reps, || {
            evict();
            black_box(poll_to_end(snap.budget_async(black_box(&input))).is_ok());
        }),
    );
    Ok(())
}

/// Bytes swept between the calls of the "caches cold" rows: twice a core's L2 cache here
/// (the shared L3 is larger; the request path does not sweep it either).
const COLD_SWEEP_BYTES: usize = 2 << 20;

/// Polls a future to its end on this thread (a plugin's epoch yield wakes itself at once).
fn poll_to_end<F: std::future::Future>(future: F) -> F::Output {
    let mut future = std::pin::pin!(future);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    loop {
        if let std::task::Poll::Ready(out) = future.as_mut().poll(&mut cx) {
            return out;
        }
    }
}

/// The telemetry a tool call pays on the request path, through the library's own calls: the
/// decision counter by tenant and outcome, the decision histogram, one clock read and
/// histogram observation per stage (token, capability, intent, policy, budget, audit,
/// upstream), the upstream counter, and a debug-level log event that the gateway's default
/// filter (`info`, the subscriber `serve` installs) turns off, as tracing with sampling off.
/// Then the same with the tenant among 1,000 labelled tenants, from two threads at once
/// (shared counters' cache lines), and a scrape's exposition for scale.
pub fn metrics(reps: usize) -> Result<(), String> {
    use intentgate::metrics::exposition::Exposition;
    use intentgate::metrics::{Metrics, Stage};
    use intentgate::pipeline::{Denial, Permit};

    println!(
        "\n## telemetry per call (metrics recorded on the request path; tracing sampled off)\n"
    );
    intentgate::logging::init(
        intentgate::logging::LogFormat::Text,
        intentgate::logging::DEFAULT_FILTER,
    );
    let m = Arc::new(Metrics::new("default"));
    let refused: Result<Permit, Denial> = Err(Denial::Budget("bench".into()));
    let forwarded: Result<intentgate::upstream::Reply, intentgate::upstream::UpstreamError> = Ok(
        intentgate::upstream::Reply::result(&serde_json::Value::Null),
    );
    let per_call = |m: &Metrics, tenant: &str| {
        let started = Instant::now();
        for stage in [
            Stage::Token,
            Stage::Capability,
            Stage::Intent,
            Stage::Policy,
            Stage::Budget,
            Stage::Audit,
        ] {
            let t = Instant::now();
            m.stages.since(stage, black_box(t));
        }
        tracing::debug!(tenant, event_id = 7u64, "decided");
        m.decided(black_box(tenant), started, black_box(&refused));
        m.forwarded(Instant::now(), black_box(&forwarded));
    };
    println!("| case | on-CPU per call (median of {reps}) | min..max | wall per call |");
    println!("|---|---:|---:|---:|");
    let row = |label: &str, t: PerOp| {
        println!(
            "| {label} | {} | {}..{} | {} |",
            ns(t.cpu),
            ns(t.cpu_min),
            ns(t.cpu_max),
            ns(t.wall)
        );
    };
    row(
        "one call, one tenant",
        time_per_op(200_000, reps, || per_call(&m, "bench")),
    );
    for i in 0..1_000 {
        m.decisions.record(
            &format!("tenant-{i:04}"),
            intentgate::metrics::Check::None,
            intentgate::metrics::Outcome::Allow,
        );
    }
    row(
        "one call, tenant among 1,000",
        time_per_op(200_000, reps, || per_call(&m, "tenant-0500")),
    );
    row(
        "one call, tenant beyond the cap (folded into (other))",
        time_per_op(200_000, reps, || per_call(&m, "tenant-9999")),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let other = {
        let (m, stop) = (Arc::clone(&m), Arc::clone(&stop));
        std::thread::spawn(move || {
            let refused: Result<Permit, Denial> = Err(Denial::Budget("bench".into()));
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                m.stages.since(Stage::Intent, started);
                m.decided("tenant-0500", started, &refused);
            }
        })
    };
    row(
        "one call, another thread recording the same tenant",
        time_per_op(200_000, reps, || per_call(&m, "tenant-0500")),
    );
    stop.store(true, Ordering::Relaxed);
    let _ = other.join();
    let t = time_per_op(20, reps, || {
        let mut e = Exposition::new();
        m.decisions.write(&mut e);
        m.stages.write(&mut e);
        black_box(e.finish().len());
    });
    println!(
        "\nexposition of 1,002 tenants' decisions and the stage histograms (part of a scrape): {} on-CPU",
        ns(t.cpu)
    );
    Ok(())
}

/// The tracing path of one call through the library's own calls, as the request path makes
/// them: [`intentgate::telemetry::Tracer::start`] from the agent's headers, the call's scope
/// (log span with the trace id, task-local), the seven stage hooks the metrics' timing points
/// call, the decision's event id on the log span and the upstream's `traceparent`; the
/// future is polled once (nothing in it waits). Sampling off (`always_off`), with and without
/// an agent `traceparent`; then sampling on, the trace handed to a full export queue (dropped
/// and counted), for scale. The log subscriber is the gateway's default (`info`, text).
pub fn tracing(reps: usize) -> Result<(), String> {
    use intentgate::metrics::Stage;
    use intentgate::telemetry::trace::{self, Sampler, Tracer};
    use std::future::Future;

    println!("\n## tracing per call (OpenTelemetry path; metrics not included)\n");
    intentgate::logging::init(
        intentgate::logging::LogFormat::Text,
        intentgate::logging::DEFAULT_FILTER,
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let _guard = rt.enter();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let one_call = |tracer: &Tracer, tp: Option<&str>| {
        let call = tracer.start(black_box(tp), black_box(Some("vendor=abc")));
        let fut = trace::scope(call, async {
            for stage in Stage::ALL {
                trace::stage(stage, black_box(Instant::now()));
            }
            tracing::Span::current().record("event_id", 7i64);
            black_box(trace::upstream_headers());
        });
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let _ = black_box(fut.as_mut().poll(&mut cx));
    };
    println!("| case | on-CPU per call (median of {reps}) | min..max | wall per call |");
    println!("|---|---:|---:|---:|");
    let row = |label: &str, t: PerOp| {
        println!(
            "| {label} | {} | {}..{} | {} |",
            ns(t.cpu),
            ns(t.cpu_min),
            ns(t.cpu_max),
            ns(t.wall)
        );
    };
    let off = Tracer::off();
    row(
        "sampling off, agent sent a traceparent",
        time_per_op(100_000, reps, || one_call(&off, Some(traceparent))),
    );
    row(
        "sampling off, no traceparent (new trace id)",
        time_per_op(100_000, reps, || one_call(&off, None)),
    );
    // Sampled, into an exporter whose queue is full (nothing listens): the spans are recorded
    // and the finished trace dropped and counted, never waited for.
    let settings = intentgate::telemetry::ExportSettings {
        endpoint: "http://127.0.0.1:9/v1/traces"
            .parse()
            .map_err(|e| format!("{e}"))?,
        headers: Vec::new(),
        service_name: "bench".into(),
        max_queue: 1,
        max_batch: 1,
        delay: Duration::from_secs(3600),
        timeout: Duration::from_millis(1),
    };
    let tls = intentgate::tls::plaintext_only().map_err(|e| e.to_string())?;
    let (exporter, task) = intentgate::telemetry::Exporter::start(settings, tls);
    task.abort();
    let on = Tracer::new(Sampler::AlwaysOn, Some(exporter));
    row(
        "sampling on, 8 spans recorded, queue full (dropped)",
        time_per_op(50_000, reps, || one_call(&on, Some(traceparent))),
    );
    Ok(())
}

/// A tool's answer on its way back, per size of its text: read as a tree and written again (how
/// the gateway forwarded results up to session 7), against read by envelope, reshaped by
/// top-level members and spliced (`mcp::raw`, since `f8f3ed1`). Both shape the result for a
/// handshake-era client with the gateway's own translation (`resultType` removed).
pub fn results(reps: usize) -> Result<(), String> {
    use intentgate::mcp::jsonrpc;
    use intentgate::mcp::raw::RawObject;
    use intentgate::mcp::translate;
    use serde_json::{Map, Value};

    println!("\n## a tool's result, forwarded (upstream response → client response)\n");
    println!("| result text | as a tree, CPU/op | as text, CPU/op | tree ÷ text |");
    println!("|---:|---:|---:|---:|");
    let id = Value::from(7);
    for size in [32usize, 4 << 10, 64 << 10, 1 << 20] {
        let text = "x".repeat(size);
        let body = serde_json::to_vec(&serde_json::json!({
            "jsonrpc": "2.0", "id": 42,
            "result": {"content": [{"type": "text", "text": text}], "isError": false,
                       "resultType": "complete"}
        }))
        .map_err(|e| e.to_string())?;
        let tree = || -> Vec<u8> {
            let Ok(mut v) = serde_json::from_slice::<Value>(&body) else {
                return Vec::new();
            };
            let Some(Value::Object(result)) = v.as_object_mut().and_then(|m| m.remove("result"))
            else {
                return Vec::new();
            };
            let shaped: Map<String, Value> =
                translate::call_for_client(result, false).unwrap_or_default();
            serde_json::to_vec(&serde_json::json!({"jsonrpc": "2.0", "id": id, "result": shaped}))
                .unwrap_or_default()
        };
        let raw = || -> Vec<u8> {
            // The envelope one level deep (as the upstream client reads it), then the result.
            let text = std::str::from_utf8(&body).unwrap_or_default();
            let Some(env) = RawObject::parse(text).ok() else {
                return Vec::new();
            };
            let Some(Ok(result)) = env.get("result").map(|r| RawObject::parse(r.get())) else {
                return Vec::new();
            };
            let shaped = translate::call_for_client(result, false).unwrap_or_default();
            jsonrpc::result(&id, &shaped)
        };
        // Both write the same answer (key order aside: a tree sorts the keys).
        let (a, b) = (tree(), raw());
        let (ta, tb): (Value, Value) = (
            serde_json::from_slice(&a).map_err(|e| e.to_string())?,
            serde_json::from_slice(&b).map_err(|e| e.to_string())?,
        );
        if ta != tb {
            return Err(format!("the two paths disagree at {size} bytes"));
        }
        let t = time_per_op(200, reps, || {
            black_box(tree());
        });
        let r = time_per_op(200, reps, || {
            black_box(raw());
        });
        println!(
            "| {size} B | {} | {} | {:.1}× |",
            ns(t.cpu),
            ns(r.cpu),
            t.cpu / r.cpu.max(1.0)
        );
    }
    Ok(())
}
