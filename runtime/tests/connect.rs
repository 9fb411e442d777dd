//! The `sluice` binary against a nats-server that requires a password: a wrong one is one
//! line on stderr naming the server, exit code 2, and the secret is nowhere in the output.

#![allow(clippy::unwrap_used)]

// Shared with the other binary tests; this one needs only part of it.
#[allow(dead_code)]
mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{build_plugins, repo_root};
use sluice::testing::NatsServer;

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
    // An empty folder: `run` loads (and compiles) its manifests before it connects, and
    // what is timed here is the refusal.
    let manifests = tempfile::tempdir().unwrap();
    let manifests = manifests.path().display().to_string();
    let runs: [Vec<&str>; 4] = [
        vec!["run", &manifests, "--no-watch", "--data-dir", &data_dir, "--nats", &url],
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

#[test]
fn a_nats_cli_context_and_a_list_of_urls_are_used() {
    let server =
        NatsServer::start_with_config("authorization { users = [ { user: sluice, password: \"pw-right\" } ] }")
            .unwrap();
    let config = tempfile::tempdir().unwrap();
    let contexts = config.path().join("nats/context");
    std::fs::create_dir_all(&contexts).unwrap();
    let context = |name: &str, password: &str| {
        let text = format!(
            r#"{{"description": "test", "url": "nats://127.0.0.1:{}", "user": "sluice", "password": "{password}"}}"#,
            server.port()
        );
        std::fs::write(contexts.join(format!("{name}.json")), text).unwrap();
    };
    context("good", "pw-right");
    context("bad", "pw-wrong");
    let publish = |extra: &[&str]| {
        let out = sluice()
            .args(["publish", "x", "hi"])
            .args(extra)
            .env("XDG_CONFIG_HOME", config.path())
            .env_remove("SLUICE_NATS_URL")
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, stderr) = publish(&["--context", "good"]);
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = publish(&["--context", "bad"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(!stderr.contains("pw-wrong"), "{stderr}");
    // A flag given wins over the context.
    let (code, stderr) = publish(&["--context", "bad", "--password", "pw-right"]);
    assert_eq!(code, Some(0), "{stderr}");

    // A cluster's URLs, comma-separated: the first does not answer, the second does.
    let urls = format!("nats://127.0.0.1:1,nats://sluice:pw-right@127.0.0.1:{}", server.port());
    let (code, stderr) = publish(&["--nats", &urls]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(!stderr.contains("pw-right"), "{stderr}");
}

/// The node `sluice run` is connected to, when exactly one holds its connection.
fn sluice_node(cluster: &sluice_chaos::cluster::Cluster) -> Option<usize> {
    let on: Vec<usize> = (0..cluster.len())
        .filter(|&i| cluster.clients(i).is_some_and(|names| names.iter().any(|n| n == "sluice")))
        .collect();
    (on.len() == 1).then(|| on[0])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lame_duck_server_is_left_for_another_node_before_it_closes_the_connection() {
    build_plugins();
    let dir = tempfile::tempdir().unwrap();
    let binary = sluice_chaos::cluster::find_nats_server().unwrap();
    // The lame duck closes no client connection during its 30 s of grace: a move seen before
    // then is Sluice's own.
    let mut cluster = sluice_chaos::cluster::Cluster::start_with(
        &binary,
        dir.path(),
        3,
        "lame_duck_duration: 60s\nlame_duck_grace_period: 30s",
    )
    .unwrap();
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let component = repo_root().join("plugins/dist/echo.wasm");
    std::fs::write(
        manifests.join("echo.toml"),
        format!("[handler]\nname = \"echo\"\ncomponent = {:?}\n\n[source]\nsubject = \"echo\"\n", component.display()),
    )
    .unwrap();
    let log = dir.path().join("sluice.log");
    let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .arg("run")
        .arg(&manifests)
        .args(["--nats", &cluster.urls(), "--no-watch", "--data-dir"])
        .arg(repo_root().join("target/test-connect-data"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let _child = common::Killed(child);
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Serving: a request through every node is answered.
    let urls: Vec<String> = (0..cluster.len()).map(|i| format!("nats://127.0.0.1:{}", cluster.port(i))).collect();
    let answered = |nc: async_nats::Client| async move {
        let ask = nc.request("echo", "ping".into());
        matches!(tokio::time::timeout(Duration::from_secs(2), ask).await, Ok(Ok(r)) if &r.payload[..] == b"ping")
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let on = loop {
        let nc = async_nats::connect(&urls[0]).await.unwrap();
        if answered(nc).await
            && let Some(on) = sluice_node(&cluster)
        {
            break on;
        }
        assert!(Instant::now() < deadline, "sluice did not start serving: {}", log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    cluster.lame_duck(on).unwrap();
    // Bounded well inside the grace period: Sluice moves when told, not when cut off.
    let deadline = Instant::now() + Duration::from_secs(20);
    let moved = loop {
        if let Some(now) = sluice_node(&cluster)
            && now != on
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "sluice stayed on the lame-duck server {}: {}",
            cluster.name(on),
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(log_text().contains("entering lame duck mode; reconnecting to another server"), "{}", log_text());
    // And it serves from there: a request through the node it moved to is answered.
    let nc = async_nats::connect(&urls[moved]).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !answered(nc.clone()).await {
        assert!(Instant::now() < deadline, "no answer after the move: {}", log_text());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
