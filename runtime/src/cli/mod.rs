//! The `sluice` command line: `run`, `validate`, `test`, `new`, `publish`, `request`, `dlq`,
//! `ordering`, `status`.

mod dlq;
mod new;
mod ordering;
mod test;

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_nats::{Client, ConnectOptions, HeaderMap};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::connect::{NatsArgs, Target};
use crate::engine::EngineOptions;
use crate::manifest::{ByteSize, HumanDuration};
use crate::metrics::Metrics;
use crate::nats_server::NatsServer;
use crate::runtime::{LoadError, Runtime, RuntimeOptions};

/// The NATS URL used when none is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Reliable NATS message processing with sandboxed WebAssembly handlers.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    /// The subcommand.
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
/// The format of the log lines on stderr.
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
/// The subcommands.
pub enum Command {
    /// Load the manifests in PATHS (files or folders) and serve their handlers.
    ///
    /// Without --nats, uses the server at nats://127.0.0.1:4222, and when nothing answers
    /// there starts a local nats-server (with JetStream, in a temporary folder) for as long
    /// as Sluice runs.
    Run(RunArgs),
    /// Check manifests and their components without connecting to NATS. Exit code 1 and
    /// located errors when anything is wrong.
    Validate(ValidateArgs),
    /// Run a handler once on one message, here, with no NATS server (an in-memory store),
    /// and print the outcome, the outputs and reply it would send, and its logs. Exit code
    /// 0 when it succeeded, 1 when it failed, 2 when the input is unusable.
    Test(test::TestArgs),
    /// Create a handler to start from: source, build script, manifest and a test message.
    New(new::NewArgs),
    /// Publish one message.
    Publish(SendArgs),
    /// Send a request and print the reply.
    Request(RequestArgs),
    /// Inspect and replay a dead-letter stream.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// The parked keys of an ordered handler (`on_poison = "park"`): list, release.
    #[command(subcommand)]
    Ordering(ordering::OrderingCommand),
    /// A table of the handlers a running Sluice serves (from its admin listener).
    Status(StatusArgs),
}

#[derive(Debug, Args)]
/// The flags of `sluice status`.
pub struct StatusArgs {
    /// The admin listener of the Sluice to ask.
    #[arg(long, env = "SLUICE_ADMIN_URL", default_value = "http://127.0.0.1:9090")]
    pub admin: String,
    /// The bearer token the admin listener requires (sluice run --admin-token).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
/// The flags of `sluice run`.
pub struct RunArgs {
    /// Manifest files or folders of manifests.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    #[command(flatten)]
    /// The NATS connection.
    pub nats: NatsArgs,
    /// Do not watch the manifests and components for changes (SIGHUP still reloads).
    #[arg(long)]
    pub no_watch: bool,
    /// Serve /metrics, /healthz, /readyz, /handlers and POST /reload on this address (for
    /// example 127.0.0.1:9090). Off unless given; prefer a loopback address.
    #[arg(long, env = "SLUICE_ADMIN")]
    pub admin: Option<std::net::SocketAddr>,
    /// How long a shutdown (SIGTERM, Ctrl-C) may drain in-flight messages. Past it, Sluice
    /// logs what it abandons and exits with an error; a second signal exits at once.
    #[arg(long, env = "SLUICE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: HumanDuration,
    /// Require `Authorization: Bearer TOKEN` on /handlers and POST /reload (/metrics,
    /// /healthz and /readyz stay open).
    #[arg(long, env = "SLUICE_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    #[command(flatten)]
    /// The secondary cluster, if any.
    pub secondary: SecondaryArgs,
    #[command(flatten)]
    /// The engine and local state.
    pub engine: EngineArgs,
}

/// A secondary NATS cluster for `sluice run` (README, "Two clusters"): outputs the primary
/// does not take go there, handlers may read a stream on both clusters and have their backlog
/// moved back. Its authentication: `user:password@` in a URL, a credentials file, or a `nats`
/// CLI context for everything else (NKey, TLS client certificates).
#[derive(Debug, Default, Args)]
pub struct SecondaryArgs {
    /// The secondary cluster's server URLs, comma-separated (no secondary unless given).
    #[arg(long = "nats-secondary", env = "SLUICE_NATS_SECONDARY_URL", value_delimiter = ',', hide_env_values = true)]
    pub secondary_urls: Vec<String>,
    /// A `nats` CLI context for the secondary cluster.
    #[arg(long = "secondary-context", env = "SLUICE_NATS_SECONDARY_CONTEXT")]
    pub secondary_context: Option<String>,
    /// A credentials file for the secondary cluster.
    #[arg(long = "secondary-creds", env = "SLUICE_NATS_SECONDARY_CREDS")]
    pub secondary_creds: Option<PathBuf>,
    /// CA certificate(s) to trust for the secondary cluster's servers (PEM).
    #[arg(long = "secondary-tls-ca", env = "SLUICE_NATS_SECONDARY_TLS_CA")]
    pub secondary_tls_ca: Option<PathBuf>,
}

impl SecondaryArgs {
    /// The secondary's connection flags, when a secondary is given.
    fn nats(&self) -> Option<NatsArgs> {
        if self.secondary_urls.is_empty() && self.secondary_context.is_none() {
            return None;
        }
        Some(NatsArgs {
            urls: self.secondary_urls.clone(),
            context: self.secondary_context.clone(),
            creds: self.secondary_creds.clone(),
            tls_ca: self.secondary_tls_ca.clone(),
            ..NatsArgs::default()
        })
    }
}

impl EngineArgs {
    fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let state = std::env::var_os("XDG_STATE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")));
        state.map_or_else(|| PathBuf::from(".sluice"), |s| s.join("sluice"))
    }
}

