// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A split virtqueue driver (virtio 1.x, section 2.7) laid out in [`GuestRam`].
//!
//! The driver side of the rings: it writes descriptors and the available ring, reads the used
//! ring, and owns the kick and call eventfds that the frontend hands to the backend.

use std::{
    os::fd::AsRawFd,
    sync::atomic::{fence, Ordering},
    time::{Duration, Instant},
};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    error::{Error, Result},
    ram::{GuestBuf, GuestRam},
};

/// Descriptor flag: the chain continues at `next`.
pub const VRING_DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const VRING_DESC_F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
pub const VRING_DESC_F_INDIRECT: u16 = 4;
/// Used ring flag: the device asks the driver not to kick.
const VRING_USED_F_NO_NOTIFY: u16 = 1;
/// Available ring flag: the driver asks the device not to interrupt.
const VRING_AVAIL_F_NO_INTERRUPT: u16 = 1;

const DESC_SIZE: u64 = 16;
const USED_ELEM_SIZE: u64 = 8;
/// Largest split queue (spec 2.7: "Queue Size ... maximum of 32768").
const MAX_QUEUE_SIZE: u16 = 32768;
/// Busy-poll iterations between two deadline checks.
const SPINS_PER_CLOCK_CHECK: u32 = 256;
/// Busy-poll iterations before [`WaitMode::Poll`] starts yielding the CPU.
const SPINS_BEFORE_YIELD: u32 = 20_000;
/// Completions after which a far `used_event` is moved along (interrupts disabled).
const USED_EVENT_REFRESH: u16 = 0x1000;
/// Byte written into device-writable buffers before posting, so that tests can tell what the
/// device wrote from what it left alone.
pub const DEFAULT_POISON: u8 = 0xa5;

/// Identifies a posted chain until it completes. Tokens increase with posting order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Token(pub u64);

/// How to wait for completions. Every wait also takes a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WaitMode {
    /// Busy-poll the used ring, never making a system call (the deadline is read from the vDSO
    /// clock). The lowest latency; burns a CPU.
    Spin,
    /// Busy-poll the used ring, then yield the CPU between polls if the device is slow. What the
    /// Linux virtio-iommu driver does on its request queue (it has no callback); friendly to
    /// machines with few CPUs.
    #[default]
    Poll,
    /// Sleep on the call eventfd (interrupt-driven, as for the event queue).
    Interrupt,
}

/// One segment of a [`Chain`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Segment<'a> {
    Readable(&'a [u8]),
    Writable(usize),
}

/// A well-formed request: device-readable buffers followed by device-writable buffers, each one
/// descriptor, optionally placed in an indirect descriptor table.
///
/// ```
/// use vhost_iommu_testkit::Chain;
/// let req = [0u8; 24];
/// // one readable descriptor, one writable descriptor of 4 bytes
/// let simple = Chain::request(&req, 4);
/// // the same bytes over 3 readable descriptors, in an indirect table
/// let split = Chain::new().readable_split(&req, 3).writable(4).indirect();
/// assert_eq!(split.num_descriptors(), 4);
/// # let _ = simple;
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain<'a> {
    segments: Vec<Segment<'a>>,
    indirect: bool,
}

impl<'a> Chain<'a> {
    /// An empty chain; add segments with [`Chain::readable`] and [`Chain::writable`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The usual request: `readable` in one descriptor (if not empty), then `writable_len` bytes
    /// in one writable descriptor (if not zero).
    pub fn request(readable: &'a [u8], writable_len: usize) -> Self {
        let mut chain = Self::new();
        if !readable.is_empty() {
            chain = chain.readable(readable);
        }
        if writable_len > 0 {
            chain = chain.writable(writable_len);
        }
        chain
    }

    /// `readable` buffers then `writable` buffers, one descriptor each.
    pub fn from_parts(readable: &[&'a [u8]], writable: &[usize]) -> Self {
        Self {
            segments: readable
                .iter()
                .map(|b| Segment::Readable(b))
                .chain(writable.iter().map(|&n| Segment::Writable(n)))
                .collect(),
            indirect: false,
        }
    }

    /// Appends a device-readable descriptor holding `bytes` (may be empty: a zero-length
    /// descriptor).
    pub fn readable(mut self, bytes: &'a [u8]) -> Self {
        self.segments.push(Segment::Readable(bytes));
        self
    }

    /// Appends `bytes` split over `parts` readable descriptors of nearly equal length (the first
    /// ones one byte longer); `parts` is clamped to `1..=bytes.len()` when `bytes` is not empty.
    pub fn readable_split(mut self, bytes: &'a [u8], parts: usize) -> Self {
        let parts = parts.clamp(1, bytes.len().max(1));
        let (base, extra) = (bytes.len() / parts, bytes.len() % parts);
        let mut rest = bytes;
        for i in 0..parts {
            let (head, tail) = rest.split_at(base + usize::from(i < extra));
            self.segments.push(Segment::Readable(head));
            rest = tail;
        }
        self
    }

    /// Appends a device-writable descriptor of `len` bytes (may be zero).
    pub fn writable(mut self, len: usize) -> Self {
        self.segments.push(Segment::Writable(len));
        self
    }

    /// Appends `len` writable bytes split over `parts` descriptors, like
    /// [`Chain::readable_split`].
    pub fn writable_split(mut self, len: usize, parts: usize) -> Self {
        let parts = parts.clamp(1, len.max(1));
        let (base, extra) = (len / parts, len % parts);
        for i in 0..parts {
            self.segments
                .push(Segment::Writable(base + usize::from(i < extra)));
        }
        self
    }

    /// Puts the descriptors in an indirect table (one `VRING_DESC_F_INDIRECT` descriptor in the
    /// ring). The device must accept this only if `VIRTIO_RING_F_INDIRECT_DESC` was negotiated.
    pub fn indirect(mut self) -> Self {
        self.indirect = true;
        self
    }

    /// Number of buffer descriptors (not counting the indirect one).
    pub fn num_descriptors(&self) -> usize {
        self.segments.len()
    }

    /// Total device-readable bytes.
    pub fn readable_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Readable(b) => b.len(),
                Segment::Writable(_) => 0,
            })
            .sum()
    }

    /// Total device-writable bytes.
    pub fn writable_len(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                Segment::Readable(_) => 0,
                Segment::Writable(n) => *n,
            })
            .sum()
    }

    /// Whether the chain goes in an indirect table.
    pub fn is_indirect(&self) -> bool {
        self.indirect
    }
}

