//! `subscriptions/listen` (MCP 2026-07-28, SEP-2575): a stateless client's stream of change
//! notifications (resource updates, list changes), authorized and relayed through the gateway.
//!
//! The request's filter is decided before anything is opened:
//! - each URI of `resourceSubscriptions` goes through the pipeline as `resources/subscribe`
//!   does (kind `resource`, operation `subscribe`, audited); a URI the token may not subscribe
//!   to, or that routes to no upstream, is left out of the honored filter rather than refusing
//!   the whole request (the specification lets a server honor a subset: the acknowledgment
//!   says which, and nothing outside it is ever sent);
//! - the list-change flags need only the authenticated token; they are asked of every upstream
//!   the token reaches.
//!
//! Then, per upstream (URIs renamed to the upstream's own): a stateless upstream gets its own
//! `subscriptions/listen` ([`crate::upstream::UpstreamListen`]), read as it arrives; a
//! handshake-era upstream is subscribed on the gateway's shared session (as a session's
//! `resources/subscribe` is) and its announcements come through the [`crate::streams`] hub,
//! under a key of this stream's own. The client's acknowledgment is the first frame: what was
//! authorized and what the upstreams acknowledged. Every later frame is within that filter,
//! its URI as the agent knows it, stamped with the listen request's id
//! (`_meta["io.modelcontextprotocol/subscriptionId"]`).
//!
//! Bounded and revocable as `GET /v1/mcp` is: the client's channel holds at most the hub's
//! live bound (a client that does not read is cut off; there is no replay, the client listens
//! again), the token is re-checked every second (revoked or expired: a typed `-32010` answer
//! ends the stream, and the upstream listens close), and the stream ends when the client goes.
//! When every upstream part ended gracefully, the client gets a `SubscriptionsListenResult`;
//! an abrupt end upstream ends the client's stream abruptly too. This module must never relay
//! a frame outside the honored filter, never open a subscription the pipeline did not permit,
//! and never keep a stream open after its token stopped verifying.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::{Response, StatusCode};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::{McpService, rpc_response, upstream_rpc_error};
use crate::capability::Grant;
use crate::http::{self, Body};
use crate::mcp::accepts_event_stream;
use crate::mcp::era::{Envelope, Era};
use crate::mcp::jsonrpc::{self, Id, Request as RpcRequest, RpcError, code};
use crate::pipeline::{CallKind, Permit, ToolCall};
use crate::upstream::{ListenFrame, Reply, UpstreamEra, UpstreamError};

/// The `_meta` key stamped on every frame of a listen stream: the listen request's id.
pub const SUBSCRIPTION_ID: &str = "io.modelcontextprotocol/subscriptionId";

/// How often a live stream re-checks its token.
const RECHECK: Duration = Duration::from_secs(1);
/// A keep-alive comment every this many re-checks.
const KEEPALIVE_EVERY: u32 = 15;

/// The list-change flags of a `SubscriptionFilter`, with the method each one admits.
const FLAGS: [(&str, &str); 3] = [
    ("toolsListChanged", "notifications/tools/list_changed"),
    ("promptsListChanged", "notifications/prompts/list_changed"),
    (
        "resourcesListChanged",
        "notifications/resources/list_changed",
    ),
];
const UPDATED: &str = "notifications/resources/updated";

/// A listen request, owned for the stream's task.
pub(super) struct Owned {
    pub svc: Arc<McpService>,
    pub grant: Grant,
    pub headers: hyper::HeaderMap,
    pub remote: SocketAddr,
    pub era: Era,
    pub rpc: RpcRequest,
}

/// What the client asked for.
#[derive(Debug, Default)]
struct Requested {
    flags: Vec<&'static str>,
    uris: Vec<String>,
}

/// What the stream delivers: the acknowledged filter.
#[derive(Debug, Default, Clone)]
struct Honored {
    flags: HashSet<&'static str>,
    /// As the agent knows them.
    uris: HashSet<String>,
}

