//! A set of handlers on one engine, bound to NATS: load (validate and compile everything),
//! bind (subscribe), run until told to stop, then shut down gracefully.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::dlq;
use crate::engine::{Engine, EngineOptions};
use crate::handler::{self, Handler, read_component};
use crate::manifest::{self, Manifest, ManifestError, Source};
use crate::metrics::Metrics;
use crate::outputs::OutputSender;
use crate::pipeline::{Fault, Lane};
use crate::relay::Relay;
use crate::source;
use crate::status::{ReloadReport, Status};
use crate::store::{self, Backend, Scope};

/// How long a relay is given to send what it holds: at start-up (what a crash left) before
/// new messages are taken anyway, and at shutdown before it is stopped.
const RELAY_DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug)]
enum Binding {
    Core(async_nats::Subscriber),
    /// The handler's consumer, or one per partition; with `clusters = ["primary",
    /// "secondary"]` also the consumer on the secondary. And the syphon of its backlog.
    JetStream(Vec<source::jetstream::Bound>, Option<Box<source::syphon::Syphon>>),
}

/// Why a set of manifests cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// One or more manifests or components are invalid; each error is located.
    #[error("{}", ManifestErrors(.0))]
    Invalid(Vec<ManifestError>),
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
    /// The engine's limits, compile cache and guest threads.
    pub engine: EngineOptions,
    /// Where the `redb` store lives (`state.redb`); required when a handler uses it.
    pub data_dir: Option<PathBuf>,
    /// Fault injection for tests (public with the `testing` feature).
    #[cfg(feature = "testing")]
    pub fault: Option<Fault>,
    #[cfg(not(feature = "testing"))]
    pub(crate) fault: Option<Fault>,
    /// Hooks for tests, to make races deterministic (public with the `testing` feature).
    #[cfg(feature = "testing")]
    pub hooks: TestHooks,
    #[cfg(not(feature = "testing"))]
    pub(crate) hooks: TestHooks,
}

/// Places in a reload where a test can act (a hook runs on the reloading task).
#[derive(Clone, Default)]
pub struct TestHooks {
    /// After a new version is compiled, before it is put in service (its handler name).
    pub before_install: Option<Hook>,
}

/// A test hook, called with a handler name.
pub type Hook = Arc<dyn Fn(&str) + Send + Sync>;

impl fmt::Debug for TestHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestHooks").field("before_install", &self.before_install.is_some()).finish()
    }
}

/// Loaded, validated and compiled handlers, not yet bound to NATS.
#[derive(Debug)]
pub struct Runtime {
    engine: Arc<Engine>,
    handlers: Vec<Arc<Handler>>,
    options: RuntimeOptions,
    /// The manifest files and folders, for reloads.
    paths: Vec<PathBuf>,
    metrics: Arc<Metrics>,
    status: Arc<Status>,
}

impl Runtime {
    /// Loads every manifest under `paths` and compiles its component. Reports every invalid
    /// manifest or component, not only the first. A folder without manifests is not an
    /// error: the runtime serves nothing until manifests appear (a path that does not exist
    /// is one).
    pub fn load(paths: &[PathBuf], options: RuntimeOptions) -> Result<Self, LoadError> {
        let manifests = manifest::load_all(paths).map_err(LoadError::Invalid)?;
        let engine = Engine::new(options.engine.clone())?;
        let mut handlers = Vec::new();
        let mut errors = Vec::new();
        for loaded in Handler::load_all(&engine, manifests) {
            match loaded {
                Ok(h) => handlers.push(Arc::new(h)),
                Err(e) => errors.push(e),
            }
        }
        if !errors.is_empty() {
            return Err(LoadError::Invalid(errors));
        }
        let metrics = Arc::new(Metrics::default());
        engine.attach_metrics(metrics.clone());
        Ok(Runtime { engine, handlers, options, paths: paths.to_vec(), metrics, status: Arc::default() })
    }

