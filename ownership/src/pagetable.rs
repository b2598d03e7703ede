// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Radix page tables that readers walk without locks while one writer maps and unmaps.
//!
//! Every domain is a tree of 4 KiB nodes of 512 atomic entries (9 bits per level over a 4 KiB
//! base page, as x86 and Arm page tables). A leaf may sit at level 0 (4 KiB), 1 (2 MiB) or
//! 2 (1 GiB) when the IOVA and the GPA are both aligned to that size, so big mappings cost a
//! few entries. Each leaf records whether it is the first and/or the last entry of the mapping
//! one MAP created, so a mapping is never split (spec U4) without a side index: the bits at the
//! two ends of an UNMAP range tell whether it would cut a mapping.
//!
//! A tree is only as tall as its mappings need (a walk costs a load per level): it starts with
//! the writer's start height and [`TableWriter::grow`] puts a new root above it, the old tree
//! under its entry 0, when a MAP reaches higher. A reader that still holds the old root walks
//! the old tree, which is still part of the new one, and finds nothing beyond it.
//!
//! A 2 MiB region holding only a few mappings does not get a 512-entry node: its level-1 entry
//! points to a *runs block*, one 64-byte cache line of [`RUN_SLOTS`] slots, each holding one
//! mapping's pages inside the region (first page, last page, GPA, permissions, first/last
//! bits). A region that needs a ninth run, or a GPA a slot cannot hold (at or above
//! 2^50), gets a full node instead. This keeps sparse layouts (Linux's allocator packing
//! 4 KiB, 64 KiB and 2 MiB buffers side by side) at a cache line per region instead of a page.
//! A region holding exactly one run keeps it in the level-1 entry itself (an *inline run*),
//! so a walk to it reads no block at all and the region costs no memory beyond the entry.
//!
//! Nodes live in an [`Arena`] addressed by `u32` index: one array allocated once that never
//! moves, so a reader that loaded an index can always dereference it (safe Rust, no pointers).
//! A node or runs block that is unlinked from a tree is only reused after a grace period
//! ([`crate::epoch`]), so a reader never walks a recycled one. Runs blocks are carved 64 to a
//! node and keep their runs sorted by first page, so a reader finds the one candidate run
//! with a three-step binary search that has no branches. A block changes in place only in ways that
//! keep the order: a run that sorts last fills the next free slot, and UNMAP turns a run into
//! a tombstone that keeps its place (so UNMAP never allocates); an UNMAP that leaves one run
//! moves it into the level-1 entry and retires the block. Anything else writes a new block
//! and swaps the level-1 entry, so a reader sees each mapping entirely or not at all.

use std::sync::atomic::{fence, AtomicU64, Ordering};

use shm::Words;

use crate::Perms;

/// A reader's load of a table word: `Relaxed`, then an acquire fence. The same ordering as an
/// acquire load (and the same instructions on x86), and also valid on memory mapped read-only,
/// where the standard library promises relaxed loads only: a DMA master in another process
/// walks the daemon's tables mapped that way, with this very code.
#[inline(always)]
pub(crate) fn read(word: &AtomicU64) -> u64 {
    let value = word.load(Ordering::Relaxed);
    fence(Ordering::Acquire);
    value
}

/// Base page shift: the leaf size at level 0.
pub(crate) const PAGE_SHIFT: u32 = 12;
/// Offset bits of a base page.
pub(crate) const PAGE_MASK: u64 = (1 << PAGE_SHIFT) - 1;
/// Index bits per level.
pub(crate) const LEVEL_BITS: u32 = 9;
/// Entries per node.
pub(crate) const FANOUT: usize = 1 << LEVEL_BITS;
/// Bytes one node occupies.
pub(crate) const NODE_BYTES: u64 = (FANOUT * 8) as u64;
/// Leaves exist up to this level (level 2 = 1 GiB).
const MAX_LEAF_LEVEL: u32 = 2;

const KIND_MASK: u64 = 0b11;
const KIND_LEAF: u64 = 0b01;
const KIND_TABLE: u64 = 0b10;
/// A level-1 entry pointing to a runs block is a leaf with this bit set (unused in leaves, so
/// a walk tells tables from the rest with one bit, as before runs existed) and the block's
/// first entry index above [`RUNS_SHIFT`].
const RUNS_FLAG: u64 = 1 << 7;
const RUNS_SHIFT: u32 = 8;
/// What the writer calls a runs entry (never stored as such).
const KIND_RUNS: u64 = 0b11;
/// A level-1 entry that holds its region's only run: the run itself (bit 0 set) with bit 1
/// set too, a pattern no leaf or table entry has. The run's fields ignore bit 1.
const INLINE_RUN: u64 = KIND_LEAF | KIND_TABLE;
/// What the writer calls an inline-run entry (never stored as such).
const KIND_INLINE: u64 = 0b111;

/// An entry's kind: [`KIND_LEAF`], [`KIND_TABLE`], [`KIND_RUNS`], [`KIND_INLINE`] or 0
/// (empty).
#[inline]
fn kind(entry: u64) -> u64 {
    if entry & KIND_MASK == INLINE_RUN {
        KIND_INLINE
    } else if entry & RUNS_FLAG != 0 {
        KIND_RUNS
    } else {
        entry & KIND_MASK
    }
}

/// The run an inline-run entry holds.
#[inline(always)]
fn inline_run(entry: u64) -> u64 {
    entry & !KIND_TABLE
}

#[inline]
fn runs_entry(block: usize) -> u64 {
    ((block as u64) << RUNS_SHIFT) | RUNS_FLAG | KIND_LEAF
}

/// The first entry index of the runs block a runs entry points to.
#[inline(always)]
fn runs_block(entry: u64) -> usize {
    (entry >> RUNS_SHIFT) as usize
}
/// Leaf permission and type bits, as stored (a mapping's flags): [`Perms`] bits shifted up by
/// [`PERM_SHIFT`].
pub(crate) const PERM_SHIFT: u32 = 2;
pub(crate) const PERM_READ: u64 = (Perms::READ.bits() as u64) << PERM_SHIFT;
pub(crate) const PERM_WRITE: u64 = (Perms::WRITE.bits() as u64) << PERM_SHIFT;
pub(crate) const PERM_MMIO: u64 = (Perms::MMIO.bits() as u64) << PERM_SHIFT;
pub(crate) const PERM_MASK: u64 = PERM_READ | PERM_WRITE | PERM_MMIO;
/// The leaf is the first / last entry of its mapping.
const FIRST: u64 = 1 << 5;
const LAST: u64 = 1 << 6;
/// Leaf: the GPA of the entry's first byte (a table entry holds [`CHILD_MASK`] bits instead).
const ADDR_MASK: u64 = !((1 << PAGE_SHIFT) - 1);

/// Table entry: the child's first entry index (node index times [`FANOUT`]), so a walk gets
/// the next node's position with one mask.
const CHILD_MASK: u64 = !(FANOUT as u64 - 1);

/// Slots of a runs block: one 64-byte cache line.
pub(crate) const RUN_SLOTS: usize = 8;
const BLOCKS_PER_NODE: usize = FANOUT / RUN_SLOTS;
/// A run's GPA must be below this (its page frame number has 38 bits).
pub(crate) const RUN_GPA_LIMIT: u64 = 1 << 50;
// A run: bit 0 set, the leaf's permission and first/last bits in the same places, the number
// of pages after the first, the GPA's page frame number, and at the top the first page's
// index in the region plus one (the sort key). A tombstone is a run with bit 0 clear, so it
// keeps its key and its place; a free slot holds NO_RUN.
const RUN_VALID: u64 = 1;
/// A free slot of a live block: above every run's key, so it sorts last, and not valid.
const NO_RUN: u64 = !RUN_VALID;
const RUN_LEN_SHIFT: u32 = 7;
const RUN_PFN_SHIFT: u32 = 16;
const RUN_PFN_BITS: u32 = 38;
const RUN_KEY_SHIFT: u32 = 54;
const PAGE_INDEX_MASK: u64 = FANOUT as u64 - 1;

/// A run covering pages `first..=last` of a 2 MiB region, the first at `gpa` (< [`RUN_GPA_LIMIT`]).
#[inline]
fn make_run(first: u64, last: u64, gpa: u64, flags: u64) -> u64 {
    debug_assert!(first <= last && last <= PAGE_INDEX_MASK && gpa < RUN_GPA_LIMIT);
    RUN_VALID
        | (flags & (PERM_MASK | FIRST | LAST))
        | ((last - first) << RUN_LEN_SHIFT)
        | ((gpa >> PAGE_SHIFT) << RUN_PFN_SHIFT)
        | ((first + 1) << RUN_KEY_SHIFT)
}

/// A live run (not a free slot, a tombstone or a cleared slot).
#[inline(always)]
fn is_run(run: u64) -> bool {
    run & RUN_VALID != 0
}

/// A live run that covers `iova`'s page.
#[inline(always)]
fn run_covers(run: u64, iova: u64) -> bool {
    // Keys are first page + 1, so this is the page's distance from the run's first page.
    let into = (page_index(iova) + 1).wrapping_sub(run_key(run));
    is_run(run) & (into <= run_len(run))
}

/// A run's sort key: its first page plus one.
#[inline(always)]
fn run_key(run: u64) -> u64 {
    run >> RUN_KEY_SHIFT
}

/// A live run that shares a page with pages `first..=last` of its region.
#[inline]
fn run_overlaps(run: u64, first: u64, last: u64) -> bool {
    is_run(run) && run_first(run) <= last && first <= run_last(run)
}

/// Turns every live run of `block` that overlaps pages `first..=last` into a tombstone (it
/// keeps its place in the order, so UNMAP never allocates). Returns the mappings that began
/// in a removed run and the live runs left.
fn tombstone_runs(arena: &Arena, block: usize, first: u64, last: u64) -> (u64, usize) {
    let (mut removed, mut left) = (0, 0);
    for slot in arena.block(block) {
        let run = slot.load(Ordering::Relaxed);
        if run_overlaps(run, first, last) {
            slot.store(run & !RUN_VALID, Ordering::Release);
            removed += u64::from(run & FIRST != 0);
        } else if is_run(run) {
            left += 1;
        }
    }
    (removed, left)
}

/// Pages after the first.
#[inline(always)]
fn run_len(run: u64) -> u64 {
    (run >> RUN_LEN_SHIFT) & PAGE_INDEX_MASK
}

#[inline(always)]
fn run_first(run: u64) -> u64 {
    (run >> RUN_KEY_SHIFT).wrapping_sub(1)
}

#[inline(always)]
fn run_last(run: u64) -> u64 {
    run_first(run).wrapping_add(run_len(run))
}

