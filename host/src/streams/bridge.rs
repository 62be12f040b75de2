//! Resource subscriptions of handshake-era sessions to a stateless (2026-07-28) upstream: that
//! upstream has no `resources/subscribe`, only `subscriptions/listen` streams, so the gateway
//! holds one listen per subscribed URI on this replica and routes its updates through the
//! [`super::Hub`] like those of a handshake-era upstream's session stream.
//!
//! [`ensure`] starts the URI's bridge when the first session on this replica subscribes (the
//! caller decided the subscription); [`stop`] ends it when the last one goes (unsubscribe,
//! `DELETE`, revocation: [`super::listen::release`]). A bridge whose upstream stream drops opens
//! it again, waiting longer each time (up to [`MAX_BACKOFF`]), for as long as it is not stopped.
//! This module must never open a listen for a URI no session on this replica subscribed to,
//! and never pass on anything but that URI's updates.

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::Hub;
use crate::upstream::ListenFrame;
use crate::upstreams::Upstreams;

/// The longest wait before a dropped bridge listens again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Starts the bridge of `exposed` (the URI as agents know it; `original` on `upstream`) unless
/// one runs.
pub fn ensure(
    hub: &Arc<Hub>,
    upstreams: &Arc<Upstreams>,
    upstream: &str,
    exposed: &str,
    original: &str,
) {
    let Ok(mut bridges) = hub.bridges.lock() else {
        return;
    };
    if bridges.get(exposed).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let task = tokio::spawn(run(
        Arc::downgrade(hub),
        Arc::clone(upstreams),
        upstream.to_owned(),
        original.to_owned(),
    ));
    bridges.insert(exposed.to_owned(), task.abort_handle());
}

/// Ends the bridge of `exposed`, if one runs (its upstream listen closes).
pub fn stop(hub: &Hub, exposed: &str) {
    if let Some(h) = hub.bridges.lock().ok().and_then(|mut b| b.remove(exposed)) {
        h.abort();
    }
}

async fn run(hub: Weak<Hub>, upstreams: Arc<Upstreams>, name: String, original: String) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Some(up) = upstreams.get(&name) else {
            return;
        };
        let filter = Map::from_iter([("resourceSubscriptions".to_owned(), json!([original]))]);
        match up.open_listen(filter, None).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(250);
                while let Ok(Some(ListenFrame::Notification(mut message))) = stream.next().await {
                    if message.get("method").and_then(Value::as_str)
                        != Some("notifications/resources/updated")
                        || message.pointer("/params/uri").and_then(Value::as_str)
                            != Some(original.as_str())
                    {
                        continue;
                    }
                    // The upstream's stamp is its own stream's, not the sessions'.
                    if let Some(p) = message.get_mut("params").and_then(Value::as_object_mut) {
                        p.remove("_meta");
                    }
                    let Some(hub) = hub.upgrade() else { return };
                    let namespaced = upstreams.namespaced();
                    hub.from_upstream(&name, message, |u| {
                        crate::upstreams::expose_uri_as(&name, u, namespaced)
                    });
                }
            }
            Err(e) => {
                tracing::debug!(upstream = %name, error = %e, "subscription bridge: listen not opened");
            }
        }
        if hub.strong_count() == 0 {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}
