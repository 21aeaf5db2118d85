#!/usr/bin/env bash
# Benchmark unionmount against native, kernel overlayfs and fuse-overlayfs on a realistic
# layered dataset (built once, cached under ${UNIONMOUNT_BENCH_DIR:-/var/tmp/unionmount-bench}).
#
#   scripts/bench.sh [--quick] [--reps N] [--only WORKLOAD,...] [--drivers D,...] [--build-only]
#
# Workloads: mount,walk,readall,seqread,randread,copyup,create,delete,compileall,layers,bigdir.
# Drivers: native,kernel,fuse-overlayfs,unionmount (native is always walked as the reference).
# Needs root and /dev/fuse. Prints a markdown table; writes target/bench/results-*.{md,json}.
# UNIONMOUNT_BIN=path skips the cargo build and benchmarks that binary.
# UNIONMOUNT_BENCH_OPTS=opt,... adds mount options to unionmount's (e.g. passthrough=all).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench.sh: needs root (mounts, drop_caches)" >&2; exit 1; }

need=()
for pkg in debootstrap fio fuse-overlayfs fuse3 attr python3 util-linux tar coreutils findutils; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bench.sh: installing ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
modprobe overlay 2>/dev/null || true

if [ -z "${UNIONMOUNT_BIN:-}" ]; then
  cargo build --release --quiet --bin unionmount
fi
exec /usr/bin/python3 benches/bench.py "$@"
