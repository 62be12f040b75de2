//! `GET /v1/mcp` (a handshake-era session's own stream) and resource subscriptions through the
//! gateway (issue 12 item 3): updates reach only the session that subscribed, list changes
//! every session, a client resumes after `Last-Event-ID`, the upstream's subscription is
//! dropped when the last subscriber goes (unsubscribe, `DELETE`, revocation), and every refusal
//! of the stream is typed.
//!
//! Upstream: `tests/interop/upstream_server.py` refusing the stateless era (`--handshake-only`),
//! so the gateway holds one upstream session and reads its stream; its `touch` tool announces a
//! resource update (or a tool list change) on that stream, outside any call. Raw HTTP is the
//! client here: what each session receives is read byte for byte.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

use crate::interop::{Flavor, Upstream};
use crate::mcp_eras::post;
use crate::support::gateway::{self, ADMIN_TOKEN, Backend, TestGateway};
use crate::support::http;

const UPDATED: &str = "notifications/resources/updated";
const TOOLS_CHANGED: &str = "notifications/tools/list_changed";

fn marker(name: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{name}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn token(gw: &TestGateway, subject: &str) -> (String, String) {
    gw.mint(json!({"subject": subject, "tenant": "acme", "ttl_seconds": 600, "tools": ["*"]}))
        .await
}

/// A session opened with `initialize` (and `initialized`); its id.
async fn session(gw: &TestGateway, tok: &str) -> String {
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let (s, h, v) = post(gw, tok, &[], &init).await;
    assert_eq!(s, 200, "{v}");
    let caps = &v["result"]["capabilities"]["resources"];
    assert_eq!(
        caps["subscribe"], true,
        "the upstream's subscribe is offered: {v}"
    );
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session id")
        .to_owned();
    let done = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let (s, _, _) = post(gw, tok, &[("mcp-session-id", &sid)], &done).await;
    assert_eq!(s, 202);
    sid
}

async fn rpc(gw: &TestGateway, tok: &str, sid: &str, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "id": 7, "method": method, "params": params});
    let (s, _, v) = post(gw, tok, &[("mcp-session-id", sid)], &body).await;
    assert_eq!(s, 200, "{method}: {v}");
    assert!(v.get("result").is_some(), "{method}: {v}");
    v
}

/// One SSE event: its id, when numbered, and its JSON data.
#[derive(Debug, Clone)]
struct Event {
    id: Option<u64>,
    data: Value,
}

/// A `GET /v1/mcp` stream being read.
struct Stream {
    body: Incoming,
    buf: Vec<u8>,
    /// The events the `*_until` helpers waited for. A touch retried while its event was merely
    /// slow announces that event again; later reads skip such repeats ([`Stream::next_new`]).
    awaited: Vec<Value>,
    /// The id of the last numbered event read.
    last_id: Option<u64>,
}

async fn get(
    gw: &TestGateway,
    tok: Option<&str>,
    extra: &[(&str, &str)],
) -> (u16, hyper::HeaderMap, Incoming) {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = hyper::Request::get(format!("{}/v1/mcp", gw.url));
    if let Some(t) = tok {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in extra {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Full::new(Bytes::new())).expect("request"))
        .await
        .expect("GET sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.into_body())
}

async fn open(gw: &TestGateway, tok: &str, sid: &str, last: Option<u64>) -> Stream {
    let last = last.map(|l| l.to_string());
    let mut h = vec![("accept", "text/event-stream"), ("mcp-session-id", sid)];
    if let Some(l) = &last {
        h.push(("last-event-id", l.as_str()));
    }
    let (s, headers, body) = get(gw, Some(tok), &h).await;
    assert_eq!(s, 200);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    Stream {
        body,
        buf: Vec::new(),
        awaited: Vec::new(),
        last_id: None,
    }
}

impl Stream {
    /// The next event with data within `wait` (comments skipped); `None` on timeout.
    /// Panics when the stream ends.
    async fn next(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buf.drain(..end + 2).collect();
                let text = String::from_utf8_lossy(&raw);
                let mut id = None;
                let mut data = None;
                for line in text.lines() {
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = serde_json::from_str(v).ok();
                    }
                }
                match data {
                    Some(data) => {
                        self.last_id = id.or(self.last_id);
                        return Some(Event { id, data });
                    }
                    None => continue, // a comment
                }
            }
            let frame = tokio::time::timeout_at(deadline, self.body.frame()).await;
            match frame {
                Err(_) => return None,
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Ok(_) => panic!("the stream ended"),
            }
        }
    }

    /// The next event within `wait` that is not a repeat of one already awaited (the same
    /// data); `None` on timeout.
    async fn next_new(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let e = self.next(left).await?;
            if !self.awaited.contains(&e.data) {
                return Some(e);
            }
        }
    }

    /// The events until the stream ends, within `wait` (panics if it does not end).
    async fn events_until_end(&mut self, wait: Duration) -> Vec<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => panic!("the stream did not end"),
                Ok(Some(Ok(f))) => {
                    if let Ok(d) = f.into_data() {
                        self.buf.extend_from_slice(&d);
                    }
                }
                Ok(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
        text.split("\n\n")
            .filter_map(|raw| {
                let data = raw.lines().find_map(|l| l.strip_prefix("data: "))?;
                Some(Event {
                    id: None,
                    data: serde_json::from_str(data).ok()?,
                })
            })
            .collect()
    }

    /// Whether the stream ends within `wait` (events before the end are skipped).
    async fn ends_within(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.body.frame()).await {
                Err(_) => return false,
                Ok(Some(Ok(_))) => {}
                Ok(_) => return true,
            }
        }
    }
}

