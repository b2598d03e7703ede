// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The seed corpus (`fuzz/corpus/<target>/seed-*`), its generator and its replay.
//!
//! - `seeds_decode_to_themselves`: every seed decodes back to the value it was encoded from
//!   (so the seeds stay meaningful if `arbitrary` changes its format);
//! - `corpus_replays`: every file under `fuzz/corpus/` (seeds, reproducers, anything a fuzzing
//!   run added) runs through its harness without a failure: the fuzzers' findings as
//!   ordinary regression tests, on stable, without libFuzzer;
//! - `seed_files_are_current`: the committed seed files match this file;
//! - `write_corpus` (ignored): rewrites the seed files:
//!   `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_corpus`;
//! - `livelock_*`: the reproducers of a livelock of the request-queue loop (fixed in
//!   98ec19c), run with a time limit so that a regression fails instead of hanging.

use std::{path::PathBuf, sync::mpsc, time::Duration};

use virtio::{ATTACH_F_BYPASS, MAP_F_MMIO, MAP_F_READ, MAP_F_WRITE};

use crate::chain::{self, Cmd, DLen, GAddr, Input, Layout, Part, Parts, Rings, Setup, WLen};
use crate::enc::{enc_all, Blob, Enc};
use crate::model::{self, Cookie, Dom, Ep, Op, Who};
use crate::parse::{self, Case, ConfigFields, Readable, Region, Writable};
use crate::state;
use crate::types::{Addr, Id, Len, ReqBytes, ReqSpec};

const RW: u32 = MAP_F_READ | MAP_F_WRITE;

fn req(spec: ReqSpec) -> ReqBytes {
    ReqBytes::new(spec)
}

fn attach(domain: u8, endpoint: u8, bypass: bool) -> ReqSpec {
    ReqSpec::Attach {
        domain: Id::Small(domain),
        endpoint: Id::Small(endpoint),
        flags: if bypass { ATTACH_F_BYPASS } else { 0 },
        reserved: 0,
    }
}

fn detach(domain: u8, endpoint: u8) -> ReqSpec {
    ReqSpec::Detach {
        domain: Id::Small(domain),
        endpoint: Id::Small(endpoint),
        reserved: 0,
    }
}

fn map(domain: u8, page: u16, pages: u8, phys: u16, flags: u32) -> ReqSpec {
    ReqSpec::Map {
        domain: Id::Small(domain),
        start: Addr::Page(page),
        len: Len::Pages(pages - 1),
        phys: Addr::Page(phys),
        flags,
    }
}

fn unmap(domain: u8, page: u16, pages: u8) -> ReqSpec {
    ReqSpec::Unmap {
        domain: Id::Small(domain),
        start: Addr::Page(page),
        len: Len::Pages(pages - 1),
        reserved: 0,
    }
}

fn probe(endpoint: u8) -> ReqSpec {
    ReqSpec::Probe {
        endpoint: Id::Small(endpoint),
        reserved: 0,
    }
}

// ---- parse ---------------------------------------------------------------------------------

const ALL_F: u8 = 0x7f;

fn parse_req(spec: ReqSpec, writable: Writable) -> Case {
    Case::Parse {
        readable: Readable::Request(req(spec)),
        writable,
        features: ALL_F,
        probe_size: 512,
    }
}

