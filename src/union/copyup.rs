//! Copy-up: bring a lower object into the upper (DESIGN 2.3).
//!
//! The copy is built under `WORKDIR/work` (same filesystem as the upper) with its data,
//! xattrs (minus overlay-private ones), owner, then mode (so setuid/setgid survive the
//! chown), then times, and renamed into place with RENAME_NOREPLACE: a crash never leaves a
//! partial object under the upper, and leftovers in the workdir are removed at mount.
//! Holes stay holes (SEEK_DATA/SEEK_HOLE + copy_file_range, FICLONE first).
//!
//! Lock order: parent's `copy_lock` before the child's (parents are copied first, and the
//! parent's lock is released before the child's is taken).

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};

use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;

use super::node::{Node, ROOT_ID};
use super::{Union, err, nix_err};
use crate::layer::{LDir, file_type, open_at, stat_at};
use crate::sys::{self, XTarget};

/// What a copy-up must bring along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Data {
    /// The file's bytes (open for write, truncate to a non-zero size, link, rename, ...).
    All,
    /// No bytes: the caller is about to truncate to zero (O_TRUNC, truncate(0)).
    None,
    /// Not the bytes yet (chmod, chown, utimes, xattrs): with metacopy, the upper file gets
    /// the metadata and size only, and its bytes are copied on the first change that needs
    /// them (`Data::All`), or dropped by a truncate to zero (`Data::None`). Else as `All`.
    Meta,
}

