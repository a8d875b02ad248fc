//! The asynchronous data path of an export connection, in QEMU's shape:
//! one thread and one ring per connection. The thread reads requests and
//! hands each read or write to the kernel as soon as it has it (one
//! `io_uring_enter` per request, as QEMU's `aio=native` makes one
//! `io_submit` per request); then it waits for completions and for the
//! socket to become readable at once (`poll(2)` on both), reaps
//! completions in batches and writes their replies together (one
//! `writev`). With nothing on the ring it waits in its read, as the
//! workers' path does. Each request costs two wake-ups of one thread, as
//! in QEMU's event loop: its arrival and its completion.
//!
//! Submitting what the client sent together in one call saved system
//! calls but not time: the requests reached the device in bursts, the
//! device answered them in bursts (here, a virtio disk: about 10
//! requests per interrupt against QEMU's 3), and each request waited for
//! its burst. Submitted one by one, a guest doing 4 KiB random I/O at
//! depth 16 through the export (fio's nbd engine, O_DIRECT raw node, no
//! job) made 1.05x and 1.07x the IOPS (medians of the ratio over 10
//! interleaved rounds, two runs).
//!
//! Only a plain read or write that resolves down to a file takes this
//! path (`block::resolve`: raw over `file`/`host_device` with
//! `aio=io_uring|native`, through a background mirror's filter, aligned
//! when `cache.direct=on`). Everything else goes to the connection's
//! workers as before, and so does a resolved request that failed: it is
//! made again there, so that the error policy, the I/O status and the
//! events see it as they see every other request.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;

use super::nbd_conn::{Conn, Job};
use crate::block::aligned::AlignedBuf;
use crate::block::resolve::{self, Resolved};
use crate::block::uring::{BatchDone, BatchOp, BatchRing};
use crate::nbd::proto::{Request, cmd};
// std's atomics, not crate::sync's: a statistic no loom model covers (and
// loom's have no const constructor for a static).
use std::sync::atomic::{AtomicU64, Ordering};

/// Room on the ring: the connection's requests in flight (at most
/// `MAX_REQUESTS`) and a wake-up, with margin.
const RING_ENTRIES: u32 = 64;

/// Buffers are page-aligned: good for every `O_DIRECT` device.
const BUF_ALIGN: usize = 4096;

/// Requests completed on this path, in the whole process (tests).
static COMPLETED: AtomicU64 = AtomicU64::new(0);

/// How many export requests completed on the asynchronous path so far.
#[doc(hidden)]
pub fn completed_requests() -> u64 {
    // Relaxed: a statistic.
    COMPLETED.load(Ordering::Relaxed)
}

/// A request on the ring.
struct Pending {
    req: Request,
    /// Dropped when the kernel is done with the request (see `resolve`).
    resolved: Resolved,
}

/// A connection's ring and what its requests need when they complete
/// (used by the connection's reading thread only).
pub(super) struct Aio {
    ring: BatchRing,
    pending: HashMap<u64, Pending>,
    next_tag: u64,
}

/// What became of a request offered to [`Aio::start`].
pub(super) enum Started {
    /// On the ring; it is answered when it completes.
    Queued,
    /// Not for this path: serve it as before (for a write, its payload
    /// has not been read).
    Declined,
    /// The client's payload could not be read: the connection ends.
    Broken,
}

impl Aio {
    /// A ring for the calling thread. `None` when io_uring cannot be used
    /// (the connection serves everything with its workers).
    pub(super) fn new() -> Option<Aio> {
        Some(Aio {
            ring: BatchRing::new(RING_ENTRIES).ok()?,
            pending: HashMap::new(),
            next_tag: 0,
        })
    }

    /// Whether `req` may take this path before anything else is known: a
    /// read or write without flags that ask more of the block layer.
    pub(super) fn candidate(req: &Request) -> bool {
        match req.kind {
            // DF only shapes the reply (one data chunk, as here).
            cmd::READ => req.flags & !crate::nbd::proto::cflag::DF == 0,
            // FUA (also a writethrough export's): a linked data sync. An
            // oversized payload is the reader's to refuse (before anything
            // is allocated for it).
            cmd::WRITE => {
                req.flags & !crate::nbd::proto::cflag::FUA == 0
                    && req.length <= u64::from(crate::nbd::proto::MAX_BUFFER)
            }
            _ => false,
        }
    }

