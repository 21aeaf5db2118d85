#!/usr/bin/env bash
# Long version of the upper-swap race in tests/hostile.rs: a co-tenant of the upper flips
# fresh directories to symlinks at a sentinel and back while an unprivileged user works in
# them through the mount (directory layers, passthrough on and off); the sentinel must
# never change. Needs root and /dev/fuse.
#
# Knobs: SWAPS (default 5000) swaps per mount, ROUNDS (default 1) repetitions.
# Prints one summary line: rounds, swaps, operations by the user and how many failed.
# Exits non-zero on any failure; every mount and temp dir is removed on every path.
set -euo pipefail
cd "$(dirname "$0")/.."
SWAPS="${SWAPS:-5000}"
ROUNDS="${ROUNDS:-1}"
tmp="$(mktemp -d /var/tmp/hostile-race.XXXXXX)"
# The unprivileged user must reach the mounts under it.
chmod 755 "$tmp"
log="$tmp/log"
cleanup() {
  # Anything the test left mounted under our temp dir (it should not), then the dir.
  { grep -F " $tmp/" /proc/self/mountinfo || true; } | awk '{print $5}' | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo build --quiet --tests
ops=0 failed=0
for r in $(seq 1 "$ROUNDS"); do
  if ! UNIONMOUNT_REQUIRE_MOUNT=1 UNIONMOUNT_TEST_TMPDIR="$tmp" TMPDIR="$tmp" \
    HOSTILE_RACE_SWAPS="$SWAPS" cargo test --quiet --test hostile \
    upper_dir_flipping_to_a_symlink_never_leaks_writes -- --nocapture >"$log" 2>&1; then
    cat "$log"
    echo "hostile-race: FAILED in round $r of $ROUNDS ($SWAPS swaps per mount)"
    exit 1
  fi
  while read -r o f; do
    ops=$((ops + o)); failed=$((failed + f))
  done < <(sed -n 's/.* swaps, \([0-9]*\) operations by uid 1000, \([0-9]*\) failed.*/\1 \2/p' "$log")
done
if grep -qF " $tmp/" /proc/self/mountinfo; then
  echo "hostile-race: FAILED: a mount was left behind under $tmp"
  exit 1
fi
echo "hostile-race: ok: $ROUNDS rounds x 2 mounts x $SWAPS swaps, $ops operations by uid 1000 ($failed refused), sentinel unchanged"
