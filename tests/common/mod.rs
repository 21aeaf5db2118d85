//! Shared harness for the mount tests: fresh layer trees per test, a mount guard that
//! never leaves a mount behind, a timeout wrapper so a wedged FUSE mount fails instead of
//! hanging CI, and small errno / tree helpers.
//!
//! The driver under test is chosen by `UNIONMOUNT_TEST_DRIVER` (`kernel` = kernel
//! overlayfs, the oracle; anything else = the `unionmount` binary). A test written against
//! this harness must pass on the kernel driver; that is what makes its expectation right.
//!
//! Invariants:
//! - A `Fixture` lives under one fresh temp dir (same filesystem for all layers, ext4 on the
//!   test machines: trusted xattrs and mknod work); the dir is removed when the last clone
//!   is dropped, after lazily unmounting `mnt` if something is still mounted there.
//! - A `MountGuard` unmounts on drop on every path (also while panicking): `umount`, then
//!   `umount -l`, then for FUSE an abort through `/sys/fs/fuse/connections/N/abort`, and it
//!   waits (bounded) for the unionmount daemon to exit, killing it if it does not.
//!   `MountGuard::adopt` gives the same guarantee to a test that runs the mount command
//!   itself (the command-line and rootless tests).

#![allow(dead_code)]

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

/// How long to wait for a mount to appear or disappear, or a daemon to exit.
const MOUNT_WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    Unionmount,
    Kernel,
}

/// The driver under test: `UNIONMOUNT_TEST_DRIVER=kernel` selects kernel overlayfs.
pub fn driver() -> Driver {
    match std::env::var("UNIONMOUNT_TEST_DRIVER") {
        Ok(v) if v.eq_ignore_ascii_case("kernel") => Driver::Kernel,
        _ => Driver::Unionmount,
    }
}

pub fn is_kernel() -> bool {
    driver() == Driver::Kernel
}

fn current_test_name() -> String {
    std::thread::current()
        .name()
        .unwrap_or("<unnamed test>")
        .to_string()
}

fn overlay_available() -> bool {
    let has = || {
        fs::read_to_string("/proc/filesystems")
            .map(|s| {
                s.lines()
                    .any(|l| l.split_whitespace().last() == Some("overlay"))
            })
            .unwrap_or(false)
    };
    if has() {
        return true;
    }
    let _ = Command::new("modprobe")
        .arg("overlay")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    has()
}

/// True when this process may mount for the selected driver. When it may not, prints
/// `SKIP: <test>: <reason>` and returns false, or panics if `UNIONMOUNT_REQUIRE_MOUNT=1`
/// (CI must never pass by skipping).
pub fn mount_allowed() -> bool {
    let mut reasons = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        reasons.push("not running as root");
    }
    if !Path::new("/dev/fuse").exists() && driver() == Driver::Unionmount {
        reasons.push("/dev/fuse missing");
    }
    if driver() == Driver::Kernel && !overlay_available() {
        reasons.push("kernel overlayfs not available");
    }
    if reasons.is_empty() {
        return true;
    }
    let msg = format!("{}: {}", current_test_name(), reasons.join(", "));
    if std::env::var("UNIONMOUNT_REQUIRE_MOUNT").as_deref() == Ok("1") {
        panic!("UNIONMOUNT_REQUIRE_MOUNT=1 but the test cannot mount: {msg}");
    }
    eprintln!("SKIP: {msg}");
    false
}

/// The unionmount binary: `UNIONMOUNT_BIN`, else the one cargo built for this crate.
pub fn unionmount_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("UNIONMOUNT_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_unionmount") {
        return PathBuf::from(p);
    }
    panic!(
        "no unionmount binary: set UNIONMOUNT_BIN=/path/to/unionmount \
         (or run the tests from the unionmount crate, where cargo provides it)"
    );
}

// ---------------------------------------------------------------------------------------
// Fixture: layer trees
// ---------------------------------------------------------------------------------------

static FIXTURE_SEQ: AtomicUsize = AtomicUsize::new(0);

struct TempRoot {
    dir: PathBuf,
    mnt: PathBuf,
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        // Never recurse into a live mount: detach whatever is still mounted first.
        if is_mounted(&self.mnt) {
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
            wait_unmounted(&self.mnt);
        }
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("warning: could not remove {}: {e}", self.dir.display());
        }
    }
}

/// A fresh tree for one test: `lowers` (TOP first), `upper`, `work`, `mnt`, all under
/// `dir` on one filesystem. Clones share the tree; it is removed when the last one goes.
#[derive(Clone)]
pub struct Fixture {
    pub dir: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    _root: Arc<TempRoot>,
}

