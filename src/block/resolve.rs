//! Requests resolved down to a file descriptor, so that an I/O thread can
//! keep many of them in flight on one io_uring ring and submit them in
//! batches (QEMU's shape), instead of a thread per request waiting in the
//! driver.
//!
//! A synchronous request descends the graph and keeps each node's
//! bookkeeping on the stack while the driver waits: the node counted in
//! flight (a drain waits for it), the `O_DIRECT` write lock shared, and
//! after a write what each node does with it (dirty bitmaps, the mirror's
//! bitmap). `Node::resolve` makes the same descent up front and keeps
//! all of that in a [`Resolved`]; dropping it, once the kernel has
//! completed the request, runs the after-write steps and releases the
//! nodes, in the order the synchronous request would.
//!
//! Only a layer that just passes a plain request on takes part: `file` and
//! `host_device` with `aio=io_uring|native` (an aligned request when
//! `cache.direct=on`), `raw`, and `mirror_top` in background mode. Any
//! other layer on the way (qcow2, blkdebug, copy-on-read, copy-before-
//! write, a write-blocking mirror, `detect-zeroes`, `aio=threads`, an
//! `O_DIRECT` request that needs read-modify-write) declines, and the
//! caller makes the request synchronously, as before. A failed resolved
//! request is also made again synchronously, so that error policies,
//! events and I/O status see it exactly as they do every other request.

use std::os::fd::RawFd;
use std::sync::Arc;

use super::Node;
use crate::sync::Ordering;

/// What a resolved request holds until it completes: dropped last.
type Hold = Box<dyn Send>;

/// A read or write of `len` bytes at `offset` of the file `fd`, and what
/// the nodes above it do when it ends (see the module).
#[must_use = "dropping it ends the request's bookkeeping"]
pub struct Resolved {
    fd: Option<RawFd>,
    offset: u64,
    sync_after: bool,
    after_write: Vec<Box<dyn FnOnce() + Send>>,
    holds: Vec<Hold>,
}

impl Resolved {
    fn new() -> Resolved {
        Resolved {
            fd: None,
            offset: 0,
            sync_after: false,
            after_write: Vec::new(),
            holds: Vec::new(),
        }
    }

    /// The file the request goes to. It stays open while this lives: the
    /// file's node is among the holds.
    pub(crate) fn fd(&self) -> RawFd {
        self.fd
            .expect("a Resolved is only handed out with its file")
    }

    /// The request's offset in the file.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Keep `h` until the request ends.
    pub(crate) fn hold(&mut self, h: impl Send + 'static) {
        self.holds.push(Box::new(h));
    }

    /// Run `f` when a write ends (also a failed one: it may have written
    /// part, as the synchronous path assumes).
    pub(crate) fn after_write(&mut self, f: impl FnOnce() + Send + 'static) {
        self.after_write.push(Box::new(f));
    }

    /// The leaf: the file and the offset there; `sync_after`: the write
    /// is followed by a data sync of the file (FUA as the file driver
    /// does it: a flush after the write).
    pub(crate) fn land(&mut self, fd: RawFd, offset: u64, sync_after: bool) {
        self.fd = Some(fd);
        self.offset = offset;
        self.sync_after = sync_after;
    }

    /// Whether a data sync of the file must follow the write.
    pub(crate) fn sync_after(&self) -> bool {
        self.sync_after
    }
}

impl Drop for Resolved {
    fn drop(&mut self) {
        for f in self.after_write.drain(..) {
            f();
        }
        // The nodes leave the in-flight count after their bitmaps were
        // marked: a drain that waited for them sees the marks.
        self.holds.clear();
    }
}

/// What the caller's buffer looks like (for `O_DIRECT`'s alignment rule).
#[derive(Debug, Clone, Copy)]
pub struct Request {
    /// Where in the node.
    pub offset: u64,
    /// How many bytes.
    pub len: u64,
    /// The buffer's address.
    pub buf: usize,
    /// A write (else a read).
    pub write: bool,
    /// A write with FUA: on stable storage when it completes.
    pub fua: bool,
}

impl Node {
    /// Resolve a plain read or write (no flags) of this node to a file,
    /// or `None` when a layer on the way must see it (see the module).
    pub(crate) fn resolve(self: &Arc<Self>, req: Request) -> Option<Resolved> {
        let mut r = Resolved::new();
        self.resolve_into(req, &mut r).then_some(r)
    }

