//! Tests of the hierarchical bitmap: examples, a property test against a
//! plain model, and a multi-threaded stress test that no set is lost.
//! (The loom models are in `loom_models`, built with `--cfg loom`.)

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use proptest::prelude::*;

use super::DirtyBitmap;

const K: u64 = 1024;
const M: u64 = 1024 * K;
const G: u64 = 1024 * M;
const T: u64 = 1024 * G;

#[test]
fn one_tib_at_64k_fits_in_2_1_mib() {
    let b = DirtyBitmap::new(T, 64 * K).unwrap();
    assert_eq!(b.bits(), 16 * M);
    assert!(b.memory() as u64 <= 2 * M + 100 * K, "{} bytes", b.memory());
    assert_eq!(b.depth(), 4);
}

#[test]
fn granularity_limits() {
    for bad in [0, 256, 1000, 3, 1 << 32] {
        let e = DirtyBitmap::new(M, bad).unwrap_err();
        assert_eq!(
            e.message(),
            "Granularity must be power of 2 and at least 512"
        );
    }
    for good in [512, 64 * K, 1 << 31] {
        assert!(DirtyBitmap::new(M, good).is_ok());
    }
}

#[test]
fn set_test_count_and_areas() {
    let b = DirtyBitmap::new(10 * M, 64 * K).unwrap();
    assert!(b.is_empty());
    b.set_range(4096, 1); // one granule
    b.set_range(M - 1, 2); // straddles two granules
    assert!(b.test(0) && b.test(65535) && !b.test(65536));
    assert_eq!(b.count_bits(), 3);
    assert_eq!(b.count(), 3 * 64 * K);
    assert_eq!(b.next_dirty(0), Some(0));
    assert_eq!(b.next_dirty(1), Some(1));
    assert_eq!(b.next_dirty(64 * K), Some(M - 64 * K));
    assert_eq!(b.next_clean(0), Some(64 * K));
    assert_eq!(
        b.next_dirty_area(64 * K, u64::MAX),
        Some((M - 64 * K, 128 * K))
    );
    assert_eq!(b.next_dirty_area(64 * K, 1), Some((M - 64 * K, 64 * K)));
    let areas: Vec<_> = b.areas(u64::MAX).collect();
    assert_eq!(areas, [(0, 64 * K), (M - 64 * K, 128 * K)]);
    assert_eq!(b.take_next_area(0, u64::MAX), Some((0, 64 * K)));
    assert_eq!(b.count_bits(), 2);
    b.reset_range(M, 1);
    assert_eq!(b.count_bits(), 1);
    b.clear();
    assert!(b.is_empty());
    assert!(b.summaries_cover_leaves());
    assert_eq!(b.next_dirty(0), None);
}

#[test]
fn next_dirty_near_the_end_of_a_huge_bitmap() {
    let b = DirtyBitmap::new(T, 64 * K).unwrap();
    b.set_range(T - 64 * K, 10);
    assert_eq!(b.next_dirty(0), Some(T - 64 * K));
    assert_eq!(b.next_dirty_area(0, u64::MAX), Some((T - 64 * K, 64 * K)));
    assert_eq!(b.take_next_area(0, u64::MAX), Some((T - 64 * K, 64 * K)));
    assert_eq!(b.next_dirty(0), None);
}

#[test]
fn size_not_a_multiple_of_granularity() {
    let b = DirtyBitmap::new(64 * K + 1000, 64 * K).unwrap();
    assert_eq!(b.bits(), 2);
    b.set_range(64 * K + 999, 1);
    assert_eq!(b.count(), 64 * K);
    // Areas are clipped to the size.
    assert_eq!(b.next_dirty_area(0, u64::MAX), Some((64 * K, 1000)));
    b.set_range(70 * K, 100 * K); // beyond the end: clipped
    assert_eq!(b.count_bits(), 1);
    assert!(!b.test(200 * K));
}

#[test]
fn merge_copy_resize_serialize() {
    let a = DirtyBitmap::new(8 * M, 64 * K).unwrap();
    let b = DirtyBitmap::new(8 * M, 64 * K).unwrap();
    a.set_range(0, 64 * K);
    b.set_range(0, 128 * K);
    b.set_range(7 * M, M);
    a.merge_from(&b);
    assert_eq!(a.count_bits(), 2 + 16);
    // Different granularity: byte ranges are transferred.
    let c = DirtyBitmap::new(8 * M, 4 * K).unwrap();
    c.merge_from(&a);
    assert_eq!(c.count(), a.count());
    let copy = a.copy();
    assert_eq!(copy.count_bits(), a.count_bits());
    assert!(copy.summaries_cover_leaves());
    let small = a.resized(4 * M);
    assert_eq!(small.count_bits(), 2);
    let big = a.resized(16 * M);
    assert_eq!(big.count_bits(), 18);
    assert_eq!(big.next_dirty(8 * M), None);
    let bytes = a.serialize_range(0, a.bits());
    let d = DirtyBitmap::new(8 * M, 64 * K).unwrap();
    d.set_range(3 * M, 64 * K); // overwritten by the deserialisation
    d.deserialize_range(0, &bytes);
    assert_eq!(d.serialize_range(0, d.bits()), bytes);
    assert_eq!(d.count_bits(), a.count_bits());
    assert!(d.summaries_cover_leaves());
}