impl Fixture {
    /// `n_lowers` empty lower dirs (`lower0` is the TOP), plus upper, work and mnt.
    pub fn new(n_lowers: usize) -> Fixture {
        let base = std::env::var_os("UNIONMOUNT_TEST_TMPDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/tmp"));
        let base = if base.is_dir() {
            base
        } else {
            std::env::temp_dir()
        };
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = base.join(format!(
            "unionmount-test-{}-{}-{}",
            std::process::id(),
            FIXTURE_SEQ.fetch_add(1, Ordering::SeqCst),
            nanos
        ));
        fs::create_dir(&dir).expect("create fixture dir");
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let mk = |name: &str| {
            let p = dir.join(name);
            fs::create_dir(&p).expect("create fixture subdir");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let lowers = (0..n_lowers).map(|i| mk(&format!("lower{i}"))).collect();
        let upper = mk("upper");
        let work = mk("work");
        let mnt = mk("mnt");
        let root = Arc::new(TempRoot {
            dir: dir.clone(),
            mnt: mnt.clone(),
        });
        Fixture {
            dir,
            lowers,
            upper,
            work,
            mnt,
            _root: root,
        }
    }

    /// Path of `rel` inside the mount.
    pub fn m(&self, rel: &str) -> PathBuf {
        join(&self.mnt, rel)
    }
    /// Path of `rel` inside the upper layer.
    pub fn u(&self, rel: &str) -> PathBuf {
        join(&self.upper, rel)
    }
    /// Path of `rel` inside lower `i` (0 = TOP).
    pub fn l(&self, i: usize, rel: &str) -> PathBuf {
        join(&self.lowers[i], rel)
    }

    /// Regular file with exact `mode` (not subject to umask); parents created 0755.
    pub fn write(&self, layer: &Path, rel: &str, contents: &[u8], mode: u32) -> PathBuf {
        let p = join(layer, rel);
        mkparents(&p);
        fs::write(&p, contents).expect("write layer file");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// Directory with exact `mode`; parents created 0755.
    pub fn mkdir(&self, layer: &Path, rel: &str, mode: u32) -> PathBuf {
        let p = join(layer, rel);
        mkparents(&p);
        fs::create_dir(&p).expect("mkdir in layer");
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    pub fn symlink(&self, layer: &Path, rel: &str, target: &str) -> PathBuf {
        let p = join(layer, rel);
        mkparents(&p);
        std::os::unix::fs::symlink(target, &p).expect("symlink in layer");
        p
    }

    /// Whiteout of `rel`: a char device 0/0 named `rel`.
    pub fn whiteout_chardev(&self, layer: &Path, rel: &str) -> PathBuf {
        let p = join(layer, rel);
        mkparents(&p);
        mknod(&p, libc::S_IFCHR, 0).expect("mknod whiteout");
        p
    }

    /// Whiteout of `rel` in the OCI/AUFS dialect: an empty file `.wh.NAME`.
    pub fn whiteout_oci(&self, layer: &Path, rel: &str) -> PathBuf {
        let p = join(layer, rel);
        let name = format!(".wh.{}", p.file_name().unwrap().to_str().unwrap());
        let w = p.with_file_name(name);
        mkparents(&w);
        fs::write(&w, b"").expect("write .wh. file");
        w
    }

    /// Kernel xattr whiteout: empty regular file with `trusted.overlay.whiteout` and the
    /// parent marked `trusted.overlay.opaque=x` ("contains xattr whiteouts", not opaque).
    pub fn xattr_whiteout(&self, layer: &Path, rel: &str) -> PathBuf {
        self.xattr_whiteout_ns(layer, rel, "trusted")
    }

    /// Same with `user.overlay.*` names (the userxattr dialect).
    pub fn xattr_whiteout_ns(&self, layer: &Path, rel: &str, ns: &str) -> PathBuf {
        let p = join(layer, rel);
        mkparents(&p);
        fs::write(&p, b"").expect("write xattr whiteout");
        set_xattr(&p, &format!("{ns}.overlay.whiteout"), b"").unwrap();
        set_xattr(p.parent().unwrap(), &format!("{ns}.overlay.opaque"), b"x").unwrap();
        p
    }

    /// Mark dir `rel` opaque with `trusted.overlay.opaque=y` (created if missing).
    pub fn opaque_xattr(&self, layer: &Path, rel: &str) -> PathBuf {
        self.opaque_xattr_named(layer, rel, "trusted.overlay.opaque")
    }

    /// Mark dir `rel` opaque with `name=y` (e.g. `user.overlay.opaque`,
    /// `user.fuseoverlayfs.opaque`); created if missing.
    pub fn opaque_xattr_named(&self, layer: &Path, rel: &str, name: &str) -> PathBuf {
        let p = join(layer, rel);
        if !p.exists() {
            mkparents(&p);
            fs::create_dir(&p).unwrap();
        }
        set_xattr(&p, name, b"y").expect("set opaque xattr");
        p
    }

    /// Mark dir `rel` opaque OCI-style: a file `.wh..wh..opq` inside it (created if missing).
    pub fn opaque_oci(&self, layer: &Path, rel: &str) -> PathBuf {
        let p = join(layer, rel);
        fs::create_dir_all(&p).unwrap();
        fs::write(p.join(".wh..wh..opq"), b"").expect("write .wh..wh..opq");
        p
    }

    /// Hard link `new` to `existing` inside one layer.
    pub fn hardlink(&self, layer: &Path, existing: &str, new: &str) -> PathBuf {
        let p = join(layer, new);
        mkparents(&p);
        fs::hard_link(join(layer, existing), &p).expect("hard link in layer");
        p
    }

    pub fn chown(&self, layer: &Path, rel: &str, uid: u32, gid: u32) {
        lchown(&join(layer, rel), uid, gid).expect("lchown in layer");
    }

    /// Set atime and mtime (seconds, nanoseconds) without following symlinks.
    pub fn set_times(&self, layer: &Path, rel: &str, atime: (i64, i64), mtime: (i64, i64)) {
        set_times(&join(layer, rel), atime, mtime).expect("utimensat in layer");
    }

    pub fn setxattr(&self, layer: &Path, rel: &str, name: &str, value: &[u8]) {
        set_xattr(&join(layer, rel), name, value).expect("setxattr in layer");
    }
}

fn join(base: &Path, rel: &str) -> PathBuf {
    let rel = rel.trim_start_matches('/');
    if rel.is_empty() {
        base.to_path_buf()
    } else {
        base.join(rel)
    }
}

fn mkparents(p: &Path) {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).expect("create parents");
    }
}

