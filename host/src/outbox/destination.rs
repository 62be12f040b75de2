//! Destinations: what an operator configures (the admin API or the original's environment
//! variables), the filters that decide which audit events a destination receives, and the
//! arc-swapped routing table the audit commit reads to write one outbox row per (event,
//! destination).
//!
//! The routing decision is made **inside** the audit transaction, from the event as it is
//! recorded (after a budget refusal rewrote it), so what is delivered is what the chain says.
//! This module must never hand a secret to anything but the destination's formatter and
//! signer, and never let a tenant destination receive another tenant's events.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::OutboxError;
use crate::audit::{AuditEvent, Decision};

/// What a destination is: it chooses the built-in formatter, the batch size and which events
/// it receives by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A signed JSON POST per event (Standard Webhooks + `X-IntentGate-Signature`).
    Webhook,
    /// Splunk HTTP Event Collector.
    Splunk,
    /// Datadog logs intake v2.
    Datadog,
    /// A Slack incoming webhook (Block Kit).
    Slack,
    /// A Microsoft Teams incoming webhook (Adaptive Card 1.4).
    Teams,
    /// PagerDuty Events API v2.
    Pagerduty,
    /// NDJSON of the audit events as recorded (any HTTP log collector).
    Ndjson,
    /// Gzipped NDJSON objects in an S3-compatible bucket, SigV4-signed ([`super::s3`]).
    S3,
    /// Microsoft Sentinel through the Logs Ingestion API ([`super::sentinel`]).
    Sentinel,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::Webhook,
        Kind::Splunk,
        Kind::Datadog,
        Kind::Slack,
        Kind::Teams,
        Kind::Pagerduty,
        Kind::Ndjson,
        Kind::S3,
        Kind::Sentinel,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Webhook => "webhook",
            Kind::Splunk => "splunk",
            Kind::Datadog => "datadog",
            Kind::Slack => "slack",
            Kind::Teams => "teams",
            Kind::Pagerduty => "pagerduty",
            Kind::Ndjson => "ndjson",
            Kind::S3 => "s3",
            Kind::Sentinel => "sentinel",
        }
    }

    /// Notification kinds get one event per request and, by default, only the high-signal
    /// events ([`EventType`]); SIEM kinds get batches of every event.
    pub fn is_notification(self) -> bool {
        matches!(
            self,
            Kind::Webhook | Kind::Slack | Kind::Teams | Kind::Pagerduty
        )
    }

    /// The `format` the built-in formatter component is configured with.
    pub fn format_name(self) -> &'static str {
        match self {
            Kind::Splunk => "splunk-hec",
            Kind::S3 => "ndjson",
            other => other.as_str(),
        }
    }

    /// Whether the URL itself is a credential (Slack and Teams webhook URLs): then only its
    /// scheme and host are ever shown.
    pub fn url_is_secret(self) -> bool {
        // A generic webhook's URL is often its own credential too (Discord, Zapier, a chat
        // app's incoming hook), and an NDJSON sink is a webhook of another format.
        matches!(
            self,
            Kind::Slack | Kind::Teams | Kind::Webhook | Kind::Ndjson
        )
    }
}

impl FromStr for Kind {
    type Err = OutboxError;
    fn from_str(s: &str) -> Result<Self, OutboxError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                OutboxError::Invalid(format!(
                    "kind must be one of webhook, splunk, datadog, slack, teams, pagerduty, ndjson, s3, sentinel, not {s:?}"
                ))
            })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The high-signal events of the original's webhooks (`INTENTGATE_WEBHOOK_EVENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    Deny,
    Escalate,
    ApprovalTimeout,
    StepUpRequired,
    ApprovalDecided,
}

impl EventType {
    pub const ALL: [EventType; 5] = [
        EventType::Deny,
        EventType::Escalate,
        EventType::ApprovalTimeout,
        EventType::StepUpRequired,
        EventType::ApprovalDecided,
    ];

    /// The wire name (the webhook body's `event`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Deny => "intentgate.deny",
            EventType::Escalate => "intentgate.escalate",
            EventType::ApprovalTimeout => "intentgate.approval_timeout",
            EventType::StepUpRequired => "intentgate.step_up_required",
            EventType::ApprovalDecided => "intentgate.approval_decided",
        }
    }
}

