// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The request queue's fast path: the split ring read and written through host memory slices
//! resolved once per pass, instead of one guest-memory lookup per ring or buffer access.
//!
//! [`Rings`] holds the descriptor table, the available ring and the used ring as
//! [`VolatileSlice`]s of the guest memory snapshot a queue pass runs on (each checked to lie
//! inside one region and to be as long as the queue size needs). [`Rings::parse`] walks one
//! chain from the table and accepts only the simple case: direct descriptors, each buffer
//! inside one memory region, device-readable buffers before device-writable ones, at most
//! [`FAST_MAX_DESCS`] descriptors (and no more than the queue size), lengths that add up in a
//! `u32`. Anything else returns `None` and the caller hands that chain to virtio-queue's
//! `DescriptorChain` and `Device::process_chain`, which own every check and the status or
//! "malformed" verdict a hostile chain gets; so the fast path never decides anything a
//! guest could tell apart from the slow path.
//!
//! Everything here is safe code over vm-memory's volatile accessors; a stale view (the memory
//! table or ring addresses replaced meanwhile) stays memory-safe because it borrows the
//! guest memory snapshot, which keeps its mappings alive.

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring;
use virtio_queue::{desc::split::Descriptor, Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileMemory, VolatileSlice,
};

use crate::dirty::{DirtySlice, GuestMemory};

/// Guest memory as the fast path holds it: writes through it are logged while a dirty-page log
/// is set (see [`crate::dirty`]).
pub(crate) type Slice<'m> = VolatileSlice<'m, DirtySlice<'m>>;

/// Descriptor flags (virtio 1.x, 2.7.5), as the 16-bit field holds them.
const VRING_DESC_F_NEXT: u16 = virtio_ring::VRING_DESC_F_NEXT as u16;
const VRING_DESC_F_WRITE: u16 = virtio_ring::VRING_DESC_F_WRITE as u16;
const VRING_DESC_F_INDIRECT: u16 = virtio_ring::VRING_DESC_F_INDIRECT as u16;
/// Available ring flag: the driver asks for no interrupts (ignored with EVENT_IDX).
pub(crate) const VRING_AVAIL_F_NO_INTERRUPT: u16 = virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16;
const DESC_SIZE: usize = 16;
const USED_ELEM_SIZE: usize = 8;
/// Longest chain the fast path walks (Linux sends 2 descriptors per request); longer chains,
/// legal or not, go to virtio-queue.
pub const FAST_MAX_DESCS: u16 = 8;

/// Identifies the ring layout a [`Rings`] was resolved for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RingKey {
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    pub(crate) size: u16,
}

impl RingKey {
    pub(crate) fn of(queue: &Queue) -> Self {
        RingKey {
            desc: queue.desc_table(),
            avail: queue.avail_ring(),
            used: queue.used_ring(),
            size: queue.size(),
        }
    }
}

/// One split queue's rings as host memory slices.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rings<'m> {
    pub(crate) key: RingKey,
    /// `16 * size` bytes.
    desc: Slice<'m>,
    /// flags, idx, ring[size], used_event: `6 + 2 * size` bytes.
    avail: Slice<'m>,
    /// flags, idx, ring[size], avail_event: `6 + 8 * size` bytes.
    used: Slice<'m>,
}

impl<'m> Rings<'m> {
    /// Resolves the queue's rings in `mem`; `None` when the queue is not ready, or a ring is
    /// outside guest memory, spans two regions or is misaligned for its atomic indices (the
    /// slow path then decides what that means).
    pub(crate) fn new(queue: &Queue, mem: &'m GuestMemory) -> Option<Self> {
        let key = RingKey::of(queue);
        if !queue.ready() || key.avail == 0 || key.size == 0 {
            return None;
        }
        let n = usize::from(key.size);
        let desc = mem.get_slice(GuestAddress(key.desc), DESC_SIZE * n).ok()?;
        let avail = mem.get_slice(GuestAddress(key.avail), 6 + 2 * n).ok()?;
        let used = mem
            .get_slice(GuestAddress(key.used), 6 + USED_ELEM_SIZE * n)
            .ok()?;
        let rings = Rings {
            key,
            desc,
            avail,
            used,
        };
        // The indices are accessed atomically: refuse what vm-memory would refuse later.
        rings.avail.load::<u16>(2, Ordering::Relaxed).ok()?;
        rings.avail.load::<u16>(4 + 2 * n, Ordering::Relaxed).ok()?;
        rings.used.load::<u16>(2, Ordering::Relaxed).ok()?;
        Some(rings)
    }

    pub(crate) fn size(&self) -> u16 {
        self.key.size
    }

