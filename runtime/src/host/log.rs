//! `sluice:handler/log`: guest log lines become host `tracing` events tagged with the handler.

use super::HostState;
use crate::bindings::sluice::handler::log::Host;
use crate::bindings::sluice::handler::types::Level;

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) -> wasmtime::Result<()> {
        let taken = self.log_budget.take(message.len());
        if taken == 0 {
            return Ok(());
        }
        let mut end = taken;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let message = &message[..end];
        let handler = &*self.spec.name;
        match level {
            Level::Trace => tracing::trace!(target: "sluice::guest", handler, "{message}"),
            Level::Debug => tracing::debug!(target: "sluice::guest", handler, "{message}"),
            Level::Info => tracing::info!(target: "sluice::guest", handler, "{message}"),
            Level::Warn => tracing::warn!(target: "sluice::guest", handler, "{message}"),
            Level::Error => tracing::error!(target: "sluice::guest", handler, "{message}"),
        }
        Ok(())
    }
}

impl crate::bindings::sluice::handler::types::Host for HostState {}
