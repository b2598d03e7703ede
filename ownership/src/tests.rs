// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Conformance tests (named after the IDs of docs/spec-checklist.md), the group
//! and ownership rules, limits, and the IOTLB-sync ordering. `model` and `isolation` are
//! property tests; `stress` is the long randomized reader/writer test of the grace periods
//! (a few seconds by default, `VHOST_IOMMU_STRESS_SECS=300` for five minutes; see its
//! documentation).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc, Mutex,
    },
    time::Duration,
};

use super::*;

const RW: Perms = Perms::RW;
const PAGE: u64 = 4096;
const OWNER: u64 = 0xc0ffee;

/// Endpoints 1, 2, 5 alone; 3 and 4 share a group. All have the x86 MSI region.
fn topology() -> TopologyBuilder {
    Topology::builder()
        .endpoints([1, 2, 3, 4, 5])
        .group([3, 4])
        .domain_range(0, 1000)
        .region_all(X86_MSI_REGION)
}

fn iommu() -> Iommu {
    Iommu::new(topology().build().unwrap())
}

fn iommu_with(limits: Limits) -> Iommu {
    Iommu::new(topology().limits(limits).build().unwrap())
}

/// Translates a read of one byte as the DMA-API user of the endpoint's group.
fn read(t: &Translator, endpoint: EndpointId, iova: u64) -> Result<Translation, Fault> {
    t.translate(Requester::DmaApi, endpoint, iova, 1, Access::Read)
}

fn use_all(m: &mut Iommu) {
    for e in [1, 2, 3, 5] {
        m.use_dma_api(e).unwrap();
    }
}

// ---- config and general ------------------------------------------------------------------

/// Turning bypass off takes translations away: it returns only after a grace period. Turning
/// it on, or setting what is already set, takes none.
#[test]
fn only_turning_bypass_off_takes_a_grace_period() {
    let mut m = iommu();
    let grace_periods = |m: &Iommu| m.stats().grace_periods;
    let start = grace_periods(&m);
    for (bypass, taken) in [(false, 0), (true, 0), (true, 0), (false, 1), (false, 1)] {
        m.set_bypass(bypass);
        assert_eq!(m.bypass(), bypass);
        assert_eq!(grace_periods(&m) - start, taken, "bypass {bypass}");
    }
}

#[test]
fn c2_bypass_survives_reset() {
    let mut m = iommu();
    m.set_bypass(true);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.reset();
    assert!(m.bypass());
    use_all(&mut m);
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1234).unwrap().gpa, 0x1234);
}

/// Only faults of the guest's own programming reach the event queue; an unknown endpoint or
/// a requester that does not own the group is the host's business.
#[test]
fn guest_visible_faults_are_those_of_the_guests_tables() {
    for (fault, visible) in [
        (Fault::UnknownEndpoint, false),
        (Fault::NotOwner, false),
        (Fault::NoDomain, true),
        (Fault::Unmapped, true),
        (Fault::OutOfRange, true),
        (Fault::Permission, true),
        (Fault::Reserved, true),
    ] {
        assert_eq!(fault.guest_visible(), visible, "{fault:?}");
    }
}

/// A model's Debug output (in a panic message, a log line) names the page-table arena by its
/// capacity instead of dumping up to 512 GiB of tables.
#[test]
fn debug_output_shows_the_arena_capacity_not_its_tables() {
    let m = iommu();
    let text = format!("{m:?}");
    let capacity = Limits::default().max_table_bytes / NODE_BYTES;
    assert!(
        text.contains(&format!("arena: Arena {{ capacity: {capacity} }}")),
        "{text}"
    );
    assert!(text.len() < 16 << 10, "{} bytes", text.len());
}

/// The page tables' memory, which the daemon advises the kernel to back with huge pages: the
/// whole arena, reserved up front.
#[test]
fn table_memory_is_the_whole_arena() {
    let m = iommu_with(Limits {
        max_table_bytes: 16 << 20,
        ..Limits::default()
    });
    let (start, len) = m.table_memory();
    assert_ne!(start, 0);
    assert_eq!(len, 16 << 20);
}

#[test]
fn g4_unattached_endpoint_without_bypass_reaches_nothing() {
    let mut m = iommu();
    use_all(&mut m);
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1000), Err(Fault::NoDomain));
    m.set_bypass(true);
    assert_eq!(read(&t, 1, 0x1000).unwrap().gpa, 0x1000);
    m.set_bypass(false);
    assert_eq!(read(&t, 1, 0x1000), Err(Fault::NoDomain));
}

#[test]
fn g4_after_reset_no_endpoint_is_attached() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(7, 1, DomainKind::Paging).unwrap();
    m.map(7, 0x1000, 0x1fff, 0x5000, RW).unwrap();
    m.attach(8, 3, DomainKind::Identity).unwrap();
    m.reset();
    assert!(m.domains().is_empty());
    assert_eq!(m.stats().mappings, 0);
    assert_eq!(m.group_attachment(GroupId(0)), Some((None, vec![])));
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1000), Err(Fault::NoDomain));
    assert_eq!(read(&t, 3, 0x1000), Err(Fault::NoDomain));
    assert_eq!(
        m.map(7, 0x1000, 0x1fff, 0x5000, RW),
        Err(Error::UnknownDomain(7))
    );
}

// ---- ATTACH ------------------------------------------------------------------------------

#[test]
fn a3_attach_unknown_endpoint_is_noent() {
    let mut m = iommu();
    assert_eq!(
        m.attach(1, 99, DomainKind::Paging),
        Err(Error::UnknownEndpoint(99))
    );
    assert!(m.domains().is_empty());
}

/// The endpoint index, dense up to ID 0xffff (one load) and a sorted list beyond, answers
/// the same either way: every endpoint, nothing for the IDs in the gaps, below the first or
/// past the last.
#[test]
fn endpoint_index_dense_or_sorted_finds_exactly_the_endpoints() {
    for (ids, dense) in [
        (vec![0, 3, 0x28, 0xfffe], true),
        (vec![3, 0x28, 0xffff], true),
        (vec![3, 0x28, 0x1_0000], false),
        (vec![3, 0x28, u32::MAX], false),
    ] {
        let topo = Topology::builder().endpoints(ids.clone()).build().unwrap();
        let m = Iommu::new(topo);
        assert_eq!(
            matches!(m.shared.index, EndpointIndex::Dense(_)),
            dense,
            "{ids:x?}"
        );
        let t = m.translator();
        for (position, &id) in ids.iter().enumerate() {
            assert_eq!(t.group_of(id), Some(GroupId(position as u32)), "{id:#x}");
            assert_eq!(m.group(id), Ok(GroupId(position as u32)));
        }
        for id in [1, 2, 4, 0x27, 0x29, 0xfffd, 0x1_0001, u32::MAX - 1] {
            assert_eq!(t.group_of(id), None, "{ids:x?}: {id:#x}");
            assert_eq!(m.group(id), Err(Error::UnknownEndpoint(id)));
            assert_eq!(
                t.translate(Requester::DmaApi, id, 0, 1, Access::Read),
                Err(Fault::UnknownEndpoint)
            );
        }
    }
}

