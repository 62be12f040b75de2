//! Power cuts on the data directory (`support::powercut`): the process runs under a shim that
//! journals every write not yet made durable by an fsync; after SIGKILL the journal is undone,
//! so the directory holds what a machine that lost power at that moment would find.
//!
//! - the harness itself: a writer's unsynced bytes, sizes, creations, renames and unlinks are
//!   dropped and its synced ones kept; SQLite with `synchronous=OFF` loses acknowledged commits
//!   under it (so it provably drops what was never synced) while `synchronous=FULL` keeps every
//!   one;
//! - the gateway binary under load, cut, restored and restarted: every call answered allowed is
//!   in the audit, the chains verify, and the charges equal the stored allowed calls (the token's
//!   `max_calls` is reached exactly across the cut); every approval acknowledged pending is still
//!   pending; every recorded event the webhook's filter matches is delivered after the restart.

use std::collections::{BTreeSet, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::interop::python;
use crate::outbox::{FAST, Receiver, distinct_webhooks};
use crate::support::binary::{collect_lines, listening_url};
use crate::support::gateway::{ADMIN_TOKEN, MASTER_KEY};
use crate::support::http;
use crate::support::powercut::PowerCut;

const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/powercut");

fn wait_lines(lines: &Mutex<Vec<String>>, what: &str, done: impl Fn(&[String]) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done(&lines.lock().expect("lines")) {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &mut Child) {
    child.kill().expect("SIGKILL"); // std sends SIGKILL on unix
    let status = child.wait().expect("wait");
    assert!(!status.success(), "killed, not finished");
}

// ---------------------------------------------------------------------------------------------
// the harness itself

#[test]
fn harness_drops_unsynced_writes_names_and_sizes_and_keeps_synced_ones() {
    let pc = PowerCut::new();
    let d = pc.data();
    std::fs::write(d.join("kept"), b"").expect("kept");
    std::fs::write(d.join("old-name"), b"renamed").expect("old-name");
    std::fs::write(d.join("doomed"), b"unlinked").expect("doomed");
    std::fs::write(d.join("cut"), b"0123456789").expect("cut");
    let mut cmd = Command::new(python());
    cmd.arg(format!("{SCRIPTS}/writer.py"))
        .arg(d)
        .stdout(Stdio::piped());
    pc.arm(&mut cmd);
    let mut child = cmd.spawn().expect("python");
    let lines = collect_lines(child.stdout.take().expect("stdout"));
    wait_lines(&lines, "READY", |l| l.iter().any(|l| l == "READY"));
    kill(&mut child);

    // kill -9 alone keeps everything the process wrote.
    let mut expect_killed = b"C".repeat(10);
    expect_killed.extend(b"A".repeat(90));
    expect_killed.extend(b"B".repeat(50));
    assert_eq!(std::fs::read(d.join("kept")).expect("kept"), expect_killed);
    assert!(d.join("new-unsynced").exists() && d.join("new-name").exists());
    assert!(!d.join("doomed").exists() && !d.join("old-name").exists());
    assert!(d.join("hard-link").exists());
    assert_eq!(std::fs::read(d.join("cut")).expect("cut"), b"012");

    let r = pc.restore();
    assert_eq!(
        std::fs::read(d.join("kept")).expect("kept"),
        b"A".repeat(100),
        "only the synced write is left: {r:?}"
    );
    assert_eq!(
        std::fs::read(d.join("new-synced")).expect("synced name"),
        b"durable"
    );
    assert!(
        !d.join("new-unsynced").exists(),
        "a file whose directory was not synced after its creation is gone"
    );
    assert_eq!(
        std::fs::read(d.join("old-name")).expect("rename undone"),
        b"renamed"
    );
    assert!(!d.join("new-name").exists());
    assert!(
        !d.join("hard-link").exists(),
        "an unsynced link(2) is undone"
    );
    assert_eq!(
        std::fs::read(d.join("doomed")).expect("unlink undone"),
        b"unlinked"
    );
    assert_eq!(
        std::fs::read(d.join("cut")).expect("cut"),
        b"0123456789",
        "an unsynced truncation is undone"
    );
}

fn sqlite_rows(db: &Path) -> (i64, i64) {
    let out = Command::new(python())
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             print(*c.execute('select count(*), coalesce(max(v),0) from t').fetchone())",
        ])
        .arg(db)
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    let s = String::from_utf8(out.stdout).expect("utf8");
    let mut it = s.split_whitespace().map(|n| n.parse::<i64>().expect("n"));
    (it.next().expect("count"), it.next().expect("max"))
}

