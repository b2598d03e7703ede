// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu model: endpoints, groups, domains, DMA owners and page tables.
//!
//! A pure state machine with no I/O. Two faces, after the Linux IOMMU core's DMA-ownership
//! API (use the DMA API, claim and release an owner with a cookie, replace a group's domain):
//!
//! - the **guest face** ([`Iommu::attach`], [`Iommu::detach`], [`Iommu::map`],
//!   [`Iommu::unmap`], [`Iommu::probe`]): what the guest driver programs, per the virtio spec;
//!   a group is attached as a whole and always translates through one domain;
//! - the **host face** ([`Iommu::use_dma_api`], [`Iommu::claim_dma_owner`], ...): who on the
//!   host may ask the fast path to translate for an endpoint.
//!
//! The fast path is [`Translator`]: any number of reader threads translate IOVAs without
//! taking a lock, while the single writer (`&mut Iommu`) changes the model. Every writer
//! operation that takes a translation away returns only after no reader can still return it
//! (the IOTLB-sync rule: a grace period of the model's epoch). A DMA master holds one [`ReadGuard`] across a DMA
//! and resolves its endpoint once ([`ReadGuard::endpoint`]); [`EndpointView::translate`] is
//! then the page walk alone, and [`EndpointView::translate_batch`] translates a whole
//! scatter-gather list with the walks' cache misses overlapped.
//!
//! Every operation returns `Result<_, Error>`; a refused operation changes nothing.
#![forbid(unsafe_code)]

mod epoch;
mod pagetable;
#[cfg(any(test, feature = "reference"))]
pub mod reference;
mod remote;
mod state;
mod topology;

use std::{
    cell::Cell,
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{fence, AtomicU64, Ordering},
        Arc,
    },
};

use shm::Words;
use thiserror::Error;

use crate::{
    epoch::{Readers, Slot},
    pagetable::{
        read, Arena, TableError, TableWriter, NODE_BYTES, PERM_MMIO, PERM_READ, PERM_WRITE,
    },
};
pub use crate::{
    epoch::{Remote, RemoteReaders},
    pagetable::Mapping,
    remote::{LayoutError, RemoteEndpoint, RemoteTables, SharedLayout, SharedWords},
    state::{Attachment, DomainState, GuestState, RestoreError},
    topology::{
        DomainId, EndpointId, EndpointInfo, GroupId, Limits, ResvKind, ResvRegion, Topology,
        TopologyBuilder, TopologyError, X86_MSI_REGION,
    },
};

/// The most page-table memory a model can hold, whatever [`Limits::max_table_bytes`] says.
pub const MAX_TABLE_BYTES: u64 = pagetable::MAX_NODES * pagetable::NODE_BYTES;

/// Why a guest or host operation was refused. Nothing changed.
///
/// The daemon maps these to virtio status codes in one place; the spec rule each one stands
/// for is cited.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Error {
    /// Spec A3, D2, P2: NOENT.
    #[error("endpoint {0:#x} does not exist")]
    UnknownEndpoint(EndpointId),
    /// ATTACH with a domain ID outside `domain_range`: RANGE.
    #[error("domain {0} is outside the domain range")]
    DomainOutOfRange(DomainId),
    /// Spec M4, U2: NOENT.
    #[error("domain {0} does not exist")]
    UnknownDomain(DomainId),
    /// Spec A5: the ATTACH bypass flag differs from the domain's kind: INVAL.
    #[error("domain {0} exists with the other kind (bypass flag mismatch)")]
    KindMismatch(DomainId),
    /// Spec A7: the endpoint's reserved regions collide with the domain's mappings: UNSUPP.
    #[error("endpoint {endpoint:#x} has reserved regions that domain {domain} maps")]
    Incompatible {
        domain: DomainId,
        endpoint: EndpointId,
    },
    /// Spec D3: the domain is absent or the endpoint is not attached to it: INVAL.
    #[error("endpoint {endpoint:#x} is not attached to domain {domain}")]
    NotAttached {
        domain: DomainId,
        endpoint: EndpointId,
    },
    /// Spec M5, U3: MAP or UNMAP on a bypass (identity) domain: INVAL.
    #[error("domain {0} is a bypass domain")]
    IdentityDomain(DomainId),
    /// `virt_end < virt_start`: INVAL.
    #[error("range end {end:#x} is below its start {start:#x}")]
    InvalidRange { start: u64, end: u64 },
    /// Spec M1: RANGE.
    #[error("range {start:#x}-{end:#x} or address {phys:#x} is not aligned to the granule")]
    Misaligned { start: u64, end: u64, phys: u64 },
    /// MAP outside `input_range`, or a physical end past 2^64: RANGE.
    #[error("range {start:#x}-{end:#x} is outside the input range")]
    OutOfRange { start: u64, end: u64 },
    /// Spec M2: INVAL.
    #[error("range {start:#x}-{end:#x} overlaps an existing mapping")]
    Overlap { start: u64, end: u64 },
    /// Spec R4: INVAL.
    #[error("range {start:#x}-{end:#x} overlaps a reserved region")]
    ReservedOverlap { start: u64, end: u64 },
    /// Spec U4: RANGE, and nothing removed.
    #[error("unmapping {start:#x}-{end:#x} would split a mapping")]
    WouldSplit { start: u64, end: u64 },
    /// NOMEM: `Limits::max_domains`.
    #[error("too many domains")]
    TooManyDomains,
    /// NOMEM: `Limits::max_mappings_per_domain` or `Limits::max_mappings`.
    #[error("too many mappings")]
    TooManyMappings,
    /// NOMEM: `Limits::max_table_bytes`.
    #[error("page-table memory exhausted")]
    OutOfTableMemory,
    /// Host face: the group has another exclusive owner (the kernel's -EBUSY).
    #[error("group {0:?} is owned by another DMA owner")]
    Busy(GroupId),
    /// Host face: DMA-API users block an exclusive claim (the kernel's -EPERM).
    #[error("group {0:?} has DMA-API users")]
    InUse(GroupId),
    /// Host face: an owner cookie must be neither 0 nor `u64::MAX` (the kernel's -EINVAL).
    #[error("invalid owner cookie")]
    InvalidOwner,
    /// Host face: release by a cookie that does not own the group.
    #[error("group {0:?} is not owned by this cookie")]
    NotOwner(GroupId),
    /// Host face: `unuse_dma_api` without a matching `use_dma_api`.
    #[error("group {0:?} has no DMA-API users")]
    NotInUse(GroupId),
    /// Host face: no such group.
    #[error("group {0:?} does not exist")]
    UnknownGroup(GroupId),
}

