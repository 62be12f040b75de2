//! `stages PERF.DATA`: where the gateway's CPU goes, by pipeline stage, from a `perf record -g`
//! profile (as `load --perf DIR` writes). Reads `perf script` and gives each sample to the
//! innermost frame that names a stage (walking from the leaf up), so that `malloc` under
//! `AuditEvent::canonical` counts as audit and a kernel `writev` under the upstream client
//! counts as forwarding. Samples in JIT code (no symbols) are the WebAssembly plugins.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// Stage of one frame by symbol prefix (checked innermost first). Order within the list does
/// not matter: a frame names one stage.
const STAGES: &[(&str, &[&str])] = &[
    (
        "database driver (sqlx + SQLite engine / PostgreSQL protocol)",
        &["sqlx_", "sqlite3", "pcache1", "pager", "btree"],
    ),
    (
        "audit: event JSON, canonical form, chain hash, group-commit writer",
        &["intentgate::audit::"],
    ),
    (
        "plugins: wasm guest code + wasmtime (intent, policy, budget)",
        &[
            "wasmtime",
            "intentgate::plugins::",
            "intentgate::bundles::",
            "cranelift",
            "regorus",
        ],
    ),
    (
        "capability: token decode, HMAC chain, caveats, revocation",
        &["intentgate::capability::"],
    ),
    (
        "request decode: body read, depth check, JSON-RPC parse",
        &["intentgate::http::", "intentgate::mcp::jsonrpc::"],
    ),
    (
        "MCP handling (tools/call glue, result building)",
        &["intentgate::mcp::", "intentgate::proxy::"],
    ),
    (
        "pipeline glue (inputs, charges, decision)",
        &["intentgate::pipeline::"],
    ),
    (
        "store (counters, revocation feed)",
        &["intentgate::store::"],
    ),
    (
        "forward to upstream (HTTP client, session)",
        &[
            "intentgate::upstream::",
            "hyper_util::client",
            "hyper::client",
        ],
    ),
    (
        "HTTP server (hyper accept, parse, write)",
        &["intentgate::server::"],
    ),
];

const OTHER_HTTP_CLIENT: &str = "forward to upstream (HTTP client, session)";
const OTHER_HTTP_SERVER: &str = "HTTP server (hyper accept, parse, write)";
const JIT: &str = "plugins: wasm guest code + wasmtime (intent, policy, budget)";

fn stage_of_symbol(sym: &str) -> Option<&'static str> {
    let s = sym.trim_start_matches('<');
    STAGES
        .iter()
        .find(|(_, prefixes)| prefixes.iter().any(|p| s.starts_with(p)))
        .map(|(name, _)| *name)
}

struct Frame {
    sym: String,
    dso: String,
}

fn parse_frame(line: &str) -> Option<Frame> {
    // "\t ffffffff8142b2b4 __run_timers ([kernel.kallsyms])"
    let t = line.trim();
    let (_, rest) = t.split_once(char::is_whitespace)?;
    let rest = rest.trim();
    let (sym, dso) = match rest.rfind(" (") {
        Some(i) if rest.ends_with(')') => (&rest[..i], &rest[i + 2..rest.len() - 1]),
        _ => (rest, ""),
    };
    Some(Frame {
        sym: sym.to_owned(),
        dso: dso.to_owned(),
    })
}

/// Code that wasmtime compiled (the plugins' guest code): perf has no symbols for it and names
/// its mapping `[JIT] tid N` or the `/tmp/perf-PID.map` it looked for.
fn is_jit(f: &Frame) -> bool {
    f.dso.contains("JIT") || (f.dso.starts_with("/tmp/perf-") && f.dso.ends_with(".map"))
}

/// The stage of one sample (frames leaf first).
fn classify(frames: &[Frame]) -> &'static str {
    for f in frames {
        if is_jit(f) {
            return JIT;
        }
        if let Some(s) = stage_of_symbol(&f.sym) {
            return s;
        }
    }
    // No stage frame: a task of its own (hyper's client connection task, the server's
    // connection task between requests, the runtime).
    let any = |p: &str| frames.iter().any(|f| f.sym.contains(p));
    if any("hyper::client") || any("UpgradeableConnection") || any("dispatch::Client") {
        return OTHER_HTTP_CLIENT;
    }
    if any("hyper::") {
        return OTHER_HTTP_SERVER;
    }
    if any("tokio::runtime") || any("mio::") {
        return "tokio runtime (scheduler, IO driver, timers) and its syscalls";
    }
    match frames.first() {
        Some(f) if f.dso.contains("kernel") => "kernel, no user frame",
        Some(f) if f.dso.contains("libc") => "libc, no known caller (malloc/free, memcpy)",
        _ => "other",
    }
}