// ---- property test against a model ----------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64),
    Reset(u64, u64),
    Take(u64, u64),
    Clear,
    Deserialize(u64, Vec<u8>),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    // Mostly short ranges (they straddle words), sometimes long ones
    // (they straddle levels).
    let len = prop_oneof![4 => 0..200 * 512u64, 1 => 0..size / 2 + 1];
    let range = (0..size + 100, len);
    prop_oneof![
        4 => range.clone().prop_map(|(o, l)| Op::Set(o, l)),
        2 => range.clone().prop_map(|(o, l)| Op::Reset(o, l)),
        2 => range.prop_map(|(o, l)| Op::Take(o, l)),
        1 => Just(Op::Clear),
        1 => (0..8u64, proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(w, d)| Op::Deserialize(w * 64, d)),
    ]
}

/// The model: the set of dirty bit indices.
struct Model {
    bits: BTreeSet<u64>,
    shift: u32,
    nbits: u64,
    size: u64,
}

impl Model {
    fn range(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        if len == 0 || off >= self.size {
            return None;
        }
        let end = (off + len).min(self.size);
        Some((off >> self.shift, (end - 1) >> self.shift))
    }
    fn run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if from >= self.size || max == 0 {
            return None;
        }
        let first = *self.bits.range(from >> self.shift..).next()?;
        let max_bits = max.div_ceil(1 << self.shift).max(1);
        let mut last = first;
        while last + 1 < self.nbits
            && self.bits.contains(&(last + 1))
            && last + 1 - first < max_bits
        {
            last += 1;
        }
        Some((first, last))
    }
    fn bytes(&self, (first, last): (u64, u64)) -> (u64, u64) {
        let s = (first << self.shift).min(self.size);
        let e = ((last + 1) << self.shift).min(self.size);
        (s, e - s)
    }
}

fn check(size: u64, shift: u32, ops: Vec<Op>, probes: Vec<u64>) -> Result<(), TestCaseError> {
    let b = DirtyBitmap::new(size, 1 << shift).unwrap();
    let mut m = Model {
        bits: BTreeSet::new(),
        shift,
        nbits: size.div_ceil(1 << shift),
        size,
    };
    for op in ops {
        match op {
            Op::Set(o, l) => {
                b.set_range(o, l);
                if let Some((f, t)) = m.range(o, l) {
                    m.bits.extend(f..=t);
                }
            }
            Op::Reset(o, l) => {
                b.reset_range(o, l);
                if let Some((f, t)) = m.range(o, l) {
                    m.bits.retain(|x| *x < f || *x > t);
                }
            }
            Op::Take(o, l) => {
                let got = b.take_next_area(o, l);
                let want = m.run(o, l);
                if let Some((f, t)) = want {
                    m.bits.retain(|x| *x < f || *x > t);
                }
                prop_assert_eq!(got, want.map(|r| m.bytes(r)));
            }
            Op::Clear => {
                b.clear();
                m.bits.clear();
            }
            Op::Deserialize(first, data) => {
                b.deserialize_range(first, &data);
                let n = (data.len() as u64 * 8).min(m.nbits.saturating_sub(first));
                for i in 0..n {
                    if data[(i / 8) as usize] & (1 << (i % 8)) != 0 {
                        m.bits.insert(first + i);
                    } else {
                        m.bits.remove(&(first + i));
                    }
                }
            }
        }
        prop_assert_eq!(b.count_bits(), m.bits.len() as u64);
        prop_assert_eq!(b.popcount(), m.bits.len() as u64);
        prop_assert!(b.summaries_cover_leaves());
    }
    for p in probes {
        let p = p % (size + 10);
        prop_assert_eq!(b.test(p), p < size && m.bits.contains(&(p >> shift)));
        let nd = m
            .bits
            .range((p.min(size)) >> shift..)
            .next()
            .map(|x| (x << shift).max(p))
            .filter(|_| p < size);
        prop_assert_eq!(b.next_dirty(p), nd, "next_dirty({})", p);
        let nc = (p < size)
            .then(|| ((p >> shift)..m.nbits).find(|x| !m.bits.contains(x)))
            .flatten()
            .map(|x| (x << shift).max(p));
        prop_assert_eq!(b.next_clean(p), nc, "next_clean({})", p);
        prop_assert_eq!(
            b.next_dirty_area(p, 3 << shift),
            m.run(p, 3 << shift).map(|r| m.bytes(r))
        );
    }
    let ser = b.serialize_range(0, m.nbits);
    for i in 0..m.nbits {
        prop_assert_eq!(
            ser[(i / 8) as usize] & (1 << (i % 8)) != 0,
            m.bits.contains(&i)
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Sizes from one word to several levels (64^2 bits and more), with
    /// ranges that straddle words and levels.
    #[test]
    fn matches_the_model(
        (size, shift, ops, probes) in (1u64..300_000, 9u32..13)
            .prop_flat_map(|(bits, shift)| {
                let size = bits * 512 / (1 << (shift - 9)) + bits % 7;
                let size = size.max(1);
                (Just(size), Just(shift),
                 proptest::collection::vec(op(size), 1..30),
                 proptest::collection::vec(any::<u64>(), 0..20))
            })
    ) {
        check(size, shift, ops, probes)?;
    }
}

// ---- stress: no set is lost ------------------------------------------------

#[test]
fn concurrent_sets_are_never_lost() {
    const BITS: u64 = 1 << 16;
    let b = Arc::new(DirtyBitmap::new(BITS * 512, 512).unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let setters: Vec<_> = (0..4u64)
        .map(|t| {
            let b = b.clone();
            std::thread::spawn(move || {
                let mut set = Vec::new();
                // A simple LCG per thread: deterministic, varied ranges.
                let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                for _ in 0..20_000 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let bit = (x >> 20) % BITS;
                    let n = 1 + (x >> 50) % 100;
                    let n = n.min(BITS - bit);
                    b.set_range(bit * 512, n * 512);
                    set.push((bit, n));
                }
                set
            })
        })
        .collect();
    let consumer = {
        let b = b.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let mut taken = vec![false; BITS as usize];
            let mut pos = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                match b.take_next_area(pos, 37 * 512) {
                    Some((off, len)) => {
                        for bit in off / 512..(off + len) / 512 {
                            taken[bit as usize] = true;
                        }
                        pos = off + len;
                    }
                    None if pos > 0 => pos = 0,
                    None if finished => break,
                    None => std::thread::yield_now(),
                }
            }
            taken
        })
    };
    let mut all_set = vec![false; BITS as usize];
    for s in setters {
        for (bit, n) in s.join().unwrap() {
            for x in bit..bit + n {
                all_set[x as usize] = true;
            }
        }
    }
    done.store(true, Ordering::SeqCst);
    let taken = consumer.join().unwrap();
    assert_eq!(b.count_bits(), 0);
    assert!(b.is_empty());
    assert!(b.summaries_cover_leaves());
    let lost: Vec<usize> = (0..BITS as usize)
        .filter(|i| all_set[*i] && !taken[*i])
        .collect();
    assert!(lost.is_empty(), "{} bits set but never taken", lost.len());
    let phantom = (0..BITS as usize)
        .filter(|i| taken[*i] && !all_set[*i])
        .count();
    assert_eq!(phantom, 0);
}

