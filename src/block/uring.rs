//! `aio=io_uring` (and `aio=native`, mapped onto it): the `file` and
//! `host_device` drivers' reads and writes as io_uring requests. The
//! requesting thread (a job's worker, a guest device's thread) is the I/O
//! thread: each has its own ring, made on its first request, and waits
//! for its own completion, so the behaviour and the errors are those of
//! `pread`/`pwrite` (a negative result is the errno they would give).
//!
//! Submitting a request hands the kernel a raw pointer into the caller's
//! buffer: the one `unsafe` of this module, sound because every request is
//! waited for before the function that borrowed the buffer returns.

use std::cell::RefCell;
use std::io;
use std::os::fd::RawFd;

use io_uring::{IoUring, opcode, types};

use crate::error::{Error, Result};

/// Requests in flight per ring: one (each thread waits for its own).
const ENTRIES: u32 = 4;

thread_local! {
    static RING: RefCell<Option<IoUring>> = const { RefCell::new(None) };
}

fn with_ring<T>(f: impl FnOnce(&mut IoUring) -> io::Result<T>) -> io::Result<T> {
    RING.with(|r| {
        let mut r = r.borrow_mut();
        let ring = match &mut *r {
            Some(ring) => ring,
            slot => slot.insert(IoUring::new(ENTRIES)?),
        };
        let res = f(ring);
        if res.is_err() {
            // A ring that failed to submit is made anew next time.
            *r = None;
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

/// Submit one entry and wait for its completion: the result (bytes, or a
/// negative errno). `io::Error` only for the ring itself.
fn run(entry: io_uring::squeue::Entry) -> io::Result<i32> {
    with_ring(|ring| {
        // SAFETY: the entry points to a buffer the caller borrows for the
        // whole call of `read_at`/`write_at`, and this function does not
        // return before the kernel has completed the request: the loop
        // below waits for its completion. The ring holds nothing else
        // (one request at a time per thread), so the queue has room.
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
    let e = opcode::Read::new(types::Fd(fd), buf.as_mut_ptr(), len)
        .offset(offset)
        .build();
    result(run(e))
}

/// One write of at most `buf.len()` bytes at `offset` (`pwrite`).
pub(crate) fn write_at(fd: RawFd, buf: &[u8], offset: u64) -> Result<usize> {
    let len = buf.len().min(i32::MAX as usize) as u32;
    let e = opcode::Write::new(types::Fd(fd), buf.as_ptr(), len)
        .offset(offset)
        .build();
    result(run(e))
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
