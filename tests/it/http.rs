//! Outbound HTTP (`wasi:http`): the fetch plugin against a real local HTTP server. Grants are
//! checked before any connection (the server sees nothing of a refused request), limits end
//! requests with their own error codes, and requests carry the message's idempotency key.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use axum::body::Bytes;
use axum::http::{HeaderMap as HttpHeaders, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use sluice_tests::{Sluice, client, js_publish, manifest, nats, stream, sync, text};

/// One request the server received: path, `Idempotency-Key`, body.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    path: String,
    key: Option<String>,
    body: String,
}

/// A local HTTP server on a free port, recording every request it receives.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start() -> Server {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let flaky = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let record = seen.clone();
        let app = axum::Router::new().fallback(move |uri: Uri, headers: HttpHeaders, body: Bytes| {
            let (record, flaky) = (record.clone(), flaky.clone());
            async move {
                let path = uri.path().to_owned();
                let key = headers.get("idempotency-key").map(|v| v.to_str().unwrap().to_owned());
                let body = String::from_utf8_lossy(&body).into_owned();
                record.lock().unwrap().push(Seen { path: path.clone(), key, body: body.clone() });
                respond(&path, &body, &flaky).await
            }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Server { port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn paths(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.path).collect()
    }
}

async fn respond(path: &str, body: &str, flaky: &std::sync::atomic::AtomicU32) -> Response {
    let redirect = |to: &str| (StatusCode::FOUND, [("location", to.to_owned())], "").into_response();
    match path {
        "/hooks/redirect-out" => redirect("/admin"),
        "/hooks/redirect-in" => redirect("/hooks/echo"),
        "/hooks/big" => "x".repeat(4096).into_response(),
        "/hooks/slow" => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            "late".into_response()
        }
        "/hooks/flaky" if flaky.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 => {
            (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response()
        }
        _ => format!("got:{body}").into_response(),
    }
}

/// A fetch handler on core subject `subject`, publishing to `out`, with `grants` and `extra`.
fn fetch(name: &str, subject: &str, grants: &[String], extra: &str) -> String {
    let grants: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
    manifest(
        name,
        "fetch",
        subject,
        &format!("[capabilities]\npublish = [\"out\"]\nhttp = [{}]\n\n{extra}", grants.join(", ")),
    )
}

/// Publishes `payload` on `subject` and returns the next text on `out`.
async fn call(nc: &async_nats::Client, out: &mut async_nats::Subscriber, subject: &str, payload: &str) -> String {
    nc.publish(subject.to_owned(), payload.to_owned().into_bytes().into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), out.next())
        .await
        .unwrap_or_else(|_| panic!("no output for {payload:?}"))
        .unwrap();
    text(&msg)
}

