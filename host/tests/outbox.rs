//! The outbox end to end: a real gateway (in-process, or the binary for kill -9) delivering to
//! local receivers written from the vendors' documentation (`tests/interop/outbox_receiver.py`:
//! a Standard Webhooks receiver verifying with the `standardwebhooks` library, a Splunk HEC
//! collector, a Datadog logs v2 intake).
//!
//! - a deny and an approval decision reach the signed webhook and the Slack, Teams and
//!   PagerDuty receivers, each checking its vendor's documented format;
//! - a destination down, then up: every event arrives, in order per tenant, none twice beyond
//!   its idempotency key, and calls keep their latency meanwhile;
//! - hostile formatter components (trap, loop, garbage) fail only their own destinations;
//! - dead letters are kept, listed and re-driven; secrets never come back; tenant scoping;
//! - kill -9 of the gateway binary during delivery loses nothing recorded;
//! - on PostgreSQL, two replicas share the lanes without delivering a batch twice at once.
//!
//! Needs `pip install -r tests/interop/requirements.txt` (the `standardwebhooks` package).

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::gateway::{self, ADMIN_TOKEN, Backend, MASTER_KEY, TestGateway};
use crate::support::http;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const HEC_TOKEN: &str = "hec-token-0123";
const DD_KEY: &str = "dd-api-key-0123";
/// A PagerDuty integration key is 32 characters.
const PD_KEY: &str = "R0UT1NGKEY0123456789abcdefABCDEF";
const GLOBEX_ADMIN: &str = "globex-admin-token-0123456789abcdef";

