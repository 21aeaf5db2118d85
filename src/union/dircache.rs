//! Caches that spare the request path repeated path walks and xattr reads.
//!
//! - Directory fds by (node, layer): an fd follows its inode through renames, and node ids
//!   are never reused, so an entry can go stale (its directory deleted) but never point at
//!   another directory. Bounded: past `fd_cap()` entries (a quarter of the open-file limit,
//!   at most `FD_CAP`) an arbitrary tenth is dropped, so the daemon never pins an fd per
//!   inode; and when an open fails with EMFILE/ENFILE the whole cache is dropped and the
//!   open retried once, so a caller never sees EMFILE that closing cached fds would avoid.
//! - Markers (opaque / xattr-whiteout flags) of LOWER directories by (dev, ino): lowers
//!   are immutable, so an entry never goes stale. Upper directories are always re-read.
//! - Name indexes of directories that merge many lower layers, by node: which of its lower
//!   layers hold a name (or a `.wh.` for it), so that a lookup probes only those layers,
//!   O(layers that hold the name) instead of O(layers). Built from the lowers only, which
//!   never change; a node's lower layers never change either (only pure-upper directories
//!   move). Bounded like the fds.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use dashmap::DashMap;

use super::node::NodeId;
use super::whiteout::{DirMarks, OPAQUE_MARKER, oci_whiteout_target};
use crate::layer::{LDir, LayerIdx, RealId};

const FD_CAP: usize = 4096;
/// Directory fds kept at least, however low the open-file limit.
const FD_MIN: usize = 8;
const INDEX_CAP: usize = 512;

/// Where a name occurs among a directory's lower layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occurrence {
    pub layer: LayerIdx,
    /// The layer has an entry with the name.
    pub entry: bool,
    /// The layer has `.wh.NAME` (hides the name in the layers below it).
    pub oci_whiteout: bool,
}

/// name → its occurrences, top layer first.
#[derive(Default)]
pub struct NameIndex {
    map: HashMap<OsString, Vec<Occurrence>>,
}

impl NameIndex {
    /// Adds one layer's names (call top layer first).
    pub fn add_layer(&mut self, layer: LayerIdx, names: Vec<OsString>) {
        for name in names {
            let (key, oci) = match oci_whiteout_target(&name) {
                Some(t) => (t.to_os_string(), true),
                None if name.as_bytes() == OPAQUE_MARKER => continue,
                None => (name, false),
            };
            let occ = self.map.entry(key).or_default();
            match occ.last_mut() {
                Some(o) if o.layer == layer => {
                    o.entry |= !oci;
                    o.oci_whiteout |= oci;
                }
                _ => occ.push(Occurrence {
                    layer,
                    entry: !oci,
                    oci_whiteout: oci,
                }),
            }
        }
    }

    pub fn get(&self, name: &OsStr) -> &[Occurrence] {
        self.map.get(name).map_or(&[], Vec::as_slice)
    }
}

#[derive(Default)]
pub struct DirCache {
    fds: DashMap<(NodeId, LayerIdx), LDir>,
    marks: DashMap<RealId, DirMarks>,
    indexes: DashMap<NodeId, Arc<NameIndex>>,
}

impl DirCache {
    pub fn fd(
        &self,
        node: NodeId,
        layer: LayerIdx,
        open: impl Fn() -> io::Result<LDir>,
    ) -> io::Result<LDir> {
        if let Some(fd) = self.fds.get(&(node, layer)) {
            return Ok(fd.clone());
        }
        let fd = self.retry_if_out_of_fds(open)?;
        make_room(&self.fds, fd_cap());
        self.fds.insert((node, layer), fd.clone());
        Ok(fd)
    }

    /// Runs `open`; when it fails for want of file descriptors, closes every cached
    /// directory fd (they are only a cache) and runs it once more.
    pub fn retry_if_out_of_fds<T>(&self, open: impl Fn() -> io::Result<T>) -> io::Result<T> {
        match open() {
            Err(e) if out_of_fds(&e) => {
                log::debug!("out of file descriptors ({e}); dropping cached directory fds");
                self.fds.clear();
                open()
            }
            r => r,
        }
    }

    pub fn index(
        &self,
        node: NodeId,
        build: impl FnOnce() -> io::Result<NameIndex>,
    ) -> io::Result<Arc<NameIndex>> {
        if let Some(ix) = self.indexes.get(&node) {
            return Ok(ix.clone());
        }
        let ix = Arc::new(build()?);
        make_room(&self.indexes, INDEX_CAP);
        self.indexes.insert(node, ix.clone());
        Ok(ix)
    }

    pub fn lower_marks(
        &self,
        id: RealId,
        read: impl FnOnce() -> io::Result<DirMarks>,
    ) -> io::Result<DirMarks> {
        if let Some(m) = self.marks.get(&id) {
            return Ok(*m);
        }
        let m = read()?;
        self.marks.insert(id, m);
        Ok(m)
    }
}

/// EMFILE (this process) or ENFILE (the system) from an open.
pub fn out_of_fds(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The soft open-file limit, read once (after the daemon raised it to the hard limit).
pub fn fd_limit() -> usize {
    static LIMIT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| usize::try_from(crate::sys::nofile_limit()).unwrap_or(usize::MAX))
}

/// How many directory fds the cache keeps: a quarter of the open-file limit, leaving the
/// rest to open files, the prefetcher and the FUSE session.
fn fd_cap() -> usize {
    (fd_limit() / 4).clamp(FD_MIN, FD_CAP)
}

/// Keeps a cache under `cap` entries by dropping an arbitrary tenth when it is full.
pub(crate) fn make_room<K: Eq + std::hash::Hash + Copy, V>(map: &DashMap<K, V>, cap: usize) {
    if map.len() < cap {
        return;
    }
    let victims: Vec<K> = map.iter().take(cap / 10).map(|e| *e.key()).collect();
    for v in victims {
        map.remove(&v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_records_entries_and_oci_whiteouts_per_layer() {
        let mut ix = NameIndex::default();
        let n = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        ix.add_layer(1, n(&["a", ".wh.b", ".wh..wh..opq", "c", ".wh.c"]));
        ix.add_layer(2, n(&["b", "a"]));
        assert_eq!(
            ix.get(OsStr::new("a")),
            &[
                Occurrence {
                    layer: 1,
                    entry: true,
                    oci_whiteout: false
                },
                Occurrence {
                    layer: 2,
                    entry: true,
                    oci_whiteout: false
                },
            ]
        );
        assert_eq!(
            ix.get(OsStr::new("b")),
            &[
                Occurrence {
                    layer: 1,
                    entry: false,
                    oci_whiteout: true
                },
                Occurrence {
                    layer: 2,
                    entry: true,
                    oci_whiteout: false
                },
            ]
        );
        assert_eq!(
            ix.get(OsStr::new("c")),
            &[Occurrence {
                layer: 1,
                entry: true,
                oci_whiteout: true
            }]
        );
        assert!(ix.get(OsStr::new(".wh..opq")).is_empty());
        assert!(ix.get(OsStr::new("zz")).is_empty());
    }
}
