//! Hot reload triggers: a watcher on the manifest folders and the component files they name.
//!
//! Only changes that matter start a reload: a file created, written, removed or renamed, or
//! its metadata changed, where the file is a manifest or a component being served. Reads are
//! not changes: a reload reads every manifest and component, and the kernel reports those
//! reads (open, access, close) as events too; reacting to them made one reload start the
//! next, forever. Events are debounced: a reload starts once the files have been quiet for
//! [`DEBOUNCE`], so a burst of writes (a large component copied in several writes, an editor
//! writing a temporary file and renaming it over) is one reload of the final content. A file
//! read half-written anyway fails validation and leaves the running version in place, and the
//! write that completes it triggers the next reload.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::runtime::{Reloader, Watched};

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

/// Whether an event of this kind can change what a reload would find.
fn changes_content(kind: &EventKind) -> bool {
    match kind {
        // A write finishing is a change; opening, reading and closing a file read-only is not.
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_) | EventKind::Any | EventKind::Other => true,
    }
}

fn relevant(event: &Event, watched: &Watched) -> bool {
    changes_content(&event.kind) && event.paths.iter().any(|p| watched.concerns(p))
}

impl Watcher {
    /// Starts watching what `reloader`'s runtime depends on.
    pub fn start(reloader: Reloader) -> anyhow::Result<Self> {
        let (events, mut changed) = mpsc::unbounded_channel::<Event>();
        let mut watcher = notify::recommended_watcher(move |result: notify::Result<Event>| match result {
            Ok(event) => {
                let _ = events.send(event);
            }
            Err(e) => tracing::warn!("file watcher: {e}"),
        })?;
        let task = tokio::spawn(async move {
            let mut watching: Vec<PathBuf> = Vec::new();
            let mut watched = rewatch(&mut watcher, &reloader, &mut watching).await;
            while let Some(event) = changed.recv().await {
                if !relevant(&event, &watched) {
                    continue;
                }
                // Wait for quiet: every further event (relevant or not) within the window
                // restarts it, so a file still being written is read once it is complete.
                loop {
                    match tokio::time::timeout(DEBOUNCE, changed.recv()).await {
                        Ok(Some(_)) => {}
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                tracing::debug!("files changed; reloading");
                reloader.reload().await;
                watched = rewatch(&mut watcher, &reloader, &mut watching).await;
            }
        });
        Ok(Watcher { task })
    }
}

/// Watches the folders the runtime now depends on (components may have moved), and returns
/// what in them matters.
async fn rewatch(watcher: &mut RecommendedWatcher, reloader: &Reloader, watching: &mut Vec<PathBuf>) -> Watched {
    let watched = reloader.watched().await;
    let dirs = watched.dirs();
    for dir in watching.iter().filter(|d| !dirs.contains(d)) {
        let _ = watcher.unwatch(dir);
    }
    for dir in dirs.iter().filter(|d| !watching.contains(d)) {
        // Folders, not files: an editor or a deploy that replaces a file by renaming a new
        // one over it would otherwise leave us watching the old inode.
        if let Err(e) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), "cannot watch: {e}");
        }
    }
    *watching = dirs;
    watched
}

impl Watched {
    /// The folders to watch: the manifest folders, and those of single manifest files and
    /// of components.
    fn dirs(&self) -> Vec<PathBuf> {
        let parent = |p: &PathBuf| p.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut dirs: Vec<PathBuf> = self.manifest_dirs.iter().cloned().chain(self.files.iter().map(parent)).collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// Whether a change to `path` can change what is served.
    fn concerns(&self, path: &Path) -> bool {
        self.files.iter().any(|f| f == path)
            || (crate::manifest::is_manifest_name(path)
                && path.parent().is_some_and(|dir| self.manifest_dirs.iter().any(|d| d == dir)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, DataChange, ModifyKind, RemoveKind};

    #[test]
    fn reads_are_not_changes() {
        assert!(!changes_content(&EventKind::Access(AccessKind::Open(AccessMode::Read))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Close(AccessMode::Read))));
        assert!(!changes_content(&EventKind::Access(AccessKind::Read)));
        assert!(changes_content(&EventKind::Access(AccessKind::Close(AccessMode::Write))));
        assert!(changes_content(&EventKind::Modify(ModifyKind::Data(DataChange::Any))));
        assert!(changes_content(&EventKind::Create(CreateKind::File)));
        assert!(changes_content(&EventKind::Remove(RemoveKind::File)));
    }

    #[test]
    fn only_manifests_in_manifest_folders_and_named_files_concern_a_reload() {
        let watched = Watched {
            manifest_dirs: vec![PathBuf::from("/m")],
            files: vec![PathBuf::from("/c/echo.wasm"), PathBuf::from("/one/a.toml")],
        };
        assert!(watched.concerns(Path::new("/m/new.toml")));
        assert!(!watched.concerns(Path::new("/m/.new.toml")), "hidden files are editors' temporaries");
        assert!(!watched.concerns(Path::new("/m/notes.txt")));
        assert!(watched.concerns(Path::new("/c/echo.wasm")));
        assert!(!watched.concerns(Path::new("/c/other.wasm")));
        assert!(watched.concerns(Path::new("/one/a.toml")));
        assert!(!watched.concerns(Path::new("/one/b.toml")), "only the named manifest of that folder");
        assert_eq!(watched.dirs(), vec![PathBuf::from("/c"), PathBuf::from("/m"), PathBuf::from("/one")]);
    }
}
