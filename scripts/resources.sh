#!/usr/bin/env bash
# Full-size run of the resource tests (issue 5, tests/resources.rs): the huge-directory
# test at RES_BIG_N entries (default 1,000,000; CI runs 100,000), listed through the
# mount with every name checked and the daemon's peak RSS growth bounded per entry.
# Knobs:
#   RES_BIG_N=N      entries in the huge directory (default 1000000)
#   RES_TMP=DIR      where its layers are made (default /dev/shm; ~1 GB of tmpfs at 1M)
#   RES_ALL=1        also run the ulimit -n 256 and full-upper tests
#   UNIONMOUNT_BIN   the binary under test (default: the debug build made here)
# Prints one summary line; exits non-zero on any failure. The tests unmount everything on
# every path; if the run is killed, the trap detaches and removes whatever the test
# process (known by its pid, so nothing of a parallel run is touched) left behind.
set -euo pipefail
cd "$(dirname "$0")/.."
N="${RES_BIG_N:-1000000}"
TMP="${RES_TMP:-/dev/shm}"
filter=huge_directory_lists_in_bounded_memory
[ "${RES_ALL:-0}" = 1 ] && filter=""
log=$(mktemp /tmp/unionmount-resources.XXXXXX)
pid=""
cleanup() {
  rc=$?
  set +e +o pipefail
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # Mounts and dirs of this test process only: their names carry its pid.
    awk '{print $5}' /proc/self/mountinfo | grep -E "unionmount-test-([a-z]+-)?$pid-" |
      sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    for d in "$TMP" /var/tmp /tmp; do
      find "$d" -maxdepth 1 -regextype egrep -regex ".*/unionmount-test-([a-z]+-)?$pid-.*" \
        -exec rm -rf {} + 2>/dev/null || true
    done
  fi
  rm -f "$log"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo build --quiet --tests
bin=$(CARGO_BUILD_JOBS="${CARGO_BUILD_JOBS:-1}" cargo test --test resources --no-run 2>&1 |
  grep -o 'target/[a-z]*/deps/resources-[0-9a-f]*' | head -1)
[ -x "$bin" ] || { echo "resources.sh: test binary not found" >&2; exit 1; }

start=$(date +%s)
RES_BIG_N="$N" RES_TMP="$TMP" UNIONMOUNT_REQUIRE_MOUNT=1 \
  "$bin" --test-threads=1 --nocapture $filter >"$log" 2>&1 &
pid=$!
set +e
wait "$pid"
status=$?
set -e
pid_done=$pid
pid=""
secs=$(( $(date +%s) - start ))
grep -oE "listed [0-9]+ entries.*|daemon fd peak [0-9]+|[0-9]+ files open.*|panicked.*|test result:.*" "$log" || true
if [ "$status" -ne 0 ]; then
  tail -n 40 "$log" >&2
  echo "resources.sh: FAILED (exit $status) after ${secs}s, N=$N" >&2
  exit 1
fi
worst=$(grep -o '+[0-9]* B/entry' "$log" | tr -dc '0-9\n' | sort -n | tail -1)
passed=$(grep -oE 'ok\. [0-9]+ passed' "$log" | grep -oE '[0-9]+' | head -1)
echo "resources.sh: ok: $passed tests, huge directory N=$N, worst peak RSS growth" \
  "${worst:-?} B/entry, ${secs}s (test process $pid_done)"
