//! Whiteout and opaque markers: reading every dialect, writing the kernel's.
//!
//! Read, in every layer:
//! - whiteout of NAME: char device 0/0 named NAME; empty file `.wh.NAME` (OCI/AUFS, hides
//!   only lower layers, never NAME in its own layer); an empty regular file NAME carrying
//!   `trusted.overlay.whiteout` or `user.overlay.whiteout` inside a directory whose
//!   `overlay.opaque` is `x` (kernel "xattr whiteouts").
//! - opaque directory: `trusted.overlay.opaque`/`user.overlay.opaque`/`user.fuseoverlayfs.opaque`
//!   = `y`, or a `.wh..wh..opq` file inside it.
//!
//! Write, in the upper: char device 0/0 whiteouts, falling back to `.wh.NAME` files when
//! mknod is refused; `trusted.overlay.opaque=y` as root, `user.overlay.opaque=y` otherwise.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

use crate::layer::{LDir, file_type, open_at, try_stat_at};
use crate::sys::{self, XTarget};

pub const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
pub const WH_PREFIX: &[u8] = b".wh.";

const OPAQUE_XATTRS: [&[u8]; 3] = [
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    b"user.fuseoverlayfs.opaque",
];
const WHITEOUT_XATTRS: [&[u8]; 2] = [b"trusted.overlay.whiteout", b"user.overlay.whiteout"];

/// What a directory's own markers say about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DirMarks {
    /// Hides every lower layer at this path.
    pub opaque: bool,
    /// `overlay.opaque=x`: may hold xattr whiteouts (and is not opaque).
    pub xattr_whiteouts: bool,
}

/// Reads the markers of an open directory: one listxattr, values read only when present,
/// and one stat for the OCI marker file.
pub fn dir_marks(dir: &LDir) -> io::Result<DirMarks> {
    let mut marks = DirMarks::default();
    let names = match dir.listxattr(None) {
        Ok(n) => n,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => Vec::new(),
        Err(e) => return Err(e),
    };
    for name in names.split(|b| *b == 0) {
        if OPAQUE_XATTRS.contains(&name) {
            match dir.getxattr(None, name)?.as_deref() {
                Some(b"y") => marks.opaque = true,
                Some(b"x") => marks.xattr_whiteouts = true,
                _ => {}
            }
        }
    }
    if !marks.opaque && dir.try_stat(OsStr::from_bytes(OPAQUE_MARKER))?.is_some() {
        marks.opaque = true;
    }
    Ok(marks)
}

pub fn is_chardev_whiteout(st: &FileStat) -> bool {
    file_type(st) == libc::S_IFCHR && st.st_rdev == 0
}

