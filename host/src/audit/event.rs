//! The audit event: what one decision (or admin action) records, its versioned JSON schema, and
//! the redaction of tool-call argument values before they are stored.
//!
//! The JSON field names follow the original gateway's audit schema (`ts`, `event`, `decision`,
//! `check`, `agent_id`, `capability_token_id`, …) so SIEM mappings and consoles keep working; empty
//! fields are omitted, as there. The hashed form of an event is its RFC 8785 canonical JSON with
//! the chain position `seq` included, so an event cannot be moved within or between chains.
//!
//! This module must never store an argument value that the configured [`ArgValuesMode`] excludes.

use std::fmt;
use std::str::FromStr;

use serde_json::{Map, Value};

use super::{AuditError, jcs, time};

/// Version of the event JSON schema. The original gateway's schema 6 plus `seq` (chain position)
/// and `bundle_digest`; every field of schema 6 keeps its name and meaning.
pub const SCHEMA_VERSION: &str = "7";

/// Event kinds the gateway emits (the `event` field). Admin actions use `admin/<action>`.
pub mod kinds {
    /// A `tools/call` (MCP) or `POST /v1/tool-call` decision.
    pub const TOOL_CALL: &str = "intentgate.tool_call";
    /// A non-tool MCP method (`tools/list`, `initialize`, …) that was authenticated.
    pub const MCP_METHOD: &str = "intentgate.mcp_method";
    /// An approval decided by a person (approved: `allow`, rejected: `block`; `check:
    /// "approval"`, `pending_id`, `decided_by`). The escalation is the call's own event, the
    /// consumption the resumed call's.
    pub const APPROVAL_DECIDED: &str = "intentgate.approval.decided";
    /// An approval that expired undecided or unused, or whose held call timed out.
    pub const APPROVAL_EXPIRED: &str = "intentgate.approval.expired";
    /// Prefix of admin actions, e.g. `admin/mint`, `admin/revoke`, `admin/clear_policy`.
    pub const ADMIN_PREFIX: &str = "admin/";
}

/// The outcome of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Block,
    Escalate,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Block => "block",
            Decision::Escalate => "escalate",
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Decision {
    type Err = AuditError;
    fn from_str(s: &str) -> Result<Self, AuditError> {
        match s {
            "allow" => Ok(Decision::Allow),
            "block" | "deny" => Ok(Decision::Block),
            "escalate" => Ok(Decision::Escalate),
            other => Err(AuditError::InvalidQuery(format!(
                "decision must be allow, block or escalate, not {other:?}"
            ))),
        }
    }
}

/// What is kept of tool-call argument values (`INTENTGATE_AUDIT_PERSIST_ARG_VALUES`).
/// Argument *keys* are always recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ArgValuesMode {
    /// No values (default): only `arg_keys`.
    #[default]
    Off,
    /// Top-level scalar values (strings cut to [`SCALAR_STRING_LIMIT`] bytes, numbers, booleans,
    /// null); nested objects and arrays are replaced by the strings `"[object]"` / `"[array]"`.
    Scalars,
    /// The arguments exactly as the agent sent them.
    Raw,
}

/// Longest string value kept in [`ArgValuesMode::Scalars`], in bytes.
pub const SCALAR_STRING_LIMIT: usize = 256;

impl FromStr for ArgValuesMode {
    type Err = AuditError;
    fn from_str(s: &str) -> Result<Self, AuditError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "off" | "false" | "none" => Ok(ArgValuesMode::Off),
            "scalars" => Ok(ArgValuesMode::Scalars),
            "raw" => Ok(ArgValuesMode::Raw),
            other => Err(AuditError::Config(format!(
                "INTENTGATE_AUDIT_PERSIST_ARG_VALUES must be off, scalars or raw, not {other:?}"
            ))),
        }
    }
}

impl ArgValuesMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ArgValuesMode::Off => "off",
            ArgValuesMode::Scalars => "scalars",
            ArgValuesMode::Raw => "raw",
        }
    }

    /// Turns tool-call arguments into what gets stored: the sorted top-level keys, and the values
    /// this mode keeps (`None` when it keeps none). Arguments that are not a JSON object have no
    /// keys; in `raw` mode they are stored as given, in `scalars` mode only if they are a scalar.
    pub fn apply(self, args: &Value) -> (Vec<String>, Option<Value>) {
        let mut keys: Vec<String> = match args {
            Value::Object(map) => map.keys().cloned().collect(),
            _ => Vec::new(),
        };
        keys.sort();
        let values = match self {
            ArgValuesMode::Off => None,
            ArgValuesMode::Raw => (!args.is_null()).then(|| args.clone()),
            ArgValuesMode::Scalars => match args {
                Value::Object(map) => Some(Value::Object(
                    map.iter().map(|(k, v)| (k.clone(), scalar_of(v))).collect(),
                )),
                Value::Null | Value::Array(_) => None,
                scalar => Some(scalar_of(scalar)),
            },
        };
        (keys, values)
    }
}