    /// Queue `req` (a [`Self::candidate`] that passed the connection's
    /// checks); a write's payload is read from `r` into the request's
    /// buffer. The caller submits it (see [`Self::submit`]).
    pub(super) fn start(&mut self, conn: &Conn, req: &Request, r: &mut dyn io::Read) -> Started {
        let write = req.kind == cmd::WRITE;
        let len = req.length;
        if len == 0 || (!write && !conn.reads_as_data(req)) {
            return Started::Declined;
        }
        let mut buf = AlignedBuf::zeroed(len as usize, BUF_ALIGN);
        let Some(resolved) = conn.blk().resolve(resolve::Request {
            offset: req.offset,
            len,
            buf: buf.as_ptr() as usize,
            write,
            fua: write && conn.write_flags_fua(req),
        }) else {
            return Started::Declined;
        };
        if write && r.read_exact(&mut buf).is_err() {
            // Never submitted: dropping it releases the nodes (and marks
            // the range dirty as a failed write would, which is harmless).
            return Started::Broken;
        }
        let tag = self.next_tag;
        self.next_tag += 1;
        let (fd, offset, sync) = (resolved.fd(), resolved.offset(), resolved.sync_after());
        // In the table before the kernel can complete it.
        self.pending.insert(
            tag,
            Pending {
                req: *req,
                resolved,
            },
        );
        let op = if write { BatchOp::Write } else { BatchOp::Read };
        match self
            .ring
            .queue(op, fd, offset, buf, len as usize, sync, tag)
        {
            Ok(()) => Started::Queued,
            Err(_) => {
                // The ring is full (it has room for every request the
                // connection lets in flight, so this is not expected).
                // A write's payload is gone with the buffer: end the
                // connection rather than serve it wrongly.
                self.pending.remove(&tag);
                if write {
                    Started::Broken
                } else {
                    Started::Declined
                }
            }
        }
    }

    /// Hand what is queued to the kernel. An error of the ring itself
    /// ends the connection (the caller closes it).
    pub(super) fn submit(&self) -> io::Result<()> {
        self.ring.submit()
    }

    /// Requests on the ring.
    pub(super) fn in_flight(&self) -> usize {
        self.ring.in_flight()
    }

    /// Submit what is queued and answer completions until `fd` (the
    /// connection's socket) is readable, or until nothing is left on the
    /// ring (then the caller may wait in its read: nothing needs this
    /// thread meanwhile). False: the ring failed (the connection ends).
    pub(super) fn wait_readable(
        &mut self,
        conn: &Conn,
        tx: &crossbeam_channel::Sender<Job>,
        fd: RawFd,
    ) -> bool {
        loop {
            if !self.answer(conn, tx, false) {
                return false;
            }
            if self.ring.in_flight() == 0 {
                return true;
            }
            match self.ring.wait_ready(fd) {
                Ok(false) => {}
                Ok(true) => return self.answer(conn, tx, false),
                Err(_) => return false,
            }
        }
    }

    /// Submit what is queued, wait for at least one completion, and
    /// answer what completed. False: the ring failed.
    pub(super) fn pump(&mut self, conn: &Conn, tx: &crossbeam_channel::Sender<Job>) -> bool {
        self.answer(conn, tx, true)
    }

    /// Submit what is queued, reap what completed (waiting for at least
    /// one with `block`) and answer it. Each request is submitted when it
    /// is read, so the submit here finds nothing, unless that submission
    /// failed: then it fails again and ends the connection, where a wait
    /// for a request the kernel never got would hang.
    fn answer(&mut self, conn: &Conn, tx: &crossbeam_channel::Sender<Job>, block: bool) -> bool {
        let mut done: Vec<BatchDone> = Vec::new();
        if self.ring.submit().is_err() || self.ring.wait(&mut done, block).is_err() {
            return false;
        }
        let mut replies: Vec<(Vec<u8>, Option<AlignedBuf>)> = Vec::new();
        let mut answered: Vec<u64> = Vec::new();
        for d in done {
            let BatchDone::Io { tag, result, buf } = d else {
                continue;
            };
            let Some(p) = self.pending.remove(&tag) else {
                continue;
            };
            let ok = u64::try_from(result).is_ok_and(|n| n == p.req.length);
            // The nodes' after-write steps and releases, before the
            // client hears of it (as the synchronous path).
            drop(p.resolved);
            let write = p.req.kind == cmd::WRITE;
            if !ok {
                // Made again by a worker: the policy sees it there.
                let payload = if write { buf.to_vec() } else { Vec::new() };
                if tx.send(Job::new(p.req, payload)).is_err() {
                    conn.close();
                }
                continue;
            }
            // Relaxed: a statistic.
            COMPLETED.fetch_add(1, Ordering::Relaxed);
            if write {
                replies.push((conn.done_reply(&p.req), None));
                answered.push(p.req.length);
            } else {
                replies.push((conn.data_reply_header(&p.req), Some(buf)));
                answered.push(0);
            }
        }
        if !replies.is_empty() {
            let parts: Vec<&[u8]> = replies
                .iter()
                .flat_map(|(h, d)| [h.as_slice(), d.as_deref().unwrap_or(&[])])
                .collect();
            if conn.write_batch(&parts).is_err() {
                conn.close();
            }
            for bytes in answered {
                conn.leave(bytes);
            }
        }
        true
    }

    /// The reader stopped: answer the requests still on the ring.
    pub(super) fn finish(&mut self, conn: &Conn, tx: &crossbeam_channel::Sender<Job>) {
        while self.ring.in_flight() > 0 {
            if !self.pump(conn, tx) {
                // The ring broke: what it still holds stays leaked by
                // it rather than freed under the kernel.
                conn.close();
                return;
            }
        }
    }
}

/// Whether `r` holds a whole request header already (then reading the
/// next request does not wait, and answering completions can wait).
pub(super) fn holds_header(buffered: usize, extended: bool) -> bool {
    buffered >= if extended { 32 } else { 28 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_sizes() {
        assert!(holds_header(28, false) && !holds_header(27, false));
        assert!(holds_header(32, true) && !holds_header(31, true));
    }
}
