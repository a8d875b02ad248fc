//! QAPI enums and structs with QEMU's wire strings and declaration order.
//!
//! The declaration order is the C value (`BJ_<TYPE>_<VALUE>` in the header
//! and QEMU's own C enums), so `index()`/`from_index()` convert between the
//! two. Serde uses the QAPI strings. Two traps are kept visible here:
//! `BlockErrorAction` (`ignore, report, stop`) is not in the order of
//! `BlockdevOnError` (`report, ignore, enospc, stop, auto`), and `JobVerb`
//! has `dismiss` before `finalize`. Never cast one enum into another.

pub mod ids;
pub mod json;
pub mod keyval;
pub(crate) mod visitor;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// Defines a QAPI enum: variants with their wire strings, in C order.
macro_rules! qapi_enum {
    (
        $(#[$meta:meta])*
        pub enum $name:ident { $( $(#[$vmeta:meta])* $variant:ident = $wire:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $( $(#[$vmeta])* $variant ),+ }

        impl $name {
            /// Every value, in QAPI declaration order (= C value order).
            pub const ALL: &'static [$name] = &[ $( $name::$variant ),+ ];

            /// The QAPI wire string.
            pub fn as_str(self) -> &'static str {
                match self { $( $name::$variant => $wire ),+ }
            }

            /// The C value: the position in QAPI's declaration.
            pub fn index(self) -> i32 {
                Self::ALL.iter().position(|v| *v == self).expect("value is in ALL") as i32
            }

            /// The value for a C integer, if it is one.
            pub fn from_index(i: i32) -> Option<Self> {
                usize::try_from(i).ok().and_then(|i| Self::ALL.get(i).copied())
            }

            /// Parse the wire string.
            pub fn from_wire(s: &str) -> Option<Self> {
                match s { $( $wire => Some($name::$variant), )+ _ => None }
            }

            /// The QAPI type name, for error messages.
            pub const TYPE_NAME: &'static str = stringify!($name);

            /// Parse an argument named `param` with QEMU's error text.
            pub fn parse_param(param: &str, s: &str) -> Result<Self, $crate::error::Error> {
                Self::from_wire(s).ok_or_else(|| {
                    Error::generic(format!("Parameter '{param}' does not accept value '{s}'"))
                })
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::error::Error;
            /// QEMU's text for a bad enum value in an argument.
            fn from_str(s: &str) -> Result<Self, $crate::error::Error> {
                Self::parse_param(Self::TYPE_NAME, s)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                Self::from_wire(&s).ok_or_else(|| {
                    serde::de::Error::custom(format!("does not accept value '{s}'"))
                })
            }
        }
    };
}

pub(crate) use qapi_enum;

qapi_enum! {
    /// What a job or device does when a request fails (`on-error`,
    /// `on-source-error`, `on-target-error`, `rerror`, `werror`).
    pub enum BlockdevOnError {
        /// Fail: the job ends with the error, the guest request fails.
        Report = "report",
        /// Carry on as if the request had succeeded (jobs retry or skip).
        Ignore = "ignore",
        /// `stop` for ENOSPC, `report` for anything else.
        Enospc = "enospc",
        /// Pause the job (user-visible) or stop the VM; set the iostatus.
        Stop = "stop",
        /// Jobs: same as `enospc`. Devices: keep the backend's policy.
        Auto = "auto",
    }
}

qapi_enum! {
    /// The action actually taken for one error (in `BLOCK_JOB_ERROR` and
    /// `BLOCK_IO_ERROR`). Order differs from `BlockdevOnError`.
    pub enum BlockErrorAction {
        /// The error was ignored.
        Ignore = "ignore",
        /// The error was reported to the job or the guest.
        Report = "report",
        /// The job paused (or the VM should stop).
        Stop = "stop",
    }
}

qapi_enum! {
    /// I/O status of a job or a device.
    pub enum BlockDeviceIoStatus {
        /// No error since the last reset.
        Ok = "ok",
        /// A request failed with an error other than ENOSPC and `stop` applied.
        Failed = "failed",
        /// A request failed with ENOSPC and `stop` applied.
        Nospace = "nospace",
    }
}

qapi_enum! {
    /// Which direction a failed request went.
    pub enum IoOperationType {
        /// A read.
        Read = "read",
        /// A write (also write-zeroes, discard, flush).
        Write = "write",
    }
}

qapi_enum! {
    /// A job's status (QEMU's `JobStatus`).
    pub enum JobStatus {
        /// Before creation completed (never visible in a query).
        Undefined = "undefined",
        /// Created, not started.
        Created = "created",
        /// Running its main loop.
        Running = "running",
        /// Paused at a pause point.
        Paused = "paused",
        /// In sync; waiting for `complete` (mirror, active commit).
        Ready = "ready",
        /// Ready, but paused.
        Standby = "standby",
        /// Finished running, waiting for the other jobs of its transaction.
        Waiting = "waiting",
        /// Waiting for `finalize`.
        Pending = "pending",
        /// Failing or cancelled; cleaning up.
        Aborting = "aborting",
        /// Finished; waiting for `dismiss`.
        Concluded = "concluded",
        /// Gone.
        Null = "null",
    }
}

qapi_enum! {
    /// A command verb, checked against the verb table.
    pub enum JobVerb {
        /// cancel
        Cancel = "cancel",
        /// pause
        Pause = "pause",
        /// resume
        Resume = "resume",
        /// set-speed
        SetSpeed = "set-speed",
        /// complete
        Complete = "complete",
        /// dismiss (before finalize in QAPI's order)
        Dismiss = "dismiss",
        /// finalize
        Finalize = "finalize",
        /// change (block-job-change, QEMU 8.2+)
        Change = "change",
    }
}

qapi_enum! {
    /// The kind of a job.
    pub enum JobType {
        /// block-commit
        Commit = "commit",
        /// block-stream
        Stream = "stream",
        /// blockdev-mirror / drive-mirror
        Mirror = "mirror",
        /// blockdev-backup / drive-backup
        Backup = "backup",
        /// blockdev-create
        Create = "create",
        /// x-blockdev-amend
        Amend = "amend",
        /// snapshot-load
        SnapshotLoad = "snapshot-load",
        /// snapshot-save
        SnapshotSave = "snapshot-save",
        /// snapshot-delete
        SnapshotDelete = "snapshot-delete",
    }
}

qapi_enum! {
    /// Which part of the source a mirror copies.
    pub enum MirrorSyncMode {
        /// Only the top layer (what is above the backing file).
        Top = "top",
        /// Everything the guest sees.
        Full = "full",
        /// Nothing up front; only new writes.
        None = "none",
        /// Backup only.
        Incremental = "incremental",
        /// Backup only.
        Bitmap = "bitmap",
    }
}

qapi_enum! {
    /// What a backup leaves in its bitmap (QEMU's `BitmapSyncMode`).
    pub enum BitmapSyncMode {
        /// Cleared of what was copied if the job succeeds.
        OnSuccess = "on-success",
        /// Left as it was (plus new writes).
        Never = "never",
        /// Cleared of what was copied, whether the job succeeds or not.
        Always = "always",
    }
}

qapi_enum! {
    /// How a mirror treats guest writes.
    pub enum MirrorCopyMode {
        /// Guest writes only dirty the bitmap.
        Background = "background",
        /// Guest writes also go to the target before they complete.
        WriteBlocking = "write-blocking",
    }
}

impl IoOperationType {
    /// `read` for reads, `write` otherwise.
    pub fn from_is_read(is_read: bool) -> Self {
        if is_read {
            IoOperationType::Read
        } else {
            IoOperationType::Write
        }
    }
}

/// One entry of `query-block-jobs` (QEMU's `BlockJobInfo`), field by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// The job id.
    pub device: String,
    /// Progress total (bytes).
    pub len: u64,
    /// Progress done (bytes).
    pub offset: u64,
    /// The job's thread is running (not sleeping, yielded or paused).
    pub busy: bool,
    /// A pause is requested (`pause_count > 0`), not necessarily reached.
    pub paused: bool,
    /// Rate limit in bytes/s, 0 = unlimited.
    pub speed: u64,
    /// The job's I/O status.
    pub io_status: BlockDeviceIoStatus,
    /// Status is `ready` or `standby`.
    pub ready: bool,
    /// Current status.
    pub status: JobStatus,
    /// `auto-finalize` as created.
    pub auto_finalize: bool,
    /// `auto-dismiss` as created.
    pub auto_dismiss: bool,
    /// The error text when the job failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Mirror only: the target is kept in sync by active writes.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub actively_synced: Option<bool>,
    /// Our extensions (`x-` members, after QEMU's).
    #[serde(flatten)]
    pub x: JobProgressExt,
}

/// Rates, ETA and skipped bytes of a job: the `x-` members that
/// `query-block-jobs` and `query-jobs` add after QEMU's (QEMU's naming
/// for extensions; QEMU clients ignore them). Measured over the last
/// 10 s (see `engine::progress_meter`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobProgressExt {
    /// `x-copy-rate`: progress per second (bytes for block jobs).
    #[serde(rename = "x-copy-rate", default)]
    pub copy_rate: u64,
    /// `x-dirty-rate`: growth of the total per second once work began (a
    /// guest re-dirtying what a mirror must copy again).
    #[serde(rename = "x-dirty-rate", default)]
    pub dirty_rate: u64,
    /// `x-skipped`: of the progress, bytes that needed no data copied
    /// (holes and zeroes written as such, ranges with nothing to copy).
    #[serde(rename = "x-skipped", default)]
    pub skipped: u64,
    /// `x-eta`: seconds to completion at the current net rate (copy minus
    /// dirty); absent while unknown or when the job does not converge.
    #[serde(rename = "x-eta", skip_serializing_if = "Option::is_none", default)]
    pub eta: Option<u64>,
    /// `x-converging`: false when the dirty rate is at or above 95 % of
    /// the copy rate with work left (the job will not converge at these
    /// rates); absent until a second of history.
    #[serde(
        rename = "x-converging",
        skip_serializing_if = "Option::is_none",
        default
    )]
    pub converging: Option<bool>,
}

