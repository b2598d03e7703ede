// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! PROBE properties: what the device writes into a PROBE request's properties area.

use crate::{le16, le64, put16, put64};

/// Property type 0: ends the list.
pub const PROBE_T_NONE: u16 = 0;
/// Property type 1: a reserved memory region.
pub const PROBE_T_RESV_MEM: u16 = 1;
/// The low 12 bits of a property's first le16 are its type, the top 4 are reserved.
pub const PROBE_T_MASK: u16 = 0x0fff;
/// `struct virtio_iommu_probe_property`: `le16 type; le16 length`.
pub const PROBE_PROPERTY_HEAD_SIZE: usize = 4;
/// `struct virtio_iommu_probe_resv_mem`, header included.
pub const RESV_MEM_SIZE: usize = 24;
/// The `length` of a RESV_MEM property: its size without the header (spec P5).
const RESV_MEM_LEN: u16 = (RESV_MEM_SIZE - PROBE_PROPERTY_HEAD_SIZE) as u16;

/// `VIRTIO_IOMMU_RESV_MEM_T_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResvMemType {
    /// The driver cannot map these addresses.
    Reserved = 0,
    /// An MSI doorbell: reserved, and the driver needs no MMIO mapping for it.
    Msi = 1,
}

/// A RESV_MEM property: a reserved range of virtual addresses, `end` inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResvMem {
    pub subtype: ResvMemType,
    pub start: u64,
    pub end: u64,
}

/// A property as the driver decodes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeProperty {
    ResvMem(ResvMem),
    /// A type the driver does not know; it skips `len` bytes of value.
    Unknown {
        r#type: u16,
        len: u16,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("properties need {need} bytes, the area has {have}")]
    TooSmall { need: usize, have: usize },
    #[error("property at offset {offset} runs past the end of the properties area")]
    Truncated { offset: usize },
    #[error("RESV_MEM property at offset {offset} has length {len}, need at least 20")]
    ResvMemLength { offset: usize, len: u16 },
    #[error("reserved region {start:#x}..={end:#x} has start above end")]
    ResvMemRange { start: u64, end: u64 },
    #[error("more than one MSI region")]
    MultipleMsi,
    #[error("reserved regions {0:#x} and {1:#x} overlap")]
    Overlap(u64, u64),
}

/// Bytes taken by `n_regions` RESV_MEM properties.
pub const fn probe_properties_size(n_regions: usize) -> usize {
    n_regions.saturating_mul(RESV_MEM_SIZE)
}

/// Writes one RESV_MEM property per region into `out`, the properties area, and
/// zero-fills the rest. Returns the bytes taken by properties. If they do not fit,
/// `out` is left untouched.
///
/// Spec P4, R1: reserved fields zero. Spec P5: `length` = 20, without the header.
/// Spec P6: the next property starts `length + 4` bytes later. Spec P8: the rest is zero.
pub fn encode_probe_properties(regions: &[ResvMem], out: &mut [u8]) -> Result<usize, ProbeError> {
    let need = probe_properties_size(regions.len());
    if need > out.len() {
        return Err(ProbeError::TooSmall {
            need,
            have: out.len(),
        });
    }
    out.fill(0);
    for (p, r) in out.chunks_exact_mut(RESV_MEM_SIZE).zip(regions) {
        put16(p, 0, PROBE_T_RESV_MEM);
        put16(p, 2, RESV_MEM_LEN);
        p[4] = r.subtype as u8;
        put64(p, 8, r.start);
        put64(p, 16, r.end);
    }
    Ok(need)
}

