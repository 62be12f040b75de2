//! The one integration-test binary of the `intentgate` crate (one link of the large deps).
//! Each concept has its own module; `support` holds shared helpers.

mod admin;
mod approvals;
mod audit;
mod bundle_sync;
mod bundles;
mod capability;
mod charges;
mod cli;
mod conformance;
mod decisions;
mod gateway;
mod interop;
mod mcp_eras;
mod mcp_kinds;
mod metrics;
mod outbox;
mod plugins;
mod powercut;
mod relay;
mod relay_matrix;
mod results;
mod store;
mod streams;
mod support;
mod traces;
mod transport;
mod upstreams;
