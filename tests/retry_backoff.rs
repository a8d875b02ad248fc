//! The `ignore` policy's retries are spaced out (1 ms doubling to 1 s,
//! started over once what failed is done; `engine::backoff`): against a
//! persistent `blkdebug` fault each job that retries (mirror, commit,
//! backup) sends a handful of `BLOCK_JOB_ERROR` in two seconds where QEMU
//! sends thousands (`benches/ignore_retry_rate.py`), still retries (the events go on), and a
//! pause, a drained section or a cancel ends the wait at once even when
//! it is a second long.
//! A fault that goes away heals at once, the data is the source's. Stream
//! does not retry under `ignore` (it skips the chunk and fails at the end,
//! as QEMU): one event per failing chunk, no waiting.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blockjob::Context;
use blockjob::block_jobs::backup::BackupOptions;
use blockjob::block_jobs::commit::CommitOptions;
use blockjob::block_jobs::mirror::{MirrorOptions, io_workers};
use blockjob::block_jobs::stream::StreamOptions;
use blockjob::engine::Job;
use blockjob::events::{EventData, Subscription};
use blockjob::qapi::{BlockErrorAction, BlockdevOnError, JobStatus, MirrorSyncMode};
use common::chain::{flat, overlay, s, tool};
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

/// A raw file of `mib` MiB, MiB `i` filled with byte `i + 1`.
fn patterned(path: &Path, mib: u64) -> Vec<u8> {
    let data: Vec<u8> = (0..mib)
        .flat_map(|i| std::iter::repeat_n(i as u8 + 1, MIB as usize))
        .collect();
    std::fs::write(path, &data).unwrap();
    data
}

/// A raw node over `path` through `blkdebug` with `rules`.
fn faulty_raw(ctx: &Context, name: &str, path: &Path, rules: Value) {
    ctx.blockdev_add(
        &json!({"driver":"raw","node-name":name,"file":{"driver":"blkdebug",
        "image":{"driver":"file","filename":path},"inject-error":rules}}),
    )
    .unwrap();
}

fn raw(ctx: &Context, name: &str, path: &Path) {
    ctx.blockdev_add(&json!({"driver":"raw","node-name":name,
        "file":{"driver":"file","filename":path}}))
        .unwrap();
}

/// The next `BLOCK_JOB_ERROR` before `deadline` (other events skipped).
fn next_error(sub: &Subscription, deadline: Instant) -> Option<BlockErrorAction> {
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        let e = sub.next_timeout(left)?;
        if let EventData::BlockJobError { action, .. } = &e.data {
            return Some(*action);
        }
    }
}

fn is_gone(s: JobStatus) -> bool {
    matches!(s, JobStatus::Concluded | JobStatus::Null)
}

/// A job that fails on every retry under `ignore`: few events in two
/// seconds (at most `max_events`, at least a few: it keeps retrying); a
/// pause requested right after a failure (the next wait is a second
/// long by then) is served at once; after the resume it fails again, and
/// a cancel right after that failure ends the job at once.
fn persistent_fault_is_spaced(job: &Arc<Job>, sub: &Subscription, max_events: usize) {
    let start = Instant::now();
    let window = start + Duration::from_secs(2);
    let mut n = 0;
    while let Some(a) = next_error(sub, window) {
        assert_eq!(a, BlockErrorAction::Ignore);
        n += 1;
    }
    assert!(
        (5..=max_events).contains(&n),
        "{n} BLOCK_JOB_ERROR in 2 s: want 5..={max_events} (QEMU sends ~95 000/s)"
    );
    assert_eq!(job.status(), JobStatus::Running, "still retrying");

    // By now every wait is a second long: pause right after a failure.
    let far = Instant::now() + Duration::from_secs(30);
    next_error(sub, far).expect("the retries go on");
    let t = Instant::now();
    job.user_pause().unwrap();
    job.wait_status(Duration::from_secs(10), |s| s == JobStatus::Paused)
        .expect("paused");
    let paused_after = t.elapsed();
    assert!(
        paused_after < Duration::from_millis(700),
        "a pause waited {paused_after:?} for a 1 s retry backoff"
    );
    job.user_resume().unwrap();

    // Resumed, it retries and fails again; cancel right after.
    next_error(sub, far).expect("retried after the resume");
    let t = Instant::now();
    job.user_cancel(true).unwrap();
    job.wait_status(Duration::from_secs(10), is_gone)
        .expect("cancelled job concluded");
    let gone_after = t.elapsed();
    assert!(
        gone_after < Duration::from_millis(700),
        "a cancel waited {gone_after:?} for a 1 s retry backoff"
    );
}

/// An 8 MiB patterned raw source `src` and a target `name` whose every
/// write fails with `errno`, in a new context, subscribed to.
fn source_and_failing_target(
    name: &str,
    errno: i32,
) -> (tempfile::TempDir, Context, blockjob::events::Subscription) {
    let dir = tempfile::tempdir().unwrap();
    let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
    patterned(&src, 8);
    std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).unwrap();
    let ctx = Context::new();
    raw(&ctx, "src", &src);
    faulty_raw(
        &ctx,
        name,
        &dst,
        json!([{"event":"write_aio","errno":errno}]),
    );
    let sub = ctx.subscribe();
    (dir, ctx, sub)
}

