//! Signals by process id, through `kill(1)`: the workspace forbids `unsafe`, so no `libc::kill`.

use std::process::Command;

use anyhow::{Context, bail};

/// Sends `SIG<name>` (`TERM`, `STOP`, `CONT`, `KILL`, `USR2`) to `pid`.
pub fn send(pid: u32, name: &str) -> anyhow::Result<()> {
    let status =
        Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status().context("cannot run kill")?;
    if !status.success() {
        bail!("kill -{name} {pid} failed: {status}");
    }
    Ok(())
}
