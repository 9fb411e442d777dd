//! Sluice: reliable NATS message processing with sandboxed WebAssembly component handlers.
//!
//! A handler is a component implementing the `sluice:handler/handler` world (`wit/`),
//! declared by a TOML manifest. Sluice subscribes its subject, runs every message in a fresh
//! instance (or, when the manifest asks, a warm one) under the manifest's limits, and sends
//! what the handler queued and commits what it wrote only when it succeeds: with a local
//! state store, its outputs, state and idempotency record in one write (the outbox), sent
//! afterwards by a relay.
//!
//! # Embedding
//!
//! The `sluice` binary is one user of this library; another program can serve handlers the
//! same way. The public API is small: [`Runtime::load`] reads and compiles the manifests
//! (every invalid one reported, located, as a [`LoadError`]), [`Runtime::bind`] subscribes
//! them on a NATS connection and returns the [`Running`] runtime, which reloads through its
//! [`Reloader`] (a [`Watcher`] does it on file changes) and stops with
//! [`Running::shutdown`]. [`RuntimeOptions`] and [`EngineOptions`] say how it runs;
//! [`Status`] and [`Metrics`] say what it serves and how it goes; [`manifest::parse`] checks
//! a manifest without loading anything.
//!
//! ```no_run
//! # async fn serve() -> anyhow::Result<()> {
//! use std::path::PathBuf;
//!
//! let options = sluice::RuntimeOptions { data_dir: Some(PathBuf::from("/var/lib/sluice")), ..Default::default() };
//! let runtime = sluice::Runtime::load(&[PathBuf::from("manifests")], options)?;
//! let client = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let running = runtime.bind(client).await?;
//! let _watcher = sluice::Watcher::start(running.reloader())?; // hot reload on file changes
//! tokio::signal::ctrl_c().await?;
//! running.shutdown().await?; // drains in-flight messages, sends their outputs
//! # Ok(())
//! # }
//! ```
//!
//! Besides these, [`admin`] (the HTTP listener) is public, and so are [`cli`] and
//! [`connect`], the command line the `sluice` binary runs (it still lives in the library;
//! see below). Everything else is `pub(crate)`.
//!
//! # Features
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redb` | on | the embedded `redb` state store, the default `[store] backend` (redb) |
//! | `nats-kv` | on | the `nats-kv` state store (JetStream KV buckets shared by every process) |
//! | `admin` | on | [`admin`]: `/metrics`, `/healthz`, `/readyz`, `/handlers`, `POST /reload` (axum) |
//! | `cli` | on | [`cli`] and [`connect`]: the command line and its NATS flags (clap, indicatif, ureq); implies `admin`; the binary requires it |
//! | `testing` | off | a `testing` module, as tokio's `test-util`: fault injection, test hooks, `Running::abort`, a child `nats-server`, the store conformance routine and a few internals, for the integration tests, the benchmark and the fuzz targets |
//!
//! `--no-default-features` builds the runtime alone: the `memory` store only, no HTTP
//! listener, no command line. A manifest naming a store the build lacks is refused at its
//! `backend` line; a handler that needs state and names none (the default is `redb`) is
//! refused when it loads, with the reason. `testing` turns on both stores.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`manifest`] | the manifest schema, validation, and located errors; `manifest::http`: HTTP grants, address classes, `[http]` limits |
//! | `subject` | NATS subject validation and wildcard matching |
//! | `engine` | the wasmtime engine, linker, epoch ticker, component loading |
//! | `bindings` | the single `bindgen!` of `wit/handler.wit` |
//! | `host` | the host side of each WIT interface, and the per-call state; `host::http`: outbound `wasi:http` requests checked against the grants (resolved address included), limited, stamped with `Idempotency-Key` |
//! | `spec` | a handler's resolved settings and version, as the host uses them |
//! | `handler` | a loaded handler: spec, digest, pre-instantiated component |
//! | `instance` | warm instances kept between messages, per handler version |
//! | `failure` | the failure vocabulary: kinds and reasons (a leaf) |
//! | `dispatch` | calls: one message through one instance (fresh or warm), with a typed outcome; a batch of calls handed to the guest threads at once |
//! | `idempotency` | idempotency keys: deriving them from a message |
//! | `ordering` | per-key order in a process: a key's messages one at a time, in the order received (a leaf) |
//! | `parked` | parked ordering keys (`on_poison = "park"`): a NATS KV bucket per handler, mirrored in memory (a leaf) |
//! | `retry` | the retry policy: attempts, backoff with jitter, retryable kinds |
//! | `pipeline` | the delivery pipeline, per batch: gate (payload, key, lease), call, commit (outputs, record), settle (retry policy, dead letters, metrics) |
//! | `source` | the transports: core NATS queue groups and JetStream consumers (on one cluster or two), receiving batches and acting on each message's settlement; the syphon of a backlog on the secondary cluster |
//! | `outputs` | a call's outputs (`Output`, `Outputs`, header checks) and sending them (stream acks awaited, replies only to inboxes, the secondary cluster for what the primary does not take) |
//! | `rate` | a handler's rate limit: a token bucket the transports draw from (a leaf) |
//! | `relay` | a handler's outbox relay: sends committed outputs in order after the ack, resumes what a crash left, pauses the handler when full |
//! | `store` | handler state (dedup records, guest dedup and kv) on memory, redb or NATS KV; a call's kv write set and its one-write commit; in-memory leases for the local stores |
//! | `dlq` | dead-letter headers, publishing, the dead-letter stream |
//! | `runtime` | load, bind, serve, swap versions, graceful shutdown |
//! | `reload` | the file watcher that triggers hot reloads |
//! | `status` | what is served, in which version, and the last reload errors |
//! | `nats_server` | a child `nats-server` (embedded default, tests) |
//! | `metrics` | Prometheus metrics, per runtime |
//! | [`admin`] | the admin HTTP listener: metrics, health, readiness, handlers, reload |
//! | [`cli`] | the `sluice` command line |
//! | [`logfmt`] | the text log format's field formatter (the default's output, written directly for plain fields) |
//! | `testing` | (feature `testing`) re-exports for tests, the benchmark and fuzzing |
//! | [`connect`] | the NATS connection flags, contexts, authentication, TLS, URL redaction, the one-line refusal |

// Every public item is documented. With `testing`, internals are re-exported for the tests;
// they are documented where it helps, not held to the lint.
#![cfg_attr(not(feature = "testing"), deny(missing_docs))]
#![deny(rustdoc::broken_intra_doc_links)]

pub(crate) mod bindings;
#[cfg(feature = "cli")]
pub mod cli;
#[cfg(feature = "cli")]
pub mod connect;
pub(crate) mod dispatch;
pub(crate) mod dlq;
pub(crate) mod engine;
pub(crate) mod failure;
pub(crate) mod handler;
pub(crate) mod host;
pub(crate) mod idempotency;
pub(crate) mod instance;
pub mod logfmt;
pub mod manifest;
pub(crate) mod metrics;
#[cfg(any(feature = "cli", feature = "testing"))]
pub(crate) mod nats_server;
pub(crate) mod ordering;
pub(crate) mod outputs;
pub(crate) mod parked;
pub(crate) mod pipeline;
pub(crate) mod rate;
pub(crate) mod relay;
pub(crate) mod reload;
pub(crate) mod retry;
pub(crate) mod runtime;
pub(crate) mod source;
pub(crate) mod spec;
pub(crate) mod status;
pub(crate) mod store;
pub(crate) mod subject;

#[cfg(feature = "admin")]
pub mod admin;

pub use engine::EngineOptions;
pub use metrics::Metrics;
pub use reload::Watcher;
pub use runtime::{LoadError, Reloader, Running, Runtime, RuntimeOptions, round_trip};
pub use status::{HandlerStatus, ReloadReport, Status};

/// What the integration tests, the benchmark and the fuzz targets use that is not the public
/// API: fault injection, test hooks, a child `nats-server`, the store conformance routine and
/// a few internals. Only with the `testing` feature (as tokio's `test-util`); never in
/// production builds.
#[cfg(feature = "testing")]
pub mod testing {
    pub use crate::bindings::{Delivery, Message};
    pub use crate::dispatch::{Outcome, dispatch};
    pub use crate::dlq::admin as dlq_admin;
    pub use crate::engine::Engine;
    pub use crate::handler::Handler;
    pub use crate::handler::digest;
    pub use crate::idempotency::KeySpec;
    pub use crate::nats_server::NatsServer;
    pub use crate::outputs::OutputSender;
    pub use crate::parked::{ParkedKey, list as list_parked, release as release_parked};
    pub use crate::pipeline::{Fault, LEASE_GRACE};
    pub use crate::runtime::{Hook, TestHooks};
    pub use crate::store::{Backend, KvStore, Store, conformance};
    pub use crate::subject::{SubjectPattern, validate_literal};
}
