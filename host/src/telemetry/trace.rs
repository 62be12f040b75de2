//! The trace of one call: W3C trace context in (`traceparent`, `tracestate` of the agent's
//! request), the sampling decision, a span per stage recorded at the points the metrics
//! already time ([`crate::metrics::stages`]), the `traceparent` sent to the upstream, and the
//! finished trace handed to the exporter.
//!
//! A request's [`CallTrace`] is reachable through a task-local ([`scope`]) so the stage points
//! need no new parameter; a task spawned for the call carries it with [`propagate`]. The trace
//! ends when its last holder drops it, and is exported only when sampled and when a call was
//! decided in it (a `tools/list` or `initialize` is not traced). Unsampled, a call pays a
//! header parse, a few random numbers and a task-local read per stage
//! (`intentgate-bench micro tracing`). This module must never put an argument value, a token
//! or a header other than the two W3C ones in a span, and never block or wait: a full export
//! queue drops the trace and counts it.

use std::cell::Cell;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::export::Exporter;
use super::otlp::SpanKind;
use crate::metrics::Stage;

/// How a call's trace is sampled (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// The share of traces kept, decided from the trace id (the same on every replica).
    Ratio(f64),
    /// The agent's sampled flag when it sent a `traceparent`, else the root sampler.
    ParentBased(Root),
}

/// The sampler of a `parentbased_*` sampler for traces the gateway starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Root {
    AlwaysOn,
    AlwaysOff,
    Ratio(f64),
}

impl Sampler {
    /// Reads `OTEL_TRACES_SAMPLER` and its argument (a ratio in `[0, 1]`, default 1).
    pub fn parse(name: &str, arg: Option<&str>) -> Result<Sampler, String> {
        let ratio = || -> Result<f64, String> {
            match arg.map(str::trim) {
                None | Some("") => Ok(1.0),
                Some(a) => match a.parse::<f64>() {
                    Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
                    _ => Err(format!("{a:?}: expected a ratio between 0 and 1")),
                },
            }
        };
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::Ratio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Root::AlwaysOn),
            "parentbased_always_off" => Sampler::ParentBased(Root::AlwaysOff),
            "parentbased_traceidratio" => Sampler::ParentBased(Root::Ratio(ratio()?)),
            other => {
                return Err(format!(
                    "{other:?}: expected always_on, always_off, traceidratio, \
                     parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
                ));
            }
        })
    }

    /// Whether a trace is recorded, given its id and the agent's sampled flag (if it sent one).
    pub fn sample(self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::Ratio(r) => ratio_keeps(r, trace_id),
            Sampler::ParentBased(root) => match (parent_sampled, root) {
                (Some(sampled), _) => sampled,
                (None, Root::AlwaysOn) => true,
                (None, Root::AlwaysOff) => false,
                (None, Root::Ratio(r)) => ratio_keeps(r, trace_id),
            },
        }
    }
}

/// `TraceIdRatioBased`: the trace id's last 8 bytes (random in W3C ids) against the ratio.
fn ratio_keeps(ratio: f64, trace_id: &[u8; 16]) -> bool {
    let mut low = [0u8; 8];
    low.copy_from_slice(&trace_id[8..]);
    let r = u64::from_be_bytes(low) >> 1;
    (r as f64) < ratio * (1u64 << 63) as f64
}

/// A parsed `traceparent`: trace id, parent span id, sampled flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

fn hex_into(s: &[u8], out: &mut [u8]) -> Option<()> {
    if s.len() != out.len() * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None, // W3C: lowercase only
        };
        *o = nib(s[2 * i])? << 4 | nib(s[2 * i + 1])?;
    }
    Some(())
}

