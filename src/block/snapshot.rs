//! External snapshots (QEMU's `blockdev-snapshot` and
//! `blockdev-snapshot-sync`): an overlay image goes above a node, the
//! node becomes its backing layer, and everything that used the node (the
//! guest, parent nodes) uses the overlay from then on, so new writes land
//! in the overlay and the node keeps the point-in-time view.
//!
//! `blockdev-snapshot` takes an overlay the user opened without a backing
//! layer (`"backing": null`); its header already names the node's image,
//! and only the graph changes. `blockdev-snapshot-sync` formats a new
//! qcow2 image naming the node's image as its backing file (or opens an
//! existing one, `mode: existing`) and opens it as the overlay.
//!
//! Both are transaction actions: [`Appended::undo`] puts the node back
//! where it was (a created image file stays, as in QEMU).

use std::sync::Arc;

use serde_json::json;

use super::file::{FileDriver, FileOptions};
use super::graph::Graph;
use super::qcow2::{self, Qcow2Driver};
use super::{BlockOp, Node};
use crate::error::{Error, Result};
use crate::qapi::qapi_enum;

qapi_enum! {
    /// How `blockdev-snapshot-sync` gets its image (QEMU's `NewImageMode`).
    pub enum NewImageMode {
        /// Open an existing image.
        Existing = "existing",
        /// Create it, naming the backing file by its absolute path.
        AbsolutePaths = "absolute-paths",
    }
}

/// `blockdev-snapshot-sync`'s arguments.
#[derive(Debug, Clone)]
pub struct SnapshotSync {
    /// `device`: a device name.
    pub device: Option<String>,
    /// `node-name`: the node to snapshot.
    pub node_name: Option<String>,
    /// `snapshot-file`: the overlay image's path.
    pub snapshot_file: String,
    /// `snapshot-node-name`: the overlay node's name.
    pub snapshot_node_name: Option<String>,
    /// `format` (default `qcow2`).
    pub format: Option<String>,
    /// `mode` (default `absolute-paths`).
    pub mode: NewImageMode,
}

/// An overlay put above a node; undone on a transaction's abort.
pub struct Appended {
    graph: Arc<Graph>,
    node: Arc<Node>,
    overlay: Arc<Node>,
    /// The overlay was opened by the action (`-sync`): it goes on undo.
    opened_here: bool,
}

impl Appended {
    /// Put the node back: its parents leave the overlay, which loses its
    /// backing layer (and, if the action opened it, leaves the graph).
    pub fn undo(self) {
        let section = self
            .graph
            .drained_begin(&[self.overlay.clone(), self.node.clone()]);
        self.graph.replace_node(&self.overlay, &self.node);
        if let Some(q) = as_qcow2(&self.overlay) {
            let _ = q.relink(None);
        }
        self.graph.drained_end(section);
        self.node.set_perm_read_only(self.node.is_read_only());
        self.graph.release_perms();
        if self.opened_here {
            let _ = self.graph.blockdev_del(self.overlay.name());
        }
    }
}

fn as_qcow2(n: &Node) -> Option<&Qcow2Driver> {
    (n.driver() as &dyn std::any::Any).downcast_ref::<Qcow2Driver>()
}

/// Checks on the node both commands share (QEMU's `external_snapshot_action`).
fn check_node(graph: &Graph, node: &Arc<Node>) -> Result<()> {
    graph.check_op(node, BlockOp::ExternalSnapshot)
}

/// Make `overlay` the top of `node` (QEMU's `bdrv_append`).
fn append(graph: &Arc<Graph>, node: &Arc<Node>, overlay: &Arc<Node>) -> Result<()> {
    let q = as_qcow2(overlay)
        .ok_or_else(|| Error::generic("The overlay does not support backing images"))?;
    // QEMU flushes the node before the overlay takes its writes.
    node.flush()?;
    let section = graph.drained_begin(&[node.clone(), overlay.clone()]);
    let r = q.relink(Some(node.clone()));
    if r.is_ok() {
        graph.replace_node(node, overlay);
    }
    graph.drained_end(section);
    if r.is_ok() {
        // QEMU's external snapshot reopens the old top read-only: it only
        // gives up permissions (its file no longer takes write or resize).
        node.set_perm_read_only(true);
        graph.release_perms();
    }
    r
}

