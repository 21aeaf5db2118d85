//! `IndexLayer`: an image layer served from its index and blob in the store, as a
//! `VirtualLayer` of the union. Metadata comes from the index alone; a file's bytes are
//! read from the blob on its first open, checked against the entry's sha256, and kept in
//! `objects/` by that digest (shared by every layer and image holding the same content).
//!
//! Invariants:
//! - entry ids: 0 is the root; `1 + i` is `index.entries()[i]`; ids with `WH_BIT` are the
//!   synthesized `.wh.NAME` marker of whiteout entry `id & !WH_BIT`, ids with `OPQ_BIT` the
//!   `.wh..wh..opq` marker of opaque directory `id & !OPQ_BIT` (the union reads the OCI
//!   dialect; the index stores whiteouts and opacity as flags);
//! - a whiteout entry (`Kind::Whiteout`) is not an object of the layer: its name is absent;
//! - hard links (one `link_group`) share `st_ino`;
//! - bytes reach a caller only from `objects/`, and an object is published (rename from
//!   `tmp/`, no fsync: it is a cache) only after its sha256 matched, and rehashed the first
//!   time a daemon opens it; a mismatch or a read error is EIO plus one error line naming the
//!   layer digest and the path.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use nix::sys::stat::FileStat;

use std::io::Write;

use sha2::{Digest as _, Sha256};

use super::layerindex::{Entry, FileRange, Kind, LayerIndex};
use super::spans::SpanReader;
use super::{Digest, Store};
use crate::layer::VirtualLayer;
use crate::layer::virt::EntryId;
use crate::union::whiteout::{OPAQUE_MARKER, WH_PREFIX};

const WH_BIT: u64 = 1 << 62;
const OPQ_BIT: u64 = 1 << 61;
/// st_ino of hard-link groups, above every entry id.
const GROUP_BASE: u64 = 1 << 40;

/// Where a layer's blob is: a file in the store, or a byte range of an archive read in place.
#[derive(Debug, Clone)]
pub struct BlobAt {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

#[derive(Debug)]
pub struct IndexLayer {
    index: Arc<LayerIndex>,
    store: Store,
    blob: BlobAt,
    dev: u64,
    /// The blob's uncompressed stream, opened on the first fetch.
    spans: Mutex<Option<Arc<SpanReader>>>,
    /// Objects whose bytes were hashed (or written) by this daemon and matched.
    verified: Arc<Verified>,
    /// The last fetch failure logged, and when: the kernel asks again at once (readahead,
    /// then the read itself, without OPEN on a read-only mount), and one failed read is
    /// one log line.
    last_failure: Mutex<Option<(String, std::time::Instant)>>,
}

/// Digests of the objects in `objects/` this daemon has checked, shared by the layers of a
/// mount: objects are published without fsync (they are a cache), so an object is rehashed
/// the first time this daemon opens it, and a bad one is deleted and fetched again.
#[derive(Debug, Default)]
pub struct Verified(Mutex<std::collections::HashSet<Digest>>);

impl Verified {
    fn has(&self, d: &Digest) -> bool {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).contains(d)
    }

