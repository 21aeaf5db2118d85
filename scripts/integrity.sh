#!/usr/bin/env bash
# Long run of the data-integrity exerciser (tests/integrity.rs): random reads, writes,
# truncates, fallocates, shared mmaps, copy_file_range, O_TRUNC/O_APPEND opens on files from
# a lower directory layer, a gzip image layer and the upper, checked against a model after
# every step; default data path and passthrough=off.
#
# Knobs (environment):
#   UNIONMOUNT_INTEGRITY_OPS      operations over the four runs (default 1000000)
#   UNIONMOUNT_INTEGRITY_SEED     seed, decimal or 0x-hex (default: random; always printed)
#   UNIONMOUNT_INTEGRITY_RELEASE  1 = build and run with --release (default: the dev profile)
#
# The four exercisers only (the fixed regression cases run with the rest of the tests).
# Prints one summary line; exits non-zero on any failure (with the seed to replay it).
# Every mount and temp dir it made is removed on exit, failure and interrupt included.
set -euo pipefail
cd "$(dirname "$0")/.."

OPS=${UNIONMOUNT_INTEGRITY_OPS:-1000000}
SEED=${UNIONMOUNT_INTEGRITY_SEED:-0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')}
PROFILE=()
[ "${UNIONMOUNT_INTEGRITY_RELEASE:-0}" = 1 ] && PROFILE=(--release)

TMP=$(mktemp -d /var/tmp/unionmount-integrity.XXXXXX)
LOG=$TMP/run.log

cleanup() {
    # Mounts under our temp dir, deepest first: abort a FUSE connection that would hang,
    # then detach.
    local dev mnt
    if [ -n "${testpid:-}" ] && kill -0 "$testpid" 2>/dev/null; then
        kill -TERM -- "-$testpid" 2>/dev/null || true
        wait "$testpid" 2>/dev/null || true
    fi
    { grep -F " $TMP/" /proc/self/mountinfo || true; } | awk '{print $3, $5}' | sort -r -k2 |
        while read -r dev mnt; do
            { echo 1 >"/sys/fs/fuse/connections/${dev#*:}/abort"; } 2>/dev/null || true
            umount -l "$mnt" 2>/dev/null || true
        done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "integrity: building (seed $SEED, $OPS operations)"
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo test "${PROFILE[@]}" --test integrity --no-run \
    >"$TMP/build.log" 2>&1 || { cat "$TMP/build.log"; exit 1; }

start=$(date +%s)
status=0
# In its own process group (setsid), so an interrupt of this script can end it at once.
UNIONMOUNT_TEST_TMPDIR=$TMP UNIONMOUNT_REQUIRE_MOUNT=1 \
    UNIONMOUNT_INTEGRITY_OPS=$OPS UNIONMOUNT_INTEGRITY_SEED=$SEED \
    setsid cargo test "${PROFILE[@]}" --test integrity -- --nocapture \
    --skip regression_ --skip sparse_copy_ >"$LOG" 2>&1 &
testpid=$!
wait "$testpid" || status=$?
testpid=
secs=$(( $(date +%s) - start ))

done_ops=$(sed -n 's/^integrity [a-z_]*: \([0-9]*\) ops.*/\1/p' "$LOG" | awk '{s+=$1} END {print s+0}')
runs=$(grep -c '^integrity [a-z_]*: [0-9]* ops' "$LOG" || true)
checks=$(sed -n 's/.*whole_checks: \([0-9]*\).*/\1/p' "$LOG" | awk '{s+=$1} END {print s+0}')
left=$(grep -c -F " $TMP/" /proc/self/mountinfo || true)

if [ "$status" != 0 ] || [ "$runs" != 4 ] || [ "$left" != 0 ]; then
    grep -E -A40 'panicked|^failures:' "$LOG" | head -150 || tail -50 "$LOG"
    echo "integrity: FAIL after ${secs}s: $runs of 4 runs passed ($done_ops operations), $left mounts left behind, seed $SEED"
    echo "replay: UNIONMOUNT_INTEGRITY_SEED=$SEED UNIONMOUNT_INTEGRITY_OPS=$OPS scripts/integrity.sh"
    exit 1
fi
grep '^integrity [a-z_]*: ' "$LOG"
echo "integrity: PASS $done_ops operations in $runs runs, $checks whole-file checks, ${secs}s, seed $SEED, no mount left"
