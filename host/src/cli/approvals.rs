//! `intentgate approvals list | approve | reject` and `intentgate integrations`: the approval
//! queue and the outbox destinations' health, through the admin API only.

use clap::Subcommand;
use serde_json::{Value, json};

use super::client::Client;
use super::output;
use super::profile::{Connection, Output};
use super::{CliError, with_client};

#[derive(Subcommand, Debug)]
pub enum ApprovalsCmd {
    /// The approval queue, oldest first (pending by default).
    #[command(
        after_help = "Examples:\n  intentgate approvals list\n  intentgate approvals list --status all --tenant acme -o json"
    )]
    List {
        /// pending, approved, rejected, expired, consumed or all.
        #[arg(long, default_value = "pending")]
        status: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Approve a pending call: it may then run, once (the agent resumes it, or its held
    /// request completes).
    #[command(
        after_help = "Example:\n  intentgate approvals approve pa_3f… --by alice@example.com --note 'ticket 4411'"
    )]
    Approve {
        pending_id: String,
        /// Who decides (recorded as `decided_by`; not the agent the approval was issued to).
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Reject a pending call: it never runs, and the agent is told why.
    #[command(
        after_help = "Example:\n  intentgate approvals reject pa_3f… --by alice@example.com --note 'not during the freeze'"
    )]
    Reject {
        pending_id: String,
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        note: String,
    },
}

impl ApprovalsCmd {
    pub fn run(self, conn: &Connection) -> Result<(), CliError> {
        with_client(conn, |c| self.remote(c))
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        match self {
            ApprovalsCmd::List { status, limit } => {
                let mut query = vec![
                    ("status", status),
                    ("limit", limit.clamp(1, 500).to_string()),
                ];
                if let Some(t) = c.tenant() {
                    query.push(("tenant", t.to_owned()));
                }
                let page = c.get("/v1/admin/approvals", &query).await?;
                let items = page["items"].as_array().cloned().unwrap_or_default();
                output::print(
                    c.output(),
                    &page,
                    &items,
                    &[
                        "pending_id",
                        "tenant",
                        "agent_id",
                        "tool",
                        "status",
                        "requires_step_up",
                        "reason",
                        "expires_at",
                    ],
                );
                Ok(())
            }
            ApprovalsCmd::Approve {
                pending_id,
                by,
                note,
            } => decide(&c, &pending_id, "approve", by, note).await,
            ApprovalsCmd::Reject {
                pending_id,
                by,
                note,
            } => decide(&c, &pending_id, "reject", by, note).await,
        }
    }
}

async fn decide(
    c: &Client,
    id: &str,
    decision: &str,
    by: String,
    note: String,
) -> Result<(), CliError> {
    if !crate::approvals::valid_id(id) {
        return Err(CliError::Usage(format!(
            "{id:?} is not a pending id (pa_ and 32 hex digits; see `intentgate approvals list`)"
        )));
    }
    let mut body = json!({"decision": decision, "decided_by": by, "note": note});
    if let Some(t) = c.tenant() {
        body["tenant"] = json!(t);
    }
    let answer = c
        .post(&format!("/v1/admin/approvals/{id}/decide"), &body)
        .await?;
    match c.output() {
        Output::Json => println!("{}", output::pretty(&answer)),
        Output::Table => println!(
            "{id}: {} (audit event {})",
            output::cell(answer["approval"].get("status")),
            output::cell(answer.get("event_id"))
        ),
    }
    Ok(())
}

/// `intentgate integrations`: each outbox destination's health.
pub fn integrations(conn: &Connection) -> Result<(), CliError> {
    with_client(conn, |c| async move {
        let mut query = Vec::new();
        if let Some(t) = c.tenant() {
            query.push(("tenant", t.to_owned()));
        }
        let v = c.get("/v1/admin/integrations", &query).await?;
        let rows: Vec<Value> = match &v {
            Value::Array(a) => a.clone(),
            other => other
                .get("destinations")
                .or_else(|| other.get("items"))
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default(),
        };
        output::print(
            c.output(),
            &v,
            &rows,
            &[
                "id",
                "kind",
                "failing",
                "backlog",
                "dead_letters",
                "oldest_undelivered_ts",
                "last_success_ts",
                "last_error",
            ],
        );
        Ok(())
    })
}
