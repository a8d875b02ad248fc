//! Drained sections (QEMU's `bdrv_drained_begin`/`_end`): every backend
//! and user (job) that can send requests into the drained nodes is
//! quiesced — backends hold new guest requests at their gate, users are
//! asked to stop — then we wait until those backends have nothing in
//! flight, those users are quiescent and the nodes are idle. Drain waits
//! for requests, never for a job to finish.

use std::sync::Arc;

use super::Node;
use super::graph::Graph;
use super::parents::DrainParent;
use crate::error::{Error, Result};

/// What one drained section quiesced, so that its end undoes exactly that.
pub struct DrainSection {
    parents: Vec<Arc<dyn DrainParent>>,
}

impl Graph {
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
        let mut parents: Vec<Arc<dyn DrainParent>> = Vec::new();
        for n in &nodes {
            for p in n.drain_parents() {
                // A job draining its own nodes (mirror before completing)
                // is not quiesced by it: it would wait for itself.
                if p.is_current() || parents.iter().any(|x| x.id() == p.id()) {
                    continue;
                }
                parents.push(p);
            }
        }
        // All stop first, then wait for each: one that waits for another's
        // requests (a job for its guest's writes) finds it stopped already.
        for p in &parents {
            p.drained_begin();
        }
        for p in &parents {
            p.drained_wait();
        }
        for n in &nodes {
            n.wait_idle();
        }
        DrainSection { parents }
    }

    /// End a drained section.
    pub fn drained_end(&self, s: DrainSection) {
        for p in &s.parents {
            p.drained_end();
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
pub(super) fn subtree(node: &Arc<Node>) -> Vec<Arc<Node>> {
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
