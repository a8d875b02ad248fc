//! Builds every C program in `c-tests/` with `-std=c99 -Wall -Wextra
//! -Werror -pedantic` against `include/blockjob.h` and `libblockjob.a`, runs
//! it, and checks that every case it declares (`RUN(...)`) reported `ok`.
//! With `BJ_VALGRIND=1` each program runs under
//! `valgrind --leak-check=full --error-exitcode=1`.

mod common;

use common::cprog::{declared_cases, run};

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
fn c_test_error_matrix() {
    run("test_error_matrix");
}

#[test]
fn c_example_host() {
    let out = run("example_host");
    assert!(out.contains("\"event\":\"BLOCK_JOB_ERROR\""), "{out}");
}

#[test]
fn at_least_forty_c_cases() {
    let total: usize = [
        "test_blockjob",
        "test_txn",
        "test_capi",
        "test_backend",
        "test_error_matrix",
        "example_host",
    ]
    .iter()
    .map(|n| declared_cases(n))
    .sum();
    assert!(total >= 40, "only {total} C cases");
}
