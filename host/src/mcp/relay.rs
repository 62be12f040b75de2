//! Requests a handshake-era upstream sends the client while it works on a call
//! (`sampling/createMessage`, `elicitation/create`), relayed to the agent whose call caused
//! them, and the agent's replies carried back.
//!
//! The gateway holds one session toward the upstream for every agent, so an upstream request
//! is tied to the agent through the call it arrived on: it is sent on that call's event stream
//! under a fresh, unguessable id ([`Relays::register`]), and only a reply POSTed with the same
//! token (tenant and token id) is taken for it ([`Relays::deliver`]). A call whose client does
//! not take an event stream refuses the upstream's request at once (`upstream.rs`).
//!
//! A 2026-07-28 client cannot be asked during a call: when its call goes to a handshake-era
//! upstream, the call is held open ([`HeldCall`], kept by [`Relays::hold`]) and each request is
//! handed to the client as an input-required result; the client's retry resumes it
//! ([`Relays::resume`], same token only). Every request is decided first
//! (`crate::proxy::ask::Asking::decide`).
//!
//! This module must never deliver a reply to another token's request, never resume another
//! token's held call, never keep a request waiting (or a call held) past [`REPLY_TIMEOUT`], and
//! never hold more than [`MAX_PENDING`] of either at once, [`MAX_PENDING_PER_TENANT`] for one
//! tenant.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::jsonrpc::code;

/// The server-to-client methods relayed; anything else is refused.
pub const RELAYED: &[&str] = &["sampling/createMessage", "elicitation/create", "roots/list"];

/// How long an agent has to answer a relayed request (a person may be filling a form).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(300);

/// Most relayed requests waiting for a reply in this process (and most calls held open).
pub const MAX_PENDING: usize = 4096;

/// Of those, the most one tenant may have waiting (or held): one tenant's calls must not
/// leave every other tenant's upstream requests refused.
pub const MAX_PENDING_PER_TENANT: usize = MAX_PENDING / 4;

struct Waiting {
    tenant: String,
    token: String,
    reply: oneshot::Sender<Value>,
}

/// Relayed requests waiting for their agent's reply, and the calls held open for them.
#[derive(Default)]
pub struct Relays {
    waiting: Mutex<HashMap<String, Waiting>>,
    held: Mutex<HashMap<String, HeldCall>>,
}

/// What a held call's upstream sends: requests to relay (under their `igq-` ids, see
/// [`Relays::relay`]) and the call's notifications.
pub type HeldEvents = mpsc::Receiver<Value>;

/// How a held call ended.
pub type HeldDone =
    tokio::task::JoinHandle<Result<crate::upstream::Relayed, crate::upstream::UpstreamError>>;

/// A handshake-era upstream's call held open while its 2026-07-28 client answers, in its next
/// request, what the upstream asked (handed to it as an input-required result). Dropped (and
/// the call ended) when nobody resumes it within [`REPLY_TIMEOUT`].
pub struct HeldCall {
    tenant: String,
    token: String,
    since: std::time::Instant,
    pub events: HeldEvents,
    pub done: HeldDone,
}

impl HeldCall {
    pub fn new(tenant: &str, token: &str, events: HeldEvents, done: HeldDone) -> Self {
        Self {
            tenant: tenant.to_owned(),
            token: token.to_owned(),
            since: std::time::Instant::now(),
            events,
            done,
        }
    }
}

impl Drop for HeldCall {
    fn drop(&mut self) {
        // Not resumed (or its client went away): the upstream's call ends with it.
        self.done.abort();
    }
}

