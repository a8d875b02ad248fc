//! The asynchronous data path of an export connection, in QEMU's shape:
//! one ring per connection keeps its reads and writes in flight, queued
//! by the thread that reads requests and handed to the kernel in one
//! system call once it has read every request the client sent together;
//! a completion thread reaps them in batches and writes their replies
//! together (one `writev`).
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
use std::sync::Arc;
use std::thread;

use super::nbd_conn::{Conn, Job};
use crate::block::aligned::AlignedBuf;
use crate::block::resolve::{self, Resolved};
use crate::block::uring::{BatchDone, BatchOp, BatchRing};
use crate::locks::Mutex;
use crate::nbd::proto::{Request, cmd};
use crate::sync::{AtomicBool, AtomicU64, Ordering};

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

/// A connection's ring and what its requests need when they complete.
pub(super) struct Aio {
    ring: BatchRing,
    pending: Mutex<HashMap<u64, Pending>>,
    next_tag: AtomicU64,
    /// The reader stopped: the completion thread ends once nothing is in
    /// flight.
    reading_done: AtomicBool,
    completer: Mutex<Option<thread::JoinHandle<()>>>,
}

/// What became of a request offered to [`Aio::start`].
pub(super) enum Started {
    /// On the ring; its reply is written by the completion thread.
    Queued,
    /// Not for this path: serve it as before (for a write, its payload
    /// has not been read).
    Declined,
    /// The client's payload could not be read: the connection ends.
    Broken,
}

impl Aio {
    /// A ring for `conn` and its completion thread, which hands failed
    /// requests to the workers on `tx`. `None` when io_uring cannot be
    /// used (the connection serves everything with its workers).
    pub(super) fn new(conn: &Arc<Conn>, tx: &crossbeam_channel::Sender<Job>) -> Option<Arc<Aio>> {
        let aio = Arc::new(Aio {
            ring: BatchRing::new(RING_ENTRIES).ok()?,
            pending: Mutex::new(HashMap::new()),
            next_tag: AtomicU64::new(0),
            reading_done: AtomicBool::new(false),
            completer: Mutex::new(None),
        });
        let (a, c, tx) = (aio.clone(), conn.clone(), tx.clone());
        let h = thread::Builder::new()
            .name("bj-nbd-aio".into())
            .spawn(move || {
                crate::nbd::transport::block_sigpipe();
                a.complete(&c, &tx);
            })
            .ok()?;
        *aio.completer.lock() = Some(h);
        Some(aio)
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
    /// buffer. The caller submits (see [`Self::submit`]).
    pub(super) fn start(&self, conn: &Conn, req: &Request, r: &mut dyn io::Read) -> Started {
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
        // Relaxed: a unique number is all that is needed.
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (fd, offset, sync) = (resolved.fd(), resolved.offset(), resolved.sync_after());
        // In the table before the kernel can complete it.
        self.pending.lock().insert(
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
                self.pending.lock().remove(&tag);
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

    /// The reader stopped: let the completion thread end once the
    /// requests in flight are answered, and wait for it.
    pub(super) fn finish(&self) {
        // Release: pairs with the Acquire load in `complete`.
        self.reading_done.store(true, Ordering::Release);
        let _ = self.ring.submit();
        let _ = self.ring.wake();
        if let Some(h) = self.completer.lock().take() {
            let _ = h.join();
        }
    }

    /// The completion thread: reap, finish each request's bookkeeping,
    /// answer the batch in one write, and hand failed requests to the
    /// workers.
    fn complete(&self, conn: &Conn, tx: &crossbeam_channel::Sender<Job>) {
        let mut done: Vec<BatchDone> = Vec::new();
        let mut replies: Vec<(Vec<u8>, Option<AlignedBuf>)> = Vec::new();
        let mut answered: Vec<u64> = Vec::new();
        loop {
            if self.ring.wait(&mut done).is_err() {
                // The ring broke: nothing more completes here. End the
                // connection; buffers still in the kernel stay leaked by
                // the ring rather than freed.
                conn.close();
                return;
            }
            for d in done.drain(..) {
                let Some(tag) = d.tag else { continue };
                let Some(p) = self.pending.lock().remove(&tag) else {
                    continue;
                };
                let buf = d.buf.expect("a tagged request has its buffer");
                let ok = u64::try_from(d.result).is_ok_and(|n| n == p.req.length);
                // The nodes' after-write steps and releases, before the
                // client hears of it (as the synchronous path).
                drop(p.resolved);
                let write = p.req.kind == cmd::WRITE;
                if !ok {
                    // Made again by a worker: the policy sees it there.
                    let payload = if write { buf.to_vec() } else { Vec::new() };
                    let job = Job::new(p.req, payload);
                    if tx.send(job).is_err() {
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
                replies.clear();
                for bytes in answered.drain(..) {
                    conn.leave(bytes);
                }
            }
            // Acquire: pairs with the Release store in `finish`.
            if self.reading_done.load(Ordering::Acquire) && self.ring.in_flight() == 0 {
                return;
            }
        }
    }
}

/// Whether `r` holds a whole request header already (then reading the
/// next request does not wait, and submitting can wait for it).
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
