//! `aio=io_uring` (and `aio=native`, mapped onto it): the `file` and
//! `host_device` drivers' reads and writes as io_uring requests. The
//! requesting thread (a job's worker, a guest device's thread) is the I/O
//! thread: each has its own ring, made on its first request, and waits
//! for its own completion, so the behaviour and the errors are those of
//! `pread`/`pwrite` (a negative result is the errno they would give).
//!
//! A thread that does its I/O from a fixed set of buffers (a mirror's
//! workers) offers them with [`offer_fixed`]: its ring registers them
//! once, and requests inside them become `READ_FIXED`/`WRITE_FIXED`, so
//! the kernel does not look up and pin the buffer's pages on every
//! request (with `O_DIRECT` that was the largest part of a worker's CPU).
//!
//! Submitting a request hands the kernel a raw pointer into the caller's
//! buffer: sound because every request is waited for before the function
//! that borrowed the buffer returns. Registering buffers hands it their
//! pages for as long as the registration lasts: sound because the ring
//! holds a [`Region`] of each, which keeps the memory allocated, and a
//! fixed request is only made for a buffer the caller borrows.

use std::cell::RefCell;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use super::aligned::{AlignedBuf, Region};
use crate::error::{Error, Result};

/// Requests in flight per ring: one (each thread waits for its own).
const ENTRIES: u32 = 4;

/// This thread's ring and the buffers offered for it.
#[derive(Default)]
struct ThreadRing {
    ring: Option<IoUring>,
    /// Buffers offered by [`offer_fixed`]; the table index of each is its
    /// index here.
    offered: Vec<Region>,
    /// `offered` is registered with `ring`.
    registered: bool,
    /// Registering failed (e.g. `RLIMIT_MEMLOCK` for an unprivileged
    /// user): requests go unregistered, which only costs CPU.
    register_failed: bool,
    /// Counts offers, so that an earlier offer's guard does not end a
    /// later one.
    offers: u64,
}

thread_local! {
    static RING: RefCell<ThreadRing> = RefCell::new(ThreadRing::default());
}

/// A ring for one thread that waits for its own requests: the kernel runs
/// completion work only when this thread waits (`DEFER_TASKRUN`, which
/// needs `SINGLE_ISSUER`), so it is not interrupted for it; kernels older
/// than 6.1 get a plain ring.
fn new_ring() -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .build(ENTRIES)
        .or_else(|_| IoUring::new(ENTRIES))
}

impl ThreadRing {
    /// The ring, made if needed, with the offered buffers registered if
    /// that can be done.
    fn ring(&mut self) -> io::Result<&mut IoUring> {
        if self.ring.is_none() {
            self.ring = Some(new_ring()?);
            self.registered = false;
        }
        let ring = self.ring.as_mut().expect("made just above");
        if !self.registered && !self.register_failed && !self.offered.is_empty() {
            let iovecs: Vec<libc::iovec> = self
                .offered
                .iter()
                .map(|r| libc::iovec {
                    iov_base: r.addr() as *mut libc::c_void,
                    iov_len: r.len(),
                })
                .collect();
            // SAFETY: every iovec is a `Region` held in `self.offered`,
            // which keeps its memory allocated until the registration
            // ends (`unregister`, or the ring is dropped, both before
            // `offered` is cleared). The kernel only touches that memory
            // for fixed requests, made only for buffers the caller
            // borrows (see `fixed_index`).
            match unsafe { ring.submitter().register_buffers(&iovecs) } {
                Ok(()) => self.registered = true,
                Err(_) => self.register_failed = true,
            }
        }
        Ok(ring)
    }

    /// The registered buffer holding all of `buf`, if any.
    fn fixed_index(&self, buf: &[u8]) -> Option<u16> {
        if !self.registered {
            return None;
        }
        let i = self.offered.iter().position(|r| r.contains(buf))?;
        u16::try_from(i).ok()
    }
}

/// Offer `bufs` to this thread's ring as registered buffers until the
/// returned guard drops (on this thread: it is not `Send`). A thread's
/// later offer replaces an earlier one. Nothing is made or pinned until
/// this thread's first io_uring request, so a thread that only reaches
/// `aio=threads` nodes pays nothing.
pub(crate) fn offer_fixed(regions: Vec<Region>) -> FixedBuffers {
    let offer = RING.with(|r| {
        let mut r = r.borrow_mut();
        r.unregister();
        r.offered = regions;
        r.register_failed = false;
        r.offers += 1;
        r.offers
    });
    FixedBuffers {
        offer,
        _this_thread: PhantomData,
    }
}

