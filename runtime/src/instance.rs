//! Warm instances: a handler's instances kept between messages when its manifest asks for it
//! (`[limits] instances = "warm"`). Each serves one call at a time; the idle ones wait here,
//! per handler version, so a reload retires them with the version.
//!
//! An instance is put back only after a call that ended normally (a success, or the
//! handler's own `reject` or `retry`) and before it has served `recycle_after` messages; any
//! other ending (a trap, a timeout, a memory or output limit, a host error) drops it, since
//! its state can no longer be trusted. Imports only the host state and the bindings.

use std::sync::Mutex;

use wasmtime::Store;

use crate::bindings;
use crate::host::HostState;

/// One instance and its store, between calls.
pub struct WarmInstance {
    pub(crate) store: Store<HostState>,
    /// `None` until the first call instantiates it (inside that call's time limit).
    pub(crate) instance: Option<bindings::Handler>,
    /// Messages served so far.
    pub(crate) served: u32,
}

impl std::fmt::Debug for WarmInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WarmInstance").field("served", &self.served).finish_non_exhaustive()
    }
}

impl WarmInstance {
    pub(crate) fn new(store: Store<HostState>) -> Self {
        WarmInstance { store, instance: None, served: 0 }
    }
}

/// The idle warm instances of one handler version.
#[derive(Default)]
pub struct WarmPool {
    idle: Mutex<Vec<WarmInstance>>,
}

impl std::fmt::Debug for WarmPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle.lock().map_or(0, |i| i.len());
        f.debug_struct("WarmPool").field("idle", &idle).finish()
    }
}

impl WarmPool {
    /// An idle instance, if there is one.
    pub(crate) fn take(&self) -> Option<WarmInstance> {
        self.idle.lock().ok()?.pop()
    }

    /// Puts an instance back for the next message.
    pub(crate) fn put(&self, instance: WarmInstance) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(instance);
        }
    }
}
