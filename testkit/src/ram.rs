// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Guest memory: memfd-backed regions shared with the backend, plus a small allocator.

use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs::File,
    os::fd::{FromRawFd, OwnedFd},
    sync::{Arc, Mutex, MutexGuard},
};

use vhost::VhostUserMemoryRegionInfo;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress, VolatileSlice,
};

use super::error::{Error, Result};

/// Size of the page the allocator never hands out at GPA 0.
///
/// virtio-queue treats a ring at GPA 0 as "not configured" (`Queue::iter` returns
/// `QueueNotReady`), and a buffer at address 0 hides null-pointer bugs: the allocator starts
/// above it. Raw descriptors can still point there.
const RESERVED_AT_ZERO: u64 = 0x1000;

/// One guest RAM region: `size` bytes at guest-physical address `gpa`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Size in bytes (a multiple of the host page size).
    pub size: u64,
}

impl MemoryRegion {
    /// A region of `size` bytes at `gpa`.
    pub const fn new(gpa: u64, size: u64) -> Self {
        Self { gpa, size }
    }

    /// One past the last address.
    pub const fn end(&self) -> u64 {
        self.gpa + self.size
    }
}

/// A buffer handed out by [`GuestRam::alloc`]: `len` bytes at guest-physical `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GuestBuf {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// First-fit allocator over one region, free ranges coalesced on free.
#[derive(Debug)]
struct RegionAllocator {
    /// Free ranges, start -> length.
    free: BTreeMap<u64, u64>,
    free_bytes: u64,
}

impl RegionAllocator {
    fn new(start: u64, end: u64) -> Self {
        let mut free = BTreeMap::new();
        if end > start {
            free.insert(start, end - start);
        }
        Self {
            free,
            free_bytes: end.saturating_sub(start),
        }
    }

    fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let (start, flen, addr) = self.free.iter().find_map(|(&start, &flen)| {
            let addr = start.checked_add(align - 1)? & !(align - 1);
            let end = addr.checked_add(len)?;
            (end <= start + flen).then_some((start, flen, addr))
        })?;
        self.free.remove(&start);
        if addr > start {
            self.free.insert(start, addr - start);
        }
        if addr + len < start + flen {
            self.free.insert(addr + len, start + flen - (addr + len));
        }
        self.free_bytes -= len;
        Some(addr)
    }

    /// Returns false (and changes nothing) if the range overlaps a free range.
    fn free(&mut self, addr: u64, len: u64) -> bool {
        let end = addr + len;
        let prev = self.free.range(..=addr).next_back().map(|(&s, &l)| (s, l));
        let next = self.free.range(addr..).next().map(|(&s, &l)| (s, l));
        if prev.is_some_and(|(s, l)| s + l > addr) || next.is_some_and(|(s, _)| s < end) {
            return false;
        }
        let mut start = addr;
        let mut new_len = len;
        if let Some((s, l)) = prev.filter(|(s, l)| s + l == addr) {
            self.free.remove(&s);
            start = s;
            new_len += l;
        }
        if let Some((s, l)) = next.filter(|(s, _)| *s == end) {
            self.free.remove(&s);
            new_len += l;
        }
        self.free.insert(start, new_len);
        self.free_bytes += len;
        true
    }
}

#[derive(Debug)]
struct Inner {
    mmap: GuestMemoryMmap,
    regions: Vec<MemoryRegion>,
    /// One allocator per region, so that no buffer straddles two regions.
    allocators: Mutex<Vec<(MemoryRegion, RegionAllocator)>>,
}

/// Guest RAM as a VMM sees it: memfd-backed regions mapped in this process and shareable with a
/// backend through `SET_MEM_TABLE`.
///
/// Cloning is cheap and shares the same memory and allocator.
#[derive(Debug, Clone)]
pub struct GuestRam {
    inner: Arc<Inner>,
}

/// Default guest RAM: 64 MiB at GPA 0.
pub const DEFAULT_MEMORY_SIZE: u64 = 64 << 20;

