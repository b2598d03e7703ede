// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property test: random sequences of guest and host operations against a small, obviously
//! correct reference model (BTreeMaps and sets, no concurrency, no page tables). After every
//! step: the states agree, every endpoint of a group translates through the same domain, no
//! domain lives without an attached group, mappings never overlap, translate agrees with the
//! reference, and a refused operation changed nothing.

use proptest::prelude::*;

use super::super::*;
use crate::reference::{check_group_translations, check_translation, snapshot, Reference};

const PAGE: u64 = 4096;
const INPUT_END: u64 = (1 << 48) - 1;
const MAX_DOMAINS: u32 = 3;
const MAX_PER_DOMAIN: u64 = 6;
const MAX_MAPPINGS: u64 = 10;
/// Endpoint 4's reserved region: pages 16 and 17.
const RESERVED: ResvRegion = ResvRegion {
    kind: ResvKind::Reserved,
    start: 16 * PAGE,
    end: 18 * PAGE - 1,
};

fn topology() -> Topology {
    Topology::builder()
        .endpoints([1, 2, 3, 4])
        .group([2, 3])
        .domain_range(0, 5)
        .region_all(X86_MSI_REGION)
        .region(4, RESERVED)
        .limits(Limits {
            max_domains: MAX_DOMAINS,
            max_mappings_per_domain: MAX_PER_DOMAIN,
            max_mappings: MAX_MAPPINGS,
            max_table_bytes: 64 << 20,
        })
        .build()
        .unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Attach(DomainId, EndpointId, bool),
    Detach(DomainId, EndpointId),
    Map(DomainId, u64, u64, u64, Perms),
    Unmap(DomainId, u64, u64),
    Translate(EndpointId, u64, bool, Option<u64>),
    Reset,
    Bypass(bool),
    UseDmaApi(EndpointId),
    UnuseDmaApi(EndpointId),
    Claim(u32, u64),
    Release(u32, u64),
}

fn iova() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..24).prop_map(|p| p * PAGE),
        2 => (1u64..3).prop_map(|k| k << 21),
        1 => Just(1u64 << 30),
        1 => (0u64..24).prop_map(|p| p * PAGE + 0x800),
        1 => Just((1u64 << 48) - PAGE),
        // Either side of where a new domain's 3-level tree ends (it grows for the second).
        1 => prop_oneof![Just((1u64 << 39) - PAGE), Just(1u64 << 39)],
    ]
}

fn length() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (1u64..4).prop_map(|n| n * PAGE),
        2 => Just(2u64 << 20),
        1 => Just(4u64 << 20),
        1 => Just(1u64 << 30),
        1 => Just(0x800u64),
    ]
}

fn phys() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => (0u64..16).prop_map(|p| p * PAGE),
        2 => (0u64..4).prop_map(|k| k << 21),
        1 => Just(1u64 << 30),
        1 => Just(u64::MAX - 0xfff),
    ]
}

fn cookie() -> impl Strategy<Value = u64> {
    prop_oneof![4 => Just(7u64), 2 => Just(9), 1 => Just(0), 1 => Just(u64::MAX)]
}

/// Mostly live IDs, sometimes unknown or out-of-range ones.
fn domain() -> impl Strategy<Value = DomainId> {
    prop_oneof![12 => 0u32..2, 2 => Just(2u32), 1 => 3u32..7]
}

fn endpoint() -> impl Strategy<Value = EndpointId> {
    prop_oneof![12 => 1u32..5, 1 => Just(0u32), 1 => Just(5u32)]
}

fn group() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 0u32..3, 1 => Just(3u32)]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        10 => (domain(), endpoint(), proptest::bool::weighted(0.15))
            .prop_map(|(d, e, b)| Op::Attach(d, e, b)),
        3 => (domain(), endpoint()).prop_map(|(d, e)| Op::Detach(d, e)),
        12 => (domain(), iova(), length(), phys(), 0u8..8).prop_map(|(d, s, l, p, f)| {
            Op::Map(d, s, s.saturating_add(l - 1), p, Perms::from_bits_truncate(f))
        }),
        4 => (domain(), iova(), length()).prop_map(|(d, s, l)| {
            Op::Unmap(d, s, s.saturating_add(l - 1))
        }),
        1 => domain().prop_map(|d| Op::Unmap(d, 0, u64::MAX)),
        4 => (endpoint(), iova(), any::<bool>(), proptest::option::of(cookie()))
            .prop_map(|(e, i, w, c)| Op::Translate(e, i, w, c)),
        1 => Just(Op::Reset),
        1 => any::<bool>().prop_map(Op::Bypass),
        2 => endpoint().prop_map(Op::UseDmaApi),
        1 => endpoint().prop_map(Op::UnuseDmaApi),
        2 => (group(), cookie()).prop_map(|(g, c)| Op::Claim(g, c)),
        1 => (group(), cookie()).prop_map(|(g, c)| Op::Release(g, c)),
    ]
}