impl Relays {
    /// A fresh id for a request relayed to the agent of `tenant`/`token` (a token's own key, `Grant::token_key`), and where its reply
    /// arrives. `None` when too many are waiting.
    fn register(&self, tenant: &str, token: &str) -> Option<(String, oneshot::Receiver<Value>)> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).ok()?;
        let id = format!(
            "igq-{}",
            bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiting.lock().ok()?;
        // Replies that will never come (their call ended) are dropped here.
        w.retain(|_, v| !v.reply.is_closed());
        let tenants = w.values().filter(|v| v.tenant == tenant).count();
        if w.len() >= MAX_PENDING || tenants >= MAX_PENDING_PER_TENANT {
            return None;
        }
        w.insert(
            id.clone(),
            Waiting {
                tenant: tenant.to_owned(),
                token: token.to_owned(),
                reply: tx,
            },
        );
        Some((id, rx))
    }

    fn forget(&self, id: &str) {
        if let Ok(mut w) = self.waiting.lock() {
            w.remove(id);
        }
    }

    /// Keeps `call` until its client resumes it under `id` (the id of the request it was
    /// asked). `false` when too many are held.
    pub fn hold(&self, id: &str, call: HeldCall) -> bool {
        let Ok(mut h) = self.held.lock() else {
            return false;
        };
        h.retain(|_, c| c.since.elapsed() < REPLY_TIMEOUT);
        let tenants = h.values().filter(|c| c.tenant == call.tenant).count();
        if h.len() >= MAX_PENDING || tenants >= MAX_PENDING_PER_TENANT {
            return false;
        }
        h.insert(id.to_owned(), call);
        true
    }

    /// The call held under `id` for this token, taken out to resume it; not one held past
    /// [`REPLY_TIMEOUT`].
    pub fn resume(&self, tenant: &str, token: &str, id: &str) -> Option<HeldCall> {
        let mut h = self.held.lock().ok()?;
        match h.get(id) {
            Some(c) if c.since.elapsed() >= REPLY_TIMEOUT => {
                h.remove(id);
                None
            }
            Some(c) if c.tenant == tenant && c.token == token => h.remove(id),
            _ => None,
        }
    }

    /// Ends the calls held past [`REPLY_TIMEOUT`] (their upstream calls with them) and forgets
    /// the requests whose call ended: run now and then ([`sweep`]), so a call nobody resumes
    /// does not keep its upstream connection until the next call is held.
    pub fn sweep(&self) {
        if let Ok(mut h) = self.held.lock() {
            h.retain(|_, c| c.since.elapsed() < REPLY_TIMEOUT);
        }
        if let Ok(mut w) = self.waiting.lock() {
            w.retain(|_, v| !v.reply.is_closed());
        }
    }

    /// Calls held now (for tests and metrics).
    pub fn held_len(&self) -> usize {
        self.held.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Hands an agent's reply (a JSON-RPC response) to the relayed request it answers. `false`
    /// when no request of this token waits under its id.
    pub fn deliver(&self, tenant: &str, token: &str, reply: Value) -> bool {
        let Some(id) = reply.get("id").and_then(Value::as_str) else {
            return false;
        };
        let Ok(mut w) = self.waiting.lock() else {
            return false;
        };
        match w.get(id) {
            Some(v) if v.tenant == tenant && v.token == token => {}
            _ => return false,
        }
        match w.remove(id) {
            Some(v) => v.reply.send(reply).is_ok(),
            None => false,
        }
    }

    /// Relays one upstream request to the agent through `to_client`, waits for its reply and
    /// returns what to answer the upstream (`result` or `error`).
    pub async fn relay(
        &self,
        tenant: &str,
        token: &str,
        to_client: &mpsc::Sender<Value>,
        request: Value,
    ) -> Map<String, Value> {
        let method = request
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if !RELAYED.contains(&method) {
            return error(code::METHOD_NOT_FOUND, format!("{method} is not relayed"));
        }
        let Some((id, reply)) = self.register(tenant, token) else {
            return error(
                code::INTERNAL_ERROR,
                "too many requests waiting for clients".into(),
            );
        };
        let message = json!({
            "jsonrpc": "2.0",
            "id": id,
            "method": method,
            "params": request.get("params").cloned().unwrap_or_else(|| json!({})),
        });
        if to_client.send(message).await.is_err() {
            self.forget(&id);
            return error(code::INTERNAL_ERROR, "the client is gone".into());
        }
        let answered = tokio::time::timeout(REPLY_TIMEOUT, reply).await;
        self.forget(&id);
        match answered {
            Ok(Ok(Value::Object(mut m))) => {
                let mut out = Map::new();
                if let Some(r) = m.remove("result") {
                    out.insert("result".into(), r);
                } else if let Some(e) = m.remove("error") {
                    out.insert("error".into(), e);
                } else {
                    return error(code::INTERNAL_ERROR, "the client's reply was empty".into());
                }
                out
            }
            Ok(_) => error(code::INTERNAL_ERROR, "the client is gone".into()),
            Err(_) => error(
                code::INTERNAL_ERROR,
                format!(
                    "the client did not answer within {} s",
                    REPLY_TIMEOUT.as_secs()
                ),
            ),
        }
    }
}

