//! Atomics and the one mutex kind of the lock-free code, from std and
//! parking_lot or from loom under `--cfg loom`, so the lock-free parts can
//! be model-checked with one flag.
//!
//! Locks elsewhere in the crate are `parking_lot`'s: they do not poison,
//! so a panic on one thread (caught at the C boundary or in a job) never
//! turns every later `lock()` into an error. Every piece of state behind
//! them is updated so that it stays consistent at each point a panic could
//! unwind from.

#[cfg(loom)]
pub use loom::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};
#[cfg(not(loom))]
pub use parking_lot::Mutex;
#[cfg(not(loom))]
pub use std::sync::atomic::{
    AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize, Ordering, fence,
};

/// loom's mutex with parking_lot's API (`lock()` returns the guard).
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
