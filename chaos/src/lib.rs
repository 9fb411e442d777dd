//! The chaos harness (`make chaos`, chaos/README.md): a three-node JetStream cluster on
//! loopback, K `sluice run` processes, faults on a schedule, and an independent count of every
//! output. Real processes throughout; every child is killed on drop.
//!
//! - [`cluster`]: the nats-server cluster (start, kill -9, SIGTERM, restart, healthy).
//! - [`sluice`]: `sluice run` processes (start, kill -9, SIGSTOP/SIGCONT, SIGTERM).
//! - [`round`]: one round of order-validator with faults, and what it found.
//! - [`scaling`]: throughput with 1, 2, 3 processes.
//! - [`report`]: writes CHAOS.md.

use std::path::{Path, PathBuf};

pub mod cluster;
mod nats;
pub mod report;
pub mod round;
pub mod scaling;
mod signal;
pub mod sluice;

/// Where things are.
#[derive(Debug, Clone)]
pub struct Env {
    /// The `sluice` binary.
    pub sluice: PathBuf,
    /// The `nats-server` binary.
    pub nats_server: PathBuf,
    /// The folder of the built plugins (`plugins/dist`).
    pub plugins: PathBuf,
    /// Scratch space (clusters' stores, data folders, manifests).
    pub work: PathBuf,
    /// Where the processes' logs go (kept after the run).
    pub logs: PathBuf,
}

impl Env {
    /// An environment for the checkout at `root`, with `sluice` and the nats-server found as
    /// the tests find it; checks that what it needs exists.
    pub fn new(root: &Path, sluice: PathBuf, work: PathBuf, logs: PathBuf) -> anyhow::Result<Self> {
        if !sluice.is_file() {
            anyhow::bail!(
                "{} not found: build it with `cargo build --release -p sluice` (or run `make chaos`)",
                sluice.display()
            );
        }
        let plugins = root.join("plugins/dist");
        for plugin in ["order-validator", "noop"] {
            let wasm = plugins.join(format!("{plugin}.wasm"));
            if !wasm.is_file() {
                anyhow::bail!("{} not found: run scripts/build-plugins.sh (or `make plugins`)", wasm.display());
            }
        }
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&logs)?;
        Ok(Env { sluice, nats_server: cluster::find_nats_server()?, plugins, work, logs })
    }

    /// The component of a built plugin.
    pub fn plugin(&self, name: &str) -> PathBuf {
        self.plugins.join(format!("{name}.wasm"))
    }
}

/// The `[idempotency]` store of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// `nats-kv`, its buckets with 3 replicas: one store shared by every process.
    NatsKv,
    /// `redb`: each process its own file; a duplicate across processes is caught by the output
    /// stream's duplicate window only.
    Redb,
}

impl Store {
    /// The manifest's name of it.
    pub fn name(self) -> &'static str {
        match self {
            Store::NatsKv => "nats-kv",
            Store::Redb => "redb",
        }
    }

    /// Parses `nats-kv` or `redb`.
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "nats-kv" => Ok(Store::NatsKv),
            "redb" => Ok(Store::Redb),
            other => anyhow::bail!("unknown store {other:?}: expected nats-kv or redb"),
        }
    }
}
