//! OpenTelemetry traces: exports over OTLP/HTTP protobuf read by a local receiver that decodes
//! them with the official OpenTelemetry protobuf definitions (`opentelemetry-proto`, pinned in
//! `tests/interop/requirements.txt`; `tests/interop/otlp_receiver.py`). One trace per decided
//! call with its stage spans, the agent's W3C trace context continued, the upstream given a
//! `traceparent` of the call's trace; `always_off` exports nothing; and JSON log lines of a call
//! from the real binary carry its trace id and event id.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use crate::support::binary::{collect_all_lines, collect_lines, lines_at_end, listening_url};
use crate::support::gateway::{self, Backend};
use crate::support::http;

const INSTALL_HINT: &str = "pip install -r tests/interop/requirements.txt";
const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";
const PLANTED_ARG: &str = "planted-argument-value-5e1d";

fn python() -> String {
    std::env::var("INTENTGATE_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The Python OTLP receiver: its child process, its URL and the requests it decoded.
struct Receiver {
    child: Child,
    url: String,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/interop/otlp_receiver.py"
        );
        let mut child = Command::new(python())
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}; then {INSTALL_HINT}", python()));
        let lines = collect_lines(child.stdout.take().expect("stdout"));
        let started = Instant::now();
        let port = loop {
            if let Some(p) = lines
                .lock()
                .expect("lines")
                .iter()
                .find_map(|l| l.strip_prefix("port ").map(str::to_owned))
            {
                break p;
            }
            if child.try_wait().ok().flatten().is_some() || started.elapsed().as_secs() > 30 {
                panic!(
                    "the OTLP receiver did not start (needs opentelemetry-proto: {INSTALL_HINT})"
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        Receiver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            lines,
        }
    }

    /// The decoded export requests so far.
    fn requests(&self) -> Vec<Value> {
        self.lines
            .lock()
            .expect("lines")
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).expect("receiver line is JSON"))
            .collect()
    }

    /// Every span received, grouped by trace id.
    fn traces(&self) -> BTreeMap<String, Vec<Value>> {
        let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
        for r in self.requests() {
            for s in r["spans"].as_array().expect("spans") {
                out.entry(s["trace_id"].as_str().expect("id").to_owned())
                    .or_default()
                    .push(s.clone());
            }
        }
        out
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An upstream that records the `traceparent` of each request and passes it on to the
/// built-in demo server.
async fn recording_upstream() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    use hyper::service::service_fn;
    let (demo, _task) = intentgate::demo::spawn("127.0.0.1:0").await.expect("demo");
    let demo = demo.to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let record = Arc::clone(&seen);
    tokio::spawn(async move {
        let _task = _task;
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let demo = demo.clone();
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let demo = demo.clone();
                    let record = Arc::clone(&record);
                    async move {
                        let tp = req
                            .headers()
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        record.lock().expect("seen").push(tp);
                        let headers: Vec<(String, String)> = req
                            .headers()
                            .iter()
                            .filter(|(k, _)| !matches!(k.as_str(), "host" | "content-length"))
                            .filter_map(|(k, v)| {
                                Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned()))
                            })
                            .collect();
                        let body = req.into_body().collect().await.expect("body").to_bytes();
                        let pairs: Vec<(&str, &str)> = headers
                            .iter()
                            .map(|(k, v)| (k.as_str(), v.as_str()))
                            .collect();
                        let (status, h, answer) =
                            http::send("POST", &demo, &pairs, body.to_vec()).await;
                        let mut resp = hyper::Response::new(Full::new(answer));
                        *resp.status_mut() = hyper::StatusCode::from_u16(status).expect("status");
                        for (k, v) in &h {
                            if k != "content-length" && k != "transfer-encoding" {
                                resp.headers_mut().insert(k, v.clone());
                            }
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (format!("http://{addr}/mcp"), seen)
}

/// A `tools/call` over `/v1/mcp` with optional trace headers; the JSON answer.
async fn call(url: &str, token: &str, tool: &str, trace: Option<(&str, &str)>) -> Value {
    let auth = format!("Bearer {token}");
    let mut headers = vec![
        ("content-type", "application/json"),
        ("authorization", auth.as_str()),
    ];
    if let Some((tp, ts)) = trace {
        headers.push(("traceparent", tp));
        headers.push(("tracestate", ts));
    }
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": tool, "arguments": {"text": PLANTED_ARG}}});
    let (_, _, bytes) = http::send(
        "POST",
        &format!("{url}/v1/mcp"),
        &headers,
        serde_json::to_vec(&body).expect("json"),
    )
    .await;
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}

fn root(spans: &[Value]) -> &Value {
    let roots: Vec<&Value> = spans.iter().filter(|s| s["kind"] == 2).collect();
    assert_eq!(roots.len(), 1, "one server span per trace: {spans:#?}");
    roots[0]
}

fn names(spans: &[Value], root_id: &str) -> Vec<String> {
    let mut n: Vec<String> = spans
        .iter()
        .filter(|s| s["parent_span_id"] == root_id)
        .map(|s| s["name"].as_str().expect("name").to_owned())
        .collect();
    n.sort();
    n
}

async fn wait_for(receiver: &Receiver, traces: usize) {
    let started = Instant::now();
    while receiver.traces().len() < traces && started.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_trace_per_call_with_stage_spans_continues_the_agents_trace_to_the_upstream() {
    let receiver = Receiver::start();
    let (upstream, seen) = recording_upstream().await;
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&upstream),
        &[
            "--otlp-endpoint",
            &receiver.url,
            "--otlp-headers",
            "x-test-header=hello%20collector",
            "--otel-bsp-schedule-delay",
            "50",
        ],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "tracer", "tools": ["echo"]}))
        .await;
    let agent_tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let allowed = call(&tg.url, &token, "echo", Some((&agent_tp, "vendor=abc"))).await;
    assert!(allowed["result"].is_object(), "{allowed}");
    let refused_tp = format!("00-{}-{AGENT_SPAN}-01", "1".repeat(32));
    let refused = call(
        &tg.url,
        &token,
        "delete_records",
        Some((&refused_tp, "v=1")),
    )
    .await;
    assert!(refused["error"].is_object(), "{refused}");
    let own = call(&tg.url, &token, "echo", None).await;
    assert!(own["result"].is_object(), "{own}");
    // A list is not a decided call: no trace.
    http::post_json(
        &format!("{}/v1/mcp", tg.url),
        Some(&token),
        &json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"}),
    )
    .await;
    // Shutting down flushes the queue.
    tg.shutdown().await;
    wait_for(&receiver, 3).await;

    let requests = receiver.requests();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(r["path"], "/v1/traces");
        assert_eq!(r["content_type"], "application/x-protobuf");
        assert_eq!(r["x_test_header"], "hello collector");
        assert_eq!(r["resource"]["service.name"], "intentgate");
    }
    let all = serde_json::to_string(&requests).expect("json");
    assert!(!all.contains(PLANTED_ARG), "no argument value in a span");
    let traces = receiver.traces();
    assert_eq!(traces.len(), 3, "one trace per decided call: {traces:#?}");

    // The allowed call: the agent's trace id and parent span, every stage, the decision.
    let spans = &traces[AGENT_TRACE];
    let r = root(spans);
    assert_eq!(r["name"], "tools/call");
    assert_eq!(
        r["parent_span_id"], AGENT_SPAN,
        "the agent's span is the parent"
    );
    assert_eq!(r["trace_state"], "vendor=abc");
    assert_eq!(r["attributes"]["intentgate.tenant"], "default");
    assert_eq!(r["attributes"]["intentgate.tool"], "echo");
    assert_eq!(r["attributes"]["intentgate.decision"], "allow");
    assert!(
        r["attributes"]["intentgate.event_id"].as_i64().is_some(),
        "{r}"
    );
    let root_id = r["span_id"].as_str().expect("id");
    assert_eq!(
        names(spans, root_id),
        [
            "audit commit",
            "budget",
            "capability",
            "intent",
            "policy",
            "token verification",
            "upstream"
        ]
    );
    for s in spans {
        assert!(s["end"].as_u64() >= s["start"].as_u64(), "{s}");
        assert!(s["start"].as_u64() >= r["start"].as_u64(), "{s}");
    }
    // The upstream was told the call's trace and the gateway's upstream span.
    let upstream_span = spans
        .iter()
        .find(|s| s["name"] == "upstream")
        .expect("upstream span");
    assert_eq!(upstream_span["kind"], 3, "a client span");
    let expected = format!(
        "00-{AGENT_TRACE}-{}-01",
        upstream_span["span_id"].as_str().expect("id")
    );
    let seen = seen.lock().expect("seen").clone();
    assert!(
        seen.iter()
            .any(|tp| tp.as_deref() == Some(expected.as_str())),
        "{expected} not among {seen:?}"
    );
    assert!(
        seen.iter().flatten().all(|tp| !tp.contains(AGENT_SPAN)),
        "the agent's traceparent is never copied: {seen:?}"
    );

    // The refused call: decided by the capability check; no later stage, no upstream.
    let spans = &traces[&"1".repeat(32)];
    let r = root(spans);
    assert_eq!(r["attributes"]["intentgate.decision"], "block");
    assert_eq!(r["attributes"]["intentgate.check"], "capability");
    let root_id = r["span_id"].as_str().expect("id");
    assert_eq!(
        names(spans, root_id),
        ["audit commit", "capability", "token verification"]
    );

    // The call without a traceparent started a trace of its own, with no parent.
    let (_, spans) = traces
        .iter()
        .find(|(id, _)| *id != AGENT_TRACE && **id != "1".repeat(32))
        .expect("third trace");
    assert_eq!(root(spans)["parent_span_id"], "");
}