/// Parses a W3C `traceparent` (version 00, or a later version read as 00); `None` when it is
/// not valid, and the call starts a trace of its own.
pub fn parse_traceparent(value: &str) -> Option<Parent> {
    let b = value.trim().as_bytes();
    if b.len() < 55 || b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let mut version = [0u8; 1];
    hex_into(&b[..2], &mut version)?;
    if version[0] == 0xff || (version[0] == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    let mut p = Parent {
        trace_id: [0; 16],
        span_id: [0; 8],
        sampled: false,
    };
    hex_into(&b[3..35], &mut p.trace_id)?;
    hex_into(&b[36..52], &mut p.span_id)?;
    let mut flags = [0u8; 1];
    hex_into(&b[53..55], &mut flags)?;
    if p.trace_id == [0; 16] || p.span_id == [0; 8] {
        return None;
    }
    p.sampled = flags[0] & 1 == 1;
    Some(p)
}

/// A `tracestate` worth carrying on: printable ASCII, at most 512 characters (W3C's limit).
fn valid_tracestate(value: &str) -> bool {
    !value.is_empty() && value.len() <= 512 && value.bytes().all(|c| (0x20..0x7f).contains(&c))
}

thread_local! {
    /// xorshift64* state, seeded from the OS once per thread.
    static RNG: Cell<u64> = const { Cell::new(0) };
}

fn random_u64() -> u64 {
    RNG.with(|state| {
        let mut x = state.get();
        if x == 0 {
            x = getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15) | 1;
        }
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        state.set(x);
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    })
}

/// A new span id (never zero).
pub fn new_span_id() -> [u8; 8] {
    (random_u64() | 1).to_be_bytes()
}

fn new_trace_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&random_u64().to_be_bytes());
    id[8..].copy_from_slice(&(random_u64() | 1).to_be_bytes());
    id
}

/// Lowercase hex of an id, formatted where it is shown (a log line, a header).
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A span attribute's value.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrValue {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, as exported.
#[derive(Debug, Clone)]
pub struct SpanData {
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    /// The parent is the agent's span (only the call's span can have one).
    pub remote_parent: bool,
    pub name: std::borrow::Cow<'static, str>,
    pub kind: SpanKind,
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, AttrValue)>,
    /// A span that failed: its status is `ERROR` with this message.
    pub error: Option<String>,
}

/// A trace handed to the exporter: the call's span and its stage spans.
#[derive(Debug)]
pub struct FinishedTrace {
    pub trace_id: [u8; 16],
    pub trace_state: Option<String>,
    pub spans: Vec<SpanData>,
}

/// What a call's span says about its decision (the last decided call of the request).
#[derive(Debug, Default)]
struct Decided {
    method: &'static str,
    tenant: String,
    tool: String,
    decision: &'static str,
    check: &'static str,
    event_id: Option<i64>,
    upstream: String,
}

#[derive(Debug, Default)]
struct Recording {
    stages: Vec<SpanData>,
    decided: Option<Decided>,
    /// The span id named in the `traceparent` sent to the upstream, until the upstream stage
    /// that forwarded is recorded under it.
    upstream_span: Option<[u8; 8]>,
    upstream_error: Option<String>,
}

/// One request's trace. Cheap when unsampled: ids and flags only, nothing recorded.
pub struct CallTrace {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    parent: Option<[u8; 8]>,
    sampled: bool,
    trace_state: Option<String>,
    /// Wall clock and monotonic clock read together, to place the stages' `Instant`s.
    anchor: Instant,
    anchor_ns: u64,
    /// Only for a sampled trace: where it goes when it ends.
    sink: Option<Arc<Exporter>>,
    recording: Mutex<Recording>,
}

impl fmt::Debug for CallTrace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CallTrace")
            .field("trace_id", &Hex(&self.trace_id).to_string())
            .field("sampled", &self.sampled)
            .finish()
    }
}

/// Decides how requests are traced and where sampled traces go.
#[derive(Debug)]
pub struct Tracer {
    sampler: Sampler,
    exporter: Option<Arc<Exporter>>,
}

impl Tracer {
    /// A tracer that records nothing (ids for logs and the upstream's `traceparent` still flow).
    pub fn off() -> Self {
        Self {
            sampler: Sampler::AlwaysOff,
            exporter: None,
        }
    }

