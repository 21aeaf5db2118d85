//! The layer indexer end to end: layers generated here with the `tar` crate (plain, gzip via
//! flate2, zstd), indexed, checked entry by entry, read back at many offsets, cached, compared
//! with what GNU `tar -x` extracts, and fed every hostile input the indexer must refuse.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};
use tar::{EntryType, Header};
use unionmount::store::layerindex::{Entry, ErrorKind, IndexError, Kind, LayerIndex};
use unionmount::store::{Compression, Digest, LayerSource, Limits, index_layer};

fn sha(data: &[u8]) -> Digest {
    Digest::from_bytes(Sha256::digest(data).into())
}

/// Deterministic, poorly compressible bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const MTIME: u64 = 1_600_000_000;

struct Tar(tar::Builder<Vec<u8>>);

impl Tar {
    fn new() -> Tar {
        Tar(tar::Builder::new(Vec::new()))
    }

    fn header(kind: EntryType, mode: u32) -> Header {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(MTIME);
        h.set_size(0);
        h
    }

    fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> &mut Tar {
        self.file_owned(path, mode, 0, 0, data)
    }

    fn file_owned(&mut self, path: &str, mode: u32, uid: u64, gid: u64, data: &[u8]) -> &mut Tar {
        let mut h = Tar::header(EntryType::Regular, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(data.len() as u64);
        self.0.append_data(&mut h, path, data).unwrap();
        self
    }

    fn dir(&mut self, path: &str, mode: u32) -> &mut Tar {
        let mut h = Tar::header(EntryType::Directory, mode);
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    fn symlink(&mut self, path: &str, target: &str) -> &mut Tar {
        let mut h = Tar::header(EntryType::Symlink, 0o777);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn hardlink(&mut self, path: &str, target: &str) -> &mut Tar {
        let mut h = Tar::header(EntryType::Link, 0o644);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn special(&mut self, path: &str, kind: EntryType, major: u32, minor: u32) -> &mut Tar {
        let mut h = Tar::header(kind, 0o600);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.0.append_data(&mut h, path, &[][..]).unwrap();
        self
    }

    /// A PAX extended header ('x') for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
        let mut data = Vec::new();
        for (k, v) in records {
            data.extend(pax_record(k, v));
        }
        self.raw(b"PaxHeaders/x", EntryType::XHeader, &data, b"")
    }

    /// An entry with exactly these name and link bytes (no checks, no long-name help).
    fn raw(&mut self, name: &[u8], kind: EntryType, data: &[u8], link: &[u8]) -> &mut Tar {
        let mut h = Tar::header(kind, 0o644);
        h.set_size(data.len() as u64);
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn finish(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = key.len() + value.len() + 3;
    let mut len = body + body.to_string().len();
    if len.to_string().len() != body.to_string().len() {
        len += 1;
    }
    let mut v = format!("{len} {key}=").into_bytes();
    v.extend_from_slice(value);
    v.push(b'\n');
    v
}

fn compress(tar: &[u8], c: Compression) -> Vec<u8> {
    match c {
        Compression::None => tar.to_vec(),
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(tar).unwrap();
            e.finish().unwrap()
        }
        Compression::Zstd => zstd::encode_all(tar, 3).unwrap(),
    }
}

fn source(blob: &[u8], tar: &[u8], c: Compression) -> LayerSource {
    LayerSource {
        compression: c,
        layer: sha(blob),
        diff_id: sha(tar),
        size: blob.len() as u64,
    }
}

fn index_blob(blob: &[u8], src: &LayerSource, limits: &Limits) -> Result<LayerIndex, IndexError> {
    index_layer(blob, src, limits, &mut |_, _| {})
}

/// Compresses, indexes with matching digests; returns the blob too.
fn index(tar: &[u8], c: Compression) -> (Vec<u8>, Result<LayerIndex, IndexError>) {
    let blob = compress(tar, c);
    let src = source(&blob, tar, c);
    let r = index_blob(&blob, &src, &Limits::default());
    (blob, r)
}

fn get<'a>(ix: &'a LayerIndex, path: &str) -> &'a Entry {
    ix.get(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} not in index"))
}

fn paths(ix: &LayerIndex) -> Vec<String> {
    let mut v: Vec<String> = ix
        .entries()
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path).into_owned())
        .collect();
    v.sort();
    v
}

/// Expects an indexing error of `kind` whose message names the layer and contains `frag`.
fn expect_err(tar: &[u8], kind: ErrorKind, frag: &str) -> IndexError {
    let (blob, r) = index(tar, Compression::None);
    let e = r.expect_err("indexing should fail");
    let msg = e.to_string();
    assert!(
        msg.contains(&sha(&blob).to_string()),
        "no layer digest: {msg}"
    );
    assert!(msg.contains(frag), "expected {frag:?} in: {msg}");
    assert_eq!(e.kind, kind, "{msg}");
    e
}

