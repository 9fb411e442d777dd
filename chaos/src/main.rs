//! `sluice-chaos`: the chaos rounds and the scaling table, written to CHAOS.md
//! (chaos/README.md). Exit code 1 when a round lost, duplicated or dead-lettered anything.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sluice_chaos::round::{self, RoundSpec};
use sluice_chaos::{Env, Store, report, scaling};

#[derive(Debug, Parser)]
#[command(about = "Chaos rounds on a 3-node NATS cluster with several Sluice processes")]
struct Args {
    /// Orders published per round.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Sluice process counts, one round each per store.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    processes: Vec<usize>,
    /// Idempotency stores, one round each per process count.
    #[arg(long, value_delimiter = ',', default_value = "nats-kv,redb")]
    stores: Vec<String>,
    /// Publication rate per second (default: as fast as acknowledged).
    #[arg(long)]
    rate: Option<f64>,
    /// Messages per scaling run (0 skips the scaling table).
    #[arg(long, default_value_t = 100_000)]
    scale_messages: u64,
    /// The `sluice` binary.
    #[arg(long, default_value = "target/release/sluice")]
    sluice: PathBuf,
    /// Where to write the report.
    #[arg(long, default_value = "CHAOS.md")]
    out: PathBuf,
    /// Seed of the fault targets and pauses.
    #[arg(long, default_value_t = 22)]
    seed: u64,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Args::parse()).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<bool> {
    let root = std::env::current_dir()?;
    let work = tempfile::Builder::new().prefix("sluice-chaos-").tempdir()?;
    let env = Env::new(&root, args.sluice.clone(), work.path().to_owned(), root.join("target/chaos-logs"))?;
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let machine = report::Machine::here(&command.replace(&*root.to_string_lossy(), "."));
    eprintln!("nats-server {}; logs in {}", env.nats_server.display(), env.logs.display());
    let mut rounds = Vec::new();
    for store in &args.stores {
        let store = Store::parse(store)?;
        for (i, &k) in args.processes.iter().enumerate() {
            let spec = RoundSpec {
                store,
                processes: k,
                messages: args.messages,
                rate: args.rate,
                faults: true,
                stall_limit: Duration::from_secs(120),
                seed: args.seed + i as u64,
            };
            let label = format!("{}-{k}", store.name());
            eprintln!("round {label}: {} orders", args.messages);
            let result = round::run(&env, &spec, &label).await?;
            eprintln!("  {}", result.summary());
            for f in &result.start_failures {
                eprintln!("  start-up failure, started again: {f}");
            }
            for f in &result.faults {
                eprintln!("  {:7.1}s {} ({:.1}s)", f.at_s, f.what, f.took_s);
            }
            rounds.push(result);
        }
    }
    let scale =
        if args.scale_messages > 0 { scaling::run(&env, args.scale_messages, &[1, 2, 3]).await? } else { Vec::new() };
    std::fs::write(&args.out, report::markdown(&machine, &rounds, &scale))?;
    eprintln!("wrote {}", args.out.display());
    Ok(rounds.iter().all(|r| r.passed()))
}
