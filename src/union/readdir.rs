//! Merged directory listings.
//!
//! A listing is built once per opendir from every layer the directory merges, top first:
//! the first layer that has a name decides it (an entry, or a whiteout that hides it below);
//! `.wh.NAME` hides NAME only in the layers below its own; markers are never shown. Offsets
//! are positions in the snapshot, so they stay stable for the life of the handle.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};

use crate::layer::{LDir, Layer, LayerIdx, RealId, file_type, open_at};
use crate::union::node::InoTable;
use crate::union::whiteout::{self, OPAQUE_MARKER};

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// S_IFMT bits.
    pub kind: u32,
    /// The layer of the entry's top object ("." and ".." carry usize::MAX).
    pub top: LayerIdx,
    /// For a directory, the lower layers it also merges, in order (usually none).
    pub lower: Vec<LayerIdx>,
    /// The top object's (dev, ino).
    pub real: RealId,
    /// Readdir offset of the next entry (see `Listing`).
    pub cookie: u64,
}

impl DirEntry {
    /// A "." or ".." entry: no object of its own in the listing.
    pub fn dots(name: &str, ino: u64) -> DirEntry {
        DirEntry {
            name: name.into(),
            ino,
            kind: libc::S_IFDIR,
            top: usize::MAX,
            lower: Vec::new(),
            real: RealId { dev: 0, ino: 0 },
            cookie: 0,
        }
    }

    /// Every layer holding the entry, top first (what `Union::resolve` would find).
    pub fn layers(&self) -> Vec<LayerIdx> {
        let mut v = Vec::with_capacity(1 + self.lower.len());
        v.push(self.top);
        v.extend_from_slice(&self.lower);
        v
    }
}

/// A directory's merged entries as of its namespace generation `generation` (see
/// `Node::generation`): while the directory's generation is unchanged, each entry says
/// exactly what a lookup would find.
///
/// Entries are sorted by `cookie`, the readdir offset of the entry after them: "." is 1,
/// ".." 2, every other name a hash of the name. A stream continues at "every entry with a
/// cookie above the offset" in whatever listing it reads, so a stream never skips or repeats
/// an entry that did not change, even when listings are rebuilt under it.
#[derive(Debug)]
pub struct Listing {
    pub generation: u64,
    pub entries: Vec<DirEntry>,
}

impl Listing {
    /// Orders `entries` ("." and ".." first) by cookie and assigns the cookies.
    pub fn new(generation: u64, mut entries: Vec<DirEntry>) -> Listing {
        for e in entries.iter_mut() {
            e.cookie = match e.name.as_bytes() {
                b"." => 1,
                b".." => 2,
                n => name_cookie(n),
            };
        }
        entries.sort_by_key(|e| e.cookie);
        // A hash collision (vanishingly rare over 62 bits) moves the later name up by one.
        for i in 1..entries.len() {
            if entries[i].cookie <= entries[i - 1].cookie {
                entries[i].cookie = entries[i - 1].cookie + 1;
            }
        }
        Listing {
            generation,
            entries,
        }
    }

    /// The entries a READDIR at `offset` returns.
    pub fn from_offset(&self, offset: u64) -> &[DirEntry] {
        let start = self.entries.partition_point(|e| e.cookie <= offset);
        &self.entries[start..]
    }
}

/// Readdir cookie of a name: 3..2^62, fixed for the life of the process.
fn name_cookie(name: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    name.hash(&mut h);
    3 + (h.finish() >> 2)
}

/// Every name in a directory except "." and "..", as the layer stores them.
pub fn list_names(dir: BorrowedFd) -> io::Result<Vec<OsString>> {
    Ok(raw_entries(dir)?.into_iter().map(|(n, _, _)| n).collect())
}

/// (name, d_ino, d_type) of every entry except "." and "..". Reads through a fresh open of
/// the directory: a `dup` would share the file offset with the caller's (possibly cached
/// and concurrently used) fd.
pub(crate) fn raw_entries(dir: BorrowedFd) -> io::Result<Vec<(OsString, u64, Option<Type>)>> {
    let fd: OwnedFd = open_at(
        dir,
        OsStr::new("."),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        0,
    )?;
    let mut d = Dir::from_fd(fd).map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    let mut out = Vec::new();
    for ent in d.iter() {
        let ent = ent.map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((
            OsStr::from_bytes(name).to_os_string(),
            ent.ino(),
            ent.file_type(),
        ));
    }
    Ok(out)
}

/// One layer's copy of a directory being listed.
pub struct LayerDir<'a> {
    pub idx: LayerIdx,
    pub layer: &'a Layer,
    pub dir: &'a LDir,
}

/// A directory name still collecting the lower layers it merges: its index in the output
/// and its lowest occurrence so far (layer, fd of the parent there, d_ino).
struct Open<'a> {
    at: usize,
    last: (LayerIdx, &'a LDir, u64),
}

