//! Resource subscriptions of handshake-era sessions to a stateless (2026-07-28) upstream: that
//! upstream has no `resources/subscribe`, only `subscriptions/listen` streams, so the gateway
//! holds one listen per subscribed URI on this replica and routes its updates through the
//! [`super::Hub`] like those of a handshake-era upstream's session stream.
//!
//! [`ensure`] starts the URI's bridge when the first session on this replica subscribes (the
//! caller decided the subscription); [`stop`] ends it when the last one goes (unsubscribe,
//! `DELETE`, revocation: [`super::listen::release`]). A bridge whose upstream stream drops opens
//! it again, waiting longer each time (up to [`MAX_BACKOFF`]), for as long as it is not stopped.
//!
//! List changes likewise: a stateless upstream announces them only on listen streams, so the
//! first `GET /v1/mcp` stream whose token reaches it starts [`ensure_lists`], one listen of the
//! three list-change flags per upstream on this replica, held while the gateway runs (the hub
//! sends each change to every session whose token reaches that upstream).
//!
//! This module must never open a listen for a URI no session on this replica subscribed to,
//! and never pass on anything but that URI's updates (or, for the lists, list changes).

use std::sync::{Arc, Weak};
use std::time::Duration;

use serde_json::{Map, Value, json};

use super::Hub;
use crate::upstream::{ListenFrame, UpstreamEra};
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
        Some(original.to_owned()),
    ));
    bridges.insert(exposed.to_owned(), task.abort_handle());
}

/// Ends the bridge of `exposed`, if one runs (its upstream listen closes).
pub fn stop(hub: &Hub, exposed: &str) {
    if let Some(h) = hub.bridges.lock().ok().and_then(|mut b| b.remove(exposed)) {
        h.abort();
    }
}

/// Starts the list-change listen of `upstream` unless one runs (a handshake-era upstream's
/// task ends at once: its session stream carries its list changes).
pub fn ensure_lists(hub: &Arc<Hub>, upstreams: &Arc<Upstreams>, upstream: &str) {
    let Ok(mut lists) = hub.list_bridges.lock() else {
        return;
    };
    if lists.get(upstream).is_some_and(|h| !h.is_finished()) {
        return;
    }
    let (weak, ups, name) = (
        Arc::downgrade(hub),
        Arc::clone(upstreams),
        upstream.to_owned(),
    );
    let task = tokio::spawn(async move {
        let stateless = match ups.get(&name) {
            Some(up) => matches!(up.era().await, Ok(UpstreamEra::Modern(_))),
            None => false,
        };
        if stateless {
            run(weak, ups, name, None).await;
        }
    });
    lists.insert(upstream.to_owned(), task.abort_handle());
}

/// What a bridge listens for: one URI's updates, or (`None`) every list change.
fn filter(original: Option<&str>) -> Map<String, Value> {
    match original {
        Some(uri) => Map::from_iter([("resourceSubscriptions".to_owned(), json!([uri]))]),
        None => [
            "toolsListChanged",
            "promptsListChanged",
            "resourcesListChanged",
        ]
        .into_iter()
        .map(|f| (f.to_owned(), Value::Bool(true)))
        .collect(),
    }
}

/// Whether a message of the upstream's listen is what the bridge passes on.
fn wanted(message: &Value, original: Option<&str>) -> bool {
    let method = message.get("method").and_then(Value::as_str).unwrap_or("");
    match original {
        Some(uri) => {
            method == "notifications/resources/updated"
                && message.pointer("/params/uri").and_then(Value::as_str) == Some(uri)
        }
        None => matches!(
            method,
            "notifications/tools/list_changed"
                | "notifications/prompts/list_changed"
                | "notifications/resources/list_changed"
        ),
    }
}

async fn run(hub: Weak<Hub>, upstreams: Arc<Upstreams>, name: String, original: Option<String>) {
    let mut backoff = Duration::from_millis(250);
    loop {
        let Some(up) = upstreams.get(&name) else {
            return;
        };
        match up.open_listen(filter(original.as_deref()), None).await {
            Ok(mut stream) => {
                backoff = Duration::from_millis(250);
                while let Ok(Some(ListenFrame::Notification(mut message))) = stream.next().await {
                    if !wanted(&message, original.as_deref()) {
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
