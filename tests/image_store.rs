//! Image sources and the store, end to end: every source shape is generated here with the
//! `tar` crate (plus flate2/zstd for compressed layers), resolved, imported, listed, untagged
//! and garbage-collected; every bad input is refused with an error naming the culprit and
//! without writing anything into the store outside `tmp/`.

mod common;

use common::TempDir;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use unionmount::image::blob::sha256_of;
use unionmount::image::{self, ImageSource, Platform, ResolvedImage, media};
use unionmount::store::{Compression, Digest, Store};

// ---------- helpers ----------

/// A layer tar holding the given regular files.
fn layer_tar(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

fn config_for(diff_ids: &[Digest]) -> Vec<u8> {
    let ids: Vec<String> = diff_ids.iter().map(|d| d.to_string()).collect();
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": ids},
    }))
    .unwrap()
}

/// Archive builder: named members (regular files and links).
enum Member {
    File(Vec<u8>),
    Symlink(String),
}

fn write_tar(path: &Path, members: &[(String, Member)]) {
    let mut b = tar::Builder::new(fs::File::create(path).unwrap());
    for (name, m) in members {
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        match m {
            Member::File(data) => {
                h.set_size(data.len() as u64);
                h.set_entry_type(tar::EntryType::Regular);
                b.append_data(&mut h, name, data.as_slice()).unwrap();
            }
            Member::Symlink(target) => {
                h.set_size(0);
                h.set_entry_type(tar::EntryType::Symlink);
                b.append_link(&mut h, name, target).unwrap();
            }
        }
    }
    b.finish().unwrap();
}

/// An OCI image layout under construction.
#[derive(Default, Clone)]
struct Oci {
    blobs: BTreeMap<Digest, Vec<u8>>,
    index: Vec<Value>,
}

/// A legacy docker-archive with one layer (`aaa/layer.tar`) and config `cfg_name`.
fn write_legacy_one(path: &Path, layer: &[u8], cfg_name: &str, config: Vec<u8>) {
    let manifest = json!([{"Config": cfg_name, "Layers": ["aaa/layer.tar"]}]);
    write_tar(
        path,
        &[
            ("aaa/layer.tar".into(), Member::File(layer.to_vec())),
            (cfg_name.to_string(), Member::File(config)),
            (
                "manifest.json".into(),
                Member::File(serde_json::to_vec(&manifest).unwrap()),
            ),
        ],
    );
}

fn desc(media_type: &str, bytes: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256_of(bytes).to_string(), "size": bytes.len()})
}

impl Oci {
    fn add(&mut self, bytes: &[u8]) -> Digest {
        let d = sha256_of(bytes);
        self.blobs.insert(d, bytes.to_vec());
        d
    }

    /// Adds an image manifest over `layers` (media type, blob bytes, uncompressed tar);
    /// returns its bytes.
    fn manifest(&mut self, manifest_type: &str, layers: &[(&str, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        let ids: Vec<Digest> = layers.iter().map(|(_, _, t)| sha256_of(t)).collect();
        let config = config_for(&ids);
        self.add(&config);
        let config_type = if manifest_type == media::DOCKER_MANIFEST {
            media::DOCKER_CONFIG
        } else {
            media::OCI_CONFIG
        };
        let ls: Vec<Value> = layers
            .iter()
            .map(|(mt, blob, _)| {
                self.add(blob);
                desc(mt, blob)
            })
            .collect();
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": desc(config_type, &config),
            "layers": ls,
        }))
        .unwrap();
        self.add(&m);
        m
    }

    fn tag(&mut self, media_type: &str, bytes: &[u8], name: Option<&str>) {
        let mut d = desc(media_type, bytes);
        if let Some(n) = name {
            d["annotations"] = json!({"org.opencontainers.image.ref.name": n});
        }
        self.index.push(d);
    }

    fn files(&self) -> Vec<(String, Member)> {
        let mut out = vec![
            (
                "oci-layout".to_string(),
                Member::File(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
            ),
            (
                "index.json".to_string(),
                Member::File(
                    serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": self.index}))
                        .unwrap(),
                ),
            ),
        ];
        for (d, b) in &self.blobs {
            out.push((format!("blobs/sha256/{}", d.hex()), Member::File(b.clone())));
        }
        out
    }

    fn write_dir(&self, dir: &Path) {
        for (name, m) in self.files() {
            let p = dir.join(name);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            if let Member::File(b) = m {
                fs::write(p, b).unwrap();
            }
        }
    }

    fn write_tar(&self, path: &Path) {
        write_tar(path, &self.files());
    }
}

