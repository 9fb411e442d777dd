//! The one wasmtime [`Engine`](wasmtime::Engine) of a runtime: its configuration (pooling
//! allocator, epoch interruption), the linker every handler is instantiated through, the
//! epoch ticker, and compiling a manifest's component into a ready-to-instantiate
//! [`HandlerPre`](crate::bindings::HandlerPre).

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
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
/// timeouts are enforced with this granularity. 1 ms rather than 10: with 8 calls spinning on
/// 2 cores and guest calls on the I/O threads, a neighbour's throughput went from 0.8% to 2% of its calm rate
/// (runtime/tests/hostile.rs), for a ticker thread waking 1000 times a second.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// Runtime-wide bounds, fixed when the engine is created.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The largest `limits.memory` a manifest may ask for (the pooling allocator reserves
    /// address space for this much per memory).
    pub max_memory: u64,
    /// Instances alive at once across all handlers (the pool's size).
    pub max_instances: u32,
    /// Where compiled components are kept, by digest, so that a restart or a reload of an
    /// unchanged component skips compilation. `None`: always compile.
    pub cache_dir: Option<PathBuf>,
    /// Threads that run guest calls, apart from the threads doing NATS I/O. `None`: one per
    /// core. `Some(0)`: guest calls run on the I/O threads, which is faster per message but
    /// lets a handler computing until its timeout delay every other handler.
    pub guest_threads: Option<usize>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions { max_memory: 1 << 30, max_instances: 1000, cache_dir: None, guest_threads: None }
    }
}

/// The shared engine, linker and epoch ticker.
pub struct Engine {
    engine: wasmtime::Engine,
    linker: Linker<HostState>,
    options: EngineOptions,
    /// Where guest calls run: their own threads, so that a guest computing until its
    /// timeout competes with other guests only, not with the NATS connection and the
    /// serving loops. Measured (runtime/tests/hostile.rs): a neighbour handler keeps 45% of
    /// its calm rate during a storm of spinning calls, against 2% with guests on the I/O
    /// threads; the hop costs about a third of the core noop throughput (bench/HISTORY.md).
    guests: Option<tokio::runtime::Runtime>,
    /// The runtime's metrics, for what host calls count themselves (outbound HTTP).
    metrics: std::sync::OnceLock<Arc<crate::metrics::Metrics>>,
    _ticker: EpochTicker,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("options", &self.options).finish_non_exhaustive()
    }
}

impl Engine {
    pub fn new(options: EngineOptions) -> anyhow::Result<Arc<Self>> {
        if let Some(dir) = &options.cache_dir {
            create_private_dir(dir).with_context(|| format!("cannot create the compile cache {}", dir.display()))?;
        }
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
        // Resetting a slot for the next message is most of what a fresh instance costs.
        // Rather than `madvise` away (and fault back in) every page a call touched, keep up
        // to 1 MiB of each memory and 64 KiB of each table resident and restore only the
        // dirty pages, which the kernel's PAGEMAP_SCAN finds (Linux 6.7 and later; older
        // kernels fall back to `madvise`). Measured on the noop handler: 30 µs per call
        // before, 12 µs after (runtime/examples/dispatch_loop.rs). The cost is resident
        // memory: at most 1 MiB per warm slot, only for pages guests actually touched.
        pool.linear_memory_keep_resident(1 << 20).table_keep_resident(64 << 10).pagemap_scan(wasmtime::Enabled::Auto);

        let mut config = Config::new();
        config.epoch_interruption(true).allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = wasmtime::Engine::new(&config)
            .map_err(anyhow::Error::from)
            .map_err(|e| e.context("cannot create the wasmtime engine"))?;

        let mut linker = Linker::new(&engine);
        host::add_to_linker(&mut linker).map_err(anyhow::Error::from)?;
        let ticker = EpochTicker::start(engine.clone()).context("cannot start the epoch ticker thread")?;
        let threads =
            options.guest_threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from));
        let guests = match threads {
            0 => None,
            n => Some(
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(n)
                    .thread_name("sluice-guest")
                    .enable_all()
                    .build()
                    .context("cannot start the guest threads")?,
            ),
        };
        Ok(Arc::new(Engine { engine, linker, options, guests, metrics: Default::default(), _ticker: ticker }))
    }

    /// Gives host calls the runtime's metrics (once; later calls are ignored).
    pub fn attach_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// The runtime's metrics, if attached.
    pub fn metrics(&self) -> Option<Arc<crate::metrics::Metrics>> {
        self.metrics.get().cloned()
    }

    pub fn wasmtime(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// The runtime guest calls are spawned on; `None`: they run where they are called.
    pub fn guests(&self) -> Option<&tokio::runtime::Handle> {
        self.guests.as_ref().map(tokio::runtime::Runtime::handle)
    }

    /// Compiles the manifest's component and checks it against the world: it must export
    /// `handle` with the right type and import nothing the host does not provide. Errors point
    /// at the manifest's `component = ...` line and say what is wrong.
    pub fn load(
        &self,
        manifest: &Manifest,
        bytes: &[u8],
        digest: &str,
    ) -> Result<HandlerPre<HostState>, ManifestError> {
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
        let component = self
            .compile(bytes, digest, &manifest.name)
            .map_err(|e| at_component(format!("cannot compile component: {}", chain(&e))))?;
        if manifest.http.is_none()
            && let Some(name) = self.first_import(&component, |name| name.starts_with("wasi:http/"))
        {
            return Err(at_component(ungranted_http_message(&name)));
        }
        let pre = self.linker.instantiate_pre(&component).map_err(|e| {
            at_component(match self.unprovided_import(&component) {
                Some(name) => unprovided_message(&name),
                None => format!("component imports something Sluice does not provide: {}", chain(&e)),
            })
        })?;
        HandlerPre::new(pre).map_err(|e| {
            at_component(format!("component does not implement world sluice:handler/handler@0.1.0: {}", chain(&e)))
        })
    }
}

