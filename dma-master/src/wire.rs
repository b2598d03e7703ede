// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The DMA-master socket's messages, as bytes: the one definition the daemon and the client
//! share. No I/O here.
//!
//! A message is a frame: an 8-byte header (`kind: u16`, `flags: u16` = 0, `len: u32`, all
//! little-endian) and `len` payload bytes (at most [`MAX_PAYLOAD`]). Every request has a fixed
//! payload size and zero padding; anything else is refused ([`WireError`]), and the daemon
//! drops a master that sends it.
//!
//! | master -> daemon | payload | answer |
//! |---|---|---|
//! | `HELLO` | `version: u32, slots: u32` | `WELCOME` + the tables file, then `SLOTS` + the slots file |
//! | `CLAIM` | `endpoint: u32, 0: u32, cookie: u64` | `ENDPOINT` or `ERROR` |
//! | `USE_DMA_API` | `endpoint: u32` | `ENDPOINT` or `ERROR` |
//! | `RELEASE` | `endpoint: u32` | `DONE` or `ERROR` |
//! | `FAULT` | `endpoint: u32, reason: u8, access: u8, 0: u16, iova: u64` | none |
//!
//! The files travel as SCM_RIGHTS with the first byte of their frame. The tables file holds
//! the model's epoch, control area and page tables as [`SharedLayout`] says; the slots file is
//! one page: word [`REVOKED`] is set by the daemon when it cuts the master off, and slot `i`'s
//! section word is word `SLOT_STRIDE * (i + 1)`. The words after a slot's section word are
//! counters the master keeps for the daemon's `stats` ([`SLOT_TRANSLATIONS`],
//! [`SLOT_IOTLB_MISSES`], [`SLOT_REFUSED`]): written only by the thread that holds the slot,
//! read by the daemon, trusted by nobody.

use ownership::{EndpointId, ResvKind, ResvRegion, SharedLayout};
use thiserror::Error;

/// The protocol version this crate speaks.
pub const VERSION: u32 = 1;
/// Bytes of a frame header.
pub const HEADER: usize = 8;
/// Largest payload of any message.
pub const MAX_PAYLOAD: usize = 4096;
/// Most reader slots one master gets.
pub const MAX_SLOTS: u32 = 31;
/// Most reserved regions an `ENDPOINT` reply lists.
pub const MAX_REGIONS: usize = 64;
/// Bytes of the slots file.
pub const SLOTS_BYTES: u64 = 4096;
/// Words between two slots (one 128-byte line pair each).
pub const SLOT_STRIDE: usize = 16;
/// The slots file's word the daemon sets to cut the master off.
pub const REVOKED: usize = 0;

/// The word of slot `index` in the slots file.
pub const fn slot_word(index: usize) -> usize {
    SLOT_STRIDE * (index + 1)
}

/// Counters after a slot's section word (offsets from [`slot_word`]), kept by the master:
/// translations asked of it (a `vm_memory::Iommu::translate` call, a `Section` or `Handle`
/// translation, an entry of a batch), ...
pub const SLOT_TRANSLATIONS: usize = 1;
/// ... `vm_memory` translations that missed the slot's IOTLB and walked the tables, ...
pub const SLOT_IOTLB_MISSES: usize = 2;
/// ... and translations refused (whether or not the guest is told).
pub const SLOT_REFUSED: usize = 3;

/// Message kinds.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const CLAIM: u16 = 2;
    pub const USE_DMA_API: u16 = 3;
    pub const RELEASE: u16 = 4;
    pub const FAULT: u16 = 5;
    pub const WELCOME: u16 = 0x81;
    pub const SLOTS: u16 = 0x82;
    pub const ENDPOINT: u16 = 0x83;
    pub const DONE: u16 = 0x84;
    pub const ERROR: u16 = 0x85;
}

/// Why bytes are not a valid message.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum WireError {
    #[error("unknown message kind {0:#x}")]
    Kind(u16),
    #[error("header flags {0:#x} are not zero")]
    Flags(u16),
    #[error("payload of {len} bytes for message kind {kind:#x}")]
    Length { kind: u16, len: usize },
    #[error("padding is not zero")]
    Padding,
    #[error("{0} out of range")]
    Value(&'static str),
    #[error("bad layout: {0}")]
    Layout(String),
}

