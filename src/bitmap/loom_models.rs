//! Loom models of the bitmap's concurrency contract (built and run with
//! `RUSTFLAGS="--cfg loom" cargo test --release --lib bitmap::loom_models`).
//! Each model runs a setter against the consumer on a tiny bitmap and
//! checks, in every interleaving loom explores, that the set bit was either
//! taken or is still dirty, that the count is exact, and that no summary
//! bit is stale-clear.

use loom::sync::Arc;
use loom::thread;

use super::DirtyBitmap;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b.check(f);
}

/// A set into a word the consumer is emptying by a take.
#[test]
fn set_vs_take_same_word() {
    model(|| {
        let b = Arc::new(DirtyBitmap::for_bits(128));
        b.set_range(6 * 512, 512);
        let s = {
            let b = b.clone();
            thread::spawn(move || b.set_range(5 * 512, 512))
        };
        let taken = b.take_next_area(0, 64 * 512);
        s.join().unwrap();
        let took_5 = matches!(taken, Some((off, len)) if off <= 5 * 512 && off + len > 5 * 512);
        assert!(took_5 || b.test(5 * 512), "bit 5 lost: {taken:?}");
        assert!(!(took_5 && b.test(5 * 512)), "bit 5 taken and still set");
        assert!(b.summaries_cover_leaves());
        assert_eq!(b.count_bits(), b.popcount());
    });
}

/// A set racing with a reset of the word it lands in.
#[test]
fn set_vs_reset() {
    model(|| {
        let b = Arc::new(DirtyBitmap::for_bits(128));
        b.set_range(100 * 512, 512);
        let s = {
            let b = b.clone();
            thread::spawn(move || b.set_range(70 * 512, 512))
        };
        b.reset_range(64 * 512, 64 * 512);
        s.join().unwrap();
        assert!(!b.test(100 * 512));
        assert!(b.summaries_cover_leaves());
        assert_eq!(b.count_bits(), b.popcount());
        // Whatever the order, a later scan agrees with the bits.
        assert_eq!(b.next_dirty(0).is_some(), b.test(70 * 512));
    });
}

/// Three levels: the take empties a leaf word and its level-1 word, so
/// the consumer clears summary bits on two levels while the setter marks
/// a sibling word under the same level-1 word.
#[test]
fn set_vs_summary_update_two_levels() {
    model(|| {
        let b = Arc::new(DirtyBitmap::for_bits(64 * 64 * 2));
        b.set_range(64 * 64 * 512, 512); // leaf word 64, level-1 word 1
        let s = {
            let b = b.clone();
            thread::spawn(move || b.set_range((65 * 64 + 3) * 512, 512)) // leaf word 65
        };
        let taken = b.take_next_area(64 * 64 * 512, 512);
        s.join().unwrap();
        assert_eq!(taken, Some((64 * 64 * 512, 512)));
        assert!(b.test((65 * 64 + 3) * 512));
        assert!(b.summaries_cover_leaves());
        assert_eq!(b.next_dirty(0), Some((65 * 64 + 3) * 512));
        assert_eq!(b.count_bits(), 1);
    });
}

/// Two setters on one word while nothing clears: both bits land, the
/// count is exact, the summary is set once.
#[test]
fn two_setters() {
    model(|| {
        let b = Arc::new(DirtyBitmap::for_bits(128));
        let s = {
            let b = b.clone();
            thread::spawn(move || b.set_range(0, 512))
        };
        b.set_range(512, 512);
        s.join().unwrap();
        assert_eq!(b.count_bits(), 2);
        assert!(b.summaries_cover_leaves());
    });
}
