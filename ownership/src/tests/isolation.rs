// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Property test: isolation. No sequence of guest requests (ATTACH, DETACH, MAP, UNMAP, reset,
//! bypass) and host requests (DMA-API users, exclusive owners) lets an endpoint translate
//! through a domain its group is not attached to, or lets a requester translate for a group it
//! does not own.
//!
//! Unlike `model.rs` there is no reference model: after every step, every translation the fast
//! path returns is checked against the model's own published state (`group_attachment`,
//! `mappings`, `dma_owner`, `bypass`), for every endpoint, every requester and a set of IOVAs.
//! The topology is small (five groups, one of two endpoints) and so is the IOVA space, so that
//! domains are shared, moved and reused, and mappings collide, all the time.

use proptest::prelude::*;

use super::super::*;

const PAGE: u64 = 4096;
/// 4 MiB of IOVA space: two page-table levels, two leaf tables in use.
const INPUT_END: u64 = (4 << 20) - 1;
/// Endpoints 3 and 4 share a group; 1, 2, 5 and 6 are alone.
const ENDPOINTS: [EndpointId; 6] = [1, 2, 3, 4, 5, 6];
/// Never in the topology.
const UNKNOWN_ENDPOINT: EndpointId = 99;
/// Cookies the host uses; 0 and `u64::MAX` can never own a group.
const COOKIES: [u64; 4] = [7, 9, 0, u64::MAX];
/// Endpoint 5's reserved region: pages 8 and 9.
const RESERVED: ResvRegion = ResvRegion {
    kind: ResvKind::Reserved,
    start: 8 * PAGE,
    end: 10 * PAGE - 1,
};

fn topology() -> Topology {
    Topology::builder()
        .endpoints(ENDPOINTS)
        .group([3, 4])
        .domain_range(0, 4)
        .input_range(0, INPUT_END)
        .region(5, RESERVED)
        .limits(Limits {
            max_domains: 3,
            max_mappings_per_domain: 6,
            max_mappings: 10,
            max_table_bytes: 1 << 20,
        })
        .build()
        .unwrap()
}

#[derive(Clone, Debug)]
enum Op {
    Attach(DomainId, EndpointId, bool),
    Detach(DomainId, EndpointId),
    /// Domain, first page, pages, physical page, permissions.
    Map(DomainId, u64, u64, u64, Perms),
    /// Domain, first page, pages (0: everything).
    Unmap(DomainId, u64, u64),
    Reset,
    Bypass(bool),
    UseDmaApi(EndpointId),
    UnuseDmaApi(EndpointId),
    Claim(u32, u64),
    Release(u32, u64),
}

/// Pages where mappings land: the first leaf table, and both sides of the 2 MiB boundary.
fn page() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 0u64..16, 2 => 510u64..514, 1 => Just(1023u64)]
}

fn pages() -> impl Strategy<Value = u64> {
    prop_oneof![8 => 1u64..4, 1 => Just(512u64)]
}

fn op() -> impl Strategy<Value = Op> {
    let domain = || prop_oneof![10 => 0u32..3, 1 => 3u32..6];
    let endpoint = || prop_oneof![12 => 1u32..7, 1 => Just(UNKNOWN_ENDPOINT)];
    let cookie = || prop_oneof![4 => Just(7u64), 3 => Just(9u64), 1 => Just(0u64)];
    let group = || 0u32..6;
    prop_oneof![
        10 => (domain(), endpoint(), proptest::bool::weighted(0.2))
            .prop_map(|(d, e, b)| Op::Attach(d, e, b)),
        4 => (domain(), endpoint()).prop_map(|(d, e)| Op::Detach(d, e)),
        12 => (domain(), page(), pages(), 0u64..64, 0u8..8)
            .prop_map(|(d, p, n, phys, f)| Op::Map(d, p, n, phys, Perms::from_bits_truncate(f))),
        4 => (domain(), page(), pages()).prop_map(|(d, p, n)| Op::Unmap(d, p, n)),
        1 => domain().prop_map(|d| Op::Unmap(d, 0, 0)),
        1 => Just(Op::Reset),
        2 => any::<bool>().prop_map(Op::Bypass),
        3 => endpoint().prop_map(Op::UseDmaApi),
        2 => endpoint().prop_map(Op::UnuseDmaApi),
        4 => (group(), cookie()).prop_map(|(g, c)| Op::Claim(g, c)),
        3 => (group(), cookie()).prop_map(|(g, c)| Op::Release(g, c)),
    ]
}

