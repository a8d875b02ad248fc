//! What every block job shares (QEMU's `blockjob.c` on top of `job.c`):
//! creating a job on a node, and the job as a user of nodes — the block
//! layer quiesces it in drained sections and reads its op blocker through
//! [`NodeUser`], without knowing what a job is.

use std::sync::{Arc, Weak};

use crate::block::graph::Graph;
use crate::block::parents::DrainParent;
use crate::block::perm::Perms;
use crate::block::{Node, NodeUser, UserKind};
use crate::engine::{
    Engine, JOB_INTERNAL, JOB_MANUAL_DISMISS, JOB_MANUAL_FINALIZE, Job, JobDriver, JobOptions,
    JobTxn,
};
use crate::error::Result;

/// A job as a user of one of its nodes.
struct JobUser(Weak<Job>);

impl DrainParent for JobUser {
    fn id(&self) -> usize {
        // Every node of one job gets a user with the job's address.
        self.0.as_ptr() as usize
    }

    fn drained_begin(&self) {
        if let Some(j) = self.0.upgrade() {
            j.engine().pause(&j);
        }
    }

    fn drained_wait(&self) {
        if let Some(j) = self.0.upgrade() {
            j.engine().wait_quiescent(&j);
        }
    }

    fn drained_end(&self) {
        if let Some(j) = self.0.upgrade() {
            j.engine().resume(&j);
        }
    }

    fn is_current(&self) -> bool {
        self.0
            .upgrade()
            .is_some_and(|j| j.engine().is_current_job(&j))
    }
}

impl NodeUser for JobUser {
    fn blocker(&self) -> String {
        match self.0.upgrade() {
            Some(j) => format!("block device is in use by block job: {}", j.job_type()),
            None => "block device is in use by a block job".to_string(),
        }
    }
}

/// A job about to be created, as a user of its nodes: it takes the job's
/// permissions before the job exists, so that a conflict (with another
/// process's locks) fails the command with nothing created, as QEMU's
/// `block_job_add_bdrv` fails `block_job_create`.
struct Reservation;

impl DrainParent for Reservation {
    fn id(&self) -> usize {
        self as *const Self as usize
    }
    fn drained_begin(&self) {}
    fn drained_wait(&self) {}
    fn drained_end(&self) {}
}

impl NodeUser for Reservation {
    fn blocker(&self) -> String {
        "block device is in use by a block job".to_string()
    }
}

/// Permissions taken for a job being created; dropping it gives them back
/// (the job's own users hold them by then).
pub struct PermReservation {
    graph: Arc<Graph>,
    users: Vec<(Arc<Node>, usize)>,
    _user: Arc<Reservation>,
}

impl Drop for PermReservation {
    fn drop(&mut self) {
        for (n, id) in self.users.drain(..) {
            n.detach_user(id);
        }
        self.graph.release_perms();
    }
}

/// Take `perms` on each node for a job about to be created, with QEMU's
/// error if another process holds a conflicting lock.
pub fn reserve_perms(graph: &Arc<Graph>, nodes: &[(&Arc<Node>, Perms)]) -> Result<PermReservation> {
    let user = Arc::new(Reservation);
    let id = user.id();
    let mut r = PermReservation {
        graph: graph.clone(),
        users: Vec::new(),
        _user: user.clone(),
    };
    for (n, p) in nodes {
        n.attach_user(user.clone(), UserKind::Blocker, *p);
        r.users.push(((*n).clone(), id));
    }
    graph.refresh_perms()?;
    Ok(r)
}

/// QEMU's `block_job_add_bdrv`: `job` uses `node` from now on until it is
/// freed — drains of the node pause the job, the job blocks other
/// operations on it, and takes and shares `perms` on it (reserved first
/// with [`reserve_perms`], so this does not fail).
pub fn add_node(job: &Arc<Job>, node: &Arc<Node>, kind: UserKind, perms: Perms) {
    let user = Arc::new(JobUser(Arc::downgrade(job)));
    let id = user.id();
    node.attach_user(user, kind, perms);
    let node = Arc::downgrade(node);
    job.on_free(move || {
        if let Some(n) = node.upgrade() {
            n.detach_user(id);
        }
    });
}

/// QEMU's `block_job_remove_all_bdrv`: `job` stops using every node now,
/// before it is freed. Mirror and active commit do it as they exit (in
/// prepare or abort, so before `BLOCK_JOB_COMPLETED`): their target can be
/// deleted as soon as the event is out, as in QEMU. What `add_node`'s
/// `on_free` would release later is then already gone. The job's
/// permissions go with its users: the lock bytes it held are dropped
/// here, so another process can take the target at once too.
pub fn remove_all_nodes(graph: &Graph, job: &Job) {
    // The id every user of this job has (see `JobUser::id`).
    let id = job as *const Job as usize;
    for n in graph.nodes() {
        n.detach_user(id);
    }
    graph.release_perms();
}

/// Create a block job on `node` (QEMU's `block_job_create`): the id
/// defaults to the node's device name; the node is the job's own (drains
/// pause the job, the job blocks the node); `speed` is checked as QEMU
/// checks it.
#[allow(clippy::too_many_arguments)] // QEMU's argument list
pub fn block_job_create(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    id: Option<&str>,
    node: Option<&Arc<Node>>,
    driver: Box<dyn JobDriver>,
    speed: i64,
    flags: u32,
    txn: Option<Arc<JobTxn>>,
) -> Result<Arc<Job>> {
    let id = match (id, node) {
        (Some(id), _) => Some(id.to_string()),
        (None, _) if flags & JOB_INTERNAL != 0 => None,
        (None, Some(n)) => Some(graph.device_name(n)),
        (None, None) => None,
    };
    let job = engine.create(
        JobOptions {
            id,
            flags,
            block: true,
            speed,
            txn,
        },
        driver,
    )?;
    // Registered first, so it runs last, after every node the job used
    // was released: implicit nodes only the job still held (the layers a
    // stream or commit cut out) leave the graph, as QEMU frees them with
    // the job's last reference.
    let g = Arc::downgrade(graph);
    job.on_free(move || {
        if let Some(g) = g.upgrade() {
            g.drop_orphans();
        }
    });
    if let Some(n) = node {
        // QEMU's block_job_create takes no permission of its own here
        // beyond what the caller reserved on the job's nodes.
        add_node(&job, n, UserKind::Blocker, Perms::NONE);
    }
    Ok(job)
}

/// `auto-finalize`/`auto-dismiss` as job flags.
pub fn job_flags(auto_finalize: bool, auto_dismiss: bool) -> u32 {
    let mut flags = 0;
    if !auto_finalize {
        flags |= JOB_MANUAL_FINALIZE;
    }
    if !auto_dismiss {
        flags |= JOB_MANUAL_DISMISS;
    }
    flags
}
