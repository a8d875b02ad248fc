//! The context: everything one host (or one test) owns — the node graph,
//! guest backends, the job engine and the event stream. No globals: a
//! process may run several contexts side by side.

use crate::locks::{Condvar, Mutex};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use crate::block::Node;
use crate::block::backend::{BackendOptions, BlockBackend};
use crate::block::dirty_bitmap::{self as named, BdrvDirtyBitmap, BitmapRef, BlockDirtyInfo};
use crate::block::graph::Graph;
use crate::block::host::HostIo;
use crate::block_jobs::block_job;
use crate::engine::{Engine, Job, JobDriver, JobOptions, JobTxn};
use crate::error::{Error, Result};
use crate::events::{Event, EventBus, Subscription};
use crate::export::Exports;
use crate::nbd::objects::Objects;
use crate::qapi::{BlockJobInfo, JobInfo};

/// An event handler run on the context's event thread.
pub type EventHandler = Arc<dyn Fn(&Event) + Send + Sync>;

#[derive(Default)]
struct Delivery {
    /// Sequence number of the last event handed to every handler.
    delivered: u64,
    running: bool,
}

/// A registered handler: its id, the last sequence number emitted before
/// it was added (it sees only later events), and the function.
type HandlerEntry = (u64, u64, EventHandler);

/// Calls event handlers, in order, on one library thread (so handlers
/// never run inside a host's call into the library, and never under a
/// library lock).
struct Dispatcher {
    handlers: Arc<Mutex<Vec<HandlerEntry>>>,
    next_id: u64,
    state: Arc<(Mutex<Delivery>, Condvar)>,
    thread: Option<JoinHandle<()>>,
    closer: Option<crate::events::SubscriptionCloser>,
}

/// One context.
pub struct Context {
    bus: Arc<EventBus>,
    engine: Arc<Engine>,
    graph: Arc<Graph>,
    exports: Arc<Exports>,
    dispatcher: Mutex<Dispatcher>,
}

impl Default for Context {
    fn default() -> Self {
        Self::new()
    }
}

impl Context {
    /// A new, empty context.
    pub fn new() -> Context {
        let bus = EventBus::new();
        let graph = Graph::new(bus.clone());
        Context {
            engine: Engine::new(bus.clone()),
            graph: graph.clone(),
            exports: Exports::new(graph, bus.clone()),
            bus,
            dispatcher: Mutex::new(Dispatcher {
                handlers: Arc::new(Mutex::new(Vec::new())),
                next_id: 1,
                state: Arc::new((Mutex::new(Delivery::default()), Condvar::new())),
                thread: None,
                closer: None,
            }),
        }
    }

    /// The event bus.
    pub fn bus(&self) -> &Arc<EventBus> {
        &self.bus
    }

    /// The job engine.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The node graph.
    pub fn graph(&self) -> &Arc<Graph> {
        &self.graph
    }

    /// The user-created objects (`object-add`: TLS credentials); the same
    /// container the graph's drivers resolve ids in.
    pub fn objects(&self) -> &Arc<Objects> {
        self.graph.objects()
    }

    // ---- nodes and backends ----------------------------------------------------

    /// The block exports and the NBD server.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// blockdev-add with QEMU's JSON.
    pub fn blockdev_add(&self, opts: &Value) -> Result<Arc<Node>> {
        self.graph.blockdev_add(opts)
    }

    /// blockdev-add from JSON text; malformed JSON is refused with a
    /// GenericError naming the problem.
    pub fn blockdev_add_json(&self, json: &str) -> Result<Arc<Node>> {
        let v: Value =
            serde_json::from_str(json).map_err(|e| Error::generic(format!("Invalid JSON: {e}")))?;
        self.blockdev_add(&v)
    }

