//! The node graph of one context: named nodes (blockdev-add/-del), guest
//! backends, name lookup, and drained sections.
//!
//! Drain (QEMU's `bdrv_drained_begin`): every backend and job that can
//! issue requests reaching the drained nodes is quiesced (backends hold new
//! guest requests at their gate; jobs get an internal pause), then we wait
//! until those backends have no request in flight, those jobs are quiescent
//! (paused, sleeping, or done running) and the nodes are idle. Drain waits
//! for requests, never for a job to finish.

use parking_lot::{Mutex, MutexGuard};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::backend::{BackendOptions, BackendShared, BlockBackend};
use super::blkdebug::BlkdebugDriver;
use super::file::{FileDriver, FileOptions};
use super::host::{HostDriver, HostIo};
use super::null::{NULL_DEFAULT_SIZE, NullDriver};
use super::options::{BackingSpec, ChildRef, DriverSpec, NodeSpec};
use super::qcow2::Qcow2Driver;
use super::raw::RawDriver;
use super::{BlockDriver, Node};
use crate::engine::Job;
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::qapi::ids::id_wellformed;

struct Entry {
    node: Arc<Node>,
    /// Created by blockdev-add at the top (QEMU's monitor list).
    monitor_owned: bool,
}

#[derive(Default)]
struct GraphInner {
    /// Newest first, like `query-named-block-nodes`.
    nodes: Vec<Entry>,
    auto_counter: u64,
    backends: Vec<Weak<BackendShared>>,
    drain_all: Vec<DrainSection>,
}

/// What one drained section quiesced, so that its end undoes exactly that.
pub struct DrainSection {
    jobs: Vec<Arc<Job>>,
    backends: Vec<Arc<BackendShared>>,
}

/// Nodes, backends and drains of one context.
pub struct Graph {
    inner: Mutex<GraphInner>,
    bus: Arc<EventBus>,
}

/// QEMU's node-name limit (32 bytes with the terminating NUL).
const NODE_NAME_MAX: usize = 31;

impl Graph {
    /// An empty graph whose backends emit on `bus`.
    pub fn new(bus: Arc<EventBus>) -> Arc<Graph> {
        Arc::new(Graph {
            inner: Mutex::new(GraphInner::default()),
            bus,
        })
    }

