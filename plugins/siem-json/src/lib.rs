//! Built-in formatter (world `intentgate:plugin/formatter`): turns a
//! batch of canonical JSON audit events into one HTTP request body and headers for the
//! destination's vendor. The host does the I/O and the signing; this component never sees the
//! network, and sees only the credential its configuration carries.
//!
//! Configuration (JSON), `format` choosing the vendor:
//! - `ndjson`: the events as recorded, one per line.
//! - `splunk-hec`: Splunk HTTP Event Collector, `{time, host?, source, sourcetype, index?,
//!   event}` objects one after another, `Authorization: Splunk <secret>`; settings `index`,
//!   `source` (default `intentgate`), `sourcetype` (default `intentgate:audit`), `host`.
//! - `datadog`: Datadog logs intake v2, a JSON array of `{ddsource, ddtags?, hostname?,
//!   service, message, status, audit}` (the original's fields), `DD-API-KEY: <secret>`;
//!   settings `service` (default `intentgate-gateway`), `ddsource` (default `intentgate`),
//!   `ddtags`, `hostname`.
//! - `webhook`: the original's webhook body (`event`, `schema_version`, `timestamp`,
//!   `severity`, `tenant`, `decision`, `check`, `tool`, `agent_id`, `reason`,
//!   `requires_step_up`, `capability_token_id`, `pending_id`) plus `seq` and `audit` (the
//!   recorded event).
//! - `slack` (Block Kit, agent-chosen text escaped), `teams` (Adaptive Card 1.4, agent-chosen
//!   text only in `TextRun`s, never Markdown), `pagerduty` (Events API v2, the
//!   routing key being the secret; setting `source`).
//! - `sentinel`: the Azure Monitor Logs Ingestion API's JSON array, one record per event: the
//!   event's fields as recorded plus `TimeGenerated` (its `ts`), `EventType` and `Severity`
//!   (the webhook classification). The host gets the token and splits calls over 1 MB.
//!
//! The S3 sink uses `ndjson` (the host gzips and signs the objects).
//!
//! The legacy key `splunk_token` is accepted for `secret`.

use intentgate_plugin_sdk::serde_json::{self, Map, Value, json};
use intentgate_plugin_sdk::{FormattedRequest, Formatter};

struct Siem {
    format: String,
    settings: Map<String, Value>,
    secret: Option<String>,
}

const FORMATS: [&str; 8] = [
    "ndjson",
    "splunk-hec",
    "datadog",
    "webhook",
    "slack",
    "teams",
    "pagerduty",
    "sentinel",
];

impl Siem {
    fn setting<'a>(&'a self, key: &str, default: &'a str) -> &'a str {
        self.settings
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .unwrap_or(default)
    }
}

/// The one event of a notification's batch (Slack, Teams, PagerDuty carry one event a
/// message): a batch of several is refused, never formatted as its first event alone (the rest
/// would be dropped in silence).
fn one<T>(events: &[T]) -> Result<&T, String> {
    match events {
        [e] => Ok(e),
        [] => Err("empty batch".into()),
        many => Err(format!(
            "this format sends one event a message, not a batch of {}",
            many.len()
        )),
    }
}

/// Seconds since the epoch of an RFC 3339 UTC time as the audit log writes it
/// (`2026-05-12T10:14:33.871Z`), with milliseconds.
fn epoch_seconds(ts: &str) -> Option<f64> {
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let ms: f64 = format!("0.{frac}").parse().ok()?;
    let (yy, mm) = if m <= 2 { (y - 1, m + 9) } else { (y, m - 3) };
    let era = yy.div_euclid(400);
    let yoe = yy - era * 400;
    let doy = (153 * mm + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + s) as f64 + ms)
}

fn str_of<'a>(e: &'a Value, k: &str) -> &'a str {
    e.get(k).and_then(Value::as_str).unwrap_or("")
}

