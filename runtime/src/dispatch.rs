//! One message through one instance of one handler (fresh, or warm when the manifest asks),
//! under its limits, with a typed outcome. Nothing here talks to NATS: the source decides what an outcome means for the
//! message (ack, retry, dead-letter, reply).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap, UpdateDeadline};

use crate::bindings::{Delivery, Failure as WitFailure, Message};
use crate::engine::{Engine, chain};
use crate::failure::{Failure, FailureKind};
use crate::handler::Handler;
use crate::host::HostState;
use crate::instance::WarmInstance;
use crate::manifest::Instances;
use crate::outputs::Outputs;
use crate::store::{Scope, WriteSet};

/// How one call ended.
#[derive(Debug)]
pub enum Outcome {
    /// `handle` returned `ok`: send these outputs and commit these writes.
    Success(Outputs, WriteSet),
    /// It did not; nothing it queued is sent, nothing it wrote is kept.
    Failed(Failure),
}

/// The error the epoch callback raises when a call's deadline has passed.
#[derive(Debug)]
struct DeadlineExceeded;

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("deadline exceeded")
    }
}

impl std::error::Error for DeadlineExceeded {}

/// One call of a batch: which entry of the batch it is, and what the call needs.
#[derive(Debug)]
pub struct Call {
    /// The entry's index in its batch, given back with its outcome.
    pub index: usize,
    pub scope: Option<Scope>,
    pub msg: Arc<Message>,
    pub delivery: Delivery,
    /// The message's span: the call's log lines (the guest's included) are inside it.
    pub span: tracing::Span,
}

/// The outcome of one call of a batch, and how long the call took.
#[derive(Debug)]
pub struct Ended {
    pub index: usize,
    pub outcome: Outcome,
    pub took: Duration,
}

/// The outcomes of a batch, each as soon as its call ends.
#[derive(Debug)]
pub struct Outcomes {
    rx: tokio::sync::mpsc::UnboundedReceiver<Ended>,
    /// Calls whose outcome has not come back yet, by index.
    pending: Vec<usize>,
}

impl Outcomes {
    /// The next outcome to end, or `None` once every call's has been given. A call whose
    /// guest task ended without an outcome (a panic in the host) is given as a trap.
    pub async fn next(&mut self) -> Option<Ended> {
        if self.pending.is_empty() {
            return None;
        }
        let ended = match self.rx.recv().await {
            Some(ended) => ended,
            None => Ended {
                index: self.pending[0],
                outcome: Outcome::Failed(Failure {
                    kind: FailureKind::Trap,
                    reason: "the call ended abnormally".to_owned(),
                    retry_after: None,
                }),
                took: Duration::ZERO,
            },
        };
        if let Some(at) = self.pending.iter().position(|&i| i == ended.index) {
            self.pending.swap_remove(at);
        }
        Some(ended)
    }
}

/// Runs a batch of calls of `handler` and returns their outcomes as they end.
///
/// On the engine's guest threads (see [`Engine::guests`]) the batch crosses to them in one
/// hand-off, not one per call: waking a guest thread from the I/O threads is the costly part
/// of a hop. There each call becomes a task of its own, so that the guest runtime's
/// scheduler shares the threads between calls as it did call by call (a call spinning until
/// its deadline yields at every epoch tick and is stolen away from a busy thread like any
/// task). Without guest threads the calls are tasks on the current runtime.
pub fn run_batch(engine: &Arc<Engine>, handler: &Arc<Handler>, calls: Vec<Call>) -> Outcomes {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pending: Vec<usize> = calls.iter().map(|c| c.index).collect();
    let spawn_all = {
        let (engine, handler) = (engine.clone(), handler.clone());
        move || {
            for call in calls {
                let (engine, handler, tx) = (engine.clone(), handler.clone(), tx.clone());
                // The receiver is gone only when the batch was abandoned (shutdown).
                drop(tokio::spawn(async move { drop(tx.send(one(&engine, &handler, call).await)) }));
            }
        }
    };
    match engine.guests() {
        Some(guests) => drop(guests.spawn(async move { spawn_all() })),
        None => spawn_all(),
    }
    Outcomes { rx, pending }
}

async fn one(engine: &Engine, handler: &Handler, call: Call) -> Ended {
    use tracing::Instrument;
    let started = Instant::now();
    let outcome = dispatch(engine, handler, call.scope, &call.msg, &call.delivery).instrument(call.span).await;
    Ended { index: call.index, outcome, took: started.elapsed() }
}

