//! The qcow2 backing link against real `qemu-img`: what `read_header` reads
//! is what `qemu-img info` shows, and after every `set_backing` QEMU sees
//! exactly the new link, `qemu-img check` is clean and data reads through it.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::process::{Command, Output};

use blockjob::block::qcow2::header::{Qcow2Header, read_header, set_backing};

fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is installed")
}

fn run(args: &[&str]) {
    let out = qemu_img(args);
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn open_rw(path: &str) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap()
}

/// `(backing-filename, backing-filename-format)` as `qemu-img info` shows them.
fn qemu_link(path: &str) -> (Option<String>, Option<String>) {
    let out = qemu_img(&["info", "--output=json", "-f", "qcow2", path]);
    assert!(out.status.success());
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |k: &str| info[k].as_str().map(str::to_string);
    (field("backing-filename"), field("backing-filename-format"))
}

fn assert_check_clean(path: &str) {
    run(&["check", "-f", "qcow2", path]);
}

/// Whether the top image reads the same as `other` (through its backing).
fn same_data(top: &str, other: &str, other_fmt: &str) -> bool {
    let out = qemu_img(&["compare", "-f", "qcow2", "-F", other_fmt, top, other]);
    assert!(out.status.code().unwrap() <= 1, "qemu-img compare failed");
    out.status.success()
}

/// Sets the link, then checks our reader, qemu-img info and qemu-img check agree.
fn relink(top: &str, backing: Option<(&str, Option<&str>)>) -> Qcow2Header {
    set_backing(&open_rw(top), backing).unwrap();
    let header = read_header(&File::open(top).unwrap()).unwrap();
    let expected = match backing {
        Some((name, fmt)) => (Some(name.to_string()), fmt.map(str::to_string)),
        None => (None, None),
    };
    assert_eq!(
        (header.backing_file.clone(), header.backing_format.clone()),
        expected
    );
    assert_eq!(qemu_link(top), expected);
    assert_check_clean(top);
    assert_cluster0_tail_zero(top, &header);
    header
}

/// Past the end marker and the name cluster 0 is all zeros, as QEMU leaves
/// it: no stale bytes of an older, longer layout.
fn assert_cluster0_tail_zero(top: &str, header: &Qcow2Header) {
    let b = std::fs::read(top).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize;
    let backing_offset = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    // Walk to the end marker (type 0); the name, if any, follows it.
    let mut pos = header.header_length as usize;
    while be32(pos) != 0 {
        pos += 8 + be32(pos + 4).next_multiple_of(8);
    }
    let mut end = pos + 8;
    if backing_offset != 0 {
        assert_eq!(backing_offset, end);
        end += be32(16);
    }
    assert!(b[end..header.cluster_size as usize].iter().all(|&x| x == 0));
}

fn round_trip(compat: &str, version: u32) {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let (base, base2, top) = (p("base.raw"), p("base2.qcow2"), p("top.qcow2"));
    run(&["create", "-q", "-f", "raw", &base, "1M"]);
    run(&["create", "-q", "-f", "qcow2", &base2, "1M"]);
    // Tell the bases apart by content: base.raw has a pattern, base2 is zero.
    let io = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 0 64k", &base])
        .output()
        .unwrap();
    assert!(io.status.success());
    run(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &format!("compat={compat}"),
        "-b",
        &base,
        "-F",
        "raw",
        &top,
        "1M",
    ]);

    let header = read_header(&File::open(&top).unwrap()).unwrap();
    assert_eq!(header.version, version);
    assert_eq!(header.cluster_size, 65536);
    assert_eq!(header.size, 1 << 20);
    assert_eq!(header.header_length, if version == 2 { 72 } else { 112 });
    assert_eq!(
        (header.backing_file.clone(), header.backing_format.clone()),
        qemu_link(&top)
    );
    assert_eq!(header.backing_file.as_deref(), Some(base.as_str()));
    assert_eq!(header.backing_format.as_deref(), Some("raw"));
    assert!(same_data(&top, &base, "raw"));

    let h = relink(&top, Some((&base2, Some("qcow2"))));
    // Nothing but the link changed.
    assert_eq!(
        Qcow2Header {
            backing_file: None,
            backing_format: None,
            ..h
        },
        Qcow2Header {
            backing_file: None,
            backing_format: None,
            ..header
        }
    );
    assert!(same_data(&top, &base2, "qcow2"));
    assert!(!same_data(&top, &base, "raw"));

    relink(&top, None);
    assert!(!same_data(&top, &base, "raw"));

    // Without a format QEMU probes the backing file; the raw base still reads.
    relink(&top, Some((&base, None)));
    relink(&top, Some((&base, Some("raw"))));
    assert!(same_data(&top, &base, "raw"));

    // A longer name, then a shorter one: no stale tail of the old name.
    let long = p(&"n".repeat(200));
    std::fs::copy(&base, &long).unwrap();
    relink(&top, Some((&long, Some("raw"))));
    relink(&top, Some((&base, Some("raw"))));
    assert!(same_data(&top, &base, "raw"));

    // An empty name removes the link, as `qemu-img rebase -u -b ''` does.
    set_backing(&open_rw(&top), Some(("", Some("raw")))).unwrap();
    assert_eq!(qemu_link(&top), (None, None));
    assert_check_clean(&top);
}

