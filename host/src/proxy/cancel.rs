//! A client's `notifications/cancelled` for a tool call the gateway is forwarding: the calls
//! in flight, by the token and the client's request id, each with the id the upstream knows
//! the request by ([`crate::upstream::Sent`]), so the cancellation reaches the upstream as
//! the upstream's own `notifications/cancelled`.
//!
//! Only the token that made a call can cancel it: the very token, not another of its tree (a
//! token and the tokens attenuated from it share a `jti`, so calls are keyed by the token's
//! digest). A call whose id is already in flight for the same token is forwarded without being
//! cancellable, so no call's cancellation can reach another. The table is bounded: past
//! [`MAX_IN_FLIGHT`] calls a new one is forwarded without being cancellable. This module must
//! never cancel another token's call, and never keep an entry after its call ended.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

use super::McpService;
use crate::capability::Grant;
use crate::upstream::Sent;

/// Most calls that can be cancelled at once.
pub const MAX_IN_FLIGHT: usize = 100_000;

type Key = (String, [u8; 32], String);

/// The cancellable calls in flight.
#[derive(Default)]
pub struct InFlight {
    calls: Mutex<HashMap<Key, (String, Arc<Sent>)>>,
}

/// A registered call; leaves the table when dropped.
pub struct Registered<'a> {
    table: &'a InFlight,
    key: Key,
    pub sent: Arc<Sent>,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if let Ok(mut c) = self.table.calls.lock() {
            c.remove(&self.key);
        }
    }
}

fn key(grant: &Grant, id: &Value) -> Key {
    (grant.tenant.clone(), grant.token_digest, id.to_string())
}

impl InFlight {
    /// Registers a call of `grant` with the client's request `id`, forwarded to `upstream`.
    pub fn register(&self, grant: &Grant, id: &Value, upstream: &str) -> Option<Registered<'_>> {
        let mut c = self.calls.lock().ok()?;
        if c.len() >= MAX_IN_FLIGHT {
            return None;
        }
        let k = key(grant, id);
        let sent = Arc::new(Sent::default());
        match c.entry(k.clone()) {
            // Another call of this token with this id is in flight: a cancellation could not
            // tell the two apart, and this one's end must not unregister that one.
            std::collections::hash_map::Entry::Occupied(_) => return None,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((upstream.to_owned(), Arc::clone(&sent)));
            }
        }
        Some(Registered {
            table: self,
            key: k,
            sent,
        })
    }

    /// The upstream and sent request of `grant`'s call `id`, if it is in flight.
    fn find(&self, grant: &Grant, id: &Value) -> Option<(String, Arc<Sent>)> {
        self.calls.lock().ok()?.get(&key(grant, id)).cloned()
    }
}

/// Handles a client's `notifications/cancelled`: the upstream is told, in the background.
pub fn requested(svc: &McpService, grant: &Grant, params: &serde_json::Map<String, Value>) {
    let Some(id) = params.get("requestId") else {
        return;
    };
    let Some((name, sent)) = svc.in_flight.find(grant, id) else {
        return; // not a call of this token in flight here: nothing to cancel
    };
    let Some(upstream) = svc.upstreams.shared(&name) else {
        return;
    };
    let reason = params
        .get("reason")
        .and_then(Value::as_str)
        .unwrap_or("cancelled by the client")
        .chars()
        .take(200)
        .collect::<String>();
    tokio::spawn(async move {
        if let Err(e) = upstream.cancel(&sent, &reason).await {
            tracing::debug!(upstream = %name, error = %e, "cancellation not delivered");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capability::{Caveat, MasterKey, MintRequest, RevocationSet, Token, Verifier, mint};

    const NOW: i64 = 1_700_000_000;

    fn grants() -> (Grant, Grant) {
        let key = MasterKey::from_bytes(b"0123456789abcdef0123456789abcdef").expect("key");
        let parent = mint(
            &key,
            &MintRequest {
                subject: "agent".into(),
                ..MintRequest::default()
            },
            NOW,
        )
        .expect("mint")
        .token;
        let child = Token::decode(&parent)
            .expect("decode")
            .attenuate(Caveat {
                tools: vec!["read_only".into()],
                ..Caveat::bare("tool_allow")
            })
            .expect("attenuate")
            .encode();
        let v = Verifier::new(key, 60);
        let fresh = RevocationSet::always_fresh();
        let g = |t: &str| v.authenticate(t, NOW, &fresh).expect("authenticate");
        (g(&parent), g(&child))
    }

    #[test]
    fn only_the_very_token_finds_its_call() {
        let (parent, child) = grants();
        assert_eq!(parent.jti, child.jti, "a tree shares its jti");
        let table = InFlight::default();
        let id = Value::from(1);
        let call = table.register(&parent, &id, "up").expect("registered");
        assert!(table.find(&parent, &id).is_some());
        assert!(
            table.find(&child, &id).is_none(),
            "the child token cannot cancel it"
        );
        // The same token reusing an in-flight id: not cancellable, and its end does not
        // unregister the first.
        assert!(table.register(&parent, &id, "up").is_none());
        let theirs = table
            .register(&child, &id, "up")
            .expect("the child's own call");
        drop(call);
        assert!(table.find(&parent, &id).is_none());
        assert!(table.find(&child, &id).is_some());
        drop(theirs);
        assert!(table.find(&child, &id).is_none());
    }

    /// What an upstream asks during a call is the very token's: a token attenuated from it
    /// shares its id but neither owns the call on the shared session nor answers its request.
    #[tokio::test]
    async fn an_upstreams_question_is_answered_by_the_very_token_only() {
        let (parent, child) = grants();
        assert_ne!(parent.token_key(), child.token_key());
        assert_eq!(parent.token_key().len(), 64);
        let owner = |g: &crate::capability::Grant| {
            crate::upstream::ServerRequests::new(&g.tenant, &g.token_key(), |_| {
                Box::pin(async { serde_json::Map::new() })
            })
            .owner_for_tests()
        };
        assert_ne!(owner(&parent), owner(&child));
        let relays = std::sync::Arc::new(crate::mcp::relay::Relays::default());
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let asking = {
            let (relays, key) = (relays.clone(), parent.token_key());
            let tenant = parent.tenant.clone();
            tokio::spawn(async move {
                let request = serde_json::json!({"jsonrpc": "2.0", "id": 9,
                    "method": "elicitation/create", "params": {"message": "sure?"}});
                relays.relay(&tenant, &key, &tx, request).await
            })
        };
        let asked = rx.recv().await.expect("relayed to the client");
        let reply = serde_json::json!({"jsonrpc": "2.0", "id": asked["id"],
                                       "result": {"action": "accept"}});
        assert!(
            !relays.deliver(&child.tenant, &child.token_key(), reply.clone()),
            "the child token answered the parent's question"
        );
        assert!(relays.deliver(&parent.tenant, &parent.token_key(), reply));
        let answered = asking.await.expect("join");
        assert_eq!(answered["result"]["action"], "accept", "{answered:?}");
    }
}
