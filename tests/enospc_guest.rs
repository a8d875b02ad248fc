//! A guest disk on a filesystem that runs out of space, beside a mirror
//! whose target is on the same filesystem (a real tmpfs, a filler file
//! taking most of it): the guest backend with `werror=enospc` stops (its
//! request is held: `BLOCK_IO_ERROR` with action stop and `nospace`, I/O
//! status `nospace`) as the job stops (`BLOCK_JOB_ERROR` write/stop,
//! paused, iostatus `nospace`); once the filler is deleted the guest's
//! request is retried and lands, the job resumes and completes, and the
//! target is the source. With `werror=report` the guest gets the error
//! (ENOSPC) and the backend keeps running. Needs root (mount).

mod common;

use std::path::Path;
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::mirror::MirrorOptions;
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{
    BlockDeviceIoStatus, BlockErrorAction, BlockdevOnError, IoOperationType, JobStatus,
    MirrorSyncMode,
};
use common::tmpfs::Tmpfs;
use serde_json::json;

const MIB: u64 = 1 << 20;

fn write_file(p: &Path, mib: u64, byte: u8) {
    std::fs::write(p, vec![byte; (mib * MIB) as usize]).unwrap();
}

/// Write into `p` until the filesystem is full.
fn fill_up(p: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(p).unwrap();
    let chunk = vec![0x11u8; 65536];
    loop {
        match f.write(&chunk) {
            Ok(n) if n > 0 => {}
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                break;
            }
        }
    }
}

fn sparse(p: &Path, mib: u64) {
    std::fs::File::create(p)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
}

fn raw(ctx: &Context, name: &str, path: &Path) {
    ctx.blockdev_add(&json!({"driver":"raw","node-name":name,
        "file":{"driver":"file","filename":path}}))
        .unwrap();
}

/// BLOCK_IO_ERROR's (operation, action, nospace), in order.
fn io_errors(evs: &[EventData]) -> Vec<(IoOperationType, BlockErrorAction, Option<bool>)> {
    evs.iter()
        .filter_map(|e| match e {
            EventData::BlockIoError {
                operation,
                action,
                nospace,
                ..
            } => Some((*operation, *action, *nospace)),
            _ => None,
        })
        .collect()
}

fn drain(sub: &Subscription) -> Vec<EventData> {
    std::iter::from_fn(|| sub.try_next())
        .map(|e| e.data.clone())
        .collect()
}

#[test]
fn guest_with_werror_enospc_stops_beside_the_job_and_both_go_on() {
    let work = tempfile::tempdir().unwrap();
    let fs = Tmpfs::new(48);
    let src = work.path().join("src.raw");
    write_file(&src, 24, 0xa5);
    // 30 MiB filler + a 24 MiB mirror target do not fit in 48 MiB.
    let filler = fs.dir.join("filler");
    write_file(&filler, 30, 0x11);
    let (dst, disk) = (fs.dir.join("dst.raw"), fs.dir.join("guest.raw"));
    sparse(&dst, 24);
    sparse(&disk, 8);

    let ctx = Context::new();
    raw(&ctx, "src", &src);
    raw(&ctx, "dst", &dst);
    raw(&ctx, "disk", &disk);
    let guest = ctx
        .blk_new(
            "disk",
            BackendOptions {
                name: "vd0".into(),
                qom_path: "/machine/peripheral/vd0".into(),
                werror: BlockdevOnError::Enospc,
                ..BackendOptions::default()
            },
        )
        .unwrap();
    let sub = ctx.subscribe();
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.on_target_error = BlockdevOnError::Enospc;
    let job = ctx.blockdev_mirror(o).unwrap();

    // The job fills the filesystem and stops.
    job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Paused)
        .expect("the mirror stopped");
    assert_eq!(job.iostatus(), BlockDeviceIoStatus::Nospace);
    let info = job.query_block_job().unwrap();
    assert_eq!(info.io_status, BlockDeviceIoStatus::Nospace);

    // The guest writes into its sparse disk on the same, full filesystem.
    let data = vec![0x3cu8; MIB as usize];
    let e = guest
        .pwrite(2 * MIB, &data)
        .expect_err("no space for the guest either");
    assert_eq!(e.action, BlockErrorAction::Stop, "werror=enospc stops");
    assert_eq!(e.error.errno(), Some(libc::ENOSPC));
    assert_eq!(guest.iostatus(), BlockDeviceIoStatus::Nospace);
    let evs = drain(&sub);
    assert!(
        evs.iter().any(|e| matches!(
            e,
            EventData::BlockJobError {
                operation: IoOperationType::Write,
                action: BlockErrorAction::Stop,
                ..
            }
        )),
        "BLOCK_JOB_ERROR write/stop"
    );
    assert_eq!(
        io_errors(&evs),
        [(IoOperationType::Write, BlockErrorAction::Stop, Some(true))],
        "one BLOCK_IO_ERROR, stop, nospace"
    );

    // The user frees space; the guest's held request is retried (as a
    // device does after the VM is resumed), the job resumed.
    std::fs::remove_file(&filler).unwrap();
    guest.iostatus_reset();
    guest
        .pwrite(2 * MIB, &data)
        .expect("the retried write lands");
    assert_eq!(guest.iostatus(), BlockDeviceIoStatus::Ok);
    job.user_resume().unwrap();
    assert_eq!(job.iostatus(), BlockDeviceIoStatus::Ok);
    loop {
        let e = sub
            .next_timeout(Duration::from_secs(60))
            .expect("the mirror goes on");
        match &e.data {
            EventData::BlockJobReady(_) => job.complete().unwrap(),
            EventData::BlockJobCompleted { error, .. } => {
                assert_eq!(error, &None, "the mirror succeeded");
                break;
            }
            EventData::BlockJobError { .. } => panic!("failed again after space was freed"),
            _ => {}
        }
    }
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .expect("job gone");
    let mut back = vec![0u8; MIB as usize];
    guest.pread(2 * MIB, &mut back).unwrap();
    assert!(back == data, "the guest reads what it wrote");
    drop(guest);
    drop(job);
    drop(ctx);
    assert!(
        std::fs::read(&dst).unwrap() == std::fs::read(&src).unwrap(),
        "the target is the source"
    );
}

#[test]
fn guest_with_werror_report_gets_enospc_and_keeps_running() {
    let fs = Tmpfs::new(16);
    let disk = fs.dir.join("guest.raw");
    sparse(&disk, 8);
    fill_up(&fs.dir.join("filler"));
    let ctx = Context::new();
    raw(&ctx, "disk", &disk);
    let guest = ctx
        .blk_new(
            "disk",
            BackendOptions {
                name: "vd0".into(),
                werror: BlockdevOnError::Report,
                ..BackendOptions::default()
            },
        )
        .unwrap();
    let sub = ctx.subscribe();
    let e = guest.pwrite(0, &[7u8; 65536]).expect_err("full");
    assert_eq!(e.action, BlockErrorAction::Report);
    assert_eq!(e.error.errno(), Some(libc::ENOSPC));
    assert_eq!(e.error.to_string(), "No space left on device");
    assert_eq!(guest.iostatus(), BlockDeviceIoStatus::Ok, "report: no stop");
    assert_eq!(
        io_errors(&drain(&sub)),
        [(IoOperationType::Write, BlockErrorAction::Report, Some(true))]
    );
}
