//! Child processes (Sluice, the native baselines): each runs on its own, as in production, and
//! its output is read line by line on a thread that timestamps every line as it arrives, so
//! "the consumer said it is done" is timed without polling.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::mpsc;

/// A running child process.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::UnboundedReceiver<(Instant, String)>,
    log: PathBuf,
    /// When it was spawned (just before `spawn` returned).
    pub spawned_at: Instant,
}

impl Proc {
    /// Spawns `cmd`. Its stdout and stderr lines are appended to `log` and kept for
    /// [`wait_line`](Self::wait_line).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Self> {
        let file = Arc::new(Mutex::new(File::create(log).with_context(|| format!("cannot create {}", log.display()))?));
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let spawned_at = Instant::now();
        let mut child = cmd.spawn().with_context(|| format!("cannot start {name} ({cmd:?})"))?;
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            forward(out, tx.clone(), file.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward(err, tx, file);
        }
        Ok(Proc { name: name.to_owned(), stdin: child.stdin.take(), child, lines, log: log.to_owned(), spawned_at })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for a line matching `wanted`; returns when it was read, and the line.
    pub async fn wait_line(
        &mut self,
        wanted: impl Fn(&str) -> bool,
        limit: Duration,
    ) -> anyhow::Result<(Instant, String)> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some((at, line))) if wanted(&line) => return Ok((at, line)),
                Ok(Some(_)) => {}
                Ok(None) => {
                    let status = self.child.try_wait().ok().flatten();
                    bail!(
                        "{} ended ({status:?}) before printing what was expected; its log ({}):\n{}",
                        self.name,
                        self.log.display(),
                        tail(&self.log)
                    );
                }
                Err(_) => bail!(
                    "{} did not print what was expected within {limit:?}; its log ({}):\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log)
                ),
            }
        }
    }

    /// Writes one line to the child's stdin.
    pub fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().ok_or_else(|| anyhow::anyhow!("{}: stdin is closed", self.name))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    /// Sends SIGTERM (through `kill`: the workspace forbids `unsafe`, so no `libc::kill`).
    pub fn terminate(&self) -> anyhow::Result<()> {
        let status =
            Command::new("kill").args(["-TERM", &self.pid().to_string()]).status().context("cannot run kill")?;
        if !status.success() {
            bail!("kill -TERM {} failed: {status}", self.pid());
        }
        Ok(())
    }

    /// Waits for the process to exit (polling every millisecond); returns when it was seen.
    pub async fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<(Instant, ExitStatus)> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok((Instant::now(), status));
            }
            if start.elapsed() > limit {
                bail!("{} did not exit within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Resident memory (`VmRSS` of /proc/PID/status), in KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{}/status", self.pid()))
    }

    /// CPU time used so far (user + system), in clock ticks.
    pub fn cpu_ticks(&self) -> anyhow::Result<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))?;
        // The command name may hold spaces; the fields we want follow its closing parenthesis.
        let rest = stat
            .rsplit_once(')')
            .map(|(_, r)| r)
            .ok_or_else(|| anyhow::anyhow!("unexpected /proc/PID/stat: {stat}"))?;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // After the name: state(3) ... utime(14) stime(15), so indexes 11 and 12 here.
        let utime: u64 = fields.get(11).and_then(|f| f.parse().ok()).unwrap_or(0);
        let stime: u64 = fields.get(12).and_then(|f| f.parse().ok()).unwrap_or(0);
        Ok(utime + stime)
    }

    /// Waits until the process has used no CPU for `quiet`; returns when it was last busy.
    pub async fn wait_idle(&self, quiet: Duration, limit: Duration) -> anyhow::Result<Instant> {
        let start = Instant::now();
        let mut last = self.cpu_ticks()?;
        let mut last_busy = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = self.cpu_ticks()?;
            if now != last {
                last = now;
                last_busy = Instant::now();
            } else if last_busy.elapsed() >= quiet {
                return Ok(last_busy);
            }
            if start.elapsed() > limit {
                bail!("{} was still busy after {limit:?}", self.name);
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn forward(
    stream: impl std::io::Read + Send + 'static,
    tx: mpsc::UnboundedSender<(Instant, String)>,
    log: Arc<Mutex<File>>,
) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            if let Ok(mut f) = log.lock() {
                let _ = writeln!(f, "{line}");
            }
            let _ = tx.send((at, line));
        }
    });
}

/// The last lines of a log, for error messages.
pub fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
