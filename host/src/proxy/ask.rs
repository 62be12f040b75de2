//! A request the upstream sends the agent while it works on a call (`sampling/createMessage`,
//! `elicitation/create`, `roots/list`), authorized before it is relayed: decided by the
//! pipeline as the upstream acting toward the agent's user, then handed to
//! [`crate::mcp::relay::Relays`], which carries it on the call's event stream and waits for the
//! agent's reply. The call's own notifications (its progress, log messages) are passed on at
//! once. This module must never relay a request the pipeline refused.

use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::McpService;
use crate::mcp::jsonrpc::{RpcError, code};
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
        let asking = Asking {
            grant: &self.grant,
            tool: &self.tool,
            upstream: self.upstream.as_deref(),
            remote_ip: &self.remote_ip,
            session: self.session.as_deref(),
        };
        if let Err(refused) = asking.decide(&self.svc, &request).await {
            return error(refused.code, refused.message);
        }
        self.svc
            .relays
            .relay(
                &self.grant.tenant,
                &self.grant.token_key(),
                &self.to_client,
                request,
            )
            .await
    }

    /// The asker as the upstream client's handler of server requests.
    pub fn into_handler(self) -> std::sync::Arc<crate::upstream::ServerRequests> {
        let (tenant, token) = (self.grant.tenant.clone(), self.grant.token_key());
        let me = std::sync::Arc::new(self);
        std::sync::Arc::new(crate::upstream::ServerRequests::new(
            &tenant,
            &token,
            move |request: Value| {
                let me = std::sync::Arc::clone(&me);
                Box::pin(async move { me.ask(request).await })
                    as crate::store::BoxFuture<'static, Map<String, Value>>
            },
        ))
    }
}

/// Who asks, when an upstream asks a call's agent something: the call's token, tool, upstream
/// and origin.
pub struct Asking<'a> {
    pub grant: &'a crate::capability::Grant,
    /// The tool whose call the upstream is working on.
    pub tool: &'a str,
    pub upstream: Option<&'a str>,
    pub remote_ip: &'a str,
    pub session: Option<&'a str>,
}

impl Asking<'_> {
    /// Decides one request of the upstream toward the agent's user (`request` is a JSON-RPC
    /// request, or a 2026-07-28 input request: `method` and `params`) like a call: capability,
    /// intent, policy, audit, never charged; as `sampling:<tool>`, `elicitation:<tool>` or
    /// `roots:<tool>`. A method that is not relayed is refused.
    pub async fn decide(&self, svc: &McpService, request: &Value) -> Result<(), RpcError> {
        let method = request
            .get("method")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let Some(kind) = crate::pipeline::CallKind::of_server_request(method) else {
            return Err(RpcError::new(
                code::METHOD_NOT_FOUND,
                format!("{method} is not relayed"),
            ));
        };
        let arguments = request.get("params").cloned().unwrap_or_else(|| json!({}));
        let call = crate::pipeline::ToolCall {
            grant: self.grant,
            kind,
            tool: self.tool,
            arguments: &arguments,
            intent_prompt: None,
            agent: None,
            remote_ip: self.remote_ip.to_owned(),
            session_id: self.session,
            round: None,
            approval_id: None,
            upstream: self.upstream,
        };
        svc.pipeline
            .decide(&call)
            .await
            .map(|_| ())
            .map_err(|denial| {
                let mut refused = super::denial::rpc_error(&denial);
                refused.message = format!("{method} refused by the gateway: {denial}");
                refused
            })
    }
}

/// The input requests of an input-required result: none (absent or `null`) or an object of
/// them. Anything else is the upstream's failure, never a call let through undecided.
pub(super) fn input_requests(
    value: Option<&Value>,
) -> Result<Option<&Map<String, Value>>, RpcError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(requests)) => Ok(Some(requests)),
        Some(_) => Err(
            RpcError::new(code::INTERNAL_ERROR, "upstream failure").with_data(json!({
                "upstream_status": 200,
                "detail": "the upstream's inputRequests is not an object",
            })),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An input-required result whose requests are not an object is refused as the
    /// upstream's failure (an array or a string of them would otherwise reach the client with
    /// nothing decided).
    #[test]
    fn input_requests_are_an_object_or_nothing() {
        assert!(matches!(input_requests(None), Ok(None)));
        assert!(matches!(input_requests(Some(&Value::Null)), Ok(None)));
        let one = json!({"m": {"method": "sampling/createMessage", "params": {}}});
        assert_eq!(
            input_requests(Some(&one)).expect("object").map(Map::len),
            Some(1)
        );
        for bad in [
            json!([{"method": "sampling/createMessage", "params": {}}]),
            json!("sampling/createMessage"),
            json!(1),
            json!(true),
        ] {
            let e = input_requests(Some(&bad)).expect_err("refused");
            assert_eq!(e.code, code::INTERNAL_ERROR, "{bad}");
            assert_eq!(e.message, "upstream failure", "{bad}");
        }
    }
}