const CAP: &[u8] =
    b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";

fn rich_layer() -> (Vec<u8>, Vec<u8>) {
    let big = noise(3 << 20, 1);
    let long = format!("usr/share/{}/{}", "d".repeat(120), "f".repeat(200));
    let mut t = Tar::new();
    t.dir("./", 0o755)
        .dir("etc", 0o755)
        .file("etc/passwd", 0o644, b"root:x:0:0\n")
        .dir("bin", 0o755)
        .file("bin/su", 0o4755, b"su binary")
        .symlink("bin/sh", "/bin/busybox")
        .hardlink("bin/su2", "bin/su")
        .special("run/fifo", EntryType::Fifo, 0, 0)
        .special("dev/null", EntryType::Char, 1, 3)
        .special("dev/sda", EntryType::Block, 8, 0)
        .pax(&[
            ("mtime", b"1700000000.123456789"),
            ("SCHILY.xattr.security.capability", CAP),
            ("SCHILY.xattr.user.note", b"hello"),
            ("LIBARCHIVE.xattr.trusted.md5", b"AAEC/w=="),
        ])
        .file_owned("bin/ping", 0o755, 1000, 2000, b"ping")
        .file(&long, 0o600, b"long")
        .file(".wh.gone", 0o644, b"")
        .file("etc/.wh.shadow", 0o644, b"")
        .dir("var", 0o700)
        .file("var/.wh..wh..opq", 0o644, b"")
        .file("var/log", 0o644, b"x")
        .file("deep/a/b/file", 0o640, b"deep")
        .file("etc/passwd", 0o600, b"root:x:0:0:later\n")
        .file("big", 0o644, &big)
        .file("empty", 0o644, b"");
    (t.finish(), big)
}

