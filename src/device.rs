// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device: the state that lives as long as the daemon, whichever frontend connects.
//!
//! [`Device`] holds the model (`ownership::Iommu`), the config space, the negotiated
//! features, the fault backlog, the counters and, with `--state-file`, the journal. This is
//! where the device's life is decided: what resets it (a reset, a disconnect, a request queue
//! that restarts elsewhere; never a pause), how its state is saved and loaded (device-state
//! transfer, state files), and how a restarted daemon recovers. Serving a queue is
//! [`crate::engine`]'s; talking vhost-user is [`crate::vhost_user`]'s.

use std::{
    fs::File,
    io::{self, Read, Write},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        Arc, Mutex, MutexGuard,
    },
};

use log::{info, warn};
use ownership::{Iommu, TranslatorSource};
use vhost::vhost_user::message::{VhostTransferStateDirection, VhostUserVirtioFeatures};
use vhost_user_backend::{VringRwLock, VringT};
use virtio::{Config, Status};
use virtio_queue::QueueT;
use vm_memory::GuestMemoryAtomic;

use crate::dirty::GuestMemory;
use crate::pacing::PollPolicy;
use crate::{
    config::DaemonConfig,
    faults::FaultQueue,
    log_limited,
    request::{self},
    ring::RingKey,
    state::{self, DeviceState, StateError},
    statefile::{self, Entry, QueuePosition, StateFile, StateFileError},
    stats::Stats,
    translate::TranslationService,
};

pub(crate) type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// Device state that outlives connections.
#[derive(Debug)]
pub struct Device {
    pub(crate) iommu: Mutex<Iommu>,
    /// Translators without the model's lock, which grace periods hold.
    pub(crate) translators: TranslatorSource,
    pub(crate) config: Mutex<Config>,
    pub(crate) initial: Config,
    pub(crate) offered: u64,
    pub(crate) acked: AtomicU64,
    pub(crate) event_idx: AtomicBool,
    /// Bumped by every memory table the frontend sends: a request loop running on an older
    /// snapshot of guest memory stops, and starts over on the new one.
    pub(crate) memory_epoch: AtomicU64,
    pub(crate) faults: Arc<FaultQueue>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) poll: PollPolicy,
    pub(crate) queue_size: u16,
    pub(crate) probe_size: u32,
    /// `--ring-fast-path`: false sends every chain through virtio-queue.
    pub(crate) ring_fast_path: bool,
    /// The topology's fingerprint in saved states, and the caps a loaded state must respect.
    pub(crate) fingerprint: u32,
    pub(crate) caps: state::Caps,
    /// A device-state transfer started by SET_DEVICE_STATE_FD, until CHECK_DEVICE_STATE.
    pub(crate) transfer: Mutex<Option<std::thread::JoinHandle<Result<(), StateError>>>>,
    /// Where the request queue stopped, until it runs again (see [`RingStop`]).
    pub(crate) stopped: Mutex<Option<RingStop>>,
    /// `stopped` is set: the worker compares before it touches a queue.
    pub(crate) stop_pending: AtomicBool,
    /// The model's tables as DMA masters map them (`--master-socket`).
    pub(crate) shared_tables: Option<Arc<crate::masters::SharedTables>>,
    /// `--state-file`: every request that reaches the model is journaled. Taken before the
    /// model's lock wherever both are held.
    pub(crate) journal: Option<Mutex<Journal>>,
    /// The daemon is stopping (SIGINT/SIGTERM): a disconnect now is not the guest's end.
    pub(crate) shutting_down: AtomicBool,
    /// The frontend acknowledged `VHOST_F_LOG_ALL`: writes to guest memory are logged once it
    /// set a log (SET_LOG_BASE).
    pub(crate) dirty_logging: AtomicBool,
}

/// Why a device could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("{0}; start with --fresh-state to discard it")]
    StateFile(#[from] StateFileError),
    #[error(
        "{path}: entry {index} of the journal does not apply to its snapshot ({what}); \
         start with --fresh-state to discard it"
    )]
    Replay {
        path: std::path::PathBuf,
        index: usize,
        what: String,
    },
}

/// The state file of a device and what the last pass before a restart answered.
#[derive(Debug)]
pub(crate) struct Journal {
    pub(crate) file: StateFile,
    /// The last committed pass before this daemon started: requests that come again (the
    /// frontend rewound to the used index) are answered with the status they got, not applied
    /// twice. Emptied by the first pass.
    pub(crate) replay: Vec<(u16, virtio::Request, Status)>,
    /// Fault injection for the restart tests (`VHOST_IOMMU_TEST_CRASH_AFTER_COMMIT=N`): the
    /// daemon aborts right after its Nth commit, before that pass's used entries are
    /// published, the one point a SIGKILL from outside almost never hits.
    pub(crate) crash_after: Option<u64>,
}

