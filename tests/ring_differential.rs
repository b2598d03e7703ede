// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Differential test of the request queue's ring fast path (src/ring.rs): two daemons with the
//! same topology, one with `--ring-fast-path on` and one with `--ring-fast-path off` (every
//! chain through virtio-queue and `Device::process_chain`), get the same random guest input and
//! must give the same observable answers: the used elements (id and used length) in the same
//! order, the bytes in every buffer the chains point at (device-writable or not), the daemon
//! alive, the request counters and the model state (domains, groups, mappings) afterwards.
//!
//! The input is a few steps of a few chains each, written into the rings, made available by
//! one index store and then kicked as a driver decides to (only when the device asks for
//! it: VRING_USED_F_NO_NOTIFY, or `avail_event` with EVENT_IDX): well-formed
//! ATTACH/DETACH/MAP/UNMAP/PROBE requests with valid and invalid fields, truncated requests and
//! garbage, in the shapes the fast path takes (direct, at most 8 descriptors, each buffer in one
//! region) and every shape it must hand over: zero-length buffers, buffers outside guest memory
//! or straddling two regions (contiguous, or running into a hole), readable after writable,
//! writable areas too small for the reply or too large, more than 8 descriptors, `next` out of
//! the table, loops, indirect tables (well-formed and not), head indices out of the table,
//! lengths that overflow.
//!
//! Every chain's buffers are written before any chain of its step is published and a chain's
//! descriptors only name its own table slots, so what the device finds does not depend on when
//! it looks; each step ends with a sentinel request whose completion says everything before it
//! was handled (one worker, ring order).
//!
//! The proptest runs on a fixed seed (`PROPTEST_RNG_SEED` picks another) and 96 cases
//! (`PROPTEST_CASES` overrides it).

mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use common::*;
use proptest::{
    prelude::*,
    test_runner::{Config, RngSeed, TestCaseError, TestRunner},
};
use serde_json::{json, Value};
use vhost_iommu_testkit::{
    Chain, Driver, GuestRam, MemoryRegion, Options, RawDesc, VRING_DESC_F_INDIRECT,
    VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio::{MapFlags, Request};

const MIB: u64 = 1 << 20;
/// Guest memory: [0, 32M) and [32M, 40M) contiguous, a hole, then [48M, 56M).
const R1_START: u64 = 32 * MIB;
const HOLE_START: u64 = 40 * MIB;
const R2_START: u64 = 48 * MIB;
const QUEUE_SIZE: u16 = 256;
/// Where raw chains' buffers go (the testkit's allocator works from the bottom of the first
/// region and never gets near them), compared byte for byte after every step.
const WINDOWS: [(&str, u64, u64); 4] = [
    ("region 0", 30 * MIB, 256 * 1024),
    ("across regions 0/1", R1_START - 4096, 8192),
    ("end of region 1", HOLE_START - 4096, 4096),
    ("region 2", R2_START, 128 * 1024),
];
const POISON: u8 = 0x5a;
/// The daemons' topology: a few endpoints, a group of two, small caps and a small domain
/// range (so that NOMEM and RANGE answers come up).
const TOPOLOGY: &[&str] = &[
    "--endpoints",
    "00:05.0-00:07.7",
    "--group",
    "00:06.0,00:06.1",
    "--domain-range",
    "0-15",
    "--max-domains",
    "4",
    "--max-mappings-per-domain",
    "6",
    "--reserved",
    "0x8000-0x8fff:reserved@00:05.0",
];
const ENDPOINTS: [u32; 4] = [0x28, 0x30, 0x31, 0x38];

// ---- the generated input ---------------------------------------------------------------

/// The device-readable bytes of a chain.
#[derive(Debug, Clone)]
enum Payload {
    Valid(Request),
    /// The first `n` bytes of a request.
    Truncated(Request, usize),
    /// A request with trailing bytes.
    Padded(Request, usize),
    Garbage(Vec<u8>),
}

impl Payload {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Payload::Valid(r) => r.encode(),
            Payload::Truncated(r, n) => {
                let mut b = r.encode();
                b.truncate(*n);
                b
            }
            Payload::Padded(r, n) => {
                let mut b = r.encode();
                b.extend((0..*n).map(|i| i as u8));
                b
            }
            Payload::Garbage(b) => b.clone(),
        }
    }

    /// The writable length the request wants.
    fn natural_writable(&self) -> usize {
        match self {
            Payload::Valid(r) | Payload::Truncated(r, _) | Payload::Padded(r, _) => {
                r.writable_len(PROBE_SIZE)
            }
            Payload::Garbage(_) => 4,
        }
    }
}

/// Writable length of a chain, relative to what its request wants.
#[derive(Debug, Clone, Copy)]
enum WLen {
    Natural,
    Exact(usize),
    Extra(usize),
}