/// Runs `msg` through an instance of `handler`, here: a fresh one, or with warm instances
/// an idle one of this version (or a new one), put back afterwards if the call ended normally.
pub async fn dispatch(
    engine: &Engine,
    handler: &Handler,
    scope: Option<Scope>,
    msg: &Message,
    delivery: &Delivery,
) -> Outcome {
    let spec = &handler.spec;
    let timeout = spec.manifest.limits.timeout;
    let recycle_after = match spec.manifest.limits.instances {
        Instances::Fresh => None,
        Instances::Warm { recycle_after } => Some(recycle_after),
    };
    let mut warm = match recycle_after.and_then(|_| handler.warm.take()) {
        Some(mut w) => {
            w.store.data_mut().next_call(msg.reply_to.clone(), scope, delivery.idempotency_key.clone());
            w
        }
        None => {
            let state = HostState::new(
                spec.clone(),
                msg.reply_to.clone(),
                scope,
                delivery.idempotency_key.clone(),
                engine.metrics(),
            );
            let mut store = Store::new(engine.wasmtime(), state);
            store.limiter(|state| &mut state.limits);
            WarmInstance::new(store)
        }
    };
    let WarmInstance { store, instance, served } = &mut warm;

    // Guest code yields to the executor at every epoch tick (so a busy guest cannot hold a
    // worker thread) and is stopped at the first tick past its deadline.
    let deadline = Instant::now() + timeout;
    store.epoch_deadline_callback(move |_| {
        if Instant::now() >= deadline {
            Err(wasmtime::Error::new(DeadlineExceeded))
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    store.set_epoch_deadline(1);

    // The epoch stops guest code; this timer stops a guest waiting in a host call (a WASI
    // sleep, say), where no epoch check runs.
    let call = async {
        if instance.is_none() {
            *instance = Some(handler.pre.instantiate_async(&mut *store).await.map_err(|e| (true, e))?);
        }
        match instance {
            Some(i) => i.call_handle(&mut *store, msg, delivery).await.map_err(|e| (false, e)),
            None => Err((true, wasmtime::Error::msg("no instance"))),
        }
    };
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err((false, wasmtime::Error::new(DeadlineExceeded))),
    };
    *served += 1;
    store.data_mut().end_call();

    let over_limit = store.data_mut().outputs.over_limit.take();
    // Only a call that ended as the handler meant it leaves an instance fit for the next.
    let normal_end = result.is_ok() && over_limit.is_none() && !store.data().limits.memory_exceeded;
    let outcome = match (over_limit, result) {
        // Whatever the handler made of the refusal, the call broke a limit.
        (Some(reason), _) => Outcome::Failed(Failure { kind: FailureKind::OutputLimit, reason, retry_after: None }),
        (None, Ok(Ok(()))) => {
            let state = store.data_mut();
            Outcome::Success(std::mem::take(&mut state.outputs), std::mem::take(&mut state.writes))
        }
        (None, Ok(Err(WitFailure::Reject(reason)))) => {
            Outcome::Failed(Failure { kind: FailureKind::Rejected, reason, retry_after: None })
        }
        (None, Ok(Err(WitFailure::Retry(hint)))) => Outcome::Failed(Failure {
            kind: FailureKind::RetryRequested,
            reason: hint.reason,
            retry_after: hint.after_ms.map(Duration::from_millis),
        }),
        (None, Err((instantiating, error))) => {
            let failure = classify(&error, instantiating, store.data(), timeout);
            tracing::debug!(handler = &*spec.name, kind = %failure.kind, error = %chain(&error), "call failed");
            Outcome::Failed(failure)
        }
    };
    if let Some(limit) = recycle_after
        && normal_end
        && *served < limit
    {
        handler.warm.put(warm);
    }
    outcome
}

fn classify(error: &wasmtime::Error, instantiating: bool, state: &HostState, timeout: Duration) -> Failure {
    let (kind, reason) = if error.is::<DeadlineExceeded>() {
        (FailureKind::Timeout, format!("handler ran past its {} timeout", humantime::format_duration(timeout)))
    } else if state.limits.memory_exceeded {
        (
            FailureKind::MemoryLimit,
            format!(
                "handler tried to grow its memory past {}",
                crate::manifest::ByteSize(state.spec.manifest.limits.memory)
            ),
        )
    } else if let Some(trap) = error.downcast_ref::<Trap>() {
        (FailureKind::Trap, trap.to_string())
    } else if instantiating {
        (FailureKind::Instantiation, chain(error))
    } else {
        // A host function failed in a way that traps the guest.
        (FailureKind::Trap, chain(error))
    };
    Failure { kind, reason, retry_after: None }
}