#[derive(Debug, Args)]
/// The flags of `sluice validate`.
pub struct ValidateArgs {
    /// Manifest files or folders of manifests.
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
    /// Keep the compiled components in the compile cache (as `run` does), so that a `run`
    /// afterwards starts without compiling. Off by default: validating compiles everything
    /// and leaves the cache as it was.
    #[arg(long)]
    pub cache: bool,
    #[command(flatten)]
    /// The engine and local state.
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
/// The engine's flags, shared by `run` and `validate`.
pub struct EngineArgs {
    /// The largest memory limit a manifest may set.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub max_memory: ByteSize,
    /// Instances alive at once across all handlers.
    #[arg(long, default_value_t = 1000)]
    pub max_instances: u32,
    /// Where local state lives: the redb store and the compiled-component cache. Default:
    /// $XDG_STATE_HOME/sluice, or ~/.local/state/sluice.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Compile every component, without reading or filling the cache.
    #[arg(long)]
    pub no_compile_cache: bool,
    /// Threads that run handler calls, apart from the NATS I/O threads (default: one per
    /// core). 0 runs calls on the I/O threads: faster per message, but a handler that
    /// computes until its timeout then slows every other handler.
    #[arg(long, env = "SLUICE_GUEST_THREADS")]
    pub guest_threads: Option<usize>,
}

impl EngineArgs {
    fn options(&self) -> EngineOptions {
        EngineOptions {
            max_memory: self.max_memory.0,
            max_instances: self.max_instances,
            cache_dir: (!self.no_compile_cache).then(|| self.data_dir().join("compiled")),
            guest_threads: self.guest_threads,
        }
    }
}

#[derive(Debug, Args)]
/// The flags of `sluice publish`.
pub struct SendArgs {
    /// Subject to send to.
    pub subject: String,
    /// Payload (default: empty).
    #[arg(default_value = "")]
    pub payload: String,
    /// A header, as NAME:VALUE (repeatable).
    #[arg(short = 'H', long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    #[command(flatten)]
    /// The NATS connection.
    pub nats: NatsArgs,
}

#[derive(Debug, Args)]
/// The flags of `sluice request`.
pub struct RequestArgs {
    #[command(flatten)]
    /// The message to send.
    pub send: SendArgs,
    /// How long to wait for the reply.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub timeout: HumanDuration,
}

fn parse_size(text: &str) -> Result<ByteSize, String> {
    text.parse::<bytesize::ByteSize>().map(|b| ByteSize(b.as_u64())).map_err(|e| format!("invalid size {text:?}: {e}"))
}

fn parse_duration(text: &str) -> Result<HumanDuration, String> {
    humantime::parse_duration(text).map(HumanDuration).map_err(|e| format!("invalid duration {text:?}: {e}"))
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    let (name, value) = text.split_once(':').ok_or_else(|| format!("expected NAME:VALUE, got {text:?}"))?;
    Ok((name.trim().to_owned(), value.trim().to_owned()))
}

/// Runs the command line; returns the process exit status.
pub async fn run_command(cli: Cli) -> u8 {
    let result = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Validate(args) => return validate(&args),
        Command::Test(args) => return test::run(args).await,
        Command::New(args) => new::run(&args),
        Command::Publish(args) => publish(args).await,
        Command::Request(args) => return request(args).await,
        Command::Dlq(command) => dlq::run(command).await,
        Command::Ordering(command) => ordering::run(command).await,
        Command::Status(args) => status(args).await,
    };
    match result {
        Ok(()) => 0,
        Err(e) => failed(&e),
    }
}