impl WLen {
    fn resolve(self, natural: usize) -> usize {
        match self {
            WLen::Natural => natural,
            WLen::Exact(n) => n,
            WLen::Extra(n) => natural + n,
        }
    }
}

/// Where a raw buffer lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Region0,
    Region2,
    /// Across the boundary of the two contiguous regions (legal).
    AcrossRegions,
    /// Running from region 1 into the hole.
    IntoHole,
    /// In the hole.
    Hole,
    /// Far beyond guest memory.
    Far,
    /// Ending exactly where region 1 (and memory before the hole) ends.
    EndOfRegion1,
}

/// A raw buffer's length.
#[derive(Debug, Clone, Copy)]
enum Len {
    /// Readable: the rest of the request (8 if none is left); writable: what the request wants.
    Natural,
    Exact(u32),
}

#[derive(Debug, Clone, Copy)]
struct Leaf {
    place: Place,
    len: Len,
}

/// The `next` of a raw chain's last descriptor.
#[derive(Debug, Clone, Copy)]
enum Tail {
    End,
    /// NEXT to this index (at or beyond the queue size).
    OutOfRange(u16),
    /// NEXT back to descriptor `i % n` of the chain.
    Loop(usize),
}

/// An indirect table's length field relative to its descriptors.
#[derive(Debug, Clone, Copy)]
enum TableLen {
    Exact,
    Zero,
    /// Not a multiple of 16.
    Short,
    Longer,
}

#[derive(Debug, Clone)]
enum Shape {
    /// `Chain::request`: one readable, one writable descriptor.
    Simple(WLen),
    /// Readable and writable bytes split over several descriptors (more than 8 in all, too),
    /// optionally in an indirect table built by the testkit.
    Split {
        readable: usize,
        writable: usize,
        wlen: WLen,
        indirect: bool,
    },
    /// A zero-length descriptor (readable or writable) inserted at `at`.
    ZeroLength {
        at: usize,
        writable: bool,
        wlen: WLen,
    },
    /// Raw descriptors: readable leaves, then writable leaves; `disorder` moves a readable one
    /// after the writable ones.
    Raw {
        readable: Vec<Leaf>,
        writable: Vec<Leaf>,
        disorder: Option<usize>,
        tail: Tail,
    },
    /// A raw indirect descriptor over a table the test writes.
    Indirect {
        readable: Vec<Leaf>,
        writable: Vec<Leaf>,
        table_len: TableLen,
        /// Extra flags on the indirect descriptor itself (WRITE, NEXT).
        outer_flags: u16,
        /// An indirect descriptor inside the table.
        nested: bool,
        table_outside: bool,
    },
    /// A head index outside the descriptor table published in the available ring.
    BadHead(u16),
    /// The simple case as raw descriptors (readable then writable buffer, in region 0 or
    /// region 2) with at most one thing changed: the chains right at the fast path's edge.
    Mutant { region2: bool, mutation: Mutation },
}

#[derive(Debug, Clone, Copy)]
enum Mutation {
    None,
    ReadableAfterWritable,
    WritableOnly,
    ReadableOnly,
    /// A zero-length buffer before (0), between (1) or after (2) the two.
    ZeroLength {
        at: usize,
        writable: bool,
        place: Place,
    },
    WritableLen(u32),
    ReadableLen(u32),
    /// One of the two buffers moved.
    Moved {
        writable: bool,
        place: Place,
    },
    /// The readable and writable bytes over this many descriptors each.
    Split {
        readable: usize,
        writable: usize,
    },
    Tail(Tail),
    /// An extra flag on one of the two buffers.
    Flag {
        writable: bool,
        flag: u16,
    },
}

#[derive(Debug, Clone)]
struct ChainSpec {
    payload: Payload,
    shape: Shape,
}

type Step = Vec<ChainSpec>;

fn domain() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => 1u32..3,
        1 => 0u32..20,
        1 => any::<u32>(),
    ]
}

fn endpoint() -> impl Strategy<Value = u32> {
    prop_oneof![
        6 => proptest::sample::select(ENDPOINTS.to_vec()),
        1 => Just(0x99u32),
        1 => any::<u32>(),
    ]
}

fn iova() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..16).prop_map(|p| 0x10_0000 + (p << 12)),
        1 => Just(0x8000u64),
        1 => any::<u64>(),
    ]
}

