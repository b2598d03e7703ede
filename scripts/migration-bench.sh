#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Migration of our daemon against QEMU's built-in virtio-iommu, side by side: runs the two
# migration tests of tests/e2e_life.rs alternately (ours, built-in, ours, ...) ROUNDS times
# and tabulates what each run printed on its MIGRATION lines: the downtime and total time
# `query-migrate` reports on the source, for the live migration (the guest mapping in a loop
# across the switch-over) and for the migration of the paused guest to a file; the size of the
# device's section in the migration file (QEMU's own account, from the description it appends
# to the stream) and, for ours, the daemon's state blob.
#
# Usage: scripts/migration-bench.sh [ROUNDS]   (default 3; needs the e2e rig with the patched
# QEMU: scripts/e2e-setup.sh). Environment: as the e2e tests (VHOST_IOMMU_CACHE, ...).
set -euo pipefail
exec </dev/null
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rounds=${1:-3}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "migration bench: $rounds rounds, load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s)
cargo test --release --test e2e_life --no-run >/dev/null 2>&1
for r in $(seq 1 "$rounds"); do
    for t in live_migration_and_a_file_restore_carry_the_mappings \
        builtin_virtio_iommu_migrates_the_same_way; do
        if ! VHOST_IOMMU_E2E=1 cargo test --release --test e2e_life "$t" -- --exact \
            --nocapture >"$out/$r-$t.log" 2>&1; then
            tail -n 60 "$out/$r-$t.log" >&2
            echo "migration bench: $t failed in round $r" >&2
            exit 1
        fi
        grep -h '^MIGRATION ' "$out/$r-$t.log" | sed "s/^/round=$r /" >>"$out/lines"
    done
done
echo "migration bench: load average after: $(cut -d' ' -f1-3 /proc/loadavg)," \
    "$(($(date +%s) - started)) s"
echo
cat "$out/lines"
echo
python3 - "$out/lines" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    f = dict(w.split("=", 1) for w in line.split() if "=" in w)
    rows.setdefault((f["device"], f["mode"]), []).append(f)

def col(runs, key):
    vals = [int(r[key]) for r in runs if r.get(key, "null") not in ("null", "")]
    if not vals:
        return "-"
    return f"{statistics.median(vals):.0f} ({min(vals)}-{max(vals)})"

print("| device | migration | runs | downtime ms | total ms | device section bytes | daemon state bytes |")
print("|---|---|---:|---:|---:|---:|---:|")
for device in ("ours", "builtin"):
    for mode in ("live", "file"):
        runs = rows.get((device, mode), [])
        print(f"| {device} | {mode} | {len(runs)} | {col(runs, 'downtime_ms')} | "
              f"{col(runs, 'total_ms')} | {col(runs, 'section_bytes')} | "
              f"{col(runs, 'daemon_state_bytes')} |")
print("\nmedian (min-max) over the runs; sections from the file migrations, the daemon's state "
      "from the live ones")
EOF
