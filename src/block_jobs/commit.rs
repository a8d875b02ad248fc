//! `block-commit`: merge the layers from `top` down to (not including)
//! `base` into `base`, then cut them out of the chain — QEMU's
//! `block/commit.c`.
//!
//! Intermediate commit (top below the active layer): a read-only
//! `commit_top` filter goes between top and the layer above it (QEMU's,
//! named by `filter-node-name` or automatically), then what the layers
//! from top down hold is copied into base in 512 KiB chunks; the guest
//! never sees the change (those ranges are covered from above). Active
//! commit (top is the active layer): the mirror machinery with job type
//! `commit` and its `mirror_top` filter, READY, and `complete` moves the
//! guest onto base.

use std::sync::Arc;

use super::block_job::{add_node, block_job_create, job_flags, reserve_perms};
use crate::block::aligned::AlignedBuf;
use crate::block::child::ChildEdge;
use crate::block::graph::Graph;
use crate::block::perm::{
    PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, Perms,
};
use crate::block::{BlockDriver, BlockOp, BlockStatus, Node, NodeChild, UserKind, chain, uring};
use crate::engine::{Engine, Job, JobDriver};
use crate::error::{Error, ErrorClass, Result};
use crate::qapi::{BlockErrorAction, BlockdevOnError, JobType};
use crate::sync::{AtomicBool, Ordering};

/// QEMU's COMMIT_BUFFER_SIZE: the unit of copying, progress and retries.
pub const COMMIT_CHUNK: u64 = 512 << 10;

/// `block-commit` arguments, with QEMU's names and defaults.
#[derive(Debug, Clone)]
pub struct CommitOptions {
    /// `job-id`; default: the device name.
    pub job_id: Option<String>,
    /// `device`: the active layer (node or device).
    pub device: String,
    /// `top`: file name of the highest layer to commit (default: active).
    pub top: Option<String>,
    /// `top-node`: node name of the highest layer to commit.
    pub top_node: Option<String>,
    /// `base`: file name of the layer to commit into (default: bottom).
    pub base: Option<String>,
    /// `base-node`: node name of the layer to commit into.
    pub base_node: Option<String>,
    /// `backing-file`: the name to write into the overlay's header.
    pub backing_file: Option<String>,
    /// `speed` in bytes/s (0: unlimited).
    pub speed: i64,
    /// `on-error` (default `report`).
    pub on_error: BlockdevOnError,
    /// `filter-node-name`: the name of the `commit_top` (or, for an
    /// active commit, `mirror_top`) node (default: an automatic one).
    pub filter_node_name: Option<String>,
    /// `auto-finalize` (default true).
    pub auto_finalize: bool,
    /// `auto-dismiss` (default true).
    pub auto_dismiss: bool,
}

impl CommitOptions {
    /// Commit the whole chain below the active layer of `device` into its
    /// bottom, QEMU's defaults otherwise.
    pub fn new(device: &str) -> Self {
        CommitOptions {
            job_id: None,
            device: device.to_string(),
            top: None,
            top_node: None,
            base: None,
            base_node: None,
            backing_file: None,
            speed: 0,
            on_error: BlockdevOnError::Report,
            filter_node_name: None,
            auto_finalize: true,
            auto_dismiss: true,
        }
    }
}

/// `commit_top`: a read-only filter between the layer being committed and
/// the layer above it, so that the graph while the job runs is QEMU's.
struct CommitTop(ChildEdge);

impl BlockDriver for CommitTop {
    fn driver_name(&self) -> &'static str {
        "commit_top"
    }

    fn len(&self) -> Result<u64> {
        self.0.get().len()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.0.get().pread(offset, buf)
    }

    fn write(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        // The node is read-only: the generic layer refuses writes first.
        Err(Error::from_errno(libc::EPERM))
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus> {
        self.0.get().block_status(offset, len)
    }

    fn children(&self) -> Vec<NodeChild> {
        vec![NodeChild {
            role: "backing",
            node: self.0.get(),
        }]
    }

    fn filtered_child(&self) -> Option<Arc<Node>> {
        Some(self.0.get())
    }

    fn child_perm(&self, _child: &NodeChild, _p: Perms, _writable: bool) -> Perms {
        // QEMU's bdrv_commit_top_child_perm: the filter only hides top
        // from the overlay; it takes nothing and shares everything.
        Perms::NONE
    }

    fn replace_child(&self, old: &Arc<Node>, new: &Arc<Node>) {
        self.0.replace(old, new)
    }

    fn cluster_size(&self) -> Option<u64> {
        self.0.get().cluster_size()
    }

    fn filename(&self) -> String {
        self.0.get().filename()
    }
}

