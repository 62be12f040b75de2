//! The official MCP conformance suite through the gateway (issue 12, "How it will be checked").
//!
//! `@modelcontextprotocol/conformance` (pinned in `tests/conformance/package-lock.json`) runs its
//! server scenarios for each protocol revision at that revision's own wire (`--requirements
//! 2025-11-25`: initialize handshake; `--requirements 2026-07-28`: stateless, per-request `_meta`),
//! once straight against the upstream and once through the gateway:
//!
//! - upstream: `tests/conformance/everything_server.mjs`, written with the official TypeScript SDK
//!   v2 (`@modelcontextprotocol/server`), implements what the scenarios exercise, both eras on one
//!   endpoint;
//! - gateway: in-process, SQLite, a policy that allows everything, and a token for every tool;
//! - `tests/conformance/bearer_shim.mjs` adds the token, which the suite's CLI cannot send.
//!
//! The assertion: every scenario that passes directly passes through the gateway, except the
//! exact [`KNOWN_GAPS`]. A gap that starts passing fails the test too, so the list stays exact and
//! shrinks as the gateway grows; so does [`UPSTREAM_GAPS`], what the upstream itself fails.
//!
//! To regenerate both lists (after a gateway or suite change), run
//! `INTENTGATE_CONFORMANCE_PRINT=1 cargo test -p intentgate --test main conformance -- --nocapture`:
//! it prints the lists as they are, with each scenario's first failing check, before asserting.
//! The pass counts of the four runs are always printed (`--nocapture` shows them).
//!
//! It must never judge a scenario by anything but the suite's own report, nor re-run a scenario
//! that passed (a failure where a pass is expected is re-run once, alone: see `retry_failures`).
//!
//! Every tool is a hard requirement: without node or `tests/conformance/node_modules` the test
//! fails and names the command that installs them (`bash tests/conformance/setup.sh`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::gateway::{self, Backend};

const SETUP: &str = "bash tests/conformance/setup.sh";
const REVISIONS: [&str; 2] = ["2025-11-25", "2026-07-28"];
/// One whole suite run (a revision, one target); the scenarios' own timeouts are 30 s each.
const RUN_DEADLINE: Duration = Duration::from_secs(900);

/// One line per scenario, `<revision> <scenario>: <why>`: the scenarios that pass straight
/// against the upstream and fail through the gateway. Exact: a new failure and a gap that closes
/// both fail the test. To regenerate: `INTENTGATE_CONFORMANCE_PRINT=1` (see the module
/// documentation), then write each line's reason from the failing check it prints.
const KNOWN_GAPS: &str = "";

/// One line per scenario, as in [`KNOWN_GAPS`]: the scenarios the upstream (TypeScript SDK 2.4.0)
/// fails on its own, so they say nothing about the gateway. Exact, like [`KNOWN_GAPS`].
const UPSTREAM_GAPS: &str = "\
2026-07-28 tasks-capability-negotiation: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-dispatch-and-envelope: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-lifecycle: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-mrtr-composition: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-mrtr-input: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-request-headers: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-request-state-removal: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-required-task-error: the tasks extension (SEP-2663, not scored) is not in the SDK
2026-07-28 tasks-wire-fields: the tasks extension (SEP-2663, not scored) is not in the SDK
";

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("conformance")
}

fn cli() -> PathBuf {
    dir().join("node_modules/@modelcontextprotocol/conformance/dist/index.js")
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Runs a command to completion (killed after the deadline); returns exit code and outputs.
fn run(mut cmd: Command, deadline: Duration) -> (Option<i32>, String, String) {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}; run {SETUP}"));
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(s) => break Some(s),
            None if start.elapsed() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            None => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    (
        status.and_then(|s| s.code()),
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    )
}

/// Fails (never skips) when node or the suite's packages are missing.
fn require_tools() {
    let mut check = Command::new("node");
    check
        .arg(dir().join("everything_server.mjs"))
        .arg("--check");
    let (code, out, err) = run(check, Duration::from_secs(60));
    if code != Some(0) || !cli().is_file() {
        panic!("node and tests/conformance/node_modules are needed: run {SETUP}\n{out}{err}");
    }
}