fn request() -> impl Strategy<Value = Request> {
    let flags = (any::<bool>(), any::<bool>(), prop::bool::weighted(0.1))
        .prop_map(|(read, write, mmio)| MapFlags { read, write, mmio });
    prop_oneof![
        3 => (domain(), endpoint(), prop::bool::weighted(0.2)).prop_map(|(domain, endpoint, bypass)| {
            Request::Attach { domain, endpoint, bypass }
        }),
        2 => (domain(), endpoint()).prop_map(|(domain, endpoint)| Request::Detach { domain, endpoint }),
        4 => (domain(), iova(), prop_oneof![4 => (1u64..4).prop_map(|n| (n << 12) - 1), 1 => any::<u64>()], iova(), flags)
            .prop_map(|(domain, virt_start, size, phys_start, flags)| Request::Map {
                domain,
                virt_start,
                virt_end: virt_start.wrapping_add(size),
                phys_start,
                flags,
            }),
        3 => (domain(), iova(), prop_oneof![4 => (1u64..8).prop_map(|n| (n << 12) - 1), 1 => any::<u64>()])
            .prop_map(|(domain, virt_start, size)| Request::Unmap {
                domain,
                virt_start,
                virt_end: virt_start.wrapping_add(size),
            }),
        2 => endpoint().prop_map(|endpoint| Request::Probe { endpoint }),
    ]
}

fn payload() -> impl Strategy<Value = Payload> {
    prop_oneof![
        12 => request().prop_map(Payload::Valid),
        2 => (request(), 0usize..24).prop_map(|(r, n)| Payload::Truncated(r, n)),
        1 => (request(), 1usize..160).prop_map(|(r, n)| Payload::Padded(r, n)),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(Payload::Garbage),
    ]
}

fn wlen() -> impl Strategy<Value = WLen> {
    prop_oneof![
        8 => Just(WLen::Natural),
        2 => (0usize..8).prop_map(WLen::Exact),
        1 => (1usize..64).prop_map(WLen::Extra),
        1 => Just(WLen::Exact(64 * 1024 + 4)),
    ]
}

fn place() -> impl Strategy<Value = Place> {
    prop_oneof![
        10 => Just(Place::Region0),
        4 => Just(Place::Region2),
        2 => Just(Place::AcrossRegions),
        1 => Just(Place::IntoHole),
        1 => Just(Place::Hole),
        1 => Just(Place::Far),
        1 => Just(Place::EndOfRegion1),
    ]
}

fn len() -> impl Strategy<Value = Len> {
    prop_oneof![
        8 => Just(Len::Natural),
        1 => Just(Len::Exact(0)),
        2 => (1u32..9).prop_map(Len::Exact),
        1 => Just(Len::Exact(200)),
        1 => Just(Len::Exact(64 * 1024 + 4)),
        1 => Just(Len::Exact(u32::MAX)),
    ]
}

fn leaf() -> impl Strategy<Value = Leaf> {
    (place(), len()).prop_map(|(place, len)| Leaf { place, len })
}

fn tail() -> impl Strategy<Value = Tail> {
    prop_oneof![
        8 => Just(Tail::End),
        1 => prop_oneof![QUEUE_SIZE..QUEUE_SIZE + 8, Just(u16::MAX)].prop_map(Tail::OutOfRange),
        1 => (0usize..12).prop_map(Tail::Loop),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => Just(Mutation::None),
        2 => Just(Mutation::ReadableAfterWritable),
        1 => Just(Mutation::WritableOnly),
        1 => Just(Mutation::ReadableOnly),
        3 => (0usize..3, any::<bool>(), place())
            .prop_map(|(at, writable, place)| Mutation::ZeroLength { at, writable, place }),
        3 => prop_oneof![
            0u32..8,
            Just(516),
            Just(520),
            Just(64 * 1024 - 4),
            Just(64 * 1024),
            Just(64 * 1024 + 1),
            Just(u32::MAX),
        ]
        .prop_map(Mutation::WritableLen),
        2 => prop_oneof![1u32..24, Just(127), Just(128), Just(129), Just(4096), Just(u32::MAX - 3)]
            .prop_map(Mutation::ReadableLen),
        3 => (any::<bool>(), place()).prop_map(|(writable, place)| Mutation::Moved { writable, place }),
        3 => (1usize..8, 1usize..6)
            .prop_map(|(readable, writable)| Mutation::Split { readable, writable }),
        2 => tail().prop_map(Mutation::Tail),
        1 => (any::<bool>(), prop_oneof![Just(VRING_DESC_F_INDIRECT), Just(VRING_DESC_F_WRITE), Just(8u16)])
            .prop_map(|(writable, flag)| Mutation::Flag { writable, flag }),
    ]
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        8 => wlen().prop_map(Shape::Simple),
        10 => (prop::bool::weighted(0.3), mutation())
            .prop_map(|(region2, mutation)| Shape::Mutant { region2, mutation }),
        3 => (1usize..10, 1usize..5, wlen(), prop::bool::weighted(0.3)).prop_map(
            |(readable, writable, wlen, indirect)| Shape::Split { readable, writable, wlen, indirect }
        ),
        1 => (0usize..3, any::<bool>(), wlen())
            .prop_map(|(at, writable, wlen)| Shape::ZeroLength { at, writable, wlen }),
        4 => (
            prop::collection::vec(leaf(), 0..6),
            prop::collection::vec(leaf(), 0..6),
            prop::option::weighted(0.1, 0usize..6),
            tail(),
        )
            .prop_map(|(readable, writable, disorder, tail)| Shape::Raw {
                readable,
                writable,
                disorder,
                tail,
            }),
        2 => (
            prop::collection::vec(leaf(), 0..4),
            prop::collection::vec(leaf(), 0..3),
            prop_oneof![
                6 => Just(TableLen::Exact),
                1 => Just(TableLen::Zero),
                1 => Just(TableLen::Short),
                1 => Just(TableLen::Longer),
            ],
            prop_oneof![
                6 => Just(0u16),
                1 => Just(VRING_DESC_F_WRITE),
                1 => Just(VRING_DESC_F_NEXT),
            ],
            prop::bool::weighted(0.1),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(readable, writable, table_len, outer_flags, nested, table_outside)| {
                Shape::Indirect {
                    readable,
                    writable,
                    table_len,
                    outer_flags,
                    nested,
                    table_outside,
                }
            }),
        1 => prop_oneof![QUEUE_SIZE..QUEUE_SIZE + 4, Just(u16::MAX)].prop_map(Shape::BadHead),
    ]
}

