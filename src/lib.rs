// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! vhost-device-iommu: a virtio-iommu device served over vhost-user.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library so that integration tests,
//! examples and benchmarks drive exactly the code the daemon runs.
pub mod config;
pub mod control;
pub mod ctl;
pub mod device;
pub mod dirty;
pub mod engine;
pub mod faults;
pub mod hugepages;
pub mod masters;
pub mod pacing;
pub mod ratelimit;
pub mod request;
mod ring;
pub mod seccomp;
pub mod server;
pub mod state;
pub mod statefile;
pub mod stats;
pub mod translate;
pub mod vhost_user;
pub mod viot;