/// Calls `touch` until `stream` gets the event it announces (the gateway's upstream session
/// opens its own stream just after the session; an announcement before that is lost by the
/// upstream, as the transport allows). Each try waits long enough for a loaded machine, so a
/// retry is rare; the event a retry repeats is skipped by later reads, and any other event
/// than the one announced fails here.
async fn touch_until(
    gw: &TestGateway,
    tok: &str,
    sid: &str,
    stream: &mut Stream,
    args: Value,
    method: &str,
) -> Event {
    for _ in 0..20 {
        rpc(
            gw,
            tok,
            sid,
            "tools/call",
            json!({"name": "touch", "arguments": args}),
        )
        .await;
        if let Some(e) = stream.next_new(Duration::from_secs(2)).await {
            assert_eq!(e.data["method"], method, "{e:?}");
            stream.awaited.push(e.data.clone());
            return e;
        }
    }
    panic!("no {method} event reached the stream");
}

fn upstream_saw(up: &Upstream, what: &str) -> bool {
    up.calls_with("")
        .iter()
        .any(|c| c["tool"].as_str() == Some(what))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_reach_only_the_subscribed_session_and_resume_after_last_event_id() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (a, _) = token(&gw, "agent-a").await;
    let (b, _) = token(&gw, "agent-b").await;
    let (sa, sb) = (session(&gw, &a).await, session(&gw, &b).await);
    let mut stream_a = open(&gw, &a, &sa, None).await;
    let mut stream_b = open(&gw, &b, &sb, None).await;
    let uri = format!("note://{}", marker("sub"));
    // The updates A misses while away are of a URI of their own: a late repeat of the first
    // URI's update (a retried touch) cannot pass for one of them.
    let later = format!("note://{}", marker("later"));
    rpc(&gw, &a, &sa, "resources/subscribe", json!({"uri": uri})).await;
    rpc(&gw, &a, &sa, "resources/subscribe", json!({"uri": later})).await;

    // B calls the tool; only A subscribed, so only A hears of the update.
    let first = touch_until(&gw, &b, &sb, &mut stream_a, json!({"uri": uri}), UPDATED).await;
    assert_eq!(first.data["params"]["uri"], uri.as_str(), "{first:?}");
    let first_id = first.id.expect("numbered event");
    // A list change goes to every session: B's first event is it, never A's update.
    let changed = touch_until(
        &gw,
        &a,
        &sa,
        &mut stream_b,
        json!({"uri": "-", "list_changed": true}),
        TOOLS_CHANGED,
    )
    .await;
    assert_eq!(changed.data["method"], TOOLS_CHANGED);
    let on_a = stream_a
        .next_new(Duration::from_secs(5))
        .await
        .expect("A too");
    assert_eq!(on_a.data["method"], TOOLS_CHANGED, "{on_a:?}");
    assert!(on_a.id.expect("numbered") > first_id);
    stream_a.awaited.push(on_a.data.clone());
    // Repeats of a retried touch still on their way come now, so the id A resumes after is the
    // last it really got; nothing else may reach A.
    if let Some(e) = stream_a.next_new(Duration::from_secs(1)).await {
        panic!("A got an event nobody announced to it: {e:?}");
    }
    let seen = stream_a.last_id.expect("numbered");
    let had = stream_a.awaited.clone();

    // A goes away; two updates happen; A resumes after the last event it saw and gets both.
    drop(stream_a);
    for _ in 0..2 {
        rpc(
            &gw,
            &b,
            &sb,
            "tools/call",
            json!({"name": "touch", "arguments": {"uri": later}}),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut resumed = open(&gw, &a, &sa, Some(seen)).await;
    // Every id after `seen` in order, none skipped; a late repeat of an event A already had
    // keeps its place among them, and the rest are the two updates it missed.
    let mut missed = 0;
    for id in seen + 1.. {
        let e = resumed
            .next(Duration::from_secs(5))
            .await
            .expect("replayed");
        assert_eq!(e.id, Some(id), "{e:?}");
        if had.contains(&e.data) {
            continue;
        }
        assert_eq!(e.data["method"], UPDATED, "{e:?}");
        assert_eq!(e.data["params"]["uri"], later.as_str(), "{e:?}");
        missed += 1;
        if missed == 2 {
            break;
        }
    }
    // B never saw an update of A's subscription.
    while let Some(e) = stream_b.next(Duration::from_millis(300)).await {
        assert_ne!(e.data["method"], UPDATED, "{e:?}");
    }
    gw.shutdown().await;
    up.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_subscription_ends_with_its_last_subscriber() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (a, _) = token(&gw, "agent-a").await;
    let (b, _) = token(&gw, "agent-b").await;
    let (sa, sb) = (session(&gw, &a).await, session(&gw, &b).await);
    let uri = format!("note://{}", marker("shared"));
    rpc(&gw, &a, &sa, "resources/subscribe", json!({"uri": uri})).await;
    let unsubscribed = format!("unsubscribe:{uri}");
    // Only a session's own subscription can be undone. Another agent's token, sent without a
    // session (the upstream's one session serves everyone), or from a session of its own that
    // never subscribed, is answered and changes nothing upstream.
    let (c, _) = token(&gw, "agent-c").await;
    let bare = json!({"jsonrpc": "2.0", "id": 9, "method": "resources/unsubscribe",
        "params": {"uri": uri}});
    let (s, _, v) = post(&gw, &c, &[], &bare).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("result").is_some(), "{v}");
    let sc = session(&gw, &c).await;
    rpc(&gw, &c, &sc, "resources/unsubscribe", json!({"uri": uri})).await;
    assert!(
        !upstream_saw(&up, &unsubscribed),
        "a session that never subscribed ended A's subscription"
    );
    // A subscribe without a session is decided and acknowledged, not forwarded: no stream
    // could carry its updates, and nothing could end it upstream.
    let lone = format!("note://{}", marker("sessionless"));
    let bare = json!({"jsonrpc": "2.0", "id": 10, "method": "resources/subscribe",
        "params": {"uri": lone}});
    let (s, _, v) = post(&gw, &c, &[], &bare).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("result").is_some(), "{v}");
    assert!(
        !upstream_saw(&up, &format!("subscribe:{lone}")),
        "a sessionless subscribe reached the upstream"
    );
    rpc(&gw, &b, &sb, "resources/subscribe", json!({"uri": uri})).await;
    // A leaves: B still subscribes, so the upstream keeps sending.
    rpc(&gw, &a, &sa, "resources/unsubscribe", json!({"uri": uri})).await;
    assert!(!upstream_saw(&up, &unsubscribed));
    // B's session ends (DELETE): its stream closes and the upstream is told.
    let mut stream_b = open(&gw, &b, &sb, None).await;
    let auth = format!("Bearer {b}");
    let (s, _, _) = http::send(
        "DELETE",
        &format!("{}/v1/mcp", gw.url),
        &[("authorization", &auth), ("mcp-session-id", &sb)],
        Vec::new(),
    )
    .await;
    assert_eq!(s, 204);
    assert!(stream_b.ends_within(Duration::from_secs(5)).await);
    assert!(upstream_saw(&up, &unsubscribed), "the last subscriber left");

    // Revoking a token ends its stream and its subscriptions (here within the re-check).
    let (c, jti) = token(&gw, "agent-d").await;
    let sc = session(&gw, &c).await;
    let uri = format!("note://{}", marker("revoked"));
    rpc(&gw, &c, &sc, "resources/subscribe", json!({"uri": uri})).await;
    let mut stream_c = open(&gw, &c, &sc, None).await;
    let (s, _) = http::post_json(
        &format!("{}/v1/admin/revoke", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "test"}),
    )
    .await;
    assert_eq!(s, 204);
    assert!(stream_c.ends_within(Duration::from_secs(10)).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !upstream_saw(&up, &format!("unsubscribe:{uri}")) {
        assert!(tokio::time::Instant::now() < deadline, "never unsubscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
    up.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_refusals_are_typed() {
    let up = Upstream::shared_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (a, _) = token(&gw, "agent-a").await;
    let (b, _) = token(&gw, "agent-b").await;
    let sa = session(&gw, &a).await;
    let sse = ("accept", "text/event-stream");
    type Case<'a> = (Option<&'a str>, Vec<(&'a str, &'a str)>, u16, i64);
    let cases: [Case; 5] = [
        (None, vec![sse, ("mcp-session-id", &sa)], 401, -32010),
        (Some(&a), vec![("mcp-session-id", &sa)], 406, -32600),
        (Some(&a), vec![sse], 400, -32600),
        (Some(&b), vec![sse, ("mcp-session-id", &sa)], 404, -32001),
        (
            Some(&a),
            vec![sse, ("mcp-session-id", "igs1.forged.x")],
            404,
            -32001,
        ),
    ];
    for (tok, headers, status, code) in cases {
        let (s, _, body) = get(&gw, tok, &headers).await;
        let bytes = body.collect().await.expect("body").to_bytes();
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        assert_eq!(
            (s, v["error"]["code"].as_i64()),
            (status, Some(code)),
            "{headers:?}: {v}"
        );
    }
    // The stateless era has no stream.
    let (s, h, _) = get(
        &gw,
        Some(&a),
        &[sse, ("mcp-protocol-version", "2026-07-28")],
    )
    .await;
    assert_eq!(s, 405);
    assert_eq!(h.get("allow").and_then(|v| v.to_str().ok()), Some("POST"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_receives_updates_it_subscribed_to() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, "agent-py").await;
    let uri = format!("note://{}", marker("py"));
    let (url, t, u) = (gw.url.clone(), tok.clone(), uri.clone());
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(crate::interop::python())
            .arg(crate::interop::interop_dir().join("subscribe_client.py"))
            .args(["--gateway", &url, "--token", &t, &u])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("subscribe_client.py ran");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(stdout.lines().last().unwrap_or_default()).unwrap_or_else(
            |_| {
                panic!(
                    "no JSON from subscribe_client.py: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        )
    })
    .await
    .expect("client task");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(out["subscribe"], true, "{out}");
    assert_eq!(out["updated"][0], uri.as_str(), "{out}");
    assert!(out["list_changed"].as_u64() >= Some(1), "{out}");
    assert!(upstream_saw(&up, &format!("subscribe:{uri}")));
    gw.shutdown().await;
    up.kill();
}

// --- subscriptions/listen (2026-07-28, SEP-2575) ------------------------------------------

const MODERN: &str = "2026-07-28";
const ACKNOWLEDGED: &str = "notifications/subscriptions/acknowledged";
const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

fn envelope() -> Value {
    json!({"io.modelcontextprotocol/protocolVersion": MODERN,
           "io.modelcontextprotocol/clientCapabilities": {}})
}

/// Opens `subscriptions/listen` with `filter` as a raw stateless client; the status, headers
/// and the stream being read.
async fn listen(
    gw: &TestGateway,
    tok: &str,
    id: &str,
    filter: Value,
    accept: &str,
) -> (u16, hyper::HeaderMap, Stream) {
    let body = json!({"jsonrpc": "2.0", "id": id, "method": "subscriptions/listen",
        "params": {"notifications": filter, "_meta": envelope()}});
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let req = hyper::Request::post(format!("{}/v1/mcp", gw.url))
        .header("authorization", format!("Bearer {tok}"))
        .header("content-type", "application/json")
        .header("accept", accept)
        .header("mcp-protocol-version", MODERN)
        .header("mcp-method", "subscriptions/listen")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("request");
    let resp = client.request(req).await.expect("POST sent");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let stream = Stream {
        body: resp.into_body(),
        buf: Vec::new(),
        awaited: Vec::new(),
        last_id: None,
    };
    (status, headers, stream)
}

/// Calls the upstream's `touch` tool as a stateless client.
async fn touch_modern(gw: &TestGateway, tok: &str, args: Value) {
    touch_named(gw, tok, "touch", args).await;
}

/// Calls the `touch` tool exposed as `name` (namespaced behind several upstreams).
async fn touch_named(gw: &TestGateway, tok: &str, name: &str, args: Value) {
    let body = json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
        "params": {"name": name, "arguments": args, "_meta": envelope()}});
    let h = [
        ("mcp-protocol-version", MODERN),
        ("mcp-method", "tools/call"),
        ("mcp-name", name),
    ];
    let (s, _, v) = post(gw, tok, &h, &body).await;
    assert_eq!(s, 200, "{v}");
    assert!(v.get("result").is_some(), "{v}");
}

/// Touches with `args` until `stream` gets an event; returns it.
async fn touch_listen_until(
    gw: &TestGateway,
    tok: &str,
    stream: &mut Stream,
    args: Value,
) -> Event {
    touch_named_until(gw, tok, stream, "touch", args).await
}

/// Touches with `args` through the tool exposed as `name` until `stream` gets an event; returns
/// it for the caller to check. Each try waits long enough for a loaded machine, so a retry is
/// rare; a repeat of an event awaited before (a retry's) is skipped, any other event returned.
async fn touch_named_until(
    gw: &TestGateway,
    tok: &str,
    stream: &mut Stream,
    name: &str,
    args: Value,
) -> Event {
    for _ in 0..20 {
        touch_named(gw, tok, name, args.clone()).await;
        if let Some(e) = stream.next_new(Duration::from_secs(2)).await {
            stream.awaited.push(e.data.clone());
            return e;
        }
    }
    panic!("no event reached the listen stream after touching {name} with {args}");
}

/// The filters of the upstream's listen streams whose log line starts with `what` (`listen:` when
/// opened, `listen-closed:` when closed) and mentions `marker`.
fn upstream_listens(up: &Upstream, marker: &str, what: &str) -> Vec<Value> {
    up.calls_with(marker)
        .iter()
        .filter(|c| c["tool"].as_str().is_some_and(|t| t.starts_with(what)))
        .map(|c| c["args"]["filter"].clone())
        .collect()
}

fn stamped(e: &Event, id: &str) {
    assert_eq!(
        e.data["params"]["_meta"][SUBSCRIPTION_ID], id,
        "every frame carries the listen request's id: {e:?}"
    );
}

/// A stateless client's listen stream through the gateway to a stateless upstream: a URI the
/// token may not read is left out of the acknowledged filter (audited as a refused
/// subscription) and its update never arrives; an update of a URI it may read and a tool list
/// change arrive as they happen, stamped with the request's id; revoking the token ends the
/// stream with a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_relays_only_the_honored_filter_and_revocation_ends_it() {
    let up = Upstream::start_async(Flavor::Sse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (parent, jti) = token(&gw, "agent-listen").await;
    let p = parent.clone();
    let child = tokio::task::spawn_blocking(move || crate::mcp_kinds::sdk_attenuate(&p))
        .await
        .expect("sdk");
    let uri = format!("note://{}", marker("listen"));
    let denied = "file:///private/ledger.csv";
    let filter = json!({"toolsListChanged": true, "promptsListChanged": false,
        "resourceSubscriptions": [uri, denied]});
    let (s, h, mut stream) = listen(
        &gw,
        &child,
        "raw-1",
        filter,
        "application/json, text/event-stream",
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        h.get("content-type").and_then(|v| v.to_str().ok()),
        Some("text/event-stream")
    );
    let ack = stream.next(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(ack.data["method"], ACKNOWLEDGED, "{ack:?}");
    assert_eq!(
        ack.data["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": [uri]}),
        "the refused URI is not honored: {ack:?}"
    );
    stamped(&ack, "raw-1");
    // The upstream was asked for the authorized filter only.
    let opened = upstream_listens(&up, &uri, "listen:");
    assert_eq!(
        opened,
        [json!({"toolsListChanged": true, "resourceSubscriptions": [uri]})],
        "the upstream's listen"
    );

    // The refused URI changes first: its update never comes; the permitted one's does.
    touch_modern(&gw, &parent, json!({"uri": denied})).await;
    let e = touch_listen_until(&gw, &parent, &mut stream, json!({"uri": uri})).await;
    assert_eq!(e.data["method"], UPDATED, "{e:?}");
    assert_eq!(e.data["params"]["uri"], uri.as_str(), "{e:?}");
    assert!(e.id.is_none(), "a listen stream is not resumable: {e:?}");
    stamped(&e, "raw-1");
    let e = touch_listen_until(
        &gw,
        &parent,
        &mut stream,
        json!({"uri": "-", "list_changed": true}),
    )
    .await;
    assert_eq!(e.data["method"], TOOLS_CHANGED, "{e:?}");
    stamped(&e, "raw-1");

    // Decided and audited as subscriptions, with the kind.
    let (s, v) = http::get_json(
        &format!("{}/v1/admin/audit?tenant=acme&limit=1000", gw.url),
        ADMIN_TOKEN,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let events = v["items"].as_array().cloned().unwrap_or_default();
    let decided = |tool: &str, decision: &str| {
        events
            .iter()
            .any(|e| e["tool"] == tool && e["decision"] == decision)
    };
    assert!(
        decided(&format!("resource:{denied}"), "block"),
        "{events:?}"
    );
    assert!(decided(&format!("resource:{uri}"), "allow"), "{events:?}");

    // Revocation ends the stream within the re-check, with a typed answer to the listen.
    let (s, _) = http::post_json(
        &format!("{}/v1/admin/revoke", gw.url),
        Some(ADMIN_TOKEN),
        &json!({"jti": jti, "reason": "test"}),
    )
    .await;
    assert_eq!(s, 204);
    let events = stream.events_until_end(Duration::from_secs(10)).await;
    let last = events.last().cloned();
    let last = last.expect("a final frame");
    assert_eq!(last.data["id"], "raw-1", "{last:?}");
    assert_eq!(last.data["error"]["code"], -32010, "{last:?}");
    // And the upstream's listen was closed with it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream_listens(&up, &uri, "listen-closed:").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream listen stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
    up.kill();
}

/// Refusals of `subscriptions/listen` are typed: a client that does not take an event stream,
/// a malformed filter, no token; the handshake era has no such method.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_refusals_are_typed() {
    let up = Upstream::shared_async(Flavor::Sse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, "agent-refused").await;
    let read = |mut s: Stream| async move {
        let mut bytes = std::mem::take(&mut s.buf);
        bytes.extend_from_slice(&s.body.collect().await.expect("body").to_bytes());
        serde_json::from_slice::<Value>(&bytes).unwrap_or(Value::Null)
    };
    let (s, _, body) = listen(
        &gw,
        &tok,
        "a",
        json!({"toolsListChanged": true}),
        "application/json",
    )
    .await;
    assert_eq!(
        (s, read(body).await["error"]["code"].as_i64()),
        (406, Some(-32600))
    );
    let sse = "application/json, text/event-stream";
    for bad in [
        json!("all"),
        json!({"resourceSubscriptions": "note://x"}),
        json!({"toolsListChanged": 1}),
    ] {
        let (s, _, body) = listen(&gw, &tok, "b", bad.clone(), sse).await;
        let v = read(body).await;
        assert_eq!(
            (s, v["error"]["code"].as_i64()),
            (400, Some(-32602)),
            "{bad}: {v}"
        );
        assert_eq!(v["id"], "b");
    }
    let (s, _, body) = listen(
        &gw,
        "not-a-token",
        "c",
        json!({"toolsListChanged": true}),
        sse,
    )
    .await;
    let v = read(body).await;
    assert_eq!(v["error"]["code"], -32010, "{s}: {v}");
    let handshake = json!({"jsonrpc": "2.0", "id": 3, "method": "subscriptions/listen",
        "params": {"notifications": {"toolsListChanged": true}}});
    let (s, _, v) = post(&gw, &tok, &[], &handshake).await;
    assert_eq!((s, v["error"]["code"].as_i64()), (200, Some(-32601)), "{v}");
    gw.shutdown().await;
}

/// A handshake-era upstream has no listen of its own: the gateway subscribes on its shared
/// session and feeds the client's listen stream from the hub; the upstream's subscription is
/// dropped when the client goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_through_a_handshake_upstream_is_served_from_the_hub() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, "agent-hub").await;
    let uri = format!("note://{}", marker("hub"));
    let other = format!("note://{}", marker("other"));
    let filter = json!({"toolsListChanged": true, "resourceSubscriptions": [uri]});
    let (s, _, mut stream) = listen(&gw, &tok, "hub-1", filter, "text/event-stream").await;
    assert_eq!(s, 200);
    let ack = stream.next(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(
        ack.data["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": [uri]}),
        "{ack:?}"
    );
    stamped(&ack, "hub-1");
    assert!(upstream_saw(&up, &format!("subscribe:{uri}")));
    // An update of a URI this stream did not ask for is not relayed.
    touch_modern(&gw, &tok, json!({"uri": other})).await;
    let e = touch_listen_until(&gw, &tok, &mut stream, json!({"uri": uri})).await;
    assert_eq!(e.data["method"], UPDATED, "{e:?}");
    assert_eq!(e.data["params"]["uri"], uri.as_str(), "{e:?}");
    stamped(&e, "hub-1");
    let e = touch_listen_until(
        &gw,
        &tok,
        &mut stream,
        json!({"uri": "-", "list_changed": true}),
    )
    .await;
    assert_eq!(e.data["method"], TOOLS_CHANGED, "{e:?}");
    stamped(&e, "hub-1");
    drop(stream);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !upstream_saw(&up, &format!("unsubscribe:{uri}")) {
        assert!(tokio::time::Instant::now() < deadline, "never unsubscribed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
    up.kill();
}

/// The official Python client (stateless era) listens through the gateway with a scoped
/// token: the URI it may not read is not honored and its update never arrives; the other
/// URI's update and a tool list change do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_client_listens_through_the_gateway() {
    let up = Upstream::start_async(Flavor::Sse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (parent, _) = token(&gw, "agent-py-listen").await;
    let child = tokio::task::spawn_blocking(move || crate::mcp_kinds::sdk_attenuate(&parent))
        .await
        .expect("sdk");
    let uri = format!("note://{}", marker("pylisten"));
    let denied = "file:///private/ledger.csv";
    let (url, t, u) = (gw.url.clone(), child.clone(), uri.clone());
    let out = tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(crate::interop::python())
            .arg(crate::interop::interop_dir().join("listen_client.py"))
            .args(["--gateway", &url, "--token", &t, &u, denied])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("listen_client.py ran");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        serde_json::from_str::<Value>(stdout.lines().last().unwrap_or_default()).unwrap_or_else(
            |_| {
                panic!(
                    "no JSON from listen_client.py: {stdout}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            },
        )
    })
    .await
    .expect("client task");
    assert_eq!(out["ok"], true, "{out}");
    assert_eq!(
        out["honored"],
        json!({"toolsListChanged": true, "resourceSubscriptions": [uri]}),
        "{out}"
    );
    assert_eq!(out["updated"], json!([uri]), "{out}");
    assert!(out["tools_changed"].as_u64() >= Some(1), "{out}");
    // The upstream was asked for the authorized filter only, and its listen closed when the
    // client left.
    assert_eq!(
        upstream_listens(&up, &uri, "listen:"),
        [json!({"toolsListChanged": true, "resourceSubscriptions": [uri]})]
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream_listens(&up, &uri, "listen-closed:").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream listen stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
    up.kill();
}

/// Behind several upstreams, each URI goes to its own upstream with its own name (a stateless
/// one by its own listen, a handshake-era one through the hub) and comes back namespaced; a
/// URI of an upstream the token may not reach (`servers`), or of none, is not honored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_routes_each_uri_to_its_upstream() {
    let github = Upstream::start_async(Flavor::Sse).await;
    let db = Upstream::start_async(Flavor::HandshakeSse).await;
    let (g, d) = (format!("github={}", github.url), format!("db={}", db.url));
    let gw = gateway::start(Backend::Sqlite, None, &["--upstream", &g, "--upstream", &d]).await;
    let (tok, _) = token(&gw, "agent-multi-listen").await;
    let (m1, m2) = (marker("gh"), marker("db"));
    let (u1, u2) = (format!("github+note://{m1}"), format!("db+note://{m2}"));
    let filter = json!({"toolsListChanged": true,
        "resourceSubscriptions": [u1, u2, "nowhere+note://x", "note://unprefixed"]});
    let sse = "application/json, text/event-stream";
    let (s, _, mut stream) = listen(&gw, &tok, "multi", filter.clone(), sse).await;
    assert_eq!(s, 200);
    let ack = stream.next(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(
        ack.data["params"]["notifications"],
        json!({"toolsListChanged": true, "resourceSubscriptions": [u1, u2]}),
        "{ack:?}"
    );
    // The handshake-era upstream was subscribed with its own URI; the stateless one listens.
    assert!(upstream_saw(&db, &format!("subscribe:note://{m2}")));
    assert!(!upstream_saw(&github, &format!("subscribe:note://{m1}")));
    for (tool, original, exposed) in [
        ("github__touch", format!("note://{m1}"), &u1),
        ("db__touch", format!("note://{m2}"), &u2),
    ] {
        let e = touch_named_until(&gw, &tok, &mut stream, tool, json!({"uri": original})).await;
        assert_eq!(e.data["method"], UPDATED, "{e:?}");
        assert_eq!(e.data["params"]["uri"], exposed.as_str(), "{e:?}");
        stamped(&e, "multi");
    }
    drop(stream);

    // A token for github only: db's URI is not honored, and db is not asked.
    let scoped = gw
        .mint(
            json!({"subject": "agent-gh", "tenant": "acme", "ttl_seconds": 600,
                     "tools": ["*"], "servers": ["github"]}),
        )
        .await
        .0;
    let m3 = marker("dbonly");
    let filter = json!({"resourceSubscriptions": [u1, format!("db+note://{m3}")]});
    let (s, _, mut stream) = listen(&gw, &scoped, "scoped", filter, sse).await;
    assert_eq!(s, 200);
    let ack = stream.next(Duration::from_secs(5)).await.expect("ack");
    assert_eq!(
        ack.data["params"]["notifications"],
        json!({"resourceSubscriptions": [u1]}),
        "{ack:?}"
    );
    assert!(!upstream_saw(&db, &format!("subscribe:note://{m3}")));
    gw.shutdown().await;
    github.kill();
    db.kill();
}

/// A handshake-era session subscribed to a stateless upstream's resource (which has no
/// subscribe pair): the gateway holds a listen of that URI upstream and routes its updates to
/// the session's `GET` stream (and one for the upstream's list changes); the URI's listen
/// closes when the session unsubscribes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_subscription_to_a_stateless_upstream_is_bridged() {
    let up = Upstream::start_async(Flavor::Sse).await;
    let gw = gateway::start(Backend::Sqlite, Some(&up.url), &[]).await;
    let (tok, _) = token(&gw, "agent-bridge").await;
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-11-25", "capabilities": {},
        "clientInfo": {"name": "raw", "version": "0"}}});
    let (s, h, v) = post(&gw, &tok, &[], &init).await;
    assert_eq!(s, 200, "{v}");
    let sid = h
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .expect("session id")
        .to_owned();
    let mut stream = open(&gw, &tok, &sid, None).await;
    let uri = format!("note://{}", marker("bridge"));
    rpc(&gw, &tok, &sid, "resources/subscribe", json!({"uri": uri})).await;
    let e = touch_until(&gw, &tok, &sid, &mut stream, json!({"uri": uri}), UPDATED).await;
    assert_eq!(e.data["params"]["uri"], uri.as_str(), "{e:?}");
    assert!(
        e.data["params"].get("_meta").is_none(),
        "the upstream's listen stamp is not the session's: {e:?}"
    );
    assert_eq!(
        upstream_listens(&up, &uri, "listen:"),
        [json!({"resourceSubscriptions": [uri]})]
    );
    // The upstream's list changes reach the stream too (a listen of its own, held by the gateway).
    let e = touch_until(
        &gw,
        &tok,
        &sid,
        &mut stream,
        json!({"uri": "-", "list_changed": true}),
        TOOLS_CHANGED,
    )
    .await;
    assert!(e.data["params"].get("_meta").is_none(), "{e:?}");
    rpc(
        &gw,
        &tok,
        &sid,
        "resources/unsubscribe",
        json!({"uri": uri}),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while upstream_listens(&up, &uri, "listen-closed:").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bridge stayed open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    gw.shutdown().await;
    up.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replay_window_is_the_configured_one() {
    let up = Upstream::start_async(Flavor::HandshakeSse).await;
    let gw = gateway::start(
        Backend::Sqlite,
        Some(&up.url),
        &["--stream-replay-events", "1"],
    )
    .await;
    let (a, _) = token(&gw, "agent-a").await;
    let sa = session(&gw, &a).await;
    let mut stream = open(&gw, &a, &sa, None).await;
    let uri = format!("note://{}", marker("window"));
    rpc(&gw, &a, &sa, "resources/subscribe", json!({"uri": uri})).await;
    let first = touch_until(&gw, &a, &sa, &mut stream, json!({"uri": uri}), UPDATED).await;
    let mut seen = first.id.expect("numbered");
    // A second long: a repeat of a retried touch arriving after `seen` would shift the ids
    // counted on below.
    while let Some(e) = stream.next(Duration::from_secs(1)).await {
        seen = seen.max(e.id.unwrap_or(0));
    }
    drop(stream);
    for _ in 0..2 {
        rpc(
            &gw,
            &a,
            &sa,
            "tools/call",
            json!({"name": "touch", "arguments": {"uri": uri}}),
        )
        .await;
    }
    // Both notifications travel from the upstream's stream to the hub after the calls return:
    // wait until the second is there. A stream resumed after the first of them gets the second
    // (replayed, or live if it comes later), whatever the window; it changes no window.
    let mut probe = open(&gw, &a, &sa, Some(seen + 1)).await;
    loop {
        let e = probe
            .next(Duration::from_secs(10))
            .await
            .expect("the second notification reached the hub");
        if e.id >= Some(seen + 2) {
            break;
        }
    }
    drop(probe);
    // Two were missed; a window of one event replays only the last.
    let mut resumed = open(&gw, &a, &sa, Some(seen)).await;
    let e = resumed
        .next(Duration::from_secs(5))
        .await
        .expect("replayed");
    assert_eq!(e.id, Some(seen + 2), "{e:?}");
    assert!(resumed.next(Duration::from_millis(300)).await.is_none());
    gw.shutdown().await;
    up.kill();
}
