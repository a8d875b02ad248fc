//! Who uses a node besides the nodes above it: guest backends, and users
//! the block layer knows only through [`NodeUser`] (jobs; QEMU's
//! `BdrvChildClass` of a job's child, `child_job`).
//!
//! Drained sections quiesce both through [`DrainParent`]; the block layer
//! reads users' op blockers and never knows what a job is. Users are attached with a
//! [`UserKind`] and stay at their node when parents move (QEMU's
//! `stay_at_node`): replacing a node or inserting a filter moves backends
//! and node edges, never users.

use std::sync::{Arc, Weak};

use super::Node;
use super::backend::BackendShared;
use super::perm::Perms;
use crate::error::{Error, Result};

/// A parent a drained section quiesces (QEMU's `BdrvChildClass`
/// `drained_begin`/`drained_poll`/`drained_end`): guest backends and users.
pub trait DrainParent: Send + Sync {
    /// Identity: parents with equal ids are one parent attached to several
    /// nodes (a drain quiesces it once).
    fn id(&self) -> usize;
    /// Stop sending new requests (QEMU's `drained_begin`).
    fn drained_begin(&self);
    /// Wait until the requests it sent are done and it sends none
    /// (QEMU's `drained_poll` loop).
    fn drained_wait(&self);
    /// Go on (QEMU's `drained_end`).
    fn drained_end(&self);
    /// The calling thread is the parent's own: it drains its own nodes and
    /// must not wait for itself.
    fn is_current(&self) -> bool {
        false
    }
}

/// A user of nodes (a job) that the block layer quiesces and that blocks
/// other operations on the nodes it uses.
pub trait NodeUser: DrainParent {
    /// Why operations on its nodes are refused (QEMU's op blocker text,
    /// e.g. `block device is in use by block job: mirror`).
    fn blocker(&self) -> String;
}

/// The operations QEMU's op blockers guard (`BlockOpType`), for the ones
/// our commands check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockOp {
    /// The source of a mirror.
    MirrorSource,
    /// The target of a mirror.
    MirrorTarget,
    /// The node a mirror's `replaces` names.
    Replace,
    /// A layer a stream copies from or into.
    Stream,
    /// The device of a commit.
    CommitSource,
    /// A layer a commit merges, and the overlay it relinks.
    CommitTarget,
    /// `blockdev-del`.
    DriveDel,
    /// The source of a backup.
    BackupSource,
    /// The target of a backup.
    BackupTarget,
    /// The node an external snapshot goes above.
    ExternalSnapshot,
}

impl BlockOp {
    /// Whether a node's being the backing node of another node blocks the
    /// operation (QEMU's backing blocker leaves stream, commit and a
    /// backup's target free).
    pub fn blocked_by_backing(self) -> bool {
        !matches!(
            self,
            BlockOp::Stream | BlockOp::CommitTarget | BlockOp::BackupTarget
        )
    }
}

/// How a user uses a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserKind {
    /// It blocks other operations on the node (a job's own nodes, its
    /// filter and source).
    Blocker,
    /// It also does I/O through a backend of its own on the node (a job's
    /// target): `blockdev-del` says the node is in use.
    Backend,
}

/// The non-node parents of one node.
#[derive(Default)]
pub(crate) struct Parents {
    backends: Vec<Weak<BackendShared>>,
    users: Vec<(Arc<dyn NodeUser>, UserKind, Perms)>,
}

impl Node {
    pub(crate) fn attach_backend(&self, b: &Arc<BackendShared>) {
        let mut p = self.parents.lock();
        p.backends.retain(|w| w.strong_count() > 0);
        p.backends.push(Arc::downgrade(b));
    }

    pub(crate) fn detach_backend(&self, b: &Arc<BackendShared>) {
        self.parents
            .lock()
            .backends
            .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(b)));
    }

    /// The guest backends attached to this node.
    pub(crate) fn parent_backends(&self) -> Vec<Arc<BackendShared>> {
        let p = self.parents.lock();
        p.backends.iter().filter_map(Weak::upgrade).collect()
    }

    /// Record that `user` uses this node (QEMU's `block_job_add_bdrv`):
    /// drains quiesce it, it blocks other operations on the node, and it
    /// takes and shares `perms` on it. The permissions count from the
    /// next [`super::graph::Graph::refresh_perms`], which the caller runs
    /// (and undoes this attach if it fails).
    pub fn attach_user(&self, user: Arc<dyn NodeUser>, kind: UserKind, perms: Perms) {
        self.parents.lock().users.push((user, kind, perms));
    }

    /// What the users and guest backends of this node take and share.
    pub(crate) fn non_node_parent_perms(&self) -> Vec<Perms> {
        let p = self.parents.lock();
        let backends = p
            .backends
            .iter()
            .filter_map(Weak::upgrade)
            .map(|b| b.perms(self));
        backends.chain(p.users.iter().map(|u| u.2)).collect()
    }

    /// The user with this id no longer uses the node.
    pub fn detach_user(&self, id: usize) {
        self.parents.lock().users.retain(|(u, _, _)| u.id() != id);
    }

    /// Everything a drain of this node quiesces: its backends and users.
    pub(crate) fn drain_parents(&self) -> Vec<Arc<dyn DrainParent>> {
        let p = self.parents.lock();
        let backends = p
            .backends
            .iter()
            .filter_map(Weak::upgrade)
            .map(|b| b as Arc<dyn DrainParent>);
        let users = p
            .users
            .iter()
            .map(|(u, _, _)| u.clone() as Arc<dyn DrainParent>);
        backends.chain(users).collect()
    }

    /// The users of this node.
    pub fn users(&self) -> Vec<Arc<dyn NodeUser>> {
        self.parents
            .lock()
            .users
            .iter()
            .map(|(u, _, _)| u.clone())
            .collect()
    }

    /// Some user does I/O on the node through a backend of its own
    /// (QEMU's `bdrv_has_blk` for a job's target).
    pub fn has_backend_user(&self) -> bool {
        self.parents
            .lock()
            .users
            .iter()
            .any(|(_, k, _)| *k == UserKind::Backend)
    }

    /// The op blockers of this node's users (jobs block every operation):
    /// refused while any user blocks it, with the first one's reason. See
    /// [`super::graph::Graph::check_op`] for all of QEMU's blockers.
    pub fn check_not_busy(&self) -> Result<()> {
        let first = self.parents.lock().users.first().map(|(u, _, _)| u.clone());
        match first {
            Some(u) => Err(Error::generic(format!(
                "Node '{}' is busy: {}",
                self.name(),
                u.blocker()
            ))),
            None => Ok(()),
        }
    }
}
