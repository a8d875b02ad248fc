//! The command with NBD exports named by qemu-img's URLs: `blockjob
//! mirror` from a file into `nbd+unix:///EXPORT?socket=PATH` and from
//! `nbd://HOST:PORT/EXPORT` into a file (holes kept), checked with
//! `qemu-img compare`; a malformed URL gets qemu-img's text.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use common::nbd::{Listen, Server, free_port, run};

const MIB: u64 = 1 << 20;

fn blockjob(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_blockjob"))
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

fn compare(a: &Path, b: &Path) {
    run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            a.to_str().unwrap(),
            b.to_str().unwrap(),
        ],
    );
}

/// 16 MiB, data in every other MiB.
fn source(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("src.raw");
    let mut data = vec![0u8; 16 * MIB as usize];
    for (i, c) in data.chunks_mut(MIB as usize).enumerate() {
        if i % 2 == 0 {
            c.fill(i as u8 + 1);
        }
    }
    std::fs::write(&p, &data).unwrap();
    // Make the zero MiBs holes.
    run("fallocate", &["--dig-holes", p.to_str().unwrap()]);
    p
}

#[test]
fn mirror_into_and_out_of_nbd_urls() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let tgt = d.path().join("tgt.raw");
    std::fs::File::create(&tgt)
        .unwrap()
        .set_len(16 * MIB)
        .unwrap();
    let sock = Listen::Unix(d.path().join("t.sock"));
    let server = Server::qemu_nbd(&tgt, "raw", "disk", sock.clone());
    ok(&blockjob(&[
        "mirror",
        "-q",
        src.to_str().unwrap(),
        &sock.url("disk"),
    ]));
    server.stop();
    compare(&src, &tgt);

    let tcp = Listen::Tcp(free_port());
    let _server = Server::qemu_nbd(&src, "raw", "disk", tcp.clone());
    let back = d.path().join("back.raw");
    ok(&blockjob(&[
        "mirror",
        "-q",
        "--create",
        &tcp.url("disk"),
        back.to_str().unwrap(),
    ]));
    compare(&src, &back);
    let allocated = std::fs::metadata(&back).unwrap().blocks() * 512;
    assert!(
        allocated <= 9 * MIB,
        "holes kept: {allocated} bytes allocated"
    );
}

#[test]
fn malformed_url_gets_qemu_img_text() {
    let d = tempfile::tempdir().unwrap();
    let src = source(d.path());
    let o = blockjob(&["mirror", src.to_str().unwrap(), "nbd+unix:///disk"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("Could not open 'nbd+unix:///disk': No valid URL specified"),
        "{err}"
    );
}