impl Honored {
    /// Whether a message (method, exposed URI) is within the filter.
    fn admits(&self, method: &str, uri: Option<&str>) -> bool {
        if method == UPDATED {
            return uri.is_some_and(|u| self.uris.contains(u));
        }
        FLAGS
            .iter()
            .any(|(flag, m)| *m == method && self.flags.contains(flag))
    }

    /// The `SubscriptionFilter` of the acknowledgment (false flags and an empty list omitted).
    fn filter(&self, order: &[String]) -> Value {
        let mut f = Map::new();
        for (flag, _) in FLAGS {
            if self.flags.contains(flag) {
                f.insert(flag.into(), Value::Bool(true));
            }
        }
        let uris: Vec<&String> = order.iter().filter(|u| self.uris.contains(*u)).collect();
        if !uris.is_empty() {
            f.insert("resourceSubscriptions".into(), json!(uris));
        }
        Value::Object(f)
    }
}

fn invalid(why: &str) -> RpcError {
    RpcError::new(code::INVALID_PARAMS, "Invalid params").with_data(Value::from(why))
}

/// Reads `params.notifications` (a `SubscriptionFilter`).
fn requested(params: &Map<String, Value>, max_uris: usize) -> Result<Requested, RpcError> {
    let Some(Value::Object(f)) = params.get("notifications") else {
        return Err(invalid("params.notifications must be an object"));
    };
    let mut out = Requested::default();
    for (flag, _) in FLAGS {
        match f.get(flag) {
            None | Some(Value::Null | Value::Bool(false)) => {}
            Some(Value::Bool(true)) => out.flags.push(flag),
            Some(_) => return Err(invalid(&format!("notifications.{flag} must be a boolean"))),
        }
    }
    match f.get("resourceSubscriptions") {
        None | Some(Value::Null) => {}
        Some(Value::Array(uris)) => {
            let mut seen = std::collections::HashSet::new();
            for u in uris {
                match u.as_str() {
                    Some(s) if !s.is_empty() => {
                        // Linear, and refused at the first URI past the limit: a body of a
                        // hundred thousand URIs must not hold a worker.
                        if !seen.insert(s) {
                            continue;
                        }
                        if out.uris.len() == max_uris {
                            return Err(too_many(max_uris));
                        }
                        out.uris.push(s.to_owned());
                    }
                    _ => {
                        return Err(invalid(
                            "notifications.resourceSubscriptions must hold non-empty strings",
                        ));
                    }
                }
            }
        }
        Some(_) => {
            return Err(invalid(
                "notifications.resourceSubscriptions must be an array",
            ));
        }
    }
    Ok(out)
}

fn too_many(max_uris: usize) -> RpcError {
    invalid(&format!(
        "at most {max_uris} resourceSubscriptions in one listen request"
    ))
}

/// One URI the pipeline permitted: where it goes, and its permit.
struct Permitted {
    exposed: String,
    upstream: String,
    original: String,
    permit: Permit,
}

/// One frame toward the client's stream, or the end of an upstream part.
enum Inbound {
    Frame(Value),
    Ended { graceful: bool },
}

