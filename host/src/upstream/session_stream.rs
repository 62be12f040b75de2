//! The shared handshake-era session's own event stream (`GET` on the upstream's endpoint):
//! some servers (the TypeScript SDK's) send their requests to the client there rather than on
//! the stream of the call that caused them, and every server sends there what it announces
//! outside any call (resource updates, list changes), handed to the gateway's sink
//! ([`Calls::set_sink`], routed to the subscribed client sessions by [`crate::streams`]).
//!
//! The session is shared by every agent, and such a request names no call. So it is given to a
//! call only when it cannot belong to any other: exactly one call is in flight in the session,
//! and that call's client can be asked ([`Calls::route`]). Otherwise it is refused, so a
//! question meant for one agent never reaches another. This module must never relay a request
//! it cannot attribute, and never outlive its session.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{ACCEPT, CONTENT_TYPE};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::{Map, Value, json};

use super::message::{Events, sse_event_json};
use super::{ServerRequests, Session, session_headers};
use crate::mcp::jsonrpc::code;

/// The calls in flight in the shared session, and who can answer for each.
#[derive(Default)]
pub(super) struct Calls {
    state: Mutex<InSession>,
    /// Where notifications outside any call go.
    sink: std::sync::OnceLock<Arc<Notifications>>,
}

/// How long after one agent's call ended a request on the session's stream may still be its
/// own: the upstream may have sent it before that call's answer, on another connection, and it
/// can arrive after that call ended and another agent's began.
const STRAGGLER: Duration = Duration::from_secs(1);

#[derive(Default)]
struct InSession {
    calls: HashMap<u64, InCall>,
    /// When a call that could be asked (one with an owner) last ended, and whose it was; `None`
    /// as the owner when calls of several owners ended within [`STRAGGLER`] of each other.
    ended: Option<(Instant, Option<String>)>,
}

struct InCall {
    answer: Option<Arc<ServerRequests>>,
    /// No call of another owner was in flight beside this one, or had ended within
    /// [`STRAGGLER`] before it began: a request on the session's stream during it can only be
    /// this call's owner's.
    alone: bool,
}

fn owner_of(answer: &Option<Arc<ServerRequests>>) -> Option<&str> {
    answer.as_deref().map(ServerRequests::owner)
}

/// Takes a notification the upstream sent on its session's stream.
pub type Notifications = dyn Fn(Value) + Send + Sync;

/// Leaves [`Calls`] when the call ends.
pub(super) struct InFlight<'a> {
    calls: &'a Calls,
    id: u64,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.calls.state.lock() {
            let Some(call) = s.calls.remove(&self.id) else {
                return;
            };
            let Some(owner) = owner_of(&call.answer) else {
                return;
            };
            let now = Instant::now();
            let mixed = matches!(&s.ended, Some((at, last)) if now.duration_since(*at) < STRAGGLER
                && last.as_deref() != Some(owner));
            s.ended = Some((now, (!mixed).then(|| owner.to_owned())));
        }
    }
}

impl Calls {
    /// Records a call in flight until the guard drops. A call that can be asked stays alone
    /// while no other call, of another owner or of none (a list, a read: nobody can be asked
    /// for those), has been in flight beside it, and no call of another owner ended just
    /// before it began. A call of no owner that ended before it began does not count: the
    /// upstream's requests during such a call are refused on that call's own stream
    /// (`refuse_server_request`), and an agent's session starts with several of them.
    pub(super) fn enter(&self, id: u64, answer: Option<Arc<ServerRequests>>) -> InFlight<'_> {
        if let Ok(mut s) = self.state.lock() {
            let owner = owner_of(&answer).map(str::to_owned);
            let mut alone = owner.is_some();
            for other in s.calls.values_mut() {
                if owner.is_none() || owner_of(&other.answer) != owner.as_deref() {
                    other.alone = false;
                    alone = false;
                }
            }
            if let (Some(owner), Some((at, last))) = (owner.as_deref(), &s.ended)
                && at.elapsed() < STRAGGLER
                && last.as_deref() != Some(owner)
            {
                alone = false;
            }
            s.calls.insert(id, InCall { answer, alone });
        }
        InFlight { calls: self, id }
    }

    /// Sets where notifications outside any call go (once; later calls are ignored).
    pub(super) fn set_sink(&self, sink: Arc<Notifications>) {
        let _ = self.sink.set(sink);
    }

    fn notify(&self, message: Value) {
        if let Some(sink) = self.sink.get() {
            sink(message);
        }
    }

    /// Who answers a request that came on the session's stream: the one call in flight, when
    /// its client can be asked and no other agent's call shared the session with it (see
    /// [`InCall::alone`]).
    fn route(&self) -> Option<Arc<ServerRequests>> {
        let s = self.state.lock().ok()?;
        if s.calls.len() != 1 {
            return None;
        }
        let call = s.calls.values().next()?;
        if !call.alone {
            return None;
        }
        call.answer.clone()
    }
}

