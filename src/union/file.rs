//! Open files and directories: handles, data I/O, and directory snapshots.
//!
//! A handle has one real fd, or none for a while: handles holding an fd are kept under
//! `handle_fd_cap()` (3/8 of the open-file limit), the oldest one's fd being closed when a
//! new one is needed, and a handle without one re-opens its file by name on next use (the
//! open flags minus O_TRUNC). So any number of files can be open through the mount
//! whatever the daemon's RLIMIT_NOFILE. Before a name of a node goes (unlink, rename
//! over it), every handle of the node gets its fd back and keeps it for good: an open but
//! unlinked file cannot be re-opened by name. A read-only open of a lower file reads the
//! lower file until the node is copied up (by another open for write); from then on the
//! handle re-opens the upper copy, so every reader sees the data writers wrote (as
//! overlayfs since 4.19). A writable open always copies up first: a lower file never
//! backs a writable handle.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};

use crate::layer::LDir;
use std::collections::VecDeque;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use nix::fcntl::OFlag;

use super::copyup::Data;
use super::io_stale;
use super::node::{Node, NodeId};
use super::readdir::{self, DirEntry, Listing};
use super::{Ctx, Union, err, nix_err};

/// Listings kept for handle-less directory streams; one a directory, bounded.
const STREAMS_CAP: usize = 64;

/// An open directory: its listing is built on the first readdir.
pub struct DirStream {
    node: Arc<Node>,
    entries: Mutex<Option<Arc<Listing>>>,
}

impl DirStream {
    fn new(node: Arc<Node>) -> DirStream {
        DirStream {
            node,
            entries: Mutex::new(None),
        }
    }
}

pub struct Handle {
    pub node: Arc<Node>,
    fh: u64,
    /// None while closed to keep the daemon under its fd budget (see `HandleFds`).
    file: RwLock<Option<Arc<File>>>,
    upper: AtomicBool,
    /// Never closed again: the node lost (or is losing) a name.
    pinned: AtomicBool,
    flags: i32,
}

