//! Rates a person can plan with: how fast a job works through its
//! progress, how fast a guest adds to it, and when it will be done.
//!
//! QEMU reports only `offset`/`len` (here `current`/`total`), and `len`
//! grows while a guest writes. The meter keeps samples of both over a
//! sliding window and derives:
//! - the copy rate: growth of `current` per second (all work done,
//!   holes and zeroes included);
//! - the dirty rate: growth of `total` per second once work has started
//!   (the first estimate of the total, set before any work, is not dirt);
//!   a decrease of `total` is not negative dirt (work that turned out
//!   unnecessary), so it is not subtracted;
//! - the ETA: what is left over the net rate (copy minus dirty), and
//!   whether the job converges at all: with a dirty rate at (or within
//!   `STALL_PERCENT` of) the copy rate, what is left does not shrink.
//!
//! Invariants: samples are at least `SAMPLE_EVERY` apart and none is
//! older than `WINDOW` plus one sample (the oldest kept spans the
//! window), so memory is bounded; the clock is passed in, so the rules are
//! tested without sleeping.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::Progress;

/// The span rates are measured over.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);
/// Samples closer than this are merged into the newest.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// Rates need at least this much history before convergence is judged.
pub(crate) const MIN_SPAN: Duration = Duration::from_secs(1);
/// A dirty rate at this share of the copy rate or more does not
/// converge: a guest writing all over a disk faster than it is copied
/// keeps what is left at a steady share, where the re-dirtying rate
/// settles at the copy rate itself and only noise decides which is ahead.
pub(crate) const STALL_PERCENT: u64 = 95;

#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    current: u64,
    dirtied: u64,
}

/// What [`ProgressMeter::rates`] reports (the `x-` members of job info).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Rates {
    /// Bytes of progress per second over the window.
    pub copy_rate: u64,
    /// Bytes added to the total per second over the window (a guest
    /// dirtying what is left, or what was already copied).
    pub dirty_rate: u64,
    /// Seconds to completion at the net rate; `None` when unknown (too
    /// little history, no progress in the window) or never.
    pub eta: Option<u64>,
    /// `Some(false)`: the dirty rate is at or above `STALL_PERCENT` of
    /// the copy rate while work is left, so the job does not converge at
    /// these rates.
    /// `None` until there is `MIN_SPAN` of history.
    pub converging: Option<bool>,
}

/// The samples of one job.
#[derive(Debug, Default)]
pub struct ProgressMeter {
    samples: VecDeque<Sample>,
    /// Total growth since work started.
    dirtied: u64,
    last_total: u64,
}

impl ProgressMeter {
    /// Record the progress after a change.
    pub fn record(&mut self, now: Instant, p: Progress) {
        // Growth of the total after work started is dirt; before, it is
        // the job finding out its size.
        if p.current > 0 && p.total > self.last_total {
            self.dirtied += p.total - self.last_total;
        }
        self.last_total = p.total;
        let s = Sample {
            at: now,
            current: p.current,
            dirtied: self.dirtied,
        };
        let n = self.samples.len();
        match self.samples.back_mut() {
            // Keep the sample that opened this interval's time, with the
            // newest counts: rates are never measured over a span shorter
            // than the real one.
            Some(last) if now.saturating_duration_since(last.at) < SAMPLE_EVERY && n > 1 => {
                last.current = s.current;
                last.dirtied = s.dirtied;
            }
            _ => self.samples.push_back(s),
        }
        // Keep one sample at or beyond the window's start.
        while self.samples.len() > 2 && now.saturating_duration_since(self.samples[1].at) >= WINDOW
        {
            self.samples.pop_front();
        }
    }

    /// The rates as of `now`, for progress `p`. Time without samples
    /// counts as time without progress, so a paused job's rates fall.
    pub fn rates(&self, now: Instant, p: Progress) -> Rates {
        let Some(first) = self.oldest_in_window(now) else {
            return Rates::default();
        };
        // Progress is recorded at every change: no sample between `first`
        // and the window's start means no progress there, so the counts
        // of `first` hold at the window's start.
        let start = now
            .checked_sub(WINDOW)
            .map_or(first.at, |w| w.max(first.at));
        let span = now.saturating_duration_since(start);
        if span.is_zero() {
            return Rates::default();
        }
        let secs = span.as_secs_f64();
        let per_sec = |n: u64| (n as f64 / secs) as u64;
        let copy_rate = per_sec(p.current.saturating_sub(first.current));
        let dirty_rate = per_sec(self.dirtied.saturating_sub(first.dirtied));
        let left = p.total.saturating_sub(p.current);
        let judged = span >= MIN_SPAN;
        let (eta, converging) = if left == 0 {
            (Some(0), Some(true))
        } else if !judged || copy_rate == 0 {
            (None, None)
        } else if dirty_rate.saturating_mul(100) >= copy_rate.saturating_mul(STALL_PERCENT) {
            (None, Some(false))
        } else {
            let net = (copy_rate - dirty_rate) as f64;
            (Some((left as f64 / net).ceil() as u64), Some(true))
        };
        Rates {
            copy_rate,
            dirty_rate,
            eta,
            converging,
        }
    }

