//! The union: overlayfs semantics over a stack of layers, independent of FUSE.
//!
//! Every operation is a `do_*`-style method returning `io::Result`, callable without a
//! mount. Layer 0 is the upper when the union is writable; lowers follow, top first.
//!
//! Invariants:
//! - lookup is a function of the layers' contents: a node's cached `layers` are changed only
//!   by this module's own mutations of the upper, in the same call that changes the upper;
//! - the upper is only changed through `*at` calls on directory fds opened beneath its root;
//!   objects are built in the workdir and renamed into place when atomicity matters;
//! - no lock is held across I/O except a node's `copy_lock` during its own copy-up.

pub mod copyup;
pub mod dircache;
pub mod file;
pub mod names;
pub mod node;
pub mod prefetch;
pub mod readdir;
pub mod whiteout;
pub mod xattr;

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use nix::sys::stat::FileStat;

use crate::layer::{LDir, Layer, LayerIdx, RealId, check_name, is_dir, open_at, try_stat_at};
use crate::options::{IdMap, MountOptions};
use node::{Found, Node, NodeId, NodeTable};
use whiteout::{MarkerWriter, oci_name};

/// `st_dev` of virtual layers: far above any real device number (major:minor encode in
/// 32 bits), one per layer.
pub const VIRTUAL_DEV_BASE: u64 = 0xf1a7_0000_0000_0000;

pub fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// Runs `f` again, a few times, while it answers ESTALE: a racing unlink or rename updates
/// the node table microseconds after its syscall, and the retry finds the node where the
/// table then says it is. ESTALE after that goes to the kernel (see `io_stale`).
pub(crate) fn retry_stale<T>(mut f: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) && tries < 6 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_micros(20 << tries));
            }
            r => return r,
        }
    }
}

/// ENOENT at a name the kernel reached a node by means the name changed under the
/// request: ESTALE, so the kernel walks the path again (see `Union::is_node_object`).
pub(crate) fn io_stale(e: io::Error) -> io::Error {
    if e.raw_os_error() == Some(libc::ENOENT) {
        err(libc::ESTALE)
    } else {
        e
    }
}

pub fn nix_err(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// Who is asking (from the FUSE request header).
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// A stat result as the union reports it: `st_ino` already replaced by ours.
pub type Attr = FileStat;

/// Settings that change what the union reports or how it writes.
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    /// fsync/fdatasync reach the upper filesystem (false with `volatile` or `fsync=0`).
    pub fsync: bool,
    pub static_nlink: bool,
    pub noxattrs: bool,
    pub squash_uid: Option<u32>,
    pub squash_gid: Option<u32>,
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
    /// Metadata changes of lower files copy up metadata only (`metacopy=on`; the default
    /// when a lower is an image layer, whose bytes would have to be fetched).
    pub metacopy: bool,
}

pub struct Union {
    pub layers: Vec<Layer>,
    pub has_upper: bool,
    /// `WORKDIR/work`: staging area on the upper's filesystem.
    work: Option<OwnedFd>,
    /// The upper filesystem gives file handles (cleared on the first EOPNOTSUPP).
    handle_ok: std::sync::atomic::AtomicBool,
    pub nodes: NodeTable,
    pub(crate) handles: DashMap<u64, Arc<file::Handle>>,
    pub(crate) handle_fds: file::HandleFds,
    pub(crate) cache: dircache::DirCache,
    pub(crate) dirs: DashMap<u64, Arc<file::DirStream>>,
    /// Listings of directory streams read without OPENDIR, by directory.
    pub(crate) streams: DashMap<NodeId, Arc<readdir::Listing>>,
    next_fh: AtomicU64,
    tmp_seq: AtomicU64,
    /// Keys (random per daemon) that make work temp names unguessable.
    tmp_keys: std::collections::hash_map::RandomState,
    pub markers: MarkerWriter,
    pub behaviour: Behaviour,
    /// f_namemax reported by statfs: the upper's minus 4, so `.wh.NAME` always fits.
    pub namemax: u32,
    /// The daemon may chown (runs as root).
    can_chown: bool,
    index_min_lowers: usize,
    /// The kernel caches writes (FUSE writeback cache, negotiated when passthrough is off).
    pub writeback: bool,
    /// Warms lower directories ahead of a walker; None when disabled.
    pub prefetch: Option<prefetch::Prefetcher>,
    /// The upper's filesystem writes a file's data before committing what allocated it
    /// (`sys::orders_data_before_metadata`): copy-up's write-out need not wait.
    pub(crate) upper_orders_data: bool,
}