#[inline(always)]
fn run_gpa(run: u64) -> u64 {
    ((run >> RUN_PFN_SHIFT) & ((1 << RUN_PFN_BITS) - 1)) << PAGE_SHIFT
}

#[inline(always)]
fn page_index(iova: u64) -> u64 {
    (iova >> PAGE_SHIFT) & PAGE_INDEX_MASK
}

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
pub(crate) const fn level_shift(level: u32) -> u32 {
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
pub(crate) const fn coverage_end(levels: u32) -> u64 {
    match 1u64.checked_shl(level_shift(levels)) {
        Some(size) => size - 1,
        None => u64::MAX,
    }
}

/// Levels needed to cover IOVAs up to `input_end`.
pub(crate) fn levels_for(input_end: u64) -> u32 {
    let bits = 64 - input_end.leading_zeros();
    bits.saturating_sub(PAGE_SHIFT).div_ceil(LEVEL_BITS).max(1)
}

/// The most nodes an arena holds: a root's index fits in 27 bits of a group's published state.
pub(crate) const MAX_NODES: u64 = 1 << 27;

/// Fixed-capacity node storage shared by the writer and all readers: one flat array of
/// entries, node `i` at `[i * FANOUT, (i + 1) * FANOUT)`. It is mapped zeroed and the OS
/// commits its pages only when a node is first written, so the capacity is address space, not
/// memory. A reader reaches an entry with one load.
///
/// The entries are this process's memory ([`Arena::new`]) or a window of a file the caller
/// mapped ([`Arena::in_words`]), which DMA masters in other processes map read-only.
pub(crate) struct Arena {
    entries: Words,
    capacity: u32,
}

impl Arena {
    /// An arena that will never hold more than `max_nodes` nodes, or None when the host will
    /// not reserve that much address space. The model's arena lives in its shared words
    /// ([`Arena::in_words`]); the table's own tests use this one.
    #[cfg(test)]
    pub fn new(max_nodes: u64) -> Option<Self> {
        let capacity = max_nodes.clamp(1, MAX_NODES) as u32;
        let entries = Words::anonymous(capacity as usize * FANOUT).ok()?;
        Some(Arena { entries, capacity })
    }

    /// An arena in `words` (zeroed), as many whole nodes as they hold up to [`MAX_NODES`];
    /// None when they hold no node.
    pub fn in_words(words: Words) -> Option<Self> {
        let capacity = (words.len() / FANOUT).min(MAX_NODES as usize) as u32;
        if capacity == 0 {
            return None;
        }
        Some(Arena {
            entries: words,
            capacity,
        })
    }

    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Where the arena's entries live: start address and length in bytes, for a caller that
    /// wants to advise the kernel about the memory (huge pages); never dereferenced here.
    pub fn address_range(&self) -> (usize, usize) {
        self.entries.address_range()
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
        self.clear_entries(node as usize * FANOUT, FANOUT);
    }

    /// Whether every entry of `node` is zero (a debug check).
    fn node_is_clear(&self, node: u32) -> bool {
        let start = node as usize * FANOUT;
        self.entries
            .get(start..start + FANOUT)
            .is_some_and(|e| e.iter().all(|e| e.load(Ordering::Relaxed) == 0))
    }

    fn clear_entries(&self, start: usize, count: usize) {
        if let Some(entries) = self.entries.get(start..start + count) {
            for e in entries {
                e.store(0, Ordering::Relaxed);
            }
        }
    }

    /// The slots of the runs block at entry index `block`.
    #[inline(always)]
    fn block(&self, block: usize) -> &[AtomicU64] {
        self.entries.get(block..block + RUN_SLOTS).unwrap_or(&[])
    }
}

/// The run covering `iova`'s page in the runs block at `block`, if any. The slots are sorted
/// by first page, so the candidate is the last slot whose first page is at or below the page,
/// found by a three-step binary search without branches (a branch on which slot matched would
/// mispredict, and a mispredict stops the CPU overlapping the cache misses of consecutive
/// walks). A count over the slots would need fewer dependent loads, but LLVM turns any such
/// sum into a vector reduction that costs more than the search.
#[inline(always)]
fn scan_runs(arena: &Arena, block: usize, iova: u64) -> Option<u64> {
    scan_runs_from(arena, block, iova, middle_slot)
}

/// Loads the middle slot of a runs block: where its search starts.
#[inline(always)]
fn middle_slot(slots: &[AtomicU64; RUN_SLOTS]) -> u64 {
    read(&slots[RUN_SLOTS / 2])
}

/// [`scan_runs`], the block's middle slot loaded by `middle` (or loaded already).
#[inline(always)]
fn scan_runs_from(
    arena: &Arena,
    block: usize,
    iova: u64,
    middle: impl FnOnce(&[AtomicU64; RUN_SLOTS]) -> u64,
) -> Option<u64> {
    let slots: &[AtomicU64; RUN_SLOTS] = arena.block(block).try_into().ok()?;
    let page = page_index(iova);
    // Keys are first page + 1: a slot is at or below the page when its key is at most
    // page + 1 (free slots have the greatest key and never are).
    let at_or_below = |at: usize| run_key(read(&slots[at & (RUN_SLOTS - 1)])) <= page + 1;
    let mut at = 4 * usize::from(run_key(middle(slots)) <= page + 1);
    at += 2 * usize::from(at_or_below(at + 2));
    at += usize::from(at_or_below(at + 1));
    // Slot 0 when none is: then its own check below fails.
    let run = read(&slots[at & (RUN_SLOTS - 1)]);
    run_covers(run, iova).then_some(run)
}

/// The run covering `iova`'s page under the level-1 entry `entry`, an inline run or a runs
/// block (the writer's view; readers test the entry's bits themselves).
fn region_run(arena: &Arena, entry: u64, iova: u64) -> Option<u64> {
    if kind(entry) == KIND_INLINE {
        run_covers(entry, iova).then_some(inline_run(entry))
    } else {
        scan_runs(arena, runs_block(entry), iova)
    }
}

/// The live runs of a block, in order, and how many there are.
fn live_runs(slots: &[AtomicU64]) -> ([u64; RUN_SLOTS], usize) {
    let mut runs = [NO_RUN; RUN_SLOTS];
    let mut live = 0;
    for run in slots.iter().map(|s| s.load(Ordering::Relaxed)) {
        if is_run(run) {
            runs[live] = run;
            live += 1;
        }
    }
    (runs, live)
}

/// Fills a block nobody can reach yet with `runs` (sorted) and free slots.
fn write_block(arena: &Arena, block: usize, runs: &[u64]) {
    for (at, slot) in arena.block(block).iter().enumerate() {
        slot.store(runs.get(at).copied().unwrap_or(NO_RUN), Ordering::Relaxed);
    }
}

/// Where a translated IOVA goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Target {
    /// `PERM_*` bits (plus bits the caller ignores).
    pub flags: u64,
    /// GPA of the IOVA.
    pub gpa: u64,
    /// Bytes from there to the end of the leaf or run.
    pub left: u64,
}

/// What a walk found: a leaf entry at some level, or a run of a runs block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Found {
    Leaf { entry: u64, level: u32 },
    Run(u64),
}

#[inline(always)]
fn run_target(run: u64, iova: u64) -> Target {
    let offset = iova & PAGE_MASK;
    let into = page_index(iova).wrapping_sub(run_first(run));
    Target {
        flags: run,
        gpa: run_gpa(run) + (into << PAGE_SHIFT) + offset,
        left: ((run_len(run) - into + 1) << PAGE_SHIFT) - offset,
    }
}

impl Found {
    #[inline(always)]
    fn target(self, iova: u64) -> Target {
        match self {
            Found::Leaf { entry, level } => {
                let (gpa, left) = leaf_target(entry, level, iova);
                Target {
                    flags: entry,
                    gpa,
                    left,
                }
            }
            Found::Run(run) => run_target(run, iova),
        }
    }

    fn leaf(self, iova: u64) -> Leaf {
        match self {
            Found::Leaf { entry, level } => Leaf::decode(entry, iova, level),
            Found::Run(run) => Leaf::of_run(run, iova & !(span(1) - 1)),
        }
    }
}

/// A leaf found by a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Leaf {
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
    /// A run of the region starting at `region`.
    fn of_run(run: u64, region: u64) -> Self {
        Leaf {
            base: region | (run_first(run) << PAGE_SHIFT),
            end: region | (((run_last(run) + 1) << PAGE_SHIFT) - 1),
            gpa: run_gpa(run),
            perms: run & PERM_MASK,
            first: run & FIRST != 0,
            last: run & LAST != 0,
        }
    }

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

/// Where the leaf entry or run covering `iova` sends it: the fast path's walk, kept small so
/// that the cache misses of consecutive walks overlap. `levels` is the tree's height as
/// published with `root`; an IOVA beyond the tree finds nothing. The caller is inside a
/// read-side critical section (see [`crate::epoch`]) so no node it reads is recycled.
#[inline(always)]
pub(crate) fn walk(arena: &Arena, root: u32, levels: u32, iova: u64) -> Option<Target> {
    find(arena, root, levels, iova).map(|found| found.target(iova))
}

