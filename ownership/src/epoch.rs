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
//!
//! No reader-side operation waits for a grace period. The registry's lock is only ever held
//! to add, prune or copy slots, never across a wait; the writer waits on its own copy of the
//! slot list, refreshed (after the epoch bump) when a reader registered since the last copy:
//!
//! - A reader registering counts itself (under the registry lock) and then loads the epoch;
//!   the writer bumps the epoch and then loads the count (all four `SeqCst`). Either the
//!   writer sees the count and copies the registry with the new slot in it, or the reader's
//!   load comes later than the bump and returns the new epoch: every section of that reader
//!   starts after the writer's unlinking stores.
//! - Unregistering marks the slot dead (a state above every epoch, stored with release after
//!   the reader's last section) and never blocks: a grace period watching the slot stops
//!   watching it, also one already waiting for a section the reader left open (a leaked
//!   guard: the section ends with its reader). A slot is never registered again, so that is
//!   final; the entry leaves the registry at once, or at the next registration if the lock was
//!   busy.

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, TryLockError,
    },
    time::{Duration, Instant},
};

/// A reader's published state: `epoch | 1` while inside a critical section entered at
/// `epoch`, `epoch` (even) once it left it, `DEAD` once unregistered. One cache line each,
/// so readers never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Slot {
    state: AtomicU64,
}

/// The state of an unregistered slot: above every epoch, so no grace period waits for it.
const DEAD: u64 = u64::MAX;

/// Registry of reader slots plus the global epoch (even; bumped by 2 per grace period).
#[derive(Debug, Default)]
pub struct Readers {
    epoch: AtomicU64,
    /// Apart, so that grace periods write nothing next to what readers read but the epoch.
    registry: Box<Registry>,
}

#[derive(Debug, Default)]
struct Registry {
    /// Registered slots, and unregistered ones not pruned yet. Held only to add, prune or copy
    /// entries: a reader registering never waits for a grace period.
    slots: Mutex<Vec<Arc<Slot>>>,
    /// Registrations so far, counted under the `slots` lock.
    registered: AtomicU64,
    /// An unregistered slot was left in `slots` (its lock was busy).
    unpruned: AtomicBool,
    /// The slots grace periods watch: a copy of `slots`. Only grace periods take this lock (so
    /// they run one at a time), and may hold it across their wait.
    watched: Mutex<Watched>,
}

/// The grace periods' copy of the registry.
#[derive(Debug, Default)]
struct Watched {
    slots: Vec<Arc<Slot>>,
    /// `Registry::registered` when the copy was taken.
    registered: u64,
}