fn check_invariants(m: &Iommu, r: &Reference, t: &Translator) -> Result<(), TestCaseError> {
    // The states agree (domains, attachments, mappings, owners).
    let domains = m.domains();
    prop_assert_eq!(domains.len(), r.domains.len());
    for (info, (id, rd)) in domains.iter().zip(r.domains.iter()) {
        prop_assert_eq!(info.id, *id);
        prop_assert_eq!(info.kind, rd.kind);
        prop_assert_eq!(&info.groups, &rd.groups.iter().copied().collect::<Vec<_>>());
        // No domain without an attached group.
        prop_assert!(!info.groups.is_empty() && !info.endpoints.is_empty());
        if rd.kind == DomainKind::Paging {
            let maps = m.mappings(*id).unwrap();
            prop_assert_eq!(&maps, &rd.maps.values().copied().collect::<Vec<_>>());
            // No overlapping mappings.
            prop_assert!(maps.windows(2).all(|w| w[0].virt_end < w[1].virt_start));
            prop_assert_eq!(info.mappings, maps.len() as u64);
        }
    }
    for (gi, rg) in r.groups.iter().enumerate() {
        let attached: Vec<_> = rg.attached.iter().copied().collect();
        prop_assert_eq!(
            m.group_attachment(GroupId(gi as u32)),
            Some((rg.domain, attached))
        );
    }
    // Translate agrees with the reference, and the endpoints of a group agree with each other.
    let probes = [
        0,
        PAGE,
        5 * PAGE + 8,
        16 * PAGE,
        2 << 20,
        (1 << 30) + PAGE,
        (1 << 39) - 8,
        // Page 0 and page 1 GiB of a 3-level tree, if a walk ignored the tree's height.
        1 << 39,
        (1 << 39) + (1 << 30),
        INPUT_END - 7,
    ];
    check_group_translations(r, t, &probes).map_err(TestCaseError::fail)?;
    Ok(())
}

fn apply(m: &mut Iommu, r: &mut Reference, t: &Translator, op: &Op) -> Result<(), TestCaseError> {
    let before = snapshot(m);
    let kind = |b: bool| {
        if b {
            DomainKind::Identity
        } else {
            DomainKind::Paging
        }
    };
    let (got, want): (Result<u64, Error>, Result<u64, Error>) = match *op {
        Op::Attach(d, e, b) => (
            m.attach(d, e, kind(b)).map(|_| 0),
            r.attach(d, e, kind(b)).map(|_| 0),
        ),
        Op::Detach(d, e) => (m.detach(d, e).map(|_| 0), r.detach(d, e).map(|_| 0)),
        Op::Map(d, s, e, p, f) => (
            m.map(d, s, e, p, f).map(|_| 0),
            r.map(d, s, e, p, f).map(|_| 0),
        ),
        Op::Unmap(d, s, e) => (m.unmap(d, s, e), r.unmap(d, s, e)),
        Op::Translate(e, iova, write, cookie) => {
            let req = cookie.map_or(Requester::DmaApi, Requester::Owner);
            let access = if write { Access::Write } else { Access::Read };
            let len = 3 * PAGE;
            check_translation(
                t.translate(req, e, iova, len, access),
                r.translate(req, e, iova, len, access),
                iova,
                len,
            )
            .map_err(TestCaseError::fail)?;
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
        Op::UseDmaApi(e) => (m.use_dma_api(e).map(|_| 0), r.use_api(e).map(|_| 0)),
        Op::UnuseDmaApi(e) => (m.unuse_dma_api(e).map(|_| 0), r.unuse_api(e).map(|_| 0)),
        Op::Claim(g, c) => (
            m.claim_dma_owner(GroupId(g), c).map(|_| 0),
            r.claim(GroupId(g), c).map(|_| 0),
        ),
        Op::Release(g, c) => (
            m.release_dma_owner(GroupId(g), c).map(|_| 0),
            r.release(GroupId(g), c).map(|_| 0),
        ),
    };
    prop_assert_eq!(got, want, "{:?}", op);
    if got.is_err() {
        prop_assert_eq!(snapshot(m), before, "refused {:?} changed the model", op);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn model_agrees_with_the_reference(ops in proptest::collection::vec(op(), 1..80)) {
        let mut m = Iommu::new(topology());
        let mut r = Reference::new(topology());
        let t = m.translator();
        for op in &ops {
            apply(&mut m, &mut r, &t, op)?;
            check_invariants(&m, &r, &t)?;
        }
        // What the guest built comes back the same in a fresh model, and replaces what
        // another model held.
        let state = m.guest_state();
        let mut fresh = Iommu::new(topology());
        fresh.restore(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(fresh.guest_state(), state.clone());
        // The request counters are statistics, not state (a restore counts its own MAPs).
        let shape = |d: Vec<crate::DomainInfo>| d.iter().map(|d| d.without_counters()).collect::<Vec<_>>();
        prop_assert_eq!(shape(fresh.domains()), shape(m.domains()));
        let mut other = Iommu::new(topology());
        other.attach(0, 1, DomainKind::Paging).unwrap();
        other.map(0, 0, PAGE - 1, 0, Perms::READ).unwrap();
        other.restore(&state).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(other.guest_state(), state);
        // Tearing everything down leaves no table memory behind but nothing else.
        m.reset();
        prop_assert_eq!(m.stats().table_bytes, 0);
    }
}