/// Every file and directory under the store except `tmp/`'s contents, with file sizes.
fn listing(root: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let rel = e.path().strip_prefix(root).unwrap().display().to_string();
            let md = e.metadata().unwrap();
            if md.is_dir() {
                out.insert(format!("{rel}/"));
                if rel != "tmp" {
                    walk(root, &e.path(), out);
                }
            } else {
                out.insert(format!("{rel} {}", md.len()));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(root, root, &mut out);
    out
}

fn blob_names(store: &Store) -> BTreeSet<Digest> {
    fs::read_dir(store.root().join("blobs/sha256"))
        .unwrap()
        .map(|e| Digest::parse_hex(&e.unwrap().file_name().to_string_lossy()).unwrap())
        .collect()
}

fn tmp_is_empty(store: &Store) -> bool {
    fs::read_dir(store.tmp_dir()).unwrap().next().is_none()
}

fn read_blob(r: &image::BlobRef) -> Vec<u8> {
    let mut v = Vec::new();
    r.open().unwrap().read_to_end(&mut v).unwrap();
    v
}

fn store_index(store: &Store) -> Value {
    serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap()
}

fn stored_manifest(store: &Store, d: &Digest) -> Value {
    serde_json::from_slice(&fs::read(store.blob_path(d)).unwrap()).unwrap()
}

fn src(s: String) -> ImageSource {
    ImageSource::parse(&s).unwrap()
}

/// Checks that the store names `tag` → `manifest` in index.json, as an OCI layout would.
fn assert_tagged(store: &Store, tag: &str, manifest: &Digest) {
    let ix = store_index(store);
    let hits: Vec<&Value> = ix["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .collect();
    assert_eq!(hits.len(), 1, "{ix}");
    assert_eq!(hits[0]["digest"], manifest.to_string());
    assert_eq!(
        fs::read_to_string(store.root().join("oci-layout")).unwrap(),
        r#"{"imageLayoutVersion":"1.0.0"}"#
    );
}

// ---------- docker-archive ----------

/// A legacy `docker save` tarball: layers A, B, A where the second A is a symlink to the
/// first `layer.tar`. Returns (path, [A, B] tars, config bytes).
fn legacy_archive(dir: &Path, compress: fn(&[u8]) -> Vec<u8>) -> (PathBuf, Vec<Vec<u8>>, Vec<u8>) {
    let a = layer_tar(&[("etc/a", b"layer a")]);
    let b = layer_tar(&[("etc/b", b"layer b"), ("bin/sh", b"#!")]);
    let config = config_for(&[sha256_of(&a), sha256_of(&b), sha256_of(&a)]);
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let manifest = json!([{
        "Config": cfg_name,
        "RepoTags": ["example.com/app:1", "app:latest"],
        "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"],
    }]);
    let path = dir.join("legacy.tar");
    write_tar(
        &path,
        &[
            ("aaa/layer.tar".into(), Member::File(compress(&a))),
            ("bbb/layer.tar".into(), Member::File(compress(&b))),
            (
                "ccc/layer.tar".into(),
                Member::Symlink("../aaa/layer.tar".into()),
            ),
            (cfg_name.clone(), Member::File(config.clone())),
            (
                "manifest.json".into(),
                Member::File(serde_json::to_vec(&manifest).unwrap()),
            ),
            ("repositories".into(), Member::File(b"{}".to_vec())),
        ],
    );
    (path, vec![a, b], config)
}

#[test]
fn legacy_docker_archive_with_symlinked_duplicate_layer() {
    let t = TempDir::new("legacy");
    let (path, tars, config) = legacy_archive(t.path(), |b| b.to_vec());
    let source = src(format!("docker-archive:{}", path.display()));
    let img = image::resolve(&source, None).unwrap();
    assert_eq!(img.tag.as_deref(), Some("example.com/app:1"));
    assert_eq!(img.manifest, None);
    assert_eq!(img.config, config);
    assert_eq!(img.config_digest, sha256_of(&config));
    let ids: Vec<Digest> = img.layers.iter().map(|l| l.diff_id).collect();
    assert_eq!(
        ids,
        vec![
            sha256_of(&tars[0]),
            sha256_of(&tars[1]),
            sha256_of(&tars[0])
        ]
    );
    for (l, tar) in img.layers.iter().zip([&tars[0], &tars[1], &tars[0]]) {
        assert_eq!(l.digest, None);
        assert_eq!(l.compression, Compression::None);
        assert_eq!(l.size, tar.len() as u64);
        assert_eq!(&read_blob(&l.source), tar);
    }
    // The symlinked duplicate reads the very same bytes of the archive.
    assert_eq!(img.layers[2].source, img.layers[0].source);

    // Tag selection: exact, and NAME matching NAME:latest.
    let by_tag =
        image::resolve(&src(format!("docker-archive:{}:app", path.display())), None).unwrap();
    assert_eq!(by_tag.tag.as_deref(), Some("app"));
    let e = image::resolve(
        &src(format!("docker-archive:{}:nope", path.display())),
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains(
            "no image tagged \"nope\" in manifest.json (RepoTags: example.com/app:1, app:latest)"
        ),
        "{e}"
    );

    let st = TempDir::new("legacy-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let imp = store.import(&source, None).unwrap();
    assert_eq!(imp.name, "example.com/app:1");
    let layer_digests: Vec<Digest> = imp.layers.iter().map(|l| l.digest).collect();
    // Uncompressed layers: blob digest = DiffID.
    assert_eq!(layer_digests, ids);
    assert_eq!(
        blob_names(&store),
        BTreeSet::from([
            sha256_of(&tars[0]),
            sha256_of(&tars[1]),
            sha256_of(&config),
            imp.manifest_digest
        ])
    );
    assert_tagged(&store, "example.com/app:1", &imp.manifest_digest);
    let m = stored_manifest(&store, &imp.manifest_digest);
    assert_eq!(m["mediaType"], media::OCI_MANIFEST);
    assert_eq!(m["config"]["digest"], sha256_of(&config).to_string());
    assert_eq!(m["config"]["mediaType"], media::OCI_CONFIG);
    let lds: Vec<&str> = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap())
        .collect();
    assert_eq!(lds, ids.iter().map(|d| d.to_string()).collect::<Vec<_>>());
    assert!(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == media::OCI_LAYER)
    );
    assert!(tmp_is_empty(&store));

    // Reading the image back from the store gives the same layers.
    let back = store.resolve("example.com/app:1", None).unwrap();
    assert_eq!(
        back.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>(),
        ids
    );
    assert_eq!(back.manifest_digest(), Some(imp.manifest_digest));
    assert_eq!(&read_blob(&back.layers[1].source), &tars[1]);

    let list = store.list().unwrap();
    assert_eq!(list.len(), 1);
    let expected_size = (tars[0].len() + tars[1].len() + config.len()) as u64
        + fs::metadata(store.blob_path(&imp.manifest_digest))
            .unwrap()
            .len();
    assert_eq!(list[0].name, "example.com/app:1");
    assert_eq!(list[0].manifest_digest, imp.manifest_digest);
    assert_eq!(list[0].size, expected_size);
}

#[test]
fn legacy_docker_archive_with_zstd_layers() {
    let t = TempDir::new("zstd");
    let (path, tars, _) = legacy_archive(t.path(), zstd);
    let source = src(format!("docker-archive:{}", path.display()));
    let img = image::resolve(&source, None).unwrap();
    assert!(
        img.layers
            .iter()
            .all(|l| l.compression == Compression::Zstd && l.digest.is_none())
    );
    assert_eq!(read_blob(&img.layers[0].source), zstd(&tars[0]));
    let st = TempDir::new("zstd-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let imp = store.import(&source, Some("z")).unwrap();
    assert_eq!(imp.layers[0].digest, sha256_of(&zstd(&tars[0])));
    assert_eq!(imp.layers[2].digest, imp.layers[0].digest);
    let m = stored_manifest(&store, &imp.manifest_digest);
    assert!(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == media::OCI_LAYER_ZSTD)
    );
    assert_tagged(&store, "z", &imp.manifest_digest);
    assert_eq!(blob_names(&store).len(), 4);
}

