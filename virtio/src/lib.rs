// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-iommu wire format (VIRTIO 1.2/1.3 "IOMMU Device", device ID 23).
//!
//! Bytes <-> typed values: requests and their status tail, the config space, PROBE
//! properties and fault records. No I/O, no state: checks that need the device's state
//! (alignment, ranges, domains, endpoints) belong to the model. IDs such as A1, M3 or P7
//! refer to the conformance checklist in the repository's `docs/spec-checklist.md`; names follow
//! the spec and Linux's `include/uapi/linux/virtio_iommu.h` without the `VIRTIO_IOMMU_` prefix.
#![forbid(unsafe_code)]

mod config;
mod fault;
mod probe;
mod request;

pub use config::*;
pub use fault::*;
pub use probe::*;
pub use request::*;

/// Device ID of virtio-iommu.
pub const VIRTIO_ID_IOMMU: u32 = 23;
/// Queue 0: requestq.
pub const REQUEST_QUEUE: u16 = 0;
/// Queue 1: eventq (fault records).
pub const EVENT_QUEUE: u16 = 1;
/// requestq and eventq.
pub const NUM_QUEUES: usize = 2;

// Flags here and in the other modules are written as values, not as shifts or ORs of other
// flags: `1 << 0` is `1 >> 0`, and ORing disjoint bits is XORing them, so no test could catch
// a mistyped operator there. The tests pin every value to its bit number instead.

/// Feature bit 0: `input_range` in the config space is valid.
pub const F_INPUT_RANGE: u64 = 0x01;
/// Feature bit 1: `domain_range` in the config space is valid.
pub const F_DOMAIN_RANGE: u64 = 0x02;
/// Feature bit 2: MAP and UNMAP requests are available.
pub const F_MAP_UNMAP: u64 = 0x04;
/// Feature bit 3 (legacy): unattached endpoints bypass. Spec F2: new devices do not offer it.
pub const F_BYPASS: u64 = 0x08;
/// Feature bit 4: the PROBE request and `probe_size` are available.
pub const F_PROBE: u64 = 0x10;
/// Feature bit 5: the MAP flag `MAP_F_MMIO` is available.
pub const F_MMIO: u64 = 0x20;
/// Feature bit 6: config `bypass` is valid and the ATTACH flag `ATTACH_F_BYPASS` is available.
pub const F_BYPASS_CONFIG: u64 = 0x40;

// Little-endian field access. Callers check lengths first: these index directly.

fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

fn le32(b: &[u8], off: usize) -> u32 {
    let mut a = [0; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], off: usize) -> u64 {
    let mut a = [0; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feature_bits_are_the_specs() {
        let bits = [
            (F_INPUT_RANGE, 0),
            (F_DOMAIN_RANGE, 1),
            (F_MAP_UNMAP, 2),
            (F_BYPASS, 3),
            (F_PROBE, 4),
            (F_MMIO, 5),
            (F_BYPASS_CONFIG, 6),
        ];
        for (feature, bit) in bits {
            assert_eq!(feature, 1 << bit, "feature bit {bit}");
        }
    }
}
