//! `sluice dlq list` and `sluice dlq replay`.

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use crate::dlq::admin::{self, Filter, ReplayOptions};
use crate::outputs::OutputSender;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// A table of the messages parked in a dead-letter stream.
    List(ListArgs),
    /// Republish parked messages to their original subject (or --to) and remove them.
    Replay(ReplayArgs),
}

#[derive(Debug, Args)]
pub struct Selection {
    /// The dead-letter stream.
    pub stream: String,
    /// Only messages of this handler.
    #[arg(long)]
    pub handler: Option<String>,
    /// Only messages that failed with this kind (rejected, retries-exhausted, ...).
    #[arg(long)]
    pub kind: Option<String>,
    /// Only messages of this ordering key (`Sluice-Ordering-Key`), in the order they were
    /// dead-lettered: an ordered handler's parked key.
    #[arg(long)]
    pub key: Option<String>,
    #[command(flatten)]
    pub nats: crate::connect::NatsArgs,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub selection: Selection,
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub selection: Selection,
    /// At most this many messages.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Publish to this subject instead of each message's original subject.
    #[arg(long)]
    pub to: Option<String>,
    /// Show what would be replayed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List(args) => list(args).await,
        DlqCommand::Replay(args) => replay(args).await,
    }
}

fn filter(s: &Selection, limit: Option<usize>) -> Filter {
    Filter { handler: s.handler.clone(), kind: s.kind.clone(), key: s.key.clone(), limit }
}

async fn list(args: ListArgs) -> anyhow::Result<()> {
    let client = super::connect_args(&args.selection.nats).await?;
    let js = async_nats::jetstream::new(client);
    let entries = admin::list(&js, &args.selection.stream, &filter(&args.selection, None)).await?;
    println!(
        "{:>8}  {:<20}  {:<18}  {:>8}  {:>10}  {:<24}  REASON",
        "SEQ", "HANDLER", "KIND", "ATTEMPTS", "AGE", "SUBJECT"
    );
    for e in &entries {
        let age = humantime::format_duration(std::time::Duration::from_secs(e.age().as_secs())).to_string();
        println!(
            "{:>8}  {:<20}  {:<18}  {:>8}  {:>10}  {:<24}  {}",
            e.sequence,
            truncate(e.handler(), 20),
            truncate(e.kind(), 18),
            e.attempts(),
            truncate(&age, 10),
            truncate(e.original_subject().unwrap_or("?"), 24),
            truncate(e.reason(), 80)
        );
    }
    eprintln!("{} message{}", entries.len(), if entries.len() == 1 { "" } else { "s" });
    Ok(())
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let client = super::connect_args(&args.selection.nats).await?;
    let sender = OutputSender::new(client.clone());
    let options =
        ReplayOptions { filter: filter(&args.selection, args.limit), to: args.to.clone(), dry_run: args.dry_run };
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} replaying {pos}/{len} [{bar:30}] {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let report = admin::replay(&sender, &args.selection.stream, &options, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })
    .await?;
    bar.finish_and_clear();
    client.flush().await?;
    let verb = if args.dry_run { "would replay" } else { "replayed" };
    println!("{verb} {} message{}", report.replayed.len(), if report.replayed.len() == 1 { "" } else { "s" });
    if let Some((seq, why)) = report.failed {
        anyhow::bail!("stopped at sequence {seq}: {why}; it and the rest are still in {}", args.selection.stream);
    }
    Ok(())
}

fn truncate(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}
