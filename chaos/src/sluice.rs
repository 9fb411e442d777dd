//! `sluice run` child processes: each with its own data folder (kept across its restarts, as a
//! real host's would be), its output appended to a log, killed on drop.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::cluster::tail;
use crate::signal;

/// One Sluice process slot: the process running in it now, if any.
#[derive(Debug)]
pub struct Sluice {
    binary: PathBuf,
    manifests: PathBuf,
    urls: String,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// Whether it is frozen (SIGSTOP) now: drop sends SIGCONT first, so nothing stays stopped.
    stopped: bool,
    /// Length of the log when the current process started (its `ready` line comes after).
    log_from: u64,
}

impl Sluice {
    /// A slot; nothing runs until [`start`](Self::start).
    pub fn new(binary: &Path, manifests: &Path, urls: &str, data: PathBuf, log: PathBuf) -> Self {
        Sluice {
            binary: binary.to_owned(),
            manifests: manifests.to_owned(),
            urls: urls.to_owned(),
            data,
            log,
            child: None,
            stopped: false,
            log_from: 0,
        }
    }

    /// Spawns `sluice run` (without waiting for it to be ready).
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("{} is running", self.log.display());
        }
        std::fs::create_dir_all(&self.data)?;
        let out = OpenOptions::new().create(true).append(true).open(&self.log)?;
        self.log_from = out.metadata()?.len();
        let child = Command::new(&self.binary)
            .arg("run")
            .arg(&self.manifests)
            .args(["--nats", &self.urls, "--no-watch"])
            .arg("--data-dir")
            .arg(&self.data)
            .env("RUST_LOG", std::env::var("CHAOS_SLUICE_LOG").unwrap_or_else(|_| "info".into()))
            .env_remove("SLUICE_NATS_URL")
            .env_remove("SLUICE_ADMIN")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("cannot start {}", self.binary.display()))?;
        self.child = Some(child);
        self.stopped = false;
        Ok(())
    }

    /// Spawns and waits for its `ready` line.
    pub fn start(&mut self, limit: Duration) -> anyhow::Result<()> {
        self.spawn()?;
        self.wait_ready(limit)
    }

    /// Like [`start`](Self::start), started again (as systemd's `Restart=` would) when the
    /// process exits before it is ready, up to `attempts` times in all; returns the failures
    /// seen (the report lists them: a process that cannot start is a finding, not noise).
    pub fn start_supervised(&mut self, limit: Duration, attempts: usize) -> anyhow::Result<Vec<String>> {
        let mut failures = Vec::new();
        loop {
            self.spawn()?;
            match self.wait_ready(limit) {
                Ok(()) => return Ok(failures),
                Err(e) if self.child.is_none() && failures.len() + 1 < attempts => {
                    let last = format!("{e:#}");
                    let last = last.lines().last().unwrap_or_default().to_owned();
                    failures.push(last);
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits until the current process has logged `ready` (every handler subscribed).
    pub fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let text = std::fs::read(&self.log).unwrap_or_default();
            let since = text.get(self.log_from as usize..).unwrap_or_default();
            if String::from_utf8_lossy(since).lines().any(|l| l.contains(" ready")) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                bail!("sluice exited with {status} before it was ready; its log:\n{}", tail(&self.log));
            }
            if start.elapsed() > limit {
                bail!("sluice not ready within {limit:?}; its log:\n{}", tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        self.stopped = false;
        Ok(())
    }

    /// SIGSTOP: the process keeps its connection and its messages, and does nothing.
    pub fn freeze(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        signal::send(pid, "STOP")?;
        self.stopped = true;
        Ok(())
    }

    /// SIGCONT.
    pub fn thaw(&mut self) -> anyhow::Result<()> {
        let pid = self.pid()?;
        signal::send(pid, "CONT")?;
        self.stopped = false;
        Ok(())
    }

    /// SIGTERM and wait for the exit; an error when it does not exit within `limit` or exits
    /// with a failure.
    pub fn stop(&mut self, limit: Duration) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        if self.stopped {
            signal::send(child.id(), "CONT")?;
            self.stopped = false;
        }
        signal::send(child.id(), "TERM")?;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!("sluice exited with {status} after SIGTERM; its log:\n{}", tail(&self.log));
                }
                return Ok(());
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                bail!("sluice did not exit within {limit:?} of SIGTERM; its log:\n{}", tail(&self.log));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the process it started is still alive (it may have died on its own).
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            self.child = None;
            bail!("sluice exited on its own with {status}; its log:\n{}", tail(&self.log));
        }
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child.as_ref().map(Child::id).ok_or_else(|| anyhow::anyhow!("{} is not running", self.log.display()))
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }
}

impl Drop for Sluice {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL works on a stopped process too; the CONT is for tidiness only.
            if self.stopped {
                let _ = signal::send(child.id(), "CONT");
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