#[test]
fn attach_domain_outside_domain_range_is_range() {
    let mut m = iommu();
    assert_eq!(
        m.attach(1001, 1, DomainKind::Paging),
        Err(Error::DomainOutOfRange(1001))
    );
    assert!(m.domains().is_empty());
}

#[test]
fn a4_a_domain_is_shared_between_groups() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(1, 2, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1000).unwrap().gpa, 0x9000);
    assert_eq!(read(&t, 2, 0x1000).unwrap().gpa, 0x9000);
    assert_eq!(m.domains()[0].groups.len(), 2);
}

#[test]
fn a5_attach_with_inconsistent_bypass_flag_is_inval() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert_eq!(
        m.attach(1, 2, DomainKind::Identity),
        Err(Error::KindMismatch(1))
    );
    assert_eq!(
        m.attach(1, 1, DomainKind::Identity),
        Err(Error::KindMismatch(1))
    );
    m.attach(2, 2, DomainKind::Identity).unwrap();
    assert_eq!(
        m.attach(2, 5, DomainKind::Paging),
        Err(Error::KindMismatch(2))
    );
    assert_eq!(m.group_attachment(GroupId(3)), Some((None, vec![])));
}

#[test]
fn a6_attach_elsewhere_behaves_as_detach_then_attach() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    m.attach(2, 1, DomainKind::Paging).unwrap();
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1000), Err(Fault::Unmapped));
    // Domain 1 lost its last group: it and its mappings are gone.
    assert_eq!(m.mappings(1), Err(Error::UnknownDomain(1)));
    assert_eq!(m.domains().len(), 1);
}

#[test]
fn a7_attach_to_a_domain_mapping_the_endpoint_reserved_region_is_unsupp() {
    let topo = topology()
        .region(
            5,
            ResvRegion {
                kind: ResvKind::Reserved,
                start: 0x10_0000,
                end: 0x10_ffff,
            },
        )
        .build()
        .unwrap();
    let mut m = Iommu::new(topo);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x10_0000, 0x10_0fff, 0, RW).unwrap();
    assert_eq!(
        m.attach(1, 5, DomainKind::Paging),
        Err(Error::Incompatible {
            domain: 1,
            endpoint: 5
        })
    );
    m.attach(2, 5, DomainKind::Paging).unwrap();
}

#[test]
fn a8_attach_creates_the_domain_and_attaches() {
    let mut m = iommu();
    m.attach(42, 2, DomainKind::Paging).unwrap();
    assert_eq!(
        m.domains(),
        vec![DomainInfo {
            id: 42,
            kind: DomainKind::Paging,
            groups: vec![GroupId(2)],
            endpoints: vec![2],
            mappings: 0,
            maps: 0,
            unmaps: 0,
        }]
    );
}

#[test]
fn a_domain_counts_the_maps_and_unmaps_applied_to_it() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(2, 2, DomainKind::Paging).unwrap();
    m.map(1, 0x10_0000, 0x10_0fff, 0, RW).unwrap();
    m.map(1, 0x20_0000, 0x20_1fff, 0x1000, RW).unwrap();
    // Refused requests are not counted; an UNMAP of nothing is applied (and counted).
    assert!(m.map(1, 0x10_0000, 0x10_0fff, 0, RW).is_err());
    m.unmap(1, 0x10_0000, 0x10_0fff).unwrap();
    m.unmap(1, 0x30_0000, 0x30_0fff).unwrap();
    m.map(2, 0x10_0000, 0x10_0fff, 0, RW).unwrap();
    let counts: Vec<_> = m
        .domains()
        .iter()
        .map(|d| (d.id, d.mappings, d.maps, d.unmaps))
        .collect();
    assert_eq!(counts, [(1, 1, 2, 2), (2, 1, 1, 0)]);
}

// ---- groups ------------------------------------------------------------------------------

#[test]
fn first_attach_moves_the_whole_group() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 3, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    let t = m.translator();
    // Endpoint 4 was never attached by the guest, yet it cannot be isolated from 3.
    assert_eq!(read(&t, 4, 0x1000), read(&t, 3, 0x1000));
    assert_eq!(read(&t, 4, 0x1000).unwrap().domain, Some(1));
    m.attach(1, 4, DomainKind::Paging).unwrap();
    assert_eq!(m.group_attachment(GroupId(0)), Some((Some(1), vec![3, 4])));
}

#[test]
fn group_moves_keep_every_endpoint_attached() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 3, DomainKind::Paging).unwrap();
    m.attach(1, 4, DomainKind::Paging).unwrap();
    m.attach(2, 3, DomainKind::Paging).unwrap();
    assert_eq!(m.group_attachment(GroupId(0)), Some((Some(2), vec![3, 4])));
    let t = m.translator();
    m.map(2, 0, 0xfff, 0x7000, RW).unwrap();
    assert_eq!(read(&t, 3, 0).unwrap().domain, Some(2));
    assert_eq!(read(&t, 4, 0).unwrap().domain, Some(2));
    // Domain 1 lost its only group.
    assert_eq!(m.domains().len(), 1);
}

#[test]
fn detach_uncounts_and_the_last_detach_blocks_the_group() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 3, DomainKind::Paging).unwrap();
    m.attach(1, 4, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0x7000, RW).unwrap();
    m.detach(1, 3).unwrap();
    let t = m.translator();
    assert_eq!(
        read(&t, 3, 0).unwrap().gpa,
        0x7000,
        "4 still attached: the group stays"
    );
    m.detach(1, 4).unwrap();
    assert_eq!(read(&t, 3, 0), Err(Fault::NoDomain));
    assert_eq!(read(&t, 4, 0), Err(Fault::NoDomain));
    assert!(m.domains().is_empty());
}

// ---- DETACH ------------------------------------------------------------------------------

#[test]
fn d2_detach_unknown_endpoint_is_noent() {
    let mut m = iommu();
    assert_eq!(m.detach(1, 99), Err(Error::UnknownEndpoint(99)));
}

#[test]
fn d3_detach_from_a_domain_not_attached_is_inval() {
    let mut m = iommu();
    assert_eq!(
        m.detach(1, 1),
        Err(Error::NotAttached {
            domain: 1,
            endpoint: 1
        })
    );
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert_eq!(
        m.detach(2, 1),
        Err(Error::NotAttached {
            domain: 2,
            endpoint: 1
        })
    );
    m.attach(1, 3, DomainKind::Paging).unwrap();
    // 4 shares 3's group but the guest never attached it.
    assert_eq!(
        m.detach(1, 4),
        Err(Error::NotAttached {
            domain: 1,
            endpoint: 4
        })
    );
    assert_eq!(m.domains()[0].endpoints, vec![1, 3]);
}

