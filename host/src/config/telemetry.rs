//! The telemetry settings: Prometheus `/metrics` (where, whether, who may scrape), the log
//! format, and OpenTelemetry traces (the standard `OTEL_*` variables). Flattened into
//! [`super::ServeArgs`] and validated into [`TelemetryConfig`].
//!
//! Safe by default: `/metrics` is served on the main listener and every scrape needs a bearer
//! token (the metrics token or the superadmin token). Scraping without a token must be asked
//! for (`INTENTGATE_METRICS_AUTH=none`) and is accepted only on a separate listener bound to a
//! loopback address. Traces are exported only when an OTLP endpoint is set
//! (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`). This
//! module must never print the metrics token or the OTLP export headers.

use std::net::SocketAddr;

use clap::Args;

use super::{ConfigError, invalid};
pub use crate::logging::LogFormat;

/// The most `OTEL_BSP_MAX_QUEUE_SIZE` (traces) and `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` (spans) may
/// be: the export queue is a tokio channel, which panics at start past `usize::MAX >> 3`, and a
/// million traces waiting is already more memory than an export backlog deserves. (The two
/// count different things, so neither bounds the other.)
const MAX_BSP_SIZE: usize = 1_000_000;

/// The raw telemetry flags and variables.
#[derive(Args, Clone)]
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
    /// Which log lines are written: `tracing` `EnvFilter` directives such as
    /// `intentgate=debug,info` [default: info; empty counts as unset].
    #[arg(long = "log", env = "INTENTGATE_LOG", value_name = "FILTER")]
    pub log_filter: Option<String>,
    /// Log lines as `text` or `json` (one JSON object per line).
    #[arg(long, env = "INTENTGATE_LOG_FORMAT", default_value = "text", value_parser = str::parse::<LogFormat>)]
    pub log_format: LogFormat,
    /// OTLP/HTTP base URL; traces go to `{URL}/v1/traces`. Unset: no traces are exported.
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_ENDPOINT",
        value_name = "URL",
        hide_env_values = true
    )]
    pub otlp_endpoint: Option<String>,
    /// OTLP/HTTP traces URL, used as given (overrides OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(
        long,
        env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        value_name = "URL",
        hide_env_values = true
    )]
    pub otlp_traces_endpoint: Option<String>,
    /// Headers sent with every export, `key=value,key2=value2` (values URL-encoded).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_HEADERS", hide_env_values = true)]
    pub otlp_headers: Option<String>,
    /// The `service.name` of the exported traces.
    #[arg(long, env = "OTEL_SERVICE_NAME", default_value = "intentgate")]
    pub otel_service_name: String,
    /// always_on, always_off, traceidratio, parentbased_always_on, parentbased_always_off or
    /// parentbased_traceidratio.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        default_value = "parentbased_always_on"
    )]
    pub otel_traces_sampler: String,
    /// The ratio of the `*traceidratio` samplers (0 to 1, default 1).
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG")]
    pub otel_traces_sampler_arg: Option<String>,
    /// `true` turns tracing off whatever else is set.
    #[arg(
        long,
        env = "OTEL_SDK_DISABLED",
        default_value = "false",
        value_name = "BOOL",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::Set
    )]
    pub otel_sdk_disabled: bool,
    /// Most finished traces waiting for export; more are dropped and counted.
    #[arg(long, env = "OTEL_BSP_MAX_QUEUE_SIZE", default_value_t = 2048)]
    pub otel_bsp_max_queue_size: usize,
    /// Most spans in one export request.
    #[arg(long, env = "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", default_value_t = 512)]
    pub otel_bsp_max_export_batch_size: usize,
    /// Milliseconds a batch waits for more spans before it is sent.
    #[arg(long, env = "OTEL_BSP_SCHEDULE_DELAY", default_value_t = 5000)]
    pub otel_bsp_schedule_delay: u64,
    /// Milliseconds one export may take.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TIMEOUT", default_value_t = 10000)]
    pub otlp_timeout: u64,
}