    fn add(&self, d: Digest) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(d);
    }
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl IndexLayer {
    pub fn new(
        index: Arc<LayerIndex>,
        store: Store,
        dev: u64,
        verified: Arc<Verified>,
        blob: BlobAt,
    ) -> IndexLayer {
        IndexLayer {
            index,
            store,
            blob,
            dev,
            spans: Mutex::new(None),
            verified,
            last_failure: Mutex::new(None),
        }
    }

    pub fn digest(&self) -> Digest {
        self.index.layer
    }

    fn entry(&self, id: EntryId) -> io::Result<&Entry> {
        if id == 0 {
            return Ok(self.index.root());
        }
        self.index
            .entries()
            .get((id - 1) as usize)
            .ok_or_else(|| err(libc::ENOENT))
    }

    fn dir_entry(&self, id: EntryId) -> io::Result<&Entry> {
        if id & (WH_BIT | OPQ_BIT) != 0 {
            return Err(err(libc::ENOTDIR));
        }
        let e = self.entry(id)?;
        if e.kind != Kind::Dir {
            return Err(err(libc::ENOTDIR));
        }
        Ok(e)
    }

    fn ino_of(&self, id: EntryId, e: &Entry) -> u64 {
        if e.link_group != 0 {
            GROUP_BASE + u64::from(e.link_group)
        } else {
            id + 1
        }
    }

    fn spans(&self) -> io::Result<Arc<SpanReader>> {
        let mut g = self.spans.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = &*g {
            return Ok(r.clone());
        }
        let r = Arc::new(SpanReader::new(
            self.index.clone(),
            FileRange {
                file: File::open(&self.blob.path)?,
                offset: self.blob.offset,
                len: self.blob.len,
            },
        ));
        *g = Some(r.clone());
        Ok(r)
    }

    /// Fetches the content of `e` from the blob into `objects/`, publishing it only when
    /// its sha256 matches.
    fn fetch(&self, e: &Entry, sha: &Digest) -> io::Result<()> {
        let fail = |what: String| {
            let line = format!("layer {}: {}: {what}", self.index.layer, show(&e.path));
            let mut last = self.last_failure.lock().unwrap_or_else(|p| p.into_inner());
            let repeat = last.as_ref().is_some_and(|(l, t)| {
                *l == line && t.elapsed() < std::time::Duration::from_secs(2)
            });
            if !repeat {
                log::error!("{line}");
            }
            *last = Some((line, std::time::Instant::now()));
            drop(last);
            // The next fetch reopens the blob (it may have been repaired meanwhile) and
            // starts with an empty span cache.
            *self.spans.lock().unwrap_or_else(|p| p.into_inner()) = None;
            err(libc::EIO)
        };
        let spans = self.spans().map_err(|x| {
            fail(format!(
                "cannot open the layer blob {}: {x}",
                self.blob.path.display()
            ))
        })?;
        let (tmp, f) = self.store.new_tmp()?;
        let mut w = std::io::BufWriter::with_capacity(256 * 1024, f);
        let mut h = Sha256::new();
        let res = spans.read_range(e.offset, e.size, &mut |b: &[u8]| {
            h.update(b);
            w.write_all(b)
        });
        let res = res.and_then(|()| w.flush());
        drop(w);
        if let Err(x) = res {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!("reading the content: {x}")));
        }
        let got = Digest::from_bytes(h.finalize().into());
        if got != *sha {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(format!(
                "content does not match its sha256 (expected {sha}, read {got}); not served"
            )));
        }
        let dest = self.store.object_path(sha);
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::rename(&tmp, &dest)?;
        self.verified.add(*sha);
        Ok(())
    }

    /// Opens object `sha`, rehashing it first unless this daemon already did.
    fn open_object(&self, sha: &Digest) -> io::Result<Option<File>> {
        let path = self.store.object_path(sha);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(x) if x.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(x) => return Err(x),
        };
        if self.verified.has(sha) {
            return Ok(Some(f));
        }
        if crate::image::blob::sha256_of_reader(&f)? == *sha {
            self.verified.add(*sha);
            // The hashing moved the offset to the end.
            std::io::Seek::seek(&mut &f, std::io::SeekFrom::Start(0))?;
            return Ok(Some(f));
        }
        log::warn!(
            "object {}: content does not match; fetching it again",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
        Ok(None)
    }
}

fn show(path: &[u8]) -> String {
    format!("{:?}", String::from_utf8_lossy(path))
}

fn kind_bits(k: Kind) -> u32 {
    match k {
        Kind::File | Kind::Whiteout => libc::S_IFREG,
        Kind::Dir => libc::S_IFDIR,
        Kind::Symlink => libc::S_IFLNK,
        Kind::Char => libc::S_IFCHR,
        Kind::Block => libc::S_IFBLK,
        Kind::Fifo => libc::S_IFIFO,
    }
}

impl VirtualLayer for IndexLayer {
    fn dev(&self) -> u64 {
        self.dev
    }

    fn root(&self) -> EntryId {
        0
    }

