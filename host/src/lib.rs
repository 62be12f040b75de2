//! IntentGate: a self-hosted authorization gateway for AI agents.
//!
//! Every tool call an agent makes through `POST /v1/mcp` is decided here: capability token
//! (native), then the intent, policy and budget checks, then a durable audit event, and only
//! then forwarded to the upstream tool server.
//!
//! # Layout
//!
//! | module | concept |
//! |---|---|
//! | [`config`] | typed configuration from `INTENTGATE_*` variables and flags, validated before start |
//! | [`secrets`] | the master key and superadmin token: generated on first start, kept 0600 |
//! | [`capability`] | token format, mint, verify, attenuation rules, revocation set |
//! | [`cli`] | the operator CLI (`intentgate tokens/policy/bundle/plugin/audit`): a client of the admin API |
//! | [`mcp`] | the MCP protocol codec: JSON-RPC framing, eras, headers, translation, sessions, rounds |
//! | [`proxy`] | the MCP endpoint: a request's phases from read to shape, around the pipeline |
//! | [`pipeline`] | the ordered checks and the decision (`Permit`) |
//! | [`upstream`] | forwarding to the upstream MCP server (pooled, bounded) |
//! | [`upstreams`] | several upstreams behind one endpoint: routing by name, namespacing, merged lists |
//! | [`admin`] | the admin HTTP API |
//! | [`store`] | SQLite and PostgreSQL behind one trait |
//! | [`audit`] | audit events, canonical form, chain, checkpoints, verify, export |
//! | [`outbox`] | durable delivery of audit events to webhooks, notification channels and SIEMs |
//! | [`plugins`] | the WebAssembly check runtime |
//! | [`bundles`] | bundles of checks: digests, drafts, promote/rollback, per-tenant hot swap |
//! | [`metrics`] | Prometheus `/metrics`: counters and histograms on atomics, bounded labels |
//! | [`logging`] | log output: text or JSON lines (`INTENTGATE_LOG_FORMAT`) |
//! | [`telemetry`] | OpenTelemetry traces of decided calls over OTLP/HTTP (`OTEL_*`), W3C `traceparent` |
//! | [`gateway`] | start-up: the shared parts and each endpoint's service, built once |
//! | [`server`] | the hyper accept loop, routing to the services, request limits |
//! | [`http`] | small HTTP helpers shared by the endpoints (bounded body read, JSON replies) |
//! | [`tls`] | rustls: the https upstream's client configuration, the listener's reloaded certificate |
//! | [`demo`] | a built-in harmless MCP tool server for `--demo` |
//! | [`testkit`] | test support: a throwaway PostgreSQL server started from local binaries |

// The request futures nest deeply (proxy phases → relayed and held calls → the pipeline);
// the compiler's layout query needs more than its default depth for them in release builds.
#![recursion_limit = "256"]

pub mod admin;
pub mod approvals;
pub mod audit;
pub mod bundles;
pub mod capability;
pub mod cli;
pub mod config;
pub mod demo;
pub mod gateway;
pub mod http;
pub mod logging;
pub mod mcp;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod plugins;
pub mod proxy;
pub mod secrets;
pub mod server;
pub mod stall;
pub mod store;
pub mod streams;
pub mod telemetry;
#[doc(hidden)]
pub mod testkit;
pub mod tls;
pub mod upstream;
pub mod upstreams;

pub use gateway::Gateway;
pub use server::{run, serve};
