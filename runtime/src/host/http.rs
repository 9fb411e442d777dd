//! `wasi:http/outgoing-handler`: a handler's outgoing HTTP requests, as its manifest grants
//! them (`[capabilities] http`, `[http]`; see [`crate::manifest::http`]).
//!
//! `wasmtime-wasi-http` implements the interface; Sluice supplies the hook that sends each
//! request ([`WasiHttpHooks::send_request`]), which is where every rule is enforced:
//!
//! 1. before anything leaves the host, the URL is checked against the grants (scheme, host,
//!    port, path prefix, no `.`/`..` segments) and the call's request budget; a refusal is
//!    `HTTP-request-denied` (or `connection-limit-reached` for the budget) for the guest and a
//!    warning naming the destination;
//! 2. the host name is resolved here, every address is checked (a name reaches only public
//!    addresses, or private ones with `http_private`; loopback and link-local only by an IP
//!    grant), and the connection goes to a checked address: a name that resolves to
//!    127.0.0.1, now or on a second lookup, cannot reach loopback (no DNS rebinding);
//! 3. the request gets `Idempotency-Key: <message key>/<n>` when the message has a key and
//!    the guest set none;
//! 4. bodies are counted against `max_request_bytes` and `max_response_bytes`, and the whole
//!    exchange, connect to last body byte, runs under `[http] timeout`.
//!
//! wasi:http does not follow redirects (the guest does, with a new request), so every hop
//! passes the same check.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::http;
use hyper::http::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpHooks};

use crate::manifest::http::{HttpGrant, HttpPolicy, has_dot_segment};
use crate::metrics::Metrics;

/// The header a request carries the message's idempotency key in (the IETF httpapi draft's).
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// The outbound HTTP state of one call: the wasi:http context and Sluice's hooks.
pub(crate) struct HttpCall {
    pub(crate) ctx: WasiHttpCtx,
    pub(crate) hooks: Hooks,
}

impl HttpCall {
    pub(crate) fn new(
        handler: Arc<str>,
        policy: Option<Arc<HttpPolicy>>,
        key: Option<String>,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        HttpCall {
            ctx: WasiHttpCtx::new(),
            hooks: Hooks { report: Report { handler, metrics }, policy, key, requests: 0 },
        }
    }

    /// A warm instance's next call: its own key, its own request budget.
    pub(crate) fn next_call(&mut self, key: Option<String>) {
        self.hooks.key = key;
        self.hooks.requests = 0;
    }
}

/// What `send_request` needs: the grants, the call's key and how many requests it made.
pub(crate) struct Hooks {
    report: Report,
    policy: Option<Arc<HttpPolicy>>,
    key: Option<String>,
    /// Requests this call asked for (refused ones included): `n` of the next key is one more.
    requests: u32,
}

/// Where a request's end is told: the log and the metrics.
#[derive(Clone)]
struct Report {
    handler: Arc<str>,
    metrics: Option<Arc<Metrics>>,
}

type SendFuture = Box<
    dyn Future<Output = Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>), Error>>
        + Send,
>;

/// A request admitted by the grants, about to be resolved and connected.
struct Admitted {
    grant: HttpGrant,
    policy: Arc<HttpPolicy>,
    https: bool,
    host: String,
    port: u16,
    /// `scheme://host:port/path`, for logs.
    destination: String,
}

/// How a request ended, for the metric.
enum Ended {
    Status(u16),
    Error,
    Denied,
}

impl Report {
    fn record(&self, host: &str, ended: &Ended, took: Duration) {
        let Some(metrics) = &self.metrics else { return };
        let status = match ended {
            Ended::Status(s) => match s / 100 {
                2 => "2xx",
                3 => "3xx",
                4 => "4xx",
                5 => "5xx",
                _ => "error",
            },
            Ended::Error => "error",
            Ended::Denied => "denied",
        };
        metrics.http_request(&self.handler, host, status, took);
    }

    fn deny(&self, host: &str, destination: &str, why: &str) {
        tracing::warn!(
            target: "sluice::http",
            handler = &*self.handler,
            destination,
            "HTTP request to {destination} refused: {why}"
        );
        self.record(host, &Ended::Denied, Duration::ZERO);
    }
}

