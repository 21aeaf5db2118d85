#!/usr/bin/env bash
# Runs every test: unit tests, integration tests that mount for real (root and /dev/fuse;
# they print SKIP otherwise, and fail instead under UNIONMOUNT_REQUIRE_MOUNT=1), the
# differential test against kernel overlayfs, and the checks CI enforces (fmt, clippy).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
threads="${UNIONMOUNT_TEST_THREADS:-4}"
cargo test --all-targets -- --test-threads="$threads"
# The same semantic and differential suites once more without FUSE passthrough (the path
# rootless mounts and older kernels take), and with every directory's lookups going through
# the name index that is otherwise used only for directories merging 8+ lower layers.
UNIONMOUNT_TEST_OPTS=passthrough=off UNIONMOUNT_TEST_INDEX_MIN_LOWERS=1 cargo test --test semantics --test differential \
  --test hardlinks --test upper_format -- --test-threads="$threads"
# Once more with `passthrough=all` and every lower file passed through (not only those of
# 256 KiB and more). Not the integrity suite: its model has every fd see a copy-up, which a
# read-only fd opened before it does not in this mode (see README, Performance).
UNIONMOUNT_TEST_OPTS=passthrough=all UNIONMOUNT_TEST_LOWER_PASSTHROUGH_MIN=0 cargo test \
  --test semantics --test differential --test hardlinks --test upper_format --test crash \
  --test hostile -- --test-threads="$threads"
# Once more with metadata-only copy-up (metacopy=on) and the writeback cache, where a
# writable open copies the bytes up only at its first write (the integrity model checks it).
UNIONMOUNT_TEST_OPTS=passthrough=off,metacopy=on cargo test --test semantics --test differential \
  --test hardlinks --test integrity -- --test-threads="$threads"
# The crash harness's copy-up scenarios with metacopy: kills while the bytes of a metacopy
# are copied into it. (Not with passthrough=off: the writeback cache flushes a write's
# mtime and its data in separate requests, so a kill can land between them.)
UNIONMOUNT_TEST_OPTS=metacopy=on cargo test --test crash crash_copy_up -- --test-threads="$threads"
# And once more with every lower layer served as a virtual layer (an in-memory tree, as image
# layers from the store are), whiteouts and opaque markers in the OCI dialect; metacopy is
# on by default there, as over image layers.
UNIONMOUNT_TEST_VIRTUAL_LOWERS=1 cargo test --test semantics --test differential \
  --test hardlinks --test upper_format --test passthrough -- --test-threads="$threads"
