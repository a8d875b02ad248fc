//! qcow2 through imago, checked against real qemu-img / qemu-io: chains
//! built by QEMU read the same through us, our writes leave images that
//! `qemu-img check` finds clean and `qemu-img compare` finds identical to
//! the same writes done by QEMU, block-status agrees with `qemu-img map`.

mod common;

use std::path::Path;

use blockjob::Context;
use blockjob::block::backend::BackendOptions;
use serde_json::{Value, json};

const MIB: u64 = 1 << 20;

use common::chain::{chain, s as path_str, tool as run};

fn qcow2(name: &str, path: &Path) -> Value {
    json!({"driver":"qcow2","node-name":name,"file":{"driver":"file","filename":path}})
}

/// The guest-visible content of an image, as QEMU sees it.
fn qemu_flat(img: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join(format!(
        "{}.flat",
        img.file_name().unwrap().to_string_lossy()
    ));
    run(
        "qemu-img",
        &["convert", "-U", "-O", "raw", path_str(img), path_str(&out)],
    );
    std::fs::read(out).unwrap()
}

#[test]
fn a_chain_from_the_headers_reads_as_qemu_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let ctx = Context::new();
    let node = ctx.blockdev_add(&qcow2("top", &top)).unwrap();
    assert_eq!(node.len().unwrap(), 4 * MIB);
    // The chain: top -> mid -> base, the backing nodes auto-named.
    let mid = node.backing().expect("mid opened from top's header");
    let base = mid.backing().expect("base opened from mid's header");
    assert!(base.backing().is_none());
    assert!(mid.is_auto_named() && base.is_auto_named());
    let mut ours = vec![0u8; 4 * MIB as usize];
    node.pread(0, &mut ours).unwrap();
    assert!(
        ours == qemu_flat(&top, dir.path()),
        "content differs from QEMU's"
    );
}

#[test]
fn block_status_says_which_layer_holds_what() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    let ctx = Context::new();
    let node = ctx.blockdev_add(&qcow2("top", &top)).unwrap();
    // qemu-img map --output=json: depth 0 = top, 1 = mid, 2 = base.
    let map: Vec<Value> =
        serde_json::from_str(&run("qemu-img", &["map", "--output=json", path_str(&top)])).unwrap();
    for m in &map {
        let (start, length) = (m["start"].as_u64().unwrap(), m["length"].as_u64().unwrap());
        let depth = m["depth"].as_u64().unwrap();
        let mut off = start;
        while off < start + length {
            let st = node.block_status(off, start + length - off).unwrap();
            assert_eq!(st.allocated, depth == 0, "allocated at {off} ({m})");
            assert_eq!(st.data, m["data"].as_bool().unwrap(), "data at {off} ({m})");
            // Walk down to the layer QEMU names and check it holds the range.
            let mut layer = node.clone();
            for _ in 0..depth {
                layer = layer.backing().unwrap();
            }
            assert!(layer.block_status(off, st.len).unwrap().allocated, "{m}");
            off += st.len;
        }
    }
}

