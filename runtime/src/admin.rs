//! The admin HTTP listener (off unless asked for, with `sluice run --admin ADDR`):
//!
//! | route | answers |
//! |---|---|
//! | `GET /metrics` | Prometheus text format (see [`crate::Metrics`] and the README's metrics table) |
//! | `GET /healthz` | 200 while the process is alive: `ok`, or `degraded: ...` naming each handler whose outbox has held outputs for more than 5 s (the broker or a target stream is not taking them) |
//! | `GET /readyz` | 200 once every handler is loaded and bound and NATS is connected; 503 (with the reason) otherwise |
//! | `GET /handlers` | JSON: each handler's version, source, counters, parked ordering keys and last reload error, and the reload errors of files that serve nothing |
//! | `POST /reload` | reloads the manifests (as SIGHUP does) and answers with what changed |
//!
//! With a token ([`AdminState::with_token`], `--admin-token`), `/handlers` and `/reload`
//! answer 401 unless the request carries `Authorization: Bearer <token>`: one reloads code
//! and the other shows what is deployed. `/metrics`, `/healthz` and `/readyz` stay open, for
//! scrapers and probes that carry no secrets.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use async_nats::Client;
use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::metrics::{CountsSnapshot, Metrics};
use crate::runtime::Reloader;
use crate::status::{HandlerStatus, Status};

/// What the admin routes read. The NATS client and the reloader arrive once the runtime is
/// bound; until then `/readyz` says not ready.
#[derive(Debug, Clone)]
pub struct AdminState {
    metrics: Arc<Metrics>,
    status: Arc<Status>,
    bound: Arc<RwLock<Option<(Client, Reloader)>>>,
    /// The bearer token `/handlers` and `/reload` require, if any.
    token: Option<Arc<str>>,
}

impl AdminState {
    /// An admin state over a runtime's metrics and status (not yet bound to NATS).
    pub fn new(metrics: Arc<Metrics>, status: Arc<Status>) -> Self {
        AdminState { metrics, status, bound: Arc::default(), token: None }
    }

    /// Requires `Authorization: Bearer <token>` on `/handlers` and `/reload`.
    ///
    /// # Examples
    ///
    /// ```no_run
    /// # fn f(metrics: std::sync::Arc<sluice::Metrics>, status: std::sync::Arc<sluice::Status>) {
    /// let state = sluice::admin::AdminState::new(metrics, status).with_token(Some("s3cret".into()));
    /// # }
    /// ```
    #[must_use]
    pub fn with_token(mut self, token: Option<String>) -> Self {
        self.token = token.filter(|t| !t.is_empty()).map(Into::into);
        self
    }

    /// Every handler is bound: readiness now depends on the NATS connection.
    pub fn bound(&self, client: Client, reloader: Reloader) {
        if let Ok(mut b) = self.bound.write() {
            *b = Some((client, reloader));
        }
    }

    fn client_and_reloader(&self) -> Option<(Client, Reloader)> {
        self.bound.read().ok().and_then(|b| b.clone())
    }
}

/// Serves the admin routes on `listener` until the task is dropped or aborted.
pub fn serve(listener: TcpListener, state: AdminState) -> tokio::task::JoinHandle<()> {
    let guarded = Router::new()
        .route("/handlers", get(handlers))
        .route("/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .merge(guarded)
        .with_state(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("admin listener stopped: {e}");
        }
    })
}

/// Lets the request through when no token is set or it carries the right one.
async fn require_token(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
            return (StatusCode::UNAUTHORIZED, [("www-authenticate", "Bearer")], "a bearer token is required\n")
                .into_response();
        }
    }
    next.run(request).await
}

/// Compares without stopping at the first difference, so the answer's timing does not
/// reveal how much of a guessed token was right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// An outbox whose oldest entry is older than this makes `/healthz` say `degraded`.
const OUTBOX_DEGRADED_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// Alive (200) always; the text says `degraded` while outputs wait in an outbox: the process
/// works and must not be restarted for it (`/readyz` stays ready), but its outputs are late.
async fn healthz(State(state): State<AdminState>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let late: Vec<String> = state
        .status
        .handlers()
        .iter()
        .filter_map(|h| {
            let c = state.metrics.handler(&h.name).snapshot();
            let age = std::time::Duration::from_millis(now.saturating_sub(c.outbox_oldest_ms));
            (c.outbox > 0 && c.outbox_oldest_ms > 0 && age > OUTBOX_DEGRADED_AFTER)
                .then(|| format!("handler {}: outbox {} messages, oldest {}s", h.name, c.outbox, age.as_secs()))
        })
        .collect();
    match late.is_empty() {
        true => "ok\n".to_owned(),
        false => format!("degraded: {}\n", late.join("; ")),
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.client_and_reloader() {
        None => (StatusCode::SERVICE_UNAVAILABLE, "not ready: handlers are not bound yet\n".to_owned()),
        Some((client, _)) => match client.connection_state() {
            async_nats::connection::State::Connected => (StatusCode::OK, "ready\n".to_owned()),
            other => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: NATS connection is {other}\n")),
        },
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let connected = state
        .client_and_reloader()
        .is_some_and(|(c, _)| c.connection_state() == async_nats::connection::State::Connected);
    state.metrics.nats_connected.set(if connected { 1.0 } else { 0.0 });
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render())
}

/// `/handlers`: one entry per handler served, plus reload errors of other files.
#[derive(Debug, Serialize, serde::Deserialize)]
pub struct HandlersReport {
    /// The handlers served, by name.
    pub handlers: Vec<HandlerReport>,
    /// Reload errors by manifest file (a new manifest that never loaded shows only here).
    pub reload_errors: BTreeMap<String, String>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
/// One handler in [`HandlersReport`]: what is served and its counters.
pub struct HandlerReport {
    #[serde(flatten)]
    /// What is served, in which version.
    pub status: HandlerStatus,
    /// Its counters since the runtime started.
    pub counters: CountsSnapshot,
    /// Ordering keys parked after a dead letter (`on_poison = "park"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parked_keys: Vec<String>,
}

async fn handlers(State(state): State<AdminState>) -> Json<HandlersReport> {
    let handlers = state
        .status
        .handlers()
        .into_iter()
        .map(|status| {
            let counters = state.metrics.handler(&status.name).snapshot();
            let parked_keys = state.status.parked_keys(&status.name);
            HandlerReport { status, counters, parked_keys }
        })
        .collect();
    Json(HandlersReport { handlers, reload_errors: state.status.reload_errors() })
}

#[derive(Debug, Serialize)]
struct ReloadAnswer {
    started: Vec<String>,
    updated: Vec<String>,
    stopped: Vec<String>,
    errors: Vec<String>,
}

async fn reload(State(state): State<AdminState>) -> impl IntoResponse {
    let Some((_, reloader)) = state.client_and_reloader() else {
        return (StatusCode::SERVICE_UNAVAILABLE, Json(None));
    };
    let r = reloader.reload().await;
    let answer = ReloadAnswer {
        started: r.started,
        updated: r.updated,
        stopped: r.stopped,
        errors: r.errors.iter().map(ToString::to_string).collect(),
    };
    (StatusCode::OK, Json(Some(answer)))
}