    /// The handlers loaded (the internal type: the CLI reads it).
    #[cfg_attr(not(any(feature = "cli", feature = "testing")), allow(dead_code))]
    pub(crate) fn handlers(&self) -> &[Arc<Handler>] {
        &self.handlers
    }

    /// The names of the handlers loaded, in load order (none: an empty folder, which is
    /// served until manifests appear).
    pub fn handler_names(&self) -> Vec<String> {
        self.handlers.iter().map(|h| h.spec.name.to_string()).collect()
    }

    /// The runtime's metrics (available before it is bound, for an early admin listener).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// The runtime's status registry.
    pub fn status(&self) -> Arc<Status> {
        self.status.clone()
    }

    /// Binds every handler (subscriptions, consumers, stores) and serves. When this returns,
    /// the subscriptions are registered with the server (a message published afterwards
    /// reaches a handler). Any failure fails the whole bind: no handler runs half-configured.
    pub async fn bind(self, client: Client) -> anyhow::Result<Running> {
        self.bind_clusters(client, None).await
    }

    /// [`Runtime::bind`] with a secondary cluster (`sluice run --nats-secondary`): outputs the
    /// primary does not take go there (passive sending), handlers may read a stream on both
    /// (`[source] clusters`) and have their backlog there moved back (`[source] backlog`).
    pub async fn bind_clusters(self, client: Client, secondary: Option<Client>) -> anyhow::Result<Running> {
        let mut sender = OutputSender::new(client.clone());
        if let Some(secondary) = &secondary {
            sender = sender.with_secondary(secondary.clone(), self.metrics.clone());
        }
        let sender = Arc::new(sender);
        let supervisor = Arc::new(Supervisor {
            stores: Mutex::new(Stores::new(&self.options, sender.jetstream().clone())),
            relays: Mutex::default(),
            pauses: std::sync::Mutex::default(),
            engine: self.engine,
            client: client.clone(),
            secondary: secondary.map(async_nats::jetstream::new),
            sender,
            options: self.options,
            paths: self.paths,
            served: Mutex::new(BTreeMap::new()),
            reloading: Mutex::new(()),
            retired: Default::default(),
            status: self.status,
            metrics: self.metrics,
        });
        let mut prepared = Vec::new();
        for handler in self.handlers {
            prepared.push(supervisor.prepare(handler).await?);
        }
        round_trip(&client).await?;
        let mut served = supervisor.served.lock().await;
        for p in prepared {
            let s = supervisor.spawn(p);
            served.insert(s.name(), s);
        }
        drop(served);
        Ok(Running { supervisor })
    }
}

/// Returns once the server has processed everything this client sent before (its
/// subscriptions included). `Client::flush` only empties the socket buffer; this is a real
/// round trip: a message to our own inbox, which the server handles after everything earlier
/// on the connection.
pub async fn round_trip(client: &Client) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.map_err(|e| anyhow::anyhow!("cannot reach NATS: {e}"))?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(|e| anyhow::anyhow!("cannot reach NATS: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut echo)).await {
        Ok(Some(_)) => Ok(()),
        _ => anyhow::bail!("NATS did not answer a round trip within 10s"),
    }
}

/// Handlers bound to NATS and serving.
#[derive(Debug)]
pub struct Running {
    supervisor: Arc<Supervisor>,
}

impl Running {
    /// A handle that reloads the manifests (what a file change, SIGHUP or the admin call do).
    pub fn reloader(&self) -> Reloader {
        Reloader(self.supervisor.clone())
    }

    /// What is being served, and the last reload errors.
    pub fn status(&self) -> Arc<Status> {
        self.supervisor.status.clone()
    }

    /// The NATS connection the runtime uses.
    pub fn client(&self) -> Client {
        self.supervisor.client.clone()
    }

    /// Stops at once, as a crash would: calls in flight are abandoned, nothing more is acked
    /// or marked. For tests of crash recovery (with the `testing` feature); a real process
    /// uses [`shutdown`](Self::shutdown).
    #[cfg(feature = "testing")]
    pub async fn abort(self) {
        let _reloading = self.supervisor.retire().await;
        let served = std::mem::take(&mut *self.supervisor.served.lock().await);
        for s in served.into_values() {
            s.task.abort();
            let _ = s.task.await;
        }
        self.supervisor.stop_relays(Duration::ZERO).await;
    }

