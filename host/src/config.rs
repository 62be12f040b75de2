//! Typed configuration: every `INTENTGATE_*` variable and CLI flag, parsed into one struct and
//! validated before anything starts.
//!
//! This module must never read the environment anywhere else, and must never print a secret:
//! the `Debug` of [`Config`] redacts the master key and the admin tokens.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

/// Errors that stop the gateway before it starts; each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{setting}: {reason}")]
    Invalid {
        setting: &'static str,
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

pub use crate::audit::ArgValuesMode as ArgValues;

/// Whether `token` can be presented as a bearer credential at all. A request's `Authorization`
/// header is read only when it is visible ASCII ([`crate::http::bearer`]) and a bearer token
/// (RFC 6750) holds no space, so a configured token with whitespace (a newline from a file), a
/// control character or a non-ASCII character would be accepted but could never match.
fn bearer_chars_ok(token: &str) -> bool {
    token.bytes().all(|b| b.is_ascii_graphic())
}

/// Why [`bearer_chars_ok`] refused a token (never quoting it).
const BEARER_CHARS: &str = "must not contain whitespace, control or non-ASCII characters \
                            (an Authorization header cannot carry them, so it could never match)";

mod outbox;
pub use outbox::{DATADOG_US1, OutboxArgs};

mod secret_files;
pub use secret_files::SecretFiles;

mod telemetry;
pub use telemetry::{LogFormat, MetricsConfig, TelemetryArgs, TelemetryConfig, TracingConfig};

mod upstreams;
use upstreams::upstream_uri;
pub use upstreams::{
    Globals as UpstreamGlobals, NamedUpstream, UpstreamRevision, valid_upstream_name,
};

/// The raw settings as clap reads them from flags and environment. Validated into [`Config`].
#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "INTENTGATE_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: String,
    /// Directory for the embedded SQLite store and the generated secrets.
    #[arg(long, env = "INTENTGATE_DATA_DIR", default_value = "intentgate-data")]
    pub data_dir: PathBuf,
    /// HMAC master key for capability tokens (base64, >= 16 bytes). Generated when unset.
    #[arg(long, env = "INTENTGATE_MASTER_KEY", hide_env_values = true)]
    pub master_key: Option<String>,
    /// Superadmin bearer token for /v1/admin/*. Generated when unset.
    #[arg(long, env = "INTENTGATE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Per-tenant admin tokens: `tenant1:token1,tenant2:token2` (commas or newlines between
    /// entries).
    #[arg(long, env = "INTENTGATE_TENANT_ADMINS", hide_env_values = true)]
    pub tenant_admins: Option<String>,
    /// PostgreSQL DSN; when unset the embedded SQLite store in the data directory is used.
    #[arg(long, env = "INTENTGATE_POSTGRES_URL", hide_env_values = true)]
    pub postgres_url: Option<String>,
    /// Upstream MCP server (streamable HTTP), e.g. http://tools.internal/mcp.
    #[arg(long, env = "INTENTGATE_UPSTREAM_URL", hide_env_values = true)]
    pub upstream_url: Option<String>,
    /// Name of the upstream server, matched by `mcp_allow` caveats.
    #[arg(long, env = "INTENTGATE_UPSTREAM_NAME", default_value = "default")]
    pub upstream_name: String,
    /// Several upstream MCP servers behind the one endpoint, each `NAME=URL` (repeat the flag,
    /// or separate them with commas), or one JSON document as in INTENTGATE_UPSTREAMS_FILE.
    /// Names: a lowercase letter, then up to 31 of a-z 0-9 -. With INTENTGATE_UPSTREAM_URL,
    /// that one comes first, named INTENTGATE_UPSTREAM_NAME.
    #[arg(
        long = "upstream",
        env = "INTENTGATE_UPSTREAMS",
        value_name = "NAME=URL",
        hide_env_values = true
    )]
    pub upstreams: Vec<String>,
    /// A JSON file naming each upstream with its own settings: `{"upstreams": [{"name",
    /// "url", "revision", "timeout_ms", "connect_timeout_ms", "max_response_bytes", "tls":
    /// {"ca_file", "client_cert_file", "client_key_file", "server_name"}}]}` (instead of
    /// INTENTGATE_UPSTREAMS).
    #[arg(long, env = "INTENTGATE_UPSTREAMS_FILE", value_name = "PATH")]
    pub upstreams_file: Option<PathBuf>,
    /// What joins an upstream's name and a tool or prompt name when several upstreams are
    /// configured (`github__create_issue`). Default `__`.
    #[arg(long, env = "INTENTGATE_UPSTREAM_SEPARATOR")]
    pub upstream_separator: Option<String>,
    /// Upstream call timeout in milliseconds.
    #[arg(long, env = "INTENTGATE_UPSTREAM_TIMEOUT_MS", default_value_t = 5000)]
    pub upstream_timeout_ms: u64,
    /// How an escalated call is answered: `async` (`-32019` with a pending id to resume with)
    /// or `sync` (held until a decision or the timeout). A request's `Prefer: respond-async` or
    /// `Prefer: wait` overrides it.
    #[arg(long, env = "INTENTGATE_APPROVAL_MODE", default_value = "async")]
    pub approval_mode: String,
    /// Seconds a pending approval waits for a decision (and an approved one may be resumed)
    /// [default: 300]. The original's `INTENTGATE_APPROVAL_TIMEOUT` is read too.
    #[arg(long, env = "INTENTGATE_APPROVAL_TIMEOUT_S")]
    pub approval_timeout_s: Option<u64>,
    /// The original gateway's names for settings this one names otherwise (read, or refused
    /// with what to set instead: never silently ignored).
    #[command(flatten)]
    pub original: OriginalNames,
    /// Milliseconds between the SSE keep-alive comments of a held call.
    #[arg(
        long,
        env = "INTENTGATE_APPROVAL_KEEPALIVE_MS",
        default_value_t = 15_000
    )]
    pub approval_keepalive_ms: u64,
    /// Milliseconds between the re-reads of a held call's approval when no announcement woke
    /// it (a decision on another replica arrives by PostgreSQL `NOTIFY`; this bounds how late
    /// it is seen should the notification be lost).
    #[arg(long, env = "INTENTGATE_APPROVAL_POLL_MS", default_value_t = 2_000)]
    pub approval_poll_ms: u64,
    /// Days a final approval's row (rejected, expired, consumed) is kept in the queue; then it
    /// is deleted, with an audit event (its steps stay in the chain). 0 keeps every row.
    #[arg(long, env = "INTENTGATE_APPROVAL_RETENTION_DAYS", default_value_t = 30)]
    pub approval_retention_days: u64,
    /// Events kept per session for a `GET /v1/mcp` stream resuming with `Last-Event-ID`.
    #[arg(long, env = "INTENTGATE_STREAM_REPLAY_EVENTS", default_value_t = 256)]
    pub stream_replay_events: usize,
    /// Events queued toward a session's live stream before its client counts as too slow and
    /// is disconnected (it can resume from the replay window).
    #[arg(long, env = "INTENTGATE_STREAM_QUEUE_EVENTS", default_value_t = 64)]
    pub stream_queue_events: usize,
    /// Sessions with a stream, subscriptions or a replay window on this replica.
    #[arg(long, env = "INTENTGATE_STREAM_MAX_SESSIONS", default_value_t = 10_000)]
    pub stream_max_sessions: usize,
    /// Of those, the most one tenant may hold, so that one tenant's sessions cannot shut the
    /// others out (at most the replica's limit).
    #[arg(
        long,
        env = "INTENTGATE_STREAM_MAX_SESSIONS_PER_TENANT",
        default_value_t = 5_000
    )]
    pub stream_max_sessions_per_tenant: usize,
    /// Largest upstream response accepted, in bytes.
    #[arg(long, env = "INTENTGATE_UPSTREAM_MAX_RESPONSE_BYTES", default_value_t = 8 << 20)]
    pub upstream_max_response_bytes: usize,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "INTENTGATE_MAX_BODY_BYTES", default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Deepest JSON nesting accepted in a request body.
    #[arg(long, env = "INTENTGATE_MAX_JSON_DEPTH", default_value_t = 64)]
    pub max_json_depth: usize,
    /// Time allowed for a client to send its request headers, in milliseconds.
    #[arg(long, env = "INTENTGATE_HEADER_TIMEOUT_MS", default_value_t = 5000)]
    pub header_timeout_ms: u64,
    /// Time allowed for a client to send its whole request body, in milliseconds (408 after).
    #[arg(long, env = "INTENTGATE_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,
    /// Wall-clock deadline of one check plugin call, in milliseconds; a plugin that overruns it
    /// fails closed (the call is refused). Process-wide.
    #[arg(long, env = "INTENTGATE_PLUGIN_DEADLINE_MS", default_value_t = 50)]
    pub plugin_deadline_ms: u64,
    /// Deadline of all the check plugins of one call together, in milliseconds; a call whose
    /// checks have not all answered by then is refused.
    #[arg(
        long,
        env = "INTENTGATE_CALL_CHECKS_DEADLINE_MS",
        default_value_t = 200
    )]
    pub call_checks_deadline_ms: u64,
    /// Most checks one bundle may hold across its stages (drafts with more are refused, 422).
    #[arg(long, env = "INTENTGATE_MAX_CHECKS_PER_BUNDLE", default_value_t = 16)]
    pub max_checks_per_bundle: usize,
    /// Most live plugin instances one tenant may hold (of the process's 1,024); at its quota a
    /// tenant's own calls are refused, the other tenants are not affected. Idle pooled instances
    /// count, so the default leaves a busy tenant room for many calls in flight.
    #[arg(
        long,
        env = "INTENTGATE_MAX_INSTANCES_PER_TENANT",
        default_value_t = 64
    )]
    pub max_instances_per_tenant: usize,
    /// Clock skew tolerated on token `nbf`, in seconds.
    #[arg(long, env = "INTENTGATE_CLOCK_LEEWAY_SECS", default_value_t = 30)]
    pub clock_leeway_secs: u64,
    /// Calls fail closed when the revocation set is older than this, in seconds.
    #[arg(
        long,
        env = "INTENTGATE_REVOCATION_MAX_STALENESS_SECS",
        default_value_t = 10
    )]
    pub revocation_max_staleness_secs: u64,
    /// How much of the arguments an audit event keeps.
    #[arg(long, env = "INTENTGATE_AUDIT_PERSIST_ARG_VALUES", default_value = "off", value_parser = str::parse::<ArgValues>)]
    pub audit_persist_arg_values: ArgValues,
    /// Rego policy for the default bundle (a `NAME_test.rego` beside it is run at start).
    /// Without it the default policy denies every call; `--demo` uses a token-scope policy.
    #[arg(long, env = "INTENTGATE_POLICY_FILE")]
    pub policy_file: Option<PathBuf>,
    /// Start a built-in demo MCP tool server as the upstream when none is configured.
    #[arg(long)]
    pub demo: bool,
    /// Also put the decision summary into each forwarded result as `_intentgate` (the
    /// decision and event id are always in the `X-IntentGate-Decision` and
    /// `X-IntentGate-Event-Id` response headers).
    #[arg(long, env = "INTENTGATE_ANNOTATE_RESULTS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub annotate_results: bool,
    /// `/metrics` and the log format.
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
    /// Development mode: the `.rego` and `.wasm` files of DIR become the watched tenants'
    /// bundle, reloaded on save. Not persisted, not for production.
    #[arg(long = "watch", env = "INTENTGATE_WATCH_DIR", value_name = "DIR")]
    pub watch_dir: Option<PathBuf>,
    /// Tenants that `--watch` applies to (comma-separated).
    #[arg(long, env = "INTENTGATE_WATCH_TENANTS", default_value = "default")]
    pub watch_tenants: String,
    /// Most plugin components one tenant may hold (uploaded and not deleted).
    #[arg(long, env = "INTENTGATE_MAX_COMPONENTS_PER_TENANT", default_value_t = crate::bundles::MAX_COMPONENTS_PER_TENANT)]
    pub max_components_per_tenant: usize,
    /// How long a call or admin action waits for its audit event to be durable, in
    /// milliseconds; after it the call is refused (-32016) and the refusal is audited once the
    /// store answers.
    #[arg(long, env = "INTENTGATE_AUDIT_DEADLINE_MS", default_value_t = 2000)]
    pub audit_deadline_ms: u64,
    /// The SQLite audit writer thread's nice value (0-19; 0 keeps the process's). Below the
    /// request threads' priority it lets calls queue for a commit instead of interrupting them:
    /// a busy gateway spends less CPU a call (larger commits), a lone call waits a little
    /// longer.
    #[arg(long, env = "INTENTGATE_AUDIT_WRITER_NICE", default_value_t = crate::audit::DEFAULT_WRITER_NICE)]
    pub audit_writer_nice: u8,
    /// Whether the SQLite audit writer thread runs in Linux's `SCHED_BATCH` class (on by
    /// default): its wake-ups then wait for a core instead of preempting a request in progress,
    /// so a busy gateway gathers larger commits, at the same share of the CPU.
    #[arg(long, env = "INTENTGATE_AUDIT_WRITER_BATCH", default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub audit_writer_batch: bool,
    /// The audit log's checkpoint signing key: a `PRIVATE+KEY+…` signer key, or a base64 32-byte
    /// seed. Unset: `audit-log.key` in the data directory (generated on first start).
    #[arg(long, env = "INTENTGATE_AUDIT_LOG_KEY", hide_env_values = true)]
    pub audit_log_key: Option<String>,
    /// Most connections served at once; one more is answered 503 (with `Retry-After`) and closed.
    #[arg(long, env = "INTENTGATE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// PEM file of the CA certificates that an https upstream's certificate must chain to
    /// (instead of the system's roots).
    #[arg(long, env = "INTENTGATE_UPSTREAM_CA_FILE")]
    pub upstream_ca_file: Option<PathBuf>,
    /// PEM certificate chain the gateway presents to an https upstream (mTLS).
    #[arg(long, env = "INTENTGATE_UPSTREAM_CLIENT_CERT_FILE")]
    pub upstream_client_cert_file: Option<PathBuf>,
    /// PEM private key of the upstream client certificate (mTLS).
    #[arg(long, env = "INTENTGATE_UPSTREAM_CLIENT_KEY_FILE")]
    pub upstream_client_key_file: Option<PathBuf>,
    /// Serve TLS with this PEM certificate chain (reloaded when the file changes).
    #[arg(long, env = "INTENTGATE_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of the listener certificate (reloaded when the file changes).
    #[arg(long, env = "INTENTGATE_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// Host names the MCP endpoints answer to (`Host` header; comma-separated, `name` for any
    /// port or `name:port`, `*` for any). Unset: a loopback listener answers only to loopback
    /// names (`localhost`, `127.0.0.1`, `::1`), any other listener to every name. Guards
    /// against DNS rebinding.
    #[arg(long, env = "INTENTGATE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// Browser origins the MCP endpoints accept (`Origin` header; comma-separated
    /// `scheme://host[:port]`, `*` for any). Unset: an origin is accepted when its host is an
    /// allowed host. A request without `Origin` (not from a browser) is not affected.
    #[arg(long, env = "INTENTGATE_ALLOWED_ORIGINS", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Webhooks, SIEM sinks and delivery tuning.
    #[command(flatten)]
    pub outbox: OutboxArgs,
    /// Secrets read from files (`INTENTGATE_*_FILE`).
    #[command(flatten)]
    pub secret_files: SecretFiles,
}