/// What the upper holds at a name.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UpperEntry {
    /// A real object (not a whiteout) sits at the name.
    object: Option<FileStat>,
    /// A whiteout (char dev or xattr dialect) sits at the name.
    whiteout: bool,
    /// `.wh.NAME` exists next to it.
    oci_whiteout: bool,
}

impl Union {
    /// Opens every layer and prepares the workdir. Errors are one line naming the culprit;
    /// nothing is written before every check has passed.
    pub fn new(opts: &MountOptions) -> Result<Union, String> {
        Union::with_lowers(opts, Vec::new())
    }

    /// `new` with `extra` lower layers (top first) below those of `opts` (image layers).
    pub fn with_lowers(opts: &MountOptions, extra: Vec<Layer>) -> Result<Union, String> {
        let mut layers = Vec::new();
        let has_upper = opts.upper.is_some();
        if let Some(u) = &opts.upper {
            layers.push(Layer::open(u).map_err(|e| format!("upperdir {e}"))?);
        }
        // Test hook: serve every lower from an in-memory copy (a virtual layer, as image
        // layers are), so the whole test suite runs over that path too.
        let virtual_lowers = std::env::var_os("UNIONMOUNT_TEST_VIRTUAL_LOWERS").is_some();
        for (i, l) in opts.lowers.iter().enumerate() {
            if virtual_lowers {
                let tree = crate::layer::tree::from_dir(l, VIRTUAL_DEV_BASE + i as u64)
                    .map_err(|e| format!("lowerdir {e}"))?;
                layers.push(Layer::virtual_layer(
                    &l.display().to_string(),
                    l,
                    Arc::new(tree),
                )?);
                continue;
            }
            layers.push(Layer::open(l).map_err(|e| format!("lowerdir {e}"))?);
        }
        layers.extend(extra);
        if layers.is_empty() {
            return Err("no layers given (need lowerdir=... or --layers)".into());
        }
        let mut work = None;
        let mut xattr_ns = "user.";
        if let Some(w) = &opts.work {
            let wl = Layer::open(w).map_err(|e| format!("workdir {e}"))?;
            if wl.dev != layers[0].dev {
                return Err(format!(
                    "workdir {} is on a different filesystem than upperdir {}",
                    w.display(),
                    layers[0].path.display()
                ));
            }
            let wfd = prepare_workdir(&wl).map_err(|e| format!("workdir {}: {e}", w.display()))?;
            xattr_ns = probe_xattr_ns(wfd.as_fd());
            work = Some(wfd);
        } else if has_upper {
            return Err("upperdir needs a workdir".into());
        }
        let marker_work = match &work {
            Some(w) => Some(w.try_clone().map_err(|e| format!("workdir: {e}"))?),
            None => None,
        };
        let statfs = nix::sys::statvfs::fstatvfs(layers[0].root())
            .map_err(|e| format!("{}: statfs: {e}", layers[0].path.display()))?;
        let root_st = layers[0]
            .root_stat()
            .map_err(|e| format!("{}: {e}", layers[0].path.display()))?;
        let root_layers = (0..layers.len()).collect();
        let layers0_dev = layers[0].dev;
        let upper_orders_data = has_upper && crate::sys::orders_data_before_metadata(layers0_dev);
        if has_upper {
            log::info!(
                "copy-up write-out barrier: {}",
                if upper_orders_data {
                    "submit (the upper is ext4 with ordered data)"
                } else {
                    "submit and wait"
                }
            );
        }
        let metacopy = has_upper
            && opts
                .metacopy
                .unwrap_or_else(|| layers.iter().skip(1).any(|l| l.is_virtual()));
        let can_chown = crate::sys::geteuid() == 0;
        Ok(Union {
            handle_ok: std::sync::atomic::AtomicBool::new(true),
            nodes: NodeTable::new(root_layers, RealId::of(&root_st)),
            layers,
            has_upper,
            work,
            handles: DashMap::new(),
            handle_fds: file::HandleFds::default(),
            cache: dircache::DirCache::default(),
            dirs: DashMap::new(),
            streams: DashMap::new(),
            next_fh: AtomicU64::new(1),
            tmp_seq: AtomicU64::new(0),
            tmp_keys: std::collections::hash_map::RandomState::new(),
            // Test hook: behave as if mknod of whiteouts were refused, to exercise the
            // `.wh.NAME` fallback on filesystems that do allow it.
            markers: MarkerWriter::new(
                xattr_ns,
                std::env::var_os("UNIONMOUNT_TEST_NO_MKNOD_WHITEOUT").is_none(),
                marker_work,
            ),
            behaviour: Behaviour {
                fsync: opts.fsync && !opts.volatile,
                static_nlink: opts.static_nlink,
                noxattrs: opts.noxattrs,
                squash_uid: opts.squash_to_uid.or(opts.squash_to_root.then_some(0)),
                squash_gid: opts.squash_to_gid.or(opts.squash_to_root.then_some(0)),
                uid_map: opts.uid_mapping.clone(),
                gid_map: opts.gid_mapping.clone(),
                metacopy,
            },
            namemax: (statfs.name_max() as u32).saturating_sub(4),
            can_chown,
            index_min_lowers: index_min_lowers(),
            writeback: false,
            prefetch: prefetcher(),
            upper_orders_data,
        })
    }

