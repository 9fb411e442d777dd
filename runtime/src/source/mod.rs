//! Where messages come from, and what settling them means there: core NATS subscriptions in a
//! queue group ([`core`]) and durable JetStream pull consumers ([`jetstream`]). A transport
//! receives messages in batches, hands each batch to the [`pipeline`](crate::pipeline), and
//! acts on each message's [`Settle`](crate::pipeline::Settle): ack, nak with a delay, term,
//! a retry in this process, a failure reply. The [`syphon`] moves a handler's backlog from
//! the secondary cluster into the primary (it runs no handler).
//!
//! Imports: the [`pipeline`](crate::pipeline) and what it is made of, and the manifest; never
//! the runtime or the CLI.

pub mod ahead;
pub mod core;
pub mod jetstream;
pub mod syphon;

/// A batch of up to `concurrency` entries, starting with `first`, sized once (up to 256): an
/// entry is large (a message, its permit, its turn), and growing the vector one push at a
/// time copies them over and over.
fn batch<T>(first: T, concurrency: usize) -> Vec<T> {
    let mut batch = Vec::with_capacity(concurrency.clamp(1, 256));
    batch.push(first);
    batch
}