    /// Stops taking messages, finishes those already received and in flight, sends their
    /// outputs, and flushes the connection.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        tracing::info!("shutting down: draining subscriptions and in-flight messages");
        // No reload may be half-way while handlers stop, or start afterwards (a watcher, a
        // SIGHUP or the admin route may still ask for one).
        let _reloading = self.supervisor.retire().await;
        let served = std::mem::take(&mut *self.supervisor.served.lock().await);
        for s in served.values() {
            let _ = s.stop.send(true);
        }
        for s in served.into_values() {
            if let Err(e) = s.task.await {
                tracing::error!("a handler task failed: {e}");
            }
        }
        self.supervisor.stop_relays(RELAY_DRAIN).await;
        self.supervisor.stores.lock().await.log_counters();
        let client = &self.supervisor.client;
        if client.connection_state() != async_nats::connection::State::Connected {
            // A flush would wait for a reconnect that may never come. Whatever is still
            // buffered is core NATS traffic (stream outputs and dead letters were acknowledged
            // before their message settled); unsent acks make JetStream redeliver.
            tracing::warn!("NATS is not connected: messages still buffered in the client are not sent");
            return Ok(());
        }
        client.flush().await.map_err(|e| anyhow::anyhow!("cannot flush outputs to NATS: {e}"))?;
        Ok(())
    }

    /// [`shutdown`](Self::shutdown), bounded: past `limit`, or as soon as `interrupt`
    /// completes (a second signal), it stops waiting, logs per handler how many messages it
    /// abandons and what becomes of them, and returns an error.
    pub async fn shutdown_within(self, limit: Duration, interrupt: impl Future<Output = ()>) -> anyhow::Result<()> {
        let supervisor = self.supervisor.clone();
        let handlers: Vec<(String, bool)> = supervisor
            .served
            .lock()
            .await
            .values()
            .map(|s| (s.name(), matches!(s.handler.spec.manifest.source, Source::Core { .. })))
            .collect();
        let cut = tokio::select! {
            done = tokio::time::timeout(limit, self.shutdown()) => match done {
                Ok(result) => return result,
                Err(_) => format!("the shutdown timeout ({}) passed", humantime::format_duration(limit)),
            },
            () = interrupt => "a second signal came".to_owned(),
        };
        let mut abandoned = 0;
        for (name, core) in handlers {
            let held = supervisor.metrics.handler(&name).held();
            if held == 0 {
                continue;
            }
            abandoned += held;
            let fate = if core {
                "they are lost: core NATS does not redeliver"
            } else {
                "JetStream redelivers them after their ack wait"
            };
            tracing::warn!(handler = %name, abandoned = held, "{held} message(s) in flight abandoned; {fate}");
        }
        anyhow::bail!("stopped before the drain finished ({cut}): {abandoned} message(s) in flight abandoned")
    }
}

/// Triggers reloads of a running runtime.
#[derive(Debug, Clone)]
pub struct Reloader(Arc<Supervisor>);

impl Reloader {
    /// Re-reads every manifest and component; see [`ReloadReport`].
    pub async fn reload(&self) -> ReloadReport {
        self.0.reload().await
    }

    /// The files and folders whose changes can change what is served.
    pub(crate) async fn watched(&self) -> Watched {
        self.0.watched().await
    }
}

/// What the runtime depends on, on disk.
#[derive(Debug, Clone, Default)]
pub(crate) struct Watched {
    /// Folders of manifests: any `*.toml` appearing, changing or going there matters.
    pub manifest_dirs: Vec<PathBuf>,
    /// Single files that matter: manifests named one by one, and the components served.
    pub files: Vec<PathBuf>,
}

