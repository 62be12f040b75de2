//! Built-in SIEM formatter (world `siem-formatter`): turns a batch of canonical JSON audit events
//! into one HTTP request body and headers, as NDJSON or Splunk HEC. The host does the I/O; this
//! component never sees credentials other than those in its configuration.
//!
//! Configuration (JSON): `{"format": "ndjson" | "splunk-hec", "splunk_token": "...",
//! "sourcetype": "intentgate:audit"}`.

use intentgate_plugin_sdk::serde_json::{self, Value};
use intentgate_plugin_sdk::{FormattedRequest, Formatter};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "ndjson")]
    format: String,
    #[serde(default)]
    splunk_token: Option<String>,
    #[serde(default = "sourcetype")]
    sourcetype: String,
}

fn ndjson() -> String {
    "ndjson".into()
}
fn sourcetype() -> String {
    "intentgate:audit".into()
}

struct Siem {
    config: Config,
}

impl Formatter for Siem {
    fn configure(config: &str) -> Result<Self, String> {
        let config: Config = if config.trim().is_empty() {
            serde_json::from_str("{}").map_err(|e| e.to_string())?
        } else {
            serde_json::from_str(config).map_err(|e| format!("siem configuration: {e}"))?
        };
        match config.format.as_str() {
            "ndjson" => {}
            "splunk-hec" if config.splunk_token.is_some() => {}
            "splunk-hec" => return Err("splunk-hec needs splunk_token".into()),
            other => return Err(format!("unknown format {other:?}")),
        }
        Ok(Self { config })
    }

    fn format(&self, events: &[String]) -> Result<FormattedRequest, String> {
        let mut body = Vec::new();
        let mut headers = Vec::new();
        for event in events {
            let value: Value = serde_json::from_str(event).map_err(|e| format!("event: {e}"))?;
            let line = if self.config.format == "splunk-hec" {
                serde_json::json!({"event": value, "sourcetype": self.config.sourcetype})
            } else {
                value
            };
            body.extend_from_slice(line.to_string().as_bytes());
            body.push(b'\n');
        }
        if let Some(token) = &self.config.splunk_token {
            headers.push(("authorization".to_string(), format!("Splunk {token}")));
        }
        Ok(FormattedRequest {
            content_type: "application/x-ndjson".into(),
            headers,
            body,
        })
    }
}

intentgate_plugin_sdk::export_formatter!(Siem);