#[test]
fn mirror_persistent_fault_under_ignore() {
    let (_dir, ctx, sub) = source_and_failing_target("dst", libc::EIO);
    let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
    o.job_id = Some("m".into());
    o.on_target_error = BlockdevOnError::Ignore;
    let job = ctx.blockdev_mirror(o).unwrap();
    // Each copy worker may fail once before its retry queues behind the
    // others'.
    persistent_fault_is_spaced(&job, &sub, 12 + io_workers());
}

#[test]
fn backup_persistent_fault_under_ignore() {
    let (_dir, ctx, sub) = source_and_failing_target("tgt", libc::ENOSPC);
    let mut o = BackupOptions::new("src", "tgt", MirrorSyncMode::Full);
    o.job_id = Some("b".into());
    o.on_target_error = BlockdevOnError::Ignore;
    let job = ctx.blockdev_backup(o).unwrap();
    // One error action per copy round.
    persistent_fault_is_spaced(&job, &sub, 12);
}

/// base (raw, 8 MiB of 0x01: a fault's `sector` is a guest offset) <-
/// mid (qcow2, 8 MiB of 0x02) <- top (qcow2, empty), made by QEMU.
fn chain8(dir: &Path) -> [std::path::PathBuf; 3] {
    let base = dir.join("base.raw");
    let [mid, top] = ["mid", "top"].map(|n| dir.join(format!("{n}.qcow2")));
    tool("qemu-img", &["create", "-q", "-f", "raw", s(&base), "8M"]);
    overlay(&mid, &base, "raw");
    overlay(&top, &mid, "qcow2");
    tool("qemu-io", &["-f", "raw", "-c", "write -P 1 0 8M", s(&base)]);
    tool("qemu-io", &["-c", "write -P 2 0 8M", s(&mid)]);
    [base, mid, top]
}

/// The chain of [`chain8`] with base's file through blkdebug `rules`.
fn add_chain8(ctx: &Context, [base, mid, top]: &[std::path::PathBuf; 3], base_rules: Value) {
    ctx.blockdev_add(
        &json!({"driver":"raw","node-name":"base","file":{"driver":"blkdebug",
        "image":{"driver":"file","filename":base},"inject-error":base_rules}}),
    )
    .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"mid",
        "file":{"driver":"file","filename":mid},"backing":"base"}))
        .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top},"backing":"mid"}))
        .unwrap();
}

fn commit_mid(ctx: &Context) -> Arc<Job> {
    let mut o = CommitOptions::new("top");
    o.job_id = Some("c".into());
    o.top_node = Some("mid".into());
    o.base_node = Some("base".into());
    o.on_error = BlockdevOnError::Ignore;
    ctx.block_commit(o).unwrap()
}

#[test]
fn commit_persistent_fault_under_ignore() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain8(dir.path());
    let ctx = Context::new();
    add_chain8(&ctx, &chain, json!([{"event":"write_aio","errno":5}]));
    let sub = ctx.subscribe();
    let job = commit_mid(&ctx);
    persistent_fault_is_spaced(&job, &sub, 12);
}

/// Twelve transient faults, each in its own 512 KiB chunk of base: each
/// heals on its retry, so each waits 1 ms. Without the start-over every
/// fault would wait twice as long as the one before (1 ms ... 512 ms,
/// then 1 s, 1 s: at least 3 s in all), so a job done in under 2.5 s
/// proves the heal; the result is the committed data.
#[test]
fn commit_transient_faults_heal_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain8(dir.path());
    let before = flat(&chain[2]);
    let rules: Vec<Value> = (0..12u64)
        .map(|i| json!({"event":"write_aio","errno":5,"once":true,"sector":(i * 512 * 1024 + 65536) / 512}))
        .collect();
    let ctx = Context::new();
    add_chain8(&ctx, &chain, Value::Array(rules));
    let sub = ctx.subscribe();
    let t = Instant::now();
    let job = commit_mid(&ctx);
    job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null)
        .expect("commit ended");
    let took = t.elapsed();
    let (mut errors, mut ok) = (0, None);
    while let Some(e) = sub.try_next() {
        match &e.data {
            EventData::BlockJobError { action, .. } => {
                assert_eq!(*action, BlockErrorAction::Ignore);
                errors += 1;
            }
            EventData::BlockJobCompleted { error, .. } => ok = Some(error.is_none()),
            _ => {}
        }
    }
    assert_eq!(errors, 12, "one event per transient fault");
    assert_eq!(ok, Some(true), "the commit succeeded");
    assert!(
        took < Duration::from_millis(2500),
        "12 healed faults took {took:?}: the backoff did not start over"
    );
    drop(job);
    drop(ctx);
    assert_eq!(flat(&chain[2]), before, "top reads what it read before");
    assert_eq!(
        std::fs::read(&chain[0]).unwrap(),
        vec![2u8; (8 * MIB) as usize],
        "mid is in base"
    );
}