/// Where state lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreChoice {
    Sqlite(PathBuf),
    Postgres(String),
}

impl std::fmt::Debug for StoreChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            // The DSN may carry a password.
            Self::Postgres(_) => f.write_str("Postgres(<redacted DSN>)"),
        }
    }
}

/// The validated configuration the gateway runs with.
#[derive(Clone)]
pub struct Config {
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    pub master_key: Option<String>,
    pub admin_token: Option<String>,
    pub tenant_admins: Vec<(String, String)>,
    pub store: StoreChoice,
    pub upstream_url: Option<hyper::Uri>,
    pub upstream_name: String,
    /// Every upstream by name, with its own settings, in the order configured:
    /// `INTENTGATE_UPSTREAM_URL` (named `upstream_name`) first, then `INTENTGATE_UPSTREAMS` or
    /// `INTENTGATE_UPSTREAMS_FILE`. Empty: no upstream.
    pub upstreams: Vec<NamedUpstream>,
    /// `INTENTGATE_UPSTREAM_SEPARATOR` (or the upstreams document's `separator`): joins an
    /// upstream's name and a tool or prompt name.
    pub upstream_separator: String,
    pub upstream_timeout: Duration,
    pub upstream_max_response_bytes: usize,
    /// `INTENTGATE_APPROVAL_MODE`, `_TIMEOUT_S`, `_KEEPALIVE_MS`, `_POLL_MS`.
    pub approvals: crate::approvals::ApprovalConfig,
    /// The bounds of the session streams and subscriptions (`INTENTGATE_STREAM_*`).
    pub streams: crate::streams::Limits,
    pub max_body_bytes: usize,
    pub max_json_depth: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub plugin_deadline: Duration,
    /// `INTENTGATE_CALL_CHECKS_DEADLINE_MS`.
    pub call_checks_deadline: Duration,
    /// `INTENTGATE_MAX_CHECKS_PER_BUNDLE`.
    pub max_checks_per_bundle: usize,
    /// `INTENTGATE_MAX_INSTANCES_PER_TENANT`.
    pub max_instances_per_tenant: usize,
    pub clock_leeway_secs: u64,
    pub revocation_max_staleness: Duration,
    pub arg_values: ArgValues,
    /// `(file name, Rego source)` of the policy file and of its test file, when given.
    pub policy: Option<PolicySource>,
    pub demo: bool,
    /// `INTENTGATE_ANNOTATE_RESULTS`: `_intentgate` in forwarded results.
    pub annotate_results: bool,
    /// `/metrics` and the log format.
    pub telemetry: TelemetryConfig,
    /// `--watch DIR` and the tenants it applies to.
    pub watch: Option<(PathBuf, Vec<String>)>,
    /// Most plugin components one tenant may hold.
    pub max_components_per_tenant: usize,
    /// `INTENTGATE_AUDIT_DEADLINE_MS`.
    pub audit_deadline: Duration,
    /// `INTENTGATE_AUDIT_WRITER_NICE`.
    pub audit_writer_nice: u8,
    /// `INTENTGATE_AUDIT_WRITER_BATCH`.
    pub audit_writer_batch: bool,
    /// `INTENTGATE_AUDIT_LOG_KEY`, parsed; `None`: the key file in the data directory.
    pub audit_log_key: Option<crate::audit::LogKey>,
    /// Most connections served at once.
    pub max_connections: usize,
    /// How the gateway verifies (and authenticates to) an https upstream, unless its entry in
    /// the upstreams document says otherwise.
    pub upstream_tls: UpstreamTls,
    /// The listener's certificate and key files, when it serves TLS.
    pub listener_tls: Option<ListenerTls>,
    /// `INTENTGATE_ALLOWED_HOSTS`, lowercased; empty: the listener's default.
    pub allowed_hosts: Vec<String>,
    /// `INTENTGATE_ALLOWED_ORIGINS`, lowercased; empty: origins of allowed hosts.
    pub allowed_origins: Vec<String>,
    /// The outbox: destinations from the environment and delivery tuning.
    pub outbox: crate::outbox::OutboxConfig,
}

