//! The mirror job's thread: QEMU's `mirror_run` loop in our words.

use std::sync::Arc;
use std::time::Instant;

use super::copy::{Copier, Method, Op};
use super::{Mirror, active};
use crate::engine::Job;
use crate::engine::ratelimit::BLOCK_JOB_SLICE;
use crate::error::{Error, Result};
use crate::qapi::{BlockDeviceIoStatus, MirrorSyncMode};
use crate::sync::Ordering;

/// Flush the target; a failure goes through on-target-error (false: it
/// failed; a `report` is then the job's error, found at the loop's top).
/// A flush covers the whole target, so it is retried as the whole range.
fn flush_target(m: &Mirror, job: &Job, c: &Copier) -> bool {
    match m.target.flush() {
        Ok(()) => {
            job.range_done(0, c.len);
            true
        }
        Err(e) => {
            c.policy(false, e, Some((0, c.len)));
            false
        }
    }
}

/// Mark what the source has allocated (sync full: everything the guest
/// sees; none: nothing).
fn initial_dirty(m: &Mirror, job: &Job, c: &Copier) -> Result<()> {
    if m.params.sync == MirrorSyncMode::None {
        return Ok(());
    }
    let mut off = 0;
    while off < c.len {
        if job.is_cancelled() {
            return Ok(());
        }
        let (dirty, n) = if m.params.sync == MirrorSyncMode::Top || m.base.is_some() {
            // Only the layers above base.
            crate::block::chain::is_allocated_above(&m.source, m.base.as_ref(), off, c.len - off)?
        } else {
            let st = m.source.block_status(off, c.len - off)?;
            (st.allocated || st.data || st.zero, st.len)
        };
        if dirty {
            c.bitmap.bits().set_range(off, n);
        }
        off += n;
    }
    Ok(())
}

/// The largest copy operation: larger while copies go through the kernel
/// (they need no buffer; see [`super::OFFLOAD_IO_BYTES`]).
fn copy_limit(m: &Mirror) -> u64 {
    let p = &m.params;
    if m.offloading() {
        (p.buf_size / 4).clamp(p.max_io, super::OFFLOAD_IO_BYTES.max(p.max_io))
    } else {
        p.max_io
    }
}

/// One pass over the next dirty area (QEMU's `mirror_iteration`): claim a
/// run of dirty granules nothing else holds, clear their bits, and hand
/// them to the workers split by what the source holds there.
fn iteration(m: &Mirror, job: &Job, c: &Copier, cursor: &mut u64) {
    let bits = c.bitmap.bits();
    let offset = match bits.next_dirty(*cursor).or_else(|| bits.next_dirty(0)) {
        Some(o) => o,
        None => return,
    };
    let g = m.params.granularity;
    let offset = offset / g * g;
    let Some((start, len)) = c.claim(offset, m.params.buf_size.min(m.params.max_io * 16)) else {
        // Something works on that granule: let it finish, then look again.
        c.wait_released(offset);
        return;
    };
    // Clear before looking at the source: a write that lands from here on
    // dirties the granule again.
    bits.reset_range(start, len);
    *cursor = start + len;
    let mut off = start;
    let end = start + len;
    while off < end {
        let left = end - off;
        // QEMU's rule: copy by default; zero or discard only a region the
        // source holds no data in that spans whole granules. A zero region
        // smaller than a granule is copied (the rest of the granule may
        // hold data).
        let (mut io, hole) = match m.source.block_status(off, left) {
            Err(_) => (left, None),
            Ok(st) if st.data => (st.len, None),
            Ok(st) => (st.len, Some(st.zero)),
        };
        io -= io % g;
        let method = match hole {
            Some(zero) if io >= g => {
                if zero {
                    Method::Zero
                } else {
                    Method::Discard
                }
            }
            _ => {
                io = io.clamp(g, copy_limit(m).max(g));
                Method::Copy
            }
        };
        // The node may end inside the last granule.
        let io = io.min(left);
        c.dispatch(Op {
            offset: off,
            len: io,
            method,
        });
        // Zero writes with unmap are nearly free; they do not count
        // against the speed limit, as in QEMU.
        let charged = match method {
            Method::Copy => io,
            Method::Zero | Method::Discard => {
                if m.params.unmap && m.target.driver().supports_zero_unmap() {
                    0
                } else {
                    io
                }
            }
        };
        job.ratelimit_processed(charged);
        off += io;
    }
    // The copies this pass queued on the ring go to the kernel together.
    c.submit();
}

