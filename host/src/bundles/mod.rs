//! Bundles: immutable, content-addressed sets of check components and their configuration, and
//! the per-tenant hot swap between them.
//!
//! A [`BundleSpec`] names, per stage, the checks to run (component digest + configuration text);
//! its digest covers all of it. A [`Snapshot`] is a spec made live for one tenant: compiled,
//! pre-linked components with their instance pools. The [`Registry`] keeps, per tenant, the
//! active snapshot behind an `ArcSwap` (requests load it once and keep it), the previous one
//! (rollback target), and the drafts. A promotion builds and validates the new snapshot before
//! swapping; after `promote` returns, no new request sees the old bundle.
//!
//! It must never let a request see a half-built bundle, and never decide allow on a plugin error.
//!
//! # Layout
//!
//! | module | what |
//! |---|---|
//! | `spec` | [`BundleSpec`], its digest, the default (embedded) bundle |
//! | `snapshot` | [`Snapshot`]: a bundle live for one tenant; the stage calls of the pipeline |
//! | `registry` | [`Registry`]: components, drafts, promote/rollback/install, dry-run |
//! | [`admin`] | the `/v1/admin/{plugins,bundles,policies}` handlers |
//! | [`persist`] | the store tables, and [`persist::Follower`] (replicas follow promotions) |
//! | [`sample`] | recorded calls for a dry-run, read back from the audit chain |
//! | [`watch`] | `serve --watch DIR` development mode |

pub mod admin;
pub mod persist;
mod registry;
pub mod sample;
mod snapshot;
mod spec;
pub mod watch;

pub use registry::{
    BundleError, BundleStatus, ComponentInfo, DRY_RUN_FAILURES_IN_A_ROW, DRY_RUN_TIME, DraftInfo,
    DryRunReport, DryRunRow, MAX_COMPONENTS_PER_TENANT, MAX_UPLOADED_COMPONENTS, RecordedCall,
    Registry, SwapOutcome,
};
pub use snapshot::Snapshot;
pub use spec::{BundleSpec, CheckSpec, builtin_components, default_policy_config};
