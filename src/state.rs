// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The device state as bytes: what a migration carries from one daemon to another and what
//! `--state-file` keeps across a restart.
//!
//! Everything the guest can observe, and nothing else: the negotiated features, the config
//! space's `bypass`, every domain with its kind and mappings (flags included), which endpoints
//! of which group are attached to which domain, and the fault records not yet delivered. The
//! topology (endpoints, groups, reserved regions, page sizes, ranges) comes from the daemon's
//! options and is not carried; a fingerprint of it is, so that a state is never loaded into a
//! daemon that describes another platform.
//!
//! # Format, version 1
//!
//! All fixed-size integers are little-endian; `v` is an unsigned LEB128 varint (at most 10
//! bytes), `z` a zigzag-encoded signed one. Addresses are counted in 4 KiB pages (every
//! mapping is aligned to the granule, which is at least 4 KiB).
//!
//! ```text
//! header (24 bytes)
//!   magic        8   "VIOMMUst"
//!   version      u16 1
//!   flags        u16 0 (no flag is defined; a state with one set is refused)
//!   fingerprint  u32 CRC-32 of the topology's canonical description (see `fingerprint`)
//!   body length  u64 bytes between the header and the trailer
//! body
//!   features     v   the features the driver acknowledged
//!   bypass       u8  0 or 1
//!   domains      v   count, then per domain, by increasing ID:
//!     id         v   the first ID, then the distance from the previous ID minus 1
//!     kind       u8  0 paging, 1 identity
//!     mappings   v   count, then per mapping, by increasing IOVA:
//!       gap      v   pages from the end of the previous mapping (from 0 for the first)
//!       pages    v   length in pages, minus 1
//!       phys     z   pages from the end of the previous mapping's GPA range (from 0)
//!       flags    u8  READ 1, WRITE 2, MMIO 4 (as MAP's flags)
//!   attachments  v   count, then per attached group:
//!     domain     v
//!     endpoints  v   count, then the first ID and the distances minus 1
//!   faults       v   count, then each record as the event queue carries it (24 bytes)
//! trailer
//!   crc          u32 CRC-32 of the header and the body
//! ```
//!
//! A 4 KiB mapping next to the previous one in IOVA and GPA takes 4 bytes. Loading is all or
//! nothing: every count is bounded by the bytes left before anything is allocated, the
//! checksum and the fingerprint are checked before the model is touched, and the model itself
//! replays the state through its guest-face rules (`ownership::Iommu::restore`).

use std::io::Read;

use ownership::{Attachment, DomainKind, DomainState, GuestState, Mapping, Perms, Topology};
use thiserror::Error;
use virtio::{FaultRecord, FAULT_SIZE};

pub const MAGIC: [u8; 8] = *b"VIOMMUst";
pub const VERSION: u16 = 1;
const HEADER: usize = 24;
const TRAILER: usize = 4;
const PAGE_SHIFT: u32 = 12;

/// The guest-visible state of the whole device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// Features the driver acknowledged (0 before FEATURES_OK).
    pub features: u64,
    /// The config space's `bypass` byte.
    pub bypass: bool,
    pub guest: GuestState,
    /// Fault records not yet delivered, oldest first.
    pub faults: Vec<FaultRecord>,
}

