//! block-stream on qcow2 chains made by qemu-img: the guest-visible
//! content does not change, the chain is shortened as QEMU shortens it,
//! `qemu-img check` stays clean; errors follow on-error as in QEMU.

mod common;

use std::sync::Arc;
use std::time::Duration;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use blockjob::block_jobs::stream::StreamOptions;
use blockjob::events::EventData;
use blockjob::qapi::{BlockdevOnError, JobStatus};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

use common::chain::{backing_chain, chain, flat, s, tool as run};

fn wait_end(job: &blockjob::engine::Job) {
    job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
        .expect("job did not end");
}

#[test]
fn stream_everything_flattens_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let before = flat(&top);
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top}}))
        .unwrap();
    let events = ctx.subscribe();
    // No device (guest) on the node: QEMU takes the empty device name as
    // the job id and refuses it.
    assert_eq!(
        ctx.block_stream(StreamOptions::new("top"))
            .unwrap_err()
            .message(),
        "Invalid job ID ''"
    );
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    let job = ctx.block_stream(o).unwrap();
    wait_end(&job);
    let evs: Vec<_> = std::iter::from_fn(|| events.try_next()).collect();
    let completed = evs
        .iter()
        .find_map(|e| match &e.data {
            EventData::BlockJobCompleted { progress, error } => {
                Some((progress.clone(), error.clone()))
            }
            _ => None,
        })
        .expect("BLOCK_JOB_COMPLETED");
    assert_eq!(completed.1, None);
    assert_eq!((completed.0.offset, completed.0.len), (4 * MIB, 4 * MIB));
    // The graph lost the implicit layers, the image lost its backing link.
    let node = ctx.graph().find_node("top").unwrap();
    assert!(node.backing().is_none());
    assert_eq!(ctx.graph().nodes().len(), 2, "top and its file node only");
    drop(node);
    drop(ctx);
    assert_eq!(backing_chain(&top), vec![None]);
    run("qemu-img", &["check", "-q", s(&top)]);
    assert!(flat(&top) == before, "guest-visible content changed");
}

#[test]
fn stream_to_a_base_keeps_it_and_drops_what_is_above() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, top) = chain(dir.path());
    let before = flat(&top);
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"base",
        "file":{"driver":"file","filename":base}}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top},
        "backing":{"driver":"qcow2","node-name":"mid",
            "file":{"driver":"file","filename":dir.path().join("mid.qcow2")},
            "backing":"base"}}))
        .unwrap();
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    o.base_node = Some("base".into());
    let job = ctx.block_stream(o).unwrap();
    wait_end(&job);
    let node = ctx.graph().find_node("top").unwrap();
    assert_eq!(node.backing().unwrap().name(), "base");
    drop(node);
    drop(ctx);
    assert_eq!(
        backing_chain(&top),
        vec![Some(s(&base).to_string()), None],
        "top -> base"
    );
    run("qemu-img", &["check", "-q", s(&top)]);
    assert!(flat(&top) == before);
    // Only mid's data was copied: base's 0x01 is still read from base.
    let map: Vec<Value> =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", s(&top)])).unwrap();
    let depth_of = |off: u64| {
        map.iter()
            .find(|m| {
                let st = m["start"].as_u64().unwrap();
                st <= off && off < st + m["length"].as_u64().unwrap()
            })
            .unwrap()["depth"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(depth_of(0), 1, "base data stays in base");
    assert_eq!(depth_of(MIB), 0, "mid data now in top");
    assert_eq!(depth_of(3 * MIB), 0);
}

#[test]
fn stream_with_ignore_fails_at_the_end_and_keeps_the_chain() {
    // QEMU (iotest 030 TestEIO.test_ignore): BLOCK_JOB_ERROR with ignore,
    // then COMPLETED with the error and offset == len; backing unchanged.
    let dir = tempfile::tempdir().unwrap();
    let (_, mid, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top},
        "backing":{"driver":"qcow2","node-name":"mid",
            "file":{"driver":"blkdebug",
                "inject-error":[{"event":"read_aio","errno":5,"once":true}],
                "image":{"driver":"file","filename":mid}}}}))
        .unwrap();
    let events = ctx.subscribe();
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    o.on_error = BlockdevOnError::Ignore;
    let job = ctx.block_stream(o).unwrap();
    wait_end(&job);
    let evs: Vec<_> = std::iter::from_fn(|| events.try_next()).collect();
    let errors: Vec<_> = evs
        .iter()
        .filter_map(|e| match &e.data {
            EventData::BlockJobError {
                operation, action, ..
            } => Some(format!("{operation}/{action}")),
            _ => None,
        })
        .collect();
    assert_eq!(errors, vec!["read/ignore"]);
    let (info, error) = evs
        .iter()
        .find_map(|e| match &e.data {
            EventData::BlockJobCompleted { progress, error } => {
                Some((progress.clone(), error.clone()))
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(error.as_deref(), Some("Input/output error"));
    assert_eq!(info.offset, info.len);
    let node = ctx.graph().find_node("top").unwrap();
    assert_eq!(node.backing().unwrap().name(), "mid");
    drop(node);
    drop(ctx);
    assert_eq!(backing_chain(&top).len(), 3, "chain left in place");
}

#[test]
fn guest_writes_during_stream_win_over_copied_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top}}))
        .unwrap();
    let blk = Arc::new(ctx.blk_new("top", BackendOptions::default()).unwrap());
    // The expected guest view: the chain, then the guest's writes.
    let mut expect = flat(&top);
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    // Slow enough for writes to land mid-stream (only copied chunks count
    // against the speed, as in QEMU).
    o.speed = (MIB / 4) as i64;
    let job = ctx.block_stream(o).unwrap();
    let mut x: u64 = 12345;
    for i in 0..300u64 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 512 * (1 + (x >> 40) % 200);
        let off = ((x >> 8) % (4 * MIB - len)) / 512 * 512;
        let pat = (i % 250) as u8 + 5;
        blk.pwrite(off, &vec![pat; len as usize]).unwrap();
        expect[off as usize..(off + len) as usize].fill(pat);
        std::thread::sleep(Duration::from_millis(3));
    }
    job.set_speed(0).unwrap();
    wait_end(&job);
    blk.flush().unwrap();
    drop(blk);
    drop(ctx);
    run("qemu-img", &["check", "-q", s(&top)]);
    assert_eq!(backing_chain(&top), vec![None]);
    assert!(
        flat(&top) == expect,
        "a guest write was lost or overwritten"
    );
}

