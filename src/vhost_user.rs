// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-user glue: what the frontend negotiates and sends, mapped onto the [`Device`].
//!
//! [`IommuBackend`] implements rust-vmm's `VhostUserBackend` for one frontend connection and
//! is thrown away when it disconnects; the [`Device`] stays. Features and protocol features,
//! the config space, memory tables and the dirty-page log, device-state transfer, and the
//! worker's events (both queues' kicks and the fault backlog's eventfd), which it hands to
//! [`crate::engine`]. One worker thread runs both queues, so the model's writer is never
//! contended by the request path itself.

use std::{
    fs::File,
    io,
    sync::{
        atomic::{
            AtomicBool,
            Ordering::{Acquire, Relaxed, Release},
        },
        Arc, Mutex,
    },
};

use log::{debug, info, warn};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringT};
use virtio::NUM_QUEUES;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::device::{effective_bypass, Device, RingStop, Vring};
use crate::dirty::GuestMemory;
use crate::engine::LoopEnd;
use crate::{dirty::DirtyLog, log_limited, ring::RingKey};

/// The epoll id of the fault backlog's eventfd (ids up to `NUM_QUEUES` are reserved).
pub const FAULT_EVENT: u16 = NUM_QUEUES as u16 + 1;

/// Every region must lie inside its file: mapping past a file's end faults (SIGBUS) on access.
/// (A frontend that shrinks the file afterwards is out of reach of this check.)
fn check_regions_backed(mem: &GuestMemory) -> io::Result<()> {
    use vm_memory::GuestMemoryRegion;
    for region in mem.iter() {
        let Some(backing) = region.file_offset() else {
            continue;
        };
        let size = backing.file().metadata()?.len();
        let end = backing.start().checked_add(region.len());
        if end.is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "region at GPA {:#x} maps {:#x} bytes at file offset {:#x}, the file has {size:#x}",
                    region.start_addr().0,
                    region.len(),
                    backing.start()
                ),
            ));
        }
    }
    Ok(())
}

/// One frontend connection's backend.
#[derive(Clone)]
pub struct IommuBackend {
    device: Arc<Device>,
    mem: Arc<Mutex<Option<GuestMemoryAtomic<GuestMemory>>>>,
    exit: Arc<(EventConsumer, EventNotifier)>,
    /// Exit-event descriptors handed to vhost-user-backend, which turns them into raw fds and
    /// never closes them (0.24: `VringEpollHandler::new` registers `into_raw_fd()`); closed by
    /// [`IommuBackend::close_exit_fds`] once the daemon of this connection is dropped.
    exit_fds: Arc<Mutex<Vec<std::os::fd::RawFd>>>,
    /// The request queue, kept from the first event so that GET_VRING_BASE can note where
    /// it stopped (vhost-user-backend hands queues to `handle_event` only).
    requestq: Arc<std::sync::OnceLock<Vring>>,
    /// The dirty-page logs of the memory table in use, one per region (shared with the
    /// regions, which SET_LOG_BASE gives a log): stopped when the frontend clears
    /// `VHOST_F_LOG_ALL`, carried over to the regions of a new memory table while logging.
    logs: Arc<Mutex<Vec<DirtyLog>>>,
    /// This connection is in `stats.connections`: counted by whichever comes first, the
    /// frontend's first GET_FEATURES (served on the connection's thread) or the accept loop
    /// once the connection's thread runs.
    counted: Arc<AtomicBool>,
}

impl IommuBackend {
    pub fn new(device: Arc<Device>) -> io::Result<Self> {
        let exit = new_event_consumer_and_notifier(EventFlag::NONBLOCK)?;
        Ok(IommuBackend {
            device,
            mem: Arc::new(Mutex::new(None)),
            exit: Arc::new(exit),
            exit_fds: Arc::default(),
            requestq: Arc::default(),
            logs: Arc::default(),
            counted: Arc::default(),
        })
    }

    /// Counts this connection in `stats.connections`, once.
    pub fn count_connection(&self) {
        if !self.counted.swap(true, Relaxed) {
            self.device.stats.connections.fetch_add(1, Relaxed);
        }
    }

    /// Stops the worker threads of this connection.
    pub fn exit(&self) {
        let _ = self.exit.1.notify();
    }

    /// A new memory table while logging: its regions log into the log the old ones had
    /// (vhost-user-backend builds the new regions without one, and QEMU sends SET_LOG_BASE
    /// again only when the log must grow). The handler swapped the table in just before this
    /// runs: a write in between is not logged.
    fn carry_logs(&self, mem: &GuestMemory) {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let mut logs = self.logs.lock().unwrap_or_else(|e| e.into_inner());
        let old = logs.iter().find(|l| l.is_on()).cloned();
        if let Some(old) = old.filter(|_| self.device.dirty_logging()) {
            for region in mem.iter() {
                match old.region_log(region) {
                    Some(Ok(log)) => {
                        use vhost_user_backend::bitmap::BitmapReplace;
                        crate::dirty::of(region).replace(log);
                    }
                    Some(Err(e)) => log_limited!(
                        log::Level::Error,
                        "the dirty-page log does not cover the region at GPA {:#x}: its pages \
                         are not logged ({e})",
                        region.start_addr().0
                    ),
                    None => {}
                }
            }
        }
        *logs = mem.iter().map(|r| crate::dirty::of(r).clone()).collect();
    }

