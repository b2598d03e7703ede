//! virtio-iommu wire format.
#![forbid(unsafe_code)]