/// The interface packages Sluice's linker provides (see `host::add_to_linker`): the handler
/// world and WASI 0.2's `p2` set, every dangerous operation refused. A component's import
/// from any other package cannot be linked; the README lists these too.
const PROVIDED_PACKAGES: &[&str] = &[
    "sluice:handler/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:cli/",
    "wasi:filesystem/",
    "wasi:random/",
    "wasi:sockets/",
    "wasi:http/",
];

/// What to say about a component importing `wasi:http` when its manifest grants no HTTP
/// destination: linked for every handler, it would refuse every request, so the component is
/// refused at load instead, with the grant to add (or the build flag that drops the import).
fn ungranted_http_message(name: &str) -> String {
    format!(
        "component imports `{name}`, but the manifest grants no HTTP destination: add \
         `http = [\"https://host\"]` to [capabilities] for the hosts it calls. A JavaScript component built \
         by componentize-js or `jco componentize` imports it unless built with `-d http fetch-event`"
    )
}

/// What to say about a component importing `name`, which Sluice does not provide: the import
/// itself, and how the usual toolchain that adds it is told not to.
fn unprovided_message(name: &str) -> String {
    let hint = "; a handler may import only sluice:handler and the WASI 0.2 interfaces listed in the README \
         (io, clocks, cli, filesystem, random, sockets, http)";
    format!("component imports `{name}`, which Sluice does not provide{hint}")
}

impl Engine {
    /// The first import of `component` from a package Sluice does not provide, if any. Asked
    /// of the component's type rather than read out of the linker's error, so the message
    /// can name the import and say what to do about it.
    fn unprovided_import(&self, component: &Component) -> Option<String> {
        self.first_import(component, |name| !PROVIDED_PACKAGES.iter().any(|p| name.starts_with(p)))
    }

    /// The first import of `component` whose name satisfies `pick`.
    fn first_import(&self, component: &Component, pick: impl Fn(&str) -> bool) -> Option<String> {
        component.component_type().imports(&self.engine).map(|(name, _)| name.to_owned()).find(|name| pick(name))
    }

    /// Compiles `bytes`, the component of handler `name`, or loads the result of an earlier
    /// compilation from the cache.
    fn compile(&self, bytes: &[u8], digest: &str, name: &str) -> wasmtime::Result<Component> {
        let Some(dir) = &self.options.cache_dir else {
            let compiling = Compiling::start(name, bytes);
            let component = Component::from_binary(&self.engine, bytes);
            compiling.done();
            return component;
        };
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut hasher);
        let file = dir.join(format!("{}-{:016x}.cwasm", digest.trim_start_matches("sha256:"), hasher.finish()));
        if file.is_file() {
            match load_cached(&self.engine, &file) {
                Ok(component) => {
                    tracing::debug!(file = %file.display(), "compiled component loaded from the cache");
                    return Ok(component);
                }
                Err(e) => tracing::warn!(file = %file.display(), "ignoring an unusable cache entry: {}", chain(&e)),
            }
        }
        let compiling = Compiling::start(name, bytes);
        let compiled = self.engine.precompile_component(bytes)?;
        compiling.done();
        // Written to a fresh temporary file and renamed, so no reader (another thread, another
        // process) ever sees half a file, and concurrent writers do not mix their bytes.
        let written = tempfile::NamedTempFile::new_in(dir).and_then(|mut tmp| {
            std::io::Write::write_all(&mut tmp, &compiled)?;
            tmp.persist(&file).map_err(|e| e.error)
        });
        if let Err(e) = written {
            tracing::warn!(file = %file.display(), "cannot write the compile cache: {e}");
        }
        load_compiled(&self.engine, &compiled)
    }
}

