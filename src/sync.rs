//! Atomics and the mutex of the lock-free code, from std (and
//! [`crate::locks`]) or from loom under `--cfg loom`, so the lock-free
//! parts can be model-checked with one flag. Locks elsewhere in the crate
//! come from [`crate::locks`].

#[cfg(not(loom))]
pub use crate::locks::Mutex;
#[cfg(loom)]
pub use loom::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(not(loom))]
pub use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};

/// loom's mutex with [`crate::locks::Mutex`]'s API (`lock()` returns the
/// guard).
#[cfg(loom)]
#[derive(Debug, Default)]
pub struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
impl<T> Mutex<T> {
    /// A new mutex.
    pub fn new(v: T) -> Self {
        Mutex(loom::sync::Mutex::new(v))
    }

    /// Lock it; loom's models never panic while holding it.
    pub fn lock(&self) -> loom::sync::MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}