#[test]
fn d4_after_detach_the_endpoint_reaches_no_mapping_of_the_domain() {
    let mut m = iommu();
    use_all(&mut m);
    m.set_bypass(true);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(1, 2, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    m.detach(1, 1).unwrap();
    let t = m.translator();
    // Bypass: identity, not the domain's mapping.
    assert_eq!(read(&t, 1, 0x1000).unwrap().gpa, 0x1000);
    assert_eq!(read(&t, 2, 0x1000).unwrap().gpa, 0x9000);
}

// ---- MAP ---------------------------------------------------------------------------------

#[test]
fn m1_map_misaligned_is_range() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    for (s, e, p) in [
        (0x800, 0x17ff, 0),
        (0x1000, 0x1ffe, 0),
        (0x1000, 0x1fff, 0x10),
        // One byte: misaligned, not an empty range.
        (0x1000, 0x1000, 0),
    ] {
        assert_eq!(
            m.map(1, s, e, p, RW),
            Err(Error::Misaligned {
                start: s,
                end: e,
                phys: p
            })
        );
    }
    assert!(m.mappings(1).unwrap().is_empty());
}

#[test]
fn m1_granule_follows_the_page_size_mask() {
    let mut m = Iommu::new(topology().page_size_mask(!0xffff).build().unwrap());
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert!(matches!(
        m.map(1, 0x1000, 0x1fff, 0, RW),
        Err(Error::Misaligned { .. })
    ));
    m.map(1, 0x10000, 0x1ffff, 0x20000, RW).unwrap();
}

#[test]
fn map_outside_the_input_range_is_range() {
    let mut m = Iommu::new(topology().input_range(0x1000, 0xfff_ffff).build().unwrap());
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert_eq!(
        m.map(1, 0, 0xfff, 0, RW),
        Err(Error::OutOfRange {
            start: 0,
            end: 0xfff
        })
    );
    assert_eq!(
        m.map(1, 0xfff_f000, 0x1000_0fff, 0, RW),
        Err(Error::OutOfRange {
            start: 0xfff_f000,
            end: 0x1000_0fff
        })
    );
    // Physical end past 2^64.
    assert_eq!(
        m.map(1, 0x1000, 0x2fff, u64::MAX - 0xfff, RW),
        Err(Error::OutOfRange {
            start: 0x1000,
            end: 0x2fff
        })
    );
    assert_eq!(
        m.map(1, 0x2000, 0x1fff, 0, RW),
        Err(Error::InvalidRange {
            start: 0x2000,
            end: 0x1fff
        })
    );
    m.map(1, 0x1000, 0xfff_ffff, 0, RW).unwrap();
}

/// Translations check the input range too when it starts above 0: below the start and past
/// the end is OUT_OF_RANGE (fault reason MAPPING), not a walk of the tables.
#[test]
fn translate_outside_an_input_range_not_starting_at_0_is_out_of_range() {
    let mut m = Iommu::new(topology().input_range(0x1000, 0xfff_ffff).build().unwrap());
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0xfff_ffff, 0, RW).unwrap();
    let t = m.translator();
    assert_eq!(read(&t, 1, 0x1000).unwrap().gpa, 0);
    assert_eq!(read(&t, 1, 0xfff_ffff).unwrap().gpa, 0xfff_efff);
    for iova in [0, 0xfff, 0x1000_0000, 0x1000_0fff, u64::MAX] {
        assert_eq!(read(&t, 1, iova), Err(Fault::OutOfRange), "{iova:#x}");
    }
}

#[test]
fn m2_map_overlapping_is_inval() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x2000, 0x3fff, 0, RW).unwrap();
    for (s, e) in [
        (0x1000, 0x2fff),
        (0x3000, 0x4fff),
        (0x2000, 0x2fff),
        (0, 0x20_0000 - 1),
    ] {
        assert_eq!(
            m.map(1, s, e, 0, RW),
            Err(Error::Overlap { start: s, end: e })
        );
    }
    m.map(1, 0x1000, 0x1fff, 0, RW).unwrap();
    m.map(1, 0x4000, 0x4fff, 0, RW).unwrap();
    assert_eq!(m.mappings(1).unwrap().len(), 3);
}

#[test]
fn m4_map_unknown_domain_is_noent() {
    let mut m = iommu();
    assert_eq!(m.map(3, 0, 0xfff, 0, RW), Err(Error::UnknownDomain(3)));
}

#[test]
fn m5_map_on_a_bypass_domain_is_inval() {
    let mut m = iommu();
    m.attach(3, 1, DomainKind::Identity).unwrap();
    assert_eq!(m.map(3, 0, 0xfff, 0, RW), Err(Error::IdentityDomain(3)));
}

#[test]
fn m6_no_write_through_a_mapping_without_write() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0x5000, Perms::READ).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x6000, Perms::WRITE).unwrap();
    let t = m.translator();
    let dma = |iova, access| t.translate(Requester::DmaApi, 1, iova, 8, access);
    assert_eq!(dma(0x10, Access::Read).unwrap().gpa, 0x5010);
    assert_eq!(dma(0x10, Access::Write), Err(Fault::Permission));
    assert_eq!(dma(0x1010, Access::Write).unwrap().gpa, 0x6010);
    assert_eq!(dma(0x1010, Access::Read), Err(Fault::Permission));
}

#[test]
fn mmio_flag_is_reported_by_translate() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0xfe00_0000, RW | Perms::MMIO).unwrap();
    assert!(read(&m.translator(), 1, 0).unwrap().mmio);
}

// ---- UNMAP -------------------------------------------------------------------------------

#[test]
fn u2_unmap_unknown_domain_is_noent() {
    let mut m = iommu();
    assert_eq!(m.unmap(3, 0, 0xfff), Err(Error::UnknownDomain(3)));
}

#[test]
fn u3_unmap_on_a_bypass_domain_is_inval() {
    let mut m = iommu();
    m.attach(3, 1, DomainKind::Identity).unwrap();
    assert_eq!(m.unmap(3, 0, 0xfff), Err(Error::IdentityDomain(3)));
}