/// A first step of simple, mostly valid ATTACHes and MAPs (state for the others to work on),
/// then random steps.
fn steps() -> impl Strategy<Value = Vec<Step>> {
    let setup = (
        1u32..3,
        proptest::sample::select(ENDPOINTS.to_vec()),
        0u64..16,
        1u64..4,
    )
        .prop_flat_map(|(domain, endpoint, page, pages)| {
            let iova = 0x10_0000 + (page << 12);
            let attach = Request::Attach {
                domain,
                endpoint,
                bypass: false,
            };
            let map = Request::Map {
                domain,
                virt_start: iova,
                virt_end: iova + (pages << 12) - 1,
                phys_start: page << 20,
                flags: MapFlags {
                    read: true,
                    write: true,
                    mmio: false,
                },
            };
            proptest::sample::select(vec![vec![attach], vec![attach, map]])
        })
        .prop_map(|requests| {
            requests
                .into_iter()
                .map(|r| ChainSpec {
                    payload: Payload::Valid(r),
                    shape: Shape::Simple(WLen::Natural),
                })
                .collect::<Vec<_>>()
        });
    let prologue = prop::collection::vec(setup, 1..4).prop_map(|s| s.concat());
    let chain = (payload(), shape()).prop_map(|(payload, shape)| ChainSpec { payload, shape });
    (
        prologue,
        prop::collection::vec(prop::collection::vec(chain, 1..8), 1..5),
    )
        .prop_map(|(prologue, mut steps)| {
            steps.insert(0, prologue);
            steps
        })
}

// ---- materialized into writes and posts ------------------------------------------------

/// A chain posted through the testkit's well-formed path.
#[derive(Debug)]
enum Segment {
    R(Vec<u8>),
    W(usize),
}

#[derive(Debug)]
enum Op {
    Chain {
        segments: Vec<Segment>,
        indirect: bool,
    },
    Raw(Vec<RawDesc>),
    BadHead(u16),
}

/// One step, the same for both daemons: bytes to write into the windows, then chains to post.
#[derive(Debug, Default)]
struct Plan {
    writes: Vec<(u64, Vec<u8>)>,
    ops: Vec<Op>,
    /// Bump allocators in the region 0 and region 2 windows.
    cursor0: u64,
    cursor2: u64,
}

fn bump(cursor: &mut u64, (start, size): (u64, u64), len: u64) -> u64 {
    let len = len.min(size);
    if *cursor + len > size {
        *cursor = 0;
    }
    let at = start + *cursor;
    *cursor = (*cursor + len + 15) & !15;
    at
}

impl Plan {
    fn addr(&mut self, place: Place, len: u32) -> u64 {
        let len = u64::from(len);
        let half = (len / 2).clamp(1, 2048);
        match place {
            Place::Region0 => bump(&mut self.cursor0, (WINDOWS[0].1, WINDOWS[0].2), len),
            Place::Region2 => bump(&mut self.cursor2, (WINDOWS[3].1, WINDOWS[3].2), len),
            Place::AcrossRegions => R1_START - half,
            Place::IntoHole => HOLE_START - half,
            Place::Hole => HOLE_START + 0x1000,
            Place::Far => 1 << 40,
            Place::EndOfRegion1 => HOLE_START - len.min(4096),
        }
    }

