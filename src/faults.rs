// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fault records on their way to the guest's event queue.
//!
//! The fast path (any thread) pushes records into a bounded backlog and wakes the device's
//! worker through an eventfd; the worker writes them into the buffers the driver posted on the
//! eventq, oldest first. With no buffer available the records wait (spec: the device may wait
//! or drop); when the backlog is full the oldest record is dropped and counted. A record
//! belongs to the device instance that reported it: one taken before a reset never comes back
//! after it.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex, MutexGuard},
};

use virtio::FaultRecord;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::stats::Stats;

/// The bounded backlog of fault records.
///
/// Every record is accounted for, under one lock: `reported = delivered + dropped + waiting +
/// in flight` (in flight: taken by the worker, not yet written or put back).
#[derive(Debug)]
pub struct FaultQueue {
    inner: Mutex<Inner>,
    capacity: usize,
    wake: EventFd,
    stats: Arc<Stats>,
}

#[derive(Debug, Default)]
struct Inner {
    backlog: VecDeque<FaultRecord>,
    in_flight: usize,
    /// Bumped by every clear (reset, disconnect) and by close: a record taken in an earlier
    /// epoch belongs to a device instance that is gone.
    epoch: u64,
    /// Shutting down: new records are dropped (and counted).
    closed: bool,
    /// A driver listens: it posted event buffers (kicked the event queue) since the last
    /// clear. Records reported before that are dropped (counted): they belong to no driver
    /// (firmware doing DMA before the OS's driver exists), and Linux's driver takes an event
    /// that arrives while it is still probing the device for a crash.
    listening: bool,
}

/// A record taken out of the backlog by [`FaultQueue::pop`]: it goes to
/// [`FaultQueue::delivered`] once written, or back through [`FaultQueue::unpop`].
#[derive(Debug)]
#[must_use = "a taken record is delivered or put back"]
pub struct Taken {
    record: FaultRecord,
    epoch: u64,
}

impl std::ops::Deref for Taken {
    type Target = FaultRecord;

    fn deref(&self) -> &FaultRecord {
        &self.record
    }
}

/// The fault counters at one instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultAccounts {
    pub reported: u64,
    pub delivered: u64,
    pub dropped: u64,
    pub waiting: u64,
    pub in_flight: u64,
}

