//! Dirty bitmaps: the lock-free hierarchical bitmap ([`DirtyBitmap`]) and
//! the named bitmaps QEMU attaches to nodes (`block-dirty-bitmap-*`).

pub mod hbitmap;
pub mod named;

pub use hbitmap::DirtyBitmap;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_models;