/// A node process that prints `PORT <n>` once it listens and exits when its stdin closes.
struct NodeServer {
    port: u16,
    child: Child,
    _stdin: ChildStdin,
}

impl NodeServer {
    fn start(script: &str, args: &[&str], env: &[(&str, &str)]) -> NodeServer {
        let mut cmd = Command::new("node");
        cmd.arg(dir().join(script))
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {script}: {e}; run {SETUP}"));
        let stdin = child.stdin.take().expect("stdin");
        let stderr = reader(child.stderr.take().expect("stderr"));
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = stdout.read_line(&mut line);
            let _ = tx.send(line);
            let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let Some(port) = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse::<u16>().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{script} did not start (got {line:?}); run {SETUP}\n{}",
                stderr.join().unwrap_or_default()
            );
        };
        NodeServer {
            port,
            child,
            _stdin: stdin,
        }
    }
}

impl Drop for NodeServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One suite run's verdicts: scenario → passed, and each failing scenario's first failing check.
struct Outcome {
    passed: BTreeMap<String, bool>,
    first_failure: BTreeMap<String, String>,
}

impl Outcome {
    fn passing(&self) -> BTreeSet<String> {
        self.passed
            .iter()
            .filter(|(_, ok)| **ok)
            .map(|(s, _)| s.clone())
            .collect()
    }

    fn count(&self) -> String {
        format!("{}/{}", self.passing().len(), self.passed.len())
    }

    fn why(&self, scenario: &str) -> String {
        self.first_failure
            .get(scenario)
            .cloned()
            .unwrap_or_else(|| "(no failing check recorded)".into())
    }
}

/// Runs the suite's server scenarios of `revision` against `url`.
fn suite(url: &str, revision: &str) -> Outcome {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new("node");
    cmd.current_dir(out_dir.path())
        .arg("--import")
        .arg(dir().join("node20").join("register.mjs"))
        .arg(cli())
        .args(["server", "--url", url, "--requirements", revision, "-o"])
        .arg(out_dir.path());
    let (code, out, err) = run(cmd, RUN_DEADLINE);
    let ctx = format!("conformance suite {revision} against {url} exited {code:?}");
    // The summary the suite prints: `✓ name: 3 passed, 0 failed` / `✗ name: ...`, then `Total:`.
    let mut passed = BTreeMap::new();
    let mut total = false;
    for line in out.lines().skip_while(|l| !l.contains("=== SUMMARY ===")) {
        if line.starts_with("Total:") {
            total = true;
            break;
        }
        let (ok, rest) = if let Some(r) = line.strip_prefix("✓ ") {
            (true, r)
        } else if let Some(r) = line.strip_prefix("✗ ") {
            (false, r)
        } else {
            continue;
        };
        if let Some((name, _)) = rest.split_once(": ") {
            passed.insert(name.to_owned(), ok);
        }
    }
    assert!(
        total && !passed.is_empty(),
        "{ctx}: no summary\n--- stdout\n{out}\n--- stderr\n{err}"
    );
    Outcome {
        first_failure: first_failures(out_dir.path()),
        passed,
    }
}

/// Runs each failing scenario that `suspect` names once more, alone, against the same target,
/// and keeps that verdict. The suite waits a bounded time for some messages, so a loaded machine
/// can fail a scenario; only failures are re-run, so a retry never hides a gap.
fn retry_failures(
    outcome: &mut Outcome,
    url: &str,
    revision: &str,
    suspect: impl Fn(&str) -> bool,
) {
    let failing: Vec<String> = outcome
        .passed
        .iter()
        .filter(|(s, ok)| !**ok && suspect(s))
        .map(|(s, _)| s.clone())
        .collect();
    for scenario in failing {
        let out_dir = tempfile::tempdir().expect("tempdir");
        let mut cmd = Command::new("node");
        cmd.current_dir(out_dir.path())
            .arg("--import")
            .arg(dir().join("node20").join("register.mjs"))
            .arg(cli())
            .args(["server", "--url", url, "--scenario", &scenario])
            .args(["--spec-version", revision, "--force", "-o"])
            .arg(out_dir.path());
        let _ = run(cmd, RUN_DEADLINE);
        let ran = std::fs::read_dir(out_dir.path()).is_ok_and(|mut d| d.next().is_some());
        let failures = first_failures(out_dir.path());
        let ok = ran && !failures.contains_key(&scenario);
        eprintln!("conformance {revision} {scenario} against {url}, alone: passed {ok}");
        if ok {
            outcome.passed.insert(scenario.clone(), true);
            outcome.first_failure.remove(&scenario);
        }
    }
}