#[test]
fn mirror_and_backup_transient_fault_heals() {
    for job_kind in ["mirror", "backup"] {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst) = (dir.path().join("src.raw"), dir.path().join("dst.raw"));
        let data = patterned(&src, 8);
        std::fs::write(&dst, vec![0u8; (8 * MIB) as usize]).unwrap();
        let ctx = Context::new();
        raw(&ctx, "src", &src);
        faulty_raw(
            &ctx,
            "dst",
            &dst,
            json!([{"event":"write_aio","errno":5,"once":true,"sector":(3 * MIB) / 512}]),
        );
        let sub = ctx.subscribe();
        let job = if job_kind == "mirror" {
            let mut o = MirrorOptions::new("src", "dst", MirrorSyncMode::Full);
            o.job_id = Some("j".into());
            o.on_target_error = BlockdevOnError::Ignore;
            ctx.blockdev_mirror(o).unwrap()
        } else {
            let mut o = BackupOptions::new("src", "dst", MirrorSyncMode::Full);
            o.job_id = Some("j".into());
            o.on_target_error = BlockdevOnError::Ignore;
            ctx.blockdev_backup(o).unwrap()
        };
        let mut errors = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut result = None;
        while result.is_none() {
            let e = sub
                .next_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|| panic!("{job_kind}: no end"));
            match &e.data {
                EventData::BlockJobError { action, .. } => {
                    assert_eq!(*action, BlockErrorAction::Ignore);
                    errors += 1;
                }
                EventData::BlockJobReady(_) => job.complete().unwrap(),
                EventData::BlockJobCompleted { error, .. } => result = Some(error.clone()),
                _ => {}
            }
        }
        assert_eq!(errors, 1, "{job_kind}: one event for one transient fault");
        assert_eq!(result, Some(None), "{job_kind}: succeeded");
        job.wait_status(Duration::from_secs(30), |s| s == JobStatus::Null)
            .expect("job gone");
        drop(job);
        drop(ctx);
        assert!(
            std::fs::read(&dst).unwrap() == data,
            "{job_kind}: target is the source"
        );
    }
}

/// Stream's `ignore` skips the failing chunk (QEMU's `stream_run`) and
/// fails at the end: no retry, so nothing to space out; each failing
/// chunk is one event and the job ends by itself.
#[test]
fn stream_ignore_does_not_retry() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = chain8(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&json!({"driver":"raw","node-name":"base",
        "file":{"driver":"file","filename":base}}))
        .unwrap();
    // Mid's data reads fail, always.
    ctx.blockdev_add(
        &json!({"driver":"qcow2","node-name":"mid","file":{"driver":"blkdebug",
        "image":{"driver":"file","filename":mid},
        "inject-error":[{"event":"read_aio","errno":5}]},"backing":"base"}),
    )
    .unwrap();
    ctx.blockdev_add(&json!({"driver":"qcow2","node-name":"top",
        "file":{"driver":"file","filename":top},"backing":"mid"}))
        .unwrap();
    let sub = ctx.subscribe();
    let mut o = StreamOptions::new("top");
    o.job_id = Some("s".into());
    o.on_error = BlockdevOnError::Ignore;
    let job = ctx.block_stream(o).unwrap();
    job.wait_status(Duration::from_secs(60), |s| s == JobStatus::Null)
        .expect("stream ended by itself");
    let (mut errors, mut failed) = (0, None);
    while let Some(e) = sub.try_next() {
        match &e.data {
            EventData::BlockJobError { .. } => errors += 1,
            EventData::BlockJobCompleted { error, .. } => failed = error.clone(),
            _ => {}
        }
    }
    // 8 MiB in 512 KiB chunks, every one read from mid.
    assert_eq!(errors, 16, "one event per chunk");
    assert_eq!(failed.as_deref(), Some("Input/output error"));
}

/// A drained section (a VM stop) begun while a retry waits its second
/// returns at once: the drain pauses the job, which ends the wait; the
/// job goes on retrying after the section.
#[test]
fn a_drain_is_not_held_up_by_the_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let chain = chain8(dir.path());
    let ctx = Context::new();
    add_chain8(&ctx, &chain, json!([{"event":"write_aio","errno":5}]));
    let sub = ctx.subscribe();
    let job = commit_mid(&ctx);
    // Let the wait grow past half a second (1 + 2 + ... + 512 ms).
    let grown = Instant::now() + Duration::from_millis(1100);
    let far = Instant::now() + Duration::from_secs(30);
    while Instant::now() < grown {
        next_error(&sub, far).expect("retrying");
    }
    next_error(&sub, far).expect("retrying");
    let t = Instant::now();
    ctx.drain_all_begin();
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "a drain waited {took:?} for the retry backoff"
    );
    ctx.drain_all_end().unwrap();
    next_error(&sub, far).expect("retrying after the drain");
    job.user_cancel(true).unwrap();
    job.wait_status(Duration::from_secs(10), is_gone)
        .expect("cancelled");
}
