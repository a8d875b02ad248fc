//! Drained sections (QEMU's `bdrv_drained_begin`/`_end`): every backend
//! and user (job) that can send requests into the drained nodes is
//! quiesced — backends hold new guest requests at their gate, users are
//! asked to stop — then we wait until those backends have nothing in
//! flight, those users are quiescent and the nodes are idle. Drain waits
//! for requests, never for a job to finish.

use std::sync::Arc;

use super::Node;
use super::backend::BackendShared;
use super::graph::Graph;
use super::parents::NodeUser;
use crate::error::{Error, Result};

/// What one drained section quiesced, so that its end undoes exactly that.
pub struct DrainSection {
    users: Vec<Arc<dyn NodeUser>>,
    backends: Vec<Arc<BackendShared>>,
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
        let mut users: Vec<Arc<dyn NodeUser>> = Vec::new();
        let mut backends: Vec<Arc<BackendShared>> = Vec::new();
        for n in &nodes {
            for u in n.users() {
                // A job draining its own nodes (mirror before completing)
                // is not quiesced by it: it would wait for itself.
                if u.is_current() || users.iter().any(|x| x.id() == u.id()) {
                    continue;
                }
                users.push(u);
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
        for u in &users {
            u.drained_begin();
        }
        for b in &backends {
            b.wait_idle();
        }
        for u in &users {
            u.drained_wait();
        }
        for n in &nodes {
            n.wait_idle();
        }
        DrainSection { users, backends }
    }

    /// End a drained section.
    pub fn drained_end(&self, s: DrainSection) {
        for b in &s.backends {
            b.unquiesce();
        }
        for u in &s.users {
            u.drained_end();
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
