// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `model`: sequences of guest requests and host ownership calls on
//! `ownership::Iommu`, checked against [`Reference`] after every step.
//!
//! The input is a topology choice then a sequence of [`Op`]s. After each op: the model's
//! answer equals the reference's; a refused op changed nothing (snapshot before and after);
//! the states agree (domains, their groups and endpoints, mappings, attachments, owners); no
//! domain lives without an attached group; mappings never overlap; every endpoint of a group
//! translates through the same domain; translate agrees with the reference. Out of page-table
//! memory (which the reference does not model) is accepted anywhere, provided it changed
//! nothing.

use arbitrary::Arbitrary;
use ownership::{
    Access, DomainId, DomainKind, EndpointId, Error, GroupId, Iommu, Limits, Perms, Requester,
    ResvKind, ResvRegion, Topology, Translator, X86_MSI_REGION,
};

use crate::enc::decode_all;
use crate::enc_enum;
use crate::types::{Addr, Len};
use ownership::reference::{check_group_translations, check_translation, snapshot, Reference};

/// A topology to run ops against.
pub struct Setup {
    pub topology: Topology,
    /// Endpoints ops pick from: the topology's, then unknown ones.
    pub endpoints: Vec<EndpointId>,
}

/// The topologies: `input[0] % TOPOLOGIES` picks one.
pub const TOPOLOGIES: u8 = 3;

pub fn setup(which: u8) -> Setup {
    match which % TOPOLOGIES {
        // The property test's: 4 KiB pages, a 2-endpoint group, an MSI region everywhere, a
        // reserved region on endpoint 4, tight limits. (Page-table memory is allocated up
        // front: 2 MiB keeps AddressSanitizer's cost per run low.)
        0 => Setup {
            topology: Topology::builder()
                .endpoints([1, 2, 3, 4])
                .group([2, 3])
                .domain_range(0, 5)
                .region_all(X86_MSI_REGION)
                .region(
                    4,
                    ResvRegion {
                        kind: ResvKind::Reserved,
                        start: 16 * 4096,
                        end: 18 * 4096 - 1,
                    },
                )
                .limits(Limits {
                    max_domains: 3,
                    max_mappings_per_domain: 6,
                    max_mappings: 10,
                    max_table_bytes: 2 << 20,
                })
                .build()
                .expect("topology 0"),
            endpoints: vec![1, 2, 3, 4, 0, 5, u32::MAX],
        },
        // 64 KiB granule, an input range that starts above 0 and ends at 2^39, a 3-endpoint
        // group and a 2-endpoint group, an MSI region on one group only, and page-table
        // memory for a handful of nodes (out-of-memory paths).
        1 => Setup {
            topology: Topology::builder()
                .page_size_mask(0x1_0000 | 0x20_0000)
                .input_range(0x1_0000, (1 << 39) - 1)
                .endpoints([1, 2, 3, 4, 5, 6])
                .group([1, 2, 3])
                .group([5, 6])
                .domain_range(1, 4)
                .region(
                    5,
                    ResvRegion {
                        kind: ResvKind::Msi,
                        start: 0x4_0000,
                        end: 0x5_ffff,
                    },
                )
                .region(
                    6,
                    ResvRegion {
                        kind: ResvKind::Reserved,
                        start: 0x8_0000,
                        end: 0x8_ffff,
                    },
                )
                .limits(Limits {
                    max_domains: 2,
                    max_mappings_per_domain: 4,
                    max_mappings: 5,
                    max_table_bytes: 8 * 4096,
                })
                .build()
                .expect("topology 1"),
            endpoints: vec![1, 2, 3, 4, 5, 6, 0, 7, u32::MAX],
        },
        // Endpoint IDs above the dense index (sorted lookup), the full 64-bit input range,
        // the full domain range, one group over them all but one.
        _ => Setup {
            topology: Topology::builder()
                .input_range(0, u64::MAX)
                .domain_range(0, u32::MAX)
                .endpoints([0x1_0000, 0x1_0001, 0xffff_fff0, 7])
                .group([0x1_0000, 0xffff_fff0, 7])
                .region_all(X86_MSI_REGION)
                .limits(Limits {
                    max_domains: 4,
                    max_mappings_per_domain: 8,
                    max_mappings: 12,
                    max_table_bytes: 2 << 20,
                })
                .build()
                .expect("topology 2"),
            endpoints: vec![0x1_0000, 0x1_0001, 0xffff_fff0, 7, 0, 0xffff, u32::MAX],
        },
    }
}

