// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
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
//!
//! **Readers in other processes** (DMA masters that map the tables read-only, see
//! [`crate::remote`]) cannot be reached by `membarrier(2)`, so they pay the fence themselves:
//! [`enter_fenced`] publishes the slot and then passes a full fence before any table load, and
//! the writer passes one after its epoch bump before it reads their slots. Either the writer
//! sees the slot inside a section (and waits for it), or the reader's loads come after the
//! writer's fence and see the unlinked state. Their slots live in memory the master writes
//! ([`RemoteReaders`]), so nothing the writer relies on is stored there by the writer: a
//! master that stays inside a section past its bound is *cut off* ([`RemoteReaders::cut_off`]),
//! the section it is stuck in is abandoned (no grace period waits for that section again), and
//! its attachment ends with [`Readers::detach_remote`]. A cut-off master that ignores its
//! revocation can still read tables the writer changes; the promise holds for cooperating
//! masters, and a cut-off is reported.

use std::{
    fmt,
    sync::{
        atomic::{fence, AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, PoisonError, TryLockError,
    },
    time::{Duration, Instant},
};

use shm::Words;

/// A reader's published state: `epoch | 1` while inside a critical section entered at
/// `epoch`, `epoch` (even) once it left it, `DEAD` once unregistered. One cache line each,
/// so readers never share a line.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Slot {
    state: AtomicU64,
}

/// The state of an unregistered slot: above every epoch, so no grace period waits for it.
const DEAD: u64 = u64::MAX;

/// Registry of reader slots plus the global epoch (even; bumped by 2 per grace period).
#[derive(Debug)]
pub(crate) struct Readers {
    /// Word 0: the epoch. A page of its own (in the file shared with DMA masters, for a model
    /// that has one), so grace periods write nothing next to what readers read but the epoch.
    epoch: Words,
    registry: Box<Registry>,
}

impl Default for Readers {
    /// Readers with the epoch in this process's memory.
    ///
    /// # Panics
    /// When the host refuses a one-page mapping.
    fn default() -> Self {
        let words = Words::anonymous(1).unwrap_or_else(|e| panic!("epoch page: {e}"));
        Readers::new(words).unwrap_or_else(|| panic!("epoch page: no word"))
    }
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
    /// Readers in other processes, attached and not detached yet (or not pruned yet).
    remotes: Mutex<Vec<Arc<Remote>>>,
    /// Attachments so far, counted under the `remotes` lock.
    attached: AtomicU64,
}

/// The grace periods' copy of the registry.
#[derive(Debug, Default)]
struct Watched {
    slots: Vec<Arc<Slot>>,
    /// `Registry::registered` when the copy was taken.
    registered: u64,
    remotes: Vec<Arc<Remote>>,
    /// `Registry::attached` when the copy was taken.
    attached: u64,
}

/// The reader slots of a DMA master in another process, in memory both processes map (the
/// master writes them). Each slot is one reader thread's section word, with the values
/// [`RemoteTables::enter`](crate::RemoteTables::enter) and
/// [`RemoteTables::leave`](crate::RemoteTables::leave) store.
pub trait RemoteReaders: Send + Sync + fmt::Debug {
    /// How many slots the master has.
    fn slot_count(&self) -> usize;
    /// Slot `index`'s section word.
    fn slot(&self, index: usize) -> Option<&AtomicU64>;
    /// A grace period gave up on the master (a section outlived the bound): revoke it. Called
    /// once, by the grace period, which may hold the model's lock: must not block.
    fn cut_off(&self);
}

/// A remote master attached to the model's readers (see
/// [`TranslatorSource::attach_remote`](crate::TranslatorSource::attach_remote)).
#[derive(Debug)]
pub struct Remote {
    readers: Arc<dyn RemoteReaders>,
    /// How long a grace period waits for one of its sections.
    bound: Duration,
    /// Detached: grace periods stop watching it. Writer-side memory: the master cannot
    /// undo it.
    dead: AtomicBool,
    /// Cut off by a grace period.
    cut: AtomicBool,
    /// Per slot, the section value a cut-off abandoned (0: none): no grace period waits for
    /// that section again; any other section on the slot is waited for.
    abandoned: Box<[AtomicU64]>,
}

/// Whether a remote slot showing `seen` holds up a grace period that bumped the epoch to
/// `target`: not when it is outside a section (even), inside one that loaded the new epoch,
/// or inside the section a cut-off abandoned.
#[inline]
fn remote_settled(seen: u64, target: u64, abandoned: u64) -> bool {
    seen & 1 == 0 || seen >= target || seen == abandoned
}

