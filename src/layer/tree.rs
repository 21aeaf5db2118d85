//! `TreeLayer`: a read-only layer held in memory as a tree of entries, served to the union
//! through `VirtualLayer`. Image layers in the store become trees built from their index;
//! tests build them from directories on disk.
//!
//! Invariants: entry 0 is the root directory; every other entry has a directory parent and
//! a name that is one valid component, unique in that parent; whiteouts and opaque markers
//! are stored as OCI-dialect entries (`.wh.NAME`, `.wh..wh..opq`), which is how the union
//! reads them; hard-linked names share `ino` (and so `st_ino`); content is never held here,
//! only a key the `ContentSource` turns into a read-only fd of verified bytes.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use nix::sys::stat::FileStat;

use super::virt::{EntryId, VirtualLayer};
use crate::union::whiteout::{OPAQUE_MARKER, WH_PREFIX};

/// Opens the content of a regular file by the key its entry carries.
pub trait ContentSource: Send + Sync + std::fmt::Debug {
    fn open(&self, key: u64) -> io::Result<OwnedFd>;
}

#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// S_IFMT bits.
    pub kind: u32,
    /// Permission bits including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    pub size: u64,
    pub rdev: u64,
    pub target: Option<OsString>,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// The `ContentSource` key of a regular file.
    pub content: u64,
    /// 512-byte blocks allocated, when known (sparse files); else the size rounded up.
    pub blocks: Option<u64>,
}

#[derive(Debug)]
struct Entry {
    meta: Meta,
    /// Shared by hard links.
    ino: u64,
    /// Children by name (directories only).
    children: HashMap<OsString, EntryId>,
    /// Child names in insertion order, for stable listings.
    order: Vec<OsString>,
}

#[derive(Debug)]
pub struct TreeLayer {
    dev: u64,
    entries: Vec<Entry>,
    nlink: HashMap<u64, u32>,
    content: Arc<dyn ContentSource>,
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Builds a `TreeLayer` from paths given as component lists.
#[derive(Debug)]
pub struct TreeBuilder {
    entries: Vec<Entry>,
    next_ino: u64,
}

impl Default for TreeBuilder {
    fn default() -> Self {
        TreeBuilder::new(Meta {
            kind: libc::S_IFDIR,
            mode: 0o755,
            ..Meta::default()
        })
    }
}

impl TreeBuilder {
    pub fn new(root: Meta) -> TreeBuilder {
        TreeBuilder {
            entries: vec![Entry {
                meta: root,
                ino: 1,
                children: HashMap::new(),
                order: Vec::new(),
            }],
            next_ino: 2,
        }
    }

    pub fn set_root(&mut self, meta: Meta) {
        self.entries[0].meta = Meta {
            kind: libc::S_IFDIR,
            ..meta
        };
    }

    /// The directory at `dir` (components below the root), made with `implied` metadata
    /// where missing. ENOTDIR when a component is not a directory.
    pub fn dir(&mut self, dir: &[&OsStr], implied: &Meta) -> io::Result<EntryId> {
        let mut at: EntryId = 0;
        for c in dir {
            at = match self.entries[at as usize].children.get(*c) {
                Some(&id) => {
                    if self.entries[id as usize].meta.kind != libc::S_IFDIR {
                        return Err(err(libc::ENOTDIR));
                    }
                    id
                }
                None => self.insert(
                    at,
                    c,
                    Meta {
                        kind: libc::S_IFDIR,
                        ..implied.clone()
                    },
                    None,
                ),
            };
        }
        Ok(at)
    }

    /// Adds (or replaces) `name` in directory `parent`. A replaced directory keeps its
    /// children only if the new entry is a directory too (tar's extraction rule).
    /// `link_to` makes the entry a hard link of an existing one (same ino and metadata).
    pub fn put(
        &mut self,
        parent: EntryId,
        name: &OsStr,
        meta: Meta,
        link_to: Option<EntryId>,
    ) -> EntryId {
        if let Some(&old) = self.entries[parent as usize].children.get(name) {
            let keep =
                self.entries[old as usize].meta.kind == libc::S_IFDIR && meta.kind == libc::S_IFDIR;
            let e = &mut self.entries[old as usize];
            e.meta = meta;
            if !keep {
                e.children.clear();
                e.order.clear();
                e.ino = self.next_ino;
                self.next_ino += 1;
            }
            if let Some(l) = link_to {
                let (m, ino) = (
                    self.entries[l as usize].meta.clone(),
                    self.entries[l as usize].ino,
                );
                let e = &mut self.entries[old as usize];
                e.meta = m;
                e.ino = ino;
            }
            return old;
        }
        self.insert(parent, name, meta, link_to)
    }