impl Union {
    /// Makes sure `node` lives in the upper, copying it (and its parents) up if not.
    pub fn copy_up(&self, node: &Node, data: Data) -> io::Result<()> {
        if !self.has_upper {
            return Err(err(libc::EROFS));
        }
        let data = if data == Data::Meta && !(self.behaviour.metacopy && node.kind == libc::S_IFREG)
        {
            Data::All
        } else {
            data
        };
        if self.is_upper(node.top_layer()) {
            return self.finish_metacopy(node, data);
        }
        if node.id == ROOT_ID {
            // The upper root always exists.
            return Ok(());
        }
        let (pid, name) = self
            .nodes
            .live_alias(node)
            .ok_or_else(|| err(libc::ENOENT))?;
        let parent = self.nodes.get(pid)?;
        self.copy_up(&parent, Data::All)?;

        let _guard = node.copy_lock.lock().unwrap_or_else(|e| e.into_inner());
        let li = node.top_layer();
        if self.is_upper(li) {
            drop(_guard);
            return self.finish_metacopy(node, data);
        }
        let lower_dir = self.dir_in(&parent, li)?;
        let upper_dir = self.dir_in(&parent, 0)?;
        let st = lower_dir.stat(&name)?;
        // A file without bytes has nothing to leave below.
        let mut data = if data == Data::Meta && st.st_size == 0 {
            Data::All
        } else {
            data
        };
        let work = self.work()?;
        let tmp = self.tmp_name();
        // Copy-up is not a change the user made: the parent keeps its times (as overlayfs).
        let pst = nix::sys::stat::fstat(upper_dir.fd()?).map_err(nix_err)?;
        let res = self
            .build_copy(&lower_dir, &name, &st, work, &tmp, data)
            .and_then(|used| {
                data = used;
                nix::fcntl::renameat2(
                    work,
                    tmp.as_os_str(),
                    upper_dir.fd()?,
                    name.as_os_str(),
                    RenameFlags::RENAME_NOREPLACE,
                )
                .map_err(nix_err)
            });
        if let Err(e) = res {
            let _ = super::remove_tree_at(work, &tmp);
            log::warn!(
                "copy-up of {} from {} failed: {e}",
                super::show(&name),
                self.layers[li].path.display()
            );
            return Err(e);
        }
        nix::sys::stat::futimens(
            upper_dir.fd()?,
            &TimeSpec::new(pst.st_atime, pst.st_atime_nsec),
            &TimeSpec::new(pst.st_mtime, pst.st_mtime_nsec),
        )
        .map_err(nix_err)?;
        let ust = stat_at(upper_dir.fd()?, &name)?;
        parent.changed();
        self.nodes.set_upper(node, crate::layer::RealId::of(&ust));
        if self.behaviour.fsync {
            node.name_unsynced
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let others: Vec<_> = {
            let mut state = node.write();
            if node.is_dir() {
                state.layers.insert(0, 0);
            } else if data == Data::Meta {
                state.layers = vec![0, li];
            } else {
                state.layers = vec![0];
            }
            state
                .aliases
                .iter()
                .filter(|(p, n)| !(*p == pid && *n == name))
                .cloned()
                .collect()
        };
        // Other names of the same lower inode that the kernel knows: link them in the
        // upper too, so the upper matches what the mount shows for them.
        for (p, n) in others {
            if let Ok(pn) = self.nodes.get(p)
                && let Err(e) = self.link_up_alias(node, &pn, &n)
            {
                log::warn!(
                    "copy-up: linking {} into the upper failed: {e}",
                    super::show(&n)
                );
            }
        }
        Ok(())
    }

    /// Completes a metadata-only copy of `node` when `data` asks for more: its bytes are
    /// written into the upper file (All), or the file is emptied (None, before a truncate
    /// to zero), and only then the marker goes. The upper inode stays the same one, and a
    /// crash before the marker goes leaves a metacopy whose bytes are still read below.
    fn finish_metacopy(&self, node: &Node, data: Data) -> io::Result<()> {
        if data == Data::Meta || !node.is_metacopy() {
            return Ok(());
        }
        let _guard = node.copy_lock.lock().unwrap_or_else(|e| e.into_inner());
        if !node.is_metacopy() {
            return Ok(());
        }
        let li = node.data_layer();
        let dst = self.open_upper_for_fill(node)?;
        let res = (|| {
            if data == Data::All {
                let (ldir, lname) = self.parent_in(node, li)?;
                let st = ldir.stat(&lname)?;
                let src = ldir.open(&lname, OFlag::O_RDONLY)?;
                let ust = nix::sys::stat::fstat(&dst).map_err(nix_err)?;
                // Writing the bytes moves the times until they are put back below: keep
                // them beside the marker, for a lookup after a crash to put them back.
                let times = encode_times(&ust);
                if let Err(e) = sys::setxattr(XTarget::Fd(dst.as_fd()), FILL_TIMES, &times, 0) {
                    log::debug!("metacopy: cannot record the times before the copy: {e}");
                }
                copy_data(src.as_fd(), dst.as_fd(), st.st_size as u64)?;
                // Bringing the bytes up is not a change of the file: its times stay.
                nix::sys::stat::futimens(
                    dst.as_fd(),
                    &TimeSpec::new(ust.st_atime, ust.st_atime_nsec),
                    &TimeSpec::new(ust.st_mtime, ust.st_mtime_nsec),
                )
                .map_err(nix_err)?;
                // The bytes reach the disk before the marker leaves it (see build_copy).
                if self.behaviour.fsync {
                    sys::write_out(dst.as_fd(), !self.upper_orders_data)?;
                }
            } else {
                nix::unistd::ftruncate(dst.as_fd(), 0).map_err(nix_err)?;
            }
            for x in super::whiteout::METACOPY_XATTRS
                .into_iter()
                .chain([FILL_TIMES])
            {
                match sys::removexattr(XTarget::Fd(dst.as_fd()), x) {
                    Ok(()) => {}
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::ENODATA | libc::ENOTSUP | libc::EPERM)
                        ) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })();
        if let Err(e) = res {
            log::warn!(
                "copy-up of the data of inode {} from {} failed: {e}",
                node.ino,
                self.layers[li].path.display()
            );
            return Err(e);
        }
        node.write().layers = vec![0];
        Ok(())
    }

    /// The upper file of a metacopy node opened for writing its bytes. The daemon may own
    /// it without write permission (a rootless mount after chmod a-w): it adds owner write
    /// for the open and puts the mode back on the open file.
    fn open_upper_for_fill(&self, node: &Node) -> io::Result<std::os::fd::OwnedFd> {
        let (dir, name) = self.parent_in(node, 0)?;
        let fd = dir.fd()?;
        let open = || open_at(fd, &name, OFlag::O_WRONLY | OFlag::O_NOFOLLOW, 0);
        let f = match open() {
            Err(e) if e.raw_os_error() == Some(libc::EACCES) => {
                let st = stat_at(fd, &name)?;
                if !self.is_node_object(node, &st) {
                    return Err(err(libc::ESTALE));
                }
                let mode = Mode::from_bits_truncate(st.st_mode & 0o7777);
                nix::sys::stat::fchmodat(
                    fd,
                    name.as_os_str(),
                    mode | Mode::S_IWUSR,
                    nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                )
                .map_err(nix_err)?;
                let f = open();
                let back = match &f {
                    Ok(f) => nix::sys::stat::fchmod(f.as_fd(), mode),
                    Err(_) => nix::sys::stat::fchmodat(
                        fd,
                        name.as_os_str(),
                        mode,
                        nix::sys::stat::FchmodatFlags::NoFollowSymlink,
                    ),
                };
                back.map_err(nix_err)?;
                f?
            }
            r => r?,
        };
        if !self.is_node_object(node, &nix::sys::stat::fstat(&f).map_err(nix_err)?) {
            return Err(err(libc::ESTALE));
        }
        Ok(f)
    }

    /// Links the name (parent, name) of an upper node into the upper, unless it is there.
    pub(crate) fn link_up_alias(&self, node: &Node, parent: &Node, name: &OsStr) -> io::Result<()> {
        self.copy_up(parent, Data::All)?;
        let udir = self.dir_in(parent, 0)?;
        if crate::layer::try_stat_at(udir.fd()?, name)?.is_some() {
            return Ok(());
        }
        let (sdir, sname) = self.parent_in(node, 0)?;
        parent.changed();
        nix::unistd::linkat(
            sdir.fd()?,
            sname.as_os_str(),
            udir.fd()?,
            name,
            AtFlags::empty(),
        )
        .map_err(nix_err)
    }

    pub(crate) fn build_copy(
        &self,
        src_dir: &LDir,
        name: &OsStr,
        st: &FileStat,
        work: BorrowedFd,
        tmp: &OsStr,
        mut data: Data,
    ) -> io::Result<Data> {
        match file_type(st) {
            libc::S_IFREG => {
                let dst = open_at(
                    work,
                    tmp,
                    OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
                    0o600,
                )?;
                if data == Data::Meta {
                    // The size and the marker; the bytes stay below (see `Data::Meta`).
                    nix::unistd::ftruncate(dst.as_fd(), st.st_size).map_err(nix_err)?;
                    let x = self.markers.metacopy_xattr();
                    match sys::setxattr(XTarget::Fd(dst.as_fd()), &x, b"", 0) {
                        Ok(()) => {}
                        // The upper cannot hold the marker: a full copy then.
                        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) => {
                            log::info!(
                                "metacopy: the upper refuses {}: {e}; copying data",
                                String::from_utf8_lossy(&x)
                            );
                            data = Data::All;
                        }
                        Err(e) => return Err(e),
                    }
                }
                if data == Data::All {
                    // Opened only when its bytes are wanted: for an image layer, opening
                    // fetches the content (O_TRUNC copy-ups fetch nothing).
                    let src = src_dir.open(name, OFlag::O_RDONLY)?;
                    copy_data(src.as_fd(), dst.as_fd(), st.st_size as u64)?;
                    // The bytes reach the disk before the rename can: otherwise a crash
                    // after the rename commits (any fsync on the upper fs commits it) leaves
                    // an upper copy without data that hides the intact lower file. An
                    // ordering barrier is enough for that (no journal commit per copy-up,
                    // where kernel overlayfs fsyncs each one); `fsync=0`/`volatile` skip it.
                    if self.behaviour.fsync {
                        sys::write_out(dst.as_fd(), !self.upper_orders_data)?;
                    }
                }
            }
            libc::S_IFDIR => nix::sys::stat::mkdirat(work, tmp, Mode::from_bits_truncate(0o700))
                .map_err(nix_err)?,
            libc::S_IFLNK => {
                let target = src_dir.readlink(name)?;
                nix::unistd::symlinkat(target.as_os_str(), work, tmp).map_err(nix_err)?;
            }
            t => {
                let kind = SFlag::from_bits_truncate(t);
                nix::sys::stat::mknodat(
                    work,
                    tmp,
                    kind,
                    Mode::from_bits_truncate(0o600),
                    st.st_rdev,
                )
                .map_err(nix_err)?;
            }
        }
        // Owner and mode before the xattrs: chown(2) drops security.capability (and chown
        // before chmod keeps setuid).
        let perm = (file_type(st) != libc::S_IFLNK).then_some(st.st_mode & 0o7777);
        self.set_owner_mode(work, tmp, st.st_uid, st.st_gid, perm)?;
        copy_xattrs(src_dir, name, XTarget::At(work, tmp))?;
        let times = [
            TimeSpec::new(st.st_atime, st.st_atime_nsec),
            TimeSpec::new(st.st_mtime, st.st_mtime_nsec),
        ];
        nix::sys::stat::utimensat(
            work,
            tmp,
            &times[0],
            &times[1],
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(nix_err)?;
        Ok(data)
    }
}

/// The times of a metacopy whose bytes are being copied in (atime and mtime, seconds and
/// nanoseconds, 4 × i64 little-endian): written before the first byte, removed after the
/// marker. Found on a metacopy, it means a crash interrupted the copy: the times are put
/// back from it (`restore_fill_times`).
pub const FILL_TIMES: &[u8] = b"user.unionmount.filltimes";

fn encode_times(st: &FileStat) -> Vec<u8> {
    [st.st_atime, st.st_atime_nsec, st.st_mtime, st.st_mtime_nsec]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// After a crash during the copy of a metacopy's bytes (see `FILL_TIMES`): puts its times
/// back and drops the record. `dir`/`name` is the metacopy in the upper. Returns whether
/// there was a record.
pub fn restore_fill_times(dir: &LDir, name: &OsStr) -> io::Result<bool> {
    let Some(v) = dir.getxattr(Some(name), FILL_TIMES).or_else(|e| {
        if matches!(e.raw_os_error(), Some(libc::ENOTSUP | libc::EPERM)) {
            Ok(None)
        } else {
            Err(e)
        }
    })?
    else {
        return Ok(false);
    };
    if v.len() == 32 {
        let n = |i: usize| i64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().unwrap_or_default());
        nix::sys::stat::utimensat(
            dir.fd()?,
            name,
            &TimeSpec::new(n(0), n(1)),
            &TimeSpec::new(n(2), n(3)),
            UtimensatFlags::NoFollowSymlink,
        )
        .map_err(nix_err)?;
    }
    log::info!(
        "{}: copy of its bytes was interrupted; times restored",
        super::show(name)
    );
    sys::removexattr(XTarget::At(dir.fd()?, name), FILL_TIMES)?;
    Ok(true)
}

/// Is this xattr one of the overlay's own (never copied, never shown)? Escaped user names
/// (`trusted.overlay.overlay.*`) are user data and do travel.
pub fn is_private_xattr(name: &[u8]) -> bool {
    for p in [&b"trusted.overlay."[..], b"user.overlay."] {
        if let Some(rest) = name.strip_prefix(p) {
            return !rest.starts_with(b"overlay.");
        }
    }
    name.starts_with(b"user.fuseoverlayfs.") || name.starts_with(b"user.unionmount.")
}

fn copy_xattrs(src_dir: &LDir, src: &OsStr, dst: XTarget) -> io::Result<()> {
    let names = match src_dir.listxattr(Some(src)) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => {
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        if is_private_xattr(name) {
            continue;
        }
        let Some(value) = src_dir.getxattr(Some(src), name)? else {
            continue;
        };
        match sys::setxattr(dst, name, &value, 0) {
            Ok(()) => {}
            // The upper's filesystem cannot hold it (e.g. no user.* on a symlink): skip,
            // as overlayfs does for EOPNOTSUPP.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::EPERM)) => {
                log::debug!(
                    "copy-up: skipping xattr {}: {e}",
                    String::from_utf8_lossy(name)
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `len` bytes keeping holes: a reflink when the filesystem can, else each data
/// segment with copy_file_range (read/write as the last resort), then sets the size.
pub fn copy_data(src: BorrowedFd, dst: BorrowedFd, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    if sys::ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut pos: i64 = 0;
    let end = len as i64;
    while pos < end {
        let data = match sys::lseek(src, pos, libc::SEEK_DATA) {
            Ok(d) => d,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => pos, // no hole support
            Err(e) => return Err(e),
        };
        let hole = match sys::lseek(src, data, libc::SEEK_HOLE) {
            Ok(h) => h.min(end),
            Err(_) => end,
        };
        copy_range(src, dst, data, hole - data)?;
        pos = hole;
    }
    nix::unistd::ftruncate(dst, end).map_err(nix_err)
}

fn copy_range(src: BorrowedFd, dst: BorrowedFd, off: i64, len: i64) -> io::Result<()> {
    let (mut off_in, mut off_out) = (off, off);
    let mut left = len as usize;
    while left > 0 {
        match nix::fcntl::copy_file_range(src, Some(&mut off_in), dst, Some(&mut off_out), left) {
            Ok(0) => break,
            Ok(n) => left -= n,
            Err(nix::Error::EXDEV) | Err(nix::Error::EINVAL) | Err(nix::Error::EOPNOTSUPP) => {
                return copy_range_rw(src, dst, off_in, left);
            }
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(nix_err(e)),
        }
    }
    Ok(())
}

fn copy_range_rw(
    src: BorrowedFd,
    dst: BorrowedFd,
    mut off: i64,
    mut left: usize,
) -> io::Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    while left > 0 {
        let want = left.min(buf.len());
        let n = nix::sys::uio::pread(src, &mut buf[..want], off).map_err(nix_err)?;
        if n == 0 {
            break;
        }
        let mut done = 0;
        while done < n {
            done +=
                nix::sys::uio::pwrite(dst, &buf[done..n], off + done as i64).map_err(nix_err)?;
        }
        off += n as i64;
        left -= n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_xattrs() {
        assert!(is_private_xattr(b"trusted.overlay.opaque"));
        assert!(is_private_xattr(b"user.overlay.origin"));
        assert!(is_private_xattr(b"user.fuseoverlayfs.opaque"));
        assert!(is_private_xattr(b"user.unionmount.x"));
        assert!(!is_private_xattr(b"trusted.overlay.overlay.foo"));
        assert!(!is_private_xattr(b"user.foo"));
        assert!(!is_private_xattr(b"security.capability"));
    }
}
