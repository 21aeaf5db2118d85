//! The only module with `unsafe`: thin wrappers over system calls that neither std nor nix
//! expose safely (xattrs on O_PATH objects, fork, umount2, FICLONE, mknod of whiteouts), and
//! the zlib inflate calls gzip random access needs (`zlib`).
//!
//! Invariants: every function returns `io::Result` carrying the raw errno; nothing here
//! follows a symlink stored in a layer (xattr calls use the `l*` variants on a
//! `/proc/self/fd/<dirfd>/<name>` path, where `name` is one checked component).

pub mod zlib;

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Where an xattr call is aimed: an fd opened for I/O (regular file or directory), or a
/// name inside a directory fd (any file type, never followed if it is a symlink).
#[derive(Clone, Copy)]
pub enum XTarget<'a> {
    Fd(BorrowedFd<'a>),
    At(BorrowedFd<'a>, &'a OsStr),
}

fn proc_path(dir: RawFd, name: &OsStr) -> io::Result<CString> {
    let mut p = format!("/proc/self/fd/{dir}/").into_bytes();
    p.extend_from_slice(name.as_bytes());
    cstr(&p)
}

/// getxattr; a `size` of 0 asks for the length only.
pub fn getxattr(t: XTarget, name: &[u8], buf: &mut [u8]) -> io::Result<usize> {
    let n = cstr(name)?;
    let ptr = buf.as_mut_ptr() as *mut libc::c_void;
    match t {
        // SAFETY: fd is a live descriptor; n is NUL-terminated; buf is valid for buf.len() bytes.
        XTarget::Fd(fd) => {
            check_size(unsafe { libc::fgetxattr(fd.as_raw_fd(), n.as_ptr(), ptr, buf.len()) })
        }
        XTarget::At(dir, name_in) => {
            let p = proc_path(dir.as_raw_fd(), name_in)?;
            // SAFETY: p and n are NUL-terminated; buf is valid for buf.len() bytes.
            check_size(unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), ptr, buf.len()) })
        }
    }
}

/// Reads a whole xattr value, or None when it does not exist (ENODATA).
pub fn getxattr_vec(t: XTarget, name: &[u8]) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; 256];
    loop {
        match getxattr(t, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                let need = getxattr(t, name, &mut [])?;
                buf.resize(need.max(buf.len() * 2), 0);
            }
            Err(e) => return Err(e),
        }
    }
}

pub fn setxattr(t: XTarget, name: &[u8], value: &[u8], flags: i32) -> io::Result<()> {
    let n = cstr(name)?;
    let v = value.as_ptr() as *const libc::c_void;
    match t {
        // SAFETY: fd is live; n is NUL-terminated; value is valid for value.len() bytes.
        XTarget::Fd(fd) => {
            check(unsafe { libc::fsetxattr(fd.as_raw_fd(), n.as_ptr(), v, value.len(), flags) })
                .map(drop)
        }
        XTarget::At(dir, name_in) => {
            let p = proc_path(dir.as_raw_fd(), name_in)?;
            // SAFETY: p and n are NUL-terminated; value is valid for value.len() bytes.
            check(unsafe { libc::lsetxattr(p.as_ptr(), n.as_ptr(), v, value.len(), flags) })
                .map(drop)
        }
    }
}

pub fn removexattr(t: XTarget, name: &[u8]) -> io::Result<()> {
    let n = cstr(name)?;
    match t {
        // SAFETY: fd is live; n is NUL-terminated.
        XTarget::Fd(fd) => {
            check(unsafe { libc::fremovexattr(fd.as_raw_fd(), n.as_ptr()) }).map(drop)
        }
        XTarget::At(dir, name_in) => {
            let p = proc_path(dir.as_raw_fd(), name_in)?;
            // SAFETY: p and n are NUL-terminated.
            check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
        }
    }
}

/// The raw NUL-separated list of xattr names.
pub fn listxattr(t: XTarget) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; 1024];
    loop {
        let ptr = buf.as_mut_ptr() as *mut libc::c_char;
        let r = match t {
            // SAFETY: fd is live; buf is valid for buf.len() bytes.
            XTarget::Fd(fd) => {
                check_size(unsafe { libc::flistxattr(fd.as_raw_fd(), ptr, buf.len()) })
            }
            XTarget::At(dir, name_in) => {
                let p = proc_path(dir.as_raw_fd(), name_in)?;
                // SAFETY: p is NUL-terminated; buf is valid for buf.len() bytes.
                check_size(unsafe { libc::llistxattr(p.as_ptr(), ptr, buf.len()) })
            }
        };
        match r {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {
                let len = buf.len();
                buf.resize(len * 4, 0)
            }
            Err(e) => return Err(e),
        }
    }
}

