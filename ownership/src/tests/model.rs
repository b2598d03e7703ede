//! Property test: random sequences of guest and host operations against a small, obviously
//! correct reference model (BTreeMaps and sets, no concurrency, no page tables). After every
//! step: the states agree, every endpoint of a group translates through the same domain, no
//! domain lives without an attached group, mappings never overlap, translate agrees with the
//! reference, and a refused operation changed nothing.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::super::*;

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

#[derive(Clone, Debug, PartialEq, Eq)]
enum RefOwner {
    None,
    Api(u32),
    User(u64, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RefGroup {
    domain: Option<DomainId>,
    attached: BTreeSet<EndpointId>,
    owner: RefOwner,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct RefDomain {
    kind: DomainKind,
    groups: BTreeSet<GroupId>,
    /// start -> mapping
    maps: BTreeMap<u64, Mapping>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Reference {
    topo: Topology,
    groups: Vec<RefGroup>,
    domains: BTreeMap<DomainId, RefDomain>,
    bypass: bool,
}

impl Reference {
    fn new(topo: Topology) -> Self {
        let groups = (0..topo.group_count())
            .map(|_| RefGroup {
                domain: None,
                attached: BTreeSet::new(),
                owner: RefOwner::None,
            })
            .collect();
        Reference {
            topo,
            groups,
            domains: BTreeMap::new(),
            bypass: false,
        }
    }

    fn group(&self, e: EndpointId) -> Result<GroupId, Error> {
        self.topo
            .endpoint(e)
            .map(|i| i.group)
            .ok_or(Error::UnknownEndpoint(e))
    }

    fn regions(&self, e: EndpointId) -> &[ResvRegion] {
        &self.topo.endpoint(e).unwrap().regions
    }

    fn leave(&mut self, d: DomainId, g: GroupId) {
        let dom = self.domains.get_mut(&d).unwrap();
        dom.groups.remove(&g);
        if dom.groups.is_empty() {
            self.domains.remove(&d);
        }
    }

    fn attach(&mut self, d: DomainId, e: EndpointId, kind: DomainKind) -> Result<(), Error> {
        let g = self.group(e)?;
        let (lo, hi) = self.topo.domain_range();
        if d < lo || d > hi {
            return Err(Error::DomainOutOfRange(d));
        }
        let gi = g.0 as usize;
        if self.groups[gi].domain == Some(d) {
            if self.domains[&d].kind != kind {
                return Err(Error::KindMismatch(d));
            }
            self.groups[gi].attached.insert(e);
            return Ok(());
        }
        match self.domains.get(&d) {
            Some(dom) if dom.kind != kind => return Err(Error::KindMismatch(d)),
            Some(dom) => {
                for &member in self.topo.group_members(g) {
                    for r in self.regions(member) {
                        if dom
                            .maps
                            .values()
                            .any(|m| r.overlaps(m.virt_start, m.virt_end))
                        {
                            return Err(Error::Incompatible {
                                domain: d,
                                endpoint: member,
                            });
                        }
                    }
                }
            }
            None => {
                let dying = self.groups[gi]
                    .domain
                    .is_some_and(|old| self.domains[&old].groups.len() == 1);
                if self.domains.len() - usize::from(dying) >= MAX_DOMAINS as usize {
                    return Err(Error::TooManyDomains);
                }
            }
        }
        self.domains
            .entry(d)
            .or_insert(RefDomain {
                kind,
                groups: BTreeSet::new(),
                maps: BTreeMap::new(),
            })
            .groups
            .insert(g);
        let old = self.groups[gi].domain.replace(d);
        self.groups[gi].attached.insert(e);
        if let Some(old) = old {
            self.leave(old, g);
        }
        Ok(())
    }

    fn detach(&mut self, d: DomainId, e: EndpointId) -> Result<(), Error> {
        let g = self.group(e)?;
        let group = &mut self.groups[g.0 as usize];
        if group.domain != Some(d) || !group.attached.contains(&e) {
            return Err(Error::NotAttached {
                domain: d,
                endpoint: e,
            });
        }
        group.attached.remove(&e);
        if group.attached.is_empty() {
            group.domain = None;
            self.leave(d, g);
        }
        Ok(())
    }

    fn paging(&self, d: DomainId) -> Result<&RefDomain, Error> {
        let dom = self.domains.get(&d).ok_or(Error::UnknownDomain(d))?;
        if dom.kind == DomainKind::Identity {
            return Err(Error::IdentityDomain(d));
        }
        Ok(dom)
    }

    fn map(&mut self, d: DomainId, s: u64, e: u64, p: u64, perms: u64) -> Result<(), Error> {
        let dom = self.paging(d)?;
        if e < s {
            return Err(Error::InvalidRange { start: s, end: e });
        }
        if s % PAGE != 0 || p % PAGE != 0 || (e % PAGE) != PAGE - 1 {
            return Err(Error::Misaligned {
                start: s,
                end: e,
                phys: p,
            });
        }
        if e > INPUT_END || p.checked_add(e - s).is_none() {
            return Err(Error::OutOfRange { start: s, end: e });
        }
        for g in &dom.groups {
            for &member in self.topo.group_members(*g) {
                if self.regions(member).iter().any(|r| r.overlaps(s, e)) {
                    return Err(Error::ReservedOverlap { start: s, end: e });
                }
            }
        }
        if dom
            .maps
            .values()
            .any(|m| m.virt_start <= e && s <= m.virt_end)
        {
            return Err(Error::Overlap { start: s, end: e });
        }
        let total: usize = self.domains.values().map(|d| d.maps.len()).sum();
        if dom.maps.len() as u64 >= MAX_PER_DOMAIN || total as u64 >= MAX_MAPPINGS {
            return Err(Error::TooManyMappings);
        }
        let mapping = Mapping {
            virt_start: s,
            virt_end: e,
            phys_start: p,
            perms,
        };
        self.domains.get_mut(&d).unwrap().maps.insert(s, mapping);
        Ok(())
    }

    fn unmap(&mut self, d: DomainId, s: u64, e: u64) -> Result<u64, Error> {
        let dom = self.paging(d)?;
        if e < s {
            return Err(Error::InvalidRange { start: s, end: e });
        }
        let hit: Vec<Mapping> = dom
            .maps
            .values()
            .filter(|m| m.virt_start <= e && s <= m.virt_end)
            .copied()
            .collect();
        if hit.iter().any(|m| m.virt_start < s || m.virt_end > e) {
            return Err(Error::WouldSplit { start: s, end: e });
        }
        let dom = self.domains.get_mut(&d).unwrap();
        for m in &hit {
            dom.maps.remove(&m.virt_start);
        }
        Ok(hit.len() as u64)
    }

    fn reset(&mut self) {
        for g in &mut self.groups {
            g.domain = None;
            g.attached.clear();
        }
        self.domains.clear();
    }

    fn owner_group(&mut self, g: GroupId) -> Result<&mut RefGroup, Error> {
        self.groups
            .get_mut(g.0 as usize)
            .ok_or(Error::UnknownGroup(g))
    }

    fn use_api(&mut self, e: EndpointId) -> Result<(), Error> {
        let g = self.group(e)?;
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::User(..) => return Err(Error::Busy(g)),
            RefOwner::None => RefOwner::Api(1),
            RefOwner::Api(n) => RefOwner::Api(n + 1),
        };
        Ok(())
    }

    fn unuse_api(&mut self, e: EndpointId) -> Result<(), Error> {
        let g = self.group(e)?;
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::Api(1) => RefOwner::None,
            RefOwner::Api(n) => RefOwner::Api(n - 1),
            _ => return Err(Error::NotInUse(g)),
        };
        Ok(())
    }

    fn claim(&mut self, g: GroupId, cookie: u64) -> Result<(), Error> {
        if cookie == 0 || cookie == u64::MAX {
            return Err(Error::InvalidOwner);
        }
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::None => RefOwner::User(cookie, 1),
            RefOwner::User(c, n) if c == cookie => RefOwner::User(c, n + 1),
            RefOwner::User(..) => return Err(Error::Busy(g)),
            RefOwner::Api(_) => return Err(Error::InUse(g)),
        };
        Ok(())
    }

    fn release(&mut self, g: GroupId, cookie: u64) -> Result<(), Error> {
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::User(c, 1) if c == cookie => RefOwner::None,
            RefOwner::User(c, n) if c == cookie => RefOwner::User(c, n - 1),
            _ => return Err(Error::NotOwner(g)),
        };
        Ok(())
    }

