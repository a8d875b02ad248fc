//! # blockjob
//!
//! QEMU's block-job subsystem as a library: the job engine (QEMU's `job.c`
//! semantics on plain threads), the block-job error policies and I/O
//! status, QEMU's events, and a block layer of nodes described by
//! blockdev-add JSON. C hosts link `libblockjob.a` and use
//! `include/blockjob.h` (see `capi`); Rust users use this crate directly.
//!
//! Everything hangs off a [`Context`]: nodes, guest backends, jobs and one
//! ordered event stream. There are no process-wide globals.

#![deny(unsafe_op_in_unsafe_fn)]
// Safe Rust everywhere but the C ABI (src/capi/), which allows it locally.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod bitmap;
pub mod block;
pub mod block_jobs;
#[allow(unsafe_code)]
pub mod capi;
pub mod context;
pub mod engine;
pub mod error;
pub mod error_policy;
pub mod events;
pub mod export;
pub mod locks;
/// cbindgen:ignore
/// (The wire protocol's constants are Rust-side, not C API.)
pub mod nbd;
pub mod qapi;
pub mod qmp;
pub mod sync;
pub mod transaction;

pub use context::Context;
pub use error::{Error, ErrorClass, Result};
