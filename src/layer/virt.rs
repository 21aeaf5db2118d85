//! Layers that are not directories on disk: a read-only tree served from an index (an image
//! layer in the store), seen by the union through `VirtualLayer`.
//!
//! Contract for an implementation:
//! - entries are numbered; `root()` is the root directory; numbers are stable for the
//!   life of the layer and `stat(id).st_ino` is the same for every name of one hard-linked
//!   object (the union keys identity on (st_dev, st_ino)), `st_dev` being `dev()`;
//! - whiteouts and opaque markers appear as they do in an OCI layer directory: an empty
//!   regular file `.wh.NAME` hides NAME below, an entry `.wh..wh..opq` makes its directory
//!   opaque (the union reads that dialect in every layer);
//! - names are single components (no '/', not "." or ".."), as the union asks for them;
//! - `open` gives a read-only fd whose bytes are the file's verified content, or an error
//!   (EIO when the content cannot be fetched or does not verify); the layer never hands out
//!   unverified bytes.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::OwnedFd;

use nix::sys::stat::FileStat;

pub type EntryId = u64;

pub trait VirtualLayer: Send + Sync + std::fmt::Debug {
    /// The device number the layer reports in `st_dev` (unique among the union's layers).
    fn dev(&self) -> u64;
    fn root(&self) -> EntryId;
    /// The entry `name` in directory `dir`; None when absent. ENOTDIR when `dir` is not one.
    fn lookup(&self, dir: EntryId, name: &OsStr) -> io::Result<Option<EntryId>>;
    fn stat(&self, id: EntryId) -> io::Result<FileStat>;
    /// (name, st_ino, S_IFMT bits) of every entry of a directory except "." and "..".
    fn entries(&self, dir: EntryId) -> io::Result<Vec<(OsString, u64, u32)>>;
    fn readlink(&self, id: EntryId) -> io::Result<OsString>;
    /// Every extended attribute as (name, value).
    fn xattrs(&self, id: EntryId) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// A read-only fd with the content of regular file `id`.
    fn open(&self, id: EntryId) -> io::Result<OwnedFd>;
}

/// Sets the access, modification and change times of `st` to `mtime_ns` (ns since the
/// epoch, possibly negative): a layer from a tar records one time per entry.
pub fn set_times(st: &mut FileStat, mtime_ns: i64) {
    let (s, ns) = (
        mtime_ns.div_euclid(1_000_000_000),
        mtime_ns.rem_euclid(1_000_000_000),
    );
    (st.st_mtime, st.st_mtime_nsec) = (s, ns);
    (st.st_atime, st.st_atime_nsec) = (s, ns);
    (st.st_ctime, st.st_ctime_nsec) = (s, ns);
}
