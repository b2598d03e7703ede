//! Radix page tables that readers walk without locks while one writer maps and unmaps.
//!
//! Every domain is a tree of 4 KiB nodes of 512 atomic entries (9 bits per level over a 4 KiB
//! base page, as x86 and Arm page tables). A leaf may sit at level 0 (4 KiB), 1 (2 MiB) or
//! 2 (1 GiB) when the IOVA and the GPA are both aligned to that size, so big mappings cost a
//! few entries. Each leaf records whether it is the first and/or the last entry of the mapping
//! one MAP created, so a mapping is never split (spec U4) without a side index: the bits at the
//! two ends of an UNMAP range tell whether it would cut a mapping.
//!
//! Nodes live in an [`Arena`] addressed by `u32` index: one array allocated once that never
//! moves, so a reader that loaded an index can always dereference it (safe Rust, no pointers).
//! A node that is unlinked from a tree is only reused after a grace period
//! ([`crate::epoch`]), so a reader never walks a recycled node.

use std::sync::atomic::{AtomicU64, Ordering};

use zerocopy::FromZeros;

/// Base page shift: the leaf size at level 0.
pub const PAGE_SHIFT: u32 = 12;
/// Offset bits of a base page.
pub const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;
/// Index bits per level.
pub const LEVEL_BITS: u32 = 9;
/// Entries per node.
pub const FANOUT: usize = 1 << LEVEL_BITS;
/// Bytes one node occupies.
pub const NODE_BYTES: u64 = (FANOUT * 8) as u64;
/// Leaves exist up to this level (level 2 = 1 GiB).
const MAX_LEAF_LEVEL: u32 = 2;

const KIND_MASK: u64 = 0b11;
const KIND_LEAF: u64 = 0b01;
const KIND_TABLE: u64 = 0b10;
/// Leaf permission and type bits, as stored (a mapping's flags).
pub const PERM_READ: u64 = 1 << 2;
pub const PERM_WRITE: u64 = 1 << 3;
pub const PERM_MMIO: u64 = 1 << 4;
pub const PERM_MASK: u64 = PERM_READ | PERM_WRITE | PERM_MMIO;
/// The leaf is the first / last entry of its mapping.
const FIRST: u64 = 1 << 5;
const LAST: u64 = 1 << 6;
/// Leaf: the GPA of the entry's first byte (a table entry holds [`CHILD_MASK`] bits instead).
const ADDR_MASK: u64 = !((1 << PAGE_SHIFT) - 1);

/// Table entry: the child's first entry index (node index times [`FANOUT`]), so a walk gets
/// the next node's position with one mask.
const CHILD_MASK: u64 = !(FANOUT as u64 - 1);

#[inline]
fn table_entry(child: u32) -> u64 {
    (u64::from(child) << LEVEL_BITS) | KIND_TABLE
}

#[inline]
fn child_of(entry: u64) -> u32 {
    (entry >> LEVEL_BITS) as u32
}

/// Shift of the span one entry covers at `level`.
#[inline]
pub const fn level_shift(level: u32) -> u32 {
    PAGE_SHIFT + LEVEL_BITS * level
}

#[inline]
fn entry_index(iova: u64, level: u32) -> usize {
    ((iova >> level_shift(level)) as usize) & (FANOUT - 1)
}

/// Bytes one entry spans at `level` (saturating: the top level of a 64-bit table).
#[inline]
fn span(level: u32) -> u64 {
    1u64.checked_shl(level_shift(level)).unwrap_or(0)
}

/// The last IOVA a tree of `levels` levels covers.
pub fn coverage_end(levels: u32) -> u64 {
    match 1u64.checked_shl(level_shift(levels)) {
        Some(size) => size - 1,
        None => u64::MAX,
    }
}

/// Levels needed to cover IOVAs up to `input_end`.
pub fn levels_for(input_end: u64) -> u32 {
    let bits = 64 - input_end.leading_zeros();
    bits.saturating_sub(PAGE_SHIFT).div_ceil(LEVEL_BITS).max(1)
}