#[test]
fn index_content_is_exact_for_plain_gzip_and_zstd() {
    let (tar, big) = rich_layer();
    let mut seen = Vec::new();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let (blob, r) = index(&tar, c);
        let ix = r.unwrap();
        assert_eq!(ix.layer, sha(&blob));
        assert_eq!(ix.diff_id, sha(&tar));
        assert_eq!(ix.tar_size, tar.len() as u64);
        assert_eq!(ix.blob_size, blob.len() as u64);
        assert_eq!(
            paths(&ix),
            [
                "big",
                "bin",
                "bin/ping",
                "bin/sh",
                "bin/su",
                "bin/su2",
                "deep",
                "deep/a",
                "deep/a/b",
                "deep/a/b/file",
                "dev",
                "dev/null",
                "dev/sda",
                "empty",
                "etc",
                "etc/passwd",
                "etc/shadow",
                "gone",
                "run",
                "run/fifo",
                "usr",
                "usr/share",
                &format!("usr/share/{}", "d".repeat(120)),
                &format!("usr/share/{}/{}", "d".repeat(120), "f".repeat(200)),
                "var",
                "var/log",
            ]
        );
        let root = ix.root();
        assert!(!root.synthesized && root.kind == Kind::Dir && root.mode == 0o755);

        let passwd = get(&ix, "etc/passwd");
        assert_eq!(passwd.kind, Kind::File);
        assert_eq!(passwd.mode, 0o600, "later duplicate wins");
        assert_eq!(passwd.size, 17);
        assert_eq!(passwd.sha256, Some(sha(b"root:x:0:0:later\n")));
        assert_eq!(ix.read_file(passwd, &blob).unwrap(), b"root:x:0:0:later\n");

        let su = get(&ix, "bin/su");
        assert_eq!((su.mode, su.uid, su.gid), (0o4755, 0, 0));
        assert_eq!(su.mtime_ns, MTIME as i64 * 1_000_000_000);
        let su2 = get(&ix, "bin/su2");
        assert_ne!(su.link_group, 0);
        assert_eq!(su2.link_group, su.link_group);
        assert_eq!(su2.hardlink_target.as_deref(), Some(&b"bin/su"[..]));
        assert_eq!(
            (su2.kind, su2.sha256, su2.offset, su2.mode),
            (Kind::File, su.sha256, su.offset, 0o4755)
        );
        assert_eq!(ix.nlink(su), 2);
        assert_eq!(ix.nlink(passwd), 1);
        assert_eq!(ix.read_file(su2, &blob).unwrap(), b"su binary");

        let sh = get(&ix, "bin/sh");
        assert_eq!(sh.kind, Kind::Symlink);
        assert_eq!(sh.link_target.as_deref(), Some(&b"/bin/busybox"[..]));
        assert_eq!(sh.size, 12);

        let ping = get(&ix, "bin/ping");
        assert_eq!((ping.uid, ping.gid, ping.mode), (1000, 2000, 0o755));
        assert_eq!(ping.mtime_ns, 1_700_000_000_123_456_789);
        assert_eq!(ping.xattr(b"security.capability"), Some(CAP));
        assert_eq!(ping.xattr(b"user.note"), Some(&b"hello"[..]));
        assert_eq!(ping.xattr(b"trusted.md5"), Some(&[0u8, 1, 2, 255][..]));
        assert_eq!(ping.xattrs.len(), 3);
        assert!(
            passwd.xattrs.is_empty(),
            "PAX records apply to one entry only"
        );

        let null = get(&ix, "dev/null");
        assert_eq!(
            (null.kind, null.dev_major, null.dev_minor),
            (Kind::Char, 1, 3)
        );
        let sda = get(&ix, "dev/sda");
        assert_eq!(
            (sda.kind, sda.dev_major, sda.dev_minor),
            (Kind::Block, 8, 0)
        );
        assert_eq!(get(&ix, "run/fifo").kind, Kind::Fifo);

        let dev = get(&ix, "dev");
        assert!(dev.synthesized);
        assert_eq!(
            (dev.kind, dev.mode, dev.uid, dev.gid, dev.mtime_ns),
            (Kind::Dir, 0o755, 0, 0, 0)
        );
        assert!(!get(&ix, "etc").synthesized);

        assert_eq!(get(&ix, "gone").kind, Kind::Whiteout);
        assert_eq!(get(&ix, "etc/shadow").kind, Kind::Whiteout);
        let var = get(&ix, "var");
        assert!(var.opaque && var.mode == 0o700);
        assert!(!get(&ix, "etc").opaque);
        assert!(ix.get(b"var/.wh..wh..opq").is_none() && ix.get(b".wh.gone").is_none());

        let b = get(&ix, "big");
        assert_eq!(b.size, big.len() as u64);
        assert_eq!(ix.read_file(b, &blob).unwrap(), big);
        let e = get(&ix, "empty");
        assert_eq!((e.size, e.sha256), (0, Some(sha(b""))));
        assert_eq!(ix.read_file(e, &blob).unwrap(), b"");

        let names: Vec<&[u8]> = ix.children(b"bin").iter().map(|e| e.name()).collect();
        assert_eq!(names, [&b"ping"[..], b"sh", b"su", b"su2"]);
        assert_eq!(ix.lookup(b"deep/a", b"b").unwrap().kind, Kind::Dir);

        match c {
            Compression::Gzip => assert!(ix.checkpoints().len() >= 2, "{}", ix.checkpoints().len()),
            _ => assert!(ix.checkpoints().is_empty()),
        }
        seen.push(ix.entries().to_vec());
    }
    assert_eq!(seen[0], seen[1]);
    assert_eq!(seen[0], seen[2]);
}

/// A layer of many files of many sizes, with two big ones spanning several checkpoints.
fn many_files() -> (Vec<u8>, Vec<(String, Vec<u8>)>) {
    let mut t = Tar::new();
    let mut files = Vec::new();
    for i in 0..60usize {
        let len = match i {
            7 => 5 << 20,
            30 => (2 << 20) + 12345,
            13 => 0,
            _ => (i * i * 997) % 200_000,
        };
        let data = if i % 3 == 0 {
            vec![b'a' + (i % 26) as u8; len]
        } else {
            noise(len, i as u64)
        };
        let path = format!("d{}/f{i}", i % 5);
        t.file(&path, 0o644, &data);
        files.push((path, data));
    }
    (t.finish(), files)
}

fn check_all_files(ix: &LayerIndex, blob: &[u8], files: &[(String, Vec<u8>)]) {
    for (path, data) in files {
        let e = get(ix, path);
        assert_eq!(&ix.read_file(e, blob).unwrap(), data, "{path}");
    }
}

#[test]
fn read_file_returns_exact_bytes_at_many_offsets() {
    let (tar, files) = many_files();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let (blob, r) = index(&tar, c);
        let ix = r.unwrap();
        if c == Compression::Gzip {
            assert!(ix.checkpoints().len() >= 8, "{}", ix.checkpoints().len());
        }
        check_all_files(&ix, &blob, &files);
    }
}

#[test]
fn multi_member_gzip_is_one_stream() {
    let (tar, files) = many_files();
    // Split at odd places, inside file data and inside headers.
    let cuts = [0, 1000, 3_000_001, 5_000_000, tar.len() - 700, tar.len()];
    let mut blob = Vec::new();
    for w in cuts.windows(2) {
        blob.extend(compress(&tar[w[0]..w[1]], Compression::Gzip));
    }
    let src = source(&blob, &tar, Compression::Gzip);
    let ix = index_blob(&blob, &src, &Limits::default()).unwrap();
    assert_eq!(ix.tar_size, tar.len() as u64);
    check_all_files(&ix, &blob, &files);
}

