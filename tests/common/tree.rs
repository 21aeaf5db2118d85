//! Tree snapshots and their comparison, for tests that check what a user sees.
//!
//! `snapshot(root, View::Merged)` records, for every path under `root` (the root itself is
//! `""`), what `lstat`, `readlink`, `llistxattr`/`lgetxattr` and a full read show: type, the
//! permission bits including setuid/setgid/sticky, owner, size, a content hash, link target,
//! rdev, and every listed xattr with its value. It never follows a symlink and never opens
//! anything but regular files, so it cannot block on a FIFO.
//!
//! `View::Upper` reads a raw overlay upper (or lower) directory and folds every whiteout and
//! opaque dialect into one form, so an upper written by kernel overlayfs and one written by
//! unionmount compare equal when they mean the same thing:
//! - char device 0/0 `NAME`, empty file `.wh.NAME` (when no `NAME` sits beside it), and a
//!   file `NAME` carrying `trusted.overlay.whiteout`/`user.overlay.whiteout` all become
//!   `Kind::Whiteout` at `NAME` (owner, mode and times of a whiteout carry no meaning);
//! - `trusted.overlay.opaque=y`, `user.overlay.opaque=y`, `user.fuseoverlayfs.opaque=y`, a
//!   `.wh..wh..opq` child, and a `.wh.NAME` beside a directory `NAME` all become
//!   `Kind::Dir { opaque: true }`; a `.wh.NAME` beside a non-directory `NAME` is dropped
//!   (the OCI rule: it hides only lower layers, which `NAME` already shadows); the value `x` only says
//!   "may hold xattr whiteouts" and is not opacity;
//! - the bookkeeping xattrs in [`IGNORED_UPPER_XATTRS`] are dropped (each with the reason);
//!   every other xattr, private or not, is compared.
//!
//! Things never compared, on purpose: inode numbers and st_dev (the two mounts are different
//! filesystems), atime/ctime, directory sizes and link counts (the kernel reports the top
//! real directory's size and 1 or the real count for merged dirs; neither is an overlay
//! contract). mtime is compared by [`diff`] only when either side's value falls in a caller
//! chosen window: tests set the times they care about to fixed values in that window.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Overlay bookkeeping xattrs that may appear in an upper and are not part of the tree's
/// meaning, so an upper comparison ignores them. Each entry is a name or a prefix (ending in
/// `.`), with the reason.
pub const IGNORED_UPPER_XATTRS: &[(&str, &str)] = &[
    (
        "trusted.overlay.origin",
        "kernel: file handle of the lower object a copy-up came from; used for st_ino/index, \
         never for lookup with index=off; meaningless across filesystems",
    ),
    (
        "trusted.overlay.impure",
        "kernel: dir hint 'holds copied-up/renamed children' so readdir recomputes d_ino; \
         an optimisation, not content",
    ),
    (
        "trusted.overlay.uuid",
        "kernel: upper-root identity for uuid=/index checks, not content",
    ),
    (
        "trusted.overlay.nlink",
        "kernel: index=on hard-link accounting; not used with index=off",
    ),
    (
        "trusted.overlay.upper",
        "kernel: index=on back pointer to the upper, not content",
    ),
    (
        "user.unionmount.",
        "unionmount private bookkeeping (DESIGN 2.7), hidden from the merged view",
    ),
];

fn ignored_upper_xattr(name: &str) -> bool {
    IGNORED_UPPER_XATTRS.iter().any(|(n, _)| {
        if n.ends_with('.') {
            name.starts_with(n)
        } else {
            name == *n
        }
    })
}

/// Xattr names that are dialect markers, folded into `Kind` by `View::Upper`.
const OPAQUE_XATTRS: &[&str] = &[
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
];
const WHITEOUT_XATTRS: &[&str] = &["trusted.overlay.whiteout", "user.overlay.whiteout"];
const OPQ_FILE: &str = ".wh..wh..opq";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// A mounted tree, as a user sees it.
    Merged,
    /// A raw layer directory; whiteout and opaque dialects are normalised.
    Upper,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir { opaque: bool },
    File { hash: u64, sparse: bool },
    Symlink(Vec<u8>),
    Fifo,
    Socket,
    CharDev(u64),
    BlockDev(u64),
    Whiteout,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// `None` for directories and whiteouts.
    pub size: Option<u64>,
    /// `None` for directories and whiteouts.
    pub nlink: Option<u64>,
    pub mtime: (i64, i64),
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