impl Remote {
    /// Whether a grace period cut the master off.
    #[cfg(test)]
    pub(crate) fn is_cut_off(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// Whether it was detached.
    pub(crate) fn is_detached(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Abandons every section the master is inside of now that started before `target`.
    fn abandon(&self, target: u64) {
        for (i, abandoned) in self.abandoned.iter().enumerate() {
            if let Some(slot) = self.readers.slot(i) {
                let seen = slot.load(Ordering::Acquire);
                if seen & 1 == 1 && seen < target {
                    abandoned.store(seen, Ordering::Relaxed);
                }
            }
        }
    }

    /// Cuts the master off (once): its sections from before `target` are abandoned.
    fn cut_off(&self, target: u64) {
        self.abandon(target);
        if !self.cut.swap(true, Ordering::AcqRel) {
            self.readers.cut_off();
        }
    }

    /// Waits (up to `bound` from `since`) until no slot of the master is inside a section
    /// other than an abandoned one, for a master that was revoked and is about to be detached:
    /// a section it entered before it saw the revocation ends first. Sections still open at
    /// the bound are abandoned. Returns whether every section ended in time.
    pub fn drain(&self, bound: Duration) -> bool {
        let since = Instant::now();
        let mut clean = true;
        for (i, abandoned) in self.abandoned.iter().enumerate() {
            let Some(slot) = self.readers.slot(i) else {
                break;
            };
            let seen = slot.load(Ordering::Acquire);
            if seen & 1 == 0 || seen == abandoned.load(Ordering::Relaxed) {
                continue;
            }
            if !wait_change(slot, seen, since + bound, || self.is_detached()) {
                abandoned.store(seen, Ordering::Relaxed);
                clean = false;
            }
        }
        clean
    }
}

/// How long a wait for a remote section spins before it sleeps. A master's section is
/// normally one DMA, microseconds: spinning ends most waits at once (a sleep costs a timer
/// wake-up). A section still open after that belongs to a preempted master or a long DMA:
/// the wait then sleeps (with backoff), which also lets a master that shares the CPU run and
/// leave its section. (Yielding instead does not: the scheduler gives the CPU back to the
/// waiter, and a busy master on the same CPU then held every grace period for milliseconds.)
const REMOTE_SPIN: Duration = Duration::from_micros(SPIN_US);
const SPIN_US: u64 = 50;

/// Waits until `slot` no longer shows `seen` (true), or `deadline` passes or `stop()` holds
/// (false).
fn wait_change(slot: &AtomicU64, seen: u64, deadline: Instant, stop: impl Fn() -> bool) -> bool {
    let since = Instant::now();
    let mut spins = 0u32;
    while slot.load(Ordering::Acquire) == seen {
        spins = spins.wrapping_add(1);
        if spins % 64 != 0 {
            std::hint::spin_loop();
            continue;
        }
        if stop() {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        let waited = now - since;
        if waited >= REMOTE_SPIN {
            let nap = (waited / 8)
                .clamp(Duration::from_micros(20), Duration::from_millis(1))
                .min(deadline - now);
            std::thread::sleep(nap);
        }
    }
    true
}

/// Enters a read-side critical section on a slot in memory shared with the writer's process:
/// the protocol of a DMA master, which no heavy barrier can reach. Loads the epoch with
/// `Relaxed` (the epoch may be mapped read-only), publishes `epoch | 1`, then passes a full
/// fence before anything else it loads. Returns the token [`leave_fenced`] needs.
#[inline]
pub(crate) fn enter_fenced(epoch: &AtomicU64, slot: &AtomicU64) -> u64 {
    let epoch = epoch.load(Ordering::Relaxed) & !1;
    slot.store(epoch | 1, Ordering::Relaxed);
    // Pairs with the writer's fence after its bump (see the module documentation); also the
    // acquire side for the epoch just loaded.
    fence(Ordering::SeqCst);
    epoch
}

/// Leaves a section entered with [`enter_fenced`].
#[inline]
pub(crate) fn leave_fenced(slot: &AtomicU64, epoch: u64) {
    slot.store(epoch, Ordering::Release);
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
    /// Readers whose epoch is word 0 of `epoch` (zeroed: a fresh mapping); None when it has no
    /// word.
    pub fn new(epoch: Words) -> Option<Self> {
        if epoch.is_empty() {
            return None;
        }
        Some(Readers {
            epoch,
            registry: Box::default(),
        })
    }

    #[inline(always)]
    fn epoch(&self) -> &AtomicU64 {
        &self.epoch[0]
    }

    /// The current epoch.
    pub fn current_epoch(&self) -> u64 {
        self.epoch().load(Ordering::Acquire)
    }

    /// Attaches the slots of a DMA master in another process: from now on every grace period
    /// also waits for its sections, each one for at most `bound` before the master is cut off.
    /// Never waits for a grace period. Call before the master can enter a section.
    pub fn attach_remote(&self, readers: Arc<dyn RemoteReaders>, bound: Duration) -> Arc<Remote> {
        let abandoned = (0..readers.slot_count())
            .map(|_| AtomicU64::new(0))
            .collect();
        let remote = Arc::new(Remote {
            readers,
            bound,
            dead: AtomicBool::new(false),
            cut: AtomicBool::new(false),
            abandoned,
        });
        let registry = &*self.registry;
        {
            let mut remotes = lock(&registry.remotes);
            remotes.retain(|r| !r.is_detached());
            remotes.push(remote.clone());
            registry.attached.fetch_add(1, Ordering::SeqCst);
        }
        // As in `register`: a grace period whose copy misses this master bumped the epoch
        // before this load, which then orders its unlinking stores before everything the master
        // is told after this returns.
        self.epoch().load(Ordering::SeqCst);
        remote
    }

    /// Detaches a master: grace periods stop waiting for it, also one waiting now. Never
    /// blocks.
    pub fn detach_remote(&self, remote: &Arc<Remote>) {
        remote.dead.store(true, Ordering::Release);
        if let Ok(mut remotes) = self.registry.remotes.try_lock() {
            remotes.retain(|r| !Arc::ptr_eq(r, remote));
        }
    }

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
        let epoch = self.epoch().load(Ordering::SeqCst);
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
        let epoch = self.epoch().load(Ordering::Acquire);
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
    /// keeps this waiting until its slot is unregistered. A remote master's section holds it up
    /// for at most the master's bound (see [`Readers::attach_remote`]).
    pub fn synchronize(&self) -> Duration {
        let registry = &*self.registry;
        let mut watched = lock(&registry.watched);
        let start = Instant::now();
        // Release: the caller's unlinking stores happen-before any load of the new epoch.
        let target = self.epoch().fetch_add(2, Ordering::SeqCst) + 2;
        // After the bump: a reader whose registration this misses loaded the new epoch when it
        // registered (see `register`).
        if registry.registered.load(Ordering::SeqCst) != watched.registered {
            let slots = lock(&registry.slots);
            watched.registered = registry.registered.load(Ordering::Relaxed);
            watched.slots.clone_from(&slots);
        }
        if registry.attached.load(Ordering::SeqCst) != watched.attached {
            let remotes = lock(&registry.remotes);
            watched.attached = registry.attached.load(Ordering::Relaxed);
            watched.remotes.clone_from(&remotes);
        }
        if !watched.remotes.is_empty() {
            // Pairs with the fence of every remote reader's entry (`enter_fenced`): a slot read
            // after it as outside belongs to a reader whose next loads see the unlinked state.
            fence(Ordering::SeqCst);
        }
        Self::wait(&watched.slots, target);
        Self::wait_remotes(&watched.remotes, target, start);
        // Gone readers stay gone: stop copying their slots around.
        watched
            .slots
            .retain(|s| s.state.load(Ordering::Relaxed) != DEAD);
        watched.remotes.retain(|r| !r.is_detached());
        start.elapsed()
    }

    /// Waits for the remote masters' sections that started before the epoch `target`; a
    /// master still inside one at its bound (counted from `start`) is cut off.
    fn wait_remotes(remotes: &[Arc<Remote>], target: u64, start: Instant) {
        for remote in remotes {
            let deadline = start + remote.bound;
            for (i, abandoned) in remote.abandoned.iter().enumerate() {
                if remote.is_detached() {
                    break;
                }
                let Some(slot) = remote.readers.slot(i) else {
                    break;
                };
                let seen = slot.load(Ordering::Acquire);
                if remote_settled(seen, target, abandoned.load(Ordering::Relaxed)) {
                    continue;
                }
                // Any change means that section ended.
                if !wait_change(slot, seen, deadline, || remote.is_detached())
                    && !remote.is_detached()
                {
                    remote.cut_off(target);
                    break;
                }
            }
        }
    }

    /// Waits until no slot of `slots` shows a section entered before the epoch `target`.
    fn wait(slots: &[Arc<Slot>], target: u64) {
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
            return;
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

    /// Slots of a "remote" master in a page of words: slot `i` is word `16 * (i + 1)`.
    #[derive(Debug)]
    struct TestRemote {
        words: Words,
        slots: usize,
        cut_offs: AtomicU64,
    }

    impl TestRemote {
        fn new(slots: usize) -> Arc<Self> {
            Arc::new(TestRemote {
                words: Words::anonymous(16 * (slots + 1)).unwrap(),
                slots,
                cut_offs: AtomicU64::new(0),
            })
        }

        fn word(&self, i: usize) -> &AtomicU64 {
            &self.words[16 * (i + 1)]
        }
    }

    impl RemoteReaders for TestRemote {
        fn slot_count(&self) -> usize {
            self.slots
        }
        fn slot(&self, index: usize) -> Option<&AtomicU64> {
            (index < self.slots).then(|| self.word(index))
        }
        fn cut_off(&self) {
            self.cut_offs.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs a grace period on its own thread; the flag says when it returned.
    fn grace_period(readers: &Arc<Readers>) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
        let done = Arc::new(AtomicBool::new(false));
        let (r, d) = (readers.clone(), done.clone());
        let handle = std::thread::spawn(move || {
            r.synchronize();
            d.store(true, Ordering::SeqCst);
        });
        (done, handle)
    }

    #[test]
    fn a_remote_section_holds_a_grace_period_until_it_ends() {
        let readers = Arc::new(Readers::default());
        let remote = TestRemote::new(2);
        let handle = readers.attach_remote(remote.clone(), Duration::from_secs(60));
        let epoch = enter_fenced(readers.epoch(), remote.word(1));
        let (done, waiter) = grace_period(&readers);
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "ended with a remote reader inside"
        );
        leave_fenced(remote.word(1), epoch);
        returns("the grace period", move || waiter.join().unwrap());
        // A section entered after the bump does not hold the next one... until the one after.
        let epoch = enter_fenced(readers.epoch(), remote.word(0));
        assert_eq!(epoch, readers.current_epoch());
        leave_fenced(remote.word(0), epoch);
        readers.synchronize();
        assert!(!handle.is_cut_off());
        assert_eq!(remote.cut_offs.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_stalled_remote_is_cut_off_at_its_bound_and_its_section_abandoned() {
        let readers = Arc::new(Readers::default());
        let remote = TestRemote::new(3);
        let bound = Duration::from_millis(100);
        let handle = readers.attach_remote(remote.clone(), bound);
        let stuck = enter_fenced(readers.epoch(), remote.word(2));
        let started = Instant::now();
        readers.synchronize();
        let waited = started.elapsed();
        assert!(waited >= bound, "gave up after {waited:?}");
        assert!(waited < Duration::from_secs(5), "waited {waited:?}");
        assert!(handle.is_cut_off());
        assert_eq!(remote.cut_offs.load(Ordering::SeqCst), 1);
        // The abandoned section holds nothing up any more; another one on another slot does.
        let started = Instant::now();
        readers.synchronize();
        assert!(started.elapsed() < bound);
        let other = enter_fenced(readers.epoch(), remote.word(0));
        let (done, waiter) = grace_period(&readers);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!done.load(Ordering::SeqCst));
        leave_fenced(remote.word(0), other);
        returns("the grace period", move || waiter.join().unwrap());
        assert_eq!(remote.cut_offs.load(Ordering::SeqCst), 1, "cut off once");
        // Draining: the stuck section is abandoned, a later one is waited for (bounded).
        let racing = enter_fenced(readers.epoch(), remote.word(1));
        assert!(
            !handle.drain(Duration::from_millis(20)),
            "a section was still open"
        );
        leave_fenced(remote.word(1), racing);
        assert!(handle.drain(Duration::from_millis(20)));
        readers.detach_remote(&handle);
        leave_fenced(remote.word(2), stuck);
    }

    #[test]
    fn detaching_a_remote_ends_a_grace_period_waiting_for_it() {
        let readers = Arc::new(Readers::default());
        let remote = TestRemote::new(1);
        let handle = readers.attach_remote(remote.clone(), Duration::from_secs(60));
        enter_fenced(readers.epoch(), remote.word(0));
        let (done, waiter) = grace_period(&readers);
        std::thread::sleep(Duration::from_millis(30));
        assert!(!done.load(Ordering::SeqCst));
        {
            let (readers, handle) = (readers.clone(), handle.clone());
            returns("detach", move || readers.detach_remote(&handle));
        }
        returns("the grace period", move || waiter.join().unwrap());
        assert!(handle.is_detached() && !handle.is_cut_off());
        // Gone from the registry: nothing is watched any more.
        readers.synchronize();
        assert!(lock(&readers.registry.watched).remotes.is_empty());
        assert!(lock(&readers.registry.remotes).is_empty());
    }

    /// Values a master cannot be trusted with only hurt that master: garbage in its slots
    /// never blocks a grace period past the bound and never panics.
    #[test]
    fn garbage_in_remote_slots_is_bounded() {
        let readers = Arc::new(Readers::default());
        let remote = TestRemote::new(4);
        for (i, v) in [u64::MAX, 1, 3, 0x8000_0000_0000_0001]
            .into_iter()
            .enumerate()
        {
            remote.word(i).store(v, Ordering::SeqCst);
        }
        readers.synchronize();
        let bound = Duration::from_millis(40);
        let handle = readers.attach_remote(remote.clone(), bound);
        let started = Instant::now();
        readers.synchronize();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(handle.is_cut_off());
    }
}
