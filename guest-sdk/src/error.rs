use std::fmt;
use std::time::Duration;

use crate::__bindings::sluice::handler::types::{Failure, RetryHint};

/// What a handler returns: `Ok(())`, or an [`Error`] saying whether to retry.
pub type Result<T = (), E = Error> = std::result::Result<T, E>;

/// How a handler fails.
///
/// `?` converts a [`PublishError`] (a capability refusal, which a retry will not fix) into
/// [`Error::Reject`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// A transient failure: the host runs the message again following the retry policy,
    /// waiting at least `after` when it is set (clamped to the policy's maximum delay).
    Retry {
        /// Why this attempt failed.
        reason: String,
        /// The smallest delay before the next attempt.
        after: Option<Duration>,
    },
    /// A permanent failure: the message is dead-lettered with this reason, not retried.
    Reject(String),
}

impl Error {
    /// A transient failure; see [`Error::Retry`].
    pub fn retry(reason: impl Into<String>) -> Self {
        Error::Retry { reason: reason.into(), after: None }
    }

    /// A transient failure that should not be retried before `after`.
    pub fn retry_after(reason: impl Into<String>, after: Duration) -> Self {
        Error::Retry { reason: reason.into(), after: Some(after) }
    }

    /// A permanent failure; see [`Error::Reject`].
    pub fn reject(reason: impl Into<String>) -> Self {
        Error::Reject(reason.into())
    }

    pub(crate) fn into_wit(self) -> Failure {
        match self {
            Error::Retry { reason, after } => Failure::Retry(RetryHint {
                reason,
                after_ms: after.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            }),
            Error::Reject(reason) => Failure::Reject(reason),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Retry { reason, after: Some(after) } => {
                write!(f, "retry after {after:?}: {reason}")
            }
            Error::Retry { reason, after: None } => write!(f, "retry: {reason}"),
            Error::Reject(reason) => write!(f, "reject: {reason}"),
        }
    }
}

impl std::error::Error for Error {}

/// The host refused an output: the subject is not in `capabilities.publish`, or a reply
/// was asked for a message that has no reply subject. The text says which.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishError(pub String);

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for PublishError {}

impl From<PublishError> for Error {
    fn from(e: PublishError) -> Self {
        Error::Reject(e.0)
    }
}