    /// Lays out raw leaves: readable ones take the request's bytes in order.
    fn leaves(
        &mut self,
        leaves: &[(Leaf, bool)],
        bytes: &[u8],
        natural_writable: usize,
    ) -> Vec<RawDesc> {
        let mut rest = bytes;
        leaves
            .iter()
            .map(|&(leaf, write)| {
                let len = match (leaf.len, write) {
                    (Len::Exact(n), _) => n,
                    (Len::Natural, true) => natural_writable as u32,
                    (Len::Natural, false) if rest.is_empty() => 8,
                    (Len::Natural, false) => rest.len() as u32,
                };
                let addr = self.addr(leaf.place, len);
                if write {
                    RawDesc::writable(addr, len)
                } else {
                    let take = rest.len().min(len as usize);
                    self.writes.push((addr, rest[..take].to_vec()));
                    rest = &rest[take..];
                    RawDesc::readable(addr, len)
                }
            })
            .collect()
    }

    /// [`Shape::Mutant`]'s descriptors.
    fn mutant(
        &mut self,
        region2: bool,
        mutation: Mutation,
        bytes: &[u8],
        natural: usize,
    ) -> Vec<RawDesc> {
        let home = if region2 {
            Place::Region2
        } else {
            Place::Region0
        };
        let leaf = |place, len| Leaf { place, len };
        let readable_len = match mutation {
            Mutation::ReadableLen(n) => Len::Exact(n),
            _ => Len::Natural,
        };
        let writable_len = match mutation {
            Mutation::WritableLen(n) => Len::Exact(n),
            _ => Len::Natural,
        };
        let mut r = leaf(home, readable_len);
        let mut w = leaf(home, writable_len);
        if let Mutation::Moved { writable, place } = mutation {
            if writable {
                w.place = place;
            } else {
                r.place = place;
            }
        }
        let mut leaves = match mutation {
            Mutation::ReadableAfterWritable => vec![(w, true), (r, false)],
            Mutation::WritableOnly => vec![(w, true)],
            Mutation::ReadableOnly => vec![(r, false)],
            _ => vec![(r, false), (w, true)],
        };
        if let Mutation::ZeroLength {
            at,
            writable,
            place,
        } = mutation
        {
            leaves.insert(at.min(leaves.len()), (leaf(place, Len::Exact(0)), writable));
        }
        if let Mutation::Split { readable, writable } = mutation {
            // Natural lengths split: the readable pieces take the request in turn.
            let pieces = |total: usize, parts: usize| {
                let parts = parts.clamp(1, total.max(1));
                (0..parts)
                    .map(|i| (total / parts + usize::from(i < total % parts)) as u32)
                    .collect::<Vec<_>>()
            };
            leaves = pieces(bytes.len(), readable)
                .into_iter()
                .map(|n| (leaf(home, Len::Exact(n)), false))
                .chain(
                    pieces(natural, writable)
                        .into_iter()
                        .map(|n| (leaf(home, Len::Exact(n)), true)),
                )
                .collect();
        }
        let mut descs = self.leaves(&leaves, bytes, natural);
        if let Mutation::Flag { writable, flag } = mutation {
            if let Some(d) = descs
                .iter_mut()
                .find(|d| (d.flags & VRING_DESC_F_WRITE != 0) == writable)
            {
                d.flags |= flag;
            }
        }
        let tail = match mutation {
            Mutation::Tail(t) => t,
            _ => Tail::End,
        };
        link(&mut descs, tail);
        descs
    }

