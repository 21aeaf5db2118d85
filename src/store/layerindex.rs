//! The index of one layer: every entry's metadata and where its bytes are in the layer's
//! uncompressed tar stream, in a form the union can serve lookups from without touching the
//! blob, plus its on-disk cache format (`STORE/index/sha256/<layer-hex>`) and verified random
//! reads of file contents.
//!
//! Invariants:
//! - Paths are normalized relative paths: no leading `/` or `./`, no `..`, no empty or `.`
//!   components, no NUL, each component at most 255 bytes. The layer root is `root()` (path
//!   ""), always present; it is never in `entries()`.
//! - `entries()` is sorted by (parent path, name), so `lookup` is a binary search and
//!   `children` a contiguous slice; each path appears once.
//! - A directory implied by a deeper path but absent from the tar is synthesized with mode
//!   0755, uid 0, gid 0, mtime 0 and `synthesized = true`. A root absent from the tar is
//!   synthesized the same way.
//! - Whiteout markers are not entries: `.wh.NAME` makes NAME a `Kind::Whiteout` entry when
//!   the layer has no object at NAME; when it has one, a directory becomes `opaque` and a
//!   non-directory needs nothing (it hides lower layers by itself), since a whiteout never
//!   hides entries of its own layer. `.wh..wh..opq` sets `opaque` on its directory.
//! - Hard links are resolved when indexed: the entry is a copy of its target's entry as it
//!   was at that point of the tar (kind, metadata, content location), with `hardlink_target`
//!   naming the target and the same nonzero `link_group`; `nlink` counts a group's members.
//! - A regular file's content is `size` bytes at `offset` of the uncompressed stream with
//!   sha256 `sha256`; `read_file` returns bytes only after checking that digest.
//! - The cache file is `MAGIC`, a version, the body, and the sha256 of all that; anything
//!   that does not check out is reported, never trusted, and never panics the reader.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::gzindex::{self, Checkpoint, GzReader};
use super::{Compression, Digest};

/// What a tar entry is. Hard links are not a kind of their own: see `Entry::hardlink_target`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Char,
    Block,
    Fifo,
    /// A name whited out for lower layers (from a `.wh.NAME` marker), with no object here.
    Whiteout,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 0,
            Kind::Dir => 1,
            Kind::Symlink => 2,
            Kind::Char => 3,
            Kind::Block => 4,
            Kind::Fifo => 5,
            Kind::Whiteout => 6,
        }
    }

    fn from_code(c: u8) -> Option<Kind> {
        Some(match c {
            0 => Kind::File,
            1 => Kind::Dir,
            2 => Kind::Symlink,
            3 => Kind::Char,
            4 => Kind::Block,
            5 => Kind::Fifo,
            6 => Kind::Whiteout,
            _ => return None,
        })
    }
}

/// One extended attribute: (name, value), both raw bytes.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// One object of the layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Normalized relative path ("" for the root).
    pub path: Box<[u8]>,
    pub kind: Kind,
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time in ns since the epoch (PAX `mtime`, with its fraction, wins over the
    /// header's whole seconds); clamped to the i64 range.
    pub mtime_ns: i64,
    /// Content length for files, target length for symlinks, 0 otherwise.
    pub size: u64,
    /// Offset of the content in the uncompressed tar stream (files only).
    pub offset: u64,
    /// sha256 of the content (files only).
    pub sha256: Option<Digest>,
    /// Symlink target, as stored (may be absolute or contain `..`: it is never followed).
    pub link_target: Option<Box<[u8]>>,
    /// For a hard link: the normalized path of the entry it links to.
    pub hardlink_target: Option<Box<[u8]>>,
    /// Nonzero for entries that are hard links of each other; one identity (inode) per group.
    pub link_group: u32,
    pub dev_major: u32,
    pub dev_minor: u32,
    /// Extended attributes from PAX records, sorted by name; values are raw bytes.
    pub xattrs: Vec<Xattr>,
    /// The directory hides lower layers' contents (`.wh..wh..opq`, or a `.wh.` marker for a
    /// directory of this layer).
    pub opaque: bool,
    /// A directory implied by deeper paths, absent from the tar.
    pub synthesized: bool,
}

