//! The block jobs, on the job engine and the block layer: mirror (with
//! active commit), stream and commit. Each puts its filter node above the
//! node it works on while it runs, as QEMU does (`mirror_top`,
//! `copy-on-read`, `commit_top`); [`block_job`] holds what they share.

pub mod block_job;
pub mod commit;
pub mod mirror;
pub mod stream;
