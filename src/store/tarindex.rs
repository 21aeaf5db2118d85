//! The indexing pass: one sequential read of a layer blob (plain tar, gzip or zstd) that
//! checks the layer digest and the DiffID, parses the tar headers (ustar, v7, GNU long
//! names and links, PAX extended and global headers), hashes every regular file's content,
//! records gzip checkpoints, and builds a `LayerIndex`.
//!
//! Invariants and policy (tar entries are hostile until proven otherwise):
//! - Never allocate from a size field: file data is streamed through a fixed buffer; PAX
//!   and GNU long-name payloads are refused above `Limits` before being read and are read
//!   incrementally; nothing is preallocated from a count.
//! - Neutralized, as GNU tar does: leading `/` (stripped), `./` and empty or `.`
//!   components (dropped), trailing `/`. Skipped: AUFS metadata (`.wh..wh.*` other than
//!   `.wh..wh..opq`, and anything under it), GNU volume labels.
//! - Rejected with an `IndexError` naming the layer and the entry: `..` components, NUL in a
//!   name, components over 255 bytes, a path through a symlink or a non-directory defined
//!   earlier in the layer, hard links to a missing entry, to a directory or to the root (a
//!   hard link can only name an entry that came earlier in the same layer, so it never
//!   reaches outside it), sizes over `Limits::max_file_size`, files running past the end of
//!   the stream, PAX records whose length does not fit, oversized PAX or long-name headers,
//!   sparse files, unknown entry types, bad header checksums, more than
//!   `Limits::max_entries` entries, corrupt or truncated gzip/zstd, digest mismatches.
//! - Duplicates, later wins, as extraction would do it: a later non-directory replaces an
//!   earlier entry (a directory together with its whole subtree); a later directory over a
//!   directory takes the new metadata and keeps the children (and the opaque mark); a later
//!   directory over a non-directory replaces it.
//! - Header-only types (hard link, symlink, devices, directory, FIFO) have no data records
//!   whatever their size field says (POSIX; Go's archive/tar reads them the same way).
//! - PAX global headers: `mtime`, `uid`, `gid` and xattrs apply to every later entry unless
//!   the entry's own header overrides them; a global `path`, `linkpath` or `size` is ignored.
//! - The end of the archive is the first all-zero block (or the end of the stream at a block
//!   boundary); everything after it is still hashed for the DiffID.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufReader, Read};

use sha2::{Digest as _, Sha256};

use super::gzindex::GzReader;
use super::layerindex::{ErrorKind, IndexError, Kind, LayerIndex, shown};
use super::{Compression, Digest};
use crate::store::layerindex::Entry;

/// Caps on what one layer may make the indexer do.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Tar entries (not counting PAX and long-name headers).
    pub max_entries: u64,
    pub max_file_size: u64,
    /// Bytes of one PAX extended or global header.
    pub max_pax_size: u64,
    /// Bytes of one GNU long name or long link.
    pub max_long_name: u64,
    /// Total bytes of paths, link targets and xattrs kept in the index.
    pub max_metadata: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_entries: 10_000_000,
            max_file_size: 1 << 40,
            max_pax_size: 16 << 20,
            max_long_name: 64 << 10,
            max_metadata: 1 << 30,
        }
    }
}

/// What the caller knows about a layer blob before reading it.
#[derive(Debug, Clone)]
pub struct LayerSource {
    pub compression: Compression,
    /// The blob's digest (manifest descriptor).
    pub layer: Digest,
    /// The uncompressed tar's digest (image config `rootfs.diff_ids`).
    pub diff_id: Digest,
    /// Length of the blob, for progress reports.
    pub size: u64,
}