/// Merges the listings of one directory across `dirs` (its open fd in each layer it
/// merges, top first), recording for each visible name what a lookup would find: its top
/// object and, for a directory, every layer it merges, cut at a whiteout, a `.wh.` entry,
/// a non-directory or an opaque occurrence, as `Union::resolve` does. `marks` reads a
/// directory's markers (cached for lower layers); `opaque` tells whether the directory
/// (name, d_ino) in a layer's directory is opaque. Opacity is asked only when a lower
/// occurrence exists, so single-layer directories cost nothing extra.
pub fn merge<'a>(
    dirs: &[LayerDir<'a>],
    inos: &InoTable,
    marks: impl Fn(&LDir, LayerIdx) -> io::Result<whiteout::DirMarks>,
    opaque: impl Fn(LayerIdx, &LDir, &OsStr, u64) -> io::Result<bool>,
) -> io::Result<Vec<DirEntry>> {
    // name → Some(still-open directory) or None (decided for good).
    let mut decided: HashMap<OsString, Option<Open<'a>>> = HashMap::new();
    let mut out: Vec<DirEntry> = Vec::new();
    for d in dirs {
        let (layer, dir) = (d.layer, d.dir);
        let marks = marks(dir, d.idx)?;
        let mut hidden_below = Vec::new();
        for (name, d_ino, d_type) in dir.entries()? {
            if name.as_bytes() == OPAQUE_MARKER {
                continue;
            }
            if let Some(target) = whiteout::oci_whiteout_target(&name) {
                hidden_below.push(target.to_os_string());
                continue;
            }
            let slot = decided.get_mut(&name);
            if matches!(slot, Some(None)) {
                continue;
            }
            let mut kind = d_type;
            let needs_stat = match kind {
                None => true,
                Some(libc::S_IFCHR) => true,
                Some(libc::S_IFREG) => marks.xattr_whiteouts,
                _ => false,
            };
            let mut is_whiteout = false;
            if needs_stat {
                let Some(st) = dir.try_stat(&name)? else {
                    continue;
                };
                kind = Some(file_type(&st));
                is_whiteout = whiteout::is_whiteout(dir, &marks, &name, &st)?;
            }
            let kind = kind.unwrap_or(libc::S_IFREG);
            if let Some(Some(open)) = slot {
                // A lower occurrence of a directory decided above: it merges only if it is a
                // directory too and the occurrence above is not opaque.
                let (pl, pdir, pino) = open.last;
                if is_whiteout || kind != libc::S_IFDIR || opaque(pl, pdir, &name, pino)? {
                    decided.insert(name, None);
                } else {
                    let at = open.at;
                    out[at].lower.push(d.idx);
                    open.last = (d.idx, dir, d_ino);
                }
                continue;
            }
            if is_whiteout {
                decided.insert(name, None);
                continue;
            }
            let real = RealId {
                dev: layer.dev,
                ino: d_ino,
            };
            out.push(DirEntry {
                name: name.clone(),
                ino: inos.get(real),
                kind,
                top: d.idx,
                lower: Vec::new(),
                real,
                cookie: 0,
            });
            let state = (kind == libc::S_IFDIR).then(|| Open {
                at: out.len() - 1,
                last: (d.idx, dir, d_ino),
            });
            decided.insert(name, state);
        }
        for t in hidden_below {
            decided.insert(t, None);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    fn names(l: &[DirEntry]) -> Vec<String> {
        l.iter()
            .map(|e| e.name.to_string_lossy().into_owned())
            .collect()
    }

    fn listing(ns: &[&str]) -> Listing {
        let mut v = vec![DirEntry::dots(".", 1), DirEntry::dots("..", 1)];
        for n in ns {
            let mut e = DirEntry::dots("x", 5);
            e.name = OsString::from(n);
            v.push(e);
        }
        Listing::new(0, v)
    }

    #[test]
    fn streams_continue_across_rebuilt_listings_without_skips() {
        let all: Vec<String> = (0..500).map(|i| format!("f{i}")).collect();
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let first = listing(&refs);
        assert_eq!(names(&first.entries[..2]), vec![".", ".."]);
        // Read 100 entries, delete them, then continue in a listing rebuilt without them.
        let chunk = &first.from_offset(0)[..102];
        let offset = chunk.last().unwrap().cookie;
        let gone: Vec<String> = names(&chunk[2..]);
        let rest: Vec<&str> = refs
            .iter()
            .copied()
            .filter(|n| !gone.iter().any(|g| g == n))
            .collect();
        let second = listing(&rest);
        let mut seen = names(chunk);
        seen.extend(names(second.from_offset(offset)));
        seen.sort();
        let mut want: Vec<String> = all.clone();
        want.push(".".into());
        want.push("..".into());
        want.sort();
        assert_eq!(seen, want, "every name exactly once");
        assert!(
            second
                .from_offset(second.entries.last().unwrap().cookie)
                .is_empty()
        );
    }
}
