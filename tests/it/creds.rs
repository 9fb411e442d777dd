//! Sluice against a nats-server in operator mode (decentralised JWT auth): an operator, an
//! account and a user made in the test with `nkeys`, the user's creds file as `nsc` writes
//! it. The right creds serve; a user signed by an account the server does not know is
//! refused in one line.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use nkeys::KeyPair;
use serde_json::json;
use sluice::cli;
use sluice::connect::{ConnectError, NatsArgs};
use sluice::testing::NatsServer;
use sluice_tests::{Sluice, init_logging, request, text};

/// A JWT of `claims` (with `iss`, `sub`, `iat` and `jti` added) signed by `issuer`.
fn jwt(issuer: &KeyPair, subject: &str, mut claims: serde_json::Value) -> String {
    let header = URL_SAFE_NO_PAD.encode(json!({"typ": "JWT", "alg": "ed25519-nkey"}).to_string());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    claims["iss"] = json!(issuer.public_key());
    claims["sub"] = json!(subject);
    claims["iat"] = json!(now);
    claims["jti"] = json!(format!("TEST{now}{}", &subject[1..12]));
    let body = URL_SAFE_NO_PAD.encode(claims.to_string());
    let signature = URL_SAFE_NO_PAD.encode(issuer.sign(format!("{header}.{body}").as_bytes()).unwrap());
    format!("{header}.{body}.{signature}")
}

fn account_jwt(operator: &KeyPair, account: &KeyPair) -> String {
    let limits = json!({"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                        "wildcards": true, "conn": -1, "leaf": -1});
    jwt(
        operator,
        &account.public_key(),
        json!({"name": "app", "nats": {"type": "account", "version": 2, "limits": limits}}),
    )
}

/// A creds file for a new user of `account`, in the format `nsc` writes.
fn creds(dir: &std::path::Path, file: &str, account: &KeyPair) -> std::path::PathBuf {
    let user = KeyPair::new_user();
    let claims = json!({"name": "sluice", "nats": {"type": "user", "version": 2,
                        "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}});
    let token = jwt(account, &user.public_key(), claims);
    let text = format!(
        "-----BEGIN NATS USER JWT-----\n{token}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test]
async fn a_creds_file_from_an_operator_signed_account_is_served_and_a_stranger_refused() {
    init_logging();
    let (operator, account, stranger) = (KeyPair::new_operator(), KeyPair::new_account(), KeyPair::new_account());
    let operator_jwt =
        jwt(&operator, &operator.public_key(), json!({"name": "test", "nats": {"type": "operator", "version": 2}}));
    // JetStream (on in every test server) needs a system account.
    let system = KeyPair::new_account();
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {sys}\nresolver: MEMORY\nresolver_preload: {{\n  {}: {}\n  {sys}: {}\n}}\n",
        account.public_key(),
        account_jwt(&operator, &account),
        account_jwt(&operator, &system),
        sys = system.public_key(),
    );
    let server = NatsServer::start_with_config(&config).expect("cannot start nats-server in operator mode");
    let dir = tempfile::tempdir().unwrap();
    let args = |creds| NatsArgs { urls: vec![server.url()], creds: Some(creds), ..NatsArgs::default() };

    let nc = cli::connect_args(&args(creds(dir.path(), "sluice.creds", &account))).await.unwrap();
    let sluice = Sluice::echo_on(nc).await;
    let client = cli::connect_args(&args(creds(dir.path(), "client.creds", &account))).await.unwrap();
    assert_eq!(text(&request(&client, "echo", "with creds").await), "with creds");

    let started = Instant::now();
    let e = cli::connect_args(&args(creds(dir.path(), "stranger.creds", &stranger)))
        .await
        .expect_err("a user of an unknown account was let in");
    let refused = e.downcast_ref::<ConnectError>().expect("a ConnectError").to_string();
    assert!(!refused.contains('\n') && refused.contains("127.0.0.1:"), "{refused}");
    assert!(refused.contains("authorization violation"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    sluice.stop().await;
}
