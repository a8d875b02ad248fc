//! The spacing of the `ignore` policy's retries.
//!
//! QEMU retries a range that failed under `ignore` at once, forever: a
//! disk that stays broken gets the same request again as fast as it
//! fails (about 95 000 `BLOCK_JOB_ERROR` a second), which burns a CPU and
//! floods every client. We keep QEMU's semantics (the range is retried,
//! each failure is an event) but space the retries: each ignored failure
//! of a job waits twice as long as the one before it, from [`FIRST`] up to
//! [`MAX`], before its range is handed back for the retry. A fault that
//! goes away heals at once: when every range that failed since the last
//! reset has been done successfully, the next failure waits [`FIRST`]
//! again.
//!
//! Failures of one job share one queue of retry slots: several ranges
//! failing together (a dead disk under a job with many requests in
//! flight) are retried one slot after another, so a job gets about one
//! retry (one event) per [`MAX`] however many requests it has in flight.
//!
//! This is only the bookkeeping (pure, no clock of its own); the engine
//! keeps one per job and does the interruptible waiting
//! (`Job::range_error_action`).

use std::time::{Duration, Instant};

/// The wait after the first failure.
pub const FIRST: Duration = Duration::from_millis(1);
/// The longest wait between two retries.
pub const MAX: Duration = Duration::from_secs(1);
/// Failed ranges remembered at once; beyond that the oldest is forgotten
/// (it comes back when it fails again). A job has at most a few dozen
/// requests in flight, so this is only a bound.
const RANGES: usize = 64;

/// One job's retry spacing.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    /// The wait the last failure got; zero when nothing failed since the
    /// last reset.
    delay: Duration,
    /// Ranges (offset, length) that failed and have not been done since.
    failed: Vec<(u64, u64)>,
    /// The end of the last retry slot handed out.
    next_free: Option<Instant>,
}

impl Backoff {
    /// Whether a failure is waiting to be healed by a success.
    pub fn armed(&self) -> bool {
        !self.failed.is_empty()
    }

    /// The range `[offset, offset + len)` failed under `ignore` at `now`:
    /// the instant its retry may start.
    pub fn failed(&mut self, offset: u64, len: u64, now: Instant) -> Instant {
        self.delay = if self.delay.is_zero() {
            FIRST
        } else {
            (self.delay * 2).min(MAX)
        };
        if !self.failed.contains(&(offset, len)) {
            if self.failed.len() == RANGES {
                self.failed.remove(0);
            }
            self.failed.push((offset, len));
        }
        let start = self.next_free.map_or(now, |t| t.max(now));
        let until = start + self.delay;
        self.next_free = Some(until);
        until
    }

    /// A wait was cut short (a pause, a cancel): the slots handed out are
    /// given up, so the retries after a resume queue from then, not
    /// behind slots nobody waited for. The spacing itself goes on.
    pub fn interrupted(&mut self) {
        self.next_free = None;
    }

    /// `[offset, offset + len)` was done successfully: the failed ranges
    /// it overlaps are healed; when none is left, the spacing starts over.
    pub fn succeeded(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        self.failed
            .retain(|&(o, l)| !(o < end && offset < o.saturating_add(l)));
        if self.failed.is_empty() {
            self.delay = Duration::ZERO;
            self.next_free = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn doubles_from_one_millisecond_to_one_second() {
        let mut b = Backoff::default();
        let t0 = Instant::now();
        let mut waits = Vec::new();
        let mut now = t0;
        for _ in 0..14 {
            let until = b.failed(0, 4096, now);
            waits.push(until - now);
            now = until;
        }
        let ms: Vec<u128> = waits.iter().map(|d| d.as_millis()).collect();
        assert_eq!(
            ms,
            [
                1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000, 1000, 1000, 1000
            ]
        );
    }

    #[test]
    fn success_of_the_failed_range_starts_over() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let mut t = now;
        for _ in 0..5 {
            t = b.failed(1 << 20, 65536, t);
        }
        assert!(b.armed());
        // Another range does not heal it.
        b.succeeded(0, 65536);
        assert!(b.armed());
        assert_eq!(b.failed(1 << 20, 65536, t) - t, 32 * MS);
        // Part of it does.
        b.succeeded((1 << 20) + 4096, 4096);
        assert!(!b.armed());
        let later = t + 10 * MS;
        assert_eq!(b.failed(0, 512, later) - later, MS);
    }

    #[test]
    fn heals_only_when_every_failed_range_is_done() {
        let mut b = Backoff::default();
        let now = Instant::now();
        b.failed(0, 100, now);
        b.failed(1000, 100, now);
        b.succeeded(0, 100);
        assert!(b.armed(), "1000+100 still fails");
        // So the spacing goes on from where it was (1, 2, then 4 ms).
        let t = now + Duration::from_secs(5);
        assert_eq!(b.failed(1000, 100, t) - t, 4 * MS);
        b.succeeded(1050, 1);
        assert!(!b.armed());
    }

    #[test]
    fn concurrent_failures_queue_behind_each_other() {
        let mut b = Backoff::default();
        let now = Instant::now();
        let slots: Vec<Duration> = (0..4u64)
            .map(|i| b.failed(i << 20, 1 << 20, now) - now)
            .collect();
        // 1, then 2 after it, 4 after that, 8 after that.
        assert_eq!(slots, [MS, 3 * MS, 7 * MS, 15 * MS]);
    }

    #[test]
    fn an_interrupted_wait_gives_up_the_queued_slots() {
        let mut b = Backoff::default();
        let now = Instant::now();
        for i in 0..4u64 {
            b.failed(i << 20, 1 << 20, now);
        }
        b.interrupted();
        // Queued from now, with the next delay (16 ms), not behind 15 ms
        // of abandoned slots.
        let t = now + MS;
        assert_eq!(b.failed(0, 1 << 20, t) - t, 16 * MS);
    }

    #[test]
    fn remembers_a_bounded_number_of_ranges() {
        let mut b = Backoff::default();
        let now = Instant::now();
        for i in 0..(RANGES as u64 + 10) {
            b.failed(i * 10, 10, now);
        }
        assert_eq!(b.failed.len(), RANGES);
        // The oldest were forgotten: healing the rest resets.
        b.succeeded(100, (RANGES as u64 + 10) * 10);
        assert!(!b.armed());
    }
}