/// Reads a whole layer blob once and indexes it. `progress(bytes_done, bytes_total)` is
/// called as blob bytes are read (total is `src.size`).
pub fn index_layer<R: Read>(
    blob: R,
    src: &LayerSource,
    limits: &Limits,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<LayerIndex, IndexError> {
    index_blob(blob, src, limits, progress, true)
}

/// `index_layer` for a blob that nothing names (a compressed layer of a legacy
/// docker-archive): its digest is learnt from the same pass, and the DiffID (checked as
/// always) is what vouches for it. `src.layer` only names the layer in errors.
pub fn index_unnamed_layer<R: Read>(
    blob: R,
    src: &LayerSource,
    limits: &Limits,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<LayerIndex, IndexError> {
    index_blob(blob, src, limits, progress, false)
}

fn index_blob<R: Read>(
    blob: R,
    src: &LayerSource,
    limits: &Limits,
    progress: &mut dyn FnMut(u64, u64),
    named: bool,
) -> Result<LayerIndex, IndexError> {
    let layer = &src.layer;
    // The blob's own digest is computed on a second thread: for a plain layer that is the
    // whole stream, hashed while this thread parses and hashes each file.
    let mut raw = Hashing {
        inner: blob,
        sha: None,
        n: 0,
        progress: Some((progress, src.size)),
        side: Some(SideHasher::start()),
    };
    let parsed = parse_stream(&mut raw, src, limits);
    // Hash the rest of the blob (trailing bytes, or what a failed parse left) so that a
    // wrong blob is reported as such rather than as whatever broke first.
    let drained = io::copy(&mut raw, &mut io::sink());
    let blob_digest = match raw.side.take() {
        Some(s) => s.finish(),
        None => Digest::from_bytes(raw.sha.take().unwrap_or_default().finalize().into()),
    };
    if let Err(e) = drained {
        return Err(IndexError::io(layer, "reading the blob", &e));
    }
    if named && blob_digest != *layer {
        return Err(IndexError::new(
            ErrorKind::LayerDigest,
            layer,
            format!(
                "layer digest mismatch: the blob ({} bytes) hashes to {blob_digest}",
                raw.n
            ),
        ));
    }
    let (builder, checkpoints, tar_size, diff) = parsed?;
    let diff = diff.unwrap_or(blob_digest);
    if diff != src.diff_id {
        return Err(IndexError::new(
            ErrorKind::DiffId,
            layer,
            format!(
                "DiffID mismatch: the uncompressed stream hashes to {diff}, the image config says {}",
                src.diff_id
            ),
        ));
    }
    let learnt;
    let src = if named {
        src
    } else {
        learnt = LayerSource {
            layer: blob_digest,
            ..src.clone()
        };
        &learnt
    };
    Ok(builder.finish(src, raw.n, tar_size, checkpoints))
}

type Parsed = (
    Builder,
    Vec<super::gzindex::Checkpoint>,
    u64,
    Option<Digest>,
);

/// Decompresses and parses; returns the uncompressed digest for compressed layers.
fn parse_stream<R: Read>(
    raw: &mut Hashing<'_, R>,
    src: &LayerSource,
    limits: &Limits,
) -> Result<Parsed, IndexError> {
    let layer = &src.layer;
    match src.compression {
        Compression::None => {
            let mut counted = Hashing {
                inner: raw,
                sha: None,
                n: 0,
                progress: None,
                side: None,
            };
            // The layer digest is the DiffID here: hash once, in `raw`.
            let b = parse_tar(
                BufReader::with_capacity(256 << 10, &mut counted),
                layer,
                limits,
            )?;
            let n = drain(&mut counted, layer)?;
            Ok((b, Vec::new(), n, None))
        }
        Compression::Gzip => {
            let mut gz = GzReader::indexing(raw)
                .map_err(|e| IndexError::new(ErrorKind::Compressed, layer, e.to_string()))?;
            let (b, n, d) = parse_decompressed(&mut gz, layer, limits)?;
            Ok((b, gz.take_checkpoints(), n, Some(d)))
        }
        Compression::Zstd => {
            let dec = zstd::stream::read::Decoder::new(raw)
                .map_err(|e| IndexError::new(ErrorKind::Compressed, layer, format!("zstd: {e}")))?;
            let (b, n, d) = parse_decompressed(ZstdErrors(dec), layer, limits)?;
            Ok((b, Vec::new(), n, Some(d)))
        }
    }
}

/// Parses a decompressed stream; returns the entries, the stream's length and its digest
/// (the DiffID), which is hashed on its own thread while this one parses and hashes files.
fn parse_decompressed<R: Read>(
    stream: R,
    layer: &Digest,
    limits: &Limits,
) -> Result<(Builder, u64, Digest), IndexError> {
    let mut diff = Hashing {
        inner: stream,
        sha: None,
        n: 0,
        progress: None,
        side: Some(SideHasher::start()),
    };
    let b = parse_tar(
        BufReader::with_capacity(256 << 10, &mut diff),
        layer,
        limits,
    )?;
    let n = drain(&mut diff, layer)?;
    let d = diff
        .side
        .take()
        .map_or(Digest::from_bytes([0; 32]), SideHasher::finish);
    Ok((b, n, d))
}

/// Reads the rest of the uncompressed stream; returns its total length.
fn drain<R: Read>(h: &mut Hashing<'_, R>, layer: &Digest) -> Result<u64, IndexError> {
    io::copy(h, &mut io::sink()).map_err(|e| stream_err(layer, None, &e))?;
    Ok(h.n)
}

/// Marks zstd decoder errors as such.
struct ZstdErrors<R: Read>(R);

impl<R: Read> Read for ZstdErrors<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("zstd data corrupt or truncated: {e}"),
            )
        })
    }
}

type Progress<'p> = &'p mut dyn FnMut(u64, u64);

/// A sha256 computed on its own thread from chunks sent to it.
struct SideHasher {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    handle: Option<std::thread::JoinHandle<Digest>>,
    /// Used when the thread could not be started.
    inline: Option<Sha256>,
}

