// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `struct virtio_iommu_fault`: what the device writes into an eventq buffer.

use crate::{le32, le64, put32, put64};

/// Size of a fault record.
pub const FAULT_SIZE: usize = 24;

pub const FAULT_R_UNKNOWN: u8 = 0;
pub const FAULT_R_DOMAIN: u8 = 1;
pub const FAULT_R_MAPPING: u8 = 2;

pub const FAULT_F_READ: u32 = 0x1;
pub const FAULT_F_WRITE: u32 = 0x2;
/// Not in the spec text; defined by Linux's header.
pub const FAULT_F_EXEC: u32 = 0x4;
/// `address` is valid.
pub const FAULT_F_ADDRESS: u32 = 0x100;
/// Every defined fault flag: READ, WRITE, EXEC and ADDRESS.
pub const FAULT_F_MASK: u32 = 0x107;

/// `VIRTIO_IOMMU_FAULT_R_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// Internal error, or none of the others.
    Unknown = FAULT_R_UNKNOWN,
    /// The endpoint is not attached to a domain.
    Domain = FAULT_R_DOMAIN,
    /// The address is not mapped, or not with the right permissions.
    Mapping = FAULT_R_MAPPING,
}

/// A fault record: reason @0, `reserved[3]`, flags @4, endpoint @8, reserved1 @12,
/// address @16.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultRecord {
    pub reason: FaultReason,
    /// `FAULT_F_*`.
    pub flags: u32,
    pub endpoint: u32,
    /// Meaningful with `FAULT_F_ADDRESS` (spec E4: optional).
    pub address: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    #[error("fault record reserved field is not zero")]
    Reserved,
}

impl FaultRecord {
    /// Spec E1: `reserved` and `reserved1` zero. Spec E2: undefined flags zero.
    pub fn to_bytes(&self) -> [u8; FAULT_SIZE] {
        let mut b = [0; FAULT_SIZE];
        b[0] = self.reason as u8;
        put32(&mut b, 4, self.flags & FAULT_F_MASK);
        put32(&mut b, 8, self.endpoint);
        put64(&mut b, 16, self.address);
        b
    }

    /// Decodes a record (driver side). Per the driver rules: a record with `reserved`
    /// set is refused, `reserved1` and undefined flags are ignored, an unknown reason
    /// reads as `Unknown`.
    pub fn from_bytes(b: &[u8; FAULT_SIZE]) -> Result<Self, FaultError> {
        if b[1..4] != [0; 3] {
            return Err(FaultError::Reserved);
        }
        let reason = match b[0] {
            FAULT_R_DOMAIN => FaultReason::Domain,
            FAULT_R_MAPPING => FaultReason::Mapping,
            _ => FaultReason::Unknown,
        };
        Ok(FaultRecord {
            reason,
            flags: le32(b, 4) & FAULT_F_MASK,
            endpoint: le32(b, 8),
            address: le64(b, 16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FAULT: FaultRecord = FaultRecord {
        reason: FaultReason::Mapping,
        flags: FAULT_F_WRITE | FAULT_F_ADDRESS,
        endpoint: 0x0102,
        address: 0x1122_3344_5566_7788,
    };

    #[test]
    fn golden_fault() {
        #[rustfmt::skip]
        let want = [
            2, 0, 0, 0,                                     // reason @0, reserved[3]
            0x02, 0x01, 0, 0,                               // flags @4: WRITE | ADDRESS
            0x02, 0x01, 0, 0,                               // endpoint @8
            0, 0, 0, 0,                                     // reserved1 @12
            0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11, // address @16
        ];
        assert_eq!(FAULT.to_bytes(), want);
        assert_eq!(FaultRecord::from_bytes(&want), Ok(FAULT));
    }

    #[test]
    fn flag_bits() {
        assert_eq!(
            (FAULT_F_READ, FAULT_F_WRITE, FAULT_F_EXEC, FAULT_F_ADDRESS),
            (1 << 0, 1 << 1, 1 << 2, 1 << 8)
        );
        assert_eq!(
            FAULT_F_MASK,
            FAULT_F_READ | FAULT_F_WRITE | FAULT_F_EXEC | FAULT_F_ADDRESS
        );
    }

    #[test]
    fn e1_reserved_zero() {
        let b = FaultRecord {
            endpoint: u32::MAX,
            address: u64::MAX,
            ..FAULT
        }
        .to_bytes();
        assert_eq!(b[1..4], [0; 3]);
        assert_eq!(b[12..16], [0; 4]);
    }

    #[test]
    fn e2_undefined_flags_zero() {
        let b = FaultRecord {
            flags: u32::MAX,
            ..FAULT
        }
        .to_bytes();
        assert_eq!(le32(&b, 4), 0x107);
    }

    #[test]
    fn driver_side_rules() {
        let mut b = FAULT.to_bytes();
        b[12..16].fill(0xff); // reserved1: ignored
        b[7] = 0x80; // undefined flag: ignored
        assert_eq!(FaultRecord::from_bytes(&b), Ok(FAULT));
        b[0] = 9; // unknown reason reads as UNKNOWN
        let r = FaultRecord::from_bytes(&b).unwrap();
        assert_eq!(r.reason, FaultReason::Unknown);
        b[2] = 1; // reserved set: the record is ignored
        assert_eq!(FaultRecord::from_bytes(&b), Err(FaultError::Reserved));
    }

    proptest! {
        #[test]
        fn fault_round_trip(
            reason in prop_oneof![
                Just(FaultReason::Unknown),
                Just(FaultReason::Domain),
                Just(FaultReason::Mapping),
            ],
            flags in any::<u32>(),
            endpoint in any::<u32>(),
            address in any::<u64>(),
        ) {
            let rec = FaultRecord { reason, flags, endpoint, address };
            let want = FaultRecord { flags: flags & FAULT_F_MASK, ..rec };
            prop_assert_eq!(FaultRecord::from_bytes(&rec.to_bytes()), Ok(want));
        }
    }
}
