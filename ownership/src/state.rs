// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The guest-programmed state of the model, taken out and put back: what a device-state
//! transfer (migration) and a daemon restart carry.
//!
//! [`GuestState`] is everything the guest's requests built: its domains with their kinds and
//! mappings, and which endpoints of which group it attached to which domain. The host face
//! (DMA owners) is not part of it: owners are processes on this host and claim again after a
//! restart. `bypass` is config space and travels with the rest of the device's config.
//!
//! [`Iommu::restore`] replays a state through the guest-face operations themselves (ATTACH,
//! then MAP), so a state is accepted only if the guest could have built it on this topology
//! with these limits, and it is all or nothing: a refused state leaves the model as it was.

use std::collections::{BTreeMap, BTreeSet};

use crate::{DomainId, DomainKind, EndpointId, Error, GroupId, Iommu, Mapping, Perms};

/// What the guest programmed (see the module documentation).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestState {
    /// Live domains, by increasing ID.
    pub domains: Vec<DomainState>,
    /// One entry per attached group, by increasing group.
    pub attachments: Vec<Attachment>,
}

/// A live domain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DomainState {
    pub id: DomainId,
    pub kind: DomainKind,
    /// The mappings as MAP created them, by increasing IOVA (none for an identity domain).
    pub mappings: Vec<Mapping>,
}

/// A group on a domain, with the endpoints of the group the guest attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    pub domain: DomainId,
    /// Endpoints of one group, by increasing ID.
    pub endpoints: Vec<EndpointId>,
}

impl GuestState {
    /// Mappings over all domains.
    pub fn mapping_count(&self) -> u64 {
        self.domains.iter().map(|d| d.mappings.len() as u64).sum()
    }
}

/// Why a state was refused. The model did not change.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum RestoreError {
    #[error("domains are not listed by increasing ID (domain {0})")]
    DomainOrder(DomainId),
    #[error("domain {0} has no attached group (a domain dies with its last group)")]
    OrphanDomain(DomainId),
    #[error("an attachment names no endpoint")]
    EmptyAttachment,
    #[error("attachment to domain {0}, which is not listed")]
    UnknownDomain(DomainId),
    #[error("endpoints of an attachment are not listed by increasing ID (endpoint {0:#x})")]
    EndpointOrder(EndpointId),
    #[error("endpoints {first:#x} and {other:#x} of one attachment are in different groups")]
    MixedGroups {
        first: EndpointId,
        other: EndpointId,
    },
    #[error("group {0:?} is attached twice")]
    GroupTwice(GroupId),
    #[error("endpoint {0:#x} does not exist in this topology")]
    UnknownEndpoint(EndpointId),
    #[error("identity domain {0} lists mappings")]
    IdentityMappings(DomainId),
    #[error("mapping {start:#x}-{end:#x} of domain {domain} has unknown permission bits")]
    Permissions {
        domain: DomainId,
        start: u64,
        end: u64,
    },
    #[error("ATTACH of endpoint {endpoint:#x} to domain {domain}: {error}")]
    Attach {
        domain: DomainId,
        endpoint: EndpointId,
        error: Error,
    },
    #[error("MAP {start:#x}-{end:#x} in domain {domain}: {error}")]
    Map {
        domain: DomainId,
        start: u64,
        end: u64,
        error: Error,
    },
    #[error("the page tables' address space: {0}")]
    Tables(String),
}

impl Iommu {
    /// What the guest programmed, for [`Iommu::restore`] in this or another process.
    pub fn guest_state(&self) -> GuestState {
        let domains = self
            .domains
            .iter()
            .map(|(&id, d)| DomainState {
                id,
                kind: d.kind,
                mappings: d
                    .root
                    .map(|root| self.table.mappings(&self.shared.tables.arena, root))
                    .unwrap_or_default(),
            })
            .collect();
        let attachments = self
            .groups
            .iter()
            .filter_map(|g| {
                g.domain.map(|domain| Attachment {
                    domain,
                    endpoints: g.attached.iter().copied().collect(),
                })
            })
            .collect();
        GuestState {
            domains,
            attachments,
        }
    }

