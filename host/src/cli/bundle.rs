//! `intentgate bundle list | get | new | draft | promote | rollback | dry-run | delete |
//! history`: whole bundles of checks (`/v1/admin/bundles`).

use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;
use serde_json::{Value, json};

use super::client::{Client, Payload, segment};
use super::output::{self, cell};
use super::profile::{Connection, Output};
use super::{CliError, with_client};

#[derive(Subcommand, Debug)]
pub enum BundleCmd {
    /// The tenant's active and rollback bundles and its drafts.
    #[command(after_help = "Example:\n  intentgate bundle list --tenant acme")]
    List,
    /// One bundle (a draft, or one the tenant runs) with its spec.
    #[command(after_help = "Example:\n  intentgate bundle get sha256:… -o json")]
    Get { digest: String },
    /// Write a bundle's spec to a file to edit, then `bundle draft FILE`.
    #[command(
        after_help = "Example:\n  intentgate bundle new --from active --out bundle.json --tenant acme"
    )]
    New {
        /// `active` (the tenant's running bundle) or a bundle digest.
        #[arg(long, default_value = "active")]
        from: String,
        /// Where to write the spec (`-`: standard output).
        #[arg(long, default_value = "-")]
        out: PathBuf,
    },
    /// Create a draft from a spec file (`{"stages": …}` or `{"name": …, "spec": …}`).
    #[command(
        after_help = "Example:\n  intentgate bundle draft bundle.json --name stricter --tenant acme"
    )]
    Draft {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
    },
    /// Make a draft the tenant's active bundle.
    #[command(after_help = "Example:\n  intentgate bundle promote sha256:… --tenant acme")]
    Promote { digest: String },
    /// Swap back to the previous active bundle.
    #[command(after_help = "Example:\n  intentgate bundle rollback --tenant acme")]
    Rollback,
    /// Replay recorded calls against a draft.
    #[command(after_help = "Example:\n  intentgate bundle dry-run sha256:… --sample last-24h")]
    DryRun {
        digest: String,
        #[arg(long, default_value = "last-24h")]
        sample: String,
    },
    /// Delete a draft that is not active.
    #[command(after_help = "Example:\n  intentgate bundle delete sha256:…")]
    Delete { digest: String },
    /// The tenant's promotions and rollbacks.
    #[command(after_help = "Example:\n  intentgate bundle history --tenant acme")]
    History,
}

impl BundleCmd {
    pub fn run(self, conn: &Connection) -> Result<(), CliError> {
        with_client(conn, |c| self.remote(c))
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        let out = c.output();
        match self {
            BundleCmd::List => {
                let v = c.get("/v1/admin/bundles", &[]).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&v)),
                    Output::Table => {
                        let s = v.get("status").cloned().unwrap_or(Value::Null);
                        println!(
                            "tenant {}: active {}{}, previous {}\n",
                            cell(s.get("tenant")),
                            cell(s.get("active")),
                            if s.get("is_default") == Some(&Value::Bool(true)) {
                                " (default)"
                            } else {
                                ""
                            },
                            match cell(s.get("previous")) {
                                p if p.is_empty() => "none".into(),
                                p => p,
                            }
                        );
                        let rows = v
                            .get("drafts")
                            .and_then(Value::as_array)
                            .cloned()
                            .unwrap_or_default();
                        print!(
                            "{}",
                            output::table(&rows, &["digest", "name", "created_at"])
                        );
                    }
                }
                Ok(())
            }
            BundleCmd::Get { digest } => {
                let v = get_bundle(&c, &digest).await?;
                println!("{}", output::pretty(&v));
                Ok(())
            }
            BundleCmd::New { from, out: path } => {
                let digest = if from == "active" {
                    let v = c.get("/v1/admin/bundles", &[]).await?;
                    cell(v.get("status").and_then(|s| s.get("active")))
                } else {
                    from
                };
                let bundle = get_bundle(&c, &digest).await?;
                let spec = bundle.get("spec").cloned().ok_or_else(|| {
                    CliError::Refused(format!("bundle {digest} came back without a spec"))
                })?;
                let text = output::pretty(&json!({"name": cell(bundle.get("name")), "spec": spec}));
                if path.as_os_str() == "-" {
                    println!("{text}");
                } else {
                    std::fs::write(&path, text + "\n")
                        .map_err(|e| CliError::Local(format!("{}: {e}", path.display())))?;
                    eprintln!(
                        "wrote {}: edit it, then `intentgate bundle draft {}`",
                        path.display(),
                        path.display()
                    );
                }
                Ok(())
            }
            BundleCmd::Draft { file, name } => {
                let text = super::read_file(&file)?;
                let doc: Value = serde_json::from_slice(&text)
                    .map_err(|e| CliError::Usage(format!("{} is not JSON: {e}", file.display())))?;
                let (mut body_name, spec) = match doc.get("spec") {
                    Some(spec) => (cell(doc.get("name")), spec.clone()),
                    None => (String::new(), doc),
                };
                if let Some(n) = name {
                    body_name = n;
                }
                let draft = c
                    .post(
                        "/v1/admin/bundles",
                        &json!({"name": body_name, "spec": spec}),
                    )
                    .await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&draft)),
                    Output::Table => println!(
                        "draft {}\npromote it with: intentgate bundle promote {}",
                        cell(draft.get("digest")),
                        cell(draft.get("digest"))
                    ),
                }
                Ok(())
            }
            BundleCmd::Promote { digest } => {
                let path = format!("/v1/admin/bundles/{}/promote", segment(&digest));
                let v = c.post(&path, &json!({})).await?;
                print_swap(out, &v);
                Ok(())
            }
            BundleCmd::Rollback => {
                let v = c.post("/v1/admin/bundles/rollback", &json!({})).await?;
                print_swap(out, &v);
                Ok(())
            }
            BundleCmd::DryRun { digest, sample } => {
                let path = format!("/v1/admin/bundles/{}/dry-run", segment(&digest));
                let v = c.post(&path, &json!({"sample": sample})).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&v)),
                    Output::Table => print!("{}", super::policy::dry_run_text(&v)),
                }
                Ok(())
            }
            BundleCmd::Delete { digest } => {
                let path = format!("/v1/admin/bundles/{}", segment(&digest));
                c.call(Method::DELETE, &path, &[], Payload::None).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&json!({"deleted": digest}))),
                    Output::Table => println!("deleted {digest}"),
                }
                Ok(())
            }
            BundleCmd::History => {
                let v = c.get("/v1/admin/bundles/history", &[]).await?;
                let rows = v.as_array().cloned().unwrap_or_default();
                let cols: Vec<&str> = rows
                    .first()
                    .and_then(Value::as_object)
                    .map(|o| o.keys().map(String::as_str).collect())
                    .unwrap_or_else(|| vec!["tenant"]);
                output::print(out, &v, &rows, &cols);
                Ok(())
            }
        }
    }
}

async fn get_bundle(c: &Client, digest: &str) -> Result<Value, CliError> {
    c.get(&format!("/v1/admin/bundles/{}", segment(digest)), &[])
        .await
}

fn print_swap(out: Output, v: &Value) {
    match out {
        Output::Json => println!("{}", output::pretty(v)),
        Output::Table => {
            let obj = v.as_object().cloned().unwrap_or_default();
            for (k, val) in obj {
                println!("{k}: {}", cell(Some(&val)));
            }
        }
    }
}
