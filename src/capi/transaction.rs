//! QMP `transaction` for C: actions collected in a `BjActions` list, then
//! run as one with `bj_transaction` (all or nothing; see
//! [`crate::transaction`]). Jobs a transaction starts are found by id
//! (`bj_job_find`).

use std::ffi::c_char;

use super::backup::{BjBackupOptions, backup_options};
use super::context::{BjContext, ctx_arg};
use super::mirror::enum_arg;
use super::{BjError, arg_opt_str, arg_str, ffi, ffi_void, null_arg};
use crate::block::dirty_bitmap::BitmapRef;
use crate::block::snapshot::{NewImageMode, SnapshotSync};
use crate::error::{Error, Result};
use crate::transaction::{Action, ActionCompletionMode};

/// A list of transaction actions (opaque; free with `bj_actions_free`).
pub struct BjActions {
    list: Vec<Action>,
}

/// An empty list of actions.
#[unsafe(no_mangle)]
pub extern "C" fn bj_actions_new() -> *mut BjActions {
    ffi_void(std::ptr::null_mut(), || {
        Box::into_raw(Box::new(BjActions { list: Vec::new() }))
    })
}

/// Free a list and set `*actionsp` to NULL.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_free(actionsp: *mut *mut BjActions) {
    ffi_void((), || {
        if actionsp.is_null() {
            return;
        }
        // SAFETY: pointer to the caller's handle variable.
        let slot = unsafe { &mut *actionsp };
        if !slot.is_null() {
            // SAFETY: from Box::into_raw in bj_actions_new.
            drop(unsafe { Box::from_raw(*slot) });
            *slot = std::ptr::null_mut();
        }
    })
}

/// Append `make()`'s action to the list; 0, or -errno with `*errp` set.
///
/// # Safety
/// `actions` is NULL or a live list.
unsafe fn push(
    actions: *mut BjActions,
    errp: *mut *mut BjError,
    make: impl FnOnce() -> Result<Action>,
) -> i32 {
    ffi(errp, -libc::EINVAL, || {
        if actions.is_null() {
            return Err(null_arg("actions"));
        }
        let a = make()?;
        // SAFETY: non-NULL live list, used by one thread at a time (the
        // caller's contract).
        unsafe { &mut *actions }.list.push(a);
        Ok(0)
    })
}

/// Two required strings (a node and a bitmap).
///
/// # Safety
/// Both NULL or NUL-terminated.
unsafe fn node_name(node: *const c_char, name: *const c_char) -> Result<(String, String)> {
    // SAFETY: forwarded contract.
    let n = unsafe { arg_str(node, "node") }?;
    // SAFETY: as above.
    let b = unsafe { arg_str(name, "name") }?;
    Ok((n.into(), b.into()))
}

/// Add an `abort` action: the transaction fails when it gets there.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_abort(actions: *mut BjActions, errp: *mut *mut BjError) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { push(actions, errp, || Ok(Action::Abort)) }
}

/// Add `block-dirty-bitmap-add` (`granularity` 0: the node's default).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_bitmap_add(
    actions: *mut BjActions,
    node: *const c_char,
    name: *const c_char,
    granularity: u32,
    persistent: bool,
    disabled: bool,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract; the strings are NULL or NUL-terminated.
    unsafe {
        push(actions, errp, || {
            let (node, name) = node_name(node, name)?;
            Ok(Action::BitmapAdd {
                node,
                name,
                granularity: (granularity != 0).then_some(granularity),
                persistent: Some(persistent),
                disabled: Some(disabled),
            })
        })
    }
}

/// The bitmap actions on one named bitmap.
const BITMAP_VERBS: [&str; 4] = ["remove", "clear", "enable", "disable"];

/// Add `block-dirty-bitmap-<verb>`: `verb` is `remove`, `clear`, `enable`
/// or `disable`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_bitmap(
    actions: *mut BjActions,
    verb: *const c_char,
    node: *const c_char,
    name: *const c_char,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract; the strings are NULL or NUL-terminated.
    unsafe {
        push(actions, errp, || {
            let v = arg_str(verb, "verb")?;
            let (node, name) = node_name(node, name)?;
            Ok(match v {
                "remove" => Action::BitmapRemove { node, name },
                "clear" => Action::BitmapClear { node, name },
                "enable" | "disable" => Action::BitmapRecording {
                    node,
                    name,
                    enable: v == "enable",
                },
                _ => {
                    return Err(Error::generic(format!(
                        "Invalid argument: verb '{v}' is not one of {}",
                        BITMAP_VERBS.join(", ")
                    ))
                    .with_errno(libc::EINVAL));
                }
            })
        })
    }
}

