//! Builds every C program in `c-tests/` with `-std=c99 -Wall -Wextra
//! -Werror -pedantic` against `include/blockjob.h` and `libblockjob.a`, runs
//! it, and checks that every case it declares (`RUN(...)`) reported `ok`.
//! With `BJ_VALGRIND=1` each program runs under
//! `valgrind --leak-check=full --error-exitcode=1`.

mod common;

use common::cprog::{declared_cases, run, run_plain};

#[test]
fn c_test_blockjob() {
    run("test_blockjob");
}

#[test]
fn c_test_txn() {
    run("test_txn");
}

#[test]
fn c_test_capi() {
    run("test_capi");
}

#[test]
fn c_test_backend() {
    run("test_backend");
}

#[test]
fn c_test_bitmap() {
    common::require_tool("qemu-img");
    run("test_bitmap");
}

#[test]
fn c_test_mirror() {
    run("test_mirror");
}

#[test]
fn c_test_backup() {
    run("test_backup");
}

#[test]
fn c_test_chain() {
    common::require_tool("qemu-img");
    run("test_chain");
}

#[test]
fn c_test_qmp() {
    run("test_qmp");
}

#[test]
fn c_test_qmp_server() {
    run("test_qmp_server");
}

/// `BJ_PKI`: a CA and server/client certificates in QEMU's file names,
/// for the TLS case.
#[test]
fn c_test_nbd() {
    common::require_tool("qemu-io");
    common::require_tool("qemu-img");
    let pki = tempfile::tempdir().unwrap();
    common::tls::make_pki(pki.path(), "test CA");
    common::cprog::run_with_env("test_nbd", &[("BJ_PKI", pki.path())]);
}

#[test]
fn c_test_error_matrix() {
    run("test_error_matrix");
}

/// The README's C example: a plain program (no cases), whose output is
/// the job's events as QMP JSON lines, and which the README shows verbatim.
#[test]
fn c_example_host() {
    let out = run_plain("example_host");
    let names: Vec<String> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a QMP JSON line");
            common::qmp::summarize(&v)
        })
        .collect();
    assert_eq!(
        names,
        [
            "JSC:created",
            "JSC:running",
            "ERR(write,stop)",
            "JSC:paused",
            "JSC:running",
            "JSC:waiting",
            "JSC:pending",
            "COMPLETED",
            "JSC:concluded",
            "JSC:null"
        ]
    );
    let src = std::fs::read_to_string(common::cprog::c_dir().join("example_host.c")).unwrap();
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    assert!(
        readme.contains(&src),
        "README.md must show c-tests/example_host.c verbatim"
    );
}

#[test]
fn at_least_forty_c_cases() {
    let total: usize = [
        "test_blockjob",
        "test_txn",
        "test_capi",
        "test_backend",
        "test_error_matrix",
        "test_bitmap",
        "test_mirror",
    ]
    .iter()
    .map(|n| declared_cases(n))
    .sum();
    assert!(total >= 40, "only {total} C cases");
}