/// Components at least this large take seconds to compile (a Python or JavaScript one:
/// 18 MB and more, 5 to 7 s): a start or reload says which one it is working on.
const ANNOUNCE_COMPILE_OVER: usize = 1 << 20;

/// A compilation being logged: at info for a large component (which takes seconds), with
/// its size before and the time it took after, so a slow start says what it is doing.
struct Compiling<'a> {
    name: &'a str,
    size: ByteSize,
    large: bool,
    started: std::time::Instant,
}

impl<'a> Compiling<'a> {
    fn start(name: &'a str, bytes: &[u8]) -> Self {
        let size = ByteSize(bytes.len() as u64);
        let large = bytes.len() >= ANNOUNCE_COMPILE_OVER;
        if large {
            tracing::info!(handler = name, "compiling {name} ({size})…");
        } else {
            tracing::debug!(handler = name, "compiling {name} ({size})");
        }
        Compiling { name, size, large, started: std::time::Instant::now() }
    }

    fn done(self) {
        let (name, size) = (self.name, self.size);
        let took = format!("{:.1}s", self.started.elapsed().as_secs_f64());
        if self.large {
            tracing::info!(handler = name, "compiled {name} ({size}) in {took}");
        } else {
            tracing::debug!(handler = name, "compiled {name} ({size}) in {took}");
        }
    }
}

/// Loads a component this process has just compiled.
#[allow(unsafe_code)]
fn load_compiled(engine: &wasmtime::Engine, compiled: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: `compiled` was produced a moment ago by `Engine::precompile_component` of this
    // very engine; it is exactly the input `deserialize` is meant for.
    unsafe { Component::deserialize(engine, compiled) }
}

/// Loads a compiled component from the cache directory.
#[allow(unsafe_code)]
fn load_cached(engine: &wasmtime::Engine, file: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file is in the cache directory, which Sluice creates with mode 0700 and
    // only ever fills with `precompile_component` output of an engine with the same
    // compatibility hash (part of the file name), written under a temporary name and renamed.
    // wasmtime still checks the header and the engine configuration on load. Anyone who can
    // write into that directory can run native code as the Sluice user: keep it private.
    unsafe { Component::deserialize_file(engine, file) }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
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

impl Drop for Engine {
    fn drop(&mut self) {
        // The last reference may go from inside another runtime, where blocking on the
        // guest threads' shutdown is not allowed.
        if let Some(guests) = self.guests.take() {
            guests.shutdown_background();
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid component (no imports, no exports): enough to exercise the cache.
    const EMPTY_COMPONENT: &[u8] = &[0x00, 0x61, 0x73, 0x6d, 0x0d, 0x00, 0x01, 0x00];

    #[test]
    fn the_compile_cache_is_filled_reused_and_survives_a_corrupt_entry() {
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("compiled");
        let options = EngineOptions { max_instances: 4, cache_dir: Some(cache.clone()), ..EngineOptions::default() };
        let engine = Engine::new(options).unwrap();
        engine.compile(EMPTY_COMPONENT, "sha256:abc", "t").unwrap();
        let entries: Vec<_> = std::fs::read_dir(&cache).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(entries.len(), 1, "one entry per digest: {entries:?}");
        assert!(entries[0].file_name().unwrap().to_string_lossy().starts_with("abc-"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&cache).unwrap().permissions().mode() & 0o777, 0o700);
        }

        // Reused: a second compile of the same digest leaves the entry as it is.
        let before = std::fs::metadata(&entries[0]).unwrap().modified().unwrap();
        engine.compile(EMPTY_COMPONENT, "sha256:abc", "t").unwrap();
        assert_eq!(std::fs::metadata(&entries[0]).unwrap().modified().unwrap(), before);

        // A damaged entry is ignored and replaced.
        std::fs::write(&entries[0], b"garbage").unwrap();
        engine.compile(EMPTY_COMPONENT, "sha256:abc", "t").unwrap();
        assert_ne!(std::fs::read(&entries[0]).unwrap(), b"garbage");
    }
}
