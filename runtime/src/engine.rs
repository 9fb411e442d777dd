//! The one wasmtime [`Engine`](wasmtime::Engine) of a runtime: its configuration (pooling
//! allocator, epoch interruption), the linker every handler is instantiated through, the
//! epoch ticker, and compiling a manifest's component into a ready-to-instantiate
//! [`HandlerPre`](crate::bindings::HandlerPre).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;

use wasmtime::component::{Component, Linker};
use wasmtime::{Config, InstanceAllocationStrategy, PoolingAllocationConfig};

use crate::bindings::HandlerPre;
use crate::host::{self, HostState};
use crate::manifest::{ByteSize, Manifest, ManifestError};

/// How often the epoch advances. A running guest yields to the executor once per tick, and
/// timeouts are enforced with this granularity.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Runtime-wide bounds, fixed when the engine is created.
#[derive(Debug, Clone, Copy)]
pub struct EngineOptions {
    /// The largest `limits.memory` a manifest may ask for (the pooling allocator reserves
    /// address space for this much per memory).
    pub max_memory: u64,
    /// Instances alive at once across all handlers (the pool's size).
    pub max_instances: u32,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_memory: 1 << 30, max_instances: 1000 }
    }
}

/// The shared engine, linker and epoch ticker.
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    options: EngineOptions,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(options: EngineOptions) -> anyhow::Result<Arc<Self>> {
        let max_memory = usize::try_from(options.max_memory)?;
        let n = options.max_instances;
        let mut pool = PoolingAllocationConfig::default();
        // A Rust component is a handful of core instances and tables around one memory.
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n.saturating_mul(2))
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(max_memory);

        let mut config = Config::new();
        config.epoch_interruption(true).allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config)
            .map_err(anyhow::Error::from)
            .map_err(|e| e.context("cannot create the wasmtime engine"))?;

        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        let ticker = EpochTicker::start(engine.clone()).context("cannot start the epoch ticker thread")?;
        Ok(Arc::new(Engine { engine, linker, options, _ticker: ticker }))
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// Compiles the manifest's component and checks it against the world: it must export
    /// `handle` with the right type and import nothing the host does not provide. Errors point
    /// at the manifest's `component = ...` line and say what is wrong.
    pub fn load(&self, manifest: &Manifest, bytes: &[u8]) -> Result<HandlerPre<HostState>, ManifestError> {
        let at_component = |message: String| manifest.error_at(manifest.spans.component.clone(), message);
        if manifest.limits.memory > self.options.max_memory {
            let span = manifest.spans.memory.clone().unwrap_or(manifest.spans.component.clone());
            return Err(manifest.error_at(
                span,
                format!(
                    "memory limit {} is above this runtime's maximum of {} (see `sluice run --max-memory`)",
                    ByteSize(manifest.limits.memory),
                    ByteSize(self.options.max_memory)
                ),
            ));
        }
        check_is_component(bytes).map_err(at_component)?;
        let component = Component::from_binary(&self.engine, bytes)
            .map_err(|e| at_component(format!("cannot compile component: {}", chain(&e))))?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| at_component(format!("component imports something Sluice does not provide: {}", chain(&e))))?;
        HandlerPre::new(pre).map_err(|e| {
            at_component(format!("component does not implement world sluice:handler/handler@0.1.0: {}", chain(&e)))
        })
    }
}

/// A clear error for files that are not components at all.
fn check_is_component(bytes: &[u8]) -> Result<(), String> {
    const MAGIC: &[u8] = b"\0asm";
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        return Err("not a WebAssembly file (no \\0asm header)".to_owned());
    }
    // Bytes 6..8 are the layer: 0 for a core module, 1 for a component.
    if bytes[6..8] == [0, 0] {
        return Err("this is a core WebAssembly module, not a component; build the handler with \
             `cargo build --target wasm32-wasip2` (or wrap it with `wasm-tools component new`)"
            .to_owned());
    }
    Ok(())
}

/// `error: cause: cause` on one line.
pub(crate) fn chain(e: &wasmtime::Error) -> String {
    e.chain().map(ToString::to_string).collect::<Vec<_>>().join(": ")
}

/// Advances the engine's epoch every [`EPOCH_TICK`] on a plain thread (not a tokio task, so
/// a busy executor cannot delay timeouts), until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("sluice-epoch".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(EPOCH_TICK);
                engine.increment_epoch();
            }
        })?;
        Ok(EpochTicker { stop, thread: Some(thread) })
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
