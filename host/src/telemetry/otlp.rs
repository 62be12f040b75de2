//! The OTLP/HTTP protobuf encoding of finished traces: an `ExportTraceServiceRequest`
//! (`opentelemetry/proto/collector/trace/v1`) written by hand with a minimal protobuf writer
//! (varints, length-delimited fields, fixed64), so the gateway needs no protobuf or
//! OpenTelemetry crate for the few messages it sends.
//!
//! Only the fields the gateway fills are written; field numbers are those of the official
//! `.proto` files (the tests decode the output with the official Python bindings). This
//! module must never be called on the request path: encoding happens in the exporter task.

use super::trace::{AttrValue, FinishedTrace, SpanData};

/// Field numbers of the messages written, from `opentelemetry-proto`.
mod field {
    // ExportTraceServiceRequest
    pub const RESOURCE_SPANS: u32 = 1;
    // ResourceSpans
    pub const RESOURCE: u32 = 1;
    pub const SCOPE_SPANS: u32 = 2;
    // Resource
    pub const RESOURCE_ATTRIBUTES: u32 = 1;
    // ScopeSpans
    pub const SCOPE: u32 = 1;
    pub const SPANS: u32 = 2;
    // InstrumentationScope
    pub const SCOPE_NAME: u32 = 1;
    pub const SCOPE_VERSION: u32 = 2;
    // Span
    pub const TRACE_ID: u32 = 1;
    pub const SPAN_ID: u32 = 2;
    pub const TRACE_STATE: u32 = 3;
    pub const PARENT_SPAN_ID: u32 = 4;
    pub const NAME: u32 = 5;
    pub const KIND: u32 = 6;
    pub const START: u32 = 7;
    pub const END: u32 = 8;
    pub const ATTRIBUTES: u32 = 9;
    pub const STATUS: u32 = 15;
    pub const FLAGS: u32 = 16;
    // Status
    pub const STATUS_MESSAGE: u32 = 2;
    pub const STATUS_CODE: u32 = 3;
    // KeyValue
    pub const KEY: u32 = 1;
    pub const VALUE: u32 = 2;
    // AnyValue
    pub const STRING_VALUE: u32 = 1;
    pub const BOOL_VALUE: u32 = 2;
    pub const INT_VALUE: u32 = 3;
}

/// `Span.SpanKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

/// `Status.StatusCode` (only `ERROR` is written; unset is the default).
pub const STATUS_ERROR: u64 = 2;

const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// A protobuf message being written.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.buf.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.buf.push(v as u8);
    }

    fn tag(&mut self, field: u32, wire: u32) {
        self.varint(u64::from(field << 3 | wire));
    }

    pub fn uint(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, VARINT);
            self.varint(v);
        }
    }

    pub fn int64(&mut self, field: u32, v: i64) {
        self.uint(field, v as u64);
    }

    pub fn fixed64(&mut self, field: u32, v: u64) {
        if v != 0 {
            self.tag(field, FIXED64);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn fixed32(&mut self, field: u32, v: u32) {
        if v != 0 {
            self.tag(field, FIXED32);
            self.buf.extend_from_slice(&v.to_le_bytes());
        }
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) {
        self.tag(field, LEN);
        self.varint(v.len() as u64);
        self.buf.extend_from_slice(v);
    }

    pub fn string(&mut self, field: u32, v: &str) {
        if !v.is_empty() {
            self.bytes(field, v.as_bytes());
        }
    }

    /// A nested message, written by `f` then length-prefixed.
    pub fn message(&mut self, field: u32, f: impl FnOnce(&mut Writer)) {
        let mut inner = Writer::default();
        f(&mut inner);
        self.bytes(field, &inner.buf);
    }
}

fn key_value(w: &mut Writer, key: &str, value: &AttrValue) {
    w.message(field::ATTRIBUTES, |kv| {
        kv.string(field::KEY, key);
        kv.message(field::VALUE, |any| match value {
            AttrValue::Str(s) => any.bytes(field::STRING_VALUE, s.as_bytes()),
            AttrValue::Int(i) => {
                any.tag(field::INT_VALUE, VARINT);
                any.varint(*i as u64);
            }
            AttrValue::Bool(b) => {
                any.tag(field::BOOL_VALUE, VARINT);
                any.varint(u64::from(*b));
            }
        });
    });
}

fn span(w: &mut Writer, trace: &FinishedTrace, s: &SpanData) {
    w.message(field::SPANS, |m| {
        m.bytes(field::TRACE_ID, &trace.trace_id);
        m.bytes(field::SPAN_ID, &s.span_id);
        if let Some(state) = &trace.trace_state {
            m.string(field::TRACE_STATE, state);
        }
        if let Some(parent) = &s.parent {
            m.bytes(field::PARENT_SPAN_ID, parent);
        }
        m.string(field::NAME, &s.name);
        m.uint(field::KIND, s.kind as u64);
        m.fixed64(field::START, s.start_ns);
        m.fixed64(field::END, s.end_ns.max(s.start_ns));
        for (k, v) in &s.attributes {
            key_value(m, k, v);
        }
        if let Some(message) = &s.error {
            m.message(field::STATUS, |st| {
                st.string(field::STATUS_MESSAGE, message);
                st.uint(field::STATUS_CODE, STATUS_ERROR);
            });
        }
        // W3C trace flags in the low byte (sampled), and bit 8: the parent's remoteness is known;
        // bit 9: the parent is remote (only the root span's parent is, when the agent sent one).
        let remote = if s.remote_parent { 0x300 } else { 0x100 };
        m.fixed32(field::FLAGS, 0x01 | remote);
    });
}

/// One `ExportTraceServiceRequest` carrying `traces`, as sent to `POST /v1/traces`.
pub fn encode_request(service_name: &str, traces: &[FinishedTrace]) -> Vec<u8> {
    let mut w = Writer::default();
    w.message(field::RESOURCE_SPANS, |rs| {
        rs.message(field::RESOURCE, |r| {
            for (k, v) in [
                ("service.name", service_name),
                ("service.version", env!("CARGO_PKG_VERSION")),
                ("telemetry.sdk.name", "intentgate"),
                ("telemetry.sdk.language", "rust"),
            ] {
                // `Resource.attributes` is field 1, as `Span.attributes` is 9: write it directly.
                r.message(field::RESOURCE_ATTRIBUTES, |kv| {
                    kv.string(field::KEY, k);
                    kv.message(field::VALUE, |any| any.string(field::STRING_VALUE, v));
                });
            }
        });
        rs.message(field::SCOPE_SPANS, |ss| {
            ss.message(field::SCOPE, |scope| {
                scope.string(field::SCOPE_NAME, "intentgate");
                scope.string(field::SCOPE_VERSION, env!("CARGO_PKG_VERSION"));
            });
            for t in traces {
                for s in &t.spans {
                    span(ss, t, s);
                }
            }
        });
    });
    w.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_and_fixed_fields_follow_the_protobuf_encoding() {
        let mut w = Writer::default();
        w.uint(1, 150);
        assert_eq!(w.into_bytes(), [0x08, 0x96, 0x01]);
        let mut w = Writer::default();
        w.fixed64(7, 1);
        assert_eq!(w.into_bytes(), [0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut w = Writer::default();
        w.message(2, |m| m.string(1, "hi"));
        assert_eq!(w.into_bytes(), [0x12, 4, 0x0a, 2, b'h', b'i']);
        let mut w = Writer::default();
        w.int64(3, -1);
        assert_eq!(
            w.into_bytes().len(),
            11,
            "a negative int64 is ten varint bytes"
        );
    }
}
