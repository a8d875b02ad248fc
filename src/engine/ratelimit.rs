//! Rate limiting in time slices, as QEMU's block jobs do it.
//!
//! A job reports the bytes it processed; the limiter allows `speed × slice`
//! bytes per slice (100 ms for block jobs) and, once a slice's quota is
//! used, answers how long to sleep so that the average stays at `speed`.
//! The limiter is a plain value (no clock inside): callers pass `now`,
//! which keeps it deterministic to test.

use std::time::{Duration, Instant};

/// QEMU's `BLOCK_JOB_SLICE_TIME`: 100 ms.
pub const BLOCK_JOB_SLICE: Duration = Duration::from_millis(100);

/// Slice-based limiter (QEMU's `RateLimit`).
#[derive(Debug, Clone)]
pub struct RateLimit {
    slice: Duration,
    /// Bytes allowed per slice; 0 = unlimited.
    slice_quota: u64,
    slice_start: Option<Instant>,
    slice_end: Option<Instant>,
    dispatched: u64,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            slice: BLOCK_JOB_SLICE,
            slice_quota: 0,
            slice_start: None,
            slice_end: None,
            dispatched: 0,
        }
    }
}

impl RateLimit {
    /// Set the speed in bytes per second (0 = unlimited).
    pub fn set_speed(&mut self, speed: u64, slice: Duration) {
        self.slice = slice;
        self.slice_quota = if speed == 0 {
            0
        } else {
            // At least one byte per slice, so a tiny speed still progresses.
            ((speed as f64 * slice.as_secs_f64()) as u64).max(1)
        };
    }

    /// Account `n` bytes and return how long to wait before going on.
    pub fn calculate_delay(&mut self, n: u64, now: Instant) -> Duration {
        if self.slice_quota == 0 {
            return Duration::ZERO;
        }
        let expired = match self.slice_end {
            Some(end) => end < now,
            None => true,
        };
        if expired {
            // The previous (possibly stretched) slice is over: start afresh.
            self.slice_start = Some(now);
            self.slice_end = Some(now + self.slice);
            self.dispatched = 0;
        }
        self.dispatched = self.dispatched.saturating_add(n);
        if self.dispatched < self.slice_quota {
            return Duration::ZERO;
        }
        // Quota used: stretch the slice in proportion to the excess and wait
        // until it ends; the next call after that starts a new slice.
        let slices = self.dispatched as f64 / self.slice_quota as f64;
        let start = self.slice_start.unwrap_or(now);
        let end = start + self.slice.mul_f64(slices);
        self.slice_end = Some(end);
        end.saturating_duration_since(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimit::default();
        let t = Instant::now();
        assert_eq!(r.calculate_delay(u64::MAX / 2, t), Duration::ZERO);
        r.set_speed(0, BLOCK_JOB_SLICE);
        assert_eq!(r.calculate_delay(1 << 40, t), Duration::ZERO);
    }

    #[test]
    fn waits_in_proportion_to_excess() {
        let mut r = RateLimit::default();
        // 10 MB/s → 1 MB per 100 ms slice.
        r.set_speed(10_000_000, BLOCK_JOB_SLICE);
        let t0 = Instant::now();
        assert_eq!(r.calculate_delay(500_000, t0), Duration::ZERO);
        // 2.5 MB in the slice: wait until 250 ms after the slice start.
        let d = r.calculate_delay(2_000_000, t0 + Duration::from_millis(10));
        assert_eq!(d, Duration::from_millis(240));
        // Asking again before the end still waits for the stretched end.
        let d = r.calculate_delay(0, t0 + Duration::from_millis(200));
        assert!(
            d > Duration::ZERO && d <= Duration::from_millis(50),
            "{d:?}"
        );
        // After the end a new slice begins with a fresh quota.
        let d = r.calculate_delay(100, t0 + Duration::from_millis(260));
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn average_rate_holds_over_many_chunks() {
        let mut r = RateLimit::default();
        let speed = 4 << 20; // 4 MiB/s
        r.set_speed(speed, BLOCK_JOB_SLICE);
        let mut now = Instant::now();
        let t0 = now;
        let chunk = 64 << 10;
        let total: u64 = 16 << 20;
        let mut done = 0;
        while done < total {
            done += chunk;
            now += r.calculate_delay(chunk, now);
        }
        let secs = (now - t0).as_secs_f64();
        let rate = total as f64 / secs;
        assert!(
            (rate / speed as f64 - 1.0).abs() < 0.05,
            "rate {rate} vs {speed}"
        );
    }
}