#[test]
fn bad_arguments_are_refused_with_qemu_text() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top}}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"null-co","node-name":"other"}))
        .unwrap();
    let err = |o: StreamOptions| ctx.block_stream(o).unwrap_err().message().to_string();
    let mut o = StreamOptions::new("nope");
    o.job_id = Some("j".into());
    assert_eq!(err(o), "Cannot find device='nope' nor node-name='nope'");
    let mut o = StreamOptions::new("top");
    o.base_node = Some("other".into());
    assert_eq!(err(o), "Node 'other' is not a backing image of 'top'");
    let mut o = StreamOptions::new("top");
    o.base_node = Some("top".into());
    assert_eq!(err(o), "Node 'top' is not a backing image of 'top'");
    let mut o = StreamOptions::new("top");
    o.base = Some("/no/such.qcow2".into());
    assert_eq!(err(o), "Can't find '/no/such.qcow2' in the backing chain");
    let mut o = StreamOptions::new("top");
    o.base = Some("x".into());
    o.base_node = Some("y".into());
    assert_eq!(
        err(o),
        "'base' and 'base-node' cannot be specified at the same time"
    );
    let mut o = StreamOptions::new("top");
    o.backing_file = Some("x".into());
    assert_eq!(
        err(o),
        "backing file specified, but streaming the entire chain"
    );
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    o.speed = -1;
    assert_eq!(err(o), "Parameter 'speed' expects a non-negative value");
    // Nothing started, nothing changed.
    assert!(ctx.engine().query_jobs().is_empty());
    drop(ctx);
    assert_eq!(backing_chain(&top).len(), 3);
}

/// A guest write to a range the job is copying (its read from below is
/// still in flight) is not overwritten by the older data from below: the
/// write waits for the copy, or the copy skips what the guest wrote.
#[test]
fn a_guest_write_racing_with_the_copy_of_its_range_is_kept() {
    use common::gated::{GatedMemory, Hold};
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new();
    // Below: 4 MiB of 0x11 whose first read waits at the gate.
    let (below, gate) = GatedMemory::new(4 * MIB as usize, 0x11, Hold::Read);
    ctx.add_host_node("below", true, Box::new(below)).unwrap();
    // Top: an empty qcow2 over it.
    let top = dir.path().join("top.qcow2");
    std::fs::File::create(&top).unwrap();
    let f = ctx
        .blockdev_add(&json!({"driver":"file","node-name":"tf","filename":top}))
        .unwrap();
    blockjob::block::qcow2::create(&f, 4 * MIB, None, None).unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top","file":"tf","backing":"below"}))
        .unwrap();
    let blk = Arc::new(ctx.blk_new("top", BackendOptions::default()).unwrap());
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s0".into());
    let job = ctx.block_stream(o).unwrap();
    // The job is reading the first chunk from below.
    gate.wait_held();
    let writer = {
        let blk = blk.clone();
        std::thread::spawn(move || blk.pwrite(4096, &[0xab; 4096]).unwrap())
    };
    // Give an unguarded write all the time it needs to land first.
    std::thread::sleep(Duration::from_millis(200));
    gate.release();
    writer.join().unwrap();
    wait_end(&job);
    let mut buf = vec![0; 8192];
    blk.pread(0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 0x11), "copied data");
    assert!(
        buf[4096..].iter().all(|&b| b == 0xab),
        "the guest write was overwritten by the copy"
    );
    assert!(ctx.graph().find_node("top").unwrap().backing().is_none());
}

