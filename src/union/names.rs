//! Namespace operations (DESIGN 2.4): create, mkdir, mknod, symlink, link, unlink, rmdir,
//! rename, and setattr.
//!
//! The kernel has already checked permissions (`default_permissions`), sticky bits and the
//! type rules it can see; the kernel's VFS also holds the parent directories' locks, so two
//! namespace operations on the same directory never run here at once.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;

use super::copyup::Data;
use super::node::{Found, Node, NodeId};
use super::{Attr, ChildRef, Ctx, Union, err, nix_err};
use crate::layer::{RealId, file_type, is_dir, open_at, stat_at, try_stat_at};

/// What to make in `create_object`.
pub enum NewObject<'a> {
    File {
        perm: u32,
    },
    Dir {
        perm: u32,
    },
    Node {
        kind: u32,
        perm: u32,
        rdev: u64,
    },
    Symlink {
        target: &'a OsStr,
    },
    /// A hard link to an upper object: (its upper dir, its name).
    Link {
        dir: BorrowedFd<'a>,
        name: &'a OsStr,
    },
}

impl NewObject<'_> {
    fn kind(&self) -> u32 {
        match self {
            NewObject::File { .. } => libc::S_IFREG,
            NewObject::Dir { .. } => libc::S_IFDIR,
            NewObject::Node { kind, .. } => *kind,
            NewObject::Symlink { .. } => libc::S_IFLNK,
            NewObject::Link { .. } => libc::S_IFREG,
        }
    }

    /// Makes the object; a regular file comes back open read-write (the creator may open
    /// what it creates whatever its mode).
    fn make(&self, dir: BorrowedFd, name: &OsStr) -> io::Result<Option<OwnedFd>> {
        match self {
            NewObject::File { perm } => open_at(
                dir,
                name,
                OFlag::O_RDWR | OFlag::O_CREAT | OFlag::O_EXCL,
                *perm,
            )
            .map(Some),
            other => other.make_other(dir, name).map(|()| None),
        }
    }

    fn make_other(&self, dir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        match self {
            NewObject::File { .. } => Err(err(libc::EINVAL)),
            NewObject::Dir { perm } => {
                nix::sys::stat::mkdirat(dir, name, Mode::from_bits_truncate(*perm)).map_err(nix_err)
            }
            NewObject::Node { kind, perm, rdev } => nix::sys::stat::mknodat(
                dir,
                name,
                SFlag::from_bits_truncate(*kind),
                Mode::from_bits_truncate(*perm),
                *rdev,
            )
            .map_err(nix_err),
            NewObject::Symlink { target } => {
                nix::unistd::symlinkat(*target, dir, name).map_err(nix_err)
            }
            NewObject::Link {
                dir: src,
                name: src_name,
            } => nix::unistd::linkat(*src, *src_name, dir, name, AtFlags::empty()).map_err(nix_err),
        }
    }

    fn perm(&self) -> Option<u32> {
        match self {
            NewObject::File { perm } | NewObject::Dir { perm } | NewObject::Node { perm, .. } => {
                Some(*perm)
            }
            _ => None,
        }
    }
}

