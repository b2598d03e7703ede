// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Requests on the requestq: head, body, tail and status.

use std::fmt;

use crate::{le32, le64, put32, put64, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, F_PROBE};

/// `struct virtio_iommu_req_head`: `u8 type; u8 reserved[3]` (device-readable).
pub const HEAD_SIZE: usize = 4;
/// `struct virtio_iommu_req_tail`: `u8 status; u8 reserved[3]`, always the last bytes of the
/// device-writable area.
pub const TAIL_SIZE: usize = 4;

/// ATTACH flag: create (or join) a bypass domain. Needs `F_BYPASS_CONFIG`.
pub const ATTACH_F_BYPASS: u32 = 0x1;
/// MAP flag: read accesses are allowed.
pub const MAP_F_READ: u32 = 0x1;
/// MAP flag: write accesses are allowed.
pub const MAP_F_WRITE: u32 = 0x2;
/// MAP flag: the range is memory-mapped I/O. Needs `F_MMIO`.
pub const MAP_F_MMIO: u32 = 0x4;
/// Every defined MAP flag: READ, WRITE and MMIO.
pub const MAP_F_MASK: u32 = 0x7;

/// `VIRTIO_IOMMU_T_*`: the `type` byte of the request head.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RequestType {
    Attach = 1,
    Detach = 2,
    Map = 3,
    Unmap = 4,
    Probe = 5,
}

impl RequestType {
    pub const ALL: [RequestType; 5] = [
        RequestType::Attach,
        RequestType::Detach,
        RequestType::Map,
        RequestType::Unmap,
        RequestType::Probe,
    ];

    /// Size of the device-readable part (head included, tail and PROBE properties excluded).
    pub const fn readable_size(self) -> usize {
        match self {
            RequestType::Attach | RequestType::Detach => 20,
            RequestType::Map => 36,
            RequestType::Unmap => 28,
            RequestType::Probe => 72,
        }
    }
}

/// A head `type` byte that names no request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown request type {0}")]
pub struct UnknownRequestType(pub u8);

impl TryFrom<u8> for RequestType {
    type Error = UnknownRequestType;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Self::ALL
            .into_iter()
            .find(|t| *t as u8 == v)
            .ok_or(UnknownRequestType(v))
    }
}

/// `VIRTIO_IOMMU_S_*`: the `status` byte of the request tail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    IoErr = 1,
    Unsupp = 2,
    DevErr = 3,
    Inval = 4,
    Range = 5,
    NoEnt = 6,
    Fault = 7,
    NoMem = 8,
}

impl Status {
    pub const ALL: [Status; 9] = [
        Status::Ok,
        Status::IoErr,
        Status::Unsupp,
        Status::DevErr,
        Status::Inval,
        Status::Range,
        Status::NoEnt,
        Status::Fault,
        Status::NoMem,
    ];

    /// The tail to write. Spec G3: the tail's reserved bytes are zero.
    pub const fn tail(self) -> [u8; TAIL_SIZE] {
        [self as u8, 0, 0, 0]
    }

    /// The spec's name without the `VIRTIO_IOMMU_S_` prefix.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::IoErr => "IOERR",
            Status::Unsupp => "UNSUPP",
            Status::DevErr => "DEVERR",
            Status::Inval => "INVAL",
            Status::Range => "RANGE",
            Status::NoEnt => "NOENT",
            Status::Fault => "FAULT",
            Status::NoMem => "NOMEM",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tail `status` byte that names no status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0}")]
pub struct UnknownStatus(pub u8);

impl TryFrom<u8> for Status {
    type Error = UnknownStatus;

    fn try_from(v: u8) -> Result<Self, Self::Error> {
        Self::ALL
            .into_iter()
            .find(|s| *s as u8 == v)
            .ok_or(UnknownStatus(v))
    }
}

/// The `flags` of a MAP request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MapFlags {
    pub read: bool,
    pub write: bool,
    pub mmio: bool,
}

impl MapFlags {
    /// None if `bits` has a bit other than READ, WRITE or MMIO.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        if bits & !MAP_F_MASK != 0 {
            return None;
        }
        Some(MapFlags {
            read: bits & MAP_F_READ != 0,
            write: bits & MAP_F_WRITE != 0,
            mmio: bits & MAP_F_MMIO != 0,
        })
    }

    pub const fn bits(self) -> u32 {
        let read = if self.read { MAP_F_READ } else { 0 };
        let write = if self.write { MAP_F_WRITE } else { 0 };
        let mmio = if self.mmio { MAP_F_MMIO } else { 0 };
        read | write | mmio
    }
}

