//! Sluice: reliable NATS message processing with sandboxed WebAssembly component handlers.
//!
//! A handler is a component implementing the `sluice:handler/handler` world (`wit/`),
//! declared by a TOML manifest. Sluice subscribes its subject, runs every message in a fresh
//! instance (or, when the manifest asks, a warm one) under the manifest's limits, and sends
//! what the handler queued and commits what it wrote only when it succeeds: with a local
//! state store, its outputs, state and idempotency record in one write (the outbox), sent
//! afterwards by a relay.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`manifest`] | the manifest schema, validation, and located errors; `manifest::http`: HTTP grants, address classes, `[http]` limits |
//! | [`subject`] | NATS subject validation and wildcard matching |
//! | [`engine`] | the wasmtime engine, linker, epoch ticker, component loading |
//! | [`bindings`] | the single `bindgen!` of `wit/handler.wit` |
//! | [`host`] | the host side of each WIT interface, and the per-call state; `host::http`: outbound `wasi:http` requests checked against the grants (resolved address included), limited, stamped with `Idempotency-Key` |
//! | [`spec`] | a handler's resolved settings and version, as the host uses them |
//! | [`handler`] | a loaded handler: spec, digest, pre-instantiated component |
//! | [`instance`] | warm instances kept between messages, per handler version |
//! | [`failure`] | the failure vocabulary: kinds and reasons (a leaf) |
//! | [`dispatch`] | calls: one message through one instance (fresh or warm), with a typed outcome; a batch of calls handed to the guest threads at once |
//! | [`idempotency`] | idempotency keys: deriving them from a message |
//! | [`retry`] | the retry policy: attempts, backoff with jitter, retryable kinds |
//! | [`pipeline`] | the delivery pipeline, per batch: gate (payload, key, lease), call, commit (outputs, record), settle (retry policy, dead letters, metrics) |
//! | [`source`] | the transports: core NATS queue groups and JetStream consumers, receiving batches and acting on each message's settlement |
//! | [`outputs`] | a call's outputs (`Output`, `Outputs`, header checks) and sending them (stream acks awaited, replies only to inboxes) |
//! | [`rate`] | a handler's rate limit: a token bucket the transports draw from (a leaf) |
//! | [`relay`] | a handler's outbox relay: sends committed outputs in order after the ack, resumes what a crash left, pauses the handler when full |
//! | [`store`] | handler state (dedup records, guest dedup and kv) on memory, redb or NATS KV; a call's kv write set and its one-write commit; in-memory leases for the local stores |
//! | [`dlq`] | dead-letter headers, publishing, the dead-letter stream |
//! | [`runtime`] | load, bind, serve, swap versions, graceful shutdown |
//! | [`reload`] | the file watcher that triggers hot reloads |
//! | [`status`] | what is served, in which version, and the last reload errors |
//! | [`nats_server`] | a child `nats-server` (embedded default, tests) |
//! | [`metrics`] | Prometheus metrics, per runtime |
//! | [`admin`] | the admin HTTP listener: metrics, health, readiness, handlers, reload |
//! | [`cli`] | the `sluice` command line |
//! | [`connect`] | the NATS connection flags, contexts, authentication, TLS, URL redaction, the one-line refusal |

pub mod admin;
pub mod bindings;
pub mod cli;
pub mod connect;
pub mod dispatch;
pub mod dlq;
pub mod engine;
pub mod failure;
pub mod handler;
pub mod host;
pub mod idempotency;
pub mod instance;
pub mod manifest;
pub mod metrics;
pub mod nats_server;
pub mod outputs;
pub mod pipeline;
pub mod rate;
pub mod relay;
pub mod reload;
pub mod retry;
pub mod runtime;
pub mod source;
pub mod spec;
pub mod status;
pub mod store;
pub mod subject;

pub use engine::EngineOptions;
pub use runtime::{LoadError, Reloader, Running, Runtime, RuntimeOptions, round_trip};
pub use status::ReloadReport;
