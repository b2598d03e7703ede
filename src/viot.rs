// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The ACPI VIOT table ("Virtual I/O Translation") that tells a guest which endpoints a
//! virtio-iommu translates.
//!
//! QEMU writes a VIOT only for its built-in `virtio-iommu-pci`; with our daemon behind
//! `vhost-user-test-device-pci` the VMM writes none, so the table is handed to QEMU with
//! `-acpitable file=viot.bin` (the `vhost-device-iommu viot` subcommand). Layout per ACPI 6.5
//! section 5.2.32 and Linux `drivers/acpi/viot.c`:
//!
//! ```text
//! 0x00  ACPI header, 36 bytes (signature "VIOT", revision 0)
//! 0x24  u16 node_count, u16 node_offset, 8 reserved bytes
//! 0x30  node: virtio-pci IOMMU (type 3, 16 bytes): segment, BDF
//! 0x40  node: PCI range (type 1, 24 bytes) per endpoint range, output_node = 0x30
//! ```
//!
//! An endpoint with PCI segment `s` and BDF `b` inside a range has the endpoint ID
//! `endpoint_start + ((s - segment_start) << 16) + (b - bdf_start)`: that is the ID the guest
//! driver puts in ATTACH and PROBE requests.
//!
//! By default the header fields are QEMU's own ([`ViotOptions::default`]), so that the table
//! for QEMU's topology is byte-for-byte the one QEMU writes for its built-in device.
//!
//! QEMU (10.0 and 10.2) keeps a table given with `-acpitable file=` as it is: header fields from the
//! file, `length` and checksum recomputed (they already match), nothing else touched unless
//! overridden by options such as `oem_id=` (checked by a guest in tests/e2e.rs). Its limit is
//! 65535 bytes per table, about 2700 ranges.

use std::fmt;

use thiserror::Error;

/// Size of the ACPI table header.
const HEADER_LEN: usize = 36;
/// Offset of the first node: header + node_count, node_offset + 8 reserved bytes.
const FIRST_NODE_OFFSET: usize = HEADER_LEN + 12;
/// Node type 1: PCI range.
const NODE_PCI_RANGE: u8 = 1;
/// Node type 3: virtio-pci IOMMU.
const NODE_VIRTIO_PCI_IOMMU: u8 = 3;
const PCI_RANGE_LEN: usize = 24;
const VIRTIO_PCI_IOMMU_LEN: usize = 16;

/// A PCI bus/device/function on segment 0 unless said otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciBdf {
    bus: u8,
    device: u8,
    function: u8,
}

impl PciBdf {
    /// `bus:device.function`; the device is 5 bits and the function 3 bits wide.
    pub fn new(bus: u8, device: u8, function: u8) -> Result<Self, ViotError> {
        if device >= 32 || function >= 8 {
            return Err(ViotError::InvalidBdf {
                bus,
                device,
                function,
            });
        }
        Ok(PciBdf {
            bus,
            device,
            function,
        })
    }

    /// From the 16-bit routing ID `bus << 8 | device << 3 | function`.
    pub fn from_u16(bdf: u16) -> Self {
        let [bus, devfn] = bdf.to_be_bytes();
        PciBdf {
            bus,
            device: devfn >> 3,
            function: devfn & 7,
        }
    }

    /// The 16-bit routing ID, as VIOT and virtio-iommu endpoint IDs use it.
    pub fn to_u16(self) -> u16 {
        u16::from(self.bus) << 8 | u16::from(self.device) << 3 | u16::from(self.function)
    }

    pub fn bus(self) -> u8 {
        self.bus
    }

    pub fn device(self) -> u8 {
        self.device
    }

    pub fn function(self) -> u8 {
        self.function
    }
}

impl fmt::Display for PciBdf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:02x}:{:02x}.{:x}",
            self.bus, self.device, self.function
        )
    }
}

/// One PCI range node: endpoints `bdf_start..=bdf_end` on segments
/// `segment_start..=segment_end`, translated by the IOMMU, with IDs from `endpoint_start`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ViotPciRange {
    pub endpoint_start: u32,
    pub segment_start: u16,
    pub segment_end: u16,
    pub bdf_start: u16,
    pub bdf_end: u16,
}

impl ViotPciRange {
    /// BDFs `start..=end` on one segment with endpoint ID = BDF (QEMU's convention).
    pub fn identity(segment: u16, start: PciBdf, end: PciBdf) -> Self {
        ViotPciRange {
            endpoint_start: u32::from(start.to_u16()),
            segment_start: segment,
            segment_end: segment,
            bdf_start: start.to_u16(),
            bdf_end: end.to_u16(),
        }
    }