/// Events of a job, compactly: ERROR(op,action), COMPLETED(error,off,len).
fn job_events(sub: &blockjob::events::Subscription) -> Vec<String> {
    std::iter::from_fn(|| sub.try_next())
        .filter_map(|e| match &e.data {
            EventData::BlockJobError {
                operation, action, ..
            } => Some(format!("ERROR({operation},{action})")),
            EventData::BlockJobCompleted { progress, error } => Some(format!(
                "COMPLETED({},{},{})",
                error.as_deref().unwrap_or("ok"),
                progress.offset,
                progress.len
            )),
            _ => None,
        })
        .collect()
}

#[test]
fn errors_follow_on_error_as_in_qemu() {
    // blkdebug read_aio on mid's file, once; stream top without base.
    // Expected events, stop offset and io-status recorded with
    // qemu-storage-daemon 10.0.2.
    let m = "1048576,4194304";
    let f = "4194304,4194304";
    let cases: &[(BlockdevOnError, i32, &[&str], Option<&str>)] = &[
        (
            BlockdevOnError::Report,
            5,
            &[
                "ERROR(read,report)",
                &format!("COMPLETED(Input/output error,{m})"),
            ],
            None,
        ),
        (
            BlockdevOnError::Report,
            28,
            &[
                "ERROR(read,report)",
                &format!("COMPLETED(No space left on device,{m})"),
            ],
            None,
        ),
        (
            BlockdevOnError::Ignore,
            5,
            &[
                "ERROR(read,ignore)",
                &format!("COMPLETED(Input/output error,{f})"),
            ],
            None,
        ),
        (
            BlockdevOnError::Stop,
            5,
            &["ERROR(read,stop)", &format!("COMPLETED(ok,{f})")],
            Some("failed"),
        ),
        (
            BlockdevOnError::Stop,
            28,
            &["ERROR(read,stop)", &format!("COMPLETED(ok,{f})")],
            Some("nospace"),
        ),
        (
            BlockdevOnError::Enospc,
            5,
            &[
                "ERROR(read,report)",
                &format!("COMPLETED(Input/output error,{m})"),
            ],
            None,
        ),
        (
            BlockdevOnError::Enospc,
            28,
            &["ERROR(read,stop)", &format!("COMPLETED(ok,{f})")],
            Some("nospace"),
        ),
    ];
    for &(policy, errno, expect, stop_status) in cases {
        let dir = tempfile::tempdir().unwrap();
        let (_, mid, top) = chain(dir.path());
        let before = flat(&top);
        let ctx = Context::new();
        ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
            "file":{"driver":"file","filename":top},
            "backing":{"driver":"qcow2","node-name":"mid",
                "file":{"driver":"blkdebug",
                    "inject-error":[{"event":"read_aio","errno":errno,"once":true}],
                    "image":{"driver":"file","filename":mid}}}}))
            .unwrap();
        let sub = ctx.subscribe();
        let mut o = StreamOptions::new("top");
        o.job_id = Some("job0".into());
        o.on_error = policy;
        let job = ctx.block_stream(o).unwrap();
        if let Some(io) = stop_status {
            job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Paused)
                .expect("paused by the error");
            assert_eq!(job.progress().current, MIB, "{policy:?}/{errno}: offset");
            assert_eq!(job.iostatus().to_string(), io, "{policy:?}/{errno}");
            job.user_resume().unwrap();
        }
        wait_end(&job);
        assert_eq!(job_events(&sub), expect, "{policy:?}/{errno}");
        let ok = expect.last().unwrap().starts_with("COMPLETED(ok");
        drop(ctx);
        // Failed (ignore too): the chain stays; done: flattened.
        assert_eq!(
            backing_chain(&top).len(),
            if ok { 1 } else { 3 },
            "{policy:?}/{errno}"
        );
        run("qemu-img", &["check", "-q", s(&top)]);
        assert!(
            flat(&top) == before,
            "{policy:?}/{errno}: guest view changed"
        );
    }
}

#[test]
fn nothing_to_stream_completes_at_zero() {
    // QEMU: base-node = top's own backing, or no backing: COMPLETED(0,0).
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top}}))
        .unwrap();
    let mid = ctx.graph().find_node("top").unwrap().backing().unwrap();
    let sub = ctx.subscribe();
    let mut o = StreamOptions::new("top");
    o.job_id = Some("job0".into());
    o.base_node = Some(mid.name().to_string());
    wait_end(&ctx.block_stream(o).unwrap());
    assert_eq!(job_events(&sub), vec!["COMPLETED(ok,0,0)"]);
}