impl SideHasher {
    fn start() -> SideHasher {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let spawned = std::thread::Builder::new()
            .name("blob-sha256".into())
            .spawn(move || {
                let mut h = Sha256::new();
                for chunk in rx {
                    h.update(&chunk);
                }
                Digest::from_bytes(h.finalize().into())
            });
        match spawned {
            Ok(handle) => SideHasher {
                tx: Some(tx),
                handle: Some(handle),
                inline: None,
            },
            Err(_) => SideHasher {
                tx: None,
                handle: None,
                inline: Some(Sha256::new()),
            },
        }
    }

    fn update(&mut self, b: &[u8]) {
        if let Some(h) = self.inline.as_mut() {
            h.update(b);
            return;
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(b.to_vec()));
        if !matches!(sent, Some(Ok(()))) {
            // The thread is gone (it cannot fail on its own): make the digest unusable.
            let mut h = Sha256::new();
            h.update(b"\0side hasher lost\0");
            self.inline = Some(h);
        }
    }

    fn finish(mut self) -> Digest {
        if let Some(h) = self.inline.take() {
            return Digest::from_bytes(h.finalize().into());
        }
        drop(self.tx.take());
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(d)) => d,
            _ => Digest::from_bytes([0; 32]),
        }
    }
}

/// Hashes and counts what passes through; reports progress.
struct Hashing<'p, R: Read> {
    inner: R,
    /// None: count only.
    sha: Option<Sha256>,
    n: u64,
    progress: Option<(Progress<'p>, u64)>,
    /// Hashes on another thread instead of `sha`.
    side: Option<SideHasher>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(sha) = self.sha.as_mut() {
            sha.update(&buf[..n]);
        }
        if let Some(side) = self.side.as_mut() {
            side.update(&buf[..n]);
        }
        self.n += n as u64;
        if let Some((f, total)) = self.progress.as_mut() {
            f(self.n, *total);
        }
        Ok(n)
    }
}

/// A failure of the underlying stream: compressed-data errors are `Compressed`.
fn stream_err(layer: &Digest, path: Option<&[u8]>, e: &io::Error) -> IndexError {
    let kind = match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof => ErrorKind::Compressed,
        _ => ErrorKind::Io,
    };
    let mut err = IndexError::new(kind, layer, e.to_string());
    if kind == ErrorKind::Io {
        err.io_kind = Some(e.kind());
    }
    err.path = path.map(Into::into);
    err
}

/// A tar stream with its position.
struct TarReader<R: Read> {
    r: R,
    pos: u64,
}

impl<R: Read> TarReader<R> {
    /// Reads up to `buf.len()` bytes; returns how many (short only at the end of stream).
    fn read_full(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }
}

const BLOCK: usize = 512;

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Parses a numeric header field: octal text, or GNU base-256 when the high bit is set.
fn parse_num(field: &[u8]) -> Option<i64> {
    if let Some(&first) = field.first()
        && first & 0x80 != 0
    {
        let negative = first & 0x40 != 0;
        let mut v: i128 = 0;
        for (i, &b) in field.iter().enumerate() {
            let b = if i == 0 { b & 0x7f } else { b };
            v = v.checked_mul(256)?.checked_add(i128::from(b))?;
        }
        if negative {
            // Two's complement over the field width: the sign bit is worth -2^(width-1).
            v -= 1i128.checked_shl(u32::try_from(field.len() * 8 - 1).ok()?)?;
        }
        return i64::try_from(v).ok();
    }
    let s: Vec<u8> = field
        .iter()
        .copied()
        .skip_while(|&b| b == b' ' || b == 0)
        .take_while(|&b| b != b' ' && b != 0)
        .collect();
    let mut v: i64 = 0;
    for b in s {
        if !(b'0'..=b'7').contains(&b) {
            return None;
        }
        v = v.checked_mul(8)?.checked_add(i64::from(b - b'0'))?;
    }
    Some(v)
}

fn cstr(field: &[u8]) -> &[u8] {
    match field.iter().position(|&b| b == 0) {
        Some(i) => &field[..i],
        None => field,
    }
}