#[test]
fn read_file_refuses_bytes_that_do_not_match() {
    let mut t = Tar::new();
    t.file("a/secret", 0o644, b"original content");
    let tar = t.finish();
    let (mut blob, r) = index(&tar, Compression::None);
    let ix = r.unwrap();
    let e = get(&ix, "a/secret").clone();
    blob[e.offset as usize + 3] ^= 1;
    let err = ix.read_file(&e, &blob).unwrap_err();
    assert_eq!(err.kind, ErrorKind::Content);
    let msg = err.to_string();
    assert!(msg.contains(&ix.layer.to_string()), "{msg}");
    assert!(msg.contains("entry \"a/secret\""), "{msg}");
    assert!(msg.contains("does not match its sha256"), "{msg}");
    let mut out = Vec::new();
    assert!(
        ix.copy_file(get(&ix, "a"), &blob, &mut out).is_err(),
        "not a file"
    );
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("um-layer-index-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn cache_round_trips_and_a_flipped_byte_is_detected() {
    let (tar, _) = rich_layer();
    let (_, r) = index(&tar, Compression::Gzip);
    let ix = r.unwrap();
    let store = temp_dir("cache");
    let tmp = store.join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let path = store.join("index").join(ix.layer.rel_path());
    let missing = LayerIndex::read(&path, &ix.layer).unwrap_err();
    assert!(missing.is_not_found(), "{missing}");
    ix.write_atomic(&path, &tmp).unwrap();
    assert_eq!(
        fs::read_dir(&tmp).unwrap().count(),
        0,
        "nothing left in tmp/"
    );
    assert_eq!(LayerIndex::read(&path, &ix.layer).unwrap(), ix);

    let good = fs::read(&path).unwrap();
    for at in [0, 9, 100, good.len() / 2, good.len() - 1] {
        let mut bad = good.clone();
        bad[at] ^= 0x10;
        fs::write(&path, &bad).unwrap();
        let e = LayerIndex::read(&path, &ix.layer).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Cache, "{e}");
        assert!(e.to_string().contains("index cache"), "{e}");
    }
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    fs::write(&path, &bad).unwrap();
    let e = LayerIndex::read(&path, &ix.layer).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch"), "{e}");
    fs::write(&path, &good[..good.len() - 40]).unwrap();
    assert_eq!(
        LayerIndex::read(&path, &ix.layer).unwrap_err().kind,
        ErrorKind::Cache
    );
    let _ = fs::remove_dir_all(&store);
}

#[test]
fn cache_of_30k_entries_loads_whole() {
    let mut t = Tar::new();
    for d in 0..300 {
        t.dir(&format!("usr/lib/pkg{d}"), 0o755);
        for f in 0..99 {
            t.file(&format!("usr/lib/pkg{d}/file-{f}.so"), 0o644, b"x");
        }
    }
    let tar = t.finish();
    let (_, r) = index(&tar, Compression::None);
    let ix = r.unwrap();
    assert!(ix.entries().len() >= 30_000);
    let store = temp_dir("load");
    let path = store.join("idx");
    ix.write_atomic(&path, &store).unwrap();
    let start = std::time::Instant::now();
    let loaded = LayerIndex::read(&path, &ix.layer).unwrap();
    let took = start.elapsed();
    eprintln!(
        "load of a {}-entry index ({} bytes): {took:?}",
        loaded.entries().len(),
        fs::metadata(&path).unwrap().len()
    );
    assert_eq!(loaded.entries().len(), ix.entries().len());
    assert_eq!(loaded.children(b"usr/lib/pkg7").len(), 99);
    // The load time is printed, not asserted (shared, noisy machines): the second-mount
    // row of `scripts/bench.sh --only image` measures it.
    let _ = fs::remove_dir_all(&store);
}

#[test]
fn progress_reports_blob_bytes() {
    let (tar, _) = many_files();
    let blob = compress(&tar, Compression::Gzip);
    let src = source(&blob, &tar, Compression::Gzip);
    let mut calls = Vec::new();
    index_layer(&blob[..], &src, &Limits::default(), &mut |done, total| {
        calls.push((done, total))
    })
    .unwrap();
    assert!(calls.len() > 2);
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(
        *calls.last().unwrap(),
        (blob.len() as u64, blob.len() as u64)
    );
}

// ---- duplicates and neutralized entries ----

