//! The node graph of one context, as a registry: every node by name
//! (newest first, as `query-named-block-nodes` lists them), which ones the
//! monitor owns, the guest backends, and the lookups and checks QEMU makes
//! on names (blockdev-add, blockdev-del, `blk_new`). Opening nodes is in
//! [`super::open`], drained sections in [`super::drain`], moving parents
//! and filters in [`super::replace`].

use crate::locks::{Mutex, MutexGuard};
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::backend::{BackendOptions, BackendShared, BlockBackend};
use super::drain::DrainSection;
use super::host::{HostDriver, HostIo};
use super::parents::BlockOp;
use super::{BlockDriver, Node};
use crate::error::{Error, Result};
use crate::events::EventBus;
use crate::nbd::objects::Objects;
use crate::qapi::ids::id_wellformed;

pub(super) struct Entry {
    pub(super) node: Arc<Node>,
    /// Created by blockdev-add at the top (QEMU's monitor list).
    pub(super) monitor_owned: bool,
}

#[derive(Default)]
pub(super) struct GraphInner {
    /// Newest first, like `query-named-block-nodes`.
    pub(super) nodes: Vec<Entry>,
    auto_counter: u64,
    pub(super) backends: Vec<Weak<BackendShared>>,
    pub(super) drain_all: Vec<DrainSection>,
}

/// Nodes, backends and drains of one context.
pub struct Graph {
    inner: Mutex<GraphInner>,
    bus: Arc<EventBus>,
    /// `/objects` (TLS credentials): drivers resolve ids such as an NBD
    /// node's `tls-creds` here while opening.
    objects: Arc<Objects>,
}

/// QEMU's node-name limit (32 bytes with the terminating NUL).
const NODE_NAME_MAX: usize = 31;

impl Graph {
    /// An empty graph whose backends emit on `bus`.
    pub fn new(bus: Arc<EventBus>) -> Arc<Graph> {
        Arc::new(Graph {
            inner: Mutex::new(GraphInner::default()),
            bus,
            objects: Arc::new(Objects::new()),
        })
    }

