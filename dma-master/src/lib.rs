// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A DMA master in another process behind vhost-device-iommu.
//!
//! A device backend (a vhost-user net, blk or fs backend, a user-space driver) that does DMA
//! for a guest links this crate to translate the guest's IOVAs the way the guest programmed
//! its virtio-iommu. It connects to the daemon's master socket (`--master-socket`), takes DMA
//! ownership of an endpoint (an exclusive claim with a cookie, or DMA-API use), and gets an
//! [`Endpoint`] that implements [`vm_memory::Iommu`]: wrap the guest's memory in
//! [`vm_memory::IommuMemory`] and virtio-queue, `Bytes` and the rest work on IOVAs unchanged.
//!
//! ```no_run
//! use vhost_iommu_client::{Access, Error, Master};
//! use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, IommuMemory};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let guest_ram: GuestMemoryMmap<()> = GuestMemoryMmap::new();
//! let master = Master::connect("/run/viommu-masters.sock")?;
//! // The device at PCI 00:05.0 (requester ID 0x28), owned exclusively under a cookie.
//! let endpoint = master.claim(0x28, 0x5eed)?;
//! // IOVAs in, guest memory out: every access is translated (and refused where the guest
//! // mapped nothing, with a fault record on the guest's event queue).
//! let mem = IommuMemory::new(guest_ram, endpoint, true, ());
//! let mut header = [0u8; 16];
//! mem.read_slice(&mut header, GuestAddress(0x1000_0000))?;
//! // Several accesses that must see one state of the tables (a whole request): one section.
//! let section = mem.iommu().section()?;
//! let t = section
//!     .translate(0x1000_0000, 4096, Access::Write)
//!     .map_err(Error::from)?;
//! println!("IOVA 0x1000_0000 -> GPA {:#x} ({} bytes)", t.gpa, t.len);
//! drop(section);
//! # Ok(())
//! # }
//! ```
//!
//! **How it works.** The daemon keeps its page tables in a memfd; this crate maps it
//! read-only and walks the tables with the daemon's own code (the `ownership` crate), no
//! message per translation. Each thread that translates holds a *reader slot* in a page it
//! shares with the daemon while it uses a translation: a read-side critical section
//! ([`Section`], or the guard behind a `vm_memory` translation). When the guest's UNMAP,
//! DETACH, a move of the group to another domain or a reset is answered, every section that
//! could still see the old tables has ended: the daemon waits for them (a grace period) before
//! it writes the used entry. A section held longer than the daemon's bound (`--master-stall-ms`,
//! [`Master::stall_bound`]) gets the master *cut off*: the daemon stops waiting for it, revokes
//! it (every later section is refused with [`Error::Revoked`]) and drops the connection; the
//! section that was stuck could still use the old translation, which [`Section::finish`]
//! reports. The promise holds for masters that use this crate as documented.
//!
//! **Sections.** Keep one across a DMA: translate, copy, drop. In a loop of translations use
//! the section's [`Handle`] ([`Section::handle`]), kept in a local. `vm_memory` accesses through
//! `Bytes` hold one for the length of the copy. A [`vm_memory::VolatileSlice`] kept past its
//! call is not covered: hold a [`Section`] on the same thread around the whole use. Never
//! block for long inside a section (disk or network I/O): past the bound the master is cut
//! off; translate, copy into a buffer of your own, leave, then block.
//!
//! **Faults.** A translation the guest's tables refuse (no domain, unmapped, out of the input
//! range, wrong permission, a reserved region) is reported to the daemon, which queues a fault
//! record for the guest's event queue exactly as for its own translations. Reports never block
//! a DMA thread: when the socket is full they are dropped and counted ([`Master::stats`]).
#![forbid(unsafe_code)]

mod iommu;
mod socket;
pub mod wire;

use std::{
    cell::Cell,
    fmt,
    os::{fd::AsFd, unix::net::UnixStream},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex, MutexGuard, TryLockError,
    },
    time::{Duration, Instant},
};