    /// Closes the exit-event descriptors vhost-user-backend leaked. Call only after the
    /// `VhostUserDaemon` of this connection was dropped (its worker threads joined).
    pub fn close_exit_fds(&self) {
        for fd in std::mem::take(&mut *self.exit_fds.lock().unwrap_or_else(|e| e.into_inner())) {
            // SAFETY: `fd` is a dup of our exit eventfd that `exit_event` handed out and
            // vhost-user-backend kept as a bare number; its epoll set and worker threads are
            // gone with the dropped daemon, so nothing else uses or closes this descriptor.
            unsafe { libc::close(fd) };
        }
    }
}

impl VhostUserBackend for IommuBackend {
    type Bitmap = DirtyLog;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        NUM_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.device.queue_size)
    }

    /// The device's features, `PROTOCOL_FEATURES`, and `VHOST_F_LOG_ALL`: every write to
    /// guest memory can be logged (QEMU refuses to migrate a vhost-user device without it).
    fn features(&self) -> u64 {
        self.count_connection();
        self.device.offered
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
    }

    fn acked_features(&self, features: u64) {
        debug!("features acked: {features:#x}");
        if self.device.set_features(features) {
            // The migration ended (or failed): the frontend lets its log go.
            for log in self.logs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                log.clear();
            }
        }
    }

    /// LOG_SHMFD: the dirty-page log comes as shared memory (SET_LOG_BASE), the only way
    /// vhost-user-backend takes one; DEVICE_STATE: the guest's state goes with a migration.
    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
            | VhostUserProtocolFeatures::DEVICE_STATE
            | VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn reset_device(&self) {
        self.device.reset();
    }

    fn set_event_idx(&self, enabled: bool) {
        self.device.event_idx.store(enabled, Relaxed);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut buf = vec![0u8; size as usize];
        self.device.config().read(offset, &mut buf);
        buf
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        let features = self.device.acked.load(Relaxed);
        let mut journal = self.device.journal();
        let mut config = self.device.config();
        config.write(offset, buf, features).map_err(|e| {
            log_limited!(log::Level::Warn, "config write refused: {e}");
            io::Error::new(io::ErrorKind::InvalidInput, e.to_string())
        })?;
        let written = config.bypass == 1;
        let bypass = effective_bypass(&config, self.device.offered);
        drop(config);
        self.device.iommu().set_bypass(bypass);
        if let Some(j) = journal.as_deref_mut() {
            if !(j.file.bypass(written) && j.file.commit_here()) {
                let at = j.file.position();
                self.device.compact(j, at);
            }
        }
        info!("config bypass set to {}", u8::from(bypass));
        Ok(())
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemory>) -> io::Result<()> {
        let mut slot = self.mem.lock().unwrap_or_else(|e| e.into_inner());
        // Whatever becomes of this table, the request loop's snapshot is out of date (the
        // handler swapped the new table in before calling here).
        self.device.memory_epoch.fetch_add(1, Release);
        // A region mapped past the end of its file would kill the daemon with SIGBUS on first
        // access: refuse the table (and stop processing: the handler already swapped it in).
        if let Err(e) = check_regions_backed(&mem.memory()) {
            *slot = None;
            warn!("memory table refused: {e}");
            return Err(e);
        }
        self.carry_logs(&mem.memory());
        *slot = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        use std::os::fd::AsRawFd;
        let consumer = self.exit.0.try_clone().ok()?;
        let notifier = self.exit.1.try_clone().ok()?;
        self.exit_fds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(consumer.as_raw_fd());
        Some((consumer, notifier))
    }

    /// GET_VRING_BASE stops a queue and nothing more: QEMU sends it whenever the VM stops
    /// (a pause, a snapshot, the end of a migration) and the guest, which never learns of the
    /// pause, expects its domains and mappings afterwards. Where the request queue stopped is
    /// noted: a ring that starts again elsewhere belongs to a reset driver (`RingStop`).
    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if queue_index == u32::from(virtio::REQUEST_QUEUE) {
            if let Some(vring) = self.requestq.get() {
                let state = vring.get_ref();
                let queue = state.get_queue();
                self.device.queue_stopped(RingStop {
                    next_avail: queue.next_avail(),
                    key: RingKey::of(queue),
                    slack: 0,
                });
            }
        }
        Ok(())
    }

    fn set_device_state_fd(
        &self,
        direction: VhostTransferStateDirection,
        phase: VhostTransferStatePhase,
        file: File,
    ) -> io::Result<Option<File>> {
        if phase != VhostTransferStatePhase::STOPPED {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "device state is transferred only while the device is stopped",
            ));
        }
        self.device.start_transfer(direction, file)?;
        Ok(None)
    }

    fn check_device_state(&self) -> io::Result<()> {
        self.device.check_transfer()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!("unexpected event set {evset:?} on {device_event}");
        }
        if device_event == FAULT_EVENT {
            self.device.faults.acknowledge();
        }
        let requestq = self.requestq.get_or_init(|| vrings[0].clone());
        self.device.check_restart(requestq);
        loop {
            // The epoch before the snapshot: a table swapped in after it bumps the epoch.
            let epoch = self.device.memory_epoch.load(Acquire);
            // No memory table yet: nothing can be processed (kicks before SET_MEM_TABLE).
            let Some(atomic) = self.mem.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
                return Ok(());
            };
            let mem = atomic.memory();
            match device_event {
                e if e == virtio::REQUEST_QUEUE => {
                    match self.device.process_requests(&vrings[0], &mem, epoch)? {
                        LoopEnd::Asleep => return Ok(()),
                        LoopEnd::MemoryReplaced => continue,
                    }
                }
                e if e == virtio::EVENT_QUEUE || e == FAULT_EVENT => {
                    if e == virtio::EVENT_QUEUE {
                        self.device.faults.listen();
                    }
                    self.device.deliver_faults(&vrings[1], &mem)?;
                }
                other => debug!("event on unknown id {other}"),
            }
            return Ok(());
        }
    }
}