    /// The oldest sample that still bounds the window ending at `now`.
    fn oldest_in_window(&self, now: Instant) -> Option<Sample> {
        let mut it = self.samples.iter().rev();
        let mut pick = *it.next()?;
        if now.saturating_duration_since(pick.at) >= WINDOW {
            return Some(pick);
        }
        for s in it {
            pick = *s;
            if now.saturating_duration_since(s.at) >= WINDOW {
                break;
            }
        }
        Some(pick)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn p(current: u64, total: u64) -> Progress {
        Progress { current, total }
    }

    /// Feeds `steps` of 100 ms each: `copy` and `dirty` bytes per step.
    fn run(
        m: &mut ProgressMeter,
        t0: Instant,
        start: Progress,
        steps: u32,
        copy: u64,
        dirty: u64,
    ) -> (Instant, Progress) {
        let mut now = t0;
        let mut pr = start;
        for _ in 0..steps {
            now += SAMPLE_EVERY;
            pr.current += copy;
            pr.total += dirty;
            m.record(now, pr);
        }
        (now, pr)
    }

    #[test]
    fn a_steady_copy_has_its_rate_and_an_eta() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 1000 * MIB));
        // 10 MiB per 100 ms = 100 MiB/s for 3 s.
        let (now, pr) = run(&mut m, t0, p(0, 1000 * MIB), 30, 10 * MIB, 0);
        let r = m.rates(now, pr);
        assert_eq!(r.copy_rate, 100 * MIB);
        assert_eq!(r.dirty_rate, 0);
        assert_eq!(r.converging, Some(true));
        // 700 MiB left at 100 MiB/s.
        assert_eq!(r.eta, Some(7));
    }

    #[test]
    fn the_first_total_is_not_dirt_but_later_growth_is() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 0));
        m.record(t0, p(0, 1000 * MIB));
        // 100 MiB/s copied, 40 MiB/s dirtied.
        let (now, pr) = run(&mut m, t0, p(0, 1000 * MIB), 20, 10 * MIB, 4 * MIB);
        let r = m.rates(now, pr);
        assert_eq!(r.copy_rate, 100 * MIB);
        assert_eq!(r.dirty_rate, 40 * MIB);
        // (1000 + 80 - 200) MiB left at a net 60 MiB/s.
        assert_eq!(r.eta, Some(15));
    }

    #[test]
    fn dirtying_as_fast_as_copying_does_not_converge() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 100 * MIB));
        let (now, pr) = run(&mut m, t0, p(0, 100 * MIB), 20, 5 * MIB, 6 * MIB);
        let r = m.rates(now, pr);
        assert_eq!(r.converging, Some(false));
        assert_eq!(r.eta, None);
        assert!(r.dirty_rate > r.copy_rate);
    }

    #[test]
    fn a_dirty_rate_just_under_the_copy_rate_is_a_stall_too() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 100 * MIB));
        // 96 % and then 90 % of the copy rate.
        let (now, pr) = run(&mut m, t0, p(0, 100 * MIB), 20, 100, 96);
        assert_eq!(m.rates(now, pr).converging, Some(false));
        let mut m = ProgressMeter::default();
        m.record(t0, p(0, 100 * MIB));
        let (now, pr) = run(&mut m, t0, p(0, 100 * MIB), 20, 100, 90);
        let r = m.rates(now, pr);
        assert_eq!(r.converging, Some(true));
        assert!(r.eta.is_some_and(|s| s > 1000), "{r:?}");
    }

    #[test]
    fn too_little_history_is_not_judged() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 100 * MIB));
        let (now, pr) = run(&mut m, t0, p(0, 100 * MIB), 5, MIB, 2 * MIB);
        let r = m.rates(now, pr);
        assert_eq!((r.eta, r.converging), (None, None));
        assert!(r.copy_rate > 0);
    }

    #[test]
    fn done_is_zero_seconds_away() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 10 * MIB));
        let (now, pr) = run(&mut m, t0, p(0, 10 * MIB), 10, MIB, 0);
        assert_eq!(pr.current, pr.total);
        let r = m.rates(now, pr);
        assert_eq!((r.eta, r.converging), (Some(0), Some(true)));
    }

    #[test]
    fn a_pause_makes_the_rates_fall_and_the_window_slides() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        m.record(t0, p(0, 1000 * MIB));
        let (now, pr) = run(&mut m, t0, p(0, 1000 * MIB), 20, 10 * MIB, 0);
        // Nothing for 20 s: nothing in the window any more.
        let r = m.rates(now + Duration::from_secs(20), pr);
        assert_eq!(r.copy_rate, 0);
        assert_eq!((r.eta, r.converging), (None, None));
        // Then 50 MiB/s: after another 10 s the old rate is gone.
        let (now, pr) = run(&mut m, now + Duration::from_secs(20), pr, 100, 5 * MIB, 0);
        assert_eq!(m.rates(now, pr).copy_rate, 50 * MIB);
    }

    #[test]
    fn samples_stay_bounded() {
        let mut m = ProgressMeter::default();
        let t0 = Instant::now();
        let mut now = t0;
        for i in 0..100_000u64 {
            now += Duration::from_millis(7);
            m.record(now, p(i, 200_000));
        }
        let max = (WINDOW.as_millis() / SAMPLE_EVERY.as_millis()) as usize + 3;
        assert!(m.samples.len() <= max, "{} samples", m.samples.len());
    }
}