#[test]
fn word_serialization_round_trips_and_masks_the_tail() {
    // 100 bits: two words, the second one partly used.
    let b = DirtyBitmap::new(100 * 512, 512).unwrap();
    assert_eq!(b.words(), 2);
    b.set_range(0, 512);
    b.set_range(63 * 512, 2 * 512);
    b.set_range(99 * 512, 512);
    let mut out = [0u8; 16];
    b.serialize_words(0, &mut out);
    assert_eq!(
        u64::from_le_bytes(out[..8].try_into().unwrap()),
        1 | 1 << 63
    );
    assert_eq!(
        u64::from_le_bytes(out[8..].try_into().unwrap()),
        1 | 1 << 35
    );
    // Past the end: zeroes; a partial word: cut.
    let mut more = [0xffu8; 20];
    b.serialize_words(1, &mut more);
    assert_eq!(&more[..8], &out[8..]);
    assert_eq!(&more[8..], &[0; 12]);
    assert!(b.any_in_words(1, 5));
    assert!(!b.any_in_words(2, 5));

    // Loading: bits past the last one are dropped, the count is exact.
    let c = DirtyBitmap::new(100 * 512, 512).unwrap();
    c.deserialize_words_or(0, &[0xff; 16]);
    assert_eq!(c.count_bits(), 100);
    assert!(c.summaries_cover_leaves());
    let d = DirtyBitmap::new(100 * 512, 512).unwrap();
    d.deserialize_words_or(0, &out);
    assert_eq!(d.count_bits(), b.count_bits());
    assert_eq!(d.sha256_hex(), b.sha256_hex());
}

#[test]
fn sha256_is_qemus_hash_of_the_bit_level() {
    // Recorded from qemu-storage-daemon 10: a 64 MiB node, granularity
    // 64 KiB, bits 0-15 and 160 set; and the same bitmap empty.
    let b = DirtyBitmap::new(64 * M, 64 * K).unwrap();
    assert_eq!(
        b.sha256_hex(),
        "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"
    );
    b.set_range(0, M);
    b.set_range(10 * M, 64 * K);
    assert_eq!(
        b.sha256_hex(),
        "4afe3bc620c9bc81b6d6fc6f09e13de9d8e6b3ec725f337ddfd643678aef4822"
    );
}