    /// Replaces what the guest programmed with `state`, as if the guest had sent the ATTACHes
    /// and MAPs that build it after a reset. All or nothing: a refused state leaves the model
    /// as it was. DMA owners and `bypass` are kept.
    ///
    /// A model that holds domains checks the state on a scratch model first (the replay into
    /// itself, after the reset, then cannot fail: same topology, same limits, empty tables);
    /// an empty one replays directly and is reset again if the state is refused.
    pub fn restore(&mut self, state: &GuestState) -> Result<(), RestoreError> {
        self.check_shape(state)?;
        if !self.domains.is_empty() {
            let mut scratch = Iommu::try_new(self.topo.as_ref().clone())
                .map_err(|e| RestoreError::Tables(e.to_string()))?;
            scratch.replay(state)?;
            drop(scratch);
            self.reset();
        }
        let result = self.replay(state);
        if result.is_err() {
            self.reset();
        }
        result
    }

    /// The checks that need no model operation: order, groups, references between entries.
    fn check_shape(&self, state: &GuestState) -> Result<(), RestoreError> {
        let mut kinds = BTreeMap::new();
        let mut last = None;
        for d in &state.domains {
            if last.is_some_and(|l| l >= d.id) {
                return Err(RestoreError::DomainOrder(d.id));
            }
            last = Some(d.id);
            kinds.insert(d.id, d.kind);
            if d.kind == DomainKind::Identity && !d.mappings.is_empty() {
                return Err(RestoreError::IdentityMappings(d.id));
            }
            if let Some(m) = d.mappings.iter().find(|m| !Perms::all().contains(m.perms)) {
                return Err(RestoreError::Permissions {
                    domain: d.id,
                    start: m.virt_start,
                    end: m.virt_end,
                });
            }
        }
        let mut groups = BTreeSet::new();
        let mut used = BTreeSet::new();
        for a in &state.attachments {
            if !kinds.contains_key(&a.domain) {
                return Err(RestoreError::UnknownDomain(a.domain));
            }
            let &first = a.endpoints.first().ok_or(RestoreError::EmptyAttachment)?;
            let group = self
                .group_of(first)
                .map_err(|_| RestoreError::UnknownEndpoint(first))?;
            for w in a.endpoints.windows(2) {
                if w[0] >= w[1] {
                    return Err(RestoreError::EndpointOrder(w[1]));
                }
            }
            for &e in &a.endpoints {
                let g = self
                    .group_of(e)
                    .map_err(|_| RestoreError::UnknownEndpoint(e))?;
                if g != group {
                    return Err(RestoreError::MixedGroups { first, other: e });
                }
            }
            if !groups.insert(group) {
                return Err(RestoreError::GroupTwice(group));
            }
            used.insert(a.domain);
        }
        if let Some(orphan) = kinds.keys().find(|d| !used.contains(d)) {
            return Err(RestoreError::OrphanDomain(*orphan));
        }
        Ok(())
    }

    /// ATTACH every attachment's endpoints, then MAP every mapping, in one batch (one grace
    /// period). Leaves partial state behind on error: the caller resets.
    fn replay(&mut self, state: &GuestState) -> Result<(), RestoreError> {
        let kinds: BTreeMap<DomainId, DomainKind> =
            state.domains.iter().map(|d| (d.id, d.kind)).collect();
        self.begin_batch();
        let result = (|| {
            for a in &state.attachments {
                let kind = kinds[&a.domain];
                for &endpoint in &a.endpoints {
                    self.attach(a.domain, endpoint, kind).map_err(|error| {
                        RestoreError::Attach {
                            domain: a.domain,
                            endpoint,
                            error,
                        }
                    })?;
                }
            }
            for d in &state.domains {
                for m in &d.mappings {
                    self.map(d.id, m.virt_start, m.virt_end, m.phys_start, m.perms)
                        .map_err(|error| RestoreError::Map {
                            domain: d.id,
                            start: m.virt_start,
                            end: m.virt_end,
                            error,
                        })?;
                }
            }
            Ok(())
        })();
        self.end_batch();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        reference::snapshot, Limits, Perms, ResvKind, ResvRegion, Topology, X86_MSI_REGION,
    };

