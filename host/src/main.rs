//! The `intentgate` binary: argument parsing and one call into the library per subcommand.

// The gateway's request futures nest deeply (see the library's crate root).
#![recursion_limit = "256"]

/// The allocator of the gateway's process (see host/Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use intentgate::cli;
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
    /// Capability tokens: mint, revoke, list, attenuate.
    Tokens {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: cli::TokensCmd,
    },
    /// Rego policies of a tenant: draft, test, dry-run, promote, roll back.
    Policy {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: cli::PolicyCmd,
    },
    /// Whole bundles of checks: list, new from the active one, draft, promote, roll back.
    Bundle {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: cli::BundleCmd,
    },
    /// The approval queue: list, approve, reject.
    Approvals {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: cli::ApprovalsCmd,
    },
    /// Outbox destinations (webhooks, notifications, SIEMs): backlog, dead letters, last error.
    #[command(
        after_help = "Examples:\n  intentgate integrations\n  intentgate integrations -o json"
    )]
    Integrations {
        #[command(flatten)]
        conn: cli::Connection,
    },
    /// The audit chain: query, export (resumable), verify online or offline, checkpoints.
    Audit {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: cli::AuditCmd,
    },
    /// Check plugins: scaffold and validate offline; upload, list and delete in the gateway.
    Plugin {
        #[command(flatten)]
        conn: cli::Connection,
        #[command(subcommand)]
        cmd: PluginCommand,
    },
    /// Profiles of the operator CLI: gateway URL, where the admin token is, tenant.
    #[command(subcommand)]
    Profile(cli::ProfileCmd),
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Example:\n  intentgate completions bash > /etc/bash_completion.d/intentgate"
    )]
    Completions { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Create a plugin crate from the template (builds with one cargo command).
    New {
        name: String,
        /// `check-plugin` (a check) or `formatter` (an outbox formatter).
        #[arg(long, default_value = "check-plugin", value_parser = ["check-plugin", "formatter"])]
        world: String,
        /// Parent directory of the new crate.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path of a plugin SDK crate to depend on [default: a copy of the SDK this binary
        /// carries, written into the new crate's vendor/, so it builds anywhere].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Validate a component against the plugin worlds.
    Check { file: PathBuf },
    #[command(flatten)]
    Admin(cli::PluginCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Some(c) => c,
        None => Command::Serve(cli.serve),
    };
    match command {
        Command::Serve(args) => serve(args),
        Command::Audit {
            cmd:
                cli::AuditCmd::Verify {
                    file: Some(file),
                    checkpoint: Some(checkpoint),
                    public_key: Some(public_key),
                },
            ..
        } => audit_verify(&file, &checkpoint, &public_key),
        Command::Audit {
            cmd: cli::AuditCmd::PrepareRollback { data_dir, database },
            ..
        } => prepare_rollback(&database.unwrap_or_else(|| data_dir.join("intentgate.sqlite3"))),
        Command::Audit { conn, cmd } => cli::finish(cmd.run(&conn)),
        Command::Tokens { conn, cmd } => cli::finish(cmd.run(&conn)),
        Command::Approvals { conn, cmd } => cli::finish(cmd.run(&conn)),
        Command::Integrations { conn } => cli::finish(cli::integrations(&conn)),
        Command::Policy { conn, cmd } => cli::finish(cmd.run(&conn)),
        Command::Bundle { conn, cmd } => cli::finish(cmd.run(&conn)),
        Command::Plugin {
            conn,
            cmd: PluginCommand::Admin(cmd),
        } => cli::finish(cmd.run(&conn)),
        Command::Profile(cmd) => cli::finish(cmd.run()),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "intentgate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Plugin {
            cmd:
                PluginCommand::New {
                    name,
                    world,
                    dir,
                    sdk,
                },
            ..
        } => {
            use intentgate::plugins::scaffold::{SdkSource, new_plugin_of};
            let world = match world.as_str() {
                "formatter" => intentgate::plugins::runtime::World::SiemFormatter,
                _ => intentgate::plugins::runtime::World::CheckPlugin,
            };
            let source = match sdk {
                Some(sdk) => SdkSource::Path(sdk),
                None => SdkSource::Vendored,
            };
            let created = new_plugin_of(&dir, &name, &source, world);
            match created {
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
        Command::Plugin {
            cmd: PluginCommand::Check { file },
            ..
        } => {
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

fn prepare_rollback(db: &std::path::Path) -> ExitCode {
    use std::io::Write as _;
    let mut shown = std::time::Instant::now();
    let prepared = intentgate::audit::rollback::prepare(
        db,
        intentgate::audit::rollback::SLICE,
        |upto, last| {
            if shown.elapsed() >= std::time::Duration::from_secs(1) || upto == last {
                shown = std::time::Instant::now();
                eprint!("\rentered up to event {upto} of {last}");
                let _ = std::io::stderr().flush();
            }
        },
    );
    match prepared {
        Ok(p) if p.slices == 0 => {
            println!(
                "{}: the database file's lookup tables already cover every event (up to {})",
                db.display(),
                p.upto
            );
            ExitCode::SUCCESS
        }
        Ok(p) => {
            eprintln!();
            println!(
                "{}: entered events {} to {} in {} transaction(s); the database file's lookup tables cover every event up to {}. Stop the gateway and start the older binary now: it enters only what was written after this.",
                db.display(),
                p.from + 1,
                p.upto,
                p.slices,
                p.upto
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

fn audit_verify(file: &PathBuf, checkpoint: &PathBuf, public_key: &str) -> ExitCode {
    let key = match std::fs::read_to_string(public_key) {
        Ok(text) => text.trim().to_owned(),
        Err(_) => public_key.trim().to_owned(),
    };
    // A file that cannot be read is no verdict on the chain: not exit 1, which says it failed.
    let local = |what: &PathBuf, e: std::io::Error| {
        eprintln!("intentgate: {}: {e}", what.display());
        ExitCode::from(intentgate::cli::EXIT_LOCAL)
    };
    let checkpoint = match std::fs::read_to_string(checkpoint) {
        Ok(c) => c,
        Err(e) => return local(checkpoint, e),
    };
    let export = match std::fs::File::open(file) {
        Ok(f) => std::io::BufReader::new(f),
        Err(e) => return local(file, e),
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
    intentgate::logging::init(config.telemetry.log_format, &config.telemetry.log_filter);
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