impl ThreadRing {
    fn unregister(&mut self) {
        if self.registered
            && let Some(ring) = &self.ring
            && ring.submitter().unregister_buffers().is_err()
        {
            // The kernel still holds them: drop the ring, which ends the
            // registration, rather than free memory it may use.
            self.ring = None;
        }
        self.registered = false;
        self.offered.clear();
    }
}

/// Registered buffers of this thread; dropping it ends the registration.
pub(crate) struct FixedBuffers {
    offer: u64,
    _this_thread: PhantomData<*const ()>,
}

impl Drop for FixedBuffers {
    fn drop(&mut self) {
        // `try_with`: at thread exit the ring may already be gone, and
        // with it the registration.
        let _ = RING.try_with(|r| {
            let mut r = r.borrow_mut();
            if r.offers == self.offer {
                r.unregister();
            }
        });
    }
}

/// Whether this thread's requests into `buf` go as fixed-buffer requests
/// (tests).
#[cfg(test)]
fn is_fixed(buf: &[u8]) -> bool {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        r.ring().is_ok() && r.fixed_index(buf).is_some()
    })
}

fn with_ring<T>(f: impl FnOnce(&mut ThreadRing) -> io::Result<T>) -> io::Result<T> {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        let res = r.ring().map(|_| ()).and_then(|()| f(&mut r));
        if res.is_err() {
            // A ring that failed to submit is made anew next time (and
            // registers the offered buffers again).
            r.ring = None;
            r.registered = false;
        }
        res
    })
}

/// Whether this thread can have a ring, with QEMU's text when it cannot
/// (io_uring disabled by `kernel.io_uring_disabled`, or a seccomp policy).
pub(crate) fn check() -> Result<()> {
    with_ring(|_| Ok(())).map_err(|e| {
        Error::from(e).prepend("Unable to use io_uring: failed to init linux io_uring ring: ")
    })
}

/// Submit the entry `make` builds (given the registered buffer index for
/// the request's buffer, if any) and wait for its completion: the result
/// (bytes, or a negative errno). `io::Error` only for the ring itself.
fn run(buf: &[u8], make: impl FnOnce(Option<u16>) -> io_uring::squeue::Entry) -> io::Result<i32> {
    with_ring(|t| {
        let entry = make(t.fixed_index(buf));
        let ring = t.ring()?;
        // SAFETY: the entry points to `buf`, which the caller borrows for
        // the whole call of `read_at`/`write_at`, and this function does
        // not return before the kernel has completed the request: the
        // loop below waits for its completion. A fixed entry names the
        // registered buffer that contains `buf` (`fixed_index`). The
        // ring holds nothing else (one request at a time per thread), so
        // the queue has room.
        unsafe { ring.submission().push(&entry) }
            .map_err(|_| io::Error::other("io_uring submission queue full"))?;
        loop {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                // Interrupted or short of kernel resources: the request
                // may already be in the kernel; wait again.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                // Other errors of io_uring_enter (EBADF, EFAULT, EINVAL)
                // are refusals of the call itself: nothing was submitted.
                Err(e) => return Err(e),
            }
            if let Some(cqe) = ring.completion().next() {
                return Ok(cqe.result());
            }
        }
    })
}

fn result(r: io::Result<i32>) -> Result<usize> {
    match r {
        Ok(n) if n >= 0 => Ok(n as usize),
        Ok(n) => Err(Error::from_errno(-n)),
        Err(e) => Err(e.into()),
    }
}