impl Journal {
    /// The status a request at `position` got before a restart, if it is that request.
    pub(crate) fn answered(&self, position: u16, request: &virtio::Request) -> Option<Status> {
        self.replay
            .iter()
            .find(|(p, r, _)| *p == position && r == request)
            .map(|&(_, _, status)| status)
    }
}

/// Where and how the request queue stopped (GET_VRING_BASE). A frontend that resumes the
/// device starts the ring again at the same index and the same addresses; a driver that was
/// reset starts fresh rings at index 0. QEMU's generic vhost-user device never sends
/// RESET_DEVICE, so this is how a reset of its guest reaches the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RingStop {
    pub(crate) next_avail: u16,
    pub(crate) key: RingKey,
    /// How far before `next_avail` a resumed ring may start: 0 after a stop, a queue's worth
    /// after a restart (the frontend rewinds to the used index).
    pub(crate) slack: u16,
}

impl RingStop {
    pub(crate) fn resumed_by(&self, next_avail: u16, key: RingKey) -> bool {
        key == self.key && self.next_avail.wrapping_sub(next_avail) <= self.slack
    }
}

/// Spec: an unattached endpoint bypasses when BYPASS_CONFIG is offered and `bypass` is 1.
pub(crate) fn effective_bypass(config: &Config, offered: u64) -> bool {
    offered & virtio::F_BYPASS_CONFIG != 0 && config.bypass == 1
}

impl Device {
    /// The device of a daemon; with `--state-file`, as the file left it.
    pub fn new(config: &DaemonConfig) -> Result<Arc<Self>, DeviceError> {
        let stats = Arc::new(Stats::default());
        let faults = Arc::new(FaultQueue::new(config.fault_backlog, stats.clone())?);
        // With DMA masters, the tables live in a memfd they map read-only.
        let (mut iommu, shared_tables) = match &config.masters {
            Some(_) => {
                let (iommu, tables) = crate::masters::model(&config.topology)?;
                (iommu, Some(Arc::new(tables)))
            }
            None => (
                Iommu::try_new(config.topology.clone())
                    .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?,
                None,
            ),
        };
        iommu.set_bypass(effective_bypass(&config.config, config.features));
        // Page tables on transparent huge pages: fewer TLB misses on the DMA fast path.
        match crate::hugepages::advise_table_memory(&iommu) {
            Ok(bytes) => log::debug!("page tables: {bytes} bytes advised for huge pages"),
            Err(e) => log::info!("page tables stay on small pages (madvise: {e})"),
        }
        let limits = config.topology.limits();
        let caps = state::Caps {
            offered_features: config.features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(),
            max_domains: u64::from(limits.max_domains),
            max_mappings: limits.max_mappings,
            max_faults: config.fault_backlog as u64,
            endpoints: config.topology.endpoints().count() as u64,
        };
        let opened = match &config.state_file {
            Some(path) => {
                // Room for two whole passes at least.
                let records = config
                    .state_journal_records
                    .max(2 * usize::from(config.queue_size) + 2);
                Some(StateFile::open(path, records, config.fresh_state)?)
            }
            None => None,
        };
        let device = Arc::new(Device {
            journal: None,
            shutting_down: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
            translators: iommu.translator_source(),
            fingerprint: state::fingerprint(&config.topology, config.features),
            caps,
            transfer: Mutex::new(None),
            stopped: Mutex::new(None),
            stop_pending: AtomicBool::new(false),
            shared_tables,
            iommu: Mutex::new(iommu),
            config: Mutex::new(config.config),
            initial: config.config,
            offered: config.features,
            acked: AtomicU64::new(0),
            event_idx: AtomicBool::new(false),
            memory_epoch: AtomicU64::new(0),
            faults,
            stats,
            poll: config.poll,
            queue_size: config.queue_size,
            probe_size: config.config.probe_size,
            ring_fast_path: config.ring_fast_path,
        });
        let Some((file, recovered)) = opened else {
            return Ok(device);
        };
        let mut device = Arc::into_inner(device).expect("a device nobody else holds yet");
        let recovered_created = recovered.created;
        let replay = device.recover(&file, recovered)?;
        let created = recovered_created;
        let crash_after = std::env::var("VHOST_IOMMU_TEST_CRASH_AFTER_COMMIT")
            .ok()
            .and_then(|n| n.parse().ok());
        let mut journal = Journal {
            file,
            replay,
            crash_after,
        };
        if created {
            // The first snapshot carries this daemon's topology fingerprint: a daemon started
            // with other options on this file is refused even before anything was compacted.
            device.compact(&mut journal, None);
        }
        device.journal = Some(Mutex::new(journal));
        Ok(Arc::new(device))
    }