impl std::fmt::Debug for TelemetryArgs {
    /// Without the metrics token, the export headers (which may carry the collector's
    /// credential) or the endpoints' userinfo and query.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| v.as_ref().map(|_| "<set>");
        f.debug_struct("TelemetryArgs")
            .field("metrics_enabled", &self.metrics_enabled)
            .field("metrics_addr", &self.metrics_addr)
            .field("metrics_token", &set(&self.metrics_token))
            .field("metrics_auth", &self.metrics_auth)
            .field("log_filter", &self.log_filter)
            .field("log_format", &self.log_format)
            .field("otlp_endpoint", &super::redact_raw_url(&self.otlp_endpoint))
            .field(
                "otlp_traces_endpoint",
                &super::redact_raw_url(&self.otlp_traces_endpoint),
            )
            .field("otlp_headers", &set(&self.otlp_headers))
            .field("otel_service_name", &self.otel_service_name)
            .field("otel_traces_sampler", &self.otel_traces_sampler)
            .field("otel_traces_sampler_arg", &self.otel_traces_sampler_arg)
            .field("otel_sdk_disabled", &self.otel_sdk_disabled)
            .field("otel_bsp_max_queue_size", &self.otel_bsp_max_queue_size)
            .field(
                "otel_bsp_max_export_batch_size",
                &self.otel_bsp_max_export_batch_size,
            )
            .field("otel_bsp_schedule_delay", &self.otel_bsp_schedule_delay)
            .field("otlp_timeout", &self.otlp_timeout)
            .finish()
    }
}

/// How calls are traced: the sampler, and where sampled traces go (`None`: nowhere).
#[derive(Clone)]
pub struct TracingConfig {
    pub sampler: crate::telemetry::Sampler,
    pub export: Option<crate::telemetry::ExportSettings>,
}

impl PartialEq for TracingConfig {
    fn eq(&self, other: &Self) -> bool {
        self.sampler == other.sampler
            && self.export.as_ref().map(|e| &e.endpoint)
                == other.export.as_ref().map(|e| &e.endpoint)
    }
}

impl Eq for TracingConfig {}