struct Commit {
    graph: Arc<Graph>,
    /// The layer whose backing is `top`: it gets `base` as backing.
    overlay: Arc<Node>,
    top: Arc<Node>,
    base: Arc<Node>,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    /// The `commit_top` node between overlay and top.
    filter: Arc<Node>,
    /// The filter is out of the graph.
    exited: AtomicBool,
}

impl Commit {
    /// Take the filter out (the overlay's backing goes back to top when
    /// the chain did not change) and drop the layers nothing uses now.
    fn exit(&self) {
        // Relaxed: prepare and abort run one after the other under the
        // engine's control lock; the swap only makes the second a no-op.
        if !self.exited.swap(true, Ordering::Relaxed) {
            self.graph.remove_filter(&self.filter);
            self.graph.drop_orphans();
        }
    }
}

impl Commit {
    /// Copy `[offset, offset + n)` from top's view into base; the error
    /// says whether reading or writing failed.
    fn populate(&self, buf: &mut AlignedBuf, offset: u64, n: u64) -> Result<(), (Error, bool)> {
        let buf = &mut buf[..n as usize];
        self.top.pread(offset, buf).map_err(|e| (e, true))?;
        self.base.pwrite(offset, buf).map_err(|e| (e, false))?;
        // Base is flushed before the job ends: let the device write this
        // chunk while the next is copied (see block::writeback).
        self.base.start_writeback(offset, n);
        Ok(())
    }
}

impl JobDriver for Arc<Commit> {
    fn job_type(&self) -> JobType {
        JobType::Commit
    }

    fn run(&self, job: &Arc<Job>) -> Result<()> {
        let len = self.top.len()?;
        if self.base.len()? < len {
            return Err(Error::generic(
                "Top image is larger than the base image; resizing the base is not supported yet",
            ));
        }
        job.progress_set_remaining(len);
        let mut buf = AlignedBuf::zeroed(COMMIT_CHUNK as usize, 4096);
        // This thread's io_uring requests from `buf` go as fixed-buffer
        // requests (see block::uring).
        let _fixed = uring::offer_fixed(vec![buf.region()]);
        let mut offset = 0;
        while offset < len {
            job.ratelimit_sleep();
            if job.is_cancelled() {
                return Ok(());
            }
            let want = COMMIT_CHUNK.min(len - offset);
            let step = chain::is_allocated_above(&self.top, Some(&self.base), offset, want)
                .map_err(|e| (e, true))
                .and_then(|(copy, n)| {
                    if copy {
                        self.populate(&mut buf, offset, n)?;
                    }
                    Ok((copy, n))
                });
            match step {
                Ok((copy, n)) => {
                    job.progress_update(n);
                    job.range_done(offset, n);
                    if copy {
                        job.ratelimit_processed(n);
                    } else {
                        job.progress_skipped(n);
                    }
                    offset += n;
                }
                Err((e, is_read)) => {
                    let errno = e.errno().unwrap_or(libc::EIO);
                    // QEMU: `report` fails the job; `stop` (after resume)
                    // and `ignore` (QEMU: at once; we: after the backoff)
                    // retry the same chunk.
                    let action =
                        job.range_error_action(self.on_error, is_read, errno, offset, want);
                    if action == BlockErrorAction::Report {
                        return Err(e);
                    }
                }
            }
        }
        self.base.flush()
    }

    fn prepare(&self, _job: &Job) -> Result<()> {
        let section = self
            .graph
            .drained_begin(std::slice::from_ref(&self.overlay));
        let r = crate::block::qcow2::change_backing(
            &self.overlay,
            Some(&self.base),
            self.backing_file.as_deref(),
        );
        self.graph.drained_end(section);
        self.exit();
        r
    }

    fn abort(&self, _job: &Job) {
        self.exit();
    }
}

