//! The one integration-test binary of the `intentgate` crate (one link of the large deps).
//! Each concept has its own module; `support` holds shared helpers.

mod support;
mod gateway;
mod capability;
mod bundles;
mod plugins;
mod store;
mod audit;
mod interop;
mod mcp_eras;
