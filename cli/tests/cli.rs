//! The `blockjob` command: demo, `mirror` with its flags, `--events` and
//! `--stats` output, exit status and one-line errors, and that a failed
//! command leaves no target it created behind.

#[path = "../../tests/common/mod.rs"]
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

/// A block device given as a path opens as `host_device` (QEMU's tools
/// probe it so; `file` would refuse it): a mirror onto a loop device.
#[test]
fn mirror_onto_a_block_device_path() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 16 * MIB, true);
    let backing = dir.path().join("lo.raw");
    std::fs::File::create(&backing)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let out = Command::new("losetup")
        .args(["-f", "--show"])
        .arg(&backing)
        .output()
        .expect("run losetup");
    assert!(out.status.success(), "{out:?}");
    let dev = String::from_utf8(out.stdout).unwrap().trim().to_string();
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(dev.clone());
    let o = blockjob(&["mirror", s(&src), &dev, "--stats", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["pivoted"], true);
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&backing).unwrap());
}

#[test]
fn mirror_onto_an_allocated_target_leaves_holes_where_the_source_has_them() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 16 * MIB, true);
    let dst = dir.path().join("dst.raw");
    let fill = |p: &Path| std::fs::write(p, vec![0xa5u8; 16 * MIB as usize]).unwrap();
    let alloc = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;

    // Default (--unmap true): the zeroed half is punched out.
    fill(&dst);
    assert!(alloc(&dst) >= 16 * MIB);
    let o = blockjob(&["mirror", s(&src), s(&dst), "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(qemu_img_identical(&src, &dst));
    assert!(
        alloc(&dst) <= 8 * MIB + 64 * 1024,
        "target allocates {}",
        alloc(&dst)
    );

    // --unmap false: zeroes are written, nothing is deallocated.
    fill(&dst);
    let o = blockjob(&["mirror", s(&src), s(&dst), "-q", "--unmap", "false"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(qemu_img_identical(&src, &dst));
    assert!(alloc(&dst) >= 16 * MIB, "target allocates {}", alloc(&dst));
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
fn replaces_accepts_a_node_below_a_filter_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = image(dir.path(), "src.raw", 4 * MIB, true);
    let dst = image(dir.path(), "dst.raw", 4 * MIB, false);
    let json_src = format!(
        "json:{}",
        serde_json::json!({"driver":"blkdebug","node-name":"dbg",
            "image":{"driver":"file","node-name":"f","filename":src}})
    );
    let o = blockjob(&["mirror", &json_src, s(&dst), "--replaces", "f", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(qemu_img_identical(&src, &dst));
    let o = blockjob(&["mirror", &json_src, s(&dst), "--replaces", "target", "-q"]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        error_line(&o),
        "blockjob: Cannot replace 'target' by a node mirrored from 'dbg', because it cannot be \
         guaranteed that doing so would not lead to an abrupt change of visible data"
    );
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
        (
            vec!["mirror", s(&src), s(&missing), "--create", "--replaces", "nope"],
            "blockjob: Failed to find node with node-name='nope'".into(),
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

// --- stream, commit and qcow2 mirrors on chains made by qemu-img ---

use common::chain::tool;

/// base <- mid <- top, see common::chain::chain.
fn qcow2_chain(dir: &Path) -> [PathBuf; 3] {
    let (b, m, t) = common::chain::chain(dir);
    [b, m, t]
}

/// `blockjob` run in `dir`, so relative names are relative to it.
fn blockjob_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockjob"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run blockjob")
}

/// The guest view of `img`, converted to a raw file next to it.
fn guest_view(img: &Path, name: &str) -> PathBuf {
    let out = img.with_file_name(name);
    tool("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    out
}

/// `img` reads as the raw file `raw`.
fn same_view(raw: &Path, img: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", "raw", "-F", "qcow2", s(raw), s(img)])
        .status()
        .unwrap()
        .success()
}

/// The backing file names of the chain from `top` down.
fn backing_names(top: &Path) -> Vec<Option<String>> {
    let info: Vec<Value> = serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", s(top)],
    ))
    .unwrap();
    info.iter()
        .map(|i| i["backing-filename"].as_str().map(str::to_string))
        .collect()
}

fn check_clean(imgs: &[&PathBuf]) {
    for img in imgs {
        tool("qemu-img", &["check", "-q", s(img)]);
    }
}

#[test]
fn stream_flattens_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    let o = blockjob(&["stream", s(&top), "--stats", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let stats = stdout_json(&o);
    assert_eq!(stats.len(), 1, "one stats line");
    assert_eq!(stats[0]["len"], 4 * MIB);
    assert_eq!(stats[0]["bytes"], 4 * MIB);
    assert_eq!(stats[0]["job-errors"], 0);
    assert_eq!(stats[0]["backing-file"], Value::Null);
    assert_eq!(backing_names(&top), [None]);
    check_clean(&[&top, &mid, &base]);
    assert!(same_view(&before, &top), "guest view changed");
}

#[test]
fn stream_with_base_keeps_base() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    // Relative names, resolved against the working directory.
    let o = blockjob_in(dir.path(), &["stream", "top.qcow2", "--base", "base.qcow2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("now has backing file {}", base.display())),
        "{}",
        stderr(&o)
    );
    assert_eq!(backing_names(&top), [Some(s(&base).to_string()), None]);
    check_clean(&[&top, &mid, &base]);
    assert!(same_view(&before, &top), "guest view changed");
}

#[test]
fn commit_of_an_intermediate_layer_shortens_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    let mid_view = guest_view(&mid, "mid.raw");
    let o = blockjob(&["commit", s(&top), "--top", s(&mid), "--events", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let names: Vec<String> = stdout_json(&o).iter().map(common::qmp::summarize).collect();
    assert_eq!(
        names,
        [
            "JSC:created",
            "JSC:running",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert!(
        stdout_json(&o)
            .iter()
            .all(|e| e["data"]["id"] == "commit0" || e["data"]["device"] == "commit0")
    );
    assert_eq!(backing_names(&top), [Some(s(&base).to_string()), None]);
    check_clean(&[&top, &mid, &base]);
    assert!(same_view(&before, &top), "guest view changed");
    assert!(same_view(&mid_view, &base), "base is not mid's old view");
}

#[test]
fn active_commit_pivots_and_base_holds_the_guest_view() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    let o = blockjob(&["commit", s(&top), "--events", "--stats", "-q"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = stdout_json(&o);
    let (stats, evs) = lines.split_last().unwrap();
    let names: Vec<String> = evs.iter().map(common::qmp::summarize).collect();
    assert_eq!(
        names,
        [
            "JSC:created",
            "JSC:running",
            "JSC:ready",
            "READY",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    assert_eq!(stats["pivoted"], true);
    assert!(stats["ready-seconds"].is_f64());
    // mid's 1 MiB and top's 512 KiB were above base.
    assert_eq!(stats["len"], 1536 * 1024);
    assert_eq!(stats["base"], s(&base));
    // QEMU changes no header in an active commit.
    assert_eq!(backing_names(&top).len(), 3);
    check_clean(&[&top, &mid, &base]);
    assert!(
        same_view(&before, &base),
        "base does not hold the guest view"
    );
}

#[test]
fn active_commit_no_complete_cancels_at_ready() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    let base_view = guest_view(&base, "base.raw");
    let o = blockjob(&[
        "commit",
        s(&top),
        "--base",
        s(&mid),
        "--no-complete",
        "--stats",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["pivoted"], false);
    assert_eq!(stdout_json(&o)[0]["len"], 512 * 1024);
    // The data is in mid (consistent at READY), base untouched.
    assert!(same_view(&before, &mid), "mid does not hold the guest view");
    assert!(same_view(&base_view, &base), "base changed");
    assert_eq!(backing_names(&top).len(), 3);
}

#[test]
fn mirror_qcow2_sync_top_copies_only_the_top_layer() {
    let dir = tempfile::tempdir().unwrap();
    let [_, mid, top] = qcow2_chain(dir.path());
    let dst = dir.path().join("dst.qcow2");
    let o = blockjob(&[
        "mirror",
        s(&top),
        s(&dst),
        "--source-format",
        "qcow2",
        "--target-format",
        "qcow2",
        "--sync",
        "top",
        "--create",
        "--stats",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["bytes"], 512 * 1024);
    // drive-mirror's absolute-paths: the new image is backed by top's backing file.
    assert_eq!(backing_names(&dst)[0].as_deref(), Some(s(&mid)));
    check_clean(&[&dst]);
    let map: Vec<Value> =
        serde_json::from_str(&tool("qemu-img", &["map", "--output=json", s(&dst)])).unwrap();
    let own: Vec<(u64, u64)> = map
        .iter()
        .filter(|m| m["depth"] == 0 && m["data"] == true)
        .map(|m| (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap()))
        .collect();
    assert_eq!(own, [(3 * MIB, 512 * 1024)], "{map:?}");
    let view = guest_view(&top, "top.raw");
    assert!(same_view(&view, &dst));

    // sync=full into a new qcow2: no backing file, the whole guest view.
    let full = dir.path().join("full.qcow2");
    let o = blockjob(&[
        "mirror",
        s(&top),
        s(&full),
        "--source-format",
        "qcow2",
        "--target-format",
        "qcow2",
        "--create",
        "-q",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(backing_names(&full), [None]);
    check_clean(&[&full]);
    assert!(same_view(&view, &full));
}

#[test]
fn stream_and_commit_errors_are_one_line_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let [base, mid, top] = qcow2_chain(dir.path());
    let files = || [&base, &mid, &top].map(|p| std::fs::read(p).unwrap());
    let (before, info) = (files(), backing_names(&top));
    let missing = dir.path().join("missing.qcow2");
    let nope = dir.path().join("nope.qcow2");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (
            vec!["stream", s(&missing)],
            format!(
                "Could not open '{}': No such file or directory",
                missing.display()
            ),
        ),
        (
            vec!["commit", s(&missing)],
            format!(
                "Could not open '{}': No such file or directory",
                missing.display()
            ),
        ),
        (
            vec!["stream", s(&top), "--base", s(&nope)],
            format!("Can't find '{}' in the backing chain", nope.display()),
        ),
        (
            vec!["stream", s(&top), "--base", s(&top)],
            format!("Can't find '{}' in the backing chain", top.display()),
        ),
        (
            vec!["stream", s(&top), "--backing-file", "x"],
            "backing file specified, but streaming the entire chain".into(),
        ),
        (
            vec!["commit", s(&top), "--top", s(&mid), "--base", s(&mid)],
            "cannot commit an image into itself".into(),
        ),
        (
            vec!["commit", s(&top), "--base", s(&nope)],
            format!("Can't find '{}' in the backing chain", nope.display()),
        ),
        (
            vec!["commit", s(&top), "--top", s(&nope)],
            format!("Top image file {} not found", nope.display()),
        ),
        (
            // QEMU: base defaults to the bottom, which is top itself here.
            vec!["commit", s(&top), "--top", s(&base)],
            "cannot commit an image into itself".into(),
        ),
        (
            vec!["commit", s(&top), "--backing-file", "x"],
            "'backing-file' specified, but 'top' is the active layer".into(),
        ),
        (
            vec!["commit", s(&top), "--job-id", "1bad"],
            "Invalid job ID '1bad'".into(),
        ),
    ];
    for (args, want) in cases {
        let o = blockjob(&args);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert_eq!(error_line(&o), format!("blockjob: {want}"), "{args:?}");
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(files() == before, "{args:?} changed an image");
        assert_eq!(backing_names(&top), info, "{args:?}");
        assert!(!missing.exists());
    }
    for args in [
        vec!["stream"],
        vec!["commit"],
        vec!["commit", "x", "--on-error", "panic"],
        vec!["stream", "x", "--speed", "1X"],
        vec!["mirror", "a", "b", "--target-format", "vmdk"],
    ] {
        assert_eq!(blockjob(&args).status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn stream_error_policies_stop_resumes_report_fails() {
    let dir = tempfile::tempdir().unwrap();
    let [_, mid, top] = qcow2_chain(dir.path());
    let before = guest_view(&top, "before.raw");
    let top0 = std::fs::read(&top).unwrap();
    // top over a mid whose first data read fails once (EIO).
    let image = format!(
        "json:{}",
        serde_json::json!({"driver":"qcow2","file":{"driver":"file","filename":top},
            "backing":{"driver":"qcow2","file":{"driver":"blkdebug",
                "image":{"driver":"file","filename":mid},
                "inject-error":[{"event":"read_aio","errno":libc::EIO,"once":true}]}}})
    );
    let o = blockjob(&["stream", &image, "--events", "-q"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert_eq!(error_line(&o), "blockjob: Input/output error");
    let names: Vec<String> = stdout_json(&o).iter().map(common::qmp::summarize).collect();
    assert!(names.contains(&"ERR(read,report)".to_string()), "{names:?}");
    assert_eq!(
        backing_names(&top).len(),
        3,
        "a failed stream keeps the chain"
    );
    assert!(same_view(&before, &top));

    std::fs::write(&top, &top0).unwrap();
    let o = blockjob(&[
        "stream",
        &image,
        "--on-error",
        "stop",
        "--resume-delay",
        "0",
        "--stats",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("io-status failed"), "{}", stderr(&o));
    assert_eq!(stdout_json(&o)[0]["job-errors"], 1);
    assert_eq!(backing_names(&top), [None]);
    assert!(same_view(&before, &top));
}
