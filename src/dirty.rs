// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The dirty-page log of live migration: every write the daemon makes to guest memory marks
//! the written 4 KiB pages in the log the frontend shared with `VHOST_USER_SET_LOG_BASE`, so
//! that the frontend copies those pages again.
//!
//! [`DirtyLog`] is the bitmap type of every guest memory region (`GuestMemoryMmap<DirtyLog>`):
//! vm-memory calls it on each write through its accessors (`write_slice`, `write_obj`,
//! `store`, and a `VolatileSlice`'s or `VolatileRef`'s writes, the ring fast path's
//! included). Until a log is set, a mark is one relaxed load of a flag; slices of it are a
//! pointer and an offset (no reference count), so the request path pays nothing for the
//! ability. With a log, a mark takes a read lock and sets one bit per page.
//!
//! Pages are the log's (`VHOST_LOG_PAGE`, 4 KiB) and bits are numbered from guest-physical
//! address 0, bit `n` of the log being bit `n % 8` of byte `n / 8`. Used rings are logged the
//! same way, by the guest-physical address the element or index is written at: that is the
//! `log_guest_addr` QEMU gives in `SET_VRING_ADDR` (the used ring's guest-physical address),
//! so `VHOST_VRING_F_LOG` needs nothing of its own.
//!
//! The log is shared memory the frontend reads while the daemon writes it: bits are only ever
//! set, atomically (`fetch_or`), after the write they describe.

use std::{
    fmt, io,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, RwLock, RwLockReadGuard,
    },
};

use vhost_user_backend::bitmap::{AtomicBitmapMmap, BitmapReplace, MemRegionBitmap, MmapLogReg};
use vm_memory::{
    bitmap::{Bitmap, BitmapSlice, WithBitmapSlice},
    mmap::NewBitmap,
    Address, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

/// Guest memory as the backend sees it: every write through it is logged while the frontend
/// asks for a dirty-page log (live migration; see [`crate::dirty`]).
pub type GuestMemory = vm_memory::GuestMemoryMmap<DirtyLog>;

/// The log's page size (vhost's `VHOST_LOG_PAGE`).
pub const LOG_PAGE: u64 = 0x1000;

/// The dirty-page log of one guest memory region: off until the frontend sets a log.
#[derive(Clone, Default)]
pub struct DirtyLog {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// A log is set: checked before the lock, so that a region without a log costs a load.
    on: AtomicBool,
    log: RwLock<Option<RegionLog>>,
}

impl fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirtyLog")
            .field("on", &self.shared.on.load(Ordering::Relaxed))
            .finish()
    }
}

/// A region's view of the frontend's log: which bits stand for its pages.
pub struct RegionLog {
    log: LogMemory,
    /// Guest-physical address of the region's first byte.
    start: u64,
    /// The region's last page number (guest-physical address / 4 KiB): the log covers it.
    last_page: u64,
}

impl fmt::Debug for RegionLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionLog")
            .field("start", &format_args!("{:#x}", self.start))
            .field("last_page", &self.last_page)
            .finish()
    }
}

/// The log's bytes: the frontend's shared memory (or, in unit tests, a local array).
#[derive(Clone)]
enum LogMemory {
    Frontend(Arc<MmapLogReg>),
    #[cfg(test)]
    Local(Arc<Vec<std::sync::atomic::AtomicU8>>),
}

impl LogMemory {
    #[inline]
    fn byte(&self, index: usize) -> &std::sync::atomic::AtomicU8 {
        match self {
            LogMemory::Frontend(log) => &log[index],
            #[cfg(test)]
            LogMemory::Local(log) => &log[index],
        }
    }
}

impl RegionLog {
    /// Sets the bits of the pages of `[offset, offset + len)` (relative to the region). Bytes
    /// past the region's end are not the region's to mark and are ignored.
    fn mark(&self, offset: usize, len: usize) {
        if len == 0 {
            return;
        }
        let Some(first) = self.start.checked_add(offset as u64) else {
            return;
        };
        let last = first.saturating_add(len as u64 - 1) / LOG_PAGE;
        for page in first / LOG_PAGE..=last.min(self.last_page) {
            // In bounds: `new` checked that the log covers the region's last page.
            self.log
                .byte((page / 8) as usize)
                .fetch_or(1 << (page % 8), Ordering::Relaxed);
        }
    }

    fn is_marked(&self, offset: usize) -> bool {
        let Some(addr) = self.start.checked_add(offset as u64) else {
            return false;
        };
        let page = addr / LOG_PAGE;
        page <= self.last_page
            && self.log.byte((page / 8) as usize).load(Ordering::Relaxed) & (1 << (page % 8)) != 0
    }

    /// The same log for another region (the memory table changed while logging).
    pub fn for_region<R: GuestMemoryRegion>(&self, region: &R) -> io::Result<RegionLog> {
        match &self.log {
            LogMemory::Frontend(log) => RegionLog::new(region, log.clone()),
            #[cfg(test)]
            LogMemory::Local(log) => RegionLog::local(region, log.clone()),
        }
    }