#[test]
fn duplicates_later_wins_as_extraction_does() {
    let mut t = Tar::new();
    t.file("f", 0o644, b"one")
        .file("f", 0o600, b"two")
        .dir("d", 0o755)
        .file("d/child", 0o644, b"c")
        .file("d/sub/x", 0o644, b"x")
        .file("d", 0o644, b"now a file")
        .file("g", 0o644, b"file first")
        .dir("g", 0o700)
        .dir("h", 0o755)
        .file("h/keep", 0o644, b"k")
        .dir("h", 0o711);
    let (blob, r) = index(&t.finish(), Compression::None);
    let ix = r.unwrap();
    assert_eq!(paths(&ix), ["d", "f", "g", "h", "h/keep"]);
    assert_eq!(ix.read_file(get(&ix, "f"), &blob).unwrap(), b"two");
    assert_eq!(get(&ix, "d").kind, Kind::File);
    assert_eq!(ix.read_file(get(&ix, "d"), &blob).unwrap(), b"now a file");
    assert_eq!((get(&ix, "g").kind, get(&ix, "g").mode), (Kind::Dir, 0o700));
    assert_eq!(
        get(&ix, "h").mode,
        0o711,
        "later dir metadata, children kept"
    );
}

#[test]
fn hard_link_keeps_the_content_it_linked_even_if_the_target_is_replaced() {
    let mut t = Tar::new();
    t.file("a", 0o644, b"first")
        .hardlink("b", "a")
        .file("a", 0o644, b"second");
    let (blob, r) = index(&t.finish(), Compression::None);
    let ix = r.unwrap();
    assert_eq!(ix.read_file(get(&ix, "b"), &blob).unwrap(), b"first");
    assert_eq!(ix.read_file(get(&ix, "a"), &blob).unwrap(), b"second");
    assert_eq!((get(&ix, "a").link_group, get(&ix, "b").link_group), (0, 0));
    assert_eq!(ix.nlink(get(&ix, "b")), 1);
}

#[test]
fn absolute_paths_are_stripped_like_gnu_tar() {
    let mut t = Tar::new();
    t.raw(b"/etc/passwd", EntryType::Regular, b"abs", b"").raw(
        b"./rel//x/./y",
        EntryType::Regular,
        b"y",
        b"",
    );
    let (_, r) = index(&t.finish(), Compression::None);
    let ix = r.unwrap();
    assert_eq!(paths(&ix), ["etc", "etc/passwd", "rel", "rel/x", "rel/x/y"]);
}

// ---- hostile input, one test each ----

#[test]
fn hostile_dotdot_component() {
    let mut t = Tar::new();
    t.raw(b"a/../../etc/passwd", EntryType::Regular, b"x", b"");
    let e = expect_err(&t.finish(), ErrorKind::Entry, "path has a '..' component");
    assert!(
        e.to_string().contains("entry \"a/../../etc/passwd\""),
        "{e}"
    );
}

#[test]
fn hostile_path_through_symlink() {
    let mut t = Tar::new();
    t.symlink("lib", "/usr/lib")
        .file("lib/evil.so", 0o644, b"x");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "entry \"lib/evil.so\": path goes through symlink \"lib\" defined earlier in this layer",
    );
}

#[test]
fn hostile_path_through_a_file() {
    let mut t = Tar::new();
    t.file("f", 0o644, b"x").file("f/g", 0o644, b"y");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "entry \"f/g\": parent \"f\" is not a directory",
    );
}

#[test]
fn hostile_hard_link_to_missing_target() {
    let mut t = Tar::new();
    t.hardlink("x", "nowhere");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "entry \"x\": hard link target \"nowhere\" is not an earlier entry of this layer",
    );
}

#[test]
fn hostile_hard_link_to_a_later_entry() {
    let mut t = Tar::new();
    t.hardlink("x", "later").file("later", 0o644, b"l");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "hard link target \"later\" is not an earlier entry",
    );
}

#[test]
fn hostile_hard_link_outside_the_layer() {
    let mut t = Tar::new();
    t.raw(b"x", EntryType::Link, b"", b"../../etc/shadow");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "entry \"x\": hard link target: path has a '..' component",
    );
    let mut t = Tar::new();
    t.raw(b"x", EntryType::Link, b"", b"/etc/shadow");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "hard link target \"etc/shadow\" is not an earlier entry",
    );
}

#[test]
fn hostile_hard_link_to_directory() {
    let mut t = Tar::new();
    t.dir("d", 0o755).hardlink("x", "d");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "entry \"x\": hard link to directory \"d\"",
    );
}

#[test]
fn hostile_size_over_2_pow_40() {
    let mut t = Tar::new();
    t.pax(&[("size", b"2199023255552")])
        .file("huge", 0o644, b"");
    expect_err(
        &t.finish(),
        ErrorKind::Limit,
        "entry \"huge\": size 2199023255552 exceeds the limit",
    );
}

