//! QMP `transaction` (QEMU's `qmp_transaction`): several actions as one,
//! all or nothing. Every action is *prepared* in order inside one drained
//! section (no guest request runs in between, so a bitmap added and a
//! backup started together see the same point in time); the first failure
//! undoes what the earlier ones did, in reverse order, and is the only
//! error returned. When all prepared, they *commit*, also in reverse order
//! (QEMU keeps its actions in a list it prepends to): a backup's job is
//! created in prepare and started in commit, so the jobs of a transaction
//! start last first, as QEMU's do.
//!
//! `completion-mode: grouped` puts every job of the transaction in one job
//! transaction: one failing cancels the others, and none completes before
//! all are done. Only backups support it; any other action refuses it.
//!
//! The single commands (`block-dirty-bitmap-add`, `blockdev-backup`, …) are
//! one action prepared and committed at once.

use std::sync::Arc;

use crate::bitmap::DirtyBitmap;
use crate::block::dirty_bitmap::{self as named, BdrvDirtyBitmap, BitmapCheck, BitmapRef};
use crate::block::graph::Graph;
use crate::block::snapshot::{self, SnapshotSync};
use crate::block_jobs::backup::{self, BackupOptions};
use crate::engine::{Engine, Job, JobTxn};
use crate::error::{Error, Result};
use crate::qapi::qapi_enum;

qapi_enum! {
    /// How the jobs of a transaction complete (QEMU's
    /// `ActionCompletionMode`).
    pub enum ActionCompletionMode {
        /// Each job on its own.
        Individual = "individual",
        /// All jobs as one: one failing cancels the others.
        Grouped = "grouped",
    }
}

/// One action of a transaction, with its command's arguments.
#[derive(Debug, Clone)]
pub enum Action {
    /// `abort`: fails, undoing the actions before it.
    Abort,
    /// `block-dirty-bitmap-add`.
    BitmapAdd {
        /// The node.
        node: String,
        /// The new bitmap's name.
        name: String,
        /// Bytes per bit (None: the node's default).
        granularity: Option<u32>,
        /// Stored in the image.
        persistent: Option<bool>,
        /// Created not recording.
        disabled: Option<bool>,
    },
    /// `block-dirty-bitmap-remove`.
    BitmapRemove {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// `block-dirty-bitmap-clear`.
    BitmapClear {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
    },
    /// `block-dirty-bitmap-enable` (true) or `-disable` (false).
    BitmapRecording {
        /// The node.
        node: String,
        /// The bitmap.
        name: String,
        /// Enable (else disable).
        enable: bool,
    },
    /// `block-dirty-bitmap-merge`.
    BitmapMerge {
        /// The target's node.
        node: String,
        /// The target bitmap.
        target: String,
        /// The sources.
        bitmaps: Vec<BitmapRef>,
    },
    /// `blockdev-backup`.
    BlockdevBackup(BackupOptions),
    /// `blockdev-snapshot`: `overlay` goes above `node`.
    BlockdevSnapshot {
        /// The node to snapshot.
        node: String,
        /// The (opened, backing-less) overlay node.
        overlay: String,
    },
    /// `blockdev-snapshot-sync`.
    BlockdevSnapshotSync(SnapshotSync),
}

impl Action {
    /// The action's QAPI name.
    pub fn kind(&self) -> &'static str {
        match self {
            Action::Abort => "abort",
            Action::BitmapAdd { .. } => "block-dirty-bitmap-add",
            Action::BitmapRemove { .. } => "block-dirty-bitmap-remove",
            Action::BitmapClear { .. } => "block-dirty-bitmap-clear",
            Action::BitmapRecording { enable: true, .. } => "block-dirty-bitmap-enable",
            Action::BitmapRecording { enable: false, .. } => "block-dirty-bitmap-disable",
            Action::BitmapMerge { .. } => "block-dirty-bitmap-merge",
            Action::BlockdevBackup(_) => "blockdev-backup",
            Action::BlockdevSnapshot { .. } => "blockdev-snapshot",
            Action::BlockdevSnapshotSync(_) => "blockdev-snapshot-sync",
        }
    }
}

/// What a prepared action does when the transaction ends.
enum Prepared {
    /// Undo on abort by running this.
    Undo(Box<dyn FnOnce() + Send>),
    /// A bitmap hidden (busy) until commit removes it.
    Remove(Arc<Graph>, String, String, Arc<BdrvDirtyBitmap>),
    /// A created job: started on commit, cancelled on abort.
    Job(Arc<Job>),
    /// A snapshot: kept on commit, undone on abort.
    Snapshot(snapshot::Appended),
}

impl Prepared {
    fn commit(self) -> Result<()> {
        match self {
            Prepared::Undo(_) | Prepared::Snapshot(_) => Ok(()),
            Prepared::Remove(g, node, name, b) => {
                b.set_busy(false);
                named::remove(&g, &node, &name)
            }
            Prepared::Job(j) => j.start(),
        }
    }

