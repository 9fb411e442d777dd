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
use crate::store::Scope;

/// How one call ended.
#[derive(Debug)]
pub enum Outcome {
    /// `handle` returned `ok`: send these.
    Success(Outputs),
    /// It did not; nothing it queued is sent.
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

/// Runs `msg` through an instance of `handler`, on the engine's guest threads when it
/// has them (see [`Engine::guests`]), where it is called otherwise.
pub async fn run(
    engine: &Arc<Engine>,
    handler: &Arc<Handler>,
    scope: Option<Scope>,
    msg: &Arc<Message>,
    delivery: Delivery,
) -> Outcome {
    let Some(guests) = engine.guests() else {
        return dispatch(engine, handler, scope, msg, &delivery).await;
    };
    let (engine, handler, msg) = (engine.clone(), handler.clone(), msg.clone());
    let call = async move { dispatch(&engine, &handler, scope, &msg, &delivery).await };
    guests.spawn(call).await.unwrap_or_else(|e| {
        Outcome::Failed(Failure {
            kind: FailureKind::Trap,
            reason: format!("the call ended abnormally: {e}"),
            retry_after: None,
        })
    })
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
            w.store.data_mut().next_call(msg.reply_to.clone(), scope);
            w
        }
        None => {
            let mut store = Store::new(engine.wasmtime(), HostState::new(spec.clone(), msg.reply_to.clone(), scope));
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
        (None, Ok(Ok(()))) => Outcome::Success(std::mem::take(&mut store.data_mut().outputs)),
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