    pub fn new(sampler: Sampler, exporter: Option<Arc<Exporter>>) -> Self {
        let sampler = if exporter.is_some() {
            sampler
        } else {
            Sampler::AlwaysOff
        };
        Self { sampler, exporter }
    }

    pub fn exporter(&self) -> Option<&Arc<Exporter>> {
        self.exporter.as_ref()
    }

    /// Starts the trace of a request from its `traceparent` and `tracestate` headers.
    pub fn start(&self, traceparent: Option<&str>, tracestate: Option<&str>) -> CallTrace {
        let parent = traceparent.and_then(parse_traceparent);
        let trace_id = parent.map_or_else(new_trace_id, |p| p.trace_id);
        let sampled = self.sampler.sample(&trace_id, parent.map(|p| p.sampled));
        CallTrace {
            trace_id,
            span_id: new_span_id(),
            parent: parent.map(|p| p.span_id),
            sampled,
            trace_state: tracestate
                .filter(|s| parent.is_some() && valid_tracestate(s))
                .map(str::to_owned),
            anchor: Instant::now(),
            anchor_ns: unix_ns(),
            sink: if sampled { self.exporter.clone() } else { None },
            recording: Mutex::default(),
        }
    }
}

fn unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl CallTrace {
    pub fn trace_id(&self) -> &[u8; 16] {
        &self.trace_id
    }

    pub fn span_id(&self) -> &[u8; 8] {
        &self.span_id
    }

    pub fn sampled(&self) -> bool {
        self.sampled
    }

    fn at(&self, t: Instant) -> u64 {
        match t.checked_duration_since(self.anchor) {
            Some(d) => self.anchor_ns.saturating_add(d.as_nanos() as u64),
            None => self
                .anchor_ns
                .saturating_sub(self.anchor.duration_since(t).as_nanos() as u64),
        }
    }

    fn record(&self, f: impl FnOnce(&mut Recording)) {
        if let Ok(mut r) = self.recording.lock() {
            f(&mut r);
        }
    }

    fn stage(&self, stage: Stage, started: Instant) {
        let end_ns = unix_ns().max(self.at(started));
        self.record(|r| {
            let (span_id, kind, error) = match stage {
                Stage::Upstream => (
                    r.upstream_span.take().unwrap_or_else(new_span_id),
                    SpanKind::Client,
                    r.upstream_error.take(),
                ),
                _ => (new_span_id(), SpanKind::Internal, None),
            };
            r.stages.push(SpanData {
                span_id,
                parent: Some(self.span_id),
                remote_parent: false,
                name: std::borrow::Cow::Borrowed(stage_span_name(stage)),
                kind,
                start_ns: self.at(started),
                end_ns,
                attributes: vec![("intentgate.stage", AttrValue::Str(stage.as_str().into()))],
                error,
            });
        });
    }

    /// The `traceparent` for a request to the upstream: this trace, the upstream stage's span
    /// (sampled) or a fresh span id (unsampled, nothing recorded), and this trace's flags.
    fn upstream_traceparent(&self) -> String {
        let span = if self.sampled {
            let mut id = None;
            self.record(|r| id = Some(*r.upstream_span.get_or_insert_with(new_span_id)));
            id.unwrap_or_else(new_span_id)
        } else {
            new_span_id()
        };
        format!(
            "00-{}-{}-{}",
            Hex(&self.trace_id),
            Hex(&span),
            if self.sampled { "01" } else { "00" }
        )
    }

    fn finish(&mut self) -> Option<FinishedTrace> {
        let sink_ready = self.sampled && self.sink.is_some();
        if !sink_ready {
            return None;
        }
        let end_ns = unix_ns();
        let recording = std::mem::take(self.recording.get_mut().ok()?);
        let d = recording.decided?;
        let mut attributes = vec![
            ("intentgate.tenant", AttrValue::Str(d.tenant)),
            ("intentgate.tool", AttrValue::Str(d.tool)),
            ("intentgate.decision", AttrValue::Str(d.decision.into())),
        ];
        if !d.check.is_empty() {
            attributes.push(("intentgate.check", AttrValue::Str(d.check.into())));
        }
        if let Some(id) = d.event_id {
            attributes.push(("intentgate.event_id", AttrValue::Int(id)));
        }
        if !d.upstream.is_empty() {
            attributes.push(("intentgate.upstream", AttrValue::Str(d.upstream)));
        }
        attributes.push(("rpc.system", AttrValue::Str("jsonrpc".into())));
        attributes.push(("rpc.method", AttrValue::Str(d.method.into())));
        let mut spans = Vec::with_capacity(recording.stages.len() + 1);
        spans.push(SpanData {
            span_id: self.span_id,
            parent: self.parent,
            remote_parent: self.parent.is_some(),
            name: std::borrow::Cow::Borrowed(d.method),
            kind: SpanKind::Server,
            start_ns: self.anchor_ns,
            end_ns,
            attributes,
            error: None,
        });
        spans.extend(recording.stages);
        Some(FinishedTrace {
            trace_id: self.trace_id,
            trace_state: self.trace_state.take(),
            spans,
        })
    }
}