    /// blockdev-del.
    pub fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.graph.blockdev_del(node_name)
    }

    /// Find a node or device by name.
    pub fn lookup(&self, name: &str) -> Result<Arc<Node>> {
        self.graph.lookup(name)
    }

    /// Register a node whose I/O the host performs.
    pub fn add_host_node(
        &self,
        name: &str,
        read_only: bool,
        io: Box<dyn HostIo>,
    ) -> Result<Arc<Node>> {
        self.graph.add_host_node(name, read_only, io)
    }

    /// Attach a guest backend to a node.
    pub fn blk_new(&self, node_name: &str, opts: BackendOptions) -> Result<BlockBackend> {
        self.graph.blk_new(node_name, opts)
    }

    /// Wait until every request in flight is done (QEMU's `bdrv_drain_all`).
    pub fn drain_all(&self) {
        self.graph.drain_all()
    }

    /// Begin a drained section over everything (VM stop).
    pub fn drain_all_begin(&self) {
        self.graph.drain_all_begin()
    }

    /// End the innermost `drain_all_begin`.
    pub fn drain_all_end(&self) -> Result<()> {
        self.graph.drain_all_end()
    }

    // ---- dirty bitmaps (QEMU's block-dirty-bitmap-*) ----------------------------

    /// `block-dirty-bitmap-add`.
    pub fn block_dirty_bitmap_add(
        &self,
        node: &str,
        name: &str,
        granularity: Option<u32>,
        persistent: Option<bool>,
        disabled: Option<bool>,
    ) -> Result<()> {
        named::add(&self.graph, node, name, granularity, persistent, disabled).map(|_| ())
    }

    /// `block-dirty-bitmap-remove`.
    pub fn block_dirty_bitmap_remove(&self, node: &str, name: &str) -> Result<()> {
        named::remove(&self.graph, node, name)
    }

    /// `block-dirty-bitmap-clear`.
    pub fn block_dirty_bitmap_clear(&self, node: &str, name: &str) -> Result<()> {
        named::clear(&self.graph, node, name)
    }

    /// `block-dirty-bitmap-enable`.
    pub fn block_dirty_bitmap_enable(&self, node: &str, name: &str) -> Result<()> {
        named::set_recording(&self.graph, node, name, true)
    }

    /// `block-dirty-bitmap-disable`.
    pub fn block_dirty_bitmap_disable(&self, node: &str, name: &str) -> Result<()> {
        named::set_recording(&self.graph, node, name, false)
    }

    /// `block-dirty-bitmap-merge`.
    pub fn block_dirty_bitmap_merge(
        &self,
        node: &str,
        target: &str,
        bitmaps: &[BitmapRef],
    ) -> Result<()> {
        named::merge(&self.graph, node, target, bitmaps)
    }

    /// The bitmap `name` of `node`, for jobs that use it.
    pub fn block_dirty_bitmap_lookup(
        &self,
        node: &str,
        name: &str,
    ) -> Result<Arc<BdrvDirtyBitmap>> {
        named::lookup(&self.graph, node, name).map(|(_, b)| b)
    }

    /// Mark a bitmap in use by a job or export (commands then refuse it).
    pub fn block_dirty_bitmap_set_busy(&self, node: &str, name: &str, busy: bool) -> Result<()> {
        named::set_busy(&self.graph, node, name, busy)
    }

    /// A node's `dirty-bitmaps`, as in `query-named-block-nodes`.
    pub fn query_dirty_bitmaps(&self, node: &str) -> Result<Vec<BlockDirtyInfo>> {
        named::query(&self.graph, node)
    }

    /// `x-debug-block-dirty-bitmap-sha256`: QEMU's SHA-256 of a bitmap's
    /// bits, in hex (equal for equal bits, size and granularity).
    pub fn x_debug_block_dirty_bitmap_sha256(&self, node: &str, name: &str) -> Result<String> {
        named::sha256(&self.graph, node, name)
    }

    /// Write every node's persistent dirty bitmaps back to their images
    /// and release them from the nodes, as QEMU does when it closes or
    /// inactivates a node. Dropping the context (closing the nodes) does
    /// this too; a process that ends without dropping it calls this once
    /// no more writes come (the nodes track no persistent bitmap after).
    pub fn store_persistent_dirty_bitmaps(&self) -> Result<()> {
        named::store_persistent(&self.graph)
    }

    // ---- jobs ----------------------------------------------------------------

    /// Create a block job on `node` (QEMU's `block_job_create`): the id
    /// defaults to the node's device name; a drain of the node pauses the
    /// job and the job blocks the node; `speed` is checked as QEMU checks
    /// it.
    pub fn block_job_create(
        &self,
        id: Option<&str>,
        node: Option<&str>,
        driver: Box<dyn JobDriver>,
        speed: i64,
        flags: u32,
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>> {
        let node = node.map(|n| self.graph.lookup(n)).transpose()?;
        block_job::block_job_create(
            &self.graph,
            &self.engine,
            id,
            node.as_ref(),
            driver,
            speed,
            flags,
            txn,
        )
    }

    /// `blockdev-mirror`: create and start a mirror job.
    pub fn blockdev_mirror(
        &self,
        opts: crate::block_jobs::mirror::MirrorOptions,
    ) -> Result<Arc<Job>> {
        crate::block_jobs::mirror::blockdev_mirror(&self.graph, &self.engine, opts)
    }

    /// `blockdev-backup`: create and start a backup job.
    pub fn blockdev_backup(
        &self,
        opts: crate::block_jobs::backup::BackupOptions,
    ) -> Result<Arc<Job>> {
        crate::block_jobs::backup::blockdev_backup(&self.graph, &self.engine, opts, None)
    }

    /// `transaction`: `actions` as one, all or nothing (see
    /// [`crate::transaction`]).
    pub fn transaction(
        &self,
        actions: Vec<crate::transaction::Action>,
        mode: crate::transaction::ActionCompletionMode,
    ) -> Result<()> {
        crate::transaction::transaction(&self.graph, &self.engine, actions, mode)
    }

    /// One transaction action as a command of its own (e.g.
    /// `blockdev-snapshot`).
    pub fn run_action(&self, action: crate::transaction::Action) -> Result<()> {
        crate::transaction::single(&self.graph, &self.engine, action)
    }

    /// `block-commit`: create and start a commit job.
    pub fn block_commit(&self, opts: crate::block_jobs::commit::CommitOptions) -> Result<Arc<Job>> {
        crate::block_jobs::commit::block_commit(&self.graph, &self.engine, opts)
    }

    /// `block-stream`: create and start a stream job.
    pub fn block_stream(&self, opts: crate::block_jobs::stream::StreamOptions) -> Result<Arc<Job>> {
        crate::block_jobs::stream::block_stream(&self.graph, &self.engine, opts)
    }

    /// Create a job that is not a block job (no `BLOCK_JOB_*` events).
    pub fn job_create(
        &self,
        id: Option<&str>,
        driver: Box<dyn JobDriver>,
        flags: u32,
        txn: Option<Arc<JobTxn>>,
    ) -> Result<Arc<Job>> {
        self.engine.create(
            JobOptions {
                id: id.map(str::to_string),
                flags,
                block: false,
                speed: 0,
                txn,
            },
            driver,
        )
    }

    /// A new transaction.
    pub fn txn_new(&self) -> Arc<JobTxn> {
        JobTxn::new(&self.engine)
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&self) -> Vec<BlockJobInfo> {
        self.engine.query_block_jobs()
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Vec<JobInfo> {
        self.engine.query_jobs()
    }

    // ---- events ----------------------------------------------------------------

    /// Every event from now on, in order.
    pub fn subscribe(&self) -> Subscription {
        self.bus.subscribe()
    }

    /// Subscribe with at most `limit` events queued (see
    /// [`crate::events::EventBus::subscribe_bounded`]).
    pub fn subscribe_bounded(
        &self,
        limit: usize,
        coalesce_from: usize,
        on_overflow: Arc<dyn crate::events::Notify>,
    ) -> Subscription {
        self.bus
            .subscribe_bounded(limit, coalesce_from, on_overflow)
    }

    fn lock_dispatcher(&self) -> crate::locks::MutexGuard<'_, Dispatcher> {
        self.dispatcher.lock()
    }

    /// Call `handler` for every event from now on, on the context's event
    /// thread, one event at a time, in order. Returns an id for removal.
    pub fn add_event_handler(&self, handler: EventHandler) -> Result<u64> {
        let mut d = self.lock_dispatcher();
        if d.thread.is_none() {
            let sub = self.bus.subscribe();
            d.closer = Some(sub.closer());
            let handlers = d.handlers.clone();
            let state = d.state.clone();
            state.0.lock().delivered = self.bus.last_seq();
            let t = std::thread::Builder::new()
                .name("bj-events".into())
                .spawn(move || dispatch_loop(sub, handlers, state))
                .map_err(|e| Error::from(e).prepend("Cannot start the event thread: "))?;
            d.thread = Some(t);
        }
        let id = d.next_id;
        d.next_id += 1;
        // "From now on": events already emitted but not yet delivered to the
        // other handlers are not this handler's.
        let after = self.bus.last_seq();
        d.handlers.lock().push((id, after, handler));
        Ok(id)
    }

    /// Remove a handler. When this returns from a thread other than the
    /// event thread, the handler is not running and never runs again.
    pub fn remove_event_handler(&self, id: u64) -> Result<()> {
        let (removed, state) = {
            let d = self.lock_dispatcher();
            let mut h = d.handlers.lock();
            let before = h.len();
            h.retain(|(i, _, _)| *i != id);
            (h.len() != before, d.state.clone())
        };
        if !removed {
            return Err(Error::generic(format!("No event handler with id {id}")));
        }
        if !on_event_thread() {
            // Wait until the event in progress (if any) has been delivered,
            // so the removed handler is certainly not running.
            let (m, cv) = &*state;
            let mut g = m.lock();
            while g.running {
                g = cv.wait(g);
            }
        }
        Ok(())
    }

    /// Wait until every event emitted so far reached the handlers.
    /// Refused on the event thread itself (it would wait for itself).
    pub fn flush_events(&self) -> Result<()> {
        if on_event_thread() {
            return Err(Error::generic(
                "Cannot flush events from inside an event handler",
            ));
        }
        let target = self.bus.last_seq();
        let state = {
            let d = self.lock_dispatcher();
            if d.thread.is_none() {
                return Ok(());
            }
            d.state.clone()
        };
        let (m, cv) = &*state;
        let mut g = m.lock();
        while g.delivered < target {
            g = cv.wait(g);
        }
        Ok(())
    }

    /// Cancel all jobs and wait for them; stop the event thread after it
    /// delivered everything. Also done on drop.
    pub fn shutdown(&self) {
        // Exports first: their clients' requests go to nodes jobs use.
        self.exports.shutdown();
        self.engine.shutdown();
        let (thread, closer) = {
            let mut d = self.lock_dispatcher();
            (d.thread.take(), d.closer.take())
        };
        if let Some(c) = closer {
            c.close();
        }
        if let Some(t) = thread
            && !on_event_thread()
        {
            let _ = t.join();
        }
        self.lock_dispatcher().handlers.lock().clear();
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        self.shutdown();
    }
}

thread_local! {
    static ON_EVENT_THREAD: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn on_event_thread() -> bool {
    ON_EVENT_THREAD.with(|c| c.get())
}

fn dispatch_loop(
    sub: Subscription,
    handlers: Arc<Mutex<Vec<HandlerEntry>>>,
    state: Arc<(Mutex<Delivery>, Condvar)>,
) {
    ON_EVENT_THREAD.with(|c| c.set(true));
    let (m, cv) = &*state;
    while let Some(ev) = sub.next_blocking() {
        let list: Vec<EventHandler> = {
            let mut g = m.lock();
            g.running = true;
            handlers
                .lock()
                .iter()
                .filter(|(_, after, _)| ev.seq > *after)
                .map(|(_, _, h)| h.clone())
                .collect()
        };
        for h in &list {
            // A panicking Rust handler must not kill event delivery.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h(&ev)));
        }
        drop(list);
        let mut g = m.lock();
        g.running = false;
        g.delivered = ev.seq;
        cv.notify_all();
    }
}
