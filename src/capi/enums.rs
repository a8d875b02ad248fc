//! Enum constants with QEMU's QAPI values in QEMU's order, and their
//! wire strings. C sees plain `int32_t` values (`#define`s), so an invalid
//! value from C is an error, never undefined behaviour. A unit test checks
//! every constant against the Rust enums.

use std::ffi::{CString, c_char};
use std::sync::LazyLock;

use crate::error::ErrorClass;
use crate::qapi::{
    BlockDeviceIoStatus, BlockErrorAction, BlockdevOnError, IoOperationType, JobStatus, JobType,
    JobVerb,
};
// ---- ErrorClass ----
/// `GenericError`
pub const BJ_ERROR_CLASS_GENERIC_ERROR: i32 = 0;
/// `CommandNotFound`
pub const BJ_ERROR_CLASS_COMMAND_NOT_FOUND: i32 = 1;
/// `DeviceNotActive`
pub const BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE: i32 = 2;
/// `DeviceNotFound`
pub const BJ_ERROR_CLASS_DEVICE_NOT_FOUND: i32 = 3;
/// `KVMMissingCap`
pub const BJ_ERROR_CLASS_KVM_MISSING_CAP: i32 = 4;
// ---- BlockdevOnError ----
/// `report`
pub const BJ_BLOCKDEV_ON_ERROR_REPORT: i32 = 0;
/// `ignore`
pub const BJ_BLOCKDEV_ON_ERROR_IGNORE: i32 = 1;
/// `enospc`
pub const BJ_BLOCKDEV_ON_ERROR_ENOSPC: i32 = 2;
/// `stop`
pub const BJ_BLOCKDEV_ON_ERROR_STOP: i32 = 3;
/// `auto`
pub const BJ_BLOCKDEV_ON_ERROR_AUTO: i32 = 4;
// ---- BlockErrorAction ----
/// `ignore`
pub const BJ_BLOCK_ERROR_ACTION_IGNORE: i32 = 0;
/// `report`
pub const BJ_BLOCK_ERROR_ACTION_REPORT: i32 = 1;
/// `stop`
pub const BJ_BLOCK_ERROR_ACTION_STOP: i32 = 2;
// ---- BlockDeviceIoStatus ----
/// `ok`
pub const BJ_BLOCK_DEVICE_IO_STATUS_OK: i32 = 0;
/// `failed`
pub const BJ_BLOCK_DEVICE_IO_STATUS_FAILED: i32 = 1;
/// `nospace`
pub const BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE: i32 = 2;
// ---- IoOperationType ----
/// `read`
pub const BJ_IO_OPERATION_TYPE_READ: i32 = 0;
/// `write`
pub const BJ_IO_OPERATION_TYPE_WRITE: i32 = 1;
// ---- JobStatus ----
/// `undefined`
pub const BJ_JOB_STATUS_UNDEFINED: i32 = 0;
/// `created`
pub const BJ_JOB_STATUS_CREATED: i32 = 1;
/// `running`
pub const BJ_JOB_STATUS_RUNNING: i32 = 2;
/// `paused`
pub const BJ_JOB_STATUS_PAUSED: i32 = 3;
/// `ready`
pub const BJ_JOB_STATUS_READY: i32 = 4;
/// `standby`
pub const BJ_JOB_STATUS_STANDBY: i32 = 5;
/// `waiting`
pub const BJ_JOB_STATUS_WAITING: i32 = 6;
/// `pending`
pub const BJ_JOB_STATUS_PENDING: i32 = 7;
/// `aborting`
pub const BJ_JOB_STATUS_ABORTING: i32 = 8;
/// `concluded`
pub const BJ_JOB_STATUS_CONCLUDED: i32 = 9;
/// `null`
pub const BJ_JOB_STATUS_NULL: i32 = 10;
// ---- JobVerb ----
/// `cancel`
pub const BJ_JOB_VERB_CANCEL: i32 = 0;
/// `pause`
pub const BJ_JOB_VERB_PAUSE: i32 = 1;
/// `resume`
pub const BJ_JOB_VERB_RESUME: i32 = 2;
/// `set-speed`
pub const BJ_JOB_VERB_SET_SPEED: i32 = 3;
/// `complete`
pub const BJ_JOB_VERB_COMPLETE: i32 = 4;
/// `dismiss`
pub const BJ_JOB_VERB_DISMISS: i32 = 5;
/// `finalize`
pub const BJ_JOB_VERB_FINALIZE: i32 = 6;
/// `change`
pub const BJ_JOB_VERB_CHANGE: i32 = 7;
// ---- JobType ----
/// `commit`
pub const BJ_JOB_TYPE_COMMIT: i32 = 0;
/// `stream`
pub const BJ_JOB_TYPE_STREAM: i32 = 1;
/// `mirror`
pub const BJ_JOB_TYPE_MIRROR: i32 = 2;
/// `backup`
pub const BJ_JOB_TYPE_BACKUP: i32 = 3;
/// `create`
pub const BJ_JOB_TYPE_CREATE: i32 = 4;
/// `amend`
pub const BJ_JOB_TYPE_AMEND: i32 = 5;
/// `snapshot-load`
pub const BJ_JOB_TYPE_SNAPSHOT_LOAD: i32 = 6;
/// `snapshot-save`
pub const BJ_JOB_TYPE_SNAPSHOT_SAVE: i32 = 7;
/// `snapshot-delete`
pub const BJ_JOB_TYPE_SNAPSHOT_DELETE: i32 = 8;
// ---- MirrorSyncMode ----
/// `top`
pub const BJ_MIRROR_SYNC_MODE_TOP: i32 = 0;
/// `full`
pub const BJ_MIRROR_SYNC_MODE_FULL: i32 = 1;
/// `none`
pub const BJ_MIRROR_SYNC_MODE_NONE: i32 = 2;
/// `incremental` (backup only; mirror refuses it)
pub const BJ_MIRROR_SYNC_MODE_INCREMENTAL: i32 = 3;
/// `bitmap` (backup only; mirror refuses it)
pub const BJ_MIRROR_SYNC_MODE_BITMAP: i32 = 4;
// ---- MirrorCopyMode ----
/// `background`
pub const BJ_MIRROR_COPY_MODE_BACKGROUND: i32 = 0;
/// `write-blocking`
pub const BJ_MIRROR_COPY_MODE_WRITE_BLOCKING: i32 = 1;
// ---- BitmapSyncMode ----
/// `on-success`
pub const BJ_BITMAP_SYNC_MODE_ON_SUCCESS: i32 = 0;
/// `never`
pub const BJ_BITMAP_SYNC_MODE_NEVER: i32 = 1;
/// `always`
pub const BJ_BITMAP_SYNC_MODE_ALWAYS: i32 = 2;
// ---- ActionCompletionMode ----
/// `individual`
pub const BJ_ACTION_COMPLETION_MODE_INDIVIDUAL: i32 = 0;
/// `grouped`
pub const BJ_ACTION_COMPLETION_MODE_GROUPED: i32 = 1;
// ---- NewImageMode ----
/// `existing`
pub const BJ_NEW_IMAGE_MODE_EXISTING: i32 = 0;
/// `absolute-paths`
pub const BJ_NEW_IMAGE_MODE_ABSOLUTE_PATHS: i32 = 1;
// ---- BlockExportRemoveMode ----
/// `safe`
pub const BJ_BLOCK_EXPORT_REMOVE_MODE_SAFE: i32 = 0;
/// `hard`
pub const BJ_BLOCK_EXPORT_REMOVE_MODE_HARD: i32 = 1;
// ---- QCryptoTLSCredsEndpoint ----
/// `client`
pub const BJ_QCRYPTO_TLS_CREDS_ENDPOINT_CLIENT: i32 = 0;
/// `server`
pub const BJ_QCRYPTO_TLS_CREDS_ENDPOINT_SERVER: i32 = 1;
// ---- (event kind) ----
/// `JOB_STATUS_CHANGE`
pub const BJ_EVENT_JOB_STATUS_CHANGE: i32 = 0;
/// `BLOCK_JOB_READY`
pub const BJ_EVENT_BLOCK_JOB_READY: i32 = 1;
/// `BLOCK_JOB_PENDING`
pub const BJ_EVENT_BLOCK_JOB_PENDING: i32 = 2;
/// `BLOCK_JOB_COMPLETED`
pub const BJ_EVENT_BLOCK_JOB_COMPLETED: i32 = 3;
/// `BLOCK_JOB_CANCELLED`
pub const BJ_EVENT_BLOCK_JOB_CANCELLED: i32 = 4;
/// `BLOCK_JOB_ERROR`
pub const BJ_EVENT_BLOCK_JOB_ERROR: i32 = 5;
/// `BLOCK_IO_ERROR`
pub const BJ_EVENT_BLOCK_IO_ERROR: i32 = 6;
/// `BLOCK_EXPORT_DELETED`
pub const BJ_EVENT_BLOCK_EXPORT_DELETED: i32 = 7;

