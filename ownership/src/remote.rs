// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The model's tables seen from a DMA master in another process.
//!
//! Readers read three things: the global epoch, a control area (the `bypass` flag and a state
//! word and an owner cell per group) and the page-table arena. A model built with
//! [`crate::Iommu::try_new_in`] keeps them in mappings of one file, laid out as
//! [`SharedLayout`] says; a DMA master maps the same file read-only ([`RemoteTables`]) and
//! translates with the very code in-process readers run ([`crate::EndpointView`]): the same
//! owner check, the same walk. Its read-side critical sections use the fenced protocol of
//! [`crate::epoch::enter_fenced`] on slots the writer watches through
//! [`crate::epoch::RemoteReaders`].
//!
//! Everything read from the file is treated as untrusted by the walk (every index is checked,
//! a corrupt tree ends a walk with nothing); the layout a master is told is checked before it
//! is mapped ([`SharedLayout::check`]).

use std::sync::atomic::AtomicU64;

use shm::Words;
use thiserror::Error;

use crate::{
    control_words,
    epoch::{enter_fenced, leave_fenced},
    pagetable::{Arena, FANOUT, MAX_NODES, NODE_BYTES},
    EndpointCell, EndpointId, EndpointView, Fault, Requester, ResvRegion, Tables, Topology,
};

/// Where the readers' words of a model live in a shared file: byte offsets (multiples of
/// [`shm::ALIGN`]) and sizes in 64-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedLayout {
    /// The epoch: word 0 of its window.
    pub epoch_offset: u64,
    pub epoch_words: u64,
    /// The control area: `bypass`, then two words per group.
    pub control_offset: u64,
    pub control_words: u64,
    /// The page-table arena: whole nodes of 512 words.
    pub nodes_offset: u64,
    pub nodes_words: u64,
    /// Groups of the topology (the control area holds their cells).
    pub groups: u32,
}

