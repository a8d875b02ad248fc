//! block-commit on qcow2 chains made by qemu-img: intermediate and
//! active commit leave the chains and contents QEMU leaves (recorded with
//! qemu-storage-daemon 10: base gets the committed data, the overlay is
//! relinked to base, `qemu-img check` clean); errors follow on-error as
//! QEMU's commit does (ignore and stop retry the chunk).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::commit::CommitOptions;
use blockjob::events::EventData;
use blockjob::qapi::{BlockdevOnError, JobStatus};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

use common::chain::{backing_chain, chain, flat, s, tool as run};

fn wait_end(job: &blockjob::engine::Job) {
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .expect("job did not end");
}

fn events(sub: &blockjob::events::Subscription) -> Vec<String> {
    std::iter::from_fn(|| sub.try_next())
        .filter_map(|e| match &e.data {
            EventData::BlockJobError {
                operation, action, ..
            } => Some(format!("ERROR({operation},{action})")),
            EventData::BlockJobReady(p) => Some(format!("READY({},{})", p.offset, p.len)),
            EventData::BlockJobCompleted { progress, error } => Some(format!(
                "COMPLETED({},{},{})",
                error.as_deref().unwrap_or("ok"),
                progress.offset,
                progress.len
            )),
            EventData::BlockJobCancelled(p) => Some(format!("CANCELLED({},{})", p.offset, p.len)),
            _ => None,
        })
        .collect()
}

/// top -> mid -> base, explicitly named, mid's file through `mid_file`.
fn add_chain(ctx: &Context, dir: &Path, mid_file: Value, base_file: Value) {
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"base","file":base_file}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"mid","file":mid_file,"backing":"base"}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":dir.join("top.qcow2")},"backing":"mid"}))
        .unwrap();
}

fn file(p: &Path) -> Value {
    json!({"driver":"file","filename":p})
}

fn blkdebug(p: &Path, event: &str, errno: i32) -> Value {
    json!({"driver":"blkdebug","image":file(p),
        "inject-error":[{"event":event,"errno":errno,"once":true}]})
}

#[test]
fn intermediate_commit_merges_mid_into_base_and_relinks_top() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = chain(dir.path());
    let (before_top, before_mid) = (flat(&top), flat(&mid));
    let ctx = Context::new();
    add_chain(&ctx, dir.path(), file(&mid), file(&base));
    let sub = ctx.subscribe();
    let mut o = CommitOptions::new("top");
    o.job_id = Some("job0".into());
    o.top_node = Some("mid".into());
    o.base_node = Some("base".into());
    let job = ctx.block_commit(o).unwrap();
    wait_end(&job);
    assert_eq!(
        events(&sub),
        vec![format!("COMPLETED(ok,{},{})", 4 * MIB, 4 * MIB)]
    );
    assert_eq!(
        ctx.graph()
            .find_node("top")
            .unwrap()
            .backing()
            .unwrap()
            .name(),
        "base"
    );
    drop(ctx);
    // QEMU: top -> base (absolute name), mid untouched, base = old mid view.
    assert_eq!(backing_chain(&top), vec![Some(s(&base).to_string()), None]);
    assert_eq!(backing_chain(&mid).len(), 2);
    for img in [&base, &mid, &top] {
        run("qemu-img", &["check", "-q", s(img)]);
    }
    assert!(flat(&top) == before_top, "guest view changed");
    assert!(flat(&base) == before_mid, "base is not mid's old view");
}

#[test]
fn active_commit_is_ready_then_complete_moves_the_guest_to_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = chain(dir.path());
    let ctx = Context::new();
    add_chain(&ctx, dir.path(), file(&mid), file(&base));
    let blk = Arc::new(ctx.blk_new("top", BackendOptions::default()).unwrap());
    let mut expect = flat(&top);
    let sub = ctx.subscribe();
    let mut o = CommitOptions::new("top");
    o.job_id = Some("job0".into());
    let job = ctx.block_commit(o).unwrap();
    assert_eq!(job.job_type().to_string(), "commit");
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("READY");
    // Guest writes after READY go to both (the mirror keeps base in sync).
    blk.pwrite(123 * 512, &[0x77; 5000]).unwrap();
    expect[123 * 512..123 * 512 + 5000].fill(0x77);
    job.complete().unwrap();
    wait_end(&job);
    // QEMU: READY and COMPLETED with len = the data above base (mid's 1 MiB
    // and top's 512 KiB), plus what the guest wrote meanwhile.
    let ev = events(&sub);
    assert_eq!(ev[0], format!("READY({0},{0})", 1536 * 1024));
    assert!(ev[1].starts_with("COMPLETED(ok,"), "{ev:?}");
    assert_eq!(ev.len(), 2);
    // The guest is on base now; its writes land there.
    blk.pwrite(0, &[0x55; 512]).unwrap();
    expect[..512].fill(0x55);
    blk.flush().unwrap();
    drop(blk);
    drop(ctx);
    // No header changes (QEMU leaves top -> mid -> base).
    assert_eq!(backing_chain(&top).len(), 3);
    for img in [&base, &mid, &top] {
        run("qemu-img", &["check", "-q", s(img)]);
    }
    assert!(flat(&base) == expect, "base does not hold the guest view");
}