impl Entry {
    fn whiteout() -> Entry {
        Entry {
            kind: Kind::Whiteout,
            mode: 0,
            uid: 0,
            gid: 0,
            size: None,
            nlink: None,
            mtime: (0, 0),
            xattrs: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    pub entries: BTreeMap<String, Entry>,
    /// Ignored bookkeeping xattr names seen (View::Upper), for reports.
    pub ignored_xattrs: BTreeSet<String>,
    /// Problems that are wrong on their own: duplicate readdir names, names that readdir
    /// lists but lstat cannot find.
    pub anomalies: Vec<String>,
    /// Files of an upper (View::Upper) that are metadata-only copies (`overlay.metacopy`):
    /// their bytes are still in a lower layer. The marker is not in their xattrs.
    pub metacopy: BTreeSet<String>,
}

/// Metacopy markers (kernel `metacopy=on` format).
pub const METACOPY_XATTRS: &[&str] = &["trusted.overlay.metacopy", "user.overlay.metacopy"];

/// Gives each metacopy file of `upper` the contents the mount showed for it (`merged`):
/// the upper then compares with a full copy-up on everything but where the bytes are kept.
pub fn fill_metacopy(upper: &mut Snapshot, merged: &Snapshot) {
    for p in &upper.metacopy {
        if let (Some(u), Some(m)) = (upper.entries.get_mut(p), merged.entries.get(p)) {
            u.kind = m.kind.clone();
        }
    }
}

/// FNV-1a, 64 bit: enough to tell file contents apart in a test.
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// All xattrs of `p` (not following a symlink), name → value.
pub fn read_xattrs(p: &Path) -> io::Result<BTreeMap<String, Vec<u8>>> {
    let c = cpath(p);
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 4096];
    // SAFETY: c is a valid C string; buf is writable for buf.len() bytes.
    let n = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(out);
        }
        return Err(e);
    }
    buf.truncate(n as usize);
    for name in buf.split(|b| *b == 0).filter(|s| !s.is_empty()) {
        let cname = CString::new(name).unwrap();
        let mut val = vec![0u8; 65536];
        // SAFETY: as above.
        let m = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                val.as_mut_ptr().cast(),
                val.len(),
            )
        };
        if m < 0 {
            return Err(io::Error::other(format!(
                "lgetxattr {} {}: {}",
                p.display(),
                String::from_utf8_lossy(name),
                io::Error::last_os_error()
            )));
        }
        val.truncate(m as usize);
        out.insert(String::from_utf8_lossy(name).into_owned(), val);
    }
    Ok(out)
}

fn hash_file(p: &Path) -> io::Result<(u64, u64)> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(p)?;
    let mut data = Vec::new();
    f.read_to_end(&mut data)?;
    Ok((fnv64(&data), data.len() as u64))
}

/// Reads the tree under `root`.
pub fn snapshot(root: &Path, view: View) -> io::Result<Snapshot> {
    let mut snap = Snapshot::default();
    let md = std::fs::symlink_metadata(root)?;
    let entry = read_entry(root, &md, view, &mut snap)?;
    snap.entries.insert(String::new(), entry);
    walk(root, "", view, &mut snap)?;
    Ok(snap)
}

fn join(rel: &str, name: &str) -> String {
    if rel.is_empty() {
        name.to_string()
    } else {
        format!("{rel}/{name}")
    }
}

