//! Host-side bindings (wasmtime `bindgen!`) for the `intentgate:plugin@0.2.0` worlds.
//!
//! Generated code only: the host behaviour behind the imports lives in [`super::host_state`].

/// The check world: intent, policy, budget and custom checks.
pub mod check {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "check-plugin",
    });
}

/// The formatter world (`intentgate:plugin/formatter`, exporting the `format` interface).
pub mod siem {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "formatter",
    });
}

/// The formatter world under its earlier name (`siem-formatter`, exporting the `formatter`
/// interface), so components built then keep loading. Its imports and types are the current
/// world's (the same WIT, so the same host implementations serve both).
pub mod siem_legacy {
    wasmtime::component::bindgen!({
        path: "../wit/legacy/siem-formatter-0.2.0",
        world: "siem-formatter",
        with: {
            "intentgate:plugin/types": super::siem::intentgate::plugin::types,
            "intentgate:plugin/log": super::siem::intentgate::plugin::log,
            "intentgate:plugin/clock": super::siem::intentgate::plugin::clock,
        },
    });
}