/// docker 25+ shape: OCI layout inside the tar and manifest.json naming blobs/sha256/<hex>,
/// here with gzip layers.
#[test]
fn docker_archive_with_oci_layout_and_gzip_layers() {
    let t = TempDir::new("dock-oci");
    let tars = [layer_tar(&[("a", b"1")]), layer_tar(&[("b", b"22")])];
    let mut oci = Oci::default();
    let layers: Vec<(&str, Vec<u8>, Vec<u8>)> = tars
        .iter()
        .map(|t| (media::OCI_LAYER_GZIP, gzip(t), t.clone()))
        .collect();
    let m = oci.manifest(media::OCI_MANIFEST, &layers);
    oci.tag(media::OCI_MANIFEST, &m, Some("docker.io/library/app:2"));
    let mv: Value = serde_json::from_slice(&m).unwrap();
    let cfg_hex = mv["config"]["digest"].as_str().unwrap()[7..].to_string();
    let layer_paths: Vec<String> = layers
        .iter()
        .map(|(_, b, _)| format!("blobs/sha256/{}", sha256_of(b).hex()))
        .collect();
    let mut files = oci.files();
    files.push((
        "manifest.json".into(),
        Member::File(
            serde_json::to_vec(&json!([{
                "Config": format!("blobs/sha256/{cfg_hex}"),
                "RepoTags": ["app:2"],
                "Layers": layer_paths,
            }]))
            .unwrap(),
        ),
    ));
    let path = t.path().join("new.tar");
    write_tar(&path, &files);
    let source = src(format!("docker-archive:{}", path.display()));
    let img = image::resolve(&source, None).unwrap();
    assert_eq!(img.tag.as_deref(), Some("app:2"));
    for (l, (_, blob, tar)) in img.layers.iter().zip(&layers) {
        assert_eq!(l.compression, Compression::Gzip);
        assert_eq!(l.digest, Some(sha256_of(blob)));
        assert_eq!(l.diff_id, sha256_of(tar));
        assert_eq!(&read_blob(&l.source), blob);
    }
    let st = TempDir::new("dock-oci-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let imp = store.import(&source, None).unwrap();
    assert_eq!(imp.name, "app:2");
    let m = stored_manifest(&store, &imp.manifest_digest);
    assert!(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["mediaType"] == media::OCI_LAYER_GZIP)
    );
    let mut want: BTreeSet<Digest> = layers.iter().map(|(_, b, _)| sha256_of(b)).collect();
    want.insert(
        cfg_hex
            .parse::<Digest>()
            .unwrap_or_else(|_| Digest::parse_hex(&cfg_hex).unwrap()),
    );
    want.insert(imp.manifest_digest);
    assert_eq!(blob_names(&store), want);
    assert_tagged(&store, "app:2", &imp.manifest_digest);
}

// ---------- oci: and oci-archive: ----------

/// A layout whose index.json holds one image index (tagged "multi") over an amd64 and an
/// arm64/v8 manifest, each with its own layers (gzip and zstd), plus a single-platform
/// docker v2 manifest tagged "docker".
struct MultiArch {
    oci: Oci,
    amd64: Vec<u8>,
    arm64: Vec<u8>,
    amd64_tars: Vec<Vec<u8>>,
    arm64_tars: Vec<Vec<u8>>,
    index: Vec<u8>,
}

fn multi_arch() -> MultiArch {
    let mut oci = Oci::default();
    let amd64_tars = vec![
        layer_tar(&[("arch", b"amd64")]),
        layer_tar(&[("x", b"shared")]),
    ];
    let arm64_tars = vec![layer_tar(&[("arch", b"arm64")])];
    let amd64 = oci.manifest(
        media::OCI_MANIFEST,
        &[
            (
                media::OCI_LAYER_GZIP,
                gzip(&amd64_tars[0]),
                amd64_tars[0].clone(),
            ),
            (
                media::OCI_LAYER,
                amd64_tars[1].clone(),
                amd64_tars[1].clone(),
            ),
        ],
    );
    let arm64 = oci.manifest(
        media::OCI_MANIFEST,
        &[(
            media::OCI_LAYER_ZSTD,
            zstd(&arm64_tars[0]),
            arm64_tars[0].clone(),
        )],
    );
    let mut d_amd = desc(media::OCI_MANIFEST, &amd64);
    d_amd["platform"] = json!({"os": "linux", "architecture": "amd64"});
    let mut d_arm = desc(media::OCI_MANIFEST, &arm64);
    d_arm["platform"] = json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": media::OCI_INDEX,
        "manifests": [d_amd, d_arm],
    }))
    .unwrap();
    oci.add(&index);
    oci.tag(media::OCI_INDEX, &index, Some("multi"));
    let dock = oci.manifest(
        media::DOCKER_MANIFEST,
        &[(
            media::DOCKER_LAYER_GZIP,
            gzip(&amd64_tars[1]),
            amd64_tars[1].clone(),
        )],
    );
    oci.tag(media::DOCKER_MANIFEST, &dock, Some("docker"));
    MultiArch {
        oci,
        amd64,
        arm64,
        amd64_tars,
        arm64_tars,
        index,
    }
}

fn diff_ids(img: &ResolvedImage) -> Vec<Digest> {
    img.layers.iter().map(|l| l.diff_id).collect()
}