fn walk(root: &Path, rel: &str, view: View, snap: &mut Snapshot) -> io::Result<()> {
    let dir = root.join(rel);
    let mut names: Vec<Vec<u8>> = Vec::new();
    let at = |e: io::Error, p: &Path| io::Error::new(e.kind(), format!("{}: {e}", p.display()));
    for de in std::fs::read_dir(&dir).map_err(|e| at(e, &dir))? {
        names.push(de.map_err(|e| at(e, &dir))?.file_name().as_bytes().to_vec());
    }
    names.sort();
    for w in names.windows(2) {
        if w[0] == w[1] {
            snap.anomalies.push(format!(
                "readdir of '{rel}' lists '{}' twice",
                String::from_utf8_lossy(&w[0])
            ));
        }
    }
    names.dedup();
    let present: BTreeSet<&[u8]> = names.iter().map(|n| n.as_slice()).collect();
    // OCI `.wh.X` beside a real `X` in the same layer: the marker still hides lower `X`.
    // For a non-directory `X` that changes nothing (X shadows the lowers anyway); for a
    // directory it means "opaque". Normalise to that.
    let beside: BTreeSet<Vec<u8>> = names
        .iter()
        .filter_map(|n| n.strip_prefix(b".wh.".as_slice()))
        .filter(|t| !t.is_empty() && present.contains(*t))
        .map(|t| t.to_vec())
        .collect();
    let mut subdirs = Vec::new();
    for name in &names {
        let name_s = String::from_utf8_lossy(name).into_owned();
        let path = dir.join(&name_s);
        if view == View::Upper {
            if name_s == OPQ_FILE {
                if let Some(Entry {
                    kind: Kind::Dir { opaque },
                    ..
                }) = snap.entries.get_mut(rel)
                {
                    *opaque = true;
                }
                continue;
            }
            if let Some(target) = name_s.strip_prefix(".wh.") {
                if !target.is_empty() && !present.contains(target.as_bytes()) {
                    snap.entries.insert(join(rel, target), Entry::whiteout());
                    continue;
                }
                if beside.contains(target.as_bytes()) {
                    continue;
                }
            }
        }
        let md = match std::fs::symlink_metadata(&path) {
            Ok(md) => md,
            Err(e) => {
                snap.anomalies.push(format!(
                    "readdir of '{rel}' lists '{name_s}' but lstat fails: {e}"
                ));
                continue;
            }
        };
        let mut entry = read_entry(&path, &md, view, snap).map_err(|e| at(e, &path))?;
        if view == View::Upper && matches!(entry.kind, Kind::File { .. }) {
            let removed: Vec<bool> = METACOPY_XATTRS
                .iter()
                .map(|x| entry.xattrs.remove(*x).is_some())
                .collect();
            let marked = removed.contains(&true);
            if marked {
                snap.metacopy.insert(join(rel, &name_s));
            }
        }
        if view == View::Upper
            && beside.contains(name.as_slice())
            && let Kind::Dir { opaque } = &mut entry.kind
        {
            *opaque = true;
        }
        if matches!(entry.kind, Kind::Dir { .. }) {
            subdirs.push(join(rel, &name_s));
        }
        snap.entries.insert(join(rel, &name_s), entry);
    }
    for sub in subdirs {
        walk(root, &sub, view, snap)?;
    }
    Ok(())
}

fn read_entry(
    path: &Path,
    md: &std::fs::Metadata,
    view: View,
    snap: &mut Snapshot,
) -> io::Result<Entry> {
    let ft = md.file_type();
    let mut xattrs = read_xattrs(path)?;
    let mut size = Some(md.size());
    let mut nlink = Some(md.nlink());
    let kind = if ft.is_dir() {
        size = None;
        nlink = None;
        let mut opaque = false;
        if view == View::Upper {
            for n in OPAQUE_XATTRS {
                if let Some(v) = xattrs.remove(*n) {
                    opaque |= v == b"y";
                }
            }
        }
        Kind::Dir { opaque }
    } else if ft.is_file() {
        if view == View::Upper
            && md.size() == 0
            && WHITEOUT_XATTRS.iter().any(|n| xattrs.contains_key(*n))
        {
            return Ok(Entry::whiteout());
        }
        let (hash, len) = hash_file(path)?;
        if len != md.size() {
            snap.anomalies.push(format!(
                "{}: st_size {} but read {} bytes",
                path.display(),
                md.size(),
                len
            ));
        }
        let sparse = md.size() >= 65536 && md.blocks() * 512 < md.size();
        Kind::File { hash, sparse }
    } else if ft.is_symlink() {
        Kind::Symlink(std::fs::read_link(path)?.as_os_str().as_bytes().to_vec())
    } else if ft.is_fifo() {
        Kind::Fifo
    } else if ft.is_socket() {
        Kind::Socket
    } else if ft.is_char_device() {
        if view == View::Upper && md.rdev() == 0 {
            return Ok(Entry::whiteout());
        }
        Kind::CharDev(md.rdev())
    } else {
        Kind::BlockDev(md.rdev())
    };
    if view == View::Upper {
        xattrs.retain(|name, _| {
            if ignored_upper_xattr(name) {
                snap.ignored_xattrs.insert(name.clone());
                false
            } else {
                true
            }
        });
        // `opaque=x` on a directory ("may contain xattr whiteouts") is folded above with
        // the other opaque values; the whiteout markers are folded into Kind::Whiteout.
    }
    Ok(Entry {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        size,
        nlink,
        mtime: (md.mtime(), md.mtime_nsec()),
        xattrs,
    })
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Dir { opaque: true } => write!(f, "dir(opaque)"),
            Kind::Dir { opaque: false } => write!(f, "dir"),
            Kind::File { hash, sparse } => {
                write!(
                    f,
                    "file#{hash:016x}{}",
                    if *sparse { "(sparse)" } else { "" }
                )
            }
            Kind::Symlink(t) => write!(f, "symlink->{}", String::from_utf8_lossy(t)),
            Kind::Fifo => write!(f, "fifo"),
            Kind::Socket => write!(f, "socket"),
            Kind::CharDev(r) => write!(f, "chardev({r:#x})"),
            Kind::BlockDev(r) => write!(f, "blockdev({r:#x})"),
            Kind::Whiteout => write!(f, "whiteout"),
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Whiteout {
            return write!(f, "whiteout");
        }
        write!(
            f,
            "{} {:04o} {}:{}",
            self.kind, self.mode, self.uid, self.gid
        )?;
        if let Some(s) = self.size {
            write!(f, " size={s}")?;
        }
        if let Some(n) = self.nlink {
            write!(f, " nlink={n}")?;
        }
        for (k, v) in &self.xattrs {
            write!(f, " {k}={}", String::from_utf8_lossy(v))?;
        }
        Ok(())
    }
}