fn parse_seeds() -> Vec<(&'static str, Vec<Case>)> {
    let region = |msi, start, end| Region { msi, start, end };
    let golden_resv = {
        let mut b = vec![1, 0, 20, 0, 1, 0, 0, 0];
        b.extend(0xfee0_0000u64.to_le_bytes());
        b.extend(0xfeef_ffffu64.to_le_bytes());
        b
    };
    let cfg = ConfigFields {
        page_size_mask: 0x1000,
        input_start: 0,
        input_end: (1 << 48) - 1,
        domain_start: 0,
        domain_end: u32::MAX,
        probe_size: 512,
        bypass: 0,
    };
    vec![
        (
            "attach",
            vec![parse_req(attach(1, 8, false), Writable::Exact)],
        ),
        (
            "attach-bypass",
            vec![parse_req(attach(2, 8, true), Writable::Exact)],
        ),
        ("detach", vec![parse_req(detach(1, 8), Writable::Exact)]),
        (
            "map",
            vec![parse_req(map(1, 16, 4, 32, RW), Writable::Exact)],
        ),
        (
            "map-mmio",
            vec![parse_req(
                map(1, 16, 1, 32, MAP_F_READ | MAP_F_MMIO),
                Writable::Around(3),
            )],
        ),
        ("unmap", vec![parse_req(unmap(1, 16, 4), Writable::Exact)]),
        ("probe", vec![parse_req(probe(8), Writable::Exact)]),
        (
            "probe-short",
            vec![parse_req(probe(8), Writable::Around(-1))],
        ),
        (
            "truncated-and-unknown",
            vec![
                Case::Parse {
                    readable: Readable::Request(ReqBytes {
                        spec: map(1, 16, 4, 32, RW),
                        head_reserved: 0xff,
                        cut: Some(20),
                    }),
                    writable: Writable::Small(4),
                    features: ALL_F,
                    probe_size: 0,
                },
                Case::Parse {
                    readable: Readable::Raw(Blob(vec![9, 0, 0, 0, 1, 2, 3, 4])),
                    writable: Writable::Small(4),
                    features: 0,
                    probe_size: 0,
                },
            ],
        ),
        (
            "probe-properties",
            vec![
                Case::Decode {
                    buf: Blob(golden_resv),
                },
                Case::Encode {
                    count: 2,
                    regions: [
                        region(true, 0xfee0_0000, 0xfeef_ffff),
                        region(false, 0x1000, 0x1fff),
                        region(false, 0, 0),
                        region(false, 0, 0),
                        region(false, 0, 0),
                        region(false, 0, 0),
                        region(false, 0, 0),
                        region(false, 0, 0),
                    ],
                    size: 64,
                    fill: 0xaa,
                },
            ],
        ),
        (
            "fault",
            vec![
                Case::FaultBytes {
                    bytes: [
                        2, 0, 0, 0, 2, 1, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 0, 0,
                    ],
                },
                Case::FaultRecord {
                    reason: 1,
                    flags: 0x103,
                    endpoint: 8,
                    address: 0xdead_b000,
                },
            ],
        ),
        (
            "config",
            vec![
                Case::Config {
                    fields: cfg,
                    raw: None,
                    read_offset: 32,
                    read_len: 8,
                    write_offset: 36,
                    write: Blob(vec![1]),
                    features: 1 << 6,
                },
                Case::Config {
                    fields: cfg,
                    raw: Some([0x5a; 40]),
                    read_offset: 0,
                    read_len: 64,
                    write_offset: 0,
                    write: Blob(vec![0; 8]),
                    features: u64::MAX,
                },
            ],
        ),
    ]
}

// ---- model ---------------------------------------------------------------------------------

fn op_map(d: u8, page: u16, pages: u8, phys: u16, perms: u8) -> Op {
    Op::Map {
        d: Dom::Small(d),
        start: Addr::Page(page),
        len: Len::Pages(pages - 1),
        phys: Addr::Page(phys),
        perms,
    }
}

fn op_translate(e: u8, page: u16, write: bool, who: Who) -> Op {
    Op::Translate {
        e: Ep(e),
        iova: Addr::Page(page),
        len: Len::Pages(1),
        write,
        who,
    }
}