/// The spec's seven UNMAP examples, in pages (each example starts from a blank domain).
#[test]
fn u4_u5_the_spec_unmap_examples() {
    let p = |n: u64| n * PAGE;
    let end = |n: u64| (n + 1) * PAGE - 1;
    type Case = (&'static [(u64, u64)], (u64, u64), Result<u64, ()>, usize);
    let cases: [Case; 7] = [
        (&[], (0, 4), Ok(0), 0),
        (&[(0, 9)], (0, 9), Ok(1), 0),
        (&[(0, 4), (5, 9)], (0, 9), Ok(2), 0),
        (&[(0, 9)], (0, 4), Err(()), 1),
        (&[(0, 4), (5, 9)], (0, 4), Ok(1), 1),
        (&[(0, 4)], (0, 9), Ok(1), 0),
        (&[(0, 4), (10, 14)], (0, 14), Ok(2), 0),
    ];
    for (i, (maps, (us, ue), expect, left)) in cases.iter().enumerate() {
        let mut m = iommu();
        m.attach(1, 1, DomainKind::Paging).unwrap();
        for (s, e) in maps.iter() {
            m.map(1, p(*s), end(*e), p(*s), RW).unwrap();
        }
        let got = m.unmap(1, p(*us), end(*ue));
        match expect {
            Ok(n) => assert_eq!(got, Ok(*n), "example {}", i + 1),
            Err(()) => assert_eq!(
                got,
                Err(Error::WouldSplit {
                    start: p(*us),
                    end: end(*ue)
                }),
                "example {}",
                i + 1
            ),
        }
        assert_eq!(m.mappings(1).unwrap().len(), *left, "example {}", i + 1);
    }
}

#[test]
fn u4_splitting_unmap_removes_nothing() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0, RW).unwrap();
    m.map(1, 0x1000, 0x4fff, 0x1000, RW).unwrap();
    m.map(1, 0x20_0000, 0x5f_ffff, 0x20_0000, RW).unwrap();
    let before = m.mappings(1).unwrap();
    // The first mapping is covered, the second is cut: nothing at all is removed (QEMU
    // removes the first and then answers RANGE).
    assert!(matches!(
        m.unmap(1, 0, 0x2fff),
        Err(Error::WouldSplit { .. })
    ));
    // Cutting a 2 MiB-leaf mapping on either side.
    assert!(matches!(
        m.unmap(1, 0x20_0000, 0x3f_ffff),
        Err(Error::WouldSplit { .. })
    ));
    assert!(matches!(
        m.unmap(1, 0x30_0000, 0x7f_ffff),
        Err(Error::WouldSplit { .. })
    ));
    assert_eq!(m.mappings(1).unwrap(), before);
    assert_eq!(m.unmap(1, 0, u64::MAX), Ok(3));
}

/// UNMAP ranges need no alignment: a page-long range that is not page-aligned cuts the pages
/// it straddles (RANGE, nothing removed), as does one byte inside a mapping; one byte where
/// nothing is mapped removes nothing.
#[test]
fn u4_unaligned_unmap_ranges() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0, RW).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x1000, RW).unwrap();
    let before = m.mappings(1).unwrap();
    for (start, end) in [(0x800, 0x17ff), (0xfff, 0x1ffe), (0x1000, 0x1000)] {
        assert_eq!(
            m.unmap(1, start, end),
            Err(Error::WouldSplit { start, end }),
            "{start:#x}-{end:#x}"
        );
    }
    assert_eq!(m.mappings(1).unwrap(), before);
    assert_eq!(m.unmap(1, 0x5000, 0x5000), Ok(0));
    assert_eq!(m.unmap(1, 0, 0x1fff), Ok(2));
}

/// An UNMAP that removes nothing waits for no reader: none can hold what was not mapped.
#[test]
fn an_unmap_that_removes_nothing_takes_no_grace_period() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    let before = m.stats().grace_periods;
    // One page (the fast path), and a range.
    assert_eq!(m.unmap(1, 0x5000, 0x5fff), Ok(0));
    assert_eq!(m.unmap(1, 0x10_0000, 0x2f_ffff), Ok(0));
    assert_eq!(m.stats().grace_periods, before);
    assert_eq!(m.unmap(1, 0x1000, 0x1fff), Ok(1));
    assert_eq!(m.stats().grace_periods, before + 1);
}

#[test]
fn unmap_end_below_start_is_inval() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert_eq!(
        m.unmap(1, 2, 1),
        Err(Error::InvalidRange { start: 2, end: 1 })
    );
}

// ---- PROBE and reserved regions ----------------------------------------------------------

#[test]
fn p2_probe_unknown_endpoint_is_noent() {
    let m = iommu();
    assert_eq!(m.probe(99), Err(Error::UnknownEndpoint(99)));
    assert_eq!(m.probe(1), Ok(&[X86_MSI_REGION][..]));
}

#[test]
fn r4_map_overlapping_a_reserved_region_is_inval() {
    let mut m = iommu();
    m.attach(1, 1, DomainKind::Paging).unwrap();
    assert_eq!(
        m.map(1, 0xfee0_0000, 0xfee0_0fff, 0, RW),
        Err(Error::ReservedOverlap {
            start: 0xfee0_0000,
            end: 0xfee0_0fff
        })
    );
    assert_eq!(
        m.map(1, 0xfe00_0000, 0xffff_ffff, 0, RW),
        Err(Error::ReservedOverlap {
            start: 0xfe00_0000,
            end: 0xffff_ffff
        })
    );
    m.map(1, 0xfef0_0000, 0xfef0_0fff, 0, RW).unwrap();
}

#[test]
fn r5_bypassed_accesses_to_reserved_regions_are_contained() {
    let mut m = iommu();
    use_all(&mut m);
    m.set_bypass(true);
    m.attach(2, 2, DomainKind::Identity).unwrap();
    let t = m.translator();
    for e in [1, 2] {
        assert_eq!(read(&t, e, 0xfee0_0010), Err(Fault::Reserved));
        let before = t
            .translate(Requester::DmaApi, e, 0xfedf_f000, 0x10_0000, Access::Read)
            .unwrap();
        assert_eq!(before.len, 0x1000, "stops at the region");
    }
}

// ---- host face ---------------------------------------------------------------------------

#[test]
fn dma_owner_claim_release_mirror_the_kernel() {
    let mut m = iommu();
    let g = m.group(3).unwrap();
    assert_eq!(m.claim_dma_owner(g, 0), Err(Error::InvalidOwner));
    assert_eq!(m.claim_dma_owner(g, u64::MAX), Err(Error::InvalidOwner));
    m.use_dma_api(4).unwrap();
    assert_eq!(m.claim_dma_owner(g, OWNER), Err(Error::InUse(g)));
    m.unuse_dma_api(4).unwrap();
    assert_eq!(m.unuse_dma_api(4), Err(Error::NotInUse(g)));
    m.claim_dma_owner(g, OWNER).unwrap();
    m.claim_dma_owner(g, OWNER).unwrap();
    assert_eq!(m.claim_dma_owner(g, 7), Err(Error::Busy(g)));
    assert_eq!(m.use_dma_api(3), Err(Error::Busy(g)));
    assert_eq!(m.release_dma_owner(g, 7), Err(Error::NotOwner(g)));
    m.release_dma_owner(g, OWNER).unwrap();
    assert_eq!(m.dma_owner(g), Some(OWNER), "claimed twice, released once");
    m.release_dma_owner(g, OWNER).unwrap();
    assert_eq!(m.dma_owner(g), None);
    assert_eq!(
        m.claim_dma_owner(GroupId(99), OWNER),
        Err(Error::UnknownGroup(GroupId(99)))
    );
}