#[inline(always)]
fn find(arena: &Arena, root: u32, levels: u32, iova: u64) -> Option<Found> {
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
fn walk_from(arena: &Arena, root: u32, top: u32, iova: u64) -> Option<Found> {
    // Beyond the tree (trees grow, and a reader may hold a root from before): nothing.
    if iova > coverage_end(top + 1) {
        return None;
    }
    let entries: &[AtomicU64] = &arena.entries;
    let mut base = root as usize * FANOUT;
    let mut level = top;
    loop {
        let entry = read(entries.get(base | entry_index(iova, level))?);
        if entry & KIND_MASK == KIND_TABLE && level > 0 {
            base = (entry & CHILD_MASK) as usize;
            level -= 1;
            continue;
        }
        return walk_end(arena, entry, level, iova, middle_slot);
    }
}

/// How a walk ends at `entry` of `level`, which is not a table it follows: empty, an inline
/// run, a runs block (`middle` loads the block's middle slot, see [`scan_runs_from`]) or a
/// leaf. A table entry here (at level 0: a corrupt tree) has bit 0 clear and ends the walk
/// with nothing.
#[inline(always)]
fn walk_end(
    arena: &Arena,
    entry: u64,
    level: u32,
    iova: u64,
    middle: impl FnOnce(&[AtomicU64; RUN_SLOTS]) -> u64,
) -> Option<Found> {
    if entry & KIND_LEAF == 0 {
        return None;
    }
    if entry & KIND_TABLE != 0 {
        return run_covers(entry, iova).then_some(Found::Run(inline_run(entry)));
    }
    if entry & RUNS_FLAG != 0 {
        return scan_runs_from(arena, runs_block(entry), iova, middle).map(Found::Run);
    }
    Some(Found::Leaf { entry, level })
}

/// Walks at most [`GROUP`] at once in [`walk_group`].
pub(crate) const GROUP: usize = 32;

/// [`walk`] for several IOVAs at once (the first [`GROUP`] of `iovas`): calls `done(i, target)`
/// with the walk's result for `iovas[i]`, in order. The same loads as one walk each, in
/// stages across the group: the upper levels of every walk, then every level-1 entry, then
/// every walk's last line, then the ends. In a table larger than the cache the misses of a
/// stage overlap, where one walk after another waits on each walk's misses in turn whenever
/// the kind of a level-1 entry is hard to predict (a mix of leaves, runs and tables). The
/// caller is inside a read-side critical section, as for [`walk`].
#[inline]
pub(crate) fn walk_group(
    arena: &Arena,
    root: u32,
    levels: u32,
    iovas: &[u64],
    done: impl FnMut(usize, Option<Target>),
) {
    match levels {
        4 => walk_group_from(arena, root, 3, iovas, done),
        3 => walk_group_from(arena, root, 2, iovas, done),
        5 => walk_group_from(arena, root, 4, iovas, done),
        6 => walk_group_from(arena, root, 5, iovas, done),
        2 => walk_group_from(arena, root, 1, iovas, done),
        _ => {
            let mut done = done;
            for (i, &iova) in iovas.iter().take(GROUP).enumerate() {
                done(i, walk(arena, root, levels, iova));
            }
        }
    }
}

#[inline(always)]
fn walk_group_from(
    arena: &Arena,
    root: u32,
    top: u32,
    iovas: &[u64],
    mut done: impl FnMut(usize, Option<Target>),
) {
    let entries: &[AtomicU64] = &arena.entries;
    let iovas = &iovas[..iovas.len().min(GROUP)];
    // Stage 1: the upper levels, a few nodes that stay in the cache: where each walk's level-1
    // entry is, or the entry above level 1 where it stops.
    let mut stop = [(0u64, 0u32); GROUP];
    let mut at = [0usize; GROUP];
    for ((iova, stop), at) in iovas.iter().zip(stop.iter_mut()).zip(at.iter_mut()) {
        if *iova > coverage_end(top + 1) {
            // Beyond the tree: an empty entry at level 0 (stage 3 loads entry 0 for it, unused).
            *stop = (0, 0);
            continue;
        }
        let mut base = root as usize * FANOUT;
        let mut level = top;
        *stop = loop {
            if level == 1 {
                *at = base | entry_index(*iova, 1);
                break (0, 1);
            }
            let entry = entries
                .get(base | entry_index(*iova, level))
                .map_or(0, read);
            if entry & KIND_MASK == KIND_TABLE {
                base = (entry & CHILD_MASK) as usize;
                level -= 1;
                continue;
            }
            break (entry, level);
        };
    }
    // Stage 2: every level-1 entry, in a loop that only loads, so that all the misses are in
    // flight at once (a walk that stopped above loads entry 0 and drops it).
    for (stop, &at) in stop.iter_mut().zip(at.iter()) {
        let entry = entries.get(at).map_or(0, read);
        if stop.1 == 1 {
            stop.0 = entry;
        }
    }
    // Stage 3: the one line left to read, for the walks that go on: the level-0 entry under
    // a level-1 table, or a runs block's middle slot (the first step of its search). Where it
    // is first, then a loop that only loads, as in stage 2.
    for ((iova, &(entry, level)), at) in iovas.iter().zip(stop.iter()).zip(at.iter_mut()) {
        *at = if entry & KIND_MASK == KIND_TABLE && level == 1 {
            (entry & CHILD_MASK) as usize | entry_index(*iova, 0)
        } else if entry & KIND_MASK == KIND_LEAF && entry & RUNS_FLAG != 0 {
            runs_block(entry) + RUN_SLOTS / 2
        } else {
            0
        };
    }
    let mut last = [0u64; GROUP];
    for (last, &at) in last.iter_mut().zip(at.iter()) {
        *last = entries.get(at).map_or(0, read);
    }
    // Stage 4: each walk's end, as `walk_from` ends it.
    for (i, ((&iova, &(entry, level)), &last)) in
        iovas.iter().zip(stop.iter()).zip(last.iter()).enumerate()
    {
        let found = if entry & KIND_MASK == KIND_TABLE && level == 1 {
            walk_end(arena, last, 0, iova, middle_slot)
        } else {
            walk_end(arena, entry, level, iova, |_| last)
        };
        done(i, found.map(|found| found.target(iova)));
    }
}

/// GPA of `iova` through a leaf `entry` at `level`, and the bytes left in the entry from there.
#[inline(always)]
fn leaf_target(entry: u64, level: u32, iova: u64) -> (u64, u64) {
    // Leaves sit at level 2 at most, so the shift never overflows (and wraps, unchecked, if
    // a corrupt level ever came here).
    let mask = 1u64.wrapping_shl(level_shift(level)).wrapping_sub(1);
    let offset = iova & mask;
    ((entry & ADDR_MASK) + offset, mask - offset + 1)
}

/// Walks the tree rooted at `root` to the leaf covering `iova`, decoded.
pub(crate) fn lookup(arena: &Arena, root: u32, levels: u32, iova: u64) -> Option<Leaf> {
    if iova > coverage_end(levels) {
        return None;
    }
    find(arena, root, levels, iova).map(|found| found.leaf(iova))
}

/// A mapping as one MAP created it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Mapping {
    pub virt_start: u64,
    /// Inclusive.
    pub virt_end: u64,
    pub phys_start: u64,
    pub perms: Perms,
}

/// Why a page-table update was refused. Nothing changed in either case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TableError {
    /// Not enough free nodes for the update.
    NoMemory,
    /// UNMAP would cut a mapping (spec U4).
    WouldSplit,
}

/// The writer's half: node allocation and tree updates. Exactly one exists per arena and it is
/// driven through `&mut`, so updates never race each other; readers race only with stores of
/// whole entries.
#[derive(Debug)]
pub(crate) struct TableWriter {
    /// The tallest tree: the input range's levels.
    max_levels: u32,
    /// A new tree's height; [`TableWriter::grow`] adds levels when a mapping needs them.
    start_levels: u32,
    /// Per node: the height of the tree it is the root of (meaningless for other nodes).
    heights: Vec<u8>,
    /// Never-used indices start here.
    watermark: u32,
    free: Vec<u32>,
    /// Unlinked nodes waiting for a grace period before reuse.
    retired: Vec<u32>,
    /// Non-empty entries per node (writer-only bookkeeping).
    live: Vec<u16>,
    /// Per node carved into runs blocks: which of its blocks are free (bit set), 0 when none
    /// is (or the node is not carved).
    free_map: Vec<u64>,
    /// Per node with free blocks: its place in `partial`.
    partial_at: Vec<u32>,
    /// Carved nodes with at least one free block (a node whose blocks are all free goes back
    /// to the node pool).
    partial: Vec<u32>,
    /// Free blocks in `partial`'s nodes.
    free_blocks: u64,
    /// Unlinked runs blocks (first entry index) waiting for a grace period before reuse.
    retired_blocks: Vec<usize>,
}

/// The part of a mapping inside one 2 MiB region: IOVAs (only their page index matters), the
/// GPA of `lo`, permission and first/last bits.
#[derive(Clone, Copy, Debug)]
struct Piece {
    lo: u64,
    hi: u64,
    gpa: u64,
    flags: u64,
}

/// A run as a piece of its region (IOVAs relative to the region).
fn run_piece(run: u64) -> Piece {
    Piece {
        lo: run_first(run) << PAGE_SHIFT,
        hi: ((run_last(run) + 1) << PAGE_SHIFT) - 1,
        gpa: run_gpa(run),
        flags: run & (PERM_MASK | FIRST | LAST),
    }
}

/// What a MAP would allocate: nodes, and runs blocks (which come from carved nodes).
#[derive(Clone, Copy, Debug, Default)]
struct Need {
    nodes: u64,
    blocks: u64,
}

impl TableWriter {
    /// A writer whose trees have `levels` levels, enough for the whole input range.
    pub fn new(levels: u32) -> Self {
        TableWriter {
            max_levels: levels,
            start_levels: levels,
            heights: Vec::new(),
            watermark: 0,
            free: Vec::new(),
            retired: Vec::new(),
            live: Vec::new(),
            free_map: Vec::new(),
            partial_at: Vec::new(),
            partial: Vec::new(),
            free_blocks: 0,
            retired_blocks: Vec::new(),
        }
    }

    /// New trees start with `levels` levels (at most the input range's) and grow when a
    /// mapping needs more ([`TableWriter::grow`]).
    pub fn with_start_levels(mut self, levels: u32) -> Self {
        self.start_levels = levels.clamp(1, self.max_levels);
        self
    }

    /// The height of the tree rooted at `root`.
    #[inline]
    pub fn height(&self, root: u32) -> u32 {
        self.heights.get(root as usize).map_or(1, |&h| u32::from(h))
    }

    /// Whether the tree rooted at `root` reaches `iova`.
    #[inline]
    pub fn covers(&self, root: u32, iova: u64) -> bool {
        iova <= coverage_end(self.height(root))
    }

    /// Nodes in use or waiting for reuse (a node carved into runs blocks counts whole).
    pub fn nodes_in_use(&self) -> u64 {
        u64::from(self.watermark) - self.free.len() as u64
    }

    fn available(&self, arena: &Arena) -> u64 {
        u64::from(arena.capacity() - self.watermark) + self.free.len() as u64
    }

    /// Whether `need` fits in what is left.
    fn fits(&self, arena: &Arena, need: Need) -> bool {
        let nodes = self.available(arena);
        let Some(spare) = nodes.checked_sub(need.nodes) else {
            return false;
        };
        let blocks = self.free_blocks + spare * BLOCKS_PER_NODE as u64;
        need.blocks <= blocks
    }

    /// A runs block (its first entry index), carving a node into blocks when none is free.
    fn alloc_block(&mut self, arena: &Arena) -> Option<usize> {
        let node = match self.partial.last() {
            Some(&node) => node,
            None => {
                let node = self.alloc(arena)?;
                self.free_map[node as usize] = u64::MAX;
                self.partial_at[node as usize] = self.partial.len() as u32;
                self.partial.push(node);
                self.free_blocks += BLOCKS_PER_NODE as u64;
                node
            }
        };
        let map = self.free_map[node as usize];
        let block = map.trailing_zeros() as usize;
        self.free_map[node as usize] = map & (map - 1);
        if map & (map - 1) == 0 {
            self.partial.pop();
        }
        self.free_blocks -= 1;
        Some(node as usize * FANOUT + block * RUN_SLOTS)
    }

