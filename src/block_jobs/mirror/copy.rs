//! Copy operations on worker threads: the in-flight granule set, the
//! buffer pool, and what happens when a request fails.
//!
//! The job thread dispatches operations; a fixed pool of workers performs
//! them with buffers taken from a pool allocated once per run (no
//! allocation per operation). Everything the job thread waits for is
//! signalled on one condvar: an operation ended, a buffer came back, a
//! granule range was released.

use crate::locks::{Condvar, Mutex, MutexGuard};
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

use super::Mirror;
use super::ring::{self, CopyRing};
use crate::block::aligned::{AlignedBuf, Region};
use crate::block::dirty_bitmap::BdrvDirtyBitmap;
use crate::block::uring;
use crate::engine::Job;
use crate::error::Error;
use crate::qapi::BlockErrorAction;
use crate::sync::Ordering;

/// What an operation does to its range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    /// Read the source, write the target.
    Copy,
    /// The source reads as zeroes: make the target read as zeroes.
    Zero,
    /// The source is unallocated and not zero: discard on the target.
    Discard,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    pub offset: u64,
    pub len: u64,
    pub method: Method,
}

/// A buffer aligned to 4 KiB (usable for O_DIRECT). The pool's buffers
/// are registered with each worker's io_uring ring (see `Copier::fixed`).
struct Buffer(AlignedBuf);

impl Buffer {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> Buffer {
        Buffer(AlignedBuf::zeroed(len, Self::ALIGN))
    }

    fn slice(&mut self, len: usize) -> &mut [u8] {
        &mut self.0[..len]
    }
}

#[derive(Default)]
struct State {
    /// Dispatched operations, each with the buffer reserved for it.
    queue: VecDeque<(Op, Option<Buffer>)>,
    /// Operations dispatched and not finished.
    ops: usize,
    bytes: u64,
    /// The part of `bytes` that copies (zeroes and discards move no data).
    copy_bytes: u64,
    /// Write-blocking guest writes between their source and target write.
    active_writes: usize,
    active_bytes: u64,
    /// One bit per granule held by an operation or an active write.
    granules: Vec<u64>,
    free_buffers: Vec<Buffer>,
    /// Counts every end of an operation or active write, so that the job
    /// thread can wait for "something ended since I looked" without
    /// missing a wake-up.
    generation: u64,
    /// The first error that must end the job (`report`).
    error: Option<Error>,
    stop: bool,
}

/// The copy machinery of one run.
pub(crate) struct Copier {
    mirror: Arc<Mirror>,
    job: Arc<Job>,
    pub bitmap: Arc<BdrvDirtyBitmap>,
    state: Mutex<State>,
    /// Job thread and active writers wait here; workers wait on `work`.
    changed: Condvar,
    work: Condvar,
    workers: Mutex<Vec<JoinHandle<()>>>,
    /// In-kernel copies running now, at most [`super::offload_slots`].
    offloading: Mutex<usize>,
    offload_free: Condvar,
    /// The pool's buffers, which every worker offers to its io_uring
    /// ring as registered buffers: with `aio=io_uring` the kernel then
    /// does not pin each request's pages again.
    fixed: Vec<Region>,
    /// The run's ring for copies that resolve down to files (made at the
    /// first one; `None`: the ring could not be made, workers copy).
    ring: OnceLock<Option<Arc<CopyRing>>>,
    /// This copier, for the ring's reaper.
    me: Weak<Copier>,
    pub len: u64,
}

