//! `intentgate plugin upload | list | delete`: check and formatter components in the gateway
//! (`/v1/admin/plugins`). `plugin new` and `plugin check` work offline (see `main.rs`).

use std::path::PathBuf;

use clap::Subcommand;
use hyper::Method;
use serde_json::json;

use super::client::{Client, Payload, segment};
use super::output::{self, cell};
use super::profile::{Connection, Output};
use super::{CliError, with_client};

#[derive(Subcommand, Debug)]
pub enum PluginCmd {
    /// Upload a component (checked against the world before it is kept).
    #[command(
        after_help = "Example:\n  intentgate plugin upload target/wasm32-wasip2/release/my_check.wasm --name my-check --tenant acme"
    )]
    Upload {
        file: PathBuf,
        #[arg(long)]
        name: Option<String>,
        /// `check-plugin` or `formatter` (`siem-formatter` is accepted too).
        #[arg(long, default_value = "check-plugin")]
        world: String,
    },
    /// Components the tenant may use (the built-ins and its uploads).
    #[command(after_help = "Example:\n  intentgate plugin list --tenant acme")]
    List,
    /// Delete an uploaded component that no bundle references.
    #[command(after_help = "Example:\n  intentgate plugin delete sha256:… --tenant acme")]
    Delete { digest: String },
}

impl PluginCmd {
    pub fn run(self, conn: &Connection) -> Result<(), CliError> {
        with_client(conn, |c| self.remote(c))
    }

    async fn remote(self, c: Client) -> Result<(), CliError> {
        let out = c.output();
        match self {
            PluginCmd::Upload { file, name, world } => {
                let wasm = super::read_file(&file)?;
                if !wasm.starts_with(b"\0asm") {
                    return Err(CliError::Usage(format!(
                        "{} is not a WebAssembly component (build it with cargo build --release --target wasm32-wasip2)",
                        file.display()
                    )));
                }
                let name = name.unwrap_or_else(|| {
                    file.file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_else(|| "uploaded".into())
                });
                let info = c
                    .call(
                        Method::POST,
                        "/v1/admin/plugins",
                        &[("name", name), ("world", world)],
                        Payload::Wasm(wasm),
                    )
                    .await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&info)),
                    Output::Table => println!(
                        "uploaded {} as {}\nuse it in a bundle spec: intentgate bundle new --from active --out bundle.json",
                        cell(info.get("name")),
                        cell(info.get("digest"))
                    ),
                }
                Ok(())
            }
            PluginCmd::List => {
                let v = c.get("/v1/admin/plugins", &[]).await?;
                let rows = v.as_array().cloned().unwrap_or_default();
                output::print(out, &v, &rows, &["digest", "name", "world", "builtin"]);
                Ok(())
            }
            PluginCmd::Delete { digest } => {
                let path = format!("/v1/admin/plugins/{}", segment(&digest));
                c.call(Method::DELETE, &path, &[], Payload::None).await?;
                match out {
                    Output::Json => println!("{}", output::pretty(&json!({"deleted": digest}))),
                    Output::Table => println!("deleted {digest}"),
                }
                Ok(())
            }
        }
    }
}