impl Entry {
    /// A synthesized directory (or root): 0755, root-owned, mtime 0.
    pub fn synthesized_dir(path: &[u8]) -> Entry {
        Entry {
            path: path.into(),
            kind: Kind::Dir,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
            size: 0,
            offset: 0,
            sha256: None,
            link_target: None,
            hardlink_target: None,
            link_group: 0,
            dev_major: 0,
            dev_minor: 0,
            xattrs: Vec::new(),
            opaque: false,
            synthesized: true,
        }
    }

    /// The last component ("" for the root).
    pub fn name(&self) -> &[u8] {
        split_path(&self.path).1
    }

    /// The directory holding the entry ("" for top-level entries and the root).
    pub fn parent(&self) -> &[u8] {
        split_path(&self.path).0
    }

    pub fn xattr(&self, name: &[u8]) -> Option<&[u8]> {
        self.xattrs
            .binary_search_by(|(n, _)| n.as_ref().cmp(name))
            .ok()
            .map(|i| self.xattrs[i].1.as_ref())
    }
}

/// (parent, name) of a normalized path.
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn key_cmp(a: &[u8], b: &[u8]) -> std::cmp::Ordering {
    let (pa, na) = split_path(a);
    let (pb, nb) = split_path(b);
    pa.cmp(pb).then(na.cmp(nb))
}

/// What went wrong; the message of an `IndexError` says the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Reading the blob or a cache file failed.
    Io,
    /// The blob's sha256 is not the layer digest.
    LayerDigest,
    /// The uncompressed stream's sha256 is not the DiffID.
    DiffId,
    /// The gzip or zstd stream is corrupt or truncated.
    Compressed,
    /// The tar structure is malformed (checksum, numbers, truncation).
    Tar,
    /// An entry is hostile or unsupported (`..`, path through a symlink, bad link...).
    Entry,
    /// A size or count is over a limit.
    Limit,
    /// A cache file is torn, corrupt, of another version, or for another layer.
    Cache,
    /// Bytes read back do not match the entry's sha256.
    Content,
}

/// An indexing, cache or read failure. The message names the layer digest and, when one
/// entry is at fault, its path.
#[derive(Debug)]
pub struct IndexError {
    pub kind: ErrorKind,
    pub layer: Digest,
    pub path: Option<Box<[u8]>>,
    pub detail: String,
    /// The underlying I/O error kind, for `ErrorKind::Io`.
    pub io_kind: Option<io::ErrorKind>,
}

impl IndexError {
    pub fn new(kind: ErrorKind, layer: &Digest, detail: impl Into<String>) -> IndexError {
        IndexError {
            kind,
            layer: *layer,
            path: None,
            detail: detail.into(),
            io_kind: None,
        }
    }

    pub fn entry(layer: &Digest, path: &[u8], kind: ErrorKind, detail: impl Into<String>) -> Self {
        IndexError {
            path: Some(path.into()),
            ..IndexError::new(kind, layer, detail)
        }
    }

    pub fn io(layer: &Digest, what: impl fmt::Display, e: &io::Error) -> IndexError {
        IndexError {
            io_kind: Some(e.kind()),
            ..IndexError::new(ErrorKind::Io, layer, format!("{what}: {e}"))
        }
    }

    /// A cache file that does not exist (index the layer, nothing is wrong).
    pub fn is_not_found(&self) -> bool {
        self.io_kind == Some(io::ErrorKind::NotFound)
    }
}

/// Quotes a path from a tar for a message (lossy UTF-8, escaped, shortened).
pub fn shown(path: &[u8]) -> String {
    let s = String::from_utf8_lossy(path);
    let mut t: String = s.chars().take(200).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

impl fmt::Display for IndexError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(
                f,
                "layer {}: entry {}: {}",
                self.layer,
                shown(p),
                self.detail
            ),
            None => write!(f, "layer {}: {}", self.layer, self.detail),
        }
    }
}

impl std::error::Error for IndexError {}

/// Positional reads from a blob (a file in the store, or bytes in memory).
pub trait ReadAt {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
}

impl ReadAt for fs::File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
}

/// A blob that is a byte range of a file (a member of a docker-archive or oci-archive, read
/// in place); reads past its end return 0.
#[derive(Debug)]
pub struct FileRange {
    pub file: fs::File,
    pub offset: u64,
    pub len: u64,
}

