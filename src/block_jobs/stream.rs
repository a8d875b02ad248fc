//! `block-stream`: copy what the backing chain (down to `base`) holds into
//! the top image, then cut the copied layers out of the chain — QEMU's
//! `block/stream.c` on a thread.
//!
//! Copy-on-read without coroutines: the job and guest writes to the top
//! image take a range lock (`RangeLock`) for what they touch (guest
//! writes rounded out to clusters, since a partial-cluster write copies the
//! rest of the cluster from below). Holding a chunk, the job asks again
//! which clusters the top still lacks and writes only those: a guest write
//! that got there first is never overwritten with older data from below.
//! The guest-write filter goes in while the top is drained, so no write
//! that missed it is still in flight.

use parking_lot::{Condvar, Mutex};
use std::sync::Arc;

use crate::block::graph::Graph;
use crate::block::{Node, WriteFilter, chain};
use crate::context::Context;
use crate::engine::{JOB_MANUAL_DISMISS, JOB_MANUAL_FINALIZE, Job, JobDriver};
use crate::error::{Error, Result};
use crate::qapi::{BlockErrorAction, BlockdevOnError, JobType};

/// QEMU's STREAM_CHUNK: the unit of copying, of progress and of retries.
pub const STREAM_CHUNK: u64 = 512 << 10;

/// `block-stream` arguments, with QEMU's names and defaults.
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// `job-id`; default: the device name.
    pub job_id: Option<String>,
    /// `device`: the top node (or device).
    pub device: String,
    /// `base`: the backing file name of the lowest layer to keep.
    pub base: Option<String>,
    /// `base-node`: the node name of the lowest layer to keep.
    pub base_node: Option<String>,
    /// `bottom`: the lowest layer to copy from (alternative to base).
    pub bottom: Option<String>,
    /// `backing-file`: the name to write into the top image's header.
    pub backing_file: Option<String>,
    /// `speed` in bytes/s (0: unlimited).
    pub speed: i64,
    /// `on-error` (default `report`).
    pub on_error: BlockdevOnError,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
}

impl StreamOptions {
    /// Stream everything below `device` into it, QEMU's defaults otherwise.
    pub fn new(device: &str) -> Self {
        StreamOptions {
            job_id: None,
            device: device.to_string(),
            base: None,
            base_node: None,
            bottom: None,
            backing_file: None,
            speed: 0,
            on_error: BlockdevOnError::Report,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

/// Ranges in use, waited on until free.
#[derive(Default)]
pub(crate) struct RangeLock {
    held: Mutex<Vec<(u64, u64)>>,
    freed: Condvar,
}

impl RangeLock {
    /// Hold `[start, end)` until the guard drops.
    pub(crate) fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut h = self.held.lock();
        while h.iter().any(|&(s, e)| s < end && start < e) {
            self.freed.wait(&mut h);
        }
        h.push((start, end));
        RangeGuard {
            lock: self,
            range: (start, end),
        }
    }
}

pub(crate) struct RangeGuard<'a> {
    lock: &'a RangeLock,
    range: (u64, u64),
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut h = self.lock.held.lock();
        if let Some(i) = h.iter().position(|r| *r == self.range) {
            h.swap_remove(i);
        }
        drop(h);
        self.lock.freed.notify_all();
    }
}

/// Guest writes to the top image take their clusters in the range lock.
struct CorFilter {
    ranges: Arc<RangeLock>,
    cluster: u64,
}

impl CorFilter {
    fn guarded<T>(&self, offset: u64, len: u64, f: impl FnOnce() -> T) -> T {
        let start = offset / self.cluster * self.cluster;
        let end = (offset + len).div_ceil(self.cluster) * self.cluster;
        let _g = self.ranges.lock(start, end.max(start + 1));
        f()
    }
}

impl WriteFilter for CorFilter {
    fn pwrite(&self, node: &Node, offset: u64, buf: &[u8]) -> Result<()> {
        self.guarded(offset, buf.len() as u64, || node.pwrite(offset, buf))
    }

    fn pwrite_zeroes(&self, node: &Node, offset: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.guarded(offset, len, || node.pwrite_zeroes(offset, len, may_unmap))
    }

    fn pdiscard(&self, node: &Node, offset: u64, len: u64) -> Result<()> {
        self.guarded(offset, len, || node.pdiscard(offset, len))
    }
}

struct Stream {
    graph: Arc<Graph>,
    top: Arc<Node>,
    /// The lowest layer kept; `None`: flatten the whole chain.
    base: Option<Arc<Node>>,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    ranges: Arc<RangeLock>,
}

impl Stream {
    /// Copy what is below the top but above base in `[offset, offset+len)`
    /// into the top, holding the range. Returns how many bytes this step
    /// covered (one allocation status).
    fn step(&self, buf: &mut Vec<u8>, offset: u64, len: u64) -> Result<u64> {
        let _g = self.ranges.lock(offset, offset + len);
        let st = self.top.block_status(offset, len)?;
        let n = st.len;
        if st.allocated {
            return Ok(n);
        }
        let below = match self.top.backing() {
            Some(b) => b,
            None => return Ok(n),
        };
        let (copy, n) = chain::is_allocated_above(&below, self.base.as_ref(), offset, n)?;
        if copy {
            buf.resize(n as usize, 0);
            self.top.pread(offset, buf)?;
            self.top.pwrite(offset, buf)?;
            // Written back now rather than all at the flush that ends
            // the job (see block::writeback).
            self.top.start_writeback(offset, n);
        }
        Ok(n)
    }