    const PAGE: u64 = 4096;
    const RW: Perms = Perms::RW;

    /// Endpoints 1, 2 alone, 3 and 4 in one group; endpoint 2 reserves pages 16-17.
    fn topology() -> Topology {
        Topology::builder()
            .endpoints([1, 2, 3, 4])
            .group([3, 4])
            .domain_range(0, 100)
            .region_all(X86_MSI_REGION)
            .region(
                2,
                ResvRegion {
                    kind: ResvKind::Reserved,
                    start: 16 * PAGE,
                    end: 18 * PAGE - 1,
                },
            )
            .limits(Limits {
                max_domains: 8,
                ..Limits::default()
            })
            .build()
            .unwrap()
    }

    /// A model with a paging domain shared by two groups (one of them half attached), an
    /// identity domain, mappings of several sizes and flags, one above 512 GiB.
    fn programmed() -> Iommu {
        let mut m = Iommu::new(topology());
        m.attach(7, 1, DomainKind::Paging).unwrap();
        m.attach(7, 3, DomainKind::Paging).unwrap();
        m.attach(9, 2, DomainKind::Identity).unwrap();
        m.map(7, 0, PAGE - 1, 0x10_0000, RW).unwrap();
        m.map(7, 4 * PAGE, 8 * PAGE - 1, 0x20_0000, Perms::READ)
            .unwrap();
        m.map(
            7,
            2 << 20,
            (4 << 20) - 1,
            0x40_0000,
            Perms::WRITE | Perms::MMIO,
        )
        .unwrap();
        m.map(7, 1 << 40, (1 << 40) + PAGE - 1, 0x1000, RW).unwrap();
        m
    }

    #[test]
    fn a_state_comes_back_the_same_in_a_fresh_model() {
        let m = programmed();
        let state = m.guest_state();
        assert_eq!(state.domains.len(), 2);
        assert_eq!(state.mapping_count(), 4);
        assert_eq!(
            state.attachments,
            vec![
                // Explicit groups come first: group 0 is endpoints 3 and 4.
                Attachment {
                    domain: 7,
                    endpoints: vec![3]
                },
                Attachment {
                    domain: 7,
                    endpoints: vec![1]
                },
                Attachment {
                    domain: 9,
                    endpoints: vec![2]
                },
            ]
        );
        let mut fresh = Iommu::new(topology());
        fresh.restore(&state).unwrap();
        assert_eq!(fresh.guest_state(), state);
        // The request counters are statistics, not state (a restore counts its own MAPs).
        let shape =
            |d: Vec<crate::DomainInfo>| d.iter().map(|d| d.without_counters()).collect::<Vec<_>>();
        assert_eq!(shape(fresh.domains()), shape(m.domains()));
        // The tables answer the same: endpoint 4 is in the group that moved, not attached.
        fresh.use_dma_api(4).unwrap();
        let t = fresh.translator();
        let got = t
            .translate(
                crate::Requester::DmaApi,
                4,
                5 * PAGE + 8,
                1,
                crate::Access::Read,
            )
            .unwrap();
        assert_eq!((got.gpa, got.domain), (0x20_1008, Some(7)));
    }

    #[test]
    fn restore_replaces_what_a_model_held() {
        let state = programmed().guest_state();
        let mut other = Iommu::new(topology());
        other.attach(1, 4, DomainKind::Paging).unwrap();
        other.map(1, 0, PAGE - 1, 0, RW).unwrap();
        other.claim_dma_owner(GroupId(0), 0xc0ffee).unwrap();
        other.restore(&state).unwrap();
        assert_eq!(other.guest_state(), state);
        // The host face is not part of the guest's state.
        assert_eq!(other.dma_owner(GroupId(0)), Some(0xc0ffee));
    }