impl Copier {
    pub fn new(
        mirror: Arc<Mirror>,
        job: Arc<Job>,
        bitmap: Arc<BdrvDirtyBitmap>,
        len: u64,
    ) -> crate::Result<Arc<Copier>> {
        let p = &mirror.params;
        let nbuf = (p.buf_size / p.max_io).clamp(1, super::MAX_IN_FLIGHT as u64) as usize;
        let granules = len.div_ceil(p.granularity).div_ceil(64) as usize;
        let free_buffers: Vec<Buffer> = (0..nbuf).map(|_| Buffer::new(p.max_io as usize)).collect();
        let fixed = free_buffers.iter().map(|b| b.0.region()).collect();
        let c = Arc::new_cyclic(|me| Copier {
            state: Mutex::new(State {
                granules: vec![0; granules.max(1)],
                free_buffers,
                ..State::default()
            }),
            mirror,
            job,
            bitmap,
            changed: Condvar::new(),
            work: Condvar::new(),
            workers: Mutex::new(Vec::new()),
            offloading: Mutex::new(0),
            offload_free: Condvar::new(),
            fixed,
            ring: OnceLock::new(),
            me: me.clone(),
            len,
        });
        let mut workers = Vec::new();
        for i in 0..super::io_workers() {
            let me = c.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("mirror-io{i}"))
                .spawn(move || me.worker());
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    *c.workers.lock() = workers;
                    c.shutdown();
                    return Err(Error::from(e).prepend("Cannot start mirror I/O threads: "));
                }
            }
        }
        *c.workers.lock() = workers;
        Ok(c)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    fn wait<'a>(&self, mut g: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        g = self.changed.wait(g);
        g
    }

    fn granule_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let g = self.mirror.params.granularity;
        (offset / g, (offset + len).div_ceil(g))
    }

    fn any_held(s: &State, first: u64, end: u64) -> bool {
        (first..end).any(|b| s.granules[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }

    fn set_held(s: &mut State, first: u64, end: u64, held: bool) {
        for b in first..end {
            let w = &mut s.granules[(b / 64) as usize];
            if held {
                *w |= 1 << (b % 64);
            } else {
                *w &= !(1 << (b % 64));
            }
        }
    }

    // ---- what the job thread sees ------------------------------------------

    /// Copy operations in flight.
    pub fn ops(&self) -> usize {
        self.lock().ops
    }

    /// Set the job's remaining work to in flight + dirty, under the lock
    /// that operations finish under (they add to the done count, or re-dirty
    /// a failed range, there): no range is counted twice or not at all.
    /// Returns (operations in flight, bytes in flight incl. active writes,
    /// generation to pass to [`Self::wait_for_change`], dirty bytes).
    pub fn update_progress(&self) -> (usize, u64, u64, u64) {
        let s = self.lock();
        let dirty = self.bitmap.bits().count();
        let in_flight = s.bytes + s.active_bytes;
        self.job.progress_set_remaining(in_flight + dirty);
        (s.ops, in_flight, s.generation, dirty)
    }

    /// A copy can be dispatched now (a slot and a buffer are free).
    pub fn has_room(&self) -> bool {
        let s = self.lock();
        s.ops < super::MAX_IN_FLIGHT && !s.free_buffers.is_empty()
    }

    /// The job this copier works for.
    pub fn job(&self) -> &Job {
        &self.job
    }

    /// A forced cancel was requested.
    pub fn job_cancelled(&self) -> bool {
        self.job.is_cancelled()
    }

    /// The error that ends the job, if one happened.
    pub fn error(&self) -> Option<Error> {
        self.lock().error.clone()
    }

    /// Block until an operation (or active write) ended after
    /// `generation` was read.
    pub fn wait_for_change(&self, generation: u64) {
        self.submit();
        let mut g = self.lock();
        while g.generation == generation {
            g = self.wait(g);
        }
    }

    /// Wait until no operation is in flight.
    pub fn wait_all(&self) {
        self.submit();
        let mut g = self.lock();
        while g.ops > 0 {
            g = self.wait(g);
        }
    }

    /// Claim the run of dirty granules starting at granule `first` (up to
    /// `max_len` bytes) that nothing holds: mark them held. `None` when the
    /// first granule is held (the caller waits for it to be released).
    pub fn claim(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let g = self.mirror.params.granularity;
        let first = offset / g;
        let nbits = self.len.div_ceil(g);
        let max_granules = (max_len / g).max(1);
        let mut s = self.lock();
        if Self::any_held(&s, first, first + 1) {
            return None;
        }
        let mut end = first + 1;
        while end < nbits
            && end - first < max_granules
            && self.bitmap.bits().test(end * g)
            && !Self::any_held(&s, end, end + 1)
        {
            end += 1;
        }
        Self::set_held(&mut s, first, end, true);
        let start = first * g;
        Some((start, (end * g).min(self.len) - start))
    }

    /// Wait until the granule at `offset` is no longer held.
    pub fn wait_released(&self, offset: u64) {
        self.submit();
        let b = offset / self.mirror.params.granularity;
        let mut s = self.lock();
        while Self::any_held(&s, b, b + 1) {
            s = self.wait(s);
        }
    }

    /// Queue an operation on a claimed range (waiting for a slot and, for
    /// a copy, a buffer).
    pub fn dispatch(&self, op: Op) {
        let mut s = self.lock();
        // QEMU's rule: no more than buf-size bytes being copied at once
        // (one copy always may be, whatever its size); zeroes and
        // discards only count against the number of operations.
        let buf_size = self.mirror.params.buf_size;
        let copy = op.method == Method::Copy;
        let must_wait = |s: &State| {
            s.ops >= super::MAX_IN_FLIGHT
                || (copy && s.free_buffers.is_empty())
                || (copy && s.copy_bytes > 0 && s.copy_bytes + op.len > buf_size)
        };
        if must_wait(&s) {
            // What this pass queued on the ring must be under way before
            // waiting for it to end.
            drop(s);
            self.submit();
            s = self.lock();
            while must_wait(&s) {
                s = self.wait(s);
            }
        }
        let mut buf = match op.method {
            Method::Copy => s.free_buffers.pop(),
            Method::Zero | Method::Discard => None,
        };
        s.ops += 1;
        s.bytes += op.len;
        if copy {
            s.copy_bytes += op.len;
        }
        drop(s);
        if let Some(b) = buf.take() {
            match self.try_ring(op, b) {
                Ok(()) => return,
                Err(b) => buf = Some(b),
            }
        }
        self.lock().queue.push_back((op, buf));
        self.work.notify_one();
    }

    /// Queue a copy on the run's ring if its read and write resolve down
    /// to files (see `ring`); `Err` gives the buffer back for a worker.
    fn try_ring(&self, op: Op, buf: Buffer) -> Result<(), Buffer> {
        let m = &self.mirror;
        // Relaxed: a hint (see Mirror::offloading): while the kernel may
        // copy with copy_file_range, that is better than any ring.
        if m.copy_offload.load(Ordering::Relaxed) || op.len > buf.0.len() as u64 {
            return Err(buf);
        }
        if let Some(Some(r)) = self.ring.get() {
            self.wait_ring_room(r);
        }
        let Some(resolved) = ring::resolve(&m.source, &m.target, op, &buf.0[..op.len as usize])
        else {
            return Err(buf);
        };
        let ring = self.ring.get_or_init(|| {
            let me = self.me.upgrade()?;
            CopyRing::start(me, self.fixed.clone()).ok()
        });
        match ring {
            Some(r) => r.queue(op, resolved, buf.0).map_err(Buffer),
            None => Err(buf),
        }
    }

    /// Wait until the ring has fewer copies in flight than the workers
    /// would have ([`super::io_workers`]): what the device has queued for
    /// the job is what a guest's requests wait behind. With all of
    /// [`super::MAX_IN_FLIGHT`] on the ring (QEMU's depth), a guest doing
    /// 4 KiB random I/O beside an unthrottled O_DIRECT mirror got 547 IOPS
    /// (QEMU's 474) against 2 512 with the workers, in one run of
    /// `benches/guest_io_under_job.py`. Without a guest the full depth did
    /// not copy faster here (4 GiB, `compare_direct.py`, 5 rounds: 646 and
    /// 624 MiB/s at this depth, 632 and 603 at 16, io_uring and native).
    fn wait_ring_room(&self, r: &CopyRing) {
        let depth = super::io_workers();
        if r.in_flight() < depth {
            return;
        }
        r.submit();
        // The reaper frees a slot before it ends the operation under this
        // lock (see `ring_done`): the wake-up cannot come before the wait.
        let mut s = self.lock();
        while r.in_flight() >= depth {
            s = self.wait(s);
        }
    }

    /// Hand what was queued on the ring to the kernel (nothing without
    /// a ring).
    pub fn submit(&self) {
        if let Some(Some(r)) = self.ring.get() {
            r.submit();
        }
    }

    /// The ring ended a copy: `whole`, it is done; else a worker makes it
    /// again through the block layer, which reports its error.
    pub(super) fn ring_done(&self, op: Op, buf: AlignedBuf, whole: bool) {
        if whole {
            self.mirror.target.start_writeback(op.offset, op.len);
            self.finish(op, Some(Buffer(buf)), true);
        } else {
            let mut s = self.lock();
            s.queue.push_back((op, Some(Buffer(buf))));
            // The ring has room again (see `wait_ring_room`).
            s.generation += 1;
            drop(s);
            self.work.notify_one();
            self.changed.notify_all();
        }
    }

    // ---- active writes (write-blocking mode) --------------------------------

    /// Hold the granules of a guest write (waiting for operations on them).
    pub fn begin_active_write(&self, offset: u64, len: u64) {
        let (first, end) = self.granule_range(offset, len);
        let mut s = self.lock();
        while Self::any_held(&s, first, end) {
            s = self.wait(s);
        }
        Self::set_held(&mut s, first, end, true);
        s.active_writes += 1;
        s.active_bytes += len;
    }

    /// Release them; `redirty`: a range whose target write failed.
    pub fn end_active_write(&self, offset: u64, len: u64, redirty: Option<(u64, u64)>) {
        let (first, end) = self.granule_range(offset, len);
        let mut s = self.lock();
        if let Some((o, l)) = redirty {
            self.bitmap.bits().set_range(o, l);
        }
        Self::set_held(&mut s, first, end, false);
        s.active_writes -= 1;
        s.active_bytes -= len;
        s.generation += 1;
        drop(s);
        self.changed.notify_all();
    }

    /// A request of ours failed: the policy decides (`report` records the
    /// job's error; the first wins). The caller then marks the range dirty
    /// again when it releases it, under the lock, so that progress never
    /// counts the range both in flight and dirty (see [`Self::in_flight`]).
    /// `retry`: the range the job retries (not given for a guest's active
    /// write, whose thread must not wait); under `ignore` its retry is
    /// spaced out here, while it is still held (`Job::range_error_action`).
    pub fn policy(&self, is_read: bool, e: Error, retry: Option<(u64, u64)>) {
        // Relaxed: a report (see the field).
        self.mirror
            .actively_synced
            .store(false, crate::sync::Ordering::Relaxed);
        let p = &self.mirror.params;
        let policy = if is_read {
            p.on_source_error
        } else {
            p.on_target_error
        };
        let errno = e.errno().unwrap_or(libc::EIO);
        let action = match retry {
            Some((offset, len)) => self
                .job
                .range_error_action(policy, is_read, errno, offset, len),
            None => self.job.error_action(policy, is_read, errno),
        };
        if action == BlockErrorAction::Report {
            let mut s = self.lock();
            if s.error.is_none() {
                s.error = Some(Error::from_errno(errno));
            }
        }
    }

    // ---- workers ------------------------------------------------------------

    fn worker(self: Arc<Self>) {
        let _fixed = uring::offer_fixed(self.fixed.clone());
        loop {
            let (op, buf) = {
                let mut s = self.lock();
                loop {
                    if let Some(entry) = s.queue.pop_front() {
                        break entry;
                    }
                    if s.stop {
                        return;
                    }
                    s = self.work.wait(s);
                }
            };
            // A panic here (a bug) must not leave the operation counted
            // forever: it fails the range like an I/O error would.
            let (buf, done) = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.perform(op, buf)
            })) {
                Ok(r) => r,
                Err(p) => {
                    let e = Error::generic(crate::engine::panic_text(&p)).with_errno(libc::EIO);
                    self.policy(false, e, Some((op.offset, op.len)));
                    let b = Some(Buffer::new(self.mirror.params.max_io as usize))
                        .filter(|_| op.method == Method::Copy);
                    (b, false)
                }
            };
            self.finish(op, buf, done);
        }
    }

    /// An operation ended: count it done, or dirty its range again; give
    /// its buffer and granules back.
    fn finish(&self, op: Op, buf: Option<Buffer>, done: bool) {
        let (first, end) = self.granule_range(op.offset, op.len);
        let mut s = self.lock();
        if done {
            self.job.progress_update(op.len);
            if op.method != Method::Copy {
                self.job.progress_skipped(op.len);
            }
            self.job.range_done(op.offset, op.len);
        } else {
            // Dirty again, as it leaves the in-flight count.
            self.bitmap.bits().set_range(op.offset, op.len);
        }
        if let Some(b) = buf {
            s.free_buffers.push(b);
        }
        Self::set_held(&mut s, first, end, false);
        s.ops -= 1;
        s.bytes -= op.len;
        if op.method == Method::Copy {
            s.copy_bytes -= op.len;
        }
        s.generation += 1;
        drop(s);
        self.changed.notify_all();
    }

    /// Run an in-kernel copy in one of the offload slots.
    fn offloaded<T>(&self, f: impl FnOnce() -> T) -> T {
        let limit = super::offload_slots();
        let mut n = self.offloading.lock();
        while *n >= limit {
            n = self.offload_free.wait(n);
        }
        *n += 1;
        drop(n);
        let r = f();
        *self.offloading.lock() -= 1;
        self.offload_free.notify_one();
        r
    }

    /// A zero write or discard on the target. While copies go through
    /// the kernel, it takes an offload slot like them: the kernel runs
    /// both under the target inode's lock, and side by side one only spins
    /// waiting for the other (tmpfs, 50 % holes: a fifth of the job's CPU
    /// in rwsem_spin_on_owner).
    fn target_op(&self, f: impl FnOnce() -> crate::Result<()>) -> crate::Result<()> {
        if self.mirror.offloading() {
            self.offloaded(f)
        } else {
            f()
        }
    }

    /// Do one operation: (the buffer back, whether it succeeded). A
    /// failure has been through the policy; the caller re-dirties.
    fn perform(&self, op: Op, mut buf: Option<Buffer>) -> (Option<Buffer>, bool) {
        let m = &self.mirror;
        let done = match op.method {
            // Both ends plain files: the kernel copies (copy_file_range).
            // Not possible, or failed: through the buffer, which also
            // tells a read error from a write error for the policies.
            // Relaxed: a hint (see Mirror::offloading).
            Method::Copy
                if m.copy_offload.load(Ordering::Relaxed)
                    && match self.offloaded(|| {
                        m.source
                            .copy_range_to(op.offset, &m.target, op.offset, op.len)
                    }) {
                        Ok(true) => {
                            // Relaxed: a hint (see Mirror::offloading).
                            m.offload_proven.store(true, Ordering::Relaxed);
                            true
                        }
                        Ok(false) => {
                            // Relaxed: a hint; a racing op just tries too.
                            m.copy_offload.store(false, Ordering::Relaxed);
                            false
                        }
                        Err(_) => false,
                    } =>
            {
                true
            }
            Method::Copy => {
                let b = buf
                    .as_mut()
                    .expect("dispatch reserves a buffer for every copy");
                self.copy_through(b, op)
            }
            Method::Zero => {
                // A target that already reads as zeroes there (a fresh
                // sparse file) needs no write: holes stay holes.
                let already = m
                    .target
                    .block_status(op.offset, op.len)
                    .is_ok_and(|st| st.zero && st.len >= op.len);
                match if already {
                    Ok(())
                } else {
                    self.target_op(|| m.target.pwrite_zeroes(op.offset, op.len, m.params.unmap))
                } {
                    Err(e) => {
                        self.policy(false, e, Some((op.offset, op.len)));
                        false
                    }
                    Ok(()) => true,
                }
            }
            Method::Discard => match self.target_op(|| m.target.pdiscard(op.offset, op.len)) {
                Err(e) => {
                    self.policy(false, e, Some((op.offset, op.len)));
                    false
                }
                Ok(()) => true,
            },
        };
        if done && op.method == Method::Copy {
            // The target is flushed before READY: have the device write
            // this range while the next ones are copied, not all at once
            // then. While the granules are still held, so that a device
            // that cannot keep up slows the copy down instead of piling
            // up dirty pages.
            m.target.start_writeback(op.offset, op.len);
        }
        (buf, done)
    }

    /// Copy through the buffer, in pieces of its size (an operation sized
    /// for an in-kernel copy can be larger). A failure has been through
    /// the policy.
    fn copy_through(&self, buf: &mut Buffer, op: Op) -> bool {
        let m = &self.mirror;
        let piece = m.params.max_io;
        let end = op.offset + op.len;
        let mut off = op.offset;
        while off < end {
            let b = buf.slice((end - off).min(piece) as usize);
            if let Err(e) = m.source.pread(off, b) {
                self.policy(true, e, Some((op.offset, op.len)));
                return false;
            }
            if let Err(e) = m.target.pwrite(off, b) {
                self.policy(false, e, Some((op.offset, op.len)));
                return false;
            }
            off += b.len() as u64;
        }
        true
    }

    /// Stop and join the workers (after `wait_all`).
    pub fn shutdown(&self) {
        self.lock().stop = true;
        self.work.notify_all();
        let workers = std::mem::take(&mut *self.workers.lock());
        for w in workers {
            let _ = w.join();
        }
        if let Some(Some(r)) = self.ring.get() {
            r.stop();
        }
    }
}