    pub fn is_upper(&self, li: LayerIdx) -> bool {
        self.has_upper && li == 0
    }

    fn work(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|w| w.as_fd())
            .ok_or_else(|| err(libc::EROFS))
    }

    /// A fresh name for a temp object in the workdir: unique (a counter) and not guessable
    /// (the counter keyed-hashed), so that nobody else who can write the workdir can take
    /// the name first and make the copy-up or whiteout that wants it fail.
    fn tmp_name(&self) -> OsString {
        use std::hash::BuildHasher;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        OsString::from(format!(
            "#{:x}.{:x}.{:016x}",
            std::process::id(),
            seq,
            self.tmp_keys.hash_one(seq)
        ))
    }

    pub fn new_fh(&self) -> u64 {
        self.next_fh.fetch_add(1, Ordering::Relaxed)
    }

    pub fn path_of(&self, node: &Node) -> io::Result<PathBuf> {
        self.nodes.path_of(node)
    }

    /// A directory node opened in layer `li`.
    pub(crate) fn dir_in(&self, dir: &Node, li: LayerIdx) -> io::Result<LDir> {
        self.cache
            .fd(dir.id, li, || self.layers[li].open_dir(&self.path_of(dir)?))
    }

    /// A directory node opened in layer `li`, or None where that layer does not hold it.
    fn dir_if_present(&self, dir: &Node, li: LayerIdx) -> io::Result<Option<LDir>> {
        match self.dir_in(dir, li) {
            Ok(d) => Ok(Some(d)),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// Markers of a directory open in layer `li` (cached for lower layers).
    pub(crate) fn marks_of(&self, dir: &LDir, li: LayerIdx) -> io::Result<whiteout::DirMarks> {
        if self.is_upper(li) {
            return whiteout::dir_marks(dir);
        }
        let st = dir.stat_self()?;
        self.cache
            .lower_marks(RealId::of(&st), || whiteout::dir_marks(dir))
    }

    /// Is the directory `name` (stat'ed as `st`) in `dir` of layer `li` opaque?
    fn child_opaque(
        &self,
        dir: &LDir,
        name: &OsStr,
        st: &FileStat,
        li: LayerIdx,
    ) -> io::Result<bool> {
        self.child_opaque_id(dir, name, RealId::of(st), li)
    }

    /// `child_opaque` for a directory known by its (dev, ino) in layer `li`.
    pub(crate) fn child_opaque_id(
        &self,
        dir: &LDir,
        name: &OsStr,
        id: RealId,
        li: LayerIdx,
    ) -> io::Result<bool> {
        let read = || whiteout::dir_marks(&dir.child_dir(name)?);
        if self.is_upper(li) {
            return Ok(read()?.opaque);
        }
        Ok(self.cache.lower_marks(id, read)?.opaque)
    }

    /// The parent directory of `node` opened in layer `li`, and the node's name in it.
    /// For the root: the root itself and ".".
    pub(crate) fn parent_in(&self, node: &Node, li: LayerIdx) -> io::Result<(LDir, OsString)> {
        match self.nodes.live_alias(node) {
            None if node.id == node::ROOT_ID => Ok((
                self.cache
                    .fd(node.id, li, || self.layers[li].open_dir(Path::new(".")))?,
                OsString::from("."),
            )),
            None => Err(err(libc::ENOENT)),
            Some((p, name)) => {
                let parent = self.nodes.get(p)?;
                Ok((self.dir_in(&parent, li)?, name))
            }
        }
    }

    fn check_new_name(&self, name: &OsStr) -> io::Result<()> {
        check_name(name)?;
        if name.len() > self.namemax as usize {
            return Err(err(libc::ENAMETOOLONG));
        }
        if whiteout::is_reserved_name(name) {
            // `.wh.` names are whiteouts in every layer format we read: refuse to make one.
            return Err(err(libc::EINVAL));
        }
        Ok(())
    }

    // ----- lookup -----

    /// Resolves `name` in directory `parent` across its layers (DESIGN 2.1).
    pub fn resolve(&self, parent: &Node, name: &OsStr) -> io::Result<Option<(Found, FileStat)>> {
        let mut found: Option<(Found, FileStat)> = None;
        // The upper holds a metadata-only copy: its bytes are in the next layer's file.
        let mut metacopy = false;
        for probe in self.probes(parent, name)? {
            let li = probe.layer;
            let Some(dir) = self.dir_if_present(parent, li)? else {
                continue;
            };
            let dfd = &dir;
            let entry = if probe.entry {
                dfd.try_stat(name)?
            } else {
                None
            };
            if let Some(mut st) = entry {
                if self.entry_is_whiteout(dfd, li, name, &st)? {
                    break;
                }
                let d = is_dir(&st);
                match &mut found {
                    None => {
                        metacopy = self.behaviour.metacopy
                            && self.is_upper(li)
                            && crate::layer::file_type(&st) == libc::S_IFREG
                            && st.st_size > 0
                            && whiteout::is_metacopy(dfd, name)?;
                        if metacopy && copyup::restore_fill_times(dfd, name)? {
                            // The times just put back are what the kernel must be told.
                            st = dfd.stat(name)?;
                        }
                        found = Some((
                            Found {
                                kind: crate::layer::file_type(&st),
                                layers: vec![li],
                                real: RealId::of(&st),
                            },
                            st,
                        ));
                        if !metacopy && (!d || self.child_opaque(dfd, name, &st, li)?) {
                            break;
                        }
                    }
                    Some((f, _)) => {
                        if metacopy {
                            if crate::layer::file_type(&st) == libc::S_IFREG {
                                f.layers.push(li);
                            }
                            break;
                        } else if f.kind == libc::S_IFDIR && d {
                            f.layers.push(li);
                            if self.child_opaque(dfd, name, &st, li)? {
                                break;
                            }
                        } else {
                            break;
                        }
                    }
                }
            }
            if probe.oci_whiteout_at(dfd, name)? {
                break;
            }
        }
        if metacopy && found.as_ref().is_some_and(|(f, _)| f.layers.len() < 2) {
            // As overlayfs: a metacopy whose lower file is gone has no bytes to show.
            log::warn!(
                "{}: metadata-only copy in the upper, but no lower file holds its data",
                show(name)
            );
            return Err(err(libc::EIO));
        }
        Ok(found)
    }

    /// The layers of `parent` that may hold `name`, top first. Directories that merge many
    /// lower layers answer from their name index (DESIGN 5: O(layers that hold the name));
    /// others are probed layer by layer.
    fn probes(&self, parent: &Node, name: &OsStr) -> io::Result<Vec<Probe>> {
        let layers = parent.layers();
        let lowers = layers.iter().filter(|&&l| !self.is_upper(l)).count();
        if lowers < self.index_min_lowers {
            return Ok(layers
                .into_iter()
                .map(|layer| Probe {
                    layer,
                    entry: true,
                    oci_whiteout: None,
                })
                .collect());
        }
        let index = self.cache.index(parent.id, || {
            let mut ix = dircache::NameIndex::default();
            for &li in layers.iter().filter(|&&l| !self.is_upper(l)) {
                if let Some(fd) = self.dir_if_present(parent, li)? {
                    ix.add_layer(li, fd.names()?);
                }
            }
            Ok(ix)
        })?;
        let mut probes = Vec::new();
        if let Some(&u) = layers.first().filter(|&&l| self.is_upper(l)) {
            probes.push(Probe {
                layer: u,
                entry: true,
                oci_whiteout: None,
            });
        }
        probes.extend(index.get(name).iter().map(|o| Probe {
            layer: o.layer,
            entry: o.entry,
            oci_whiteout: Some(o.oci_whiteout),
        }));
        Ok(probes)
    }

    fn entry_is_whiteout(
        &self,
        dir: &LDir,
        li: LayerIdx,
        name: &OsStr,
        st: &FileStat,
    ) -> io::Result<bool> {
        if whiteout::is_chardev_whiteout(st) {
            return Ok(true);
        }
        if crate::layer::file_type(st) == libc::S_IFREG && st.st_size == 0 {
            let marks = self.marks_of(dir, li)?;
            return whiteout::is_whiteout(dir, &marks, name, st);
        }
        Ok(false)
    }

    /// Would removing the upper entry at (parent, name) expose something from a lower layer?
    /// (overlayfs' "lower positive": decides whether a whiteout must be left.)
    pub fn lower_positive(&self, parent: &Node, name: &OsStr) -> io::Result<bool> {
        for probe in self.probes(parent, name)? {
            let li = probe.layer;
            let Some(dir) = self.dir_if_present(parent, li)? else {
                continue;
            };
            let dfd = &dir;
            if !self.is_upper(li)
                && probe.entry
                && let Some(st) = dfd.try_stat(name)?
            {
                return Ok(!self.entry_is_whiteout(dfd, li, name, &st)?);
            }
            if probe.oci_whiteout_at(dfd, name)? {
                return Ok(false);
            }
        }
        Ok(false)
    }

    /// FUSE lookup: finds (parent, name) and counts one kernel reference on the result.
    pub fn lookup(&self, parent: NodeId, name: &OsStr) -> io::Result<(Arc<Node>, Attr)> {
        check_name(name)?;
        if name.len() > self.namemax as usize {
            return Err(err(libc::ENAMETOOLONG));
        }
        if whiteout::is_reserved_name(name) {
            return Err(err(libc::ENOENT));
        }
        let pnode = self.nodes.get(parent)?;
        if !pnode.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        if let Some(n) = self.nodes.touch(parent, &name.to_os_string()) {
            // The binding may be stale for a moment (a racing unlink or rename has changed
            // the name but not yet the table): the node is the answer only if this very
            // name still holds its object; otherwise what the layers hold now decides.
            let here = self
                .dir_in(&pnode, n.top_layer())
                .and_then(|d| d.try_stat(name));
            match here {
                Ok(Some(st)) if self.is_node_object(&n, &st) => {
                    return Ok((n.clone(), self.finish_attr(&n, st)));
                }
                Ok(_) => self.nodes.forget(n.id, 1),
                Err(e) => {
                    self.nodes.forget(n.id, 1);
                    if e.raw_os_error() != Some(libc::ENOENT) {
                        return Err(e);
                    }
                }
            }
        }
        let (found, st) = self
            .resolve(&pnode, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        self.bind_found(&pnode, name, found, st)
    }

    /// Lookup of an entry of a listing (readdirplus): while the directory has not changed
    /// since the listing was made, the entry already says what `resolve` would find, and
    /// one stat of its top object is enough; otherwise a full lookup.
    pub fn lookup_listed(
        &self,
        parent: NodeId,
        listing: &readdir::Listing,
        e: &readdir::DirEntry,
    ) -> io::Result<(Arc<Node>, Attr)> {
        let pnode = self.nodes.get(parent)?;
        if pnode.generation() != listing.generation || self.nodes.child(parent, &e.name).is_some() {
            return self.lookup(parent, &e.name);
        }
        let dir = self.dir_in(&pnode, e.top)?;
        let st = match dir.try_stat(&e.name)? {
            Some(st) if RealId::of(&st) == e.real => st,
            _ => return self.lookup(parent, &e.name),
        };
        if self.behaviour.metacopy
            && self.is_upper(e.top)
            && e.kind == libc::S_IFREG
            && st.st_size > 0
        {
            // May be a metadata-only copy: only a lookup finds its data layer.
            return self.lookup(parent, &e.name);
        }
        let found = Found {
            kind: e.kind,
            layers: e.layers(),
            real: e.real,
        };
        self.bind_found(&pnode, &e.name, found, st)
    }

    /// Binds what a lookup found and returns the node with its attributes.
    fn bind_found(
        &self,
        pnode: &Arc<Node>,
        name: &OsStr,
        found: Found,
        st: FileStat,
    ) -> io::Result<(Arc<Node>, Attr)> {
        let parent = pnode.id;
        let upper = self.is_upper(found.layers[0]);
        let node = self.nodes.bind(parent, name.to_os_string(), found, upper);
        if upper {
            self.note_handle(&node, pnode, name);
        }
        if !upper && self.is_upper(node.top_layer()) {
            // A hard link whose sibling was copied up: the node is upper now, so this name
            // is linked into the upper too (and its attributes come from there).
            self.link_up_alias(&node, pnode, name)?;
            return Ok((node.clone(), self.getattr(&node)?));
        }
        let attr = self.finish_attr(&node, st);
        Ok((node, attr))
    }

    /// The node bound to (parent, name) if the kernel holds one, else a fresh resolve that
    /// is NOT counted as a kernel reference (for unlink, rename, ...).
    pub(crate) fn child_node(&self, parent: &Node, name: &OsStr) -> io::Result<Option<ChildRef>> {
        if let Some(n) = self.nodes.child(parent.id, &name.to_os_string()) {
            return Ok(Some(ChildRef::Bound(n)));
        }
        Ok(self
            .resolve(parent, name)?
            .map(|(f, _)| ChildRef::Unbound(f)))
    }

    // ----- attributes -----

    fn finish_attr(&self, node: &Node, mut st: FileStat) -> Attr {
        st.st_ino = node.ino;
        if node.is_metacopy() {
            // The blocks its bytes take are the lower file's (as overlayfs reports them).
            if let Ok((dir, name)) = self.parent_in(node, node.data_layer())
                && let Ok(lst) = dir.stat(&name)
            {
                st.st_blocks = lst.st_blocks;
            }
        }
        if node.is_dir() && (self.behaviour.static_nlink || node.read().layers.len() > 1) {
            // overlayfs reports nlink 1 for merged directories (the count is unknowable).
            st.st_nlink = 1;
        }
        self.map_ids_out(&mut st);
        st
    }

    fn map_ids_out(&self, st: &mut FileStat) {
        let b = &self.behaviour;
        st.st_uid = map_out(&b.uid_map, st.st_uid);
        st.st_gid = map_out(&b.gid_map, st.st_gid);
        if let Some(u) = b.squash_uid {
            st.st_uid = u;
        }
        if let Some(g) = b.squash_gid {
            st.st_gid = g;
        }
    }

    pub(crate) fn uid_in(&self, uid: u32) -> u32 {
        map_in(&self.behaviour.uid_map, uid)
    }

    pub(crate) fn gid_in(&self, gid: u32) -> u32 {
        map_in(&self.behaviour.gid_map, gid)
    }

    /// The raw stat of a node's top object (ids as stored).
    pub fn stat_raw(&self, node: &Node) -> io::Result<FileStat> {
        let li = node.top_layer();
        if li == usize::MAX {
            return Err(err(libc::ENOENT));
        }
        if node.id == node::ROOT_ID {
            return self.layers[li].root_stat();
        }
        let at_name = || {
            let (dir, name) = self.parent_in(node, li)?;
            match dir.stat(&name) {
                Ok(st) if self.is_node_object(node, &st) => Ok(st),
                // The name was just replaced (a whiteout, a renamed-over object) or moved by
                // an unlink or rename the node table has not caught up with: never report
                // that object, look again where the table then says the node is.
                Ok(_) => Err(err(libc::ESTALE)),
                Err(e) if self.is_upper(li) => Err(io_stale(e)),
                Err(e) => Err(e),
            }
        };
        match retry_stale(at_name) {
            Ok(st) => Ok(st),
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => match self.stat_open(node) {
                Some(st) => Ok(st),
                None => self
                    .open_by_handle(node, li, libc::O_PATH)
                    .map(|(_, st)| st),
            },
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                // Unlinked but open: answer from an open handle.
                self.stat_open(node).ok_or(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Is `st`, found at one of `node`'s names, the node's own object? Between the syscall
    /// of an unlink or rename and its update of the node table, a name can already hold a
    /// whiteout or another object; a getattr, open or setattr racing with it must not take
    /// that for the node.
    ///
    /// When the answer is no, a request reaching the node by name answers ESTALE: the kernel
    /// then walks the path again with revalidation (`retry_estale`) and finds what the name
    /// holds now, which is what the same race gives on a local filesystem.
    pub(crate) fn is_node_object(&self, node: &Node, st: &FileStat) -> bool {
        crate::layer::file_type(st) == node.kind
            && self.nodes.inos.peek(RealId::of(st)) == Some(node.ino)
    }

    /// Remembers the file handle of `node`'s upper object at `name` in `pnode` (once).
    pub(crate) fn note_handle(&self, node: &Node, pnode: &Node, name: &OsStr) {
        if node.handle.get().is_some() {
            return;
        }
        if let Ok(dir) = self.dir_in(pnode, 0)
            && let Ok(fd) = dir.fd()
        {
            self.note_handle_at(node, fd, name);
        }
    }

    /// `note_handle` with the upper directory's fd at hand.
    pub(crate) fn note_handle_at(&self, node: &Node, dir: std::os::fd::BorrowedFd, name: &OsStr) {
        if node.handle.get().is_some() || !self.handle_ok.load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        match crate::sys::name_to_handle(dir, name) {
            Ok(h) => {
                let _ = node.handle.set(h);
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                // The upper filesystem has no file handles: stop asking.
                self.handle_ok
                    .store(false, std::sync::atomic::Ordering::Relaxed);
            }
            Err(_) => {}
        }
    }

    /// Opens `node`'s object in upper layer `li` by its file handle, checked to be the
    /// node's (its stat comes along): ESTALE when there is no handle, the object is gone,
    /// or handles cannot be opened here (open_by_handle_at needs CAP_DAC_READ_SEARCH).
    pub(crate) fn open_by_handle(
        &self,
        node: &Node,
        li: usize,
        flags: i32,
    ) -> io::Result<(std::os::fd::OwnedFd, FileStat)> {
        let stale = || err(libc::ESTALE);
        let h = node.handle.get().ok_or_else(stale)?;
        let fd =
            crate::sys::open_by_handle(self.layers[li].root(), h, flags).map_err(|_| stale())?;
        let st = nix::sys::stat::fstat(&fd).map_err(nix_err)?;
        if self.is_node_object(node, &st) {
            Ok((fd, st))
        } else {
            Err(stale())
        }
    }

    pub fn getattr(&self, node: &Node) -> io::Result<Attr> {
        let st = self.stat_raw(node)?;
        Ok(self.finish_attr(node, st))
    }

    // ----- helpers for writers -----

    /// What the upper holds at (upper dir, name): a real object, a whiteout, `.wh.NAME`.
    pub(crate) fn upper_entry(&self, udir: &LDir, name: &OsStr) -> io::Result<UpperEntry> {
        let mut e = UpperEntry::default();
        if let Some(st) = udir.try_stat(name)? {
            if self.entry_is_whiteout(udir, 0, name, &st)? {
                e.whiteout = true;
            } else {
                e.object = Some(st);
            }
        }
        e.oci_whiteout = udir.try_stat(&oci_name(name))?.is_some();
        Ok(e)
    }

    fn unlink_oci_whiteout(&self, udir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        match nix::unistd::unlinkat(
            udir,
            oci_name(name).as_os_str(),
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(nix::Error::ENOENT) => Ok(()),
            Err(e) => Err(nix_err(e)),
        }
    }

    /// Sets owner then mode (so setuid/setgid survive) of a fresh object.
    fn set_owner_mode(
        &self,
        dir: BorrowedFd,
        name: &OsStr,
        uid: u32,
        gid: u32,
        perm: Option<u32>,
    ) -> io::Result<()> {
        if self.can_chown {
            nix::unistd::fchownat(
                dir,
                name,
                Some(nix::unistd::Uid::from_raw(uid)),
                Some(nix::unistd::Gid::from_raw(gid)),
                nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_err)?;
        }
        if let Some(p) = perm {
            nix::sys::stat::fchmodat(
                dir,
                name,
                nix::sys::stat::Mode::from_bits_truncate(p),
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            )
            .map_err(nix_err)?;
        }
        Ok(())
    }

    /// An open file of `node` held by one of its handles.
    pub(crate) fn open_file_of(&self, node: &Node) -> Option<Arc<std::fs::File>> {
        self.open_file_where(node, |_| true)
    }

    /// An open file of one of `node`'s handles that passes `keep`.
    pub(crate) fn open_file_where(
        &self,
        node: &Node,
        keep: impl Fn(&file::Handle) -> bool,
    ) -> Option<Arc<std::fs::File>> {
        self.handles
            .iter()
            .filter(|h| h.node.id == node.id && keep(h))
            .find_map(|h| h.open_file())
    }

    fn stat_open(&self, node: &Node) -> Option<FileStat> {
        let f = self.open_file_of(node)?;
        nix::sys::stat::fstat(f.as_fd()).ok()
    }
}

/// Directories merging at least this many lower layers get a name index.
const INDEX_MIN_LOWERS: usize = 8;

fn index_min_lowers() -> usize {
    // Test hook: index every directory, so the suites check the index against the kernel.
    std::env::var("UNIONMOUNT_TEST_INDEX_MIN_LOWERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(INDEX_MIN_LOWERS)
}

/// One layer to look at for a name: whether it may have an entry, and whether it has
/// `.wh.NAME` (None: not known, look).
struct Probe {
    layer: LayerIdx,
    entry: bool,
    oci_whiteout: Option<bool>,
}

impl Probe {
    /// Does this layer's directory `dir` hold `.wh.NAME` (hiding `name` below it)?
    fn oci_whiteout_at(&self, dir: &LDir, name: &OsStr) -> io::Result<bool> {
        match self.oci_whiteout {
            Some(known) => Ok(known),
            None => Ok(dir.try_stat(&oci_name(name))?.is_some()),
        }
    }
}

/// A child found for a namespace operation.
pub(crate) enum ChildRef {
    Bound(Arc<Node>),
    Unbound(Found),
}

impl ChildRef {
    pub fn kind(&self) -> u32 {
        match self {
            ChildRef::Bound(n) => n.kind,
            ChildRef::Unbound(f) => f.kind,
        }
    }
    pub fn layers(&self) -> Vec<LayerIdx> {
        match self {
            ChildRef::Bound(n) => n.layers(),
            ChildRef::Unbound(f) => f.layers.clone(),
        }
    }
}

fn map_out(map: &[IdMap], id: u32) -> u32 {
    if map.is_empty() {
        return id;
    }
    for m in map {
        if id >= m.outside && id - m.outside < m.len {
            return m.inside + (id - m.outside);
        }
    }
    65534
}

fn map_in(map: &[IdMap], id: u32) -> u32 {
    if map.is_empty() {
        return id;
    }
    for m in map {
        if id >= m.inside && id - m.inside < m.len {
            return m.outside + (id - m.inside);
        }
    }
    65534
}

/// Creates `WORKDIR/work` or empties it of an earlier run's leftovers. Refuses a workdir
/// that kernel overlayfs marked `work/incompat/volatile` (a `volatile` mount used it and the
/// upper may be inconsistent after a crash), as the kernel itself does: emptying it would
/// erase that warning.
fn prepare_workdir(w: &Layer) -> io::Result<OwnedFd> {
    let name = OsStr::new("work");
    match nix::sys::stat::mkdirat(
        w.root(),
        name,
        nix::sys::stat::Mode::from_bits_truncate(0o700),
    ) {
        Ok(()) | Err(nix::Error::EEXIST) => {}
        Err(e) => return Err(nix_err(e)),
    }
    let fd = open_at(
        w.root(),
        name,
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        0,
    )?;
    let incompat = OsStr::new("incompat");
    if try_stat_at(fd.as_fd(), incompat)?.is_some_and(|st| is_dir(&st)) {
        let dir = open_at(
            fd.as_fd(),
            incompat,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            0,
        )?;
        if try_stat_at(dir.as_fd(), OsStr::new("volatile"))?.is_some() {
            return Err(io::Error::other(
                "work/incompat/volatile exists: kernel overlayfs used this upper with \
                 'volatile' and it may be inconsistent after a crash; remove that directory \
                 only if the upper is known to be intact",
            ));
        }
    }
    for entry in readdir::list_names(fd.as_fd())? {
        remove_tree_at(fd.as_fd(), &entry)?;
    }
    Ok(fd)
}

/// Removes `name` in `dir` and everything below it, never following symlinks.
pub(crate) fn remove_tree_at(dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
    let st = match try_stat_at(dir, name)? {
        Some(st) => st,
        None => return Ok(()),
    };
    if is_dir(&st) {
        let sub = open_at(
            dir,
            name,
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
            0,
        )?;
        for child in readdir::list_names(sub.as_fd())? {
            remove_tree_at(sub.as_fd(), &child)?;
        }
        nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::RemoveDir).map_err(nix_err)
    } else {
        nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir).map_err(nix_err)
    }
}

/// `trusted.` when this process may write trusted xattrs on the upper's filesystem.
/// The prefetcher of lower directories: one worker warming one level below each directory
/// listed, unless `UNIONMOUNT_PREFETCH=WORKERS:DEPTH` says otherwise (0 workers: off).
fn prefetcher() -> Option<prefetch::Prefetcher> {
    let (mut workers, mut depth) = (1usize, 1u8);
    if let Some(v) = std::env::var_os("UNIONMOUNT_PREFETCH") {
        let v = v.to_string_lossy().into_owned();
        let mut it = v.split(':');
        workers = it.next().and_then(|w| w.parse().ok()).unwrap_or(workers);
        depth = it.next().and_then(|d| d.parse().ok()).unwrap_or(depth);
    }
    (workers > 0).then(|| prefetch::Prefetcher::new(workers.min(8), depth.min(8)))
}

fn probe_xattr_ns(work: BorrowedFd) -> &'static str {
    use crate::sys::XTarget;
    let probe = b"trusted.overlay.unionmount-probe";
    match crate::sys::setxattr(XTarget::Fd(work), probe, b"1", 0) {
        Ok(()) => {
            let _ = crate::sys::removexattr(XTarget::Fd(work), probe);
            "trusted."
        }
        Err(_) => "user.",
    }
}

/// Bytes of an OsStr, for log lines.
pub fn show(name: &OsStr) -> String {
    String::from_utf8_lossy(name.as_bytes()).into_owned()
}