/// Answers `subscriptions/listen` (stateless era, `/v1/mcp`).
pub(super) async fn open(o: Owned) -> Response<Body> {
    let id: Id = o.rpc.id.clone().unwrap_or(Value::Null);
    let refuse = |status: StatusCode, err: &RpcError| rpc_response(status, Some(&id), err);
    if !accepts_event_stream(&o.headers) {
        let err = RpcError::new(code::INVALID_REQUEST, "Not Acceptable").with_data(Value::from(
            "subscriptions/listen answers with text/event-stream only",
        ));
        return refuse(StatusCode::NOT_ACCEPTABLE, &err);
    }
    let Some(token) = http::bearer(&o.headers).map(str::to_owned) else {
        let err = RpcError::new(code::CAPABILITY, "capability check failed")
            .with_data(Value::from("missing bearer capability token"));
        return refuse(StatusCode::UNAUTHORIZED, &err);
    };
    let limits = o.svc.streams.limits();
    let asked = match requested(&o.rpc.params, limits.subscriptions) {
        Ok(r) => r,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e),
    };
    // Every listen stream has an entry in the hub: it counts against the hub's bound on
    // streams, and carries what a handshake-era upstream announces.
    let hub_key = format!("listen:{}", next_key());
    let hub = match o.streams_open(&hub_key, &token) {
        Ok(opened) => opened.events,
        Err(e) => {
            let err = RpcError::new(code::INTERNAL_ERROR, "stream refused")
                .with_data(Value::from(e.to_string()));
            return refuse(StatusCode::SERVICE_UNAVAILABLE, &err);
        }
    };
    let permitted = decide_uris(&o, &asked.uris).await;

    // Each upstream's part: the flags (every upstream the token reaches), its permitted URIs.
    let relay = match &o.era {
        Era::Modern(env) => Some(env),
        Era::Handshake => None,
    };
    let svc = &o.svc;
    let parts: Vec<(&str, Vec<&Permitted>)> = svc
        .upstreams
        .iter()
        .filter(|(n, _)| o.grant.reaches(n))
        .map(|(n, _)| (n, permitted.iter().filter(|p| p.upstream == n).collect()))
        .filter(|(_, uris): &(&str, Vec<&Permitted>)| !asked.flags.is_empty() || !uris.is_empty())
        .collect();
    let owned = &o;
    let (token_ref, key_ref, flags) = (token.as_str(), hub_key.as_str(), &asked.flags);
    let opened = crate::upstreams::join_all(parts.iter().map(|(name, uris)| async move {
        let outcome = open_part(
            &owned.svc,
            &owned.grant,
            token_ref,
            key_ref,
            name,
            flags,
            uris,
            relay,
        )
        .await;
        if let Err(e) = &outcome {
            tracing::debug!(upstream = %name, error = %e, "listen: upstream part not opened");
            for p in uris {
                record_failure(owned, p, e).await;
            }
        }
        (*name, outcome)
    }))
    .await;

    let mut honored = Honored::default();
    let mut modern = Vec::new();
    let mut hub_part = false;
    let mut failure = None;
    for (name, outcome) in opened {
        match outcome {
            Ok(Part::Modern(stream, part_honored)) => {
                honored.flags.extend(part_honored.flags.iter().copied());
                honored.uris.extend(part_honored.uris.iter().cloned());
                modern.push((name.to_owned(), stream, part_honored));
            }
            Ok(Part::Hub(part_honored)) => {
                hub_part = true;
                honored.flags.extend(part_honored.flags.iter().copied());
                honored.uris.extend(part_honored.uris.iter().cloned());
            }
            Err(e) => {
                failure.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failure
        && modern.is_empty()
        && !hub_part
    {
        end_hub(svc, &hub_key).await;
        let err = upstream_rpc_error(&e);
        return refuse(StatusCode::OK, &err);
    }

    // The acknowledgment first, then the pump.
    let stamp = json!({SUBSCRIPTION_ID: id.clone()});
    let ack = json!({"jsonrpc": "2.0", "method": crate::upstream::ACKNOWLEDGED,
        "params": {"notifications": honored.filter(&asked.uris), "_meta": stamp}});
    let (tx, rx) = mpsc::channel::<Bytes>(limits.live.max(2));
    let _ = tx.try_send(sse(&ack));
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(limits.live.max(2));
    let readers: Vec<JoinHandle<()>> = modern
        .into_iter()
        .map(|(name, stream, part_honored)| {
            let ups = Arc::clone(&svc.upstreams);
            tokio::spawn(read_part(ups, name, stream, part_honored, in_tx.clone()))
        })
        .collect();
    drop(in_tx);
    let pump = Pump {
        svc: Arc::downgrade(&o.svc),
        token,
        jti: o.grant.jti.clone(),
        id,
        honored,
        parts: readers.len(),
        hub_key,
        hub_part,
    };
    tokio::spawn(pump.run(readers, in_rx, hub, tx));
    let mut resp = Response::new(http::channel(rx));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// A process-wide sequence for the hub keys of listen streams (the hub is per replica).
fn next_key() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

fn sse(message: &Value) -> Bytes {
    Bytes::from(format!("event: message\ndata: {message}\n\n"))
}

/// Each URI decided as `resources/subscribe` would be; the permitted ones, routed.
async fn decide_uris(o: &Owned, uris: &[String]) -> Vec<Permitted> {
    let arguments = json!({"operation": "subscribe"});
    let mut out = Vec::new();
    for uri in uris {
        let route = match o.svc.upstreams.route_uri(uri) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => {
                tracing::debug!("listen: a URI routes to no upstream; not honored");
                continue;
            }
        };
        let call = tool_call(o, uri, &arguments, Some(route.name));
        match o.svc.pipeline.decide(&call).await {
            Ok(permit) => out.push(Permitted {
                exposed: uri.clone(),
                upstream: route.name.to_owned(),
                original: route.original.to_owned(),
                permit,
            }),
            Err(d) => {
                tracing::debug!(reason = %d, "listen: a URI was refused; not honored");
            }
        }
    }
    out
}

fn tool_call<'a>(
    o: &'a Owned,
    uri: &'a str,
    arguments: &'a Value,
    upstream: Option<&'a str>,
) -> ToolCall<'a> {
    ToolCall {
        grant: &o.grant,
        kind: CallKind::Resource,
        tool: uri,
        arguments,
        intent_prompt: http::header_str(&o.headers, "x-intent-prompt"),
        agent: http::header_str(&o.headers, "x-intentgate-agent"),
        remote_ip: o.remote.ip().to_string(),
        session_id: None,
        round: None,
        approval_id: http::header_str(&o.headers, "x-intentgate-approval-id"),
        upstream,
    }
}

