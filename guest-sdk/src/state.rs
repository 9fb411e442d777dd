//! The handler's own state, kept by the host in the handler's store (`[store]` in the
//! manifest): dedup marks and a small key-value bucket. Both are scoped to the handler: no
//! other handler can read or change them.
//!
//! The two behave differently when a call fails:
//!
//! - **kv writes are part of the call's commit.** They are kept aside while the call runs
//!   (the call reads them back), and are stored together with the message's idempotency
//!   record only when the call returns `Ok`; a call that fails, traps or times out leaves
//!   the bucket as it was. A [`kv::compare_and_swap`] is checked again at the commit: if
//!   another call changed the value first, the commit fails and the message is retried.
//! - **dedup marks are written at once**, whether the call then succeeds or not: they are
//!   there to guard effects the host cannot take back (a payment, a request to another
//!   service), which must stay marked even when the call fails after them.
//!
//! Use marks to make side effects the host cannot see idempotent, for example:
//!
//! ```no_run
//! use std::time::Duration;
//! # fn charge(_: &str) {}
//! fn handle(msg: sluice_guest::Message) -> sluice_guest::Result {
//!     let payment_id = msg.text()?;
//!     if sluice_guest::dedup::check_and_mark(payment_id, Duration::from_secs(7 * 86400))? {
//!         charge(payment_id); // runs once per payment id, whatever the redeliveries
//!     }
//!     Ok(())
//! }
//! ```

use std::fmt;

/// The store could not be reached (a transient failure: `?` turns it into
/// [`Error::Retry`](crate::Error::Retry)), or the key or value was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StateError(pub String);

impl fmt::Display for StateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StateError {}

impl From<StateError> for crate::Error {
    fn from(e: StateError) -> Self {
        crate::Error::retry(format!("state store: {}", e.0))
    }
}

/// Dedup marks.
pub mod dedup {
    use std::time::Duration;

    use super::StateError;
    use crate::__bindings::sluice::handler::dedup as wit;

    /// Marks `key` as seen for `ttl`. True the first time within the TTL, false after.
    pub fn check_and_mark(key: &str, ttl: Duration) -> Result<bool, StateError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        wit::check_and_mark(key, ttl_ms).map_err(StateError)
    }

    /// Removes the mark on `key` (say, after the side effect was undone).
    pub fn forget(key: &str) -> Result<(), StateError> {
        wit::forget(key).map_err(StateError)
    }
}

/// The handler's key-value bucket. Keys are 1 to 1024 bytes, values at most 1 MiB.
pub mod kv {
    use super::StateError;
    use crate::__bindings::sluice::handler::kv as wit;

    /// The value of `key`.
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, StateError> {
        wit::get(key).map_err(StateError)
    }

    /// Sets `key` to `value`.
    pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), StateError> {
        wit::set(key, value.as_ref()).map_err(StateError)
    }

    /// Removes `key`.
    pub fn delete(key: &str) -> Result<(), StateError> {
        wit::delete(key).map_err(StateError)
    }

    /// Sets `key` to `value` if its value is still `expected` (`None`: absent). False, and
    /// nothing written, when it was not: read again and retry.
    pub fn compare_and_swap(key: &str, expected: Option<&[u8]>, value: impl AsRef<[u8]>) -> Result<bool, StateError> {
        wit::compare_and_swap(key, expected, value.as_ref()).map_err(StateError)
    }
}