/// The original's webhook projection: event type and severity (see the host's
/// `outbox::destination::classify`, which routes with the same rules).
fn classify(e: &Value) -> (&'static str, &'static str) {
    let kind = str_of(e, "event");
    if kind.contains("approval") {
        if kind.contains("timeout") || kind.contains("expired") {
            return ("intentgate.approval_timeout", "warning");
        }
        if kind.contains("decide") {
            return ("intentgate.approval_decided", "info");
        }
    }
    match str_of(e, "decision") {
        "block" => {
            let sev = match str_of(e, "check") {
                "capability" | "budget" | "upstream" => "critical",
                _ => "warning",
            };
            ("intentgate.deny", sev)
        }
        "escalate" => ("intentgate.escalate", "warning"),
        _ if e.get("requires_step_up") == Some(&Value::Bool(true)) => {
            ("intentgate.step_up_required", "info")
        }
        _ => ("intentgate.audit", "info"),
    }
}

fn webhook_body(e: &Value) -> Value {
    let (event, severity) = classify(e);
    let mut m = Map::new();
    m.insert("event".into(), event.into());
    m.insert("schema_version".into(), "1".into());
    m.insert("timestamp".into(), str_of(e, "ts").into());
    m.insert("severity".into(), severity.into());
    for (out, key) in [
        ("tenant", "tenant"),
        ("check", "check"),
        ("agent_id", "agent_id"),
        ("reason", "reason"),
        ("capability_token_id", "capability_token_id"),
        ("pending_id", "pending_id"),
    ] {
        let v = str_of(e, key);
        if !v.is_empty() {
            m.insert(out.into(), v.into());
        }
    }
    m.insert("decision".into(), str_of(e, "decision").into());
    m.insert("tool".into(), str_of(e, "tool").into());
    if e.get("requires_step_up") == Some(&Value::Bool(true)) {
        m.insert("requires_step_up".into(), true.into());
    }
    if let Some(seq) = e.get("seq") {
        m.insert("seq".into(), seq.clone());
    }
    m.insert("audit".into(), e.clone());
    Value::Object(m)
}

/// Text an agent chose (a tool name, a policy's reason quoting one) as Slack `mrkdwn`:
/// `&`, `<` and `>` escaped as Slack documents, so `<https://evil|Approve>` shows as text
/// instead of a link in an approver's channel.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cut(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// A one-line summary (Datadog `message`, PagerDuty `summary`, chat titles).
fn summary(e: &Value) -> String {
    let agent = match str_of(e, "agent_id") {
        "" => "(unknown)",
        a => a,
    };
    format!(
        "{} {} tool={} agent={} tenant={} reason={}",
        str_of(e, "decision"),
        str_of(e, "check"),
        str_of(e, "tool"),
        agent,
        str_of(e, "tenant"),
        str_of(e, "reason")
    )
}

fn facts(e: &Value) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    for (title, key) in [
        ("Tenant", "tenant"),
        ("Decision", "decision"),
        ("Check", "check"),
        ("Tool", "tool"),
        ("Agent", "agent_id"),
        ("Token", "capability_token_id"),
        ("Pending", "pending_id"),
        ("Time", "ts"),
    ] {
        let v = str_of(e, key);
        if !v.is_empty() {
            out.push((title, cut(v, 200)));
        }
    }
    out
}

fn title(e: &Value) -> String {
    let (event, severity) = classify(e);
    let name = event.trim_start_matches("intentgate.").replace('_', " ");
    cut(
        &format!(
            "IntentGate {name} ({severity}): {}",
            match str_of(e, "tool") {
                "" => str_of(e, "event"),
                t => t,
            }
        ),
        150,
    )
}

fn json_request(body: &Value) -> FormattedRequest {
    FormattedRequest {
        content_type: "application/json".into(),
        headers: Vec::new(),
        body: body.to_string().into_bytes(),
    }
}

impl Formatter for Siem {
    fn configure(config: &str) -> Result<Self, String> {
        let mut settings: Map<String, Value> = if config.trim().is_empty() {
            Map::new()
        } else {
            serde_json::from_str(config).map_err(|e| format!("formatter configuration: {e}"))?
        };
        let format = match settings.remove("format") {
            None => "ndjson".to_owned(),
            Some(Value::String(f)) => f,
            Some(_) => return Err("format must be a string".into()),
        };
        if !FORMATS.contains(&format.as_str()) {
            return Err(format!("unknown format {format:?}"));
        }
        let secret = match settings
            .remove("secret")
            .or_else(|| settings.remove("splunk_token"))
        {
            None => None,
            Some(Value::String(s)) => Some(s),
            Some(_) => return Err("secret must be a string".into()),
        };
        if matches!(format.as_str(), "splunk-hec" | "datadog" | "pagerduty") && secret.is_none() {
            return Err(format!(
                "{format} needs its secret (token, API key or routing key)"
            ));
        }
        Ok(Siem {
            format,
            settings,
            secret,
        })
    }

