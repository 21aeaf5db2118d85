//! Caches that spare the request path repeated path walks and xattr reads.
//!
//! - Directory fds by (node, layer): an fd follows its inode through renames, and node ids
//!   are never reused, so an entry can go stale (its directory deleted) but never point at
//!   another directory. Bounded: past `FD_CAP` entries an arbitrary tenth is dropped, so
//!   the daemon never pins an fd per inode.
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
        open: impl FnOnce() -> io::Result<LDir>,
    ) -> io::Result<LDir> {
        if let Some(fd) = self.fds.get(&(node, layer)) {
            return Ok(fd.clone());
        }
        let fd = open()?;
        make_room(&self.fds, FD_CAP);
        self.fds.insert((node, layer), fd.clone());
        Ok(fd)
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