/// One entry of `query-jobs` (QEMU's `JobInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// Job type.
    #[serde(rename = "type")]
    pub job_type: JobType,
    /// Current status.
    pub status: JobStatus,
    /// Work done.
    pub current_progress: u64,
    /// Estimated total work.
    pub total_progress: u64,
    /// The error text when the job failed.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// Our extensions (`x-` members, after QEMU's).
    #[serde(flatten)]
    pub x: JobProgressExt,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_qemus() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let names = |all: Vec<&'static str>| all.into_iter().map(String::from).collect::<Vec<_>>();
        assert_eq!(
            names(BlockdevOnError::ALL.iter().map(|v| v.as_str()).collect()),
            s(&["report", "ignore", "enospc", "stop", "auto"])
        );
        assert_eq!(
            names(BlockErrorAction::ALL.iter().map(|v| v.as_str()).collect()),
            s(&["ignore", "report", "stop"])
        );
        assert_eq!(
            names(JobVerb::ALL.iter().map(|v| v.as_str()).collect()),
            s(&[
                "cancel",
                "pause",
                "resume",
                "set-speed",
                "complete",
                "dismiss",
                "finalize",
                "change"
            ])
        );
        assert_eq!(
            names(JobStatus::ALL.iter().map(|v| v.as_str()).collect()),
            s(&[
                "undefined",
                "created",
                "running",
                "paused",
                "ready",
                "standby",
                "waiting",
                "pending",
                "aborting",
                "concluded",
                "null"
            ])
        );
        assert_eq!(JobStatus::Null.index(), 10);
        assert_eq!(JobStatus::from_index(4), Some(JobStatus::Ready));
        assert_eq!(JobStatus::from_index(11), None);
        assert_eq!(JobStatus::from_index(-1), None);
    }

    #[test]
    fn serde_uses_wire_strings() {
        let info = BlockJobInfo {
            job_type: JobType::Mirror,
            device: "job0".into(),
            len: 4,
            offset: 2,
            busy: false,
            paused: true,
            speed: 0,
            io_status: BlockDeviceIoStatus::Nospace,
            ready: false,
            status: JobStatus::Paused,
            auto_finalize: true,
            auto_dismiss: true,
            error: None,
            actively_synced: None,
            x: JobProgressExt {
                copy_rate: 7,
                eta: Some(3),
                ..Default::default()
            },
        };
        let v = serde_json::to_value(&info).unwrap();
        // QEMU's members in QEMU's order, then ours.
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "type",
                "device",
                "len",
                "offset",
                "busy",
                "paused",
                "speed",
                "io-status",
                "ready",
                "status",
                "auto-finalize",
                "auto-dismiss",
                "x-copy-rate",
                "x-dirty-rate",
                "x-skipped",
                "x-eta"
            ]
        );
        assert_eq!(v["x-copy-rate"], 7);
        assert_eq!(
            serde_json::from_value::<BlockJobInfo>(v.clone()).unwrap(),
            info
        );
        assert_eq!(v["io-status"], "nospace");
        assert_eq!(v["type"], "mirror");
        assert_eq!(v["auto-finalize"], true);
        assert!(v.get("error").is_none());
        assert_eq!(
            "write-blocking".parse::<MirrorCopyMode>().unwrap(),
            MirrorCopyMode::WriteBlocking
        );
        let e = "bogus".parse::<BlockdevOnError>().unwrap_err();
        assert_eq!(
            e.message(),
            "Parameter 'BlockdevOnError' does not accept value 'bogus'"
        );
    }
}