    /// One layer of [`Self::resolve`]: this node's part of what
    /// `pread`/`pwrite` do, then the driver's.
    pub(crate) fn resolve_into(self: &Arc<Self>, req: Request, r: &mut Resolved) -> bool {
        r.hold(self.begin_owned());
        // A request that would grow the node goes the synchronous way.
        if req.len == 0 || self.check_range(req.offset, req.len).is_err() {
            return false;
        }
        if req.write {
            // Relaxed: written once before the node is shared.
            if self.check_writable().is_err() || self.detect_zeroes.load(Ordering::Relaxed) != 0 {
                return false;
            }
            // Relaxed: see `pwrite` (only has to differ from the flushed
            // generation; a declined request leaves it bumped, which only
            // makes the next flush reach the disk).
            self.write_gen.fetch_add(1, Ordering::Relaxed);
            let (me, offset, len) = (self.clone(), req.offset, req.len);
            r.after_write(move || me.bitmaps.set_dirty(offset, len));
        }
        self.drv.resolve(req, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::graph::Graph;
    use crate::events::EventBus;

    fn graph() -> Arc<Graph> {
        Graph::new(EventBus::new())
    }

    fn file_node(dir: &std::path::Path, aio: &str, extra: serde_json::Value) -> Arc<Node> {
        let path = dir.join(format!("img-{aio}"));
        std::fs::write(&path, vec![7u8; 1 << 20]).unwrap();
        let mut o = serde_json::json!({
            "driver": "raw", "node-name": format!("n-{aio}"),
            "file": {"driver": "file", "filename": path, "aio": aio}
        });
        if let (Some(o), Some(e)) = (o.as_object_mut(), extra.as_object()) {
            o.extend(e.clone());
        }
        graph().blockdev_add(&o).unwrap()
    }

    #[test]
    fn raw_over_file_resolves_and_holds_each_node() {
        let dir = tempfile::tempdir().unwrap();
        let n = file_node(dir.path(), "io_uring", serde_json::json!({}));
        let req = Request {
            offset: 4096,
            len: 4096,
            buf: 0,
            write: true,
            fua: false,
        };
        let r = n
            .resolve(req)
            .expect("raw over file with io_uring resolves");
        assert!(r.fd() >= 0);
        assert_eq!(r.offset(), 4096);
        assert_eq!(n.in_flight(), 1, "the node is in flight while resolved");
        drop(r);
        assert_eq!(n.in_flight(), 0);
        // Past the end (would grow or fail): synchronous.
        let past = Request {
            offset: 1 << 20,
            ..req
        };
        assert!(n.resolve(past).is_none());
        assert_eq!(n.in_flight(), 0, "a declined request holds nothing");
    }

    #[test]
    fn threads_and_detect_zeroes_decline() {
        let dir = tempfile::tempdir().unwrap();
        let req = Request {
            offset: 0,
            len: 512,
            buf: 0,
            write: true,
            fua: false,
        };
        let t = file_node(dir.path(), "threads", serde_json::json!({}));
        assert!(t.resolve(req).is_none(), "aio=threads keeps its pool");
        let z = file_node(
            dir.path(),
            "io_uring",
            serde_json::json!({"detect-zeroes": "on"}),
        );
        assert!(z.resolve(req).is_none(), "detect-zeroes must see the bytes");
        assert!(
            z.resolve(Request {
                write: false,
                ..req
            })
            .is_some(),
            "reads are plain there"
        );
    }

    /// A drain waits for a resolved request, as for one in a driver; while
    /// the drain holds the gate, nothing resolves (the request would have
    /// to wait there: it goes the synchronous way, which waits).
    #[test]
    fn a_drain_waits_for_resolved_requests() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = graph();
        let path = dir.path().join("d");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let node = ctx
            .blockdev_add(&serde_json::json!({
                "driver": "raw", "node-name": "d",
                "file": {"driver": "file", "filename": path, "aio": "io_uring"}}))
            .unwrap();
        let blk = ctx.blk_new("d", Default::default()).unwrap();
        let req = Request {
            offset: 0,
            len: 4096,
            buf: 0,
            write: true,
            fua: false,
        };
        let r = blk.resolve(req).expect("resolves");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let section = ctx.drained_begin(std::slice::from_ref(&node));
                tx.send(blk.resolve(req).is_none()).unwrap();
                ctx.drained_end(section);
            });
            assert!(
                rx.recv_timeout(std::time::Duration::from_millis(300))
                    .is_err(),
                "the drain waits while the request is resolved"
            );
            drop(r);
            assert!(
                rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
                "nothing resolves inside the drained section"
            );
        });
        assert!(
            blk.resolve(req).is_some(),
            "after the drain it resolves again"
        );
    }
}
