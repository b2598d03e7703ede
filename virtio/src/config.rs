// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `struct virtio_iommu_config`: 40 bytes, little-endian.

use crate::{le32, le64, put32, put64, F_BYPASS_CONFIG};

/// Size of the config space.
pub const CONFIG_SIZE: usize = 40;
/// Offset of `bypass`, the only field the driver may write.
pub const CONFIG_BYPASS_OFFSET: u32 = 36;

/// The config space: page_size_mask @0, input_range @8/@16, domain_range @24/@28,
/// probe_size @32, bypass @36, `reserved[3]` @37. Range ends are inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Supported page sizes; the lowest set bit is the granule.
    pub page_size_mask: u64,
    pub input_range_start: u64,
    pub input_range_end: u64,
    pub domain_range_start: u32,
    pub domain_range_end: u32,
    pub probe_size: u32,
    /// 1: unattached endpoints bypass (with `F_BYPASS_CONFIG`).
    pub bypass: u8,
}

/// A config space that breaks a device rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("page_size_mask is zero")]
    PageSizeMaskZero,
    #[error("input_range start {start:#x} is above end {end:#x}")]
    InputRange { start: u64, end: u64 },
    #[error("domain_range start {start} is above end {end}")]
    DomainRange { start: u32, end: u32 },
    #[error("bypass is {0}, not 0 or 1")]
    Bypass(u8),
}

/// A driver write to the config space that the device refuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigWriteError {
    #[error(
        "config write of {len} bytes at offset {offset}: only bypass (1 byte at 36) is writable"
    )]
    ReadOnly { offset: u32, len: usize },
    #[error("config write to bypass but VIRTIO_IOMMU_F_BYPASS_CONFIG was not negotiated")]
    BypassConfigNotNegotiated,
    #[error("config write of bypass = {0}, not 0 or 1")]
    Bypass(u8),
}

