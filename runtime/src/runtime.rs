//! A set of handlers on one engine, bound to NATS: load (validate and compile everything),
//! bind (subscribe), run until told to stop, then shut down gracefully.

use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use async_nats::Client;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dlq;
use crate::engine::{Engine, EngineOptions};
use crate::handler::Handler;
use crate::manifest::Source;
use crate::manifest::{self, ManifestError};
use crate::outputs::OutputSender;
use crate::source::{self, Context, Fault};
use crate::store::{self, Backend, Scope};

enum Binding {
    Core(async_nats::Subscriber),
    JetStream(Box<async_nats::jetstream::consumer::PullConsumer>),
}

/// Why a set of manifests cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// One or more manifests or components are invalid; each error is located.
    #[error("{}", ManifestErrors(.0))]
    Invalid(Vec<ManifestError>),
    /// The paths named no manifest at all.
    #[error("no manifests (*.toml) found in {}", .0.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Empty(Vec<PathBuf>),
    /// The engine could not be created.
    #[error(transparent)]
    Engine(#[from] anyhow::Error),
}

struct ManifestErrors<'a>(&'a [ManifestError]);

impl fmt::Display for ManifestErrors<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// How a runtime runs.
#[derive(Debug, Clone, Default)]
pub struct RuntimeOptions {
    pub engine: EngineOptions,
    /// Where the `redb` store lives (`state.redb`); required when a handler uses it.
    pub data_dir: Option<PathBuf>,
    /// Fault injection for tests.
    #[doc(hidden)]
    pub fault: Option<Fault>,
}

/// Loaded, validated and compiled handlers, not yet bound to NATS.
#[derive(Debug)]
pub struct Runtime {
    engine: Arc<Engine>,
    handlers: Vec<Arc<Handler>>,
    options: RuntimeOptions,
}

impl Runtime {
    /// Loads every manifest under `paths` and compiles its component. Reports every invalid
    /// manifest or component, not only the first.
    pub fn load(paths: &[PathBuf], options: RuntimeOptions) -> Result<Self, LoadError> {
        let manifests = manifest::load_all(paths).map_err(LoadError::Invalid)?;
        if manifests.is_empty() {
            return Err(LoadError::Empty(paths.to_vec()));
        }
        let engine = Engine::new(options.engine)?;
        let mut handlers = Vec::new();
        let mut errors = Vec::new();
        for manifest in manifests {
            match Handler::load(&engine, manifest) {
                Ok(h) => handlers.push(Arc::new(h)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(LoadError::Invalid(errors));
        }
        Ok(Runtime { engine, handlers, options })
    }

    pub fn handlers(&self) -> &[Arc<Handler>] {
        &self.handlers
    }

    /// Subscribes every handler. When this returns, the subscriptions are registered with
    /// the server (a message published afterwards reaches a handler).
    pub async fn bind(self, client: Client) -> anyhow::Result<Running> {
        let (stop, stopped) = watch::channel(false);
        let sender = Arc::new(OutputSender::new(client.clone()));
        // Everything is set up before anything is served, so a bad stream or consumer fails
        // the whole bind and no handler runs half-configured.
        let mut stores = Stores::new(&self.options, sender.jetstream().clone());
        let mut bound = Vec::new();
        for handler in &self.handlers {
            let scope = match handler.needs_state() {
                true => Some(stores.scope_for(handler).await?),
                false => None,
            };
            let ctx = Context {
                scope,
                fault: self.options.fault,
                engine: self.engine.clone(),
                handler: handler.clone(),
                sender: sender.clone(),
            };
            if let Some(target) = &handler.spec.dead_letter {
                dlq::ensure_stream(sender.jetstream(), target).await?;
            }
            let binding = match &handler.spec.source {
                Source::Core { .. } => Binding::Core(source::core::subscribe(&client, &ctx).await?),
                Source::JetStream(_) => {
                    Binding::JetStream(Box::new(source::jetstream::bind(sender.jetstream(), &ctx).await?))
                }
            };
            bound.push((ctx, binding));
        }
        client.flush().await.map_err(|e| anyhow::anyhow!("cannot reach NATS: {e}"))?;
        let mut tasks = JoinSet::new();
        for (ctx, binding) in bound {
            let spec = &ctx.handler.spec;
            tracing::info!(handler = &*spec.name, source = %spec.source, digest = ctx.handler.short_digest(), "serving");
            match binding {
                Binding::Core(sub) => tasks.spawn(source::core::serve(ctx, sub, stopped.clone())),
                Binding::JetStream(consumer) => tasks.spawn(source::jetstream::serve(ctx, *consumer, stopped.clone())),
            };
        }
        Ok(Running { stop, tasks, client })
    }
}

/// Handlers bound to NATS and serving.
#[derive(Debug)]
pub struct Running {
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    client: Client,
}

impl Running {
    /// Serves until `signal` completes, then shuts down gracefully.
    pub async fn run_until(self, signal: impl Future<Output = ()>) -> anyhow::Result<()> {
        signal.await;
        self.shutdown().await
    }

    /// Stops at once, as a crash would: calls in flight are abandoned, nothing more is acked
    /// or marked. For tests of crash recovery; a real process uses [`shutdown`](Self::shutdown).
    #[doc(hidden)]
    pub async fn abort(mut self) {
        self.tasks.shutdown().await;
    }

    /// Stops taking messages, finishes those already received and in flight, sends their
    /// outputs, and flushes the connection.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        tracing::info!("shutting down: draining subscriptions and in-flight messages");
        let _ = self.stop.send(true);
        while let Some(joined) = self.tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!("a handler task failed: {e}");
            }
        }
        self.client.flush().await.map_err(|e| anyhow::anyhow!("cannot flush outputs to NATS: {e}"))?;
        Ok(())
    }
}

/// The stores of a runtime: one redb database (opened on first need), a memory store and
/// KV buckets per handler.
struct Stores {
    data_dir: Option<PathBuf>,
    redb: Option<store::RedbStore>,
    js: async_nats::jetstream::Context,
}

impl Stores {
    fn new(options: &RuntimeOptions, js: async_nats::jetstream::Context) -> Self {
        Stores { data_dir: options.data_dir.clone(), redb: None, js }
    }

    async fn scope_for(&mut self, handler: &Handler) -> anyhow::Result<Scope> {
        let spec = &handler.spec;
        let store = match spec.store.backend {
            Backend::Memory => store::Store::Memory(Arc::new(store::MemoryStore::new(spec.store.max_entries))),
            Backend::Redb => {
                if self.redb.is_none() {
                    let dir = self.data_dir.as_ref().ok_or_else(|| {
                        anyhow::anyhow!("handler {} uses the redb store, but no data directory is set", spec.name)
                    })?;
                    let path = dir.join("state.redb");
                    self.redb = Some(store::RedbStore::open(&path)?);
                    tracing::info!(path = %path.display(), "opened the state store");
                }
                store::Store::Redb(self.redb.clone().ok_or_else(|| anyhow::anyhow!("redb store missing"))?)
            }
            Backend::NatsKv => {
                let max_age = spec.idempotency.as_ref().map_or(manifest::DEFAULT_IDEMPOTENCY_TTL, |i| i.ttl)
                    + spec.limits.timeout
                    + source::LEASE_GRACE;
                let kv = store::KvStore::new(self.js.clone(), spec.store.replicas, max_age);
                kv.prepare(&spec.name).await.map_err(|e| anyhow::anyhow!("handler {}: {e}", spec.name))?;
                store::Store::Kv(Box::new(kv))
            }
        };
        Ok(Scope::new(store, spec.name.clone()))
    }
}
