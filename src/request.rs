// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One request in, one status out: `virtio::Request` -> `ownership::Iommu` -> `virtio::Status`.
//!
//! This is the only place where model errors become virtio status codes ([`status_of`]); the
//! wire format's own refusals carry their status in `virtio::ParseError::status`. Nothing here
//! knows about queues or sockets, so every rule is testable with plain byte slices.

use ownership::{DomainKind, Error, Iommu, Perms, ResvKind, ResvRegion};
use virtio::{
    encode_probe_properties, MapFlags, ParseError, Request, RequestType, ResvMem, ResvMemType,
    Status,
};

/// The virtio status a refused model operation answers with.
pub fn status_of(err: &Error) -> Status {
    match err {
        Error::UnknownEndpoint(_) | Error::UnknownDomain(_) => Status::NoEnt,
        Error::DomainOutOfRange(_)
        | Error::Misaligned { .. }
        | Error::OutOfRange { .. }
        | Error::WouldSplit { .. } => Status::Range,
        Error::KindMismatch(_)
        | Error::NotAttached { .. }
        | Error::IdentityDomain(_)
        | Error::InvalidRange { .. }
        | Error::Overlap { .. }
        | Error::ReservedOverlap { .. } => Status::Inval,
        Error::Incompatible { .. } => Status::Unsupp,
        Error::TooManyDomains | Error::TooManyMappings | Error::OutOfTableMemory => Status::NoMem,
        // Host-face errors never come from a guest request; a device error if they ever do.
        Error::Busy(_)
        | Error::InUse(_)
        | Error::InvalidOwner
        | Error::NotOwner(_)
        | Error::NotInUse(_)
        | Error::UnknownGroup(_) => Status::DevErr,
    }
}

/// The permissions a MAP request asks for.
pub fn perms_of(flags: MapFlags) -> Perms {
    let mut perms = Perms::empty();
    perms.set(Perms::READ, flags.read);
    perms.set(Perms::WRITE, flags.write);
    perms.set(Perms::MMIO, flags.mmio);
    perms
}

/// A reserved region as PROBE reports it.
pub fn resv_mem(r: &ResvRegion) -> ResvMem {
    ResvMem {
        subtype: match r.kind {
            ResvKind::Reserved => ResvMemType::Reserved,
            ResvKind::Msi => ResvMemType::Msi,
        },
        start: r.start,
        end: r.end,
    }
}

/// Applies a parsed request to the model.
pub fn execute(iommu: &mut Iommu, request: &Request) -> Result<(), Error> {
    match *request {
        Request::Attach {
            domain,
            endpoint,
            bypass,
        } => {
            let kind = if bypass {
                DomainKind::Identity
            } else {
                DomainKind::Paging
            };
            iommu.attach(domain, endpoint, kind)
        }
        Request::Detach { domain, endpoint } => iommu.detach(domain, endpoint),
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags,
        } => iommu.map(domain, virt_start, virt_end, phys_start, perms_of(flags)),
        Request::Unmap {
            domain,
            virt_start,
            virt_end,
        } => iommu.unmap(domain, virt_start, virt_end).map(|_| ()),
        Request::Probe { endpoint } => iommu.probe(endpoint).map(|_| ()),
    }
}

/// What the device writes back for one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Return the buffers without writing anything (used length 0).
    Nothing(ParseError),
    /// Write `properties` (PROBE only; the rest of the writable area zero) and the tail with
    /// `status` into its last 4 bytes.
    Status {
        request: RequestType,
        status: Status,
        /// Bytes of PROBE properties at the start of the writable area.
        properties: usize,
        /// Why the status is not OK, for the log.
        error: Option<String>,
        /// The request the model was asked to apply (ATTACH, DETACH, MAP, UNMAP, whatever
        /// its status), for the state file's journal; None for PROBE, a refusal of the
        /// bytes, and a request answered from the journal.
        applied: Option<Request>,
    },
}

/// Handles one request: `readable` is the device-readable part of the chain (or its first
/// bytes), `writable_len` the size of the device-writable part, `properties` the buffer PROBE
/// properties are encoded into (at least `probe_size` bytes).
pub fn handle(
    iommu: &mut Iommu,
    readable: &[u8],
    writable_len: usize,
    features: u64,
    probe_size: u32,
    properties: &mut [u8],
) -> Reply {
    handle_once(
        iommu,
        readable,
        writable_len,
        features,
        probe_size,
        properties,
        |_| None,
    )
}

