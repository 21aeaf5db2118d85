//! The `fuser::Filesystem` adapter: each handler calls one `Union` method and replies with
//! its value or its errno. No logic lives here beyond converting types.
//!
//! Errors: an `io::Error` carries its errno to the kernel; one without an errno (a bug) is
//! EIO and a log line. Nothing here may panic.

use std::ffi::OsStr;
use std::io;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use nix::sys::time::TimeSpec;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use dashmap::DashMap;
use fuser::BackingId;

use crate::union::names::NewObject;
use crate::union::{Attr, Ctx, Union};

/// Layers are immutable and every change goes through us: the kernel may cache for long.
const TTL: Duration = Duration::from_secs(24 * 3600);

pub struct UnionFs {
    pub union: Union,
    pub max_write: u32,
    /// Asked for (`passthrough=on`, the default); granted at INIT only as root on 6.9+.
    pub want_passthrough: bool,
    /// `passthrough=all`: lower files opened read-only pass through on writable mounts too.
    pub lower_passthrough: bool,
    /// Lower files from this size up pass through with `passthrough=all`.
    lower_min: u64,
    passthrough: AtomicBool,
    /// How each open inode is being served. The kernel requires all opens of an inode to
    /// pass through one backing file, or none of them to: see `IoMode`.
    modes: DashMap<u64, IoMode>,
    /// Each passthrough open keeps its inode's backing alive until it is released.
    fh_backing: DashMap<u64, Arc<BackingId>>,
    /// Opens served by the daemon (page cache), by handle, with their inode.
    fh_cached: DashMap<u64, u64>,
    /// The kernel sends no OPENDIR/RELEASEDIR (FUSE_NO_OPENDIR_SUPPORT granted).
    no_opendir: AtomicBool,
    /// The kernel sends no OPEN/RELEASE for files (FUSE_NO_OPEN_SUPPORT, granted on a mount
    /// without an upper only): reads come with handle 0 and are served through one handle
    /// per inode (`node_fh`), released when the kernel forgets the inode.
    no_open: AtomicBool,
    node_fh: DashMap<u64, u64>,
    /// Set once the session exists: how the daemon tells the kernel to drop cached names.
    pub notifier: Arc<std::sync::OnceLock<fuser::Notifier>>,
}

/// The io mode of one inode. Rules (the kernel refuses anything else):
/// - while opens are served by the daemon (`cached > 0`), new opens are too;
/// - while a backing is registered, new opens pass through it;
/// - otherwise: upper files pass through to the upper file; lower files pass through on a
///   mount without an upper (nothing can ever open them for writing), and on a writable
///   mount only with `passthrough=all` (from `LOWER_PASSTHROUGH_MIN` up); by default the
///   daemon serves them there, since a lower file must never back a writable open and a
///   backing cannot be swapped for the upper copy while readers hold it.
/// - with `passthrough=all`, an open that finds the inode copied up while its lower backing
///   is alive (readers opened it before the copy-up) is answered ESTALE after the inode's
///   names are moved to a new node (`Union::supersede`): the kernel walks the path again,
///   gets the new node, and opens that one on its upper file; the old readers keep reading
///   the lower file.
#[derive(Default)]
struct IoMode {
    backing: Weak<BackingId>,
    /// The live backing is a lower-layer file.
    lower: bool,
    cached: u32,
}

/// With `passthrough=all`, lower files from this size up pass through on a writable mount.
/// Registering a backing costs an open about 40 us more (two ioctls and the kernel's open of
/// the backing file); a smaller file is read cheaper from the daemon, whose page cache is
/// kept across opens (measured with `scripts/bench.sh --only readall,seqread`).
const LOWER_PASSTHROUGH_MIN: u64 = 256 * 1024;

