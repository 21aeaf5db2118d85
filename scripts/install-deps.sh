#!/usr/bin/env bash
# Installs what building, running and testing unionmount needs on Debian 12:
# fuse3 (fusermount3, mount.fuse3), attr (getfattr/setfattr), fuse-overlayfs (the peer the
# benchmarks compare with), util-linux (setpriv, unshare), skopeo (the image tests convert
# with it; umoci unpacks committed images in a test), strace (tests/crash.rs slows the daemon with
# its delay injection; tests/durability.rs watches its syncs) and e2fsprogs (mkfs.ext4; the
# durability tests). Rust comes from the machine's rustup.
set -euo pipefail
need=()
for pkg in fuse3 attr fuse-overlayfs util-linux skopeo umoci strace e2fsprogs; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -e /dev/fuse ] || { modprobe fuse 2>/dev/null || true; }
# Debian's udev rule makes /dev/fuse 0666 so that unprivileged users (through fusermount3) and
# user namespaces can mount; some container images ship it 0600. Restore the usual mode.
if [ -c /dev/fuse ] && [ "$(id -u)" -eq 0 ] && [ "$(stat -c %a /dev/fuse)" != 666 ]; then
  chmod 0666 /dev/fuse
fi
echo "dependencies ready: fuse3 attr fuse-overlayfs util-linux skopeo umoci strace e2fsprogs"