    /// Frees a runs block nobody can reach any more; its node goes back to the pool when all
    /// its blocks are free.
    fn free_block(&mut self, arena: &Arena, block: usize) {
        arena.clear_entries(block, RUN_SLOTS);
        let node = block / FANOUT;
        let map = self.free_map[node];
        if map == 0 {
            self.partial_at[node] = self.partial.len() as u32;
            self.partial.push(node as u32);
        }
        let map = map | 1 << ((block % FANOUT) / RUN_SLOTS);
        self.free_blocks += 1;
        if map != u64::MAX {
            self.free_map[node] = map;
            return;
        }
        self.free_map[node] = 0;
        self.free_blocks -= BLOCKS_PER_NODE as u64;
        let at = self.partial_at[node] as usize;
        self.partial.swap_remove(at);
        if let Some(&moved) = self.partial.get(at) {
            self.partial_at[moved as usize] = at as u32;
        }
        self.free.push(node as u32);
    }

    fn alloc(&mut self, arena: &Arena) -> Option<u32> {
        let index = match self.free.pop() {
            Some(index) => index,
            None if self.watermark < arena.capacity() => {
                let index = self.watermark;
                self.watermark += 1;
                self.live.push(0);
                self.heights.push(0);
                self.free_map.push(0);
                self.partial_at.push(0);
                index
            }
            None => return None,
        };
        Some(index)
    }

    /// A new empty tree, or None when the arena is full.
    pub fn new_root(&mut self, arena: &Arena) -> Option<u32> {
        let root = self.alloc(arena)?;
        self.heights[root as usize] = self.start_levels as u8;
        Some(root)
    }

    /// The root of a tree that reaches `end`: `root` itself when it does, else a new root
    /// with the old tree under its entry 0, one node per level added. The old tree stays
    /// intact and keeps working for readers that walk it with its own height; the caller
    /// publishes the new root (or gives it back with [`TableWriter::ungrow`]). Nothing changes
    /// when the nodes are not there.
    pub fn grow(&mut self, arena: &Arena, root: u32, end: u64) -> Result<u32, TableError> {
        if self.covers(root, end) {
            return Ok(root);
        }
        let from = self.height(root);
        let to = levels_for(end).clamp(from, self.max_levels);
        let need = Need {
            nodes: u64::from(to - from),
            blocks: 0,
        };
        if !self.fits(arena, need) {
            return Err(TableError::NoMemory);
        }
        let mut top = root;
        for levels in from + 1..=to {
            // Counted above: allocation cannot fail here.
            let Some(node) = self.alloc(arena) else {
                break;
            };
            arena.store(node, 0, table_entry(top));
            self.live[node as usize] = 1;
            self.heights[node as usize] = levels as u8;
            top = node;
        }
        Ok(top)
    }

    /// Gives back the levels [`TableWriter::grow`] put above `root` under `top`, which no
    /// reader has seen (never published): they are free at once.
    pub fn ungrow(&mut self, arena: &Arena, top: u32, root: u32) {
        let mut node = top;
        while node != root && kind(arena.load(node, 0)) == KIND_TABLE {
            let child = child_of(arena.load(node, 0));
            debug_assert_eq!(
                self.live[node as usize], 1,
                "an unpublished level holds more"
            );
            arena.store(node, 0, 0);
            self.live[node as usize] = 0;
            self.free.push(node);
            node = child;
        }
    }

    /// Unlinks every node of the tree for reuse after the next grace period. The caller must
    /// already have made the root unreachable for new readers.
    pub fn retire_tree(&mut self, arena: &Arena, root: u32) {
        self.retire_subtree(arena, root, self.height(root) - 1);
    }

    fn retire_subtree(&mut self, arena: &Arena, node: u32, level: u32) {
        if level > 0 && self.live[node as usize] > 0 {
            for index in 0..FANOUT {
                let entry = arena.load(node, index);
                match kind(entry) {
                    KIND_TABLE => self.retire_subtree(arena, child_of(entry), level - 1),
                    KIND_RUNS => self.retired_blocks.push(runs_block(entry)),
                    _ => {}
                }
            }
        }
        self.retired.push(node);
    }

    /// Runs blocks waiting for a grace period: a MAP that rewrites a block retires the old
    /// one, so a long run of MAPs without UNMAP should take a grace period now and then.
    pub fn retired_blocks(&self) -> usize {
        self.retired_blocks.len()
    }

    /// Whether some nodes or runs blocks wait for a grace period.
    pub fn has_retired(&self) -> bool {
        !self.retired.is_empty() || !self.retired_blocks.is_empty()
    }

    /// Makes retired nodes reusable. Call only after a grace period that began after they were
    /// unlinked: no reader can still hold their index.
    pub fn reclaim(&mut self, arena: &Arena) {
        // Drained, not dropped: the list keeps its capacity, so retiring nodes on the
        // request path does not allocate once it has grown to its working size.
        let mut retired = std::mem::take(&mut self.retired);
        for node in retired.drain(..) {
            // A node UNMAP emptied is all zeros already (`live` counts its non-empty entries);
            // only a torn-down tree's nodes still hold entries.
            if self.live[node as usize] != 0 {
                arena.clear_node(node);
                self.live[node as usize] = 0;
            }
            debug_assert!(
                arena.node_is_clear(node),
                "node {node} reclaimed with entries"
            );
            self.free.push(node);
        }
        self.retired = retired;
        let mut blocks = std::mem::take(&mut self.retired_blocks);
        for block in blocks.drain(..) {
            self.free_block(arena, block);
        }
        self.retired_blocks = blocks;
    }