/// A handler being served: its version, the channel that hands new messages their version,
/// and the serving task. The manifest text it was built from (to tell an edit from a touch)
/// is the handler's own, read once with the manifest.
struct Served {
    handler: Arc<Handler>,
    ctx: watch::Sender<Lane>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Served {
    fn name(&self) -> String {
        self.handler.spec.name.to_string()
    }
}

/// A handler set up (store, streams, subscription or consumer) but not yet serving.
struct Prepared {
    ctx: Lane,
    binding: Binding,
}

#[derive(Debug)]
struct Supervisor {
    engine: Arc<Engine>,
    client: Client,
    /// The secondary cluster, when one is given.
    secondary: Option<async_nats::jetstream::Context>,
    sender: Arc<OutputSender>,
    options: RuntimeOptions,
    paths: Vec<PathBuf>,
    stores: Mutex<Stores>,
    /// The relay of each handler's outbox, kept across versions of the handler.
    relays: Mutex<HashMap<String, Arc<Relay>>>,
    /// Each handler's back-off while the broker refuses it, kept across versions.
    pauses: std::sync::Mutex<HashMap<String, Arc<crate::retry::BrokerPause>>>,
    served: Mutex<BTreeMap<String, Served>>,
    /// Held for the whole of a reload: reloads run one at a time.
    reloading: Mutex<()>,
    /// Set once a shutdown (or an abort) begins: reloads do nothing from then on.
    retired: std::sync::atomic::AtomicBool,
    status: Arc<Status>,
    metrics: Arc<Metrics>,
}

impl fmt::Debug for Served {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Served").field("handler", &self.handler.spec.name).finish_non_exhaustive()
    }
}

impl Supervisor {
    async fn context(&self, handler: Arc<Handler>) -> anyhow::Result<Lane> {
        let scope = match handler.needs_state() {
            true => Some(self.stores.lock().await.scope_for(&handler).await?),
            false => None,
        };
        let metrics = self.metrics.handler(&handler.spec.name);
        let relay = match &scope {
            Some(scope) => self.relay_for(&handler, scope, &metrics).await?,
            None => None,
        };
        let parked = match &handler.spec.manifest.ordering {
            Some(o) if o.on_poison == crate::ordering::OnPoison::Park => {
                let replicas = handler.spec.manifest.store.replicas;
                let js = self.sender.jetstream();
                let parked =
                    crate::parked::Parked::open(js, &handler.spec.name, replicas, metrics.parked_keys()).await?;
                self.status.track_parked(&handler.spec.name, &parked);
                Some(parked)
            }
            _ => None,
        };
        let pause = {
            let mut pauses = self.pauses.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            pauses.entry(handler.spec.name.to_string()).or_default().clone()
        };
        Ok(Lane {
            scope,
            relay,
            parked,
            pause,
            fault: self.options.fault,
            engine: self.engine.clone(),
            handler,
            sender: self.sender.clone(),
            metrics,
        })
    }

    /// The relay of `handler`'s outbox in `scope`'s store: the one already running for an
    /// earlier version on the same store, or a new one (which first sends what a crash left in
    /// the store). `None` when the store has no outbox.
    async fn relay_for(
        &self,
        handler: &Handler,
        scope: &Scope,
        metrics: &Arc<crate::metrics::HandlerMetrics>,
    ) -> anyhow::Result<Option<Arc<Relay>>> {
        let name = handler.spec.name.to_string();
        let mut relays = self.relays.lock().await;
        if let Some(relay) = relays.get(&name) {
            if relay.store().same(scope.store()) {
                return Ok(Some(relay.clone()));
            }
            // Another store now: the old relay sends what it holds, then stops.
            let old = relay.clone();
            tokio::spawn(async move {
                old.drained(RELAY_DRAIN).await;
                old.stop();
            });
        }
        let halt = self.options.fault == Some(Fault::HaltAfterPublish);
        let relay = Relay::start(
            handler.spec.name.clone(),
            scope.store().clone(),
            self.sender.clone(),
            metrics.clone(),
            handler.spec.manifest.store.max_outbox,
            handler.spec.manifest.publish.clone().into(),
            halt,
        )
        .await
        .map_err(|e| anyhow::anyhow!("handler {name}: reading its outbox: {e}"))?;
        match &relay {
            Some(r) => {
                relays.insert(name, r.clone());
            }
            None => {
                relays.remove(&name);
            }
        }
        Ok(relay)
    }

