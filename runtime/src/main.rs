use std::io::{IsTerminal, Write};

use clap::Parser;
use sluice::cli::{Cli, Command, LogFormat};
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, fmt};

/// mimalloc rather than glibc's allocator: a message's path allocates and frees small
/// buffers on several threads (the NATS client's reader, the tokio workers, the store's
/// writer), where glibc's arenas contend on their locks; see bench/HISTORY.md (session 13).
/// Built without its transparent huge pages (`no_thp`): with them, a process that compiled
/// 20 components idled at 3× the resident memory (118 MiB, against 38 MiB with glibc).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    // `run` logs what it does; the one-shot commands (publish, request, dlq, status) show only
    // their own output, not the NATS client's connection chatter.
    let default = match cli.command {
        Command::Run(_) => "info",
        // The client's own line about a refused connection repeats the one error Sluice
        // prints for it.
        _ => "info,async_nats=warn,async_nats::connector=off",
    };
    let format = fmt::layer().with_ansi(std::io::stderr().is_terminal()).with_writer(std::io::stderr);
    let format = match cli.log_format {
        LogFormat::Text => format.fmt_fields(sluice::logfmt::Fields).boxed(),
        LogFormat::Json => format.json().boxed(),
    };
    tracing_subscriber::registry().with(log_filter(default)).with(format).init();
    let status = sluice::cli::run_command(cli).await;
    // Exit here rather than by returning from `main`: dropping the runtime waits for every
    // blocking task (a compile, say) to finish, and a shutdown that gave up on in-flight work
    // must not wait for it after all. Everything that needs stopping (the embedded
    // nats-server) has been stopped by now.
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(status));
}

/// The log filter: `RUST_LOG`'s directives, or `default`'s. Directives of targets and levels
/// only (the usual kind, and the default) make a static filter; `EnvFilter`, needed for
/// span and field directives (`[message{subject=orders.1}]=debug`), keeps a table of live
/// spans that it locks and looks up on every entry to and exit from a span, and every
/// message has one (bench/HISTORY.md, session 13).
fn log_filter(default: &str) -> Box<dyn Layer<Registry> + Send + Sync> {
    let directives = std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty());
    let directives = directives.as_deref().unwrap_or(default);
    match directives.parse::<Targets>() {
        Ok(targets) => targets.boxed(),
        // An invalid `RUST_LOG` falls back to the default, as `EnvFilter` does.
        Err(_) => EnvFilter::try_new(directives).unwrap_or_else(|_| EnvFilter::new(default)).boxed(),
    }
}