// ---------------------------------------------------------------------------------------
// Mounting
// ---------------------------------------------------------------------------------------

/// A live mount; unmounts on drop (also while panicking) and waits until it is gone.
pub struct MountGuard {
    pub mnt: PathBuf,
    pub driver: Driver,
    /// `/sys/fs/fuse/connections/<minor>` for FUSE mounts: lets drop abort a wedged daemon.
    fuse_conn: Option<PathBuf>,
    /// Empty extra lower that kernel overlayfs needs for a read-only single-lower mount.
    extra_dir: Option<PathBuf>,
    unmounted: bool,
}

impl MountGuard {
    /// A guard for `mnt` when the test runs the mount command itself (or expects it to
    /// fail): whatever unionmount mount is on `mnt` when the guard goes is unmounted, and
    /// its daemon reaped, the same way as for a mount made by `mount`. Nothing need be
    /// mounted yet, or ever.
    pub fn adopt(mnt: &Path) -> MountGuard {
        MountGuard {
            mnt: mnt.to_path_buf(),
            driver: Driver::Unionmount,
            fuse_conn: None,
            extra_dir: None,
            unmounted: false,
        }
    }

    /// `/sys/fs/fuse/connections/<minor>` of this FUSE mount (None for kernel overlayfs):
    /// a watchdog reads `waiting` there and writes `abort` to end a wedged connection.
    pub fn fuse_conn(&self) -> Option<&Path> {
        self.fuse_conn.as_deref()
    }

    /// Unmount now and report failure (drop does the same but only logs).
    pub fn unmount(mut self) -> io::Result<()> {
        let r = self.do_unmount();
        self.unmounted = true;
        r
    }

    fn do_unmount(&mut self) -> io::Result<()> {
        if self.unmounted {
            return Ok(());
        }
        let daemons = if self.driver == Driver::Unionmount {
            daemon_pids(&self.mnt)
        } else {
            vec![]
        };
        // An adopted guard learns the FUSE connection only now (before it is unmounted).
        let fuse_conn = self
            .fuse_conn
            .clone()
            .or_else(|| mountinfo_entry(&self.mnt).and_then(|e| fuse_connection(&e)));
        // umount2(2) directly: umount(8) stats the mountpoint first, which hangs on a
        // wedged FUSE daemon.
        if let Err(e) = umount2(&self.mnt, 0)
            && is_mounted(&self.mnt)
        {
            eprintln!("note: umount {}: {e}; detaching lazily", self.mnt.display());
            let _ = umount2(&self.mnt, libc::MNT_DETACH);
        }
        let gone = wait_unmounted(&self.mnt);
        if self.driver == Driver::Unionmount && !wait_pids_exit(&daemons, MOUNT_WAIT) {
            // Still serving: abort the FUSE connection, then kill what is left.
            if let Some(conn) = &fuse_conn {
                let _ = fs::write(conn.join("abort"), b"1");
            }
            if !wait_pids_exit(&daemons, Duration::from_secs(2)) {
                for &pid in &daemons {
                    kill(pid, libc::SIGKILL);
                }
            }
            if let Some(d) = &self.extra_dir {
                let _ = fs::remove_dir(d);
            }
            return Err(io::Error::other(format!(
                "unionmount daemon for {} did not exit after unmount",
                self.mnt.display()
            )));
        }
        if let Some(d) = &self.extra_dir {
            let _ = fs::remove_dir(d);
        }
        if !gone {
            return Err(io::Error::other(format!(
                "{} still mounted",
                self.mnt.display()
            )));
        }
        Ok(())
    }
}

impl Drop for MountGuard {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            eprintln!("warning: {e}");
        }
        self.unmounted = true;
    }
}

/// Mount `fx` with `driver`: rw = lowers + upper + work; ro = lowers only.
pub fn mount(
    driver: &Driver,
    fx: &Fixture,
    rw: bool,
    extra_opts: &[&str],
) -> io::Result<MountGuard> {
    if rw {
        mount_paths(
            driver,
            &fx.lowers,
            Some(&fx.upper),
            Some(&fx.work),
            &fx.mnt,
            extra_opts,
        )
    } else {
        mount_paths(driver, &fx.lowers, None, None, &fx.mnt, extra_opts)
    }
}