/// Commits rows under `synchronous=mode` until `acks` are acknowledged, kills, and returns
/// (acknowledged, rows after kill -9 alone, rows after the power cut).
fn sqlite_cut(mode: &str, acks: usize) -> (i64, i64, i64) {
    let pc = PowerCut::new();
    let db = pc.data().join("t.db");
    let out = Command::new(python())
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); \
             c.execute('pragma journal_mode=wal'); c.execute('create table t(v)'); c.commit()",
        ])
        .arg(&db)
        .output()
        .expect("python");
    assert!(out.status.success(), "{out:?}");
    let mut cmd = Command::new(python());
    cmd.arg(format!("{SCRIPTS}/sqlite_writer.py"))
        .arg(&db)
        .arg(mode)
        .stdout(Stdio::piped());
    pc.arm(&mut cmd);
    let mut child = cmd.spawn().expect("python");
    let lines = collect_lines(child.stdout.take().expect("stdout"));
    wait_lines(&lines, "acknowledged commits", |l| l.len() >= acks);
    pc.cut(&mut child);
    let acked = lines
        .lock()
        .expect("lines")
        .iter()
        .filter_map(|l| l.strip_prefix("ACK ")?.parse::<i64>().ok())
        .max()
        .expect("acks");
    // What kill -9 alone leaves: a copy of the files (SQLite recovers from the WAL).
    let copy = pc.scratch().join("killed-only");
    std::fs::create_dir(&copy).expect("copy dir");
    for name in ["t.db", "t.db-wal"] {
        if pc.data().join(name).exists() {
            std::fs::copy(pc.data().join(name), copy.join(name)).expect("copy");
        }
    }
    let (killed_only, _) = sqlite_rows(&copy.join("t.db"));
    let r = pc.restore();
    assert!(r.undone >= 1, "the cut landed after a write: {r:?}");
    let (after_cut, max) = sqlite_rows(&db);
    assert_eq!(after_cut, max, "rows are a prefix ({r:?})");
    (acked, killed_only, after_cut)
}

#[test]
fn harness_shows_sqlite_without_sync_losing_commits_and_with_full_sync_keeping_them() {
    let (acked, killed_only, after_cut) = sqlite_cut("OFF", 300);
    assert!(
        killed_only >= acked,
        "kill -9 alone keeps every commit, synced or not ({killed_only} of {acked})"
    );
    assert!(
        after_cut < acked,
        "synchronous=OFF: the power cut loses acknowledged commits ({after_cut} of {acked} left)"
    );
    let (acked, killed_only, after_cut) = sqlite_cut("FULL", 300);
    assert!(killed_only >= acked);
    assert!(
        after_cut >= acked,
        "synchronous=FULL: every acknowledged commit survives the cut ({after_cut} of {acked})"
    );
}

// ---------------------------------------------------------------------------------------------
// the gateway binary

/// The gateway binary on the power-cut data directory, under the shim when `armed` (its value:
/// the cut lands after that many writes).
struct Gateway {
    child: Child,
    url: String,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    async fn start(pc: &PowerCut, armed: Option<usize>, extra: &[String]) -> Gateway {
        let mut args: Vec<String> = [
            "--admin-token",
            ADMIN_TOKEN,
            "--master-key",
            MASTER_KEY,
            "--tenant-admins",
            "acme:acme-admin-token-0123456789",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend_from_slice(extra);
        Gateway::start_bare(pc, armed, &args).await
    }

    /// Without the test's admin token and master key: the gateway generates its secrets.
    async fn start_bare(pc: &PowerCut, armed: Option<usize>, args: &[String]) -> Gateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_intentgate"));
        cmd.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("INTENTGATE_LOG_FORMAT", "json")
            .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
            .args(["serve", "--addr", "127.0.0.1:0", "--demo"])
            .arg("--data-dir")
            .arg(pc.data())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if let Some(writes) = armed {
            pc.arm_cut_after(&mut cmd, writes);
        }
        let mut child = cmd.spawn().expect("start the gateway binary");
        let lines = collect_lines(child.stdout.take().expect("stdout"));
        match listening_url(&mut child, &lines).await {
            Ok(url) => Gateway { child, url },
            Err(e) => panic!("{e}"),
        }
    }