    fn add(&mut self, spec: &ChainSpec) {
        let bytes = spec.payload.bytes();
        let natural = spec.payload.natural_writable();
        let op = match &spec.shape {
            Shape::Simple(w) => {
                let w = w.resolve(natural);
                let mut segments = Vec::new();
                if !bytes.is_empty() {
                    segments.push(Segment::R(bytes));
                }
                if w > 0 || segments.is_empty() {
                    segments.push(Segment::W(w));
                }
                Op::Chain {
                    segments,
                    indirect: false,
                }
            }
            Shape::Split {
                readable,
                writable,
                wlen,
                indirect,
            } => {
                let w = wlen.resolve(natural);
                let mut segments = split(&bytes, *readable)
                    .into_iter()
                    .map(Segment::R)
                    .collect::<Vec<_>>();
                let (base, extra) = (w / writable, w % writable);
                segments.extend((0..*writable).map(|i| Segment::W(base + usize::from(i < extra))));
                Op::Chain {
                    segments,
                    indirect: *indirect,
                }
            }
            Shape::ZeroLength { at, writable, wlen } => {
                let w = wlen.resolve(natural).max(1);
                let mut segments = vec![Segment::R(bytes), Segment::W(w)];
                let zero = if *writable {
                    Segment::W(0)
                } else {
                    Segment::R(Vec::new())
                };
                segments.insert((*at).min(segments.len()), zero);
                Op::Chain {
                    segments,
                    indirect: false,
                }
            }
            Shape::Raw {
                readable,
                writable,
                disorder,
                tail,
            } => {
                let mut leaves: Vec<(Leaf, bool)> = readable
                    .iter()
                    .map(|&l| (l, false))
                    .chain(writable.iter().map(|&l| (l, true)))
                    .collect();
                if leaves.is_empty() {
                    leaves.push((
                        Leaf {
                            place: Place::Region0,
                            len: Len::Natural,
                        },
                        true,
                    ));
                }
                if let Some(i) = disorder {
                    if !readable.is_empty() && !writable.is_empty() {
                        let moved = leaves.remove(i % readable.len());
                        leaves.push(moved);
                    }
                }
                let mut descs = self.leaves(&leaves, &bytes, natural);
                link(&mut descs, *tail);
                Op::Raw(descs)
            }
            Shape::Indirect {
                readable,
                writable,
                table_len,
                outer_flags,
                nested,
                table_outside,
            } => {
                let leaves: Vec<(Leaf, bool)> = readable
                    .iter()
                    .map(|&l| (l, false))
                    .chain(writable.iter().map(|&l| (l, true)))
                    .collect();
                let mut inner = self.leaves(&leaves, &bytes, natural);
                if *nested {
                    let at = self.addr(Place::Region0, 32);
                    inner.insert(0, RawDesc::indirect(at, 32));
                }
                link(&mut inner, Tail::End);
                let table = RawDesc::encode_table(&inner);
                let exact = table.len() as u32;
                let len = match table_len {
                    TableLen::Exact => exact,
                    TableLen::Zero => 0,
                    TableLen::Short => exact.saturating_sub(1).max(1),
                    TableLen::Longer => exact + 16,
                };
                let at = if *table_outside {
                    HOLE_START + 0x2000
                } else {
                    self.addr(Place::Region0, len.max(exact).max(1))
                };
                self.writes.push((at, table));
                let outer =
                    RawDesc::indirect(at, len).with_flags(VRING_DESC_F_INDIRECT | outer_flags);
                if outer_flags & VRING_DESC_F_NEXT != 0 {
                    // Followed by a writable tail.
                    let w = self.addr(Place::Region0, 4);
                    Op::Raw(vec![outer.then(1), RawDesc::writable(w, 4)])
                } else {
                    Op::Raw(vec![outer])
                }
            }
            Shape::BadHead(h) => Op::BadHead(*h),
            Shape::Mutant { region2, mutation } => {
                Op::Raw(self.mutant(*region2, *mutation, &bytes, natural))
            }
        };
        self.ops.push(op);
    }
}

/// `bytes` over `parts` pieces (at least one, possibly empty).
fn split(bytes: &[u8], parts: usize) -> Vec<Vec<u8>> {
    let parts = parts.clamp(1, bytes.len().max(1));
    let (base, extra) = (bytes.len() / parts, bytes.len() % parts);
    let mut rest = bytes;
    (0..parts)
        .map(|i| {
            let (head, tail) = rest.split_at(base + usize::from(i < extra));
            rest = tail;
            head.to_vec()
        })
        .collect()
}

/// Chains raw descriptors in order; the last one's `next` as `tail` says.
fn link(descs: &mut [RawDesc], tail: Tail) {
    let n = descs.len();
    for (i, d) in descs.iter_mut().enumerate() {
        *d = if i + 1 < n {
            d.then(i + 1)
        } else {
            match tail {
                Tail::End => *d,
                Tail::OutOfRange(index) => d.then_index(index),
                Tail::Loop(j) => d.then(j % n),
            }
        };
    }
}

fn plan(step: &Step) -> Plan {
    let mut plan = Plan::default();
    for spec in step {
        plan.add(spec);
    }
    plan
}

// ---- run on one daemon, observe ---------------------------------------------------------

/// A used element: id, length, and the bytes of the chain's writable area.
type Used = (u16, u32, Vec<u8>);

/// What the guest sees of one step.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// Used elements in used-ring order: `(id, len, bytes of the chain's writable area)` (no
    /// bytes for raw chains: their buffers are in the windows), or the testkit's complaint.
    used: Vec<Result<Used, String>>,
    /// Whether the sentinel completed (everything before it was handled).
    finished: bool,
    windows: Vec<Vec<u8>>,
}

/// Writes `bytes` at `addr` where guest memory has them (a buffer may run out of memory).
fn write_lenient(mem: &GuestRam, addr: u64, bytes: &[u8]) {
    if mem.contains(addr, bytes.len() as u64) {
        mem.write(addr, bytes).unwrap();
        return;
    }
    for (i, b) in bytes.iter().enumerate() {
        let at = addr + i as u64;
        if mem.contains(at, 1) {
            mem.write(at, &[*b]).unwrap();
        }
    }
}

