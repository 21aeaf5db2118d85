//! Fuzz target bodies: one function per target, each taking arbitrary bytes. The cargo-fuzz
//! targets in `fuzz/fuzz_targets/` and the regression test `tests/fuzz_regressions.rs` both
//! call these, so what the fuzzer explored and what CI replays cannot drift apart.
//!
//! Invariants: a body panics only to report a broken property (an `assert!` here, or a panic
//! inside the code under test); it never panics on its input for any other reason. Each
//! body checks properties, not just "no panic": round trips (options, digests, image
//! sources, the index cache), equality with a reference decoder (flate2 for gzip), the
//! documented invariants of what was built (layer index paths, order, contents), and that
//! errors are one line. Temporary files live in a fresh directory per call (unique per
//! process and call, so parallel tests do not collide) and are removed before returning.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::image::{self, ImageRef, ImageSource, Platform};
use crate::options::{self, parse_options, split_layer_list};
use crate::store::gzindex::{self, GzReader, SPAN, WINDOW};
use crate::store::layerindex::{self, Entry, Kind, LayerIndex};
use crate::store::{Compression, Digest, LayerSource, Limits, index_layer};

/// A target body: arbitrary bytes in, a panic only for a broken property.
pub type Body = fn(&[u8]);

/// Every target, by the name of its directory under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Body)] = &[
    ("options", options),
    ("digest", digest),
    ("manifest", manifest),
    ("tar_index", tar_index),
    ("gzip_checkpoints", gzip_checkpoints),
    ("layer_index_file", layer_index_file),
    ("whiteout", whiteout),
];

fn assert_one_line(what: &str, msg: &str) {
    assert!(
        !msg.contains('\n'),
        "{what}: error is not one line: {msg:?}"
    );
    assert!(!msg.is_empty(), "{what}: empty error message");
}

fn sha256(data: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(data).into())
}

/// A fresh directory under the temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "unionmount-fuzz-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("creating a scratch directory");
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A small deterministic generator for offsets, seeded from the input.
struct Rng(u64);

impl Rng {
    fn new(data: &[u8]) -> Rng {
        let h: [u8; 32] = Sha256::digest(data).into();
        Rng(u64::from_le_bytes(h[..8].try_into().unwrap_or_default()) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}

/// Reference decode of a (multi-member) gzip stream, at most `cap` bytes of output.
fn flate2_decode(blob: &[u8], cap: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut d = flate2::read::MultiGzDecoder::new(blob).take(cap + 1);
    d.read_to_end(&mut out).ok()?;
    (out.len() as u64 <= cap).then_some(out)
}

fn gzip(data: &[u8], level: u32) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level.min(9)));
    e.write_all(data).expect("gzip into memory");
    e.finish().expect("gzip into memory")
}

// ---------------------------------------------------------------------------------------
// options: `-o` strings, layer lists, image source and platform strings, the command line.

