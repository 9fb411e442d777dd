//! `sluice-bench`: measures Sluice against native NATS clients on this machine, in one run,
//! and reports ratios (issue 7). `make bench` is the documented way to run it; see
//! `bench/README.md` for what is measured and how.
//!
//! Without a subcommand it orchestrates everything: it starts a `nats-server`, runs the native
//! baselines (this same binary, re-executed with a hidden subcommand, so that each consumer is
//! its own process) and `sluice run` as child processes, generates the load itself, and writes
//! `BENCHMARKS.md` and `bench/results.json`.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`native`] | the native baselines: async-nats consumers with no handler |
//! | [`process`] | child processes: spawning, their output, SIGTERM, RSS, CPU time |
//! | [`nats`] | the server with its monitoring port, load generation, counting, JetStream helpers |
//! | [`latency`] | open-loop request/reply latency at a fixed rate |
//! | [`scenarios`] | each measurement, warm-up included |
//! | [`report`] | machine facts, the table, `BENCHMARKS.md`, `results.json` |

mod latency;
mod native;
mod nats;
mod process;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Benchmarks Sluice against native NATS consumers (see bench/README.md).
#[derive(Debug, Parser)]
#[command(name = "sluice-bench", about)]
struct Cli {
    #[command(subcommand)]
    role: Option<native::Role>,
    /// The `sluice` binary to run (default: target/release/sluice of this checkout).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// Target duration of each throughput measurement, in seconds.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Run only the measurements whose id contains one of these (comma-separated, e.g.
    /// `native_jetstream,sluice_jetstream_noop`), print their table and write nothing: for
    /// profiling and quick comparisons. Ids: startup, native_core, native_jetstream,
    /// sluice_core_noop, sluice_jetstream_noop (the ids with `_warm` after them too),
    /// sluice_core_order_validator,
    /// sluice_jetstream_order_validator, peer_extism_jetstream_noop (the Extism peer), echo
    /// (with the latency runs).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Where to write BENCHMARKS.md (default: the checkout); results.json goes to bench/.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.role {
        Some(role) => runtime.block_on(native::run(role)),
        None => runtime.block_on(orchestrate(cli.sluice, cli.seconds, cli.only, cli.out)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn orchestrate(
    sluice: Option<PathBuf>,
    seconds: f64,
    only: Vec<String>,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .ok_or_else(|| anyhow::anyhow!("bench/ has no parent folder"))?;
    let sluice = sluice.unwrap_or_else(|| root.join("target/release/sluice"));
    let partial = !only.is_empty();
    let bench = scenarios::Bench::new(root.clone(), sluice, seconds, only)?;
    let results = bench.run_all().await?;
    if partial {
        println!("{}", report::markdown(&results));
        println!("(a partial run with --only: BENCHMARKS.md and results.json left as they were)");
        return Ok(());
    }
    let out = out.unwrap_or_else(|| root.clone());
    report::write(&results, &out.join("BENCHMARKS.md"), &root.join("bench/results.json"))?;
    println!("{}", report::markdown(&results));
    println!("wrote {} and {}", out.join("BENCHMARKS.md").display(), root.join("bench/results.json").display());
    Ok(())
}