impl std::fmt::Debug for TracingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let e = self.export.as_ref();
        f.debug_struct("TracingConfig")
            .field("sampler", &self.sampler)
            .field("endpoint", &e.map(|e| super::redact_url(&e.endpoint)))
            .field(
                "headers",
                &e.map(|e| {
                    e.headers
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                }),
            )
            .field("service_name", &e.map(|e| e.service_name.as_str()))
            .finish()
    }
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
    /// `INTENTGATE_LOG`, checked: `EnvFilter` directives (`info` when unset).
    pub log_filter: String,
    pub tracing: TracingConfig,
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
        if let Some(t) = &self.metrics_token {
            if t.len() < 16 {
                return Err(invalid(
                    "INTENTGATE_METRICS_TOKEN",
                    "must be at least 16 characters",
                ));
            }
            if !super::bearer_chars_ok(t) {
                return Err(invalid("INTENTGATE_METRICS_TOKEN", super::BEARER_CHARS));
            }
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
            log_filter: self.log_filter()?,
            tracing: self.tracing()?,
        })
    }

    /// `INTENTGATE_LOG`: an empty value is unset (`info`), not a filter that turns every line
    /// off, errors included; one that does not parse stops the start rather than becoming
    /// `info` unnoticed.
    fn log_filter(&self) -> Result<String, ConfigError> {
        match self.log_filter.as_deref().map(str::trim) {
            None | Some("") => Ok(crate::logging::DEFAULT_FILTER.to_owned()),
            Some(directives) => {
                crate::logging::filter(directives).map_err(|e| invalid("INTENTGATE_LOG", e))?;
                Ok(directives.to_owned())
            }
        }
    }

    fn tracing(&self) -> Result<TracingConfig, ConfigError> {
        let sampler = crate::telemetry::Sampler::parse(
            &self.otel_traces_sampler,
            self.otel_traces_sampler_arg.as_deref(),
        )
        .map_err(|e| {
            let setting = if e.contains("expected a ratio") {
                "OTEL_TRACES_SAMPLER_ARG"
            } else {
                "OTEL_TRACES_SAMPLER"
            };
            invalid(setting, e)
        })?;
        let nonempty = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        };
        let (setting, url) = match (
            nonempty(&self.otlp_traces_endpoint),
            nonempty(&self.otlp_endpoint),
        ) {
            (Some(t), _) => ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", t),
            (None, Some(base)) => (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("{}/v1/traces", base.trim_end_matches('/')),
            ),
            (None, None) => {
                return Ok(TracingConfig {
                    sampler,
                    export: None,
                });
            }
        };
        if self.otel_sdk_disabled {
            return Ok(TracingConfig {
                sampler,
                export: None,
            });
        }
        let endpoint: hyper::Uri = url
            .parse()
            .map_err(|e| invalid(setting, format!("{e}: expected an http(s) URL")))?;
        if !matches!(endpoint.scheme_str(), Some("http" | "https")) || endpoint.host().is_none() {
            return Err(invalid(setting, "expected an http:// or https:// URL"));
        }
        let headers = parse_headers(self.otlp_headers.as_deref().unwrap_or(""))
            .map_err(|e| invalid("OTEL_EXPORTER_OTLP_HEADERS", e))?;
        for (setting, size) in [
            ("OTEL_BSP_MAX_QUEUE_SIZE", self.otel_bsp_max_queue_size),
            (
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                self.otel_bsp_max_export_batch_size,
            ),
        ] {
            if !(1..=MAX_BSP_SIZE).contains(&size) {
                return Err(invalid(
                    setting,
                    format!("{size} is outside 1..={MAX_BSP_SIZE}"),
                ));
            }
        }
        Ok(TracingConfig {
            sampler,
            export: Some(crate::telemetry::ExportSettings {
                endpoint,
                headers,
                service_name: self.otel_service_name.clone(),
                max_queue: self.otel_bsp_max_queue_size,
                max_batch: self.otel_bsp_max_export_batch_size,
                delay: std::time::Duration::from_millis(self.otel_bsp_schedule_delay.max(1)),
                timeout: std::time::Duration::from_millis(self.otlp_timeout.max(1)),
            }),
        })
    }
}

