//! The telemetry settings: Prometheus `/metrics` (where, whether, who may scrape) and the log
//! format. Flattened into [`super::ServeArgs`] and validated into [`TelemetryConfig`].
//!
//! Safe by default: `/metrics` is served on the main listener and every scrape needs a bearer
//! token (the metrics token or the superadmin token). Scraping without a token must be asked
//! for (`INTENTGATE_METRICS_AUTH=none`) and is accepted only on a separate listener bound to a
//! loopback address. This module must never print the metrics token.

use std::net::SocketAddr;

use clap::Args;

use super::{ConfigError, invalid};
pub use crate::logging::LogFormat;

/// The raw telemetry flags and variables.
#[derive(Args, Clone, Debug)]
pub struct TelemetryArgs {
    /// Serve Prometheus metrics at `GET /metrics` (`false` answers 404).
    #[arg(
        long,
        env = "INTENTGATE_METRICS_ENABLED",
        default_value = "true",
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub metrics_enabled: bool,
    /// Serve `/metrics` on this address (plain HTTP) instead of the main listener.
    #[arg(long, env = "INTENTGATE_METRICS_ADDR")]
    pub metrics_addr: Option<String>,
    /// A bearer token (>= 16 characters) that may scrape `/metrics` and nothing else; the
    /// superadmin token may scrape too.
    #[arg(long, env = "INTENTGATE_METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Who may scrape: `token` (the metrics or superadmin bearer token) or `none` (no token;
    /// accepted only with INTENTGATE_METRICS_ADDR on a loopback address).
    #[arg(long, env = "INTENTGATE_METRICS_AUTH", default_value = "token", value_parser = ["token", "none"])]
    pub metrics_auth: String,
    /// Log lines as `text` or `json` (one JSON object per line).
    #[arg(long, env = "INTENTGATE_LOG_FORMAT", default_value = "text", value_parser = str::parse::<LogFormat>)]
    pub log_format: LogFormat,
}

/// Where and how `/metrics` is served.
#[derive(Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    pub enabled: bool,
    /// A separate listener; `None` serves `/metrics` on the main one.
    pub addr: Option<SocketAddr>,
    /// The token that may only scrape.
    pub token: Option<String>,
    /// Scrapes need no token (only on a loopback-bound separate listener).
    pub open: bool,
}

impl std::fmt::Debug for MetricsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsConfig")
            .field("enabled", &self.enabled)
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("open", &self.open)
            .finish()
    }
}

/// The validated telemetry settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TelemetryConfig {
    pub metrics: MetricsConfig,
    pub log_format: LogFormat,
}

impl TelemetryArgs {
    /// Checks the settings; `main` is the main listener's address.
    pub fn validate(&self, main: SocketAddr) -> Result<TelemetryConfig, ConfigError> {
        let addr = match self.metrics_addr.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => {
                let addr: SocketAddr = raw.parse().map_err(|e| {
                    invalid(
                        "INTENTGATE_METRICS_ADDR",
                        format!("{e}: expected host:port such as 127.0.0.1:9090"),
                    )
                })?;
                if addr == main && addr.port() != 0 {
                    return Err(invalid(
                        "INTENTGATE_METRICS_ADDR",
                        "is the main listener's address; leave it unset to serve /metrics there",
                    ));
                }
                if !self.metrics_enabled {
                    return Err(invalid(
                        "INTENTGATE_METRICS_ADDR",
                        "set, but INTENTGATE_METRICS_ENABLED is false",
                    ));
                }
                Some(addr)
            }
        };
        if let Some(t) = &self.metrics_token
            && t.len() < 16
        {
            return Err(invalid(
                "INTENTGATE_METRICS_TOKEN",
                "must be at least 16 characters",
            ));
        }
        let open = self.metrics_auth == "none";
        if open && !addr.is_some_and(|a| a.ip().is_loopback()) {
            return Err(invalid(
                "INTENTGATE_METRICS_AUTH",
                "none is accepted only with INTENTGATE_METRICS_ADDR on a loopback address \
                 (127.0.0.1 or [::1]); elsewhere scrapes need INTENTGATE_METRICS_TOKEN",
            ));
        }
        Ok(TelemetryConfig {
            metrics: MetricsConfig {
                enabled: self.metrics_enabled,
                addr,
                token: self.metrics_token.clone(),
                open,
            },
            log_format: self.log_format,
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: TelemetryArgs,
    }

    fn parse(args: &[&str]) -> Result<TelemetryConfig, ConfigError> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        let main: SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        T::try_parse_from(v).expect("clap parse").a.validate(main)
    }

    #[test]
    fn defaults_serve_protected_metrics_on_the_main_listener() {
        let c = parse(&[]).expect("defaults");
        assert!(c.metrics.enabled && !c.metrics.open);
        assert_eq!(c.metrics.addr, None);
        assert_eq!(c.log_format, LogFormat::Text);
        let c = parse(&["--metrics-enabled", "false", "--log-format", "json"]).expect("valid");
        assert!(!c.metrics.enabled);
        assert_eq!(c.log_format, LogFormat::Json);
    }

    #[test]
    fn scraping_without_a_token_needs_a_loopback_listener() {
        let c = parse(&["--metrics-addr", "127.0.0.1:9090", "--metrics-auth", "none"])
            .expect("loopback");
        assert!(c.metrics.open);
        for bad in [
            vec!["--metrics-auth", "none"],
            vec!["--metrics-addr", "0.0.0.0:9090", "--metrics-auth", "none"],
        ] {
            let e = parse(&bad).expect_err("refused").to_string();
            assert!(e.starts_with("INTENTGATE_METRICS_AUTH"), "{e}");
        }
    }

    #[test]
    fn bad_settings_are_named_and_the_token_is_not_shown() {
        for (args, setting) in [
            (vec!["--metrics-addr", "nope"], "INTENTGATE_METRICS_ADDR"),
            (
                vec!["--metrics-addr", "127.0.0.1:8080"],
                "INTENTGATE_METRICS_ADDR",
            ),
            (
                vec![
                    "--metrics-addr",
                    "127.0.0.1:9",
                    "--metrics-enabled",
                    "false",
                ],
                "INTENTGATE_METRICS_ADDR",
            ),
            (vec!["--metrics-token", "short"], "INTENTGATE_METRICS_TOKEN"),
        ] {
            let e = parse(&args).expect_err("refused").to_string();
            assert!(e.starts_with(setting), "{args:?}: {e}");
        }
        let c = parse(&["--metrics-token", "scrape-secret-0123456789"]).expect("valid");
        assert!(!format!("{c:?}").contains("scrape-secret"));
    }
}
