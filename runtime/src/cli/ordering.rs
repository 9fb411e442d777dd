//! `sluice ordering parked` and `sluice ordering release`: the parked keys of an ordered
//! handler with `on_poison = "park"`.

use clap::{Args, Subcommand};

use crate::parked;

#[derive(Debug, Subcommand)]
pub enum OrderingCommand {
    /// List the parked ordering keys of HANDLER.
    Parked(HandlerArgs),
    /// Release a parked key of HANDLER: its next messages are handled again. Replay its dead
    /// letters afterwards, in order, with `sluice dlq replay STREAM --handler HANDLER --key KEY`.
    Release(ReleaseArgs),
}

#[derive(Debug, Args)]
pub struct HandlerArgs {
    /// The handler (its manifest's `[handler] name`).
    pub handler: String,
    #[command(flatten)]
    pub nats: crate::connect::NatsArgs,
}

#[derive(Debug, Args)]
pub struct ReleaseArgs {
    #[command(flatten)]
    pub handler: HandlerArgs,
    /// The ordering key, as in the dead letters' `Sluice-Ordering-Key` header.
    pub key: String,
}

pub async fn run(command: OrderingCommand) -> anyhow::Result<()> {
    match command {
        OrderingCommand::Parked(args) => {
            let js = async_nats::jetstream::new(super::connect_args(&args.nats).await?);
            let keys = parked::list(&js, &args.handler).await?;
            if keys.is_empty() {
                println!("handler {} has no parked keys", args.handler);
            }
            for k in keys {
                println!("{}\tparked {}\t{}", k.key, k.parked_at, k.reason);
            }
            Ok(())
        }
        OrderingCommand::Release(args) => {
            let js = async_nats::jetstream::new(super::connect_args(&args.handler.nats).await?);
            if parked::release(&js, &args.handler.handler, &args.key).await? {
                println!("released {:?} of handler {}", args.key, args.handler.handler);
                Ok(())
            } else {
                anyhow::bail!("{:?} is not a parked key of handler {}", args.key, args.handler.handler)
            }
        }
    }
}
