// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Target `state`: the device-state loader (`vhost_device_iommu::state::decode`, then
//! `ownership::Iommu::restore`) on hostile bytes.
//!
//! `input[0]` picks how the rest is used: bit 0 set, the header's length, the fingerprint and
//! the checksum are fixed up first, so that mutations reach the body's parser instead of dying
//! at the checksum; bit 1 set, the state is loaded into a model that already holds one.
//! Properties: no panic; a refused state changes nothing (snapshot before and after); an
//! accepted one is what the model then holds, and it survives a second round trip unchanged
//! (encode, decode, restore into a fresh model).

use ownership::{reference::snapshot, DomainKind, Iommu, Limits, Topology, X86_MSI_REGION};
use vhost_device_iommu::state::{decode, encode, fingerprint, Caps, DeviceState};

/// The topology states are loaded into: a 2-endpoint group, tight limits.
pub fn topology() -> Topology {
    Topology::builder()
        .endpoints([1, 2, 3, 4])
        .group([2, 3])
        .domain_range(0, 7)
        .region_all(X86_MSI_REGION)
        .limits(Limits {
            max_domains: 4,
            max_mappings_per_domain: 64,
            max_mappings: 128,
            max_table_bytes: 2 << 20,
        })
        .build()
        .expect("state topology")
}

pub const FEATURES: u64 = 0x1_7000_007f;

fn caps() -> Caps {
    Caps {
        offered_features: FEATURES,
        max_domains: 4,
        max_mappings: 128,
        max_faults: 16,
        endpoints: 4,
    }
}

/// Makes the header's length and fingerprint and the trailing checksum right for the bytes
/// between them.
pub fn fix_up(bytes: &mut [u8]) {
    if bytes.len() < 28 {
        return;
    }
    let fp = fingerprint(&topology(), FEATURES);
    bytes[12..16].copy_from_slice(&fp.to_le_bytes());
    let body = (bytes.len() - 28) as u64;
    bytes[16..24].copy_from_slice(&body.to_le_bytes());
    let end = bytes.len() - 4;
    let crc = crc32fast::hash(&bytes[..end]);
    bytes[end..].copy_from_slice(&crc.to_le_bytes());
}

/// A model holding something, for loads into a non-empty device.
fn programmed() -> Iommu {
    let mut m = Iommu::new(topology());
    let _ = m.attach(5, 1, DomainKind::Paging);
    let _ = m.map(5, 0, 0xfff, 0x1000, ownership::Perms::READ);
    m
}

pub fn run(data: &[u8]) {
    outcome(data);
}

/// What became of an input: how far it got.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Empty,
    Undecodable,
    RefusedByTheModel,
    Loaded,
}

pub fn outcome(data: &[u8]) -> Outcome {
    let Some((&mode, rest)) = data.split_first() else {
        return Outcome::Empty;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 {
        fix_up(&mut bytes);
    }
    let fp = fingerprint(&topology(), FEATURES);
    let Ok(state) = decode(&bytes, fp, &caps()) else {
        return Outcome::Undecodable;
    };
    let mut m = if mode & 2 != 0 {
        programmed()
    } else {
        Iommu::new(topology())
    };
    let before = snapshot(&m);
    match m.restore(&state.guest) {
        Err(_) => {
            assert_eq!(snapshot(&m), before, "a refused state changed the model");
            Outcome::RefusedByTheModel
        }
        Ok(()) => {
            let held = m.guest_state();
            assert_eq!(held.mapping_count(), state.guest.mapping_count());
            let again = DeviceState {
                guest: held.clone(),
                ..state
            };
            let bytes = encode(&again, fp);
            let decoded = decode(&bytes, fp, &caps()).expect("a state we wrote decodes");
            assert_eq!(decoded, again, "round trip");
            let mut fresh = Iommu::new(topology());
            fresh
                .restore(&decoded.guest)
                .expect("a state the model held loads");
            assert_eq!(fresh.guest_state(), held);
            Outcome::Loaded
        }
    }
}