/// Records that a permitted subscription did not reach its upstream.
async fn record_failure(o: &Owned, p: &Permitted, e: &UpstreamError) {
    let arguments = json!({"operation": "subscribe"});
    let call = tool_call(o, &p.exposed, &arguments, Some(&p.upstream));
    o.svc
        .pipeline
        .record_upstream_failure(&call, &p.permit, e.status(), &e.to_string())
        .await;
}

/// One upstream's part of the stream, once open.
enum Part {
    Modern(crate::upstream::UpstreamListen, Honored),
    Hub(Honored),
}

/// Opens one upstream's part: its own listen (stateless), or subscriptions on the shared
/// session routed through the hub (handshake era).
#[allow(clippy::too_many_arguments)]
async fn open_part(
    svc: &McpService,
    grant: &Grant,
    token: &str,
    hub_key: &str,
    name: &str,
    flags: &[&'static str],
    uris: &[&Permitted],
    relay: Option<&Envelope>,
) -> Result<Part, UpstreamError> {
    let upstream = svc
        .upstreams
        .get(name)
        .ok_or(UpstreamError::NotConfigured)?;
    let era = upstream.era().await;
    svc.upstreams.note(Some(name), &era);
    match era? {
        UpstreamEra::Modern(_) => {
            let mut filter = Map::new();
            for flag in flags {
                filter.insert((*flag).into(), Value::Bool(true));
            }
            if !uris.is_empty() {
                let originals: Vec<&str> = uris.iter().map(|p| p.original.as_str()).collect();
                filter.insert("resourceSubscriptions".into(), json!(originals));
            }
            let opened = upstream.open_listen(filter, relay).await;
            svc.upstreams.note(Some(name), &opened);
            let stream = opened?;
            // Honored: what was asked and the upstream acknowledged.
            let acked = &stream.honored;
            let mut honored = Honored::default();
            for flag in flags {
                if acked.get(*flag) == Some(&Value::Bool(true)) {
                    honored.flags.insert(flag);
                }
            }
            let acked_uris: HashSet<&str> = acked
                .get("resourceSubscriptions")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for p in uris {
                if acked_uris.contains(p.original.as_str()) {
                    honored.uris.insert(p.exposed.clone());
                }
            }
            Ok(Part::Modern(stream, honored))
        }
        UpstreamEra::Handshake => {
            // The hub hears the shared session's stream once the session is open.
            let profile = upstream.profile().await;
            svc.upstreams.note(Some(name), &profile);
            profile?;
            let mut honored = Honored::default();
            honored.flags.extend(flags.iter().copied());
            let mut failure = None;
            for p in uris {
                if let Err(e) = svc.streams.subscribe(hub_key, grant, token, &p.exposed) {
                    tracing::debug!(error = %e, "listen: hub refused a subscription");
                    continue;
                }
                let params = Map::from_iter([("uri".to_owned(), Value::from(p.original.clone()))]);
                let decided = json!({"operation": "subscribe"});
                let Ok(cleared) =
                    (p.permit).clear(CallKind::Resource, &p.exposed, &decided, &p.original)
                else {
                    svc.streams.unsubscribe(hub_key, &p.exposed);
                    continue;
                };
                let reply = upstream
                    .forward_permitted(cleared, "resources/subscribe", params, None)
                    .await;
                svc.upstreams.note(Some(name), &reply);
                match reply {
                    Ok(r) if matches!(r.reply, Reply::Result(_)) => {
                        honored.uris.insert(p.exposed.clone());
                    }
                    Ok(_) => {
                        svc.streams.unsubscribe(hub_key, &p.exposed);
                    }
                    Err(e) => {
                        svc.streams.unsubscribe(hub_key, &p.exposed);
                        failure.get_or_insert(e);
                    }
                }
            }
            match failure {
                Some(e) if honored.uris.is_empty() && flags.is_empty() => Err(e),
                _ => Ok(Part::Hub(honored)),
            }
        }
    }
}

/// Ends the hub's part of a stream: its subscriptions, and the upstream's where no one else
/// subscribes any more.
async fn end_hub(svc: &McpService, key: &str) {
    let orphaned = svc.streams.end(key);
    crate::streams::listen::release(svc, orphaned).await;
}

impl Owned {
    fn streams_open(
        &self,
        key: &str,
        token: &str,
    ) -> Result<crate::streams::Opened, crate::streams::HubError> {
        self.svc.streams.open(key, &self.grant, token, None)
    }
}

/// Reads one stateless upstream's listen stream: each change within the part's honored filter,
/// its URI as the agent knows it, toward the pump; then the part's end.
async fn read_part(
    ups: Arc<crate::upstreams::Upstreams>,
    name: String,
    mut stream: crate::upstream::UpstreamListen,
    honored: Honored,
    tx: mpsc::Sender<Inbound>,
) {
    let graceful = loop {
        let frame = match stream.next().await {
            Ok(Some(f)) => f,
            Ok(None) => break false,
            Err(e) => {
                tracing::debug!(upstream = %name, error = %e, "listen: upstream stream failed");
                break false;
            }
        };
        let message = match frame {
            ListenFrame::End(Reply::Result(_)) => break true,
            ListenFrame::End(Reply::Error(e)) => {
                tracing::debug!(upstream = %name, error = %e, "listen: upstream ended with an error");
                break false;
            }
            ListenFrame::Notification(m) => m,
        };
        let method = message.get("method").and_then(Value::as_str).unwrap_or("");
        let uri = message
            .pointer("/params/uri")
            .and_then(Value::as_str)
            .map(|u| ups.expose_uri(&name, u));
        if !honored.admits(method, uri.as_deref()) {
            continue;
        }
        let mut params = Map::new();
        if let Some(u) = uri {
            params.insert("uri".into(), Value::from(u));
        }
        let out = json!({"jsonrpc": "2.0", "method": method, "params": params});
        if tx.send(Inbound::Frame(out)).await.is_err() {
            return;
        }
    };
    let _ = tx.send(Inbound::Ended { graceful }).await;
}

/// The JSON message of a hub event (`id:`/`event:`/`data:` lines).
fn hub_message(event: &[u8]) -> Option<Value> {
    let text = std::str::from_utf8(event).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("data: "))
        .and_then(|d| serde_json::from_str(d).ok())
}