#[test]
fn oci_dir_index_picks_host_platform_and_honours_override() {
    let t = TempDir::new("ocidir");
    let ma = multi_arch();
    let dir = t.path().join("layout");
    ma.oci.write_dir(&dir);
    let multi = src(format!("oci:{}:multi", dir.display()));

    let host = Platform::host();
    let amd = Platform::parse("linux/amd64").unwrap();
    let arm = Platform::parse("linux/arm64/v8").unwrap();
    let img = image::resolve(&multi, None).unwrap();
    if host.architecture == "arm64" {
        assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.arm64)));
    } else if host.architecture == "amd64" {
        assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.amd64)));
    }
    assert_eq!(img.tag.as_deref(), Some("multi"));

    let img = image::resolve(&multi, Some(&amd)).unwrap();
    assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.amd64)));
    assert_eq!(
        diff_ids(&img),
        ma.amd64_tars
            .iter()
            .map(|t| sha256_of(t))
            .collect::<Vec<_>>()
    );
    assert_eq!(
        img.layers.iter().map(|l| l.compression).collect::<Vec<_>>(),
        vec![Compression::Gzip, Compression::None]
    );
    let img = image::resolve(&multi, Some(&arm)).unwrap();
    assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.arm64)));
    assert_eq!(diff_ids(&img), vec![sha256_of(&ma.arm64_tars[0])]);
    assert_eq!(img.layers[0].compression, Compression::Zstd);
    assert_eq!(
        img.layers[0].media_type.as_deref(),
        Some(media::OCI_LAYER_ZSTD)
    );
    // arm64 without a variant matches v8.
    let img = image::resolve(&multi, Some(&Platform::parse("linux/arm64").unwrap())).unwrap();
    assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.arm64)));

    let e = image::resolve(&multi, Some(&Platform::parse("linux/s390x").unwrap()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&format!(
            "index {}: no manifest for platform linux/s390x (available: linux/amd64, linux/arm64/v8)",
            sha256_of(&ma.index)
        )),
        "{e}"
    );

    // Docker v2 schema 2 manifest with a docker gzip layer.
    let img = image::resolve(&src(format!("oci:{}:docker", dir.display())), None).unwrap();
    assert_eq!(
        img.manifest.as_ref().unwrap().media_type,
        media::DOCKER_MANIFEST
    );
    assert_eq!(img.config_media_type.as_deref(), Some(media::DOCKER_CONFIG));
    assert_eq!(img.layers[0].compression, Compression::Gzip);

    // @digest of the platform manifest (not listed in index.json itself).
    let by_digest = src(format!("oci:{}@{}", dir.display(), sha256_of(&ma.arm64)));
    assert_eq!(
        image::resolve(&by_digest, None).unwrap().manifest_digest(),
        Some(sha256_of(&ma.arm64))
    );

    // Two tags and no reference: the error lists them.
    let e = image::resolve(&src(format!("oci:{}", dir.display())), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "index.json lists 2 manifests; name one with :TAG or @DIGEST (tags: multi, docker)"
        ),
        "{e}"
    );
    let e = image::resolve(&src(format!("oci:{}:v9", dir.display())), None)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no image tagged \"v9\" in index.json (tags: multi, docker)"),
        "{e}"
    );

    // Import the arm64 pick: only its blobs are copied, and it is tagged by the source tag.
    let st = TempDir::new("ocidir-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let resolved = image::resolve(&multi, Some(&arm)).unwrap();
    let imp = store.import_resolved(&resolved, None).unwrap();
    assert_eq!(imp.name, "multi");
    assert_eq!(imp.manifest_digest, sha256_of(&ma.arm64));
    let mv: Value = serde_json::from_slice(&ma.arm64).unwrap();
    let want: BTreeSet<Digest> = [
        sha256_of(&ma.arm64),
        mv["config"]["digest"].as_str().unwrap().parse().unwrap(),
        sha256_of(&zstd(&ma.arm64_tars[0])),
    ]
    .into();
    assert_eq!(blob_names(&store), want);
    assert_tagged(&store, "multi", &imp.manifest_digest);
    // The stored manifest is byte-identical to the source's.
    assert_eq!(
        fs::read(store.blob_path(&imp.manifest_digest)).unwrap(),
        ma.arm64
    );
}