    fn lock(&self) -> MutexGuard<'_, GraphInner> {
        self.inner.lock()
    }

    /// The node with this node-name.
    pub fn find_node(&self, name: &str) -> Option<Arc<Node>> {
        self.lock()
            .nodes
            .iter()
            .find(|e| e.node.name() == name)
            .map(|e| e.node.clone())
    }

    /// QEMU's `bdrv_lookup_bs(name, name)`: a backend (device) name first,
    /// then a node name; `Cannot find device='X' nor node-name='X'`.
    pub fn lookup(&self, name: &str) -> Result<Arc<Node>> {
        if let Some(b) = self.find_backend(name) {
            return Ok(b.node());
        }
        self.find_node(name).ok_or_else(|| {
            Error::generic(format!(
                "Cannot find device='{name}' nor node-name='{name}'"
            ))
        })
    }

    /// A node by node name only (QEMU's `bdrv_lookup_bs(NULL, name)`).
    pub fn lookup_node(&self, name: &str) -> Result<Arc<Node>> {
        self.find_node(name)
            .ok_or_else(|| Error::generic(format!("Cannot find device='' nor node-name='{name}'")))
    }

    /// All nodes, newest first.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.lock().nodes.iter().map(|e| e.node.clone()).collect()
    }

    /// The first named backend attached to `node` (QEMU's
    /// `bdrv_get_device_name`), or "".
    pub fn device_name(&self, node: &Arc<Node>) -> String {
        node.parent_backends()
            .iter()
            .find(|b| !b.name().is_empty())
            .map(|b| b.name().to_string())
            .unwrap_or_default()
    }

    fn check_new_name(inner: &GraphInner, name: &str, taken: &[String]) -> Result<()> {
        if !id_wellformed(name) {
            return Err(Error::generic(format!("Invalid node-name: '{name}'")));
        }
        if name.len() > NODE_NAME_MAX {
            return Err(Error::generic("Node name too long"));
        }
        if inner.nodes.iter().any(|e| e.node.name() == name) || taken.iter().any(|t| t == name) {
            return Err(Error::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        if inner
            .backends
            .iter()
            .filter_map(Weak::upgrade)
            .any(|b| b.name() == name)
        {
            return Err(Error::generic(format!(
                "node-name={name} is conflicting with a device id"
            )));
        }
        Ok(())
    }

    /// QEMU's auto node names: `#block` + counter + two random digits.
    fn auto_name(inner: &mut GraphInner) -> String {
        let n = inner.auto_counter;
        inner.auto_counter += 1;
        let r = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
            % 100;
        format!("#block{n}{r:02}")
    }

    /// blockdev-add: open the node tree described by `opts` and register
    /// every new node. Nothing is registered unless everything opened.
    pub fn blockdev_add(&self, opts: &Value) -> Result<Arc<Node>> {
        let spec = super::options::parse(opts)?;
        if spec.node_name.is_none() {
            return Err(Error::generic(
                "'node-name' must be specified for the root node",
            ));
        }
        let mut inner = self.lock();
        let mut taken = Vec::new();
        Self::check_names(&inner, &spec, &mut taken)?;
        let mut created = Vec::new();
        let node = self.open_spec(&mut inner, &spec, false, &mut created)?;
        for (i, n) in created.into_iter().enumerate() {
            // `created` is in opening order (children first); the root, last,
            // is the monitor's.
            let _ = i;
            let owned = Arc::ptr_eq(&n, &node);
            inner.nodes.insert(
                0,
                Entry {
                    node: n,
                    monitor_owned: owned,
                },
            );
        }
        Ok(node)
    }

    fn check_names(inner: &GraphInner, spec: &NodeSpec, taken: &mut Vec<String>) -> Result<()> {
        if let Some(n) = &spec.node_name {
            Self::check_new_name(inner, n, taken)?;
            taken.push(n.clone());
        }
        let children = match &spec.driver {
            DriverSpec::Raw { file, .. } => vec![file],
            DriverSpec::Blkdebug { image, .. } => vec![image],
            DriverSpec::Qcow2 { file, backing } => match backing {
                BackingSpec::Child(b) => vec![file, b],
                BackingSpec::None | BackingSpec::FromHeader => vec![file],
            },
            DriverSpec::File { .. } | DriverSpec::Null { .. } => vec![],
        };
        for c in children {
            if let ChildRef::New(c) = c {
                Self::check_names(inner, c, taken)?;
            }
        }
        Ok(())
    }

    fn resolve_child(
        &self,
        inner: &mut GraphInner,
        c: &ChildRef,
        parent: (bool, bool),
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Arc<Node>> {
        let (parent_discard, parent_read_only) = parent;
        match c {
            // An inline child inherits the parent's discard mode and
            // read-only flag, as QEMU's children inherit open flags.
            ChildRef::New(spec) if parent_read_only && !spec.read_only => {
                let mut ro = (**spec).clone();
                ro.read_only = true;
                self.open_spec(inner, &ro, parent_discard, created)
            }
            ChildRef::New(spec) => self.open_spec(inner, spec, parent_discard, created),
            ChildRef::Existing(name) => {
                if let Some(b) = inner
                    .backends
                    .iter()
                    .filter_map(Weak::upgrade)
                    .find(|b| b.name() == name)
                {
                    return Ok(b.node());
                }
                inner
                    .nodes
                    .iter()
                    .find(|e| e.node.name() == name)
                    .map(|e| e.node.clone())
                    .ok_or_else(|| {
                        Error::generic(format!(
                            "Cannot find device='{name}' nor node-name='{name}'"
                        ))
                    })
            }
        }
    }

    fn open_spec(
        &self,
        inner: &mut GraphInner,
        spec: &NodeSpec,
        inherited_discard: bool,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Arc<Node>> {
        let discard = spec.discard_unmap.unwrap_or(inherited_discard);
        let drv: Box<dyn BlockDriver> = match &spec.driver {
            DriverSpec::File { filename } => Box::new(FileDriver::open(FileOptions {
                filename: filename.clone(),
                read_only: spec.read_only,
                discard_unmap: discard,
                direct: spec.cache_direct,
                no_flush: spec.cache_no_flush,
            })?),
            DriverSpec::Null {
                name,
                size,
                latency_ns,
                read_zeroes,
            } => {
                let size = match size {
                    None => NULL_DEFAULT_SIZE,
                    // QEMU aborts the whole process here; we refuse instead.
                    Some(s) if *s < 0 => {
                        return Err(Error::generic(format!(
                            "Value '{s}' is out of range for parameter 'size'"
                        )));
                    }
                    Some(s) => (*s as u64).div_ceil(512) * 512,
                };
                let latency = match latency_ns {
                    None => 0,
                    Some(l) if *l < 0 => return Err(Error::generic("latency-ns is invalid")),
                    Some(l) => *l as u64,
                };
                Box::new(NullDriver {
                    name,
                    size,
                    latency: std::time::Duration::from_nanos(latency),
                    read_zeroes: *read_zeroes,
                })
            }
            DriverSpec::Raw { file, offset, size } => {
                let child = self.resolve_child(inner, file, (discard, spec.read_only), created)?;
                let offset = match offset {
                    Some(o) if *o < 0 => {
                        return Err(Error::generic("offset cannot be negative"));
                    }
                    o => o.unwrap_or(0) as u64,
                };
                let size = match size {
                    Some(s) if *s < 0 => return Err(Error::generic("size cannot be negative")),
                    s => s.map(|s| s as u64),
                };
                Box::new(RawDriver::new(child, offset, size)?)
            }
            DriverSpec::Qcow2 { file, backing } => {
                let file = self.resolve_child(inner, file, (discard, spec.read_only), created)?;
                let backing = match backing {
                    BackingSpec::None => None,
                    BackingSpec::Child(c) => {
                        Some(self.resolve_child(inner, c, (discard, spec.read_only), created)?)
                    }
                    BackingSpec::FromHeader => {
                        self.open_header_backing(inner, &file, spec.read_only, created)?
                    }
                };
                Box::new(Qcow2Driver::open(file, !spec.read_only, backing)?)
            }
            DriverSpec::Blkdebug {
                image,
                align,
                inject,
                set_state,
            } => {
                if let Some(a) = align
                    && (*a < 0
                        || (*a != 0 && (*a as u64).count_ones() != 1)
                        || *a >= i32::MAX as i64)
                {
                    return Err(Error::generic(format!(
                        "Cannot meet constraints with align {a}"
                    )));
                }
                let child = self.resolve_child(inner, image, (discard, spec.read_only), created)?;
                Box::new(
                    BlkdebugDriver::new(child, inject.clone(), set_state.clone())
                        .with_align(*align),
                )
            }
        };
        let (name, auto) = match &spec.node_name {
            Some(n) => (n.clone(), false),
            None => (Self::auto_name(inner), true),
        };
        let node = Node::new(name, auto, spec.read_only, drv);
        node.set_write_options(spec.detect_zeroes, discard);
        created.push(node.clone());
        Ok(node)
    }

    /// Open the backing file a qcow2 header names (QEMU's implicit
    /// backing: auto-named nodes, the name relative to the image's
    /// directory, the format from the header or probed).
    fn open_header_backing(
        &self,
        inner: &mut GraphInner,
        file: &Arc<Node>,
        read_only: bool,
        created: &mut Vec<Arc<Node>>,
    ) -> Result<Option<Arc<Node>>> {
        let hdr = super::qcow2::header::read_node_header(file)?;
        let Some(name) = hdr.backing_file else {
            return Ok(None);
        };
        let path = resolve_backing_path(&file.filename(), &name);
        let format = match hdr.backing_format {
            Some(f) => f,
            None => probe_format(&path),
        };
        let driver = match format.as_str() {
            "qcow2" | "raw" => format,
            other => {
                return Err(Error::generic(format!(
                    "Could not open backing file: Unknown driver '{other}'"
                )));
            }
        };
        let spec = NodeSpec {
            node_name: None,
            read_only,
            discard_unmap: None,
            cache_direct: false,
            cache_no_flush: false,
            detect_zeroes: Default::default(),
            driver: if driver == "raw" {
                DriverSpec::Raw {
                    file: ChildRef::New(Box::new(file_spec(&path, read_only))),
                    offset: None,
                    size: None,
                }
            } else {
                DriverSpec::Qcow2 {
                    file: ChildRef::New(Box::new(file_spec(&path, read_only))),
                    backing: BackingSpec::FromHeader,
                }
            },
        };
        self.open_spec(inner, &spec, false, created)
            .map(Some)
            .map_err(|e| e.prepend("Could not open backing file: "))
    }

    /// Register a node whose I/O the host performs.
    pub fn add_host_node(
        &self,
        name: &str,
        read_only: bool,
        io: Box<dyn HostIo>,
    ) -> Result<Arc<Node>> {
        let mut inner = self.lock();
        Self::check_new_name(&inner, name, &[])?;
        let node = Node::new(
            name.to_string(),
            false,
            read_only,
            Box::new(HostDriver::new(io)),
        );
        node.len()?;
        inner.nodes.insert(
            0,
            Entry {
                node: node.clone(),
                monitor_owned: true,
            },
        );
        Ok(node)
    }

    /// True when another node has `node` as a child (QEMU: not a root).
    pub fn has_parent_node(&self, node: &Arc<Node>) -> bool {
        Self::is_child_of_any(&self.lock(), node)
    }

    fn is_child_of_any(inner: &GraphInner, node: &Arc<Node>) -> bool {
        inner
            .nodes
            .iter()
            .any(|e| e.node.children().iter().any(|c| Arc::ptr_eq(&c.node, node)))
    }

    /// blockdev-del, with QEMU's checks in QEMU's order.
    pub fn blockdev_del(&self, name: &str) -> Result<()> {
        let mut inner = self.lock();
        let Some(pos) = inner.nodes.iter().position(|e| e.node.name() == name) else {
            return Err(Error::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let node = inner.nodes[pos].node.clone();
        if !node.parent_backends().is_empty() || node.has_job_user() {
            return Err(Error::generic(format!("Node {name} is in use")));
        }
        if !inner.nodes[pos].monitor_owned {
            return Err(Error::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if let Some(job) = node.main_job() {
            return Err(Error::generic(format!(
                "Node '{name}' is busy: block device is in use by block job: {}",
                job.job_type()
            )));
        }
        if Self::is_child_of_any(&inner, &node) {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        inner.nodes.remove(pos);
        // Inline children go with their parent unless something else still
        // uses them.
        let mut stack: Vec<Arc<Node>> = node.children().into_iter().map(|c| c.node).collect();
        drop(node);
        while let Some(c) = stack.pop() {
            let Some(p) = inner.nodes.iter().position(|e| Arc::ptr_eq(&e.node, &c)) else {
                continue;
            };
            if inner.nodes[p].monitor_owned || Self::is_child_of_any(&inner, &c) {
                continue;
            }
            if !c.parent_backends().is_empty() || !c.parent_jobs().is_empty() {
                continue;
            }
            inner.nodes.remove(p);
            stack.extend(c.children().into_iter().map(|x| x.node));
        }
        Ok(())
    }

    // ---- backends ----------------------------------------------------------

    /// The backend with this (non-empty) name.
    pub fn find_backend(&self, name: &str) -> Option<Arc<BackendShared>> {
        if name.is_empty() {
            return None;
        }
        self.lock()
            .backends
            .iter()
            .filter_map(Weak::upgrade)
            .find(|b| b.name() == name)
    }

    /// Create a guest backend attached to `node_name` (a node or device name).
    pub fn blk_new(
        self: &Arc<Self>,
        node_name: &str,
        opts: BackendOptions,
    ) -> Result<BlockBackend> {
        let node = self.lookup(node_name)?;
        let mut inner = self.lock();
        inner.backends.retain(|w| w.strong_count() > 0);
        if !opts.name.is_empty() {
            if !id_wellformed(&opts.name) {
                return Err(Error::generic(format!(
                    "Invalid device name '{}'",
                    opts.name
                )));
            }
            if inner
                .backends
                .iter()
                .filter_map(Weak::upgrade)
                .any(|b| b.name() == opts.name)
            {
                return Err(Error::generic(format!(
                    "Device with id '{}' already exists",
                    opts.name
                )));
            }
            if inner.nodes.iter().any(|e| e.node.name() == opts.name) {
                return Err(Error::generic(format!(
                    "Device name '{}' conflicts with an existing node name",
                    opts.name
                )));
            }
        }
        let shared = BackendShared::new(opts, node, self.bus.clone());
        inner.backends.push(Arc::downgrade(&shared));
        drop(inner);
        Ok(BlockBackend::new(shared, self.clone()))
    }

    /// Drop the nodes nothing uses any more: opened implicitly (not owned
    /// by the monitor), no parent node, no guest device, no job — as QEMU
    /// frees a node when its last reference goes (e.g. the intermediate
    /// layers a stream or commit cut out of a chain).
    pub fn drop_orphans(&self) {
        let mut inner = self.lock();
        loop {
            let orphan = inner.nodes.iter().position(|e| {
                !e.monitor_owned
                    && !Self::is_child_of_any(&inner, &e.node)
                    && e.node.parent_backends().is_empty()
                    && e.node.parent_jobs().is_empty()
            });
            match orphan {
                Some(p) => {
                    inner.nodes.remove(p);
                }
                None => break,
            }
        }
    }

    /// The nodes that have `node` as a child.
    pub fn parent_nodes(&self, node: &Arc<Node>) -> Vec<Arc<Node>> {
        self.lock()
            .nodes
            .iter()
            .filter(|e| e.node.children().iter().any(|c| Arc::ptr_eq(&c.node, node)))
            .map(|e| e.node.clone())
            .collect()
    }

    /// The parents `replace_node(from, to)` moves: every node parent of
    /// `from` except `to` and nodes below it (moving those would make `to`
    /// its own descendant; QEMU's `should_update_child` skips them too).
    fn parents_to_move(&self, from: &Arc<Node>, to: &Arc<Node>) -> Vec<Arc<Node>> {
        let below_to = subtree(to);
        self.parent_nodes(from)
            .into_iter()
            .filter(|p| !below_to.iter().any(|b| Arc::ptr_eq(b, p)))
            .collect()
    }

    /// The parents `replace_node(from, to)` moves, or an error naming the
    /// first that cannot move (a driver of ours whose children are fixed).
    fn movable_parents(&self, from: &Arc<Node>, to: &Arc<Node>) -> Result<Vec<Arc<Node>>> {
        let parents = self.parents_to_move(from, to);
        match parents.iter().find(|p| !p.driver().can_replace_child()) {
            Some(p) => Err(Error::generic(format!(
                "Cannot replace node '{}': its parent '{}' (driver {}) cannot change its children",
                from.name(),
                p.name(),
                p.driver_name()
            ))),
            None => Ok(parents),
        }
    }

    /// Whether `replace_node(from, to)` can move every parent of `from`.
    pub fn check_replace_node(&self, from: &Arc<Node>, to: &Arc<Node>) -> Result<()> {
        self.movable_parents(from, to).map(drop)
    }

    /// Move every parent of `from` to `to` (QEMU's `bdrv_replace_node`):
    /// guest backends, and the edges of parent nodes. Nothing moves when
    /// one of the parent nodes cannot (see [`Graph::check_replace_node`]).
    /// Call with `from` drained.
    pub fn replace_node(&self, from: &Arc<Node>, to: &Arc<Node>) -> Result<()> {
        for p in self.movable_parents(from, to)? {
            p.driver().replace_child(from, to);
        }
        for b in from.parent_backends() {
            b.replace_node(to.clone());
        }
        Ok(())
    }

    // ---- drain ---------------------------------------------------------------

    /// The drain closure of `roots`: their subtrees, plus every node above
    /// any of those (anything that can send requests into them).
    fn closure(&self, roots: &[Arc<Node>]) -> Vec<Arc<Node>> {
        let all = self.nodes();
        let mut set: Vec<Arc<Node>> = Vec::new();
        let push = |set: &mut Vec<Arc<Node>>, n: Arc<Node>| -> bool {
            if set.iter().any(|x| Arc::ptr_eq(x, &n)) {
                false
            } else {
                set.push(n);
                true
            }
        };
        for n in roots.iter().flat_map(subtree) {
            push(&mut set, n);
        }
        loop {
            let mut grew = false;
            for cand in &all {
                let above = cand
                    .children()
                    .iter()
                    .any(|c| set.iter().any(|s| Arc::ptr_eq(s, &c.node)));
                if above && push(&mut set, cand.clone()) {
                    grew = true;
                }
            }
            if !grew {
                return set;
            }
        }
    }

    /// Begin a drained section over `roots` (all nodes when empty).
    pub fn drained_begin(&self, roots: &[Arc<Node>]) -> DrainSection {
        let nodes = if roots.is_empty() {
            self.nodes()
        } else {
            self.closure(roots)
        };
        let mut jobs: Vec<Arc<Job>> = Vec::new();
        let mut backends: Vec<Arc<BackendShared>> = Vec::new();
        for n in &nodes {
            for j in n.parent_jobs() {
                // A job draining its own nodes (mirror before completing)
                // is not paused by it: it would wait for itself.
                if j.engine().is_current_job(&j) {
                    continue;
                }
                if !jobs.iter().any(|x| Arc::ptr_eq(x, &j)) {
                    jobs.push(j);
                }
            }
            for b in n.parent_backends() {
                if !backends.iter().any(|x| Arc::ptr_eq(x, &b)) {
                    backends.push(b);
                }
            }
        }
        for b in &backends {
            b.quiesce();
        }
        for j in &jobs {
            j.engine().pause(j);
        }
        for b in &backends {
            b.wait_idle();
        }
        for j in &jobs {
            j.engine().wait_quiescent(j);
        }
        for n in &nodes {
            n.wait_idle();
        }
        DrainSection { jobs, backends }
    }

    /// End a drained section.
    pub fn drained_end(&self, s: DrainSection) {
        for b in &s.backends {
            b.unquiesce();
        }
        for j in &s.jobs {
            j.engine().resume(j);
        }
    }

    /// QEMU's `bdrv_drain_all_begin`: quiesce everything until the end.
    pub fn drain_all_begin(&self) {
        let s = self.drained_begin(&[]);
        self.lock().drain_all.push(s);
    }

    /// End the innermost `drain_all_begin`.
    pub fn drain_all_end(&self) -> Result<()> {
        let s = self.lock().drain_all.pop();
        match s {
            Some(s) => {
                self.drained_end(s);
                Ok(())
            }
            None => Err(Error::generic("No drained section to end")),
        }
    }

    /// QEMU's `bdrv_drain_all`: wait for every in-flight request, then let
    /// everything go on.
    pub fn drain_all(&self) {
        let s = self.drained_begin(&[]);
        self.drained_end(s);
    }
}

/// `node` and every node below it.
fn subtree(node: &Arc<Node>) -> Vec<Arc<Node>> {
    let mut seen: Vec<Arc<Node>> = Vec::new();
    let mut stack = vec![node.clone()];
    while let Some(n) = stack.pop() {
        if !seen.iter().any(|s| Arc::ptr_eq(s, &n)) {
            stack.extend(n.children().into_iter().map(|c| c.node));
            seen.push(n);
        }
    }
    seen
}

/// QEMU's `bdrv_recurse_can_replace`: whether a mirror from `source` may
/// replace `to_replace`: the source itself, or a node reached from it
/// through filters only, whose data the source shows unchanged.
pub fn can_replace(source: &Arc<Node>, to_replace: &Arc<Node>) -> bool {
    let mut n = source.clone();
    loop {
        if Arc::ptr_eq(&n, to_replace) {
            return true;
        }
        match n.driver().filtered_child() {
            Some(c) => n = c,
            None => return false,
        }
    }
}

/// A backing file name as QEMU resolves it: absolute as it is, relative
/// to the directory of the image that names it.
pub fn resolve_backing_path(image: &str, backing: &str) -> String {
    let b = std::path::Path::new(backing);
    if b.is_absolute() {
        return backing.to_string();
    }
    match std::path::Path::new(image).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(b).to_string_lossy().into_owned(),
        _ => backing.to_string(),
    }
}

/// qcow2 when the file starts with qcow2's magic, else raw (QEMU probes).
fn probe_format(path: &str) -> String {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let is_qcow2 = std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"QFI\xfb";
    if is_qcow2 { "qcow2" } else { "raw" }.to_string()
}

fn file_spec(path: &str, read_only: bool) -> NodeSpec {
    NodeSpec {
        node_name: None,
        read_only,
        discard_unmap: None,
        cache_direct: false,
        cache_no_flush: false,
        detect_zeroes: Default::default(),
        driver: DriverSpec::File {
            filename: path.to_string(),
        },
    }
}
