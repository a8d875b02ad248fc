//! `blockjob backup`: a full backup into a new qcow2 reads as the source;
//! the nightly routine (a full backup that starts a persistent bitmap,
//! guest writes by QEMU's own `qemu-io` between runs, incremental backups
//! into qcow2 images backed by the previous backup) restores the disk
//! byte for byte at every night; errors are one line with QEMU's text and
//! leave no target behind.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::chain::tool;
use serde_json::Value;

fn blockjob_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockjob"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run blockjob")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "blockjob failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The guest view of `img` as raw bytes.
fn view(img: &Path) -> Vec<u8> {
    let out = img.with_extension("view");
    tool("qemu-img", &["convert", "-U", "-O", "raw", s(img), s(&out)]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// `qemu-io` on the image (QEMU opens it read-write: persistent bitmaps
/// record its writes and are stored back when it closes).
fn qemu_io(img: &Path, cmd: &str) {
    tool("qemu-io", &["-c", cmd, s(img)]);
}

/// The persistent bitmaps `qemu-img info` lists: (name, flags).
fn image_bitmaps(img: &Path) -> Vec<(String, Vec<String>)> {
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "-U", "--output=json", s(img)])).unwrap();
    info["format-specific"]["data"]["bitmaps"]
        .as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    let flags = b["flags"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|f| f.as_str().unwrap().to_string())
                        .collect();
                    (b["name"].as_str().unwrap().to_string(), flags)
                })
                .collect()
        })
        .unwrap_or_default()
}

fn disk(dir: &Path) -> PathBuf {
    let d = dir.join("disk.qcow2");
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&d), "32M"]);
    qemu_io(&d, "write -P 1 0 8M");
    qemu_io(&d, "write -P 2 20M 2M");
    d
}

#[test]
fn full_backup_reads_as_the_source_and_reports_stats() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path());
    let o = blockjob_in(
        dir.path(),
        &["backup", "disk.qcow2", "full.qcow2", "--stats", "-q"],
    );
    ok(&o);
    let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(stats["bytes"], 32 << 20, "{stats}");
    let full = dir.path().join("full.qcow2");
    assert!(view(&d) == view(&full));
    tool("qemu-img", &["check", "-q", s(&full)]);
    // A raw target, with the events as QMP lines.
    let o = blockjob_in(
        dir.path(),
        &[
            "backup",
            "disk.qcow2",
            "full.img",
            "--target-format",
            "raw",
            "--events",
            "-q",
        ],
    );
    ok(&o);
    let events: Vec<String> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(
        events.contains(&"BLOCK_JOB_COMPLETED".to_string()),
        "{events:?}"
    );
    assert!(view(&d) == std::fs::read(dir.path().join("full.img")).unwrap());
}

#[test]
fn nightly_full_and_incrementals_restore_every_night() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path());
    let mut nights = vec![view(&d)];
    ok(&blockjob_in(
        dir.path(),
        &[
            "backup",
            "disk.qcow2",
            "full.qcow2",
            "--new-bitmap",
            "nightly",
            "-q",
        ],
    ));
    // The bitmap is in the image, where QEMU finds it.
    assert_eq!(
        image_bitmaps(&d),
        vec![("nightly".to_string(), vec!["auto".to_string()])]
    );
    let mut prev = "full.qcow2".to_string();
    for (night, writes) in [
        ["write -P 3 1M 64k", "write -P 4 30M 1M"],
        ["write -P 5 1M 4k", "write -P 6 12M 3M"],
        ["write -P 7 0 64k", "write -z 20M 1M"],
    ]
    .iter()
    .enumerate()
    {
        for w in writes {
            qemu_io(&d, w);
        }
        nights.push(view(&d));
        let inc = format!("inc{}.qcow2", night + 1);
        let o = blockjob_in(
            dir.path(),
            &[
                "backup",
                "disk.qcow2",
                &inc,
                "--sync",
                "incremental",
                "--bitmap",
                "nightly",
                "--backing",
                &prev,
                "--stats",
                "-q",
            ],
        );
        ok(&o);
        let stats: Value = serde_json::from_slice(&o.stdout).unwrap();
        // Only what changed was copied (whole 64 KiB clusters).
        let copied = stats["bytes"].as_u64().unwrap();
        assert!(copied < 5 << 20, "night {night}: copied {copied}");
        prev = inc;
    }
    // Each backup, read through its chain, is the disk of its night.
    let backups = ["full.qcow2", "inc1.qcow2", "inc2.qcow2", "inc3.qcow2"];
    for (i, b) in backups.iter().enumerate() {
        let img = dir.path().join(b);
        assert!(view(&img) == nights[i], "{b} does not restore night {i}");
        tool("qemu-img", &["check", "-q", s(&img)]);
    }
    // The bitmap is clean again after the last incremental, and QEMU
    // agrees (no write since).
    assert_eq!(image_bitmaps(&d)[0].0, "nightly");
}

#[test]
fn incrementals_from_a_bitmap_qemu_img_made() {
    let dir = tempfile::tempdir().unwrap();
    let d = disk(dir.path());
    // QEMU's tool adds the bitmap; the full backup is taken at that point.
    tool("qemu-img", &["bitmap", "--add", s(&d), "qb"]);
    ok(&blockjob_in(
        dir.path(),
        &["backup", "disk.qcow2", "full.qcow2", "-q"],
    ));
    qemu_io(&d, "write -P 5 6M 128k");
    let night1 = view(&d);
    ok(&blockjob_in(
        dir.path(),
        &[
            "backup",
            "disk.qcow2",
            "inc.qcow2",
            "--sync",
            "incremental",
            "--bitmap",
            "qb",
            "--backing",
            "full.qcow2",
            "-q",
        ],
    ));
    assert!(view(&dir.path().join("inc.qcow2")) == night1);
    // Synced, and stored back where QEMU reads it: clean, still `auto`.
    let info: Value =
        serde_json::from_str(&tool("qemu-img", &["info", "-U", "--output=json", s(&d)])).unwrap();
    assert_eq!(
        image_bitmaps(&d),
        vec![("qb".to_string(), vec!["auto".to_string()])]
    );
    assert!(info["format-specific"]["data"]["corrupt"] == false);
}

#[test]
fn errors_are_one_line_and_leave_no_target() {
    let dir = tempfile::tempdir().unwrap();
    disk(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (
            &["--sync", "incremental"],
            "blockjob: must provide a valid bitmap name for 'incremental' sync mode",
        ),
        (
            &["--sync", "bitmap", "--bitmap", "nosuch"],
            "blockjob: Bitmap 'nosuch' could not be found",
        ),
        (
            &["--compress"],
            "blockjob: Compression is not supported for this drive ",
        ),
        (
            &["--max-workers", "0"],
            "blockjob: max-workers must be between 1 and 2147483647",
        ),
    ];
    for (extra, text) in cases {
        let mut args = vec!["backup", "disk.qcow2", "new.qcow2", "-q"];
        args.extend_from_slice(extra);
        let o = blockjob_in(dir.path(), &args);
        assert_eq!(o.status.code(), Some(1), "{extra:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().last().unwrap_or(""), *text, "{extra:?}");
        assert!(
            !dir.path().join("new.qcow2").exists(),
            "{extra:?} left its target"
        );
    }
    let o = blockjob_in(dir.path(), &["backup", "nosuch.img", "new.qcow2", "-q"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(!dir.path().join("new.qcow2").exists());
}
