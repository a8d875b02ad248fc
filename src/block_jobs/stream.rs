//! `block-stream`: copy what the backing chain (down to `base`) holds into
//! the top image, then cut the copied layers out of the chain — QEMU's
//! `block/stream.c` on a thread.
//!
//! While the job exists, a `copy-on-read` filter sits above the top image
//! (QEMU's, named by `filter-node-name` or automatically): guest reads
//! through it copy what they read into the top, and the job drives the
//! same copy over the whole image, chunk by chunk
//! ([`CorShared::populate`]). The copy and guest writes share the filter's
//! range lock, so a guest write that got to a cluster first is never
//! overwritten with older data from below.

use std::sync::Arc;

use super::block_job::{add_node, block_job_create, job_flags, reserve_perms};
use crate::block::aligned::AlignedBuf;
use crate::block::copy_on_read::{CopyOnRead, CorShared};
use crate::block::graph::Graph;
use crate::block::perm::{PERM_CONSISTENT_READ, PERM_WRITE_UNCHANGED, Perms};
use crate::block::{BlockOp, Node, UserKind, chain, uring};
use crate::engine::{Engine, Job, JobDriver};
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
    /// `filter-node-name`: the name of the `copy-on-read` node (default:
    /// an automatic one).
    pub filter_node_name: Option<String>,
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
            filter_node_name: None,
        }
    }
}

struct Stream {
    graph: Arc<Graph>,
    top: Arc<Node>,
    /// The lowest layer kept; `None`: flatten the whole chain.
    base: Option<Arc<Node>>,
    backing_file: Option<String>,
    on_error: BlockdevOnError,
    /// The `copy-on-read` node above the top, and its copy.
    filter: Arc<Node>,
    cor: Arc<CorShared>,
}

impl Stream {
    fn run(&self, job: &Job) -> Result<()> {
        let below = chain::next_layer(&self.top);
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
        let buf = AlignedBuf::zeroed(STREAM_CHUNK as usize, 4096);
        // This thread's io_uring requests from `buf` go as fixed-buffer
        // requests (see block::uring).
        let _fixed = uring::offer_fixed(vec![buf.region()]);
        let mut buf = Some(buf);
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
                match self.cor.populate(&mut buf, offset + done, chunk - done) {
                    Ok((n, copy)) => {
                        if copy {
                            copied += n;
                        }
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
            job.progress_skipped(chunk.saturating_sub(copied));
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
        Stream::run(self, job)
    }

    fn prepare(&self, _job: &Job) -> Result<()> {
        // Cut the copied layers out: the top's backing becomes base.
        if chain::next_layer(&self.top).is_none() {
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

    fn clean(&self, _job: &Job) {
        // However the job ended, the filter goes (QEMU's stream_clean).
        self.graph.remove_filter(&self.filter);
    }
}

/// `block-stream`: QEMU's checks in QEMU's order, then the filter, the
/// job, and the start.
pub fn block_stream(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    o: StreamOptions,
) -> Result<Arc<Job>> {
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
        base = chain::next_layer(&b);
    }
    // Op blockers: nothing in the part of the chain we change may be busy.
    for n in &layers {
        if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, n)) {
            break;
        }
        graph.check_op(n, BlockOp::Stream)?;
    }
    if base.is_none() && o.backing_file.is_some() {
        return Err(Error::generic(
            "backing file specified, but streaming the entire chain",
        ));
    }
    let job_id = o.job_id.clone().unwrap_or_else(|| graph.device_name(&top));
    // QEMU's stream_start: the layers that go may not be written by
    // others (consistent read and write-unchanged shared only).
    let layer_perms = Perms::new(0, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED);
    let want: Vec<(&Arc<Node>, Perms)> = layers
        .iter()
        .take_while(|n| !base.as_ref().is_some_and(|b| Arc::ptr_eq(b, n)))
        .map(|n| (n, layer_perms))
        .collect();
    // QEMU's stream_start reopens a read-only top read-write (an
    // intermediate node opened implicitly as a backing file): the copy-on-
    // read filter writes it.
    let top_was_ro = !top.perm_writable();
    top.set_perm_read_only(false);
    // Read-only again when the job cannot be created or is freed (QEMU's
    // stream_clean).
    let undo_ro = {
        let (graph, top) = (graph.clone(), top.clone());
        move || {
            if top_was_ro {
                top.set_perm_read_only(true);
                graph.release_perms();
            }
        }
    };
    let reserved = reserve_perms(graph, &want).inspect_err(|_| undo_ro())?;
    let cor = CorShared::new(top.clone(), base.clone());
    let filter = match graph.insert_filter(
        &top,
        o.filter_node_name.as_deref(),
        false,
        Box::new(CopyOnRead::new(cor.clone(), o.filter_node_name.is_some())),
    ) {
        Ok(f) => f,
        Err(e) => {
            drop(reserved);
            undo_ro();
            return Err(e.prepend("Could not create node: "));
        }
    };
    let stream = Arc::new(Stream {
        graph: graph.clone(),
        top: top.clone(),
        base: base.clone(),
        backing_file: o.backing_file,
        on_error: o.on_error,
        filter: filter.clone(),
        cor,
    });
    let job = match block_job_create(
        graph,
        engine,
        Some(&job_id),
        Some(&filter),
        Box::new(stream),
        o.speed,
        job_flags(o.auto_finalize, o.auto_dismiss),
        None,
    ) {
        Ok(j) => j,
        Err(e) => {
            graph.remove_filter(&filter);
            drop(reserved);
            undo_ro();
            return Err(e);
        }
    };
    // The job also reads through the filter with a backend of its own
    // (QEMU's `s->blk`): `blockdev-del` finds the filter in use.
    add_node(&job, &filter, UserKind::Backend, Perms::NONE);
    // The top and the layers that go (QEMU's "active node" and
    // "intermediate node"s).
    for n in &layers {
        if base.as_ref().is_some_and(|b| Arc::ptr_eq(b, n)) {
            break;
        }
        add_node(&job, n, UserKind::Blocker, layer_perms);
    }
    job.on_free(undo_ro);
    drop(reserved);
    job.start()?;
    Ok(job)
}