    fn format(&self, events: &[String]) -> Result<FormattedRequest, String> {
        let events: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(e).map_err(|e| format!("event: {e}")))
            .collect::<Result<_, _>>()?;
        let secret = self.secret.clone().unwrap_or_default();
        match self.format.as_str() {
            "ndjson" => {
                let mut body = Vec::new();
                for e in &events {
                    body.extend_from_slice(e.to_string().as_bytes());
                    body.push(b'\n');
                }
                Ok(FormattedRequest {
                    content_type: "application/x-ndjson".into(),
                    headers: Vec::new(),
                    body,
                })
            }
            "splunk-hec" => {
                let mut body = Vec::new();
                for e in &events {
                    let mut m = Map::new();
                    if let Some(t) = epoch_seconds(str_of(e, "ts")) {
                        m.insert("time".into(), json!((t * 1000.0).round() / 1000.0));
                    }
                    let host = self.setting("host", "");
                    if !host.is_empty() {
                        m.insert("host".into(), host.into());
                    }
                    m.insert("source".into(), self.setting("source", "intentgate").into());
                    m.insert(
                        "sourcetype".into(),
                        self.setting("sourcetype", "intentgate:audit").into(),
                    );
                    let index = self.setting("index", "");
                    if !index.is_empty() {
                        m.insert("index".into(), index.into());
                    }
                    m.insert("event".into(), e.clone());
                    body.extend_from_slice(Value::Object(m).to_string().as_bytes());
                    body.push(b'\n');
                }
                Ok(FormattedRequest {
                    content_type: "application/json".into(),
                    headers: vec![("authorization".into(), format!("Splunk {secret}"))],
                    body,
                })
            }
            "datadog" => {
                let logs: Vec<Value> = events
                    .iter()
                    .map(|e| {
                        let mut m = Map::new();
                        m.insert(
                            "ddsource".into(),
                            self.setting("ddsource", "intentgate").into(),
                        );
                        let tags = self.setting("ddtags", "");
                        if !tags.is_empty() {
                            m.insert("ddtags".into(), tags.into());
                        }
                        let host = self.setting("hostname", "");
                        if !host.is_empty() {
                            m.insert("hostname".into(), host.into());
                        }
                        m.insert(
                            "service".into(),
                            self.setting("service", "intentgate-gateway").into(),
                        );
                        m.insert("message".into(), summary(e).into());
                        let status = if str_of(e, "decision") == "block" {
                            "warn"
                        } else {
                            "info"
                        };
                        m.insert("status".into(), status.into());
                        m.insert("audit".into(), e.clone());
                        Value::Object(m)
                    })
                    .collect();
                let mut req = json_request(&Value::Array(logs));
                req.headers.push(("dd-api-key".into(), secret));
                Ok(req)
            }
            "webhook" => {
                let body = match events.as_slice() {
                    [one] => webhook_body(one),
                    many => Value::Array(many.iter().map(webhook_body).collect()),
                };
                Ok(json_request(&body))
            }
            "slack" => {
                let e = one(&events)?;
                let fields: Vec<Value> = facts(e)
                    .into_iter()
                    .take(10)
                    .map(|(t, v)| {
                        json!({"type": "mrkdwn", "text": format!("*{t}*\n{}", slack_escape(&v))})
                    })
                    .collect();
                let mut blocks = vec![
                    json!({"type": "header", "text": {"type": "plain_text", "text": title(e)}}),
                    json!({"type": "section", "fields": fields}),
                ];
                let reason = str_of(e, "reason");
                if !reason.is_empty() {
                    blocks.push(json!({"type": "context", "elements": [
                        {"type": "mrkdwn", "text": cut(&slack_escape(reason), 2000)}
                    ]}));
                }
                Ok(json_request(
                    &json!({"text": cut(&slack_escape(&summary(e)), 3000), "blocks": blocks}),
                ))
            }
            "teams" => {
                // Every text an agent may have chosen (the title names the tool, the facts and
                // the reason quote it) goes in a `TextRun`, which Adaptive Cards never read as
                // Markdown: a `TextBlock` or a fact would turn `[Approve](https://evil)` into a
                // link in an approver's channel.
                let e = one(&events)?;
                let mut body = vec![json!({"type": "RichTextBlock", "inlines": [
                    {"type": "TextRun", "text": title(e), "size": "Medium", "weight": "Bolder"}
                ]})];
                body.extend(facts(e).into_iter().map(|(t, v)| {
                    json!({"type": "RichTextBlock", "inlines": [
                        {"type": "TextRun", "text": format!("{t}: "), "weight": "Bolder"},
                        {"type": "TextRun", "text": v}
                    ]})
                }));
                let reason = str_of(e, "reason");
                if !reason.is_empty() {
                    body.push(json!({"type": "RichTextBlock", "inlines": [
                        {"type": "TextRun", "text": cut(reason, 2000)}
                    ]}));
                }
                Ok(json_request(&json!({
                    "type": "message",
                    "attachments": [{
                        "contentType": "application/vnd.microsoft.card.adaptive",
                        "contentUrl": null,
                        "content": {
                            "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
                            "type": "AdaptiveCard",
                            "version": "1.4",
                            "body": body
                        }
                    }]
                })))
            }
            "sentinel" => {
                let records: Vec<Value> = events
                    .iter()
                    .map(|e| {
                        let (class, severity) = classify(e);
                        let mut m = Map::new();
                        m.insert("TimeGenerated".into(), str_of(e, "ts").into());
                        m.insert("EventType".into(), class.into());
                        m.insert("Severity".into(), severity.into());
                        if let Value::Object(fields) = e {
                            for (k, v) in fields {
                                m.entry(k.clone()).or_insert_with(|| v.clone());
                            }
                        }
                        Value::Object(m)
                    })
                    .collect();
                Ok(json_request(&Value::Array(records)))
            }
            "pagerduty" => {
                let e = one(&events)?;
                let (class, severity) = classify(e);
                let mut payload = Map::new();
                payload.insert("summary".into(), cut(&summary(e), 1024).into());
                payload.insert("source".into(), self.setting("source", "intentgate").into());
                payload.insert("severity".into(), severity.into());
                let ts = str_of(e, "ts");
                if !ts.is_empty() {
                    payload.insert("timestamp".into(), ts.into());
                }
                let tool = str_of(e, "tool");
                if !tool.is_empty() {
                    payload.insert("component".into(), tool.into());
                }
                payload.insert("group".into(), str_of(e, "tenant").into());
                payload.insert("class".into(), class.into());
                payload.insert("custom_details".into(), webhook_body(e));
                let dedup = format!(
                    "intentgate-{}-{}",
                    str_of(e, "tenant"),
                    e.get("seq").map(Value::to_string).unwrap_or_default()
                );
                Ok(json_request(&json!({
                    "routing_key": secret,
                    "event_action": "trigger",
                    "dedup_key": dedup,
                    "payload": Value::Object(payload),
                })))
            }
            other => Err(format!("unknown format {other:?}")),
        }
    }
}

