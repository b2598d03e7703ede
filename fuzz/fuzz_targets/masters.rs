#![no_main]
// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vhost_device_iommu_fuzz::masters::run(data);
});