fn model_seeds() -> Vec<(&'static str, u8, Vec<Op>)> {
    let a = |d, e, bypass| Op::Attach {
        d: Dom::Small(d),
        e: Ep(e),
        bypass,
    };
    let det = |d, e| Op::Detach {
        d: Dom::Small(d),
        e: Ep(e),
    };
    let un = |d, page, pages: u8| Op::Unmap {
        d: Dom::Small(d),
        start: Addr::Page(page),
        len: Len::Pages(pages - 1),
    };
    // Endpoint indices: topology 0 = [1, 2, 3, 4, 0, 5, MAX], group {2, 3}.
    vec![
        (
            "attach-map-translate",
            0,
            vec![
                Op::UseDmaApi(Ep(0)),
                a(1, 0, false),
                op_map(1, 4, 2, 8, 3),
                op_translate(0, 4, false, Who::Allowed),
                op_translate(0, 5, true, Who::Allowed),
                un(1, 4, 2),
                op_translate(0, 4, false, Who::Allowed),
                det(1, 0),
            ],
        ),
        (
            "group",
            0,
            vec![
                Op::UseDmaApi(Ep(1)),
                a(1, 1, false),
                a(1, 2, false),
                op_map(1, 0, 4, 0, 3),
                a(2, 1, false),
                det(2, 1),
                det(1, 2),
                op_translate(2, 1, false, Who::Allowed),
            ],
        ),
        (
            "bypass-and-reserved",
            0,
            vec![
                Op::UseDmaApi(Ep(3)),
                Op::Bypass(true),
                op_translate(3, 16, false, Who::Allowed),
                a(3, 3, true),
                op_map(3, 0, 1, 0, 1),
                op_translate(3, 20, true, Who::Allowed),
                Op::Probe { e: Ep(3) },
                Op::Reset,
            ],
        ),
        (
            "owners",
            0,
            vec![
                Op::Claim {
                    group: 0,
                    cookie: Cookie::Seven,
                },
                Op::Claim {
                    group: 0,
                    cookie: Cookie::Nine,
                },
                Op::UseDmaApi(Ep(1)),
                a(0, 1, false),
                op_translate(1, 0, false, Who::Owner(Cookie::Seven)),
                Op::Release {
                    group: 0,
                    cookie: Cookie::Seven,
                },
                Op::UnuseDmaApi(Ep(1)),
                Op::NewTranslator,
            ],
        ),
        (
            "refusals",
            0,
            vec![
                a(1, 0, false),
                op_map(1, 0, 4, 0, 3),
                op_map(1, 2, 1, 0, 3),
                un(1, 1, 1),
                a(1, 3, true),
                a(7, 0, false),
                det(2, 0),
                Op::Probe { e: Ep(4) },
            ],
        ),
        // Topology 1: endpoints [1..6, 0, 7, MAX], groups {1,2,3} {5,6}, 64 KiB pages.
        (
            "nomem",
            1,
            vec![
                a(1, 0, false),
                op_map(1, 1, 1, 1, 3),
                op_map(1, 2, 1, 2, 3),
                op_map(1, 0x4000, 1, 3, 3),
                op_map(1, 0x8000, 1, 4, 3),
                op_map(1, 0xc000, 1, 5, 3),
                a(2, 4, false),
                a(3, 5, false),
            ],
        ),
        (
            "sorted-endpoints",
            2,
            vec![
                Op::UseDmaApi(Ep(2)),
                a(0xff, 2, false),
                op_map(0xff, 0, 2, 4, 1),
                op_translate(0, 0, false, Who::Allowed),
                a(0xff, 0, false),
                Op::Translate {
                    e: Ep(2),
                    iova: Addr::FromTop(0),
                    len: Len::All,
                    write: false,
                    who: Who::DmaApi,
                },
            ],
        ),
    ]
}

// ---- chain ---------------------------------------------------------------------------------

fn setup(config: u8) -> Setup {
    Setup {
        config,
        refuse: 0,
        size_log2: 4,
        rings: None,
        start_index: 0,
    }
}

fn request(spec: ReqSpec, w: WLen) -> Cmd {
    Cmd::Chain {
        layout: Layout::Direct,
        parts: Parts(vec![Part::Request(req(spec)), Part::Writable(w)]),
    }
}

