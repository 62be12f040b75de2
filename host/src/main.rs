//! The `intentgate` binary: argument parsing and one call into the library per subcommand.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use intentgate::config::ServeArgs;

#[derive(Parser)]
#[command(
    name = "intentgate",
    version,
    about = "Authorization gateway for AI agents",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand the gateway is served with these settings.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default when no subcommand is given).
    Serve(ServeArgs),
    /// Validate the configuration and print what would run (secrets redacted).
    CheckConfig(ServeArgs),
    /// Audit evidence tools that need no gateway.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Check plugins: scaffold one, validate a component.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Verify an NDJSON export against a signed checkpoint and the log's public key, offline.
    Verify {
        /// The export (`GET /v1/admin/audit/export?format=json`).
        #[arg(long)]
        file: PathBuf,
        /// A signed checkpoint kept outside the gateway (`GET /v1/admin/audit/checkpoints`).
        #[arg(long)]
        checkpoint: PathBuf,
        /// The log's public key (`GET /v1/admin/audit/public-key`): the text, or a file holding it.
        #[arg(long)]
        public_key: String,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a check-plugin crate from the template (builds with one cargo command).
    New {
        name: String,
        /// Parent directory of the new crate.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path of the plugin SDK crate the new crate depends on.
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Validate a component against the plugin worlds.
    Check { file: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(c) => c,
        None => Command::Serve(cli.serve),
    };
    match command {
        Command::Serve(args) => serve(args),
        Command::Audit(AuditCommand::Verify {
            file,
            checkpoint,
            public_key,
        }) => audit_verify(&file, &checkpoint, &public_key),
        Command::Plugin(PluginCommand::New { name, dir, sdk }) => {
            let sdk = sdk.unwrap_or_else(intentgate::plugins::scaffold::default_sdk_path);
            match intentgate::plugins::scaffold::new_plugin(&dir, &name, &sdk) {
                Ok(path) => {
                    println!("created {}", path.display());
                    println!(
                        "build it with: cargo build --release --target wasm32-wasip2 --manifest-path {}/Cargo.toml",
                        path.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Plugin(PluginCommand::Check { file }) => {
            let checked = intentgate::plugins::Runtime::shared()
                .and_then(|rt| intentgate::plugins::scaffold::check_file(&rt, &file));
            match checked {
                Ok(world) => {
                    println!("{}: implements {world:?}", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::CheckConfig(args) => match args.validate() {
            Ok(config) => {
                println!("{config:#?}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("intentgate: invalid configuration: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn fail(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("intentgate: {e}");
    ExitCode::FAILURE
}

fn audit_verify(file: &PathBuf, checkpoint: &PathBuf, public_key: &str) -> ExitCode {
    let key = match std::fs::read_to_string(public_key) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => public_key.trim().to_owned(),
    };
    let checkpoint = match std::fs::read_to_string(checkpoint) {
        Ok(c) => c,
        Err(e) => return fail(&format!("{}: {e}", checkpoint.display())),
    };
    let export = match std::fs::File::open(file) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => return fail(&format!("{}: {e}", file.display())),
    };
    match intentgate::audit::offline::verify_export(export, &checkpoint, &key) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => fail(&e),
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let config = match args.validate() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("intentgate: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("INTENTGATE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("intentgate: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match intentgate::run(config, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("intentgate: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