/// A request as the driver sent it. Address ranges are inclusive, as on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    Attach {
        domain: u32,
        endpoint: u32,
        /// `ATTACH_F_BYPASS`: the domain is a bypass (identity) domain.
        bypass: bool,
    },
    Detach {
        domain: u32,
        endpoint: u32,
    },
    Map {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
        phys_start: u64,
        flags: MapFlags,
    },
    Unmap {
        domain: u32,
        virt_start: u64,
        virt_end: u64,
    },
    Probe {
        endpoint: u32,
    },
}

/// Why a descriptor chain is not a well-formed request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// No room for the tail: nothing can be written.
    #[error("device-writable area of {writable_len} bytes cannot hold the tail")]
    NoTail { writable_len: usize },
    /// No head to read the type from.
    #[error("device-readable area of {readable_len} bytes cannot hold the head")]
    NoHead { readable_len: usize },
    /// Spec G2: an unknown type gets no answer (used length 0).
    #[error("unknown request type {0}")]
    UnknownType(u8),
    /// Spec P3: PROBE without `F_PROBE` gets no answer (used length 0).
    #[error("PROBE request but VIRTIO_IOMMU_F_PROBE was not negotiated")]
    ProbeNotNegotiated,
    /// MAP and UNMAP are "only available when VIRTIO_IOMMU_F_MAP_UNMAP has been negotiated".
    #[error("{0:?} request but VIRTIO_IOMMU_F_MAP_UNMAP was not negotiated")]
    MapUnmapNotNegotiated(RequestType),
    /// The tail is there but the device-readable part is shorter than the request.
    #[error("{request:?} request truncated: {readable_len} device-readable bytes, need {need}")]
    Truncated {
        request: RequestType,
        readable_len: usize,
        need: usize,
    },
    /// Spec A1.
    #[error("ATTACH reserved field is not zero")]
    AttachReserved,
    /// Spec A2 (`ATTACH_F_BYPASS` is unknown without `F_BYPASS_CONFIG`).
    #[error("ATTACH flags {flags:#x} has unknown bits")]
    AttachUnknownFlags { flags: u32 },
    /// Spec M3 (`MAP_F_MMIO` is unknown without `F_MMIO`).
    #[error("MAP flags {flags:#x} has unknown bits")]
    MapUnknownFlags { flags: u32 },
    /// Spec U1.
    #[error("UNMAP reserved field is not zero")]
    UnmapReserved,
    /// Spec P7.
    #[error(
        "PROBE properties area of {properties_len} bytes is smaller than probe_size {probe_size}"
    )]
    ProbeBufferTooSmall {
        properties_len: usize,
        probe_size: u32,
    },
}

impl ParseError {
    /// The status to write in the tail, or None when the device must write nothing and
    /// return the chain with used length 0.
    pub const fn status(&self) -> Option<Status> {
        match self {
            // No tail to write into, no head to read, spec G2 (unknown type), spec P3.
            ParseError::NoTail { .. }
            | ParseError::NoHead { .. }
            | ParseError::UnknownType(_)
            | ParseError::ProbeNotNegotiated => None,
            // "This request is only available when VIRTIO_IOMMU_F_MAP_UNMAP has been
            // negotiated": an unsupported request.
            ParseError::MapUnmapNotNegotiated(_) => Some(Status::Unsupp),
            // Truncated: the tail was found, so a status can be set ("if a request is too
            // small for its type and the device cannot find the tail" is the only case
            // that writes nothing). The request's parameters are missing: "Invalid
            // parameters" (INVAL), not "Internal device error" (DEVERR), which is about
            // the device itself. QEMU answers INVAL as well.
            ParseError::Truncated { .. }
            | ParseError::AttachReserved
            | ParseError::AttachUnknownFlags { .. }
            | ParseError::MapUnknownFlags { .. }
            | ParseError::UnmapReserved
            | ParseError::ProbeBufferTooSmall { .. } => Some(Status::Inval),
        }
    }
}