#[test]
fn hostile_size_past_the_end_of_the_stream() {
    let mut h = Tar::header(EntryType::Regular, 0o644);
    h.set_path("short").unwrap();
    h.set_size(1_000_000);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[7u8; 1024]);
    expect_err(
        &tar,
        ErrorKind::Tar,
        "entry \"short\": size 1000000 runs past the end of the stream",
    );
}

#[test]
fn hostile_pax_record_length() {
    let mut t = Tar::new();
    t.raw(
        b"PaxHeaders/x",
        EntryType::XHeader,
        b"99999999 path=x\n",
        b"",
    )
    .file("f", 0o644, b"x");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "PAX record length 99999999 does not fit",
    );
}

#[test]
fn hostile_pax_header_size() {
    let mut h = Tar::header(EntryType::XHeader, 0o644);
    h.set_path("PaxHeaders/x").unwrap();
    h.set_size(1 << 30);
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[0u8; 4096]);
    expect_err(
        &tar,
        ErrorKind::Limit,
        "PAX extended header of 1073741824 bytes exceeds the limit",
    );
}

#[test]
fn hostile_long_component_and_nul() {
    let mut t = Tar::new();
    let long = format!("d/{}", "n".repeat(256));
    t.pax(&[("path", long.as_bytes())])
        .file("placeholder", 0o644, b"x");
    expect_err(
        &t.finish(),
        ErrorKind::Entry,
        "path component longer than 255 bytes",
    );
    let mut t = Tar::new();
    t.pax(&[("path", b"a\0b")]).file("placeholder", 0o644, b"x");
    expect_err(&t.finish(), ErrorKind::Entry, "name contains a NUL byte");
}

#[test]
fn hostile_too_many_entries() {
    let mut t = Tar::new();
    for i in 0..6 {
        t.file(&format!("f{i}"), 0o644, b"");
    }
    let tar = t.finish();
    let src = source(&tar, &tar, Compression::None);
    let limits = Limits {
        max_entries: 5,
        ..Limits::default()
    };
    let e = index_blob(&tar, &src, &limits).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Limit);
    assert!(e.to_string().contains("more than 5 entries"), "{e}");
    assert!(
        index_blob(
            &tar[..tar.len()],
            &src,
            &Limits {
                max_entries: 6,
                ..Limits::default()
            }
        )
        .is_ok()
    );
}

#[test]
fn hostile_bad_header_checksum() {
    let mut t = Tar::new();
    t.file("f", 0o644, b"x");
    let mut tar = t.finish();
    tar[3] ^= 1;
    expect_err(
        &tar,
        ErrorKind::Tar,
        "tar header at offset 0: bad header checksum",
    );
}

/// Indexes a damaged blob whose digests match the damage, so the stream itself is at fault.
fn damaged(blob: &[u8], tar: &[u8], c: Compression) -> IndexError {
    let src = source(blob, tar, c);
    let e = index_blob(blob, &src, &Limits::default()).unwrap_err();
    assert!(e.to_string().contains(&src.layer.to_string()), "{e}");
    e
}

#[test]
fn hostile_truncated_and_corrupt_gzip() {
    let (tar, _) = many_files();
    let blob = compress(&tar, Compression::Gzip);
    let e = damaged(&blob[..blob.len() / 2], &tar, Compression::Gzip);
    assert_eq!(e.kind, ErrorKind::Compressed, "{e}");
    assert!(
        e.to_string()
            .contains("gzip stream truncated at compressed byte"),
        "{e}"
    );
    let e = damaged(&blob[..blob.len() - 4], &tar, Compression::Gzip);
    assert!(e.to_string().contains("gzip stream truncated"), "{e}");
    let mut bad = blob.clone();
    for i in (blob.len() / 3..blob.len() / 3 + 64).step_by(7) {
        bad[i] ^= 0xa5;
    }
    let e = damaged(&bad, &tar, Compression::Gzip);
    assert!(
        e.to_string()
            .contains("gzip data corrupt at compressed byte"),
        "{e}"
    );
}

#[test]
fn hostile_truncated_and_corrupt_zstd() {
    let (tar, _) = many_files();
    let blob = compress(&tar, Compression::Zstd);
    let e = damaged(&blob[..blob.len() / 2], &tar, Compression::Zstd);
    assert_eq!(e.kind, ErrorKind::Compressed, "{e}");
    assert!(
        e.to_string().contains("zstd data corrupt or truncated"),
        "{e}"
    );
    let mut bad = blob.clone();
    for i in (blob.len() / 3..blob.len() / 3 + 64).step_by(7) {
        bad[i] ^= 0xa5;
    }
    // Frames without a content checksum (the library default) may decode to wrong bytes
    // without a zstd error: the DiffID check is what catches those.
    let e = damaged(&bad, &tar, Compression::Zstd);
    let msg = e.to_string();
    assert!(
        (e.kind == ErrorKind::Compressed && msg.contains("zstd data corrupt or truncated"))
            || (e.kind == ErrorKind::DiffId && msg.contains("DiffID mismatch")),
        "{msg}"
    );
}