impl FaultQueue {
    pub fn new(capacity: usize, stats: Arc<Stats>) -> std::io::Result<Self> {
        Ok(FaultQueue {
            inner: Mutex::new(Inner {
                backlog: VecDeque::with_capacity(capacity.min(4096)),
                ..Inner::default()
            }),
            capacity: capacity.max(1),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stats,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn dropped(&self, n: usize) {
        self.stats.faults_dropped.fetch_add(n as u64, Relaxed);
    }

    /// Queues a record for the guest and wakes the worker. Never blocks on the guest.
    pub fn push(&self, record: FaultRecord) {
        {
            let mut inner = self.lock();
            self.stats.faults_reported.fetch_add(1, Relaxed);
            if inner.closed || !inner.listening {
                self.dropped(1);
                return;
            }
            if inner.backlog.len() >= self.capacity {
                inner.backlog.pop_front();
                self.dropped(1);
            }
            inner.backlog.push_back(record);
        }
        // A full eventfd counter only means a wake-up is already pending.
        let _ = self.wake.write(1);
    }

    /// The eventfd the worker polls.
    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }

    /// Clears the wake-up after the worker was woken.
    pub fn acknowledge(&self) {
        let _ = self.wake.read();
    }

    /// Takes the oldest record for delivery; the caller then hands it to [`Self::delivered`]
    /// or [`Self::unpop`].
    pub fn pop(&self) -> Option<Taken> {
        let mut inner = self.lock();
        let record = inner.backlog.pop_front()?;
        inner.in_flight += 1;
        Some(Taken {
            record,
            epoch: inner.epoch,
        })
    }

    /// The record taken by [`Self::pop`] reached the guest (the buffers it was written into
    /// were the ones the driver posted, whatever happened to the backlog meanwhile).
    pub fn delivered(&self, _taken: Taken) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        self.stats.faults_delivered.fetch_add(1, Relaxed);
    }

    /// Puts a record taken by [`Self::pop`] back at the head (no buffer could take it). It is
    /// the oldest record: when the backlog filled up meanwhile, or the queue is closed, it is
    /// the one dropped. So is a record taken before the backlog was cleared: it belongs to the
    /// driver before the reset, never to the next one.
    pub fn unpop(&self, taken: Taken) {
        let mut inner = self.lock();
        inner.in_flight = inner.in_flight.saturating_sub(1);
        if inner.closed || taken.epoch != inner.epoch || inner.backlog.len() >= self.capacity {
            self.dropped(1);
        } else {
            inner.backlog.push_front(taken.record);
        }
    }

    pub fn len(&self) -> usize {
        self.lock().backlog.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A driver posted buffers on the event queue: records are taken from now on.
    pub fn listen(&self) {
        self.lock().listening = true;
    }

    /// Drops every waiting record (device reset, disconnect), counting them; a record taken
    /// before is dropped too if it is put back. Records are taken again once the next driver
    /// listens.
    pub fn clear(&self) -> usize {
        let mut inner = self.lock();
        inner.epoch += 1;
        inner.listening = false;
        let n = inner.backlog.len();
        inner.backlog.clear();
        self.dropped(n);
        n
    }

    /// Shutdown: drops the waiting records and every record reported from now on (counted).
    /// Returns how many were waiting.
    pub fn close(&self) -> usize {
        let mut inner = self.lock();
        inner.closed = true;
        inner.epoch += 1;
        let n = inner.backlog.len();
        inner.backlog.clear();
        self.dropped(n);
        n
    }

    /// The waiting records, oldest first (for a saved device state).
    pub fn snapshot(&self) -> Vec<FaultRecord> {
        self.lock().backlog.iter().copied().collect()
    }

    /// Replaces the waiting records with those of a loaded device state (the newest kept
    /// when they exceed the backlog): the ones replaced count as dropped, the loaded ones as
    /// reported here, so every record stays accounted for.
    pub fn restore(&self, records: Vec<FaultRecord>) {
        {
            let mut inner = self.lock();
            // The state was saved with a driver listening: it still is.
            inner.listening = true;
            let replaced = inner.backlog.len();
            inner.backlog.clear();
            self.dropped(replaced);
            self.stats
                .faults_reported
                .fetch_add(records.len() as u64, Relaxed);
            let excess = records.len().saturating_sub(self.capacity);
            self.dropped(excess);
            inner.backlog.extend(records.into_iter().skip(excess));
        }
        let _ = self.wake.write(1);
    }

    /// The counters, consistent with each other.
    pub fn accounts(&self) -> FaultAccounts {
        let inner = self.lock();
        FaultAccounts {
            reported: self.stats.faults_reported.load(Relaxed),
            delivered: self.stats.faults_delivered.load(Relaxed),
            dropped: self.stats.faults_dropped.load(Relaxed),
            waiting: inner.backlog.len() as u64,
            in_flight: inner.in_flight as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio::FaultReason;

    use super::*;

    fn record(address: u64) -> FaultRecord {
        FaultRecord {
            reason: FaultReason::Mapping,
            flags: 0,
            endpoint: 1,
            address,
        }
    }

    #[test]
    fn bounded_backlog_drops_the_oldest_and_counts() {
        let stats = Arc::new(Stats::default());
        let q = FaultQueue::new(2, stats.clone()).unwrap();
        q.listen();
        for a in 0..5 {
            q.push(record(a));
        }
        assert_eq!(q.len(), 2);
        assert_eq!(stats.faults_dropped.load(Relaxed), 3);
        assert_eq!(stats.faults_reported.load(Relaxed), 5);
        let taken = q.pop().unwrap();
        assert_eq!(taken.address, 3);
        q.unpop(taken);
        let taken = q.pop().unwrap();
        assert_eq!(taken.address, 3);
        // The backlog filled up while a record was out: putting it back drops it.
        q.push(record(5));
        q.push(record(6));
        q.unpop(taken);
        assert_eq!(q.len(), 2);
        let taken = q.pop().unwrap();
        assert_eq!(taken.address, 5);
        q.delivered(taken);
        assert_eq!(q.wake_fd().read().unwrap(), 7);
        assert_eq!(q.close(), 1);
        q.push(record(7));
        let a = q.accounts();
        assert_eq!(
            a.reported,
            a.delivered + a.dropped + a.waiting + a.in_flight,
            "{a:?}"
        );
        assert_eq!((a.reported, a.delivered, a.dropped), (8, 1, 7));
        assert!(q.is_empty());
    }

    /// The worker takes a record, a reset clears the backlog, the record does not fit the
    /// guest's buffer and is put back: it belongs to the driver before the reset and must not
    /// reach the next one. It is dropped and counted; records reported after the reset keep
    /// their place.
    #[test]
    fn a_record_taken_before_a_clear_never_returns() {
        let stats = Arc::new(Stats::default());
        let q = FaultQueue::new(4, stats.clone()).unwrap();
        q.listen();
        q.push(record(1));
        q.push(record(2));
        let taken = q.pop().unwrap();
        assert_eq!(q.clear(), 1);
        q.listen();
        q.push(record(3));
        q.unpop(taken);
        assert_eq!(q.len(), 1, "only the record reported after the reset waits");
        assert_eq!(q.pop().unwrap().address, 3);
        let a = q.accounts();
        assert_eq!(
            a.reported,
            a.delivered + a.dropped + a.waiting + a.in_flight,
            "{a:?}"
        );
        assert_eq!(
            (a.reported, a.dropped, a.waiting, a.in_flight),
            (3, 2, 0, 1)
        );
        // Shutdown the same way: a record taken before close is dropped when put back.
        q.push(record(4));
        let taken = q.pop().unwrap();
        q.close();
        q.unpop(taken);
        assert!(q.is_empty());
    }

    /// Records reported while no driver listens (before the first driver posted event
    /// buffers, after a reset until the next one does) are dropped and counted; a loaded
    /// state's driver listens.
    #[test]
    fn records_wait_only_for_a_listening_driver() {
        let stats = Arc::new(Stats::default());
        let q = FaultQueue::new(4, stats.clone()).unwrap();
        q.push(record(1));
        assert!(q.is_empty());
        q.listen();
        q.push(record(2));
        assert_eq!(q.len(), 1);
        q.clear();
        q.push(record(3));
        assert!(q.is_empty(), "a reset driver does not listen");
        q.restore(vec![record(4)]);
        q.push(record(5));
        assert_eq!(q.snapshot(), vec![record(4), record(5)]);
        let a = q.accounts();
        assert_eq!((a.reported, a.dropped, a.waiting), (5, 3, 2), "{a:?}");
    }
}
