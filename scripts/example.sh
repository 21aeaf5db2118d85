#!/usr/bin/env bash
# The main job, end to end: install what is needed, build and install unionmount, mount the
# small example image shipped in examples/small-image (three layers, with whiteouts and an
# opaque directory) with a writable upper, show what is inside, change something, show where
# the change went, unmount.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo build --release --quiet
install -m 0755 target/release/unionmount /usr/local/bin/unionmount

img=examples/small-image
tmp=$(mktemp -d /var/tmp/unionmount-example.XXXXXX)
mnt=$tmp/mnt
mkdir -p "$mnt" "$tmp/upper" "$tmp/work"
cleanup() {
  if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt"; fi
  rm -rf "$tmp"
}
trap cleanup EXIT

layers=$(grep -v '^#' "$img/LAYERS" | sed "s|\([^:]*\)|$PWD/$img/\1|g")
echo "+ unionmount --layers $layers --upper $tmp/upper --work $tmp/work $mnt"
unionmount --layers "$layers" --upper "$tmp/upper" --work "$tmp/work" "$mnt"

echo; echo "== merged tree =="
(cd "$mnt" && find . -mindepth 1 | sort)
echo; echo "== /etc/os-release (app layer hides base) =="; cat "$mnt/etc/os-release"
echo "== /etc/motd (deleted by the app layer's .wh.motd) =="; ls "$mnt/etc/motd" 2>&1 || true
echo "== /var/cache/apt (opaque in the patch layer) =="; ls "$mnt/var/cache/apt"
echo "== run the layers' programs =="; "$mnt/bin/hello"; "$mnt/app/run.sh"

echo; echo "== write through the mount: copy-up, delete, create =="
echo "edited" >> "$mnt/etc/os-release"
rm "$mnt/bin/hello"
echo "new file" > "$mnt/app/new.txt"
echo "upper now holds:"; (cd "$tmp/upper" && find . -mindepth 1 -printf '%y %p\n' | sort)
echo "(a 'c' entry is a 0/0 character device: the whiteout for bin/hello)"