    async fn mint(&self, body: Value) -> (String, String) {
        let (status, v) = http::post_json(
            &format!("{}/v1/admin/mint", self.url),
            Some(ADMIN_TOKEN),
            &body,
        )
        .await;
        assert_eq!(status, 200, "mint: {v}");
        (
            v["token"].as_str().expect("token").to_owned(),
            v["jti"].as_str().expect("jti").to_owned(),
        )
    }

    /// Every event of `query` (newest first), through the keyset pages.
    async fn audit(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut cursor = String::new();
        loop {
            let (status, v) = http::get_json(
                &format!(
                    "{}/v1/admin/audit?limit=1000&{query}&cursor={cursor}",
                    self.url
                ),
                ADMIN_TOKEN,
            )
            .await;
            assert_eq!(status, 200, "{v}");
            out.extend(v["items"].as_array().cloned().unwrap_or_default());
            match v["next_cursor"].as_str() {
                Some(c) if !c.is_empty() => cursor = c.to_owned(),
                _ => return out,
            }
        }
    }

    async fn verifier_key(&self) -> String {
        let (status, v) = http::get_json(
            &format!("{}/v1/admin/audit/public-key", self.url),
            ADMIN_TOKEN,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        v["verifier_key"].as_str().expect("verifier key").to_owned()
    }

    async fn verify(&self, tenant: &str) {
        let (status, v) = http::get_json(
            &format!("{}/v1/admin/audit/verify?tenant={tenant}", self.url),
            ADMIN_TOKEN,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(
            v["ok"], true,
            "the {tenant} chain verifies after the cut: {v}"
        );
    }
}

/// What a call was answered, if it was answered at all (the kill cuts calls in flight).
#[derive(Debug, Clone)]
enum Answer {
    Allowed(i64),
    Refused(i64),
    Pending(String),
}

/// POSTs JSON with a bearer token; `None` when no answer comes (the gateway was cut).
async fn try_post(
    url: &str,
    bearer: &str,
    body: &Value,
) -> Option<hyper::Response<hyper::body::Incoming>> {
    use http_body_util::Full;
    let client: hyper_util::client::legacy::Client<_, Full<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http();
    let req = hyper::Request::post(url)
        .header("content-type", "application/json")
        .header("accept", "application/json")
        .header("authorization", format!("Bearer {bearer}"))
        .body(Full::new(bytes::Bytes::from(
            serde_json::to_vec(body).expect("json"),
        )))
        .expect("request");
    tokio::time::timeout(Duration::from_secs(30), client.request(req))
        .await
        .ok()?
        .ok()
}

async fn call(url: &str, token: &str, tool: &str, args: Value) -> Option<Answer> {
    use http_body_util::BodyExt;
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": tool, "arguments": args}});
    let resp = try_post(&format!("{url}/v1/mcp"), token, &body).await?;
    let event_id = resp
        .headers()
        .get("x-intentgate-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok());
    let bytes = resp.into_body().collect().await.ok()?.to_bytes();
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    if let Some(code) = v["error"]["code"].as_i64() {
        if code == -32019 {
            return Some(Answer::Pending(
                v["error"]["data"]["pending_id"]
                    .as_str()
                    .expect("pending_id")
                    .to_owned(),
            ));
        }
        return Some(Answer::Refused(code));
    }
    assert!(v.get("result").is_some(), "{v}");
    Some(Answer::Allowed(
        event_id.expect("an allowed call names its audit event"),
    ))
}

/// Runs `workers` loops of `one(worker, n)` until `stop`; every answer is kept.
fn load<F, Fut>(
    workers: usize,
    stop: &Arc<AtomicBool>,
    answers: &Arc<Mutex<Vec<Answer>>>,
    one: F,
) -> Vec<tokio::task::JoinHandle<()>>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Option<Answer>> + Send,
{
    (0..workers)
        .map(|w| {
            let (stop, answers, one) = (stop.clone(), answers.clone(), one.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    match one(w, n).await {
                        Some(a) => answers.lock().expect("answers").push(a),
                        None => break, // the gateway is gone
                    }
                }
            })
        })
        .collect()
}

async fn wait_answers(answers: &Mutex<Vec<Answer>>, what: &str, done: impl Fn(&[Answer]) -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !done(&answers.lock().expect("answers")) {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Cuts the power under the gateway in the middle of the load (right after one of its writes),
/// lets the load notice, and restores the data directory to what the disk would hold.
async fn cut(
    gw: Gateway,
    pc: &PowerCut,
    stop: &AtomicBool,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    let mut gw = gw;
    pc.cut(&mut gw.child);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("load task");
    }
    let r = pc.restore();
    assert!(
        r.undone >= 1,
        "the cut dropped the write it landed after: {r:?}"
    );
    eprintln!("power cut: {r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_under_load_loses_no_allowed_call_and_no_charge() {
    const MAX_CALLS: usize = 600;
    const CUTS: usize = 3;
    let pc = PowerCut::new();
    let mut acked: BTreeSet<i64> = BTreeSet::new();
    let mut minted = None;
    // Three cuts in a row: each restart under the shim continues from a restored directory.
    for round in 0..CUTS {
        let gw = Gateway::start(&pc, Some([1, 5, 12][round]), &[]).await;
        if minted.is_none() {
            let (token, jti) = gw
                .mint(json!({"subject": "agent-p", "tools": ["echo"], "max_calls": MAX_CALLS}))
                .await;
            minted = Some((token, jti, gw.verifier_key().await));
        }
        let (token, _, key) = minted.clone().expect("minted");
        assert_eq!(
            gw.verifier_key().await,
            key,
            "round {round}: the audit key is kept"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(Mutex::new(Vec::new()));
        let url = gw.url.clone();
        let tasks = load(16, &stop, &answers, move |w, n| {
            let (url, token) = (url.clone(), token.clone());
            async move { call(&url, &token, "echo", json!({"text": format!("{w}-{n}")})).await }
        });
        wait_answers(&answers, "allowed calls", |a| a.len() >= 120).await;
        cut(gw, &pc, &stop, tasks).await;
        for a in answers.lock().expect("answers").iter() {
            match a {
                Answer::Allowed(id) => assert!(acked.insert(*id), "event id {id} given twice"),
                other => panic!("round {round}: {other:?} before the budget ran out"),
            }
        }
    }
    let (token, jti, key) = minted.expect("minted");
    assert!(
        acked.len() < MAX_CALLS,
        "the cuts landed before the budget ran out"
    );

    let gw = Gateway::start(&pc, None, &[]).await;
    assert_eq!(
        gw.verifier_key().await,
        key,
        "the audit log key published before the cut is the key after it"
    );
    gw.verify("default").await;
    // Read without a filter that a lookup table answers: the events themselves (the run made
    // every call with this one token).
    let stored = allowed_ids(&gw, "").await;
    let missing: Vec<_> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "every call answered allowed is in the audit after the cut; missing {missing:?}"
    );
    // On SQLite the token, agent, tool and time filters read lookup tables that the writer
    // fills a slice at a time (the newest events past them are read from the events
    // themselves): after the cuts they find exactly the stored calls. Here the tables may not
    // have been entered yet (heavy commits under fewer than a slice of events).
    filters_find(&gw, &jti, &stored, "after the cuts").await;
    // The rest of the budget: charges == stored allowed calls, so exactly MAX_CALLS in all.
    let mut more = 0;
    loop {
        match call(&gw.url, &token, "echo", json!({"text": "after"})).await {
            Some(Answer::Allowed(_)) => more += 1,
            Some(Answer::Refused(code)) => {
                assert_eq!(code, -32013, "refused by the budget");
                break;
            }
            other => panic!("{other:?}"),
        }
        assert!(more <= MAX_CALLS, "the budget never ran out");
    }
    assert_eq!(
        stored.len() + more,
        MAX_CALLS,
        "stored allowed calls ({}) + allowed after the cut ({more}) == max_calls: no charge lost \
         or doubled ({} acknowledged before the cut)",
        stored.len(),
        acked.len()
    );
    // The calls one at a time since then were light commits, after which the writer enters
    // what has gathered: the filters now read the tables for most events.
    let all = allowed_ids(&gw, "").await;
    assert_eq!(all.len(), MAX_CALLS);
    filters_find(&gw, &jti, &all, "once the tables were entered").await;
    gw.verify("default").await;
}

/// Each lookup-table filter finds exactly `want` among the allowed tool calls.
async fn filters_find(gw: &Gateway, jti: &str, want: &HashSet<i64>, when: &str) {
    let by_token = format!("jti={jti}");
    for by in [
        by_token.as_str(),
        "agent_id=agent-p",
        "tool=echo",
        "from=2000-01-01T00:00:00Z",
    ] {
        let found = allowed_ids(gw, &format!("&{by}")).await;
        assert_eq!(&found, want, "the filter {by} {when}");
    }
}

/// The ids of the allowed tool calls of tenant `default`, with `more` filters (`&k=v…`).
async fn allowed_ids(gw: &Gateway, more: &str) -> HashSet<i64> {
    gw.audit(&format!(
        "tenant=default{more}&decision=allow&event=intentgate.tool_call"
    ))
    .await
    .iter()
    .map(|e| e["id"].as_i64().expect("id"))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_under_load_keeps_every_acknowledged_pending_approval() {
    let pc = PowerCut::new();
    let gw = Gateway::start(&pc, Some(3), &[]).await;
    let (token, _) = gw
        .mint(json!({"subject": "agent-q", "tools": ["echo", "delete_records"]}))
        .await;
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let url = gw.url.clone();
    // Escalations beside allowed calls, so approvals share commits with other records.
    let tasks = load(12, &stop, &answers, move |w, n| {
        let (url, token) = (url.clone(), token.clone());
        async move {
            if w % 2 == 0 {
                call(
                    &url,
                    &token,
                    "delete_records",
                    json!({"table": format!("t{w}-{n}")}),
                )
                .await
            } else {
                call(&url, &token, "echo", json!({"text": format!("{w}-{n}")})).await
            }
        }
    });
    let pending = |a: &[Answer]| a.iter().filter(|a| matches!(a, Answer::Pending(_))).count();
    wait_answers(&answers, "pending approvals", |a| pending(a) >= 60).await;
    cut(gw, &pc, &stop, tasks).await;
    let acked: Vec<String> = answers
        .lock()
        .expect("answers")
        .iter()
        .filter_map(|a| match a {
            Answer::Pending(id) => Some(id.clone()),
            _ => None,
        })
        .collect();

    let gw = Gateway::start(&pc, None, &[]).await;
    let (status, v) = http::get_json(
        &format!("{}/v1/admin/approvals?status=pending&limit=500", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let listed: Vec<&str> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|r| r["pending_id"].as_str())
        .collect();
    for id in &acked {
        assert_eq!(
            listed.iter().filter(|l| **l == id.as_str()).count(),
            1,
            "{id}, acknowledged pending before the cut, is pending once after it"
        );
    }
    gw.verify("default").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_with_the_webhook_down_delivers_every_recorded_event_after_restart() {
    let rx = Receiver::start();
    rx.control(json!({"down": true, "status": 503, "retry_after": "0"}))
        .await;
    let pc = PowerCut::new();
    let mut flags: Vec<String> = FAST.iter().map(|s| s.to_string()).collect();
    flags.extend(rx.env_flags());
    let gw = Gateway::start(&pc, Some(7), &flags).await;
    // One token per worker: the denial throttle allows 30 denials per token and minute.
    let mut tokens = Vec::new();
    for w in 0..8 {
        let (t, _) = gw
            .mint(json!({"subject": format!("bot-{w}"), "tenant": "acme", "tools": ["read_*"]}))
            .await;
        tokens.push(t);
    }
    let tokens = Arc::new(tokens);
    let stop = Arc::new(AtomicBool::new(false));
    let answers = Arc::new(Mutex::new(Vec::new()));
    let url = gw.url.clone();
    let tasks = load(8, &stop, &answers, move |w, n| {
        let (url, tokens) = (url.clone(), tokens.clone());
        async move {
            if n > 25 {
                // This worker's token is spent; allowed calls keep the writer busy.
                return call(&url, &tokens[w], "read_invoice", json!({"id": n})).await;
            }
            call(&url, &tokens[w], "delete_everything", json!({"n": n})).await
        }
    });
    let denied = |a: &[Answer]| a.iter().filter(|a| matches!(a, Answer::Refused(_))).count();
    wait_answers(&answers, "denied calls", |a| denied(a) >= 80).await;
    cut(gw, &pc, &stop, tasks).await;
    let answered = denied(&answers.lock().expect("answers"));

    rx.control(json!({"down": false})).await;
    let gw = Gateway::start(&pc, None, &flags).await;
    gw.verify("acme").await;
    let recorded: BTreeSet<i64> = gw
        .audit("tenant=acme&decision=block")
        .await
        .iter()
        .map(|e| e["seq"].as_i64().expect("seq"))
        .collect();
    assert!(
        recorded.len() >= answered,
        "every answered denial is recorded ({} recorded, {answered} answered)",
        recorded.len()
    );
    let until = Instant::now() + Duration::from_secs(60);
    let delivered = loop {
        let delivered: BTreeSet<i64> = distinct_webhooks(&rx.get("records").await)
            .iter()
            .filter(|h| h["tenant"] == "acme")
            .filter_map(|h| h["seq"].as_i64())
            .collect();
        if recorded.is_subset(&delivered) || Instant::now() > until {
            break delivered;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missing: Vec<_> = recorded.difference(&delivered).collect();
    assert!(
        missing.is_empty(),
        "every recorded denial is delivered after the restart; missing seqs {missing:?}"
    );
    assert!(
        delivered.is_subset(&recorded),
        "nothing was delivered that the cut un-recorded: {:?}",
        delivered.difference(&recorded).collect::<Vec<_>>()
    );
    assert_eq!(rx.get("rejected").await, json!([]));
}

/// The keys a gateway generates on its first start (`secrets.env`: master key and admin
/// token; `audit-log.key`: the audit signing key) are durable before it serves: a power cut
/// right after start-up must not make the next start generate new ones (the old admin token
/// would stop working, and the published audit verifier key would change).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn power_cut_after_first_start_keeps_the_generated_secrets_and_audit_key() {
    let pc = PowerCut::new();
    let mut gw = Gateway::start_bare(&pc, Some(1), &[]).await;
    let secrets = std::fs::read_to_string(pc.data().join("secrets.env")).expect("secrets.env");
    let admin = secrets
        .lines()
        .find_map(|l| {
            l.split_once('=')
                .filter(|(k, _)| k.ends_with("ADMIN_TOKEN"))
        })
        .map(|(_, v)| v.to_owned())
        .expect("an admin token in secrets.env");
    let key_of = |url: String, admin: String| async move {
        let (status, v) = http::get_json(&format!("{url}/v1/admin/audit/public-key"), &admin).await;
        assert_eq!(status, 200, "{v}");
        v["verifier_key"].as_str().expect("verifier key").to_owned()
    };
    let key = key_of(gw.url.clone(), admin.clone()).await;
    // The cut lands at the first write of a mint (its answer never comes).
    pc.cut_at_next_write(&gw.child);
    let url = gw.url.clone();
    let mint = tokio::spawn(mint_into_the_cut(url, admin.clone()));
    pc.wait_cut(&mut gw.child);
    let _ = mint.await;
    drop(gw);
    let r = pc.restore();
    assert!(r.undone >= 1, "{r:?}");

    let gw = Gateway::start_bare(&pc, None, &[]).await;
    assert_eq!(
        std::fs::read_to_string(pc.data().join("secrets.env"))
            .ok()
            .as_deref(),
        Some(secrets.as_str()),
        "the generated secrets survive the cut"
    );
    assert_eq!(
        key_of(gw.url.clone(), admin).await,
        key,
        "the audit key survives the cut"
    );

    /// A mint that the cut interrupts.
    async fn mint_into_the_cut(url: String, admin: String) {
        let body = json!({"subject": "a", "tools": ["echo"]});
        let _ = try_post(&format!("{url}/v1/admin/mint"), &admin, &body).await;
    }
}
