//! Mounting container images for real (issue 4): `unionmount --image SOURCE` over images
//! generated here with the `tar` crate (plus flate2 and zstd), checked against kernel
//! overlayfs and against what the store must (and must not) hold afterwards.
//!
//! The oracle for the merged tree: each layer tar is extracted with GNU tar
//! (`--xattrs --xattrs-include=* --numeric-owner -xpf`) into its own directory, the OCI
//! whiteouts are turned into the kernel's dialect (`.wh.NAME` → char device 0/0 `NAME`,
//! `.wh..wh..opq` → `trusted.overlay.opaque=y`, directory times restored), and kernel
//! overlayfs mounts them read-only; the unionmount mount of every source form must show
//! exactly the same tree (`tree::diff` empty, file contents included).
//!
//! Invariants of this file:
//! - Every mount is held by a `MountGuard` made before the mount command runs, so it is
//!   unmounted on every path, panics included; every access through a mount runs under a
//!   timeout.
//! - Nothing here needs the network; every input is generated inside the test.

mod common;
#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};
use unionmount::image::blob::sha256_of;
use unionmount::image::{ImageSource, Platform};
use unionmount::store::{Digest, Store};

use common::{
    BODY_SECS, Driver, Fixture, MountGuard, assert_success, assert_work_clean, get_xattr,
    is_mounted, list_xattrs, lstat, makedev, mount_allowed, mount_paths, run_prog_within,
    set_times, set_xattr, text, unionmount_bin, with_timeout,
};
use tree::View;

// ---------------------------------------------------------------------------------------
// Layer contents
// ---------------------------------------------------------------------------------------

/// Base of every mtime in the generated layers; `diff` compares mtimes in `TIME_WINDOW`.
const T0: u64 = 1_600_000_000;
const TIME_WINDOW: (i64, i64) = (1_500_000_000, 1_700_000_000);

/// A valid `security.capability` value: VFS_CAP_REVISION_2 with the effective flag
/// (magic 0x02000001, little endian), permitted = CAP_NET_BIND_SERVICE (bit 10).
const CAP_V2: [u8; 20] = [
    0x01, 0x00, 0x00, 0x02, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00,
];

#[derive(Clone)]
enum Body {
    Dir,
    File(Vec<u8>),
    Symlink(String),
    HardLink(String),
    Fifo,
    Char(u32, u32),
}

/// One tar entry.
#[derive(Clone)]
struct Ent {
    path: String,
    body: Body,
    mode: u32,
    uid: u64,
    gid: u64,
    /// Seconds and nanoseconds; nanoseconds other than 0 go into a PAX `mtime` record.
    mtime: (u64, u32),
    xattrs: Vec<(String, Vec<u8>)>,
    /// Write the path as a PAX `path` record (the header's own name is cut short).
    pax_path: bool,
}

fn ent(path: &str, body: Body, mode: u32) -> Ent {
    Ent {
        path: path.to_string(),
        body,
        mode,
        uid: 0,
        gid: 0,
        mtime: (T0, 0),
        xattrs: Vec::new(),
        pax_path: false,
    }
}

fn dir(path: &str, mode: u32) -> Ent {
    ent(path, Body::Dir, mode)
}

fn file(path: &str, mode: u32, data: &[u8]) -> Ent {
    ent(path, Body::File(data.to_vec()), mode)
}