fn fill_windows(mem: &GuestRam) {
    for (_, addr, len) in WINDOWS {
        // The window across regions 0/1 is written region by region.
        write_lenient(mem, addr, &vec![POISON; len as usize]);
    }
}

/// The sentinel: ATTACH of an endpoint that does not exist (NOENT, no state change).
fn sentinel() -> Vec<u8> {
    attach(1, 0xffff).encode()
}

fn run_step(dev: &mut Driver, plan: &Plan) -> Result<Observed, String> {
    let mem = dev.memory().clone();
    fill_windows(&mem);
    for (addr, bytes) in &plan.writes {
        write_lenient(&mem, *addr, bytes);
    }
    let sentinel_bytes = sentinel();
    let q = dev.requestq();
    // Every chain of the step becomes available at once, when notify publishes the index.
    q.hold_avail(true);
    for op in &plan.ops {
        match op {
            Op::Chain { segments, indirect } => {
                let mut chain = Chain::new();
                for s in segments {
                    chain = match s {
                        Segment::R(b) => chain.readable(b),
                        Segment::W(n) => chain.writable(*n),
                    };
                }
                if *indirect {
                    chain = chain.indirect();
                }
                q.post_chain(&chain)
                    .map_err(|e| format!("post_chain: {e}"))?;
            }
            Op::Raw(descs) => {
                q.post_raw(descs).map_err(|e| format!("post_raw: {e}"))?;
            }
            Op::BadHead(h) => q.publish_raw_head(*h).map_err(|e| e.to_string())?,
        }
    }
    let token = q
        .post_chain(&Chain::request(&sentinel_bytes, 4))
        .map_err(|e| e.to_string())?;
    q.notify().map_err(|e| e.to_string())?;
    let mut used = Vec::new();
    let mut finished = false;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match q.poll_used() {
            Ok(Some(c)) if c.token == token => {
                finished = true;
                break;
            }
            Ok(Some(c)) => used.push(Ok((c.head, c.used_len, c.data))),
            Ok(None) => std::thread::yield_now(),
            Err(e) => used.push(Err(e.to_string())),
        }
    }
    let windows = WINDOWS
        .iter()
        .map(|&(_, addr, len)| {
            (0..len)
                .step_by(4096)
                .flat_map(|off| {
                    let n = (len - off).min(4096) as usize;
                    mem.read(addr + off, n).unwrap_or_else(|_| vec![0xee; n])
                })
                .collect()
        })
        .collect();
    Ok(Observed {
        used,
        finished,
        windows,
    })
}

/// The request counters and the model, as the control socket shows them.
fn model_state(d: &Daemon) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    let stats = d.stats();
    for key in [
        "requests",
        "unknown_type",
        "malformed_chains",
        "broken_rings",
        "domains",
        "mappings",
        "table_bytes",
    ] {
        out.insert(format!("stats.{key}"), stats[key].clone());
    }
    let domains = d.control(json!({"cmd": "domains"}));
    for dom in domains["domains"].as_array().cloned().unwrap_or_default() {
        let id = dom["id"].clone();
        out.insert(
            format!("mappings of {id}"),
            d.control(json!({"cmd": "mappings", "domain": id})),
        );
    }
    out.insert("domains".into(), domains);
    out.insert("groups".into(), d.control(json!({"cmd": "groups"})));
    out
}

/// Cumulative counters as a difference from `before` (the daemons live across cases), zero
/// differences left out (`stats` lists only counters that are not zero).
fn delta(before: &Value, after: &Value) -> Value {
    match (before, after) {
        (Value::Object(b), Value::Object(a)) => {
            let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
            Value::Object(
                keys.into_iter()
                    .map(|k| {
                        let d = delta(
                            b.get(k).unwrap_or(&Value::Null),
                            a.get(k).unwrap_or(&Value::Null),
                        );
                        (k.clone(), d)
                    })
                    .filter(|(_, d)| *d != json!(0) && *d != json!({}))
                    .collect(),
            )
        }
        (Value::Object(b), Value::Null) => delta(&Value::Object(b.clone()), &json!({})),
        (b, a) if a.is_number() || b.is_number() => {
            json!(a.as_u64().unwrap_or(0) as i64 - b.as_u64().unwrap_or(0) as i64)
        }
        (_, a) => a.clone(),
    }
}

fn describe_window_difference(name: &str, addr: u64, a: &[u8], b: &[u8]) -> String {
    let first = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
    let end = (first + 16).min(a.len());
    format!(
        "window {name}: first difference at {:#x}: fast {:02x?}, slow {:02x?}",
        addr + first as u64,
        &a[first..end],
        &b[first..end]
    )
}