/// Escapes a path for a `lowerdir=`/`upperdir=` value inside one `-o` argument.
fn escape_value(p: &Path) -> String {
    let mut s = String::new();
    for c in p.to_string_lossy().chars() {
        if matches!(c, '\\' | ':' | ',' | '"') {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

/// `-o` option strings (NUL separates arguments), `--layers` lists, `--image` source strings,
/// `--platform` strings and whole command lines. Properties: parsed layer paths and upper
/// paths survive escaping and re-parsing unchanged; an image source and a platform survive
/// `Display` and re-parsing; errors are one line (for input without control characters).
pub fn options(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let plain = !text.chars().any(char::is_control);
    let args: Vec<&str> = text.split('\0').collect();
    match parse_options(&args) {
        Ok(o) => {
            if !o.lowers.is_empty() {
                let list: Vec<String> = o.lowers.iter().map(|p| escape_value(p)).collect();
                let again = parse_options(&[&format!("lowerdir={}", list.join(":"))])
                    .unwrap_or_else(|e| panic!("re-parsing lowerdir {list:?}: {e}"));
                assert_eq!(again.lowers, o.lowers, "lowerdir round trip");
            }
            if let Some(u) = &o.upper {
                let v = escape_value(u);
                let again = parse_options(&[&format!("upperdir={v}")])
                    .unwrap_or_else(|e| panic!("re-parsing upperdir {v:?}: {e}"));
                assert_eq!(again.upper.as_ref(), Some(u), "upperdir round trip");
            }
            if let Err(e) = o.validate_combination()
                && plain
            {
                assert_one_line("validate_combination", &e.to_string());
            }
        }
        Err(e) if plain => assert_one_line("parse_options", &e.to_string()),
        Err(_) => {}
    }
    match split_layer_list("--layers", text) {
        Ok(layers) => {
            assert!(layers.iter().all(|l| !l.as_os_str().is_empty()));
            let list: Vec<String> = layers.iter().map(|p| escape_value(p)).collect();
            let again = options::split_layer_list("--layers", &list.join(":"))
                .unwrap_or_else(|e| panic!("re-parsing layer list {list:?}: {e}"));
            assert_eq!(again, layers, "layer list round trip");
        }
        Err(e) if plain => assert_one_line("split_layer_list", &e.to_string()),
        Err(_) => {}
    }
    match ImageSource::parse(text) {
        Ok(src) => {
            let shown = src.to_string();
            let again = ImageSource::parse(&shown).unwrap_or_else(|e| {
                panic!("re-parsing image source {shown:?} (from {text:?}): {e}")
            });
            assert_eq!(again, src, "image source round trip through {shown:?}");
        }
        Err(e) if plain => assert_one_line("ImageSource::parse", &e.to_string()),
        Err(_) => {}
    }
    if let Ok(p) = Platform::parse(text) {
        let shown = p.to_string();
        assert_eq!(Platform::parse(&shown).ok(), Some(p), "platform round trip");
    }
    let mut argv = vec![OsString::from("unionmount")];
    argv.extend(args.iter().map(OsString::from));
    if let Err(msg) = crate::cli::check_command_line(&argv)
        && plain
    {
        assert_one_line("command line", &msg);
    }
}

// ---------------------------------------------------------------------------------------
// digest

fn is_canonical_digest(s: &str) -> bool {
    s.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

/// `Digest` parsing. Properties: a string parses exactly when it is `sha256:` and 64
/// lowercase hex digits, and then prints back to itself; `parse_hex` agrees; digests made from
/// bytes round-trip through text; errors are one line.
pub fn digest(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        match s.parse::<Digest>() {
            Ok(d) => {
                assert!(is_canonical_digest(s), "accepted {s:?}");
                assert_eq!(d.to_string(), s);
                assert_eq!(Digest::parse_hex(&d.hex()), Ok(d));
                assert_eq!(d.rel_path(), Path::new("sha256").join(d.hex()));
            }
            Err(e) => {
                assert!(!is_canonical_digest(s), "refused {s:?}: {e}");
                assert_one_line("digest", &e.to_string());
            }
        }
        match Digest::parse_hex(s) {
            Ok(d) => assert_eq!(d.hex(), s),
            Err(e) => {
                assert!(
                    !is_canonical_digest(&format!("sha256:{s}")),
                    "refused hex {s:?}"
                );
                assert_one_line("parse_hex", &e.to_string());
            }
        }
    }
    if data.len() >= 32 {
        let mut b = [0u8; 32];
        b.copy_from_slice(&data[..32]);
        let d = Digest::from_bytes(b);
        let s = d.to_string();
        assert!(is_canonical_digest(&s), "{s}");
        assert_eq!(s.parse::<Digest>(), Ok(d));
        assert_eq!(d.as_bytes(), &b);
    }
}

// ---------------------------------------------------------------------------------------
// manifest: OCI layouts (directory and archive) and docker-archives built from the input.

/// Separates the parts of a manifest input.
pub const PART_SEP: &[u8] = b"\n--\n";
const MAX_PARTS: usize = 9;

fn split_parts(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < MAX_PARTS {
        match rest.windows(PART_SEP.len()).position(|w| w == PART_SEP) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + PART_SEP.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// Replaces `{dN}` (digest), `{hN}` (hex) and `{sN}` (size) of blob N, for N in `refs`.
fn substitute(part: &[u8], blobs: &[Option<Vec<u8>>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(part.len());
    let mut i = 0;
    while i < part.len() {
        if part[i] == b'{'
            && i + 3 < part.len()
            && part[i + 3] == b'}'
            && matches!(part[i + 1], b'd' | b'h' | b's')
            && part[i + 2].is_ascii_digit()
            && let Some(Some(blob)) = blobs.get(usize::from(part[i + 2] - b'0'))
        {
            let d = sha256(blob);
            match part[i + 1] {
                b'd' => out.extend_from_slice(d.to_string().as_bytes()),
                b'h' => out.extend_from_slice(d.hex().as_bytes()),
                _ => out.extend_from_slice(blob.len().to_string().as_bytes()),
            }
            i += 4;
            continue;
        }
        out.push(part[i]);
        i += 1;
    }
    out
}

fn tar_of(files: &[(String, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, name, *data).expect("tar into memory");
    }
    b.into_inner().expect("tar into memory")
}

/// Image manifests, indexes, configs and docker-archive `manifest.json`, resolved as
/// `--image` does. Input: a mode byte, then parts separated by [`PART_SEP`]: part 0 is
/// `index.json` (OCI) or `manifest.json` (docker-archive), parts 1.. are blobs stored under
/// their real sha256 (and, in a docker-archive, also as `<hex>.json` and `<N>/layer.tar`). In
/// a part, `{dN}`, `{hN}` and `{sN}` become blob N's digest, hex and size (a blob may only
/// name blobs after it). Mode bits 0-1: OCI directory, OCI archive, docker-archive; bits 2-3:
/// default image, tag `latest`, digest of blob 1, tag `busybox`.
///
/// Properties: on success the manifest and config are byte-for-byte blobs whose sha256 is
/// their digest, there is one layer per `rootfs.diff_ids` entry with that diff_id, every
/// layer's bytes are a blob of the stated size (and hash to the stated digest), and the
/// compression follows the media type (or the magic bytes in a docker-archive); errors are
/// one line.
pub fn manifest(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let raw = split_parts(rest);
    let mut blobs: Vec<Option<Vec<u8>>> = vec![None; raw.len()];
    for k in (1..raw.len()).rev() {
        let b = substitute(raw[k], &blobs);
        blobs[k] = Some(b);
    }
    let top = substitute(raw[0], &blobs);
    let blobs: Vec<Vec<u8>> = blobs.into_iter().flatten().collect();
    let reference = match (mode >> 2) & 3 {
        0 => ImageRef::Default,
        1 => ImageRef::Tag("latest".into()),
        2 => match blobs.first() {
            Some(b) => ImageRef::Digest(sha256(b)),
            None => ImageRef::Default,
        },
        _ => ImageRef::Tag("busybox".into()),
    };
    let scratch = Scratch::new("manifest");
    const LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
    let kind = mode & 3;
    let source = match kind {
        0 | 3 => {
            let dir = scratch.0.join("layout");
            fs::create_dir_all(dir.join("blobs/sha256")).expect("scratch layout");
            fs::write(dir.join("oci-layout"), LAYOUT).expect("scratch layout");
            fs::write(dir.join("index.json"), &top).expect("scratch layout");
            for b in &blobs {
                fs::write(dir.join("blobs/sha256").join(sha256(b).hex()), b)
                    .expect("scratch layout");
            }
            ImageSource::Oci { dir, reference }
        }
        _ => {
            let mut files: Vec<(String, &[u8])> = Vec::new();
            if kind == 1 {
                files.push(("oci-layout".into(), LAYOUT));
                files.push(("index.json".into(), &top));
            } else {
                files.push(("manifest.json".into(), &top));
            }
            for (i, b) in blobs.iter().enumerate() {
                let hex = sha256(b).hex();
                files.push((format!("blobs/sha256/{hex}"), b));
                if kind == 2 {
                    files.push((format!("{hex}.json"), b));
                    files.push((format!("{}/layer.tar", i + 1), b));
                }
            }
            let path = scratch.0.join("image.tar");
            fs::write(&path, tar_of(&files)).expect("scratch archive");
            if kind == 1 {
                ImageSource::OciArchive { path, reference }
            } else {
                let reference = match reference {
                    ImageRef::Digest(_) => ImageRef::Default,
                    r => r,
                };
                ImageSource::DockerArchive { path, reference }
            }
        }
    };
    let img = match image::resolve(&source, Some(&Platform::host())) {
        Ok(img) => img,
        Err(e) => {
            assert_one_line("image::resolve", &e.to_string());
            return;
        }
    };
    let is_blob = |bytes: &[u8]| blobs.iter().any(|b| b == bytes) || bytes == top.as_slice();
    assert_eq!(sha256(&img.config), img.config_digest, "config digest");
    assert!(is_blob(&img.config), "config is not one of the blobs");
    if let Some(m) = &img.manifest {
        assert_eq!(sha256(&m.bytes), m.digest, "manifest digest");
        assert!(is_blob(&m.bytes), "manifest is not one of the blobs");
    }
    // Only the fields the reader needs: a config may hold anything else, even strings that
    // serde_json accepts when skipping a field but not as a `Value` (a lone surrogate).
    #[derive(serde::Deserialize)]
    struct Config {
        rootfs: RootFs,
    }
    #[derive(serde::Deserialize)]
    struct RootFs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    let config: Config =
        serde_json::from_slice(&img.config).expect("an accepted config has rootfs.diff_ids");
    let ids = config.rootfs.diff_ids;
    assert_eq!(ids.len(), img.layers.len(), "one layer per diff_id");
    for (l, id) in img.layers.iter().zip(&ids) {
        assert_eq!(&l.diff_id.to_string(), id);
        let mut bytes = Vec::new();
        l.source
            .open()
            .and_then(|mut r| r.read_to_end(&mut bytes))
            .expect("reading a resolved layer");
        assert_eq!(bytes.len() as u64, l.size, "layer size");
        assert!(is_blob(&bytes), "layer is not one of the blobs");
        if let Some(d) = l.digest {
            assert_eq!(sha256(&bytes), d, "layer digest");
        }
        match &l.media_type {
            Some(mt) => assert_eq!(image::media::layer_compression(mt), Some(l.compression)),
            None => assert_eq!(Compression::sniff(&bytes), l.compression),
        }
    }
}

// ---------------------------------------------------------------------------------------
// tar_index: the layer indexer over arbitrary bytes.

/// Checks the documented invariants of a layer index, and that every file's content can be
/// read back from `blob` (verified against its sha256 by `read_file`).
fn check_index(ix: &LayerIndex, blob: &[u8]) {
    assert_eq!(ix.root().path.len(), 0);
    assert_eq!(ix.root().kind, Kind::Dir);
    let mut prev: Option<(&[u8], &[u8])> = None;
    for (i, e) in ix.entries().iter().enumerate() {
        let p = &*e.path;
        let shown = layerindex::shown(p);
        assert!(!p.is_empty(), "empty path");
        for c in p.split(|&b| b == b'/') {
            assert!(
                !c.is_empty() && c != b"." && c != b".." && c.len() <= 255 && !c.contains(&0),
                "path {shown} is not normalized"
            );
        }
        let key = (e.parent(), e.name());
        if let Some(prev) = prev {
            assert!(prev < key, "entries out of order at {shown}");
        }
        prev = Some(key);
        assert!(
            !e.name().starts_with(b".wh."),
            "whiteout marker {shown} kept as an entry"
        );
        assert_eq!(
            ix.lookup_pos(e.parent(), e.name()),
            Some(i),
            "lookup {shown}"
        );
        let parent = ix.get(e.parent());
        assert!(
            parent.is_some_and(|d| d.kind == Kind::Dir),
            "parent of {shown} is not a directory in the index"
        );
        assert!(ix.children(e.parent()).iter().any(|c| c.path == e.path));
        assert!(ix.nlink(e) >= 1);
        if e.hardlink_target.is_some() {
            assert_ne!(e.link_group, 0, "hard link {shown} without a link group");
        }
        match e.kind {
            Kind::File => {
                assert!(e.sha256.is_some(), "file {shown} without sha256");
                assert!(
                    e.offset
                        .checked_add(e.size)
                        .is_some_and(|end| end <= ix.tar_size),
                    "file {shown} runs past the stream"
                );
                let got = ix
                    .read_file(e, blob)
                    .unwrap_or_else(|err| panic!("reading back {shown}: {err}"));
                assert_eq!(got.len() as u64, e.size);
            }
            Kind::Symlink => {
                let t = e.link_target.as_deref().unwrap_or_default();
                assert!(e.link_target.is_some(), "symlink {shown} without target");
                assert_eq!(e.size, t.len() as u64, "symlink {shown} size");
            }
            _ => assert!(e.sha256.is_none(), "{shown}: a non-file with a sha256"),
        }
    }
    let again = LayerIndex::decode(&ix.encode(), &ix.layer).expect("decoding our own encoding");
    assert_eq!(&again, ix, "index cache round trip");
}

/// The layer indexer. Input: a mode byte, then the layer. Mode bits 0-1: plain tar, the
/// input gzip-compressed here (level from bits 2-5), the input zstd-compressed here, or the
/// input as the blob with its compression sniffed from the magic bytes; bit 7: small
/// `Limits`. The layer digest and DiffID are computed here, so only the tar (and, for a raw
/// compressed blob, the compressed stream) can be at fault.
///
/// Properties: on success the index holds the documented invariants (normalized unique
/// sorted paths, parents are directories, no `.wh.` entries, files inside the stream whose
/// contents read back and match their sha256, symlink sizes), sizes and digests are the
/// blob's, and the cache encoding round-trips; errors are one line.
pub fn tar_index(data: &[u8]) {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let (blob, compression, tar): (Vec<u8>, Compression, Option<&[u8]>) = match mode & 3 {
        0 => (body.to_vec(), Compression::None, Some(body)),
        1 => (
            gzip(body, u32::from(mode >> 2) & 15),
            Compression::Gzip,
            Some(body),
        ),
        2 => (
            zstd::stream::encode_all(body, 1).expect("zstd into memory"),
            Compression::Zstd,
            Some(body),
        ),
        _ => (body.to_vec(), Compression::sniff(body), None),
    };
    let decoded: Option<Vec<u8>> = match (tar, compression) {
        (Some(t), _) => Some(t.to_vec()),
        (None, Compression::None) => Some(body.to_vec()),
        (None, Compression::Gzip) => flate2_decode(&blob, 64 << 20),
        (None, Compression::Zstd) => {
            let mut out = Vec::new();
            zstd::stream::read::Decoder::new(&blob[..])
                .ok()
                .and_then(|d| d.take(64 << 20).read_to_end(&mut out).ok())
                .map(|_| out)
        }
    };
    let layer = sha256(&blob);
    let diff_id = decoded
        .as_deref()
        .map_or(Digest::from_bytes([0; 32]), sha256);
    let src = LayerSource {
        compression,
        layer,
        diff_id,
        size: blob.len() as u64,
    };
    let limits = if mode & 0x80 != 0 {
        Limits {
            max_entries: 8,
            max_file_size: 4096,
            max_pax_size: 512,
            max_long_name: 300,
            max_metadata: 2048,
        }
    } else {
        Limits::default()
    };
    let ix = match index_layer(&blob[..], &src, &limits, &mut |_, _| {}) {
        Ok(ix) => ix,
        Err(e) => {
            assert_one_line("index_layer", &e.to_string());
            return;
        }
    };
    assert_eq!(ix.layer, layer);
    assert_eq!(ix.diff_id, diff_id);
    assert_eq!(ix.compression, compression);
    assert_eq!(ix.blob_size, blob.len() as u64);
    if let Some(d) = &decoded {
        assert_eq!(ix.tar_size, d.len() as u64, "tar_size");
    }
    check_index(&ix, &blob);
}

// ---------------------------------------------------------------------------------------
// gzip_checkpoints: the zran reader against flate2.

/// The gzip checkpoint reader. Input: a mode byte, a parameter byte, then data. Mode bit 0
/// clear: the data, repeated up to `((mode >> 1) & 15) * 160 KiB` (so up to two checkpoints
/// exist), is gzip-compressed here at level `param & 15` (0-9), as one member or, with
/// `param & 0x10`, two members split at a point the data picks. Mode bit 0 set: the data is
/// taken as the gzip blob itself.
///
/// Properties: the indexing pass yields exactly the reference output (the original data, or
/// flate2's decode when flate2 accepts the blob, and never fails where flate2 succeeds);
/// checkpoints are ordered, about `SPAN` apart, with windows of at most `WINDOW` bytes; reads
/// resumed from every checkpoint, and reads of random ranges through
/// `LayerIndex::read_file` (which picks the checkpoint), give the same bytes.
pub fn gzip_checkpoints(data: &[u8]) {
    let [mode, param, rest @ ..] = data else {
        return;
    };
    let (blob, expect) = if mode & 1 == 0 {
        let want = usize::from((mode >> 1) & 15) * (160 << 10);
        let mut plain = rest.to_vec();
        if !rest.is_empty() {
            while plain.len() < want {
                plain.extend_from_slice(rest);
            }
        }
        let level = u32::from(param & 15).min(9);
        let blob = if param & 0x10 != 0 && !plain.is_empty() {
            let cut = Rng::new(rest).below(plain.len() as u64 + 1) as usize;
            let mut b = gzip(&plain[..cut], level);
            b.extend_from_slice(&gzip(&plain[cut..], level));
            b
        } else {
            gzip(&plain, level)
        };
        (blob, Some(plain))
    } else {
        (rest.to_vec(), flate2_decode(rest, 64 << 20))
    };
    let mut r = match GzReader::indexing(&blob[..]) {
        Ok(r) => r,
        Err(e) => panic!("starting an indexing reader: {e}"),
    };
    let mut out = Vec::new();
    let res = (&mut r).take(65 << 20).read_to_end(&mut out);
    let cps = r.take_checkpoints();
    let out = match (res, expect) {
        (Ok(_), Some(want)) => {
            assert!(out == want, "gzip output differs from the reference decode");
            out
        }
        (Ok(_), None) => out,
        (Err(e), Some(_)) => panic!("gzip reader failed where the reference decodes: {e}"),
        (Err(e), None) => {
            assert_one_line("gzip", &e.to_string());
            return;
        }
    };
    if out.len() > 64 << 20 {
        return;
    }
    let mut last = 0u64;
    for cp in &cps {
        assert!(cp.out >= last + SPAN, "checkpoints closer than SPAN");
        assert!(cp.out <= out.len() as u64);
        assert!(cp.input <= blob.len() as u64);
        assert!(cp.bits < 8);
        assert!(cp.window.len() <= WINDOW);
        assert_eq!(gzindex::checkpoint_for(&cps, cp.out), Some(cp));
        last = cp.out;
        // Resume and read on (past a member end, if one follows): the same bytes as the
        // sequential pass.
        let at = (cp.input - u64::from(cp.bits > 0)) as usize;
        let mut rr = GzReader::resume(&blob[at..], cp)
            .unwrap_or_else(|e| panic!("resuming at {}: {e}", cp.out));
        assert_eq!(rr.out_pos(), cp.out);
        let n = (256 << 10).min(out.len() - cp.out as usize);
        let mut got = vec![0u8; n];
        rr.read_exact(&mut got)
            .unwrap_or_else(|e| panic!("reading after checkpoint {}: {e}", cp.out));
        assert!(
            got[..] == out[cp.out as usize..cp.out as usize + n],
            "bytes after checkpoint {} differ",
            cp.out
        );
    }
    // Random ranges, read as files of a layer index (the production read path).
    let mut rng = Rng::new(data);
    let mut entries = Vec::new();
    for k in 0..8 {
        let off = rng.below(out.len() as u64 + 1);
        let len = rng.below((out.len() as u64 - off).min(256 << 10) + 1);
        let bytes = &out[off as usize..(off + len) as usize];
        entries.push(Entry {
            kind: Kind::File,
            size: len,
            offset: off,
            sha256: Some(sha256(bytes)),
            synthesized: false,
            ..Entry::synthesized_dir(format!("f{k}").as_bytes())
        });
    }
    let ix = LayerIndex::from_parts(
        sha256(&blob),
        sha256(&out),
        Compression::Gzip,
        blob.len() as u64,
        out.len() as u64,
        Entry::synthesized_dir(b""),
        entries,
        cps,
    );
    for e in ix.entries() {
        let got = ix
            .read_file(e, &blob[..])
            .unwrap_or_else(|err| panic!("range {}+{}: {err}", e.offset, e.size));
        assert!(
            got[..] == out[e.offset as usize..(e.offset + e.size) as usize],
            "range {}+{} differs",
            e.offset,
            e.size
        );
    }
}

// ---------------------------------------------------------------------------------------
// layer_index_file: the on-disk index cache reader.

/// The index cache reader. Input: a mode byte, then bytes. Mode bit 0 clear: the bytes are
/// the whole file; set: they are the body, framed here with the magic, the version and a
/// correct checksum so that the body parser is reached. The layer digest the reader expects
/// is taken from the file (bytes 12..44) when there are enough bytes.
///
/// Properties: never a panic or an allocation sized by a field; an accepted file re-encodes
/// to a file that decodes to the same index (and encodes to the same bytes again); every
/// lookup on an accepted index answers without panicking, and reading a file's contents from
/// unrelated bytes fails cleanly; errors are one line.
pub fn layer_index_file(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        let mut f = layerindex::MAGIC.to_vec();
        f.extend_from_slice(&layerindex::VERSION.to_le_bytes());
        f.extend_from_slice(rest);
        let sum: [u8; 32] = Sha256::digest(&f).into();
        f.extend_from_slice(&sum);
        f
    };
    let mut want = [0u8; 32];
    if file.len() >= 44 {
        want.copy_from_slice(&file[12..44]);
    }
    let layer = Digest::from_bytes(want);
    let ix = match LayerIndex::decode(&file, &layer) {
        Ok(ix) => ix,
        Err(e) => {
            assert_one_line("LayerIndex::decode", &e);
            return;
        }
    };
    let enc = ix.encode();
    let again = LayerIndex::decode(&enc, &layer).expect("decoding a re-encoded index");
    assert_eq!(again, ix, "index cache round trip");
    assert!(again.encode() == enc, "encoding is not stable");
    for e in ix.entries() {
        let _ = ix.get(&e.path);
        let _ = ix.lookup(e.parent(), e.name());
        let _ = ix.children(e.parent());
        let _ = ix.children(&e.path);
        let _ = ix.nlink(e);
    }
    let _ = ix.get(b"");
    // Contents read from bytes that are not the layer: an error (or, by chance, a file of
    // the right digest), never a panic. Only the first few files, to bound the work.
    for e in ix.entries().iter().filter(|e| e.sha256.is_some()).take(4) {
        if let Err(err) = ix.read_file(e, rest) {
            assert_one_line("read_file", &err.to_string());
        }
    }
}

// ---------------------------------------------------------------------------------------
// whiteout: the whiteout/opaque dialect reader, on a real directory.

const OPAQUE_NAMES: [&str; 3] = [
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];

fn set_xattr(t: crate::sys::XTarget, name: &str, value: &[u8]) -> bool {
    crate::sys::setxattr(t, name.as_bytes(), value, 0).is_ok()
}

/// The whiteout and opaque dialects. Input: a byte giving the directory's opaque xattrs (two
/// bits each for `trusted.overlay.opaque`, `user.overlay.opaque`, `user.fuseoverlayfs.opaque`:
/// absent, `y`, `x`, `n`), a byte of writer settings, then entries separated by `/`, each a
/// type byte and a name. Types (mod 10): empty file, non-empty file, directory, char device
/// 0/0, char device 1/3, empty file with `trusted.overlay.whiteout`, empty file with
/// `user.overlay.whiteout`, non-empty file with `user.overlay.whiteout`, symlink, FIFO.
///
/// Properties (against a model of what was created): `dir_marks` is opaque exactly when an
/// opaque xattr is `y` or `.wh..wh..opq` exists, and allows xattr whiteouts exactly when one
/// is `x`; `is_whiteout` holds exactly for 0/0 char devices and, in such a directory, for
/// empty regular files with a whiteout xattr; `oci_whiteout_target` inverts `oci_name`.
/// Then the marker writer (settings byte: chardev or not, with or without a workdir, trusted
/// or user namespace) writes a whiteout and an opaque mark, and the reader sees them.
pub fn whiteout(data: &[u8]) {
    use crate::layer::{LDir, check_name};
    use crate::sys::XTarget;
    use crate::union::whiteout::{
        MarkerWriter, OPAQUE_MARKER, dir_marks, is_whiteout, oci_name, oci_whiteout_target,
    };
    use nix::fcntl::OFlag;
    use nix::sys::stat::{Mode, SFlag};

    let [marks_byte, writer, rest @ ..] = data else {
        return;
    };
    let scratch = Scratch::new("whiteout");
    let dir = scratch.0.join("d");
    fs::create_dir(&dir).expect("scratch dir");
    let open_dir = |p: &Path| -> LDir {
        let fd = nix::fcntl::open(p, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
            .expect("opening the scratch dir");
        LDir::Fd(Arc::new(fd))
    };
    let ld = open_dir(&dir);
    let dirfd = ld.fd().expect("on-disk dir");
    let (mut want_opaque, mut want_x) = (false, false);
    for (i, name) in OPAQUE_NAMES.iter().enumerate() {
        let value: &[u8] = match (marks_byte >> (2 * i)) & 3 {
            0 => continue,
            1 => b"y",
            2 => b"x",
            _ => b"n",
        };
        if set_xattr(XTarget::Fd(dirfd), name, value) {
            want_opaque |= value == b"y";
            want_x |= value == b"x";
        }
    }
    // name -> expected is_whiteout
    let mut made: Vec<(OsString, bool)> = Vec::new();
    for item in rest.split(|&b| b == b'/').take(32) {
        let Some((&ty, name)) = item.split_first() else {
            continue;
        };
        let name = OsStr::from_bytes(name);
        if check_name(name).is_err() || name.len() > 255 || made.iter().any(|(n, _)| n == name) {
            continue;
        }
        let p = dir.join(name);
        let file = |content: &[u8]| fs::write(&p, content).is_ok();
        let (ok, empty_file, wh_xattr, chardev00) = match ty % 10 {
            0 => (file(b""), true, false, false),
            1 => (file(b"data"), false, false, false),
            2 => (fs::create_dir(&p).is_ok(), false, false, false),
            3 => (
                nix::sys::stat::mknod(&p, SFlag::S_IFCHR, Mode::empty(), 0).is_ok(),
                false,
                false,
                true,
            ),
            4 => (
                nix::sys::stat::mknod(
                    &p,
                    SFlag::S_IFCHR,
                    Mode::from_bits_truncate(0o600),
                    nix::sys::stat::makedev(1, 3),
                )
                .is_ok(),
                false,
                false,
                false,
            ),
            5 => {
                let ok = file(b"");
                (
                    ok,
                    true,
                    ok && set_xattr(XTarget::At(dirfd, name), "trusted.overlay.whiteout", b""),
                    false,
                )
            }
            6 => {
                let ok = file(b"");
                (
                    ok,
                    true,
                    ok && set_xattr(XTarget::At(dirfd, name), "user.overlay.whiteout", b""),
                    false,
                )
            }
            7 => {
                let ok = file(b"x");
                (
                    ok,
                    false,
                    ok && set_xattr(XTarget::At(dirfd, name), "user.overlay.whiteout", b""),
                    false,
                )
            }
            8 => (
                std::os::unix::fs::symlink("target", &p).is_ok(),
                false,
                false,
                false,
            ),
            _ => (
                nix::unistd::mkfifo(&p, Mode::from_bits_truncate(0o600)).is_ok(),
                false,
                false,
                false,
            ),
        };
        if !ok {
            let _ = fs::remove_file(&p);
            continue;
        }
        made.push((name.to_os_string(), chardev00 || (empty_file && wh_xattr)));
        if name.as_bytes() == OPAQUE_MARKER {
            want_opaque = true;
        }
    }
    let marks = dir_marks(&ld).expect("dir_marks");
    assert_eq!(marks.opaque, want_opaque, "opaque");
    assert_eq!(marks.xattr_whiteouts, want_x, "xattr whiteouts");
    for (name, expected) in &made {
        // The xattr dialect applies only inside an `overlay.opaque=x` directory.
        let expected = *expected && (want_x || !is_xattr_only(&dir.join(name)));
        let st = ld.stat(name).expect("stat of a made entry");
        let got = is_whiteout(&ld, &marks, name, &st).expect("is_whiteout");
        assert_eq!(got, expected, "is_whiteout({name:?})");
        let target = oci_whiteout_target(name);
        let b = name.as_bytes();
        if b == OPAQUE_MARKER || !b.starts_with(b".wh.") {
            assert_eq!(target, None, "{name:?}");
        } else {
            assert_eq!(target.map(OsStr::as_bytes), Some(&b[4..]), "{name:?}");
            assert_eq!(oci_name(target.unwrap_or_default()), *name);
        }
    }
    // The writer's markers are read back by the reader.
    let work = scratch.0.join("work");
    fs::create_dir(&work).expect("scratch workdir");
    let work_fd = (writer & 2 != 0).then(|| {
        nix::fcntl::open(&work, OFlag::O_RDONLY | OFlag::O_DIRECTORY, Mode::empty())
            .expect("opening the scratch workdir")
    });
    let ns = if writer & 4 != 0 { "trusted." } else { "user." };
    let w = MarkerWriter::new(ns, writer & 1 != 0, work_fd);
    let fresh = (0..).map(|i| OsString::from(format!("gone{i}"))).find(|n| {
        !made.iter().any(|(m, _)| m == n) && !made.iter().any(|(m, _)| *m == oci_name(n))
    });
    let Some(fresh) = fresh else { return };
    w.make_whiteout(dirfd, &fresh).expect("make_whiteout");
    let chardev = w.chardev.load(Ordering::Relaxed);
    if chardev {
        let st = ld.stat(&fresh).expect("stat of a written whiteout");
        assert!(is_whiteout(&ld, &marks, &fresh, &st).expect("is_whiteout"));
    } else {
        let marker = oci_name(&fresh);
        assert!(
            ld.try_stat(&marker).expect("stat").is_some(),
            "no {marker:?}"
        );
        assert_eq!(oci_whiteout_target(&marker), Some(fresh.as_os_str()));
    }
    let sub = OsString::from(format!("{}-dir", fresh.to_string_lossy()));
    fs::create_dir(dir.join(&sub)).expect("scratch subdir");
    match w.set_opaque(dirfd, &sub) {
        Ok(()) => {
            let marks = dir_marks(&open_dir(&dir.join(&sub))).expect("dir_marks");
            assert!(marks.opaque, "set_opaque not read back");
        }
        // user.* xattrs may be unsupported where the scratch dir is.
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOTSUP), "set_opaque: {e}"),
    }
}

/// True for an empty regular file that is a whiteout only by its xattr.
fn is_xattr_only(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_file() && m.len() == 0)
}