/// What the listener needs.
pub(super) struct Listener {
    pub(super) client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    pub(super) uri: Uri,
    pub(super) session: Weak<Session>,
    pub(super) calls: Arc<Calls>,
    pub(super) timeout: Duration,
    pub(super) max_response: usize,
    /// Told once the first attempt to open the stream has its answer (open, refused or
    /// failed): a call sent before the stream is open could ask the client something there
    /// that a server without an event store drops, and the call would never end.
    pub(super) opened: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Requests of the upstream on one session's stream answered at once: each holds a task, and
/// until it is answered a connection to the upstream. Past it a request is dropped unanswered
/// (an upstream sending thousands would otherwise exhaust the gateway's tasks and sockets).
const MAX_STREAM_REQUESTS: usize = 32;

/// How long the listener waits before opening the stream again after it ended.
const REOPEN: Duration = Duration::from_secs(1);

/// How often a quiet stream's listener looks whether its session is gone.
const SESSION_CHECK: Duration = Duration::from_secs(5);

/// How a request for the session's stream went.
enum Opening {
    Answered(hyper::Response<hyper::body::Incoming>),
    Failed,
    SessionGone,
}

/// Waits for the stream's headers for as long as the session lives. Some servers send them
/// only with the stream's first message (Node's `http` under the TypeScript SDK), so a quiet
/// stream is not a failed one: giving up on it would drop a stream the server holds open, and
/// its next request for a stream could be refused as a second one.
async fn headers_of(l: &Listener, req: Request<Full<Bytes>>) -> Opening {
    let mut pending = std::pin::pin!(l.client.request(req));
    loop {
        match tokio::time::timeout(l.timeout, &mut pending).await {
            Ok(Ok(r)) => return Opening::Answered(r),
            Ok(Err(_)) => return Opening::Failed,
            Err(_) if l.session.strong_count() == 0 => return Opening::SessionGone,
            Err(_) => {}
        }
    }
}

/// Reads the session's stream while the session lives; ends when the upstream does not offer
/// one (405) or the session is gone.
pub(super) async fn listen(mut l: Listener) {
    let answering = Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_REQUESTS));
    let mut dropped = 0u64;
    loop {
        let Some(session) = l.session.upgrade() else {
            return;
        };
        let headers = session_headers(&session);
        drop(session);
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(l.uri.clone())
            .header(ACCEPT, "text/event-stream");
        for (k, v) in &headers {
            req = req.header(k, v.clone());
        }
        let Ok(req) = req.body(Full::new(Bytes::new())) else {
            return;
        };
        let resp = headers_of(&l, req).await;
        if let Some(opened) = l.opened.take() {
            let _ = opened.send(());
        }
        let resp = match resp {
            Opening::Answered(r) => r,
            Opening::SessionGone => return,
            Opening::Failed => {
                tokio::time::sleep(REOPEN).await;
                continue;
            }
        };
        match resp.status() {
            StatusCode::OK => {}
            // The server has not noticed yet that the stream before this one ended.
            StatusCode::CONFLICT => {
                tokio::time::sleep(REOPEN).await;
                continue;
            }
            // No stream offered (405), or the session is gone: nothing to listen to.
            _ => return,
        }
        let mut body = resp.into_body();
        let mut events = Events::default();
        loop {
            while let Some(event) = events.next_event() {
                match sse_event_json(&event) {
                    Some(v) if v.get("method").is_some() && v.get("id").is_some() => {
                        // Not a match guard (as clippy suggests): a request that was answered
                        // would then fall through to the notification arm.
                        let answered = answer(&l, &headers, v, &answering);
                        if !answered {
                            dropped += 1;
                            if dropped.is_power_of_two() {
                                tracing::warn!(
                                    dropped,
                                    "upstream: requests on the session stream beyond {MAX_STREAM_REQUESTS} at once are dropped unanswered"
                                );
                            }
                        }
                    }
                    Some(v) if v.get("method").is_some() => l.calls.notify(v),
                    _ => {}
                }
            }
            if l.session.strong_count() == 0 {
                return;
            }
            // Woken now and then on a quiet stream, to end once its session is gone (a server
            // keeps a dropped session's stream open, silent, as long as the connection lives).
            let frame = match tokio::time::timeout(SESSION_CHECK, body.frame()).await {
                Ok(frame) => frame,
                Err(_) => continue,
            };
            match frame {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        if events.len() + data.len() > l.max_response {
                            events.clear(); // one event larger than any answer: dropped
                            continue;
                        }
                        events.push(&data);
                    }
                }
                _ => break,
            }
        }
        tokio::time::sleep(REOPEN).await;
    }
}

