//! Byte ranges held by one request at a time: overlapping holders wait
//! until the range is free (QEMU serialises copy-on-read requests against
//! overlapping writes the same way, with its tracked requests).

use crate::locks::{Condvar, Mutex};

/// Ranges in use, waited on until free.
#[derive(Default)]
pub struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl RangeLock {
    /// Hold `[start, end)` until the guard drops; waits while any held
    /// range overlaps it.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut h = self.held.lock();
        while h.iter().any(|&(s, e)| s < end && start < e) {
            h = self.freed.wait(h);
        }
        h.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

/// A held range; released on drop.
pub struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut h = self.lock.held.lock();
        if let Some(i) = h.iter().position(|r| *r == self.range) {
            h.swap_remove(i);
        }
        drop(h);
        self.lock.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::RangeLock;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    #[test]
    fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let l = Arc::new(RangeLock::default());
        let g = l.lock(0, 100);
        // Disjoint: taken at once, also right at the boundary.
        drop(l.lock(100, 200));
        let got = Arc::new(AtomicBool::new(false));
        let t = {
            let (l, got) = (l.clone(), got.clone());
            std::thread::spawn(move || {
                let _g = l.lock(50, 150);
                got.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!got.load(Ordering::SeqCst), "an overlapping range waited");
        drop(g);
        t.join().unwrap();
        assert!(got.load(Ordering::SeqCst));
    }
}