pub(super) fn run(m: &Arc<Mirror>, job: &Arc<Job>) -> Result<()> {
    let len = m.source.len()?;
    if m.target.len()? != len {
        return Err(
            Error::generic("Source and target image have different sizes").with_errno(libc::EINVAL),
        );
    }
    let bitmap = m
        .top
        .bitmap
        .get()
        .cloned()
        .ok_or_else(|| Error::generic("mirror started without its bitmap"))?;
    let c = Copier::new(m.clone(), job.clone(), bitmap, len)?;
    // Under `running`'s lock: a `block-job-change` either sees the run
    // (and installs the filter itself) or set the mode before this load.
    let write_blocking = {
        let mut r = m.running.lock();
        *r = Some(c.clone());
        // Relaxed: ordered by this lock (see `Mirror::write_blocking`).
        m.write_blocking.load(Ordering::Relaxed)
    };
    if write_blocking {
        // Guest writes in flight on the filter finish first (and mark the
        // bitmap); from here the filter hands them to active writes.
        let section = m.graph.drained_begin(std::slice::from_ref(&m.filter));
        active::install(m, &c);
        m.graph.drained_end(section);
    }
    let r = main_loop(m, job, &c);
    // Failed or cancelled: wait for what is in flight; done: nothing is.
    c.wait_all();
    {
        // With the lock: a `block-job-change` cannot put active writes
        // back.
        let mut r = m.running.lock();
        active::remove(m);
        *r = None;
    }
    c.shutdown();
    r
}

fn main_loop(m: &Mirror, job: &Job, c: &Copier) -> Result<()> {
    if c.len == 0 {
        // Nothing to copy: ready at once, then wait for complete/cancel.
        job.transition_to_ready()?;
        // Relaxed: see the fields (a report; ordered by the kick).
        m.actively_synced.store(true, Ordering::Relaxed);
        while !m.should_complete.load(Ordering::Relaxed) && !job.cancel_requested() {
            job.yield_now();
        }
        return Ok(());
    }
    initial_dirty(m, job, c)?;
    let mut cursor = 0;
    let mut last_pause = Instant::now();
    loop {
        if let Some(e) = c.error() {
            return Err(e);
        }
        job.pause_point();
        if job.is_cancelled() {
            return Ok(());
        }
        let (ops, _, generation, cnt) = c.update_progress();
        // Yield every slice (so drains and pauses get through), on an
        // error, or when the source is clean.
        if last_pause.elapsed() < BLOCK_JOB_SLICE && job.iostatus() == BlockDeviceIoStatus::Ok {
            if !c.has_room() || (cnt == 0 && ops > 0) {
                c.wait_for_change(generation);
                // QEMU charges bytes when it dispatches them and sleeps
                // here: a burst of buf-size is paid for before going on.
                job.ratelimit_sleep();
                continue;
            } else if cnt != 0 {
                iteration(m, job, c, &mut cursor);
                continue;
            }
        }
        let mut should_complete = false;
        let mut cnt = cnt;
        if ops == 0 && cnt == 0 {
            if !job.is_ready() {
                if !flush_target(m, job, c) {
                    continue;
                }
                // From here a soft cancel completes with a consistent target.
                job.transition_to_ready()?;
            }
            // Relaxed: see the fields (a switch seen a pass late is seen
            // at the next; a report; ordered by the kick).
            if m.write_blocking.load(Ordering::Relaxed) {
                m.actively_synced.store(true, Ordering::Relaxed);
            }
            should_complete = m.should_complete.load(Ordering::Relaxed) || job.cancel_requested();
            cnt = c.bitmap.bits().count();
        }
        if cnt == 0 && should_complete {
            // Stop guest writes to the source, then check once more: the
            // pivot happens inside this drained section (ended in clean).
            let section = m.graph.drained_begin(std::slice::from_ref(&m.source));
            if c.bitmap.bits().count() > 0 || !flush_target(m, job, c) {
                m.graph.drained_end(section);
                continue;
            }
            *m.drained.lock() = Some(section);
            return Ok(());
        }
        if job.is_ready() && !should_complete {
            if c.ops() == 0 && cnt == 0 {
                job.sleep_ns(BLOCK_JOB_SLICE.as_nanos() as u64);
            }
        } else {
            job.ratelimit_sleep();
        }
        last_pause = Instant::now();
    }
}
