//! `sluice:handler/dedup` and `sluice:handler/kv`: the guest's own marks and bucket, on the
//! handler's store, always inside the handler's namespace.

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
}

fn check_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("keys must be 1 to {MAX_KEY} bytes long"));
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE {
        return Err(format!("values are at most {MAX_VALUE} bytes"));
    }
    Ok(())
}

impl dedup::Host for HostState {
    async fn check_and_mark(&mut self, key: String, ttl_ms: u64) -> wasmtime::Result<Result<bool, String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            let ttl = Duration::from_millis(ttl_ms.max(1));
            scope.check_and_mark(&key, ttl).await.map_err(|e| e.to_string())
        }
        .await)
    }

    async fn forget(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            scope.forget(&key).await.map_err(|e| e.to_string())
        }
        .await)
    }
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> wasmtime::Result<Result<Option<Vec<u8>>, String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            scope.kv_get(&key).await.map_err(|e| e.to_string())
        }
        .await)
    }

    async fn set(&mut self, key: String, value: Vec<u8>) -> wasmtime::Result<Result<(), String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            check_value(&value)?;
            scope.kv_put(&key, Some(value)).await.map_err(|e| e.to_string())
        }
        .await)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<Result<(), String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            scope.kv_put(&key, None).await.map_err(|e| e.to_string())
        }
        .await)
    }

    async fn compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
    ) -> wasmtime::Result<Result<bool, String>> {
        let scope = self.scope();
        Ok(async move {
            check_key(&key)?;
            let scope = scope?;
            check_value(&value)?;
            scope.kv_cas(&key, expected.as_deref(), value).await.map_err(|e| e.to_string())
        }
        .await)
    }
}