pub use ownership::{Access, Dma, EndpointId, Fault, ResvKind, ResvRegion, Translation};
use ownership::{EndpointView, LayoutError, RemoteEndpoint, RemoteTables, Requester, SharedWords};
use shm::Words;
use thiserror::Error;
use vm_memory::Iotlb;
use vmm_sys_util::eventfd::EventFd;

pub use crate::iommu::IotlbGuard;
use crate::{
    socket::Socket,
    wire::{ErrorCode, FaultAccess, FaultReason, FaultReport, Reply, Request, WireError},
};

/// Why the client could not do what was asked.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("talking to the daemon: {0}")]
    Io(#[from] std::io::Error),
    #[error("the daemon sent a bad message: {0}")]
    Protocol(#[from] WireError),
    #[error("unexpected reply: {0}")]
    Unexpected(String),
    #[error("the daemon refused: {0}")]
    Refused(ErrorCode),
    #[error("the daemon's tables: {0}")]
    Tables(String),
    #[error("the daemon's layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("cut off by the daemon, or disconnected: translations are refused")]
    Revoked,
    #[error("the endpoint was released")]
    Released,
    #[error("every reader slot is held by this thread")]
    NoSlot,
    #[error(
        "this thread holds a section: the daemon answers a claim or release only after every \
         section of this master ended (a release is deferred)"
    )]
    InSection,
    #[error("translation refused: {0:?}")]
    Fault(Fault),
}

impl From<Fault> for Error {
    fn from(fault: Fault) -> Self {
        Error::Fault(fault)
    }
}

/// How to connect.
#[derive(Clone, Debug)]
pub struct Options {
    /// Reader slots to ask for: how many threads may hold a section at once (at most
    /// [`wire::MAX_SLOTS`]; the daemon may grant fewer). A thread that finds every slot taken
    /// waits for one.
    pub slots: u32,
    /// How long a request (connect, claim, release) may wait for the daemon.
    pub timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get());
        Options {
            slots: (threads as u32 * 2).clamp(4, wire::MAX_SLOTS),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of one connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Refused translations reported to the daemon.
    pub faults_reported: u64,
    /// Reports dropped because the socket was full.
    pub faults_dropped: u64,
    /// Translations asked of this connection (what the daemon's `stats` shows for it), those
    /// of the `vm_memory` path that missed the IOTLB, and those refused. Kept per reader slot
    /// and published when a section ends.
    pub translations: u64,
    pub iotlb_misses: u64,
    pub refused: u64,
}

/// One reader slot's private state: the `vm_memory` IOTLB it fills, valid for one epoch of
/// one endpoint handle.
#[derive(Debug, Default)]
struct SlotState {
    iotlb: Iotlb,
    /// (endpoint handle, epoch) the IOTLB was filled for.
    tag: Option<(u64, u64)>,
    entries: usize,
}

/// A connection to the daemon: the mapped tables, the reader slots, the socket.
struct Connection {
    socket: Mutex<Socket>,
    tables: RemoteTables,
    /// The slots file, read-write: the revoked word and the section words.
    slot_words: Words,
    pool: Box<[Mutex<SlotState>]>,
    /// The daemon hung up (or cut the master off).
    closed: Arc<AtomicBool>,
    /// Endpoints dropped while their thread held a section: released by the next request (or
    /// by the end of the connection).
    deferred: Mutex<Vec<EndpointId>>,
    watcher: EventFd,
    timeout: Duration,
    stall_bound: Duration,
    input_range: (u64, u64),
    next_handle: AtomicU64,
    faults_reported: AtomicU64,
    faults_dropped: AtomicU64,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("slots", &self.pool.len())
            .field("revoked", &self.revoked())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        // Ends the watcher, which holds the last clone of the socket: the daemon sees the
        // hang-up and releases whatever this master still held.
        let _ = self.watcher.write(1);
    }
}

thread_local! {
    /// The slot this thread leased last: where its next lease starts looking.
    static SLOT_HINT: Cell<usize> = const { Cell::new(0) };
    /// Sections this thread holds (of any connection).
    static OPEN_SECTIONS: Cell<u32> = const { Cell::new(0) };
}

/// Whether this thread holds a section.
fn in_section() -> bool {
    OPEN_SECTIONS.get() > 0
}