impl Ent {
    fn owner(mut self, uid: u64, gid: u64) -> Ent {
        (self.uid, self.gid) = (uid, gid);
        self
    }
    fn at(mut self, secs: u64, nanos: u32) -> Ent {
        self.mtime = (secs, nanos);
        self
    }
    fn xattr(mut self, name: &str, value: &[u8]) -> Ent {
        self.xattrs.push((name.to_string(), value.to_vec()));
        self
    }
    fn pax_path(mut self) -> Ent {
        self.pax_path = true;
        self
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    // "LEN KEY=VALUE\n" where LEN counts the whole record, its own digits included.
    let body = key.len() + value.len() + 3;
    let mut len = body + 1;
    while len != body + len.to_string().len() {
        len = body + len.to_string().len();
    }
    let mut r = format!("{len} {key}=").into_bytes();
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

/// The layer tar of `entries`, in order.
fn layer_tar(entries: &[Ent]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut pax = Vec::new();
        if e.mtime.1 != 0 {
            pax.extend(pax_record(
                "mtime",
                format!("{}.{:09}", e.mtime.0, e.mtime.1).as_bytes(),
            ));
        }
        for (k, v) in &e.xattrs {
            pax.extend(pax_record(&format!("SCHILY.xattr.{k}"), v));
        }
        if e.pax_path {
            pax.extend(pax_record("path", e.path.as_bytes()));
        }
        if !pax.is_empty() {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_size(pax.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "PaxHeaders/entry", pax.as_slice())
                .unwrap();
        }
        let mut h = if e.pax_path {
            tar::Header::new_ustar()
        } else {
            tar::Header::new_gnu()
        };
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime.0);
        h.set_size(0);
        let data: &[u8] = match &e.body {
            Body::File(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(d.len() as u64);
                d
            }
            Body::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                &[]
            }
            Body::Fifo => {
                h.set_entry_type(tar::EntryType::Fifo);
                &[]
            }
            Body::Char(ma, mi) => {
                h.set_entry_type(tar::EntryType::Char);
                h.set_device_major(*ma).unwrap();
                h.set_device_minor(*mi).unwrap();
                &[]
            }
            Body::Symlink(t) | Body::HardLink(t) => {
                h.set_entry_type(if matches!(e.body, Body::Symlink(_)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                b.append_link(&mut h, &e.path, t).unwrap();
                continue;
            }
        };
        if e.pax_path {
            // The header keeps only a stand-in name: a reader that ignores the PAX
            // `path` record extracts the wrong name and the comparison fails.
            let name = &mut h.as_old_mut().name;
            name.fill(0);
            let cut = &e.path.as_bytes()[..60];
            name[..cut.len()].copy_from_slice(cut);
            h.set_cksum();
            b.append(&h, data).unwrap();
        } else {
            b.append_data(&mut h, &e.path, data).unwrap();
        }
    }
    b.into_inner().unwrap()
}

/// Deterministic pseudo-random bytes (xorshift64*), so gzip and zstd cannot shrink them.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";
const HOSTS_BASE: &[u8] = b"127.0.0.1 localhost\n";
const HOSTS_MID: &[u8] = b"127.0.0.1 localhost\n10.0.0.7 db\n";
const APP_CONF: &[u8] = b"greeting=hello from the top layer\nlevel=3\n";
const APP_RUN: &[u8] = b"#!/bin/sh\necho app\n";
const SU: &[u8] = b"#!/bin/sh\n# su stand-in\n";
const PING: &[u8] = b"#!/bin/sh\n# ping stand-in\n";

fn long_dir() -> String {
    format!("deep/{}", "d".repeat(60))
}
/// 136 bytes: stored with a GNU long-name entry.
fn gnu_long_path() -> String {
    format!("{}/{}", long_dir(), "g".repeat(70))
}
/// 150 bytes: stored as a PAX `path` record.
fn pax_long_path() -> String {
    format!("{}/{}.txt", long_dir(), "p".repeat(80))
}

fn big_data() -> Vec<u8> {
    noise(3 << 20, 0x5eed)
}

/// Base layer: every kind of entry, owners, modes, xattrs, sub-second times, long names.
fn base_entries() -> Vec<Ent> {
    vec![
        dir(".", 0o755).at(T0 + 1, 0),
        dir("etc", 0o755).at(T0 + 2, 250_000_000),
        file("etc/passwd", 0o644, PASSWD).at(T0 + 3, 1),
        file("etc/hosts", 0o644, HOSTS_BASE),
        file("etc/motd", 0o644, b"welcome\n"),
        dir("bin", 0o755),
        file("bin/su", 0o4755, SU).at(T0 + 4, 999_999_999),
        file("bin/ping", 0o755, PING)
            .xattr("security.capability", &CAP_V2)
            .xattr("user.x", b"ping")
            .at(T0 + 5, 123_456_789),
        ent("bin/sh", Body::Symlink("su".into()), 0o777).owner(7, 8),
        dir("data", 0o750).owner(1000, 1001).at(T0 + 6, 5),
        file("data/big.bin", 0o640, &big_data())
            .owner(1000, 1001)
            .xattr("user.x", b"big")
            .at(T0 + 7, 500_000_000),
        file("data/empty", 0o600, b"").owner(1000, 1001),
        file("data/link-a", 0o644, b"shared bytes\n").owner(33, 44),
        ent("data/link-b", Body::HardLink("data/link-a".into()), 0o644).owner(33, 44),
        dir("dev", 0o755),
        ent("dev/fifo", Body::Fifo, 0o620).owner(5, 6),
        ent("dev/null", Body::Char(1, 3), 0o666),
        dir("old", 0o755).owner(2000, 2000),
        file("old/a", 0o644, b"old a\n"),
        dir("old/sub", 0o755),
        file("old/sub/b", 0o644, b"old b\n"),
        dir("var", 0o755),
        dir("var/cache", 0o755),
        file("var/cache/stale", 0o644, b"stale\n"),
        dir("var/cache/sub", 0o755),
        file("var/cache/sub/stale2", 0o644, b"stale 2\n"),
        dir("deep", 0o755),
        dir(&long_dir(), 0o755),
        file(&gnu_long_path(), 0o644, b"gnu long name\n").owner(1, 2),
        file(&pax_long_path(), 0o644, b"pax long name\n")
            .pax_path()
            .at(T0 + 8, 42),
        ent(
            "deep/longlink",
            Body::Symlink(format!("/opt/{}", "t".repeat(120))),
            0o777,
        ),
    ]
}

/// Middle layer: an override, a file and a directory whited out, an opaque directory.
fn mid_entries() -> Vec<Ent> {
    vec![
        dir(".", 0o755).at(T0 + 101, 0),
        dir("etc", 0o755).at(T0 + 102, 7),
        file("etc/hosts", 0o600, HOSTS_MID)
            .owner(10, 20)
            .at(T0 + 103, 0),
        file("etc/.wh.motd", 0o644, b""),
        file(".wh.old", 0o644, b""),
        dir("var", 0o755),
        dir("var/cache", 0o700).at(T0 + 104, 0),
        file("var/cache/.wh..wh..opq", 0o644, b""),
        file("var/cache/fresh", 0o644, b"fresh cache\n"),
    ]
}

/// Top layer: a small app.
fn top_entries() -> Vec<Ent> {
    vec![
        dir(".", 0o755).at(T0 + 201, 0),
        dir("app", 0o755),
        dir("app/bin", 0o755),
        file("app/bin/run", 0o755, APP_RUN).owner(1000, 1000),
        dir("app/etc", 0o755),
        file("app/etc/app.conf", 0o644, APP_CONF).at(T0 + 202, 314_159_265),
    ]
}

// ---------------------------------------------------------------------------------------
// Images and their source forms
// ---------------------------------------------------------------------------------------

const MT_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const MT_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MT_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const MT_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MT_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const MT_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const TAG: &str = "v1";

struct Layer {
    /// The uncompressed tar (its sha256 is the DiffID).
    tar: Vec<u8>,
    /// The blob as stored (compressed or not).
    blob: Vec<u8>,
    media: &'static str,
}

impl Layer {
    fn new(entries: &[Ent], media: &'static str) -> Layer {
        let tar = layer_tar(entries);
        let blob = match media {
            MT_GZIP => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                e.write_all(&tar).unwrap();
                e.finish().unwrap()
            }
            MT_ZSTD => zstd::encode_all(tar.as_slice(), 3).unwrap(),
            _ => tar.clone(),
        };
        Layer { tar, blob, media }
    }
    fn digest(&self) -> Digest {
        sha256_of(&self.blob)
    }
    fn diff_id(&self) -> Digest {
        sha256_of(&self.tar)
    }
}

/// Base first (image order).
struct Image {
    layers: Vec<Layer>,
}

/// The three-layer image: base gzip, middle zstd, top uncompressed.
fn test_image() -> Image {
    Image {
        layers: vec![
            Layer::new(&base_entries(), MT_GZIP),
            Layer::new(&mid_entries(), MT_ZSTD),
            Layer::new(&top_entries(), MT_TAR),
        ],
    }
}

/// The same layer contents, all uncompressed (what a legacy `docker save` holds).
fn test_image_plain() -> Image {
    Image {
        layers: vec![
            Layer::new(&base_entries(), MT_TAR),
            Layer::new(&mid_entries(), MT_TAR),
            Layer::new(&top_entries(), MT_TAR),
        ],
    }
}

fn config_json(arch: &str, diff_ids: &[Digest]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(Digest::to_string).collect();
    serde_json::to_vec(&json!({
        "architecture": arch,
        "os": "linux",
        "config": {"Cmd": ["/app/bin/run"]},
        "rootfs": {"type": "layers", "diff_ids": ids},
    }))
    .unwrap()
}

fn desc(media: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media, "digest": sha256_of(bytes).to_string(), "size": bytes.len()})
}

/// An OCI image layout under construction.
#[derive(Default)]
struct Layout {
    blobs: BTreeMap<Digest, Vec<u8>>,
    index: Vec<Value>,
}

impl Layout {
    fn add(&mut self, bytes: &[u8]) {
        self.blobs.insert(sha256_of(bytes), bytes.to_vec());
    }