#[test]
fn hostile_layer_digest_mismatch() {
    let (tar, _) = many_files();
    let blob = compress(&tar, Compression::Gzip);
    let mut src = source(&blob, &tar, Compression::Gzip);
    src.layer = sha(b"something else");
    let e = index_blob(&blob, &src, &Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::LayerDigest);
    let msg = e.to_string();
    assert!(
        msg.starts_with(&format!(
            "layer {}: layer digest mismatch: the blob",
            src.layer
        )),
        "{msg}"
    );
    assert!(msg.contains(&sha(&blob).to_string()), "{msg}");
    // A wrong blob is reported as such even when it does not parse.
    let e = index_blob(b"not a gzip stream at all", &src, &Limits::default()).unwrap_err();
    assert_eq!(e.kind, ErrorKind::LayerDigest, "{e}");
}

#[test]
fn hostile_diff_id_mismatch() {
    let (tar, _) = many_files();
    for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
        let blob = compress(&tar, c);
        let mut src = source(&blob, &tar, c);
        src.diff_id = sha(b"other");
        if c == Compression::None {
            src.layer = sha(&blob);
        }
        let e = index_blob(&blob, &src, &Limits::default()).unwrap_err();
        assert_eq!(e.kind, ErrorKind::DiffId, "{e}");
        assert!(
            e.to_string().contains(&format!(
                "DiffID mismatch: the uncompressed stream hashes to {}",
                sha(&tar)
            )),
            "{e}"
        );
    }
}

#[test]
fn hostile_garbage_is_not_a_panic() {
    for seed in 0..200u64 {
        let len = (seed as usize * 37) % 3000;
        let mut data = noise(len, seed);
        if seed % 2 == 0 && len > 600 {
            // Make the first header's checksum valid so the parser goes deeper.
            let mut h = Header::new_gnu();
            h.as_mut_bytes().copy_from_slice(&data[..512]);
            h.set_cksum();
            data[..512].copy_from_slice(h.as_bytes());
        }
        for c in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let src = source(&data, &data, c);
            let _ = index_blob(&data, &src, &Limits::default());
        }
    }
}

// ---- against real extraction ----

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, fs::Metadata>) {
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let md = fs::symlink_metadata(&p).unwrap();
        if md.is_dir() {
            walk(root, &p, out);
        }
        out.insert(rel, md);
    }
}

#[test]
fn matches_gnu_tar_extraction() {
    let mut t = Tar::new();
    t.dir("etc", 0o751)
        .file("etc/passwd", 0o644, b"root")
        .file("etc/passwd", 0o640, b"root, later")
        .file_owned("home/user/.profile", 0o600, 1000, 1000, b"export A=1\n")
        .file("usr/bin/tool", 0o2755, &noise(300_000, 9))
        .hardlink("usr/bin/tool2", "usr/bin/tool")
        .symlink("usr/bin/rel", "../lib/x")
        .symlink("usr/bin/abs", "/nonexistent/target")
        .special("run/pipe", EntryType::Fifo, 0, 0)
        .special("dev/zero", EntryType::Char, 1, 5)
        .dir("tmp", 0o1777)
        .file("empty", 0o444, b"")
        .file(
            &format!("long/{}/{}", "p".repeat(150), "q".repeat(150)),
            0o644,
            b"long",
        );
    let tar = t.finish();
    let (blob, r) = index(&tar, Compression::Gzip);
    let ix = r.unwrap();

    let out = temp_dir("extract");
    let tar_path = out.with_extension("tar");
    fs::write(&tar_path, &tar).unwrap();
    let st = Command::new("tar")
        .args([
            "-xpf",
            tar_path.to_str().unwrap(),
            "--numeric-owner",
            "-C",
            out.to_str().unwrap(),
        ])
        .status()
        .expect("GNU tar runs");
    assert!(st.success());
    let mut disk = BTreeMap::new();
    walk(&out, &out, &mut disk);

    let indexed: Vec<String> = paths(&ix);
    assert_eq!(indexed, disk.keys().cloned().collect::<Vec<_>>());
    for e in ix.entries() {
        let p = String::from_utf8_lossy(&e.path).into_owned();
        let md = &disk[&p];
        let ft = md.file_type();
        let kind = if ft.is_file() {
            Kind::File
        } else if ft.is_dir() {
            Kind::Dir
        } else if ft.is_symlink() {
            Kind::Symlink
        } else if ft.is_fifo() {
            Kind::Fifo
        } else if ft.is_char_device() {
            Kind::Char
        } else {
            Kind::Block
        };
        assert_eq!(e.kind, kind, "{p}");
        if kind != Kind::Symlink {
            assert_eq!(e.mode, md.mode() & 0o7777, "{p}");
        }
        assert_eq!((e.uid, e.gid), (md.uid(), md.gid()), "{p}");
        match kind {
            Kind::File => {
                assert_eq!(e.size, md.len(), "{p}");
                assert_eq!(
                    ix.read_file(e, &blob).unwrap(),
                    fs::read(out.join(&p)).unwrap(),
                    "{p}"
                );
                assert_eq!(ix.nlink(e) as u64, md.nlink(), "{p}");
                assert_eq!(e.mtime_ns, md.mtime() * 1_000_000_000, "{p}");
            }
            Kind::Symlink => {
                let target = fs::read_link(out.join(&p)).unwrap();
                assert_eq!(
                    e.link_target.as_deref(),
                    Some(target.as_os_str().as_encoded_bytes()),
                    "{p}"
                );
                assert_eq!(e.size, md.len(), "{p}");
            }
            Kind::Char => assert_eq!(md.rdev(), libc::makedev(e.dev_major, e.dev_minor), "{p}"),
            _ => {}
        }
    }
    let tool = &disk["usr/bin/tool"];
    let tool2 = &disk["usr/bin/tool2"];
    assert_eq!(tool.ino(), tool2.ino());
    assert_eq!(
        get(&ix, "usr/bin/tool").link_group,
        get(&ix, "usr/bin/tool2").link_group
    );
    let _ = fs::remove_dir_all(&out);
    let _ = fs::remove_file(&tar_path);
}

