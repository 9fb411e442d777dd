//! The retry policy of a handler: how many attempts, how long between them, and which
//! failures are worth retrying at all.
//!
//! Delays grow from `initial` (constant, or multiplied by `multiplier` per attempt) up to
//! `max`, then jitter spreads them: `full` draws uniformly from `[0, delay]` (the default:
//! it breaks up retry storms best), `equal` from `[delay/2, delay]`, `none` keeps the delay.
//! A handler's retry-after hint raises the delay to at least the hint, clamped to `max`.

use std::collections::HashSet;
use std::time::Duration;

use crate::failure::{Failure, FailureKind};

/// How delays grow between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backoff {
    Constant,
    Exponential,
}

/// How delays are randomised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Jitter {
    Full,
    Equal,
    None,
}

/// A handler's retry policy, with defaults applied.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included; 1 means never retry.
    pub max_attempts: u32,
    pub backoff: Backoff,
    pub initial: Duration,
    pub max: Duration,
    pub multiplier: f64,
    pub jitter: Jitter,
    /// Failure kinds that are retried; any other kind is dead-lettered at once.
    pub retry_on: HashSet<FailureKind>,
}

/// Failure kinds retried when the manifest does not say: the transient ones. A reject is
/// the handler saying a retry cannot help, and a memory-limit hit is deterministic for a
/// given message, so neither is retried by default.
pub const DEFAULT_RETRY_ON: [FailureKind; 6] = [
    FailureKind::RetryRequested,
    FailureKind::Trap,
    FailureKind::Timeout,
    FailureKind::Instantiation,
    FailureKind::OutputFailed,
    FailureKind::StoreError,
];

/// Failure kinds that `retry_on` may name. A reject is final by definition, and
/// `retries-exhausted` is the verdict, not a failure.
pub const RETRYABLE: [FailureKind; 7] = [
    FailureKind::RetryRequested,
    FailureKind::Trap,
    FailureKind::Timeout,
    FailureKind::MemoryLimit,
    FailureKind::Instantiation,
    FailureKind::OutputFailed,
    FailureKind::StoreError,
];

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            backoff: Backoff::Exponential,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(30),
            multiplier: 2.0,
            jitter: Jitter::Full,
            retry_on: DEFAULT_RETRY_ON.into_iter().collect(),
        }
    }
}

/// The wait after the broker did not take a call's outputs for the `n`th time in a row
/// (1-based; [`FailureKind::BrokerBusy`]): 1 s doubling to 10 s (the back-off Azure Service
/// Bus asks of a client told "server busy"), with equal jitter so that many messages do not
/// come back at the same moment. Not the handler's retry policy: such a retry is not an
/// attempt.
pub fn broker_backoff(n: u32) -> Duration {
    let base = Duration::from_secs(1).saturating_mul(1u32 << n.saturating_sub(1).min(4)).min(Duration::from_secs(10));
    base / 2 + base.mul_f64(fastrand::f64() / 2.0)
}

/// A handler's shared back-off while the broker does not take its outputs (or its pulls):
/// one streak per handler, not per message, so that a busy or absent target is asked again
/// once per step (1 s doubling to 10 s, [`broker_backoff`]) rather than once per message.
/// A JetStream handler gives what it receives during a step back to the server until the
/// step ends, without calling the handler.
#[derive(Debug, Default)]
pub struct BrokerPause {
    /// Consecutive steps; 0 while the broker takes what it is sent (the hot path reads only
    /// this).
    streak: std::sync::atomic::AtomicU32,
    state: std::sync::Mutex<PauseState>,
}

#[derive(Debug, Default)]
struct PauseState {
    until: Option<tokio::time::Instant>,
    /// Refusals since the last log line.
    refused: u64,
}

impl BrokerPause {
    fn lock(&self) -> std::sync::MutexGuard<'_, PauseState> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The broker refused (`why`): the time until the handler's current step ends, starting
    /// the next step when none is running. Logged once per step, with the refusals counted
    /// since the last line.
    pub fn refused(&self, why: &str) -> Duration {
        use std::sync::atomic::Ordering::Relaxed;
        let now = tokio::time::Instant::now();
        let mut state = self.lock();
        state.refused += 1;
        if let Some(until) = state.until
            && until > now
        {
            return until - now;
        }
        let streak = self.streak.fetch_add(1, Relaxed).saturating_add(1);
        let delay = broker_backoff(streak);
        state.until = Some(now + delay);
        tracing::warn!(
            refused = std::mem::take(&mut state.refused),
            step = streak,
            back_in = ?delay,
            "the broker is not taking this handler's messages ({why}); backing off (not counted as attempts)"
        );
        delay
    }