/// Moves one listen stream's frames to its client.
struct Pump {
    svc: std::sync::Weak<McpService>,
    token: String,
    jti: String,
    id: Id,
    honored: Honored,
    /// Stateless upstream parts still open.
    parts: usize,
    /// The stream's key in the hub.
    hub_key: String,
    /// Whether a handshake-era upstream is part of the stream (through the hub).
    hub_part: bool,
}

/// Why a pump stopped.
enum Stop {
    /// The client went, or could not keep up (cut off): nothing more is written.
    Client,
    /// Every upstream part ended gracefully: the listen's result ends the stream.
    Graceful,
    /// An upstream part, or the hub, ended the stream without an answer.
    Abrupt,
    /// The token stopped verifying.
    Revoked,
}

impl Pump {
    async fn run(
        mut self,
        readers: Vec<JoinHandle<()>>,
        mut inbound: mpsc::Receiver<Inbound>,
        mut hub: mpsc::Receiver<Bytes>,
        tx: mpsc::Sender<Bytes>,
    ) {
        let stop = self.pump(&mut inbound, &mut hub, &tx).await;
        for r in &readers {
            r.abort(); // drops the upstream stream: its connection closes, ending its listen
        }
        let stamp = json!({SUBSCRIPTION_ID: self.id.clone()});
        match stop {
            Stop::Graceful => {
                let result = json!({"resultType": "complete", "_meta": stamp});
                let end = json!({"jsonrpc": "2.0", "id": self.id, "result": result});
                let _ = tx.try_send(sse(&end));
            }
            Stop::Revoked => {
                let err = RpcError::new(code::CAPABILITY, "capability check failed").with_data(
                    Value::from("the token no longer verifies (revoked or expired)"),
                );
                let end = jsonrpc::error(Some(&self.id), &err);
                let _ = tx.try_send(Bytes::from(format!(
                    "event: message\ndata: {}\n\n",
                    String::from_utf8_lossy(&end)
                )));
            }
            Stop::Client | Stop::Abrupt => {}
        }
        drop(tx);
        if let Some(svc) = self.svc.upgrade() {
            end_hub(&svc, &self.hub_key).await;
        }
    }