    /// The region's pages: its start and last page number.
    fn bounds<R: GuestMemoryRegion>(region: &R) -> io::Result<(u64, u64)> {
        let start = region.start_addr().raw_value();
        let end = region
            .len()
            .checked_sub(1)
            .and_then(|n| start.checked_add(n))
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidData))?;
        Ok((start, end / LOG_PAGE))
    }

    #[cfg(test)]
    fn local<R: GuestMemoryRegion>(
        region: &R,
        log: Arc<Vec<std::sync::atomic::AtomicU8>>,
    ) -> io::Result<RegionLog> {
        let (start, last_page) = Self::bounds(region)?;
        if (last_page / 8) as usize >= log.len() {
            return Err(io::Error::from(io::ErrorKind::InvalidData));
        }
        Ok(RegionLog {
            log: LogMemory::Local(log),
            start,
            last_page,
        })
    }
}

impl MemRegionBitmap for RegionLog {
    /// Refuses a log too short for the region (vhost-user-backend's own bitmap does the
    /// check, so the bounds agree with what the frontend was told) and an empty region.
    fn new<R: GuestMemoryRegion>(region: &R, log: Arc<MmapLogReg>) -> io::Result<Self> {
        <AtomicBitmapMmap as MemRegionBitmap>::new(region, log.clone())?;
        let (start, last_page) = Self::bounds(region)?;
        Ok(RegionLog {
            log: LogMemory::Frontend(log),
            start,
            last_page,
        })
    }
}

impl DirtyLog {
    /// Whether a log is set.
    pub fn is_on(&self) -> bool {
        self.shared.on.load(Ordering::Relaxed)
    }

    /// Stops logging (the frontend cleared `VHOST_F_LOG_ALL`): the log is let go.
    pub fn clear(&self) {
        let mut log = self.shared.log.write().unwrap_or_else(|e| e.into_inner());
        self.shared.on.store(false, Ordering::Release);
        *log = None;
    }

    /// The log set on this region, for a region of a new memory table.
    pub fn region_log<R: GuestMemoryRegion>(&self, region: &R) -> Option<io::Result<RegionLog>> {
        self.read().as_ref().map(|log| log.for_region(region))
    }

    fn read(&self) -> RwLockReadGuard<'_, Option<RegionLog>> {
        self.shared.log.read().unwrap_or_else(|e| e.into_inner())
    }

    #[inline]
    fn mark(&self, offset: usize, len: usize) {
        if !self.shared.on.load(Ordering::Relaxed) {
            return;
        }
        if let Some(log) = self.read().as_ref() {
            log.mark(offset, len);
        }
    }

    fn marked(&self, offset: usize) -> bool {
        self.is_on()
            && self
                .read()
                .as_ref()
                .is_some_and(|log| log.is_marked(offset))
    }
}

/// The dirty-page log of a region (not a slice of it, which is what
/// `GuestMemoryRegion::bitmap` gives).
pub fn of(region: &GuestRegionMmap<DirtyLog>) -> &DirtyLog {
    MmapRegion::bitmap(region)
}

impl BitmapReplace for DirtyLog {
    type InnerBitmap = RegionLog;

    /// SET_LOG_BASE: from now on every write to the region is logged in `log`.
    fn replace(&self, log: RegionLog) {
        let mut slot = self.shared.log.write().unwrap_or_else(|e| e.into_inner());
        *slot = Some(log);
        self.shared.on.store(true, Ordering::Release);
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyLog {
    type S = DirtySlice<'a>;
}

impl Bitmap for DirtyLog {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.marked(offset)
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> DirtySlice<'_> {
        DirtySlice {
            log: self,
            base: offset,
        }
    }
}

impl NewBitmap for DirtyLog {
    fn with_len(_len: usize) -> Self {
        Self::default()
    }
}

/// A part of a region's [`DirtyLog`], starting `base` bytes into the region: what a
/// `VolatileSlice` of guest memory carries. Copied freely (a reference and an offset).
#[derive(Clone, Copy, Debug)]
pub struct DirtySlice<'a> {
    log: &'a DirtyLog,
    base: usize,
}

impl<'b> WithBitmapSlice<'b> for DirtySlice<'_> {
    type S = Self;
}

impl BitmapSlice for DirtySlice<'_> {}

