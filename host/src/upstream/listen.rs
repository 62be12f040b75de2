//! `subscriptions/listen` toward a stateless (2026-07-28) upstream (SEP-2575): one POST whose
//! answer is a long-lived event stream, read event by event as it arrives.
//!
//! [`Upstream::open_listen`] sends the request with the filter the caller decided (URIs in the
//! upstream's own names) and waits, within the upstream's timeout, for the stream's first
//! message: the upstream's `notifications/subscriptions/acknowledged`, whose honored filter
//! it returns with the open stream. [`UpstreamListen::next`] then yields each later message as
//! it arrives: the upstream's change notifications, then its `SubscriptionsListenResult` (a
//! graceful end) or nothing (an abrupt one). Dropping the stream closes the connection, which
//! ends the listen on the upstream.
//!
//! Bounded: one event may not exceed the upstream's largest answer, and the stream's messages
//! are read only as the caller asks for them (no buffering beyond one event). There is no idle
//! timeout once the stream is acknowledged: a listen stream may be silent for as long as
//! nothing changes. This module only speaks the wire; it must never choose what the filter
//! holds (the caller authorized it) and never send a header taken from the agent's request.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use serde_json::{Map, Value, json};

use super::message::Events;
use super::message::{sse_event_json, to_reply};
use super::{Upstream, UpstreamEra, UpstreamError, client_info, error_chain};
use crate::mcp::era::{Envelope, meta};
use crate::mcp::headers;

/// The acknowledgment's method, the first message of a listen stream.
pub const ACKNOWLEDGED: &str = "notifications/subscriptions/acknowledged";

/// A listen stream open on the upstream, after its acknowledgment.
pub struct UpstreamListen {
    /// The filter the upstream said it honors (its own URIs).
    pub honored: Map<String, Value>,
    body: Incoming,
    events: Events,
    max_event: usize,
    id: u64,
}

/// One later message of an upstream's listen stream.
#[derive(Debug, Clone)]
pub enum ListenFrame {
    /// A notification (a change, or anything else the upstream sent on the stream).
    Notification(Value),
    /// The listen request's answer: a result is the upstream's graceful end, an error its
    /// refusal. Nothing follows it.
    End(super::Reply),
}

