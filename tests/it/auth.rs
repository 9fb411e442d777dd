//! Sluice against secured nats-servers: credentials in a URL, a token, an NKey, wrong
//! secrets (one clear error, no secret in it), and the README's least-privilege permission
//! block, under which request-reply, JetStream with dead letters and the nats-kv store work.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use sluice::connect::{ConnectError, NatsArgs};
use sluice::testing::NatsServer;
use sluice::{RuntimeOptions, cli};
use sluice_tests::{Sluice, header, init_logging, manifest, plugin, repo_root, request, stream_messages, text};

fn server(config: &str) -> NatsServer {
    init_logging();
    NatsServer::start_with_config(config).expect("cannot start nats-server")
}

fn at(server: &NatsServer, user_info: &str) -> String {
    format!("nats://{user_info}@127.0.0.1:{}", server.port())
}

async fn connect(args: NatsArgs) -> anyhow::Result<async_nats::Client> {
    cli::connect_args(&args).await
}

fn urls(url: String) -> NatsArgs {
    NatsArgs { urls: vec![url], ..NatsArgs::default() }
}

/// The connection is refused at once, as one line naming the server and not the secret.
fn assert_refused(result: anyhow::Result<async_nats::Client>, started: Instant, secret: &str, what: &str) {
    let e = result.expect_err("connected with wrong secrets");
    let refused = e.downcast_ref::<ConnectError>().unwrap_or_else(|| panic!("not a ConnectError: {e:#}"));
    let line = refused.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(line.contains("127.0.0.1:"), "the server is not named: {line}");
    assert!(line.contains(what), "{line}");
    assert!(!line.contains(secret) && !format!("{e:?}").contains(secret), "the secret is shown: {line}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: a reconnect loop?", started.elapsed());
}

#[tokio::test]
async fn user_and_password_in_the_url_are_used_and_never_shown() {
    let server =
        server("authorization { users = [ { user: sluice, password: \"pw-right\" }, { user: c, password: \"c\" } ] }");
    let nc = connect(urls(at(&server, "sluice:pw-right"))).await.unwrap();
    let sluice = Sluice::echo_on(nc).await;
    let client = connect(NatsArgs {
        urls: vec![server.url()],
        user: Some("c".into()),
        password: Some("c".into()),
        ..NatsArgs::default()
    })
    .await
    .unwrap();
    assert_eq!(text(&request(&client, "echo", "hi").await), "hi");

    let started = Instant::now();
    let wrong = connect(urls(at(&server, "sluice:pw-wrong"))).await;
    assert_refused(wrong, started, "pw-wrong", "authorization violation");
    sluice.stop().await;
}

#[tokio::test]
async fn a_token_and_an_nkey_are_used() {
    let user = nkeys::KeyPair::new_user();
    let config = format!("authorization {{ users = [ {{ nkey: {} }} ] }}", user.public_key());
    let server = server(&config);
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, format!("# a user seed\n{}\n", user.seed().unwrap())).unwrap();
    let nc = connect(NatsArgs { urls: vec![server.url()], nkey: Some(seed), ..NatsArgs::default() }).await.unwrap();
    sluice::round_trip(&nc).await.unwrap();
    let other = dir.path().join("other.nk");
    std::fs::write(&other, nkeys::KeyPair::new_user().seed().unwrap()).unwrap();
    let started = Instant::now();
    let refused = connect(NatsArgs { urls: vec![server.url()], nkey: Some(other), ..NatsArgs::default() }).await;
    assert_refused(refused, started, "SU", "authorization violation");

    let server = self::server("authorization { token: \"t0ken-right\" }");
    let nc = connect(urls(at(&server, "t0ken-right"))).await.unwrap();
    sluice::round_trip(&nc).await.unwrap();
    let started = Instant::now();
    let refused =
        connect(NatsArgs { urls: vec![server.url()], token: Some("t0ken-wrong".into()), ..NatsArgs::default() }).await;
    assert_refused(refused, started, "t0ken-wrong", "authorization violation");
}

