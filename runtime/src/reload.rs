//! Hot reload triggers: a watcher on the manifest paths and the component files they name.
//! Events are debounced (a burst of writes is one reload, and a file still being written is
//! not read until it has been quiet for a moment); a file read half-written anyway fails
//! validation and leaves the running version in place, and the write that completes it
//! triggers the next reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify_debouncer_mini::notify::RecursiveMode;
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runtime::Reloader;

/// How long files must be quiet before a reload.
pub const DEBOUNCE: Duration = Duration::from_millis(300);

/// Watches and reloads until dropped.
pub struct Watcher {
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn relevant(path: &Path, files: &[PathBuf]) -> bool {
    files.iter().any(|f| f == path) || path.extension().is_some_and(|e| e == "toml")
}

impl Watcher {
    pub fn start(reloader: Reloader) -> anyhow::Result<Self> {
        let (events, mut changed) = mpsc::unbounded_channel::<Vec<PathBuf>>();
        let mut debouncer = new_debouncer(DEBOUNCE, move |result: DebounceEventResult| match result {
            Ok(evs) => {
                let _ = events.send(evs.into_iter().map(|e| e.path).collect());
            }
            Err(e) => tracing::warn!("file watcher: {e}"),
        })?;
        let task = tokio::spawn(async move {
            let mut watching: Vec<PathBuf> = Vec::new();
            let mut files = Vec::new();
            rewatch(&mut debouncer, &reloader, &mut watching, &mut files).await;
            while let Some(paths) = changed.recv().await {
                let mut paths = paths;
                while let Ok(more) = changed.try_recv() {
                    paths.extend(more);
                }
                if !paths.iter().any(|p| relevant(p, &files)) {
                    continue;
                }
                tracing::info!("files changed; reloading");
                reloader.reload().await;
                rewatch(&mut debouncer, &reloader, &mut watching, &mut files).await;
            }
        });
        Ok(Watcher { task })
    }
}

/// Watches the folders the runtime now depends on (components may have moved).
async fn rewatch(
    debouncer: &mut Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>,
    reloader: &Reloader,
    watching: &mut Vec<PathBuf>,
    files: &mut Vec<PathBuf>,
) {
    let (dirs, wanted_files) = reloader.watched().await;
    *files = wanted_files;
    for dir in watching.iter().filter(|d| !dirs.contains(d)) {
        let _ = debouncer.watcher().unwatch(dir);
    }
    for dir in dirs.iter().filter(|d| !watching.contains(d)) {
        // Folders, not files: an editor or a deploy that replaces a file by renaming a new
        // one over it would otherwise leave us watching the old inode.
        if let Err(e) = debouncer.watcher().watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
        }
    }
    *watching = dirs;
}