impl Connection {
    /// One request and its reply. Refused inside a section: the daemon may hold its answer
    /// until every section of this master ended (a release waits for a grace period), so a
    /// thread asking from inside one would wait for itself until the master is cut off.
    fn request(&self, request: &Request) -> Result<Reply, Error> {
        if in_section() {
            return Err(Error::InSection);
        }
        let deferred =
            std::mem::take(&mut *self.deferred.lock().unwrap_or_else(|e| e.into_inner()));
        for endpoint in deferred {
            // Already gone on the daemon's side counts as done.
            match self.exchange(&Request::Release { endpoint }) {
                Ok(_) | Err(Error::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        self.exchange(request)
    }

    fn exchange(&self, request: &Request) -> Result<Reply, Error> {
        let socket = self.socket.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed.load(Ordering::SeqCst) {
            return Err(Error::Revoked);
        }
        let deadline = Instant::now() + self.timeout;
        let result = socket
            .send_all(&request.encode(), deadline)
            .and_then(|()| socket.recv_frame(deadline));
        let (kind, payload, _file) = match result {
            Ok(frame) => frame,
            Err(e) => {
                // The stream may be mid-frame: this connection is done.
                self.closed.store(true, Ordering::SeqCst);
                return Err(e.into());
            }
        };
        match Reply::decode(kind, &payload)? {
            Reply::Error(code) => Err(Error::Refused(code)),
            reply => Ok(reply),
        }
    }

    fn revoked(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
            || self.slot_words[wire::REVOKED].load(Ordering::Relaxed) != 0
    }

    fn slot(&self, index: usize) -> &AtomicU64 {
        &self.slot_words[wire::slot_word(index)]
    }

    /// Adds `n` to counter `which` of slot `index` (see [`wire::SLOT_TRANSLATIONS`]). Only the
    /// thread leasing the slot writes its counters: a load and a store, no locked instruction.
    #[inline]
    fn count(&self, index: usize, which: usize, n: u64) {
        if n == 0 {
            return;
        }
        let word = &self.slot_words[wire::slot_word(index) + which];
        word.store(
            word.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    /// Counter `which`, summed over the slots.
    fn counted(&self, which: usize) -> u64 {
        (0..self.pool.len())
            .map(|i| self.slot_words[wire::slot_word(i) + which].load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }

    /// A reader slot for this thread, held until the guard drops.
    fn lease(&self) -> Result<(usize, MutexGuard<'_, SlotState>), Error> {
        let n = self.pool.len();
        let start = SLOT_HINT.get() % n;
        // Read the clock only once every slot was found taken (a clock read costs as much as
        // the rest of a lease).
        let mut until = None;
        loop {
            for k in 0..n {
                let i = (start + k) % n;
                let lease = match self.pool[i].try_lock() {
                    Ok(lease) => lease,
                    Err(TryLockError::Poisoned(p)) => p.into_inner(),
                    Err(TryLockError::WouldBlock) => continue,
                };
                SLOT_HINT.set(i);
                return Ok((i, lease));
            }
            // Every slot is held (by other threads, or nested sections of this one).
            let now = Instant::now();
            if now >= *until.get_or_insert(now + self.timeout) {
                return Err(Error::NoSlot);
            }
            std::thread::yield_now();
        }
    }

    /// Enters a section on `slot`; refused once the master is revoked. Returns the entry
    /// token and the epoch as seen after the entry's fence.
    #[inline]
    fn enter(&self, slot: usize) -> Result<(u64, u64), Error> {
        let word = self.slot(slot);
        let token = self.tables.enter(word);
        // Both after the entry's fence: a revocation or a grace period that started before
        // this section is visible here, or waits for the section.
        if self.revoked() {
            self.tables.leave(word, token);
            return Err(Error::Revoked);
        }
        OPEN_SECTIONS.set(OPEN_SECTIONS.get() + 1);
        Ok((token, self.tables.epoch()))
    }

    #[inline]
    fn leave(&self, slot: usize, token: u64) {
        self.tables.leave(self.slot(slot), token);
        OPEN_SECTIONS.set(OPEN_SECTIONS.get().saturating_sub(1));
    }

    /// Reports a refused translation (guest-visible ones only); never blocks.
    fn report(&self, endpoint: EndpointId, fault: Fault, iova: u64, access: Access) {
        let Some(reason) = FaultReason::of(fault) else {
            return;
        };
        let report = Request::Fault(FaultReport {
            endpoint,
            reason,
            access: match access {
                Access::Read => FaultAccess::Read,
                Access::Write => FaultAccess::Write,
            },
            iova,
        });
        // A request in flight holds the socket for a round trip at most; a DMA thread does not
        // wait for that either.
        let sent = match self.socket.try_lock() {
            Ok(socket) => socket
                .try_send(&report.encode(), Instant::now() + self.timeout)
                .unwrap_or(false),
            Err(_) => false,
        };
        if sent {
            self.faults_reported.fetch_add(1, Ordering::Relaxed);
        } else {
            self.faults_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection to the daemon's master socket. Cheap to clone; the connection ends when the
/// last clone and the last [`Endpoint`] made from it are dropped, and the daemon then
/// releases whatever it still held.
#[derive(Clone, Debug)]
pub struct Master {
    conn: Arc<Connection>,
}

impl Master {
    /// Connects with default [`Options`].
    pub fn connect(path: impl AsRef<Path>) -> Result<Master, Error> {
        Self::connect_with(path, Options::default())
    }

    /// Connects: the handshake, then the daemon's tables mapped read-only and the reader
    /// slots read-write.
    pub fn connect_with(path: impl AsRef<Path>, options: Options) -> Result<Master, Error> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| Error::Connect {
            path: path.to_owned(),
            source,
        })?;
        let socket = Socket::new(stream)?;
        let deadline = Instant::now() + options.timeout;
        let hello = Request::Hello {
            version: wire::VERSION,
            slots: options.slots.clamp(1, wire::MAX_SLOTS),
        };
        socket.send_all(&hello.encode(), deadline)?;
        let (kind, payload, tables_file) = socket.recv_frame(deadline)?;
        let welcome = match Reply::decode(kind, &payload)? {
            Reply::Welcome(w) => w,
            Reply::Error(code) => return Err(Error::Refused(code)),
            other => return Err(Error::Unexpected(format!("{other:?} to HELLO"))),
        };
        if welcome.version != wire::VERSION {
            return Err(Error::Unexpected(format!(
                "protocol version {} (this client speaks {})",
                welcome.version,
                wire::VERSION
            )));
        }
        let (kind, payload, slots_file) = socket.recv_frame(deadline)?;
        if Reply::decode(kind, &payload)? != Reply::Slots {
            return Err(Error::Unexpected("no slots after WELCOME".into()));
        }
        let tables_file =
            tables_file.ok_or_else(|| Error::Unexpected("WELCOME without the tables".into()))?;
        let slots_file =
            slots_file.ok_or_else(|| Error::Unexpected("SLOTS without the slots file".into()))?;
        let layout = welcome.layout;
        // A file the daemon could shrink under the mappings would raise SIGBUS here.
        for (file, what, bytes) in [
            (&tables_file, "tables", layout.file_bytes()),
            (&slots_file, "slots", wire::SLOTS_BYTES),
        ] {
            let seals = shm::seals(file.as_fd()).map_err(|e| Error::Tables(e.to_string()))?;
            if seals & shm::SEAL_SHRINK == 0 {
                return Err(Error::Tables(format!(
                    "the {what} file is not sealed against shrinking"
                )));
            }
            let size = shm::file_size(file.as_fd()).map_err(|e| Error::Tables(e.to_string()))?;
            if size < bytes {
                return Err(Error::Tables(format!(
                    "the {what} file has {size} bytes, not {bytes}"
                )));
            }
        }
        let map = |offset: u64, words: u64, access| {
            let words = usize::try_from(words).map_err(|_| Error::Tables("too large".into()))?;
            Words::map(tables_file.as_fd(), offset, words, access)
                .map_err(|e| Error::Tables(e.to_string()))
        };
        let ro = shm::Access::ReadOnly;
        let words = SharedWords {
            epoch: map(layout.epoch_offset, layout.epoch_words, ro)?,
            control: map(layout.control_offset, layout.control_words, ro)?,
            nodes: map(layout.nodes_offset, layout.nodes_words, ro)?,
        };
        let tables = RemoteTables::new(&layout, words, welcome.input_range)?;
        let slot_words = Words::map(
            slots_file.as_fd(),
            0,
            wire::SLOTS_BYTES as usize / 8,
            shm::Access::ReadWrite,
        )
        .map_err(|e| Error::Tables(e.to_string()))?;
        let slots =
            (welcome.slots as usize).min((slot_words.len() / wire::SLOT_STRIDE).saturating_sub(1));
        if slots == 0 {
            return Err(Error::Tables("no reader slot".into()));
        }
        let closed = Arc::new(AtomicBool::new(false));
        let watcher = socket::watch(socket.try_clone()?, closed.clone())?;
        log::debug!(
            "connected to {}: {slots} reader slots, stall bound {} ms",
            path.display(),
            welcome.stall_bound_ms
        );
        Ok(Master {
            conn: Arc::new(Connection {
                socket: Mutex::new(socket),
                tables,
                slot_words,
                pool: (0..slots).map(|_| Mutex::default()).collect(),
                closed,
                deferred: Mutex::new(Vec::new()),
                watcher,
                timeout: options.timeout,
                stall_bound: Duration::from_millis(u64::from(welcome.stall_bound_ms)),
                input_range: welcome.input_range,
                next_handle: AtomicU64::new(1),
                faults_reported: AtomicU64::new(0),
                faults_dropped: AtomicU64::new(0),
            }),
        })
    }

    fn endpoint(&self, request: Request, requester: Requester) -> Result<Endpoint, Error> {
        let id = match request {
            Request::Claim { endpoint, .. } | Request::UseDmaApi { endpoint } => endpoint,
            _ => unreachable!("only claims make endpoints"),
        };
        let grant = match self.conn.request(&request)? {
            Reply::Endpoint(grant) if grant.endpoint == id => grant,
            other => return Err(Error::Unexpected(format!("{other:?} to a claim"))),
        };
        Ok(Endpoint {
            conn: self.conn.clone(),
            ep: RemoteEndpoint::new(grant.endpoint, grant.group, grant.regions),
            requester,
            handle: self.conn.next_handle.fetch_add(1, Ordering::Relaxed),
            released: AtomicBool::new(false),
        })
    }

    /// Takes the endpoint's group exclusively under `cookie` (neither 0 nor `u64::MAX`): no
    /// other exclusive owner, no DMA-API user. The same cookie may claim several endpoints of
    /// a group. Refused with [`ErrorCode::Busy`] while another cookie holds the group.
    pub fn claim(&self, endpoint: EndpointId, cookie: u64) -> Result<Endpoint, Error> {
        self.endpoint(
            Request::Claim { endpoint, cookie },
            Requester::Owner(cookie),
        )
    }

    /// Uses the endpoint's group as a DMA-API user (shared, counted; refused while an
    /// exclusive owner holds it).
    pub fn use_dma_api(&self, endpoint: EndpointId) -> Result<Endpoint, Error> {
        self.endpoint(Request::UseDmaApi { endpoint }, Requester::DmaApi)
    }

    /// Whether the daemon cut this master off or hung up: every section is refused.
    pub fn is_revoked(&self) -> bool {
        self.conn.revoked()
    }

    /// How long the daemon waits for one section before it cuts the master off.
    pub fn stall_bound(&self) -> Duration {
        self.conn.stall_bound
    }

    /// Reader slots granted.
    pub fn slots(&self) -> usize {
        self.conn.pool.len()
    }

    /// The IOVAs the daemon translates, inclusive.
    pub fn input_range(&self) -> (u64, u64) {
        self.conn.input_range
    }

    pub fn stats(&self) -> Stats {
        Stats {
            faults_reported: self.conn.faults_reported.load(Ordering::Relaxed),
            faults_dropped: self.conn.faults_dropped.load(Ordering::Relaxed),
            translations: self.conn.counted(wire::SLOT_TRANSLATIONS),
            iotlb_misses: self.conn.counted(wire::SLOT_IOTLB_MISSES),
            refused: self.conn.counted(wire::SLOT_REFUSED),
        }
    }
}

/// An endpoint this master took DMA ownership of: translates its IOVAs. Implements
/// [`vm_memory::Iommu`]. Dropping it releases the ownership (so does the end of the
/// connection).
pub struct Endpoint {
    conn: Arc<Connection>,
    ep: RemoteEndpoint,
    requester: Requester,
    /// Tells this handle's IOTLB entries from another's in a shared slot.
    handle: u64,
    released: AtomicBool,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Endpoint")
            .field("id", &self.ep.id())
            .field("group", &self.ep.group())
            .field("requester", &self.requester)
            .finish()
    }
}

impl Endpoint {
    pub fn id(&self) -> EndpointId {
        self.ep.id()
    }

    /// The endpoint's group, as the daemon numbers them.
    pub fn group(&self) -> u32 {
        self.ep.group()
    }

    /// The endpoint's reserved regions (what PROBE tells the guest).
    pub fn reserved_regions(&self) -> &[ResvRegion] {
        self.ep.regions()
    }

    /// Whether translations are refused for good (released, cut off, disconnected).
    pub fn is_revoked(&self) -> bool {
        self.released.load(Ordering::Relaxed) || self.conn.revoked()
    }

    /// Enters a read-side critical section: translations made through it stay valid (the
    /// guest's UNMAP, DETACH, ATTACH elsewhere or reset is not answered) until it is dropped.
    /// Hold it across the DMA, not across blocking I/O (see the crate documentation).
    pub fn section(&self) -> Result<Section<'_>, Error> {
        if self.released.load(Ordering::Relaxed) {
            return Err(Error::Released);
        }
        let (slot, lease) = self.conn.lease()?;
        let (token, _) = self.conn.enter(slot)?;
        let view = self.conn.tables.endpoint(&self.ep, self.requester);
        Ok(Section {
            endpoint: self,
            slot,
            token,
            view,
            counts: Counts::default(),
            _lease: lease,
        })
    }

    /// Translates one access in a section of its own: the result is only guaranteed current
    /// at the time of the call. Use [`Endpoint::section`] to keep it valid during the DMA.
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Result<Translation, Error> {
        let section = self.section()?;
        Ok(section.translate(iova, len, access)?)
    }

    /// Gives the endpoint back to the daemon now (dropping it does the same, without the
    /// answer). From a thread that holds a section: [`Error::InSection`], and the release
    /// happens with the connection's next request or at its end.
    pub fn release(self) -> Result<(), Error> {
        self.release_now()
    }

    fn release_now(&self) -> Result<(), Error> {
        if self.released.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if in_section() {
            self.conn
                .deferred
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(self.ep.id());
            return Err(Error::InSection);
        }
        match self.conn.request(&Request::Release {
            endpoint: self.ep.id(),
        })? {
            Reply::Done => Ok(()),
            other => Err(Error::Unexpected(format!("{other:?} to RELEASE"))),
        }
    }

    fn report(&self, fault: Fault, iova: u64, access: Access) {
        self.conn.report(self.ep.id(), fault, iova, access);
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        if !self.conn.revoked() {
            if let Err(e) = self.release_now() {
                log::debug!("releasing endpoint {:#x}: {e}", self.ep.id());
            }
        }
    }
}

/// A read-side critical section of one [`Endpoint`] on this thread (see
/// [`Endpoint::section`]). The endpoint is resolved once (the owner check and the group's
/// domain); each translation is then the page walk alone.
pub struct Section<'a> {
    endpoint: &'a Endpoint,
    slot: usize,
    token: u64,
    view: Result<EndpointView<'a>, Fault>,
    /// Translations made in the section, published to the slot's counters when it ends.
    counts: Counts,
    /// The reader slot, held until after the section is left (fields drop after `drop`).
    _lease: MutexGuard<'a, SlotState>,
}

impl fmt::Debug for Section<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Section")
            .field("endpoint", &self.endpoint.id())
            .field("slot", &self.slot)
            .finish()
    }
}

impl Section<'_> {
    /// Translates the first bytes of `[iova, iova + len)`: the translation covers `len` bytes
    /// or fewer (up to the end of the page-table entry); ask again for the rest. A refusal the
    /// guest should see is reported to the daemon (a fault record on its event queue).
    #[inline]
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Result<Translation, Fault> {
        let result = match &self.view {
            Ok(view) => view.translate(iova, len, access),
            Err(fault) => Err(*fault),
        };
        self.counts.one();
        if let Err(fault) = result {
            self.counts.refused();
            self.endpoint.report(fault, iova, access);
        }
        result
    }

    /// Translates a scatter-gather list: `out[i]` is what [`Section::translate`] returns for
    /// `dmas[i]` (refusals reported alike). Returns how many were translated (as many as both
    /// slices hold).
    pub fn translate_batch(&self, dmas: &[Dma], out: &mut [Result<Translation, Fault>]) -> usize {
        let n = match &self.view {
            Ok(view) => view.translate_batch(dmas, out),
            Err(fault) => {
                let n = dmas.len().min(out.len());
                out[..n].fill(Err(*fault));
                n
            }
        };
        self.counts.add(n);
        for (dma, result) in dmas.iter().zip(out[..n].iter()) {
            if let Err(fault) = result {
                self.counts.refused();
                self.endpoint.report(*fault, dma.iova, dma.access);
            }
        }
        n
    }

    /// The endpoint's handle for this section, to keep in a local across many translations
    /// (a value the compiler can hold in registers, where [`Section::translate`] reads the
    /// section's copy each time). Refusals are reported alike.
    #[inline]
    pub fn handle(&self) -> Result<Handle<'_>, Fault> {
        self.view.map(|view| Handle {
            view,
            endpoint: self.endpoint,
            counts: &self.counts,
        })
    }