    /// Adds `img`'s blobs, a config (with `diff_ids`, default the true ones) and a manifest;
    /// returns the manifest bytes.
    fn add_image(&mut self, img: &Image, arch: &str, diff_ids: Option<Vec<Digest>>) -> Vec<u8> {
        let ids = diff_ids.unwrap_or_else(|| img.layers.iter().map(Layer::diff_id).collect());
        let config = config_json(arch, &ids);
        self.add(&config);
        let layers: Vec<Value> = img
            .layers
            .iter()
            .map(|l| {
                self.add(&l.blob);
                desc(l.media, &l.blob)
            })
            .collect();
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": desc(MT_CONFIG, &config),
            "layers": layers,
        }))
        .unwrap();
        self.add(&m);
        m
    }

    fn tag(&mut self, media: &str, bytes: &[u8], name: &str) {
        let mut d = desc(media, bytes);
        d["annotations"] = json!({"org.opencontainers.image.ref.name": name});
        self.index.push(d);
    }

    fn files(&self) -> Vec<(String, Vec<u8>)> {
        let mut out = vec![
            (
                "oci-layout".to_string(),
                br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec(),
            ),
            (
                "index.json".to_string(),
                serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": self.index})).unwrap(),
            ),
        ];
        for (d, b) in &self.blobs {
            out.push((format!("blobs/sha256/{}", d.hex()), b.clone()));
        }
        out
    }

    fn write_dir(&self, dir: &Path) {
        for (name, bytes) in self.files() {
            let p = dir.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, bytes).unwrap();
        }
    }
}

/// A tar holding regular files (an oci-archive or a docker-archive).
fn write_archive(path: &Path, files: &[(String, Vec<u8>)]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
}

/// `img` as an OCI layout in `dir`, tagged `TAG`.
fn write_oci(img: &Image, dir: &Path) -> Layout {
    let mut l = Layout::default();
    let m = l.add_image(img, &Platform::host().architecture, None);
    l.tag(MT_MANIFEST, &m, TAG);
    l.write_dir(dir);
    l
}

/// A legacy `docker save` tarball: `manifest.json`, `<hex>.json`, `lN/layer.tar`.
fn write_docker_archive(img: &Image, path: &Path) {
    let ids: Vec<Digest> = img.layers.iter().map(Layer::diff_id).collect();
    let config = config_json(&Platform::host().architecture, &ids);
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let names: Vec<String> = (0..img.layers.len())
        .map(|i| format!("l{i}/layer.tar"))
        .collect();
    let manifest = json!([{"Config": cfg_name, "RepoTags": ["imgtest:v1"], "Layers": names}]);
    let mut files: Vec<(String, Vec<u8>)> = img
        .layers
        .iter()
        .zip(&names)
        .map(|(l, n)| (n.clone(), l.blob.clone()))
        .collect();
    files.push((cfg_name, config));
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&manifest).unwrap(),
    ));
    write_archive(path, &files);
}

// ---------------------------------------------------------------------------------------
// The kernel oracle
// ---------------------------------------------------------------------------------------

/// Extracts every layer of `img` under `root` in the kernel's whiteout dialect; returns
/// the layer directories TOP first (overlayfs order).
fn oracle_layers(img: &Image, root: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for (i, l) in img.layers.iter().enumerate() {
        let d = root.join(format!("oracle-layer{i}"));
        fs::create_dir_all(&d).unwrap();
        let t = root.join(format!("oracle-layer{i}.tar"));
        fs::write(&t, &l.tar).unwrap();
        let out = run_prog_within(
            60,
            "tar",
            vec![
                "--xattrs".into(),
                "--xattrs-include=*".into(),
                "--numeric-owner".into(),
                "-xpf".into(),
                t.clone().into(),
                "-C".into(),
                d.clone().into(),
            ],
        );
        assert_success(&out, "tar -x of a layer (the oracle)");
        to_kernel_dialect(&d);
        dirs.push(d);
    }
    dirs.reverse();
    dirs
}

/// `.wh.NAME` → char device 0/0 `NAME`; `.wh..wh..opq` → `trusted.overlay.opaque=y`;
/// every directory keeps the times tar gave it.
fn to_kernel_dialect(layer: &Path) {
    fn walk(d: &Path, dirs: &mut Vec<PathBuf>, markers: &mut Vec<PathBuf>) {
        dirs.push(d.to_path_buf());
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            let m = lstat(&p).unwrap();
            if m.is_dir() {
                walk(&p, dirs, markers);
            } else if p.file_name().unwrap().to_string_lossy().starts_with(".wh.") {
                markers.push(p);
            }
        }
    }
    let (mut dirs, mut markers) = (Vec::new(), Vec::new());
    walk(layer, &mut dirs, &mut markers);
    let times: Vec<(PathBuf, fs::Metadata)> = dirs
        .into_iter()
        .map(|d| {
            let m = lstat(&d).unwrap();
            (d, m)
        })
        .collect();
    for m in markers {
        let name = m.file_name().unwrap().to_string_lossy().into_owned();
        fs::remove_file(&m).unwrap();
        if name == ".wh..wh..opq" {
            set_xattr(m.parent().unwrap(), "trusted.overlay.opaque", b"y").unwrap();
        } else {
            let target = m.with_file_name(&name[4..]);
            common::mknod(&target, libc::S_IFCHR, 0).unwrap();
        }
    }
    for (d, m) in times {
        set_times(&d, (m.atime(), m.atime_nsec()), (m.mtime(), m.mtime_nsec())).unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// Running unionmount and looking through mounts
// ---------------------------------------------------------------------------------------

fn os_args(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    args.iter().map(|a| a.as_ref().to_os_string()).collect()
}

/// Runs `unionmount --image SPEC --store STORE EXTRA.. MNT` (the command returns once the
/// mount is live or has failed).
fn run_image_mount(spec: &str, store: &Path, extra: &[&str], mnt: &Path) -> Output {
    let mut args = os_args(&[&"--image", &spec, &"--store", &store]);
    args.extend(extra.iter().map(OsString::from));
    args.push(mnt.into());
    run_prog_within(120, unionmount_bin(), args)
}

/// The test image as an OCI layout in the fixture, imported into a store there (tagged
/// `TAG`): the image, the store's path and the store.
fn imported_test_image(fx: &Fixture) -> (Image, PathBuf, Store) {
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    write_oci(&img, &layout_dir);
    let store = fx.dir.join("store");
    let spec = format!("oci:{}:{TAG}", layout_dir.display());
    let st = Store::open_or_create(&store).unwrap();
    st.import(&ImageSource::parse(&spec).unwrap(), None)
        .unwrap();
    (img, store, st)
}

/// Mounts image `spec` on `mnt`; the guard unmounts it on every path.
fn mount_image(spec: &str, store: &Path, extra: &[&str], mnt: &Path) -> MountGuard {
    fs::create_dir_all(mnt).unwrap();
    let guard = MountGuard::adopt(mnt);
    let out = run_image_mount(spec, store, extra, mnt);
    assert_success(&out, &format!("unionmount --image {spec}"));
    assert!(
        is_mounted(mnt),
        "{} is not mounted after success",
        mnt.display()
    );
    guard
}

fn snap(root: &Path) -> tree::Snapshot {
    let r = root.to_path_buf();
    with_timeout(BODY_SECS, move || tree::snapshot(&r, View::Merged))
        .unwrap_or_else(|e| panic!("snapshot of {}: {e}", root.display()))
}

fn read_within(p: &Path) -> io::Result<Vec<u8>> {
    let p = p.to_path_buf();
    with_timeout(BODY_SECS, move || fs::read(p))
}

/// Every path under `root` (readdir of every directory plus lstat of every entry).
fn walk_all(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) -> io::Result<()> {
        for e in fs::read_dir(root.join(rel))? {
            let r = rel.join(e?.file_name());
            let m = fs::symlink_metadata(root.join(&r))?;
            out.push(r.display().to_string());
            if m.is_dir() {
                walk(root, &r, out)?;
            }
        }
        Ok(())
    }
    let r = root.to_path_buf();
    let mut v = with_timeout(BODY_SECS, move || {
        let mut out = Vec::new();
        walk(&r, Path::new(""), &mut out).map(|_| out)
    })
    .unwrap_or_else(|e| panic!("walking {}: {e}", root.display()));
    v.sort();
    v
}