/// Prints `e`; exit code 2 when NATS refused the connection (or its settings are unusable),
/// so scripts can tell "cannot connect" from a failed command.
fn failed(e: &anyhow::Error) -> u8 {
    if let Some(refused) = e.downcast_ref::<crate::connect::ConnectError>() {
        eprintln!("error: {refused}");
        return 2;
    }
    eprintln!("error: {e:#}");
    1
}

fn validate(args: &ValidateArgs) -> u8 {
    // Nothing runs: no guest threads.
    let mut engine = EngineOptions { guest_threads: Some(0), ..args.engine.options() };
    if !args.cache {
        engine.cache_dir = None;
    }
    match Runtime::load(&args.paths, RuntimeOptions { engine, ..Default::default() }) {
        Ok(runtime) if runtime.handlers().is_empty() => {
            let paths: Vec<String> = args.paths.iter().map(|p| p.display().to_string()).collect();
            eprintln!("error: no manifests (*.toml) found in {}", paths.join(", "));
            1
        }
        Ok(runtime) => {
            for h in runtime.handlers() {
                println!(
                    "ok: {} ({}) serves {} with {}",
                    h.spec.name,
                    h.spec.manifest.file.path.display(),
                    h.spec.manifest.source,
                    h.spec.digest
                );
            }
            0
        }
        Err(LoadError::Invalid(errors)) => {
            let n = errors.len();
            eprintln!("{}\n\nerror: {n} invalid manifest{}", LoadError::Invalid(errors), if n == 1 { "" } else { "s" });
            1
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            1
        }
    }
}

/// A load error for `run`, which prints it after one `error: `.
fn load_error(e: LoadError) -> anyhow::Error {
    match e {
        LoadError::Invalid(errors) => {
            let n = errors.len();
            let what = if n == 1 { "invalid manifest" } else { "invalid manifests" };
            anyhow::anyhow!("{n} {what}:\n\n{}", LoadError::Invalid(errors))
        }
        other => anyhow::Error::new(other),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let options =
        RuntimeOptions { engine: args.engine.options(), data_dir: Some(args.engine.data_dir()), ..Default::default() };
    let runtime = Runtime::load(&args.paths, options).map_err(load_error)?;
    if runtime.handlers().is_empty() {
        tracing::info!("no manifests yet: serving nothing until manifests appear");
    }
    let admin = match args.admin {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} for the admin routes"))?;
            // The address actually bound: with port 0 the system picks one.
            let bound = listener.local_addr().unwrap_or(addr);
            let state =
                crate::admin::AdminState::new(runtime.metrics(), runtime.status()).with_token(args.admin_token.clone());
            let task = crate::admin::serve(listener, state.clone());
            tracing::info!("admin listener on http://{bound} (/metrics, /healthz, /readyz, /handlers, POST /reload)");
            Some((state, AbortOnDrop(task)))
        }
        None => None,
    };
    // Keep the embedded server (if any) alive until Sluice has shut down.
    let metrics = runtime.metrics();
    let (client, _embedded) = connect_or_embed(&args.nats, Some(&metrics)).await?;
    let secondary = match args.secondary.nats() {
        Some(nats) => {
            let target = nats.target(DEFAULT_NATS_URL)?;
            let client = connect_observed(&target, None).await.context("the secondary cluster")?;
            tracing::info!("connected to the secondary NATS cluster url={}", target.shown());
            Some(client)
        }
        None => None,
    };
    let running = runtime.bind_clusters(client, secondary).await?;
    if let Some((state, _)) = &admin {
        state.bound(running.client(), running.reloader());
    }
    let _watcher = match args.no_watch {
        true => None,
        false => Some(crate::reload::Watcher::start(running.reloader())?),
    };
    let _sighup = reload_on_sighup(running.reloader());
    let mut signals = ShutdownSignals::new();
    tracing::info!("ready; stop with Ctrl-C or SIGTERM, reload with SIGHUP");
    signals.next().await;
    tracing::info!(
        "shutting down (within {}; a second Ctrl-C or SIGTERM stops at once)",
        humantime::format_duration(args.shutdown_timeout.0)
    );
    running.shutdown_within(args.shutdown_timeout.0, signals.next()).await
}