impl Drop for CallTrace {
    fn drop(&mut self) {
        if let Some(finished) = self.finish()
            && let Some(sink) = &self.sink
        {
            sink.submit(finished);
        }
    }
}

fn stage_span_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Token => "token verification",
        Stage::Capability => "capability",
        Stage::Intent => "intent",
        Stage::Policy => "policy",
        Stage::Budget => "budget",
        Stage::Audit => "audit commit",
        Stage::Upstream => "upstream",
    }
}

fn method_of(kind: crate::pipeline::CallKind) -> &'static str {
    use crate::pipeline::CallKind;
    match kind {
        CallKind::Tool => "tools/call",
        CallKind::Resource => "resources/read",
        CallKind::Prompt => "prompts/get",
        CallKind::Completion(_) => "completion/complete",
        CallKind::Sampling => "sampling/createMessage",
        CallKind::Elicitation => "elicitation/create",
        CallKind::Roots => "roots/list",
    }
}

tokio::task_local! {
    static CALL: Arc<CallTrace>;
}

/// Runs `fut` (a request's handling) with `trace` as its call trace, inside a log span that
/// carries the trace id (and, once decided, the event id) on every log line.
///
/// Not an `async fn`: the request's future (about 5 KiB) is boxed here, at once, before
/// anything wraps it, so it is copied once (into the box) and the future this returns, and the
/// HTTP server's future for the request around it, hold a pointer to it rather than a copy of
/// it, which hyper would move on every request. (Each copy of it showed in profiles.)
pub fn scope<F: std::future::Future>(
    trace: CallTrace,
    fut: F,
) -> impl std::future::Future<Output = F::Output> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "call",
        trace_id = %Hex(&trace.trace_id),
        event_id = tracing::field::Empty
    );
    CALL.scope(Arc::new(trace), Box::pin(fut).instrument(span))
}

/// `fut` with the current request's call trace and log span, for a task spawned for the call.
///
/// `fut` is boxed first, as in [`scope`]: a call's future (about 7 KiB) is then copied once,
/// not again by each wrapper and each move of the future returned.
pub fn propagate<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = F::Output> {
    use tracing::Instrument;
    let call = CALL.try_with(Arc::clone).ok();
    let fut = Box::pin(fut).instrument(tracing::Span::current());
    async move {
        match call {
            Some(c) => CALL.scope(c, fut).await,
            None => fut.await,
        }
    }
}

/// Records a stage that ran from `started` until now in the current call's trace, if sampled
/// (called by [`crate::metrics::stages::Stages`] at its timing points).
#[inline]
pub fn stage(stage: Stage, started: Instant) {
    let _ = CALL.try_with(|c| {
        if c.sampled {
            c.stage(stage, started);
        }
    });
}

/// Marks the current call's upstream stage as failed (its span's status).
pub fn upstream_failed(error: &dyn fmt::Display) {
    let _ = CALL.try_with(|c| {
        if c.sampled {
            c.record(|r| r.upstream_error = Some(error.to_string()));
        }
    });
}

