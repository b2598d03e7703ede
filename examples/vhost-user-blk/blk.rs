// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! virtio-blk requests over any `GuestMemory`: the guest's physical memory, or the IOVA space
//! of `IommuMemory` (every access translated through the virtio-iommu).
//!
//! Everything read from the rings is the guest's and hostile: lengths are summed with checks,
//! a request is bounded ([`MAX_REQUEST_BYTES`]), sectors are checked against the disk, and any
//! refused or failed access fails the request with `VIRTIO_BLK_S_IOERR` (or, when even the
//! status byte cannot be written, completes it with nothing written).

use std::{
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::Path,
};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{desc::split::Descriptor, DescriptorChain};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

pub const SECTOR: u64 = 512;
/// Data bytes one request may carry (Linux sends at most a few MiB); more is refused rather
/// than allocated.
pub const MAX_REQUEST_BYTES: u64 = 32 << 20;
/// Segments per request the device accepts (`seg_max`); the queue size bounds chains anyway.
pub const SEG_MAX: u32 = 126;
/// The serial number GET_ID returns.
const SERIAL: &[u8] = b"vhost-iommu-blk";
/// The request header: type, reserved, sector.
const HEADER_BYTES: usize = 16;

/// The test hook: data DMA of requests starting at `sector` goes to `iova`.
#[derive(Clone, Copy, Debug)]
pub struct Misdirect {
    pub sector: u64,
    pub iova: u64,
}

/// The backing file.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
    read_only: bool,
}

impl Disk {
    pub fn open(path: &Path, read_only: bool) -> io::Result<Disk> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let sectors = file.metadata()?.len() / SECTOR;
        Ok(Disk {
            file,
            sectors,
            read_only,
        })
    }

    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The device's configuration space (`struct virtio_blk_config`; fields past `num_queues`
    /// stay zero).
    pub fn config(&self, queues: u16) -> [u8; 64] {
        let mut c = [0u8; 64];
        c[0..8].copy_from_slice(&self.sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR as u32).to_le_bytes());
        c[34..36].copy_from_slice(&queues.to_le_bytes());
        c
    }

    /// Checks that `len` bytes at `sector` are on the disk; returns the byte offset.
    fn range(&self, sector: u64, len: u64) -> Result<u64, Failed> {
        let end = sector
            .checked_mul(SECTOR)
            .and_then(|start| start.checked_add(len).map(|end| (start, end)));
        match end {
            Some((start, end)) if len % SECTOR == 0 && end <= self.sectors * SECTOR => Ok(start),
            _ => Err(Failed::Request("beyond the disk or not whole sectors")),
        }
    }
}

/// Why a request failed.
#[derive(Debug)]
enum Failed {
    /// The guest's memory refused an access (a translation the guest's tables do not allow,
    /// or an address outside its memory).
    Dma(vm_memory::GuestMemoryError),
    /// The request itself is malformed.
    Request(&'static str),
    /// The disk.
    Io(io::Error),
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Dma(e) => write!(f, "DMA refused: {e}"),
            Failed::Request(why) => write!(f, "bad request: {why}"),
            Failed::Io(e) => write!(f, "disk: {e}"),
        }
    }
}

/// The outcome of one request.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    /// Bytes written into device-writable buffers (the used entry's length).
    pub written: u32,
    pub failed: bool,
}

/// A request's buffers: device-readable ones, then device-writable ones.
struct Buffers {
    readable: Vec<(u64, u64)>,
    writable: Vec<(u64, u64)>,
}

impl Buffers {
    fn collect<I: Iterator<Item = Descriptor>>(descs: I) -> Result<Buffers, Failed> {
        let mut b = Buffers {
            readable: Vec::new(),
            writable: Vec::new(),
        };
        let mut total: u64 = 0;
        for d in descs {
            total = total.saturating_add(u64::from(d.len()));
            if total > MAX_REQUEST_BYTES + HEADER_BYTES as u64 + 1 {
                return Err(Failed::Request("too large"));
            }
            if d.len() == 0 {
                continue;
            }
            let piece = (d.addr().0, u64::from(d.len()));
            if d.is_write_only() {
                b.writable.push(piece);
            } else if b.writable.is_empty() {
                b.readable.push(piece);
            } else {
                return Err(Failed::Request(
                    "a device-readable buffer after a writable one",
                ));
            }
        }
        Ok(b)
    }
}

/// `len` bytes starting `skip` bytes into `pieces`, as pieces.
fn slice_of(pieces: &[(u64, u64)], mut skip: u64, mut len: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(addr, plen) in pieces {
        if len == 0 {
            break;
        }
        if skip >= plen {
            skip -= plen;
            continue;
        }
        let n = (plen - skip).min(len);
        out.push((addr.wrapping_add(skip), n));
        len -= n;
        skip = 0;
    }
    out
}

fn total(pieces: &[(u64, u64)]) -> u64 {
    pieces.iter().map(|p| p.1).sum()
}

fn read_from<M: GuestMemory + ?Sized>(
    mem: &M,
    pieces: &[(u64, u64)],
    out: &mut [u8],
) -> Result<(), Failed> {
    let mut at = 0usize;
    for &(addr, len) in pieces {
        let len = len as usize;
        let buf = out.get_mut(at..at + len).ok_or(Failed::Request("buffer"))?;
        mem.read_slice(buf, GuestAddress(addr))
            .map_err(Failed::Dma)?;
        at += len;
    }
    Ok(())
}