impl Hooks {
    fn deny(&self, host: &str, destination: &str, why: &str) {
        self.report.deny(host, destination, why);
    }

    /// Checks `request` against the grants and the budget, and stamps its idempotency key.
    fn admit(&mut self, request: &mut http::Request<WasiBody>) -> Result<Admitted, ErrorCode> {
        self.requests = self.requests.saturating_add(1);
        let n = self.requests;
        let uri = request.uri();
        let https = uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        let host = uri.host().unwrap_or("").trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str).to_owned();
        let scheme = if https { "https" } else { "http" };
        let shown_host = if host.contains(':') { format!("[{host}]") } else { host.clone() };
        let destination = format!("{scheme}://{shown_host}:{port}{path}");

        let Some(policy) = self.policy.clone() else {
            self.deny(&host, &destination, "the manifest grants no HTTP destination ([capabilities] http)");
            return Err(ErrorCode::HttpRequestDenied);
        };
        if n > policy.max_requests {
            self.deny(
                &host,
                &destination,
                &format!("this call already made {} requests ([http] max_requests)", policy.max_requests),
            );
            return Err(ErrorCode::ConnectionLimitReached);
        }
        if has_dot_segment(&path) {
            self.deny(&host, &destination, "`.` and `..` path segments are not allowed");
            return Err(ErrorCode::HttpRequestDenied);
        }
        let Some(grant) = policy.grants.iter().find(|g| g.admits(https, &host, port, &path)).cloned() else {
            let granted: Vec<&str> = policy.grants.iter().map(|g| g.text.as_str()).collect();
            self.deny(&host, &destination, &format!("no grant admits it (granted: {})", granted.join(", ")));
            return Err(ErrorCode::HttpRequestDenied);
        };
        let declared = request
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(len) = declared.filter(|&len| len > policy.max_request_bytes) {
            self.deny(
                &host,
                &destination,
                &format!("a body of {len} bytes is over [http] max_request_bytes ({})", policy.max_request_bytes),
            );
            return Err(ErrorCode::HttpRequestBodySize(Some(len)));
        }
        if let Some(key) = &self.key
            && !request.headers().contains_key(IDEMPOTENCY_KEY)
        {
            match HeaderValue::from_str(&format!("{key}/{n}")) {
                Ok(value) => {
                    request.headers_mut().insert(IDEMPOTENCY_KEY, value);
                }
                Err(_) => tracing::debug!(
                    target: "sluice::http",
                    handler = &*self.report.handler,
                    "the idempotency key is not a valid header value; {destination} is sent without one"
                ),
            }
        }
        Ok(Admitted { grant, policy, https, host, port, destination })
    }
}

impl WasiHttpHooks for Hooks {
    fn send_request(
        &mut self,
        mut request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        let admitted = match self.admit(&mut request) {
            Ok(a) => a,
            Err(code) => return Box::new(async move { Err(Error::from(code)) }),
        };
        let report = self.report.clone();
        Box::new(async move {
            let started = Instant::now();
            let host = admitted.host.clone();
            let destination = admitted.destination.clone();
            let timeout = admitted.policy.timeout;
            let result = match tokio::time::timeout(timeout, send(request, &admitted, started + timeout)).await {
                Ok(result) => result,
                Err(_) => Err(Sent::Failed(Error::HttpResponseTimeout)),
            };
            match result {
                Ok(response) => {
                    report.record(&host, &Ended::Status(response.0.status().as_u16()), started.elapsed());
                    Ok(response)
                }
                Err(Sent::Refused(why, code)) => {
                    report.deny(&host, &destination, &why);
                    Err(Error::from(code))
                }
                Err(Sent::Failed(e)) => {
                    tracing::info!(
                        target: "sluice::http",
                        handler = &*report.handler,
                        destination,
                        "HTTP request to {destination} failed: {e}"
                    );
                    report.record(&host, &Ended::Error, started.elapsed());
                    Err(e)
                }
            }
        })
    }

    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        // A request body over the limit surfaces as a hyper error whose cause is ours.
        let mut source = std::error::Error::source(err);
        while let Some(cause) = source {
            if let Some(Error::HttpRequestBodySize(n)) = cause.downcast_ref::<Error>() {
                return ErrorCode::HttpRequestBodySize(*n);
            }
            source = cause.source();
        }
        tracing::debug!(target: "sluice::http", handler = &*self.report.handler, "HTTP error: {err}");
        if err.is_timeout() { ErrorCode::HttpResponseTimeout } else { ErrorCode::HttpProtocolError }
    }

    fn p2_error_from_connect(&mut self, err: &std::io::Error) -> ErrorCode {
        match err.kind() {
            std::io::ErrorKind::ConnectionRefused => ErrorCode::ConnectionRefused,
            std::io::ErrorKind::TimedOut => ErrorCode::ConnectionTimeout,
            _ => ErrorCode::DestinationUnavailable,
        }
    }
}