impl FromStr for EventType {
    type Err = OutboxError;
    /// Accepts the wire name, the short name, and the original's `requires_step_up` alias.
    fn from_str(s: &str) -> Result<Self, OutboxError> {
        let short = s.trim().strip_prefix("intentgate.").unwrap_or(s.trim());
        match short {
            "deny" | "block" => Ok(EventType::Deny),
            "escalate" => Ok(EventType::Escalate),
            "approval_timeout" => Ok(EventType::ApprovalTimeout),
            "step_up_required" | "requires_step_up" => Ok(EventType::StepUpRequired),
            "approval_decided" => Ok(EventType::ApprovalDecided),
            _ => Err(OutboxError::Invalid(format!(
                "unknown event {s:?}: expected deny, escalate, approval_timeout, step_up_required, approval_decided or all"
            ))),
        }
    }
}

/// How urgent an event is (receivers route on it; destinations filter on it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Severity {
    #[default]
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl FromStr for Severity {
    type Err = OutboxError;
    fn from_str(s: &str) -> Result<Self, OutboxError> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            _ => Err(OutboxError::Invalid(format!(
                "min_severity must be info, warning or critical, not {s:?}"
            ))),
        }
    }
}

/// The high-signal type and severity of an event, as the original's webhook filter projects
/// it: a block is `deny` (critical when the capability, budget or upstream check blocked, a
/// sign that something broke; warning otherwise), an escalation `escalate`, an allowed call
/// that asked for step-up `step_up_required` (info). Approval events (the approvals module's
/// `…approval…timeout`/`…expired` and `…approval…decided`/`…decide` kinds) are their own types.
/// Other admin actions and plain allows are not high-signal.
pub fn classify(e: &AuditEvent) -> Option<(EventType, Severity)> {
    let kind = e.kind.as_str();
    if kind.contains("approval") {
        if kind.contains("timeout") || kind.contains("expired") {
            return Some((EventType::ApprovalTimeout, Severity::Warning));
        }
        if kind.contains("decide") {
            return Some((EventType::ApprovalDecided, Severity::Info));
        }
    }
    if kind.starts_with(crate::audit::kinds::ADMIN_PREFIX) {
        return None;
    }
    match e.decision? {
        Decision::Block => {
            let sev = match e.check.as_str() {
                "capability" | "budget" | "upstream" => Severity::Critical,
                _ => Severity::Warning,
            };
            Some((EventType::Deny, sev))
        }
        Decision::Escalate => Some((EventType::Escalate, Severity::Warning)),
        Decision::Allow if e.requires_step_up => Some((EventType::StepUpRequired, Severity::Info)),
        Decision::Allow => None,
    }
}

/// Which events a destination receives.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Filter {
    /// `None`: every audit event (SIEM kinds' default, or `events: ["all"]`).
    pub events: Option<BTreeSet<EventType>>,
    /// Only these decisions (`allow`, `block`, `escalate`); empty: any.
    pub decisions: BTreeSet<&'static str>,
    pub min_severity: Severity,
}

