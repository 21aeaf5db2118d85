#!/usr/bin/env bash
# Runs the cargo-fuzz targets in fuzz/ one after another, each for a set time, then merges
# what they found into fuzz/corpus/<target>/ (minimised with `cargo fuzz cmin`) and keeps
# every crash as fuzz/regressions/<target>/<artifact> (replayed in CI by
# tests/fuzz_regressions.rs).
#
#   scripts/fuzz.sh [--secs N] [--sanitizer address|none] [--max-len BYTES] [--no-merge]
#                   [TARGET...]
#
#   --secs N        seconds per target (default 60)
#   --sanitizer S   cargo-fuzz sanitizer (default address; none builds and runs faster)
#   --max-len B     libFuzzer -max_len (default per target: 1024 for options, digest and
#                   whiteout, 8192 for layer_index_file, 16384 for the rest; inputs stay small)
#   --no-merge      do not touch fuzz/corpus/ (just fuzz and report)
#   TARGET...       default: every target in fuzz/fuzz_targets/
#
# Works on a fresh machine: installs cargo-fuzz if missing; uses the nightly toolchain if
# rustup has one, else stable with RUSTC_BOOTSTRAP=1 (cargo-fuzz needs -Z flags). One
# libFuzzer process at a time (-jobs=1). Prints one line per target with executions and
# seconds, and a summary line; exits non-zero if any target crashed or failed to build/run.
# Temporary corpora and everything the targets leave in TMPDIR are removed on exit.
set -euo pipefail

SECS=60
SANITIZER=address
MAX_LEN=
MERGE=1
TARGETS=()
while [ $# -gt 0 ]; do
    case "$1" in
        --secs) SECS="$2"; shift 2 ;;
        --sanitizer) SANITIZER="$2"; shift 2 ;;
        --max-len) MAX_LEN="$2"; shift 2 ;;
        --no-merge) MERGE=0; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        -*) echo "fuzz.sh: unknown option $1" >&2; exit 2 ;;
        *) TARGETS+=("$1"); shift ;;
    esac
done
case "$SECS" in ''|*[!0-9]*) echo "fuzz.sh: --secs needs a whole number" >&2; exit 2 ;; esac

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
FUZZ="$ROOT/fuzz"
if [ ${#TARGETS[@]} -eq 0 ]; then
    for f in "$FUZZ"/fuzz_targets/*.rs; do TARGETS+=("$(basename "$f" .rs)"); done
fi
for t in "${TARGETS[@]}"; do
    [ -f "$FUZZ/fuzz_targets/$t.rs" ] || { echo "fuzz.sh: no target $t" >&2; exit 2; }
done

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/unionmount-fuzzsh.XXXXXX")"
cleanup() { rm -rf "$SCRATCH"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    CF=(cargo +nightly fuzz)
else
    echo "fuzz.sh: no nightly toolchain; using stable with RUSTC_BOOTSTRAP=1"
    export RUSTC_BOOTSTRAP=1
    CF=(cargo fuzz)
fi
# Release build with debug assertions and overflow checks (what the regression test has).
BUILD=(-O -a --sanitizer "$SANITIZER")

cd "$FUZZ"
for t in "${TARGETS[@]}"; do "${CF[@]}" build "${BUILD[@]}" "$t"; done

# The targets' own scratch files go here, so a crash mid-input leaves nothing behind.
export TMPDIR="$SCRATCH/tmp"
mkdir -p "$TMPDIR"

failed=0
total_runs=0
total_crashes=0
summary=()
for t in "${TARGETS[@]}"; do
    new="$SCRATCH/new-$t"
    mkdir -p "$new" "corpus/$t" "artifacts/$t"
    log="$SCRATCH/$t.log"
    ls "artifacts/$t" | sort >"$SCRATCH/$t.before"
    rc=0
    start=$SECONDS
    len="$MAX_LEN"
    if [ -z "$len" ]; then
        case "$t" in
            options|digest|whiteout) len=1024 ;;
            layer_index_file) len=8192 ;;
            *) len=16384 ;;
        esac
    fi
    # index_layer hashes on helper threads; after an early error return they finish a few
    # microseconds later, and LeakSanitizer, checking at that moment, reports their
    # thread-locals as leaked. Leak checks are off for that target only.
    leaks=1
    [ "$t" = tar_index ] && leaks=0
    "${CF[@]}" run "${BUILD[@]}" "$t" "$new" "corpus/$t" -- \
        -max_total_time="$SECS" -max_len="$len" -detect_leaks="$leaks" -timeout=30 -rss_limit_mb=2048 \
        -print_final_stats=1 >"$log" 2>&1 || rc=$?
    secs=$((SECONDS - start))
    # libFuzzer's count: "Done N runs in S second(s)", or the final stats after a crash.
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 | grep -oE '[0-9]+' || true)
    [ -n "$runs" ] || runs=$(grep -oE 'number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1 || true)
    runs=${runs:-0}
    crashes=0
    for a in $(ls "artifacts/$t" | sort | comm -13 "$SCRATCH/$t.before" -); do
        mkdir -p "regressions/$t"
        cp "artifacts/$t/$a" "regressions/$t/$a"
        echo "fuzz.sh: $t: CRASH kept as fuzz/regressions/$t/$a"
        crashes=$((crashes + 1))
    done
    if [ "$rc" -ne 0 ] || [ "$crashes" -ne 0 ]; then
        failed=1
        echo "fuzz.sh: $t: libFuzzer exit $rc; last lines of the log:"
        grep -E 'panicked|ERROR|SUMMARY|Test unit written|==[0-9]+==' "$log" | head -20 || true
        tail -5 "$log"
    fi
    found=$(ls "$new" | wc -l)
    if [ "$MERGE" -eq 1 ] && [ "$found" -gt 0 ]; then
        cp -n "$new"/* "corpus/$t/" 2>/dev/null || true
        # Edges only (no hit counters): a corpus of hundreds of files, not thousands.
        "${CF[@]}" cmin "${BUILD[@]}" "$t" "corpus/$t" -- -max_len="$len" -use_counters=0 \
            >"$SCRATCH/$t.cmin.log" 2>&1 || { echo "fuzz.sh: $t: cmin failed"; tail -5 "$SCRATCH/$t.cmin.log"; failed=1; }
        # Hand-made seeds stay even when cmin finds them redundant.
        git -C "$ROOT" checkout -- ":(glob)fuzz/corpus/$t/seed-*" 2>/dev/null || true
    fi
    kept=$(ls "corpus/$t" | wc -l)
    line="target=$t runs=$runs secs=$secs new_inputs=$found corpus=$kept crashes=$crashes exit=$rc"
    echo "fuzz.sh: $line"
    summary+=("$line")
    total_runs=$((total_runs + runs))
    total_crashes=$((total_crashes + crashes))
done

echo "fuzz.sh: ---"
for l in "${summary[@]}"; do echo "fuzz.sh: $l"; done
echo "fuzz.sh: summary: ${#TARGETS[@]} targets, ${SECS}s each, $total_runs executions, $total_crashes crashes"
exit "$failed"