    fn run(&self, job: &Job) -> Result<()> {
        let below = self.top.backing();
        if below.is_none()
            || below
                .as_ref()
                .zip(self.base.as_ref())
                .is_some_and(|(a, b)| Arc::ptr_eq(a, b))
        {
            // Nothing to stream: QEMU ends with offset = len = 0.
            return Ok(());
        }
        let len = self.top.len()?;
        job.progress_set_remaining(len);
        let mut first_error: Option<Error> = None;
        let mut buf = Vec::with_capacity(STREAM_CHUNK as usize);
        let mut offset = 0;
        while offset < len {
            job.ratelimit_sleep();
            if job.is_cancelled() {
                break;
            }
            let chunk = STREAM_CHUNK.min(len - offset);
            // One chunk may take several steps (allocation changes inside).
            let mut done = 0;
            let mut copied = 0;
            let mut failed = None;
            while done < chunk {
                match self.step(&mut buf, offset + done, chunk - done) {
                    Ok(n) => {
                        copied += n;
                        done += n;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Some(e) = failed {
                // Every stream error is a read error to the policy.
                let errno = e.errno().unwrap_or(libc::EIO);
                match job.error_action(self.on_error, true, errno) {
                    // Paused; the same chunk again after resume.
                    BlockErrorAction::Stop => continue,
                    BlockErrorAction::Report => return Err(first_error.unwrap_or(e)),
                    BlockErrorAction::Ignore => {
                        first_error.get_or_insert(e);
                    }
                }
            }
            job.progress_update(chunk);
            if copied > 0 {
                job.ratelimit_processed(chunk);
            }
            offset += chunk;
        }
        match first_error {
            // QEMU: `ignore` still fails the job, with the first error,
            // and the chain stays as it was.
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl JobDriver for Arc<Stream> {
    fn job_type(&self) -> JobType {
        JobType::Stream
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        // Install the copy-on-read filter with the top drained (see the
        // module comment), and take it off again however the run ends.
        let section = self.graph.drained_begin(std::slice::from_ref(&self.top));
        self.top.set_write_filter(Some(Box::new(CorFilter {
            ranges: self.ranges.clone(),
            cluster: self.top.cluster_size().unwrap_or(64 << 10),
        })));
        self.graph.drained_end(section);
        let r = Stream::run(self, job);
        self.top.set_write_filter(None);
        r
    }

    fn prepare(&self, _job: &Job) -> Result<()> {
        // Cut the copied layers out: the top's backing becomes base.
        if self.top.backing().is_none() {
            return Ok(());
        }
        let section = self.graph.drained_begin(std::slice::from_ref(&self.top));
        let r = crate::block::qcow2::change_backing(
            &self.top,
            self.base.as_ref(),
            self.backing_file.as_deref(),
        );
        self.graph.drained_end(section);
        self.graph.drop_orphans();
        r
    }
}

/// `block-stream`: QEMU's checks in QEMU's order, then create and start.
pub fn block_stream(ctx: &Context, o: StreamOptions) -> Result<Arc<Job>> {
    if o.base.is_some() && o.base_node.is_some() {
        return Err(Error::generic(
            "'base' and 'base-node' cannot be specified at the same time",
        ));
    }
    if o.base.is_some() && o.bottom.is_some() {
        return Err(Error::generic(
            "'base' and 'bottom' cannot be specified at the same time",
        ));
    }
    if o.bottom.is_some() && o.base_node.is_some() {
        return Err(Error::generic(
            "'bottom' and 'base-node' cannot be specified at the same time",
        ));
    }
    let graph = ctx.graph();
    let top = graph.lookup(&o.device)?;
    let layers = chain::layers(&top);
    let mut base = None;
    if let Some(name) = &o.base {
        base = Some(chain::by_filename(&layers[1..], name)?);
    }
    if let Some(name) = &o.base_node {
        let b = graph.lookup_node(name)?;
        if Arc::ptr_eq(&b, &top) || !chain::contains(&top, &b) {
            return Err(Error::generic(format!(
                "Node '{name}' is not a backing image of '{}'",
                o.device
            )));
        }
        base = Some(b);
    }
    if let Some(name) = &o.bottom {
        let b = graph.lookup_node(name)?;
        if Arc::ptr_eq(&b, &top) || !chain::contains(&top, &b) {
            return Err(Error::generic(format!(
                "Node '{name}' is not in a chain starting from '{}'",
                o.device
            )));
        }
        // The layer below bottom is the base.
        base = b.backing();
    }
    // Op blockers: nothing in the part of the chain we change may be busy.
    for n in &layers {
        if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, n)) {
            break;
        }
        n.check_not_busy()?;
    }
    if base.is_none() && o.backing_file.is_some() {
        return Err(Error::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let stream = Arc::new(Stream {
        graph: graph.clone(),
        top: top.clone(),
        base,
        backing_file: o.backing_file,
        on_error: o.on_error,
        ranges: Arc::default(),
    });
    let mut flags = 0;
    if !o.auto_finalize {
        flags |= JOB_MANUAL_FINALIZE;
    }
    if !o.auto_dismiss {
        flags |= JOB_MANUAL_DISMISS;
    }
    let job = ctx.block_job_create(
        o.job_id.as_deref(),
        Some(&o.device),
        Box::new(stream),
        o.speed,
        flags,
        None,
    )?;
    job.start()?;
    Ok(job)
}