impl Filter {
    /// From the configured lists; `events` empty means the kind's default.
    pub fn parse(
        kind: Kind,
        events: &[String],
        decisions: &[String],
        min_severity: Option<&str>,
    ) -> Result<Self, OutboxError> {
        let events: Vec<&str> = events
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        let events = if events.iter().any(|e| *e == "all" || *e == "*") {
            None
        } else if events.is_empty() {
            kind.is_notification()
                .then(|| EventType::ALL.into_iter().collect())
        } else {
            Some(
                events
                    .iter()
                    .map(|e| e.parse())
                    .collect::<Result<BTreeSet<_>, _>>()?,
            )
        };
        let decisions = decisions
            .iter()
            .map(|d| d.trim())
            .filter(|d| !d.is_empty())
            .map(|d| {
                d.parse::<Decision>()
                    .map(Decision::as_str)
                    .map_err(|e| OutboxError::Invalid(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let min_severity = min_severity
            .filter(|s| !s.is_empty())
            .map(str::parse)
            .transpose()?
            .unwrap_or_default();
        Ok(Filter {
            events,
            decisions,
            min_severity,
        })
    }

    pub fn matches(&self, e: &AuditEvent) -> bool {
        let class = classify(e);
        if let Some(types) = &self.events {
            match class {
                Some((t, _)) if types.contains(&t) => {}
                _ => return false,
            }
        }
        if !self.decisions.is_empty()
            && !e
                .decision
                .is_some_and(|d| self.decisions.contains(d.as_str()))
        {
            return false;
        }
        let severity = class.map(|(_, s)| s).unwrap_or_default();
        severity >= self.min_severity
    }
}

/// A destination as configured: the admin API's body and the stored row's `settings`. The
/// secret is write-only: it is never serialized back, nor shown by `Debug`.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationSpec {
    pub name: String,
    pub kind: String,
    pub url: String,
    /// Webhook signing secret (`whsec_…` or any shared secret), Splunk HEC token, Datadog API
    /// key or PagerDuty routing key. Never returned.
    #[serde(default, skip_serializing)]
    pub secret: Option<String>,
    /// Event types (`deny`, `escalate`, `approval_timeout`, `step_up_required`,
    /// `approval_decided`) or `all`; empty: the kind's default.
    #[serde(default)]
    pub events: Vec<String>,
    #[serde(default)]
    pub decisions: Vec<String>,
    #[serde(default)]
    pub min_severity: Option<String>,
    /// Formatter settings (Splunk `index`/`sourcetype`/`source`, Datadog `service`/`ddtags`,
    /// …), passed to the formatter component as its configuration.
    #[serde(default)]
    pub settings: Map<String, Value>,
    /// The digest of an uploaded formatter component (world `formatter`) to use instead
    /// of the built-in one.
    #[serde(default)]
    pub formatter: Option<String>,
}

impl fmt::Debug for DestinationSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let url = match self.kind.parse::<Kind>() {
            Ok(k) if k.url_is_secret() => "<redacted>".to_owned(),
            _ => self
                .url
                .parse::<hyper::Uri>()
                .map(|u| crate::config::redact_url(&u))
                .unwrap_or_else(|_| "<invalid>".into()),
        };
        f.debug_struct("DestinationSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &url)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .field("events", &self.events)
            .field("decisions", &self.decisions)
            .field("min_severity", &self.min_severity)
            .field("formatter", &self.formatter)
            .finish_non_exhaustive()
    }
}

/// Where a destination came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `INTENTGATE_WEBHOOK_*` / `INTENTGATE_SIEM_*` (read-only over the API).
    Env,
    /// The admin API (stored in `outbox_destinations`).
    Admin,
}

/// A validated destination.
#[derive(Debug, Clone)]
pub struct Destination {
    /// `<tenant>/<name>`, `*/<name>` (global) or `env:<name>`.
    pub id: Arc<str>,
    /// `None`: every tenant's events.
    pub tenant: Option<String>,
    pub kind: Kind,
    pub url: hyper::Uri,
    pub spec: DestinationSpec,
    pub filter: Filter,
    pub source: Source,
    /// How requests are made for this kind.
    pub target: Target,
}

/// How a destination's requests are made.
#[derive(Debug, Clone)]
pub enum Target {
    /// One POST of the formatted batch to the URL.
    Http,
    /// Gzipped objects PUT under the URL, SigV4-signed.
    S3(super::s3::S3Target),
    /// The Logs Ingestion API with an Entra token.
    Sentinel(super::sentinel::SentinelTarget),
}

/// Longest destination name.
const MAX_NAME: usize = 64;

impl Destination {
    /// Validates `spec` for `tenant` (`None`: global).
    pub fn new(
        spec: DestinationSpec,
        tenant: Option<String>,
        source: Source,
    ) -> Result<Self, OutboxError> {
        let name_ok = !spec.name.is_empty()
            && spec.name.len() <= MAX_NAME
            && spec
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !name_ok {
            return Err(OutboxError::Invalid(format!(
                "name must be 1-{MAX_NAME} characters of [A-Za-z0-9._-], not {:?}",
                spec.name
            )));
        }
        let kind: Kind = spec.kind.parse()?;
        let url: hyper::Uri = spec
            .url
            .parse()
            .map_err(|e| OutboxError::Invalid(format!("url: {e}")))?;
        if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
            return Err(OutboxError::Invalid(
                "url must be an absolute http or https URL".into(),
            ));
        }
        let needs_secret = matches!(
            kind,
            Kind::Splunk | Kind::Datadog | Kind::Pagerduty | Kind::S3 | Kind::Sentinel
        );
        if needs_secret && spec.secret.as_deref().is_none_or(str::is_empty) {
            return Err(OutboxError::Invalid(format!(
                "a {kind} destination needs its secret (HEC token, API key, routing key, secret access key or client secret)"
            )));
        }
        let target = match kind {
            Kind::S3 => Target::S3(super::s3::S3Target::from_settings(&spec.settings)?),
            Kind::Sentinel => {
                Target::Sentinel(super::sentinel::SentinelTarget::new(&url, &spec.settings)?)
            }
            _ => Target::Http,
        };
        if let Some(d) = &spec.formatter
            && !d.is_empty()
            && !d
                .strip_prefix("sha256:")
                .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(OutboxError::Invalid(
                "formatter must be the digest (sha256:<hex>) of an uploaded formatter component"
                    .into(),
            ));
        }
        let filter = Filter::parse(
            kind,
            &spec.events,
            &spec.decisions,
            spec.min_severity.as_deref(),
        )?;
        let id: Arc<str> = match (source, &tenant) {
            (Source::Env, _) => format!("env:{}", spec.name).into(),
            (Source::Admin, Some(t)) => format!("{t}/{}", spec.name).into(),
            (Source::Admin, None) => format!("*/{}", spec.name).into(),
        };
        Ok(Destination {
            id,
            tenant,
            kind,
            url,
            spec,
            filter,
            source,
            target,
        })
    }

    /// Most events in one request.
    pub fn batch_limit(&self, configured: usize) -> usize {
        if self.kind.is_notification() {
            1
        } else {
            configured
        }
    }

    /// Whether this destination takes `tenant`'s events.
    pub fn serves(&self, tenant: &str) -> bool {
        self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// The endpoint as shown to operators: never userinfo or query, and only scheme and host
    /// when the URL is itself a credential.
    pub fn shown_endpoint(&self) -> String {
        let scheme = self.url.scheme_str().unwrap_or("http");
        let host = self.url.authority().map(|a| a.as_str()).unwrap_or("");
        let host = host.rsplit('@').next().unwrap_or(host);
        if self.kind.url_is_secret() {
            format!("{scheme}://{host}/…")
        } else {
            format!("{scheme}://{host}{}", self.url.path())
        }
    }

    /// The configuration handed to the formatter component: the settings, the built-in
    /// `format`, and the secret.
    pub fn formatter_config(&self) -> String {
        let mut m = self.spec.settings.clone();
        if self.spec.formatter.as_deref().is_none_or(str::is_empty) {
            m.insert("format".into(), self.kind.format_name().into());
        }
        if let Some(s) = &self.spec.secret
            && !s.is_empty()
        {
            m.insert("secret".into(), s.clone().into());
        }
        Value::Object(m).to_string()
    }
}

