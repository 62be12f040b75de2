//! A request the upstream sends the agent while it works on a call (`sampling/createMessage`,
//! `elicitation/create`, `roots/list`), authorized before it is relayed: decided by the
//! pipeline as the upstream acting toward the agent's user, then handed to
//! [`crate::mcp::relay::Relays`], which carries it on the call's event stream and waits for the
//! agent's reply. The call's own notifications (its progress, log messages) are passed on at
//! once. This module must never relay a request the pipeline refused.

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::McpService;
use crate::mcp::jsonrpc::code;
use crate::mcp::relay::error;

/// Asks one call's agent what the upstream asks it, once the request is authorized: a request
/// of the upstream toward the agent's user is decided like a call (capability, intent, policy,
/// audit; never charged), as `sampling:<tool>` or `elicitation:<tool>` for the tool that asked,
/// so a policy can refuse it (say, no sampling for this upstream).
pub struct Asker {
    pub svc: std::sync::Arc<McpService>,
    pub grant: crate::capability::Grant,
    /// The tool whose call the upstream is working on.
    pub tool: String,
    pub upstream: Option<String>,
    pub remote_ip: String,
    pub session: Option<String>,
    pub to_client: mpsc::Sender<Value>,
    /// The call's `progressToken`: only its progress is passed on.
    pub progress_token: Option<Value>,
}

impl Asker {
    /// Decides, then relays `request`; what to answer the upstream. A notification of the
    /// call (its progress, a log message) is passed on at once and answered with nothing.
    pub async fn ask(&self, request: Value) -> Map<String, Value> {
        if request.get("id").is_none() {
            for n in crate::mcp::translate::relayable(vec![request], self.progress_token.as_ref()) {
                let _ = self.to_client.send(n).await;
            }
            return Map::new();
        }
        let method = request
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(kind) = crate::pipeline::CallKind::of_server_request(method) else {
            return error(code::METHOD_NOT_FOUND, format!("{method} is not relayed"));
        };
        let arguments = request.get("params").cloned().unwrap_or_else(|| json!({}));
        let call = crate::pipeline::ToolCall {
            grant: &self.grant,
            kind,
            tool: &self.tool,
            arguments: &arguments,
            intent_prompt: None,
            agent: None,
            remote_ip: self.remote_ip.clone(),
            session_id: self.session.as_deref(),
            round: None,
            approval_id: None,
            upstream: self.upstream.as_deref(),
        };
        if let Err(denial) = self.svc.pipeline.decide(&call).await {
            let refused = super::denial::rpc_error(&denial);
            return error(
                refused.code,
                format!("{method} refused by the gateway: {denial}"),
            );
        }
        self.svc
            .relays
            .relay(
                &self.grant.tenant,
                &self.grant.jti,
                &self.to_client,
                request,
            )
            .await
    }

    /// The asker as the upstream client's handler of server requests.
    pub fn into_handler(self) -> std::sync::Arc<crate::upstream::ServerRequests> {
        let me = std::sync::Arc::new(self);
        std::sync::Arc::new(move |request: Value| {
            let me = std::sync::Arc::clone(&me);
            Box::pin(async move { me.ask(request).await })
                as crate::store::BoxFuture<'static, Map<String, Value>>
        })
    }
}
