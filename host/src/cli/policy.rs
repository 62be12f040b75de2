//! `intentgate policy draft | drafts | test | dry-run | promote | rollback | active | clear`:
//! the `/v1/admin/policies/*` shorthand of the admin API (Rego in the default bundle's policy
//! stage).

use std::path::{Path, PathBuf};

use clap::Subcommand;
use hyper::Method;
use serde_json::{Value, json};

use super::client::{Client, Payload};
use super::output::{self, cell};
use super::profile::{Connection, Output};
use super::{CliError, with_client};

#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Upload a Rego file as a draft (it compiles and its tests run before it is kept).
    #[command(
        after_help = "Example:\n  intentgate policy draft policies/examples/token_scope.rego --name scope --tenant acme"
    )]
    Draft {
        file: PathBuf,
        /// Draft name [default: the file's stem].
        #[arg(long)]
        name: Option<String>,
    },
    /// List the tenant's drafts.
    #[command(after_help = "Example:\n  intentgate policy drafts --tenant acme")]
    Drafts,
    /// Compile a Rego file, run its tests and, with --input, decide one call; nothing is stored.
    #[command(
        after_help = "Examples:\n  intentgate policy test my.rego\n  intentgate policy test my.rego --input '{\"tool\": \"send_email\", \"args\": {\"to\": \"x@y\"}}'"
    )]
    Test {
        file: PathBuf,
        /// One call in the Rego input's shape: `{tool, args, agent_id, intent_prompt, usage}`.
        #[arg(long)]
        input: Option<String>,
    },
    /// Replay recorded calls against a Rego file: the transition matrix and the changed calls.
    #[command(
        after_help = "Examples:\n  intentgate policy dry-run stricter.rego --sample last-24h\n  intentgate policy dry-run stricter.rego --sample last-7d -o json"
    )]
    DryRun {
        file: PathBuf,
        /// Recorded window: last-<N>m, last-<N>h or last-<N>d (at most 31 days).
        #[arg(long, default_value = "last-24h")]
        sample: String,
    },
    /// Make a draft the tenant's active policy.
    #[command(
        after_help = "Example:\n  intentgate policy promote sha256:… --tenant acme --promoted-by alice"
    )]
    Promote {
        draft_id: String,
        /// Who promotes, recorded in the audit event.
        #[arg(long)]
        promoted_by: Option<String>,
    },
    /// Swap back to the previous active policy.
    #[command(after_help = "Example:\n  intentgate policy rollback --tenant acme")]
    Rollback,
    /// Show the tenant's active policy.
    #[command(after_help = "Example:\n  intentgate policy active --tenant acme")]
    Active,
    /// Go back to the default bundle (deny by default).
    #[command(after_help = "Example:\n  intentgate policy clear --tenant acme")]
    Clear,
}

fn read_rego(file: &Path) -> Result<String, CliError> {
    String::from_utf8(super::read_file(file)?)
        .map_err(|_| CliError::Usage(format!("{} is not UTF-8 text", file.display())))
}

/// The policy plugin's configuration for `file`: the Rego text alone, or, with a
/// `NAME_test.rego` beside it (as the gateway reads `INTENTGATE_POLICY_FILE`), both modules,
/// so the gateway runs the tests when it compiles the draft. Says whether tests came along.
fn read_policy(file: &Path) -> Result<(String, bool), CliError> {
    let rego = read_rego(file)?;
    let source =
        crate::config::PolicySource::read(file).map_err(|e| CliError::Local(e.to_string()))?;
    if source.tests.is_empty() {
        return Ok((rego, false));
    }
    Ok((source.to_config(), true))
}