#[test]
fn soft_cancel_after_ready_completes_without_pivot() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, _) = chain(dir.path());
    let ctx = Context::new();
    add_chain(&ctx, dir.path(), file(&mid), file(&base));
    let blk = ctx.blk_new("top", BackendOptions::default()).unwrap();
    let sub = ctx.subscribe();
    let mut o = CommitOptions::new("top");
    o.job_id = Some("job0".into());
    o.base_node = Some("mid".into());
    let job = ctx.block_commit(o).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .unwrap();
    job.user_cancel(false).unwrap();
    wait_end(&job);
    let k = 512 * 1024;
    assert_eq!(
        events(&sub),
        vec![format!("READY({k},{k})"), format!("COMPLETED(ok,{k},{k})")]
    );
    assert_eq!(blk.node().name(), "top", "no pivot");
}

#[test]
fn errors_follow_on_error_as_in_qemu() {
    // (case, policy, expected events) from qemu-storage-daemon 10.0.2.
    let cases: &[(&str, BlockdevOnError, &[&str])] = &[
        (
            "mid-read",
            BlockdevOnError::Report,
            &[
                "ERROR(read,report)",
                "COMPLETED(Input/output error,1048576,4194304)",
            ],
        ),
        (
            "mid-read",
            BlockdevOnError::Ignore,
            &["ERROR(read,ignore)", "COMPLETED(ok,4194304,4194304)"],
        ),
        (
            "base-write",
            BlockdevOnError::Report,
            &[
                "ERROR(write,report)",
                "COMPLETED(Input/output error,1048576,4194304)",
            ],
        ),
        (
            "base-write",
            BlockdevOnError::Ignore,
            &["ERROR(write,ignore)", "COMPLETED(ok,4194304,4194304)"],
        ),
        (
            "base-write",
            BlockdevOnError::Stop,
            &["ERROR(write,stop)", "COMPLETED(ok,4194304,4194304)"],
        ),
        (
            "base-write",
            BlockdevOnError::Enospc,
            &[
                "ERROR(write,report)",
                "COMPLETED(Input/output error,1048576,4194304)",
            ],
        ),
    ];
    for &(case, policy, expect) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (base, mid, top) = chain(dir.path());
        let before = flat(&top);
        let ctx = Context::new();
        let (mf, bf) = match case {
            "mid-read" => (blkdebug(&mid, "read_aio", 5), file(&base)),
            _ => (file(&mid), blkdebug(&base, "write_aio", 5)),
        };
        add_chain(&ctx, dir.path(), mf, bf);
        let sub = ctx.subscribe();
        let mut o = CommitOptions::new("top");
        o.job_id = Some("job0".into());
        o.top_node = Some("mid".into());
        o.on_error = policy;
        let job = ctx.block_commit(o).unwrap();
        if policy == BlockdevOnError::Stop {
            job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Paused)
                .expect("paused by the error");
            assert_eq!(
                job.progress().current,
                MIB,
                "{case}: stopped at the failed chunk"
            );
            job.user_resume().unwrap();
        }
        wait_end(&job);
        assert_eq!(events(&sub), expect, "{case} {policy:?}");
        let ok = expect.last().unwrap().starts_with("COMPLETED(ok");
        drop(ctx);
        // Failed: no header changes. Done: top -> base.
        assert_eq!(
            backing_chain(&top).len(),
            if ok { 2 } else { 3 },
            "{case} {policy:?}"
        );
        run("qemu-img", &["check", "-q", s(&top)]);
        assert!(
            flat(&top) == before,
            "{case} {policy:?}: guest view changed"
        );
    }
}