impl ReadAt for FileRange {
    fn read_at(&self, buf: &mut [u8], pos: u64) -> io::Result<usize> {
        if pos >= self.len {
            return Ok(0);
        }
        let n = buf
            .len()
            .min(usize::try_from(self.len - pos).unwrap_or(usize::MAX));
        FileExt::read_at(&self.file, &mut buf[..n], self.offset + pos)
    }
}

impl ReadAt for [u8] {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(self.len());
        let n = buf.len().min(self.len() - start);
        buf[..n].copy_from_slice(&self[start..start + n]);
        Ok(n)
    }
}

impl ReadAt for Vec<u8> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.as_slice().read_at(buf, offset)
    }
}

/// A sequential `Read` over a `ReadAt` from a position.
pub struct AtCursor<'a, B: ReadAt + ?Sized> {
    blob: &'a B,
    pos: u64,
}

impl<'a, B: ReadAt + ?Sized> AtCursor<'a, B> {
    pub fn new(blob: &'a B, pos: u64) -> Self {
        AtCursor { blob, pos }
    }
}

impl<B: ReadAt + ?Sized> Read for AtCursor<'_, B> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.blob.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Every entry of one layer; see the module doc for the invariants.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerIndex {
    pub layer: Digest,
    pub diff_id: Digest,
    pub compression: Compression,
    /// Length of the (compressed) blob.
    pub blob_size: u64,
    /// Length of the uncompressed tar stream.
    pub tar_size: u64,
    root: Entry,
    entries: Vec<Entry>,
    /// Members per link group (nonzero groups only). A map, not a vector indexed by group:
    /// group numbers come from the cache file and need not be dense.
    nlinks: HashMap<u32, u32>,
    checkpoints: Vec<Checkpoint>,
}

/// Magic of the cache file; the version follows as a little-endian u32.
pub const MAGIC: &[u8; 8] = b"UMLAYIDX";
pub const VERSION: u32 = 1;

impl LayerIndex {
    /// Assembles an index; sorts the entries and counts link groups.
    #[allow(clippy::too_many_arguments)]
    pub fn from_parts(
        layer: Digest,
        diff_id: Digest,
        compression: Compression,
        blob_size: u64,
        tar_size: u64,
        root: Entry,
        mut entries: Vec<Entry>,
        checkpoints: Vec<Checkpoint>,
    ) -> LayerIndex {
        entries.sort_unstable_by(|a, b| key_cmp(&a.path, &b.path));
        let mut nlinks = HashMap::new();
        for e in entries.iter().filter(|e| e.link_group != 0) {
            *nlinks.entry(e.link_group).or_insert(0u32) += 1;
        }
        LayerIndex {
            layer,
            diff_id,
            compression,
            blob_size,
            tar_size,
            root,
            entries,
            nlinks,
            checkpoints,
        }
    }

    pub fn root(&self) -> &Entry {
        &self.root
    }

    /// All entries but the root, sorted by (parent, name).
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn checkpoints(&self) -> &[Checkpoint] {
        &self.checkpoints
    }

    /// Position of `name` in directory `dir` within `entries()`: O(log n).
    pub fn lookup_pos(&self, dir: &[u8], name: &[u8]) -> Option<usize> {
        self.entries
            .binary_search_by(|e| {
                let (p, n) = split_path(&e.path);
                p.cmp(dir).then(n.cmp(name))
            })
            .ok()
    }

    /// The entry `name` in directory `dir` ("" is the root directory).
    pub fn lookup(&self, dir: &[u8], name: &[u8]) -> Option<&Entry> {
        self.lookup_pos(dir, name).map(|i| &self.entries[i])
    }

    /// The entry at a normalized path ("" is the root).
    pub fn get(&self, path: &[u8]) -> Option<&Entry> {
        if path.is_empty() {
            return Some(&self.root);
        }
        let (dir, name) = split_path(path);
        self.lookup(dir, name)
    }

    /// The entries directly in `dir`, sorted by name: O(log n).
    pub fn children(&self, dir: &[u8]) -> &[Entry] {
        &self.entries[self.children_range(dir)]
    }

