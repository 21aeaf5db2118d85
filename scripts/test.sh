#!/usr/bin/env bash
# Runs every test: unit tests, integration tests that mount for real (root and /dev/fuse;
# they print SKIP otherwise, and fail instead under UNIONMOUNT_REQUIRE_MOUNT=1), the
# differential test against kernel overlayfs, and the checks CI enforces (fmt, clippy).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
cargo test --all-targets -- --test-threads="${UNIONMOUNT_TEST_THREADS:-4}"