    fn insert(
        &mut self,
        parent: EntryId,
        name: &OsStr,
        meta: Meta,
        link_to: Option<EntryId>,
    ) -> EntryId {
        let id = self.entries.len() as EntryId;
        let (meta, ino) = match link_to {
            Some(l) => (
                self.entries[l as usize].meta.clone(),
                self.entries[l as usize].ino,
            ),
            None => {
                self.next_ino += 1;
                (meta, self.next_ino - 1)
            }
        };
        self.entries.push(Entry {
            meta,
            ino,
            children: HashMap::new(),
            order: Vec::new(),
        });
        let p = &mut self.entries[parent as usize];
        p.children.insert(name.to_os_string(), id);
        p.order.push(name.to_os_string());
        id
    }

    /// Marks directory `dir` opaque (an OCI `.wh..wh..opq` entry in it).
    pub fn opaque(&mut self, dir: EntryId) {
        self.put(dir, OsStr::from_bytes(OPAQUE_MARKER), marker(), None);
    }

    /// Records a whiteout of `name` in `dir` (an OCI `.wh.NAME` entry).
    pub fn whiteout(&mut self, dir: EntryId, name: &OsStr) {
        let mut n = WH_PREFIX.to_vec();
        n.extend_from_slice(name.as_bytes());
        self.put(dir, OsStr::from_bytes(&n), marker(), None);
    }

    pub fn build(self, dev: u64, content: Arc<dyn ContentSource>) -> TreeLayer {
        let mut nlink: HashMap<u64, u32> = HashMap::new();
        let mut reachable = vec![false; self.entries.len()];
        let mut stack = vec![0usize];
        while let Some(i) = stack.pop() {
            if reachable[i] {
                continue;
            }
            reachable[i] = true;
            for n in &self.entries[i].order {
                if let Some(&c) = self.entries[i].children.get(n) {
                    stack.push(c as usize);
                }
            }
        }
        for (i, e) in self.entries.iter().enumerate() {
            if reachable[i] && e.meta.kind != libc::S_IFDIR {
                *nlink.entry(e.ino).or_default() += 1;
            }
        }
        TreeLayer {
            dev,
            entries: self.entries,
            nlink,
            content,
        }
    }
}

fn marker() -> Meta {
    Meta {
        kind: libc::S_IFREG,
        mode: 0o600,
        ..Meta::default()
    }
}

impl TreeLayer {
    fn entry(&self, id: EntryId) -> io::Result<&Entry> {
        self.entries
            .get(id as usize)
            .ok_or_else(|| err(libc::ENOENT))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.len() <= 1
    }
}

impl VirtualLayer for TreeLayer {
    fn dev(&self) -> u64 {
        self.dev
    }

    fn root(&self) -> EntryId {
        0
    }

    fn lookup(&self, dir: EntryId, name: &OsStr) -> io::Result<Option<EntryId>> {
        let e = self.entry(dir)?;
        if e.meta.kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        Ok(e.children.get(name).copied())
    }

    fn stat(&self, id: EntryId) -> io::Result<FileStat> {
        let e = self.entry(id)?;
        let m = &e.meta;
        let mut st = crate::sys::zeroed_stat();
        st.st_dev = self.dev;
        st.st_ino = e.ino;
        st.st_mode = m.kind | (m.mode & 0o7777);
        st.st_nlink = if m.kind == libc::S_IFDIR {
            2 + e
                .children
                .values()
                .filter(|&&c| self.entries[c as usize].meta.kind == libc::S_IFDIR)
                .count() as u64
        } else {
            u64::from(self.nlink.get(&e.ino).copied().unwrap_or(1))
        };
        st.st_uid = m.uid;
        st.st_gid = m.gid;
        st.st_rdev = m.rdev;
        st.st_size = match m.kind {
            libc::S_IFREG => m.size as i64,
            libc::S_IFLNK => m.target.as_ref().map_or(0, |t| t.len() as i64),
            libc::S_IFDIR => 4096,
            _ => 0,
        };
        st.st_blksize = 4096;
        st.st_blocks = match m.blocks {
            Some(b) => b as i64,
            None => (st.st_size + 511) / 512,
        };
        super::virt::set_times(&mut st, m.mtime_ns);
        Ok(st)
    }

