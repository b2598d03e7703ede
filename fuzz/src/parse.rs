// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `parse`: the wire format crate on hostile bytes.
//!
//! Each input is a sequence of [`Case`]s. Beyond "no panic", every case checks the properties
//! that hold for it: a parsed request re-encodes to the bytes it came from (reserved fields the
//! device ignores aside) and parses the same from any longer buffer; features gate what they
//! gate; PROBE properties and fault records round-trip; config accesses touch what they may.

use arbitrary::Arbitrary;
use virtio::{
    decode_probe_properties, encode_probe_properties, probe_properties_size, validate_resv_mem,
    Config, ConfigWriteError, FaultError, FaultReason, FaultRecord, ParseError, ProbeError,
    ProbeProperty, Request, RequestType, ResvMem, ResvMemType, CONFIG_BYPASS_OFFSET, CONFIG_SIZE,
    FAULT_F_MASK, FAULT_SIZE, F_BYPASS_CONFIG, F_MAP_UNMAP, F_MMIO, F_PROBE, HEAD_SIZE, TAIL_SIZE,
};

use crate::enc::{decode_all, Blob};
use crate::types::ReqBytes;
use crate::{enc_enum, enc_struct};

/// The writable-area size a request is parsed with.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writable {
    /// Exactly what the request needs (`Request::writable_len`, or the tail).
    Exact,
    /// `Exact` plus or minus a little.
    Around(i8),
    Small(u8),
    Raw(u32),
    Huge,
}
enc_enum!(Writable, 5;
    Writable::Exact => 0 [],
    Writable::Around(d) => 1 [d],
    Writable::Small(n) => 2 [n],
    Writable::Raw(n) => 3 [n],
    Writable::Huge => 4 [],
);

/// The readable bytes: a request as a driver lays it out, or anything.
#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Readable {
    Request(ReqBytes),
    Raw(Blob),
}
enc_enum!(Readable, 2; Readable::Request(r) => 0 [r], Readable::Raw(b) => 1 [b]);

/// A RESV_MEM region.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub msi: bool,
    pub start: u64,
    pub end: u64,
}
enc_struct!(Region; msi, start, end);

impl Region {
    fn resv(self) -> ResvMem {
        ResvMem {
            subtype: if self.msi {
                ResvMemType::Msi
            } else {
                ResvMemType::Reserved
            },
            start: self.start,
            end: self.end,
        }
    }
}

/// The config space as fields.
#[derive(Arbitrary, Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigFields {
    pub page_size_mask: u64,
    pub input_start: u64,
    pub input_end: u64,
    pub domain_start: u32,
    pub domain_end: u32,
    pub probe_size: u32,
    pub bypass: u8,
}
enc_struct!(ConfigFields; page_size_mask, input_start, input_end, domain_start, domain_end,
    probe_size, bypass);

impl ConfigFields {
    fn config(self) -> Config {
        Config {
            page_size_mask: self.page_size_mask,
            input_range_start: self.input_start,
            input_range_end: self.input_end,
            domain_range_start: self.domain_start,
            domain_range_end: self.domain_end,
            probe_size: self.probe_size,
            bypass: self.bypass,
        }
    }
}

#[derive(Arbitrary, Clone, Debug, PartialEq, Eq)]
pub enum Case {
    /// `Request::parse`; `features` picks bits 0..8 of the device features.
    Parse {
        readable: Readable,
        writable: Writable,
        features: u8,
        probe_size: u16,
    },
    /// `decode_probe_properties` on any bytes.
    Decode { buf: Blob },
    /// `encode_probe_properties` of up to 8 regions into a buffer of `size` bytes.
    Encode {
        count: u8,
        regions: [Region; 8],
        size: u16,
        fill: u8,
    },
    /// `FaultRecord::from_bytes` on any bytes.
    FaultBytes { bytes: [u8; FAULT_SIZE] },
    /// `FaultRecord::to_bytes` of any record.
    FaultRecord {
        reason: u8,
        flags: u32,
        endpoint: u32,
        address: u64,
    },
    /// `Config::from_bytes`, `read`, `write` and `validate`.
    Config {
        fields: ConfigFields,
        raw: Option<[u8; CONFIG_SIZE]>,
        read_offset: u32,
        read_len: u8,
        write_offset: u32,
        write: Blob,
        features: u64,
    },
}
enc_enum!(Case, 6;
    Case::Parse { readable, writable, features, probe_size } =>
        0 [readable, writable, features, probe_size],
    Case::Decode { buf } => 1 [buf],
    Case::Encode { count, regions, size, fill } => 2 [count, regions, size, fill],
    Case::FaultBytes { bytes } => 3 [bytes],
    Case::FaultRecord { reason, flags, endpoint, address } =>
        4 [reason, flags, endpoint, address],
    Case::Config { fields, raw, read_offset, read_len, write_offset, write, features } =>
        5 [fields, raw, read_offset, read_len, write_offset, write, features],
);

