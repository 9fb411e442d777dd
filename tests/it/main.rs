//! Sluice integration tests, each against its own real `nats-server`.

#![allow(clippy::unwrap_used)]

mod admin;
mod auth;
mod batch;
mod clusters;
mod components;
mod core_retry;
mod creds;
mod dispatch;
mod golden;
mod http;
mod idempotency;
mod jetstream;
mod ordering;
mod outage;
mod outbox;
mod polyglot;
mod queue_group;
mod rate;
mod reload;
mod sandbox;
mod security;
mod state;
mod tls;
mod warm;
