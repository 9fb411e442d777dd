//! The `memory` backend: a map in this process, bounded by entry count (the oldest entries
//! are evicted first). Lost on restart, not shared: for development and tests.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use super::{Expect, Leases, Op, Space, Versioned};

type Key = (String, Space, String);

#[derive(Debug)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    max_entries: usize,
    pub(super) leases: Leases,
}

#[derive(Debug, Default)]
struct Inner {
    map: HashMap<Key, Versioned>,
    order: VecDeque<Key>,
    next_version: u64,
}

impl MemoryStore {
    pub fn new(max_entries: usize) -> Self {
        MemoryStore { inner: Mutex::default(), max_entries: max_entries.max(1), leases: Leases::default() }
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.map.len())
    }

    pub fn get(&self, handler: &str, space: Space, key: &str) -> Option<Versioned> {
        let inner = self.inner.lock().ok()?;
        inner.map.get(&(handler.to_owned(), space, key.to_owned())).cloned()
    }

    pub fn swap(&self, handler: &str, space: Space, key: &str, expected: Option<u64>, value: Option<Vec<u8>>) -> bool {
        self.write(handler, space, key, Some(expected), value)
    }

    /// Every record of `handler`'s `space`, in key order.
    pub fn scan(&self, handler: &str, space: Space) -> Vec<(String, Vec<u8>)> {
        let Ok(inner) = self.inner.lock() else { return Vec::new() };
        let mut found: Vec<(String, Vec<u8>)> = inner
            .map
            .iter()
            .filter(|((h, s, _), _)| h == handler && *s == space)
            .map(|((_, _, k), v)| (k.clone(), v.value.clone()))
            .collect();
        found.sort();
        found
    }

    /// Writes (or, with `None`, removes) `key` whatever its version; false only if the
    /// store's lock was poisoned by a panic.
    pub fn put(&self, handler: &str, space: Space, key: &str, value: Option<Vec<u8>>) -> bool {
        self.write(handler, space, key, None, value)
    }

    /// Applies `ops` at once, under one lock, if every expectation holds (`Some(false)`
    /// otherwise, nothing applied); `None` if the lock was poisoned.
    pub(super) fn commit(&self, handler: &str, ops: &[Op]) -> Option<bool> {
        let mut inner = self.inner.lock().ok()?;
        for op in ops {
            if let Expect::Is(expected) = op.expect
                && inner.map.get(&(handler.to_owned(), op.space, op.key.clone())).map(|v| v.version) != expected
            {
                return Some(false);
            }
        }
        for op in ops {
            self.write_locked(&mut inner, handler, op.space, &op.key, None, op.value.clone());
        }
        Some(true)
    }

    /// `expected`: the version the key must have (`Some(None)`: absent), or `None` for any.
    fn write(
        &self,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<Option<u64>>,
        value: Option<Vec<u8>>,
    ) -> bool {
        let Ok(mut inner) = self.inner.lock() else { return false };
        self.write_locked(&mut inner, handler, space, key, expected, value)
    }

    fn write_locked(
        &self,
        inner: &mut Inner,
        handler: &str,
        space: Space,
        key: &str,
        expected: Option<Option<u64>>,
        value: Option<Vec<u8>>,
    ) -> bool {
        let k = (handler.to_owned(), space, key.to_owned());
        if expected.is_some_and(|expected| inner.map.get(&k).map(|v| v.version) != expected) {
            return false;
        }
        match value {
            None => {
                inner.map.remove(&k);
            }
            Some(value) => {
                inner.next_version += 1;
                let version = inner.next_version;
                if inner.map.insert(k.clone(), Versioned { value, version }).is_none() {
                    inner.order.push_back(k);
                }
                while inner.map.len() > self.max_entries {
                    let Some(oldest) = inner.order.pop_front() else { break };
                    inner.map.remove(&oldest);
                }
            }
        }
        // Keys deleted above stay in `order` until they come up; skip those lazily.
        if inner.order.len() > self.max_entries * 2 {
            let Inner { map, order, .. } = inner;
            order.retain(|k| map.contains_key(k));
        }
        true
    }
}