/// Block-status flag: data is stored for the range.
pub const BJ_BLOCK_DATA: i32 = 1;
/// Block-status flag: the range reads as zeroes.
pub const BJ_BLOCK_ZERO: i32 = 2;
/// Block-status flag: this layer decides the content.
pub const BJ_BLOCK_ALLOCATED: i32 = 4;

/// Job creation flag: internal job (no id, no events).
pub const BJ_JOB_INTERNAL: i32 = 1;
/// Job creation flag: wait for finalize (`auto-finalize: false`).
pub const BJ_JOB_MANUAL_FINALIZE: i32 = 2;
/// Job creation flag: wait for dismiss (`auto-dismiss: false`).
pub const BJ_JOB_MANUAL_DISMISS: i32 = 4;

fn table(names: Vec<&'static str>) -> Vec<CString> {
    names
        .into_iter()
        .map(|s| CString::new(s).expect("enum names have no NUL"))
        .collect()
}

fn lookup(t: &[CString], v: i32) -> *const c_char {
    usize::try_from(v)
        .ok()
        .and_then(|i| t.get(i))
        .map_or(std::ptr::null(), |c| c.as_ptr())
}

/// QAPI name of a `BJ_BLOCKDEV_ON_ERROR_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_blockdev_on_error_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(BlockdevOnError::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}
/// QAPI name of a `BJ_BLOCK_ERROR_ACTION_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_block_error_action_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(BlockErrorAction::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}
/// QAPI name of a `BJ_BLOCK_DEVICE_IO_STATUS_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_block_device_io_status_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> = LazyLock::new(|| {
        table(
            BlockDeviceIoStatus::ALL
                .iter()
                .map(|v| v.as_str())
                .collect(),
        )
    });
    lookup(&T, value)
}
/// QAPI name of a `BJ_IO_OPERATION_TYPE_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_io_operation_type_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(IoOperationType::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}
/// QAPI name of a `BJ_JOB_STATUS_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_job_status_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(JobStatus::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}
/// QAPI name of a `BJ_JOB_VERB_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_job_verb_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(JobVerb::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}
/// QAPI name of a `BJ_JOB_TYPE_*` value.
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_job_type_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(JobType::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}

