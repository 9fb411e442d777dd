//! Sends the message payload to the URL in `[config] url` (without one: the payload's first
//! line is the URL and the rest the body) over `wasi:http` and publishes
//! what came back to `[config] output` (default `fetch.out`): `"<status> <body>"`, or
//! `"error <code>"` when the request failed or was refused (tests assert on the text).
//!
//! Other `[config]` keys: `method` (default `POST`), `requests` (send the request this many
//! times, default 1: for the request budget), `follow` (redirects followed, default 3; the
//! host checks each hop against the grants), `idempotency_key` (set the header itself),
//! `retry_on_5xx = true` (a 5xx response fails the attempt with `retry`, for redelivery tests).

use sluice_guest::{Message, Result};
use wasip2::http::outgoing_handler;
use wasip2::http::types::{ErrorCode, Fields, Method, OutgoingBody, OutgoingRequest, Scheme};
use wasip2::io::streams::StreamError;

fn handle(msg: Message) -> Result {
    let (url, payload) = match sluice_guest::config("url") {
        Some(url) => (url, msg.payload()),
        None => {
            let p = msg.payload();
            let end = p.iter().position(|&b| b == b'\n').unwrap_or(p.len());
            (String::from_utf8_lossy(&p[..end]).into_owned(), p.get(end + 1..).unwrap_or_default())
        }
    };
    let output = sluice_guest::config("output").unwrap_or_else(|| "fetch.out".to_owned());
    let requests: u32 = sluice_guest::config("requests").and_then(|n| n.parse().ok()).unwrap_or(1);
    let retry_on_5xx = sluice_guest::config("retry_on_5xx").as_deref() == Some("true");
    let mut text = String::new();
    for _ in 0..requests {
        text = match fetch(&url, payload) {
            Ok((status, _)) if status >= 500 && retry_on_5xx => {
                return Err(sluice_guest::Error::retry(format!("downstream answered {status}")));
            }
            Ok((status, body)) => format!("{status} {}", String::from_utf8_lossy(&body)),
            Err(e) => format!("error {e}"),
        };
        if text.starts_with("error") {
            break;
        }
    }
    sluice_guest::publish(&output, text)?;
    Ok(())
}

/// Sends one request and follows redirects (each a new request the host checks again).
fn fetch(url: &str, payload: &[u8]) -> std::result::Result<(u16, Vec<u8>), String> {
    let follow: u32 = sluice_guest::config("follow").and_then(|n| n.parse().ok()).unwrap_or(3);
    let mut url = url.to_owned();
    for _ in 0..=follow {
        let (status, location, body) = once(&url, payload)?;
        match location {
            Some(next) if (300..400).contains(&status) => {
                url = if next.starts_with('/') { format!("{}{next}", origin(&url)) } else { next };
            }
            _ => return Ok((status, body)),
        }
    }
    Err("too many redirects".to_owned())
}

fn origin(url: &str) -> &str {
    let after = url.find("://").map_or(0, |i| i + 3);
    match url[after..].find('/') {
        Some(i) => &url[..after + i],
        None => url,
    }
}

type Fetched = (u16, Option<String>, Vec<u8>);

fn once(url: &str, payload: &[u8]) -> std::result::Result<Fetched, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("not a URL: {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let headers = Fields::new();
    let _ = headers.append("content-type", b"application/octet-stream");
    if let Some(key) = sluice_guest::config("idempotency_key") {
        let _ = headers.append("idempotency-key", key.as_bytes());
    }
    let request = OutgoingRequest::new(headers);
    let method = match sluice_guest::config("method").as_deref() {
        Some("GET") => Method::Get,
        Some("PUT") => Method::Put,
        _ => Method::Post,
    };
    let _ = request.set_method(&method);
    let _ = request.set_scheme(Some(&match scheme {
        "https" => Scheme::Https,
        "http" => Scheme::Http,
        other => Scheme::Other(other.to_owned()),
    }));
    let _ = request.set_authority(Some(authority));
    let _ = request.set_path_with_query(Some(path));
    let body = request.body().map_err(|()| "no request body".to_owned())?;
    let sending = outgoing_handler::handle(request, None).map_err(|e| code(&e))?;
    // A request the host refused (or failed) closes its body: the response says why.
    let mut written = Ok(());
    {
        let stream = body.write().map_err(|()| "no body stream".to_owned())?;
        for chunk in payload.chunks(4096) {
            if let Err(e) = stream.blocking_write_and_flush(chunk) {
                written = Err(stream_error(e));
                break;
            }
        }
    }
    if written.is_ok() {
        written = OutgoingBody::finish(body, None).map_err(|e| code(&e));
    }
    sending.subscribe().block();
    let response = match sending.get() {
        Some(Ok(Ok(response))) => response,
        Some(Ok(Err(e))) => return Err(code(&e)),
        Some(Err(())) | None => return Err(written.err().unwrap_or_else(|| "no response".to_owned())),
    };
    written?;
    let status = response.status();
    let location = response.headers().get("location").first().map(|v| String::from_utf8_lossy(v).into_owned());
    let incoming = response.consume().map_err(|()| "no response body".to_owned())?;
    let mut bytes = Vec::new();
    {
        let stream = incoming.stream().map_err(|()| "no response stream".to_owned())?;
        loop {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => bytes.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => return Err(stream_error(e)),
            }
        }
    }
    Ok((status, location, bytes))
}

fn stream_error(e: StreamError) -> String {
    match e {
        StreamError::Closed => "stream closed".to_owned(),
        StreamError::LastOperationFailed(err) => match wasip2::http::types::http_error_code(&err) {
            Some(c) => code(&c),
            None => err.to_debug_string(),
        },
    }
}

/// The error code's variant, as the tests match it (`HttpRequestDenied`, ...).
fn code(e: &ErrorCode) -> String {
    let text = format!("{e:?}");
    let text = text.strip_prefix("ErrorCode::").unwrap_or(&text);
    text.split(['(', ' ', '{']).next().unwrap_or(text).to_owned()
}

sluice_guest::handler!(handle);