    fn lookup(&self, dir: EntryId, name: &OsStr) -> io::Result<Option<EntryId>> {
        let d = self.dir_entry(dir)?;
        let n = name.as_bytes();
        if n == OPAQUE_MARKER {
            return Ok(d.opaque.then_some(dir | OPQ_BIT));
        }
        if let Some(target) = n.strip_prefix(WH_PREFIX) {
            return Ok(self
                .index
                .lookup_pos(&d.path, target)
                .filter(|&i| self.index.entries()[i].kind == Kind::Whiteout)
                .map(|i| (i as u64 + 1) | WH_BIT));
        }
        Ok(self
            .index
            .lookup_pos(&d.path, n)
            .filter(|&i| self.index.entries()[i].kind != Kind::Whiteout)
            .map(|i| i as u64 + 1))
    }

    fn stat(&self, id: EntryId) -> io::Result<FileStat> {
        let mut st = crate::sys::zeroed_stat();
        st.st_dev = self.dev;
        st.st_blksize = 4096;
        if id & (WH_BIT | OPQ_BIT) != 0 {
            // A marker: an empty root-owned file, as `.wh.` files are in OCI layers.
            st.st_ino = id;
            st.st_mode = libc::S_IFREG | 0o600;
            st.st_nlink = 1;
            return Ok(st);
        }
        let e = self.entry(id)?;
        st.st_ino = self.ino_of(id, e);
        st.st_mode = kind_bits(e.kind) | (e.mode & 0o7777);
        st.st_uid = e.uid;
        st.st_gid = e.gid;
        st.st_nlink = match e.kind {
            Kind::Dir => 2,
            _ => u64::from(self.index.nlink(e)),
        };
        st.st_rdev = libc::makedev(e.dev_major, e.dev_minor);
        st.st_size = match e.kind {
            Kind::File | Kind::Symlink => e.size as i64,
            Kind::Dir => 4096,
            _ => 0,
        };
        st.st_blocks = (st.st_size + 511) / 512;
        crate::layer::virt::set_times(&mut st, e.mtime_ns);
        Ok(st)
    }

    fn entries(&self, dir: EntryId) -> io::Result<Vec<(OsString, u64, u32)>> {
        let d = self.dir_entry(dir)?;
        let mut out = Vec::new();
        for i in self.index.children_range(&d.path) {
            let e = &self.index.entries()[i];
            let id = i as u64 + 1;
            let name = OsStr::from_bytes(e.name());
            if e.kind == Kind::Whiteout {
                let mut n = WH_PREFIX.to_vec();
                n.extend_from_slice(e.name());
                out.push((OsString::from_vec(n), id | WH_BIT, libc::S_IFREG));
            } else {
                out.push((name.to_os_string(), self.ino_of(id, e), kind_bits(e.kind)));
            }
        }
        if d.opaque {
            out.push((
                OsStr::from_bytes(OPAQUE_MARKER).to_os_string(),
                dir | OPQ_BIT,
                libc::S_IFREG,
            ));
        }
        Ok(out)
    }

    fn readlink(&self, id: EntryId) -> io::Result<OsString> {
        let e = self.entry(id & !(WH_BIT | OPQ_BIT))?;
        match (&e.link_target, e.kind) {
            (Some(t), Kind::Symlink) if id & (WH_BIT | OPQ_BIT) == 0 => {
                Ok(OsStr::from_bytes(t).to_os_string())
            }
            _ => Err(err(libc::EINVAL)),
        }
    }

    fn xattrs(&self, id: EntryId) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if id & (WH_BIT | OPQ_BIT) != 0 {
            return Ok(Vec::new());
        }
        Ok(self
            .entry(id)?
            .xattrs
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect())
    }

    fn open(&self, id: EntryId) -> io::Result<OwnedFd> {
        if id & (WH_BIT | OPQ_BIT) != 0 {
            return Err(err(libc::EINVAL));
        }
        let e = self.entry(id)?;
        let Some(sha) = e.sha256.filter(|_| e.kind == Kind::File) else {
            return Err(err(libc::EINVAL));
        };
        if let Some(f) = self.open_object(&sha)? {
            return Ok(f.into());
        }
        self.fetch(e, &sha)?;
        Ok(File::open(self.store.object_path(&sha))?.into())
    }
}

use std::os::unix::ffi::OsStringExt;