fn checksum_ok(block: &[u8; BLOCK]) -> bool {
    let Some(want) = parse_num(&block[148..156]) else {
        return false;
    };
    let mut unsigned: i64 = 0;
    let mut signed: i64 = 0;
    for (i, &b) in block.iter().enumerate() {
        let b = if (148..156).contains(&i) { b' ' } else { b };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    want == unsigned || want == signed
}

/// PAX values of one header (extended or global).
#[derive(Default, Clone)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime_ns: Option<i64>,
    dev_major: Option<u32>,
    dev_minor: Option<u32>,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// `[-]seconds[.fraction]` → ns, clamped to the i64 range.
fn parse_pax_time(v: &[u8]) -> Option<i64> {
    let (neg, v) = match v.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, v),
    };
    let (secs, frac) = match v.iter().position(|&b| b == b'.') {
        Some(i) => (&v[..i], &v[i + 1..]),
        None => (v, &[][..]),
    };
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let secs = i128::from(parse_decimal(secs)?);
    let mut ns: i128 = 0;
    for i in 0..9 {
        ns = ns * 10 + frac.get(i).map_or(0, |d| i128::from(d - b'0'));
    }
    let total = secs * 1_000_000_000 + ns;
    let total = if neg { -total } else { total };
    Some(total.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

fn percent_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let h = std::str::from_utf8(s.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3 + 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return None,
        };
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Parses PAX records `"<len> <key>=<value>\n"` into `pax`. Errors are one line.
fn parse_pax(data: &[u8], pax: &mut Pax) -> Result<(), String> {
    let mut rest = data;
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break;
        }
        let sp = rest
            .iter()
            .take(21)
            .position(|&b| b == b' ')
            .ok_or("malformed PAX record (no length)")?;
        let len = parse_decimal(&rest[..sp]).ok_or("malformed PAX record length")?;
        if len > rest.len() as u64 || len < sp as u64 + 3 {
            return Err(format!(
                "PAX record length {len} does not fit the {} bytes left in the header",
                rest.len()
            ));
        }
        let len = len as usize;
        let rec = &rest[sp + 1..len];
        rest = &rest[len..];
        let Some(rec) = rec.strip_suffix(b"\n") else {
            return Err("malformed PAX record (no newline)".into());
        };
        let eq = rec
            .iter()
            .position(|&b| b == b'=')
            .ok_or("malformed PAX record (no '=')")?;
        let (key, value) = (&rec[..eq], &rec[eq + 1..]);
        let num = |what: &str| -> Result<Option<u64>, String> {
            if value.is_empty() {
                return Ok(None);
            }
            parse_decimal(value)
                .map(Some)
                .ok_or_else(|| format!("bad PAX {what} {}", shown(value)))
        };
        let id = |what: &str| -> Result<Option<u32>, String> {
            num(what)?
                .map(|v| u32::try_from(v).map_err(|_| format!("PAX {what} {v} out of range")))
                .transpose()
        };
        match key {
            b"path" => pax.path = (!value.is_empty()).then(|| value.to_vec()),
            b"linkpath" => pax.linkpath = (!value.is_empty()).then(|| value.to_vec()),
            b"size" => pax.size = num("size")?,
            b"uid" => pax.uid = id("uid")?,
            b"gid" => pax.gid = id("gid")?,
            b"SCHILY.devmajor" => pax.dev_major = id("devmajor")?,
            b"SCHILY.devminor" => pax.dev_minor = id("devminor")?,
            b"mtime" => {
                pax.mtime_ns = if value.is_empty() {
                    None
                } else {
                    Some(
                        parse_pax_time(value)
                            .ok_or_else(|| format!("bad PAX mtime {}", shown(value)))?,
                    )
                }
            }
            _ if key.starts_with(b"SCHILY.xattr.") => {
                let name = &key[b"SCHILY.xattr.".len()..];
                if name.is_empty() || name.contains(&0) {
                    return Err("PAX xattr with an invalid name".into());
                }
                pax.xattrs.insert(name.to_vec(), value.to_vec());
            }
            _ if key.starts_with(b"LIBARCHIVE.xattr.") => {
                let name = percent_decode(&key[b"LIBARCHIVE.xattr.".len()..])
                    .filter(|n| !n.is_empty() && !n.contains(&0))
                    .ok_or("LIBARCHIVE xattr with an invalid name")?;
                let v = base64_decode(value).ok_or("LIBARCHIVE xattr value is not base64")?;
                pax.xattrs.insert(name, v);
            }
            _ if key.starts_with(b"GNU.sparse.") => {
                return Err("sparse files are not supported".into());
            }
            _ => {}
        }
    }
    Ok(())
}

/// Normalizes a tar path (see the module doc). `Err` is the reason, for a message.
pub fn normalize(raw: &[u8]) -> Result<Vec<u8>, &'static str> {
    if raw.contains(&0) {
        return Err("name contains a NUL byte");
    }
    let mut out = Vec::with_capacity(raw.len());
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("path has a '..' component"),
            _ if c.len() > 255 => return Err("path component longer than 255 bytes"),
            _ => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

/// What a header describes, before the layer's rules are applied.
enum RawKind {
    Object(Kind),
    Hardlink,
}