impl Handle {
    /// The open file, if the handle holds one now.
    pub fn open_file(&self) -> Option<Arc<File>> {
        self.file.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn is_upper(&self) -> bool {
        self.upper.load(Ordering::Acquire)
    }
}

/// Handles holding an fd, oldest first (entries of released handles are skipped when they
/// come up), and how many handles have none now.
#[derive(Default)]
pub struct HandleFds {
    order: std::sync::Mutex<VecDeque<u64>>,
    closed: AtomicUsize,
}

/// Handles that keep an fd at most: 3/8 of the open-file limit; cached directory fds take
/// up to 1/4, prefetch jobs 1/8, and the last quarter is left to copy-up, prefetch
/// workers, pinned handles and the FUSE session.
fn handle_fd_cap() -> usize {
    (super::dircache::fd_limit() * 3 / 8).max(16)
}

/// Does an open with these flags write (or truncate)?
pub fn writable(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

impl Union {
    /// Opens the node's top object as a real fd with the caller's flags.
    fn open_real(&self, node: &Node, li: usize, flags: i32) -> io::Result<OwnedFd> {
        let keep = libc::O_ACCMODE
            | libc::O_APPEND
            | libc::O_TRUNC
            | libc::O_NONBLOCK
            | libc::O_SYNC
            | libc::O_DSYNC
            | libc::O_NOATIME;
        let mut of = OFlag::from_bits_truncate(flags & keep);
        if node.is_dir() {
            of |= OFlag::O_DIRECTORY;
        }
        if self.writeback {
            // The kernel computes append offsets itself and writes pages back at their
            // offsets; it also reads partial pages of files opened write-only.
            of.remove(OFlag::O_APPEND);
            if flags & libc::O_ACCMODE == libc::O_WRONLY {
                let rw = (of & !OFlag::O_ACCMODE) | OFlag::O_RDWR;
                if let Ok(fd) = self.open_at_parent(node, li, rw) {
                    return Ok(fd);
                }
            }
        }
        self.open_at_parent(node, li, of)
    }

    fn open_at_parent(&self, node: &Node, li: usize, of: OFlag) -> io::Result<OwnedFd> {
        match super::retry_stale(|| self.open_at_parent_once(node, li, of)) {
            // The name keeps holding something else: the node's object by its handle (the
            // open a local filesystem gives through the inode the path walk found).
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => self
                .open_by_handle(
                    node,
                    li,
                    (of & !(OFlag::O_NOFOLLOW | OFlag::O_CREAT)).bits(),
                )
                .map(|(fd, _)| fd)
                .map_err(|_| e),
            r => r,
        }
    }

    fn open_at_parent_once(&self, node: &Node, li: usize, of: OFlag) -> io::Result<OwnedFd> {
        let flags = of.bits();
        // Through the cached parent directory: one openat of one name, never following it.
        let (dir, name) = self.parent_in(node, li)?;
        // The upper changes under us: check that the name still holds the node's object
        // before opening it (never open a whiteout device, or another file renamed over
        // it), and that what was opened is that object.
        let upper = self.is_upper(li);
        if upper && !self.is_node_object(node, &dir.stat(&name).map_err(io_stale)?) {
            return Err(err(libc::ESTALE));
        }
        let open = |of: OFlag| self.cache.retry_if_out_of_fds(|| dir.open(&name, of));
        let fd = match open(of) {
            // O_NOATIME is refused for files the caller does not own: drop it, as it is only
            // an optimisation.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) && flags & libc::O_NOATIME != 0 => {
                open(of & !OFlag::O_NOATIME)
            }
            // A whiteout (char device 0/0: ENXIO) or nothing put at the name since the check.
            Err(e) if upper && matches!(e.raw_os_error(), Some(libc::ENXIO | libc::ENOENT)) => {
                Err(err(libc::ESTALE))
            }
            r => r,
        }?;
        if upper {
            if !self.is_node_object(node, &nix::sys::stat::fstat(&fd).map_err(nix_err)?) {
                return Err(err(libc::ESTALE));
            }
            if node.handle.get().is_none() {
                self.note_handle_at(node, dir.fd()?, &name);
            }
        }
        Ok(fd)
    }

    pub fn open(&self, ino: NodeId, flags: i32) -> io::Result<u64> {
        let node = self.nodes.get(ino)?;
        if node.kind != libc::S_IFREG {
            return Err(err(libc::EINVAL));
        }
        if node.superseded.load(Ordering::Acquire) {
            return Err(err(libc::ESTALE));
        }
        let w = writable(flags);
        if w {
            let data = if flags & libc::O_TRUNC != 0 {
                Data::None
            } else if self.writeback {
                // Every write reaches the daemon: the bytes are copied up by the first
                // one (or dropped by a truncate to zero, which is how an O_TRUNC open
                // arrives with the writeback cache), not by the open (with metacopy).
                Data::Meta
            } else {
                Data::All
            };
            self.copy_up(&node, data)?;
        }
        // A metacopy's bytes are below: its handles read them there until they are up.
        let li = node.data_layer();
        if w && !self.is_upper(li) {
            // A writable handle of a metacopy: its lower file is opened by the first read
            // (for an image layer, opening fetches the bytes; an O_TRUNC open never reads).
            return Ok(self.insert_handle(node, None, false, flags));
        }
        let fd = self.open_real(&node, li, self.flags_in(li, flags))?;
        Ok(self.add_handle(node, fd, li, flags))
    }

    /// Opens the file at `path` (relative, '/'-separated) read-only, looking each name up
    /// as the kernel would (for commit: the bytes of a metacopy in the image below).
    pub fn open_path(&self, path: &[u8]) -> io::Result<File> {
        use std::os::unix::ffi::OsStrExt;
        let mut ino = super::node::ROOT_ID;
        for name in path
            .split(|b| *b == b'/')
            .filter(|n| !n.is_empty() && *n != b".")
        {
            ino = self.lookup(ino, std::ffi::OsStr::from_bytes(name))?.0.id;
        }
        let fh = self.open(ino, libc::O_RDONLY)?;
        let f = self.handle(fh).and_then(|h| self.current_file(&h));
        self.release(fh);
        f?.try_clone()
    }

    /// Open flags for the object in layer `li`: a lower file is only ever opened for
    /// reading (a writable handle of a metacopy reads its bytes there until the first write).
    fn flags_in(&self, li: usize, flags: i32) -> i32 {
        if self.is_upper(li) {
            flags
        } else {
            (flags & !(libc::O_ACCMODE | libc::O_TRUNC | libc::O_APPEND)) | libc::O_RDONLY
        }
    }

    /// The handle's file for a change of its bytes: a writable handle of a metacopy gets
    /// the bytes copied up first, then moves to the upper file.
    fn file_to_write(&self, h: &Handle) -> io::Result<Arc<File>> {
        if !h.is_upper() && writable(h.flags) && !h.node.superseded.load(Ordering::Acquire) {
            self.copy_up(&h.node, Data::All)?;
        }
        let f = self.current_file(h)?;
        if !h.is_upper() {
            return Err(err(libc::EBADF));
        }
        Ok(f)
    }

    /// Registers an open fd as a handle.
    pub(crate) fn add_handle(&self, node: Arc<Node>, fd: OwnedFd, li: usize, flags: i32) -> u64 {
        self.insert_handle(node, Some(fd), self.is_upper(li), flags)
    }

    /// Registers a handle; one without an fd (counted as closed) gets it from `file_of` on
    /// first use.
    fn insert_handle(&self, node: Arc<Node>, fd: Option<OwnedFd>, upper: bool, flags: i32) -> u64 {
        let fh = self.new_fh();
        let has_fd = fd.is_some();
        self.handles.insert(
            fh,
            Arc::new(Handle {
                node,
                fh,
                file: RwLock::new(fd.map(|fd| Arc::new(File::from(fd)))),
                upper: AtomicBool::new(upper),
                pinned: AtomicBool::new(false),
                flags,
            }),
        );
        if has_fd {
            self.track_fd(fh);
        } else {
            self.handle_fds.closed.fetch_add(1, Ordering::AcqRel);
        }
        fh
    }

    /// Counts one more handle holding an fd; past the cap, closes the oldest others' fds.
    fn track_fd(&self, fh: u64) {
        let mut order = self
            .handle_fds
            .order
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        order.push_back(fh);
        while order.len() > handle_fd_cap() {
            let Some(victim) = order.pop_front() else {
                break;
            };
            let Some(h) = self.handles.get(&victim).map(|h| h.clone()) else {
                continue;
            };
            // A pinned handle or one of a node without a name keeps its fd (uncounted).
            if h.pinned.load(Ordering::Acquire) || h.node.read().aliases.is_empty() {
                continue;
            }
            if h.file
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .take()
                .is_some()
            {
                self.handle_fds.closed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// The handle's fd, re-opened by name if it was closed to save fds.
    fn file_of(&self, h: &Handle) -> io::Result<Arc<File>> {
        if let Some(f) = h.open_file() {
            return Ok(f);
        }
        let mut slot = h.file.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = slot.as_ref() {
            return Ok(f.clone());
        }
        let li = if h.is_upper() { 0 } else { h.node.data_layer() };
        let fd = self.open_real(&h.node, li, self.flags_in(li, h.flags & !libc::O_TRUNC))?;
        let f = Arc::new(File::from(fd));
        *slot = Some(f.clone());
        drop(slot);
        self.handle_fds.closed.fetch_sub(1, Ordering::AcqRel);
        if !h.pinned.load(Ordering::Acquire) {
            self.track_fd(h.fh);
        }
        Ok(f)
    }

    /// Moves the names of file `ino` to a new node (`NodeTable::supersede`): it was copied
    /// up while readers pass through to its lower file, and the kernel must open the copy
    /// through another inode. Under the node's copy lock, so that no copy-up of the old
    /// node maps its upper object to the old number afterwards.
    /// Returns the names moved (the kernel may cache them as the old node).
    pub fn supersede(&self, ino: NodeId) -> io::Result<Vec<(NodeId, std::ffi::OsString)>> {
        let node = self.nodes.get(ino)?;
        let _guard = node.copy_lock.lock().unwrap_or_else(|e| e.into_inner());
        if node.superseded.load(Ordering::Acquire) {
            return Ok(Vec::new());
        }
        self.pin_handles(ino)?;
        let names = node.read().aliases.clone();
        self.nodes.supersede(&node);
        for (p, _) in &names {
            if let Ok(p) = self.nodes.get(*p) {
                p.changed();
            }
        }
        Ok(names)
    }

    /// Gives every handle of `node` its fd back for good: a name of the node is about to
    /// go, and a file without a name cannot be re-opened. Costs a scan of the open
    /// handles only when fds are being closed or may soon be (half the cap in use).
    ///
    /// A metacopy with open handles gets its bytes first, and every handle moves to the
    /// upper file: once the name is gone nothing can copy them up, and the handles must
    /// keep seeing (and writing, and fstat-ing) the file that was changed.
    pub(crate) fn pin_handles(&self, node: NodeId) -> io::Result<()> {
        let metacopy = self.nodes.get(node).is_ok_and(|n| n.is_metacopy());
        if !metacopy
            && self.handle_fds.closed.load(Ordering::Acquire) == 0
            && self.handles.len() < handle_fd_cap() / 2
        {
            return Ok(());
        }
        let hs: Vec<Arc<Handle>> = self
            .handles
            .iter()
            .filter(|h| h.node.id == node)
            .map(|h| h.clone())
            .collect();
        if metacopy && let Some(h) = hs.first() {
            self.copy_up(&h.node, Data::All)?;
        }
        for h in hs {
            h.pinned.store(true, Ordering::Release);
            if metacopy {
                // current_file moves it to the upper file now, while the name is there.
                self.current_file(&h)?;
            } else if self.handle_fds.closed.load(Ordering::Acquire) > 0 {
                self.file_of(&h)?;
            }
        }
        Ok(())
    }

    /// An upper file of `node` that one of its handles holds open for writing: what a
    /// truncate reaches the node by once no name does (ftruncate needs a writable fd).
    pub(crate) fn writable_file_of(&self, node: &Node) -> Option<Arc<File>> {
        self.open_file_where(node, |h| {
            h.is_upper() && h.flags & libc::O_ACCMODE != libc::O_RDONLY
        })
    }

    fn handle(&self, fh: u64) -> io::Result<Arc<Handle>> {
        self.handles
            .get(&fh)
            .map(|h| h.clone())
            .ok_or_else(|| err(libc::EBADF))
    }

    /// The handle's current file: re-opened from the upper if the node was copied up since.
    /// A superseded node's handles keep the lower file, as its passthrough readers do.
    fn current_file(&self, h: &Handle) -> io::Result<Arc<File>> {
        if !h.is_upper()
            && self.is_upper(h.node.data_layer())
            && !h.node.superseded.load(Ordering::Acquire)
        {
            let fd = self.open_real(&h.node, 0, h.flags & !libc::O_TRUNC)?;
            let f = Arc::new(File::from(fd));
            let old = h
                .file
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .replace(f.clone());
            h.upper.store(true, Ordering::Release);
            if old.is_none() {
                self.handle_fds.closed.fetch_sub(1, Ordering::AcqRel);
                if !h.pinned.load(Ordering::Acquire) {
                    self.track_fd(h.fh);
                }
            }
            return Ok(f);
        }
        self.file_of(h)
    }

    /// Reads at `offset` into `buf` (until full or end of file); returns the length read.
    pub fn read_into(&self, fh: u64, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        let h = self.handle(fh)?;
        let f = self.current_file(&h)?;
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> io::Result<u32> {
        let h = self.handle(fh)?;
        let f = self.file_to_write(&h)?;
        let mut done = 0;
        while done < data.len() {
            match f.write_at(&data[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if done > 0 => {
                    log::debug!("short write: {e}");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done as u32)
    }

    /// The real file behind a handle, and whether it is the upper's.
    pub fn handle_file(&self, fh: u64) -> io::Result<(Arc<File>, bool)> {
        let h = self.handle(fh)?;
        Ok((self.current_file(&h)?, h.is_upper()))
    }

    /// Whether the handle's file is the upper's (None: no such handle).
    pub fn handle_is_upper(&self, fh: u64) -> Option<bool> {
        self.handles.get(&fh).map(|h| h.is_upper())
    }

    pub fn release(&self, fh: u64) {
        if let Some((_, h)) = self.handles.remove(&fh)
            && h.open_file().is_none()
        {
            self.handle_fds.closed.fetch_sub(1, Ordering::AcqRel);
        }
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> io::Result<()> {
        let h = self.handle(fh)?;
        // Through the upper file once the node's bytes are there, even if they were
        // written (copied up) through another handle.
        let f = self.current_file(&h)?;
        if !self.behaviour.fsync || !h.is_upper() {
            return Ok(());
        }
        // fdatasync of a file this mount copied up also commits the copy-up's rename (a
        // full fsync does, through the ctime the rename set): otherwise a crash can lose
        // the upper name, and with it the synced data (kernel overlayfs has that hole).
        let full = !datasync || h.node.name_unsynced.swap(false, Ordering::AcqRel);
        let r = if full { f.sync_all() } else { f.sync_data() };
        if r.is_err() && datasync && full {
            h.node.name_unsynced.store(true, Ordering::Release);
        }
        r
    }

    pub fn fallocate(&self, fh: u64, offset: u64, len: u64, mode: i32) -> io::Result<()> {
        let h = self.handle(fh)?;
        nix::fcntl::fallocate(
            self.file_to_write(&h)?.as_fd(),
            nix::fcntl::FallocateFlags::from_bits_truncate(mode),
            offset as i64,
            len as i64,
        )
        .map_err(nix_err)
    }

    pub fn lseek(&self, fh: u64, offset: i64, whence: i32) -> io::Result<i64> {
        let h = self.handle(fh)?;
        let f = self.current_file(&h)?;
        crate::sys::lseek(f.as_fd(), offset, whence)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> io::Result<u32> {
        let hi = self.handle(fh_in)?;
        let ho = self.handle(fh_out)?;
        let fo = self.file_to_write(&ho)?;
        let fi = self.current_file(&hi)?;
        let (mut a, mut b) = (off_in as i64, off_out as i64);
        let want = len.min(u32::MAX as u64 & !0xfff) as usize;
        let n =
            nix::fcntl::copy_file_range(fi.as_fd(), Some(&mut a), fo.as_fd(), Some(&mut b), want)
                .map_err(nix_err)?;
        Ok(n as u32)
    }

    pub fn fsyncdir(&self, ino: NodeId) -> io::Result<()> {
        let node = self.nodes.get(ino)?;
        if !self.behaviour.fsync || !self.is_upper(node.top_layer()) {
            return Ok(());
        }
        let dir = self.dir_in(&node, 0)?;
        nix::unistd::fsync(dir.fd()?).map_err(nix_err)
    }

    // ----- directories -----

    /// Opens a directory stream. The merged listing is built on the first readdir, not
    /// here: with the kernel's readdir cache most opendirs are never followed by one.
    pub fn opendir(&self, ino: NodeId) -> io::Result<u64> {
        let node = self.nodes.get(ino)?;
        if !node.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let fh = self.new_fh();
        self.dirs.insert(fh, Arc::new(DirStream::new(node)));
        Ok(fh)
    }

    /// The listing of an open directory stream, built once and served by offset.
    pub fn dir_entries(&self, fh: u64) -> io::Result<Arc<Listing>> {
        let stream = self
            .dirs
            .get(&fh)
            .map(|d| d.clone())
            .ok_or_else(|| err(libc::EBADF))?;
        let mut slot = stream.entries.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let entries = Arc::new(self.list_dir(&stream.node)?);
        *slot = Some(entries.clone());
        Ok(entries)
    }

    fn list_dir(&self, node: &Node) -> io::Result<Listing> {
        // Read before listing: a change racing the listing makes it look stale, never fresh.
        let generation = node.generation();
        let layers = node.layers();
        let fds = layers
            .iter()
            .map(|&li| self.dir_in(node, li))
            .collect::<io::Result<Vec<_>>>()?;
        let mut entries = Vec::with_capacity(64);
        let parent_ino = match self.nodes.live_alias(node) {
            Some((p, _)) => p,
            None => node.ino,
        };
        entries.push(DirEntry::dots(".", node.ino));
        entries.push(DirEntry::dots("..", parent_ino));
        entries.extend(self.merge_listing(&layers, &fds)?);
        if let Some(p) = &self.prefetch
            && !node
                .prefetched
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            for e in entries.iter().skip(2).filter(|e| e.kind == libc::S_IFDIR) {
                for li in e.layers() {
                    if let Some(pos) = layers.iter().position(|&l| l == li)
                        && !self.is_upper(li)
                        && let Some(fd) = fds[pos].shared_fd()
                    {
                        p.push(fd, e.name.clone());
                    }
                }
            }
        }
        Ok(Listing::new(generation, entries))
    }

    /// The merged entries of one directory from its fds in `layers` (top first).
    pub(crate) fn merge_listing(
        &self,
        layers: &[usize],
        fds: &[LDir],
    ) -> io::Result<Vec<DirEntry>> {
        let dirs: Vec<readdir::LayerDir> = layers
            .iter()
            .zip(fds)
            .map(|(&li, dir)| readdir::LayerDir {
                idx: li,
                layer: &self.layers[li],
                dir,
            })
            .collect();
        readdir::merge(
            &dirs,
            &self.nodes.inos,
            |d, li| self.marks_of(d, li),
            |li, d, name, d_ino| {
                let real = crate::layer::RealId {
                    dev: self.layers[li].dev,
                    ino: d_ino,
                };
                self.child_opaque_id(d, name, real, li)
            },
        )
    }

    /// Directory streams without a handle (no OPENDIR): the listing of `ino`, made afresh
    /// when a stream starts (offset 0) and shared by the READDIRs that continue it.
    pub fn dir_stream(&self, ino: NodeId, start: bool) -> io::Result<Arc<Listing>> {
        if !start && let Some(e) = self.streams.get(&ino) {
            return Ok(e.clone());
        }
        let node = self.nodes.get(ino)?;
        if !node.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let entries = Arc::new(self.list_dir(&node)?);
        super::dircache::make_room(&self.streams, STREAMS_CAP);
        self.streams.insert(ino, entries.clone());
        Ok(entries)
    }

    /// A stream read to its end: its listing is no longer needed.
    pub fn dir_stream_done(&self, ino: NodeId) {
        self.streams.remove(&ino);
    }

    pub fn releasedir(&self, fh: u64) {
        self.dirs.remove(&fh);
    }

    /// create(2) with O_CREAT: make the file, then open it.
    pub fn create(
        &self,
        ctx: &Ctx,
        parent: NodeId,
        name: &std::ffi::OsStr,
        mode: u32,
        flags: i32,
    ) -> io::Result<(Arc<Node>, super::Attr, u64)> {
        let (node, attr, fd) = self.create_object(
            ctx,
            parent,
            name,
            super::names::NewObject::File {
                perm: mode & 0o7777,
            },
        )?;
        let fd = match fd {
            Some(fd) => fd,
            None => self.open_real(&node, 0, flags & !libc::O_TRUNC)?,
        };
        let fh = self.add_handle(node.clone(), fd, 0, flags);
        Ok((node, attr, fh))
    }
}

impl Union {
    pub fn readlink(&self, ino: NodeId) -> io::Result<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let node = self.nodes.get(ino)?;
        if node.kind != libc::S_IFLNK {
            return Err(err(libc::EINVAL));
        }
        let li = node.top_layer();
        if !self.is_upper(li) {
            let (dir, name) = self.parent_in(&node, li)?;
            return Ok(dir.readlink(&name)?.as_bytes().to_vec());
        }
        match super::retry_stale(|| self.readlink_upper(&node, li)) {
            Err(e) if e.raw_os_error() == Some(libc::ESTALE) => {
                let (fd, _) = self
                    .open_by_handle(&node, li, libc::O_PATH)
                    .map_err(|_| e)?;
                Ok(nix::fcntl::readlinkat(&fd, "")
                    .map_err(nix_err)?
                    .as_bytes()
                    .to_vec())
            }
            r => r,
        }
    }

    fn readlink_upper(&self, node: &Node, li: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::ffi::OsStrExt;
        let (dir, name) = self.parent_in(node, li)?;
        // The upper changes under us: read the link through an O_PATH fd of the very object
        // found to be the node's, never whatever a racing rename or unlink left at the name.
        let fd = nix::fcntl::openat(
            dir.fd()?,
            name.as_os_str(),
            OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )
        .map_err(|e| io_stale(nix_err(e)))?;
        if !self.is_node_object(node, &nix::sys::stat::fstat(&fd).map_err(nix_err)?) {
            return Err(err(libc::ESTALE));
        }
        let t = nix::fcntl::readlinkat(&fd, "").map_err(nix_err)?;
        Ok(t.as_bytes().to_vec())
    }

    /// FUSE passthrough stacking depth: 1 above ordinary filesystems, 2 when a layer itself
    /// sits on a stacking filesystem (overlayfs, FUSE).
    pub fn stack_depth(&self) -> u32 {
        const OVERLAYFS_SUPER_MAGIC: i64 = 0x794c_7630;
        const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
        let stacked = self.layers.iter().any(|l| {
            nix::sys::statfs::fstatfs(l.root()).is_ok_and(|s| {
                let t = s.filesystem_type().0;
                t == OVERLAYFS_SUPER_MAGIC || t == FUSE_SUPER_MAGIC
            })
        });
        if stacked { 2 } else { 1 }
    }

    /// statfs of the upper (of the top layer when read-only).
    pub fn statfs(&self) -> io::Result<nix::sys::statvfs::Statvfs> {
        nix::sys::statvfs::fstatvfs(self.layers[0].root()).map_err(nix_err)
    }
}