/// An endpoint: an index into [`Setup::endpoints`].
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ep(pub u8);
impl crate::enc::Enc for Ep {
    fn enc(&self, out: &mut Vec<u8>) {
        crate::enc::Enc::enc(&self.0, out);
    }
}

/// A domain ID: mostly 0..8 (live, in and out of range), sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dom {
    Small(u8),
    Raw(u32),
}
enc_enum!(Dom, 2; Dom::Small(v) => 0 [v], Dom::Raw(v) => 1 [v]);

impl Dom {
    fn get(self) -> DomainId {
        match self {
            Dom::Small(v) => u32::from(v % 8),
            Dom::Raw(v) => v,
        }
    }
}

/// An owner cookie: two valid ones, the two invalid ones, or anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cookie {
    Seven,
    Nine,
    Zero,
    Max,
    Raw(u64),
}
enc_enum!(Cookie, 5;
    Cookie::Seven => 0 [], Cookie::Nine => 1 [], Cookie::Zero => 2 [], Cookie::Max => 3 [],
    Cookie::Raw(v) => 4 [v],
);

impl Cookie {
    fn get(self) -> u64 {
        match self {
            Cookie::Seven => 7,
            Cookie::Nine => 9,
            Cookie::Zero => 0,
            Cookie::Max => u64::MAX,
            Cookie::Raw(v) => v,
        }
    }
}

/// Who translates.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Who {
    /// Whoever the reference says may (the group's owner, else the DMA API).
    Allowed,
    DmaApi,
    Owner(Cookie),
}
enc_enum!(Who, 3; Who::Allowed => 0 [], Who::DmaApi => 1 [], Who::Owner(c) => 2 [c]);

#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Attach {
        d: Dom,
        e: Ep,
        bypass: bool,
    },
    Detach {
        d: Dom,
        e: Ep,
    },
    Map {
        d: Dom,
        start: Addr,
        len: Len,
        phys: Addr,
        perms: u8,
    },
    Unmap {
        d: Dom,
        start: Addr,
        len: Len,
    },
    Probe {
        e: Ep,
    },
    Translate {
        e: Ep,
        iova: Addr,
        len: Len,
        write: bool,
        who: Who,
    },
    Reset,
    Bypass(bool),
    UseDmaApi(Ep),
    UnuseDmaApi(Ep),
    Claim {
        group: u8,
        cookie: Cookie,
    },
    Release {
        group: u8,
        cookie: Cookie,
    },
    /// A second translator, registered and dropped (reader slots come and go).
    NewTranslator,
}
enc_enum!(Op, 13;
    Op::Attach { d, e, bypass } => 0 [d, e, bypass],
    Op::Detach { d, e } => 1 [d, e],
    Op::Map { d, start, len, phys, perms } => 2 [d, start, len, phys, perms],
    Op::Unmap { d, start, len } => 3 [d, start, len],
    Op::Probe { e } => 4 [e],
    Op::Translate { e, iova, len, write, who } => 5 [e, iova, len, write, who],
    Op::Reset => 6 [],
    Op::Bypass(b) => 7 [b],
    Op::UseDmaApi(e) => 8 [e],
    Op::UnuseDmaApi(e) => 9 [e],
    Op::Claim { group, cookie } => 10 [group, cookie],
    Op::Release { group, cookie } => 11 [group, cookie],
    Op::NewTranslator => 12 [],
);

