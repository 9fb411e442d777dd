//! The native baselines: plain async-nats consumers with no handler at all, each run as its
//! own process (this binary with a hidden subcommand), talking to the orchestrator through
//! stdin/stdout lines. They are the limits Sluice is measured against.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context;
use async_nats::jetstream;
use async_nats::jetstream::consumer::PullConsumer;
use clap::Subcommand;
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;

/// The baselines (internal: started by the orchestrator).
#[derive(Debug, Subcommand)]
pub enum Role {
    /// Core subscriber that counts messages. Reads `expect N` on stdin (answers `ok`) and
    /// prints `done N` once N messages arrived after it.
    #[command(hide = true, name = "native-count")]
    Count {
        #[arg(long)]
        url: String,
        #[arg(long)]
        subject: String,
    },
    /// JetStream durable pull consumer that acks every message (the orchestrator creates the
    /// consumer and watches its state).
    #[command(hide = true, name = "native-pull")]
    Pull {
        #[arg(long)]
        url: String,
        #[arg(long)]
        stream: String,
        #[arg(long)]
        consumer: String,
    },
    /// Core responder that replies to every request with its payload (the native echo).
    #[command(hide = true, name = "native-echo")]
    Echo {
        #[arg(long)]
        url: String,
        #[arg(long)]
        subject: String,
    },
}

pub async fn run(role: Role) -> anyhow::Result<()> {
    // The orchestrator closes our stdin when it is done with us (or dies).
    let (commands_tx, commands) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if commands_tx.send(line).is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    match role {
        Role::Count { url, subject } => count(&url, subject, commands).await,
        Role::Pull { url, stream, consumer } => pull(&url, &stream, &consumer).await,
        Role::Echo { url, subject } => echo(&url, subject).await,
    }
}

async fn connect(url: &str, name: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new().name(name).connect(url).await.with_context(|| format!("cannot connect to {url}"))
}

async fn count(
    url: &str,
    subject: String,
    mut commands: tokio::sync::mpsc::UnboundedReceiver<String>,
) -> anyhow::Result<()> {
    let client = connect(url, "native-count").await?;
    let mut sub = client.subscribe(subject).await?;
    client.flush().await?;
    let received = Arc::new(AtomicU64::new(0));
    let expected = Arc::new(AtomicU64::new(u64::MAX));
    {
        let (received, expected) = (received.clone(), expected.clone());
        tokio::spawn(async move {
            while let Some(line) = commands.recv().await {
                if let Some(n) = line.strip_prefix("expect ").and_then(|n| n.trim().parse().ok()) {
                    received.store(0, Ordering::SeqCst);
                    expected.store(n, Ordering::SeqCst);
                    println!("ok");
                }
            }
        });
    }
    println!("ready");
    while let Some(_msg) = sub.next().await {
        let n = received.fetch_add(1, Ordering::Relaxed) + 1;
        if n == expected.load(Ordering::Relaxed) {
            println!("done {n}");
        }
    }
    Ok(())
}

async fn pull(url: &str, stream: &str, consumer: &str) -> anyhow::Result<()> {
    let client = connect(url, "native-pull").await?;
    let js = jetstream::new(client);
    let consumer: PullConsumer = js
        .get_stream(stream)
        .await?
        .get_consumer(consumer)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {consumer} of {stream}: {e}"))?;
    // Pull requests expire after 2 s, as Sluice's do: with async-nats's default 30 s, a drift
    // between the client's and the server's count of outstanding messages stalls the consumer
    // until its pull expires (seen as a 30 s gap in one run in a few), which would make the
    // baseline, not Sluice, the noise.
    let mut messages = consumer.stream().expires(std::time::Duration::from_secs(2)).messages().await?;
    println!("ready");
    while let Some(msg) = messages.next().await {
        match msg {
            Ok(msg) => {
                if let Err(e) = msg.ack().await {
                    eprintln!("cannot ack: {e}");
                }
            }
            Err(e) => eprintln!("pulling: {e}"),
        }
    }
    Ok(())
}

async fn echo(url: &str, subject: String) -> anyhow::Result<()> {
    let client = connect(url, "native-echo").await?;
    let mut sub = client.subscribe(subject).await?;
    client.flush().await?;
    println!("ready");
    while let Some(msg) = sub.next().await {
        if let Some(reply) = msg.reply {
            client.publish(reply, msg.payload).await?;
        }
    }
    Ok(())
}