intentgate_plugin_sdk::export_formatter!(Siem);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_of_audit_times() {
        assert_eq!(epoch_seconds("1970-01-01T00:00:00Z"), Some(0.0));
        let t = epoch_seconds("2026-05-12T10:14:33.871Z").expect("time");
        assert!((t - 1_778_580_873.871).abs() < 1e-6, "{t}");
        assert_eq!(epoch_seconds("garbage"), None);
    }

    /// A notification format sends one event a message: a batch of several is refused, not
    /// formatted as its first event (the others would be dropped).
    #[test]
    fn notification_formats_refuse_a_batch() {
        let e = json!({"event": "intentgate.tool_call", "ts": "2026-05-12T10:14:33.871Z",
                       "decision": "block", "check": "policy", "tenant": "acme",
                       "tool": "x", "reason": "r"})
        .to_string();
        for format in ["slack", "teams", "pagerduty"] {
            let f = Siem::configure(&json!({"format": format, "secret": "k"}).to_string())
                .expect("configure");
            assert!(f.format(std::slice::from_ref(&e)).is_ok(), "{format}");
            let err = f
                .format(&[e.clone(), e.clone()])
                .err()
                .unwrap_or_else(|| panic!("{format}: a batch of two was formatted"));
            assert!(err.contains("one event a message"), "{format}: {err}");
        }
    }

    /// A tool name an agent chose cannot put a link (or a mention) in an approver's channel.
    #[test]
    fn slack_text_escapes_what_an_agent_chose() {
        let f = Siem::configure(r#"{"format": "slack"}"#).expect("configure");
        let e = json!({"event": "intentgate.tool_call", "ts": "2026-05-12T10:14:33.871Z",
                       "decision": "block", "check": "policy", "tenant": "acme",
                       "tool": "<https://evil.example|Approve pending call>",
                       "reason": "tool <!channel> & co"});
        let out = f.format(&[e.to_string()]).expect("format");
        let v: Value = serde_json::from_slice(&out.body).expect("json");
        // Every text Slack reads as mrkdwn: the fallback, the fields, the context (the header
        // is `plain_text`, never rendered as links).
        let mut mrkdwn = vec![v["text"].as_str().expect("text").to_owned()];
        for block in v["blocks"].as_array().expect("blocks") {
            for part in block["fields"].as_array().into_iter().flatten() {
                mrkdwn.push(part["text"].as_str().expect("field").to_owned());
            }
            for part in block["elements"].as_array().into_iter().flatten() {
                mrkdwn.push(part["text"].as_str().expect("element").to_owned());
            }
        }
        let all = mrkdwn.join("\n");
        assert!(!all.contains('<') && !all.contains('>'), "{all}");
        assert!(
            all.contains("&lt;https://evil.example|Approve pending call&gt;"),
            "{all}"
        );
        assert!(all.contains("&amp; co"), "{all}");
    }

    /// A tool name or reason an agent chose reaches a Teams card only as a `TextRun`, which
    /// Adaptive Cards never read as Markdown (no link, no formatting), and still in full.
    #[test]
    fn teams_text_an_agent_chose_is_never_markdown() {
        let f = Siem::configure(r#"{"format": "teams"}"#).expect("configure");
        let e = json!({"event": "intentgate.tool_call", "ts": "2026-05-12T10:14:33.871Z",
                       "decision": "block", "check": "policy", "tenant": "acme",
                       "tool": "[Approve pending call](https://evil.example)",
                       "reason": "see **[here](https://evil.example)**"});
        let out = f.format(&[e.to_string()]).expect("format");
        let v: Value = serde_json::from_slice(&out.body).expect("json");
        let card = &v["attachments"][0]["content"];
        let mut runs = Vec::new();
        for el in card["body"].as_array().expect("body") {
            assert_eq!(el["type"], "RichTextBlock", "only rich text blocks: {el}");
            for run in el["inlines"].as_array().expect("inlines") {
                assert_eq!(run["type"], "TextRun", "{run}");
                runs.push(run["text"].as_str().expect("text").to_owned());
            }
        }
        assert!(
            runs[0].contains("[Approve pending call](https://evil.example)"),
            "{runs:?}"
        );
        assert!(runs.iter().any(|r| r == "Tenant: "), "{runs:?}");
        assert!(
            runs.iter()
                .any(|r| r == "see **[here](https://evil.example)**"),
            "{runs:?}"
        );
    }

    #[test]
    fn sentinel_records_carry_time_generated() {
        let f = Siem::configure(r#"{"format": "sentinel"}"#).expect("configure");
        let e = r#"{"event":"intentgate.tool_call","ts":"2026-05-12T10:14:33.871Z","decision":"block","check":"policy","tenant":"acme"}"#;
        let out = f.format(&[e.to_owned(), e.to_owned()]).expect("format");
        assert_eq!(out.content_type, "application/json");
        let v: Value = serde_json::from_slice(&out.body).expect("json");
        let records = v.as_array().expect("array");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0]["TimeGenerated"], "2026-05-12T10:14:33.871Z");
        assert_eq!(records[0]["EventType"], "intentgate.deny");
        assert_eq!(records[0]["Severity"], "warning");
        assert_eq!(records[0]["tenant"], "acme");
    }
}