fn check_invariants(m: &Iommu, r: &Reference, t: &Translator) {
    // The states agree (domains, attachments, mappings, owners).
    let domains = m.domains();
    assert_eq!(
        domains.iter().map(|d| d.id).collect::<Vec<_>>(),
        r.domains.keys().copied().collect::<Vec<_>>(),
        "live domains"
    );
    let mut total = 0;
    for (info, (id, rd)) in domains.iter().zip(r.domains.iter()) {
        assert_eq!(info.id, *id);
        assert_eq!(info.kind, rd.kind, "domain {id} kind");
        assert_eq!(
            info.groups,
            rd.groups.iter().copied().collect::<Vec<_>>(),
            "domain {id} groups"
        );
        // No domain without an attached group.
        assert!(
            !info.groups.is_empty() && !info.endpoints.is_empty(),
            "domain {id} lives without an attached endpoint"
        );
        match rd.kind {
            DomainKind::Paging => {
                let maps = m.mappings(*id).expect("paging domain");
                assert_eq!(
                    maps,
                    rd.maps.values().copied().collect::<Vec<_>>(),
                    "domain {id} mappings"
                );
                // No overlapping mappings.
                assert!(
                    maps.windows(2).all(|w| w[0].virt_end < w[1].virt_start),
                    "overlapping mappings in domain {id}: {maps:?}"
                );
                assert_eq!(info.mappings, maps.len() as u64);
                total += maps.len() as u64;
            }
            DomainKind::Identity => {
                assert_eq!(m.mappings(*id), Err(Error::IdentityDomain(*id)));
                assert_eq!(info.mappings, 0);
            }
        }
    }
    let stats = m.stats();
    assert_eq!(stats.mappings, total, "stats.mappings");
    assert_eq!(stats.domains, domains.len() as u64, "stats.domains");
    assert_eq!(m.bypass(), r.bypass);
    for (gi, rg) in r.groups.iter().enumerate() {
        let g = GroupId(gi as u32);
        let attached: Vec<_> = rg.attached.iter().copied().collect();
        assert_eq!(
            m.group_attachment(g),
            Some((rg.domain, attached)),
            "group {gi}"
        );
        assert_eq!(m.dma_owner(g), r.owner(g), "owner of group {gi}");
        // An attached group has attached endpoints, and only its own.
        assert_eq!(rg.domain.is_some(), !rg.attached.is_empty());
        for &e in &rg.attached {
            assert_eq!(m.group(e), Ok(g));
        }
    }
    assert_eq!(m.group_attachment(GroupId(r.groups.len() as u32)), None);
    // Translate agrees with the reference, and the endpoints of a group agree with each other.
    let (first, last) = r.topo.input_range();
    let page = r.topo.granule();
    let probes = [
        0,
        first,
        first + page,
        5 * page + 8,
        16 * 4096,
        0x4_0000,
        0x8_0000,
        2 << 20,
        (1 << 30) + 4096,
        0xfee0_0000,
        last - 7,
        last.wrapping_add(1),
        u64::MAX,
    ];
    check_group_translations(r, t, &probes).unwrap_or_else(|e| panic!("{e}"));
}

/// Runs one fuzz input: a topology byte, then ops.
pub fn run(data: &[u8]) {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let ops = decode_all::<Op>(rest, 256);
    run_ops(which, &ops);
}

pub fn run_ops(which: u8, ops: &[Op]) {
    let s = setup(which);
    let mut m = Iommu::new(s.topology.clone());
    let mut r = Reference::new(s.topology.clone());
    let t = m.translator();
    for op in ops {
        apply(&mut m, &mut r, &t, &s, op);
        check_invariants(&m, &r, &t);
    }
    // Tearing everything down leaves no table memory behind.
    m.reset();
    r.reset();
    check_invariants(&m, &r, &t);
    assert_eq!(m.stats().table_bytes, 0, "page-table memory leaked");
}