fn chain_seeds() -> Vec<(&'static str, Input)> {
    let t = WLen::Tail;
    vec![
        (
            "attach-map-unmap-detach",
            Input {
                setup: setup(0),
                cmds: vec![
                    request(attach(1, 8, false), t),
                    request(map(1, 16, 4, 32, RW), t),
                    Cmd::Kick,
                    request(unmap(1, 16, 4), t),
                    request(detach(1, 8), t),
                    Cmd::Kick,
                ],
            },
        ),
        (
            "probe",
            Input {
                setup: setup(0),
                cmds: vec![request(probe(0x28), WLen::Probe), Cmd::Kick],
            },
        ),
        (
            "direct-split-writable",
            Input {
                setup: setup(0),
                cmds: vec![
                    Cmd::Chain {
                        layout: Layout::Direct,
                        parts: Parts(vec![
                            Part::Bytes(Blob(vec![5, 0, 0, 0, 0x28, 0, 0, 0])),
                            Part::Bytes(Blob(vec![0; 64])),
                            Part::Writable(WLen::Small(200)),
                            Part::Writable(WLen::Small(200)),
                            Part::Writable(WLen::Big(116)),
                        ]),
                    },
                    Cmd::Direct { n: 1 },
                ],
            },
        ),
        (
            "indirect",
            Input {
                setup: setup(0),
                cmds: vec![
                    Cmd::Chain {
                        layout: Layout::Indirect,
                        parts: Parts(vec![
                            Part::Request(req(attach(3, 9, true))),
                            Part::Writable(t),
                        ]),
                    },
                    Cmd::Chain {
                        layout: Layout::Mixed,
                        parts: Parts(vec![
                            Part::Request(req(map(3, 0, 1, 0, RW))),
                            Part::Writable(t),
                        ]),
                    },
                    Cmd::Chain {
                        layout: Layout::IndirectNext,
                        parts: Parts(vec![Part::Request(req(detach(3, 9))), Part::Writable(t)]),
                    },
                    Cmd::Kick,
                ],
            },
        ),
        (
            "hostile-descriptors",
            Input {
                setup: setup(0),
                cmds: vec![
                    request(attach(1, 8, false), t),
                    // Descriptor 1 (the tail) loops onto itself, then points into the hole.
                    Cmd::Desc {
                        slot: 1,
                        addr: GAddr::R0(0x4100),
                        len: DLen::Small(4),
                        flags: 3,
                        next: 1,
                    },
                    Cmd::Direct { n: 1 },
                    request(attach(1, 8, false), t),
                    Cmd::Desc {
                        slot: 3,
                        addr: GAddr::Hole(0),
                        len: DLen::Small(4),
                        flags: 2,
                        next: 0,
                    },
                    Cmd::Direct { n: 1 },
                    Cmd::Chain {
                        layout: Layout::Direct,
                        parts: Parts(vec![
                            Part::Writable(t),
                            Part::Request(req(attach(1, 8, false))),
                        ]),
                    },
                    Cmd::Chain {
                        layout: Layout::Direct,
                        parts: Parts(vec![
                            Part::Request(req(attach(1, 8, false))),
                            Part::Raw {
                                addr: GAddr::EndR0(2),
                                len: DLen::Small(4),
                                write: true,
                            },
                        ]),
                    },
                    Cmd::Chain {
                        layout: Layout::Direct,
                        parts: Parts(vec![
                            Part::Request(req(attach(1, 8, false))),
                            Part::Raw {
                                addr: GAddr::R1(0x100),
                                len: DLen::Raw(0x1_0000),
                                write: true,
                            },
                        ]),
                    },
                    Cmd::Kick,
                ],
            },
        ),
        (
            "faults-to-eventq",
            Input {
                setup: setup(0),
                cmds: vec![
                    // Records are kept only once a driver listens (posted event buffers).
                    Cmd::Event {
                        lens: [24, 0, 0],
                        readable_first: false,
                    },
                    Cmd::Translate {
                        endpoint: Id::Small(8),
                        iova: Addr::Page(3),
                        write: true,
                    },
                    Cmd::Translate {
                        endpoint: Id::Small(8),
                        iova: Addr::Page(4),
                        write: false,
                    },
                    Cmd::Event {
                        lens: [10, 14, 0],
                        readable_first: false,
                    },
                    Cmd::Event {
                        lens: [8, 0, 0],
                        readable_first: true,
                    },
                ],
            },
        ),
        (
            "config-reset-disconnect",
            Input {
                setup: setup(0),
                cmds: vec![
                    Cmd::GetConfig {
                        offset: 0,
                        size: 40,
                    },
                    Cmd::SetConfig {
                        offset: 36,
                        data: Blob(vec![1]),
                    },
                    request(attach(1, 8, false), t),
                    Cmd::Kick,
                    Cmd::Reset { stop_vring: false },
                    request(map(1, 0, 1, 0, RW), t),
                    Cmd::Reset { stop_vring: true },
                    Cmd::Disconnect,
                    request(detach(1, 8), t),
                ],
            },
        ),
        (
            "tight-config",
            Input {
                setup: Setup {
                    config: 1,
                    refuse: 1 << 5,
                    size_log2: 3,
                    rings: Some(Rings {
                        desc: GAddr::R1(0),
                        avail: GAddr::R1(0x800),
                        used: GAddr::R1(0x1000),
                    }),
                    start_index: 0xfffe,
                },
                cmds: vec![
                    request(attach(1, 2, false), t),
                    request(
                        ReqSpec::Map {
                            domain: Id::Small(1),
                            start: Addr::Page(16),
                            len: Len::Pages(15),
                            phys: Addr::Page(0),
                            flags: RW,
                        },
                        t,
                    ),
                    request(probe(5), WLen::Probe),
                    request(attach(2, 5, true), t),
                    Cmd::Kick,
                ],
            },
        ),
        (
            "no-probe-area",
            Input {
                setup: Setup {
                    refuse: 1 << 1,
                    ..setup(2)
                },
                cmds: vec![request(probe(1), t), request(unmap(0, 0, 1), t), Cmd::Kick],
            },
        ),
        // Reproducers of a livelock of the request-queue loop (fixed in 98ec19c): each one
        // hung the daemon's queue processing (`livelock_*` tests).
        ("hang-avail-idx-ahead", hang_avail_idx_ahead()),
        ("hang-avail-entry-unreadable", hang_avail_entry_unreadable()),
        (
            "hang-used-ring-moves-avail-idx",
            hang_used_ring_moves_avail_idx(),
        ),
    ]
}

