//! Acting as another user from inside a test, and the few raw calls the hostile-user tests
//! make that std and nix do not offer safely (mmap writes, O_PATH reopen).
//!
//! `as_user(uid, gid, f)` runs `f` on a fresh thread whose credentials alone are dropped to
//! `uid:gid` with no supplementary groups and no capabilities: the raw `setresuid` family of
//! system calls changes only the calling thread (glibc's wrappers would change every thread
//! of the test binary). The thread ends with `f`, so no code ever runs as root again on it;
//! every other thread of the test keeps root. `f` runs under `with_timeout`, so a wedged mount
//! fails the test instead of hanging it.
//!
//! Invariants: nothing here follows a symlink unless its name says so; every call returns the
//! raw errno in an `io::Error`.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::{BODY_SECS, with_timeout};

fn cvt(r: libc::c_long) -> io::Result<libc::c_long> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Drops the calling thread (only) to `uid:gid`, no groups. Panics when it cannot: a test
/// that thinks it is unprivileged while it is root proves nothing.
fn drop_thread_to(uid: u32, gid: u32) {
    // SAFETY: raw setgroups/setresgid/setresuid take integers and a null list; they change
    // only this thread's credentials, which is the point.
    unsafe {
        cvt(libc::syscall(
            libc::SYS_setgroups,
            0usize,
            std::ptr::null::<libc::gid_t>(),
        ))
        .expect("setgroups(0)");
        cvt(libc::syscall(libc::SYS_setresgid, gid, gid, gid)).expect("setresgid");
        cvt(libc::syscall(libc::SYS_setresuid, uid, uid, uid)).expect("setresuid");
    }
    // The drop must really have happened: euid, fsuid and the effective capabilities.
    let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find(|l| l.starts_with(k))
            .map(|l| {
                l[k.len()..]
                    .split_whitespace()
                    .map(str::to_string)
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), vec![uid.to_string(); 4], "thread uids");
    assert_eq!(field("Gid:"), vec![gid.to_string(); 4], "thread gids");
    assert_eq!(
        field("CapEff:"),
        vec!["0000000000000000".to_string()],
        "capabilities"
    );
}

/// Runs `f` as `uid:gid` (no groups, no capabilities) on its own thread, under a timeout.
pub fn as_user<T: Send + 'static>(uid: u32, gid: u32, f: impl FnOnce() -> T + Send + 'static) -> T {
    with_timeout(BODY_SECS, move || {
        drop_thread_to(uid, gid);
        f()
    })
}

/// Maps `len` bytes of `file` at offset 0 MAP_SHARED with PROT_READ|PROT_WRITE, writes
/// `data` at `at`, msyncs and unmaps. The mmap's errno (EACCES on a read-only fd) is the
/// result when the mapping is refused.
pub fn mmap_write(file: &File, len: usize, at: usize, data: &[u8]) -> io::Result<()> {
    assert!(at + data.len() <= len);
    // SAFETY: a fresh shared mapping of a file we hold open; it is written only within
    // `len` bytes and unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(at), data.len());
        let r = libc::msync(p, len, libc::MS_SYNC);
        let e = io::Error::last_os_error();
        libc::munmap(p, len);
        if r < 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// Maps `file` MAP_SHARED read-only, then asks mprotect for PROT_WRITE: the errno of that
/// (EACCES when the fd was opened read-only), the mapping removed either way.
pub fn mprotect_write(file: &File, len: usize) -> io::Result<()> {
    // SAFETY: a fresh shared read-only mapping of a file we hold open, never written
    // through, unmapped before return.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let r = libc::mprotect(p, len, libc::PROT_READ | libc::PROT_WRITE);
        let e = io::Error::last_os_error();
        libc::munmap(p, len);
        if r < 0 {
            return Err(e);
        }
    }
    Ok(())
}

/// open(path, O_PATH | O_NOFOLLOW): a handle that needs no permission on the file itself.
pub fn open_path(p: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    // SAFETY: valid NUL-terminated path; the fd returned is owned by the caller.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// setxattr(2) on `p`, following a symlink (what `setfattr` without `-h` does).
pub fn setxattr_follow(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = CString::new(p.as_os_str().as_bytes()).unwrap();
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated path and name; value is valid for its length.
    let r = unsafe {
        libc::setxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fsetxattr(2) on an open file or directory.
pub fn fsetxattr(f: &impl AsRawFd, name: &str, value: &[u8]) -> io::Result<()> {
    let n = CString::new(name).unwrap();
    // SAFETY: a live fd, a NUL-terminated name, and a value valid for its length.
    let r = unsafe {
        libc::fsetxattr(
            f.as_raw_fd(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
