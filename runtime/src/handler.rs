//! A loaded handler: its manifest's settings and its compiled component, identified by the
//! component's content digest.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::bindings::HandlerPre;
use crate::engine::Engine;
use crate::host::HostState;
use crate::idempotency::Idempotency;
use crate::manifest::{DeadLetter, Limits, Manifest, ManifestError, Source, StoreConfig};
use crate::retry::RetryPolicy;
use crate::subject::SubjectPattern;

/// What the host needs to know about a handler while running it.
#[derive(Debug)]
pub struct HandlerSpec {
    pub name: Arc<str>,
    pub manifest_path: PathBuf,
    pub component_path: PathBuf,
    /// `sha256:<hex>` of the component file: the handler version.
    pub digest: String,
    pub source: Source,
    pub limits: Limits,
    pub retry: RetryPolicy,
    pub dead_letter: Option<DeadLetter>,
    pub idempotency: Option<Idempotency>,
    pub store: StoreConfig,
    pub publish: Vec<SubjectPattern>,
    /// Reply subjects accepted besides the reply inboxes.
    pub reply_to: Vec<SubjectPattern>,
    pub config: BTreeMap<String, String>,
}

/// A handler ready to serve: spec plus pre-instantiated component.
pub struct Handler {
    pub spec: Arc<HandlerSpec>,
    pub pre: HandlerPre<HostState>,
    /// The component imports `dedup` or `kv`, so it needs its state store.
    pub imports_state: bool,
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
pub fn read_component(manifest: &Manifest) -> Result<Vec<u8>, ManifestError> {
    std::fs::read(&manifest.component).map_err(|e| {
        manifest.error_at(
            manifest.spans.component.clone(),
            format!("cannot read component {}: {e}", manifest.component.display()),
        )
    })
}

impl Drop for Handler {
    fn drop(&mut self) {
        // The last message of this version has finished.
        tracing::debug!(handler = &*self.spec.name, digest = self.short_digest(), "handler version released");
    }
}

impl Handler {
    /// Reads, checks and compiles the component of `manifest`.
    pub fn load(engine: &Engine, manifest: Manifest) -> Result<Self, ManifestError> {
        let bytes = read_component(&manifest)?;
        Self::from_bytes(engine, manifest, &bytes)
    }

    /// Checks and compiles `bytes`, the component of `manifest`.
    pub fn from_bytes(engine: &Engine, manifest: Manifest, bytes: &[u8]) -> Result<Self, ManifestError> {
        let digest = digest(bytes);
        let pre = engine.load(&manifest, bytes, &digest)?;
        let component = pre.instance_pre().component();
        let imports_state = component
            .component_type()
            .imports(engine.wasmtime())
            .any(|(name, _)| name.starts_with("sluice:handler/dedup@") || name.starts_with("sluice:handler/kv@"));
        let spec = HandlerSpec {
            name: manifest.name.as_str().into(),
            manifest_path: manifest.file.path.clone(),
            component_path: manifest.component,
            digest,
            source: manifest.source,
            limits: manifest.limits,
            retry: manifest.retry,
            dead_letter: manifest.dead_letter,
            idempotency: manifest.idempotency,
            store: manifest.store,
            publish: manifest.publish,
            reply_to: manifest.reply_to,
            config: manifest.config,
        };
        Ok(Handler { spec: Arc::new(spec), pre, imports_state })
    }

    /// Whether the handler needs a state store: for idempotency, or for the guest's own
    /// dedup and kv.
    pub fn needs_state(&self) -> bool {
        self.spec.idempotency.is_some() || self.imports_state
    }

    /// The first 12 hex digits of the digest, for logs.
    pub fn short_digest(&self) -> &str {
        let hex = self.spec.digest.trim_start_matches("sha256:");
        &hex[..hex.len().min(12)]
    }
}