/// One read of at most `buf.len()` bytes at `offset` (`pread`).
pub(crate) fn read_at(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<usize> {
    let len = buf.len().min(i32::MAX as usize) as u32;
    let ptr = buf.as_mut_ptr();
    result(run(buf, |fixed| match fixed {
        Some(i) => opcode::ReadFixed::new(types::Fd(fd), ptr, len, i)
            .offset(offset)
            .build(),
        None => opcode::Read::new(types::Fd(fd), ptr, len)
            .offset(offset)
            .build(),
    }))
}

/// One write of at most `buf.len()` bytes at `offset` (`pwrite`).
pub(crate) fn write_at(fd: RawFd, buf: &[u8], offset: u64) -> Result<usize> {
    let len = buf.len().min(i32::MAX as usize) as u32;
    result(run(buf, |fixed| match fixed {
        Some(i) => opcode::WriteFixed::new(types::Fd(fd), buf.as_ptr(), len, i)
            .offset(offset)
            .build(),
        None => opcode::Write::new(types::Fd(fd), buf.as_ptr(), len)
            .offset(offset)
            .build(),
    }))
}

/// Read all of `buf` at `offset`; a short read (end of file) is EIO, as
/// the threads path reports a file that shrank.
pub(crate) fn read_exact_at(fd: RawFd, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match read_at(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(Error::from_errno(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.errno() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Write all of `buf` at `offset`.
pub(crate) fn write_all_at(fd: RawFd, buf: &[u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match write_at(fd, &buf[done..], offset + done as u64) {
            Ok(0) => return Err(Error::from_errno(libc::EIO)),
            Ok(n) => done += n,
            Err(e) if e.errno() == Some(libc::EINTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A read or write entry, fixed when the buffer is registered (`fixed`).
fn rw_entry(
    op: BatchOp,
    fd: RawFd,
    offset: u64,
    ptr: *mut u8,
    len: u32,
    fixed: Option<u16>,
) -> io_uring::squeue::Entry {
    let fd = types::Fd(fd);
    match (op, fixed) {
        (BatchOp::Read, Some(i)) => opcode::ReadFixed::new(fd, ptr, len, i)
            .offset(offset)
            .build(),
        (BatchOp::Read, None) => opcode::Read::new(fd, ptr, len).offset(offset).build(),
        (BatchOp::Write, Some(i)) => opcode::WriteFixed::new(fd, ptr, len, i)
            .offset(offset)
            .build(),
        (BatchOp::Write, None) => opcode::Write::new(fd, ptr, len).offset(offset).build(),
    }
}

/// What a [`BatchRing`] request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BatchOp {
    /// Read into the buffer.
    Read,
    /// Write the buffer.
    Write,
}

/// What [`BatchRing::wait`] found.
pub(crate) enum BatchDone {
    /// A request ended: the caller's tag, the result (bytes, or a negative
    /// errno) and the buffer back.
    Io {
        tag: u64,
        result: i32,
        buf: AlignedBuf,
    },
    /// A [`BatchRing::wake`].
    Wake,
}

/// What the second entry of a linked pair is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Second {
    /// A data sync after a write: the request's result is the write's.
    Sync,
    /// The write of a copy's bytes just read: the result is the write's.
    CopyWrite,
}

/// A request in the kernel: its buffer, the caller's tag, and for a
/// linked pair (write + sync, read + write) the first entry's result
/// while the second runs.
struct InKernel {
    buf: AlignedBuf,
    tag: u64,
    second: Option<Second>,
    first: Option<i32>,
}

/// Requests in the kernel, by slot.
#[derive(Default)]
struct Slots {
    used: Vec<Option<InKernel>>,
    free: Vec<usize>,
    /// Requests queued and not yet submitted.
    queued: usize,
}

/// An I/O thread's ring (QEMU's shape): the thread queues many requests,
/// submits them in one system call, and waits for their completions
/// (and, with [`BatchRing::wait_ready`], for a socket to become readable
/// at the same time), reaping them in batches. The ring owns each request's buffer from `queue` until its
/// completion is reaped, so memory the kernel reads or writes is never
/// touched, moved or freed under it.
pub(crate) struct BatchRing {
    /// Declared (so dropped) before `fixed`: the registration ends with
    /// the ring.
    ring: IoUring,
    /// The submission queue and the slot table.
    sq: crate::locks::Mutex<Slots>,
    /// The completion queue (one reaper at a time).
    cq: crate::locks::Mutex<()>,
    /// Registered buffers ([`Self::register`]), by table index: held so
    /// that the memory the kernel has pinned stays allocated.
    fixed: std::sync::OnceLock<Vec<Region>>,
}

/// The tag of a wake-up.
const WAKE: u64 = u64::MAX;

/// Marks the completion of a write whose data sync is linked after it.
const FIRST_OF_TWO: u64 = 1 << 62;

/// `io_uring_enter`'s "wait for completions" flag (the kernel ABI's
/// value; the crate keeps its copy private).
const IORING_ENTER_GETEVENTS: u32 = 1;

impl BatchRing {
    /// A ring for up to `entries` requests at once. A plain ring: the
    /// kernel posts completions as they come (interrupting the thread if
    /// it must), so the ring's descriptor polls readable for them, which
    /// [`Self::wait_ready`] relies on.
    pub(crate) fn new(entries: u32) -> io::Result<BatchRing> {
        Ok(BatchRing {
            ring: IoUring::new(entries)?,
            sq: crate::locks::Mutex::new(Slots::default()),
            cq: crate::locks::Mutex::new(()),
            fixed: std::sync::OnceLock::new(),
        })
    }

    /// Register `regions` as the ring's fixed buffers (once): requests
    /// whose bytes lie inside one go as `READ_FIXED`/`WRITE_FIXED`, so the
    /// kernel does not pin their pages on every request. False when the
    /// kernel refused (e.g. `RLIMIT_MEMLOCK`) or buffers are registered
    /// already: requests then go unregistered, which only costs CPU.
    pub(crate) fn register(&self, regions: Vec<Region>) -> bool {
        if self.fixed.get().is_some() || regions.is_empty() {
            return false;
        }
        let iovecs: Vec<libc::iovec> = regions
            .iter()
            .map(|r| libc::iovec {
                iov_base: r.addr() as *mut libc::c_void,
                iov_len: r.len(),
            })
            .collect();
        // SAFETY: every iovec is a `Region` that `self.fixed` holds from
        // here until the ring is dropped (the field is dropped after the
        // ring, which ends the registration; with requests still in the
        // kernel the regions are leaked instead, see `Drop`). The kernel
        // reaches that memory only through fixed requests, made only for
        // a buffer the ring owns while the request is in the kernel.
        if unsafe { self.ring.submitter().register_buffers(&iovecs) }.is_err() {
            return false;
        }
        self.fixed.set(regions).is_ok()
    }

    /// The registered buffer holding all of `buf`, if any.
    fn fixed_index(&self, buf: &[u8]) -> Option<u16> {
        let i = self.fixed.get()?.iter().position(|r| r.contains(buf))?;
        u16::try_from(i).ok()
    }

    /// Wait until a completion is there to reap or `fd` is readable (or
    /// closed, or in error): whether `fd` is. With `poll(2)` rather than
    /// a readiness request on the ring: a thread waiting in
    /// `io_uring_enter` is not known to be blocked by every tool (valgrind
    /// keeps its big lock, and every other thread stops).
    pub(crate) fn wait_ready(&self, fd: RawFd) -> io::Result<bool> {
        use std::os::fd::AsRawFd;
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
            libc::pollfd {
                fd: self.ring.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: `fds` is a valid array of two pollfd for the whole
            // call; poll only writes their `revents`.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n >= 0 {
                return Ok(fds[0].revents != 0);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    fn push(&self, _held: &mut Slots, entries: &[io_uring::squeue::Entry]) -> bool {
        // SAFETY: the submission queue is only reached under `self.sq`,
        // which the caller holds (`_held` is its guard's value). Each
        // entry points at a buffer owned by the slot table (or none: a
        // NOP, a sync) until its completion is reaped in `wait`.
        unsafe { self.ring.submission_shared().push_multiple(entries) }.is_ok()
    }

    /// Queue a read or write of `len` bytes of `buf` at `offset` of `fd`
    /// for the next [`Self::submit`]; the buffer comes back with the
    /// completion. `sync`: a write is followed by a data sync of the file
    /// (FUA as a flush after it), and completes when both did (with the
    /// write's result, or the sync's error). `Err` (with the buffer) when
    /// the queue is full.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn queue(
        &self,
        op: BatchOp,
        fd: RawFd,
        offset: u64,
        buf: AlignedBuf,
        len: usize,
        sync: bool,
        tag: u64,
    ) -> std::result::Result<(), AlignedBuf> {
        let sync = sync && op == BatchOp::Write;
        self.queue_entries(
            buf,
            len,
            tag,
            sync.then_some(Second::Sync),
            |ptr, len, fixed| {
                let first = rw_entry(op, fd, offset, ptr, len, fixed);
                if !sync {
                    return vec![first];
                }
                // The sync starts only after the write succeeded in full; a
                // short or failed write cancels it (-ECANCELED).
                vec![
                    first,
                    opcode::Fsync::new(types::Fd(fd))
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                ]
            },
        )
    }

    /// Queue a copy of `len` bytes: a read at `src_offset` of `src` into
    /// `buf`, linked to a write of them at `dst_offset` of `dst`, which
    /// the kernel starts only after the read returned all of them (a
    /// failed or short read cancels it). The completion's result is the
    /// write's, or the read's when it failed or came short. `Err` (with
    /// the buffer) when the queue is full.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn queue_copy(
        &self,
        src: RawFd,
        src_offset: u64,
        dst: RawFd,
        dst_offset: u64,
        buf: AlignedBuf,
        len: usize,
        tag: u64,
    ) -> std::result::Result<(), AlignedBuf> {
        self.queue_entries(buf, len, tag, Some(Second::CopyWrite), |ptr, len, fixed| {
            vec![
                rw_entry(BatchOp::Read, src, src_offset, ptr, len, fixed),
                rw_entry(BatchOp::Write, dst, dst_offset, ptr, len, fixed),
            ]
        })
    }

    /// Queue the entries `make` builds for `len` bytes of `buf` (given its
    /// address, the length and its registered index): one, or a linked
    /// pair whose second is `second`.
    fn queue_entries(
        &self,
        mut buf: AlignedBuf,
        len: usize,
        tag: u64,
        second: Option<Second>,
        make: impl FnOnce(*mut u8, u32, Option<u16>) -> Vec<io_uring::squeue::Entry>,
    ) -> std::result::Result<(), AlignedBuf> {
        let len = len.min(buf.len()).min(i32::MAX as usize);
        let fixed = self.fixed_index(&buf[..len]);
        let mut entries = make(buf.as_mut_ptr(), len as u32, fixed);
        let mut slots = self.sq.lock();
        let slot = slots.free.pop().unwrap_or(slots.used.len());
        let last = entries.len() - 1;
        for (i, e) in entries.iter_mut().enumerate() {
            let taken = std::mem::replace(e, opcode::Nop::new().build());
            *e = if i < last {
                taken
                    .flags(io_uring::squeue::Flags::IO_LINK)
                    .user_data(slot as u64 | FIRST_OF_TWO)
            } else {
                taken.user_data(slot as u64)
            };
        }
        if slot == slots.used.len() {
            slots.used.push(None);
        }
        // The buffer moves into the table before the kernel can see the
        // entry; moving an `AlignedBuf` does not move its bytes.
        slots.used[slot] = Some(InKernel {
            buf,
            tag,
            second: second.filter(|_| last > 0),
            first: None,
        });
        if self.push(&mut slots, &entries) {
            slots.queued += 1;
            return Ok(());
        }
        let k = slots.used[slot].take().expect("just put there");
        slots.free.push(slot);
        Err(k.buf)
    }

    /// Hand everything queued to the kernel in one system call.
    pub(crate) fn submit(&self) -> io::Result<()> {
        let mut sq = self.sq.lock();
        // SAFETY: the submission queue is only reached under `self.sq`.
        while !unsafe { self.ring.submission_shared() }.is_empty() {
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
        sq.queued = 0;
        Ok(())
    }

    /// Requests queued and not yet submitted.
    pub(crate) fn queued(&self) -> usize {
        self.sq.lock().queued
    }

    /// Requests submitted and not yet reaped: a [`Self::wait`] that blocks
    /// returns without anyone else's help only while this is not zero.
    pub(crate) fn in_kernel(&self) -> usize {
        let s = self.sq.lock();
        s.used.len() - s.free.len() - s.queued
    }

    /// Make [`Self::wait`] return [`BatchDone::Wake`].
    #[cfg(test)]
    pub(crate) fn wake(&self) -> io::Result<()> {
        self.push_plain(opcode::Nop::new().build().user_data(WAKE))?;
        self.submit()
    }

    /// Queue an entry that points at no memory.
    #[cfg(test)]
    fn push_plain(&self, e: io_uring::squeue::Entry) -> io::Result<()> {
        let mut slots = self.sq.lock();
        if !self.push(&mut slots, &[e]) {
            return Err(io::Error::other("io_uring submission queue full"));
        }
        Ok(())
    }

    /// Requests queued or in the kernel.
    pub(crate) fn in_flight(&self) -> usize {
        let s = self.sq.lock();
        s.used.len() - s.free.len()
    }

    /// Wait for at least one completion (with `block`; else not at all)
    /// and append every one there is.
    pub(crate) fn wait(&self, out: &mut Vec<BatchDone>, block: bool) -> io::Result<()> {
        let _cq = self.cq.lock();
        loop {
            // SAFETY: the completion queue is only reached under `self.cq`.
            let mut cq = unsafe { self.ring.completion_shared() };
            if !cq.is_empty() {
                let mut slots = self.sq.lock();
                for cqe in &mut cq {
                    let done = match cqe.user_data() {
                        WAKE => BatchDone::Wake,
                        d if d & FIRST_OF_TWO != 0 => {
                            // The write of a write + sync: kept until the
                            // sync (or its cancellation) completes.
                            let k = slots.used[(d & !FIRST_OF_TWO) as usize]
                                .as_mut()
                                .expect("a completion for a request in the table");
                            k.first = Some(cqe.result());
                            continue;
                        }
                        slot => {
                            let slot = slot as usize;
                            let k = slots.used[slot]
                                .take()
                                .expect("a completion for a request in the table");
                            slots.free.push(slot);
                            let result = match (k.second, k.first) {
                                // The write's bytes, unless the sync failed.
                                (Some(Second::Sync), Some(w)) if cqe.result() >= 0 => w,
                                // A short write cancelled the sync, a short
                                // read the copy's write: the first count
                                // says so to the caller.
                                (_, Some(w)) if w >= 0 && cqe.result() == -libc::ECANCELED => w,
                                (_, Some(w)) if w < 0 => w,
                                _ => cqe.result(),
                            };
                            BatchDone::Io {
                                tag: k.tag,
                                result,
                                buf: k.buf,
                            }
                        }
                    };
                    out.push(done);
                }
                return Ok(());
            }
            drop(cq);
            if !block {
                return Ok(());
            }
            // SAFETY: no arguments are passed (a null `arg`).
            match unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None)
            } {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl Drop for BatchRing {
    fn drop(&mut self) {
        // A request may still be in the kernel (its owner stopped waiting
        // for it): its buffer is leaked rather than freed under it.
        let slots = std::mem::take(&mut *self.sq.lock());
        let mut in_kernel = false;
        for k in slots.used.into_iter().flatten() {
            std::mem::forget(k.buf);
            in_kernel = true;
        }
        if in_kernel && let Some(fixed) = self.fixed.take() {
            // Such a request may be a fixed one: its buffer's pages stay
            // allocated too.
            std::mem::forget(fixed);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;
    use crate::block::aligned::AlignedBuf;

    /// Registered and unregistered requests read and write the same bytes,
    /// with O_DIRECT (where the kernel uses the registered pages) and
    /// without; a guard's end, or a later offer, ends the registration.
    #[test]
    fn fixed_buffers_round_trip_and_end_with_their_guard() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [false, true] {
            let path = dir.path().join(format!("f{direct}"));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(&path)
                .unwrap();
            let fd = f.as_raw_fd();
            let mut pool: Vec<AlignedBuf> =
                (0..3).map(|_| AlignedBuf::zeroed(65536, 4096)).collect();
            let guard = offer_fixed(pool.iter().map(AlignedBuf::region).collect());
            for (i, b) in pool.iter_mut().enumerate() {
                b.iter_mut()
                    .enumerate()
                    .for_each(|(j, x)| *x = (i * 7 + j % 251) as u8);
                assert!(is_fixed(&b[4096..8192]), "buffer {i} registered");
                write_all_at(fd, b, i as u64 * 65536).unwrap();
            }
            let mut other = AlignedBuf::zeroed(65536, 4096);
            assert!(!is_fixed(&other), "a buffer not offered goes unregistered");
            for i in 0..3 {
                read_exact_at(fd, &mut other, i * 65536).unwrap();
                assert_eq!(&other[..], &pool[i as usize][..]);
                pool[0].fill(0);
                read_exact_at(fd, &mut pool[0][..32768], i * 65536 + 32768).unwrap();
                assert_eq!(&pool[0][..32768], &other[32768..]);
            }
            // A later offer replaces the first; the first guard's end
            // leaves it alone.
            let second = offer_fixed(vec![other.region()]);
            assert!(is_fixed(&other) && !is_fixed(&pool[1]));
            drop(guard);
            assert!(is_fixed(&other));
            drop(second);
            assert!(!is_fixed(&other));
            // Still correct unregistered.
            read_exact_at(fd, &mut other, 65536).unwrap();
            assert_eq!(&other[..], &pool[1][..]);
            // A read past the end is EIO from read_exact_at either way.
            let _g = offer_fixed(vec![other.region()]);
            assert_eq!(
                read_exact_at(fd, &mut other, 3 * 65536)
                    .unwrap_err()
                    .errno(),
                Some(libc::EIO)
            );
        }
    }

    /// A region keeps its memory while registered even when the buffer is
    /// dropped first; a bad file descriptor is an error, not a panic.
    #[test]
    fn dropped_buffer_and_bad_fd() {
        let b = AlignedBuf::zeroed(8192, 4096);
        let g = offer_fixed(vec![b.region()]);
        drop(b);
        let mut c = AlignedBuf::zeroed(8192, 4096);
        assert!(!is_fixed(&c));
        assert_eq!(
            read_exact_at(-1, &mut c, 0).unwrap_err().errno(),
            Some(libc::EBADF)
        );
        drop(g);
    }

    /// Many requests queued and submitted at once complete with their
    /// tags and buffers; a write with a linked sync reports the write's
    /// count; a read past the end is short; a bad descriptor and a wake-up
    /// come back as such.
    #[test]
    fn batch_ring_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("b"))
            .unwrap();
        let fd = f.as_raw_fd();
        let ring = BatchRing::new(64).unwrap();
        let mut done = Vec::new();
        let reap = |done: &mut Vec<BatchDone>, n: usize| {
            while done.len() < n {
                ring.wait(done, true).unwrap();
            }
        };
        for i in 0..16u64 {
            let mut b = AlignedBuf::zeroed(4096, 4096);
            b.fill(i as u8 + 1);
            assert!(
                ring.queue(BatchOp::Write, fd, i * 4096, b, 4096, i % 2 == 0, i)
                    .is_ok()
            );
        }
        assert_eq!(ring.in_flight(), 16);
        ring.submit().unwrap();
        reap(&mut done, 16);
        let io = |d: &BatchDone| match d {
            BatchDone::Io { tag, result, buf } => (*tag, *result, buf.to_vec()),
            _ => panic!("a request's completion"),
        };
        let mut tags: Vec<u64> = done.iter().map(|d| io(d).0).collect();
        tags.sort();
        assert_eq!(tags, (0..16).collect::<Vec<_>>());
        assert!(done.iter().all(|d| io(d).1 == 4096), "every write whole");
        assert_eq!(ring.in_flight(), 0);
        done.clear();
        for i in 0..16u64 {
            let b = AlignedBuf::zeroed(4096, 4096);
            ring.queue(BatchOp::Read, fd, i * 4096, b, 4096, false, 100 + i)
                .unwrap_or_else(|_| panic!("room"));
        }
        // Past the end: short (4 KiB of 8 KiB), then nothing.
        ring.queue(
            BatchOp::Read,
            fd,
            15 * 4096,
            AlignedBuf::zeroed(8192, 4096),
            8192,
            false,
            200,
        )
        .unwrap_or_else(|_| panic!("room"));
        ring.queue(
            BatchOp::Read,
            -1,
            0,
            AlignedBuf::zeroed(512, 512),
            512,
            false,
            300,
        )
        .unwrap_or_else(|_| panic!("room"));
        ring.submit().unwrap();
        reap(&mut done, 18);
        for d in &done {
            let (tag, result, buf) = io(d);
            match tag {
                t @ 100..116 => {
                    assert_eq!(result, 4096);
                    assert!(buf.iter().all(|x| *x == (t - 100) as u8 + 1), "tag {t}");
                }
                200 => assert_eq!(result, 4096, "short read at the end"),
                300 => assert_eq!(result, -libc::EBADF),
                t => panic!("unexpected tag {t}"),
            }
        }
        done.clear();
        ring.wake().unwrap();
        reap(&mut done, 1);
        assert!(matches!(done[0], BatchDone::Wake));
        // Waiting for a socket and the ring: the ring's completion ends
        // the wait while the socket has nothing; then the socket's data.
        done.clear();
        let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        ring.queue(
            BatchOp::Read,
            fd,
            0,
            AlignedBuf::zeroed(4096, 4096),
            4096,
            false,
            400,
        )
        .unwrap_or_else(|_| panic!("room"));
        ring.submit().unwrap();
        while done.is_empty() {
            assert!(
                !ring.wait_ready(a.as_raw_fd()).unwrap(),
                "nothing to read yet"
            );
            ring.wait(&mut done, false).unwrap();
        }
        assert_eq!(io(&done[0]).0, 400);
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert!(ring.wait_ready(a.as_raw_fd()).unwrap());
        ring.wait(&mut done, false).unwrap();
        assert_eq!(done.len(), 1, "no completion without a request");
    }

    /// Linked copies (read into a buffer, then write it elsewhere) with
    /// registered and unregistered buffers, with O_DIRECT; a read that
    /// fails or comes short cancels the write and says so.
    #[test]
    fn batch_ring_copies() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_DIRECT)
                .open(dir.path().join(name))
                .unwrap()
        };
        let src_data: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 / 512) as u8).collect();
        std::fs::write(dir.path().join("src"), &src_data).unwrap();
        std::fs::write(dir.path().join("dst"), vec![0u8; 1 << 20]).unwrap();
        let (src, dst) = (open("src"), open("dst"));
        let ring = BatchRing::new(64).unwrap();
        let pool: Vec<AlignedBuf> = (0..4).map(|_| AlignedBuf::zeroed(64 << 10, 4096)).collect();
        assert!(ring.register(pool.iter().map(|b| b.region()).collect()));
        assert!(!ring.register(vec![pool[0].region()]), "registered once");
        assert_eq!(ring.fixed_index(&pool[2][..4096]), Some(2));
        let mut done = Vec::new();
        let mut pool = pool;
        // 16 chunks of 64 KiB: the four registered buffers, and as many
        // unregistered ones, in flight together.
        let mut chunk = 0u64;
        let mut copied = 0;
        while copied < 16 {
            let before = ring.in_kernel();
            while chunk < 16 && ring.in_flight() < 8 {
                let b = pool
                    .pop()
                    .unwrap_or_else(|| AlignedBuf::zeroed(64 << 10, 4096));
                let off = chunk * (64 << 10);
                assert!(
                    ring.queue_copy(
                        src.as_raw_fd(),
                        off,
                        dst.as_raw_fd(),
                        off,
                        b,
                        64 << 10,
                        chunk
                    )
                    .is_ok()
                );
                chunk += 1;
            }
            assert_eq!(ring.in_kernel(), before, "queued is not in the kernel");
            ring.submit().unwrap();
            assert_eq!(ring.in_kernel(), ring.in_flight());
            done.clear();
            ring.wait(&mut done, true).unwrap();
            for d in done.drain(..) {
                let BatchDone::Io { result, buf, .. } = d else {
                    panic!("a copy's completion")
                };
                assert_eq!(result, 64 << 10);
                copied += 1;
                pool.push(buf);
            }
        }
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), src_data);
        // A read past the end comes short (the write is cancelled), a read
        // of a bad descriptor fails: nothing is written either way.
        let b = AlignedBuf::zeroed(64 << 10, 4096);
        ring.queue_copy(
            src.as_raw_fd(),
            (1 << 20) - 4096,
            dst.as_raw_fd(),
            0,
            b,
            64 << 10,
            1,
        )
        .unwrap_or_else(|_| panic!("room"));
        let b = AlignedBuf::zeroed(4096, 4096);
        ring.queue_copy(-1, 0, dst.as_raw_fd(), 4096, b, 4096, 2)
            .unwrap_or_else(|_| panic!("room"));
        let b = AlignedBuf::zeroed(4096, 4096);
        ring.queue_copy(src.as_raw_fd(), 0, -1, 0, b, 4096, 3)
            .unwrap_or_else(|_| panic!("room"));
        ring.submit().unwrap();
        while done.len() < 3 {
            ring.wait(&mut done, true).unwrap();
        }
        for d in &done {
            let BatchDone::Io { tag, result, .. } = d else {
                panic!("a copy's completion")
            };
            match tag {
                1 => assert_eq!(*result, 4096, "short read"),
                2 => assert_eq!(*result, -libc::EBADF, "the read's error"),
                3 => assert_eq!(*result, -libc::EBADF, "the write's error"),
                t => panic!("unexpected tag {t}"),
            }
        }
        assert_eq!(std::fs::read(dir.path().join("dst")).unwrap(), src_data);
        assert_eq!(ring.in_kernel(), 0);
    }
}