#[test]
fn our_writes_match_qemu_io_and_leave_a_clean_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, top) = chain(dir.path());
    // The same chain again for QEMU to write to.
    let qdir = dir.path().join("q");
    std::fs::create_dir(&qdir).unwrap();
    let (_, _, qtop) = chain(&qdir);
    // Partial clusters over backing data, whole clusters, zeroes, discard.
    let writes: &[(&str, u64, u64, u8)] = &[
        ("write", 1000, 3000, 0xaa),
        ("write", 64 * 1024, 128 * 1024, 0xbb),
        ("write", MIB + 512, 70_000, 0xcc),
        ("zero", 2 * MIB, 64 * 1024, 0),
        ("write", 4 * MIB - 4096, 4096, 0xdd),
        ("discard", 3 * MIB, 64 * 1024, 0),
    ];
    let ctx = Context::new();
    ctx.blockdev_add(
        &json!({"driver":"qcow2","node-name":"top","discard":"unmap",
        "file":{"driver":"file","filename":top}}),
    )
    .unwrap();
    let blk = ctx.blk_new("top", BackendOptions::default()).unwrap();
    for &(op, off, len, pat) in writes {
        match op {
            "write" => blk.pwrite(off, &vec![pat; len as usize]).unwrap(),
            "zero" => blk.pwrite_zeroes(off, len, false).unwrap(),
            _ => blk.pdiscard(off, len).unwrap(),
        }
        let cmd = match op {
            "write" => format!("write -P {pat} {off} {len}"),
            "zero" => format!("write -z {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        run("qemu-io", &["-c", &cmd, path_str(&qtop)]);
    }
    blk.flush().unwrap();
    drop(blk);
    drop(ctx);
    run("qemu-img", &["check", "-q", path_str(&top)]);
    let ours = qemu_flat(&top, dir.path());
    let theirs = qemu_flat(&qtop, &qdir);
    assert!(ours == theirs, "guest-visible content differs from QEMU's");
    // And the images are still a chain: top -> mid -> base.
    let info: Vec<Value> = serde_json::from_str(&run(
        "qemu-img",
        &["info", "--backing-chain", "--output=json", path_str(&top)],
    ))
    .unwrap();
    assert_eq!(info.len(), 3);
}

#[test]
fn explicit_backing_by_name_and_null() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mid, top) = chain(dir.path());
    let ctx = Context::new();
    ctx.blockdev_add(&qcow2("base", &base)).unwrap();
    let mut m = qcow2("mid", &mid);
    m["backing"] = json!("base");
    ctx.blockdev_add(&m).unwrap();
    let mut t = qcow2("top", &top);
    t["backing"] = json!("mid");
    let node = ctx.blockdev_add(&t).unwrap();
    assert_eq!(node.backing().unwrap().name(), "mid");
    let mut ours = vec![0u8; 4 * MIB as usize];
    node.pread(0, &mut ours).unwrap();
    assert!(ours == qemu_flat(&top, dir.path()));
    // backing: null: only top's own data, zeroes elsewhere. A second
    // node on the file "top" holds read-write: read-only and sharing
    // everything, or QEMU refuses it (`Failed to get "write" lock`).
    let mut t = qcow2("top2", &top);
    t["backing"] = Value::Null;
    assert_eq!(
        ctx.blockdev_add(&t).unwrap_err().message(),
        "Failed to get \"write\" lock"
    );
    t["read-only"] = json!(true);
    t["force-share"] = json!(true);
    let lone = ctx.blockdev_add(&t).unwrap();
    assert!(lone.backing().is_none());
    let mut buf = vec![0u8; 4 * MIB as usize];
    lone.pread(0, &mut buf).unwrap();
    assert!(buf[..3 * MIB as usize].iter().all(|&b| b == 0));
    assert!(
        buf[3 * MIB as usize..3 * MIB as usize + 512 * 1024]
            .iter()
            .all(|&b| b == 3)
    );
}

#[test]
fn created_images_pass_qemu_img_check() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, _) = chain(dir.path());
    let new = dir.path().join("new.qcow2");
    std::fs::File::create(&new).unwrap();
    let ctx = Context::new();
    let f = ctx
        .blockdev_add(&json!({"driver":"file","node-name":"f","filename":new}))
        .unwrap();
    blockjob::block::qcow2::create(&f, 4 * MIB, Some((path_str(&base), "qcow2")), None).unwrap();
    run("qemu-img", &["check", "-q", path_str(&new)]);
    let info: Value =
        serde_json::from_str(&run("qemu-img", &["info", "--output=json", path_str(&new)])).unwrap();
    assert_eq!(info["virtual-size"], 4 * MIB);
    assert_eq!(info["backing-filename"], path_str(&base));
    assert_eq!(info["backing-filename-format"], "qcow2");
}

#[test]
fn bad_images_are_refused_with_qemu_text() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = Context::new();
    // Not qcow2 at all.
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
    let e = ctx.blockdev_add(&qcow2("r", &raw)).unwrap_err();
    assert_eq!(e.message(), "Image is not in qcow2 format");
    // A backing file that is gone.
    let (base, _, top) = chain(dir.path());
    std::fs::remove_file(&base).unwrap();
    let e = ctx.blockdev_add(&qcow2("t", &top)).unwrap_err();
    assert!(
        e.message().starts_with("Could not open backing file: ")
            && e.message().contains("No such file or directory"),
        "{}",
        e.message()
    );
    // Nothing was registered by the failed adds.
    assert!(ctx.blockdev_add(&qcow2("t", &top)).is_err());
    assert!(ctx.graph().find_node("t").is_none());
}

