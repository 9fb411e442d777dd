//! The one `bindgen!` of the host: Rust types and traits for `wit/handler.wit`.
//!
//! Imports are trappable: an `Err` from a host function is a host fault and traps the guest,
//! while an ordinary failure the guest should see is the inner `Err` of the WIT `result`.
//! `outbox`, `log` and `config` only touch the call's own state (outputs are buffered, not
//! sent), so they are synchronous; `dedup` and `kv` reach the handler's store, so they are
//! async. The export is async so that a call can yield to the
//! executor at every epoch tick and be interrupted at its deadline.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    imports: {
        "sluice:handler/dedup": async | trappable,
        "sluice:handler/kv": async | trappable,
        default: trappable,
    },
    exports: { default: async },
});
