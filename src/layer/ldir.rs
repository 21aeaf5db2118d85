//! `LDir`: one directory of one layer, on disk (an fd beneath the layer's root) or in a
//! virtual layer (an entry id). The union reads lower layers only through these methods, so
//! both kinds behave the same in lookup, listing, whiteout and opaque handling, and copy-up.
//!
//! Invariants: on-disk access is `*at` on the directory fd with O_NOFOLLOW, never following
//! a symlink stored in a layer; a virtual directory is read-only (writes and `fd()` give
//! EROFS: only the upper is written, and the upper is always on disk).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::dir::Type;
use nix::fcntl::OFlag;
use nix::sys::stat::FileStat;

use super::virt::{EntryId, VirtualLayer};
use crate::sys::{self, XTarget};

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

#[derive(Clone, Debug)]
pub enum LDir {
    Fd(Arc<OwnedFd>),
    Virt(Arc<dyn VirtualLayer>, EntryId),
}

/// `name` in virtual directory `dir`: "." is the directory itself (the union names a layer's
/// root as "." in its root directory).
fn vlookup(l: &Arc<dyn VirtualLayer>, dir: EntryId, name: &OsStr) -> io::Result<Option<EntryId>> {
    if name == "." {
        return Ok(Some(dir));
    }
    l.lookup(dir, name)
}

impl LDir {
    /// The directory fd, for writers (the upper) and on-disk-only code paths.
    pub fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        match self {
            LDir::Fd(fd) => Ok(fd.as_fd()),
            LDir::Virt(..) => Err(err(libc::EROFS)),
        }
    }

    /// The shared fd itself (for caches and background work); None for a virtual directory.
    pub fn shared_fd(&self) -> Option<&Arc<OwnedFd>> {
        match self {
            LDir::Fd(fd) => Some(fd),
            LDir::Virt(..) => None,
        }
    }

    /// stat of the directory itself.
    pub fn stat_self(&self) -> io::Result<FileStat> {
        match self {
            LDir::Fd(fd) => nix::sys::stat::fstat(fd.as_fd()).map_err(|e| err(e as i32)),
            LDir::Virt(l, id) => l.stat(*id),
        }
    }

    pub fn try_stat(&self, name: &OsStr) -> io::Result<Option<FileStat>> {
        match self {
            LDir::Fd(fd) => super::try_stat_at(fd.as_fd(), name),
            LDir::Virt(l, id) => match vlookup(l, *id, name)? {
                Some(c) => Ok(Some(l.stat(c)?)),
                None => Ok(None),
            },
        }
    }

    pub fn stat(&self, name: &OsStr) -> io::Result<FileStat> {
        self.try_stat(name)?.ok_or_else(|| err(libc::ENOENT))
    }

    /// (name, d_ino, S_IFMT bits if known) of every entry except "." and "..".
    pub fn entries(&self) -> io::Result<Vec<(OsString, u64, Option<u32>)>> {
        match self {
            LDir::Fd(fd) => Ok(crate::union::readdir::raw_entries(fd.as_fd())?
                .into_iter()
                .map(|(n, ino, t)| (n, ino, t.map(type_bits)))
                .collect()),
            LDir::Virt(l, id) => Ok(l
                .entries(*id)?
                .into_iter()
                .map(|(n, ino, k)| (n, ino, Some(k)))
                .collect()),
        }
    }

    /// Every name except "." and "..".
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        Ok(self.entries()?.into_iter().map(|(n, _, _)| n).collect())
    }

    /// The subdirectory `name` (ENOTDIR when it is not one, never following a symlink).
    pub fn child_dir(&self, name: &OsStr) -> io::Result<LDir> {
        match self {
            LDir::Fd(fd) => Ok(LDir::Fd(Arc::new(super::open_at(
                fd.as_fd(),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                0,
            )?))),
            LDir::Virt(l, id) => {
                let c = vlookup(l, *id, name)?.ok_or_else(|| err(libc::ENOENT))?;
                if l.stat(c)?.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Err(err(libc::ENOTDIR));
                }
                Ok(LDir::Virt(l.clone(), c))
            }
        }
    }

    /// Opens regular file (or, with O_DIRECTORY, directory) `name`, never following it.
    pub fn open(&self, name: &OsStr, flags: OFlag) -> io::Result<OwnedFd> {
        match self {
            LDir::Fd(fd) => super::open_at(fd.as_fd(), name, flags, 0),
            LDir::Virt(l, id) => {
                if flags.bits() & libc::O_ACCMODE != libc::O_RDONLY
                    || flags.contains(OFlag::O_TRUNC)
                {
                    return Err(err(libc::EROFS));
                }
                let c = vlookup(l, *id, name)?.ok_or_else(|| err(libc::ENOENT))?;
                let kind = l.stat(c)?.st_mode & libc::S_IFMT;
                if flags.contains(OFlag::O_DIRECTORY) || kind != libc::S_IFREG {
                    return Err(err(if kind == libc::S_IFDIR {
                        libc::EISDIR
                    } else {
                        libc::ELOOP
                    }));
                }
                l.open(c)
            }
        }
    }

    pub fn readlink(&self, name: &OsStr) -> io::Result<OsString> {
        match self {
            LDir::Fd(fd) => nix::fcntl::readlinkat(fd.as_fd(), name).map_err(|e| err(e as i32)),
            LDir::Virt(l, id) => {
                let c = vlookup(l, *id, name)?.ok_or_else(|| err(libc::ENOENT))?;
                l.readlink(c)
            }
        }
    }

    /// The value of xattr `key` of entry `name` (of the directory itself when None).
    pub fn getxattr(&self, name: Option<&OsStr>, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self {
            LDir::Fd(fd) => sys::getxattr_vec(target(fd.as_fd(), name), key),
            LDir::Virt(l, id) => {
                let id = self.virt_id(l, *id, name)?;
                Ok(l.xattrs(id)?
                    .into_iter()
                    .find(|(k, _)| k == key)
                    .map(|(_, v)| v))
            }
        }
    }

    /// Names of the xattrs of entry `name` (of the directory itself when None), each followed
    /// by a NUL, as listxattr(2) returns them.
    pub fn listxattr(&self, name: Option<&OsStr>) -> io::Result<Vec<u8>> {
        match self {
            LDir::Fd(fd) => sys::listxattr(target(fd.as_fd(), name)),
            LDir::Virt(l, id) => {
                let id = self.virt_id(l, *id, name)?;
                let mut out = Vec::new();
                for (k, _) in l.xattrs(id)? {
                    out.extend_from_slice(&k);
                    out.push(0);
                }
                Ok(out)
            }
        }
    }

    fn virt_id(
        &self,
        l: &Arc<dyn VirtualLayer>,
        dir: EntryId,
        name: Option<&OsStr>,
    ) -> io::Result<EntryId> {
        match name {
            None => Ok(dir),
            Some(n) => vlookup(l, dir, n)?.ok_or_else(|| err(libc::ENOENT)),
        }
    }
}

fn target<'a>(fd: BorrowedFd<'a>, name: Option<&'a OsStr>) -> XTarget<'a> {
    match name {
        Some(n) => XTarget::At(fd, n),
        None => XTarget::Fd(fd),
    }
}

pub fn type_bits(t: Type) -> u32 {
    match t {
        Type::Fifo => libc::S_IFIFO,
        Type::CharacterDevice => libc::S_IFCHR,
        Type::Directory => libc::S_IFDIR,
        Type::BlockDevice => libc::S_IFBLK,
        Type::File => libc::S_IFREG,
        Type::Symlink => libc::S_IFLNK,
        Type::Socket => libc::S_IFSOCK,
    }
}
