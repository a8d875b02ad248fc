//! A hierarchical, lock-free dirty bitmap (the idea of QEMU's HBitmap,
//! without its lock).
//!
//! One bit per `granularity` bytes. Level 0 holds the bits in `AtomicU64`
//! words; each level above has one bit per word of the level below,
//! meaning "that word may be non-zero", up to a single top word. Searching
//! for the next dirty bit walks the summaries and skips clean space
//! without reading it.
//!
//! # Concurrency contract
//! - Any number of threads may call [`set`](DirtyBitmap::set_range) at
//!   once, with no lock: guest writes. Setting never blocks.
//! - Operations that clear bits ([`take_next_area`](DirtyBitmap::take_next_area),
//!   [`reset_range`](DirtyBitmap::reset_range), [`clear`](DirtyBitmap::clear),
//!   [`deserialize_range`](DirtyBitmap::deserialize_range)) are serialised
//!   by a consumer lock among themselves, and still run concurrently with
//!   setters. A take is an atomic test-and-clear (`fetch_and`): a bit set
//!   concurrently is either taken (returned to the consumer) or stays
//!   dirty — never lost.
//! - Summary bits may be stale-set (a summary bit over a zero word: found
//!   and skipped by the next search) but never stale-clear: once `set`
//!   returned, every summary bit above the bits it set is set, unless a
//!   consumer has since taken those bits.
//! - The dirty count is exact whenever no operation is in flight; during
//!   concurrent operations it may lag by the bits currently being flipped.
//!
//! # Orderings
//! A setter does *store leaf, then load summary* while a clearer does
//! *clear summary, then load leaf* — the store-load (Dekker) pattern, which
//! needs a single total order. All leaf and summary accesses are therefore
//! `SeqCst`. On x86-64 this costs nothing extra: an atomic RMW is already a
//! full barrier and a `SeqCst` load is a plain load. The proof in short:
//! if a clearer's summary clear is ordered after a setter's summary check,
//! the setter's leaf store precedes the clearer's leaf re-check in the
//! total order, so the re-check sees the bit and restores the summary;
//! otherwise the setter's check sees the cleared summary bit and sets it.
//! The loom models in this module's tests explore exactly these
//! interleavings.

use crate::sync::{AtomicI64, AtomicU64, Mutex, Ordering};

/// Smallest granularity: 512 bytes (QEMU's limit).
pub const MIN_GRANULARITY: u64 = 512;
/// Largest granularity: 2 GiB (QEMU's limit).
pub const MAX_GRANULARITY: u64 = 1 << 31;

const SC: Ordering = Ordering::SeqCst;

/// A lock-free hierarchical dirty bitmap over `size` bytes.
pub struct DirtyBitmap {
    size: u64,
    shift: u32,
    nbits: u64,
    /// `levels[0]`: the bits; `levels[i]`: one bit per word of level `i-1`.
    levels: Vec<Box<[AtomicU64]>>,
    /// Number of set bits (exact at quiescence). Relaxed: a statistic that
    /// nothing synchronises on.
    count: AtomicI64,
    /// Serialises the operations that clear bits.
    consumer: Mutex<()>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("size", &self.size)
            .field("granularity", &self.granularity())
            .field("count", &self.count())
            .finish_non_exhaustive()
    }
}

fn words_for(bits: u64) -> usize {
    bits.div_ceil(64).max(1) as usize
}

fn new_level(words: usize) -> Box<[AtomicU64]> {
    (0..words).map(|_| AtomicU64::new(0)).collect()
}

/// Mask of bits `lo..=hi` within one word.
fn mask(lo: u32, hi: u32) -> u64 {
    let upper = if hi == 63 { !0 } else { (1u64 << (hi + 1)) - 1 };
    upper & (!0u64 << lo)
}

impl DirtyBitmap {
    /// A clean bitmap over `size` bytes with a power-of-two `granularity`
    /// between 512 B and 2 GiB.
    pub fn new(size: u64, granularity: u64) -> crate::Result<DirtyBitmap> {
        if !granularity.is_power_of_two()
            || !(MIN_GRANULARITY..=MAX_GRANULARITY).contains(&granularity)
        {
            return Err(crate::Error::generic(
                "Granularity must be power of 2 and at least 512",
            ));
        }
        Ok(Self::with_shift(size, granularity.trailing_zeros()))
    }