/// Add `block-dirty-bitmap-merge`: the `n` bitmaps named in `bitmaps` (of
/// `node`) are merged into `target`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_bitmap_merge(
    actions: *mut BjActions,
    node: *const c_char,
    target: *const c_char,
    bitmaps: *const *const c_char,
    n: usize,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract; `bitmaps` is NULL (with n == 0) or `n`
    // NUL-terminated strings.
    unsafe {
        push(actions, errp, || {
            let (node, target) = node_name(node, target)?;
            if bitmaps.is_null() && n > 0 {
                return Err(null_arg("bitmaps"));
            }
            let names = (0..n)
                .map(|i| arg_str(*bitmaps.add(i), "bitmaps[i]").map(|s| BitmapRef::Name(s.into())))
                .collect::<Result<Vec<_>>>()?;
            Ok(Action::BitmapMerge {
                node,
                target,
                bitmaps: names,
            })
        })
    }
}

/// Add `blockdev-backup` (`opts->txn` must be NULL: the transaction's
/// completion mode decides).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_backup(
    actions: *mut BjActions,
    opts: *const BjBackupOptions,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        push(actions, errp, || {
            let (b, txn) = backup_options(opts)?;
            if !txn.is_null() {
                return Err(Error::generic(
                    "Invalid argument: opts->txn must be NULL in a transaction",
                )
                .with_errno(libc::EINVAL));
            }
            Ok(Action::BlockdevBackup(b))
        })
    }
}

/// Add `blockdev-snapshot`: `overlay` (opened with no backing layer) goes
/// above `node`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_snapshot(
    actions: *mut BjActions,
    node: *const c_char,
    overlay: *const c_char,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        push(actions, errp, || {
            let node = arg_str(node, "node")?.to_string();
            let overlay = arg_str(overlay, "overlay")?.to_string();
            Ok(Action::BlockdevSnapshot { node, overlay })
        })
    }
}

/// Add `blockdev-snapshot-sync`: a qcow2 image at `file` over `node`
/// (created, or opened with `mode` `BJ_NEW_IMAGE_MODE_EXISTING`), opened
/// as `snapshot_node_name` and put above `node`. `format` NULL: qcow2.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_actions_snapshot_sync(
    actions: *mut BjActions,
    node: *const c_char,
    file: *const c_char,
    snapshot_node_name: *const c_char,
    format: *const c_char,
    mode: i32,
    errp: *mut *mut BjError,
) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        push(actions, errp, || {
            Ok(Action::BlockdevSnapshotSync(SnapshotSync {
                device: None,
                node_name: Some(arg_str(node, "node")?.into()),
                snapshot_file: arg_str(file, "file")?.into(),
                snapshot_node_name: arg_opt_str(snapshot_node_name, "snapshot_node_name")?
                    .map(String::from),
                format: arg_opt_str(format, "format")?.map(String::from),
                mode: enum_arg(mode, "mode", NewImageMode::from_index)?,
            }))
        })
    }
}

/// QMP `transaction`: run the actions as one (`completion_mode`:
/// `BJ_ACTION_COMPLETION_MODE_*`). On failure nothing any action did
/// remains and `*errp` holds the first failing action's error. The list is
/// not consumed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bj_transaction(
    ctx: *mut BjContext,
    actions: *const BjActions,
    completion_mode: i32,
    errp: *mut *mut BjError,
) -> bool {
    ffi(errp, false, || {
        // SAFETY: NULL or live context.
        let c = unsafe { ctx_arg(ctx) }?;
        if actions.is_null() {
            return Err(null_arg("actions"));
        }
        let mode = enum_arg(
            completion_mode,
            "completion_mode",
            ActionCompletionMode::from_index,
        )?;
        // SAFETY: non-NULL live list.
        let list = unsafe { &*actions }.list.clone();
        c.ctx.transaction(list, mode)?;
        Ok(true)
    })
}