pub fn report(file: &std::path::Path, us_per_call: Option<f64>) -> Result<(), String> {
    // A `.script` file is `perf script -F comm,tid,ip,sym,dso` output already rendered (the
    // DWARF unwinding of a large profile takes minutes; render once, classify many times).
    let mut child = None;
    let out: Box<dyn std::io::Read> = if file.extension().is_some_and(|e| e == "script") {
        Box::new(std::fs::File::open(file).map_err(|e| format!("{}: {e}", file.display()))?)
    } else {
        let mut c = Command::new("perf")
            .args(["script", "-F", "comm,tid,ip,sym,dso", "-i"])
            .arg(file)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("perf script: {e}"))?;
        let out = c.stdout.take().ok_or("no stdout")?;
        child = Some(c);
        Box::new(out)
    };
    let mut counts: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut by_thread: BTreeMap<String, u64> = BTreeMap::new();
    let mut frames: Vec<Frame> = Vec::new();
    let mut thread = String::new();
    let mut total = 0u64;
    let mut flush = |frames: &mut Vec<Frame>, thread: &str| {
        if frames.is_empty() {
            return;
        }
        *counts.entry(classify(frames)).or_default() += 1;
        *by_thread.entry(thread.to_owned()).or_default() += 1;
        total += 1;
        frames.clear();
    };
    for line in BufReader::new(out).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            flush(&mut frames, &thread);
        } else if line.starts_with(char::is_whitespace) {
            if let Some(f) = parse_frame(&line) {
                frames.push(f);
            }
        } else {
            flush(&mut frames, &thread);
            // "tokio-rt-worker 10152 " → the thread's name.
            thread = line.split_whitespace().next().unwrap_or("").to_owned();
        }
    }
    flush(&mut frames, &thread);
    if let Some(mut c) = child {
        let _ = c.wait();
    }
    if total == 0 {
        return Err(format!("no samples in {}", file.display()));
    }
    let mut rows: Vec<(&str, u64)> = counts.into_iter().collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    println!(
        "## where the CPU goes: {} ({total} samples)\n",
        file.display()
    );
    match us_per_call {
        Some(_) => println!("| stage | share of samples | ≈ CPU µs per call |\n|---|---:|---:|"),
        None => println!("| stage | share of samples |\n|---|---:|"),
    }
    for (stage, n) in rows {
        let share = n as f64 / total as f64;
        match us_per_call {
            Some(us) => println!("| {stage} | {:.1}% | {:.0} |", share * 100.0, share * us),
            None => println!("| {stage} | {:.1}% |", share * 100.0),
        }
    }
    println!("\n| thread | share of samples |\n|---|---:|");
    let mut threads: Vec<(String, u64)> = by_thread.into_iter().collect();
    threads.sort_by_key(|t| std::cmp::Reverse(t.1));
    for (t, n) in threads {
        println!("| {t} | {:.1}% |", n as f64 / total as f64 * 100.0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(sym: &str, dso: &str) -> Frame {
        Frame {
            sym: sym.into(),
            dso: dso.into(),
        }
    }

    #[test]
    fn innermost_stage_wins() {
        let sample = [
            f("_int_malloc", "libc.so.6"),
            f("serde_json::ser::to_vec", "bench"),
            f("intentgate::audit::event::AuditEvent::canonical", "bench"),
            f("intentgate::pipeline::Pipeline::decide", "bench"),
            f("intentgate::server::serve::{{closure}}", "bench"),
        ];
        assert!(classify(&sample).starts_with("audit"));
        let jit = [
            f("[unknown]", "[JIT] tid 7"),
            f("wasmtime::runtime::func", "bench"),
        ];
        assert!(classify(&jit).starts_with("plugins"));
        let jit = [
            f("[unknown]", "/tmp/perf-10150.map"),
            f("tokio::runtime::task", "bench"),
        ];
        assert!(classify(&jit).starts_with("plugins"));
        let client = [
            f("__GI___writev", "libc.so.6"),
            f("hyper::proto::h1::io::Buffered<T,B>::poll_flush", "bench"),
            f(
                "<hyper::client::conn::http1::upgrades::UpgradeableConnection<I,B> as Future>::poll",
                "bench",
            ),
        ];
        assert!(classify(&client).starts_with("forward"));
        assert!(
            parse_frame("\t ffffffff8142b2b4 __run_timers ([kernel.kallsyms])")
                .is_some_and(|f| f.dso == "[kernel.kallsyms]")
        );
    }
}
