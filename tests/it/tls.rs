//! Sluice against nats-servers that require TLS, with certificates made in the test: a
//! trusted CA serves, an untrusted one is one clear refusal, and a server that verifies
//! clients takes Sluice's client certificate.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use sluice::cli;
use sluice::connect::{ConnectError, NatsArgs};
use sluice::testing::NatsServer;
use sluice_tests::{Sluice, init_logging, request, text};

/// A CA, and a certificate for 127.0.0.1 and localhost signed by it, written as PEM files.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    pub(crate) cert: PathBuf,
    pub(crate) key: PathBuf,
}

pub(crate) fn pki(dir: &Path, name: &str) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::from_params(&ca_params, &ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&leaf_key, &issuer)
        .unwrap();
    let pki = Pki {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.cert, leaf.pem()).unwrap();
    std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
    pki
}

fn tls_server(server: &Pki, verify_clients: Option<&Pki>) -> NatsServer {
    init_logging();
    let verify = verify_clients.map_or_else(String::new, |c| format!("ca_file: {:?}\n  verify: true\n", c.ca));
    let config = format!("tls {{\n  cert_file: {:?}\n  key_file: {:?}\n  {verify}}}\n", server.cert, server.key);
    NatsServer::start_with_config(&config).expect("cannot start nats-server with TLS")
}

#[tokio::test]
async fn a_tls_server_is_served_when_its_ca_is_trusted_and_refused_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (good, other) = (pki(dir.path(), "server"), pki(dir.path(), "other"));
    let server = tls_server(&good, None);
    let args = |ca: &Path| NatsArgs { urls: vec![server.url()], tls_ca: Some(ca.to_owned()), ..NatsArgs::default() };

    let nc = cli::connect_args(&args(&good.ca)).await.unwrap();
    let sluice = Sluice::echo_on(nc).await;
    let client = cli::connect_args(&args(&good.ca)).await.unwrap();
    assert_eq!(text(&request(&client, "echo", "over tls").await), "over tls");

    let started = Instant::now();
    let e = cli::connect_args(&args(&other.ca)).await.expect_err("an untrusted certificate was accepted");
    let refused = e.downcast_ref::<ConnectError>().expect("a ConnectError").to_string();
    assert!(!refused.contains('\n') && refused.contains("127.0.0.1:") && refused.contains("TLS"), "{refused}");
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    sluice.stop().await;
}

#[tokio::test]
async fn a_server_that_verifies_clients_takes_the_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (server_pki, client_pki) = (pki(dir.path(), "server"), pki(dir.path(), "client"));
    let server = tls_server(&server_pki, Some(&client_pki));
    let with_cert = NatsArgs {
        urls: vec![server.url()],
        tls_ca: Some(server_pki.ca.clone()),
        tls_cert: Some(client_pki.cert.clone()),
        tls_key: Some(client_pki.key.clone()),
        ..NatsArgs::default()
    };
    let nc = cli::connect_args(&with_cert).await.unwrap();
    sluice::round_trip(&nc).await.unwrap();
    let without = NatsArgs { tls_cert: None, tls_key: None, ..with_cert };
    let refused = cli::connect_args(&without).await;
    assert!(refused.is_err(), "connected without a client certificate");
}