impl Request {
    pub const fn request_type(&self) -> RequestType {
        match self {
            Request::Attach { .. } => RequestType::Attach,
            Request::Detach { .. } => RequestType::Detach,
            Request::Map { .. } => RequestType::Map,
            Request::Unmap { .. } => RequestType::Unmap,
            Request::Probe { .. } => RequestType::Probe,
        }
    }

    /// Parses one request from a descriptor chain.
    ///
    /// `readable` is the device-readable part (head + body; bytes past the body are
    /// ignored), `writable_len` the size of the device-writable part, whose last
    /// `TAIL_SIZE` bytes are the tail (for PROBE, the properties area is everything
    /// before it). Only what the bytes alone decide is checked; domains, endpoints,
    /// alignment and ranges are the model's business.
    pub fn parse(
        readable: &[u8],
        writable_len: usize,
        negotiated_features: u64,
        probe_size: u32,
    ) -> Result<Request, ParseError> {
        // A request too short to find the tail is returned without writing anything.
        if writable_len < TAIL_SIZE {
            return Err(ParseError::NoTail { writable_len });
        }
        if readable.len() < HEAD_SIZE {
            return Err(ParseError::NoHead {
                readable_len: readable.len(),
            });
        }
        // Spec G3: head.reserved (bytes 1..4) is ignored. Spec G2: unknown type.
        let ty = RequestType::try_from(readable[0]).map_err(|e| ParseError::UnknownType(e.0))?;
        match ty {
            // Spec P3: PROBE without F_PROBE: write nothing.
            RequestType::Probe if negotiated_features & F_PROBE == 0 => {
                return Err(ParseError::ProbeNotNegotiated)
            }
            RequestType::Map | RequestType::Unmap if negotiated_features & F_MAP_UNMAP == 0 => {
                return Err(ParseError::MapUnmapNotNegotiated(ty))
            }
            _ => {}
        }
        let need = ty.readable_size();
        if readable.len() < need {
            return Err(ParseError::Truncated {
                request: ty,
                readable_len: readable.len(),
                need,
            });
        }
        let b = &readable[..need];
        match ty {
            RequestType::Attach => parse_attach(b, negotiated_features),
            // Spec D1: DETACH reserved[8] @12 is ignored.
            RequestType::Detach => Ok(Request::Detach {
                domain: le32(b, 4),
                endpoint: le32(b, 8),
            }),
            RequestType::Map => parse_map(b, negotiated_features),
            RequestType::Unmap => parse_unmap(b),
            RequestType::Probe => parse_probe(b, writable_len, probe_size),
        }
    }

    /// The device-readable bytes of this request, reserved fields zero (driver side).
    pub fn encode(&self) -> Vec<u8> {
        let ty = self.request_type();
        let mut b = vec![0; ty.readable_size()];
        b[0] = ty as u8;
        match *self {
            Request::Attach {
                domain,
                endpoint,
                bypass,
            } => {
                put32(&mut b, 4, domain);
                put32(&mut b, 8, endpoint);
                put32(&mut b, 12, if bypass { ATTACH_F_BYPASS } else { 0 });
            }
            Request::Detach { domain, endpoint } => {
                put32(&mut b, 4, domain);
                put32(&mut b, 8, endpoint);
            }
            Request::Map {
                domain,
                virt_start,
                virt_end,
                phys_start,
                flags,
            } => {
                put32(&mut b, 4, domain);
                put64(&mut b, 8, virt_start);
                put64(&mut b, 16, virt_end);
                put64(&mut b, 24, phys_start);
                put32(&mut b, 32, flags.bits());
            }
            Request::Unmap {
                domain,
                virt_start,
                virt_end,
            } => {
                put32(&mut b, 4, domain);
                put64(&mut b, 8, virt_start);
                put64(&mut b, 16, virt_end);
            }
            Request::Probe { endpoint } => put32(&mut b, 4, endpoint),
        }
        b
    }

    /// Size of the device-writable part the driver provides: the tail, plus `probe_size`
    /// bytes of properties for PROBE.
    pub fn writable_len(&self, probe_size: u32) -> usize {
        match self {
            Request::Probe { .. } => probe_writable_len(probe_size),
            _ => TAIL_SIZE,
        }
    }
}