/// Fixed-capacity node storage shared by the writer and all readers: one flat array of
/// entries, node `i` at `[i * FANOUT, (i + 1) * FANOUT)`. It is allocated zeroed and the OS
/// commits its pages only when a node is first written, so the capacity is address space, not
/// memory. A reader reaches an entry with one load.
pub struct Arena {
    entries: Box<[AtomicU64]>,
    capacity: u32,
}

impl Arena {
    /// An arena that will never hold more than `max_nodes` nodes, or None when the host will
    /// not reserve that much address space.
    pub fn new(max_nodes: u64) -> Option<Self> {
        let capacity = max_nodes.clamp(1, 1 << 30) as u32;
        let entries = <[AtomicU64]>::new_box_zeroed_with_elems(capacity as usize * FANOUT).ok()?;
        Some(Arena { entries, capacity })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Where the arena's entries live: start address and length in bytes, for a caller that
    /// wants to advise the kernel about the memory (huge pages); never dereferenced here.
    pub fn address_range(&self) -> (usize, usize) {
        (
            self.entries.as_ptr() as usize,
            std::mem::size_of_val(&*self.entries),
        )
    }

    #[inline]
    fn entry(&self, node: u32, index: usize) -> Option<&AtomicU64> {
        self.entries
            .get(node as usize * FANOUT + (index & (FANOUT - 1)))
    }

    #[inline]
    fn load(&self, node: u32, index: usize) -> u64 {
        self.entry(node, index)
            .map_or(0, |e| e.load(Ordering::Acquire))
    }

    #[inline]
    fn store(&self, node: u32, index: usize, value: u64) {
        if let Some(e) = self.entry(node, index) {
            e.store(value, Ordering::Release);
        }
    }

    /// Zeroes a node nobody can reach any more.
    fn clear_node(&self, node: u32) {
        let start = node as usize * FANOUT;
        if let Some(entries) = self.entries.get(start..start + FANOUT) {
            for e in entries {
                e.store(0, Ordering::Relaxed);
            }
        }
    }
}

/// A leaf found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// First IOVA the entry covers.
    pub base: u64,
    /// Last IOVA the entry covers.
    pub end: u64,
    /// GPA of `base`.
    pub gpa: u64,
    /// `PERM_*` bits.
    pub perms: u64,
    /// The entry starts / ends its mapping.
    pub first: bool,
    pub last: bool,
}

impl Leaf {
    fn decode(entry: u64, iova: u64, level: u32) -> Self {
        let size = span(level);
        let base = iova & !(size.wrapping_sub(1));
        Leaf {
            base,
            end: base.wrapping_add(size.wrapping_sub(1)),
            gpa: entry & ADDR_MASK,
            perms: entry & PERM_MASK,
            first: entry & FIRST != 0,
            last: entry & LAST != 0,
        }
    }
}

/// The leaf entry covering `iova` and its level: the fast path's walk, kept small so that the
/// cache misses of consecutive walks overlap. The caller has checked `iova` against the input
/// range (which the tree covers) and is inside a read-side critical section (see
/// [`crate::epoch`]) so no node it reads is recycled.
#[inline(always)]
pub fn walk(arena: &Arena, root: u32, levels: u32, iova: u64) -> Option<(u64, u32)> {
    // One copy of the walk per tree height, each fully unrolled with constant shifts: the
    // instructions per translation bound how many translations' misses the CPU overlaps.
    match levels {
        4 => walk_from(arena, root, 3, iova),
        3 => walk_from(arena, root, 2, iova),
        5 => walk_from(arena, root, 4, iova),
        6 => walk_from(arena, root, 5, iova),
        2 => walk_from(arena, root, 1, iova),
        _ => walk_from(arena, root, 0, iova),
    }
}

#[inline(always)]
fn walk_from(arena: &Arena, root: u32, top: u32, iova: u64) -> Option<(u64, u32)> {
    let entries: &[AtomicU64] = &arena.entries;
    let mut base = root as usize * FANOUT;
    let mut level = top;
    loop {
        let entry = entries
            .get(base | entry_index(iova, level))?
            .load(Ordering::Acquire);
        if entry & KIND_TABLE != 0 && level > 0 {
            base = (entry & CHILD_MASK) as usize;
            level -= 1;
            continue;
        }
        return (entry & KIND_MASK == KIND_LEAF).then_some((entry, level));
    }
}