    /// Brings a new device to the state a state file holds: its snapshot, then its journal's
    /// committed entries; returns the last pass's requests (answered again, not applied).
    pub(crate) fn recover(
        &self,
        file: &StateFile,
        recovered: statefile::Recovered,
    ) -> Result<Vec<(u16, virtio::Request, Status)>, DeviceError> {
        let path = file.path().to_owned();
        if recovered.created {
            info!("state file {}: new, empty state", path.display());
            return Ok(Vec::new());
        }
        if !recovered.snapshot.is_empty() {
            self.try_load_state(&recovered.snapshot)
                .map_err(|source| StateFileError::State {
                    path: path.clone(),
                    source,
                })?;
        }
        let mut iommu = self.iommu();
        for (index, entry) in recovered.entries.iter().enumerate() {
            match *entry {
                Entry::Request {
                    request,
                    status: Status::Ok,
                    ..
                } => {
                    request::execute(&mut iommu, &request).map_err(|e| DeviceError::Replay {
                        path: path.clone(),
                        index,
                        what: format!("{request:?} answered OK, now {e}"),
                    })?;
                }
                // A refused request changed nothing; a repeat was applied where it came first.
                Entry::Request { .. } | Entry::Repeat { .. } => {}
                Entry::Bypass(bypass) => {
                    let mut config = self.config();
                    config.bypass = u8::from(bypass);
                    iommu.set_bypass(effective_bypass(&config, self.offered));
                }
                Entry::Reset => {
                    iommu.reset();
                    self.faults.clear();
                }
            }
        }
        let stats = iommu.stats();
        drop(iommu);
        if let Some(at) = recovered.position {
            self.queue_stopped(RingStop {
                next_avail: at.next_avail,
                key: at.key(),
                slack: at.size,
            });
        }
        info!(
            "state file {}: resumed {} domains and {} mappings ({} journal entries)",
            path.display(),
            stats.domains,
            stats.mappings,
            recovered.entries.len()
        );
        Ok(recovered
            .last_pass
            .iter()
            .filter_map(|e| match *e {
                Entry::Request {
                    position,
                    request,
                    status,
                }
                | Entry::Repeat {
                    position,
                    request,
                    status,
                } => Some((position, request, status)),
                _ => None,
            })
            .collect())
    }

    pub(crate) fn journal(&self) -> Option<MutexGuard<'_, Journal>> {
        self.journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes the state as the state file's new snapshot, starting its journal over.
    pub(crate) fn compact(&self, journal: &mut Journal, position: Option<QueuePosition>) {
        let bytes = self.save_state();
        let records = journal.file.capacity();
        match journal.file.compact(&bytes, position, records) {
            Ok(()) => {
                self.stats.state_compactions.fetch_add(1, Relaxed);
            }
            Err(e) => log_limited!(log::Level::Error, "state file not compacted: {e}"),
        }
    }

    /// The daemon is stopping: with a state file, the whole state is written into it (a
    /// restart then needs no journal, and the fault records waiting now survive too), and
    /// the frontend's disconnect that follows resets nothing.
    pub fn shut_down(&self) {
        self.shutting_down.store(true, Relaxed);
        if let Some(mut journal) = self.journal() {
            let position = journal.file.position();
            self.compact(&mut journal, position);
        }
    }

    /// The model (the writer). Held per request on the request path, so brief.
    pub fn iommu(&self) -> MutexGuard<'_, Iommu> {
        self.iommu.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn config(&self) -> MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn faults(&self) -> &Arc<FaultQueue> {
        &self.faults
    }

    /// The file DMA masters map the tables from, when the device was built for them.
    pub fn shared_tables(&self) -> Option<&Arc<crate::masters::SharedTables>> {
        self.shared_tables.as_ref()
    }

    /// Device features offered to the frontend (without PROTOCOL_FEATURES).
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Whether the frontend asked for a dirty-page log (`VHOST_F_LOG_ALL`, a migration).
    pub fn dirty_logging(&self) -> bool {
        self.dirty_logging.load(Relaxed)
    }

    /// A fast-path handle for one thread, reporting faults to this device's event queue. Never
    /// waits for the model (a thread inside a read section may ask for one).
    pub fn translation_service(&self) -> TranslationService {
        TranslationService::new(self.translators.translator(), self.faults.clone())
    }

