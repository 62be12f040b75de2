//! `intentgate tokens mint | revoke | list | attenuate`.

use std::io::Read as _;
use std::path::PathBuf;

use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::client::Client;
use super::output::{self, cell};
use super::profile::{Connection, Output};
use super::{CliError, with_client};
use crate::capability::{Caveat, Token};

#[derive(Subcommand, Debug)]
pub enum TokensCmd {
    /// Mint a capability token for an agent (shown once, never stored).
    #[command(
        after_help = "Examples:\n  intentgate tokens mint --subject agent-1 --tenant acme --tool read_invoice --max-calls 100 --ttl 3600\n  TOKEN=$(intentgate tokens mint --subject agent-1 --tool 'read_*' --quiet)"
    )]
    Mint {
        /// The agent the token names (its `agent_id`).
        #[arg(long)]
        subject: String,
        /// Lifetime in seconds.
        #[arg(long)]
        ttl: Option<u64>,
        /// A tool the token may call (repeat; globs allowed). None: every tool.
        #[arg(long = "tool")]
        tools: Vec<String>,
        /// Most calls over the token's life (every delegated child included).
        #[arg(long)]
        max_calls: Option<u64>,
        /// Most calls per minute.
        #[arg(long)]
        rate_per_min: Option<u64>,
        /// Most cents the token may spend (costs from the bundle's budget configuration).
        #[arg(long)]
        max_cents: Option<u64>,
        /// An upstream server the token may reach (repeat).
        #[arg(long = "server")]
        servers: Vec<String>,
        /// A resource URI the token may read (repeat; globs allowed). None: every resource.
        #[arg(long = "resource")]
        resources: Vec<String>,
        /// A prompt the token may get (repeat; globs allowed). None: every prompt.
        #[arg(long = "prompt")]
        prompts: Vec<String>,
        #[arg(long)]
        zone: Option<String>,
        /// Stamp a fresh step-up time (policies read `capability.step_up_at`).
        #[arg(long)]
        step_up: bool,
        /// Print only the token (for `TOKEN=$(…)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Revoke a token by its jti (idempotent; every replica refuses it within the feed's bound).
    #[command(after_help = "Example:\n  intentgate tokens revoke 3q2-… --reason 'laptop lost'")]
    Revoke {
        jti: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Tokens minted (from the audit chain's mint events), newest first, with their revocation.
    #[command(
        after_help = "Examples:\n  intentgate tokens list --tenant acme\n  intentgate tokens list -o json | jq -r '.[].jti'"
    )]
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Narrow a token without the gateway (adds caveats; the holder can always do this).
    #[command(
        after_help = "Examples:\n  intentgate tokens attenuate --token-in token.txt --tool read_invoice --max-calls 5\n  echo \"$TOKEN\" | intentgate tokens attenuate --ttl 60 > child.txt"
    )]
    Attenuate {
        /// File holding the parent token; `-` or absent: standard input.
        #[arg(long)]
        token_in: Option<PathBuf>,
        /// Allow only these tools (repeat).
        #[arg(long = "tool")]
        tools: Vec<String>,
        /// Deny these tools (repeat).
        #[arg(long = "deny-tool")]
        deny_tools: Vec<String>,
        /// Allow only these resource URIs (repeat; globs).
        #[arg(long = "resource")]
        resources: Vec<String>,
        /// Deny these resource URIs (repeat; globs).
        #[arg(long = "deny-resource")]
        deny_resources: Vec<String>,
        /// Allow only these prompts (repeat; globs).
        #[arg(long = "prompt")]
        prompts: Vec<String>,
        /// Deny these prompts (repeat; globs).
        #[arg(long = "deny-prompt")]
        deny_prompts: Vec<String>,
        #[arg(long)]
        max_calls: Option<u64>,
        /// Expire within this many seconds from now.
        #[arg(long)]
        ttl: Option<u64>,
        /// Lock the token to one agent id.
        #[arg(long)]
        agent: Option<String>,
    },
}