/// A frame header, read from its 8 bytes: the message kind and the payload length (checked
/// against [`MAX_PAYLOAD`]).
pub fn parse_header(bytes: &[u8; HEADER]) -> Result<(u16, usize), WireError> {
    let kind = u16::from_le_bytes([bytes[0], bytes[1]]);
    let flags = u16::from_le_bytes([bytes[2], bytes[3]]);
    let len = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if flags != 0 {
        return Err(WireError::Flags(flags));
    }
    if len > MAX_PAYLOAD {
        return Err(WireError::Length { kind, len });
    }
    Ok((kind, len))
}

fn frame(kind: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&kind.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// Little-endian fields read off a payload of known length.
struct Fields<'a>(&'a [u8]);

impl Fields<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        let n = N.min(self.0.len());
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        out
    }
    fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.take())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
}

/// The access a refused DMA made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAccess {
    Read = 0,
    Write = 1,
}

/// Why a master's translation was refused, as the guest sees it (host-side refusals, such as
/// not owning the group, are never reported).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultReason {
    NoDomain = 1,
    Unmapped = 2,
    OutOfRange = 3,
    Permission = 4,
    Reserved = 5,
}

impl FaultReason {
    /// The report for a fast-path refusal; None for host-side ones.
    pub fn of(fault: ownership::Fault) -> Option<Self> {
        use ownership::Fault;
        Some(match fault {
            Fault::NoDomain => FaultReason::NoDomain,
            Fault::Unmapped => FaultReason::Unmapped,
            Fault::OutOfRange => FaultReason::OutOfRange,
            Fault::Permission => FaultReason::Permission,
            Fault::Reserved => FaultReason::Reserved,
            Fault::UnknownEndpoint | Fault::NotOwner => return None,
        })
    }

    /// The model's fault this stands for.
    pub fn fault(self) -> ownership::Fault {
        use ownership::Fault;
        match self {
            FaultReason::NoDomain => Fault::NoDomain,
            FaultReason::Unmapped => Fault::Unmapped,
            FaultReason::OutOfRange => Fault::OutOfRange,
            FaultReason::Permission => Fault::Permission,
            FaultReason::Reserved => Fault::Reserved,
        }
    }

    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => FaultReason::NoDomain,
            2 => FaultReason::Unmapped,
            3 => FaultReason::OutOfRange,
            4 => FaultReason::Permission,
            5 => FaultReason::Reserved,
            _ => return None,
        })
    }
}

/// A refused translation a master reports, for the guest's event queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultReport {
    pub endpoint: EndpointId,
    pub reason: FaultReason,
    pub access: FaultAccess,
    pub iova: u64,
}

/// A message from a master.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    Hello { version: u32, slots: u32 },
    Claim { endpoint: EndpointId, cookie: u64 },
    UseDmaApi { endpoint: EndpointId },
    Release { endpoint: EndpointId },
    Fault(FaultReport),
}

impl Request {
    /// Decodes a request from its kind and payload. Hostile input: every length, value and
    /// padding byte is checked.
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Request, WireError> {
        let expected = match kind {
            kind::HELLO => 8,
            kind::CLAIM => 16,
            kind::USE_DMA_API | kind::RELEASE => 4,
            kind::FAULT => 16,
            other => return Err(WireError::Kind(other)),
        };
        if payload.len() != expected {
            return Err(WireError::Length {
                kind,
                len: payload.len(),
            });
        }
        let mut f = Fields(payload);
        Ok(match kind {
            kind::HELLO => Request::Hello {
                version: f.u32(),
                slots: f.u32(),
            },
            kind::CLAIM => {
                let endpoint = f.u32();
                if f.u32() != 0 {
                    return Err(WireError::Padding);
                }
                Request::Claim {
                    endpoint,
                    cookie: f.u64(),
                }
            }
            kind::USE_DMA_API => Request::UseDmaApi { endpoint: f.u32() },
            kind::RELEASE => Request::Release { endpoint: f.u32() },
            _ => {
                let endpoint = f.u32();
                let reason =
                    FaultReason::from_u8(f.u8()).ok_or(WireError::Value("fault reason"))?;
                let access = match f.u8() {
                    0 => FaultAccess::Read,
                    1 => FaultAccess::Write,
                    _ => return Err(WireError::Value("fault access")),
                };
                if f.u16() != 0 {
                    return Err(WireError::Padding);
                }
                Request::Fault(FaultReport {
                    endpoint,
                    reason,
                    access,
                    iova: f.u64(),
                })
            }
        })
    }