/// GPA of `iova` through a leaf `entry` at `level`, and the bytes left in the entry from there.
#[inline(always)]
pub fn leaf_target(entry: u64, level: u32, iova: u64) -> (u64, u64) {
    // Leaves sit at level 2 at most, so the shift never overflows (and wraps, unchecked, if
    // a corrupt level ever came here).
    let mask = 1u64.wrapping_shl(level_shift(level)).wrapping_sub(1);
    let offset = iova & mask;
    ((entry & ADDR_MASK) + offset, mask - offset + 1)
}

/// Walks the tree rooted at `root` to the leaf covering `iova`, decoded.
pub fn lookup(arena: &Arena, root: u32, levels: u32, iova: u64) -> Option<Leaf> {
    if iova > coverage_end(levels) {
        return None;
    }
    walk(arena, root, levels, iova).map(|(entry, level)| Leaf::decode(entry, iova, level))
}

/// A mapping as one MAP created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
    pub phys_start: u64,
    /// `PERM_*` bits.
    pub perms: u64,
}

/// Why a page-table update was refused. Nothing changed in either case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// Not enough free nodes for the update.
    NoMemory,
    /// UNMAP would cut a mapping (spec U4).
    WouldSplit,
}

/// The writer's half: node allocation and tree updates. Exactly one exists per arena and it is
/// driven through `&mut`, so updates never race each other; readers race only with stores of
/// whole entries.
#[derive(Debug)]
pub struct TableWriter {
    levels: u32,
    /// Never-used indices start here.
    watermark: u32,
    free: Vec<u32>,
    /// Unlinked nodes waiting for a grace period before reuse.
    retired: Vec<u32>,
    /// Non-empty entries per node (writer-only bookkeeping).
    live: Vec<u16>,
}

impl TableWriter {
    pub fn new(levels: u32) -> Self {
        TableWriter {
            levels,
            watermark: 0,
            free: Vec::new(),
            retired: Vec::new(),
            live: Vec::new(),
        }
    }

    pub fn levels(&self) -> u32 {
        self.levels
    }

    /// Nodes in use or waiting for reuse.
    pub fn nodes_in_use(&self) -> u64 {
        u64::from(self.watermark) - self.free.len() as u64
    }

    fn available(&self, arena: &Arena) -> u64 {
        u64::from(arena.capacity() - self.watermark) + self.free.len() as u64
    }

    fn alloc(&mut self, arena: &Arena) -> Option<u32> {
        let index = match self.free.pop() {
            Some(index) => index,
            None if self.watermark < arena.capacity() => {
                let index = self.watermark;
                self.watermark += 1;
                self.live.push(0);
                index
            }
            None => return None,
        };
        Some(index)
    }

    /// A new empty tree, or None when the arena is full.
    pub fn new_root(&mut self, arena: &Arena) -> Option<u32> {
        self.alloc(arena)
    }

    /// Unlinks every node of the tree for reuse after the next grace period. The caller must
    /// already have made the root unreachable for new readers.
    pub fn retire_tree(&mut self, arena: &Arena, root: u32) {
        self.retire_subtree(arena, root, self.levels - 1);
    }

    fn retire_subtree(&mut self, arena: &Arena, node: u32, level: u32) {
        if level > 0 && self.live[node as usize] > 0 {
            for index in 0..FANOUT {
                let entry = arena.load(node, index);
                if entry & KIND_MASK == KIND_TABLE {
                    self.retire_subtree(arena, child_of(entry), level - 1);
                }
            }
        }
        self.retired.push(node);
    }

