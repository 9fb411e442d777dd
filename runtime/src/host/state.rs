//! `sluice:handler/dedup` and `sluice:handler/kv`: the guest's own marks and bucket, on the
//! handler's store, always inside the handler's namespace. A call's kv writes are its own
//! until it succeeds: they are kept in the call's write set (the guest reads them back) and
//! committed together with the message's idempotency record, or dropped with a failed call.
//! Dedup marks are written at once (see below).

use std::time::Duration;

use super::HostState;
use crate::bindings::sluice::handler::{dedup, kv};
use crate::store::Scope;

/// Keys and values a guest may store, at most.
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 1 << 20;

impl HostState {
    /// A clone, so that no borrow of the state is held across an await (the store's future
    /// must be `Send`, and the WASI parts of the state are not `Sync`).
    fn scope(&self) -> Result<Scope, String> {
        self.scope.clone().ok_or_else(|| "this handler has no state store".to_owned())
    }

    /// The scope for a read of `key`, once the key is checked.
    fn reading(&self, key: &str) -> Result<Scope, String> {
        check_key(key)?;
        self.scope()
    }

    /// The scope for a kv write of `value_len` bytes to `key`, once the key, the value and
    /// the call's write budget are checked.
    fn writing(&self, key: &str, value_len: usize) -> Result<Scope, String> {
        check_key(key)?;
        if value_len > MAX_VALUE {
            return Err(format!("values are at most {MAX_VALUE} bytes"));
        }
        self.writes.room_for(key, value_len)?;
        self.scope()
    }
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("keys must be 1 to {MAX_KEY} bytes long"));
    }
    Ok(())
}

// kv reads go to the store (the call's own writes first); kv writes join the call's write
// set, committed with its idempotency record when the call succeeds. No borrow of the state
// is held across an await: the scope is cloned first.

// Dedup marks are written at once, not with the call's commit: they exist to guard effects
// that escape the commit (a payment, an HTTP call), and such an effect must stay marked even
// when the call fails after it.
impl dedup::Host for HostState {
    async fn check_and_mark(&mut self, key: String, ttl_ms: u64) -> wasmtime::Result<Result<bool, String>> {
        let scope = match self.reading(&key) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        let ttl = Duration::from_millis(ttl_ms.max(1));
        Ok(scope.check_and_mark(&key, ttl).await.map_err(|e| e.to_string()))
    }

    async fn forget(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        let scope = match self.reading(&key) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        Ok(scope.forget(&key).await.map_err(|e| e.to_string()))
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, String>> {
        let scope = match self.reading(&key) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        Ok(scope.kv_get_in(&self.writes, &key).await.map_err(|e| e.to_string()))
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        let scope = match self.writing(&key, value.len()) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        scope.kv_put_in(&mut self.writes, &key, Some(value));
        Ok(Ok(()))
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        let scope = match self.writing(&key, 0) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        scope.kv_put_in(&mut self.writes, &key, None);
        Ok(Ok(()))
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<bool, String>> {
        let scope = match self.writing(&key, value.len()) {
            Ok(scope) => scope,
            Err(e) => return Ok(Err(e)),
        };
        Ok(scope.kv_cas_in(&mut self.writes, &key, expected.as_deref(), value).await.map_err(|e| e.to_string()))
    }
}