/// Why a request got no response.
enum Sent {
    /// Refused before connecting (no allowed address): a denial.
    Refused(String, ErrorCode),
    Failed(Error),
}

type Response = (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>);

/// Resolves, checks the addresses, connects, and sends `request`.
async fn send(mut request: http::Request<WasiBody>, a: &Admitted, deadline: Instant) -> Result<Response, Sent> {
    let policy = &a.policy;
    let addrs: Vec<IpAddr> = match a.host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => {
            let lookup = tokio::net::lookup_host((a.host.as_str(), a.port));
            match tokio::time::timeout(policy.connect_timeout, lookup).await {
                Err(_) => return Err(Sent::Failed(Error::DnsTimeout)),
                Ok(Err(e)) => {
                    return Err(Sent::Failed(Error::DnsError { rcode: Some(e.to_string()), info_code: None }));
                }
                Ok(Ok(found)) => found.map(|s| s.ip()).collect(),
            }
        }
    };
    let allowed: Vec<IpAddr> = addrs.iter().copied().filter(|ip| a.grant.reaches(*ip, policy.private)).collect();
    if allowed.is_empty() {
        let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        return Err(Sent::Refused(
            format!(
                "{} resolves to {}, which grant {:?} does not reach (loopback, link-local and other special \
                 addresses need a grant naming the IP; private ones `http_private = true`)",
                a.host,
                list.join(", "),
                a.grant.text
            ),
            ErrorCode::DestinationIpProhibited,
        ));
    }

    let tcp = connect(&allowed, a.port, policy.connect_timeout).await.map_err(Sent::Failed)?;
    let stream: Box<dyn Stream> = if a.https {
        let config = tls_config(policy);
        let name = match a.host.parse::<IpAddr>() {
            Ok(ip) => rustls_pki_types::ServerName::IpAddress(ip.into()),
            Err(_) => rustls_pki_types::ServerName::try_from(a.host.clone())
                .map_err(|_| Sent::Failed(Error::HttpRequestUriInvalid))?,
        };
        let connector = tokio_rustls::TlsConnector::from(config);
        match tokio::time::timeout(policy.connect_timeout, connector.connect(name, tcp)).await {
            Err(_) => return Err(Sent::Failed(Error::ConnectionTimeout)),
            Ok(Err(e)) => {
                let certificate = e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    .is_some_and(|r| matches!(r, rustls::Error::InvalidCertificate(_)));
                return Err(Sent::Failed(if certificate { Error::TlsCertificateError } else { Error::Tls(e) }));
            }
            Ok(Ok(tls)) => Box::new(tls),
        }
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake(wasmtime_wasi_http::io::TokioIo::new(stream))
        .await
        .map_err(|e| Sent::Failed(Error::Hyper(e)))?;

    // The request line carries the path only (the authority is in the Host header).
    let path = request.uri().path_and_query().map_or("/", http::uri::PathAndQuery::as_str).to_owned();
    *request.uri_mut() =
        http::Uri::builder().path_and_query(path).build().map_err(|_| Sent::Failed(Error::HttpRequestUriInvalid))?;
    let limit = policy.max_request_bytes;
    let request =
        request.map(|body| Counted::new(body, limit, Error::HttpRequestBodySize(Some(limit)), None).boxed_unsync());

    let mut conn = Some(Box::pin(conn));
    let send = sender.send_request(request);
    tokio::pin!(send);
    let response = loop {
        match conn.as_mut() {
            Some(c) => tokio::select! {
                r = &mut send => break r,
                done = c => {
                    conn = None;
                    done.map_err(|e| Sent::Failed(Error::Hyper(e)))?;
                }
            },
            None => break send.await,
        }
    };
    let response = response.map_err(|e| {
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            if let Some(Error::HttpRequestBodySize(n)) = cause.downcast_ref::<Error>() {
                return Sent::Failed(Error::HttpRequestBodySize(*n));
            }
            source = cause.source();
        }
        Sent::Failed(Error::Hyper(e))
    })?;

    let limit = policy.max_response_bytes;
    let declared = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared.filter(|&len| len > limit) {
        return Err(Sent::Failed(Error::HttpResponseBodySize(Some(len))));
    }
    let deadline = tokio::time::Instant::from_std(deadline);
    let response = response.map(|body| {
        let body = body.map_err(Error::from);
        Counted::new(body, limit, Error::HttpResponseBodySize(Some(limit)), Some(deadline)).boxed_unsync()
    });
    let io: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async move {
        if let Some(conn) = conn {
            // The connection ends with the response body, or at the request's deadline.
            match tokio::time::timeout_at(deadline, conn).await {
                Ok(done) => done.map_err(Error::Hyper)?,
                Err(_) => return Err(Error::HttpResponseTimeout),
            }
        }
        Ok(())
    });
    Ok((response, io))
}

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