    /// Stops every relay: at once (`limit` zero), or once it has sent what it holds or
    /// `limit` has passed. Logs what is left behind.
    async fn stop_relays(&self, limit: Duration) {
        let relays = std::mem::take(&mut *self.relays.lock().await);
        let deadline = tokio::time::Instant::now() + limit;
        for (name, relay) in relays {
            let left = match limit.is_zero() {
                true => relay.depth(),
                false => relay.drained(deadline.saturating_duration_since(tokio::time::Instant::now())).await,
            };
            relay.stop();
            if left > 0 && !limit.is_zero() {
                let fate = match relay.store().outbox() {
                    Some(true) => "they stay in the state store and are sent on the next start",
                    _ => "they are lost (the memory store does not survive a restart)",
                };
                tracing::warn!(handler = %name, entries = left, "outbox not empty at shutdown: {fate}");
            }
        }
    }

    /// Everything but serving: state store, dead-letter stream, subscription or consumer.
    /// What a crash left in the handler's outbox is sent first (for a while: past that, new
    /// outputs queue behind it).
    async fn prepare(&self, handler: Arc<Handler>) -> anyhow::Result<Prepared> {
        let ctx = self.context(handler).await?;
        if let Some(relay) = &ctx.relay
            && relay.depth() > 0
        {
            let left = relay.drained(RELAY_DRAIN).await;
            if left > 0 {
                tracing::warn!(
                    handler = &*ctx.handler.spec.name,
                    entries = left,
                    "outbox: outputs from the last run not sent yet; serving anyway (new outputs queue behind them)"
                );
            }
        }
        let binding = self.bind_source(&ctx).await?;
        // The subscription is registered with the server before anyone is told it serves.
        round_trip(&self.client).await?;
        Ok(Prepared { ctx, binding })
    }

    async fn bind_source(&self, ctx: &Lane) -> anyhow::Result<Binding> {
        let spec = &ctx.handler.spec;
        if let Some(target) = &spec.manifest.dead_letter {
            dlq::ensure_stream(self.sender.jetstream(), target).await?;
        }
        Ok(match &spec.manifest.source {
            Source::Core { .. } => Binding::Core(source::core::subscribe(&self.client, ctx).await?),
            Source::JetStream(src) => {
                let mut consumers = source::jetstream::bind(self.sender.jetstream(), ctx).await?;
                let secondary = || {
                    self.secondary.as_ref().ok_or_else(|| {
                        anyhow::anyhow!(
                            "handler {}: its manifest reads from the secondary cluster, and no secondary is given \
                             (sluice run --nats-secondary)",
                            spec.name
                        )
                    })
                };
                if src.secondary {
                    let on_secondary = source::jetstream::bind(secondary()?, ctx).await;
                    consumers.extend(on_secondary.map_err(|e| e.context("on the secondary cluster"))?);
                }
                let syphon = match &src.backlog {
                    Some(backlog) => Some(Box::new(
                        source::syphon::Syphon::bind(
                            self.sender.jetstream(),
                            secondary()?,
                            &spec.name,
                            &src.stream,
                            backlog,
                            self.metrics.clone(),
                        )
                        .await?,
                    )),
                    None => None,
                };
                Binding::JetStream(consumers, syphon)
            }
        })
    }