/// Decodes a properties area (driver side): until a type 0 property or the end.
///
/// Per the driver rules: a property whose header reserved bits are set is skipped, the
/// RESV_MEM reserved bytes are ignored and an unknown subtype reads as `Reserved`.
pub fn decode_probe_properties(buf: &[u8]) -> Result<Vec<ProbeProperty>, ProbeError> {
    let mut props = Vec::new();
    let mut offset = 0;
    while buf.len() - offset >= PROBE_PROPERTY_HEAD_SIZE {
        let head = le16(buf, offset);
        let len = le16(buf, offset + 2);
        let r#type = head & PROBE_T_MASK;
        if r#type == PROBE_T_NONE {
            break;
        }
        let value_at = offset + PROBE_PROPERTY_HEAD_SIZE;
        let value = buf
            .get(value_at..value_at + usize::from(len))
            .ok_or(ProbeError::Truncated { offset })?;
        if head & !PROBE_T_MASK != 0 {
            // Reserved bits set: the driver must ignore the property.
        } else if r#type == PROBE_T_RESV_MEM {
            if len < RESV_MEM_LEN {
                return Err(ProbeError::ResvMemLength { offset, len });
            }
            let subtype = match value[0] {
                1 => ResvMemType::Msi,
                _ => ResvMemType::Reserved,
            };
            props.push(ProbeProperty::ResvMem(ResvMem {
                subtype,
                start: le64(value, 4),
                end: le64(value, 12),
            }));
        } else {
            props.push(ProbeProperty::Unknown { r#type, len });
        }
        offset = value_at + value.len();
    }
    Ok(props)
}

