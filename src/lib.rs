//! vhost-device-iommu: a virtio-iommu device served over vhost-user.
//!
//! The binary (`src/main.rs`) is a thin CLI over this library so that integration tests,
//! examples and benchmarks drive exactly the code the daemon runs.