/// `block-commit`: QEMU's checks in QEMU's order, then create and start.
pub fn block_commit(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    o: CommitOptions,
) -> Result<Arc<Job>> {
    let bs = graph.lookup(&o.device).map_err(|_| {
        Error::with_class(
            ErrorClass::DeviceNotFound,
            format!("Device '{}' not found", o.device),
        )
    })?;
    // QEMU's qmp_get_root_bs: a node below another node (a job's
    // filter), or used by a job, is not a root.
    if !graph.is_root(&bs) {
        return Err(Error::generic("Need a root block node"));
    }
    let layers = chain::layers(&bs);
    let top = match (&o.top_node, &o.top) {
        (Some(_), Some(_)) => {
            return Err(Error::generic(
                "'top-node' and 'top' are mutually exclusive",
            ));
        }
        (Some(name), None) => {
            let t = graph.lookup_node(name)?;
            if !chain::contains(&bs, &t) {
                return Err(Error::generic(format!(
                    "'{name}' is not in this backing file chain"
                )));
            }
            t
        }
        (None, Some(name)) => chain::by_filename(&layers, name)
            .map_err(|_| Error::generic(format!("Top image file {name} not found")))?,
        (None, None) => bs.clone(),
    };
    let below_top = chain::layers(&top);
    let base = match (&o.base_node, &o.base) {
        (Some(_), Some(_)) => {
            return Err(Error::generic(
                "'base-node' and 'base' are mutually exclusive",
            ));
        }
        (Some(name), None) => {
            let b = graph.lookup_node(name)?;
            if !chain::contains(&top, &b) {
                return Err(Error::generic(format!(
                    "'{name}' is not in this backing file chain"
                )));
            }
            b
        }
        (None, Some(name)) => chain::by_filename(&below_top[1..], name)?,
        // The bottom of the chain: top itself when it has no backing file,
        // which the next check refuses (as QEMU does).
        (None, None) => below_top.last().cloned().unwrap_or_else(|| top.clone()),
    };
    if Arc::ptr_eq(&top, &base) {
        return Err(Error::generic("cannot commit an image into itself"));
    }
    // Op blockers on everything that changes.
    for n in &below_top {
        graph.check_op(n, BlockOp::CommitTarget)?;
        if Arc::ptr_eq(n, &base) {
            break;
        }
    }
    let flags = job_flags(o.auto_finalize, o.auto_dismiss);
    if Arc::ptr_eq(&top, &bs) {
        if o.backing_file.is_some() {
            return Err(Error::generic(
                "'backing-file' specified, but 'top' is the active layer",
            ));
        }
        return crate::block_jobs::mirror::start_active_commit(
            graph,
            engine,
            o.job_id.as_deref(),
            o.filter_node_name.as_deref(),
            top,
            base,
            o.speed,
            o.on_error,
            flags,
        );
    }
    let overlay = layers
        .windows(2)
        .find(|w| Arc::ptr_eq(&w[1], &top))
        .map(|w| w[0].clone())
        .ok_or_else(|| Error::generic("Could not find overlay image"))?;
    graph.check_op(&overlay, BlockOp::CommitTarget)?;
    let job_id = o.job_id.clone().unwrap_or_else(|| graph.device_name(&bs));
    // QEMU's commit_start: base is reopened read-write and written through
    // a backend of the job's (read, write, resize; shares consistent read
    // and write-unchanged); the layers that go may be written by others but
    // not read consistently. Base goes back to read-only when the job ends.
    let base_was_ro = !base.perm_writable();
    base.set_perm_read_only(false);
    let base_perms = Perms::new(
        PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
        PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED,
    );
    let layer_perms = Perms::new(0, PERM_WRITE | PERM_WRITE_UNCHANGED);
    let mut want = vec![(&base, base_perms)];
    for n in &below_top {
        if Arc::ptr_eq(n, &base) {
            break;
        }
        want.push((n, layer_perms));
    }
    let restore_base = {
        let (graph, base) = (graph.clone(), base.clone());
        move || {
            if base_was_ro {
                base.set_perm_read_only(true);
                graph.release_perms();
            }
        }
    };
    let reserved = match reserve_perms(graph, &want) {
        Ok(r) => r,
        Err(e) => {
            restore_base();
            return Err(e);
        }
    };
    let filter = match graph.insert_filter(
        &top,
        o.filter_node_name.as_deref(),
        true,
        Box::new(CommitTop(ChildEdge::new(top.clone()))),
    ) {
        Ok(f) => f,
        Err(e) => {
            drop(reserved);
            restore_base();
            return Err(e);
        }
    };
    let commit = Arc::new(Commit {
        graph: graph.clone(),
        overlay,
        top: top.clone(),
        base: base.clone(),
        backing_file: o.backing_file,
        on_error: o.on_error,
        filter: filter.clone(),
        exited: AtomicBool::new(false),
    });
    let job = match block_job_create(
        graph,
        engine,
        Some(&job_id),
        Some(&bs),
        Box::new(commit.clone()),
        o.speed,
        flags,
        None,
    ) {
        Ok(j) => j,
        Err(e) => {
            commit.exit();
            drop(reserved);
            restore_base();
            return Err(e);
        }
    };
    // The layers that go (QEMU's "intermediate node"s) and base.
    for n in &below_top {
        if Arc::ptr_eq(n, &base) {
            break;
        }
        add_node(&job, n, UserKind::Blocker, layer_perms);
    }
    add_node(&job, &base, UserKind::Backend, base_perms);
    job.on_free(restore_base);
    drop(reserved);
    job.start()?;
    Ok(job)
}
