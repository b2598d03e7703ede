#!/usr/bin/env bash
# The guest's view: the guest's VFIO map/unmap loop against QEMU's built-in
# virtio-iommu and against our daemon (release build), alternated in one run; prints a
# markdown table with ratios and the daemon's CPU use while the guest idles.
#
#   scripts/e2e-bench.sh                      # 3 rounds each, TCG
#   VHOST_IOMMU_BENCH_ROUNDS=5 VHOST_IOMMU_BENCH_DAEMON_ARGS="--poll-us 0" scripts/e2e-bench.sh
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/e2e-setup.sh
VHOST_IOMMU_E2E=1 cargo test --release --test e2e_bench -- --ignored --nocapture guest_view_benchmark