impl Union {
    /// Makes a new object at (parent, name) in the upper, owned by the caller, replacing a
    /// whiteout atomically through the workdir; returns the bound node and its attributes.
    pub fn create_object(
        &self,
        ctx: &Ctx,
        parent: NodeId,
        name: &OsStr,
        obj: NewObject,
    ) -> io::Result<(Arc<Node>, Attr, Option<OwnedFd>)> {
        self.check_new_name(name)?;
        if let NewObject::Node {
            kind: libc::S_IFCHR,
            rdev: 0,
            ..
        } = obj
        {
            // A 0/0 character device is a whiteout: overlayfs refuses to make one.
            return Err(err(libc::EPERM));
        }
        let pnode = self.nodes.get(parent)?;
        if !pnode.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        self.copy_up(&pnode, Data::All)?;
        let uldir = self.dir_in(&pnode, 0)?;
        let udir = uldir.fd()?;
        let slot = self.upper_entry(&uldir, name)?;
        if slot.object.is_some() {
            return Err(err(libc::EEXIST));
        }
        let pst = nix::sys::stat::fstat(udir).map_err(nix_err)?;
        let is_link = matches!(obj, NewObject::Link { .. });
        let kind = obj.kind();
        let parent_sgid = pst.st_mode & libc::S_ISGID != 0;
        let uid = self.uid_in(ctx.uid);
        let gid = if parent_sgid {
            pst.st_gid
        } else {
            self.gid_in(ctx.gid)
        };
        let perm = obj.perm().map(|p| {
            let mut p = p & 0o7777;
            if kind == libc::S_IFDIR && parent_sgid {
                p |= libc::S_ISGID;
            }
            if kind != libc::S_IFDIR && p & libc::S_ISGID != 0 && ctx.uid != 0 && gid != ctx.gid {
                // As inode_init_owner: no setgid file for a group the creator is not in.
                p &= !libc::S_ISGID;
            }
            p
        });
        let fix_owner = |dir: BorrowedFd, n: &OsStr| -> io::Result<()> {
            if is_link {
                return Ok(());
            }
            // The daemon runs with umask 0, so only setuid/setgid (cleared by chown) and the
            // setgid a workdir parent did not give need a chmod after the chown.
            let need_chmod = perm.filter(|p| p & 0o7000 != 0);
            self.set_owner_mode(dir, n, uid, gid, need_chmod)
        };
        let opened;
        if slot.whiteout {
            let work = self.work()?;
            let tmp = self.tmp_name();
            let built = obj.make(work, &tmp).and_then(|fd| {
                fix_owner(work, &tmp)?;
                if kind == libc::S_IFDIR {
                    self.markers.set_opaque(work, &tmp)?;
                }
                Ok(fd)
            });
            match built {
                Ok(fd) => opened = fd,
                Err(e) => {
                    let _ = super::remove_tree_at(work, &tmp);
                    return Err(e);
                }
            }
            if kind == libc::S_IFDIR {
                // rename(2) cannot put a directory over a non-directory: swap, then drop the
                // whiteout that ended up in the workdir.
                nix::fcntl::renameat2(
                    work,
                    tmp.as_os_str(),
                    udir,
                    name,
                    RenameFlags::RENAME_EXCHANGE,
                )
                .map_err(nix_err)?;
                let _ = super::remove_tree_at(work, &tmp);
            } else {
                nix::fcntl::renameat(work, tmp.as_os_str(), udir, name).map_err(nix_err)?;
            }
        } else {
            opened = obj.make(udir, name)?;
            if let Err(e) = fix_owner(udir, name).and_then(|()| {
                if kind == libc::S_IFDIR && slot.oci_whiteout {
                    self.markers.set_opaque(udir, name)?;
                }
                Ok(())
            }) {
                let _ = super::remove_tree_at(udir, name);
                return Err(e);
            }
        }
        if slot.oci_whiteout {
            self.unlink_oci_whiteout(udir, name)?;
        }
        let st = stat_at(udir, name)?;
        let found = Found {
            kind: file_type(&st),
            layers: vec![0],
            real: RealId::of(&st),
        };
        pnode.changed();
        let node = self.nodes.bind(parent, name.to_os_string(), found, true);
        let attr = self.finish_attr(&node, st);
        Ok((node, attr, opened))
    }

    /// link(2): copy the source up, then link it in the upper.
    pub fn link(
        &self,
        ctx: &Ctx,
        ino: NodeId,
        parent: NodeId,
        name: &OsStr,
    ) -> io::Result<(Arc<Node>, Attr)> {
        let node = self.nodes.get(ino)?;
        if node.is_dir() {
            return Err(err(libc::EPERM));
        }
        self.copy_up(&node, Data::All)?;
        let (sdir, sname) = self.parent_in(&node, 0)?;
        // The new name is the same upper inode, hence the same node.
        let (linked, attr, _) = self.create_object(
            ctx,
            parent,
            name,
            NewObject::Link {
                dir: sdir.fd()?,
                name: &sname,
            },
        )?;
        Ok((linked, attr))
    }