    /// Leaves the section, and says whether the master was cut off meanwhile
    /// ([`Error::Revoked`]): then the daemon stopped waiting for this section, and a DMA made
    /// through it may have raced an UNMAP the guest was already told about.
    pub fn finish(self) -> Result<(), Error> {
        let endpoint = self.endpoint;
        drop(self);
        if endpoint.conn.revoked() {
            Err(Error::Revoked)
        } else {
            Ok(())
        }
    }
}

/// An endpoint resolved in a [`Section`] (see [`Section::handle`]); valid while the section
/// lasts.
#[derive(Clone, Copy)]
pub struct Handle<'s> {
    view: EndpointView<'s>,
    endpoint: &'s Endpoint,
    counts: &'s Counts,
}

impl fmt::Debug for Handle<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle")
            .field("endpoint", &self.endpoint.id())
            .finish()
    }
}

impl Handle<'_> {
    /// As [`Section::translate`].
    #[inline]
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Result<Translation, Fault> {
        let result = self.view.translate(iova, len, access);
        self.counts.one();
        if let Err(fault) = result {
            self.counts.refused();
            self.endpoint.report(fault, iova, access);
        }
        result
    }
}

/// A section's translation counts, kept in the section (no shared write per translation).
#[derive(Debug, Default)]
struct Counts {
    translations: Cell<u64>,
    refused: Cell<u64>,
}

impl Counts {
    #[inline]
    fn one(&self) {
        self.add(1);
    }

    #[inline]
    fn add(&self, n: usize) {
        self.translations
            .set(self.translations.get().wrapping_add(n as u64));
    }

    #[cold]
    fn refused(&self) {
        self.refused.set(self.refused.get().wrapping_add(1));
    }
}

impl Drop for Section<'_> {
    #[inline]
    fn drop(&mut self) {
        let conn = &self.endpoint.conn;
        // The slot is still leased (the lease is a field, dropped after this).
        conn.count(
            self.slot,
            wire::SLOT_TRANSLATIONS,
            self.counts.translations.get(),
        );
        conn.count(self.slot, wire::SLOT_REFUSED, self.counts.refused.get());
        conn.leave(self.slot, self.token);
    }
}
