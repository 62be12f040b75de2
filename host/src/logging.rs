//! The process's log output: `INTENTGATE_LOG_FORMAT=text` (human-readable lines, the default)
//! or `json` (one JSON object per line: `timestamp`, `level`, `target`, `fields` with the
//! message, and the enclosing spans), filtered by `INTENTGATE_LOG` (default `info`).
//!
//! What is logged is decided where it is logged; this module only formats. No log line may
//! carry a secret: tokens, keys, the master key, upstream credentials (URLs are logged through
//! [`crate::config::redact_url`]). `host/tests/metrics.rs` plants secrets and checks every line.

use std::str::FromStr;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("{other:?}: expected text or json")),
        }
    }
}

/// Installs the global subscriber writing to stdout (once per process; later calls do nothing).
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("INTENTGATE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
    };
}