    /// The requester allowed to translate for the endpoint's group (DmaApi if nobody is).
    fn requester(&self, e: EndpointId) -> Requester {
        match self.group(e).map(|g| &self.groups[g.0 as usize].owner) {
            Ok(RefOwner::User(c, _)) => Requester::Owner(*c),
            _ => Requester::DmaApi,
        }
    }

    /// Expected translation: Ok((gpa, max_len, domain, mmio)).
    fn translate(
        &self,
        r: Requester,
        e: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<(u64, u64, Option<DomainId>, bool), Fault> {
        let g = self.group(e).map_err(|_| Fault::UnknownEndpoint)?;
        let group = &self.groups[g.0 as usize];
        let allowed = match (&group.owner, r) {
            (RefOwner::Api(_), Requester::DmaApi) => true,
            (RefOwner::User(c, _), Requester::Owner(x)) => *c == x,
            _ => false,
        };
        if !allowed {
            return Err(Fault::NotOwner);
        }
        let identity = |domain| {
            if self
                .regions(e)
                .iter()
                .any(|r| r.start <= iova && iova <= r.end)
            {
                return Err(Fault::Reserved);
            }
            Ok((iova, len, domain, false))
        };
        match group.domain {
            None if self.bypass => identity(None),
            None => Err(Fault::NoDomain),
            Some(d) if self.domains[&d].kind == DomainKind::Identity => identity(Some(d)),
            Some(d) => {
                if iova > INPUT_END {
                    return Err(Fault::OutOfRange);
                }
                let m = self.domains[&d]
                    .maps
                    .values()
                    .find(|m| m.virt_start <= iova && iova <= m.virt_end)
                    .ok_or(Fault::Unmapped)?;
                let need = match access {
                    Access::Read => PERM_READ,
                    Access::Write => PERM_WRITE,
                };
                if m.perms & need == 0 {
                    return Err(Fault::Permission);
                }
                let max = len.min(m.virt_end - iova + 1);
                Ok((
                    m.phys_start + (iova - m.virt_start),
                    max,
                    Some(d),
                    m.perms & PERM_MMIO != 0,
                ))
            }
        }
    }
}

#[derive(Clone, Debug)]
enum Op {
    Attach(DomainId, EndpointId, bool),
    Detach(DomainId, EndpointId),
    Map(DomainId, u64, u64, u64, u64),
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
        12 => (domain(), iova(), length(), phys(), 0u64..8).prop_map(|(d, s, l, p, f)| {
            Op::Map(d, s, s.saturating_add(l - 1), p, f << 2)
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

/// Everything observable about the model, for "a refused operation changed nothing".
#[derive(Debug, PartialEq)]
struct Snapshot {
    domains: Vec<DomainInfo>,
    mappings: Vec<Vec<Mapping>>,
    groups: Vec<Option<(Option<DomainId>, Vec<EndpointId>)>>,
    owners: Vec<Option<u64>>,
    bypass: bool,
    stats_mappings: u64,
}

fn snapshot(m: &Iommu) -> Snapshot {
    let domains = m.domains();
    let mappings = domains
        .iter()
        .map(|d| m.mappings(d.id).unwrap_or_default())
        .collect();
    let groups = (0..4).map(|g| m.group_attachment(GroupId(g))).collect();
    let owners = (0..4).map(|g| m.dma_owner(GroupId(g))).collect();
    Snapshot {
        domains,
        mappings,
        groups,
        owners,
        bypass: m.bypass(),
        stats_mappings: m.stats().mappings,
    }
}

fn check_translation(
    got: Result<Translation, Fault>,
    want: Result<(u64, u64, Option<DomainId>, bool), Fault>,
    iova: u64,
    len: u64,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Err(a), Err(b)) => prop_assert_eq!(a, b),
        (Ok(t), Ok((gpa, max, domain, mmio))) => {
            prop_assert_eq!(t.gpa, gpa);
            prop_assert_eq!(t.domain, domain);
            prop_assert_eq!(t.mmio, mmio);
            prop_assert!(t.len <= max, "len {} beyond the mapping ({})", t.len, max);
            let to_page_end = PAGE - iova % PAGE;
            prop_assert!(
                t.len >= len.min(to_page_end).min(max),
                "len {} too short",
                t.len
            );
        }
        (got, want) => prop_assert!(false, "translate({iova:#x}): got {got:?}, want {want:?}"),
    }
    Ok(())
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
        INPUT_END - 7,
    ];
    for g in 0..r.groups.len() as u32 {
        let members = r.topo.group_members(GroupId(g));
        for (k, &iova) in probes.iter().enumerate() {
            let access = if k % 2 == 0 {
                Access::Read
            } else {
                Access::Write
            };
            let results: Vec<_> = members
                .iter()
                .map(|&e| t.translate(r.requester(e), e, iova, 1, access))
                .collect();
            for (&e, got) in members.iter().zip(&results) {
                let want = r.translate(r.requester(e), e, iova, 1, access);
                check_translation(*got, want, iova, 1)?;
            }
            prop_assert!(
                results.windows(2).all(|w| w[0] == w[1]),
                "endpoints of group {g} disagree at {iova:#x}: {results:?}"
            );
        }
    }
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
            )?;
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
        // Tearing everything down leaves no table memory behind but nothing else.
        m.reset();
        prop_assert_eq!(m.stats().table_bytes, 0);
    }
}