/// The driver publishes an avail index more than the queue size ahead.
fn hang_avail_idx_ahead() -> Input {
    Input {
        setup: setup(0),
        cmds: vec![
            request(attach(1, 8, false), WLen::Tail),
            Cmd::AvailIdx { delta: 100 },
            Cmd::Kick,
        ],
    }
}

/// The avail ring ends at the end of a memory region: its index is readable, its entries
/// are not.
fn hang_avail_entry_unreadable() -> Input {
    Input {
        setup: Setup {
            rings: Some(Rings {
                desc: GAddr::R0(0),
                avail: GAddr::EndR0(4),
                used: GAddr::R0(0x2000),
            }),
            ..setup(0)
        },
        cmds: vec![request(attach(1, 8, false), WLen::Tail), Cmd::Kick],
    }
}

/// The used ring overlaps the avail index: the device's own used-ring write moves it.
fn hang_used_ring_moves_avail_idx() -> Input {
    Input {
        setup: Setup {
            rings: Some(Rings {
                desc: GAddr::R0(0),
                avail: GAddr::R0(0x2000),
                used: GAddr::R0(0x1ffc),
            }),
            ..setup(0)
        },
        cmds: vec![request(attach(1, 8, false), WLen::Tail), Cmd::Kick],
    }
}

/// Every seed: (target, file name, bytes).
fn seeds() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, cases) in parse_seeds() {
        out.push(("parse", format!("seed-{name}"), enc_all(&cases)));
    }
    for (name, topology, ops) in model_seeds() {
        let mut bytes = vec![topology];
        for op in &ops {
            op.enc(&mut bytes);
        }
        out.push(("model", format!("seed-{name}"), bytes));
    }
    for (name, input) in chain_seeds() {
        out.push(("chain", format!("seed-{name}"), input.encode()));
    }
    for (name, bytes) in state_seeds() {
        out.push(("state", format!("seed-{name}"), bytes));
    }
    for (name, bytes) in masters_seeds() {
        out.push(("masters", format!("seed-{name}"), bytes));
    }
    out
}