    /// The driver's available index (`None` only if the memory went away, which it cannot).
    pub(crate) fn avail_idx(&self, order: Ordering) -> Option<u16> {
        self.avail.load::<u16>(2, order).ok().map(u16::from_le)
    }

    /// `VRING_AVAIL_F_*` (read after a full fence by the caller).
    pub(crate) fn avail_flags(&self) -> Option<u16> {
        self.avail
            .load::<u16>(0, Ordering::Relaxed)
            .ok()
            .map(u16::from_le)
    }

    /// `used_event` at the end of the available ring (EVENT_IDX).
    pub(crate) fn used_event(&self) -> Option<u16> {
        self.avail
            .load::<u16>(4 + 2 * usize::from(self.size()), Ordering::Relaxed)
            .ok()
            .map(u16::from_le)
    }

    /// The head index the driver put in available ring slot `pos % size`.
    pub(crate) fn avail_entry(&self, pos: u16) -> Option<u16> {
        let off = 4 + 2 * usize::from(pos % self.size());
        self.avail
            .get_ref::<u16>(off)
            .ok()
            .map(|r| u16::from_le(r.load()))
    }

    fn desc(&self, index: u16) -> Option<Descriptor> {
        self.desc
            .get_ref::<Descriptor>(DESC_SIZE * usize::from(index))
            .ok()
            .map(|r| r.load())
    }

    /// Writes used element `pos % size`: `{id, len}`.
    pub(crate) fn put_used(&self, pos: u16, id: u16, len: u32) -> bool {
        let off = 4 + USED_ELEM_SIZE * usize::from(pos % self.size());
        let elem = u64::from(id) | (u64::from(len) << 32);
        match self.used.get_ref::<u64>(off) {
            Ok(r) => {
                r.store(elem.to_le());
                true
            }
            Err(_) => false,
        }
    }

    /// Publishes the used index (Release: the elements are visible before it).
    pub(crate) fn publish_used(&self, idx: u16) -> bool {
        self.used.store(idx.to_le(), 2, Ordering::Release).is_ok()
    }

    /// Parses chain `head` if it is the simple case (see the module documentation): its
    /// device-readable bytes (the first `MAX_READABLE`) into `chain.readable` and its
    /// device-writable buffers into `chain.writable`. `None`: let the slow path have it.
    pub(crate) fn parse(
        &self,
        mem: &'m GuestMemory,
        cache: &mut RegionCache<'m>,
        head: u16,
        chain: &mut FastChain<'m>,
    ) -> Option<()> {
        chain.readable_len = 0;
        chain.n_writable = 0;
        chain.writable_len = 0;
        let max_descs = FAST_MAX_DESCS.min(self.size());
        let mut index = head;
        let mut total = 0u32;
        for _ in 0..max_descs {
            if index >= self.size() {
                return None;
            }
            let desc = self.desc(index)?;
            let flags = desc.flags();
            if flags & VRING_DESC_F_INDIRECT != 0 {
                return None;
            }
            let len = desc.len();
            // Zero-length buffers are never sent by Linux: left to the slow path (which
            // ignores them wherever they point, as vm-memory's check_range(addr, 0) holds).
            if len == 0 {
                return None;
            }
            total = total.checked_add(len)?;
            let write = flags & VRING_DESC_F_WRITE != 0;
            if !write && chain.writable_len > 0 {
                return None;
            }
            let buf = cache.slice(mem, desc.addr().0, len as usize)?;
            if write {
                if chain.n_writable == chain.writable.len() {
                    return None;
                }
                chain.writable[chain.n_writable] = Some(buf);
                chain.n_writable += 1;
                chain.writable_len += len as usize;
            } else {
                let room = chain.readable.len() - chain.readable_len;
                let take = room.min(len as usize);
                if take > 0 {
                    let at = chain.readable_len;
                    let src = buf.subslice(0, take).ok()?;
                    if src.copy_to(&mut chain.readable[at..at + take]) != take {
                        return None;
                    }
                    chain.readable_len += take;
                }
            }
            if flags & VRING_DESC_F_NEXT == 0 {
                return Some(());
            }
            index = desc.next();
        }
        // Longer than the fast path walks (or a loop): virtio-queue's rules apply.
        None
    }
}

/// The guest memory region the last buffer was found in (buffers of one guest cluster).
#[derive(Debug, Default)]
pub(crate) struct RegionCache<'m> {
    region: Option<(u64, Slice<'m>)>,
}

impl<'m> RegionCache<'m> {
    /// `[addr, addr + len)` as one host slice, if it lies inside one region.
    pub(crate) fn slice(
        &mut self,
        mem: &'m GuestMemory,
        addr: u64,
        len: usize,
    ) -> Option<Slice<'m>> {
        if let Some((start, slice)) = self.region {
            if let Some(s) = within(start, slice, addr, len) {
                return Some(s);
            }
        }
        let region = mem.find_region(GuestAddress(addr))?;
        let slice = region.as_volatile_slice().ok()?;
        let start = region.start_addr().0;
        self.region = Some((start, slice));
        within(start, slice, addr, len)
    }
}

