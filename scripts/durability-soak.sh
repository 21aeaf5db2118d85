#!/usr/bin/env bash
# Long run of tests/durability.rs random_fsyncs_survive_crash_images: RUNS runs, each with a
# fresh seed and ROUNDS rounds of random writes/fsyncs/copy-ups through a unionmount mount
# whose upper is an ext4 on a loop device, every round checked on a crash image (a copy of
# the device, journal replayed): every fsynced file exact, no lower file hidden by a copy-up
# without its data. Needs root, /dev/fuse, losetup, mkfs.ext4, strace
# (scripts/install-deps.sh).
#
#   scripts/durability-soak.sh [ROUNDS [RUNS]]     # defaults: 100 rounds, 5 runs (~1-2 min)
#   UNIONMOUNT_DURABILITY_SEED=N scripts/durability-soak.sh 100 1   # replay one seed
#
# Prints one summary line; exits non-zero on any failure (the failing seed is printed).
# Leaves no mount, loop device or temp dir behind, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-100}
RUNS=${2:-5}
LOG=$(mktemp /tmp/durability-soak.XXXXXX)
TEST_PID=

# Undo what a test process that is gone (killed, or interrupted) left: its union, ext4 and
# crash-copy mounts, the loop devices on its images, its temp dir.
cleanup() {
  if [ -n "$TEST_PID" ] && kill -0 "$TEST_PID" 2>/dev/null; then
    kill "$TEST_PID" 2>/dev/null || true
    sleep 1
    kill -9 "$TEST_PID" 2>/dev/null || true
  fi
  for dir in /var/tmp/unionmount-test-dur-random-*; do
    [ -d "$dir" ] || continue
    pid=$(basename "$dir" | cut -d- -f5)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then continue; fi
    for m in "$dir/mnt" "$dir/crash" "$dir/disk"; do
      while grep -q " $m " /proc/self/mountinfo; do umount -l "$m" || break; done
    done
    losetup -j "$dir/disk.img" -O NAME -n 2>/dev/null | xargs -r -n1 losetup -d || true
    rm -rf "$dir"
  done
  rm -f "$LOG"
}
trap cleanup EXIT

cargo build --quiet --tests
BIN=$(cargo test --no-run --message-format=json --test durability 2>/dev/null |
  sed -n 's/.*"executable":"\([^"]*durability[^"]*\)".*/\1/p' | tail -1)
[ -x "$BIN" ] || { echo "durability-soak: no test binary built" >&2; exit 1; }

ops=0 syncs=0 checked=0 done_runs=0
start=$(date +%s)
for run in $(seq 1 "$RUNS"); do
  UNIONMOUNT_REQUIRE_MOUNT=1 UNIONMOUNT_DURABILITY_ROUNDS=$ROUNDS \
    "$BIN" --exact random_fsyncs_survive_crash_images --nocapture >"$LOG" 2>&1 &
  TEST_PID=$!
  if ! wait "$TEST_PID"; then
    TEST_PID=
    grep -E "seed|panicked|assert" "$LOG" | head -20 >&2
    echo "durability-soak: FAILED in run $run of $RUNS" >&2
    exit 1
  fi
  TEST_PID=
  line=$(grep -E "seed [0-9]+: [0-9]+ rounds" "$LOG" | tail -1)
  [ -n "$line" ] || { echo "durability-soak: run $run printed no summary" >&2; cat "$LOG" >&2; exit 1; }
  o=$(sed -n 's/.* \([0-9]*\) ops.*/\1/p' <<<"$line")
  s=$(sed -n 's/.* \([0-9]*\) syncs.*/\1/p' <<<"$line")
  c=$(sed -n 's/.* \([0-9]*\) files checked.*/\1/p' <<<"$line")
  ops=$((ops + o)) syncs=$((syncs + s)) checked=$((checked + c)) done_runs=$((done_runs + 1))
done
echo "durability-soak: ok: $done_runs runs x $ROUNDS rounds (= $((done_runs * ROUNDS)) crash images), $ops ops, $syncs syncs, $checked file checks, $(( $(date +%s) - start )) s"
