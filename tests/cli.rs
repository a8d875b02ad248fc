//! The `blockjob` command: demo, `mirror` with its flags, `--events` and
//! `--stats` output, exit status and one-line errors, and that a failed
//! command leaves no target it created behind.

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const MIB: u64 = 1 << 20;

fn blockjob(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockjob"))
        .args(args)
        .output()
        .expect("run blockjob")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn stdout_json(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect()
}

/// `size` bytes with data in every other MiB (holes in between).
fn image(dir: &Path, name: &str, size: u64, data: bool) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    if data {
        for off in (0..size).step_by(2 * MIB as usize) {
            let chunk: Vec<u8> = (0..MIB).map(|i| ((off + i) * 7 % 251) as u8).collect();
            f.write_all_at(&chunk[..MIB.min(size - off) as usize], off)
                .unwrap();
        }
    }
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_img_identical(a: &Path, b: &Path) -> bool {
    common::require_tool("qemu-img");
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "raw", s(a), s(b)])
        .status()
        .unwrap()
        .success()
}

/// The one-line error on stderr (the last line).
fn error_line(o: &Output) -> String {
    stderr(o).lines().last().unwrap_or_default().to_string()
}

#[test]
fn demo_mirrors_through_a_transient_error_and_verifies() {
    let o = blockjob(&["demo", "--size", "64M", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names: Vec<String> = stdout_json(&o).iter().map(common::qmp::summarize).collect();
    assert_eq!(
        names,
        [
            "JSC:created",
            "JSC:running",
            "ERR(read,ignore)",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    let err = stderr(&o);
    assert!(err.contains("target identical to the source"), "{err}");
    assert!(
        err.contains("allocated: source 32.0 MiB, target 32.0 MiB"),
        "{err}"
    );
}

#[test]
fn mirror_creates_a_sparse_identical_target_and_reports_stats() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 16 * MIB, true);
    let dst = dir.path().join("dst.raw");
    let o = blockjob(&["mirror", s(&src), s(&dst), "--create", "--stats", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = stdout_json(&o);
    assert_eq!(stats.len(), 1, "one stats line");
    assert_eq!(stats[0]["len"], 16 * MIB);
    assert_eq!(stats[0]["bytes"], 16 * MIB);
    assert_eq!(stats[0]["pivoted"], true);
    assert_eq!(stats[0]["job-errors"], 0);
    assert!(stats[0]["ready-seconds"].as_f64().unwrap() <= stats[0]["seconds"].as_f64().unwrap());
    assert!(qemu_img_identical(&src, &dst));
    // Holes stayed holes: the target holds only the source's 8 MiB of data.
    let alloc = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        alloc <= 8 * MIB + 64 * 1024,
        "target allocates {alloc} bytes"
    );
}

#[test]
fn mirror_flags_reach_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 8 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 8 * MIB, false);
    let o = blockjob(&[
        "mirror",
        s(&src),
        s(&dst),
        "--job-id",
        "m1",
        "--granularity",
        "4K",
        "--buf-size",
        "1M",
        "--copy-mode",
        "write-blocking",
        "--auto-finalize",
        "false",
        "--auto-dismiss",
        "false",
        "--unmap",
        "false",
        "--events",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let evs = stdout_json(&o);
    assert!(
        evs.iter()
            .all(|e| e["data"]["id"] == "m1" || e["data"]["device"] == "m1")
    );
    let names: Vec<String> = evs.iter().map(common::qmp::summarize).collect();
    // Manual finalize and dismiss: the command finalizes at PENDING and
    // dismisses at CONCLUDED.
    assert_eq!(
        names,
        [
            "JSC:created",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "PENDING",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert!(qemu_img_identical(&src, &dst));
}

#[test]
fn no_complete_cancels_at_ready_without_pivot() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 4 * MIB, false);
    let o = blockjob(&["mirror", s(&src), s(&dst), "--no-complete", "--stats", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["pivoted"], false);
    // Cancelled after READY: the target is consistent at that point.
    assert!(qemu_img_identical(&src, &dst));
}

#[test]
fn sync_none_copies_nothing_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 4 * MIB, false);
    let o = blockjob(&[
        "mirror",
        s(&src),
        s(&dst),
        "--sync",
        "none",
        "--stats",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["bytes"], 0);
    assert!(!qemu_img_identical(&src, &dst));
    assert_eq!(std::fs::metadata(&dst).unwrap().blocks(), 0);
}

#[test]
fn errors_are_one_line_with_qemus_text_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", MIB, true);
    let big = image(dir.path(), "big.raw", 2 * MIB, false);
    let missing = dir.path().join("missing.raw");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["mirror", "/nonexistent/x", s(&big)],
            "blockjob: Could not open '/nonexistent/x': No such file or directory".into(),
        ),
        (
            vec!["mirror", s(&src), s(&big)],
            "blockjob: Source and target image have different sizes".into(),
        ),
        (
            vec!["mirror", s(&src), s(&missing)],
            format!(
                "blockjob: Could not open '{}': No such file or directory",
                missing.display()
            ),
        ),
        (
            vec!["mirror", s(&src), s(&missing), "--create", "--granularity", "1000"],
            "blockjob: Parameter 'granularity' expects a power of 2".into(),
        ),
        (
            vec!["mirror", s(&src), s(&missing), "--create", "--granularity", "128M"],
            "blockjob: Parameter 'granularity' expects a value in range [512B, 64MB]".into(),
        ),
        (
            vec!["mirror", s(&src), s(&src)],
            format!(
                "blockjob: '{}' and '{}' are the same file",
                src.display(),
                src.display()
            ),
        ),
        (
            vec!["mirror", s(&src), "json:{\"driver\":"],
            "blockjob: Could not parse 'json:{\"driver\":': EOF while parsing a value at line 1 column 10".into(),
        ),
        (
            vec!["mirror", s(&src), "json:{\"driver\":\"null-co\"}", "--create"],
            "blockjob: --create needs DST to be a path".into(),
        ),
        (
            vec!["mirror", s(&src), "json:{\"driver\":\"nope\"}"],
            "blockjob: Parameter 'driver' does not accept value 'nope'".into(),
        ),
        (
            vec!["mirror", s(&src), s(&missing), "--create", "--job-id", "1bad"],
            "blockjob: Invalid job ID '1bad'".into(),
        ),
    ];
    for (args, want) in cases {
        let o = blockjob(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_eq!(error_line(&o), want, "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        // A target the command created is gone again.
        assert!(!missing.exists(), "{args:?} left {}", missing.display());
    }
    // Bad usage is clap's exit status 2.
    for args in [
        vec!["mirror"],
        vec!["mirror", "a", "b", "--sync", "sideways"],
        vec!["mirror", "a", "b", "--speed", "-1"],
        vec!["mirror", "a", "b", "--on-source-error", "panic"],
        vec!["frobnicate"],
    ] {
        assert_eq!(blockjob(&args).status.code(), Some(2), "{args:?}");
    }
}

fn blkdebug(path: &Path, event: &str, errno: i32, once: bool) -> String {
    format!(
        "json:{}",
        serde_json::json!({"driver":"raw","file":{"driver":"blkdebug",
            "image":{"driver":"file","filename":path},
            "inject-error":[{"event":event,"errno":errno,"once":once}]}})
    )
}

#[test]
fn persistent_target_error_reports_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 4 * MIB, false);
    let target = blkdebug(&dst, "write_aio", libc::EIO, false);
    let o = blockjob(&["mirror", s(&src), &target, "--events", "-q"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(error_line(&o), "blockjob: Input/output error");
    let names: Vec<String> = stdout_json(&o).iter().map(common::qmp::summarize).collect();
    assert!(
        names.contains(&"ERR(write,report)".to_string()),
        "{names:?}"
    );
    assert_eq!(names.last().unwrap(), "JSC:null");
}

#[test]
fn stop_policy_resumes_then_gives_up_on_a_persistent_error() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 4 * MIB, false);
    // Transient ENOSPC: one stop, one resume, then success.
    let target = blkdebug(&dst, "write_aio", libc::ENOSPC, true);
    let o = blockjob(&[
        "mirror",
        s(&src),
        &target,
        "--on-target-error",
        "enospc",
        "--resume-delay",
        "0",
        "--stats",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("io-status nospace"), "{}", stderr(&o));
    assert!(qemu_img_identical(&src, &dst));
    // Persistent EIO with stop: resumed twice, then force-cancelled.
    let dst2 = image(dir.path(), "dst2.raw", 4 * MIB, false);
    let target = blkdebug(&dst2, "write_aio", libc::EIO, false);
    let o = blockjob(&[
        "mirror",
        s(&src),
        &target,
        "--on-target-error",
        "stop",
        "--resume-delay",
        "0",
        "--max-resumes",
        "2",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(
        error_line(&o),
        "blockjob: the job stopped 3 times after I/O errors (io-status failed)"
    );
}
