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
