//! A layer: one directory on disk (a lower layer or the upper), addressed only through its
//! root file descriptor.
//!
//! Invariants: every path handed to a layer is relative to its root and is resolved with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`, so a symlink
//! stored in a layer is never followed by the daemon and nothing outside the root is reached.
//! Directory fds are opened per operation (no fd pinned per inode; lowers are immutable).

pub mod ldir;
pub mod tree;
pub mod virt;

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub use ldir::LDir;
pub use virt::VirtualLayer;

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode};

/// Index of a layer in the union's stack: 0 is the upper when there is one, then the lowers
/// from top to bottom.
pub type LayerIdx = usize;

/// (device, inode) of an object inside a layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RealId {
    pub dev: u64,
    pub ino: u64,
}

impl RealId {
    pub fn of(st: &FileStat) -> RealId {
        RealId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

#[derive(Debug)]
pub struct Layer {
    /// Where the layer lives, for messages only.
    pub path: PathBuf,
    /// The layer's root directory; for a virtual layer, a directory on the filesystem that
    /// holds its data (statfs only).
    root: OwnedFd,
    pub dev: u64,
    virt: Option<Arc<dyn VirtualLayer>>,
}

/// Checks one path component from the kernel or a layer: not empty, no '/', not "." or "..".
pub fn check_name(name: &OsStr) -> io::Result<()> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') || b.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(())
}

fn errno(e: nix::Error) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

impl Layer {
    /// Opens a layer directory; the error names the path.
    pub fn open(path: &Path) -> Result<Layer, String> {
        let root = nix::fcntl::open(
            path,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| match e {
            nix::Error::ENOENT => format!("{}: no such directory", path.display()),
            nix::Error::ENOTDIR => format!("{}: not a directory", path.display()),
            e => format!("{}: {}", path.display(), e.desc()),
        })?;
        let st = nix::sys::stat::fstat(&root).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Layer {
            path: path.to_path_buf(),
            root,
            dev: st.st_dev,
            virt: None,
        })
    }

    /// A read-only layer served by `v`; `name` is for messages, `data_dir` a directory on
    /// the filesystem that holds its data (what statfs reports for it).
    pub fn virtual_layer(
        name: &str,
        data_dir: &Path,
        v: Arc<dyn VirtualLayer>,
    ) -> Result<Layer, String> {
        let root = nix::fcntl::open(
            data_dir,
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| format!("{}: {}", data_dir.display(), e.desc()))?;
        Ok(Layer {
            path: PathBuf::from(name),
            root,
            dev: v.dev(),
            virt: Some(v),
        })
    }

    pub fn is_virtual(&self) -> bool {
        self.virt.is_some()
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// stat of the layer's root directory.
    pub fn root_stat(&self) -> io::Result<FileStat> {
        match &self.virt {
            Some(v) => v.stat(v.root()),
            None => nix::sys::stat::fstat(self.root.as_fd()).map_err(errno),
        }
    }

    /// openat2 beneath the root with no symlinks anywhere on the path. `rel` is "." for the
    /// root itself.
    pub fn open_rel(&self, rel: &Path, flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW)
            .mode(Mode::from_bits_truncate(mode))
            .resolve(
                ResolveFlag::RESOLVE_BENEATH
                    | ResolveFlag::RESOLVE_NO_SYMLINKS
                    | ResolveFlag::RESOLVE_NO_MAGICLINKS,
            );
        loop {
            match nix::fcntl::openat2(self.root.as_fd(), rel, how) {
                Ok(fd) => return Ok(fd),
                Err(nix::Error::EAGAIN) | Err(nix::Error::EINTR) => continue,
                // A symlink where a directory was expected means the name is not a directory.
                Err(nix::Error::ELOOP) => return Err(io::Error::from_raw_os_error(libc::ENOTDIR)),
                Err(e) => return Err(errno(e)),
            }
        }
    }

    /// A directory of this layer opened for reading (listing, *at calls, xattrs).
    pub fn open_dir(&self, rel: &Path) -> io::Result<LDir> {
        let Some(v) = &self.virt else {
            return Ok(LDir::Fd(Arc::new(self.open_rel(
                rel,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                0,
            )?)));
        };
        let mut id = v.root();
        for c in rel.components() {
            match c {
                Component::CurDir => {}
                Component::Normal(n) => {
                    id = v
                        .lookup(id, n)?
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))?;
                    if v.stat(id)?.st_mode & libc::S_IFMT != libc::S_IFDIR {
                        return Err(io::Error::from_raw_os_error(libc::ENOTDIR));
                    }
                }
                _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
            }
        }
        Ok(LDir::Virt(v.clone(), id))
    }
}

/// fstatat without following a final symlink.
pub fn stat_at(dir: BorrowedFd, name: &OsStr) -> io::Result<FileStat> {
    nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW).map_err(errno)
}

/// Like `stat_at` but ENOENT (and ENOTDIR) becomes None.
pub fn try_stat_at(dir: BorrowedFd, name: &OsStr) -> io::Result<Option<FileStat>> {
    match stat_at(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Opens `name` inside `dir` without following it, as a regular file or directory only.
pub fn open_at(dir: BorrowedFd, name: &OsStr, flags: OFlag, mode: u32) -> io::Result<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        flags | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW,
        Mode::from_bits_truncate(mode),
    )
    .map_err(errno)
}

pub fn file_type(st: &FileStat) -> u32 {
    st.st_mode & libc::S_IFMT
}

pub fn is_dir(st: &FileStat) -> bool {
    file_type(st) == libc::S_IFDIR
}
