//! Extended attributes through the union (DESIGN 2.7).
//!
//! The overlay's own names (`trusted.overlay.*`, `user.overlay.*`, `user.fuseoverlayfs.*`,
//! `user.unionmount.*`) are never shown. A user's `trusted.overlay.X` / `user.overlay.X` is
//! stored escaped as `trusted.overlay.overlay.X` / `user.overlay.overlay.X` (as the kernel
//! does), so container storage nested on top of a mount works.

use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;

use super::copyup::Data;
use super::node::NodeId;
use super::{Ctx, Union, err};
use crate::sys::{self, XTarget};

const ESCAPABLE: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
const PRIVATE: [&[u8]; 2] = [b"user.fuseoverlayfs.", b"user.unionmount."];

/// The name stored in the layer for a name the user asked for; None if the user may not
/// touch it at all.
pub fn stored_name(name: &[u8]) -> Option<Vec<u8>> {
    for p in ESCAPABLE {
        if let Some(rest) = name.strip_prefix(p) {
            let mut v = p.to_vec();
            v.extend_from_slice(b"overlay.");
            v.extend_from_slice(rest);
            return Some(v);
        }
    }
    if PRIVATE.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    Some(name.to_vec())
}

/// The name a user sees for a stored name; None for the overlay's own.
pub fn shown_name(stored: &[u8]) -> Option<Vec<u8>> {
    for p in ESCAPABLE {
        if let Some(rest) = stored.strip_prefix(p) {
            let unescaped = rest.strip_prefix(b"overlay.")?;
            let mut v = p.to_vec();
            v.extend_from_slice(unescaped);
            return Some(v);
        }
    }
    if PRIVATE.iter().any(|p| stored.starts_with(p)) {
        return None;
    }
    Some(stored.to_vec())
}

impl Union {
    fn xattrs_enabled(&self) -> io::Result<()> {
        if self.behaviour.noxattrs {
            return Err(err(libc::EOPNOTSUPP));
        }
        Ok(())
    }

    pub fn getxattr(&self, ino: NodeId, name: &OsStr) -> io::Result<Vec<u8>> {
        self.xattrs_enabled()?;
        let stored = stored_name(name.as_bytes()).ok_or_else(|| err(libc::ENODATA))?;
        let node = self.nodes.get(ino)?;
        let (dir, n) = self.parent_in(&node, node.top_layer())?;
        dir.getxattr(Some(&n), &stored)?
            .ok_or_else(|| err(libc::ENODATA))
    }

    /// The NUL-terminated list of names the user may see.
    pub fn listxattr(&self, ino: NodeId) -> io::Result<Vec<u8>> {
        self.xattrs_enabled()?;
        let node = self.nodes.get(ino)?;
        let (dir, n) = self.parent_in(&node, node.top_layer())?;
        let raw = dir.listxattr(Some(&n))?;
        let mut out = Vec::with_capacity(raw.len());
        for name in raw.split(|b| *b == 0).filter(|n| !n.is_empty()) {
            if let Some(shown) = shown_name(name) {
                out.extend_from_slice(&shown);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn setxattr(
        &self,
        ctx: &Ctx,
        ino: NodeId,
        name: &OsStr,
        value: &[u8],
        flags: i32,
    ) -> io::Result<()> {
        self.xattrs_enabled()?;
        let stored = stored_name(name.as_bytes()).ok_or_else(|| err(libc::EPERM))?;
        if (stored.starts_with(b"security.") || stored.starts_with(b"trusted.")) && ctx.uid != 0 {
            return Err(err(libc::EPERM));
        }
        let node = self.nodes.get(ino)?;
        if !self.has_upper {
            return Err(err(libc::EROFS));
        }
        self.copy_up(&node, Data::Meta)?;
        let (dir, n) = self.parent_in(&node, 0)?;
        sys::setxattr(XTarget::At(dir.fd()?, &n), &stored, value, flags)
    }

    pub fn removexattr(&self, ctx: &Ctx, ino: NodeId, name: &OsStr) -> io::Result<()> {
        self.xattrs_enabled()?;
        let stored = stored_name(name.as_bytes()).ok_or_else(|| err(libc::ENODATA))?;
        // The kernel refuses an explicit removal of `security.capability` without CAP_SETFCAP
        // over the file before it reaches us, and itself removes it, with the writer's ids,
        // when an unprivileged user writes, truncates or chowns a file with capabilities
        // (security_inode_killpriv): that removal must succeed, as on any filesystem.
        let privileged = stored.starts_with(b"security.") || stored.starts_with(b"trusted.");
        if privileged && stored != b"security.capability" && ctx.uid != 0 {
            return Err(err(libc::EPERM));
        }
        let node = self.nodes.get(ino)?;
        if !self.has_upper {
            return Err(err(libc::EROFS));
        }
        // Nothing to remove means nothing to copy up.
        self.getxattr(ino, name)?;
        self.copy_up(&node, Data::Meta)?;
        let (dir, n) = self.parent_in(&node, 0)?;
        sys::removexattr(XTarget::At(dir.fd()?, &n), &stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_round_trips() {
        assert_eq!(
            stored_name(b"trusted.overlay.foo").unwrap(),
            b"trusted.overlay.overlay.foo"
        );
        assert_eq!(
            stored_name(b"user.overlay.x").unwrap(),
            b"user.overlay.overlay.x"
        );
        assert_eq!(stored_name(b"user.foo").unwrap(), b"user.foo");
        assert_eq!(stored_name(b"user.fuseoverlayfs.opaque"), None);
        assert_eq!(stored_name(b"user.unionmount.a"), None);
        assert_eq!(
            shown_name(b"trusted.overlay.overlay.foo").unwrap(),
            b"trusted.overlay.foo"
        );
        assert_eq!(shown_name(b"trusted.overlay.opaque"), None);
        assert_eq!(shown_name(b"user.overlay.whiteout"), None);
        assert_eq!(shown_name(b"user.fuseoverlayfs.opaque"), None);
        assert_eq!(
            shown_name(b"security.capability").unwrap(),
            b"security.capability"
        );
    }
}
