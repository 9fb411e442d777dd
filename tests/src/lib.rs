//! The integration-test fixture: a real `nats-server` per test (free port, temporary folder,
//! killed on drop), the guest plugins built once per test process, and Sluice runtimes
//! started in-process from manifest text.

#![allow(clippy::unwrap_used)] // a fixture failure should fail the test loudly

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Once, OnceLock};
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use sluice::testing::NatsServer;
use sluice::{Running, Runtime, RuntimeOptions};

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

/// The component file of plugin `name`, building every plugin first (once per process).
pub fn plugin(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = repo_root().join("scripts/build-plugins.sh");
        let status = Command::new("bash").arg(&script).status().map_err(|e| e.to_string())?;
        if status.success() { Ok(()) } else { Err(format!("{} failed: {status}", script.display())) }
    });
    if let Err(e) = built {
        panic!("cannot build the plugins: {e} (is the wasm32-wasip2 target installed? run `make tools`)");
    }
    let path = repo_root().join("plugins/dist").join(format!("{name}.wasm"));
    assert!(path.is_file(), "no plugin {name} at {}", path.display());
    path
}

/// Test logs go to the test's captured output; `RUST_LOG` selects them.
pub fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A real nats-server for one test.
pub fn nats() -> NatsServer {
    init_logging();
    NatsServer::start(0).expect("cannot start nats-server")
}

/// A client of `server`.
pub async fn client(server: &NatsServer) -> Client {
    sluice::cli::connect(&server.url()).await.unwrap()
}

/// A manifest for `plugin`, named `name`, on `subject`, with `extra` TOML appended (further
/// sections such as `[limits]`).
pub fn manifest(name: &str, plugin_name: &str, subject: &str, extra: &str) -> String {
    format!(
        "[handler]\nname = \"{name}\"\ncomponent = \"{}\"\n\n[source]\nsubject = \"{subject}\"\n\n{extra}\n",
        plugin(plugin_name).display()
    )
}

/// A Sluice runtime serving manifests written to a temporary folder.
#[derive(Debug)]
pub struct Sluice {
    running: Option<Running>,
    watcher: Option<sluice::Watcher>,
    metrics: std::sync::Arc<sluice::Metrics>,
    pub dir: tempfile::TempDir,
}

impl Sluice {
    /// Writes `manifests` (file name, TOML) and serves them on `server`. Returns once every
    /// handler is subscribed.
    pub async fn start(server: &NatsServer, manifests: &[(&str, String)]) -> Sluice {
        Self::try_start(server, manifests).await.unwrap_or_else(|e| panic!("cannot start Sluice: {e:#}"))
    }

    /// Like [`start`](Self::start), returning bind errors (a conflicting consumer, ...).
    pub async fn try_start(server: &NatsServer, manifests: &[(&str, String)]) -> anyhow::Result<Sluice> {
        let dir = tempfile::tempdir()?;
        let options = RuntimeOptions { data_dir: Some(dir.path().join("data")), ..RuntimeOptions::default() };
        Self::start_with(server, manifests, dir, options).await
    }

    /// Starts with explicit options (a shared data directory, an injected fault); the
    /// manifests are written to `dir`.
    pub async fn start_with(
        server: &NatsServer,
        manifests: &[(&str, String)],
        dir: tempfile::TempDir,
        options: RuntimeOptions,
    ) -> anyhow::Result<Sluice> {
        Self::start_connected(client(server).await, manifests, dir, options).await
    }

    /// Like [`start_with`](Self::start_with), on a connection the test made (with
    /// credentials, TLS, ...).
    pub async fn start_connected(
        nc: Client,
        manifests: &[(&str, String)],
        dir: tempfile::TempDir,
        options: RuntimeOptions,
    ) -> anyhow::Result<Sluice> {
        Self::start_clusters(nc, None, manifests, dir, options).await
    }

    /// Like [`start_connected`](Self::start_connected), with a secondary cluster.
    pub async fn start_clusters(
        nc: Client,
        secondary: Option<Client>,
        manifests: &[(&str, String)],
        dir: tempfile::TempDir,
        mut options: RuntimeOptions,
    ) -> anyhow::Result<Sluice> {
        // One compile cache for every test: each component is compiled once per suite.
        options.engine.cache_dir.get_or_insert_with(|| repo_root().join("target/test-compile-cache"));
        let manifest_dir = dir.path().join("manifests");
        std::fs::create_dir_all(&manifest_dir)?;
        for (file, text) in manifests {
            std::fs::write(manifest_dir.join(file), text)?;
        }
        let runtime =
            Runtime::load(&[manifest_dir], options).map_err(|e| anyhow::anyhow!("cannot load manifests:\n{e}"))?;
        let metrics = runtime.metrics();
        let running = runtime.bind_clusters(nc, secondary).await?;
        Ok(Sluice { running: Some(running), watcher: None, metrics, dir })
    }

    /// The runtime's metrics, as `/metrics` renders them.
    pub fn metrics(&self) -> String {
        self.metrics.render()
    }

    /// The runtime's metrics registry (for an admin listener).
    pub fn metrics_registry(&self) -> std::sync::Arc<sluice::Metrics> {
        self.metrics.clone()
    }

