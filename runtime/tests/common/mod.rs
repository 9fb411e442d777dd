//! What the tests of the `sluice` binary share.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}

/// Builds `plugins/dist/*.wasm` (incremental: quick when they are up to date).
pub fn build_plugins() {
    let status = Command::new("bash").arg(repo_root().join("scripts/build-plugins.sh")).status().unwrap();
    assert!(status.success(), "cannot build the plugins");
}

/// Kills the child on drop, so a failing test leaves no process behind.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
