use std::io::{IsTerminal, Write};

use clap::Parser;
use sluice::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

/// mimalloc rather than glibc's allocator: a message's path allocates and frees small
/// buffers on several threads (the NATS client's reader, the tokio workers, the store's
/// writer), where glibc's arenas contend on their locks; see bench/HISTORY.md (session 13).
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
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let status = sluice::cli::run_command(cli).await;
    // Exit here rather than by returning from `main`: dropping the runtime waits for every
    // blocking task (a compile, say) to finish, and a shutdown that gave up on in-flight work
    // must not wait for it after all. Everything that needs stopping (the embedded
    // nats-server) has been stopped by now.
    let _ = std::io::stdout().flush();
    std::process::exit(i32::from(status));
}
