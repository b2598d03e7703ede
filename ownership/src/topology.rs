// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The platform the device describes: endpoints, the groups they form, their reserved regions,
//! the page-size mask, the input and domain ranges, and the resource limits.
//!
//! A topology is fixed for the life of an [`Iommu`](crate::Iommu): the guest cannot change it.

use std::collections::BTreeMap;

use thiserror::Error;

/// An endpoint ID as the guest uses it in ATTACH, DETACH and PROBE (for PCI: the requester ID).
pub type EndpointId = u32;
/// A domain ID as the guest chooses it in ATTACH.
pub type DomainId = u32;

/// Index of a group in the topology (groups are numbered in the order they were declared,
/// explicit groups first, then one singleton group per remaining endpoint, by endpoint ID).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u32);

/// The smallest granule the page tables support.
pub(crate) const MIN_GRANULE: u64 = 4096;

/// x86's MSI doorbell window, reported as a RESV_MEM MSI region by default.
pub const X86_MSI_REGION: ResvRegion = ResvRegion {
    kind: ResvKind::Msi,
    start: 0xfee0_0000,
    end: 0xfeef_ffff,
};

/// Subtype of a reserved region (spec: RESV_MEM subtypes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResvKind {
    /// Addresses the driver must not map (VIRTIO_IOMMU_RESV_MEM_T_RESERVED).
    Reserved,
    /// An MSI doorbell (VIRTIO_IOMMU_RESV_MEM_T_MSI).
    Msi,
}

/// A reserved IOVA region of an endpoint, `[start, end]` inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvRegion {
    pub kind: ResvKind,
    pub start: u64,
    pub end: u64,
}

impl ResvRegion {
    /// Whether `[start, end]` intersects this region.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        self.start <= end && start <= self.end
    }
}

/// Resource caps. Every one is answered with NOMEM when reached: a guest can never make the
/// device allocate without bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Domains alive at once.
    pub max_domains: u32,
    /// Mappings (one per successful MAP) in one domain.
    pub max_mappings_per_domain: u64,
    /// Mappings over all domains.
    pub max_mappings: u64,
    /// Page-table memory over all domains, in bytes (4 KiB per table node). The page tables
    /// never use more than `pagetable::MAX_NODES` nodes (512 GiB), whatever this says.
    pub max_table_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_domains: 1024,
            max_mappings_per_domain: 1 << 20,
            max_mappings: 1 << 22,
            max_table_bytes: 256 << 20,
        }
    }
}

/// What is wrong with a topology.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TopologyError {
    #[error("page_size_mask is zero")]
    EmptyPageSizeMask,
    #[error("granule {0:#x} is below the 4 KiB the page tables support")]
    GranuleTooSmall(u64),
    #[error("input range {start:#x}-{end:#x} is empty")]
    EmptyInputRange { start: u64, end: u64 },
    #[error("domain range {start}-{end} is empty")]
    EmptyDomainRange { start: u32, end: u32 },
    #[error("no endpoints")]
    NoEndpoints,
    #[error("endpoint {0:#x} is declared twice")]
    DuplicateEndpoint(EndpointId),
    #[error("group {0} is empty")]
    EmptyGroup(usize),
    #[error("endpoint {0:#x} of a group is not a declared endpoint")]
    GroupMemberUnknown(EndpointId),
    #[error("endpoint {0:#x} is in two groups")]
    EndpointInTwoGroups(EndpointId),
    #[error("reserved region {start:#x}-{end:#x} is empty")]
    EmptyRegion { start: u64, end: u64 },
    #[error("reserved regions of endpoint {0:#x} overlap (spec R3)")]
    OverlappingRegions(EndpointId),
    #[error("endpoint {0:#x} has more than one MSI region (spec R2)")]
    TwoMsiRegions(EndpointId),
    #[error("reserved region for unknown endpoint {0:#x}")]
    RegionEndpointUnknown(EndpointId),
    #[error("limit {0} must be at least 1")]
    ZeroLimit(&'static str),
    #[error("cannot reserve {0} bytes of address space for page tables")]
    TableMemory(u64),
}