/// Why the fast path refused a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Host-side: no such endpoint. Not reported to the guest.
    UnknownEndpoint,
    /// Host-side: the requester does not own the endpoint's group. Not reported to the guest.
    NotOwner,
    /// The endpoint is not attached and not in bypass (fault reason DOMAIN).
    NoDomain,
    /// No mapping covers the address (fault reason MAPPING).
    Unmapped,
    /// The address is outside the input range (fault reason MAPPING).
    OutOfRange,
    /// The mapping does not allow this access, spec M6 (fault reason MAPPING).
    Permission,
    /// A bypassed access hit a reserved region, spec R5 (fault reason MAPPING).
    Reserved,
}

impl Fault {
    /// Whether the guest should see this fault on the event queue.
    pub fn guest_visible(self) -> bool {
        !matches!(self, Fault::UnknownEndpoint | Fault::NotOwner)
    }
}

/// The kind of a domain, fixed at creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DomainKind {
    /// Translates through page tables filled by MAP.
    Paging,
    /// Created by ATTACH with ATTACH_F_BYPASS: identity, MAP/UNMAP refused.
    Identity,
}

/// Who asks the fast path to translate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester {
    /// A shared user, after `use_dma_api` on the endpoint (the VMM's own devices).
    DmaApi,
    /// The exclusive owner that claimed the group with this cookie.
    Owner(u64),
}

/// Runs blocks replaced by MAPs (64 bytes each) that may wait for a grace period before the
/// model takes one.
const RETIRED_BLOCKS_BACKLOG: usize = 1024;

/// A new domain's tree covers IOVAs below 512 GiB (where the Linux DMA API puts them, below
/// 4 GiB first); a MAP above adds levels up to what the input range needs. A walk costs a load
/// per level.
const START_LEVELS: u32 = 3;

/// Owner cell values readers compare against.
const OWNER_NONE: u64 = 0;
const OWNER_DMA_API: u64 = u64::MAX;

impl Requester {
    /// The owner-cell value this requester may translate under; `OWNER_NONE` for a cookie
    /// that can never own a group (0, or the DMA-API marker), so it matches nothing.
    #[inline]
    fn token(self) -> u64 {
        match self {
            Requester::DmaApi => OWNER_DMA_API,
            Requester::Owner(OWNER_DMA_API) => OWNER_NONE,
            Requester::Owner(cookie) => cookie,
        }
    }
}

/// The access a DMA makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

bitflags::bitflags! {
    /// What a mapping allows: the MAP request's flags (virtio's `VIRTIO_IOMMU_MAP_F_*`, with
    /// the same bit values).
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
    pub struct Perms: u8 {
        /// Reads through the mapping.
        const READ = 1 << 0;
        /// Writes through the mapping.
        const WRITE = 1 << 1;
        /// The mapping is MMIO rather than RAM.
        const MMIO = 1 << 2;
    }
}

impl Perms {
    /// Read and write.
    pub const RW: Perms = Perms::READ.union(Perms::WRITE);

    /// Whether the mapping allows `access`.
    #[inline]
    pub fn allows(self, access: Access) -> bool {
        self.contains(match access {
            Access::Read => Perms::READ,
            Access::Write => Perms::WRITE,
        })
    }

    /// The leaf bits a page-table entry stores for these permissions (unknown bits dropped).
    #[inline(always)]
    pub(crate) const fn pte(self) -> u64 {
        (self.bits() as u64 & Perms::all().bits() as u64) << pagetable::PERM_SHIFT
    }

    /// The permissions of a page-table entry's leaf bits.
    #[inline(always)]
    pub(crate) const fn from_pte(entry: u64) -> Perms {
        Perms::from_bits_truncate(((entry & pagetable::PERM_MASK) >> pagetable::PERM_SHIFT) as u8)
    }
}

/// A successful translation of the first `len` bytes at the IOVA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub gpa: u64,
    /// Bytes from the IOVA that translate contiguously (at most the length asked for).
    pub len: u64,
    /// The domain that translated, None in bypass.
    pub domain: Option<DomainId>,
    /// The mapping is MMIO (MAP_F_MMIO).
    pub mmio: bool,
}

/// Group state as readers see it: `tag | levels << 2 | root << 5 | domain << 32` (the root
/// and the height of a paging domain's tree).
const STATE_UNATTACHED: u64 = 0;
const STATE_IDENTITY: u64 = 1;
const STATE_PAGING: u64 = 2;

fn encode_state(domain: DomainId, kind: DomainKind, root: u32, levels: u32) -> u64 {
    let tag = match kind {
        DomainKind::Paging => STATE_PAGING,
        DomainKind::Identity => STATE_IDENTITY,
    };
    debug_assert!(levels < 8 && u64::from(root) < pagetable::MAX_NODES);
    tag | (u64::from(levels) << 2) | (u64::from(root) << 5) | (u64::from(domain) << 32)
}

/// Words of the control area readers read: the `bypass` flag (0 or 1) on a line of its own,
/// then two words per group from [`CONTROL_GROUPS`]: the group's state and its owner cell.
const CONTROL_BYPASS: usize = 0;
const CONTROL_GROUPS: usize = 16;

/// Words the control area needs for `groups` groups.
pub(crate) fn control_words(groups: usize) -> usize {
    CONTROL_GROUPS + 2 * groups
}

/// An endpoint as readers see it.
#[derive(Debug)]
pub(crate) struct EndpointCell {
    pub(crate) group: u32,
    pub(crate) regions: Box<[ResvRegion]>,
}

/// Endpoint ID to cell: a dense table for small IDs (PCI requester IDs: one load), else a
/// sorted list (a binary search).
#[derive(Debug)]
enum EndpointIndex {
    /// The position in `Shared::endpoints` of every ID up to the largest, [`NO_ENDPOINT`] for
    /// IDs in the gaps.
    Dense(Box<[u32]>),
    Sorted(Box<[EndpointId]>),
}

/// A dense index takes the endpoint IDs below this: a table of at most 256 KiB.
const DENSE_LIMIT: EndpointId = 0x1_0000;

/// The dense index's entry for an ID without an endpoint: never a position (a dense index
/// holds at most `DENSE_LIMIT` endpoints), so looking it up in `Shared::endpoints` finds
/// nothing.
const NO_ENDPOINT: u32 = u32::MAX;

/// What readers read: the page tables and the control area (bypass flag, group cells). In this
/// process's memory, or in a file shared with DMA masters, which map it read-only and read it
/// through this very type ([`remote::RemoteTables`]).
#[derive(Debug)]
pub(crate) struct Tables {
    arena: Arena,
    control: Words,
    input_start: u64,
    /// `input_end - input_start`: one compare checks the range.
    input_span: u64,
}

/// State shared by the writer and all readers of this process.
#[derive(Debug)]
struct Shared {
    tables: Tables,
    readers: Readers,
    endpoints: Box<[EndpointCell]>,
    index: EndpointIndex,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("capacity", &self.capacity())
            .finish()
    }
}