    /// Every refusal, on an empty and on a programmed model: nothing changes.
    #[test]
    fn a_refused_state_changes_nothing() {
        let good = programmed().guest_state();
        let mut bad = Vec::new();
        let mut s = good.clone();
        s.domains.swap(0, 1);
        bad.push((s, "increasing ID"));
        let mut s = good.clone();
        s.attachments.retain(|a| a.domain != 9);
        bad.push((s, "no attached group"));
        let mut s = good.clone();
        s.attachments[0].endpoints.clear();
        bad.push((s, "names no endpoint"));
        let mut s = good.clone();
        s.attachments[0].domain = 8;
        bad.push((s, "not listed"));
        let mut s = good.clone();
        s.attachments[0].endpoints = vec![4, 3];
        bad.push((s, "increasing ID (endpoint 0x3)"));
        let mut s = good.clone();
        s.attachments[0].endpoints = vec![2, 3];
        bad.push((s, "different groups"));
        let mut s = good.clone();
        s.attachments.push(Attachment {
            domain: 7,
            endpoints: vec![4],
        });
        bad.push((s, "attached twice"));
        let mut s = good.clone();
        s.attachments[0].endpoints = vec![99];
        bad.push((s, "does not exist"));
        let mut s = good.clone();
        s.domains[1].mappings = s.domains[0].mappings.clone();
        bad.push((s, "identity domain 9 lists mappings"));
        let mut s = good.clone();
        s.domains[0].mappings[0].perms |= Perms::from_bits_retain(1 << 7);
        bad.push((s, "unknown permission bits"));
        // Refused by the replay itself: the model's own rules.
        let mut s = good.clone();
        let m = s.domains[0].mappings[0];
        s.domains[0].mappings.push(m);
        bad.push((s, "overlaps an existing mapping"));
        let mut s = good.clone();
        s.domains[0].mappings.push(Mapping {
            virt_start: 16 * PAGE,
            virt_end: 17 * PAGE - 1,
            phys_start: 0,
            perms: RW,
        });
        s.attachments[2] = Attachment {
            domain: 7,
            endpoints: vec![2],
        };
        s.domains.pop();
        bad.push((s, "reserved region"));
        let mut s = good.clone();
        s.domains[0].mappings[1].virt_start += 1;
        bad.push((s, "not aligned"));
        let mut s = good.clone();
        s.domains[0].id = 101;
        s.attachments[0].domain = 101;
        s.attachments[1].domain = 101;
        s.domains.swap(0, 1);
        bad.push((s, "outside the domain range"));
        for start in [Iommu::new(topology()), programmed()] {
            let mut m = start;
            for (state, why) in &bad {
                let before = snapshot(&m);
                let error = m.restore(state).unwrap_err().to_string();
                assert!(error.contains(why), "{error:?} does not say {why:?}");
                assert_eq!(snapshot(&m), before, "refused ({why}) but changed");
            }
        }
    }

    #[test]
    fn limits_of_this_model_apply() {
        let state = programmed().guest_state();
        let small = Topology::builder()
            .endpoints([1, 2, 3, 4])
            .group([3, 4])
            .domain_range(0, 100)
            .region_all(X86_MSI_REGION)
            .limits(Limits {
                max_mappings: 3,
                ..Limits::default()
            })
            .build()
            .unwrap();
        let mut m = Iommu::new(small);
        let error = m.restore(&state).unwrap_err();
        assert!(matches!(
            error,
            RestoreError::Map {
                error: Error::TooManyMappings,
                ..
            }
        ));
        assert_eq!(m.guest_state(), GuestState::default());
        assert_eq!(m.stats().table_bytes, 0);
    }
}