#[test]
fn corrupt_headers_are_refused_and_left_alone() {
    use std::os::unix::fs::FileExt;
    // (byte offset, new big-endian u32, QEMU's text)
    let cases: &[(u64, u32, &str)] = &[
        (4, 1, "Unsupported qcow2 version 1"),
        (4, 4, "Unsupported qcow2 version 4"),
        (20, 40, "Unsupported cluster size: 2^40"),
        (20, 8, "Unsupported cluster size: 2^8"),
    ];
    for &(at, value, text) in cases {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("bad.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", path_str(&img), "1M"],
        );
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        f.write_all_at(&value.to_be_bytes(), at).unwrap();
        drop(f);
        let before = std::fs::read(&img).unwrap();
        let ctx = Context::new();
        let e = ctx.blockdev_add(&qcow2("bad", &img)).unwrap_err();
        assert_eq!(e.message(), text);
        assert!(ctx.graph().nodes().is_empty(), "{text}: nothing registered");
        drop(ctx);
        assert!(
            std::fs::read(&img).unwrap() == before,
            "{text}: file changed"
        );
    }
}

/// What is on disk while the image is open, before any flush, is what a
/// process kill leaves (the page cache survives it): a write that needs a
/// new L2 table must not leave the L1 entry there before the table's
/// refcount (imago 0.2.6 did: `qemu-img check` exit 2, found by
/// `cli/tests/kill.rs`; vendor/imago has the fix).
#[test]
fn a_new_l2_tables_refcount_is_on_disk_before_its_l1_entry() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("new.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path_str(&img), "1G"],
    );
    let ctx = Context::new();
    ctx.blockdev_add(&qcow2("n", &img)).unwrap();
    let blk = ctx.blk_new("n", BackendOptions::default()).unwrap();
    // Three L2 tables (one covers 512 MiB at 64 KiB clusters): the first,
    // and two more once the refblock cache has entries already.
    for off in [0, 600 * MIB, 1000 * MIB] {
        blk.pwrite(off, &[7; 65536]).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-U", path_str(&img)])
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "after a write at {off}, unflushed: qemu-img check exit {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    drop(blk);
    drop(ctx);
    run("qemu-img", &["check", "-q", path_str(&img)]);
}

/// The same for new refcount blocks: with 512-byte clusters one refblock
/// covers 128 KiB of the file, so writes soon need new ones (here after a
/// discard freed clusters early in the file); what is on disk unflushed
/// must stay consistent while they are made.
#[test]
fn a_new_refblocks_refcount_is_on_disk_before_its_reftable_entry() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("small.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            path_str(&img),
            "64M",
        ],
    );
    let ctx = Context::new();
    let mut opts = qcow2("n", &img);
    opts["discard"] = json!("unmap");
    ctx.blockdev_add(&opts).unwrap();
    let blk = ctx.blk_new("n", BackendOptions::default()).unwrap();
    // Free clusters early in the file: a new refblock may go there (its
    // refcount then in another refblock) rather than into the range it
    // covers (counting itself).
    blk.pwrite(0, &[8; 1 << 20]).unwrap();
    blk.pdiscard(0, 1 << 20).unwrap();
    blk.flush().unwrap();
    for i in 1..13u64 {
        let off = i * 5 * MIB;
        blk.pwrite(off, &[9; 65536]).unwrap();
        let out = std::process::Command::new("qemu-img")
            .args(["check", "-U", path_str(&img)])
            .output()
            .unwrap();
        assert!(
            matches!(out.status.code(), Some(0 | 3)),
            "after a write at {off}, unflushed: qemu-img check exit {:?}\n{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    drop(blk);
    drop(ctx);
    run("qemu-img", &["check", "-q", path_str(&img)]);
}