/// Checks one endpoint's regions: start <= end, spec R2 (at most one MSI region),
/// spec R3 (no two regions overlap).
pub fn validate_resv_mem(regions: &[ResvMem]) -> Result<(), ProbeError> {
    if let Some(r) = regions.iter().find(|r| r.start > r.end) {
        return Err(ProbeError::ResvMemRange {
            start: r.start,
            end: r.end,
        });
    }
    if regions
        .iter()
        .filter(|r| r.subtype == ResvMemType::Msi)
        .count()
        > 1
    {
        return Err(ProbeError::MultipleMsi);
    }
    let mut sorted = regions.to_vec();
    sorted.sort_by_key(|r| r.start);
    match sorted.windows(2).find(|w| w[1].start <= w[0].end) {
        Some(w) => Err(ProbeError::Overlap(w[0].start, w[1].start)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MSI: ResvMem = ResvMem {
        subtype: ResvMemType::Msi,
        start: 0xfee0_0000,
        end: 0xfeef_ffff,
    };
    const RESV: ResvMem = ResvMem {
        subtype: ResvMemType::Reserved,
        start: 0x1_0000_0000,
        end: 0x1_0000_0fff,
    };

    fn encode(regions: &[ResvMem], size: usize) -> Vec<u8> {
        let mut out = vec![0xff; size];
        let n = encode_probe_properties(regions, &mut out).unwrap();
        assert_eq!(n, probe_properties_size(regions.len()));
        out
    }

    #[test]
    fn golden_resv_mem() {
        #[rustfmt::skip]
        let want = [
            1, 0, 20, 0,                                // type RESV_MEM, length 20
            1, 0, 0, 0,                                 // subtype MSI @4, reserved[3]
            0x00, 0x00, 0xe0, 0xfe, 0, 0, 0, 0,         // start @8
            0xff, 0xff, 0xef, 0xfe, 0, 0, 0, 0,         // end @16
        ];
        assert_eq!(encode(&[MSI], 24), want);
        let props = decode_probe_properties(&want).unwrap();
        assert_eq!(props, [ProbeProperty::ResvMem(MSI)]);
    }

    #[test]
    fn p4_property_reserved_zero() {
        let out = encode(&[MSI, RESV], 64);
        for p in out.chunks_exact(24).take(2) {
            assert_eq!(p[1] & 0xf0, 0, "header reserved bits");
        }
    }

    #[test]
    fn p5_length_excludes_header() {
        let out = encode(&[RESV], 64);
        assert_eq!(le16(&out, 2), 20);
    }

    #[test]
    fn p6_next_property_at_length_plus_4() {
        let out = encode(&[MSI, RESV], 64);
        let next = usize::from(le16(&out, 2)) + 4;
        assert_eq!(next, 24);
        assert_eq!(le16(&out, next), PROBE_T_RESV_MEM);
        assert_eq!(le64(&out, next + 8), RESV.start);
    }

    #[test]
    fn p8_rest_zero_filled() {
        let out = encode(&[MSI], 100);
        assert_eq!(out[24..], [0; 76]);
        assert_eq!(encode(&[], 16), [0; 16]);
    }

    #[test]
    fn r1_resv_mem_reserved_zero() {
        let out = encode(&[MSI, RESV], 48);
        for p in out.chunks_exact(24) {
            assert_eq!(p[5..8], [0, 0, 0]);
        }
    }

    #[test]
    fn r2_at_most_one_msi() {
        let msi2 = ResvMem {
            start: 0x2000_0000,
            end: 0x2000_0fff,
            ..MSI
        };
        assert_eq!(
            validate_resv_mem(&[MSI, msi2]),
            Err(ProbeError::MultipleMsi)
        );
        assert_eq!(validate_resv_mem(&[MSI, RESV]), Ok(()));
    }

    #[test]
    fn r3_no_overlap() {
        let inside = ResvMem {
            start: RESV.end,
            end: RESV.end + 10,
            ..RESV
        };
        assert_eq!(
            validate_resv_mem(&[inside, MSI, RESV]),
            Err(ProbeError::Overlap(RESV.start, RESV.end))
        );
        let backwards = ResvMem { start: 2, ..RESV };
        let backwards = ResvMem {
            end: 1,
            ..backwards
        };
        assert_eq!(
            validate_resv_mem(&[backwards]),
            Err(ProbeError::ResvMemRange { start: 2, end: 1 })
        );
        // A region of one address (start == end) is valid, and so is one right after another.
        let one = ResvMem {
            start: RESV.end + 1,
            end: RESV.end + 1,
            ..RESV
        };
        assert_eq!(validate_resv_mem(&[RESV, one, MSI]), Ok(()));
    }

    #[test]
    fn too_small_leaves_out_untouched() {
        let mut out = [0xaa; 47];
        assert_eq!(
            encode_probe_properties(&[MSI, RESV], &mut out),
            Err(ProbeError::TooSmall { need: 48, have: 47 })
        );
        assert_eq!(out, [0xaa; 47]);
    }

    #[test]
    fn decode_driver_rules() {
        let mut buf = vec![0; 80];
        // Unknown type 0x123 with 4 bytes of value.
        buf[..8].copy_from_slice(&[0x23, 0x01, 4, 0, 9, 9, 9, 9]);
        // RESV_MEM with a reserved header bit: ignored.
        buf[8..32].copy_from_slice(&encode(&[RESV], 24));
        buf[9] |= 0x10;
        // RESV_MEM with unknown subtype, reserved bytes set, length 24: read as Reserved.
        buf[32..56].copy_from_slice(&encode(&[RESV], 24));
        buf[34] = 24;
        buf[36..40].copy_from_slice(&[7, 1, 2, 3]);
        // Then type 0 stops the walk, whatever follows.
        buf[64] = 1;
        buf[66] = 0xff;
        assert_eq!(
            decode_probe_properties(&buf),
            Ok(vec![
                ProbeProperty::Unknown {
                    r#type: 0x123,
                    len: 4
                },
                ProbeProperty::ResvMem(RESV),
            ])
        );
    }

    #[test]
    fn decode_errors() {
        let mut buf = encode(&[RESV], 24);
        buf[2] = 21;
        assert_eq!(
            decode_probe_properties(&buf),
            Err(ProbeError::Truncated { offset: 0 })
        );
        buf[2] = 8;
        assert_eq!(
            decode_probe_properties(&buf),
            Err(ProbeError::ResvMemLength { offset: 0, len: 8 })
        );
        // Fewer than 4 bytes left: the end of the list.
        assert_eq!(decode_probe_properties(&[1, 0, 20]), Ok(vec![]));
    }

    fn any_resv_mem() -> impl Strategy<Value = ResvMem> {
        (any::<bool>(), any::<u64>(), any::<u64>()).prop_map(|(msi, start, end)| ResvMem {
            subtype: if msi {
                ResvMemType::Msi
            } else {
                ResvMemType::Reserved
            },
            start,
            end,
        })
    }

    proptest! {
        #[test]
        fn probe_round_trip(
            regions in proptest::collection::vec(any_resv_mem(), 0..8),
            slack in 0usize..64,
        ) {
            let out = encode(&regions, probe_properties_size(regions.len()) + slack);
            let want: Vec<_> = regions.iter().copied().map(ProbeProperty::ResvMem).collect();
            prop_assert_eq!(decode_probe_properties(&out), Ok(want));
        }

        #[test]
        fn decode_never_panics(buf in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_probe_properties(&buf);
        }
    }
}