/// One endpoint of the topology.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub group: GroupId,
    /// Reserved regions, sorted by start, non-overlapping.
    pub regions: Vec<ResvRegion>,
}

/// The immutable platform description an [`Iommu`](crate::Iommu) is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    page_size_mask: u64,
    input_start: u64,
    input_end: u64,
    domain_start: u32,
    domain_end: u32,
    endpoints: BTreeMap<EndpointId, EndpointInfo>,
    groups: Vec<Vec<EndpointId>>,
    limits: Limits,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    pub fn page_size_mask(&self) -> u64 {
        self.page_size_mask
    }

    /// The page granule: the lowest set bit of the page-size mask.
    pub fn granule(&self) -> u64 {
        1 << self.page_size_mask.trailing_zeros()
    }

    /// Translatable IOVAs, `(start, end)` inclusive.
    pub fn input_range(&self) -> (u64, u64) {
        (self.input_start, self.input_end)
    }

    /// Valid domain IDs, `(start, end)` inclusive.
    pub fn domain_range(&self) -> (u32, u32) {
        (self.domain_start, self.domain_end)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn endpoint(&self, id: EndpointId) -> Option<&EndpointInfo> {
        self.endpoints.get(&id)
    }

    pub fn endpoints(&self) -> impl Iterator<Item = (EndpointId, &EndpointInfo)> {
        self.endpoints.iter().map(|(id, info)| (*id, info))
    }

    pub fn group_count(&self) -> usize {
        self.groups.len()
    }

    /// The endpoints of a group, sorted.
    pub fn group_members(&self, group: GroupId) -> &[EndpointId] {
        self.groups
            .get(group.0 as usize)
            .map_or(&[][..], Vec::as_slice)
    }

    /// The largest number of reserved regions of any endpoint (sizes PROBE's buffer).
    pub fn max_regions_per_endpoint(&self) -> usize {
        self.endpoints
            .values()
            .map(|e| e.regions.len())
            .max()
            .unwrap_or(0)
    }
}

/// Builds a [`Topology`]; every rule is checked in [`TopologyBuilder::build`].
#[derive(Clone, Debug)]
pub struct TopologyBuilder {
    page_size_mask: u64,
    input_range: (u64, u64),
    domain_range: (u32, u32),
    endpoints: Vec<EndpointId>,
    groups: Vec<Vec<EndpointId>>,
    regions_all: Vec<ResvRegion>,
    regions: Vec<(EndpointId, ResvRegion)>,
    limits: Limits,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        TopologyBuilder {
            page_size_mask: !(MIN_GRANULE - 1),
            input_range: (0, (1 << 48) - 1),
            domain_range: (0, u32::MAX),
            endpoints: Vec::new(),
            groups: Vec::new(),
            regions_all: Vec::new(),
            regions: Vec::new(),
            limits: Limits::default(),
        }
    }
}

impl TopologyBuilder {
    pub fn page_size_mask(mut self, mask: u64) -> Self {
        self.page_size_mask = mask;
        self
    }

    pub fn input_range(mut self, start: u64, end: u64) -> Self {
        self.input_range = (start, end);
        self
    }

    pub fn domain_range(mut self, start: u32, end: u32) -> Self {
        self.domain_range = (start, end);
        self
    }

    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Declares endpoints (each in its own group unless a [`group`](Self::group) names it).
    pub fn endpoints(mut self, ids: impl IntoIterator<Item = EndpointId>) -> Self {
        self.endpoints.extend(ids);
        self
    }

    /// Declares endpoints the platform cannot isolate from each other.
    pub fn group(mut self, ids: impl IntoIterator<Item = EndpointId>) -> Self {
        self.groups.push(ids.into_iter().collect());
        self
    }

    /// A reserved region every endpoint has.
    pub fn region_all(mut self, region: ResvRegion) -> Self {
        self.regions_all.push(region);
        self
    }

