// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's readers' words in a memfd, for DMA masters in other processes.

use std::{
    io,
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    sync::{Mutex, Weak},
};

use log::{debug, warn};
use ownership::{Iommu, SharedLayout, SharedWords, Topology};
use shm::{Access, Words};

/// The file masters map: the epoch, the control area and the page tables of the model, laid
/// out as `layout` says. Sealed: it never shrinks or grows, and nobody maps it writable but
/// the daemon (where the kernel supports the seal). Also the list of the masters attached to
/// it, for `stats`.
#[derive(Debug)]
pub struct SharedTables {
    fd: OwnedFd,
    layout: SharedLayout,
    pub(super) listed: Mutex<Vec<Weak<super::Listed>>>,
}

impl SharedTables {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn layout(&self) -> &SharedLayout {
        &self.layout
    }
}

/// A model whose tables live in a new sealed memfd, and that memfd.
pub fn model(topology: &Topology) -> io::Result<(Iommu, SharedTables)> {
    let layout = SharedLayout::for_topology(topology);
    let fd = shm::memfd("vhost-device-iommu-tables", layout.file_bytes())?;
    let map = |offset: u64, words: u64| {
        let words = usize::try_from(words)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "tables too large"))?;
        Words::map(fd.as_fd(), offset, words, Access::ReadWrite)
    };
    let words = SharedWords {
        epoch: map(layout.epoch_offset, layout.epoch_words)?,
        control: map(layout.control_offset, layout.control_words)?,
        nodes: map(layout.nodes_offset, layout.nodes_words)?,
    };
    // The daemon's writable mappings exist: from now on nobody maps the file writable, and
    // its size is fixed (a master could otherwise be made to fault past its end).
    let fixed = shm::SEAL_SHRINK | shm::SEAL_GROW;
    match shm::add_seals(fd.as_fd(), fixed | shm::SEAL_FUTURE_WRITE | shm::SEAL_SEAL) {
        Ok(()) => {}
        Err(e) => {
            warn!("tables memfd: no F_SEAL_FUTURE_WRITE ({e}); masters could map it writable");
            shm::add_seals(fd.as_fd(), fixed | shm::SEAL_SEAL)?;
        }
    }
    let iommu = Iommu::try_new_in(topology.clone(), words)
        .map_err(|e| io::Error::new(io::ErrorKind::OutOfMemory, e.to_string()))?;
    debug!(
        "page tables in a memfd of {} bytes for DMA masters",
        layout.file_bytes()
    );
    Ok((
        iommu,
        SharedTables {
            fd,
            layout,
            listed: Mutex::new(Vec::new()),
        },
    ))
}
