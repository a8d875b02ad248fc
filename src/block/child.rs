//! A parent's edge to a child node that can be moved while the graph is
//! in use (QEMU's `BdrvChild` as `bdrv_replace_node` sees it): a mirror's
//! `replaces` moves the parents of the node it replaces onto its target.

use crate::locks::RwLock;
use std::sync::Arc;

use super::Node;

/// The child a driver sends its requests to; requests take a reference
/// (one uncontended read lock), a replacement swaps it.
pub struct ChildEdge(RwLock<Arc<Node>>);

impl ChildEdge {
    /// An edge to `node`.
    pub fn new(node: Arc<Node>) -> Self {
        ChildEdge(RwLock::new(node))
    }

    /// The node the edge points at now.
    pub fn get(&self) -> Arc<Node> {
        self.0.read().clone()
    }

    /// Point the edge at `new` if it points at `old`. Callers have the
    /// nodes drained, so no request is between `get` and its I/O.
    pub fn replace(&self, old: &Arc<Node>, new: &Arc<Node>) {
        let mut n = self.0.write();
        if Arc::ptr_eq(&n, old) {
            *n = new.clone();
        }
    }
}