/// The first failing check of each failing scenario (and the ids of the others), from
/// `<out>/server-<scenario>-<timestamp>/checks.json`.
fn first_failures(out: &Path) -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(out) else {
        return found;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        // The timestamp suffix is `-YYYY-MM-DDTHH-MM-SS-mmmZ` (25 bytes).
        let Some(scenario) = name
            .strip_prefix("server-")
            .and_then(|s| s.len().checked_sub(25).map(|n| &s[..n]))
        else {
            continue;
        };
        let checks: Value = std::fs::read(e.path().join("checks.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(Value::Null);
        let failing: Vec<&Value> = checks
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["status"] == "FAILURE")
            .collect();
        if let Some(c) = failing.first() {
            let msg: String = c["errorMessage"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(300)
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let mut line = format!("{}: {msg}", c["id"].as_str().unwrap_or("?"));
            if failing.len() > 1 {
                let more: Vec<&str> = failing[1..]
                    .iter()
                    .map(|c| c["id"].as_str().unwrap_or("?"))
                    .collect();
                line.push_str(&format!(" (also failing: {})", more.join(", ")));
            }
            found.insert(scenario.to_owned(), line);
        }
    }
    found
}

/// The scenarios `list` (lines `<revision> <scenario>: <why>`) names for `revision`.
fn listed(list: &str, revision: &str) -> BTreeSet<String> {
    list.lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(r, _)| *r == revision)
        .filter_map(|(_, rest)| rest.split_once(": ").map(|(s, _)| s.to_owned()))
        .collect()
}

