//! Differential test (issue 2): kernel overlayfs is the oracle.
//!
//! For each seed of a fixed list: generate 2–4 lower layers (nested dirs, files with random
//! small contents/modes/owners, a sparse file, symlinks, FIFOs, hard links, user xattrs,
//! whiteouts and opaque dirs), render them twice — in kernel dialect for the kernel mount,
//! and in a per-entry MIX of every dialect DESIGN 2.2 lists for unionmount — mount both with
//! empty uppers, apply the same 50–80 random operations to both (each op's result, success
//! or errno, must agree), then compare the merged trees and the dialect-normalised uppers
//! (`common/tree.rs`). Finally the cross-compatibility check: the upper unionmount wrote is
//! mounted by kernel overlayfs (kernel-dialect lowers) and the upper the kernel wrote is
//! mounted by unionmount (mixed lowers); each must show the tree seen before.
//!
//! Generator invariants, each one a kernel behaviour we must not trip over:
//! - whiteouts only inside a directory that merges with the same directory in the layer
//!   right below (the kernel lists whiteouts in readdir of a single-layer directory);
//! - xattr whiteouts only in unionmount's copy, only in lower layers and only in non-opaque
//!   dirs, whose parent gets `overlay.opaque=x` (the kernel reads them only there, and even
//!   then its rmdir sees them as entries: ENOTEMPTY; so the kernel copy uses char devices);
//! - never a whiteout and a real entry of the same name in one layer (OCI rule);
//! - symlink targets are downward-relative or under `/nonexistent-difftest`, so an op that
//!   follows a link can never leave the mount, wherever renames move the link.
//!
//! Env: `UNIONMOUNT_DIFF_SEQUENCES` (default 300), `UNIONMOUNT_DIFF_SEEDS=1,2,3` (run only
//! these), `UNIONMOUNT_DIFF_SELFTEST=1` (both sides kernel overlayfs: proves the harness),
//! `UNIONMOUNT_DIFF_KEEP=1` (keep the directories of failing seeds),
//! `UNIONMOUNT_DIFF_VERBOSE=1` (print every op log), `UNIONMOUNT_DIFF_LAYER_HARDLINKS=1`
//! (also generate hard links inside lower layers; see `no_layer_hardlinks`), `UNIONMOUNT_BIN`, `UNIONMOUNT_REQUIRE_MOUNT=1` (a skip is a failure), `UNIONMOUNT_DIFF_TMP` (default /tmp).

mod common;
#[path = "common/tree.rs"]
mod tree;

use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{Driver, MountGuard, mount_paths, unionmount_bin, work_leftovers};
use tree::{Snapshot, View};

const SHARDS: usize = 6;
const DEFAULT_SEQUENCES: usize = 300;
/// Every time the generator or an op sets lies in this window; mtimes are compared only
/// when one side falls inside it (see tree.rs).
const TIME_LO: i64 = 1_000_000_000;
const TIME_HI: i64 = 1_100_000_000;
const OP_TIMEOUT: Duration = Duration::from_secs(20);
const WALK_TIMEOUT: Duration = Duration::from_secs(60);
const NAMES: &[&str] = &["a", "b", "c", "d", "e"];
const UIDS: &[u32] = &[0, 1000, 1001];
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;
const RENAME_WHITEOUT: u32 = 4;

// ---------------------------------------------------------------- PRNG

use common::SplitMix as Rng;

impl Rng {
    fn weighted<T: Copy>(&mut self, xs: &[(u64, T)]) -> T {
        let total: u64 = xs.iter().map(|x| x.0).sum();
        let mut r = self.below(total);
        for (w, v) in xs {
            if r < *w {
                return *v;
            }
            r -= w;
        }
        unreachable!()
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| b'a' + self.below(26) as u8).collect()
    }
    fn time(&mut self) -> (i64, i64) {
        (
            TIME_LO + self.below((TIME_HI - TIME_LO) as u64) as i64,
            self.below(1_000_000_000) as i64,
        )
    }
}

// ---------------------------------------------------------------- layer spec

#[derive(Clone, Debug)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    xattrs: Vec<(String, Vec<u8>)>,
    mtime: (i64, i64),
}

#[derive(Clone, Debug)]
enum Node {
    Dir {
        meta: Meta,
        opaque: bool,
    },
    /// `hole` bytes of hole, then `data`.
    File {
        meta: Meta,
        data: Vec<u8>,
        hole: u64,
    },
    Symlink {
        target: String,
        uid: u32,
        gid: u32,
        mtime: (i64, i64),
    },
    Fifo {
        meta: Meta,
    },
    HardLink {
        target: String,
    },
    Whiteout,
}

#[derive(Default)]
struct LayerSpec {
    /// Parents before children.
    entries: Vec<(String, Node)>,
    dirs: BTreeSet<String>,
    files: Vec<String>,
}

/// Layers, index 0 = top (overlayfs order), and what the upper holds before the first op.
struct Spec {
    layers: Vec<LayerSpec>,
    upper: Option<LayerSpec>,
}

fn join(parent: &str, name: &str) -> String {
    if parent.is_empty() {
        name.to_string()
    } else {
        format!("{parent}/{name}")
    }
}

fn gen_meta(rng: &mut Rng, modes: &[u32], xattrs: bool) -> Meta {
    let mut x = Vec::new();
    if xattrs && rng.chance(30) {
        for i in 0..=rng.below(2) {
            let n = 1 + rng.below(8) as usize;
            x.push((format!("user.k{i}"), rng.bytes(n)));
        }
    }
    Meta {
        mode: rng.pick(modes),
        uid: rng.pick(UIDS),
        gid: rng.pick(UIDS),
        xattrs: x,
        mtime: rng.time(),
    }
}

/// A symlink target that stays inside the mount wherever the link is moved.
fn gen_target(rng: &mut Rng) -> String {
    match rng.below(10) {
        0..=3 => rng.pick(NAMES).to_string(),
        4..=6 => format!("{}/{}", rng.pick(NAMES), rng.pick(NAMES)),
        7 | 8 => "dangling".to_string(),
        _ => "/nonexistent-difftest/x".to_string(),
    }
}