/// Lines of the daemon log that mention `needle`.
fn log_lines_with(log: &Path, needle: &str) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Every file and directory of a store outside `tmp/`, with a content hash for files.
fn store_listing(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let m = lstat(&p).unwrap();
            if m.is_dir() {
                out.insert(format!("{rel}/"), String::new());
                if rel != "tmp" {
                    walk(root, &p, out);
                }
            } else if rel != "lock" {
                let data = fs::read(&p).unwrap();
                out.insert(
                    rel,
                    format!("{} bytes #{:016x}", data.len(), tree::fnv64(&data)),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn assert_no_diff(oracle: &tree::Snapshot, got: &tree::Snapshot, name: &str) {
    let d = tree::diff(oracle, got, "kernel", name, TIME_WINDOW);
    assert!(
        d.is_empty(),
        "{name} differs from kernel overlayfs over the extracted layers:\n{}",
        d.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// 1. Every source form shows the kernel's tree
// ---------------------------------------------------------------------------------------

/// The image as an OCI layout (gzip/zstd/plain layers), as an oci-archive, and as a legacy
/// docker-archive (plain layers) mounts to exactly the tree kernel overlayfs shows over the
/// layers extracted by GNU tar: names, types, modes (setuid), owners, sizes, contents,
/// symlink targets, device numbers, xattrs (security.capability included), sub-second
/// mtimes, long names, whiteouts and opacity. Hard links share st_ino.
#[test]
fn every_source_form_matches_kernel_overlayfs() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    let layout = write_oci(&img, &layout_dir);
    let oci_archive = fx.dir.join("image-oci.tar");
    write_archive(&oci_archive, &layout.files());
    let docker_archive = fx.dir.join("image-docker.tar");
    write_docker_archive(&test_image_plain(), &docker_archive);

    let kmnt = fx.dir.join("kernel-mnt");
    fs::create_dir(&kmnt).unwrap();
    let lowers = oracle_layers(&img, &fx.dir);
    let kernel = mount_paths(&Driver::Kernel, &lowers, None, None, &kmnt, &[])
        .expect("kernel overlayfs over the extracted layers");
    let oracle = snap(&kmnt);
    kernel.unmount().unwrap();

    // The oracle itself saw what the layers hold (else an empty diff would prove little).
    let e = &oracle.entries;
    assert_eq!(e["bin/ping"].xattrs["security.capability"], CAP_V2.to_vec());
    assert_eq!(e["bin/su"].mode, 0o4755);
    assert_eq!(e["etc/hosts"].mode, 0o600);
    assert!(!e.contains_key("etc/motd") && !e.contains_key("old"));
    assert!(!e.contains_key("var/cache/stale") && e.contains_key("var/cache/fresh"));
    assert!(e.contains_key(&pax_long_path()) && e.contains_key(&gnu_long_path()));
    assert_eq!(e["data/big.bin"].mtime, (T0 as i64 + 7, 500_000_000));

    let sources = [
        ("oci", format!("oci:{}:{TAG}", layout_dir.display())),
        (
            "oci-archive",
            format!("oci-archive:{}", oci_archive.display()),
        ),
        (
            "docker-archive",
            format!("docker-archive:{}", docker_archive.display()),
        ),
    ];
    for (name, spec) in sources {
        let store = fx.dir.join(format!("store-{name}"));
        let mnt = fx.dir.join(format!("mnt-{name}"));
        let guard = mount_image(&spec, &store, &[], &mnt);
        // The root is a directory like any other: its xattrs list (none here) and a
        // missing one is ENODATA.
        let root = mnt.clone();
        let (list, one) = with_timeout(BODY_SECS, move || {
            (list_xattrs(&root), get_xattr(&root, "user.x"))
        });
        let list = list.unwrap_or_else(|e| panic!("{name}: listxattr of the mount root: {e}"));
        assert!(
            list.is_empty(),
            "{name}: xattrs of the mount root: {list:?}"
        );
        assert_eq!(
            one.map_err(|e| e.raw_os_error()),
            Err(Some(libc::ENODATA)),
            "{name}: getxattr user.x of the mount root"
        );
        let got = snap(&mnt);
        assert_no_diff(&oracle, &got, name);

        let a = lstat(mnt.join("data/link-a")).unwrap();
        let b = lstat(mnt.join("data/link-b")).unwrap();
        assert_eq!(a.ino(), b.ino(), "{name}: hard links share st_ino");
        assert_eq!((a.nlink(), b.nlink()), (2, 2), "{name}: hard link count");
        let other = lstat(mnt.join("data/empty")).unwrap();
        assert_ne!(
            a.ino(),
            other.ino(),
            "{name}: distinct files, distinct st_ino"
        );
        let null = lstat(mnt.join("dev/null")).unwrap();
        assert!(null.file_type().is_char_device(), "{name}: dev/null type");
        assert_eq!(null.rdev(), makedev(1, 3), "{name}: dev/null rdev");
        assert_eq!(null.mode() & 0o7777, 0o666, "{name}: dev/null mode");
        assert_eq!(
            read_within(&mnt.join("data/big.bin")).unwrap(),
            big_data(),
            "{name}: 3 MiB file"
        );
        guard.unmount().unwrap();
    }
}

// ---------------------------------------------------------------------------------------
// 2. Writable mount: copy-up from a gzip layer
// ---------------------------------------------------------------------------------------

/// With --upper/--work: an append to a file of the gzip layer and an O_TRUNC rewrite of
/// another show in the merged view, and the upper holds faithful copies (content, mode
/// with setuid, owner, xattrs; security.capability survives a metadata-only copy-up);
/// nothing but whiteouts is left in the workdir.
#[test]
fn writable_image_mount_copies_up_from_gzip_layer() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    write_oci(&img, &layout_dir);
    let store = fx.dir.join("store");
    let (upper, work) = (fx.upper.clone(), fx.work.clone());
    let spec = format!("oci:{}:{TAG}", layout_dir.display());
    let guard = mount_image(
        &spec,
        &store,
        &[
            "--upper",
            upper.to_str().unwrap(),
            "--work",
            work.to_str().unwrap(),
        ],
        &fx.mnt,
    );

    let m = fx.mnt.clone();
    with_timeout(BODY_SECS, move || {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(m.join("data/big.bin"))
            .unwrap();
        f.write_all(b"appended tail\n").unwrap();
        drop(f);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.join("bin/su"))
            .unwrap();
        f.write_all(b"replaced\n").unwrap();
        drop(f);
        // A metadata-only change: the copy-up must carry every xattr, file caps included.
        set_xattr(&m.join("bin/ping"), "user.added", b"1").unwrap();
    });

    let mut big = big_data();
    big.extend_from_slice(b"appended tail\n");
    assert_eq!(read_within(&fx.m("data/big.bin")).unwrap(), big);
    assert_eq!(read_within(&fx.m("bin/su")).unwrap(), b"replaced\n");
    assert_eq!(read_within(&fx.m("bin/ping")).unwrap(), PING);
    assert_eq!(
        get_xattr(&fx.m("bin/ping"), "security.capability")
            .unwrap_or_else(|e| panic!("bin/ping after copy-up: security.capability: {e}")),
        CAP_V2
    );
    guard.unmount().unwrap();

    // `Meta(len)`: a metadata-only copy (the bytes stay in the image layer).
    let check = |rel: &str, content: Up, mode: u32, owner: (u32, u32), xattrs: &[(&str, &[u8])]| {
        let p = upper.join(rel);
        let md = lstat(&p).unwrap_or_else(|e| panic!("upper {rel}: {e}"));
        assert!(md.is_file(), "upper {rel} is a regular file");
        match content {
            Up::Data(d) => {
                assert_eq!(fs::read(&p).unwrap(), d, "upper {rel}: content");
                assert_errno_of(get_xattr(&p, "trusted.overlay.metacopy"), libc::ENODATA);
            }
            Up::Meta(len) => assert_metacopy(&p, len),
        }
        assert_eq!(md.mode() & 0o7777, mode, "upper {rel}: mode");
        assert_eq!((md.uid(), md.gid()), owner, "upper {rel}: owner");
        let names: Vec<String> = list_xattrs(&p)
            .unwrap()
            .into_iter()
            .filter(|n| !n.starts_with("trusted.overlay.") && !n.starts_with("user.unionmount."))
            .collect();
        let want: Vec<String> = xattrs.iter().map(|(n, _)| n.to_string()).collect();
        assert_eq!(names, want, "upper {rel}: xattr names");
        for (n, v) in xattrs {
            assert_eq!(get_xattr(&p, n).unwrap(), *v, "upper {rel}: xattr {n}");
        }
    };
    check(
        "data/big.bin",
        Up::Data(&big),
        0o640,
        (1000, 1001),
        &[("user.x", b"big")],
    );
    // Root keeps setuid on its own write (the kernel clears it only for callers without
    // CAP_FSETID).
    check("bin/su", Up::Data(b"replaced\n"), 0o4755, (0, 0), &[]);
    check(
        "bin/ping",
        Up::Meta(PING.len() as u64),
        0o755,
        (0, 0),
        &[
            ("security.capability", &CAP_V2),
            ("user.added", b"1"),
            ("user.x", b"ping"),
        ],
    );
    let data = lstat(upper.join("data")).unwrap();
    assert_eq!(
        (data.mode() & 0o7777, data.uid(), data.gid()),
        (0o750, 1000, 1001),
        "copied-up parent directory keeps mode and owner"
    );
    assert_eq!(
        walkdir_plain(&upper),
        ["bin", "bin/ping", "bin/su", "data", "data/big.bin"],
        "the upper holds the changed files and their parents only"
    );
    assert_work_clean(&work);
}

/// What an upper file must hold: these bytes, or none yet (a metacopy of this size).
enum Up<'a> {
    Data(&'a [u8]),
    Meta(u64),
}

fn assert_errno_of<T: std::fmt::Debug>(r: io::Result<T>, errno: i32) {
    match r {
        Err(e) if e.raw_os_error() == Some(errno) => {}
        other => panic!("expected errno {errno}, got {other:?}"),
    }
}

/// `p` is a metadata-only copy in the kernel's format: `len` bytes long, none of them
/// stored, and the `trusted.overlay.metacopy` marker.
fn assert_metacopy(p: &Path, len: u64) {
    let md = lstat(p).unwrap_or_else(|e| panic!("upper {}: {e}", p.display()));
    assert_eq!(md.len(), len, "{}: size", p.display());
    assert!(common::stores_no_data(p), "{}: no data stored", p.display());
    assert_eq!(
        get_xattr(p, "trusted.overlay.metacopy")
            .unwrap_or_else(|e| panic!("{}: metacopy marker: {e}", p.display())),
        b""
    );
}

/// DESIGN 4: metadata changes (chmod, chown, utimes, setxattr) and an O_TRUNC rewrite of
/// image files fetch none of their bytes, with passthrough and without it (the writeback
/// cache sends O_TRUNC as a truncate after the open). objects/ never gains those files;
/// the upper holds metacopy files that read as the image's bytes, after a remount too; a
/// rename brings the bytes up (fetched and verified then), drops the marker and keeps
/// the file's times.
#[test]
fn image_metadata_changes_and_o_trunc_fetch_no_data() {
    if !mount_allowed() {
        return;
    }
    for opts in [&[][..], &["-o", "passthrough=off"][..]] {
        let fx = Fixture::new(0);
        let (_, store, st) = imported_test_image(&fx);
        let fetched = |data: &[u8]| st.object_path(&sha256_of(data)).exists();
        let (upper, work) = (fx.upper.clone(), fx.work.clone());
        let mut args = vec![
            "--upper",
            upper.to_str().unwrap(),
            "--work",
            work.to_str().unwrap(),
        ];
        args.extend_from_slice(opts);
        let guard = mount_image(TAG, &store, &args, &fx.mnt);
        let m = fx.mnt.clone();
        with_timeout(BODY_SECS, move || {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(m.join("etc/passwd"), fs::Permissions::from_mode(0o600)).unwrap();
            common::lchown(&m.join("etc/hosts"), 3, 4).unwrap();
            set_times(
                &m.join("bin/ping"),
                (T0 as i64 + 9, 9),
                (T0 as i64 + 10, 10),
            )
            .unwrap();
            set_xattr(&m.join("app/bin/run"), "user.k", b"v").unwrap();
            let mut f = fs::OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(m.join("bin/su"))
                .unwrap();
            f.write_all(b"new su\n").unwrap();
        });
        for (what, data) in [
            ("etc/passwd", PASSWD),
            ("etc/hosts", HOSTS_MID),
            ("bin/ping", PING),
            ("app/bin/run", APP_RUN),
            ("bin/su", SU),
        ] {
            assert!(!fetched(data), "{opts:?}: {what} was fetched");
        }
        assert_eq!(read_within(&fx.m("etc/passwd")).unwrap(), PASSWD);
        assert_eq!(read_within(&fx.m("bin/su")).unwrap(), b"new su\n");
        guard.unmount().unwrap();
        assert_metacopy(&upper.join("etc/passwd"), PASSWD.len() as u64);
        assert_metacopy(&upper.join("etc/hosts"), HOSTS_MID.len() as u64);
        assert_metacopy(&upper.join("bin/ping"), PING.len() as u64);
        assert_metacopy(&upper.join("app/bin/run"), APP_RUN.len() as u64);
        assert_eq!(fs::read(upper.join("bin/su")).unwrap(), b"new su\n");
        assert_errno_of(
            get_xattr(&upper.join("bin/su"), "trusted.overlay.metacopy"),
            libc::ENODATA,
        );
        assert_work_clean(&work);

        // Remounted: the metacopies still read as the image's bytes, with their metadata.
        let guard = mount_image(TAG, &store, &args, &fx.mnt);
        assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
        assert_eq!(read_within(&fx.m("bin/ping")).unwrap(), PING);
        let hosts = lstat(fx.m("etc/hosts")).unwrap();
        assert_eq!(
            (hosts.uid(), hosts.gid(), hosts.mode() & 0o7777),
            (3, 4, 0o600)
        );
        let ping = lstat(fx.m("bin/ping")).unwrap();
        assert_eq!((ping.mtime(), ping.mtime_nsec()), (T0 as i64 + 10, 10));
        assert!(!fetched(APP_RUN), "{opts:?}: app/bin/run was fetched");
        let run = lstat(fx.m("app/bin/run")).unwrap();
        let m = fx.mnt.clone();
        with_timeout(BODY_SECS, move || {
            fs::rename(m.join("app/bin/run"), m.join("app/bin/run2")).unwrap()
        });
        assert!(
            fetched(APP_RUN),
            "{opts:?}: renaming app/bin/run fetched its bytes"
        );
        let run2 = lstat(fx.m("app/bin/run2")).unwrap();
        assert_eq!(
            (run2.mtime(), run2.mtime_nsec()),
            (run.mtime(), run.mtime_nsec())
        );
        assert_eq!(run2.ino(), run.ino(), "{opts:?}: the inode number stays");
        assert_eq!(read_within(&fx.m("app/bin/run2")).unwrap(), APP_RUN);
        guard.unmount().unwrap();
        let p = upper.join("app/bin/run2");
        assert_eq!(fs::read(&p).unwrap(), APP_RUN);
        assert_errno_of(get_xattr(&p, "trusted.overlay.metacopy"), libc::ENODATA);
        assert_eq!(get_xattr(&p, "user.k").unwrap(), b"v");
        assert_metacopy(&upper.join("etc/passwd"), PASSWD.len() as u64);
        assert_work_clean(&work);
    }
}

/// Relative paths under a plain directory, sorted.
fn walkdir_plain(root: &Path) -> Vec<String> {
    fn walk(root: &Path, rel: &Path, out: &mut Vec<String>) {
        for e in fs::read_dir(root.join(rel)).unwrap() {
            let r = rel.join(e.unwrap().file_name());
            out.push(r.display().to_string());
            if lstat(root.join(&r)).unwrap().is_dir() {
                walk(root, &r, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, Path::new(""), &mut out);
    out.sort();
    out
}

// ---------------------------------------------------------------------------------------
// 3. A second mount reads no layer data
// ---------------------------------------------------------------------------------------

/// After a first mount (which indexed the layers and read etc/hosts), every layer blob is
/// moved out of the store: mounting by tag still works (indexes are cached), every
/// directory lists, etc/hosts is served from objects/, and etc/passwd (never read) fails
/// with EIO and one log line naming the base layer and the path. With the blobs back, the
/// same mount reads etc/passwd.
#[test]
fn second_mount_reads_no_layer_data() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let (img, store, _) = imported_test_image(&fx);

    let first = mount_image(TAG, &store, &[], &fx.mnt);
    assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
    let listing = walk_all(&fx.mnt);
    first.unmount().unwrap();

    let st = Store::open_or_create(&store).unwrap();
    assert!(
        st.object_path(&sha256_of(HOSTS_MID)).is_file(),
        "etc/hosts, once read, is kept in objects/"
    );
    assert!(
        !st.object_path(&sha256_of(PASSWD)).exists(),
        "etc/passwd was never read, so objects/ lacks it"
    );
    let moved = fx.dir.join("moved-blobs");
    fs::create_dir(&moved).unwrap();
    // Each blob is swapped for a file of zeros of the same size (mounting may look at its
    // size, not at its bytes): any layer data read from now on is wrong and cannot verify.
    for l in &img.layers {
        assert!(st.has_blob(&l.digest()), "layer {} imported", l.digest());
        let blob = st.blob_path(&l.digest());
        let len = fs::metadata(&blob).unwrap().len();
        fs::rename(&blob, moved.join(l.digest().hex())).unwrap();
        fs::File::create(&blob).unwrap().set_len(len).unwrap();
    }
    let restore = BlobsBack {
        moved: moved.clone(),
        store: st.clone(),
        digests: img.layers.iter().map(Layer::digest).collect(),
    };

    let log = fx.dir.join("daemon.log");
    let second = mount_image(TAG, &store, &["--log-file", log.to_str().unwrap()], &fx.mnt);
    assert_eq!(
        walk_all(&fx.mnt),
        listing,
        "the second mount lists the same tree"
    );
    assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
    let e = read_within(&fx.m("etc/passwd")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "reading etc/passwd: {e}");
    let lines = log_lines_with(&log, "etc/passwd");
    assert_eq!(lines.len(), 1, "one log line for etc/passwd: {lines:?}");
    let base = img.layers[0].digest().to_string();
    assert!(
        lines[0].contains(&base),
        "the log line names the base layer {base}: {}",
        lines[0]
    );
    drop(restore);
    assert_eq!(read_within(&fx.m("etc/passwd")).unwrap(), PASSWD);
    second.unmount().unwrap();
}

/// Mounting a source reads it in place: the store gains the layer indexes (and the contents
/// read), never a copy of a blob or a name; a second mount of the same source reads no layer
/// data (its blobs zeroed in the layout, the mount still lists everything and serves what
/// was read before).
#[test]
fn a_source_is_mounted_in_place() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    write_oci(&img, &layout_dir);
    let store = fx.dir.join("store");
    let spec = format!("oci:{}:{TAG}", layout_dir.display());
    let first = mount_image(&spec, &store, &[], &fx.mnt);
    assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
    let listing = walk_all(&fx.mnt);
    first.unmount().unwrap();
    let st = Store::open_or_create(&store).unwrap();
    for l in &img.layers {
        assert!(!st.has_blob(&l.digest()), "no copy of layer {}", l.digest());
        assert!(
            st.index_path(&l.digest()).is_file(),
            "index of {} cached",
            l.digest()
        );
    }
    assert!(st.list().unwrap().is_empty(), "mounting names no image");
    for l in &img.layers {
        let b = layout_dir.join("blobs/sha256").join(l.digest().hex());
        let len = fs::metadata(&b).unwrap().len();
        fs::write(&b, vec![0u8; len as usize]).unwrap();
    }
    let second = mount_image(&spec, &store, &[], &fx.mnt);
    assert_eq!(walk_all(&fx.mnt), listing);
    assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
    assert_eq!(
        read_within(&fx.m("etc/passwd")).unwrap_err().raw_os_error(),
        Some(libc::EIO)
    );
    second.unmount().unwrap();
}

/// A legacy docker-archive names no digest for its compressed layers: the first mount learns
/// them from its indexing pass (one read of each layer) and remembers them by the member's
/// place and the archive's identity;
/// a second mount finds the same indexes and shows the same tree. Rewriting the archive
/// (new identity) makes the digests be computed again, never reused blindly.
#[test]
fn docker_archive_member_digests_are_remembered() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let archive = fx.dir.join("image.tar");
    write_docker_archive(&img, &archive);
    let store = fx.dir.join("store");
    let spec = format!("docker-archive:{}", archive.display());
    let by_member = store.join("index/by-member");
    let count = |d: &Path| fs::read_dir(d).map_or(0, |r| r.count());

    let first = mount_image(&spec, &store, &[], &fx.mnt);
    let listing = walk_all(&fx.mnt);
    first.unmount().unwrap();
    // The gzip and the zstd layer; the plain one is named by its DiffID.
    assert_eq!(count(&by_member), 2);
    let st = Store::open_or_create(&store).unwrap();
    for l in &img.layers {
        assert!(
            st.index_path(&l.digest()).is_file(),
            "index of {} cached",
            l.digest()
        );
    }
    let second = mount_image(&spec, &store, &[], &fx.mnt);
    assert_eq!(walk_all(&fx.mnt), listing);
    second.unmount().unwrap();
    assert_eq!(count(&by_member), 2, "nothing new to remember");

    // The same bytes in a new file: a new identity, hashed again, same digests.
    let copy = fx.dir.join("copy.tar");
    fs::copy(&archive, &copy).unwrap();
    let third = mount_image(
        &format!("docker-archive:{}", copy.display()),
        &store,
        &[],
        &fx.mnt,
    );
    assert_eq!(walk_all(&fx.mnt), listing);
    third.unmount().unwrap();
    assert_eq!(count(&by_member), 4);
    // Nothing is named or mounted: gc drops the cached indexes and what pointed at them.
    // (The daemons may still be exiting and holding their leases: retry briefly.)
    assert!(common::wait_for(std::time::Duration::from_secs(10), || {
        st.gc(None).unwrap();
        count(&by_member) == 0 && count(&store.join("index/sha256")) == 0
    }));
}

/// Moves the real layer blobs back into the store when dropped (also while panicking).
struct BlobsBack {
    moved: PathBuf,
    store: Store,
    digests: Vec<Digest>,
}

impl Drop for BlobsBack {
    fn drop(&mut self) {
        for d in &self.digests {
            let from = self.moved.join(d.hex());
            if from.exists() {
                let _ = fs::rename(&from, self.store.blob_path(d));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// 4. Wrong bytes are never served
// ---------------------------------------------------------------------------------------

/// One byte of app/etc/app.conf is flipped inside the stored (uncompressed) top layer
/// after the layer was indexed: reading it gives EIO, every time, the log names the layer,
/// the path and the sha256 mismatch, objects/ never gains the file, and other files of the
/// same and other layers still read correctly.
#[test]
fn corrupted_blob_bytes_are_never_served() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    // Imported, then mounted by name: the daemon reads the blob in the store.
    let (img, store, st) = imported_test_image(&fx);

    let first = mount_image(TAG, &store, &[], &fx.mnt);
    assert!(lstat(fx.m("app/etc/app.conf")).unwrap().is_file());
    first.unmount().unwrap();

    let top = img.layers[2].digest();
    let blob_path = st.blob_path(&top);
    let mut blob = fs::read(&blob_path).unwrap();
    let at = blob
        .windows(APP_CONF.len())
        .position(|w| w == APP_CONF)
        .expect("app.conf's bytes in the top layer blob");
    blob[at + 5] ^= 0x20;
    fs::write(&blob_path, &blob).unwrap();
    let object = st.object_path(&sha256_of(APP_CONF));
    assert!(!object.exists(), "app.conf was never read");

    let log = fx.dir.join("daemon.log");
    let second = mount_image(TAG, &store, &["--log-file", log.to_str().unwrap()], &fx.mnt);
    for attempt in 0..2 {
        let e = read_within(&fx.m("app/etc/app.conf")).unwrap_err();
        assert_eq!(
            e.raw_os_error(),
            Some(libc::EIO),
            "attempt {attempt}: reading the corrupted file: {e}"
        );
    }
    assert_eq!(read_within(&fx.m("app/bin/run")).unwrap(), APP_RUN);
    assert_eq!(read_within(&fx.m("etc/passwd")).unwrap(), PASSWD);
    assert_eq!(read_within(&fx.m("etc/hosts")).unwrap(), HOSTS_MID);
    second.unmount().unwrap();

    let lines = log_lines_with(&log, "app/etc/app.conf");
    assert!(!lines.is_empty(), "no log line names app/etc/app.conf");
    for l in &lines {
        assert!(l.contains(&top.to_string()), "names the layer {top}: {l}");
        assert!(
            l.contains("does not match its sha256"),
            "says the content does not match its sha256: {l}"
        );
    }
    assert!(!object.exists(), "objects/ gained the corrupted file");
    assert!(
        fs::read_dir(st.tmp_dir()).unwrap().next().is_none(),
        "tmp/ keeps no staged copy"
    );
}

// ---------------------------------------------------------------------------------------
// 5. Bad input at mount
// ---------------------------------------------------------------------------------------

/// A store already holding another image (so "unchanged" means something).
fn seeded_store(fx: &Fixture) -> PathBuf {
    let other = Image {
        layers: vec![Layer::new(
            &[dir(".", 0o755), file("seed", 0o644, b"seed\n")],
            MT_GZIP,
        )],
    };
    let dir = fx.dir.join("seed-layout");
    write_oci(&other, &dir);
    let store = fx.dir.join("store");
    let st = Store::open_or_create(&store).unwrap();
    let src = unionmount::image::ImageSource::parse(&format!("oci:{}", dir.display())).unwrap();
    st.import(&src, Some("seed")).unwrap();
    store
}

/// `--image spec` fails: exit code != 0, one stderr line containing every `culprits`
/// fragment, nothing mounted, and the store unchanged outside tmp/.
fn assert_refused(fx: &Fixture, spec: &str, culprits: &[&str]) {
    let store = seeded_store(fx);
    let before = store_listing(&store);
    let guard = MountGuard::adopt(&fx.mnt);
    let out = run_image_mount(spec, &store, &[], &fx.mnt);
    let err = text(&out.stderr);
    assert_ne!(
        out.status.code(),
        Some(0),
        "{spec}: must fail; stderr: {err}"
    );
    assert!(!is_mounted(&fx.mnt), "{spec}: something is mounted");
    let line = err.trim_end();
    assert!(
        !line.is_empty() && !line.contains('\n'),
        "{spec}: one line on stderr, got {err:?}"
    );
    eprintln!("refused as expected: {line}");
    assert!(line.starts_with("unionmount: "), "{spec}: {line}");
    for c in culprits {
        assert!(line.contains(c), "{spec}: the error names {c:?}: {line}");
    }
    let after = store_listing(&store);
    let changed: Vec<String> = before
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(*v))
        .map(|(k, _)| format!("changed or removed: {k}"))
        .chain(
            after
                .keys()
                .filter(|k| !before.contains_key(*k))
                .map(|k| format!("added: {k}")),
        )
        .collect();
    assert!(
        changed.is_empty(),
        "{spec}: the store changed outside tmp/:\n{}",
        changed.join("\n")
    );
    drop(guard);
}

/// A layer blob whose bytes do not hash to its name: refused, naming the layer digest.
#[test]
fn bad_input_layer_blob_digest_mismatch() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    write_oci(&img, &layout_dir);
    let base = img.layers[0].digest();
    let p = layout_dir.join("blobs/sha256").join(base.hex());
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    fs::write(&p, &b).unwrap();
    assert_refused(
        &fx,
        &format!("oci:{}:{TAG}", layout_dir.display()),
        &[&base.to_string()],
    );
}

/// The config's DiffID for the gzip base layer is wrong: refused, naming the layer digest
/// and the DiffID, and nothing of the image lands in the store.
#[test]
fn bad_input_diff_id_mismatch() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    let wrong = sha256_of(b"not the base layer");
    let mut ids: Vec<Digest> = img.layers.iter().map(Layer::diff_id).collect();
    ids[0] = wrong;
    let mut l = Layout::default();
    let m = l.add_image(&img, &Platform::host().architecture, Some(ids));
    l.tag(MT_MANIFEST, &m, TAG);
    l.write_dir(&layout_dir);
    assert_refused(
        &fx,
        &format!("oci:{}:{TAG}", layout_dir.display()),
        &[
            "DiffID",
            &img.layers[0].digest().to_string(),
            &wrong.to_string(),
        ],
    );
}

/// The same for a legacy docker-archive, whose plain layers are checked while copied.
#[test]
fn bad_input_diff_id_mismatch_docker_archive() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image_plain();
    let wrong = sha256_of(b"not the middle layer");
    let mut ids: Vec<Digest> = img.layers.iter().map(Layer::diff_id).collect();
    ids[1] = wrong;
    let config = config_json(&Platform::host().architecture, &ids);
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let names = ["a/layer.tar", "b/layer.tar", "c/layer.tar"];
    let mut files: Vec<(String, Vec<u8>)> = img
        .layers
        .iter()
        .zip(names)
        .map(|(l, n)| (n.to_string(), l.blob.clone()))
        .collect();
    files.push((cfg_name.clone(), config));
    files.push((
        "manifest.json".into(),
        serde_json::to_vec(&json!([{"Config": cfg_name, "Layers": names}])).unwrap(),
    ));
    let archive = fx.dir.join("bad-docker.tar");
    write_archive(&archive, &files);
    assert_refused(
        &fx,
        &format!("docker-archive:{}", archive.display()),
        &[&wrong.to_string()],
    );
}

/// A source path that does not exist: refused, naming the path.
#[test]
fn bad_input_missing_source() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let missing = fx.dir.join("no-such-layout");
    assert_refused(
        &fx,
        &format!("oci:{}", missing.display()),
        &[&missing.display().to_string()],
    );
    let missing_tar = fx.dir.join("no-such-image.tar");
    assert_refused(
        &fx,
        &format!("docker-archive:{}", missing_tar.display()),
        &[&missing_tar.display().to_string()],
    );
}