/// How long the writer watches the slots for the fast path before it passes the heavy barrier.
const FAST_WINDOW: Duration = Duration::from_micros(4);
/// A slot that shows "outside" and does not move for this long belongs to an idle reader (a
/// busy one re-enters within nanoseconds): the writer stops waiting for it at once.
const IDLE_WINDOW: Duration = Duration::from_nanos(300);

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Readers {
    /// A new slot for one reader thread. Never waits for a grace period: the registry's lock
    /// is only held briefly, by anyone.
    pub fn register(&self) -> Arc<Slot> {
        let slot = Arc::new(Slot::default());
        let registry = &*self.registry;
        {
            let mut slots = lock(&registry.slots);
            // Acquire: pairs with `unregister`, so the dead state it stored is seen here.
            if registry.unpruned.swap(false, Ordering::Acquire) {
                slots.retain(|s| s.state.load(Ordering::Relaxed) != DEAD);
            }
            slots.push(slot.clone());
            registry.registered.fetch_add(1, Ordering::SeqCst);
        }
        // After the count, against a grace period's bump then count load (see the module
        // documentation): if that grace period's copy misses this slot, this load returns its
        // epoch, and the slot starts out current.
        let epoch = self.epoch.load(Ordering::SeqCst);
        slot.state.store(epoch, Ordering::Release);
        slot
    }

    /// Forgets a slot: its reader is gone and never enters again. Never blocks: a grace period
    /// watching the slot stops waiting for it at once, even for a section the reader left open.
    pub fn unregister(&self, slot: &Arc<Slot>) {
        // Release: the reader's sections happen-before a grace period that reads this.
        slot.state.store(DEAD, Ordering::Release);
        let registry = &*self.registry;
        let mut slots = match registry.slots.try_lock() {
            Ok(slots) => slots,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                // Someone registers or copies: the next registration prunes the entry.
                registry.unpruned.store(true, Ordering::Release);
                return;
            }
        };
        slots.retain(|s| !Arc::ptr_eq(s, slot));
    }

    /// Enters a read-side critical section on `slot` (registered, not unregistered); returns
    /// the token [`Readers::leave`] needs.
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
    /// it waited (for statistics). Returns at once when no reader is registered.
    ///
    /// A reader that never leaves its section (a guard leaked on a translator that lives on)
    /// keeps this waiting until its slot is unregistered.
    pub fn synchronize(&self) -> Duration {
        let registry = &*self.registry;
        let mut watched = lock(&registry.watched);
        // Release: the caller's unlinking stores happen-before any load of the new epoch.
        let target = self.epoch.fetch_add(2, Ordering::SeqCst) + 2;
        // After the bump: a reader whose registration this misses loaded the new epoch when it
        // registered (see `register`).
        if registry.registered.load(Ordering::SeqCst) != watched.registered {
            let slots = lock(&registry.slots);
            watched.registered = registry.registered.load(Ordering::Relaxed);
            watched.slots.clone_from(&slots);
        }
        let waited = Self::wait(&watched.slots, target);
        // Gone readers stay gone: stop copying their slots around.
        watched
            .slots
            .retain(|s| s.state.load(Ordering::Relaxed) != DEAD);
        waited
    }

    /// Waits until no slot of `slots` shows a section entered before the epoch `target`.
    fn wait(slots: &[Arc<Slot>], target: u64) -> Duration {
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
        assert!(lock(&readers.registry.slots).is_empty());
    }

    /// How long a step that must not block may take before the test calls it stuck.
    const STUCK: Duration = Duration::from_secs(10);

    /// Runs `f` on a thread of its own, failing the test if it has not returned within
    /// [`STUCK`] (the stuck thread is left behind).
    fn returns<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(STUCK)
            .unwrap_or_else(|e| panic!("{what}: {e:?} after {STUCK:?}"))
    }

    /// A grace period waiting for a section: readers register and unregister meanwhile, and
    /// unregistering the slot it waits for ends the wait.
    #[test]
    fn registering_and_unregistering_never_wait_for_a_grace_period() {
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
        let other = {
            let readers = readers.clone();
            returns("register", move || readers.register())
        };
        {
            let (readers, other) = (readers.clone(), other.clone());
            returns("unregister an idle slot", move || {
                readers.unregister(&other)
            });
        }
        assert!(
            !done.load(Ordering::SeqCst),
            "a grace period ended with a reader inside"
        );
        {
            let (readers, slot) = (readers.clone(), slot.clone());
            returns("unregister a slot inside a section", move || {
                readers.unregister(&slot)
            });
        }
        returns("the grace period", move || waiter.join().unwrap());
        assert!(done.load(Ordering::SeqCst));
        // Both entries are gone (or go with the next registration) and no grace period waits.
        let last = readers.register();
        assert!(lock(&readers.registry.slots)
            .iter()
            .all(|s| Arc::ptr_eq(s, &last)));
        readers.synchronize();
        readers.unregister(&last);
        readers.synchronize();
        assert!(lock(&readers.registry.watched).slots.is_empty());
    }

    /// A reader registering while a grace period waits (for another reader) is an ordinary
    /// reader for the next one: its section is waited for.
    #[test]
    fn a_reader_registered_during_a_grace_period_is_waited_for_by_the_next() {
        let readers = Arc::new(Readers::default());
        let old = readers.register();
        let epoch = readers.enter(&old);
        let first = {
            let readers = readers.clone();
            std::thread::spawn(move || readers.synchronize())
        };
        std::thread::sleep(Duration::from_millis(20));
        let new = {
            let readers = readers.clone();
            returns("register", move || readers.register())
        };
        let entered = readers.enter(&new);
        readers.leave(&old, epoch);
        returns("the first grace period", move || first.join().unwrap());
        let done = Arc::new(AtomicBool::new(false));
        let second = {
            let (readers, done) = (readers.clone(), done.clone());
            std::thread::spawn(move || {
                readers.synchronize();
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "a grace period ended with a new reader inside"
        );
        readers.leave(&new, entered);
        returns("the second grace period", move || second.join().unwrap());
    }
}