/// DMA masters: records `[selector][frame]` (see `masters::run`).
fn masters_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use vhost_iommu_client::wire::{FaultAccess, FaultReason, FaultReport, Request};
    let r = crate::masters::record;
    let claim = |endpoint, cookie| Request::Claim { endpoint, cookie };
    let fault = |endpoint, reason| {
        Request::Fault(FaultReport {
            endpoint,
            reason,
            access: FaultAccess::Write,
            iova: 0x1000,
        })
    };
    vec![
        (
            "claim-release",
            [
                r(0, &claim(0x10, 7)),
                r(0, &Request::Release { endpoint: 0x10 }),
                r(0, &claim(0x12, 7)),
                r(0, &claim(0x13, 7)),
            ]
            .concat(),
        ),
        (
            "two-masters",
            [
                r(0, &claim(0x12, 7)),
                r(1, &claim(0x13, 8)),
                r(1, &Request::UseDmaApi { endpoint: 0x14 }),
                r(0, &Request::UseDmaApi { endpoint: 0x14 }),
                r(1, &claim(0x14, 9)),
                r(0, &Request::Release { endpoint: 0x14 }),
            ]
            .concat(),
        ),
        (
            "faults",
            [
                r(0, &claim(0x11, 3)),
                r(0, &fault(0x11, FaultReason::Unmapped)),
                r(0, &fault(0x11, FaultReason::NoDomain)),
                r(1, &fault(0x11, FaultReason::Permission)),
                r(0, &fault(0x15, FaultReason::Reserved)),
            ]
            .concat(),
        ),
        (
            "hostile",
            [
                r(0, &claim(0x10, 1)),
                vec![0, 1, 0, 0, 0, 4, 0, 0, 0],
                r(
                    1,
                    &Request::Hello {
                        version: 1,
                        slots: 4,
                    },
                ),
                r(0, &claim(0x10, 0)),
                vec![1, 0x55, 0, 0, 0, 2, 0, 0, 0, 1, 2],
            ]
            .concat(),
        ),
    ]
}