#[derive(Clone, Copy)]
enum Pick {
    Dir,
    File,
    Symlink,
    Fifo,
    HardLink,
    Whiteout,
}

fn gen_dir(
    rng: &mut Rng,
    layer: &mut LayerSpec,
    below: Option<&LayerSpec>,
    rel: &str,
    depth: u32,
    merged_below: bool,
) {
    let p_include = [65, 50, 40, 30][depth as usize];
    for name in NAMES {
        if !rng.chance(p_include) {
            continue;
        }
        let path = join(rel, name);
        let mut choices = vec![(30, Pick::File), (10, Pick::Symlink), (4, Pick::Fifo)];
        if depth < 3 {
            choices.push((30, Pick::Dir));
        }
        if !layer.files.is_empty() && !no_layer_hardlinks() {
            choices.push((6, Pick::HardLink));
        }
        if merged_below {
            choices.push((18, Pick::Whiteout));
        }
        match rng.weighted(&choices) {
            Pick::Dir => {
                let opaque = below.is_some() && rng.chance(15);
                let meta = gen_meta(rng, &[0o755, 0o700, 0o775, 0o1777, 0o2775, 0o555], true);
                layer
                    .entries
                    .push((path.clone(), Node::Dir { meta, opaque }));
                layer.dirs.insert(path.clone());
                let child_merged =
                    merged_below && !opaque && below.is_some_and(|b| b.dirs.contains(&path));
                gen_dir(rng, layer, below, &path, depth + 1, child_merged);
            }
            Pick::File => {
                let meta = gen_meta(
                    rng,
                    &[0o644, 0o600, 0o755, 0o444, 0o4755, 0o2755, 0o640, 0o6755],
                    true,
                );
                let (data, hole) = match rng.below(100) {
                    0..=3 => (rng.bytes(8), 200_000),
                    4..=7 => (rng.bytes(5000), 0),
                    8..=12 => (Vec::new(), 0),
                    _ => {
                        let n = 1 + rng.below(40) as usize;
                        (rng.bytes(n), 0)
                    }
                };
                layer
                    .entries
                    .push((path.clone(), Node::File { meta, data, hole }));
                layer.files.push(path);
            }
            Pick::Symlink => {
                let node = Node::Symlink {
                    target: gen_target(rng),
                    uid: rng.pick(UIDS),
                    gid: rng.pick(UIDS),
                    mtime: rng.time(),
                };
                layer.entries.push((path, node));
            }
            Pick::Fifo => {
                let meta = gen_meta(rng, &[0o644, 0o600, 0o666], false);
                layer.entries.push((path, Node::Fifo { meta }));
            }
            Pick::HardLink => {
                let target = layer.files[rng.below(layer.files.len() as u64) as usize].clone();
                layer.entries.push((path, Node::HardLink { target }));
            }
            Pick::Whiteout => layer.entries.push((path, Node::Whiteout)),
        }
    }
}

/// Hard links inside a lower layer are left out unless `UNIONMOUNT_DIFF_LAYER_HARDLINKS=1`:
/// there unionmount differs from the kernel's default on purpose (the names of one lower
/// inode stay linked across copy-up, as with the kernel's `index=on`; README "Where it
/// differs", pinned by tests/hardlinks.rs). Hard links made through the mount are generated
/// and compared as usual.
fn no_layer_hardlinks() -> bool {
    std::env::var("UNIONMOUNT_DIFF_LAYER_HARDLINKS").as_deref() != Ok("1")
}

fn gen_spec(seed: u64) -> Spec {
    let mut rng = Rng::new(seed);
    let n = 2 + rng.below(3) as usize;
    let mut bottom_up: Vec<LayerSpec> = Vec::new();
    for _ in 0..n {
        let mut layer = LayerSpec::default();
        let below = bottom_up.last();
        gen_dir(&mut rng, &mut layer, below, "", 0, below.is_some());
        bottom_up.push(layer);
    }
    let upper = if rng.chance(35) {
        let mut layer = LayerSpec::default();
        gen_dir(&mut rng, &mut layer, bottom_up.last(), "", 0, true);
        Some(layer)
    } else {
        None
    };
    bottom_up.reverse();
    Spec {
        layers: bottom_up,
        upper,
    }
}

// ---------------------------------------------------------------- rendering

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Dialect {
    /// What kernel overlayfs reads reliably: char 0/0 whiteouts, trusted.overlay.opaque=y.
    Kernel,
    /// Every dialect of DESIGN 2.2, chosen per entry.
    Mixed,
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("no NUL in path")
}

fn check(r: libc::c_int, what: &str, p: &Path) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        Err(io::Error::new(
            e.kind(),
            format!("{what} {}: {e}", p.display()),
        ))
    } else {
        Ok(())
    }
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: valid C strings and a buffer of value.len() bytes.
    let r = unsafe {
        libc::lsetxattr(
            cstr(p).as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    check(r, &format!("lsetxattr {name}"), p)
}

fn set_owner_mode(p: &Path, uid: u32, gid: u32, mode: Option<u32>) -> io::Result<()> {
    let c = cstr(p);
    // SAFETY: valid C string.
    check(unsafe { libc::lchown(c.as_ptr(), uid, gid) }, "lchown", p)?;
    if let Some(mode) = mode {
        // chown first, then chmod, so setuid/setgid survive.
        // SAFETY: valid C string.
        check(unsafe { libc::chmod(c.as_ptr(), mode) }, "chmod", p)?;
    }
    Ok(())
}

fn set_mtime(p: &Path, t: (i64, i64)) -> io::Result<()> {
    let ts = [
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1,
        },
        libc::timespec {
            tv_sec: t.0,
            tv_nsec: t.1,
        },
    ];
    // SAFETY: valid C string and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            cstr(p).as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    check(r, "utimensat", p)
}

fn apply_meta(p: &Path, m: &Meta) -> io::Result<()> {
    set_owner_mode(p, m.uid, m.gid, Some(m.mode))?;
    for (k, v) in &m.xattrs {
        set_xattr(p, k, v)?;
    }
    Ok(())
}