    /// Whether some nodes wait for a grace period.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty()
    }

    /// Makes retired nodes reusable. Call only after a grace period that began after they were
    /// unlinked: no reader can still hold their index.
    pub fn reclaim(&mut self, arena: &Arena) {
        // Drained, not dropped: the list keeps its capacity, so retiring nodes on the
        // request path does not allocate once it has grown to its working size.
        let mut retired = std::mem::take(&mut self.retired);
        for node in retired.drain(..) {
            arena.clear_node(node);
            self.live[node as usize] = 0;
            self.free.push(node);
        }
        self.retired = retired;
    }

    /// Whether any leaf intersects `[start, end]`.
    pub fn any_mapped(&self, arena: &Arena, root: u32, start: u64, end: u64) -> bool {
        let end = end.min(coverage_end(self.levels));
        start <= end && self.any_in(arena, root, self.levels - 1, start, end)
    }

    fn any_in(&self, arena: &Arena, node: u32, level: u32, start: u64, end: u64) -> bool {
        if self.live[node as usize] == 0 {
            return false;
        }
        let base_mask = !(span(level + 1).wrapping_sub(1));
        let node_base = start & base_mask;
        for index in entry_index(start, level)..=entry_index(end, level) {
            let slot = node_base | ((index as u64) << level_shift(level));
            let entry = arena.load(node, index);
            match entry & KIND_MASK {
                KIND_LEAF => return true,
                KIND_TABLE => {
                    let lo = start.max(slot);
                    let hi = end.min(slot | (span(level) - 1));
                    if self.any_in(arena, child_of(entry), level - 1, lo, hi) {
                        return true;
                    }
                }
                _ => {}
            }
        }
        false
    }

    /// Maps `[start, end]` to `phys` with `perms`. The caller has checked alignment to the
    /// 4 KiB base page and that nothing is mapped in the range. Either the whole mapping is
    /// written or, for lack of nodes, nothing is.
    pub fn map(&mut self, arena: &Arena, root: u32, m: Mapping) -> Result<(), TableError> {
        let top = self.levels - 1;
        let mut needed = 0u64;
        // Cheap upper bound first; count exactly only when it does not fit.
        let bound: u64 = (0..top)
            .map(|level| {
                let shift = level_shift(level + 1);
                (m.virt_end >> shift) - (m.virt_start >> shift) + 1
            })
            .sum();
        if bound > self.available(arena) {
            self.walk_map(
                arena,
                Some(root),
                top,
                m.virt_start,
                m.virt_end,
                &m,
                &mut needed,
                true,
            );
            if needed > self.available(arena) {
                return Err(TableError::NoMemory);
            }
        }
        self.walk_map(
            arena,
            Some(root),
            top,
            m.virt_start,
            m.virt_end,
            &m,
            &mut needed,
            false,
        );
        Ok(())
    }

    /// Maps `[start, end]` (inside this node's span) under `node`. With `dry`, only counts the
    /// nodes that would be allocated (`node` None = a node that would be new, hence empty).
    #[allow(clippy::too_many_arguments)]
    fn walk_map(
        &mut self,
        arena: &Arena,
        node: Option<u32>,
        level: u32,
        start: u64,
        end: u64,
        m: &Mapping,
        needed: &mut u64,
        dry: bool,
    ) {
        let size = span(level);
        let node_base = start & !(span(level + 1).wrapping_sub(1));
        for index in entry_index(start, level)..=entry_index(end, level) {
            let slot = node_base | ((index as u64) << level_shift(level));
            let slot_end = slot | (size - 1);
            let lo = start.max(slot);
            let hi = end.min(slot_end);
            let entry = node.map_or(0, |n| arena.load(n, index));
            let gpa = m.phys_start + (lo - m.virt_start);
            let whole = lo == slot && hi == slot_end;
            if entry == 0 && whole && level <= MAX_LEAF_LEVEL && gpa & (size - 1) == 0 {
                if !dry {
                    let n = node.unwrap_or_default();
                    let mut leaf = gpa | m.perms | KIND_LEAF;
                    if lo == m.virt_start {
                        leaf |= FIRST;
                    }
                    if hi == m.virt_end {
                        leaf |= LAST;
                    }
                    arena.store(n, index, leaf);
                    self.live[n as usize] += 1;
                }
                continue;
            }
            debug_assert!(
                level > 0,
                "a 4 KiB-aligned range always fills whole base pages"
            );
            debug_assert!(entry & KIND_MASK != KIND_LEAF, "caller checked for overlap");
            if level == 0 || entry & KIND_MASK == KIND_LEAF {
                continue;
            }
            let child = if entry & KIND_MASK == KIND_TABLE {
                Some(child_of(entry))
            } else if dry {
                *needed += 1;
                None
            } else {
                // Counted beforehand: allocation cannot fail here.
                let Some(child) = self.alloc(arena) else {
                    continue;
                };
                let n = node.unwrap_or_default();
                arena.store(n, index, table_entry(child));
                self.live[n as usize] += 1;
                Some(child)
            };
            self.walk_map(arena, child, level - 1, lo, hi, m, needed, dry);
        }
    }

    /// Single-page fast path, first half: whether the 4 KiB page at `iova` is free, and how many
    /// table nodes mapping it would allocate. `None` when a leaf already covers it.
    pub fn page_free(&self, arena: &Arena, root: u32, iova: u64) -> Option<u32> {
        let mut node = root;
        for level in (1..self.levels).rev() {
            let entry = arena.load(node, entry_index(iova, level));
            match entry & KIND_MASK {
                KIND_TABLE => node = child_of(entry),
                KIND_LEAF => return None,
                _ => return Some(level),
            }
        }
        (arena.load(node, entry_index(iova, 0)) == 0).then_some(0)
    }

    /// Single-page fast path, second half: maps the 4 KiB page at `iova` (free, as
    /// [`TableWriter::page_free`] said) to `phys` as a whole mapping. Fails, changing nothing,
    /// when `nodes` (page_free's answer) cannot be allocated.
    pub fn map_page(
        &mut self,
        arena: &Arena,
        root: u32,
        iova: u64,
        phys: u64,
        perms: u64,
        nodes: u32,
    ) -> Result<(), TableError> {
        if u64::from(nodes) > self.available(arena) {
            return Err(TableError::NoMemory);
        }
        let mut node = root;
        for level in (1..self.levels).rev() {
            let index = entry_index(iova, level);
            let entry = arena.load(node, index);
            node = if entry & KIND_MASK == KIND_TABLE {
                child_of(entry)
            } else {
                // Counted above: allocation cannot fail here.
                let Some(child) = self.alloc(arena) else {
                    return Err(TableError::NoMemory);
                };
                arena.store(node, index, table_entry(child));
                self.live[node as usize] += 1;
                child
            };
        }
        let leaf = (phys & ADDR_MASK) | (perms & PERM_MASK) | KIND_LEAF | FIRST | LAST;
        arena.store(node, entry_index(iova, 0), leaf);
        self.live[node as usize] += 1;
        Ok(())
    }

    /// Single-page fast path of [`TableWriter::unmap`] for `[iova, iova + 4 KiB)`, `iova`
    /// page-aligned: the same answers, without the range walks.
    pub fn unmap_page(&mut self, arena: &Arena, root: u32, iova: u64) -> Result<u64, TableError> {
        let mut path = [(0u32, 0usize); 8];
        let mut node = root;
        let mut level = self.levels - 1;
        loop {
            let index = entry_index(iova, level);
            path[level as usize] = (node, index);
            let entry = arena.load(node, index);
            match entry & KIND_MASK {
                KIND_TABLE if level > 0 => {
                    node = child_of(entry);
                    level -= 1;
                }
                // A page-sized range inside a bigger leaf, or a page of a longer mapping.
                KIND_LEAF if level > 0 || entry & (FIRST | LAST) != FIRST | LAST => {
                    return Err(TableError::WouldSplit)
                }
                KIND_LEAF => break,
                _ => return Ok(0),
            }
        }
        // Clear the leaf, then every table node it leaves empty (never the root).
        for level in 0..self.levels {
            let (node, index) = path[level as usize];
            arena.store(node, index, 0);
            self.live[node as usize] -= 1;
            if self.live[node as usize] > 0 || node == root {
                break;
            }
            self.retired.push(node);
        }
        Ok(1)
    }

    /// Removes every mapping inside `[start, end]`, or nothing when a mapping crosses either
    /// end (spec U4). Returns the number of mappings removed. Nodes left empty are retired.
    pub fn unmap(
        &mut self,
        arena: &Arena,
        root: u32,
        start: u64,
        end: u64,
    ) -> Result<u64, TableError> {
        let end = end.min(coverage_end(self.levels));
        if start > end {
            return Ok(0);
        }
        if let Some(leaf) = lookup(arena, root, self.levels, start) {
            if leaf.base != start || !leaf.first {
                return Err(TableError::WouldSplit);
            }
        }
        if let Some(leaf) = lookup(arena, root, self.levels, end) {
            if leaf.end != end || !leaf.last {
                return Err(TableError::WouldSplit);
            }
        }
        Ok(self.clear(arena, root, self.levels - 1, start, end))
    }

    fn clear(&mut self, arena: &Arena, node: u32, level: u32, start: u64, end: u64) -> u64 {
        if self.live[node as usize] == 0 {
            return 0;
        }
        let mut removed = 0;
        let node_base = start & !(span(level + 1).wrapping_sub(1));
        for index in entry_index(start, level)..=entry_index(end, level) {
            let entry = arena.load(node, index);
            match entry & KIND_MASK {
                KIND_LEAF => {
                    arena.store(node, index, 0);
                    self.live[node as usize] -= 1;
                    removed += u64::from(entry & FIRST != 0);
                }
                KIND_TABLE => {
                    let slot = node_base | ((index as u64) << level_shift(level));
                    let lo = start.max(slot);
                    let hi = end.min(slot | (span(level) - 1));
                    let child = child_of(entry);
                    removed += self.clear(arena, child, level - 1, lo, hi);
                    if self.live[child as usize] == 0 {
                        arena.store(node, index, 0);
                        self.live[node as usize] -= 1;
                        self.retired.push(child);
                    }
                }
                _ => {}
            }
        }
        removed
    }

    /// Every mapping of the tree, in IOVA order.
    pub fn mappings(&self, arena: &Arena, root: u32) -> Vec<Mapping> {
        let mut out = Vec::new();
        let mut open: Option<Mapping> = None;
        self.for_each_leaf(arena, root, self.levels - 1, 0, &mut |leaf| {
            if leaf.first {
                open = Some(Mapping {
                    virt_start: leaf.base,
                    virt_end: leaf.end,
                    phys_start: leaf.gpa,
                    perms: leaf.perms,
                });
            }
            if let Some(m) = open.as_mut() {
                m.virt_end = leaf.end;
                if leaf.last {
                    out.push(*m);
                    open = None;
                }
            }
        });
        out
    }

    fn for_each_leaf(
        &self,
        arena: &Arena,
        node: u32,
        level: u32,
        base: u64,
        f: &mut impl FnMut(Leaf),
    ) {
        if self.live[node as usize] == 0 {
            return;
        }
        for index in 0..FANOUT {
            let slot = base | ((index as u64) << level_shift(level));
            let entry = arena.load(node, index);
            match entry & KIND_MASK {
                KIND_LEAF => f(Leaf::decode(entry, slot, level)),
                KIND_TABLE => self.for_each_leaf(arena, child_of(entry), level - 1, slot, f),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u64 = PERM_READ | PERM_WRITE;

    fn table(max_nodes: u64) -> (Arena, TableWriter, u32) {
        let arena = Arena::new(max_nodes).unwrap();
        let mut w = TableWriter::new(levels_for((1 << 48) - 1));
        let root = w.new_root(&arena).unwrap();
        (arena, w, root)
    }

    fn m(virt_start: u64, virt_end: u64, phys_start: u64) -> Mapping {
        Mapping {
            virt_start,
            virt_end,
            phys_start,
            perms: RW,
        }
    }

    #[test]
    fn levels_cover_the_input_range() {
        assert_eq!(levels_for((1 << 48) - 1), 4);
        assert_eq!(levels_for((1 << 39) - 1), 3);
        assert_eq!(levels_for((1 << 39) + 1), 4);
        assert_eq!(levels_for(u64::MAX), 6);
        assert_eq!(levels_for(0), 1);
        assert_eq!(coverage_end(4), (1 << 48) - 1);
        assert_eq!(coverage_end(6), u64::MAX);
    }

    #[test]
    fn map_lookup_unmap_4k() {
        let (arena, mut w, root) = table(64);
        w.map(&arena, root, m(0x1000, 0x2fff, 0x80_0000)).unwrap();
        let leaf = lookup(&arena, root, 4, 0x2abc).unwrap();
        assert_eq!(
            (leaf.base, leaf.gpa, leaf.first, leaf.last),
            (0x2000, 0x80_1000, false, true)
        );
        assert_eq!(lookup(&arena, root, 4, 0x3000), None);
        assert_eq!(w.mappings(&arena, root), vec![m(0x1000, 0x2fff, 0x80_0000)]);
        assert_eq!(
            w.unmap(&arena, root, 0x2000, 0x2fff),
            Err(TableError::WouldSplit)
        );
        assert_eq!(
            w.unmap(&arena, root, 0x1000, 0x1fff),
            Err(TableError::WouldSplit)
        );
        assert_eq!(w.unmap(&arena, root, 0, 0xffff_ffff), Ok(1));
        assert_eq!(lookup(&arena, root, 4, 0x1000), None);
        assert_eq!(
            w.nodes_in_use(),
            4,
            "empty nodes are retired, not yet reclaimed"
        );
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
    }

    #[test]
    fn aligned_big_mappings_use_large_leaves() {
        let (arena, mut w, root) = table(64);
        // 1 GiB + 2 MiB + 4 KiB, all aligned: one 1 GiB leaf, one 2 MiB leaf, one 4 KiB leaf.
        let end = 0x4000_0000 + 0x4020_0000 + 0xfff;
        w.map(&arena, root, m(0x4000_0000, end, 0x4000_0000))
            .unwrap();
        assert_eq!(w.nodes_in_use(), 4, "root, L2, L1 and one L0 node");
        let leaf = lookup(&arena, root, 4, 0x4123_4567).unwrap();
        assert_eq!((leaf.base, leaf.end), (0x4000_0000, 0x7fff_ffff));
        assert_eq!(leaf.gpa, 0x4000_0000);
        assert!(leaf.first && !leaf.last);
        let leaf = lookup(&arena, root, 4, 0x8010_0000).unwrap();
        assert_eq!((leaf.base, leaf.end), (0x8000_0000, 0x801f_ffff));
        assert_eq!(
            w.mappings(&arena, root),
            vec![m(0x4000_0000, end, 0x4000_0000)]
        );
        assert_eq!(
            w.unmap(&arena, root, 0x4000_0000, 0x8000_0fff),
            Err(TableError::WouldSplit)
        );
        assert_eq!(w.unmap(&arena, root, 0x4000_0000, end), Ok(1));
        assert!(!w.any_mapped(&arena, root, 0, u64::MAX));
    }

    #[test]
    fn unaligned_gpa_falls_back_to_small_leaves() {
        let (arena, mut w, root) = table(64);
        w.map(&arena, root, m(0x20_0000, 0x3f_ffff, 0x1000))
            .unwrap();
        let leaf = lookup(&arena, root, 4, 0x3f_f000).unwrap();
        assert_eq!(
            (leaf.base, leaf.end, leaf.gpa),
            (0x3f_f000, 0x3f_ffff, 0x20_0000)
        );
    }

    #[test]
    fn no_memory_leaves_nothing_behind() {
        // Root + 3 nodes per 2 MiB-spanning 4 KiB mapping; 5 nodes cannot hold two far apart.
        let (arena, mut w, root) = table(5);
        w.map(&arena, root, m(0x1000, 0x1fff, 0)).unwrap();
        let far = 1 << 40;
        assert_eq!(
            w.map(&arena, root, m(far, far + 0xfff, 0)),
            Err(TableError::NoMemory)
        );
        assert!(!w.any_mapped(&arena, root, far, far + 0xfff));
        assert_eq!(w.mappings(&arena, root).len(), 1);
    }

    #[test]
    fn top_of_a_64_bit_space() {
        let arena = Arena::new(16).unwrap();
        let mut w = TableWriter::new(levels_for(u64::MAX));
        let root = w.new_root(&arena).unwrap();
        let start = u64::MAX - 0xfff;
        w.map(&arena, root, m(start, u64::MAX, 0x5000)).unwrap();
        assert_eq!(lookup(&arena, root, 6, u64::MAX).unwrap().gpa, 0x5000);
        assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(1));
    }
}