    /// Positions in `entries()` of the entries directly in `dir`.
    pub fn children_range(&self, dir: &[u8]) -> std::ops::Range<usize> {
        let start = self.entries.partition_point(|e| e.parent() < dir);
        let len = self.entries[start..].partition_point(|e| e.parent() == dir);
        start..start + len
    }

    /// Hard links sharing this entry's identity (1 for entries outside a link group).
    pub fn nlink(&self, e: &Entry) -> u32 {
        match self.nlinks.get(&e.link_group) {
            Some(&n) if e.link_group != 0 && n > 0 => n,
            _ => 1,
        }
    }

    fn content_err(&self, e: &Entry, detail: impl Into<String>) -> IndexError {
        IndexError::entry(&self.layer, &e.path, ErrorKind::Content, detail)
    }

    /// Streams a regular file's content from the blob into `out` and checks its sha256.
    /// Bytes reach `out` before the check completes: on `Err`, everything written is
    /// untrusted and must be discarded (the store writes into tmp/ and renames only on Ok).
    /// Cost: plain tar is one positional read; gzip inflates from the nearest checkpoint
    /// (at most about `SPAN` + one deflate block of extra output); zstd decompresses from the
    /// start of the blob up to the file (O(offset)).
    pub fn copy_file<B: ReadAt + ?Sized>(
        &self,
        e: &Entry,
        blob: &B,
        out: &mut dyn Write,
    ) -> Result<(), IndexError> {
        let Some(want) = e.sha256 else {
            return Err(self.content_err(e, "not a regular file"));
        };
        let io_err = |what: &str, err: io::Error| {
            IndexError::entry(
                &self.layer,
                &e.path,
                ErrorKind::Io,
                format!("{what}: {err}"),
            )
        };
        let mut stream: Box<dyn Read + '_> = match self.compression {
            Compression::None => Box::new(AtCursor::new(blob, e.offset)),
            Compression::Gzip => {
                let mut r = match gzindex::checkpoint_for(&self.checkpoints, e.offset) {
                    Some(cp) => {
                        let at = cp.input - u64::from(cp.bits > 0);
                        GzReader::resume(AtCursor::new(blob, at), cp)
                    }
                    None => GzReader::from_start(AtCursor::new(blob, 0)),
                }
                .map_err(|err| io_err("opening the gzip stream", err))?;
                let skip = e.offset - r.out_pos().min(e.offset);
                skip_exact(&mut r, skip).map_err(|err| io_err("inflating", err))?;
                Box::new(r)
            }
            Compression::Zstd => {
                let mut r = zstd::stream::read::Decoder::new(AtCursor::new(blob, 0))
                    .map_err(|err| io_err("opening the zstd stream", err))?;
                skip_exact(&mut r, e.offset).map_err(|err| io_err("decompressing", err))?;
                Box::new(r)
            }
        };
        let mut sha = Sha256::new();
        let mut left = e.size;
        let mut buf = vec![0u8; 64 * 1024];
        while left > 0 {
            let want_n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = match stream.read(&mut buf[..want_n]) {
                Ok(0) => {
                    return Err(self.content_err(
                        e,
                        format!("the blob ends {left} bytes before the end of the file"),
                    ));
                }
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(io_err("reading", err)),
            };
            sha.update(&buf[..n]);
            out.write_all(&buf[..n])
                .map_err(|err| io_err("writing the content", err))?;
            left -= n as u64;
        }
        let got = Digest::from_bytes(sha.finalize().into());
        if got != want {
            return Err(self.content_err(
                e,
                format!("content does not match its sha256 (expected {want}, read {got})"),
            ));
        }
        Ok(())
    }

    /// A regular file's content, returned only when it matches the entry's sha256.
    pub fn read_file<B: ReadAt + ?Sized>(
        &self,
        e: &Entry,
        blob: &B,
    ) -> Result<Vec<u8>, IndexError> {
        let mut v = Vec::with_capacity(usize::try_from(e.size.min(1 << 20)).unwrap_or(0));
        self.copy_file(e, blob, &mut v)?;
        Ok(v)
    }

    /// The cache file bytes: magic, version, body, sha256 of everything before it.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Enc(Vec::with_capacity(64 + self.entries.len() * 96));
        w.0.extend_from_slice(MAGIC);
        w.u32(VERSION);
        w.0.extend_from_slice(self.layer.as_bytes());
        w.0.extend_from_slice(self.diff_id.as_bytes());
        w.u8(match self.compression {
            Compression::None => 0,
            Compression::Gzip => 1,
            Compression::Zstd => 2,
        });
        w.u64(self.blob_size);
        w.u64(self.tar_size);
        w.u64(self.entries.len() as u64 + 1);
        for e in std::iter::once(&self.root).chain(&self.entries) {
            w.entry(e);
        }
        w.u64(self.checkpoints.len() as u64);
        for c in &self.checkpoints {
            w.u64(c.out);
            w.u64(c.input);
            w.u8(c.bits);
            w.bytes(&c.window);
        }
        let sum: [u8; 32] = Sha256::digest(&w.0).into();
        w.0.extend_from_slice(&sum);
        w.0
    }

    /// Parses and checks cache bytes for layer `layer`.
    pub fn decode(data: &[u8], layer: &Digest) -> Result<LayerIndex, String> {
        if data.len() < MAGIC.len() + 4 + 32 || &data[..8] != MAGIC {
            return Err("not a layer index file (bad magic or too short)".into());
        }
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if version != VERSION {
            return Err(format!(
                "index format version {version}, expected {VERSION}"
            ));
        }
        let (body, sum) = data.split_at(data.len() - 32);
        let want: [u8; 32] = Sha256::digest(body).into();
        if want.as_slice() != sum {
            return Err("checksum mismatch (torn or corrupted file)".into());
        }
        let mut r = Dec(&body[12..]);
        let got = Digest::from_bytes(r.arr()?);
        if got != *layer {
            return Err(format!("holds the index of {got}"));
        }
        let diff_id = Digest::from_bytes(r.arr()?);
        let compression = match r.u8()? {
            0 => Compression::None,
            1 => Compression::Gzip,
            2 => Compression::Zstd,
            c => return Err(format!("unknown compression code {c}")),
        };
        let blob_size = r.u64()?;
        let tar_size = r.u64()?;
        let n = r.count(40)?;
        let root = r.entry()?;
        let mut entries = Vec::with_capacity(n.saturating_sub(1));
        for _ in 1..n {
            entries.push(r.entry()?);
        }
        let nc = r.count(21)?;
        let mut checkpoints = Vec::with_capacity(nc);
        for k in 0..nc {
            let cp = Checkpoint {
                out: r.u64()?,
                input: r.u64()?,
                bits: r.u8()?,
                window: r.bytes()?.into(),
            };
            // What resuming at it relies on: a bit count within one byte (with that byte
            // inside the blob), a deflate window of at most 32 KiB, offsets inside the blob
            // and the tar stream, in order.
            let in_order = checkpoints
                .last()
                .is_none_or(|p: &Checkpoint| p.out < cp.out && p.input < cp.input);
            if cp.bits > 7
                || (cp.bits > 0 && cp.input == 0)
                || cp.window.len() > 32 * 1024
                || cp.input > blob_size
                || cp.out > tar_size
                || !in_order
            {
                return Err(format!("checkpoint {k} is invalid"));
            }
            checkpoints.push(cp);
        }
        if !r.0.is_empty() {
            return Err("trailing bytes after the body".into());
        }
        let sorted = entries
            .windows(2)
            .all(|w| key_cmp(&w[0].path, &w[1].path).is_lt());
        if !sorted || !root.path.is_empty() {
            return Err("entries out of order".into());
        }
        Ok(LayerIndex::from_parts(
            *layer,
            diff_id,
            compression,
            blob_size,
            tar_size,
            root,
            entries,
            checkpoints,
        ))
    }

    /// Writes the cache file atomically: a new file in `tmp_dir` (same filesystem as
    /// `path`), fsync, rename over `path`, fsync of `path`'s directory.
    pub fn write_atomic(&self, path: &Path, tmp_dir: &Path) -> Result<(), IndexError> {
        let io = |what: String, e: io::Error| IndexError::io(&self.layer, what, &e);
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| io(format!("creating {}", dir.display()), e))?;
        let data = self.encode();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = tmp_dir.join(format!(
            "index-{}-{}-{nanos}",
            self.layer.hex(),
            std::process::id()
        ));
        let result = (|| {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| io(format!("creating {}", tmp.display()), e))?;
            f.write_all(&data)
                .and_then(|_| f.sync_all())
                .map_err(|e| io(format!("writing {}", tmp.display()), e))?;
            fs::rename(&tmp, path)
                .map_err(|e| io(format!("renaming into {}", path.display()), e))?;
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io(format!("syncing {}", dir.display()), e))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Loads and checks a cache file. A missing file is an `Io` error with `is_not_found()`;
    /// a torn, corrupt, foreign or old file is a `Cache` error: re-index, do not trust it.
    pub fn read(path: &Path, layer: &Digest) -> Result<LayerIndex, IndexError> {
        let data = fs::read(path)
            .map_err(|e| IndexError::io(layer, format!("reading {}", path.display()), &e))?;
        LayerIndex::decode(&data, layer).map_err(|d| {
            IndexError::new(
                ErrorKind::Cache,
                layer,
                format!("index cache {}: {d}", path.display()),
            )
        })
    }
}

