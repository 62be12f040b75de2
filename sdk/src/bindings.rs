//! Generated bindings for the `intentgate:plugin@0.2.0` worlds (wit-bindgen).
//!
//! Plugin authors do not use this module directly: `intentgate_plugin_sdk::export_check!` wires a
//! [`crate::Check`] implementation to it. It must never contain hand-written logic.
#![allow(unsafe_code, missing_docs, clippy::all)]

/// The check world (intent, policy, budget and custom checks).
pub mod check {
    wit_bindgen::generate!({
        path: "../wit",
        world: "check-plugin",
        default_bindings_module: "intentgate_plugin_sdk::bindings::check",
        pub_export_macro: true,
        export_macro_name: "__export_check_world",
    });
}

/// The formatter world (`intentgate:plugin/formatter`: webhooks, notification channels, SIEMs).
#[cfg(feature = "siem")]
pub mod siem {
    wit_bindgen::generate!({
        path: "../wit",
        world: "formatter",
        default_bindings_module: "intentgate_plugin_sdk::bindings::siem",
        pub_export_macro: true,
        export_macro_name: "__export_siem_world",
    });
}