    /// The request as a frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(16);
        let kind = match *self {
            Request::Hello { version, slots } => {
                p.extend_from_slice(&version.to_le_bytes());
                p.extend_from_slice(&slots.to_le_bytes());
                kind::HELLO
            }
            Request::Claim { endpoint, cookie } => {
                p.extend_from_slice(&endpoint.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&cookie.to_le_bytes());
                kind::CLAIM
            }
            Request::UseDmaApi { endpoint } => {
                p.extend_from_slice(&endpoint.to_le_bytes());
                kind::USE_DMA_API
            }
            Request::Release { endpoint } => {
                p.extend_from_slice(&endpoint.to_le_bytes());
                kind::RELEASE
            }
            Request::Fault(r) => {
                p.extend_from_slice(&r.endpoint.to_le_bytes());
                p.push(r.reason as u8);
                p.push(r.access as u8);
                p.extend_from_slice(&0u16.to_le_bytes());
                p.extend_from_slice(&r.iova.to_le_bytes());
                kind::FAULT
            }
        };
        frame(kind, &p)
    }
}

/// Why the daemon refused a request.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum ErrorCode {
    #[error("protocol version not supported")]
    Version,
    #[error("no such endpoint")]
    UnknownEndpoint,
    #[error("the group has another exclusive DMA owner")]
    Busy,
    #[error("the group has DMA-API users")]
    InUse,
    #[error("invalid owner cookie")]
    InvalidOwner,
    #[error("this master does not hold the endpoint")]
    NotHeld,
    #[error("this master already holds the endpoint")]
    AlreadyHeld,
    #[error("too many endpoints or masters")]
    TooMany,
    #[error("malformed or unexpected message")]
    BadMessage,
    #[error("the daemon could not serve the request")]
    Internal,
    #[error("unknown error code {0}")]
    Unknown(u32),
}

impl ErrorCode {
    fn code(self) -> u32 {
        match self {
            ErrorCode::Version => 1,
            ErrorCode::UnknownEndpoint => 2,
            ErrorCode::Busy => 3,
            ErrorCode::InUse => 4,
            ErrorCode::InvalidOwner => 5,
            ErrorCode::NotHeld => 6,
            ErrorCode::AlreadyHeld => 7,
            ErrorCode::TooMany => 8,
            ErrorCode::BadMessage => 9,
            ErrorCode::Internal => 10,
            ErrorCode::Unknown(code) => code,
        }
    }

    fn from_code(code: u32) -> Self {
        match code {
            1 => ErrorCode::Version,
            2 => ErrorCode::UnknownEndpoint,
            3 => ErrorCode::Busy,
            4 => ErrorCode::InUse,
            5 => ErrorCode::InvalidOwner,
            6 => ErrorCode::NotHeld,
            7 => ErrorCode::AlreadyHeld,
            8 => ErrorCode::TooMany,
            9 => ErrorCode::BadMessage,
            10 => ErrorCode::Internal,
            other => ErrorCode::Unknown(other),
        }
    }
}

/// What a master learns when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub version: u32,
    /// Reader slots granted (at most [`MAX_SLOTS`]).
    pub slots: u32,
    pub layout: SharedLayout,
    /// The IOVAs the model translates, inclusive.
    pub input_range: (u64, u64),
    /// How long the daemon waits for one section of this master before it cuts it off.
    pub stall_bound_ms: u32,
}

/// An endpoint a master took DMA ownership of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointGrant {
    pub endpoint: EndpointId,
    pub group: u32,
    pub regions: Vec<ResvRegion>,
}

/// A message from the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Welcome(Welcome),
    /// Follows `Welcome`, carrying the slots file.
    Slots,
    Endpoint(EndpointGrant),
    Done,
    Error(ErrorCode),
}

const WELCOME_BYTES: usize = 4 * 4 + 8 * 6 + 4 + 4 + 8 * 2;