    /// Whether any leaf intersects `[start, end]`.
    pub fn any_mapped(&self, arena: &Arena, root: u32, start: u64, end: u64) -> bool {
        let levels = self.height(root);
        let end = end.min(coverage_end(levels));
        start <= end && self.any_in(arena, root, levels - 1, start, end)
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
            let lo = start.max(slot);
            let hi = end.min(slot | (span(level) - 1));
            let (first, last) = (page_index(lo), page_index(hi));
            let hit = match kind(entry) {
                KIND_LEAF => true,
                KIND_TABLE => self.any_in(arena, child_of(entry), level - 1, lo, hi),
                KIND_RUNS => arena
                    .block(runs_block(entry))
                    .iter()
                    .any(|slot| run_overlaps(slot.load(Ordering::Relaxed), first, last)),
                KIND_INLINE => run_overlaps(entry, first, last),
                _ => false,
            };
            if hit {
                return true;
            }
        }
        false
    }

    /// Maps `[start, end]` to `phys` with `perms`. The caller has checked alignment to the
    /// 4 KiB base page and that nothing is mapped in the range. Either the whole mapping is
    /// written or, for lack of nodes, nothing is. The tree must reach the mapping (see
    /// [`TableWriter::grow`]); one that does not is refused as if nodes were missing.
    pub fn map(&mut self, arena: &Arena, root: u32, m: Mapping) -> Result<(), TableError> {
        if !self.covers(root, m.virt_end) {
            debug_assert!(false, "a MAP beyond its tree");
            return Err(TableError::NoMemory);
        }
        let top = self.height(root) - 1;
        let mut need = Need::default();
        // Cheap upper bound first (a runs block costs at most a node); count exactly only when
        // it does not fit.
        let bound: u64 = (0..top)
            .map(|level| {
                let shift = level_shift(level + 1);
                (m.virt_end >> shift) - (m.virt_start >> shift) + 1
            })
            .sum();
        if bound > self.available(arena) {
            // A lower bound next: a MAP far too big for what is left is refused without a walk.
            if self.nodes_at_least(&m, top) > self.available(arena) {
                return Err(TableError::NoMemory);
            }
            self.walk_map(
                arena,
                Some(root),
                top,
                m.virt_start,
                m.virt_end,
                &m,
                &mut need,
                true,
            );
            if !self.fits(arena, need) {
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
            &mut need,
            false,
        );
        Ok(())
    }

    /// At least how many nodes a MAP of `m` allocates below the root of a tree whose root is at
    /// level `top`: every span of a level-`l` entry it touches (l >= 2) needs a level-`l - 1`
    /// node, unless one leaf maps that span whole (1 GiB leaves, at level 2), and the nodes in
    /// use could already be some of those nodes. Level-0 nodes are not counted: a 2 MiB
    /// region may take a leaf, an inline run or a runs block instead.
    fn nodes_at_least(&self, m: &Mapping, top: u32) -> u64 {
        let mut need = 0u64;
        for level in 2..=top {
            let shift = level_shift(level);
            let touched = (m.virt_end >> shift) - (m.virt_start >> shift) + 1;
            let leaves = if level <= MAX_LEAF_LEVEL {
                // Spans covered whole, from the first aligned start to the last aligned end;
                // they all start at GPAs with the same offset into a page of that size.
                let size_mask = span(level) - 1;
                let first = (m.virt_start >> shift) + u64::from(m.virt_start & size_mask != 0);
                let past_last = if m.virt_end == u64::MAX {
                    1u64 << (64 - shift)
                } else {
                    (m.virt_end + 1) >> shift
                };
                let aligned = m.phys_start.wrapping_sub(m.virt_start) & size_mask == 0;
                if aligned {
                    past_last.saturating_sub(first)
                } else {
                    0
                }
            } else {
                0
            };
            need = need.saturating_add(touched - leaves);
        }
        need.saturating_sub(self.nodes_in_use())
    }

    /// Maps `[start, end]` (inside this node's span) under `node`. With `dry`, only counts the
    /// nodes and blocks that would be allocated (`node` None = a node that would be new, hence
    /// empty), and stops as soon as they no longer fit: a MAP too big for what is left costs
    /// a walk bounded by the arena, not by the mapping (a 256 TiB MAP of 4 KiB-aligned
    /// addresses used to walk all its 2 MiB regions).
    #[allow(clippy::too_many_arguments)]
    fn walk_map(
        &mut self,
        arena: &Arena,
        node: Option<u32>,
        level: u32,
        start: u64,
        end: u64,
        m: &Mapping,
        need: &mut Need,
        dry: bool,
    ) {
        let size = span(level);
        let node_base = start & !(span(level + 1).wrapping_sub(1));
        for index in entry_index(start, level)..=entry_index(end, level) {
            if dry && !self.fits(arena, *need) {
                return;
            }
            let slot = node_base | ((index as u64) << level_shift(level));
            let slot_end = slot | (size - 1);
            let lo = start.max(slot);
            let hi = end.min(slot_end);
            let entry = node.map_or(0, |n| arena.load(n, index));
            let gpa = m.phys_start + (lo - m.virt_start);
            // The permissions, and whether this piece starts / ends the mapping.
            let flags = m.perms.pte()
                | if lo == m.virt_start { FIRST } else { 0 }
                | if hi == m.virt_end { LAST } else { 0 };
            let whole = lo == slot && hi == slot_end;
            if entry == 0 && whole && level <= MAX_LEAF_LEVEL && gpa & (size - 1) == 0 {
                if !dry {
                    let n = node.unwrap_or_default();
                    arena.store(n, index, gpa | flags | KIND_LEAF);
                    self.live[n as usize] += 1;
                }
                continue;
            }
            debug_assert!(
                level > 0,
                "a 4 KiB-aligned range always fills whole base pages"
            );
            debug_assert!(kind(entry) != KIND_LEAF, "caller checked for overlap");
            if level == 0 || kind(entry) == KIND_LEAF {
                continue;
            }
            if level == 1 && kind(entry) != KIND_TABLE {
                let piece = Piece { lo, hi, gpa, flags };
                // Counted beforehand (or dry): it cannot fail here.
                self.map_region(arena, node, index, entry, piece, need, dry);
                continue;
            }
            let child = if kind(entry) == KIND_TABLE {
                Some(child_of(entry))
            } else if dry {
                need.nodes += 1;
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
            self.walk_map(arena, child, level - 1, lo, hi, m, need, dry);
        }
    }

    /// Maps `piece`, the part of a mapping inside one 2 MiB region, under the level-1 entry
    /// `index` of `node` (empty, an inline run or a runs block): into the entry itself when
    /// the region was empty, a free slot of the block, a new block, or, when no slot can hold
    /// it, a full node that takes over the region's runs. Returns false, changing nothing,
    /// when an allocation failed (never after a dry run that fit).
    #[allow(clippy::too_many_arguments)]
    fn map_region(
        &mut self,
        arena: &Arena,
        node: Option<u32>,
        index: usize,
        entry: u64,
        piece: Piece,
        need: &mut Need,
        dry: bool,
    ) -> bool {
        let run = (piece.gpa < RUN_GPA_LIMIT).then(|| {
            make_run(
                page_index(piece.lo),
                page_index(piece.hi),
                piece.gpa,
                piece.flags,
            )
        });
        let n = node.unwrap_or_default();
        // The region's runs so far: none, its inline run, or its block's.
        let mut runs = [NO_RUN; RUN_SLOTS];
        let (live, block) = match kind(entry) {
            KIND_RUNS => {
                let block = runs_block(entry);
                let live;
                (runs, live) = live_runs(arena.block(block));
                (live, Some(block))
            }
            KIND_INLINE => {
                runs[0] = inline_run(entry);
                (1, None)
            }
            _ => {
                debug_assert_eq!(entry, 0);
                (0, None)
            }
        };
        if let Some(run) = run.filter(|_| live < RUN_SLOTS) {
            if live == 0 {
                // The region's only run: into the entry itself.
                if !dry {
                    arena.store(n, index, run | INLINE_RUN);
                    self.live[n as usize] += 1;
                }
                return true;
            }
            if let Some(slots) = block.map(|block| arena.block(block)) {
                // In place when it sorts after every slot in use (tombstones included) and a
                // slot is left after them: readers see the block before or after the store,
                // both in order.
                let used = slots
                    .iter()
                    .rposition(|s| s.load(Ordering::Relaxed) != NO_RUN)
                    .map_or(0, |at| at + 1);
                let after = used
                    .checked_sub(1)
                    .is_none_or(|at| run_key(slots[at].load(Ordering::Relaxed)) < run_key(run));
                if let (true, Some(slot)) = (after, slots.get(used)) {
                    if !dry {
                        slot.store(run, Ordering::Release);
                    }
                    return true;
                }
            }
            // Otherwise a new block with the run in its place, swapped in whole.
            if dry {
                need.blocks += 1;
                return true;
            }
            let Some(copy) = self.alloc_block(arena) else {
                return false;
            };
            runs[live] = run;
            runs[..=live].sort_unstable_by_key(|&run| run_key(run));
            write_block(arena, copy, &runs[..=live]);
            arena.store(n, index, runs_entry(copy));
            // A replaced inline run needs nothing: readers holding it hold the run itself.
            self.retired_blocks.extend(block);
            return true;
        }
        // A full node with the region's runs and the piece as 4 KiB leaves.
        if dry {
            need.nodes += 1;
            return true;
        }
        let Some(child) = self.alloc(arena) else {
            return false;
        };
        for &run in &runs[..live] {
            self.write_pages(arena, child, run_piece(run));
        }
        self.write_pages(arena, child, piece);
        arena.store(n, index, table_entry(child));
        if entry == 0 {
            self.live[n as usize] += 1;
        }
        self.retired_blocks.extend(block);
        true
    }

    /// Writes `piece` as 4 KiB leaves into the level-0 node `node`.
    fn write_pages(&mut self, arena: &Arena, node: u32, piece: Piece) {
        let (first, last) = (page_index(piece.lo), page_index(piece.hi));
        for page in first..=last {
            let mut leaf = (piece.gpa + ((page - first) << PAGE_SHIFT))
                | (piece.flags & PERM_MASK)
                | KIND_LEAF;
            if page == first {
                leaf |= piece.flags & FIRST;
            }
            if page == last {
                leaf |= piece.flags & LAST;
            }
            arena.store(node, page as usize, leaf);
            self.live[node as usize] += 1;
        }
    }

    /// Single-page fast path, first half: whether the 4 KiB page at `iova` is free, and if so
    /// where [`TableWriter::map_page`] starts building: the highest level whose entry on the
    /// page's path is empty (its nodes are missing below it), or 0 when the path exists down
    /// to the page's node, runs block or inline run. `None` when a leaf or run already covers
    /// the page. The tree must reach the page (see [`TableWriter::grow`]): a page beyond it
    /// counts as taken.
    pub fn page_free(&self, arena: &Arena, root: u32, iova: u64) -> Option<u32> {
        if !self.covers(root, iova) {
            debug_assert!(false, "a page beyond its tree");
            return None;
        }
        let mut node = root;
        for level in (1..self.height(root)).rev() {
            let entry = arena.load(node, entry_index(iova, level));
            match kind(entry) {
                KIND_TABLE => node = child_of(entry),
                KIND_LEAF => return None,
                KIND_RUNS | KIND_INLINE => {
                    return region_run(arena, entry, iova).is_none().then_some(0);
                }
                _ => return Some(level),
            }
        }
        (arena.load(node, entry_index(iova, 0)) == 0).then_some(0)
    }

    /// Single-page fast path, second half: maps the 4 KiB page at `iova` (free, as
    /// [`TableWriter::page_free`] said, answering `missing`) to `phys` as a whole mapping.
    /// Fails, changing nothing, when the nodes or block it needs cannot be allocated.
    pub fn map_page(
        &mut self,
        arena: &Arena,
        root: u32,
        iova: u64,
        phys: u64,
        perms: Perms,
        missing: u32,
    ) -> Result<(), TableError> {
        let piece = Piece {
            lo: iova,
            hi: iova | PAGE_MASK,
            gpa: phys & ADDR_MASK,
            flags: perms.pte() | FIRST | LAST,
        };
        let levels = self.height(root);
        if !self.covers(root, iova) {
            debug_assert!(false, "a page beyond its tree");
            return Err(TableError::NoMemory);
        }
        if levels == 1 {
            self.write_pages(arena, root, piece);
            return Ok(());
        }
        let run = piece.gpa < RUN_GPA_LIMIT;
        if missing > 0 {
            // Table nodes for the levels between, then an inline run (or a node) for the page.
            let need = Need {
                nodes: u64::from(missing - 1) + u64::from(!run),
                blocks: 0,
            };
            if !self.fits(arena, need) {
                return Err(TableError::NoMemory);
            }
        }
        let mut node = root;
        for level in (2..levels).rev() {
            let index = entry_index(iova, level);
            let entry = arena.load(node, index);
            node = if kind(entry) == KIND_TABLE {
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
        let index = entry_index(iova, 1);
        let entry = arena.load(node, index);
        if kind(entry) == KIND_TABLE {
            self.write_pages(arena, child_of(entry), piece);
            return Ok(());
        }
        // Into the region's block, a copy of it, or a node that takes over its runs: whatever
        // it allocates comes before its first store, so a refusal changes nothing.
        if self.map_region(
            arena,
            Some(node),
            index,
            entry,
            piece,
            &mut Need::default(),
            false,
        ) {
            Ok(())
        } else {
            Err(TableError::NoMemory)
        }
    }

    /// Single-page fast path of [`TableWriter::unmap`] for `[iova, iova + 4 KiB)`, `iova`
    /// page-aligned: the same answers, without the range walks.
    pub fn unmap_page(&mut self, arena: &Arena, root: u32, iova: u64) -> Result<u64, TableError> {
        if !self.covers(root, iova) {
            // Nothing is mapped beyond the tree.
            return Ok(0);
        }
        let mut path = [(0u32, 0usize); 8];
        let mut node = root;
        let mut level = self.height(root) - 1;
        loop {
            let index = entry_index(iova, level);
            path[level as usize] = (node, index);
            let entry = arena.load(node, index);
            match kind(entry) {
                KIND_TABLE if level > 0 => {
                    node = child_of(entry);
                    level -= 1;
                }
                // A page-sized range inside a bigger leaf, or a page of a longer mapping.
                KIND_LEAF if level > 0 || entry & (FIRST | LAST) != FIRST | LAST => {
                    return Err(TableError::WouldSplit)
                }
                KIND_LEAF => break,
                KIND_RUNS | KIND_INLINE if level == 1 => {
                    let Some(run) = region_run(arena, entry, iova) else {
                        return Ok(0);
                    };
                    // A longer run, or one page of a longer mapping.
                    if run_len(run) != 0 || run & (FIRST | LAST) != FIRST | LAST {
                        return Err(TableError::WouldSplit);
                    }
                    // The runs left in the region: none beside an inline run.
                    let block = (kind(entry) == KIND_RUNS).then(|| runs_block(entry));
                    let page = page_index(iova);
                    let left = block.map_or(0, |block| tombstone_runs(arena, block, page, page).1);
                    match (left, block) {
                        (0, _) => {
                            self.retired_blocks.extend(block);
                            self.clear_path(arena, root, &path, 1);
                        }
                        (1, Some(block)) => {
                            let (node, index) = path[1];
                            self.inline_last_run(arena, node, index, block);
                        }
                        _ => {}
                    }
                    return Ok(1);
                }
                _ => return Ok(0),
            }
        }
        self.clear_path(arena, root, &path, 0);
        Ok(1)
    }

    /// Clears the entry at `path[from]`, then every table node that leaves empty (never the
    /// root): `path[level]` is the (node, index) of the page's path at `level`.
    fn clear_path(&mut self, arena: &Arena, root: u32, path: &[(u32, usize)], from: usize) {
        for &(node, index) in path.iter().take(self.height(root) as usize).skip(from) {
            arena.store(node, index, 0);
            self.live[node as usize] -= 1;
            if self.live[node as usize] > 0 || node == root {
                break;
            }
            self.retired.push(node);
        }
    }

    /// After an UNMAP left one live run in `block`, the runs block under the level-1 entry
    /// `index` of `node`: the run moves into the entry and the block waits for a grace period
    /// (a reader that loaded the old entry still finds the run there). Allocates nothing.
    fn inline_last_run(&mut self, arena: &Arena, node: u32, index: usize, block: usize) {
        let (runs, live) = live_runs(arena.block(block));
        debug_assert_eq!(live, 1, "one run left");
        arena.store(node, index, runs[0] | INLINE_RUN);
        self.retired_blocks.push(block);
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
        let levels = self.height(root);
        let end = end.min(coverage_end(levels));
        if start > end {
            return Ok(0);
        }
        if let Some(leaf) = lookup(arena, root, levels, start) {
            if leaf.base != start || !leaf.first {
                return Err(TableError::WouldSplit);
            }
        }
        if let Some(leaf) = lookup(arena, root, levels, end) {
            if leaf.end != end || !leaf.last {
                return Err(TableError::WouldSplit);
            }
        }
        Ok(self.clear(arena, root, levels - 1, start, end))
    }

    fn clear(&mut self, arena: &Arena, node: u32, level: u32, start: u64, end: u64) -> u64 {
        if self.live[node as usize] == 0 {
            return 0;
        }
        let mut removed = 0;
        let node_base = start & !(span(level + 1).wrapping_sub(1));
        for index in entry_index(start, level)..=entry_index(end, level) {
            let entry = arena.load(node, index);
            match kind(entry) {
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
                KIND_RUNS | KIND_INLINE => {
                    let slot = node_base | ((index as u64) << level_shift(level));
                    let first = page_index(start.max(slot));
                    let last = page_index(end.min(slot | (span(level) - 1)));
                    let block = (kind(entry) == KIND_RUNS).then(|| runs_block(entry));
                    // The caller checked both ends: a run the range touches lies inside it.
                    let (gone, left) = match block {
                        Some(block) => tombstone_runs(arena, block, first, last),
                        None if run_overlaps(entry, first, last) => {
                            (u64::from(entry & FIRST != 0), 0)
                        }
                        None => (0, 1),
                    };
                    removed += gone;
                    match (left, block) {
                        (0, _) => {
                            arena.store(node, index, 0);
                            self.live[node as usize] -= 1;
                            self.retired_blocks.extend(block);
                        }
                        (1, Some(block)) => self.inline_last_run(arena, node, index, block),
                        _ => {}
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
        self.for_each_leaf(arena, root, self.height(root) - 1, 0, &mut |leaf| {
            if leaf.first {
                open = Some(Mapping {
                    virt_start: leaf.base,
                    virt_end: leaf.end,
                    phys_start: leaf.gpa,
                    perms: Perms::from_pte(leaf.perms),
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
            match kind(entry) {
                KIND_LEAF => f(Leaf::decode(entry, slot, level)),
                KIND_TABLE => self.for_each_leaf(arena, child_of(entry), level - 1, slot, f),
                KIND_RUNS => {
                    let (runs, live) = live_runs(arena.block(runs_block(entry)));
                    for &run in &runs[..live] {
                        f(Leaf::of_run(run, slot));
                    }
                }
                KIND_INLINE => f(Leaf::of_run(inline_run(entry), slot)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: Perms = Perms::RW;

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
        // The region's only run, inline in its level-1 entry: the whole mapping's pages.
        assert_eq!(w.nodes_in_use(), 3, "root, L2, L1: no block");
        let leaf = lookup(&arena, root, 4, 0x2abc).unwrap();
        assert_eq!(
            (leaf.base, leaf.end, leaf.gpa, leaf.first, leaf.last),
            (0x1000, 0x2fff, 0x80_0000, true, true)
        );
        let t = walk(&arena, root, 4, 0x2abc).unwrap();
        assert_eq!((t.gpa, t.left), (0x80_1abc, 0x544));
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
            3,
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
        assert_eq!(
            w.nodes_in_use(),
            3,
            "root, L2, L1; the 4 KiB page is an inline run"
        );
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
    fn unaligned_gpa_falls_back_to_a_run() {
        let (arena, mut w, root) = table(64);
        w.map(&arena, root, m(0x20_0000, 0x3f_ffff, 0x1000))
            .unwrap();
        let leaf = lookup(&arena, root, 4, 0x3f_f000).unwrap();
        assert_eq!(
            (leaf.base, leaf.end, leaf.gpa),
            (0x20_0000, 0x3f_ffff, 0x1000)
        );
        let t = walk(&arena, root, 4, 0x3f_f010).unwrap();
        assert_eq!((t.gpa, t.left), (0x20_0010, 0xff0));
    }

    /// A region's only run sits in its level-1 entry; a second run moves both to a block, or
    /// to a full node when the second's GPA no run can hold; MAP and UNMAP of an inline run,
    /// single-page or ranged, allocate and retire nothing but path nodes.
    #[test]
    fn an_only_run_lives_in_the_level_1_entry() {
        let (arena, mut w, root) = table(64);
        let region = 0x4000_0000u64;
        let entry = |w: &TableWriter| {
            let l2 = child_of(arena.load(root, entry_index(region, 3)));
            let l1 = child_of(arena.load(l2, entry_index(region, 2)));
            assert_eq!(w.height(root), 4);
            kind(arena.load(l1, entry_index(region, 1)))
        };
        let missing = w.page_free(&arena, root, region + 0x5000).unwrap();
        w.map_page(&arena, root, region + 0x5000, 0x7000, RW, missing)
            .unwrap();
        assert_eq!(entry(&w), KIND_INLINE);
        assert_eq!(w.nodes_in_use(), 3, "root, L2, L1: nothing for the region");
        let t = walk(&arena, root, 4, region + 0x5008).unwrap();
        assert_eq!((t.gpa, t.left), (0x7008, 0xff8));
        assert_eq!(walk(&arena, root, 4, region + 0x4fff), None);
        assert_eq!(walk(&arena, root, 4, region + 0x6000), None);
        assert_eq!(w.page_free(&arena, root, region + 0x5000), None);
        assert_eq!(w.page_free(&arena, root, region + 0x6000), Some(0));
        // A second run, sorting first: both go to a new block.
        w.map(&arena, root, m(region, region + 0x1fff, 0x10_0000))
            .unwrap();
        assert_eq!(entry(&w), KIND_RUNS);
        assert_eq!(
            w.retired_blocks(),
            0,
            "an inline run has no block to retire"
        );
        assert_eq!(
            w.mappings(&arena, root),
            vec![
                m(region, region + 0x1fff, 0x10_0000),
                m(region + 0x5000, region + 0x5fff, 0x7000)
            ]
        );
        assert_eq!(w.unmap(&arena, root, region, region + 0x1fff), Ok(1));
        // A range UNMAP over an inline run: the entry goes, and the emptied path with it.
        assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(1));
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
        w.map(&arena, root, m(region + 0x3000, region + 0x4fff, 0x9000))
            .unwrap();
        assert_eq!(entry(&w), KIND_INLINE);
        assert_eq!(
            w.unmap_page(&arena, root, region + 0x3000),
            Err(TableError::WouldSplit),
            "one page of a two-page run"
        );
        assert_eq!(w.unmap_page(&arena, root, region + 0x2000), Ok(0));
        // A second run whose GPA no run can hold: a full node with both as 4 KiB leaves.
        let high = RUN_GPA_LIMIT;
        w.map(&arena, root, m(region + 0x8000, region + 0x8fff, high))
            .unwrap();
        assert_eq!(entry(&w), KIND_TABLE);
        assert_eq!(walk(&arena, root, 4, region + 0x4008).unwrap().gpa, 0xa008);
        assert_eq!(
            walk(&arena, root, 4, region + 0x8008).unwrap().gpa,
            high + 8
        );
        assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(2));
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
        // Single-page UNMAP of a single-page inline run.
        let missing = w.page_free(&arena, root, region).unwrap();
        w.map_page(&arena, root, region, 0, RW, missing).unwrap();
        assert_eq!(w.unmap_page(&arena, root, region), Ok(1));
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
    }

    #[test]
    fn a_gpa_no_run_can_hold_gets_4k_leaves() {
        let (arena, mut w, root) = table(64);
        let high = RUN_GPA_LIMIT;
        w.map(&arena, root, m(0x1000, 0x2fff, high)).unwrap();
        w.map_page(
            &arena,
            root,
            0x8000,
            high + 0x10_0000,
            RW,
            w.page_free(&arena, root, 0x8000).unwrap(),
        )
        .unwrap();
        let leaf = lookup(&arena, root, 4, 0x2000).unwrap();
        assert_eq!(
            (leaf.base, leaf.end, leaf.gpa, leaf.first, leaf.last),
            (0x2000, 0x2fff, high + 0x1000, false, true)
        );
        assert_eq!(
            lookup(&arena, root, 4, 0x8000).unwrap().gpa,
            high + 0x10_0000
        );
        assert_eq!(
            w.mappings(&arena, root),
            vec![m(0x1000, 0x2fff, high), m(0x8000, 0x8fff, high + 0x10_0000)]
        );
        // A run below the limit joins the full node as leaves.
        w.map(&arena, root, m(0x10000, 0x1ffff, 0x40_0000)).unwrap();
        assert_eq!(lookup(&arena, root, 4, 0x1f000).unwrap().gpa, 0x40_f000);
        assert_eq!(w.unmap(&arena, root, 0, 0x1f_ffff), Ok(3));
    }

    /// The ninth run of a region moves the block's runs into a full node; readers find every
    /// page before and after; emptied, everything goes back.
    #[test]
    fn a_full_runs_block_becomes_a_node() {
        let (arena, mut w, root) = table(64);
        let region = 0x4000_0000;
        // Runs of 1, 2, 3, ... pages with a page gap between, GPAs scattered.
        let mut runs = Vec::new();
        let mut at = region;
        for k in 1..=RUN_SLOTS as u64 + 1 {
            let gpa = 0x1_0000_0000 - k * 0x10_0000;
            runs.push(m(at, at + k * 0x1000 - 1, gpa));
            at += (k + 1) * 0x1000;
        }
        for (i, r) in runs.iter().enumerate() {
            w.map(&arena, root, *r).unwrap();
            // Inline, then a block (its carved node), then a full node (the block retired).
            let nodes = match i {
                0 => 3,
                _ if i < RUN_SLOTS => 4,
                _ => 5,
            };
            assert_eq!(w.nodes_in_use(), nodes, "after run {}", i + 1);
            for r in &runs[..=i] {
                for iova in (r.virt_start..r.virt_end).step_by(0x1000) {
                    let t = walk(&arena, root, 4, iova + 8).unwrap();
                    let (gpa, left) = (t.gpa, t.left);
                    assert_eq!(gpa, r.phys_start + (iova - r.virt_start) + 8);
                    if i < RUN_SLOTS {
                        assert_eq!(left, r.virt_end - iova - 7, "a run spans its pages");
                    } else {
                        assert_eq!(left, 0xff8, "a 4 KiB leaf");
                    }
                }
                assert_eq!(walk(&arena, root, 4, r.virt_end + 1), None, "the gap");
            }
        }
        assert_eq!(w.mappings(&arena, root), runs);
        assert_eq!(
            w.unmap(&arena, root, region, runs[1].virt_end - 0x1000),
            Err(TableError::WouldSplit)
        );
        assert_eq!(w.unmap(&arena, root, region, runs[1].virt_end), Ok(2));
        assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(RUN_SLOTS as u64 - 1));
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
    }

    /// Runs in a block come out in IOVA order whatever slots they took; single-page UNMAP
    /// frees a slot, refuses to cut a run, and gives the block back when one run is left (it
    /// moves into the level-1 entry).
    #[test]
    fn runs_block_slots_and_single_pages() {
        let (arena, mut w, root) = table(64);
        for page in [5u64, 1, 9, 3] {
            let iova = page * 0x1000;
            let missing = w.page_free(&arena, root, iova).unwrap();
            w.map_page(&arena, root, iova, page * 0x2000, RW, missing)
                .unwrap();
        }
        assert_eq!(w.page_free(&arena, root, 0x3000), None);
        assert_eq!(w.page_free(&arena, root, 0x4000), Some(0));
        w.map(&arena, root, m(0x10_0000, 0x10_1fff, 0)).unwrap();
        let starts: Vec<u64> = w
            .mappings(&arena, root)
            .iter()
            .map(|m| m.virt_start)
            .collect();
        assert_eq!(starts, [0x1000, 0x3000, 0x5000, 0x9000, 0x10_0000]);
        assert_eq!(
            w.unmap_page(&arena, root, 0x10_0000),
            Err(TableError::WouldSplit)
        );
        assert_eq!(w.unmap_page(&arena, root, 0x4000), Ok(0));
        for page in [5u64, 1, 9, 3] {
            assert_eq!(w.unmap_page(&arena, root, page * 0x1000), Ok(1));
        }
        assert_eq!(w.unmap(&arena, root, 0x10_0000, 0x10_1fff), Ok(1));
        assert!(w.has_retired());
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
    }

    /// Tombstones keep their place: a run appended after one, a run re-using its pages, and
    /// runs inserted in descending order (Linux's allocator) all stay findable. UNMAPs that
    /// leave one run move it inline.
    #[test]
    fn tombstones_and_order() {
        let (arena, mut w, root) = table(64);
        let page = |p: u64| p << PAGE_SHIFT;
        let gpa_of = |iova: u64| walk(&arena, root, 4, iova).map(|t| t.gpa);
        w.map(&arena, root, m(page(1), page(1) | 0xfff, 0x10_0000))
            .unwrap();
        w.map(&arena, root, m(page(2), page(2) | 0xfff, 0x20_0000))
            .unwrap();
        w.map(&arena, root, m(page(5), page(6) | 0xfff, 0x50_0000))
            .unwrap();
        assert_eq!(w.unmap(&arena, root, page(5), page(6) | 0xfff), Ok(1));
        assert_eq!(gpa_of(page(5)), None);
        // Sorts after the tombstone: appended in place.
        w.map(&arena, root, m(page(6), page(6) | 0xfff, 0x60_0000))
            .unwrap();
        assert_eq!(w.retired_blocks(), 0, "appended, not copied");
        assert_eq!(gpa_of(page(5)), None);
        assert_eq!(gpa_of(page(6)), Some(0x60_0000));
        // Re-uses the tombstone's first page: a new block without the tombstone.
        w.map(&arena, root, m(page(5), page(5) | 0xfff, 0x55_0000))
            .unwrap();
        assert_eq!(w.retired_blocks(), 1);
        for (p, gpa) in [
            (1, 0x10_0000),
            (2, 0x20_0000),
            (5, 0x55_0000),
            (6, 0x60_0000),
        ] {
            assert_eq!(gpa_of(page(p)), Some(gpa), "page {p}");
        }
        for p in [0, 3, 4, 7, 511] {
            assert_eq!(gpa_of(page(p)), None, "page {p}");
        }
        // Descending inserts into another region: every one a copy, all found.
        let region = 0x20_0000;
        for p in (500..508u64).rev() {
            w.map(
                &arena,
                root,
                m(region + page(p), region + page(p) + 0xfff, page(p)),
            )
            .unwrap();
        }
        for p in 499..509u64 {
            let want = (500..508).contains(&p).then_some(page(p));
            assert_eq!(gpa_of(region + page(p)), want, "page {p}");
        }
        assert_eq!(w.mappings(&arena, root).len(), 12);
        // UNMAPs that leave one run: it moves into the level-1 entry, the block is retired.
        let l1_kind = |iova: u64| {
            let l2 = child_of(arena.load(root, entry_index(iova, 3)));
            let l1 = child_of(arena.load(l2, entry_index(iova, 2)));
            kind(arena.load(l1, entry_index(iova, 1)))
        };
        let retired = w.retired_blocks();
        assert_eq!(w.unmap(&arena, root, page(1), page(2) | 0xfff), Ok(2));
        assert_eq!(l1_kind(0), KIND_RUNS, "two runs left");
        assert_eq!(w.unmap_page(&arena, root, page(5)), Ok(1));
        assert_eq!(l1_kind(0), KIND_INLINE, "single-page UNMAP");
        assert_eq!(w.retired_blocks(), retired + 1);
        assert_eq!(gpa_of(page(6)), Some(0x60_0000));
        assert_eq!(gpa_of(page(5)), None);
        assert_eq!(
            w.unmap(
                &arena,
                root,
                region + page(500),
                (region + page(506)) | 0xfff
            ),
            Ok(7)
        );
        assert_eq!(l1_kind(region), KIND_INLINE, "range UNMAP");
        assert_eq!(w.retired_blocks(), retired + 2);
        assert_eq!(gpa_of(region + page(507)), Some(page(507)));
        assert_eq!(
            w.mappings(&arena, root),
            vec![
                m(page(6), page(6) | 0xfff, 0x60_0000),
                m(region + page(507), (region + page(507)) | 0xfff, page(507))
            ]
        );
        w.reclaim(&arena);
        assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(2));
        w.reclaim(&arena);
        assert_eq!(w.nodes_in_use(), 1);
    }

    /// Blocks come 64 to a node, and a MAP that needs a block or a node only succeeds when
    /// one is left; a refused MAP changes nothing. An inline run needs neither.
    #[test]
    fn blocks_and_nodes_are_counted_before_a_map() {
        // Root, one L2 and one L1 node for the first 1 GiB, one node carved into blocks: two
        // runs (pages 0 and 2) in each of 64 regions.
        let (arena, mut w, root) = table(4);
        for region in 0..BLOCKS_PER_NODE as u64 {
            for page in [0, 2] {
                let iova = (region << 21) + (page << 12);
                w.map(&arena, root, m(iova, iova + 0xfff, 0)).unwrap();
            }
        }
        assert_eq!(w.nodes_in_use(), 4);
        // The next region's first run is inline: no memory needed.
        let next = (BLOCKS_PER_NODE as u64) << 21;
        assert_eq!(w.page_free(&arena, root, next), Some(1));
        w.map_page(&arena, root, next, 0, RW, 1).unwrap();
        // Its second needs a block.
        let second = next + 0x2000;
        assert_eq!(w.page_free(&arena, root, second), Some(0));
        assert_eq!(
            w.map_page(&arena, root, second, 0, RW, 0),
            Err(TableError::NoMemory)
        );
        assert_eq!(
            w.map(&arena, root, m(second, second + 0xfff, 0)),
            Err(TableError::NoMemory)
        );
        assert_eq!(
            w.page_free(&arena, root, second),
            Some(0),
            "nothing changed"
        );
        assert_eq!(w.nodes_in_use(), 4);
        // A ninth run needs a node for the conversion: refused as well. Runs that sort last
        // fill the block in place (pages 4, 6, ..., 14).
        for page in 2..RUN_SLOTS as u64 {
            w.map(&arena, root, m(page << 13, (page << 13) + 0xfff, 0))
                .unwrap();
        }
        assert_eq!(
            w.map(&arena, root, m(0x1000, 0x1fff, 0)),
            Err(TableError::NoMemory)
        );
        let missing = w.page_free(&arena, root, 0x1000).unwrap();
        assert_eq!(
            w.map_page(&arena, root, 0x1000, 0, RW, missing),
            Err(TableError::NoMemory)
        );
        assert_eq!(
            w.mappings(&arena, root).len(),
            2 * BLOCKS_PER_NODE + RUN_SLOTS - 2 + 1
        );
        assert!(!w.any_mapped(&arena, root, second, second + 0xfff));
        assert!(w.any_mapped(&arena, root, next, next + 0xfff));
        assert!(!w.any_mapped(&arena, root, 0x1000, 0x1fff));
        assert!(w.any_mapped(&arena, root, 0x1000, 0x2fff));
    }

    /// A MAP far bigger than the nodes left is refused at once and changes nothing; one that
    /// needs exactly the nodes left still fits.
    #[test]
    fn a_map_too_big_for_the_tables_is_refused_and_one_that_fits_is_not() {
        const GIB: u64 = 1 << 30;
        const MIB2: u64 = 2 << 20;
        // Root, a level-2 node, and k level-1 nodes for k GiB mapped at a GPA that no 1 GiB
        // or 2 MiB leaf can hold (each region gets an inline run).
        for k in [1u64, 3, 7] {
            let (arena, mut w, root) = table(2 + k);
            let m = |gib: u64| m(0, gib * GIB - 1, 0x1000);
            assert_eq!(w.map(&arena, root, m(k + 1)), Err(TableError::NoMemory));
            assert_eq!(w.nodes_in_use(), 1);
            assert!(w.mappings(&arena, root).is_empty());
            w.map(&arena, root, m(k)).unwrap();
            assert_eq!(w.nodes_in_use(), 2 + k);
            assert_eq!(
                lookup(&arena, root, 4, k * GIB - 1).unwrap().gpa,
                0x1000 + (k * GIB - MIB2)
            );
        }
        // Level-1 nodes that exist already count: pages in the first and last GiB, outside
        // the MAP, leave it one level-1 node to allocate, and exactly one node is left.
        let (arena, mut w, root) = table(5);
        w.map(&arena, root, m(0, 0xfff, 0x1000)).unwrap();
        w.map(&arena, root, m(3 * GIB - 0x1000, 3 * GIB - 1, 0x1000))
            .unwrap();
        assert_eq!(w.nodes_in_use(), 4);
        w.map(&arena, root, m(MIB2, 3 * GIB - MIB2 - 1, 0x1000))
            .unwrap();
        assert_eq!(w.nodes_in_use(), 5);
        // The whole 48-bit space, and the top half of a 64-bit one: refused, nothing changed.
        let (arena, mut w, root) = table(64);
        let whole = m(0, (1 << 48) - 1, 0x1000);
        assert_eq!(w.map(&arena, root, whole), Err(TableError::NoMemory));
        assert_eq!(w.nodes_in_use(), 1);
        let arena = Arena::new(64).unwrap();
        let mut w = TableWriter::new(6);
        let root = w.new_root(&arena).unwrap();
        let top = m(1 << 63, u64::MAX, 0x1000);
        assert_eq!(w.map(&arena, root, top), Err(TableError::NoMemory));
        assert_eq!(w.nodes_in_use(), 1);
        // At a 1 GiB-aligned GPA the same 48-bit MAP is 1 GiB leaves under level-2 nodes.
        let (arena, mut w, root) = table(1 + 512);
        w.map(&arena, root, m(0, (1 << 48) - 1, 0)).unwrap();
        assert_eq!(w.nodes_in_use(), 1 + 512);
        assert_eq!(lookup(&arena, root, 4, (1 << 47) + 5).unwrap().gpa, 1 << 47);
    }

    #[test]
    fn a_grouped_walk_answers_as_single_walks() {
        const GIB: u64 = 1 << 30;
        const MIB2: u64 = 2 << 20;
        // Every kind of end: a 1 GiB leaf, a 2 MiB leaf, an inline run, a runs block, a full
        // level-0 node (ten runs in one region), a run above the runs' GPA limit, and holes.
        let mut mappings = vec![
            m(GIB, 2 * GIB - 1, 4 * GIB),
            m(MIB2, 2 * MIB2 - 1, 8 * MIB2),
            m(3 * MIB2 + 0x5000, 3 * MIB2 + 0x7fff, 0x30_0000),
            m(5 * MIB2 + 0x1000, 5 * MIB2 + 0x1fff, 0x40_0000),
            m(5 * MIB2 + 0x8000, 5 * MIB2 + 0xffff, 0x50_0000),
            m(7 * MIB2 + 0x2000, 7 * MIB2 + 0x2fff, RUN_GPA_LIMIT + 0x1000),
        ];
        for k in 0..10 {
            let start = 9 * MIB2 + k * 0x3000;
            mappings.push(m(start, start + 0xfff, 0x60_0000 + k * 0x1000));
        }
        let probes: Vec<u64> = (0..24 * MIB2 / 0x1000)
            .map(|page| page * 0x1000 + 0x18)
            .chain([GIB + 0x1234_5678, 2 * GIB, u64::MAX - 7])
            .collect();
        for levels in 1..=6 {
            let arena = Arena::new(64).unwrap();
            let mut w = TableWriter::new(levels);
            let root = w.new_root(&arena).unwrap();
            let end = coverage_end(levels);
            for mapping in mappings.iter().filter(|m| m.virt_end <= end) {
                w.map(&arena, root, *mapping).unwrap();
            }
            let probes: Vec<u64> = probes.iter().copied().filter(|&p| p <= end).collect();
            let mut found = 0;
            for size in [GROUP, 7] {
                for group in probes.chunks(size) {
                    let mut seen = 0;
                    walk_group(&arena, root, levels, group, |i, got| {
                        assert_eq!(i, seen);
                        seen += 1;
                        let want = walk(&arena, root, levels, group[i]);
                        assert_eq!(got, want, "{} levels, {:#x}", levels, group[i]);
                        found += usize::from(got.is_some());
                    });
                    assert_eq!(seen, group.len());
                }
            }
            let expected = mappings
                .iter()
                .filter(|m| m.virt_end <= end)
                .map(|m| {
                    probes
                        .iter()
                        .filter(|&&p| m.virt_start <= p && p <= m.virt_end)
                        .count()
                })
                .sum::<usize>();
            assert_eq!(found, 2 * expected, "{levels} levels");
        }
        // More IOVAs than a group: the first GROUP are walked.
        let (arena, mut w, root) = table(16);
        w.map(&arena, root, m(0, 0xfff, 0x9000)).unwrap();
        let mut calls = 0;
        walk_group(&arena, root, 4, &[0x10; GROUP + 3], |_, got| {
            assert_eq!(got.map(|t| t.gpa), Some(0x9010));
            calls += 1;
        });
        assert_eq!(calls, GROUP);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Clone, Debug)]
        enum Op {
            /// First page (of 1024: two 2 MiB regions), pages, GPA page, GPA above the limit.
            Map(u64, u64, u64, bool),
            Unmap(u64, u64),
            /// A grace period: retired nodes and blocks come back.
            Reclaim,
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0u64..1024, 1u64..20, 0u64..4096, proptest::bool::weighted(0.1))
                    .prop_map(|(p, n, g, high)| Op::Map(p, n, g, high)),
                3 => (0u64..1024, 1u64..40).prop_map(|(p, n)| Op::Unmap(p, n)),
                1 => Just(Op::Reclaim),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

            /// Runs blocks, their copies, tombstones and conversions to full nodes against a
            /// plain map of mappings: every page translates as the map says after every step,
            /// and emptied tables give every node back.
            #[test]
            fn runs_agree_with_a_plain_map(ops in proptest::collection::vec(op(), 1..120)) {
                let (arena, mut w, root) = table(256);
                let base = 0x7f_c000_0000u64;
                let mut model: BTreeMap<u64, Mapping> = BTreeMap::new();
                for op in ops {
                    match op {
                        Op::Map(p, n, g, high) => {
                            let end = (p + n).min(1024) - 1;
                            let (start, end) = (base + (p << 12), base + (end << 12) + 0xfff);
                            let phys = (g << 12) + if high { RUN_GPA_LIMIT } else { 0 };
                            let free = !model.values().any(|m| m.virt_start <= end && start <= m.virt_end);
                            prop_assert_eq!(!w.any_mapped(&arena, root, start, end), free);
                            if free {
                                let mapping = m(start, end, phys);
                                if n == 1 {
                                    let missing = w.page_free(&arena, root, start).unwrap();
                                    w.map_page(&arena, root, start, phys, RW, missing).unwrap();
                                } else {
                                    w.map(&arena, root, mapping).unwrap();
                                }
                                model.insert(start, mapping);
                            }
                        }
                        Op::Unmap(p, n) => {
                            let end = (p + n).min(1024) - 1;
                            let (start, end) = (base + (p << 12), base + (end << 12) + 0xfff);
                            let cut = model.values().any(|m| {
                                (m.virt_start < start && start <= m.virt_end)
                                    || (m.virt_start <= end && end < m.virt_end)
                            });
                            let inside: Vec<u64> = model
                                .values()
                                .filter(|m| start <= m.virt_start && m.virt_end <= end)
                                .map(|m| m.virt_start)
                                .collect();
                            let got = if n == 1 {
                                w.unmap_page(&arena, root, start)
                            } else {
                                w.unmap(&arena, root, start, end)
                            };
                            if cut {
                                prop_assert_eq!(got, Err(TableError::WouldSplit));
                            } else {
                                prop_assert_eq!(got, Ok(inside.len() as u64));
                                for s in inside {
                                    model.remove(&s);
                                }
                            }
                        }
                        Op::Reclaim => w.reclaim(&arena),
                    }
                    for page in 0..1024u64 {
                        let iova = base + (page << 12) + 0x10;
                        let want = model
                            .range(..=iova)
                            .next_back()
                            .filter(|(_, m)| iova <= m.virt_end)
                            .map(|(_, m)| (m.phys_start + (iova - m.virt_start), m.virt_end - iova + 1));
                        let got = walk(&arena, root, 4, iova).map(|t| (t.gpa, t.left));
                        match (got, want) {
                            // A walk may stop at a leaf or run end before the mapping's.
                            (Some((gpa, left)), Some((wgpa, wleft))) => {
                                prop_assert_eq!(gpa, wgpa, "page {}", page);
                                prop_assert!(left > 0 && left <= wleft, "page {}", page);
                            }
                            (got, want) => prop_assert_eq!(got, want, "page {}", page),
                        }
                    }
                    // The grouped walk answers as one walk each (pages in a scattered order).
                    let iovas: Vec<u64> =
                        (0..1024u64).map(|k| base + (((k * 389) % 1024) << 12) + 0x10).collect();
                    for group in iovas.chunks(GROUP) {
                        let mut seen = 0;
                        walk_group(&arena, root, 4, group, |i, got| {
                            assert_eq!(i, seen);
                            seen += 1;
                            assert_eq!(got, walk(&arena, root, 4, group[i]), "{:#x}", group[i]);
                        });
                        prop_assert_eq!(seen, group.len());
                    }
                    prop_assert_eq!(w.mappings(&arena, root), model.values().copied().collect::<Vec<_>>());
                }
                prop_assert_eq!(w.unmap(&arena, root, 0, u64::MAX), Ok(model.len() as u64));
                w.reclaim(&arena);
                prop_assert_eq!(w.nodes_in_use(), 1);
            }
        }
    }

    #[test]
    fn no_memory_leaves_nothing_behind() {
        // Root + 2 table nodes per far-apart 4 KiB mapping (the page is an inline run): 4
        // nodes cannot hold two.
        let (arena, mut w, root) = table(4);
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