#[test]
fn oci_archive_reads_blobs_in_place() {
    let t = TempDir::new("ociar");
    let ma = multi_arch();
    let path = t.path().join("img.tar");
    ma.oci.write_tar(&path);
    let amd = Platform::parse("linux/amd64").unwrap();
    let img = image::resolve(
        &src(format!("oci-archive:{}:multi", path.display())),
        Some(&amd),
    )
    .unwrap();
    assert_eq!(img.manifest_digest(), Some(sha256_of(&ma.amd64)));
    for l in &img.layers {
        assert_eq!(l.source.path, path);
        assert!(l.source.offset > 0 && l.source.offset % 512 == 0);
        let bytes = read_blob(&l.source);
        assert_eq!(Some(sha256_of(&bytes)), l.digest);
    }
    assert_eq!(read_blob(&img.layers[0].source), gzip(&ma.amd64_tars[0]));
    // The same image through its digest.
    let by_digest = src(format!(
        "oci-archive:{}@{}",
        path.display(),
        sha256_of(&ma.amd64)
    ));
    let img2 = image::resolve(&by_digest, None).unwrap();
    assert_eq!(diff_ids(&img2), diff_ids(&img));
    assert_eq!(img2.tag, None);

    let st = TempDir::new("ociar-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let imp = store
        .import(
            &src(format!("oci-archive:{}:docker", path.display())),
            Some("mine"),
        )
        .unwrap();
    assert_eq!(imp.name, "mine");
    assert_tagged(&store, "mine", &imp.manifest_digest);
    let e = store_index(&store);
    assert_eq!(e["manifests"][0]["mediaType"], media::DOCKER_MANIFEST);
    assert_eq!(blob_names(&store).len(), 3);
}

// ---------- list / remove / gc / verify ----------

#[test]
fn list_remove_gc_delete_exactly_the_unreferenced() {
    let t = TempDir::new("gc");
    let ma = multi_arch();
    let dir = t.path().join("layout");
    ma.oci.write_dir(&dir);
    let st = TempDir::new("gc-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let amd = Platform::parse("linux/amd64").unwrap();
    let a = store
        .import_resolved(
            &image::resolve(&src(format!("oci:{}:multi", dir.display())), Some(&amd)).unwrap(),
            Some("a"),
        )
        .unwrap();
    let d = store
        .import(&src(format!("oci:{}:docker", dir.display())), Some("d"))
        .unwrap();
    // Re-importing under the same name moves the tag; nothing is duplicated.
    let d2 = store
        .import(&src(format!("oci:{}:docker", dir.display())), Some("d"))
        .unwrap();
    assert_eq!(d2, d);
    let names: Vec<String> = store.list().unwrap().into_iter().map(|e| e.name).collect();
    assert_eq!(names, vec!["a", "d"]);
    let before = blob_names(&store);
    // a: manifest, config, gzip and plain layer; d: manifest, config, gzip layer.
    assert_eq!(before.len(), 4 + 3);

    // Layer indexes and objects as the indexer would leave them, and tmp leftovers.
    for l in a.layers.iter().chain(&d.layers) {
        fs::write(store.index_path(&l.digest), b"idx").unwrap();
    }
    let obj_a = sha256_of(b"file of a");
    let obj_d = sha256_of(b"file of d");
    for (o, bytes) in [(obj_a, &b"file of a"[..]), (obj_d, &b"file of d"[..])] {
        fs::create_dir_all(store.object_path(&o).parent().unwrap()).unwrap();
        fs::write(store.object_path(&o), bytes).unwrap();
    }
    let stale = store.tmp_dir().join("stale");
    fs::write(&stale, b"x").unwrap();
    fs::File::options()
        .write(true)
        .open(&stale)
        .unwrap()
        .set_modified(SystemTime::now() - Duration::from_secs(7200))
        .unwrap();
    let fresh = store.tmp_dir().join("fresh");
    fs::write(&fresh, b"y").unwrap();

    // Nothing is unreferenced yet.
    let r = store.gc(None).unwrap();
    assert!(
        r.removed_blobs.is_empty() && r.removed_indexes.is_empty(),
        "{r:?}"
    );
    assert_eq!(r.removed_tmp, 1);
    assert!(!stale.exists() && fresh.exists());

    let removed = store.remove("d").unwrap();
    assert_eq!(removed, d.manifest_digest);
    let e = store.remove("d").unwrap_err().to_string();
    assert!(e.contains("no image named \"d\" in store"), "{e}");
    assert_eq!(store.list().unwrap().len(), 1);

    let hook = |layer: &Digest| -> std::io::Result<Vec<Digest>> {
        Ok(if a.layers.iter().any(|l| l.digest == *layer) {
            vec![obj_a]
        } else {
            vec![obj_d]
        })
    };
    let r = store.gc(Some(&hook)).unwrap();
    // d's manifest, config and its gzip layer (a shares no blob with d).
    let mut expect_blobs: Vec<Digest> =
        vec![d.manifest_digest, d.config_digest, d.layers[0].digest];
    expect_blobs.sort();
    assert_eq!(r.removed_blobs, expect_blobs);
    assert_eq!(r.removed_indexes, vec![d.layers[0].digest]);
    assert_eq!(r.removed_objects, vec![obj_d]);
    let after: BTreeSet<Digest> = before
        .difference(&expect_blobs.iter().copied().collect())
        .copied()
        .collect();
    assert_eq!(blob_names(&store), after);
    assert!(store.object_path(&obj_a).exists() && !store.object_path(&obj_d).exists());
    for l in &a.layers {
        assert!(store.index_path(&l.digest).exists());
    }
    // The remaining image still resolves from the store.
    assert_eq!(
        diff_ids(&store.resolve("a", None).unwrap()),
        a.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>()
    );

    // verify: all good, then one corrupted blob is reported.
    let v = store.verify().unwrap();
    assert!(v.bad.is_empty() && v.checked == 4 + 1, "{v:?}");
    fs::write(store.blob_path(&a.config_digest), b"tampered").unwrap();
    let v = store.verify().unwrap();
    assert_eq!(v.bad.len(), 1);
    assert_eq!(v.bad[0].expected, a.config_digest);
    assert_eq!(v.bad[0].actual, sha256_of(b"tampered"));
}

#[test]
fn publish_blob_is_atomic_and_checked() {
    let st = TempDir::new("publish");
    let store = Store::open_or_create(st.path()).unwrap();
    let before = listing(store.root());
    let want = sha256_of(b"other");
    let e = store
        .publish_blob(&b"hello"[..], Some(&want))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        format!(
            "blob digest mismatch: expected {want}, got {}",
            sha256_of(b"hello")
        )
    );
    assert_eq!(listing(store.root()), before);
    assert!(tmp_is_empty(&store));
    let d = store.publish_blob(&b"hello"[..], None).unwrap();
    assert_eq!(d, sha256_of(b"hello"));
    assert_eq!(fs::read(store.blob_path(&d)).unwrap(), b"hello");
    assert_eq!(store.publish_blob(&b"hello"[..], Some(&d)).unwrap(), d);
    assert!(tmp_is_empty(&store));
    // Reopening keeps everything; a bad oci-layout is refused.
    Store::open_or_create(st.path()).unwrap();
    fs::write(
        st.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"2.0.0"}"#,
    )
    .unwrap();
    let e = Store::open_or_create(st.path()).unwrap_err().to_string();
    assert!(
        e.contains("unsupported imageLayoutVersion Some(\"2.0.0\")"),
        "{e}"
    );
}

// ---------- bad input ----------

/// Imports `source` into a fresh store and checks the error contains `fragment` and that
/// nothing was written outside tmp/ (and tmp/ is left empty).
fn refused(name: &str, source: &str, fragment: &str) {
    let st = TempDir::new(&format!("bad-{name}"));
    let store = Store::open_or_create(st.path()).unwrap();
    let before = listing(store.root());
    let e = store
        .import(&src(source.to_string()), None)
        .unwrap_err()
        .to_string();
    assert!(e.contains(fragment), "{name}: {e:?} lacks {fragment:?}");
    assert_eq!(listing(store.root()), before, "{name}: the store changed");
    assert!(tmp_is_empty(&store), "{name}: tmp/ not cleaned");
}

fn one_image_oci(manifest_type: &str, layer_type: &str) -> (Oci, Vec<u8>, Vec<u8>) {
    let mut oci = Oci::default();
    let tar = layer_tar(&[("f", b"data")]);
    let m = oci.manifest(manifest_type, &[(layer_type, tar.clone(), tar.clone())]);
    oci.tag(manifest_type, &m, Some("v1"));
    (oci, m, tar)
}