fn write_to<M: GuestMemory + ?Sized>(
    mem: &M,
    pieces: &[(u64, u64)],
    data: &[u8],
) -> Result<(), Failed> {
    let mut at = 0usize;
    for &(addr, len) in pieces {
        let len = len as usize;
        let buf = data.get(at..at + len).ok_or(Failed::Request("buffer"))?;
        mem.write_slice(buf, GuestAddress(addr))
            .map_err(Failed::Dma)?;
        at += len;
    }
    Ok(())
}

/// The data pieces the hook sends elsewhere: one piece at `iova`, as long as the request's.
fn misdirected(hook: Option<Misdirect>, sector: u64, pieces: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    match hook {
        Some(h) if h.sector == sector && !pieces.is_empty() => vec![(h.iova, total(&pieces))],
        _ => pieces,
    }
}

/// Serves one request; the caller puts it on the used ring with [`Outcome::written`].
pub fn serve<M>(chain: DescriptorChain<M>, disk: &Disk, hook: Option<Misdirect>) -> Outcome
where
    M: std::ops::Deref + Clone,
    M::Target: GuestMemory,
{
    let mem = chain.memory();
    let buffers = match Buffers::collect(chain.clone()) {
        Ok(b) => b,
        Err(e) => {
            vhost_device_iommu::log_limited!(log::Level::Warn, "request refused: {e}");
            // Without a trustworthy layout the status byte has no safe place either.
            return Outcome {
                written: 0,
                failed: true,
            };
        }
    };
    // The status byte: the last byte of the last device-writable buffer.
    let Some(&(last_addr, last_len)) = buffers.writable.last() else {
        vhost_device_iommu::log_limited!(log::Level::Warn, "request with no status byte");
        return Outcome {
            written: 0,
            failed: true,
        };
    };
    let status_addr = last_addr.wrapping_add(last_len - 1);
    let writable_data = slice_of(&buffers.writable, 0, total(&buffers.writable) - 1);
    let (status, written) = match handle(mem, disk, hook, &buffers, &writable_data) {
        Ok(written) => (VIRTIO_BLK_S_OK, written),
        Err((Failed::Request("unsupported"), _)) => (VIRTIO_BLK_S_UNSUPP, 0),
        Err((e, written)) => {
            vhost_device_iommu::log_limited!(log::Level::Warn, "request failed: {e}");
            (VIRTIO_BLK_S_IOERR, written)
        }
    };
    match mem.write_obj(status as u8, GuestAddress(status_addr)) {
        Ok(()) => Outcome {
            written: written.saturating_add(1),
            failed: status != VIRTIO_BLK_S_OK,
        },
        Err(e) => {
            vhost_device_iommu::log_limited!(
                log::Level::Warn,
                "request's status byte at {status_addr:#x}: {e}"
            );
            Outcome {
                written: 0,
                failed: true,
            }
        }
    }
}

/// The request's work; returns the data bytes written into the guest's buffers (also on
/// failure, with the error).
fn handle<M: GuestMemory + ?Sized>(
    mem: &M,
    disk: &Disk,
    hook: Option<Misdirect>,
    buffers: &Buffers,
    writable_data: &[(u64, u64)],
) -> Result<u32, (Failed, u32)> {
    let header_pieces = slice_of(&buffers.readable, 0, HEADER_BYTES as u64);
    if total(&header_pieces) != HEADER_BYTES as u64 {
        return Err((Failed::Request("short header"), 0));
    }
    let mut header = [0u8; HEADER_BYTES];
    read_from(mem, &header_pieces, &mut header).map_err(|e| (e, 0))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes([
        header[8], header[9], header[10], header[11], header[12], header[13], header[14],
        header[15],
    ]);
    let readable_data = slice_of(
        &buffers.readable,
        HEADER_BYTES as u64,
        total(&buffers.readable).saturating_sub(HEADER_BYTES as u64),
    );
    match kind {
        VIRTIO_BLK_T_IN => {
            let len = total(writable_data);
            let offset = disk.range(sector, len).map_err(|e| (e, 0))?;
            let mut data = vec![0u8; len as usize];
            disk.file
                .read_exact_at(&mut data, offset)
                .map_err(|e| (Failed::Io(e), 0))?;
            let pieces = misdirected(hook, sector, writable_data.to_vec());
            write_to(mem, &pieces, &data).map_err(|e| (e, 0))?;
            Ok(len as u32)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only {
                return Err((Failed::Request("read-only"), 0));
            }
            let len = total(&readable_data);
            let offset = disk.range(sector, len).map_err(|e| (e, 0))?;
            let mut data = vec![0u8; len as usize];
            let pieces = misdirected(hook, sector, readable_data);
            read_from(mem, &pieces, &mut data).map_err(|e| (e, 0))?;
            disk.file
                .write_all_at(&data, offset)
                .map_err(|e| (Failed::Io(e), 0))?;
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            disk.file.sync_data().map_err(|e| (Failed::Io(e), 0))?;
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
            id[..SERIAL.len()].copy_from_slice(SERIAL);
            let n = total(writable_data).min(id.len() as u64);
            let pieces = slice_of(writable_data, 0, n);
            write_to(mem, &pieces, &id[..n as usize]).map_err(|e| (e, 0))?;
            Ok(n as u32)
        }
        _ => Err((Failed::Request("unsupported"), 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_skip_and_cut() {
        let p = [(0x1000, 16), (0x2000, 100), (0x3000, 1)];
        assert_eq!(slice_of(&p, 0, 16), vec![(0x1000, 16)]);
        assert_eq!(slice_of(&p, 16, 100), vec![(0x2000, 100)]);
        assert_eq!(slice_of(&p, 10, 10), vec![(0x100a, 6), (0x2000, 4)]);
        assert_eq!(slice_of(&p, 200, 10), vec![]);
    }
}
