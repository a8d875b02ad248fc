//! The mirror's copies on one io_uring ring (QEMU's shape): where the
//! source's read and the target's write both resolve down to a file
//! (`file`/`host_device` with `aio=io_uring|native`, under `raw`), the
//! job thread queues each copy as a read linked to a write of the same
//! buffer, and hands everything it dispatched in one pass to the kernel
//! in one system call; the kernel starts each write as soon as its read
//! completed, without a round trip through a thread. One reaper thread
//! per run takes the completions in batches and ends the operations.
//!
//! A copy whose read or write failed (or came short) is made again by a
//! worker through the block layer, so that error policies, I/O status and
//! events see it exactly as every other request (see `block::resolve`).
//! Everything that does not resolve (qcow2, blkdebug, `aio=threads`, an
//! unaligned `O_DIRECT` request, zero writes and discards, copies the
//! kernel makes with `copy_file_range`) goes to the workers as before.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::thread::JoinHandle;

use super::copy::{Copier, Op};
use crate::block::Node;
use crate::block::aligned::{AlignedBuf, Region};
use crate::block::resolve::{Request, Resolved};
use crate::block::uring::{BatchDone, BatchRing};
use crate::locks::{Condvar, Mutex};

/// Copies the ring completed, and copies it handed back to the workers
/// (tests; std's atomics: a static, and nothing is ordered by them).
static COPIES: AtomicU64 = AtomicU64::new(0);
static REDONE: AtomicU64 = AtomicU64::new(0);

/// (copies completed on a mirror's ring, copies made again by a worker
/// after failing there), since the process started. For tests.
#[doc(hidden)]
pub fn ring_copies() -> (u64, u64) {
    // Relaxed: counters read after the jobs ended (joined threads).
    (
        COPIES.load(std::sync::atomic::Ordering::Relaxed),
        REDONE.load(std::sync::atomic::Ordering::Relaxed),
    )
}

/// A copy queued or in the kernel: the operation and what its read and
/// write hold until they complete (the nodes in flight, the target's
/// after-write marks).
struct Pending {
    op: Op,
    read: Resolved,
    write: Resolved,
}

#[derive(Default)]
struct State {
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    stop: bool,
}

/// One run's ring and its reaper.
pub(super) struct CopyRing {
    ring: BatchRing,
    state: Mutex<State>,
    /// The reaper waits here while nothing is in the kernel.
    submitted: Condvar,
    reaper: Mutex<Option<JoinHandle<()>>>,
}

/// Room for every operation a run has in flight, as linked pairs.
const ENTRIES: u32 = 4 * super::MAX_IN_FLIGHT as u32;

/// The read and the write of `op` through `buf`, resolved; `None` when
/// either must go through the block layer.
pub(super) fn resolve(
    source: &Arc<Node>,
    target: &Arc<Node>,
    op: Op,
    buf: &[u8],
) -> Option<(Resolved, Resolved)> {
    let req = Request {
        offset: op.offset,
        len: op.len,
        buf: buf.as_ptr() as usize,
        write: false,
        fua: false,
    };
    // The read first: a declined write runs its after-write marks, which
    // only matter for a write that then happens (on a worker).
    let read = source.resolve(req)?;
    let write = target.resolve(Request { write: true, ..req })?;
    Some((read, write))
}

impl CopyRing {
    /// A ring with `fixed` registered, and its reaper working for `c`.
    pub(super) fn start(c: Arc<Copier>, fixed: Vec<Region>) -> std::io::Result<Arc<CopyRing>> {
        let ring = BatchRing::new(ENTRIES)?;
        // Refused (RLIMIT_MEMLOCK): the copies go unregistered.
        ring.register(fixed);
        let r = Arc::new(CopyRing {
            ring,
            state: Mutex::new(State::default()),
            submitted: Condvar::new(),
            reaper: Mutex::new(None),
        });
        let me = r.clone();
        let h = std::thread::Builder::new()
            .name("mirror-ring".into())
            .spawn(move || me.reap(&c))?;
        *r.reaper.lock() = Some(h);
        Ok(r)
    }

    /// Queue the copy `op` (resolved into `read` and `write`) through
    /// `buf` for the next [`Self::submit`]; `Err` gives the buffer back
    /// when the ring has no room (the caller copies on a worker).
    pub(super) fn queue(
        &self,
        op: Op,
        (read, write): (Resolved, Resolved),
        buf: AlignedBuf,
    ) -> Result<(), AlignedBuf> {
        let (src, src_off, dst, dst_off) = (read.fd(), read.offset(), write.fd(), write.offset());
        let mut s = self.state.lock();
        let tag = s.free.pop().unwrap_or(s.pending.len());
        if tag == s.pending.len() {
            s.pending.push(None);
        }
        s.pending[tag] = Some(Pending { op, read, write });
        match self
            .ring
            .queue_copy(src, src_off, dst, dst_off, buf, op.len as usize, tag as u64)
        {
            Ok(()) => Ok(()),
            Err(buf) => {
                s.pending[tag] = None;
                s.free.push(tag);
                Err(buf)
            }
        }
    }

    /// Copies queued or in the kernel.
    pub(super) fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Hand every queued copy to the kernel in one system call. An error
    /// of `io_uring_enter` itself leaves them queued for the next call
    /// (the reaper tries again while it waits).
    pub(super) fn submit(&self) {
        self.try_submit();
    }

    /// [`Self::submit`]: false when `io_uring_enter` failed.
    fn try_submit(&self) -> bool {
        if self.ring.queued() == 0 {
            return true;
        }
        let ok = self.ring.submit().is_ok();
        // Under the lock the reaper checks for work under: it is either
        // past its check or waiting already.
        let _s = self.state.lock();
        self.submitted.notify_all();
        ok
    }

    /// The reaper: wait while nothing is in the kernel (never inside
    /// `io_uring_enter` then: a tool like valgrind would hold every
    /// other thread while it waits there), else for completions, and end
    /// each copy.
    fn reap(&self, c: &Copier) {
        let mut done = Vec::new();
        loop {
            {
                let mut s = self.state.lock();
                while self.ring.in_kernel() == 0 {
                    if self.ring.queued() > 0 {
                        // Queued and not yet handed over (or the hand-over
                        // failed): hand it over from here.
                        drop(s);
                        if !self.try_submit() {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        s = self.state.lock();
                        continue;
                    }
                    if s.stop {
                        return;
                    }
                    s = self.submitted.wait(s);
                }
            }
            if self.ring.wait(&mut done, true).is_err() {
                // The ring's own call failed (not a request): try again.
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            }
            for d in done.drain(..) {
                let BatchDone::Io { tag, result, buf } = d else {
                    continue;
                };
                let p = {
                    let mut s = self.state.lock();
                    s.free.push(tag as usize);
                    s.pending[tag as usize].take()
                };
                let Some(Pending { op, read, write }) = p else {
                    continue;
                };
                let whole = usize::try_from(result).is_ok_and(|n| n as u64 == op.len);
                // The source leaves the in-flight count, the target's
                // after-write marks run, as when a worker's calls return.
                drop(read);
                drop(write);
                // Relaxed: counters (see `ring_copies`).
                if whole {
                    COPIES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                } else {
                    REDONE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                c.ring_done(op, buf, whole);
            }
        }
    }

    /// End the reaper (nothing may be in flight: after `wait_all`).
    pub(super) fn stop(&self) {
        self.state.lock().stop = true;
        self.submitted.notify_all();
        if let Some(h) = self.reaper.lock().take() {
            let _ = h.join();
        }
    }
}