impl Reply {
    /// The reply as a frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::new();
        let kind = match self {
            Reply::Welcome(w) => {
                let l = &w.layout;
                for v in [w.version, w.slots, w.stall_bound_ms, 0] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                for v in [
                    l.epoch_offset,
                    l.epoch_words,
                    l.control_offset,
                    l.control_words,
                    l.nodes_offset,
                    l.nodes_words,
                ] {
                    p.extend_from_slice(&v.to_le_bytes());
                }
                p.extend_from_slice(&l.groups.to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                p.extend_from_slice(&w.input_range.0.to_le_bytes());
                p.extend_from_slice(&w.input_range.1.to_le_bytes());
                kind::WELCOME
            }
            Reply::Slots => kind::SLOTS,
            Reply::Endpoint(e) => {
                let n = e.regions.len().min(MAX_REGIONS);
                p.extend_from_slice(&e.endpoint.to_le_bytes());
                p.extend_from_slice(&e.group.to_le_bytes());
                p.extend_from_slice(&(n as u32).to_le_bytes());
                p.extend_from_slice(&0u32.to_le_bytes());
                for r in &e.regions[..n] {
                    p.extend_from_slice(&r.start.to_le_bytes());
                    p.extend_from_slice(&r.end.to_le_bytes());
                    let kind: u32 = match r.kind {
                        ResvKind::Reserved => 0,
                        ResvKind::Msi => 1,
                    };
                    p.extend_from_slice(&kind.to_le_bytes());
                    p.extend_from_slice(&0u32.to_le_bytes());
                }
                kind::ENDPOINT
            }
            Reply::Done => kind::DONE,
            Reply::Error(code) => {
                p.extend_from_slice(&code.code().to_le_bytes());
                kind::ERROR
            }
        };
        frame(kind, &p)
    }