    /// The user-created objects (`object-add`) of this graph's context.
    pub fn objects(&self) -> &Arc<Objects> {
        &self.objects
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, GraphInner> {
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

    pub(super) fn check_new_name(inner: &GraphInner, name: &str, taken: &[String]) -> Result<()> {
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
    pub(super) fn auto_name(inner: &mut GraphInner) -> String {
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
        // Names first (QEMU checks them before a driver opens), then nbd
        // connections without the graph lock, then the names again.
        Self::check_names(&self.lock(), &spec, &mut Vec::new())?;
        super::open::preconnect(&spec, false, &self.objects)?;
        let mut inner = self.lock();
        let mut taken = Vec::new();
        Self::check_names(&inner, &spec, &mut taken)?;
        let mut created = Vec::new();
        let node = self.open_spec(&mut inner, &spec, false, false, &mut created)?;
        // `created` is in opening order (children first); the root, last, is
        // the monitor's.
        let count = created.len();
        for n in created {
            let owned = Arc::ptr_eq(&n, &node);
            inner.nodes.insert(
                0,
                Entry {
                    node: n,
                    monitor_owned: owned,
                },
            );
        }
        // The new nodes' parents take their permissions (a format on its
        // file, a qcow2 on its backing chain, existing nodes used as
        // children); on a conflict nothing stays registered and the new
        // files close, which drops their locks.
        if let Err(e) = Self::refresh_perms_locked(&inner) {
            let gone: Vec<Entry> = inner.nodes.drain(..count).collect();
            drop(inner);
            drop(gone);
            return Err(e);
        }
        Ok(node)
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

    /// Register a filter node a job puts into the graph (see
    /// [`Graph::insert_filter`]): named `name`, checked as QEMU checks a
    /// new node name, or auto-named; not owned by the monitor.
    pub(super) fn add_filter_node(
        &self,
        name: Option<&str>,
        read_only: bool,
        drv: Box<dyn BlockDriver>,
    ) -> Result<Arc<Node>> {
        let mut inner = self.lock();
        let (name, auto) = match name {
            Some(n) => {
                Self::check_new_name(&inner, n, &[])?;
                (n.to_string(), false)
            }
            None => (Self::auto_name(&mut inner), true),
        };
        let node = Node::new(name, auto, read_only, drv);
        // Discards go on to the child, which decides whether to drop them.
        node.set_write_options(super::options::DetectZeroes::Off, true);
        inner.nodes.insert(
            0,
            Entry {
                node: node.clone(),
                monitor_owned: false,
            },
        );
        Ok(node)
    }

    /// Take a node out of the registry (a filter whose job is done).
    pub(super) fn forget_node(&self, node: &Arc<Node>) {
        self.lock().nodes.retain(|e| !Arc::ptr_eq(&e.node, node));
    }

    /// QEMU's `bdrv_op_is_blocked` for `op` on `node`: refused (`Node 'X'
    /// is busy: …`) while a job uses the node, or — for most operations —
    /// while the node is the backing node of another (`node is used as
    /// backing hd of 'P'`).
    pub fn check_op(&self, node: &Arc<Node>, op: BlockOp) -> Result<()> {
        Self::check_op_locked(&self.lock(), node, op)
    }

    fn check_op_locked(inner: &GraphInner, node: &Arc<Node>, op: BlockOp) -> Result<()> {
        node.check_not_busy()?;
        if op.blocked_by_backing()
            && let Some(p) = inner
                .nodes
                .iter()
                .map(|e| &e.node)
                .find(|p| p.driver().backing().is_some_and(|b| Arc::ptr_eq(&b, node)))
        {
            return Err(Error::generic(format!(
                "Node '{}' is busy: node is used as backing hd of '{}'",
                node.name(),
                p.name()
            )));
        }
        Ok(())
    }

    /// True when another node has `node` as a child.
    pub fn has_parent_node(&self, node: &Arc<Node>) -> bool {
        Self::is_child_of_any(&self.lock(), node)
    }

    /// QEMU's `bdrv_is_root_node`: no parent but guest devices — no node
    /// above it, no job using it.
    pub fn is_root(&self, node: &Arc<Node>) -> bool {
        !self.has_parent_node(node) && node.users().is_empty()
    }

    fn is_child_of_any(inner: &GraphInner, node: &Arc<Node>) -> bool {
        inner
            .nodes
            .iter()
            .any(|e| e.node.children().iter().any(|c| Arc::ptr_eq(&c.node, node)))
    }

    /// blockdev-del, with QEMU's checks in QEMU's order.
    pub fn blockdev_del(&self, name: &str) -> Result<()> {
        // Closed (their drivers dropped) after the graph lock is released.
        let mut gone = Vec::new();
        let mut inner = self.lock();
        let Some(pos) = inner.nodes.iter().position(|e| e.node.name() == name) else {
            return Err(Error::generic(format!(
                "Failed to find node with node-name='{name}'"
            )));
        };
        let node = inner.nodes[pos].node.clone();
        if !node.parent_backends().is_empty() || node.has_backend_user() {
            return Err(Error::generic(format!("Node {name} is in use")));
        }
        Self::check_op_locked(&inner, &node, BlockOp::DriveDel)?;
        if !inner.nodes[pos].monitor_owned {
            return Err(Error::generic(format!(
                "Node {name} is not owned by the monitor"
            )));
        }
        if Self::is_child_of_any(&inner, &node) {
            return Err(Error::generic(format!("Block device {name} is in use")));
        }
        gone.push(inner.nodes.remove(pos));
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
            if !c.parent_backends().is_empty() || !c.users().is_empty() {
                continue;
            }
            gone.push(inner.nodes.remove(p));
            stack.extend(c.children().into_iter().map(|x| x.node));
        }
        drop(inner);
        drop(gone);
        // What stays (a monitor-owned file under the deleted format) takes
        // less now.
        self.release_perms();
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
        let shared = BackendShared::new(opts, node.clone(), self.bus.clone());
        // The device's permissions (QEMU's blk_new + blk_insert_bs).
        if let Err(e) = Self::refresh_perms_locked(&inner) {
            node.detach_backend(&shared);
            return Err(e);
        }
        inner.backends.push(Arc::downgrade(&shared));
        drop(inner);
        Ok(BlockBackend::new(shared, self.clone()))
    }

    /// Drop the nodes nothing uses any more: opened implicitly (not owned
    /// by the monitor), no parent node, no guest device, no job — as QEMU
    /// frees a node when its last reference goes (e.g. the intermediate
    /// layers a stream or commit cut out of a chain).
    pub fn drop_orphans(&self) {
        // Closed (their drivers dropped) after the graph lock is released.
        let mut gone = Vec::new();
        let mut inner = self.lock();
        loop {
            let orphan = inner.nodes.iter().position(|e| {
                !e.monitor_owned
                    && !Self::is_child_of_any(&inner, &e.node)
                    && e.node.parent_backends().is_empty()
                    && e.node.users().is_empty()
            });
            match orphan {
                Some(p) => gone.push(inner.nodes.remove(p)),
                None => break,
            }
        }
        drop(inner);
        drop(gone);
        // Called when a job is freed: its users are gone, so are the
        // permissions they took.
        self.release_perms();
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
}