/// Mount explicit paths. Returns once the mount is in /proc/self/mountinfo. Errors carry
/// the command's stderr.
pub fn mount_paths(
    driver: &Driver,
    lowers: &[PathBuf],
    upper: Option<&Path>,
    work: Option<&Path>,
    mnt: &Path,
    extra: &[&str],
) -> io::Result<MountGuard> {
    mount_paths_env(driver, lowers, upper, work, mnt, extra, &[])
}

/// `mount_paths` with extra environment for the mount command (e.g. a unionmount test hook).
pub fn mount_paths_env(
    driver: &Driver,
    lowers: &[PathBuf],
    upper: Option<&Path>,
    work: Option<&Path>,
    mnt: &Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> io::Result<MountGuard> {
    let mut lowers: Vec<PathBuf> = lowers.to_vec();
    let mut extra_dir = None;
    if *driver == Driver::Kernel && upper.is_none() && lowers.len() == 1 {
        // Kernel overlayfs wants two lowers without an upper; an empty one changes nothing.
        let d = mnt.with_file_name(format!(
            ".{}-empty-lower",
            mnt.file_name().and_then(OsStr::to_str).unwrap_or("mnt")
        ));
        let _ = fs::create_dir(&d);
        lowers.push(d.clone());
        extra_dir = Some(d);
    }
    let lowerdir = lowers
        .iter()
        .map(|p| p.to_str().expect("utf-8 layer path").replace(':', "\\:"))
        .collect::<Vec<_>>()
        .join(":");
    let mut opts = format!("lowerdir={lowerdir}");
    if let Some(u) = upper {
        opts.push_str(&format!(",upperdir={}", u.display()));
    }
    if let Some(w) = work {
        opts.push_str(&format!(",workdir={}", w.display()));
    }
    for e in extra {
        opts.push(',');
        opts.push_str(e);
    }
    // Whole suites can be rerun with extra unionmount options, e.g.
    // UNIONMOUNT_TEST_OPTS=passthrough=off for the path without FUSE passthrough.
    if *driver == Driver::Unionmount
        && let Ok(more) = std::env::var("UNIONMOUNT_TEST_OPTS")
        && !more.is_empty()
    {
        opts.push(',');
        opts.push_str(&more);
    }
    let mut cmd = match driver {
        Driver::Kernel => {
            let mut c = Command::new("mount");
            c.args(["-t", "overlay", "overlay", "-o"])
                .arg(&opts)
                .arg(mnt);
            c
        }
        Driver::Unionmount => {
            let mut c = Command::new(unionmount_bin());
            c.arg("-o").arg(&opts).arg(mnt);
            c
        }
    };
    cmd.envs(env.iter().copied());
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()?;
    if !out.status.success() {
        if let Some(d) = &extra_dir {
            let _ = fs::remove_dir(d);
        }
        return Err(io::Error::other(format!(
            "{driver:?} mount of {} failed ({}): {}",
            mnt.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let deadline = Instant::now() + MOUNT_WAIT;
    let entry = loop {
        if let Some(e) = mountinfo_entry(mnt) {
            break e;
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "{} did not appear in /proc/self/mountinfo",
                mnt.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(MountGuard {
        mnt: mnt.to_path_buf(),
        driver: *driver,
        fuse_conn: fuse_connection(&entry),
        extra_dir,
        unmounted: false,
    })
}

struct MountInfoEntry {
    dev: String,
    fstype: String,
}

/// `/sys/fs/fuse/connections/<minor>` for a FUSE mount: writing `abort` there ends a
/// wedged daemon's connection.
fn fuse_connection(entry: &MountInfoEntry) -> Option<PathBuf> {
    if !entry.fstype.starts_with("fuse") {
        return None;
    }
    entry
        .dev
        .split(':')
        .nth(1)
        .map(|m| PathBuf::from(format!("/sys/fs/fuse/connections/{m}")))
}

/// A mount-table field with its octal escapes (`\040` for a space, ...) decoded.
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// umount2(2) on `mnt` (never stats it, so it does not hang on a wedged FUSE mount).
pub fn umount2(mnt: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cpath(mnt);
    // SAFETY: valid path.
    cvt(unsafe { libc::umount2(c.as_ptr(), flags) }).map(|_| ())
}

/// `mnt` with its parent canonicalised; never stats `mnt` itself (a stat on a wedged
/// FUSE mountpoint blocks).
fn canonical_mountpoint(mnt: &Path) -> PathBuf {
    match (mnt.parent(), mnt.file_name()) {
        (Some(parent), Some(name)) if !parent.as_os_str().is_empty() => fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => mnt.to_path_buf(),
    }
}

/// The last mountinfo entry whose mount point is `mnt`.
fn mountinfo_entry(mnt: &Path) -> Option<MountInfoEntry> {
    let want = canonical_mountpoint(mnt);
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut found = None;
    for line in info.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() < 5 {
            continue;
        }
        if unescape_octal(f[4]) == want.as_os_str().as_bytes() {
            let sep = f.iter().position(|x| *x == "-");
            let fstype = sep.and_then(|i| f.get(i + 1)).unwrap_or(&"").to_string();
            found = Some(MountInfoEntry {
                dev: f[2].to_string(),
                fstype,
            });
        }
    }
    found
}

/// The `/proc/self/mounts` entry for `mnt` as a user reads it: (source, fstype, options).
pub fn mount_entry(mnt: &Path) -> Option<(String, String, Vec<String>)> {
    let table = fs::read_to_string("/proc/self/mounts").ok()?;
    parse_mount_entry(&table, mnt)
}

/// The last line of `table` (in `/proc/*/mounts` format, e.g. captured inside another
/// mount namespace) whose mount point is `mnt`: (source, fstype, options).
pub fn parse_mount_entry(table: &str, mnt: &Path) -> Option<(String, String, Vec<String>)> {
    let want = canonical_mountpoint(mnt);
    let mut found = None;
    for line in table.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        if f.len() >= 4 && unescape_octal(f[1]) == want.as_os_str().as_bytes() {
            found = Some((
                f[0].to_string(),
                f[2].to_string(),
                f[3].split(',').map(str::to_string).collect(),
            ));
        }
    }
    found
}

pub fn is_mounted(mnt: &Path) -> bool {
    mountinfo_entry(mnt).is_some()
}

/// Poll `cond` every 10 ms for up to `limit`; true once it holds.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_unmounted(mnt: &Path) -> bool {
    wait_for(MOUNT_WAIT, || !is_mounted(mnt))
}

/// Live (non-zombie) processes, in any mount namespace, whose argv has `mnt` as one whole
/// argument and whose argv[0] names the unionmount binary (the one under test, or one
/// called `unionmount`, as mount(8) runs it): the daemons serving `mnt`.
pub fn daemon_pids(mnt: &Path) -> Vec<i32> {
    let want = mnt.as_os_str().as_bytes();
    let bin = unionmount_bin();
    let names = [
        bin.file_name().unwrap_or(OsStr::new("unionmount")),
        OsStr::new("unionmount"),
    ];
    let me = std::process::id() as i32;
    let mut pids = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return pids;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me || !alive(pid) {
            continue;
        }
        let Ok(cmdline) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_um = args
            .first()
            .and_then(|a| Path::new(OsStr::from_bytes(a)).file_name())
            .is_some_and(|n| names.contains(&n));
        if is_um && args.contains(&want) {
            pids.push(pid);
        }
    }
    pids
}

/// Processes holding a file, cwd or root under `mnt` (from /proc/*/{fd,cwd,root}):
/// "pid (comm)" for each, to say who made an unmount busy.
pub fn holders_of(mnt: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let mut links: Vec<PathBuf> = vec![e.path().join("cwd"), e.path().join("root")];
        if let Ok(fds) = fs::read_dir(e.path().join("fd")) {
            links.extend(fds.flatten().map(|f| f.path()));
        }
        if links
            .iter()
            .any(|l| fs::read_link(l).is_ok_and(|t| t.starts_with(mnt)))
        {
            let comm = fs::read_to_string(e.path().join("comm")).unwrap_or_default();
            found.push(format!("{pid} ({})", comm.trim()));
        }
    }
    found
}

/// `umount mnt`, retried for up to 5 s while it says "target is busy". The tests of one
/// binary run on parallel threads, and a child another thread forks holds a copy of this
/// thread's (close-on-exec) fds until it execs: a file this thread just closed can keep
/// the mount busy for that moment. Each busy attempt logs who held the mount.
pub fn umount_busy_tolerant(mnt: &Path) -> Output {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = run_prog_within(30, "umount", vec![os(mnt)]);
        let busy = text(&out.stderr).contains("target is busy");
        if !busy || Instant::now() > deadline {
            return out;
        }
        eprintln!(
            "umount {}: busy, held by {:?}; retrying",
            mnt.display(),
            holders_of(mnt)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn wait_pids_exit(pids: &[i32], limit: Duration) -> bool {
    wait_for(limit, || pids.iter().all(|&p| !alive(p)))
}

/// kill(2); for pids the test started or observed serving its own mountpoint.
pub fn kill(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions.
    unsafe { libc::kill(pid, sig) };
}

// ---------------------------------------------------------------------------------------
// Timeouts
// ---------------------------------------------------------------------------------------

/// Run `f` on its own thread; panic if it does not finish within `secs` (a wedged mount
/// fails the test instead of hanging CI). A panic inside `f` is propagated as is.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let name = format!("{}-body", current_test_name());
    let h = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            let v = f();
            let _ = tx.send(v);
        })
        .expect("spawn test body thread");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("test body ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("test body did not finish within {secs} s (wedged mount?)")
        }
    }
}