/// Prints a list in its source form, for pasting over the constant.
fn print_list(name: &str, entries: &[(String, String, String)]) {
    eprintln!("const {name}: &str = \"\\");
    for (r, s, why) in entries {
        eprintln!("{r} {s}: {why}");
    }
    eprintln!("\";");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_that_passes_directly_passes_through_the_gateway() {
    tokio::task::spawn_blocking(require_tools)
        .await
        .expect("tool check");
    let upstream =
        tokio::task::spawn_blocking(|| NodeServer::start("everything_server.mjs", &["0"], &[]))
            .await
            .expect("upstream");
    let upstream_url = format!("http://127.0.0.1:{}/mcp", upstream.port);

    let policy_dir = tempfile::tempdir().expect("tempdir");
    let policy = policy_dir.path().join("allow.rego");
    std::fs::write(
        &policy,
        "package intentgate.policy\n\ndecision := {\"allow\": true, \"reason\": \"conformance: allow everything\"}\n",
    )
    .expect("policy");
    let policy = policy.display().to_string();
    let gw = gateway::start(
        Backend::Sqlite,
        Some(&upstream_url),
        &["--policy-file", &policy],
    )
    .await;
    let (token, _) = gw
        .mint(
            json!({"subject": "agent-conformance", "tenant": "acme", "ttl_seconds": 3600,
                     "tools": ["*"]}),
        )
        .await;
    let gw_url = gw.url.clone();
    let shim = tokio::task::spawn_blocking(move || {
        NodeServer::start(
            "bearer_shim.mjs",
            &[gw_url.as_str()],
            &[("INTENTGATE_SHIM_TOKEN", &token)],
        )
    })
    .await
    .expect("shim");
    let through = format!("http://127.0.0.1:{}/v1/mcp", shim.port);

    // The direct runs one after the other (the upstream passes timing-sensitive scenarios), then
    // the gateway runs side by side: there the suite spends most of its time waiting.
    let mut direct = Vec::new();
    for revision in REVISIONS {
        let url = upstream_url.clone();
        direct.push(
            tokio::task::spawn_blocking(move || suite(&url, revision))
                .await
                .expect("suite run"),
        );
    }
    let runs: Vec<_> = REVISIONS
        .iter()
        .map(|revision| {
            let (url, revision) = (through.clone(), *revision);
            tokio::task::spawn_blocking(move || suite(&url, revision))
        })
        .collect();
    let mut via_gateway = Vec::new();
    for r in runs {
        via_gateway.push(r.await.expect("suite run"));
    }

    // Suspicious failures get one more run each, alone (see retry_failures); the vectors keep
    // their order (each revision's outcomes are taken from the front and put back at the end).
    for revision in REVISIONS {
        let upstream_known = listed(UPSTREAM_GAPS, revision);
        let known = listed(KNOWN_GAPS, revision);
        let (url, through) = (upstream_url.clone(), through.clone());
        let (mut d, mut v) = (direct.remove(0), via_gateway.remove(0));
        let (d, v) = tokio::task::spawn_blocking(move || {
            retry_failures(&mut d, &url, revision, |s| !upstream_known.contains(s));
            let direct_passing = d.passing();
            retry_failures(&mut v, &through, revision, |s| {
                direct_passing.contains(s) && !known.contains(s)
            });
            (d, v)
        })
        .await
        .expect("retries");
        direct.push(d);
        via_gateway.push(v);
    }

    let mut problems = Vec::new();
    let (mut upstream_now, mut gaps_now) = (Vec::new(), Vec::new());
    for (i, revision) in REVISIONS.iter().enumerate() {
        let (direct, via) = (&direct[i], &via_gateway[i]);
        eprintln!(
            "conformance {revision}: direct {}, through the gateway {}",
            direct.count(),
            via.count()
        );
        assert_eq!(
            direct.passed.keys().collect::<Vec<_>>(),
            via.passed.keys().collect::<Vec<_>>(),
            "{revision}: both runs must cover the same scenarios"
        );
        for (s, ok) in &direct.passed {
            if !ok {
                upstream_now.push((revision.to_string(), s.clone(), direct.why(s)));
            }
        }
        let lost: BTreeSet<String> = direct
            .passing()
            .difference(&via.passing())
            .cloned()
            .collect();
        for s in &lost {
            gaps_now.push((revision.to_string(), s.clone(), via.why(s)));
        }

        let upstream_known = listed(UPSTREAM_GAPS, revision);
        let upstream_failing: BTreeSet<String> = direct
            .passed
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(s, _)| s.clone())
            .collect();
        for s in upstream_failing.difference(&upstream_known) {
            problems.push(format!(
                "{revision} {s}: fails straight against the upstream: {}",
                direct.why(s)
            ));
        }
        for s in upstream_known.difference(&upstream_failing) {
            problems.push(format!(
                "{revision} {s}: listed in UPSTREAM_GAPS but passes directly (or was not run): remove it"
            ));
        }

        let known = listed(KNOWN_GAPS, revision);
        for s in lost.difference(&known) {
            problems.push(format!(
                "{revision} {s}: passes directly, fails through the gateway: {}",
                via.why(s)
            ));
        }
        for s in known.difference(&lost) {
            problems.push(format!(
                "{revision} {s}: listed in KNOWN_GAPS but passes through the gateway now (or no longer passes directly): remove it"
            ));
        }
    }

    if std::env::var_os("INTENTGATE_CONFORMANCE_PRINT").is_some() {
        print_list("UPSTREAM_GAPS", &upstream_now);
        print_list("KNOWN_GAPS", &gaps_now);
    }
    drop(shim);
    gw.shutdown().await;
    drop(upstream);
    assert!(
        problems.is_empty(),
        "{} conformance difference(s) (INTENTGATE_CONFORMANCE_PRINT=1 prints the lists as they are):\n{}",
        problems.len(),
        problems.join("\n")
    );
}