/// One routing entry: what the commit needs to know of a destination.
#[derive(Debug, Clone)]
pub struct Route {
    pub id: Arc<str>,
    pub tenant: Option<String>,
    pub filter: Filter,
}

/// The routing table the audit commit reads (arc-swapped; one load per batch) and the bell
/// that wakes the delivery worker after a commit wrote outbox rows.
#[derive(Clone, Default)]
pub struct Router {
    inner: Arc<RouterInner>,
}

#[derive(Default)]
struct RouterInner {
    routes: ArcSwap<Vec<Route>>,
    bell: tokio::sync::Notify,
    durable: crate::audit::DurableMark,
}

impl fmt::Debug for Router {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Router")
            .field("routes", &self.inner.routes.load().len())
            .finish()
    }
}

impl Router {
    /// Replaces the routing table (hot: the next batch uses it).
    pub fn install(&self, destinations: &[Destination]) {
        let routes = destinations
            .iter()
            .map(|d| Route {
                id: d.id.clone(),
                tenant: d.tenant.clone(),
                filter: d.filter.clone(),
            })
            .collect();
        self.inner.routes.store(Arc::new(routes));
    }

    pub fn routes(&self) -> Arc<Vec<Route>> {
        self.inner.routes.load_full()
    }

    pub fn is_empty(&self) -> bool {
        self.inner.routes.load().is_empty()
    }

    /// Wakes the worker (after a commit that wrote outbox rows).
    pub fn ring(&self) {
        self.inner.bell.notify_one();
    }

    /// Waits for [`Router::ring`].
    pub async fn rung(&self) {
        self.inner.bell.notified().await
    }

    /// How far the commits that write outbox rows are durable: a row is delivered only once
    /// the commit that wrote it is (SQLite syncs its log beside the writer, `audit/durable.rs`).
    pub fn durable(&self) -> &crate::audit::DurableMark {
        &self.inner.durable
    }
}

