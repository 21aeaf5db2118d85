#!/usr/bin/env bash
# Runs the SIGKILL crash-safety harness (tests/crash.rs) with many kills: the daemon killed
# during copy-ups (large and sparse files), renames, deletes and creations over whiteouts,
# and `image commit` / `image import` killed mid-way; after each kill the upper, the
# workdir, the merged tree and the store are checked (see the doc at the top of
# tests/crash.rs). Needs root and /dev/fuse; strace (for the slowed-daemon kills) is used
# when present.
#
# Usage: scripts/crash.sh [--kills N] [--seed S] [--big-mib M] [--no-slow]
#   --kills N     total kills over the 7 scenarios (default 200; each gets ceil(N/7))
#   --seed S      random seed (default: from the clock; each scenario prints its own)
#   --big-mib M   size of the large lower file in MiB (default 64; the sparse file is 4x)
#   --no-slow     never run the daemon under strace delay injection
# Prints one `crash[SCENARIO]:` line per scenario and a summary line; exits non-zero on any
# failure. Every mount and temp dir it made is removed on exit, also on failure.
set -euo pipefail
cd "$(dirname "$0")/.."

kills=200 seed="" big=64 slow=1
while [ $# -gt 0 ]; do
  case "$1" in
    --kills) kills="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    --big-mib) big="$2"; shift 2 ;;
    --no-slow) slow=0; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "crash.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

tmp=$(mktemp -d /var/tmp/unionmount-crash.XXXXXX)
cleanup() {
  # Detach whatever is still mounted under our temp dir (deepest first), then remove it.
  awk -v t="$tmp" 'index($5, t) == 1 { print $5 }' /proc/self/mountinfo | sort -r |
    while read -r m; do umount -l "$m" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

export CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}"
cargo test --test crash --no-run --quiet

env_args=(UNIONMOUNT_TEST_TMPDIR="$tmp" UNIONMOUNT_CRASH_KILLS="$kills"
  UNIONMOUNT_CRASH_BIG_MIB="$big" UNIONMOUNT_REQUIRE_MOUNT=1)
[ -n "$seed" ] && env_args+=(UNIONMOUNT_CRASH_SEED="$seed")
[ "$slow" = 0 ] && env_args+=(UNIONMOUNT_CRASH_SLOW=0)

start=$(date +%s)
set +e
env "${env_args[@]}" cargo test --test crash --quiet -- --nocapture --test-threads=2 2>&1 |
  tee "$tmp/log"
rc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - start ))

survived=$(grep -o 'crash\[[^]]*\]: [0-9]* kills survived' "$tmp/log" |
  awk '{ s += $2 } END { print s + 0 }')
scenarios=$(grep -c 'kills survived' "$tmp/log" || true)
left=$(awk -v t="$tmp" 'index($5, t) == 1' /proc/self/mountinfo | wc -l)
if [ "$rc" -eq 0 ] && [ "$scenarios" -eq 7 ] && [ "$left" -eq 0 ]; then verdict=ok; else verdict=FAILED; fi
echo "crash.sh: $verdict: $survived kills survived in $scenarios/7 scenarios, ${secs} s wall" \
  "(requested $kills, big file ${big} MiB, slow=$slow); mounts left: $left"
[ "$verdict" = ok ] || exit 1