fn within<'m>(start: u64, slice: Slice<'m>, addr: u64, len: usize) -> Option<Slice<'m>> {
    let off = usize::try_from(addr.checked_sub(start)?).ok()?;
    slice.subslice(off, len).ok()
}

/// Device-writable buffers a fast chain may have (as the slow path accepts).
pub(crate) const FAST_MAX_WRITABLE: usize = 16;

/// One chain parsed by [`Rings::parse`]; reused from chain to chain (no allocation).
#[derive(Debug)]
pub(crate) struct FastChain<'m> {
    pub(crate) readable: [u8; MAX_READABLE],
    pub(crate) readable_len: usize,
    pub(crate) writable: [Option<Slice<'m>>; FAST_MAX_WRITABLE],
    pub(crate) n_writable: usize,
    pub(crate) writable_len: usize,
}

impl Default for FastChain<'_> {
    fn default() -> Self {
        FastChain {
            readable: [0; MAX_READABLE],
            readable_len: 0,
            writable: [None; FAST_MAX_WRITABLE],
            n_writable: 0,
            writable_len: 0,
        }
    }
}

/// Writes sequentially across a fast chain's device-writable slices.
pub(crate) struct SliceWriter<'a, 'm> {
    slices: &'a [Option<Slice<'m>>],
    index: usize,
    offset: usize,
}

impl<'a, 'm> SliceWriter<'a, 'm> {
    pub(crate) fn new(slices: &'a [Option<Slice<'m>>]) -> Self {
        SliceWriter {
            slices,
            index: 0,
            offset: 0,
        }
    }
}

impl ReplySink for SliceWriter<'_, '_> {
    fn write(&mut self, mut bytes: &[u8]) -> bool {
        while !bytes.is_empty() {
            let Some(Some(slice)) = self.slices.get(self.index) else {
                return false;
            };
            let take = (slice.len() - self.offset).min(bytes.len());
            let Ok(dst) = slice.subslice(self.offset, take) else {
                return false;
            };
            dst.copy_from(&bytes[..take]);
            bytes = &bytes[take..];
            self.offset += take;
            if self.offset == slice.len() {
                self.index += 1;
                self.offset = 0;
            }
        }
        true
    }
}

