//! QEMU's error policies in one place: which action a failed request gets
//! (`BlockdevOnError` × read/write × errno → `BlockErrorAction`), and the
//! I/O status a `stop` leaves. Pure functions; the side effects (the event,
//! the pause, the held guest request) are the callers': the job engine for
//! a job's `on-error`/`on-source-error`/`on-target-error`
//! (`block_job_error_action`), a guest backend for its `rerror`/`werror`
//! (`blk_get_error_action`).

use crate::qapi::{BlockDeviceIoStatus, BlockErrorAction, BlockdevOnError};

/// QEMU's `block_job_error_action` mapping: `enospc` (and `auto`, which a
/// job treats the same way) stops on ENOSPC and reports anything else.
pub fn job_action(policy: BlockdevOnError, errno: i32) -> BlockErrorAction {
    match policy {
        BlockdevOnError::Enospc | BlockdevOnError::Auto => {
            if errno == libc::ENOSPC {
                BlockErrorAction::Stop
            } else {
                BlockErrorAction::Report
            }
        }
        BlockdevOnError::Stop => BlockErrorAction::Stop,
        BlockdevOnError::Report => BlockErrorAction::Report,
        BlockdevOnError::Ignore => BlockErrorAction::Ignore,
    }
}

/// QEMU's `blk_get_error_action` for a guest device: `auto` is `-drive`'s
/// default, `report` for reads and `enospc` for writes.
pub fn device_action(policy: BlockdevOnError, is_read: bool, errno: i32) -> BlockErrorAction {
    let policy = match (policy, is_read) {
        (BlockdevOnError::Auto, true) => BlockdevOnError::Report,
        (BlockdevOnError::Auto, false) => BlockdevOnError::Enospc,
        (p, _) => p,
    };
    job_action(policy, errno)
}

/// The I/O status a `stop` action leaves for this errno.
pub fn iostatus_for(errno: i32) -> BlockDeviceIoStatus {
    if errno == libc::ENOSPC {
        BlockDeviceIoStatus::Nospace
    } else {
        BlockDeviceIoStatus::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BlockErrorAction as A;
    use BlockdevOnError as P;

    #[test]
    fn job_table_is_qemus() {
        // (policy, on ENOSPC, on EIO)
        for (policy, on_enospc, on_eio) in [
            (P::Report, A::Report, A::Report),
            (P::Ignore, A::Ignore, A::Ignore),
            (P::Enospc, A::Stop, A::Report),
            (P::Auto, A::Stop, A::Report),
            (P::Stop, A::Stop, A::Stop),
        ] {
            assert_eq!(
                job_action(policy, libc::ENOSPC),
                on_enospc,
                "{policy} ENOSPC"
            );
            assert_eq!(job_action(policy, libc::EIO), on_eio, "{policy} EIO");
        }
    }

    #[test]
    fn device_table_is_qemus() {
        // (policy, read/ENOSPC, read/EIO, write/ENOSPC, write/EIO)
        for (policy, r_nospc, r_eio, w_nospc, w_eio) in [
            (P::Report, A::Report, A::Report, A::Report, A::Report),
            (P::Ignore, A::Ignore, A::Ignore, A::Ignore, A::Ignore),
            (P::Enospc, A::Stop, A::Report, A::Stop, A::Report),
            (P::Stop, A::Stop, A::Stop, A::Stop, A::Stop),
            (P::Auto, A::Report, A::Report, A::Stop, A::Report),
        ] {
            assert_eq!(
                device_action(policy, true, libc::ENOSPC),
                r_nospc,
                "{policy} read ENOSPC"
            );
            assert_eq!(
                device_action(policy, true, libc::EIO),
                r_eio,
                "{policy} read EIO"
            );
            assert_eq!(
                device_action(policy, false, libc::ENOSPC),
                w_nospc,
                "{policy} write ENOSPC"
            );
            assert_eq!(
                device_action(policy, false, libc::EIO),
                w_eio,
                "{policy} write EIO"
            );
        }
    }

    #[test]
    fn stop_leaves_nospace_or_failed() {
        assert_eq!(iostatus_for(libc::ENOSPC), BlockDeviceIoStatus::Nospace);
        assert_eq!(iostatus_for(libc::EIO), BlockDeviceIoStatus::Failed);
        assert_eq!(iostatus_for(libc::EPERM), BlockDeviceIoStatus::Failed);
    }
}