/// Why a state was refused. Nothing was changed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum StateError {
    #[error("not a vhost-device-iommu state (bad magic)")]
    Magic,
    #[error("state format version {0} is not supported (this daemon reads version {VERSION})")]
    Version(u16),
    #[error("unknown state flags {0:#x}")]
    Flags(u16),
    #[error("truncated: {needed} bytes needed, {got} present")]
    Truncated { needed: u64, got: u64 },
    #[error("{0} bytes of trailing data after the state")]
    TrailingData(u64),
    #[error("larger than the {0} bytes this daemon's limits allow")]
    Oversized(u64),
    #[error("checksum mismatch: the state is corrupt")]
    Checksum,
    #[error(
        "saved for another topology (fingerprint {saved:#010x}, this daemon's is {ours:#010x}): \
         start the daemon with the same --endpoints, --group, --reserved, --page-size-mask, \
         --input-range, --domain-range and feature options as the one that saved it"
    )]
    Topology { saved: u32, ours: u32 },
    #[error("corrupt body: {0}")]
    Body(&'static str),
    #[error("features {0:#x} were negotiated but this daemon does not offer them")]
    Features(u64),
    #[error("{count} {what} exceed this daemon's limit of {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("the model refused the state: {0}")]
    Model(#[from] ownership::RestoreError),
    #[error("reading the state: {0}")]
    Io(String),
}

/// The caps a loaded state must respect (from the daemon's options).
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    pub offered_features: u64,
    pub max_domains: u64,
    pub max_mappings: u64,
    pub max_faults: u64,
    pub endpoints: u64,
}

impl Caps {
    /// The largest state these caps allow, in bytes: every varint at its longest.
    pub fn max_bytes(&self) -> u64 {
        let per_mapping = 10 + 10 + 10 + 1;
        let per_domain = 10 + 1 + 10 + 10 + 10;
        (HEADER + TRAILER + 64) as u64
            + self.max_mappings.saturating_mul(per_mapping)
            + self.max_domains.saturating_mul(per_domain)
            + self.endpoints.saturating_mul(10)
            + self.max_faults.saturating_mul(FAULT_SIZE as u64)
    }
}

/// A fingerprint of what the guest sees of the platform besides the state: the page-size
/// mask, the input and domain ranges, the offered features, and every endpoint with its group
/// and reserved regions.
pub fn fingerprint(topology: &Topology, offered_features: u64) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&topology.page_size_mask().to_le_bytes());
    let (start, end) = topology.input_range();
    h.update(&start.to_le_bytes());
    h.update(&end.to_le_bytes());
    let (first, last) = topology.domain_range();
    h.update(&first.to_le_bytes());
    h.update(&last.to_le_bytes());
    h.update(&offered_features.to_le_bytes());
    for (id, info) in topology.endpoints() {
        h.update(&id.to_le_bytes());
        h.update(&info.group.0.to_le_bytes());
        h.update(&(info.regions.len() as u32).to_le_bytes());
        for r in &info.regions {
            h.update(&[r.kind as u8]);
            h.update(&r.start.to_le_bytes());
            h.update(&r.end.to_le_bytes());
        }
    }
    h.finalize()
}

fn put_v(out: &mut Vec<u8>, v: u64) {
    // Writing to a Vec cannot fail.
    let _ = leb128::write::unsigned(out, v);
}

fn put_z(out: &mut Vec<u8>, v: i64) {
    put_v(out, ((v << 1) ^ (v >> 63)) as u64);
}

fn map_flags(perms: Perms) -> u8 {
    u8::from(perms.contains(Perms::READ))
        | u8::from(perms.contains(Perms::WRITE)) << 1
        | u8::from(perms.contains(Perms::MMIO)) << 2
}