/// Renders one layer; `upper` limits whiteouts to what an upper may hold (the kernel does
/// not read xattr whiteouts there). Returns whether kernel overlayfs can read every marker.
fn render_layer(
    spec: &LayerSpec,
    root: &Path,
    dialect: Dialect,
    upper: bool,
    rng: &mut Rng,
) -> io::Result<bool> {
    std::fs::create_dir_all(root)?;
    let mut kernel_readable = true;
    for (rel, node) in &spec.entries {
        let p = root.join(rel);
        match node {
            Node::Dir { meta, opaque } => {
                std::fs::create_dir(&p)?;
                apply_meta(&p, meta)?;
                if *opaque {
                    match (dialect, rng.below(4)) {
                        (Dialect::Kernel, _) | (Dialect::Mixed, 0) => {
                            set_xattr(&p, "trusted.overlay.opaque", b"y")?
                        }
                        (_, 1) => set_xattr(&p, "user.overlay.opaque", b"y")?,
                        (_, 2) => set_xattr(&p, "user.fuseoverlayfs.opaque", b"y")?,
                        _ => drop(std::fs::File::create(p.join(".wh..wh..opq"))?),
                    }
                    kernel_readable &= dialect == Dialect::Kernel;
                }
            }
            Node::File { meta, data, hole } => {
                use std::io::{Seek, SeekFrom, Write};
                let mut f = std::fs::File::create(&p)?;
                if *hole > 0 {
                    f.seek(SeekFrom::Start(*hole))?;
                }
                f.write_all(data)?;
                drop(f);
                apply_meta(&p, meta)?;
            }
            Node::Symlink {
                target, uid, gid, ..
            } => {
                std::os::unix::fs::symlink(target, &p)?;
                set_owner_mode(&p, *uid, *gid, None)?;
            }
            Node::Fifo { meta } => {
                // SAFETY: valid C string.
                check(
                    unsafe { libc::mkfifo(cstr(&p).as_ptr(), 0o600) },
                    "mkfifo",
                    &p,
                )?;
                apply_meta(&p, meta)?;
            }
            Node::HardLink { target } => std::fs::hard_link(root.join(target), &p)?,
            Node::Whiteout => {
                let parent = p.parent().unwrap().to_path_buf();
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                let style = match (dialect, upper) {
                    // Char devices only: kernel 6.18 reads xattr whiteouts in lookup and
                    // readdir but not in rmdir's emptiness check (rmdir of a merged dir
                    // whose lower holds only an xattr whiteout gives ENOTEMPTY), so the
                    // oracle would disagree with itself.
                    (Dialect::Kernel, _) => 0,
                    (Dialect::Mixed, true) => rng.below(2),
                    (Dialect::Mixed, false) => rng.below(4),
                };
                kernel_readable &= matches!(style, 0 | 2);
                match style {
                    0 => {
                        // SAFETY: valid C string.
                        let r = unsafe { libc::mknod(cstr(&p).as_ptr(), libc::S_IFCHR, 0) };
                        check(r, "mknod", &p)?;
                    }
                    1 => drop(std::fs::File::create(parent.join(format!(".wh.{name}")))?),
                    _ => {
                        let ns = if style == 2 { "trusted" } else { "user" };
                        drop(std::fs::File::create(&p)?);
                        set_xattr(&p, &format!("{ns}.overlay.whiteout"), b"y")?;
                        set_xattr(&parent, &format!("{ns}.overlay.opaque"), b"x")?;
                    }
                }
            }
        }
    }
    // Times last, children before parents: creating an entry changes its parent's mtime.
    for (rel, node) in spec.entries.iter().rev() {
        let t = match node {
            Node::Dir { meta, .. } | Node::File { meta, .. } | Node::Fifo { meta } => meta.mtime,
            Node::Symlink { mtime, .. } => *mtime,
            Node::HardLink { .. } | Node::Whiteout => continue,
        };
        set_mtime(&root.join(rel), t)?;
    }
    set_mtime(root, (TIME_LO + 7, 7))?;
    Ok(kernel_readable)
}

// ---------------------------------------------------------------- timeouts and mounts

fn with_timeout<T: Send + 'static>(
    what: &str,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(v) => Ok(v),
        Err(mpsc::RecvTimeoutError::Timeout) => {
            Err(format!("{what}: timed out after {limit:?} (wedged mount?)"))
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => Err(format!("{what}: panicked")),
    }
}

fn driver_name(d: Driver) -> &'static str {
    match d {
        Driver::Kernel => "kernel",
        Driver::Unionmount => "unionmount",
    }
}

/// Kernel options pinned whatever the kernel's build defaults: no redirects (renaming a
/// lower dir gives EXDEV), no index (copy-up breaks hard links), no metacopy. unionmount
/// gets no options: its defaults are the kernel's defaults (DESIGN 2.6).
const KERNEL_OPTS: &[&str] = &["redirect_dir=off", "index=off", "metacopy=off"];

/// The kernel reading an upper with metacopy files (metacopy=on implies redirect_dir=on;
/// these mounts only read).
const KERNEL_METACOPY_OPTS: &[&str] = &["index=off", "metacopy=on"];

fn do_mount(
    driver: Driver,
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    mnt: &Path,
) -> Result<MountGuard, String> {
    let extra = if driver == Driver::Kernel {
        KERNEL_OPTS
    } else {
        &[]
    };
    do_mount_with(driver, extra, lowers, upper, work, mnt)
}

fn do_mount_with(
    driver: Driver,
    extra: &'static [&'static str],
    lowers: &[PathBuf],
    upper: &Path,
    work: &Path,
    mnt: &Path,
) -> Result<MountGuard, String> {
    std::fs::create_dir_all(work).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
    let (l, u, w, m) = (
        lowers.to_vec(),
        upper.to_path_buf(),
        work.to_path_buf(),
        mnt.to_path_buf(),
    );
    with_timeout("mount", Duration::from_secs(30), move || {
        mount_paths(&driver, &l, Some(&u), Some(&w), &m, extra)
    })?
    .map_err(|e| e.to_string())
}