    fn with_shift(size: u64, shift: u32) -> DirtyBitmap {
        let nbits = size.div_ceil(1u64 << shift);
        let mut levels = vec![new_level(words_for(nbits))];
        while levels.last().map_or(0, |l| l.len()) > 1 {
            let below = levels.last().map_or(0, |l| l.len()) as u64;
            levels.push(new_level(words_for(below)));
        }
        DirtyBitmap {
            size,
            shift,
            nbits,
            levels,
            count: AtomicI64::new(0),
            consumer: Mutex::new(()),
        }
    }

    /// Bytes covered.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.shift
    }

    /// Number of bits.
    pub fn bits(&self) -> u64 {
        self.nbits
    }

    /// Memory used by the bit levels, in bytes.
    pub fn memory(&self) -> usize {
        self.levels.iter().map(|l| l.len() * 8).sum()
    }

    /// Number of dirty bits.
    pub fn count_bits(&self) -> u64 {
        self.count.load(Ordering::Relaxed).max(0) as u64
    }

    /// Dirty bytes as QEMU counts them: dirty bits × granularity (the last
    /// bit counts whole even if the size ends inside it).
    pub fn count(&self) -> u64 {
        self.count_bits() << self.shift
    }

    /// True when no bit is set.
    pub fn is_empty(&self) -> bool {
        self.count_bits() == 0
    }

    /// The bit range `[first, last]` covering bytes `[offset, offset+len)`,
    /// clipped to the bitmap; `None` for an empty intersection.
    fn bit_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || offset >= self.size {
            return None;
        }
        let end = offset.saturating_add(len).min(self.size);
        Some((offset >> self.shift, (end - 1) >> self.shift))
    }

    /// Ensure every summary bit above word `w` of level `l` is set. No early
    /// exit on a set bit: the setter that set it may not have reached the
    /// levels above yet.
    fn mark_up(&self, mut l: usize, mut w: usize) {
        while l + 1 < self.levels.len() {
            let word = &self.levels[l + 1][w / 64];
            let bit = 1u64 << (w % 64);
            // SeqCst: pairs with the clearer's summary clear and leaf
            // re-check in `clear_up` (store-load ordering, see module doc).
            if word.load(SC) & bit == 0 {
                word.fetch_or(bit, SC);
            }
            l += 1;
            w /= 64;
        }
    }

    /// Word `w` of level `l` was seen zero after clearing bits in it: clear
    /// its summary bit, then re-check it, restoring the summary if a setter
    /// got in between; go up while summary words become zero.
    fn clear_up(&self, mut l: usize, mut w: usize) {
        while l + 1 < self.levels.len() {
            let parent = &self.levels[l + 1][w / 64];
            let bit = 1u64 << (w % 64);
            // SeqCst: the clear must be ordered before the re-check below,
            // against the setter's leaf store and summary load in `mark_up`.
            let old = parent.fetch_and(!bit, SC);
            if self.levels[l][w].load(SC) != 0 {
                // A setter made the word non-zero again: put the bit back,
                // and everything above it.
                parent.fetch_or(bit, SC);
                self.mark_up(l + 1, w / 64);
                return;
            }
            if old & !bit != 0 {
                return;
            }
            l += 1;
            w /= 64;
        }
    }

    /// Set the bits covering bytes `[offset, offset + len)`. Lock-free.
    pub fn set_range(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.bit_range(offset, len) else {
            return;
        };
        self.set_bits(first, last);
    }

    fn set_bits(&self, first: u64, last: u64) {
        let leaves = &self.levels[0];
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let mut added = 0i64;
        for w in fw..=lw {
            let lo = if w == fw { (first % 64) as u32 } else { 0 };
            let hi = if w == lw { (last % 64) as u32 } else { 63 };
            let m = mask(lo, hi);
            // SeqCst: see `mark_up` (store leaf, then check summary).
            let old = leaves[w].fetch_or(m, SC);
            added += (m & !old).count_ones() as i64;
            self.mark_up(0, w);
        }
        if added != 0 {
            self.count.fetch_add(added, Ordering::Relaxed);
        }
    }

    /// Clear bits `[first, last]`; returns the mask of bits that were set,
    /// word by word, through `taken(word_index, bits)`.
    fn clear_bits(&self, first: u64, last: u64, mut taken: impl FnMut(usize, u64)) {
        let leaves = &self.levels[0];
        let (fw, lw) = ((first / 64) as usize, (last / 64) as usize);
        let mut removed = 0i64;
        for w in fw..=lw {
            let lo = if w == fw { (first % 64) as u32 } else { 0 };
            let hi = if w == lw { (last % 64) as u32 } else { 63 };
            let m = mask(lo, hi);
            // SeqCst: pairs with setters' leaf stores (see `clear_up`).
            let old = leaves[w].fetch_and(!m, SC);
            let got = old & m;
            if got != 0 {
                removed += got.count_ones() as i64;
                taken(w, got);
            }
            if old & !m == 0 && got != 0 {
                self.clear_up(0, w);
            }
        }
        if removed != 0 {
            self.count.fetch_sub(removed, Ordering::Relaxed);
        }
    }

    fn lock_consumer(&self) -> impl Sized + '_ {
        self.consumer.lock()
    }

    /// Clear the bits covering bytes `[offset, offset + len)`.
    pub fn reset_range(&self, offset: u64, len: u64) {
        let Some((first, last)) = self.bit_range(offset, len) else {
            return;
        };
        let _c = self.lock_consumer();
        self.clear_bits(first, last, |_, _| {});
    }

    /// Clear everything.
    pub fn clear(&self) {
        if self.nbits == 0 {
            return;
        }
        let _c = self.lock_consumer();
        self.clear_bits(0, self.nbits - 1, |_, _| {});
    }

    /// Is the bit covering byte `offset` set?
    pub fn test(&self, offset: u64) -> bool {
        if offset >= self.size {
            return false;
        }
        let b = offset >> self.shift;
        self.levels[0][(b / 64) as usize].load(SC) & (1 << (b % 64)) != 0
    }

    /// First set bit at level `l` at or after `bit`, using the levels above
    /// to skip zero words.
    fn next_set(&self, l: usize, mut bit: u64) -> Option<u64> {
        let words = &self.levels[l];
        loop {
            let w = (bit / 64) as usize;
            if w >= words.len() {
                return None;
            }
            let v = words[w].load(SC) & (!0u64 << (bit % 64));
            if v != 0 {
                return Some(w as u64 * 64 + u64::from(v.trailing_zeros()));
            }
            if l + 1 == self.levels.len() {
                bit = (w as u64 + 1) * 64;
                continue;
            }
            // The next word at this level that may be non-zero; a stale
            // summary bit just sends us around the loop once more.
            bit = self.next_set(l + 1, w as u64 + 1)? * 64;
        }
    }

    fn next_set_bit(&self, bit: u64) -> Option<u64> {
        if bit >= self.nbits {
            return None;
        }
        self.next_set(0, bit).filter(|b| *b < self.nbits)
    }

    /// First clear bit at or after `bit`.
    fn next_clear_bit(&self, bit: u64) -> Option<u64> {
        let leaves = &self.levels[0];
        let mut b = bit;
        while b < self.nbits {
            let w = (b / 64) as usize;
            let v = !leaves[w].load(SC) & (!0u64 << (b % 64));
            if v != 0 {
                let found = w as u64 * 64 + u64::from(v.trailing_zeros());
                return (found < self.nbits).then_some(found);
            }
            b = (w as u64 + 1) * 64;
        }
        None
    }

    fn bit_to_offset(&self, bit: u64) -> u64 {
        (bit << self.shift).min(self.size)
    }

    /// Byte offset of the first dirty granule at or after `offset`.
    pub fn next_dirty(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        self.next_set_bit(offset >> self.shift)
            .map(|b| self.bit_to_offset(b).max(offset))
    }

    /// Byte offset of the first clean granule at or after `offset`.
    pub fn next_clean(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        self.next_clear_bit(offset >> self.shift)
            .map(|b| self.bit_to_offset(b).max(offset))
    }

    /// The first dirty area at or after `offset`: `(offset, len)` in
    /// bytes, at most `max_len` long (rounded up to whole granules), and
    /// clipped to the size.
    pub fn next_dirty_area(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let (first, last) = self.dirty_run(offset, max_len)?;
        let start = self.bit_to_offset(first);
        let end = self.bit_to_offset(last + 1);
        Some((start, end - start))
    }

    /// Bits `[first, last]` of the first dirty run at or after `offset`.
    fn dirty_run(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        if offset >= self.size || max_len == 0 {
            return None;
        }
        let first = self.next_set_bit(offset >> self.shift)?;
        let max_bits = max_len.div_ceil(1 << self.shift).max(1);
        let end = match self.next_clear_bit(first) {
            Some(c) => c,
            None => self.nbits,
        };
        let last = end.min(first.saturating_add(max_bits)) - 1;
        Some((first, last))
    }

    /// Atomically take (test and clear) the first dirty area at or after
    /// `offset`, at most `max_len` bytes: returns what was taken. A bit set
    /// concurrently is either in the result or stays dirty.
    pub fn take_next_area(&self, offset: u64, max_len: u64) -> Option<(u64, u64)> {
        let _c = self.lock_consumer();
        let (first, last) = self.dirty_run(offset, max_len)?;
        // Only this consumer clears bits, so the run found is still set
        // (setters can only add bits): everything in it is taken.
        self.clear_bits(first, last, |_, _| {});
        let start = self.bit_to_offset(first);
        Some((start, self.bit_to_offset(last + 1) - start))
    }

    /// Every dirty area, in order, at most `max_len` bytes each.
    pub fn areas(&self, max_len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut pos = 0;
        std::iter::from_fn(move || {
            let (off, len) = self.next_dirty_area(pos, max_len)?;
            pos = off + len;
            Some((off, len))
        })
    }

    /// OR every bit of `other` into this bitmap. Same size and granularity
    /// go word by word; otherwise dirty byte ranges are transferred.
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if other.shift == self.shift && other.nbits == self.nbits {
            let mut added = 0i64;
            for (w, word) in other.levels[0].iter().enumerate() {
                let v = word.load(SC);
                if v == 0 {
                    continue;
                }
                // SeqCst: a set like any other (see `mark_up`).
                let old = self.levels[0][w].fetch_or(v, SC);
                added += (v & !old).count_ones() as i64;
                self.mark_up(0, w);
            }
            if added != 0 {
                self.count.fetch_add(added, Ordering::Relaxed);
            }
        } else {
            for (off, len) in other.areas(u64::MAX) {
                self.set_range(off, len);
            }
        }
    }

    /// A copy with the same bits (a point-in-time copy of each word).
    pub fn copy(&self) -> DirtyBitmap {
        self.resized(self.size)
    }

    /// A copy over `new_size` bytes: bits beyond the new size are dropped,
    /// new space is clean.
    pub fn resized(&self, new_size: u64) -> DirtyBitmap {
        let out = Self::with_shift(new_size, self.shift);
        let bits = out.nbits.min(self.nbits);
        if bits == 0 {
            return out;
        }
        for (w, word) in self.levels[0].iter().enumerate() {
            let base = w as u64 * 64;
            if base >= bits {
                break;
            }
            let mut v = word.load(SC);
            if bits - base < 64 {
                v &= (1u64 << (bits - base)) - 1;
            }
            if v != 0 {
                out.levels[0][w].store(v, SC);
                out.count
                    .fetch_add(v.count_ones() as i64, Ordering::Relaxed);
                out.mark_up(0, w);
            }
        }
        out
    }

    /// The bits `[first_bit, first_bit + nbits)` as little-endian bytes
    /// (bit `i` of the range is bit `i % 8` of byte `i / 8`).
    pub fn serialize_range(&self, first_bit: u64, nbits: u64) -> Vec<u8> {
        let nbits = nbits.min(self.nbits.saturating_sub(first_bit));
        let mut out = vec![0u8; nbits.div_ceil(8) as usize];
        for i in 0..nbits {
            let b = first_bit + i;
            if self.levels[0][(b / 64) as usize].load(SC) & (1 << (b % 64)) != 0 {
                out[(i / 8) as usize] |= 1 << (i % 8);
            }
        }
        out
    }

    /// Make bits `[first_bit, first_bit + 8 * data.len())` equal to
    /// `data` (as produced by [`serialize_range`](Self::serialize_range)).
    pub fn deserialize_range(&self, first_bit: u64, data: &[u8]) {
        let _c = self.lock_consumer();
        let n = (data.len() as u64 * 8).min(self.nbits.saturating_sub(first_bit));
        let mut i = 0;
        while i < n {
            // Group equal bits into runs to set or clear word-wise.
            let val = data[(i / 8) as usize] & (1 << (i % 8)) != 0;
            let mut j = i + 1;
            while j < n && (data[(j / 8) as usize] & (1 << (j % 8)) != 0) == val {
                j += 1;
            }
            if val {
                self.set_bits(first_bit + i, first_bit + j - 1);
            } else {
                self.clear_bits(first_bit + i, first_bit + j - 1, |_, _| {});
            }
            i = j;
        }
    }

    /// Number of 64-bit words holding the bits (at least one, as in
    /// QEMU's HBitmap): word `i` holds bits `64 i .. 64 i + 63`.
    pub fn words(&self) -> usize {
        self.levels[0].len()
    }

    /// Words `first_word ..` as little-endian bytes into `out` (QEMU's
    /// serialization, and the qcow2 bitmap data layout: bit `i` is bit
    /// `i % 8` of byte `i / 8`). Words past the end read as zero; a
    /// trailing partial word is cut. Each word is read atomically, so a
    /// concurrent setter's bits are either in the copy or not.
    pub fn serialize_words(&self, first_word: usize, out: &mut [u8]) {
        for (i, chunk) in out.chunks_mut(8).enumerate() {
            let v = self.levels[0].get(first_word + i).map_or(0, |w| w.load(SC));
            chunk.copy_from_slice(&v.to_le_bytes()[..chunk.len()]);
        }
    }

    /// True when any of words `first_word .. first_word + n` has a bit set.
    pub fn any_in_words(&self, first_word: usize, n: usize) -> bool {
        let end = (first_word + n).min(self.levels[0].len());
        (first_word.min(end)..end).any(|w| self.levels[0][w].load(SC) != 0)
    }

    /// Set the bits that are set in `data` (little-endian words from
    /// `first_word` on, as [`serialize_words`](Self::serialize_words)
    /// writes them); bits past the bitmap's last bit are ignored. Adds
    /// bits only, so it is a setter like any other (lock-free).
    pub fn deserialize_words_or(&self, first_word: usize, data: &[u8]) {
        let mut added = 0i64;
        for (i, chunk) in data.chunks(8).enumerate() {
            let w = first_word + i;
            let base = w as u64 * 64;
            if w >= self.levels[0].len() || base >= self.nbits {
                break;
            }
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            let mut v = u64::from_le_bytes(bytes);
            if self.nbits - base < 64 {
                v &= (1u64 << (self.nbits - base)) - 1;
            }
            if v == 0 {
                continue;
            }
            // SeqCst: a set like any other (see `mark_up`).
            let old = self.levels[0][w].fetch_or(v, SC);
            added += (v & !old).count_ones() as i64;
            self.mark_up(0, w);
        }
        if added != 0 {
            self.count.fetch_add(added, Ordering::Relaxed);
        }
    }

    /// QEMU's `hbitmap_sha256`: SHA-256 of the bit level as it lies in
    /// QEMU's memory (its words as little-endian 64-bit integers, all of
    /// them, at least one), in lowercase hex. Equal hashes mean equal bits
    /// for bitmaps of the same size and granularity.
    pub fn sha256_hex(&self) -> String {
        let mut h = super::sha256::Sha256::new();
        let mut buf = vec![0u8; 8 * 1024];
        let mut w = 0;
        while w < self.words() {
            let n = (self.words() - w).min(1024);
            self.serialize_words(w, &mut buf[..n * 8]);
            h.update(&buf[..n * 8]);
            w += n;
        }
        h.finish_hex()
    }

    /// Tests and models: every summary bit over a non-zero word is set.
    #[cfg(test)]
    pub(crate) fn summaries_cover_leaves(&self) -> bool {
        for l in 0..self.levels.len() - 1 {
            for (w, word) in self.levels[l].iter().enumerate() {
                if word.load(SC) != 0 && self.levels[l + 1][w / 64].load(SC) & (1 << (w % 64)) == 0
                {
                    return false;
                }
            }
        }
        true
    }

    /// Tests: the number of set bits, counted word by word.
    #[cfg(test)]
    pub(crate) fn popcount(&self) -> u64 {
        self.levels[0]
            .iter()
            .map(|w| u64::from(w.load(SC).count_ones()))
            .sum()
    }

    /// Tests: number of levels.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn depth(&self) -> usize {
        self.levels.len()
    }

    /// Loom models: a bitmap of `bits` bits at granularity 512.
    #[cfg(all(test, loom))]
    pub(crate) fn for_bits(bits: u64) -> DirtyBitmap {
        Self::with_shift(bits * 512, 9)
    }
}
