//! vhost-user-backend glue: features, protocol features, config space, and the two queues.
//!
//! [`Device`] lives as long as the daemon (model, stats, fault backlog); an [`IommuBackend`]
//! serves one frontend connection and is thrown away when it disconnects. One worker thread
//! runs both queues, so the model's writer is never contended by the request path itself.

use std::{
    fs::File,
    io::{self, Read, Write},
    sync::{
        atomic::{
            AtomicBool, AtomicU64,
            Ordering::{Acquire, Relaxed, Release},
        },
        Arc, Mutex, MutexGuard,
    },
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use ownership::{Iommu, TranslatorSource};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserProtocolFeatures,
    VhostUserVirtioFeatures,
};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio::{Config, FaultRecord, RequestType, Status, FAULT_SIZE, NUM_QUEUES, TAIL_SIZE};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::{
    epoll::EventSet,
    event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier},
};

use crate::{
    config::DaemonConfig,
    device::{self, Reply},
    dirty::DirtyLog,
    events::FaultQueue,
    log_limited,
    ring::{self, FastChain, RegionCache, RingKey, Rings, SliceWriter},
    state::{self, DeviceState, StateError},
    statefile::{self, Entry, QueuePosition, StateFile, StateFileError},
    stats::Stats,
    translate::TranslationService,
};

/// Guest memory as the backend sees it: every write through it is logged while the frontend
/// asks for a dirty-page log (live migration; see [`crate::dirty`]).
pub type GuestMemory = GuestMemoryMmap<DirtyLog>;
type Vring = VringRwLock<GuestMemoryAtomic<GuestMemory>>;

/// The epoll id of the fault backlog's eventfd (ids up to `NUM_QUEUES` are reserved).
pub const FAULT_EVENT: u16 = NUM_QUEUES as u16 + 1;
/// Device-readable bytes looked at: the longest request (PROBE) is 72.
pub(crate) const MAX_READABLE: usize = 128;
/// Writable descriptors accepted in one chain (Linux uses one).
const MAX_WRITABLE_SEGMENTS: usize = 16;
/// Largest device-writable area the device fills (the tail sits at its end).
pub const MAX_WRITABLE: usize = 64 * 1024;