/// Connects to the first of `addrs` that answers, each within `timeout`.
async fn connect(addrs: &[IpAddr], port: u16, timeout: Duration) -> Result<TcpStream, Error> {
    let mut last = Error::ConnectionRefused;
    for ip in addrs {
        match tokio::time::timeout(timeout, TcpStream::connect(SocketAddr::new(*ip, port))).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(e)) => last = Error::Connect(e),
            Err(_) => last = Error::ConnectionTimeout,
        }
    }
    Err(last)
}

/// The system's root certificates, read once per process.
fn system_roots() -> &'static [rustls_pki_types::CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<rustls_pki_types::CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!(target: "sluice::http", "reading the system's root certificates: {e}");
        }
        found.certs
    })
}

/// The handler's TLS client configuration: the system's roots and its `http_ca`, built once.
fn tls_config(policy: &HttpPolicy) -> Arc<rustls::ClientConfig> {
    policy
        .tls
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let (_, ignored) = roots.add_parsable_certificates(system_roots().iter().cloned());
            if ignored > 0 {
                tracing::debug!(target: "sluice::http", "{ignored} system root certificates could not be used");
            }
            for cert in &policy.extra_roots {
                if let Err(e) = roots.add(cert.clone()) {
                    tracing::warn!(target: "sluice::http", "an http_ca certificate cannot be used: {e}");
                }
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config =
                match rustls::ClientConfig::builder_with_provider(provider).with_safe_default_protocol_versions() {
                    Ok(builder) => builder.with_root_certificates(roots).with_no_client_auth(),
                    // The ring provider supports the default versions; this is not reached.
                    Err(_) => rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth(),
                };
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Arc::new(config)
        })
        .clone()
}

/// A body that fails with `over` past `limit` bytes, and (for responses) at `deadline`.
struct Counted<B> {
    inner: B,
    seen: u64,
    limit: u64,
    over: Option<Error>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Counted<B> {
    fn new(inner: B, limit: u64, over: Error, deadline: Option<tokio::time::Instant>) -> Self {
        Counted {
            inner,
            seen: 0,
            limit,
            over: Some(over),
            deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
        }
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes, Error = Error> + Unpin,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.seen = this.seen.saturating_add(data.len() as u64);
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(this.over.take().unwrap_or(Error::HttpResponseIncomplete))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Pending => {
                let expired = this.deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired { Poll::Ready(Some(Err(Error::HttpResponseTimeout))) } else { Poll::Pending }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