/// Runs one fuzz input.
pub fn run(data: &[u8]) {
    for case in decode_all::<Case>(data, 64) {
        check(&case);
    }
}

pub fn check(case: &Case) {
    match case {
        Case::Parse {
            readable,
            writable,
            features,
            probe_size,
        } => {
            let bytes = match readable {
                Readable::Request(r) => r.bytes(),
                Readable::Raw(b) => b.0.clone(),
            };
            check_parse(
                &bytes,
                *writable,
                u64::from(*features),
                u32::from(*probe_size),
            );
        }
        Case::Decode { buf } => check_decode(&buf.0),
        Case::Encode {
            count,
            regions,
            size,
            fill,
        } => {
            let regions: Vec<ResvMem> = regions[..usize::from(count % 9)]
                .iter()
                .map(|r| r.resv())
                .collect();
            check_encode(&regions, usize::from(*size), *fill);
        }
        Case::FaultBytes { bytes } => check_fault_bytes(bytes),
        Case::FaultRecord {
            reason,
            flags,
            endpoint,
            address,
        } => {
            let reason = match reason % 3 {
                0 => FaultReason::Unknown,
                1 => FaultReason::Domain,
                _ => FaultReason::Mapping,
            };
            let rec = FaultRecord {
                reason,
                flags: *flags,
                endpoint: *endpoint,
                address: *address,
            };
            let want = FaultRecord {
                flags: flags & FAULT_F_MASK,
                ..rec
            };
            let b = rec.to_bytes();
            assert_eq!(b[1..4], [0; 3], "E1: reserved");
            assert_eq!(b[12..16], [0; 4], "E1: reserved1");
            assert_eq!(FaultRecord::from_bytes(&b), Ok(want));
        }
        Case::Config {
            fields,
            raw,
            read_offset,
            read_len,
            write_offset,
            write,
            features,
        } => check_config(
            fields.config(),
            raw.as_ref(),
            *read_offset,
            usize::from(*read_len),
            *write_offset,
            &write.0,
            *features,
        ),
    }
}

/// Byte ranges of a request's readable part that the device ignores.
#[allow(clippy::single_range_in_vec_init)]
fn ignored(ty: RequestType) -> &'static [std::ops::Range<usize>] {
    match ty {
        // G3: head.reserved. D1: DETACH reserved. P1: PROBE reserved.
        RequestType::Detach => &[1..4, 12..20],
        RequestType::Probe => &[1..4, 8..72],
        _ => &[1..4],
    }
}