impl TokensCmd {
    pub fn run(self, conn: &Connection) -> Result<(), CliError> {
        match self {
            TokensCmd::Attenuate {
                token_in,
                tools,
                deny_tools,
                resources,
                deny_resources,
                prompts,
                deny_prompts,
                max_calls,
                ttl,
                agent,
            } => {
                let scopes = [
                    ("tool_allow", tools),
                    ("tool_deny", deny_tools),
                    ("resource_allow", resources),
                    ("resource_deny", deny_resources),
                    ("prompt_allow", prompts),
                    ("prompt_deny", deny_prompts),
                ];
                attenuate(token_in, scopes, max_calls, ttl, agent)
            }
            other => with_client(conn, |c| other.remote(c)),
        }
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        match self {
            TokensCmd::Mint {
                subject,
                ttl,
                tools,
                max_calls,
                rate_per_min,
                max_cents,
                servers,
                resources,
                prompts,
                zone,
                step_up,
                quiet,
            } => {
                let mut body = Map::new();
                body.insert("subject".into(), json!(subject));
                if let Some(t) = c.tenant() {
                    body.insert("tenant".into(), json!(t));
                }
                let mut opt = |k: &str, v: Option<Value>| {
                    if let Some(v) = v {
                        body.insert(k.into(), v);
                    }
                };
                opt("ttl_seconds", ttl.map(Value::from));
                opt("max_calls", max_calls.map(Value::from));
                opt("rate_per_min", rate_per_min.map(Value::from));
                opt("max_cents", max_cents.map(Value::from));
                opt("zone", zone.map(Value::from));
                opt("tools", (!tools.is_empty()).then(|| json!(tools)));
                opt("servers", (!servers.is_empty()).then(|| json!(servers)));
                opt(
                    "resources",
                    (!resources.is_empty()).then(|| json!(resources)),
                );
                opt("prompts", (!prompts.is_empty()).then(|| json!(prompts)));
                opt("step_up", step_up.then_some(Value::Bool(true)));
                let minted = c.post("/v1/admin/mint", &Value::Object(body)).await?;
                if quiet {
                    println!("{}", cell(minted.get("token")));
                } else if c.output() == Output::Json {
                    println!("{}", output::pretty(&minted));
                } else {
                    println!(
                        "token (shown once, never stored):\n{}\n",
                        cell(minted.get("token"))
                    );
                    print!(
                        "{}",
                        output::table(
                            std::slice::from_ref(&minted),
                            &["jti", "subject", "tenant", "expires_at"]
                        )
                    );
                }
                Ok(())
            }
            TokensCmd::Revoke { jti, reason } => {
                let mut body = json!({"jti": jti, "reason": reason});
                if let Some(t) = c.tenant() {
                    body["tenant"] = json!(t);
                }
                let answer = c.post("/v1/admin/revoke", &body).await?;
                match c.output() {
                    Output::Json => println!("{}", output::pretty(&json!({"revoked": jti}))),
                    Output::Table => println!("revoked {jti}"),
                }
                let _ = answer;
                Ok(())
            }
            TokensCmd::List { limit } => {
                let limit = limit.clamp(1, 1000);
                let minted = c
                    .get(
                        "/v1/admin/audit",
                        &[("event", "admin/mint".into()), ("limit", limit.to_string())],
                    )
                    .await?;
                // Every revocation, page by page: a token revoked before the newest thousand
                // is still revoked.
                let mut items = Vec::new();
                let mut cursor: Option<String> = None;
                loop {
                    let mut q = vec![("limit", "1000".to_string())];
                    if let Some(cur) = &cursor {
                        q.push(("cursor", cur.clone()));
                    }
                    let page = c.get("/v1/admin/revocations", &q).await?;
                    if let Some(Value::Array(rows)) = page.get("items") {
                        items.extend(rows.iter().cloned());
                    }
                    match page.get("next_cursor").and_then(Value::as_str) {
                        Some(next) if items.len() < MAX_REVOCATIONS_READ => {
                            cursor = Some(next.to_owned())
                        }
                        Some(_) => {
                            eprintln!(
                                "note: read the newest {MAX_REVOCATIONS_READ} revocations only; older ones are not shown"
                            );
                            break;
                        }
                        None => break,
                    }
                }
                let revoked = json!({"items": items});
                let rows = token_rows(&minted, &revoked);
                output::print(
                    c.output(),
                    &Value::Array(rows.clone()),
                    &rows,
                    &[
                        "jti",
                        "subject",
                        "tenant",
                        "tools",
                        "minted_at",
                        "revoked_at",
                    ],
                );
                Ok(())
            }
            TokensCmd::Attenuate { .. } => Err(CliError::Usage("attenuate is local".into())),
        }
    }
}