/// Seconds the accesses of one test body through its mount may take.
pub const BODY_SECS: u64 = 30;

/// Run `body` on a clone of `fx` under `with_timeout(BODY_SECS, ..)`: what a test does
/// through its mount.
pub fn within_mount<T: Send + 'static>(
    fx: &Fixture,
    body: impl FnOnce(Fixture) -> T + Send + 'static,
) -> T {
    let f = fx.clone();
    with_timeout(BODY_SECS, move || body(f))
}

// ---------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------

pub fn os(s: impl AsRef<OsStr>) -> OsString {
    s.as_ref().to_os_string()
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run `prog args` with stdin from /dev/null, under a timeout of `secs`; stdout and stderr
/// captured (`output()` also waits for EOF on both pipes).
pub fn run_prog_within(secs: u64, prog: impl AsRef<OsStr>, args: Vec<OsString>) -> Output {
    let prog = os(prog);
    with_timeout(secs, move || {
        Command::new(&prog)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("spawn {prog:?}: {e}"))
    })
}

/// The command exited 0 (the message shows its stdout and stderr otherwise).
#[track_caller]
pub fn assert_success(out: &Output, what: &str) {
    assert_eq!(
        out.status.code(),
        Some(0),
        "{what}: exit status {}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
}

/// The command exited 0 and printed nothing.
#[track_caller]
pub fn assert_quiet_success(out: &Output, what: &str) {
    assert_success(out, what);
    assert_eq!(text(&out.stdout), "", "{what}: stdout");
    assert_eq!(text(&out.stderr), "", "{what}: stderr");
}

// ---------------------------------------------------------------------------------------
// Small syscall helpers
// ---------------------------------------------------------------------------------------

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path with NUL")
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The errno of a failed result; panics (with the value's absence) when it succeeded.
pub fn errno_of<T>(r: io::Result<T>) -> i32 {
    match r {
        Ok(_) => panic!("expected an error, the call succeeded"),
        Err(e) => e
            .raw_os_error()
            .unwrap_or_else(|| panic!("error without errno: {e}")),
    }
}

/// Assert `r` failed with exactly `errno` (names both sides in the message).
#[track_caller]
pub fn assert_errno<T: std::fmt::Debug>(r: io::Result<T>, errno: i32) {
    match r {
        Ok(v) => panic!(
            "expected errno {} ({}), got success: {v:?}",
            errno,
            errno_name(errno)
        ),
        Err(e) => assert_eq!(
            e.raw_os_error(),
            Some(errno),
            "expected errno {} ({}), got {e}",
            errno,
            errno_name(errno)
        ),
    }
}

pub fn errno_name(e: i32) -> String {
    io::Error::from_raw_os_error(e).to_string()
}

/// Sorted names in `p` (without `.` and `..`). Panics on error.
pub fn list_dir(p: impl AsRef<Path>) -> Vec<String> {
    let p = p.as_ref();
    let mut v: Vec<String> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", p.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `(name, d_ino, d_type)` for every entry of `p` via getdents (libc readdir), sorted,
/// without `.` and `..`.
pub fn readdir_raw(p: impl AsRef<Path>) -> io::Result<Vec<(String, u64, u8)>> {
    let c = cpath(p.as_ref());
    // SAFETY: valid NUL-terminated path; the DIR* is closed below on every path.
    let d = unsafe { libc::opendir(c.as_ptr()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    loop {
        // SAFETY: d is a live DIR*; errno is reset to tell end-of-stream from an error.
        unsafe { *libc::__errno_location() = 0 };
        let ent = unsafe { libc::readdir64(d) };
        if ent.is_null() {
            let err = io::Error::last_os_error();
            unsafe { libc::closedir(d) };
            if err.raw_os_error().unwrap_or(0) != 0 {
                return Err(err);
            }
            break;
        }
        // SAFETY: ent points to a valid dirent64 until the next readdir call.
        let (name, ino, ty) = unsafe {
            let e = &*ent;
            let name = std::ffi::CStr::from_ptr(e.d_name.as_ptr())
                .to_string_lossy()
                .into_owned();
            (name, e.d_ino, e.d_type)
        };
        if name != "." && name != ".." {
            out.push((name, ino, ty));
        }
    }
    out.sort();
    Ok(out)
}

pub fn lstat(p: impl AsRef<Path>) -> io::Result<fs::Metadata> {
    fs::symlink_metadata(p)
}

pub fn mknod(p: &Path, mode: u32, dev: u64) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev as libc::dev_t) }).map(|_| ())
}

pub fn makedev(major: u32, minor: u32) -> u64 {
    libc::makedev(major, minor) as u64
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid path.
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(|_| ())
}

pub fn set_times(p: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid path and a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(|_| ())
}

/// renameat2(2) with `flags` (`libc::RENAME_NOREPLACE`, `RENAME_EXCHANGE`, ...).
pub fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> io::Result<()> {
    let (a, b) = (cpath(from), cpath(to));
    // SAFETY: valid NUL-terminated paths.
    cvt(unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    })
    .map(|_| ())
}

