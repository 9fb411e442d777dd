//! A loaded handler: its manifest's settings and its compiled component, identified by the
//! component's content digest.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::bindings::HandlerPre;
use crate::engine::Engine;
use crate::host::HostState;
use crate::instance::WarmPool;
use crate::manifest::{Manifest, ManifestError};
use crate::spec::HandlerSpec;

/// A handler ready to serve: spec plus pre-instantiated component.
pub struct Handler {
    pub spec: Arc<HandlerSpec>,
    pub pre: HandlerPre<HostState>,
    /// The component imports `dedup` or `kv`, so it needs its state store.
    pub imports_state: bool,
    /// The component imports `dedup`: its marks are written as it sets them, not with its
    /// commit.
    pub imports_marks: bool,
    /// Idle warm instances of this version (empty unless the manifest asks for warm ones).
    pub warm: WarmPool,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler").field("spec", &self.spec).finish_non_exhaustive()
    }
}

/// `sha256:<hex>` of a component: its version.
pub fn digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The bytes of the manifest's component, or an error located at `component = ...`.
///
/// The file is opened without blocking and checked to be a regular file before anything is
/// read: the path may have been replaced since the manifest was checked, and a FIFO or a
/// device must neither hang the reload nor fill memory.
pub fn read_component(manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    let at = |message: String| manifest.error_at(manifest.spans.component.clone(), message);
    let path = &manifest.component;
    let mut open = std::fs::OpenOptions::new();
    open.read(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut open, libc::O_NONBLOCK);
    let mut file = open.open(path).map_err(|e| at(format!("cannot read component {}: {e}", path.display())))?;
    let meta = file.metadata().map_err(|e| at(format!("cannot read component {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(at(crate::manifest::check_component_path(path)
            .err()
            .unwrap_or_else(|| format!("component path {} is not a regular file", path.display()))));
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    std::io::Read::read_to_end(&mut file, &mut bytes)
        .map_err(|e| at(format!("cannot read component {}: {e}", path.display())))?;
    Ok(bytes)
}

/// A manifest and its component's bytes, to compile; or why they could not be read.
pub type CompileJob = Result<(Manifest, Vec<u8>), ManifestError>;

/// A value one thread puts and another takes.
type Slot<T> = std::sync::Mutex<Option<T>>;

/// Compiles the components of several handlers, each on a thread of its own up to the
/// number of cores. wasmtime spreads the functions of one component over its own thread
/// pool, but parsing, translation and the final link of each are serial, which several
/// compiles at once overlap; on the shared 2-vCPU machine, CPU-bound by other work, four
/// interpreter components took 79 s either way (bench/HISTORY.md, session 5). A job that
/// already failed (its component could not be read) is passed through. Results in the
/// order given.
pub fn compile_all(engine: &Engine, jobs: Vec<CompileJob>) -> Vec<Result<Handler, ManifestError>> {
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let pending = jobs.iter().filter(|j| j.is_ok()).count();
    if pending <= 1 || cores <= 1 {
        return jobs.into_iter().map(|j| j.and_then(|(m, bytes)| Handler::from_bytes(engine, m, &bytes))).collect();
    }
    let paths: Vec<Option<std::path::PathBuf>> =
        jobs.iter().map(|j| j.as_ref().ok().map(|(m, _)| m.file.path.clone())).collect();
    let mut results: Vec<Slot<Result<Handler, ManifestError>>> = Vec::new();
    let mut work: Vec<Slot<(Manifest, Vec<u8>)>> = Vec::new();
    for job in jobs {
        let (done, todo) = match job {
            Ok(job) => (None, Some(job)),
            Err(e) => (Some(Err(e)), None),
        };
        results.push(std::sync::Mutex::new(done));
        work.push(std::sync::Mutex::new(todo));
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..cores.min(pending) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(slot) = work.get(i) else { break };
                    let Some((m, bytes)) = slot.lock().ok().and_then(|mut j| j.take()) else { continue };
                    let result = Handler::from_bytes(engine, m, &bytes);
                    if let Ok(mut r) = results[i].lock() {
                        *r = Some(result);
                    }
                }
            });
        }
    });
    // A panicking compile thread panics the scope, so every slot is filled by now.
    results
        .into_iter()
        .zip(paths)
        .map(|(r, path)| {
            r.into_inner().ok().flatten().unwrap_or_else(|| {
                let path = path.unwrap_or_default();
                Err(ManifestError::without_location(&path, "compiling failed"))
            })
        })
        .collect()
}

impl Drop for Handler {
    fn drop(&mut self) {
        // The last message of this version has finished.
        tracing::debug!(handler = &*self.spec.name, digest = self.short_digest(), "handler version released");
    }
}

impl Handler {
    /// Reads, checks and compiles the component of `manifest`.
    #[cfg_attr(not(any(feature = "cli", feature = "testing")), allow(dead_code))]
    pub fn load(engine: &Engine, manifest: Manifest) -> Result<Self, ManifestError> {
        let bytes = read_component(&manifest)?;
        Self::from_bytes(engine, manifest, &bytes)
    }

    /// Reads, checks and compiles the components of `manifests`, several at once where
    /// cores allow (see [`compile_all`]); results in the order given.
    pub fn load_all(engine: &Engine, manifests: Vec<Manifest>) -> Vec<Result<Self, ManifestError>> {
        let jobs = manifests.into_iter().map(|m| read_component(&m).map(|bytes| (m, bytes))).collect();
        compile_all(engine, jobs)
    }

    /// Checks and compiles `bytes`, the component of `manifest`.
    pub fn from_bytes(engine: &Engine, manifest: Manifest, bytes: &[u8]) -> Result<Self, ManifestError> {
        let digest = digest(bytes);
        let pre = engine.load(&manifest, bytes, &digest)?;
        let component = pre.instance_pre().component();
        let imports = |prefix: &str| {
            component.component_type().imports(engine.wasmtime()).any(|(name, _)| name.starts_with(prefix))
        };
        let imports_marks = imports("sluice:handler/dedup@");
        let imports_state = imports_marks || imports("sluice:handler/kv@");
        Ok(Handler {
            spec: Arc::new(HandlerSpec::new(manifest, digest)),
            pre,
            imports_state,
            imports_marks,
            warm: WarmPool::default(),
        })
    }

    /// Whether the handler needs a state store: for idempotency, for the guest's own dedup
    /// and kv, or for a resequencer's next expected numbers.
    pub fn needs_state(&self) -> bool {
        let resequenced = self.spec.manifest.ordering.as_ref().is_some_and(|o| o.sequence.is_some());
        self.spec.manifest.idempotency.is_some() || self.imports_state || resequenced
    }

    /// The first 12 hex digits of the digest, for logs.
    pub fn short_digest(&self) -> &str {
        let hex = self.spec.digest.trim_start_matches("sha256:");
        &hex[..hex.len().min(12)]
    }
}