/// The `next` field of a [`RawDesc`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawNext {
    /// Written as is (may point anywhere, including outside the table).
    Index(u16),
    /// The descriptor at this position of the same raw list, translated to the table slot the
    /// queue picked for it (in an indirect table: the position itself).
    Desc(usize),
}

/// One descriptor of a raw (possibly malformed) chain: every field is written as given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawDesc {
    /// Guest-physical buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor (meaningful when `flags` has `VRING_DESC_F_NEXT`).
    pub next: RawNext,
}

impl RawDesc {
    /// A device-readable descriptor without `NEXT`.
    pub const fn readable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: 0,
            next: RawNext::Index(0),
        }
    }

    /// A device-writable descriptor without `NEXT`.
    pub const fn writable(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_WRITE,
            next: RawNext::Index(0),
        }
    }

    /// A descriptor pointing to an indirect table of `len` bytes at `addr`.
    pub const fn indirect(addr: u64, len: u32) -> Self {
        Self {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT,
            next: RawNext::Index(0),
        }
    }

    /// Sets `NEXT` and chains to the descriptor at position `pos` of the same raw list.
    pub const fn then(mut self, pos: usize) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = RawNext::Desc(pos);
        self
    }

    /// Sets `NEXT` and writes `index` verbatim into `next`.
    pub const fn then_index(mut self, index: u16) -> Self {
        self.flags |= VRING_DESC_F_NEXT;
        self.next = RawNext::Index(index);
        self
    }

    /// Replaces the flags.
    pub const fn with_flags(mut self, flags: u16) -> Self {
        self.flags = flags;
        self
    }

    /// The 16 bytes of the descriptor with `next` resolved.
    pub fn encode(&self, next: u16) -> [u8; 16] {
        let mut b = [0; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.to_le_bytes());
        b
    }

    /// Encodes an indirect table: `RawNext::Desc(i)` becomes `i`.
    pub fn encode_table(descs: &[RawDesc]) -> Vec<u8> {
        descs
            .iter()
            .flat_map(|d| {
                d.encode(match d.next {
                    RawNext::Index(i) => i,
                    RawNext::Desc(p) => p as u16,
                })
            })
            .collect()
    }
}

/// A completed chain, read back from the used ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The token [`Virtqueue::post_chain`] returned.
    pub token: Token,
    /// The head descriptor index (the used element's `id`).
    pub head: u16,
    /// The used element's `len`: bytes the device says it wrote.
    pub used_len: u32,
    /// The whole device-writable area of the chain, in chain order (poison bytes where the
    /// device wrote nothing). Empty for raw chains.
    pub data: Vec<u8>,
    /// Where that area is: guest-physical address and length of each device-writable buffer,
    /// in chain order. Empty for raw chains.
    pub writable: Vec<(u64, u32)>,
}

impl Completion {
    /// The first `used_len` bytes of the writable area (what the device claims it wrote).
    pub fn written(&self) -> &[u8] {
        &self.data[..(self.used_len as usize).min(self.data.len())]
    }

    /// The last `n` bytes of the writable area (e.g. a virtio-iommu status tail), or all of it
    /// if shorter.
    pub fn tail(&self, n: usize) -> &[u8] {
        &self.data[self.data.len().saturating_sub(n)..]
    }
}

/// Counters, for load generators and for tests of notification suppression.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Chains posted (including raw ones).
    pub posted: u64,
    /// Completions reaped (including erroneous ones).
    pub completed: u64,
    /// Kick eventfd writes.
    pub kicks: u64,
    /// Kicks skipped because the device suppressed notifications.
    pub kicks_suppressed: u64,
    /// Call eventfd wake-ups consumed while waiting.
    pub interrupts: u64,
}

/// The rings of a [`Virtqueue`] handed to an external driver loop
/// ([`Virtqueue::begin_external`]): guest-physical addresses and the indices to start from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExternalRings {
    /// Queue size (entries).
    pub size: u16,
    /// Descriptor table (`16 * size` bytes).
    pub desc_table: u64,
    /// Available ring: flags @0, idx @2, ring @4, `used_event` @`4 + 2 * size`.
    pub avail: u64,
    /// Used ring: flags @0, idx @2, elements @4, `avail_event` @`4 + 8 * size`.
    pub used: u64,
    /// The next available index to publish.
    pub avail_idx: u16,
    /// The used index reaped up to.
    pub last_used: u16,
    /// Whether EVENT_IDX semantics are in use.
    pub event_idx: bool,
}

/// Book-keeping of one posted chain, indexed by head. Vectors are reused between chains.
#[derive(Debug, Default)]
struct InFlight {
    active: bool,
    raw: bool,
    token: Token,
    descs: Vec<u16>,
    writable: Vec<(u64, u32)>,
    writable_len: usize,
    alloc: Option<GuestBuf>,
}

/// The driver side of one split virtqueue: rings and buffers in guest memory, kick and call
/// eventfds, free-descriptor book-keeping.
///
/// Requests are posted with [`post`](Self::post), [`post_chain`](Self::post_chain) or
/// [`post_raw`](Self::post_raw) (each publishes the chain in the available ring at once), then
/// announced with [`notify`](Self::notify) or [`kick`](Self::kick): post N, kick once is a batch.
/// Completions are reaped with [`poll_used`](Self::poll_used) (no system call) or
/// [`wait`](Self::wait).
///
/// Buffers of a chain go into a per-head slot of `slot_size` bytes when they fit, so the hot
/// path allocates nothing; larger chains use the [`GuestRam`] allocator.
#[derive(Debug)]
pub struct Virtqueue {
    index: u16,
    size: u16,
    mem: GuestRam,
    rings: GuestBuf,
    desc_table: u64,
    avail: u64,
    used: u64,
    slots: Option<GuestBuf>,
    slot_size: u64,
    free: Vec<u16>,
    in_flight: Vec<InFlight>,
    num_in_flight: usize,
    /// Heads published with `publish_raw_head` and not seen in the used ring yet.
    untracked: usize,
    avail_idx: u16,
    /// The available index as last stored in the ring (behind `avail_idx` while held).
    published_avail: u16,
    /// Posting leaves the available index in the ring alone until [`Virtqueue::publish_avail`].
    hold_avail: bool,
    notified_avail: u16,
    last_used: u16,
    /// `VRING_AVAIL_F_*` as last written.
    avail_flags: u16,
    /// `last_used` when a far `used_event` was last written.
    used_event_base: u16,
    event_idx: bool,
    interrupts: bool,
    kick: EventFd,
    call: EventFd,
    next_token: u64,
    poison: u8,
    stats: QueueStats,
}

