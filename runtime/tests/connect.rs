//! The `sluice` binary against a nats-server that requires a password: a wrong one is one
//! line on stderr naming the server, exit code 2, and the secret is nowhere in the output.

#![allow(clippy::unwrap_used)]

// Shared with the other binary tests; this one needs only part of it.
#[allow(dead_code)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{build_plugins, repo_root};
use sluice::nats_server::NatsServer;

fn sluice() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.current_dir(repo_root());
    cmd
}

#[test]
fn a_wrong_password_is_one_line_and_exit_code_2_for_every_command() {
    build_plugins();
    let server =
        NatsServer::start_with_config("authorization { users = [ { user: sluice, password: \"pw-right\" } ] }")
            .unwrap();
    let data = tempfile::tempdir().unwrap();
    let url = format!("nats://sluice:pw-wrong@127.0.0.1:{}", server.port());
    let data_dir = data.path().display().to_string();
    let runs: [Vec<&str>; 4] = [
        vec!["run", "manifests/", "--no-watch", "--data-dir", &data_dir, "--nats", &url],
        vec!["request", "echo", "hi", "--nats", &url],
        vec!["publish", "echo", "hi", "--nats", &url],
        vec!["dlq", "list", "DLQ", "--nats", &url],
    ];
    for args in runs {
        let started = Instant::now();
        let out = sluice().args(&args).env("RUST_LOG", "warn").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(started.elapsed() < Duration::from_secs(10), "{args:?} took {:?}", started.elapsed());
        assert!(!stderr.contains("pw-wrong") && !stdout.contains("pw-wrong"), "{args:?} shows the password: {stderr}");
        // async-nats logs its own line about the refusal; Sluice's is the one error line.
        assert_eq!(stderr.lines().filter(|l| l.starts_with("error:")).count(), 1, "{args:?}: {stderr}");
        let last = stderr.lines().last().unwrap_or_default();
        assert_eq!(
            last,
            format!(
                "error: cannot connect to NATS at nats://127.0.0.1:{}: authorization violation: the server refused \
                 these credentials (user/password, token, NKey or creds)",
                server.port()
            ),
            "{args:?}: {stderr}"
        );
    }
}