#[test]
fn v3_round_trip() {
    round_trip("1.1", 3);
}

#[test]
fn v2_round_trip() {
    round_trip("0.10", 2);
}

/// `(type, data)` of every header extension but the backing format, in order.
fn other_extensions(path: &str) -> Vec<(u32, Vec<u8>)> {
    let b = std::fs::read(path).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut pos = if be32(4) == 2 { 72 } else { be32(100) as usize };
    let mut exts = Vec::new();
    loop {
        let (kind, len) = (be32(pos), be32(pos + 4) as usize);
        if kind == 0 {
            return exts;
        }
        if kind != 0xE279_2ACA {
            exts.push((kind, b[pos + 8..pos + 8 + len].to_vec()));
        }
        pos += 8 + len.next_multiple_of(8);
    }
}

fn extensions_survive(dir: &Path, top: &str, expected_kinds: &[u32]) {
    let before = other_extensions(top);
    let kinds: Vec<u32> = before.iter().map(|e| e.0).collect();
    assert_eq!(kinds, expected_kinds);
    let info_before = qemu_img(&["info", "--output=json", top]).stdout;

    let other = dir.join("other.raw");
    let other = other.to_str().unwrap();
    run(&["create", "-q", "-f", "raw", other, "1M"]);
    relink(top, Some((other, Some("raw"))));
    assert_eq!(other_extensions(top), before);
    relink(top, None);
    assert_eq!(other_extensions(top), before);
    relink(top, Some((other, Some("raw"))));
    assert_eq!(other_extensions(top), before);

    // QEMU still sees the same image apart from the link.
    let strip = |json: &[u8]| {
        let mut v: serde_json::Value = serde_json::from_slice(json).unwrap();
        let o = v.as_object_mut().unwrap();
        for k in [
            "backing-filename",
            "full-backing-filename",
            "backing-filename-format",
        ] {
            o.remove(k);
        }
        o.remove("children");
        o.remove("actual-size");
        v
    };
    let info_after = qemu_img(&["info", "--output=json", top]).stdout;
    assert_eq!(strip(&info_after), strip(&info_before));
}

#[test]
fn feature_table_and_bitmaps_survive() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let top = dir.path().join("top.qcow2");
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    run(&["create", "-q", "-f", "raw", base, "1M"]);
    run(&[
        "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top, "1M",
    ]);
    run(&["bitmap", "--add", "-f", "qcow2", top, "b0"]);
    // Feature name table, bitmaps.
    extensions_survive(dir.path(), top, &[0x6803_f857, 0x2385_2875]);
}

#[test]
fn external_data_file_survives() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let data = dir.path().join("data.raw");
    let top = dir.path().join("top.qcow2");
    let (base, top) = (base.to_str().unwrap(), top.to_str().unwrap());
    let opts = format!("data_file={}", data.display());
    run(&["create", "-q", "-f", "raw", base, "1M"]);
    run(&[
        "create", "-q", "-f", "qcow2", "-o", &opts, "-b", base, "-F", "raw", top, "1M",
    ]);
    // External data file name, feature name table.
    extensions_survive(dir.path(), top, &[0x4441_5441, 0x6803_f857]);
}