    /// unlink(2) and rmdir(2).
    pub fn remove(&self, parent: NodeId, name: &OsStr, dir: bool) -> io::Result<()> {
        if !self.has_upper {
            return Err(err(libc::EROFS));
        }
        let pnode = self.nodes.get(parent)?;
        let child = self
            .child_node(&pnode, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        let child_is_dir = child.kind() == libc::S_IFDIR;
        match (dir, child_is_dir) {
            (true, false) => return Err(err(libc::ENOTDIR)),
            (false, true) => return Err(err(libc::EISDIR)),
            _ => {}
        }
        if dir && !self.merged_dir_is_empty(&pnode, name, &child)? {
            return Err(err(libc::ENOTEMPTY));
        }
        if let ChildRef::Bound(n) = &child {
            self.pin_handles(n.id)?;
        }
        self.copy_up(&pnode, Data::All)?;
        let udir = self.dir_in(&pnode, 0)?;
        let udir = udir.fd()?;
        let layers = child.layers();
        let in_upper = layers.first().is_some_and(|&l| self.is_upper(l));
        if in_upper {
            // Something below shows through once the upper object goes: a whiteout stays.
            // (A lower-only child always gets one; there is nothing to scan for.)
            let below =
                layers.iter().any(|&l| !self.is_upper(l)) || self.lower_positive(&pnode, name)?;
            self.forget_if_last_link(udir, name)?;
            if below {
                self.replace_with_whiteout(udir, name)?;
            } else {
                if dir {
                    let sub = open_at(udir, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
                    super::whiteout::clear_markers(sub.as_fd())?;
                }
                let flag = if dir {
                    UnlinkatFlags::RemoveDir
                } else {
                    UnlinkatFlags::NoRemoveDir
                };
                nix::unistd::unlinkat(udir, name, flag).map_err(nix_err)?;
            }
        } else {
            self.markers.make_whiteout(udir, name)?;
        }
        pnode.changed();
        self.nodes.unbind(parent, &name.to_os_string());
        Ok(())
    }

    /// An upper object about to be deleted: if this is its last name, its inode number may
    /// be reused by the filesystem, so it must not keep our `st_ino`.
    fn forget_if_last_link(&self, udir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        if let Some(st) = try_stat_at(udir, name)?
            && (st.st_nlink <= 1 || is_dir(&st))
            && !super::whiteout::is_chardev_whiteout(&st)
        {
            self.nodes.inos.forget(RealId::of(&st));
        }
        Ok(())
    }

    /// Atomically swaps the upper object at `name` for a whiteout and deletes the object.
    fn replace_with_whiteout(&self, udir: BorrowedFd, name: &OsStr) -> io::Result<()> {
        let work = self.work()?;
        let tmp = self.tmp_name();
        if self.markers.whiteout_in_work(&tmp)? {
            match nix::fcntl::renameat2(
                work,
                tmp.as_os_str(),
                udir,
                name,
                RenameFlags::RENAME_EXCHANGE,
            ) {
                Ok(()) => return super::remove_tree_at(work, &tmp),
                Err(_) => {
                    let _ =
                        nix::unistd::unlinkat(work, tmp.as_os_str(), UnlinkatFlags::NoRemoveDir);
                }
            }
        }
        let wh_atomic = self
            .markers
            .chardev
            .load(std::sync::atomic::Ordering::Relaxed)
            && nix::fcntl::renameat2(
                udir,
                name,
                work,
                tmp.as_os_str(),
                RenameFlags::RENAME_WHITEOUT,
            )
            .is_ok();
        if !wh_atomic {
            nix::fcntl::renameat(udir, name, work, tmp.as_os_str()).map_err(nix_err)?;
            self.markers.make_whiteout(udir, name)?;
        }
        super::remove_tree_at(work, &tmp)
    }

    fn merged_dir_is_empty(
        &self,
        parent: &Node,
        name: &OsStr,
        child: &ChildRef,
    ) -> io::Result<bool> {
        let layers = child.layers();
        let ppath = self.path_of(parent)?;
        let path = if ppath.as_os_str() == "." {
            name.into()
        } else {
            ppath.join(name)
        };
        let fds = layers
            .iter()
            .map(|&li| self.layers[li].open_dir(&path))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(self.merge_listing(&layers, &fds)?.is_empty())
    }

    /// rename(2) / renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE.
    pub fn rename(
        &self,
        p1: NodeId,
        n1: &OsStr,
        p2: NodeId,
        n2: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        if flags & !(libc::RENAME_NOREPLACE | libc::RENAME_EXCHANGE) != 0 || (noreplace && exchange)
        {
            return Err(err(libc::EINVAL));
        }
        if !self.has_upper {
            return Err(err(libc::EROFS));
        }
        self.check_new_name(n2)?;
        let pn1 = self.nodes.get(p1)?;
        let pn2 = self.nodes.get(p2)?;
        let src = self
            .child_node(&pn1, n1)?
            .ok_or_else(|| err(libc::ENOENT))?;
        let dst = self.child_node(&pn2, n2)?;
        if p1 == p2 && n1 == n2 {
            return Ok(());
        }
        if noreplace && dst.is_some() {
            return Err(err(libc::EEXIST));
        }
        if exchange && dst.is_none() {
            return Err(err(libc::ENOENT));
        }
        if !exchange && let Some(ChildRef::Bound(n)) = &dst {
            self.pin_handles(n.id)?;
        }
        let has_lower = |c: &ChildRef| c.layers().iter().any(|&l| !self.is_upper(l));
        let src_dir = src.kind() == libc::S_IFDIR;
        if src_dir && has_lower(&src) {
            // No redirect_dir: a directory that exists below cannot move.
            return Err(err(libc::EXDEV));
        }
        if let Some(d) = &dst {
            let dst_dir = d.kind() == libc::S_IFDIR;
            if exchange {
                if dst_dir && has_lower(d) {
                    return Err(err(libc::EXDEV));
                }
            } else {
                match (src_dir, dst_dir) {
                    (true, false) => return Err(err(libc::ENOTDIR)),
                    (false, true) => return Err(err(libc::EISDIR)),
                    (true, true) if !self.merged_dir_is_empty(&pn2, n2, d)? => {
                        return Err(err(libc::ENOTEMPTY));
                    }
                    _ => {}
                }
            }
        }
        let src_node = self.bound_or_temp(&pn1, n1, src)?;
        self.copy_up(&src_node, Data::All)?;
        self.copy_up(&pn2, Data::All)?;
        let dst_kind = dst.as_ref().map(ChildRef::kind);
        if exchange && let Some(d) = dst {
            let n = self.bound_or_temp(&pn2, n2, d)?;
            self.copy_up(&n, Data::All)?;
        }
        let ul1 = self.dir_in(&pn1, 0)?;
        let ul2 = self.dir_in(&pn2, 0)?;
        let (u1, u2) = (ul1.fd()?, ul2.fd()?);

        // As overlayfs: a pure-upper directory moved into a merged directory is marked
        // opaque, so that nothing below its new name can ever show through it. (Both parents
        // are in the upper now, so anything below a name makes its parent merged.)
        if exchange {
            nix::fcntl::renameat2(u1, n1, u2, n2, RenameFlags::RENAME_EXCHANGE).map_err(nix_err)?;
            if src_dir && self.is_merged(&pn2) {
                self.markers.set_opaque(u2, n2)?;
            }
            if dst_kind == Some(libc::S_IFDIR) && self.is_merged(&pn1) {
                self.markers.set_opaque(u1, n1)?;
            }
            pn1.changed();
            pn2.changed();
            self.nodes
                .exchange(p1, &n1.to_os_string(), p2, &n2.to_os_string());
            return Ok(());
        }

        let below_src = self.lower_positive(&pn1, n1)?;
        let dslot = self.upper_entry(&ul2, n2)?;
        if let Some(st) = dslot.object.as_ref().filter(|st| is_dir(st)) {
            self.replace_with_empty(&ul2, n2, st)?;
        }
        let below_dst = src_dir && self.is_merged(&pn2);
        if below_dst {
            // Opaque before it moves, so that a crash can never show it merged with what is
            // below its new name. It is a pure upper dir: at its old name the mark hides
            // nothing.
            self.markers.set_opaque(u1, n1)?;
        }
        let mut done = false;
        if src_dir && dslot.whiteout {
            // A directory cannot replace a non-directory. A char-device whiteout is swapped
            // with it in one step (the whiteout lands at the old name, where it stays if
            // something is below, else goes); other dialects are dropped first.
            let chardev = crate::layer::try_stat_at(u2, n2)?
                .is_some_and(|st| super::whiteout::is_chardev_whiteout(&st));
            if chardev
                && nix::fcntl::renameat2(u1, n1, u2, n2, RenameFlags::RENAME_EXCHANGE).is_ok()
            {
                done = true;
                if !below_src {
                    nix::unistd::unlinkat(u1, n1, UnlinkatFlags::NoRemoveDir).map_err(nix_err)?;
                }
            } else {
                nix::unistd::unlinkat(u2, n2, UnlinkatFlags::NoRemoveDir).map_err(nix_err)?;
            }
        }
        if dst_kind.is_some() {
            self.forget_if_last_link(u2, n2)?;
        }
        if !done
            && below_src
            && self
                .markers
                .chardev
                .load(std::sync::atomic::Ordering::Relaxed)
        {
            done = nix::fcntl::renameat2(u1, n1, u2, n2, RenameFlags::RENAME_WHITEOUT).is_ok();
        }
        if !done {
            nix::fcntl::renameat(u1, n1, u2, n2).map_err(nix_err)?;
            if below_src {
                self.markers.make_whiteout(u1, n1)?;
            }
        }
        if dslot.oci_whiteout {
            self.unlink_oci_whiteout(u2, n2)?;
        }
        pn1.changed();
        pn2.changed();
        self.nodes
            .rebind(p1, &n1.to_os_string(), p2, n2.to_os_string());
        if src_dir {
            src_node.write().layers = vec![0];
        }
        Ok(())
    }

    /// Makes upper directory `name` of `udir` (whose merged view is empty, but which may
    /// hold whiteouts and markers) a really empty directory, as overlayfs does before a
    /// directory is renamed over it: an empty opaque copy (owner, mode, xattrs, times) is
    /// made in the workdir and exchanged with it in one step, then the old one is removed
    /// there. A crash at any point leaves the name showing the same empty directory (the
    /// workdir is cleaned at the next mount), never one whose whiteouts are half gone.
    fn replace_with_empty(
        &self,
        udir: &super::LDir,
        name: &OsStr,
        st: &nix::sys::stat::FileStat,
    ) -> io::Result<()> {
        let u = udir.fd()?;
        let sub = open_at(u, name, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        if crate::union::readdir::list_names(sub.as_fd())?.is_empty() {
            return Ok(());
        }
        let work = self.work()?;
        let tmp = self.tmp_name();
        self.build_copy(udir, name, st, work, &tmp, Data::None)?;
        let swapped = self.markers.set_opaque(work, &tmp).and_then(|()| {
            nix::fcntl::renameat2(work, tmp.as_os_str(), u, name, RenameFlags::RENAME_EXCHANGE)
                .map_err(nix_err)
        });
        if let Err(e) = swapped {
            let _ = nix::unistd::unlinkat(work, tmp.as_os_str(), UnlinkatFlags::RemoveDir);
            return Err(e);
        }
        // `tmp` is now the old directory, with the whiteouts and markers.
        super::whiteout::clear_markers(sub.as_fd())?;
        nix::unistd::unlinkat(work, tmp.as_os_str(), UnlinkatFlags::RemoveDir).map_err(nix_err)
    }

    /// Does this directory merge an upper with at least one lower layer?
    fn is_merged(&self, dir: &Node) -> bool {
        let l = dir.layers();
        l.len() > 1 && self.is_upper(l[0])
    }

    /// The node for a child: the bound one, or a temporary node (not visible to the kernel)
    /// so that copy-up can work on it.
    fn bound_or_temp(&self, parent: &Node, name: &OsStr, c: ChildRef) -> io::Result<Arc<Node>> {
        match c {
            ChildRef::Bound(n) => Ok(n),
            ChildRef::Unbound(found) => {
                // Bound so that copy-up can find its parent, but not a kernel reference: a
                // later kernel lookup of the name picks it up and counts from there.
                let upper = self.is_upper(found.layers[0]);
                let n = self
                    .nodes
                    .bind(parent.id, name.to_os_string(), found, upper);
                n.nlookup.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                Ok(n)
            }
        }
    }

    /// setattr: chmod, chown, truncate, utimens. Copies up first (no data for truncate to 0,
    /// and only metadata for the rest with metacopy).
    #[allow(clippy::too_many_arguments)]
    pub fn setattr(
        &self,
        ino: NodeId,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSpec>,
        mtime: Option<TimeSpec>,
        fh: Option<u64>,
    ) -> io::Result<Attr> {
        let node = self.nodes.get(ino)?;
        let data = match size {
            None => Data::Meta,
            Some(0) if mode.is_none() && uid.is_none() && gid.is_none() => Data::None,
            Some(_) => Data::All,
        };
        self.copy_up(&node, data)?;
        // A racing unlink or rename may have put a whiteout or another object at the name
        // (see `is_node_object`): never change that one, look again (a few times) where the
        // table then says the node is. Nothing below follows a symlink.
        let target = super::retry_stale(|| {
            let (dir, name) = self.parent_in(&node, 0)?;
            let st = stat_at(dir.fd()?, &name).map_err(super::io_stale)?;
            if !self.is_node_object(&node, &st) {
                return Err(err(libc::ESTALE));
            }
            Ok((dir, name))
        });
        let (dir, name) = match target {
            Ok(v) => v,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESTALE)) => {
                // Open but unlinked, or its name keeps holding something else: no name
                // reaches it, an open fd still does, as the inode the kernel resolved does on
                // a local filesystem (the writeback cache flushes times with SETATTR on
                // fsync; without atomic_o_trunc, open(O_TRUNC) truncates with a SETATTR that
                // has no handle, after the open, so a writable one of its handles must do).
                // Only ever an upper file: a handle reading a lower file must not let a
                // metadata change through to the lower file.
                let file = fh
                    .and_then(|f| self.handle_file(f).ok())
                    .filter(|(_, upper)| *upper)
                    .map(|(f, _)| f)
                    .or_else(|| match size {
                        Some(_) => self.writable_file_of(&node),
                        None => self.open_file_where(&node, |h| h.is_upper()),
                    })
                    .ok_or(e)?;
                return self.setattr_unlinked(&node, &file, mode, uid, gid, size, atime, mtime);
            }
            Err(e) => return Err(e),
        };
        let dir = dir.fd()?;
        if uid.is_some() || gid.is_some() {
            nix::unistd::fchownat(
                dir,
                name.as_os_str(),
                uid.map(|u| nix::unistd::Uid::from_raw(self.uid_in(u))),
                gid.map(|g| nix::unistd::Gid::from_raw(self.gid_in(g))),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(nix_err)?;
        }
        if let Some(m) = mode {
            if node.kind == libc::S_IFLNK {
                return Err(err(libc::EOPNOTSUPP));
            }
            nix::sys::stat::fchmodat(
                dir,
                name.as_os_str(),
                Mode::from_bits_truncate(m & 0o7777),
                nix::sys::stat::FchmodatFlags::NoFollowSymlink,
            )
            .map_err(nix_err)?;
        }
        if let Some(sz) = size {
            if node.is_dir() {
                return Err(err(libc::EISDIR));
            }
            match fh.and_then(|f| self.handle_file(f).ok()) {
                Some((file, true)) => {
                    nix::unistd::ftruncate(file.as_fd(), sz as i64).map_err(nix_err)?
                }
                _ => {
                    let f = open_at(dir, &name, OFlag::O_WRONLY | OFlag::O_NONBLOCK, 0)?;
                    let st = nix::sys::stat::fstat(&f).map_err(nix_err)?;
                    if !self.is_node_object(&node, &st) {
                        return Err(err(libc::ESTALE));
                    }
                    nix::unistd::ftruncate(&f, sz as i64).map_err(nix_err)?;
                }
            }
        }
        if atime.is_some() || mtime.is_some() {
            let omit = TimeSpec::new(0, libc::UTIME_OMIT);
            nix::sys::stat::utimensat(
                dir,
                name.as_os_str(),
                &atime.unwrap_or(omit),
                &mtime.unwrap_or(omit),
                UtimensatFlags::NoFollowSymlink,
            )
            .map_err(nix_err)?;
        }
        self.getattr(&node)
    }

    /// setattr through an open file of the node, when no name of it reaches it.
    #[allow(clippy::too_many_arguments)]
    fn setattr_unlinked(
        &self,
        node: &Node,
        file: &std::fs::File,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeSpec>,
        mtime: Option<TimeSpec>,
    ) -> io::Result<Attr> {
        let fd = file.as_fd();
        if uid.is_some() || gid.is_some() {
            nix::unistd::fchown(
                fd,
                uid.map(|u| nix::unistd::Uid::from_raw(self.uid_in(u))),
                gid.map(|g| nix::unistd::Gid::from_raw(self.gid_in(g))),
            )
            .map_err(nix_err)?;
        }
        if let Some(m) = mode {
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(m & 0o7777)).map_err(nix_err)?;
        }
        if let Some(sz) = size {
            nix::unistd::ftruncate(fd, sz as i64).map_err(nix_err)?;
        }
        if atime.is_some() || mtime.is_some() {
            let omit = TimeSpec::new(0, libc::UTIME_OMIT);
            nix::sys::stat::futimens(fd, &atime.unwrap_or(omit), &mtime.unwrap_or(omit))
                .map_err(nix_err)?;
        }
        let st = nix::sys::stat::fstat(fd).map_err(nix_err)?;
        Ok(self.finish_attr(node, st))
    }
}