/// FICLONE: share all extents of `src` with `dst` (reflink), where the filesystem can.
pub fn ficlone(dst: BorrowedFd, src: BorrowedFd) -> io::Result<()> {
    // SAFETY: both fds are live; FICLONE takes the source fd as its integer argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) }).map(drop)
}

/// Starts writing the file's dirty pages (sync_file_range WAIT_BEFORE | WRITE), and with
/// `wait` waits until they are on the device (WAIT_AFTER): an ordering barrier, not a
/// journal commit. Every change of the file's metadata made after it (a rename into place,
/// a removed xattr) reaches the journal after the allocation of those pages, so a power cut
/// never leaves that change without the data. ext4 in `data=ordered` (or `journal`) mode
/// allocates the pages as they are submitted and commits no transaction before their data
/// is written, so submitting is enough there; xfs logs the size only as the writes
/// complete, so elsewhere it waits.
pub fn write_out(fd: BorrowedFd, wait: bool) -> io::Result<()> {
    let mut flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE | libc::SYNC_FILE_RANGE_WRITE;
    if wait {
        flags |= libc::SYNC_FILE_RANGE_WAIT_AFTER;
    }
    // SAFETY: a live fd; offset 0 and length 0 mean the whole file.
    check(unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, flags) }).map(drop)
}

/// Does the filesystem of device `dev` (st_dev) write a file's data before any journal
/// transaction that allocated it commits? ext4 mounted without `data=writeback`, read
/// from /proc/self/mountinfo (false when it cannot tell).
pub fn orders_data_before_metadata(dev: u64) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|info| orders_in_mountinfo(&info, libc::major(dev), libc::minor(dev)))
}

fn orders_in_mountinfo(info: &str, major: u32, minor: u32) -> bool {
    let want = format!("{major}:{minor}");
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            return false;
        };
        f.get(2) == Some(&want.as_str())
            && f.get(sep + 1) == Some(&"ext4")
            && f.get(sep + 3)
                .is_some_and(|o| !o.split(',').any(|x| x == "data=writeback"))
    })
}

/// Room for the opaque part of a file handle (MAX_HANDLE_SZ in the kernel).
const MAX_HANDLE_BYTES: usize = 128;

/// The file handle of `name` in `dir` (not following a symlink there): the kernel's
/// `struct file_handle` as bytes, for `open_by_handle`. Handles name an object, not a
/// path: a rename does not change it.
pub fn name_to_handle(dir: BorrowedFd, name: &OsStr) -> io::Result<Vec<u8>> {
    let c = cstr(name.as_bytes())?;
    let head = std::mem::size_of::<libc::file_handle>();
    // u32-aligned storage for the header (two c_int-sized fields) and the opaque bytes.
    let mut buf = vec![0u32; (head + MAX_HANDLE_BYTES).div_ceil(4)];
    let fh = buf.as_mut_ptr().cast::<libc::file_handle>();
    // SAFETY: `fh` points at zeroed, 4-aligned storage of head + MAX_HANDLE_BYTES bytes.
    unsafe { (*fh).handle_bytes = MAX_HANDLE_BYTES as libc::c_uint };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `c` is a NUL-terminated name; `fh` has room for `handle_bytes` opaque bytes
    // after its header; `mount_id` is a live c_int. Flag 0: a final symlink is not followed.
    check(unsafe { libc::name_to_handle_at(dir.as_raw_fd(), c.as_ptr(), fh, &mut mount_id, 0) })?;
    // SAFETY: the kernel filled in the header; handle_bytes <= MAX_HANDLE_BYTES.
    let n = unsafe { (*fh).handle_bytes } as usize;
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).collect();
    Ok(bytes[..head + n.min(MAX_HANDLE_BYTES)].to_vec())
}