/// The destinations `event` of `tenant` goes to, in routing-table order.
pub fn destinations_for<'a>(
    routes: &'a [Route],
    tenant: &'a str,
    event: &'a AuditEvent,
) -> impl Iterator<Item = &'a Arc<str>> + 'a {
    routes
        .iter()
        .filter(move |r| r.tenant.as_deref().is_none_or(|t| t == tenant) && r.filter.matches(event))
        .map(|r| &r.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::kinds;

    fn ev(decision: Decision, check: &str) -> AuditEvent {
        let mut e = AuditEvent::new(kinds::TOOL_CALL, "acme");
        e.decision = Some(decision);
        e.check = check.into();
        e
    }

    #[test]
    fn classification_follows_the_original() {
        assert_eq!(
            classify(&ev(Decision::Block, "policy")),
            Some((EventType::Deny, Severity::Warning))
        );
        assert_eq!(
            classify(&ev(Decision::Block, "budget")),
            Some((EventType::Deny, Severity::Critical))
        );
        assert_eq!(
            classify(&ev(Decision::Escalate, "policy")),
            Some((EventType::Escalate, Severity::Warning))
        );
        assert_eq!(classify(&ev(Decision::Allow, "")), None);
        let mut stepped = ev(Decision::Allow, "");
        stepped.requires_step_up = true;
        assert_eq!(
            classify(&stepped),
            Some((EventType::StepUpRequired, Severity::Info))
        );
        let mut admin = AuditEvent::new("admin/mint", "acme");
        admin.decision = Some(Decision::Allow);
        assert_eq!(classify(&admin), None);
        let timeout = AuditEvent::new("intentgate.approval_timeout", "acme");
        assert_eq!(
            classify(&timeout).map(|c| c.0),
            Some(EventType::ApprovalTimeout)
        );
        let decided = AuditEvent::new("admin/approval.decide", "acme");
        assert_eq!(
            classify(&decided).map(|c| c.0),
            Some(EventType::ApprovalDecided)
        );
    }

    #[test]
    fn filters_by_type_decision_and_severity() {
        let deny_only = Filter::parse(Kind::Webhook, &["deny".into()], &[], None).expect("f");
        assert!(deny_only.matches(&ev(Decision::Block, "policy")));
        assert!(!deny_only.matches(&ev(Decision::Escalate, "policy")));
        // A webhook's default is the high-signal events only.
        let default = Filter::parse(Kind::Webhook, &[], &[], None).expect("f");
        assert!(!default.matches(&ev(Decision::Allow, "")));
        assert!(default.matches(&ev(Decision::Escalate, "")));
        // A SIEM's default is everything.
        let siem = Filter::parse(Kind::Splunk, &[], &[], None).expect("f");
        assert!(siem.matches(&ev(Decision::Allow, "")));
        let critical = Filter::parse(Kind::Splunk, &[], &[], Some("critical")).expect("f");
        assert!(critical.matches(&ev(Decision::Block, "capability")));
        assert!(!critical.matches(&ev(Decision::Block, "policy")));
        let blocks =
            Filter::parse(Kind::Splunk, &["all".into()], &["deny".into()], None).expect("f");
        assert!(blocks.matches(&ev(Decision::Block, "policy")));
        assert!(!blocks.matches(&ev(Decision::Allow, "")));
        assert!(Filter::parse(Kind::Webhook, &["nope".into()], &[], None).is_err());
        assert_eq!(
            "requires_step_up".parse::<EventType>().ok(),
            Some(EventType::StepUpRequired)
        );
    }

    #[test]
    fn validation_and_shown_endpoints() {
        let spec = |kind: &str, url: &str, secret: Option<&str>| DestinationSpec {
            name: "ops".into(),
            kind: kind.into(),
            url: url.into(),
            secret: secret.map(str::to_owned),
            ..DestinationSpec::default()
        };
        assert!(Destination::new(spec("splunk", "http://h/x", None), None, Source::Admin).is_err());
        assert!(Destination::new(spec("webhook", "ftp://h/x", None), None, Source::Admin).is_err());
        let slack = Destination::new(
            spec("slack", "https://hooks.slack.com/services/T/B/secret", None),
            Some("acme".into()),
            Source::Admin,
        )
        .expect("slack");
        assert_eq!(slack.id.as_ref(), "acme/ops");
        assert_eq!(slack.shown_endpoint(), "https://hooks.slack.com/…");
        let hook = Destination::new(
            spec("webhook", "https://u:p@h.example:8443/in?k=v", Some("s")),
            None,
            Source::Admin,
        )
        .expect("hook");
        assert_eq!(hook.id.as_ref(), "*/ops");
        // A webhook's URL may be its credential: scheme and host only, never userinfo.
        assert_eq!(hook.shown_endpoint(), "https://h.example:8443/…");
        assert!(!hook.formatter_config().is_empty());
        assert!(hook.serves("anyone"));
        assert!(!slack.serves("globex"));
    }
}
