//! The operator CLI: `intentgate tokens | policy | bundle | plugin | audit | profile |
//! completions`, the verbs of the original's `igctl`.
//!
//! It is a client of the admin API and nothing more: every verb is one or a few admin requests,
//! so an operator can do from the shell exactly what the API allows, with the same tenant
//! scoping and the same audit trail. It must never open the store or read the gateway's data
//! directory (the one exception: reading an admin token from a `secrets.env` file the operator
//! names or that sits in the current directory, as the quickstart leaves it).
//!
//! Conventions: a profile file ([`profile`]), `--output table|json` (JSON is the API's own
//! answer, so field names are stable), and exit codes that mean something ([`CliError::exit_code`]):
//! 0 ok, 1 refused, 2 usage, 3 unreachable.

pub mod client;
pub mod output;
pub mod profile;

mod approvals;
mod audit;
mod bundle;
mod plugin;
mod policy;
mod tokens;

use std::process::ExitCode;

pub use approvals::{ApprovalsCmd, integrations};
pub use audit::AuditCmd;
pub use bundle::BundleCmd;
pub use plugin::PluginCmd;
pub use policy::PolicyCmd;
pub use profile::{Connection, ProfileCmd};
pub use tokens::TokensCmd;

/// Why a CLI command failed; each variant has its exit code and says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line or the profile is wrong (exit 2).
    #[error("{0}")]
    Usage(String),
    /// The gateway answered and refused, or a check came out negative (exit 1).
    #[error("{0}")]
    Refused(String),
    /// The gateway could not be reached (exit 3).
    #[error(
        "cannot reach the gateway at {url}: {detail}\n  hint: is it running (`intentgate serve`)? Set the address with --url, INTENTGATE_URL or a profile (`intentgate profile set`)."
    )]
    Unreachable { url: String, detail: String },
    /// A local file could not be read or written (exit 4: never 1, which a script reads as
    /// a refusal or a chain that does not verify).
    #[error("{0}")]
    Local(String),
}

/// The exit code of a local file that could not be read or written.
pub const EXIT_LOCAL: u8 = 4;

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => 2,
            Self::Refused(_) => 1,
            Self::Unreachable { .. } => 3,
            Self::Local(_) => EXIT_LOCAL,
        }
    }
}

/// Runs a verb to completion on a small current-thread runtime and maps the result to the
/// process exit code, printing the error (with its hint) to stderr.
pub fn finish(result: Result<(), CliError>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intentgate: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// One admin-API verb: resolve the connection, run `f` with a client on a current-thread runtime.
pub(crate) fn with_client<F, Fut>(conn: &Connection, f: F) -> Result<(), CliError>
where
    F: FnOnce(client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), CliError>>,
{
    let target = conn.resolve()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Local(format!("cannot start the runtime: {e}")))?;
    runtime.block_on(async move { f(client::Client::new(target)?).await })
}

/// Reads a file the operator named, with the path in the error.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>, CliError> {
    std::fs::read(path).map_err(|e| CliError::Local(format!("{}: {e}", path.display())))
}