/// lsetxattr (never follows a symlink).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid path, name and buffer.
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(|_| ())
}

/// lgetxattr; Err(ENODATA) when absent.
pub fn get_xattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path, name and buffer of the given length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn remove_xattr(p: &Path, name: &str) -> io::Result<()> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid path and name.
    cvt(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

/// llistxattr, sorted.
pub fn list_xattrs(p: &Path) -> io::Result<Vec<String>> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid path and buffer of the given length.
    let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    buf.truncate(r as usize);
    let mut v: Vec<String> = buf
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// xattrs a user would compare, minus overlay bookkeeping the kernel adds on copy-up
/// (`trusted.overlay.origin`, `.impure`, ...) and security labels.
pub fn user_visible_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    list_xattrs(p)
        .unwrap_or_default()
        .into_iter()
        .filter(|n| !n.starts_with("security."))
        .map(|n| {
            let v = get_xattr(p, &n).unwrap_or_default();
            (n, v)
        })
        .collect()
}

/// True when `p` is a char device 0/0 (an overlay whiteout).
pub fn is_chardev_whiteout(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    match lstat(p) {
        Ok(m) => m.file_type().is_char_device() && m.rdev() == 0,
        Err(_) => false,
    }
}

/// True when `p` is any whiteout dialect we write into the upper: a char device 0/0, or
/// an empty `.wh.NAME` sibling (the fallback when mknod is refused).
pub fn is_whiteout_in_upper(p: &Path) -> bool {
    if is_chardev_whiteout(p) {
        return true;
    }
    let name = p.file_name().unwrap().to_str().unwrap();
    let wh = p.with_file_name(format!(".wh.{name}"));
    lstat(&wh)
        .map(|m| m.is_file() && m.len() == 0)
        .unwrap_or(false)
}