/// Device states: `[mode]` then a state the daemon wrote (see `state::run` for the mode).
fn state_seeds() -> Vec<(&'static str, Vec<u8>)> {
    use ownership::{DomainKind, Iommu, Perms};
    use vhost_device_iommu::state::{encode, fingerprint, DeviceState};
    use virtio::{FaultReason, FaultRecord};
    let fp = fingerprint(&state::topology(), state::FEATURES);
    let mut m = Iommu::new(state::topology());
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(1, 2, DomainKind::Paging).unwrap();
    m.attach(3, 4, DomainKind::Identity).unwrap();
    for i in 0..20u64 {
        let perms = [Perms::READ, Perms::WRITE, Perms::all()][i as usize % 3];
        m.map(
            1,
            i * 0x2000,
            i * 0x2000 + 0xfff,
            0x10_0000 + i * 0x3000,
            perms,
        )
        .unwrap();
    }
    m.map(1, 1 << 40, (1 << 40) + 0x1f_ffff, 0x20_0000, Perms::READ)
        .unwrap();
    let full = DeviceState {
        features: 0x1_0000_0017,
        bypass: true,
        guest: m.guest_state(),
        faults: vec![FaultRecord {
            reason: FaultReason::Mapping,
            flags: 0x101,
            endpoint: 1,
            address: 0x5000,
        }],
    };
    let full = encode(&full, fp);
    let empty = encode(&DeviceState::default(), fp);
    vec![
        ("full", [&[0u8][..], &full].concat()),
        ("full-fixed-up", [&[1u8][..], &full].concat()),
        ("full-into-programmed", [&[3u8][..], &full].concat()),
        ("empty", [&[0u8][..], &empty].concat()),
    ]
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

fn harness(target: &str) -> fn(&[u8]) {
    match target {
        "parse" => parse::run,
        "model" => model::run,
        "chain" => chain::run,
        "state" => state::run,
        "masters" => crate::masters::run,
        other => panic!("unknown target {other}"),
    }
}

#[test]
fn seeds_decode_to_themselves() {
    use crate::enc::decode_all;
    for (name, cases) in parse_seeds() {
        assert_eq!(
            decode_all::<Case>(&enc_all(&cases), 64),
            cases,
            "parse {name}"
        );
    }
    for (name, topology, ops) in model_seeds() {
        let mut bytes = vec![topology];
        bytes.extend(enc_all(&ops));
        assert_eq!(decode_all::<Op>(&bytes[1..], 256), ops, "model {name}");
    }
    for (name, input) in chain_seeds() {
        assert_eq!(Input::decode(&input.encode()), Some(input), "chain {name}");
    }
}

#[test]
fn seeds_run() {
    for (target, name, bytes) in seeds() {
        eprintln!("{target}/{name}");
        harness(target)(&bytes);
    }
}

/// The chain seeds do what they are named for.
#[test]
fn chain_seeds_reach_the_model() {
    use virtio::{RequestType as T, Status as S};
    let seeds: std::collections::BTreeMap<_, _> = chain_seeds().into_iter().collect();
    let stats = |name: &str| {
        let device = chain::run_input(&seeds[name]);
        eprintln!("{name}: {}", device.stats().to_json());
        device
    };
    let d = stats("attach-map-unmap-detach");
    for t in [T::Attach, T::Map, T::Unmap, T::Detach] {
        assert_eq!(d.stats().replies(t, S::Ok), 1, "{t:?}");
    }
    assert_eq!(stats("probe").stats().replies(T::Probe, S::Ok), 1);
    assert_eq!(
        stats("direct-split-writable")
            .stats()
            .replies(T::Probe, S::Ok),
        1
    );
    let d = stats("indirect");
    assert_eq!(d.stats().replies(T::Attach, S::Ok), 1);
    assert_eq!(
        d.stats().replies(T::Map, S::Inval),
        1,
        "MAP on a bypass domain"
    );
    let d = stats("faults-to-eventq");
    assert!(
        d.stats()
            .faults_delivered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    let d = stats("tight-config");
    assert_eq!(d.stats().replies(T::Attach, S::Ok), 2);
    assert_eq!(d.stats().replies(T::Probe, S::Ok), 1);
    assert_eq!(d.stats().replies(T::Map, S::Ok), 1);
    let d = stats("no-probe-area");
    assert_eq!(d.stats().replies(T::Unmap, S::NoEnt), 1);
    for name in seeds.keys() {
        stats(name);
    }
}

/// The state seeds load, into an empty model and into a programmed one.
#[test]
fn state_seeds_load() {
    for (name, bytes) in state_seeds() {
        assert_eq!(state::outcome(&bytes), state::Outcome::Loaded, "{name}");
    }
}

#[test]
fn corpus_replays() {
    let mut n = 0;
    for target in ["parse", "model", "chain", "state", "masters"] {
        let Ok(dir) = std::fs::read_dir(corpus_dir(target)) else {
            continue;
        };
        for entry in dir {
            let path = entry.expect("corpus entry").path();
            if path.is_file() {
                let data = std::fs::read(&path).expect("corpus file");
                eprintln!("{}", path.display());
                harness(target)(&data);
                n += 1;
            }
        }
    }
    eprintln!("{n} corpus files replayed");
}

/// The committed seed files are what `write_corpus` would write.
#[test]
fn seed_files_are_current() {
    for (target, name, bytes) in seeds() {
        let path = corpus_dir(target).join(&name);
        let on_disk = std::fs::read(&path).unwrap_or_default();
        assert!(
            on_disk == bytes,
            "{} is stale: run cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_corpus",
            path.display()
        );
    }
}

#[test]
#[ignore = "rewrites fuzz/corpus/*/seed-*"]
fn write_corpus() {
    for (target, name, bytes) in seeds() {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        std::fs::write(dir.join(name), bytes).expect("seed file");
    }
}

/// Runs a chain input on another thread; fails if it does not finish in 10 s (the stuck
/// thread is left spinning).
fn finishes(input: Input) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        chain::run(&input.encode());
        let _ = tx.send(());
    });
    let done = rx.recv_timeout(Duration::from_secs(10));
    assert!(
        done.is_ok(),
        "the daemon's queue processing did not return (livelock)"
    );
}

#[test]
fn livelock_avail_idx_ahead() {
    finishes(hang_avail_idx_ahead());
}

#[test]
fn livelock_avail_entry_unreadable() {
    finishes(hang_avail_entry_unreadable());
}

#[test]
fn livelock_used_ring_moves_avail_idx() {
    finishes(hang_used_ring_moves_avail_idx());
}
