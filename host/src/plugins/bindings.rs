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

/// The SIEM formatter world.
pub mod siem {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "siem-formatter",
    });
}