/// QMP name of a `BJ_ERROR_CLASS_*` value (`"GenericError"`, …).
///
/// Static string; NULL for an invalid value.
#[unsafe(no_mangle)]
pub extern "C" fn bj_error_class_str(value: i32) -> *const c_char {
    static T: LazyLock<Vec<CString>> =
        LazyLock::new(|| table(ErrorClass::ALL.iter().map(|v| v.as_str()).collect()));
    lookup(&T, value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qapi::{MirrorCopyMode, MirrorSyncMode};
    use std::ffi::CStr;

    fn s(p: *const c_char) -> &'static str {
        assert!(!p.is_null());
        // SAFETY: the pointers come from the static tables above.
        unsafe { CStr::from_ptr(p) }.to_str().unwrap()
    }

    #[test]
    fn mirror_constants_match_the_rust_enums() {
        let sync = [
            (BJ_MIRROR_SYNC_MODE_TOP, "top"),
            (BJ_MIRROR_SYNC_MODE_FULL, "full"),
            (BJ_MIRROR_SYNC_MODE_NONE, "none"),
            (BJ_MIRROR_SYNC_MODE_INCREMENTAL, "incremental"),
            (BJ_MIRROR_SYNC_MODE_BITMAP, "bitmap"),
        ];
        for (v, name) in sync {
            assert_eq!(MirrorSyncMode::from_index(v).unwrap().as_str(), name);
        }
        assert_eq!(MirrorSyncMode::ALL.len(), sync.len());
        let copy = [
            (BJ_MIRROR_COPY_MODE_BACKGROUND, "background"),
            (BJ_MIRROR_COPY_MODE_WRITE_BLOCKING, "write-blocking"),
        ];
        for (v, name) in copy {
            assert_eq!(MirrorCopyMode::from_index(v).unwrap().as_str(), name);
        }
        assert_eq!(MirrorCopyMode::ALL.len(), copy.len());
    }

    #[test]
    fn backup_and_transaction_constants_match_the_rust_enums() {
        use crate::block::snapshot::NewImageMode;
        use crate::qapi::BitmapSyncMode;
        use crate::transaction::ActionCompletionMode;
        let bitmap = [
            (BJ_BITMAP_SYNC_MODE_ON_SUCCESS, "on-success"),
            (BJ_BITMAP_SYNC_MODE_NEVER, "never"),
            (BJ_BITMAP_SYNC_MODE_ALWAYS, "always"),
        ];
        for (v, name) in bitmap {
            assert_eq!(BitmapSyncMode::from_index(v).unwrap().as_str(), name);
        }
        assert_eq!(BitmapSyncMode::ALL.len(), bitmap.len());
        let mode = [
            (BJ_ACTION_COMPLETION_MODE_INDIVIDUAL, "individual"),
            (BJ_ACTION_COMPLETION_MODE_GROUPED, "grouped"),
        ];
        for (v, name) in mode {
            assert_eq!(ActionCompletionMode::from_index(v).unwrap().as_str(), name);
        }
        assert_eq!(ActionCompletionMode::ALL.len(), mode.len());
        let image = [
            (BJ_NEW_IMAGE_MODE_EXISTING, "existing"),
            (BJ_NEW_IMAGE_MODE_ABSOLUTE_PATHS, "absolute-paths"),
        ];
        for (v, name) in image {
            assert_eq!(NewImageMode::from_index(v).unwrap().as_str(), name);
        }
        assert_eq!(NewImageMode::ALL.len(), image.len());
    }

    #[test]
    fn constants_match_the_rust_enums() {
        assert_eq!(
            ErrorClass::ALL[BJ_ERROR_CLASS_GENERIC_ERROR as usize].as_str(),
            "GenericError"
        );
        assert_eq!(
            ErrorClass::ALL[BJ_ERROR_CLASS_COMMAND_NOT_FOUND as usize].as_str(),
            "CommandNotFound"
        );
        assert_eq!(
            ErrorClass::ALL[BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE as usize].as_str(),
            "DeviceNotActive"
        );
        assert_eq!(
            ErrorClass::ALL[BJ_ERROR_CLASS_DEVICE_NOT_FOUND as usize].as_str(),
            "DeviceNotFound"
        );
        assert_eq!(
            ErrorClass::ALL[BJ_ERROR_CLASS_KVM_MISSING_CAP as usize].as_str(),
            "KVMMissingCap"
        );
        assert_eq!(ErrorClass::ALL.len(), 5);
        assert_eq!(
            BlockdevOnError::from_index(BJ_BLOCKDEV_ON_ERROR_REPORT)
                .unwrap()
                .as_str(),
            "report"
        );
        assert_eq!(
            BlockdevOnError::from_index(BJ_BLOCKDEV_ON_ERROR_IGNORE)
                .unwrap()
                .as_str(),
            "ignore"
        );
        assert_eq!(
            BlockdevOnError::from_index(BJ_BLOCKDEV_ON_ERROR_ENOSPC)
                .unwrap()
                .as_str(),
            "enospc"
        );
        assert_eq!(
            BlockdevOnError::from_index(BJ_BLOCKDEV_ON_ERROR_STOP)
                .unwrap()
                .as_str(),
            "stop"
        );
        assert_eq!(
            BlockdevOnError::from_index(BJ_BLOCKDEV_ON_ERROR_AUTO)
                .unwrap()
                .as_str(),
            "auto"
        );
        assert_eq!(BlockdevOnError::ALL.len(), 5);
        assert_eq!(
            BlockErrorAction::from_index(BJ_BLOCK_ERROR_ACTION_IGNORE)
                .unwrap()
                .as_str(),
            "ignore"
        );
        assert_eq!(
            BlockErrorAction::from_index(BJ_BLOCK_ERROR_ACTION_REPORT)
                .unwrap()
                .as_str(),
            "report"
        );
        assert_eq!(
            BlockErrorAction::from_index(BJ_BLOCK_ERROR_ACTION_STOP)
                .unwrap()
                .as_str(),
            "stop"
        );
        assert_eq!(BlockErrorAction::ALL.len(), 3);
        assert_eq!(
            BlockDeviceIoStatus::from_index(BJ_BLOCK_DEVICE_IO_STATUS_OK)
                .unwrap()
                .as_str(),
            "ok"
        );
        assert_eq!(
            BlockDeviceIoStatus::from_index(BJ_BLOCK_DEVICE_IO_STATUS_FAILED)
                .unwrap()
                .as_str(),
            "failed"
        );
        assert_eq!(
            BlockDeviceIoStatus::from_index(BJ_BLOCK_DEVICE_IO_STATUS_NOSPACE)
                .unwrap()
                .as_str(),
            "nospace"
        );
        assert_eq!(BlockDeviceIoStatus::ALL.len(), 3);
        assert_eq!(
            IoOperationType::from_index(BJ_IO_OPERATION_TYPE_READ)
                .unwrap()
                .as_str(),
            "read"
        );
        assert_eq!(
            IoOperationType::from_index(BJ_IO_OPERATION_TYPE_WRITE)
                .unwrap()
                .as_str(),
            "write"
        );
        assert_eq!(IoOperationType::ALL.len(), 2);
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_UNDEFINED)
                .unwrap()
                .as_str(),
            "undefined"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_CREATED)
                .unwrap()
                .as_str(),
            "created"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_RUNNING)
                .unwrap()
                .as_str(),
            "running"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_PAUSED)
                .unwrap()
                .as_str(),
            "paused"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_READY).unwrap().as_str(),
            "ready"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_STANDBY)
                .unwrap()
                .as_str(),
            "standby"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_WAITING)
                .unwrap()
                .as_str(),
            "waiting"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_PENDING)
                .unwrap()
                .as_str(),
            "pending"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_ABORTING)
                .unwrap()
                .as_str(),
            "aborting"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_CONCLUDED)
                .unwrap()
                .as_str(),
            "concluded"
        );
        assert_eq!(
            JobStatus::from_index(BJ_JOB_STATUS_NULL).unwrap().as_str(),
            "null"
        );
        assert_eq!(JobStatus::ALL.len(), 11);
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_CANCEL).unwrap().as_str(),
            "cancel"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_PAUSE).unwrap().as_str(),
            "pause"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_RESUME).unwrap().as_str(),
            "resume"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_SET_SPEED).unwrap().as_str(),
            "set-speed"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_COMPLETE).unwrap().as_str(),
            "complete"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_DISMISS).unwrap().as_str(),
            "dismiss"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_FINALIZE).unwrap().as_str(),
            "finalize"
        );
        assert_eq!(
            JobVerb::from_index(BJ_JOB_VERB_CHANGE).unwrap().as_str(),
            "change"
        );
        assert_eq!(JobVerb::ALL.len(), 8);
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_COMMIT).unwrap().as_str(),
            "commit"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_STREAM).unwrap().as_str(),
            "stream"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_MIRROR).unwrap().as_str(),
            "mirror"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_BACKUP).unwrap().as_str(),
            "backup"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_CREATE).unwrap().as_str(),
            "create"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_AMEND).unwrap().as_str(),
            "amend"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_SNAPSHOT_LOAD)
                .unwrap()
                .as_str(),
            "snapshot-load"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_SNAPSHOT_SAVE)
                .unwrap()
                .as_str(),
            "snapshot-save"
        );
        assert_eq!(
            JobType::from_index(BJ_JOB_TYPE_SNAPSHOT_DELETE)
                .unwrap()
                .as_str(),
            "snapshot-delete"
        );
        assert_eq!(JobType::ALL.len(), 9);
    }

    #[test]
    fn strings() {
        assert_eq!(s(bj_job_status_str(BJ_JOB_STATUS_STANDBY)), "standby");
        assert_eq!(s(bj_job_verb_str(BJ_JOB_VERB_SET_SPEED)), "set-speed");
        assert_eq!(
            s(bj_error_class_str(BJ_ERROR_CLASS_DEVICE_NOT_ACTIVE)),
            "DeviceNotActive"
        );
        assert!(bj_job_status_str(11).is_null());
        assert!(bj_block_error_action_str(-1).is_null());
    }
}
