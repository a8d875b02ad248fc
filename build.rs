//! Generates the C header from `src/capi/` with cbindgen.
//!
//! The fresh header goes to `$OUT_DIR/blockjob.h`; `include/blockjob.h` is
//! the checked-in copy, and a test fails when the two differ. Set
//! `BLOCKJOB_BLESS_HEADER=1` to write the fresh header into `include/`.

use std::path::PathBuf;

fn main() {
    let crate_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("blockjob.h");
    // cbindgen reads the whole crate (public constants outside src/capi/
    // end up in the header too): a change anywhere may change it.
    println!("cargo:rerun-if-changed=src");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    println!("cargo:rerun-if-env-changed=BLOCKJOB_BLESS_HEADER");
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .expect("cbindgen.toml is valid");
    let bindings = cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header");
    bindings.write_to_file(&out);
    if std::env::var_os("BLOCKJOB_BLESS_HEADER").is_some() {
        let dest = crate_dir.join("include/blockjob.h");
        std::fs::create_dir_all(dest.parent().expect("has a parent")).expect("create include/");
        std::fs::copy(&out, &dest).expect("write include/blockjob.h");
    }
}