/// The most revocations `tokens list` reads (a hundred pages).
const MAX_REVOCATIONS_READ: usize = 100_000;

/// Joins mint events with revocations into `{jti, subject, tenant, tools, minted_at, revoked_at,
/// revoke_reason}` rows.
fn token_rows(minted: &Value, revoked: &Value) -> Vec<Value> {
    let revocations = revoked
        .get("items")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    minted
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|e| {
            let jti = cell(e.get("capability_token_id").or_else(|| e.get("jti")));
            let r = revocations
                .iter()
                .find(|r| r.get("jti").and_then(Value::as_str) == Some(jti.as_str()));
            let tools: Vec<&str> = e
                .get("tool")
                .and_then(Value::as_str)
                .map(|t| t.split(',').filter(|s| !s.is_empty()).collect())
                .unwrap_or_default();
            json!({
                "jti": jti,
                "subject": e.get("agent_id").cloned().unwrap_or(Value::Null),
                "tenant": e.get("tenant").cloned().unwrap_or(Value::Null),
                "tools": tools,
                "minted_at": e.get("ts").cloned().unwrap_or(Value::Null),
                "revoked_at": r.and_then(|r| r.get("revoked_at")).cloned().unwrap_or(Value::Null),
                "revoke_reason": r.and_then(|r| r.get("reason")).cloned().unwrap_or(Value::Null),
            })
        })
        .collect()
}

/// Attenuates a token: `scopes` are `(caveat type, globs)` of the list caveats (tool, resource
/// and prompt allow/deny), in that order; an empty list adds none.
fn attenuate(
    token_in: Option<PathBuf>,
    scopes: [(&str, Vec<String>); 6],
    max_calls: Option<u64>,
    ttl: Option<u64>,
    agent: Option<String>,
) -> Result<(), CliError> {
    let text = match token_in.as_deref() {
        Some(p) if p.as_os_str() != "-" => String::from_utf8(super::read_file(p)?)
            .map_err(|_| CliError::Usage(format!("{} is not a token", p.display())))?,
        _ => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .map_err(|e| CliError::Local(format!("standard input: {e}")))?;
            s
        }
    };
    let mut token = Token::decode(text.trim())
        .map_err(|e| CliError::Usage(format!("not a capability token: {e}")))?;
    let mut caveats: Vec<Caveat> = scopes
        .into_iter()
        .filter(|(_, globs)| !globs.is_empty())
        .map(|(t, globs)| Caveat::scoped(t, globs))
        .collect();
    if let Some(n) = max_calls {
        let n = i64::try_from(n).map_err(|_| CliError::Usage("--max-calls is too large".into()))?;
        caveats.push(Caveat::max_calls(n));
    }
    if let Some(ttl) = ttl {
        let now = crate::audit::time::now_ms() / 1000;
        let ttl = i64::try_from(ttl).map_err(|_| CliError::Usage("--ttl is too large".into()))?;
        caveats.push(Caveat::exp(now.saturating_add(ttl)));
    }
    if let Some(a) = agent {
        caveats.push(Caveat::agent_lock(&a));
    }
    if caveats.is_empty() {
        return Err(CliError::Usage(
            "nothing to add: give --tool, --deny-tool, --resource, --deny-resource, --prompt, \
             --deny-prompt, --max-calls, --ttl or --agent"
                .into(),
        ));
    }
    for c in caveats {
        token = token
            .attenuate(c)
            .map_err(|e| CliError::Usage(format!("cannot attenuate: {e}")))?;
    }
    println!("{}", token.encode());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_join_mints_and_revocations() {
        let minted = json!({"items": [
            {"capability_token_id": "j1", "agent_id": "a", "tenant": "acme", "tool": "x,y", "ts": "t1"},
            {"capability_token_id": "j2", "agent_id": "b", "tenant": "acme", "tool": "", "ts": "t2"}
        ]});
        let revoked = json!({"items": [{"jti": "j2", "revoked_at": "t3", "reason": "lost"}]});
        let rows = token_rows(&minted, &revoked);
        assert_eq!(rows[0]["tools"], json!(["x", "y"]));
        assert_eq!(rows[0]["revoked_at"], Value::Null);
        assert_eq!(rows[1]["revoked_at"], json!("t3"));
        assert_eq!(rows[1]["revoke_reason"], json!("lost"));
    }
}