/// [`handle`], with `answered_before`: the status a request already got (a restarted daemon
/// sees the last pass's requests again, see `crate::statefile`), answered without applying
/// it a second time.
pub fn handle_once(
    iommu: &mut Iommu,
    readable: &[u8],
    writable_len: usize,
    features: u64,
    probe_size: u32,
    properties: &mut [u8],
    answered_before: impl FnOnce(&Request) -> Option<Status>,
) -> Reply {
    let request = match Request::parse(readable, writable_len, features, probe_size) {
        Ok(request) => request,
        Err(err) => {
            return match err.status() {
                None => Reply::Nothing(err),
                Some(status) => Reply::Status {
                    request: request_type_of(readable).unwrap_or(RequestType::Attach),
                    status,
                    properties: 0,
                    error: Some(err.to_string()),
                    applied: None,
                },
            }
        }
    };
    let kind = request.request_type();
    if kind != RequestType::Probe {
        if let Some(status) = answered_before(&request) {
            return Reply::Status {
                request: kind,
                status,
                properties: 0,
                error: None,
                applied: None,
            };
        }
    }
    let applied = (kind != RequestType::Probe).then_some(request);
    let result = match request {
        Request::Probe { endpoint } => iommu.probe(endpoint).map(|regions| {
            let mut encoded = [ResvMem {
                subtype: ResvMemType::Reserved,
                start: 0,
                end: 0,
            }; MAX_PROBE_REGIONS];
            let n = regions.len().min(MAX_PROBE_REGIONS);
            for (slot, r) in encoded.iter_mut().zip(regions) {
                *slot = resv_mem(r);
            }
            properties
                .get_mut(..probe_size as usize)
                .and_then(|area| encode_probe_properties(&encoded[..n], area).ok())
        }),
        _ => execute(iommu, &request).map(|()| Some(0)),
    };
    match result {
        Ok(Some(properties)) => Reply::Status {
            request: kind,
            status: Status::Ok,
            properties,
            error: None,
            applied,
        },
        // The daemon sizes probe_size for its topology and passes a buffer that big: this is
        // the device's fault, not the driver's.
        Ok(None) => Reply::Status {
            request: kind,
            status: Status::DevErr,
            properties: 0,
            error: Some(format!(
                "{request:?}: properties do not fit in {probe_size} bytes"
            )),
            applied,
        },
        Err(err) => Reply::Status {
            request: kind,
            status: status_of(&err),
            properties: 0,
            error: Some(format!("{request:?}: {err}")),
            applied,
        },
    }
}

/// The most reserved regions one endpoint may have (bounds PROBE's stack buffer).
pub const MAX_PROBE_REGIONS: usize = 16;

fn request_type_of(readable: &[u8]) -> Option<RequestType> {
    readable
        .first()
        .and_then(|&t| RequestType::try_from(t).ok())
}

#[cfg(test)]
mod tests {
    use ownership::{Topology, X86_MSI_REGION};
    use virtio::{decode_probe_properties, ProbeProperty, F_BYPASS_CONFIG, F_MAP_UNMAP, F_PROBE};

    use super::*;

    const FEATURES: u64 = F_MAP_UNMAP | F_PROBE | F_BYPASS_CONFIG;
    const PROBE_SIZE: u32 = 512;

    fn iommu() -> Iommu {
        Iommu::new(
            Topology::builder()
                .endpoints(0..256)
                .domain_range(1, 100)
                .region_all(X86_MSI_REGION)
                .build()
                .unwrap(),
        )
    }

    fn send(m: &mut Iommu, request: Request) -> (Status, Vec<u8>) {
        let mut props = vec![0u8; PROBE_SIZE as usize];
        let writable = request.writable_len(PROBE_SIZE);
        match handle(
            m,
            &request.encode(),
            writable,
            FEATURES,
            PROBE_SIZE,
            &mut props,
        ) {
            Reply::Status {
                status, properties, ..
            } => {
                props.truncate(properties);
                (status, props)
            }
            Reply::Nothing(e) => panic!("no reply: {e}"),
        }
    }

    fn map(domain: u32, virt_start: u64, virt_end: u64, phys_start: u64) -> Request {
        Request::Map {
            domain,
            virt_start,
            virt_end,
            phys_start,
            flags: MapFlags {
                read: true,
                write: true,
                mmio: false,
            },
        }
    }