/// `vring_need_event` (virtio 1.x, 2.7.10): whether `event` lies in `[old, new)`. The device's
/// side (its interrupts); the test kit's driver has its own copy for its kicks.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// Device-readable bytes looked at: the longest request (PROBE) is 72.
pub(crate) const MAX_READABLE: usize = 128;

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

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// Two contiguous regions: [0, 64 KiB) and [64 KiB, 128 KiB).
    const SPLIT: u64 = 0x1_0000;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 16;

    fn memory() -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), SPLIT as usize),
            (GuestAddress(SPLIT), SPLIT as usize),
        ])
        .unwrap()
    }

    fn queue() -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        q
    }

    fn put_desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        mem.write_obj(d, GuestAddress(DESC + 16 * u64::from(i)))
            .unwrap();
    }

    fn parse(mem: &GuestMemory, head: u16) -> Option<(Vec<u8>, usize, usize)> {
        let q = queue();
        let rings = Rings::new(&q, mem).unwrap();
        let mut cache = RegionCache::default();
        let mut chain = FastChain::default();
        rings.parse(mem, &mut cache, head, &mut chain)?;
        Some((
            chain.readable[..chain.readable_len].to_vec(),
            chain.n_writable,
            chain.writable_len,
        ))
    }

    #[test]
    fn the_simple_case_is_parsed() {
        let mem = memory();
        mem.write_slice(b"request!", GuestAddress(0x5000)).unwrap();
        put_desc(&mem, 3, 0x5000, 8, VRING_DESC_F_NEXT, 7);
        put_desc(&mem, 7, 0x6000, 4, VRING_DESC_F_WRITE, 0);
        assert_eq!(parse(&mem, 3), Some((b"request!".to_vec(), 1, 4)));
        // Only the first MAX_READABLE bytes are kept.
        put_desc(&mem, 3, 0x5000, 1000, VRING_DESC_F_NEXT, 7);
        let (readable, _, _) = parse(&mem, 3).unwrap();
        assert_eq!(readable.len(), MAX_READABLE);
    }

    #[test]
    fn everything_else_is_left_to_the_slow_path() {
        let mem = memory();
        let w = VRING_DESC_F_WRITE;
        let n = VRING_DESC_F_NEXT;
        // (index, addr, len, flags, next) per descriptor.
        type Descs<'a> = &'a [(u16, u64, u32, u16, u16)];
        let cases: &[(&str, Descs<'_>)] = &[
            ("indirect", &[(0, 0x5000, 32, VRING_DESC_F_INDIRECT, 0)]),
            (
                "a zero-length buffer",
                &[
                    (0, 0xdead_0000, 0, n, 1),
                    (1, 0x5000, 8, n, 2),
                    (2, 0x6000, 4, w, 0),
                ],
            ),
            ("next outside the table", &[(0, 0x5000, 8, n, SIZE)]),
            ("a loop", &[(0, 0x5000, 8, n, 1), (1, 0x5000, 8, n, 0)]),
            (
                "readable after writable",
                &[(0, 0x6000, 4, w | n, 1), (1, 0x5000, 8, 0, 0)],
            ),
            (
                "empty readable after writable",
                &[(0, 0x6000, 4, w | n, 1), (1, 0x5000, 0, 0, 0)],
            ),
            (
                "readable across two regions",
                &[(0, SPLIT - 4, 8, n, 1), (1, 0x6000, 4, w, 0)],
            ),
            (
                "writable across two regions",
                &[(0, 0x5000, 8, n, 1), (1, SPLIT - 2, 4, w, 0)],
            ),
            (
                "writable outside memory",
                &[(0, 0x5000, 8, n, 1), (1, 2 * SPLIT, 4, w, 0)],
            ),
            (
                "lengths overflow u32",
                &[(0, 0x5000, u32::MAX, n, 1), (1, 0x6000, 4, w, 0)],
            ),
        ];
        for (what, descs) in cases {
            for &(i, addr, len, flags, next) in descs.iter() {
                put_desc(&mem, i, addr, len, flags, next);
            }
            assert_eq!(parse(&mem, 0), None, "{what}");
        }
        // A head outside the table is refused before the walk (by the caller); a chain of
        // FAST_MAX_DESCS + 1 descriptors is left alone, one of FAST_MAX_DESCS is taken.
        for i in 0..FAST_MAX_DESCS {
            put_desc(&mem, i, 0x5000, 1, n, i + 1);
        }
        put_desc(&mem, FAST_MAX_DESCS, 0x6000, 4, w, 0);
        assert_eq!(parse(&mem, 0), None, "too long");
        assert_eq!(
            parse(&mem, 1).map(|(r, _, _)| r.len()),
            Some(usize::from(FAST_MAX_DESCS) - 1)
        );
    }

    #[test]
    fn rings_must_lie_in_one_region() {
        let mem = memory();
        let mut q = queue();
        assert!(Rings::new(&q, &mem).is_some());
        // Descriptor table across the region boundary.
        q.set_desc_table_address(Some((SPLIT - 16 * 8) as u32), Some(0));
        assert!(Rings::new(&q, &mem).is_none());
        let mut q = queue();
        q.set_used_ring_address(Some(2 * SPLIT as u32), Some(0));
        assert!(Rings::new(&q, &mem).is_none());
        let mut q = queue();
        q.set_ready(false);
        assert!(Rings::new(&q, &mem).is_none());
    }

    #[test]
    fn used_elements_and_indices() {
        let mem = memory();
        let q = queue();
        let rings = Rings::new(&q, &mem).unwrap();
        // Slot positions wrap with the queue size, indices with u16.
        assert!(rings.put_used(u16::MAX, 5, 4));
        assert!(rings.publish_used(0));
        let slot = USED + 4 + 8 * u64::from(u16::MAX % SIZE);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(slot)).unwrap(), 5);
        assert_eq!(mem.read_obj::<u32>(GuestAddress(slot + 4)).unwrap(), 4);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED + 2)).unwrap(), 0);
        mem.write_obj(
            7u16,
            GuestAddress(AVAIL + 4 + 2 * u64::from(u16::MAX % SIZE)),
        )
        .unwrap();
        assert_eq!(rings.avail_entry(u16::MAX), Some(7));
    }

    #[test]
    fn need_event_is_the_specs() {
        // used_event in [old, new) asks for an interrupt, wrapping included.
        assert!(need_event(3, 4, 0));
        assert!(!need_event(4, 4, 0));
        assert!(need_event(0, 4, 0));
        assert!(need_event(u16::MAX, 2, u16::MAX - 1));
        assert!(!need_event(2, 2, u16::MAX - 1));
        assert!(!need_event(5, 5, 5));
        assert!(need_event(0, 1, 0));
        assert!(!need_event(1, 1, 0));
        assert!(need_event(5, 10, 0));
        assert!(!need_event(10, 10, 0));
        assert!(need_event(0xffff, 2, 0xfffe));
    }
}