/// Connects as `nats` says; with no URL or context, to the default URL, starting an embedded
/// server when nothing answers there.
async fn connect_or_embed(
    nats: &NatsArgs,
    metrics: Option<&Arc<Metrics>>,
) -> anyhow::Result<(Client, Option<NatsServer>)> {
    if !nats.is_default() {
        let target = nats.target(DEFAULT_NATS_URL)?;
        let client = connect_observed(&target, metrics).await?;
        tracing::info!("connected to NATS url={}", target.shown());
        return Ok((client, None));
    }
    let target = nats.target(DEFAULT_NATS_URL)?;
    if let Ok(client) = connect_observed(&target, metrics).await {
        tracing::info!("connected to NATS url={DEFAULT_NATS_URL}");
        return Ok((client, None));
    }
    let port_free = std::net::TcpListener::bind(("127.0.0.1", 4222)).is_ok();
    let server = NatsServer::start(if port_free { 4222 } else { 0 })
        .context("no NATS server answered on nats://127.0.0.1:4222 and the embedded one could not start")?;
    tracing::info!(
        url = %server.url(),
        data = %server.dir().display(),
        "no NATS server answered on {DEFAULT_NATS_URL}; started an embedded nats-server with JetStream (stopped when Sluice exits)"
    );
    let client = connect_observed(&Target::url(&server.url()), metrics).await?;
    tracing::info!("connected to NATS url={}", server.url());
    Ok((client, Some(server)))
}

/// Connects with Sluice's options: a name, a short initial timeout, endless reconnects.
pub async fn connect(url: &str) -> anyhow::Result<Client> {
    connect_observed(&Target::url(url), None).await
}

/// Connects as the NATS flags say (for `publish`, `request` and `dlq`).
pub async fn connect_args(nats: &NatsArgs) -> anyhow::Result<Client> {
    connect_observed(&nats.target(DEFAULT_NATS_URL)?, None).await
}

/// Like [`connect`], counting the connection's state and reconnects in `metrics`, and
/// following a server's lame-duck mode: when the server Sluice is connected to announces it
/// is going away (`nats-server --signal ldm`, a rolling upgrade), Sluice reconnects to another
/// server of the cluster at once, before the server starts closing connections, instead of
/// losing the connection midway through its work. With no other server known (a single URL
/// and no cluster gossip), it stays until the server closes the connection.
pub async fn connect_observed(target: &Target, metrics: Option<&Arc<Metrics>>) -> anyhow::Result<Client> {
    let mut options: ConnectOptions = target.options().await?;
    let this: Arc<std::sync::OnceLock<Client>> = Arc::default();
    let seen_connect = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drops_warned = Arc::new(Mutex::new(None::<std::time::Instant>));
    let (metrics, client) = (metrics.cloned(), this.clone());
    options = options.event_callback(move |event| {
        let (metrics, seen_connect, drops_warned, client) =
            (metrics.clone(), seen_connect.clone(), drops_warned.clone(), client.clone());
        async move {
            match event {
                async_nats::Event::Connected => {
                    let again = seen_connect.swap(true, std::sync::atomic::Ordering::Relaxed);
                    if let Some(metrics) = &metrics {
                        metrics.nats_connected.set(1.0);
                        if again {
                            metrics.nats_reconnects.increment(1);
                        }
                    }
                    let server = client.get().map(|c| c.server_info().server_name).unwrap_or_default();
                    tracing::info!(server = %server, "NATS connected");
                }
                async_nats::Event::Disconnected => {
                    if let Some(metrics) = &metrics {
                        metrics.nats_connected.set(0.0);
                    }
                    tracing::warn!("NATS disconnected; reconnecting");
                }
                async_nats::Event::SlowConsumer(sid) => {
                    // Every drop is counted; the warning is repeated at most every 10 s.
                    if let Some(metrics) = &metrics {
                        metrics.nats_dropped.increment(1);
                    }
                    let now = std::time::Instant::now();
                    let mut last = drops_warned.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if last.is_none_or(|at| now.duration_since(at) > Duration::from_secs(10)) {
                        *last = Some(now);
                        tracing::warn!(
                            subscription = sid,
                            "core NATS messages dropped: a subscription's buffer is full (the handler cannot \
                             keep up; see sluice_nats_slow_consumer_drops_total, and raise max_concurrency \
                             or add processes to the queue group)"
                        );
                    }
                }
                async_nats::Event::ServerError(e) => tracing::warn!("NATS server error: {e}"),
                async_nats::Event::LameDuckMode => {
                    if let Some(client) = client.get() {
                        follow_lame_duck(client).await;
                    }
                }
                other => tracing::debug!("NATS event: {other}"),
            }
        }
    });
    let client = target.connect(options).await?;
    // Before the first event that needs it can arrive: events are delivered after connect.
    let _ = this.set(client.clone());
    Ok(client)
}

