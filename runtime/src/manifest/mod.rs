//! Handler manifests: one TOML file per handler, parsed, validated and resolved.
//!
//! Unknown keys are errors, and every error names the file, line and column of the value at
//! fault and says what would be accepted (see [`ManifestError`]).

mod error;
mod schema;
mod units;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{ManifestError, SourceText};
pub use units::{ByteSize, HumanDuration};

use crate::subject::SubjectPattern;

/// Memory one instance may use when the manifest does not say.
pub const DEFAULT_MEMORY: u64 = 64 << 20;
/// Time one call may take when the manifest does not say.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages of one handler processed at once when the manifest does not say.
pub const DEFAULT_MAX_CONCURRENCY: u32 = 32;

/// A validated manifest, with every default applied and the component path resolved.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The manifest file and its text, to point at lines in later errors.
    pub source: Arc<SourceText>,
    pub name: String,
    /// Absolute (or manifest-relative-resolved) path of the component file.
    pub component: PathBuf,
    pub subject: SubjectPattern,
    pub queue: String,
    pub limits: Limits,
    pub publish: Vec<SubjectPattern>,
    pub config: BTreeMap<String, String>,
    /// Where values sit in the file, for errors found after parsing.
    pub spans: Spans,
}

/// What one call may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory: u64,
    pub timeout: Duration,
    pub max_concurrency: u32,
}

/// Byte ranges of values that later checks (engine, registry) may have to point at.
#[derive(Debug, Clone, Default)]
pub struct Spans {
    pub name: std::ops::Range<usize>,
    pub component: std::ops::Range<usize>,
    pub memory: Option<std::ops::Range<usize>>,
}

impl Manifest {
    /// An error located at `span` of this manifest.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> ManifestError {
        ManifestError::at(&self.source, span, message)
    }
}

/// Reads and validates the manifest at `path`.
pub fn load(path: &Path) -> Result<Manifest, ManifestError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ManifestError::without_location(path, format!("cannot read manifest: {e}")))?;
    parse(path, text)
}

/// Validates manifest `text` as if read from `path` (which anchors the component path).
pub fn parse(path: &Path, text: String) -> Result<Manifest, ManifestError> {
    let source = Arc::new(SourceText {
        path: path.to_owned(),
        text,
    });
    let raw: schema::RawManifest = toml::from_str(&source.text).map_err(|e| {
        let message = with_hint(e.message().trim_end());
        match e.span() {
            Some(span) => ManifestError::at(&source, span, message),
            None => ManifestError::without_location(path, message),
        }
    })?;

    let dir = path.parent().unwrap_or(Path::new("."));
    let component_text = raw.handler.component.get_ref();
    if component_text.trim().is_empty() {
        return Err(ManifestError::at(
            &source,
            raw.handler.component.span(),
            "empty component path; expected the path of a .wasm component, relative to this manifest",
        ));
    }
    let component = dir.join(component_text);
    if !component.is_file() {
        return Err(ManifestError::at(
            &source,
            raw.handler.component.span(),
            format!(
                "component file not found: {} (paths are relative to the manifest's folder)",
                component.display()
            ),
        ));
    }

    let mut publish = Vec::with_capacity(raw.capabilities.publish.len());
    for pattern in &raw.capabilities.publish {
        let parsed = SubjectPattern::parse(pattern.get_ref())
            .map_err(|e| ManifestError::at(&source, pattern.span(), e))?;
        publish.push(parsed);
    }

    let name = raw.handler.name.get_ref().0.clone();
    let queue = raw.source.queue.map_or_else(|| name.clone(), |q| q.0);
    let limits = Limits {
        memory: raw
            .limits
            .memory
            .as_ref()
            .map_or(DEFAULT_MEMORY, |m| m.get_ref().0),
        timeout: raw.limits.timeout.map_or(DEFAULT_TIMEOUT, |t| t.0),
        max_concurrency: raw
            .limits
            .max_concurrency
            .map_or(DEFAULT_MAX_CONCURRENCY, |c| c.0),
    };
    Ok(Manifest {
        spans: Spans {
            name: raw.handler.name.span(),
            component: raw.handler.component.span(),
            memory: raw.limits.memory.as_ref().map(|m| m.span()),
        },
        source,
        name,
        component,
        subject: raw.source.subject,
        queue,
        limits,
        publish,
        config: raw.config.into_iter().map(|(k, v)| (k, v.0)).collect(),
    })
}

/// serde's "missing field" names the field; say what it is for.
fn with_hint(message: &str) -> String {
    let hint = match message {
        "missing field `handler`" => {
            "a manifest needs a [handler] table with `name` and `component`"
        }
        "missing field `source`" => {
            "a manifest needs a [source] table with the `subject` to subscribe to"
        }
        "missing field `name`" => "[handler] needs `name = \"...\"`, unique across the runtime",
        "missing field `component`" => "[handler] needs `component = \"path/to/handler.wasm\"`",
        "missing field `subject`" => {
            "[source] needs `subject = \"...\"`, the NATS subject to subscribe to"
        }
        _ => return message.to_owned(),
    };
    format!("{message}: {hint}")
}

/// Every manifest in `paths`: files as given, directories for their `*.toml` files (sorted,
/// not recursive, hidden files skipped). Handler names must be unique across all of them.
///
/// Returns every error found, not just the first, so one run of `sluice validate` shows
/// them all.
pub fn load_all(paths: &[PathBuf]) -> Result<Vec<Manifest>, Vec<ManifestError>> {
    let mut errors = Vec::new();
    let mut manifests: Vec<Manifest> = Vec::new();
    for file in manifest_files(paths, &mut errors) {
        match load(&file) {
            Ok(m) => {
                if let Some(first) = manifests.iter().find(|other| other.name == m.name) {
                    errors.push(m.error_at(
                        m.spans.name.clone(),
                        format!(
                            "duplicate handler name {:?}: {} already declares it",
                            m.name,
                            first.source.path.display()
                        ),
                    ));
                } else {
                    manifests.push(m);
                }
            }
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(manifests)
    } else {
        Err(errors)
    }
}

/// The manifest files named by `paths`, expanding directories.
pub fn manifest_files(paths: &[PathBuf], errors: &mut Vec<ManifestError>) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            match std::fs::read_dir(path) {
                Ok(entries) => {
                    let mut found: Vec<PathBuf> = entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| is_manifest_file(p))
                        .collect();
                    found.sort();
                    files.extend(found);
                }
                Err(e) => errors.push(ManifestError::without_location(
                    path,
                    format!("cannot read folder: {e}"),
                )),
            }
        } else if path.exists() {
            files.push(path.clone());
        } else {
            errors.push(ManifestError::without_location(
                path,
                "no such file or folder",
            ));
        }
    }
    files
}

/// True for `*.toml` files whose name does not start with a dot.
pub fn is_manifest_file(path: &Path) -> bool {
    path.is_file()
        && path.extension().is_some_and(|e| e == "toml")
        && !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
}