fn skip_exact(r: &mut dyn Read, n: u64) -> io::Result<()> {
    let got = io::copy(&mut r.take(n), &mut io::sink())?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("stream ends at {got} of {n} bytes"),
        ));
    }
    Ok(())
}

struct Enc(Vec<u8>);

impl Enc {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn opt(&mut self, b: &Option<Box<[u8]>>) {
        match b {
            Some(b) => {
                self.u8(1);
                self.bytes(b);
            }
            None => self.u8(0),
        }
    }
    fn entry(&mut self, e: &Entry) {
        self.bytes(&e.path);
        self.u8(e.kind.code());
        self.u8(u8::from(e.opaque) | u8::from(e.synthesized) << 1);
        self.u32(e.mode);
        self.u32(e.uid);
        self.u32(e.gid);
        self.u64(e.mtime_ns as u64);
        self.u64(e.size);
        self.u64(e.offset);
        match &e.sha256 {
            Some(d) => {
                self.u8(1);
                self.0.extend_from_slice(d.as_bytes());
            }
            None => self.u8(0),
        }
        self.opt(&e.link_target);
        self.opt(&e.hardlink_target);
        self.u32(e.link_group);
        self.u32(e.dev_major);
        self.u32(e.dev_minor);
        self.u32(e.xattrs.len() as u32);
        for (k, v) in &e.xattrs {
            self.bytes(k);
            self.bytes(v);
        }
    }
}

