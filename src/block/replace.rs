//! Moving parents from one node to another (QEMU's `bdrv_replace_node`):
//! a mirror's pivot, and putting a filter above a node and taking it out
//! again (`bdrv_insert_node`, `bdrv_drop_filter`). Guest backends and the
//! edges of parent nodes move; users (jobs) stay at their nodes.

use std::sync::Arc;

use super::drain::subtree;
use super::graph::Graph;
use super::{BlockDriver, Node};
use crate::error::Result;

impl Graph {
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

    /// Move every parent of `from` to `to`: guest backends, and the edges
    /// of parent nodes. Call with `from` drained.
    pub fn replace_node(&self, from: &Arc<Node>, to: &Arc<Node>) {
        for p in self.parents_to_move(from, to) {
            p.driver().replace_child(from, to);
        }
        for b in from.parent_backends() {
            b.replace_node(to.clone());
        }
    }

    /// Make a filter node of `driver` (whose filtered child is `below`)
    /// and put it above `below`: the node (named `name`, or auto-named)
    /// joins the graph, then, with `below` drained, every parent of `below`
    /// moves onto it. Name errors are QEMU's (`Invalid node-name: 'X'`,
    /// `Duplicate nodes with node-name='X'`).
    pub fn insert_filter(
        &self,
        below: &Arc<Node>,
        name: Option<&str>,
        read_only: bool,
        driver: Box<dyn BlockDriver>,
    ) -> Result<Arc<Node>> {
        debug_assert!(
            driver
                .filtered_child()
                .is_some_and(|c| Arc::ptr_eq(&c, below))
        );
        let filter = self.add_filter_node(name, read_only, driver)?;
        let section = self.drained_begin(std::slice::from_ref(below));
        self.replace_node(below, &filter);
        // The parents now reach `below` through the filter, which asks
        // for what it needs on it; on a conflict the graph goes back.
        let r = self.refresh_perms();
        if r.is_err() {
            self.replace_node(&filter, below);
        }
        self.drained_end(section);
        if let Err(e) = r {
            self.forget_node(&filter);
            return Err(e);
        }
        Ok(filter)
    }

    /// Take a filter out: with it drained, its parents move to the node it
    /// filters, and it leaves the graph (QEMU's `bdrv_drop_filter`).
    pub fn remove_filter(&self, filter: &Arc<Node>) {
        if let Some(child) = filter.driver().filtered_child() {
            let section = self.drained_begin(std::slice::from_ref(filter));
            self.replace_node(filter, &child);
            self.drained_end(section);
        }
        self.forget_node(filter);
        self.release_perms();
    }
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