/// The server `client` is connected to entered lame-duck mode: reconnect elsewhere when the
/// pool knows another server (the lame duck refuses new connections, so the reconnect lands
/// on another node; subscriptions, JetStream pulls and queue-group memberships are renewed
/// there by the client).
async fn follow_lame_duck(client: &Client) {
    let server = client.server_info().server_name;
    let others = match client.server_pool().await {
        Ok(pool) => pool.len().saturating_sub(1),
        Err(e) => {
            tracing::warn!(server = %server, "the NATS server is entering lame duck mode; its server pool is unknown: {e}");
            return;
        }
    };
    if others == 0 {
        tracing::warn!(
            server = %server,
            "the NATS server is entering lame duck mode and no other server is known; staying until it closes the \
             connection (give every URL of the cluster with --nats)"
        );
        return;
    }
    tracing::warn!(server = %server, "the NATS server is entering lame duck mode; reconnecting to another server of the cluster");
    if let Err(e) = client.force_reconnect().await {
        tracing::warn!(server = %server, "cannot reconnect away from the lame-duck server: {e}");
    }
}

/// Reloads on every SIGHUP, until the returned task is dropped with the runtime.
fn reload_on_sighup(reloader: crate::Reloader) -> Option<AbortOnDrop> {
    #[cfg(unix)]
    {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("cannot listen for SIGHUP: {e}");
                return None;
            }
        };
        Some(AbortOnDrop(tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading");
                reloader.reload().await;
            }
        })))
    }
    #[cfg(not(unix))]
    {
        let _ = reloader;
        None
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// SIGINT (Ctrl-C) and SIGTERM, as a sequence: the first asks for a graceful shutdown, the
/// second for an immediate one.
struct ShutdownSignals {
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
}

impl ShutdownSignals {
    /// Listens from now on (a signal arriving before [`next`](Self::next) is not missed).
    fn new() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| match signal(kind) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("cannot listen for {name}: {e}");
                    None
                }
            };
            ShutdownSignals {
                int: listen(SignalKind::interrupt(), "SIGINT"),
                term: listen(SignalKind::terminate(), "SIGTERM"),
            }
        }
        #[cfg(not(unix))]
        ShutdownSignals {}
    }

    /// The next SIGINT or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        {
            async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
                match s {
                    Some(s) => {
                        s.recv().await;
                    }
                    None => std::future::pending().await,
                }
            }
            tokio::select! {
                () = recv(&mut self.int) => {}
                () = recv(&mut self.term) => {}
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let url = format!("{}/handlers", args.admin.trim_end_matches('/'));
    let report: crate::admin::HandlersReport = tokio::task::spawn_blocking(move || {
        let mut request = ureq::get(&url);
        if let Some(token) = &args.admin_token {
            request = request.header("Authorization", &format!("Bearer {token}"));
        }
        let mut response = request.call().with_context(|| format!("cannot reach {url}"))?;
        let body = response.body_mut().read_to_string().with_context(|| format!("cannot read the answer of {url}"))?;
        serde_json::from_str::<crate::admin::HandlersReport>(&body)
            .with_context(|| format!("unexpected answer from {url}"))
    })
    .await??;
    println!(
        "{:<20}  {:<14}  {:<32}  {:>9}  {:>9}  {:>7}  {:>7}  {:>7}  {:>4}  {:>6}",
        "HANDLER", "VERSION", "SOURCE", "RECEIVED", "SUCCEEDED", "RETRIED", "DEAD", "DUPS", "BUSY", "OUTBOX"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    for h in &report.handlers {
        let s = &h.status;
        let c = &h.counters;
        let version = s.digest.trim_start_matches("sha256:").chars().take(12).collect::<String>();
        println!(
            "{:<20}  {:<14}  {:<32}  {:>9}  {:>9}  {:>7}  {:>7}  {:>7}  {:>4}  {:>6}",
            s.name,
            version,
            s.source,
            c.received,
            c.succeeded,
            c.retried,
            c.dead_lettered,
            c.skipped_duplicates,
            c.in_flight,
            c.outbox
        );
        if c.outbox > 0 && c.outbox_oldest_ms > 0 {
            let age = now_ms.saturating_sub(c.outbox_oldest_ms) / 1000;
            println!("  outbox: {} outputs waiting to be sent, the oldest for {age}s", c.outbox);
        }
        if let Some(e) = &s.last_reload_error {
            println!("  last reload failed; still serving the version above:\n{}", indent(e));
        }
    }
    for (file, e) in &report.reload_errors {
        if !report.handlers.iter().any(|h| &h.status.manifest == file) {
            println!("{file}: not loaded:\n{}", indent(e));
        }
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n")
}

fn header_map(pairs: &[(String, String)]) -> anyhow::Result<HeaderMap> {
    crate::outputs::header_map(pairs.iter().cloned()).map_err(anyhow::Error::msg)
}

async fn publish(args: SendArgs) -> anyhow::Result<()> {
    let client = connect_args(&args.nats).await?;
    let headers = header_map(&args.headers)?;
    client.publish_with_headers(args.subject, headers, args.payload.into_bytes().into()).await?;
    client.flush().await?;
    Ok(())
}

async fn request(args: RequestArgs) -> u8 {
    match request_inner(args).await {
        Ok(code) => code,
        Err(e) => failed(&e),
    }
}

async fn request_inner(args: RequestArgs) -> anyhow::Result<u8> {
    let client = connect_args(&args.send.nats).await?;
    let request = async_nats::Request::new()
        .headers(header_map(&args.send.headers)?)
        .payload(args.send.payload.into_bytes().into())
        .timeout(Some(args.timeout.0));
    let reply = client
        .send_request(args.send.subject.clone(), request)
        .await
        .with_context(|| format!("no reply on {} within {}", args.send.subject, args.timeout))?;
    if let Some(kind) = reply.headers.as_ref().and_then(|h| h.get("Sluice-Failure-Kind")) {
        let reason = reply.headers.as_ref().and_then(|h| h.get("Sluice-Failure-Reason"));
        eprintln!("error: handler failed ({kind}): {}", reason.map(|r| r.as_str()).unwrap_or(""));
        return Ok(1);
    }
    let mut out = std::io::stdout().lock();
    out.write_all(&reply.payload)?;
    if !reply.payload.ends_with(b"\n") {
        out.write_all(b"\n")?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    /// clap's own consistency checks (unique argument ids, ...), which otherwise run only
    /// when a debug build parses its arguments.
    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_secondary_cluster_has_flags_of_its_own() {
        let cli = Cli::try_parse_from([
            "sluice",
            "run",
            "manifests",
            "--nats",
            "nats://primary:4222",
            "--nats-secondary",
            "nats://a:4222,nats://b:4222",
            "--secondary-creds",
            "s.creds",
        ])
        .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(run) = cli.command else { panic!("not run") };
        assert_eq!(run.nats.urls, ["nats://primary:4222"]);
        assert_eq!(run.nats.creds, None);
        let secondary = run.secondary.nats().unwrap_or_else(|| panic!("no secondary"));
        assert_eq!(secondary.urls, ["nats://a:4222", "nats://b:4222"]);
        assert_eq!(secondary.creds.as_deref(), Some(std::path::Path::new("s.creds")));
        let without = Cli::try_parse_from(["sluice", "run", "manifests"]).unwrap_or_else(|e| panic!("{e}"));
        let Command::Run(run) = without.command else { panic!("not run") };
        assert!(run.secondary.nats().is_none());
    }
}