/// True when dir `p` carries an opaque marker we may write (`trusted.overlay.opaque=y`
/// as root, `user.overlay.opaque=y` otherwise).
pub fn is_opaque_in_upper(p: &Path) -> bool {
    get_xattr(p, "trusted.overlay.opaque")
        .map(|v| v == b"y")
        .unwrap_or(false)
        || get_xattr(p, "user.overlay.opaque")
            .map(|v| v == b"y")
            .unwrap_or(false)
}

/// Everything left in `work` after operations settle: entries other than top-level
/// directories (the kernel's `work/`, `index/`) and char-dev 0/0 whiteouts (the kernel
/// keeps one shared whiteout in `work/work` to hard-link from). Empty means clean.
pub fn work_leftovers(work: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) {
        let Ok(rd) = fs::read_dir(dir) else { return };
        for e in rd.flatten() {
            let p = e.path();
            let Ok(m) = lstat(&p) else { continue };
            if m.is_dir() {
                if depth > 0 {
                    out.push(p.clone());
                }
                walk(&p, depth + 1, out);
            } else if !is_chardev_whiteout(&p) {
                out.push(p);
            }
        }
    }
    let mut out = Vec::new();
    walk(work, 0, &mut out);
    out.sort();
    out
}

#[track_caller]
pub fn assert_work_clean(work: &Path) {
    let left = work_leftovers(work);
    assert!(left.is_empty(), "workdir leftovers: {left:?}");
}

/// Run `sh -c script` in `cwd` as `uid:gid` (via setpriv, groups cleared) or as root when
/// `uid` is None. Returns (exit code, stdout, stderr).
pub fn sh_as(uid: Option<(u32, u32)>, cwd: &Path, script: &str) -> (i32, String, String) {
    let mut cmd = match uid {
        Some((u, g)) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={u}"))
                .arg(format!("--regid={g}"))
                .arg("--clear-groups")
                .arg("--")
                .arg("sh");
            c
        }
        None => Command::new("sh"),
    };
    let out = cmd
        .arg("-c")
        .arg(script)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("spawn sh");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Convenience: metadata of `p` must be a regular file with these contents.
