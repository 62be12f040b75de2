//! The outbox settings: delivery tuning (`INTENTGATE_OUTBOX_*`) and the destinations of the
//! original gateway's environment variables, kept compatible:
//! `INTENTGATE_WEBHOOK_URL`/`_SECRET`/`_EVENTS`, `INTENTGATE_SIEM_SPLUNK_HEC_URL`/`_TOKEN`
//! (plus `_INDEX`), `INTENTGATE_SIEM_DATADOG_API_KEY` with `INTENTGATE_SIEM_DATADOG_URL` (the
//! logs intake URL; default: the US1 site) or `_SITE`, and `_SERVICE`; and the sinks the
//! original did not have: `INTENTGATE_SIEM_S3_*` and `INTENTGATE_SIEM_SENTINEL_*`. Flattened into
//! [`super::ServeArgs`] and validated into [`crate::outbox::OutboxConfig`]. This module must
//! never print a secret.

use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use super::{ConfigError, invalid};
use crate::outbox::{Destination, DestinationSpec, OutboxConfig, Source};

/// The default Datadog logs intake (US1).
pub const DATADOG_US1: &str = "https://http-intake.logs.datadoghq.com/api/v2/logs";

/// The raw outbox flags and variables.
#[derive(Args, Clone)]
pub struct OutboxArgs {
    /// Webhook receiver for deny, escalate, approval and step-up events (signed).
    #[arg(long, env = "INTENTGATE_WEBHOOK_URL", hide_env_values = true)]
    pub webhook_url: Option<String>,
    /// Webhook signing secret: `whsec_<base64>` (Standard Webhooks) or any shared secret.
    #[arg(long, env = "INTENTGATE_WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<String>,
    /// Webhook events (comma-separated: deny, escalate, approval_timeout, step_up_required,
    /// approval_decided; the `intentgate.` prefix is accepted). Unset: all of them.
    #[arg(long, env = "INTENTGATE_WEBHOOK_EVENTS")]
    pub webhook_events: Option<String>,
    /// Splunk HTTP Event Collector URL (…/services/collector/event).
    #[arg(long, env = "INTENTGATE_SIEM_SPLUNK_HEC_URL", hide_env_values = true)]
    pub splunk_hec_url: Option<String>,
    /// Splunk HEC token.
    #[arg(long, env = "INTENTGATE_SIEM_SPLUNK_TOKEN", hide_env_values = true)]
    pub splunk_token: Option<String>,
    /// Splunk index (optional).
    #[arg(long, env = "INTENTGATE_SIEM_SPLUNK_INDEX")]
    pub splunk_index: Option<String>,
    /// Datadog API key; enables the Datadog logs destination.
    #[arg(long, env = "INTENTGATE_SIEM_DATADOG_API_KEY", hide_env_values = true)]
    pub datadog_api_key: Option<String>,
    /// Datadog logs intake URL (any site, or a local receiver).
    #[arg(long, env = "INTENTGATE_SIEM_DATADOG_URL", hide_env_values = true)]
    pub datadog_url: Option<String>,
    /// Datadog site (`datadoghq.eu`, `us3.datadoghq.com`, …) when no URL is given.
    #[arg(long, env = "INTENTGATE_SIEM_DATADOG_SITE")]
    pub datadog_site: Option<String>,
    /// Datadog `service` tag.
    #[arg(long, env = "INTENTGATE_SIEM_DATADOG_SERVICE")]
    pub datadog_service: Option<String>,
    /// S3 (or S3-compatible) bucket URL objects go under: path style
    /// (`https://s3.example.com/bucket`) or virtual-hosted (`https://bucket.s3.<region>.amazonaws.com`).
    #[arg(long, env = "INTENTGATE_SIEM_S3_URL", hide_env_values = true)]
    pub s3_url: Option<String>,
    /// S3 signing region (default `us-east-1`).
    #[arg(long, env = "INTENTGATE_SIEM_S3_REGION")]
    pub s3_region: Option<String>,
    /// S3 access key id.
    #[arg(long, env = "INTENTGATE_SIEM_S3_ACCESS_KEY_ID")]
    pub s3_access_key_id: Option<String>,
    /// S3 secret access key.
    #[arg(
        long,
        env = "INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY",
        hide_env_values = true
    )]
    pub s3_secret_access_key: Option<String>,
    /// Key prefix of the S3 objects (before `year=…/`).
    #[arg(long, env = "INTENTGATE_SIEM_S3_PREFIX")]
    pub s3_prefix: Option<String>,
    /// Microsoft Sentinel: the data collection endpoint (or the DCR's logs ingestion endpoint).
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_DCE_URL", hide_env_values = true)]
    pub sentinel_dce_url: Option<String>,
    /// Sentinel: the data collection rule's immutable id (`dcr-…`).
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_DCR_ID")]
    pub sentinel_dcr_id: Option<String>,
    /// Sentinel: the DCR stream (`Custom-<table>`).
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_STREAM")]
    pub sentinel_stream: Option<String>,
    /// Sentinel: the Entra directory (tenant) id, for Entra's token URL.
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_TENANT_ID")]
    pub sentinel_tenant_id: Option<String>,
    /// Sentinel: the app registration's client id.
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_CLIENT_ID")]
    pub sentinel_client_id: Option<String>,
    /// Sentinel: the app registration's client secret.
    #[arg(
        long,
        env = "INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub sentinel_client_secret: Option<String>,
    /// Sentinel: the token URL (default: Entra's, from the tenant id).
    #[arg(
        long,
        env = "INTENTGATE_SIEM_SENTINEL_TOKEN_URL",
        hide_env_values = true
    )]
    pub sentinel_token_url: Option<String>,
    /// Most events per SIEM request.
    #[arg(long, env = "INTENTGATE_OUTBOX_BATCH", default_value_t = 100)]
    pub outbox_batch: usize,
    /// Lanes (destination × tenant) delivered at once.
    #[arg(long, env = "INTENTGATE_OUTBOX_CONCURRENCY", default_value_t = 8)]
    pub outbox_concurrency: usize,
    /// How often the worker polls for due deliveries, in milliseconds, while anything is
    /// pending; with nothing pending it polls every 5 s at most (new events ring it at once).
    #[arg(long, env = "INTENTGATE_OUTBOX_POLL_MS", default_value_t = 1000)]
    pub outbox_poll_ms: u64,
    /// Bound of one delivery's HTTP exchange, in milliseconds.
    #[arg(long, env = "INTENTGATE_OUTBOX_TIMEOUT_MS", default_value_t = 10_000)]
    pub outbox_timeout_ms: u64,
    /// First retry delay after a failed delivery, in milliseconds (doubled per failure).
    #[arg(long, env = "INTENTGATE_OUTBOX_RETRY_BASE_MS", default_value_t = 1000)]
    pub outbox_retry_base_ms: u64,
    /// Longest retry delay, in milliseconds.
    #[arg(
        long,
        env = "INTENTGATE_OUTBOX_RETRY_MAX_MS",
        default_value_t = 300_000
    )]
    pub outbox_retry_max_ms: u64,
    /// Age after which a failing delivery becomes a dead letter, in seconds.
    #[arg(
        long,
        env = "INTENTGATE_OUTBOX_DEAD_AFTER_SECS",
        default_value_t = 259_200
    )]
    pub outbox_dead_after_secs: u64,
    /// Undelivered events beyond which `/healthz` and `/metrics` raise the backlog alarm.
    #[arg(
        long,
        env = "INTENTGATE_OUTBOX_BACKLOG_ALARM",
        default_value_t = 100_000
    )]
    pub outbox_backlog_alarm: u64,
    /// Whether destinations added over the admin API may reach loopback, private and
    /// link-local addresses (off: only public ones; see `outbox/address.rs`).
    #[arg(long, env = "INTENTGATE_OUTBOX_ALLOW_PRIVATE_NETWORKS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub outbox_allow_private_networks: bool,
}