impl Config {
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let mut b = [0; CONFIG_SIZE];
        put64(&mut b, 0, self.page_size_mask);
        put64(&mut b, 8, self.input_range_start);
        put64(&mut b, 16, self.input_range_end);
        put32(&mut b, 24, self.domain_range_start);
        put32(&mut b, 28, self.domain_range_end);
        put32(&mut b, 32, self.probe_size);
        b[36] = self.bypass;
        b
    }

    /// Decodes a config space; the reserved bytes are ignored.
    pub fn from_bytes(b: &[u8; CONFIG_SIZE]) -> Self {
        Config {
            page_size_mask: le64(b, 0),
            input_range_start: le64(b, 8),
            input_range_end: le64(b, 16),
            domain_range_start: le32(b, 24),
            domain_range_end: le32(b, 28),
            probe_size: le32(b, 32),
            bypass: b[36],
        }
    }

    /// Fills `buf` with the bytes at `offset`; bytes past the config space read as zero,
    /// so a vhost-user GET_CONFIG gets exactly the size it asked for.
    pub fn read(&self, offset: u32, buf: &mut [u8]) {
        let bytes = self.to_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        for (i, out) in buf.iter_mut().enumerate() {
            let at = start.checked_add(i).and_then(|o| bytes.get(o));
            *out = at.copied().unwrap_or(0);
        }
    }

    /// Applies a driver write. The driver may write only `bypass`, only with
    /// `F_BYPASS_CONFIG`, and only 0 or 1 (spec C3: the device never presents another
    /// value). A refused write changes nothing.
    pub fn write(
        &mut self,
        offset: u32,
        data: &[u8],
        negotiated_features: u64,
    ) -> Result<(), ConfigWriteError> {
        let [value] = data else {
            return Err(ConfigWriteError::ReadOnly {
                offset,
                len: data.len(),
            });
        };
        if offset != CONFIG_BYPASS_OFFSET {
            return Err(ConfigWriteError::ReadOnly { offset, len: 1 });
        }
        if negotiated_features & F_BYPASS_CONFIG == 0 {
            return Err(ConfigWriteError::BypassConfigNotNegotiated);
        }
        if *value > 1 {
            return Err(ConfigWriteError::Bypass(*value));
        }
        self.bypass = *value;
        Ok(())
    }

    /// Checks the device-side rules: spec C1 (page_size_mask != 0), ranges with
    /// start <= end, spec C3 (bypass is 0 or 1).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.page_size_mask == 0 {
            return Err(ConfigError::PageSizeMaskZero);
        }
        if self.input_range_start > self.input_range_end {
            return Err(ConfigError::InputRange {
                start: self.input_range_start,
                end: self.input_range_end,
            });
        }
        if self.domain_range_start > self.domain_range_end {
            return Err(ConfigError::DomainRange {
                start: self.domain_range_start,
                end: self.domain_range_end,
            });
        }
        if self.bypass > 1 {
            return Err(ConfigError::Bypass(self.bypass));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CFG: Config = Config {
        page_size_mask: 0x4020_1000,
        input_range_start: 0x1122,
        input_range_end: 0x0000_ffff_ffff_ffff,
        domain_range_start: 1,
        domain_range_end: 0xffff,
        probe_size: 512,
        bypass: 1,
    };

    #[test]
    fn golden_config() {
        #[rustfmt::skip]
        let want = [
            0x00, 0x10, 0x20, 0x40, 0, 0, 0, 0,             // page_size_mask @0
            0x22, 0x11, 0, 0, 0, 0, 0, 0,                   // input_range.start @8
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x00, 0x00, // input_range.end @16
            1, 0, 0, 0,                                     // domain_range.start @24
            0xff, 0xff, 0, 0,                               // domain_range.end @28
            0x00, 0x02, 0, 0,                               // probe_size @32
            1,                                              // bypass @36
            0, 0, 0,                                        // reserved @37
        ];
        assert_eq!(CFG.to_bytes(), want);
        assert_eq!(Config::from_bytes(&want), CFG);
    }

    #[test]
    fn read_any_window() {
        let bytes = CFG.to_bytes();
        let mut buf = [0xaa; 4];
        CFG.read(32, &mut buf);
        assert_eq!(buf, [0x00, 0x02, 0, 0]);
        let mut buf = [0xaa; 8];
        CFG.read(36, &mut buf);
        assert_eq!(buf, [1, 0, 0, 0, 0, 0, 0, 0]);
        let mut buf = [0xaa; 64];
        CFG.read(0, &mut buf);
        assert_eq!(buf[..40], bytes);
        assert_eq!(buf[40..], [0; 24]);
        let mut buf = [0xaa; 4];
        CFG.read(u32::MAX, &mut buf);
        assert_eq!(buf, [0; 4]);
    }

    #[test]
    fn c1_page_size_mask_nonzero() {
        let cfg = Config {
            page_size_mask: 0,
            ..CFG
        };
        assert_eq!(cfg.validate(), Err(ConfigError::PageSizeMaskZero));
        assert_eq!(CFG.validate(), Ok(()));
    }

    #[test]
    fn c3_bypass_only_0_or_1() {
        let mut cfg = CFG;
        for v in [2u8, 3, 0x80, 0xff] {
            assert_eq!(
                cfg.write(36, &[v], F_BYPASS_CONFIG),
                Err(ConfigWriteError::Bypass(v))
            );
            assert_eq!(cfg, CFG);
            let bad = Config { bypass: v, ..CFG };
            assert_eq!(bad.validate(), Err(ConfigError::Bypass(v)));
        }
        assert_eq!(cfg.write(36, &[0], F_BYPASS_CONFIG), Ok(()));
        assert_eq!(cfg.bypass, 0);
        assert_eq!(cfg.write(36, &[1], F_BYPASS_CONFIG), Ok(()));
        assert_eq!(cfg.bypass, 1);
    }

    #[test]
    fn bypass_write_needs_bypass_config() {
        let mut cfg = CFG;
        let features = !F_BYPASS_CONFIG;
        assert_eq!(
            cfg.write(36, &[0], features),
            Err(ConfigWriteError::BypassConfigNotNegotiated)
        );
        assert_eq!(cfg, CFG);
    }

    #[test]
    fn only_bypass_is_writable() {
        let mut cfg = CFG;
        for (offset, len) in [(0, 8), (0, 1), (32, 4), (36, 0), (36, 2), (36, 4), (37, 1)] {
            assert_eq!(
                cfg.write(offset, &vec![0; len], F_BYPASS_CONFIG),
                Err(ConfigWriteError::ReadOnly { offset, len })
            );
            assert_eq!(cfg, CFG);
        }
    }

    #[test]
    fn ranges_start_le_end() {
        let cfg = Config {
            input_range_start: 2,
            input_range_end: 1,
            ..CFG
        };
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::InputRange { start: 2, end: 1 })
        );
        let cfg = Config {
            domain_range_start: 9,
            domain_range_end: 8,
            ..CFG
        };
        assert_eq!(
            cfg.validate(),
            Err(ConfigError::DomainRange { start: 9, end: 8 })
        );
        // One IOVA, one domain ID: start == end is a valid range.
        let cfg = Config {
            input_range_start: 0x1000,
            input_range_end: 0x1000,
            domain_range_start: 9,
            domain_range_end: 9,
            ..CFG
        };
        assert_eq!(cfg.validate(), Ok(()));
    }

    proptest! {
        #[test]
        fn config_round_trip(
            page_size_mask in any::<u64>(),
            input in any::<(u64, u64)>(),
            domain in any::<(u32, u32)>(),
            probe_size in any::<u32>(),
            bypass in 0u8..2,
            offset in 0u32..48,
            len in 0usize..48,
        ) {
            let cfg = Config {
                page_size_mask,
                input_range_start: input.0,
                input_range_end: input.1,
                domain_range_start: domain.0,
                domain_range_end: domain.1,
                probe_size,
                bypass,
            };
            let bytes = cfg.to_bytes();
            prop_assert_eq!(Config::from_bytes(&bytes), cfg);
            let mut buf = vec![0xaa; len];
            cfg.read(offset, &mut buf);
            for (i, b) in buf.iter().enumerate() {
                let want = bytes.get(offset as usize + i).copied().unwrap_or(0);
                prop_assert_eq!(*b, want);
            }
        }
    }
}
