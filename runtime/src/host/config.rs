//! `sluice:handler/config`: the manifest's `[config]` table, read-only.

use super::HostState;
use crate::bindings::sluice::handler::config::Host;

impl Host for HostState {
    fn get(&mut self, key: String) -> wasmtime::Result<Option<String>> {
        Ok(self.spec.manifest.config.get(&key).cloned())
    }
}