/// Device state that outlives connections.
#[derive(Debug)]
pub struct Device {
    iommu: Mutex<Iommu>,
    /// Translators without the model's lock, which grace periods hold.
    translators: TranslatorSource,
    config: Mutex<Config>,
    initial: Config,
    offered: u64,
    acked: AtomicU64,
    event_idx: AtomicBool,
    /// Bumped by every memory table the frontend sends: a request loop running on an older
    /// snapshot of guest memory stops, and starts over on the new one.
    memory_epoch: AtomicU64,
    faults: Arc<FaultQueue>,
    stats: Arc<Stats>,
    poll: Duration,
    queue_size: u16,
    probe_size: u32,
    /// `--ring-fast-path`: false sends every chain through virtio-queue.
    ring_fast_path: bool,
    /// The topology's fingerprint in saved states, and the caps a loaded state must respect.
    fingerprint: u32,
    caps: state::Caps,
    /// A device-state transfer started by SET_DEVICE_STATE_FD, until CHECK_DEVICE_STATE.
    transfer: Mutex<Option<std::thread::JoinHandle<Result<(), StateError>>>>,
    /// Where the request queue stopped, until it runs again (see [`RingStop`]).
    stopped: Mutex<Option<RingStop>>,
    /// `stopped` is set: the worker compares before it touches a queue.
    stop_pending: AtomicBool,
    /// The model's tables as DMA masters map them (`--master-socket`).
    shared_tables: Option<Arc<crate::masters::SharedTables>>,
    /// `--state-file`: every request that reaches the model is journaled. Taken before the
    /// model's lock wherever both are held.
    journal: Option<Mutex<Journal>>,
    /// The daemon is stopping (SIGINT/SIGTERM): a disconnect now is not the guest's end.
    shutting_down: AtomicBool,
    /// The frontend acknowledged `VHOST_F_LOG_ALL`: writes to guest memory are logged once it
    /// set a log (SET_LOG_BASE).
    dirty_logging: AtomicBool,
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
struct Journal {
    file: StateFile,
    /// The last committed pass before this daemon started: requests that come again (the
    /// frontend rewound to the used index) are answered with the status they got, not applied
    /// twice. Emptied by the first pass.
    replay: Vec<(u16, virtio::Request, Status)>,
    /// Fault injection for the restart tests (`VHOST_IOMMU_TEST_CRASH_AFTER_COMMIT=N`): the
    /// daemon aborts right after its Nth commit, before that pass's used entries are
    /// published, the one point a SIGKILL from outside almost never hits.
    crash_after: Option<u64>,
}

impl Journal {
    /// The status a request at `position` got before a restart, if it is that request.
    fn answered(&self, position: u16, request: &virtio::Request) -> Option<Status> {
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
    fn resumed_by(&self, next_avail: u16, key: RingKey) -> bool {
        key == self.key && self.next_avail.wrapping_sub(next_avail) <= self.slack
    }
}

thread_local! {
    /// PROBE properties are encoded here (probe_size bytes; untouched by other requests).
    static PROBE_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Used elements of a pass, published after its grace period (grows to the queue size once).
    static USED_SCRATCH: std::cell::RefCell<Vec<(u16, u32)>> = const { std::cell::RefCell::new(Vec::new()) };
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
    fn recover(
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
                    device::execute(&mut iommu, &request).map_err(|e| DeviceError::Replay {
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

    fn journal(&self) -> Option<MutexGuard<'_, Journal>> {
        self.journal
            .as_ref()
            .map(|j| j.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Writes the state as the state file's new snapshot, starting its journal over.
    fn compact(&self, journal: &mut Journal, position: Option<QueuePosition>) {
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

    fn config(&self) -> MutexGuard<'_, Config> {
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

    fn forget_stop(&self) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.stop_pending.store(false, Relaxed);
    }

    /// The request queue stopped at `stop` (GET_VRING_BASE, or the position a restarted
    /// daemon found in its state file).
    pub(crate) fn queue_stopped(&self, stop: RingStop) {
        *self.stopped.lock().unwrap_or_else(|e| e.into_inner()) = Some(stop);
        self.stop_pending.store(true, Relaxed);
    }

    /// Before the worker touches a queue after a stop: a request queue that runs again
    /// somewhere else than where it stopped belongs to a driver that was reset, and the
    /// device resets before it answers that driver.
    fn check_restart(&self, requestq: &Vring) {
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

    fn try_load_state(&self, bytes: &[u8]) -> Result<(), StateError> {
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
    fn start_transfer(
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
    fn check_transfer(&self) -> io::Result<()> {
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

    /// Handles one request chain; returns the used length. Never panics on guest input.
    pub fn process_chain<M>(&self, mem: &GuestMemory, chain: DescriptorChain<M>) -> u32
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        self.process_chain_at(mem, chain, 0, None)
    }

    /// [`Device::process_chain`] for the chain at ring position `position`, journaled in
    /// `journal` (`--state-file`) when there is one.
    fn process_chain_at<M>(
        &self,
        mem: &GuestMemory,
        chain: DescriptorChain<M>,
        position: u16,
        journal: Option<&mut Journal>,
    ) -> u32
    where
        M: std::ops::Deref<Target = GuestMemory>,
    {
        let mut readable = [0u8; MAX_READABLE];
        let mut readable_len = 0usize;
        let mut segments = [(GuestAddress(0), 0usize); MAX_WRITABLE_SEGMENTS];
        let mut n_segments = 0;
        let mut writable_len = 0usize;
        for desc in chain {
            let (addr, len) = (desc.addr(), desc.len() as usize);
            // Writable buffers are checked before the request is applied, so a reply can
            // always be written; a readable one is checked by reading it (in full when short).
            let read_whole = !desc.is_write_only() && len <= MAX_READABLE - readable_len;
            if !read_whole && !mem.check_range(addr, len) {
                return self.malformed(format_args!(
                    "buffer {:#x}+{len:#x} outside guest memory",
                    addr.0
                ));
            }
            if desc.is_write_only() {
                if n_segments == MAX_WRITABLE_SEGMENTS {
                    return self.malformed(format_args!(
                        "more than {MAX_WRITABLE_SEGMENTS} writable buffers"
                    ));
                }
                if len > 0 {
                    segments[n_segments] = (addr, len);
                    n_segments += 1;
                }
                writable_len = writable_len.saturating_add(len);
            } else {
                if writable_len > 0 {
                    return self
                        .malformed(format_args!("device-readable buffer after a writable one"));
                }
                let take = len.min(MAX_READABLE - readable_len);
                if take > 0
                    && mem
                        .read_slice(&mut readable[readable_len..readable_len + take], addr)
                        .is_err()
                {
                    return self.malformed(format_args!("unreadable buffer at {:#x}", addr.0));
                }
                readable_len += take;
            }
        }
        if writable_len > MAX_WRITABLE {
            return self.malformed(format_args!("writable area of {writable_len} bytes"));
        }
        let mut sink = SegmentWriter::new(mem, &segments[..n_segments]);
        self.answer(
            &readable[..readable_len],
            writable_len,
            &mut sink,
            position,
            journal,
        )
    }

    /// Applies one checked request (its device-readable bytes, the size of its writable area,
    /// its ring position) and writes the reply through `sink`; returns the used length. The
    /// model's lock is held for the request only, not while the reply is written. With a
    /// journal, a request that reached the model is recorded with its status, and one the
    /// journal says was answered before a restart gets that status again.
    fn answer<S: ReplySink>(
        &self,
        readable: &[u8],
        writable_len: usize,
        sink: &mut S,
        position: u16,
        mut journal: Option<&mut Journal>,
    ) -> u32 {
        let features = self.acked.load(Relaxed);
        let probe_size = self.probe_size;
        let mut handle = |properties: &mut [u8]| {
            let earlier = journal.as_deref();
            let mut repeated = None;
            let reply = device::handle_once(
                &mut self.iommu(),
                readable,
                writable_len,
                features,
                probe_size,
                properties,
                |request| {
                    let status = earlier.and_then(|j| j.answered(position, request));
                    repeated = status.map(|_| *request);
                    status
                },
            );
            if let (
                Some(j),
                Reply::Status {
                    status, applied, ..
                },
            ) = (journal.as_deref_mut(), &reply)
            {
                match applied {
                    Some(request) if !j.file.request(position, request, *status) => {
                        log_limited!(
                            log::Level::Error,
                            "state file journal full: {request:?} not recorded"
                        );
                    }
                    None => {
                        if let Some(request) = repeated {
                            self.stats.state_replayed.fetch_add(1, Relaxed);
                            j.file.repeat(position, &request, *status);
                        }
                    }
                    _ => {}
                }
            }
            self.reply(sink, writable_len, reply, properties, readable)
        };
        if readable.first() == Some(&(RequestType::Probe as u8)) {
            PROBE_SCRATCH.with_borrow_mut(|scratch| {
                scratch.resize(probe_size as usize, 0);
                handle(scratch)
            })
        } else {
            handle(&mut [])
        }
    }

    /// Writes a reply: PROBE properties (P8: zero-filled to probe_size), zeros, and the tail in
    /// the last 4 bytes. The whole writable area is written and reported as used, since Linux
    /// copies a request's status back only when the used length covers it.
    fn reply<S: ReplySink>(
        &self,
        w: &mut S,
        writable_len: usize,
        reply: Reply,
        properties: &[u8],
        readable: &[u8],
    ) -> u32 {
        match reply {
            Reply::Nothing(err) => {
                let kind = readable
                    .first()
                    .and_then(|&t| RequestType::try_from(t).ok());
                self.stats.count_no_reply(kind);
                log_limited!(log::Level::Warn, "request returned unanswered: {err}");
                0
            }
            Reply::Status {
                request,
                status,
                properties: used,
                error,
                ..
            } => {
                self.stats.count_reply(request, status);
                if let Some(error) = error {
                    log_limited!(log::Level::Warn, "{request:?} -> {status}: {error}");
                }
                let body = writable_len - TAIL_SIZE;
                let props = if used > 0 {
                    properties.len().min(body)
                } else {
                    0
                };
                if w.write(&properties[..props])
                    && w.zeros(body - props)
                    && w.write(&Status::tail(status))
                {
                    writable_len as u32
                } else {
                    self.malformed(format_args!("writable buffer vanished"))
                }
            }
        }
    }

    fn malformed(&self, what: std::fmt::Arguments<'_>) -> u32 {
        self.stats.malformed_chains.fetch_add(1, Relaxed);
        log_limited!(
            log::Level::Warn,
            "malformed request chain returned unanswered: {what}"
        );
        0
    }

    /// Processes the request queue until it is empty and, with polling on, stays empty for
    /// the poll window; `mem` is the snapshot of guest memory taken at memory epoch `epoch`.
    ///
    /// A disabled queue (`SET_VRING_ENABLE` 0) is not touched, and a loop that finds its
    /// queue disabled ends (enabling it again runs a pass). A loop that finds the memory
    /// table replaced returns [`LoopEnd::MemoryReplaced`] for the caller to start over on the
    /// new snapshot: under a steady load the loop would otherwise poll on, and answer, with a
    /// table the frontend has replaced.
    ///
    /// Every pass runs with notifications off, and the loop ends only once they are back on
    /// and the ring was looked at after that ([`rearm`]): a driver that made a buffer
    /// available while they were off saw no need to kick, so that buffer is this loop's to
    /// find.
    ///
    /// A ring the device cannot use (not ready, outside guest memory, an avail index running
    /// more than the queue size ahead) is left alone until the next kick: the loop goes round
    /// again only after a pass that made progress or after a re-check that saw the driver
    /// publish buffers, and a pass that finds nothing after such a re-check ends it (a driver
    /// that really published is always served by that pass), so no guest can make it spin.
    ///
    /// Passes run on the ring fast path (`ring.rs`: rings resolved to host memory once per
    /// layout, simple chains parsed straight from the descriptor table, used elements and the
    /// used index written once per pass) whenever the rings lie inside single memory regions
    /// and `--ring-fast-path` is on; any chain that is not the simple case goes through
    /// virtio-queue and [`Device::process_chain`], exactly as on the slow path.
    fn process_requests(
        &self,
        vring: &Vring,
        mem: &GuestMemory,
        epoch: u64,
    ) -> io::Result<LoopEnd> {
        let mut handled = 0usize;
        let mut polled = false;
        // Resolved for this memory snapshot; re-resolved when the ring layout changes.
        let mut rings: Option<Rings<'_>> = None;
        let mut scratch = FastScratch::default();
        // This pass follows a re-check that saw buffers arrive: it must find them.
        let mut after_recheck = false;
        loop {
            let mut state = vring.get_mut();
            if self.memory_epoch.load(Acquire) != epoch {
                return Ok(LoopEnd::MemoryReplaced);
            }
            if !state.is_enabled() {
                break;
            }
            let queue = state.get_queue_mut();
            if self.ring_fast_path
                && queue.ready()
                && rings.is_none_or(|r| r.key != RingKey::of(queue))
            {
                rings = Rings::new(queue, mem);
            }
            let fast = rings.filter(|_| queue.ready());
            // With a resolved view only the avail index can have gone wrong since.
            let usable = match fast {
                Some(r) => r
                    .avail_idx(std::sync::atomic::Ordering::Acquire)
                    .is_some_and(|idx| idx.wrapping_sub(queue.next_avail()) <= r.size()),
                None => false,
            };
            if !usable {
                if let Some(problem) = ring_problem(queue, mem) {
                    if queue.ready() {
                        self.stats.broken_rings.fetch_add(1, Relaxed);
                        log_limited!(log::Level::Warn, "request queue unusable: {problem}");
                        // Left alone until the next kick, which notifications must allow.
                        let _ = queue.enable_notification(mem);
                    }
                    break;
                }
            }
            // Notifications off while there is work; the driver need not kick.
            let _ = queue.disable_notification(mem);
            let old_used = queue.next_used();
            // With a state file, the pass's records are committed before any of its used
            // entries is published; there is room for a whole pass before it starts.
            let mut journal = self.journal();
            if let Some(j) = journal.as_deref_mut() {
                if j.file.free_records() <= usize::from(queue.size()) + 1 {
                    let at = j.file.position();
                    self.compact(j, at);
                }
            }
            // The pass's requests share one grace period (the IOTLB-sync rule): none is
            // reported complete before every translation they took away is gone.
            let batch = USED_SCRATCH.with_borrow_mut(|done| {
                self.iommu().begin_batch();
                match fast {
                    Some(r) => {
                        self.fast_pass(queue, mem, &r, &mut scratch, done, journal.as_deref_mut())
                    }
                    None => loop {
                        let position = queue.next_avail();
                        let Some(chain) = queue.pop_descriptor_chain(mem) else {
                            break;
                        };
                        let head = chain.head_index();
                        let used =
                            self.process_chain_at(mem, chain, position, journal.as_deref_mut());
                        done.push((head, used));
                    },
                }
                self.iommu().end_batch();
                let n = done.len();
                if let Some(j) = journal.as_deref_mut().filter(|_| n > 0) {
                    let at = QueuePosition::new(queue.next_avail(), RingKey::of(queue));
                    if !j.file.commit(at) {
                        log_limited!(log::Level::Error, "state file journal full: pass lost");
                    }
                    if let Some(n) = j.crash_after.as_mut() {
                        *n = n.saturating_sub(1);
                        if *n == 0 {
                            std::process::abort();
                        }
                    }
                    // The requests that could come again after a restart came in this pass.
                    j.replay.clear();
                }
                drop(journal.take());
                match fast {
                    Some(r) => publish_used(queue, &r, done),
                    None => {
                        for (head, used) in done.drain(..) {
                            if queue.add_used(mem, head, used).is_err() {
                                log_limited!(log::Level::Warn, "used ring write failed");
                            }
                        }
                    }
                }
                n
            });
            let signal = batch > 0
                && match fast {
                    Some(r) => needs_signal_fast(queue, &r, old_used),
                    None => needs_signal(queue, mem),
                };
            if batch == 0 {
                // Nothing could be popped: sleep until the next kick, unless buffers arrived
                // while notifications were off (their driver did not kick).
                if rearm(queue, mem) && !after_recheck {
                    after_recheck = true;
                    continue;
                }
                break;
            }
            after_recheck = false;
            let next_avail = queue.next_avail();
            drop(state);
            if signal {
                vring.signal_used_queue()?;
            }
            handled += batch;
            if polled {
                self.stats.polled_requests.fetch_add(batch as u64, Relaxed);
            }
            if self.poll > Duration::ZERO {
                let moved = match fast {
                    Some(r) => self.poll_avail_fast(vring, &r, next_avail, epoch),
                    None => self.poll_avail(vring, mem, epoch),
                };
                if moved {
                    polled = true;
                    continue;
                }
            }
            polled = false;
            let mut state = vring.get_mut();
            if !state.is_enabled() || !rearm(state.get_queue_mut(), mem) {
                break;
            }
            // Buffers arrived while notifications were off: go again.
            after_recheck = true;
        }
        if handled == 0 {
            self.stats.spurious_wakeups.fetch_add(1, Relaxed);
        }
        Ok(LoopEnd::Asleep)
    }

    /// One pass on the fast path: every chain the driver made available (at most a queue's
    /// worth), simple chains straight from the rings, the others through virtio-queue. Used
    /// elements go to `done`; the queue's `next_avail` is kept current.
    fn fast_pass<'m>(
        &self,
        queue: &mut virtio_queue::Queue,
        mem: &'m GuestMemory,
        rings: &Rings<'m>,
        scratch: &mut FastScratch<'m>,
        done: &mut Vec<(u16, u32)>,
        mut journal: Option<&mut Journal>,
    ) {
        let size = rings.size();
        let FastScratch { cache, chain } = scratch;
        let mut next = queue.next_avail();
        'pass: while done.len() < usize::from(size) {
            let Some(avail) = rings.avail_idx(std::sync::atomic::Ordering::Acquire) else {
                break;
            };
            let pending = avail.wrapping_sub(next);
            // More than a queue ahead: the next pass's check reports it.
            if pending == 0 || pending > size {
                break;
            }
            for _ in 0..pending {
                if done.len() == usize::from(size) {
                    break 'pass;
                }
                let simple = rings
                    .avail_entry(next)
                    .filter(|&head| head < size)
                    .filter(|&head| rings.parse(mem, cache, head, chain).is_some())
                    .filter(|_| chain.writable_len <= MAX_WRITABLE);
                match simple {
                    Some(head) => {
                        let readable = &chain.readable[..chain.readable_len];
                        let mut sink = SliceWriter::new(&chain.writable[..chain.n_writable]);
                        let used = self.answer(
                            readable,
                            chain.writable_len,
                            &mut sink,
                            next,
                            journal.as_deref_mut(),
                        );
                        next = next.wrapping_add(1);
                        done.push((head, used));
                    }
                    None => {
                        // Not the simple case: virtio-queue's chain and the slow path's
                        // checks decide (the same entry, read again).
                        queue.set_next_avail(next);
                        let Some(slow) = queue.pop_descriptor_chain(mem) else {
                            break 'pass;
                        };
                        let head = slow.head_index();
                        let used = self.process_chain_at(mem, slow, next, journal.as_deref_mut());
                        done.push((head, used));
                        next = queue.next_avail();
                    }
                }
            }
        }
        queue.set_next_avail(next);
    }

    /// Spins on the avail ring for the poll window; true when the avail index moved or the
    /// memory table was replaced (the next pass checks both before using the ring).
    fn poll_avail(&self, vring: &Vring, mem: &GuestMemory, epoch: u64) -> bool {
        let deadline = Instant::now() + self.poll;
        let mut spins = 0u32;
        loop {
            {
                let state = vring.get_ref();
                let queue = state.get_queue();
                if !queue.ready() || !state.is_enabled() {
                    return false;
                }
                if self.memory_epoch.load(Acquire) != epoch {
                    return true;
                }
                match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
                    Ok(idx) if idx.0 != queue.next_avail() => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
            spins += 1;
            if spins % 64 == 0 && Instant::now() >= deadline {
                return false;
            }
            if spins % 1024 == 0 {
                // Give the CPU away if someone else (a vCPU) waits for it.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    }

    /// [`Device::poll_avail`] on a resolved ring: spins on the avail index in host memory and
    /// looks at the queue (under its lock) only every 64 spins, to notice a stop, a disable,
    /// a reset, moved rings or a new memory table. True when the avail index moved or the
    /// rings or the memory changed (the next pass checks them before using the ring).
    fn poll_avail_fast(
        &self,
        vring: &Vring,
        rings: &Rings<'_>,
        next_avail: u16,
        epoch: u64,
    ) -> bool {
        let deadline = Instant::now() + self.poll;
        let mut spins = 0u32;
        loop {
            match rings.avail_idx(std::sync::atomic::Ordering::Acquire) {
                Some(idx) if idx != next_avail => return true,
                Some(_) => {}
                None => return false,
            }
            spins += 1;
            if spins % 64 == 0 {
                if Instant::now() >= deadline {
                    return false;
                }
                let state = vring.get_ref();
                let queue = state.get_queue();
                if !queue.ready() || !state.is_enabled() {
                    return false;
                }
                if RingKey::of(queue) != rings.key
                    || queue.next_avail() != next_avail
                    || self.memory_epoch.load(Acquire) != epoch
                {
                    return true;
                }
            }
            if spins % 1024 == 0 {
                // Give the CPU away if someone else (a vCPU) waits for it.
                std::thread::yield_now();
            }
            std::hint::spin_loop();
        }
    }

    /// Writes waiting fault records into the buffers the driver posted on the event queue.
    /// A buffer is taken before a record, so a record leaves the backlog only to be written.
    ///
    /// Records that wait with no buffer posted must not wait for a kick the driver does not
    /// send: notifications go back on (with EVENT_IDX, `avail_event` names the next buffer;
    /// without it `VRING_USED_F_NO_NOTIFY` is never set here) and the ring is looked at again
    /// ([`rearm`]). A re-check that saw buffers arrive is followed by a round that takes one,
    /// or the call ends: a broken ring cannot make it spin.
    fn deliver_faults(&self, vring: &Vring, mem: &GuestMemory) -> io::Result<()> {
        let mut returned = 0u64;
        let mut state = vring.get_mut();
        if !state.is_enabled() {
            // Re-enabling the queue runs this again.
            return Ok(());
        }
        let queue = state.get_queue_mut();
        let mut after_recheck = false;
        loop {
            if self.faults.is_empty() || ring_problem(queue, mem).is_some() {
                break;
            }
            let taken = self.fill_event_buffers(queue, mem);
            returned += taken;
            if self.faults.is_empty() || (taken == 0 && after_recheck) || !rearm(queue, mem) {
                break;
            }
            after_recheck = true;
        }
        let notify = returned > 0 && queue.needs_notification(mem).unwrap_or(true);
        drop(state);
        if notify {
            vring.signal_used_queue()?;
        }
        Ok(())
    }

    /// Writes records into event buffers until one or the other runs out; returns how many
    /// buffers went back to the driver.
    fn fill_event_buffers(&self, queue: &mut virtio_queue::Queue, mem: &GuestMemory) -> u64 {
        let mut returned = 0;
        while !self.faults.is_empty() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let Some(taken) = self.faults.pop() else {
                // Cleared meanwhile (reset): give the buffer back untouched.
                queue.go_to_previous_position();
                break;
            };
            let used = write_fault(mem, chain, &taken);
            if used == 0 {
                // Spec E5: never split a record; keep it for a big enough buffer.
                self.faults.unpop(taken);
                log_limited!(
                    log::Level::Warn,
                    "event buffer too small for a fault record"
                );
            } else {
                self.faults.delivered(taken);
            }
            let _ = queue.add_used(mem, head, used);
            returned += 1;
        }
        returned
    }

    /// SET_FEATURES: the driver's features, and `VHOST_F_LOG_ALL`, the frontend's request for
    /// a dirty-page log, which is no feature of the guest's: it is neither kept with the
    /// driver's features nor saved with the device state. Returns whether logging stopped.
    fn set_features(&self, features: u64) -> bool {
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

/// How a call of [`Device::process_requests`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopEnd {
    /// Nothing left to do: notifications are on (or the queue is off).
    Asleep,
    /// The memory table was replaced: call again with a snapshot of the new one.
    MemoryReplaced,
}

/// What the ring fast path keeps from one chain to the next: the memory region of the last
/// buffer, and the chain being parsed.
#[derive(Default)]
struct FastScratch<'m> {
    cache: RegionCache<'m>,
    chain: FastChain<'m>,
}

/// Why a queue cannot be used now, if it cannot: checked before touching it, so that a broken
/// ring costs one look per kick and never a loop (virtio-queue's own checks log errors without
/// a rate limit).
fn ring_problem(queue: &virtio_queue::Queue, mem: &GuestMemory) -> Option<String> {
    if !queue.ready() {
        return Some("not ready".into());
    }
    let size = u64::from(queue.size());
    let rings = [
        ("descriptor table", queue.desc_table(), 16 * size),
        ("available ring", queue.avail_ring(), 6 + 2 * size),
        ("used ring", queue.used_ring(), 6 + 8 * size),
    ];
    if queue.avail_ring() == 0 {
        return Some("no available ring address".into());
    }
    for (what, addr, len) in rings {
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return Some(format!("{what} {addr:#x}+{len:#x} outside guest memory"));
        }
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) if (idx - std::num::Wrapping(queue.next_avail())).0 > queue.size() => {
            Some(format!(
                "available index {} is more than the queue size ahead of {}",
                idx.0,
                queue.next_avail()
            ))
        }
        Ok(_) => None,
        Err(e) => Some(format!("available index unreadable: {e}")),
    }
}

/// Turns the driver's notifications back on (`VRING_USED_F_NO_NOTIFY` cleared, or with
/// EVENT_IDX `avail_event` set to the next entry), then looks at the available index once
/// more: true when buffers arrived meanwhile, which the caller must process since their driver
/// may have seen notifications off and not kicked. A stopped queue is left alone: its ring
/// belongs to the frontend again, and a restart runs a pass.
fn rearm(queue: &mut virtio_queue::Queue, mem: &GuestMemory) -> bool {
    if !queue.ready() {
        return false;
    }
    match queue.enable_notification(mem) {
        Ok(arrived) => arrived,
        Err(e) => {
            log_limited!(log::Level::Warn, "enable_notification: {e}");
            false
        }
    }
}

/// Whether the driver wants an interrupt for what was just used. virtio-queue honours
/// `used_event` with EVENT_IDX but ignores `VRING_AVAIL_F_NO_INTERRUPT` without it; Linux sets
/// that flag on the request queue (it polls), so honour it here.
fn needs_signal(queue: &mut virtio_queue::Queue, mem: &GuestMemory) -> bool {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem).unwrap_or(true);
    }
    const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT == 0,
        Err(_) => true,
    }
}

/// Writes a fast pass's used elements, then the used index once (Release), and keeps the
/// queue's `next_used` current. A head outside the queue is refused as `add_used` refuses it.
fn publish_used(queue: &mut virtio_queue::Queue, rings: &Rings<'_>, done: &mut Vec<(u16, u32)>) {
    let old = queue.next_used();
    let mut idx = old;
    for (head, used) in done.drain(..) {
        if head >= rings.size() || !rings.put_used(idx, head, used) {
            log_limited!(log::Level::Warn, "used ring write failed");
            continue;
        }
        idx = idx.wrapping_add(1);
    }
    if idx != old {
        if !rings.publish_used(idx) {
            log_limited!(log::Level::Warn, "used ring write failed");
        }
        queue.set_next_used(idx);
    }
}

/// [`needs_signal`] for a fast pass that moved the used index from `old` to the queue's
/// `next_used`: with EVENT_IDX, whether `used_event` lies in `[old, new)`; without it, whether
/// the driver left `VRING_AVAIL_F_NO_INTERRUPT` clear.
fn needs_signal_fast(queue: &virtio_queue::Queue, rings: &Rings<'_>, old: u16) -> bool {
    // The used index store must be visible before the driver's wish is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    if queue.event_idx_enabled() {
        rings
            .used_event()
            .is_none_or(|event| ring::need_event(event, queue.next_used(), old))
    } else {
        rings
            .avail_flags()
            .is_none_or(|flags| flags & ring::VRING_AVAIL_F_NO_INTERRUPT == 0)
    }
}

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

/// Spec: an unattached endpoint bypasses when BYPASS_CONFIG is offered and `bypass` is 1.
fn effective_bypass(config: &Config, offered: u64) -> bool {
    offered & virtio::F_BYPASS_CONFIG != 0 && config.bypass == 1
}

/// Writes sequentially across the device-writable buffers of a chain.
struct SegmentWriter<'a> {
    mem: &'a GuestMemory,
    segments: &'a [(GuestAddress, usize)],
    index: usize,
    offset: usize,
}

impl<'a> SegmentWriter<'a> {
    fn new(mem: &'a GuestMemory, segments: &'a [(GuestAddress, usize)]) -> Self {
        SegmentWriter {
            mem,
            segments,
            index: 0,
            offset: 0,
        }
    }
}

/// Where a reply goes: sequentially across a chain's device-writable buffers.
pub(crate) trait ReplySink {
    /// Writes `bytes` at the cursor; false if the buffers are too short or unwritable.
    fn write(&mut self, bytes: &[u8]) -> bool;

    fn zeros(&mut self, mut n: usize) -> bool {
        static ZEROS: [u8; 4096] = [0; 4096];
        while n > 0 {
            let take = n.min(ZEROS.len());
            if !self.write(&ZEROS[..take]) {
                return false;
            }
            n -= take;
        }
        true
    }
}

impl ReplySink for SegmentWriter<'_> {
    fn write(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let Some(&(addr, len)) = self.segments.get(self.index) else {
                return false;
            };
            let take = (len - self.offset).min(bytes.len());
            let at = GuestAddress(addr.0 + self.offset as u64);
            if self.mem.write_slice(&bytes[..take], at).is_err() {
                return false;
            }
            bytes = &bytes[take..];
            self.offset += take;
            if self.offset == len {
                self.index += 1;
                self.offset = 0;
            }
        }
        true
    }
}

/// Writes one fault record into an event buffer; 0 when the buffer cannot hold it whole.
fn write_fault<M>(mem: &GuestMemory, chain: DescriptorChain<M>, record: &FaultRecord) -> u32
where
    M: std::ops::Deref<Target = GuestMemory>,
{
    let mut segments = [(GuestAddress(0), 0usize); 8];
    let mut n = 0;
    let mut total = 0usize;
    for desc in chain.writable() {
        let (addr, len) = (desc.addr(), desc.len() as usize);
        if n == segments.len() || !mem.check_range(addr, len) {
            return 0;
        }
        segments[n] = (addr, len);
        n += 1;
        total += len;
    }
    if total < FAULT_SIZE {
        return 0;
    }
    if SegmentWriter::new(mem, &segments[..n]).write(&record.to_bytes()) {
        FAULT_SIZE as u32
    } else {
        0
    }
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
        })
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
    /// noted: a ring that starts again elsewhere belongs to a reset driver ([`RingStop`]).
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
                    self.device.deliver_faults(&vrings[1], &mem)?;
                }
                other => debug!("event on unknown id {other}"),
            }
            return Ok(());
        }
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
