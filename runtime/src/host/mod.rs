//! The host side of the WIT contract: one file per interface, all over [`HostState`], the
//! per-call state kept in the store.

mod config;
pub mod http;
mod log;
mod outbox;
mod state;
mod stdio;

use std::sync::Arc;

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

pub(crate) use outbox::refused_header;
pub use stdio::{GuestOutput, LogBudget};

use crate::bindings;
use crate::outputs::Outputs;
use crate::spec::HandlerSpec;
use crate::store::{Scope, WriteSet};

/// Everything one call of one handler can reach. A fresh one is built for every message and
/// dropped with the store, unless the handler asks for warm instances: then it lives with
/// its instance, and [`next_call`](HostState::next_call) resets what belongs to one call.
pub struct HostState {
    pub(crate) spec: Arc<HandlerSpec>,
    /// Built on the guest's first WASI call (most handlers make none per message; building
    /// one seeds two random generators and allocates a dozen small objects).
    wasi: Option<WasiCtx>,
    pub(crate) table: ResourceTable,
    pub(crate) limits: GuestLimits,
    /// The reply subject of the message being handled.
    pub(crate) reply_to: Option<String>,
    /// The handler's store, for the guest's dedup marks and kv.
    pub(crate) scope: Option<Scope>,
    pub(crate) outputs: Outputs,
    /// The call's writes to its kv and dedup marks, committed only if it succeeds.
    pub(crate) writes: WriteSet,
    /// What the call may still log.
    pub(crate) log_budget: LogBudget,
    /// Outbound HTTP (`wasi:http`): the grants, the call's idempotency key and request count.
    pub(crate) http: http::HttpCall,
}

impl std::fmt::Debug for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostState").field("handler", &self.spec.name).finish_non_exhaustive()
    }
}

impl HostState {
    pub(crate) fn new(
        spec: Arc<HandlerSpec>,
        reply_to: Option<String>,
        scope: Option<Scope>,
        key: Option<String>,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Self {
        HostState {
            http: http::HttpCall::new(spec.name.clone(), spec.manifest.http.clone(), key, metrics),
            limits: GuestLimits::new(spec.manifest.limits.memory),
            log_budget: LogBudget::new(spec.manifest.limits.max_log_bytes),
            spec,
            wasi: None,
            table: ResourceTable::new(),
            reply_to,
            scope,
            outputs: Outputs::default(),
            writes: WriteSet::default(),
        }
    }

    /// Readies the state of a warm instance for its next call: the call's own outputs, reply
    /// subject, store and log budget. What the guest keeps between calls (its memory, the
    /// WASI handles it holds) stays.
    pub(crate) fn next_call(&mut self, reply_to: Option<String>, scope: Option<Scope>, key: Option<String>) {
        self.http.next_call(key);
        self.outputs = Outputs::default();
        self.writes = WriteSet::default();
        self.reply_to = reply_to;
        self.scope = scope;
        self.log_budget.reset(self.spec.manifest.limits.max_log_bytes);
    }

    /// Ends a call: says how many of its log bytes were dropped, if any.
    pub(crate) fn end_call(&mut self) {
        let dropped = self.log_budget.dropped();
        if dropped > 0 {
            tracing::warn!(
                target: "sluice::guest",
                handler = &*self.spec.name,
                "{dropped} bytes of guest logs dropped: over limits.max_log_bytes ({}) for one message",
                self.spec.manifest.limits.max_log_bytes
            );
            self.log_budget.reset(0);
        }
    }

    /// The call's WASI context. Guests get no filesystem (no preopens), no environment, no
    /// arguments and no network (every socket address is denied, and TCP, UDP and name
    /// lookup are off). Their stdout and stderr become log lines tagged with the handler name.
    fn wasi_ctx(spec: &HandlerSpec, log_budget: &LogBudget) -> WasiCtx {
        let mut wasi = WasiCtx::builder();
        wasi.stdout(GuestOutput::new(spec.name.clone(), "stdout", log_budget.clone()))
            .stderr(GuestOutput::new(spec.name.clone(), "stderr", log_budget.clone()))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false);
        wasi.build()
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let HostState { wasi, table, spec, log_budget, .. } = self;
        let ctx = wasi.get_or_insert_with(|| HostState::wasi_ctx(spec, log_budget));
        WasiCtxView { ctx, table }
    }
}

impl wasmtime_wasi_http::WasiHttpView for HostState {
    fn http(&mut self) -> wasmtime_wasi_http::WasiHttpCtxView<'_> {
        let HostState { table, http, .. } = self;
        wasmtime_wasi_http::WasiHttpCtxView { ctx: &mut http.ctx, table, hooks: &mut http.hooks }
    }
}

/// Adds WASI (sandboxed as above), `wasi:http` (every request checked against the manifest's
/// grants, see [`http`]) and the Sluice interfaces to `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker)?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)?;
    bindings::Handler::add_to_linker::<HostState, HasSelf<HostState>>(linker, |s| s)?;
    Ok(())
}

/// The store's resource limiter: the manifest's memory cap, remembering whether it was hit
/// so that the failure is reported as `memory-limit` rather than as the trap that follows.
#[derive(Debug)]
pub struct GuestLimits {
    inner: StoreLimits,
    memory: usize,
    pub(crate) memory_exceeded: bool,
}

impl GuestLimits {
    fn new(memory: u64) -> Self {
        let memory = usize::try_from(memory).unwrap_or(usize::MAX);
        GuestLimits {
            inner: StoreLimitsBuilder::new().memory_size(memory).table_elements(1 << 20).build(),
            memory,
            memory_exceeded: false,
        }
    }
}

impl ResourceLimiter for GuestLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.memory_exceeded = true;
        }
        self.inner.memory_growing(current, desired, maximum)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }
}
