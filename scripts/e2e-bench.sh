#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# The guest's view: the guest's VFIO map/unmap loop against QEMU's built-in virtio-iommu and
# against our daemon (release build) on the same QEMU and guest, alternated round by round
# (each device goes first in every other round). Prints, per round and device, the rates, the
# guest's map/unmap latencies and what decided the daemon's (how its worker found requests,
# sleeps per second, poll windows, where the worker and QEMU's vCPU thread ran and how long
# each waited for a CPU); then per row the median and worst ratio over the rounds, the load
# average, and the daemon's CPU use while the guest idles.
#
#   scripts/e2e-bench.sh                                   # 5 rounds, TCG, default options
#   scripts/e2e-bench.sh --rounds 2                        # a quick look
#   VHOST_IOMMU_BENCH_DAEMON_ARGS="--poll-mode fixed" scripts/e2e-bench.sh
#   VHOST_IOMMU_BENCH_PIN=vcpu=0,worker=0 scripts/e2e-bench.sh   # both threads on CPU 0
#
# Ratios are only worth comparing between runs on a quiet machine: the load average is
# printed with the table.
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."
while [ $# -gt 0 ]; do
	case "$1" in
	--rounds)
		[ $# -ge 2 ] || { echo "--rounds needs a number" >&2; exit 2; }
		export VHOST_IOMMU_BENCH_ROUNDS="$2"
		shift 2
		;;
	-h | --help)
		sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "unknown argument: $1 (see --help)" >&2
		exit 2
		;;
	esac
done
scripts/e2e-setup.sh
VHOST_IOMMU_E2E=1 cargo test --release --test e2e_bench -- --ignored --nocapture guest_view_benchmark