impl Tables {
    /// Tables over `control` (at least [`control_words`] words for `groups`) and `arena`, for
    /// IOVAs in `input_range`.
    fn new(
        arena: Arena,
        control: Words,
        groups: usize,
        (input_start, input_end): (u64, u64),
    ) -> Option<Tables> {
        if control.len() < control_words(groups) || input_end < input_start {
            return None;
        }
        Some(Tables {
            arena,
            control,
            input_start,
            input_span: input_end - input_start,
        })
    }

    /// Whether `iova` is in the input range (one compare).
    #[inline(always)]
    fn in_range(&self, iova: u64) -> bool {
        iova.wrapping_sub(self.input_start) <= self.input_span
    }

    /// A group's state and owner cell.
    #[inline(always)]
    fn group(&self, group: u32) -> Option<&[AtomicU64; 2]> {
        let at = CONTROL_GROUPS + 2 * group as usize;
        self.control.get(at..at + 2)?.try_into().ok()
    }

    /// The `bypass` flag (a reader's load).
    #[inline(always)]
    fn bypass(&self) -> bool {
        self.control
            .get(CONTROL_BYPASS)
            .is_some_and(|b| read(b) != 0)
    }

    /// The owner check and the group's state for an endpoint: its handle. Only valid inside a
    /// read-side critical section.
    #[inline(always)]
    fn view<'a>(
        &'a self,
        ep: &'a EndpointCell,
        requester: Requester,
    ) -> Result<EndpointView<'a>, Fault> {
        let cell = self.group(ep.group).ok_or(Fault::UnknownEndpoint)?;
        // Relaxed loads and a fence: the words may be mapped read-only (see `pagetable::read`).
        let owner = cell[1].load(Ordering::Relaxed);
        let state = cell[0].load(Ordering::Relaxed);
        fence(Ordering::Acquire);
        let token = requester.token();
        if token == OWNER_NONE || owner != token {
            return Err(Fault::NotOwner);
        }
        Ok(EndpointView {
            tables: self,
            ep,
            state,
        })
    }
}

impl Shared {
    /// The owner check and the group's state: an endpoint handle. Only valid inside a
    /// read-side critical section.
    #[inline(always)]
    fn resolve(
        &self,
        requester: Requester,
        endpoint: EndpointId,
    ) -> Result<EndpointView<'_>, Fault> {
        let ep = self.endpoint(endpoint).ok_or(Fault::UnknownEndpoint)?;
        self.tables.view(ep, requester)
    }

    #[inline]
    fn endpoint(&self, id: EndpointId) -> Option<&EndpointCell> {
        let position = match &self.index {
            EndpointIndex::Dense(table) => *table.get(id as usize)? as usize,
            EndpointIndex::Sorted(ids) => ids.binary_search(&id).ok()?,
        };
        self.endpoints.get(position)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum OwnerState {
    None,
    /// `use_dma_api` users, counted.
    DmaApi(u32),
    /// An exclusive owner and how many claims it holds.
    User {
        cookie: u64,
        count: u32,
    },
}

#[derive(Debug)]
struct GroupState {
    domain: Option<DomainId>,
    /// Endpoints of the group the guest has attached (DETACH uncounts them).
    attached: BTreeSet<EndpointId>,
    owner: OwnerState,
}

#[derive(Debug)]
struct Domain {
    kind: DomainKind,
    /// Page-table root; None for identity domains.
    root: Option<u32>,
    groups: BTreeSet<GroupId>,
    mappings: u64,
    /// MAP and UNMAP requests applied to the domain (for the host's statistics).
    maps: u64,
    unmaps: u64,
    /// Reserved regions of every endpoint of the groups on the domain (spec R4), kept up to
    /// date as groups come and go so that MAP checks a short list.
    reserved: Vec<(u64, u64)>,
}

/// A domain as [`Iommu::domains`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainInfo {
    pub id: DomainId,
    pub kind: DomainKind,
    pub groups: Vec<GroupId>,
    /// Endpoints the guest attached, over all groups on the domain.
    pub endpoints: Vec<EndpointId>,
    pub mappings: u64,
    /// MAP and UNMAP requests applied to the domain since it was created (statistics, not
    /// part of the guest's state: a restore counts one MAP per mapping it restores).
    pub maps: u64,
    pub unmaps: u64,
}

impl DomainInfo {
    /// The domain without its request counters (to compare a restored model's with another's).
    pub fn without_counters(&self) -> DomainInfo {
        DomainInfo {
            maps: 0,
            unmaps: 0,
            ..self.clone()
        }
    }
}

/// Counters of the model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelStats {
    pub domains: u64,
    pub mappings: u64,
    pub table_bytes: u64,
    pub grace_periods: u64,
    pub grace_wait_max_ns: u64,
}

/// The device model (the writer). See the crate documentation.
#[derive(Debug)]
pub struct Iommu {
    topo: Arc<Topology>,
    shared: Arc<Shared>,
    table: TableWriter,
    groups: Vec<GroupState>,
    domains: BTreeMap<DomainId, Domain>,
    mappings: u64,
    grace_periods: u64,
    grace_wait_max_ns: u64,
    /// Inside [`Iommu::begin_batch`]: guest-face updates defer their grace period.
    batch: bool,
    sync_pending: bool,
}