#[tokio::test]
async fn always_off_exports_nothing_and_still_passes_the_trace_on() {
    let receiver = Receiver::start();
    let (upstream, seen) = recording_upstream().await;
    let tg = gateway::start(
        Backend::Sqlite,
        Some(&upstream),
        &[
            "--otlp-endpoint",
            &receiver.url,
            "--otel-traces-sampler",
            "always_off",
            "--otel-bsp-schedule-delay",
            "50",
        ],
    )
    .await;
    let (token, _) = tg
        .mint(json!({"subject": "quiet", "tools": ["echo"]}))
        .await;
    let agent_tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    for _ in 0..3 {
        let v = call(&tg.url, &token, "echo", Some((&agent_tp, "a=b"))).await;
        assert!(v["result"].is_object(), "{v}");
    }
    tg.shutdown().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());
    let seen = seen.lock().expect("seen").clone();
    let call_tps: Vec<&String> = seen
        .iter()
        .flatten()
        .filter(|tp| tp.contains(AGENT_TRACE))
        .collect();
    assert!(!call_tps.is_empty(), "{seen:?}");
    for tp in call_tps {
        assert!(tp.ends_with("-00") && !tp.contains(AGENT_SPAN), "{tp}");
    }
}

#[tokio::test]
async fn json_log_lines_of_a_call_carry_its_trace_id_and_event_id() {
    let data = tempfile::tempdir().expect("tempdir");
    let (demo, _task) = intentgate::demo::spawn("127.0.0.1:0").await.expect("demo");
    let admin = "tracing-admin-token-0123456789";
    let mut child = Command::new(env!("CARGO_BIN_EXE_intentgate"))
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("INTENTGATE_LOG_FORMAT", "json")
        .env("INTENTGATE_LOG", "intentgate=debug,info")
        .env("INTENTGATE_ADDR", "127.0.0.1:0")
        .env("INTENTGATE_DATA_DIR", data.path())
        .env("INTENTGATE_ADMIN_TOKEN", admin)
        .env("INTENTGATE_UPSTREAM_URL", demo.to_string())
        .envs(crate::support::gateway::TEST_CHECK_DEADLINES_ENV)
        .env(
            "INTENTGATE_POLICY_FILE",
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../policies/examples/token_scope.rego"
            ),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the gateway binary");
    let (lines, reader) = collect_all_lines(child.stdout.take().expect("stdout"));
    let url = listening_url(&mut child, &lines)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let (status, minted) = http::post_json(
        &format!("{url}/v1/admin/mint"),
        Some(admin),
        &json!({"subject": "logger", "tools": ["echo"]}),
    )
    .await;
    assert_eq!(status, 200, "{minted}");
    let token = minted["token"].as_str().expect("token").to_owned();
    let agent_tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let auth = format!("Bearer {token}");
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                      "params": {"name": "echo", "arguments": {"text": "hi"}}});
    let (_, headers, answer) = http::send(
        "POST",
        &format!("{url}/v1/mcp"),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
            ("traceparent", &agent_tp),
        ],
        serde_json::to_vec(&body).expect("json"),
    )
    .await;
    let event_id: i64 = headers
        .get("x-intentgate-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("an allowed call: {}", String::from_utf8_lossy(&answer)));
    // The call's lines were written before its answer: once the killed child is reaped and its
    // output read to the end, they are all there.
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines_at_end(&lines, reader);
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let of_call: Vec<&Value> = parsed
        .iter()
        .filter(|v| v["span"]["trace_id"] == AGENT_TRACE)
        .collect();
    assert!(!of_call.is_empty(), "no line of the call: {lines:#?}");
    let allowed = of_call
        .iter()
        .find(|v| v["fields"]["message"] == "call allowed")
        .unwrap_or_else(|| panic!("no 'call allowed' line: {lines:#?}"));
    assert_eq!(allowed["span"]["event_id"], event_id, "{allowed}");
    assert_eq!(allowed["span"]["name"], "call");
}