    /// A reserved region of one endpoint.
    pub fn region(mut self, endpoint: EndpointId, region: ResvRegion) -> Self {
        self.regions.push((endpoint, region));
        self
    }

    pub fn build(self) -> Result<Topology, TopologyError> {
        if self.page_size_mask == 0 {
            return Err(TopologyError::EmptyPageSizeMask);
        }
        let granule = 1u64 << self.page_size_mask.trailing_zeros();
        if granule < MIN_GRANULE {
            return Err(TopologyError::GranuleTooSmall(granule));
        }
        let (start, end) = self.input_range;
        if start > end {
            return Err(TopologyError::EmptyInputRange { start, end });
        }
        let (dstart, dend) = self.domain_range;
        if dstart > dend {
            return Err(TopologyError::EmptyDomainRange {
                start: dstart,
                end: dend,
            });
        }
        let l = self.limits;
        for (value, name) in [
            (u64::from(l.max_domains), "max_domains"),
            (l.max_mappings_per_domain, "max_mappings_per_domain"),
            (l.max_mappings, "max_mappings"),
            (l.max_table_bytes / 4096, "max_table_bytes"),
        ] {
            if value == 0 {
                return Err(TopologyError::ZeroLimit(name));
            }
        }
        if self.endpoints.is_empty() {
            return Err(TopologyError::NoEndpoints);
        }

        let mut endpoints: BTreeMap<EndpointId, Option<GroupId>> = BTreeMap::new();
        for id in &self.endpoints {
            if endpoints.insert(*id, None).is_some() {
                return Err(TopologyError::DuplicateEndpoint(*id));
            }
        }
        let mut groups: Vec<Vec<EndpointId>> = Vec::new();
        for (index, members) in self.groups.iter().enumerate() {
            if members.is_empty() {
                return Err(TopologyError::EmptyGroup(index));
            }
            let gid = GroupId(groups.len() as u32);
            let mut sorted = members.clone();
            sorted.sort_unstable();
            sorted.dedup();
            for id in &sorted {
                match endpoints.get_mut(id) {
                    None => return Err(TopologyError::GroupMemberUnknown(*id)),
                    Some(Some(_)) => return Err(TopologyError::EndpointInTwoGroups(*id)),
                    Some(slot) => *slot = Some(gid),
                }
            }
            groups.push(sorted);
        }
        for (id, slot) in endpoints.iter_mut() {
            if slot.is_none() {
                *slot = Some(GroupId(groups.len() as u32));
                groups.push(vec![*id]);
            }
        }

        let mut infos: BTreeMap<EndpointId, EndpointInfo> = endpoints
            .into_iter()
            .map(|(id, group)| {
                let group = group.unwrap_or(GroupId(0));
                let regions = self.regions_all.clone();
                (id, EndpointInfo { group, regions })
            })
            .collect();
        for (id, region) in &self.regions {
            infos
                .get_mut(id)
                .ok_or(TopologyError::RegionEndpointUnknown(*id))?
                .regions
                .push(*region);
        }
        for (id, info) in infos.iter_mut() {
            info.regions.sort_by_key(|r| (r.start, r.end));
            for r in &info.regions {
                if r.start > r.end {
                    return Err(TopologyError::EmptyRegion {
                        start: r.start,
                        end: r.end,
                    });
                }
            }
            if info.regions.windows(2).any(|w| w[0].end >= w[1].start) {
                return Err(TopologyError::OverlappingRegions(*id));
            }
            if info
                .regions
                .iter()
                .filter(|r| r.kind == ResvKind::Msi)
                .count()
                > 1
            {
                return Err(TopologyError::TwoMsiRegions(*id));
            }
        }

        Ok(Topology {
            page_size_mask: self.page_size_mask,
            input_start: start,
            input_end: end,
            domain_start: dstart,
            domain_end: dend,
            endpoints: infos,
            groups,
            limits: self.limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn singleton_groups_by_default_explicit_groups_first() {
        let t = Topology::builder()
            .endpoints([8, 1, 2, 3])
            .group([3, 2])
            .build()
            .unwrap();
        assert_eq!(t.group_count(), 3);
        assert_eq!(t.group_members(GroupId(0)), &[2, 3]);
        assert_eq!(t.endpoint(1).unwrap().group, GroupId(1));
        assert_eq!(t.endpoint(8).unwrap().group, GroupId(2));
        assert_eq!(t.group_members(GroupId(9)), &[] as &[u32]);
    }

    #[test]
    fn ranges_of_one_value_are_valid_and_every_setting_is_kept() {
        let t = Topology::builder()
            .endpoints([1])
            .page_size_mask(0x4020_1000)
            .input_range(0x1000, 0x1000)
            .domain_range(7, 7)
            .build()
            .unwrap();
        assert_eq!(t.page_size_mask(), 0x4020_1000);
        assert_eq!(t.granule(), 0x1000);
        assert_eq!(t.input_range(), (0x1000, 0x1000));
        assert_eq!(t.domain_range(), (7, 7));
    }

    #[test]
    fn c1_page_size_mask_must_not_be_zero() {
        let err = Topology::builder().endpoints([1]).page_size_mask(0).build();
        assert_eq!(err, Err(TopologyError::EmptyPageSizeMask));
    }

    #[test]
    fn granule_below_4k_refused() {
        let err = Topology::builder()
            .endpoints([1])
            .page_size_mask(0x800)
            .build();
        assert_eq!(err, Err(TopologyError::GranuleTooSmall(0x800)));
    }

    #[test]
    fn r2_at_most_one_msi_region_per_endpoint() {
        let err = Topology::builder()
            .endpoints([1])
            .region_all(X86_MSI_REGION)
            .region(
                1,
                ResvRegion {
                    kind: ResvKind::Msi,
                    start: 0x1000,
                    end: 0x1fff,
                },
            )
            .build();
        assert_eq!(err, Err(TopologyError::TwoMsiRegions(1)));
    }

    #[test]
    fn r3_regions_of_an_endpoint_do_not_overlap() {
        let err = Topology::builder()
            .endpoints([1])
            .region_all(X86_MSI_REGION)
            .region(
                1,
                ResvRegion {
                    kind: ResvKind::Reserved,
                    start: 0xfeef_f000,
                    end: 0xfef0_ffff,
                },
            )
            .build();
        assert_eq!(err, Err(TopologyError::OverlappingRegions(1)));
    }

    #[test]
    fn structural_errors() {
        let b = || Topology::builder().endpoints([1, 2]);
        assert_eq!(Topology::builder().build(), Err(TopologyError::NoEndpoints));
        assert_eq!(
            b().endpoints([2]).build(),
            Err(TopologyError::DuplicateEndpoint(2))
        );
        assert_eq!(
            b().group([1, 7]).build(),
            Err(TopologyError::GroupMemberUnknown(7))
        );
        assert_eq!(
            b().group([1]).group([1, 2]).build(),
            Err(TopologyError::EndpointInTwoGroups(1))
        );
        assert_eq!(
            b().group(Vec::new()).build(),
            Err(TopologyError::EmptyGroup(0))
        );
        assert_eq!(
            b().input_range(5, 4).build(),
            Err(TopologyError::EmptyInputRange { start: 5, end: 4 })
        );
        assert_eq!(
            b().domain_range(5, 4).build(),
            Err(TopologyError::EmptyDomainRange { start: 5, end: 4 })
        );
        assert_eq!(
            b().region(
                9,
                ResvRegion {
                    kind: ResvKind::Reserved,
                    start: 0,
                    end: 1
                }
            )
            .build(),
            Err(TopologyError::RegionEndpointUnknown(9))
        );
        let limits = Limits {
            max_domains: 0,
            ..Limits::default()
        };
        assert_eq!(
            b().limits(limits).build(),
            Err(TopologyError::ZeroLimit("max_domains"))
        );
    }
}