fn check_parse(readable: &[u8], writable: Writable, features: u64, probe_size: u32) {
    let exact = match readable
        .first()
        .and_then(|&t| RequestType::try_from(t).ok())
    {
        Some(RequestType::Probe) => probe_size as usize + TAIL_SIZE,
        _ => TAIL_SIZE,
    };
    let writable_len = match writable {
        Writable::Exact => exact,
        Writable::Around(d) => exact.saturating_add_signed(isize::from(d)),
        Writable::Small(n) => usize::from(n),
        Writable::Raw(n) => n as usize,
        Writable::Huge => usize::MAX,
    };
    let got = Request::parse(readable, writable_len, features, probe_size);
    // The error's status and message never panic.
    if let Err(e) = &got {
        let _ = e.to_string();
    }
    let ty = readable.first().map(|&t| RequestType::try_from(t));
    match &got {
        Ok(req) => {
            let ty = req.request_type();
            let need = ty.readable_size();
            assert!(readable.len() >= need && writable_len >= TAIL_SIZE);
            // Re-encodes to the bytes it came from, ignored fields aside.
            let mut want = readable[..need].to_vec();
            for r in ignored(ty) {
                want[r.clone()].fill(0);
            }
            assert_eq!(
                req.encode(),
                want,
                "{req:?} does not re-encode to its bytes"
            );
            // Parses the same from its own encoding, with the writable size it asks for.
            let w = req.writable_len(probe_size);
            assert_eq!(
                Request::parse(&req.encode(), w, features, probe_size),
                Ok(*req)
            );
            // Features gate what they gate.
            match *req {
                Request::Map { flags, .. } => {
                    assert!(features & F_MAP_UNMAP != 0);
                    assert!(!flags.mmio || features & F_MMIO != 0, "MMIO without F_MMIO");
                }
                Request::Unmap { .. } => assert!(features & F_MAP_UNMAP != 0),
                Request::Attach { bypass, .. } => {
                    assert!(!bypass || features & F_BYPASS_CONFIG != 0)
                }
                Request::Probe { .. } => {
                    assert!(features & F_PROBE != 0);
                    assert!(writable_len >= probe_size as usize + TAIL_SIZE, "P7");
                }
                Request::Detach { .. } => {}
            }
        }
        Err(e) => {
            // Exactly the unanswerable requests get no reply.
            let silent = writable_len < TAIL_SIZE
                || readable.len() < HEAD_SIZE
                || matches!(ty, Some(Err(_)))
                || (matches!(ty, Some(Ok(RequestType::Probe))) && features & F_PROBE == 0);
            assert_eq!(e.status().is_none(), silent, "{e:?}");
            if let ParseError::Truncated { need, .. } = e {
                assert!(readable.len() < *need);
            }
        }
    }
    // Only the first readable_size bytes count: more bytes change nothing.
    if let Some(Ok(t)) = ty {
        if readable.len() >= t.readable_size() {
            let mut longer = readable.to_vec();
            longer.extend_from_slice(&[0xa5; 40]);
            assert_eq!(
                Request::parse(&longer, writable_len, features, probe_size),
                got
            );
        }
    }
}

fn check_decode(buf: &[u8]) {
    let got = decode_probe_properties(buf);
    if let Err(e) = &got {
        let _ = e.to_string();
    }
    // A zero type ends the list: whatever follows it is never read.
    if let Ok(props) = &got {
        let mut ended = buf.to_vec();
        ended.extend_from_slice(&[0; 4]);
        ended.extend_from_slice(&[0xff; 24]);
        let walked = walk_len(buf);
        if walked == buf.len() {
            assert_eq!(decode_probe_properties(&ended).as_ref(), Ok(props));
        }
    }
    // Decoded RESV_MEM properties re-encode to properties that decode to the same.
    if let Ok(props) = got {
        let regions: Vec<ResvMem> = props
            .iter()
            .filter_map(|p| match p {
                ProbeProperty::ResvMem(r) => Some(*r),
                ProbeProperty::Unknown { .. } => None,
            })
            .collect();
        let mut out = vec![0; probe_properties_size(regions.len())];
        assert_eq!(encode_probe_properties(&regions, &mut out), Ok(out.len()));
        let again: Vec<_> = regions
            .iter()
            .copied()
            .map(ProbeProperty::ResvMem)
            .collect();
        assert_eq!(decode_probe_properties(&out), Ok(again));
    }
}

/// Bytes a well-formed walk consumes: properties up to a type 0 or the end.
fn walk_len(buf: &[u8]) -> usize {
    let mut offset = 0;
    while buf.len() - offset >= 4 {
        let head = u16::from_le_bytes([buf[offset], buf[offset + 1]]);
        if head & 0x0fff == 0 {
            return usize::MAX;
        }
        let len = usize::from(u16::from_le_bytes([buf[offset + 2], buf[offset + 3]]));
        offset += 4 + len;
        if offset > buf.len() {
            return usize::MAX;
        }
    }
    offset
}