/// Opens the object `handle` (from `name_to_handle`) names on the filesystem of
/// `mount_fd`. Needs CAP_DAC_READ_SEARCH (EPERM otherwise); ESTALE once the object is gone.
pub fn open_by_handle(mount_fd: BorrowedFd, handle: &[u8], flags: i32) -> io::Result<OwnedFd> {
    let head = std::mem::size_of::<libc::file_handle>();
    if handle.len() < head || handle.len() > head + MAX_HANDLE_BYTES {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = vec![0u32; handle.len().div_ceil(4)];
    // SAFETY: `buf` has at least handle.len() bytes; the regions do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(handle.as_ptr(), buf.as_mut_ptr().cast::<u8>(), handle.len())
    };
    // SAFETY: `buf` holds a complete, 4-aligned file_handle as the kernel wrote it.
    let fd = check(unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::file_handle>(),
            flags | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// lseek that returns the raw errno (ENXIO for SEEK_DATA/SEEK_HOLE past the end).
pub fn lseek(fd: BorrowedFd, off: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: fd is live; lseek has no memory arguments.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// umount2(2).
pub fn umount2(path: &Path, flags: i32) -> io::Result<()> {
    let p = cstr(path.as_os_str().as_bytes())?;
    // SAFETY: p is NUL-terminated.
    check(unsafe { libc::umount2(p.as_ptr(), flags) }).map(drop)
}

/// Result of fork(2) as seen by the caller.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

/// fork(2). Must be called while the process has a single thread.
pub fn fork() -> io::Result<Forked> {
    // SAFETY: the caller guarantees the process is single-threaded, so the child may run
    // arbitrary code.
    let pid = unsafe { libc::fork() };
    match pid {
        p if p < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        p => Ok(Forked::Parent(p)),
    }
}

/// A pipe whose ends are closed on exec.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a valid array of two ints.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Points stdin, stdout and stderr at /dev/null (a daemon keeps no inherited terminal).
pub fn detach_stdio() -> io::Result<()> {
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for target in 0..3 {
        // SAFETY: null is a live descriptor; dup2 onto 0..2 replaces the inherited ones.
        check(unsafe { libc::dup2(null.as_raw_fd(), target) })?;
    }
    Ok(())
}

pub fn setsid() -> io::Result<()> {
    // SAFETY: no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

pub fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}

pub fn geteuid() -> u32 {
    // SAFETY: no arguments, cannot fail.
    unsafe { libc::geteuid() }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread (threads spawned later inherit
/// the mask), so that one thread can take them with `wait_signal`.
pub fn block_term_signals() -> io::Result<()> {
    let set = term_set();
    // SAFETY: set is initialised; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    Ok(())
}

fn term_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        set
    }
}

/// Waits for one of the signals blocked by `block_term_signals`.
pub fn wait_signal() -> i32 {
    let set = term_set();
    let mut sig = 0;
    // SAFETY: set is initialised and sig is a valid out-pointer.
    unsafe { libc::sigwait(&set, &mut sig) };
    sig
}

/// The current process's maximum number of open files, raised to the hard limit.
pub fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer; setrlimit reads it.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The soft limit on open files (RLIMIT_NOFILE); 1024 when it cannot be read, u64::MAX
/// when unlimited.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// An all-zero `stat`, to be filled field by field (for entries of virtual layers).
pub fn zeroed_stat() -> libc::stat {
    // SAFETY: `stat` is a plain C struct of integers; all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

#[cfg(test)]
mod tests {
    use super::orders_in_mountinfo;

    #[test]
    fn ext4_ordered_data_is_told_from_mountinfo() {
        let info = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard\n\
30 22 254:16 / /data rw shared:9 - ext4 /dev/vdb rw,data=writeback\n\
31 22 0:27 / /dev/shm rw,nosuid shared:4 - tmpfs tmpfs rw,inode64\n\
32 22 253:1 / /srv rw shared:5 - xfs /dev/vdc rw,attr2\n\
33 22 7:1 / /mnt/a\\040b rw shared:6 master:2 - ext4 /dev/loop1 rw,data=journal\n";
        assert!(
            orders_in_mountinfo(info, 254, 0),
            "ext4, default data=ordered"
        );
        assert!(!orders_in_mountinfo(info, 254, 16), "ext4 data=writeback");
        assert!(!orders_in_mountinfo(info, 0, 27), "tmpfs");
        assert!(!orders_in_mountinfo(info, 253, 1), "xfs waits");
        assert!(
            orders_in_mountinfo(info, 7, 1),
            "optional fields before '-'"
        );
        assert!(!orders_in_mountinfo(info, 9, 9), "unknown device");
    }
}