/// `blockdev-snapshot`: `overlay` (opened, backing-less, unused) goes
/// above `node`.
pub fn blockdev_snapshot(graph: &Arc<Graph>, node: &str, overlay: &str) -> Result<Appended> {
    let bs = graph.lookup(node)?;
    check_node(graph, &bs)?;
    let ov = graph.lookup(overlay)?;
    if graph.has_parent_node(&ov) || !ov.parent_backends().is_empty() || Arc::ptr_eq(&ov, &bs) {
        return Err(Error::generic("The overlay is already in use"));
    }
    if ov.backing().is_some() {
        return Err(Error::generic("The overlay already has a backing image"));
    }
    append(graph, &bs, &ov)?;
    Ok(Appended {
        graph: graph.clone(),
        node: bs,
        overlay: ov,
        opened_here: false,
    })
}

/// `blockdev-snapshot-sync`: a new (or existing) qcow2 image over the
/// node, opened as `snapshot-node-name` and put above it.
pub fn blockdev_snapshot_sync(graph: &Arc<Graph>, o: &SnapshotSync) -> Result<Appended> {
    let key = o.device.as_deref().or(o.node_name.as_deref()).unwrap_or("");
    let bs = graph.lookup(key).map_err(|_| {
        Error::generic(format!(
            "Cannot find device='{}' nor node-name='{}'",
            o.device.as_deref().unwrap_or(""),
            o.node_name.as_deref().unwrap_or("")
        ))
    })?;
    check_node(graph, &bs)?;
    let Some(name) = o.snapshot_node_name.as_deref() else {
        return Err(Error::generic("New overlay node-name missing"));
    };
    if graph.find_node(name).is_some() {
        return Err(Error::generic("New overlay node-name already in use"));
    }
    let format = o.format.as_deref().unwrap_or("qcow2");
    if o.mode == NewImageMode::AbsolutePaths {
        if format != "qcow2" {
            return Err(Error::generic(format!(
                "Backing file not supported for file format '{format}'"
            )));
        }
        create_overlay(&o.snapshot_file, &bs)?;
    }
    let ov = graph
        .blockdev_add(
            &json!({"driver": format, "node-name": name, "backing": null,
            "file": {"driver": "file", "filename": o.snapshot_file}}),
        )
        .map_err(|e| match std::fs::metadata(&o.snapshot_file) {
            Err(m) => Error::from(m).prepend(format!("Could not open '{}': ", o.snapshot_file)),
            Ok(_) => e,
        })?;
    if let Err(e) = append(graph, &bs, &ov) {
        drop(ov);
        let _ = graph.blockdev_del(name);
        return Err(e);
    }
    Ok(Appended {
        graph: graph.clone(),
        node: bs,
        overlay: ov,
        opened_here: true,
    })
}

/// Format `path` as a qcow2 image of the node's size whose header names
/// the node's image and format (QEMU's `bdrv_img_create`).
fn create_overlay(path: &str, bs: &Arc<Node>) -> Result<()> {
    let open = || -> Result<Arc<Node>> {
        std::fs::File::create(path)?;
        let drv = FileDriver::open(FileOptions {
            filename: path.to_string(),
            ..Default::default()
        })?;
        Ok(Node::new(path.to_string(), true, false, Box::new(drv)))
    };
    let file = open().map_err(|e| e.prepend(format!("Could not create '{path}': ")))?;
    qcow2::create(
        &file,
        bs.len()?,
        Some((&bs.filename(), bs.driver_name())),
        None,
    )
    .map_err(|e| e.prepend(format!("Could not create '{path}': ")))
}
