#!/usr/bin/env bash
# The main job, end to end: install what is needed, build and install unionmount, mount the
# small example image shipped in examples/small-image (three layers, with whiteouts and an
# opaque directory) with a writable upper, show what is inside, change something, show where
# the change went; then pack the same layers as an OCI image, mount that image straight from
# its layout, and commit the changes as a new image that mounts to what the container saw.
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

echo; echo "== the same layers as an OCI image (gzip layers, built here with tar and gzip) =="
oci=$tmp/oci
mkdir -p "$oci/blobs/sha256"
blob() { # file -> moves it into the layout, prints its digest hex
  local h; h=$(sha256sum "$1" | cut -d' ' -f1); mv "$1" "$oci/blobs/sha256/$h"; echo "$h"
}
diff_ids=""; descs=""
for l in $(grep -v '^#' "$img/LAYERS" | tr ':' '\n' | tac); do
  tar --numeric-owner --xattrs -C "$img/$l" -cf "$tmp/$l.tar" .
  diff_ids="$diff_ids${diff_ids:+,}\"sha256:$(sha256sum "$tmp/$l.tar" | cut -d' ' -f1)\""
  gzip -n "$tmp/$l.tar"
  size=$(stat -c %s "$tmp/$l.tar.gz")
  descs="$descs${descs:+,}{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$(blob "$tmp/$l.tar.gz")\",\"size\":$size}"
done
printf '{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[%s]}}' "$diff_ids" > "$tmp/config"
csize=$(stat -c %s "$tmp/config"); cfg=$(blob "$tmp/config")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' "$cfg" "$csize" "$descs" > "$tmp/manifest"
msize=$(stat -c %s "$tmp/manifest"); man=$(blob "$tmp/manifest")
echo '{"imageLayoutVersion":"1.0.0"}' > "$oci/oci-layout"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"small"}}]}' "$man" "$msize" > "$oci/index.json"

umount "$mnt"
store=$tmp/store
echo "+ unionmount --image oci:$oci:small --store $store $mnt"
unionmount --image "oci:$oci:small" --store "$store" "$mnt"
echo "the image's tree, first entries:"; (cd "$mnt" && find . -mindepth 1 | sort) | head -5; echo "  ..."
cat "$mnt/etc/os-release"
umount "$mnt"

echo; echo "== commit the changes made above as a new image =="
unionmount image import "oci:$oci:small" --store "$store" --name small
unionmount image commit --store "$store" --from small --upper "$tmp/upper" --name small-edited
unionmount image ls --store "$store"
unionmount --image small-edited --store "$store" "$mnt"
echo "in small-edited: etc/os-release ends with: $(tail -1 "$mnt/etc/os-release"); bin/hello: $(ls "$mnt/bin/hello" 2>&1 | sed 's/.*: //')"
cat "$mnt/app/new.txt"
