// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Words of memory mapped with mmap(2), seen as `[AtomicU64]`.
//!
//! The page tables' readers and writer share nothing but atomic 64-bit words (see the
//! `ownership` crate). This crate holds the one piece of `unsafe` that putting those words in
//! mapped memory takes, so that the model itself stays free of it:
//!
//! - [`Words::anonymous`]: memory of this process only, zeroed, committed as it is first
//!   written (what an in-process model uses);
//! - [`Words::map`]: a window of a file, normally a [`memfd`], mapped shared: the daemon maps
//!   its page tables read-write, a DMA master in another process maps the same file
//!   read-only, and both see the same words.
//!
//! A read-only [`Words`] still hands out `&[AtomicU64]`: storing through it faults (SIGSEGV).
//! Its owner only loads, and only with `Ordering::Relaxed` (what the standard library
//! guarantees to work on read-only memory); ordering comes from fences.
//!
//! Every mapping is checked against its file before it is made: a window past the end of the
//! file would raise SIGBUS on first access. A file another process could shrink afterwards is
//! sealed against it ([`SEAL_SHRINK`]); see [`seals`].

use std::{
    ffi::CString,
    fmt, io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    ptr::NonNull,
    sync::{atomic::AtomicU64, OnceLock},
};

/// Seals of a memfd (fcntl(2) F_ADD_SEALS): no shrinking, no growing, no further seals, no new
/// writable shared mapping (mappings made before stay writable).
pub const SEAL_SHRINK: i32 = libc::F_SEAL_SHRINK;
pub const SEAL_GROW: i32 = libc::F_SEAL_GROW;
pub const SEAL_SEAL: i32 = libc::F_SEAL_SEAL;
pub const SEAL_FUTURE_WRITE: i32 = libc::F_SEAL_FUTURE_WRITE;

/// Offsets of windows inside a shared file are multiples of this: a multiple of every page
/// size Linux runs with (4, 16 and 64 KiB), so one layout maps on every host.
pub const ALIGN: u64 = 64 << 10;

/// Bytes per word.
const WORD: usize = std::mem::size_of::<AtomicU64>();

/// How a window of a file is mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// PROT_READ: loads only (a store faults).
    ReadOnly,
    /// PROT_READ | PROT_WRITE.
    ReadWrite,
}

/// Mapped memory seen as `[AtomicU64]`; unmapped when dropped.
pub struct Words {
    ptr: NonNull<AtomicU64>,
    len: usize,
    access: Access,
    shared: bool,
}

// SAFETY: the mapping belongs to this value alone (unmapped once, in `drop`), and the memory is
// only ever reached as `[AtomicU64]`, which any number of threads may use at once.
unsafe impl Send for Words {}
// SAFETY: as above: shared references hand out atomics only.
unsafe impl Sync for Words {}

impl fmt::Debug for Words {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Words")
            .field("len", &self.len)
            .field("access", &self.access)
            .field("shared", &self.shared)
            .finish()
    }
}

/// The host's page size.
pub fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf only reads a system parameter.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        usize::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

fn bytes_of(len: usize) -> io::Result<usize> {
    match len.checked_mul(WORD) {
        Some(bytes) if len > 0 && bytes <= isize::MAX as usize => Ok(bytes),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("cannot map {len} words"),
        )),
    }
}

impl Words {
    /// `len` zeroed words of this process's own memory (private, anonymous, reserved as
    /// address space and committed as pages are first written).
    pub fn anonymous(len: usize) -> io::Result<Words> {
        let bytes = bytes_of(len)?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel overlaps nothing this process
        // uses; the result is checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        Self::adopt(ptr, len, Access::ReadWrite, false)
    }

    /// `len` words of the file `fd` from byte `offset` (a multiple of the page size), mapped
    /// shared: writes by any process mapping the file are seen here. Refused when the file is
    /// shorter than the window (an access past its end would raise SIGBUS).
    pub fn map(fd: BorrowedFd<'_>, offset: u64, len: usize, access: Access) -> io::Result<Words> {
        let bytes = bytes_of(len)?;
        if offset % page_size() as u64 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset:#x} is not page aligned"),
            ));
        }
        let size = file_size(fd)?;
        if offset
            .checked_add(bytes as u64)
            .is_none_or(|end| end > size)
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("window {offset:#x}+{bytes:#x} is past the end of the file ({size:#x})"),
            ));
        }
        let offset = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))?;
        let prot = match access {
            Access::ReadOnly => libc::PROT_READ,
            Access::ReadWrite => libc::PROT_READ | libc::PROT_WRITE,
        };
        // SAFETY: a new shared mapping at an address the kernel chooses overlaps nothing this
        // process uses; the file covers the whole window (checked above); the result is
        // checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset,
            )
        };
        Self::adopt(ptr, len, access, true)
    }

    fn adopt(
        ptr: *mut libc::c_void,
        len: usize,
        access: Access,
        shared: bool,
    ) -> io::Result<Words> {
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<AtomicU64>())
            .ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Words {
            ptr,
            len,
            access,
            shared,
        })
    }

    /// Words mapped.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: an empty mapping is refused.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn access(&self) -> Access {
        self.access
    }

    /// Whether the words live in a file other processes may map.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Where the words live: start address and length in bytes, for a caller that advises the
    /// kernel about the memory (huge pages); never dereferenced here.
    pub fn address_range(&self) -> (usize, usize) {
        (self.ptr.as_ptr() as usize, self.len * WORD)
    }
}

