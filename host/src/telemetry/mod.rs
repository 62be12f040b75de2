//! OpenTelemetry traces of the decided calls, exported over OTLP/HTTP with protobuf.
//!
//! | file | concept |
//! |---|---|
//! | [`trace`] | one call's trace: W3C context in, sampling, stage spans, `traceparent` out |
//! | [`export`] | the bounded queue and the background batch export |
//! | [`otlp`] | the hand-written protobuf encoding of `ExportTraceServiceRequest` |
//!
//! Configured by the standard `OTEL_*` variables ([`crate::config::TracingConfig`]); off
//! unless an OTLP endpoint is set. Metrics and logs are [`crate::metrics`] and
//! [`crate::logging`]. This module must never slow or block a call: a span is recorded only
//! for a sampled call, exported from another task, and dropped (counted) when the queue is full.

pub mod export;
pub mod otlp;
pub mod trace;

pub use export::{ExportSettings, Exporter};
pub use trace::{CallTrace, Sampler, Tracer};
