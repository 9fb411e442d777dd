//! One message through one fresh instance of one handler, under its limits, with a typed
//! outcome. Nothing here talks to NATS: the source decides what an outcome means for the
//! message (ack, retry, dead-letter, reply).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::{Store, Trap, UpdateDeadline};

use crate::bindings::{Delivery, Failure as WitFailure, Message};
use crate::engine::{Engine, chain};
use crate::failure::{Failure, FailureKind};
use crate::handler::Handler;
use crate::host::{HostState, Outputs};
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

/// Runs `msg` through a fresh instance of `handler`, on the engine's guest threads when it
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

/// Runs `msg` through a fresh instance of `handler`, here.
pub async fn dispatch(
    engine: &Engine,
    handler: &Handler,
    scope: Option<Scope>,
    msg: &Message,
    delivery: &Delivery,
) -> Outcome {
    let spec = &handler.spec;
    let timeout = spec.limits.timeout;
    let mut store = Store::new(engine.wasmtime(), HostState::new(spec.clone(), msg.reply_to.clone(), scope));
    store.limiter(|state| &mut state.limits);

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
        let instance = handler.pre.instantiate_async(&mut store).await.map_err(|e| (true, e))?;
        instance.call_handle(&mut store, msg, delivery).await.map_err(|e| (false, e))
    };
    let result = match tokio::time::timeout(timeout, call).await {
        Ok(result) => result,
        Err(_) => Err((false, wasmtime::Error::new(DeadlineExceeded))),
    };

    if let Some(reason) = store.data_mut().outputs.over_limit.take() {
        // Whatever the handler made of the refusal, the call broke a limit.
        return Outcome::Failed(Failure { kind: FailureKind::OutputLimit, reason, retry_after: None });
    }
    match result {
        Ok(Ok(())) => Outcome::Success(std::mem::take(&mut store.data_mut().outputs)),
        Ok(Err(WitFailure::Reject(reason))) => {
            Outcome::Failed(Failure { kind: FailureKind::Rejected, reason, retry_after: None })
        }
        Ok(Err(WitFailure::Retry(hint))) => Outcome::Failed(Failure {
            kind: FailureKind::RetryRequested,
            reason: hint.reason,
            retry_after: hint.after_ms.map(Duration::from_millis),
        }),
        Err((instantiating, error)) => {
            let failure = classify(&error, instantiating, store.data(), timeout);
            tracing::debug!(handler = &*spec.name, kind = %failure.kind, error = %chain(&error), "call failed");
            Outcome::Failed(failure)
        }
    }
}

fn classify(error: &wasmtime::Error, instantiating: bool, state: &HostState, timeout: Duration) -> Failure {
    let (kind, reason) = if error.is::<DeadlineExceeded>() {
        (FailureKind::Timeout, format!("handler ran past its {} timeout", humantime::format_duration(timeout)))
    } else if state.limits.memory_exceeded {
        (
            FailureKind::MemoryLimit,
            format!("handler tried to grow its memory past {}", crate::manifest::ByteSize(state.spec.limits.memory)),
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