    fn spawn(&self, prepared: Prepared) -> Served {
        let Prepared { ctx, binding } = prepared;
        let handler = ctx.handler.clone();
        let spec = &handler.spec;
        tracing::info!(handler = &*spec.name, source = %spec.manifest.source, digest = handler.short_digest(), "serving");
        self.status.serving(&handler);
        self.metrics.version(&spec.name, &spec.digest, true);
        let (ctx_tx, ctx_rx) = watch::channel(ctx);
        let (stop, stopped) = watch::channel(false);
        let task = match binding {
            Binding::Core(sub) => tokio::spawn(source::core::serve(ctx_rx, sub, stopped)),
            Binding::JetStream(consumers, None) => tokio::spawn(source::jetstream::serve(ctx_rx, consumers, stopped)),
            Binding::JetStream(consumers, Some(syphon)) => {
                let syphon = source::syphon::run(*syphon, stopped.clone());
                let serve = source::jetstream::serve(ctx_rx, consumers, stopped);
                tokio::spawn(async move {
                    futures::future::join(serve, syphon).await;
                })
            }
        };
        Served { handler, ctx: ctx_tx, stop, task }
    }

    /// Ends reloading for good, waiting for one in progress; returns the reload lock.
    async fn retire(&self) -> tokio::sync::MutexGuard<'_, ()> {
        let guard = self.reloading.lock().await;
        self.retired.store(true, std::sync::atomic::Ordering::SeqCst);
        guard
    }

    async fn reload(&self) -> ReloadReport {
        let _one_at_a_time = self.reloading.lock().await;
        let mut report = ReloadReport::default();
        if self.retired.load(std::sync::atomic::Ordering::SeqCst) {
            return report;
        }
        let files = manifest::manifest_files(&self.paths, &mut report.errors);
        // Files that could not be read or parsed: what they described keeps running.
        let mut failed: HashSet<PathBuf> = HashSet::new();
        let mut wanted: Vec<(Manifest, Vec<u8>)> = Vec::new();
        for file in files {
            let loaded = manifest::load(&file).and_then(|m| {
                if let Some((first, _)) = wanted.iter().find(|(w, _)| w.name == m.name) {
                    let what = format!(
                        "duplicate handler name {:?}: {} already declares it",
                        m.name,
                        first.file.path.display()
                    );
                    return Err(m.error_at(m.spans.name.clone(), what));
                }
                let bytes = read_component(&m)?;
                Ok((m, bytes))
            });
            match loaded {
                Ok(w) => wanted.push(w),
                Err(e) => {
                    failed.insert(file);
                    report.errors.push(e);
                }
            }
        }

        let names: HashSet<String> = wanted.iter().map(|(m, _)| m.name.clone()).collect();
        let mut changed = Vec::new();
        for (manifest, bytes) in wanted {
            let unchanged = self.served.lock().await.get(&manifest.name).is_some_and(|s| {
                s.handler.spec.manifest.file.text == manifest.file.text
                    && s.handler.spec.manifest.file.path == manifest.file.path
                    && s.handler.spec.digest == handler::digest(&bytes)
            });
            if !unchanged {
                changed.push((manifest, bytes));
            }
        }
        // Compiling takes a while: off the executor, several components at once.
        let paths: Vec<PathBuf> = changed.iter().map(|(m, _)| m.file.path.clone()).collect();
        let engine = self.engine.clone();
        let compiled =
            tokio::task::spawn_blocking(move || handler::compile_all(&engine, changed.into_iter().map(Ok).collect()))
                .await;
        let compiled: Vec<Result<Handler, ManifestError>> = match compiled {
            Ok(compiled) => compiled,
            Err(e) => paths
                .iter()
                .map(|path| Err(ManifestError::without_location(path, format!("compiling failed: {e}"))))
                .collect(),
        };
        for (loaded, path) in compiled.into_iter().zip(paths) {
            let handler = match loaded {
                Ok(h) => Arc::new(h),
                Err(e) => {
                    failed.insert(path);
                    report.errors.push(e);
                    continue;
                }
            };
            let name = handler.spec.name.to_string();
            if let Some(hook) = &self.options.hooks.before_install {
                hook(&name);
            }
            match self.install(handler).await {
                Ok(Installed::Started) => report.started.push(name),
                Ok(Installed::Updated) => report.updated.push(name),
                Err(e) => {
                    failed.insert(path.clone());
                    report.errors.push(ManifestError::without_location(&path, format!("{e:#}")));
                }
            }
        }

        // Handlers whose manifest is gone (and not merely broken) drain and stop.
        let gone: Vec<String> = {
            let served = self.served.lock().await;
            served
                .iter()
                .filter(|(name, s)| !names.contains(*name) && !failed.contains(&s.handler.spec.manifest.file.path))
                .map(|(name, _)| name.clone())
                .collect()
        };
        for name in gone {
            if let Some(s) = self.served.lock().await.remove(&name) {
                tracing::info!(handler = %name, "manifest removed: draining and stopping");
                let _ = s.stop.send(true);
                let _ = s.task.await;
                if let Some(relay) = self.relays.lock().await.remove(&name) {
                    tokio::spawn(async move {
                        relay.drained(RELAY_DRAIN).await;
                        relay.stop();
                    });
                }
                self.status.stopped(&name);
                self.metrics.version(&name, &s.handler.spec.digest, false);
                report.stopped.push(name);
            }
        }
        self.status.reloaded(&report);
        for e in &report.errors {
            tracing::error!("reload: the previous version keeps serving:\n{e}");
        }
        if !(report.started.is_empty() && report.updated.is_empty() && report.stopped.is_empty()) {
            tracing::info!(started = ?report.started, updated = ?report.updated, stopped = ?report.stopped, "reloaded");
        }
        report
    }

    /// Puts a new version in service. Same source and concurrency: new messages get the new
    /// version at once and in-flight ones finish on the old. Otherwise the new binding is
    /// made first, then the old one drains and stops.
    async fn install(&self, handler: Arc<Handler>) -> anyhow::Result<Installed> {
        let name = handler.spec.name.to_string();
        let current = self.served.lock().await.get(&name).map(|s| s.handler.clone());
        let Some(old) = current else {
            let prepared = self.prepare(handler).await?;
            let served = self.spawn(prepared);
            self.served.lock().await.insert(name, served);
            return Ok(Installed::Started);
        };
        let rebind = old.spec.manifest.source != handler.spec.manifest.source
            || old.spec.manifest.limits.max_concurrency != handler.spec.manifest.limits.max_concurrency
            || old.spec.manifest.limits.rate != handler.spec.manifest.limits.rate
            || old.spec.manifest.ordering != handler.spec.manifest.ordering;
        if rebind {
            let prepared = self.prepare(handler.clone()).await?;
            // An ordered handler's old binding stops before the new one starts, so that
            // what waited behind its keys goes back to the broker (and comes back first)
            // before the new binding takes later messages of those keys.
            let ordered = old.spec.manifest.ordering.is_some() || handler.spec.manifest.ordering.is_some();
            let mut stopped = None;
            if ordered && let Some(mut previous) = self.served.lock().await.remove(&name) {
                tracing::info!(handler = %name, "ordered handler re-bound: the old binding stops first");
                let _ = previous.stop.send(true);
                let _ = (&mut previous.task).await;
                stopped = Some(previous);
            }
            let fresh = self.spawn(prepared);
            let previous = self.served.lock().await.insert(name.clone(), fresh).or(stopped);
            if let Some(previous) = previous {
                if !previous.task.is_finished() {
                    tracing::info!(handler = %name, digest = handler.short_digest(), "source changed: re-bound; the old binding drains");
                    let _ = previous.stop.send(true);
                    let _ = previous.task.await;
                }
                if previous.handler.spec.digest != handler.spec.digest {
                    self.metrics.version(&name, &previous.handler.spec.digest, false);
                }
            }
        } else {
            let ctx = self.context(handler.clone()).await?;
            let mut served = self.served.lock().await;
            if let Some(s) = served.get_mut(&name) {
                s.ctx.send_replace(ctx);
                s.handler = handler.clone();
            }
            self.status.serving(&handler);
            self.metrics.version(&name, &old.spec.digest, false);
            self.metrics.version(&name, &handler.spec.digest, true);
            tracing::info!(handler = %name, from = old.short_digest(), to = handler.short_digest(), "swapped to a new version");
        }
        Ok(Installed::Updated)
    }

    async fn watched(&self) -> Watched {
        let mut watched = Watched::default();
        for p in &self.paths {
            if p.is_dir() {
                watched.manifest_dirs.push(p.clone());
            } else {
                watched.files.push(p.clone());
            }
        }
        for s in self.served.lock().await.values() {
            watched.files.push(s.handler.spec.manifest.component.clone());
        }
        watched.files.sort();
        watched.files.dedup();
        watched
    }
}