impl PolicyCmd {
    pub fn run(self, conn: &Connection) -> Result<(), CliError> {
        with_client(conn, |c| self.remote(c))
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        let out = c.output();
        match self {
            PolicyCmd::Draft { file, name } => {
                let (rego, _) = read_policy(&file)?;
                let name = name.unwrap_or_else(|| {
                    file.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "policy".into())
                });
                let mut body = json!({"name": name, "rego_source": rego});
                if let Some(t) = c.tenant() {
                    body["tenant"] = json!(t);
                }
                let draft = c.post("/v1/admin/policies/drafts", &body).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&draft)),
                    Output::Table => {
                        println!(
                            "draft {} ({})",
                            cell(draft.get("id")),
                            cell(draft.get("name"))
                        );
                        println!(
                            "promote it with: intentgate policy promote {}{}",
                            cell(draft.get("id")),
                            c.tenant()
                                .map(|t| format!(" --tenant {t}"))
                                .unwrap_or_default()
                        );
                    }
                }
                Ok(())
            }
            PolicyCmd::Drafts => {
                let drafts = c.get("/v1/admin/policies/drafts", &[]).await?;
                let rows = drafts.as_array().cloned().unwrap_or_default();
                output::print(out, &drafts, &rows, &["id", "name", "created_at"]);
                Ok(())
            }
            PolicyCmd::Test { file, input } => {
                let (rego, tested) = read_policy(&file)?;
                let input: Value = match &input {
                    Some(text) => serde_json::from_str(text)
                        .map_err(|e| CliError::Usage(format!("--input is not JSON: {e}")))?,
                    // A call no policy names: what matters is that it compiles and its tests pass.
                    None => json!({"tool": "intentgate.cli.test"}),
                };
                let report = c
                    .post(
                        "/v1/admin/policies/dry-run",
                        &json!({"rego_source": rego, "input": input}),
                    )
                    .await?;
                let decision = report
                    .get("decisions")
                    .and_then(|d| d.get(0))
                    .and_then(|d| d.get("candidate_decision"))
                    .cloned()
                    .unwrap_or(Value::Null);
                let verdict = if tested {
                    "compiles, tests pass"
                } else {
                    "compiles (no NAME_test.rego beside it: no tests ran)"
                };
                match out {
                    Output::Json => println!(
                        "{}",
                        output::pretty(
                            &json!({"ok": true, "tests_ran": tested, "decision": decision})
                        )
                    ),
                    Output::Table if input_given(&report) => println!(
                        "{}: {verdict}; decision for the input: {}",
                        file.display(),
                        cell(Some(&decision))
                    ),
                    Output::Table => println!("{}: {verdict}", file.display()),
                }
                Ok(())
            }
            PolicyCmd::DryRun { file, sample } => {
                let (rego, _) = read_policy(&file)?;
                let report = c
                    .post(
                        "/v1/admin/policies/dry-run",
                        &json!({"rego_source": rego, "sample": sample}),
                    )
                    .await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&report)),
                    Output::Table => print!("{}", dry_run_text(&report)),
                }
                Ok(())
            }
            PolicyCmd::Promote {
                draft_id,
                promoted_by,
            } => {
                let mut body = json!({"draft_id": draft_id});
                if let Some(t) = c.tenant() {
                    body["tenant"] = json!(t);
                }
                if let Some(p) = promoted_by {
                    body["promoted_by"] = json!(p);
                }
                let active = c.post("/v1/admin/policies/active", &body).await?;
                print_active(out, &active, "promoted");
                Ok(())
            }
            PolicyCmd::Rollback => {
                let active = c.post("/v1/admin/policies/rollback", &json!({})).await?;
                print_active(out, &active, "rolled back; active");
                Ok(())
            }
            PolicyCmd::Active => {
                let active = c.get("/v1/admin/policies/active", &[]).await?;
                print_active(out, &active, "active");
                Ok(())
            }
            PolicyCmd::Clear => {
                c.call(
                    Method::DELETE,
                    "/v1/admin/policies/active",
                    &[],
                    Payload::None,
                )
                .await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&json!({"cleared": true}))),
                    Output::Table => println!("cleared: the default bundle decides again"),
                }
                Ok(())
            }
        }
    }
}

fn input_given(report: &Value) -> bool {
    report
        .get("decisions")
        .and_then(|d| d.get(0))
        .and_then(|d| d.get("input"))
        .and_then(|i| i.get("tool"))
        .and_then(Value::as_str)
        != Some("intentgate.cli.test")
}

fn print_active(out: Output, active: &Value, verb: &str) {
    match out {
        Output::Json => println!("{}", output::pretty(active)),
        Output::Table => println!(
            "{verb}: {} ({}) for tenant {}, previous {}",
            cell(active.get("draft_id")),
            cell(active.get("name")),
            cell(active.get("tenant")),
            match cell(active.get("previous")) {
                s if s.is_empty() => "none".to_owned(),
                s => s,
            }
        ),
    }
}

/// The dry-run report for people: counts, the transition matrix, then each changed call as a
/// diff line (`- recorded` / `+ candidate`).
pub fn dry_run_text(report: &Value) -> String {
    let n = |k: &str| report.get(k).and_then(Value::as_u64).unwrap_or(0);
    let mut s = format!(
        "replayed {} calls: {} allow, {} block, {} escalate under the candidate\n",
        n("total"),
        n("would_allow"),
        n("would_block"),
        n("would_escalate")
    );
    if let Some(t) = report.get("transitions").and_then(Value::as_object) {
        s.push_str("\ntransitions (recorded -> candidate):\n");
        for (k, v) in t {
            s.push_str(&format!("  {k:<24} {}\n", cell(Some(v))));
        }
    }
    let changed: Vec<&Value> = report
        .get("decisions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|d| {
            d.get("actual_decision").is_some_and(|a| !a.is_null())
                && d.get("actual_decision") != d.get("candidate_decision")
        })
        .collect();
    if changed.is_empty() {
        s.push_str("\nno recorded call changes its decision\n");
    } else {
        s.push_str(&format!("\n{} calls change:\n", changed.len()));
        for d in changed {
            let input = d.get("input").cloned().unwrap_or(Value::Null);
            let what = format!(
                "event {} tool={} agent={}",
                cell(d.get("id")),
                cell(input.get("tool")),
                cell(input.get("agent_id"))
            );
            s.push_str(&format!("- {:<9} {what}\n", cell(d.get("actual_decision"))));
            s.push_str(&format!(
                "+ {:<9} {what}\n",
                cell(d.get("candidate_decision"))
            ));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dry_run_lists_changed_calls_as_a_diff() {
        let report = json!({
            "total": 2, "would_allow": 1, "would_block": 1, "would_escalate": 0,
            "transitions": {"allow->allow": 1, "allow->block": 1},
            "decisions": [
                {"id": "7", "input": {"tool": "echo", "agent_id": "a"}, "actual_decision": "allow", "candidate_decision": "allow"},
                {"id": "8", "input": {"tool": "send_email", "agent_id": "a"}, "actual_decision": "allow", "candidate_decision": "block"}
            ]
        });
        let text = dry_run_text(&report);
        assert!(text.contains("allow->block"), "{text}");
        assert!(
            text.contains("- allow     event 8 tool=send_email agent=a"),
            "{text}"
        );
        assert!(
            text.contains("+ block     event 8 tool=send_email agent=a"),
            "{text}"
        );
        assert!(!text.contains("event 7"), "{text}");
    }
}
