//! Buffers whose address is a multiple of a given alignment, for
//! `O_DIRECT` I/O (the kernel refuses a buffer not aligned to the device's
//! memory alignment with EINVAL). `Vec<u8>` only guarantees an alignment
//! of 1, and glibc's large allocations start 16 bytes into a page, so
//! these come from std's allocator with an explicit [`Layout`]: the one
//! narrowly scoped `unsafe` of the `O_DIRECT` path.

use std::alloc::{Layout, alloc_zeroed, dealloc, handle_alloc_error};
use std::ptr::NonNull;
use std::sync::Arc;

/// The allocation behind an [`AlignedBuf`]. Only the buffer reads and
/// writes it; a [`Region`] may keep it allocated longer (io_uring's
/// registered buffers hold the pages while a ring has them registered).
struct Allocation {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: an `Allocation` is only an address and a layout; the bytes are
// reached only through the one `AlignedBuf` that made it, whose own
// `&`/`&mut` borrows order every access (see the impls on `AlignedBuf`).
// Dropping it on another thread is fine for std's allocator.
unsafe impl Send for Allocation {}
// SAFETY: as above: `&Allocation` exposes no bytes.
unsafe impl Sync for Allocation {}

impl Drop for Allocation {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `alloc_zeroed` with exactly this layout
        // and is freed only here, once (the last `Arc` goes).
        unsafe { dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// The address range of an [`AlignedBuf`], keeping its memory allocated
/// (never freed or reused) for as long as the region lives, without any
/// access to the bytes: what a ring registers as a fixed buffer.
#[derive(Clone)]
pub(crate) struct Region {
    mem: Arc<Allocation>,
    len: usize,
}

impl Region {
    /// The first byte's address.
    pub(crate) fn addr(&self) -> usize {
        self.mem.ptr.as_ptr() as usize
    }

    /// The length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether `buf` lies entirely inside this region.
    pub(crate) fn contains(&self, buf: &[u8]) -> bool {
        let start = buf.as_ptr() as usize;
        start >= self.addr() && start + buf.len() <= self.addr() + self.len
    }
}

/// A zero-initialised, heap-allocated byte buffer aligned to `align`.
pub struct AlignedBuf {
    mem: Arc<Allocation>,
    len: usize,
}

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
        AlignedBuf {
            mem: Arc::new(Allocation { ptr, layout }),
            len,
        }
    }

    /// This buffer's memory as a [`Region`] (for io_uring's registered
    /// buffers): it stays allocated while the region lives, even when the
    /// buffer is dropped first.
    pub(crate) fn region(&self) -> Region {
        Region {
            mem: self.mem.clone(),
            len: self.len,
        }
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
        // initialised (zeroed at allocation), kept alive by `self.mem`.
        // Only this buffer (not `Clone`) reads or writes it: a `Region`
        // shares the allocation but never its bytes, so the borrow of
        // `self` orders every access.
        unsafe { std::slice::from_raw_parts(self.mem.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref; `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.mem.ptr.as_ptr(), self.len) }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len", &self.len)
            .field("align", &self.mem.layout.align())
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

    #[test]
    fn a_region_outlives_its_buffer() {
        let b = AlignedBuf::zeroed(8192, 4096);
        let r = b.region();
        assert_eq!((r.addr(), r.len()), (b.as_ptr() as usize, 8192));
        assert!(r.contains(&b[4096..]));
        assert!(!r.contains(&AlignedBuf::zeroed(16, 512)));
        drop(b);
        // Still allocated: a new buffer cannot take its address.
        let c = AlignedBuf::zeroed(8192, 4096);
        assert_ne!(c.as_ptr() as usize, r.addr());
    }
}
