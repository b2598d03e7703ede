// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Transparent huge pages for the page-table arena.
//!
//! The model reserves its page-table memory once ([`ownership::Iommu::table_memory`]); with
//! 4 KiB host pages, translations of random IOVAs over large tables miss the TLB on most
//! calls. On hosts where transparent huge pages are "madvise" (the usual default) the arena
//! only gets huge pages when asked, which is what this does. It is advice: it changes neither
//! the memory's contents nor its validity, and a host without THP simply ignores it.

use ownership::Iommu;

const HUGE: usize = 2 << 20;

/// Asks for transparent huge pages on the whole 2 MiB-aligned part of the arena. Returns the
/// bytes advised (0 when the arena is smaller than one huge page).
pub fn advise_table_memory(iommu: &Iommu) -> std::io::Result<usize> {
    let (start, len) = iommu.table_memory();
    let first = start.div_ceil(HUGE) * HUGE;
    let end = (start + len) / HUGE * HUGE;
    if end <= first {
        return Ok(0);
    }
    // SAFETY: madvise(MADV_HUGEPAGE) only changes how the kernel backs the range, not its
    // contents or mapping; the range lies inside the arena's live allocation, which
    // `iommu` borrows, and is page aligned.
    let r = unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_HUGEPAGE) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(end - first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ownership::{Limits, Topology};

    #[test]
    fn advises_the_arena_or_says_why_not() {
        let topo = Topology::builder()
            .endpoints([1])
            .limits(Limits {
                max_table_bytes: 64 << 20,
                ..Limits::default()
            })
            .build()
            .unwrap();
        let iommu = ownership::Iommu::new(topo);
        match advise_table_memory(&iommu) {
            Ok(bytes) => assert!(bytes >= 60 << 20, "advised {bytes} bytes"),
            // Kernels built without THP refuse the advice; nothing else may fail.
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
        }
    }
}
