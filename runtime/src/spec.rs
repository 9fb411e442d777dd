//! A handler's resolved settings, as the host uses them while running it: its manifest
//! (defaults applied), held once, and which version of its component runs. Below the host
//! and the engine: it imports only the manifest.

use std::sync::Arc;

use crate::manifest::Manifest;

/// What the host needs to know about a handler while running it.
#[derive(Debug)]
pub struct HandlerSpec {
    /// The handler's name, shared by every log line and metric of it.
    pub name: Arc<str>,
    /// `sha256:<hex>` of the component file: the handler version.
    pub digest: String,
    /// The manifest as read, once: what this version was built from (its text is
    /// `manifest.file`).
    pub manifest: Manifest,
}

impl HandlerSpec {
    /// The spec of `manifest`'s handler, whose component has `digest`.
    pub fn new(manifest: Manifest, digest: String) -> Self {
        HandlerSpec { name: manifest.name.as_str().into(), digest, manifest }
    }
}