#[test]
fn only_the_owner_may_translate() {
    let mut m = iommu();
    m.set_bypass(true);
    let t = m.translator();
    let g = m.group(1).unwrap();
    let tr = |r| t.translate(r, 1, 0x1000, 1, Access::Read);
    assert_eq!(
        tr(Requester::DmaApi),
        Err(Fault::NotOwner),
        "no user declared"
    );
    m.claim_dma_owner(g, OWNER).unwrap();
    assert_eq!(tr(Requester::Owner(OWNER)).unwrap().gpa, 0x1000);
    assert_eq!(tr(Requester::Owner(7)), Err(Fault::NotOwner));
    assert_eq!(tr(Requester::DmaApi), Err(Fault::NotOwner));
    m.release_dma_owner(g, OWNER).unwrap();
    assert_eq!(tr(Requester::Owner(OWNER)), Err(Fault::NotOwner));
    m.use_dma_api(1).unwrap();
    assert_eq!(tr(Requester::DmaApi).unwrap().gpa, 0x1000);
    // Cookies that can never own a group never translate (no impersonation of DMA-API users
    // or of "nobody").
    assert_eq!(tr(Requester::Owner(u64::MAX)), Err(Fault::NotOwner));
    m.unuse_dma_api(1).unwrap();
    assert_eq!(tr(Requester::Owner(0)), Err(Fault::NotOwner));
    assert_eq!(
        t.translate(Requester::DmaApi, 99, 0, 1, Access::Read),
        Err(Fault::UnknownEndpoint)
    );
}

// ---- limits ------------------------------------------------------------------------------

#[test]
fn domain_cap_is_nomem_and_ids_are_reusable() {
    let mut m = iommu_with(Limits {
        max_domains: 2,
        ..Limits::default()
    });
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(2, 2, DomainKind::Identity).unwrap();
    assert_eq!(
        m.attach(3, 5, DomainKind::Paging),
        Err(Error::TooManyDomains)
    );
    // At the cap, a group whose domain dies with the move may still switch.
    m.attach(3, 2, DomainKind::Paging).unwrap();
    assert_eq!(m.domains().iter().map(|d| d.id).collect::<Vec<_>>(), [1, 3]);
    m.attach(2, 2, DomainKind::Identity).unwrap();
    m.attach(1, 5, DomainKind::Paging).unwrap();
    m.detach(2, 2).unwrap();
    m.attach(3, 2, DomainKind::Paging).unwrap();
}

#[test]
fn mapping_caps_are_nomem() {
    let mut m = iommu_with(Limits {
        max_mappings_per_domain: 2,
        max_mappings: 3,
        ..Limits::default()
    });
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(2, 2, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0, RW).unwrap();
    m.map(1, 0x1000, 0x1fff, 0, RW).unwrap();
    assert_eq!(m.map(1, 0x2000, 0x2fff, 0, RW), Err(Error::TooManyMappings));
    m.map(2, 0, 0xfff, 0, RW).unwrap();
    assert_eq!(m.map(2, 0x1000, 0x1fff, 0, RW), Err(Error::TooManyMappings));
    m.unmap(1, 0, 0xfff).unwrap();
    m.map(2, 0x1000, 0x1fff, 0, RW).unwrap();
    assert_eq!(m.stats().mappings, 3);
}

