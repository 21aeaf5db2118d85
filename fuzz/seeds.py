#!/usr/bin/env python3
"""Writes the hand-made seed inputs of the fuzz corpora into fuzz/corpus/<target>/seed-*.

The input formats are documented on each body in src/fuzzing.rs. Seeds are small,
meaningful inputs (podman option strings, real OCI and docker-archive layouts, tar layers in
every header dialect, gzip streams long enough to have checkpoints, whiteout dialects) that
the fuzzer then mutates. Run from the repository root; it only adds or replaces seed-* files.
(Seeds for layer_index_file are encoded indexes, written by the regression test helper
`cargo run --example fuzz_index_seeds`.)"""
import gzip, hashlib, io, json, os, tarfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def put(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


def sha(b):
    return hashlib.sha256(b).hexdigest()


HEX = sha(b"x")

# options: -o strings (NUL separates arguments), layer lists, image sources, platforms, argv.
opts = {
    "podman": "lowerdir=/var/lib/containers/storage/overlay/l/ABC:/var/lib/containers/storage/overlay/l/DEF,"
    "upperdir=/var/lib/containers/storage/overlay/x/diff,workdir=/var/lib/containers/storage/overlay/x/work,nodev",
    "podman-context": 'lowerdir=/l1:/l2,upperdir=/u,workdir=/w,context="system_u:object_r:container_file_t:s0:c1,c2"',
    "rootless": "lowerdir=/l,upperdir=/u,workdir=/w,uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1:1:100000:65536",
    "squash": "lowerdir=/l,squash_to_uid=1000,squash_to_gid=1000,static_nlink,noacl",
    "flags": "ro,noatime,fsync=0,xino=off,noxattrs=1,max_write=131072,allow_other,default_permissions",
    "escapes": "lowerdir=a\\:b:c\\,d:e\\\\f,upperdir=\"/x,y\"",
    "two-args": "lowerdir=/a\0upperdir=/u,workdir=/w,volatile",
    "fstab": "defaults,nofail,x-systemd.automount,_netdev,relatime,lowerdir=/a",
    "image-oci": "oci:/images/app:latest",
    "image-docker": "docker-archive:app.tar:docker.io/library/busybox:latest",
    "image-digest": "oci-archive:img\\:1.tar@sha256:" + HEX,
    "platform": "linux/arm64/v8",
    "cli-layers": "--layers\0top:mid:base\0/tmp",
    "cli-o": "-o\0lowerdir=/a,upperdir=/u,workdir=/w\0-f\0/tmp",
    "cli-image": "--image\0oci:/x:latest\0--platform\0linux/amd64\0--store\0/s\0/tmp",
    "cli-mount8": "unionmount\0/tmp\0-o\0rw,lowerdir=/a,upperdir=/u,workdir=/w",
}
for k, v in opts.items():
    put("options", k, v)

# digest
put("digest", "ok", "sha256:" + HEX)
put("digest", "upper", "sha256:" + HEX.upper())
put("digest", "sha512", "sha512:" + HEX + HEX)
put("digest", "short", "sha256:" + HEX[:63])
put("digest", "hex", HEX)
put("digest", "raw", hashlib.sha256(b"y").digest())


def tar_bytes(members, fmt=tarfile.GNU_FORMAT):
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=fmt) as t:
        for m in members:
            kind, name = m[0], m[1]
            ti = tarfile.TarInfo(name)
            ti.mtime = 1700000000
            data = None
            if kind == "f":
                data = m[2]
                ti.size = len(data)
                ti.mode = 0o644
            elif kind == "d":
                ti.type = tarfile.DIRTYPE
                ti.mode = 0o755
            elif kind == "l":
                ti.type = tarfile.SYMTYPE
                ti.linkname = m[2]
            elif kind == "h":
                ti.type = tarfile.LNKTYPE
                ti.linkname = m[2]
            elif kind == "c":
                ti.type = tarfile.CHRTYPE
                ti.devmajor, ti.devminor = m[2]
            elif kind == "p":
                ti.type = tarfile.FIFOTYPE
            if len(m) > 3:
                ti.pax_headers = m[3]
            t.addfile(ti, io.BytesIO(data) if data is not None else None)
    return bio.getvalue()