impl Iommu {
    /// A model with every group unattached and `bypass` off.
    ///
    /// # Panics
    /// When the host refuses the page tables' address space; see [`Iommu::try_new`].
    pub fn new(topology: Topology) -> Self {
        Self::try_new(topology).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Iommu::new`], or an error when the host will not reserve the address space of
    /// `Limits::max_table_bytes` (reserved up front, committed only as tables fill).
    pub fn try_new(topology: Topology) -> Result<Self, TopologyError> {
        let limits = topology.limits();
        let nodes = limits.max_table_bytes / NODE_BYTES;
        let no_memory = |_| TopologyError::TableMemory(limits.max_table_bytes);
        let words = SharedWords {
            epoch: Words::anonymous(1).map_err(no_memory)?,
            control: Words::anonymous(control_words(topology.group_count())).map_err(no_memory)?,
            nodes: Words::anonymous(
                nodes.clamp(1, pagetable::MAX_NODES) as usize * pagetable::FANOUT,
            )
            .map_err(no_memory)?,
        };
        Self::try_new_in(topology, words)
    }

    /// A model whose readers' words live in `words` (zeroed, sized as
    /// [`SharedLayout::for_topology`] says): mappings of a file the daemon shares with DMA
    /// masters in other processes, which map it read-only ([`remote::RemoteTables`]).
    pub fn try_new_in(topology: Topology, words: SharedWords) -> Result<Self, TopologyError> {
        let (input_start, input_end) = topology.input_range();
        let levels = pagetable::levels_for(input_end);
        let limits = topology.limits();
        let too_small = || TopologyError::TableMemory(limits.max_table_bytes);
        let arena = Arena::in_words(words.nodes).ok_or_else(too_small)?;
        let readers = Readers::new(words.epoch).ok_or_else(too_small)?;
        let tables = Tables::new(
            arena,
            words.control,
            topology.group_count(),
            (input_start, input_end),
        )
        .ok_or_else(too_small)?;
        let mut ids = Vec::new();
        let endpoints = topology
            .endpoints()
            .map(|(id, info)| {
                ids.push(id);
                EndpointCell {
                    group: info.group.0,
                    regions: info.regions.clone().into_boxed_slice(),
                }
            })
            .collect();
        let index = match ids.last() {
            Some(&max) if max < DENSE_LIMIT => {
                let mut table = vec![NO_ENDPOINT; max as usize + 1];
                for (position, id) in ids.iter().enumerate() {
                    table[*id as usize] = position as u32;
                }
                EndpointIndex::Dense(table.into_boxed_slice())
            }
            _ => EndpointIndex::Sorted(ids.into_boxed_slice()),
        };
        let shared = Arc::new(Shared {
            tables,
            readers,
            endpoints,
            index,
        });
        let groups = (0..topology.group_count())
            .map(|_| GroupState {
                domain: None,
                attached: BTreeSet::new(),
                owner: OwnerState::None,
            })
            .collect();
        Ok(Iommu {
            topo: Arc::new(topology),
            shared,
            table: TableWriter::new(levels).with_start_levels(START_LEVELS),
            groups,
            domains: BTreeMap::new(),
            mappings: 0,
            grace_periods: 0,
            grace_wait_max_ns: 0,
            batch: false,
            sync_pending: false,
        })
    }

    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// A fast-path handle for one reader thread.
    pub fn translator(&self) -> Translator {
        Translator::new(self.shared.clone())
    }

    /// Makes translators without the model, for threads that must not wait for the writer
    /// (the model's lock is held across grace periods).
    pub fn translator_source(&self) -> TranslatorSource {
        TranslatorSource {
            shared: self.shared.clone(),
        }
    }

    fn group_of(&self, endpoint: EndpointId) -> Result<GroupId, Error> {
        self.topo
            .endpoint(endpoint)
            .map(|info| info.group)
            .ok_or(Error::UnknownEndpoint(endpoint))
    }

    /// The group an endpoint belongs to.
    pub fn group(&self, endpoint: EndpointId) -> Result<GroupId, Error> {
        self.group_of(endpoint)
    }

    /// The domain a group is attached to, and the endpoints the guest attached.
    pub fn group_attachment(&self, group: GroupId) -> Option<(Option<DomainId>, Vec<EndpointId>)> {
        self.groups
            .get(group.0 as usize)
            .map(|g| (g.domain, g.attached.iter().copied().collect()))
    }

    /// Waits out readers that may hold the state just replaced, then recycles retired nodes.
    fn synchronize(&mut self) {
        let waited = self.shared.readers.synchronize();
        self.grace_periods += 1;
        self.grace_wait_max_ns = self.grace_wait_max_ns.max(waited.as_nanos() as u64);
        self.table.reclaim(&self.shared.tables.arena);
        self.sync_pending = false;
    }

    /// The grace period of a guest-face update: now, or at the end of the current batch.
    fn guest_sync(&mut self) {
        if self.batch {
            self.sync_pending = true;
        } else {
            self.synchronize();
        }
    }

    /// Starts a batch of guest requests: their updates share one grace period, taken by
    /// [`Iommu::end_batch`]. Until then a translation they took away may still be returned, so
    /// the device must not report any of them complete before `end_batch` returns.
    pub fn begin_batch(&mut self) {
        self.batch = true;
    }

    /// Ends a batch: returns once no reader can return what the batch's requests removed.
    pub fn end_batch(&mut self) {
        self.batch = false;
        if self.sync_pending {
            self.synchronize();
        }
    }

    fn publish_group(&self, group: GroupId) {
        let state = match self.groups[group.0 as usize].domain {
            None => STATE_UNATTACHED,
            Some(id) => {
                let d = &self.domains[&id];
                let root = d.root.unwrap_or(0);
                encode_state(id, d.kind, root, self.table.height(root))
            }
        };
        if let Some(cell) = self.shared.tables.group(group.0) {
            cell[0].store(state, Ordering::Release);
        }
    }

    // ---- guest face ----------------------------------------------------------------------

    /// ATTACH: attaches `endpoint`, and with it its whole group, to `domain` (created on first
    /// use).
    ///
    /// The kernel's two attach paths are one here, because a group always moves as a whole
    /// (`Iommu::replace_group_domain`):
    /// - `iommu_attach_device`: a singleton group, one endpoint to one domain;
    /// - `iommu_attach_device_shared`: a multi-endpoint group (endpoints the platform cannot
    ///   isolate from each other): N endpoints share one domain. The first ATTACH moves the
    ///   whole group; the guest's ATTACHes for the other endpoints of the group to the same
    ///   domain only count them (the `attach_device_shared` branch of
    ///   `replace_group_domain`).
    pub fn attach(
        &mut self,
        domain: DomainId,
        endpoint: EndpointId,
        kind: DomainKind,
    ) -> Result<(), Error> {
        let group = self.group_of(endpoint)?;
        let (first, last) = self.topo.domain_range();
        if domain < first || domain > last {
            return Err(Error::DomainOutOfRange(domain));
        }
        self.replace_group_domain(group, domain, endpoint, kind)
    }

    /// `iommu_replace_group_domain`: the group moves to `domain` in one store that every
    /// endpoint of the group reads, so no DMA sees an empty or stale table, and the endpoints
    /// of a group never translate through different domains. Spec A6: an endpoint attached
    /// elsewhere behaves as DETACH then ATTACH, without the window.
    fn replace_group_domain(
        &mut self,
        group: GroupId,
        domain: DomainId,
        endpoint: EndpointId,
        kind: DomainKind,
    ) -> Result<(), Error> {
        let gi = group.0 as usize;
        if self.groups[gi].domain == Some(domain) {
            // attach_device_shared: another endpoint of a group already on `domain` joins the
            // count (for a singleton group, a repeated ATTACH); nothing moves.
            if self.domains[&domain].kind != kind {
                return Err(Error::KindMismatch(domain));
            }
            self.groups[gi].attached.insert(endpoint);
            return Ok(());
        }
        let root = match self.domains.get(&domain) {
            Some(d) if d.kind != kind => return Err(Error::KindMismatch(domain)),
            Some(d) => {
                self.check_compatible(domain, d, group)?;
                None
            }
            None => {
                // The group's current domain dies with the move if no other group uses it: it
                // does not count against the cap (a guest at the cap can still switch).
                let dying = self.groups[gi]
                    .domain
                    .is_some_and(|old| self.domains[&old].groups.len() == 1);
                if self.domains.len() - usize::from(dying)
                    >= self.topo.limits().max_domains as usize
                {
                    return Err(Error::TooManyDomains);
                }
                match kind {
                    DomainKind::Paging => Some(
                        self.table
                            .new_root(&self.shared.tables.arena)
                            .ok_or(Error::OutOfTableMemory)?,
                    ),
                    DomainKind::Identity => None,
                }
            }
        };
        if let Some(root) = root {
            self.domains.insert(
                domain,
                Domain {
                    kind,
                    root: Some(root),
                    groups: BTreeSet::new(),
                    mappings: 0,
                    maps: 0,
                    unmaps: 0,
                    reserved: Vec::new(),
                },
            );
        } else {
            self.domains.entry(domain).or_insert(Domain {
                kind,
                root: None,
                groups: BTreeSet::new(),
                mappings: 0,
                maps: 0,
                unmaps: 0,
                reserved: Vec::new(),
            });
        }
        let reserved = self.group_reserved(group);
        if let Some(d) = self.domains.get_mut(&domain) {
            d.groups.insert(group);
            d.reserved.extend(reserved);
        }
        let old = self.groups[gi].domain.replace(domain);
        self.groups[gi].attached.insert(endpoint);
        self.publish_group(group);
        if let Some(old) = old {
            self.leave_domain(old, group);
        }
        self.guest_sync();
        Ok(())
    }

    /// Reserved regions of every endpoint of a group.
    fn group_reserved(&self, group: GroupId) -> Vec<(u64, u64)> {
        self.topo
            .group_members(group)
            .iter()
            .filter_map(|e| self.topo.endpoint(*e))
            .flat_map(|info| info.regions.iter().map(|r| (r.start, r.end)))
            .collect()
    }

    /// Spec A7: a domain that maps addresses reserved for an endpoint of the group cannot take
    /// the group.
    fn check_compatible(&self, domain: DomainId, d: &Domain, group: GroupId) -> Result<(), Error> {
        let Some(root) = d.root else { return Ok(()) };
        for &endpoint in self.topo.group_members(group) {
            let regions = self.topo.endpoint(endpoint).map_or(&[][..], |e| &e.regions);
            for r in regions {
                if self
                    .table
                    .any_mapped(&self.shared.tables.arena, root, r.start, r.end)
                {
                    return Err(Error::Incompatible { domain, endpoint });
                }
            }
        }
        Ok(())
    }

    /// The group left `domain`; the domain dies with its last group (spec: domain lifetime).
    /// The caller synchronizes readers before anything retired here is reused.
    fn leave_domain(&mut self, domain: DomainId, group: GroupId) {
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.groups.remove(&group);
        let remaining: Vec<GroupId> = d.groups.iter().copied().collect();
        let reserved = remaining
            .into_iter()
            .flat_map(|g| self.group_reserved(g))
            .collect();
        let Some(d) = self.domains.get_mut(&domain) else {
            return;
        };
        d.reserved = reserved;
        if d.groups.is_empty() {
            if let Some(d) = self.domains.remove(&domain) {
                self.mappings -= d.mappings;
                if let Some(root) = d.root {
                    self.table.retire_tree(&self.shared.tables.arena, root);
                }
            }
        }
    }

    /// DETACH: uncounts `endpoint`; when the guest has detached every endpoint of the group,
    /// the group returns to its core state (blocked, or bypass when `bypass` is set) and spec
    /// D4 holds: it reaches none of the domain's mappings once this returns.
    pub fn detach(&mut self, domain: DomainId, endpoint: EndpointId) -> Result<(), Error> {
        let group = self.group_of(endpoint)?;
        let gi = group.0 as usize;
        let g = &mut self.groups[gi];
        if g.domain != Some(domain) || !g.attached.contains(&endpoint) {
            return Err(Error::NotAttached { domain, endpoint });
        }
        g.attached.remove(&endpoint);
        if g.attached.is_empty() {
            g.domain = None;
            self.publish_group(group);
            self.leave_domain(domain, group);
            self.guest_sync();
        }
        Ok(())
    }

    fn paging_root(&self, domain: DomainId) -> Result<(u32, &Domain), Error> {
        let d = self
            .domains
            .get(&domain)
            .ok_or(Error::UnknownDomain(domain))?;
        match d.root {
            Some(root) => Ok((root, d)),
            None => Err(Error::IdentityDomain(domain)),
        }
    }

    /// MAP `[virt_start, virt_end]` to `phys_start` with `perms` (bits outside
    /// [`Perms::all`] are ignored).
    pub fn map(
        &mut self,
        domain: DomainId,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        perms: Perms,
    ) -> Result<(), Error> {
        let (root, d) = self.paging_root(domain)?;
        let (start, end) = (virt_start, virt_end);
        if end < start {
            return Err(Error::InvalidRange { start, end });
        }
        let mask = self.topo.granule() - 1;
        if start & mask != 0 || phys_start & mask != 0 || end & mask != mask {
            return Err(Error::Misaligned {
                start,
                end,
                phys: phys_start,
            });
        }
        let (first, last) = self.topo.input_range();
        if start < first || end > last || phys_start.checked_add(end - start).is_none() {
            return Err(Error::OutOfRange { start, end });
        }
        if d.reserved.iter().any(|&(s, e)| s <= end && start <= e) {
            return Err(Error::ReservedOverlap { start, end });
        }
        // A tree too low for the mapping grows first; readers see the new root only once the
        // mapping is in (until then they walk the old tree, which stays part of the new one).
        let in_domain = d.mappings;
        let mapping = Mapping {
            virt_start: start,
            virt_end: end,
            phys_start,
            perms: perms & Perms::all(),
        };
        // Checked here first: MAP is the request loop's common case, and the closure and the
        // retry wrapper cost a few ns even when nothing grows.
        let top = if self.table.covers(root, end) {
            root
        } else {
            self.table_update(|table, arena| table.grow(arena, root, end))?
        };
        let result = self.map_into(domain, in_domain, top, mapping);
        if top != root {
            match result {
                Ok(()) => {
                    let groups = match self.domains.get_mut(&domain) {
                        Some(d) => {
                            d.root = Some(top);
                            d.groups.iter().copied().collect()
                        }
                        None => Vec::new(),
                    };
                    for group in groups {
                        self.publish_group(group);
                    }
                }
                Err(_) => self.table.ungrow(&self.shared.tables.arena, top, root),
            }
        }
        result
    }

    /// Runs a page-table update that allocates; when nodes are short and some wait for a grace
    /// period (retired earlier in a batch), takes one and tries once more.
    fn table_update<T>(
        &mut self,
        update: impl Fn(&mut TableWriter, &Arena) -> Result<T, TableError>,
    ) -> Result<T, Error> {
        match update(&mut self.table, &self.shared.tables.arena) {
            Ok(done) => Ok(done),
            Err(_) if self.table.has_retired() => {
                self.synchronize();
                update(&mut self.table, &self.shared.tables.arena)
                    .map_err(|_| Error::OutOfTableMemory)
            }
            Err(_) => Err(Error::OutOfTableMemory),
        }
    }

    /// The part of [`Iommu::map`] after the argument checks, into the tree at `root` (which
    /// reaches the mapping) of `domain`, which holds `in_domain` mappings.
    fn map_into(
        &mut self,
        domain: DomainId,
        in_domain: u64,
        root: u32,
        mapping: Mapping,
    ) -> Result<(), Error> {
        let (start, end) = (mapping.virt_start, mapping.virt_end);
        let arena = &self.shared.tables.arena;
        // The common case (a 4 KiB page) walks once to check and once to insert.
        let page = end - start == pagetable::PAGE_MASK;
        let page_nodes = if page {
            let free = self.table.page_free(arena, root, start);
            Some(free.ok_or(Error::Overlap { start, end })?)
        } else {
            if self.table.any_mapped(arena, root, start, end) {
                return Err(Error::Overlap { start, end });
            }
            None
        };
        let limits = self.topo.limits();
        if in_domain >= limits.max_mappings_per_domain || self.mappings >= limits.max_mappings {
            return Err(Error::TooManyMappings);
        }
        self.table_update(|table, arena| match page_nodes {
            Some(nodes) => {
                let (phys, perms) = (mapping.phys_start, mapping.perms);
                table.map_page(arena, root, start, phys, perms, nodes)
            }
            None => table.map(arena, root, mapping),
        })?;
        self.mappings += 1;
        if let Some(d) = self.domains.get_mut(&domain) {
            d.mappings += 1;
            d.maps += 1;
        }
        // Blocks a MAP replaced wait for a grace period; MAPs alone never take one.
        if self.table.retired_blocks() >= RETIRED_BLOCKS_BACKLOG {
            self.guest_sync();
        }
        Ok(())
    }

    /// UNMAP every mapping inside `[virt_start, virt_end]`; returns how many were removed.
    /// Spec U4: a range that would split a mapping removes nothing. Returns only once no
    /// reader can still translate through a removed mapping.
    pub fn unmap(
        &mut self,
        domain: DomainId,
        virt_start: u64,
        virt_end: u64,
    ) -> Result<u64, Error> {
        let (root, _) = self.paging_root(domain)?;
        let (start, end) = (virt_start, virt_end);
        if end < start {
            return Err(Error::InvalidRange { start, end });
        }
        let arena = &self.shared.tables.arena;
        let removed = if start & pagetable::PAGE_MASK == 0 && end - start == pagetable::PAGE_MASK {
            self.table.unmap_page(arena, root, start)
        } else {
            self.table.unmap(arena, root, start, end)
        };
        let removed = removed.map_err(|e| match e {
            TableError::WouldSplit => Error::WouldSplit { start, end },
            TableError::NoMemory => Error::OutOfTableMemory,
        })?;
        if let Some(d) = self.domains.get_mut(&domain) {
            d.mappings -= removed;
            d.unmaps += 1;
        }
        if removed > 0 {
            self.mappings -= removed;
            self.guest_sync();
        } else if self.table.has_retired() {
            self.guest_sync();
        }
        Ok(removed)
    }

    /// PROBE: the endpoint's reserved regions.
    pub fn probe(&self, endpoint: EndpointId) -> Result<&[ResvRegion], Error> {
        self.topo
            .endpoint(endpoint)
            .map(|e| e.regions.as_slice())
            .ok_or(Error::UnknownEndpoint(endpoint))
    }

    /// Device reset: every group unattached, every domain and mapping gone. `bypass` and the
    /// host face (DMA owners) survive (spec C2).
    pub fn reset(&mut self) {
        for g in &mut self.groups {
            g.domain = None;
            g.attached.clear();
        }
        for group in 0..self.groups.len() as u32 {
            if let Some(cell) = self.shared.tables.group(group) {
                cell[0].store(STATE_UNATTACHED, Ordering::Release);
            }
        }
        for (_, d) in std::mem::take(&mut self.domains) {
            if let Some(root) = d.root {
                self.table.retire_tree(&self.shared.tables.arena, root);
            }
        }
        self.mappings = 0;
        self.synchronize();
    }

    /// Sets the config-space `bypass` state: whether unattached endpoints bypass.
    pub fn set_bypass(&mut self, bypass: bool) {
        let old = self.shared.tables.control[CONTROL_BYPASS]
            .swap(u64::from(bypass), Ordering::AcqRel)
            != 0;
        if old && !bypass {
            self.synchronize();
        }
    }

    pub fn bypass(&self) -> bool {
        self.shared.tables.bypass()
    }

    /// The mappings of a paging domain, in IOVA order.
    pub fn mappings(&self, domain: DomainId) -> Result<Vec<Mapping>, Error> {
        let (root, _) = self.paging_root(domain)?;
        Ok(self.table.mappings(&self.shared.tables.arena, root))
    }

    /// Every live domain.
    pub fn domains(&self) -> Vec<DomainInfo> {
        self.domains
            .iter()
            .map(|(&id, d)| {
                let mut endpoints: Vec<EndpointId> = d
                    .groups
                    .iter()
                    .flat_map(|g| self.groups[g.0 as usize].attached.iter().copied())
                    .collect();
                endpoints.sort_unstable();
                DomainInfo {
                    id,
                    kind: d.kind,
                    groups: d.groups.iter().copied().collect(),
                    endpoints,
                    mappings: d.mappings,
                    maps: d.maps,
                    unmaps: d.unmaps,
                }
            })
            .collect()
    }

    /// The page-table memory's address range (start, bytes): reserved once, committed as
    /// nodes are first written. The daemon asks for transparent huge pages on it, so that
    /// random translations over large tables miss the TLB less.
    pub fn table_memory(&self) -> (usize, usize) {
        self.shared.tables.arena.address_range()
    }

    pub fn stats(&self) -> ModelStats {
        ModelStats {
            domains: self.domains.len() as u64,
            mappings: self.mappings,
            table_bytes: self.table.nodes_in_use() * NODE_BYTES,
            grace_periods: self.grace_periods,
            grace_wait_max_ns: self.grace_wait_max_ns,
        }
    }

    // ---- host face -----------------------------------------------------------------------

    fn group_state(&mut self, group: GroupId) -> Result<&mut GroupState, Error> {
        self.groups
            .get_mut(group.0 as usize)
            .ok_or(Error::UnknownGroup(group))
    }

    fn publish_owner(&self, group: GroupId, value: u64) {
        if let Some(cell) = self.shared.tables.group(group.0) {
            cell[1].store(value, Ordering::Release);
        }
    }

    /// `iommu_device_use_default_domain`: a shared DMA-API user of the endpoint's group
    /// (counted, no cookie). Refused while an exclusive owner holds the group.
    pub fn use_dma_api(&mut self, endpoint: EndpointId) -> Result<(), Error> {
        let group = self.group_of(endpoint)?;
        let g = self.group_state(group)?;
        g.owner = match g.owner {
            OwnerState::User { .. } => return Err(Error::Busy(group)),
            OwnerState::None => OwnerState::DmaApi(1),
            OwnerState::DmaApi(n) => OwnerState::DmaApi(n.saturating_add(1)),
        };
        self.publish_owner(group, OWNER_DMA_API);
        Ok(())
    }

    /// `iommu_device_unuse_default_domain`.
    pub fn unuse_dma_api(&mut self, endpoint: EndpointId) -> Result<(), Error> {
        let group = self.group_of(endpoint)?;
        let g = self.group_state(group)?;
        match g.owner {
            OwnerState::DmaApi(1) => {
                g.owner = OwnerState::None;
                self.publish_owner(group, OWNER_NONE);
                self.synchronize();
            }
            OwnerState::DmaApi(n) => g.owner = OwnerState::DmaApi(n - 1),
            _ => return Err(Error::NotInUse(group)),
        }
        Ok(())
    }

    /// `iommu_group_claim_dma_owner`: one exclusive owner, named by a cookie. The same cookie
    /// may claim again (counted, as `iommu_device_claim_dma_owner` for several devices).
    pub fn claim_dma_owner(&mut self, group: GroupId, cookie: u64) -> Result<(), Error> {
        if cookie == OWNER_NONE || cookie == OWNER_DMA_API {
            return Err(Error::InvalidOwner);
        }
        let g = self.group_state(group)?;
        g.owner = match g.owner {
            OwnerState::None => OwnerState::User { cookie, count: 1 },
            OwnerState::User { cookie: c, count } if c == cookie => OwnerState::User {
                cookie,
                count: count.saturating_add(1),
            },
            OwnerState::User { .. } => return Err(Error::Busy(group)),
            OwnerState::DmaApi(_) => return Err(Error::InUse(group)),
        };
        self.publish_owner(group, cookie);
        Ok(())
    }

    /// `iommu_group_release_dma_owner`: once the last claim is released, the cookie can no
    /// longer translate for the group (after in-flight translations finish).
    pub fn release_dma_owner(&mut self, group: GroupId, cookie: u64) -> Result<(), Error> {
        let g = self.group_state(group)?;
        match g.owner {
            OwnerState::User { cookie: c, count } if c == cookie => {
                if count > 1 {
                    g.owner = OwnerState::User {
                        cookie,
                        count: count - 1,
                    };
                } else {
                    g.owner = OwnerState::None;
                    self.publish_owner(group, OWNER_NONE);
                    self.synchronize();
                }
                Ok(())
            }
            _ => Err(Error::NotOwner(group)),
        }
    }

    /// The cookie owning a group exclusively, if any.
    pub fn dma_owner(&self, group: GroupId) -> Option<u64> {
        match self.groups.get(group.0 as usize)?.owner {
            OwnerState::User { cookie, .. } => Some(cookie),
            _ => None,
        }
    }
}

/// The fast path: translates IOVAs for one reader thread, without locks.
///
/// Each translator has its own read-side slot; it is `Send` but not `Sync` (move it to the
/// thread that uses it, or clone one per thread). Cloning registers a new slot.
///
/// Nothing a reader does waits for the writer: translating, entering and leaving sections,
/// cloning and dropping translators are free to happen inside a section a grace period waits
/// for. Dropping a translator ends its open section, if a guard was leaked
/// (`std::mem::forget`); until then a leaked guard is a section that never ends, and grace
/// periods wait for it.
#[derive(Debug)]
pub struct Translator {
    shared: Arc<Shared>,
    slot: Arc<Slot>,
    depth: Cell<u32>,
    /// The epoch the outermost open section entered at.
    entered: Cell<u64>,
}

/// Makes [`Translator`]s for one model without access to it: a DMA master holding one never
/// waits for the writer to get a translator (see [`Iommu::translator_source`]).
#[derive(Clone, Debug)]
pub struct TranslatorSource {
    shared: Arc<Shared>,
}

impl TranslatorSource {
    /// A fast-path handle for one reader thread, as [`Iommu::translator`].
    pub fn translator(&self) -> Translator {
        Translator::new(self.shared.clone())
    }

    /// Attaches a DMA master in another process: every grace period from now on also waits
    /// for its sections, each for at most `bound` (see `epoch::Readers::attach_remote`).
    /// Never waits for the writer.
    pub fn attach_remote(
        &self,
        readers: Arc<dyn epoch::RemoteReaders>,
        bound: std::time::Duration,
    ) -> Arc<epoch::Remote> {
        self.shared.readers.attach_remote(readers, bound)
    }

    /// Detaches a master attached with [`TranslatorSource::attach_remote`]. Never blocks.
    pub fn detach_remote(&self, remote: &Arc<epoch::Remote>) {
        self.shared.readers.detach_remote(remote)
    }

    /// The current epoch (moves with every grace period).
    pub fn epoch(&self) -> u64 {
        self.shared.readers.current_epoch()
    }
}

impl Clone for Translator {
    fn clone(&self) -> Self {
        Translator::new(self.shared.clone())
    }
}

impl Drop for Translator {
    fn drop(&mut self) {
        // No guard borrows the translator any more; one leaked earlier leaves its section
        // open, and this ends it for grace periods too.
        self.shared.readers.unregister(&self.slot);
    }
}

/// A read-side critical section: translations obtained through it stay valid (no UNMAP or
/// detach that removes them completes) until it is dropped. Hold it across the DMA.
#[derive(Debug)]
pub struct ReadGuard<'a> {
    translator: &'a Translator,
}

impl Drop for ReadGuard<'_> {
    #[inline(always)]
    fn drop(&mut self) {
        let t = self.translator;
        let depth = t.depth.get() - 1;
        t.depth.set(depth);
        if depth == 0 {
            t.shared.readers.leave(&t.slot, t.entered.get());
        }
    }
}

impl Translator {
    fn new(shared: Arc<Shared>) -> Self {
        let slot = shared.readers.register();
        Translator {
            shared,
            slot,
            depth: Cell::new(0),
            entered: Cell::new(0),
        }
    }

    /// Enters a read-side critical section (nestable).
    #[inline]
    pub fn read(&self) -> ReadGuard<'_> {
        let depth = self.depth.get();
        if depth == 0 {
            self.entered.set(self.shared.readers.enter(&self.slot));
        }
        self.depth.set(depth + 1);
        ReadGuard { translator: self }
    }

    /// Translates one access; the result is only guaranteed current at the time of the call.
    /// Use [`Translator::read`] and [`ReadGuard::translate`] to keep it valid during the DMA.
    #[inline(always)]
    pub fn translate(
        &self,
        requester: Requester,
        endpoint: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let shared = &*self.shared;
        if self.depth.get() != 0 {
            // Already inside a section (a guard is open on this thread).
            return shared
                .resolve(requester, endpoint)?
                .translate(iova, len, access);
        }
        // A section of its own, without the guard's bookkeeping. Nothing in between can
        // panic (no indexing, no allocation), so the slot is always left.
        let epoch = shared.readers.enter(&self.slot);
        let result = shared
            .resolve(requester, endpoint)
            .and_then(|view| view.translate(iova, len, access));
        shared.readers.leave(&self.slot, epoch);
        result
    }

    /// The endpoint's group, if the endpoint exists.
    pub fn group_of(&self, endpoint: EndpointId) -> Option<GroupId> {
        self.shared.endpoint(endpoint).map(|e| GroupId(e.group))
    }
}

impl ReadGuard<'_> {
    /// Translates the first bytes of `[iova, iova + len)` for `endpoint`: the returned
    /// translation covers `len` bytes or fewer (up to the end of the page-table entry); ask
    /// again for the rest.
    #[inline(always)]
    pub fn translate(
        &self,
        requester: Requester,
        endpoint: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        self.endpoint(requester, endpoint)?
            .translate(iova, len, access)
    }

    /// Resolves `endpoint` for `requester` once: the owner check and the group's domain, for
    /// a DMA master that translates several addresses of one endpoint. The handle lives no
    /// longer than this critical section, and that is what keeps it current: an ATTACH,
    /// DETACH or owner change that would alter it completes only after the section ends.
    #[inline(always)]
    pub fn endpoint(
        &self,
        requester: Requester,
        endpoint: EndpointId,
    ) -> Result<EndpointView<'_>, Fault> {
        self.translator.shared.resolve(requester, endpoint)
    }
}

/// An endpoint resolved inside a read-side critical section (see [`ReadGuard::endpoint`]).
#[derive(Clone, Copy, Debug)]
pub struct EndpointView<'g> {
    tables: &'g Tables,
    ep: &'g EndpointCell,
    /// The group's published state when the handle was made.
    state: u64,
}

impl EndpointView<'_> {
    /// Translates the first bytes of `[iova, iova + len)`, as [`ReadGuard::translate`].
    #[inline(always)]
    pub fn translate(&self, iova: u64, len: u64, access: Access) -> Result<Translation, Fault> {
        let shared = self.tables;
        match self.state & 0b11 {
            STATE_PAGING => {
                if !shared.in_range(iova) {
                    return Err(Fault::OutOfRange);
                }
                let target = pagetable::walk(&shared.arena, self.root(), self.levels(), iova);
                self.paged(target, len, access)
            }
            _ => self.unpaged(iova, len),
        }
    }

    /// Translates a batch of accesses, a DMA's scatter-gather list for example: `out[i]` is
    /// what [`EndpointView::translate`] returns for `dmas[i]`. Translates as many as both
    /// slices hold and returns how many that is. In a domain whose tables are larger than the
    /// cache this is faster than one call per access: the walks go in groups whose cache
    /// misses overlap (see `pagetable::walk_group`).
    pub fn translate_batch(&self, dmas: &[Dma], out: &mut [Result<Translation, Fault>]) -> usize {
        let n = dmas.len().min(out.len());
        let (dmas, out) = (&dmas[..n], &mut out[..n]);
        if self.state & 0b11 != STATE_PAGING {
            for (dma, out) in dmas.iter().zip(out.iter_mut()) {
                *out = self.unpaged(dma.iova, dma.len);
            }
            return n;
        }
        let shared = self.tables;
        for (dmas, out) in dmas
            .chunks(pagetable::GROUP)
            .zip(out.chunks_mut(pagetable::GROUP))
        {
            // Any IOVA is safe to walk (beyond the tree a walk finds nothing); one out of range
            // gets its fault below whatever the walk found.
            let mut iovas = [0; pagetable::GROUP];
            for (iova, dma) in iovas.iter_mut().zip(dmas) {
                *iova = dma.iova;
            }
            let walked = &iovas[..dmas.len()];
            pagetable::walk_group(
                &shared.arena,
                self.root(),
                self.levels(),
                walked,
                |i, target| {
                    if let (Some(dma), Some(out)) = (dmas.get(i), out.get_mut(i)) {
                        *out = if shared.in_range(dma.iova) {
                            self.paged(target, dma.len, dma.access)
                        } else {
                            Err(Fault::OutOfRange)
                        };
                    }
                },
            );
        }
        n
    }

    /// The paging domain's root.
    #[inline(always)]
    fn root(&self) -> u32 {
        ((self.state >> 5) & (pagetable::MAX_NODES - 1)) as u32
    }

    /// The height of the paging domain's tree.
    #[inline(always)]
    fn levels(&self) -> u32 {
        ((self.state >> 2) & 0b111) as u32
    }

    #[inline(always)]
    fn domain(&self) -> DomainId {
        (self.state >> 32) as DomainId
    }

    /// The answer of a paging domain whose walk found `target`.
    #[inline(always)]
    fn paged(
        &self,
        target: Option<pagetable::Target>,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let target = target.ok_or(Fault::Unmapped)?;
        let needed = match access {
            Access::Read => PERM_READ,
            Access::Write => PERM_WRITE,
        };
        if target.flags & needed == 0 {
            return Err(Fault::Permission);
        }
        Ok(Translation {
            gpa: target.gpa,
            len: len.min(target.left),
            domain: Some(self.domain()),
            mmio: target.flags & PERM_MMIO != 0,
        })
    }

    /// The answer of an identity domain, bypass or no domain at all.
    #[inline(always)]
    fn unpaged(&self, iova: u64, len: u64) -> Result<Translation, Fault> {
        match self.state & 0b11 {
            STATE_IDENTITY => identity(self.ep, iova, len, Some(self.domain())),
            _ if self.tables.bypass() => identity(self.ep, iova, len, None),
            _ => Err(Fault::NoDomain),
        }
    }
}

/// One access of a batch (see [`EndpointView::translate_batch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dma {
    pub iova: u64,
    pub len: u64,
    pub access: Access,
}

/// Bypass: the identity, except reserved regions (spec R5).
fn identity(
    ep: &EndpointCell,
    iova: u64,
    len: u64,
    domain: Option<DomainId>,
) -> Result<Translation, Fault> {
    let mut len = len.min(u64::MAX - iova).max(1.min(len));
    for r in ep.regions.iter() {
        if r.start <= iova && iova <= r.end {
            return Err(Fault::Reserved);
        }
        if r.start > iova {
            len = len.min(r.start - iova);
        }
    }
    Ok(Translation {
        gpa: iova,
        len,
        domain,
        mmio: false,
    })
}

#[cfg(test)]
mod tests;
