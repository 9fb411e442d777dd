//! What a runtime is serving, for operators: each handler's version and source, and the
//! errors of the last reload (a broken manifest or component never replaces the running
//! version; its error is kept here until the file is fixed).

use std::collections::BTreeMap;
use std::sync::RwLock;
use std::time::SystemTime;

use serde::Serialize;

use crate::handler::Handler;
use crate::manifest::ManifestError;

/// What a reload did.
#[derive(Debug, Default)]
pub struct ReloadReport {
    /// Handlers started (new manifests).
    pub started: Vec<String>,
    /// Handlers updated to a new version.
    pub updated: Vec<String>,
    /// Handlers stopped (manifest removed).
    pub stopped: Vec<String>,
    /// Manifests or components that could not be used; what they described keeps running
    /// in its previous version.
    pub errors: Vec<ManifestError>,
}

/// One handler, as served now.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct HandlerStatus {
    /// The handler's name.
    pub name: String,
    /// `sha256:<hex>` of the component: the version.
    pub digest: String,
    /// Where its messages come from.
    pub source: String,
    /// The manifest file.
    pub manifest: String,
    /// The component file.
    pub component: String,
    /// When this version started serving (RFC 3339).
    pub since: String,
    /// The last reload error of this handler's manifest, if it is still broken.
    pub last_reload_error: Option<String>,
}

/// The status registry of one runtime.
#[derive(Debug, Default)]
pub struct Status {
    handlers: RwLock<BTreeMap<String, HandlerStatus>>,
    /// The parked ordering keys of handlers with `on_poison = "park"`, as served now.
    parked: RwLock<BTreeMap<String, std::sync::Weak<crate::parked::Parked>>>,
    /// Reload errors by manifest file.
    errors: RwLock<BTreeMap<String, String>>,
}

impl Status {
    pub(crate) fn serving(&self, handler: &Handler) {
        let spec = &handler.spec;
        let status = HandlerStatus {
            name: spec.name.to_string(),
            digest: spec.digest.clone(),
            source: spec.manifest.source.to_string(),
            manifest: spec.manifest.file.path.display().to_string(),
            component: spec.manifest.component.display().to_string(),
            since: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            last_reload_error: None,
        };
        if let Ok(mut h) = self.handlers.write() {
            h.insert(status.name.clone(), status);
        }
    }

    pub(crate) fn stopped(&self, name: &str) {
        if let Ok(mut h) = self.handlers.write() {
            h.remove(name);
        }
    }

    pub(crate) fn reloaded(&self, report: &ReloadReport) {
        let errors: BTreeMap<String, String> =
            report.errors.iter().map(|e| (e.path.display().to_string(), e.to_string())).collect();
        if let Ok(mut h) = self.handlers.write() {
            for status in h.values_mut() {
                status.last_reload_error = errors.get(&status.manifest).cloned();
            }
        }
        if let Ok(mut e) = self.errors.write() {
            *e = errors;
        }
    }

    /// Follows `handler`'s parked keys (its version being served holds them).
    pub(crate) fn track_parked(&self, handler: &str, parked: &std::sync::Arc<crate::parked::Parked>) {
        if let Ok(mut p) = self.parked.write() {
            p.insert(handler.to_owned(), std::sync::Arc::downgrade(parked));
        }
    }

    /// The parked ordering keys of `handler` (none unless it parks keys).
    pub fn parked_keys(&self, handler: &str) -> Vec<String> {
        let parked = self.parked.read().ok().and_then(|p| p.get(handler).and_then(std::sync::Weak::upgrade));
        parked.map(|p| p.list()).unwrap_or_default()
    }

    /// Every handler served now, by name.
    pub fn handlers(&self) -> Vec<HandlerStatus> {
        self.handlers.read().map(|h| h.values().cloned().collect()).unwrap_or_default()
    }

    /// One handler.
    pub fn handler(&self, name: &str) -> Option<HandlerStatus> {
        self.handlers.read().ok()?.get(name).cloned()
    }

    /// The errors of the last reload, by manifest file (new manifests that never loaded
    /// included).
    pub fn reload_errors(&self) -> BTreeMap<String, String> {
        self.errors.read().map(|e| e.clone()).unwrap_or_default()
    }
}
