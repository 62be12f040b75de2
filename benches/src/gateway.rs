//! The gateway under test, in-process in the `serve-gateway` child (its own tokio runtime with
//! an explicit worker count), started exactly as `intentgate serve` starts it
//! ([`intentgate::Gateway::start`] + [`intentgate::serve`]), plus minting the bench's tokens
//! with the same master key.

use clap::Args;
use intentgate::capability::{MasterKey, MintRequest, mint};
use intentgate::config::ServeArgs;

use crate::child;

/// `serve-gateway`: the gateway's own flags (`--addr`, `--data-dir`, `--postgres-url`, …) plus
/// the runtime size.
#[derive(Args)]
pub struct ServeGateway {
    /// tokio worker threads of the gateway process.
    #[arg(long, default_value_t = 2)]
    pub worker_threads: usize,
    #[command(flatten)]
    pub serve: ServeArgs,
}

pub fn serve(args: ServeGateway) -> Result<(), String> {
    let config = args.serve.validate().map_err(|e| e.to_string())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let gw = intentgate::Gateway::start(config.clone())
            .await
            .map_err(|e| format!("gateway start: {e}"))?;
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .map_err(|e| format!("bind {}: {e}", config.addr))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        intentgate::serve(gw, listener, child::ready_then_wait_for_stdin_eof(addr))
            .await
            .map_err(|e| format!("serve: {e}"))
    })
}

/// A fresh master key, base64, for `--master-key`.
pub fn new_master_key() -> Result<String, String> {
    MasterKey::generate()
        .map(|k| k.expose_base64())
        .map_err(|e| e.to_string())
}

/// Calls a budgeted bench token may make: never reached in a run, so every call is charged and
/// allowed.
pub const BUDGET: u64 = 1_000_000_000_000;

/// `agents` tokens per tenant (`bench-0`, `bench-1`, …), each its own agent's, allowing `tool`,
/// no expiry; `budgeted` adds `max_calls` and `rate_limit` (what real tokens carry, each one
/// counter charged per call). Token `j` is tenant `j % tenants`'s, so connections taking
/// tokens in turn spread over the tenants first.
pub fn mint_tokens(
    master_key_b64: &str,
    tenants: usize,
    agents: usize,
    tool: &str,
    budgeted: bool,
) -> Result<Vec<String>, String> {
    let key = MasterKey::from_base64(master_key_b64).map_err(|e| e.to_string())?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs() as i64;
    let tenants = tenants.max(1);
    (0..tenants * agents.max(1))
        .map(|j| {
            let (tenant, agent) = (j % tenants, j / tenants);
            let subject = if agent == 0 {
                format!("bench-agent-{tenant}")
            } else {
                format!("bench-agent-{tenant}-{agent}")
            };
            let req = MintRequest {
                subject,
                tenant: Some(format!("bench-{tenant}")),
                tools: vec![tool.to_owned()],
                max_calls: budgeted.then_some(BUDGET),
                rate_per_min: budgeted.then_some(BUDGET),
                ..MintRequest::default()
            };
            mint(&key, &req, now)
                .map(|m| m.token)
                .map_err(|e| e.to_string())
        })
        .collect()
}
