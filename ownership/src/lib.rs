//! virtio-iommu model.
#![forbid(unsafe_code)]
