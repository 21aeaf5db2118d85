//! Merged directory listings.
//!
//! A listing is built once per opendir from every layer the directory merges, top first:
//! the first layer that has a name decides it (an entry, or a whiteout that hides it below);
//! `.wh.NAME` hides NAME only in the layers below its own; markers are never shown. Offsets
//! are positions in the snapshot, so they stay stable for the life of the handle.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use nix::dir::{Dir, Type};

use crate::layer::{Layer, LayerIdx, RealId, file_type, open_at, try_stat_at};
use crate::union::node::InoTable;
use crate::union::whiteout::{self, OPAQUE_MARKER};

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: OsString,
    pub ino: u64,
    /// S_IFMT bits.
    pub kind: u32,
}

/// Every name in a directory except "." and "..", as the layer stores them.
pub fn list_names(dir: BorrowedFd) -> io::Result<Vec<OsString>> {
    Ok(raw_entries(dir)?.into_iter().map(|(n, _, _)| n).collect())
}

/// (name, d_ino, d_type) of every entry except "." and "..". Reads through a fresh open of
/// the directory: a `dup` would share the file offset with the caller's (possibly cached
/// and concurrently used) fd.
fn raw_entries(dir: BorrowedFd) -> io::Result<Vec<(OsString, u64, Option<Type>)>> {
    let fd: OwnedFd = open_at(
        dir,
        OsStr::new("."),
        nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_DIRECTORY,
        0,
    )?;
    let mut d = Dir::from_fd(fd).map_err(|e| io::Error::from_raw_os_error(e as i32))?;
    let mut out = Vec::new();
    for ent in d.iter() {
        let ent = ent.map_err(|e| io::Error::from_raw_os_error(e as i32))?;
        let name = ent.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        out.push((
            OsStr::from_bytes(name).to_os_string(),
            ent.ino(),
            ent.file_type(),
        ));
    }
    Ok(out)
}

fn type_bits(t: Type) -> u32 {
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

/// One layer's copy of a directory being listed.
pub struct LayerDir<'a> {
    pub idx: LayerIdx,
    pub layer: &'a Layer,
    pub fd: BorrowedFd<'a>,
}

/// Merges the listings of one directory across `dirs` (its open fd in each layer it
/// merges, top first). `marks` reads a directory's markers (cached for lower layers).
pub fn merge(
    dirs: &[LayerDir],
    inos: &InoTable,
    marks: impl Fn(BorrowedFd, LayerIdx) -> io::Result<whiteout::DirMarks>,
) -> io::Result<Vec<DirEntry>> {
    let mut decided: HashSet<OsString> = HashSet::new();
    let mut out = Vec::new();
    for d in dirs {
        let (layer, dir) = (d.layer, d.fd);
        let marks = marks(dir, d.idx)?;
        let mut hidden_below = Vec::new();
        for (name, d_ino, d_type) in raw_entries(dir)? {
            if name.as_bytes() == OPAQUE_MARKER {
                continue;
            }
            if let Some(target) = whiteout::oci_whiteout_target(&name) {
                hidden_below.push(target.to_os_string());
                continue;
            }
            if decided.contains(&name) {
                continue;
            }
            let mut kind = d_type.map(type_bits);
            let needs_stat = match kind {
                None => true,
                Some(libc::S_IFCHR) => true,
                Some(libc::S_IFREG) => marks.xattr_whiteouts,
                _ => false,
            };
            if needs_stat {
                let Some(st) = try_stat_at(dir, &name)? else {
                    continue;
                };
                kind = Some(file_type(&st));
                if whiteout::is_whiteout(dir, &marks, &name, &st)? {
                    decided.insert(name);
                    continue;
                }
            }
            let ino = inos.get(RealId {
                dev: layer.dev,
                ino: d_ino,
            });
            decided.insert(name.clone());
            out.push(DirEntry {
                name,
                ino,
                kind: kind.unwrap_or(libc::S_IFREG),
            });
        }
        decided.extend(hidden_below);
    }
    Ok(out)
}