impl Config {
    /// The settings of an upstream its configuration does not set (see [`NamedUpstream`]).
    pub fn upstream_globals(&self) -> UpstreamGlobals {
        UpstreamGlobals {
            timeout: self.upstream_timeout,
            max_response_bytes: self.upstream_max_response_bytes,
            tls: self.upstream_tls.clone(),
        }
    }

    /// The audit writers' tuning: the defaults with this configuration's deadline.
    pub fn audit_config(&self) -> crate::audit::AuditConfig {
        crate::audit::AuditConfig {
            deadline: self.audit_deadline,
            writer_nice: self.audit_writer_nice,
            writer_batch: self.audit_writer_batch,
            ..crate::audit::AuditConfig::default()
        }
    }
}

/// A separator between an upstream's name and a tool or prompt name: 1-8 of `_` and `.`,
/// which MCP tool names may contain (SEP-986: `A-Z a-z 0-9 _ - .`) and upstream names may not,
/// so the first separator in a namespaced name always ends the upstream's name.
fn valid_separator(s: &str) -> bool {
    (1..=8).contains(&s.len()) && s.bytes().all(|b| matches!(b, b'_' | b'.'))
}

/// TLS toward the upstream: the roots its certificate must chain to, and the client identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTls {
    /// PEM CA certificates; `None` means the system's roots.
    pub ca_file: Option<PathBuf>,
    /// `(certificate chain, private key)` PEM files presented for mTLS.
    pub client_identity: Option<(PathBuf, PathBuf)>,
    /// The name the upstream's certificate is checked against (and sent as SNI), instead of
    /// the URL's host. Only per upstream, in the upstreams document.
    pub server_name: Option<String>,
}

/// The listener's certificate chain and private key (PEM files, watched for changes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// A URL as it may be shown (logs, `check-config`, errors): the userinfo and the query, which
/// may carry credentials, are replaced by `***`. The one redaction of URLs; use it everywhere a
/// URL leaves the process.
pub fn redact_url(uri: &hyper::Uri) -> String {
    let mut out = String::new();
    if let Some(scheme) = uri.scheme_str() {
        out.push_str(scheme);
        out.push_str("://");
    }
    if let Some(authority) = uri.authority() {
        match authority.as_str().rsplit_once('@') {
            Some((_, host)) => {
                out.push_str("***@");
                out.push_str(host);
            }
            None => out.push_str(authority.as_str()),
        }
    }
    out.push_str(uri.path());
    if uri.query().is_some() {
        out.push_str("?***");
    }
    out
}

/// A URL setting's raw value as a `Debug` may show it: through [`redact_url`] when it is an
/// http(s) URL, else only that it is set (a value that is no URL may still be a credential).
fn redact_raw_url(raw: &Option<String>) -> Option<String> {
    raw.as_deref()
        .map(|r| match r.trim().parse::<hyper::Uri>() {
            Ok(u) if matches!(u.scheme_str(), Some("http" | "https")) => redact_url(&u),
            _ => "<set>".to_owned(),
        })
}

/// `text` with the secrets of `uri` (its userinfo and query, whole and part by part) replaced
/// by `***`: for messages that may echo the URL, such as an upstream's error page or a client
/// library's error. Parts shorter than 4 characters are only removed as part of the whole.
pub fn scrub_url_secrets(text: &str, uri: &hyper::Uri) -> String {
    let mut secrets: Vec<&str> = Vec::new();
    if let Some((userinfo, _)) = uri.authority().and_then(|a| a.as_str().rsplit_once('@')) {
        secrets.push(userinfo);
        secrets.extend(userinfo.split(':').filter(|p| p.len() >= 4));
    }
    if let Some(query) = uri.query() {
        secrets.push(query);
        secrets.extend(
            query
                .split('&')
                .filter_map(|pair| pair.split_once('=').map(|(_, v)| v))
                .filter(|v| v.len() >= 4),
        );
    }
    // Longest first, so a part never leaves the rest of a longer secret behind.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let mut out = text.to_owned();
    for secret in secrets.into_iter().filter(|s| !s.is_empty()) {
        out = out.replace(secret, "***");
    }
    out
}

/// Settings under the original gateway's names (`INTENTGATE_*` as its runbook and OpenAPI
/// document name them), hidden from `--help`.
#[derive(clap::Args, Clone, Default)]
pub struct OriginalNames {
    /// `INTENTGATE_TENANT_ADMINS` under the original's name.
    #[arg(
        long,
        env = "INTENTGATE_TENANT_ADMIN_TOKENS",
        hide = true,
        hide_env_values = true
    )]
    pub tenant_admin_tokens: Option<String>,
    /// `INTENTGATE_APPROVAL_TIMEOUT_S` under the original's name (seconds).
    #[arg(
        long = "approval-timeout",
        env = "INTENTGATE_APPROVAL_TIMEOUT",
        hide = true
    )]
    pub approval_timeout: Option<u64>,
    /// The retired Sentinel Data Collector API's settings: refused with what to set instead.
    #[arg(long, env = "INTENTGATE_SIEM_SENTINEL_WORKSPACE_ID", hide = true)]
    pub sentinel_workspace_id: Option<String>,
    #[arg(
        long,
        env = "INTENTGATE_SIEM_SENTINEL_SHARED_KEY",
        hide = true,
        hide_env_values = true
    )]
    pub sentinel_shared_key: Option<String>,
}

/// A Rego policy (and its tests) for the default bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicySource {
    pub modules: Vec<(String, String)>,
    pub tests: Vec<(String, String)>,
}