/// An `error` answer to the upstream's request.
/// Sweeps `relays` every 10 s while it lives ([`Relays::sweep`]).
pub async fn sweep(relays: std::sync::Weak<Relays>) {
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(relays) = relays.upgrade() else {
            return;
        };
        relays.sweep();
    }
}

pub fn error(code: i64, message: String) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("error".into(), json!({"code": code, "message": message}));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn replies_reach_only_their_own_tokens_request() {
        let relays = std::sync::Arc::new(Relays::default());
        let (tx, mut rx) = mpsc::channel(4);
        let r = std::sync::Arc::clone(&relays);
        let task = tokio::spawn(async move {
            r.relay(
                "t",
                "j",
                &tx,
                json!({"id": 5, "method": "elicitation/create", "params": {"message": "ok?"}}),
            )
            .await
        });
        let sent = rx.recv().await.expect("relayed");
        let id = sent["id"].as_str().expect("id").to_owned();
        assert!(id.starts_with("igq-"));
        assert_eq!(sent["params"]["message"], "ok?");
        let reply = json!({"jsonrpc": "2.0", "id": id, "result": {"action": "accept"}});
        assert!(
            !relays.deliver("t", "other", reply.clone()),
            "another token"
        );
        assert!(!relays.deliver("u", "j", reply.clone()), "another tenant");
        assert!(relays.deliver("t", "j", reply.clone()));
        assert!(!relays.deliver("t", "j", reply), "only once");
        let out = task.await.expect("task");
        assert_eq!(out["result"]["action"], "accept");
    }

    /// One tenant's waiting requests stop at its share; another tenant's still get an id.
    #[test]
    fn one_tenant_cannot_take_every_relay() {
        let relays = Relays::default();
        let mut kept = Vec::new();
        for _ in 0..MAX_PENDING_PER_TENANT {
            kept.push(relays.register("busy", "j").expect("within its share"));
        }
        assert!(relays.register("busy", "j").is_none(), "past its share");
        assert!(
            relays.register("other", "k").is_some(),
            "another tenant is not shut out"
        );
    }

    #[tokio::test]
    async fn a_call_held_past_its_time_ends_and_cannot_be_resumed() {
        let relays = Relays::default();
        let held = |age: Duration| {
            let (_tx, events) = mpsc::channel(1);
            let done = tokio::spawn(async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(crate::upstream::UpstreamError::NotConfigured)
            });
            let mut call = HeldCall::new("t", "j", events, done);
            call.since = std::time::Instant::now()
                .checked_sub(age)
                .expect("a clock this old");
            call
        };
        assert!(relays.hold("old", held(REPLY_TIMEOUT + Duration::from_secs(1))));
        assert!(relays.hold("fresh", held(Duration::ZERO)));
        assert!(relays.resume("t", "j", "old").is_none(), "past its time");
        assert!(relays.hold("old2", held(REPLY_TIMEOUT + Duration::from_secs(1))));
        relays.sweep();
        assert_eq!(relays.held_len(), 1, "only the fresh one is kept");
        assert!(relays.resume("t", "j", "fresh").is_some());
    }

    #[tokio::test]
    async fn other_methods_and_gone_clients_are_refused() {
        let relays = Relays::default();
        let (tx, rx) = mpsc::channel(1);
        let out = relays
            .relay("t", "j", &tx, json!({"id": 1, "method": "tasks/get"}))
            .await;
        assert_eq!(out["error"]["code"], code::METHOD_NOT_FOUND);
        drop(rx);
        let out = relays
            .relay(
                "t",
                "j",
                &tx,
                json!({"id": 2, "method": "sampling/createMessage"}),
            )
            .await;
        assert!(
            out["error"]["message"]
                .as_str()
                .expect("msg")
                .contains("gone")
        );
        assert!(relays.waiting.lock().expect("lock").is_empty());
    }
}