enum Installed {
    Started,
    Updated,
}

/// The stores of a runtime: one redb database (opened on first need), a memory store and
/// KV buckets per handler.
#[derive(Debug)]
struct Stores {
    #[cfg_attr(not(feature = "redb"), allow(dead_code))]
    data_dir: Option<PathBuf>,
    #[cfg(feature = "redb")]
    redb: Option<store::RedbStore>,
    /// Each handler's memory store (by name and bound), kept across versions of the handler.
    memory: HashMap<(String, usize), Arc<store::MemoryStore>>,
    /// The counters of every nats-kv store (one per handler).
    kv_counters: Arc<store::Counters>,
    #[cfg_attr(not(feature = "nats-kv"), allow(dead_code))]
    js: async_nats::jetstream::Context,
}

impl Stores {
    fn new(options: &RuntimeOptions, js: async_nats::jetstream::Context) -> Self {
        Stores {
            data_dir: options.data_dir.clone(),
            #[cfg(feature = "redb")]
            redb: None,
            memory: HashMap::new(),
            kv_counters: Arc::default(),
            js,
        }
    }

    /// Logs what the stores did (`store=... reads=... writes=... transactions=...`): the
    /// benchmark reads these lines for its per-message store costs.
    fn log_counters(&self) {
        #[cfg(feature = "redb")]
        if let Some(redb) = &self.redb {
            let (reads, writes, transactions) = redb.counters().snapshot();
            tracing::info!(store = "redb", reads, writes, transactions, "state store counters");
        }
        let (reads, writes, _) = self.kv_counters.snapshot();
        if reads + writes > 0 {
            tracing::info!(store = "nats-kv", reads, writes, "state store counters");
        }
    }