fn scalar_of(v: &Value) -> Value {
    match v {
        Value::Object(_) => Value::String("[object]".into()),
        Value::Array(_) => Value::String("[array]".into()),
        Value::String(s) if s.len() > SCALAR_STRING_LIMIT => {
            let mut cut = SCALAR_STRING_LIMIT;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            Value::String(format!("{}…", &s[..cut]))
        }
        other => other.clone(),
    }
}

/// One audit event, before it is placed in a chain. Build it with [`AuditEvent::new`] and set the
/// fields that apply; empty strings, `None` and `false` are left out of the stored JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// Wall-clock time of the decision, unix milliseconds (`ts`).
    pub ts_ms: i64,
    /// Event kind (`event`), see [`kinds`].
    pub kind: String,
    /// Tenant whose chain records the event.
    pub tenant: String,
    pub decision: Option<Decision>,
    /// The check that decided (`capability`, `intent`, `policy`, `budget`, `upstream`, …).
    pub check: String,
    pub reason: String,
    /// Agent identity: the token subject (`agent_id`).
    pub agent_id: String,
    pub session_id: String,
    pub tool: String,
    pub arg_keys: Vec<String>,
    pub arg_values: Option<Value>,
    /// Token id (`capability_token_id`) and its root (`root_capability_token_id`).
    pub jti: String,
    pub root_jti: String,
    pub caveat_count: Option<u32>,
    pub intent_summary: String,
    pub requires_step_up: bool,
    /// Who decided: an approver's identity, or the admin principal for admin events.
    pub decided_by: String,
    /// Pending approval id (`pending_id`).
    pub pending_id: String,
    /// From `X-IntentGate-Elevation-Id` on admin calls: metadata, not authority.
    pub elevation_id: String,
    /// Digest of the pipeline bundle that decided.
    pub bundle_digest: String,
    pub latency_ms: Option<u64>,
    /// Upstream HTTP status when the call was forwarded.
    pub upstream_status: Option<u16>,
    /// The name of the upstream the call was routed to (`upstream`; omitted when empty, so
    /// events written before it existed hash as they did).
    pub upstream: String,
    /// Caller address (`remote_ip`).
    pub remote_ip: String,
    /// A later round of a multi-round tool call (MCP 2026-07-28): the id of the audit event of
    /// the call's first round (`call_id`) and this round's number (`round`, 2 for the first
    /// retry). The first round's event carries neither.
    pub call_id: Option<i64>,
    pub round: Option<u32>,
    /// How many calls an aggregated event stands for (`count`): the throttled denials of one
    /// token or tenant in one window.
    pub count: Option<u64>,
}

impl AuditEvent {
    /// An event of `kind` for `tenant`, stamped now; every other field empty.
    pub fn new(kind: impl Into<String>, tenant: impl Into<String>) -> Self {
        AuditEvent {
            ts_ms: time::now_ms(),
            kind: kind.into(),
            tenant: tenant.into(),
            decision: None,
            check: String::new(),
            reason: String::new(),
            agent_id: String::new(),
            session_id: String::new(),
            tool: String::new(),
            arg_keys: Vec::new(),
            arg_values: None,
            jti: String::new(),
            root_jti: String::new(),
            caveat_count: None,
            intent_summary: String::new(),
            requires_step_up: false,
            decided_by: String::new(),
            pending_id: String::new(),
            elevation_id: String::new(),
            bundle_digest: String::new(),
            latency_ms: None,
            upstream_status: None,
            upstream: String::new(),
            remote_ip: String::new(),
            call_id: None,
            round: None,
            count: None,
        }
    }

    /// Cuts the request-supplied names stored in indexed columns of their own to a little
    /// over [`crate::capability::MAX_NAME_BYTES`] (marked `…`): PostgreSQL refuses an index entry
    /// over about 2.7 KB, and one refused call's 100 KB tool name must not fail the batch of
    /// every call committed with it. Longer names are refused by the capability check anyway.
    pub fn fit_indexed_columns(&mut self) {
        // A qualified name (`completion:resource:` and a URI the token allows) is a little
        // longer than the longest name a token may hold: an allowed call is never cut.
        let max = crate::capability::MAX_NAME_BYTES + 64;
        for v in [&mut self.tool, &mut self.agent_id] {
            if v.len() > max {
                *v = crate::capability::cut(v, max);
            }
        }
    }