fn python() -> String {
    std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The Python receivers, killed on drop.
pub(crate) struct Receiver {
    child: Child,
    url: String,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    pub(crate) fn start() -> Receiver {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/interop/outbox_receiver.py"
        );
        let mut child = Command::new(python())
            .args([script, SECRET, HEC_TOKEN, DD_KEY, PD_KEY])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start the receiver: {e}; pip install -r tests/interop/requirements.txt"
                )
            });
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("receiver port");
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .unwrap_or_else(|| panic!("receiver did not start (needs standardwebhooks): {line:?}"))
            .to_owned();
        Receiver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub(crate) async fn control(&self, state: Value) {
        let (status, _) = http::post_json(&format!("{}/control", self.url), None, &state).await;
        assert_eq!(status, 200);
    }

    pub(crate) async fn get(&self, what: &str) -> Value {
        let (_, _, body) =
            http::send("GET", &format!("{}/{what}", self.url), &[], Vec::new()).await;
        serde_json::from_slice(&body).expect("receiver JSON")
    }

    pub(crate) fn env_flags(&self) -> Vec<String> {
        [
            "--webhook-url",
            &format!("{}/webhook", self.url),
            "--webhook-secret",
            SECRET,
            "--splunk-hec-url",
            &format!("{}/services/collector/event", self.url),
            "--splunk-token",
            HEC_TOKEN,
            "--datadog-api-key",
            DD_KEY,
            "--datadog-url",
            &format!("{}/api/v2/logs", self.url),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// Fast delivery settings for tests.
pub(crate) const FAST: &[&str] = &[
    "--outbox-poll-ms",
    "50",
    "--outbox-retry-base-ms",
    "50",
    "--outbox-retry-max-ms",
    "300",
];

/// How long the receiver takes to answer a delivery while a test checks that calls do not wait
/// on deliveries.
const DOWN_DELAY: Duration = Duration::from_secs(6);

/// The longest a denied call may take meanwhile: generous for a loaded machine's synced
/// commits, and well short of [`DOWN_DELAY`], so a call that waited on a delivery exceeds it.
const CALL_CEILING: Duration = Duration::from_secs(3);

async fn start(backend: Backend, flags: &[String]) -> TestGateway {
    let mut all: Vec<&str> = FAST.to_vec();
    all.extend(flags.iter().map(String::as_str));
    gateway::start(backend, None, &all).await
}

async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !done().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A call the token's scope refuses: a deny event (capability check).
async fn denied_call(url: &str, token: &str, n: usize) -> Duration {
    let started = Instant::now();
    let (status, v) = http::post_json(
        &format!("{url}/v1/mcp"),
        Some(token),
        &json!({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                "params": {"name": "delete_everything", "arguments": {"n": n}}}),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(status, 200);
    assert!(v.get("error").is_some(), "denied: {v}");
    took
}

async fn integrations(url: &str, token: &str) -> Vec<Value> {
    let (status, v) = http::get_json(&format!("{url}/v1/admin/integrations"), token).await;
    assert_eq!(status, 200, "{v}");
    v.as_array().expect("array").clone()
}

fn find<'a>(list: &'a [Value], id: &str) -> &'a Value {
    list.iter()
        .find(|d| d["id"] == id)
        .unwrap_or_else(|| panic!("no {id} in {list:?}"))
}

/// Webhook records deduplicated by `webhook-id` (the idempotency key): asserts a repeated id
/// carries the same body, and returns the first arrivals in order.
pub(crate) fn distinct_webhooks(records: &Value) -> Vec<Value> {
    let mut seen: BTreeMap<String, Value> = BTreeMap::new();
    let mut out = Vec::new();
    for r in records["webhook"].as_array().expect("webhooks") {
        let id = r["id"].as_str().expect("id").to_owned();
        match seen.get(&id) {
            Some(body) => assert_eq!(
                body, &r["body"],
                "a repeated webhook-id carries the same event"
            ),
            None => {
                seen.insert(id, r["body"].clone());
                out.push(r["body"].clone());
            }
        }
    }
    out
}

/// Asserts `seqs` (first arrivals) are strictly increasing.
fn assert_in_order(what: &str, seqs: &[i64]) {
    for w in seqs.windows(2) {
        assert!(w[0] < w[1], "{what} out of order: {seqs:?}");
    }
}

/// Distinct values of `key_of` in first-arrival order.
fn first_arrivals(items: &[Value], key_of: impl Fn(&Value) -> Option<i64>) -> Vec<i64> {
    let mut seen = HashSet::new();
    items
        .iter()
        .filter_map(key_of)
        .filter(|k| seen.insert(*k))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destinations_down_then_up_get_every_event_in_order_and_calls_keep_their_latency() {
    let rx = Receiver::start();
    let gw = start(Backend::Sqlite, &rx.env_flags()).await;
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    // Up: a baseline.
    let mut up = Vec::new();
    for n in 0..5 {
        up.push(denied_call(&gw.url, &token, n).await);
    }
    // Down, and slow to say so: every delivery waits DOWN_DELAY before its 503, so a call that
    // waited on a delivery would take that long, far beyond the ceiling below, which leaves a
    // loaded machine's slow commits room without letting such a regression through.
    rx.control(json!({"down": true, "status": 503, "retry_after": "0",
                      "delay_ms": DOWN_DELAY.as_millis()}))
        .await;
    let mut down = Vec::new();
    for n in 5..40 {
        down.push(denied_call(&gw.url, &token, n).await);
    }
    let worst_down = *down.iter().max().expect("calls");
    assert!(
        worst_down < CALL_CEILING,
        "a call took {worst_down:?} while the destinations were down (up: {up:?})"
    );
    wait_for("the outage to show", Duration::from_secs(30), || async {
        let list = integrations(&gw.url, ADMIN_TOKEN).await;
        let hook = find(&list, "env:webhook");
        hook["failing"] == true && hook["backlog"].as_i64() > Some(0)
    })
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    let hook = find(&list, "env:webhook");
    assert!(
        hook["last_error"].as_str().unwrap_or("").contains("503"),
        "{hook}"
    );
    assert!(hook["oldest_undelivered_ts"].is_string(), "{hook}");
    let text = serde_json::to_string(&list).expect("json");
    assert!(!text.contains(HEC_TOKEN) && !text.contains(DD_KEY) && !text.contains("MfKQ9r8"));

    rx.control(json!({"down": false, "delay_ms": 0})).await;
    wait_for("the backlog to drain", Duration::from_secs(30), || async {
        let list = integrations(&gw.url, ADMIN_TOKEN).await;
        ["env:webhook", "env:splunk", "env:datadog"]
            .iter()
            .all(|id| {
                let d = find(&list, id);
                d["backlog"] == 0 && d["failing"] == false && d["last_success_ts"].is_string()
            })
    })
    .await;
    // What the chain recorded (repeated denials of one token may be aggregated into one event).
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    let recorded = audit["items"].as_array().expect("items").clone();
    let mut deny_seqs: Vec<i64> = recorded
        .iter()
        .filter(|e| e["event"] == "intentgate.tool_call" && e["decision"] == "block")
        .filter_map(|e| e["seq"].as_i64())
        .collect();
    deny_seqs.sort();
    assert!(
        deny_seqs.len() >= 20,
        "{} denials recorded",
        deny_seqs.len()
    );
    let records = rx.get("records").await;
    assert_eq!(
        rx.get("rejected").await,
        json!([]),
        "every request was well-formed and signed"
    );

    // Webhook: the original's body, deny events only, in chain order.
    let hooks = distinct_webhooks(&records);
    for h in &hooks {
        assert_eq!(h["event"], "intentgate.deny");
        assert_eq!(h["schema_version"], "1");
        assert_eq!(h["tenant"], "acme");
        assert_eq!(h["decision"], "block");
        assert_eq!(h["severity"], "critical", "a capability block is critical");
        assert_eq!(h["tool"], "delete_everything");
        assert_eq!(h["agent_id"], "bot");
        assert!(h["capability_token_id"].is_string() && h["timestamp"].is_string());
    }
    let seqs = first_arrivals(&hooks, |h| h["seq"].as_i64());
    assert_eq!(
        seqs, deny_seqs,
        "every recorded denial, once, in chain order"
    );

    // Splunk HEC and Datadog: every acme event (the mint too), in chain order, no gap.
    let splunk = records["splunk"].as_array().expect("splunk");
    for e in splunk {
        assert!(e["time"].is_number(), "{e}");
        assert_eq!(e["sourcetype"], "intentgate:audit");
    }
    let acme = |items: &Vec<Value>, at: &str| -> Vec<i64> {
        let of_acme: Vec<Value> = items
            .iter()
            .filter(|i| i[at]["tenant"] == "acme")
            .cloned()
            .collect();
        first_arrivals(&of_acme, |i| i[at]["seq"].as_i64())
    };
    let dd = records["datadog"].as_array().expect("datadog");
    for l in dd {
        assert!(
            l["message"].is_string() && l["service"] == "intentgate-gateway",
            "{l}"
        );
    }
    for (name, seqs) in [
        ("splunk", acme(splunk, "event")),
        ("datadog", acme(dd, "audit")),
    ] {
        assert_in_order(name, &seqs);
        let max = *seqs.last().expect("events");
        assert_eq!(
            seqs,
            (1..=max).collect::<Vec<_>>(),
            "{name}: every event, no gap"
        );
        let newest = recorded
            .iter()
            .filter_map(|e| e["seq"].as_i64())
            .max()
            .unwrap_or(0);
        assert!(max >= newest, "{name}: up to the newest recorded event");
    }

    gw.shutdown().await;
}

/// Records of `kind` (`slack`, `teams`) under `name`.
fn named<'a>(records: &'a Value, kind: &str, name: &str) -> &'a [Value] {
    records[kind][name].as_array().map_or(&[], Vec::as_slice)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deny_and_an_approval_decision_reach_the_webhook_slack_teams_and_pagerduty() {
    let rx = Receiver::start();
    let flags: Vec<String> = [
        "--webhook-url",
        &format!("{}/webhook", rx.url),
        "--webhook-secret",
        SECRET,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gw = start(Backend::Sqlite, &flags).await;
    for (kind, url, secret) in [
        ("slack", format!("{}/slack/ops", rx.url), None),
        ("teams", format!("{}/teams/ops", rx.url), None),
        (
            "pagerduty",
            format!("{}/pagerduty/v2/enqueue", rx.url),
            Some(PD_KEY),
        ),
    ] {
        let (status, v) = put_destination(
            &gw,
            ADMIN_TOKEN,
            json!({"global": true, "name": kind, "kind": kind, "url": url, "secret": secret}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    // A deny (the token's scope refuses the tool)…
    let (reader, _) = gw
        .mint(json!({"subject": "bot", "tools": ["read_*"]}))
        .await;
    denied_call(&gw.url, &reader, 1).await;
    // …and an escalation (the demo policy sends delete_records to a person), decided.
    let (deleter, _) = gw
        .mint(json!({"subject": "cleaner", "tools": ["delete_records"]}))
        .await;
    let (status, v) = http::post_json(
        &format!("{}/v1/mcp", gw.url),
        Some(&deleter),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
                "params": {"name": "delete_records", "arguments": {"table": "users"}}}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["error"]["code"], -32019, "escalated: {v}");
    let pending = v["error"]["data"]["pending_id"]
        .as_str()
        .expect("pending_id")
        .to_owned();
    let (status, d) = http::post_json(
        &format!("{}/v1/admin/approvals/{pending}/decide", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"decision": "approve", "decided_by": "ops@example.com"}),
    )
    .await;
    assert_eq!(status, 200, "{d}");

    let expected = [
        "intentgate.deny",
        "intentgate.escalate",
        "intentgate.approval_decided",
    ];
    wait_for("every channel", Duration::from_secs(20), || async {
        let r = rx.get("records").await;
        distinct_webhooks(&r).len() >= 3
            && named(&r, "slack", "ops").len() >= 3
            && named(&r, "teams", "ops").len() >= 3
            && r["pagerduty"].as_array().is_some_and(|a| a.len() >= 3)
    })
    .await;
    let records = rx.get("records").await;
    assert_eq!(
        rx.get("rejected").await,
        json!([]),
        "every request met its vendor's format"
    );

    // The webhook: verified by standardwebhooks (else rejected), the original's body.
    let hooks = distinct_webhooks(&records);
    let events: Vec<&str> = hooks.iter().filter_map(|h| h["event"].as_str()).collect();
    assert_eq!(events, expected, "{hooks:?}");
    assert_eq!(hooks[0]["tool"], "delete_everything");
    assert_eq!(hooks[0]["decision"], "block");
    assert_eq!(hooks[1]["tool"], "delete_records");
    assert_eq!(hooks[1]["decision"], "escalate");
    assert_eq!(hooks[1]["pending_id"], pending.as_str());
    let decided = &hooks[2];
    assert_eq!(decided["pending_id"], pending.as_str(), "{decided}");
    assert_eq!(decided["severity"], "info");
    assert_eq!(decided["audit"]["decided_by"], "ops@example.com");
    assert_eq!(decided["audit"]["event"], "intentgate.approval.decided");

    // Slack: one Block Kit message per event, titled by its type.
    let slack = named(&records, "slack", "ops");
    assert_eq!(
        slack.len(),
        3,
        "one message per event, none twice: {slack:?}"
    );
    for (msg, want) in slack.iter().zip(["deny", "escalate", "approval decided"]) {
        let header = msg["blocks"][0]["text"]["text"].as_str().unwrap_or("");
        assert!(header.contains(want), "{header:?} names {want}");
        assert!(msg["text"].as_str().is_some_and(|t| !t.is_empty()));
    }
    assert!(slack[2].to_string().contains(&pending));

    // Teams: an Adaptive Card per event, its title and facts in text runs (never Markdown).
    let teams = named(&records, "teams", "ops");
    assert_eq!(teams.len(), 3, "{teams:?}");
    let runs = |block: &serde_json::Value| -> Vec<String> {
        block["inlines"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["text"].as_str().map(str::to_owned))
            .collect()
    };
    for (msg, want) in teams.iter().zip(["deny", "escalate", "approval decided"]) {
        let card = &msg["attachments"][0]["content"];
        let body = card["body"].as_array().expect("body");
        let title = runs(&body[0]).concat();
        assert!(title.contains(want), "{title:?} names {want}");
        assert!(
            body.iter().any(|b| runs(b) == ["Tenant: ", "default"]),
            "{body:?}"
        );
    }

    // PagerDuty: a trigger per event, severities from the classification, stable dedup keys.
    let pd = records["pagerduty"].as_array().expect("pagerduty");
    assert_eq!(pd.len(), 3, "{pd:?}");
    let severities: Vec<&str> = pd
        .iter()
        .filter_map(|e| e["payload"]["severity"].as_str())
        .collect();
    assert_eq!(severities, ["critical", "warning", "info"]);
    let classes: Vec<&str> = pd
        .iter()
        .filter_map(|e| e["payload"]["class"].as_str())
        .collect();
    assert_eq!(classes, expected);
    let keys: HashSet<&str> = pd.iter().filter_map(|e| e["dedup_key"].as_str()).collect();
    assert_eq!(keys.len(), 3, "one dedup key per event");
    for e in pd {
        assert_eq!(e["routing_key"], PD_KEY);
        assert_eq!(e["event_action"], "trigger");
        assert_eq!(e["payload"]["group"], "default");
    }
    assert_eq!(
        pd[2]["payload"]["custom_details"]["pending_id"],
        pending.as_str()
    );
    gw.shutdown().await;
}

/// Uploads a formatter component (`world`: `formatter`, or its earlier name `siem-formatter`).
async fn upload_formatter(gw: &TestGateway, tenant: &str, path: &str, world: &str) -> String {
    let wasm = std::fs::read(path).expect("formatter artifact");
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, body) = http::send(
        "POST",
        &format!(
            "{}/v1/admin/plugins?name=formatter&world={world}&tenant={tenant}",
            gw.url
        ),
        &[
            ("authorization", &auth),
            ("content-type", "application/wasm"),
        ],
        wasm,
    )
    .await;
    let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    assert_eq!(status, 201, "{v}");
    v["digest"].as_str().expect("digest").to_owned()
}

async fn put_destination(gw: &TestGateway, token: &str, body: Value) -> (u16, Value) {
    http::post_json(
        &format!("{}/v1/admin/integrations/destinations", gw.url),
        Some(token),
        &body,
    )
    .await
}

/// By default a destination added over the admin API reaches only public addresses: the
/// gateway's loopback, the cloud's metadata endpoint and private networks are refused when it
/// is saved (a host name is checked again at every connection, `outbox/address.rs`), for a
/// tenant admin and the superadmin alike, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_destinations_reach_only_public_addresses_by_default() {
    let flags: Vec<String> = [
        "--tenant-admins",
        &format!("globex:{GLOBEX_ADMIN}"),
        "--outbox-allow-private-networks=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gw = start(Backend::Sqlite, &flags).await;
    for (token, url) in [
        (GLOBEX_ADMIN, "http://169.254.169.254/latest/meta-data/"),
        (GLOBEX_ADMIN, "http://127.0.0.1:9/hook"),
        (GLOBEX_ADMIN, "http://[::1]:9/hook"),
        (ADMIN_TOKEN, "http://localhost:9/hook"),
        (ADMIN_TOKEN, "https://10.0.0.7/hook"),
    ] {
        let (status, v) = put_destination(
            &gw,
            token,
            json!({"tenant": "globex", "name": "inner", "kind": "ndjson", "url": url}),
        )
        .await;
        assert_eq!(status, 400, "{url}: {v}");
        assert!(
            v.to_string()
                .contains("INTENTGATE_OUTBOX_ALLOW_PRIVATE_NETWORKS"),
            "the refusal names the switch: {v}"
        );
    }
    // A Sentinel destination's token endpoint is held to the same bound.
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "globex", "name": "sentinel", "kind": "sentinel",
               "url": "https://dce.example.com/", "secret": "s",
               "settings": {"dcr_immutable_id": "dcr-1", "stream": "Custom-X_CL",
                            "client_id": "app", "token_url": "http://127.0.0.1:9/token"}}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("127.0.0.1"), "{v}");
    // A public name is accepted (it is resolved, and checked, when delivered to).
    let (status, v) = put_destination(
        &gw,
        GLOBEX_ADMIN,
        json!({"tenant": "globex", "name": "public", "kind": "ndjson",
               "url": "https://hooks.example.com/in"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (_, dests) = http::get_json(
        &format!("{}/v1/admin/integrations/destinations", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    let ids: Vec<&str> = dests["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| d["id"].as_str())
        .collect();
    assert_eq!(ids, ["globex/public"], "nothing refused was stored");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_formatters_fail_only_their_destinations_and_admin_is_scoped() {
    let rx = Receiver::start();
    let flags: Vec<String> = ["--tenant-admins", &format!("globex:{GLOBEX_ADMIN}")]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let gw = start(Backend::Sqlite, &flags).await;
    let digest = upload_formatter(
        &gw,
        "acme",
        intentgate::plugins::artifacts::TEST_HOSTILE_FORMATTER_PATH,
        "formatter",
    )
    .await;
    // A component built for the world's earlier name (`siem-formatter`) still loads and formats.
    let legacy = upload_formatter(
        &gw,
        "acme",
        intentgate::plugins::artifacts::TEST_LEGACY_FORMATTER_PATH,
        "siem-formatter",
    )
    .await;
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "legacy", "kind": "ndjson",
               "url": format!("{}/ndjson/legacy", rx.url), "formatter": legacy}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    // A component a destination formats with cannot be deleted from under it.
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, body) = http::send(
        "DELETE",
        &format!("{}/v1/admin/plugins/{legacy}?tenant=acme", gw.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 409, "{text}");
    assert!(
        text.contains("in use by the destination") && text.contains("legacy"),
        "names the destination: {text}"
    );
    for mode in ["trap", "loop", "garbage"] {
        let (status, v) = put_destination(
            &gw,
            ADMIN_TOKEN,
            json!({"tenant": "acme", "name": mode, "kind": "ndjson",
                   "url": format!("{}/ndjson/{mode}", rx.url), "events": ["all"],
                   "formatter": digest, "settings": {"mode": mode}}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "good", "kind": "ndjson",
               "url": format!("{}/ndjson/good", rx.url), "secret": "sekrit-value-42"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        !v.to_string().contains("sekrit"),
        "the secret is write-only: {v}"
    );
    assert_eq!(v["secret_set"], true);
    // Sealed at rest: the store's files (database and WAL) never hold the secret in clear.
    let mut at_rest = Vec::new();
    for name in ["intentgate.sqlite3", "intentgate.sqlite3-wal"] {
        at_rest.extend(std::fs::read(gw.data_dir.path().join(name)).unwrap_or_default());
    }
    let text = String::from_utf8_lossy(&at_rest);
    assert!(text.contains("igsec1:"), "a sealed secret is stored");
    assert!(
        !text.contains("sekrit-value-42"),
        "the secret is not stored in clear"
    );

    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    // The receiver answers only after DOWN_DELAY meanwhile: a call that waited on a delivery
    // (or its formatting) would take that long, far beyond the ceiling.
    rx.control(json!({"delay_ms": DOWN_DELAY.as_millis()}))
        .await;
    let mut worst = Duration::ZERO;
    for n in 0..10 {
        worst = worst.max(denied_call(&gw.url, &token, n).await);
    }
    assert!(worst < CALL_CEILING, "a call took {worst:?}");
    rx.control(json!({"delay_ms": 0})).await;
    wait_for(
        "the healthy destinations",
        Duration::from_secs(20),
        || async {
            let r = rx.get("records").await;
            ["good", "legacy"].iter().all(|name| {
                r["ndjson"][name].as_array().is_some_and(|l| {
                    l.iter()
                        .filter(|e| e["event"] == "intentgate.tool_call")
                        .count()
                        >= 10
                })
            })
        },
    )
    .await;
    wait_for(
        "the hostile destinations to fail",
        Duration::from_secs(20),
        || async {
            let list = integrations(&gw.url, ADMIN_TOKEN).await;
            ["trap", "loop", "garbage"].iter().all(|m| {
                let d = find(&list, &format!("acme/{m}"));
                d["failing"] == true && d["backlog"].as_i64() > Some(0)
            })
        },
    )
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    for (mode, says) in [
        ("trap", "trap"),
        ("loop", "deadline"),
        ("garbage", "content type"),
    ] {
        let err = find(&list, &format!("acme/{mode}"))["last_error"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(err.contains(says), "{mode}: {err}");
    }
    let records = rx.get("records").await;
    for mode in ["trap", "loop", "garbage"] {
        assert!(
            records["ndjson"][mode].is_null(),
            "{mode} delivered nothing"
        );
    }
    assert_eq!(find(&list, "acme/good")["failing"], false);
    assert_eq!(find(&list, "acme/legacy")["failing"], false);
    // The gateway still serves.
    denied_call(&gw.url, &token, 99).await;

    // Secrets never come back; a replacement without a secret keeps it.
    let (_, dests) = http::get_json(
        &format!("{}/v1/admin/integrations/destinations", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert!(!dests.to_string().contains("sekrit"));
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "good", "kind": "ndjson",
               "url": format!("{}/ndjson/good", rx.url)}),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["secret_set"], true, "the stored secret was kept");
    // ... but never sent somewhere else: a replacement that moves the URL (or changes the
    // kind, formatter or settings) without the secret is refused, and the stored one stays.
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "good", "kind": "ndjson",
               "url": format!("{}/ndjson/elsewhere", rx.url)}),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v.to_string().contains("send the secret again"), "{v}");
    let (_, dests) = http::get_json(
        &format!("{}/v1/admin/integrations/destinations", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    let dests = dests["items"].as_array().cloned().unwrap_or_default();
    let good = find(&dests, "acme/good");
    // A webhook-like URL may be its own credential: only its scheme and host are shown.
    assert!(
        good["endpoint"]
            .as_str()
            .is_some_and(|e| e.ends_with("/…") && !e.contains("ndjson")),
        "{good}"
    );
    let live = gw.gw.outbox.live();
    let kept = live.by_id.get("acme/good").expect("acme/good");
    assert_eq!(
        kept.dest.url.path(),
        "/ndjson/good",
        "the refused replacement changed nothing"
    );

    // Tenant scoping: globex sees none of acme's destinations, cannot add a global one, and
    // cannot delete acme's.
    let list = integrations(&gw.url, GLOBEX_ADMIN).await;
    assert!(
        list.iter()
            .all(|d| !d["id"].as_str().unwrap_or("").starts_with("acme/")),
        "{list:?}"
    );
    let (status, _) = put_destination(
        &gw,
        GLOBEX_ADMIN,
        json!({"global": true, "name": "x", "kind": "ndjson", "url": "http://127.0.0.1:9/x"}),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = put_destination(
        &gw,
        GLOBEX_ADMIN,
        json!({"tenant": "acme", "name": "x", "kind": "ndjson", "url": "http://127.0.0.1:9/x"}),
    )
    .await;
    assert_eq!(status, 403);
    let auth = format!("Bearer {GLOBEX_ADMIN}");
    let (status, _, _) = http::send(
        "DELETE",
        &format!("{}/v1/admin/integrations/destinations/good", gw.url),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 404);
    // Every change was audited.
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    let puts = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter(|e| e["event"] == "admin/destination.put")
        .count();
    assert_eq!(puts, 6);
    gw.shutdown().await;
}

/// A denied call (a tool outside the token's scope) whose one argument is named `key`.
async fn denied_with_key(url: &str, token: &str, key: String) {
    let (status, v) = http::post_json(
        &format!("{url}/v1/mcp"),
        Some(token),
        &json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "delete_everything", "arguments": {key: 1}}}),
    )
    .await;
    assert_eq!(status, 200);
    assert!(v.get("error").is_some(), "denied: {v}");
}

/// The argument names of the events a vendor received (`at`: where the event sits in a record).
fn keys_at(records: &Value, vendor: &str, at: &str) -> Vec<String> {
    records[vendor]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r[at]["arg_keys"].as_array())
        .flatten()
        .filter_map(|k| k.as_str().map(str::to_owned))
        .collect()
}

/// An event whose payload the destination refuses (400) does not hold its lane until the
/// dead-letter age: its batch goes in halves to find it, and once refused three times in a
/// row it is set aside; the events behind it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_a_destination_refuses_is_set_aside_and_the_lane_goes_on() {
    let rx = Receiver::start();
    let gw = start(Backend::Sqlite, &rx.env_flags()).await;
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    rx.control(json!({"refuse": "poison_key"})).await;
    let call = |key: String| denied_with_key(&gw.url, &token, key);
    call("poison_key".into()).await;
    for n in 0..3 {
        call(format!("after_{n}")).await;
    }
    let want: Vec<String> = (0..3).map(|n| format!("after_{n}")).collect();
    wait_for(
        "the events behind the refused one",
        Duration::from_secs(30),
        || async {
            let keys = keys_at(&rx.get("records").await, "splunk", "event");
            want.iter().all(|k| keys.contains(k))
        },
    )
    .await;
    let (status, dead) = http::get_json(
        &format!(
            "{}/v1/admin/integrations/dead-letters?destination=env:splunk",
            gw.url
        ),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200);
    let items = dead["items"].as_array().expect("items");
    assert_eq!(items.len(), 1, "only the refused event: {dead}");
    let error = items[0]["last_error"].as_str().unwrap_or("");
    assert!(
        error.contains("400") && error.contains("refused 3 times"),
        "{error}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_kept_listed_and_redriven() {
    let rx = Receiver::start();
    rx.control(json!({"down": true, "status": 500})).await;
    let mut flags = rx.env_flags();
    flags.extend(["--outbox-dead-after-secs".to_string(), "1".to_string()]);
    let gw = start(Backend::Sqlite, &flags).await;
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    for n in 0..3 {
        denied_call(&gw.url, &token, n).await;
    }
    wait_for("dead letters", Duration::from_secs(20), || async {
        let list = integrations(&gw.url, ADMIN_TOKEN).await;
        find(&list, "env:webhook")["dead_letters"] == 3
    })
    .await;
    let (status, dead) = http::get_json(
        &format!(
            "{}/v1/admin/integrations/dead-letters?destination=env:webhook",
            gw.url
        ),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200);
    let items = dead["items"].as_array().expect("items");
    assert_eq!(items.len(), 3, "{dead}");
    assert!(
        items.iter().all(
            |d| d["tenant"] == "acme" && d["last_error"].as_str().unwrap_or("").contains("500")
        )
    );
    assert!(distinct_webhooks(&rx.get("records").await).is_empty());

    rx.control(json!({"down": false})).await;
    let (status, v) = http::post_json(
        &format!("{}/v1/admin/integrations/redrive", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"destination": "env:webhook", "tenant": "acme"}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["redriven"], 3);
    wait_for(
        "the re-driven deliveries",
        Duration::from_secs(20),
        || async { distinct_webhooks(&rx.get("records").await).len() == 3 },
    )
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    assert_eq!(find(&list, "env:webhook")["dead_letters"], 0);
    gw.shutdown().await;
}

/// Adds the global Slack destination `ops` (`*/ops`), posting to the receiver.
async fn global_slack(gw: &TestGateway, rx: &Receiver) {
    let (status, v) = put_destination(
        gw,
        ADMIN_TOKEN,
        json!({"global": true, "name": "ops", "kind": "slack",
               "url": format!("{}/slack/ops", rx.url)}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
}

/// Events past the dead-letter age at a destination that is failing are set aside together,
/// and the lane keeps waiting out the destination's `Retry-After`: a Slack destination (one
/// event a request) down for longer than the age is not sent one request after another, one
/// per aged event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aged_events_are_set_aside_together_and_the_lane_keeps_its_back_off() {
    let rx = Receiver::start();
    rx.control(json!({"down": true, "status": 503, "retry_after": "2"}))
        .await;
    let flags = ["--outbox-dead-after-secs", "1"].map(str::to_owned);
    let gw = start(Backend::Sqlite, &flags).await;
    global_slack(&gw, &rx).await;
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    for n in 0..20 {
        denied_call(&gw.url, &token, n).await;
    }
    wait_for(
        "the aged events set aside",
        Duration::from_secs(20),
        || async {
            let list = integrations(&gw.url, ADMIN_TOKEN).await;
            find(&list, "*/ops")["dead_letters"] == 20
        },
    )
    .await;
    // Two more seconds: at most the back-off's next attempt, not a request per event.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hits = rx.get("down_hits").await["/slack/ops"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        (1..=4).contains(&hits),
        "{hits} requests to a destination answering 503 with Retry-After: 2"
    );
    gw.shutdown().await;
}

/// A batch delivered whose delivery the store then refuses to record is not sent again every
/// few milliseconds while the store refuses: the lane waits (1 s, then 2 s, …).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lane_whose_bookkeeping_fails_waits_before_it_is_sent_again() {
    let rx = Receiver::start();
    let gw = start(Backend::Sqlite, &[]).await;
    global_slack(&gw, &rx).await;
    // What the store refuses: deleting a delivered row (as a full disk or a lock would).
    let intentgate::store::Db::Sqlite(pool) = gw.gw.outbox.db() else {
        unreachable!("a SQLite gateway")
    };
    sqlx::query(
        "CREATE TRIGGER keep_outbox BEFORE DELETE ON outbox \
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END",
    )
    .execute(pool)
    .await
    .expect("trigger");
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    denied_call(&gw.url, &token, 1).await;
    wait_for("the first delivery", Duration::from_secs(20), || async {
        rx.get("records").await["slack"]["ops"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let sent = rx.get("records").await["slack"]["ops"]
        .as_array()
        .map_or(0, Vec::len);
    assert!(
        (1..=3).contains(&sent),
        "{sent} deliveries of one event in 2.5 s while its record was refused"
    );
    gw.shutdown().await;
}

/// An event too large for its destinations (an agent's call with a 300 KB argument name,
/// against receivers that refuse bodies over 200 KB with 413, as Splunk's HEC does over its
/// `max_content_length`) is set aside as a dead letter at once, and the events behind it are
/// delivered; before, the lane retried that batch until the dead-letter age (72 hours).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_too_large_for_its_destination_does_not_hold_its_lane() {
    let rx = Receiver::start();
    let gw = start(Backend::Sqlite, &rx.env_flags()).await;
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    rx.control(json!({"max_bytes": 200_000})).await;
    let call = |key: String| denied_with_key(&gw.url, &token, key);
    call("k".repeat(300_000)).await;
    for n in 0..3 {
        call(format!("after_{n}")).await;
    }
    let want: Vec<String> = (0..3).map(|n| format!("after_{n}")).collect();
    wait_for(
        "the events behind the large one",
        Duration::from_secs(30),
        || async {
            let records = rx.get("records").await;
            let (splunk, dd) = (
                keys_at(&records, "splunk", "event"),
                keys_at(&records, "datadog", "audit"),
            );
            want.iter().all(|k| splunk.contains(k) && dd.contains(k))
        },
    )
    .await;
    for id in ["env:splunk", "env:datadog"] {
        let (status, dead) = http::get_json(
            &format!(
                "{}/v1/admin/integrations/dead-letters?destination={id}",
                gw.url
            ),
            ADMIN_TOKEN,
        )
        .await;
        assert_eq!(status, 200);
        let items = dead["items"].as_array().expect("items");
        assert_eq!(items.len(), 1, "{id}: only the large event: {dead}");
        let error = items[0]["last_error"].as_str().unwrap_or("");
        assert!(
            error.contains("413") && error.contains("too large"),
            "{error}"
        );
    }
    // Five events of 60 KB each, gathered while the receivers were down: their batch is too
    // large together, and goes in halves; none of them is set aside.
    rx.control(json!({"down": true, "status": 503})).await;
    let mid: Vec<String> = (0..5)
        .map(|n| format!("mid_{n}_{}", "m".repeat(60_000)))
        .collect();
    for key in &mid {
        call(key.clone()).await;
    }
    wait_for("the backlog of five", Duration::from_secs(30), || async {
        let list = integrations(&gw.url, ADMIN_TOKEN).await;
        find(&list, "env:splunk")["backlog"].as_i64() >= Some(5)
    })
    .await;
    rx.control(json!({"down": false})).await;
    wait_for("the five in halves", Duration::from_secs(30), || async {
        let records = rx.get("records").await;
        let (splunk, dd) = (
            keys_at(&records, "splunk", "event"),
            keys_at(&records, "datadog", "audit"),
        );
        mid.iter().all(|k| splunk.contains(k) && dd.contains(k))
    })
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    for id in ["env:splunk", "env:datadog"] {
        assert_eq!(find(&list, id)["dead_letters"], 1, "{id}");
    }
    let records = rx.get("records").await;
    assert!(
        !keys_at(&records, "splunk", "event")
            .iter()
            .any(|k| k.len() > 100_000),
        "the large event was never accepted"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// kill -9 during delivery

struct Binary(Child);

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_binary(data: &std::path::Path, port: u16, rx: &Receiver) -> Binary {
    let policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../policies/examples/token_scope.rego"
    );
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_intentgate"));
    cmd.args(["serve", "--addr", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", &data.display().to_string()])
        .args(["--admin-token", ADMIN_TOKEN, "--master-key", MASTER_KEY])
        .args(["--policy-file", policy])
        .args(FAST)
        .args(rx.env_flags())
        .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("INTENTGATE_") {
            cmd.env_remove(k);
        }
    }
    Binary(cmd.spawn().expect("the gateway binary starts"))
}

async fn wait_healthy(url: &str) {
    wait_for("the gateway binary", Duration::from_secs(30), || async {
        let client: hyper_util::client::legacy::Client<_, http_body_util::Full<bytes::Bytes>> =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        let Ok(uri) = format!("{url}/healthz").parse::<hyper::Uri>() else {
            return false;
        };
        client.get(uri).await.is_ok_and(|r| r.status() == 200)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_during_delivery_loses_nothing_recorded() {
    let rx = Receiver::start();
    // Slow deliveries, so the kill lands in the middle of them.
    rx.control(json!({"delay_ms": 150})).await;
    let data = tempfile::tempdir().expect("tempdir");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = spawn_binary(data.path(), port, &rx);
    wait_healthy(&url).await;
    let (status, v) = http::post_json(
        &format!("{url}/v1/admin/mint"),
        Some(ADMIN_TOKEN),
        &json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let token = v["token"].as_str().expect("token").to_owned();
    // Each answered denial is a recorded event (audit before answer).
    for n in 0..30 {
        denied_call(&url, &token, n).await;
    }
    wait_for(
        "delivery to be under way",
        Duration::from_secs(20),
        || async { distinct_webhooks(&rx.get("records").await).len() >= 2 },
    )
    .await;
    first.0.kill().expect("SIGKILL");
    let _ = first.0.wait();
    let before = distinct_webhooks(&rx.get("records").await).len();
    assert!(
        before < 30,
        "the kill landed before the end of delivery ({before})"
    );

    rx.control(json!({"delay_ms": 0})).await;
    let _second = spawn_binary(data.path(), port, &rx);
    wait_healthy(&url).await;
    wait_for(
        "every recorded deny after the restart",
        Duration::from_secs(30),
        || async { distinct_webhooks(&rx.get("records").await).len() >= 30 },
    )
    .await;
    let hooks = distinct_webhooks(&rx.get("records").await);
    assert_eq!(hooks.len(), 30);
    let seqs = first_arrivals(&hooks, |h| h["seq"].as_i64());
    assert_eq!(seqs.len(), 30, "30 distinct events");
    assert_in_order("webhook across the kill", &seqs);
    assert_eq!(rx.get("rejected").await, json!([]));
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL: replicas share the work

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_replicas_share_lanes_without_delivering_twice_at_once() {
    let url = intentgate::testkit::PgServer::shared()
        .expect("postgres server")
        .fresh_database()
        .expect("fresh database");
    let rx = Receiver::start();
    rx.control(json!({"delay_ms": 20})).await;
    let a = start(Backend::Postgres(url.clone()), &rx.env_flags()).await;
    let b = start(Backend::Postgres(url), &rx.env_flags()).await;
    let mut tokens = Vec::new();
    for (i, tenant) in ["acme", "globex", "initech"].iter().enumerate() {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (t, _) = gw
            .mint(json!({"subject": "bot", "tenant": tenant, "tools": ["read_*"]}))
            .await;
        tokens.push((*tenant, t));
    }
    for n in 0..15 {
        for (i, (_, t)) in tokens.iter().enumerate() {
            let gw = if (n + i) % 2 == 0 { &a } else { &b };
            denied_call(&gw.url, t, n).await;
        }
    }
    wait_for(
        "every deny of every tenant",
        Duration::from_secs(30),
        || async { distinct_webhooks(&rx.get("records").await).len() >= 45 },
    )
    .await;
    let records = rx.get("records").await;
    let all = records["webhook"].as_array().expect("webhooks");
    let hooks = distinct_webhooks(&records);
    assert_eq!(hooks.len(), 45);
    // Without a kill, the lane lock means no batch is sent twice.
    assert_eq!(all.len(), 45, "no double delivery between replicas");
    for (tenant, _) in &tokens {
        let of: Vec<Value> = hooks
            .iter()
            .filter(|h| h["tenant"] == *tenant)
            .cloned()
            .collect();
        let seqs = first_arrivals(&of, |h| h["seq"].as_i64());
        assert_eq!(seqs.len(), 15, "{tenant}");
        assert_in_order(tenant, &seqs);
    }
    a.shutdown().await;
    b.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// S3: gzipped NDJSON objects, partitioned by hour, SigV4-signed, on a moto server

/// A child process killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Reads `PORT <n>` from a helper's first line.
fn port_line(child: &mut Child, what: &str) -> u16 {
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("helper port");
    line.trim()
        .strip_prefix("PORT ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| {
            panic!("{what} did not start: {line:?}; pip install -r tests/interop/requirements.txt")
        })
}

const S3_SINK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/interop/s3_sink.py");
const S3_KEY_ID: &str = "AKIDINTENTGATETEST01";
const S3_SECRET: &str = "s3-secret/with+chars0123456789abcdefghij";

/// moto in server mode on a free loopback port, and the SigV4-verifying proxy in front of it.
struct S3 {
    _moto: Killed,
    _proxy: Killed,
    moto: String,
    proxy: String,
}

impl S3 {
    async fn start() -> S3 {
        let port = free_port();
        let moto = Killed(
            Command::new(python())
                .args([
                    "-m",
                    "moto.server",
                    "-H",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto server (pip install -r tests/interop/requirements.txt)"),
        );
        let moto_url = format!("http://127.0.0.1:{port}");
        wait_for("the moto server", Duration::from_secs(30), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        let mut proxy = Command::new(python())
            .args([
                S3_SINK,
                "proxy",
                &moto_url,
                S3_KEY_ID,
                S3_SECRET,
                "us-east-1",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("s3_sink.py");
        let proxy_port = port_line(&mut proxy, "the S3 proxy");
        S3 {
            _moto: moto,
            _proxy: Killed(proxy),
            moto: moto_url,
            proxy: format!("http://127.0.0.1:{proxy_port}"),
        }
    }

    /// Every object of the bucket, read back with boto3.
    fn dump(&self) -> Vec<Value> {
        let out = Command::new(python())
            .args([S3_SINK, "dump", &self.moto, "audit"])
            .output()
            .expect("s3_sink.py dump");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("dump JSON")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_gets_gzipped_ndjson_partitioned_by_hour_and_sigv4_signed() {
    let s3 = S3::start().await;
    let flags: Vec<String> = [
        "--s3-url",
        &format!("{}/audit", s3.proxy),
        "--s3-access-key-id",
        S3_KEY_ID,
        "--s3-secret-access-key",
        S3_SECRET,
        "--s3-prefix",
        "intentgate/audit",
        "--outbox-batch",
        "4",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gw = start(Backend::Sqlite, &flags).await;
    // A second destination signing with the wrong secret: the proxy must refuse it.
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "wrong-key", "kind": "s3",
               "url": format!("{}/audit", s3.proxy), "secret": "not-the-secret",
               "settings": {"access_key_id": S3_KEY_ID, "prefix": "wrong"}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    for n in 0..10 {
        denied_call(&gw.url, &token, n).await;
    }
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    let mut recorded: Vec<i64> = audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .collect();
    recorded.sort();
    let newest = *recorded.last().expect("events");
    wait_for("the S3 objects", Duration::from_secs(30), || async {
        let list = integrations(&gw.url, ADMIN_TOKEN).await;
        let d = find(&list, "env:s3");
        let wrong = find(&list, "acme/wrong-key");
        d["backlog"] == 0
            && d["failing"] == false
            && d["last_success_ts"].is_string()
            && wrong["failing"] == true
    })
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    let wrong = find(&list, "acme/wrong-key")["last_error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        wrong.contains("403") && wrong.contains("SignatureDoesNotMatch"),
        "{wrong}"
    );
    assert!(
        !serde_json::to_string(&list)
            .expect("json")
            .contains(S3_SECRET)
    );

    let objects = s3.dump();
    assert!(
        objects.len() >= 3,
        "batches of 4 make several objects: {objects:?}"
    );
    let mut seqs = Vec::new();
    for o in &objects {
        let key = o["key"].as_str().expect("key");
        assert!(!key.starts_with("wrong"), "a refused signature wrote {key}");
        assert_eq!(o["gzip"], true, "{key} is gzip");
        assert_eq!(o["content_type"], "application/gzip", "{key}");
        let lines = o["lines"].as_array().expect("lines");
        assert!(!lines.is_empty() && lines.len() <= 4, "{key}: {lines:?}");
        // The key's partition is the hour of its events.
        let ts = lines[0]["ts"].as_str().expect("ts");
        let partition = format!(
            "intentgate/audit/year={}/month={}/day={}/hour={}/acme-",
            &ts[0..4],
            &ts[5..7],
            &ts[8..10],
            &ts[11..13]
        );
        assert!(key.starts_with(&partition), "{key} vs {partition}");
        assert!(key.ends_with(".ndjson.gz"), "{key}");
        for l in lines {
            assert_eq!(l["tenant"], "acme");
            assert_eq!(&l["ts"].as_str().unwrap_or("")[..13], &ts[..13]);
            seqs.push(l["seq"].as_i64().expect("seq"));
        }
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs, (1..=newest).collect::<Vec<_>>(), "every acme event");
    let (_, _, rejected) =
        http::send("GET", &format!("{}/_rejected", s3.proxy), &[], Vec::new()).await;
    let rejected: Vec<Value> = serde_json::from_slice(&rejected).expect("rejected");
    assert!(
        rejected.iter().all(|r| r["path"]
            .as_str()
            .unwrap_or("")
            .starts_with("/audit/wrong/")),
        "only the wrong key was refused: {rejected:?}"
    );
    assert!(!rejected.is_empty());
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Microsoft Sentinel: Logs Ingestion API with an Entra client-credentials token

const SENTINEL: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/interop/sentinel_receiver.py"
);
const DIRECTORY: &str = "00000000-1111-2222-3333-444444444444";
const CLIENT_ID: &str = "intentgate-app";
const CLIENT_SECRET: &str = "client~secret.0123456789";
const DCR: &str = "dcr-00000000000000000000000000000000";
const STREAM: &str = "Custom-IntentGateAudit_CL";

async fn sentinel_records(url: &str) -> Value {
    let (_, _, body) = http::send("GET", &format!("{url}/records"), &[], Vec::new()).await;
    serde_json::from_slice(&body).expect("records")
}

/// The distinct acme `seq`s Sentinel holds, sorted.
fn sentinel_acme_seqs(records: &Value) -> Vec<i64> {
    let mut seqs: Vec<i64> = records["records"]
        .as_array()
        .expect("records")
        .iter()
        .filter(|r| r["tenant"] == "acme")
        .filter_map(|r| r["seq"].as_i64())
        .collect();
    seqs.sort();
    seqs.dedup();
    seqs
}

async fn newest_acme_seq(gw: &TestGateway) -> i64 {
    let (_, audit) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    audit["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|e| e["seq"].as_i64())
        .max()
        .expect("events")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sentinel_gets_every_event_through_the_logs_ingestion_api_with_one_cached_token() {
    let mut child = Command::new(python())
        .args([SENTINEL, DIRECTORY, CLIENT_ID, CLIENT_SECRET, DCR, STREAM])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("sentinel_receiver.py");
    let port = port_line(&mut child, "the Sentinel receiver");
    let _rx = Killed(child);
    let rx = format!("http://127.0.0.1:{port}");
    let flags: Vec<String> = [
        "--sentinel-dce-url",
        &rx,
        "--sentinel-dcr-id",
        DCR,
        "--sentinel-stream",
        STREAM,
        "--sentinel-client-id",
        CLIENT_ID,
        "--sentinel-client-secret",
        CLIENT_SECRET,
        "--sentinel-token-url",
        &format!("{rx}/{DIRECTORY}/oauth2/v2.0/token"),
        "--outbox-batch",
        "5",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gw = start(Backend::Sqlite, &flags).await;
    // A destination with a wrong client secret fails with Entra's error, never the secret.
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "wrong-secret", "kind": "sentinel", "url": rx,
               "secret": "not-the-client-secret",
               "settings": {"dcr_immutable_id": DCR, "stream": STREAM, "client_id": CLIENT_ID,
                            "token_url": format!("{rx}/{DIRECTORY}/oauth2/v2.0/token")}}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let (token, _) = gw
        .mint(json!({"subject": "bot", "tenant": "acme", "tools": ["read_*"]}))
        .await;
    for n in 0..12 {
        denied_call(&gw.url, &token, n).await;
    }
    let newest = newest_acme_seq(&gw).await;
    wait_for(
        "every event in Sentinel",
        Duration::from_secs(30),
        || async {
            sentinel_acme_seqs(&sentinel_records(&rx).await) == (1..=newest).collect::<Vec<_>>()
        },
    )
    .await;
    let records = sentinel_records(&rx).await;
    let calls = records["calls"].as_i64().expect("calls");
    assert!(calls >= 3, "batches of 5 take several calls ({calls})");
    for r in records["records"].as_array().expect("records") {
        assert_eq!(r["TimeGenerated"], r["ts"], "{r}");
        if r["decision"] == "block" {
            assert_eq!(r["EventType"], "intentgate.deny");
            assert_eq!(r["Severity"], "critical");
        }
    }
    wait_for(
        "the wrong secret to fail",
        Duration::from_secs(20),
        || async {
            let list = integrations(&gw.url, ADMIN_TOKEN).await;
            find(&list, "acme/wrong-secret")["failing"] == true
        },
    )
    .await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    let err = find(&list, "acme/wrong-secret")["last_error"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        err.contains("401") && err.contains("invalid_client"),
        "{err}"
    );
    let text = serde_json::to_string(&list).expect("json");
    assert!(!text.contains(CLIENT_SECRET) && !text.contains("not-the-client-secret"));
    // One token for every call of the good destination (the wrong one asks on each retry).
    let (_, _, rejected) = http::send("GET", &format!("{rx}/rejected"), &[], Vec::new()).await;
    let rejected: Vec<Value> = serde_json::from_slice(&rejected).expect("rejected");
    assert!(
        rejected
            .iter()
            .all(|r| r["body"]["error"] == "invalid_client"),
        "only the wrong secret was refused: {rejected:?}"
    );
    assert_eq!(
        records["tokens_issued"], 1,
        "the token is cached until it expires"
    );

    // Revoked: the API answers 401, the token is dropped, a new one is fetched, nothing lost.
    let (status, _) =
        http::post_json(&format!("{rx}/control"), None, &json!({"revoke": true})).await;
    assert_eq!(status, 200);
    for n in 12..20 {
        denied_call(&gw.url, &token, n).await;
    }
    let newest = newest_acme_seq(&gw).await;
    wait_for(
        "every event after the revocation",
        Duration::from_secs(30),
        || async {
            sentinel_acme_seqs(&sentinel_records(&rx).await) == (1..=newest).collect::<Vec<_>>()
        },
    )
    .await;
    let (_, _, rejected) = http::send("GET", &format!("{rx}/rejected"), &[], Vec::new()).await;
    let rejected: Vec<Value> = serde_json::from_slice(&rejected).expect("rejected");
    assert!(
        rejected
            .iter()
            .any(|r| r["status"] == 401 && r["body"]["error"]["code"] == "InvalidToken"),
        "the revoked token was refused: {rejected:?}"
    );
    assert_eq!(
        sentinel_records(&rx).await["tokens_issued"],
        2,
        "one new token after the revocation"
    );
    gw.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The formatter world: `intentgate:plugin/formatter`, and its earlier name still loading

#[test]
fn formatters_of_the_world_and_of_its_earlier_name_load_and_format() {
    use intentgate::plugins::{World, artifacts, siem::Formatter};
    let runtime = crate::support::gateway::shared_runtime();
    assert_eq!(
        World::SiemFormatter.name(),
        "intentgate:plugin/formatter@0.2.0"
    );
    for (what, path) in [
        ("template", artifacts::TEST_CUSTOM_FORMATTER_PATH),
        ("legacy", artifacts::TEST_LEGACY_FORMATTER_PATH),
    ] {
        let wasm = std::fs::read(path).expect("artifact");
        assert_eq!(
            runtime.validate(&wasm).expect(what),
            World::SiemFormatter,
            "{what}"
        );
        let f = Formatter::new(runtime.clone(), &wasm, r#"{"secret": "t0k"}"#).expect(what);
        let req = f
            .format(&[r#"{"decision":"block","tool":"x"}"#.to_string()])
            .expect(what);
        assert!(!req.body.is_empty(), "{what}");
    }
    // The template keeps what its configuration asks for and sets the token.
    let wasm = std::fs::read(artifacts::TEST_CUSTOM_FORMATTER_PATH).expect("artifact");
    let f = Formatter::new(
        runtime.clone(),
        &wasm,
        r#"{"decisions": ["block"], "secret": "t0k"}"#,
    )
    .expect("template");
    let req = f
        .format(&[
            r#"{"decision":"block","tool":"x"}"#.to_string(),
            r#"{"decision":"allow","tool":"y"}"#.to_string(),
        ])
        .expect("format");
    let body: Value = serde_json::from_slice(&req.body).expect("json");
    assert_eq!(body["events"].as_array().map(Vec::len), Some(1));
    assert!(
        req.headers
            .contains(&("authorization".to_string(), "Bearer t0k".to_string()))
    );
}

/// What is stored over the admin API outlives a restart: an uploaded formatter (which no
/// bundle names) still formats its destination, and a policy draft not promoted is still
/// listed. A destination replaced without its secret keeps the stored one, whatever its kind.
/// After the master key changed, the gateway still starts: the destinations whose secret it
/// can no longer open are listed as unusable, and can be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_formatters_and_drafts_outlive_a_restart_and_a_new_master_key_breaks_only_secrets() {
    let rx = Receiver::start();
    let data = tempfile::tempdir().expect("tempdir");
    let dir = data.path().display().to_string();
    let flags = |key: &'static str| -> Vec<String> {
        let mut f = vec!["--data-dir".to_owned(), dir.clone()];
        f.extend(["--master-key".to_owned(), key.to_owned()]);
        f
    };
    let gw = start(Backend::Sqlite, &flags(MASTER_KEY)).await;
    let digest = upload_formatter(
        &gw,
        "acme",
        intentgate::plugins::artifacts::TEST_LEGACY_FORMATTER_PATH,
        "siem-formatter",
    )
    .await;
    let (status, v) = put_destination(
        &gw,
        ADMIN_TOKEN,
        json!({"tenant": "acme", "name": "formatted", "kind": "ndjson",
               "url": format!("{}/ndjson/formatted", rx.url), "formatter": digest}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let splunk = json!({"tenant": "acme", "name": "hec", "kind": "splunk",
                        "url": format!("{}/services/collector/event", rx.url)});
    let mut with_secret = splunk.clone();
    with_secret["secret"] = HEC_TOKEN.into();
    let (status, v) = put_destination(&gw, ADMIN_TOKEN, with_secret).await;
    assert_eq!(status, 200, "{v}");
    // Only its severity changes: the stored secret is kept (a Splunk destination needs one).
    let mut quieter = splunk.clone();
    quieter["min_severity"] = "critical".into();
    let (status, v) = put_destination(&gw, ADMIN_TOKEN, quieter).await;
    assert_eq!(status, 200, "a replacement without the secret: {v}");
    assert_eq!(v["secret_set"], true, "{v}");
    let (status, draft) = http::post_json(
        &format!("{}/v1/admin/policies/drafts", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"name": "kept", "tenant": "acme",
                "rego_source": "package intentgate.policy\n\ndecision := {\"allow\": false, \"reason\": \"kept draft\"}\n"}),
    )
    .await;
    assert_eq!(status, 201, "{draft}");
    let draft_id = draft["id"].as_str().expect("id").to_owned();
    gw.shutdown().await;

    let gw = start(Backend::Sqlite, &flags(MASTER_KEY)).await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    let formatted = find(&list, "acme/formatted");
    assert_eq!(
        formatted["failing"], false,
        "the uploaded formatter did not survive the restart: {formatted}"
    );
    let (status, drafts) = http::get_json(
        &format!("{}/v1/admin/policies/drafts?tenant=acme", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(status, 200, "{drafts}");
    assert!(
        drafts
            .as_array()
            .is_some_and(|d| d.iter().any(|d| d["id"] == draft_id.as_str())),
        "the draft did not survive the restart: {drafts}"
    );
    gw.shutdown().await;

    // Another master key: the stored Splunk secret cannot be opened any more.
    const OTHER_KEY: &str = "b3RoZXItbWFzdGVyLWtleS0wMTIzNDU2Nzg5YWJjZGVm";
    let gw = start(Backend::Sqlite, &flags(OTHER_KEY)).await;
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    let hec = find(&list, "acme/hec");
    assert_eq!(hec["usable"], false, "{hec}");
    assert_eq!(hec["failing"], true, "{hec}");
    assert!(
        hec["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot be opened")),
        "{hec}"
    );
    assert_eq!(find(&list, "acme/formatted")["failing"], false);
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let (status, _, body) = http::send(
        "DELETE",
        &format!(
            "{}/v1/admin/integrations/destinations/hec?tenant=acme",
            gw.url
        ),
        &[("authorization", &auth)],
        Vec::new(),
    )
    .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let list = integrations(&gw.url, ADMIN_TOKEN).await;
    assert!(
        list.iter()
            .all(|d| d["id"] != "acme/hec" || d["configured"] == false),
        "{list:?}"
    );
    gw.shutdown().await;
}