fn probe_writable_len(probe_size: u32) -> usize {
    usize::try_from(probe_size)
        .unwrap_or(usize::MAX)
        .saturating_add(TAIL_SIZE)
}

/// ATTACH: domain @4, endpoint @8, flags @12, reserved[4] @16.
fn parse_attach(b: &[u8], features: u64) -> Result<Request, ParseError> {
    // Spec A1: reserved != 0 -> INVAL.
    if b[16..20] != [0; 4] {
        return Err(ParseError::AttachReserved);
    }
    // Spec A2: unknown flag -> INVAL. ATTACH_F_BYPASS exists only with F_BYPASS_CONFIG.
    let flags = le32(b, 12);
    let known = if features & F_BYPASS_CONFIG != 0 {
        ATTACH_F_BYPASS
    } else {
        0
    };
    if flags & !known != 0 {
        return Err(ParseError::AttachUnknownFlags { flags });
    }
    Ok(Request::Attach {
        domain: le32(b, 4),
        endpoint: le32(b, 8),
        bypass: flags & ATTACH_F_BYPASS != 0,
    })
}

/// MAP: domain @4, virt_start @8, virt_end @16, phys_start @24, flags @32.
fn parse_map(b: &[u8], features: u64) -> Result<Request, ParseError> {
    // Spec M3: unknown flag -> INVAL. MAP_F_MMIO exists only with F_MMIO.
    let bits = le32(b, 32);
    let flags = match MapFlags::from_bits(bits) {
        Some(f) if !f.mmio || features & F_MMIO != 0 => f,
        _ => return Err(ParseError::MapUnknownFlags { flags: bits }),
    };
    Ok(Request::Map {
        domain: le32(b, 4),
        virt_start: le64(b, 8),
        virt_end: le64(b, 16),
        phys_start: le64(b, 24),
        flags,
    })
}

/// UNMAP: domain @4, virt_start @8, virt_end @16, reserved[4] @24.
fn parse_unmap(b: &[u8]) -> Result<Request, ParseError> {
    // Spec U1: the device may answer INVAL to reserved != 0; we do, and unmap nothing.
    if b[24..28] != [0; 4] {
        return Err(ParseError::UnmapReserved);
    }
    Ok(Request::Unmap {
        domain: le32(b, 4),
        virt_start: le64(b, 8),
        virt_end: le64(b, 16),
    })
}