impl Bitmap for DirtySlice<'_> {
    #[inline]
    fn mark_dirty(&self, offset: usize, len: usize) {
        // A wrapped offset marks a page that was not written (never one that was missed): the
        // accessors only mark what they wrote, at offsets they checked.
        self.log.mark(self.base.wrapping_add(offset), len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.log.marked(self.base.wrapping_add(offset))
    }

    #[inline]
    fn slice_at(&self, offset: usize) -> Self {
        DirtySlice {
            log: self.log,
            base: self.base.wrapping_add(offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileMemory};

    use super::*;

    /// A log of `bytes` bytes.
    fn new_log(bytes: usize) -> Arc<Vec<AtomicU8>> {
        Arc::new((0..bytes).map(|_| AtomicU8::new(0)).collect())
    }

    /// The pages whose bits are set.
    fn read_log(log: &[AtomicU8]) -> Vec<u64> {
        (0..log.len() as u64 * 8)
            .filter(|&bit| log[(bit / 8) as usize].load(Ordering::Relaxed) & (1 << (bit % 8)) != 0)
            .collect()
    }

    /// Two regions: 64 KiB at 0 and 64 KiB at 1 MiB; a log for 2 MiB (64 bytes).
    fn memory() -> GuestMemoryMmap<DirtyLog> {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x10_0000), 0x1_0000),
        ])
        .unwrap()
    }

    fn set_log(mem: &GuestMemoryMmap<DirtyLog>, log: &Arc<Vec<AtomicU8>>) {
        for region in mem.iter() {
            let r = RegionLog::local(region, log.clone()).unwrap();
            of(region).replace(r);
        }
    }

    #[test]
    fn nothing_is_marked_without_a_log() {
        let mem = memory();
        mem.write_slice(&[1; 16], GuestAddress(0x1000)).unwrap();
        assert!(!mem.iter().any(|r| of(r).is_on()));
        assert!(!mem
            .find_region(GuestAddress(0))
            .unwrap()
            .bitmap()
            .dirty_at(0x1000));
    }

    #[test]
    fn every_accessor_marks_the_pages_it_wrote() {
        let mem = memory();
        let log = new_log(64);
        set_log(&mem, &log);
        // write_slice across a page boundary: two pages.
        mem.write_slice(&[1; 16], GuestAddress(0x1ff8)).unwrap();
        // write_obj in the second region.
        mem.write_obj(7u32, GuestAddress(0x10_3000)).unwrap();
        // store (atomic, as the used index is written).
        mem.store(9u16, GuestAddress(0x10_5002), Ordering::Release)
            .unwrap();
        // A VolatileSlice's copy_from and a VolatileRef's store (the ring fast path).
        let slice = mem.get_slice(GuestAddress(0x7000), 0x2000).unwrap();
        slice.subslice(0x1000, 8).unwrap().copy_from(&[3u8; 8]);
        slice.get_ref::<u64>(0x10).unwrap().store(5);
        let region = mem.find_region(GuestAddress(0x10_0000)).unwrap();
        let whole = region.as_volatile_slice().unwrap();
        whole.store(1u16, 0x9002, Ordering::Release).unwrap();
        let pages = read_log(&log);
        assert_eq!(pages, [1, 2, 7, 8, 0x103, 0x105, 0x109]);
        // Reads mark nothing.
        let mut buf = [0; 64];
        mem.read_slice(&mut buf, GuestAddress(0xa000)).unwrap();
        assert_eq!(read_log(&log).len(), pages.len());
        assert!(region.bitmap().dirty_at(0x3000));
        assert!(!region.bitmap().dirty_at(0x4000));
    }

    #[test]
    fn a_cleared_log_marks_nothing_more() {
        let mem = memory();
        let log = new_log(64);
        set_log(&mem, &log);
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        for region in mem.iter() {
            of(region).clear();
        }
        mem.write_obj(1u8, GuestAddress(0x4000)).unwrap();
        assert_eq!(read_log(&log), [3]);
    }

    #[test]
    fn a_log_follows_into_a_new_memory_table() {
        let mem = memory();
        let log = new_log(64);
        set_log(&mem, &log);
        let old = of(mem.find_region(GuestAddress(0)).unwrap()).clone();
        let moved: GuestMemoryMmap<DirtyLog> =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0x8_0000), 0x2_0000)]).unwrap();
        for region in moved.iter() {
            of(region).replace(old.region_log(region).unwrap().unwrap());
        }
        moved.write_obj(1u8, GuestAddress(0x9_1000)).unwrap();
        assert_eq!(read_log(&log), [0x91]);
    }

    #[test]
    fn a_log_too_short_for_a_region_is_refused() {
        let log = new_log(64); // 512 pages: 2 MiB
        let region =
            GuestRegionMmap::<DirtyLog>::from_range(GuestAddress(0x20_0000), 0x1000, None).unwrap();
        assert!(RegionLog::local(&region, log.clone()).is_err());
        let region =
            GuestRegionMmap::<DirtyLog>::from_range(GuestAddress(0x1f_f000), 0x1000, None).unwrap();
        let r = RegionLog::local(&region, log.clone()).unwrap();
        // The last page is the region's: marks past it are ignored, not out of bounds.
        r.mark(0, 0x10_0000);
        r.mark(usize::MAX, 2);
        assert_eq!(read_log(&log), [0x1ff]);
    }
}
