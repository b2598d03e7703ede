//! Read-side critical sections and grace periods: the IOTLB-sync rule.
//!
//! A reader (a DMA master translating an IOVA) marks its slot busy while it walks the tables
//! and uses the result. The writer, after unlinking mappings or moving a group to another
//! domain, calls [`Readers::synchronize`]: it returns once every reader that could have seen the
//! old state has left its critical section. Only then may the device write an UNMAP's status,
//! reuse a retired node, or report that an endpoint is detached.
//!
//! Readers pay no locked instruction and no fence, so the cache misses of consecutive
//! translations overlap. A reader entering a section loads the global epoch (acquire) and
//! publishes it in its slot (release); leaving, it publishes the same epoch as "outside". The
//! writer bumps the epoch after its unlinking stores, and a grace period ends in one of two
//! ways for each slot:
//!
//! - Fast, no interrupt: the slot shows an epoch at least the new one. That reader loaded the
//!   new epoch, so it sees the unlinked state from then on (the bump happens-before its loads),
//!   and every section it entered earlier ended before that store (release, acquire). A reader
//!   that is translating re-enters within nanoseconds, so a busy reader is never interrupted.
//! - Slow: a slot that shows "outside" and does not move for 300 ns belongs to an idle reader,
//!   and one still behind after 4 us to a reader in a long section. The writer then passes a
//!   heavy barrier (`membarrier(2)` through the swmr-barrier crate: every running thread of the
//!   process passes a full fence; where membarrier is missing, readers fence on entry instead).
//!   After it a slot's value is current: "outside" is final, and a reader still inside an older
//!   section is waited for.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

/// A reader's published state: `epoch | 1` while inside a critical section entered at
/// `epoch`, `epoch` (even) once it left it. One cache line each, so readers never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Slot {
    state: AtomicU64,
}

/// Registry of reader slots plus the global epoch (even; bumped by 2 per grace period).
#[derive(Debug, Default)]
pub struct Readers {
    epoch: AtomicU64,
    slots: Mutex<Vec<Arc<Slot>>>,
}

/// How long the writer watches the slots for the fast path before it passes the heavy barrier.
const FAST_WINDOW: Duration = Duration::from_micros(4);
/// A slot that shows "outside" and does not move for this long belongs to an idle reader (a
/// busy one re-enters within nanoseconds): the writer stops waiting for it at once.
const IDLE_WINDOW: Duration = Duration::from_nanos(300);

impl Readers {
    /// A new slot for one reader thread.
    pub fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        self.lock().push(slot.clone());
        slot
    }

    /// Forgets a slot (its reader is gone).
    pub fn unregister(&self, slot: &Arc<Slot>) {
        self.lock().retain(|s| !Arc::ptr_eq(s, slot));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Slot>>> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Enters a read-side critical section on `slot`; returns the token [`Readers::leave`]
    /// needs.
    #[inline(always)]
    pub fn enter(&self, slot: &Slot) -> u64 {
        let epoch = self.epoch.load(Ordering::Acquire);
        slot.state.store(epoch | 1, Ordering::Release);
        // Ordered before this reader's table loads by the writer's heavy barrier.
        swmr_barrier::light_barrier();
        epoch
    }

    /// Leaves the critical section entered with `epoch`: nothing read inside may be used
    /// afterwards.
    #[inline(always)]
    pub fn leave(&self, slot: &Slot, epoch: u64) {
        slot.state.store(epoch, Ordering::Release);
    }

    /// Waits until every reader that entered before this call has left, and returns how long
    /// it waited (for statistics). Free when no reader is registered.
    pub fn synchronize(&self) -> Duration {
        let slots = self.lock();
        if slots.is_empty() {
            // A reader registering later enters after this lock is released, hence after the
            // caller's unlinking stores: it cannot see the old state.
            return Duration::ZERO;
        }
        // Release: the caller's unlinking stores happen-before any load of the new epoch.
        let target = self.epoch.fetch_add(2, Ordering::SeqCst) + 2;
        let start = Instant::now();
        let mut current = true;
        'fast: for slot in slots.iter() {
            let mut last = slot.state.load(Ordering::Acquire);
            let mut last_change = start;
            let mut spins = 0u32;
            while last < target {
                std::hint::spin_loop();
                let state = slot.state.load(Ordering::Acquire);
                spins += 1;
                if state != last {
                    last = state;
                    last_change = Instant::now();
                } else if spins % 8 == 0 {
                    let now = Instant::now();
                    // Outside and not moving: an idle reader, which only the heavy barrier
                    // settles. Anything else still behind after the window: the same.
                    if (last & 1 == 0 && now - last_change >= IDLE_WINDOW)
                        || now - start >= FAST_WINDOW
                    {
                        current = false;
                        break 'fast;
                    }
                }
            }
        }
        if current {
            return start.elapsed();
        }
        // Idle readers (or ones in a long section): make their slots current.
        swmr_barrier::heavy_barrier();
        for slot in slots.iter() {
            let seen = slot.state.load(Ordering::Acquire);
            // Outside (a section it enters later starts after the barrier), or inside one
            // that loaded the new epoch.
            if seen & 1 == 0 || seen >= target {
                continue;
            }
            let mut spins = 0u32;
            let since = Instant::now();
            // Any change means the old section ended.
            while slot.state.load(Ordering::Acquire) == seen {
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                } else {
                    // Still inside after a few microseconds: busy with a DMA or preempted.
                    // Sleep (with backoff) instead of stealing its CPU.
                    let nap = (since.elapsed() / 8)
                        .clamp(Duration::from_micros(20), Duration::from_millis(1));
                    std::thread::sleep(nap);
                }
            }
        }
        start.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn synchronize_waits_for_a_reader_inside() {
        let readers = Arc::new(Readers::default());
        let slot = readers.register();
        let epoch = readers.enter(&slot);
        let done = Arc::new(AtomicBool::new(false));
        let waiter = {
            let (readers, done) = (readers.clone(), done.clone());
            std::thread::spawn(move || {
                readers.synchronize();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "a grace period ended with a reader inside"
        );
        readers.leave(&slot, epoch);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn readers_entering_later_do_not_block() {
        let readers = Readers::default();
        let slot = readers.register();
        readers.synchronize();
        let epoch = readers.enter(&slot);
        // Entered after the epoch moved: a new grace period still waits for it, but the one
        // that already ended did not. Leave and check a further one completes.
        readers.leave(&slot, epoch);
        readers.synchronize();
        readers.unregister(&slot);
        assert!(readers.lock().is_empty());
    }
}