/// Unmounts now. A plain umount can fail with EBUSY for a moment while another test
/// thread forks (the child holds copies of our O_CLOEXEC directory fds until it execs), so
/// retry briefly before the guard's lazy-detach fallback.
fn unmount(guard: MountGuard) -> Result<(), String> {
    let c = cstr(&guard.mnt);
    for _ in 0..100 {
        // SAFETY: valid C string.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            break;
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::EBUSY) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Waits for the daemon to exit (and detaches lazily if the mount is somehow still there).
    let mnt = guard.mnt.clone();
    with_timeout("unmount", Duration::from_secs(30), move || guard.unmount())?
        .map_err(|x| format!("unmount {}: {x}", mnt.display()))
}

// ---------------------------------------------------------------- operations

/// Bytes shown by length and hash in logs.
#[derive(Clone)]
struct Bytes(Vec<u8>);

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}B#{:08x}", self.0.len(), tree::fnv64(&self.0) as u32)
    }
}

#[derive(Clone, Debug)]
enum Op {
    Create {
        path: String,
        data: Bytes,
        mode: u32,
        excl: bool,
    },
    Append {
        path: String,
        data: Bytes,
    },
    Overwrite {
        path: String,
        data: Bytes,
    },
    Truncate {
        path: String,
        len: u64,
    },
    Chmod {
        path: String,
        mode: u32,
    },
    Chown {
        path: String,
        uid: u32,
        gid: u32,
    },
    Utimens {
        path: String,
        time: (i64, i64),
    },
    SetXattr {
        path: String,
        name: String,
        value: Bytes,
        flags: i32,
    },
    RemoveXattr {
        path: String,
        name: String,
    },
    Mkdir {
        path: String,
        mode: u32,
    },
    Rmdir {
        path: String,
    },
    Unlink {
        path: String,
    },
    Rename {
        from: String,
        to: String,
        flags: u32,
    },
    Symlink {
        target: String,
        path: String,
    },
    Link {
        from: String,
        to: String,
    },
    Mkfifo {
        path: String,
        mode: u32,
    },
    Read {
        path: String,
    },
    Stat {
        path: String,
    },
    Readdir {
        path: String,
    },
}

type OpResult = Result<String, String>;

