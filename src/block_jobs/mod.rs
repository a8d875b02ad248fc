//! The block jobs, on the job engine and the block layer: mirror (with
//! active commit), stream, commit and backup. Each puts its filter node
//! above the node it works on while it runs, as QEMU does (`mirror_top`,
//! `copy-on-read`, `commit_top`, `copy-before-write`); [`block_job`] holds
//! what they share.

pub mod backup;
pub mod block_job;
pub mod commit;
pub mod mirror;
pub mod stream;