#[track_caller]
pub fn assert_file(p: impl AsRef<Path>, contents: &[u8]) {
    let p = p.as_ref();
    let m = lstat(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    assert!(m.is_file(), "{} is not a regular file", p.display());
    assert_eq!(
        fs::read(p).unwrap(),
        contents,
        "contents of {}",
        p.display()
    );
}

#[track_caller]
pub fn assert_enoent(p: impl AsRef<Path>) {
    let p = p.as_ref();
    match lstat(p) {
        Ok(m) => panic!(
            "{} exists ({:?}), expected ENOENT",
            p.display(),
            m.file_type()
        ),
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{}: {e}", p.display()),
    }
}

/// `fs::Permissions` bits of `p` (mode & 0o7777), not following symlinks.
pub fn mode_of(p: impl AsRef<Path>) -> u32 {
    lstat(p).unwrap().mode() & 0o7777
}

/// A scratch directory, removed on drop: `new` under the system temp dir, `new_in` under
/// `base` (e.g. /dev/shm for another filesystem). Names carry the pid and a timestamp.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        TempDir::new_in(&std::env::temp_dir().to_string_lossy(), tag)
    }

    pub fn new_in(base: &str, tag: &str) -> TempDir {
        let p = PathBuf::from(base).join(format!(
            "unionmount-test-{tag}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// Daemon exit status
// ---------------------------------------------------------------------------------------

/// Make this process the child subreaper (prctl PR_SET_CHILD_SUBREAPER): a daemon forked
/// by a mount command this process runs is re-parented here when the command exits, so
/// `wait_exit_status` can read how it ended. Process-wide and permanent for the test
/// binary; daemons nobody waits for stay zombies until the binary exits (`alive` counts a
/// zombie as gone).
pub fn become_child_subreaper() {
    // SAFETY: prctl(PR_SET_CHILD_SUBREAPER, 1) takes no pointers.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER): {}",
        io::Error::last_os_error()
    );
}

/// How a child (or re-parented) process `pid` ended: `Some(Ok(code))` for an exit,
/// `Some(Err(signal))` when a signal killed it, `None` if it is still running after `limit`.
pub fn wait_exit_status(pid: i32, limit: Duration) -> Option<Result<i32, i32>> {
    let deadline = Instant::now() + limit;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: waitpid writes one int through a valid pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            if libc::WIFEXITED(status) {
                return Some(Ok(libc::WEXITSTATUS(status)));
            }
            if libc::WIFSIGNALED(status) {
                return Some(Err(libc::WTERMSIG(status)));
            }
        } else if r < 0 {
            panic!("waitpid({pid}): {}", io::Error::last_os_error());
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

// ---------------------------------------------------------------------------------------
// Data-path syscalls (the integrity exerciser): mmap, fallocate, copy_file_range
// ---------------------------------------------------------------------------------------

/// A `MAP_SHARED` mapping of `len` bytes of a file at a page-aligned `offset`; unmapped on
/// drop. The caller keeps the mapping inside the file's size (a page past EOF is SIGBUS).
pub struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    /// mmap(2) `len` (> 0) bytes of `fd` at `offset` (a multiple of the page size), shared,
    /// readable, and writable when `writable`.
    pub fn new(
        fd: &impl std::os::fd::AsRawFd,
        offset: u64,
        len: usize,
        writable: bool,
    ) -> io::Result<Mapping> {
        let prot = if writable {
            libc::PROT_READ | libc::PROT_WRITE
        } else {
            libc::PROT_READ
        };
        // SAFETY: a fresh mapping chosen by the kernel (addr NULL); nothing else aliases it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr: p.cast(), len })
    }

    pub fn bytes(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is mapped readable for the life of self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Only for a mapping made `writable`.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr..ptr+len is mapped (writable by the caller's contract) for the life of
        // self, and &mut self makes this the only slice over it.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }

    /// msync(MS_SYNC) of the whole mapping.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: ptr/len describe a live mapping of ours.
        cvt(unsafe { libc::msync(self.ptr.cast(), self.len, libc::MS_SYNC) }).map(|_| ())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len describe a live mapping of ours; no slice outlives self.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// fallocate(2) on `fd`.
pub fn fallocate(
    fd: &impl std::os::fd::AsRawFd,
    mode: libc::c_int,
    offset: u64,
    len: u64,
) -> io::Result<()> {
    // SAFETY: plain syscall on an fd the caller owns.
    cvt(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            mode,
            offset as libc::off_t,
            len as libc::off_t,
        )
    })
    .map(|_| ())
}

/// copy_file_range(2) with explicit offsets (the fds' positions are untouched); returns
/// the number of bytes copied (0 at the source's end).
pub fn copy_file_range(
    src: &impl std::os::fd::AsRawFd,
    off_in: u64,
    dst: &impl std::os::fd::AsRawFd,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    let mut a = off_in as libc::loff_t;
    let mut b = off_out as libc::loff_t;
    // SAFETY: plain syscall; the offsets point to live locals.
    let r =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut a, dst.as_raw_fd(), &mut b, len, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// truncate(2) by path.
pub fn truncate(p: &Path, len: u64) -> io::Result<()> {
    let c = cpath(p);
    // SAFETY: valid NUL-terminated path.
    cvt(unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) }).map(|_| ())
}

/// lseek(2) on `fd` (e.g. SEEK_DATA / SEEK_HOLE); moves the fd's position.
pub fn lseek(fd: &impl std::os::fd::AsRawFd, off: i64, whence: libc::c_int) -> io::Result<i64> {
    // SAFETY: plain syscall on an fd the caller owns.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as i64)
    }
}

// ---------------------------------------------------------------------------------------
// Seeded generators for the randomised tests (each test prints its seed to replay a run)
// ---------------------------------------------------------------------------------------

/// splitmix64: small and seedable; the same seed gives the same sequence forever (the
/// seeds in failure reports depend on it).
pub struct SplitMix(u64);

impl SplitMix {
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// One step of xorshift64* on `state` (which must not be 0): the generator of the crash,
/// durability and integrity tests, each of which seeds and shapes it its own way.
pub fn xorshift64star(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// Is a union mount in this test run making metadata-only copies? On with
/// `metacopy=on` in UNIONMOUNT_TEST_OPTS, and by default over virtual (image-like) lowers.
#[allow(dead_code)]
pub fn union_metacopy() -> bool {
    let opts = std::env::var("UNIONMOUNT_TEST_OPTS").unwrap_or_default();
    let given = opts
        .split(',')
        .filter_map(|o| o.strip_prefix("metacopy="))
        .next_back();
    match given {
        Some(v) => v == "on",
        None => std::env::var_os("UNIONMOUNT_TEST_VIRTUAL_LOWERS").is_some(),
    }
}

/// Does the file at `p` store no data at all (SEEK_DATA finds none: one hole)? Its xattrs
/// may still take a block, which `st_blocks` would count.
#[allow(dead_code)]
pub fn stores_no_data(p: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let f = fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    // SAFETY: lseek on an fd we own.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO)
}