/// A bounds-checked reader: every length is checked against what is left before use, so a
/// corrupt length can never cause a big allocation or a panic.
struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.0.len() {
            return Err("truncated body".into());
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    /// A count of items at least `min_size` bytes each, checked against what is left.
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.0.len() / min_size) as u64 {
            return Err(format!("count {n} exceeds the body"));
        }
        Ok(n as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn opt(&mut self) -> Result<Option<Box<[u8]>>, String> {
        Ok(match self.u8()? {
            0 => None,
            _ => Some(self.bytes()?.into()),
        })
    }
    fn entry(&mut self) -> Result<Entry, String> {
        let path: Box<[u8]> = self.bytes()?.into();
        let code = self.u8()?;
        let kind = Kind::from_code(code).ok_or_else(|| format!("unknown kind code {code}"))?;
        let flags = self.u8()?;
        let mode = self.u32()?;
        let uid = self.u32()?;
        let gid = self.u32()?;
        let mtime_ns = self.u64()? as i64;
        let size = self.u64()?;
        let offset = self.u64()?;
        let sha256 = match self.u8()? {
            0 => None,
            _ => Some(Digest::from_bytes(self.arr()?)),
        };
        let link_target = self.opt()?;
        let hardlink_target = self.opt()?;
        let link_group = self.u32()?;
        let dev_major = self.u32()?;
        let dev_minor = self.u32()?;
        let nx = self.u32()? as usize;
        if nx > self.0.len() / 8 {
            return Err("xattr count exceeds the body".into());
        }
        let mut xattrs = Vec::with_capacity(nx);
        for _ in 0..nx {
            let k = self.bytes()?.into();
            let v = self.bytes()?.into();
            xattrs.push((k, v));
        }
        Ok(Entry {
            path,
            kind,
            mode,
            uid,
            gid,
            mtime_ns,
            size,
            offset,
            sha256,
            link_target,
            hardlink_target,
            link_group,
            dev_major,
            dev_minor,
            xattrs,
            opaque: flags & 1 != 0,
            synthesized: flags & 2 != 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str) -> Entry {
        Entry {
            kind: Kind::File,
            synthesized: false,
            ..Entry::synthesized_dir(path.as_bytes())
        }
    }

    fn sample() -> LayerIndex {
        let d: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let entries = ["b", "a/z", "a", "a/b/c", "a/b", "ab", "a.b"]
            .iter()
            .map(|p| file(p))
            .collect();
        LayerIndex::from_parts(
            d,
            d,
            Compression::Gzip,
            100,
            200,
            Entry::synthesized_dir(b""),
            entries,
            vec![Checkpoint {
                out: 5,
                input: 6,
                bits: 3,
                window: vec![1, 2, 3].into(),
            }],
        )
    }

    /// A cache file whose checksum is right but whose checkpoints could not be resumed at
    /// (crafted, or written by a broken build) is refused, never used.
    #[test]
    fn checkpoints_that_cannot_be_resumed_at_are_refused() {
        let cp = |out, input, bits, window: usize| Checkpoint {
            out,
            input,
            bits,
            window: vec![7; window].into(),
        };
        let bad = [
            vec![cp(5, 6, 8, 3)],
            vec![cp(5, 0, 1, 3)],
            vec![cp(5, 6, 0, 32 * 1024 + 1)],
            vec![cp(5, 101, 0, 3)],
            vec![cp(201, 6, 0, 3)],
            vec![cp(5, 6, 0, 3), cp(5, 7, 0, 3)],
            vec![cp(5, 6, 0, 3), cp(6, 6, 0, 3)],
        ];
        for cps in bad {
            let mut ix = sample();
            ix.checkpoints = cps.clone();
            let e = LayerIndex::decode(&ix.encode(), &ix.layer).unwrap_err();
            assert!(e.contains("is invalid"), "{cps:?}: {e}");
        }
        let mut ix = sample();
        ix.checkpoints = vec![cp(5, 6, 7, 32 * 1024), cp(200, 100, 0, 0)];
        assert_eq!(LayerIndex::decode(&ix.encode(), &ix.layer).unwrap(), ix);
    }

    #[test]
    fn lookup_and_children_follow_parent_then_name() {
        let ix = sample();
        let names = |d: &str| -> Vec<String> {
            ix.children(d.as_bytes())
                .iter()
                .map(|e| String::from_utf8_lossy(&e.path).into_owned())
                .collect()
        };
        assert_eq!(names(""), ["a", "a.b", "ab", "b"]);
        assert_eq!(names("a"), ["a/b", "a/z"]);
        assert_eq!(names("a/b"), ["a/b/c"]);
        assert!(names("a/b/c").is_empty());
        assert!(names("zz").is_empty());
        assert_eq!(&*ix.lookup(b"a/b", b"c").unwrap().path, b"a/b/c");
        assert!(ix.lookup(b"a", b"c").is_none());
        assert_eq!(&*ix.get(b"a.b").unwrap().path, b"a.b");
        assert!(ix.get(b"").unwrap().path.is_empty());
    }

    #[test]
    fn cache_round_trips_and_detects_every_flipped_byte() {
        let ix = sample();
        let bytes = ix.encode();
        assert_eq!(LayerIndex::decode(&bytes, &ix.layer).unwrap(), ix);
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(LayerIndex::decode(&b, &ix.layer).is_err(), "byte {i}");
        }
        for n in 0..bytes.len() {
            assert!(
                LayerIndex::decode(&bytes[..n], &ix.layer).is_err(),
                "len {n}"
            );
        }
        let other: Digest = format!("sha256:{}", "cd".repeat(32)).parse().unwrap();
        let e = LayerIndex::decode(&bytes, &other).unwrap_err();
        assert!(e.contains("holds the index of sha256:abab"), "{e}");
    }
}