/// Why a layout, or the mappings made for it, cannot be used.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{0} is not aligned to {align:#x}", align = shm::ALIGN)]
    Misaligned(&'static str),
    #[error("{0} is empty or too large")]
    Size(&'static str),
    #[error("{0} overlaps what comes before it")]
    Overlap(&'static str),
    #[error("the {0} mapping is smaller than the layout says")]
    Short(&'static str),
    #[error("the input range ends below its start")]
    InputRange,
}

fn align_up(bytes: u64) -> Option<u64> {
    bytes.checked_next_multiple_of(shm::ALIGN)
}

impl SharedLayout {
    /// The layout for `groups` groups and an arena of `max_table_bytes` (as
    /// `Limits::max_table_bytes`: whole nodes, at least one, at most [`MAX_TABLE_BYTES`](crate::MAX_TABLE_BYTES)).
    pub fn new(groups: u32, max_table_bytes: u64) -> SharedLayout {
        let nodes = (max_table_bytes / NODE_BYTES).clamp(1, MAX_NODES);
        let control = control_words(groups as usize) as u64;
        let control_offset = shm::ALIGN;
        // At most 2^33 + 16 words of control area: no overflow below.
        let nodes_offset = control_offset + align_up(control * 8).unwrap_or(u64::MAX / 4);
        SharedLayout {
            epoch_offset: 0,
            epoch_words: 1,
            control_offset,
            control_words: control,
            nodes_offset,
            nodes_words: nodes * FANOUT as u64,
            groups,
        }
    }

    /// The layout of a model on `topology`.
    pub fn for_topology(topology: &Topology) -> SharedLayout {
        let groups = u32::try_from(topology.group_count()).unwrap_or(u32::MAX);
        SharedLayout::new(groups, topology.limits().max_table_bytes)
    }

    /// The size of the file: the end of the arena.
    pub fn file_bytes(&self) -> u64 {
        self.nodes_offset
            .saturating_add(self.nodes_words.saturating_mul(8))
    }

    /// Checks a layout read from elsewhere (a DMA master is told it over a socket): windows
    /// aligned, in order, not overlapping, of sizes a model can have.
    pub fn check(&self) -> Result<(), LayoutError> {
        for (what, offset) in [
            ("epoch offset", self.epoch_offset),
            ("control offset", self.control_offset),
            ("nodes offset", self.nodes_offset),
        ] {
            if offset % shm::ALIGN != 0 {
                return Err(LayoutError::Misaligned(what));
            }
        }
        if self.epoch_words == 0 || self.epoch_words > shm::ALIGN / 8 {
            return Err(LayoutError::Size("epoch"));
        }
        if self.control_words < control_words(self.groups as usize) as u64
            || self.control_words > (1 << 34)
        {
            return Err(LayoutError::Size("control area"));
        }
        if self.nodes_words == 0
            || self.nodes_words % FANOUT as u64 != 0
            || self.nodes_words > MAX_NODES * FANOUT as u64
        {
            return Err(LayoutError::Size("arena"));
        }
        let epoch_end = self.epoch_offset + self.epoch_words * 8;
        if self.control_offset < epoch_end {
            return Err(LayoutError::Overlap("control area"));
        }
        let control_end = self
            .control_offset
            .checked_add(self.control_words * 8)
            .ok_or(LayoutError::Size("control area"))?;
        if self.nodes_offset < control_end {
            return Err(LayoutError::Overlap("arena"));
        }
        self.nodes_offset
            .checked_add(self.nodes_words * 8)
            .ok_or(LayoutError::Size("arena"))?;
        Ok(())
    }
}

/// The three windows of a model's shared file, mapped: read-write by the daemon (for
/// [`crate::Iommu::try_new_in`]), read-only by a DMA master (for [`RemoteTables::new`]).
#[derive(Debug)]
pub struct SharedWords {
    pub epoch: Words,
    pub control: Words,
    pub nodes: Words,
}

/// An endpoint as a DMA master knows it: its ID, its group and its reserved regions (what the
/// daemon tells the master when it takes DMA ownership).
#[derive(Debug)]
pub struct RemoteEndpoint {
    id: EndpointId,
    cell: EndpointCell,
}

impl RemoteEndpoint {
    pub fn new(id: EndpointId, group: u32, regions: Vec<ResvRegion>) -> Self {
        RemoteEndpoint {
            id,
            cell: EndpointCell {
                group,
                regions: regions.into_boxed_slice(),
            },
        }
    }

    pub fn id(&self) -> EndpointId {
        self.id
    }

    pub fn group(&self) -> u32 {
        self.cell.group
    }

    pub fn regions(&self) -> &[ResvRegion] {
        &self.cell.regions
    }
}

/// A model's tables mapped from another process: what a DMA master translates with.
///
/// Translating takes a read-side critical section on a slot of the master's (a word the
/// daemon's grace periods watch): [`RemoteTables::enter`], then [`RemoteTables::endpoint`] and
/// the handle's translations, then [`RemoteTables::leave`]. A handle is only valid inside the
/// section it was made in; nothing but the section protocol enforces that here (the client
/// crate wraps it in guards).
#[derive(Debug)]
pub struct RemoteTables {
    tables: Tables,
    epoch: Words,
}

impl RemoteTables {
    /// Tables over the windows of `layout` (checked), for IOVAs in `input_range`.
    pub fn new(
        layout: &SharedLayout,
        words: SharedWords,
        input_range: (u64, u64),
    ) -> Result<Self, LayoutError> {
        layout.check()?;
        if (words.epoch.len() as u64) < layout.epoch_words.max(1) {
            return Err(LayoutError::Short("epoch"));
        }
        if (words.control.len() as u64) < layout.control_words {
            return Err(LayoutError::Short("control"));
        }
        if (words.nodes.len() as u64) < layout.nodes_words {
            return Err(LayoutError::Short("arena"));
        }
        if input_range.1 < input_range.0 {
            return Err(LayoutError::InputRange);
        }
        let arena = Arena::in_words(words.nodes).ok_or(LayoutError::Short("arena"))?;
        let tables = Tables::new(arena, words.control, layout.groups as usize, input_range)
            .ok_or(LayoutError::Short("control"))?;
        Ok(RemoteTables {
            tables,
            epoch: words.epoch,
        })
    }

    /// Enters a read-side critical section on `slot` (fenced, so that the daemon's grace periods see it);
    /// returns the token [`RemoteTables::leave`] needs.
    #[inline]
    pub fn enter(&self, slot: &AtomicU64) -> u64 {
        enter_fenced(&self.epoch[0], slot)
    }

    /// Leaves the section entered with `epoch`.
    #[inline]
    pub fn leave(&self, slot: &AtomicU64, epoch: u64) {
        leave_fenced(slot, epoch)
    }

    /// The current epoch (it moves with every grace period of the writer).
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch[0].load(std::sync::atomic::Ordering::Relaxed) & !1
    }

    /// The owner check and the group's state for `endpoint`: its handle, valid inside the
    /// current section only.
    #[inline(always)]
    pub fn endpoint<'a>(
        &'a self,
        endpoint: &'a RemoteEndpoint,
        requester: Requester,
    ) -> Result<EndpointView<'a>, Fault> {
        self.tables.view(&endpoint.cell, requester)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_are_aligned_ordered_and_checked() {
        let l = SharedLayout::new(3, 1 << 20);
        l.check().unwrap();
        assert_eq!(l.nodes_words, 256 * 512);
        assert_eq!(l.file_bytes(), l.nodes_offset + (1 << 20));
        let huge = SharedLayout::new(u32::MAX, u64::MAX);
        huge.check().unwrap();
        assert!(huge.file_bytes() > huge.nodes_offset);
        let mut bad = l;
        bad.control_offset = 8;
        assert_eq!(bad.check(), Err(LayoutError::Misaligned("control offset")));
        let mut bad = l;
        bad.nodes_offset = l.control_offset;
        assert_eq!(bad.check(), Err(LayoutError::Overlap("arena")));
        let mut bad = l;
        bad.nodes_words = 511;
        assert_eq!(bad.check(), Err(LayoutError::Size("arena")));
        let mut bad = l;
        bad.control_words = 1;
        assert_eq!(bad.check(), Err(LayoutError::Size("control area")));
        let mut bad = l;
        bad.nodes_offset = u64::MAX - shm::ALIGN + 1;
        assert_eq!(bad.check(), Err(LayoutError::Size("arena")));
    }
}