layer_members = [
    ("d", "etc"),
    ("f", "etc/hostname", b"box\n"),
    ("f", "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    ("l", "etc/localtime", "/usr/share/zoneinfo/UTC"),
    ("h", "etc/hostname2", "etc/hostname"),
    ("d", "usr/bin"),
    ("f", "usr/bin/tool", b"\x7fELF" + bytes(range(256))),
    ("f", "usr/.wh.old", b""),
    ("f", "var/.wh..wh..opq", b""),
    ("c", "dev/null", (1, 3)),
    ("p", "run/fifo"),
]
plain = tar_bytes(layer_members)
pax = tar_bytes(
    [
        ("f", "a/" + "long-name-" * 20, b"long", {"mtime": "1700000000.5", "SCHILY.xattr.user.k": "v"}),
        ("d", "opaque/"),
        ("f", "opaque/.wh..wh..opq", b""),
        ("f", "x/.wh.y", b""),
        ("h", "hl", "a/" + "long-name-" * 20),
    ],
    tarfile.PAX_FORMAT,
)
gnu_long = tar_bytes([("f", "g/" + "n" * 150, b"gnu long name"), ("l", "g/" + "s" * 120, "t" * 120)])
ustar = tar_bytes([("d", "./"), ("f", "./file", b"ustar"), ("f", "/abs/path", b"abs")], tarfile.USTAR_FORMAT)
for name, t in [("plain", plain), ("pax", pax), ("gnu-long", gnu_long), ("ustar", ustar)]:
    put("tar_index", name, b"\x00" + t)
    put("tar_index", name + "-gzip", bytes([1 | (6 << 2)]) + t)
put("tar_index", "plain-zstd", b"\x02" + plain)
put("tar_index", "raw-gzip", b"\x03" + gzip.compress(plain, mtime=0))
put("tar_index", "small-limits", b"\x80" + pax)
put("tar_index", "dup-and-hardlink", b"\x00" + tar_bytes([
    ("f", "a", b"1"), ("d", "a"), ("f", "a/b", b"2"), ("f", "a", b"3"), ("h", "c", "a"),
    ("f", ".wh.a", b""), ("l", "s", "a"), ("f", "s/x", b"through symlink"),
]))

# manifest: [mode] part0 \n--\n part1 ...
SEP = b"\n--\n"
layer_gz = gzip.compress(plain, mtime=0)
diff = "sha256:" + sha(plain)
oci_index = json.dumps({"schemaVersion": 2, "manifests": [{
    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "{d1}", "size": 0,
    "annotations": {"org.opencontainers.image.ref.name": "latest"}}]}).replace('"size": 0', '"size": {s1}')
oci_manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": "{d2}", "size": 0},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": "{d3}", "size": 1}]}
).replace('"size": 0', '"size": {s2}').replace('"size": 1', '"size": {s3}')
config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": [diff]}})
oci = SEP.join([oci_index.encode(), oci_manifest.encode(), config.encode(), layer_gz])
put("manifest", "oci-dir", b"\x00" + oci)
put("manifest", "oci-archive-tag", b"\x05" + oci)
put("manifest", "oci-digest", b"\x08" + oci)
# nested: index.json -> image index (platforms) -> manifest
nested_top = oci_index.replace("manifest.v1", "index.v1")
nested_ix = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
    {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": "{d2}", "size": 0,
     "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
    {"mediaType": "application/vnd.docker.distribution.manifest.v2+json", "digest": "{d2}", "size": 0,
     "platform": {"os": "linux", "architecture": "amd64"}}]}).replace('"size": 0', '"size": {s2}')
nested_manifest = oci_manifest.replace("{d2}", "{d3}").replace("{s2}", "{s3}").replace("{d3}\", \"size\": {s3}}]", "{d4}\", \"size\": {s4}}]")
put("manifest", "oci-nested", b"\x00" + SEP.join([nested_top.encode(), nested_ix.encode(), nested_manifest.encode(), config.encode(), layer_gz]))
docker = json.dumps([{"Config": "{h1}.json", "RepoTags": ["busybox:latest"], "Layers": ["2/layer.tar"]}])
put("manifest", "docker-legacy", b"\x0e" + SEP.join([docker.encode(), config.encode(), plain]))
docker25 = json.dumps([{"Config": "blobs/sha256/{h1}", "RepoTags": ["example/app:v1"], "Layers": ["blobs/sha256/{h2}"]}])
put("manifest", "docker-oci", b"\x02" + SEP.join([docker25.encode(), config.encode(), layer_gz]))

# gzip_checkpoints: [mode, param, data]
text = b"".join(b"line %d of a file in a layer\n" % i for i in range(200))
put("gzip_checkpoints", "text-1m", bytes([5 << 1, 6]) + text)
put("gzip_checkpoints", "text-3m-two-members", bytes([13 << 1, 0x19]) + text)
put("gzip_checkpoints", "binary-stored", bytes([6 << 1, 0]) + bytes(range(256)) * 3)
put("gzip_checkpoints", "small", bytes([0, 1]) + b"hello")
put("gzip_checkpoints", "raw", bytes([1, 0]) + gzip.compress(text, mtime=0))
put("gzip_checkpoints", "raw-multi-trailing", bytes([1, 0]) + gzip.compress(b"a" * 100) + gzip.compress(b"b") + b"junk")
put("gzip_checkpoints", "raw-bomb", bytes([1, 0]) + gzip.compress(b"\0" * (3 << 20), 9, mtime=0))

# whiteout: [marks, writer, (type name)/...]
def wh(marks, writer, entries):
    return bytes([marks, writer]) + b"/".join(bytes([t]) + n for t, n in entries)

put("whiteout", "chardev", wh(0, 3, [(3, b"gone"), (4, b"null"), (0, b"empty"), (1, b"data")]))
put("whiteout", "oci", wh(0, 0, [(0, b".wh.gone"), (0, b".wh..wh..opq"), (2, b"dir"), (8, b"link"), (9, b"fifo")]))
put("whiteout", "xattr-dialect", wh(2 | (2 << 2), 6, [(5, b"w1"), (6, b"w2"), (7, b"notempty"), (0, b"plain")]))
put("whiteout", "opaque-y", wh(1, 7, [(6, b"w"), (3, b"c")]))
put("whiteout", "user-opaque", wh(1 << 2 | 3 << 4, 2, [(0, b".wh..opq"), (0, b".wh.")]))