    /// The first field stored in a column of its own (beside the hashed body) that holds a
    /// NUL, which PostgreSQL's text cannot store.
    pub fn column_with_nul(&self) -> Option<&'static str> {
        [
            ("tenant", &self.tenant),
            ("event", &self.kind),
            ("check", &self.check),
            ("agent_id", &self.agent_id),
            ("tool", &self.tool),
            ("capability_token_id", &self.jti),
            ("root_capability_token_id", &self.root_jti),
            ("elevation_id", &self.elevation_id),
        ]
        .into_iter()
        .find(|(_, v)| v.contains('\0'))
        .map(|(name, _)| name)
    }

    /// Records the tool-call arguments as `mode` allows.
    pub fn with_arguments(mut self, mode: ArgValuesMode, args: &Value) -> Self {
        let (keys, values) = mode.apply(args);
        self.arg_keys = keys;
        self.arg_values = values;
        self
    }

    /// The event as JSON, with its chain position; the object that is canonicalized and hashed.
    pub fn to_json(&self, seq: u64) -> Value {
        let mut m = Map::new();
        let put_str = |m: &mut Map<String, Value>, k: &str, v: &str| {
            if !v.is_empty() {
                m.insert(k.into(), Value::String(v.into()));
            }
        };
        m.insert("schema_version".into(), SCHEMA_VERSION.into());
        m.insert("seq".into(), seq.into());
        m.insert("ts".into(), time::format_rfc3339_ms(self.ts_ms).into());
        m.insert("event".into(), self.kind.clone().into());
        m.insert("tenant".into(), self.tenant.clone().into());
        if let Some(d) = self.decision {
            m.insert("decision".into(), d.as_str().into());
        }
        put_str(&mut m, "check", &self.check);
        put_str(&mut m, "reason", &self.reason);
        put_str(&mut m, "agent_id", &self.agent_id);
        put_str(&mut m, "session_id", &self.session_id);
        put_str(&mut m, "tool", &self.tool);
        if !self.arg_keys.is_empty() {
            m.insert("arg_keys".into(), self.arg_keys.clone().into());
        }
        if let Some(v) = &self.arg_values {
            m.insert("arg_values".into(), v.clone());
        }
        put_str(&mut m, "capability_token_id", &self.jti);
        put_str(&mut m, "root_capability_token_id", &self.root_jti);
        if let Some(n) = self.caveat_count {
            m.insert("caveat_count".into(), n.into());
        }
        put_str(&mut m, "intent_summary", &self.intent_summary);
        if self.requires_step_up {
            m.insert("requires_step_up".into(), true.into());
        }
        put_str(&mut m, "decided_by", &self.decided_by);
        put_str(&mut m, "pending_id", &self.pending_id);
        put_str(&mut m, "elevation_id", &self.elevation_id);
        put_str(&mut m, "bundle_digest", &self.bundle_digest);
        if let Some(n) = self.latency_ms {
            m.insert("latency_ms".into(), n.into());
        }
        if let Some(n) = self.upstream_status {
            m.insert("upstream_status".into(), n.into());
        }
        put_str(&mut m, "upstream", &self.upstream);
        put_str(&mut m, "remote_ip", &self.remote_ip);
        if let Some(id) = self.call_id {
            m.insert("call_id".into(), id.into());
        }
        if let Some(n) = self.round {
            m.insert("round".into(), n.into());
        }
        if let Some(n) = self.count {
            m.insert("count".into(), n.into());
        }
        Value::Object(m)
    }

    /// The canonical (RFC 8785) bytes hashed into the chain at position `seq`: the canonical
    /// form of [`AuditEvent::to_json`], written directly (no tree, no sort).
    pub fn canonical(&self, seq: u64) -> String {
        let (mut text, tail) = self.canonical_split();
        jcs::write_u64(seq, &mut text);
        text.push_str(&tail);
        text
    }

    /// The canonical form with the chain position left open, so a caller can do the expensive
    /// part (the arguments) before the event reaches the serial writer.
    pub fn canonical_open(&self) -> Option<CanonicalOpen> {
        let (head, tail) = self.canonical_split();
        Some(CanonicalOpen { head, tail })
    }

    /// The canonical text around the chain position: up to `"seq":`, and after its value.
    ///
    /// Every member name is ASCII, so RFC 8785's order (UTF-16 code units) is byte order, and
    /// the members are written in that order here; `canonical_matches_the_tree_form` checks
    /// this against [`jcs::canonicalize`] of [`AuditEvent::to_json`], which stays the
    /// reference. An empty string, `None` or `false` leaves its member out, as there.
    fn canonical_split(&self) -> (String, String) {
        let mut head = Members::new(256);
        let m = &mut head;
        m.str("agent_id", &self.agent_id);
        if !self.arg_keys.is_empty() {
            m.key("arg_keys");
            m.out.push('[');
            for (i, k) in self.arg_keys.iter().enumerate() {
                if i > 0 {
                    m.out.push(',');
                }
                jcs::write_string(k, &mut m.out);
            }
            m.out.push(']');
        }
        if let Some(v) = &self.arg_values {
            m.key("arg_values");
            jcs::write_value(v, &mut m.out);
        }
        m.str("bundle_digest", &self.bundle_digest);
        m.int("call_id", self.call_id);
        m.str("capability_token_id", &self.jti);
        m.int("caveat_count", self.caveat_count.map(i64::from));
        m.str("check", &self.check);
        m.uint("count", self.count);
        m.str("decided_by", &self.decided_by);
        m.str("decision", self.decision.map_or("", Decision::as_str));
        m.str("elevation_id", &self.elevation_id);
        m.str("event", &self.kind);
        m.str("intent_summary", &self.intent_summary);
        m.uint("latency_ms", self.latency_ms);
        m.str("pending_id", &self.pending_id);
        m.str("reason", &self.reason);
        m.str("remote_ip", &self.remote_ip);
        if self.requires_step_up {
            m.key("requires_step_up");
            m.out.push_str("true");
        }
        m.str("root_capability_token_id", &self.root_jti);
        m.int("round", self.round.map(i64::from));
        // Written even when empty, as `to_json` does.
        m.key("schema_version");
        jcs::write_string(SCHEMA_VERSION, &mut m.out);
        m.key("seq");
        let mut tail = Members {
            out: String::with_capacity(128),
            first: false,
        };
        let m = &mut tail;
        m.str("session_id", &self.session_id);
        m.key("tenant");
        jcs::write_string(&self.tenant, &mut m.out);
        m.str("tool", &self.tool);
        m.key("ts");
        jcs::write_string(&time::format_rfc3339_ms(self.ts_ms), &mut m.out);
        m.str("upstream", &self.upstream);
        m.uint("upstream_status", self.upstream_status.map(u64::from));
        tail.out.push('}');
        (head.out, tail.out)
    }
}

