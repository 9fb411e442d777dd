//! A handler's resolved settings, as the host uses them while running it: what its manifest
//! said (defaults applied) and which version of its component runs. Below the host and the
//! engine: it imports only the vocabulary (manifest, retry, idempotency, subjects).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::idempotency::Idempotency;
use crate::manifest::{DeadLetter, Limits, Manifest, Source, SourceText, StoreConfig};
use crate::retry::RetryPolicy;
use crate::subject::SubjectPattern;

/// What the host needs to know about a handler while running it.
#[derive(Debug)]
pub struct HandlerSpec {
    pub name: Arc<str>,
    pub manifest_path: PathBuf,
    /// The manifest as read, once: what this version was built from.
    pub manifest: Arc<SourceText>,
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

impl HandlerSpec {
    /// The spec of `manifest`'s handler, whose component has `digest`.
    pub fn new(manifest: Manifest, digest: String) -> Self {
        HandlerSpec {
            name: manifest.name.as_str().into(),
            manifest_path: manifest.file.path.clone(),
            manifest: manifest.file.clone(),
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
        }
    }
}