/// Differences between two snapshots, one line each. mtime is compared only when either
/// side's seconds fall in `[mtime_window.0, mtime_window.1)`.
pub fn diff(
    a: &Snapshot,
    b: &Snapshot,
    a_name: &str,
    b_name: &str,
    mtime_window: (i64, i64),
) -> Vec<String> {
    let mut out = Vec::new();
    for x in &a.anomalies {
        out.push(format!("{a_name}: {x}"));
    }
    for x in &b.anomalies {
        out.push(format!("{b_name}: {x}"));
    }
    let keys: BTreeSet<&String> = a.entries.keys().chain(b.entries.keys()).collect();
    let in_window = |t: (i64, i64)| t.0 >= mtime_window.0 && t.0 < mtime_window.1;
    for k in keys {
        let shown = if k.is_empty() { "/" } else { k.as_str() };
        match (a.entries.get(k), b.entries.get(k)) {
            (Some(x), None) => out.push(format!("{shown}: only in {a_name}: {x}")),
            (None, Some(y)) => out.push(format!("{shown}: only in {b_name}: {y}")),
            (Some(x), Some(y)) => {
                let mut d = Vec::new();
                if x.kind != y.kind {
                    d.push(format!("type {} vs {}", x.kind, y.kind));
                }
                if x.kind == Kind::Whiteout && y.kind == Kind::Whiteout {
                    continue;
                }
                if x.mode != y.mode {
                    d.push(format!("mode {:04o} vs {:04o}", x.mode, y.mode));
                }
                if (x.uid, x.gid) != (y.uid, y.gid) {
                    d.push(format!("owner {}:{} vs {}:{}", x.uid, x.gid, y.uid, y.gid));
                }
                if x.size != y.size {
                    d.push(format!("size {:?} vs {:?}", x.size, y.size));
                }
                if x.nlink != y.nlink {
                    d.push(format!("nlink {:?} vs {:?}", x.nlink, y.nlink));
                }
                if (in_window(x.mtime) || in_window(y.mtime)) && x.mtime != y.mtime {
                    d.push(format!(
                        "mtime {}.{:09} vs {}.{:09}",
                        x.mtime.0, x.mtime.1, y.mtime.0, y.mtime.1
                    ));
                }
                if x.xattrs != y.xattrs {
                    let fmt_x = |m: &BTreeMap<String, Vec<u8>>| {
                        m.iter()
                            .map(|(k, v)| format!("{k}={}", String::from_utf8_lossy(v)))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    d.push(format!(
                        "xattrs [{}] vs [{}]",
                        fmt_x(&x.xattrs),
                        fmt_x(&y.xattrs)
                    ));
                }
                if !d.is_empty() {
                    out.push(format!("{shown}: {a_name} vs {b_name}: {}", d.join("; ")));
                }
            }
            (None, None) => unreachable!(),
        }
    }
    out
}
