//! The noop plugin of the Extism peer: takes the message's payload and returns nothing. Like
//! Sluice's `plugins/noop`, whose handler receives the message in its own memory and returns
//! `Ok`, it measures what the framework costs per call, with no handler work on top: the PDK
//! copies the input into the plugin's memory (`Vec<u8>`), and `()` sets an empty output.

use extism_pdk::{plugin_fn, FnResult};

#[plugin_fn]
pub fn noop(_payload: Vec<u8>) -> FnResult<()> {
    Ok(())
}
