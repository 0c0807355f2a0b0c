//! What one request of the `requests` target may cost, checked after
//! each input so that the fuzzer finds the next amplification (a request
//! whose work or memory grows far beyond its size) as a crash:
//!
//! - the fleet's write lock held at most [`MAX_WRITE_HOLD`] at a time
//!   (measured by the fleet itself, `Fleet::take_longest_write_hold`);
//! - at most [`ALLOCATION_PER_BYTE`] × the input's size +
//!   [`ALLOCATION_BASE`] bytes allocated at the peak of one request, over
//!   what was allocated before it (counted by [`Counting`], the fuzz
//!   binaries' global allocator).

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::Duration,
};

/// The longest write-lock hold one input may cause. Generous, for an
/// unoptimised build on a busy machine: the fixture's fleet is small, so
/// a hold near it means work that grows with the input.
pub const MAX_WRITE_HOLD: Duration = Duration::from_millis(100);

/// Peak bytes one input may allocate per byte of its own.
pub const ALLOCATION_PER_BYTE: usize = 64;

/// Peak bytes any input may allocate besides: the handler's and tonic's
/// fixed costs.
pub const ALLOCATION_BASE: usize = 1024 * 1024;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, counting the bytes live now and their peak.
pub struct Counting;

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Relaxed) + by;
    PEAK.fetch_max(now, Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Starts measuring one request: returns the bytes live now.
pub fn start() -> usize {
    let now = CURRENT.load(Relaxed);
    PEAK.store(now, Relaxed);
    now
}

/// The peak bytes allocated since [`start`] returned `baseline`, over it.
pub fn peak_since(baseline: usize) -> usize {
    PEAK.load(Relaxed).saturating_sub(baseline)
}

/// Fails the input if it cost more than its bound.
pub fn check(input_bytes: usize, baseline: usize, longest_hold: Duration) {
    let peak = peak_since(baseline);
    let allowed = ALLOCATION_PER_BYTE
        .saturating_mul(input_bytes)
        .saturating_add(ALLOCATION_BASE);
    assert!(
        peak <= allowed,
        "an input of {input_bytes} bytes allocated {peak} bytes at its peak \
         (bound: {ALLOCATION_PER_BYTE} per byte + {ALLOCATION_BASE})"
    );
    assert!(
        longest_hold <= MAX_WRITE_HOLD,
        "an input of {input_bytes} bytes held the fleet's write lock for {longest_hold:?} \
         (bound: {MAX_WRITE_HOLD:?})"
    );
}
