//! Buffers whose address is a multiple of a given alignment, for
//! `O_DIRECT` I/O (the kernel refuses a buffer not aligned to the device's
//! memory alignment with EINVAL). `Vec<u8>` only guarantees an alignment
//! of 1, and glibc's large allocations start 16 bytes into a page, so
//! these come from std's allocator with an explicit [`Layout`]: the one
//! narrowly scoped `unsafe` of the `O_DIRECT` path.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;

/// A zero-initialised, heap-allocated byte buffer aligned to `align`.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
}

// SAFETY: the buffer owns its allocation exclusively (like a Box<[u8]>);
// shared references only read it, so it may move to and be shared
// between threads.
unsafe impl Send for AlignedBuf {}
// SAFETY: as above: `&AlignedBuf` gives only `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// `len` zero bytes at an address that is a multiple of `align` (a
    /// power of two). Panics only if `align` is not a power of two or the
    /// size overflows, which callers rule out (alignments are probed
    /// powers of two up to a page, lengths are request lengths).
    pub fn zeroed(len: usize, align: usize) -> AlignedBuf {
        // A zero-sized layout may not be allocated: hold at least one
        // aligned block.
        let layout = Layout::from_size_align(len.max(align).max(1), align)
            .expect("O_DIRECT alignment is a power of two");
        // SAFETY: the layout has a non-zero size (checked just above).
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        AlignedBuf { ptr, len, layout }
    }

    /// The buffer's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for an empty buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` points to an allocation of at least `len` bytes,
        // initialised (zeroed at allocation), owned by `self` and alive
        // for as long as the borrow of `self`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout
        // and is freed only here, once.
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.layout.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        for (len, align) in [(0, 512), (1, 512), (4096, 4096), (65536 + 7, 4096)] {
            let mut b = AlignedBuf::zeroed(len, align);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % align, 0, "{len} {align}");
            assert!(b.iter().all(|x| *x == 0));
            b.iter_mut().for_each(|x| *x = 0xa5);
            assert!(b.iter().all(|x| *x == 0xa5));
        }
    }
}
