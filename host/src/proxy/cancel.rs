//! A client's `notifications/cancelled` for a tool call the gateway is forwarding: the calls
//! in flight, by the token and the client's request id, each with the id the upstream knows
//! the request by ([`crate::upstream::Sent`]), so the cancellation reaches the upstream as
//! the upstream's own `notifications/cancelled`.
//!
//! Only the token that made a call can cancel it. The table is bounded: past
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

type Key = (String, String, String);

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
    (grant.tenant.clone(), grant.jti.clone(), id.to_string())
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
        c.insert(k.clone(), (upstream.to_owned(), Arc::clone(&sent)));
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