/// PROBE: endpoint @4, reserved[64] @8 (spec P1: ignored), then properties and tail.
fn parse_probe(b: &[u8], writable_len: usize, probe_size: u32) -> Result<Request, ParseError> {
    // Spec P7: properties smaller than probe_size -> write no property, INVAL.
    if writable_len < probe_writable_len(probe_size) {
        return Err(ParseError::ProbeBufferTooSmall {
            properties_len: writable_len - TAIL_SIZE,
            probe_size,
        });
    }
    Ok(Request::Probe {
        endpoint: le32(b, 4),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL_F: u64 = crate::F_MAP_UNMAP | F_PROBE | F_MMIO | F_BYPASS_CONFIG;
    const PROBE_SIZE: u32 = 512;

    fn parse(readable: &[u8]) -> Result<Request, ParseError> {
        Request::parse(readable, TAIL_SIZE, ALL_F, PROBE_SIZE)
    }

    fn parse_with(readable: &[u8], writable_len: usize) -> Result<Request, ParseError> {
        Request::parse(readable, writable_len, ALL_F, PROBE_SIZE)
    }

    const ATTACH: Request = Request::Attach {
        domain: 0x0403_0201,
        endpoint: 0x0807_0605,
        bypass: true,
    };
    const MAP: Request = Request::Map {
        domain: 7,
        virt_start: 0x1000,
        virt_end: 0x1fff,
        phys_start: 0xa000,
        flags: MapFlags {
            read: true,
            write: true,
            mmio: false,
        },
    };
    const UNMAP: Request = Request::Unmap {
        domain: 7,
        virt_start: 0x1000,
        virt_end: 0x1fff,
    };

    #[test]
    fn golden_attach() {
        #[rustfmt::skip]
        let want = [
            1, 0, 0, 0,
            0x01, 0x02, 0x03, 0x04, // domain @4
            0x05, 0x06, 0x07, 0x08, // endpoint @8
            0x01, 0, 0, 0,          // flags @12: ATTACH_F_BYPASS
            0, 0, 0, 0,             // reserved @16
        ];
        assert_eq!(ATTACH.encode(), want);
        assert_eq!(parse(&want), Ok(ATTACH));
    }

    #[test]
    fn golden_detach() {
        let req = Request::Detach {
            domain: 0x11,
            endpoint: 0x2233,
        };
        #[rustfmt::skip]
        let want = [
            2, 0, 0, 0,
            0x11, 0, 0, 0,    // domain @4
            0x33, 0x22, 0, 0, // endpoint @8
            0, 0, 0, 0, 0, 0, 0, 0, // reserved[8] @12
        ];
        assert_eq!(req.encode(), want);
        assert_eq!(parse(&want), Ok(req));
    }

    #[test]
    fn golden_map() {
        #[rustfmt::skip]
        let want = [
            3, 0, 0, 0,
            7, 0, 0, 0,                      // domain @4
            0x00, 0x10, 0, 0, 0, 0, 0, 0,    // virt_start @8
            0xff, 0x1f, 0, 0, 0, 0, 0, 0,    // virt_end @16
            0x00, 0xa0, 0, 0, 0, 0, 0, 0,    // phys_start @24
            3, 0, 0, 0,                      // flags @32: READ | WRITE
        ];
        assert_eq!(MAP.encode(), want);
        assert_eq!(parse(&want), Ok(MAP));
    }

    #[test]
    fn golden_unmap() {
        #[rustfmt::skip]
        let want = [
            4, 0, 0, 0,
            7, 0, 0, 0,                      // domain @4
            0x00, 0x10, 0, 0, 0, 0, 0, 0,    // virt_start @8
            0xff, 0x1f, 0, 0, 0, 0, 0, 0,    // virt_end @16
            0, 0, 0, 0,                      // reserved @24
        ];
        assert_eq!(UNMAP.encode(), want);
        assert_eq!(parse(&want), Ok(UNMAP));
    }

    #[test]
    fn golden_probe() {
        let req = Request::Probe { endpoint: 0x0108 };
        let mut want = vec![5, 0, 0, 0, 0x08, 0x01, 0, 0]; // endpoint @4
        want.extend([0; 64]); // reserved[64] @8
        assert_eq!(req.encode(), want);
        assert_eq!(req.writable_len(PROBE_SIZE), 516);
        assert_eq!(parse_with(&want, 516), Ok(req));
    }

    #[test]
    fn sizes_and_codes() {
        let sizes: Vec<_> = RequestType::ALL.map(RequestType::readable_size).into();
        assert_eq!(sizes, [20, 20, 36, 28, 72]);
        assert_eq!(RequestType::ALL.map(|t| t as u8), [1, 2, 3, 4, 5]);
        assert_eq!(RequestType::try_from(3), Ok(RequestType::Map));
        assert_eq!(RequestType::try_from(6), Err(UnknownRequestType(6)));
        for (code, s) in Status::ALL.into_iter().enumerate() {
            assert_eq!(s as usize, code);
            assert_eq!(Status::try_from(code as u8), Ok(s));
        }
        assert_eq!(Status::try_from(9), Err(UnknownStatus(9)));
        assert_eq!(Status::Inval.to_string(), "INVAL");
        assert_eq!(Status::NoMem.tail(), [8, 0, 0, 0]);
        assert_eq!(UNMAP.writable_len(PROBE_SIZE), TAIL_SIZE);
    }

    #[test]
    fn map_flags_bits() {
        assert_eq!(ATTACH_F_BYPASS, 1 << 0);
        assert_eq!(
            (MAP_F_READ, MAP_F_WRITE, MAP_F_MMIO),
            (1 << 0, 1 << 1, 1 << 2)
        );
        assert_eq!(MAP_F_MASK, MAP_F_READ | MAP_F_WRITE | MAP_F_MMIO);
        for bits in 0..8 {
            assert_eq!(MapFlags::from_bits(bits).map(MapFlags::bits), Some(bits));
        }
        assert_eq!(MapFlags::from_bits(8), None);
        assert_eq!(MapFlags::from_bits(1 << 31), None);
    }

    #[test]
    fn a1_attach_reserved_nonzero_is_inval() {
        for i in 16..20 {
            let mut b = ATTACH.encode();
            b[i] = 1;
            let err = parse(&b).unwrap_err();
            assert_eq!(err, ParseError::AttachReserved);
            assert_eq!(err.status(), Some(Status::Inval));
        }
    }

    #[test]
    fn a2_attach_unknown_flag_is_inval() {
        let mut b = ATTACH.encode();
        b[12] = 0x02;
        let err = parse(&b).unwrap_err();
        assert_eq!(err, ParseError::AttachUnknownFlags { flags: 2 });
        assert_eq!(err.status(), Some(Status::Inval));
        b[12] = 0;
        b[15] = 0x80;
        assert_eq!(
            parse(&b),
            Err(ParseError::AttachUnknownFlags { flags: 1 << 31 })
        );
        // ATTACH_F_BYPASS is unknown unless F_BYPASS_CONFIG was negotiated.
        let b = ATTACH.encode();
        let features = ALL_F & !F_BYPASS_CONFIG;
        let err = Request::parse(&b, TAIL_SIZE, features, 0).unwrap_err();
        assert_eq!(err, ParseError::AttachUnknownFlags { flags: 1 });
        assert_eq!(err.status(), Some(Status::Inval));
    }

    #[test]
    fn d1_detach_ignores_reserved() {
        let req = Request::Detach {
            domain: 1,
            endpoint: 2,
        };
        let mut b = req.encode();
        b[12..20].fill(0xff);
        assert_eq!(parse(&b), Ok(req));
    }

    #[test]
    fn g2_unknown_type_writes_nothing() {
        for ty in [0u8, 6, 7, 0x80, 0xff] {
            let mut b = ATTACH.encode();
            b[0] = ty;
            let err = parse(&b).unwrap_err();
            assert_eq!(err, ParseError::UnknownType(ty));
            assert_eq!(err.status(), None);
        }
    }

    #[test]
    fn g3_head_reserved_ignored_tail_reserved_zero() {
        let mut b = MAP.encode();
        b[1..4].copy_from_slice(&[0xde, 0xad, 0xff]);
        assert_eq!(parse(&b), Ok(MAP));
        for s in Status::ALL {
            assert_eq!(s.tail()[1..], [0, 0, 0]);
        }
    }

    #[test]
    fn m3_map_unknown_flag_is_inval() {
        let mut b = MAP.encode();
        b[32] = 0x08;
        let err = parse(&b).unwrap_err();
        assert_eq!(err, ParseError::MapUnknownFlags { flags: 8 });
        assert_eq!(err.status(), Some(Status::Inval));
        // MAP_F_MMIO is unknown unless F_MMIO was negotiated.
        b[32] = (MAP_F_READ | MAP_F_MMIO) as u8;
        let err = Request::parse(&b, TAIL_SIZE, ALL_F & !F_MMIO, 0).unwrap_err();
        assert_eq!(err, ParseError::MapUnknownFlags { flags: 5 });
        assert_eq!(err.status(), Some(Status::Inval));
        let Ok(Request::Map { flags, .. }) = parse(&b) else {
            panic!("MMIO refused with F_MMIO");
        };
        assert!(flags.mmio && flags.read && !flags.write);
    }

    #[test]
    fn u1_unmap_reserved_nonzero_is_inval() {
        let mut b = UNMAP.encode();
        b[27] = 1;
        let err = parse(&b).unwrap_err();
        assert_eq!(err, ParseError::UnmapReserved);
        assert_eq!(err.status(), Some(Status::Inval));
    }

    #[test]
    fn p1_probe_ignores_reserved() {
        let req = Request::Probe { endpoint: 9 };
        let mut b = req.encode();
        b[8..72].fill(0xa5);
        assert_eq!(parse_with(&b, 516), Ok(req));
    }

    #[test]
    fn p3_probe_not_offered_writes_nothing() {
        let b = Request::Probe { endpoint: 9 }.encode();
        let err = Request::parse(&b, 516, ALL_F & !F_PROBE, PROBE_SIZE).unwrap_err();
        assert_eq!(err, ParseError::ProbeNotNegotiated);
        assert_eq!(err.status(), None);
    }

    #[test]
    fn p7_probe_buffer_too_small_is_inval() {
        let b = Request::Probe { endpoint: 9 }.encode();
        let err = parse_with(&b, 515).unwrap_err();
        assert_eq!(
            err,
            ParseError::ProbeBufferTooSmall {
                properties_len: 511,
                probe_size: PROBE_SIZE
            }
        );
        assert_eq!(err.status(), Some(Status::Inval));
        assert_eq!(
            parse_with(&b, TAIL_SIZE),
            Err(ParseError::ProbeBufferTooSmall {
                properties_len: 0,
                probe_size: PROBE_SIZE
            })
        );
        // A larger area is fine: the properties area is everything before the tail.
        assert!(parse_with(&b, 4096).is_ok());
    }

    #[test]
    fn no_tail_or_no_head_writes_nothing() {
        let b = MAP.encode();
        for w in 0..TAIL_SIZE {
            let err = Request::parse(&b, w, ALL_F, 0).unwrap_err();
            assert_eq!(err, ParseError::NoTail { writable_len: w });
            assert_eq!(err.status(), None);
        }
        for r in 0..HEAD_SIZE {
            let err = parse(&b[..r]).unwrap_err();
            assert_eq!(err, ParseError::NoHead { readable_len: r });
            assert_eq!(err.status(), None);
        }
    }

    #[test]
    fn truncated_request_is_inval() {
        for ty in RequestType::ALL {
            let mut b = vec![0; ty.readable_size()];
            b[0] = ty as u8;
            for len in HEAD_SIZE..ty.readable_size() {
                let err = parse_with(&b[..len], 516).unwrap_err();
                let want = ParseError::Truncated {
                    request: ty,
                    readable_len: len,
                    need: ty.readable_size(),
                };
                assert_eq!(err, want);
                assert_eq!(err.status(), Some(Status::Inval));
            }
        }
    }

    #[test]
    fn map_unmap_need_the_feature() {
        for req in [MAP, UNMAP] {
            let err = Request::parse(&req.encode(), 4, ALL_F & !F_MAP_UNMAP, 0).unwrap_err();
            assert_eq!(err, ParseError::MapUnmapNotNegotiated(req.request_type()));
            assert_eq!(err.status(), Some(Status::Unsupp));
        }
    }

    #[test]
    fn extra_bytes_ignored() {
        let mut b = MAP.encode();
        b.extend([0xff; 16]);
        assert_eq!(Request::parse(&b, 64, ALL_F, 0), Ok(MAP));
    }

    fn any_request() -> impl Strategy<Value = Request> {
        let flags = (0u32..8).prop_map(|b| MapFlags::from_bits(b).unwrap_or_default());
        prop_oneof![
            (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(domain, endpoint, bypass)| {
                Request::Attach {
                    domain,
                    endpoint,
                    bypass,
                }
            }),
            (any::<u32>(), any::<u32>())
                .prop_map(|(domain, endpoint)| Request::Detach { domain, endpoint }),
            (
                any::<u32>(),
                any::<u64>(),
                any::<u64>(),
                any::<u64>(),
                flags
            )
                .prop_map(|(domain, virt_start, virt_end, phys_start, flags)| {
                    Request::Map {
                        domain,
                        virt_start,
                        virt_end,
                        phys_start,
                        flags,
                    }
                }),
            (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(
                |(domain, virt_start, virt_end)| Request::Unmap {
                    domain,
                    virt_start,
                    virt_end,
                }
            ),
            any::<u32>().prop_map(|endpoint| Request::Probe { endpoint }),
        ]
    }

    proptest! {
        #[test]
        fn request_round_trip(req in any_request(), probe_size in 0u32..8192) {
            let b = req.encode();
            prop_assert_eq!(b.len(), req.request_type().readable_size());
            let parsed = Request::parse(&b, req.writable_len(probe_size), ALL_F, probe_size);
            prop_assert_eq!(parsed, Ok(req));
        }

        #[test]
        fn parse_never_panics(
            readable in proptest::collection::vec(any::<u8>(), 0..128),
            ty in 0u8..8,
            writable_len in prop_oneof![0usize..1024, any::<usize>()],
            features in any::<u64>(),
            probe_size in any::<u32>(),
        ) {
            let mut typed = readable.clone();
            if let Some(b) = typed.first_mut() {
                *b = ty;
            }
            for b in [&readable, &typed] {
                let _ = Request::parse(b, writable_len, features, probe_size)
                    .map_err(|e| (e.status(), e.to_string()));
            }
        }
    }
}