/// What the host face granted, counted from successful calls only: DMA-API users per group.
#[derive(Debug)]
struct Host {
    api_users: Vec<u32>,
}

fn apply(m: &mut Iommu, host: &mut Host, op: &Op) {
    let kind = |bypass| {
        if bypass {
            DomainKind::Identity
        } else {
            DomainKind::Paging
        }
    };
    // Results are deliberately ignored: refused requests are part of the hostile input, and
    // model.rs checks the statuses. Only successful host-face calls are recorded.
    match *op {
        Op::Attach(d, e, b) => {
            let _ = m.attach(d, e, kind(b));
        }
        Op::Detach(d, e) => {
            let _ = m.detach(d, e);
        }
        Op::Map(d, p, n, phys, perms) => {
            let _ = m.map(d, p * PAGE, (p + n) * PAGE - 1, phys * PAGE, perms);
        }
        Op::Unmap(d, _, 0) => {
            let _ = m.unmap(d, 0, u64::MAX);
        }
        Op::Unmap(d, p, n) => {
            let _ = m.unmap(d, p * PAGE, (p + n) * PAGE - 1);
        }
        Op::Reset => m.reset(),
        Op::Bypass(b) => m.set_bypass(b),
        Op::UseDmaApi(e) => {
            if m.use_dma_api(e).is_ok() {
                host.api_users[m.group(e).unwrap().0 as usize] += 1;
            }
        }
        Op::UnuseDmaApi(e) => {
            if m.unuse_dma_api(e).is_ok() {
                host.api_users[m.group(e).unwrap().0 as usize] -= 1;
            }
        }
        Op::Claim(g, c) => {
            let _ = m.claim_dma_owner(GroupId(g), c);
        }
        Op::Release(g, c) => {
            let _ = m.release_dma_owner(GroupId(g), c);
        }
    }
}

/// Whether `requester` may translate for group `g`, from the model's published host face.
fn owns(m: &Iommu, host: &Host, g: GroupId, requester: Requester) -> bool {
    match requester {
        Requester::Owner(cookie) => m.dma_owner(g) == Some(cookie),
        Requester::DmaApi => m.dma_owner(g).is_none() && host.api_users[g.0 as usize] > 0,
    }
}

/// The model's published state, read once per check: per group, its domain with the domain's
/// kind and mappings.
struct Published {
    groups: Vec<Option<(DomainId, DomainKind, Vec<Mapping>)>>,
}

impl Published {
    fn read(m: &Iommu) -> Result<Self, TestCaseError> {
        let domains = m.domains();
        let mut groups = Vec::new();
        for g in 0..m.topology().group_count() as u32 {
            let (domain, _) = m.group_attachment(GroupId(g)).expect("a group's state");
            let Some(d) = domain else {
                groups.push(None);
                continue;
            };
            let info = domains.iter().find(|i| i.id == d);
            prop_assert!(info.is_some(), "group {} is on dead domain {}", g, d);
            let info = info.unwrap();
            prop_assert!(
                info.groups.contains(&GroupId(g)),
                "{:?} lacks group {}",
                info,
                g
            );
            let mappings = match info.kind {
                DomainKind::Paging => m.mappings(d).expect("a paging domain's mappings"),
                DomainKind::Identity => Vec::new(),
            };
            groups.push(Some((d, info.kind, mappings)));
        }
        Ok(Published { groups })
    }