    #[test]
    fn statuses_of_a_request_sequence() {
        let mut m = iommu();
        let attach = |domain, endpoint, bypass| Request::Attach {
            domain,
            endpoint,
            bypass,
        };
        assert_eq!(send(&mut m, attach(1, 0x28, false)).0, Status::Ok);
        assert_eq!(send(&mut m, attach(1, 0x1000, false)).0, Status::NoEnt);
        assert_eq!(send(&mut m, attach(101, 0x28, false)).0, Status::Range);
        assert_eq!(send(&mut m, attach(1, 0x30, true)).0, Status::Inval);
        assert_eq!(send(&mut m, map(1, 0x1000, 0x1fff, 0x8000)).0, Status::Ok);
        assert_eq!(
            send(&mut m, map(1, 0x1000, 0x1fff, 0x8000)).0,
            Status::Inval
        );
        assert_eq!(
            send(&mut m, map(1, 0x1800, 0x27ff, 0x8000)).0,
            Status::Range
        );
        assert_eq!(
            send(&mut m, map(2, 0x1000, 0x1fff, 0x8000)).0,
            Status::NoEnt
        );
        assert_eq!(
            send(&mut m, map(1, 0xfee0_0000, 0xfee0_0fff, 0)).0,
            Status::Inval
        );
        let unmap = |virt_start, virt_end| Request::Unmap {
            domain: 1,
            virt_start,
            virt_end,
        };
        assert_eq!(send(&mut m, unmap(0x1000, 0x17ff)).0, Status::Range);
        assert_eq!(send(&mut m, unmap(0, 0xffff)).0, Status::Ok);
        let detach = |domain, endpoint| Request::Detach { domain, endpoint };
        assert_eq!(send(&mut m, detach(2, 0x28)).0, Status::Inval);
        assert_eq!(send(&mut m, detach(1, 0x28)).0, Status::Ok);
        assert_eq!(send(&mut m, detach(1, 0x28)).0, Status::Inval);
    }

    #[test]
    fn probe_reports_the_msi_region() {
        let mut m = iommu();
        let (status, props) = send(&mut m, Request::Probe { endpoint: 0x28 });
        assert_eq!(status, Status::Ok);
        assert_eq!(
            decode_probe_properties(&props).unwrap(),
            vec![ProbeProperty::ResvMem(ResvMem {
                subtype: ResvMemType::Msi,
                start: 0xfee0_0000,
                end: 0xfeef_ffff,
            })]
        );
        assert_eq!(
            send(&mut m, Request::Probe { endpoint: 0x1000 }).0,
            Status::NoEnt
        );
    }

    #[test]
    fn probe_without_room_for_its_properties_is_a_device_error() {
        let mut m = iommu();
        let request = Request::Probe { endpoint: 0x28 };
        let writable = request.writable_len(PROBE_SIZE);
        let reply = handle(
            &mut m,
            &request.encode(),
            writable,
            FEATURES,
            PROBE_SIZE,
            &mut [],
        );
        assert!(matches!(
            reply,
            Reply::Status {
                status: Status::DevErr,
                properties: 0,
                ..
            }
        ));
    }

    #[test]
    fn parse_refusals_keep_their_status_or_write_nothing() {
        let mut m = iommu();
        let mut props = [0u8; PROBE_SIZE as usize];
        let mut bytes = Request::Attach {
            domain: 1,
            endpoint: 0x28,
            bypass: false,
        }
        .encode();
        bytes[16] = 1; // reserved
        assert!(matches!(
            handle(&mut m, &bytes, 4, FEATURES, PROBE_SIZE, &mut props),
            Reply::Status {
                request: RequestType::Attach,
                status: Status::Inval,
                ..
            }
        ));
        bytes[0] = 9; // unknown type
        assert!(matches!(
            handle(&mut m, &bytes, 4, FEATURES, PROBE_SIZE, &mut props),
            Reply::Nothing(_)
        ));
        assert!(m.domains().is_empty(), "nothing was applied");
    }

    #[test]
    fn every_model_error_has_a_status() {
        // Exhaustive by construction (the match has no wildcard); spot-check the spec's picks.
        assert_eq!(
            status_of(&Error::WouldSplit { start: 0, end: 1 }),
            Status::Range
        );
        assert_eq!(
            status_of(&Error::Incompatible {
                domain: 1,
                endpoint: 2
            }),
            Status::Unsupp
        );
        assert_eq!(status_of(&Error::TooManyMappings), Status::NoMem);
        assert_eq!(status_of(&Error::IdentityDomain(1)), Status::Inval);
    }
}
