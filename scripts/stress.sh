#!/bin/sh
# Long concurrency stress (issue 5): runs tests/concurrency.rs round after round, each with
# a fresh seed, with FUSE passthrough on and off, until the time is up. Every round ends
# with the kernel-overlayfs and remount comparison of the tree.
#
# Knobs (environment):
#   UNIONMOUNT_STRESS_SECS        total run time in seconds (default 600)
#   UNIONMOUNT_STRESS_ROUND_SECS  length of one round (default 60)
#   UNIONMOUNT_STRESS_THREADS     threads per round (default 8)
#   UNIONMOUNT_STRESS_SEED        first seed (default: from the clock); round N uses SEED+N
#   UNIONMOUNT_STRESS_STALL_SECS  watchdog limit per operation (default 20)
#   UNIONMOUNT_STRESS_MODE        shared-dirs (default: threads share directories, each on
#                                 its own names) or same-names (all threads race on the
#                                 same names); CI runs both briefly
#
# Prints one summary line; exits non-zero when any round failed. Mounts and temp dirs are
# cleaned up on every exit path.
set -u
cd "$(dirname "$0")/.."

total=${UNIONMOUNT_STRESS_SECS:-600}
round=${UNIONMOUNT_STRESS_ROUND_SECS:-60}
threads=${UNIONMOUNT_STRESS_THREADS:-8}
seed=${UNIONMOUNT_STRESS_SEED:-$(date +%s)}
mode=${UNIONMOUNT_STRESS_MODE:-shared-dirs}
case $mode in
shared-dirs) tests="stress_shared_dirs_default_options stress_shared_dirs_passthrough_off" ;;
same-names) tests="stress_same_names_default_options stress_same_names_passthrough_off" ;;
*) echo "stress.sh: UNIONMOUNT_STRESS_MODE must be shared-dirs or same-names, not '$mode'" >&2; exit 2 ;;
esac

tmp=$(mktemp -d /var/tmp/unionmount-stress.XXXXXX)
cleanup() {
    # Anything of ours still mounted (a killed run): detach it, then remove the tree.
    grep " $tmp/" /proc/self/mountinfo | awk '{print $5}' | sort -r | while read -r m; do
        umount -l "$m" 2>/dev/null
    done
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "building..."
CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-1} cargo test --test concurrency --no-run >"$tmp/build.log" 2>&1 || {
    cat "$tmp/build.log"
    echo "stress: build failed"
    exit 1
}

end=$(( $(date +%s) + total ))
rounds=0
failed=0
ops=0
n=0
while [ "$(date +%s)" -lt "$end" ]; do
    left=$(( end - $(date +%s) ))
    secs=$round
    [ "$left" -lt "$secs" ] && secs=$left
    [ "$secs" -lt 5 ] && secs=5
    for t in $tests; do
        s=$(( seed + n ))
        n=$(( n + 1 ))
        out="$tmp/round-$n.log"
        UNIONMOUNT_REQUIRE_MOUNT=1 UNIONMOUNT_TEST_TMPDIR="$tmp" \
            UNIONMOUNT_STRESS_SECS=$secs UNIONMOUNT_STRESS_THREADS=$threads \
            UNIONMOUNT_STRESS_SEED=$s \
            cargo test -q --test concurrency "$t" -- --exact --include-ignored --nocapture \
            >"$out" 2>&1
        rc=$?
        rounds=$(( rounds + 1 ))
        line=$(grep -m1 '^concurrency\[' "$out")
        o=$(printf '%s\n' "$line" | sed -n 's/.* \([0-9][0-9]*\) ops .*/\1/p')
        ops=$(( ops + ${o:-0} ))
        if [ $rc -ne 0 ]; then
            failed=$(( failed + 1 ))
            echo "FAIL round $rounds ($t, seed $s):"
            grep -v '^ *[0-9]*: \|^ *at ' "$out" | tail -60
        else
            echo "ok   round $rounds: $line"
        fi
    done
done
echo "stress ($mode): $rounds rounds, $failed failed, $ops ops, $threads threads, ${total}s, first seed $seed"
[ "$failed" -eq 0 ]