    /// The echo handler (on subject `echo`) served on a connection the test made.
    pub async fn echo_on(nc: Client) -> Sluice {
        let manifests = [("echo.toml", manifest("echo", "echo", "echo", ""))];
        Self::start_connected(nc, &manifests, tempfile::tempdir().unwrap(), RuntimeOptions::default())
            .await
            .unwrap_or_else(|e| panic!("cannot start Sluice: {e:#}"))
    }

    /// Stops abruptly, like a killed process: nothing in flight is finished or acked.
    pub async fn crash(mut self) {
        if let Some(running) = self.running.take() {
            running.abort().await;
        }
    }

    /// The folder the manifests were written to (the runtime reloads from it).
    pub fn manifest_dir(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }

    /// Starts watching the manifests and components for changes.
    pub fn watch(&mut self) {
        self.watcher = Some(sluice::Watcher::start(self.reloader()).unwrap());
    }

    /// Triggers reloads, as SIGHUP does.
    pub fn reloader(&self) -> sluice::Reloader {
        self.running.as_ref().unwrap().reloader()
    }

    /// The running runtime.
    pub fn running(&self) -> &Running {
        self.running.as_ref().unwrap()
    }

    /// What is served.
    pub fn status(&self) -> std::sync::Arc<sluice::Status> {
        self.running.as_ref().unwrap().status()
    }

    /// Shuts down gracefully (drain, finish in-flight messages).
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await.unwrap();
        }
    }
}

/// Sends a request and returns the reply (failure replies included), failing after 10 s.
pub async fn request(client: &Client, subject: &str, payload: &str) -> async_nats::Message {
    let request = async_nats::Request::new()
        .payload(payload.to_owned().into_bytes().into())
        .timeout(Some(Duration::from_secs(10)));
    client
        .send_request(subject.to_owned(), request)
        .await
        .unwrap_or_else(|e| panic!("request {payload:?} on {subject}: {e}"))
}

/// The value of header `name` of `msg`.
pub fn header(msg: &async_nats::Message, name: &str) -> Option<String> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str().to_owned())
}

/// The payload of `msg` as text.
pub fn text(msg: &async_nats::Message) -> String {
    String::from_utf8_lossy(&msg.payload).into_owned()
}

/// Collects what arrives on `sub` for `quiet` after the last message (or at most `limit`).
pub async fn collect_quiet(
    sub: &mut async_nats::Subscriber,
    quiet: Duration,
    limit: Duration,
) -> Vec<async_nats::Message> {
    let mut got = Vec::new();
    let until = tokio::time::Instant::now() + limit;
    while let Ok(Some(msg)) = tokio::time::timeout_at(until.min(tokio::time::Instant::now() + quiet), sub.next()).await
    {
        got.push(msg);
    }
    got
}

/// A JetStream context on `server`, with a stream `name` capturing `subjects`.
pub async fn stream(server: &NatsServer, name: &str, subjects: &[&str]) -> async_nats::jetstream::Context {
    let js = async_nats::jetstream::new(client(server).await);
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
        ..Default::default()
    })
    .await
    .unwrap();
    js
}

/// Publishes `payload` to `subject` through JetStream, waiting for the stream's ack.
pub async fn js_publish(js: &async_nats::jetstream::Context, subject: &str, payload: &str) -> u64 {
    js.publish(subject.to_owned(), payload.to_owned().into_bytes().into()).await.unwrap().await.unwrap().sequence
}

/// Waits until stream `name` holds `count` messages (at most `limit`), then returns them all.
pub async fn stream_messages(
    js: &async_nats::jetstream::Context,
    name: &str,
    count: u64,
    limit: Duration,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut stream = loop {
        if let Ok(mut stream) = js.get_stream(name).await
            && stream.info().await.unwrap().state.messages >= count
        {
            break stream;
        }
        assert!(tokio::time::Instant::now() < deadline, "stream {name} did not reach {count} messages in {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let state = stream.info().await.unwrap().state.clone();
    let mut all = Vec::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = stream.get_raw_message(seq).await {
            all.push(m);
        }
    }
    all
}

/// Waits until the server has processed everything `client` sent (subscriptions included):
/// `Client::flush` alone does not.
pub async fn sync(client: &Client) {
    sluice::round_trip(client).await.unwrap();
}

/// `method` `url`, with `Authorization: Bearer <token>` when a token is given: the status
/// code and the body.
pub async fn http_call(method: &str, url: &str, token: Option<&str>) -> (u16, String) {
    let (method, url, token) = (method.to_owned(), url.to_owned(), token.map(|t| format!("Bearer {t}")));
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let result = match (method.as_str(), token) {
            ("POST", Some(t)) => agent.post(&url).header("Authorization", &t).send_empty(),
            ("POST", None) => agent.post(&url).send_empty(),
            (_, Some(t)) => agent.get(&url).header("Authorization", &t).call(),
            (_, None) => agent.get(&url).call(),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap_or_default())
    })
    .await
    .unwrap()
}

/// GET `url`: the status code and the body.
pub async fn http_get(url: &str) -> (u16, String) {
    let url = url.to_owned();
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let mut response = agent.get(&url).call().unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let status = response.status().as_u16();
        (status, response.body_mut().read_to_string().unwrap_or_default())
    })
    .await
    .unwrap()
}