impl Upstream {
    /// Opens `subscriptions/listen` with `filter` (a `SubscriptionFilter`, URIs as the upstream
    /// names them) and returns once the upstream acknowledged it. `relay` is the stateless
    /// client's envelope (its capabilities and info are the upstream's client's); only an
    /// upstream that speaks the stateless era can be asked (others: [`UpstreamError::Malformed`]).
    pub async fn open_listen(
        &self,
        filter: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<UpstreamListen, UpstreamError> {
        self.open_listen_inner(filter, relay)
            .await
            .map_err(|e| self.scrubbed(e))
    }

    async fn open_listen_inner(
        &self,
        filter: Map<String, Value>,
        relay: Option<&Envelope>,
    ) -> Result<UpstreamListen, UpstreamError> {
        let version = match self.era().await? {
            UpstreamEra::Modern(v) => v,
            UpstreamEra::Handshake => {
                return Err(UpstreamError::Malformed(
                    "subscriptions/listen needs a stateless (2026-07-28) upstream".into(),
                ));
            }
        };
        let mut envelope = Map::new();
        envelope.insert(meta::PROTOCOL_VERSION.into(), Value::from(version));
        let (caps, info) = match relay {
            Some(r) => (
                r.client_capabilities.clone(),
                r.client_info.clone().unwrap_or_else(client_info),
            ),
            None => (json!({}), client_info()),
        };
        envelope.insert(meta::CLIENT_CAPABILITIES.into(), caps);
        envelope.insert(meta::CLIENT_INFO.into(), info);
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let body = json!({"jsonrpc": "2.0", "id": id, "method": "subscriptions/listen",
            "params": {"notifications": filter, "_meta": envelope}});
        // The routing headers are computed from this body and nothing else.
        let routing: Vec<(hyper::header::HeaderName, HeaderValue)> = headers::for_upstream(&body)
            .map_err(UpstreamError::Malformed)?
            .into_iter()
            .map(|(k, v)| (hyper::header::HeaderName::from_static(k), v))
            .collect();
        let bytes =
            serde_json::to_vec(&body).map_err(|e| UpstreamError::Malformed(e.to_string()))?;
        let req = self.build(bytes, &routing)?;
        let opening = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| UpstreamError::Unavailable(error_chain(&e)))?;
            let status = resp.status();
            let is_sse = resp
                .headers()
                .get(CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            let mut stream = UpstreamListen {
                honored: Map::new(),
                body: resp.into_body(),
                events: Events::default(),
                max_event: self.max_response,
                id,
            };
            if !is_sse {
                // A refusal (an error answered as JSON), or a server that cannot stream.
                let answer = stream.rest().await;
                let detail = String::from_utf8_lossy(&answer[..answer.len().min(512)]);
                return Err(UpstreamError::Status {
                    status: status.as_u16(),
                    detail: format!("subscriptions/listen not streamed: {detail}"),
                });
            }
            match stream.message().await? {
                Some(v) if v.get("method").and_then(Value::as_str) == Some(ACKNOWLEDGED) => {
                    if let Some(Value::Object(f)) = v.pointer("/params/notifications") {
                        stream.honored = f.clone();
                    }
                    Ok(stream)
                }
                Some(v) => match stream.frame(v) {
                    ListenFrame::End(reply) => Err(UpstreamError::Status {
                        status: status.as_u16(),
                        detail: format!(
                            "subscriptions/listen ended before its acknowledgment: {reply:?}"
                        ),
                    }),
                    ListenFrame::Notification(_) => Err(UpstreamError::Malformed(
                        "the listen stream's first message is not its acknowledgment".into(),
                    )),
                },
                None => Err(UpstreamError::Malformed(
                    "the listen stream ended before its acknowledgment".into(),
                )),
            }
        };
        tokio::time::timeout(self.timeout, opening)
            .await
            .map_err(|_| UpstreamError::Timeout(self.timeout))?
    }
}

impl UpstreamListen {
    /// The next message after the acknowledgment, as it arrives; `None` when the stream ended
    /// without an answer (abruptly).
    pub async fn next(&mut self) -> Result<Option<ListenFrame>, UpstreamError> {
        Ok(self.message().await?.map(|v| self.frame(v)))
    }

    fn frame(&self, v: Value) -> ListenFrame {
        let answers_us = v.get("method").is_none()
            && (v.get("id").and_then(Value::as_u64) == Some(self.id)
                || v.get("id").is_none_or(Value::is_null));
        if answers_us && let Ok(reply) = to_reply(v.clone()) {
            return ListenFrame::End(reply);
        }
        ListenFrame::Notification(v)
    }

    /// The next JSON message of the stream (events without JSON are skipped).
    async fn message(&mut self) -> Result<Option<Value>, UpstreamError> {
        loop {
            while let Some(event) = self.events.next_event() {
                if let Some(v) = sse_event_json(&event) {
                    return Ok(Some(v));
                }
            }
            match self.body.frame().await {
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.events.push(&data);
                        if self.events.len() > self.max_event {
                            return Err(UpstreamError::TooLarge(self.max_event));
                        }
                    }
                }
                Some(Err(e)) => return Err(UpstreamError::Unavailable(e.to_string())),
                None => return Ok(None),
            }
        }
    }

    /// What is left of a body that is not a stream (bounded).
    async fn rest(&mut self) -> Vec<u8> {
        while let Some(Ok(f)) = self.body.frame().await {
            if let Ok(data) = f.into_data() {
                self.events.push(&data);
                if self.events.len() > self.max_event {
                    break;
                }
            }
        }
        self.events.take()
    }
}