impl PolicySource {
    /// The policy plugin's configuration document.
    pub fn to_config(&self) -> String {
        let map = |v: &[(String, String)]| {
            v.iter()
                .map(|(k, s)| (k.clone(), serde_json::Value::from(s.clone())))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({"modules": map(&self.modules), "tests": map(&self.tests)}).to_string()
    }

    /// The token-scope policy `--demo` uses.
    pub fn demo() -> Self {
        Self {
            modules: vec![(
                "token_scope.rego".into(),
                include_str!("../../policies/examples/token_scope.rego").into(),
            )],
            tests: vec![(
                "token_scope_test.rego".into(),
                include_str!("../../policies/examples/token_scope_test.rego").into(),
            )],
        }
    }

    /// The policy at `path` and the `NAME_test.rego` beside it, if any.
    pub fn read(path: &std::path::Path) -> Result<Self, ConfigError> {
        const SETTING: &str = "INTENTGATE_POLICY_FILE";
        let read = |p: &std::path::Path| {
            std::fs::read_to_string(p)
                .map_err(|e| invalid(SETTING, format!("{}: {e}", p.display())))
        };
        let name = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "policy.rego".into())
        };
        let modules = vec![(name(path), read(path)?)];
        let mut tests = Vec::new();
        if let Some(stem) = path.file_stem() {
            let test = path.with_file_name(format!("{}_test.rego", stem.to_string_lossy()));
            if test.is_file() {
                tests.push((name(&test), read(&test)?));
            }
        }
        Ok(Self { modules, tests })
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |o: &Option<String>| if o.is_some() { "<set>" } else { "<generated>" };
        let tenants: Vec<&str> = self.tenant_admins.iter().map(|(t, _)| t.as_str()).collect();
        f.debug_struct("Config")
            .field("addr", &self.addr)
            .field("data_dir", &self.data_dir)
            .field("master_key", &redact(&self.master_key))
            .field("admin_token", &redact(&self.admin_token))
            .field("tenant_admins", &tenants)
            .field("store", &self.store)
            .field("upstream_url", &self.upstream_url.as_ref().map(redact_url))
            .field("upstream_name", &self.upstream_name)
            .field("upstreams", &self.upstreams)
            .field("upstream_separator", &self.upstream_separator)
            .field("upstream_timeout", &self.upstream_timeout)
            .field(
                "upstream_max_response_bytes",
                &self.upstream_max_response_bytes,
            )
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_json_depth", &self.max_json_depth)
            .field("header_timeout", &self.header_timeout)
            .field("body_timeout", &self.body_timeout)
            .field("plugin_deadline", &self.plugin_deadline)
            .field("call_checks_deadline", &self.call_checks_deadline)
            .field("max_checks_per_bundle", &self.max_checks_per_bundle)
            .field("max_instances_per_tenant", &self.max_instances_per_tenant)
            .field("clock_leeway_secs", &self.clock_leeway_secs)
            .field("revocation_max_staleness", &self.revocation_max_staleness)
            .field("arg_values", &self.arg_values)
            .field("watch", &self.watch)
            .field(
                "policy",
                &self
                    .policy
                    .as_ref()
                    .map(|p| p.modules.iter().map(|m| m.0.as_str()).collect::<Vec<_>>()),
            )
            .field("demo", &self.demo)
            .field("telemetry", &self.telemetry)
            .field("max_components_per_tenant", &self.max_components_per_tenant)
            .field("audit_deadline", &self.audit_deadline)
            .field("audit_writer_nice", &self.audit_writer_nice)
            .field("audit_writer_batch", &self.audit_writer_batch)
            // The key's `Debug` shows its name and public half only.
            .field("audit_log_key", &self.audit_log_key)
            .field("max_connections", &self.max_connections)
            .field("upstream_tls", &self.upstream_tls)
            .field("listener_tls", &self.listener_tls)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("allowed_origins", &self.allowed_origins)
            .field("outbox", &self.outbox)
            .finish()
    }
}

/// A comma-separated list of host names or origins, trimmed and lowercased, each checked.
fn host_list(
    setting: &'static str,
    raw: &[String],
    valid: impl Fn(&str) -> bool,
) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
    for entry in raw.iter().map(|e| e.trim().to_ascii_lowercase()) {
        if entry.is_empty() {
            continue;
        }
        if !valid(&entry) {
            return Err(invalid(setting, format!("{entry:?} is not a valid entry")));
        }
        out.push(entry);
    }
    Ok(out)
}

