//! qcow2 chains made by real qemu-img/qemu-io, and QEMU's view of them.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// Run a QEMU tool; its stdout, or a panic with its stderr.
pub fn tool(cmd: &str, args: &[&str]) -> String {
    super::require_tool(cmd);
    // The tests inspect images the context still holds (locked as QEMU
    // locks them): read-only inspections share, as `-U` does with QEMU.
    let mut args: Vec<&str> = args.to_vec();
    if cmd == "qemu-img"
        && matches!(args.first(), Some(&("check" | "info" | "map" | "compare")))
        && !args.contains(&"-U")
    {
        args.insert(1, "-U");
    }
    let out = Command::new(cmd).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A path as the `&str` the tools take.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img create -f qcow2 -b BACKING -F BACKING_FMT OVERLAY`: an empty
/// overlay, made by QEMU.
#[allow(dead_code)]
pub fn overlay(overlay: &Path, backing: &Path, backing_fmt: &str) {
    tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(backing),
            "-F",
            backing_fmt,
            s(overlay),
        ],
    );
}

/// base (4 MiB of 0x01) <- mid (0x02 at 1 MiB, 1 MiB) <- top (0x03 at
/// 3 MiB, 512 KiB): qcow2 with absolute backing names, made by QEMU.
pub fn chain(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let [base, mid, top] = ["base", "mid", "top"].map(|n| dir.join(format!("{n}.qcow2")));
    tool("qemu-img", &["create", "-q", "-f", "qcow2", s(&base), "4M"]);
    for (img, back) in [(&mid, &base), (&top, &mid)] {
        overlay(img, back, "qcow2");
    }
    for (img, cmd) in [
        (&base, "write -P 1 0 4M"),
        (&mid, "write -P 2 1M 1M"),
        (&top, "write -P 3 3M 512k"),
    ] {
        tool("qemu-io", &["-c", cmd, s(img)]);
    }
    (base, mid, top)
}

/// The guest-visible content of an image, as QEMU reads it.
pub fn flat(img: &Path) -> Vec<u8> {
    let out = img.with_extension("flat");
    tool("qemu-img", &["convert", "-U", "-O", "raw", s(img), s(&out)]);
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(out).unwrap();
    v
}

/// The backing file names of the chain from `top` down (qemu-img's view).
pub fn backing_chain(top: &Path) -> Vec<Option<String>> {
    let info: Vec<Value> = serde_json::from_str(&tool(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", "-U", s(top)],
    ))
    .unwrap();
    info.iter()
        .map(|i| i["backing-filename"].as_str().map(str::to_string))
        .collect()
}
