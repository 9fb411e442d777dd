//! The one `bindgen!` of the host: Rust types and traits for `wit/handler.wit`.
//!
//! Imports are synchronous and trappable: the host functions only touch the store's own
//! state (outputs are buffered, not sent), so they never wait; an `Err` from one of them is a
//! host fault and traps the guest, while an ordinary failure the guest should see is the
//! inner `Err` of the WIT `result`. The export is async so that a call can yield to the
//! executor at every epoch tick and be interrupted at its deadline.

wasmtime::component::bindgen!({
    path: "../wit",
    world: "handler",
    imports: { default: trappable },
    exports: { default: async },
});

pub use sluice::handler::types::{Level, RetryHint};