/// An object's members written in order (the names are ASCII and need no escaping).
struct Members {
    out: String,
    first: bool,
}

impl Members {
    fn new(capacity: usize) -> Self {
        let mut out = String::with_capacity(capacity);
        out.push('{');
        Members { out, first: true }
    }

    fn key(&mut self, name: &str) {
        if !self.first {
            self.out.push(',');
        }
        self.first = false;
        self.out.push('"');
        self.out.push_str(name);
        self.out.push_str("\":");
    }

    /// A string member, left out when empty.
    fn str(&mut self, name: &str, value: &str) {
        if !value.is_empty() {
            self.key(name);
            jcs::write_string(value, &mut self.out);
        }
    }

    fn uint(&mut self, name: &str, value: Option<u64>) {
        if let Some(n) = value {
            self.key(name);
            jcs::write_u64(n, &mut self.out);
        }
    }

    fn int(&mut self, name: &str, value: Option<i64>) {
        if let Some(n) = value {
            self.key(name);
            jcs::write_i64(n, &mut self.out);
        }
    }
}

/// An event's canonical text without its chain position ([`AuditEvent::canonical_open`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalOpen {
    head: String,
    tail: String,
}

impl CanonicalOpen {
    /// The canonical text at position `seq`: equal to [`AuditEvent::canonical`]`(seq)`.
    pub fn at(&self, seq: u64) -> String {
        let mut out = String::with_capacity(self.head.len() + self.tail.len() + 20);
        out.push_str(&self.head);
        out.push_str(&seq.to_string());
        out.push_str(&self.tail);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn arg_values_modes() {
        let long = "x".repeat(300);
        let args = json!({"b": {"deep": 1}, "a": "s", "c": [1], "d": 2.5, "e": long});
        let (keys, v) = ArgValuesMode::Off.apply(&args);
        assert_eq!(keys, ["a", "b", "c", "d", "e"]);
        assert_eq!(v, None);
        let (_, v) = ArgValuesMode::Scalars.apply(&args);
        let v = v.expect("scalars kept");
        assert_eq!(v["a"], "s");
        assert_eq!(v["b"], "[object]");
        assert_eq!(v["c"], "[array]");
        assert_eq!(v["d"], 2.5);
        assert_eq!(v["e"].as_str().map(|s| s.len()), Some(256 + "…".len()));
        let (_, v) = ArgValuesMode::Raw.apply(&args);
        assert_eq!(v, Some(args.clone()));
        assert_eq!(
            "SCALARS".parse::<ArgValuesMode>().ok(),
            Some(ArgValuesMode::Scalars)
        );
        assert!("some".parse::<ArgValuesMode>().is_err());
    }

    #[test]
    fn the_open_canonical_form_closes_to_the_same_text_whatever_the_arguments() {
        for args in [
            json!({}),
            json!({"seq": 0, "nested": {"seq": 0}}),
            json!({"text": "\"seq\":0,"}),
        ] {
            let mut e =
                AuditEvent::new(kinds::TOOL_CALL, "acme").with_arguments(ArgValuesMode::Raw, &args);
            e.decision = Some(Decision::Allow);
            e.tool = "seq".into();
            e.session_id = "s-1".into();
            let open = e.canonical_open().expect("open form");
            for seq in [1, 9, 10, 123_456_789_012] {
                assert_eq!(open.at(seq), e.canonical(seq), "{args}");
            }
        }
    }

    /// The direct writer against the reference (the tree form through `jcs::canonicalize`):
    /// every member empty and set, escapes, characters beyond U+FFFF, numbers beyond 2^53.
    #[test]
    fn canonical_matches_the_tree_form() {
        let bare = AuditEvent::new(kinds::TOOL_CALL, "t");
        let mut full = AuditEvent::new(kinds::MCP_METHOD, "acmé \"😀\"\n");
        full.ts_ms = 1_778_580_873_871;
        full.decision = Some(Decision::Block);
        full.check = "policy".into();
        full.reason = "denied: \u{1}\t\\".into();
        full.agent_id = "agent/1".into();
        full.session_id = "s".into();
        full.tool = "read_file".into();
        full = full.with_arguments(
            ArgValuesMode::Raw,
            &json!({"b": [1, -2, 2.5, 1e300, 9_007_199_254_740_993u64], "a": null, "\u{e000}": true, "😀": {"z": "", "y": "x"}}),
        );
        full.jti = "jti-1".into();
        full.root_jti = "root-1".into();
        full.caveat_count = Some(u32::MAX);
        full.intent_summary = "sum".into();
        full.requires_step_up = true;
        full.decided_by = "alice".into();
        full.pending_id = "p".into();
        full.elevation_id = "e".into();
        full.bundle_digest = "sha256:00".into();
        full.latency_ms = Some(u64::MAX);
        full.upstream_status = Some(502);
        full.upstream = "github".into();
        full.remote_ip = "::1".into();
        full.call_id = Some(i64::MIN);
        full.round = Some(3);
        full.count = Some(9_007_199_254_740_993);
        let mut keys_only = bare
            .clone()
            .with_arguments(ArgValuesMode::Off, &json!({"k": 1, "j": 2}));
        keys_only.decision = Some(Decision::Escalate);
        keys_only.call_id = Some(-1);
        for e in [&bare, &full, &keys_only] {
            for seq in [0, 1, 42, 1 << 53, (1 << 53) + 1, u64::MAX] {
                let reference = jcs::canonicalize(&e.to_json(seq));
                assert_eq!(e.canonical(seq), reference);
                assert_eq!(
                    jcs::canonicalize_text(&reference, &[]).expect("text"),
                    reference
                );
            }
            let open = e.canonical_open().expect("open form");
            assert_eq!(open.at(7), e.canonical(7));
        }
    }

    #[test]
    fn canonical_omits_empty_fields_and_sorts() {
        let mut e = AuditEvent::new(kinds::TOOL_CALL, "acme");
        e.ts_ms = 1_778_580_873_871;
        e.decision = Some(Decision::Allow);
        e.tool = "read_file".into();
        e.caveat_count = Some(2);
        assert_eq!(
            e.canonical(5),
            r#"{"caveat_count":2,"decision":"allow","event":"intentgate.tool_call","schema_version":"7","seq":5,"tenant":"acme","tool":"read_file","ts":"2026-05-12T10:14:33.871Z"}"#
        );
    }
}
