//! The chaos harness's short profile (chaos/, `make chaos` runs the full one): a 3-node NATS
//! cluster, two `sluice run` processes of this package's binary (so Cargo builds the binary
//! it spawns), 10,000 orders with `[idempotency]` on `nats-kv`, and each fault once: kill -9
//! of a Sluice process, kill -9 of a NATS node, a Sluice process frozen past its ack wait and
//! lease, a rolling restart of the cluster. Every order must come out exactly once, nothing
//! dead-lettered, every process must exit cleanly at the end. No timing is asserted: the
//! publisher is paced so the faults land while orders flow, and "drained" is bounded by a
//! stall limit (nothing moving for two minutes), not by a rate.

use std::path::Path;
use std::time::Duration;

use sluice_chaos::round::{self, RoundSpec};
use sluice_chaos::{Env, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_short_profile_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let work = tempfile::Builder::new().prefix("sluice-chaos-test-").tempdir()?;
    let logs = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-logs");
    let env = Env::new(&root, env!("CARGO_BIN_EXE_sluice").into(), work.path().to_owned(), logs)?;
    let spec = RoundSpec {
        store: Store::NatsKv,
        processes: 2,
        messages: 10_000,
        // About 50 s of publishing: the four faults (about 35 s back to back) land while
        // orders are still arriving.
        rate: Some(200.0),
        faults: true,
        stall_limit: Duration::from_secs(120),
        seed: 22,
    };
    let result = round::run(&env, &spec, "test-nats-kv-2").await?;
    eprintln!("{}", result.summary());
    for f in &result.faults {
        eprintln!("  {:7.1}s {} ({:.1}s)", f.at_s, f.what, f.took_s);
    }
    assert_eq!(result.faults.len(), 4, "every fault was injected: {:?}", result.errors);
    assert!(result.passed(), "{} (logs in {})", result.summary(), env.logs.display());
    Ok(())
}
