//! A three-node JetStream cluster on loopback: three `nats-server` processes with routes to
//! each other, each with its own store folder and ports, killed (SIGKILL) and restarted on the
//! same ports and store, stopped on drop.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::signal;

/// Environment variable naming the `nats-server` binary (the one the test suite honours).
pub const BINARY_ENV: &str = "SLUICE_NATS_SERVER";

/// One node: its ports and folder are fixed for the cluster's life, so a restarted node comes
/// back as itself (same routes, same JetStream store).
#[derive(Debug)]
struct Node {
    name: String,
    port: u16,
    monitor: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// The cluster.
#[derive(Debug)]
pub struct Cluster {
    binary: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `size` nodes in `dir` and waits until each is healthy (JetStream meta group up).
    pub fn start(binary: &Path, dir: &Path, size: usize) -> anyhow::Result<Self> {
        Self::start_with(binary, dir, size, "")
    }

    /// Like [`Cluster::start`], with `extra` appended to every node's configuration (for
    /// example `lame_duck_duration: 60s`).
    pub fn start_with(binary: &Path, dir: &Path, size: usize, extra: &str) -> anyhow::Result<Self> {
        let ports = free_ports(size * 3)?;
        let routes: Vec<String> =
            (0..size).map(|i| format!("\"nats-route://127.0.0.1:{}\"", ports[size + i])).collect();
        let mut nodes = Vec::new();
        for i in 0..size {
            let name = format!("n{}", i + 1);
            let store = dir.join(&name).join("jetstream");
            std::fs::create_dir_all(&store)?;
            let config = dir.join(&name).join("server.conf");
            std::fs::write(
                &config,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\n\
                     jetstream {{ store_dir: {store:?}, max_memory_store: 256MB, max_file_store: 4GB }}\n\
                     cluster {{ name: chaos, listen: 127.0.0.1:{cluster}, routes: [{routes}] }}\n{extra}\n",
                    port = ports[i],
                    monitor = ports[2 * size + i],
                    cluster = ports[size + i],
                    routes = routes.join(", "),
                ),
            )?;
            nodes.push(Node {
                name,
                port: ports[i],
                monitor: ports[2 * size + i],
                log: dir.join(format!("n{}", i + 1)).join("nats-server.log"),
                config,
                child: None,
            });
        }
        let mut cluster = Cluster { binary: binary.to_owned(), nodes };
        for i in 0..size {
            cluster.spawn(i)?;
        }
        for i in 0..size {
            cluster.wait_healthy(i, Duration::from_secs(60))?;
        }
        Ok(cluster)
    }

    /// Every client URL, comma-separated (what `sluice run --nats` and async-nats take).
    pub fn urls(&self) -> String {
        self.nodes.iter().map(|n| format!("nats://127.0.0.1:{}", n.port)).collect::<Vec<_>>().join(",")
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no node (never, once started).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node's name (`n1`, ...).
    pub fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The node's client port.
    pub fn port(&self, i: usize) -> u16 {
        self.nodes[i].port
    }

    /// The names of the client connections the node holds now (its `/connz`), `None` when the
    /// monitoring port does not answer.
    pub fn clients(&self, i: usize) -> Option<Vec<String>> {
        let body = http_get(self.nodes[i].monitor, "/connz?limit=1024")?;
        let connz: serde_json::Value = serde_json::from_str(&body).ok()?;
        let names = connz["connections"].as_array()?.iter();
        Some(names.map(|c| c["name"].as_str().unwrap_or_default().to_owned()).collect())
    }

    /// Puts the node into lame-duck mode (SIGUSR2, what `nats-server --signal ldm` sends): it
    /// stops taking connections, tells its clients, and after its grace period closes them and
    /// exits.
    pub fn lame_duck(&mut self, i: usize) -> anyhow::Result<()> {
        let Some(child) = self.nodes[i].child.as_ref() else {
            bail!("nats-server {} is not running", self.nodes[i].name)
        };
        signal::send(child.id(), "USR2")
    }

    fn spawn(&mut self, i: usize) -> anyhow::Result<()> {
        let node = &mut self.nodes[i];
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .arg("-l")
            .arg(&node.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// SIGKILL: the node dies with whatever it had not written.
    pub fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// SIGTERM and wait for the exit (a clean stop, as a rolling restart does).
    pub fn stop(&mut self, i: usize, limit: Duration) -> anyhow::Result<()> {
        if let Some(mut child) = self.nodes[i].child.take() {
            signal::send(child.id(), "TERM")?;
            let start = Instant::now();
            while child.try_wait()?.is_none() {
                if start.elapsed() > limit {
                    child.kill()?;
                    child.wait()?;
                    bail!("nats-server {} did not stop within {limit:?} of SIGTERM", self.nodes[i].name);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    }

    /// Starts a stopped node again (same ports, same store) and waits until it is healthy:
    /// nats-server's `/healthz` answers ok once its JetStream assets have caught up.
    pub fn restart(&mut self, i: usize, limit: Duration) -> anyhow::Result<()> {
        if self.nodes[i].child.is_some() {
            bail!("nats-server {} is running", self.nodes[i].name);
        }
        self.spawn(i)?;
        self.wait_healthy(i, limit)
    }

    /// Waits until the node's `/healthz` answers 200.
    pub fn wait_healthy(&mut self, i: usize, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        let node = &mut self.nodes[i];
        loop {
            if let Some(child) = node.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("nats-server {} exited with {status}; its log:\n{}", node.name, tail(&node.log));
            }
            if http_ok(node.monitor, "/healthz") {
                return Ok(());
            }
            if start.elapsed() > limit {
                bail!("nats-server {} not healthy within {limit:?}; its log:\n{}", node.name, tail(&node.log));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// A GET on the monitoring port: the body of a 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

/// A GET on the monitoring port, true on a 200.
fn http_ok(port: u16, path: &str) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) else { return false };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.split_whitespace().nth(1) == Some("200")
}

/// `n` distinct free ports (each bound at once, then released together).
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0))).collect::<Result<_, _>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// The last lines of a log, for error messages.
pub fn tail(log: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = std::fs::File::open(log) {
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Finds `nats-server` as the test suite does: `$SLUICE_NATS_SERVER`, then `PATH`, then
/// `.tools/bin/` (where `make tools` installs it) in the current folder or a parent, or above
/// the running executable.
pub fn find_nats_server() -> anyhow::Result<PathBuf> {
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
    on_path
        .into_iter()
        .chain(roots.into_iter().map(|r| r.join(".tools/bin/nats-server")))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow::anyhow!("nats-server not found: run `make tools` or set {BINARY_ENV}"))
}