/// A digest reference that would climb out of blobs/: refused before any file is opened.
#[test]
fn bad_input_digest_with_path_components() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let img = test_image();
    let layout_dir = fx.dir.join("layout");
    write_oci(&img, &layout_dir);
    assert_refused(
        &fx,
        &format!("oci:{}@sha256:../../x", layout_dir.display()),
        &["sha256:../../x"],
    );
}

// ---------------------------------------------------------------------------------------
// 6. --platform
// ---------------------------------------------------------------------------------------

/// An image index with linux/amd64 and linux/arm64 images (different contents): the
/// default mounts the host's, `--platform` picks either.
#[test]
fn platform_selects_the_image_of_an_index() {
    if !mount_allowed() {
        return;
    }
    let fx = Fixture::new(0);
    let layout_dir = fx.dir.join("layout");
    let mut l = Layout::default();
    let mut manifests = Vec::new();
    // arm64 first: a reader that took the first entry instead of the host's fails here.
    for arch in ["arm64", "amd64"] {
        let img = Image {
            layers: vec![Layer::new(
                &[
                    dir(".", 0o755),
                    dir("etc", 0o755),
                    file("etc/arch", 0o644, format!("{arch}\n").as_bytes()),
                    file(&format!("only-{arch}"), 0o644, b"x"),
                ],
                MT_GZIP,
            )],
        };
        let m = l.add_image(&img, arch, None);
        let mut d = desc(MT_MANIFEST, &m);
        d["platform"] = json!({"architecture": arch, "os": "linux"});
        manifests.push(d);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MT_INDEX,
        "manifests": manifests,
    }))
    .unwrap();
    l.add(&index);
    l.tag(MT_INDEX, &index, "multi");
    l.write_dir(&layout_dir);
    let store = fx.dir.join("store");
    let spec = format!("oci:{}:multi", layout_dir.display());

    let host = Platform::host().architecture;
    let mut cases: Vec<(Vec<&str>, &str)> = Vec::new();
    if matches!(host.as_str(), "amd64" | "arm64") {
        cases.push((vec![], host.as_str()));
    } else {
        eprintln!("note: host architecture {host} is in neither image; default not checked");
    }
    cases.push((vec!["--platform", "linux/arm64"], "arm64"));
    cases.push((vec!["--platform", "linux/amd64"], "amd64"));
    for (extra, want) in cases {
        let g = mount_image(&spec, &store, &extra, &fx.mnt);
        let got = read_within(&fx.m("etc/arch"));
        let names = common::list_dir(&fx.mnt);
        g.unmount().unwrap();
        assert_eq!(
            got.unwrap(),
            format!("{want}\n").into_bytes(),
            "{extra:?}: etc/arch"
        );
        assert_eq!(
            names,
            ["etc".to_string(), format!("only-{want}")],
            "{extra:?}: root listing"
        );
    }
}