fn check_encode(regions: &[ResvMem], size: usize, fill: u8) {
    let mut out = vec![fill; size];
    let need = probe_properties_size(regions.len());
    match encode_probe_properties(regions, &mut out) {
        Ok(n) => {
            assert_eq!(n, need);
            assert!(need <= size);
            // Encode then decode gives the regions back; the rest is zero (P8).
            let want: Vec<_> = regions
                .iter()
                .copied()
                .map(ProbeProperty::ResvMem)
                .collect();
            assert_eq!(decode_probe_properties(&out), Ok(want));
            assert!(out[need..].iter().all(|&b| b == 0), "P8: rest not zero");
            for p in out[..need].chunks_exact(24) {
                assert_eq!(p[1] & 0xf0, 0, "P4: header reserved bits");
                assert_eq!(p[2..4], [20, 0], "P5: length");
                assert_eq!(p[5..8], [0; 3], "R1: reserved");
            }
        }
        Err(e) => {
            assert_eq!(e, ProbeError::TooSmall { need, have: size });
            assert!(out.iter().all(|&b| b == fill), "a refused encode wrote");
        }
    }
    // validate_resv_mem agrees with a direct reading of its rules.
    let want = if let Some(r) = regions.iter().find(|r| r.start > r.end) {
        Err(ProbeError::ResvMemRange {
            start: r.start,
            end: r.end,
        })
    } else if regions
        .iter()
        .filter(|r| r.subtype == ResvMemType::Msi)
        .count()
        > 1
    {
        Err(ProbeError::MultipleMsi)
    } else {
        Ok(())
    };
    let overlap = regions.iter().enumerate().any(|(i, a)| {
        regions[i + 1..]
            .iter()
            .any(|b| a.start <= b.end && b.start <= a.end)
    });
    match (validate_resv_mem(regions), want) {
        (Ok(()), Ok(())) => assert!(!overlap, "overlap not reported: {regions:?}"),
        (Err(ProbeError::Overlap(..)), Ok(())) => assert!(overlap),
        (got, want) => assert_eq!(got, want),
    }
}

fn check_fault_bytes(b: &[u8; FAULT_SIZE]) {
    match FaultRecord::from_bytes(b) {
        Ok(rec) => {
            assert_eq!(b[1..4], [0; 3]);
            let mut want = *b;
            want[0] = match b[0] {
                1 | 2 => b[0],
                _ => 0,
            };
            want[12..16].fill(0);
            let flags = u32::from_le_bytes([b[4], b[5], b[6], b[7]]) & FAULT_F_MASK;
            want[4..8].copy_from_slice(&flags.to_le_bytes());
            assert_eq!(rec.to_bytes(), want);
            assert_eq!(FaultRecord::from_bytes(&rec.to_bytes()), Ok(rec));
        }
        Err(FaultError::Reserved) => assert_ne!(b[1..4], [0; 3]),
    }
}

fn check_config(
    cfg: Config,
    raw: Option<&[u8; CONFIG_SIZE]>,
    read_offset: u32,
    read_len: usize,
    write_offset: u32,
    write: &[u8],
    features: u64,
) {
    let bytes = cfg.to_bytes();
    assert_eq!(Config::from_bytes(&bytes), cfg);
    if let Some(raw) = raw {
        // Decoding ignores only the reserved bytes.
        let mut want = *raw;
        want[37..].fill(0);
        assert_eq!(Config::from_bytes(raw).to_bytes(), want);
    }
    let _ = cfg.validate().map_err(|e| e.to_string());
    // Reads see exactly the window asked for, zeros past the end.
    let mut buf = vec![0xaa; read_len];
    cfg.read(read_offset, &mut buf);
    for (i, b) in buf.iter().enumerate() {
        let want = (read_offset as usize)
            .checked_add(i)
            .and_then(|o| bytes.get(o))
            .copied()
            .unwrap_or(0);
        assert_eq!(*b, want, "read at {read_offset}+{i}");
    }
    // Writes: only bypass, only with F_BYPASS_CONFIG, only 0 or 1; a refusal changes nothing.
    let mut after = cfg;
    match after.write(write_offset, write, features) {
        Ok(()) => {
            assert_eq!(write_offset, CONFIG_BYPASS_OFFSET);
            assert_eq!(write.len(), 1);
            assert!(features & F_BYPASS_CONFIG != 0 && write[0] <= 1);
            assert_eq!(
                after,
                Config {
                    bypass: write[0],
                    ..cfg
                }
            );
        }
        Err(e) => {
            let _ = e.to_string();
            assert_eq!(after, cfg, "refused config write changed the config");
            let allowed = write.len() == 1
                && write_offset == CONFIG_BYPASS_OFFSET
                && features & F_BYPASS_CONFIG != 0
                && write[0] <= 1;
            assert!(!allowed, "{e:?}");
            if let ConfigWriteError::Bypass(v) = e {
                assert!(v > 1);
            }
        }
    }
}