    /// Why the stream must stop now, if it must: its token no longer verifies, or the
    /// gateway is gone.
    fn check(&self) -> Option<Stop> {
        let Some(svc) = self.svc.upgrade() else {
            return Some(Stop::Abrupt);
        };
        (!crate::streams::listen::still_valid(&svc, &self.token, &self.jti))
            .then_some(Stop::Revoked)
    }

    async fn pump(
        &mut self,
        inbound: &mut mpsc::Receiver<Inbound>,
        hub: &mut mpsc::Receiver<Bytes>,
        tx: &mpsc::Sender<Bytes>,
    ) -> Stop {
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        let mut abrupt = false;
        let mut parts_open = self.parts > 0;
        loop {
            let message = tokio::select! {
                m = inbound.recv(), if parts_open => match m {
                    Some(Inbound::Frame(v)) => Some(v),
                    Some(Inbound::Ended { graceful }) => {
                        abrupt |= !graceful;
                        self.parts = self.parts.saturating_sub(1);
                        if self.parts == 0 && !self.hub_part {
                            return if abrupt { Stop::Abrupt } else { Stop::Graceful };
                        }
                        None
                    }
                    None => {
                        parts_open = false;
                        if !self.hub_part {
                            return if abrupt { Stop::Abrupt } else { Stop::Graceful };
                        }
                        None
                    }
                },
                e = hub.recv() => match e {
                    Some(event) => hub_message(&event),
                    // The hub cut the stream: too slow, or ended by the sweeper (whose
                    // token re-check may come before this stream's own).
                    None => return self.check().unwrap_or(Stop::Abrupt),
                },
                () = tx.closed() => return Stop::Client,
                _ = tick.tick() => {
                    if let Some(stop) = self.check() {
                        return stop;
                    }
                    ticks += 1;
                    if ticks.is_multiple_of(KEEPALIVE_EVERY) {
                        let _ = tx.try_send(Bytes::from_static(b": keepalive\n\n"));
                    }
                    None
                }
            };
            let Some(mut message) = message else { continue };
            let method = message.get("method").and_then(Value::as_str).unwrap_or("");
            let uri = message.pointer("/params/uri").and_then(Value::as_str);
            if !self.honored.admits(method, uri) {
                continue;
            }
            // Stamped with this listen's id (whatever `_meta` the upstream sent is its own).
            let mut params = match message.get_mut("params").map(Value::take) {
                Some(Value::Object(p)) => p,
                _ => Map::new(),
            };
            params.insert("_meta".into(), json!({SUBSCRIPTION_ID: self.id.clone()}));
            message["params"] = Value::Object(params);
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(sse(&message)) {
                tracing::debug!("listen: client too slow; stream cut off");
                return Stop::Client;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_is_read_and_bounded() {
        let p = json!({"notifications": {"toolsListChanged": true, "promptsListChanged": false,
            "resourceSubscriptions": ["a", "b", "a"]}});
        let r = requested(p.as_object().expect("object"), 8).expect("valid");
        assert_eq!(r.flags, ["toolsListChanged"]);
        assert_eq!(r.uris, ["a", "b"]);
        let bad = [
            json!({}),
            json!({"notifications": {"toolsListChanged": "yes"}}),
            json!({"notifications": {"resourceSubscriptions": [1]}}),
            json!({"notifications": {"resourceSubscriptions": ["a", "b", "c"]}}),
        ];
        for b in bad {
            let e = requested(b.as_object().expect("object"), 2).expect_err("refused");
            assert_eq!(e.code, code::INVALID_PARAMS, "{b}");
        }
        // Refused at the first URI past the limit, before the rest is read: a body of many
        // thousands of URIs costs no more than the limit's worth.
        let mut many: Vec<Value> = (0..200_000).map(|i| Value::from(format!("u{i}"))).collect();
        many.push(Value::from(1));
        let p = json!({"notifications": {"resourceSubscriptions": many}});
        let e = requested(p.as_object().expect("object"), 256).expect_err("refused");
        assert!(
            e.data
                .as_ref()
                .is_some_and(|d| d.to_string().contains("at most 256")),
            "{e:?}"
        );
        // Repeats do not count toward it.
        let p = json!({"notifications": {"resourceSubscriptions": ["a", "b", "a", "b", "a"]}});
        assert!(requested(p.as_object().expect("object"), 2).is_ok());
    }

    #[test]
    fn only_the_honored_filter_is_admitted_and_acknowledged() {
        let mut h = Honored::default();
        h.flags.insert("toolsListChanged");
        h.uris.insert("db+note://x".into());
        assert!(h.admits("notifications/tools/list_changed", None));
        assert!(!h.admits("notifications/prompts/list_changed", None));
        assert!(h.admits(UPDATED, Some("db+note://x")));
        assert!(!h.admits(UPDATED, Some("note://x")));
        assert!(!h.admits(UPDATED, None));
        assert!(!h.admits("notifications/message", None));
        let order = ["note://y".to_owned(), "db+note://x".to_owned()];
        assert_eq!(
            h.filter(&order),
            json!({"toolsListChanged": true, "resourceSubscriptions": ["db+note://x"]})
        );
        assert_eq!(Honored::default().filter(&order), json!({}));
    }
}
