//! The process's log output: `INTENTGATE_LOG_FORMAT=text` (human-readable lines, the default)
//! or `json` (one JSON object per line: `timestamp`, `level`, `target`, `fields` with the
//! message, and the enclosing spans), filtered by `INTENTGATE_LOG` (default `info`), which the
//! configuration reads and checks (`crate::config`).
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

/// The filter when `INTENTGATE_LOG` is unset or empty.
pub const DEFAULT_FILTER: &str = "info";

/// The filter of `directives` (`tracing` `EnvFilter` syntax), or why they do not parse.
pub fn filter(directives: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map_err(|e| format!("{e}: expected EnvFilter directives such as intentgate=debug,info"))
}

/// Installs the global subscriber writing to stdout (once per process; later calls do nothing),
/// with the filter of `directives` (checked by the configuration).
pub fn init(format: LogFormat, directives: &str) {
    // Checked in `config` already: the fallback is only for a caller that skipped it.
    let filter =
        filter(directives).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
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