#[test]
fn table_memory_cap_is_nomem_and_bounded() {
    // 5 nodes: a root and two far-apart 4 KiB mappings, each with two table nodes (the page
    // is an inline run in the level-1 entry).
    let mut m = iommu_with(Limits {
        max_table_bytes: 5 * 4096,
        ..Limits::default()
    });
    m.attach(1, 1, DomainKind::Paging).unwrap();
    let mut refused = 0;
    for i in 0..64u64 {
        // One 4 KiB page per 512 GiB: every MAP needs two fresh nodes.
        let iova = i << 39;
        match m.map(1, iova, iova + 0xfff, 0, RW) {
            Ok(()) => {}
            Err(Error::OutOfTableMemory) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(refused, 62);
    assert_eq!(m.stats().table_bytes, 5 * 4096);
    assert_eq!(m.mappings(1).unwrap().len() as u64, m.stats().mappings);
    assert_eq!(
        m.attach(2, 2, DomainKind::Paging),
        Err(Error::OutOfTableMemory),
        "no node left for a new root"
    );
    // Unmapping gives the memory back.
    m.unmap(1, 0, u64::MAX).unwrap();
    m.attach(2, 2, DomainKind::Paging).unwrap();
}

/// Inside a batch, the nodes an UNMAP frees wait for the batch's grace period; a MAP short of
/// nodes takes that grace period early and gets them. A MAP refused with nothing waiting takes
/// no grace period.
#[test]
fn a_map_short_of_nodes_takes_the_pending_grace_period_early() {
    const GIB: u64 = 1 << 30;
    // A root and the level-1 node of one page (an inline run in its entry).
    let mut m = iommu_with(Limits {
        max_table_bytes: 2 * 4096,
        ..Limits::default()
    });
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0, 0xfff, 0, RW).unwrap();
    let before = m.stats().grace_periods;
    assert_eq!(
        m.map(1, GIB, GIB + 0xfff, 0, RW),
        Err(Error::OutOfTableMemory)
    );
    assert_eq!(m.stats().grace_periods, before, "nothing to wait for");
    m.begin_batch();
    assert_eq!(m.unmap(1, 0, 0xfff), Ok(1));
    assert_eq!(
        m.stats().grace_periods,
        before,
        "deferred to the end of the batch"
    );
    m.map(1, GIB, GIB + 0xfff, 0, RW).unwrap();
    assert_eq!(m.stats().grace_periods, before + 1, "taken early");
    m.end_batch();
    assert_eq!(m.stats().grace_periods, before + 1, "and not again");
    assert_eq!(m.mappings(1).unwrap().len(), 1);
}

/// A new domain's tree has 3 levels; a MAP above 512 GiB adds a level under a new root that
/// every group of the domain sees once the MAP is in, while a reader holding the old root keeps
/// translating what it could. A refused MAP gives the new levels back.
#[test]
fn trees_grow_for_high_mappings() {
    let mut m = iommu_with(Limits {
        max_mappings_per_domain: 2,
        ..Limits::default()
    });
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.attach(1, 2, DomainKind::Paging).unwrap();
    let t = m.translator();
    m.map(1, 0, 0xfff, 0x5000, RW).unwrap();
    assert_eq!(m.stats().table_bytes, 2 * 4096, "a root and a level-1 node");
    // Page 0 of a 3-level tree, if a walk ignored the tree's height.
    assert_eq!(read(&t, 1, 1 << 39), Err(Fault::Unmapped));
    // In the next 2 MiB region: an inline run in the same level-1 node.
    m.map(1, 0x20_0000, 0x20_0fff, 0x6000, RW).unwrap();
    let high = 1u64 << 40;
    assert_eq!(
        m.map(1, high, high + 0xfff, 0x9000, RW),
        Err(Error::TooManyMappings)
    );
    assert_eq!(
        m.stats().table_bytes,
        2 * 4096,
        "the refused MAP's level is back"
    );
    m.unmap(1, 0x20_0000, 0x20_0fff).unwrap();
    let guard = t.read();
    let old = guard.endpoint(Requester::DmaApi, 1).unwrap();
    m.map(1, high, high + 0xfff, 0x9000, RW).unwrap();
    // The old root still translates its own range, and nothing beyond it.
    assert_eq!(old.translate(8, 1, Access::Read).unwrap().gpa, 0x5008);
    assert_eq!(old.translate(high, 1, Access::Read), Err(Fault::Unmapped));
    drop(guard);
    for e in [1, 2] {
        assert_eq!(read(&t, e, high + 8).unwrap().gpa, 0x9008);
        assert_eq!(read(&t, e, 8).unwrap().gpa, 0x5008);
        assert_eq!(read(&t, e, 1 << 39), Err(Fault::Unmapped));
    }
    // A new root above the old one, and a level-2 and a level-1 node for the high page.
    assert_eq!(m.stats().table_bytes, 5 * 4096);
    assert_eq!(m.mappings(1).unwrap().len(), 2);
    // Emptying the old tree retires it too; the root stays.
    m.unmap(1, 0, 0xfff).unwrap();
    m.unmap(1, high, high + 0xfff).unwrap();
    assert_eq!(m.stats().table_bytes, 4096);
    m.map(1, 0, 0xfff, 0x5000, RW).unwrap();
    assert_eq!(read(&t, 2, 8).unwrap().gpa, 0x5008);
    m.reset();
    assert_eq!(m.stats().table_bytes, 0);
}

/// Readers translating low and high IOVAs while the writer builds domains whose trees grow
/// (every round moves the group to a fresh domain with a 3-level tree, then maps above 512
/// GiB): every answer is the right GPA or a fault, never a low mapping's GPA for a high IOVA.
#[test]
fn readers_stay_right_while_trees_grow() {
    let mut m = iommu();
    use_all(&mut m);
    let high = 1u64 << 40;
    let gpa = move |iova: u64| {
        let page = (iova % high) / PAGE;
        (if iova >= high { 2 << 30 } else { 1 << 30 }) + page * PAGE
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Hits on low and on high IOVAs, all readers.
    let hits = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (t, stop, hits) = (m.translator(), stop.clone(), hits.clone());
            std::thread::spawn(move || {
                // Low then high, then high then low: the writer's grace periods wait for the
                // readers, and a fixed order could lock a reader's phase to the writer's.
                let mut order = [(0, 0), (1, high)];
                while !stop.load(Ordering::Relaxed) {
                    order.reverse();
                    for (k, base) in order {
                        for page in 0..4 {
                            let iova = base + page * PAGE;
                            match read(&t, 1, iova + 8) {
                                Ok(tr) => {
                                    assert_eq!(tr.gpa, gpa(iova) + 8, "{iova:#x}");
                                    hits[k].fetch_add(1, Ordering::Relaxed);
                                }
                                Err(Fault::Unmapped | Fault::NoDomain) => {}
                                Err(f) => panic!("{f:?} at {iova:#x}"),
                            }
                        }
                    }
                }
            })
        })
        .collect();
    let t = m.translator();
    let started = std::time::Instant::now();
    // At least 400 rounds, and until the readers have seen high mappings (they may start late).
    for round in 0u32.. {
        let seen = hits.iter().all(|h| h.load(Ordering::Relaxed) >= 1000);
        if round >= 400 && (seen || started.elapsed().as_secs() >= 20) {
            break;
        }
        let domain = 1 + round % 2;
        m.attach(domain, 1, DomainKind::Paging).unwrap();
        for base in [0, high] {
            for page in 0..4 {
                let iova = base + page * PAGE;
                m.map(domain, iova, iova + PAGE - 1, gpa(iova), RW).unwrap();
            }
        }
        assert_eq!(read(&t, 1, high + 8).unwrap().gpa, gpa(high) + 8);
        assert_eq!(read(&t, 1, 8).unwrap().gpa, gpa(0) + 8);
        m.unmap(domain, 0, u64::MAX).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(
        hits.iter().all(|h| h.load(Ordering::Relaxed) > 0),
        "{hits:?}"
    );
    m.reset();
    assert_eq!(m.stats().table_bytes, 0);
}

/// Growing needs nodes: a MAP that cannot have them, for the new level or for the mapping
/// below it, is NOMEM and leaves the tree as it was.
#[test]
fn a_tree_that_cannot_grow_refuses_the_map() {
    for nodes in [2, 3] {
        let mut m = iommu_with(Limits {
            max_table_bytes: nodes * 4096,
            ..Limits::default()
        });
        use_all(&mut m);
        m.attach(1, 1, DomainKind::Paging).unwrap();
        m.map(1, 0, 0xfff, 0x5000, RW).unwrap();
        let high = 1u64 << 40;
        assert_eq!(
            m.map(1, high, high + 0xfff, 0x9000, RW),
            Err(Error::OutOfTableMemory),
            "{nodes} nodes"
        );
        assert_eq!(m.stats().table_bytes, 2 * 4096, "{nodes} nodes");
        let t = m.translator();
        assert_eq!(read(&t, 1, 8).unwrap().gpa, 0x5008);
        assert_eq!(read(&t, 1, high), Err(Fault::Unmapped));
        // What is left still serves MAPs the tree reaches (an inline run in the next region).
        m.map(1, 0x20_0000, 0x20_0fff, 0x6000, RW).unwrap();
    }
}

/// Runs blocks a MAP replaces wait for a grace period; a stream of MAPs alone (no UNMAP to
/// take one) must still take them, so the replaced blocks never pile up, and every page stays
/// translatable throughout.
#[test]
fn maps_alone_do_not_pile_up_replaced_blocks() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    let t = m.translator();
    // Eight pages per 2 MiB region, top-down as Linux allocates: a region's second MAP moves
    // its inline run into a block, and every later one sorts before the block's runs, so it
    // writes a new block.
    let iova = |i: u64| ((1 + i / 8) << 21) + ((7 - i % 8) << 12);
    let mut peak = 0;
    for i in 0..6000u64 {
        m.map(1, iova(i), iova(i) + 0xfff, i << 12, RW).unwrap();
        peak = peak.max(m.table.retired_blocks());
    }
    assert!(peak <= RETIRED_BLOCKS_BACKLOG, "{peak} blocks waited");
    assert!(m.stats().grace_periods >= 5, "{:?}", m.stats());
    for i in (0..6000u64).step_by(7) {
        assert_eq!(read(&t, 1, iova(i) + 5).unwrap().gpa, (i << 12) + 5);
    }
    m.unmap(1, 0, u64::MAX).unwrap();
    m.reset();
    assert_eq!(m.stats().table_bytes, 0);
}