fn compare(step: usize, spec: &Step, fast: &Observed, slow: &Observed) -> Result<(), String> {
    let mut why = String::new();
    if fast.finished != slow.finished {
        let _ = writeln!(
            why,
            "sentinel finished: fast {}, slow {}",
            fast.finished, slow.finished
        );
    }
    if fast.used != slow.used {
        let show = |o: &Observed| {
            o.used
                .iter()
                .map(|u| match u {
                    Ok((id, len, data)) => format!(
                        "{{id {id}, len {len}, data {:02x?}}}",
                        &data[data.len().saturating_sub(8)..]
                    ),
                    Err(e) => format!("error {e}"),
                })
                .collect::<Vec<_>>()
        };
        let _ = writeln!(
            why,
            "used elements differ:\n  fast {:?}\n  slow {:?}",
            show(fast),
            show(slow)
        );
    }
    for (i, (a, b)) in fast.windows.iter().zip(&slow.windows).enumerate() {
        if a != b {
            let _ = writeln!(
                why,
                "{}",
                describe_window_difference(WINDOWS[i].0, WINDOWS[i].1, a, b)
            );
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!("step {step} {spec:#?}\n{why}"))
    }
}

struct Pair {
    fast: Daemon,
    slow: Daemon,
}

fn options() -> Options {
    Options {
        memory: vec![
            MemoryRegion::new(0, R1_START),
            MemoryRegion::new(R1_START, HOLE_START - R1_START),
            MemoryRegion::new(R2_START, 8 * MIB),
        ],
        queue_size: QUEUE_SIZE,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        ..Options::default()
    }
}

fn run_case(pair: &mut Pair, steps: &[Step]) -> Result<(), String> {
    let mut fast = pair.fast.connect_with(options());
    let mut slow = pair.slow.connect_with(options());
    // After the handshake: the daemon accepted this frontend only once it had reset the
    // device the last one left.
    let before = [model_state(&pair.fast), model_state(&pair.slow)];
    for (i, step) in steps.iter().enumerate() {
        let plan = plan(step);
        let a = run_step(&mut fast, &plan)?;
        let b = run_step(&mut slow, &plan)?;
        compare(i, step, &a, &b)?;
        if !a.finished {
            // Both stalled the same way: later steps would only repeat it.
            break;
        }
    }
    for (name, d) in [("fast", &mut pair.fast), ("slow", &mut pair.slow)] {
        if !d.alive() {
            return Err(format!("the {name} daemon died: {:?}", d.exit_status()));
        }
    }
    let after = [model_state(&pair.fast), model_state(&pair.slow)];
    drop((fast, slow));
    let mut why = String::new();
    let keys: std::collections::BTreeSet<&String> =
        after[0].keys().chain(after[1].keys()).collect();
    for key in keys {
        let fast_after = after[0].get(key).unwrap_or(&Value::Null);
        let slow_after = after[1].get(key).unwrap_or(&Value::Null);
        // Request counters as differences; the model's sizes as they are.
        let counter = key.starts_with("stats.")
            && !matches!(
                key.as_str(),
                "stats.domains" | "stats.mappings" | "stats.table_bytes"
            );
        let (fast_v, slow_v) = if counter {
            (
                delta(before[0].get(key).unwrap_or(&Value::Null), fast_after),
                delta(before[1].get(key).unwrap_or(&Value::Null), slow_after),
            )
        } else {
            (fast_after.clone(), slow_after.clone())
        };
        if fast_v != slow_v {
            let _ = writeln!(why, "{key}: fast {fast_v}, slow {slow_v}");
        }
    }
    if why.is_empty() {
        Ok(())
    } else {
        Err(format!("state after {steps:#?}:\n{why}"))
    }
}

#[test]
fn fast_path_and_virtio_queue_path_answer_alike() {
    let started = Instant::now();
    let pair = Pair {
        fast: Daemon::start_logged(&[TOPOLOGY, &["--ring-fast-path", "on"]].concat(), "warn"),
        slow: Daemon::start_logged(&[TOPOLOGY, &["--ring-fast-path", "off"]].concat(), "warn"),
    };
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(96);
    let defaults = Config::default();
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        // A fixed seed unless PROPTEST_RNG_SEED asks for another.
        rng_seed: match defaults.rng_seed {
            RngSeed::Random => RngSeed::Fixed(0x7269_6e67),
            seed => seed,
        },
        ..defaults
    };
    let mut runner = TestRunner::new(config);
    let pair = std::cell::RefCell::new(pair);
    let result = runner.run(&steps(), |steps| {
        run_case(&mut pair.borrow_mut(), &steps).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("the fast path and the virtio-queue path disagree: {e}");
    }
    eprintln!("{cases} cases in {:.1} s", started.elapsed().as_secs_f64());
}