impl std::ops::Deref for Words {
    type Target = [AtomicU64];

    #[inline(always)]
    fn deref(&self) -> &[AtomicU64] {
        // SAFETY: `ptr` is the start of a live mapping of `len` words (page aligned, so
        // aligned for AtomicU64) that this value owns until it is dropped; the memory is only
        // ever used through atomics, here and in every other process that maps it.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Words {
    fn drop(&mut self) {
        // SAFETY: the mapping was made by `mmap` with this address and length and is unmapped
        // only here; no reference into it outlives `self` (they borrow it).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len * WORD) };
    }
}

/// A new memfd of `bytes` zeroed bytes (close-on-exec, sealable), named `name` for
/// /proc/<pid>/fd.
pub fn memfd(name: &str, bytes: u64) -> io::Result<OwnedFd> {
    let name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let fd =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: memfd_create just returned this descriptor and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let size = libc::off_t::try_from(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "memfd size out of range"))?;
    // SAFETY: ftruncate on a descriptor this function owns.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Adds seals (`SEAL_*`) to a memfd.
pub fn add_seals(fd: BorrowedFd<'_>, seals: i32) -> io::Result<()> {
    // SAFETY: F_ADD_SEALS takes an int and changes only the file's seals.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The seals of a file (0 for a file that cannot be sealed).
pub fn seals(fd: BorrowedFd<'_>) -> io::Result<i32> {
    // SAFETY: F_GET_SEALS takes no argument and only reads.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    if seals < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(0),
            _ => Err(e),
        };
    }
    Ok(seals)
}

/// The size of the file behind `fd`, in bytes.
pub fn file_size(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `stat`, which outlives the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    u64::try_from(stat.st_size).map_err(|_| io::Error::other("negative file size"))
}

#[cfg(test)]
mod tests {
    use std::{os::fd::AsFd, sync::atomic::Ordering::Relaxed};

    use super::*;

    #[test]
    fn anonymous_words_are_zeroed_and_writable() {
        let w = Words::anonymous(1024).unwrap();
        assert_eq!(w.len(), 1024);
        assert!(w.iter().all(|w| w.load(Relaxed) == 0));
        w[1023].store(7, Relaxed);
        assert_eq!(w[1023].load(Relaxed), 7);
        assert!(!w.is_shared());
        assert!(Words::anonymous(0).is_err());
        assert!(Words::anonymous(usize::MAX).is_err());
    }

    #[test]
    fn two_mappings_of_a_memfd_share_words() {
        let fd = memfd("shm-test", 2 * ALIGN).unwrap();
        let writer = Words::map(fd.as_fd(), ALIGN, 16, Access::ReadWrite).unwrap();
        let reader = Words::map(fd.as_fd(), ALIGN, 16, Access::ReadOnly).unwrap();
        writer[3].store(0xfeed, Relaxed);
        assert_eq!(reader[3].load(Relaxed), 0xfeed);
        assert_eq!(reader.access(), Access::ReadOnly);
        assert!(reader.is_shared());
    }

    #[test]
    fn windows_past_the_file_or_misaligned_are_refused() {
        let fd = memfd("shm-test", ALIGN).unwrap();
        let past = Words::map(fd.as_fd(), 0, (ALIGN as usize / WORD) + 1, Access::ReadOnly);
        assert_eq!(past.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let past = Words::map(fd.as_fd(), ALIGN, 1, Access::ReadOnly);
        assert_eq!(past.unwrap_err().kind(), io::ErrorKind::InvalidData);
        let odd = Words::map(fd.as_fd(), 8, 1, Access::ReadOnly);
        assert_eq!(odd.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        let overflow = Words::map(fd.as_fd(), u64::MAX - 4095, 1, Access::ReadOnly);
        assert!(overflow.is_err());
    }

    #[test]
    fn sealed_against_writable_mappings_and_shrinking() {
        let fd = memfd("shm-test", ALIGN).unwrap();
        let writer = Words::map(fd.as_fd(), 0, 8, Access::ReadWrite).unwrap();
        add_seals(
            fd.as_fd(),
            SEAL_SHRINK | SEAL_GROW | SEAL_FUTURE_WRITE | SEAL_SEAL,
        )
        .unwrap();
        let s = seals(fd.as_fd()).unwrap();
        assert_eq!(s & SEAL_SHRINK, SEAL_SHRINK);
        // The mapping made before the seal stays writable; a new one cannot be.
        writer[0].store(1, Relaxed);
        assert!(Words::map(fd.as_fd(), 0, 8, Access::ReadWrite).is_err());
        let reader = Words::map(fd.as_fd(), 0, 8, Access::ReadOnly).unwrap();
        assert_eq!(reader[0].load(Relaxed), 1);
        // SAFETY: ftruncate on a descriptor the test owns; the seal refuses it.
        let r = unsafe { libc::ftruncate(fd.as_raw_fd(), 0) };
        assert_ne!(r, 0);
    }
}