impl std::fmt::Debug for OutboxArgs {
    /// Secrets only as `<set>`; URLs without their userinfo and query (a webhook's whole URL
    /// may be its credential, as a Slack one's path is).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |v: &Option<String>| v.as_ref().map(|_| "<set>");
        let url = super::redact_raw_url;
        f.debug_struct("OutboxArgs")
            .field("webhook_url", &set(&self.webhook_url))
            .field("webhook_secret", &set(&self.webhook_secret))
            .field("splunk_hec_url", &url(&self.splunk_hec_url))
            .field("splunk_token", &set(&self.splunk_token))
            .field("datadog_api_key", &set(&self.datadog_api_key))
            .field("datadog_url", &url(&self.datadog_url))
            .field("s3_url", &url(&self.s3_url))
            .field("s3_secret_access_key", &set(&self.s3_secret_access_key))
            .field("sentinel_dce_url", &url(&self.sentinel_dce_url))
            .field("sentinel_client_secret", &set(&self.sentinel_client_secret))
            .field("sentinel_token_url", &url(&self.sentinel_token_url))
            .finish_non_exhaustive()
    }
}

fn set(v: &Option<String>) -> Option<&str> {
    v.as_deref().map(str::trim).filter(|s| !s.is_empty())
}

/// A sink's settings given without the one that enables it: refused by name, naming the first
/// of them that is set, rather than ignored (a sink the operator thinks is configured would
/// receive nothing).
fn required_with(
    required: &'static str,
    others: &[(&'static str, &Option<String>)],
) -> Result<(), ConfigError> {
    match others.iter().find(|(_, v)| set(v).is_some()) {
        Some((name, _)) => Err(invalid(required, format!("is required with {name}"))),
        None => Ok(()),
    }
}

impl OutboxArgs {
    /// The S3 sink from `INTENTGATE_SIEM_S3_*`.
    fn s3(&self, env: &mut Vec<DestinationSpec>) -> Result<(), ConfigError> {
        let Some(url) = set(&self.s3_url) else {
            return required_with(
                "INTENTGATE_SIEM_S3_URL",
                &[
                    ("INTENTGATE_SIEM_S3_ACCESS_KEY_ID", &self.s3_access_key_id),
                    (
                        "INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY",
                        &self.s3_secret_access_key,
                    ),
                    ("INTENTGATE_SIEM_S3_REGION", &self.s3_region),
                    ("INTENTGATE_SIEM_S3_PREFIX", &self.s3_prefix),
                ],
            );
        };
        let key_id = set(&self.s3_access_key_id).ok_or_else(|| {
            invalid(
                "INTENTGATE_SIEM_S3_ACCESS_KEY_ID",
                "is required with INTENTGATE_SIEM_S3_URL",
            )
        })?;
        let secret = set(&self.s3_secret_access_key).ok_or_else(|| {
            invalid(
                "INTENTGATE_SIEM_S3_SECRET_ACCESS_KEY",
                "is required with INTENTGATE_SIEM_S3_URL",
            )
        })?;
        let mut settings = Map::new();
        settings.insert("access_key_id".into(), Value::from(key_id));
        for (k, v) in [("region", &self.s3_region), ("prefix", &self.s3_prefix)] {
            if let Some(v) = set(v) {
                settings.insert(k.into(), Value::from(v));
            }
        }
        env.push(DestinationSpec {
            name: "s3".into(),
            kind: "s3".into(),
            url: url.into(),
            secret: Some(secret.into()),
            settings,
            ..DestinationSpec::default()
        });
        Ok(())
    }

    /// Microsoft Sentinel from `INTENTGATE_SIEM_SENTINEL_*`.
    fn sentinel(&self, env: &mut Vec<DestinationSpec>) -> Result<(), ConfigError> {
        let Some(url) = set(&self.sentinel_dce_url) else {
            return required_with(
                "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                &[
                    (
                        "INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET",
                        &self.sentinel_client_secret,
                    ),
                    ("INTENTGATE_SIEM_SENTINEL_DCR_ID", &self.sentinel_dcr_id),
                    ("INTENTGATE_SIEM_SENTINEL_STREAM", &self.sentinel_stream),
                    (
                        "INTENTGATE_SIEM_SENTINEL_CLIENT_ID",
                        &self.sentinel_client_id,
                    ),
                    (
                        "INTENTGATE_SIEM_SENTINEL_TENANT_ID",
                        &self.sentinel_tenant_id,
                    ),
                    (
                        "INTENTGATE_SIEM_SENTINEL_TOKEN_URL",
                        &self.sentinel_token_url,
                    ),
                ],
            );
        };
        let secret = set(&self.sentinel_client_secret).ok_or_else(|| {
            invalid(
                "INTENTGATE_SIEM_SENTINEL_CLIENT_SECRET",
                "is required with INTENTGATE_SIEM_SENTINEL_DCE_URL",
            )
        })?;
        let mut settings = Map::new();
        for (k, setting, v, required) in [
            (
                "dcr_immutable_id",
                "INTENTGATE_SIEM_SENTINEL_DCR_ID",
                &self.sentinel_dcr_id,
                true,
            ),
            (
                "stream",
                "INTENTGATE_SIEM_SENTINEL_STREAM",
                &self.sentinel_stream,
                true,
            ),
            (
                "client_id",
                "INTENTGATE_SIEM_SENTINEL_CLIENT_ID",
                &self.sentinel_client_id,
                true,
            ),
            (
                "tenant_id",
                "INTENTGATE_SIEM_SENTINEL_TENANT_ID",
                &self.sentinel_tenant_id,
                false,
            ),
            (
                "token_url",
                "INTENTGATE_SIEM_SENTINEL_TOKEN_URL",
                &self.sentinel_token_url,
                false,
            ),
        ] {
            match set(v) {
                Some(v) => {
                    settings.insert(k.into(), Value::from(v));
                }
                None if required => {
                    return Err(invalid(
                        setting,
                        "is required with INTENTGATE_SIEM_SENTINEL_DCE_URL",
                    ));
                }
                None => {}
            }
        }
        if !settings.contains_key("tenant_id") && !settings.contains_key("token_url") {
            return Err(invalid(
                "INTENTGATE_SIEM_SENTINEL_TENANT_ID",
                "or INTENTGATE_SIEM_SENTINEL_TOKEN_URL is required with INTENTGATE_SIEM_SENTINEL_DCE_URL",
            ));
        }
        env.push(DestinationSpec {
            name: "sentinel".into(),
            kind: "sentinel".into(),
            url: url.into(),
            secret: Some(secret.into()),
            settings,
            ..DestinationSpec::default()
        });
        Ok(())
    }

    pub fn validate(&self) -> Result<OutboxConfig, ConfigError> {
        let mut env = Vec::new();
        if let Some(url) = set(&self.webhook_url) {
            env.push(DestinationSpec {
                name: "webhook".into(),
                kind: "webhook".into(),
                url: url.into(),
                secret: set(&self.webhook_secret).map(str::to_owned),
                events: set(&self.webhook_events)
                    .map(|e| e.split(',').map(|s| s.trim().to_owned()).collect())
                    .unwrap_or_default(),
                ..DestinationSpec::default()
            });
            if let Some(s) = set(&self.webhook_secret)
                && !crate::outbox::sign::valid_secret(s)
            {
                return Err(invalid(
                    "INTENTGATE_WEBHOOK_SECRET",
                    "a whsec_ secret must be followed by base64",
                ));
            }
        } else if set(&self.webhook_secret).is_some() || set(&self.webhook_events).is_some() {
            return Err(invalid(
                "INTENTGATE_WEBHOOK_URL",
                "is required when INTENTGATE_WEBHOOK_SECRET or _EVENTS is set",
            ));
        }
        match (set(&self.splunk_hec_url), set(&self.splunk_token)) {
            (Some(url), Some(token)) => {
                let mut settings = Map::new();
                if let Some(index) = set(&self.splunk_index) {
                    settings.insert("index".into(), Value::from(index));
                }
                env.push(DestinationSpec {
                    name: "splunk".into(),
                    kind: "splunk".into(),
                    url: url.into(),
                    secret: Some(token.into()),
                    settings,
                    ..DestinationSpec::default()
                });
            }
            (Some(_), None) => {
                return Err(invalid(
                    "INTENTGATE_SIEM_SPLUNK_TOKEN",
                    "is required with INTENTGATE_SIEM_SPLUNK_HEC_URL",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "INTENTGATE_SIEM_SPLUNK_HEC_URL",
                    "is required with INTENTGATE_SIEM_SPLUNK_TOKEN",
                ));
            }
            (None, None) => required_with(
                "INTENTGATE_SIEM_SPLUNK_HEC_URL",
                &[("INTENTGATE_SIEM_SPLUNK_INDEX", &self.splunk_index)],
            )?,
        }
        if let Some(key) = set(&self.datadog_api_key) {
            let url = match (set(&self.datadog_url), set(&self.datadog_site)) {
                (Some(u), _) => u.to_owned(),
                (None, Some(site)) => format!("https://http-intake.logs.{site}/api/v2/logs"),
                (None, None) => DATADOG_US1.to_owned(),
            };
            let mut settings = Map::new();
            if let Some(service) = set(&self.datadog_service) {
                settings.insert("service".into(), Value::from(service));
            }
            env.push(DestinationSpec {
                name: "datadog".into(),
                kind: "datadog".into(),
                url,
                secret: Some(key.into()),
                settings,
                ..DestinationSpec::default()
            });
        } else {
            required_with(
                "INTENTGATE_SIEM_DATADOG_API_KEY",
                &[
                    ("INTENTGATE_SIEM_DATADOG_URL", &self.datadog_url),
                    ("INTENTGATE_SIEM_DATADOG_SITE", &self.datadog_site),
                    ("INTENTGATE_SIEM_DATADOG_SERVICE", &self.datadog_service),
                ],
            )?;
        }
        self.s3(&mut env)?;
        self.sentinel(&mut env)?;
        for spec in &env {
            let setting = match spec.kind.as_str() {
                "webhook" => "INTENTGATE_WEBHOOK_URL",
                "splunk" => "INTENTGATE_SIEM_SPLUNK_HEC_URL",
                "s3" => "INTENTGATE_SIEM_S3_URL",
                "sentinel" => "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                _ => "INTENTGATE_SIEM_DATADOG_URL",
            };
            Destination::new(spec.clone(), None, Source::Env)
                .map_err(|e| invalid(setting, e.to_string()))?;
        }
        let ranged = |setting: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(setting, format!("must be within {lo}..={hi}")))
            }
        };
        let retry_base = ranged(
            "INTENTGATE_OUTBOX_RETRY_BASE_MS",
            self.outbox_retry_base_ms,
            1,
            3_600_000,
        )?;
        let retry_max = ranged(
            "INTENTGATE_OUTBOX_RETRY_MAX_MS",
            self.outbox_retry_max_ms,
            retry_base,
            86_400_000,
        )?;
        Ok(OutboxConfig {
            env_destinations: env,
            batch: ranged("INTENTGATE_OUTBOX_BATCH", self.outbox_batch as u64, 1, 1000)? as usize,
            concurrency: ranged(
                "INTENTGATE_OUTBOX_CONCURRENCY",
                self.outbox_concurrency as u64,
                1,
                256,
            )? as usize,
            poll: Duration::from_millis(ranged(
                "INTENTGATE_OUTBOX_POLL_MS",
                self.outbox_poll_ms,
                10,
                60_000,
            )?),
            timeout: Duration::from_millis(ranged(
                "INTENTGATE_OUTBOX_TIMEOUT_MS",
                self.outbox_timeout_ms,
                100,
                300_000,
            )?),
            retry_base: Duration::from_millis(retry_base),
            retry_max: Duration::from_millis(retry_max),
            dead_after: Duration::from_secs(ranged(
                "INTENTGATE_OUTBOX_DEAD_AFTER_SECS",
                self.outbox_dead_after_secs,
                1,
                365 * 86_400,
            )?),
            backlog_alarm: ranged(
                "INTENTGATE_OUTBOX_BACKLOG_ALARM",
                self.outbox_backlog_alarm,
                1,
                u64::MAX,
            )?,
            allow_private_networks: self.outbox_allow_private_networks,
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
        a: OutboxArgs,
    }

    fn args(list: &[&str]) -> OutboxArgs {
        let mut v = vec!["t"];
        v.extend_from_slice(list);
        T::try_parse_from(v).expect("clap parse").a
    }

    /// The raw settings' `Debug` shows no secret: tokens and keys only as set, URLs without
    /// their userinfo and query.
    #[test]
    fn the_raw_settings_debug_shows_no_secret() {
        let a = args(&[
            "--webhook-url",
            "https://hooks.example.com/services/T0/B0/path-sekrit",
            "--webhook-secret",
            "whsec-sekrit",
            "--splunk-hec-url",
            "https://hec:pw-sekrit@splunk.internal:8088/services/collector/event?token=q-sekrit",
            "--splunk-token",
            "hec-sekrit",
            "--datadog-api-key",
            "dd-sekrit",
            "--datadog-url",
            "https://intake.internal/api/v2/logs?dd-api-key=q-sekrit",
            "--s3-url",
            "https://key:pw-sekrit@s3.internal/bucket",
            "--s3-secret-access-key",
            "s3-sekrit",
            "--sentinel-dce-url",
            "https://dce.internal/?sig=q-sekrit",
            "--sentinel-client-secret",
            "entra-sekrit",
            "--sentinel-token-url",
            "https://login.internal/token?secret=q-sekrit",
        ]);
        let dbg = format!("{a:?} {a:#?}");
        assert!(!dbg.contains("sekrit"), "{dbg}");
        assert!(
            dbg.contains("https://***@splunk.internal:8088/services/collector/event?***"),
            "{dbg}"
        );
        assert!(dbg.contains("https://***@s3.internal/bucket"), "{dbg}");
    }

    /// A sink's optional setting given without the one that enables it is refused, naming both,
    /// instead of being ignored: the operator would think the sink configured.
    #[test]
    fn partial_siem_settings_are_refused() {
        for (flags, required, named) in [
            (
                vec!["--datadog-site", "datadoghq.eu"],
                "INTENTGATE_SIEM_DATADOG_API_KEY",
                "INTENTGATE_SIEM_DATADOG_SITE",
            ),
            (
                vec!["--datadog-service", "gw"],
                "INTENTGATE_SIEM_DATADOG_API_KEY",
                "INTENTGATE_SIEM_DATADOG_SERVICE",
            ),
            (
                vec!["--splunk-index", "main"],
                "INTENTGATE_SIEM_SPLUNK_HEC_URL",
                "INTENTGATE_SIEM_SPLUNK_INDEX",
            ),
            (
                vec!["--s3-region", "eu-west-1"],
                "INTENTGATE_SIEM_S3_URL",
                "INTENTGATE_SIEM_S3_REGION",
            ),
            (
                vec!["--s3-prefix", "audit/"],
                "INTENTGATE_SIEM_S3_URL",
                "INTENTGATE_SIEM_S3_PREFIX",
            ),
            (
                vec!["--sentinel-stream", "Custom-IntentGate"],
                "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                "INTENTGATE_SIEM_SENTINEL_STREAM",
            ),
            (
                vec!["--sentinel-client-id", "app"],
                "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                "INTENTGATE_SIEM_SENTINEL_CLIENT_ID",
            ),
            (
                vec!["--sentinel-tenant-id", "dir"],
                "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                "INTENTGATE_SIEM_SENTINEL_TENANT_ID",
            ),
            (
                vec!["--sentinel-token-url", "http://127.0.0.1:9/token"],
                "INTENTGATE_SIEM_SENTINEL_DCE_URL",
                "INTENTGATE_SIEM_SENTINEL_TOKEN_URL",
            ),
        ] {
            let e = args(&flags).validate().expect_err("refused").to_string();
            assert!(
                e.starts_with(required) && e.contains(named),
                "{flags:?}: {e}"
            );
        }
        // Blank counts as unset, and with the enabling setting each is accepted.
        args(&["--datadog-site", " ", "--splunk-index", ""])
            .validate()
            .expect("blank is unset");
        let c = args(&[
            "--datadog-api-key",
            "dd-key",
            "--datadog-site",
            "datadoghq.eu",
            "--datadog-service",
            "gw",
            "--splunk-hec-url",
            "http://127.0.0.1:9/services/collector/event",
            "--splunk-token",
            "hec-token",
            "--splunk-index",
            "main",
        ])
        .validate()
        .expect("complete");
        assert_eq!(c.env_destinations.len(), 2);
    }
}