#[test]
fn bad_missing_manifest_json() {
    let t = TempDir::new("no-manifest");
    let p = t.path().join("a.tar");
    write_tar(&p, &[("x/layer.tar".into(), Member::File(layer_tar(&[])))]);
    refused(
        "no-manifest",
        &format!("docker-archive:{}", p.display()),
        "missing manifest.json, not a docker-archive",
    );
    let (oci, _, _) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let p2 = t.path().join("oci.tar");
    oci.write_tar(&p2);
    refused(
        "oci-as-docker",
        &format!("docker-archive:{}", p2.display()),
        "(it holds an OCI layout: use oci-archive:)",
    );
}

#[test]
fn bad_missing_index_json() {
    let t = TempDir::new("no-index");
    fs::write(
        t.path().join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    refused(
        "no-index",
        &format!("oci:{}", t.path().display()),
        &format!("{}: missing index.json", t.path().display()),
    );
    let empty = t.path().join("empty");
    fs::create_dir(&empty).unwrap();
    refused(
        "no-layout",
        &format!("oci:{}", empty.display()),
        "missing oci-layout",
    );
}

#[test]
fn bad_manifest_names_missing_blob() {
    let t = TempDir::new("missing-blob");
    let (mut oci, m, tar) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let _ = m;
    oci.blobs.remove(&sha256_of(&tar));
    oci.write_dir(t.path());
    refused(
        "missing-layer",
        &format!("oci:{}", t.path().display()),
        &format!(
            "layer {} is missing (no blobs/sha256/{})",
            sha256_of(&tar),
            sha256_of(&tar).hex()
        ),
    );
    // Legacy docker-archive naming a layer that is not in the tar.
    let (path, _, _) = legacy_archive(t.path(), |b| b.to_vec());
    let mut members = Vec::new();
    let mut ar = tar::Archive::new(fs::File::open(&path).unwrap());
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let name = e.path().unwrap().display().to_string();
        if name == "bbb/layer.tar" {
            continue;
        }
        let mut data = Vec::new();
        e.read_to_end(&mut data).unwrap();
        let m = match e.link_name().unwrap() {
            Some(l) => Member::Symlink(l.display().to_string()),
            None => Member::File(data),
        };
        members.push((name, m));
    }
    let p2 = t.path().join("holes.tar");
    write_tar(&p2, &members);
    refused(
        "docker-missing-layer",
        &format!("docker-archive:{}", p2.display()),
        "manifest.json names layer \"bbb/layer.tar\", which is not in the archive",
    );
}

#[test]
fn bad_digest_string_is_never_a_path() {
    let t = TempDir::new("digest-str");
    let mut oci = Oci::default();
    oci.index
        .push(json!({"mediaType": media::OCI_MANIFEST, "digest": "sha256:../../x", "size": 10}));
    oci.write_dir(t.path());
    refused(
        "dotdot",
        &format!("oci:{}", t.path().display()),
        "manifest descriptor digest: digest \"sha256:../../x\"",
    );
    // In a manifest's layer list too.
    let (mut oci, m, _) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let mut mv: Value = serde_json::from_slice(&m).unwrap();
    mv["layers"][0]["digest"] = json!("sha256:../../../etc/passwd");
    let m2 = serde_json::to_vec(&mv).unwrap();
    oci.add(&m2);
    oci.index.clear();
    oci.tag(media::OCI_MANIFEST, &m2, None);
    let d2 = t.path().join("l2");
    oci.write_dir(&d2);
    refused(
        "dotdot-layer",
        &format!("oci:{}", d2.display()),
        "layers[0] digest: digest \"sha256:../../../etc/passwd\"",
    );
}

#[test]
fn bad_unknown_media_type() {
    let t = TempDir::new("media");
    let (oci, _, _) = one_image_oci(
        media::OCI_MANIFEST,
        "application/vnd.example.layer.v1.squashfs",
    );
    oci.write_dir(t.path());
    refused(
        "layer-type",
        &format!("oci:{}", t.path().display()),
        "unknown media type \"application/vnd.example.layer.v1.squashfs\"",
    );
    let (oci, _, _) = one_image_oci("application/vnd.example.manifest+json", media::OCI_LAYER);
    let d2 = t.path().join("m");
    oci.write_dir(&d2);
    refused(
        "manifest-type",
        &format!("oci:{}", d2.display()),
        "unknown media type \"application/vnd.example.manifest+json\"",
    );
}

#[test]
fn bad_no_matching_platform() {
    let t = TempDir::new("platform");
    let ma = multi_arch();
    let mut oci = ma.oci.clone();
    // Keep only the arm64 entry in the index, unless the host is arm64: then only amd64.
    let mut iv: Value = serde_json::from_slice(&ma.index).unwrap();
    let keep = if Platform::host().architecture == "arm64" {
        0
    } else {
        1
    };
    let kept = iv["manifests"][keep].clone();
    iv["manifests"] = json!([kept]);
    let ix = serde_json::to_vec(&iv).unwrap();
    oci.add(&ix);
    oci.index.clear();
    oci.tag(media::OCI_INDEX, &ix, Some("only"));
    oci.write_dir(t.path());
    let other = if keep == 0 {
        "linux/amd64"
    } else {
        "linux/arm64/v8"
    };
    refused(
        "platform",
        &format!("oci:{}", t.path().display()),
        &format!(
            "no manifest for platform {} (available: {other})",
            Platform::host()
        ),
    );
}