    /// The endpoint ID of `(segment, bdf)` if this range covers it.
    pub fn endpoint_id(&self, segment: u16, bdf: PciBdf) -> Option<u32> {
        let bdf = bdf.to_u16();
        if !(self.segment_start..=self.segment_end).contains(&segment)
            || !(self.bdf_start..=self.bdf_end).contains(&bdf)
        {
            return None;
        }
        let offset =
            (u64::from(segment - self.segment_start) << 16) + u64::from(bdf - self.bdf_start);
        u32::try_from(u64::from(self.endpoint_start) + offset).ok()
    }

    /// The last endpoint ID of the range, if it fits in 32 bits.
    fn last_endpoint(&self) -> Option<u32> {
        let span = (u64::from(self.segment_end - self.segment_start) << 16)
            + u64::from(self.bdf_end - self.bdf_start);
        u32::try_from(u64::from(self.endpoint_start) + span).ok()
    }

    fn overlaps(&self, other: &ViotPciRange) -> bool {
        self.segment_start <= other.segment_end
            && other.segment_start <= self.segment_end
            && self.bdf_start <= other.bdf_end
            && other.bdf_start <= self.bdf_end
    }
}

/// Header fields and the IOMMU's PCI segment. The default is what QEMU 10 writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ViotOptions {
    pub oem_id: [u8; 6],
    pub oem_table_id: [u8; 8],
    pub oem_revision: u32,
    pub creator_id: [u8; 4],
    pub creator_revision: u32,
    /// PCI segment of the virtio-pci IOMMU itself.
    pub iommu_segment: u16,
}

impl Default for ViotOptions {
    fn default() -> Self {
        ViotOptions {
            oem_id: *b"BOCHS ",
            oem_table_id: *b"BXPC    ",
            oem_revision: 1,
            creator_id: *b"BXPC",
            creator_revision: 1,
            iommu_segment: 0,
        }
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ViotError {
    #[error(
        "invalid PCI address {bus:02x}:{device:02x}.{function:x} (device < 0x20, function < 8)"
    )]
    InvalidBdf { bus: u8, device: u8, function: u8 },
    #[error("no endpoint range: the IOMMU would translate nothing")]
    NoRanges,
    #[error("too many ranges ({0}): the node count is 16 bits")]
    TooManyRanges(usize),
    #[error("range {index}: start after end (segments {segment_start}..={segment_end}, BDFs {bdf_start:#06x}..={bdf_end:#06x})")]
    EmptyRange {
        index: usize,
        segment_start: u16,
        segment_end: u16,
        bdf_start: u16,
        bdf_end: u16,
    },
    #[error("range {index}: endpoint IDs run past 2^32 - 1")]
    EndpointOverflow { index: usize },
    #[error("ranges {first} and {second} cover the same PCI devices")]
    Overlap { first: usize, second: usize },
}

/// The VIOT for one virtio-pci IOMMU at `iommu` (segment 0) translating `ranges`, with QEMU's
/// header fields.
pub fn build_viot(iommu: PciBdf, ranges: &[ViotPciRange]) -> Result<Vec<u8>, ViotError> {
    build_viot_with(&ViotOptions::default(), iommu, ranges)
}