    fn abort(self) {
        match self {
            Prepared::Undo(f) => f(),
            Prepared::Remove(_, _, _, b) => b.set_busy(false),
            // QEMU's job_cancel_sync of a job that never ran: it goes to
            // aborting, concluded and null, cleaning up its filter.
            Prepared::Job(j) => {
                let _ = j.user_cancel(true);
                let _ = j.wait_completed();
            }
            Prepared::Snapshot(s) => s.undo(),
        }
    }
}

/// A copy of a bitmap's bits, to put back on abort.
fn saved_bits(b: &BdrvDirtyBitmap) -> Result<DirtyBitmap> {
    let copy = DirtyBitmap::new(b.bits().size(), b.bits().granularity())?;
    copy.merge_from(b.bits());
    Ok(copy)
}

fn restore_bits(b: Arc<BdrvDirtyBitmap>, saved: DirtyBitmap) -> Prepared {
    Prepared::Undo(Box::new(move || {
        b.bits().clear();
        b.bits().merge_from(&saved);
    }))
}

fn prepare(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    action: Action,
    txn: Option<&Arc<JobTxn>>,
) -> Result<Prepared> {
    Ok(match action {
        Action::Abort => return Err(Error::generic("Transaction aborted using Abort action")),
        Action::BitmapAdd {
            node,
            name,
            granularity,
            persistent,
            disabled,
        } => {
            named::add(graph, &node, &name, granularity, persistent, disabled)?;
            let g = graph.clone();
            Prepared::Undo(Box::new(move || {
                let _ = named::remove(&g, &node, &name);
            }))
        }
        Action::BitmapRemove { node, name } => {
            let (_, b) = named::lookup(graph, &node, &name)?;
            b.check(BitmapCheck::Remove)?;
            // Hidden from the other actions and commands until the end.
            b.set_busy(true);
            Prepared::Remove(graph.clone(), node, name, b)
        }
        Action::BitmapClear { node, name } => {
            let (_, b) = named::lookup(graph, &node, &name)?;
            b.check(BitmapCheck::Default)?;
            let saved = saved_bits(&b)?;
            named::clear(graph, &node, &name)?;
            restore_bits(b, saved)
        }
        Action::BitmapRecording { node, name, enable } => {
            let (_, b) = named::lookup(graph, &node, &name)?;
            let was = b.is_recording();
            named::set_recording(graph, &node, &name, enable)?;
            Prepared::Undo(Box::new(move || b.set_recording(was)))
        }
        Action::BitmapMerge {
            node,
            target,
            bitmaps,
        } => {
            let (_, b) = named::lookup(graph, &node, &target)?;
            let saved = saved_bits(&b)?;
            named::merge(graph, &node, &target, &bitmaps)?;
            restore_bits(b, saved)
        }
        Action::BlockdevBackup(o) => {
            Prepared::Job(backup::backup_create(graph, engine, o, txn.cloned())?)
        }
        Action::BlockdevSnapshot { node, overlay } => {
            Prepared::Snapshot(snapshot::blockdev_snapshot(graph, &node, &overlay)?)
        }
        Action::BlockdevSnapshotSync(o) => {
            Prepared::Snapshot(snapshot::blockdev_snapshot_sync(graph, &o)?)
        }
    })
}

/// Run `actions` as one transaction (see the module doc).
pub fn transaction(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    actions: Vec<Action>,
    mode: ActionCompletionMode,
) -> Result<()> {
    if mode == ActionCompletionMode::Grouped
        && let Some(a) = actions
            .iter()
            .find(|a| !matches!(a, Action::BlockdevBackup(_)))
    {
        return Err(Error::generic(format!(
            "Action '{}' does not support transaction property completion-mode = {mode}",
            a.kind()
        )));
    }
    let txn = (mode == ActionCompletionMode::Grouped).then(|| JobTxn::new(engine));
    graph.drain_all_begin();
    let r = run(graph, engine, actions, txn.as_ref());
    let _ = graph.drain_all_end();
    r
}

/// One command on its own: prepare and commit.
pub fn single(graph: &Arc<Graph>, engine: &Arc<Engine>, action: Action) -> Result<()> {
    prepare(graph, engine, action, None)?.commit()
}

fn run(
    graph: &Arc<Graph>,
    engine: &Arc<Engine>,
    actions: Vec<Action>,
    txn: Option<&Arc<JobTxn>>,
) -> Result<()> {
    let mut done = Vec::with_capacity(actions.len());
    for a in actions {
        match prepare(graph, engine, a, txn) {
            Ok(p) => done.push(p),
            Err(e) => {
                for p in done.into_iter().rev() {
                    p.abort();
                }
                return Err(e);
            }
        }
    }
    // Commits cannot fail in QEMU; ours can only where a job cannot start
    // (no thread): report the first such error after committing the rest.
    let mut first = None;
    for p in done.into_iter().rev() {
        if let Err(e) = p.commit() {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}
