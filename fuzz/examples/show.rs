// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Prints a fuzz input as the target decodes it: `cargo run --example show -- TARGET FILE...`.

fn main() {
    let mut args = std::env::args().skip(1);
    let target = args.next().expect("usage: show parse|model|chain FILE...");
    for path in args {
        let data = std::fs::read(&path).expect("readable input");
        println!("== {path} ({} bytes)", data.len());
        println!("{}", vhost_device_iommu_fuzz::describe(&target, &data));
    }
}