fn errno_name(e: i32) -> String {
    let n = match e {
        libc::ENOENT => "ENOENT",
        libc::EEXIST => "EEXIST",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::EXDEV => "EXDEV",
        libc::EINVAL => "EINVAL",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ENODATA => "ENODATA",
        libc::ELOOP => "ELOOP",
        libc::EBUSY => "EBUSY",
        libc::ENXIO => "ENXIO",
        libc::EROFS => "EROFS",
        libc::EIO => "EIO",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EMLINK => "EMLINK",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ETXTBSY => "ETXTBSY",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

fn last_err() -> String {
    errno_name(io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

fn io_err(e: io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_name(n),
        None => e.to_string(),
    }
}

fn res(r: libc::c_int) -> OpResult {
    if r < 0 {
        Err(last_err())
    } else {
        Ok(String::new())
    }
}

fn write_path(p: &CString, flags: i32, mode: u32, data: &[u8]) -> OpResult {
    // SAFETY: valid C string; the fd is closed below.
    let fd = unsafe { libc::open(p.as_ptr(), flags | libc::O_NONBLOCK | libc::O_CLOEXEC, mode) };
    if fd < 0 {
        return Err(last_err());
    }
    let mut off = 0;
    let mut out = Ok(format!("wrote {}", data.len()));
    while off < data.len() {
        // SAFETY: fd is open; the buffer is valid for the given length.
        let n = unsafe { libc::write(fd, data[off..].as_ptr().cast(), data.len() - off) };
        if n <= 0 {
            out = Err(format!("write: {}", last_err()));
            break;
        }
        off += n as usize;
    }
    // SAFETY: fd is ours.
    if unsafe { libc::close(fd) } != 0 && out.is_ok() {
        out = Err(format!("close: {}", last_err()));
    }
    out
}

fn describe_md(md: &std::fs::Metadata) -> String {
    let ft = md.file_type();
    let t = if ft.is_dir() {
        "dir"
    } else if ft.is_file() {
        "file"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_fifo() {
        "fifo"
    } else if ft.is_char_device() {
        "chr"
    } else {
        "other"
    };
    let mut s = format!("{t} {:04o} {}:{}", md.mode() & 0o7777, md.uid(), md.gid());
    if !ft.is_dir() {
        s += &format!(" size={} nlink={}", md.size(), md.nlink());
    }
    s
}

fn apply(root: &Path, op: &Op) -> OpResult {
    let c = |rel: &str| cstr(&root.join(rel));
    // SAFETY (all blocks below): C strings built by `c`, buffers valid for their lengths.
    unsafe {
        match op {
            Op::Create {
                path,
                data,
                mode,
                excl,
            } => {
                let ex = if *excl { libc::O_EXCL } else { 0 };
                write_path(
                    &c(path),
                    libc::O_CREAT | libc::O_WRONLY | ex,
                    *mode,
                    &data.0,
                )
            }
            Op::Append { path, data } => {
                write_path(&c(path), libc::O_WRONLY | libc::O_APPEND, 0, &data.0)
            }
            Op::Overwrite { path, data } => {
                write_path(&c(path), libc::O_WRONLY | libc::O_TRUNC, 0, &data.0)
            }
            Op::Truncate { path, len } => res(libc::truncate(c(path).as_ptr(), *len as i64)),
            Op::Chmod { path, mode } => res(libc::chmod(c(path).as_ptr(), *mode)),
            Op::Chown { path, uid, gid } => res(libc::lchown(c(path).as_ptr(), *uid, *gid)),
            Op::Utimens { path, time } => {
                let ts = [
                    libc::timespec {
                        tv_sec: time.0,
                        tv_nsec: time.1,
                    },
                    libc::timespec {
                        tv_sec: time.0,
                        tv_nsec: time.1,
                    },
                ];
                res(libc::utimensat(
                    libc::AT_FDCWD,
                    c(path).as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ))
            }
            Op::SetXattr {
                path,
                name,
                value,
                flags,
            } => {
                let n = CString::new(name.as_str()).unwrap();
                res(libc::lsetxattr(
                    c(path).as_ptr(),
                    n.as_ptr(),
                    value.0.as_ptr().cast(),
                    value.0.len(),
                    *flags,
                ))
            }
            Op::RemoveXattr { path, name } => {
                let n = CString::new(name.as_str()).unwrap();
                res(libc::lremovexattr(c(path).as_ptr(), n.as_ptr()))
            }
            Op::Mkdir { path, mode } => res(libc::mkdir(c(path).as_ptr(), *mode)),
            Op::Rmdir { path } => res(libc::rmdir(c(path).as_ptr())),
            Op::Unlink { path } => res(libc::unlink(c(path).as_ptr())),
            Op::Rename { from, to, flags } => {
                let r = libc::syscall(
                    libc::SYS_renameat2,
                    libc::AT_FDCWD,
                    c(from).as_ptr(),
                    libc::AT_FDCWD,
                    c(to).as_ptr(),
                    *flags,
                );
                res(r as libc::c_int)
            }
            Op::Symlink { target, path } => {
                let t = CString::new(target.as_str()).unwrap();
                res(libc::symlink(t.as_ptr(), c(path).as_ptr()))
            }
            Op::Link { from, to } => res(libc::link(c(from).as_ptr(), c(to).as_ptr())),
            Op::Mkfifo { path, mode } => res(libc::mkfifo(c(path).as_ptr(), *mode)),
            Op::Read { path } => {
                let fd = libc::open(
                    c(path).as_ptr(),
                    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
                );
                if fd < 0 {
                    return Err(last_err());
                }
                let mut data = Vec::new();
                let mut buf = vec![0u8; 65536];
                let out = loop {
                    let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
                    if n < 0 {
                        break Err(format!("read: {}", last_err()));
                    }
                    if n == 0 {
                        break Ok(format!("{}B#{:016x}", data.len(), tree::fnv64(&data)));
                    }
                    data.extend_from_slice(&buf[..n as usize]);
                };
                libc::close(fd);
                out
            }
            Op::Stat { path } => std::fs::symlink_metadata(root.join(path))
                .map(|md| describe_md(&md))
                .map_err(io_err),
            Op::Readdir { path } => {
                let mut names = Vec::new();
                for de in std::fs::read_dir(root.join(path)).map_err(io_err)? {
                    names.push(
                        de.map_err(io_err)?
                            .file_name()
                            .to_string_lossy()
                            .into_owned(),
                    );
                }
                names.sort();
                Ok(names.join(","))
            }
        }
    }
}

/// Names the op generator draws from: what the merged view (of the kernel mount, the
/// oracle) holds right now, everything any layer mentions (often hidden), and fresh names.
struct Pool {
    paths: Vec<String>,
    set: BTreeSet<String>,
    /// Paths visible in the kernel's merged view before this op, and the dirs among them.
    existing: Vec<String>,
    existing_dirs: Vec<String>,
    fresh: u32,
}

/// Every path under `root` (not following symlinks), with whether it is a directory.
fn list_tree(root: &Path) -> io::Result<Vec<(String, bool)>> {
    let mut out = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let mut names = Vec::new();
        for de in std::fs::read_dir(root.join(&rel))? {
            let de = de?;
            names.push((
                de.file_name().to_string_lossy().into_owned(),
                de.file_type()?.is_dir(),
            ));
        }
        names.sort();
        for (n, is_dir) in names {
            let p = join(&rel, &n);
            if is_dir {
                stack.push(p.clone());
            }
            out.push((p, is_dir));
        }
    }
    out.sort();
    Ok(out)
}

impl Pool {
    fn new(spec: &Spec) -> Pool {
        let mut p = Pool {
            paths: Vec::new(),
            set: BTreeSet::new(),
            existing: Vec::new(),
            existing_dirs: Vec::new(),
            fresh: 0,
        };
        for l in spec.layers.iter().chain(spec.upper.iter()) {
            for (rel, _) in &l.entries {
                p.add(rel.clone());
            }
        }
        p.add("n0".into());
        p
    }
    fn add(&mut self, s: String) {
        if self.set.insert(s.clone()) {
            self.paths.push(s);
        }
    }
    fn refresh(&mut self, view: Vec<(String, bool)>) {
        self.existing_dirs = view.iter().filter(|x| x.1).map(|x| x.0.clone()).collect();
        self.existing = view.into_iter().map(|x| x.0).collect();
    }
    fn pick(&mut self, rng: &mut Rng) -> String {
        let r = rng.below(100);
        if r < 60 && !self.existing.is_empty() {
            self.existing[rng.below(self.existing.len() as u64) as usize].clone()
        } else if r < 80 {
            let parent = if self.existing_dirs.is_empty() || rng.chance(25) {
                String::new()
            } else {
                self.existing_dirs[rng.below(self.existing_dirs.len() as u64) as usize].clone()
            };
            let name = format!("n{}", self.fresh % 5);
            self.fresh += 1;
            let p = join(&parent, &name);
            self.add(p.clone());
            p
        } else {
            self.paths[rng.below(self.paths.len() as u64) as usize].clone()
        }
    }
}

/// Mostly `user.k0..3`; sometimes `trusted.overlay.t0`, which an overlay stores escaped
/// (`trusted.overlay.overlay.t0`) so nested overlays work (DESIGN 2.7).
fn xattr_name(rng: &mut Rng) -> String {
    if rng.chance(8) {
        "trusted.overlay.t0".to_string()
    } else {
        format!("user.k{}", rng.below(4))
    }
}

fn gen_op(rng: &mut Rng, pool: &mut Pool) -> Op {
    let data = |rng: &mut Rng| {
        let n = if rng.chance(3) {
            70_000
        } else {
            1 + rng.below(30) as usize
        };
        Bytes(rng.bytes(n))
    };
    let file_modes = [
        0o644, 0o600, 0o755, 0o4755, 0o2755, 0o6711, 0o1644, 0o000, 0o777,
    ];
    let dir_modes = [0o755, 0o700, 0o1777, 0o2775, 0o555];
    match rng.below(131) {
        0..=11 => Op::Create {
            path: pool.pick(rng),
            data: data(rng),
            mode: rng.pick(&[0o644, 0o600, 0o755, 0o666]),
            excl: rng.chance(25),
        },
        12..=17 => Op::Append {
            path: pool.pick(rng),
            data: data(rng),
        },
        18..=23 => Op::Overwrite {
            path: pool.pick(rng),
            data: data(rng),
        },
        24..=28 => Op::Truncate {
            path: pool.pick(rng),
            len: rng.pick(&[0, 1, 10, 100, 70_000]),
        },
        29..=34 => Op::Chmod {
            path: pool.pick(rng),
            mode: if rng.chance(50) {
                rng.pick(&file_modes)
            } else {
                rng.pick(&dir_modes)
            },
        },
        35..=39 => Op::Chown {
            path: pool.pick(rng),
            uid: rng.pick(UIDS),
            gid: rng.pick(UIDS),
        },
        40..=44 => Op::Utimens {
            path: pool.pick(rng),
            time: rng.time(),
        },
        45..=50 => Op::SetXattr {
            path: pool.pick(rng),
            name: xattr_name(rng),
            value: {
                let n = 1 + rng.below(10) as usize;
                Bytes(rng.bytes(n))
            },
            flags: rng.pick(&[0, 0, libc::XATTR_CREATE, libc::XATTR_REPLACE]),
        },
        51..=54 => Op::RemoveXattr {
            path: pool.pick(rng),
            name: xattr_name(rng),
        },
        55..=62 => Op::Mkdir {
            path: pool.pick(rng),
            mode: rng.pick(&dir_modes),
        },
        63..=68 => Op::Rmdir {
            path: pool.pick(rng),
        },
        69..=76 => Op::Unlink {
            path: pool.pick(rng),
        },
        77..=88 => Op::Rename {
            from: pool.pick(rng),
            to: pool.pick(rng),
            flags: rng.weighted(&[
                (70, 0),
                (12, RENAME_NOREPLACE),
                (15, RENAME_EXCHANGE),
                (3, RENAME_WHITEOUT),
            ]),
        },
        89..=92 => Op::Symlink {
            target: gen_target(rng),
            path: pool.pick(rng),
        },
        93..=97 => Op::Link {
            from: pool.pick(rng),
            to: pool.pick(rng),
        },
        98..=100 => Op::Mkfifo {
            path: pool.pick(rng),
            mode: rng.pick(&[0o644, 0o600]),
        },
        101..=112 => Op::Read {
            path: pool.pick(rng),
        },
        113..=121 => Op::Stat {
            path: pool.pick(rng),
        },
        _ => Op::Readdir {
            path: if rng.chance(30) {
                String::new()
            } else {
                pool.pick(rng)
            },
        },
    }
}

// ---------------------------------------------------------------- one sequence

struct Config {
    union_driver: Driver,
    tmp: PathBuf,
    keep: bool,
}

struct Failure {
    seed: u64,
    what: String,
    log: Vec<String>,
    diffs: Vec<String>,
}

#[derive(Default)]
struct Stats {
    ops: usize,
    noop_opaque: usize,
    cross_skipped: usize,
    seeded_uppers: usize,
    ignored_xattrs: BTreeSet<String>,
}

fn snap(root: &Path, view: View) -> Result<Snapshot, String> {
    let r = root.to_path_buf();
    let what = format!("snapshot {}", root.display());
    with_timeout(&what, WALK_TIMEOUT, move || tree::snapshot(&r, view))?
        .map_err(|e| format!("{what}: {e}"))
}

fn run_seed(seed: u64, cfg: &Config, stats: &mut Stats) -> Result<(), Failure> {
    let base = cfg
        .tmp
        .join(format!("um-diff-{}-{seed}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut log = Vec::new();
    let out = run_seed_in(seed, cfg, &base, &mut log, stats);
    if std::env::var("UNIONMOUNT_DIFF_VERBOSE").as_deref() == Ok("1") {
        eprintln!("==== seed {seed} op log");
        for l in &log {
            eprintln!("    {l}");
        }
    }
    let fail = match out {
        Ok(diffs) if diffs.is_empty() => None,
        Ok(diffs) => Some(Failure {
            seed,
            what: "tree mismatch".into(),
            log,
            diffs,
        }),
        Err((what, diffs)) => Some(Failure {
            seed,
            what,
            log,
            diffs,
        }),
    };
    if fail.is_none() || !cfg.keep {
        let _ = std::fs::remove_dir_all(&base);
    }
    fail.map_or(Ok(()), Err)
}

type SeqErr = (String, Vec<String>);

/// Whether the lowers (kernel dialect, top first) show a directory at `path`: the first
/// layer with an entry there decides (a whiteout or a non-directory ends the search).
fn dir_below(lowers: &[PathBuf], path: &str) -> bool {
    for l in lowers {
        if let Ok(md) = std::fs::symlink_metadata(l.join(path)) {
            return md.is_dir();
        }
    }
    false
}

/// An opaque marker on an upper dir with no directory below it changes nothing (there is
/// nothing below to hide), for either driver. The kernel marks a pure-upper dir opaque when
/// it moves into a merged parent (unionmount does the same), but it sets the marker before
/// the rename in the upper, so a rename that then fails (ENOTEMPTY) leaves it behind; seed
/// 250 shows it. Normalise such pairs to "not opaque"; returns how many were normalised.
fn ignore_noop_opaque(a: &mut Snapshot, b: &mut Snapshot, lowers: &[PathBuf]) -> usize {
    let mut n = 0;
    for (path, ea) in a.entries.iter_mut() {
        let Some(eb) = b.entries.get_mut(path) else {
            continue;
        };
        if let (tree::Kind::Dir { opaque: oa }, tree::Kind::Dir { opaque: ob }) =
            (&mut ea.kind, &mut eb.kind)
            && *oa != *ob
            && !dir_below(lowers, path)
        {
            *oa = false;
            *ob = false;
            n += 1;
        }
    }
    n
}

fn run_seed_in(
    seed: u64,
    cfg: &Config,
    base: &Path,
    log: &mut Vec<String>,
    stats: &mut Stats,
) -> Result<Vec<String>, SeqErr> {
    let e = |s: String| (s, Vec::new());
    let spec = gen_spec(seed);
    let union_dialect = match cfg.union_driver {
        Driver::Kernel => Dialect::Kernel,
        Driver::Unionmount => Dialect::Mixed,
    };
    let (k, u) = (base.join("k"), base.join("u"));
    let lowers = |side: &Path| -> Vec<PathBuf> {
        (0..spec.layers.len())
            .map(|i| side.join(format!("l{i}")))
            .collect()
    };
    let (k_lowers, u_lowers) = (lowers(&k), lowers(&u));
    let mut rk = Rng::new(seed ^ 0x4B45_524E);
    let mut ru = Rng::new(seed ^ 0x554E_494F);
    for (i, layer) in spec.layers.iter().enumerate() {
        render_layer(layer, &k_lowers[i], Dialect::Kernel, false, &mut rk)
            .map_err(|x| e(format!("render kernel layer {i}: {x}")))?;
        render_layer(layer, &u_lowers[i], union_dialect, false, &mut ru)
            .map_err(|x| e(format!("render union layer {i}: {x}")))?;
    }
    let mut u_upper_kernel_readable = true;
    if let Some(layer) = &spec.upper {
        stats.seeded_uppers += 1;
        render_layer(layer, &k.join("upper"), Dialect::Kernel, true, &mut rk)
            .map_err(|x| e(format!("render kernel upper: {x}")))?;
        u_upper_kernel_readable =
            render_layer(layer, &u.join("upper"), union_dialect, true, &mut ru)
                .map_err(|x| e(format!("render union upper: {x}")))?;
    }
    for side in [&k, &u] {
        std::fs::create_dir_all(side.join("upper")).map_err(|x| e(x.to_string()))?;
    }
    let (kname, uname) = ("kernel", driver_name(cfg.union_driver));
    let km = do_mount(
        Driver::Kernel,
        &k_lowers,
        &k.join("upper"),
        &k.join("work"),
        &k.join("mnt"),
    )
    .map_err(e)?;
    let um = do_mount(
        cfg.union_driver,
        &u_lowers,
        &u.join("upper"),
        &u.join("work"),
        &u.join("mnt"),
    )
    .map_err(e)?;

    // The initial trees must already agree, or every later difference is noise.
    let k0 = snap(&km.mnt, View::Merged).map_err(e)?;
    let u0 = snap(&um.mnt, View::Merged).map_err(e)?;
    let d = tree::diff(&k0, &u0, kname, uname, (TIME_LO, TIME_HI));
    if !d.is_empty() {
        return Err(("initial merged trees differ (lookup/dialects)".into(), d));
    }

    let mut rng = Rng::new(seed ^ 0x4F50_5321);
    let mut pool = Pool::new(&spec);
    let n_ops = 50 + rng.below(31);
    for step in 0..n_ops {
        let r = km.mnt.clone();
        let view = with_timeout("list kernel tree", WALK_TIMEOUT, move || list_tree(&r))
            .map_err(e)?
            .map_err(|x| e(format!("list kernel tree: {x}")))?;
        pool.refresh(view);
        let op = gen_op(&mut rng, &mut pool);
        let run = |root: &Path, op: &Op| -> OpResult {
            let (r, o) = (root.to_path_buf(), op.clone());
            with_timeout(&format!("{op:?}"), OP_TIMEOUT, move || apply(&r, &o))
                .unwrap_or_else(|t| Err(format!("TIMEOUT {t}")))
        };
        let kr = run(&km.mnt, &op);
        let ur = run(&um.mnt, &op);
        stats.ops += 1;
        log.push(format!("{step:3} {op:?} -> {kname}={kr:?} {uname}={ur:?}"));
        if kr != ur {
            return Err((
                format!("op result differs at step {step}: {op:?}: {kname}={kr:?} {uname}={ur:?}"),
                Vec::new(),
            ));
        }
        if ur.as_ref().is_err_and(|x| x.starts_with("TIMEOUT")) {
            return Err((format!("step {step} timed out"), Vec::new()));
        }
    }

    let mut diffs = Vec::new();
    let k_merged = snap(&km.mnt, View::Merged).map_err(e)?;
    let u_merged = snap(&um.mnt, View::Merged).map_err(e)?;
    for d in tree::diff(&k_merged, &u_merged, kname, uname, (TIME_LO, TIME_HI)) {
        diffs.push(format!("merged: {d}"));
    }
    unmount(km).map_err(e)?;
    unmount(um).map_err(e)?;
    for (name, side) in [(kname, &k), (uname, &u)] {
        for p in work_leftovers(&side.join("work")) {
            diffs.push(format!("workdir: {name} left {}", p.display()));
        }
    }
    let mut k_upper = snap(&k.join("upper"), View::Upper).map_err(e)?;
    let mut u_upper = snap(&u.join("upper"), View::Upper).map_err(e)?;
    tree::fill_metacopy(&mut u_upper, &u_merged);
    stats.noop_opaque += ignore_noop_opaque(&mut k_upper, &mut u_upper, &k_lowers);
    stats
        .ignored_xattrs
        .extend(k_upper.ignored_xattrs.iter().cloned());
    stats
        .ignored_xattrs
        .extend(u_upper.ignored_xattrs.iter().cloned());
    for d in tree::diff(&k_upper, &u_upper, kname, uname, (TIME_LO, TIME_HI)) {
        diffs.push(format!("upper: {d}"));
    }

    // Cross-compatibility: each upper mounted by the other driver.
    // The kernel reads only its own dialect: when the upper was seeded with OCI markers
    // (which unionmount reads and need not rewrite), the kernel cannot be the judge.
    if u_upper_kernel_readable {
        // Metacopy files in the union's upper: the kernel reads them with metacopy=on.
        let x1 = do_mount_with(
            Driver::Kernel,
            if common::union_metacopy() {
                KERNEL_METACOPY_OPTS
            } else {
                KERNEL_OPTS
            },
            &k_lowers,
            &u.join("upper"),
            &u.join("work2"),
            &u.join("mnt2"),
        )
        .map_err(|x| e(format!("cross: kernel over {uname}'s upper: {x}")))?;
        let s1 = snap(&x1.mnt, View::Merged).map_err(e)?;
        unmount(x1).map_err(e)?;
        let name = format!("kernel-over-{uname}-upper");
        for d in tree::diff(&u_merged, &s1, uname, &name, (TIME_LO, TIME_HI)) {
            diffs.push(format!("cross: {d}"));
        }
    } else {
        stats.cross_skipped += 1;
    }
    let x2 = do_mount(
        cfg.union_driver,
        &u_lowers,
        &k.join("upper"),
        &k.join("work2"),
        &k.join("mnt2"),
    )
    .map_err(|x| e(format!("cross: {uname} over kernel's upper: {x}")))?;
    let s2 = snap(&x2.mnt, View::Merged).map_err(e)?;
    unmount(x2).map_err(e)?;
    for p in work_leftovers(&k.join("work2")) {
        diffs.push(format!(
            "workdir: {uname} over kernel's upper left {}",
            p.display()
        ));
    }
    for d in tree::diff(
        &k_merged,
        &s2,
        kname,
        &format!("{uname}-over-kernel-upper"),
        (TIME_LO, TIME_HI),
    ) {
        diffs.push(format!("cross: {d}"));
    }
    Ok(diffs)
}

// ---------------------------------------------------------------- tests

fn skip_or_fail(why: &str) {
    if std::env::var("UNIONMOUNT_REQUIRE_MOUNT").as_deref() == Ok("1") {
        panic!("UNIONMOUNT_REQUIRE_MOUNT=1 but: {why}");
    }
    eprintln!("SKIP: differential test: {why}");
}

fn config() -> Option<Config> {
    if !common::mount_allowed() {
        return None;
    }
    let union_driver = if std::env::var("UNIONMOUNT_DIFF_SELFTEST").as_deref() == Ok("1") {
        Driver::Kernel
    } else {
        let have_bin = std::env::var_os("UNIONMOUNT_BIN").is_some()
            || option_env!("CARGO_BIN_EXE_unionmount").is_some();
        if !have_bin || !unionmount_bin().exists() {
            skip_or_fail("no unionmount binary (set UNIONMOUNT_BIN)");
            return None;
        }
        Driver::Unionmount
    };
    let tmp = std::env::var_os("UNIONMOUNT_DIFF_TMP")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    Some(Config {
        union_driver,
        tmp,
        keep: std::env::var("UNIONMOUNT_DIFF_KEEP").as_deref() == Ok("1"),
    })
}

/// The fixed seed list: 1..=N, or the seeds in `UNIONMOUNT_DIFF_SEEDS`.
fn seeds() -> Vec<u64> {
    if let Ok(list) = std::env::var("UNIONMOUNT_DIFF_SEEDS") {
        return list
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
    }
    let n = std::env::var("UNIONMOUNT_DIFF_SEQUENCES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SEQUENCES);
    (1..=n as u64).collect()
}

fn run_shard(shard: usize) {
    let Some(cfg) = config() else { return };
    // SAFETY: umask has no preconditions; every test uses the same value.
    unsafe { libc::umask(0o022) };
    let t0 = Instant::now();
    let mut stats = Stats::default();
    let mut failures = Vec::new();
    let mine: Vec<u64> = seeds()
        .into_iter()
        .filter(|s| (*s as usize) % SHARDS == shard)
        .collect();
    for &seed in &mine {
        if let Err(f) = run_seed(seed, &cfg, &mut stats) {
            eprintln!(
                "==== FAIL seed {} ({}): {}",
                f.seed,
                driver_name(cfg.union_driver),
                f.what
            );
            for d in &f.diffs {
                eprintln!("  diff: {d}");
            }
            eprintln!("  op log:");
            for l in &f.log {
                eprintln!("    {l}");
            }
            failures.push(f);
        }
    }
    eprintln!(
        "shard {shard}: {} sequences ({} with a seeded upper, {} kernel-over-upper checks \
         skipped, {} no-op opaque differences ignored), {} ops, {:.1}s, ignored upper xattrs \
         seen: {:?}",
        mine.len(),
        stats.seeded_uppers,
        stats.cross_skipped,
        stats.noop_opaque,
        stats.ops,
        t0.elapsed().as_secs_f64(),
        stats.ignored_xattrs
    );
    if !failures.is_empty() {
        let summary: Vec<String> = failures
            .iter()
            .map(|f| format!("seed {}: {}", f.seed, f.what))
            .collect();
        panic!(
            "{} of {} sequences failed (rerun one with UNIONMOUNT_DIFF_SEEDS=N):\n{}",
            failures.len(),
            mine.len(),
            summary.join("\n")
        );
    }
}

#[test]
fn differential_shard_0() {
    run_shard(0);
}
#[test]
fn differential_shard_1() {
    run_shard(1);
}
#[test]
fn differential_shard_2() {
    run_shard(2);
}
#[test]
fn differential_shard_3() {
    run_shard(3);
}
#[test]
fn differential_shard_4() {
    run_shard(4);
}
#[test]
fn differential_shard_5() {
    run_shard(5);
}

/// The generator is a pure function of the seed (the whole test rests on that).
#[test]
fn spec_is_deterministic() {
    let show = |s: &Spec| {
        s.layers
            .iter()
            .map(|l| format!("{:?}", l.entries))
            .collect::<Vec<_>>()
            .join("|")
    };
    for seed in 1..20 {
        assert_eq!(show(&gen_spec(seed)), show(&gen_spec(seed)));
    }
}
