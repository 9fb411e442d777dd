//! `peer-extism`: the do-it-yourself alternative to Sluice that sluice-bench measures it
//! against (issue 16, row `peer_extism_jetstream_noop`).
//!
//! What a team would write with the Rust plugin framework it would reach for: an async-nats
//! JetStream pull consumer that hands each message's payload to a plugin through Extism's host
//! SDK and acks the message once the call returned. `--workers` tasks each own one long-lived
//! plugin instance (Extism's `Plugin` takes `&mut self` per call, so one per worker), created
//! from one compiled plugin; the pulled messages reach the workers through one bounded channel.
//! No deduplication, no retry policy, no dead letters, no limits beyond Extism's defaults: a
//! failed call is logged and the message nak'ed.
//!
//! The orchestrator creates the durable consumer (the same settings as the native baseline's:
//! explicit acks, `max_ack_pending` 1000) and watches its state; this process binds it, prints
//! `ready` once every worker has its plugin, and runs until its stdin closes or it is
//! signalled, like the native baselines of `bench/src/native.rs`.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use clap::Parser;
use extism::{CompiledPlugin, Manifest, Plugin, PluginBuilder, Wasm};
use futures::StreamExt;
use tokio::io::AsyncBufReadExt;

/// A JetStream pull consumer that calls an Extism plugin for each message, then acks it.
#[derive(Debug, Parser)]
#[command(name = "peer-extism", about)]
struct Args {
    /// NATS server URL.
    #[arg(long)]
    url: String,
    /// The stream of the durable consumer.
    #[arg(long)]
    stream: String,
    /// The durable pull consumer to bind (it must exist).
    #[arg(long)]
    consumer: String,
    /// The Extism plugin (a core WebAssembly module).
    #[arg(long)]
    plugin: PathBuf,
    /// The plugin's function called with each message's payload.
    #[arg(long, default_value = "noop")]
    function: String,
    /// Workers, each with its own long-lived plugin instance: messages handled at once
    /// (default: Sluice's default `max_concurrency`).
    #[arg(long, default_value_t = 32)]
    workers: usize,
}

fn main() {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let result = match &runtime {
        Ok(rt) => rt.block_on(run(args)),
        Err(e) => Err(anyhow::anyhow!("cannot start the tokio runtime: {e}")),
    };
    // Exit before the runtime is dropped: that would wait for the blocking read of stdin.
    match result {
        Ok(()) => std::process::exit(0),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // The orchestrator closes our stdin when it is done with us (or dies).
    tokio::spawn(async {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(_)) = lines.next_line().await {}
        std::process::exit(0);
    });

    let client = async_nats::ConnectOptions::new()
        .name("peer-extism")
        .connect(&args.url)
        .await
        .with_context(|| format!("cannot connect to {}", args.url))?;
    let js = jetstream::new(client);
    let consumer: PullConsumer = js
        .get_stream(&args.stream)
        .await
        .with_context(|| format!("stream {}", args.stream))?
        .get_consumer(&args.consumer)
        .await
        .map_err(|e| anyhow::anyhow!("consumer {} of {}: {e}", args.consumer, args.stream))?;

    // Compiled once; every worker instantiates its own plugin from it.
    let compiled = compile(&args.plugin)?;
    let function: Arc<str> = args.function.into();
    let (tx, rx) = async_channel::bounded::<jetstream::Message>(args.workers.max(1));
    let mut workers = Vec::new();
    for _ in 0..args.workers.max(1) {
        let plugin = Plugin::new_from_compiled(&compiled).context("cannot instantiate the plugin")?;
        if !plugin.function_exists(&*function) {
            anyhow::bail!("{} exports no function {function}", args.plugin.display());
        }
        workers.push(tokio::spawn(work(plugin, function.clone(), rx.clone())));
    }
    drop(rx);

    // async-nats's default pull batching, as the native baseline.
    let mut messages = consumer.messages().await?;
    println!("ready");
    while let Some(msg) = messages.next().await {
        match msg {
            Ok(msg) => {
                if tx.send(msg).await.is_err() {
                    anyhow::bail!("every worker has stopped");
                }
            }
            Err(e) => eprintln!("pulling: {e}"),
        }
    }
    drop(tx);
    for worker in workers {
        worker.await?;
    }
    Ok(())
}

/// Loads and compiles the plugin: no WASI (the plugin imports only Extism's kernel), no
/// compilation cache on disk. Read here and passed as bytes (Extism's own file loading is
/// its `register-filesystem` feature, left out with the other defaults).
fn compile(path: &PathBuf) -> anyhow::Result<CompiledPlugin> {
    let wasm = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let manifest = Manifest::new([Wasm::data(wasm)]);
    PluginBuilder::new(manifest)
        .with_wasi(false)
        .with_cache_disabled()
        .compile()
        .with_context(|| format!("cannot load the plugin {}", path.display()))
}

/// One worker: takes the next message, calls the plugin with its payload, acks it (naks it
/// when the call failed).
async fn work(mut plugin: Plugin, function: Arc<str>, messages: async_channel::Receiver<jetstream::Message>) {
    while let Ok(msg) = messages.recv().await {
        // A synchronous call on this runtime thread, as Extism's SDK makes it: a noop plugin
        // returns in microseconds, less than a hop to a blocking thread would cost.
        let result = plugin.call::<&[u8], &[u8]>(&*function, &msg.payload).map(|_| ());
        let settled = match result {
            Ok(()) => msg.ack().await,
            Err(e) => {
                eprintln!("plugin call failed: {e:#}");
                msg.ack_with(AckKind::Nak(None)).await
            }
        };
        if let Err(e) = settled {
            eprintln!("cannot ack: {e}");
        }
    }
}