/// Is the entry `name` (already stat'ed as `st`) in `dir` a whiteout in any dialect that
/// applies to the entry itself (not the `.wh.` form, which names another entry)?
pub fn is_whiteout(dir: &LDir, marks: &DirMarks, name: &OsStr, st: &FileStat) -> io::Result<bool> {
    if is_chardev_whiteout(st) {
        return Ok(true);
    }
    if marks.xattr_whiteouts && file_type(st) == libc::S_IFREG && st.st_size == 0 {
        for x in WHITEOUT_XATTRS {
            if dir.getxattr(Some(name), x)?.is_some() {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

/// `.wh.NAME` → Some(NAME); the opaque marker and plain names → None.
pub fn oci_whiteout_target(name: &OsStr) -> Option<&OsStr> {
    let b = name.as_bytes();
    if b == OPAQUE_MARKER {
        return None;
    }
    b.strip_prefix(WH_PREFIX).map(OsStr::from_bytes)
}

/// Names the merged view never shows (and users may not create).
pub fn is_reserved_name(name: &OsStr) -> bool {
    name.as_bytes().starts_with(WH_PREFIX)
}

pub fn oci_name(name: &OsStr) -> OsString {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    OsString::from_vec(v)
}

/// How this mount writes markers into its upper, decided once at mount.
///
/// Char-device whiteouts are hard links of one whiteout inode kept in the workdir, as the
/// kernel does ("shared whiteout"): a link allocates no inode, and inode allocation is most of
/// the cost of a whiteout on ext4. A fresh shared inode is made when the old one reaches the
/// link limit or disappears; the workdir is emptied at mount, so none outlives the next mount.
#[derive(Debug)]
pub struct MarkerWriter {
    /// `trusted.` when we may write trusted xattrs, else `user.`.
    pub xattr_ns: &'static str,
    /// False once mknod of a 0/0 char device was refused: write `.wh.NAME` files instead.
    pub chardev: AtomicBool,
    /// `WORKDIR/work`, home of the shared whiteout; None on a mount without an upper.
    work: Option<OwnedFd>,
    /// Name in `work` of the shared whiteout, once made.
    shared: Mutex<Option<OsString>>,
    seq: AtomicU64,
}

impl MarkerWriter {
    pub fn new(xattr_ns: &'static str, chardev: bool, work: Option<OwnedFd>) -> MarkerWriter {
        MarkerWriter {
            xattr_ns,
            chardev: AtomicBool::new(chardev),
            work,
            shared: Mutex::new(None),
            seq: AtomicU64::new(0),
        }
    }

    /// Links a new name `name` in `dir` to the shared whiteout. Ok(false) when there is no
    /// workdir or mknod of a whiteout is refused there (the caller falls back).
    fn link_shared(&self, dir: BorrowedFd, name: &OsStr) -> io::Result<bool> {
        let Some(work) = &self.work else {
            return Ok(false);
        };
        for _ in 0..3 {
            let src = {
                let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                if shared.is_none() {
                    let n = OsString::from(format!(
                        "#wh.{:x}.{:x}",
                        std::process::id(),
                        self.seq.fetch_add(1, Ordering::Relaxed)
                    ));
                    match nix::sys::stat::mknodat(
                        work,
                        n.as_os_str(),
                        SFlag::S_IFCHR,
                        Mode::empty(),
                        0,
                    ) {
                        Ok(()) => *shared = Some(n),
                        Err(_) => return Ok(false),
                    }
                }
                shared.clone().unwrap_or_default()
            };
            match nix::unistd::linkat(work, src.as_os_str(), dir, name, AtFlags::empty()) {
                Ok(()) => return Ok(true),
                // The shared inode is full (or was removed behind our back): start another.
                Err(nix::Error::EMLINK) => self.drop_shared(work.as_fd(), &src),
                Err(nix::Error::ENOENT) if try_stat_at(work.as_fd(), &src)?.is_none() => {
                    self.drop_shared(work.as_fd(), &src)
                }
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
        Ok(false)
    }

    /// Stops linking to `src` (full or gone) and removes it from the workdir.
    fn drop_shared(&self, work: BorrowedFd, src: &OsStr) {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        if shared.as_deref() == Some(src) {
            let _ = nix::unistd::unlinkat(work, src, nix::unistd::UnlinkatFlags::NoRemoveDir);
            *shared = None;
        }
    }

    /// A whiteout under a fresh temporary name in the workdir, for an atomic exchange with
    /// an upper object. None when whiteouts are `.wh.` files or cannot be linked.
    pub fn whiteout_in_work(&self, tmp: &OsStr) -> io::Result<bool> {
        if !self.chardev.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match &self.work {
            Some(work) => self.link_shared(work.as_fd(), tmp),
            None => Ok(false),
        }
    }

    /// The marker of a metadata-only copy-up (kernel `metacopy=on` format): the upper file
    /// carries the metadata and its size, its bytes are still in the lower file at its path.
    pub fn metacopy_xattr(&self) -> Vec<u8> {
        format!("{}overlay.metacopy", self.xattr_ns).into_bytes()
    }

    pub fn opaque_xattr(&self) -> Vec<u8> {
        format!("{}overlay.opaque", self.xattr_ns).into_bytes()
    }

    /// Creates a whiteout for `name` in `dir` (which must not hold `name`).
    pub fn make_whiteout(&self, dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        if self.chardev.load(Ordering::Relaxed) {
            if self.link_shared(dir, name)? {
                return Ok(());
            }
            match nix::sys::stat::mknodat(dir, name, SFlag::S_IFCHR, Mode::empty(), 0) {
                Ok(()) => return Ok(()),
                Err(nix::Error::EPERM) | Err(nix::Error::EACCES) | Err(nix::Error::EOPNOTSUPP) => {
                    log::info!("mknod of a whiteout refused; writing .wh. files from now on");
                    self.chardev.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
        let fd = open_at(
            dir,
            &oci_name(name),
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
            0o600,
        )?;
        drop(fd);
        Ok(())
    }

    /// Marks directory `name` in `dir` opaque.
    pub fn set_opaque(&self, dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        sys::setxattr(XTarget::At(dir, name), &self.opaque_xattr(), b"y", 0)
    }
}

/// Metacopy markers, as the kernel writes them (as root, or rootless with `userxattr`).
pub const METACOPY_XATTRS: [&[u8]; 2] = [b"trusted.overlay.metacopy", b"user.overlay.metacopy"];

/// Is upper file `name` in `dir` a metadata-only copy (its bytes still below)?
pub fn is_metacopy(dir: &LDir, name: &OsStr) -> io::Result<bool> {
    for x in METACOPY_XATTRS {
        match dir.getxattr(Some(name), x) {
            Ok(Some(_)) => return Ok(true),
            Ok(None) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

/// Removes every entry of a directory that holds only whiteouts and markers (an upper dir
/// whose merged view is empty), so that it can be removed or replaced.
pub fn clear_markers(dir: BorrowedFd) -> io::Result<()> {
    let names = crate::union::readdir::list_names(dir)?;
    for name in names {
        let st = match try_stat_at(dir, &name)? {
            Some(st) => st,
            None => continue,
        };
        let flag = if file_type(&st) == libc::S_IFDIR {
            nix::unistd::UnlinkatFlags::RemoveDir
        } else {
            nix::unistd::UnlinkatFlags::NoRemoveDir
        };
        nix::unistd::unlinkat(dir, name.as_os_str(), flag)
            .map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oci_names() {
        assert_eq!(
            oci_whiteout_target(OsStr::new(".wh.foo")),
            Some(OsStr::new("foo"))
        );
        assert_eq!(oci_whiteout_target(OsStr::new(".wh..wh..opq")), None);
        assert_eq!(oci_whiteout_target(OsStr::new("foo")), None);
        assert_eq!(oci_name(OsStr::new("a")), OsString::from(".wh.a"));
        assert!(is_reserved_name(OsStr::new(".wh.x")));
        assert!(!is_reserved_name(OsStr::new(".whx")));
    }
}