#[tokio::test]
async fn a_granted_post_reaches_the_server_with_the_idempotency_key_and_the_answer_is_published() {
    let server = nats();
    let http = Server::start().await;
    let text = fetch(
        "f",
        "work",
        &[http.url("/hooks/*")],
        &format!(
            "[config]\nurl = {:?}\noutput = \"out\"\n\n[idempotency]\nkey = \"header:Nats-Msg-Id\"",
            http.url("/hooks/echo")
        ),
    );
    let sluice = Sluice::start(&server, &[("f.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out").await.unwrap();
    sync(&nc).await;

    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", "order-7");
    nc.publish_with_headers("work", headers, "hello".into()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), out.next()).await.unwrap().unwrap();
    assert_eq!(sluice_tests::text(&got), "200 got:hello");
    assert_eq!(http.seen(), [Seen { path: "/hooks/echo".into(), key: Some("order-7/1".into()), body: "hello".into() }]);

    // Without a key on the message, no header is invented.
    nc.publish("work", "no key".into()).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), out.next()).await.unwrap().unwrap();
    assert_eq!(sluice_tests::text(&got), "200 got:no key");
    assert_eq!(http.seen()[1].key, None);

    let metrics = sluice.metrics();
    assert!(
        metrics.contains(r#"sluice_http_requests_total{handler="f",host="127.0.0.1",status="2xx"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("sluice_http_request_duration_seconds_count{handler=\"f\",host=\"127.0.0.1\"} 2"),
        "{metrics}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn a_redelivered_message_calls_again_with_the_same_idempotency_key() {
    let server = nats();
    let http = Server::start().await;
    let js = stream(&server, "WORK", &["work"]).await;
    let text = fetch(
        "f",
        "work",
        &[http.url("/hooks/*")],
        &format!(
            "[config]\nurl = {:?}\noutput = \"out\"\nretry_on_5xx = true\n\n[idempotency]\nkey = \"json:/id\"\n\n\
             [retry]\nmax_attempts = 3\ninitial = \"100ms\"\njitter = \"none\"",
            http.url("/hooks/flaky")
        ),
    )
    .replace("subject = \"work\"", "stream = \"WORK\"");
    let sluice = Sluice::start(&server, &[("f.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out").await.unwrap();
    sync(&nc).await;

    js_publish(&js, "work", r#"{"id": "pay-1"}"#).await;
    let got = tokio::time::timeout(Duration::from_secs(10), out.next()).await.unwrap().unwrap();
    assert_eq!(sluice_tests::text(&got), r#"200 got:{"id": "pay-1"}"#);
    let keys: Vec<Option<String>> = http.seen().into_iter().map(|s| s.key).collect();
    assert_eq!(keys, [Some("pay-1/1".to_owned()), Some("pay-1/1".to_owned())], "the 503, then the retry");
    sluice.stop().await;
}

#[tokio::test]
async fn requests_outside_the_grants_are_refused_before_any_connection() {
    let server = nats();
    let http = Server::start().await;
    let port = http.port;
    // `localhost` is granted by name: a name never reaches loopback, whatever it resolves to.
    let grants = [http.url("/hooks/*"), format!("http://localhost:{port}/named/*")];
    let text = fetch("f", "work", &grants, "[config]\noutput = \"out\"");
    let sluice = Sluice::start(&server, &[("f.toml", text)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out").await.unwrap();
    sync(&nc).await;

    let refused = [
        (format!("http://127.0.0.2:{port}/hooks/echo"), "error HttpRequestDenied"), // host not granted
        ("http://example.invalid/hooks/echo".to_owned(), "error HttpRequestDenied"),
        (format!("https://127.0.0.1:{port}/hooks/echo"), "error HttpRequestDenied"), // scheme
        (format!("http://127.0.0.1:{}/hooks/echo", port.wrapping_add(1)), "error HttpRequestDenied"), // port
        (http.url("/admin"), "error HttpRequestDenied"),                             // path outside the prefix
        (http.url("/hooks/../admin"), "error HttpRequestDenied"),                    // dot segments
        (http.url("/hooks/%2e%2e/admin"), "error HttpRequestDenied"),
        (format!("http://localhost:{port}/named/x"), "error DestinationIpProhibited"), // resolves to loopback
    ];
    for (url, expected) in &refused {
        assert_eq!(call(&nc, &mut out, "work", url).await, *expected, "{url}");
    }
    assert_eq!(http.paths(), Vec::<String>::new(), "the server saw none of them");

    // A redirect out of the grant: the first hop is granted, the second is refused.
    assert_eq!(call(&nc, &mut out, "work", &http.url("/hooks/redirect-out")).await, "error HttpRequestDenied");
    assert_eq!(http.paths(), ["/hooks/redirect-out"], "the server never saw /admin");
    // A redirect inside the grant is followed (by the guest: each hop a request of its own).
    assert_eq!(call(&nc, &mut out, "work", &format!("{}\nbody", http.url("/hooks/redirect-in"))).await, "200 got:body");
    assert_eq!(http.paths(), ["/hooks/redirect-out", "/hooks/redirect-in", "/hooks/echo"]);

    let metrics = sluice.metrics();
    assert!(
        metrics.contains(r#"sluice_http_requests_total{handler="f",host="127.0.0.1",status="denied"} 6"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_http_requests_total{handler="f",host="localhost",status="denied"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"sluice_http_requests_total{handler="f",host="127.0.0.1",status="3xx"} 2"#),
        "{metrics}"
    );
    sluice.stop().await;
}

#[tokio::test]
async fn limits_end_requests_with_their_own_errors_and_the_runtime_keeps_serving() {
    let server = nats();
    let http = Server::start().await;
    let limits = "[http]\nmax_request_bytes = \"1KiB\"\nmax_response_bytes = \"1KiB\"\ntimeout = \"500ms\"";
    let one = fetch("f", "work", &[http.url("/hooks/*")], &format!("[config]\noutput = \"out\"\n\n{limits}"));
    let many = fetch(
        "g",
        "many",
        &[http.url("/hooks/*")],
        &format!(
            "[config]\noutput = \"out\"\nrequests = 3\nurl = {:?}\n\n[http]\nmax_requests = 2",
            http.url("/hooks/echo")
        ),
    );
    let sluice = Sluice::start(&server, &[("f.toml", one), ("g.toml", many)]).await;
    let nc = client(&server).await;
    let mut out = nc.subscribe("out").await.unwrap();
    sync(&nc).await;

    assert_eq!(call(&nc, &mut out, "work", &http.url("/hooks/big")).await, "error HttpResponseBodySize");
    let large = format!("{}\n{}", http.url("/hooks/echo"), "y".repeat(4096));
    assert_eq!(call(&nc, &mut out, "work", &large).await, "error HttpRequestBodySize");

    let started = Instant::now();
    assert_eq!(call(&nc, &mut out, "work", &http.url("/hooks/slow")).await, "error HttpResponseTimeout");
    assert!(started.elapsed() < Duration::from_millis(2500), "ended at the request's timeout: {:?}", started.elapsed());

    assert_eq!(call(&nc, &mut out, "many", "go").await, "error ConnectionLimitReached");
    let echoes = http.paths().iter().filter(|p| *p == "/hooks/echo").count();
    assert_eq!(echoes, 2, "two requests reached the server, the third was refused");

    // Still serving.
    assert_eq!(call(&nc, &mut out, "work", &format!("{}\nfine", http.url("/hooks/echo"))).await, "200 got:fine");
    sluice.stop().await;
}

#[tokio::test]
async fn a_component_importing_wasi_http_without_a_grant_is_refused_at_load() {
    let server = nats();
    let text = manifest("f", "fetch", "work", "[config]\noutput = \"out\"");
    let err = Sluice::try_start(&server, &[("f.toml", text)]).await.unwrap_err().to_string();
    assert!(err.contains("but the manifest grants no HTTP destination"), "{err}");
    assert!(err.contains("[capabilities]"), "{err}");
}