// ---- the IOTLB-sync rule -----------------------------------------------------------------

/// An UNMAP returns only once no reader can still return the removed mapping: a reader that
/// translated inside a critical section keeps the UNMAP waiting until it leaves.
#[test]
fn unmap_completes_only_after_readers_that_saw_the_mapping_leave() {
    let model = Arc::new(Mutex::new(iommu()));
    let translator = {
        let mut m = model.lock().unwrap();
        use_all(&mut m);
        m.attach(1, 1, DomainKind::Paging).unwrap();
        m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
        m.translator()
    };
    let guard = translator.read();
    assert_eq!(
        guard
            .translate(Requester::DmaApi, 1, 0x1000, 1, Access::Read)
            .unwrap()
            .gpa,
        0x9000
    );
    let done = Arc::new(AtomicBool::new(false));
    let unmapper = {
        let (model, done) = (model.clone(), done.clone());
        std::thread::spawn(move || {
            let result = model.lock().unwrap().unmap(1, 0x1000, 0x1fff);
            done.store(true, Ordering::SeqCst);
            result
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !done.load(Ordering::SeqCst),
        "UNMAP completed while a reader held the mapping"
    );
    drop(guard);
    assert_eq!(unmapper.join().unwrap(), Ok(1));
    assert_eq!(read(&translator, 1, 0x1000), Err(Fault::Unmapped));
}

/// In a batch the UNMAP itself does not wait; `end_batch` does, and only once for the batch.
#[test]
fn a_batch_defers_its_grace_period_to_end_batch() {
    let model = Arc::new(Mutex::new(iommu()));
    let translator = {
        let mut m = model.lock().unwrap();
        use_all(&mut m);
        m.attach(1, 1, DomainKind::Paging).unwrap();
        for page in 0..4 {
            m.map(1, page * PAGE, page * PAGE + PAGE - 1, 0x9000, RW)
                .unwrap();
        }
        m.translator()
    };
    let before = model.lock().unwrap().stats().grace_periods;
    let guard = translator.read();
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (model, done) = (model.clone(), done.clone());
        std::thread::spawn(move || {
            let mut m = model.lock().unwrap();
            m.begin_batch();
            for page in 0..4 {
                assert_eq!(m.unmap(1, page * PAGE, page * PAGE + PAGE - 1), Ok(1));
            }
            done.store(true, Ordering::SeqCst);
            m.end_batch();
            m.stats().grace_periods
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "UNMAPs in a batch waited for the reader"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !writer.is_finished(),
        "end_batch returned while a reader held a mapping"
    );
    drop(guard);
    assert_eq!(
        writer.join().unwrap(),
        before + 1,
        "one grace period for the batch"
    );
    assert_eq!(read(&translator, 1, 0), Err(Fault::Unmapped));
}

/// Readers translating in a loop while the writer maps and unmaps never see a GPA the
/// writer did not map at that IOVA, and after each UNMAP returns the next read faults.
#[test]
fn concurrent_readers_see_only_whole_current_mappings() {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let t = m.translator();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut hits = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for page in 0..64u64 {
                        if let Ok(tr) = read(&t, 1, page * PAGE + 8) {
                            // Every mapping maps page p to GPA p * PAGE + 1 GiB.
                            assert_eq!(tr.gpa, (1 << 30) + page * PAGE + 8);
                            hits += 1;
                        }
                    }
                }
                hits
            })
        })
        .collect();
    let t = m.translator();
    for round in 0..2000u64 {
        let first = round % 60;
        let len = 1 + round % 4;
        let (s, e) = (first * PAGE, (first + len) * PAGE - 1);
        m.map(1, s, e, (1 << 30) + s, RW).unwrap();
        m.unmap(1, s, e).unwrap();
        assert_eq!(read(&t, 1, s), Err(Fault::Unmapped));
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(m.stats().table_bytes, 4096, "emptied tables were recycled");
}