    /// What a translation must be, from the group's current attachment and that domain's
    /// mappings: `Ok((gpa, longest len, domain, mmio))` or the fault.
    fn expected(
        &self,
        m: &Iommu,
        endpoint: EndpointId,
        iova: u64,
        access: Access,
    ) -> Result<(u64, u64, Option<DomainId>, bool), Fault> {
        let g = m.group(endpoint).map_err(|_| Fault::UnknownEndpoint)?;
        let identity = |domain| {
            let regions = &m.topology().endpoint(endpoint).unwrap().regions;
            if regions.iter().any(|r| r.start <= iova && iova <= r.end) {
                Err(Fault::Reserved)
            } else {
                Ok((iova, u64::MAX, domain, false))
            }
        };
        let Some((d, kind, mappings)) = &self.groups[g.0 as usize] else {
            return if m.bypass() {
                identity(None)
            } else {
                Err(Fault::NoDomain)
            };
        };
        if *kind == DomainKind::Identity {
            return identity(Some(*d));
        }
        if iova > INPUT_END {
            return Err(Fault::OutOfRange);
        }
        let hit = mappings
            .iter()
            .find(|mp| mp.virt_start <= iova && iova <= mp.virt_end)
            .ok_or(Fault::Unmapped)?;
        let needed = match access {
            Access::Read => Perms::READ,
            Access::Write => Perms::WRITE,
        };
        if !hit.perms.intersects(needed) {
            return Err(Fault::Permission);
        }
        Ok((
            hit.phys_start + (iova - hit.virt_start),
            hit.virt_end - iova + 1,
            Some(*d),
            hit.perms.contains(Perms::MMIO),
        ))
    }
}

/// IOVAs probed after every step: every page a mapping can start on, offsets inside pages,
/// both sides of the 2 MiB boundary, the reserved region, the last page and past the end.
fn probes() -> Vec<u64> {
    let mut v: Vec<u64> = (0..18).map(|p| p * PAGE + (p % 3) * 0x7f8).collect();
    v.extend([
        509 * PAGE,
        511 * PAGE + 0xfff,
        512 * PAGE,
        515 * PAGE + 8,
        1023 * PAGE,
        INPUT_END,
        INPUT_END + 1,
    ]);
    v
}

fn check_isolation(m: &Iommu, host: &Host, t: &Translator) -> Result<(), TestCaseError> {
    let published = Published::read(m)?;
    let requesters: Vec<Requester> = std::iter::once(Requester::DmaApi)
        .chain(COOKIES.iter().map(|&c| Requester::Owner(c)))
        .collect();
    for (k, iova) in probes().into_iter().enumerate() {
        let access = if k % 2 == 0 {
            Access::Read
        } else {
            Access::Write
        };
        for requester in &requesters {
            prop_assert_eq!(
                t.translate(*requester, UNKNOWN_ENDPOINT, iova, 1, access),
                Err(Fault::UnknownEndpoint)
            );
        }
        for &e in &ENDPOINTS {
            let g = m.group(e).unwrap();
            let want = published.expected(m, e, iova, access);
            for &requester in &requesters {
                let got = t.translate(requester, e, iova, PAGE, access);
                if !owns(m, host, g, requester) {
                    // A requester that does not own the group learns nothing, whatever the
                    // group is attached to: right after a release, after a move, ever.
                    prop_assert_eq!(
                        got,
                        Err(Fault::NotOwner),
                        "{:?} translated for endpoint {} (group {:?}, owner {:?}) at {:#x}",
                        requester,
                        e,
                        g,
                        m.dma_owner(g),
                        iova
                    );
                    continue;
                }
                match (got, want) {
                    (Ok(tr), Ok((gpa, longest, domain, mmio))) => {
                        // The domain that translated is the group's current domain (None only
                        // in bypass), and the address is what that domain's mapping says.
                        prop_assert_eq!(tr.domain, domain, "endpoint {} at {:#x}", e, iova);
                        prop_assert_eq!(tr.gpa, gpa, "endpoint {} at {:#x}", e, iova);
                        prop_assert_eq!(tr.mmio, mmio);
                        prop_assert!(tr.len >= 1 && tr.len <= longest.min(PAGE));
                    }
                    (got, want) => prop_assert_eq!(
                        got.map(|tr| (tr.gpa, tr.domain)),
                        want.map(|w| (w.0, w.2)),
                        "endpoint {} ({:?}) at {:#x}",
                        e,
                        requester,
                        iova
                    ),
                }
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn no_endpoint_reaches_another_groups_domain(ops in proptest::collection::vec(op(), 1..64)) {
        let mut m = Iommu::new(topology());
        let mut host = Host { api_users: vec![0; m.topology().group_count()] };
        // One translator lives across the whole sequence, one is created after every step.
        let t = m.translator();
        check_isolation(&m, &host, &t)?;
        for op in &ops {
            apply(&mut m, &mut host, op);
            check_isolation(&m, &host, &t)?;
            check_isolation(&m, &host, &m.translator())?;
        }
    }
}
