//! Caches that spare the request path repeated path walks and xattr reads.
//!
//! - Directory fds by (node, layer): an fd follows its inode through renames, and node ids
//!   are never reused, so an entry can go stale (its directory deleted) but never point at
//!   another directory. Bounded: past `FD_CAP` entries an arbitrary tenth is dropped, so
//!   the daemon never pins an fd per inode.
//! - Markers (opaque / xattr-whiteout flags) of LOWER directories by (dev, ino): lowers
//!   are immutable, so an entry never goes stale. Upper directories are always re-read.

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use dashmap::DashMap;

use super::node::NodeId;
use super::whiteout::DirMarks;
use crate::layer::{LayerIdx, RealId};

const FD_CAP: usize = 4096;

#[derive(Default)]
pub struct DirCache {
    fds: DashMap<(NodeId, LayerIdx), Arc<OwnedFd>>,
    marks: DashMap<RealId, DirMarks>,
}

impl DirCache {
    pub fn fd(
        &self,
        node: NodeId,
        layer: LayerIdx,
        open: impl FnOnce() -> io::Result<OwnedFd>,
    ) -> io::Result<Arc<OwnedFd>> {
        if let Some(fd) = self.fds.get(&(node, layer)) {
            return Ok(fd.clone());
        }
        let fd = Arc::new(open()?);
        if self.fds.len() >= FD_CAP {
            let victims: Vec<_> = self
                .fds
                .iter()
                .take(FD_CAP / 10)
                .map(|e| *e.key())
                .collect();
            for v in victims {
                self.fds.remove(&v);
            }
        }
        self.fds.insert((node, layer), fd.clone());
        Ok(fd)
    }

    /// Drops the cached fds of a directory node (it was removed or replaced).
    pub fn forget(&self, node: NodeId) {
        self.fds.retain(|(n, _), _| *n != node);
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