fn memfd(size: u64) -> Result<File> {
    const NAME: &CStr = c"vhost-device-iommu-testkit";
    // SAFETY: NAME is a valid NUL-terminated string; memfd_create has no other memory effects.
    let fd = unsafe { libc::memfd_create(NAME.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::MemoryCreate(format!(
            "memfd_create: {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    file.set_len(size)
        .map_err(|e| Error::MemoryCreate(format!("ftruncate memfd to {size}: {e}")))?;
    Ok(file)
}

impl GuestRam {
    /// One region of `size` bytes at GPA 0.
    pub fn with_size(size: u64) -> Result<Self> {
        Self::new(&[MemoryRegion::new(0, size)])
    }

    /// Guest memory made of `regions` (sorted, non-overlapping, page-multiple sizes), each
    /// backed by its own memfd.
    pub fn new(regions: &[MemoryRegion]) -> Result<Self> {
        if regions.is_empty() {
            return Err(Error::InvalidArgument("guest memory needs a region".into()));
        }
        let mut ranges = Vec::with_capacity(regions.len());
        for r in regions {
            let size = usize::try_from(r.size)
                .map_err(|_| Error::InvalidArgument(format!("region too large: {r:?}")))?;
            if size == 0 || r.gpa.checked_add(r.size).is_none() {
                return Err(Error::InvalidArgument(format!("invalid region {r:?}")));
            }
            let file = memfd(r.size)?;
            ranges.push((GuestAddress(r.gpa), size, Some(FileOffset::new(file, 0))));
        }
        let mmap = GuestMemoryMmap::from_ranges_with_files(&ranges)
            .map_err(|e| Error::MemoryCreate(format!("{e} (regions {regions:?})")))?;
        let allocators = regions
            .iter()
            .map(|r| {
                let start = if r.gpa < RESERVED_AT_ZERO {
                    RESERVED_AT_ZERO.min(r.end())
                } else {
                    r.gpa
                };
                (*r, RegionAllocator::new(start, r.end()))
            })
            .collect();
        Ok(Self {
            inner: Arc::new(Inner {
                mmap,
                regions: regions.to_vec(),
                allocators: Mutex::new(allocators),
            }),
        })
    }

    /// The vm-memory view of guest RAM (this process's mapping).
    pub fn mmap(&self) -> &GuestMemoryMmap {
        &self.inner.mmap
    }

    /// The regions, as given at creation.
    pub fn regions(&self) -> &[MemoryRegion] {
        &self.inner.regions
    }

    /// The regions as `SET_MEM_TABLE` describes them (fd, offset, GPA, size, VMM address).
    ///
    /// The file descriptors stay owned by this `GuestRam`.
    pub fn vhost_regions(&self) -> Result<Vec<VhostUserMemoryRegionInfo>> {
        self.inner
            .mmap
            .iter()
            .map(|r| {
                VhostUserMemoryRegionInfo::from_guest_region(r)
                    .map_err(|e| Error::MemoryCreate(format!("region without fd: {e}")))
            })
            .collect()
    }

    /// The VMM virtual address of `gpa`: what `SET_VRING_ADDR` carries.
    pub fn host_address(&self, gpa: u64) -> Result<u64> {
        let region = self
            .inner
            .mmap
            .find_region(GuestAddress(gpa))
            .ok_or_else(|| Error::GuestAccess {
                addr: gpa,
                len: 0,
                reason: "address not in guest memory".into(),
            })?;
        let offset = gpa - region.start_addr().0;
        Ok(region.as_ptr() as u64 + offset)
    }

    /// Whether `[addr, addr + len)` lies inside one region.
    pub fn contains(&self, addr: u64, len: u64) -> bool {
        addr.checked_add(len).is_some_and(|end| {
            self.inner
                .regions
                .iter()
                .any(|r| addr >= r.gpa && end <= r.end())
        })
    }

    fn allocators(&self) -> MutexGuard<'_, Vec<(MemoryRegion, RegionAllocator)>> {
        // A panic while holding the lock cannot leave the allocator half-updated in a way that
        // matters to a test kit; keep going.
        self.inner
            .allocators
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Allocates `len` bytes aligned to `align` (a power of two) in the first region with room.
    pub fn alloc(&self, len: u64, align: u64) -> Result<GuestBuf> {
        if len == 0 || !align.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "alloc of {len} bytes aligned to {align}"
            )));
        }
        self.allocators()
            .iter_mut()
            .find_map(|(_, a)| a.alloc(len, align))
            .map(|addr| GuestBuf { addr, len })
            .ok_or(Error::OutOfGuestMemory { len, align })
    }

    /// Returns a buffer to the allocator. Freeing something not allocated (or twice) is an
    /// error and changes nothing.
    pub fn free(&self, buf: GuestBuf) -> Result<()> {
        let mut allocators = self.allocators();
        let ok = buf.len > 0
            && buf.addr.checked_add(buf.len).is_some()
            && allocators
                .iter_mut()
                .find(|(r, _)| buf.addr >= r.gpa && buf.addr + buf.len <= r.end())
                .is_some_and(|(_, a)| a.free(buf.addr, buf.len));
        if ok {
            Ok(())
        } else {
            Err(Error::InvalidArgument(format!(
                "free of {buf:?}: not an allocated buffer"
            )))
        }
    }

    /// Bytes still free in the allocator (all regions).
    pub fn free_bytes(&self) -> u64 {
        self.allocators().iter().map(|(_, a)| a.free_bytes).sum()
    }

    /// `[addr, addr + len)` as one host slice when it lies inside one region: the accessors'
    /// fast path (a load generator posts and reaps millions of chains per second through
    /// them); everything else takes vm-memory's general path and its errors.
    fn host_slice(&self, addr: u64, len: usize) -> Option<VolatileSlice<'_>> {
        let region = self.inner.mmap.find_region(GuestAddress(addr))?;
        let offset = addr - region.start_addr().0;
        region.get_slice(MemoryRegionAddress(offset), len).ok()
    }

    /// Writes `data` at `addr` (may cross regions only if they are contiguous).
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        if let Some(slice) = self.host_slice(addr, data.len()) {
            slice.copy_from(data);
            return Ok(());
        }
        self.inner
            .mmap
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| Error::GuestAccess {
                addr,
                len: data.len() as u64,
                reason: e.to_string(),
            })
    }

    /// Fills `len` bytes at `addr` with `byte`.
    pub fn fill(&self, addr: u64, len: usize, byte: u8) -> Result<()> {
        const SMALL: usize = 64;
        if len <= SMALL {
            // The common case (a status tail): no 4 KiB pattern to build.
            return self.write(addr, &[byte; SMALL][..len]);
        }
        const CHUNK: usize = 4096;
        let chunk = [byte; CHUNK];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.write(addr + done as u64, &chunk[..n])?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `addr`.
    pub fn read_into(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        if let Some(slice) = self.host_slice(addr, buf.len()) {
            if slice.copy_to(buf) == buf.len() {
                return Ok(());
            }
        }
        self.inner
            .mmap
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| Error::GuestAccess {
                addr,
                len: buf.len() as u64,
                reason: e.to_string(),
            })
    }

    /// Reads `len` bytes at `addr`.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read_into(addr, &mut buf)?;
        Ok(buf)
    }

    /// Reads a little-endian `u16`.
    pub fn read_u16(&self, addr: u64) -> Result<u16> {
        let mut b = [0; 2];
        self.read_into(addr, &mut b)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Reads a little-endian `u32`.
    pub fn read_u32(&self, addr: u64) -> Result<u32> {
        let mut b = [0; 4];
        self.read_into(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Reads a little-endian `u64`.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let mut b = [0; 8];
        self.read_into(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Atomically loads a little-endian `u16` (ring indices shared with the device).
    pub fn load_u16(&self, addr: u64, order: std::sync::atomic::Ordering) -> Result<u16> {
        if let Some(Ok(v)) = self.host_slice(addr, 2).map(|s| s.load::<u16>(0, order)) {
            return Ok(u16::from_le(v));
        }
        self.inner
            .mmap
            .load::<u16>(GuestAddress(addr), order)
            .map(u16::from_le)
            .map_err(|e| Error::GuestAccess {
                addr,
                len: 2,
                reason: e.to_string(),
            })
    }

    /// Atomically stores a little-endian `u16` (ring indices shared with the device).
    pub fn store_u16(&self, addr: u64, val: u16, order: std::sync::atomic::Ordering) -> Result<()> {
        if let Some(Ok(())) = self
            .host_slice(addr, 2)
            .map(|s| s.store(val.to_le(), 0, order))
        {
            return Ok(());
        }
        self.inner
            .mmap
            .store(val.to_le(), GuestAddress(addr), order)
            .map_err(|e| Error::GuestAccess {
                addr,
                len: 2,
                reason: e.to_string(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_first_fit_and_coalesce() {
        let mut a = RegionAllocator::new(0x1000, 0x2000);
        let x = a.alloc(0x100, 0x10).unwrap();
        let y = a.alloc(0x100, 0x100).unwrap();
        let z = a.alloc(0x10, 1).unwrap();
        assert_eq!((x, y, z), (0x1000, 0x1100, 0x1200));
        assert!(a.free(y, 0x100));
        assert!(!a.free(y, 0x100), "double free is refused");
        assert!(a.free(x, 0x100));
        assert!(a.free(z, 0x10));
        assert_eq!(a.free.len(), 1);
        assert_eq!(a.free_bytes, 0x1000);
        assert_eq!(a.alloc(0x1001, 1), None);
        assert_eq!(a.alloc(0x1000, 0x1000), Some(0x1000));
    }

    #[test]
    fn memory_alloc_rw_and_vhost_regions() {
        let mem = GuestRam::new(&[
            MemoryRegion::new(0, 0x10000),
            MemoryRegion::new(0x100000, 0x10000),
        ])
        .unwrap();
        let buf = mem.alloc(0x100, 8).unwrap();
        assert!(buf.addr >= RESERVED_AT_ZERO);
        mem.write(buf.addr, b"hello").unwrap();
        assert_eq!(mem.read(buf.addr, 5).unwrap(), b"hello");
        let big = mem.alloc(0xf000, 0x1000).unwrap();
        assert_eq!(big.addr, 0x100000, "falls through to the second region");
        assert!(mem.read(0x20000, 1).is_err());
        let regions = mem.vhost_regions().unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].guest_phys_addr, 0x100000);
        assert_eq!(
            mem.host_address(0x100010).unwrap(),
            regions[1].userspace_addr + 0x10
        );
        mem.free(buf).unwrap();
        assert!(mem.free(buf).is_err());
    }
}
