// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Fuzz harnesses for vhost-device-iommu, shared by the cargo-fuzz targets in
//! `fuzz_targets/` and by this crate's tests, which replay the committed corpus.
//!
//! - [`parse`]: the wire format (`virtio`) on hostile bytes, with round-trip properties;
//! - [`model`]: guest and host operation sequences on `ownership::Iommu` against
//!   [`ownership::reference::Reference`];
//! - [`chain`]: hostile descriptor chains through the daemon's request path on real guest
//!   memory;
//! - [`state`]: the device-state loader on hostile bytes;
//! - [`masters`]: the daemon's side of the DMA-master socket (frames, sessions) on hostile
//!   bytes.
//!
//! Inputs are decoded with `arbitrary`; [`enc`] is its inverse, used to write the seeds
//! (`cargo test -- --ignored write_corpus`).

pub mod chain;
pub mod enc;
pub mod masters;
pub mod model;
pub mod parse;
pub mod state;
pub mod types;

#[cfg(test)]
mod seeds;

/// An input as `target` decodes it, for reading artifacts.
pub fn describe(target: &str, data: &[u8]) -> String {
    match target {
        "parse" => format!("{:#?}", enc::decode_all::<parse::Case>(data, 64)),
        "model" => match data.split_first() {
            Some((&which, rest)) => format!(
                "topology {}\n{:#?}",
                which % model::TOPOLOGIES,
                enc::decode_all::<model::Op>(rest, 256)
            ),
            None => "empty".into(),
        },
        "chain" => format!("{:#?}", chain::Input::decode(data)),
        "state" | "masters" => format!("{data:02x?}"),
        other => format!("unknown target {other}"),
    }
}
