// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A small, obviously correct reference for [`crate::Iommu`]: BTreeMaps and sets, no
//! concurrency, no page tables; the granule, input range, domain range and limits come from the
//! topology. The property tests and the fuzz targets check the model against it step by step.
//! Only built for tests and with the `reference` feature.

use std::collections::{BTreeMap, BTreeSet};

use crate::pagetable;
use crate::{
    Access, Dma, DomainId, DomainInfo, DomainKind, EndpointId, Error, Fault, GroupId, Iommu,
    Mapping, Perms, Requester, ResvRegion, Topology, Translation, Translator,
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefOwner {
    None,
    Api(u32),
    User(u64, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefGroup {
    pub domain: Option<DomainId>,
    pub attached: BTreeSet<EndpointId>,
    pub owner: RefOwner,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefDomain {
    pub kind: DomainKind,
    pub groups: BTreeSet<GroupId>,
    /// start -> mapping
    pub maps: BTreeMap<u64, Mapping>,
}

/// An expected translation: the length may stop short (at a page-table leaf's end), but not
/// below `min_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Want {
    pub gpa: u64,
    pub max_len: u64,
    pub min_len: u64,
    pub domain: Option<DomainId>,
    pub mmio: bool,
}

pub type Expected = Result<Want, Fault>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub topo: Topology,
    pub groups: Vec<RefGroup>,
    pub domains: BTreeMap<DomainId, RefDomain>,
    pub bypass: bool,
}

impl Reference {
    pub fn new(topo: Topology) -> Self {
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

    pub fn group(&self, e: EndpointId) -> Result<GroupId, Error> {
        self.topo
            .endpoint(e)
            .map(|i| i.group)
            .ok_or(Error::UnknownEndpoint(e))
    }

    pub fn regions(&self, e: EndpointId) -> &[ResvRegion] {
        self.topo.endpoint(e).map_or(&[], |i| &i.regions)
    }

    fn leave(&mut self, d: DomainId, g: GroupId) {
        let dom = self.domains.get_mut(&d).expect("group on a dead domain");
        dom.groups.remove(&g);
        if dom.groups.is_empty() {
            self.domains.remove(&d);
        }
    }

    pub fn attach(&mut self, d: DomainId, e: EndpointId, kind: DomainKind) -> Result<(), Error> {
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
                // The group's current domain dies with the move if no other group uses it:
                // it does not count against the cap (c9546ba).
                let dying = self.groups[gi]
                    .domain
                    .is_some_and(|old| self.domains[&old].groups.len() == 1);
                if self.domains.len() - usize::from(dying)
                    >= self.topo.limits().max_domains as usize
                {
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

    pub fn detach(&mut self, d: DomainId, e: EndpointId) -> Result<(), Error> {
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

    pub fn map(&mut self, d: DomainId, s: u64, e: u64, p: u64, perms: Perms) -> Result<(), Error> {
        let page = self.topo.granule();
        let (first, last) = self.topo.input_range();
        let limits = self.topo.limits();
        let dom = self.paging(d)?;
        if e < s {
            return Err(Error::InvalidRange { start: s, end: e });
        }
        if s % page != 0 || p % page != 0 || (e % page) != page - 1 {
            return Err(Error::Misaligned {
                start: s,
                end: e,
                phys: p,
            });
        }
        if s < first || e > last || p.checked_add(e - s).is_none() {
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
        if dom.maps.len() as u64 >= limits.max_mappings_per_domain
            || total as u64 >= limits.max_mappings
        {
            return Err(Error::TooManyMappings);
        }
        let mapping = Mapping {
            virt_start: s,
            virt_end: e,
            phys_start: p,
            perms: perms & Perms::all(),
        };
        self.domains
            .get_mut(&d)
            .expect("checked above")
            .maps
            .insert(s, mapping);
        Ok(())
    }

    pub fn unmap(&mut self, d: DomainId, s: u64, e: u64) -> Result<u64, Error> {
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
        let dom = self.domains.get_mut(&d).expect("checked above");
        for m in &hit {
            dom.maps.remove(&m.virt_start);
        }
        Ok(hit.len() as u64)
    }

    pub fn probe(&self, e: EndpointId) -> Result<&[ResvRegion], Error> {
        self.topo
            .endpoint(e)
            .map(|i| i.regions.as_slice())
            .ok_or(Error::UnknownEndpoint(e))
    }

    pub fn reset(&mut self) {
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

    pub fn use_api(&mut self, e: EndpointId) -> Result<(), Error> {
        let g = self.group(e)?;
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::User(..) => return Err(Error::Busy(g)),
            RefOwner::None => RefOwner::Api(1),
            RefOwner::Api(n) => RefOwner::Api(n.saturating_add(1)),
        };
        Ok(())
    }

    pub fn unuse_api(&mut self, e: EndpointId) -> Result<(), Error> {
        let g = self.group(e)?;
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::Api(1) => RefOwner::None,
            RefOwner::Api(n) => RefOwner::Api(n - 1),
            _ => return Err(Error::NotInUse(g)),
        };
        Ok(())
    }

    pub fn claim(&mut self, g: GroupId, cookie: u64) -> Result<(), Error> {
        if cookie == 0 || cookie == u64::MAX {
            return Err(Error::InvalidOwner);
        }
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::None => RefOwner::User(cookie, 1),
            RefOwner::User(c, n) if c == cookie => RefOwner::User(c, n.saturating_add(1)),
            RefOwner::User(..) => return Err(Error::Busy(g)),
            RefOwner::Api(_) => return Err(Error::InUse(g)),
        };
        Ok(())
    }

    pub fn release(&mut self, g: GroupId, cookie: u64) -> Result<(), Error> {
        let group = self.owner_group(g)?;
        group.owner = match group.owner {
            RefOwner::User(c, 1) if c == cookie => RefOwner::None,
            RefOwner::User(c, n) if c == cookie => RefOwner::User(c, n - 1),
            _ => return Err(Error::NotOwner(g)),
        };
        Ok(())
    }

    /// The exclusive owner's cookie, if any.
    pub fn owner(&self, g: GroupId) -> Option<u64> {
        match self.groups.get(g.0 as usize)?.owner {
            RefOwner::User(c, _) => Some(c),
            _ => None,
        }
    }

    /// The requester allowed to translate for the endpoint's group (DmaApi if nobody is).
    pub fn requester(&self, e: EndpointId) -> Requester {
        match self.group(e).map(|g| &self.groups[g.0 as usize].owner) {
            Ok(RefOwner::User(c, _)) => Requester::Owner(*c),
            _ => Requester::DmaApi,
        }
    }

    /// The expected translation of `[iova, iova + len)`.
    pub fn translate(
        &self,
        r: Requester,
        e: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Expected {
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
            let regions = self.regions(e);
            if regions.iter().any(|r| r.start <= iova && iova <= r.end) {
                return Err(Fault::Reserved);
            }
            // Up to the next reserved region; the model may stop one byte short of the top
            // of the address space, but returns at least one byte.
            let max_len = regions
                .iter()
                .filter(|r| r.start > iova)
                .fold(len, |l, r| l.min(r.start - iova));
            let min_len = max_len.min(u64::MAX - iova).max(1.min(len));
            Ok(Want {
                gpa: iova,
                max_len,
                min_len,
                domain,
                mmio: false,
            })
        };
        let (first, last) = self.topo.input_range();
        match group.domain {
            None if self.bypass => identity(None),
            None => Err(Fault::NoDomain),
            Some(d) if self.domains[&d].kind == DomainKind::Identity => identity(Some(d)),
            Some(d) => {
                if iova < first || iova > last {
                    return Err(Fault::OutOfRange);
                }
                let m = self.domains[&d]
                    .maps
                    .values()
                    .find(|m| m.virt_start <= iova && iova <= m.virt_end)
                    .ok_or(Fault::Unmapped)?;
                if !m.perms.allows(access) {
                    return Err(Fault::Permission);
                }
                let max_len = len.min(m.virt_end - iova + 1);
                // Page-table leaves are at least 4 KiB.
                let to_page_end = 4096 - iova % 4096;
                Ok(Want {
                    gpa: m.phys_start + (iova - m.virt_start),
                    max_len,
                    min_len: max_len.min(to_page_end),
                    domain: Some(d),
                    mmio: m.perms.contains(Perms::MMIO),
                })
            }
        }
    }
}

/// Everything observable about the model, for "a refused operation changed nothing".
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub domains: Vec<DomainInfo>,
    pub mappings: Vec<Vec<Mapping>>,
    pub groups: Vec<Option<(Option<DomainId>, Vec<EndpointId>)>>,
    pub owners: Vec<Option<u64>>,
    pub bypass: bool,
    pub stats_domains: u64,
    pub stats_mappings: u64,
}

pub fn snapshot(m: &Iommu) -> Snapshot {
    let domains = m.domains();
    let mappings = domains
        .iter()
        .map(|d| m.mappings(d.id).unwrap_or_default())
        .collect();
    let n = m.topology().group_count() as u32 + 1;
    let groups = (0..n).map(|g| m.group_attachment(GroupId(g))).collect();
    let owners = (0..n).map(|g| m.dma_owner(GroupId(g))).collect();
    let stats = m.stats();
    Snapshot {
        domains,
        mappings,
        groups,
        owners,
        bypass: m.bypass(),
        stats_domains: stats.domains,
        stats_mappings: stats.mappings,
    }
}

/// Whether a translation is what the reference expects: the same fault, or the same GPA,
/// domain and memory type with a length within the expected bounds.
pub fn check_translation(
    got: Result<Translation, Fault>,
    want: Expected,
    iova: u64,
    len: u64,
) -> Result<(), String> {
    match (got, want) {
        (Err(a), Err(b)) if a == b => Ok(()),
        (Ok(t), Ok(w))
            if (t.gpa, t.domain, t.mmio) == (w.gpa, w.domain, w.mmio)
                && w.min_len <= t.len
                && t.len <= w.max_len =>
        {
            Ok(())
        }
        (got, want) => Err(format!(
            "translate({iova:#x}, {len:#x}): got {got:?}, want {want:?}"
        )),
    }
}

/// Translate agrees with the reference for every endpoint at every probe IOVA (reads and
/// writes alternating), and the endpoints of a group agree with each other: they translate
/// through the group's domain with the same answer, except that endpoints with different
/// reserved regions may differ where those regions are bypassed (spec R5).
pub fn check_group_translations(
    r: &Reference,
    t: &Translator,
    probes: &[u64],
) -> Result<(), String> {
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
                check_translation(
                    *got,
                    r.translate(r.requester(e), e, iova, 1, access),
                    iova,
                    1,
                )?;
                if t.group_of(e) != Some(GroupId(g)) {
                    return Err(format!("endpoint {e:#x} is not in group {g}"));
                }
            }
            let answers: Vec<_> = results
                .iter()
                .filter(|r| **r != Err(Fault::Reserved))
                .map(|r| r.map(|t| (t.domain, t.gpa, t.mmio)))
                .collect();
            if !answers.windows(2).all(|w| w[0] == w[1]) {
                return Err(format!(
                    "endpoints of group {g} disagree at {iova:#x}: {results:?}"
                ));
            }
        }
        for &e in members {
            check_batch(r, t, e, probes)?;
        }
    }
    Ok(())
}

/// The batch call answers every access of a batch as one call each would: all `probes`
/// (each read and write, lengths 1 and 3 pages) and an IOVA at the top of the 64-bit space,
/// in a batch one access longer than a walk group.
fn check_batch(r: &Reference, t: &Translator, e: EndpointId, probes: &[u64]) -> Result<(), String> {
    let dmas: Vec<Dma> = [(Access::Read, 1), (Access::Write, 3 * 4096)]
        .into_iter()
        .flat_map(|(access, len)| {
            probes
                .iter()
                .chain([u64::MAX - 7].iter())
                .map(move |&iova| Dma { iova, len, access })
        })
        .cycle()
        .take(pagetable::GROUP + 1)
        .collect();
    let guard = t.read();
    let Ok(view) = guard.endpoint(r.requester(e), e) else {
        return Ok(());
    };
    let mut out = vec![Err(Fault::Unmapped); dmas.len() + 1];
    let done = view.translate_batch(&dmas, &mut out);
    if done != dmas.len() || out[dmas.len()] != Err(Fault::Unmapped) {
        return Err(format!(
            "endpoint {e:#x}: batch answered {done} of {}",
            dmas.len()
        ));
    }
    for (dma, got) in dmas.iter().zip(&out) {
        let want = view.translate(dma.iova, dma.len, dma.access);
        if *got != want {
            return Err(format!(
                "endpoint {e:#x}: batch answered {got:?} for {dma:?}, one call {want:?}"
            ));
        }
    }
    Ok(())
}