/// `OTEL_EXPORTER_OTLP_HEADERS`: `key=value` pairs separated by commas, values URL-encoded.
/// Errors never quote a value.
fn parse_headers(
    raw: &str,
) -> Result<Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>, String> {
    let mut out = Vec::new();
    for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err("expected key=value pairs separated by commas".into());
        };
        let name = hyper::header::HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("{:?} is not a header name", k.trim()))?;
        let value = hyper::header::HeaderValue::from_bytes(&percent_decode(v.trim()))
            .map_err(|_| format!("the value of {name} is not a valid header value"))?;
        out.push((name, value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
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

    /// The raw settings' `Debug` shows no secret: not the metrics token, not the export headers,
    /// not an endpoint's userinfo or query.
    #[test]
    fn the_raw_settings_debug_shows_no_secret() {
        let mut v = vec!["t"];
        v.extend_from_slice(&[
            "--metrics-token",
            "scrape-sekrit-0123456789",
            "--otlp-headers",
            "x-api-key=hdr-sekrit",
            "--otlp-endpoint",
            "https://svc:pw-sekrit@otel.internal:4318/?key=q-sekrit",
            "--otlp-traces-endpoint",
            "https://otel.internal/v1/traces?token=t-sekrit",
        ]);
        let a = T::try_parse_from(v).expect("clap parse").a;
        let dbg = format!("{a:?} {a:#?}");
        assert!(!dbg.contains("sekrit"), "{dbg}");
        assert!(dbg.contains("https://***@otel.internal:4318/?***"), "{dbg}");
        assert!(dbg.contains("metrics_token: Some(\"<set>\")"), "{dbg}");
    }

    /// The export queue and batch sizes are bounded: a huge queue made the exporter's channel
    /// panic at start.
    #[test]
    fn export_queue_and_batch_sizes_are_bounded() {
        let with =
            |flag: &str, v: &str| parse(&["--otlp-endpoint", "http://127.0.0.1:4318", flag, v]);
        for (flag, setting) in [
            ("--otel-bsp-max-queue-size", "OTEL_BSP_MAX_QUEUE_SIZE"),
            (
                "--otel-bsp-max-export-batch-size",
                "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            ),
        ] {
            for bad in ["0", "1000001", &usize::MAX.to_string()] {
                let e = with(flag, bad).expect_err("refused").to_string();
                assert!(e.starts_with(setting), "{flag} {bad}: {e}");
            }
            with(flag, "1000000").expect("the bound itself");
        }
        let c = parse(&["--otlp-endpoint", "http://127.0.0.1:4318"]).expect("defaults");
        let e = c.tracing.export.expect("export");
        assert_eq!((e.max_queue, e.max_batch), (2048, 512));
    }

    /// INTENTGATE_LOG: empty or blank is unset (`info`), not a filter that turns every line off,
    /// errors included; a value that does not parse is refused by name, not turned into `info`
    /// unnoticed; a valid one is kept as given.
    #[test]
    fn the_log_filter_is_checked() {
        assert_eq!(parse(&[]).expect("defaults").log_filter, "info");
        for blank in ["", "  "] {
            let c = parse(&["--log", blank]).expect("blank is unset");
            assert_eq!(c.log_filter, "info");
        }
        let c = parse(&["--log", "intentgate=debug,info"]).expect("valid");
        assert_eq!(c.log_filter, "intentgate=debug,info");
        for bad in ["intentgate=loud", "info,[{"] {
            let e = parse(&["--log", bad]).expect_err("refused").to_string();
            assert!(e.starts_with("INTENTGATE_LOG:"), "{bad}: {e}");
        }
    }

    #[test]
    fn otel_variables_make_the_traces_config() {
        let c = parse(&[]).expect("defaults");
        assert!(c.tracing.export.is_none(), "no endpoint, no export");
        let c = parse(&[
            "--otlp-endpoint",
            "http://127.0.0.1:4318/",
            "--otlp-headers",
            "x-api-key=sec%20ret-value,tenant=a",
            "--otel-traces-sampler",
            "parentbased_traceidratio",
            "--otel-traces-sampler-arg",
            "0.25",
        ])
        .expect("valid");
        let e = c.tracing.export.as_ref().expect("export");
        assert_eq!(e.endpoint.to_string(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(e.headers[0].1.as_bytes(), b"sec ret-value");
        assert_eq!(e.service_name, "intentgate");
        assert!(!format!("{c:?}").contains("sec ret"), "{c:?}");
        let c = parse(&[
            "--otlp-endpoint",
            "http://a:1",
            "--otlp-traces-endpoint",
            "http://b:2/custom",
        ])
        .expect("valid");
        let e = c.tracing.export.expect("export");
        assert_eq!(e.endpoint.to_string(), "http://b:2/custom");
        let c = parse(&[
            "--otlp-endpoint",
            "http://a:1",
            "--otel-sdk-disabled",
            "true",
        ])
        .expect("valid");
        assert!(c.tracing.export.is_none());
        for (args, setting) in [
            (
                vec!["--otel-traces-sampler", "sometimes"],
                "OTEL_TRACES_SAMPLER",
            ),
            (
                vec![
                    "--otel-traces-sampler",
                    "traceidratio",
                    "--otel-traces-sampler-arg",
                    "1.5",
                ],
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                vec!["--otlp-endpoint", "ftp://x"],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec!["--otlp-endpoint", "http://x", "--otlp-headers", "novalue"],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
        ] {
            let e = parse(&args).expect_err("refused").to_string();
            assert!(e.starts_with(setting), "{args:?}: {e}");
        }
    }
}