    /// Device reset: every attachment and domain dropped, waiting fault records dropped;
    /// `bypass` survives (spec C2).
    pub fn reset(&self) {
        let mut journal = self.journal();
        self.iommu().reset();
        if let Some(j) = journal.as_mut() {
            if !(j.file.reset() && j.file.commit_here()) {
                self.compact(j, None);
            }
        }
        drop(journal);
        let dropped = self.faults.clear();
        self.forget_stop();
        self.stats.resets.fetch_add(1, Relaxed);
        info!("device reset ({dropped} fault records dropped)");
    }

    pub(crate) fn forget_stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop_pending.store(false, Relaxed);
    }

    /// Before the worker touches a queue after a stop: a request queue that runs again
    /// somewhere else than where it stopped belongs to a driver that was reset, and the
    /// device resets before it answers that driver.
    pub(crate) fn check_restart(&self, requestq: &Vring) {
        if !self.stop_pending.load(Relaxed) {
            return;
        }
        let state = requestq.get_ref();
        let queue = state.get_queue();
        if !queue.ready() {
            return;
        }
        let (next_avail, key) = (queue.next_avail(), RingKey::of(queue));
        drop(state);
        let Some(stop) = self
            .stopped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        self.stop_pending.store(false, Relaxed);
        if !stop.resumed_by(next_avail, key) {
            info!(
                "request queue restarted at {next_avail} ({key:?}), stopped at {} ({:?}): \
                 the driver was reset",
                stop.next_avail, stop.key
            );
            self.reset();
        }
    }

    /// The frontend went away: the next one starts from a fresh device, config included.
    pub fn disconnected(&self) {
        if self.shutting_down.load(Relaxed) {
            return;
        }
        let mut journal = self.journal();
        *self.config() = self.initial;
        self.dirty_logging.store(false, Relaxed);
        let mut iommu = self.iommu();
        iommu.reset();
        iommu.set_bypass(effective_bypass(&self.initial, self.offered));
        drop(iommu);
        self.faults.clear();
        self.forget_stop();
        self.acked.store(0, Relaxed);
        self.event_idx.store(false, Relaxed);
        if let Some(j) = journal.as_mut() {
            let recorded =
                j.file.reset() && j.file.bypass(self.initial.bypass == 1) && j.file.commit_here();
            if !recorded {
                self.compact(j, None);
            }
        }
    }

    /// The guest-visible state, encoded (see [`crate::state`]). Meant for a stopped device:
    /// requests answered afterwards are not in it.
    pub fn save_state(&self) -> Vec<u8> {
        let iommu = self.iommu();
        let state = DeviceState {
            features: self.acked.load(Relaxed),
            bypass: self.config().bypass == 1,
            guest: iommu.guest_state(),
            faults: self.faults.snapshot(),
        };
        drop(iommu);
        let bytes = state::encode(&state, self.fingerprint);
        info!(
            "device state saved: {} domains, {} mappings, {} fault records, {} bytes",
            state.guest.domains.len(),
            state.guest.mapping_count(),
            state.faults.len(),
            bytes.len()
        );
        self.stats.state_saves.fetch_add(1, Relaxed);
        self.stats
            .state_last_bytes
            .store(bytes.len() as u64, Relaxed);
        bytes
    }

    /// Replaces the guest-visible state with a saved one. All or nothing: a state that is
    /// damaged, from another topology, over this daemon's limits or refused by the model
    /// changes nothing.
    pub fn load_state(&self, bytes: &[u8]) -> Result<(), StateError> {
        let result = self.try_load_state(bytes);
        match &result {
            Ok(()) => {
                self.stats.state_loads.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.stats.state_refused.fetch_add(1, Relaxed);
                warn!("device state refused, nothing changed: {e}");
            }
        }
        result
    }

    pub(crate) fn try_load_state(&self, bytes: &[u8]) -> Result<(), StateError> {
        let state = state::decode(bytes, self.fingerprint, &self.caps)?;
        // Taken first, as everywhere: a state file holds the loaded state from now on.
        let mut journal = self.journal();
        let mut iommu = self.iommu();
        iommu.restore(&state.guest)?;
        // Nothing below can fail: the state is in.
        let mut config = self.config();
        config.bypass = u8::from(state.bypass);
        self.acked.store(state.features, Relaxed);
        iommu.set_bypass(effective_bypass(&config, self.offered));
        drop(config);
        drop(iommu);
        let faults = state.faults.len();
        self.faults.restore(state.faults);
        self.forget_stop();
        if let Some(j) = journal.as_deref_mut() {
            self.compact(j, None);
        }
        info!(
            "device state loaded: {} domains, {} mappings, {faults} fault records",
            state.guest.domains.len(),
            state.guest.mapping_count(),
        );
        Ok(())
    }

    /// SET_DEVICE_STATE_FD: saves into or loads from `file` on a thread of its own (the
    /// frontend reads or writes the other end of the pipe meanwhile); the outcome waits for
    /// CHECK_DEVICE_STATE. A state is always saved whole before the call returns, so requests
    /// answered later never leak into it.
    pub(crate) fn start_transfer(
        self: &Arc<Self>,
        direction: VhostTransferStateDirection,
        file: File,
    ) -> io::Result<()> {
        let mut slot = self.transfer.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(previous) = slot.take() {
            // A transfer nobody checked: its outcome is only logged.
            if let Ok(Err(e)) = previous.join() {
                warn!("unchecked device-state transfer failed: {e}");
            }
        }
        let device = self.clone();
        let work: Box<dyn FnOnce() -> Result<(), StateError> + Send> = match direction {
            VhostTransferStateDirection::SAVE => {
                let bytes = self.save_state();
                Box::new(move || {
                    let mut file = file;
                    file.write_all(&bytes)
                        .map_err(|e| StateError::Io(e.to_string()))
                })
            }
            VhostTransferStateDirection::LOAD => {
                let max = self.caps.max_bytes();
                Box::new(move || {
                    let mut bytes = Vec::new();
                    file.take(max.saturating_add(1))
                        .read_to_end(&mut bytes)
                        .map_err(|e| StateError::Io(e.to_string()))?;
                    if bytes.len() as u64 > max {
                        let error = StateError::Oversized(max);
                        device.stats.state_refused.fetch_add(1, Relaxed);
                        warn!("device state refused, nothing changed: {error}");
                        return Err(error);
                    }
                    device.load_state(&bytes)
                })
            }
        };
        *slot = Some(
            std::thread::Builder::new()
                .name("device-state".into())
                .spawn(work)?,
        );
        Ok(())
    }

    /// CHECK_DEVICE_STATE: the outcome of the last transfer.
    pub(crate) fn check_transfer(&self) -> io::Result<()> {
        let handle = self
            .transfer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| io::Error::other("no device-state transfer to check"))?;
        match handle.join() {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(io::Error::other(e.to_string())),
            Err(_) => Err(io::Error::other(
                "the device-state transfer thread panicked",
            )),
        }
    }

    /// SET_FEATURES: the driver's features, and `VHOST_F_LOG_ALL`, the frontend's request for
    /// a dirty-page log, which is no feature of the guest's: it is neither kept with the
    /// driver's features nor saved with the device state. Returns whether logging stopped.
    pub(crate) fn set_features(&self, features: u64) -> bool {
        let log_all = features & VhostUserVirtioFeatures::LOG_ALL.bits() != 0;
        let features = features & !VhostUserVirtioFeatures::LOG_ALL.bits();
        let was_logging = self.dirty_logging.swap(log_all, Relaxed);
        if log_all && !was_logging {
            self.stats.dirty_log_starts.fetch_add(1, Relaxed);
            info!("dirty-page logging requested (VHOST_F_LOG_ALL)");
        } else if was_logging && !log_all {
            info!("dirty-page logging ended");
        }
        self.acked.store(features, Relaxed);
        let mut iommu = self.iommu();
        iommu.set_bypass(effective_bypass(&self.config(), features | self.offered));
        was_logging && !log_all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(desc: u64) -> RingKey {
        RingKey {
            desc,
            avail: 0x2000,
            used: 0x3000,
            size: 256,
        }
    }

    #[test]
    fn a_ring_resumes_only_where_it_stopped() {
        let stop = RingStop {
            next_avail: 5,
            key: key(0x1000),
            slack: 0,
        };
        assert!(stop.resumed_by(5, key(0x1000)));
        assert!(!stop.resumed_by(0, key(0x1000)), "fresh rings: a reset");
        assert!(!stop.resumed_by(6, key(0x1000)));
        assert!(!stop.resumed_by(5, key(0x9000)), "rings elsewhere: a reset");
        // After a restart the frontend rewinds to the used index, up to a queue's worth back,
        // across the index's wrap.
        let restart = RingStop {
            next_avail: 3,
            key: key(0x1000),
            slack: 256,
        };
        assert!(restart.resumed_by(3, key(0x1000)));
        assert!(restart.resumed_by(3u16.wrapping_sub(256), key(0x1000)));
        assert!(!restart.resumed_by(3u16.wrapping_sub(257), key(0x1000)));
        assert!(
            !restart.resumed_by(4, key(0x1000)),
            "ahead of where it stopped"
        );
    }
}