/// Encodes `state` (see the module documentation for the format).
pub fn encode(state: &DeviceState, fingerprint: u32) -> Vec<u8> {
    let guest = &state.guest;
    let mut out = Vec::with_capacity(
        HEADER + TRAILER + 64 + 6 * guest.mapping_count() as usize + 24 * state.faults.len(),
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&0u64.to_le_bytes());
    put_v(&mut out, state.features);
    out.push(u8::from(state.bypass));
    put_v(&mut out, guest.domains.len() as u64);
    let mut previous: Option<u32> = None;
    for d in &guest.domains {
        put_v(&mut out, id_step(previous, d.id));
        previous = Some(d.id);
        out.push(match d.kind {
            DomainKind::Paging => 0,
            DomainKind::Identity => 1,
        });
        put_v(&mut out, d.mappings.len() as u64);
        let (mut virt_next, mut phys_next) = (0u64, 0i64);
        for m in &d.mappings {
            let start = m.virt_start >> PAGE_SHIFT;
            let last = m.virt_end >> PAGE_SHIFT;
            put_v(&mut out, start.wrapping_sub(virt_next));
            put_v(&mut out, last - start);
            let phys = (m.phys_start >> PAGE_SHIFT) as i64;
            put_z(&mut out, phys.wrapping_sub(phys_next));
            out.push(map_flags(m.perms));
            virt_next = last.wrapping_add(1);
            phys_next = phys.wrapping_add((last - start + 1) as i64);
        }
    }
    put_v(&mut out, guest.attachments.len() as u64);
    for a in &guest.attachments {
        put_v(&mut out, u64::from(a.domain));
        put_v(&mut out, a.endpoints.len() as u64);
        let mut previous = None;
        for &e in &a.endpoints {
            put_v(&mut out, id_step(previous, e));
            previous = Some(e);
        }
    }
    put_v(&mut out, state.faults.len() as u64);
    for f in &state.faults {
        out.extend_from_slice(&f.to_bytes());
    }
    let body = (out.len() - HEADER) as u64;
    out[16..24].copy_from_slice(&body.to_le_bytes());
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// An ID as its distance from the previous one in an increasing list (the first as is).
fn id_step(previous: Option<u32>, id: u32) -> u64 {
    match previous {
        None => u64::from(id),
        Some(p) => u64::from(id.wrapping_sub(p).wrapping_sub(1)),
    }
}

/// A cursor over a body that refuses to read past its end.
struct Body<'a> {
    bytes: &'a [u8],
}

impl Body<'_> {
    fn v(&mut self) -> Result<u64, StateError> {
        leb128::read::unsigned(&mut self.bytes).map_err(|e| match e {
            leb128::read::Error::Overflow => StateError::Body("varint longer than 64 bits"),
            leb128::read::Error::IoError(_) => StateError::Body("ends inside a varint"),
        })
    }

    fn z(&mut self) -> Result<i64, StateError> {
        let v = self.v()?;
        Ok((v >> 1) as i64 ^ -((v & 1) as i64))
    }

    fn u8(&mut self) -> Result<u8, StateError> {
        let (&b, rest) = self
            .bytes
            .split_first()
            .ok_or(StateError::Body("ends inside a field"))?;
        self.bytes = rest;
        Ok(b)
    }

    fn u32_id(&mut self, previous: Option<u32>) -> Result<u32, StateError> {
        let step = self.v()?;
        // A hostile step can be anything up to 2^64 - 1: the sum must not overflow.
        let id = match previous {
            None => Some(step),
            Some(p) => (u64::from(p) + 1).checked_add(step),
        };
        id.and_then(|id| u32::try_from(id).ok())
            .ok_or(StateError::Body("ID above 2^32"))
    }

    /// A count of items that take at least `min_bytes` each: never more than the bytes left.
    fn count(&mut self, min_bytes: usize) -> Result<usize, StateError> {
        let n = self.v()?;
        if n > (self.bytes.len() / min_bytes) as u64 {
            return Err(StateError::Body(
                "a count larger than the bytes that follow",
            ));
        }
        Ok(n as usize)
    }
}

fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Decodes and checks a state: format, checksum, fingerprint and caps. The model's own rules
/// are checked when it is loaded (`ownership::Iommu::restore`).
pub fn decode(bytes: &[u8], fingerprint: u32, caps: &Caps) -> Result<DeviceState, StateError> {
    let len = bytes.len() as u64;
    if len > caps.max_bytes() {
        return Err(StateError::Oversized(caps.max_bytes()));
    }
    if bytes.len() < HEADER {
        return Err(StateError::Truncated {
            needed: HEADER as u64,
            got: len,
        });
    }
    if bytes[..8] != MAGIC {
        return Err(StateError::Magic);
    }
    let version = le_u16(bytes, 8);
    if version != VERSION {
        return Err(StateError::Version(version));
    }
    let flags = le_u16(bytes, 10);
    if flags != 0 {
        return Err(StateError::Flags(flags));
    }
    let saved = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
    let body_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let needed = (HEADER as u64 + TRAILER as u64).saturating_add(body_len);
    if len < needed {
        return Err(StateError::Truncated { needed, got: len });
    }
    if len > needed {
        return Err(StateError::TrailingData(len - needed));
    }
    let (covered, trailer) = bytes.split_at(bytes.len() - TRAILER);
    let crc = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    if crc32fast::hash(covered) != crc {
        return Err(StateError::Checksum);
    }
    if saved != fingerprint {
        return Err(StateError::Topology {
            saved,
            ours: fingerprint,
        });
    }
    let mut body = Body {
        bytes: &covered[HEADER..],
    };
    let features = body.v()?;
    if features & !caps.offered_features != 0 {
        return Err(StateError::Features(features & !caps.offered_features));
    }
    let bypass = match body.u8()? {
        0 => false,
        1 => true,
        _ => return Err(StateError::Body("bypass is neither 0 nor 1")),
    };
    let domain_count = body.count(3)?;
    check_cap("domains", domain_count as u64, caps.max_domains)?;
    let mut domains = Vec::with_capacity(domain_count);
    let mut mappings_total = 0u64;
    let mut previous = None;
    for _ in 0..domain_count {
        let id = body.u32_id(previous)?;
        previous = Some(id);
        let kind = match body.u8()? {
            0 => DomainKind::Paging,
            1 => DomainKind::Identity,
            _ => return Err(StateError::Body("unknown domain kind")),
        };
        let n = body.count(4)?;
        mappings_total += n as u64;
        check_cap("mappings", mappings_total, caps.max_mappings)?;
        let mut mappings = Vec::with_capacity(n);
        let (mut virt_next, mut phys_next) = (0u64, 0i64);
        for _ in 0..n {
            let start = virt_next
                .checked_add(body.v()?)
                .ok_or(StateError::Body("IOVA beyond 2^64"))?;
            let last = start
                .checked_add(body.v()?)
                .filter(|&l| l <= u64::MAX >> PAGE_SHIFT)
                .ok_or(StateError::Body("IOVA beyond 2^64"))?;
            if start > u64::MAX >> PAGE_SHIFT {
                return Err(StateError::Body("IOVA beyond 2^64"));
            }
            let phys = phys_next
                .checked_add(body.z()?)
                .filter(|&p| (0..=(u64::MAX >> PAGE_SHIFT) as i64).contains(&p))
                .ok_or(StateError::Body("GPA outside 0..2^64"))?;
            let flags = body.u8()?;
            if flags & !7 != 0 {
                return Err(StateError::Body("unknown mapping flags"));
            }
            let perms = [(1, Perms::READ), (2, Perms::WRITE), (4, Perms::MMIO)]
                .iter()
                .filter(|(bit, _)| flags & bit != 0)
                .fold(Perms::empty(), |p, (_, perm)| p | *perm);
            mappings.push(Mapping {
                virt_start: start << PAGE_SHIFT,
                virt_end: (last << PAGE_SHIFT) | ((1 << PAGE_SHIFT) - 1),
                phys_start: (phys as u64) << PAGE_SHIFT,
                perms,
            });
            virt_next = last.wrapping_add(1);
            phys_next = phys.saturating_add((last - start + 1) as i64);
        }
        domains.push(DomainState { id, kind, mappings });
    }
    let attachment_count = body.count(3)?;
    check_cap("attachments", attachment_count as u64, caps.endpoints)?;
    let mut attachments = Vec::with_capacity(attachment_count);
    for _ in 0..attachment_count {
        let domain = u32::try_from(body.v()?).map_err(|_| StateError::Body("ID above 2^32"))?;
        let n = body.count(1)?;
        check_cap("attached endpoints", n as u64, caps.endpoints)?;
        let mut endpoints = Vec::with_capacity(n);
        let mut previous = None;
        for _ in 0..n {
            let e = body.u32_id(previous)?;
            previous = Some(e);
            endpoints.push(e);
        }
        attachments.push(Attachment { domain, endpoints });
    }
    let fault_count = body.count(FAULT_SIZE)?;
    check_cap("fault records", fault_count as u64, caps.max_faults)?;
    let mut faults = Vec::with_capacity(fault_count);
    for _ in 0..fault_count {
        let mut record = [0u8; FAULT_SIZE];
        body.bytes
            .read_exact(&mut record)
            .map_err(|_| StateError::Body("ends inside a fault record"))?;
        faults.push(
            FaultRecord::from_bytes(&record)
                .map_err(|_| StateError::Body("malformed fault record"))?,
        );
    }
    if !body.bytes.is_empty() {
        return Err(StateError::Body("bytes left after the fault records"));
    }
    Ok(DeviceState {
        features,
        bypass,
        guest: GuestState {
            domains,
            attachments,
        },
        faults,
    })
}

