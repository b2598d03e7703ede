// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz-input types shared by the targets: small selectors that steer the fuzzer towards the
//! values that matter (IDs a topology knows, page-aligned addresses, the ends of ranges)
//! while still reaching every value, and requests as the driver would write them.

use arbitrary::Arbitrary;
use virtio::{RequestType, HEAD_SIZE};

use crate::enc::Blob;
use crate::{enc_enum, enc_struct};

/// A 32-bit ID (domain or endpoint): mostly small, sometimes anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Id {
    Small(u8),
    Max,
    Raw(u32),
}
enc_enum!(Id, 3; Id::Small(v) => 0 [v], Id::Max => 1 [], Id::Raw(v) => 2 [v]);

impl Id {
    pub fn get(self) -> u32 {
        match self {
            Id::Small(v) => u32::from(v),
            Id::Max => u32::MAX,
            Id::Raw(v) => v,
        }
    }
}

/// A 64-bit address: page multiples, 2 MiB multiples, page offsets, the top of the space,
/// or anything.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    Page(u16),
    Huge(u8),
    Offset { page: u8, offset: u16 },
    FromTop(u16),
    Raw(u64),
}
enc_enum!(Addr, 5;
    Addr::Page(p) => 0 [p],
    Addr::Huge(h) => 1 [h],
    Addr::Offset { page, offset } => 2 [page, offset],
    Addr::FromTop(n) => 3 [n],
    Addr::Raw(v) => 4 [v],
);

impl Addr {
    pub fn get(self, page: u64) -> u64 {
        match self {
            Addr::Page(p) => u64::from(p) * page,
            Addr::Huge(h) => u64::from(h) << 21,
            Addr::Offset { page: p, offset } => u64::from(p) * page + u64::from(offset),
            Addr::FromTop(n) => u64::MAX - (u64::from(n) + 1) * page + 1,
            Addr::Raw(v) => v,
        }
    }
}

/// A length in bytes (an end address is `start + len - 1`, wrapping).
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Len {
    Pages(u8),
    Huge(u8),
    Zero,
    All,
    Raw(u64),
}
enc_enum!(Len, 5;
    Len::Pages(n) => 0 [n],
    Len::Huge(n) => 1 [n],
    Len::Zero => 2 [],
    Len::All => 3 [],
    Len::Raw(v) => 4 [v],
);

impl Len {
    pub fn get(self, page: u64) -> u64 {
        match self {
            Len::Pages(n) => (u64::from(n % 16) + 1) * page,
            Len::Huge(n) => (u64::from(n % 4) + 1) << 21,
            Len::Zero => 0,
            Len::All => u64::MAX,
            Len::Raw(v) => v,
        }
    }

    /// The inclusive end of `[start, start + len)`, wrapping as a hostile driver's would.
    pub fn end(self, start: u64, page: u64) -> u64 {
        start.wrapping_add(self.get(page).wrapping_sub(1))
    }
}

/// A request body as the driver lays it out, reserved fields included so that the fuzzer
/// can set them.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum ReqSpec {
    Attach {
        domain: Id,
        endpoint: Id,
        flags: u32,
        reserved: u32,
    },
    Detach {
        domain: Id,
        endpoint: Id,
        reserved: u64,
    },
    Map {
        domain: Id,
        start: Addr,
        len: Len,
        phys: Addr,
        flags: u32,
    },
    Unmap {
        domain: Id,
        start: Addr,
        len: Len,
        reserved: u32,
    },
    Probe {
        endpoint: Id,
        reserved: u8,
    },
    /// Any type byte and body.
    Raw {
        ty: u8,
        body: Blob,
    },
}
enc_enum!(ReqSpec, 6;
    ReqSpec::Attach { domain, endpoint, flags, reserved } => 0 [domain, endpoint, flags, reserved],
    ReqSpec::Detach { domain, endpoint, reserved } => 1 [domain, endpoint, reserved],
    ReqSpec::Map { domain, start, len, phys, flags } => 2 [domain, start, len, phys, flags],
    ReqSpec::Unmap { domain, start, len, reserved } => 3 [domain, start, len, reserved],
    ReqSpec::Probe { endpoint, reserved } => 4 [endpoint, reserved],
    ReqSpec::Raw { ty, body } => 5 [ty, body],
);

/// A request's device-readable bytes: the body, a head reserved byte, and an optional cut.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub struct ReqBytes {
    pub spec: ReqSpec,
    /// Written to head byte 3 (spec G3: ignored by the device).
    pub head_reserved: u8,
    /// Keep only this many bytes.
    pub cut: Option<u8>,
}
enc_struct!(ReqBytes; spec, head_reserved, cut);

const PAGE: u64 = 4096;

impl ReqBytes {
    pub fn new(spec: ReqSpec) -> Self {
        ReqBytes {
            spec,
            head_reserved: 0,
            cut: None,
        }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let ty = |t: RequestType| {
            let mut b = vec![0u8; t.readable_size()];
            b[0] = t as u8;
            b
        };
        let mut b = match &self.spec {
            ReqSpec::Attach {
                domain,
                endpoint,
                flags,
                reserved,
            } => {
                let mut b = ty(RequestType::Attach);
                b[4..8].copy_from_slice(&domain.get().to_le_bytes());
                b[8..12].copy_from_slice(&endpoint.get().to_le_bytes());
                b[12..16].copy_from_slice(&flags.to_le_bytes());
                b[16..20].copy_from_slice(&reserved.to_le_bytes());
                b
            }
            ReqSpec::Detach {
                domain,
                endpoint,
                reserved,
            } => {
                let mut b = ty(RequestType::Detach);
                b[4..8].copy_from_slice(&domain.get().to_le_bytes());
                b[8..12].copy_from_slice(&endpoint.get().to_le_bytes());
                b[12..20].copy_from_slice(&reserved.to_le_bytes());
                b
            }
            ReqSpec::Map {
                domain,
                start,
                len,
                phys,
                flags,
            } => {
                let mut b = ty(RequestType::Map);
                let s = start.get(PAGE);
                b[4..8].copy_from_slice(&domain.get().to_le_bytes());
                b[8..16].copy_from_slice(&s.to_le_bytes());
                b[16..24].copy_from_slice(&len.end(s, PAGE).to_le_bytes());
                b[24..32].copy_from_slice(&phys.get(PAGE).to_le_bytes());
                b[32..36].copy_from_slice(&flags.to_le_bytes());
                b
            }
            ReqSpec::Unmap {
                domain,
                start,
                len,
                reserved,
            } => {
                let mut b = ty(RequestType::Unmap);
                let s = start.get(PAGE);
                b[4..8].copy_from_slice(&domain.get().to_le_bytes());
                b[8..16].copy_from_slice(&s.to_le_bytes());
                b[16..24].copy_from_slice(&len.end(s, PAGE).to_le_bytes());
                b[24..28].copy_from_slice(&reserved.to_le_bytes());
                b
            }
            ReqSpec::Probe { endpoint, reserved } => {
                let mut b = ty(RequestType::Probe);
                b[4..8].copy_from_slice(&endpoint.get().to_le_bytes());
                b[8..72].fill(*reserved);
                b
            }
            ReqSpec::Raw { ty, body } => {
                let mut b = vec![*ty, 0, 0, 0];
                b.extend_from_slice(&body.0);
                b
            }
        };
        if b.len() >= HEAD_SIZE {
            b[3] = self.head_reserved;
        }
        if let Some(cut) = self.cut {
            b.truncate(usize::from(cut));
        }
        b
    }
}