fn apply(m: &mut Iommu, r: &mut Reference, t: &Translator, s: &Setup, op: &Op) {
    let page = s.topology.granule();
    let ep = |e: Ep| {
        s.endpoints
            .get(usize::from(e.0) % s.endpoints.len())
            .copied()
            .unwrap_or(0)
    };
    let kind = |b: bool| {
        if b {
            DomainKind::Identity
        } else {
            DomainKind::Paging
        }
    };
    let before = snapshot(m);
    let saved = r.clone();
    let (got, want): (Result<u64, Error>, Result<u64, Error>) = match *op {
        Op::Attach { d, e, bypass } => (
            m.attach(d.get(), ep(e), kind(bypass)).map(|_| 0),
            r.attach(d.get(), ep(e), kind(bypass)).map(|_| 0),
        ),
        Op::Detach { d, e } => (
            m.detach(d.get(), ep(e)).map(|_| 0),
            r.detach(d.get(), ep(e)).map(|_| 0),
        ),
        Op::Map {
            d,
            start,
            len,
            phys,
            perms,
        } => {
            let s = start.get(page);
            let e = len.end(s, page);
            let (p, f) = (phys.get(page), Perms::from_bits_retain(perms));
            (
                m.map(d.get(), s, e, p, f).map(|_| 0),
                r.map(d.get(), s, e, p, f).map(|_| 0),
            )
        }
        Op::Unmap { d, start, len } => {
            let s = start.get(page);
            let e = len.end(s, page);
            (m.unmap(d.get(), s, e), r.unmap(d.get(), s, e))
        }
        Op::Probe { e } => {
            let got = m.probe(ep(e)).map(|regions| regions.to_vec());
            let want = r.probe(ep(e)).map(|regions| regions.to_vec());
            assert_eq!(got, want, "probe");
            if let Ok(regions) = &got {
                // Sorted, non-overlapping, at most one MSI region (R2, R3).
                assert!(regions.windows(2).all(|w| w[0].end < w[1].start));
                assert!(regions.iter().filter(|r| r.kind == ResvKind::Msi).count() <= 1);
            }
            (Ok(0), Ok(0))
        }
        Op::Translate {
            e,
            iova,
            len,
            write,
            who,
        } => {
            let e = ep(e);
            let req = match who {
                Who::Allowed => r.requester(e),
                Who::DmaApi => Requester::DmaApi,
                Who::Owner(c) => Requester::Owner(c.get()),
            };
            let access = if write { Access::Write } else { Access::Read };
            let (iova, len) = (iova.get(page), len.get(page));
            check_translation(
                t.translate(req, e, iova, len, access),
                r.translate(req, e, iova, len, access),
                iova,
                len,
            )
            .unwrap_or_else(|e| panic!("{e}"));
            // Inside a read-side section, twice: the same answer.
            let guard = t.read();
            let a = guard.translate(req, e, iova, len, access);
            let b = guard.translate(req, e, iova, len, access);
            assert_eq!(a, b);
            (Ok(0), Ok(0))
        }
        Op::Reset => {
            m.reset();
            r.reset();
            (Ok(0), Ok(0))
        }
        Op::Bypass(b) => {
            m.set_bypass(b);
            r.bypass = b;
            (Ok(0), Ok(0))
        }
        Op::UseDmaApi(e) => (m.use_dma_api(ep(e)).map(|_| 0), r.use_api(ep(e)).map(|_| 0)),
        Op::UnuseDmaApi(e) => (
            m.unuse_dma_api(ep(e)).map(|_| 0),
            r.unuse_api(ep(e)).map(|_| 0),
        ),
        Op::Claim { group, cookie } => {
            let g = GroupId(u32::from(group % 8));
            (
                m.claim_dma_owner(g, cookie.get()).map(|_| 0),
                r.claim(g, cookie.get()).map(|_| 0),
            )
        }
        Op::Release { group, cookie } => {
            let g = GroupId(u32::from(group % 8));
            (
                m.release_dma_owner(g, cookie.get()).map(|_| 0),
                r.release(g, cookie.get()).map(|_| 0),
            )
        }
        Op::NewTranslator => {
            let t2 = m.translator();
            drop(t2.clone());
            drop(t2);
            (Ok(0), Ok(0))
        }
    };
    if got == Err(Error::OutOfTableMemory) && want.is_ok() {
        // The reference has no page tables: accept NOMEM, which must change nothing.
        *r = saved;
    } else {
        assert_eq!(got, want, "{op:?}");
    }
    if got.is_err() {
        assert_eq!(snapshot(m), before, "refused {op:?} changed the model");
    }
}
