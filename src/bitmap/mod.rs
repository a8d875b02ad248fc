//! The lock-free hierarchical dirty bitmap ([`DirtyBitmap`]): a leaf of
//! the crate (it uses only `sync` and `error`). The named bitmaps QEMU
//! attaches to nodes (`block-dirty-bitmap-*`) are the block layer's
//! (`block::dirty_bitmap`).

pub mod hbitmap;
pub mod sha256;

pub use hbitmap::DirtyBitmap;

#[cfg(all(test, not(loom)))]
mod tests;

#[cfg(all(test, loom))]
mod loom_models;