// ---- measurements (run with `cargo test --release --test layer_index -- --ignored --nocapture`) ----

#[test]
#[ignore = "measurement: 100 MB layer, compares with gzip -d"]
fn measure_gzip_throughput_against_gzip_d() {
    use std::time::Instant;
    let mut t = Tar::new();
    let mut i = 0u64;
    let mut total = 0usize;
    while total < 100 << 20 {
        // Half text-like (compressible), half noise, as in real layers.
        let len = 20_000 + (i as usize * 7919) % 400_000;
        let data = if i.is_multiple_of(2) {
            (0..len)
                .map(|j| b"the quick brown fox jumps over the lazy dog\n"[(j + i as usize) % 44])
                .collect()
        } else {
            noise(len, i)
        };
        t.file(&format!("dir{}/file{i}", i % 50), 0o644, &data);
        total += len;
        i += 1;
    }
    let tar = t.finish();
    let dir = temp_dir("measure");
    let tar_path = dir.join("layer.tar");
    fs::write(&tar_path, &tar).unwrap();
    assert!(
        Command::new("gzip")
            .args(["-6", "-k", tar_path.to_str().unwrap()])
            .status()
            .unwrap()
            .success()
    );
    let gz_path = dir.join("layer.tar.gz");
    let blob = fs::read(&gz_path).unwrap();
    let mb = tar.len() as f64 / 1e6;

    let start = Instant::now();
    let st = Command::new("sh")
        .args(["-c", &format!("gzip -dc {} > /dev/null", gz_path.display())])
        .status()
        .unwrap();
    assert!(st.success());
    let gzip_d = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut r = unionmount::store::gzindex::GzReader::indexing(&blob[..]).unwrap();
    let n = std::io::copy(&mut r, &mut std::io::sink()).unwrap();
    let ours = start.elapsed().as_secs_f64();
    assert_eq!(n, tar.len() as u64);
    let cps = r.take_checkpoints().len();

    let src = source(&blob, &tar, Compression::Gzip);
    let start = Instant::now();
    let ix = index_blob(&blob, &src, &Limits::default()).unwrap();
    let full = start.elapsed().as_secs_f64();

    let e = &ix.entries()[ix.entries().len() / 2];
    let start = Instant::now();
    let _ = ix.read_file(e, &blob).unwrap();
    let one = start.elapsed().as_secs_f64();
    eprintln!(
        "{mb:.0} MB tar, {:.1} MB gzip: gzip -d {:.0} MB/s; inflate+checkpoints {:.0} MB/s ({cps} checkpoints); \
         full index pass (2 sha256 + per-file sha256 + tar) {:.0} MB/s; one random read of {} bytes {:.1} ms",
        blob.len() as f64 / 1e6,
        mb / gzip_d,
        mb / ours,
        mb / full,
        e.size,
        one * 1e3
    );
    let _ = fs::remove_dir_all(&dir);
}