#[test]
fn bad_arguments_are_refused_with_qemu_text() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = chain(dir.path());
    let ctx = Context::new();
    add_chain(&ctx, dir.path(), file(&mid), file(&base));
    ctx.blockdev_add(&json!({"driver":"null-co","node-name":"other"}))
        .unwrap();
    let err = |f: &dyn Fn(&mut CommitOptions)| {
        let mut o = CommitOptions::new("top");
        o.job_id = Some("job0".into());
        f(&mut o);
        let e = ctx.block_commit(o).unwrap_err();
        format!("{}: {}", e.class(), e.message())
    };
    assert_eq!(
        err(&|o| o.device = "nosuch".into()),
        "DeviceNotFound: Device 'nosuch' not found"
    );
    assert_eq!(
        err(&|o| o.device = "base".into()),
        "GenericError: Need a root block node"
    );
    assert_eq!(
        err(&|o| o.base_node = Some("nosuch".into())),
        "GenericError: Cannot find device='' nor node-name='nosuch'"
    );
    assert_eq!(
        err(&|o| o.base_node = Some("other".into())),
        "GenericError: 'other' is not in this backing file chain"
    );
    assert_eq!(
        err(&|o| {
            o.top_node = Some("mid".into());
            o.base_node = Some("mid".into());
        }),
        "GenericError: cannot commit an image into itself"
    );
    assert_eq!(
        err(&|o| {
            o.top_node = Some("base".into());
            o.base_node = Some("mid".into());
        }),
        "GenericError: 'mid' is not in this backing file chain"
    );
    assert_eq!(
        err(&|o| o.base = Some("/nonexistent.qcow2".into())),
        "GenericError: Can't find '/nonexistent.qcow2' in the backing chain"
    );
    assert_eq!(
        err(&|o| o.top = Some("/nonexistent.qcow2".into())),
        "GenericError: Top image file /nonexistent.qcow2 not found"
    );
    assert_eq!(
        err(&|o| {
            o.base = Some("x".into());
            o.base_node = Some("y".into());
        }),
        "GenericError: 'base-node' and 'base' are mutually exclusive"
    );
    assert_eq!(
        err(&|o| o.backing_file = Some("x".into())),
        "GenericError: 'backing-file' specified, but 'top' is the active layer"
    );
    assert_eq!(
        err(&|o| {
            o.top_node = Some("mid".into());
            o.speed = -1;
        }),
        "GenericError: Parameter 'speed' expects a non-negative value"
    );
    assert_eq!(err(&|o| o.job_id = None), "GenericError: Invalid job ID ''");
    assert!(ctx.engine().query_jobs().is_empty());
    drop(ctx);
    assert_eq!(backing_chain(&top).len(), 3, "nothing changed on disk");
}

#[test]
fn guest_writes_during_active_commit_end_up_in_base() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, _) = chain(dir.path());
    let ctx = Context::new();
    add_chain(&ctx, dir.path(), file(&mid), file(&base));
    let blk = Arc::new(ctx.blk_new("top", BackendOptions::default()).unwrap());
    let mut expect = vec![0u8; 4 * MIB as usize];
    blk.pread(0, &mut expect).unwrap();
    let mut o = CommitOptions::new("top");
    o.job_id = Some("job0".into());
    o.speed = 4 * MIB as i64; // slow: the writes land while it copies
    let job = ctx.block_commit(o).unwrap();
    let mut x: u64 = 99;
    for i in 0..200u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 512 * (1 + (x >> 40) % 128);
        let off = ((x >> 8) % (4 * MIB - len)) / 512 * 512;
        let pat = (i % 250) as u8 + 5;
        blk.pwrite(off, &vec![pat; len as usize]).unwrap();
        expect[off as usize..(off + len) as usize].fill(pat);
        std::thread::sleep(Duration::from_millis(1));
    }
    job.set_speed(0).unwrap();
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Ready)
        .expect("READY");
    job.complete().unwrap();
    wait_end(&job);
    assert_eq!(blk.node().name(), "base");
    blk.flush().unwrap();
    drop(blk);
    drop(ctx);
    run("qemu-img", &["check", "-q", s(&base)]);
    assert!(flat(&base) == expect, "base does not hold the guest's view");
}
