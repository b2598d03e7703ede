// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The fast path handed to DMA masters: translate an endpoint's IOVA into a guest-physical
//! address, and report the guest-visible faults on the event queue.
//!
//! In-process today (the control socket and benchmarks use it); a socket for out-of-process
//! device backends can wrap the same type.

use std::sync::Arc;

use ownership::{Access, EndpointId, Fault, ReadGuard, Requester, Translation, Translator};
use virtio::{FaultReason, FaultRecord, FAULT_F_ADDRESS, FAULT_F_READ, FAULT_F_WRITE};

use crate::faults::FaultQueue;

/// A translator for one thread that turns guest-visible faults into fault records.
#[derive(Debug)]
pub struct TranslationService {
    translator: Translator,
    faults: Arc<FaultQueue>,
}

impl TranslationService {
    pub fn new(translator: Translator, faults: Arc<FaultQueue>) -> Self {
        TranslationService { translator, faults }
    }

    /// Translates the first bytes of a DMA; see [`ownership::ReadGuard::translate`]. A
    /// guest-visible fault is queued for the guest's event queue before it is returned.
    pub fn translate(
        &self,
        requester: Requester,
        endpoint: EndpointId,
        iova: u64,
        len: u64,
        access: Access,
    ) -> Result<Translation, Fault> {
        let result = self
            .translator
            .translate(requester, endpoint, iova, len, access);
        if let Err(fault) = result {
            self.report(fault, endpoint, iova, access);
        }
        result
    }

    /// A read-side critical section to hold across a DMA (see [`ownership::Translator::read`]).
    pub fn read(&self) -> ReadGuard<'_> {
        self.translator.read()
    }

    /// Queues the fault record for a refused access, if the guest should see it.
    pub fn report(&self, fault: Fault, endpoint: EndpointId, iova: u64, access: Access) {
        if let Some(record) = fault_record(fault, endpoint, iova, access) {
            self.faults.push(record);
        }
    }

    pub fn translator(&self) -> &Translator {
        &self.translator
    }
}

/// The event-queue record of a fault (spec E1-E4), or None for host-side refusals.
pub fn fault_record(
    fault: Fault,
    endpoint: EndpointId,
    iova: u64,
    access: Access,
) -> Option<FaultRecord> {
    if !fault.guest_visible() {
        return None;
    }
    let reason = match fault {
        Fault::NoDomain => FaultReason::Domain,
        _ => FaultReason::Mapping,
    };
    let access = match access {
        Access::Read => FAULT_F_READ,
        Access::Write => FAULT_F_WRITE,
    };
    Some(FaultRecord {
        reason,
        flags: access | FAULT_F_ADDRESS,
        endpoint,
        address: iova,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A DMA master asks for a translation service while the writer holds the model (as it
    /// does across a grace period, which may be waiting for that master's section): the
    /// service comes without the model's lock.
    #[test]
    fn a_service_comes_without_the_model() {
        use clap::Parser;
        let argv = ["vhost-device-iommu", "--socket-path", "/nonexistent/x.sock"];
        let args = crate::config::Cli::try_parse_from(argv)
            .unwrap()
            .serve
            .unwrap();
        let config = crate::config::DaemonConfig::try_from(args).unwrap();
        let device = crate::device::Device::new(&config).unwrap();
        let model = device.iommu();
        let (tx, rx) = std::sync::mpsc::channel();
        let asker = device.clone();
        std::thread::spawn(move || {
            let service = asker.translation_service();
            let answer = service.translate(Requester::DmaApi, 0x28, 0x1000, 1, Access::Read);
            let _ = tx.send(answer);
        });
        let answer = rx.recv_timeout(std::time::Duration::from_secs(10));
        drop(model);
        // No DMA-API user on the endpoint: refused, but answered.
        assert_eq!(answer, Ok(Err(Fault::NotOwner)));
    }

    #[test]
    fn records_for_guest_visible_faults_only() {
        let r = fault_record(Fault::Unmapped, 0x28, 0x1000, Access::Write).unwrap();
        assert_eq!(r.reason, FaultReason::Mapping);
        assert_eq!(r.flags, FAULT_F_WRITE | FAULT_F_ADDRESS);
        assert_eq!((r.endpoint, r.address), (0x28, 0x1000));
        let r = fault_record(Fault::NoDomain, 0x28, 0, Access::Read).unwrap();
        assert_eq!(r.reason, FaultReason::Domain);
        assert_eq!(fault_record(Fault::NotOwner, 0x28, 0, Access::Read), None);
        assert_eq!(
            fault_record(Fault::UnknownEndpoint, 0x28, 0, Access::Read),
            None
        );
    }
}