/// A tenant name: what tokens, admin scopes and audit chains are keyed by.
pub fn valid_tenant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl ServeArgs {
    /// Checks every setting and returns the configuration, or the first bad setting by name.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        secret_files::apply(&mut self)?;
        let addr: SocketAddr = self.addr.parse().map_err(|e| {
            invalid(
                "INTENTGATE_ADDR",
                format!("{e}: expected host:port such as 127.0.0.1:8080"),
            )
        })?;
        if self.data_dir.as_os_str().is_empty() {
            return Err(invalid("INTENTGATE_DATA_DIR", "must not be empty"));
        }
        // A token read from a file (a Kubernetes Secret) often ends in a newline, which no
        // client sends (a bearer is trimmed): it could never match.
        self.admin_token = self.admin_token.map(|t| t.trim().to_owned());
        self.telemetry.metrics_token =
            (self.telemetry.metrics_token.take()).map(|t| t.trim().to_owned());
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return Err(invalid(
                    "INTENTGATE_ADMIN_TOKEN",
                    "must be at least 16 characters",
                ));
            }
            if !bearer_chars_ok(t) {
                return Err(invalid("INTENTGATE_ADMIN_TOKEN", BEARER_CHARS));
            }
        }
        // Checked here as `Gateway::start` checks it, so that `check-config` refuses what
        // `serve` would (the key itself is never shown: `KeyError` does not quote it).
        if let Some(key) = &self.master_key {
            crate::capability::MasterKey::from_base64(key)
                .map_err(|e| invalid("INTENTGATE_MASTER_KEY", e.to_string()))?;
        }
        // An empty value counts as unset, as it always has.
        let audit_log_key = match self.audit_log_key.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(text) => Some(
                crate::audit::LogKey::parse(text)
                    .map_err(|e| invalid("INTENTGATE_AUDIT_LOG_KEY", e.to_string()))?,
            ),
        };
        if self.original.sentinel_workspace_id.is_some()
            || self.original.sentinel_shared_key.is_some()
        {
            return Err(invalid(
                "INTENTGATE_SIEM_SENTINEL_WORKSPACE_ID",
                "(and _SHARED_KEY) configured the HTTP Data Collector API, which Microsoft retired; \
                 this gateway sends to the Logs Ingestion API: set INTENTGATE_SIEM_SENTINEL_DCE_URL, \
                 _DCR_ID, _STREAM, _TENANT_ID, _CLIENT_ID and _CLIENT_SECRET instead (see the README)",
            ));
        }
        let tenant_admins_raw = match (&self.tenant_admins, &self.original.tenant_admin_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(
                    "INTENTGATE_TENANT_ADMINS",
                    "differs from INTENTGATE_TENANT_ADMIN_TOKENS (the original's name): set one",
                ));
            }
            (a, b) => a.as_ref().or(b.as_ref()),
        };
        let tenant_admins = match tenant_admins_raw {
            None => Vec::new(),
            Some(raw) => parse_tenant_admins(raw)?,
        };
        // One credential, one principal: a tenant admin's token equal to the superadmin's would
        // be matched as whichever comes first, raising or lowering it silently.
        if let Some(t) = &self.admin_token
            && tenant_admins.iter().any(|(_, token)| token == t)
        {
            return Err(invalid(
                "INTENTGATE_TENANT_ADMINS",
                "a tenant admin's token is the same as INTENTGATE_ADMIN_TOKEN",
            ));
        }
        // The scrape credential must not also be an admin's.
        if let Some(m) = &self.telemetry.metrics_token
            && (self.admin_token.as_ref() == Some(m)
                || tenant_admins.iter().any(|(_, token)| token == m))
        {
            return Err(invalid(
                "INTENTGATE_METRICS_TOKEN",
                "is the same as an admin's token (INTENTGATE_ADMIN_TOKEN or INTENTGATE_TENANT_ADMINS)",
            ));
        }
        let store = match self.postgres_url.clone() {
            Some(url) if !url.trim().is_empty() => {
                if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                    return Err(invalid(
                        "INTENTGATE_POSTGRES_URL",
                        "must start with postgres:// or postgresql://",
                    ));
                }
                StoreChoice::Postgres(url)
            }
            _ => StoreChoice::Sqlite(self.data_dir.join("intentgate.sqlite3")),
        };
        let upstream_url = match self.upstream_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(raw) => Some(upstream_uri("INTENTGATE_UPSTREAM_URL", raw)?),
        };
        if !valid_tenant_name(&self.upstream_name) {
            return Err(invalid(
                "INTENTGATE_UPSTREAM_NAME",
                "use 1-64 of A-Z a-z 0-9 . _ -",
            ));
        }
        let parsed = upstreams::parse(
            upstream_url
                .as_ref()
                .map(|u| (self.upstream_name.as_str(), u)),
            &self.upstreams,
            self.upstreams_file.as_deref(),
        )?;
        let upstream_separator = match (self.upstream_separator.clone(), parsed.separator) {
            (Some(a), Some(b)) if a != b => {
                return Err(invalid(
                    "INTENTGATE_UPSTREAM_SEPARATOR",
                    format!("{a:?}, but the upstreams document says {b:?}: set one of them"),
                ));
            }
            (Some(s), _) | (None, Some(s)) => s,
            (None, None) => "__".to_owned(),
        };
        if !valid_separator(&upstream_separator) {
            return Err(invalid(
                "INTENTGATE_UPSTREAM_SEPARATOR",
                "use 1-8 of _ and .",
            ));
        }
        upstreams::check_prefixes(&parsed.specs, &upstream_separator)?;
        let ranged = |setting: &'static str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(invalid(setting, format!("{v} is outside {lo}..={hi}")))
            }
        };
        let upstream_timeout = Duration::from_millis(ranged(
            "INTENTGATE_UPSTREAM_TIMEOUT_MS",
            self.upstream_timeout_ms,
            1,
            600_000,
        )?);
        let approvals = crate::approvals::ApprovalConfig {
            mode: crate::approvals::Mode::parse(&self.approval_mode)
                .map_err(|e| invalid("INTENTGATE_APPROVAL_MODE", e))?,
            timeout: Duration::from_secs(ranged(
                "INTENTGATE_APPROVAL_TIMEOUT_S",
                match (self.approval_timeout_s, self.original.approval_timeout) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(invalid(
                            "INTENTGATE_APPROVAL_TIMEOUT_S",
                            "differs from INTENTGATE_APPROVAL_TIMEOUT (the original's name): set one",
                        ));
                    }
                    (a, b) => a.or(b).unwrap_or(300),
                },
                1,
                7 * 86_400,
            )?),
            keepalive: Duration::from_millis(ranged(
                "INTENTGATE_APPROVAL_KEEPALIVE_MS",
                self.approval_keepalive_ms,
                50,
                300_000,
            )?),
            poll: Duration::from_millis(ranged(
                "INTENTGATE_APPROVAL_POLL_MS",
                self.approval_poll_ms,
                50,
                600_000,
            )?),
            retention_days: match ranged(
                "INTENTGATE_APPROVAL_RETENTION_DAYS",
                self.approval_retention_days,
                0,
                36_500,
            )? {
                0 => None,
                days => Some(days),
            },
        };
        let streams = crate::streams::Limits {
            window: ranged(
                "INTENTGATE_STREAM_REPLAY_EVENTS",
                self.stream_replay_events as u64,
                0,
                100_000,
            )? as usize,
            live: ranged(
                "INTENTGATE_STREAM_QUEUE_EVENTS",
                self.stream_queue_events as u64,
                1,
                100_000,
            )? as usize,
            sessions: ranged(
                "INTENTGATE_STREAM_MAX_SESSIONS",
                self.stream_max_sessions as u64,
                1,
                10_000_000,
            )? as usize,
            sessions_per_tenant: ranged(
                "INTENTGATE_STREAM_MAX_SESSIONS_PER_TENANT",
                self.stream_max_sessions_per_tenant as u64,
                1,
                10_000_000,
            )? as usize,
            // Half of the connections, so one tenant's streams never shut the others out.
            live_per_tenant: (self.max_connections / 2)
                .max(1)
                .min(self.stream_max_sessions_per_tenant.max(1)),
            ..crate::streams::Limits::default()
        };
        let header_timeout = Duration::from_millis(ranged(
            "INTENTGATE_HEADER_TIMEOUT_MS",
            self.header_timeout_ms,
            100,
            120_000,
        )?);
        let plugin_deadline = Duration::from_millis(ranged(
            "INTENTGATE_PLUGIN_DEADLINE_MS",
            self.plugin_deadline_ms,
            1,
            10_000,
        )?);
        let call_checks_deadline = Duration::from_millis(ranged(
            "INTENTGATE_CALL_CHECKS_DEADLINE_MS",
            self.call_checks_deadline_ms,
            1,
            60_000,
        )?);
        let pool = crate::plugins::Limits::default().max_instances as u64;
        let max_instances_per_tenant = ranged(
            "INTENTGATE_MAX_INSTANCES_PER_TENANT",
            self.max_instances_per_tenant as u64,
            1,
            pool,
        )? as usize;
        let max_checks_per_bundle = ranged(
            "INTENTGATE_MAX_CHECKS_PER_BUNDLE",
            self.max_checks_per_bundle as u64,
            1,
            pool,
        )? as usize;
        if max_checks_per_bundle > max_instances_per_tenant {
            // Every check of a bundle holds an instance of the tenant's quota.
            return Err(invalid(
                "INTENTGATE_MAX_CHECKS_PER_BUNDLE",
                format!(
                    "{max_checks_per_bundle} exceeds INTENTGATE_MAX_INSTANCES_PER_TENANT \
                     ({max_instances_per_tenant}): every check holds one of the tenant's instances"
                ),
            ));
        }
        let audit_deadline = Duration::from_millis(ranged(
            "INTENTGATE_AUDIT_DEADLINE_MS",
            self.audit_deadline_ms,
            10,
            60_000,
        )?);
        let audit_writer_nice = ranged(
            "INTENTGATE_AUDIT_WRITER_NICE",
            u64::from(self.audit_writer_nice),
            0,
            u64::from(crate::audit::priority::MAX_NICE),
        )? as u8;
        let body_timeout = Duration::from_millis(ranged(
            "INTENTGATE_BODY_TIMEOUT_MS",
            self.body_timeout_ms,
            100,
            600_000,
        )?);
        ranged(
            "INTENTGATE_MAX_BODY_BYTES",
            self.max_body_bytes as u64,
            1024,
            64 << 20,
        )?;
        ranged(
            "INTENTGATE_UPSTREAM_MAX_RESPONSE_BYTES",
            self.upstream_max_response_bytes as u64,
            1024,
            256 << 20,
        )?;
        ranged(
            "INTENTGATE_MAX_JSON_DEPTH",
            self.max_json_depth as u64,
            4,
            512,
        )?;
        ranged(
            "INTENTGATE_CLOCK_LEEWAY_SECS",
            self.clock_leeway_secs,
            0,
            300,
        )?;
        let staleness = ranged(
            "INTENTGATE_REVOCATION_MAX_STALENESS_SECS",
            self.revocation_max_staleness_secs,
            1,
            3600,
        )?;
        let watch = match &self.watch_dir {
            None => None,
            Some(dir) => {
                if !dir.is_dir() {
                    return Err(invalid(
                        "INTENTGATE_WATCH_DIR",
                        format!("{} is not a directory", dir.display()),
                    ));
                }
                let tenants: Vec<String> = self
                    .watch_tenants
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect();
                if tenants.is_empty() || !tenants.iter().all(|t| valid_tenant_name(t)) {
                    return Err(invalid(
                        "INTENTGATE_WATCH_TENANTS",
                        "a comma-separated list of tenant names (1-64 of A-Z a-z 0-9 . _ -)",
                    ));
                }
                Some((dir.clone(), tenants))
            }
        };
        let max_connections = ranged(
            "INTENTGATE_MAX_CONNECTIONS",
            self.max_connections as u64,
            1,
            1_000_000,
        )? as usize;
        let upstream_tls = self.upstream_tls(parsed.specs.iter().any(|u| u.https()))?;
        let globals = UpstreamGlobals {
            timeout: upstream_timeout,
            max_response_bytes: self.upstream_max_response_bytes,
            tls: upstream_tls.clone(),
        };
        let upstreams: Vec<NamedUpstream> = (parsed.specs.into_iter())
            .map(|s| s.resolve(&globals))
            .collect();
        let listener_tls = match (self.tls_cert_file.clone(), self.tls_key_file.clone()) {
            (None, None) => None,
            (Some(cert_file), Some(key_file)) => {
                crate::tls::load_certified_key(&cert_file, &key_file).map_err(|e| {
                    invalid(
                        "INTENTGATE_TLS_CERT_FILE/INTENTGATE_TLS_KEY_FILE",
                        e.to_string(),
                    )
                })?;
                Some(ListenerTls {
                    cert_file,
                    key_file,
                })
            }
            (Some(_), None) => {
                return Err(invalid(
                    "INTENTGATE_TLS_KEY_FILE",
                    "required with INTENTGATE_TLS_CERT_FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "INTENTGATE_TLS_CERT_FILE",
                    "required with INTENTGATE_TLS_KEY_FILE",
                ));
            }
        };
        let allowed_hosts = host_list("INTENTGATE_ALLOWED_HOSTS", &self.allowed_hosts, |h| {
            h == "*" || crate::mcp::origin::split_host(h).is_some()
        })?;
        let allowed_origins =
            host_list("INTENTGATE_ALLOWED_ORIGINS", &self.allowed_origins, |o| {
                o == "*" || crate::mcp::origin::parse_origin(o).is_some()
            })?;
        if self.demo && !upstreams.is_empty() {
            return Err(invalid(
                "--demo",
                "starts a demo upstream; do not combine it with INTENTGATE_UPSTREAM_URL, INTENTGATE_UPSTREAMS or INTENTGATE_UPSTREAMS_FILE",
            ));
        }
        let telemetry = self.telemetry.validate(addr)?;
        let outbox = self.outbox.validate()?;
        Ok(Config {
            addr,
            data_dir: self.data_dir,
            master_key: self.master_key,
            admin_token: self.admin_token,
            tenant_admins,
            store,
            upstream_url,
            upstream_name: self.upstream_name,
            upstreams,
            upstream_separator,
            upstream_timeout,
            upstream_max_response_bytes: self.upstream_max_response_bytes,
            approvals,
            streams,
            max_body_bytes: self.max_body_bytes,
            max_json_depth: self.max_json_depth,
            header_timeout,
            body_timeout,
            plugin_deadline,
            call_checks_deadline,
            max_checks_per_bundle,
            max_instances_per_tenant,
            clock_leeway_secs: self.clock_leeway_secs,
            revocation_max_staleness: Duration::from_secs(staleness),
            arg_values: self.audit_persist_arg_values,
            policy: match (&self.policy_file, self.demo) {
                (Some(p), _) => Some(PolicySource::read(p)?),
                (None, true) => Some(PolicySource::demo()),
                (None, false) => None,
            },
            demo: self.demo,
            annotate_results: self.annotate_results,
            telemetry,
            watch,
            max_components_per_tenant: match self.max_components_per_tenant {
                n @ 1..=crate::bundles::MAX_UPLOADED_COMPONENTS => n,
                _ => {
                    return Err(invalid(
                        "INTENTGATE_MAX_COMPONENTS_PER_TENANT",
                        format!(
                            "must be 1-{} (the gateway's cap)",
                            crate::bundles::MAX_UPLOADED_COMPONENTS
                        ),
                    ));
                }
            },
            audit_deadline,
            audit_writer_nice,
            audit_writer_batch: self.audit_writer_batch,
            audit_log_key,
            max_connections,
            upstream_tls,
            listener_tls,
            allowed_hosts,
            allowed_origins,
            outbox,
        })
    }

    /// The upstream TLS files, each checked (read and parsed) and named when bad. They only
    /// make sense toward an https upstream.
    fn upstream_tls(&self, https: bool) -> Result<UpstreamTls, ConfigError> {
        if let Some(ca) = &self.upstream_ca_file {
            if !https {
                return Err(invalid(
                    "INTENTGATE_UPSTREAM_CA_FILE",
                    "set, but no upstream URL is https://",
                ));
            }
            crate::tls::read_certs(ca)
                .map_err(|e| invalid("INTENTGATE_UPSTREAM_CA_FILE", e.to_string()))?;
        }
        let client_identity = match (
            self.upstream_client_cert_file.clone(),
            self.upstream_client_key_file.clone(),
        ) {
            (None, None) => None,
            (Some(cert), Some(key)) => {
                if !https {
                    return Err(invalid(
                        "INTENTGATE_UPSTREAM_CLIENT_CERT_FILE",
                        "set, but no upstream URL is https://",
                    ));
                }
                crate::tls::load_certified_key(&cert, &key).map_err(|e| {
                    invalid(
                        "INTENTGATE_UPSTREAM_CLIENT_CERT_FILE/INTENTGATE_UPSTREAM_CLIENT_KEY_FILE",
                        e.to_string(),
                    )
                })?;
                Some((cert, key))
            }
            (Some(_), None) => {
                return Err(invalid(
                    "INTENTGATE_UPSTREAM_CLIENT_KEY_FILE",
                    "required with INTENTGATE_UPSTREAM_CLIENT_CERT_FILE",
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "INTENTGATE_UPSTREAM_CLIENT_CERT_FILE",
                    "required with INTENTGATE_UPSTREAM_CLIENT_KEY_FILE",
                ));
            }
        };
        Ok(UpstreamTls {
            ca_file: self.upstream_ca_file.clone(),
            client_identity,
            server_name: None,
        })
    }
}