fn check_cap(what: &'static str, count: u64, limit: u64) -> Result<(), StateError> {
    if count > limit {
        return Err(StateError::TooMany { what, count, limit });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ownership::{Iommu, Limits, X86_MSI_REGION};
    use virtio::{FaultReason, FAULT_F_ADDRESS, FAULT_F_READ};

    use super::*;

    const PAGE: u64 = 4096;

    #[test]
    fn an_id_step_past_2_to_the_64_is_refused() {
        for (previous, step) in [
            (Some(5), u64::MAX),
            (Some(u32::MAX), u64::MAX - u64::from(u32::MAX)),
            (Some(u32::MAX), 0),
            (None, u64::from(u32::MAX) + 1),
        ] {
            let mut bytes = Vec::new();
            put_v(&mut bytes, step);
            let mut body = Body { bytes: &bytes };
            assert!(
                matches!(
                    body.u32_id(previous),
                    Err(StateError::Body("ID above 2^32"))
                ),
                "{previous:?} + {step}"
            );
        }
        let mut bytes = Vec::new();
        put_v(&mut bytes, 2);
        assert_eq!(Body { bytes: &bytes }.u32_id(Some(7)).unwrap(), 10);
    }

    fn topology() -> Topology {
        Topology::builder()
            .endpoints([0x28, 0x30, 0x31])
            .group([0x30, 0x31])
            .region_all(X86_MSI_REGION)
            .build()
            .unwrap()
    }

    fn caps() -> Caps {
        let limits = Limits::default();
        Caps {
            offered_features: 0xff,
            max_domains: u64::from(limits.max_domains),
            max_mappings: limits.max_mappings,
            max_faults: 256,
            endpoints: 3,
        }
    }

    fn sample() -> DeviceState {
        let mut m = Iommu::new(topology());
        m.attach(1, 0x28, DomainKind::Paging).unwrap();
        m.attach(2, 0x31, DomainKind::Identity).unwrap();
        for i in 0..100u64 {
            m.map(
                1,
                i * PAGE,
                i * PAGE + PAGE - 1,
                0x100_0000 + i * PAGE,
                Perms::READ,
            )
            .unwrap();
        }
        m.map(
            1,
            1 << 40,
            (1 << 40) + (2 << 20) - 1,
            0x20_0000,
            Perms::WRITE | Perms::MMIO,
        )
        .unwrap();
        DeviceState {
            features: 0x75,
            bypass: true,
            guest: m.guest_state(),
            faults: vec![FaultRecord {
                reason: FaultReason::Mapping,
                flags: FAULT_F_READ | FAULT_F_ADDRESS,
                endpoint: 0x28,
                address: 0xdead_0000,
            }],
        }
    }

    #[test]
    fn round_trip() {
        let state = sample();
        let fp = fingerprint(&topology(), 0xff);
        let bytes = encode(&state, fp);
        assert_eq!(decode(&bytes, fp, &caps()), Ok(state.clone()));
        // Adjacent 4 KiB mappings cost 4 bytes each.
        assert!(bytes.len() < 4 * 101 + 120, "{} bytes", bytes.len());
        // An empty device.
        let empty = DeviceState::default();
        assert_eq!(decode(&encode(&empty, fp), fp, &caps()), Ok(empty));
    }

    #[test]
    fn extreme_addresses_round_trip() {
        let m = |virt_start: u64, virt_end: u64, phys_start: u64| Mapping {
            virt_start,
            virt_end,
            phys_start,
            perms: Perms::READ,
        };
        let state = DeviceState {
            guest: GuestState {
                domains: vec![DomainState {
                    id: u32::MAX,
                    kind: DomainKind::Paging,
                    mappings: vec![
                        m(0, PAGE - 1, u64::MAX - PAGE + 1),
                        m(PAGE, 2 * PAGE - 1, 0),
                        m(u64::MAX - PAGE + 1, u64::MAX, 0x1000),
                    ],
                }],
                attachments: vec![Attachment {
                    domain: u32::MAX,
                    endpoints: vec![0, u32::MAX],
                }],
            },
            ..DeviceState::default()
        };
        let bytes = encode(&state, 7);
        assert_eq!(decode(&bytes, 7, &caps()), Ok(state));
    }

    #[test]
    fn damaged_states_are_refused() {
        let fp = fingerprint(&topology(), 0xff);
        let good = encode(&sample(), fp);
        let refuse = |bytes: &[u8]| decode(bytes, fp, &caps()).unwrap_err();
        for cut in [0, 7, 23, 24, good.len() / 2, good.len() - 1] {
            assert!(matches!(refuse(&good[..cut]), StateError::Truncated { .. }));
        }
        let mut longer = good.clone();
        longer.push(0);
        assert_eq!(refuse(&longer), StateError::TrailingData(1));
        for at in [30, good.len() / 2, good.len() - 1] {
            let mut flipped = good.clone();
            flipped[at] ^= 0x10;
            assert_eq!(refuse(&flipped), StateError::Checksum);
        }
        let mut magic = good.clone();
        magic[0] = b'X';
        assert_eq!(refuse(&magic), StateError::Magic);
        let mut version = good.clone();
        version[8] = 2;
        assert_eq!(refuse(&version), StateError::Version(2));
        let mut flags = good.clone();
        flags[10] = 1;
        assert_eq!(refuse(&flags), StateError::Flags(1));
        // Another topology: another fingerprint, caught before the body is read.
        let other = fingerprint(&topology(), 0x7f);
        assert!(matches!(
            decode(&good, other, &caps()),
            Err(StateError::Topology { .. })
        ));
        let small = Caps {
            max_faults: 0,
            ..caps()
        };
        assert!(matches!(
            decode(&good, fp, &small),
            Err(StateError::TooMany {
                what: "fault records",
                ..
            })
        ));
        let tiny = Caps {
            max_mappings: 1,
            max_domains: 1,
            endpoints: 1,
            max_faults: 1,
            ..caps()
        };
        assert!(matches!(
            decode(&good, fp, &tiny),
            Err(StateError::Oversized(_))
        ));
        let fewer = Caps {
            offered_features: 0x0f,
            ..caps()
        };
        assert_eq!(decode(&good, fp, &fewer), Err(StateError::Features(0x70)));
    }

    /// A body that is well-formed bytes but claims more than it holds, with a valid checksum.
    #[test]
    fn counts_larger_than_the_body_are_refused_before_allocating() {
        let fp = 1u32;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.extend_from_slice(&0u16.to_le_bytes());
        bytes.extend_from_slice(&fp.to_le_bytes());
        bytes.extend_from_slice(&0u64.to_le_bytes());
        put_v(&mut bytes, 0);
        bytes.push(0);
        put_v(&mut bytes, 1 << 40);
        let body = (bytes.len() - HEADER) as u64;
        bytes[16..24].copy_from_slice(&body.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            decode(&bytes, fp, &caps()),
            Err(StateError::Body(_))
        ));
    }
}