    fn entries(&self, dir: EntryId) -> io::Result<Vec<(OsString, u64, u32)>> {
        let e = self.entry(dir)?;
        if e.meta.kind != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        let mut out = Vec::with_capacity(e.order.len());
        for n in &e.order {
            if let Some(&c) = e.children.get(n) {
                let ce = &self.entries[c as usize];
                out.push((n.clone(), ce.ino, ce.meta.kind));
            }
        }
        Ok(out)
    }

    fn readlink(&self, id: EntryId) -> io::Result<OsString> {
        self.entry(id)?
            .meta
            .target
            .clone()
            .ok_or_else(|| err(libc::EINVAL))
    }

    fn xattrs(&self, id: EntryId) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        Ok(self.entry(id)?.meta.xattrs.clone())
    }

    fn open(&self, id: EntryId) -> io::Result<OwnedFd> {
        let e = self.entry(id)?;
        if e.meta.kind != libc::S_IFREG {
            return Err(err(libc::EINVAL));
        }
        self.content.open(e.meta.content)
    }
}

/// Content of a tree built from a directory on disk: files reopened beneath its root.
#[derive(Debug)]
struct DirContent {
    layer: super::Layer,
    paths: Vec<std::path::PathBuf>,
}

impl ContentSource for DirContent {
    fn open(&self, key: u64) -> io::Result<OwnedFd> {
        let p = self.paths.get(key as usize).ok_or_else(|| err(libc::EIO))?;
        self.layer.open_rel(p, nix::fcntl::OFlag::O_RDONLY, 0)
    }
}

/// A tree with the content of on-disk layer `dir` (tests run the union over such copies of
/// their layers). Every whiteout and opaque dialect is turned into the OCI one; the overlay's
/// marker xattrs are dropped, other xattrs kept; hard links stay linked.
pub fn from_dir(dir: &std::path::Path, dev: u64) -> Result<TreeLayer, String> {
    use crate::union::whiteout::is_chardev_whiteout;
    let layer = super::Layer::open(dir)?;
    let root = layer
        .open_dir(std::path::Path::new("."))
        .map_err(|e| e.to_string())?;
    let meta_of = |st: &FileStat, d: &super::LDir, name: Option<&OsStr>| -> io::Result<Meta> {
        let mut xattrs = Vec::new();
        let kind = st.st_mode & libc::S_IFMT;
        if kind == libc::S_IFREG || kind == libc::S_IFDIR || kind == libc::S_IFLNK {
            let names = match d.listxattr(name) {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
                Err(e) => return Err(e),
            };
            for k in names.split(|b| *b == 0).filter(|k| !k.is_empty()) {
                if is_marker_xattr(k) {
                    continue;
                }
                if let Some(v) = d.getxattr(name, k)? {
                    xattrs.push((k.to_vec(), v));
                }
            }
        }
        Ok(Meta {
            kind,
            mode: st.st_mode & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            mtime_ns: st.st_mtime * 1_000_000_000 + st.st_mtime_nsec,
            size: st.st_size as u64,
            rdev: st.st_rdev,
            target: None,
            xattrs,
            content: 0,
            blocks: Some(st.st_blocks as u64),
        })
    };
    let e = |x: io::Error| format!("{}: {x}", dir.display());
    let mut b = TreeBuilder::default();
    let root_st = root.stat_self().map_err(e)?;
    b.set_root(meta_of(&root_st, &root, None).map_err(e)?);
    if crate::union::whiteout::dir_marks(&root).map_err(e)?.opaque {
        b.opaque(0);
    }
    let mut paths = Vec::new();
    let mut links: HashMap<(u64, u64), EntryId> = HashMap::new();
    let mut stack = vec![(root, 0 as EntryId, std::path::PathBuf::new())];
    while let Some((d, id, rel)) = stack.pop() {
        let marks = crate::union::whiteout::dir_marks(&d).map_err(e)?;
        for (name, _, _) in d.entries().map_err(e)? {
            let st = d.stat(&name).map_err(e)?;
            let kind = st.st_mode & libc::S_IFMT;
            if is_chardev_whiteout(&st)
                || crate::union::whiteout::is_whiteout(&d, &marks, &name, &st).map_err(e)?
            {
                b.whiteout(id, &name);
                continue;
            }
            let mut m = meta_of(&st, &d, Some(&name)).map_err(e)?;
            let crel = rel.join(&name);
            match kind {
                libc::S_IFLNK => m.target = Some(d.readlink(&name).map_err(e)?),
                libc::S_IFREG => {
                    m.content = paths.len() as u64;
                    paths.push(crel.clone());
                }
                _ => {}
            }
            let key = (st.st_dev, st.st_ino);
            let link_to = (kind != libc::S_IFDIR)
                .then(|| links.get(&key).copied())
                .flatten();
            let cid = b.put(id, &name, m, link_to);
            if kind != libc::S_IFDIR {
                links.entry(key).or_insert(cid);
            } else {
                let sub = d.child_dir(&name).map_err(e)?;
                if crate::union::whiteout::dir_marks(&sub).map_err(e)?.opaque {
                    b.opaque(cid);
                }
                stack.push((sub, cid, crel));
            }
        }
    }
    Ok(b.build(dev, Arc::new(DirContent { layer, paths })))
}