/// The IOTLB-sync rule under load: a reader that got a translation inside its critical
/// section never sees the UNMAP that removes it complete before it leaves. Busy readers
/// (ended by the grace period's fast path) and readers that linger inside their section (the
/// heavy-barrier path) both run; every MAP uses a fresh GPA, so a stale result is detectable.
#[test]
fn no_unmap_completes_under_a_reader_that_holds_its_translation() {
    const BASE: u64 = 1 << 30;
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    // Generations below this have been unmapped (their UNMAP returned).
    let dead_below = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let readers: Vec<_> = (0..2u64)
        .map(|k| {
            let t = m.translator();
            let (stop, dead_below) = (stop.clone(), dead_below.clone());
            std::thread::spawn(move || {
                let (mut hits, mut round) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    round += 1;
                    let guard = t.read();
                    if let Ok(tr) = guard.translate(Requester::DmaApi, 1, 0, 1, Access::Read) {
                        let generation = (tr.gpa - BASE) / PAGE;
                        // Reader 1 lingers now and then, so grace periods take the slow path.
                        if k == 1 && round % 64 == 0 {
                            std::thread::sleep(Duration::from_micros(50));
                        }
                        assert!(
                            dead_below.load(Ordering::SeqCst) <= generation,
                            "generation {generation} was unmapped while a reader held it"
                        );
                        hits += 1;
                    }
                    drop(guard);
                }
                hits
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_millis(1500);
    let mut generation = 0u64;
    while std::time::Instant::now() < deadline {
        m.map(1, 0, PAGE - 1, BASE + generation * PAGE, RW).unwrap();
        std::thread::yield_now();
        assert_eq!(m.unmap(1, 0, PAGE - 1), Ok(1));
        generation += 1;
        dead_below.store(generation, Ordering::SeqCst);
    }
    stop.store(true, Ordering::Relaxed);
    let hits: Vec<u64> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    assert!(
        generation > 100,
        "the writer made progress ({generation} pairs)"
    );
    assert!(
        hits.iter().all(|&h| h > 0),
        "readers saw mappings: {hits:?}"
    );
}

// ---- grace periods never wait on a reader that is not in a section ------------------------

/// How long a step that must not block may take before the test calls it stuck. The stuck
/// thread is left behind (the test binary exits without it).
const STUCK: Duration = Duration::from_secs(10);

/// Runs `f` on a thread of its own; its answer arrives on the returned channel.
fn spawn_step<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> mpsc::Receiver<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx
}

/// The answer of a step started by [`spawn_step`], or a test failure naming it if it has not
/// come within [`STUCK`].
fn finish<T>(what: &str, step: &mpsc::Receiver<T>) -> T {
    match step.recv_timeout(STUCK) {
        Ok(answer) => answer,
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: still blocked after {STUCK:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: panicked"),
    }
}

/// A model behind a mutex (the daemon's writer lock) with endpoint 1 in domain 1, pages 1 and
/// 2 mapped to 0x9000 and 0xa000.
fn shared_model() -> Arc<Mutex<Iommu>> {
    let mut m = iommu();
    use_all(&mut m);
    m.attach(1, 1, DomainKind::Paging).unwrap();
    m.map(1, 0x1000, 0x1fff, 0x9000, RW).unwrap();
    m.map(1, 0x2000, 0x2fff, 0xa000, RW).unwrap();
    Arc::new(Mutex::new(m))
}

/// A DMA master may clone, create and drop translators inside a read section while the writer
/// (holding the model) waits for that very section: none of it waits for the writer, and the
/// writer still waits for the section.
#[test]
fn translators_come_and_go_inside_a_section_the_writer_waits_for() {
    let model = shared_model();
    let (translator, spare, source) = {
        let m = model.lock().unwrap();
        (m.translator(), m.translator(), m.translator_source())
    };
    let (steps_tx, steps) = mpsc::channel();
    let (go, gate) = mpsc::channel::<()>();
    let reader = std::thread::spawn(move || {
        let guard = translator.read();
        let page1 = |g: &ReadGuard| g.translate(Requester::DmaApi, 1, 0x1000, 1, Access::Read);
        assert_eq!(page1(&guard).unwrap().gpa, 0x9000);
        steps_tx.send("entered").unwrap();
        // The section sees the writer's unlinking store (it only delays node reuse and the
        // UNMAP's completion): from then on the writer is in, or about to be in, its wait.
        while page1(&guard).is_ok() {
            std::thread::yield_now();
        }
        steps_tx.send("unlinked").unwrap();
        gate.recv().unwrap();
        let clone = translator.clone();
        steps_tx.send("clone a translator").unwrap();
        // A translator created now sees the UNMAP in progress, and what is still mapped.
        assert_eq!(read(&clone, 1, 0x1000), Err(Fault::Unmapped));
        assert_eq!(read(&clone, 1, 0x2000).unwrap().gpa, 0xa000);
        let inner = clone.read();
        assert_eq!(
            inner
                .translate(Requester::DmaApi, 1, 0x2000, 1, Access::Read)
                .unwrap()
                .gpa,
            0xa000
        );
        drop(inner);
        let kept = clone.clone();
        steps_tx.send("clone a clone").unwrap();
        let made = source.translator();
        assert_eq!(read(&made, 1, 0x2000).unwrap().gpa, 0xa000);
        drop(made);
        steps_tx.send("make a translator from a source").unwrap();
        drop(clone);
        steps_tx.send("drop a clone").unwrap();
        drop(spare);
        steps_tx
            .send("drop a translator made before the section")
            .unwrap();
        gate.recv().unwrap();
        drop(guard);
        kept
    });
    assert_eq!(finish("enter a section", &steps), "entered");
    let unmap = {
        let model = model.clone();
        spawn_step(move || model.lock().unwrap().unmap(1, 0x1000, 0x1fff))
    };
    assert_eq!(finish("the writer's unlinking store", &steps), "unlinked");
    // Let the writer get well into its wait for the section.
    std::thread::sleep(Duration::from_millis(100));
    go.send(()).unwrap();
    for step in [
        "clone a translator",
        "clone a clone",
        "make a translator from a source",
        "drop a clone",
        "drop a translator made before the section",
    ] {
        assert_eq!(finish(step, &steps), step);
    }
    assert!(
        unmap.try_recv().is_err(),
        "UNMAP completed while a reader held the mapping"
    );
    go.send(()).unwrap();
    assert_eq!(finish("UNMAP once the section ended", &unmap), Ok(1));
    let kept = reader.join().unwrap();
    // The translator created inside the section is an ordinary idle reader.
    let unmap = {
        let model = model.clone();
        spawn_step(move || model.lock().unwrap().unmap(1, 0x2000, 0x2fff))
    };
    assert_eq!(finish("UNMAP with idle readers", &unmap), Ok(1));
    assert_eq!(read(&kept, 1, 0x2000), Err(Fault::Unmapped));
}

/// A thread that leaks a guard (its section never ends) and exits drops its translator: that
/// ends the section, also for a grace period already waiting for it, and no later grace period
/// waits for it.
#[test]
fn a_guard_leaked_by_a_thread_that_exits_holds_no_grace_period() {
    let model = shared_model();
    let leak = |t: Translator| {
        let (entered_tx, entered) = mpsc::channel();
        let (exit, exit_rx) = mpsc::channel::<()>();
        let (exited_tx, exited) = mpsc::channel();
        std::thread::spawn(move || {
            std::mem::forget(t.read());
            entered_tx.send(()).unwrap();
            exit_rx.recv().unwrap();
            drop(t);
            exited_tx.send(()).unwrap();
        });
        finish("leak a guard", &entered);
        (exit, exited)
    };
    // The thread leaks its guard and lives on while the writer waits for its section.
    let (exit, exited) = leak(model.lock().unwrap().translator());
    let unmap = {
        let model = model.clone();
        spawn_step(move || model.lock().unwrap().unmap(1, 0x1000, 0x1fff))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        unmap.try_recv().is_err(),
        "UNMAP completed while a section was open"
    );
    exit.send(()).unwrap();
    finish(
        "drop a translator whose section the writer waits for",
        &exited,
    );
    assert_eq!(finish("UNMAP after the translator's drop", &unmap), Ok(1));
    // Another thread leaks a guard and exits before any grace period starts.
    let (exit, exited) = leak(model.lock().unwrap().translator());
    exit.send(()).unwrap();
    finish("drop a translator with a leaked guard", &exited);
    // Later grace periods of every kind complete.
    let later = {
        let model = model.clone();
        spawn_step(move || {
            let mut m = model.lock().unwrap();
            let unmapped = m.unmap(1, 0x2000, 0x2fff);
            m.attach(2, 1, DomainKind::Paging).unwrap();
            m.detach(2, 1).unwrap();
            m.set_bypass(true);
            m.set_bypass(false);
            m.reset();
            unmapped
        })
    };
    assert_eq!(finish("grace periods after the leak", &later), Ok(1));
}

mod isolation;
mod mapped;
mod model;
mod stress;