#[test]
fn bad_layer_count_differs_from_diff_ids() {
    let t = TempDir::new("count");
    let (mut oci, m, _) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let mut mv: Value = serde_json::from_slice(&m).unwrap();
    let extra = mv["layers"][0].clone();
    mv["layers"].as_array_mut().unwrap().push(extra);
    let m2 = serde_json::to_vec(&mv).unwrap();
    oci.add(&m2);
    oci.index.clear();
    oci.tag(media::OCI_MANIFEST, &m2, None);
    oci.write_dir(t.path());
    refused(
        "count",
        &format!("oci:{}", t.path().display()),
        &format!(
            "manifest {}: 2 layers but the config lists 1 rootfs.diff_ids",
            sha256_of(&m2)
        ),
    );
    // docker-archive: manifest.json with fewer Layers than diff_ids.
    let (path, tars, config) = legacy_archive(t.path(), |b| b.to_vec());
    let _ = path;
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let p2 = t.path().join("count.tar");
    write_legacy_one(&p2, &tars[0], &cfg_name, config.clone());
    refused(
        "docker-count",
        &format!("docker-archive:{}", p2.display()),
        "manifest.json: 1 layers but the config lists 3 rootfs.diff_ids",
    );
}

#[test]
fn bad_blob_bytes_do_not_match_digest() {
    let t = TempDir::new("tamper");
    let (mut oci, m, _) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let mv: Value = serde_json::from_slice(&m).unwrap();
    let cfg: Digest = mv["config"]["digest"].as_str().unwrap().parse().unwrap();
    // Same size, different bytes.
    let b = oci.blobs.get_mut(&cfg).unwrap();
    let last = b.len() - 2;
    b[last] = b' ';
    oci.write_dir(t.path());
    refused(
        "config",
        &format!("oci:{}:v1", t.path().display()),
        &format!("config {cfg}: content digest is"),
    );

    let (mut oci, m, _) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let md = sha256_of(&m);
    oci.blobs.get_mut(&md).unwrap().push(b' ');
    let d2 = t.path().join("m");
    oci.write_dir(&d2);
    refused(
        "manifest",
        &format!("oci:{}", d2.display()),
        &format!(
            "manifest {md}: blob is {} bytes but the descriptor says {}",
            m.len() + 1,
            m.len()
        ),
    );

    // A layer whose bytes do not match: caught while copying, nothing published.
    let (mut oci, _, tar) = one_image_oci(media::OCI_MANIFEST, media::OCI_LAYER);
    let ld = sha256_of(&tar);
    let b = oci.blobs.get_mut(&ld).unwrap();
    b[600] ^= 1;
    let bad = sha256_of(b);
    let d3 = t.path().join("l");
    oci.write_dir(&d3);
    refused(
        "layer",
        &format!("oci:{}", d3.display()),
        &format!("blob digest mismatch: expected {ld}, got {bad}"),
    );

    // Legacy docker config named <hex>.json whose bytes differ.
    let (_, tars, config) = legacy_archive(t.path(), |b| b.to_vec());
    let mut wrong = config.clone();
    wrong.push(b'\n');
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let p = t.path().join("cfg.tar");
    write_legacy_one(&p, &tars[0], &cfg_name, wrong);
    refused(
        "docker-config",
        &format!("docker-archive:{}", p.display()),
        &format!("expected {}", sha256_of(&config)),
    );
    // Legacy layer whose bytes do not hash to its DiffID.
    let cfg2 = config_for(&[sha256_of(b"not this")]);
    let name2 = format!("{}.json", sha256_of(&cfg2).hex());
    let p2 = t.path().join("diffid.tar");
    write_legacy_one(&p2, &tars[0], &name2, cfg2);
    refused(
        "docker-diffid",
        &format!("docker-archive:{}", p2.display()),
        &format!(
            "layer 0 (DiffID {}): blob digest mismatch: expected {}, got {}",
            sha256_of(b"not this"),
            sha256_of(b"not this"),
            sha256_of(&tars[0])
        ),
    );
}

#[test]
fn bad_truncated_archive() {
    let t = TempDir::new("trunc");
    let ma = multi_arch();
    let p = t.path().join("img.tar");
    ma.oci.write_tar(&p);
    // Cut in the middle of the uncompressed 2048-byte layer's data.
    let layer = sha256_of(&ma.amd64_tars[1]);
    let member = format!("blobs/sha256/{}", layer.hex());
    let mut ar = tar::Archive::new(fs::File::open(&p).unwrap());
    let pos = ar
        .entries()
        .unwrap()
        .map(|e| e.unwrap())
        .find(|e| e.path().unwrap().to_str() == Some(member.as_str()))
        .map(|e| e.raw_file_position())
        .unwrap();
    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
    f.set_len(pos + 1000).unwrap();
    refused(
        "oci-archive",
        &format!("oci-archive:{}:multi", p.display()),
        &format!(
            "truncated archive: member \"{member}\" needs bytes {pos}..{} but the file has {}",
            pos + 2048,
            pos + 1000
        ),
    );
    let (legacy, _, _) = legacy_archive(t.path(), |b| b.to_vec());
    let f = fs::OpenOptions::new().write(true).open(&legacy).unwrap();
    f.set_len(700).unwrap();
    refused(
        "docker",
        &format!("docker-archive:{}", legacy.display()),
        "truncated archive: member \"aaa/layer.tar\"",
    );
}

#[test]
fn bad_symlink_out_of_archive() {
    let t = TempDir::new("escape");
    let (_, tars, config) = legacy_archive(t.path(), |b| b.to_vec());
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let p = t.path().join("esc.tar");
    write_tar(
        &p,
        &[
            ("aaa/layer.tar".into(), Member::File(tars[0].clone())),
            ("bbb/layer.tar".into(), Member::Symlink("../../../etc/passwd".into())),
            ("ccc/layer.tar".into(), Member::Symlink("/etc/passwd".into())),
            (cfg_name.clone(), Member::File(config)),
            (
                "manifest.json".into(),
                Member::File(
                    serde_json::to_vec(&json!([{"Config": cfg_name, "Layers": ["aaa/layer.tar", "bbb/layer.tar", "ccc/layer.tar"]}]))
                        .unwrap(),
                ),
            ),
        ],
    );
    refused(
        "escape",
        &format!("docker-archive:{}", p.display()),
        "member \"bbb/layer.tar\" is a symlink to \"../../../etc/passwd\", outside the archive",
    );
}

// ---------- skopeo ----------

fn skopeo_available() -> bool {
    let ok = std::process::Command::new("skopeo")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        if std::env::var("UNIONMOUNT_REQUIRE_MOUNT").as_deref() == Ok("1") {
            panic!("UNIONMOUNT_REQUIRE_MOUNT=1 but skopeo is not installed");
        }
        eprintln!("SKIP: skopeo_converts_to_docker_and_oci_archives: skopeo not installed");
    }
    ok
}

