//! The checked-in C header must equal a fresh cbindgen run.

#[test]
fn checked_in_header_is_fresh() {
    let fresh = std::fs::read_to_string(concat!(env!("OUT_DIR"), "/blockjob.h"))
        .expect("build.rs wrote the fresh header");
    let checked =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/include/blockjob.h"))
            .expect("include/blockjob.h is checked in");
    assert!(
        fresh == checked,
        "include/blockjob.h is stale: run `BLOCKJOB_BLESS_HEADER=1 cargo build` and commit it"
    );
}