    /// Decodes a reply (the client checks what the daemon says, too).
    pub fn decode(kind: u16, payload: &[u8]) -> Result<Reply, WireError> {
        let length = || WireError::Length {
            kind,
            len: payload.len(),
        };
        let mut f = Fields(payload);
        Ok(match kind {
            kind::WELCOME => {
                if payload.len() != WELCOME_BYTES {
                    return Err(length());
                }
                let (version, slots, stall_bound_ms) = (f.u32(), f.u32(), f.u32());
                if f.u32() != 0 {
                    return Err(WireError::Padding);
                }
                let mut words = [0u64; 6];
                for w in &mut words {
                    *w = f.u64();
                }
                let groups = f.u32();
                if f.u32() != 0 {
                    return Err(WireError::Padding);
                }
                let input_range = (f.u64(), f.u64());
                let layout = SharedLayout {
                    epoch_offset: words[0],
                    epoch_words: words[1],
                    control_offset: words[2],
                    control_words: words[3],
                    nodes_offset: words[4],
                    nodes_words: words[5],
                    groups,
                };
                layout
                    .check()
                    .map_err(|e| WireError::Layout(e.to_string()))?;
                if slots == 0 || slots > MAX_SLOTS {
                    return Err(WireError::Value("slots"));
                }
                if input_range.1 < input_range.0 {
                    return Err(WireError::Value("input range"));
                }
                Reply::Welcome(Welcome {
                    version,
                    slots,
                    layout,
                    input_range,
                    stall_bound_ms,
                })
            }
            kind::SLOTS | kind::DONE => {
                if !payload.is_empty() {
                    return Err(length());
                }
                if kind == kind::SLOTS {
                    Reply::Slots
                } else {
                    Reply::Done
                }
            }
            kind::ENDPOINT => {
                if payload.len() < 16 {
                    return Err(length());
                }
                let (endpoint, group, n) = (f.u32(), f.u32(), f.u32() as usize);
                if f.u32() != 0 {
                    return Err(WireError::Padding);
                }
                if n > MAX_REGIONS || payload.len() != 16 + 24 * n {
                    return Err(length());
                }
                let mut regions = Vec::with_capacity(n);
                for _ in 0..n {
                    let (start, end) = (f.u64(), f.u64());
                    let kind = match f.u32() {
                        0 => ResvKind::Reserved,
                        1 => ResvKind::Msi,
                        _ => return Err(WireError::Value("region kind")),
                    };
                    if f.u32() != 0 {
                        return Err(WireError::Padding);
                    }
                    if end < start {
                        return Err(WireError::Value("region"));
                    }
                    regions.push(ResvRegion { kind, start, end });
                }
                Reply::Endpoint(EndpointGrant {
                    endpoint,
                    group,
                    regions,
                })
            }
            kind::ERROR => {
                if payload.len() != 4 {
                    return Err(length());
                }
                Reply::Error(ErrorCode::from_code(f.u32()))
            }
            other => return Err(WireError::Kind(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(frame: &[u8]) -> (u16, &[u8]) {
        let header: [u8; HEADER] = frame[..HEADER].try_into().unwrap();
        let (kind, len) = parse_header(&header).unwrap();
        assert_eq!(len, frame.len() - HEADER);
        (kind, &frame[HEADER..])
    }

    #[test]
    fn requests_round_trip() {
        let all = [
            Request::Hello {
                version: VERSION,
                slots: 4,
            },
            Request::Claim {
                endpoint: 0x28,
                cookie: u64::MAX - 1,
            },
            Request::UseDmaApi { endpoint: 7 },
            Request::Release { endpoint: 7 },
            Request::Fault(FaultReport {
                endpoint: 0x28,
                reason: FaultReason::Permission,
                access: FaultAccess::Write,
                iova: 0xdead_b000,
            }),
        ];
        for r in all {
            let frame = r.encode();
            let (kind, payload) = split(&frame);
            assert_eq!(Request::decode(kind, payload), Ok(r));
        }
    }

    #[test]
    fn replies_round_trip() {
        let all = [
            Reply::Welcome(Welcome {
                version: VERSION,
                slots: 31,
                layout: SharedLayout::new(32, 256 << 20),
                input_range: (0, (1 << 48) - 1),
                stall_bound_ms: 100,
            }),
            Reply::Slots,
            Reply::Endpoint(EndpointGrant {
                endpoint: 0x28,
                group: 3,
                regions: vec![ownership::X86_MSI_REGION],
            }),
            Reply::Done,
            Reply::Error(ErrorCode::Busy),
            Reply::Error(ErrorCode::Unknown(77)),
        ];
        for r in all {
            let frame = r.encode();
            let (kind, payload) = split(&frame);
            assert_eq!(Reply::decode(kind, payload), Ok(r));
        }
    }

    #[test]
    fn hostile_requests_are_refused() {
        assert_eq!(
            parse_header(&[1, 0, 1, 0, 0, 0, 0, 0]),
            Err(WireError::Flags(1))
        );
        assert!(matches!(
            parse_header(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(WireError::Length { .. })
        ));
        assert_eq!(Request::decode(99, &[]), Err(WireError::Kind(99)));
        assert!(Request::decode(kind::HELLO, &[0; 7]).is_err());
        assert!(Request::decode(kind::CLAIM, &[0; 17]).is_err());
        let mut claim = Request::Claim {
            endpoint: 1,
            cookie: 2,
        }
        .encode();
        claim[HEADER + 4] = 1;
        assert_eq!(
            Request::decode(kind::CLAIM, &claim[HEADER..]),
            Err(WireError::Padding)
        );
        let mut fault = Request::Fault(FaultReport {
            endpoint: 1,
            reason: FaultReason::Unmapped,
            access: FaultAccess::Read,
            iova: 0,
        })
        .encode();
        fault[HEADER + 4] = 9;
        assert!(Request::decode(kind::FAULT, &fault[HEADER..]).is_err());
        fault[HEADER + 4] = 2;
        fault[HEADER + 5] = 2;
        assert!(Request::decode(kind::FAULT, &fault[HEADER..]).is_err());
    }

    #[test]
    fn hostile_replies_are_refused() {
        let mut welcome = Reply::Welcome(Welcome {
            version: VERSION,
            slots: 1,
            layout: SharedLayout::new(1, 1 << 20),
            input_range: (0, 1),
            stall_bound_ms: 1,
        })
        .encode();
        // Slots beyond the maximum.
        welcome[HEADER + 4] = 200;
        assert!(Reply::decode(kind::WELCOME, &welcome[HEADER..]).is_err());
        welcome[HEADER + 4] = 1;
        // A misaligned control area.
        welcome[HEADER + 32] = 8;
        assert!(matches!(
            Reply::decode(kind::WELCOME, &welcome[HEADER..]),
            Err(WireError::Layout(_))
        ));
        let mut endpoint = Reply::Endpoint(EndpointGrant {
            endpoint: 1,
            group: 0,
            regions: vec![ownership::X86_MSI_REGION],
        })
        .encode();
        endpoint[HEADER + 8] = 2;
        assert!(Reply::decode(kind::ENDPOINT, &endpoint[HEADER..]).is_err());
    }
}