/// `vring_need_event` (virtio 1.x, 2.7.10): whether `event` lies in `[old, new)`. The driver's
/// copy, as a guest has its own: a kit that shared the device's definition could not catch a
/// device that gets it wrong.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

fn align_up(x: u64, a: u64) -> u64 {
    (x + a - 1) & !(a - 1)
}

impl Virtqueue {
    /// Lays out a queue of `size` entries (a power of two up to 32768) for queue `index`, with
    /// per-head buffer slots of `slot_size` bytes (0: always use the allocator).
    pub fn new(mem: &GuestRam, index: u16, size: u16, slot_size: u32) -> Result<Self> {
        if !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(Error::InvalidArgument(format!(
                "queue size {size} is not a power of two up to {MAX_QUEUE_SIZE}"
            )));
        }
        let (kick, call) = (EventFd::new(EFD_NONBLOCK)?, EventFd::new(EFD_NONBLOCK)?);
        let n = u64::from(size);
        let avail_off = align_up(DESC_SIZE * n, 4096);
        let used_off = avail_off + align_up(6 + 2 * n, 4096);
        let total = used_off + align_up(6 + USED_ELEM_SIZE * n, 4096);
        let rings = mem.alloc(total, 4096)?;
        let slot_size = align_up(u64::from(slot_size), 16);
        let slots = if slot_size > 0 {
            match mem.alloc(slot_size * n, 4096) {
                Ok(s) => Some(s),
                Err(e) => {
                    let _ = mem.free(rings);
                    return Err(e);
                }
            }
        } else {
            None
        };
        let mut q = Self {
            index,
            size,
            mem: mem.clone(),
            rings,
            desc_table: rings.addr,
            avail: rings.addr + avail_off,
            used: rings.addr + used_off,
            slots,
            slot_size,
            free: Vec::new(),
            in_flight: (0..size).map(|_| InFlight::default()).collect(),
            num_in_flight: 0,
            untracked: 0,
            avail_idx: 0,
            published_avail: 0,
            hold_avail: false,
            notified_avail: 0,
            last_used: 0,
            avail_flags: 0,
            used_event_base: 0,
            event_idx: false,
            interrupts: true,
            kick,
            call,
            next_token: 0,
            poison: DEFAULT_POISON,
            stats: QueueStats::default(),
        };
        q.reinit()?;
        Ok(q)
    }

    /// Forgets every chain in flight and zeroes the rings: the state of a freshly reset device.
    /// Call it only while the backend does not run the queue (before start, after
    /// `GET_VRING_BASE`).
    pub fn reinit(&mut self) -> Result<()> {
        for f in &mut self.in_flight {
            if let Some(buf) = f.alloc.take() {
                let _ = self.mem.free(buf);
            }
            f.active = false;
        }
        self.free = (0..self.size).rev().collect();
        self.num_in_flight = 0;
        self.untracked = 0;
        self.avail_idx = 0;
        self.published_avail = 0;
        self.notified_avail = 0;
        self.last_used = 0;
        self.mem.fill(self.rings.addr, self.rings.len as usize, 0)?;
        self.avail_flags = 0;
        while self.call.read().is_ok() {}
        while self.kick.read().is_ok() {}
        self.apply_interrupt_state()
    }

    /// Queue index (0: requestq, 1: eventq for virtio-iommu).
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical address of the descriptor table.
    pub fn desc_table_addr(&self) -> u64 {
        self.desc_table
    }

    /// Guest-physical address of the available ring.
    pub fn avail_addr(&self) -> u64 {
        self.avail
    }

    /// Guest-physical address of the used ring.
    pub fn used_addr(&self) -> u64 {
        self.used
    }

    /// The guest memory the queue lives in.
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// The eventfd the driver writes to kick (`SET_VRING_KICK`).
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    /// The eventfd the device writes to interrupt (`SET_VRING_CALL`).
    pub fn call_fd(&self) -> &EventFd {
        &self.call
    }

    /// Uses `VIRTIO_RING_F_EVENT_IDX` semantics (set it to what was negotiated).
    pub fn set_event_idx(&mut self, enabled: bool) -> Result<()> {
        self.event_idx = enabled;
        self.apply_interrupt_state()
    }

    /// Whether EVENT_IDX semantics are in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Asks the device for interrupts (call eventfd writes) or not: `VRING_AVAIL_F_NO_INTERRUPT`,
    /// or `used_event` kept out of reach with EVENT_IDX. [`WaitMode::Interrupt`] asks for them
    /// while it waits whatever this says.
    pub fn set_interrupts(&mut self, enabled: bool) -> Result<()> {
        self.interrupts = enabled;
        self.apply_interrupt_state()
    }

    /// Byte written into writable buffers before posting (default [`DEFAULT_POISON`]).
    pub fn set_poison(&mut self, byte: u8) {
        self.poison = byte;
    }

    /// Counters.
    pub fn stats(&self) -> QueueStats {
        self.stats
    }

    /// Chains posted and not completed.
    pub fn in_flight(&self) -> usize {
        self.num_in_flight
    }

    /// Free descriptors.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// The next available index the driver will publish (what `GET_VRING_BASE` should report
    /// once the device consumed everything).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// The used index up to which completions were reaped.
    pub fn last_used_idx(&self) -> u16 {
        self.last_used
    }

    /// The device's current used index.
    pub fn device_used_idx(&self) -> Result<u16> {
        self.mem.load_u16(self.used + 2, Ordering::Acquire)
    }

    fn used_event_addr(&self) -> u64 {
        self.avail + 4 + 2 * u64::from(self.size)
    }

    fn avail_event_addr(&self) -> u64 {
        self.used + 4 + USED_ELEM_SIZE * u64::from(self.size)
    }

    /// Writes the driver's interrupt wish for the current position: `VRING_AVAIL_F_NO_INTERRUPT`
    /// (written only when it changes) and, with EVENT_IDX, `used_event`.
    fn write_interrupt_wish(&mut self, want: bool) -> Result<()> {
        let flags = if want { 0 } else { VRING_AVAIL_F_NO_INTERRUPT };
        if flags != self.avail_flags {
            self.mem.store_u16(self.avail, flags, Ordering::Relaxed)?;
            self.avail_flags = flags;
        }
        if self.event_idx {
            self.write_used_event(want)?;
        }
        if want {
            // The wish must be visible before the used index is read again.
            fence(Ordering::SeqCst);
        }
        Ok(())
    }

    /// `used_event`: the next used entry (interrupts wanted), or half the index space away. The
    /// device is at most `size` entries ahead of `last_used`, and the far value is refreshed
    /// every `USED_EVENT_REFRESH` completions, so it is never reached for queues of up to
    /// 28 672 entries (beyond, a spurious interrupt may happen: harmless).
    fn write_used_event(&mut self, want: bool) -> Result<()> {
        let event = if want {
            self.last_used
        } else {
            self.used_event_base = self.last_used;
            self.last_used.wrapping_add(0x7fff)
        };
        self.mem
            .store_u16(self.used_event_addr(), event, Ordering::Relaxed)
    }

    /// Keeps `used_event` current after reaping (what Linux's `virtqueue_get_buf` does).
    fn update_used_event(&mut self) -> Result<()> {
        if !self.event_idx {
            return Ok(());
        }
        if self.interrupts {
            self.write_used_event(true)?;
            fence(Ordering::SeqCst);
        } else if self.last_used.wrapping_sub(self.used_event_base) >= USED_EVENT_REFRESH {
            self.write_used_event(false)?;
        }
        Ok(())
    }

    fn apply_interrupt_state(&mut self) -> Result<()> {
        self.write_interrupt_wish(self.interrupts)
    }

    fn take_descs(&mut self, n: usize) -> Result<Vec<u16>> {
        if n == 0 || n > usize::from(self.size) {
            return Err(Error::InvalidArgument(format!(
                "a chain of {n} descriptors on a queue of {}",
                self.size
            )));
        }
        if n > self.free.len() {
            return Err(Error::QueueFull {
                queue: self.index,
                needed: n,
                free: self.free.len(),
            });
        }
        let at = self.free.len() - n;
        // The head is the last free entry: reuse the vector its book-keeping entry holds.
        let head = self.free[self.free.len() - 1];
        let mut descs = std::mem::take(&mut self.in_flight[usize::from(head)].descs);
        descs.clear();
        descs.extend(self.free.drain(at..).rev());
        Ok(descs)
    }

    fn write_desc(&self, table: u64, i: u16, d: &RawDesc, next: u16) -> Result<()> {
        self.mem
            .write(table + DESC_SIZE * u64::from(i), &d.encode(next))
    }

    /// Makes `head` available and advances the available index (in the ring too, unless it
    /// is held).
    fn publish(&mut self, head: u16) -> Result<()> {
        let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
        self.mem.write(slot, &head.to_le_bytes())?;
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.stats.posted += 1;
        if self.hold_avail {
            return Ok(());
        }
        self.publish_avail()
    }

    /// While `hold` is true, posting writes the chains and their available ring entries but
    /// leaves the available index in the ring where it is; [`Virtqueue::publish_avail`] (or
    /// the next [`notify`](Self::notify)) stores it. A test then
    /// chooses the instant the device sees new work to the nanosecond, as a driver's single
    /// index store makes it, whatever posting itself costs.
    pub fn hold_avail(&mut self, hold: bool) {
        self.hold_avail = hold;
    }

    /// Stores the available index in the ring if posting left it behind.
    pub fn publish_avail(&mut self) -> Result<()> {
        if self.published_avail != self.avail_idx {
            // Release: the descriptors and the ring entries are visible before the index.
            self.mem
                .store_u16(self.avail + 2, self.avail_idx, Ordering::Release)?;
            self.published_avail = self.avail_idx;
        }
        Ok(())
    }

    fn next_token(&mut self) -> Token {
        self.next_token += 1;
        Token(self.next_token)
    }

    /// Posts `readable` (one descriptor) then `writable_len` writable bytes (one descriptor).
    pub fn post(&mut self, readable: &[u8], writable_len: usize) -> Result<Token> {
        self.post_chain(&Chain::request(readable, writable_len))
    }

    /// Posts a well-formed chain and publishes it in the available ring (no kick).
    pub fn post_chain(&mut self, chain: &Chain<'_>) -> Result<Token> {
        let n = chain.segments.len();
        if n == 0 {
            return Err(Error::InvalidArgument(
                "empty chain (use post_raw for odd chains)".into(),
            ));
        }
        let mut data_len = 0u64;
        for s in &chain.segments {
            let len = match s {
                Segment::Readable(b) => b.len(),
                Segment::Writable(l) => *l,
            };
            if u32::try_from(len).is_err() {
                return Err(Error::InvalidArgument(format!(
                    "buffer of {len} bytes does not fit a descriptor"
                )));
            }
            data_len += len as u64;
        }
        let table_len = if chain.indirect {
            if u32::try_from(DESC_SIZE * n as u64).is_err() {
                return Err(Error::InvalidArgument("indirect table too long".into()));
            }
            DESC_SIZE * n as u64
        } else {
            0
        };
        let descs = self.take_descs(if chain.indirect { 1 } else { n })?;
        let head = descs[0];
        let total = table_len + data_len;
        let (base, alloc) = match self.slots {
            Some(slots) if total <= self.slot_size => {
                (slots.addr + u64::from(head) * self.slot_size, None)
            }
            _ => match self.mem.alloc(total.max(1), 16) {
                Ok(buf) => (buf.addr, Some(buf)),
                Err(e) => {
                    self.free.extend(descs.iter().rev());
                    return Err(e);
                }
            },
        };
        let entry = &mut self.in_flight[usize::from(head)];
        let mut writable = std::mem::take(&mut entry.writable);
        writable.clear();

        let result = self.write_chain(chain, &descs, base, table_len, &mut writable);
        let token = self.next_token();
        let writable_len = chain.writable_len();
        let entry = &mut self.in_flight[usize::from(head)];
        entry.active = true;
        entry.raw = false;
        entry.token = token;
        entry.descs = descs;
        entry.writable = writable;
        entry.writable_len = writable_len;
        entry.alloc = alloc;
        self.num_in_flight += 1;
        if let Err(e) = result.and_then(|()| self.publish(head)) {
            self.release(head);
            return Err(e);
        }
        Ok(token)
    }

    fn write_chain(
        &self,
        chain: &Chain<'_>,
        descs: &[u16],
        base: u64,
        table_len: u64,
        writable: &mut Vec<(u64, u32)>,
    ) -> Result<()> {
        let mut cursor = base + table_len;
        let n = chain.segments.len();
        for (i, s) in chain.segments.iter().enumerate() {
            let (len, flags) = match s {
                Segment::Readable(b) => {
                    self.mem.write(cursor, b)?;
                    (b.len(), 0)
                }
                Segment::Writable(l) => {
                    self.mem.fill(cursor, *l, self.poison)?;
                    writable.push((cursor, *l as u32));
                    (*l, VRING_DESC_F_WRITE)
                }
            };
            let last = i + 1 == n;
            let d = RawDesc {
                addr: cursor,
                len: len as u32,
                flags: flags | if last { 0 } else { VRING_DESC_F_NEXT },
                next: RawNext::Index(0),
            };
            if chain.indirect {
                let next = if last { 0 } else { i as u16 + 1 };
                self.write_desc(base, i as u16, &d, next)?;
            } else {
                let next = if last { 0 } else { descs[i + 1] };
                self.write_desc(self.desc_table, descs[i], &d, next)?;
            }
            cursor += len as u64;
        }
        if chain.indirect {
            let d = RawDesc::indirect(base, table_len as u32);
            self.write_desc(self.desc_table, descs[0], &d, 0)?;
        }
        Ok(())
    }

    /// Posts a raw chain: `descs[i]` goes to a free table slot, fields written verbatim (with
    /// [`RawNext::Desc`] translated to slots). Nothing is checked, so the chain may be
    /// malformed: write-only first, readable after writable, addresses outside memory, loops,
    /// zero lengths, indirect tables the test wrote itself. Buffers are the caller's; the
    /// completion carries no data.
    pub fn post_raw(&mut self, descs: &[RawDesc]) -> Result<Token> {
        if let Some(p) = descs.iter().find_map(|d| match d.next {
            RawNext::Desc(p) if p >= descs.len() => Some(p),
            _ => None,
        }) {
            return Err(Error::InvalidArgument(format!(
                "RawNext::Desc({p}) in a list of {}",
                descs.len()
            )));
        }
        let slots = self.take_descs(descs.len())?;
        let head = slots[0];
        let mut result = Ok(());
        for (d, &slot) in descs.iter().zip(&slots) {
            let next = match d.next {
                RawNext::Index(i) => i,
                RawNext::Desc(p) => slots[p],
            };
            result = result.and_then(|()| self.write_desc(self.desc_table, slot, d, next));
        }
        let token = self.next_token();
        let entry = &mut self.in_flight[usize::from(head)];
        entry.active = true;
        entry.raw = true;
        entry.token = token;
        entry.descs = slots;
        entry.writable.clear();
        entry.writable_len = 0;
        entry.alloc = None;
        self.num_in_flight += 1;
        if let Err(e) = result.and_then(|()| self.publish(head)) {
            self.release(head);
            return Err(e);
        }
        Ok(token)
    }

    /// Publishes `head` in the available ring without any book-keeping (an index outside the
    /// table, a head already in flight, ...). If the device later returns an id the queue does
    /// not track, reaping reports [`Error::Device`].
    pub fn publish_raw_head(&mut self, head: u16) -> Result<()> {
        self.untracked += 1;
        self.publish(head)
    }

    /// Whether the device currently wants a kick for the entries published since the last
    /// [`notify`](Self::notify) or [`kick`](Self::kick): `VRING_USED_F_NO_NOTIFY` clear, or with
    /// EVENT_IDX, `avail_event` among the new entries.
    pub fn needs_kick(&self) -> Result<bool> {
        // The index store must be visible before the device's suppression is read.
        fence(Ordering::SeqCst);
        if self.event_idx {
            let event = self
                .mem
                .load_u16(self.avail_event_addr(), Ordering::Relaxed)?;
            Ok(need_event(event, self.avail_idx, self.notified_avail))
        } else {
            let flags = self.mem.load_u16(self.used, Ordering::Relaxed)?;
            Ok(flags & VRING_USED_F_NO_NOTIFY == 0)
        }
    }

    /// Kicks if the device wants it (see [`needs_kick`](Self::needs_kick)). Returns whether it
    /// kicked.
    pub fn notify(&mut self) -> Result<bool> {
        self.publish_avail()?;
        let need = self.needs_kick()?;
        self.notified_avail = self.avail_idx;
        if need {
            self.kick_raw()?;
        } else {
            self.stats.kicks_suppressed += 1;
        }
        Ok(need)
    }

    /// Kicks unconditionally. An available index held back ([`Virtqueue::hold_avail`]) stays
    /// held: the device is told about what the ring shows, nothing more.
    pub fn kick(&mut self) -> Result<()> {
        self.notified_avail = self.published_avail;
        self.kick_raw()
    }

    fn kick_raw(&mut self) -> Result<()> {
        self.kick.write(1)?;
        self.stats.kicks += 1;
        Ok(())
    }

    /// Hands the rings to a caller that drives them itself (a load generator's hot loop,
    /// which reuses descriptor chains it wrote once): the ring addresses and the current
    /// indices. Nothing may be in flight. Until [`end_external`](Self::end_external) the caller
    /// owns the whole descriptor table, the available and used rings, `used_event` and the
    /// kick eventfd, and must post and reap only through them.
    pub fn begin_external(&mut self) -> Result<ExternalRings> {
        if self.num_in_flight != 0 || self.untracked != 0 {
            return Err(Error::InvalidArgument(format!(
                "{} chains in flight: the rings cannot be handed out",
                self.num_in_flight + self.untracked
            )));
        }
        Ok(ExternalRings {
            size: self.size,
            desc_table: self.desc_table,
            avail: self.avail,
            used: self.used,
            avail_idx: self.avail_idx,
            last_used: self.last_used,
            event_idx: self.event_idx,
        })
    }

    /// Takes the rings back after [`begin_external`](Self::begin_external): `avail_idx` and
    /// `last_used` are where the caller left them (everything it posted reaped), `posted` and
    /// `kicks` go into the counters. The descriptor table is all free again, the interrupt
    /// wish is rewritten for the current position.
    pub fn end_external(
        &mut self,
        avail_idx: u16,
        last_used: u16,
        posted: u64,
        kicks: u64,
    ) -> Result<()> {
        if avail_idx != last_used {
            return Err(Error::InvalidArgument(format!(
                "external driver left {} chains in flight",
                avail_idx.wrapping_sub(last_used)
            )));
        }
        self.avail_idx = avail_idx;
        self.published_avail = avail_idx;
        self.notified_avail = avail_idx;
        self.last_used = last_used;
        self.stats.posted += posted;
        self.stats.completed += posted;
        self.stats.kicks += kicks;
        self.apply_interrupt_state()
    }

    fn release(&mut self, head: u16) {
        let entry = &mut self.in_flight[usize::from(head)];
        entry.active = false;
        if let Some(buf) = entry.alloc.take() {
            let _ = self.mem.free(buf);
        }
        self.free.extend(entry.descs.iter().rev());
        self.num_in_flight -= 1;
    }

    fn device_bug(&self, what: String) -> Error {
        Error::Device {
            queue: self.index,
            what,
        }
    }

    /// Reaps one completion if the device published one; never blocks, never makes a system
    /// call. Device misbehaviour (an id not in flight, a length larger than the writable
    /// buffers, a used index running ahead) is an [`Error::Device`]; the used entry is consumed
    /// anyway so that later entries can still be reaped.
    pub fn poll_used(&mut self) -> Result<Option<Completion>> {
        let Some((head, used_len)) = self.next_used()? else {
            return Ok(None);
        };
        let entry = &self.in_flight[head];
        let (token, raw_chain, writable_len) = (entry.token, entry.raw, entry.writable_len);
        let mut data = Vec::new();
        let mut read_result = Ok(());
        let writable = if raw_chain {
            Vec::new()
        } else {
            entry.writable.clone()
        };
        if !raw_chain {
            data.resize(writable_len, 0);
            let mut at = 0;
            for &(addr, len) in &entry.writable {
                let len = len as usize;
                read_result =
                    read_result.and_then(|()| self.mem.read_into(addr, &mut data[at..at + len]));
                at += len;
            }
        }
        self.release(head as u16);
        read_result?;
        self.check_used_len(head, used_len, raw_chain, writable_len)?;
        Ok(Some(Completion {
            token,
            head: head as u16,
            used_len,
            data,
            writable,
        }))
    }

    /// [`Virtqueue::poll_used`] for load generators: returns the token, the used length and the
    /// last 4 writable bytes (a virtio-iommu status tail; zeros for raw chains) without
    /// allocating.
    pub fn poll_used_tail(&mut self) -> Result<Option<(Token, u32, [u8; 4])>> {
        let Some((head, used_len)) = self.next_used()? else {
            return Ok(None);
        };
        let entry = &self.in_flight[head];
        let (token, raw_chain, writable_len) = (entry.token, entry.raw, entry.writable_len);
        let mut tail = [0u8; 4];
        let mut read_result = Ok(());
        if !raw_chain {
            // Walk back from the end of the writable area for its last 4 bytes.
            let mut need = tail.len().min(writable_len);
            for &(addr, len) in entry.writable.iter().rev() {
                if need == 0 {
                    break;
                }
                let take = need.min(len as usize);
                let from = addr + u64::from(len) - take as u64;
                read_result = read_result
                    .and_then(|()| self.mem.read_into(from, &mut tail[need - take..need]));
                need -= take;
            }
        }
        self.release(head as u16);
        read_result?;
        self.check_used_len(head, used_len, raw_chain, writable_len)?;
        Ok(Some((token, used_len, tail)))
    }

    fn check_used_len(
        &mut self,
        head: usize,
        used_len: u32,
        raw_chain: bool,
        writable_len: usize,
    ) -> Result<()> {
        if !raw_chain && used_len as usize > writable_len {
            return Err(self.device_bug(format!(
                "used len {used_len} for head {head} exceeds its {writable_len} writable bytes"
            )));
        }
        Ok(())
    }

    /// The next used element, checked: `(head, used_len)` of a chain in flight.
    fn next_used(&mut self) -> Result<Option<(usize, u32)>> {
        let used_idx = self.device_used_idx()?;
        if used_idx == self.last_used {
            return Ok(None);
        }
        let pending = usize::from(used_idx.wrapping_sub(self.last_used));
        if pending > self.num_in_flight + self.untracked {
            return Err(self.device_bug(format!(
                "used index {used_idx} is {pending} entries ahead of {} with only {} chains in \
                 flight",
                self.last_used,
                self.num_in_flight + self.untracked
            )));
        }
        let elem = self.used + 4 + USED_ELEM_SIZE * u64::from(self.last_used % self.size);
        let mut raw = [0u8; 8];
        self.mem.read_into(elem, &mut raw)?;
        let id = u32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let used_len = u32::from_le_bytes([raw[4], raw[5], raw[6], raw[7]]);
        self.last_used = self.last_used.wrapping_add(1);
        self.stats.completed += 1;
        self.update_used_event()?;

        let tracked = usize::try_from(id)
            .ok()
            .filter(|&i| i < self.in_flight.len() && self.in_flight[i].active);
        let Some(head) = tracked else {
            if self.untracked > 0 {
                self.untracked -= 1;
            }
            return Err(self.device_bug(format!(
                "used element {{id: {id}, len: {used_len}}} names no chain in flight"
            )));
        };
        Ok(Some((head, used_len)))
    }

    /// Reaps every completion already published, appending them to `out`. Returns how many.
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut n = 0;
        while let Some(c) = self.poll_used()? {
            out.push(c);
            n += 1;
        }
        Ok(n)
    }

    /// Waits for the next completion (any chain) for at most `timeout`.
    pub fn wait(&mut self, mode: WaitMode, timeout: Duration) -> Result<Completion> {
        let deadline = Instant::now() + timeout;
        match mode {
            WaitMode::Spin | WaitMode::Poll => self.wait_polling(mode, deadline, timeout),
            WaitMode::Interrupt => {
                let r = self.wait_interrupt(deadline, timeout);
                if !self.interrupts {
                    self.apply_interrupt_state()?;
                }
                r
            }
        }
    }

    fn wait_polling(
        &mut self,
        mode: WaitMode,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Completion> {
        let mut spins: u32 = 0;
        loop {
            if let Some(c) = self.poll_used()? {
                return Ok(c);
            }
            spins = spins.wrapping_add(1);
            if spins % SPINS_PER_CLOCK_CHECK == 0 && Instant::now() >= deadline {
                return Err(Error::WaitTimeout {
                    queue: self.index,
                    timeout,
                    in_flight: self.num_in_flight,
                });
            }
            if mode == WaitMode::Poll && spins >= SPINS_BEFORE_YIELD {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }

    fn wait_interrupt(&mut self, deadline: Instant, timeout: Duration) -> Result<Completion> {
        loop {
            self.write_interrupt_wish(true)?;
            if let Some(c) = self.poll_used()? {
                return Ok(c);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::WaitTimeout {
                    queue: self.index,
                    timeout,
                    in_flight: self.num_in_flight,
                });
            }
            if poll_readable(self.call.as_raw_fd(), deadline - now)? && self.call.read().is_ok() {
                self.stats.interrupts += 1;
            }
        }
    }

    /// Waits until `n` completions arrived (in any order), appending them to `out`.
    pub fn wait_n(
        &mut self,
        n: usize,
        mode: WaitMode,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            out.push(self.wait(mode, left)?);
        }
        Ok(())
    }

    /// One batch round trip, the load generator's unit: posts every chain, notifies once, waits
    /// for as many completions. Returns the time from the first post to the last completion;
    /// completions are appended to `out` in completion order. Meant for a queue with nothing
    /// else in flight.
    pub fn round_trip(
        &mut self,
        chains: &[Chain<'_>],
        mode: WaitMode,
        timeout: Duration,
        out: &mut Vec<Completion>,
    ) -> Result<Duration> {
        let start = Instant::now();
        for c in chains {
            self.post_chain(c)?;
        }
        self.notify()?;
        self.wait_n(chains.len(), mode, timeout, out)?;
        Ok(start.elapsed())
    }
}

impl Drop for Virtqueue {
    fn drop(&mut self) {
        for f in &mut self.in_flight {
            if let Some(buf) = f.alloc.take() {
                let _ = self.mem.free(buf);
            }
        }
        let _ = self.mem.free(self.rings);
        if let Some(slots) = self.slots.take() {
            let _ = self.mem.free(slots);
        }
    }
}

/// Waits until `fd` is readable or `timeout` passes. Returns whether it is readable.
fn poll_readable(fd: i32, timeout: Duration) -> Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // Round up so that a sub-millisecond remainder still sleeps rather than spins.
    let ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and we pass a count of 1.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(e.into());
    }
    Ok(r > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_splits() {
        let b = [1u8, 2, 3, 4, 5, 6, 7];
        let c = Chain::new().readable_split(&b, 3).writable_split(5, 2);
        assert_eq!(
            c.segments,
            vec![
                Segment::Readable(&b[0..3]),
                Segment::Readable(&b[3..5]),
                Segment::Readable(&b[5..7]),
                Segment::Writable(3),
                Segment::Writable(2),
            ]
        );
        assert_eq!(Chain::request(&[], 4).num_descriptors(), 1);
    }

    #[test]
    fn need_event_is_the_specs() {
        // Kick when avail_event is in [old, new), wrapping included.
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(7, 8, 3));
        assert!(!need_event(2, 8, 3));
        assert!(!need_event(9, 9, 9));
        assert!(need_event(u16::MAX, 1, u16::MAX - 2));
        assert!(need_event(0, 1, u16::MAX - 2));
        assert!(!need_event(1, 1, u16::MAX - 2));
    }

    fn read_desc(q: &Virtqueue, table: u64, i: u16) -> (u64, u32, u16, u16) {
        let a = table + 16 * u64::from(i);
        let m = q.memory();
        (
            m.read_u64(a).unwrap(),
            m.read_u32(a + 8).unwrap(),
            m.read_u16(a + 12).unwrap(),
            m.read_u16(a + 14).unwrap(),
        )
    }

    /// Plays the device by hand: reads the chain back and completes it.
    #[test]
    fn post_layout_and_reap() {
        let mem = GuestRam::with_size(1 << 20).unwrap();
        let mut q = Virtqueue::new(&mem, 0, 8, 256).unwrap();
        let t = q
            .post_chain(&Chain::new().readable_split(b"abcdef", 2).writable(4))
            .unwrap();
        assert_eq!(q.num_free(), 5);
        let head = mem.read_u16(q.avail_addr() + 4).unwrap();
        assert_eq!(mem.read_u16(q.avail_addr() + 2).unwrap(), 1);
        let (a0, l0, f0, n0) = read_desc(&q, q.desc_table_addr(), head);
        assert_eq!((l0, f0), (3, VRING_DESC_F_NEXT));
        assert_eq!(mem.read(a0, 3).unwrap(), b"abc");
        let (_, l1, f1, n1) = read_desc(&q, q.desc_table_addr(), n0);
        assert_eq!((l1, f1), (3, VRING_DESC_F_NEXT));
        let (a2, l2, f2, _) = read_desc(&q, q.desc_table_addr(), n1);
        assert_eq!((l2, f2), (4, VRING_DESC_F_WRITE));
        assert_eq!(mem.read(a2, 4).unwrap(), [DEFAULT_POISON; 4]);

        assert!(q.poll_used().unwrap().is_none());
        mem.write(a2 + 2, &[0, 0]).unwrap();
        mem.write(q.used_addr() + 4, &u32::from(head).to_le_bytes())
            .unwrap();
        mem.write(q.used_addr() + 8, &2u32.to_le_bytes()).unwrap();
        mem.store_u16(q.used_addr() + 2, 1, Ordering::Release)
            .unwrap();
        let c = q.poll_used().unwrap().unwrap();
        assert_eq!((c.token, c.head, c.used_len), (t, head, 2));
        assert_eq!(c.data, [DEFAULT_POISON, DEFAULT_POISON, 0, 0]);
        assert_eq!(c.written(), [DEFAULT_POISON; 2]);
        assert_eq!(c.tail(2), [0, 0]);
        assert_eq!(q.num_free(), 8);

        // A device returning the same id again is caught.
        mem.write(q.used_addr() + 12, &u32::from(head).to_le_bytes())
            .unwrap();
        mem.store_u16(q.used_addr() + 2, 2, Ordering::Release)
            .unwrap();
        q.publish_raw_head(0).unwrap();
        assert!(matches!(q.poll_used(), Err(Error::Device { .. })));
    }

    #[test]
    fn external_driver_hand_over() {
        let mem = GuestRam::with_size(1 << 20).unwrap();
        let mut q = Virtqueue::new(&mem, 0, 8, 256).unwrap();
        q.post(b"req", 4).unwrap();
        assert!(q.begin_external().is_err(), "a chain is in flight");
        q.reinit().unwrap();
        let r = q.begin_external().unwrap();
        assert_eq!(
            (r.size, r.avail, r.used),
            (8, q.avail_addr(), q.used_addr())
        );
        assert_eq!((r.avail_idx, r.last_used), (0, 0));
        // The external loop posted and reaped 5 chains; one still in flight is refused.
        assert!(q.end_external(5, 4, 5, 1).is_err());
        q.end_external(5, 5, 5, 1).unwrap();
        assert_eq!(
            (q.avail_idx(), q.last_used_idx(), q.stats().kicks),
            (5, 5, 1)
        );
        // Posting goes on from there, with the whole table free.
        assert_eq!(q.num_free(), 8);
        q.post(b"req", 4).unwrap();
        assert_eq!(mem.read_u16(q.avail_addr() + 2).unwrap(), 6);
    }

    #[test]
    fn indirect_and_raw_layout() {
        let mem = GuestRam::with_size(1 << 20).unwrap();
        let mut q = Virtqueue::new(&mem, 0, 4, 0).unwrap();
        q.post_chain(&Chain::request(b"xy", 4).indirect()).unwrap();
        assert_eq!(q.num_free(), 3);
        let (table, len, flags, _) = read_desc(&q, q.desc_table_addr(), 0);
        assert_eq!((len, flags), (32, VRING_DESC_F_INDIRECT));
        let (_, l0, f0, n0) = read_desc(&q, table, 0);
        assert_eq!((l0, f0, n0), (2, VRING_DESC_F_NEXT, 1));
        let (_, l1, f1, _) = read_desc(&q, table, 1);
        assert_eq!((l1, f1), (4, VRING_DESC_F_WRITE));

        // A loop of two descriptors.
        q.post_raw(&[
            RawDesc::readable(0x1000, 4).then(1),
            RawDesc::writable(0x2000, 4).then(0),
        ])
        .unwrap();
        let (_, _, _, next_of_first) = read_desc(&q, q.desc_table_addr(), 1);
        let (_, _, _, next_of_second) = read_desc(&q, q.desc_table_addr(), next_of_first);
        assert_eq!(next_of_second, 1);
        assert!(matches!(
            q.post_raw(&[RawDesc::readable(0, 1), RawDesc::readable(0, 1)]),
            Err(Error::QueueFull { .. })
        ));
        assert_eq!(q.in_flight(), 2);
    }

    #[test]
    fn kick_suppression() {
        let mem = GuestRam::with_size(1 << 20).unwrap();
        let mut q = Virtqueue::new(&mem, 0, 8, 64).unwrap();
        q.post(b"a", 4).unwrap();
        assert!(q.notify().unwrap());
        mem.store_u16(q.used_addr(), VRING_USED_F_NO_NOTIFY, Ordering::Relaxed)
            .unwrap();
        q.post(b"b", 4).unwrap();
        assert!(!q.notify().unwrap());

        q.set_event_idx(true).unwrap();
        // avail_event = 2: the device wants a kick once entry 2 is published.
        mem.store_u16(q.avail_event_addr(), 2, Ordering::Relaxed)
            .unwrap();
        q.post(b"c", 4).unwrap();
        assert!(q.notify().unwrap());
        q.post(b"d", 4).unwrap();
        assert!(!q.notify().unwrap());
        let s = q.stats();
        assert_eq!((s.kicks, s.kicks_suppressed, s.posted), (2, 2, 4));
    }

    #[test]
    fn a_held_avail_index_is_published_by_notify_not_by_kick() {
        let mem = GuestRam::with_size(1 << 20).unwrap();
        let mut q = Virtqueue::new(&mem, 0, 8, 64).unwrap();
        let ring_idx = |q: &Virtqueue| mem.read_u16(q.avail_addr() + 2).unwrap();
        q.hold_avail(true);
        q.post(b"a", 4).unwrap();
        q.post(b"b", 4).unwrap();
        assert_eq!(
            (q.avail_idx(), ring_idx(&q)),
            (2, 0),
            "written, not published"
        );
        // A kick tells the device about what the ring shows: nothing new.
        q.kick().unwrap();
        assert_eq!(ring_idx(&q), 0);
        q.publish_avail().unwrap();
        assert_eq!(ring_idx(&q), 2);
        q.post(b"c", 4).unwrap();
        // EVENT_IDX: the kick decision covers every entry published since the spurious kick.
        q.set_event_idx(true).unwrap();
        mem.store_u16(q.avail_event_addr(), 1, Ordering::Relaxed)
            .unwrap();
        assert!(q.notify().unwrap(), "avail_event 1 lies in [0, 3)");
        assert_eq!(ring_idx(&q), 3);
    }
}