#[tokio::test]
async fn a_missing_creds_file_is_named() {
    let server = server("");
    let missing = repo_root().join("target/no-such.creds");
    let e = connect(NatsArgs { urls: vec![server.url()], creds: Some(missing), ..NatsArgs::default() })
        .await
        .expect_err("connected without the creds file");
    let refused = e.downcast_ref::<ConnectError>().expect("a ConnectError");
    assert!(matches!(refused, ConnectError::File { .. }), "{refused}");
    assert!(refused.to_string().contains("no-such.creds"), "{refused}");
}

/// The permission block of the README, exactly as written there (passwords aside).
fn readme_block() -> String {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let start = readme.find("<!-- least-privilege-block -->").expect("the README has no permission block");
    let rest = &readme[start..];
    let open = rest.find("```\n").unwrap() + 4;
    let close = rest[open..].find("```").unwrap();
    rest[open..open + close].to_owned()
}

#[tokio::test]
async fn the_readme_permission_block_is_enough_and_no_more() {
    let server = server(&readme_block());
    let admin = connect(urls(at(&server, "admin:change-me-admin"))).await.unwrap();
    let js = jetstream::new(admin.clone());
    for (name, subjects) in [("ORDERS", "orders.created"), ("VALIDATED", "orders.validated"), ("DLQ", "dlq.orders")] {
        js.create_stream(jetstream::stream::Config {
            name: name.into(),
            subjects: vec![subjects.into()],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let echo = manifest(
        "echo",
        "echo",
        "echo",
        "[idempotency]\nkey = \"header:Nats-Msg-Id\"\n\n[store]\nbackend = \"nats-kv\"",
    );
    let validator = format!(
        "[handler]\nname = \"order-validator\"\ncomponent = \"{}\"\n\n[source]\nstream = \"ORDERS\"\n\n\
         [capabilities]\npublish = [\"orders.validated\"]\n\n[retry]\nmax_attempts = 1\n\n\
         [store]\nbackend = \"memory\"\n\n[dead_letter]\nsubject = \"dlq.orders\"\nstream = \"DLQ\"\n",
        plugin("misbehave").display()
    );
    let nc = connect(urls(at(&server, "sluice:change-me-sluice"))).await.unwrap();
    let sluice = Sluice::start_connected(
        nc,
        &[("echo.toml", echo), ("validator.toml", validator)],
        tempfile::tempdir().unwrap(),
        RuntimeOptions::default(),
    )
    .await
    .unwrap_or_else(|e| panic!("Sluice cannot start under the README's permissions: {e:#}"));
    let client = connect(urls(at(&server, "client:change-me-client"))).await.unwrap();

    // Request-reply, with the nats-kv store's dedup on a keyed request.
    assert_eq!(text(&request(&client, "echo", "hello").await), "hello");
    let keyed = async_nats::Request::new()
        .headers({
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Msg-Id", "k-1");
            h
        })
        .payload("keyed".into())
        .timeout(Some(Duration::from_secs(10)));
    let reply = client.send_request("echo", keyed).await.unwrap();
    assert_eq!(text(&reply), "keyed", "failure: {:?}", header(&reply, "Sluice-Failure-Reason"));
    let bucket = js.get_key_value("sluice-kv-echo").await.expect("the handler's bucket was not created");
    let config = &bucket.stream.cached_info().config;
    assert!(config.allow_atomic_publish && config.allow_message_ttl, "{config:?}");

    // JetStream: an output stored, a rejected message dead-lettered.
    client.publish("orders.created", "publish:orders.validated".into()).await.unwrap();
    client.publish("orders.created", "reject".into()).await.unwrap();
    client.flush().await.unwrap();
    let validated = stream_messages(&js, "VALIDATED", 1, Duration::from_secs(15)).await;
    assert_eq!(validated.len(), 1);
    let dead = stream_messages(&js, "DLQ", 1, Duration::from_secs(15)).await;
    assert_eq!(dead[0].headers.get("Sluice-Failure-Kind").map(|v| v.as_str()), Some("rejected"));

    // The client cannot delete ORDERS itself, and cannot make Sluice do it for it.
    client.publish_with_reply("echo", "$JS.API.STREAM.DELETE.ORDERS", "".into()).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(text(&request(&client, "echo", "still").await), "still");
    js.get_stream("ORDERS").await.expect("stream ORDERS was deleted");
    sluice.stop().await;
}