/// [`build_viot`] with explicit header fields and IOMMU segment.
pub fn build_viot_with(
    options: &ViotOptions,
    iommu: PciBdf,
    ranges: &[ViotPciRange],
) -> Result<Vec<u8>, ViotError> {
    if ranges.is_empty() {
        return Err(ViotError::NoRanges);
    }
    // One node for the IOMMU plus one per range; the table length must also fit in u32.
    let node_count =
        u16::try_from(ranges.len() + 1).map_err(|_| ViotError::TooManyRanges(ranges.len()))?;
    for (index, r) in ranges.iter().enumerate() {
        if r.segment_start > r.segment_end || r.bdf_start > r.bdf_end {
            return Err(ViotError::EmptyRange {
                index,
                segment_start: r.segment_start,
                segment_end: r.segment_end,
                bdf_start: r.bdf_start,
                bdf_end: r.bdf_end,
            });
        }
        if r.last_endpoint().is_none() {
            return Err(ViotError::EndpointOverflow { index });
        }
        if let Some(first) = ranges[..index].iter().position(|o| o.overlaps(r)) {
            return Err(ViotError::Overlap {
                first,
                second: index,
            });
        }
    }

    let len = FIRST_NODE_OFFSET + VIRTIO_PCI_IOMMU_LEN + PCI_RANGE_LEN * ranges.len();
    let mut t = Vec::with_capacity(len);

    // ACPI header; the checksum byte is fixed up at the end.
    t.extend_from_slice(b"VIOT");
    t.extend_from_slice(&(len as u32).to_le_bytes());
    t.push(0); // revision
    t.push(0); // checksum
    t.extend_from_slice(&options.oem_id);
    t.extend_from_slice(&options.oem_table_id);
    t.extend_from_slice(&options.oem_revision.to_le_bytes());
    t.extend_from_slice(&options.creator_id);
    t.extend_from_slice(&options.creator_revision.to_le_bytes());

    t.extend_from_slice(&node_count.to_le_bytes());
    t.extend_from_slice(&(FIRST_NODE_OFFSET as u16).to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    let iommu_offset = FIRST_NODE_OFFSET as u16;
    t.push(NODE_VIRTIO_PCI_IOMMU);
    t.push(0);
    t.extend_from_slice(&(VIRTIO_PCI_IOMMU_LEN as u16).to_le_bytes());
    t.extend_from_slice(&options.iommu_segment.to_le_bytes());
    t.extend_from_slice(&iommu.to_u16().to_le_bytes());
    t.extend_from_slice(&[0; 8]);

    for r in ranges {
        t.push(NODE_PCI_RANGE);
        t.push(0);
        t.extend_from_slice(&(PCI_RANGE_LEN as u16).to_le_bytes());
        t.extend_from_slice(&r.endpoint_start.to_le_bytes());
        t.extend_from_slice(&r.segment_start.to_le_bytes());
        t.extend_from_slice(&r.segment_end.to_le_bytes());
        t.extend_from_slice(&r.bdf_start.to_le_bytes());
        t.extend_from_slice(&r.bdf_end.to_le_bytes());
        t.extend_from_slice(&iommu_offset.to_le_bytes());
        t.extend_from_slice(&[0; 6]);
    }
    debug_assert_eq!(t.len(), len);

    let sum = t.iter().fold(0u8, |acc, b| acc.wrapping_add(*b));
    t[9] = 0u8.wrapping_sub(sum);
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use assert_matches::assert_matches;

    fn bdf(bus: u8, device: u8, function: u8) -> PciBdf {
        PciBdf::new(bus, device, function).unwrap()
    }

    /// QEMU's own range for bus 0: endpoints 00:00.0 ..= 00:1f.7, ID = BDF.
    fn qemu_bus0() -> ViotPciRange {
        ViotPciRange::identity(0, bdf(0, 0, 0), bdf(0, 0x1f, 7))
    }

    #[test]
    fn bdf_packing() {
        assert_eq!(bdf(0, 4, 0).to_u16(), 0x20);
        assert_eq!(bdf(0, 5, 0).to_u16(), 0x28);
        assert_eq!(bdf(0, 6, 1).to_u16(), 0x31);
        assert_eq!(bdf(0xab, 0x1f, 7).to_u16(), 0xabff);
        assert_eq!(PciBdf::from_u16(0xabff), bdf(0xab, 0x1f, 7));
        assert_eq!(bdf(0, 6, 1).to_string(), "00:06.1");
        assert_matches!(
            PciBdf::new(0, 32, 0),
            Err(ViotError::InvalidBdf { device: 32, .. })
        );
        assert_matches!(
            PciBdf::new(0, 0, 8),
            Err(ViotError::InvalidBdf { function: 8, .. })
        );
    }

    #[test]
    fn endpoint_ids() {
        let r = qemu_bus0();
        assert_eq!(r.endpoint_id(0, bdf(0, 5, 0)), Some(0x28));
        assert_eq!(r.endpoint_id(0, bdf(1, 0, 0)), None);
        assert_eq!(r.endpoint_id(1, bdf(0, 5, 0)), None);
        let multi = ViotPciRange {
            endpoint_start: 0x1000,
            segment_start: 2,
            segment_end: 3,
            bdf_start: 0x0100,
            bdf_end: 0xffff,
        };
        assert_eq!(multi.endpoint_id(2, bdf(1, 0, 0)), Some(0x1000));
        assert_eq!(
            multi.endpoint_id(3, bdf(1, 0, 1)),
            Some(0x1000 + 0x10000 + 1)
        );
    }

    // The table QEMU's built-in virtio-iommu-pci writes for a q35 machine with the IOMMU at
    // 00:04.0: captured from the guest's /sys/firmware/acpi/tables/VIOT (QEMU 10.0.2, TCG,
    // `-device virtio-iommu-pci,addr=04.0`) with the e2e rig; QEMU 10.2.2 writes the same bytes
    // (tests/e2e.rs compares the guest's table with ours).
    #[rustfmt::skip]
    const QEMU_VIOT: [u8; 88] = [
        0x56, 0x49, 0x4f, 0x54, // signature "VIOT"
        0x58, 0x00, 0x00, 0x00, // length 88
        0x00, 0x4e, // revision 0, checksum
        0x42, 0x4f, 0x43, 0x48, 0x53, 0x20, // OEM ID "BOCHS "
        0x42, 0x58, 0x50, 0x43, 0x20, 0x20, 0x20, 0x20, // OEM table ID "BXPC    "
        0x01, 0x00, 0x00, 0x00, // OEM revision 1
        0x42, 0x58, 0x50, 0x43, // creator ID "BXPC"
        0x01, 0x00, 0x00, 0x00, // creator revision 1
        // node_count 2, node_offset 0x30, reserved
        0x02, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00,
        // 0x30: virtio-pci IOMMU (3), length 16, segment 0, BDF 0x0020 = 00:04.0
        0x03, 0x00, 0x10, 0x00, 0x00, 0x00, 0x20, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        // 0x40: PCI range (1), length 24, endpoint_start 0, segments 0..=0,
        // BDFs 0x0000..=0x00ff, output_node 0x30
        0x01, 0x00, 0x18, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xff, 0x00,
        0x30, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    ];

    #[test]
    fn matches_qemu_byte_for_byte() {
        let t = build_viot(bdf(0, 4, 0), &[qemu_bus0()]).unwrap();
        assert_eq!(t, QEMU_VIOT);
    }

    #[test]
    fn layout_and_checksum() {
        let ranges = [
            ViotPciRange::identity(0, bdf(0, 5, 0), bdf(0, 5, 0)),
            ViotPciRange::identity(0, bdf(0, 6, 0), bdf(0, 6, 7)),
        ];
        let t = build_viot(bdf(0, 4, 0), &ranges).unwrap();
        assert_eq!(t.len(), 48 + 16 + 2 * 24);
        assert_eq!(&t[0..4], b"VIOT");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()) as usize,
            t.len()
        );
        assert_eq!(t[8], 0, "revision");
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "checksum");
        assert_eq!(u16::from_le_bytes([t[36], t[37]]), 3, "node_count");
        assert_eq!(u16::from_le_bytes([t[38], t[39]]), 0x30, "node_offset");
        // IOMMU node.
        assert_eq!(&t[0x30..0x34], &[3, 0, 16, 0]);
        assert_eq!(u16::from_le_bytes([t[0x36], t[0x37]]), 0x20);
        // Second range node: endpoint_start 0x30, BDFs 0x30..=0x37, output node 0x30.
        let n = &t[0x58..0x70];
        assert_eq!(&n[0..4], &[1, 0, 24, 0]);
        assert_eq!(u32::from_le_bytes(n[4..8].try_into().unwrap()), 0x30);
        assert_eq!(u16::from_le_bytes([n[12], n[13]]), 0x30);
        assert_eq!(u16::from_le_bytes([n[14], n[15]]), 0x37);
        assert_eq!(u16::from_le_bytes([n[16], n[17]]), 0x30);
    }

    #[test]
    fn header_options_are_written() {
        let options = ViotOptions {
            oem_id: *b"VHOSTU",
            oem_table_id: *b"IOMMUVIO",
            oem_revision: 7,
            creator_id: *b"VDIO",
            creator_revision: 9,
            iommu_segment: 1,
        };
        let t = build_viot_with(&options, bdf(0, 4, 0), &[qemu_bus0()]).unwrap();
        assert_eq!(&t[10..16], b"VHOSTU");
        assert_eq!(&t[16..24], b"IOMMUVIO");
        assert_eq!(u32::from_le_bytes(t[24..28].try_into().unwrap()), 7);
        assert_eq!(&t[28..32], b"VDIO");
        assert_eq!(u32::from_le_bytes(t[32..36].try_into().unwrap()), 9);
        assert_eq!(u16::from_le_bytes([t[0x34], t[0x35]]), 1);
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
    }

    #[test]
    fn errors() {
        let iommu = bdf(0, 4, 0);
        assert_matches!(build_viot(iommu, &[]), Err(ViotError::NoRanges));
        let backwards = ViotPciRange {
            bdf_start: 0x30,
            bdf_end: 0x28,
            ..qemu_bus0()
        };
        assert_matches!(
            build_viot(iommu, &[qemu_bus0(), backwards]),
            Err(ViotError::EmptyRange { index: 1, .. })
        );
        let overflow = ViotPciRange {
            endpoint_start: u32::MAX - 0x10,
            ..qemu_bus0()
        };
        assert_matches!(
            build_viot(iommu, &[overflow]),
            Err(ViotError::EndpointOverflow { index: 0 })
        );
        let inside = ViotPciRange::identity(0, bdf(0, 5, 0), bdf(0, 5, 7));
        assert_matches!(
            build_viot(iommu, &[qemu_bus0(), inside]),
            Err(ViotError::Overlap {
                first: 0,
                second: 1
            })
        );
        let other_segment = ViotPciRange::identity(1, bdf(0, 5, 0), bdf(0, 5, 7));
        assert!(build_viot(iommu, &[qemu_bus0(), other_segment]).is_ok());
        let many = vec![qemu_bus0(); usize::from(u16::MAX)];
        assert_matches!(
            build_viot(iommu, &many),
            Err(ViotError::TooManyRanges(65535))
        );
    }
}