    async fn scope_for(&mut self, handler: &Handler) -> anyhow::Result<Scope> {
        let spec = &handler.spec;
        let store = match spec.manifest.store.backend {
            Backend::Memory => {
                let max = spec.manifest.store.max_entries;
                let memory = self
                    .memory
                    .entry((spec.name.to_string(), max))
                    .or_insert_with(|| Arc::new(store::MemoryStore::new(max)));
                store::Store::Memory(memory.clone())
            }
            #[cfg(feature = "redb")]
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
            #[cfg(feature = "nats-kv")]
            Backend::NatsKv => {
                let kv = store::KvStore::new(self.js.clone(), spec.manifest.store.replicas, self.kv_counters.clone());
                kv.prepare(&spec.name).await.map_err(|e| anyhow::anyhow!("handler {}: {e}", spec.name))?;
                store::Store::Kv(Box::new(kv))
            }
            // A manifest that names a backend this build lacks is refused where it says so;
            // this is the default (`redb`) in a build without it.
            #[allow(unreachable_patterns)]
            other => anyhow::bail!(
                "handler {} needs a state store, and this build of Sluice has no {} store (the default; built \
                 without the cargo feature `{}`): set [store] backend = \"memory\"",
                spec.name,
                other.name(),
                other.name()
            ),
        };
        // Outbound HTTP, and the guest's `dedup` marks (written as they are set), are effects
        // outside the commit: such a handler keeps the lease that stops two processes from
        // running one key at once. (Two runs at once could each see the other's mark, and the
        // run whose commit wins skip what its mark guarded.)
        let outside = spec.manifest.http.is_some() || handler.imports_marks;
        Ok(Scope::new(store, spec.name.clone()).effects_outside_commit(outside))
    }
}