struct RawEntry {
    name: Vec<u8>,
    link: Vec<u8>,
    kind: RawKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    size: u64,
    offset: u64,
    sha256: Option<Digest>,
    dev_major: u32,
    dev_minor: u32,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn parse_tar<R: Read>(r: R, layer: &Digest, limits: &Limits) -> Result<Builder, IndexError> {
    let mut t = TarReader { r, pos: 0 };
    let mut b = Builder::new(*layer, limits.clone());
    let mut block = [0u8; BLOCK];
    let mut pax = Pax::default();
    let mut global = Pax::default();
    let mut long_name: Option<Vec<u8>> = None;
    let mut long_link: Option<Vec<u8>> = None;
    let mut seen: u64 = 0;
    let mut buf = vec![0u8; 64 * 1024];
    let tar_err = |at: u64, detail: String| {
        IndexError::new(
            ErrorKind::Tar,
            layer,
            format!("tar header at offset {at}: {detail}"),
        )
    };
    loop {
        let at = t.pos;
        let n = t
            .read_full(&mut block)
            .map_err(|e| stream_err(layer, None, &e))?;
        if n == 0 {
            break;
        }
        if n < BLOCK {
            return Err(tar_err(at, "the stream ends inside the header".into()));
        }
        if block.iter().all(|&b| b == 0) {
            break;
        }
        if !checksum_ok(&block) {
            return Err(tar_err(
                at,
                "bad header checksum (not a tar stream, or corrupt)".into(),
            ));
        }
        let typeflag = block[156];
        let hdr_name = {
            let name = cstr(&block[0..100]);
            let prefix = cstr(&block[345..500]);
            if &block[257..263] == b"ustar\0" && !prefix.is_empty() {
                let mut v = prefix.to_vec();
                v.push(b'/');
                v.extend_from_slice(name);
                v
            } else {
                name.to_vec()
            }
        };
        let raw_size = parse_num(&block[124..136])
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| tar_err(at, "bad size field".into()))?;
        let shown_name = |pax: &Pax, long: &Option<Vec<u8>>| {
            pax.path
                .clone()
                .or_else(|| long.clone())
                .unwrap_or_else(|| hdr_name.clone())
        };
        // Metadata headers: read their payload (bounded), then go on to the next header.
        let meta_cap = match typeflag {
            b'L' | b'K' => Some(limits.max_long_name),
            b'x' | b'g' => Some(limits.max_pax_size),
            _ => None,
        };
        if let Some(cap) = meta_cap {
            let what = match typeflag {
                b'L' => "GNU long name",
                b'K' => "GNU long link",
                b'x' => "PAX extended header",
                _ => "PAX global header",
            };
            if raw_size > cap {
                return Err(IndexError::entry(
                    layer,
                    &shown_name(&pax, &long_name),
                    ErrorKind::Limit,
                    format!("{what} of {raw_size} bytes exceeds the limit of {cap}"),
                ));
            }
            let mut data = Vec::new();
            (&mut t.r)
                .take(raw_size + padding(raw_size))
                .read_to_end(&mut data)
                .map_err(|e| stream_err(layer, None, &e))?;
            t.pos += data.len() as u64;
            if (data.len() as u64) < raw_size + padding(raw_size) {
                return Err(tar_err(at, format!("the stream ends inside a {what}")));
            }
            data.truncate(raw_size as usize);
            match typeflag {
                b'L' => long_name = Some(cstr(&data).to_vec()),
                b'K' => long_link = Some(cstr(&data).to_vec()),
                b'x' => parse_pax(&data, &mut pax).map_err(|d| {
                    IndexError::entry(layer, &shown_name(&pax, &long_name), ErrorKind::Entry, d)
                })?,
                _ => parse_pax(&data, &mut global).map_err(|d| {
                    IndexError::new(ErrorKind::Entry, layer, format!("PAX global header: {d}"))
                })?,
            }
            continue;
        }
        let name = shown_name(&pax, &long_name);
        let ent_err = |kind: ErrorKind, d: String| IndexError::entry(layer, &name, kind, d);
        seen += 1;
        if seen > limits.max_entries {
            return Err(IndexError::new(
                ErrorKind::Limit,
                layer,
                format!("more than {} entries", limits.max_entries),
            ));
        }
        let link = pax
            .linkpath
            .take()
            .or_else(|| long_link.take())
            .unwrap_or_else(|| cstr(&block[157..257]).to_vec());
        let size = pax.size.unwrap_or(raw_size);
        let num = |range: std::ops::Range<usize>, what: &str| {
            parse_num(&block[range])
                .ok_or_else(|| ent_err(ErrorKind::Tar, format!("bad {what} field")))
        };
        let id = |v: i64, what: &str| {
            u32::try_from(v)
                .map_err(|_| ent_err(ErrorKind::Entry, format!("{what} {v} out of range")))
        };
        let mode = (num(100..108, "mode")? & 0o7777) as u32;
        let uid = match pax.uid.or(global.uid) {
            Some(v) => v,
            None => id(num(108..116, "uid")?, "uid")?,
        };
        let gid = match pax.gid.or(global.gid) {
            Some(v) => v,
            None => id(num(116..124, "gid")?, "gid")?,
        };
        let mtime_ns = match pax.mtime_ns.or(global.mtime_ns) {
            Some(v) => v,
            None => num(136..148, "mtime")?.saturating_mul(1_000_000_000),
        };
        let (dev_major, dev_minor) = if matches!(typeflag, b'3' | b'4') {
            (
                match pax.dev_major {
                    Some(v) => v,
                    None => id(num(329..337, "devmajor")?, "devmajor")?,
                },
                match pax.dev_minor {
                    Some(v) => v,
                    None => id(num(337..345, "devminor")?, "devminor")?,
                },
            )
        } else {
            (0, 0)
        };
        let kind = match typeflag {
            b'0' | 0 | b'7' if name.ends_with(b"/") => RawKind::Object(Kind::Dir),
            b'0' | 0 | b'7' => RawKind::Object(Kind::File),
            b'1' => RawKind::Hardlink,
            b'2' => RawKind::Object(Kind::Symlink),
            b'3' => RawKind::Object(Kind::Char),
            b'4' => RawKind::Object(Kind::Block),
            b'5' | b'D' => RawKind::Object(Kind::Dir),
            b'6' => RawKind::Object(Kind::Fifo),
            b'V' => RawKind::Object(Kind::Whiteout), // volume label: skipped below
            b'S' => {
                return Err(ent_err(
                    ErrorKind::Entry,
                    "sparse files are not supported".into(),
                ));
            }
            other => {
                return Err(ent_err(
                    ErrorKind::Entry,
                    format!("unsupported entry type {:?}", other as char),
                ));
            }
        };
        // Data records: regular files (hashed), GNU dumpdirs and volume labels (skipped).
        let has_data =
            matches!(kind, RawKind::Object(Kind::File)) || matches!(typeflag, b'D' | b'V');
        if size > limits.max_file_size {
            return Err(ent_err(
                ErrorKind::Limit,
                format!(
                    "size {size} exceeds the limit of {} bytes",
                    limits.max_file_size
                ),
            ));
        }
        let offset = t.pos;
        let mut sha256 = None;
        if has_data {
            let mut sha = Sha256::new();
            let mut left = size + padding(size);
            let mut content = size;
            while left > 0 {
                let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let n = t
                    .read_full(&mut buf[..want])
                    .map_err(|e| stream_err(layer, Some(&name), &e))?;
                let c = (n as u64).min(content) as usize;
                sha.update(&buf[..c]);
                content -= c as u64;
                left -= n as u64;
                if n < want {
                    return Err(ent_err(
                        ErrorKind::Tar,
                        format!(
                            "size {size} runs past the end of the stream ({} bytes missing)",
                            left - padding(size).min(left)
                        ),
                    ));
                }
            }
            sha256 = Some(Digest::from_bytes(sha.finalize().into()));
        }
        let mut xattrs = global.xattrs.clone();
        xattrs.append(&mut pax.xattrs);
        let raw = RawEntry {
            name,
            link,
            kind,
            mode,
            uid,
            gid,
            mtime_ns,
            size: if has_data { size } else { 0 },
            offset,
            sha256,
            dev_major,
            dev_minor,
            xattrs,
        };
        pax = Pax::default();
        long_name = None;
        long_link = None;
        if typeflag != b'V' {
            b.add(raw)?;
        }
    }
    Ok(b)
}