fn parse_tenant_admins(raw: &str) -> Result<Vec<(String, String)>, ConfigError> {
    const SETTING: &str = "INTENTGATE_TENANT_ADMINS";
    let mut out: Vec<(String, String)> = Vec::new();
    // Commas or newlines between entries: a file (INTENTGATE_TENANT_ADMINS_FILE) reads best
    // with one entry a line. Numbered as split, so in such a file entry N is line N.
    for (i, entry) in raw.split([',', '\n']).map(str::trim).enumerate() {
        if entry.is_empty() {
            continue;
        }
        // Never echo the entry: it holds a secret.
        let Some((tenant, token)) = entry.split_once(':') else {
            return Err(invalid(
                SETTING,
                format!("entry {} is not tenant:token", i + 1),
            ));
        };
        let (tenant, token) = (tenant.trim(), token.trim());
        if !valid_tenant_name(tenant) {
            return Err(invalid(
                SETTING,
                format!("entry {}: bad tenant name", i + 1),
            ));
        }
        // Entries are named by number only: written the wrong way round (token:tenant), the
        // "tenant" is a secret, and this error goes to the logs.
        if token.len() < 16 {
            return Err(invalid(
                SETTING,
                format!(
                    "entry {}: token shorter than 16 characters (entries are tenant:token)",
                    i + 1
                ),
            ));
        }
        if !bearer_chars_ok(token) {
            return Err(invalid(
                SETTING,
                format!("entry {}: the token {BEARER_CHARS}", i + 1),
            ));
        }
        if out.iter().any(|(t, _)| t == tenant) {
            return Err(invalid(
                SETTING,
                format!("entry {}: its tenant is listed twice", i + 1),
            ));
        }
        if out.iter().any(|(_, t)| t == token) {
            return Err(invalid(
                SETTING,
                format!("entry {}: the same token as another tenant's", i + 1),
            ));
        }
        out.push((tenant.to_owned(), token.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut v = vec!["t"];
        v.extend_from_slice(args);
        T::try_parse_from(v).expect("clap parse").a.validate()
    }

    /// `--help` prints each setting's environment value unless told not to: a URL carries
    /// credentials (userinfo, a Slack-style secret path, a query token), and a key or token
    /// is one. Every such setting hides its value.
    #[test]
    fn help_never_prints_a_secret_or_url_from_the_environment() {
        use clap::CommandFactory;
        let cmd = T::command();
        let mut checked = 0;
        for arg in cmd.get_arguments() {
            let Some(env) = arg.get_env().and_then(|e| e.to_str()) else {
                continue;
            };
            let sensitive = [
                "URL",
                "ENDPOINT",
                "TOKEN",
                "SECRET",
                "MASTER_KEY",
                "HEADERS",
                "ADMINS",
                "UPSTREAMS",
            ]
            .iter()
            .any(|w| env.contains(w))
                && !env.ends_with("_FILE")
                && !env.ends_with("_MS");
            if sensitive {
                checked += 1;
                assert!(
                    arg.is_hide_env_values_set(),
                    "{env} shows its value in --help"
                );
            }
        }
        assert!(checked >= 12, "{checked} settings checked");
    }

    /// The original gateway's names are read (or refused with what to set instead), never
    /// silently ignored.
    #[test]
    fn the_originals_names_are_read_or_refused() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.approvals.timeout, Duration::from_secs(300));
        let c = parse(&["--approval-timeout", "600"]).expect("original name");
        assert_eq!(c.approvals.timeout, Duration::from_secs(600));
        let e = parse(&["--approval-timeout", "600", "--approval-timeout-s", "60"])
            .expect_err("two values")
            .to_string();
        assert!(e.contains("INTENTGATE_APPROVAL_TIMEOUT"), "{e}");
        let c = parse(&["--tenant-admin-tokens", "acme:acme-admin-token-0123"]).expect("alias");
        assert_eq!(c.tenant_admins.len(), 1);
        let e = parse(&["--sentinel-shared-key", "k"])
            .expect_err("retired API")
            .to_string();
        assert!(e.contains("INTENTGATE_SIEM_SENTINEL_DCE_URL"), "{e}");
    }

    #[test]
    fn defaults_are_local_and_embedded() {
        let c = parse(&[]).expect("defaults valid");
        assert_eq!(c.addr.to_string(), "127.0.0.1:8080");
        assert!(matches!(c.store, StoreChoice::Sqlite(_)));
        assert!(c.upstream_url.is_none());
    }

    #[test]
    fn plugin_deadline_is_bounded() {
        assert_eq!(
            parse(&[]).expect("defaults").plugin_deadline,
            Duration::from_millis(50)
        );
        assert_eq!(
            parse(&["--plugin-deadline-ms", "250"])
                .expect("valid")
                .plugin_deadline,
            Duration::from_millis(250)
        );
        for bad in ["0", "10001"] {
            let e = parse(&["--plugin-deadline-ms", bad])
                .expect_err("must be refused")
                .to_string();
            assert!(e.starts_with("INTENTGATE_PLUGIN_DEADLINE_MS"), "{e}");
        }
    }

    #[test]
    fn the_approval_poll_is_configurable_and_bounded() {
        assert_eq!(
            parse(&[]).expect("defaults").approvals.poll,
            crate::approvals::wait::POLL
        );
        assert_eq!(
            parse(&["--approval-poll-ms", "60000"])
                .expect("valid")
                .approvals
                .poll,
            Duration::from_secs(60)
        );
        for bad in ["0", "600001"] {
            let e = parse(&["--approval-poll-ms", bad])
                .expect_err("must be refused")
                .to_string();
            assert!(e.starts_with("INTENTGATE_APPROVAL_POLL_MS"), "{e}");
        }
    }

    #[test]
    fn approval_rows_are_kept_30_days_unless_configured() {
        let days = |args: &[&str]| parse(args).expect("valid").approvals.retention_days;
        assert_eq!(days(&[]), Some(30));
        assert_eq!(days(&["--approval-retention-days", "7"]), Some(7));
        assert_eq!(days(&["--approval-retention-days", "0"]), None);
        let e = parse(&["--approval-retention-days", "36501"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_APPROVAL_RETENTION_DAYS"), "{e}");
    }

    #[test]
    fn plugin_quotas_are_bounded_and_consistent() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.call_checks_deadline, Duration::from_millis(200));
        assert!(c.max_checks_per_bundle <= c.max_instances_per_tenant);
        let e = parse(&[
            "--max-checks-per-bundle",
            "8",
            "--max-instances-per-tenant",
            "4",
        ])
        .expect_err("more checks than instances")
        .to_string();
        assert!(e.starts_with("INTENTGATE_MAX_CHECKS_PER_BUNDLE"), "{e}");
        for (flag, setting) in [
            (
                "--max-instances-per-tenant",
                "INTENTGATE_MAX_INSTANCES_PER_TENANT",
            ),
            (
                "--call-checks-deadline-ms",
                "INTENTGATE_CALL_CHECKS_DEADLINE_MS",
            ),
        ] {
            let e = parse(&[flag, "0"]).expect_err("zero").to_string();
            assert!(e.starts_with(setting), "{e}");
        }
    }

    #[test]
    fn audit_deadline_is_bounded() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(c.audit_deadline, Duration::from_secs(2));
        assert_eq!(c.audit_config().deadline, Duration::from_secs(2));
        assert_eq!(
            parse(&["--audit-deadline-ms", "300"])
                .expect("valid")
                .audit_config()
                .deadline,
            Duration::from_millis(300)
        );
        for bad in ["0", "9", "60001"] {
            let e = parse(&["--audit-deadline-ms", bad])
                .expect_err("must be refused")
                .to_string();
            assert!(e.starts_with("INTENTGATE_AUDIT_DEADLINE_MS"), "{e}");
        }
    }

    #[test]
    fn audit_writer_nice_is_bounded() {
        let c = parse(&[]).expect("defaults");
        assert_eq!(
            c.audit_config().writer_nice,
            crate::audit::DEFAULT_WRITER_NICE
        );
        for ok in ["0", "19"] {
            let c = parse(&["--audit-writer-nice", ok]).expect("valid");
            assert_eq!(c.audit_config().writer_nice.to_string(), ok);
        }
        let e = parse(&["--audit-writer-nice", "20"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_AUDIT_WRITER_NICE"), "{e}");
    }

    #[test]
    fn audit_writer_batch_is_on_unless_turned_off() {
        assert!(parse(&[]).expect("defaults").audit_config().writer_batch);
        let off = parse(&["--audit-writer-batch", "false"]).expect("valid");
        assert!(!off.audit_config().writer_batch);
        let on = parse(&["--audit-writer-batch"]).expect("valid");
        assert!(on.audit_config().writer_batch);
    }

    #[test]
    fn watch_needs_a_folder_and_valid_tenants() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path().to_str().expect("utf-8");
        let c = parse(&["--watch", d, "--watch-tenants", " acme, globex ,"]).expect("valid");
        assert_eq!(
            c.watch,
            Some((
                dir.path().to_path_buf(),
                vec!["acme".into(), "globex".into()]
            ))
        );
        assert_eq!(
            parse(&["--watch", d]).expect("valid").watch.map(|w| w.1),
            Some(vec!["default".into()])
        );
        let missing = dir.path().join("missing");
        let e = parse(&["--watch", missing.to_str().expect("utf-8")])
            .expect_err("must be refused")
            .to_string();
        assert!(
            e.starts_with("INTENTGATE_WATCH_DIR") && e.contains("not a directory"),
            "{e}"
        );
        let e = parse(&["--watch", d, "--watch-tenants", "a b"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_WATCH_TENANTS"), "{e}");
        assert!(parse(&[]).expect("defaults").watch.is_none());
    }

    #[test]
    fn bad_settings_are_named() {
        let e = parse(&["--addr", "nope"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_ADDR"), "{e}");
        let e = parse(&["--upstream-url", "ftp://x/mcp"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_UPSTREAM_URL"), "{e}");
        let e = parse(&["--tenant-admins", "acme:tiny-secret"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("entry 1") && !e.contains("tiny-secret"), "{e}");
        // Written the wrong way round, the "tenant" is the secret: never echoed.
        let e = parse(&["--tenant-admins", "aaaaaaaaaaaaaaaaaaaaaaaa:acme"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.contains("entry 1") && !e.contains("aaaa"), "{e}");
        let e = parse(&[
            "--metrics-token",
            "same-token-0123456789",
            "--admin-token",
            "same-token-0123456789",
        ])
        .expect_err("must be refused")
        .to_string();
        assert!(e.starts_with("INTENTGATE_METRICS_TOKEN"), "{e}");
        let e = parse(&["--upstream-timeout-ms", "0"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_UPSTREAM_TIMEOUT_MS"), "{e}");
        let e = parse(&["--postgres-url", "mysql://x"])
            .expect_err("must be refused")
            .to_string();
        assert!(e.starts_with("INTENTGATE_POSTGRES_URL"), "{e}");
    }

    #[test]
    fn url_credentials_are_redacted() {
        let c = parse(&[
            "--upstream-url",
            "https://svc:hunter2pass@tools.internal:8443/mcp?token=sekrit-token&v=1",
        ])
        .expect("valid");
        let dbg = format!("{c:#?}");
        for secret in ["hunter2pass", "sekrit-token", "svc:"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(
            dbg.contains("https://***@tools.internal:8443/mcp?***"),
            "{dbg}"
        );
        let uri = c.upstream_url.expect("url");
        let text = "POST /mcp?token=sekrit-token&v=1 refused for svc:hunter2pass (sekrit-token)";
        let scrubbed = scrub_url_secrets(text, &uri);
        assert!(
            !scrubbed.contains("sekrit") && !scrubbed.contains("hunter2pass"),
            "{scrubbed}"
        );
        let plain: hyper::Uri = "http://127.0.0.1:9/mcp".parse().expect("uri");
        assert_eq!(redact_url(&plain), "http://127.0.0.1:9/mcp");
        assert_eq!(scrub_url_secrets("HTTP 502", &plain), "HTTP 502");
    }

    #[test]
    fn several_upstreams_are_named_checked_and_redacted() {
        let c = parse(&[
            "--upstream-url",
            "http://127.0.0.1:9/mcp",
            "--upstream",
            "github=https://bot:hunter2pass@gh.internal/mcp?key=sekrit-key",
            "--upstream",
            "db=http://db.internal:8080/mcp",
        ])
        .expect("valid");
        let names: Vec<&str> = c.upstreams.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["default", "github", "db"]);
        assert_eq!(c.upstream_separator, "__");
        let dbg = format!("{c:#?}");
        for secret in ["hunter2pass", "sekrit-key", "bot:"] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
        assert!(
            dbg.contains("github=https://***@gh.internal/mcp?***"),
            "{dbg}"
        );
        // Alone, without INTENTGATE_UPSTREAM_URL; commas in one value.
        let c = parse(&["--upstream", "a=http://h/1,b-2=http://h/2"]).expect("valid");
        assert_eq!(c.upstreams.len(), 2);
        assert!(c.upstream_url.is_none());
        let refused = |args: &[&str], setting: &str, says: &str| {
            let e = parse(args).expect_err("refused").to_string();
            assert!(e.starts_with(setting) && e.contains(says), "{args:?}: {e}");
            assert!(!e.contains("hunter2pass"), "{e}");
        };
        refused(
            &["--upstream", "a=http://h/1", "--upstream", "a=http://h/2"],
            "INTENTGATE_UPSTREAMS",
            "twice",
        );
        refused(
            &[
                "--upstream-url",
                "http://h/0",
                "--upstream",
                "default=http://h/2",
            ],
            "INTENTGATE_UPSTREAMS",
            "twice",
        );
        for bad in [
            "Git=http://h/1",
            "gh_x=http://h/1",
            "1a=http://h/1",
            "=http://h/1",
        ] {
            refused(
                &["--upstream", bad],
                "INTENTGATE_UPSTREAMS",
                "upstream name",
            );
        }
        refused(
            &["--upstream", "github"],
            "INTENTGATE_UPSTREAMS",
            "NAME=URL",
        );
        refused(
            &["--upstream", "gh=ftp://bot:hunter2pass@h/1"],
            "INTENTGATE_UPSTREAMS",
            "http",
        );
        // A legacy name that cannot prefix tool names beside another upstream.
        refused(
            &[
                "--upstream-url",
                "http://h/0",
                "--upstream-name",
                "Tools_1",
                "--upstream",
                "db=http://h/2",
            ],
            "INTENTGATE_UPSTREAM_NAME",
            "prefix",
        );
        refused(
            &["--upstream-separator", "/"],
            "INTENTGATE_UPSTREAM_SEPARATOR",
            "_",
        );
        refused(
            &["--demo", "--upstream", "db=http://h/2"],
            "--demo",
            "INTENTGATE_UPSTREAMS",
        );
        refused(
            &[
                "--upstream",
                "db=http://h/2",
                "--upstream-ca-file",
                "/nonexistent.pem",
            ],
            "INTENTGATE_UPSTREAM_CA_FILE",
            "https",
        );
    }

    /// A bearer secret with whitespace, a control or a non-ASCII character could never match a
    /// request's `Authorization` header: refused by its setting's name, never quoted.
    #[test]
    fn bearer_secrets_that_could_never_match_are_refused() {
        let refused = |args: &[&str], setting: &str| {
            let e = parse(args).expect_err("refused").to_string();
            assert!(
                e.starts_with(setting) && e.contains("whitespace"),
                "{args:?}: {e}"
            );
            assert!(!e.contains("sekrit"), "a secret is never shown: {e}");
        };
        for bad in [
            "sekrit token with spaces",
            "sekrit-0123456789\nsecond-line",
            "sekrit-0123456789\tx",
            "sekrit-\u{7f}-0123456789",
            "sekrit-\u{e9}-0123456789",
        ] {
            refused(&["--admin-token", bad], "INTENTGATE_ADMIN_TOKEN:");
            refused(&["--metrics-token", bad], "INTENTGATE_METRICS_TOKEN:");
            if bad.contains('\n') {
                continue; // separates tenant-admins entries (see below)
            }
            let entry = format!("acme:{bad}");
            let e = parse(&["--tenant-admins", &entry])
                .expect_err("refused")
                .to_string();
            assert!(
                e.starts_with("INTENTGATE_TENANT_ADMINS")
                    && e.contains("entry 1")
                    && e.contains("whitespace")
                    && !e.contains("sekrit"),
                "{e}"
            );
        }
        // Only the ends are whitespace: trimmed, as before.
        let c = parse(&[
            "--admin-token",
            " padded-admin-token-0123456789\n",
            "--metrics-token",
            "padded-metrics-token-0123456789\r\n",
        ])
        .expect("valid");
        assert_eq!(
            c.admin_token.as_deref(),
            Some("padded-admin-token-0123456789")
        );
        assert_eq!(
            c.telemetry.metrics.token.as_deref(),
            Some("padded-metrics-token-0123456789")
        );
    }

    /// A tenant-admins list (a file, mostly) may put one entry a line; blank lines and CRLF
    /// endings are skipped, commas still separate, and entries are numbered as split.
    #[test]
    fn tenant_admins_may_be_one_a_line() {
        let c = parse(&[
            "--tenant-admins",
            "acme:aaaaaaaaaaaaaaaa1\r\n\n  globex:bbbbbbbbbbbbbbbb2 \ninitech:cccccccccccccccc3,umbrella:dddddddddddddddd4\n",
        ])
        .expect("valid");
        let got: Vec<(&str, &str)> = (c.tenant_admins.iter())
            .map(|(t, k)| (t.as_str(), k.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("acme", "aaaaaaaaaaaaaaaa1"),
                ("globex", "bbbbbbbbbbbbbbbb2"),
                ("initech", "cccccccccccccccc3"),
                ("umbrella", "dddddddddddddddd4"),
            ]
        );
        let e = parse(&["--tenant-admins", "acme:aaaaaaaaaaaaaaaa1\nglobex"])
            .expect_err("refused")
            .to_string();
        assert!(e.contains("entry 2 is not tenant:token"), "{e}");
    }

    /// `check-config` refuses what `serve` would: a master key that is not base64 or decodes
    /// too short, an audit log key that does not parse; each by its setting's name, unquoted.
    #[test]
    fn the_master_key_and_the_audit_log_key_are_checked() {
        for bad in ["sekrit: not base64!", "c2Vrcml0"] {
            let e = parse(&["--master-key", bad])
                .expect_err("refused")
                .to_string();
            assert!(e.starts_with("INTENTGATE_MASTER_KEY:"), "{e}");
            assert!(!e.contains("sekrit") && !e.contains("c2Vrcml0"), "{e}");
        }
        let c =
            parse(&["--master-key", "c2l4dGVlbi1ieXRlcy1vZi1rZXktbWF0ZXJpYWw=\n"]).expect("valid");
        // Kept as given: seals made before trimming are opened with the text as given.
        assert_eq!(
            c.master_key.as_deref(),
            Some("c2l4dGVlbi1ieXRlcy1vZi1rZXktbWF0ZXJpYWw=\n")
        );

        const SEED: &str = "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";
        assert!(parse(&[]).expect("defaults").audit_log_key.is_none());
        assert!(
            (parse(&["--audit-log-key", " "]).expect("blank is unset"))
                .audit_log_key
                .is_none()
        );
        let c = parse(&["--audit-log-key", SEED]).expect("a base64 seed");
        let key = c.audit_log_key.as_ref().expect("parsed");
        let same = crate::audit::LogKey::parse(SEED).expect("parse");
        assert_eq!(key.verifier().to_string(), same.verifier().to_string());
        assert!(!format!("{c:?}").contains(SEED), "{c:?}");
        for bad in ["PRIVATE+KEY+sekrit", "c2Vrcml0", "sekrit!"] {
            let e = parse(&["--audit-log-key", bad])
                .expect_err("refused")
                .to_string();
            assert!(e.starts_with("INTENTGATE_AUDIT_LOG_KEY:"), "{e}");
            assert!(!e.contains("sekrit") && !e.contains("c2Vrcml0"), "{e}");
        }
    }

    #[test]
    fn tenant_admins_parse_and_debug_redacts() {
        let c = parse(&[
            "--tenant-admins",
            "acme:aaaaaaaaaaaaaaaa1, globex:bbbbbbbbbbbbbbbb2",
            "--admin-token",
            "supersecretsupersecret",
        ])
        .expect("valid");
        assert_eq!(c.tenant_admins.len(), 2);
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("aaaaaaaa") && !dbg.contains("supersecret"),
            "{dbg}"
        );
        // One token, one principal: shared with another tenant or with the superadmin, it is
        // refused at start, never echoed.
        for (admins, superadmin) in [
            (
                "acme:aaaaaaaaaaaaaaaa1, globex:aaaaaaaaaaaaaaaa1",
                "supersecretsupersecret",
            ),
            ("acme:supersecretsupersecret", "supersecretsupersecret"),
        ] {
            let e = parse(&["--tenant-admins", admins, "--admin-token", superadmin])
                .expect_err("a shared token");
            let text = e.to_string();
            assert!(text.contains("INTENTGATE_TENANT_ADMINS"), "{text}");
            assert!(
                !text.contains("aaaaaaaa") && !text.contains("supersecret"),
                "{text}"
            );
        }
    }
}