/// The overlay's own marker xattrs, which a tree expresses as OCI entries instead.
fn is_marker_xattr(k: &[u8]) -> bool {
    matches!(
        k,
        b"trusted.overlay.opaque"
            | b"user.overlay.opaque"
            | b"user.fuseoverlayfs.opaque"
            | b"trusted.overlay.whiteout"
            | b"user.overlay.whiteout"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct NoContent;
    impl ContentSource for NoContent {
        fn open(&self, _key: u64) -> io::Result<OwnedFd> {
            Err(err(libc::EIO))
        }
    }

    fn file(size: u64) -> Meta {
        Meta {
            kind: libc::S_IFREG,
            mode: 0o4755,
            uid: 7,
            gid: 8,
            mtime_ns: 1_500_000_000_250,
            size,
            ..Meta::default()
        }
    }

    #[test]
    fn tree_semantics() {
        let os = OsStr::new;
        let mut b = TreeBuilder::default();
        let d = b.dir(&[os("a"), os("b")], &Meta::default()).unwrap();
        let f = b.put(d, os("f"), file(10), None);
        let g = b.put(d, os("g"), Meta::default(), Some(f));
        b.whiteout(d, os("gone"));
        b.opaque(d);
        // A later non-directory replaces a directory and its subtree (tar's rule).
        let x = b.dir(&[os("x"), os("y")], &Meta::default()).unwrap();
        b.put(x, os("z"), file(1), None);
        let a = b.dir(&[os("a")], &Meta::default()).unwrap();
        b.put(0, os("x"), file(3), None);
        assert_eq!(
            b.dir(&[os("x"), os("q")], &Meta::default())
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOTDIR)
        );
        let t = b.build(VIRT_TEST_DEV, Arc::new(NoContent));

        assert_eq!(t.lookup(0, os("a")).unwrap(), Some(a));
        assert_eq!(t.lookup(a, os("b")).unwrap(), Some(d));
        let st = t.stat(f).unwrap();
        assert_eq!(st.st_mode, libc::S_IFREG | 0o4755);
        assert_eq!((st.st_uid, st.st_gid, st.st_size), (7, 8, 10));
        assert_eq!((st.st_mtime, st.st_mtime_nsec), (1500, 250));
        assert_eq!(st.st_dev, VIRT_TEST_DEV);
        // Hard links: one inode, nlink 2.
        assert_eq!(t.stat(g).unwrap().st_ino, st.st_ino);
        assert_eq!(st.st_nlink, 2);
        let names: Vec<_> = t.entries(d).unwrap().into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["f", "g", ".wh.gone", ".wh..wh..opq"]);
        let xs = t.stat(t.lookup(0, os("x")).unwrap().unwrap()).unwrap();
        assert_eq!(xs.st_mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(
            t.lookup(f, os("q")).unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
        assert_eq!(t.open(f).unwrap_err().raw_os_error(), Some(libc::EIO));
        assert_eq!(t.stat(0).unwrap().st_nlink, 3); // 2 + one subdirectory (x is a file now)
    }

    const VIRT_TEST_DEV: u64 = 0xf1a7_0000_0000_0042;
}