/// Applies the layer's rules to entries in tar order.
struct Builder {
    layer: Digest,
    limits: Limits,
    root: Entry,
    map: BTreeMap<Vec<u8>, Entry>,
    whiteouts: BTreeSet<Vec<u8>>,
    next_group: u32,
    metadata: u64,
}

const OPAQUE: &[u8] = b".wh..wh..opq";

impl Builder {
    fn new(layer: Digest, limits: Limits) -> Builder {
        Builder {
            layer,
            limits,
            root: Entry::synthesized_dir(b""),
            map: BTreeMap::new(),
            whiteouts: BTreeSet::new(),
            next_group: 0,
            metadata: 0,
        }
    }

    fn err(&self, path: &[u8], detail: impl Into<String>) -> IndexError {
        IndexError::entry(&self.layer, path, ErrorKind::Entry, detail)
    }

    /// Creates missing ancestors of `path` as synthesized directories; refuses a path whose
    /// ancestor is a symlink or another non-directory.
    fn ensure_parents(&mut self, path: &[u8], shown_as: &[u8]) -> Result<(), IndexError> {
        for (i, _) in path.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            let dir = &path[..i];
            match self.map.get(dir).map(|e| e.kind) {
                None => {
                    self.map.insert(dir.to_vec(), Entry::synthesized_dir(dir));
                }
                Some(Kind::Dir) => {}
                Some(Kind::Symlink) => {
                    return Err(self.err(
                        shown_as,
                        format!(
                            "path goes through symlink {} defined earlier in this layer",
                            shown(dir)
                        ),
                    ));
                }
                Some(_) => {
                    return Err(self.err(
                        shown_as,
                        format!("parent {} is not a directory", shown(dir)),
                    ));
                }
            }
        }
        Ok(())
    }

    fn remove_subtree(&mut self, path: &[u8]) {
        let mut prefix = path.to_vec();
        prefix.push(b'/');
        let under = |k: &&Vec<u8>| k.starts_with(&prefix);
        let keys: Vec<Vec<u8>> = self
            .map
            .range(prefix.clone()..)
            .map(|(k, _)| k)
            .take_while(under)
            .cloned()
            .collect();
        for k in keys {
            self.map.remove(&k);
        }
        let wkeys: Vec<Vec<u8>> = self
            .whiteouts
            .range(prefix.clone()..)
            .take_while(under)
            .cloned()
            .collect();
        for k in wkeys {
            self.whiteouts.remove(&k);
        }
    }

    fn account(&mut self, path: &[u8], n: usize) -> Result<(), IndexError> {
        self.metadata += n as u64;
        if self.metadata > self.limits.max_metadata {
            return Err(IndexError::entry(
                &self.layer,
                path,
                ErrorKind::Limit,
                format!(
                    "index metadata exceeds the limit of {} bytes",
                    self.limits.max_metadata
                ),
            ));
        }
        Ok(())
    }

    fn add(&mut self, raw: RawEntry) -> Result<(), IndexError> {
        let path = normalize(&raw.name).map_err(|d| self.err(&raw.name, d))?;
        let comps: Vec<&[u8]> = if path.is_empty() {
            Vec::new()
        } else {
            path.split(|&b| b == b'/').collect()
        };
        let (last, dirs) = match comps.split_last() {
            Some((l, d)) => (*l, d),
            None => (&b""[..], &[][..]),
        };
        // AUFS metadata (.wh..wh.plnk, .wh..wh.aufs and what is under them): not content.
        if dirs.iter().any(|c| c.starts_with(b".wh..wh."))
            || (last.starts_with(b".wh..wh.") && last != OPAQUE)
        {
            return Ok(());
        }
        if dirs.iter().any(|c| c.starts_with(b".wh.")) {
            return Err(self.err(&raw.name, "entry inside a whiteout marker"));
        }
        self.account(&raw.name, path.len() + raw.link.len())?;
        let (parent, _) = super::layerindex::split_path(&path);
        if last == OPAQUE {
            self.ensure_parents(&path, &raw.name)?;
            match self.map.get_mut(parent) {
                Some(e) => e.opaque = true,
                None => self.root.opaque = true,
            }
            return Ok(());
        }
        if let Some(hidden) = last.strip_prefix(b".wh.") {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(self.err(&raw.name, "whiteout marker without a valid name"));
            }
            self.ensure_parents(&path, &raw.name)?;
            let mut w = parent.to_vec();
            if !w.is_empty() {
                w.push(b'/');
            }
            w.extend_from_slice(hidden);
            self.whiteouts.insert(w);
            return Ok(());
        }
        let xattr_bytes: usize = raw.xattrs.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.account(&raw.name, xattr_bytes)?;
        if path.is_empty() {
            if !matches!(raw.kind, RawKind::Object(Kind::Dir)) {
                return Err(self.err(&raw.name, "the layer root is not a directory"));
            }
            let opaque = self.root.opaque;
            self.root = self.object(&path, raw, Kind::Dir);
            self.root.opaque = opaque;
            return Ok(());
        }
        self.ensure_parents(&path, &raw.name)?;
        let new = match raw.kind {
            RawKind::Hardlink => {
                let target = normalize(&raw.link)
                    .map_err(|d| self.err(&raw.name, format!("hard link target: {d}")))?;
                if target.is_empty() {
                    return Err(self.err(&raw.name, "hard link to the layer root"));
                }
                if target == path {
                    return Ok(());
                }
                let Some(t) = self.map.get_mut(&target) else {
                    return Err(self.err(
                        &raw.name,
                        format!(
                            "hard link target {} is not an earlier entry of this layer",
                            shown(&target)
                        ),
                    ));
                };
                if t.kind == Kind::Dir {
                    return Err(self.err(
                        &raw.name,
                        format!("hard link to directory {}", shown(&target)),
                    ));
                }
                if t.link_group == 0 {
                    self.next_group += 1;
                    t.link_group = self.next_group;
                }
                Entry {
                    path: path.clone().into(),
                    hardlink_target: Some(target.into()),
                    opaque: false,
                    synthesized: false,
                    ..t.clone()
                }
            }
            RawKind::Object(kind) => {
                if kind == Kind::Symlink {
                    if raw.link.is_empty() {
                        return Err(self.err(&raw.name, "symlink with an empty target"));
                    }
                    if raw.link.contains(&0) || raw.link.len() > 4095 {
                        return Err(self.err(
                            &raw.name,
                            "symlink target contains NUL or is longer than 4095 bytes",
                        ));
                    }
                }
                self.object(&path, raw, kind)
            }
        };
        match self.map.get_mut(&path) {
            Some(old) if old.kind == Kind::Dir && new.kind == Kind::Dir => {
                let opaque = old.opaque;
                *old = new;
                old.opaque = opaque;
            }
            Some(old) if old.kind == Kind::Dir => {
                self.remove_subtree(&path);
                self.map.insert(path, new);
            }
            _ => {
                self.map.insert(path, new);
            }
        }
        Ok(())
    }

    fn object(&self, path: &[u8], raw: RawEntry, kind: Kind) -> Entry {
        let is_link = kind == Kind::Symlink;
        Entry {
            path: path.into(),
            kind,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            mtime_ns: raw.mtime_ns,
            size: match kind {
                Kind::File => raw.size,
                Kind::Symlink => raw.link.len() as u64,
                _ => 0,
            },
            offset: if kind == Kind::File { raw.offset } else { 0 },
            sha256: if kind == Kind::File { raw.sha256 } else { None },
            link_target: is_link.then(|| raw.link.into()),
            hardlink_target: None,
            link_group: 0,
            dev_major: raw.dev_major,
            dev_minor: raw.dev_minor,
            xattrs: raw
                .xattrs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
            opaque: false,
            synthesized: false,
        }
    }

    fn finish(
        mut self,
        src: &LayerSource,
        blob_size: u64,
        tar_size: u64,
        checkpoints: Vec<super::gzindex::Checkpoint>,
    ) -> LayerIndex {
        for w in std::mem::take(&mut self.whiteouts) {
            match self.map.get_mut(&w) {
                Some(e) if e.kind == Kind::Dir => e.opaque = true,
                Some(_) => {}
                None => {
                    let e = Entry {
                        kind: Kind::Whiteout,
                        mode: 0,
                        synthesized: false,
                        ..Entry::synthesized_dir(&w)
                    };
                    self.map.insert(w, e);
                }
            }
        }
        // A group left with one member (the others were replaced later) is no group.
        let mut counts: BTreeMap<u32, u32> = BTreeMap::new();
        for e in self.map.values().filter(|e| e.link_group != 0) {
            *counts.entry(e.link_group).or_default() += 1;
        }
        for e in self.map.values_mut() {
            if e.link_group != 0 && counts.get(&e.link_group) == Some(&1) {
                e.link_group = 0;
            }
        }
        LayerIndex::from_parts(
            src.layer,
            src.diff_id,
            src.compression,
            blob_size,
            tar_size,
            self.root,
            self.map.into_values().collect(),
            checkpoints,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_neutralizes_and_rejects() {
        assert_eq!(normalize(b"./a//b/./c/").unwrap(), b"a/b/c");
        assert_eq!(normalize(b"/etc/passwd").unwrap(), b"etc/passwd");
        assert_eq!(normalize(b"./").unwrap(), b"");
        assert_eq!(
            normalize(b"a/../b").unwrap_err(),
            "path has a '..' component"
        );
        assert_eq!(normalize(b"a\0b").unwrap_err(), "name contains a NUL byte");
        assert!(normalize(&[b'x'; 256]).is_err());
        assert!(normalize(&[b'x'; 255]).is_ok());
    }

    #[test]
    fn numbers_octal_and_base256() {
        assert_eq!(parse_num(b"0000644\0"), Some(0o644));
        assert_eq!(parse_num(b"   755 \0"), Some(0o755));
        assert_eq!(parse_num(b"\0\0\0\0"), Some(0));
        assert_eq!(parse_num(b"0009"), None);
        let mut f = [0u8; 12];
        f[0] = 0x80;
        f[11] = 5;
        f[10] = 1;
        assert_eq!(parse_num(&f), Some(261));
        assert_eq!(
            parse_num(&[
                0x80, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff
            ]),
            None
        );
        assert_eq!(parse_num(&[0xff; 8]), Some(-1));
    }

    /// One PAX record with its self-inclusive length.
    fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
        let body = key.len() + value.len() + 3;
        let mut len = body + body.to_string().len();
        if len.to_string().len() != body.to_string().len() {
            len += 1;
        }
        let mut v = format!("{len} {key}=").into_bytes();
        v.extend_from_slice(value);
        v.push(b'\n');
        assert_eq!(v.len(), len);
        v
    }

    #[test]
    fn pax_records() {
        let mut p = Pax::default();
        let mut data = pax_record("mtime", b"1.500000001");
        data.extend(pax_record("SCHILY.xattr.user.a", b"b"));
        parse_pax(&data, &mut p).unwrap();
        assert_eq!(p.mtime_ns, Some(1_500_000_001));
        assert_eq!(p.xattrs.get(&b"user.a"[..]).unwrap(), b"b");
        let mut p = Pax::default();
        parse_pax(
            &pax_record("LIBARCHIVE.xattr.user.%41", b"aGVsbG8="),
            &mut p,
        )
        .unwrap();
        assert_eq!(p.xattrs.get(&b"user.A"[..]).unwrap(), b"hello");
        let e = parse_pax(b"99999999999 path=x\n", &mut Pax::default()).unwrap_err();
        assert!(
            e.contains("PAX record length 99999999999 does not fit"),
            "{e}"
        );
        assert!(parse_pax(b"5 a=b\n", &mut Pax::default()).is_err());
        assert_eq!(parse_pax_time(b"-1.5"), Some(-1_500_000_000));
        assert_eq!(parse_pax_time(b"18446744073709551615"), Some(i64::MAX));
        assert_eq!(base64_decode(b"AAEC").unwrap(), [0, 1, 2]);
    }
}