/// Notes the pipeline's decision on `call` in the current trace and the event id on the log
/// span. A request the upstream sends the agent during the call is not the call: ignored.
pub fn decided(
    call: &crate::pipeline::ToolCall<'_>,
    result: &Result<crate::pipeline::Permit, crate::pipeline::Denial>,
) {
    use crate::pipeline::Denial;
    if call.kind.is_server_request() {
        return;
    }
    if let Ok(p) = result {
        tracing::Span::current().record("event_id", p.event_id);
    }
    let _ = CALL.try_with(|c| {
        if !c.sampled {
            return;
        }
        let (decision, check, event_id) = match result {
            Ok(p) => ("allow", "", Some(p.event_id)),
            Err(d @ (Denial::Escalated(_) | Denial::ApprovalPending(_))) => {
                ("escalate", d.check(), None)
            }
            Err(d) => ("block", d.check(), None),
        };
        c.record(|r| {
            r.decided = Some(Decided {
                method: method_of(call.kind),
                tenant: call.grant.tenant.clone(),
                // The name as the client sent it, which may be refused for its length: a span
                // keeps at most what a name may be, so queued traces stay small.
                tool: crate::capability::cut(&call.name(), crate::capability::MAX_NAME_BYTES),
                decision,
                check,
                event_id,
                upstream: call.upstream.unwrap_or_default().to_owned(),
            });
        });
    });
}

/// The `traceparent` header to send to the upstream on a request of the current call
/// (computed here, never copied from the agent), with the agent's `tracestate`.
pub fn upstream_headers() -> Option<(String, Option<String>)> {
    CALL.try_with(|c| (c.upstream_traceparent(), c.trace_state.clone()))
        .ok()
}

/// The current call's trace id (hex), if a request is being handled.
pub fn current_trace_id() -> Option<String> {
    CALL.try_with(|c| Hex(&c.trace_id).to_string()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_parsed_as_w3c_says() {
        let p = parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .expect("valid");
        assert_eq!(
            Hex(&p.trace_id).to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(Hex(&p.span_id).to_string(), "00f067aa0ba902b7");
        assert!(p.sampled);
        assert!(
            parse_traceparent("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-extra")
                .is_some_and(|p| !p.sampled)
        );
        for bad in [
            "",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad}");
        }
    }

    #[test]
    fn samplers_follow_the_parent_and_the_ratio() {
        let id = new_trace_id();
        let pb = Sampler::parse("parentbased_always_on", None).expect("sampler");
        assert!(pb.sample(&id, None) && !pb.sample(&id, Some(false)) && pb.sample(&id, Some(true)));
        let off = Sampler::parse("parentbased_always_off", None).expect("sampler");
        assert!(!off.sample(&id, None) && off.sample(&id, Some(true)));
        assert!(!Sampler::AlwaysOff.sample(&id, Some(true)));
        assert!(Sampler::AlwaysOn.sample(&id, Some(false)));
        let half = Sampler::parse("traceidratio", Some("0.5")).expect("sampler");
        let kept = (0..10_000)
            .filter(|_| half.sample(&new_trace_id(), None))
            .count();
        assert!((4_500..5_500).contains(&kept), "{kept}");
        assert!(!Sampler::Ratio(0.0).sample(&id, Some(true)));
        assert!(Sampler::Ratio(1.0).sample(&id, None));
        assert!(Sampler::parse("traceidratio", Some("2")).is_err());
        assert!(Sampler::parse("sometimes", None).is_err());
    }

    #[test]
    fn an_unsampled_trace_still_continues_the_agents_trace_id_upstream() {
        let t = Tracer::off();
        let c = t.start(
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("vendor=x"),
        );
        assert!(!c.sampled());
        let tp = c.upstream_traceparent();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            tp.ends_with("-00") && !tp.contains("00f067aa0ba902b7"),
            "{tp}"
        );
    }
}
