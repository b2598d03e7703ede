// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`vm_memory::Iommu`] for an [`Endpoint`]: IOVAs translated through the daemon's tables,
//! cached in a `vm_memory` IOTLB per reader slot.
//!
//! A translation leases a reader slot, enters a section on it and returns an iterator whose
//! guard keeps the section (and the lease) until the iterator is dropped: `IommuMemory`'s
//! `Bytes` accesses copy while they hold it. The slot's IOTLB is tagged with the endpoint
//! handle and the epoch read after the section's entry fence; any other tag empties it first.
//! The writer bumps the epoch with every grace period (every UNMAP, DETACH, move to another
//! domain, reset, owner release), so an entry is never used past a grace period that could
//! have removed it: either this section sees the new epoch and starts empty, or it entered
//! before the bump was visible and the grace period waits for it (see `ownership::epoch`).
//! A miss walks the tables from the IOVA to the end of the range, one page-table entry at a
//! time, and fills the IOTLB with what it found (with the mapping's full permissions, so that
//! a read after a write of the same buffer hits).

use std::{ops::Deref, sync::MutexGuard};

use vm_memory::{
    iommu::{Error as IommuError, IotlbIterator, IovaRange},
    GuestAddress, Iommu, Iotlb, Permissions,
};

use crate::{wire, Access, Connection, Endpoint, Error, Fault, SlotState};

/// IOTLB entries one slot keeps before it starts over (an epoch normally ends well before).
const MAX_ENTRIES: usize = 4096;
/// How far a miss asks one walk to reach: the rest of the page-table entry, up to this.
const FILL_SPAN: u64 = 1 << 30;

/// The IOTLB of a reader slot, held with a section open: the guard of
/// [`vm_memory::Iommu::translate`] for an [`Endpoint`].
pub struct IotlbGuard<'a> {
    conn: &'a Connection,
    slot: usize,
    token: u64,
    lease: MutexGuard<'a, SlotState>,
}

impl std::fmt::Debug for IotlbGuard<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IotlbGuard")
            .field("slot", &self.slot)
            .field("entries", &self.lease.entries)
            .finish()
    }
}

impl Deref for IotlbGuard<'_> {
    type Target = Iotlb;

    fn deref(&self) -> &Iotlb {
        &self.lease.iotlb
    }
}

impl IotlbGuard<'_> {
    /// One more on counter `which` of the slot (leased by this guard).
    fn count(&self, which: usize) {
        self.conn.count(self.slot, which, 1);
    }
}

impl Drop for IotlbGuard<'_> {
    fn drop(&mut self) {
        // Before the lease's lock is released (fields drop after this).
        self.conn.leave(self.slot, self.token);
    }
}

fn refused(iova: GuestAddress, length: usize, reason: String) -> IommuError {
    IommuError::CannotResolve {
        iova_range: IovaRange { base: iova, length },
        reason,
    }
}

impl Endpoint {
    /// A slot with a section open and its IOTLB current for this handle.
    fn iotlb_guard(&self) -> Result<IotlbGuard<'_>, IommuError> {
        let misconfigured = |e: Error| IommuError::IommuMisconfigured {
            reason: e.to_string(),
        };
        if self.is_revoked() {
            let e = if self.released.load(std::sync::atomic::Ordering::Relaxed) {
                Error::Released
            } else {
                Error::Revoked
            };
            return Err(misconfigured(e));
        }
        let conn = &*self.conn;
        let (slot, mut lease) = conn.lease().map_err(misconfigured)?;
        let (token, epoch) = conn.enter(slot).map_err(misconfigured)?;
        let tag = Some((self.handle, epoch));
        if lease.tag != tag || lease.entries >= MAX_ENTRIES {
            lease.iotlb.invalidate_all();
            lease.tag = tag;
            lease.entries = 0;
        }
        Ok(IotlbGuard {
            conn,
            slot,
            token,
            lease,
        })
    }

    /// Fills the guard's IOTLB for `[iova, iova + length)` from the tables; a refusal is
    /// reported (as for any translation) and returned.
    fn fill(
        &self,
        guard: &mut IotlbGuard<'_>,
        iova: u64,
        length: u64,
        access: Permissions,
    ) -> Result<(), IommuError> {
        let view = self
            .conn
            .tables
            .endpoint(&self.ep, self.requester)
            .map_err(|fault| refused(GuestAddress(iova), length as usize, format!("{fault:?}")))?;
        // The access that must be allowed, and the one only probed (for the entry's permissions).
        let (primary, other) = match access {
            Permissions::Write | Permissions::ReadWrite => (Access::Write, Access::Read),
            Permissions::Read | Permissions::No => (Access::Read, Access::Write),
        };
        let end = iova + length;
        let mut at = iova;
        while at < end {
            let ask = (u64::MAX - at).clamp(1, FILL_SPAN);
            let t = match view.translate(at, ask, primary) {
                Ok(t) => t,
                Err(fault) => return Err(self.refuse(fault, at, primary, iova, length)),
            };
            let also = view.translate(at, 1, other).is_ok();
            if access == Permissions::ReadWrite && !also {
                return Err(self.refuse(Fault::Permission, at, other, iova, length));
            }
            let perms = match (primary, also) {
                (_, true) => Permissions::ReadWrite,
                (Access::Read, false) => Permissions::Read,
                (Access::Write, false) => Permissions::Write,
            };
            let len = usize::try_from(t.len).unwrap_or(usize::MAX);
            guard
                .lease
                .iotlb
                .set_mapping(GuestAddress(at), GuestAddress(t.gpa), len, perms)?;
            guard.lease.entries += 1;
            at = at.saturating_add(t.len);
        }
        Ok(())
    }

    fn refuse(&self, fault: Fault, at: u64, access: Access, iova: u64, length: u64) -> IommuError {
        self.report(fault, at, access);
        refused(
            GuestAddress(iova),
            length as usize,
            format!("{fault:?} at {at:#x}"),
        )
    }
}

impl Iommu for Endpoint {
    type IotlbGuard<'a> = IotlbGuard<'a>;

    fn translate(
        &self,
        iova: GuestAddress,
        length: usize,
        access: Permissions,
    ) -> Result<IotlbIterator<IotlbGuard<'_>>, IommuError> {
        if iova.0.checked_add(length as u64).is_none() {
            return Err(refused(iova, length, "the range wraps around".into()));
        }
        // A hit: one section, one lookup.
        let guard = self.iotlb_guard()?;
        guard.count(wire::SLOT_TRANSLATIONS);
        if let Ok(hit) = Iotlb::lookup(guard, iova, length, access) {
            return Ok(hit);
        }
        // A miss (or a refusal the tables may have lifted): a new section walks and fills.
        let mut guard = self.iotlb_guard()?;
        guard.count(wire::SLOT_IOTLB_MISSES);
        if let Err(e) = self.fill(&mut guard, iova.0, length as u64, access) {
            guard.count(wire::SLOT_REFUSED);
            return Err(e);
        }
        Iotlb::lookup(guard, iova, length, access)
            .map_err(|_| refused(iova, length, "not in the IOTLB after a fill".into()))
    }
}