#[test]
fn skopeo_converts_to_docker_and_oci_archives() {
    if !skopeo_available() {
        return;
    }
    let t = TempDir::new("skopeo");
    let mut oci = Oci::default();
    let tars = [
        layer_tar(&[("a", b"one")]),
        layer_tar(&[("b", b"two"), ("c", b"three")]),
    ];
    let m = oci.manifest(
        media::OCI_MANIFEST,
        &[
            (media::OCI_LAYER_GZIP, gzip(&tars[0]), tars[0].clone()),
            (media::OCI_LAYER_GZIP, gzip(&tars[1]), tars[1].clone()),
        ],
    );
    oci.tag(media::OCI_MANIFEST, &m, Some("v1"));
    let a = t.path().join("a");
    oci.write_dir(&a);
    let b = t.path().join("b.tar");
    let c = t.path().join("c.tar");
    for dest in [
        format!("docker-archive:{}:example/app:v1", b.display()),
        format!("oci-archive:{}:v1", c.display()),
    ] {
        let out = std::process::Command::new("skopeo")
            .args([
                "--insecure-policy",
                "copy",
                "-q",
                &format!("oci:{}:v1", a.display()),
                &dest,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy to {dest}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let want: Vec<Digest> = tars.iter().map(|t| sha256_of(t)).collect();
    let orig = image::resolve(&src(format!("oci:{}:v1", a.display())), None).unwrap();
    let from_docker =
        image::resolve(&src(format!("docker-archive:{}", b.display())), None).unwrap();
    let from_oci = image::resolve(&src(format!("oci-archive:{}:v1", c.display())), None).unwrap();
    assert_eq!(diff_ids(&orig), want);
    assert_eq!(diff_ids(&from_docker), want);
    assert_eq!(diff_ids(&from_oci), want);
    // skopeo writes the normalised reference; the short form still picks it.
    assert_eq!(from_docker.tag.as_deref(), Some("docker.io/example/app:v1"));
    let short = src(format!("docker-archive:{}:example/app:v1", b.display()));
    assert_eq!(diff_ids(&image::resolve(&short, None).unwrap()), want);
    assert_eq!(
        from_oci.layers.iter().map(|l| l.digest).collect::<Vec<_>>(),
        orig.layers.iter().map(|l| l.digest).collect::<Vec<_>>()
    );
    let st = TempDir::new("skopeo-store");
    let store = Store::open_or_create(st.path()).unwrap();
    for (name, s) in [
        ("b", format!("docker-archive:{}", b.display())),
        ("c", format!("oci-archive:{}:v1", c.display())),
    ] {
        let imp = store.import(&src(s), Some(name)).unwrap();
        assert_eq!(
            imp.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>(),
            want
        );
    }
    assert!(store.verify().unwrap().bad.is_empty());
}

/// index.json listing per-platform manifests directly (no nested index), no tag given.
#[test]
fn oci_top_level_platform_entries_pick_by_platform() {
    let t = TempDir::new("toplevel");
    let ma = multi_arch();
    let mut oci = ma.oci.clone();
    let iv: Value = serde_json::from_slice(&ma.index).unwrap();
    oci.index = iv["manifests"].as_array().unwrap().clone();
    oci.write_dir(t.path());
    let s = src(format!("oci:{}", t.path().display()));
    let arm = Platform::parse("linux/arm64/v8").unwrap();
    let amd = Platform::parse("linux/amd64").unwrap();
    let got = image::resolve(&s, Some(&arm)).unwrap();
    assert_eq!(got.manifest_digest(), Some(sha256_of(&ma.arm64)));
    assert_eq!(got.tag, None);
    let got = image::resolve(&s, Some(&amd)).unwrap();
    assert_eq!(got.manifest_digest(), Some(sha256_of(&ma.amd64)));
    let e = image::resolve(&s, Some(&Platform::parse("linux/arm/v7").unwrap()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("index.json: no manifest for platform linux/arm/v7 (available: linux/amd64, linux/arm64/v8)"),
        "{e}"
    );
    // Imported without a tag, the image is named by its manifest digest.
    let st = TempDir::new("toplevel-store");
    let store = Store::open_or_create(st.path()).unwrap();
    let imp = store
        .import_resolved(&image::resolve(&s, Some(&amd)).unwrap(), None)
        .unwrap();
    assert_eq!(imp.name, sha256_of(&ma.amd64).to_string());
    assert_tagged(&store, &imp.name, &imp.manifest_digest);
    let back = store.resolve(&imp.name, None).unwrap();
    assert_eq!(back.manifest_digest(), Some(imp.manifest_digest));
}

/// A duplicated legacy layer stored as a hard link to the first layer.tar.
#[test]
fn legacy_docker_archive_with_hardlinked_duplicate_layer() {
    let t = TempDir::new("hardlink");
    let a = layer_tar(&[("a", b"A")]);
    let config = config_for(&[sha256_of(&a), sha256_of(&a)]);
    let cfg_name = format!("{}.json", sha256_of(&config).hex());
    let path = t.path().join("h.tar");
    let mut b = tar::Builder::new(fs::File::create(&path).unwrap());
    let mut h = tar::Header::new_gnu();
    h.set_size(a.len() as u64);
    h.set_mode(0o644);
    b.append_data(&mut h, "one/layer.tar", a.as_slice())
        .unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "two/layer.tar", "one/layer.tar")
        .unwrap();
    for (name, data) in [
        (cfg_name.clone(), config.clone()),
        (
            "manifest.json".to_string(),
            serde_json::to_vec(
                &json!([{"Config": cfg_name, "Layers": ["one/layer.tar", "two/layer.tar"]}]),
            )
            .unwrap(),
        ),
    ] {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.finish().unwrap();
    let img = image::resolve(&src(format!("docker-archive:{}", path.display())), None).unwrap();
    assert_eq!(img.tag, None);
    assert_eq!(img.layers.len(), 2);
    assert_eq!(read_blob(&img.layers[1].source), a);
    assert_eq!(img.layers[1].source, img.layers[0].source);
}