/// Answers one request of the upstream: through the one call it can belong to, or refused.
/// `false`: not taken, [`MAX_STREAM_REQUESTS`] are being answered.
fn answer(
    l: &Listener,
    headers: &[(hyper::header::HeaderName, hyper::header::HeaderValue)],
    request: Value,
    answering: &Arc<tokio::sync::Semaphore>,
) -> bool {
    let Ok(permit) = answering.clone().try_acquire_owned() else {
        return false;
    };
    let upstream_id = request.get("id").cloned().unwrap_or(Value::Null);
    let who = l.calls.route();
    let client = l.client.clone();
    let uri = l.uri.clone();
    let headers = headers.to_vec();
    let (timeout, max_response) = (l.timeout, l.max_response);
    tokio::spawn(async move {
        let _permit = permit;
        let mut reply = match who {
            Some(ask) => ask.ask(request).await,
            None => {
                let mut m = Map::new();
                m.insert(
                    "error".into(),
                    json!({"code": code::INTERNAL_ERROR,
                           "message": "the gateway cannot tell which call this request belongs to (several are in flight, or none whose client can be asked)"}),
                );
                m
            }
        };
        reply.insert("jsonrpc".into(), Value::from("2.0"));
        reply.insert("id".into(), upstream_id);
        let Ok(bytes) = serde_json::to_vec(&Value::Object(reply)) else {
            return;
        };
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(CONTENT_TYPE, "application/json")
            .header(ACCEPT, "application/json, text/event-stream");
        for (k, v) in &headers {
            req = req.header(k, v.clone());
        }
        let Ok(req) = req.body(Full::new(Bytes::from(bytes))) else {
            return;
        };
        match tokio::time::timeout(timeout, client.request(req)).await {
            Ok(Ok(resp)) => {
                let drain = Limited::new(resp.into_body(), max_response).collect();
                let _ = tokio::time::timeout(timeout, drain).await;
            }
            _ => tracing::warn!(
                "upstream: the reply to a request on the session stream was not delivered"
            ),
        }
    });
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asker(tenant: &str, jti: &str) -> Option<Arc<ServerRequests>> {
        Some(Arc::new(ServerRequests::new(tenant, jti, |_| {
            Box::pin(async { Map::new() })
        })))
    }

    fn routed_to(calls: &Calls) -> Option<String> {
        calls.route().map(|a| a.owner().to_owned())
    }

    #[test]
    fn a_lone_call_is_asked_and_an_owner_may_follow_itself() {
        let calls = Calls::default();
        {
            let _a = calls.enter(1, asker("acme", "t1"));
            assert_eq!(routed_to(&calls), Some("4:acmet1".into()));
        }
        assert_eq!(routed_to(&calls), None, "no call in flight");
        // The same token's next call, at once: a straggler of the first is its own.
        let _b = calls.enter(2, asker("acme", "t1"));
        assert_eq!(routed_to(&calls), Some("4:acmet1".into()));
    }

    #[test]
    fn a_call_that_shared_the_session_with_another_agent_is_never_asked() {
        let calls = Calls::default();
        let a = calls.enter(1, asker("acme", "t1"));
        let b = calls.enter(2, asker("other", "t2"));
        assert_eq!(routed_to(&calls), None, "two in flight");
        drop(a);
        // Only b is left, but a request sent during a's call may still arrive now.
        assert_eq!(routed_to(&calls), None, "b shared the session with a");
        drop(b);
        // A different tenant with the same token id is another owner.
        let c = calls.enter(3, asker("acme", "t2"));
        assert_eq!(
            routed_to(&calls),
            None,
            "b's call ended just before c's began"
        );
        drop(c);
    }

    #[test]
    fn a_call_just_after_another_agents_is_not_asked() {
        let calls = Calls::default();
        drop(calls.enter(1, asker("acme", "t1")));
        let _b = calls.enter(2, asker("acme", "t2"));
        assert_eq!(routed_to(&calls), None);
    }

    #[test]
    fn calls_nobody_can_be_asked_for_count_only_while_beside_one() {
        let calls = Calls::default();
        // A session begins with lists and reads: they do not make the call after them share.
        drop(calls.enter(1, None));
        let a = calls.enter(2, asker("acme", "t1"));
        assert_eq!(routed_to(&calls), Some("4:acmet1".into()));
        // A read beside the call: the upstream may ask during either.
        let read = calls.enter(3, None);
        assert_eq!(routed_to(&calls), None);
        drop(read);
        assert_eq!(
            routed_to(&calls),
            None,
            "the read shared the session with a"
        );
        drop(a);
        // A call whose client cannot be asked is never routed to.
        let _n = calls.enter(4, None);
        assert_eq!(routed_to(&calls), None);
    }

    /// A flood of requests on the session's stream, none answered yet: only
    /// [`MAX_STREAM_REQUESTS`] are taken (a task each); the rest are refused at once.
    #[tokio::test]
    async fn requests_on_the_stream_are_answered_a_bounded_number_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let asked = Arc::new(AtomicUsize::new(0));
        let counted = asked.clone();
        let calls = Arc::new(Calls::default());
        let ask = Arc::new(ServerRequests::new("acme", "t1", move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            Box::pin(std::future::pending())
        }));
        let tls = crate::tls::plaintext_only().expect("tls");
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(Arc::unwrap_or_clone(tls))
            .https_or_http()
            .enable_http1()
            .build();
        let l = Listener {
            client: Client::builder(hyper_util::rt::TokioExecutor::new()).build(connector),
            uri: Uri::from_static("http://127.0.0.1:9/mcp"),
            session: Weak::new(),
            calls: calls.clone(),
            timeout: Duration::from_secs(5),
            max_response: 1 << 20,
            opened: None,
        };
        let _call = calls.enter(1, Some(ask));
        let answering = Arc::new(tokio::sync::Semaphore::new(MAX_STREAM_REQUESTS));
        let taken = (0..1000)
            .filter(|i| answer(&l, &[], json!({"method": "x", "id": i}), &answering))
            .count();
        assert_eq!(taken, MAX_STREAM_REQUESTS);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(asked.load(Ordering::SeqCst), MAX_STREAM_REQUESTS);
    }

    #[test]
    fn owners_are_told_apart_by_tenant_and_token() {
        let a = ServerRequests::new("ab", "c", |_| Box::pin(async { Map::new() }));
        let b = ServerRequests::new("a", "bc", |_| Box::pin(async { Map::new() }));
        assert_ne!(a.owner(), b.owner());
    }
}
