//! Fault records on their way to the guest's event queue.
//!
//! The fast path (any thread) pushes records into a bounded backlog and wakes the device's
//! worker through an eventfd; the worker writes them into the buffers the driver posted on the
//! eventq, oldest first. With no buffer available the records wait (spec: the device may wait
//! or drop); when the backlog is full the oldest record is dropped and counted.

use std::{
    collections::VecDeque,
    sync::{atomic::Ordering::Relaxed, Arc, Mutex, MutexGuard},
};

use virtio::FaultRecord;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::stats::Stats;

/// The bounded backlog of fault records.
#[derive(Debug)]
pub struct FaultQueue {
    backlog: Mutex<VecDeque<FaultRecord>>,
    capacity: usize,
    wake: EventFd,
    stats: Arc<Stats>,
}

impl FaultQueue {
    pub fn new(capacity: usize, stats: Arc<Stats>) -> std::io::Result<Self> {
        Ok(FaultQueue {
            backlog: Mutex::new(VecDeque::with_capacity(capacity.min(4096))),
            capacity: capacity.max(1),
            wake: EventFd::new(EFD_NONBLOCK)?,
            stats,
        })
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<FaultRecord>> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a record for the guest and wakes the worker. Never blocks on the guest.
    pub fn push(&self, record: FaultRecord) {
        {
            let mut backlog = self.lock();
            if backlog.len() >= self.capacity {
                backlog.pop_front();
                self.stats.faults_dropped.fetch_add(1, Relaxed);
            }
            backlog.push_back(record);
        }
        self.stats.faults_reported.fetch_add(1, Relaxed);
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

    /// Takes the oldest record, if any.
    pub fn pop(&self) -> Option<FaultRecord> {
        self.lock().pop_front()
    }

    /// Puts a record back at the head (no buffer could take it).
    pub fn unpop(&self, record: FaultRecord) {
        self.lock().push_front(record);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every waiting record (device reset, disconnect), counting them.
    pub fn clear(&self) -> usize {
        let mut backlog = self.lock();
        let n = backlog.len();
        backlog.clear();
        self.stats.faults_dropped.fetch_add(n as u64, Relaxed);
        n
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
        for a in 0..5 {
            q.push(record(a));
        }
        assert_eq!(q.len(), 2);
        assert_eq!(stats.faults_dropped.load(Relaxed), 3);
        assert_eq!(stats.faults_reported.load(Relaxed), 5);
        assert_eq!(q.pop().unwrap().address, 3);
        q.unpop(record(3));
        assert_eq!(q.pop().unwrap().address, 3);
        assert_eq!(q.wake_fd().read().unwrap(), 5);
        assert_eq!(q.clear(), 1);
        assert!(q.is_empty());
    }
}