    /// The broker took what it was sent: the streak ends.
    pub fn recovered(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.streak.load(Relaxed) != 0 {
            self.streak.store(0, Relaxed);
            let mut state = self.lock();
            state.until = None;
            tracing::info!(
                refused = std::mem::take(&mut state.refused),
                "the broker takes this handler's messages again"
            );
        }
    }

    /// What is left of the current step, while one runs.
    pub fn remaining(&self) -> Option<Duration> {
        if self.streak.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return None;
        }
        let now = tokio::time::Instant::now();
        self.lock().until.filter(|u| *u > now).map(|u| u - now)
    }

    /// Waits for the current step to end (at once, when none runs).
    pub async fn wait(&self) {
        if self.streak.load(std::sync::atomic::Ordering::Relaxed) == 0 {
            return;
        }
        let until = self.lock().until;
        if let Some(until) = until {
            tokio::time::sleep_until(until).await;
        }
    }
}

/// What to do with a message after a failed attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Run it again after this delay.
    Retry(Duration),
    /// Give up: dead-letter it with this kind.
    GiveUp(FailureKind),
}

impl RetryPolicy {
    /// What to do after `failure` on attempt `attempt` (1-based).
    pub fn decide(&self, failure: &Failure, attempt: u32) -> Decision {
        if !self.retry_on.contains(&failure.kind) {
            return Decision::GiveUp(failure.kind);
        }
        if attempt >= self.max_attempts {
            // With a single attempt configured nothing was "exhausted": report the failure.
            let kind = if self.max_attempts > 1 { FailureKind::RetriesExhausted } else { failure.kind };
            return Decision::GiveUp(kind);
        }
        Decision::Retry(self.delay(attempt, failure.retry_after))
    }

    /// The delay after failed attempt `attempt`, honouring the handler's hint.
    pub fn delay(&self, attempt: u32, hint: Option<Duration>) -> Duration {
        let base = match self.backoff {
            Backoff::Constant => self.initial,
            Backoff::Exponential => {
                let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
                let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
                Duration::try_from_secs_f64(secs).unwrap_or(self.max)
            }
        }
        .min(self.max);
        let jittered = match self.jitter {
            Jitter::None => base,
            Jitter::Full => base.mul_f64(fastrand::f64()),
            Jitter::Equal => base / 2 + (base / 2).mul_f64(fastrand::f64()),
        };
        match hint {
            Some(hint) => jittered.max(hint.min(self.max)),
            None => jittered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(kind: FailureKind) -> Failure {
        Failure { kind, reason: "r".into(), retry_after: None }
    }

    fn policy(jitter: Jitter) -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter,
            ..RetryPolicy::default()
        }
    }

    #[test]
    fn exponential_delays_grow_and_are_capped() {
        let p = policy(Jitter::None);
        let delays: Vec<u128> = (1..=6).map(|a| p.delay(a, None).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        let constant = RetryPolicy { backoff: Backoff::Constant, ..p };
        assert_eq!(constant.delay(5, None), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_its_range() {
        for attempt in 1..=5 {
            let cap = policy(Jitter::None).delay(attempt, None);
            for _ in 0..200 {
                let full = policy(Jitter::Full).delay(attempt, None);
                assert!(full <= cap);
                let equal = policy(Jitter::Equal).delay(attempt, None);
                assert!(equal >= cap / 2 && equal <= cap, "{equal:?} not in [{:?}, {cap:?}]", cap / 2);
            }
        }
        // Full jitter really spreads: 200 draws are not all the same.
        let draws: HashSet<Duration> = (0..200).map(|_| policy(Jitter::Full).delay(3, None)).collect();
        assert!(draws.len() > 100);
    }

    #[test]
    fn the_hint_raises_the_delay_but_not_past_the_cap() {
        let p = policy(Jitter::Full);
        assert!(p.delay(1, Some(Duration::from_millis(700))) >= Duration::from_millis(700));
        assert_eq!(p.delay(1, Some(Duration::from_secs(60))), Duration::from_secs(1));
    }

    #[test]
    fn decisions() {
        let p = policy(Jitter::None);
        assert_eq!(p.decide(&failure(FailureKind::Trap), 1), Decision::Retry(Duration::from_millis(100)));
        assert_eq!(p.decide(&failure(FailureKind::Trap), 5), Decision::GiveUp(FailureKind::RetriesExhausted));
        assert_eq!(p.decide(&failure(FailureKind::Rejected), 1), Decision::GiveUp(FailureKind::Rejected));
        assert_eq!(p.decide(&failure(FailureKind::MemoryLimit), 1), Decision::GiveUp(FailureKind::MemoryLimit));
        let once = RetryPolicy { max_attempts: 1, ..p };
        assert_eq!(once.decide(&failure(FailureKind::Timeout), 1), Decision::GiveUp(FailureKind::Timeout));
    }
}
