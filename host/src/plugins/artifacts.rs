//! The plugin components built by `host/build.rs` for `wasm32-wasip2`: the built-in ones are
//! embedded (the default bundle); test-only ones are exposed by path for the test suite and are
//! never embedded.

include!(concat!(env!("OUT_DIR"), "/plugin_artifacts.rs"));
