//! Read-side critical sections and grace periods: the IOTLB-sync rule.
//!
//! A reader (a DMA master translating an IOVA) marks its slot busy while it walks the tables
//! and uses the result. The writer, after unlinking mappings or moving a group to another
//! domain, calls [`Readers::synchronize`]: it returns once every reader that could have seen the
//! old state has left its critical section. Only then may the device write an UNMAP's status,
//! reuse a retired node, or report that an endpoint is detached.
//!
//! Correctness rests on an asymmetric pairing: a reader's store to its slot, a light barrier
//! (a compiler fence) and its loads of the tables; the writer's unlinking stores, a heavy
//! barrier (`membarrier(2)`, through the swmr-barrier crate: every thread of the process passes
//! a full fence; where membarrier is missing both barriers are full fences) and its loads of
//! the slots. Either the writer sees the reader busy (and waits), or the reader's loads come
//! after the heavy barrier and see the unlinked state. Readers pay no locked instruction, so
//! the cache misses of consecutive translations overlap.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, PoisonError,
    },
    time::{Duration, Instant},
};

/// A reader's published state: 0 when quiescent, else the epoch it entered in (always odd).
/// One cache line each, so readers never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Slot {
    state: AtomicU64,
}

/// Registry of reader slots plus the global epoch.
#[derive(Debug, Default)]
pub struct Readers {
    epoch: AtomicU64,
    slots: Mutex<Vec<Arc<Slot>>>,
}

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

    /// Enters a read-side critical section on `slot`.
    #[inline]
    pub fn enter(&self, slot: &Slot) {
        let epoch = self.epoch.load(Ordering::Relaxed) | 1;
        slot.state.store(epoch, Ordering::Relaxed);
        // Ordered before this reader's table loads by the writer's heavy barrier.
        swmr_barrier::light_barrier();
    }

    /// Leaves the critical section: nothing read inside may be used afterwards.
    #[inline]
    pub fn leave(&self, slot: &Slot) {
        slot.state.store(0, Ordering::Release);
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
        swmr_barrier::heavy_barrier();
        let target = self.epoch.fetch_add(2, Ordering::SeqCst) + 2;
        let mut started: Option<Instant> = None;
        for slot in slots.iter() {
            let mut spins = 0u32;
            loop {
                let state = slot.state.load(Ordering::Acquire);
                // Quiescent, or entered after our epoch bump: it sees the new state.
                if state == 0 || state > target {
                    break;
                }
                let since = *started.get_or_insert_with(Instant::now);
                spins += 1;
                if spins < 256 {
                    std::hint::spin_loop();
                } else {
                    // A reader still inside after a few microseconds is busy with a DMA or
                    // was preempted: sleep (with backoff) instead of stealing its CPU.
                    let nap = (since.elapsed() / 8)
                        .clamp(Duration::from_micros(20), Duration::from_millis(1));
                    std::thread::sleep(nap);
                }
            }
        }
        started.map_or(Duration::ZERO, |t| t.elapsed())
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
        readers.enter(&slot);
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
        readers.leave(&slot);
        waiter.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
    }

    #[test]
    fn readers_entering_later_do_not_block() {
        let readers = Readers::default();
        let slot = readers.register();
        readers.synchronize();
        readers.enter(&slot);
        // Entered after the epoch moved: a new grace period still waits for it, but the one
        // that already ended did not. Leave and check a further one completes.
        readers.leave(&slot);
        readers.synchronize();
        readers.unregister(&slot);
        assert!(readers.lock().is_empty());
    }
}
