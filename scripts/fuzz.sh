#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
# Runs the cargo-fuzz targets in fuzz/ on the stable toolchain.
#
#   scripts/fuzz.sh [SECONDS]        each target for SECONDS (default 60)
#
# Environment:
#   FUZZ_TARGETS   targets to run (default: "parse model chain state masters")
#   FUZZ_TIMEOUT   seconds one input may take before it counts as a hang (default 10)
#   FUZZ_ARGS      extra libFuzzer arguments (e.g. "-jobs=2" or "-dict=...")
#   FUZZ_CORPUS    directory for the corpus grown by this run (default: a temporary one,
#                  removed at exit; the committed seeds in fuzz/corpus/ are only read)
#
# cargo-fuzz needs nightly-only rustc flags (-Zsanitizer=address, sancov passes);
# RUSTC_BOOTSTRAP=1 lets the stable compiler accept them. cargo-fuzz itself is installed
# from crates.io into ~/.cargo/bin when missing. Crash, timeout and OOM inputs are copied to
# fuzz/artifacts/<target>/; the script exits non-zero if any target found one.
# Non-interactive: no prompts, nothing read from stdin.
set -euo pipefail

seconds="${1:-60}"
targets="${FUZZ_TARGETS:-parse model chain state masters}"
timeout="${FUZZ_TIMEOUT:-10}"
extra="${FUZZ_ARGS:-}"
cargo_fuzz_version="0.13.2"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
exec </dev/null

case "$seconds" in
  '' | *[!0-9]*) echo "usage: $0 [SECONDS]" >&2; exit 2 ;;
esac

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz $cargo_fuzz_version (once, into ~/.cargo/bin)"
  cargo install cargo-fuzz --locked --version "$cargo_fuzz_version"
fi
echo "== $(cargo fuzz --version), $(rustc --version)"

# Stable rustc accepts cargo-fuzz's -Z flags (AddressSanitizer, sancov) with this set.
export RUSTC_BOOTSTRAP=1

if [ -n "${FUZZ_CORPUS:-}" ]; then
  work="$FUZZ_CORPUS"
  mkdir -p "$work"
  cleanup() { :; } # shellcheck disable=SC2317
else
  work="$(mktemp -d "${TMPDIR:-/tmp}/vhost-iommu-fuzz.XXXXXX")"
  cleanup() { rm -rf "$work"; }
fi
trap cleanup EXIT

for target in $targets; do
  echo "== building $target"
  cargo fuzz build "$target" 2>&1 | tail -n 2
done

status=0
summary=()
for target in $targets; do
  corpus="$work/corpus/$target"
  artifacts="$work/artifacts/$target"
  log="$work/$target.log"
  mkdir -p "$corpus" "$artifacts" "fuzz/corpus/$target"
  echo "== fuzzing $target for ${seconds}s"
  set +e
  # The first corpus directory receives new inputs; fuzz/corpus/<target> only seeds it.
  # shellcheck disable=SC2086
  cargo fuzz run "$target" "$corpus" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -timeout="$timeout" -print_final_stats=1 \
    -artifact_prefix="$artifacts/" $extra >"$log" 2>&1
  rc=$?
  set -e
  grep -E "^#[0-9]+[[:space:]]+(INITED|pulse|DONE)|ERROR|panicked|SUMMARY" "$log" | tail -n 6 || true

  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n 1)"
  if [ -z "$execs" ]; then
    # No final stats (the run died): the last progress line has the count.
    execs="$(grep -oE '^#[0-9]+' "$log" | tail -n 1 | tr -d '#' || true)"
  fi
  last="$(grep -E '^#[0-9]+[[:space:]].*cov: ' "$log" | tail -n 1 || true)"
  cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")"
  ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")"
  corp="$(sed -n 's/.* corp: \([0-9]*\).*/\1/p' <<<"$last")"
  # libFuzzer keeps an input that took longer than -report_slow_units (10 s) as slow-unit-*
  # and goes on; on a shared machine a stall of the whole VM does that too. Each is run again
  # on its own and counts only when it fails or is slow again.
  for slow in "$artifacts"/slow-unit-*; do
    [ -e "$slow" ] || continue
    again="$(cargo fuzz run "$target" "$slow" -- -timeout="$timeout" 2>&1)" && rerun=0 || rerun=$?
    ms="$(sed -n 's/^Executed .* in \([0-9]*\) ms$/\1/p' <<<"$again" | tail -n 1)"
    if [ "$rerun" -eq 0 ] && [ -n "$ms" ] && [ "$ms" -lt $((timeout * 1000)) ]; then
      echo "-- $target: $(basename "$slow") ran again in ${ms} ms (the machine stalled); not counted"
      rm -f "$slow"
    fi
  done
  crashes="$(find "$artifacts" -type f | wc -l)"
  if [ "$crashes" -gt 0 ] || [ "$rc" -ne 0 ]; then
    status=1
    mkdir -p "fuzz/artifacts/$target"
    cp "$artifacts"/* "fuzz/artifacts/$target/" 2>/dev/null || true
    echo "!! $target: exit $rc, $crashes crashing input(s) copied to fuzz/artifacts/$target/"
    echo "!! reproduce: RUSTC_BOOTSTRAP=1 cargo fuzz run $target fuzz/artifacts/$target/<file>"
    echo "!! inspect:   cargo run --manifest-path fuzz/Cargo.toml --example show -- $target <file>"
    tail -n 40 "$log"
    [ "$crashes" -gt 0 ] || crashes="?"
  fi
  summary+=("$(printf '%-6s %12s %8s %6s %7s %7s %8s %5s' "$target" "${execs:-?}" \
    "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$crashes" "$rc")")
done

echo
echo "== fuzz summary (${seconds}s per target)"
printf '%-6s %12s %8s %6s %7s %7s %8s %5s\n' target executions exec/s cov features corpus crashes exit
for line in "${summary[@]}"; do
  echo "$line"
done
if [ "$status" -ne 0 ]; then
  echo "FAILED: a fuzz target crashed, hung or ran out of memory"
fi
exit "$status"