fn lower_passthrough_min() -> u64 {
    // Test hook: pass every lower file through, so the suites check the mode against the
    // kernel on their small files.
    std::env::var("UNIONMOUNT_TEST_LOWER_PASSTHROUGH_MIN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(LOWER_PASSTHROUGH_MIN)
}

/// How an open is served (see `IoMode`).
enum Io {
    Passthrough(Arc<BackingId>),
    Cached,
    /// The inode's names moved to a new node: answer ESTALE so that the kernel looks again.
    Stale,
}

impl UnionFs {
    pub fn new(
        union: Union,
        max_write: u32,
        want_passthrough: bool,
        lower_passthrough: bool,
    ) -> UnionFs {
        UnionFs {
            union,
            max_write,
            want_passthrough,
            lower_passthrough,
            lower_min: lower_passthrough_min(),
            passthrough: AtomicBool::new(false),
            modes: DashMap::new(),
            fh_backing: DashMap::new(),
            fh_cached: DashMap::new(),
            no_opendir: AtomicBool::new(false),
            no_open: AtomicBool::new(false),
            node_fh: DashMap::new(),
            notifier: Arc::new(std::sync::OnceLock::new()),
        }
    }

    /// Decides how open `fh` of `ino` is served: Some(backing) to pass through, None to serve
    /// it from the daemon. `register` makes a backing from the handle's file.
    fn choose_io(
        &self,
        ino: u64,
        fh: u64,
        register: impl FnOnce(&std::fs::File) -> io::Result<BackingId>,
    ) -> Io {
        if !self.passthrough.load(Ordering::Relaxed) {
            return Io::Cached;
        }
        let Ok((file, upper)) = self.union.handle_file(fh) else {
            return Io::Cached;
        };
        let mut mode = self.modes.entry(ino).or_default();
        let live = mode.backing.upgrade();
        if upper && mode.lower && live.is_some() {
            // Copied up while readers pass through to the lower file: this open cannot
            // join them (it must see the upper copy) and cannot have another backing.
            drop(mode);
            self.union.release(fh);
            match self.union.supersede(ino) {
                Ok(names) => {
                    log::debug!("open of inode {ino}: copied up under lower readers, renamed");
                    self.forget_names(names);
                }
                Err(e) => {
                    log::warn!("open of inode {ino}: cannot move its names to a new node: {e}")
                }
            }
            return Io::Stale;
        }
        let backing = if mode.cached > 0 {
            None
        } else if let Some(id) = live {
            Some(id)
        } else if upper
            || !self.union.has_upper
            || (self.lower_passthrough && file.metadata().is_ok_and(|m| m.len() >= self.lower_min))
        {
            match register(&file) {
                Ok(id) => {
                    let id = Arc::new(id);
                    mode.backing = Arc::downgrade(&id);
                    mode.lower = !upper;
                    Some(id)
                }
                Err(e) => {
                    // Not privileged enough after all: serve from the daemon from now on.
                    if self.passthrough.swap(false, Ordering::Relaxed) {
                        log::warn!("passthrough: registering a backing file failed ({e}); off");
                    }
                    None
                }
            }
        } else {
            None
        };
        log::debug!(
            "open of inode {ino} ({} file): {}",
            if upper { "upper" } else { "lower" },
            if backing.is_some() {
                "passthrough"
            } else {
                "served by the daemon"
            }
        );
        // Recorded before the reply: its RELEASE may be handled on another thread at once.
        match backing {
            Some(id) => {
                self.fh_backing.insert(fh, id.clone());
                Io::Passthrough(id)
            }
            None => {
                mode.cached += 1;
                self.fh_cached.insert(fh, ino);
                Io::Cached
            }
        }
    }

    /// Has the kernel drop its cached entries for `names` (its next use of each looks the
    /// name up again), so that no name keeps showing the old node's attributes. From another
    /// thread, waited for at most 200 ms: the kernel takes each parent's lock for it, which
    /// the process whose request we are answering may hold (a CREATE holds it).
    fn forget_names(&self, names: Vec<(u64, std::ffi::OsString)>) {
        let Some(n) = self.notifier.get().cloned() else {
            return;
        };
        let (done, wait) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("inval".into())
            .spawn(move || {
                for (parent, name) in names {
                    if let Err(e) = n.inval_entry(INodeNo(parent), &name) {
                        log::debug!("invalidating entry {name:?} of {parent}: {e}");
                    }
                }
                let _ = done.send(());
            });
        match spawned {
            Ok(_) => {
                let _ = wait.recv_timeout(Duration::from_millis(200));
            }
            Err(e) => log::warn!("cannot start a thread to invalidate entries: {e}"),
        }
    }

    fn release_io(&self, ino: u64, fh: u64) {
        if self.fh_cached.remove(&fh).is_some()
            && let Some(mut m) = self.modes.get_mut(&ino)
        {
            m.cached = m.cached.saturating_sub(1);
        }
        self.fh_backing.remove(&fh);
        self.modes
            .remove_if(&ino, |_, m| m.cached == 0 && m.backing.strong_count() == 0);
    }

    /// The listing a READDIR reads from: its stream's (handle from OPENDIR), or without
    /// OPENDIR the directory's current stream, made at offset 0 and dropped at the end.
    fn listing(
        &self,
        ino: u64,
        fh: u64,
        offset: u64,
    ) -> io::Result<Arc<crate::union::readdir::Listing>> {
        if fh != 0 {
            return self.union.dir_entries(fh);
        }
        let entries = self.union.dir_stream(ino, offset == 0)?;
        if entries.from_offset(offset).is_empty() {
            self.union.dir_stream_done(ino);
        }
        Ok(entries)
    }

    /// The handle a request on file `ino` is served through: its own, or with `no_open`
    /// (handle 0) the inode's, opened read-only on first use.
    fn fh_of(&self, ino: u64, fh: u64) -> io::Result<u64> {
        if fh != 0 || !self.no_open.load(Ordering::Relaxed) {
            return Ok(fh);
        }
        if let Some(h) = self.node_fh.get(&ino) {
            return Ok(*h);
        }
        let new = self.union.open(ino, libc::O_RDONLY)?;
        match self.node_fh.entry(ino) {
            dashmap::Entry::Occupied(e) => {
                // Another request opened it first.
                self.union.release(new);
                Ok(*e.get())
            }
            dashmap::Entry::Vacant(e) => Ok(*e.insert(new)),
        }
    }

    /// Open flags for an open served by the daemon: keep the page cache across opens for
    /// lower files (immutable) and whenever all I/O goes through the daemon.
    fn cached_flags(&self, fh: u64) -> FopenFlags {
        let lower = self.union.handle_is_upper(fh) == Some(false);
        if lower || !self.passthrough.load(Ordering::Relaxed) {
            FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH
        } else {
            FopenFlags::FOPEN_NOFLUSH
        }
    }
}

fn errno(e: io::Error) -> Errno {
    match e.raw_os_error() {
        Some(code) if code > 0 => Errno::from_i32(code),
        _ => {
            log::error!("internal error: {e}");
            Errno::EIO
        }
    }
}

fn ctx(req: &Request) -> Ctx {
    Ctx {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

fn kind(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

fn attr(st: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(st.st_ino),
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: time(st.st_atime, st.st_atime_nsec),
        mtime: time(st.st_mtime, st.st_mtime_nsec),
        ctime: time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: kind(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

fn timespec(t: TimeOrNow) -> TimeSpec {
    match t {
        TimeOrNow::Now => TimeSpec::new(0, libc::UTIME_NOW),
        TimeOrNow::SpecificTime(st) => match st.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::new(d.as_secs() as i64, d.subsec_nanos() as i64),
            Err(e) => {
                let d = e.duration();
                let (mut s, mut ns) = (-(d.as_secs() as i64), -(d.subsec_nanos() as i64));
                if ns < 0 {
                    s -= 1;
                    ns += 1_000_000_000;
                }
                TimeSpec::new(s, ns)
            }
        },
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        for (flag, name) in [
            (InitFlags::FUSE_PARALLEL_DIROPS, "parallel_dirops"),
            (InitFlags::FUSE_CACHE_SYMLINKS, "cache_symlinks"),
            (InitFlags::FUSE_DO_READDIRPLUS, "readdirplus"),
        ] {
            match config.add_capabilities(flag) {
                Ok(()) => log::info!("capability {name}: on"),
                Err(_) => log::info!("capability {name}: not offered by the kernel"),
            }
        }
        if self.want_passthrough && crate::sys::geteuid() == 0 && initial_user_namespace() {
            match config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) => match config.set_max_stack_depth(self.union.stack_depth()) {
                    Ok(_) => {
                        self.passthrough.store(true, Ordering::Relaxed);
                        log::info!("capability passthrough: on");
                    }
                    Err(d) => log::info!("passthrough: stack depth refused (max {d})"),
                },
                Err(_) => log::info!("capability passthrough: not offered by the kernel"),
            }
        } else {
            log::info!(
                "capability passthrough: off (not asked for, or not root in the initial user \
                 namespace)"
            );
        }
        if !self.passthrough.load(Ordering::Relaxed) {
            // Passthrough and the writeback cache exclude each other.
            match config.add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE) {
                Ok(()) => {
                    self.union.writeback = true;
                    log::info!("capability writeback_cache: on");
                }
                Err(_) => log::info!("capability writeback_cache: not offered by the kernel"),
            }
        }
        if self.union.writeback {
            // With the writeback cache an open(O_TRUNC) answered by OPEN is not atomic: the
            // kernel zeroes its cached size once more in the truncate that follows the open,
            // without asking us and after dropping the inode lock in between, so a write
            // another process flushed in that window stays in the upper file while the
            // kernel's size says it is gone. Without atomic_o_trunc that truncate is a real
            // SETATTR, which the kernel orders with the writes.
            log::info!("capability atomic_o_trunc: off (writeback cache)");
        } else {
            match config.add_capabilities(InitFlags::FUSE_ATOMIC_O_TRUNC) {
                Ok(()) => log::info!("capability atomic_o_trunc: on"),
                Err(_) => log::info!("capability atomic_o_trunc: not offered by the kernel"),
            }
        }
        // No OPENDIR/RELEASEDIR round trips; READDIR then comes without a handle (see
        // `listing`). The kernel's readdir cache is not used in this mode: measured, the
        // saved round trips outweigh it (warm walk of 54k entries 0.45 -> 0.30 s).
        if config
            .add_capabilities(InitFlags::FUSE_NO_OPENDIR_SUPPORT)
            .is_ok()
        {
            self.no_opendir.store(true, Ordering::Relaxed);
            log::info!("capability no_opendir: on");
        }
        // A mount without an upper never writes: no OPEN/RELEASE round trips per file open
        // (they bounded reading many small files), the page cache kept across opens (files
        // cannot change), reads served by inode. Passthrough needs OPEN, so it is not used
        // on such a mount then.
        if !self.union.has_upper
            && std::env::var_os("UNIONMOUNT_NO_OPEN").is_none_or(|v| v != "0")
            && config
                .add_capabilities(InitFlags::FUSE_NO_OPEN_SUPPORT)
                .is_ok()
        {
            self.no_open.store(true, Ordering::Relaxed);
            log::info!("capability no_open: on (read-only mount)");
        }
        match config.set_max_write(self.max_write) {
            Ok(_) => log::info!("max_write {}", self.max_write),
            Err(n) => log::info!("max_write limited to {n}"),
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.union.lookup(parent.0, name) {
            Ok((node, st)) => reply.entry(&TTL, &entry_attr(&node, &st), Generation(0)),
            // A negative entry (node id 0) lets the kernel cache the miss: names appear only
            // through this mount, and the kernel replaces its negative dentry when they do.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                reply.entry(&TTL, &negative_attr(), Generation(0))
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.union.nodes.forget(ino.0, nlookup);
        if self.no_open.load(Ordering::Relaxed)
            && self.union.nodes.get(ino.0).is_err()
            && let Some((_, fh)) = self.node_fh.remove(&ino.0)
        {
            self.union.release(fh);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        let _ = fh;
        match self
            .union
            .nodes
            .get(ino.0)
            .and_then(|n| self.union.getattr(&n).map(|st| (n, st)))
        {
            Ok((n, st)) => reply.attr(&TTL, &entry_attr(&n, &st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let r = self.union.setattr(
            ino.0,
            mode,
            uid,
            gid,
            size,
            atime.map(timespec),
            mtime.map(timespec),
            fh.map(|f| f.0),
        );
        match r.and_then(|st| self.union.nodes.get(ino.0).map(|n| (n, st))) {
            Ok((n, st)) => reply.attr(&TTL, &entry_attr(&n, &st)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.union.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let obj = match mode & libc::S_IFMT {
            libc::S_IFREG | 0 => NewObject::File {
                perm: mode & 0o7777,
            },
            k => NewObject::Node {
                kind: k,
                perm: mode & 0o7777,
                rdev: rdev as u64,
            },
        };
        let r = self
            .union
            .create_object(&ctx(req), parent.0, name, obj)
            .map(|(n, a, _)| (n, a));
        self.entry(r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let r = self
            .union
            .create_object(
                &ctx(req),
                parent.0,
                name,
                NewObject::Dir {
                    perm: mode & 0o7777,
                },
            )
            .map(|(n, a, _)| (n, a));
        self.entry(r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.union.remove(parent.0, name, false), reply);
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.union.remove(parent.0, name, true), reply);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let r = self
            .union
            .create_object(
                &ctx(req),
                parent.0,
                link_name,
                NewObject::Symlink {
                    target: target.as_os_str(),
                },
            )
            .map(|(n, a, _)| (n, a));
        self.entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        empty(
            self.union
                .rename(parent.0, name, newparent.0, newname, flags.bits()),
            reply,
        );
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            self.union.link(&ctx(req), ino.0, newparent.0, newname),
            reply,
        );
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.no_open.load(Ordering::Relaxed) {
            // "Never send OPEN again": this open and all later ones succeed in the kernel
            // (which checked the permissions), with the page cache kept.
            return reply.error(Errno::ENOSYS);
        }
        let fh = match self.union.open(ino.0, flags.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(e)),
        };
        match self.choose_io(ino.0, fh, |f| reply.open_backing(f)) {
            Io::Passthrough(id) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::FOPEN_NOFLUSH, &id)
            }
            Io::Cached => reply.opened(FileHandle(fh), self.cached_flags(fh)),
            Io::Stale => reply.error(Errno::ESTALE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // One buffer per request thread, reused: a fresh allocation of up to max_read per
        // request costs an mmap, page faults and an munmap each time.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let fh = match self.fh_of(ino.0, fh.0) {
            Ok(fh) => fh,
            Err(e) => return reply.error(errno(e)),
        };
        BUF.with_borrow_mut(|buf| {
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            match self.union.read_into(fh, offset, &mut buf[..size as usize]) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(errno(e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.union.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Nothing to do at close (no POSIX locks of our own, writes are flushed by the
        // kernel before it would send this): ENOSYS makes the kernel stop sending FLUSH
        // for the whole mount. Opens marked FOPEN_NOFLUSH never send it; opens without a
        // round trip (`no_open`) would, once per close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_io(_ino.0, fh.0);
        self.union.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(self.union.fsync(fh.0, datasync), reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if self.no_opendir.load(Ordering::Relaxed) {
            // The kernel takes ENOSYS here as "never send OPENDIR again" (negotiated at INIT
            // with FUSE_NO_OPENDIR_SUPPORT); directory streams then come with handle 0.
            return reply.error(Errno::ENOSYS);
        }
        match self.union.opendir(ino.0) {
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let entries = match self.listing(ino.0, fh.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for e in entries.from_offset(offset) {
            if reply.add(INodeNo(e.ino), e.cookie, kind(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    /// Entries with their attributes: each one the kernel receives counts as a lookup (except
    /// "." and "..", which it never links), so an entry that does not fit is forgotten again.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        let entries = match self.listing(ino.0, fh.0, offset) {
            Ok(e) => e,
            Err(e) => return reply.error(errno(e)),
        };
        for e in entries.from_offset(offset) {
            let next = e.cookie;
            let dots = e.name == "." || e.name == "..";
            let found = if dots {
                self.union
                    .nodes
                    .get(e.ino)
                    .and_then(|n| self.union.getattr(&n).map(|st| (n, st)))
            } else {
                self.union.lookup_listed(ino.0, &entries, e)
            };
            let Ok((node, st)) = found else {
                // Gone since the listing was made: leave it out.
                continue;
            };
            if reply.add(
                INodeNo(node.id),
                next,
                &e.name,
                &TTL,
                &entry_attr(&node, &st),
                Generation(0),
            ) {
                if !dots {
                    self.union.nodes.forget(node.id, 1);
                }
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.union.releasedir(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        empty(self.union.fsyncdir(ino.0), reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.union.statfs() {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                self.union.namemax,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        empty(
            self.union.setxattr(&ctx(req), ino.0, name, value, flags),
            reply,
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        xattr_reply(self.union.getxattr(ino.0, name), size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.union.listxattr(ino.0), size, reply);
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        empty(self.union.removexattr(&ctx(req), ino.0, name), reply);
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // Only sent without default_permissions; the kernel checks modes itself otherwise.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let (node, st, fh) = match self.union.create(&ctx(req), parent.0, name, mode, flags) {
            Ok(r) => r,
            Err(e) => return reply.error(errno(e)),
        };
        let attr = entry_attr(&node, &st);
        match self.choose_io(node.id, fh, |f| reply.open_backing(f)) {
            Io::Stale => {
                // The kernel counted no lookup of the node it was not sent.
                self.union.nodes.forget(node.id, 1);
                reply.error(Errno::ESTALE)
            }
            Io::Passthrough(id) => reply.created_passthrough(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_NOFLUSH,
                &id,
            ),
            Io::Cached => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                self.cached_flags(fh),
            ),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No ioctls of our own; ENOTTY is the answer for an ioctl a file does not know.
        reply.error(Errno::ENOTTY);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        empty(self.union.fallocate(fh.0, offset, length, mode), reply);
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if self.union.writeback && self.union.has_upper {
            // The kernel sends SEEK_DATA/SEEK_HOLE here without writing its dirty pages
            // back first: the real file would show holes where the page cache holds data
            // (and `cp --sparse` would copy zeros). ENOSYS makes the kernel stop asking, for
            // the whole mount as the cache is, and answer itself: data up to its own size,
            // one hole at the end. Never wrong, only less sparse. (A mount without an upper
            // has no writes to cache: its answers stay exact.)
            return reply.error(Errno::ENOSYS);
        }
        match self
            .fh_of(ino.0, fh.0)
            .and_then(|fh| self.union.lseek(fh, offset, whence))
        {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .union
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl UnionFs {
    fn entry(
        &self,
        r: io::Result<(std::sync::Arc<crate::union::node::Node>, Attr)>,
        reply: ReplyEntry,
    ) {
        match r {
            Ok((node, st)) => reply.entry(&TTL, &entry_attr(&node, &st), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }
}

/// The attr for a reply: fuser sends `attr.ino` both as the entry's node id and as the
/// inode's st_ino, so it must be the FUSE node id.
fn entry_attr(node: &crate::union::node::Node, st: &Attr) -> FileAttr {
    let mut a = attr(st);
    a.ino = INodeNo(node.id);
    a
}

/// Backing files need CAP_SYS_ADMIN in the initial user namespace: true when this process
/// runs in it (its uid map is the identity map of all ids).
fn initial_user_namespace() -> bool {
    std::fs::read_to_string("/proc/self/uid_map").is_ok_and(|m| {
        let f: Vec<&str> = m.split_whitespace().collect();
        f == ["0", "0", "4294967295"]
    })
}

fn negative_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

fn empty(r: io::Result<()>, reply: ReplyEmpty) {
    match r {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(errno(e)),
    }
}

fn xattr_reply(r: io::Result<Vec<u8>>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::ERANGE),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(errno(e)),
    }
}
